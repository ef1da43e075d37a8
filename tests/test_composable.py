"""Composable variants: batch renormalization over ghost batches, synchronized
renormalization and ghost batches under SyncBatchNorm, all from one parts
pipeline, against the float64 NumPy reference (renorm applied to each ghost
batch with its own statistics; synchronized = one process over the
concatenated batch), finite differences, and the plain variants bit for bit
(rmax=1, dmax=0)."""
import functools
import sys
from pathlib import Path

import numpy as np
import pytest

import bncore
import reference as ref
from reference import GRAD_TOL, TOL

TESTS = Path(__file__).resolve().parent


def batch(rng, shape, axis, dtype, offset=1.0):
    C = shape[axis]
    scales = rng.uniform(0.5, 2, C).reshape([C if i == axis % len(shape) else 1
                                              for i in range(len(shape))])
    x = rng.standard_normal(shape) * scales + offset
    return x.astype(dtype), rng.standard_normal(shape).astype(dtype)


def running(rng, C, dtype):
    # some parts' r and d clip at rmax=1.5, dmax=0.5 and some do not
    return (rng.uniform(0.5, 1.5, C).astype(dtype),
            rng.uniform(0.3, 3.0, C).astype(dtype))


CASES = [((11, 4), 1, 3), ((10, 3, 5), 1, 4), ((9, 5, 3, 4), -1, 2), ((6, 3, 4), 1, 6),
         ((5, 3, 2), 1, 8)]  # uneven last part; one part; vbs > N


# -- batch renorm over ghost batches: functions ------------------------------------

