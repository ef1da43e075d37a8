"""Under mpiexec -n P: PopulationStats.allreduce and collect_population_stats(comm=)
merge uneven shards (rank 0's empty) exactly, with the same bits on every rank
and the bits of a single-process merge in rank order; different widths and an
exception on one rank make every rank raise and leave every state as it was."""
import numpy as np
from mpi4py import MPI

import bncore
from bncore.precise import PopulationStats

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
C = 3
data_rng = np.random.default_rng(7)  # the same data on every rank
shards = [(data_rng.standard_normal((3 * r, C, 2)) * 2 + 1e4).astype(np.float32)
          for r in range(size)]  # rank 0: no samples
whole = np.concatenate(shards).astype(np.float64)
red = (0, 2)


def same_on_every_rank(a):
    got = comm.allgather(np.asarray(a).tobytes())
    assert all(g == got[0] for g in got), "ranks differ"


# 1. allreduce: exact, the same bits everywhere, the bits of the rank-order merge
stats = PopulationStats(C).update(shards[rank])
stats.allreduce(comm)
assert stats.count == whole.size // C
np.testing.assert_allclose(stats.mean, whole.mean(red), rtol=1e-13)
np.testing.assert_allclose(stats.var, whole.var(red, ddof=1), rtol=1e-10)
same_on_every_rank(np.concatenate([stats.mean, stats.var]))
parts = [bncore.batch_norm_stats(s) for s in shards]
count, mean, m2 = bncore.merge_stats([p[0] for p in parts], [p[1] for p in parts],
                                     [p[2] for p in parts])
assert count == stats.count and np.array_equal(mean, stats.mean)
assert np.array_equal(m2 / count, stats.biased_var)

# 2. different widths: every rank raises, nothing changes
odd = PopulationStats(C + rank % 2).update(np.ones((2, C + rank % 2), np.float32))
try:
    odd.allreduce(comm)
except ValueError as e:
    assert str(e).startswith("comm: expected statistics of one width on every rank"), e
    assert odd.count == 2
else:
    raise AssertionError("different widths were merged")

# 3. collect_population_stats over the ranks' streams
bn = bncore.BatchNorm(C, dtype=np.float64)
stream = [data_rng.standard_normal((2 + r + k, C)) * 3 - 50 for k in range(3) for r in range(size)]
mine = [x for i, x in enumerate(stream) if i % size == rank]
with bncore.collect_population_stats([bn], comm=comm) as (collected,):
    for x in mine:
        bn(x)
all_x = np.concatenate(stream)
assert collected.count == len(all_x)
np.testing.assert_allclose(bn.running_mean, all_x.mean(0), rtol=1e-13)
np.testing.assert_allclose(bn.running_var, all_x.var(0, ddof=1), rtol=1e-12)
same_on_every_rank(np.concatenate([bn.running_mean, bn.running_var]))

# 4. an exception on rank 1: every rank restores its layer and raises
before = bn.state_dict()
try:
    with bncore.collect_population_stats([bn], comm=comm):
        bn(mine[0])
        if rank == 1:
            raise KeyError("rank 1 fails")
except KeyError:
    assert rank == 1
except RuntimeError as e:
    assert rank != 1 and str(e).startswith("comm: rank(s) [1] raised"), e
else:
    raise AssertionError("no rank raised")
after = bn.state_dict()
assert all(np.array_equal(after[k], before[k]) for k in before)
comm.Barrier()
print(f"rank {rank}: population statistics checks passed", flush=True)
