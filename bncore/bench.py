"""``python -m bncore bench``: bncore against naive NumPy, PyTorch and ONNX Runtime.

Every cell (operation, layout, shape) runs all implementations interleaved in
this one process: each round times one sample of every implementation in turn
(rotating the order), and the table reports the median over rounds. bncore is
timed three ways: a fresh output, a preallocated ``out=`` and in place.

The bandwidth bound is measured in the same run: read bandwidth (a reduction
over a large buffer) and copy bandwidth (``np.copyto``, read + write bytes),
split over the benchmark's thread count, best of several repetitions, once
before and once after the cells. With S = the tensor's bytes, the bound counts
the logical passes of PERF.md:

* eval forward: one pass reading x and writing y: ``2S / copy``
* training forward: a statistics pass reading x, then x -> y:
  ``S / read + 2S / copy``
* backward (training): a reduction pass reading x and dy, then x, dy -> dx:
  ``2S / read + 3S / copy``
* backward (eval): one fused pass x, dy -> dx: ``3S / copy``

O(C) arrays are not counted. Peers: NumPy is the code a user would write
(``x.mean``, ``x.var``, broadcasting; it runs on one thread), PyTorch is
``torch.nn.functional.batch_norm`` and ``aten.native_batch_norm_backward``
(channels-last as a ``channels_last`` tensor), ONNX Runtime is a one-node
``BatchNormalization`` model (eval, channel axis 1 only). Missing peers are
skipped.
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

import bncore

EPS = 1e-5
MOMENTUM = 0.1

FULL_SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (8, 512, 7, 7),
               (64, 3, 224, 224), (128, 64, 56, 56),
               (256, 4096), (8192, 1024), (64, 256)]
QUICK_SHAPES = [(32, 256, 14, 14), (8, 512, 7, 7), (256, 4096), (64, 256)]
OPS = ("train", "eval", "backward", "backward_eval")
BNCORE = ("bncore", "bncore_out", "bncore_inplace")
PEERS = ("numpy", "torch", "ort")


# ----------------------------------------------------------------- data
def layouts_for(shape):
    """NCHW-style shapes run as NCHW and channels-last; 2-D as (N, C) features."""
    return ("NCHW", "NHWC") if len(shape) > 2 else ("NC",)


def make_case(op, layout, shape, dtype, seed=0):
    """Seeded inputs for one cell. ``shape`` is the logical (N, C, ...) shape."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    mu = rng.uniform(-1.0, 1.0, c)
    sd = rng.uniform(0.5, 2.0, c)
    bshape = (1, c) + (1,) * (len(shape) - 2)
    x = rng.standard_normal(shape, dtype=dtype)
    x *= sd.reshape(bshape).astype(dtype)
    x += mu.reshape(bshape).astype(dtype)
    dy = rng.standard_normal(shape, dtype=dtype)
    axis = 1
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        dy = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
        axis = -1
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x64 = x.astype(np.float64)
    mean64 = x64.mean(axis=red)
    var64 = x64.var(axis=red)
    del x64
    running_var = var64 * rng.uniform(0.8, 1.2, c)
    if op == "train":
        weight = rng.uniform(0.5, 1.5, c)
    elif op == "eval":
        # slope weight/sqrt(var+eps) in [0.5, 1]: repeated in-place calls
        # contract to a fixed point instead of overflowing
        weight = np.sqrt(running_var + EPS) * rng.uniform(0.5, 1.0, c)
    else:
        # weight * invstd == 1 makes dx a projection of dy, so repeated
        # in-place backward calls stay bounded (no overflow, no denormals)
        weight = np.sqrt(var64 + EPS)
    return {
        "op": op, "layout": layout, "shape": tuple(shape), "axis": axis,
        "red": red, "n": x.size // c, "x": x, "dy": dy,
        "weight": weight.astype(dtype), "bias": rng.uniform(-0.5, 0.5, c).astype(dtype),
        "running_mean": (mu + rng.uniform(-0.1, 0.1, c)).astype(dtype),
        "running_var": running_var.astype(dtype),
        "save_mean": mean64.astype(dtype),
        "save_invstd": (1.0 / np.sqrt(var64 + EPS)).astype(dtype),
    }


