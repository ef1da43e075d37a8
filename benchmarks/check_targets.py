"""Check the kernel-speed targets against ``python -m bncore bench --json`` output.

    python -m bncore bench --threads 1,2 --json bench.json
    python benchmarks/check_targets.py bench.json [more.json ...]

Runs from several files are pooled by (dtype, thread count); the last file
wins. Prints every target with its figure and MET / MISSED; exits 1 if any
missed. Thresholds with a noise allowance say so in their text.
"""
import json
import sys

LARGE = 16 * 2**20  # "large shapes": tensors of 16 MiB and more
SMALL = {(8, 512, 7, 7), (64, 256)}
NOISE = 1.10  # allowance where a target says "no penalty"
BOUND = {"eval": 1.15, "train": 1.3, "backward": 1.3, "backward_eval": 1.3}


def _name(c):
    return (f"{c['dtype']:<7} {c['op']:<13} {c['layout']:<4} "
            f"{'x'.join(map(str, c['array_shape'])):<14}")


def check(results):
    runs = {}
    for r in results:
        if r.get("schema") != 2:
            raise ValueError(f"results: expected schema 2 (python -m bncore bench --json), got "
                             f"{r.get('schema')!r}")
        for run in r["runs"]:
            runs[run["dtype"], run["threads"]] = run
    lines, missed = [], 0

    def verdict(ok, text):
        nonlocal missed
        missed += not ok
        lines.append(f"{'MET   ' if ok else 'MISSED'} {text}")

    for (dtype, n), run in sorted(runs.items()):
        lines.append(f"--- {dtype}, {n} thread(s)")
        for c in run["cells"]:
            sp = c["speedup"]
            if "torch" in sp:
                need = 2.0 if (c["op"] == "train" and c["layout"] == "NCHW") else \
                    1.3 if (c["op"] == "train" and c["layout"] == "NC") else 1.0
                verdict(sp["torch"] >= need,
                        f"{_name(c)} vs torch {sp['torch']:.2f}x (need >= {need})")
            if c["nbytes"] >= LARGE:
                verdict(sp["numpy"] >= 10, f"{_name(c)} vs numpy {sp['numpy']:.1f}x (need >= 10)")
                br, b = c["bound_ratio"], c["bound"]
                limit = BOUND[c["op"]]
                verdict(br["bncore_out"] <= limit,
                        f"{_name(c)} out= {br['bncore_out']:.2f}x bound "
                        f"(fresh {br['bncore']:.2f}x;"
                        f" read/copy {b['read_GBps']:.0f}/{b['copy_GBps']:.0f} GB/s over "
                        f"{b['working_set_bytes'] / 2**20:.0f} MiB; need out= <= {limit})")
            peak = c["peak_alloc_bytes"]
            if c["op"] == "train":
                small = 1 << 20  # O(C) arrays and bookkeeping
                verdict(peak["bncore"] <= c["nbytes"] + small and peak["bncore_out"] <= small,
                        f"{_name(c)} NumPy-visible peak: fresh "
                        f"{peak['bncore'] / c['nbytes']:.2f}x "
                        f"the tensor, out= {peak['bncore_out']} B (need <= 1x + 1 MiB, <= 1 MiB)")
    lines.append("--- threading penalty on small calls (2 threads vs 1, bncore fresh)")
    for (dtype, n), run in sorted(runs.items()):
        one = runs.get((dtype, 1))
        if n != 2 or one is None:
            continue
        cells1 = {(c["op"], c["layout"], tuple(c["shape"])): c for c in one["cells"]}
        for c in run["cells"]:
            c1 = cells1.get((c["op"], c["layout"], tuple(c["shape"])))
            if c1 is not None and tuple(c["shape"]) in SMALL:
                ratio = c["median_s"]["bncore"] / c1["median_s"]["bncore"]
                verdict(ratio <= NOISE, f"{_name(c)} t(2)/t(1) = {ratio:.2f} (need <= {NOISE}, "
                        "noise allowance)")
    lines.append(f"{missed} missed")
    return "\n".join(lines), missed


def main(argv=None):
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        sys.exit(__doc__)
    results = []
    for p in paths:
        with open(p) as fh:
            results.append(json.load(fh))
    text, missed = check(results)
    print(text)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
