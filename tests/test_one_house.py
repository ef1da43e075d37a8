"""Findings of the "one house" rework, each a bug on the old layout: a call
that was accepted with a wrong answer, left state half changed, or depended
on how the same call reached the kernels."""
import tracemalloc
import warnings

import numpy as np
import pytest

import bncore
import reference as ref


def _x(rng, shape=(6, 3, 5), dtype=np.float32):
    return (rng.standard_normal(shape) * 2 + 1).astype(dtype)


# 1. training forwards refuse an out that shares memory with running_mean
@pytest.mark.parametrize("op", ["renorm", "instance"])
def test_out_overlapping_running_statistics_is_refused(rng, op):
    x = _x(rng)
    out = np.empty_like(x)
    rm, rv = out[0, 0, :3], np.ones(3, np.float32)  # rm lives inside out
    rm[...] = 0.5
    before = out.copy(), rv.copy()
    with pytest.raises(ValueError, match="^out: expected an array separate from running_mean"):
        if op == "renorm":
            bncore.batch_renorm_train(x, rm, rv, out=out)
        else:
            bncore.instance_norm_train(x, running_mean=rm, running_var=rv, out=out)
    np.testing.assert_array_equal(out, before[0])
    np.testing.assert_array_equal(rv, before[1])


# 2. one invstd rule: eps = 0 on a constant channel gives invstd 0 everywhere
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_renorm_at_rmax_1_dmax_0_is_batch_norm_bitwise(rng, dtype, eps):
    x = _x(rng, dtype=dtype)
    x[:, 1] = 3.0  # a constant channel
    w = rng.uniform(0.5, 1.5, 3).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    rm, rv = np.zeros(3, dtype), np.zeros(3, dtype)  # sigma = 0 with eps = 0 too
    rm2, rv2 = rm.copy(), rv.copy()
    y, m, inv, r, d = bncore.batch_renorm_train(x, rm, rv, w, b, eps=eps, rmax=1.0, dmax=0.0,
                                                momentum=0.1)
    y_bn, m_bn, inv_bn = bncore.batch_norm_train(x, w, b, eps=eps, running_mean=rm2,
                                                 running_var=rv2, momentum=0.1)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y, y_bn)
    np.testing.assert_array_equal(inv, inv_bn)
    np.testing.assert_array_equal(rm, rm2)
    np.testing.assert_array_equal(rv, rv2)
    if eps == 0:
        np.testing.assert_array_equal(y[:, 1], np.broadcast_to(b[1], y[:, 1].shape))


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_sync_batch_norm_is_batch_norm_on_a_constant_channel(rng, eps):
    mpi = pytest.importorskip("mpi4py.MPI")
    from bncore.distributed import SyncBatchNorm
    x = _x(rng, (8, 3, 4), np.float64)
    x[:, 2] = -1.5
    a, s = bncore.BatchNorm(3, eps=eps, dtype=np.float64), SyncBatchNorm(
        3, eps=eps, dtype=np.float64, comm=mpi.COMM_SELF)
    for layer in (a, s):
        layer.weight[...] = [1.5, 0.5, 2.0]
        layer.bias[...] = [0.1, 0.2, 0.3]
    ya, ys = a(x), s(x)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(ys, ya, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(s.backward(dy), a.backward(dy), rtol=1e-12, atol=1e-12)
    assert np.isfinite(ys).all()
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(s, k), getattr(a, k), rtol=1e-13)


def test_eval_refuses_a_negative_variance_before_writing(rng):
    x = _x(rng)
    out = np.zeros_like(x)
    with pytest.raises(ValueError, match=r"^running_var: expected running_var \+ eps >= 0"):
        bncore.batch_norm_eval(x, np.zeros(3), np.array([1.0, -2.0, 1.0]), out=out)
    assert not out.any()
    # zero variance with eps = 0: invstd 0, y = bias (the training rule)
    y = bncore.batch_norm_eval(x, np.zeros(3), np.zeros(3), bias=np.arange(3.0), eps=0.0)
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(3.0, dtype=np.float32)[:, None],
                                                     x.shape))


