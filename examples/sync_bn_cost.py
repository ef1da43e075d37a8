"""What SyncBatchNorm's exchange costs, measured here and modelled at scale.

    OMP_NUM_THREADS=1 mpiexec -n 2 python -m mpi4py examples/sync_bn_cost.py

1. Per layer: SyncBatchNorm forward+backward on a tiny (2, C) shard (the
   exchange dominates) against local BatchNorm, for both reductions.
2. ResNet-50's 53 BN layers at a small per-rank batch: one step's BN
   forward+backward, local BatchNorm against SyncBatchNorm.
3. The model: bytes and collectives per rank per step for ResNet-50 at 8, 64
   and 512 ranks, exchange time on two networks (latency per message round,
   bandwidth per rank: InfiniBand 3 us, 12 GB/s; 10 GbE 30 us, 1.2 GB/s),
   with the merge costs measured here, against the BN compute and the
   whole step (assumptions in model()).
Times are the slowest rank's: median and 10th percentile over --reps.
docs/SYNC_BN.md discusses the numbers.
"""
import argparse
import math
import time

import numpy as np
from mpi4py import MPI

import bncore
from bncore.distributed import SyncBatchNorm

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def resnet50_bn_layers():
    """(C, H, W) of each BN layer of torchvision's ResNet-50 at 224x224."""
    layers = [(64, 112, 112)]
    for planes, blocks, size_in, size in ((64, 3, 56, 56), (128, 4, 56, 28),
                                          (256, 6, 28, 14),
                                          (512, 3, 14, 7)):
        for b in range(blocks):
            first = b == 0
            layers += [(planes, size_in if first else size,
                        size_in if first else size),
                       (planes, size, size), (4 * planes, size, size)]
            if first:
                layers.append((4 * planes, size, size))  # downsample
    return layers


def timed(fn, reps):
    """(median, 10th percentile) over reps of the slowest rank's time for
    fn(), in seconds. On a shared machine the median carries the waits for a
    descheduled rank; the 10th percentile is closer to the quiet cost."""
    fn()  # warm up (allocations, MPI connections)
    times = np.empty(reps)
    for i in range(reps):
        COMM.Barrier()
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    COMM.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return float(np.median(times)), float(np.percentile(times, 10))


def fwd_bwd(layers, xs, dys):
    def run():
        for layer, x, dy in zip(layers, xs, dys):
            layer.forward(x, n_threads=1)
            layer.backward(dy, n_threads=1)
    return run


def say(*args):
    if RANK == 0:
        print(*args, flush=True)


def per_layer(reps):
    say(f"\n1. per layer, {SIZE} ranks, x (2, C) float32 per rank, "
        "forward+backward, microseconds, median (10th percentile)")
    say(f"{'C':>6} {'local BN':>15} {'allgather':>15} {'allreduce':>15}")
    rng = np.random.default_rng(RANK)
    for c in (64, 256, 1024, 2048):
        x = rng.standard_normal((2, c)).astype(np.float32)
        row = []
        for make in (lambda: bncore.BatchNorm(c),
                     lambda: SyncBatchNorm(c, reduction="allgather"),
                     lambda: SyncBatchNorm(c, reduction="allreduce")):
            med, low = timed(fwd_bwd([make()], [x], [x]), reps)
            row.append(f"{med * 1e6:.0f} ({low * 1e6:.0f})")
        say(f"{c:>6} " + " ".join(f"{r:>15}" for r in row))


def resnet50_step(batch, reps):
    shapes = resnet50_bn_layers()
    rng = np.random.default_rng(RANK)
    xs = [rng.standard_normal((batch, c, h, w)).astype(np.float32)
          for c, h, w in shapes]
    dys = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]
    elems = sum(c * h * w for c, h, w in shapes)
    say(f"\n2. ResNet-50 BN layers ({len(shapes)} layers, "
        f"{sum(c for c, _, _ in shapes)} channels, {elems / 1e6:.2f} M "
        f"elements per image), per-rank batch {batch}, {SIZE} ranks, "
        "1 thread per rank, forward+backward of all layers, ms per step, "
        "median (10th percentile)")
    res = {}
    for name, make in (("local BN", lambda c: bncore.BatchNorm(c)),
                       ("sync allgather", lambda c: SyncBatchNorm(c)),
                       ("sync allreduce",
                        lambda c: SyncBatchNorm(c, reduction="allreduce"))):
        layers = [make(c) for c, _, _ in shapes]
        res[name] = timed(fwd_bwd(layers, xs, dys), reps)
        say(f"{name:>15}: {res[name][0] * 1e3:8.1f} ({res[name][1] * 1e3:.1f})"
            " ms")
    return res["local BN"][0] / batch, shapes


