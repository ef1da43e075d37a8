"""python -m bncore (or the `bncore` command): the configuration and a
self-check, the paper demos, and the benchmark."""
import argparse
import sys


def selfcheck():
    """show_config(), then batch_norm_train against a float64 NumPy reference."""
    import numpy as np

    from ._config import show_config
    from .functional import batch_norm_train

    show_config()
    rng = np.random.default_rng(0)
    worst = 0.0
    for shape, axis in (((64, 32), 1), ((8, 16, 10, 10), 1), ((8, 10, 10, 16), -1)):
        x = (rng.standard_normal(shape) * 3 + 1e3).astype(np.float32)
        w = rng.standard_normal(shape[axis]).astype(np.float32)
        b = rng.standard_normal(shape[axis]).astype(np.float32)
        y, _, _ = batch_norm_train(x, w, b, axis=axis)
        red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        x64 = x.astype(np.float64)
        bshape = [1] * x.ndim
        bshape[axis] = -1
        ref = ((x64 - x64.mean(red, keepdims=True)) / np.sqrt(x64.var(red, keepdims=True) + 1e-5)
               * w.reshape(bshape) + b.reshape(bshape))
        err = float(np.max(np.abs(y - ref)))
        worst = max(worst, err)
        print(f"self-check batch_norm_train {shape} axis={axis}: max |error| vs float64 NumPy = {err:.2e}")
    ok = worst < 1e-3
    print("self-check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def _demo(args):
    from .demos import main
    return main(args)


def _bench(args):
    from .bench import main
    return main(args) or 0


def parser():
    p = argparse.ArgumentParser(
        prog="bncore", description="bncore: fast, accurate CPU batch normalization for NumPy.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("selfcheck", help="print the build configuration and check the kernels "
                                     "against float64 NumPy (the default)")
    for name, text in (("demo", "the papers' experiments in plain NumPy: mnist (batch norm, "
                                "the default), renorm, recurrent, layernorm, "
                                "precise; "
                                "`demo [NAME] --help` for options"),
                       ("bench", "time bncore against NumPy and the peers installed here; "
                                 "`bench --help` for options")):
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = parser().parse_args(argv[:1] if argv and argv[0] in ("demo", "bench") else argv)
    if ns.command == "demo":
        return _demo(argv[1:])
    if ns.command == "bench":
        return _bench(argv[1:])
    return selfcheck()


if __name__ == "__main__":
    sys.exit(main())
