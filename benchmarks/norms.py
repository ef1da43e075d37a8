"""Layer norm and group norm: bncore against naive NumPy and PyTorch.

    python benchmarks/norms.py [--quick] [--threads 1,2] [--rounds N] [--json PATH]

Inputs come from the asv suite's builder (``benchmarks/common.py``), timing
from ``bncore.bench.interleaved`` (every implementation of a cell interleaved,
medians over rounds). bncore runs with a fresh output and with ``out=``.
NumPy is the code a user would write; PyTorch is ``F.layer_norm`` /
``F.group_norm`` and ``aten.native_layer_norm_backward`` /
``aten.native_group_norm_backward`` (skipped when not installed).
"""
import argparse
import json
import math
import sys

import numpy as np

import bncore
from bncore.bench import interleaved
from benchmarks import common  # benchmarks/benchmarks, next to this file
from benchmarks.common import EPS, GROUPS

OPS = ("layer_norm", "layer_norm_backward", "group_norm", "group_norm_backward")
CELLS = ([(op, s) for op in OPS[:2] for s in common.LN_SHAPES]
         + [(op, s) for op in OPS[2:] for s in common.GN_SHAPES])
QUICK_CELLS = [(op, s) for op, s in CELLS if s in (common.LN_SHAPES[0], common.GN_SHAPES[1])]


def _numpy(op, x, dy, w, b):
    """The reference a NumPy user would write: (output,) or (dx, dweight, dbias)."""
    layer = op.startswith("layer")
    g = x if layer else x.reshape(x.shape[0], GROUPS, -1)
    bshape = (-1,) if layer else (1, -1) + (1,) * (x.ndim - 2)
    inv = 1 / np.sqrt(g.var(-1, keepdims=True) + EPS)
    xhat = (g - g.mean(-1, keepdims=True)) * inv
    if not op.endswith("backward"):
        return (xhat.reshape(x.shape) * w.reshape(bshape) + b.reshape(bshape),)
    gy = (dy * w.reshape(bshape)).reshape(g.shape)
    dx = inv * (gy - gy.mean(-1, keepdims=True) - xhat * (gy * xhat).mean(-1, keepdims=True))
    red = tuple(range(x.ndim - 1)) if layer else (0,) + tuple(range(2, x.ndim))
    return dx.reshape(x.shape), (dy * xhat.reshape(x.shape)).sum(red), dy.sum(red)


def impls(op, shape, n_threads=None, torch=None, dtype="float32"):
    """{name: zero-argument callable} for one cell: numpy, bncore, bncore_out, torch."""
    d = common.norm_data(op.split("_")[0], shape, dtype)
    x, dy, w, b, mean, invstd = (d[k] for k in ("x", "dy", "weight", "bias", "mean", "invstd"))
    out = common.filled_like(x)
    kw = {"n_threads": n_threads}
    nf = x.shape[-1]
    run = {"layer_norm": lambda o: bncore.layer_norm(x, nf, w, b, EPS, out=o, **kw),
           "layer_norm_backward": lambda o: bncore.layer_norm_backward(
               dy, x, nf, mean, invstd, w, out=o, **kw),
           "group_norm": lambda o: bncore.group_norm(x, GROUPS, w, b, EPS, out=o, **kw),
           "group_norm_backward": lambda o: bncore.group_norm_backward(
               dy, x, GROUPS, mean, invstd, w, out=o, **kw)}[op]
    res = {"numpy": lambda: _numpy(op, x, dy, w, b), "bncore": lambda: run(None),
           "bncore_out": lambda: run(out)}
    if torch is not None:
        res["torch"] = _torch(op, d, torch)
    return res


def _torch(op, d, torch):
    F, aten, t = torch.nn.functional, torch.ops.aten, torch.from_numpy
    x, dy, w, b = (t(d[k].copy()) for k in ("x", "dy", "weight", "bias"))
    mask = [True, True, True]
    if op == "layer_norm":
        return lambda: F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    if op == "group_norm":
        return lambda: F.group_norm(x, GROUPS, w, b, EPS)
    if op == "layer_norm_backward":
        D = (x.shape[-1],)
        _, m, r = torch.native_layer_norm(x, D, w, b, EPS)
        return lambda: aten.native_layer_norm_backward(dy, x, D, m, r, w, b, mask)
    N, C, HW = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    _, m, r = torch.native_group_norm(x, w, b, N, C, HW, GROUPS, EPS)
    return lambda: aten.native_group_norm_backward(dy, x, m, r, w, N, C, HW, GROUPS, mask)


def run(threads=(1,), rounds=7, quick=False, torch=None):
    results = []
    for n in threads:
        if torch is not None:
            torch.set_num_threads(n)
        for op, shape in (QUICK_CELLS if quick else CELLS):
            med, _, _ = interleaved(impls(op, shape, n, torch), rounds, min_time=0.02)
            results.append({"op": op, "shape": shape, "threads": n, "median_s": med})
    return results


def table(results):
    head = ["op", "shape", "threads", "numpy", "torch", "bncore", "out=", "x numpy", "x torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["median_s"]
        best = min(m["bncore"], m["bncore_out"])
        row = [r["op"], r["shape"], str(r["threads"])]
        row += ["-" if n not in m else f"{m[n] * 1e3:.3g}" for n in
                ("numpy", "torch", "bncore", "bncore_out")]
        row += ["-" if n not in m else f"{m[n] / best:.2f}" for n in ("numpy", "torch")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one layer-norm and one group-norm shape")
    p.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per cell")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    try:
        threads = [int(t) for t in a.threads.split(",")]
    except ValueError:
        threads = [0]
    if min(threads) < 1 or a.rounds < 1:
        p.error(f"--threads and --rounds: expected positive integers, got {a.threads!r}, "
                f"{a.rounds}")
    try:
        import torch
    except ImportError:
        torch = None
    results = run(threads, a.rounds, a.quick, torch)
    print(table(results))
    print("\nfloat32, median ms per call over interleaved rounds; x peer = peer / best bncore")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
