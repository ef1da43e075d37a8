"""Exact population statistics (bncore.precise): PopulationStats against
float64 NumPy over the concatenated batches, merges in any order and split,
the writes into layers and state dicts (PyTorch's where installed),
collect_population_stats / precise_batch_norm over a small net, refusals
that leave every state as it was, and MPI shards under mpiexec."""
import numpy as np
import pytest
import reference as ref

import bncore
from bncore.precise import PopulationStats


def _batches(rng, C, sizes, layout="NC", mean=1e4, dtype=np.float32):
    """Batches of float32 channels at |mean| >> std (spread 1..3), uneven sizes."""
    shift = mean * (1 + np.arange(C))
    spread = 1 + np.arange(C) % 3
    out = []
    for n in sizes:
        shape = {"NC": (n, C), "NCHW": (n, C, 3, 2), "NHWC": (n, 3, 2, C)}[layout]
        axis = -1 if layout == "NHWC" else 1
        _, bshape = ref.axes(np.empty(shape), axis)
        x = rng.standard_normal(shape) * spread.reshape(bshape) + shift.reshape(bshape)
        # a drift between batches: the spread of the batch means is part of the population
        out.append((x + rng.standard_normal() * 0.5).astype(dtype))
    return out


def _assert_exact(stats, batches, axis, rtol=1e-12):
    count, mean, m2 = ref.stats(np.concatenate(batches, axis=0), axis)
    assert stats.count == count
    np.testing.assert_allclose(stats.mean, mean, rtol=rtol, atol=0)
    np.testing.assert_allclose(stats.biased_var, m2 / count, rtol=rtol * 100, atol=0)
    np.testing.assert_allclose(stats.var, m2 / (count - 1), rtol=rtol * 100, atol=0)


@pytest.mark.parametrize("layout, axis", [("NC", 1), ("NCHW", 1), ("NHWC", -1)])
def test_float32_population_at_large_mean_is_exact(rng, layout, axis):
    batches = _batches(rng, 5, [7, 1, 16, 3, 0, 9], layout)
    stats = PopulationStats(5, axis=axis)
    for x in batches:
        assert stats.update(x) is stats
    _assert_exact(stats, batches, axis)
    # the average of per-batch statistics (update_bn) is not the population variance
    per_batch = [ref.stats(x, axis) for x in batches if len(x) > 1]
    avg_var = np.mean([m2 / (n - 1) for n, _, m2 in per_batch], axis=0)
    assert np.max(np.abs(avg_var / stats.var - 1)) > 1e-3


def test_tuple_channel_axes(rng):
    """axis=(1, 2): the product of two adjacent axes is the channel dimension."""
    batches = [(rng.standard_normal((n, 2, 3, 5)) * 2 + 50).astype(np.float32) for n in (3, 4)]
    stats = PopulationStats(6, axis=(1, 2))
    for x in batches:
        stats.update(x)
    _assert_exact(stats, [x.reshape(len(x), 6, 5) for x in batches], 1)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_dtypes(rng, dtype):
    batches = _batches(rng, 3, [4, 5], mean=10.0, dtype=dtype)
    stats = PopulationStats(3)
    for x in batches:
        stats.update(x, n_threads=1)
    _assert_exact(stats, batches, 1, rtol=1e-11)


def test_merge_order_and_splits(rng):
    batches = _batches(rng, 4, [3, 8, 1, 5, 2, 6])
    parts = [PopulationStats(4).update(x) for x in batches]
    one = PopulationStats(4)
    for p in parts:
        one.merge(p)
    rev = PopulationStats(4)
    for p in reversed(parts):
        rev.merge(p)
    halves = PopulationStats(4).update(np.concatenate(batches[:3])).merge(
        PopulationStats(4).update(np.concatenate(batches[3:])))
    for s in (one, rev, halves):
        _assert_exact(s, batches, 1)
    # merging leaves the other side alone, and an empty one adds nothing
    before = (parts[0].count, parts[0].mean)
    one.merge(PopulationStats(4))
    assert parts[0].count == before[0] and np.array_equal(parts[0].mean, before[1])
    _assert_exact(one, batches, 1)