def _bc(v, case):
    """A per-channel vector shaped to broadcast against x."""
    s = [1] * case["x"].ndim
    s[case["axis"]] = -1
    return v.reshape(s)


# ----------------------------------------------------------------- peers
def bncore_impls(case, n_threads):
    x, dy, op, axis = case["x"], case["dy"], case["op"], case["axis"]
    w, b = case["weight"], case["bias"]
    kw = {"axis": axis, "n_threads": n_threads}
    out = np.empty_like(x)
    out.fill(0)  # touch every page: np.empty is lazily mapped
    if op in ("train", "eval"):
        buf = x.copy()  # in place overwrites its input: give it its own
    else:
        buf = dy.copy()
    if op == "train":
        rm, rv = case["running_mean"].copy(), case["running_var"].copy()

        def run(o):
            return bncore.batch_norm_train(x if o is not buf else buf, w, b, eps=EPS,
                                           running_mean=rm, running_var=rv,
                                           momentum=MOMENTUM, out=o, **kw)[:1]
    elif op == "eval":
        rm, rv = case["running_mean"], case["running_var"]

        def run(o):
            return (bncore.batch_norm_eval(x if o is not buf else buf, rm, rv, w, b,
                                           eps=EPS, out=o, **kw),)
    else:
        sm, si = case["save_mean"], case["save_invstd"]
        training = op == "backward"

        def run(o):
            return bncore.batch_norm_backward(dy if o is not buf else buf, x, sm, si, w,
                                              training=training, out=o, **kw)
    return {"bncore": lambda: run(None), "bncore_out": lambda: run(out),
            "bncore_inplace": lambda: run(buf)}


def numpy_impls(case):
    x, dy, op, red, n = case["x"], case["dy"], case["op"], case["red"], case["n"]
    w, b = _bc(case["weight"], case), _bc(case["bias"], case)
    if op == "train":
        rm, rv = case["running_mean"].copy(), case["running_var"].copy()

        def f():
            mean = x.mean(axis=red, keepdims=True)
            var = x.var(axis=red, keepdims=True)
            y = (x - mean) / np.sqrt(var + EPS) * w + b
            rm[:] = (1 - MOMENTUM) * rm + MOMENTUM * mean.ravel()
            rv[:] = (1 - MOMENTUM) * rv + MOMENTUM * var.ravel() * n / (n - 1)
            return (y,)
    elif op == "eval":
        rm, rv = _bc(case["running_mean"], case), _bc(case["running_var"], case)

        def f():
            return ((x - rm) / np.sqrt(rv + EPS) * w + b,)
    else:
        mean, invstd = _bc(case["save_mean"], case), _bc(case["save_invstd"], case)
        training = op == "backward"

        def f():
            xhat = (x - mean) * invstd
            dbias = dy.sum(axis=red)
            dweight = (dy * xhat).sum(axis=red)
            if training:
                dx = w * invstd * (dy - _bc(dbias, case) / n - xhat * _bc(dweight, case) / n)
            else:
                dx = dy * (w * invstd)
            return dx, dweight, dbias
    return {"numpy": f}


def torch_impls(case, torch):
    op, layout = case["op"], case["layout"]

    def tensor(a):
        t = torch.from_numpy(a)
        # channels-last: the same memory seen as an N,C,H,W tensor in
        # torch.channels_last format
        return t.permute(0, t.ndim - 1, *range(1, t.ndim - 1)) if layout == "NHWC" else t

    def array(t):
        return (t.permute(0, *range(2, t.ndim), 1) if layout == "NHWC" else t).numpy()

    x, dy = tensor(case["x"]), tensor(case["dy"])
    w, b = torch.from_numpy(case["weight"]), torch.from_numpy(case["bias"])
    F = torch.nn.functional
    if op == "train":
        rm = torch.from_numpy(case["running_mean"].copy())
        rv = torch.from_numpy(case["running_var"].copy())

        def f():
            return (F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS),)
    elif op == "eval":
        rm = torch.from_numpy(case["running_mean"])
        rv = torch.from_numpy(case["running_var"])

        def f():
            return (F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS),)
    else:
        sm = torch.from_numpy(case["save_mean"])
        si = torch.from_numpy(case["save_invstd"])
        training = op == "backward"
        # eval backward reads invstd from the running variance
        rv = None if training else 1.0 / si.double() ** 2 - EPS
        rv = None if rv is None else rv.to(sm.dtype)
        bwd = torch.ops.aten.native_batch_norm_backward

        def f():
            return bwd(dy, x, w, None if training else sm, rv, sm, si, training, EPS,
                       [True, True, True])
    return {"torch": lambda: f()}, lambda res: tuple(array(r) if r.ndim > 1 else r.numpy()
                                                    for r in res)


