"""Every function against the float64 NumPy reference, over layouts and dtypes."""
import numpy as np
import pytest

import bncore
import reference as ref
from reference import TOL

# (shape, axis) covering axis=1 with 2-5 dims, channels-last and odd axes
LAYOUTS = [
    ((37, 5), 1),
    ((6, 4, 33), 1),
    ((3, 5, 7, 9), 1),
    ((2, 3, 4, 5, 6), 1),
    ((4, 6, 7, 5), -1),
    ((50, 3), -1),
    ((4, 3, 5, 6), 2),
    ((5, 4, 6), 0),
]
DTYPES = [np.float32, np.float64]


def layout_id(p):
    shape, axis = p
    return "x".join(map(str, shape)) + f"-ax{axis}"


def _data(rng, shape, axis, dtype, offset=0.0):
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + offset).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_train_matches_reference(rng, layout, dtype, affine):
    shape, axis = layout
    x, w, b = _data(rng, shape, axis, dtype, offset=3.0)
    if not affine:
        w = b = None
    C = shape[axis]
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, eps=1e-3, running_mean=rm,
                                              running_var=rv, momentum=0.3)
    y_ref, m_ref, inv_ref, var_unbiased = ref.train(x, w, b, axis, eps=1e-3)
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == invstd.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(mean, m_ref, **TOL[dtype])
    np.testing.assert_allclose(invstd, inv_ref, **TOL[dtype])
    np.testing.assert_allclose(rm, 0.7 * rm0 + 0.3 * m_ref, **TOL[dtype])
    np.testing.assert_allclose(rv, 0.7 * rv0 + 0.3 * var_unbiased, **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_matches_reference(rng, layout, dtype):
    shape, axis = layout
    x, w, b = _data(rng, shape, axis, dtype)
    C = shape[axis]
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    for args in ((w, b), (None, None), (w, None)):
        y = bncore.batch_norm_eval(x, rm, rv, *args, axis=axis, eps=1e-4)
        np.testing.assert_allclose(y, ref.evaluate(x, rm, rv, *args, axis=axis, eps=1e-4),
                                   **TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_backward_matches_reference(rng, layout, dtype, training, affine):
    shape, axis = layout
    x, w, _ = _data(rng, shape, axis, dtype, offset=-2.0)
    if not affine:
        w = None
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, invstd = bncore.batch_norm_train(x, w, axis=axis)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=training)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, axis, training)
    tol = TOL[dtype]
    scale = np.abs(dx_ref).max()
    np.testing.assert_allclose(dx, dx_ref, rtol=tol["rtol"], atol=tol["atol"] * scale)
    np.testing.assert_allclose(dw, dw_ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * np.abs(dw_ref).max())
    np.testing.assert_allclose(db, db_ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * np.abs(db_ref).max())


@pytest.mark.parametrize("layout", [((8, 6, 5, 5), 1), ((4, 5, 5, 6), -1), ((30, 4), 1)],
                         ids=layout_id)