def test_one_value_and_empty():
    stats = PopulationStats(2)
    assert stats.count == 0
    for prop in ("mean", "var", "biased_var"):
        with pytest.raises(ValueError, match="stats: expected statistics of at least one"):
            getattr(stats, prop)
    stats.update(np.array([[3.0, -1.0]]))
    # one value: no Bessel correction (the library's running-update rule)
    assert stats.var.tolist() == [0.0, 0.0] and stats.mean.tolist() == [3.0, -1.0]


def test_update_refusals_leave_the_statistics(rng):
    stats = PopulationStats(3).update(rng.standard_normal((4, 3)))
    snap = (stats.count, stats.mean, stats.var)
    with pytest.raises(ValueError, match="x: expected 3 channels on axis 1"):
        stats.update(np.ones((4, 5)))
    with pytest.raises(TypeError, match="x: expected dtype float16, float32 or float64"):
        stats.update(np.ones((4, 3), np.int64))
    with pytest.raises(ValueError, match="n_threads"):
        stats.update(np.ones((4, 3)), n_threads=0)
    with pytest.raises(ValueError, match="other: expected statistics of 3 channels, got 2"):
        stats.merge(PopulationStats(2).update(np.ones((2, 2))))
    with pytest.raises(TypeError, match="other: expected a PopulationStats"):
        stats.merge(np.ones(3))
    assert stats.count == snap[0]
    assert np.array_equal(stats.mean, snap[1]) and np.array_equal(stats.var, snap[2])
    with pytest.raises(ValueError, match="num_features"):
        PopulationStats(0)
    with pytest.raises(TypeError, match="axis: expected an int"):
        PopulationStats(2, axis=1.0)


# ---- writing the statistics ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("unbiased", [True, False])
def test_write_to_layer(rng, dtype, unbiased):
    batches = _batches(rng, 3, [5, 6], mean=3.0)
    stats = PopulationStats(3)
    for x in batches:
        stats.update(x)
    bn = bncore.BatchNorm(3, dtype=dtype, running_var_unbiased=unbiased)
    bn.num_batches_tracked[...] = 7
    stats.write_to(bn)
    count, mean, m2 = ref.stats(np.concatenate(batches))
    var = m2 / (count - 1) if unbiased else m2 / count
    assert bn.running_mean.dtype == dtype and int(bn.num_batches_tracked) == 7
    np.testing.assert_array_equal(bn.running_mean, stats.mean.astype(dtype))
    np.testing.assert_allclose(bn.running_var, var, **ref.tol(dtype))
    frozen = bncore.FrozenBatchNorm(3, eps=0.0, dtype=np.float64)
    stats.write_to(frozen)  # recomputes its folded coefficients
    np.testing.assert_allclose(frozen.scale, 1 / np.sqrt(m2 / (count - 1)), rtol=1e-12)


