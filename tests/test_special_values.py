"""NaN, inf, huge and tiny magnitudes, constant channels and eps = 0.

Channels are independent: a non-finite value in one channel must leave every
other channel's outputs and statistics bitwise as they are without it.
"""
import numpy as np
import pytest

import bncore
import reference as ref

# (shape, axis): NCHW small and multi-block (parallel), channels-last with more
# channels than one column tile, (N, C), an odd axis
LAYOUTS = [((4, 5, 6), 1), ((8, 5, 90, 90), 1), ((6, 20, 20, 300), -1), ((300, 5), 1),
           ((3, 7, 5, 4), 2)]
BAD = 2  # the channel that gets the special value


def _ids(p):
    return "x".join(map(str, p[0])) + f"-ax{p[1]}"


def _take(a, c, axis):
    return np.take(a, c, axis=axis)


def _others(a, axis, C):
    return np.delete(a, BAD, axis=axis % a.ndim) if a.ndim > 1 else np.delete(a, BAD)


def _all_functions(x, dy, axis, rm, rv, **kw):
    """Every public function on (x, dy); running statistics updated in place."""
    C = x.shape[axis]
    w = np.linspace(0.5, 1.5, C)
    b = np.linspace(-1, 1, C)
    y, m, inv = bncore.batch_norm_train(x, w, b, axis=axis, running_mean=rm, running_var=rv, **kw)
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, inv, w, axis=axis)
    dxe, _, _ = bncore.batch_norm_backward(dy, x, m, inv, w, axis=axis, training=False)
    ye = bncore.batch_norm_eval(x, rm, rv, w, b, axis=axis)
    ye2 = bncore.batch_norm_elemt(x, m, inv, w, b, axis=axis)
    n, sm, m2 = bncore.batch_norm_stats(x, axis=axis)
    sdy, sdx = bncore.batch_norm_backward_reduce(dy, x, m, axis=axis)
    dx2 = bncore.batch_norm_backward_elemt(dy, x, m, inv, w, sdy, sdx, n, axis=axis)
    layer = bncore.BatchNorm(C, axis=axis, dtype=x.dtype)
    yl = layer(x)
    dxl = layer.backward(dy)
    per_channel = dict(mean=m, invstd=inv, dw=dw, db=db, stats_mean=sm, m2=m2, sdy=sdy, sdx=sdx,
                       rm=rm.copy(), rv=rv.copy(), layer_rm=layer.running_mean,
                       layer_rv=layer.running_var, layer_gw=layer.grad_weight,
                       layer_gb=layer.grad_bias)
    full = dict(y=y, dx=dx, dxe=dxe, ye=ye, ye2=ye2, dx2=dx2, yl=yl, dxl=dxl)
    return per_channel, full


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["x", "dy"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_non_finite_value_stays_in_its_channel(rng, layout, dtype, where, value):
    shape, axis = layout
    x = (rng.standard_normal(shape) + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    bad_x, bad_dy = x.copy(), dy.copy()
    target = bad_x if where == "x" else bad_dy
    chan = np.moveaxis(target, axis, 0)[BAD]  # a view into target
    chan.flat[rng.integers(chan.size)] = value
    rm0, rv0 = rng.standard_normal(C), rng.uniform(0.5, 2, C)

    clean_pc, clean_full = _all_functions(x, dy, axis, rm0.copy(), rv0.copy())
    bad_pc, bad_full = _all_functions(bad_x, bad_dy, axis, rm0.copy(), rv0.copy())
    for k in clean_pc:
        np.testing.assert_array_equal(_others(bad_pc[k], 0, C), _others(clean_pc[k], 0, C),
                                      err_msg=f"{k}: other channels changed")
    for k in clean_full:
        np.testing.assert_array_equal(_others(bad_full[k], axis, C),
                                      _others(clean_full[k], axis, C),
                                      err_msg=f"{k}: other channels changed")
    # and the bad channel is not silently cleaned up
    if where == "x":
        assert not np.isfinite(bad_pc["mean"][BAD]) and not np.isfinite(bad_pc["rm"][BAD])
        assert not np.isfinite(_take(bad_full["y"], BAD, axis)).any()
    else:
        assert not np.isfinite(bad_pc["db"][BAD]) and not np.isfinite(bad_pc["sdy"][BAD])
        assert not np.isfinite(_take(bad_full["dx"], BAD, axis)).any()


def test_non_finite_running_statistics_stay_in_their_channel(rng):
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    rm, rv = np.zeros(4), np.ones(4)
    for bad_rm, bad_rv in ((np.nan, 1.0), (0.0, np.inf), (np.inf, np.nan)):
        rm_b, rv_b = rm.copy(), rv.copy()
        rm_b[BAD], rv_b[BAD] = bad_rm, bad_rv
        y = bncore.batch_norm_eval(x, rm_b, rv_b)
        y0 = bncore.batch_norm_eval(x, rm, rv)
        np.testing.assert_array_equal(np.delete(y, BAD, 1), np.delete(y0, BAD, 1))
        if not np.isfinite(bad_rm) or np.isnan(bad_rv):  # (rv = inf gives xhat = 0)
            assert not np.isfinite(y[:, BAD]).any()
        inv = 1 / np.sqrt(rv_b + 1e-5)
        dx, dw, db = bncore.batch_norm_backward(dy, x, rm_b, inv)
        dx0, dw0, db0 = bncore.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5))
        np.testing.assert_array_equal(np.delete(dx, BAD, 1), np.delete(dx0, BAD, 1))
        np.testing.assert_array_equal(np.delete(dw, BAD), np.delete(dw0, BAD))


