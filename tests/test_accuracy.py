"""float32 statistics stay accurate where E[x^2]-E[x]^2 and naive sums fail."""
import numpy as np
import pytest

import bncore
import reference as ref


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
def test_variance_at_mean_1e4(rng, layout):
    x = (1e4 + rng.standard_normal((16, 8, 32, 32))).astype(np.float32)
    axis = 1
    if layout == "nhwc":
        x, axis = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), -1
    elif layout == "nc":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(-1, 8))
    _, mean, invstd = bncore.batch_norm_train(x, axis=axis, eps=0.0)
    _, m_ref, inv_ref, _ = ref.train(x, axis=axis, eps=0.0)
    var, var_ref = 1 / invstd.astype(np.float64) ** 2, 1 / inv_ref**2
    assert np.max(np.abs(var / var_ref - 1)) < 1e-3
    assert np.max(np.abs(mean / m_ref - 1)) < 1e-7
    count, m, m2 = bncore.batch_norm_stats(x, axis=axis)
    np.testing.assert_allclose(m2 / count, var_ref, rtol=1e-6)


def test_backward_sums_are_centered_at_mean_1e4(rng):
    x = (1e4 + rng.standard_normal((64, 4, 16, 16))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, invstd = bncore.batch_norm_train(x)
    _, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd)
    _, dw_ref, db_ref = ref.backward(dy, x, mean, invstd)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_mean_of_1e8_elements_per_channel():
    # 1e8 float32 values in one channel: a float32 running sum would stall at 2**24 * ulp
    n = 100_000_000
    x = np.full((1, 1, n), 0.1, np.float32)
    x[0, 0, ::2] = 0.3  # exact mean of the float32 values computed below
    exact = (np.float64(np.float32(0.1)) + np.float64(np.float32(0.3))) / 2
    count, mean, m2 = bncore.batch_norm_stats(x)
    assert count == n
    assert abs(mean[0] / exact - 1) < 1e-6
    assert abs(m2[0] / n / (np.float64(np.float32(0.3)) - exact) ** 2 - 1) < 1e-6
    xl = x.reshape(n, 1)  # the channels-last path
    _, mean_cl, _ = bncore.batch_norm_stats(xl, axis=-1)
    assert abs(mean_cl[0] / exact - 1) < 1e-6


@pytest.mark.parametrize("shape", [(32, 3, 8), (4, 3, 100), (40, 5)])  # row and run layouts
def test_huge_magnitudes_float32(rng, shape):
    # squares of 1e30 overflow float32: those blocks are redone in double
    x = (rng.standard_normal(shape) * 1e30).astype(np.float32)
    y, mean, invstd = bncore.batch_norm_train(x)
    y_ref, m_ref, inv_ref, _ = ref.train(x, eps=0.0)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(invstd, inv_ref, rtol=1e-5)


def test_constant_channel_gives_exact_zero():
    x = np.full((8, 2, 5), 3.7, np.float32)
    x[:, 1] = np.arange(40, dtype=np.float32).reshape(8, 5)
    y, mean, invstd = bncore.batch_norm_train(x)
    assert np.all(y[:, 0] == 0)
    assert mean[0] == np.float32(3.7)


@pytest.mark.parametrize("shape,axis", [((3, 2, 5000), 1), ((40, 3, 7), 1), ((300, 5), 1),
                                        ((2, 9, 9, 4), -1)])
@pytest.mark.parametrize("stride", [1, 7, 4096])
def test_statistics_with_outliers_where_the_shift_is_taken(rng, shape, axis, stride):
    # the one-pass statistics subtract a shift taken from the first values of
    # each run or tile; outliers there are the worst case for s2 - s1^2/n, which
    # must still match an exact float64 two-pass computation to ~1e-13
    x = rng.standard_normal(shape)
    flat = x.reshape(-1)
    flat[:16 * stride:stride] = 1e6 * np.sign(flat[:16 * stride:stride])
    count, mean, m2 = bncore.batch_norm_stats(x, axis=axis)
    _, m_ref, m2_ref = ref.stats(x, axis)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-13, atol=1e-9)
    np.testing.assert_allclose(m2, m2_ref, rtol=1e-13)