def test_write_to_refusals_leave_the_layer(rng):
    stats = PopulationStats(3)
    bn = bncore.BatchNorm(3)
    before = bn.state_dict()
    with pytest.raises(ValueError, match="stats: expected statistics of at least one value"):
        stats.write_to(bn)
    stats.update(rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match=r"layer: expected running statistics of shape \(3,\)"):
        stats.write_to(bncore.BatchNorm(4))
    for other in (bncore.LayerNorm(3), bncore.BatchNorm(3, track_running_stats=False),
                  bncore.RecurrentBatchNorm(3, max_steps=2)):
        with pytest.raises((TypeError, ValueError), match="layer: expected"):
            stats.write_to(other)
    after = bn.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_state_dicts(rng):
    x = rng.standard_normal((6, 2)) * 3 + 1
    stats = PopulationStats(2).update(x)
    sd = stats.state_dict("net.bn.")
    assert sorted(sd) == ["net.bn.running_mean", "net.bn.running_var"]
    np.testing.assert_allclose(sd["net.bn.running_var"], x.var(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(stats.state_dict(unbiased=False)["running_var"], x.var(0),
                               rtol=1e-12)
    state = {"a.weight": np.ones(2, np.float32),
             **{f"a.{k}": v for k, v in bncore.BatchNorm(2).state_dict().items()}}
    stats.write_to_state_dict(state, "a.")
    assert state["a.running_var"].dtype == np.float32
    np.testing.assert_allclose(state["a.running_var"], x.var(0, ddof=1), rtol=1e-6)
    # refused: nothing changes
    snap = {k: v.copy() for k, v in state.items()}
    with pytest.raises(KeyError, match="state: missing key 'b.running_mean'"):
        stats.write_to_state_dict(state, "b.")
    with pytest.raises(ValueError, match=r"state\['a.weight'\]|state\['a.running_mean'\]"):
        PopulationStats(3).update(np.ones((2, 3))).write_to_state_dict(state, "a.")
    with pytest.raises(TypeError, match="state: expected a mutable mapping"):
        stats.write_to_state_dict([1, 2])
    assert all(np.array_equal(snap[k], state[k]) for k in state)


def test_torch_state_dict(rng):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 2 + 7
    stats = PopulationStats(3).update(x)
    state = module.state_dict()
    stats.write_to_state_dict(state, "1.")
    assert state["1.running_var"].dtype == torch.float32
    module.load_state_dict(state)
    np.testing.assert_allclose(module[1].running_var.numpy(),
                               x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
                               .var(1, ddof=1), rtol=1e-6)


# ---- whole networks ------------------------------------------------------------------------

class _Net:
    """bn1 -> linear -> bn2 (a bncore layer pair) with fixed weights."""

    def __init__(self, rng, dtype=np.float64, first=bncore.BatchNorm):
        self.bn1 = first(4, dtype=dtype)
        self.bn2 = bncore.BatchNorm(3, dtype=dtype, momentum=0.3)
        self.bn1.weight[:] = rng.uniform(0.5, 2, 4)
        self.bn1.bias[:] = rng.standard_normal(4)
        self.w = rng.standard_normal((4, 3)).astype(dtype)

    def __call__(self, x):
        return self.bn2(self.bn1(x) @ self.w)


def _inputs_of_bn2(net, batches):
    """float64 reference: bn2's input, batch by batch, with bn1 in training mode."""
    return [ref.train(x, net.bn1.weight, net.bn1.bias, eps=net.bn1.eps)[0] @ net.w
            for x in batches]


def test_collect_population_stats_over_a_net(rng):
    net = _Net(rng)
    warm = rng.standard_normal((8, 4)) * 2 + 5
    net(warm)  # running statistics that are not the population's
    net.bn2.eval()
    before = [layer.state_dict() for layer in (net.bn1, net.bn2)]
    batches = [rng.standard_normal((n, 4)) * 2 + 5 + 0.3 * rng.standard_normal()
               for n in (6, 9, 4, 12)]
    with bncore.collect_population_stats([net.bn1, net.bn2]) as stats:
        assert net.bn1.training and net.bn2.training
        for x in batches:
            net(x)
            # running statistics untouched while collecting
            for layer, b in zip((net.bn1, net.bn2), before):
                assert np.array_equal(layer.running_mean, b["running_mean"])
                assert int(layer.num_batches_tracked) == int(b["num_batches_tracked"])
        assert [s.count for s in stats] == [31, 31]
    assert net.bn1.training and not net.bn2.training  # modes restored
    assert "_observers" not in vars(net.bn1)
    assert int(net.bn2.num_batches_tracked) == 1
    for layer, inputs in ((net.bn1, batches), (net.bn2, _inputs_of_bn2(net, batches))):
        count, mean, m2 = ref.stats(np.concatenate(inputs))
        np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_var, m2 / (count - 1), rtol=1e-11)
    # forwards after the block record nothing and move the running statistics again
    net(batches[0])
    assert stats[0].count == 31 and int(net.bn1.num_batches_tracked) == 2


def test_precise_batch_norm_matches_the_context_manager(rng):
    batches = [rng.standard_normal((n, 4)).astype(np.float32) * 3 + 100 for n in (5, 7, 3)]
    nets = [_Net(np.random.default_rng(1), np.float32) for _ in range(2)]
    stats = bncore.precise_batch_norm([nets[0].bn1, nets[0].bn2], iter(batches), nets[0])
    with bncore.collect_population_stats((nets[1].bn1, nets[1].bn2)):
        for x in batches:
            nets[1](x)
    for a, b in zip((nets[0].bn1, nets[0].bn2), (nets[1].bn1, nets[1].bn2)):
        assert np.array_equal(a.running_var, b.running_var)
    assert stats[0].count == 15


def test_inplace_abn_inputs_are_seen_before_they_are_overwritten(rng):
    abn = bncore.InPlaceABN(3, dtype=np.float64)
    batches = [rng.standard_normal((5, 3)) * 2 + 4 for _ in range(3)]
    with bncore.collect_population_stats(abn):
        for x in batches:
            abn(x.copy())
    count, mean, m2 = ref.stats(np.concatenate(batches))
    np.testing.assert_allclose(abn.running_var, m2 / (count - 1), rtol=1e-12)


def test_refused_forward_inside_is_not_recorded(rng):
    bn = bncore.BatchNorm(3, dtype=np.float64)
    x = rng.standard_normal((5, 3))
    with bncore.collect_population_stats([bn]) as (stats,):
        bn(x)
        with pytest.raises(ValueError, match="x: expected 3 channels"):
            bn(np.ones((5, 4)))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn(np.ones((1, 3)))  # the layer refuses it after the observer looked
        assert stats.count == 5
    np.testing.assert_allclose(bn.running_var, x.var(0, ddof=1), rtol=1e-12)


def test_an_escaping_exception_restores_everything(rng):
    net = _Net(rng)
    net(rng.standard_normal((6, 4)))
    net.bn1.eval()
    before = [layer.state_dict() for layer in (net.bn1, net.bn2)]
    with pytest.raises(RuntimeError, match="boom"):
        with bncore.collect_population_stats([net.bn1, net.bn2]):
            net(rng.standard_normal((6, 4)))
            raise RuntimeError("boom")
    for layer, b in zip((net.bn1, net.bn2), before):
        after = layer.state_dict()
        assert all(np.array_equal(after[k], b[k]) for k in b)
        assert "_observers" not in vars(layer)
    assert not net.bn1.training and net.bn2.training


def test_a_layer_without_input_is_refused_at_the_end(rng):
    a, b = bncore.BatchNorm(2), bncore.BatchNorm(2)
    snap = b.state_dict()
    with pytest.raises(ValueError, match=r"layers\[1\]: expected statistics of at least one "
                                         r"value per channel, got count 0 \(no forward"):
        with bncore.collect_population_stats([a, b]):
            a(rng.standard_normal((4, 2)).astype(np.float32))
    assert np.array_equal(a.running_mean, np.zeros(2))  # nothing written to any layer
    assert all(np.array_equal(b.state_dict()[k], snap[k]) for k in snap)


def test_collect_refusals():
    bn = bncore.BatchNorm(2)
    with pytest.raises(TypeError, match=r"layers\[1\]: expected a BatchNorm-family layer"):
        with bncore.collect_population_stats([bn, bncore.LayerNorm(2)]):
            pass
    with pytest.raises(ValueError, match="layers: expected each layer once"):
        with bncore.collect_population_stats([bn, bn]):
            pass
    with pytest.raises(ValueError, match=r"layers\[0\]: expected a layer with running"):
        with bncore.collect_population_stats([bncore.BatchNorm(2, track_running_stats=False)]):
            pass
    with pytest.raises(TypeError, match="layers: expected a BatchNorm layer or an iterable"):
        with bncore.collect_population_stats(bncore.FrozenBatchNorm(2)):
            pass
    with pytest.raises(TypeError, match="comm: expected an mpi4py communicator"):
        with bncore.collect_population_stats([bn], comm=object()):
            pass
    with pytest.raises(TypeError, match="forward: expected a callable"):
        bncore.precise_batch_norm([bn], [], None)
    assert "_observers" not in vars(bn) and int(bn.num_batches_tracked) == 0


# ---- MPI -----------------------------------------------------------------------------------

def test_allreduce_on_one_rank(rng):
    MPI = pytest.importorskip("mpi4py.MPI")
    x = rng.standard_normal((5, 2))
    stats = PopulationStats(2).update(x)
    mean = stats.mean
    assert np.array_equal(stats.allreduce(MPI.COMM_SELF).mean, mean) and stats.count == 5
    with pytest.raises(TypeError, match="comm: expected an mpi4py communicator"):
        stats.allreduce(None)


@pytest.mark.parametrize("n", [2, 3])
def test_population_stats_under_mpiexec(n):
    from test_distributed import MPI_SCRIPTS, run_mpi
    out = run_mpi(n, MPI_SCRIPTS / "check_precise.py")
    assert out.count("population statistics checks passed") == n, out


# ---- the guide -----------------------------------------------------------------------------

def test_docs_page_runs():
    """docs/population_statistics.md's code runs; its numbers are checked against NumPy."""
    import os
    import re
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "population_statistics.md")
    with open(path, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 2
    ns = {}
    exec(compile(blocks[0], path, "exec"), ns)
    whole = np.concatenate(ns["batches"]).astype(np.float64)
    np.testing.assert_allclose(ns["bn"].running_var, whole.var(0, ddof=1), rtol=1e-6)
    assert sorted(ns["state"]) == ["layer1.bn.running_mean", "layer1.bn.running_var"]
    exec(compile(blocks[1], path, "exec"), ns)
    np.testing.assert_allclose(ns["bn1"].running_mean, whole.mean(0), rtol=1e-7)
    assert ns["s2"].count == len(whole)


def test_docs_export_section_runs():
    """The export example of docs/inference.md runs (it asserts onnxruntime's output)."""
    import os
    import re
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "inference.md")
    with open(path, encoding="utf-8") as f:
        blocks = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S)
                  if "batch_norm_to_torch" in b]
    assert len(blocks) == 1
    ns = {}
    exec(compile(blocks[0], path, "exec"), ns)
    np.testing.assert_array_equal(ns["torch_bn"].running_var.numpy(), ns["bn"].running_var)


