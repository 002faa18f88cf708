"""The Triton kernels (fast/kernels.py) against their torch twins, and the fast model's paths that
use them (fast.enable + fast.KVCache) against the reference model and cache. With no GPU they run
in Triton's interpreter (tests/conftest.py): the same kernel code, on the CPU, in fp32. The GPU run
(-m gpu) repeats them in bf16 on CUDA."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import cache as cache_mod
import fast
import policies
from fast import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OLD_INTERPRETER = (DEVICE == "cpu" and kernels.triton is not None
                   and tuple(int(x) for x in kernels.triton.__version__.split(".")[:2]) < (3, 7))
pytestmark = [pytest.mark.skipif(kernels.triton is None, reason="needs triton (pip install triton)"),
              pytest.mark.skipif(OLD_INTERPRETER, reason="Triton's interpreter before 3.7 cannot run loops with"
                                 " runtime bounds under numpy >= 2.4: pip install 'triton>=3.7' (CUDA runs any)")]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ATOL = 2e-2 if DEVICE == "cuda" else 1e-5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4]),
       S=st.integers(1, 300), D=st.sampled_from([16, 32, 64]), keep=st.floats(0.0, 1.0),
       merge=st.sampled_from([None, True, False]))
def test_decode_attention_equals_the_explicit_softmax(seed, B, Hkv, G, S, D, keep, merge):
    """One pass over the keys, split across programs and combined (by the split pass's last program, or
    by a kernel after it), gives the explicit softmax's output and probabilities, for any key count
    (splits partly or wholly masked included), call after call (the merge's counts go back to 0)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv, G, 1, D, generator=g).to(DEVICE, DTYPE)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    mask = torch.rand(B, Hkv, 1, S, generator=g) < keep
    mask[..., torch.randint(0, S, (1,), generator=g)] = True  # a row always sees its own slot
    mask = mask.to(DEVICE)
    out, probs = kernels.decode_attention(q, k, v, mask, merge=merge)
    ref_out, ref_probs = kernels.decode_attention_reference(q, k, v, mask)
    assert out.dtype == v.dtype and probs.dtype == torch.float32
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=ATOL / 10)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=ATOL)
    assert (probs[~mask[:, :, None].expand_as(probs)] == 0).all()
    out_only, none = kernels.decode_attention(q, k, v, mask, need_probs=False, merge=merge)  # unscored policies
    assert none is None and torch.equal(out_only, out)
    if merge is not False:
        assert not kernels._counts(q.device, B * Hkv).any()  # every count back to 0


def projected_row(g, B, Hkv, G, D):
    """A decode step's q (B, Hkv, G, 1, D), k, v (B, Hkv, 1, D): strided views into one projected row, as
    model.Attention.heads makes them."""
    qkv = torch.randn(B, 1, (Hkv * G + 2 * Hkv) * D, generator=g).to(DEVICE, DTYPE)
    q = qkv[..., :Hkv * G * D].view(B, 1, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, 1, D), strided
    k = qkv[..., Hkv * G * D:(Hkv * G + Hkv) * D].view(B, 1, Hkv, D).transpose(1, 2)  # (B, Hkv, 1, D)
    v = qkv[..., (Hkv * G + Hkv) * D:].view(B, 1, Hkv, D).transpose(1, 2)
    return q, k, v


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4]),
       S=st.integers(1, 300), D=st.sampled_from([16, 32, 64]), window=st.sampled_from([0, 1, 7, 100]),
       slot=st.sampled_from(["given", "full", "found"]), block_s=st.sampled_from([None, 16, 128]),
       held=st.sampled_from([0.7, 1.0]))
