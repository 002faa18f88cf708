"""Before/after table from alternating bench runs: `python scripts/ab_summary.py OUT_DIR` reads
OUT_DIR/old-*.json and OUT_DIR/new-*.json (bench.py's files, the same plan run old, new, old, new,
... in one device call: scripts/gpu_issue14.sh ab) and prints, per row, the median of each side's
decode and prefill tok/s and peak memory, and new / old. Alternating whole runs spreads a host
that is slower for a while over both sides; the medians are what the 3% target is read on."""

import glob
import json
import statistics
import sys
from pathlib import Path


def rows(files):
    """{row key: [row dict per run]}"""
    out = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["rows"]:
            if r.get("impl", "ours") != "ours":
                continue
            key = (r["model"], r["policy"], str(r["budget"]), r["ctx"], r["batch"], r.get("mode", "prefill"))
            out.setdefault(key, []).append(r)
    return out


def main(folder: str) -> None:
    old, new = rows(sorted(glob.glob(f"{folder}/old-*.json"))), rows(sorted(glob.glob(f"{folder}/new-*.json")))
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    print("| model | policy | budget | ctx | B | mode | runs | decode old | new | new/old | prefill old | new | new/old"
          " | peak+ GB old | new |")
    print("|" + "---|" * 15)
    for key in old:
        if key not in new:
            continue
        o, n = old[key], new[key]
        d, p = med(n, "decode_tok_s") / med(o, "decode_tok_s"), med(n, "prefill_tok_s") / med(o, "prefill_tok_s")
        print("| " + " | ".join(map(str, key)) + f" | {len(o)}/{len(n)} | {med(o, 'decode_tok_s'):.1f} | "
              f"{med(n, 'decode_tok_s'):.1f} | {d:.3f} | {med(o, 'prefill_tok_s'):.0f} | {med(n, 'prefill_tok_s'):.0f} | "
              f"{p:.3f} | {med(o, 'peak_gb'):.2f} | {med(n, 'peak_gb'):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
