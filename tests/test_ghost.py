"""Ghost batch normalization (Hoffer et al. 2017): virtual_batch_size on the
training path and the BatchNorm layer, against a float64 NumPy reference of
per-ghost-batch batch norm and finite differences."""
import numpy as np
import pytest

import bncore
import reference as ref
from reference import GRAD_TOL, TOL


@pytest.mark.parametrize("shape,axis,v", [((12, 5), 1, 4), ((10, 3, 4, 5), 1, 4),
                                          ((9, 4, 3, 6), -1, 3), ((7, 3, 5), 1, 3),
                                          ((8, 6, 7), 2, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_backward_match_reference(rng, shape, axis, v, dtype):
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + np.arange(shape[0]).reshape(
        (-1,) + (1,) * (len(shape) - 1))).astype(dtype)  # ghost batches differ in mean
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                              running_var=rv, momentum=0.2,
                                              virtual_batch_size=v)
    K = len(ref.ghost_slices(shape[0], v))
    assert mean.shape == invstd.shape == (K, C) and mean.dtype == dtype
    y_ref, m_ref, inv_ref, var_u = ref.ghost_train(x, v, w, b, axis)
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(mean, m_ref, **TOL[dtype])
    np.testing.assert_allclose(invstd, inv_ref, **TOL[dtype])
    # running statistics move toward the average over ghost batches
    np.testing.assert_allclose(rm, 0.8 * rm0 + 0.2 * m_ref.mean(0), **TOL[dtype])
    np.testing.assert_allclose(rv, 0.8 * rv0 + 0.2 * var_u.mean(0), **TOL[dtype])
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                            virtual_batch_size=v)
    for got, want in zip((dx, dw, db), ref.ghost_backward(dy, x, m_ref, inv_ref, v, w, axis)):
        np.testing.assert_allclose(got, want, **GRAD_TOL[dtype])


def test_one_ghost_batch_is_plain_batch_norm(rng):
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    rm, rv, rm2, rv2 = np.zeros(4), np.ones(4), np.zeros(4), np.ones(4)
    y, m, inv = bncore.batch_norm_train(x, running_mean=rm, running_var=rv, virtual_batch_size=6)
    y2, m2, inv2 = bncore.batch_norm_train(x, running_mean=rm2, running_var=rv2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(m, m2[None])
    np.testing.assert_array_equal(inv, inv2[None])
    np.testing.assert_allclose(rm, rm2, rtol=1e-15)
    np.testing.assert_allclose(rv, rv2, rtol=1e-15)
    got = bncore.batch_norm_backward(dy, x, m, inv, virtual_batch_size=100)
    for a, c in zip(got, bncore.batch_norm_backward(dy, x, m2, inv2)):
        np.testing.assert_array_equal(a, c)


def test_finite_differences_and_fused_activation(rng):
    x = rng.standard_normal((6, 2, 3))
    w, b = rng.uniform(0.5, 1.5, 2), rng.standard_normal(2) * 0.3
    g = rng.standard_normal(x.shape)
    for act in (None, ("leaky_relu", 0.1)):
        def loss():
            return float(np.sum(bncore.batch_norm_train(x, w, b, virtual_batch_size=2,
                                                        activation=act)[0] * g))

        y, mean, invstd = bncore.batch_norm_train(x, w, b, virtual_batch_size=2, activation=act)
        grads = bncore.batch_norm_backward(g, x, mean, invstd, w, virtual_batch_size=2,
                                           activation=act, y=y)
        ref.assert_grads(loss, zip((x, w, b), grads), h=1e-7, atol=1e-6)


def test_layer_with_virtual_batch_size(rng):
    layer = bncore.BatchNorm(3, momentum=0.5, virtual_batch_size=4, dtype=np.float64)
    x = rng.standard_normal((8, 3, 5)) + np.arange(8).reshape(8, 1, 1)
    y = layer(x)
    y_ref, m_ref, inv_ref, _ = ref.ghost_train(x, 4, layer.weight, layer.bias)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, 0.5 * m_ref.mean(0), rtol=1e-12)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    dx_ref, dw_ref, _ = ref.ghost_backward(dy, x, m_ref, inv_ref, 4, layer.weight)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, dw_ref, rtol=1e-10)
    layer.eval()  # eval: the running statistics, no ghost batches
    np.testing.assert_allclose(layer(x), ref.evaluate(x, layer.running_mean, layer.running_var,
                                                      layer.weight, layer.bias), rtol=1e-12)
    np.testing.assert_allclose(layer.backward(dy),
                               ref.eval_backward(dy, layer.running_var, layer.weight), rtol=1e-12)


def test_errors_change_nothing(rng):
    x = rng.standard_normal((5, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for v, word in [(0, "virtual_batch_size"), (True, "virtual_batch_size"),
                    (2.0, "virtual_batch_size"), (2, "ghost batch of 1 sample")]:
        with pytest.raises(ValueError, match=word):
            bncore.batch_norm_train(x, running_mean=rm, running_var=rv, virtual_batch_size=v)
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)
    with pytest.raises(ValueError, match="axis"):
        bncore.batch_norm_train(x, axis=0, virtual_batch_size=2)
    _, m, inv = bncore.batch_norm_train(x, virtual_batch_size=5)
    with pytest.raises(ValueError, match="save_mean"):
        bncore.batch_norm_backward(x, x, m, inv, virtual_batch_size=3)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bncore.BatchNorm(3, virtual_batch_size=-1)
