"""The fast package (fast/) against the reference (model.py, cache.py, policies.py): every speed
twin held equal to the plain path it replaces (on the CPU; the tests marked gpu on CUDA).

- fast.enable(model) + fast.KVCache against model + cache.KVCache: the same logits and the same
  kept positions in every layer after every call, for every policy (the key-norm policy of
  exercise 07 too, also against a masked simulation written here);
- fast.cache.evict_one against cache.keep_top; fused projections; the compiled step (aot_eager on
  the CPU; inductor and a CUDA graph with -m gpu) and the eager step as a CUDA graph; the prompt's
  twin (Attention.prompt, column sums, rank_prompt over groups of layers); half_scores against
  the upcast.

The prompt's twin ranks scored policies only where the kernels apply (CUDA in half precision).
On the CPU `kernels_on_cpu` routes it through the kernels as on CUDA: column_sums in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) and the fused causal
attention's log-sum-exp through its torch twin.
"""

import contextlib
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import run_through, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounter

import cache as cache_mod
import fast
import model
import policies
import simulate
from fast import cache as fast_cache
from fast import kernels
from fast import model as fast_model

MODELS = ["tiny-llama", "tiny-opt"]
INTERPRETED = (os.environ.get("TRITON_INTERPRET") == "1" and kernels.triton is not None  # tests/conftest.py
               and tuple(int(x) for x in kernels.triton.__version__.split(".")[:2]) >= (3, 7))  # older fail on numpy 2.4


def twins(name="tiny-llama", seed=0):
    """A reference model and its fast twin (fast.enable on a copy): the same weights."""
    ref = tiny_model(name, seed=seed)
    return ref, fast.enable(copy.deepcopy(ref))


@contextlib.contextmanager
def kernels_on_cpu():
    """The prompt's twin for scored policies on the CPU, as on CUDA (see the module docstring);
    column_sums through its torch twin where Triton cannot interpret it (a CUDA machine, no Triton)."""
    with pytest.MonkeyPatch.context() as mp:
        # the real rule, less its device and dtype: Eq. (1) is a sum, so gqa='max' with groups stays off
        mp.setattr(kernels, "prefill_available", lambda device, dtype, policy, cfg: policy.gqa == "sum" or cfg.group == 1)
        mp.setattr(kernels, "causal_attention_lse", kernels.causal_attention_lse_reference)
        if not INTERPRETED:
            mp.setattr(kernels, "column_sums", kernels.column_sums_reference)
        yield mp


def run_recording(m, tokens, c, prompt_len=None):
    """run_through, recording kept_positions of every layer after every call -> (logits, kept)."""
    logits, kept = [], []
    with torch.no_grad():
        for s, e in simulate.call_bounds(tokens.shape[1], c.mode, c.chunk, prompt_len):
            logits.append(m(tokens[:, s:e], c))
            kept.append([c.kept_positions(layer) for layer in range(m.cfg.n_layers)])
    return torch.cat(logits, dim=1), kept


class PromptSpy:
    """Counts the prompt's twin: the sizes of the layer groups rank_prompt ranked."""

    def __init__(self, mp):
        self.groups = []
        rank = fast_model.rank_prompt

        def spy(cache, group, *args):
            if group:
                self.groups.append(len(group))
            return rank(cache, group, *args)
        mp.setattr(fast_model, "rank_prompt", spy)


# -- (a) the whole fast path against the reference, every policy ------------------------------------

@pytest.mark.parametrize("policy_name", policies.POLICY_NAMES)
@settings(max_examples=6, deadline=None)
@given(arch=st.sampled_from(MODELS), mode=st.sampled_from(cache_mod.MODES),
       positions=st.sampled_from(cache_mod.POSITION_SCHEMES), chunk=st.sampled_from([1, 3]),
       budgets=st.lists(st.integers(5, 12), min_size=1, max_size=2), pad=st.booleans(),
       prompt_twin=st.booleans(), seed=st.integers(0, 2**16))
def test_fast_path_keeps_what_the_reference_keeps(policy_name, arch, mode, positions, chunk, budgets, pad,
                                                  prompt_twin, seed):
    """fast.enable(model) with a fast.KVCache against the reference model with a cache.KVCache:
    the same logits and the same kept positions of every layer after every call. Prompts longer
    than the budget (prefill mode), per-sequence budgets with left padding (batch 2), chunks of
    1 and 3, both position schemes (slot: LLaMA only); prompt_twin: scored policies' prompt
    through the kernels (unscored ones take the twin whenever the cache is empty and unpadded)."""
    if positions == "slot" and arch == "tiny-opt":
        positions = "original"  # OPT's learned positions cannot be re-indexed
    ref, fm = twins(arch, seed=seed % 5)
    B, T, prompt_len = len(budgets), 26, 14
    g = torch.Generator().manual_seed(seed)
    pads = [int(torch.randint(0, 5, (), generator=g)) if pad else 0 for _ in range(B)]
    tokens = torch.randint(1, 128, (B, T), generator=g)
    for b, n in enumerate(pads):
        tokens[b, :n] = 0
    if policy_name == "full":
        policy, budget = policies.make_policy("full", None), None
    else:
        policy, budget = [policies.make_policy(policy_name, b) for b in budgets], budgets
    runs = []
    with kernels_on_cpu() if prompt_twin else contextlib.nullcontext():
        for m, kind in ((ref, cache_mod.KVCache), (fm, fast.KVCache)):
            c = kind(ref.cfg, policy, budget, batch=B, mode=mode, chunk=chunk, positions=positions, pad=pads)
            runs.append(run_recording(m, tokens, c, prompt_len))
    (want, want_kept), (got, got_kept) = runs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got_kept == want_kept
    if budget is not None:  # and the bound holds on both
        assert all(len(head) <= budgets[b] for call in got_kept for layer in call
                   for b, seq in enumerate(layer) for head in seq)