def local_costs(reps, ranks=(8, 64, 512)):
    """Measured CPU cost of the merges each rank runs, in seconds: the
    allgather path merges P records per layer (one merge_stats call), the
    allreduce path applies the Chan operation (one two-record merge in
    Python) once per reduction round."""
    from bncore.distributed import _HEAD, _chan_reduce, _record_type
    costs = {}
    rng = np.random.default_rng(0)
    for c in (64, 128, 256, 512, 1024, 2048):
        rec = np.abs(rng.standard_normal(_HEAD + 2 * c))
        dtype = _record_type(rec.size)
        costs[("op", c)] = min(_time_serial(
            lambda: _chan_reduce(rec, rec.copy(), dtype), reps))
        for p in ranks:
            counts = np.full(p, 100.0)
            means = rng.standard_normal((p, c))
            costs[("merge", c, p)] = min(_time_serial(
                lambda: bncore.merge_stats(counts, means, means ** 2), reps))
    return costs


def _time_serial(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def exchange_model(shapes, p, alpha, beta, costs):
    """Seconds per step of the 106 collectives on P ranks, per method, with
    MPICH's default algorithms: allgather by recursive doubling below 512 KB
    in total and by ring above (P-1 rounds); the Chan allreduce is one
    record, so recursive doubling (log2 P rounds, an operation each); the
    backward MPI_SUM allreduce by recursive doubling up to 2 KB and
    reduce-scatter + allgather above."""
    lg = math.ceil(math.log2(p))
    ag = ar = 0.0
    ag_bytes = ar_bytes = 0
    for c, _, _ in shapes:
        for m in (8 * (2 * c + 4), 8 * (2 * c + 1)):  # forward, backward
            rounds = lg if p * m < 512 * 1024 else p - 1
            ag += rounds * alpha + (p - 1) * m / beta
            ag_bytes += (p - 1) * m
        ag += costs[("merge", c, p)]
        m = 8 * (2 * c + 4)
        ar += lg * (alpha + m / beta + costs[("op", c)])
        ar_bytes += lg * m
        m = 8 * (2 * c + 1)
        if m <= 2048:
            ar += lg * (alpha + m / beta)
            ar_bytes += lg * m
        else:
            ar += 2 * lg * alpha + 2 * (p - 1) / p * m / beta
            ar_bytes += int(2 * (p - 1) / p * m)
    return {"allgather": (ag, ag_bytes), "allreduce": (ar, ar_bytes)}


def model(per_image_here, shapes, batch, costs):
    n_layers = len(shapes)
    elems = sum(c * h * w for c, h, w in shapes)
    sent = sum(8 * (4 * c + 5) for c, _, _ in shapes)
    # A rank = one two-socket server: BN is bandwidth bound, about 8 float32
    # passes over the activations (forward reads x twice and writes y;
    # backward reads x and dy twice and writes dx) at 200 GB/s; the rest of
    # the step is ~3 x 4.1 GFLOP per image at 2 TFLOP/s.
    bn = 8 * 4 * elems * batch / 200e9
    step = bn + batch * 3 * 4.1e9 / 2e12
    say(f"\n3. model, ResNet-50, per-rank batch {batch}: {2 * n_layers} "
        f"collectives per step; each rank sends {sent / 1e6:.2f} MB per "
        f"step. BN forward+backward per step: {bn * 1e3:.0f} ms on a "
        f"200 GB/s server ({per_image_here * batch * 1e3:.0f} ms on one core "
        f"here, measured); whole step about {step * 1e3:.0f} ms")
    networks = {"IB": (3e-6, 12e9), "10GbE": (30e-6, 1.2e9)}
    say(f"{'ranks':>6} {'net':>6} {'method':>9} {'MB recv':>8} "
        f"{'ms/step':>8} {'/BN':>6} {'/step':>6}")
    for p in (8, 64, 512):
        for net, (alpha, beta) in networks.items():
            res = exchange_model(shapes, p, alpha, beta, costs)
            for method, (t, nbytes) in res.items():
                say(f"{p:>6} {net:>6} {method:>9} {nbytes / 1e6:>8.1f} "
                    f"{t * 1e3:>8.1f} {t / bn:>6.2f} {t / step:>6.2f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2,
                        help="per-rank batch for the ResNet-50 measurement")
    parser.add_argument("--model-batch", type=int, default=32,
                        help="per-rank batch for the model")
    args = parser.parse_args()
    say(f"bncore {bncore.__version__}, {MPI.Get_library_version().splitlines()[0]}"
        f", {SIZE} ranks")
    per_layer(args.reps * 10)
    per_image, shapes = resnet50_step(args.batch, args.reps)
    costs = local_costs(args.reps)
    if RANK == 0:
        say("\nmeasured merge costs, microseconds: Chan operation (one "
            "two-record merge) per C: " + ", ".join(
                f"{c}: {costs[('op', c)] * 1e6:.1f}"
                for c in (64, 256, 1024, 2048))
            + "; merge_stats of P records, C=2048: " + ", ".join(
                f"P={p}: {costs[('merge', 2048, p)] * 1e6:.0f}"
                for p in (8, 64, 512)))
    model(per_image, shapes, args.model_batch, costs)


if __name__ == "__main__":
    main()