@pytest.mark.parametrize("shape,axis,vbs", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_renorm_ghost_forward_matches_reference(rng, shape, axis, vbs, dtype):
    C = shape[axis]
    x, _ = batch(rng, shape, axis, dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = running(rng, C, dtype)
    want = ref.parts_train(x, rm, rv, vbs, w, b, axis, 1e-5, (1.5, 0.5), momentum=0.2)
    y, mean, invstd, r, d = bncore.batch_renorm_train(x, rm, rv, w, b, axis=axis, rmax=1.5,
                                                      dmax=0.5, momentum=0.2,
                                                      virtual_batch_size=vbs)
    K = len(ref.part_slices(shape[0], vbs))
    assert mean.shape == invstd.shape == r.shape == d.shape == (K, C)
    assert y.dtype == mean.dtype == r.dtype == dtype
    for got, exp in zip((y, mean, invstd, r, d, rm, rv), want):
        np.testing.assert_allclose(got, exp, **TOL[dtype])


def test_renorm_ghost_parts_differ(rng):
    # each ghost batch has its own r and d: a batch whose halves differ
    x = np.concatenate([rng.standard_normal((4, 2)), 5 + 3 * rng.standard_normal((4, 2))])
    _, mean, _, r, d = bncore.batch_renorm_train(x, np.zeros(2), np.ones(2),
                                                 virtual_batch_size=4)
    assert not np.allclose(r[0], r[1]) and not np.allclose(d[0], d[1])
    whole = bncore.batch_renorm_train(x, np.zeros(2), np.ones(2))
    assert not np.allclose(whole[3], r[0])


@pytest.mark.parametrize("shape,axis,vbs", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_renorm_ghost_backward_matches_reference(rng, shape, axis, vbs, dtype):
    C = shape[axis]
    x, dy = batch(rng, shape, axis, dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = running(rng, C, dtype)
    _, mean, invstd, r, d = bncore.batch_renorm_train(x, rm, rv, w, b, axis=axis, rmax=1.5,
                                                      dmax=0.5, virtual_batch_size=vbs)
    dx, dw, db = bncore.batch_renorm_backward(dy, x, mean, invstd, r, d, w, axis=axis,
                                              virtual_batch_size=vbs)
    want = ref.parts_backward(dy, x, r.astype(np.float64), d.astype(np.float64), vbs, w,
                              axis)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    for got, exp in zip((dx, dw, db), want):
        np.testing.assert_allclose(got, exp, **GRAD_TOL[dtype])


def test_renorm_ghost_backward_matches_finite_differences(rng):
    C, vbs, axis = 3, 3, 1
    x, g = batch(rng, (8, C, 2), axis, np.float64)
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    rm, rv = running(rng, C, np.float64)
    _, mean, invstd, r, d = bncore.batch_renorm_train(x, rm.copy(), rv.copy(), w, b,
                                                      rmax=1.5, dmax=0.5,
                                                      virtual_batch_size=vbs)
    assert np.any(r == 1.5) or np.any(r == 1 / 1.5)  # some clipped, held constant anyway
    dx, dw, db = bncore.batch_renorm_backward(g, x, mean, invstd, r, d, w,
                                              virtual_batch_size=vbs)

    def loss():  # r and d held at the forward's values, part by part
        y = np.concatenate([ref.renorm(x[s], rm, rv, w, b, axis, 1e-5, r=r[k], d=d[k])[0]
                            for k, s in enumerate(ref.ghost_slices(len(x), vbs))])
        return float((y * g).sum())

    ref.assert_grads(loss, ((x, dx), (w, dw), (b, db)))


# -- rmax=1, dmax=0 is the plain variant, bit for bit ------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,vbs", CASES[:3] + [((12, 5), 1, None)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_renorm_without_room_is_plain_bitwise(rng, dtype, shape, axis, vbs, activation):
    C = shape[axis]
    x, dy = batch(rng, shape, axis, dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = running(rng, C, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    out, out2 = np.empty_like(x), np.empty_like(x)
    y, mean, invstd, r, d = bncore.batch_renorm_train(
        x, rm, rv, w, b, axis=axis, rmax=1.0, dmax=0.0, momentum=0.1, out=out,
        activation=activation, n_threads=2, virtual_batch_size=vbs)
    y2, mean2, invstd2 = bncore.batch_norm_train(
        x, w, b, axis=axis, running_mean=rm2, running_var=rv2, momentum=0.1, out=out2,
        activation=activation, n_threads=2, virtual_batch_size=vbs)
    assert y is out and y2 is out2
    for a, c in ((y, y2), (mean, mean2), (invstd, invstd2), (rm, rm2), (rv, rv2)):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(r, 1)
    np.testing.assert_array_equal(d, 0)
    got = bncore.batch_renorm_backward(dy, x, mean, invstd, r, d, w, axis=axis,
                                       activation=activation, y=y, n_threads=1,
                                       virtual_batch_size=vbs)
    want = bncore.batch_norm_backward(dy, x, mean2, invstd2, w, axis=axis,
                                      activation=activation, y=y2, n_threads=1,
                                      virtual_batch_size=vbs)
    for a, c in zip(got, want):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_renorm_layer_without_room_is_ghost_batchnorm_bitwise(rng, dtype):
    brn = bncore.BatchRenorm(4, dtype=dtype, momentum=0.1, warmup_steps=0, rmax=1.0,
                             dmax=0.0, rmax_ramp_steps=0, dmax_ramp_steps=0,
                             virtual_batch_size=3)
    bn = bncore.BatchNorm(4, dtype=dtype, virtual_batch_size=3)
    for step in range(3):
        if step == 2:
            brn.eval()
            bn.eval()
        x, dy = batch(rng, (10, 4, 3), 1, dtype)
        np.testing.assert_array_equal(brn(x), bn(x))
        np.testing.assert_array_equal(brn.backward(dy), bn.backward(dy))
        for k in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            np.testing.assert_array_equal(getattr(brn, k), getattr(bn, k))


def test_threads_and_out_give_the_same_bits(rng):
    x, dy = batch(rng, (13, 6, 17), 1, np.float32)
    results = []
    for nt in (1, 2):
        rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
        out, dx_out = np.empty_like(x), np.empty_like(x)
        y, m, inv, r, d = bncore.batch_renorm_train(x, rm, rv, rmax=1.5, dmax=0.5, out=out,
                                                    n_threads=nt, virtual_batch_size=5)
        dx, dw, db = bncore.batch_renorm_backward(dy, x, m, inv, r, d, out=dx_out,
                                                  n_threads=nt, virtual_batch_size=5)
        assert y is out and dx is dx_out
        results.append((y.copy(), dx.copy(), dw, db, rm, rv))
    for a, c in zip(*results):
        np.testing.assert_array_equal(a, c)


# -- refused calls change nothing --------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(virtual_batch_size=0), ValueError, "virtual_batch_size"),
    (dict(virtual_batch_size=6), ValueError, "virtual_batch_size"),  # a part of 1 sample
    (dict(virtual_batch_size=2, axis=0), ValueError, "virtual_batch_size"),
    (dict(virtual_batch_size=2.0), ValueError, "virtual_batch_size"),
    (dict(virtual_batch_size=2, rmax=0.5), ValueError, "rmax"),
])
def test_refused_forward_changes_nothing(rng, kwargs, error, match):
    x, _ = batch(rng, (3, 3) if kwargs.get("axis") == 0 else (7, 3), 1, np.float64)
    rm, rv = running(rng, 3, np.float64)
    before = rm.copy(), rv.copy()
    out = np.full_like(x, 7.0)
    with pytest.raises(error, match=match):
        bncore.batch_renorm_train(x, rm, rv, out=out, **kwargs)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
    np.testing.assert_array_equal(out, 7.0)


def test_refused_backward_changes_nothing(rng):
    x, dy = batch(rng, (12, 3), 1, np.float64)
    _, m, inv, r, d = bncore.batch_renorm_train(x, np.zeros(3), np.ones(3),
                                                virtual_batch_size=3)
    out = np.full_like(x, 7.0)
    for kw, match in ((dict(virtual_batch_size=2), "save_mean"),  # 4 rows, 6 expected
                      (dict(virtual_batch_size=None), "save_mean"),
                      (dict(virtual_batch_size=3, activation="relu"), "y")):
        with pytest.raises((ValueError, TypeError), match=match):
            bncore.batch_renorm_backward(dy, x, m, inv, r, d, out=out, **kw)
        np.testing.assert_array_equal(out, 7.0)
    with pytest.raises(ValueError, match="r:"):
        bncore.batch_renorm_backward(dy, x, m, inv, r[:2], d, out=out, virtual_batch_size=3)
    np.testing.assert_array_equal(out, 7.0)


def test_layer_refused_call_changes_nothing(rng):
    brn = bncore.BatchRenorm(3, dtype=np.float64, virtual_batch_size=4)
    x, _ = batch(rng, (5, 3), 1, np.float64)  # the last ghost batch has 1 sample
    with pytest.raises(ValueError, match="virtual_batch_size"):
        brn(x)
    assert int(brn.num_batches_tracked) == 0
    np.testing.assert_array_equal(brn.running_mean, 0)
    np.testing.assert_array_equal(brn.running_var, 1)
    with pytest.raises(RuntimeError, match="forward first"):
        brn.backward(x)


# -- the BatchRenorm layer over ghost batches ----------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_renorm_layer_ghost_matches_reference(rng, dtype):
    C, vbs = 4, 3
    brn = bncore.BatchRenorm(C, dtype=dtype, momentum=0.2, warmup_steps=0, rmax=1.5,
                             dmax=0.5, rmax_ramp_steps=0, dmax_ramp_steps=0,
                             virtual_batch_size=vbs)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    brn.weight[...], brn.bias[...] = w, b
    for _ in range(3):
        x, dy = batch(rng, (8, C, 2), 1, dtype)
        rm0, rv0 = brn.running_mean.copy(), brn.running_var.copy()
        y_ref, _, _, r, d, rm_ref, rv_ref = ref.parts_train(x, rm0, rv0, vbs, w, b,
                                                            limits=(1.5, 0.5), momentum=0.2)
        np.testing.assert_allclose(brn(x), y_ref, **TOL[dtype])
        np.testing.assert_allclose(brn.running_mean, rm_ref, **TOL[dtype])
        np.testing.assert_allclose(brn.running_var, rv_ref, **TOL[dtype])
        dx_ref, dw_ref, db_ref = ref.parts_backward(dy, x, r, d, vbs, w)
        np.testing.assert_allclose(brn.backward(dy), dx_ref, **GRAD_TOL[dtype])
        np.testing.assert_allclose(brn.grad_weight, dw_ref, **GRAD_TOL[dtype])
        np.testing.assert_allclose(brn.grad_bias, db_ref, **GRAD_TOL[dtype])
    assert "virtual_batch_size=3" in repr(brn)
    brn.eval()  # eval mode: the moving statistics, no ghost batches
    x, _ = batch(rng, (8, C, 2), 1, dtype)
    np.testing.assert_allclose(brn(x), ref.evaluate(x, brn.running_mean, brn.running_var,
                                                    w, b), **TOL[dtype])


# -- synchronized variants in one process (an allgather of one rank) ------------------

def one_rank(local):
    return local[None]


def sync_layer(C, dtype, **kw):
    from bncore.distributed import SyncBatchNorm
    return SyncBatchNorm(C, dtype=dtype, allgather=one_rank, rank=0, **kw)


@pytest.mark.parametrize("vbs", [None, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sync_renorm_one_rank_is_batch_renorm(rng, vbs, dtype):
    C = 4
    sync = sync_layer(C, dtype, momentum=0.2, renorm=True, rmax=1.5, dmax=0.5,
                      virtual_batch_size=vbs)
    plain = bncore.BatchRenorm(C, dtype=dtype, momentum=0.2, rmax=1.5, dmax=0.5,
                               warmup_steps=0, rmax_ramp_steps=0, dmax_ramp_steps=0,
                               virtual_batch_size=vbs)
    for _ in range(3):
        x, dy = batch(rng, (8, C, 3), 1, dtype)
        y, y_ref = sync(x), plain(x)
        dx, dx_ref = sync.backward(dy), plain.backward(dy)
        # the same pipeline: bits equal in float64; float32 saves rounded statistics
        check = (np.testing.assert_array_equal if dtype == np.float64 else
                 functools.partial(np.testing.assert_allclose, **GRAD_TOL[dtype]))
        check(y, y_ref)
        check(dx, dx_ref)
        for k in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            check(getattr(sync, k), getattr(plain, k))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sync_renorm_without_room_is_sync_bitwise(rng, dtype):
    kw = dict(virtual_batch_size=3, momentum=0.3)
    a = sync_layer(3, dtype, renorm=True, rmax=1.0, dmax=0.0, **kw)
    b = sync_layer(3, dtype, **kw)
    for _ in range(2):
        x, dy = batch(rng, (7, 3, 2), 1, dtype)
        np.testing.assert_array_equal(a(x), b(x))
        np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
        for k in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def test_sync_schedule_follows_batch_renorm(rng):
    sync = sync_layer(2, np.float64, renorm=True, rmax=3.0, dmax=5.0, warmup_steps=2,
                      rmax_ramp_steps=4, dmax_ramp_steps=2)
    plain = bncore.BatchRenorm(2, rmax=3.0, dmax=5.0, warmup_steps=2, rmax_ramp_steps=4,
                               dmax_ramp_steps=2)
    for step in range(8):
        assert sync.limits(step) == plain.limits(step)


def test_sync_renorm_rejects_bad_arguments():
    pytest.importorskip("bncore.distributed")
    with pytest.raises(ValueError, match="renorm"):
        sync_layer(2, np.float64, renorm=True, track_running_stats=False)
    with pytest.raises(ValueError, match="rmax"):
        sync_layer(2, np.float64, renorm=True, rmax=0.5)
    with pytest.raises(ValueError, match="rank"):
        from bncore.distributed import SyncBatchNorm
        SyncBatchNorm(2, allgather=lambda a: a[None], virtual_batch_size=2)


def test_convert_batch_renorm_keeps_renorm(rng):
    from bncore.distributed import convert_sync_batchnorm
    brn = bncore.BatchRenorm(3, dtype=np.float64, warmup_steps=1, virtual_batch_size=2)
    sync = convert_sync_batchnorm([brn], allgather=one_rank, rank=0)[0]
    assert sync.renorm and sync.virtual_batch_size == 2 and sync.weight is brn.weight
    assert sync.limits(5) == brn.limits(5)
    x, _ = batch(rng, (6, 3), 1, np.float64)
    twin = bncore.BatchRenorm(3, dtype=np.float64, warmup_steps=1, virtual_batch_size=2)
    np.testing.assert_array_equal(sync(x), twin(x))


# -- several MPI ranks ----------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3])
def test_composable_variants_under_mpiexec(n):
    pytest.importorskip("mpi4py.MPI")
    sys.path.insert(0, str(TESTS))
    from test_distributed import run_mpi
    out = run_mpi(n, TESTS / "mpi" / "check_composable.py")
    assert f"composable variant checks passed on {n} ranks" in out