# -- (b) a policy of your own: the key norm of exercise 07, one function and one REGISTRY line -------

def keynorm_score(k, v, p):
    return -k.float().norm(dim=-1)  # the lowest key norms are kept (Devoto et al. 2024)


@contextlib.contextmanager
def keynorm_registered():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(policies.REGISTRY, "keynorm", ("lowest key norm", lambda b: dict(scored=False, score_fn=keynorm_score)))
        yield


@torch.no_grad()
def keynorm_masked_simulation(m, tokens, budget, calls):
    """The key-norm rule written independently, the papers' way: one forward, every key kept in
    memory, the rows of each call attend to what the rule would hold then (plain Python lists per
    sequence and KV head). -> logits (B, T, V), and per call the held positions [layer][b][g]."""
    B, T = tokens.shape
    cfg = m.cfg
    pos = torch.arange(T).expand(B, T)
    x = m.embed(tokens, pos)
    held_after = [[] for _ in calls]
    for block in m.layers:
        a = block.attn
        q, k, v = a.project(block.attn_norm(x))  # q (B, Hkv, G, T, D), k and v (B, Hkv, T, D)
        if cfg.rotary:  # rotate by text position, queries folded to (B, H, T, D)
            q = model.rotate(q.reshape(B, -1, T, cfg.head_dim), pos, cfg.rope_theta).view(q.shape)
            k = model.rotate(k, pos, cfg.rope_theta)
        norms = k.float().norm(dim=-1).tolist()  # (B, Hkv, T)
        held = [[[] for _ in range(cfg.n_kv_heads)] for _ in range(B)]
        out = torch.zeros_like(q)
        for i, (s, e) in enumerate(calls):
            mask = torch.zeros(B, cfg.n_kv_heads, e - s, T, dtype=torch.bool)
            for b in range(B):
                for g in range(cfg.n_kv_heads):
                    held[b][g] += list(range(s, e))
                    for r in range(s, e):
                        mask[b, g, r - s, [j for j in held[b][g] if j <= r]] = True
            scores = (q[..., s:e, :] @ k[:, :, None].transpose(-1, -2)) / math.sqrt(cfg.head_dim)  # (B, Hkv, G, R, T)
            out[..., s:e, :] = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1) @ v[:, :, None]
            for b in range(B):
                for g in range(cfg.n_kv_heads):
                    while len(held[b][g]) > budget:  # drop the highest norm; among equals the oldest
                        held[b][g].remove(min(held[b][g], key=lambda j: (-norms[b][g][j], j)))
            held_after[i].append([[sorted(h) for h in seq] for seq in held])
        x = x + a.output(out)
        x = x + block.mlp(block.mlp_norm(x))
    return m.head(x), held_after


@settings(max_examples=10, deadline=None)
@given(arch=st.sampled_from(MODELS), mode=st.sampled_from(cache_mod.MODES), budget=st.integers(3, 8),
       chunk=st.integers(1, 3), extra=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_keynorm_policy_keeps_the_same_positions_on_both_paths_and_in_a_simulation(arch, mode, budget, chunk,
                                                                                   extra, seed):
    """Issue 14: the key-norm policy, added as one function and one REGISTRY line, keeps exactly
    the same positions on the fast path (the prompt's twin ranks a prompt longer than the budget
    all at once, evict_one the decode steps) and the reference path, in prefill and streaming
    modes, and both equal an independent masked simulation of the rule."""
    ref, fm = twins(arch, seed=seed % 3)
    T, prompt_len = 18, budget + extra  # the prompt is longer than the budget
    g = torch.Generator().manual_seed(seed)
    # distinct tokens: a repeated token has the same key in layer 0 up to its rotation, so a tie of
    # norms that rounding, not the rule, would break
    tokens = torch.stack([torch.randperm(128, generator=g)[:T] for _ in range(2)])
    with keynorm_registered():
        policy = policies.make_policy("keynorm", budget)
        assert policy.score_fn is keynorm_score and not policy.scored
        runs = [run_recording(m, tokens, kind(ref.cfg, policy, budget, batch=2, mode=mode, chunk=chunk), prompt_len)
                for m, kind in ((ref, cache_mod.KVCache), (fm, fast.KVCache))]
    assert "keynorm" not in policies.REGISTRY  # cleaned up
    calls = simulate.call_bounds(T, mode, chunk, prompt_len)
    want, want_kept = keynorm_masked_simulation(ref, tokens, budget, calls)
    for logits, kept in runs:
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-4)
        assert kept == want_kept


