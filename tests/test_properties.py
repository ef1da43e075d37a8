"""Hypothesis: random shapes, axes, strides and out arrays against the reference."""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bncore  # noqa: E402
import reference as ref  # noqa: E402


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:
        shape = tuple(s + 1 if i != axis % ndim else s for i, s in enumerate(shape))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    view = draw(st.sampled_from(["contiguous", "fortran", "transpose", "step", "reverse"]))
    out = draw(st.sampled_from(["none", "fresh", "inplace", "strided"]))
    offset = draw(st.sampled_from([0.0, 1e3]))
    return shape, axis, dtype, seed, view, out, offset


def _make(shape, dtype, seed, view, offset):
    rng = np.random.default_rng(seed)
    if view == "step":
        base = rng.standard_normal(tuple(2 * s for s in shape)) + offset
        return base[tuple(slice(None, None, 2) for _ in shape)].astype(dtype, copy=False)[...], rng
    x = (rng.standard_normal(shape) + offset).astype(dtype)
    if view == "fortran":
        x = np.asfortranarray(x)
    elif view == "transpose":
        x = np.ascontiguousarray(x.T).T
    elif view == "reverse":
        x = x[::-1]
    return x, rng


def _out_for(kind, x):
    if kind == "fresh":
        return np.empty_like(x)
    if kind == "strided":
        return np.empty(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)[..., ::2]
    return None


@settings(max_examples=150, deadline=None)
@given(cases())
def test_train_backward_eval_properties(case):
    shape, axis, dtype, seed, view, out_kind, offset = case
    x, rng = _make(shape, dtype, seed, view, offset)
    C = shape[axis]
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    if offset and dtype == np.float32:
        tol = dict(rtol=2e-3, atol=2e-3)  # input rounding at 1e3 limits any float32 method
    x_before = x.copy()
    y_ref, m_ref, inv_ref, _ = ref.train(x, w, b, axis)
    if out_kind == "inplace":
        target = x.copy()
        y, mean, invstd = bncore.batch_norm_train(target, w, b, axis=axis, out=target)
        assert y is target
    else:
        out = _out_for(out_kind, x)
        y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, out=out)
        if out is not None:
            assert y is out
        np.testing.assert_array_equal(x, x_before)
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(mean, m_ref, rtol=tol["rtol"] / 10, atol=tol["atol"])
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                            out=_out_for(out_kind, x))
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, axis)
    scale = max(1.0, np.abs(dx_ref).max())
    np.testing.assert_allclose(dx, dx_ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * scale * 10)
    np.testing.assert_allclose(db, db_ref, rtol=tol["rtol"], atol=tol["atol"] * 10)
    np.testing.assert_allclose(dw, dw_ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    rv = rng.uniform(0.5, 2, C)
    ye = bncore.batch_norm_eval(x, m_ref, rv, w, b, axis=axis, out=_out_for(out_kind, x))
    np.testing.assert_allclose(ye, ref.evaluate(x, m_ref, rv, w, b, axis), **tol)
