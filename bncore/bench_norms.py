"""Layer norm and group norm: bncore against naive NumPy and PyTorch.

``python -m bncore.bench_norms [--quick] [--threads 1,2] [--rounds N] [--json PATH]``

Cells follow ``bncore.bench``'s method: every implementation of a cell runs
interleaved in this process (each round times one sample of each, rotating
who goes first) and the table shows the median over rounds. bncore is timed
with a fresh output and with a preallocated ``out=``. Peers: NumPy is the
code a user would write (``x.mean``/``x.var`` and broadcasting), PyTorch is
``F.layer_norm`` / ``F.group_norm`` forward and ``aten.native_layer_norm_backward``
/ ``aten.native_group_norm_backward``. Missing peers are skipped.

For ``bncore.bench``: ``CELLS`` / ``QUICK_CELLS`` are (op, shape) pairs,
``make_case(op, shape)`` builds the inputs and ``impls(case, n_threads, torch)``
returns {name: zero-argument callable} for names in ``NAMES``.
"""
import argparse
import json
import math
import sys
import time

import numpy as np

import bncore

EPS = 1e-5
GROUPS = 32
# layer norm: rows of 768, 1024 and 4096 features, batch x sequence 8 x 512;
# group norm: 32 groups on ResNet-50 activations
LN_SHAPES = [(8, 512, 768), (8, 512, 1024), (8, 512, 4096)]
GN_SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7), (8, 512, 28, 28)]
OPS = ("layer_norm", "layer_norm_backward", "group_norm", "group_norm_backward")
CELLS = ([(op, s) for op in OPS[:2] for s in LN_SHAPES]
         + [(op, s) for op in OPS[2:] for s in GN_SHAPES])
QUICK_CELLS = [(op, s) for op, s in CELLS if s in (LN_SHAPES[0], GN_SHAPES[1])]
NAMES = ("numpy", "torch", "bncore", "bncore_out")


def make_case(op, shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=dtype) * 2 + 1
    dy = rng.standard_normal(shape, dtype=dtype)
    nf = shape[-1] if op.startswith("layer") else shape[1]
    case = {"op": op, "shape": tuple(shape), "x": x, "dy": dy,
            "weight": rng.uniform(0.5, 1.5, nf).astype(dtype),
            "bias": rng.uniform(-0.5, 0.5, nf).astype(dtype)}
    if op.startswith("layer"):
        _, case["mean"], case["invstd"] = bncore.layer_norm_train(x, nf, case["weight"])
    else:
        _, case["mean"], case["invstd"] = bncore.group_norm_train(x, GROUPS, case["weight"])
    return case


def _numpy_ln(x, w, b):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(x.var(-1, keepdims=True) + EPS) * w + b


def _numpy_ln_backward(dy, x, w):
    D = x.shape[-1]
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS)
    inv = 1 / np.sqrt(x.var(-1, keepdims=True) + EPS)
    g = dy * w
    dx = inv * (g - g.sum(-1, keepdims=True) / D - xhat * (g * xhat).sum(-1, keepdims=True) / D)
    red = tuple(range(x.ndim - 1))
    return dx, (dy * xhat).sum(red), dy.sum(red)


def _numpy_gn(x, w, b):
    N, C = x.shape[:2]
    xg = x.reshape(N, GROUPS, -1)
    y = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + EPS))
    bshape = (1, C) + (1,) * (x.ndim - 2)
    return y.reshape(x.shape) * w.reshape(bshape) + b.reshape(bshape)


def _numpy_gn_backward(dy, x, w):
    N, C = x.shape[:2]
    bshape = (1, C) + (1,) * (x.ndim - 2)
    xg = x.reshape(N, GROUPS, -1)
    inv = 1 / np.sqrt(xg.var(-1, keepdims=True) + EPS)
    xhat = (xg - xg.mean(-1, keepdims=True)) * inv
    g = (dy * w.reshape(bshape)).reshape(N, GROUPS, -1)
    dx = inv * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    red = (0,) + tuple(range(2, x.ndim))
    return dx.reshape(x.shape), (dy * xhat.reshape(x.shape)).sum(red), dy.sum(red)


