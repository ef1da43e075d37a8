"""Run under ``mpiexec -n P python -m mpi4py``; exits non-zero on any failure.

Every rank builds the same global batch, keeps its own uneven shard (some
steps give a rank zero samples) and checks SyncBatchNorm on the shards against
single-process ``bncore.BatchNorm`` on the whole batch, and against the float64
NumPy oracle of tests/reference.py. It then checks that bad input on one rank makes
every rank raise (no rank left waiting in a collective) and that the layer
still works afterwards.
"""
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

import bncore
from bncore.distributed import SyncBatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for reference
import reference  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
C = 5


def shard_sizes(step):
    """Uneven per-rank sample counts; step 1 gives the last rank none and
    step 2 leaves a single rank with data."""
    sizes = [2 + (3 * r + step) % 5 for r in range(SIZE)]
    if step == 1:
        sizes[-1] = 0
    if step == 2:
        sizes = [0] * SIZE
        sizes[SIZE // 2] = 4
    return sizes


def global_batch(rng, n, rest, axis, dtype, offset):
    shape = (n, C) + rest if axis == 1 else (n,) + rest + (C,)
    x = offset + 2.0 * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    return x.astype(dtype), dy.astype(dtype)


def close(got, want, dtype, what):
    reference.assert_close(got, want, reference.NORM_RTOL[np.dtype(dtype).type],
                           f"rank {RANK}: {what}")


def same_on_all_ranks(arr, what):
    if arr is None:
        return
    blobs = COMM.allgather(np.ascontiguousarray(arr).tobytes())
    assert all(b == blobs[0] for b in blobs), \
        f"{what} differs between ranks"


def check_config(dtype, rest, axis, reduction, offset=0.0, grads_vs_layer=True,
                 **kwargs):
    """grads_vs_layer=False: with |mean| >> std, BatchNorm's float32
    save_mean limits its own dx/dweight to ~1e-5, so compare those with the
    float64 oracle only (SyncBatchNorm keeps the mean in float64)."""
    rng = np.random.default_rng(1234)  # same stream on every rank
    sync = SyncBatchNorm(C, axis=axis, dtype=dtype, reduction=reduction,
                         **kwargs)
    ref = bncore.BatchNorm(C, axis=axis, dtype=dtype, **kwargs)
    if sync.weight is not None:
        for layer in (sync, ref):
            layer.weight[...] = 1.0 + 0.5 * np.arange(C)
            layer.bias[...] = -0.25 * np.arange(C)
    label = (f"{np.dtype(dtype).name} rest={rest} axis={axis} {reduction} "
             f"{kwargs}")
    for step in range(4):
        if step == 3:
            sync.eval()
            ref.eval()
        sizes = shard_sizes(min(step, 2))
        x, dy = global_batch(rng, sum(sizes), rest, axis, dtype, offset)
        lo = sum(sizes[:RANK])
        xs, dys = x[lo:lo + sizes[RANK]], dy[lo:lo + sizes[RANK]]
        what = f"{label} step {step} sizes {sizes}"

        y_ref = ref.forward(x)
        dx_ref = ref.backward(dy)
        y = sync.forward(xs)
        dx = sync.backward(dys)
        assert y.shape == xs.shape and y.dtype == xs.dtype, what
        assert dx.shape == xs.shape and dx.dtype == xs.dtype, what
        close(y, y_ref[lo:lo + sizes[RANK]], dtype, f"y {what}")
        assert (sync.grad_weight is None) == (ref.grad_weight is None), what
        if grads_vs_layer:
            close(dx, dx_ref[lo:lo + sizes[RANK]], dtype, f"dx {what}")
        if sync.affine and grads_vs_layer:
            close(sync.grad_weight, ref.grad_weight, dtype, f"dweight {what}")
            close(sync.grad_bias, ref.grad_bias, dtype, f"dbias {what}")
        if sync.training or not sync.track_running_stats:
            w = sync.weight if sync.weight is not None else np.ones(C)
            b = sync.bias if sync.bias is not None else np.zeros(C)
            yo, mo, invo, _ = reference.train(x, w, b, axis, sync.eps)
            dxo, dwo, dbo = reference.backward(dy, x, mo, invo, w, axis)
            lo_hi = slice(lo, lo + sizes[RANK])
            close(y, yo[lo_hi], dtype, f"y vs oracle {what}")
            close(dx, dxo[lo_hi], dtype, f"dx vs oracle {what}")
            if sync.affine:
                close(sync.grad_weight, dwo, dtype, f"dweight vs oracle {what}")
                close(sync.grad_bias, dbo, dtype, f"dbias vs oracle {what}")
        if sync.track_running_stats:
            close(sync.running_mean, ref.running_mean, dtype,
                  f"running_mean {what}")
            close(sync.running_var, ref.running_var, dtype,
                  f"running_var {what}")
            assert int(sync.num_batches_tracked) == \
                int(ref.num_batches_tracked), what
        for name in ("running_mean", "running_var", "grad_weight",
                     "grad_bias"):
            same_on_all_ranks(getattr(sync, name), f"{name} {what}")


def expect_error(fn, kinds, what):
    try:
        fn()
    except kinds as exc:
        return str(exc)
    raise AssertionError(f"rank {RANK}: {what}: no error raised")


def check_errors(reduction):
    sync = SyncBatchNorm(C, dtype=np.float64, reduction=reduction)
    rng = np.random.default_rng(RANK)
    good = rng.standard_normal((3, C, 2))
    bad_rank = SIZE - 1

    def snapshot():
        return (sync.running_mean.copy(), sync.running_var.copy(),
                int(sync.num_batches_tracked))

    def unchanged(before, what):
        after = snapshot()
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), \
            f"rank {RANK}: {what}: running statistics changed"

    cases = [
        ("wrong channel count", rng.standard_normal((3, C + 1, 2))),
        ("integer dtype", np.ones((3, C, 2), dtype=np.int64)),
        ("ndim 1", np.ones(C)),
    ]
    for what, bad in cases:
        before = snapshot()
        msg = expect_error(lambda: sync.forward(bad if RANK == bad_rank
                                                else good),
                           (ValueError, TypeError), f"{reduction} {what}")
        if RANK != bad_rank:  # allreduce only knows how many ranks failed
            hint = f"[{bad_rank}]" if reduction == "allgather" else "1 rank"
            assert hint in msg and "rejected" in msg, msg
        unchanged(before, what)

    # A bad `out` on one rank is caught before the exchange as well.
    before = snapshot()
    out = np.empty((3, C, 2), dtype=np.float32 if RANK == bad_rank
                   else np.float64)
    expect_error(lambda: sync.forward(good, out=out), (ValueError, TypeError),
                 f"{reduction} bad out")
    unchanged(before, "bad out")

    # Different dtypes on different ranks: every rank raises TypeError.
    before = snapshot()
    mixed = good.astype(np.float32) if RANK == 0 else good
    expect_error(lambda: sync.forward(mixed), TypeError,
                 f"{reduction} mixed dtypes")
    unchanged(before, "mixed dtypes")

    # One value per channel over all ranks cannot be normalized in training.
    before = snapshot()
    one = good[:1, :, :1] if RANK == 0 else good[:0, :, :1]
    expect_error(lambda: sync.forward(one), ValueError,
                 f"{reduction} one value")
    unchanged(before, "one value")

    # Bad dy on one rank in backward.
    sync.forward(good)
    dy = good[:, :, :1] if RANK == bad_rank else good
    expect_error(lambda: sync.backward(dy), (ValueError, TypeError),
                 f"{reduction} bad dy")

    # The layer still works on every rank after all that.
    y = sync.forward(good)
    sync.backward(np.ones_like(good))
    assert np.isfinite(y).all()


