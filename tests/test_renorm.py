"""Batch Renormalization against a float64 NumPy reference of the paper's
formulas, finite differences (r and d held constant) and plain batch norm."""
import numpy as np
import pytest

import bncore
import reference as ref
from reference import TOL


@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((4, 6, 5, 3), 1), ((4, 5, 3, 6), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_reference(rng, shape, axis, dtype):
    C = shape[axis]
    scales = rng.uniform(0.5, 2, C)
    x = (rng.standard_normal(shape) * scales.reshape(
        [C if i == axis % len(shape) else 1 for i in range(len(shape))]) + 1).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    # moving statistics chosen so that some r and d clip and some do not
    rv = ((scales * np.linspace(0.3, 3, C)) ** 2).astype(dtype)
    rm = (1 + np.linspace(-2, 2, C) * scales).astype(dtype)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd, r, d = bncore.batch_renorm_train(x, rm, rv, w, b, axis=axis, rmax=1.5,
                                                      dmax=0.5, momentum=0.2)
    y_ref, r_ref, d_ref = ref.renorm(x, rm0, rv0, w, b, axis, 1e-5, 1.5, 0.5)
    assert np.any(r_ref == 1.5) and np.any(r_ref == 1 / 1.5)
    assert np.any(np.abs(r_ref - 1) < 0.4) and np.any(np.abs(d_ref) < 0.5)
    assert np.any(d_ref == 0.5) and np.any(d_ref == -0.5)
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(r, r_ref, **TOL[dtype])
    np.testing.assert_allclose(d, d_ref, **TOL[dtype])
    assert y.dtype == r.dtype == d.dtype == mean.dtype == dtype
    _, m_ref, inv_ref, var_unbiased = ref.train(x, axis=axis)
    np.testing.assert_allclose(mean, m_ref, **TOL[dtype])
    np.testing.assert_allclose(invstd, inv_ref, **TOL[dtype])
    np.testing.assert_allclose(rm, 0.8 * rm0 + 0.2 * m_ref, **TOL[dtype])
    np.testing.assert_allclose(rv, 0.8 * rv0 + 0.2 * var_unbiased, **TOL[dtype])


@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((4, 6, 5, 3), 1), ((4, 5, 3, 6), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rmax_1_dmax_0_is_exactly_batch_norm(rng, shape, axis, dtype):
    C = shape[axis]
    x = (rng.standard_normal(shape) + 2).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    y, mean, invstd, r, d = bncore.batch_renorm_train(x, rm, rv, w, b, axis=axis, rmax=1.0,
                                                      dmax=0.0, momentum=0.1)
    y_bn, mean_bn, inv_bn = bncore.batch_norm_train(x, w, b, axis=axis, running_mean=rm2,
                                                    running_var=rv2, momentum=0.1)
    for a, c in ((y, y_bn), (mean, mean_bn), (invstd, inv_bn), (rm, rm2), (rv, rv2)):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(r, 1)
    np.testing.assert_array_equal(d, 0)
    dy = rng.standard_normal(shape).astype(dtype)
    got = bncore.batch_renorm_backward(dy, x, mean, invstd, r, d, w, axis=axis)
    want = bncore.batch_norm_backward(dy, x, mean_bn, inv_bn, w, axis=axis)
    for a, c in zip(got, want):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 2), -1)])
def test_backward_finite_differences_with_r_d_constant(rng, shape, axis):
    C = shape[axis]
    x = rng.standard_normal(shape) * 2 + 1
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.uniform(0.3, 3, C)
    g = rng.standard_normal(shape)
    _, mean, invstd, r, d = bncore.batch_renorm_train(x, rm.copy(), rv.copy(), w, b, axis=axis,
                                                      rmax=1.3, dmax=0.4, momentum=0.0)
    dx, dw, db = bncore.batch_renorm_backward(g, x, mean, invstd, r, d, w, axis=axis)

    def loss():  # r and d frozen at the values of the unperturbed batch
        return float(np.sum(ref.renorm(x, rm, rv, w, b, axis, r=r, d=d)[0] * g))

    ref.assert_grads(loss, ((x, dx), (w, dw), (b, db)))


def test_fused_activation(rng):
    x = rng.standard_normal((8, 4, 5)) + 0.5
    rm, rv = np.full(4, 0.3), np.full(4, 2.0)
    w, b = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    y, mean, invstd, r, d = bncore.batch_renorm_train(x, rm.copy(), rv.copy(), w, b,
                                                      activation="relu")
    y_ref, _, _ = ref.renorm(x, rm, rv, w, b, 1, 1e-5, 3.0, 5.0)
    np.testing.assert_allclose(y, np.maximum(y_ref, 0), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(x.shape)
    dx, dw, db = bncore.batch_renorm_backward(g, x, mean, invstd, r, d, w, activation="relu", y=y)
    gm = np.where(y > 0, g, 0)
    dx2, dw2, db2 = bncore.batch_renorm_backward(gm, x, mean, invstd, r, d, w)
    for a, c in ((dx, dx2), (dw, dw2), (db, db2)):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-12)


