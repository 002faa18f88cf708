"""Sweeps over processes that lose no finished work: evaluate.py's cell loops go through `run`.

    python evaluate.py mc ... --out results/mc.json                           # one process
    torchrun --nproc-per-node 2 evaluate.py mc ... --out results/mc.json      # the same file, two GPUs
    (killed? run the same command again: only the unfinished cells are computed)

A subcommand's work is a list of cells (mc: policy x ratio x slice of documents; ppl, mask-sim,
keep-map, lm-eval: policy x size; needle: policy x size x length; ruler: policy x size x setting x
task x length), each a pure function of the command and the cell. Cell i is computed by rank i mod N (torchrun's
RANK, WORLD_SIZE), and written as it ends to
`<out>.cells/<cell>-<hash>.json`, atomically (a temporary file, then os.replace: a reader sees the
whole cell or none of it). The hash covers the command's configuration and the cell, so a rerun
of the same command in the same place finds its finished cells and skips them, and another
command never picks up cells that are not its own. Rank 0 then waits for every rank (a barrier
over gloo: no GPU needed for it), reads every cell and builds the one results file from them; a
single process does the same, so the file is the same for any N, after any number of restarts.

A run killed mid-way (one rank or all; torchrun ends the others when one fails) loses only the
cells that were being computed. Each rank shows its own progress bar; rank 0 prints one summary
line. The ranks share one file system (one host: torchrun --nproc-per-node). Without a results
file (out None: a caller of run_needle and the like, not the command line) one process computes
every cell in memory and keeps none.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

BARRIER_TIMEOUT = datetime.timedelta(days=7)  # a rank may wait for the others' cells for hours
NOT_CONFIG = {"out", "json", "dry_run", "time_budget", "ms_per_call", "stages", "set", "no_png"}  # flags that change no result


def init() -> None:
    """Under torchrun (WORLD_SIZE > 1): start a gloo process group for the sweep's coordination,
    once, and make this rank's GPU (LOCAL_RANK) the current one, so `cuda` means it."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def shared(value):
    """Rank 0's value on every rank (a default file name with the time in it, a decision)."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def config_of(args) -> dict:
    """The flags that decide a command's results (argparse's namespace, JSON values only)."""
    return {k: v for k, v in sorted(vars(args).items())
            if k not in NOT_CONFIG and isinstance(v, (str, int, float, bool, list, type(None)))}


def cell_path(folder: Path, config: dict, cell) -> Path:
    """<folder>/<readable cell>-<hash of the configuration and the cell>.json"""
    text = json.dumps([config, repr(cell)], sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9.@+=-]+", "_", repr(cell)).strip("_")[:80]
    return folder / f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:12]}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write then rename: the file is whole or absent, whenever the process dies."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(out, config: dict, desc: str, cells: list, compute, calls=lambda cell: 1) -> dict | None:
    """Compute the unfinished cells of this rank, write each as it ends, and return on rank 0
    {cell: {"result", "seconds"}} for every cell (None on the other ranks).

    out: the results file (the cells go in <out>.cells/; None: one process, nothing kept); config:
    config_of(args); cells: hashable, with a stable repr; compute(cell, bar) -> the cell's result (JSON: what is read back must be
    what a single run uses, so rank 0 builds the results file from the files alone); bar: this
    rank's progress bar (bar.update(n) after each model call); calls(cell): its model calls."""
    rank, n = rank_world()
    if out is None:  # nowhere to keep cells: one process computes them all, in memory
        if n > 1:
            raise ValueError("a sweep needs its results file's path (--out): its cells go beside it")
        t0 = time.perf_counter()
        with tqdm(total=sum(calls(c) for c in cells), desc=desc, unit="call", file=sys.stderr, dynamic_ncols=True,
                  mininterval=1.0) as bar:
            done = {}
            for c in cells:
                t = time.perf_counter()
                result = json.loads(json.dumps(compute(c, bar)))  # what a cell's file would give back
                done[c] = dict(cell=repr(c), seconds=time.perf_counter() - t, result=result)
        tqdm.write(f"{desc}: {len(cells)} cells in {time.perf_counter() - t0:.0f} s (none kept: no results file)",
                   file=sys.stderr)
        return done
    folder = Path(str(out)).with_suffix(".cells")
    folder.mkdir(parents=True, exist_ok=True)
    paths = [cell_path(folder, config, c) for c in cells]
    mine = [i for i in range(len(cells)) if i % n == rank and not paths[i].exists()]
    before = sum(p.exists() for p in paths)
    barrier()  # counted before any rank writes
    t0 = time.perf_counter()
    with tqdm(total=sum(calls(cells[i]) for i in mine), desc=f"{desc} [rank {rank}/{n}]" if n > 1 else desc,
              unit="call", file=sys.stderr, dynamic_ncols=True, mininterval=1.0, position=rank) as bar:
        for i in mine:
            t = time.perf_counter()
            result = compute(cells[i], bar)
            record = dict(cell=repr(cells[i]), seconds=time.perf_counter() - t, result=result)
            write_atomic(paths[i], json.dumps(record))
    barrier()  # every rank's cells are written
    if rank != 0:
        return None
    missing = [repr(c) for c, p in zip(cells, paths) if not p.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} cells are missing from {folder} after every rank ended (first: {missing[0]})")
    done = {c: json.loads(p.read_text()) for c, p in zip(cells, paths)}
    tqdm.write(f"{desc}: {len(cells)} cells, {before} finished before, {len(cells) - before} computed by {n} "
               f"process{'es' if n > 1 else ''} in {time.perf_counter() - t0:.0f} s ({folder})", file=sys.stderr)
    return done
