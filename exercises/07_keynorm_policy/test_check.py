"""Checker for exercise 07 (the key-norm policy): `pytest exercises/07_keynorm_policy`
(the perplexity comparison over 512 tokens: `pytest exercises/07_keynorm_policy -m slow`).

Your policy is one function and one registry line; from then on it is a policy like the built-in
ones: policies.make_policy("keynorm", ...) makes it, and the reference cache (cache.py), the fast
path (fast.enable + fast.KVCache), evaluate.py and generate.py all run it."""

import math

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import cache
import evaluate
import fast
import generate
import policies
import simulate
from exercises import course
from model import rotate

impl = course.implementation(__file__)


def keynorm(budget: int, n_sink: int | None = None, recent: int | None = None) -> policies.Policy:
    """Your policy, made as generate.py and evaluate.py make any policy: from the registry. A stub
    fails here with what to write."""
    impl.keynorm_score(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), torch.arange(2).view(1, 1, 2))
    if "keynorm" not in policies.REGISTRY:
        course.teach(
            'policies.REGISTRY has no "keynorm": add the registry line at the bottom of your student.py (README.md, '
            'What to do, step 2): policies.REGISTRY["keynorm"] = (a description, a function of the budget that returns '
            "the Policy's fields as a dict), written as the built-in entries in policies.py are.")
    entry = policies.REGISTRY["keynorm"]
    if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and callable(entry[1])):
        course.teach(f'policies.REGISTRY["keynorm"] is {entry!r}: it must be a pair (description, function of the budget '
                     "-> dict of Policy fields), as the built-in entries are")
    return policies.make_policy("keynorm", budget, n_sink=n_sink, recent=recent)


