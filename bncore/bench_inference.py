"""Inference and fused-activation benchmarks (``python -m bncore.bench_inference``).

Three measurements, each interleaved (every round times every implementation
once, rotating the order) and reported as the median over rounds:

* ``fused``: training forward and backward of batch norm + ReLU. bncore fused
  (one pass: ``activation="relu"``), bncore followed by a separate NumPy ReLU
  pass, and PyTorch ``F.batch_norm`` followed by ``F.relu`` (backward:
  ``threshold_backward`` then ``native_batch_norm_backward``).
* ``rps``: requests per second of an eval forward on one (1, 64, 56, 56)
  float32 request, issued by 1 and by 8 concurrent Python threads that call in
  a loop: bncore ``batch_norm_eval`` (default threads and ``n_threads=1``),
  ``FrozenBatchNorm`` (``n_threads=1``), PyTorch (its default threads and 1)
  and ONNX Runtime (one shared session; default intra-op threads and 1).
  ``--wait-policy`` repeats it in child processes under
  ``OMP_WAIT_POLICY=active`` and ``passive``.
* ``memory``: tracemalloc peak of a training step through a chain of dense
  -> batch norm + leaky ReLU blocks, with BatchNorm and with InPlaceABN.

Missing peers (torch, onnxruntime + onnx) are skipped.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import Any

import numpy as np

import bncore

RPS_SHAPE = (1, 64, 56, 56)
FUSED_SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (256, 4096)]


def _import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def _time_sample(f, k):
    t = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t) / k


def interleaved(impls, rounds, min_time=0.005):
    """Median seconds per call of each implementation over interleaved rounds."""
    names = list(impls)
    k = {}
    for n in names:
        dt = min(_time_sample(impls[n], 1) for _ in range(2))
        k[n] = max(1, min(10000, math.ceil(min_time / max(dt, 1e-7))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            samples[n].append(_time_sample(impls[n], k[n]))
    return {n: float(np.median(s)) for n, s in samples.items()}


# ---- fused batch norm + ReLU -------------------------------------------------------------

def fused_impls(shape, torch, n_threads):
    rng = np.random.default_rng(0)
    C = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    out = np.empty_like(x)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, activation="relu")
    kw = dict(n_threads=n_threads)

    def unfused_fwd():
        yy, _, _ = bncore.batch_norm_train(x, w, b, out=out, **kw)
        return np.maximum(yy, 0, out=yy)

    def unfused_bwd():
        g = np.multiply(dy, y > 0, out=out)  # the mask pass, then the backward
        return bncore.batch_norm_backward(g, x, mean, invstd, w, out=g, **kw)

    fwd = {"bncore fused": lambda: bncore.batch_norm_train(x, w, b, out=out, activation="relu",
                                                           **kw),
           "bncore + numpy pass": unfused_fwd}
    bwd = {"bncore fused": lambda: bncore.batch_norm_backward(dy, x, mean, invstd, w, out=out,
                                                              activation="relu", y=y, **kw),
           "bncore + numpy pass": unfused_bwd}
    if torch is not None:
        F = torch.nn.functional
        tx, tdy, tw, tb = map(torch.from_numpy, (x, dy, w, b))
        ty, tm, ti = (torch.from_numpy(a) for a in (y, mean, invstd))
        aten = torch.ops.aten
        fwd["torch bn + relu"] = lambda: F.relu(F.batch_norm(tx, None, None, tw, tb, True))
        bwd["torch bn + relu"] = lambda: aten.native_batch_norm_backward(
            aten.threshold_backward(tdy, ty, 0), tx, tw, None, None, tm, ti, True, 1e-5,
            [True, True, True])
    return fwd, bwd


def bench_fused(shapes, n_threads, rounds, torch):
    """n_threads (None: all) applies to bncore and, for the run, to PyTorch."""
    rows = []
    default = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None and n_threads:
            torch.set_num_threads(n_threads)
        for shape in shapes:
            fwd, bwd = fused_impls(shape, torch, n_threads)
            for op, impls in (("train forward", fwd), ("backward", bwd)):
                rows.append({"op": op, "shape": list(shape), "n_threads": n_threads,
                             "median_s": interleaved(impls, rounds)})
    finally:
        if torch is not None:
            torch.set_num_threads(default)
    return rows


# ---- requests per second ---------------------------------------------------------------

def _ort_session(ort, onnx, params, shape, intra):
    from onnx import TensorProto, helper, numpy_helper
    w, b, rm, rv = params
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w, "scale"), (b, "B"), (rm, "mean"), (rv, "var"))]
    node = helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"], ["y"],
                            epsilon=1e-5)
    info = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
    graph = helper.make_graph([node], "bn", [info("x")], [info("y")], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def rps_impls(torch, ort, onnx):
    """name -> (callable, setup, teardown) for one eval request of RPS_SHAPE."""
    rng = np.random.default_rng(1)
    C = RPS_SHAPE[1]
    x = rng.standard_normal(RPS_SHAPE, dtype=np.float32)
    params = (rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32),
              rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32))
    w, b, rm, rv = params
    frozen = bncore.FrozenBatchNorm.from_state_dict(
        {"weight": w, "bias": b, "running_mean": rm, "running_var": rv})
    none = (None, None)
    impls: dict[str, tuple[Any, ...]] = {
        "bncore eval (default threads)": (lambda: bncore.batch_norm_eval(x, rm, rv, w, b),) + none,
        "bncore eval n_threads=1": (lambda: bncore.batch_norm_eval(x, rm, rv, w, b, n_threads=1),)
        + none,
        "bncore FrozenBatchNorm n_threads=1": (lambda: frozen(x, n_threads=1),) + none,
    }
    if torch is not None:
        F = torch.nn.functional
        tx, tw, tb, trm, trv = map(torch.from_numpy, (x, w, b, rm, rv))
        default = torch.get_num_threads()

        def tcall():
            with torch.inference_mode():
                return F.batch_norm(tx, trm, trv, tw, tb, False)
        impls[f"torch ({default} threads)"] = (tcall,) + none
        impls["torch (1 thread)"] = (tcall, lambda: torch.set_num_threads(1),
                                     lambda: torch.set_num_threads(default))
    if ort is not None and onnx is not None:
        for intra, label in ((0, "default intra-op threads"), (1, "1 intra-op thread")):
            sess = _ort_session(ort, onnx, params, RPS_SHAPE, intra)
            impls[f"onnxruntime ({label})"] = (lambda s=sess: s.run(None, {"x": x}),) + none
    return impls


def requests_per_second(f, callers, duration):
    """Completed calls per second with `callers` threads calling f in a loop."""
    counts = [0] * callers
    start = threading.Barrier(callers + 1)
    stop = [False]

    def worker(i):
        start.wait()
        n = 0
        while True:  # at least one call each; the clock runs until the last one ends
            f()
            n += 1
            if stop[0]:
                break
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(duration)
    stop[0] = True
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def bench_rps(callers_list, duration, rounds, torch, ort, onnx):
    impls = rps_impls(torch, ort, onnx)
    names = list(impls)
    for f, setup, teardown in impls.values():  # warm-up
        setup and setup()
        f()
        teardown and teardown()
    result = {}
    for callers in callers_list:
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for i in range(len(names)):
                n = names[(i + r) % len(names)]
                f, setup, teardown = impls[n]
                setup and setup()
                try:
                    samples[n].append(requests_per_second(f, callers, duration))
                finally:
                    teardown and teardown()
        result[callers] = {n: float(np.median(s)) for n, s in samples.items()}
    return result


# ---- peak memory of in-place ABN ---------------------------------------------------------

def training_step_peak(layer_cls, n, d=256, blocks=4, seed=0):
    """tracemalloc peak (bytes) of forward + backward through `blocks` chained
    dense -> batch norm + leaky ReLU blocks on an (n, d) float32 batch, keeping
    what each layer's backward needs, as autograd would."""
    rng = np.random.default_rng(seed)
    Ws = [(rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32) for _ in range(blocks)]
    x0 = rng.standard_normal((n, d), dtype=np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        layers, h = [], x0
        for W in Ws:
            bn = layer_cls(d, activation=("leaky_relu", 0.01))
            h = bn(h @ W)
            layers.append((W, bn))
        g = np.ones_like(h)
        for W, bn in reversed(layers):
            g = bn.backward(g, out=g) @ W.T
        return tracemalloc.get_traced_memory()[1] - base, x0.nbytes
    finally:
        tracemalloc.stop()


def bench_memory(n=16384, d=256, blocks=4):
    std, S = training_step_peak(bncore.BatchNorm, n, d, blocks)
    inp, _ = training_step_peak(bncore.InPlaceABN, n, d, blocks)
    return {"batch": [n, d], "blocks": blocks, "activation_MiB": S / 2**20,
            "peak_batchnorm_MiB": std / 2**20, "peak_inplace_abn_MiB": inp / 2**20,
            "saving_MiB": (std - inp) / 2**20, "saving_fraction": (std - inp) / std}


# ---- driver ------------------------------------------------------------------------------

def run_inference_bench(quick=False, n_threads=None, parts=("fused", "rps", "memory"),
                        rps_duration=None, rounds=None):
    """All measurements as a dict (the lead's `python -m bncore bench` can call this)."""
    torch = _import("torch")
    ort, onnx = _import("onnxruntime"), _import("onnx")
    rounds = rounds or (3 if quick else 7)
    out = {"rounds": rounds, "cpu_count": os.cpu_count(),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "torch": getattr(torch, "__version__", None),
           "onnxruntime": getattr(ort, "__version__", None),
           "loadavg_start": list(os.getloadavg())}
    if "fused" in parts:
        shapes = FUSED_SHAPES[1:2] if quick else FUSED_SHAPES
        out["fused"] = bench_fused(shapes, n_threads, rounds, torch)
    if "rps" in parts:
        out["rps_shape"] = list(RPS_SHAPE)
        out["rps_duration_s"] = rps_duration or (0.2 if quick else 0.5)
        out["rps"] = bench_rps((1, 8), out["rps_duration_s"], rounds, torch, ort, onnx)
    if "memory" in parts:
        out["memory"] = bench_memory(4096 if quick else 16384)
    out["loadavg_end"] = list(os.getloadavg())
    return out


def report(res):
    lines = [f"rounds {res['rounds']}, {res['cpu_count']} cores, OMP_WAIT_POLICY="
             f"{res['OMP_WAIT_POLICY']}, torch {res['torch']}, onnxruntime {res['onnxruntime']}, "
             f"load {res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}"]
    if "fused" in res:
        lines += ["", f"batch norm + ReLU, float32, n_threads={res['fused'][0]['n_threads']}, "
                  "ms (median):", ""]
        names = list(res["fused"][0]["median_s"])
        lines += ["| op | shape | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in res["fused"]:
            lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | "
                         + " | ".join(f"{r['median_s'][n] * 1e3:.3g}" for n in names) + " |")
    if "rps" in res:
        lines += ["", f"eval requests/s, one {'x'.join(map(str, res['rps_shape']))} float32 "
                  f"request per call ({res['rps_duration_s']} s per sample, median):", "",
                  "| implementation | " + " | ".join(f"{c} caller{'s' * (c > 1)}"
                                                     for c in res["rps"]) + " |",
                  "|---|" + "---|" * len(res["rps"])]
        for name in next(iter(res["rps"].values())):
            lines.append(f"| {name} | " + " | ".join(f"{res['rps'][c][name]:,.0f}"
                                                     for c in res["rps"]) + " |")
    if "memory" in res:
        m = res["memory"]
        lines += ["", f"training step peak memory, {m['blocks']} x (dense -> BN + leaky ReLU) "
                  f"on {m['batch'][0]}x{m['batch'][1]} float32 ({m['activation_MiB']:.0f} MiB "
                  f"per activation): BatchNorm {m['peak_batchnorm_MiB']:.0f} MiB, InPlaceABN "
                  f"{m['peak_inplace_abn_MiB']:.0f} MiB, saving {m['saving_MiB']:.0f} MiB "
                  f"({100 * m['saving_fraction']:.0f}%)"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bncore.bench_inference",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default="fused,rps,memory")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for the fused cells, bncore and PyTorch (default: all)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--rps-duration", type=float, default=None)
    p.add_argument("--wait-policy", action="store_true",
                   help="run the rps part in child processes with OMP_WAIT_POLICY=active/passive")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    parts = tuple(a.parts.split(","))
    results = [run_inference_bench(a.quick, a.threads, parts, a.rps_duration, a.rounds)]
    print(report(results[0]))
    if a.wait_policy:
        for policy in ("active", "passive"):
            cmd = [sys.executable, "-m", "bncore.bench_inference", "--parts", "rps", "--json", "-"]
            cmd += ["--quick"] * a.quick + (["--rounds", str(a.rounds)] if a.rounds else [])
            cmd += ["--rps-duration", str(a.rps_duration)] if a.rps_duration else []
            r = subprocess.run(cmd, capture_output=True, text=True, check=True,
                               env=dict(os.environ, OMP_WAIT_POLICY=policy))
            res = json.loads(r.stdout.split("\n@@JSON@@\n", 1)[1])
            res["rps"] = {int(k): v for k, v in res["rps"].items()}
            results.append(res)
            print(f"\n### OMP_WAIT_POLICY={policy}\n\n{report(res)}")
    if a.json == "-":
        print("\n@@JSON@@\n" + json.dumps(results[0]))
    elif a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