def ort_impls(case, ort, n_threads):
    """ONNX Runtime eval forward: a one-node BatchNormalization model built in memory."""
    if case["op"] != "eval" or case["layout"] == "NHWC":
        return {}
    from onnx import TensorProto, helper, numpy_helper
    x = case["x"]
    elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
    inits = [numpy_helper.from_array(case[k], name) for k, name in
             (("weight", "scale"), ("bias", "B"), ("running_mean", "mean"), ("running_var", "var"))]
    node = helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"], ["y"],
                            epsilon=EPS)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("x", elem, x.shape)],
                              [helper.make_tensor_value_info("y", elem, x.shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8  # an IR version every supported onnxruntime reads
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return {"ort": lambda: tuple(sess.run(None, {"x": x}))}


# ----------------------------------------------------------------- measuring
def measure_bandwidth(n_threads, mib=512, reps=5):
    """Best read and copy bandwidth (GB/s) over a buffer split across n_threads."""
    src = np.empty(mib * 2**20 // 8, dtype=np.uint64)
    src.fill(1)
    dst = np.empty_like(src)
    dst.fill(0)
    srcs, dsts = np.array_split(src, n_threads), np.array_split(dst, n_threads)
    jobs = range(n_threads)
    read = copy = math.inf
    with ThreadPoolExecutor(n_threads) as ex:  # NumPy releases the GIL in both
        for _ in range(reps):
            t = time.perf_counter()
            list(ex.map(lambda i: np.bitwise_or.reduce(srcs[i]), jobs))
            read = min(read, time.perf_counter() - t)
            t = time.perf_counter()
            list(ex.map(lambda i: np.copyto(dsts[i], srcs[i]), jobs))
            copy = min(copy, time.perf_counter() - t)
    return {"read_GBps": src.nbytes / read / 1e9, "copy_GBps": 2 * src.nbytes / copy / 1e9,
            "buffer_MiB": mib, "reps": reps}


def bound_seconds(op, nbytes, bw):
    r, c = bw["read_GBps"] * 1e9, bw["copy_GBps"] * 1e9
    return {"eval": 2 * nbytes / c, "train": nbytes / r + 2 * nbytes / c,
            "backward": 2 * nbytes / r + 3 * nbytes / c,
            "backward_eval": 3 * nbytes / c}[op]


def calls_per_sample(f, min_time):
    """Calls per timed sample so that short calls are not lost in timer noise."""
    dt = min(time_sample(f, 1) for _ in range(3))
    return max(1, min(10000, math.ceil(min_time / max(dt, 1e-7))))


def time_sample(f, k):
    t = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t) / k


def peak_numpy_bytes(f):
    """Peak bytes NumPy allocates during one call (tracemalloc sees NumPy's data)."""
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def rel_err(got, ref):
    """max |got - ref| / max |ref| over each output, worst output."""
    worst = 0.0
    for g, r in zip(got, ref):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        scale = max(float(np.max(np.abs(r))), 1e-30)
        worst = max(worst, float(np.max(np.abs(g - r))) / scale)
    return worst


def run_cell(case, n_threads, rounds, min_time, settle, torch, ort):
    impls = bncore_impls(case, n_threads)
    to_numpy = {}
    impls.update(numpy_impls(case))
    if torch is not None:
        t_impls, to_numpy["torch"] = torch_impls(case, torch)
        impls.update(t_impls)
    if ort is not None:
        impls.update(ort_impls(case, ort, n_threads))
    names = list(impls)

    # one checked call each (also the warm-up), outputs compared to bncore's
    ref = impls["bncore"]()
    err = {}
    for name in names:
        res = impls[name]() if name != "bncore" else ref
        err[name] = rel_err(to_numpy.get(name, lambda r: r)(res), ref)
    # peak memory of one call after the warm-up, bncore and NumPy only
    peak = {name: peak_numpy_bytes(impls[name]) for name in names if name.startswith("bncore")}
    peak["numpy"] = peak_numpy_bytes(impls["numpy"])

    k = {name: calls_per_sample(impls[name], min_time) for name in names}
    samples = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]  # rotate who goes first
            if settle:
                time.sleep(settle)  # let the last peer's spinning threads go idle
            samples[name].append(time_sample(impls[name], k[name]))
    return {name: float(np.median(s)) for name, s in samples.items()}, samples, k, err, peak


# ----------------------------------------------------------------- reporting
def _fmt_ms(s):
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms >= 0.01 else f"{ms:.2g}"


def _fmt_load(v):
    return "?" if v is None else f"{v[0]:.2f}"


def _fmt_x(v):
    return "-" if v is None else f"{v:.2f}"


def shape_str(cell):
    return "x".join(map(str, cell["array_shape"]))


def table(run):
    head = ["op", "layout", "shape", "numpy", "torch", "ort", "bncore", "out=", "in-place",
            "x numpy", "x torch", "x ort", "bound", "bncore/bound", "out=/bound"]
    rows = []
    for c in run["cells"]:
        m, sp, br = c["median_s"], c["speedup"], c["bound_ratio"]
        rows.append([c["op"], c["layout"], shape_str(c)]
                    + [_fmt_ms(m.get(k)) for k in ("numpy", "torch", "ort", "bncore",
                                                   "bncore_out", "bncore_inplace")]
                    + [_fmt_x(sp.get(k)) for k in PEERS]
                    + [_fmt_ms(c["bound_s"]), _fmt_x(br["bncore"]), _fmt_x(br["bncore_out"])])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_info(torch, ort):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    llc = None
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as fh:
            llc = fh.read().strip()
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "llc": llc, "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "bncore": getattr(bncore, "__version__", None),
            "torch": getattr(torch, "__version__", None),
            "onnxruntime": getattr(ort, "__version__", None),
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "MALLOC_"))},
            "bncore_config": _bncore_config()}


