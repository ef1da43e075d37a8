"""Masked statistics (padded batches): batch, group and instance norm over the
unmasked values only, against the float64 oracle of the unpadded values
(tests/reference.py), finite differences of the masked loss, and refusals
that change nothing."""
import warnings

import numpy as np
import pytest

import bncore
import reference as ref
from bncore.functional import masked_backward_reduce, masked_stats

LAYOUTS = [  # (x shape, channel axis, mask shape)
    ((5, 3, 7), 1, (5, 1, 7)),        # (N, C, T)
    ((9, 4), 1, (9, 1)),              # (N, C), per-sample mask
    ((9, 4), 1, (9, 4)),              # (N, C), per-entry mask
    ((4, 6, 3), -1, (4, 6, 1)),       # channels-last (N, T, C)
    ((3, 2, 4, 5), 1, (3, 1, 4, 5)),  # NCHW
    ((3, 4, 5, 2), -1, (3, 4, 5, 2)),  # NHWC
]


def _mask(rng, shape, p=0.6):
    m = rng.random(shape) < p
    return m


def _padded(rng, N, C, T, dtype=np.float64):
    """(x (N, C, T) with garbage in the padding, lengths)."""
    lengths = rng.integers(2, T + 1, N)
    x = rng.standard_normal((N, C, T))
    for i, n in enumerate(lengths):
        x[i, :, n:] = 1e6 * rng.standard_normal((C, T - n))  # must not matter
    return x.astype(dtype), lengths


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,mshape", LAYOUTS)
def test_train_equals_batch_norm_of_the_unpadded_values(rng, dtype, shape, axis, mshape):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    mask = _mask(rng, mshape)
    C = shape[axis]
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.random(C) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, mask=mask, running_mean=rm,
                                              running_var=rv, momentum=0.3)
    want, m_ref, inv_ref, count, var = ref.masked_train(x, mask, w, b, axis=axis)
    t = ref.tol(dtype)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(y, want, **ref.tol(dtype, scale=np.abs(want).max()))
    np.testing.assert_allclose(mean, m_ref, **t)
    np.testing.assert_allclose(invstd, inv_ref, **t)
    present = count > 0
    unbiased = np.where(count > 1, var * count / np.maximum(count - 1, 1), var)
    np.testing.assert_allclose(rm, np.where(present, 0.7 * rm0 + 0.3 * m_ref, rm0), **t)
    np.testing.assert_allclose(rv, np.where(present, 0.7 * rv0 + 0.3 * unbiased, rv0), **t)


@pytest.mark.parametrize("shape,axis,mshape", LAYOUTS)
def test_backward_equals_the_unpadded_gradient(rng, shape, axis, mshape):
    x = rng.standard_normal(shape)
    mask = _mask(rng, mshape)
    C = shape[axis]
    w = rng.standard_normal(C)
    _, mean, invstd = bncore.batch_norm_train(x, w, axis=axis, mask=mask)
    dy = rng.standard_normal(shape)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, mask=mask)
    want = ref.masked_backward(dy, x, mask, mean, invstd, w, axis=axis)
    for got, exp in zip((dx, dw, db), want):
        np.testing.assert_allclose(got, exp, **ref.tol(np.float64, grad=True))
    assert not dx[~np.broadcast_to(mask, shape)].any()


def test_backward_matches_finite_differences_of_the_masked_loss(rng):
    x, lengths = _padded(rng, 3, 2, 5)
    x[:, :, :] = np.where(np.arange(5) < lengths[:, None, None], x, 3.0)  # moderate padding
    mask = np.arange(5)[None, None, :] < lengths[:, None, None]
    w, b = rng.standard_normal(2), rng.standard_normal(2)
    dy = rng.standard_normal(x.shape)

    def loss():
        y = bncore.batch_norm_train(x, w, b, lengths=lengths, eps=1e-3)[0]
        return float((dy * y * mask).sum())

    _, mean, invstd = bncore.batch_norm_train(x, w, b, lengths=lengths, eps=1e-3)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, lengths=lengths)
    ref.assert_grads(loss, [(x, dx), (w, dw), (b, db)], rtol=1e-5, atol=1e-7)


