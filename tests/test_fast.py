"""Fast paths against their slow twins. On the CPU the compiled decode step is traced with the
aot_eager backend (the same graph, no C++ build); the GPU run (tests marked gpu) uses inductor
and CUDA graphs."""

import pytest
import torch
from helpers import tiny_model

import generate
import model
import policies
import simulate
from cache import KVCache


def _decode_both(m, policy_name, budget, device="cpu", backend="aot_eager", dtype=torch.float32, steps=16):
    p = policies.make_policy(policy_name, budget)
    tokens = torch.randint(0, 128, (2, 24 + steps), generator=torch.Generator().manual_seed(7)).to(device)
    caches = [KVCache(m.cfg, p, budget, batch=2, max_len=64, device=device, dtype=dtype) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            generate.feed(m, tokens[:, :24], c) if c.budget is None else [m(tokens[:, i:i + 1], c) for i in range(24)]
        step = generate.compile_decode(m, caches[1], backend=backend)
        for i in range(24, 24 + steps):
            slow = m(tokens[:, i:i + 1], caches[0])
            fast = step(tokens[:, i:i + 1].clone())
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5 if dtype == torch.float32 else 5e-2)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.valid, b.valid) and torch.equal(torch.where(a.valid, a.pos, -1), torch.where(b.valid, b.pos, -1))


SLOW = [pytest.param(n, marks=pytest.mark.slow) for n in ("sink", "h2o", "vatp")]