def test_append_step_equals_rotary_the_cache_write_and_the_mask(seed, B, Hkv, G, S, D, window, slot, block_s, held):
    """The decode step's new token through kernels.append_step against the reference written out here:
    model.apply_rotary on q and k, element by element writes into the slots, and cache.Call.mask's
    closed form (held, at or before the row's position, inside the window; the own slot always). q, k,
    v are views into one projected row (as model.Attention.heads makes them); the slot is each head's
    own (evicting policies), the position itself broadcast over heads (`full`), or found by the kernel
    (the lowest free slot; slot 0 when every slot is held); the position may be
    older than held keys (so the mask drops them) or negative (left padding: stored, not held); the mask
    in one program a row or in blocks of slots (block_s)."""
    import model
    g = torch.Generator().manual_seed(seed)
    q, k, v = projected_row(g, B, Hkv, G, D)
    positions = torch.randint(-2, 2 * S, (B, 1), generator=g).to(DEVICE)
    if slot == "full":
        positions = torch.randint(0, S, (B, 1), generator=g).to(DEVICE)
        slots = positions[:, None, :].expand(B, Hkv, 1)
    elif slot == "given":
        slots = torch.randint(0, S, (B, Hkv, 1), generator=g).to(DEVICE)
    else:
        slots = None
    angles = model.rotary_angles(positions, model.Config(dim=D, n_heads=1, n_kv_heads=1, rope_theta=500.0))
    cache_k, cache_v = (torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    cache_pos = torch.randint(-1, 2 * S, (B, Hkv, S), generator=g).to(DEVICE)
    cache_valid = (torch.rand(B, Hkv, S, generator=g) < held).to(DEVICE)
    want = [t.clone() for t in (cache_k, cache_v, cache_pos, cache_valid)]
    twin = [t.clone() for t in want]
    q_rot, mask, slots_used = kernels.append_step(q, k, v, angles, slots, positions, cache_k, cache_v, cache_pos, cache_valid,
                                      window, block_s)
    cos, sin = angles  # (B, 1, 1, D)
    q_want, k_rot = model.apply_rotary(q, cos[:, :, None], sin[:, :, None]), model.apply_rotary(k, cos, sin)
    mask_want = torch.zeros(B, Hkv, 1, S, dtype=torch.bool)
    for b in range(B):
        p = int(positions[b, 0])
        for h in range(Hkv):
            free = [j for j in range(S) if not want[3][b, h, j]]
            s = int(slots[b, h, 0]) if slots is not None else (free[0] if free else 0)
            assert int(slots_used[b, h, 0]) == s
            want[0][b, h, s], want[1][b, h, s], want[2][b, h, s], want[3][b, h, s] = k_rot[b, h, 0], v[b, h, 0], p, p >= 0
            for j in range(S):
                held, kp = bool(want[3][b, h, j]), int(want[2][b, h, j])
                mask_want[b, h, 0, j] = (held and kp <= p and (not window or kp > p - window)) or j == s
    assert q_rot.shape == q.shape and q_rot.dtype == q.dtype and mask.shape == (B, Hkv, 1, S) and mask.dtype == torch.bool
    torch.testing.assert_close(q_rot, q_want, rtol=1.6e-2 if DEVICE == "cuda" else 1e-6, atol=ATOL / 10)
    torch.testing.assert_close(cache_k, want[0], rtol=1.6e-2 if DEVICE == "cuda" else 1e-6, atol=ATOL / 10)
    assert torch.equal(cache_v, want[1]) and torch.equal(cache_pos, want[2]) and torch.equal(cache_valid, want[3])
    assert torch.equal(mask.cpu(), mask_want)
    # the twin (append_step_reference), from the same cache, writes the same and gives the same
    q_twin, mask_twin, slots_twin = kernels.append_step_reference(q, k, v, angles, slots, positions, *twin, window)
    assert torch.equal(slots_twin, slots_used) and torch.equal(mask_twin, mask)
    assert all(torch.equal(a, b) for a, b in zip(twin, want))
    torch.testing.assert_close(q_twin, q_rot, rtol=1.6e-2 if DEVICE == "cuda" else 1e-6, atol=ATOL / 10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4]),
       S=st.integers(1, 300), D=st.sampled_from([16, 32, 64]), window=st.sampled_from([0, 7, 100]),
       slot=st.sampled_from(["given", "found"]), held=st.sampled_from([0.7, 1.0]), need_probs=st.booleans())
