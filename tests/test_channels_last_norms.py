"""Group and instance norm on any channel axis (channels last, a middle axis,
several adjacent axes as one), and batch norm's tuple axes: float64 NumPy
reference, finite differences, PyTorch on a permuted copy, float32 far from
zero, thread-count bit identity, refusals that change nothing, and the
layers."""
import os
import re

import numpy as np
import pytest

import bncore
import reference as ref
from reference import GRAD_TOL as GTOL
from reference import TOL

# (x's shape, num_groups, axis): channels last (NHWC, NLC), a middle axis,
# tuple axes, and sizes that take several row blocks per sample (S*C over
# 16384) or one row per block (C over 16384)
CASES = [
    ((3, 5, 7, 8), 4, -1), ((2, 9, 6), 3, -1), ((2, 9, 6), 6, 2), ((4, 3, 2), 1, -1),
    ((2, 5, 8, 3), 2, 2), ((2, 3, 4, 6, 5), 3, 3),
    ((2, 4, 5, 4, 2), 4, (-2, -1)), ((3, 2, 3, 7), 3, (1, 2)), ((2, 3, 2, 2, 4), 2, (2, 3)),
    ((2, 40, 30, 32), 8, -1), ((2, 3, 20000), 4, -1), ((2, 70, 3, 70), 3, 2),
]
IDS = ["x".join(map(str, s)) + f"-g{G}-ax{a}" for s, G, a in CASES]


def _channels(shape, axis):
    ax = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([shape[a] for a in ax]))


def _data(rng, shape, dtype, scale=2.0, offset=-3.0):
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


# ---- group norm against the float64 reference ---------------------------------------------

