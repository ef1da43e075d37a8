"""Smoke test of ``python -m bncore bench``: JSON structure and peers' agreement (no timing)."""
import json
import math

import numpy as np
import pytest

from bncore import bench

TINY = "4x8x5x5,16x8"
TOL = {"float32": 1e-4, "float64": 1e-10}


def _have(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_quick_json(tmp_path, dtype, capsys):
    path = tmp_path / "bench.json"
    bench.main(["--quick", "--json", str(path), "--threads", "1", "--dtype", dtype,
                "--shapes", TINY, "--rounds", "2", "--min-time", "0", "--settle", "0",
                "--bandwidth-mib", "32"])
    printed = capsys.readouterr().out
    data = json.loads(path.read_text())

    assert data["dtype"] == dtype and data["quick"] is True and data["rounds"] == 2
    assert data["machine"]["numpy"] == np.__version__
    [run] = data["runs"]
    assert run["threads"] == 1
    bw = run["bandwidth"]
    assert bw["read_GBps"] > 0 and bw["copy_GBps"] > 0

    expected = {(op, layout, tuple(shape)) for shape in ((4, 8, 5, 5), (16, 8))
                for layout in bench.layouts_for(shape) for op in bench.OPS}
    got = {(c["op"], c["layout"], tuple(c["shape"])) for c in run["cells"]}
    assert got == expected

    torch_ok = _have("torch")
    ort_ok = _have("onnxruntime") and _have("onnx")
    for c in run["cells"]:
        med = c["median_s"]
        want = {"bncore", "bncore_out", "bncore_inplace", "numpy"}
        want |= {"torch"} if torch_ok else set()
        want |= {"ort"} if ort_ok and c["op"] == "eval" and c["layout"] != "NHWC" else set()
        assert set(med) == want, c["op"]
        for name, t in med.items():
            assert math.isfinite(t) and t > 0, name
            assert len(c["samples_s"][name]) == 2
        # outputs: every peer and every bncore variant agrees with bncore's fresh output
        assert set(c["max_rel_err"]) == want
        for name, err in c["max_rel_err"].items():
            assert err <= TOL[dtype], (c["op"], c["layout"], c["shape"], name, err)
        # derived figures are consistent with the medians and the bandwidth model
        nbytes = int(np.prod(c["array_shape"])) * np.dtype(dtype).itemsize
        assert c["nbytes"] == nbytes
        assert c["bound_s"] == pytest.approx(bench.bound_seconds(c["op"], nbytes, bw))
        for peer in bench.PEERS:
            ratio = c["speedup"][peer]
            if peer in med:
                assert ratio == pytest.approx(med[peer] / med["bncore"])
            else:
                assert ratio is None
        assert c["bound_ratio"]["bncore_out"] == pytest.approx(med["bncore_out"] / c["bound_s"])
    # the printed table has one row per cell
    assert sum(line.startswith(("| train ", "| eval ", "| backward")) for line in
               printed.splitlines()) == len(expected)


def test_bound_model():
    bw = {"read_GBps": 20.0, "copy_GBps": 40.0}
    s = 4e8  # bytes
    assert bench.bound_seconds("eval", s, bw) == pytest.approx(2 * s / 40e9)
    assert bench.bound_seconds("train", s, bw) == pytest.approx(s / 20e9 + 2 * s / 40e9)
    assert bench.bound_seconds("backward", s, bw) == pytest.approx(2 * s / 20e9 + 3 * s / 40e9)
    assert bench.bound_seconds("backward_eval", s, bw) == pytest.approx(3 * s / 40e9)


def test_cases_are_one_tensor_in_two_layouts():
    nchw = bench.make_case("train", "NCHW", (2, 3, 4, 5), np.float32)
    nhwc = bench.make_case("train", "NHWC", (2, 3, 4, 5), np.float32)
    assert nhwc["x"].flags.c_contiguous and nhwc["axis"] == -1
    np.testing.assert_array_equal(nhwc["x"], np.moveaxis(nchw["x"], 1, -1))
    np.testing.assert_array_equal(nhwc["running_var"], nchw["running_var"])


def test_rel_err_detects_a_wrong_output():
    ref = (np.linspace(-2, 2, 50),)
    bad = (ref[0] + np.where(np.arange(50) == 7, 1e-3, 0.0),)
    assert bench.rel_err(ref, ref) == 0
    assert bench.rel_err(bad, ref) == pytest.approx(1e-3 / 2)


def test_torch_channels_last_peer_sees_channels_last_memory():
    torch = pytest.importorskip("torch")
    case = bench.make_case("eval", "NHWC", (2, 3, 4, 5), np.float32)
    impls, to_numpy = bench.torch_impls(case, torch)
    (yt,) = impls["torch"]()
    assert yt.is_contiguous(memory_format=torch.channels_last)
    (y,) = to_numpy((yt,))
    assert y.shape == case["x"].shape and y.flags.c_contiguous


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--ops", "train,nope"],
                                  ["--shapes", "4x8x5"], ["--rounds", "0"]])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
