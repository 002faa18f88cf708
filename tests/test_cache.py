"""The KV cache: chunked feeding, real eviction against the masked simulation, bounds, causality."""

import pytest
import torch
from helpers import run_through, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import cache as cache_mod
import model as model_mod
import policies
import simulate
from cache import KVCache

MODELS = ["tiny-llama", "tiny-opt"]
FAST = settings(max_examples=15, deadline=None)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.integers(1, 3),
       T=st.integers(1, 6), S=st.integers(1, 20), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_explicit_attention_equals_the_fused_kernel_and_a_float64_softmax(seed, B, Hkv, G, T, S, dtype):
    """model.attend's two paths (the explicit softmax a scoring policy needs; the fused SDPA) give
    the same output for any mask, and the explicit probabilities are a softmax written here in
    float64: zero where masked, rows summing to 1."""
    g = torch.Generator().manual_seed(seed)
    D = 8
    q = torch.randn(B, Hkv, G, T, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(B, Hkv, T, S, generator=g) < 0.6
    mask[..., torch.randint(0, S, (1,), generator=g)] = True  # every row sees at least one key
    out, probs = model_mod.attend(q, k, v, mask, need_probs=True)
    fused, none = model_mod.attend(q, k, v, mask, need_probs=False)
    assert none is None and probs.dtype == torch.promote_types(dtype, torch.float32)
    assert out.shape == fused.shape == (B, Hkv, G, T, D) and out.dtype == fused.dtype == dtype
    torch.testing.assert_close(out, fused, rtol=0, atol=1e-5)
    s = q.double() @ k.double()[:, :, None].transpose(-1, -2) / D ** 0.5  # (B, Hkv, G, T, S)
    e = torch.where(mask[:, :, None], (s - s.amax(-1, keepdim=True)).exp(), 0.0)
    want = e / e.sum(-1, keepdim=True)
    torch.testing.assert_close(probs.double(), want, rtol=0, atol=1e-6)
    assert (probs[~mask[:, :, None].expand_as(probs)] == 0).all()
    torch.testing.assert_close(out.double(), want @ v.double()[:, :, None], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@FAST
@given(cuts=st.lists(st.integers(1, 31), max_size=6, unique=True), policy=st.sampled_from(["full", "h2o"]))
def test_chunked_feeding_equals_one_forward(name, cuts, policy):
    """Any chunking through a non-evicting cache gives the full forward's logits at every position."""
    m = tiny_model(name)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(len(cuts)))
    budget = None if policy == "full" else 64  # above the length: nothing is evicted
    c = KVCache(m.cfg, policies.make_policy(policy, budget), budget, batch=2, mode="prefill", chunk=32)
    bounds = [0, *sorted(cuts), 32]
    with torch.no_grad():
        ref = m(tokens)
        got = torch.cat([m(tokens[:, s:e], c) for s, e in zip(bounds, bounds[1:]) if e > s], dim=1)
    torch.testing.assert_close(got, ref, rtol=0, atol=5e-5)


CASES = [(p, mode, pos) for p in policies.POLICY_NAMES for mode in cache_mod.MODES for pos in cache_mod.POSITION_SCHEMES]


@pytest.mark.parametrize("policy_name,mode,positions", CASES)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), budget=st.integers(6, 20), chunk=st.sampled_from([1, 2, 5]),
       arch=st.sampled_from(MODELS))