def test_append_attention_equals_the_append_then_the_attention(seed, B, Hkv, G, S, D, window, slot, held, need_probs):
    """append_step and decode_attention in one kernel (kernels.append_attention): the same cache writes,
    mask and slots as the append's twin, then the same output and probabilities as the explicit softmax over
    the cache it wrote (kernels.append_attention_reference), though every program reads the cache before
    the token is written (the split holding the slot attends to it from registers); over many splits
    (S up to 300 keys), the slot given or found, the position older than held keys or negative; and the new
    value's L1 norm (VATP's nu) where asked."""
    import model
    g = torch.Generator().manual_seed(seed)
    q, k, v = projected_row(g, B, Hkv, G, D)
    positions = torch.randint(-2, 2 * S, (B, 1), generator=g).to(DEVICE)
    slots = torch.randint(0, S, (B, Hkv, 1), generator=g).to(DEVICE) if slot == "given" else None
    angles = model.rotary_angles(positions, model.Config(dim=D, n_heads=1, n_kv_heads=1, rope_theta=500.0))
    cache = [torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, DTYPE) for _ in range(2)]
    cache += [torch.randint(-1, 2 * S, (B, Hkv, S), generator=g).to(DEVICE),
              (torch.rand(B, Hkv, S, generator=g) < held).to(DEVICE)]
    twin = [t.clone() for t in cache]
    assert kernels.join_fits(G, S, D, B * Hkv)
    config = kernels.decode_config(S, B * Hkv, G)
    config[:2] = [16, 16]  # 16 keys a program: up to 19 splits
    out, probs, mask, slots_used, nu = kernels.append_attention(q, k, v, angles, slots, positions, *cache, window,
                                                                need_probs, config, value_l1=need_probs)
    ref_out, ref_probs, ref_mask, ref_slots, _ = kernels.append_attention_reference(q, k, v, angles, slots, positions,
                                                                                    *twin, window)
    if need_probs:  # the values' L1 norm: VATP's nu as policies.token_state starts it
        want = policies.token_state(policies.make_policy("vatp", 8), k, v)["nu"]
        torch.testing.assert_close(nu, want, rtol=1e-6, atol=1e-6 if DEVICE == "cpu" else 1e-4)
    else:
        assert nu is None
    assert torch.equal(slots_used, ref_slots) and torch.equal(mask, ref_mask)
    assert torch.equal(cache[1], twin[1]) and torch.equal(cache[2], twin[2]) and torch.equal(cache[3], twin[3])
    torch.testing.assert_close(cache[0], twin[0], rtol=1.6e-2 if DEVICE == "cuda" else 1e-6, atol=ATOL / 10)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=ATOL)
    if need_probs:
        torch.testing.assert_close(probs, ref_probs, rtol=0, atol=ATOL / 10)
    else:
        assert probs is None
    assert not kernels._counts(q.device, B * Hkv).any()  # every count back to 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 3]),
       T=st.integers(1, 200), D=st.sampled_from([16, 32]),
       policy_name=st.sampled_from(["h2o", "a2sf", "tova", "snapkv", "vatp"]), split=st.booleans())
