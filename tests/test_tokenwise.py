"""Token-by-token eviction inside a prompt (issue 18): generate.feed with a decode step for the
one-token calls after the first (fast.compile_decode, fast.graph_decode) against the plain feed:
the same logits and the same kept positions per layer and KV head, for a scored policy, an
unscored one and a policy of your own (a `score_fn`), in a left-padded batch; where the CLI,
evaluate.py and bench.py use it; on CUDA (-m gpu) the CUDA-graph steps."""

import argparse
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generate import ByteTokenizer, tiny_load

import bench
import evaluate
import fast
import generate
import load_weights
import policies

ROOT = Path(__file__).resolve().parent.parent


def value_norm_score(k, v, p):
    return v.float().norm(dim=-1)  # a policy of your own: keep the largest values (one function)


@pytest.fixture
def value_norm_registered(monkeypatch):
    monkeypatch.setitem(policies.REGISTRY, "valuenorm", ("largest value norm", lambda b: dict(scored=False,
                                                                                             score_fn=value_norm_score)))


def kept(cache):
    return [cache.kept_positions(layer) for layer in range(cache.cfg.n_layers)]


class StaticBuffer:
    """A step that returns one buffer every call, as a CUDA graph's replay does; counts its calls."""

    def __init__(self, step):
        self.step, self.calls, self.out = step, 0, None

    def __call__(self, tokens):
        self.calls += 1
        logits = self.step(tokens)
        self.out = logits.clone() if self.out is None else self.out.copy_(logits)
        return self.out


PAD = [0, 3, 6]  # left padding per sequence: the first call goes through the reference forward


@pytest.mark.parametrize("policy_name", ["a2sf", "sink", "valuenorm"])
def test_feed_through_the_compiled_step_equals_the_plain_feed(policy_name, value_norm_registered):
    """fast.compile_decode (aot_eager on the CPU: real compiled code) runs every one-token call after
    the first: the same logits (fp32) and the same kept positions per layer and KV head as the
    plain feed, with left padding; the step is called for exactly those T - 1 calls."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m = fast.enable(tiny_model("tiny-llama"))
    budget, T = 7, 26
    p = policies.make_policy(policy_name, budget)
    tokens = torch.randint(1, 128, (3, T), generator=torch.Generator().manual_seed(5))
    plain, stepped = (fast.KVCache(m.cfg, p, budget, batch=3, mode="streaming", chunk=1, pad=PAD) for _ in range(2))
    with torch.no_grad():
        want = generate.feed(m, tokens, plain)
        step = StaticBuffer(fast.compile_decode(m, stepped))
        got = generate.feed(m, tokens, stepped, step=step)
    assert got.shape == want.shape == (3, T, m.cfg.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert kept(stepped) == kept(plain)
    assert step.calls == T - 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly


@settings(max_examples=25, deadline=None)
@given(mode=st.sampled_from(["streaming", "prefill"]), chunk=st.integers(1, 3), budget=st.integers(2, 9),
       T=st.integers(1, 14), pad=st.integers(0, 3), last_only=st.booleans(),
       policy_name=st.sampled_from(["h2o", "window", "full"]), seed=st.integers(0, 2**16))
def test_feed_with_a_step_is_the_feed_without_it(mode, chunk, budget, T, pad, last_only, policy_name, seed):
    """For any mode, chunk, budget, length and padding: feed with a step gives the plain feed's
    logits and kept tokens, and the step runs exactly the one-token calls after the first of a
    chunk-1 stream (none otherwise). The step returns one buffer every call, as a CUDA graph does:
    what feed keeps must be copies."""
    m = fast.enable(tiny_model("tiny-llama"))
    b = None if policy_name == "full" else budget
    p = policies.make_policy(policy_name, b)
    tokens = torch.randint(1, 128, (2, T), generator=torch.Generator().manual_seed(seed))
    make = lambda: fast.KVCache(m.cfg, p, b, batch=2, mode=mode, chunk=chunk, pad=[0, min(pad, T - 1)],  # noqa: E731
                                max_len=T + 1)
    plain, stepped = make(), make()
    step = StaticBuffer(lambda x: m(x, stepped))
    with torch.no_grad():
        want = generate.feed(m, tokens, plain, last_only=last_only)
        got = generate.feed(m, tokens, stepped, last_only=last_only, step=step)
    assert got.shape == want.shape == (2, 1 if last_only else T, m.cfg.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert kept(stepped) == kept(plain)
    assert step.calls == (T - 1 if mode == "streaming" and chunk == 1 and b is not None else 0)


def test_the_cli_feeds_a_chunk_1_prompt_through_the_graph_step(monkeypatch, capsys, graph_steps):
    """generate.py --mode streaming --chunk 1 (fast path): the prompt's calls after the first and
    the decode steps go through one fast.graph_decode step (on the CPU the plain step; here made to
    return one buffer, as on CUDA): the text --reference prints."""
    monkeypatch.setattr(load_weights, "load", tiny_load)
    made = graph_steps
    argv = ["--prompt", "a prompt of a few more tokens than the budget", "--policy", "h2o", "--budget", "8",
            "--mode", "streaming", "--chunk", "1", "--max-new-tokens", "6"]
    outs = []
    for extra in ([], ["--reference"]):
        assert generate.main(argv + extra) == 0
        outs.append(capsys.readouterr().out.rsplit("\n", 2)[0])  # the text, without the timings
    assert outs[0] == outs[1]
    prompt_len = len("a prompt of a few more tokens than the budget".encode())
    assert len(made) == 1 and made[0].calls == prompt_len - 1 + 5  # the last new token is never fed back


@pytest.fixture
def graph_steps(monkeypatch):
    """fast.graph_decode, made to return one buffer every call (as on CUDA) and to list its steps."""
    made = []

    def graph_decode(model, cache):
        made.append(StaticBuffer(lambda x: model(x, cache)))
        return made[-1]

    monkeypatch.setattr(fast, "graph_decode", graph_decode)
    return made


def test_evaluate_mask_sim_rows_go_through_the_graph_step(graph_steps):
    """evaluate.py mask-sim (row by row, chunk 1) with --graph: the calls after the first through one
    steady_step; what each row saw is the plain run's."""
    made = graph_steps
    m = fast.enable(tiny_model("tiny-llama"))
    tokens = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    p = policies.make_policy("h2o", 6)
    runs = []
    for graph in (False, True):
        setup = evaluate.Setup(graph=graph)
        with torch.no_grad():
            runs.append([(t, torch.stack(seen)) for t, seen in evaluate.seen_masks(m, tokens, p, 6, setup)])
    assert len(made) == 1 and made[0].calls == 20 - 6  # the first call holds the first `budget` tokens
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*runs))