def test_keynorm_prompt_twin_ranks_a_long_prompt_by_norm_not_as_a_window():
    """The symptom issue 14 found: a 40-token prompt, budget 8, prefill mode, kept positions 32-39
    on the fast path (a window) and the lowest key norms on the reference. Now the prompt's twin
    runs (the spy sees it) and keeps the lowest norms of layer 0's keys, computed here."""
    ref, fm = twins()
    tokens = torch.randperm(128, generator=torch.Generator().manual_seed(3))[None, :40]
    with keynorm_registered(), pytest.MonkeyPatch.context() as mp:
        spy = PromptSpy(mp)
        c = fast.KVCache(ref.cfg, policies.make_policy("keynorm", 8), 8, mode="prefill")
        with torch.no_grad():
            fm(tokens, c)
    assert spy.groups == [ref.cfg.n_layers]
    pos = torch.arange(40)[None]
    attn = ref.layers[0].attn
    with torch.no_grad():
        _, k, _ = attn.project(ref.layers[0].attn_norm(ref.embed(tokens, pos)))
        norms = model.rotate(k, pos, ref.cfg.rope_theta).norm(dim=-1)[0]  # (Hkv, T)
    for g, kept in enumerate(c.kept_positions(0)[0]):
        assert kept == sorted(norms[g].argsort()[:8].tolist())
        assert kept != list(range(32, 40))


# -- (c) one eviction without a sort ------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), S=st.integers(2, 12), budget=st.integers(1, 11), ties=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), packed=st.booleans(),
       chunk=st.sampled_from([None, 1, 2, 3, 5]))