def test_float16_computes_in_float32(rng, layout):
    shape, axis = layout
    x, w, b = _data(rng, shape, axis, np.float16)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis)
    assert y.dtype == np.float16 and mean.dtype == np.float32 and invstd.dtype == np.float32
    y_ref, m_ref, inv_ref, _ = ref.train(x, w, b, axis)
    np.testing.assert_allclose(y, y_ref, **TOL[np.float16])
    np.testing.assert_allclose(mean, m_ref, rtol=1e-6, atol=1e-6)
    dy = rng.standard_normal(shape).astype(np.float16)
    dx, dw, _ = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    assert dx.dtype == np.float16 and dw.dtype == np.float32
    dx_ref, dw_ref, _ = ref.backward(dy, x, mean, invstd, w, axis)
    np.testing.assert_allclose(dx, dx_ref, **ref.tol(np.float16, True, np.abs(dx_ref).max()))
    np.testing.assert_allclose(dw, dw_ref, **ref.tol(np.float32, True, np.abs(dw_ref).max()))
    ye = bncore.batch_norm_eval(x, mean, 1 / invstd**2 - 1e-5, w, b, axis=axis)
    assert ye.dtype == np.float16
    np.testing.assert_allclose(ye, y_ref, **TOL[np.float16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [((6, 5, 4, 4), 1), ((6, 4, 4, 5), -1)], ids=layout_id)
def test_out_and_in_place(rng, dtype, layout):
    shape, axis = layout
    x, w, b = _data(rng, shape, axis, dtype)
    y_ref, _, _, _ = ref.train(x, w, b, axis)
    out = np.empty_like(x)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, out=out)
    assert y is out
    np.testing.assert_allclose(out, y_ref, **TOL[dtype])
    xi = x.copy()
    y2, _, _ = bncore.batch_norm_train(xi, w, b, axis=axis, out=xi)
    assert y2 is xi
    np.testing.assert_array_equal(xi, out)  # same kernel, same answer in place
    # eval in place
    C = shape[axis]
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    xe = x.copy()
    bncore.batch_norm_eval(xe, rm, rv, w, b, axis=axis, out=xe)
    np.testing.assert_allclose(xe, ref.evaluate(x, rm, rv, w, b, axis), **TOL[dtype])
    # backward into dy
    dy = rng.standard_normal(shape).astype(dtype)
    dx_ref, _, _ = ref.backward(dy, x, mean, invstd, w, axis)
    dyc = dy.copy()
    dx, _, _ = bncore.batch_norm_backward(dyc, x, mean, invstd, w, axis=axis, out=dyc)
    assert dx is dyc
    np.testing.assert_allclose(dyc, dx_ref, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * np.abs(dx_ref).max())


def test_out_non_contiguous_and_overlapping(rng):
    x = rng.standard_normal((6, 4, 10)).astype(np.float32)
    y_ref, _, _, _ = ref.train(x, axis=1)
    big = np.zeros((6, 4, 20), np.float32)
    out = big[:, :, ::2]
    y, _, _ = bncore.batch_norm_train(x, out=out)
    assert y is out
    np.testing.assert_allclose(big[:, :, ::2], y_ref, **TOL[np.float32])
    assert not big[:, :, 1::2].any()
    # out overlapping x without being x: computed aside, still right
    buf = rng.standard_normal(6 * 4 * 10 + 7).astype(np.float32)
    xs = buf[:240].reshape(6, 4, 10)
    x0 = xs.copy()
    os_ = buf[7:].reshape(6, 4, 10)
    bncore.batch_norm_train(xs, out=os_)
    np.testing.assert_allclose(os_, ref.train(x0, axis=1)[0], **TOL[np.float32])


