"""Size limits: more than 2**31 elements, one value per channel, one channel,
hundreds of thousands of channels.

Arrays of more than 2**31 elements without the memory: np.zeros maps its
pages lazily to the kernel's shared zero page, so a read-only kernel (stats,
backward_reduce) can sweep 8.6 GB of them with almost no resident memory.
A few values written far past element 2**31 (one page each) make the answer
depend on every offset being computed in 64 bits: an index wrapped at 2**31
or 2**32 reads a zero instead and the statistics come out wrong.
"""
import numpy as np
import pytest

import bncore
import reference as ref

BIG = 2**31 + 3 * 4096 + 5  # elements: past 2**31, not a multiple of the kernels' blocks


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _lazy_zeros(n, dtype=np.float32):
    try:
        return np.zeros(n, dtype)
    except MemoryError:
        pytest.skip(f"cannot map {n * np.dtype(dtype).itemsize / 2**30:.1f} GiB of virtual memory")


def _spiked(shape, axis, spikes, seed):
    """A lazily mapped zero array with `spikes` values at random flat positions
    past 2**31 (and one at 0), and its exact per-channel statistics."""
    x = _lazy_zeros(int(np.prod(shape))).reshape(shape)
    rng = np.random.default_rng(seed)
    flat = x.reshape(-1)
    pos = np.concatenate([[0], rng.integers(2**31, flat.size, spikes), [flat.size - 1]])
    flat[pos] = rng.uniform(1, 100, pos.size).astype(np.float32)
    chan = np.unravel_index(pos, shape)[axis % len(shape)]
    C = shape[axis]
    count = flat.size // C
    sums = np.bincount(chan, weights=flat[pos].astype(np.float64), minlength=C)
    mean = sums / count
    # M2 = sum over spikes of (v - mean)^2 + (count - spikes in channel) * mean^2
    nz = np.bincount(chan, minlength=C)
    m2 = (np.bincount(chan, weights=(flat[pos] - mean[chan]) ** 2, minlength=C)
          + (count - nz) * mean**2)
    return x, count, mean, m2, pos, chan


