"""Checker for exercise 06 (GQA aggregation): `pytest exercises/06_gqa_aggregation`
(the measurement at budget 32 over 256 tokens: `pytest exercises/06_gqa_aggregation -m slow`)."""

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import policies
import simulate
from exercises import course

impl = course.implementation(__file__)


@given(seed=st.integers(0, 10_000), G=st.integers(1, 4), how=st.sampled_from(["sum", "max", "mean"]))
def test_aggregate_group(seed, G, how):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(2, 3, G, 4, 7, generator=g).softmax(-1)
    got = impl.aggregate_group(probs, how)
    assert got.shape == (2, 3, 4, 7), f"aggregate_group returns (B, Hkv, T, S) = (2, 3, 4, 7), got {tuple(got.shape)}"
    want = probs.mean(2) if how == "mean" else policies.aggregate_heads(probs, how)
    assert torch.allclose(got, want, atol=1e-6), f"how={how!r}: off by {(got - want).abs().max():.3g} over the group axis (dim 2)"
    if how == "mean":  # mean is sum / G: every KV head ranks its tokens exactly as with the sum
        s = impl.aggregate_group(probs, "sum")
        assert torch.equal(got.argsort(dim=-1, stable=True), s.argsort(dim=-1, stable=True)), (
            "mean and sum must rank every KV head's tokens the same way (mean = sum / G)")


@settings(max_examples=6)
@given(seed=st.integers(0, 1000), budget=st.integers(3, 9), chunk=st.integers(1, 3), gqa=st.sampled_from(["sum", "max"]),
       name=st.sampled_from(["h2o", "a2sf", "tova"]))
def test_run_policy_matches_the_masked_simulation(seed, budget, chunk, gqa, name):
    m = tiny_model("tiny-llama")  # 4 query heads on 2 KV heads
    tokens = course.random_tokens(seed, 1, 16)
    policy = policies.make_policy(name, budget, gqa=gqa)
    logits, kept = impl.run_policy(m, tokens, policy, budget, chunk)
    with torch.no_grad():
        sim, masks = simulate.masked_simulation(m, tokens, policy, budget, chunk=chunk)
    assert logits.shape == sim.shape, f"logits must be (B, T, V) = {tuple(sim.shape)}, got {tuple(logits.shape)}"
    assert (logits - sim).abs().max() < 1e-4, f"{name} gqa={gqa}: logits off by {(logits - sim).abs().max():.3g}"
    assert len(kept) == m.cfg.n_layers, f"one kept mask per layer ({m.cfg.n_layers}), got {len(kept)}"
    for layer, (k, mk) in enumerate(zip(kept, masks)):
        assert k.shape == mk.shape[:3] and k.dtype == torch.bool, f"kept[{layer}] must be bool (B, Hkv, T), got {k.shape}"
        assert (k.sum(-1) == min(budget, 16)).all(), f"layer {layer}: each head holds `budget` tokens at the end"
        assert (k <= mk[:, :, -1]).all(), f"layer {layer}: kept a token the last row did not see (kept_mask(layer, T))"


@st.composite
def mask_pairs(draw):
    L, B, H, T = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    p = draw(st.sampled_from([0.0, 0.3, 0.8]))
    return [torch.rand(B, H, T, generator=g) < p for _ in range(L)], [torch.rand(B, H, T, generator=g) < p for _ in range(L)]


@given(mask_pairs())
def test_kept_overlap_is_the_mean_jaccard(pair):
    a, b = pair
    got = impl.kept_overlap(a, b)
    assert got.shape == (len(a),), f"kept_overlap returns one number per layer: ({len(a)},), got {tuple(got.shape)}"
    for layer, (x, y) in enumerate(zip(a, b)):
        vals = []
        for seq_x, seq_y in zip(x.reshape(-1, x.shape[-1]).tolist(), y.reshape(-1, y.shape[-1]).tolist()):
            sx = {i for i, v in enumerate(seq_x) if v}
            sy = {i for i, v in enumerate(seq_y) if v}
            vals.append(len(sx & sy) / len(sx | sy) if sx | sy else 1.0)
        want = sum(vals) / len(vals)
        assert abs(float(got[layer]) - want) < 1e-6, (
            f"layer {layer}: {float(got[layer]):.4f}, expected {want:.4f}: Jaccard |A & B| / |A | B| per (sequence, KV head), "
            "then the mean; two empty sets count 1")


def test_sum_and_max_keep_different_tokens_on_the_real_model():
    impl.run_policy(tiny_model(), course.random_tokens(0, 1, 3), policies.make_policy("h2o", 2), 2, 1)
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, 96)])
    kept = {gqa: impl.run_policy(m, tokens, policies.make_policy("a2sf", 16, gqa=gqa), 16, 16)[1] for gqa in ("sum", "max")}
    overlap = impl.kept_overlap(kept["sum"], kept["max"])
    print("a2sf, 96 tokens, budget 16: overlap of sum and max per layer", [round(x, 2) for x in overlap.tolist()])
    assert 0.4 < float(overlap.mean()) < 1.0 and (overlap < 1).any(), (
        f"mean overlap {float(overlap.mean()):.3f}: sum and max should mostly agree, and not everywhere")


@pytest.mark.slow
def test_sum_against_max_at_budget_32():
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, 256)])
    with torch.no_grad():
        full = m(tokens).log_softmax(-1)
    kept, kl = {}, {}
    for gqa in ("sum", "max"):
        logits, kept[gqa] = impl.run_policy(m, tokens, policies.make_policy("a2sf", 32, gqa=gqa), 32, 8)
        kl[gqa] = float((full.exp() * (full - logits.log_softmax(-1))).sum(-1).mean())
    overlap = impl.kept_overlap(kept["sum"], kept["max"])
    print(f"a2sf budget 32: overlap {float(overlap.mean()):.3f}, KL to full: sum {kl['sum']:.4f}, max {kl['max']:.4f}")
    assert 0.6 < float(overlap.mean()) < 1.0
    assert 0.5 < kl["sum"] / kl["max"] < 2.0