@pytest.mark.parametrize("shape,G,axis", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_reference(rng, shape, G, axis, dtype, affine):
    C = _channels(shape, axis)
    x = _data(rng, shape, dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    b = rng.standard_normal(C).astype(dtype) if affine else None
    y, mean, invstd = bncore.group_norm_train(x, G, w, b, eps=1e-3, axis=axis)
    y_ref, m_ref, inv_ref = ref.group_norm_axis(x, G, w, b, eps=1e-3, axis=axis)
    assert y.shape == x.shape and y.dtype == mean.dtype == invstd.dtype == dtype
    assert mean.shape == invstd.shape == (shape[0], G)
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(mean, m_ref, **TOL[dtype])
    np.testing.assert_allclose(invstd, inv_ref, **TOL[dtype])
    np.testing.assert_array_equal(bncore.group_norm(x, G, w, b, eps=1e-3, axis=axis), y)

    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = bncore.group_norm_backward(dy, x, G, mean, invstd, w, axis=axis)
    want = ref.group_norm_axis_backward(dy, x, G, m_ref, inv_ref, w, axis=axis)
    assert dx.shape == x.shape and dw.shape == db.shape == (C,) and dw.dtype == dtype
    for got, exp in zip((dx, dw, db), want):
        np.testing.assert_allclose(got, exp, **GTOL[dtype])


@pytest.mark.parametrize("shape,G,axis", [((2, 3, 4), 2, -1), ((2, 3, 4, 2), 2, 2),
                                          ((2, 2, 2, 3), 3, (2, 3)), ((2, 3, 2, 2), 1, (1, 2))])
def test_group_norm_finite_differences(rng, shape, G, axis):
    C = _channels(shape, axis)
    x = rng.standard_normal(shape)
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    g = rng.standard_normal(shape)
    _, mean, invstd = bncore.group_norm_train(x, G, w, b, axis=axis)
    grads = bncore.group_norm_backward(g, x, G, mean, invstd, w, axis=axis)
    ref.assert_grads(lambda: float(np.sum(bncore.group_norm(x, G, w, b, axis=axis) * g)),
                     zip((x, w, b), grads))


def test_channels_last_equals_channels_first(rng):
    # the same numbers through the row kernels (NCHW) and the channels-last kernels
    x = rng.standard_normal((3, 8, 6, 5))
    w, b = rng.uniform(0.5, 1.5, 8), rng.standard_normal(8)
    dy = rng.standard_normal(x.shape)
    y, m, inv = bncore.group_norm_train(x, 4, w, b)
    xl, dyl = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy()
    yl, ml, invl = bncore.group_norm_train(xl, 4, w, b, axis=-1)
    np.testing.assert_allclose(np.moveaxis(yl, -1, 1), y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ml, m, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(invl, inv, rtol=1e-13)
    dx, dw, db = bncore.group_norm_backward(dy, x, 4, m, inv, w)
    dxl, dwl, dbl = bncore.group_norm_backward(dyl, xl, 4, ml, invl, w, axis=-1)
    np.testing.assert_allclose(np.moveaxis(dxl, -1, 1), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dwl, dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dbl, db, rtol=1e-12, atol=1e-12)


def test_strided_input_out_and_in_place(rng):
    base = rng.standard_normal((2, 6, 4, 5)).astype(np.float32)
    xl = base.transpose(0, 2, 3, 1)  # a channels-last view of NCHW memory: not contiguous
    w = rng.uniform(0.5, 1.5, 6)
    y_ref = ref.group_norm_axis(xl, 3, w, None, axis=-1)[0]
    y = bncore.group_norm(xl, 3, w, axis=-1)
    np.testing.assert_allclose(y, y_ref, **TOL[np.float32])
    out = np.empty_like(xl)
    assert bncore.group_norm(xl, 3, w, axis=-1, out=out) is out
    np.testing.assert_array_equal(out, y)
    xc = np.ascontiguousarray(xl)
    bncore.group_norm(xc, 3, w, axis=-1, out=xc)  # in place
    np.testing.assert_array_equal(xc, y)
    # backward in place: dx written over dy
    x = np.ascontiguousarray(xl)
    _, m, inv = bncore.group_norm_train(x, 3, w, axis=-1)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = bncore.group_norm_backward(dy, x, 3, m, inv, w, axis=-1)[0]
    bncore.group_norm_backward(dy, x, 3, m, inv, w, axis=-1, out=dy)
    np.testing.assert_array_equal(dy, dx)


def test_float16_channels_last(rng):
    x = _data(rng, (2, 5, 6), np.float16)
    y, m, inv = bncore.group_norm_train(x, 2, axis=-1)
    assert y.dtype == np.float16 and m.dtype == np.float32
    np.testing.assert_allclose(y, ref.group_norm_axis(x, 2, axis=-1)[0], **TOL[np.float16])


# ---- instance norm --------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((3, 6, 5, 4), -1), ((2, 7, 5), -1), ((2, 4, 3, 5), 2),
                                        ((2, 6, 2, 3), (2, 3)), ((2, 3, 2, 9), (1, 2))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_instance_norm_matches_reference(rng, shape, axis, dtype):
    C = _channels(shape, axis)
    x = _data(rng, shape, dtype)
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm_ref, rv_ref = ref.instance_running(x, rm, rv, 0.3, axis=axis)
    y, mean, invstd = bncore.instance_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                                 momentum=0.3, axis=axis)
    y_ref, m_ref, inv_ref = ref.group_norm_axis(x, C, w, b, axis=axis)
    assert mean.shape == invstd.shape == (shape[0], C)
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(mean, m_ref, **TOL[dtype])
    np.testing.assert_allclose(invstd, inv_ref, **TOL[dtype])
    np.testing.assert_allclose(rm, rm_ref, **TOL[dtype])
    np.testing.assert_allclose(rv, rv_ref, **TOL[dtype])
    dy = rng.standard_normal(shape).astype(dtype)
    got = bncore.instance_norm_backward(dy, x, mean, invstd, w, axis=axis)
    want = ref.group_norm_axis_backward(dy, x, C, m_ref, inv_ref, w, axis=axis)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, **GTOL[dtype])
    # eval form: the running statistics, per channel on the same axis
    y_eval = bncore.instance_norm(x, rm, rv, w, b, use_input_stats=False, axis=axis)
    v = ref.channel_view(x, axis)
    e = ((v - rm.reshape(1, 1, C, 1)) / np.sqrt(rv.astype(np.float64).reshape(1, 1, C, 1)
                                                  + 1e-5) * w.reshape(1, 1, C, 1)
         + b.reshape(1, 1, C, 1))
    np.testing.assert_allclose(y_eval, e.reshape(shape), **TOL[dtype])


def test_instance_norm_finite_differences(rng):
    x = rng.standard_normal((2, 3, 4))
    w, b, g = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4), rng.standard_normal(x.shape)
    _, mean, invstd = bncore.instance_norm_train(x, w, b, axis=-1)
    grads = bncore.instance_norm_backward(g, x, mean, invstd, w, axis=-1)
    ref.assert_grads(lambda: float(np.sum(bncore.instance_norm(x, weight=w, bias=b, axis=-1)
                                          * g)), zip((x, w, b), grads))