def _bncore_config():
    try:
        return {k: str(v) for k, v in bncore.show_config(mode="dicts").items()}
    except Exception:  # an older bncore without show_config: informational only
        return None


class _Progress:
    """tqdm when installed, else a plain bar on stderr."""

    def __init__(self, total, desc):
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="cell", leave=False)
        except ImportError:
            self._bar = None
        self.total, self.desc, self.done = total, desc, 0

    def update(self, label):
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        else:
            filled = 30 * self.done // self.total
            sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{self.done}/{self.total} {label:<40}")
            sys.stderr.flush()

    def close(self):
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")


def _loadavg():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def _threads(text):
    vals = [int(v) for v in text.replace(",", " ").split()]
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--threads expects positive integers, got {text!r}")
    return vals


def _shapes(text):
    try:
        shapes = [tuple(int(d) for d in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) not in (2, 4) or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(
            f"--shapes expects e.g. 8x512x7x7,64x256 (4-D N,C,H,W or 2-D N,C), got {text!r}")
    return shapes


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bncore bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid, 3 rounds (well under a minute)")
    p.add_argument("--json", metavar="PATH", help="write every cell, all medians and machine info")
    p.add_argument("--threads", type=_threads, default=None, metavar="N",
                   help="thread count(s), e.g. 2 or 1,2 (default: all cores)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--shapes", type=_shapes, default=None, help="override the grid, e.g. 8x512x7x7,64x256")
    p.add_argument("--rounds", type=int, default=None, help="rounds per cell (default 7, quick 3)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timed sample; short calls repeat (default 0.005, quick 0.002)")
    p.add_argument("--settle", type=float, default=0.002,
                   help="seconds of sleep before each sample so other peers' threads go idle")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="buffer for the bandwidth measurement (default 512, quick 256)")
    p.add_argument("--no-peers", action="store_true", help="skip PyTorch and ONNX Runtime")
    args = p.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    if not ops or any(o not in OPS for o in ops):
        p.error(f"--ops expects a comma list of {', '.join(OPS)}, got {args.ops!r}")
    args.ops = ops
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds expects a positive integer, got {args.rounds}")
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.min_time = args.min_time if args.min_time is not None else (0.002 if args.quick else 0.005)
    args.bandwidth_mib = args.bandwidth_mib or (256 if args.quick else 512)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    args.threads = args.threads or [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                    else os.cpu_count()]
    return args