# NCHW with one plane per channel longer than 2**30; many planes; channels-last
BIG_LAYOUTS = [((1, 2, BIG // 2), 1), ((BIG // (3 * 4099) + 1, 3, 4099), 1), ((BIG // 3, 3), -1)]


@pytest.mark.parametrize("shape,axis", BIG_LAYOUTS,
                         ids=["2-planes-of-2^30", "many-planes", "channels-last"])
def test_more_than_2_31_elements_without_the_memory(shape, axis):
    assert np.prod(shape) > 2**31
    x, count, mean, m2, pos, chan = _spiked(shape, axis, 40, seed=len(shape) + shape[-1])
    n, got_mean, got_m2 = bncore.batch_norm_stats(x, axis=axis)
    assert n == count > 2**29
    # statistics are summed in double: a wrapped index losing a spike is off by %
    np.testing.assert_allclose(got_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(got_m2, m2, rtol=1e-9)
    # backward_reduce on two such arrays: sum(dy) and sum(dy * (x - mean))
    dy = x  # the same lazily mapped array, read twice
    sdy, sdx = bncore.batch_norm_backward_reduce(dy, x, mean, axis=axis)
    vals = x.reshape(-1)[pos].astype(np.float64)
    C = shape[axis]
    np.testing.assert_allclose(sdy, np.bincount(chan, weights=vals, minlength=C), rtol=1e-12)
    # sum over all elements of x*(x - mean) = sum over spikes of v*(v - mean): zeros add nothing
    np.testing.assert_allclose(sdx, np.bincount(chan, weights=vals * (vals - mean[chan]),
                                                minlength=C), rtol=1e-9)


@pytest.mark.slow
def test_in_place_eval_on_a_9_gb_array(rng):
    """Writes every element, so it needs the memory: skipped below 2x the array."""
    n = 2**31 + 2**28 + 7  # 9.7 GB of float32
    if _mem_available() < 2 * 4 * n:
        pytest.skip(f"needs {2 * 4 * n / 2**30:.0f} GiB available, "
                    f"have {_mem_available() / 2**30:.1f}")
    x = np.empty((1, 1, n), np.float32)
    x[...] = 3.0
    pos = np.concatenate([[0, n - 1], rng.integers(2**31, n, 20)])
    x.reshape(-1)[pos] = -5.0
    count, mean, m2 = bncore.batch_norm_stats(x)
    k = np.unique(pos).size
    exact_mean = (3.0 * (n - k) - 5.0 * k) / n
    assert count == n and abs(mean[0] / exact_mean - 1) < 1e-12
    rv = m2 / n
    y = bncore.batch_norm_eval(x, mean, rv, np.array([2.0]), np.array([0.5]), out=x, eps=0.0)
    assert y is x
    inv = 1 / np.sqrt(rv[0])
    hi = np.float32((3.0 - mean[0]) * inv * 2 + 0.5)
    lo = np.float32((-5.0 - mean[0]) * inv * 2 + 0.5)
    flat = x.reshape(-1)
    # float32 rounding of the coefficients may move y by an ulp from the float64
    # value, but every 3.0 must map to the same y
    y3 = flat[np.setdiff1d(np.arange(3), pos)[0]]
    np.testing.assert_allclose(y3, hi, rtol=1e-6)
    np.testing.assert_allclose(flat[pos], lo, rtol=1e-6)
    step = 2**27
    for s in range(0, n, step):  # every element, a chunk at a time
        bad = np.flatnonzero(flat[s:s + step] != y3) + s
        assert np.isin(bad, pos).all(), f"wrong value at element {bad[~np.isin(bad, pos)][0]}"


# ---- one value per channel, one channel ------------------------------------------------------

SINGLE = [((1, 4), 1), ((1, 4, 1, 1), 1), ((1, 1, 1, 4), -1), ((1, 1), 1), ((1, 1, 1), 0)]


@pytest.mark.parametrize("shape,axis", SINGLE, ids=[str(s[0]) for s in SINGLE])
def test_one_value_per_channel(rng, shape, axis):
    """N*HW == 1: training refuses (no variance), leaving state as it was;
    everything that does not need a batch variance works."""
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    C = shape[axis]
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    rm0, rv0 = rm.copy(), rv.copy()
    with pytest.raises(ValueError, match="^x: expected more than 1 value per channel"):
        bncore.batch_norm_train(x, axis=axis, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    layer = bncore.BatchNorm(C, axis=axis, dtype=np.float64)
    with pytest.raises(ValueError, match="^x: "):
        layer(x)
    assert int(layer.num_batches_tracked) == 0
    layer.eval()
    np.testing.assert_allclose(layer(x), ref.evaluate(x, np.zeros(C), np.ones(C), axis=axis),
                               rtol=1e-12)
    y = bncore.batch_norm_eval(x, rm, rv, axis=axis)
    np.testing.assert_allclose(y, ref.evaluate(x, rm, rv, axis=axis), rtol=1e-12)
    inv = 1 / np.sqrt(rv)
    for training in (True, False):
        got = bncore.batch_norm_backward(dy, x, rm, inv, axis=axis, training=training)
        want = ref.backward(dy, x, rm, inv, axis=axis, training=training)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
    n, mean, m2 = bncore.batch_norm_stats(x, axis=axis)
    assert n == 1
    np.testing.assert_array_equal(mean, np.moveaxis(x, axis, -1).reshape(-1))
    np.testing.assert_array_equal(m2, 0)


@pytest.mark.parametrize("shape,axis", [((50, 1), 1), ((4, 1, 9, 9), 1), ((3, 7, 7, 1), -1),
                                        ((2, 1), 1), ((70000, 1), -1), ((2, 1, 40000), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_channel(rng, shape, axis, dtype):
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = np.array([1.5]), np.array([-0.5])
    rm, rv = np.zeros(1), np.ones(1)
    tol = ref.GRAD_TOL[dtype]
    y, m, inv = bncore.batch_norm_train(x, w, b, axis=axis, running_mean=rm, running_var=rv)
    y_ref, m_ref, inv_ref, var_u = ref.train(x, w, b, axis)
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var_u, **tol)
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, inv, w, axis=axis)
    for g, r in zip((dx, dw, db), ref.backward(dy, x, m, inv, w, axis)):
        np.testing.assert_allclose(g, r, rtol=tol["rtol"],
                                   atol=tol["atol"] * max(1, np.abs(r).max()))
    np.testing.assert_allclose(bncore.batch_norm_eval(x, rm, rv, w, b, axis=axis),
                               ref.evaluate(x, rm, rv, w, b, axis), **tol)


# ---- hundreds of thousands of channels ---------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((4, 300_000), 1), ((2, 300_000, 3), 1),
                                        ((2, 2, 300_000), -1), ((3, 2, 200_001), 2)],
                         ids=["NC", "NCL", "NLC", "odd-axis"])
def test_hundreds_of_thousands_of_channels(rng, shape, axis):
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, m, inv = bncore.batch_norm_train(x, w, b, axis=axis, running_mean=rm, running_var=rv,
                                        eps=1e-3)
    y_ref, m_ref, inv_ref, var_u = ref.train(x, w, b, axis, eps=1e-3)
    np.testing.assert_allclose(y, y_ref, **ref.TOL[np.float32])
    np.testing.assert_allclose(m, m_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var_u, rtol=1e-5)
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, inv, w, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, m, inv, w, axis)
    np.testing.assert_allclose(dx, dx_ref, **ref.tol(np.float32, True, np.abs(dx_ref).max()))
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-5)
    ye = bncore.batch_norm_eval(x, rm, rv, w, b, axis=axis)
    np.testing.assert_allclose(ye, ref.evaluate(x, rm, rv, w, b, axis), **ref.TOL[np.float32])
    # distributed building blocks at this width
    parts = [bncore.batch_norm_stats(p, axis=axis) for p in np.array_split(x, 2, axis=0)]
    n, mean, m2 = bncore.merge_stats([p[0] for p in parts], [p[1] for p in parts],
                                     [p[2] for p in parts])
    cnt, mean_ref, m2_ref = ref.stats(x, axis)
    assert n == cnt
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m2, m2_ref, rtol=1e-9, atol=1e-9)


# ---- no elements ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((257, 0), 0), ((4, 3, 0), 1), ((2, 300, 0), 1),
                                        ((3, 0, 5), 0), ((0, 3), 1), ((0, 3, 4), 1), ((4, 0), 1),
                                        ((2, 0, 7), 1)])
