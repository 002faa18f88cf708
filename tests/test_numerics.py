"""Numerics of the scores: fp32 whatever the model's dtype, no NaN / inf over long runs with a
forgetting factor, ties among underflowed scores broken by age, and kept sets against a float64
reference of the same model and tokens.

Why underflow matters: A2SF multiplies every score by alpha each step, so a token's old attention
weighs alpha^age; with alpha = 0.1 that is below fp32's smallest subnormal (1.4e-45) at age ~45.
A kept token's score still holds the newest row's attention undecayed, so it reaches exactly 0
only when that attention itself underflows (logit gaps above ~103). The tie test forces this with
an extremely peaked attention (Wq x 300): then many kept tokens hold exactly 0, and the cache must
evict the oldest of them, the same way in its fast twin (fast.KVCache: evict_one) and the reference
(cache.KVCache: keep_top).

Disagreement rate: the fraction of (step, layer, KV head) kept sets, read with
cache.kept_positions(layer) after each decode step, that differ from the float64 run's. Measured
on the tiny LLaMA (2 layers x 2 KV heads), A2SF alpha 0.1, budget 16, 2,000 decode steps, seeds
0 and 1: fp32 0 of 8,000 sets for both seeds; bf16 0.79 and 0.84, and 0.83 and 0.76 when the
float64 run uses the same bf16-rounded weights: bf16 arithmetic (q, k, v to 3 significant digits),
not the rounding of the weights, moves the near-ties. So bf16's rate is reported, not bounded; what
is bounded is how far its sets move: the share of each kept set that the float64 run also holds
(bf16, 200 steps: 88%, held to >= 80%). Both are printed at the end of the module.
"""

import copy

import pytest
import torch
from helpers import report_after, tiny_model

import fast as fast_mod
import policies
from cache import KVCache

ALPHA, BUDGET, PROMPT = 0.1, 16, 16
FP32_BOUND = 0.01  # see test_fp32_kept_sets_match_float64
BF16_SHARED = 0.8  # see test_bf16_kept_sets_stay_close_to_float64
RATES = {}  # (dtype, steps, seed) -> (differing, total), printed at the end of the module
SHARED = {}  # (dtype, steps, seed) -> mean share of a kept set the float64 run also holds


@pytest.fixture(scope="module", autouse=True)
def print_rates(request):
    yield
    report_after(request, [f"test_numerics: {name} vs float64, A2SF alpha {ALPHA}, budget {BUDGET}, {steps} decode "
                           f"steps, seed {seed}: {diff} of {total} kept sets differ ({diff / total:.4f}), "
                           f"{100 * SHARED[(name, steps, seed)]:.1f}% of each set shared"
                           for (name, steps, seed), (diff, total) in sorted(RATES.items())])


def peaked(m, scale=300.0):
    """Attention so sharp that most probabilities underflow to exactly 0 in fp32."""
    with torch.no_grad():
        for block in m.layers:
            block.attn.wq.weight.mul_(scale)
    return m


def decode(m, tokens, dtype, *, budget=BUDGET, alpha=ALPHA, fast=True, each_step=None):
    """The first PROMPT tokens as a prefill, then one decode step per token (A2SF, tokens given, not
    sampled, so every dtype sees the same text). -> kept sets [step][layer][kv_head] and the cache."""
    m = copy.deepcopy(m).to(dtype)  # Module.to works in place: the caller's model stays as it was
    cache_class = fast_mod.KVCache if fast else KVCache
    cache = cache_class(m.cfg, policies.make_policy("a2sf", budget, alpha=alpha), budget, mode="prefill", dtype=dtype)
    kept = []
    with torch.no_grad():
        m(tokens[:, :PROMPT], cache)
        for t in range(PROMPT, tokens.shape[1]):
            before = [cache.kept_positions(layer)[0] for layer in range(m.cfg.n_layers)] if each_step else None
            logits = m(tokens[:, t:t + 1], cache)
            assert logits.isfinite().all(), f"non-finite logits at step {t}"
            for lc in cache.layers:
                held = lc.state["score"][lc.valid]
                assert lc.state["score"].dtype == torch.promote_types(dtype, torch.float32)
                assert held.isfinite().all() and (held >= 0).all(), f"scores at step {t}: {held}"
            kept.append([cache.kept_positions(layer)[0] for layer in range(m.cfg.n_layers)])
            if each_step:
                each_step(cache, before, kept[-1], t)
    return kept, cache