def test_column_sums_equal_the_explicit_probabilities_summed(seed, B, Hkv, G, T, D, policy_name, split):
    """Eq. (1) of fast/kernels.py from the row log-sum-exps, block by block (zero-weight row blocks
    skipped), against the T x T probabilities summed down the columns; the kernel's one loop, or its
    split loop (the weight in the exponent, the mask on the diagonal's tiles only)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv, G, T, D, generator=g).to(DEVICE, DTYPE)
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    _, lse = kernels.causal_attention_lse_reference(q, k, v)
    q_pos = torch.arange(T, device=DEVICE).expand(B, T)
    w = policies.row_weights(policies.make_policy(policy_name, max(T // 2, 8) if policy_name != "a2sf" else 4),
                             q_pos, q_pos.amax(-1))
    sums = kernels.column_sums(q, k, lse, w, split_loop=split)
    ref = kernels.column_sums_reference(q, k, lse, w)
    torch.testing.assert_close(sums, ref, rtol=1e-3 if DEVICE == "cuda" else 1e-5, atol=ATOL / 10)
    if policy_name == "h2o":  # every row's probabilities sum to 1, so the columns hold T per query head
        torch.testing.assert_close(sums.sum(-1), torch.full_like(sums[..., 0], float(G * T)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("config", getattr(kernels, "COLUMN_SUMS_CONFIGS", []))
def test_column_sums_under_every_launch_config_the_autotuner_may_pick(config, split):
    """Each of COLUMN_SUMS_CONFIGS (the autotuner picks among them from TUNE_FROM rows on; tuning
    itself needs CUDA), forced, against the explicit twin: block sizes that differ for rows and keys,
    a length that is no multiple of any block, and weights of any pattern: zeros scattered through
    the rows, a leading run of zeros (padding; the rows before the first nonzero are skipped), and a
    sequence where no row weighs (all its columns 0); the kernel's one loop and its split loop."""
    g = torch.Generator().manual_seed(7)
    B, Hkv, G, T, D = 3, 2, 2, 150, 32
    q = torch.randn(B, Hkv, G, T, D, generator=g).to(DEVICE, DTYPE)
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    _, lse = kernels.causal_attention_lse_reference(q, k, v)
    w = torch.rand(B, T, generator=g) * (torch.rand(B, T, generator=g) < 0.7)  # zeros anywhere
    w[0, :70], w[0, 70], w[0, -1] = 0, 0.5, 1.0  # the first nonzero row inside the second block of any size
    w[2] = 0  # no row weighs
    w = w.to(DEVICE)
    sums = kernels.column_sums(q, k, lse, w, config=config, split_loop=split)
    ref = kernels.column_sums_reference(q, k, lse, w)
    torch.testing.assert_close(sums, ref, rtol=1e-3 if DEVICE == "cuda" else 1e-5, atol=ATOL / 10)
    assert (sums[2] == 0).all() and (sums[0, :, 70:] > 0).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), N=st.integers(1, 90), K=st.integers(1, 300), norm=st.booleans(),
       bias=st.booleans(), residual=st.booleans(), glu=st.booleans(), config=st.integers(0, 100))
def test_linear_rows_equals_norm_matmul_and_epilogue(seed, N, K, norm, bias, residual, glu, config):
    """Eq. (2) of fast/kernels.py in one kernel, under any launch config the autotuner may pick,
    against model.RMSNorm, F.linear, silu(gate) * up and the residual add run one after another:
    widths no multiple of a block, each part on or off."""
    config, M = kernels.ROW_CONFIGS[config % len(kernels.ROW_CONFIGS)], 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(2 * N if glu else N, K, generator=g) / math.sqrt(K)).to(DEVICE, DTYPE)
    b = torch.randn(w.shape[0], generator=g).to(DEVICE, DTYPE) if bias else None
    gain = (torch.rand(K, generator=g) + 0.5).to(DEVICE, DTYPE) if norm else None
    res = torch.randn(M, N, generator=g).to(DEVICE, DTYPE) if residual else None
    out = kernels.linear_rows(x, w, b, gain, 1e-5, res, glu, config=config)
    ref = kernels.linear_rows_reference(x, w, b, gain, 1e-5, res, glu)
    assert out.shape == (M, N) and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-5 if DEVICE == "cpu" else 2e-2, atol=ATOL / 10)
    if norm:  # the norm is taken over each row: scaling a row leaves its normed projection as it was (eps 0)
        once, scaled = (kernels.linear_rows(a, w, b, gain, 0.0, res, glu, config=config) for a in (x, x * 4))
        torch.testing.assert_close(scaled.float(), once.float(), rtol=1e-5 if DEVICE == "cpu" else 2e-2, atol=ATOL / 10)