def test_real_eviction_equals_masked_simulation(policy_name, mode, positions, seed, budget, chunk, arch):
    """The papers' masked simulation and the real, memory-freeing cache give the same logits and
    keep the same tokens, for every policy, both modes and both position schemes."""
    if arch == "tiny-opt" and positions == "slot":
        arch = "tiny-llama"  # OPT's learned positions cannot be re-indexed (tested as an error)
    m = tiny_model(arch, seed=seed % 7)
    T, prompt_len = 36, 20
    tokens = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(seed))
    p = policies.make_policy(policy_name, budget, n_sink=2 if policy_name == "vatp" else None,
                             recent=min(3, budget // 2) if policy_name == "snapkv" else None)
    c = KVCache(m.cfg, p, budget, batch=2, mode=mode, chunk=chunk, positions=positions)
    real = run_through(m, tokens, c, prompt_len)
    with torch.no_grad():
        sim, masks = simulate.masked_simulation(m, tokens, p, budget, mode=mode, chunk=chunk,
                                                positions=positions, prompt_len=prompt_len)
    torch.testing.assert_close(real, sim, rtol=0, atol=1e-4)
    if p.keep_all:
        return
    for layer in range(m.cfg.n_layers):  # what the last row saw is what is kept, minus evictions since
        kept = c.kept_mask(layer, T)
        assert (kept <= masks[layer][:, :, -1]).all()
        assert int(kept.sum(-1).max()) <= budget


@pytest.mark.parametrize("policy_name", ["h2o", "a2sf", "sink", "tova"])
def test_bf16_cache_matches_simulation_loosely(policy_name):
    """The same comparison in bf16 on the CPU (the GPU run repeats it on CUDA)."""
    m = tiny_model("tiny-llama", dtype=torch.bfloat16)
    tokens = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    p = policies.make_policy(policy_name, 10)
    c = KVCache(m.cfg, p, 10, dtype=torch.bfloat16)
    real = run_through(m, tokens, c)
    with torch.no_grad():
        sim, _ = simulate.masked_simulation(m, tokens, p, 10)
    assert (real.float() - sim.float()).abs().max() < 0.25  # bf16 keeps 8 bits: 2^-8 relative per op


@FAST
@given(seed=st.integers(0, 1000), budget=st.integers(4, 12), chunk=st.integers(1, 4),
       policy_name=st.sampled_from(policies.POLICY_NAMES))
def test_every_head_holds_at_most_budget_and_bytes_match(seed, budget, chunk, policy_name):
    m = tiny_model("tiny-llama")
    p = policies.make_policy(policy_name, budget)
    c = KVCache(m.cfg, p, budget, batch=2, chunk=chunk)
    tokens = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(seed))
    cfg = m.cfg
    with torch.no_grad():
        for s in range(0, 30, chunk):
            m(tokens[:, s:s + chunk], c)
            held = c.tokens_held()
            if p.keep_all:
                assert (held == min(s + chunk, 30)).all()
            else:
                assert (held <= budget).all() and (held == min(s + chunk, budget)).all()
                # storage is budget + chunk slots per KV head, no more: the memory is really bounded
                assert c.nbytes() == cfg.n_layers * 2 * cfg.n_kv_heads * (budget + chunk) * cfg.head_dim * 2 * 4


def test_prefill_mode_frees_the_prompt_storage():
    m = tiny_model("tiny-llama")
    c = KVCache(m.cfg, policies.make_policy("a2sf", 8), 8, mode="prefill")
    with torch.no_grad():
        m(torch.randint(0, 128, (1, 40)), c)
    assert c.layers[0].capacity == 9 and (c.tokens_held() == 8).all()


def test_original_and_slot_positions_agree_when_nothing_is_evicted():
    m = tiny_model("tiny-llama")
    tokens = torch.randint(0, 128, (1, 24))
    out = {}
    for scheme in ("original", "slot"):
        c = KVCache(m.cfg, policies.make_policy("h2o", 64), 64, chunk=4, positions=scheme)
        out[scheme] = run_through(m, tokens, c)
    torch.testing.assert_close(out["original"], out["slot"], rtol=0, atol=1e-5)


@FAST
@given(seed=st.integers(0, 1000), policy_name=st.sampled_from(["h2o", "a2sf", "sink", "window", "tova", "vatp"]))
def test_a_future_token_changes_no_earlier_logit(seed, policy_name):
    m = tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 128, (1, 24), generator=g)
    b = a.clone()
    cut = int(torch.randint(1, 24, (1,), generator=g))
    b[0, cut:] = torch.randint(0, 128, (24 - cut,), generator=g)
    outs = []
    for tokens in (a, b):
        p = policies.make_policy(policy_name, 8)
        outs.append(run_through(m, tokens, KVCache(m.cfg, p, 8)))
    torch.testing.assert_close(outs[0][:, :cut], outs[1][:, :cut], rtol=0, atol=0)


