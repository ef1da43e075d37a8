"""The C-API fast paths of batch_norm_train/_eval/_backward (bncore/_kernels.pyx).

Common inputs take the compiled entries straight; anything unusual takes the full
path. Both must give bit-identical results (and the same running-statistics
update), and the fast path must really be taken for the common case. The
values themselves are checked against the float64 reference in
test_functional.py, whose inputs take the fast path.
"""
import numpy as np
import pytest

import bncore
import reference as ref
from bncore import _kernels

CASES = [((6, 5, 4, 3), 1), ((6, 4, 3, 5), -1), ((9, 7), 1), ((2, 130, 9), 1)]


class Slow(np.ndarray):
    """An ndarray subclass: the fast path refuses it, the full path takes it."""


def slow(a):
    return None if a is None else a.view(Slow)


def _plain(a):
    return a if a is None or type(a) is np.ndarray else a.view(np.ndarray)


def _same(got, want):
    for g, w in zip(got, want):
        if isinstance(g, (bool, np.bool_)):
            assert g == w
        else:
            assert type(g) is np.ndarray and g.dtype == w.dtype
            np.testing.assert_array_equal(_plain(g), _plain(w))


def _data(rng, shape, axis, dtype):
    C = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    return (x, rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype),
            rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype))


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("affine", [True, False])
def test_fast_and_full_paths_agree(rng, shape, axis, dtype, activation, affine):
    x, w, b, rm, rv = _data(rng, shape, axis, dtype)
    if not affine:
        w = b = None
    rm2, rv2 = rm.copy(), rv.copy()
    fast = bncore.batch_norm_train(x, w, b, axis=axis, running_mean=rm, running_var=rv,
                                   momentum=0.2, activation=activation)
    full = bncore.batch_norm_train(slow(x), slow(w), slow(b), axis=axis, running_mean=rm2,
                                   running_var=rv2, momentum=0.2, activation=activation)
    _same(fast, full)
    _same((rm, rv), (rm2, rv2))
    y, mean, invstd = fast
    y_ref, m_ref, inv_ref, _ = ref.train(x, w, b, axis)
    np.testing.assert_allclose(y, ref.activate(y_ref, activation), rtol=1e-4, atol=1e-4)

    ev = bncore.batch_norm_eval(x, rm, rv, w, b, axis=axis, activation=activation)
    _same((ev,), (bncore.batch_norm_eval(slow(x), rm, rv, w, b, axis=axis,
                                         activation=activation),))
    np.testing.assert_allclose(ev, ref.activate(ref.evaluate(x, rm, rv, w, b, axis), activation),
                               rtol=1e-4, atol=1e-4)

    dy = rng.standard_normal(shape).astype(dtype)
    for training in (True, False):
        kw = dict(axis=axis, training=training, activation=activation,
                  y=y if activation else None)
        got = bncore.batch_norm_backward(dy, x, mean, invstd, w, **kw)
        kw["y"] = slow(kw["y"])
        _same(got, bncore.batch_norm_backward(slow(dy), x, mean, invstd, w, **kw))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_in_place_and_disjoint(rng, dtype):
    x, w, b, rm, rv = _data(rng, (8, 6, 5), 1, dtype)
    want = bncore.batch_norm_train(slow(x), w, b)
    out = np.empty_like(x)
    got = bncore.batch_norm_train(x, w, b, out=out)
    assert got[0] is out
    _same(got, want)
    xi = x.copy()
    got = bncore.batch_norm_train(xi, w, b, out=xi)
    assert got[0] is xi
    _same(got, want)
    want_e = bncore.batch_norm_eval(slow(x), rm, rv, w, b)
    xi = x.copy()
    assert bncore.batch_norm_eval(xi, rm, rv, w, b, out=xi) is xi
    _same((xi,), (want_e,))
    # partly overlapping out: the full path, still right
    buf = np.zeros(x.size + 7, dtype)
    part = buf[3:3 + x.size].reshape(x.shape)
    part[...] = x
    assert _kernels.evaluate(part, rm, rv, w, b, 1, 1e-5, buf[:x.size].reshape(x.shape),
                              None, None) is None
    got = bncore.batch_norm_eval(part, rm, rv, w, b, out=buf[:x.size].reshape(x.shape))
    _same((got,), (want_e,))