def test_lengths_build_the_mask_over_the_sequence_axis(rng):
    x, lengths = _padded(rng, 4, 3, 6)
    lengths[1] = 0
    mask = np.arange(6)[None, None, :] < lengths[:, None, None]
    a = bncore.batch_norm_train(x, lengths=lengths)
    b = bncore.batch_norm_train(x, mask=mask)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    # channels-last (N, T, C): the sequence axis is 1
    xt = np.ascontiguousarray(x.transpose(0, 2, 1))
    c = bncore.batch_norm_train(xt, axis=-1, lengths=lengths)
    np.testing.assert_allclose(c[0], a[0].transpose(0, 2, 1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c[1], a[1], rtol=1e-12)
    # ghost batches: each its own masked statistics
    d = bncore.batch_norm_train(x, lengths=lengths, virtual_batch_size=2)
    for g in range(2):
        part = bncore.batch_norm_train(x[2 * g:2 * g + 2], lengths=lengths[2 * g:2 * g + 2])
        np.testing.assert_allclose(d[0][2 * g:2 * g + 2], part[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(d[1][g], part[1])


def test_ghost_batches_compose_with_the_mask(rng):
    x, lengths = _padded(rng, 5, 3, 4)
    mask = np.arange(4)[None, None, :] < lengths[:, None, None]
    w = rng.standard_normal(3)
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, invstd = bncore.batch_norm_train(x, w, mask=mask, virtual_batch_size=2,
                                              running_mean=rm, running_var=rv, momentum=1.0)
    assert mean.shape == invstd.shape == (3, 3)
    dy = rng.standard_normal(x.shape)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, mask=mask,
                                            virtual_batch_size=2)
    means, varsu, dws = [], [], np.zeros(3)
    for g, sl in enumerate((slice(0, 2), slice(2, 4), slice(4, 5))):
        yr, mr, ir, cnt, var = ref.masked_train(x[sl], mask[sl], w)
        np.testing.assert_allclose(y[sl], yr, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(mean[g], mr, rtol=1e-12)
        gx, gw, _ = ref.masked_backward(dy[sl], x[sl], mask[sl], mr, ir, w)
        np.testing.assert_allclose(dx[sl], gx, rtol=1e-10, atol=1e-10)
        dws += gw
        means.append(mr)
        varsu.append(var * cnt / (cnt - 1))
    np.testing.assert_allclose(dw, dws, rtol=1e-10)
    np.testing.assert_allclose(rm, np.mean(means, 0), rtol=1e-12)
    np.testing.assert_allclose(rv, np.mean(varsu, 0), rtol=1e-12)


def test_out_and_thread_counts_are_bit_identical(rng):
    x = (rng.standard_normal((64, 8, 300)) + 5).astype(np.float32)  # > 64K values: threaded
    lengths = rng.integers(0, 301, 64)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    for nt in (1, 2, 3):
        rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
        out = np.empty_like(x)
        y, m, inv = bncore.batch_norm_train(x, lengths=lengths, out=out, n_threads=nt,
                                            running_mean=rm, running_var=rv)
        assert y is out
        dx = np.empty_like(x)
        g = bncore.batch_norm_backward(dy, x, m, inv, lengths=lengths, out=dx, n_threads=nt)
        assert g[0] is dx
        results.append((y, m, inv, rm, rv) + g)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            np.testing.assert_array_equal(a, b)


def test_float32_accurate_when_mean_dwarfs_std(rng):
    x64 = 1e4 + rng.standard_normal((16, 3, 50)) * 1e-2
    x = x64.astype(np.float32)
    lengths = rng.integers(2, 51, 16)
    mask = np.arange(50)[None, None, :] < lengths[:, None, None]
    y, mean, invstd = bncore.batch_norm_train(x, lengths=lengths, eps=0.0)
    _, m_ref, inv_ref, _, _ = ref.masked_train(x.astype(np.float64), mask, eps=0.0)
    np.testing.assert_allclose(invstd, inv_ref, rtol=1e-5)
    yr = (x.astype(np.float64) - m_ref[None, :, None]) * inv_ref[None, :, None]
    np.testing.assert_allclose(y[np.broadcast_to(mask, x.shape)],
                               yr[np.broadcast_to(mask, x.shape)], rtol=1e-3, atol=1e-3)


def test_a_channel_without_values_outputs_bias_and_keeps_its_running_stats(rng):
    x = rng.standard_normal((6, 3, 4))
    mask = np.ones(x.shape, bool)
    mask[:, 1] = False
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, mean, invstd = bncore.batch_norm_train(x, w, b, mask=mask, running_mean=rm,
                                                  running_var=rv, eps=0.0)
        dx, dw, db = bncore.batch_norm_backward(rng.standard_normal(x.shape), x, mean, invstd,
                                                w, mask=mask)
    np.testing.assert_array_equal(y[:, 1], b[1])
    assert mean[1] == 0 and invstd[1] == 0
    assert rm[1] == 0.5 and rv[1] == 2.0 and rm[0] != 0.5
    assert dw[1] == 0 and db[1] == 0 and not dx[:, 1].any()
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    # nothing unmasked at all: every channel so
    y, mean, invstd = bncore.batch_norm_train(x, bias=b, mask=np.zeros((6, 1, 1), bool),
                                              running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None], x.shape))
    assert rm[1] == 0.5 and rv[1] == 2.0


def _refused(call, match, error=ValueError):
    with pytest.raises(error, match=match):
        call()


def test_refusals_change_nothing(rng):
    x = rng.standard_normal((4, 3, 5))
    lengths = np.array([5, 2, 3, 1])
    rm, rv, out = np.zeros(3), np.ones(3), np.full(x.shape, 7.0)
    good = np.ones((4, 1, 5), bool)
    bad = [
        (dict(mask=np.ones((4, 2, 5), bool)), ValueError, "^mask: expected a shape"),
        (dict(mask=np.ones((4, 1, 5), np.int8)), TypeError, "^mask: expected a boolean"),
        (dict(lengths=np.array([5, 2, 6, 1])), ValueError,
         r"^lengths: expected lengths in \[0, 5\]"),
        (dict(lengths=np.array([5, 2, -1, 1])), ValueError, "^lengths: expected lengths"),
        (dict(lengths=np.array([5, 2, 3])), ValueError, r"^lengths: expected shape \(4,\)"),
        (dict(lengths=np.array([5.0, 2, 3, 1])), TypeError, "^lengths: expected an integer"),
        (dict(mask=good, lengths=lengths), ValueError, "^lengths: expected None when mask"),
        (dict(mask=np.arange(20).reshape(4, 1, 5) == 7), ValueError,
         "^mask: expected 0 or more than 1 unmasked value"),
    ]
    for kw, err, match in bad:
        _refused(lambda: bncore.batch_norm_train(x, running_mean=rm, running_var=rv, out=out,
                                                 **kw), match, err)
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)
        np.testing.assert_array_equal(out, 7.0)
    _refused(lambda: bncore.batch_norm_train(rng.standard_normal((2, 3, 4, 5)),
                                             lengths=np.array([1, 2])),
             "^lengths: expected x with exactly one sequence axis")
    # the layer: running statistics, counter and record unchanged
    bn = bncore.BatchNorm(3, dtype=np.float64)
    bn(x, lengths=lengths)
    record, state = bn._saved, {k: v.copy() for k, v in bn.state_dict().items()}
    for kw, err, match in bad:
        _refused(lambda: bn(x, **kw), match, err)
        assert bn._saved is record
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(v, state[k])
    _refused(lambda: bncore.LayerNorm(5)(x, mask=good), "^mask: LayerNorm does not take")
    _refused(lambda: bncore.BatchRenorm(3)(x, lengths=lengths),
             "^lengths: BatchRenorm does not take")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_keeps_the_mask_for_backward(rng, dtype):
    x, lengths = _padded(rng, 5, 3, 6, dtype)
    mask = np.arange(6)[None, None, :] < lengths[:, None, None]
    bn = bncore.BatchNorm(3, dtype=dtype, momentum=0.5)
    bn.weight[...] = rng.standard_normal(3)
    y = bn(x, lengths=lengths)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = bn.backward(dy)
    yr, m, inv, count, var = ref.masked_train(x, mask, bn.weight)
    sel = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(y[sel], yr[sel], **ref.tol(dtype))
    gx, gw, gb = ref.masked_backward(dy, x, mask, m, inv, bn.weight)
    np.testing.assert_allclose(dx, gx, **ref.tol(dtype, grad=True))
    np.testing.assert_allclose(bn.grad_weight, gw, **ref.tol(dtype, grad=True))
    np.testing.assert_allclose(bn.grad_bias, gb, **ref.tol(dtype, grad=True))
    np.testing.assert_allclose(bn.running_mean, 0.5 * m, **ref.tol(dtype))
    assert int(bn.num_batches_tracked) == 1
    # eval mode: the running statistics; the mask limits the gradients
    bn.eval()
    bn(x, mask=mask)
    dx = bn.backward(dy)
    assert not dx[~sel].any()
    np.testing.assert_allclose(bn.grad_bias, np.where(sel, dy, 0).sum((0, 2)),
                               **ref.tol(dtype, grad=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_and_instance_norm_over_the_unmasked_values(rng, dtype):
    x, lengths = _padded(rng, 4, 6, 5, dtype)
    mask = np.arange(5)[None, None, :] < lengths[:, None, None]
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    dy = rng.standard_normal(x.shape).astype(dtype)
    sel = np.broadcast_to(mask, x.shape)
    for G in (1, 3, 6):
        y, mean, invstd = bncore.group_norm_train(x, G, w, b, lengths=lengths)
        yr, mr, ir = ref.masked_group_norm(x, mask, G, w, b)
        np.testing.assert_allclose(y[sel], yr[sel], **ref.tol(dtype, scale=10))
        np.testing.assert_allclose(mean, mr, **ref.tol(dtype))
        np.testing.assert_allclose(invstd, ir, **ref.tol(dtype))
        dx, dw, db = bncore.group_norm_backward(dy, x, G, mean, invstd, w, lengths=lengths)
        # the reference gradient: group norm of each sample's unpadded values
        for n in range(4):
            xs = x[n:n + 1, :, :lengths[n]].astype(np.float64)
            _, ms, iss = bncore.group_norm_train(xs, G, w)
            gx = bncore.group_norm_backward(dy[n:n + 1, :, :lengths[n]].astype(np.float64), xs,
                                            G, ms, iss, w)[0]
            np.testing.assert_allclose(dx[n, :, :lengths[n]], gx[0],
                                       **ref.tol(dtype, grad=True))
        assert not dx[~sel].any()
        np.testing.assert_allclose(db, np.where(sel, dy, 0).sum((0, 2)),
                                   **ref.tol(dtype, grad=True))
    yi, mi, ii = bncore.instance_norm_train(x, w, b, lengths=lengths)
    yg, mg, ig = bncore.group_norm_train(x, 6, w, b, lengths=lengths)
    np.testing.assert_array_equal(yi, yg)
    np.testing.assert_array_equal(bncore.instance_norm(x, weight=w, bias=b, lengths=lengths),
                                  yi)
    np.testing.assert_array_equal(bncore.group_norm(x, 3, w, b, lengths=lengths),
                                  bncore.group_norm_train(x, 3, w, b, lengths=lengths)[0])


def test_group_norm_backward_matches_finite_differences(rng):
    x, lengths = _padded(rng, 2, 4, 5)
    x = np.where(np.arange(5) < lengths[:, None, None], x, 0.5)
    mask = np.arange(5)[None, None, :] < lengths[:, None, None]
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    dy = rng.standard_normal(x.shape)

    def loss():
        return float((dy * mask * bncore.group_norm(x, 2, w, b, eps=1e-3, mask=mask)).sum())

    _, mean, invstd = bncore.group_norm_train(x, 2, w, b, eps=1e-3, mask=mask)
    dx, dw, db = bncore.group_norm_backward(dy, x, 2, mean, invstd, w, mask=mask)
    ref.assert_grads(loss, [(x, dx), (w, dw), (b, db)], rtol=1e-5, atol=1e-7)


def test_instance_norm_running_statistics_and_layers(rng):
    x, lengths = _padded(rng, 4, 3, 6)
    lengths[2] = 0  # an instance without values: left out of the running average
    mask = np.arange(6)[None, None, :] < lengths[:, None, None]
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, invstd = bncore.instance_norm_train(x, lengths=lengths, running_mean=rm,
                                                 running_var=rv, momentum=1.0)
    keep = [0, 1, 3]
    vals = [x[n, :, :lengths[n]] for n in keep]
    np.testing.assert_allclose(rm, np.mean([v.mean(1) for v in vals], 0), rtol=1e-12)
    np.testing.assert_allclose(rv, np.mean([v.var(1, ddof=1) for v in vals], 0), rtol=1e-12)
    assert not invstd[2].any() and np.isfinite(y).all()
    layer = bncore.InstanceNorm(3, affine=True, dtype=np.float64)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(layer(x, mask=mask), y)
    dx = layer.backward(dy)
    want = bncore.instance_norm_backward(dy, x, mean, invstd, layer.weight, mask=mask)
    np.testing.assert_array_equal(dx, want[0])
    np.testing.assert_array_equal(layer.grad_weight, want[1])
    gn = bncore.GroupNorm(3, 3, dtype=np.float64)
    np.testing.assert_array_equal(gn(x, lengths=lengths), y)
    np.testing.assert_array_equal(gn.backward(dy), dx)
    # a refused mask leaves the record; one value per instance is refused (as
    # unmasked instance norm refuses one spatial value), not per group
    one = np.eye(6, dtype=bool)[None, :3, :].repeat(4, 0)
    record = layer._saved
    with pytest.raises(ValueError, match="^mask: expected 0 or more than 1"):
        layer(x, mask=one)
    assert layer._saved is record
    y1 = gn(x, mask=one)  # a group of one value: that value normalizes to bias
    np.testing.assert_array_equal(y1[one], np.broadcast_to(gn.bias[None, :, None], x.shape)[one])
    record = gn._saved
    with pytest.raises(ValueError, match="^mask: expected a shape"):
        gn(x, mask=np.ones((4, 2, 6), bool))
    assert gn._saved is record


def test_masked_building_blocks_merge_across_shards(rng):
    # the pieces a masked SyncBatchNorm composes: local masked statistics merged
    # with per-channel counts equal the statistics of the whole batch
    x = rng.standard_normal((8, 3, 5)) + 2
    mask = _mask(rng, (8, 3, 5))
    parts = [masked_stats(x[s], mask[s]) for s in (slice(0, 3), slice(3, 8))]
    count, mean, m2 = bncore.merge_stats(np.array([p[0] for p in parts]),
                                         [p[1] for p in parts], [p[2] for p in parts])
    _, m_ref, _, c_ref, var = ref.masked_train(x, mask)
    np.testing.assert_array_equal(count, c_ref)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-12)
    np.testing.assert_allclose(m2 / count, var, rtol=1e-12)
    dy = rng.standard_normal(x.shape)
    sums = [masked_backward_reduce(dy[s], x[s], mean, mask[s]) for s in (slice(0, 3),
                                                                        slice(3, 8))]
    n, sdy, sdx = (sum(p[i] for p in sums) for i in range(3))
    np.testing.assert_array_equal(n, c_ref)
    np.testing.assert_allclose(sdy, np.where(mask, dy, 0).sum((0, 2)), rtol=1e-12)
    np.testing.assert_allclose(sdx, np.where(mask, dy * (x - mean[:, None]), 0).sum((0, 2)),
                               rtol=1e-10, atol=1e-12)


def test_activation_with_a_mask(rng):
    x, lengths = _padded(rng, 4, 2, 5)
    sel = np.arange(5)[None, None, :] < lengths[:, None, None]
    y, mean, invstd = bncore.batch_norm_train(x, lengths=lengths, activation="relu")
    dy = rng.standard_normal(x.shape)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, lengths=lengths,
                                            activation="relu", y=y)
    yr, m, inv, _, _ = ref.masked_train(x, sel)
    np.testing.assert_allclose(y[np.broadcast_to(sel, x.shape)],
                               np.maximum(yr, 0)[np.broadcast_to(sel, x.shape)], rtol=1e-12,
                               atol=1e-12)
    gx, gw, gb = ref.masked_backward(dy * (yr > 0), x, sel, m, inv)
    np.testing.assert_allclose(dx, gx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, gw, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, gb, rtol=1e-10, atol=1e-10)


