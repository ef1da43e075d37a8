"""Check the kernel-speed targets against ``python -m bncore bench --json`` output.

    python -m bncore bench --threads 1,2 --json bench.json
    python benchmarks/check_targets.py bench.json [more.json ...]

Runs from several files are pooled by thread count (the last file wins).
Prints every target with its figure and MET / MISSED; exits 1 if any missed.
Thresholds with a noise allowance say so in their text.
"""
import json
import sys

LARGE = 16 * 2**20  # "large shapes": tensors of 16 MiB and more
SMALL = {(8, 512, 7, 7), (64, 256)}
NOISE = 1.10  # allowance where a target says "no penalty"


def _llc_bytes(machine):
    text = (machine.get("llc") or "").upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        return int(text[:-1]) * mult[text[-1]] if text[-1] in mult else int(text)
    except (ValueError, IndexError):
        return 32 * 2**20


def _name(c):
    return f"{c['op']:<13} {c['layout']:<4} {'x'.join(map(str, c['array_shape'])):<14}"


def check(results):
    runs, machine = {}, results[-1]["machine"]
    for r in results:
        for run in r["runs"]:
            runs[run["threads"]] = run
    llc = _llc_bytes(machine)
    lines, missed = [], 0

    def verdict(ok, text):
        nonlocal missed
        missed += not ok
        lines.append(f"{'MET   ' if ok else 'MISSED'} {text}")

    for n, run in sorted(runs.items()):
        lines.append(f"--- {n} thread(s), bandwidth read {run['bandwidth']['read_GBps']:.1f} "
                     f"copy {run['bandwidth']['copy_GBps']:.1f} GB/s")
        for c in run["cells"]:
            sp = c["speedup"]
            if sp.get("torch") is not None:
                need = 2.0 if (c["op"] == "train" and c["layout"] == "NCHW") else \
                    1.3 if (c["op"] == "train" and c["layout"] == "NC") else 1.0
                verdict(sp["torch"] >= need, f"{_name(c)} vs torch {sp['torch']:.2f}x (need >= {need})")
            if c["nbytes"] >= LARGE:
                verdict(sp["numpy"] >= 10, f"{_name(c)} vs numpy {sp['numpy']:.1f}x (need >= 10)")
            if c["nbytes"] > llc:
                limit = {"eval": 1.15, "train": 1.3, "backward": 1.3}.get(c["op"])
                if limit is not None:
                    br = c["bound_ratio"]
                    verdict(br["bncore_out"] <= limit,
                            f"{_name(c)} out= {br['bncore_out']:.2f}x bound (fresh "
                            f"{br['bncore']:.2f}x, in place {br['bncore_inplace']:.2f}x; "
                            f"need out= <= {limit})")
            peak = c.get("peak_numpy_alloc_bytes", {})
            if c["op"] == "train" and "bncore" in peak:
                small = 1 << 20  # O(C) arrays and bookkeeping
                verdict(peak["bncore"] <= c["nbytes"] + small and peak["bncore_inplace"] <= small,
                        f"{_name(c)} NumPy-visible peak: fresh {peak['bncore'] / c['nbytes']:.2f}x "
                        f"the tensor, in place {peak['bncore_inplace']} B (need <= 1x + 1 MiB, "
                        f"<= 1 MiB)")
    if 1 in runs and 2 in runs:
        lines.append("--- threading penalty on small calls (2 threads vs 1, bncore fresh)")
        one = {(c["op"], c["layout"], tuple(c["shape"])): c for c in runs[1]["cells"]}
        for c in runs[2]["cells"]:
            c1 = one.get((c["op"], c["layout"], tuple(c["shape"])))
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
