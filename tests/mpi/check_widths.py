"""Under mpiexec -n 2: ranks whose SyncBatchNorm layers have different
channel counts all raise the same ValueError naming num_features (before any
buffer of the wrong size is exchanged), in forward and backward."""
import numpy as np
from mpi4py import MPI

from bncore.distributed import SyncBatchNorm

comm = MPI.COMM_WORLD
C = 3 + comm.Get_rank()  # 3 on rank 0, 4 on rank 1
layer = SyncBatchNorm(C, comm=comm)
x = np.random.default_rng(comm.Get_rank()).standard_normal((5, C)).astype(np.float32)
before = layer.running_mean.copy()
try:
    layer(x)
except ValueError as e:
    assert str(e).startswith("num_features: expected the same channel count"), e
    assert np.array_equal(layer.running_mean, before)
    assert int(layer.num_batches_tracked) == 0
    print(f"rank {comm.Get_rank()}: refused: {e}", flush=True)
else:
    raise AssertionError("a forward with different channel counts was accepted")
comm.Barrier()
print(f"rank {comm.Get_rank()}: OK", flush=True)