def test_common_calls_take_the_fast_path(rng):
    x, w, b, rm, rv = _data(rng, (4, 3, 5), 1, np.float32)
    assert _kernels.evaluate(x, rm, rv, w, b, 1, 1e-5, None, None, None) is not None
    assert _kernels.evaluate(x, rm, rv, w, b, 1, 1e-5, None, ("leaky_relu", 0.1),
                             None) is not None
    assert _kernels.train(x, w, b, -2, 1e-5, rm, rv, 0.1, None, "relu", 2, True, False,
                          None) is not None
    y, mean, invstd = bncore.batch_norm_train(x, w, b)
    assert _kernels.backward(x, x, mean, invstd, None, 1, True, None, None, None, 1,
                             None) is not None


def _eval(x, rm, rv, w, b, axis=1, eps=1e-5, out=None, act=None, nt=None):
    return _kernels.evaluate(x, rm, rv, w, b, axis, eps, out, act, nt)


def _train(x, w, b, rm, rv, momentum=0.1):
    return _kernels.train(x, w, b, 1, 1e-5, rm, rv, momentum, None, None, None, True, False,
                          None)


def _backward(dy, x, m, inv, w, act=None):
    return _kernels.backward(dy, x, m, inv, w, 1, True, None, act, None, None, None)


@pytest.mark.parametrize("call", [
    lambda x, w, b, rm, rv: _eval(x.astype(np.float16), rm, rv, w, b),
    lambda x, w, b, rm, rv: _eval(x[:, ::2], rm, rv, w[::2], b[::2]),
    lambda x, w, b, rm, rv: _eval(x, rm, rv, w, b, eps=float("nan")),
    lambda x, w, b, rm, rv: _eval(x, rm, rv, w, b, eps=float("inf")),
    lambda x, w, b, rm, rv: _eval(x, rm, rv, w, b, nt=0),
    lambda x, w, b, rm, rv: _eval(x, rm, rv, w, b, axis=True),
    lambda x, w, b, rm, rv: _eval(x, rm, rv, w, b, axis=2**70),
    lambda x, w, b, rm, rv: _train(x, w, b, rm, None),
    lambda x, w, b, rm, rv: _train(x, w, b, list(rm), rv),
    lambda x, w, b, rm, rv: _train(x, w, b, rm, list(rv)),
    lambda x, w, b, rm, rv: _train(x, w, b, rm, rm),
    lambda x, w, b, rm, rv: _train(x, w, b, rm, rv, momentum=1.5),
    lambda x, w, b, rm, rv: _train(x[:1, :, :1], w, b, None, None),
    lambda x, w, b, rm, rv: _backward(x[..., :2], x, rm, rv, w),
    lambda x, w, b, rm, rv: _backward(x, x, rm, rv, w, act="relu"),
], ids=["float16", "strided", "nan-eps", "inf-eps", "zero-threads", "bool-axis", "huge-axis",
        "one-running", "list-mean", "list-var", "shared-running", "momentum", "one-value",
        "dy-shape", "relu-no-y"])
def test_unusual_inputs_take_the_full_path(rng, call):
    x, w, b, rm, rv = _data(rng, (4, 6, 5), 1, np.float32)
    before = rm.copy(), rv.copy()
    assert call(x, w, b, rm, rv) is None
    _same((rm, rv), before)


@pytest.mark.parametrize("shape,axis", [((64, 16, 65, 63), 1), ((64, 65, 63, 16), -1),
                                        ((4099, 1030), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outputs_past_the_streaming_threshold(rng, shape, axis, dtype):
    # outputs of 16 MiB and more are written with non-temporal stores (with
    # misaligned heads and tails here); same values as the reference
    x = (rng.standard_normal(shape) * 2 + 7).astype(dtype)
    C = shape[axis]
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis)
    y_ref, m_ref, inv_ref, _ = ref.train(x, w, b, axis)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, y_ref, **tol)
    rm, rv = m_ref.astype(dtype), (1 / inv_ref**2).astype(dtype)
    np.testing.assert_allclose(bncore.batch_norm_eval(x, rm, rv, w, b, axis=axis),
                               ref.evaluate(x, rm, rv, w, b, axis), **tol)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, axis)
    np.testing.assert_allclose(dx, dx_ref, rtol=tol["rtol"], atol=tol["atol"] * 10)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-2)
