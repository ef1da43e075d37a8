"""``python -m bncore bench``: bncore's speed on this machine against NumPy, the
peers that are installed (PyTorch, ONNX Runtime) and a measured bandwidth bound.

Each cell (operation, layout, shape, dtype, thread count) times all of its
implementations interleaved in this one process: every round takes one sample
of each in turn (rotating the order), and the table reports medians over
rounds. bncore runs with a fresh output and with a preallocated ``out=``.

The bound is timed in the same rounds as the cell: read passes (max- and
or-reductions) and copy passes (``np.copyto``, ``np.abs``) over buffers as large
as the cell's working set, split over the same number of threads, so a tensor
that fits in the cache is held to cache bandwidth; the fastest kernel and round
give the bandwidth. Bytes the operation must move, S the bytes of x:

* eval forward: read x, write y, one pass: ``2S`` at copy bandwidth;
* training forward: a statistics pass reading x, then x -> y. While one
  channel's values (whole 64-byte lines) fit in half the last-level cache the
  second read hits the cache: ``2S`` at copy bandwidth; else ``S`` at read
  bandwidth + ``2S`` at copy bandwidth;
* backward (training): a reduction over x and dy, then x, dy -> dx: ``3S`` at
  copy bandwidth, + ``2S`` at read bandwidth when a channel of x and dy does
  not fit in half the cache;
* eval-mode backward: one pass x, dy -> dx: ``3S`` at copy bandwidth.

Working set: 2S for the forwards, 3S for the backwards. O(C) arrays are not
counted. The ratios to the bound take bncore's fastest round, as the bound
does. The bound ignores page faults, so only ``out=`` can reach it.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._config import show_config
from ._version import __version__
from .functional import batch_norm_backward, batch_norm_eval, batch_norm_train

EPS = 1e-5
MOMENTUM = 0.1
OPS = ("train", "eval", "backward", "backward_eval")
SHAPES = [(8, 512, 7, 7), (32, 256, 14, 14), (32, 64, 56, 56), (128, 64, 56, 56),
          (64, 3, 224, 224), (256, 4096), (64, 256), (8192, 1024)]
QUICK_SHAPES = [(8, 512, 7, 7), (32, 256, 14, 14), (256, 4096), (64, 256)]
PEERS = ("numpy", "torch", "ort")
LINE = 64  # cache-line bytes: the unit in which a channel-last channel is read
BOUND_MODEL = {
    "eval": "2S / copy",
    "train": "2S / copy if a channel fits in half the LLC, else S / read + 2S / copy",
    "backward": "3S / copy if a channel of x and dy fits in half the LLC, "
                "else 2S / read + 3S / copy",
    "backward_eval": "3S / copy",
    "S": "bytes of x",
    "bandwidth": "read (max- and or-reductions) and copy (np.copyto and np.abs, read + "
                 "write bytes) over the cell's working set (2S forward, 3S backward), split "
                 "over the cell's threads, the fastest kernel and round of the cell's rounds",
    "channel": "NCHW: its N planes; channels-last and (N, C): its 64-byte lines of every row",
}


# ----------------------------------------------------------------- timing core
def interleaved(impls, rounds, min_time=0.005, settle=0.0):
    """Time {name: zero-argument callable} in interleaved rounds.

    Each call is made once untimed first; calls shorter than ``min_time`` repeat
    within a sample. Every round takes one sample of each name, rotating who
    goes first; ``settle`` seconds of sleep before each sample let the previous
    implementation's spinning OpenMP threads go idle. Returns (median seconds
    per call, samples, calls per sample), each a dict by name.
    """
    names = list(impls)
    k = {}
    for n in names:
        impls[n]()
        dt = min(_sample(impls[n], 1) for _ in range(2))
        k[n] = max(1, min(10000, math.ceil(min_time / max(dt, 1e-7))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            if settle:
                time.sleep(settle)
            samples[n].append(_sample(impls[n], k[n]))
    return {n: float(np.median(s)) for n, s in samples.items()}, samples, k


def _sample(f, k):
    t = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t) / k


# ----------------------------------------------------------------- the bound
def working_set(op, nbytes):
    """Bytes of the full-size arrays one call touches: x, y or x, dy, dx."""
    return (2 if op in ("train", "eval") else 3) * nbytes


def channel_bytes(layout, array_shape, itemsize):
    """Bytes read to get all of one channel: NCHW its N planes; channels-last
    and (N, C) its cache line of every row (a row under a line is read whole)."""
    if layout == "NCHW":
        return math.prod(array_shape) // array_shape[1] * itemsize
    rows = math.prod(array_shape[:-1])
    return rows * min(LINE, array_shape[-1] * itemsize)


def bound_bytes(op, nbytes, cached):
    """(bytes at read bandwidth, bytes at copy bandwidth) an op must move."""
    s = nbytes
    if op == "eval":
        return 0, 2 * s
    if op == "backward_eval":
        return 0, 3 * s
    if op == "train":
        return (0 if cached else s), 2 * s
    if op == "backward":
        return (0 if cached else 2 * s), 3 * s
    raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")


def bound_seconds(read_bytes, copy_bytes, read_Bps, copy_Bps):
    return read_bytes / read_Bps + copy_bytes / copy_Bps


def channel_cached(op, layout, array_shape, itemsize, llc):
    """Whether a channel (of x, and of dy for the backward) fits in half the
    last-level cache; None for the one-pass ops. An unknown LLC counts as cached
    (the lower bound)."""
    if op in ("eval", "backward_eval"):
        return None
    need = channel_bytes(layout, array_shape, itemsize) * (2 if op == "backward" else 1)
    return True if not llc else need <= llc // 2


class BandwidthPasses:
    """Read and copy passes over ``ws_bytes`` (two halves, src and dst), split
    over ``n_threads`` (NumPy releases the GIL), each with two kernels, as
    neither is the fastest everywhere: reads a max-reduction (float32) and an
    or-reduction (uint64); copies ``np.copyto`` (memcpy, which may stream the
    stores past the cache) and a ufunc loop (``np.abs`` of ones: plain vector
    stores). Each call repeats the pass ``inner`` times per thread so that thread
    dispatch is amortized; divide a call's time by ``inner``."""

    READS = {"max": lambda a: np.maximum.reduce(a.view(np.float32)),
             "or": np.bitwise_or.reduce}
    COPIES = {"memcpy": lambda s, d: np.copyto(d, s),
              "ufunc": lambda s, d: np.abs(s.view(np.float32), out=d.view(np.float32))}

    def __init__(self, ws_bytes, n_threads, pool):
        half = max(1, ws_bytes // 16)  # uint64 elements per half
        self.src = np.ones(2 * half, np.float32).view(np.uint64)
        self.dst = np.zeros(half, np.uint64)
        self.nbytes = self.src.nbytes + self.dst.nbytes
        self.inner = max(1, math.ceil(32 * 2**20 / self.nbytes))
        self.parts = list(zip(np.array_split(self.src, n_threads),
                              np.array_split(self.dst, n_threads)))
        self.pool = pool

    def _run(self, work):
        futs = [self.pool.submit(work, i) for i in range(1, len(self.parts))]
        work(0)
        for f in futs:
            f.result()

    def read(self, kernel):
        def work(i):
            for _ in range(self.inner):
                for a in self.parts[i]:
                    kernel(a)
        return lambda: self._run(work)

    def copy(self, kernel):
        def work(i):
            s, d = self.parts[i]
            for _ in range(self.inner):
                kernel(s, d)
        return lambda: self._run(work)

    def timed(self):
        """{"bound:read:KERNEL" and "bound:copy:KERNEL": zero-argument pass}."""
        return dict({f"bound:read:{k}": self.read(f) for k, f in self.READS.items()},
                    **{f"bound:copy:{k}": self.copy(f) for k, f in self.COPIES.items()})

    def best_Bps(self, samples, kind):
        """Bytes per second of the fastest round of the fastest ``kind`` kernel."""
        return max(self.nbytes * self.inner / min(s) for n, s in samples.items()
                   if n.startswith(f"bound:{kind}:"))


# ----------------------------------------------------------------- cases
def layouts_for(shape):
    """4-D shapes run as NCHW (axis=1) and channels-last (axis=-1); 2-D as (N, C)."""
    return ("NCHW", "NHWC") if len(shape) == 4 else ("NC",)


def make_case(op, layout, shape, dtype, seed=0):
    """Seeded inputs for one cell; ``shape`` is the logical (N, C, ...) shape,
    channels-last is the same tensor permuted and made contiguous."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    x = rng.standard_normal(shape, dtype=dtype)
    x *= rng.uniform(0.5, 2.0, c).reshape(bshape).astype(dtype)
    x += rng.uniform(-1.0, 1.0, c).reshape(bshape).astype(dtype)
    dy = rng.standard_normal(shape, dtype=dtype)
    axis = 1
    if layout == "NHWC":
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
        axis = -1
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean, var = x.mean(axis=red, dtype=np.float64), x.var(axis=red, dtype=np.float64)
    rv = var * rng.uniform(0.8, 1.2, c)
    # repeated calls stay bounded: eval's slope lies in [0.5, 1], and the
    # backward's weight * invstd = 1 makes dx a projection of dy
    w = (rng.uniform(0.5, 1.5, c) if op == "train" else
         np.sqrt(rv + EPS) * rng.uniform(0.5, 1.0, c) if op == "eval" else np.sqrt(var + EPS))
    return {"op": op, "layout": layout, "shape": tuple(shape), "axis": axis, "red": red,
            "n": x.size // c, "x": x, "dy": dy, "weight": w.astype(dtype),
            "bias": rng.uniform(-0.5, 0.5, c).astype(dtype),
            "running_mean": (mean + rng.uniform(-0.1, 0.1, c)).astype(dtype),
            "running_var": rv.astype(dtype), "save_mean": mean.astype(dtype),
            "save_invstd": (1.0 / np.sqrt(var + EPS)).astype(dtype)}


def _bc(v, case):
    s = [1] * case["x"].ndim
    s[case["axis"]] = -1
    return v.reshape(s)


def bncore_impls(case, n_threads):
    x, dy, op, w, b = case["x"], case["dy"], case["op"], case["weight"], case["bias"]
    kw = {"axis": case["axis"], "n_threads": n_threads}
    out = np.zeros_like(x)  # every page touched: np.empty maps lazily
    if op == "train":
        rm, rv = case["running_mean"].copy(), case["running_var"].copy()

        def run(o):
            return batch_norm_train(x, w, b, eps=EPS, running_mean=rm, running_var=rv,
                                           momentum=MOMENTUM, out=o, **kw)[:1]
    elif op == "eval":
        def run(o):
            return (batch_norm_eval(x, case["running_mean"], case["running_var"], w, b,
                                           eps=EPS, out=o, **kw),)
    else:
        def run(o):
            return batch_norm_backward(dy, x, case["save_mean"], case["save_invstd"], w,
                                              training=op == "backward", out=o, **kw)
    return {"bncore": lambda: run(None), "bncore_out": lambda: run(out)}


def numpy_impl(case):
    """The code a NumPy user would write (one thread)."""
    x, dy, op, red, n = case["x"], case["dy"], case["op"], case["red"], case["n"]
    w, b = _bc(case["weight"], case), _bc(case["bias"], case)
    if op == "train":
        rm, rv = case["running_mean"].copy(), case["running_var"].copy()

        def f():
            mean, var = x.mean(axis=red, keepdims=True), x.var(axis=red, keepdims=True)
            rm[:] = (1 - MOMENTUM) * rm + MOMENTUM * mean.ravel()
            rv[:] = (1 - MOMENTUM) * rv + MOMENTUM * var.ravel() * n / (n - 1)
            return ((x - mean) / np.sqrt(var + EPS) * w + b,)
    elif op == "eval":
        rm, rv = _bc(case["running_mean"], case), _bc(case["running_var"], case)

        def f():
            return ((x - rm) / np.sqrt(rv + EPS) * w + b,)
    else:
        mean, invstd = _bc(case["save_mean"], case), _bc(case["save_invstd"], case)

        def f():
            xhat = (x - mean) * invstd
            dbias, dweight = dy.sum(axis=red), (dy * xhat).sum(axis=red)
            if op == "backward_eval":
                return dy * (w * invstd), dweight, dbias
            return (w * invstd * (dy - _bc(dbias, case) / n - xhat * _bc(dweight, case) / n),
                    dweight, dbias)
    return f


def torch_impl(case, torch):
    """F.batch_norm / aten.native_batch_norm_backward; channels-last as a
    channels_last tensor over the same memory. Returns (callable, to_numpy)."""
    op, nhwc = case["op"], case["layout"] == "NHWC"

    def tensor(a):
        t = torch.from_numpy(a)
        return t.permute(0, t.ndim - 1, *range(1, t.ndim - 1)) if nhwc else t

    def to_numpy(res):
        return tuple((r.permute(0, *range(2, r.ndim), 1) if nhwc and r.ndim > 1 else r).numpy()
                     for r in res)

    x, dy = tensor(case["x"]), tensor(case["dy"])
    w, b, rm, rv, sm, si = (torch.from_numpy(case[k].copy()) for k in (
        "weight", "bias", "running_mean", "running_var", "save_mean", "save_invstd"))
    F = torch.nn.functional
    if op in ("train", "eval"):
        def f():
            return (F.batch_norm(x, rm, rv, w, b, training=op == "train", momentum=MOMENTUM,
                                 eps=EPS),)
    else:
        training = op == "backward"
        # eval backward reads invstd from the running variance
        ev = (1.0 / si.double() ** 2 - EPS).to(sm.dtype)

        def f():
            return torch.ops.aten.native_batch_norm_backward(
                dy, x, w, None if training else sm, None if training else ev, sm, si, training,
                EPS, [True, True, True])
    return f, to_numpy


def ort_impl(case, ort, n_threads):
    """A one-node BatchNormalization model (eval, channel axis 1 only), or None."""
    if case["op"] != "eval" or case["layout"] == "NHWC":
        return None
    from onnx import TensorProto, helper, numpy_helper
    x = case["x"]
    elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
    inits = [numpy_helper.from_array(case[k], name) for k, name in (
        ("weight", "scale"), ("bias", "B"), ("running_mean", "mean"), ("running_var", "var"))]
    node = helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"], ["y"],
                            epsilon=EPS)
    io = [helper.make_tensor_value_info(n, elem, x.shape) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph([node], "bn", io[:1], io[1:], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8  # an IR version every supported onnxruntime reads
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = n_threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return lambda: tuple(sess.run(None, {"x": x}))


def rel_err(got, ref):
    """max |got - ref| / max |ref| over each output, worst output."""
    worst = 0.0
    for g, r in zip(got, ref):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        worst = max(worst, float(np.max(np.abs(g - r))) / max(float(np.max(np.abs(r))), 1e-30))
    return worst


def peak_alloc(f):
    """Peak bytes NumPy allocates during one call (tracemalloc sees NumPy's data)."""
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run_cell(case, n_threads, args, peers, pool, llc):
    impls = bncore_impls(case, n_threads)
    convert = {}
    impls["numpy"] = numpy_impl(case)
    if peers.get("torch") is not None:
        impls["torch"], convert["torch"] = torch_impl(case, peers["torch"])
    if peers.get("ort") is not None:
        f = ort_impl(case, peers["ort"], n_threads)
        if f is not None:
            impls["ort"] = f
    ref = impls["bncore"]()
    err = {n: rel_err(convert.get(n, tuple)(impls[n]()), ref) for n in impls}
    peak = {n: peak_alloc(impls[n]) for n in ("bncore", "bncore_out")}

    x, op = case["x"], case["op"]
    ws = working_set(op, x.nbytes)
    passes = BandwidthPasses(ws, n_threads, pool)
    med, samples, k = interleaved(dict(impls, **passes.timed()), args.rounds, args.min_time,
                                  args.settle)
    # the fastest pass: load from other processes only ever tightens the bound
    read_Bps, copy_Bps = passes.best_Bps(samples, "read"), passes.best_Bps(samples, "copy")
    med = {n: t for n, t in med.items() if not n.startswith("bound:")}
    cached = channel_cached(op, case["layout"], x.shape, x.itemsize, llc)
    rb, cb = bound_bytes(op, x.nbytes, cached is not False)
    bound = bound_seconds(rb, cb, read_Bps, copy_Bps)
    return {"op": op, "layout": case["layout"], "shape": list(case["shape"]),
            "array_shape": list(x.shape), "axis": case["axis"], "dtype": x.dtype.name,
            "threads": n_threads, "nbytes": x.nbytes,
            "bound": {"working_set_bytes": ws, "buffer_bytes": passes.nbytes,
                      "channel_bytes": channel_bytes(case["layout"], x.shape, x.itemsize),
                      "channel_cached": cached, "read_bytes": rb, "copy_bytes": cb,
                      "read_GBps": read_Bps / 1e9, "copy_GBps": copy_Bps / 1e9,
                      "passes_per_call": passes.inner, "seconds": bound},
            "median_s": med, "samples_s": samples, "calls_per_sample": k,
            "max_rel_err": err, "peak_alloc_bytes": peak,
            "speedup": {p: med[p] / med["bncore"] for p in PEERS if p in med},
            # capability against capability: bncore's fastest round, as the bound's
            "bound_ratio": {n: min(samples[n]) / bound for n in ("bncore", "bncore_out")}}


# ----------------------------------------------------------------- driver
def cache_size(text):
    """Bytes of a sysfs cache size such as '32768K'."""
    t = text.strip().upper()
    return int(t[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[t[-1]] if t[-1:] in "KMG" \
        else int(t)


def llc_bytes():
    """Size of the largest cache of CPU 0 from sysfs (index*/size), or None."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    sizes = []
    try:
        names = [d for d in os.listdir(base) if d.startswith("index")]
    except OSError:
        names = []
    for d in names:
        try:
            with open(os.path.join(base, d, "size")) as fh:
                sizes.append(cache_size(fh.read()))
        except (OSError, ValueError, KeyError):
            pass
    return max(sizes, default=None)


def machine_info(peers, llc):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "llc_bytes": llc,
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "bncore": __version__,
            "torch": getattr(peers.get("torch"), "__version__", None),
            "onnxruntime": getattr(peers.get("ort"), "__version__", None),
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_"))},
            "bncore_config": {k: str(v) for k, v in show_config(mode="dicts").items()}}


def _import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def _loadavg():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_bench(args):
    peers = {} if args.no_peers else {"torch": _import("torch"), "ort": _import("onnxruntime")}
    if peers.get("ort") is not None and _import("onnx") is None:
        peers["ort"] = None
    torch = peers.get("torch")
    llc = llc_bytes()
    now = datetime.datetime.now().astimezone()
    result = {"schema": 2, "date": now.isoformat(timespec="seconds"),
              "command": "python -m bncore bench " + " ".join(args.argv),
              "rounds": args.rounds, "min_time_s": args.min_time, "settle_s": args.settle,
              "machine": machine_info(peers, llc), "bound_model": BOUND_MODEL, "runs": []}
    cells = [(op, layout, shape) for shape in args.shapes for layout in layouts_for(shape)
             for op in args.ops]
    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        with ThreadPoolExecutor(max(args.threads)) as pool:
            for dtype in args.dtype:
                for n in args.threads:
                    if torch is not None:
                        torch.set_num_threads(n)
                    run = {"dtype": dtype, "threads": n, "loadavg_start": _loadavg(), "cells": []}
                    for i, (op, layout, shape) in enumerate(cells):
                        label = f"{dtype} {n}T {op} {layout} {'x'.join(map(str, shape))}"
                        print(f"\r[{i + 1}/{len(cells)}] {label:<50}", end="", file=sys.stderr,
                              flush=True)
                        case = make_case(op, layout, shape, np.dtype(dtype))
                        run["cells"].append(run_cell(case, n, args, peers, pool, llc))
                        del case
                    print(file=sys.stderr)
                    run["loadavg_end"] = _loadavg()
                    result["runs"].append(run)
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)
    return result


# ----------------------------------------------------------------- report
def _ms(s):
    return "-" if s is None else f"{s * 1e3:.3g}"


def _x(v):
    return "-" if v is None else f"{v:.2f}"


def _mib(b):
    return f"{b / 2**20:.3g}"


def table(run):
    head = ["op", "layout", "shape", "numpy", "torch", "ort", "bncore", "out=",
            "x numpy", "x torch", "x ort", "WS MiB", "read/copy GB/s", "bound",
            "bncore/bound", "out=/bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in run["cells"]:
        m, b = c["median_s"], c["bound"]
        op = c["op"] + ("*" if b["channel_cached"] is False else "")
        row = ([op, c["layout"], "x".join(map(str, c["array_shape"]))]
               + [_ms(m.get(k)) for k in ("numpy", "torch", "ort", "bncore", "bncore_out")]
               + [_x(c["speedup"].get(p)) for p in PEERS]
               + [_mib(b["working_set_bytes"]), f"{b['read_GBps']:.0f}/{b['copy_GBps']:.0f}",
                  _ms(b["seconds"]), _x(c["bound_ratio"]["bncore"]),
                  _x(c["bound_ratio"]["bncore_out"])])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(result):
    m = result["machine"]
    llc = f"LLC {_mib(m['llc_bytes'])} MiB" if m["llc_bytes"] else "LLC unknown"
    env = "".join(f"; {k}={v}" for k, v in m["env"].items())
    out = [f"bncore bench {result['date']}  ({result['command']})",
           f"{m['cpu']}, {m['cpu_count']} cores, {llc}; numpy {m['numpy']}, torch "
           f"{m['torch'] or 'absent'}, onnxruntime {m['onnxruntime'] or 'absent'}, bncore "
           f"{m['bncore']}{env}",
           f"Medians of {result['rounds']} interleaved rounds, ms. x peer = peer / bncore "
           "(fresh output).",
           "bound = bytes that must move / bandwidth measured over the cell's working set (WS)",
           "with its threads (read: max/or-reduce, copy: np.copyto/np.abs; fastest round):",
           "eval 2S/copy, backward_eval 3S/copy, train 2S/copy, backward 3S/copy, S = bytes of",
           "x; op* = one channel does not fit in half the LLC (an unknown LLC counts as",
           "fitting), so the second pass reads it again: + S/read (train), + 2S/read",
           "(backward). bncore/bound and out=/bound take bncore's fastest round, as the",
           "bound does. Page faults of a fresh output are not in the bound."]
    for run in result["runs"]:
        load = [f"{v[0]:.2f}" if v else "?" for v in (run["loadavg_start"], run["loadavg_end"])]
        out += ["", f"### {run['dtype']}, {run['threads']} thread"
                f"{'s' if run['threads'] > 1 else ''} (load average {load[0]} -> {load[1]})",
                "", table(run)]
    return "\n".join(out)


def _csv(convert, ok, what):
    """An argparse type: a comma list whose items pass ``ok`` after ``convert``."""
    def parse(text):
        try:
            vals = [convert(v) for v in text.split(",") if v]
        except ValueError:
            vals = []
        if not vals or not all(map(ok, vals)):
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return vals
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bncore bench",
                                description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--quick", action="store_true", help="4 small shapes, 3 rounds")
    p.add_argument("--json", metavar="PATH", help="write every cell, sample and machine info")
    p.add_argument("--threads", type=_csv(int, lambda n: n > 0, "expected positive integers"),
                   metavar="N[,N]", help="thread counts, e.g. 1,2 (default: all cores)")
    p.add_argument("--dtype", default=["float32"], help="float32, float64 or both",
                   type=_csv(str, ("float32", "float64").__contains__,
                             "expected float32, float64 or both"))
    p.add_argument("--ops", default=list(OPS), help=f"comma list of {', '.join(OPS)}",
                   type=_csv(str, OPS.__contains__, f"expected a comma list of {', '.join(OPS)}"))
    p.add_argument("--shapes", help="e.g. 8x512x7x7,64x256 (default: the grid)",
                   type=_csv(lambda t: tuple(map(int, t.split("x"))),
                             lambda s: len(s) in (2, 4) and min(s) > 0,
                             "expected e.g. 8x512x7x7,64x256 (N,C,H,W or N,C)"))
    p.add_argument("--rounds", type=_csv(int, lambda n: n > 0, "expected a positive integer"),
                   help="interleaved rounds per cell (default 7, quick 3)")
    p.add_argument("--min-time", type=float, help="seconds per sample; short calls repeat "
                   "(default 0.005, quick 0.002)")
    p.add_argument("--settle", type=float, default=0.002,
                   help="seconds of sleep before each sample (idle OpenMP threads stop spinning)")
    p.add_argument("--no-peers", action="store_true", help="skip PyTorch and ONNX Runtime")
    a = p.parse_args(argv)
    a.rounds = a.rounds[0] if a.rounds else (3 if a.quick else 7)
    a.min_time = a.min_time if a.min_time is not None else (0.002 if a.quick else 0.005)
    a.shapes = a.shapes or (QUICK_SHAPES if a.quick else SHAPES)
    a.threads = a.threads or [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count()]
    a.argv = list(argv)
    return a


def main(argv=None):
    """The CLI; returns 0 (``python -m bncore bench ARGS...`` calls this)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    result = run_bench(args)
    print(report(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