def test_group_norm_thread_counts_are_bit_identical(rng):
    x = (rng.standard_normal((16, 8, 1000)) + 3).astype(np.float32)  # > 64K values
    lengths = rng.integers(2, 1001, 16)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    runs = []
    for nt in (1, 2, 3):
        y, m, inv = bncore.group_norm_train(x, 4, lengths=lengths, n_threads=nt)
        runs.append((y, m, inv) + bncore.group_norm_backward(dy, x, 4, m, inv, lengths=lengths,
                                                             n_threads=nt))
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape,axis", [((3, 5, 6), -1), ((2, 4, 3, 6), -1), ((2, 4, 6, 3), 2)])
def test_masked_group_and_instance_norm_on_any_channel_axis(rng, shape, axis):
    """Channels last (and a middle channel axis) with a mask: the same numbers
    as channels first on the moved copy, forward and backward, and layers."""
    x = rng.standard_normal(shape) * 3 + 50
    dy = rng.standard_normal(shape)
    C = shape[axis]
    per = list(shape)
    per[axis] = 1
    m = rng.random(per) < 0.6
    m.reshape(shape[0], -1)[:, :2] = True  # at least two values per instance
    mask = np.broadcast_to(m, shape).copy()
    mask[0, 0] = ~mask[0, 0] & (np.arange(mask[0, 0].size).reshape(mask[0, 0].shape) % 2 == 0)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    first = lambda a: np.moveaxis(a, axis, 1)  # noqa: E731
    for G in (1, 2, C):
        y, m, i = bncore.group_norm_train(x, G, w, b, axis=axis, mask=mask)
        yf, mf, i_f = bncore.group_norm_train(first(x), G, w, b, mask=first(mask))
        np.testing.assert_allclose(first(y), yf, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m, mf, rtol=1e-13)
        np.testing.assert_allclose(i, i_f, rtol=1e-12)
        dx, dw, db = bncore.group_norm_backward(dy, x, G, m, i, w, axis=axis, mask=mask)
        dxf, dwf, dbf = bncore.group_norm_backward(first(dy), first(x), G, mf, i_f, w,
                                                   mask=first(mask))
        np.testing.assert_allclose(first(dx), dxf, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dw, dwf, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(db, dbf, rtol=1e-12, atol=1e-12)
        assert not dx[~mask].any()
    layer = bncore.InstanceNorm(C, affine=True, track_running_stats=True, axis=axis,
                                dtype=np.float64)
    yl = layer(x, mask=mask)
    yi = bncore.instance_norm_train(first(x), layer.weight, layer.bias, mask=first(mask))[0]
    np.testing.assert_allclose(first(yl), yi, rtol=1e-12, atol=1e-12)
    assert not layer.backward(dy)[~mask].any()
