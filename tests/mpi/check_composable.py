"""Run under ``mpiexec -n P python -m mpi4py``; exits non-zero on any failure.

Every rank builds the same global batch, keeps its own uneven shard (one step
gives a rank zero samples) and checks SyncBatchNorm with ghost batches,
renormalization and both (both reductions, float32 and float64) against
single-process BatchNorm / BatchRenorm on the whole batch, against the float64
NumPy reference of tests/reference.py, and that every rank holds the same bits.
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
C = 3


def shard_sizes(step):
    sizes = [1 + (2 * r + step) % 4 for r in range(SIZE)]
    if step == 1:
        sizes[0] = 0
    return sizes


def close(got, want, dtype, what):
    reference.assert_close(got, want, 1e-4 if dtype == np.float32 else 1e-11,
                           f"rank {RANK}: {what}")


def same_on_every_rank(a, what):
    blobs = COMM.allgather(np.ascontiguousarray(a).tobytes())
    assert all(b == blobs[0] for b in blobs), f"rank {RANK}: {what} differs across ranks"


def check(config, dtype, reduction):
    vbs, renorm = config
    kw = dict(dtype=dtype, momentum=0.2, virtual_batch_size=vbs)
    limits = dict(rmax=1.5, dmax=0.5)
    sync = SyncBatchNorm(C, comm=COMM, reduction=reduction, renorm=renorm,
                         **(limits if renorm else {}), **kw)
    single = (bncore.BatchRenorm(C, warmup_steps=0, rmax_ramp_steps=0, dmax_ramp_steps=0,
                                 **limits, **kw) if renorm else bncore.BatchNorm(C, **kw))
    rng = np.random.default_rng(7)
    for step in range(3):
        sizes = shard_sizes(step)
        lo, hi = sum(sizes[:RANK]), sum(sizes[:RANK + 1])
        x = (3.0 + 2.0 * rng.standard_normal((sum(sizes), C, 2))).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        rm0, rv0 = sync.running_mean.astype(np.float64), sync.running_var.astype(np.float64)
        y, y1 = sync(x[lo:hi]), single(x)
        dx, dx1 = sync.backward(dy[lo:hi]), single.backward(dy)
        what = f"{config} {dtype.__name__} {reduction} step {step}"
        close(y, y1[lo:hi], dtype, f"y {what}")
        close(dx, dx1[lo:hi], dtype, f"dx {what}")
        y_ref, _, _, r, d, rm_ref, rv_ref = reference.parts_train(
            x, rm0, rv0, vbs, sync.weight, sync.bias, limits=(1.5, 0.5) if renorm else None,
            momentum=0.2)
        dx_ref, dw_ref, db_ref = reference.parts_backward(dy, x, r, d, vbs, sync.weight)
        close(y, y_ref[lo:hi], dtype, f"y vs reference {what}")
        close(dx, dx_ref[lo:hi], dtype, f"dx vs reference {what}")
        for name, want in (("running_mean", rm_ref), ("running_var", rv_ref),
                           ("grad_weight", dw_ref), ("grad_bias", db_ref)):
            close(getattr(sync, name), want, dtype, f"{name} {what}")
            close(getattr(sync, name), getattr(single, name), dtype, f"{name} {what}")
            if reduction == "allgather":
                same_on_every_rank(getattr(sync, name), f"{name} {what}")


for config in [(None, True), (2, False), (3, True)]:
    for dtype in (np.float32, np.float64):
        for reduction in ("allgather", "allreduce"):
            check(config, dtype, reduction)

# a ghost batch with a single value over all ranks: every rank raises, nothing moves
sync = SyncBatchNorm(C, comm=COMM, virtual_batch_size=2, renorm=True, dtype=np.float64)
x = np.ones((3 if RANK == SIZE - 1 else 2, C))  # the concatenated batch ends in 1 sample
try:
    sync(x)
except ValueError as exc:
    assert "ghost batch" in str(exc), exc
else:
    raise AssertionError("a one-sample ghost batch was accepted")
assert int(sync.num_batches_tracked) == 0 and (sync.running_mean == 0).all()

COMM.Barrier()
if RANK == 0:
    print(f"composable variant checks passed on {SIZE} ranks")