def check_subcommunicator(reduction):
    """Even and odd ranks normalize over their own group only."""
    color = RANK % 2
    sub = COMM.Split(color, RANK)
    rng = np.random.default_rng(100 + color)
    sizes = [3 + r for r in range(sub.Get_size())]
    x, dy = global_batch(rng, sum(sizes), (2,), 1, np.float64, 1.0)
    lo = sum(sizes[:sub.Get_rank()])
    mine = slice(lo, lo + sizes[sub.Get_rank()])
    sync = SyncBatchNorm(C, dtype=np.float64, comm=sub, reduction=reduction)
    ref = bncore.BatchNorm(C, dtype=np.float64)
    close(sync.forward(x[mine]), ref.forward(x)[mine], np.float64,
          f"sub-communicator y {reduction}")
    close(sync.backward(dy[mine]), ref.backward(dy)[mine], np.float64,
          f"sub-communicator dx {reduction}")
    close(sync.running_var, ref.running_var, np.float64,
          f"sub-communicator running_var {reduction}")
    sub.Free()


def main():
    for reduction in ("allgather", "allreduce"):
        check_config(np.float64, (3, 2), 1, reduction)
        check_config(np.float64, (4,), -1, reduction, momentum=None)
        check_config(np.float32, (), 1, reduction, offset=30.0)
        check_config(np.float32, (2,), 1, reduction, offset=300.0,
                     grads_vs_layer=False)
        check_config(np.float32, (2, 3), -1, reduction, affine=False,
                     track_running_stats=False)
        check_errors(reduction)
        check_subcommunicator(reduction)
    COMM.Barrier()
    if RANK == 0:
        print(f"sync batch norm checks passed on {SIZE} ranks", flush=True)


if __name__ == "__main__":
    main()
