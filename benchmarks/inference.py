"""Inference and fused-activation measurements against PyTorch and ONNX Runtime.

    python benchmarks/inference.py [--quick] [--parts fused,rps,memory]
                                   [--threads N] [--rounds R] [--wait-policy] [--json PATH]

* ``fused``: training forward and backward of batch norm + ReLU: bncore fused
  (``activation="relu"``), bncore then a separate NumPy pass, PyTorch
  ``F.batch_norm`` + ``F.relu`` (backward: ``threshold_backward`` then
  ``native_batch_norm_backward``).
* ``rps``: requests per second of one (1, 64, 56, 56) float32 eval request per
  call, with 1 and 8 Python threads calling at once: bncore
  ``batch_norm_eval`` (default threads and ``n_threads=1``), ``FrozenBatchNorm``
  (``n_threads=1``), PyTorch (default threads and 1), ONNX Runtime (one shared
  session, default intra-op threads and 1). ``--wait-policy`` repeats it in
  child processes under ``OMP_WAIT_POLICY=active`` and ``passive``.
* ``memory``: tracemalloc peak of a training step through dense -> batch norm
  + leaky ReLU blocks, with BatchNorm and with InPlaceABN.

Inputs come from the asv suite's builder (``benchmarks/common.py``), timing
from ``bncore.bench.interleaved`` (medians over interleaved rounds). Missing
peers are skipped.
"""
import argparse
import json
import os
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import bncore
from bncore.bench import interleaved
from benchmarks import common  # benchmarks/benchmarks, next to this file

RPS_SHAPE = "1x64x56x56"
FUSED_SHAPES = ["32x64x56x56", "32x256x14x14", "256x4096"]


def _import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def fused_impls(shape, torch, n_threads):
    """({name: training forward}, {name: backward}) of batch norm + ReLU."""
    d = common.data(shape, common.layout_of(shape), "float32")
    x, dy, w, b = d["x"], d["dy"], d["weight"], d["bias"]
    out = common.filled_like(x)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, activation="relu")
    kw = {"n_threads": n_threads}

    def two_pass_fwd():
        yy, _, _ = bncore.batch_norm_train(x, w, b, out=out, **kw)
        return np.maximum(yy, 0, out=yy)

    def two_pass_bwd():
        g = np.multiply(dy, y > 0, out=out)  # the mask pass, then the backward
        return bncore.batch_norm_backward(g, x, mean, invstd, w, out=g, **kw)

    fwd = {"bncore fused": lambda: bncore.batch_norm_train(x, w, b, out=out, activation="relu",
                                                           **kw),
           "bncore + numpy pass": two_pass_fwd}
    bwd = {"bncore fused": lambda: bncore.batch_norm_backward(
        dy, x, mean, invstd, w, out=out, activation="relu", y=y, **kw),
        "bncore + numpy pass": two_pass_bwd}
    if torch is not None:
        F, aten = torch.nn.functional, torch.ops.aten
        tx, tdy, tw, tb, ty, tm, ti = (torch.from_numpy(np.array(a))
                                       for a in (x, dy, w, b, y, mean, invstd))
        fwd["torch bn + relu"] = lambda: F.relu(F.batch_norm(tx, None, None, tw, tb, True))
        bwd["torch bn + relu"] = lambda: aten.native_batch_norm_backward(
            aten.threshold_backward(tdy, ty, 0), tx, tw, None, None, tm, ti, True, 1e-5,
            [True, True, True])
    return fwd, bwd


def bench_fused(shapes, n_threads, rounds, torch):
    rows = []
    for shape in shapes:
        fwd, bwd = fused_impls(shape, torch, n_threads)
        for op, impls in (("train forward", fwd), ("backward", bwd)):
            rows.append({"op": op, "shape": shape, "n_threads": n_threads,
                         "median_s": interleaved(impls, rounds)[0]})
    return rows