def impls(case, n_threads=None, torch=None):
    """{name: callable} for one cell: bncore (fresh output, out=), NumPy, PyTorch."""
    op, x, dy, w, b = case["op"], case["x"], case["dy"], case["weight"], case["bias"]
    mean, invstd = case["mean"], case["invstd"]
    out = np.zeros_like(x)  # touch every page: np.empty is lazily mapped
    kw = {"n_threads": n_threads}
    if op == "layer_norm":
        D = x.shape[-1]

        def run(o):
            return bncore.layer_norm(x, D, w, b, EPS, out=o, **kw)
        res = {"numpy": lambda: _numpy_ln(x, w, b)}
    elif op == "layer_norm_backward":
        D = x.shape[-1]

        def run(o):
            return bncore.layer_norm_backward(dy, x, D, mean, invstd, w, out=o, **kw)
        res = {"numpy": lambda: _numpy_ln_backward(dy, x, w)}
    elif op == "group_norm":
        def run(o):
            return bncore.group_norm(x, GROUPS, w, b, EPS, out=o, **kw)
        res = {"numpy": lambda: _numpy_gn(x, w, b)}
    else:
        def run(o):
            return bncore.group_norm_backward(dy, x, GROUPS, mean, invstd, w, out=o, **kw)
        res = {"numpy": lambda: _numpy_gn_backward(dy, x, w)}
    res["bncore"] = lambda: run(None)
    res["bncore_out"] = lambda: run(out)
    if torch is not None:
        res["torch"] = _torch_impl(case, torch)
    return res


def _torch_impl(case, torch):
    F = torch.nn.functional
    t = torch.from_numpy
    op, x, dy, w, b = case["op"], t(case["x"]), t(case["dy"]), t(case["weight"]), t(case["bias"])
    mask = [True, True, True]
    if op == "layer_norm":
        return lambda: F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    if op == "layer_norm_backward":
        D = (x.shape[-1],)
        _, m, r = torch.native_layer_norm(x, D, w, b, EPS)
        return lambda: torch.ops.aten.native_layer_norm_backward(dy, x, D, m, r, w, b, mask)
    if op == "group_norm":
        return lambda: F.group_norm(x, GROUPS, w, b, EPS)
    N, C = x.shape[:2]
    HW = math.prod(x.shape[2:])
    _, m, r = torch.native_group_norm(x, w, b, N, C, HW, GROUPS, EPS)
    return lambda: torch.ops.aten.native_group_norm_backward(dy, x, m, r, w, N, C, HW, GROUPS,
                                                             mask)


def _sample(f, k):
    t = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t) / k


def run_cell(case, n_threads, rounds, torch, min_time=0.02):
    """{name: median seconds} over `rounds` interleaved rounds."""
    fs = impls(case, n_threads, torch)
    names = list(fs)
    for f in fs.values():
        f()  # warm-up
    k = {n: max(1, min(1000, math.ceil(min_time / max(min(_sample(fs[n], 1) for _ in range(3)),
                                                       1e-7)))) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            samples[n].append(_sample(fs[n], k[n]))
    return {n: float(np.median(s)) for n, s in samples.items()}


def run(threads=(1,), rounds=7, quick=False, torch=None):
    """Every cell at each thread count: a list of result dicts."""
    results = []
    for nt in threads:
        if torch is not None:
            torch.set_num_threads(nt)
        for op, shape in (QUICK_CELLS if quick else CELLS):
            med = run_cell(make_case(op, shape), nt, rounds, torch)
            results.append({"op": op, "shape": list(shape), "threads": nt, "median_s": med})
    return results


def table(results):
    head = ["op", "shape", "threads", "numpy", "torch", "bncore", "out=", "x numpy", "x torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["median_s"]
        best = min(m["bncore"], m["bncore_out"])

        def ms(name):
            return "-" if name not in m else f"{m[name] * 1e3:.3g}"

        def ratio(name):
            return "-" if name not in m else f"{m[name] / best:.2f}"
        lines.append("| " + " | ".join([r["op"], "x".join(map(str, r["shape"])), str(r["threads"]),
                                        ms("numpy"), ms("torch"), ms("bncore"), ms("bncore_out"),
                                        ratio("numpy"), ratio("torch")]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bncore.bench_norms",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one layer-norm and one group-norm shape")
    p.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per cell (default 7)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",")]
        if any(t < 1 for t in threads):
            raise ValueError
    except ValueError:
        p.error(f"--threads: expected positive ints separated by commas, got {args.threads!r}")
    if args.rounds < 1:
        p.error(f"--rounds: expected a positive int, got {args.rounds}")
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]  # run() compares without torch
    results = run(threads, args.rounds, args.quick, torch)
    print(table(results))
    print("\nmedian ms per call over interleaved rounds; x peer = peer time / best bncore time")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