def test_evaluate_needle_streams_its_prompt_and_decodes_through_one_graph_step(graph_steps):
    """evaluate.py needle, streaming at chunk 1, with --graph: the prompt's calls after the first
    and the decode steps through one step per cache; the same answers as the plain run."""
    made = graph_steps
    m = fast.enable(tiny_model("tiny-llama"))
    tok = ByteTokenizer(m.cfg.vocab_size)
    L, budget, new_tokens = 240, 8, 4
    args = argparse.Namespace(limit=1, seed=0, policy_list=["h2o"], lengths=[L], depths=[0.5], new_tokens=new_tokens,
                              dry_run=False, budgets=[budget], budget=None, ratios=None, ratio=None)
    runs = [evaluate.run_needle(m, tok, args, evaluate.Setup(graph=graph)) for graph in (False, True)]
    assert [r["answers"] for r in runs[0]] == [r["answers"] for r in runs[1]]
    assert len(made) == 1 and made[0].calls == (L - 1 - budget) + (new_tokens - 1)


def test_bench_tokenwise_rows(tmp_path, capsys, monkeypatch):
    """bench.py --plan tokenwise: one row per way (eager, graph, compiled), tokens/s of the whole feed,
    the same next tokens; the plan's rows are issue 18's (SmolLM2, batch 64, 2048 tokens, 20%)."""
    assert bench.PLANS["tokenwise"] == [("smollm2", p, "r0.2", 2048, 64, "tokenwise") for p in ("a2sf", "h2o")]
    monkeypatch.setitem(bench.PLANS, "tiny-tokenwise", [("tiny", "a2sf", 8, 40, 2, "tokenwise")])
    bench.main(["--plan", "tiny-tokenwise", "--device", "cpu", "--dtype", "float32", "--no-hf",
                "--out", str(tmp_path / "tw.json")])
    rows = json.loads((tmp_path / "tw.json").read_text())["rows"]
    assert [r["way"] for r in rows] == ["eager", "graph", "compiled"]
    assert all(r["prefill_tok_s"] > 0 and r["agree"] == 1.0 and r["kept"] == 8 and r["mode"] == "streaming, chunk 1"
               for r in rows)
    out = capsys.readouterr().out
    assert "| tiny | ours, compiled | a2sf | 8 | 40 | 2 | streaming, chunk 1 |" in out
    assert "# tokenwise a2sf: graph " in out


