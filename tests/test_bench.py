"""``python -m bncore bench`` and the harnesses in ``benchmarks/``: the JSON
schema, the bound's byte counts, the CLI on a tiny grid, and that every peer
computes what bncore computes. No timing is asserted."""
import importlib
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import bncore
from bncore import bench

TINY = "4x8x5x5,16x8"
TOL = {"float32": 1e-4, "float64": 1e-10}
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MiB = 2**20


def _have(*names):
    try:
        for n in names:
            __import__(n)
        return True
    except ImportError:
        return False


def _harness(name):
    """A module of benchmarks/ (absent from an sdist: skip)."""
    if not (BENCHMARKS / f"{name}.py").exists():
        pytest.skip("benchmarks/ is not in this tree")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main(["--json", str(path), "--threads", "1,2", "--dtype", "float32,float64",
                       "--shapes", TINY, "--rounds", "2", "--min-time", "0",
                       "--settle", "0"]) == 0
    return json.loads(path.read_text())


def test_json_schema(tiny_run):
    data = tiny_run
    assert data["schema"] == 2 and data["rounds"] == 2
    assert data["machine"]["numpy"] == np.__version__
    assert data["machine"]["bncore"] == bncore.__version__
    assert set(data["bound_model"]) >= set(bench.OPS)
    assert [(r["dtype"], r["threads"]) for r in data["runs"]] == [
        ("float32", 1), ("float32", 2), ("float64", 1), ("float64", 2)]
    peers = {"torch"} if _have("torch") else set()
    for run in data["runs"]:
        expected = {(op, layout, shape) for shape in ((4, 8, 5, 5), (16, 8))
                    for layout in bench.layouts_for(shape) for op in bench.OPS}
        assert {(c["op"], c["layout"], tuple(c["shape"])) for c in run["cells"]} == expected
        for c in run["cells"]:
            assert (c["dtype"], c["threads"]) == (run["dtype"], run["threads"])
            med, b = c["median_s"], c["bound"]
            want = {"bncore", "bncore_out", "numpy"} | peers
            if (_have("onnxruntime", "onnx") and c["op"] == "eval"
                    and c["layout"] != "NHWC"):
                want.add("ort")
            assert set(med) == want == set(c["max_rel_err"])
            assert set(c["samples_s"]) == want | {"bound:read:max", "bound:read:or",
                                                  "bound:copy:memcpy", "bound:copy:ufunc"}
            for samples in c["samples_s"].values():
                assert len(samples) == 2 and all(math.isfinite(s) and s > 0 for s in samples)
            # every implementation's outputs agree with bncore's fresh output
            for name, err in c["max_rel_err"].items():
                assert err <= TOL[c["dtype"]], (c["op"], c["layout"], c["shape"], name, err)
            # derived figures follow from the medians, the byte counts and the bandwidths
            nbytes = math.prod(c["array_shape"]) * np.dtype(c["dtype"]).itemsize
            assert c["nbytes"] == nbytes
            assert b["working_set_bytes"] == bench.working_set(c["op"], nbytes)
            assert (b["read_bytes"], b["copy_bytes"]) == bench.bound_bytes(
                c["op"], nbytes, b["channel_cached"] is not False)
            moved = b["buffer_bytes"] * b["passes_per_call"]
            for kind in ("read", "copy"):  # the fastest kernel's fastest round
                fastest = min(min(s) for n, s in c["samples_s"].items()
                              if n.startswith(f"bound:{kind}:"))
                assert b[f"{kind}_GBps"] == pytest.approx(moved / fastest / 1e9)
            assert b["buffer_bytes"] == pytest.approx(b["working_set_bytes"], abs=8)
            assert b["seconds"] == pytest.approx(b["read_bytes"] / (b["read_GBps"] * 1e9)
                                                 + b["copy_bytes"] / (b["copy_GBps"] * 1e9))
            for name in ("bncore", "bncore_out"):  # fastest round against the bound
                assert c["bound_ratio"][name] == pytest.approx(
                    min(c["samples_s"][name]) / b["seconds"])
            assert c["speedup"] == pytest.approx({p: med[p] / med["bncore"]
                                                  for p in bench.PEERS if p in med})
            assert set(c["peak_alloc_bytes"]) == {"bncore", "bncore_out"}


