"""python -m bncore [selfcheck | demo | bench | bench-norms | bench-inference]:
the configuration and a self-check against NumPy, the batch-norm paper's MNIST
experiment (bncore.demo), or the benchmarks against NumPy, PyTorch and ONNX
Runtime (bncore.bench and its companions for the norms and inference)."""
import sys


def selfcheck():
    import numpy as np

    import bncore

    bncore.show_config()
    rng = np.random.default_rng(0)
    worst = 0.0
    for shape, axis in (((64, 32), 1), ((8, 16, 10, 10), 1), ((8, 10, 10, 16), -1)):
        x = (rng.standard_normal(shape) * 3 + 1e3).astype(np.float32)
        w = rng.standard_normal(shape[axis]).astype(np.float32)
        b = rng.standard_normal(shape[axis]).astype(np.float32)
        y, _, _ = bncore.batch_norm_train(x, w, b, axis=axis)
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "selfcheck"
    if cmd == "selfcheck":
        return selfcheck()
    if cmd == "demo":
        from bncore.demos import main as demo
        return demo(argv[1:])
    if cmd == "bench":
        from bncore.bench import main as bench
        bench(argv[1:])
        return 0
    if cmd == "bench-norms":
        from bncore.bench_norms import main as bench_norms
        bench_norms(argv[1:])
        return 0
    if cmd == "bench-inference":
        from bncore.bench_inference import main as bench_inference
        bench_inference(argv[1:])
        return 0
    print("usage: python -m bncore [selfcheck | demo [--help] | bench [--quick] [--json PATH] "
          f"[--threads N] | bench-norms | bench-inference]   (unknown command {cmd!r})",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