def test_kernels_under_torch_compile_launch_through_their_custom_ops():
    """Under torch.compile the launches go through custom ops (kernels.launch_op: dynamo leaves them opaque,
    so launch options such as programmatic dependent launch reach Triton): the compiled calls take the ops
    and give the twins' results, the fake shapes matching the real ones (fullgraph: no break)."""
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(1, 1, 40, generator=g).to(DEVICE, DTYPE), torch.randn(1, 1, 24, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(48, 40, generator=g) / 7).to(DEVICE, DTYPE)
    gain = (torch.rand(40, generator=g) + 0.5).to(DEVICE, DTYPE)
    q = torch.randn(1, 2, 3, 1, 16, generator=g).to(DEVICE, DTYPE)
    k, v = (torch.randn(1, 2, 70, 16, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    mask = (torch.rand(1, 2, 1, 70, generator=g) < 0.6).to(DEVICE)
    mask[..., 0] = True
    traced = []

    def backend(gm, inputs):  # what dynamo captured, then run as captured
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    cache = [torch.zeros(1, 2, 8, 16, device=DEVICE, dtype=DTYPE) for _ in range(2)]
    cache += [torch.full((1, 2, 8), -1, device=DEVICE), torch.zeros(1, 2, 8, dtype=torch.bool, device=DEVICE)]
    positions = torch.tensor([[3]], device=DEVICE)
    angles = (torch.ones(1, 1, 1, 16, device=DEVICE), torch.zeros(1, 1, 1, 16, device=DEVICE))  # no turn

    def step(x, r, q, k, v, mask):
        new = kernels.append_step(q, k[:, :, :1], v[:, :, :1], angles, positions[:, None].expand(1, 2, 1), positions,
                                  *cache)[:2]
        found = kernels.append_step(q, k[:, :, :1], v[:, :, :1], angles, None, positions, *cache)[2]  # the lowest free: 0
        joined = kernels.append_attention(q, k[:, :, 1:2], v[:, :, 1:2], angles, None, positions + 1, *cache)  # slot 1
        return (kernels.linear_rows(x, w, None, gain, 1e-5, r, glu=True), *kernels.decode_attention(q, k, v, mask), *new,
                found, joined)
    torch._dynamo.reset()
    rows, out, probs, q_new, mask_new, found, joined = torch.compile(step, backend=backend, fullgraph=True)(x, r, q, k, v,
                                                                                                         mask)
    assert {"kv_fast.linear_rows", "kv_fast.decode_attention", "kv_fast.append_step",
            "kv_fast.append_attention"} <= set(traced)
    # the joined call: slot 1 found (0 and 3 held, at position 3); it sees those two and its own (position 4), and
    # attends over them as the explicit softmax does over the cache it wrote
    j_out, j_probs, j_mask, j_slots, _ = joined
    assert j_slots.shape == (1, 2, 1) and (j_slots == 1).all() and torch.equal(cache[2][0, :, 1], (positions[0] + 1).expand(2))
    assert j_mask[0, :, 0].tolist() == [[True, True, False, True] + [False] * 4] * 2
    ref_out, ref_probs = kernels.decode_attention_reference(q, cache[0], cache[1], j_mask)
    torch.testing.assert_close(j_probs, ref_probs, rtol=0, atol=ATOL / 10)
    torch.testing.assert_close(j_out.float(), ref_out.float(), rtol=0, atol=ATOL)
    assert torch.equal(q_new, q) and torch.equal(cache[1][:, :, 3], v[:, :, 0])
    assert torch.equal(cache[2][0, :, 3], positions[0].expand(2))
    assert mask_new[..., 3].all() and not mask_new[..., :3].any() and cache[3][..., 3].all()  # only its own slot
    assert found.shape == (1, 2, 1) and not found.any() and cache[3][..., 0].all()  # then slot 0, found
    assert not any("triton" in t for t in traced)  # no kernel traced into: each launch is its op's
    assert rows.shape == (1, 1, 24) and out.shape == (1, 2, 3, 1, 16) and probs.shape == (1, 2, 3, 1, 70)
    torch.testing.assert_close(rows.float(), kernels.linear_rows_reference(x, w, None, gain, 1e-5, r, True).float(),
                               rtol=1e-5 if DEVICE == "cpu" else 2e-2, atol=ATOL / 10 if DEVICE == "cpu" else ATOL)
    ref_out, ref_probs = kernels.decode_attention_reference(q, k, v, mask)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=ATOL / 10)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("N,K,glu", [(12288, 4096, False), (4096, 4096, False), (11008, 4096, True),
                                     (4096, 11008, False), (32000, 4096, False), (960, 576, False), (576, 576, False),
                                     (1536, 576, True), (576, 1536, False), (49152, 576, False), (1, 1, False)])
def test_row_config_picks_one_of_the_configs_the_tests_run(N, K, glu):
    """linear_rows' default launch (row_config) is one of ROW_CONFIGS, each of which the hypothesis test
    above runs against the twin: the 7B and SmolLM2 matrices of scripts/rows_probe.py and a 1 x 1."""
    assert kernels.row_config(N, K, glu) in kernels.ROW_CONFIGS


def test_rows_apply_only_to_plain_linears_and_a_few_rows(monkeypatch):
    """The fused block runs only where linear_rows may: one new token of one sequence, and
    plain nn.Linear
    projections (tp.RowParallelLinear all-reduces after its matmul, which the fused block would skip)."""
    from fast import model as fast_model
    monkeypatch.setattr(kernels, "available", lambda x: True)

    class AllReduced(torch.nn.Linear):
        pass
    plain, other = torch.nn.Linear(4, 4), AllReduced(4, 4)
    assert fast_model.rows_apply(torch.zeros(1, 1, 4), plain, plain)
    assert not fast_model.rows_apply(torch.zeros(1, 1, 4), plain, other)
    assert not fast_model.rows_apply(torch.zeros(2, 1, 4), plain)  # two sequences: a matmul's work
    assert not fast_model.rows_apply(torch.zeros(1, 2, 4), plain)  # a prompt's rows: a matmul's work
    monkeypatch.setattr(fast_model, "ROWS", False)
    assert not fast_model.rows_apply(torch.zeros(1, 1, 4), plain)


def test_the_lse_twin_is_the_fused_causal_attention():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 3, 17, 16, generator=g)
    k, v = torch.randn(2, 2, 17, 16, generator=g), torch.randn(2, 2, 17, 16, generator=g)
    out, lse = kernels.causal_attention_lse_reference(q, k, v)
    fused = F.scaled_dot_product_attention(q.reshape(2, 6, 17, 16), k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, fused.view(2, 2, 3, 17, 16), rtol=0, atol=1e-5)
    s = (q @ k[:, :, None].transpose(-1, -2)) / math.sqrt(16)
    assert torch.allclose(lse[..., 0], s[..., 0, 0], atol=1e-6)  # row 0 sees only key 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Hkv,G,D", [(3, 3, 64), (8, 4, 128), (4, 1, 64)])