def test_evict_one_equals_keep_top(seed, S, budget, ties, dtype, packed, chunk):
    """The decode-step twin (one eviction, no sort) keeps exactly what the general rule keeps,
    under its precondition (at most budget + 1 held): fp32 through its packed (priority, position)
    key (CUDA's path, forced here; whole, or in chunks of `chunk` slots with the last one padded) or
    min-then-oldest (the CPU's and other dtypes'); ties, -0.0 against 0.0, +inf and -inf included."""
    g = torch.Generator().manual_seed(seed)
    prio = (torch.rand(2, 3, S, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)  # negatives too
    if ties:
        prio = (prio * 3).floor()  # many equal scores
    prio[0, 0, 0] = float("inf")  # a protected token
    if S > 3:
        prio[1, 2, :2] = torch.tensor([0.0, -0.0], dtype=dtype)  # -0.0 and 0.0 are equal priorities
    pos = torch.stack([torch.randperm(S, generator=g) for _ in range(6)]).view(2, 3, S)
    valid = torch.rand(2, 3, S, generator=g) < 0.9
    valid &= valid.long().cumsum(-1) <= budget + 1  # the precondition
    prio = torch.where(valid, prio, float("-inf"))
    got = fast_cache.evict_one(prio, pos, valid, budget, packed=packed and dtype == torch.float32, chunk=chunk)
    assert torch.equal(got, cache_mod.keep_top(prio, pos, valid, budget))
    # and against the rule written here: drop the lowest priority, the oldest among equals
    for b in range(2):
        for h in range(3):
            held = [j for j in range(S) if valid[b, h, j]]
            if len(held) > budget:
                held.remove(min(held, key=lambda j: (float(prio[b, h, j]), int(pos[b, h, j]))))
            assert got[b, h].nonzero().flatten().tolist() == held


@pytest.mark.parametrize("chunk", [7, 64, 299, 300])
def test_evict_one_in_chunks_equals_the_whole_row(chunk):
    """The chunked eviction (fast.cache.EVICT_CHUNK, the long caches' split reduction) against the
    whole-row argmin, on rows of 300 slots that are full (one over the budget), one short, or hold one
    token: a last chunk that is padded (7, 64) or exact (300), or one chunk (299 + 1 padded)."""
    g = torch.Generator().manual_seed(chunk)
    B, H, S = 2, 4, 300
    prio = (torch.rand(B, H, S, generator=g) * 4).floor()  # ties
    pos = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    valid = torch.ones(B, H, S, dtype=torch.bool)
    valid[0, 1, 5] = False  # one short of the budget + 1: nothing goes
    valid[1, 2] = False
    valid[1, 2, 299] = True  # one token, in the last (padded) chunk: nothing goes
    budget = S - 1
    prio = torch.where(valid, prio, float("-inf"))  # keep_top's precondition: empty slots rank last
    whole = fast_cache.evict_one(prio, pos, valid, budget, packed=True)
    assert torch.equal(fast_cache.evict_one(prio, pos, valid, budget, packed=True, chunk=chunk), whole)
    assert torch.equal(whole, cache_mod.keep_top(prio, pos, valid, budget))
    assert (valid.sum(-1) - whole.sum(-1)).tolist() == [[1, 0, 1, 1], [1, 1, 0, 1]]


def test_evict_one_with_per_sequence_budgets_and_ties_evicts_the_oldest():
    prio = torch.zeros(2, 1, 5)
    pos = torch.tensor([[[4, 3, 0, 1, 2]], [[0, 1, 2, 3, 4]]])
    valid = torch.ones(2, 1, 5, dtype=torch.bool)
    keep = fast_cache.evict_one(prio, pos, valid, torch.tensor([4, 5])[:, None, None])
    assert sorted(pos[0][keep[0]].tolist()) == [1, 2, 3, 4]  # position 0, the oldest, goes
    assert keep[1].all()  # budget 5: nothing goes


# -- (d) fused projections ----------------------------------------------------------------------------

def test_fuse_linears_is_one_matmul_over_views():
    gen = torch.Generator().manual_seed(0)
    owner, a, b = nn.Module(), nn.Linear(8, 3), nn.Linear(8, 5)
    x = torch.randn(4, 8, generator=gen)
    want = torch.cat([a(x), b(x)], dim=-1).detach()
    fast_model.fuse_linears(owner, "w", a, b)
    torch.testing.assert_close(F.linear(x, owner.w, owner.w_bias), want, rtol=0, atol=1e-6)
    assert a.weight.data_ptr() == owner.w.data_ptr() and b.bias.data_ptr() == owner.w_bias[3:].data_ptr()
    assert "w" not in owner.state_dict()  # not persistent: checkpoints keep the separate names


@pytest.mark.parametrize("name", MODELS)
def test_enable_keeps_logits_and_state_dict(name):
    """fast.enable: fused q, k, v (and gate, up) give the same logits with and without a cache,
    state_dict keeps its names and values, each weight is stored once (the separate linears are
    views), and a second enable changes nothing."""
    ref, m = twins(name)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    before = ref.state_dict()
    assert fast.enable(m) is m and isinstance(m, fast_model.Transformer)
    after = m.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(m(tokens), ref(tokens), rtol=0, atol=1e-5)
        p = policies.make_policy("h2o", 6)
        caches = [kind(m.cfg, p, 6, batch=2, chunk=3) for kind in (cache_mod.KVCache, fast.KVCache)]
        torch.testing.assert_close(run_through(m, tokens, caches[1]), run_through(ref, tokens, caches[0]), rtol=0, atol=1e-5)
    attn = m.layers[0].attn
    assert isinstance(attn, fast_model.Attention) and attn.wqkv.shape[0] == attn.wq.out_features + 2 * attn.wk.out_features
    assert attn.wk.weight.data_ptr() == attn.wqkv[attn.wq.out_features:].data_ptr()
    if m.cfg.arch == "llama":
        assert m.layers[0].mlp.w_up.weight.data_ptr() == m.layers[0].mlp.w_gate_up[m.cfg.hidden_dim:].data_ptr()
    with torch.no_grad():  # an in-place change of a separate weight is seen by the fused one
        attn.wv.weight.zero_()
        assert attn.wqkv[-attn.wv.out_features:].abs().sum() == 0


# -- (e) the compiled and the graph-captured step -----------------------------------------------------

@pytest.mark.parametrize("policy_name,backend", [("a2sf", "aot_eager"), ("sink", "eager"),
                                                 pytest.param("full", "aot_eager", marks=pytest.mark.slow),
                                                 pytest.param("vatp", "aot_eager", marks=pytest.mark.slow)])
def test_compiled_decode_step_equals_the_reference_step(policy_name, backend):
    """fast.compile_decode (each block through torch.compile; on the CPU no CUDA graph) against
    the reference model's eager step: the same logits and kept positions at every step."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref, m = twins()
    budget = None if policy_name == "full" else 12
    p = policies.make_policy(policy_name, budget)
    tokens = torch.randint(0, 128, (2, 36), generator=torch.Generator().manual_seed(7))
    slow = cache_mod.KVCache(ref.cfg, p, budget, batch=2, max_len=48)
    quick = fast.KVCache(ref.cfg, p, budget, batch=2, max_len=48)
    with torch.no_grad():
        for i in range(20):
            ref(tokens[:, i:i + 1], slow), m(tokens[:, i:i + 1], quick)
        step = fast.compile_decode(m, quick, backend=backend)
        for i in range(20, 36):
            torch.testing.assert_close(step(tokens[:, i:i + 1].clone()), ref(tokens[:, i:i + 1], slow), rtol=0, atol=1e-5)
            assert [quick.kept_positions(k) for k in range(2)] == [slow.kept_positions(k) for k in range(2)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it was compiled, not run eagerly


def test_static_compiled_steps_for_caches_of_two_sizes_equal_the_reference_step():
    """compile_decode(dynamic=False), as bench.py --static compiles each row's step: two caches of
    different sizes in one process, each step compiled for its own size, each equal to the
    reference model's eager step (logits and kept positions)."""
    torch._dynamo.reset()
    ref, m = twins()
    tokens = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(11))
    for budget in (8, 13):
        p = policies.make_policy("h2o", budget)
        slow = cache_mod.KVCache(ref.cfg, p, budget, batch=2)
        quick = fast.KVCache(ref.cfg, p, budget, batch=2)
        with torch.no_grad():
            for i in range(16):
                ref(tokens[:, i:i + 1], slow), m(tokens[:, i:i + 1], quick)
            step = fast.compile_decode(m, quick, backend="aot_eager", dynamic=False)
            for i in range(16, 30):
                torch.testing.assert_close(step(tokens[:, i:i + 1].clone()), ref(tokens[:, i:i + 1], slow),
                                           rtol=0, atol=1e-5)
        assert [quick.kept_positions(k) for k in range(2)] == [slow.kept_positions(k) for k in range(2)]