# 3. refused forwards change nothing
def test_refused_recurrent_forward_keeps_gradients_and_saved_steps(rng):
    layer = bncore.RecurrentBatchNorm(3, 4)
    x = _x(rng, (2, 5, 3))
    layer(x)
    layer.backward(np.ones_like(x)[1:], 1)  # step 1 consumed, step 0 pending
    gw = layer.grad_weight.copy()
    with pytest.raises(ValueError, match="^n_threads"):
        layer(x, 0, n_threads=0)
    np.testing.assert_array_equal(layer.grad_weight, gw)
    layer.backward(np.ones_like(x)[0], 0)  # step 0 still there


def test_refused_eval_forward_keeps_the_ghost_backward(rng):
    layer = bncore.BatchNorm(3, virtual_batch_size=2)
    x = _x(rng)
    y = layer(x)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    want = layer.backward(dy)
    layer.eval()
    with pytest.raises(ValueError, match="^n_threads"):
        layer(x, n_threads=0)
    with pytest.raises(ValueError, match="^x: expected 3 channels"):
        layer(np.zeros((4, 5), np.float32))
    np.testing.assert_array_equal(layer.backward(dy), want)
    assert y.shape == x.shape


# 4. an eval-mode stream keeps nothing it does not need
def test_recurrent_eval_stream_does_not_grow(rng):
    layer = bncore.RecurrentBatchNorm(64, 8).eval()
    x = _x(rng, (64, 64))  # 16 KiB a step
    for t in range(1, 20):
        layer(x, t)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for t in range(20, 420):
        layer(x, t)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    # at most EVAL_HISTORY = 64 steps of 16 KiB stay (1 MiB); the old layout kept
    # all 400 (6.5 MiB)
    assert grown < 1_500_000, f"{grown} bytes kept over 400 steps"
    assert len(layer._steps) == layer.EVAL_HISTORY


# 5. whether a call is refused does not depend on memory layout
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("eps", [float("inf"), float("nan"), -1.0])
def test_bad_eps_is_refused_in_any_layout(rng, order, eps):
    x = np.asarray(_x(rng, (6, 3)), order=order)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for call in (lambda: bncore.batch_norm_eval(x, rm, rv, eps=eps),
                 lambda: bncore.batch_norm_train(x, eps=eps, running_mean=rm, running_var=rv)):
        with pytest.raises(ValueError, match="^eps: expected"):
            call()
    np.testing.assert_array_equal(rm, 0)


# 9. argument rules that were missing
def test_bool_axis_is_refused(rng):
    x = _x(rng)
    with pytest.raises(TypeError, match="^axis: expected an int, got bool"):
        bncore.batch_norm_train(x, axis=True)
    with pytest.raises(TypeError, match="^axis: expected an int, got bool"):
        bncore.batch_norm_train(np.asfortranarray(x), axis=True)


@pytest.mark.parametrize("count", [np.uint64(2**64 - 1), np.int64(-1), -5])
def test_state_dict_counts_out_of_range_are_refused(count):
    layer = bncore.BatchNorm(3)
    state = layer.state_dict()
    state["num_batches_tracked"] = np.array(count)
    state["running_mean"] = np.full(3, 7.0, np.float32)
    with pytest.raises(ValueError, match=r"^state\['num_batches_tracked'\]: expected a count"):
        layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.running_mean, 0)  # nothing assigned


def test_masked_arrays_are_refused(rng):
    x = np.ma.masked_array(_x(rng, (6, 3)), mask=np.zeros((6, 3), bool))
    x.mask[0, 0] = True
    with pytest.raises(TypeError, match="^x: expected a numpy.ndarray, got a numpy.ma.MaskedArray"):
        bncore.batch_norm_train(x)
    with pytest.raises(TypeError, match="^weight: expected a numpy.ndarray, got a numpy.ma"):
        bncore.batch_norm_train(x.data, np.ma.masked_array(np.ones(3)))