def test_fused_lse_with_grouped_keys_equals_the_explicit_softmax_on_cuda(Hkv, G, D):
    """kernels.causal_attention_lse hands cuDNN the group's keys unexpanded (grouped queries): the same
    output and log-sum-exp as the explicit twin, SmolLM2's and a grouped 7B-like shape, bf16."""
    g = torch.Generator().manual_seed(G)
    q = torch.randn(2, Hkv, G, 300, D, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(2, Hkv, 300, D, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    out, lse = kernels.causal_attention_lse(q, k, v)
    ref_out, ref_lse = kernels.causal_attention_lse_reference(q, k, v)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-2)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=2e-2)


def twins(dtype=None):
    """The reference tiny model on DEVICE and its fast twin (fast.enable on a copy)."""
    ref = tiny_model("tiny-llama", dtype=dtype or DTYPE).to(DEVICE)
    return ref, fast.enable(copy.deepcopy(ref))


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """On the CPU, route the fast model's paths through the kernels as on CUDA: the decode kernel
    (interpreted) for every one-row call, and the prompt's twin with column_sums (interpreted) and
    the log-sum-exp twin for scored policies; on CUDA nothing to change."""
    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "available", lambda x: True)
        # the real rule, less its device and dtype: Eq. (1) is a sum, so gqa='max' with groups stays off
        monkeypatch.setattr(kernels, "prefill_available",
                            lambda device, dtype, policy, cfg: policy.gqa == "sum" or cfg.group == 1)
        monkeypatch.setattr(kernels, "causal_attention_lse", kernels.causal_attention_lse_reference)