@pytest.mark.parametrize("policy_name", ["full", "a2sf", *SLOW])
def test_compiled_decode_step_equals_eager(policy_name):
    torch._dynamo.reset()
    _decode_both(tiny_model("tiny-llama"), policy_name, None if policy_name == "full" else 12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy_name", ["full", "sink", "h2o", "a2sf", "vatp"])
def test_cuda_graph_decode_step_equals_eager(policy_name):
    torch._dynamo.reset()
    m = tiny_model("tiny-llama").cuda()
    _decode_both(m, policy_name, None if policy_name == "full" else 12, device="cuda", backend="inductor")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy_name", ["sink", "h2o", "a2sf", "snapkv"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_graph_of_the_eager_step_equals_eager_across_resets(policy_name, chunk):
    """generate.graph_decode (the eager step replayed as a CUDA graph, no compile) against the eager
    step, with per-sequence budgets, left padding, and a reset between two batches (evaluate.Reuse)."""
    m = tiny_model("tiny-llama").cuda()
    budgets = [9, 13]
    split = [policies.make_policy(policy_name, b) for b in budgets]
    caches = [KVCache(m.cfg, split, budgets, batch=2, chunk=chunk, pad=[0, 3], device="cuda") for _ in range(2)]
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
            step = step or generate.graph_decode(m, caches[1])
            for s in range(16, tokens.shape[1], chunk):
                slow = m(tokens[:, s:s + chunk], caches[0])
                fast = step(tokens[:, s:s + chunk].clone())
                torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
        for a, b in zip(caches[0].layers, caches[1].layers):
            assert torch.equal(a.valid, b.valid)


# -- rotary angles once per forward, against each layer rotating by the positions itself ------------

def per_layer(block, x, positions, layer_cache=None, explicit=False, angles=None):
    """The slow twin of the precomputed angles: Block.forward with them dropped, so every layer
    computes its own from positions (model.rotate)."""
    return model.Block.forward(block, x, positions, layer_cache, explicit)


ROTARY_CASES = {  # KVCache settings; None: no cache
    "no cache": None,
    "full, prefill": dict(policy="full", budget=None, mode="prefill"),
    "full, padded": dict(policy="full", budget=None, mode="prefill", pad=[0, 3]),
    "a2sf, prefill": dict(policy="a2sf", budget=12, mode="prefill"),  # explicit attention: queries (B, Hkv, G, T, D)
    "h2o, streaming chunk 4, padded": dict(policy="h2o", budget=12, mode="streaming", chunk=4, pad=[2, 0]),
    "sink, slot positions": dict(policy="sink", budget=12, mode="prefill", positions="slot"),  # keys rotated per layer
}


def _logits_through(m, tokens, case, block_fn):
    if case is None:
        return torch.cat([m(tokens, block_fn=block_fn), m(tokens, explicit=True, block_fn=block_fn)], dim=1)
    case = dict(case)
    policy, budget = policies.make_policy(case.pop("policy"), case["budget"]), case.pop("budget")
    cache = KVCache(m.cfg, policy, budget, batch=tokens.shape[0], max_len=64, **case)
    bounds = simulate.call_bounds(tokens.shape[1], cache.mode, cache.chunk, 20)  # a prompt of 20, then decode steps
    return torch.cat([m(tokens[:, s:e], cache, block_fn=block_fn) for s, e in bounds], dim=1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("case", ROTARY_CASES)
def test_rotary_angles_once_per_forward_equal_rotation_in_every_layer(name, case):
    """tiny-llama has 4 query heads on 2 KV heads (groups of 2); OPT has no rotary: no angles."""
    if name == "tiny-opt" and "slot" in case:
        pytest.skip("slot positions need rotary embeddings")
    m = tiny_model(name)
    tokens = torch.randint(0, 128, (2, 28), generator=torch.Generator().manual_seed(3))
    seen = []

    def spy(block, x, positions, layer_cache, explicit, angles):
        seen.append(angles)
        return model.Block.forward(block, x, positions, layer_cache, explicit, angles)

    with torch.no_grad():
        fast = _logits_through(m, tokens, ROTARY_CASES[case], spy)
        slow = _logits_through(m, tokens, ROTARY_CASES[case], per_layer)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    if m.cfg.rotary:  # the angles reached every layer, (B, 1, T, D) fp32
        assert all(a[0].shape[:2] == (2, 1) and a[0].shape[-1] == m.cfg.head_dim and a[0].dtype == torch.float32
                   for a in seen)
    else:
        assert all(a is None for a in seen)


def test_rope_with_angles_equals_rope_from_positions_for_grouped_queries_and_keys():
    m = tiny_model("tiny-llama")
    attn, cfg = m.layers[0].attn, m.cfg
    B, T, gen = 2, 7, torch.Generator().manual_seed(5)
    positions = torch.tensor([[-2, -1, 0, 1, 2, 3, 4], [10, 11, 12, 13, 14, 15, 16]])  # (B, T), left padding included
    angles = model.rotary_angles(positions, cfg.head_dim, cfg.rope_theta)  # (B, 1, T, D)
    q = torch.randn(B, cfg.n_kv_heads, cfg.group, T, cfg.head_dim, generator=gen)  # (B, Hkv, G, T, D)
    k = torch.randn(B, cfg.n_kv_heads, T, cfg.head_dim, generator=gen)  # (B, Hkv, T, D)
    for x in (q, k):
        torch.testing.assert_close(attn.rope(x, positions, angles), attn.rope(x, positions), rtol=0, atol=0)


# -- QK^T: a half-precision matmul with fp32 output on CUDA, the upcast elsewhere ---------------------

def test_attention_scores_fall_back_to_the_upcast_off_cuda():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        rows = torch.randn(2, 3, 5, 16, generator=gen).to(dtype)  # (B, Hkv, R, D)
        k = torch.randn(2, 3, 9, 16, generator=gen).to(dtype)  # (B, Hkv, S, D)
        scores = model.attention_scores(rows, k)
        assert scores.dtype == torch.promote_types(dtype, torch.float32) and scores.shape == (2, 3, 5, 9)
        torch.testing.assert_close(scores, model.upcast_scores(rows, k), rtol=0, atol=0)


def test_half_scores_shapes_on_the_meta_device():
    """half_scores' bmm has no CPU kernel; its meta kernel checks the shapes and the fp32 output."""
    if not model.BMM_OUT_DTYPE:
        pytest.skip("this torch has no bmm out_dtype")
    rows = torch.empty(2, 3, 10, 16, device="meta", dtype=torch.bfloat16)[:, :, 1:6]  # (B, Hkv, R, D), a slice
    k = torch.empty(2, 3, 9, 16, device="meta", dtype=torch.bfloat16)
    scores = model.half_scores(rows, k)
    assert scores.shape == (2, 3, 5, 9) and scores.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_scores_on_cuda_agree_with_the_upcast(dtype):
    """Tolerance: the products of two half-precision numbers are exact in fp32, so both paths err
    only in summing D of them in fp32, each by at most D u sum_i |q_i k_i| (Higham 2002, Eq. 3.5:
    |fl(x.y) - x.y| <= gamma_D |x|.|y|, gamma_D ~ D u) against the exact sum. u = 2^-24 for
    round-to-nearest; we allow 2^-22 (tensor cores may truncate or sum in a tree)."""
    if not model.BMM_OUT_DTYPE:
        pytest.skip("this torch has no bmm out_dtype")
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, Hkv, R, S, D = 2, 4, 37, 300, 128
    rows = torch.randn(B, Hkv, R + 3, D, device="cuda", generator=gen).to(dtype)[:, :, 3:]  # (B, Hkv, R, D), a slice
    k = torch.randn(B, Hkv, S, D, device="cuda", generator=gen).to(dtype)  # (B, Hkv, S, D)
    exact = rows.double() @ k.double().transpose(-1, -2)  # (B, Hkv, R, S)
    bound = D * 2.0**-22 * (rows.double().abs() @ k.double().abs().transpose(-1, -2))
    fast, slow = model.attention_scores(rows, k), model.upcast_scores(rows, k)
    compiled = torch.compile(model.attention_scores, backend="inductor", fullgraph=True)(rows, k)
    assert fast.dtype == slow.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(fast, model.half_scores(rows, k), rtol=0, atol=0)  # the dispatch took the half path
    for scores in (fast, slow, compiled):
        assert ((scores.double() - exact).abs() <= bound).all()
    print(dtype, "half vs upcast, max |diff|:", (fast - slow).abs().max().item(), "max bound:", bound.max().item())