# ---- skip_nonfinite_update ------------------------------------------------------------------

def _batch(seed, bad=None, shape=(8, 3, 4)):
    x = np.random.default_rng(seed).standard_normal(shape)
    if bad is not None:
        x[1, BAD % shape[1], 2] = bad
    return x


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "var_overflow"])
def test_skip_nonfinite_update_functional(bad):
    x = _batch(0, None if bad == "var_overflow" else bad)
    if bad == "var_overflow":  # finite mean, variance beyond float64
        x[:, BAD % 3] = np.tile([1e200, -1e200], 16).reshape(8, 4)
    C = x.shape[1]
    rm0, rv0 = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)

    rm, rv = rm0.copy(), rv0.copy()
    y_off, m_off, inv_off = bncore.batch_norm_train(x, running_mean=rm, running_var=rv)
    # off (the default, PyTorch's behaviour): the bad channel's statistics go non-finite
    assert not np.isfinite(rm[BAD % C]) or not np.isfinite(rv[BAD % C])
    good = [c for c in range(C) if c != BAD % C]
    assert np.isfinite(rm[good]).all() and np.isfinite(rv[good]).all()

    rm, rv = rm0.copy(), rv0.copy()
    y_on, m_on, inv_on = bncore.batch_norm_train(x, running_mean=rm, running_var=rv,
                                                 skip_nonfinite_update=True)
    np.testing.assert_array_equal(rm, rm0)  # every channel left as it was
    np.testing.assert_array_equal(rv, rv0)
    for a, b in ((y_on, y_off), (m_on, m_off), (inv_on, inv_off)):
        np.testing.assert_array_equal(a, b)  # the outputs are still returned as computed


def test_skip_nonfinite_update_changes_nothing_on_finite_batches():
    x = _batch(1).astype(np.float32)
    results = []
    for skip in (False, True):
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        y, m, inv = bncore.batch_norm_train(x, running_mean=rm, running_var=rv,
                                            skip_nonfinite_update=skip)
        results.append((y, m, inv, rm, rv))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_skip_nonfinite_update_layer(momentum):
    """A layer skipping the bad batch ends exactly like one that never saw it,
    num_batches_tracked included (momentum=None: the cumulative average)."""
    batches = [_batch(2), _batch(3, np.nan), _batch(4), _batch(5, np.inf), _batch(6)]
    skipping = bncore.BatchNorm(3, momentum=momentum, dtype=np.float64, skip_nonfinite_update=True)
    clean = bncore.BatchNorm(3, momentum=momentum, dtype=np.float64)
    default = bncore.BatchNorm(3, momentum=momentum, dtype=np.float64)
    for x in batches:
        y = skipping(x)
        assert np.array_equal(y, default(x), equal_nan=True)
        if np.isfinite(x).all():
            clean(x)
    for k, v in clean.state_dict().items():
        np.testing.assert_array_equal(skipping.state_dict()[k], v, err_msg=k)
    assert int(skipping.num_batches_tracked) == 3 and int(default.num_batches_tracked) == 5
    assert not np.isfinite(default.running_mean[BAD])
    assert np.isfinite(default.running_mean[:BAD]).all()


def test_skip_nonfinite_update_is_off_by_default_and_checked():
    assert bncore.BatchNorm(3).skip_nonfinite_update is False
    x = _batch(7, np.nan)
    layer = bncore.BatchNorm(3, dtype=np.float64)
    layer(x)
    assert int(layer.num_batches_tracked) == 1 and np.isnan(layer.running_mean[BAD])


# ---- magnitudes ------------------------------------------------------------------------------

MAG_LAYOUTS = [((32, 3, 8), 1), ((16, 3, 40, 40), 1), ((8, 10, 10, 300), -1), ((64, 5), 1)]


@pytest.mark.parametrize("scale,offset,eps", [(1e30, 0.0, 0.0), (1e30, 3e30, 1e-5),
                                              (1e-20, 0.0, 0.0), (1e-30, 1e-29, 0.0),
                                              (1e35, 0.0, 1e-5)])