def test_graph_decode_on_the_cpu_is_the_plain_step():
    ref, m = twins()
    p = policies.make_policy("h2o", 8)
    slow, quick = cache_mod.KVCache(ref.cfg, p, 8, batch=2), fast.KVCache(ref.cfg, p, 8, batch=2)
    step = fast.graph_decode(m, quick)
    assert not isinstance(step, fast.CudaGraphStep)
    tokens = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i in range(14):
            torch.testing.assert_close(step(tokens[:, i:i + 1]), ref(tokens[:, i:i + 1], slow), rtol=0, atol=1e-5)
    assert [quick.kept_positions(k) for k in range(2)] == [slow.kept_positions(k) for k in range(2)]


def test_a_cuda_graph_step_compiles_once_whatever_the_strides_of_its_tokens(monkeypatch):
    """CudaGraphStep hands its step one buffer in the warm-up calls and at the capture: a compiled step
    compiles once though generate.feed calls it with slices of a prompt ((B, T)-strided). A recompile
    inside a CUDA graph's capture autotunes inductor's new kernels, a host sync: a CUDA error (issue 18's
    token-by-token run). The graph faked on the CPU: the capture runs its body, a replay does nothing."""
    counter = CompileCounter()
    step = torch.compile(lambda t: t * 2 + 1, backend=counter, fullgraph=True, dynamic=False)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: type("FakeGraph", (), {"replay": lambda self: None})())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    graphed = fast.CudaGraphStep(step, warmup=2)
    prompt = torch.arange(24).view(3, 8)
    got = [graphed(prompt[:, s:s + 1]).clone() for s in range(1, 6)]  # two warm-ups, the capture, two replays
    assert counter.frame_count == 1
    for s in range(1, 4):  # the warm-ups' and the capture's own results (a fake replay computes nothing)
        assert torch.equal(got[s - 1], prompt[:, s:s + 1] * 2 + 1)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy_name", ["full", "sink", "h2o", "a2sf", "vatp"])
def test_cuda_graph_of_the_compiled_step_equals_the_reference_step(policy_name):
    """fast.compile_decode on CUDA (inductor, then one CUDA graph) against the reference eager step, fp32."""
    torch._dynamo.reset()
    ref = tiny_model("tiny-llama").cuda()
    m = fast.enable(copy.deepcopy(ref))
    budget = None if policy_name == "full" else 12
    p = policies.make_policy(policy_name, budget)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(7)).cuda()
    slow = cache_mod.KVCache(ref.cfg, p, budget, batch=2, max_len=64, device="cuda")
    quick = fast.KVCache(ref.cfg, p, budget, batch=2, max_len=64, device="cuda")
    with torch.no_grad():
        for i in range(24):
            ref(tokens[:, i:i + 1], slow), m(tokens[:, i:i + 1], quick)
        step = fast.compile_decode(m, quick)
        assert isinstance(step, fast.CudaGraphStep)
        for i in range(24, 40):
            torch.testing.assert_close(step(tokens[:, i:i + 1].clone()), ref(tokens[:, i:i + 1], slow), rtol=0, atol=1e-5)
    for a, b in zip(slow.layers, quick.layers):  # the same kept tokens (slot order may differ)
        assert (torch.where(a.valid, a.pos, -1).sort(-1).values == torch.where(b.valid, b.pos, -1).sort(-1).values).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy_name", ["sink", "h2o", "a2sf", "snapkv"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_graph_of_the_eager_step_equals_eager_across_resets(policy_name, chunk):
    """fast.graph_decode (the eager step replayed as a CUDA graph, no compile) against the eager
    step, with per-sequence budgets, left padding, and a reset between two batches (evaluate.Reuse)."""
    m = fast.enable(tiny_model("tiny-llama").cuda())
    budgets = [9, 13]
    split = [policies.make_policy(policy_name, b) for b in budgets]
    caches = [fast.KVCache(m.cfg, split, budgets, batch=2, chunk=chunk, pad=[0, 3], device="cuda") for _ in range(2)]
    step = None
    for round_ in range(2):
        tokens = torch.randint(1, 128, (2, 16 + 8 * chunk), generator=torch.Generator().manual_seed(round_)).cuda()
        if round_:
            for c in caches:
                c.reset([2, 0], split[::-1], budgets[::-1])
        with torch.no_grad():
            for c in caches:
                for s in range(0, 16, chunk):
                    m(tokens[:, s:s + chunk], c)
            step = step or fast.graph_decode(m, caches[1])
            assert isinstance(step, fast.CudaGraphStep)
            for s in range(16, tokens.shape[1], chunk):
                slow = m(tokens[:, s:s + chunk], caches[0])
                quick = step(tokens[:, s:s + chunk].clone())
                torch.testing.assert_close(quick, slow, rtol=0, atol=1e-5)
        for a, b in zip(caches[0].layers, caches[1].layers):
            assert torch.equal(a.valid, b.valid)

