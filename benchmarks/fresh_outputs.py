"""Fresh outputs against out=: batch_norm_eval writing into a new array
(np.empty), into an array from the output cache (bncore._kernels.empty_output,
include/bncore_alloc.h), and into a preallocated out=.

    python benchmarks/fresh_outputs.py [--rounds 21] [--threads 1,2]

The three are interleaved round by round; each cell prints medians of wall
time and of process CPU time (which leaves out time spent waiting for a core
on a shared machine; page faults are CPU time of the process) and the ratios
to out=. Target: fresh outputs within 1.15x of out= on cells of 4 MiB and more.
"""
import argparse
import time

import numpy as np

import bncore
from bncore import _kernels as K

SHAPES = [(128, 64, 56, 56), (64, 3, 224, 224), (8192, 1024), (32, 64, 56, 56)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    kinds = ("numpy", "cache", "out")
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=np.float32)
        rm, rv = rng.standard_normal(shape[1]), rng.uniform(0.5, 2, shape[1])
        out = np.empty_like(x)
        for nt in map(int, args.threads.split(",")):
            wall, cpu = {k: [] for k in kinds}, {k: [] for k in kinds}
            for r in range(args.rounds + 1):  # round 0 warms up
                for kind in kinds:
                    t0, c0 = time.perf_counter(), time.process_time()
                    if kind == "numpy":
                        y = bncore.batch_norm_eval(x, rm, rv, n_threads=nt)
                    elif kind == "cache":  # the allocation is timed too
                        y = bncore.batch_norm_eval(x, rm, rv, n_threads=nt,
                                                   out=K.empty_output(shape, x.dtype))
                    else:
                        y = bncore.batch_norm_eval(x, rm, rv, out=out, n_threads=nt)
                    t1, c1 = time.perf_counter(), time.process_time()
                    del y
                    if r:
                        wall[kind].append(t1 - t0)
                        cpu[kind].append(c1 - c0)
            for label, d in (("wall", wall), ("cpu", cpu)):
                m = {k: np.median(v) * 1e3 for k, v in d.items()}
                print(f"{'x'.join(map(str, shape)):14s} {x.nbytes / 2**20:5.1f} MiB {nt}t {label:4s} "
                      f"out= {m['out']:7.2f} ms  np.empty {m['numpy']:7.2f} "
                      f"({m['numpy'] / m['out']:.2f}x)  cache {m['cache']:7.2f} "
                      f"({m['cache'] / m['out']:.2f}x)", flush=True)
    print(K.output_cache())


if __name__ == "__main__":
    main()
