"""keep-map: the picture's data is what the cache held, call by call (an oracle run of the cache here)."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_model
from test_evaluate import CharTokenizer

import evaluate
import keepmap
import policies
from cache import KVCache

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity.")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("tiny-llama"), CharTokenizer()


def oracle(m, tokens, policy, budget, layer, bounds, mode="streaming", chunk=1):
    """After every call: the sorted positions each KV head of `layer` holds, straight from the cache."""
    cache = KVCache(m.cfg, policy, budget, mode=mode, chunk=chunk)
    ids = torch.tensor([tokens])
    out = []
    with torch.no_grad():
        for s, e in bounds:
            m(ids[:, s:e], cache)
            out.append(cache.kept_positions(layer)[0])
    return out


@pytest.mark.parametrize("name", ["window", "sink", "h2o", "a2sf", "vatp", "tova"])
@pytest.mark.parametrize("mode,chunk,prompt", [("streaming", 1, None), ("streaming", 3, None), ("prefill", 1, 40)])
def test_intervals_equal_kept_positions_after_every_call(tiny, name, mode, chunk, prompt):
    m, tok = tiny
    tokens = tok.encode(TEXT)[:70]
    budget = 16
    policy = policies.make_policy(name, budget)
    layer = 1
    bounds = [(0, prompt)] + [(s, min(s + chunk, 70)) for s in range(prompt, 70, chunk)] if prompt else \
        [(s, min(s + chunk, 70)) for s in range(0, 70, chunk)]
    want = oracle(m, tokens, policy, budget, layer, bounds, mode, chunk)
    rec = keepmap.record(m, tokens, policy, budget, layer, mode=mode, chunk=chunk, prompt=prompt)
    assert rec["calls"] == [e for _, e in bounds]
    for h, head in enumerate(rec["intervals"]):
        held = keepmap.held_matrix(head, rec["calls"])  # (positions, calls)
        for c in range(len(bounds)):
            assert np.flatnonzero(held[:, c]).tolist() == want[c][h], (name, h, c)
    # the picture is not trivial: tokens were evicted, and no head held more than the budget
    all_heads = np.stack([keepmap.held_matrix(h, rec["calls"]) for h in rec["intervals"]])
    assert all_heads.sum(axis=1).max() == budget
    assert not all_heads[:, :, -1].all()


def test_window_intervals_by_hand(tiny):
    """window keeps the `budget` latest: token p enters at p + 1 tokens fed and leaves at p + 1 + budget."""
    m, tok = tiny
    tokens = tok.encode(TEXT)[:40]
    rec = keepmap.record(m, tokens, policies.make_policy("window", 8), 8, 0)
    for head in rec["intervals"]:
        assert head == [[p + 1, p + 9 if p + 9 <= 40 else None] for p in range(40)]


def test_keep_map_subcommand(tiny, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    out = tmp_path / "km.json"
    argv = ["keep-map", "--text", str(path), "--tokens", "60", "--budget", "12", "--layer", "1", "--kv-head", "1",
            "--policies", "window,sink,h2o,a2sf", "--out", str(out)]
    assert evaluate.main(argv, *tiny) == 0
    rec = json.loads(out.read_text())
    assert rec["kind"] == "keep-map" and [r["policy"] for r in rec["results"]] == ["window", "sink", "h2o", "a2sf"]
    sink = rec["results"][1]
    assert sink["sinks_held"] == [4, 4] and sink["old_held"] == [4, 4]  # 4 sinks, the rest recent
    assert rec["results"][0]["sinks_held"] == [0, 0]
    assert out.with_suffix(".png").stat().st_size > 10_000
    png = evaluate.plot_file(out, out=tmp_path / "again.png")  # `evaluate.py plot` knows the kind too
    assert png.exists()
    assert evaluate.main(argv[:-2] + ["--layer", "9"], *tiny) == 2