@FAST
@given(seed=st.integers(0, 1000), policy_name=st.sampled_from(policies.POLICY_NAMES), chunk=st.integers(1, 3))
def test_masks_stay_causal_and_evicted_tokens_never_return(seed, policy_name, chunk):
    m = tiny_model("tiny-llama")
    tokens = torch.randint(0, 128, (1, 28), generator=torch.Generator().manual_seed(seed))
    p = policies.make_policy(policy_name, 7)
    with torch.no_grad():
        _, masks = simulate.masked_simulation(m, tokens, p, 7, chunk=chunk)
    later = torch.ones(28, 28, dtype=torch.bool).triu(1)
    for seen in masks:  # (B, Hkv, T, T)
        assert not (seen & later).any(), "a row attended to a later token"
        gone = ~seen & ~later  # j <= t not seen at row t: evicted
        # once gone at row t, gone at every later row
        assert not (gone[:, :, :-1] & seen[:, :, 1:]).any(), "an evicted token came back"
        if not p.keep_all:
            assert int(seen.sum(-1).max()) <= 7 + chunk


def test_batch_with_left_padding_equals_each_sequence_alone():
    m = tiny_model("tiny-llama")
    lens = [20, 13]
    seqs = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in lens]
    T = max(lens)
    batch = torch.stack([torch.cat([torch.zeros(T - len(s), dtype=torch.long), s]) for s in seqs])
    p = policies.make_policy("a2sf", 6)
    c = KVCache(m.cfg, p, 6, batch=2, pad=[T - n for n in lens])
    got = run_through(m, batch, c)
    for b, s in enumerate(seqs):
        c_alone = KVCache(m.cfg, p, 6)
        alone = run_through(m, s[None], c_alone)
        torch.testing.assert_close(got[b, T - len(s):], alone[0], rtol=0, atol=1e-5)
        for layer in range(m.cfg.n_layers):  # the same tokens kept, at the same text positions
            assert c.kept_positions(layer)[b] == c_alone.kept_positions(layer)[0]
    held = c.tokens_held()
    assert (held <= 6).all()


@FAST
@given(name=st.sampled_from(["h2o", "a2sf", "vatp", "sink", "window", "snapkv", "h2o_mean", "tova"]),
       budgets=st.lists(st.integers(2, 14), min_size=2, max_size=3), mode=st.sampled_from(["streaming", "prefill"]),
       seed=st.integers(0, 1000))
def test_per_sequence_budgets_equal_each_sequence_alone(name, budgets, mode, seed):
    """A batch whose sequences each have their own budget and split (one cache ratio over texts of
    different lengths) keeps, per sequence, what that sequence alone keeps; also after a reset."""
    m = tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(seed)
    lens = [int(torch.randint(8, 22, (), generator=g)) for _ in budgets]
    seqs = [torch.randint(0, 128, (n,), generator=g) for n in lens]
    T = max(lens)
    pad = [T - n for n in lens]
    batch = torch.stack([torch.cat([torch.zeros(p_, dtype=torch.long), s]) for p_, s in zip(pad, seqs)])
    split = [policies.make_policy(name, b) if b >= 8 else policies.make_policy(name, b, n_sink=0, recent=1)
             for b in budgets]
    prompt = T - 4 if mode == "prefill" else None
    c = KVCache(m.cfg, split, budgets, batch=len(budgets), pad=pad, mode=mode)
    runs = [run_through(m, batch, c, prompt)]
    kept = [[c.kept_positions(layer) for layer in range(m.cfg.n_layers)]]
    c.reset(pad, split[::-1], budgets[::-1])  # the same storage, budgets swapped round
    runs.append(run_through(m, batch, c, prompt))
    for r, (sp, bud) in enumerate([(split, budgets), (split[::-1], budgets[::-1])]):
        for b, s in enumerate(seqs):
            alone = KVCache(m.cfg, sp[b], bud[b], mode=mode)
            ref = run_through(m, s[None], alone, None if prompt is None else prompt - pad[b])
            torch.testing.assert_close(runs[r][b, pad[b]:], ref[0], rtol=0, atol=1e-5)
            if r == 0:
                for layer in range(m.cfg.n_layers):
                    assert kept[0][layer][b] == alone.kept_positions(layer)[0]
            else:
                assert (c.tokens_held()[:, b] <= bud[b]).all()
    with pytest.raises(ValueError, match="above this cache"):
        c.reset(pad, budget=[max(budgets) + 1] * len(budgets))