@pytest.mark.parametrize("layout", MAG_LAYOUTS, ids=_ids)
def test_extreme_magnitudes_float32(rng, layout, scale, offset, eps):
    """Outputs representable in float32 come out right, not as inf or 0."""
    shape, axis = layout
    x = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    rm, rv = np.zeros(C), np.ones(C)
    y, m, inv = bncore.batch_norm_train(x, w, b, axis=axis, eps=eps, running_mean=rm,
                                        running_var=rv)
    y_ref, m_ref, inv_ref, var_u = ref.train(x, w, b, axis, eps)
    for got, want in ((y, y_ref), (m, m_ref), (inv, inv_ref), (rm, 0.1 * m_ref),
                      (rv, 0.9 + 0.1 * var_u)):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, **ref.tol(np.float32, scale=np.abs(want).max()))
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, inv, w, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, m, inv, w, axis)
    for got, want in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert np.isfinite(got).all() and (np.abs(got) > 0).any()
        np.testing.assert_allclose(got, want, **ref.tol(np.float32, True, np.abs(want).max()))
    n, sm, m2 = bncore.batch_norm_stats(x, axis=axis)
    np.testing.assert_allclose(m2 / n, 1 / inv_ref.astype(np.float64) ** 2 - eps, rtol=1e-9)
    sdy, sdx = bncore.batch_norm_backward_reduce(dy, x, m, axis=axis)
    dx2 = bncore.batch_norm_backward_elemt(dy, x, m, inv, w, sdy, sdx, n, axis=axis)
    np.testing.assert_allclose(dx2, dx_ref, **ref.tol(np.float32, True, np.abs(dx_ref).max()))
    ye = bncore.batch_norm_eval(x, m_ref, 1 / inv_ref ** 2 - eps, w, b, axis=axis, eps=eps)
    np.testing.assert_allclose(ye, y_ref, **ref.tol(np.float32, scale=np.abs(y_ref).max()))


# ---- constant channels and eps = 0 ------------------------------------------------------------

CONST_LAYOUTS = [((8, 3, 5), 1), ((16, 3, 70, 70), 1), ((4, 50, 50, 3), -1), ((70000, 3), 1),
                 ((2, 3, 5000), 1), ((5, 4, 3), 0)]


@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", CONST_LAYOUTS, ids=_ids)
def test_constant_channel_gives_xhat_exactly_zero(rng, layout, dtype, eps):
    """y == bias exactly, dweight == 0 exactly, for any eps. With eps = 0 the
    variance is 0 and 1/sqrt(0) = inf: invstd is taken as 0 there (PyTorch's
    CPU-kernel convention, documented in RELIABILITY.md), so xhat = 0 (the
    limit as eps -> 0), y = bias and dx = 0 instead of NaN."""
    shape, axis = layout
    C = shape[axis]
    x = rng.standard_normal(shape).astype(dtype)
    np.moveaxis(x, axis, 0)[1] = dtype(1 / 3 * 1e3)  # a value with a long binary expansion
    w = np.linspace(0.5, 1.5, C).astype(dtype)
    b = np.linspace(-1, 1, C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    rm, rv = np.zeros(C), np.ones(C)
    y, m, inv = bncore.batch_norm_train(x, w, b, axis=axis, eps=eps, running_mean=rm,
                                        running_var=rv)
    const = _take(y, 1, axis)
    assert np.all(const == b[1]), np.unique(const)
    assert m[1] == np.float64(dtype(1 / 3 * 1e3)).astype(m.dtype)
    assert rv[1] == 0.9 and np.isfinite(rv).all()  # the variance 0 enters running_var
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, inv, w, axis=axis)
    assert dw[1] == 0
    if eps == 0:
        assert inv[1] == 0 and np.all(_take(dx, 1, axis) == 0)
        ye = bncore.batch_norm_eval(x, m.astype(np.float64), np.zeros(C), w, b, axis=axis, eps=0.0)
        assert np.all(_take(ye, 1, axis) == b[1])
    else:
        assert inv[1] == np.float64(1 / np.sqrt(eps)).astype(inv.dtype)
        g = np.moveaxis(dy.astype(np.float64), axis, 0)[1]
        np.testing.assert_allclose(_take(dx, 1, axis), w[1] * inv[1] * (g - g.mean()),
                                   rtol=2e-3 if dtype == np.float16 else 1e-4, atol=1e-2)
    # the other channels are normal
    others = [c for c in range(C) if c != 1]
    assert np.isfinite(inv).all() and np.all(inv[others] > 0)
    assert np.isfinite(y).all() and np.isfinite(dx).all()


def test_eps_zero_constant_channel_matches_torch_kernel():
    """PyTorch's native CPU kernel takes invstd = 0 at var + eps == 0 too."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(11).standard_normal((6, 3, 7)).astype(np.float32)
    x[:, 1] = 2.5
    y, m, inv = bncore.batch_norm_train(x, eps=0.0)
    ty, tm, tinv = torch.native_batch_norm(torch.from_numpy(x), None, None, None, None, True,
                                           0.1, 0.0)
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inv, tinv.numpy(), rtol=1e-5)
    assert inv[1] == tinv[1].item() == 0