@pytest.mark.parametrize("activation", ["relu", ("leaky_relu", 0.1)])
@pytest.mark.parametrize("layout", [((5, 6, 7, 3), 1), ((5, 7, 3, 6), -1)], ids=layout_id)
def test_fused_activation(rng, activation, layout):
    shape, axis = layout
    x, w, b = _data(rng, shape, axis, np.float64)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, activation=activation)
    pre, _, _, _ = ref.train(x, w, b, axis)
    np.testing.assert_allclose(y, ref.activate(pre, activation), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(shape)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                            activation=activation, y=y)
    g = ref.activation_grad(dy, y, activation)
    dx_ref, dw_ref, db_ref = ref.backward(g, x, mean, invstd, w, axis)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, db_ref, rtol=1e-10, atol=1e-12)
    C = shape[axis]
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    ye = bncore.batch_norm_eval(x, rm, rv, w, b, axis=axis, activation=activation)
    np.testing.assert_allclose(ye, ref.activate(ref.evaluate(x, rm, rv, w, b, axis), activation),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_building_blocks_compose_to_train_and_backward(rng, layout):
    shape, axis = layout
    x, w, b = _data(rng, shape, axis, np.float64, offset=5.0)
    ax = axis % x.ndim
    # split along the first non-channel axis into uneven shards, one empty
    split_axis = 0 if ax != 0 else 1
    n = shape[split_axis]
    cuts = [0, n // 3, n // 3, n]
    shards = [np.take(x, range(cuts[i], cuts[i + 1]), axis=split_axis) for i in range(3)]
    triples = [bncore.batch_norm_stats(s, axis=axis) for s in shards]
    assert triples[1][0] == 0
    count, mean, m2 = bncore.merge_stats([t[0] for t in triples], [t[1] for t in triples],
                                         [t[2] for t in triples])
    c_ref, m_ref, m2_ref = ref.stats(x, axis)
    assert count == c_ref
    np.testing.assert_allclose(mean, m_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(m2, m2_ref, rtol=1e-12)
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    y_ref = ref.train(x, w, b, axis)[0]
    y = bncore.batch_norm_elemt(x, mean, invstd, w, b, axis=axis)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(shape)
    sums = [bncore.batch_norm_backward_reduce(np.take(dy, range(cuts[i], cuts[i + 1]), axis=split_axis),
                                              s, mean, axis=axis) for i, s in enumerate(shards)]
    sum_dy = sum(s[0] for s in sums)
    sum_dy_xmu = sum(s[1] for s in sums)
    dx = bncore.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count,
                                          axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, axis)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sum_dy, db_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sum_dy_xmu * invstd, dw_ref, rtol=1e-10, atol=1e-12)


def test_merge_stats_is_associative(rng):
    parts = [rng.standard_normal((k, 7)) * 3 + 100 for k in (5, 1, 13, 8)]
    trip = [ref.stats(p, axis=1) for p in parts]
    flat = bncore.merge_stats(*[[t[i] for t in trip] for i in range(3)])
    left = bncore.merge_stats(*[[t[i] for t in trip[:2]] for i in range(3)])
    right = bncore.merge_stats(*[[t[i] for t in trip[2:]] for i in range(3)])
    tree = bncore.merge_stats(*[[t[i] for t in (left, right)] for i in range(3)])
    full = ref.stats(np.concatenate(parts), axis=1)
    for got in (flat, tree):
        assert got[0] == full[0]
        np.testing.assert_allclose(got[1], full[1], rtol=1e-14)
        np.testing.assert_allclose(got[2], full[2], rtol=1e-12)


def test_merge_stats_with_per_channel_counts(rng):
    """(K, C) counts: each channel merges its own parts; equals the float64
    statistics of each channel's values concatenated (a part may be empty)."""
    C, sizes = 5, [(3, 0, 7, 1, 4), (6, 2, 0, 9, 1), (1, 5, 4, 0, 2)]
    cols = [[rng.standard_normal(n) * 0.5 + 1e4 for n in row] for row in sizes]
    counts = np.array(sizes, float)
    means = np.array([[v.mean() if v.size else 0.0 for v in row] for row in cols])
    m2s = np.array([[((v - v.mean()) ** 2).sum() if v.size else 0.0 for v in row]
                    for row in cols])
    count, mean, m2 = bncore.merge_stats(counts, means, m2s)
    whole = [np.concatenate([row[c] for row in cols]) for c in range(C)]
    np.testing.assert_array_equal(count, [w.size for w in whole])
    np.testing.assert_allclose(mean, [w.mean() for w in whole], rtol=1e-14)
    np.testing.assert_allclose(m2, [((w - w.mean()) ** 2).sum() for w in whole], rtol=1e-10)
    # one count per part, repeated per channel, gives the same bits as (K,)
    same = bncore.merge_stats(np.repeat(counts[:, :1], C, 1), means, m2s)
    flat = bncore.merge_stats(counts[:, 0], means, m2s)
    np.testing.assert_array_equal(same[1], flat[1])
    np.testing.assert_array_equal(same[2], flat[2])
    with pytest.raises(ValueError, match="counts"):
        bncore.merge_stats(counts[:, :3], means, m2s)


def test_running_update_with_per_channel_counts():
    """Each channel's Bessel factor uses its own count."""
    from bncore.functional import update_running
    rm, rv = np.zeros(3), np.ones(3)
    mean, var, count = np.array([[1.0, 2.0, 3.0]]), np.array([[4.0, 4.0, 4.0]]), [[2, 5, 1]]
    update_running(rm, rv, mean, var, count, 0.25)
    np.testing.assert_allclose(rm, 0.25 * mean[0])
    np.testing.assert_allclose(rv, 0.75 + 0.25 * 4.0 * np.array([2 / 1, 5 / 4, 1.0]))


def test_non_contiguous_inputs(rng):
    base = rng.standard_normal((6, 8, 10, 12))
    views = [base[:, ::2], base[::-1], base.transpose(0, 3, 1, 2), np.asfortranarray(base),
             base[..., ::3]]
    for v in views:
        for axis in (1, -1):
            y, mean, invstd = bncore.batch_norm_train(v, axis=axis)
            np.testing.assert_allclose(y, ref.train(v, axis=axis)[0], rtol=1e-12, atol=1e-12)
            dy = np.ones_like(v)[..., ::-1] * np.linspace(-1, 1, v.shape[-1])
            dx, _, _ = bncore.batch_norm_backward(dy, v, mean, invstd, axis=axis)
            np.testing.assert_allclose(dx, ref.backward(dy, v, mean, invstd, axis=axis)[0],
                                       rtol=1e-9, atol=1e-11)


def test_read_only_inputs_work_and_are_unchanged(rng):
    x = rng.standard_normal((8, 3, 5, 5)).astype(np.float32)
    w = np.linspace(0.5, 1.5, 3).astype(np.float32)
    snapshot = x.copy()
    x.flags.writeable = False
    w.flags.writeable = False
    y, mean, invstd = bncore.batch_norm_train(x, w)
    dy = np.ones_like(x)
    dy.flags.writeable = False
    bncore.batch_norm_backward(dy, x, mean, invstd, w)
    bncore.batch_norm_eval(x, mean, 1 / invstd**2, w)
    np.testing.assert_array_equal(x, snapshot)


def test_empty_channels_and_zero_batch(rng):
    x = np.zeros((4, 0, 3), np.float32)
    y, m, inv = bncore.batch_norm_train(x)
    assert y.shape == x.shape and m.shape == (0,)
    count, mean, m2 = bncore.batch_norm_stats(np.zeros((0, 5)))
    assert count == 0 and not mean.any() and not m2.any()


@pytest.mark.parametrize("shape,axis", [
    ((10, 40, 7), 1),          # short inner runs: row layout, tiles of whole channels
    ((3000, 100, 3), 1),       # ... over several rounds
    ((3, 3000), 1),            # wide channels-last: several column tiles
    ((600, 700), -1),
    ((1, 7, 100000), 1),       # long planes split into runs
    ((2, 1, 9000), 1),         # one channel
    ((97, 3), -1),             # prime row count: no folding
    ((4096, 2, 2), -1),        # folded rows
], ids=lambda v: str(v))
def test_work_decomposition_edges(rng, shape, axis):
    x = (rng.standard_normal(shape) * 2 + 7).astype(np.float32)
    C = shape[axis]
    w, b = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis)
    y_ref, m_ref, inv_ref, _ = ref.train(x, w, b, axis)
    np.testing.assert_allclose(y, y_ref, **TOL[np.float32])
    np.testing.assert_allclose(invstd, inv_ref, rtol=1e-5)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, axis)
    np.testing.assert_allclose(dx, dx_ref, **ref.tol(np.float32, True, np.abs(dx_ref).max()))
    np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("axis", [1, -1])
def test_large_outputs_bypassing_the_cache(rng, axis):
    # > 16 MB: outputs are written with non-temporal stores
    shape = (8, 64, 96, 96) if axis == 1 else (8, 96, 96, 64)
    x = rng.standard_normal(shape, dtype=np.float32) + 3
    C = 64
    w, b = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, activation="relu")
    y_ref, _, _, _ = ref.train(x, w, b, axis)
    np.testing.assert_allclose(y, ref.activate(y_ref, "relu"), **TOL[np.float32])
    dy = rng.standard_normal(shape, dtype=np.float32)
    dx, _, _ = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    dx_ref, _, _ = ref.backward(dy, x, mean, invstd, w, axis)
    np.testing.assert_allclose(dx, dx_ref, **ref.tol(np.float32, True, np.abs(dx_ref).max()))
    bncore.batch_norm_eval(x, mean, 1 / invstd.astype(np.float64) ** 2 - 1e-5, w, b, axis=axis, out=x)
    np.testing.assert_allclose(x, y_ref, **TOL[np.float32])