# budget 10 evicts (prompt and decode steps); 64 evicts nothing. On CUDA in bf16 a near-tie of
# scores may break the other way, so there the scored policies run only at 64, the state compared.
# (policy, budget, join, start_in_evict): the append kernel joined to the attention's (fast.model.JOIN) for
# every policy, and apart for two; the new token's state started by start_state (fast.cache.START_IN_EVICT off)
# for two, joined (the slot then known only once the kernel has found it)
MODEL_CASES = [(p, 64 if p == "full" or (DEVICE == "cuda" and p not in ("sink", "random")) else 10, True, True)
               for p in ("h2o", "a2sf", "vatp", "tova", "snapkv", "h2o_mean", "sink", "random", "full")]
MODEL_CASES += [(p, b, False, True) for p, b, _, _ in MODEL_CASES if p in ("h2o", "full")]
MODEL_CASES += [(p, b, True, False) for p, b, _, _ in MODEL_CASES[:3] if p in ("a2sf", "vatp")]


@pytest.mark.parametrize("policy_name,budget,join,start_in_evict", MODEL_CASES)
def test_model_fast_paths_with_kernels_equal_the_reference(kernels_on_cpu, monkeypatch, policy_name, budget, join,
                                                           start_in_evict):
    """A prompt (prefill mode: the prompt's twin with the fused causal attention and column sums,
    rank_prompt) then decode steps (the append kernel and the decode kernel, joined in one or apart, the
    fused projections of fast.model.Block, evict_one, full's slot by position) on the
    fast path, against the reference model and cache (explicit softmax or SDPA, keep_top): the
    same logits, the same policy state, and the same tokens kept in every layer and head after
    every call."""
    monkeypatch.setattr(fast.model, "JOIN", join)
    monkeypatch.setattr(fast.cache, "START_IN_EVICT", start_in_evict)
    calls = {"decode_attention": 0, "column_sums": 0, "linear_rows": 0, "append_step": 0, "append_attention": 0}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    ref, m = twins()
    prompt = 16
    budget = None if policy_name == "full" else budget
    p = policies.make_policy(policy_name, budget)
    batch = 1 if policy_name in ("a2sf", "sink", "full", "snapkv") else 2  # one sequence: the fused projections
    tokens = torch.randint(0, 128, (batch, prompt + 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    caches = [kind(m.cfg, p, budget, batch=batch, mode="prefill", device=DEVICE, dtype=DTYPE)
              for kind in (fast.KVCache, cache_mod.KVCache)]
    kept = [[], []]
    with torch.no_grad():
        outs = [[], []]
        for s, e in [(0, prompt)] + [(i, i + 1) for i in range(prompt, prompt + 12)]:
            for i, (model_, c) in enumerate(zip((m, ref), caches)):
                outs[i].append(model_(tokens[:, s:e], c))
                kept[i].append([c.kept_positions(layer) for layer in range(m.cfg.n_layers)])
    fast_out, slow_out = (torch.cat(o, dim=1) for o in outs)
    torch.testing.assert_close(fast_out.float(), slow_out.float(), rtol=0, atol=1e-4 if DEVICE == "cpu" else 0.1)
    # every decode step of every layer took the decode kernel and entered the cache through the append kernel
    steps = 12 * m.cfg.n_layers
    assert (calls["append_attention"], calls["decode_attention"], calls["append_step"]) == ((steps, 0, 0) if join else
                                                                                          (0, steps, steps))
    # one sequence: the fused projections too, the output layer's included (two: the block's reference path)
    assert calls["linear_rows"] == (12 * (4 * m.cfg.n_layers + 1) if batch == 1 else 0)
    assert calls["column_sums"] == (1 if p.scored else 0)  # the prompt took the twin: one launch for all its layers
    assert kept[0] == kept[1]
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert a.state.keys() == b.state.keys()
        for name in a.state:  # the same tokens hold the same state (slot order may differ)
            sa, sb = (torch.where(x.valid, x.state[name], 0).gather(-1, torch.where(x.valid, x.pos, 1 << 30).argsort(-1))
                      for x in (a, b))
            torch.testing.assert_close(sa, sb, rtol=1e-4 if DEVICE == "cpu" else 2e-2, atol=1e-5 if DEVICE == "cpu" else 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Hkv,G,D,S", [(32, 1, 128, 1024), (32, 1, 128, 4000), (3, 3, 64, 1024), (8, 4, 128, 2500)])
def test_merge_in_the_split_pass_equals_the_explicit_softmax_call_after_call_on_cuda(Hkv, G, D, S):
    """The split pass's last program merges (kernels.MERGE_ELEMENTS): on a GPU its programs run at once, so
    this is where the count's ordering is tested. 50 calls back to back on new data, each against the
    explicit twin, on the 7B's and SmolLM2's shapes (grouped queries too) and up to 63 splits."""
    g = torch.Generator(device="cuda").manual_seed(S)
    for _ in range(50):
        q = torch.randn(1, Hkv, G, 1, D, generator=g, device="cuda").to(torch.bfloat16)
        k, v = (torch.randn(1, Hkv, S, D, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
        mask = torch.rand(1, Hkv, 1, S, generator=g, device="cuda") < 0.9
        mask[..., -1] = True
        out, probs = kernels.decode_attention(q, k, v, mask, merge=True)
        ref_out, ref_probs = kernels.decode_attention_reference(q, k, v, mask)
        torch.testing.assert_close(probs, ref_probs, rtol=0, atol=2e-3)
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=2e-2)
    assert not kernels._counts(q.device, Hkv).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("policy_name", ["h2o", "a2sf"])
def test_autotuned_column_sums_equal_the_explicit_ones_on_cuda(policy_name, split):
    """From kernels.TUNE_FROM rows on, column_sums launches the autotuner's pick (it times every
    config on the device first): the same sums as the explicit twin, for every row weighing (h2o)
    and for A2SF's, whose old rows weigh 0 and are skipped. bf16 inputs, fp32 sums."""
    g = torch.Generator().manual_seed(11)
    B, Hkv, G, T, D = 1, 2, 2, kernels.TUNE_FROM + 77, 64
    q = torch.randn(B, Hkv, G, T, D, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    _, lse = kernels.causal_attention_lse(q, k, v)
    q_pos = torch.arange(T, device="cuda").expand(B, T)
    w = policies.row_weights(policies.make_policy(policy_name, 512), q_pos, q_pos.amax(-1))
    sums = kernels.column_sums(q, k, lse, w, split_loop=split)
    assert kernels._column_sums_tuned.best_config is not None  # the tuned launch ran
    torch.testing.assert_close(sums, kernels.column_sums_reference(q, k, lse, w), rtol=1e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy_name", ["h2o", "a2sf", "vatp", "sink", "full"])
def test_compiled_step_with_the_decode_kernel_equals_eager_on_cuda(policy_name):
    """The decode kernel (and, for one sequence, the fused projections) inside the compiled,
    graph-captured step (fast.compile_decode, bf16) against the reference model's eager step
    (inductor fuses the bf16 roundings differently: 2e-2 apart measured, as test_fast allows)."""
    torch._dynamo.reset()
    ref, m = twins(torch.bfloat16)
    budget = None if policy_name == "full" else 12
    p = policies.make_policy(policy_name, budget)
    B = 1 if policy_name in ("a2sf", "full") else 2  # one sequence: the fused projections (linear_rows) compiled too
    tokens = torch.randint(0, 128, (B, 40), generator=torch.Generator().manual_seed(7)).cuda()
    slow = cache_mod.KVCache(m.cfg, p, budget, batch=B, device="cuda", dtype=torch.bfloat16, max_len=48)
    quick = fast.KVCache(m.cfg, p, budget, batch=B, device="cuda", dtype=torch.bfloat16, max_len=48)
    with torch.no_grad():
        for i in range(24):
            ref(tokens[:, i:i + 1], slow), m(tokens[:, i:i + 1], quick)
        step = fast.compile_decode(m, quick)
        assert isinstance(step, fast.CudaGraphStep)
        for i in range(24, 40):
            # one sequence: the fused projections keep the normed row in fp32 where the reference rounds it to
            # bf16 first (measured 0.051 apart at 1 of 128 logits, a2sf), so a few bf16 steps more apart
            torch.testing.assert_close(step(tokens[:, i:i + 1].clone()), ref(tokens[:, i:i + 1], slow), rtol=0,
                                       atol=5e-2 if B > 1 else 8e-2)