# ---- accuracy far from zero, thread counts ----------------------------------------------------

@pytest.mark.parametrize("shape,G,axis", [((4, 16, 16, 8), 2, -1), ((2, 50, 40, 16), 16, -1),
                                          ((2, 8, 4, 9, 3), 9, (-2, -1)), ((3, 9, 4, 8), 4, 2)])
def test_float32_accurate_far_from_zero(rng, shape, G, axis):
    # |mean| = 1e4, std 1: E[x^2] - E[x]^2 would lose every digit of the variance
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    y, mean, invstd = bncore.group_norm_train(x, G, axis=axis)
    y_ref, m_ref, inv_ref = ref.group_norm_axis(x, G, axis=axis)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-7)
    np.testing.assert_allclose(invstd, inv_ref, rtol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=2e-3)  # x - mean exact, then one rounding
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dw, db = bncore.group_norm_backward(dy, x, G, mean, invstd, axis=axis)
    dx_ref, dw_ref, db_ref = ref.group_norm_axis_backward(dy, x, G, m_ref, inv_ref, axis=axis)
    ref.assert_close(dx, dx_ref, 2e-3, "dx")
    ref.assert_close(dw, dw_ref, 2e-3, "dweight")
    C = _channels(shape, axis)
    yi, mi, ii = bncore.instance_norm_train(x, axis=axis)
    yi_ref, mi_ref, ii_ref = ref.group_norm_axis(x, C, axis=axis)
    np.testing.assert_allclose(ii, ii_ref, rtol=1e-5)
    np.testing.assert_allclose(yi, yi_ref, atol=2e-3)