def text(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def pairs_of(a, b):
    return [(x, y) for sa, sb in zip(a, b) for la, lb in zip(sa, sb) for x, y in zip(la, lb)]


def disagreement(a, b) -> tuple[int, int]:
    pairs = pairs_of(a, b)
    return sum(x != y for x, y in pairs), len(pairs)


def shared(a, b) -> float:
    """The mean share of a kept set that the other run's set also holds."""
    pairs = pairs_of(a, b)
    return sum(len(set(x) & set(y)) / len(x) for x, y in pairs) / len(pairs)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_policy_state_is_fp32_at_least(dtype):
    m = tiny_model("tiny-llama", max_seq_len=4096)
    _, cache = decode(m, text(PROMPT + 40), dtype)
    wanted = torch.promote_types(dtype, torch.float32)
    assert all(set(lc.state) == {"score"} and lc.state["score"].dtype == wanted for lc in cache.layers)
    for name in ("h2o_mean", "vatp"):  # every piece of state a policy declares: counts, ||v||_1
        c = KVCache(m.cfg, policies.make_policy(name, BUDGET), BUDGET, dtype=dtype)
        assert all(len(lc.state) == 2 and all(t.dtype == wanted for t in lc.state.values()) for lc in c.layers), name
    assert all(lc.k.dtype == lc.v.dtype == dtype for lc in cache.layers)  # the keys and values stay in the model's dtype


def long_run(dtype, steps):
    """A2SF alpha 0.1 over `steps` decode steps: finite throughout, and the same kept sets twice."""
    m = tiny_model("tiny-llama", max_seq_len=4096)
    tokens = text(PROMPT + steps, seed=1)
    first, cache = decode(m, tokens, dtype)
    again, _ = decode(m, tokens, dtype)
    assert first == again
    assert all(len(head) == BUDGET for layer in first[-1] for head in layer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_a2sf_run_stays_finite_and_deterministic(dtype):
    long_run(dtype, 150)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_a2sf_2000_steps_stay_finite_and_deterministic(dtype):
    long_run(dtype, 2000)


def underflowed_ties(dtype, steps, budget=64):
    """Peaked attention, a large budget: kept tokens sit unattended past age 45 and their scores hit
    exactly 0. Every eviction must take the lowest score, the oldest among equals, and the fast and
    slow twins must keep the same sets. -> how many evictions were decided among equal scores."""
    m = peaked(tiny_model("tiny-llama", max_seq_len=4096))
    tokens = text(PROMPT + steps, seed=2)
    ties = []

    def check(cache, before, after, t):
        for layer, (was, now) in enumerate(zip(before, after)):
            lc = cache.layers[layer]
            slots_pos, slots_score = lc.pos[0].tolist(), lc.state["score"][0].tolist()  # an evicted slot keeps both till reused
            for head, (w, n) in enumerate(zip(was, now)):
                gone = sorted(set(w + [t]) - set(n))
                assert len(gone) == (len(w) + 1 > budget), (t, layer, head, gone)
                if not gone:
                    continue
                score = dict(zip(slots_pos[head], slots_score[head]))
                e = gone[0]
                for k in n:  # every kept token ranks above the evicted one: higher score, or equal and newer
                    assert score[k] > score[e] or (score[k] == score[e] and k > e), (t, layer, head, k, score[k], e, score[e])
                ties.append(sum(score[k] == score[e] for k in n))

    fast, _ = decode(m, tokens, dtype, budget=budget, each_step=check)
    slow, _ = decode(m, tokens, dtype, budget=budget, fast=False)
    assert fast == slow
    return sum(n > 0 for n in ties), len(ties)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_underflowed_scores_evict_the_oldest(dtype):
    tied, evictions = underflowed_ties(dtype, 200)
    assert evictions == 2 * 2 * (PROMPT + 200 - 64)  # one per layer and KV head and step, once the 64 are full
    assert tied > evictions / 2, (tied, evictions)  # the regime was reached: most were among equal (zero) scores


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_underflowed_scores_evict_the_oldest_long(dtype):
    tied, evictions = underflowed_ties(dtype, 2000)
    assert evictions == 2 * 2 * (PROMPT + 2000 - 64) and tied > evictions / 2, (tied, evictions)


def compare_with_float64(dtype, steps, seed=0, round_weights=False):
    m = tiny_model("tiny-llama", seed=seed, max_seq_len=4096)
    tokens = text(PROMPT + steps, seed=seed)
    got, _ = decode(m, tokens, dtype)
    reference = copy.deepcopy(m).to(dtype) if round_weights else m  # round_weights: the same bf16 weights, in fp64
    ref, _ = decode(reference, tokens, torch.float64)
    diff, total = disagreement(got, ref)
    name = str(dtype).removeprefix("torch.") + (" (weights rounded in both)" if round_weights else "")
    RATES[(name, steps, seed)] = (diff, total)
    SHARED[(name, steps, seed)] = shared(got, ref)
    return diff / total


def test_fp32_kept_sets_match_float64():
    """The bound: fp32 and fp64 scores differ by a few ulp (relative ~1e-7 to 1e-6), so an eviction
    flips only when the two lowest of ~17 candidates lie that close: ~2e-5 of evictions. A flip
    leaves the sets apart until the token leaves both (and moves the next layer's attention), at
    most tens of steps, so about 1e-3 of the sets; the bound is 10 x that. Measured: 0."""
    assert compare_with_float64(torch.float32, 200) <= FP32_BOUND


def test_bf16_kept_sets_stay_close_to_float64():
    """bf16 moves near-ties, so whole kept sets often differ (rate reported at the end of the
    module), but only by a token or two: at least BF16_SHARED of each set is the float64 run's.
    Measured 88.4% (seed 0, 200 steps); for scale, on the same text the float64 run with alpha
    0.05 instead of 0.1 shares 74%, the window policy 55%, H2O 39%, a random subset 19%. A bf16
    path that scored or ranked wrongly (not just less precisely) falls to those."""
    rate = compare_with_float64(torch.bfloat16, 200)
    assert rate < 0.9, rate  # measured 0.54: many sets are exactly the float64 run's
    assert SHARED[("bfloat16", 200, 0)] >= BF16_SHARED, SHARED


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kept_sets_against_float64_2000_steps(seed):
    assert compare_with_float64(torch.float32, 2000, seed) <= FP32_BOUND
    compare_with_float64(torch.bfloat16, 2000, seed)
    compare_with_float64(torch.bfloat16, 2000, seed, round_weights=True)