def run_bench(args):
    torch = None if args.no_peers else _import("torch")
    ort = None if args.no_peers else _import("onnxruntime")
    if ort is not None and _import("onnx") is None:
        ort = None
    dtype = np.dtype(args.dtype)
    cells = [(op, layout, shape) for shape in args.shapes for layout in layouts_for(shape)
             for op in args.ops]
    result = {"schema": 1, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "python -m bncore bench " + " ".join(args.argv),
              "quick": args.quick, "dtype": args.dtype, "rounds": args.rounds,
              "min_time_s": args.min_time, "settle_s": args.settle,
              "machine": machine_info(torch, ort),
              "bound_model": {"eval": "2S/copy", "train": "S/read + 2S/copy",
                              "backward": "2S/read + 3S/copy", "backward_eval": "3S/copy",
                              "S": "bytes of x"},
              "runs": []}
    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        for n in args.threads:
            if torch is not None:
                torch.set_num_threads(n)
            bw = measure_bandwidth(n, args.bandwidth_mib)
            # other processes' load makes threaded timings meaningless: record it
            run = {"threads": n, "loadavg_start": _loadavg(), "cells": []}
            bar = _Progress(len(cells), f"{n} thread{'s' if n > 1 else ''}")
            for op, layout, shape in cells:
                case = make_case(op, layout, shape, dtype)
                med, samples, k, err, peak = run_cell(case, n, args.rounds, args.min_time,
                                                      args.settle, torch, ort)
                x = case["x"]
                run["cells"].append({"op": op, "layout": layout, "shape": list(shape),
                                     "array_shape": list(x.shape), "axis": case["axis"],
                                     "dtype": args.dtype, "nbytes": x.nbytes,
                                     "median_s": med, "samples_s": samples, "calls_per_sample": k,
                                     "max_rel_err": err, "peak_numpy_alloc_bytes": peak})
                bar.update(f"{op} {layout} {'x'.join(map(str, shape))}")
                del case
            bar.close()
            # bandwidth again after the cells: the best of both is the bound
            bw2 = measure_bandwidth(n, args.bandwidth_mib)
            run["loadavg_end"] = _loadavg()
            run["bandwidth"] = {k: max(bw[k], bw2[k]) for k in ("read_GBps", "copy_GBps")}
            run["bandwidth"].update(buffer_MiB=args.bandwidth_mib,
                                    measured=[bw, bw2], method="bitwise_or.reduce / copyto, "
                                    "split over the thread count, best of reps")
            for c in run["cells"]:
                med = c["median_s"]
                c["bound_s"] = bound_seconds(c["op"], c["nbytes"], run["bandwidth"])
                c["speedup"] = {p: (med[p] / med["bncore"] if p in med else None) for p in PEERS}
                c["bound_ratio"] = {b: med[b] / c["bound_s"] for b in BNCORE}
            result["runs"].append(run)
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)
    return result


def report(result):
    m = result["machine"]
    out = [f"bncore bench {result['date']}  ({result['command']})",
           f"{m['cpu']}, {m['cpu_count']} cores, LLC {m['llc']}; numpy {m['numpy']}, "
           f"torch {m['torch'] or 'absent'}, onnxruntime {m['onnxruntime'] or 'absent'}, "
           f"bncore {m['bncore']}" + "".join(f", {k}={v}" for k, v in m["env"].items()),
           f"{result['dtype']}, medians of {result['rounds']} interleaved rounds, times in ms; "
           "'x peer' = peer / bncore (fresh output); bound = bytes / measured bandwidth "
           "(eval 2S/copy, train S/read+2S/copy, backward 2S/read+3S/copy, "
           "backward_eval 3S/copy)"]
    for run in result["runs"]:
        bw = run["bandwidth"]
        out += ["", f"### {run['threads']} thread{'s' if run['threads'] > 1 else ''}: "
                f"read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s; "
                f"load average {_fmt_load(run['loadavg_start'])} -> {_fmt_load(run['loadavg_end'])}",
                "",
                table(run)]
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    result = run_bench(args)
    print(report(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