def _ort_session(ort, d, intra):
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.array(d[k]), n) for k, n in (
        ("weight", "scale"), ("bias", "B"), ("running_mean", "mean"), ("running_var", "var"))]
    node = helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"], ["y"],
                            epsilon=common.EPS)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, d["x"].shape) for n in "xy"]
    model = helper.make_model(helper.make_graph([node], "bn", io[:1], io[1:], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = intra, 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def rps_impls(torch, ort):
    """{name: (one request, torch threads or None)} for an eval of RPS_SHAPE."""
    d = common.data(RPS_SHAPE, "NCHW", "float32")
    x, rm, rv, w, b = (d[k] for k in ("x", "running_mean", "running_var", "weight", "bias"))
    frozen = bncore.FrozenBatchNorm.from_state_dict(
        {"weight": w, "bias": b, "running_mean": rm, "running_var": rv})
    impls = {"bncore eval (default threads)": (lambda: bncore.batch_norm_eval(x, rm, rv, w, b),
                                               None),
             "bncore eval n_threads=1": (
                 lambda: bncore.batch_norm_eval(x, rm, rv, w, b, n_threads=1), None),
             "bncore FrozenBatchNorm n_threads=1": (lambda: frozen(x, n_threads=1), None)}
    if torch is not None:
        F = torch.nn.functional
        tx, tw, tb, trm, trv = (torch.from_numpy(np.array(a)) for a in (x, w, b, rm, rv))

        def call():
            with torch.inference_mode():
                return F.batch_norm(tx, trm, trv, tw, tb, False)
        n = torch.get_num_threads()
        impls[f"torch ({n} threads)"] = (call, n)
        impls["torch (1 thread)"] = (call, 1)
    if ort is not None and _import("onnx") is not None:
        for intra, label in ((0, "default intra-op threads"), (1, "1 intra-op thread")):
            sess = _ort_session(ort, d, intra)
            impls[f"onnxruntime ({label})"] = (lambda s=sess: s.run(None, {"x": x}), None)
    return impls


def bench_rps(callers_list, rounds, torch, ort, per_caller=20):
    """Requests per second: each timed call is `callers` threads making
    `per_caller` requests each; rps = callers * per_caller / median seconds."""
    impls = rps_impls(torch, ort)
    result = {}
    for callers in callers_list:
        with ThreadPoolExecutor(callers) as pool:
            def burst(f, nt, callers=callers, pool=pool):
                if nt is not None:
                    torch.set_num_threads(nt)
                futs = [pool.submit(lambda: [f() for _ in range(per_caller)])
                        for _ in range(callers)]
                for fu in futs:
                    fu.result()
            timed = {n: (lambda f=f, nt=nt: burst(f, nt)) for n, (f, nt) in impls.items()}
            default = torch.get_num_threads() if torch is not None else None
            try:
                med = interleaved(timed, rounds, min_time=0.05)[0]
            finally:
                if torch is not None:
                    torch.set_num_threads(default)
        result[callers] = {n: callers * per_caller / s for n, s in med.items()}
    return result


def training_step_peak(layer_cls, n, d=256, blocks=4, seed=0):
    """tracemalloc peak (bytes) of forward + backward through `blocks` chained
    dense -> batch norm + leaky ReLU blocks on an (n, d) float32 batch, keeping
    what each layer's backward needs, as autograd would."""
    rng = np.random.default_rng(seed)
    Ws = [(rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32) for _ in range(blocks)]
    x0 = rng.standard_normal((n, d), dtype=np.float32)
    tracemalloc.start()
    try:
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
    std, size = training_step_peak(bncore.BatchNorm, n, d, blocks)
    inp, _ = training_step_peak(bncore.InPlaceABN, n, d, blocks)
    return {"batch": [n, d], "blocks": blocks, "activation_MiB": size / 2**20,
            "peak_batchnorm_MiB": std / 2**20, "peak_inplace_abn_MiB": inp / 2**20,
            "saving_MiB": (std - inp) / 2**20, "saving_fraction": (std - inp) / std}


def run(quick=False, n_threads=None, parts=("fused", "rps", "memory"), rounds=None):
    torch, ort = _import("torch"), _import("onnxruntime")
    rounds = rounds or (3 if quick else 7)
    out = {"rounds": rounds, "cpu_count": os.cpu_count(),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
           "torch": getattr(torch, "__version__", None),
           "onnxruntime": getattr(ort, "__version__", None), "loadavg_start": os.getloadavg()}
    if "fused" in parts:
        default = torch.get_num_threads() if torch is not None else None
        if torch is not None and n_threads:
            torch.set_num_threads(n_threads)
        try:
            out["fused"] = bench_fused(FUSED_SHAPES[1:2] if quick else FUSED_SHAPES, n_threads,
                                       rounds, torch)
        finally:
            if torch is not None:
                torch.set_num_threads(default)
    if "rps" in parts:
        out["rps"] = bench_rps((1, 8), rounds, torch, ort)
    if "memory" in parts:
        out["memory"] = bench_memory(4096 if quick else 16384)
    out["loadavg_end"] = os.getloadavg()
    return out


def report(res):
    lines = [f"rounds {res['rounds']}, {res['cpu_count']} cores, OMP_WAIT_POLICY="
             f"{res['OMP_WAIT_POLICY']}, torch {res['torch']}, onnxruntime {res['onnxruntime']}, "
             f"load {res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}"]
    if "fused" in res:
        names = list(res["fused"][0]["median_s"])
        lines += ["", (f"batch norm + ReLU, float32, n_threads={res['fused'][0]['n_threads']}, "
                       "ms (median):"), "", "| op | shape | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        lines += [f"| {r['op']} | {r['shape']} | "
                  + " | ".join(f"{r['median_s'][n] * 1e3:.3g}" for n in names) + " |"
                  for r in res["fused"]]
    if "rps" in res:
        rps = res["rps"]
        lines += ["", f"eval requests/s, one {RPS_SHAPE} float32 request per call (median):", "",
                  "| implementation | " + " | ".join(f"{c} caller{'s' * (int(c) > 1)}"
                                                     for c in rps) + " |",
                  "|---|" + "---|" * len(rps)]
        lines += [f"| {n} | " + " | ".join(f"{rps[c][n]:,.0f}" for c in rps) + " |"
                  for n in next(iter(rps.values()))]
    if "memory" in res:
        m = res["memory"]
        lines += ["", (f"training step peak memory, {m['blocks']} x (dense -> BN + leaky "
                       f"ReLU) on {m['batch'][0]}x{m['batch'][1]} float32 "
                       f"({m['activation_MiB']:.0f} MiB per activation): BatchNorm "
                       f"{m['peak_batchnorm_MiB']:.0f} MiB, InPlaceABN "
                       f"{m['peak_inplace_abn_MiB']:.0f} MiB, saving {m['saving_MiB']:.0f} MiB "
                       f"({100 * m['saving_fraction']:.0f}%)")]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default="fused,rps,memory")
    p.add_argument("--threads", type=int, help="threads for the fused cells (default: all)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--wait-policy", action="store_true",
                   help="repeat the rps part in child processes, OMP_WAIT_POLICY=active/passive")
    p.add_argument("--json", metavar="PATH", help="write the results ('-': to stdout)")
    a = p.parse_args(argv)
    results = [run(a.quick, a.threads, tuple(a.parts.split(",")), a.rounds)]
    if a.json == "-":  # a child of --wait-policy
        print(json.dumps(results[0]))
        return 0
    print(report(results[0]))
    for policy in ("active", "passive") if a.wait_policy else ():
        cmd = [sys.executable, __file__, "--parts", "rps", "--json", "-"]
        cmd += ["--quick"] * a.quick + (["--rounds", str(a.rounds)] if a.rounds else [])
        r = subprocess.run(cmd, capture_output=True, text=True, check=True,
                           env=dict(os.environ, OMP_WAIT_POLICY=policy))
        results.append(json.loads(r.stdout))
        print(f"\n### OMP_WAIT_POLICY={policy}\n\n{report(results[-1])}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