@pytest.mark.parametrize("shape,G,axis", [((4, 40, 30, 32), 8, -1), ((2, 3, 20000), 4, -1),
                                          ((2, 30, 20, 60), 5, 2), ((3, 20, 40, 4, 8), 4, (3, 4))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_bit_identity(rng, shape, G, axis, dtype):
    C = _channels(shape, axis)
    x = _data(rng, shape, dtype)
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    dy = rng.standard_normal(shape).astype(dtype)
    one = bncore.group_norm_train(x, G, w, b, axis=axis, n_threads=1)
    back = bncore.group_norm_backward(dy, x, G, one[1], one[2], w, axis=axis, n_threads=1)
    for nt in (2, 3, 4, 7):
        for a, c in zip(one, bncore.group_norm_train(x, G, w, b, axis=axis, n_threads=nt)):
            np.testing.assert_array_equal(a, c)
        for a, c in zip(back, bncore.group_norm_backward(dy, x, G, one[1], one[2], w,
                                                         axis=axis, n_threads=nt)):
            np.testing.assert_array_equal(a, c)


# ---- PyTorch on a permuted copy -------------------------------------------------------------

@pytest.mark.parametrize("shape,G", [((3, 7, 5, 8), 4), ((2, 11, 6), 3), ((2, 4, 3, 5, 10), 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_norm_against_torch(rng, shape, G, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    C = shape[-1]
    x = _data(rng, shape, dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    first = list(range(x.ndim))
    first = [0, x.ndim - 1] + first[1:-1]  # channels-last -> channels-first permutation
    xt = torch.tensor(x).permute(*first).contiguous().requires_grad_(True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    yt = F.group_norm(xt, G, wt, bt, eps=1e-5)
    yt.backward(torch.tensor(dy).permute(*first))
    y, m, inv = bncore.group_norm_train(x, G, w, b, axis=-1)
    last = list(np.argsort(first))
    np.testing.assert_allclose(y, yt.detach().permute(*last).numpy(), **TOL[dtype])
    dx, dw, db = bncore.group_norm_backward(dy, x, G, m, inv, w, axis=-1)
    np.testing.assert_allclose(dx, xt.grad.permute(*last).numpy(), **GTOL[dtype])
    np.testing.assert_allclose(dw, wt.grad.numpy(), **GTOL[dtype])
    np.testing.assert_allclose(db, bt.grad.numpy(), **GTOL[dtype])


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_against_torch(rng, use_input_stats):
    torch = pytest.importorskip("torch")
    x = _data(rng, (3, 6, 5, 4), np.float64)  # NHWC, C = 4
    w, b = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)
    yt = torch.nn.functional.instance_norm(torch.tensor(x).permute(0, 3, 1, 2), rm_t, rv_t,
                                           torch.tensor(w), torch.tensor(b),
                                           use_input_stats=use_input_stats, momentum=0.2)
    y = bncore.instance_norm(x, rm, rv, w, b, use_input_stats=use_input_stats, momentum=0.2,
                             axis=-1)
    np.testing.assert_allclose(y, yt.permute(0, 2, 3, 1).numpy(), **TOL[np.float64])
    np.testing.assert_allclose(rm, rm_t.numpy(), **TOL[np.float64])
    np.testing.assert_allclose(rv, rv_t.numpy(), **TOL[np.float64])


# ---- refusals ----------------------------------------------------------------------------

@pytest.mark.parametrize("axis,exc,msg", [
    (0, ValueError, "^axis: expected channel axes after axis 0"),
    ((0, 1), ValueError, "^axis: expected channel axes after axis 0"),
    ((1, 3), ValueError, "^axis: expected adjacent axes"),
    ((3, 2), ValueError, "^axis: expected adjacent axes"),
    ((2, 2), ValueError, "^axis: expected distinct axes"),
    ((), ValueError, "^axis: expected an int or a non-empty tuple"),
    (4, ValueError, r"^axis: expected an int in \[-4, 3\]"),
    ((2, 1.0), TypeError, "^axis: expected an int, got float"),
    ([2, 3], TypeError, "^axis: expected an int, got list"),
    (True, TypeError, "^axis: expected an int, got bool")])
def test_bad_axis_refused_and_nothing_changes(rng, axis, exc, msg):
    x = _data(rng, (2, 3, 4, 6), np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(exc, match=msg):
        bncore.instance_norm_train(x, running_mean=rm, running_var=rv, axis=axis, out=out)
    with pytest.raises(exc, match=msg):
        bncore.group_norm_train(x, 2, axis=axis, out=out)
    _, m, inv = bncore.group_norm_train(x, 2, axis=-1)
    dy = np.ones_like(x)
    with pytest.raises(exc, match=msg):
        bncore.group_norm_backward(dy, x, 2, m, inv, axis=axis, out=out)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    np.testing.assert_array_equal(out, 7.0)
    np.testing.assert_array_equal(dy, 1.0)


def test_other_refusals_name_the_axis_and_change_nothing(rng):
    x = _data(rng, (2, 3, 4, 6), np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    with pytest.raises(ValueError, match=r"^num_groups: .*channel count 6 \(axis 3"):
        bncore.group_norm_train(x, 4, axis=-1)
    with pytest.raises(ValueError, match="^weight: expected shape"):
        bncore.group_norm_train(x, 2, np.ones(4), axis=-1)  # the length of axis 1, not -1
    with pytest.raises(ValueError, match="^running_mean: expected shape"):
        bncore.instance_norm_train(x, running_mean=np.zeros(4), running_var=np.ones(4),
                                   axis=-1)
    with pytest.raises(ValueError, match="^x: expected more than 1 spatial element"):
        bncore.instance_norm_train(x[:, :1, :1], running_mean=rm, running_var=rv, axis=-1)
    with pytest.raises(ValueError, match="^mean: expected 12 values"):
        bncore.instance_norm_backward(x, x, np.zeros(8), np.ones(12), axis=-1)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


# ---- layers ------------------------------------------------------------------------------

def test_group_norm_layer_channels_last(rng):
    x = _data(rng, (2, 6, 5, 8), np.float64)
    gn, gl = bncore.GroupNorm(4, 8, dtype=np.float64), bncore.GroupNorm(4, 8, axis=-1,
                                                                          dtype=np.float64)
    w = rng.uniform(0.5, 1.5, 8)
    gn.weight[...] = gl.weight[...] = w
    xf = np.moveaxis(x, -1, 1).copy()
    y = gl(x)
    np.testing.assert_allclose(np.moveaxis(y, -1, 1), gn(xf), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(y, ref.group_norm_axis(x, 4, w, gl.bias, axis=-1)[0],
                               **TOL[np.float64])
    dy = rng.standard_normal(x.shape)
    dx = gl.backward(dy)
    np.testing.assert_allclose(np.moveaxis(dx, -1, 1), gn.backward(np.moveaxis(dy, -1, 1)),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gl.grad_weight, gn.grad_weight, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gl.grad_bias, gn.grad_bias, rtol=1e-12, atol=1e-12)
    assert "axis=-1" in repr(gl)
    # a refused forward keeps the saved record: backward still differentiates the last one
    with pytest.raises(ValueError, match="channels on axis 3"):
        gl(xf)
    np.testing.assert_array_equal(gl.backward(dy), dx)
    # tuple axes: (N, L, G, C/G)
    gt = bncore.GroupNorm(4, 8, axis=(-2, -1), dtype=np.float64)
    gt.weight[...] = w
    np.testing.assert_allclose(gt(x.reshape(2, 6, 5, 4, 2)).reshape(x.shape), y, rtol=1e-13,
                               atol=1e-13)


def test_instance_norm_layer_channels_last(rng):
    x = _data(rng, (3, 5, 4, 6), np.float32)
    il = bncore.InstanceNorm(6, axis=-1, affine=True, track_running_stats=True)
    rm_ref, rv_ref = ref.instance_running(x, il.running_mean, il.running_var, 0.1, axis=-1)
    y = il(x)
    np.testing.assert_allclose(y, ref.group_norm_axis(x, 6, axis=-1)[0], **TOL[np.float32])
    np.testing.assert_allclose(il.running_mean, rm_ref, **TOL[np.float32])
    np.testing.assert_allclose(il.running_var, rv_ref, **TOL[np.float32])
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, m, inv = bncore.instance_norm_train(x, axis=-1)
    dx_ref, dw_ref, db_ref = bncore.instance_norm_backward(dy, x, m, inv, il.weight, axis=-1)
    np.testing.assert_array_equal(il.backward(dy), dx_ref)
    np.testing.assert_array_equal(il.grad_weight, dw_ref)
    # a refused call moves no running statistic
    before = il.state_dict()
    with pytest.raises(ValueError, match="channels on axis 3"):
        il(np.moveaxis(x, -1, 1))
    for k, v in il.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # eval mode: the running statistics on the last axis
    il.eval()
    ye = il(x)
    e = ((x - il.running_mean) / np.sqrt(il.running_var.astype(np.float64) + il.eps)
         * il.weight + il.bias)
    np.testing.assert_allclose(ye, e, **TOL[np.float32])
    dxe = il.backward(dy)
    np.testing.assert_allclose(dxe, dy * il.weight / np.sqrt(il.running_var + il.eps),
                               **TOL[np.float32])


# ---- batch norm: the same tuple axes ----------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((4, 5, 2, 3), (-2, -1)), ((3, 2, 4, 5), (1, 2)),
                                        ((6, 2, 3), (1, 2)), ((2, 3, 4, 2, 2), (2, 3))])
@pytest.mark.parametrize("order", ["C", "F"])
def test_batch_norm_tuple_axes(rng, shape, axis, order):
    x = np.asarray(_data(rng, shape, np.float64), order=order)
    first, last = axis[0] % x.ndim, axis[-1] % x.ndim
    flat_shape = x.shape[:first] + (-1,) + x.shape[last + 1:]
    xm = x.reshape(flat_shape)  # the merged channel axis, for the reference
    C = xm.shape[first]
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                              running_var=rv)
    y_ref, m_ref, inv_ref, var_u = ref.train(xm, w, b, axis=first)
    assert y.shape == x.shape and mean.shape == (C,)
    np.testing.assert_allclose(y.reshape(flat_shape), y_ref, **TOL[np.float64])
    np.testing.assert_allclose(invstd, inv_ref, **TOL[np.float64])
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var_u, **TOL[np.float64])
    dy = rng.standard_normal(shape)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    want = ref.backward(dy.reshape(flat_shape), xm, m_ref, inv_ref, w, axis=first)
    for g, e in zip((dx.reshape(flat_shape), dw, db), want):
        np.testing.assert_allclose(g, e, **GTOL[np.float64])
    ye = bncore.batch_norm_eval(x, rm, rv, w, b, axis=axis)
    np.testing.assert_allclose(ye.reshape(flat_shape), ref.evaluate(xm, rm, rv, w, b, axis=first),
                               **TOL[np.float64])
    bn = bncore.BatchNorm(C, axis=axis, dtype=np.float64)
    np.testing.assert_allclose(bn(x).reshape(flat_shape), ref.train(xm, axis=first)[0],
                               **TOL[np.float64])


def test_batch_norm_bad_tuple_axes_change_nothing(rng):
    x = _data(rng, (4, 2, 3, 5), np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    for axis, exc, msg in [((1, 3), ValueError, "expected adjacent"),
                           ((2, 2), ValueError, "expected distinct"),
                           ((1, "2"), TypeError, "expected an int, got str")]:
        with pytest.raises(exc, match="^axis: " + msg):
            bncore.batch_norm_train(x, running_mean=rm, running_var=rv, axis=axis)
        with pytest.raises(exc, match="^axis: " + msg):
            bncore.batch_norm_eval(x, rm, rv, axis=axis)
    with pytest.raises(ValueError, match="^virtual_batch_size: .*axis=\\(0, 1\\)"):
        bncore.batch_norm_train(x, running_mean=np.zeros(8, np.float32),
                                running_var=np.ones(8, np.float32), axis=(0, 1),
                                virtual_batch_size=2)
    with pytest.raises(ValueError, match="^x: expected 7 channels on axis \\(1, 2\\)"):
        bncore.BatchNorm(7, axis=(1, 2))(x)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_docs_examples_run():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "normalization.md")
    with open(path) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    ns = {"np": np, "bncore": bncore}  # the page's first block imports them
    exec(compile(blocks[5], path, "exec"), ns)  # channels-last group and instance norm
    x = ns["x"]
    np.testing.assert_allclose(ns["y"], ref.group_norm_axis(x, 32, axis=-1)[0], atol=3e-5)
    np.testing.assert_allclose(ns["y_in"], ref.group_norm_axis(x, 64, axis=-1)[0], atol=3e-5)
    assert ns["mean"].shape == (8, 32) and ns["inorm"].running_mean.shape == (64,)
    exec(compile(blocks[6], path, "exec"), ns)  # tuple axes
    x5 = ns["x5"]
    np.testing.assert_allclose(ns["y5"].reshape(4, 256, 32),
                               ref.train(x5.reshape(4, 256, 32), axis=-1)[0], atol=3e-5)
    assert ns["mean5"].shape == (32,)
    np.testing.assert_allclose(bncore.group_norm(x5, 8, axis=(-2, -1)),
                               ref.group_norm_axis(x5, 8, axis=(-2, -1))[0], atol=3e-5)


def test_float32_subnormal_spread_and_constant_instances(rng):
    # instances whose invstd (or invstd * weight) leaves float32's range: a
    # subnormal spread with eps = 0 (invstd ~ 1e41), and a constant instance
    # (invstd 0 by the invstd rule); the channels-last kernels evaluate those
    # in double and stay finite
    tiny = 2.0 ** -149
    S, kinds = 60, ["normal", "subnormal", "constant", "subnormal_mean", "edge", "normal"]
    x = np.empty((2, S, len(kinds)), np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for c, kind in enumerate(kinds):
        if kind == "normal":
            x[..., c] = rng.standard_normal((2, S)) * 3 + 100
        elif kind == "subnormal":
            x[..., c], dy[..., c] = rng.integers(-20000, 20000, (2, S)) * tiny, dy[..., c] * 1e-40
        elif kind == "subnormal_mean":
            x[..., c], dy[..., c] = rng.integers(1000, 3000, (2, S)) * tiny, dy[..., c] * 1e-42
        elif kind == "edge":
            x[..., c], dy[..., c] = rng.standard_normal((2, S)) * 1e-38, dy[..., c] * 1e-38
        else:
            x[..., c] = 3.0
    w = np.array([1.0, 2.0, 1.0, 0.5, 10.0, -1.0])
    b = rng.standard_normal(6)
    y, mean, invstd = bncore.instance_norm_train(x, w, b, eps=0.0, axis=-1)
    x64, g = x.astype(np.float64), dy.astype(np.float64)
    m = x64.mean(1, keepdims=True)
    var = ((x64 - m) ** 2).mean(1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(var == 0, 0.0, 1 / np.sqrt(var))
    xhat = (x64 - m) * inv
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, xhat * w + b, rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(mean, m[:, 0], rtol=1e-6, atol=tiny)
    # the exact statistics (float32's saved mean rounds a subnormal mean to a multiple of 2**-149)
    dx, dw, db = bncore.instance_norm_backward(dy, x, m[:, 0], inv[:, 0], w, axis=-1)
    wg = g * w
    want = inv * (wg - wg.mean(1, keepdims=True) - xhat * (wg * xhat).mean(1, keepdims=True))
    assert np.isfinite(dx).all()
    scale = np.abs(want).max(axis=1, keepdims=True)
    assert np.all(np.abs(dx - want) <= 1e-5 * np.abs(want) + 1e-5 * scale)
    # summed in double, rounded once to float32 (whose subnormals have fewer digits)
    np.testing.assert_allclose(db, g.sum((0, 1)), rtol=1e-6, atol=tiny)
    np.testing.assert_allclose(dw, (g * xhat).sum((0, 1)), rtol=1e-5, atol=tiny)