def test_self_overlapping_out_is_refused(rng):
    x = _x(rng, (6, 3))
    out = np.lib.stride_tricks.as_strided(np.zeros(3, np.float32), (6, 3), (0, 4),
                                          writeable=True)
    with pytest.raises(ValueError, match="^out: expected an array whose elements do not overlap"):
        bncore.batch_norm_eval(x, np.zeros(3), np.ones(3), out=out)


# 10. steps past training use the last trained step's statistics
def test_recurrent_eval_past_training_uses_the_last_trained_step(rng):
    layer = bncore.RecurrentBatchNorm(3, max_steps=10, momentum=1.0)
    xs = np.stack([_x(rng, (16, 3)) + 3 * t for t in range(4)])  # trained on 4 steps
    layer(xs)
    assert int(layer.trained_steps) == 4
    layer.eval()
    x = _x(rng, (5, 3)) + 9
    w, b = layer.weight, layer.bias
    for t in (3, 4, 9, 50):
        want = ref.evaluate(x, layer.running_mean[3], layer.running_var[3], w, b)
        np.testing.assert_allclose(layer(x, t), want, rtol=1e-5, atol=1e-5)
    # the count travels with the state dict
    other = bncore.RecurrentBatchNorm(3, max_steps=10)
    other.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(other.eval()(x, 7), layer(x, 7))


# 11. an empty batch gives an empty output, not NaN running statistics
def test_instance_norm_empty_batch_leaves_running_statistics():
    layer = bncore.InstanceNorm(3, track_running_stats=True, affine=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(np.zeros((0, 3, 4), np.float32))
        dx = layer.backward(np.zeros((0, 3, 4), np.float32))
    assert y.shape == dx.shape == (0, 3, 4) and y.dtype == dx.dtype == np.float32
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    np.testing.assert_array_equal(layer.grad_weight, 0)
    np.testing.assert_array_equal(layer.grad_bias, 0)


def test_instance_norm_running_variance_is_exact(rng):
    # the running variance comes from M2, not from 1/invstd^2 - eps
    x = (rng.standard_normal((4, 2, 50)) * 1e-4 + 3).astype(np.float64)
    rm, rv = np.zeros(2), np.ones(2)
    bncore.instance_norm_train(x, running_mean=rm, running_var=rv, momentum=1.0, eps=1.0)
    np.testing.assert_allclose(rv, x.var(2, ddof=1).mean(0), rtol=1e-10)
    np.testing.assert_allclose(rm, x.mean(2).mean(0), rtol=1e-14)


def test_sync_batch_norm_repr_names_its_class_once():
    mpi = pytest.importorskip("mpi4py.MPI")
    from bncore.distributed import SyncBatchNorm
    r = repr(SyncBatchNorm(3, comm=mpi.COMM_SELF))
    assert r.startswith("SyncBatchNorm(3, ") and "SyncSync" not in r and "ranks=1" in r


# 7. a float32 spread below FLT_MIN with eps = 0: the float64 answer, not +-inf
def test_subnormal_spread_float32_gives_the_float64_answer(rng):
    x = (2e-39 + rng.standard_normal((16, 3, 5)) * 1e-39).astype(np.float32)  # subnormal
    x64 = x.astype(np.float64)
    assert np.std(x64, axis=(0, 2)).max() < 1e-38
    y = bncore.batch_norm_train(x, eps=0.0)[0]
    np.testing.assert_allclose(y, ref.train(x64, eps=0.0)[0], rtol=1e-5, atol=1e-5)
    y = bncore.layer_norm(x, (3, 5), eps=0.0)
    want = (x64 - x64.mean((1, 2), keepdims=True)) / x64.std((1, 2), keepdims=True)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    y = bncore.group_norm(x, 3, eps=0.0)
    want = (x64 - x64.mean(2, keepdims=True)) / x64.std(2, keepdims=True)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