@pytest.mark.parametrize("op,S,cached,want", [
    ("eval", 1000, None, (0, 2000)),           # read x, write y
    ("backward_eval", 1000, None, (0, 3000)),  # read x, dy, write dx
    ("train", 1000, True, (0, 2000)),          # the statistics pass re-reads from cache
    ("train", 1000, False, (1000, 2000)),      # ... or from memory
    ("backward", 1000, True, (0, 3000)),
    ("backward", 1000, False, (2000, 3000)),   # the reductions read x and dy once more
])
def test_bound_bytes(op, S, cached, want):
    assert bench.bound_bytes(op, S, cached is not False) == want
    assert bench.working_set(op, S) == (2 * S if op in ("train", "eval") else 3 * S)


def test_bound_seconds():
    # 1e8 bytes at 20 GB/s read + 2e8 bytes at 40 GB/s copy = 5 ms + 5 ms
    assert bench.bound_seconds(1e8, 2e8, 20e9, 40e9) == pytest.approx(0.010)
    assert bench.bound_seconds(0, 3e8, 20e9, 30e9) == pytest.approx(0.010)


@pytest.mark.parametrize("layout,shape,itemsize,want", [
    ("NCHW", (64, 3, 224, 224), 4, 64 * 224 * 224 * 4),  # one channel: its 64 planes
    ("NHWC", (32, 56, 56, 64), 4, 32 * 56 * 56 * 64),    # 256-byte rows: one line each
    ("NHWC", (64, 224, 224, 3), 4, 64 * 224 * 224 * 12),  # 12-byte rows are read whole
    ("NC", (8192, 1024), 8, 8192 * 64),
])
def test_channel_bytes(layout, shape, itemsize, want):
    assert bench.channel_bytes(layout, shape, itemsize) == want


def test_channel_cached_against_half_the_llc():
    llc = 32 * MiB
    shape = (64, 3, 224, 224)  # 12.25 MiB per float32 channel
    assert bench.channel_cached("train", "NCHW", shape, 4, llc) is True     # 12.25 <= 16
    assert bench.channel_cached("backward", "NCHW", shape, 4, llc) is False  # x and dy: 24.5 > 16
    assert bench.channel_cached("train", "NCHW", shape, 8, llc) is False     # 24.5 > 16
    assert bench.channel_cached("eval", "NCHW", shape, 4, llc) is None       # one pass
    assert bench.channel_cached("train", "NCHW", shape, 8, None) is True     # unknown LLC


@pytest.mark.parametrize("text,want", [("32768K\n", 32 * MiB), ("2M", 2 * MiB), ("512", 512),
                                       ("1G", 2**30)])
def test_cache_size(text, want):
    assert bench.cache_size(text) == want


def test_bandwidth_passes_move_the_working_set():
    with ThreadPoolExecutor(2) as pool:
        p = bench.BandwidthPasses(3 * MiB, 2, pool)
        assert p.nbytes == 3 * MiB and p.inner == 11  # ceil(32 MiB / 3 MiB) passes per call
        assert sum(s.nbytes + d.nbytes for s, d in p.parts) == p.nbytes
        passes = p.timed()
        assert sorted(passes) == ["bound:copy:memcpy", "bound:copy:ufunc", "bound:read:max",
                                  "bound:read:or"]
        for kernel in ("memcpy", "ufunc"):  # both copy every byte
            p.dst[:] = 0
            passes[f"bound:copy:{kernel}"]()
            np.testing.assert_array_equal(p.dst, p.src)
        passes["bound:read:max"]()
        passes["bound:read:or"]()


def test_interleaved_counts_calls():
    calls = {"a": 0, "b": 0}

    def f(name):
        def g():
            calls[name] += 1
        return g
    med, samples, k = bench.interleaved({"a": f("a"), "b": f("b")}, rounds=3, min_time=0)
    assert set(med) == {"a", "b"} and k == {"a": 1, "b": 1}
    assert all(len(s) == 3 and med[n] == np.median(s) for n, s in samples.items())
    assert calls == {"a": 6, "b": 6}  # a warm-up, two calibration calls, three rounds