def test_schedule_follows_the_paper():
    layer = bncore.BatchRenorm(3)  # paper: (1, 0) for 5000 steps, rmax 3 at 40k, dmax 5 at 25k
    assert layer.limits(0) == (1.0, 0.0) and layer.limits(4999) == (1.0, 0.0)
    assert layer.limits(5000) == (1.0, 0.0)
    np.testing.assert_allclose(layer.limits(15000), (1 + 2 * 10000 / 35000, 5 * 10000 / 20000))
    np.testing.assert_allclose(layer.limits(25000), (1 + 2 * 20000 / 35000, 5.0))
    assert layer.limits(40000) == (3.0, 5.0) and layer.limits(10 ** 6) == (3.0, 5.0)
    assert bncore.BatchRenorm(3, warmup_steps=0, rmax_ramp_steps=0,
                              dmax_ramp_steps=0).limits(0) == (3.0, 5.0)


def test_layer_warmup_then_renorm_then_eval(rng):
    C = 4
    layer = bncore.BatchRenorm(C, momentum=0.3, rmax=2.0, dmax=1.0, warmup_steps=2,
                               rmax_ramp_steps=2, dmax_ramp_steps=4, dtype=np.float64)
    bn = bncore.BatchNorm(C, momentum=0.3, dtype=np.float64)
    layer.weight[:] = bn.weight[:] = rng.uniform(0.5, 1.5, C)
    for step in range(6):
        x = rng.standard_normal((5, C, 3)) * (1 + step) + step
        dy = rng.standard_normal(x.shape)
        rm0, rv0 = layer.running_mean.copy(), layer.running_var.copy()
        y = layer(x)
        dx = layer.backward(dy)
        if step < 2:  # warm-up: exactly batch norm
            np.testing.assert_array_equal(y, bn(x))
            np.testing.assert_array_equal(dx, bn.backward(dy))
            np.testing.assert_array_equal(layer.grad_weight, bn.grad_weight)
        else:
            rmax, dmax = 1 + min(1, (step - 2) / 2), min(1, (step - 2) / 4)
            y_ref, r, d = ref.renorm(x, rm0, rv0, layer.weight, layer.bias, 1, 1e-5, rmax, dmax)
            np.testing.assert_allclose(y, y_ref, rtol=1e-11, atol=1e-11)
            _, mean, invstd, _ = ref.train(x)
            want = bncore.batch_renorm_backward(dy, x, mean, invstd, r, d, layer.weight)
            np.testing.assert_allclose(dx, want[0], rtol=1e-11, atol=1e-12)
            np.testing.assert_allclose(layer.grad_weight, want[1], rtol=1e-11, atol=1e-12)
            bn(x)
        assert int(layer.num_batches_tracked) == step + 1
    layer.eval()
    x = rng.standard_normal((2, C, 3))
    np.testing.assert_allclose(layer(x), ref.evaluate(x, layer.running_mean, layer.running_var,
                                                      layer.weight, layer.bias), rtol=1e-12)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(layer.backward(dy),
                               ref.eval_backward(dy, layer.running_var, layer.weight), rtol=1e-12)
    assert sorted(layer.state_dict()) == sorted(bn.state_dict())


def test_errors_change_nothing(rng):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for kw, exc, word in [(dict(rmax=0.5), ValueError, "rmax"), (dict(dmax=-1.0), ValueError, "dmax"),
                          (dict(momentum=2.0), ValueError, "momentum"),
                          (dict(weight=np.ones(4)), ValueError, "weight"),
                          (dict(running_var=None), ValueError, "running_"),
                          (dict(running_mean=np.zeros(2)), ValueError, "running_mean"),
                          (dict(axis=2), ValueError, "axis")]:
        args = dict(running_mean=rm, running_var=rv)
        args.update(kw)
        with pytest.raises(exc, match=word):
            bncore.batch_renorm_train(x, **args)
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)
    with pytest.raises(ValueError, match="more than 1 value"):
        bncore.batch_renorm_train(x[:1], rm, rv)
    with pytest.raises(ValueError, match="r"):
        bncore.batch_renorm_backward(x, x, rm, rv, np.ones(2), np.zeros(3))
    with pytest.raises(ValueError, match="warmup_steps"):
        bncore.BatchRenorm(3, warmup_steps=-1)