def test_masked_batches_count_each_channel_its_own_values(rng):
    """Padded batches: the population statistics of the unmasked values
    (float64 over their concatenation), also through a layer's forward."""
    C, T = 3, 6
    xs = [(rng.standard_normal((n, C, T)) * 0.5 + 1e4).astype(np.float32) for n in (4, 7, 2)]
    lens = [rng.integers(0, T + 1, x.shape[0]) for x in xs]
    stats = bncore.PopulationStats(C)
    for x, n in zip(xs, lens):
        stats.update(x, lengths=n)
    masks = [np.arange(T)[None, None, :] < n[:, None, None] for n in lens]
    vals = [np.concatenate([x[:, c][np.broadcast_to(m, x.shape)[:, c]] for x, m
                            in zip(xs, masks)]).astype(np.float64) for c in range(C)]
    assert stats.count == vals[0].size
    np.testing.assert_allclose(stats.mean, [v.mean() for v in vals], rtol=1e-12)
    np.testing.assert_allclose(stats.var, [v.var(ddof=1) for v in vals], rtol=1e-6)
    # a channel masked differently: per-channel counts
    other = bncore.PopulationStats(C)
    m = np.ones((5, C, T), bool)
    m[:, 0, 3:] = False
    other.update(xs[1][:5], mask=m)
    np.testing.assert_array_equal(other.count, [15, 30, 30])
    layer = bncore.BatchNorm(C)
    with bncore.collect_population_stats([layer]) as (seen,):
        for x, n in zip(xs, lens):
            layer(x, lengths=n)
    np.testing.assert_allclose(seen.mean, stats.mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, stats.var.astype(np.float32), rtol=1e-6)