def test_tokenwise_ab_script_runs_on_the_cpu(monkeypatch, capsys):
    """scripts/tokenwise_ab.py . with the CPU overrides (run in this process): one line per policy and way."""
    monkeypatch.setenv("DEV", "cpu")
    monkeypatch.setenv("MODEL", "tiny")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", ["tokenwise_ab.py", ".", "--context", "24", "--batch", "2", "--policies", "h2o",
                                      "--ways", "eager,graph"])
    runpy.run_path("scripts/tokenwise_ab.py", run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("## tokenwise")]
    assert [line.split(" tok/s ")[1].split(")")[0] for line in lines] == ["(eager", "(step graph"]
    assert all(line.startswith("## tokenwise . h2o 5 2 24: ") for line in lines)


# -- on CUDA: the CUDA-graph steps ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("way", ["graph_decode", "compile_decode"])
@pytest.mark.parametrize("policy_name", ["a2sf", "h2o", "sink"])
def test_feed_through_a_cuda_graph_equals_the_plain_feed_on_cuda(policy_name, way):
    """On CUDA, fp32: feed with fast.graph_decode (the eager step as a CUDA graph) or
    fast.compile_decode (inductor, then a CUDA graph) against the plain feed, left-padded: the
    same logits and kept positions, the step a CudaGraphStep; then the cache emptied in place
    (reset) and fed again through the same captured graph (what bench.py --plan tokenwise times)."""
    torch._dynamo.reset()
    m = fast.enable(tiny_model("tiny-llama").cuda())
    budget, T = 9, 40
    p = policies.make_policy(policy_name, budget)
    plain, stepped = (fast.KVCache(m.cfg, p, budget, batch=3, chunk=1, pad=PAD, device="cuda") for _ in range(2))
    step = getattr(fast, way)(m, stepped)
    assert isinstance(step, fast.CudaGraphStep)
    for seed in range(2):
        tokens = torch.randint(1, 128, (3, T), generator=torch.Generator().manual_seed(seed)).cuda()
        if seed:
            plain.reset(PAD), stepped.reset(PAD)
        with torch.no_grad():
            want = generate.feed(m, tokens, plain)
            got = generate.feed(m, tokens, stepped, step=step)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert kept(stepped) == kept(plain)
    assert step.graph is not None  # captured, and replayed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy_name", ["sink", "a2sf", "h2o"])
def test_the_compiled_step_in_bf16_replays_the_eager_calls_of_a_chunk_1_stream_on_cuda(policy_name):
    """SmolLM2's shape, random bf16 weights (the fast kernels' dtype; the fp32 test above runs none of
    them): 96 tokens through a streaming chunk-1 cache of budget 64 (not full for 63 calls, then
    evicting), each call after the first through fast.compile_decode's CUDA graph, against the eager
    call `model(tokens, cache)` on a second cache. Session 10 found the compiled embedding
    (fast.step.EMBED, then with cos and sin compiled: Triton's are up to 3e-5 from eager CUDA's) drifting
    by up to 2.0 from the second replay on (scripts/capture_probe.py); bf16's rounding of a logit of ~10
    is 0.06."""
    torch._dynamo.reset()
    m = bench.build_model("smollm2", torch.device("cuda"), torch.bfloat16, "random")[0]
    p = policies.make_policy(policy_name, 64)
    eager, stepped = (fast.KVCache(m.cfg, p, 64, chunk=1, device="cuda", dtype=torch.bfloat16, max_len=96)
                      for _ in range(2))
    step = fast.compile_decode(m, stepped)
    tokens = torch.randint(0, m.cfg.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        for i in range(96):
            want = m(tokens[:, i:i + 1], eager)
            got = (m(tokens[:, i:i + 1], stepped) if i == 0 else step(tokens[:, i:i + 1])).clone()
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.25, msg=f"call {i}")
    assert step.graph is not None
    assert all(eager.kept_positions(k) == stepped.kept_positions(k) for k in range(m.cfg.n_layers))