def distinct_tokens(seed: int, B: int, T: int) -> torch.Tensor:
    """Texts without a repeated token: a repeated token has the same key in layer 0 (up to its
    rotation), so the same norm, and which copy goes would be decided by rounding, not by the rule."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(128, generator=g)[:T] for _ in range(B)])


def call_bounds(T: int, mode: str, chunk: int, prompt_len: int) -> list[tuple[int, int]]:
    """[start, end) of each call: prefill = the prompt whole, then one token at a time; streaming =
    calls of `chunk` over the prompt, then one token at a time."""
    first = [(0, prompt_len)] if mode == "prefill" else [(s, min(s + chunk, prompt_len)) for s in range(0, prompt_len, chunk)]
    return first + [(s, s + 1) for s in range(prompt_len, T)]


# -- the score ----------------------------------------------------------------------------------

@st.composite
def stored_keys(draw):
    """Keys with 1 to 3 leading axes (a layer's (B, Hkv); (L, B, Hkv) when the fast path ranks layers together)."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    S, D = draw(st.integers(1, 10)), draw(st.sampled_from([2, 4, 8]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    keys = torch.randn(*lead, S, D, generator=g) * torch.rand(*lead, S, 1, generator=g) * 3
    positions = torch.randperm(S + 3, generator=g)[:S].expand(*lead, S)
    return keys, torch.randn(*lead, S, D, generator=g), positions


@given(stored_keys())
def test_score_is_minus_the_key_norm(stored):
    keys, values, positions = stored
    got = impl.keynorm_score(keys, values, positions)
    want = -keys.double().pow(2).sum(-1).sqrt()
    assert isinstance(got, torch.Tensor) and got.shape == want.shape, (
        f"keynorm_score returns one score per token, (..., S) = {tuple(want.shape)} for keys {tuple(keys.shape)}; got "
        f"{tuple(getattr(got, 'shape', ()))}. Reduce over the last axis (D) only: the leading axes may be (B, Hkv) or "
        "(L, B, Hkv)")
    assert got.dtype == torch.float32, f"scores are float32 (got {got.dtype}): compute the norm in float32"
    assert torch.isfinite(got).all(), (
        "keynorm_score gave an infinite score: it returns the score alone; policies.priority adds +inf for the "
        "protected slots and -inf for the empty ones")
    if torch.allclose(got.double(), -want, rtol=1e-5, atol=1e-5) and not torch.allclose(want, -want):
        raise AssertionError("you return +||k||: that keeps the HIGHEST norms. Higher scores are kept, so the score is -||k||_2")
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (
        f"off by {(got.double() - want).abs().max():.3g} from -||k||_2, the L2 norm over the head dimension D (the last "
        "axis), negated")


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), shift=st.integers(0, 5000))
def test_rotating_the_keys_does_not_change_the_score(seed, shift):
    """The cache stores keys rotated by their position (RoPE; slot mode stores them unrotated): the norm is the same."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, 6, 16, generator=g)
    positions = torch.arange(6).expand(1, 2, 6)
    a = impl.keynorm_score(keys, keys, positions)
    b = impl.keynorm_score(rotate(keys, positions + shift, 10000.0), keys, positions)
    assert torch.allclose(a, b, atol=1e-4), "a rotation keeps a vector's L2 norm: rotated keys must score the same"


# -- the registry line --------------------------------------------------------------------------

@given(budget=st.integers(1, 64), data=st.data())
def test_the_registry_line_makes_a_policy(budget, data):
    n_sink = data.draw(st.integers(0, budget))
    recent = data.draw(st.integers(0, budget - n_sink))
    p = keynorm(budget, n_sink, recent)
    assert p.name == "keynorm" and p.score_fn is not None, (
        'policies.make_policy("keynorm", ...) must give a Policy that ranks by your function: score_fn=keynorm_score '
        "in the fields your registry line returns")
    assert not p.scored, ("scored=False in the fields: the rule needs no attention probabilities, so attention keeps the "
                          "fused path (scaled_dot_product_attention), the paper's point; with scored=True every layer "
                          "computes an explicit softmax for nothing")
    assert not (p.keep_all or p.random or p.value_prior or p.mean or p.obs_window), (
        f"the key-norm policy sets scored=False and score_fn only; yours also sets other fields: {p}")
    assert (p.n_sink, p.recent) == (n_sink, recent), "make_policy's n_sink and recent overrides must reach the policy"
    g = torch.Generator().manual_seed(budget)
    keys = torch.randn(2, 3, 9, 4, generator=g)
    pos = torch.randperm(9, generator=g).expand(2, 3, 9)
    valid = torch.rand(2, 3, 9, generator=g) < 0.8
    newest = torch.tensor([8, 8])
    prio = policies.priority(p, policies.Tokens(keys, keys, pos, valid, {}), newest, 0)
    free = valid & ~((pos < n_sink) | (pos > 8 - recent))
    assert torch.allclose(prio[free], -keys.norm(dim=-1)[free], atol=1e-5), (
        "policies.priority does not rank your policy's free slots by -||k||: the registry line must pass your "
        "keynorm_score as score_fn")


# -- the policy on the reference path, against the rule written independently ---------------------

@torch.no_grad()
def keynorm_masked_simulation(m, tokens, budget, calls, n_sink, recent):
    """The rule written independently, the papers' way: one forward, every key kept in memory, row t
    attends to what the key-norm rule would hold at step t; lists of kept positions per head.
    calls: [(start, end)] of the attention calls; after each, the highest norms outside the
    protected slots leave until `budget` remain (ties: the oldest goes first)."""
    B, T = tokens.shape
    cfg = m.cfg
    pos = torch.arange(T).expand(B, T)
    x, angles = m.embed(tokens, pos), m.angles(pos)
    for block in m.layers:
        a = block.attn
        q, k, v = a.project(block.attn_norm(x))
        q, k = a.rope(q, angles), a.rope(k, angles)
        norms = k.float().norm(dim=-1).tolist()  # (B, Hkv, T)
        held = [[[] for _ in range(cfg.n_kv_heads)] for _ in range(B)]
        out = torch.zeros_like(q)
        for s, e in calls:
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
       recent=st.integers(0, 2), mode=st.sampled_from(["streaming", "prefill"]), extra=st.integers(1, 8))
def test_your_policy_evicts_by_key_norm(seed, budget, chunk, n_sink, recent, mode, extra):
    """The reference path (model.py + cache.KVCache) with your policy, call by call, against the rule."""
    policy = keynorm(budget, n_sink, recent)
    m = tiny_model("tiny-llama", seed=seed % 3)
    prompt_len = budget + extra  # longer than the budget: the prompt itself must be compressed in prefill mode
    tokens = distinct_tokens(seed, 1, 16 if mode == "streaming" else prompt_len + 4)
    T = tokens.shape[1]
    calls = call_bounds(T, mode, chunk, prompt_len if mode == "prefill" else T)
    c = cache.KVCache(m.cfg, policy, budget, mode=mode, chunk=chunk)
    assert not c.layers[0].needs_probs, "the key-norm rule needs no attention probabilities (scored=False)"
    outs = []
    with torch.no_grad():
        for s, e in calls:
            outs.append(m(tokens[:, s:e], c))
            held = c.tokens_held()
            assert (held <= budget).all(), f"{mode}: after the call ending at {e}, {int(held.max())} tokens > budget {budget}"
    got = torch.cat(outs, dim=1)
    want = keynorm_masked_simulation(m, tokens, budget, calls, n_sink, recent)
    assert (got - want).abs().max() < 1e-4, (
        f"{mode}, budget {budget}, chunk {chunk}, n_sink {n_sink}, recent {recent}: the cache's logits with your policy "
        f"differ from an independent masked simulation of the rule by {(got - want).abs().max():.3g}: after each call "
        "the cache must keep the `budget` lowest key norms (besides the protected slots)")
    with torch.no_grad():  # the project's own masked simulation ranks through policies.priority too
        sim, _ = simulate.masked_simulation(m, tokens, policy, budget, mode=mode, chunk=chunk if mode == "streaming" else 1,
                                            prompt_len=prompt_len if mode == "prefill" else None)
    off = (sim - want).abs().max()
    assert off < 1e-4, f"simulate.masked_simulation with your policy is off by {off:.3g} from the rule"


# -- the same tokens kept on the fast path --------------------------------------------------------

@settings(max_examples=10)
@given(seed=st.integers(0, 1000), budget=st.integers(3, 8), extra=st.integers(1, 12), chunk=st.integers(1, 3),
       n_sink=st.integers(0, 1), recent=st.integers(0, 2), steps=st.integers(0, 4),
       mode=st.sampled_from(["prefill", "streaming"]), arch=st.sampled_from(["tiny-llama", "tiny-opt"]),
       positions=st.sampled_from(["original", "slot"]))
def test_the_fast_path_keeps_the_same_positions(seed, budget, extra, chunk, n_sink, recent, steps, mode, arch, positions):
    """fast.enable(model) + fast.KVCache keep exactly the positions the reference keeps, after every
    call: in prefill mode the prompt (longer than the budget) goes through the fast prompt twin,
    which ranks all layers at once; decode steps through the one-victim eviction. Both rank through
    policies.priority, so your one function is all either path needs."""
    policy = keynorm(budget, n_sink, recent)
    positions = "original" if arch == "tiny-opt" else positions  # OPT's learned positions cannot be re-indexed
    ref = tiny_model(arch, seed=seed % 3)
    quick = fast.enable(tiny_model(arch, seed=seed % 3))
    prompt_len = budget + extra
    tokens = distinct_tokens(seed, 2, prompt_len + steps)
    kw = dict(batch=2, mode=mode, chunk=chunk, positions=positions)
    rc, fc = cache.KVCache(ref.cfg, policy, budget, **kw), fast.KVCache(ref.cfg, policy, budget, **kw)
    if mode == "prefill":
        assert quick.prompt_applies(fc), "the fast prompt twin should run for a policy that needs no probabilities"
    with torch.no_grad():
        for s, e in call_bounds(tokens.shape[1], mode, chunk, prompt_len):
            a, b = ref(tokens[:, s:e], rc), quick(tokens[:, s:e], fc)
            for layer in range(ref.cfg.n_layers):
                kept_ref, kept_fast = rc.kept_positions(layer), fc.kept_positions(layer)
                assert kept_ref == kept_fast, (
                    f"{arch} {mode} {positions}, budget {budget}, n_sink {n_sink}, recent {recent}: after the call "
                    f"[{s}, {e}) layer {layer} keeps {kept_ref} on the reference path and {kept_fast} on the fast path")
            assert (fc.tokens_held() <= budget).all(), f"the fast cache holds more than the budget {budget}"
            assert torch.allclose(a, b, atol=1e-4), f"logits of the call [{s}, {e}) differ by {(a - b).abs().max():.3g}"


# -- evaluate.py and generate.py run it ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["prefill", "streaming"])
def test_evaluate_py_runs_your_policy_on_either_path(mode):
    """evaluate.token_logprobs with your policy: the reference model and a fast.enable'd one give
    the log-probabilities of the independent simulation (a prompt of 14 tokens at budget 6)."""
    policy = keynorm(6, 1, 1)
    tokens = distinct_tokens(5, 1, 20)
    setup = evaluate.Setup(mode=mode, chunk=2)
    ref = tiny_model("tiny-llama", seed=2)
    got = {"reference": evaluate.token_logprobs(ref, tokens, policy, 6, setup, prompt_len=14),
           "fast": evaluate.token_logprobs(fast.enable(tiny_model("tiny-llama", seed=2)), tokens, policy, 6, setup,
                                           prompt_len=14)}
    calls = evaluate.call_spans(policy, 6, setup, 20, 14)
    logits = keynorm_masked_simulation(ref, tokens, 6, calls, 1, 1)
    want = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    for path, lp in got.items():
        assert torch.allclose(lp, want, atol=1e-4), (
            f"{mode}, {path} path: evaluate.token_logprobs with your policy is off by {(lp - want).abs().max():.3g} from "
            "the independent simulation of the rule")


def test_generate_py_runs_your_policy_on_either_path():
    """`generate.py --policy keynorm --budget 6 --recent 2` (default: prefill mode): the flags make
    your policy, and the reference and fast paths generate the same tokens and keep the same ones."""
    args = generate.parser().parse_args(["--policy", "keynorm", "--budget", "6", "--recent", "2"])
    keynorm(6, 0, 2)  # a stub fails here, with what to write
    prompt = distinct_tokens(7, 1, 15)
    out, caches = {}, {}
    for path in ("reference", "fast"):
        m = tiny_model("tiny-llama", seed=1)
        if path == "fast":
            m = fast.enable(m)
        caches[path] = generate.cache_from_args(args, m.cfg, prompt.shape[1], max_len=prompt.shape[1] + 8,
                                                cache_class=fast.KVCache if path == "fast" else cache.KVCache)
        assert caches[path].policy.score_fn is not None, "--policy keynorm must make your policy"
        with torch.no_grad():
            out[path], _ = generate.generate(m, prompt, caches[path], 8)
    assert torch.equal(out["reference"], out["fast"]), f"generated {out['reference'].tolist()} and {out['fast'].tolist()}"
    for layer in range(len(caches["fast"].layers)):
        assert caches["reference"].kept_positions(layer) == caches["fast"].kept_positions(layer), f"layer {layer}"


# -- on the real model ---------------------------------------------------------------------------

def ppl(lp):
    return math.exp(-float(lp.mean()))


def test_keynorm_beats_the_window_on_the_real_model():
    mine_policy = keynorm(16, 0, 4)
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, 128)])
    setup = evaluate.Setup(chunk=16)
    mine = ppl(evaluate.token_logprobs(m, tokens, mine_policy, 16, setup))
    window = ppl(evaluate.token_logprobs(m, tokens, policies.make_policy("window", 16), 16, setup))
    print(f"128 tokens, budget 16, calls of 16: keynorm (recent 4) {mine:.2f}, window {window:.2f}")
    assert mine < window, f"keynorm {mine:.2f} should beat the window {window:.2f} here"


@pytest.mark.slow
def test_keynorm_against_window_sink_h2o_at_budget_64():
    mine_policy = keynorm(64, 0, 8)
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, 512)])
    setup = evaluate.Setup(chunk=8)
    res = {name: ppl(evaluate.token_logprobs(m, tokens, policies.make_policy(name, 64), 64, setup)) for name in ("window", "h2o")}
    res["keynorm"] = ppl(evaluate.token_logprobs(m, tokens, mine_policy, 64, setup))
    print("512 tokens, budget 64, calls of 8:", {k: round(v, 2) for k, v in res.items()})
    assert res["keynorm"] < res["window"]
