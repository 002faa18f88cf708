"""bench.py tensor parallel (issue 16) on the CPU: two gloo processes, as torchrun starts them, on a
tiny shape in fp32, against one process of the same weights (--tp: TP = 1).

The two ranks build their parts with tp.random_model, run the prefill, the compiled decode step
(aot_eager, the functional all-reduce inside it) and the all-reduce profile; rank 0 alone prints
one table and writes the file, and every row's greedy tokens equal the one process's: for full,
a2sf (scores from attention probabilities) and random (the KV head index, through
tp.rank_cache_class).
"""

import contextlib
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import bench
import model
import tp

WORLD = 2
POLICIES = ("full", "a2sf", "random")
ARGV = ["--models", "tiny", "--contexts", "48", "--budgets", "16", "--policies", ",".join(POLICIES), "--batches", "1",
        "--new-tokens", "6", "--no-hf", "--device", "cpu", "--dtype", "float32", "--prefill-reps", "1", "--profile"]


def _rank(rank, port, folder):
    """One rank, as torchrun --nproc-per-node 2 would start it (its environment), stdout to a file."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with open(os.path.join(folder, f"stdout{rank}.txt"), "w") as f, contextlib.redirect_stdout(f):
        bench.main(ARGV + ["--out", os.path.join(folder, "tp2.json")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_under_two_ranks_equals_one_process(tmp_path, capsys):
    ctx = mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240  # a rank that fails ends the run (join raises); a hang ends here
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("bench.py on two ranks did not finish in 240 s")
    # one process, the same weights: TP = 1; its steps compiled each for its own cache size (--static)
    bench.main(ARGV + ["--tp", "--static", "--out", str(tmp_path / "tp1.json")])
    one_out = capsys.readouterr().out

    out0, out1 = (tmp_path / "stdout0.txt").read_text(), (tmp_path / "stdout1.txt").read_text()
    table = [line for line in out0.splitlines() if line.startswith("| ")]
    assert sum(line.startswith("| model |") for line in table) == 1 and len(table) == 1 + len(POLICIES), out0
    assert "tensor parallel over 2 rank(s) (gloo)" in out0
    assert not [line for line in out1.splitlines() if line.startswith(("|", "#"))], out1  # rank 1 prints nothing
    assert "tensor parallel over 1 rank(s)" in one_out

    two, one = json.loads((tmp_path / "tp2.json").read_text()), json.loads((tmp_path / "tp1.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [r["policy"] for r in two["rows"]] == [r["policy"] for r in one["rows"]] == list(POLICIES)
    for a, b in zip(two["rows"], one["rows"]):
        assert (a["tp"], b["tp"]) == (2, 1)
        assert len(a["tokens"][0]) == 1 + 3 + 6  # the prompt's next token, 3 warm-up steps, 6 timed steps
        assert a["tokens"] == b["tokens"], a["policy"]
        assert a["kv_bytes"] == b["kv_bytes"] and a["kept"] == b["kept"]  # the two ranks' caches: one process's
        assert a["allreduce_ms"] > 0 and b["allreduce_ms"] == 0  # the profile sees the all-reduces (none in one process)


def test_random_model_parts_are_slices_of_one_process_model():
    cfg = model.preset("tiny-llama")
    whole = tp.random_model(cfg, 0, 1, "cpu", torch.float32).state_dict()
    for rank in range(WORLD):
        part = tp.random_model(cfg, rank, WORLD, "cpu", torch.float32)
        assert isinstance(part.layers[0].attn.wo, tp.RowParallelLinear)
        for name, t in part.state_dict().items():
            assert torch.equal(t, tp.shard_tensor(name, whole[name], rank, WORLD)), name


def test_tp_plan_rows_and_the_70b_arithmetic():
    """The 70B shape: ~138 GB (128.5 GiB) of bf16 weights; at 64k its full cache does not fit one H200
    beside them (~139 GiB usable), a2sf at 20% does; every plan row names a known shape and a TP it can run at."""
    cfg = model.preset("llama-2-70b")
    with torch.device("meta"):
        params = sum(p.numel() for p in model.Transformer(cfg).parameters())
    assert 68.9e9 < params < 69.1e9
    per_token = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 2  # bytes of k and v, bf16
    assert per_token == 320 * 1024
    weights, h200 = 2 * params, 139 * 2**30
    assert weights + 65536 * per_token > h200 > weights + round(0.2 * 65536) * per_token
    for row in bench.PLANS["tp"]:
        opts = row[-1] if isinstance(row[-1], dict) else {}
        assert row[0] in bench.SHAPES and opts.get("tp", 1) in (1, 2) and row[1] in ("full", "a2sf")


def test_plan_row_options(tmp_path, capsys, monkeypatch):
    """A plan row's options: {"tp": k} runs only at world size k (said in a comment line otherwise);
    vs_full False runs no full prefill beside the row's ("prefill / full": nan)."""
    monkeypatch.setitem(bench.PLANS, "tiny-tp", [("tiny", "a2sf", 16, 48, 1, "streaming", {"tp": 2}),
                                                 ("tiny", "a2sf", 16, 48, 1, "streaming", {"tp": 1, "vs_full": False})])
    bench.main(["--plan", "tiny-tp", "--tp", "--no-compile", "--device", "cpu", "--dtype", "float32", "--new-tokens", "2",
                "--prefill-reps", "1", "--out", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert "# tiny a2sf 16 48 streaming: a TP = 2 row, skipped at TP = 1" in out
    rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["mode"] == "streaming" and rows[0]["prefill_vs_full"] != rows[0]["prefill_vs_full"]