def test_ties_evict_the_oldest_and_selection_is_deterministic():
    prio = torch.zeros(1, 1, 6)
    pos = torch.tensor([[[5, 3, 0, 4, 1, 2]]])
    valid = torch.ones(1, 1, 6, dtype=torch.bool)
    keep = cache_mod.keep_top(prio, pos, valid, 4)
    assert sorted(pos[keep].tolist()) == [2, 3, 4, 5]  # positions 0 and 1, the oldest, go
    assert torch.equal(keep, cache_mod.keep_top(prio, pos, valid, 4))


def test_cache_errors_are_one_line():
    cfg = model_mod.preset("tiny-opt")
    p = policies.make_policy("sink", 8)
    for kwargs, words in [(dict(positions="slot"), "OPT"), (dict(mode="both"), "mode"), (dict(chunk=0), "chunk"),
                          (dict(positions="rank"), "positions")]:
        with pytest.raises(ValueError, match=words) as e:
            KVCache(cfg, p, 8, **kwargs)
        assert "\n" not in str(e.value)
    llama = model_mod.preset("tiny-llama")
    c = KVCache(llama, p, 8, chunk=2)
    with pytest.raises(ValueError, match="chunk=2"):
        c.positions(5)
    full = policies.make_policy("full", None)
    h2o = [policies.make_policy("h2o", 8), policies.make_policy("h2o", 8, alpha=0.5)]
    m = tiny_model("tiny-llama")
    for make, words in [(lambda: KVCache(llama, p, [8, 8, 8], batch=2), "one policy and one budget per sequence"),
                        (lambda: KVCache(llama, h2o, [8, 8], batch=2), "share one policy form"),
                        (lambda: KVCache(llama, p, 3), "below the protected slots"),
                        (lambda: KVCache(llama, full, None).reset(budget=4), "takes no budgets"),
                        (lambda: KVCache(llama, p, 8).reset(policy=policies.make_policy("window", 8), budget=8),
                         "not the policy"),
                        (lambda: KVCache(llama, full, None, max_len=4).positions(5), "max_len=4"),
                        (lambda: m(torch.zeros(2, 1, dtype=torch.long), KVCache(llama, p, 8)), "batch of 1, not 2")]:
        with pytest.raises(ValueError, match=words) as e:
            make()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("policy_name", ["a2sf", "snapkv", "sink", "h2o_mean"])
def test_attention_in_row_chunks_equals_one_chunk(policy_name, monkeypatch):
    """Attention over a cache in row chunks (no T x S buffer; the score updates of the chunks add
    up) gives the logits and kept tokens of all rows at once."""
    m = tiny_model("tiny-llama")
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    p = policies.make_policy(policy_name, 12)
    outs, kept = [], []
    for elements in (2**26, 2 * 4 * 52 * 3):  # one chunk; then 3 rows per chunk
        monkeypatch.setattr(model_mod, "ATTN_ELEMENTS", elements)
        c = KVCache(m.cfg, p, 12, batch=2, mode="prefill")
        outs.append(run_through(m, tokens, c, prompt_len=30))
        kept.append([c.kept_positions(i) for i in range(m.cfg.n_layers)])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    assert kept[0] == kept[1]