def test_zero_elements_per_channel_or_no_channels(shape, axis):
    """Empty sums are 0, empty outputs are empty; training on a zero batch gives
    an empty output with mean 0 and invstd 0 (tests/test_empty_batches.py)."""
    x = np.zeros(shape, np.float32)
    C = shape[axis]
    ones = np.ones(C)
    for training in (True, False):
        dx, dw, db = bncore.batch_norm_backward(x, x, ones, ones, axis=axis, training=training)
        assert dx.shape == shape and dw.shape == db.shape == (C,)
        np.testing.assert_array_equal(dw, 0)
        np.testing.assert_array_equal(db, 0)
    n, mean, m2 = bncore.batch_norm_stats(x, axis=axis)
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(m2, 0)
    sdy, sdx = bncore.batch_norm_backward_reduce(x, x, ones, axis=axis)
    np.testing.assert_array_equal(sdy, 0)
    np.testing.assert_array_equal(sdx, 0)
    assert bncore.batch_norm_eval(x, ones, ones, axis=axis).shape == shape
    assert bncore.batch_norm_elemt(x, ones, ones, axis=axis).shape == shape
    if n == 0:
        y, m, inv = bncore.batch_norm_train(x, axis=axis)
        assert y.shape == shape and m.shape == inv.shape == (C,)
        np.testing.assert_array_equal(m, 0)
        np.testing.assert_array_equal(inv, 0)
    else:
        y, m, inv = bncore.batch_norm_train(x, axis=axis)
        assert y.shape == shape and m.shape == inv.shape == (0,)
