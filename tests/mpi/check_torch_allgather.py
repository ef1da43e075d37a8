"""One rank of a torch.distributed (gloo) group running SyncBatchNorm over
``bncore.distributed.torch_allgather``; tests/test_sync_allgather.py starts
P of these and compares what they save with one process on the whole batch.

Usage: python check_torch_allgather.py RANK WORLD INIT_FILE OUT_DIR
Every rank takes its uneven shard of the same global batches (step 1 gives
rank 0 no samples) and saves y, dx, the running statistics and the parameter
gradients of each variant to OUT_DIR/rank{RANK}.npz.
"""
import sys

import numpy as np

C = 3
VARIANTS = {"plain": {}, "ghost": dict(virtual_batch_size=3),
            "renorm": dict(renorm=True, rmax=1.5, dmax=0.5),
            "ghost_renorm": dict(virtual_batch_size=2, renorm=True, rmax=1.5, dmax=0.5)}


def shard_sizes(step, world):
    sizes = [2 + (3 * r + step) % 4 for r in range(world)]
    if step == 1:
        sizes[0] = 0
    return sizes


def batches(world):
    """The global batches every rank (and the checking test) builds."""
    rng = np.random.default_rng(2024)
    for step in range(3):
        sizes = shard_sizes(step, world)
        x = 3.0 + 2.0 * rng.standard_normal((sum(sizes), C, 5))
        yield sizes, x, rng.standard_normal(x.shape)


def main():
    import torch.distributed as dist

    from bncore.distributed import SyncBatchNorm, torch_allgather
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    init, out = sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world)
    gather = torch_allgather()
    assert gather.rank == rank and gather.world_size == world
    saved = {}
    for name, kw in VARIANTS.items():
        for dtype in (np.float32, np.float64):
            layer = SyncBatchNorm(C, dtype=dtype, momentum=0.2, allgather=gather, **kw)
            for step, (sizes, x, dy) in enumerate(batches(world)):
                lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
                key = f"{name}_{dtype.__name__}_{step}"
                saved[f"{key}_y"] = layer(x[lo:hi].astype(dtype))
                saved[f"{key}_dx"] = layer.backward(dy[lo:hi].astype(dtype))
                for attr in ("running_mean", "running_var", "grad_weight", "grad_bias"):
                    saved[f"{key}_{attr}"] = getattr(layer, attr).copy()
    np.savez(f"{out}/rank{rank}.npz", **saved)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