def test_cli_tiny_grid(tmp_path):
    """python -m bncore bench prints one row per cell and writes the JSON."""
    path = tmp_path / "b.json"
    env = dict(os.environ, PYTHONPATH=str(Path(bncore.__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-m", "bncore", "bench", "--quick", "--shapes", "16x8",
                        "--threads", "1", "--rounds", "1", "--min-time", "0", "--settle", "0",
                        "--no-peers", "--json", str(path)], capture_output=True, text=True,
                       env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and " NC " in ln]
    assert sorted(ln.split("|")[1].strip() for ln in rows) == sorted(bench.OPS)
    data = json.loads(path.read_text())
    assert [len(run["cells"]) for run in data["runs"]] == [4]
    assert "torch" not in data["runs"][0]["cells"][0]["median_s"]


def test_cases_are_one_tensor_in_two_layouts():
    nchw = bench.make_case("train", "NCHW", (2, 3, 4, 5), np.float32)
    nhwc = bench.make_case("train", "NHWC", (2, 3, 4, 5), np.float32)
    assert nhwc["x"].flags.c_contiguous and nhwc["axis"] == -1
    np.testing.assert_array_equal(nhwc["x"], np.moveaxis(nchw["x"], 1, -1))
    np.testing.assert_allclose(nhwc["save_mean"], nchw["save_mean"], rtol=1e-6)


def test_numpy_peer_against_float64_reference():
    """The NumPy peer (the reference the table compares with) is batch norm."""
    case = bench.make_case("backward", "NC", (64, 3), np.float64)
    dx, _, db = bench.numpy_impl(case)()
    x, dy, w = case["x"], case["dy"], case["weight"]
    h = 1e-6
    # finite differences of L = sum(dy * bn(x)) in one element of x
    def loss(xx):
        m, v = xx.mean(0), xx.var(0)
        return np.sum(dy * ((xx - m) / np.sqrt(v + bench.EPS) * w))
    xp, xm = x.copy(), x.copy()
    xp[5, 1] += h
    xm[5, 1] -= h
    assert dx[5, 1] == pytest.approx((loss(xp) - loss(xm)) / (2 * h), rel=1e-5)
    np.testing.assert_allclose(db, dy.sum(0))


def test_rel_err_detects_a_wrong_output():
    ref = (np.linspace(-2, 2, 50),)
    bad = (ref[0] + np.where(np.arange(50) == 7, 1e-3, 0.0),)
    assert bench.rel_err(ref, ref) == 0
    assert bench.rel_err(bad, ref) == pytest.approx(1e-3 / 2)


def test_torch_channels_last_peer_sees_channels_last_memory():
    torch = pytest.importorskip("torch")
    case = bench.make_case("eval", "NHWC", (2, 3, 4, 5), np.float32)
    f, to_numpy = bench.torch_impl(case, torch)
    (yt,) = f()
    assert yt.is_contiguous(memory_format=torch.channels_last)
    (y,) = to_numpy((yt,))
    assert y.shape == case["x"].shape and y.flags.c_contiguous


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--ops", "train,nope"],
                                  ["--shapes", "4x8x5"], ["--rounds", "0"],
                                  ["--dtype", "float16"]])
def test_bad_arguments_exit(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


# ---- benchmarks/: the target checker and the peer harnesses ------------------------------

def test_check_targets_reads_the_bench_json(tiny_run):
    ct = _harness("check_targets")
    data = json.loads(json.dumps(tiny_run))
    cell = next(c for c in data["runs"][0]["cells"] if c["op"] == "eval")
    cell["nbytes"] = 64 * MiB  # make it a large cell: the bound target applies
    cell["speedup"]["numpy"] = 20.0
    for ratio, verdict in ((1.10, "MET   "), (1.20, "MISSED")):
        cell["bound_ratio"]["bncore_out"] = ratio
        text, missed = ct.check([data])
        line = next(ln for ln in text.splitlines() if "x bound" in ln)
        assert line.startswith(verdict) and f"out= {ratio:.2f}x bound" in line
        assert text.endswith(f"{missed} missed")
    data["schema"] = 1
    with pytest.raises(ValueError, match="schema 2"):
        ct.check([data])


@pytest.mark.parametrize("op,shape", [("layer_norm", "3x5x16"), ("layer_norm_backward", "3x5x16"),
                                      ("group_norm", "2x64x3x3"),
                                      ("group_norm_backward", "2x64x3x3")])
def test_norm_peers_agree(op, shape):
    norms = _harness("norms")
    torch = pytest.importorskip("torch")
    fs = norms.impls(op, shape, n_threads=1, torch=torch, dtype="float64")
    assert set(fs) == {"numpy", "torch", "bncore", "bncore_out"}
    want = fs["bncore"]()
    want = want if isinstance(want, tuple) else (want,)
    for name in ("numpy", "torch", "bncore_out"):
        got = fs[name]()
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-9, atol=1e-9, err_msg=name)


def test_inference_harness_runs():
    inf = _harness("inference")
    res = inf.run(quick=True, parts=("rps", "memory"), rounds=1)
    assert set(res["rps"]) == {1, 8}
    assert all(v > 0 for per in res["rps"].values() for v in per.values())
    assert res["memory"]["saving_fraction"] > 0.3  # one of two buffers per block
    text = inf.report(res)
    assert "requests/s" in text and "InPlaceABN" in text
