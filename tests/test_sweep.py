"""Sweeps over processes (sweep.py through evaluate.py) on the CPU: a tiny model, gloo, two processes.

The results file of a sweep sharded over two processes equals the one-process file; a run killed
hard (os._exit, mid-cell) keeps the cells it finished, and a rerun of the same command, on two
processes, computes only the rest and gives the same file again. Times and the output path aside,
"equal" is exact: every figure is built from the cells as written.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_model
from test_evaluate import FAKE_DOCS, CharTokenizer

import data
import evaluate
import sweep

ARGV = ["mc", "--tasks", "copa,piqa", "--policies", "full,h2o,a2sf", "--ratios", "0.3,0.6", "--cell-docs", "2"]
N_CELLS = (1 + 2 + 2) * 2  # (full, h2o x 2 ratios, a2sf x 2 ratios) x 2 slices of the 3 docs


def _setup():
    torch.set_num_threads(1)
    data.mc_task = lambda task, variant="rc_0shot": json.loads(json.dumps(FAKE_DOCS))
    return tiny_model("tiny-llama"), CharTokenizer()


def _main(out, model, tok):
    assert evaluate.main([*ARGV, "--out", str(out)], model, tok) == 0


def _mc(out):
    _main(out, *_setup())


def _on_rank(rank, store, run, out):
    """Rank `rank` of two (gloo, a file store): run(out), the same command as one process."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        run(out)
    finally:
        dist.destroy_process_group()


def _killed(out, after):
    """One process that dies hard (no cleanup) inside its cell number `after` + 1."""
    model, tok = _setup()
    real, seen = evaluate.loglikelihoods, []

    def dying(*args, **kwargs):
        seen.append(1)
        if len(seen) > after:
            os._exit(9)
        return real(*args, **kwargs)

    evaluate.loglikelihoods = dying
    _main(out, model, tok)


def _two_ranks(tmp_path, out, run=_mc):
    mp.spawn(_on_rank, args=(str(tmp_path / f"store-{Path(out).stem}"), run, str(out)), nprocs=2, join=True)


def _figures(path):
    """The results file without what differs between equal runs: times and the file's own name."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "created", "out")}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return strip(json.loads(path.read_text()))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "mc.json"
    real = data.mc_task
    try:
        _main(out, *_setup())
    finally:
        data.mc_task = real
    return out


def test_sharded_sweep_equals_one_process(tmp_path, one_process):
    out = tmp_path / "mc.json"
    _two_ranks(tmp_path, out)
    assert _figures(out) == _figures(one_process)
    assert len(list(out.with_suffix(".cells").glob("*.json"))) == N_CELLS


def test_killed_run_rerun_gives_the_same_file(tmp_path, one_process):
    out = tmp_path / "mc.json"
    p = mp.get_context("spawn").Process(target=_killed, args=(str(out), 3))
    p.start()
    p.join()
    assert p.exitcode == 9
    cells = out.with_suffix(".cells")
    kept = {c: c.stat().st_mtime_ns for c in cells.glob("*.json")}
    assert len(kept) == 3 and not out.exists()  # the finished cells, whole; no results file yet
    (cells / ".half-written.json.1234.tmp").write_text('{"cell": ')  # what a kill mid-write leaves: ignored
    _two_ranks(tmp_path, out)  # the same command again, now on two processes
    assert _figures(out) == _figures(one_process)
    assert {c: c.stat().st_mtime_ns for c in kept} == kept  # the finished cells were not computed again
    assert len(list(cells.glob("*.json"))) == N_CELLS


def test_cell_names():
    cfg = {"policy_list": ["h2o"], "limit": 3}
    a = sweep.cell_path(Path("x"), cfg, ("h2o", ("ratio", 0.2), (0, 2)))
    assert a.name.startswith("h2o_ratio_0.2_0_2-") and a.suffix == ".json"
    assert sweep.cell_path(Path("x"), {**cfg, "limit": 4}, ("h2o", ("ratio", 0.2), (0, 2))) != a  # another command


RULER_ARGV = ["ruler", "--tasks", "niah_single_1,fwe", "--lengths", "600", "--limit", "3", "--batch-size", "2",
              "--policies", "full,a2sf,window", "--ratios", "0.3", "--new-tokens", "4"]
RULER_CELLS = 2 * (1 + 2 * 2)  # tasks x (full, then a2sf and window x both settings)


def _ruler(out):
    torch.set_num_threads(1)
    assert evaluate.main([*RULER_ARGV, "--out", str(out)], tiny_model("tiny-llama", max_seq_len=4096), CharTokenizer()) == 0


def test_sharded_ruler_equals_one_process_and_a_rerun_computes_nothing(tmp_path):
    """evaluate.py ruler over two processes: the file one process writes; the same command again
    finds every cell finished and computes none (their files untouched)."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _ruler(one)
    _two_ranks(tmp_path, two, _ruler)
    assert _figures(two) == _figures(one)
    assert {r["policy"] for r in _figures(one)["results"]} == {"full", "a2sf", "window"}
    cells = {c: c.stat().st_mtime_ns for c in two.with_suffix(".cells").glob("*.json")}
    assert len(cells) == RULER_CELLS
    _ruler(two)
    assert _figures(two) == _figures(one) and {c: c.stat().st_mtime_ns for c in cells} == cells


TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. " * 2
LOOPS = {  # the other subcommands that loop over cells, each small: kind -> (argv without --out, its cells)
    "mask-sim": (["mask-sim", "--text", "TEXT", "--tokens", "60", "--policies", "window,h2o", "--ratios", "0.25,0.5"],
                 2 * 2),  # policy x ratio
    "needle": (["needle", "--policies", "full,window,h2o", "--budgets", "64", "--lengths", "260,300", "--depths", "0,1",
                "--limit", "1", "--new-tokens", "4"], 3 * 2),  # (full, window and h2o at one budget) x 2 lengths
    "keep-map": (["keep-map", "--text", "TEXT", "--tokens", "60", "--budget", "12", "--layer", "1",
                  "--policies", "window,sink,h2o"], 3),  # policy at one budget
}


def _loops(folder):
    """mask-sim, needle and keep-map one after another, each with its results file in `folder`
    (the text beside it: ../text.txt)."""
    torch.set_num_threads(1)
    folder, m, tok = Path(folder), tiny_model("tiny-llama", max_seq_len=4096), CharTokenizer()
    for kind, (argv, _) in LOOPS.items():
        argv = [str(folder.parent / "text.txt") if a == "TEXT" else a for a in argv]
        assert evaluate.main([*argv, "--out", str(folder / f"{kind}.json")], m, tok) == 0


def test_sharded_mask_sim_needle_keep_map_equal_one_process_and_a_rerun_computes_nothing(tmp_path):
    """evaluate.py mask-sim, needle and keep-map over two processes (one launch for the three): each
    results file is the one one process writes; the same commands again find every cell finished
    and compute none (their files untouched), and give the same files."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (tmp_path / "text.txt").write_text(TEXT)
    _loops(one)
    _two_ranks(tmp_path, two, _loops)
    cells = {}
    for kind, (_, n_cells) in LOOPS.items():
        a, b = _figures(one / f"{kind}.json"), _figures(two / f"{kind}.json")
        assert a["kind"] == kind and len(a["results"]) > 1 and b == a
        cells[kind] = {c: c.stat().st_mtime_ns for c in (two / f"{kind}.cells").glob("*.json")}
        assert len(cells[kind]) == n_cells
    assert (two / "keep-map.png").exists()
    before = {kind: _figures(two / f"{kind}.json") for kind in LOOPS}
    _loops(two)  # one process now, the same commands and files
    for kind in LOOPS:
        assert {c: c.stat().st_mtime_ns for c in (two / f"{kind}.cells").glob("*.json")} == cells[kind]
        assert _figures(two / f"{kind}.json") == before[kind]


LM_EVAL_ARGV = ["lm-eval", "--tasks", "arc_easy", "--limit", "3", "--policies", "full,window,a2sf", "--ratios", "0.5"]


def _lm_eval(out):
    torch.set_num_threads(1)
    assert evaluate.main([*LM_EVAL_ARGV, "--out", str(out)], tiny_model("tiny-llama", max_seq_len=4096),
                         CharTokenizer()) == 0


def test_sharded_lm_eval_equals_one_process_and_a_rerun_computes_nothing(tmp_path):
    """evaluate.py lm-eval over two processes (its cells: full, window and a2sf at one ratio): the file
    one process writes, in the same order; the same command again computes no cell."""
    pytest.importorskip("lm_eval")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _lm_eval(one)
    _two_ranks(tmp_path, two, _lm_eval)
    rows = _figures(one)["results"]
    assert [r["policy"] for r in rows] == ["full", "window", "a2sf"] and all(r["n_docs"] == 3 for r in rows)
    assert _figures(two) == _figures(one)
    cells = {c: c.stat().st_mtime_ns for c in two.with_suffix(".cells").glob("*.json")}
    assert len(cells) == 3
    _lm_eval(two)
    assert _figures(two) == _figures(one) and {c: c.stat().st_mtime_ns for c in cells} == cells
