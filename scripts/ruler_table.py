"""The README's RULER table from a results file of `evaluate.py ruler`:

    python scripts/ruler_table.py results/ruler.json               # markdown on stdout
    python scripts/ruler_table.py results/ruler.cells --save P.json # a run cut short: its finished cells

Per setting (end: the question compressed with the context; agnostic: the context compressed before
the question), per task family and overall, per policy and cache ratio: the mean RULER score over
the prompts, its 95% interval and n (prompts, pooled over the family's tasks and the lengths). The
interval is Wilson's score interval with the mean as p and n prompts: a prompt's score is a share in
[0, 1] (of the expected values found; 0 or 1 for a single needle), whose variance is at most
mean x (1 - mean), so the interval is exact in form for 0/1 scores and errs wide for shares and for
pooled tasks; unlike a bootstrap it is not zero-width when all n prompts agree (n = 8 all right is
not certainty). "full" keeps every token (no eviction); it is one run, shown in each ratio's column
as the line to compare with. Then full by length (where full itself fails, the policies have
nothing to keep), our ordering at kvpress's points, and kvpress's published ordering (KVPRESS
below) beside it.

A folder of cells (`<out>.cells`, sweep.py) stands for the results file of a run cut short: each cell
is one row; --save writes them as a results file that `evaluate.py plot` draws.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np

SETTINGS = {"end": "the question compressed with the context",
            "agnostic": "the context compressed before the question arrives"}

# kvpress's published RULER figures (github.com/NVIDIA/kvpress, README "Evaluation" at commit 18d0a79,
# 2025-07-17: evaluation/assets/leaderboard_plot_score.png, from its leaderboard huggingface.co/spaces/
# nvidia/kvpress-leaderboard): Llama-3.1-8B-Instruct, RULER at 4k, the average of its 13 tasks (x 100),
# against kvpress's compression ratio (the share REMOVED: our ratio r, the share kept, is its 1 - r).
# Read off the PNG's pixels (the points' centres; about +-0.5). Its presses evict once, after the
# context, before the question (our "agnostic"), except "SnapKV (compressed questions)" (our "end").
KVPRESS = {
    "source": "kvpress README leaderboard plot (commit 18d0a79, 2025-07-17), Llama-3.1-8B-Instruct, RULER 4k",
    "no compression": 95.4,
    "presses": {  # kvpress press -> (our policy, setting, {compression ratio: score})
        "SnapKV (compressed questions)": ("snapkv", "end", {0.1: 95.3, 0.25: 94.0, 0.5: 88.0}),
        "TOVA": ("tova", "agnostic", {0.1: 92.9, 0.25: 86.5, 0.5: 75.5, 0.75: 64.1}),
        "SnapKV": ("snapkv", "agnostic", {0.1: 86.7, 0.25: 80.3, 0.5: 67.0, 0.75: 39.9}),
        "StreamingLLM": ("sink", "agnostic", {0.1: 88.9, 0.25: 78.2, 0.5: 59.6, 0.75: 40.5}),
        "ObservedAttention (H2O's scores)": ("h2o", "agnostic", {0.1: 84.7, 0.25: 72.8, 0.5: 50.7, 0.75: 28.8}),
    },
}


def load_rows(path: Path) -> tuple[list[dict], str]:
    """The rows of a results file (`.json`, or `.json.gz` as results/ keeps the large ones), or of a cells
    folder (`X.json` whose file is missing reads `X.cells`)."""
    if path.suffix != ".cells" and path.exists():
        raw = path.read_bytes()
        try:
            rec = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path} is not a results file of evaluate.py ruler ({e}); pass its .json or .json.gz") from None
        if rec.get("kind") != "ruler":
            raise SystemExit(f"{path} is a {rec.get('kind')!r} results file, not ruler's")
        return rec["results"], rec.get("model", "")
    folder = path if path.suffix == ".cells" else path.with_suffix(".cells")
    if not folder.is_dir():
        raise SystemExit(f"neither {path} nor {folder} exists")
    latest: dict = {}  # one row per cell: the newest file (a folder may hold cells of an older command)
    for f in sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime_ns):
        rec = json.loads(f.read_text())
        row = {**rec["result"], "seconds": rec["seconds"]}
        latest[key(row) + (row["task"], row["length"])] = row
    return list(latest.values()), "(cells of a run cut short)"


def ratio(row) -> float | None:
    return None if not row["size"] else next(iter(row["size"].values()))


def key(row) -> tuple:
    return row["policy"], ratio(row), row["setting"]


def interval(rows: list[dict]) -> tuple[float, float, float, int]:
    """(mean, low, high, n) over the rows' prompts: Wilson's 95% score interval (see the module docstring)."""
    scores = [x for r in rows for x in r["scores"]]
    n, mean = len(scores), float(np.mean(scores))
    z = 1.959964
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    return mean, max(0.0, centre - half), min(1.0, centre + half), n


def fmt(x) -> str:
    mean, low, high, _ = x
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def tables(rows: list[dict], model: str = "") -> str:
    families = list(dict.fromkeys(r["family"] for r in rows)) + ["overall"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    ratios = sorted({ratio(r) for r in rows if ratio(r) is not None})
    settings = [s for s in ("end", "agnostic") if any(r["setting"] == s for r in rows)]
    lengths = sorted({r["length"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    of = lambda fam: [r for r in rows if fam == "overall" or r["family"] == fam]  # noqa: E731
    out = [f"RULER-style tasks, {model}: tasks {', '.join(tasks)}; lengths {', '.join(map(str, lengths))}. "
           "Mean score [95% Wilson interval over prompts], "
           "n = prompts. full keeps every token (the same figure in each column)."]
    summary: dict = {}
    for setting in settings:
        out += ["", f"**{setting}** ({SETTINGS[setting]})",
                "", "| family | policy | n | " + " | ".join(f"ratio {x:g}" for x in ratios) + " |",
                "|---|---|---|" + "---|" * len(ratios)]
        for fam in families:
            mine = of(fam)
            for p in policies:
                if p == "full":
                    got = [r for r in mine if r["policy"] == "full"]
                    if got:
                        x = interval(got)
                        out.append(f"| {fam} | full (no eviction) | {x[3]} | " + " | ".join([fmt(x)] * len(ratios)) + " |")
                        summary[fam, "full", None, setting] = x
                    continue
                cells = []
                ns = set()
                for q in ratios:
                    got = [r for r in mine if key(r) == (p, q, setting)]
                    if not got:
                        cells.append("-")
                        continue
                    x = interval(got)
                    summary[fam, p, q, setting] = x
                    cells.append(fmt(x))
                    ns.add(x[3])
                if ns:
                    out.append(f"| {fam} | {p} | {'/'.join(map(str, sorted(ns)))} | " + " | ".join(cells) + " |")
    full = [r for r in rows if r["policy"] == "full"]
    if full:
        out += ["", "**full by length** (no eviction: what the model itself can do)", "",
                "| family | " + " | ".join(f"{L}" for L in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for fam in families:
            cells = []
            for L in lengths:
                got = [r for r in of(fam) if r["policy"] == "full" and r["length"] == L]
                cells.append(f"{fmt(interval(got))} (n={sum(r['n'] for r in got)})" if got else "-")
            out.append(f"| {fam} | " + " | ".join(cells) + " |")
    out += ["", "**Orderings** (overall means; our ratio r is kvpress's compression ratio 1 - r):"]
    for setting in settings:
        for q in ratios:
            names = {p for p, s, _ in KVPRESS["presses"].values() if s == setting}
            ours = sorted(((summary[k][0], k[1]) for k in summary if k[0] == "overall" and k[2] == q and k[3] == setting),
                          reverse=True)
            if ours:
                line = " > ".join(f"{p} {m:.2f}" for m, p in ours)
                theirs = sorted(((pts[round(1 - q, 2)], name) for name, (p, s, pts) in KVPRESS["presses"].items()
                                 if s == setting and round(1 - q, 2) in pts), reverse=True)
                out.append(f"- ours, {setting}, ratio {q:g}: {line}" + (
                    f"; kvpress at compression {1 - q:g}: " + " > ".join(f"{n} {m:.1f}" for m, n in theirs)
                    + f" (ours for those: {', '.join(sorted(names))})" if theirs else ""))
    out += [f"- kvpress ({KVPRESS['source']}; no compression {KVPRESS['no compression']}): context compressed before "
            "the question, at compression 0.25, 0.5 and 0.75: TOVA > SnapKV >= StreamingLLM > ObservedAttention "
            "(H2O's scores); at 0.1 TOVA > StreamingLLM > SnapKV > ObservedAttention; with the question in the "
            "compressed prompt SnapKV is above all of them (94.0 at 0.25, 88.0 at 0.5). window, A2SF and VATP "
            "are not in kvpress."]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a ruler results file, or a <out>.cells folder")
    ap.add_argument("--save", default=None, help="write the rows as a results file (for evaluate.py plot)")
    args = ap.parse_args(argv)
    rows, model = load_rows(Path(args.results))
    if not rows:
        raise SystemExit(f"{args.results}: no rows")
    print(tables(rows, model))
    if args.save:
        Path(args.save).write_text(json.dumps(dict(kind="ruler", model=model, partial=True, results=rows), indent=1))
        print(f"wrote {args.save}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