ROTARY_CASES = {  # KVCache settings
    "full, prefill, padded": dict(policy="full", budget=None, mode="prefill", pad=[0, 3]),
    "a2sf, prefill": dict(policy="a2sf", budget=12, mode="prefill"),  # explicit attention: queries (B, Hkv, G, T, D)
    "h2o, streaming chunk 4, padded": dict(policy="h2o", budget=12, mode="streaming", chunk=4, pad=[2, 0]),
    "sink, slot positions": dict(policy="sink", budget=12, mode="prefill", positions="slot"),  # keys rotated at read
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", ROTARY_CASES)
def test_forward_through_block_fn_equals_the_reference_forward(name, case):
    """The fast forward with block_fn (what compile_decode compiles: Block.forward(block, x,
    positions, angles, layer_cache)) and embed_fn (Transformer.embed_and_angles, compiled there too)
    gives the reference's logits, and the rotary angles embed_fn returns reach every layer, (B, 1, T,
    D) fp32 (None for OPT)."""
    if name == "tiny-opt" and "slot" in case:
        pytest.skip("slot positions need rotary embeddings")
    ref, m = twins(name)
    tokens = torch.randint(0, 128, (2, 28), generator=torch.Generator().manual_seed(3))
    seen = []

    made = []

    def spy(block, x, positions, angles, layer_cache):
        seen.append(angles)
        return model.Block.forward(block, x, positions, angles, layer_cache)

    def embed_spy(mm, tokens, positions):
        x, angles = fast.model.Transformer.embed_and_angles(mm, tokens, positions)
        made.append(angles)
        return x, angles

    out = []
    for mm, kind, block_fn in ((ref, cache_mod.KVCache, None), (m, fast.KVCache, spy)):
        with torch.no_grad():
            kw = dict(ROTARY_CASES[case])
            policy, budget = policies.make_policy(kw.pop("policy"), kw["budget"]), kw.pop("budget")
            c = kind(m.cfg, policy, budget, batch=2, max_len=64, **kw)
            calls = simulate.call_bounds(28, c.mode, c.chunk, 20)  # a prompt of 20, then decode steps
            out.append(torch.cat([mm(tokens[:, s:e], c) if block_fn is None else
                                  mm(tokens[:, s:e], c, block_fn=block_fn, embed_fn=embed_spy) for s, e in calls], dim=1))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-5)
    assert seen, "block_fn was never called"
    assert made and all(a is b for i, a in enumerate(seen) for b in [made[i // m.cfg.n_layers]])  # embed_fn's, each layer
    if m.cfg.rotary:
        assert all(a[0].shape[:2] == (2, 1) and a[0].shape[-1] == m.cfg.head_dim and a[0].dtype == torch.float32
                   for a in seen)
    else:
        assert all(a is None for a in seen)


SCALINGS = {"default": model.RopeScaling(), "linear": model.RopeScaling(kind="linear", factor=2.0),
            "yarn": model.RopeScaling(kind="yarn", factor=4.0, original_max=32)}  # yarn: cos and sin scaled by 1.139
EMBED_CALLS = [(1, 0), (1, 99_999), (7, 4093), (64, -3)]  # (tokens a call, first position): one-token and many


def embed_calls(cfg, device):
    """(tokens, positions) (2, T) for each of EMBED_CALLS: the second sequence 5 positions on (left padding
    makes the first's positions negative in the last call); OPT's within its learned positions."""
    gen = torch.Generator().manual_seed(0)
    for T, start in EMBED_CALLS:
        start = start if cfg.rotary else min(start, cfg.max_seq_len - T - 5)
        positions = start + torch.arange(T) + torch.tensor([[0], [5]])  # (2, T)
        yield torch.randint(0, cfg.vocab_size, (2, T), generator=gen).to(device), positions.to(device)


def assert_embedding_bit_for_bit(m, embed_fn, calls):
    for tokens, positions in calls:
        x, angles = embed_fn(m, tokens, positions)
        assert torch.equal(x, model.Transformer.embed(m, tokens, positions))
        if not m.cfg.rotary:
            assert angles is None
            continue
        cos, sin = model.rotary_angles(positions, m.cfg)  # (2, 1, T, D) fp32
        assert angles[0].shape == cos.shape and angles[0].dtype == torch.float32
        assert torch.equal(angles[0], cos) and torch.equal(angles[1], sin), f"positions from {int(positions[0, 0])}"


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("name", MODELS)
def test_the_compiled_steps_embedding_gives_the_reference_embedding_and_angles_bit_for_bit(name, scaling):
    """fast.step.compiled_embedding (embed_and_phases compiled, the phases' cos and sin eager, the inverse
    frequencies computed once) against model.Transformer.embed and model.rotary_angles, torch.equal: one
    token and many, positions up to 100k (large fp32 arguments), negative ones, yarn's scaled cos and sin.
    On the CPU the compile is aot_eager's (compile_decode's); test_..._on_cuda below runs inductor."""
    if name == "tiny-opt" and scaling != "default":
        pytest.skip("OPT has no rotary embeddings")
    m = fast.enable(tiny_model(name, rope_scaling=SCALINGS[scaling]))
    calls = list(embed_calls(m.cfg, "cpu"))
    compile_fn = lambda fn: torch.compile(fn, backend="aot_eager", fullgraph=True)  # noqa: E731
    with torch.no_grad():
        assert_embedding_bit_for_bit(m, fast.step.compiled_embedding(m, torch.device("cpu"), compile_fn), calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scaling", SCALINGS)
def test_the_compiled_steps_embedding_is_the_eager_one_bit_for_bit_under_inductor_on_cuda(scaling):
    """compile_decode's embed_fn under inductor (triton.enable_pdl as the step compiles it) against the eager
    embedding and angles, torch.equal, SmolLM2's rope_theta: cos and sin compiled by Triton are up to
    3e-5 away from eager CUDA's (scripts/angles_probe.py), which is why compiled_embedding keeps them eager
    (session 10's drift of the compiled step's bf16 logits, up to 2.0)."""
    torch._dynamo.reset()
    m = fast.enable(tiny_model("tiny-llama", rope_scaling=SCALINGS[scaling], rope_theta=100000.0).cuda())
    calls = list(embed_calls(m.cfg, "cuda")) + [
        (torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.tensor([[p]], device="cuda")) for p in range(512)]
    options = {"triton.enable_pdl": True} if hasattr(torch._inductor.config, "triton.enable_pdl") else None
    compile_fn = lambda fn: torch.compile(fn, backend="inductor", fullgraph=True, options=options)  # noqa: E731
    with torch.no_grad():
        assert_embedding_bit_for_bit(m, fast.step.compiled_embedding(m, torch.device("cuda"), compile_fn), calls)


def test_rope_with_angles_equals_rotation_by_positions_for_grouped_queries_and_keys():
    m = tiny_model("tiny-llama")
    attn, cfg = m.layers[0].attn, m.cfg
    B, T, gen = 2, 7, torch.Generator().manual_seed(5)
    positions = torch.tensor([[-2, -1, 0, 1, 2, 3, 4], [10, 11, 12, 13, 14, 15, 16]])  # (B, T), left padding included
    angles = m.angles(positions)  # (B, 1, T, D)
    q = torch.randn(B, cfg.n_kv_heads, cfg.group, T, cfg.head_dim, generator=gen)  # (B, Hkv, G, T, D)
    k = torch.randn(B, cfg.n_kv_heads, T, cfg.head_dim, generator=gen)  # (B, Hkv, T, D)
    for g in range(cfg.group):  # each query head of a group turns as its keys do
        torch.testing.assert_close(attn.rope(q, angles)[:, :, g], model.rotate(q[:, :, g], positions, cfg.rope_theta),
                                   rtol=0, atol=0)
    torch.testing.assert_close(attn.rope(k, angles), model.rotate(k, positions, cfg.rope_theta), rtol=0, atol=0)
    # and against the rotation written out: pairs (i, i + D/2) turn by pos * theta^(-2i/D)
    D = cfg.head_dim
    ang = positions[:, None, :, None].double() * cfg.rope_theta ** (-torch.arange(0, D, 2).double() / D)
    x1, x2 = k.double().chunk(2, -1)
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    torch.testing.assert_close(attn.rope(k, angles).double(), want, rtol=0, atol=1e-5)


# -- (f) the prompt's twin: every layer alone, all together, and the reference ------------------------

@pytest.mark.parametrize("policy_name", [p for p in policies.POLICY_NAMES if p != "full"])
def test_prompt_twin_ranked_per_layer_and_all_together_equals_the_reference(policy_name):
    """fast.model.Transformer.prompt (each layer's Attention.prompt, then rank_prompt over groups
    of layers) with PENDING_BYTES 0 (every layer ranked alone) and large (all together), against
    the reference (update, observe, evict, shrink): the same logits, kept positions after every
    call and policy state, per-sequence budgets included."""
    ref, m = twins()
    budgets = [7, 11]
    split = [policies.make_policy(policy_name, b) for b in budgets]
    tokens = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(11))
    want_c = cache_mod.KVCache(ref.cfg, split, budgets, batch=2, mode="prefill")
    want, want_kept = run_recording(ref, tokens, want_c, prompt_len=20)
    for limit, groups in ((0, [1] * ref.cfg.n_layers), (2**28, [ref.cfg.n_layers])):
        with kernels_on_cpu() as mp:
            mp.setattr(fast_model, "PENDING_BYTES", limit)
            spy = PromptSpy(mp)
            c = fast.KVCache(ref.cfg, split, budgets, batch=2, mode="prefill")
            got, kept = run_recording(m, tokens, c, prompt_len=20)
        assert spy.groups == groups  # the twin ran, in these groups
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert kept == want_kept
        for a, b in zip(c.layers, want_c.layers):
            assert a.state.keys() == b.state.keys()
            for name in a.state:  # the same tokens hold the same state (slot order may differ)
                order_a, order_b = (torch.where(x.valid, x.pos, 1 << 30).argsort(-1) for x in (a, b))
                sa, sb = (torch.where(x.valid, x.state[name], 0).gather(-1, o) for x, o in ((a, order_a), (b, order_b)))
                torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-5)
    assert all((c.tokens_held()[:, b] <= budgets[b]).all() for b in range(2))


def test_prompt_twin_grows_a_full_cache_and_writes_every_token():
    ref, m = twins()
    tokens = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    p = policies.make_policy("full", None)
    with pytest.MonkeyPatch.context() as mp:
        spy = PromptSpy(mp)
        c = fast.KVCache(ref.cfg, p, None, mode="prefill")
        got = run_through(m, tokens, c, prompt_len=30)
    assert spy.groups == [ref.cfg.n_layers]
    with torch.no_grad():
        torch.testing.assert_close(got, ref(tokens), rtol=0, atol=1e-5)
    assert c.kept_positions(1) == [[list(range(40))] * ref.cfg.n_kv_heads]


def test_prompt_twin_is_skipped_where_it_does_not_apply():
    """A padded batch, a second call, and scored policies without the kernels (fp32, or off CUDA)
    go the reference way; an unpadded first call of an unscored policy takes the twin."""
    ref, m = twins()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    for name, pad, groups in (("h2o", None, []), ("sink", [0, 2], []), ("sink", None, [2])):
        with pytest.MonkeyPatch.context() as mp:
            spy = PromptSpy(mp)
            c = fast.KVCache(ref.cfg, policies.make_policy(name, 8), 8, batch=2, mode="prefill", pad=pad)
            with torch.no_grad():
                m(tokens, c)
                m(tokens[:, :1], c)  # a decode step: never the twin
        assert spy.groups == groups
    with kernels_on_cpu():  # gqa='max' takes a max over a group's rows, which column sums cannot
        assert not m.prompt_applies(fast.KVCache(ref.cfg, policies.make_policy("h2o", 8, gqa="max"), 8))
        assert m.prompt_applies(fast.KVCache(ref.cfg, policies.make_policy("h2o", 8), 8))


# -- (g) q k^T in half precision with fp32 output (CUDA) against the upcast -----------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 5])
def test_fast_attend_is_the_reference_attend_off_cuda(dtype, T):
    """Off CUDA neither the decode kernel nor half_scores applies: fast Attention.attend is model.attend."""
    gen = torch.Generator().manual_seed(1)
    ref, m = twins()
    q = torch.randn(2, 2, 2, T, 16, generator=gen).to(dtype)  # (B, Hkv, G, T, D)
    k, v = (torch.randn(2, 2, 9, 16, generator=gen).to(dtype) for _ in range(2))
    mask = torch.rand(2, 2, T, 9, generator=gen) < 0.7
    mask[..., 0] = True
    assert not fast_model.half_scores_apply(q, k) and not kernels.available(q)
    for need_probs in (True, False):
        got, want = m.layers[0].attn.attend(q, k, v, mask, need_probs), model.attend(q, k, v, mask, need_probs)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert (got[1] is None) == (want[1] is None) == (not need_probs)
        if need_probs:
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_half_scores_shapes_on_the_meta_device():
    """half_scores' bmm has no CPU kernel; its meta kernel checks the shapes and the fp32 output."""
    if not fast_model.BMM_OUT_DTYPE:
        pytest.skip("this torch has no bmm out_dtype")
    rows = torch.empty(2, 3, 10, 16, device="meta", dtype=torch.bfloat16)[:, :, 1:6]  # (B, Hkv, R, D), a slice
    k = torch.empty(2, 3, 9, 16, device="meta", dtype=torch.bfloat16)
    scores = fast_model.half_scores(rows, k)
    assert scores.shape == (2, 3, 5, 9) and scores.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_scores_on_cuda_agree_with_the_upcast(dtype):
    """Tolerance: the products of two half-precision numbers are exact in fp32, so both paths err
    only in summing D of them in fp32, each by at most D u sum_i |q_i k_i| (Higham 2002, Eq. 3.5:
    |fl(x.y) - x.y| <= gamma_D |x|.|y|, gamma_D ~ D u) against the exact sum. u = 2^-24 for
    round-to-nearest; we allow 2^-22 (tensor cores may truncate or sum in a tree)."""
    if not fast_model.BMM_OUT_DTYPE:
        pytest.skip("this torch has no bmm out_dtype")
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, Hkv, R, S, D = 2, 4, 37, 300, 128
    rows = torch.randn(B, Hkv, R + 3, D, device="cuda", generator=gen).to(dtype)[:, :, 3:]  # (B, Hkv, R, D), a slice
    k = torch.randn(B, Hkv, S, D, device="cuda", generator=gen).to(dtype)  # (B, Hkv, S, D)
    exact = rows.double() @ k.double().transpose(-1, -2)  # (B, Hkv, R, S)
    bound = D * 2.0**-22 * (rows.double().abs() @ k.double().abs().transpose(-1, -2))
    half, upcast = fast_model.half_scores(rows, k), rows.float() @ k.float().transpose(-1, -2)
    compiled = torch.compile(fast_model.half_scores, backend="inductor", fullgraph=True)(rows, k)
    assert half.dtype == upcast.dtype == compiled.dtype == torch.float32
    for scores in (half, upcast, compiled):
        assert ((scores.double() - exact).abs() <= bound).all()
    # the fast attend takes the half path on CUDA and gives model.attend's probabilities
    assert fast_model.half_scores_apply(rows, k)
    q = rows[:, :, None]  # (B, Hkv, 1, R, D)
    mask = torch.ones(B, Hkv, R, S, dtype=torch.bool, device="cuda").tril(S - R)
    m = fast.enable(tiny_model("tiny-llama"))
    got, want = m.layers[0].attn.attend(q, k, k, mask, True), model.attend(q, k, k, mask, True)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    print(dtype, "half vs upcast, max |diff|:", (half - upcast).abs().max().item(), "max bound:", bound.max().item())
