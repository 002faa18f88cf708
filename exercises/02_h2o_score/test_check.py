"""Checker for exercise 02 (H2O's score): `pytest exercises/02_h2o_score`."""

import torch
from helpers import run_through, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import policies
import simulate
from cache import KVCache, keep_top
from exercises import course

impl = course.implementation(__file__)


@st.composite
def calls(draw):
    """One attention call: scores before it, its probabilities, its rows' positions (some padding)."""
    B, H, G = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T = draw(st.integers(1, 6))
    S = T + draw(st.integers(0, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    start = draw(st.integers(0, 20))
    pads = [draw(st.integers(0, T - 1)) for _ in range(B)]  # leading padding rows per sequence
    q_pos = torch.stack([torch.arange(T) + start - p for p in pads])
    q_pos = torch.where(torch.arange(T)[None] < torch.tensor(pads)[:, None], -1, q_pos)
    probs = torch.randn(B, H, G, T, S, generator=g).mul(2).softmax(-1)
    scores = torch.rand(B, H, S, generator=g) * 3
    return scores, probs, q_pos


@given(calls())
def test_update_is_the_shared_form_with_h2o_parameters(call):
    scores, probs, q_pos = call
    before = scores.clone()
    got = impl.h2o_update(scores, probs, q_pos)
    assert torch.equal(scores, before), "h2o_update changed `scores` in place: return a new tensor instead"
    h2o = policies.make_policy("h2o", 8)
    mask = torch.ones(probs.shape[:2] + probs.shape[3:], dtype=torch.bool)
    want = policies.accumulate(h2o, {"score": scores}, probs, mask, q_pos)["score"]
    assert got.shape == want.shape, f"h2o_update must return (B, Hkv, S) = {tuple(want.shape)}, got {tuple(got.shape)}"
    assert got.dtype == torch.float32, f"scores accumulate in float32 (got {got.dtype}), whatever the model's dtype"
    if torch.allclose(got, want, atol=1e-5):
        return
    real = (q_pos >= 0).float()[:, None, None, :, None]
    hints = [
        (scores + probs.sum(dim=(2, 3)), "padding rows (q_pos < 0) must add nothing: mask them out"),
        (scores + (probs * real)[:, :, 0].sum(2), "sum over ALL the query heads of the group (dim 2), not one of them"),
        (scores + (probs * real).mean(2).sum(2), "sum over the group's query heads (dim 2): the project sums, not averages"),
        ((probs * real).sum(dim=(2, 3)), "the old score stays: s <- s + what the call's rows gave"),
    ]
    for wrong, why in hints:
        if torch.allclose(got, wrong, atol=1e-5):
            raise AssertionError(f"h2o_update: {why}")
    raise AssertionError(f"h2o_update is off by {(got - want).abs().max():.3g} from policies.accumulate with the h2o "
                         "policy: s[b, g, j] + sum over real rows q and heads h of the group of probs[b, g, h, q, j]")


@st.composite
def heads(draw):
    """A cache state: integer scores (so ties happen), distinct positions per head, some empty slots."""
    B, H, S = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 10))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scores = torch.randint(0, 3, (B, H, S), generator=g).float()
    key_pos = torch.stack([torch.stack([torch.randperm(S + 4, generator=g)[:S] for _ in range(H)]) for _ in range(B)])
    valid = torch.rand(B, H, S, generator=g) < 0.8
    newest = torch.where(valid, key_pos, -1).amax(dim=(1, 2)).clamp(min=0)
    budget = draw(st.integers(1, S))
    recent = draw(st.integers(0, budget))
    return scores, key_pos, valid, newest, budget, recent


@settings(max_examples=50)
@given(heads())
def test_keep_is_what_the_cache_keeps(state):
    scores, key_pos, valid, newest, budget, recent = state
    got = impl.h2o_keep(scores, key_pos, valid, newest, budget, recent)
    h2o = policies.make_policy("h2o", budget, recent=recent)
    keys = torch.zeros(key_pos.shape + (1,))  # H2O ranks by its score alone, never by keys or values
    prio = policies.priority(h2o, policies.Tokens(keys, keys, key_pos, valid, {"score": scores}), newest, 0)
    want = keep_top(prio, key_pos, valid, budget)
    assert got.shape == valid.shape and got.dtype == torch.bool, (
        f"h2o_keep returns the new valid mask: bool {tuple(valid.shape)}, got {got.dtype} {tuple(got.shape)}")
    assert not (got & ~valid).any(), "h2o_keep kept an empty slot: the kept set must be a subset of `valid`"
    n_want = want.sum(-1)
    assert torch.equal(got.sum(-1), n_want), (
        f"each head must keep min(budget, held) = {n_want.tolist()} tokens, yours keeps {got.sum(-1).tolist()}")
    if not torch.equal(got, want):
        b, h = (got != want).any(-1).nonzero()[0].tolist()
        show = sorted(zip(key_pos[b, h].tolist(), scores[b, h].tolist(), valid[b, h].tolist(), got[b, h].tolist(),
                          want[b, h].tolist()))
        rows = "\n".join(f"    pos {p:3d} score {s:.0f} {'held' if v else 'empty'}: yours {'keep' if y else '-'}, "
                         f"expected {'keep' if w else '-'}" for p, s, v, y, w in show)
        raise AssertionError(f"h2o_keep differs from cache.keep_top(policies.priority(...)) for budget {budget}, recent "
                             f"{recent}, newest {int(newest[b])} (sequence {b}, head {h}):\n{rows}\n"
                             "Protected: positions > newest - recent. Then highest score first; on equal scores the "
                             "older token goes first.")


@settings(max_examples=6)
@given(seed=st.integers(0, 1000), budget=st.integers(4, 10), chunk=st.integers(1, 3))
def test_your_update_in_the_masked_simulation_gives_the_real_caches_logits(seed, budget, chunk):
    """Plug your update into the papers' masked simulation (simulate.py calls policies.accumulate):
    it must give the logits of the project's real, evicting cache."""
    m = tiny_model("tiny-llama")
    tokens = course.random_tokens(seed, 1, 20)
    h2o = policies.make_policy("h2o", budget)
    real = run_through(m, tokens, KVCache(m.cfg, h2o, budget, chunk=chunk))

    def yours(policy, state, probs, mask, q_pos, alpha=None):  # policies.accumulate's signature
        return {**state, "score": impl.h2o_update(state["score"], probs, q_pos)}

    original = policies.accumulate
    policies.accumulate = yours
    try:
        with torch.no_grad():
            sim, _ = simulate.masked_simulation(m, tokens, h2o, budget, chunk=chunk)
    finally:
        policies.accumulate = original
    assert (sim - real).abs().max() < 1e-4, (
        f"with your h2o_update inside simulate.masked_simulation the logits differ from the real cache's by "
        f"{(sim - real).abs().max():.3g} (budget {budget}, chunk {chunk})")
