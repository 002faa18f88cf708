"""Checker for exercise 07 (the key-norm policy): `pytest exercises/07_keynorm_policy`
(the perplexity comparison over 512 tokens: `pytest exercises/07_keynorm_policy -m slow`)."""

import math

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import evaluate
import policies
from exercises import course
from model import rotate

impl = course.implementation(__file__)


@st.composite
def states(draw):
    B, H, S, D = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 10)), draw(st.sampled_from([2, 4, 8]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    keys = torch.randn(B, H, S, D, generator=g) * torch.rand(B, H, S, 1, generator=g) * 3
    key_pos = torch.stack([torch.stack([torch.randperm(S + 3, generator=g)[:S] for _ in range(H)]) for _ in range(B)])
    valid = torch.rand(B, H, S, generator=g) < 0.8
    newest = key_pos.amax(dim=(1, 2))
    return keys, key_pos, valid, newest, draw(st.integers(0, 3)), draw(st.integers(0, 3))


@given(states())
def test_priority_is_minus_the_key_norm_with_protected_slots(state):
    keys, key_pos, valid, newest, n_sink, recent = state
    got = impl.keynorm_priority(keys, key_pos, valid, newest, n_sink, recent)
    assert got.shape == key_pos.shape, f"keynorm_priority returns (B, Hkv, S) = {tuple(key_pos.shape)}, got {tuple(got.shape)}"
    norm = keys.double().pow(2).sum(-1).sqrt()
    protected = (key_pos < n_sink) | (key_pos > newest[:, None, None] - recent)
    assert (got[~valid] == float("-inf")).all(), "empty slots (valid False) must get -inf: they are never kept"
    assert (got[valid & protected] == float("inf")).all(), (
        f"protected slots (position < n_sink = {n_sink}, or > newest - recent with recent = {recent}) must get +inf")
    free = valid & ~protected
    flipped = torch.allclose(got[free].double(), norm[free], rtol=1e-4)
    assert torch.allclose(got[free].double(), -norm[free], rtol=1e-5, atol=1e-5), (
        "the other slots rank by -||k||_2 (the L2 norm over the head dimension D): the LOWEST norm is kept first. "
        + ("You have +||k||: that keeps the highest norms. " if flipped else ""))


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), shift=st.integers(0, 5000))
def test_rotating_the_keys_does_not_change_the_priority(seed, shift):
    """The cache stores keys rotated by their position (RoPE): the key norm is the same either way."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, 6, 16, generator=g)
    key_pos = torch.arange(6).expand(1, 2, 6)
    valid = torch.ones(1, 2, 6, dtype=torch.bool)
    rotated = rotate(keys, key_pos + shift, 10000.0)
    a = impl.keynorm_priority(keys, key_pos, valid, torch.tensor([5]), 0, 0)
    b = impl.keynorm_priority(rotated, key_pos, valid, torch.tensor([5]), 0, 0)
    assert torch.allclose(a, b, atol=1e-4), "a rotation keeps a vector's L2 norm: rotated keys must rank the same"


@torch.no_grad()
def keynorm_masked_simulation(m, tokens, budget, chunk, n_sink, recent):
    """The rule written independently, the papers' way: one forward, every key kept in memory, row t
    attends to what the key-norm rule would hold at step t; lists of kept positions per head."""
    B, T = tokens.shape
    cfg = m.cfg
    pos = torch.arange(T).expand(B, T)
    x = m.embed(tokens, pos)
    for block in m.layers:
        a = block.attn
        q, k, v = a.project(block.attn_norm(x))
        q, k = a.rope(q, pos), a.rope(k, pos)
        norms = k.float().norm(dim=-1).tolist()  # (B, Hkv, T)
        held = [[[] for _ in range(cfg.n_kv_heads)] for _ in range(B)]
        out = torch.zeros_like(q)
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            for b in range(B):
                for g in range(cfg.n_kv_heads):
                    held[b][g] += list(range(s, e))
            mask = torch.zeros(B, cfg.n_kv_heads, e - s, T, dtype=torch.bool)
            for b in range(B):
                for g in range(cfg.n_kv_heads):
                    for r in range(s, e):
                        mask[b, g, r - s, [j for j in held[b][g] if j <= r]] = True
            scores = (q[..., s:e, :] @ k[:, :, None].transpose(-1, -2)) / math.sqrt(cfg.head_dim)  # (B, Hkv, G, R, T)
            out[..., s:e, :] = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1) @ v[:, :, None]
            for b in range(B):
                for g in range(cfg.n_kv_heads):
                    while len(held[b][g]) > budget:  # drop the highest norm outside the protected; ties: the oldest
                        free = [j for j in held[b][g] if j >= n_sink and j <= e - 1 - recent]
                        held[b][g].remove(min(free, key=lambda j: (-norms[b][g][j], j)))
        x = x + a.output(out)
        x = x + block.mlp(block.mlp_norm(x))
    return m.head(x)


@settings(max_examples=8)
@given(seed=st.integers(0, 1000), budget=st.integers(4, 9), chunk=st.integers(1, 3), n_sink=st.integers(0, 2),
       recent=st.integers(0, 2))
def test_your_cache_evicts_by_key_norm(seed, budget, chunk, n_sink, recent):
    m = tiny_model("tiny-llama", seed=seed % 3)
    # distinct tokens: a repeated token has the same key in layer 0 (up to its rotation), so the same norm, and
    # which of the two goes would be decided by rounding in the rotation, not by the rule
    tokens = torch.randperm(128, generator=torch.Generator().manual_seed(seed))[None, :16]
    policy = impl.keynorm_policy(budget, n_sink, recent)
    cache = impl.KeyNormCache(m.cfg, policy, budget, chunk=chunk)
    assert not policy.scored and not cache.layers[0].needs_probs, "the key-norm rule needs no attention probabilities"
    outs = []
    with course.explained(impl.KeyNormLayer.evict), torch.no_grad():
        for s in range(0, 16, chunk):
            outs.append(m(tokens[:, s:s + chunk], cache))
            held = cache.tokens_held()
            assert (held <= budget).all(), f"after the call ending at {s + chunk}, {int(held.max())} tokens > budget {budget}"
    got = torch.cat(outs, dim=1)
    want = keynorm_masked_simulation(m, tokens, budget, chunk, n_sink, recent)
    assert (got - want).abs().max() < 1e-4, (
        f"budget {budget}, chunk {chunk}, n_sink {n_sink}, recent {recent}: your cache's logits differ from an independent "
        f"masked simulation of the rule by {(got - want).abs().max():.3g}. After each call keep the `budget` tokens of "
        "highest keynorm_priority (cache.keep_top breaks ties by evicting the oldest) and write self.valid in place.")


def test_keynorm_logprobs_through_evaluate_py():
    m = tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(5)
    tokens = torch.stack([torch.randperm(128, generator=g)[:20] for _ in range(2)])  # distinct: no tied key norms
    policy = impl.keynorm_policy(6, 1, 1)
    with course.explained(impl.KeyNormLayer.evict):
        got = impl.keynorm_logprobs(m, tokens, policy, 6, 2)
        cache = impl.KeyNormCache(m.cfg, policy, 6, batch=2, chunk=2)
        with torch.no_grad():
            logits = torch.cat([m(tokens[:, s:s + 2], cache) for s in range(0, 20, 2)], dim=1)
    want = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    assert torch.allclose(got, want, atol=1e-4), "evaluate.token_logprobs with a KeyNormCache must equal streaming it yourself"


def ppl(lp):
    return math.exp(-float(lp.mean()))


def test_keynorm_beats_the_window_on_the_real_model():
    impl.keynorm_priority(torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.bool),
                          torch.zeros(1, dtype=torch.long), 0, 0)  # fail fast on a stub
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, 128)])
    with course.explained(impl.KeyNormLayer.evict):
        mine = ppl(impl.keynorm_logprobs(m, tokens, impl.keynorm_policy(16, 0, 4), 16, 16))
    window = ppl(evaluate.token_logprobs(m, tokens, policies.make_policy("window", 16), 16, evaluate.Setup(chunk=16)))
    print(f"128 tokens, budget 16, calls of 16: keynorm (recent 4) {mine:.2f}, window {window:.2f}")
    assert mine < window, f"keynorm {mine:.2f} should beat the window {window:.2f} here"


@pytest.mark.slow
def test_keynorm_against_window_sink_h2o_at_budget_64():
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, 512)])
    setup = evaluate.Setup(chunk=8)
    res = {name: ppl(evaluate.token_logprobs(m, tokens, policies.make_policy(name, 64), 64, setup)) for name in ("window", "h2o")}
    res["keynorm"] = ppl(impl.keynorm_logprobs(m, tokens, impl.keynorm_policy(64, 0, 8), 64, 8))
    print("512 tokens, budget 64, calls of 8:", {k: round(v, 2) for k, v in res.items()})
    assert res["keynorm"] < res["window"]
