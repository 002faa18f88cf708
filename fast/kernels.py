"""Triton kernels for the scored policies' fast paths on CUDA, each beside its slow twin in torch.

Fused attention kernels never write the attention probabilities, and the scored policies (H2O,
A2SF, VATP, TOVA, SnapKV) need them. The explicit path (model.attend) builds them as a (rows x
keys) fp32 tensor and pays for it twice:

- In the decode step, with one new row per sequence, the explicit path is three kernels and a
  multi-pass softmax. `decode_attention` makes one pass over the keys, split across programs
  (flash-decoding, Dao et al. 2023): each program computes its keys' scores, writes them, and
  keeps the online-softmax statistics (running max m, sum l) and a partial output (Milakov &
  Gimelshein 2018; FlashAttention, Dao et al. 2022, Alg. 1). `_combine_kernel` merges the
  splits (one program per query row), and the probabilities are exp(s - m) / l of the written
  scores: one more pass over (G, S) floats, not over the keys.
- In the prefill of a T-token prompt, the score update is, for every key j (policies.row_update),
      u[g, j] = sum_{q >= j} w[q] sum_{h in G(g)} softmax_j(q_h . k_j / sqrt(D))       (1)
  The explicit path holds T x T probabilities, in row chunks. `causal_attention_lse` takes each
  row's log-sum-exp from a fused causal kernel (so p[q, j] = exp(s[q, j] - lse[q])), then
  `column_sums` (`_column_sums_kernel`) recomputes the scores block by block and sums (1) down the
  columns. No T x T buffer: memory O(T). The rows before a sequence's first row of nonzero
  weight are skipped (A2SF's alpha^(t - q) underflows after ~60 rows; TOVA and SnapKV weigh only
  the last rows; left padding weighs 0). From TUNE_FROM rows on, Triton's autotuner picks the
  block sizes and warps among COLUMN_SUMS_CONFIGS on the device itself.

The twins (`decode_attention_reference`, `column_sums_reference`,
`causal_attention_lse_reference`) are the explicit formulas. The tests hold each kernel equal to
its twin: on the CPU through Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py sets it
when there is no GPU), and on CUDA with -m gpu. The measurements behind the choices below are in
results/kernel_probe_decode_h100.log and results/prefill_probe_h100.log (scripts/kernel_probe.py).

The kernels take keys and values contiguous per KV head, (B*Hkv, S, D), as the cache stores them.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch paths need no Triton
    triton = None

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernels work in base 2


def available(x: torch.Tensor) -> bool:
    """Whether the model's fast paths call the kernels for tensors like x: Triton present and x on
    CUDA in bf16 / fp16. (The tests call the kernels directly on the CPU, in Triton's interpreter.)"""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


# Programmatic dependent launch (compute capability 9.0 on: the CUDA C++ Programming Guide, "Programmatic
# Dependent Launch and Synchronization"). A kernel launched with it may start while the kernel before it
# in the stream still runs. Each of this file's decode-step kernels first waits for the one before it to
# finish, its writes visible (gdc_wait), before it reads or writes anything that kernel may touch, then
# lets the next one start (gdc_launch_dependents): so a kernel that starts has every kernel before the one
# before it finished, what inductor's PDL kernels (fast.step) assume too. What comes before the wait
# overlaps the previous kernel's tail: a program's start, and in linear_rows without SwiGLU the first tile
# of weights (nothing writes them). None: on where the device has it; False: never (bench.py --no-pdl). Under
# torch.compile the launches go through custom ops (launch_op), which dynamo leaves opaque, as it must
# for the launch attribute to reach Triton's launcher.
PDL: bool | None = None


def pdl(device) -> bool:
    """Whether kernel launches on `device` use programmatic dependent launch (see PDL)."""
    device = torch.device(device)
    return PDL is not False and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(x: torch.Tensor) -> dict:
    """Triton's launch options for x's kernels: launch_pdl only where it is on (the interpreter takes none)."""
    return {"launch_pdl": True} if pdl(x.device) else {}


def launch_op(op, eager):
    """What calls a launch: under torch.compile the custom op `op` (dynamo does not trace into it, so
    the launch runs as written, its launch options included), else the plain function `eager` (the
    same code, without the dispatcher's cost on an eager step)."""
    return op if torch.compiler.is_compiling() else eager


# -- decode: one row per sequence --------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, MASK, SCORES, M_PART, L_PART, ACC_PART, COUNT, OUT, M_OUT, L_OUT,
                       S, n_split, scale_log2: tl.constexpr,
                       G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                       SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_SCORES: tl.constexpr, MERGE: tl.constexpr,
                       G_P2: tl.constexpr, N_PAD: tl.constexpr, PDL: tl.constexpr,
                       K_NEW, V_NEW, COS, SIN, SLOTS, QPOS, POS, VALID, SLOT_OUT, NU_OUT, Hkv, window,
                       sq_b, sq_h, sq_g, sk_b, sk_h, sv_b, sv_h, sc_b, ss_b, ss_h,
                       APPEND: tl.constexpr, FIND_SLOT: tl.constexpr, BLOCK_S: tl.constexpr, VALUE_L1: tl.constexpr):
        """One program: one KV head of one sequence (its G query heads) over keys
        [split * SPLIT, (split + 1) * SPLIT). Q (B*Hkv, G, D); K, V (B*Hkv, S, D); MASK (B*Hkv, S);
        writes SCORES (B*Hkv, G, S) in log2 units (-inf where masked) if WRITE_SCORES, and per split
        the running max M_PART, sum L_PART (B*Hkv, G, n_split) and unnormalised output ACC_PART
        (.., n_split, D). PDL: launched with programmatic dependent launch (see PDL).
        MERGE: the last of a KV head's programs to finish merges its splits (_merge_rows, its G rows at
        once, into OUT, M_OUT, L_OUT), instead of a kernel after (_combine_kernel): each program counts
        itself in COUNT (B*Hkv,) int32 (an atomic add, acquire-release: its partial results are visible
        to whoever counts after it), and the one that counts n_split merges and sets the count back to 0
        (the split-K "serial reduction" of GEMM libraries).
        APPEND (with MERGE): the decode step's new token too, as _append_kernel takes it (K_NEW .. ss_h, with Q
        the projected queries by their strides): each program finds or loads the slot, rotates q and the new
        key itself, attends to the new key and value in place of the slot's, and writes its keys' mask into
        MASK; the merging program, which counts after every other program has read the cache, writes the
        token into K, V, POS, VALID (and its slot into SLOT_OUT; with VALUE_L1 its value's L1 norm into NU_OUT
        (B*Hkv,) fp32). One kernel for append_step and this one."""
        if PDL:  # everything it reads the kernels before it wrote (q, the cache, the mask)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        bkv = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        offs_g = tl.arange(0, G_PAD)  # query rows, padded to a tensor-core tile (G_PAD = 1 for G = 1)
        offs_d = tl.arange(0, D)
        g_ok = offs_g < G
        if APPEND:  # the new token's slot, position, rotated query rows, key and value
            b = bkv // Hkv
            h = bkv % Hkv
            p_new = tl.load(QPOS + b)  # its position
            slot = _step_slot(VALID, SLOTS, bkv, b, h, S, ss_b, ss_h, BLOCK_S, FIND_SLOT)
            q, k_new, v_new = _step_rotary(Q, K_NEW, V_NEW, COS, SIN, b, h, sq_b, sq_h, sq_g, sk_b, sk_h, sv_b, sv_h,
                                           sc_b, offs_g[:, None], g_ok[:, None], D)
            q = q.to(K.dtype.element_ty)  # rounded once, as append_step's
            k_new = k_new.to(K.dtype.element_ty)
        else:
            q = tl.load(Q + bkv * G * D + offs_g[:, None] * D + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        if G == 1:
            q = q.to(tl.float32)
        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        for i in range(0, SPLIT // BLOCK_N):
            offs_n = split * SPLIT + i * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < S
            k = tl.load(K + bkv * S * D + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(V + bkv * S * D + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            if APPEND:  # the new token in its slot (written to memory only once every program has read)
                own = (offs_n == slot)[:, None]
                k = tl.where(own, k_new[None, :], k)
                v = tl.where(own, v_new[None, :], v)
                keep = _step_mask(POS, VALID, bkv, S, offs_n, n_ok, p_new, slot, window)
                tl.store(MASK + bkv * S + offs_n, keep.to(tl.uint8), mask=n_ok)
            else:
                keep = tl.load(MASK + bkv * S + offs_n, mask=n_ok, other=0) != 0
            if G == 1:  # one query row (multi-head attention): a product and a sum, no 16-row padded tile
                s = tl.sum(q * k, 1)[None, :] * scale_log2  # (1, BLOCK_N)
            else:
                s = tl.dot(q, tl.trans(k)) * scale_log2  # (G_PAD, BLOCK_N): q . k / sqrt(D), in log2 units
            s = tl.where(keep[None, :], s, float("-inf"))
            if WRITE_SCORES:
                tl.store(SCORES + bkv * G * S + offs_g[:, None] * S + offs_n[None, :], s, mask=g_ok[:, None] & n_ok[None, :])
            m_new = tl.maximum(m, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no keys yet: avoid -inf - -inf
            p = tl.exp2(s - m_ref[:, None])  # (G_PAD, BLOCK_N)
            rescale = tl.exp2(m - m_ref)
            l = l * rescale + tl.sum(p, 1)
            if G == 1:
                acc = acc * rescale[:, None] + tl.sum(tl.trans(p) * v.to(tl.float32), 0)[None, :]  # (1, D)
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)  # (G_PAD, D)
            m = m_new
        part = bkv * G * n_split + offs_g * n_split + split  # (G_PAD,) index into (B*Hkv, G, n_split)
        tl.store(M_PART + part, m, mask=g_ok)
        tl.store(L_PART + part, l, mask=g_ok)
        tl.store(ACC_PART + part[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None])
        if MERGE:
            tl.debug_barrier()  # every thread's partial results stored before the count (which releases them)
            if tl.atomic_add(COUNT + bkv, 1, sem="acq_rel") == n_split - 1:  # the last: all the others' are visible
                _merge_rows(M_PART, L_PART, ACC_PART, OUT, M_OUT, L_OUT, bkv * G, n_split, G, G_P2, D, N_PAD)
                if APPEND:  # every program has read the cache: the new token goes in
                    _step_write(K, V, POS, VALID, bkv, S, slot, p_new, k_new, v_new, offs_d, D)
                    if FIND_SLOT:
                        tl.store(SLOT_OUT + bkv, slot)
                    if VALUE_L1:  # the new value's ||v||_1 in fp32 (VATP's nu: policies.token_state)
                        tl.store(NU_OUT + bkv, tl.sum(tl.abs(v_new.to(tl.float32)), 0))
                tl.store(COUNT + bkv, 0)  # back to 0 for the next call


    @triton.jit
    def _merge_rows(M_PART, L_PART, ACC_PART, OUT, M_OUT, L_OUT, row0, n_split,
                    G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, N_PAD: tl.constexpr):
        """Merges the n_split partial results of query rows row0 .. row0 + G, all at once (FlashAttention's
        rescaling): m = max_i m_i, l = sum_i l_i 2^(m_i - m), out = sum_i acc_i 2^(m_i - m) / l; writes
        out (D,) in OUT's dtype, m and l of each. Its loads bypass the SM's own L1 (.cg): other programs
        wrote the partial results."""
        offs_g = tl.arange(0, G_P2)
        offs_s = tl.arange(0, N_PAD)
        offs_d = tl.arange(0, D)
        rows = row0 + offs_g
        ok = (offs_g < G)[:, None] & (offs_s < n_split)[None, :]  # (G_P2, N_PAD)
        part = rows[:, None] * n_split + offs_s[None, :]
        m_i = tl.load(M_PART + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_i = tl.load(L_PART + part, mask=ok, other=0.0, cache_modifier=".cg")
        acc = tl.load(ACC_PART + part[:, :, None] * D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0,
                      cache_modifier=".cg")  # (G_P2, N_PAD, D)
        m = tl.max(m_i, 1)
        m_ref = tl.where(m == float("-inf"), 0.0, m)  # padding rows: no NaN
        rescale = tl.where(ok, tl.exp2(m_i - m_ref[:, None]), 0.0)  # a split with no keys has m_i = -inf: 0
        l = tl.sum(l_i * rescale, 1)
        out = tl.sum(acc * rescale[:, :, None], 1) / tl.where(l == 0.0, 1.0, l)[:, None]  # (G_P2, D)
        g_ok = offs_g < G
        tl.store(OUT + rows[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=g_ok[:, None])
        tl.store(M_OUT + rows, m, mask=g_ok)
        tl.store(L_OUT + rows, l, mask=g_ok)

    @triton.jit
    def _combine_kernel(M_PART, L_PART, ACC_PART, OUT, M_OUT, L_OUT, n_split,
                        D: tl.constexpr, N_PAD: tl.constexpr, PDL: tl.constexpr):
        """One program: one query row (of B*Hkv*G): _merge_rows."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        _merge_rows(M_PART, L_PART, ACC_PART, OUT, M_OUT, L_OUT, tl.program_id(0).to(tl.int64), n_split, 1, 1, D, N_PAD)


def decode_split(S: int, heads: int) -> int:
    """Keys per program in decode_attention for S keys (of each of `heads` = B * Hkv KV heads):
    64 (the fastest, or within 2% of it, from 257 to 6555 keys with 3 to 32 heads: more programs
    hide more memory latency; results/kernel_probe_decode_h100.log), and more past 16k keys so
    that the merge of the splits (_combine_kernel, one program per row) handles at most 256."""
    return min(1024, max(64, triton.next_power_of_2(-(-S // 256))))


# decode_attention merges its splits in the split pass (its last program a KV head: the G rows' partial
# outputs as one tile of G x splits x D floats, padded to powers of 2) where that tile has at most this many
# floats (a few dozen registers a thread), else in a kernel after it (one program a query row); 0: never.
MERGE_ELEMENTS = 8192


def merge_fits(G: int, n_split: int, D: int) -> bool:
    """Whether decode_attention's split pass merges its splits itself (MERGE_ELEMENTS)."""
    return triton.next_power_of_2(G) * max(2, triton.next_power_of_2(n_split)) * D <= MERGE_ELEMENTS


_COUNTS: dict = {}  # device -> decode_attention's counts (_counts)


def _counts(device, n: int) -> torch.Tensor:
    """(n,) int32 zeros on `device`: the split pass's counts of finished programs (one a KV head), which
    its merging programs set back to 0, so one buffer serves every call (calls on one stream)."""
    have = _COUNTS.get(device)
    if have is None or have.numel() < n:
        _COUNTS[device] = have = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
    return have[:n]


def decode_config(S: int, heads: int, G: int) -> list[int]:
    """decode_attention's launch for S keys of `heads` = B * Hkv KV heads of G query rows each:
    (SPLIT, BLOCK_N, num_warps, num_stages)."""
    SPLIT = decode_split(S, heads)
    # one query row a KV head (G = 1, multi-head attention): 2 warps a program (on the 7B shape, 1k to 8k
    # keys, the four fastest configs all run 2, the fastest 4% to 13% under 4 warps); grouped rows: 4
    # (scripts/decode_probe.py, results/targets_h200x2/decode-probe.log)
    return [SPLIT, min(SPLIT, 64 if G <= 16 else 32), 2 if G == 1 else 4, 3]


def decode_attention(q, k, v, mask, need_probs: bool = True, config=None, merge: bool | None = None):
    """The decode step's attention with its probabilities, one pass over the keys.

    q (B, Hkv, G, 1, D); k, v (B, Hkv, S, D) contiguous; mask (B, Hkv, 1, S) bool (True = may
    attend). Returns out (B, Hkv, G, 1, D) in v's dtype and probs (B, Hkv, G, 1, S) fp32: what
    model.attend's explicit path returns; need_probs=False: out and None (for policies that score
    nothing: split across programs, it reads a short cache faster than the fused library kernel).
    merge: the splits merged in the split pass (default: where MERGE_ELEMENTS allows). The twin:
    decode_attention_reference."""
    B, Hkv, G, T, D = q.shape
    S = k.shape[2]
    assert T == 1, "decode_attention takes one row per sequence"
    config = list(config or decode_config(S, B * Hkv, G))
    scores, m, l, out = launch_op(torch.ops.kv_fast.decode_attention, _decode_launch)(
        q.reshape(B * Hkv, G, D), k, v, mask.reshape(B * Hkv, S), need_probs, config,
        merge if merge is not None else merge_fits(G, -(-S // config[0]), D))
    return _decode_results(out, scores, m, l, q.shape, S, need_probs)


def _decode_results(out, scores, m, l, shape, S: int, need_probs: bool):
    """The split pass's results as model.attend returns them: out (B, Hkv, G, 1, D) and the probabilities
    (B, Hkv, G, 1, S) (or None), exp2(scores - m) / l."""
    B, Hkv, G, _, D = shape
    out = out.view(B, Hkv, G, 1, D)
    if not need_probs:
        return out, None
    probs = torch.exp2(scores - m.view(B * Hkv, G, 1)) / l.view(B * Hkv, G, 1)  # (B*Hkv, G, S): softmax of the scores
    return out, probs.view(B, Hkv, G, 1, S)


def _decode_launch(q, k, v, mask, need_probs: bool, config: list[int], merge: bool, step=None):
    """decode_attention's launches: the split pass over the keys, then the merge of the splits
    (FlashAttention's rescaling, one program per query row), in the split pass's last program with
    `merge`. q (B*Hkv, G, D); k, v (B, Hkv, S, D); mask (B*Hkv, S) bool -> scores (B*Hkv, G, S, or 1
    without need_probs) in log2 units, each row's max m and sum l (B*Hkv*G,) fp32, out (B*Hkv*G, D)
    in v's dtype. step: append_attention's (the new token too: _decode_kernel's APPEND): q then the
    projected rows (B, Hkv, G, D) by strides, mask the (B*Hkv, S) mask to write, and step = (the kernel's
    arguments K_NEW .. ss_h, FIND_SLOT, BLOCK_S, VALUE_L1)."""
    G, D = q.shape[-2:]
    BHkv = q.shape[:-2].numel()
    S = k.shape[2]
    SPLIT, BLOCK_N, warps, stages = config
    n_split = triton.cdiv(S, SPLIT)
    G_PAD = 1 if G == 1 else max(16, triton.next_power_of_2(G))  # tl.dot needs tiles of at least 16 rows
    N_PAD = max(2, triton.next_power_of_2(n_split))
    f32, on = torch.float32, pdl(q.device)
    scores = torch.empty(BHkv, G, S if need_probs else 1, device=q.device, dtype=f32)
    m_part = torch.empty(BHkv, G, n_split, device=q.device, dtype=f32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(BHkv, G, n_split, D, device=q.device, dtype=f32)
    out = torch.empty(BHkv * G, D, device=q.device, dtype=v.dtype)
    m, l = torch.empty(BHkv * G, device=q.device, dtype=f32), torch.empty(BHkv * G, device=q.device, dtype=f32)
    count = _counts(q.device, BHkv) if merge else m  # (unread without merge)
    if step is None:
        q, mask = q.contiguous(), mask.contiguous().view(torch.uint8)
        args, find, block_s, value_l1 = (q,) * 10 + (0,) * 12, False, 16, False  # (K_NEW .. ss_h: unread)
    else:
        args, find, block_s, value_l1 = step
    _decode_kernel[(BHkv, n_split)](
        q, k.contiguous(), v.contiguous(), mask, scores, m_part, l_part, acc_part, count, out, m, l, S, n_split,
        LOG2E / math.sqrt(D), G, G_PAD, D, SPLIT, BLOCK_N, need_probs, merge, triton.next_power_of_2(G), N_PAD, on,
        *args, APPEND=step is not None, FIND_SLOT=find, BLOCK_S=block_s, VALUE_L1=value_l1, num_warps=warps,
        num_stages=stages, **launch_options(q))
    if not merge:
        _combine_kernel[(BHkv * G,)](m_part, l_part, acc_part, out, m, l, n_split, D=D, N_PAD=N_PAD, PDL=on,
                                    **launch_options(q))
    return scores, m, l, out


if triton is not None:
    @torch.library.custom_op("kv_fast::decode_attention", mutates_args=(),
                             schema="(Tensor q, Tensor k, Tensor v, Tensor mask, bool need_probs, int[] config,"
                                    " bool merge) -> (Tensor, Tensor, Tensor, Tensor)")
    def _decode_op(q, k, v, mask, need_probs, config, merge):
        return _decode_launch(q, k, v, mask, need_probs, config, merge)

    @_decode_op.register_fake
    def _(q, k, v, mask, need_probs, config, merge):
        BHkv, G, D = q.shape
        f32 = torch.float32
        return (q.new_empty(BHkv, G, k.shape[2] if need_probs else 1, dtype=f32), q.new_empty(BHkv * G, dtype=f32),
                q.new_empty(BHkv * G, dtype=f32), q.new_empty(BHkv * G, D, dtype=v.dtype))


def decode_attention_reference(q, k, v, mask):
    """The slow twin of decode_attention: softmax(q k^T / sqrt(D)) in fp32, then probs @ v in v's
    dtype, as model.attend's explicit path. Shapes as decode_attention."""
    B, Hkv, G, T, D = q.shape
    scores = (q.float() @ k.float()[:, :, None].transpose(-1, -2)) / math.sqrt(D)  # (B, Hkv, G, 1, S)
    probs = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(dim=-1)
    out = probs.to(v.dtype) @ v[:, :, None]  # (B, Hkv, G, 1, D)
    return out, probs


# -- decode: the new token's rotary, its write into the cache and the step's mask, in one kernel -----

if triton is not None:

    @triton.jit
    def _append_kernel(Q, K_NEW, V_NEW, COS, SIN, SLOTS, QPOS, K, V, POS, VALID, MASK, Q_OUT, SLOT_OUT,
                       S, Hkv, window, sq_b, sq_h, sq_g, sk_b, sk_h, sv_b, sv_h, sc_b, ss_b, ss_h,
                       G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                       FIND_SLOT: tl.constexpr, PDL: tl.constexpr):
        """One row of programs: one KV head of one sequence. Q (B, Hkv, G, D), K_NEW, V_NEW (B, Hkv, D) by their
        strides; COS, SIN (B, D) fp32; SLOTS (B, Hkv) by strides, QPOS (B,): the new token's slot and
        position. Writes the token in: K[slot] = rotary(k), V[slot] = v, POS[slot] = position,
        VALID[slot] = position >= 0 (K, V (B*Hkv, S, D), POS, VALID (B*Hkv, S)); the rotated queries
        into Q_OUT (B*Hkv, G, D); and the row's mask into MASK (B*Hkv, S): (valid & pos <= position
        [& pos > position - window]) | own slot, cache.Call.mask, BLOCK_S slots at a time (_step_mask).
        FIND_SLOT: the slot is the row's lowest free one (not VALID; slot 0 if none: the argmax of
        fast.cache.LayerCache.free_slots), found here and written to SLOT_OUT (B*Hkv,); then the row is one
        program, which scans VALID before it writes anything. Else SLOTS gives it, and each program of the
        row writes one block of the mask."""
        if PDL:  # q, k, v come from the kernel before; the cache from earlier ones
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        bkv = tl.program_id(0).to(tl.int64)
        b = bkv // Hkv
        h = bkv % Hkv
        p = tl.load(QPOS + b)
        slot = _step_slot(VALID, SLOTS, bkv, b, h, S, ss_b, ss_h, BLOCK_S, FIND_SLOT)
        if FIND_SLOT:
            tl.store(SLOT_OUT + bkv, slot)
        if tl.program_id(1) == 0:  # the first program of the row writes the token in and rotates the queries
            offs_d = tl.arange(0, D)
            offs_g = tl.arange(0, G_PAD)
            g_ok = (offs_g < G)[:, None]
            q, k, v = _step_rotary(Q, K_NEW, V_NEW, COS, SIN, b, h, sq_b, sq_h, sq_g, sk_b, sk_h, sv_b, sv_h, sc_b,
                                   offs_g[:, None], g_ok, D)
            _step_write(K, V, POS, VALID, bkv, S, slot, p, k.to(K.dtype.element_ty), v, offs_d, D)
            tl.store(Q_OUT + (bkv * G + offs_g[:, None]) * D + offs_d[None, :], q.to(Q_OUT.dtype.element_ty), mask=g_ok)
        for s0 in range(tl.program_id(1) * BLOCK_S, S, tl.num_programs(1) * BLOCK_S):  # this program's blocks of the mask
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < S
            see = _step_mask(POS, VALID, bkv, S, offs_s, s_ok, p, slot, window)
            tl.store(MASK + bkv * S + offs_s, see.to(tl.uint8), mask=s_ok)

    @triton.jit
    def _step_slot(VALID, SLOTS, bkv, b, h, S, ss_b, ss_h, BLOCK_S: tl.constexpr, FIND_SLOT: tl.constexpr):
        """The new token's slot in row bkv: with FIND_SLOT the lowest one not VALID (slot 0 if none: the
        argmax of fast.cache.LayerCache.free_slots), scanned BLOCK_S slots at a time; else SLOTS[b, h]."""
        if FIND_SLOT:
            slot = S
            for s0 in range(0, S, BLOCK_S):
                offs = s0 + tl.arange(0, BLOCK_S)
                free = tl.load(VALID + bkv * S + offs, mask=offs < S, other=1) == 0
                slot = tl.minimum(slot, tl.min(tl.where(free, offs, S), 0))
            slot = tl.where(slot == S, 0, slot).to(tl.int64)
        else:
            slot = tl.load(SLOTS + b * ss_b + h * ss_h)
        return slot

    @triton.jit
    def _step_rotary(Q, K_NEW, V_NEW, COS, SIN, b, h, sq_b, sq_h, sq_g, sk_b, sk_h, sv_b, sv_h, sc_b, rows, rows_ok,
                     D: tl.constexpr):
        """The new token's query rows `rows` (R, 1) (rows_ok: those that exist) and its key rotated
        (model.apply_rotary in fp32: x cos + rotate_half(x) sin), and its value. -> q (R, D), k (D,) fp32, v (D,)."""
        offs_d = tl.arange(0, D)
        partner = (offs_d + D // 2) % D  # rotate_half(x) = (-x2, x1): element i takes i + D/2 (mod D), signed
        sign = tl.where(offs_d < D // 2, -1.0, 1.0)
        cos = tl.load(COS + b * sc_b + offs_d)
        sin = tl.load(SIN + b * sc_b + offs_d)
        k_new = K_NEW + b * sk_b + h * sk_h
        k = tl.load(k_new + offs_d).to(tl.float32) * cos + (tl.load(k_new + partner).to(tl.float32) * sign) * sin
        q_in = Q + b * sq_b + h * sq_h + rows * sq_g
        q = tl.load(q_in + offs_d[None, :], mask=rows_ok, other=0.0).to(tl.float32) * cos[None, :]
        q += (tl.load(q_in + partner[None, :], mask=rows_ok, other=0.0).to(tl.float32) * sign[None, :]) * sin[None, :]
        return q, k, tl.load(V_NEW + b * sv_b + h * sv_h + offs_d)

    @triton.jit
    def _step_write(K, V, POS, VALID, bkv, S, slot, p, k, v, offs_d, D: tl.constexpr):
        """The new token into its slot of row bkv: K[slot] = k, V[slot] = v, POS[slot] = p, VALID[slot] = p >= 0."""
        tl.store(K + (bkv * S + slot) * D + offs_d, k)
        tl.store(V + (bkv * S + slot) * D + offs_d, v)
        tl.store(POS + bkv * S + slot, p)
        tl.store(VALID + bkv * S + slot, (p >= 0).to(tl.uint8))

    @triton.jit
    def _step_mask(POS, VALID, bkv, S, offs_s, s_ok, p, slot, window):
        """The mask of row bkv's slots offs_s for the new token at position p in `slot` (cache.Call.mask):
        (valid & pos <= p [& pos > p - window]) | own slot. POS and VALID may be read at the own slot before
        or after the token's write: either way that slot is on (its own)."""
        pos = tl.load(POS + bkv * S + offs_s, mask=s_ok, other=0)
        see = (tl.load(VALID + bkv * S + offs_s, mask=s_ok, other=0) != 0) & (pos <= p)
        if window > 0:
            see = see & (pos > p - window)
        return see | (offs_s == slot)


def append_step(q, k, v, angles, slots, positions, cache_k, cache_v, cache_pos, cache_valid, window: int = 0,
                block_s: int | None = None):
    """A decode step's new token (one per sequence) into a layer's cache, and what its attention needs,
    in one kernel: what model.Attention.forward_heads and cache.LayerCache.update do between the
    projection and the attention, for keys stored rotated (original positions):

        slot = the lowest free slot, unless given                           (cache.LayerCache.free_slots)
        q, k = rope(q), rope(k);  K[slot], V[slot], pos[slot], valid[slot] = k, v, position, position >= 0
        mask = (valid & pos <= position [& pos > position - window]) | (slot == own slot)   (cache.Call.mask)

    q (B, Hkv, G, 1, D), k, v (B, Hkv, 1, D) (any strides: views of the projection); angles (cos, sin)
    (B, 1, 1, D) fp32 (model.rotary_angles); slots (B, Hkv, 1) (any strides), or None: each row's lowest
    free slot (slot 0 where none is free), found in the kernel; positions (B, 1). The cache's k, v (B,
    Hkv, S, D), pos, valid (B, Hkv, S) are written in place. -> q rotated (B, Hkv, G, 1, D), the mask
    (B, Hkv, 1, S) bool and the slots (B, Hkv, 1) (those given, or found). Rotary as model.apply_rotary:
    fp32, rounded once. block_s: mask slots a program (a power of 2; default up to 1,024). The twin:
    append_step_reference."""
    B, Hkv, G, T, D = q.shape
    assert T == 1, "append_step takes one new token per sequence"
    cos, sin = angles
    q_out, mask, found = launch_op(torch.ops.kv_fast.append_step, _append_launch)(
        q[:, :, :, 0], k[:, :, 0], v[:, :, 0], cos.reshape(B, D), sin.reshape(B, D),
        None if slots is None else slots[..., 0], positions.reshape(B), cache_k, cache_v, cache_pos, cache_valid, window,
        block_s or min(1024, triton.next_power_of_2(cache_k.shape[2])))
    return q_out.view(B, Hkv, G, 1, D), mask.view(B, Hkv, 1, -1), found.view(B, Hkv, 1) if slots is None else slots


def _append_launch(q, k, v, cos, sin, slots, positions, cache_k, cache_v, cache_pos, cache_valid, window: int,
                   block_s: int):
    """append_step's launch: q (B, Hkv, G, D), k, v (B, Hkv, D), cos, sin (B, D), slots (B, Hkv) or None,
    positions (B,) -> q rotated (B*Hkv, G, D), mask (B*Hkv, S) bool, the slots found (B*Hkv,) int64
    (with slots None; else (0,))."""
    B, Hkv, G, D = q.shape
    S = cache_k.shape[2]
    assert cache_k.is_contiguous() and cache_v.is_contiguous() and cache_pos.is_contiguous() and cache_valid.is_contiguous()
    q_out = torch.empty(B * Hkv, G, D, device=q.device, dtype=q.dtype)
    mask = torch.empty(B * Hkv, S, device=q.device, dtype=torch.bool)
    find = slots is None
    found = torch.empty(B * Hkv if find else 0, device=q.device, dtype=torch.int64)
    at = found if find else slots  # (SLOTS is not read when the kernel finds the slot)
    _append_kernel[(B * Hkv, 1 if find else triton.cdiv(S, block_s))](
        q, k, v, cos.contiguous(), sin.contiguous(), at, positions.contiguous(), cache_k, cache_v, cache_pos,
        cache_valid.view(torch.uint8), mask.view(torch.uint8), q_out, found, S, Hkv, window, q.stride(0), q.stride(1),
        q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1), D, 0 if find else slots.stride(0),
        0 if find else slots.stride(1), G=G, G_PAD=triton.next_power_of_2(G), D=D, BLOCK_S=block_s, FIND_SLOT=find,
        PDL=pdl(q.device), num_warps=4, **launch_options(q))
    return q_out, mask, found


if triton is not None:
    @torch.library.custom_op("kv_fast::append_step", mutates_args=("cache_k", "cache_v", "cache_pos", "cache_valid"),
                             schema="(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? slots,"
                                    " Tensor positions, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor(c!) cache_pos,"
                                    " Tensor(d!) cache_valid, int window, int block_s) -> (Tensor, Tensor, Tensor)")
    def _append_op(q, k, v, cos, sin, slots, positions, cache_k, cache_v, cache_pos, cache_valid, window, block_s):
        return _append_launch(q, k, v, cos, sin, slots, positions, cache_k, cache_v, cache_pos, cache_valid, window,
                              block_s)

    @_append_op.register_fake
    def _(q, k, v, cos, sin, slots, positions, cache_k, cache_v, cache_pos, cache_valid, window, block_s):
        B, Hkv, G, D = q.shape
        return (q.new_empty(B * Hkv, G, D), q.new_empty(B * Hkv, cache_k.shape[2], dtype=torch.bool),
                q.new_empty(B * Hkv if slots is None else 0, dtype=torch.int64))


def append_step_reference(q, k, v, angles, slots, positions, cache_k, cache_v, cache_pos, cache_valid, window: int = 0):
    """The slow twin of append_step: cache.LayerCache.free_slots' lowest free slot (slots None),
    model.apply_rotary, the index_put writes of cache.LayerCache.update and cache.Call.mask, as the
    reference path runs them."""
    from cache import Call  # the reference's own (this module imports neither otherwise)
    from model import apply_rotary

    B, Hkv, G, _, D = q.shape
    S = cache_k.shape[2]
    if slots is None:  # as cache.LayerCache.free_slots for one token: the free slot of lowest index ranks highest
        free_rank = torch.where(cache_valid, -1, S - torch.arange(S, device=q.device))
        slots = free_rank.argmax(dim=-1, keepdim=True)  # (B, Hkv, 1); none free: slot 0 (the first of equals)
    cos, sin = angles
    q, k = apply_rotary(q, cos[:, :, None], sin[:, :, None]), apply_rotary(k, cos, sin)
    at = (torch.arange(B, device=q.device)[:, None, None], torch.arange(Hkv, device=q.device)[None, :, None], slots)
    pos = positions[:, None, :].expand(B, Hkv, 1)
    cache_k.index_put_(at, k)
    cache_v.index_put_(at, v)
    cache_pos.index_put_(at, pos)
    cache_valid.index_put_(at, pos >= 0)
    call = Call(cache_k, cache_v, cache_pos, pos, positions, slots, cache_pos, cache_valid, window)
    return q, call.mask(0, 1), slots

# -- decode: append_step and decode_attention in one kernel ---------------------------------------

def join_fits(G: int, S: int, D: int, heads: int) -> bool:
    """Whether append_attention applies: the decode kernel's last program a KV head merges its splits
    (merge_fits), and so can write the new token in once every program has read the cache."""
    return triton is not None and merge_fits(G, -(-S // decode_split(S, heads)), D)


def append_attention(q, k, v, angles, slots, positions, cache_k, cache_v, cache_pos, cache_valid, window: int = 0,
                     need_probs: bool = True, config=None, value_l1: bool = False):
    """append_step, then decode_attention over the cache, in one kernel (_decode_kernel's APPEND): each
    program of the split pass finds (or is given) the slot, rotates q and the new key, and attends to the
    new token in place of its slot's; the merging program writes the token in (join_fits must hold).
    Arguments as append_step's, need_probs and config as decode_attention's. -> out (B, Hkv, G, 1, D),
    probs (B, Hkv, G, 1, S) fp32 or None, the mask (B, Hkv, 1, S), the slots (B, Hkv, 1), and with
    value_l1 the new values' ||v||_1 (B, Hkv, 1) fp32 (VATP's nu, policies.token_state: in this kernel
    rather than one of its own), else None. The twin: append_attention_reference."""
    B, Hkv, G, T, D = q.shape
    S = cache_k.shape[2]
    assert T == 1 and join_fits(G, S, D, B * Hkv), "append_attention takes one new token, where join_fits"
    cos, sin = angles
    scores, m, l, out, mask, found, nu = launch_op(torch.ops.kv_fast.append_attention, _append_attention_launch)(
        q[:, :, :, 0], k[:, :, 0], v[:, :, 0], cos.reshape(B, D), sin.reshape(B, D),
        None if slots is None else slots[..., 0], positions.reshape(B), cache_k, cache_v, cache_pos, cache_valid, window,
        need_probs, list(config or decode_config(S, B * Hkv, G)), value_l1)
    out, probs = _decode_results(out, scores, m, l, q.shape, S, need_probs)
    return (out, probs, mask.view(B, Hkv, 1, S), found.view(B, Hkv, 1) if slots is None else slots,
            nu.view(B, Hkv, 1) if value_l1 else None)


def _append_attention_launch(q, k, v, cos, sin, slots, positions, cache_k, cache_v, cache_pos, cache_valid,
                             window: int, need_probs: bool, config: list[int], value_l1: bool):
    """append_attention's launch: arguments as _append_launch's -> scores, m, l, out (as _decode_launch's),
    the mask (B*Hkv, S) bool, the slots found (B*Hkv,) int64 (with slots None; else (0,)) and the values'
    L1 norms (B*Hkv,) fp32 (with value_l1; else (0,))."""
    B, Hkv, G, D = q.shape
    S = cache_k.shape[2]
    assert cache_k.is_contiguous() and cache_v.is_contiguous() and cache_pos.is_contiguous() and cache_valid.is_contiguous()
    mask = torch.empty(B * Hkv, S, device=q.device, dtype=torch.bool)
    find = slots is None
    found = torch.empty(B * Hkv if find else 0, device=q.device, dtype=torch.int64)
    nu = torch.empty(B * Hkv if value_l1 else 0, device=q.device, dtype=torch.float32)
    at = found if find else slots  # (SLOTS is not read when the kernel finds the slot)
    args = (k, v, cos.contiguous(), sin.contiguous(), at, positions.contiguous(), cache_pos, cache_valid.view(torch.uint8),
            found, nu, Hkv, window, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), D, 0 if find else slots.stride(0), 0 if find else slots.stride(1))
    step = (args, find, min(1024, triton.next_power_of_2(S)), value_l1)
    return (*_decode_launch(q, cache_k, cache_v, mask.view(torch.uint8), need_probs, config, True, step), mask, found, nu)


if triton is not None:
    @torch.library.custom_op("kv_fast::append_attention",
                             mutates_args=("cache_k", "cache_v", "cache_pos", "cache_valid"),
                             schema="(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? slots,"
                                    " Tensor positions, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor(c!) cache_pos,"
                                    " Tensor(d!) cache_valid, int window, bool need_probs, int[] config, bool value_l1)"
                                    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
    def _append_attention_op(q, k, v, cos, sin, slots, positions, cache_k, cache_v, cache_pos, cache_valid, window,
                             need_probs, config, value_l1):
        return _append_attention_launch(q, k, v, cos, sin, slots, positions, cache_k, cache_v, cache_pos, cache_valid,
                                        window, need_probs, config, value_l1)

    @_append_attention_op.register_fake
    def _(q, k, v, cos, sin, slots, positions, cache_k, cache_v, cache_pos, cache_valid, window, need_probs, config,
          value_l1):
        B, Hkv, G, D = q.shape
        S, f32 = cache_k.shape[2], torch.float32
        return (q.new_empty(B * Hkv, G, S if need_probs else 1, dtype=f32), q.new_empty(B * Hkv * G, dtype=f32),
                q.new_empty(B * Hkv * G, dtype=f32), q.new_empty(B * Hkv * G, D, dtype=cache_v.dtype),
                q.new_empty(B * Hkv, S, dtype=torch.bool), q.new_empty(B * Hkv if slots is None else 0, dtype=torch.int64),
                q.new_empty(B * Hkv if value_l1 else 0, dtype=f32))


def append_attention_reference(q, k, v, angles, slots, positions, cache_k, cache_v, cache_pos, cache_valid,
                               window: int = 0):
    """The slow twin of append_attention: append_step_reference, then decode_attention_reference over
    the cache it wrote, and the values' ||v||_1 in fp32. -> out, probs, mask, slots, the norms (B, Hkv, 1)."""
    q_rot, mask, slots = append_step_reference(q, k, v, angles, slots, positions, cache_k, cache_v, cache_pos,
                                               cache_valid, window)
    return (*decode_attention_reference(q_rot, cache_k, cache_v, mask), mask, slots, v.float().abs().sum(dim=-1))


# -- prefill: column sums of a causal attention ------------------------------------------------

if triton is not None:

    @triton.jit
    def _column_sums_kernel(Q, K, LSE, W, FIRST, OUT, T, Hkv, T_KEY, scale_log2: tl.constexpr,
                            G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            SPLIT_LOOP: tl.constexpr = False):
        """One program: keys [j0, j0 + BLOCK_N) of one KV head of one sequence. Q (B*Hkv*G, T, D),
        K (B*Hkv, T, D), LSE (B*Hkv*G, T) natural log-sum-exps, W (B, T) row weights, FIRST (B,) each
        sequence's first row of nonzero weight, OUT (B*Hkv, T):
        OUT[j] = sum_g sum_{q >= j} W[q] 2^(s[q, j] - LSE[q]), Eq. (1). T_KEY: the autotuner's key
        only (T rounded up to a power of 2).
        SPLIT_LOOP (COLUMN_SUMS_SPLIT): the same sums with less work a score (_column_sums_tile): the weight
        inside the exponent (W 2^(s - LSE) = 2^(s - (LSE - log2 W)), no multiply), the causal mask only on
        the row tiles that cross the block's diagonal, and the sums kept per element of the tile, down the
        rows once at the end (no reduction across the program's threads per tile)."""
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
        b = bkv // Hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        n_ok = offs_n < T
        k = tl.load(K + bkv * T * D + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        # rows before the first key see none of these keys; rows before FIRST weigh 0 (no branch in the loop,
        # so the compiler can pipeline its loads)
        first = tl.maximum(pid_n * BLOCK_N, tl.load(FIRST + b))
        if SPLIT_LOOP:
            tile = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            # rows from (pid_n + 1) * BLOCK_N - 1 on see every key of the block: their tiles need no mask
            crossing = tl.cdiv(tl.maximum(tl.minimum(T, (pid_n + 1) * BLOCK_N - 1) - first, 0), BLOCK_M)
            below = first + crossing * BLOCK_M
            for start in range(first, below, BLOCK_M):
                tile += _column_sums_tile(Q, LSE, W, k, bkv, b, start, offs_n, T, scale_log2, G, D, BLOCK_M, BLOCK_N, True)
            for start in range(below, T, BLOCK_M):
                tile += _column_sums_tile(Q, LSE, W, k, bkv, b, start, offs_n, T, scale_log2, G, D, BLOCK_M, BLOCK_N,
                                          False)
            acc = tl.sum(tile, 0)
        else:
            acc = tl.zeros((BLOCK_N,), tl.float32)
            for start in range(first, T, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                m_ok = offs_m < T
                w = tl.load(W + b * T + offs_m, mask=m_ok, other=0.0)
                for g in range(G):
                    bh = bkv * G + g
                    q = tl.load(Q + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
                    lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634  # log2 units
                    s = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_M, BLOCK_N)
                    p = tl.exp2(s - lse[:, None]) * w[:, None]  # row-normalised probability x row weight
                    seen = (offs_n[None, :] <= offs_m[:, None]) & m_ok[:, None]  # causal
                    acc += tl.sum(tl.where(seen, p, 0.0), 0)
        tl.store(OUT + bkv * T + offs_n, acc, mask=n_ok)

    @triton.jit
    def _column_sums_tile(Q, LSE, W, k, bkv, b, start, offs_n, T, scale_log2: tl.constexpr, G: tl.constexpr,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """Rows [start, start + BLOCK_M) of _column_sums_kernel's SPLIT_LOOP against its keys k (BLOCK_N, D):
        W[q] 2^(s[q, j] - LSE[q]) summed over the group's query heads, per element (BLOCK_M, BLOCK_N); with
        CAUSAL, 0 where the key is after the row. A row of weight 0, or past T, has LSE - log2 W = +inf: 0."""
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < T
        log2_w = tl.log2(tl.load(W + b * T + offs_m, mask=m_ok, other=0.0))  # -inf where the row weighs 0
        tile = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for g in range(G):
            bh = bkv * G + g
            q = tl.load(Q + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            c = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634 - log2_w  # log2 units
            p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - c[:, None])  # (BLOCK_M, BLOCK_N): W 2^(s - LSE)
            if CAUSAL:
                p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
            tile += p
        return tile

    # (BLOCK_M, BLOCK_N, num_warps, num_stages). The first is the fixed launch of calls shorter than
    # TUNE_FROM rows; from there the autotuner times them all on the device, once per T_KEY.
    COLUMN_SUMS_CONFIGS = [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 8, 3),
                           (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3)]
    _column_sums_tuned = triton.autotune(
        [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st) for m, n, w, st in COLUMN_SUMS_CONFIGS],
        key=["T_KEY", "G", "D", "SPLIT_LOOP"])(_column_sums_kernel)

TUNE_FROM = 4096  # rows: tuning costs about a second a length bucket, more than a shorter call's whole prefill


def first_weighted_row(w):
    """w (B, T) row weights -> (B,) int32 each sequence's first row of nonzero weight (0 where no row
    weighs: then every row adds 0). The same for every layer of a prompt: computed once for them all."""
    return (w != 0).to(torch.int32).argmax(dim=-1).to(torch.int32)


# column_sums' kernel with less work a score (_column_sums_kernel's SPLIT_LOOP: the weight in the exponent, the
# causal mask on the diagonal's tiles only, per-element sums). The 7B's h2o prefill at 32k is these sums: 1.33x the
# fused prefill in one loop, 1.20x split (one H200, same call; scripts/gpu_issue18.sh split). bench.py
# --no-colsum-split: the one loop, to time beside it.
COLUMN_SUMS_SPLIT = True


def column_sums(q, k, lse, w, first=None, config=None, split_loop: bool | None = None):
    """Eq. (1) for a causal call whose rows and keys are the same T tokens in order.
    q (B, Hkv, G, T, D), k (B, Hkv, T, D), lse (B, Hkv, G, T) fp32 natural log-sum-exp of each
    row's scaled scores, w (B, T) row weights, first (B,) first_weighted_row(w) (computed here if
    None) -> (B, Hkv, T) fp32. The twin: column_sums_reference. config: one of COLUMN_SUMS_CONFIGS,
    forced (tests); by default the first below TUNE_FROM rows, the autotuner's pick from there (on
    CUDA). split_loop: the kernel's SPLIT_LOOP (default COLUMN_SUMS_SPLIT)."""
    B, Hkv, G, T, D = q.shape
    out = torch.empty(B * Hkv, T, device=q.device, dtype=torch.float32)
    w = w.float().contiguous()
    first = first_weighted_row(w) if first is None else first
    args = (q.contiguous().view(B * Hkv * G, T, D), k.contiguous().view(B * Hkv, T, D), lse.float().contiguous(), w,
            first, out, T, Hkv, triton.next_power_of_2(T), LOG2E / math.sqrt(D))
    split = COLUMN_SUMS_SPLIT if split_loop is None else split_loop
    if config is None and T >= TUNE_FROM and q.is_cuda:
        _column_sums_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)](*args, G=G, D=D, SPLIT_LOOP=split)
    else:
        m, n, warps, stages = config or COLUMN_SUMS_CONFIGS[0]
        _column_sums_kernel[(triton.cdiv(T, n), B * Hkv)](*args, G=G, D=D, BLOCK_M=m, BLOCK_N=n, SPLIT_LOOP=split,
                                                          num_warps=warps, num_stages=stages)
    return out.view(B, Hkv, T)


def column_sums_reference(q, k, lse, w, first=None):
    """The slow twin of column_sums: the T x T probabilities exp(s - lse), masked causally,
    weighted by row and summed over the rows and the group's query heads (every row: `first`, where
    the kernel may start, changes nothing)."""
    B, Hkv, G, T, D = q.shape
    s = (q.float() @ k.float()[:, :, None].transpose(-1, -2)) / math.sqrt(D)  # (B, Hkv, G, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = torch.where(causal, torch.exp(s - lse[..., None].float()), 0.0)
    return torch.einsum("bhgqs,bq->bhs", p, w.float())


def causal_attention_lse(q, k, v):
    """The fused causal attention and each row's natural log-sum-exp, from one fused kernel (CUDA):
    cuDNN's (what F.scaled_dot_product_attention runs on Hopper, and as fast with the log-sum-exp,
    results/prefill_probe_h100.log) or else the flash kernel's (FlashAttention-2, slower there).
    q (B, Hkv, G, T, D), k, v (B, Hkv, T, D) -> out
    (B, Hkv, G, T, D), lse (B, Hkv, G, T) fp32. Both want as many key heads as query heads: the
    group's keys as they are where cuDNN takes them so (cuDNN's attention graph supports fewer key heads
    natively: pytorch/pytorch#139586, #150337; on the H200, torch 2.11, equal to the expanded call to the
    bit, scripts/gqa_probe.py), else expanded (a copy of this call's keys only, freed after it)."""
    B, Hkv, G, T, D = q.shape
    q = q.reshape(B, Hkv * G, T, D)
    cudnn = lambda k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(  # noqa: E731  (B, H, T, D), lse (B, H, T, 1)
        q, k, v, None, True, 0.0, True, False, scale=1 / math.sqrt(D))[:2]
    try:
        out, lse = cudnn(k, v)
    except (AttributeError, RuntimeError):  # grouped keys refused, or no cuDNN attention: expanded, or the flash kernel
        if G > 1:
            k, v = (x[:, :, None].expand(B, Hkv, G, T, D).reshape(B, Hkv * G, T, D) for x in (k, v))
        try:
            out, lse = cudnn(k, v)
        except (AttributeError, RuntimeError):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False,
                                                                          scale=1 / math.sqrt(D))[:2]
    return out.view(B, Hkv, G, T, D), lse.reshape(B, Hkv, G, T)


def causal_attention_lse_reference(q, k, v):
    """The slow twin of causal_attention_lse (any device): explicit softmax in fp32."""
    B, Hkv, G, T, D = q.shape
    s = (q.float() @ k.float()[:, :, None].transpose(-1, -2)) / math.sqrt(D)  # (B, Hkv, G, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.softmax(s, dim=-1).to(v.dtype) @ v[:, :, None]
    return out, lse


def prefill_available(device, dtype, policy, cfg) -> bool:
    """Whether the fused prefill (causal_attention_lse + column_sums) applies to a model on device
    in dtype: CUDA in half precision, the aten flash kernel present, and a policy whose group heads
    combine by sum (Eq. 1 is a sum; gqa='max' takes a max per row, which column sums cannot)."""
    return (triton is not None and torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention")
            and (policy.gqa == "sum" or cfg.group == 1) and cfg.head_dim <= 256)


# -- decode: the projections, with the norm before and the residual or SwiGLU after -----------

if triton is not None:

    @triton.jit
    def _row_weights(W, offs_n, n_ok, k0, offs_k, N, K, GLU: tl.constexpr):
        """The weights of outputs offs_n (and with GLU the up rows N + offs_n) at inputs [k0, k0 + BLOCK_K)."""
        ok = n_ok[:, None] & (k0 + offs_k < K)[None, :]
        w = tl.load(W + offs_n[:, None] * K + (k0 + offs_k)[None, :], mask=ok, other=0.0)
        w_up = w
        if GLU:
            w_up = tl.load(W + (N + offs_n)[:, None] * K + (k0 + offs_k)[None, :], mask=ok, other=0.0)
        return w, w_up

    @triton.jit
    def _row_products(X, NORM, w, w_up, k0, offs_k, K, acc, acc_up, ss, HAS_NORM: tl.constexpr, GLU: tl.constexpr):
        """Adds one tile's products w * (g * x) to the accumulators, and x's squares to the norm's sum."""
        k_ok = k0 + offs_k < K
        x = tl.load(X + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        if HAS_NORM:
            ss += x * x
            x = x * tl.load(NORM + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if GLU:
            acc_up += w_up.to(tl.float32) * x[None, :]
        return acc, acc_up, ss

    @triton.jit
    def _row_kernel(X, W, NORM, BIAS, RES, OUT, N, K, eps,
                    HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """One program: outputs [n0, n0 + BLOCK_N) of Eq. (2) for one row. X (K,), W (N or 2N, K) as
        nn.Linear stores it, NORM (K,), BIAS (N or 2N,), RES and OUT (N,). One pass over the weights,
        in fp32 registers (a tensor-core tile would pad the row to 16, and measured slower); the norm's
        sum of squares is taken in the same pass and its 1 / sqrt applied at the end (the gain g
        multiplies x in fp32, so nothing is rounded before the products). Without GLU, the first tile of
        weights is read before the wait for the kernel before (PDL: programmatic dependent launch, see
        PDL), which wrote x and the residual, never the weights."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        ss = tl.zeros((BLOCK_K,), tl.float32)
        k_start = 0
        if PDL and not GLU:  # the first tile's weights, then the wait, then its products
            w, w_up = _row_weights(W, offs_n, n_ok, 0, offs_k, N, K, GLU)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
            acc, acc_up, ss = _row_products(X, NORM, w, w_up, 0, offs_k, K, acc, acc_up, ss, HAS_NORM, GLU)
            k_start = BLOCK_K
        elif PDL:  # SwiGLU's two tiles read early measured slower (50.3 us against 46.9 for the 7B's gate_up)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for k0 in range(k_start, K, BLOCK_K):
            w, w_up = _row_weights(W, offs_n, n_ok, k0, offs_k, N, K, GLU)
            acc, acc_up, ss = _row_products(X, NORM, w, w_up, k0, offs_k, K, acc, acc_up, ss, HAS_NORM, GLU)
        a = tl.sum(acc, 1)  # (BLOCK_N,)
        a_up = tl.sum(acc_up, 1)
        if HAS_NORM:
            scale = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
            a, a_up = a * scale, a_up * scale
        if HAS_BIAS:
            a += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if GLU:
                a_up += tl.load(BIAS + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if GLU:  # silu(gate) * up, each rounded to the output's dtype first, as the torch ops round them
            gate = a.to(OUT.dtype.element_ty).to(tl.float32)
            up = a_up.to(OUT.dtype.element_ty).to(tl.float32)
            a = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32) * up
        if HAS_RES:  # the residual stream plus the projection rounded to the output's dtype, as x + wo(out)
            a = tl.load(RES + offs_n, mask=n_ok, other=0.0).to(tl.float32) + a.to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + offs_n, a.to(OUT.dtype.element_ty), mask=n_ok)

    # (BLOCK_N, BLOCK_K, num_warps, num_stages): the launch configs scripts/rows_probe.py --configs times
    # (results/targets_h200x2/rows-probe.log); row_config picks among them.
    ROW_CONFIGS = [(8, 512, 4, 1), (16, 256, 4, 1), (16, 512, 4, 2), (32, 256, 4, 2), (4, 1024, 4, 1),
                   (8, 1024, 8, 2), (16, 128, 4, 3), (32, 128, 4, 3), (2, 1024, 4, 1), (8, 1024, 4, 1),
                   (4, 2048, 8, 1), (2, 2048, 8, 1), (16, 1024, 8, 1), (1, 2048, 8, 1)]


def row_config(N: int, K: int, glu: bool) -> tuple:
    """linear_rows' launch for a weight of N outputs (pairs with glu) by K inputs. Timed on the H200 in a
    CUDA graph, the weights cold (scripts/rows_probe.py --configs, the 7B and SmolLM2 shapes), this rule
    is within 3% of the fastest of ROW_CONFIGS on all ten matrices, where a poor config costs up to 2x:
    narrow matrices (o, down) want one row a program and a long pass over K (more programs, more bytes
    in flight), SwiGLU's two accumulators four rows, wide ones more. A fixed rule, not Triton's
    autotuner: it times each kernel alone (do_bench), where the small kernels' launch cost swamps their
    differences; with its picks the 7B step (full, 1k) ran 235 tok/s on two H200 machines and 219 on
    a third, where cuBLAS ran 227 (results/targets_h200x2/run3-rows/)."""
    if glu:
        return (4, 1024, 4, 1)
    if N <= 4096:
        return (1, 2048, 8, 1)
    if N <= 16384:
        return (8, 1024, 4, 1)
    return (16, 128, 4, 3)


# Off CUDA (the tests, in Triton's interpreter, where each program is a Python loop): few programs.
INTERPRETED_ROW_CONFIG = (32, 128, 4, 3)


def linear_rows(x, weight, bias=None, norm=None, eps=1e-5, residual=None, glu=False, config=None):
    """A decode step's projection of one row, with what comes before and after it fused:

        y = residual + silu(a_gate) * a_up,  a = W (g * x / sqrt(mean(x^2) + eps)) + b        (2)

    each part only where given: `norm` g (K,) the RMSNorm before (Zhang & Sennrich 2019), `glu` the
    SwiGLU after (W stacks the gate's rows over the up's, as fast.fuse_linears does: Shazeer 2020),
    `residual` (.., N) the residual stream's add. One kernel instead of three to five; the weights
    stream once. x (.., K) one row (a decode step of one sequence: more rows are a matmul's work),
    weight (N or 2N, K), bias (N or 2N,) -> (.., N) in x's dtype. The twin: linear_rows_reference.
    config: one of ROW_CONFIGS, forced (by default row_config's on CUDA)."""
    K = x.shape[-1]
    N = weight.shape[0] // 2 if glu else weight.shape[0]
    row = x.reshape(-1, K)  # (1, K)
    assert row.shape[0] == 1, "linear_rows takes one row"
    config = list(config or (row_config(N, K, glu) if x.is_cuda else INTERPRETED_ROW_CONFIG))
    res = residual.reshape(1, N) if residual is not None else None
    out = launch_op(torch.ops.kv_fast.linear_rows, _rows_launch)(row, weight, bias, norm, eps, res, glu, config)
    return out.view(*x.shape[:-1], N)


def _rows_launch(row, weight, bias, norm, eps: float, residual, glu: bool, config: list[int]):
    """linear_rows' launch: row (1, K), residual (1, N) or None -> (1, N) in row's dtype."""
    K = row.shape[-1]
    N = weight.shape[0] // 2 if glu else weight.shape[0]
    row = row.contiguous()
    out = torch.empty(1, N, device=row.device, dtype=row.dtype)
    res = residual.contiguous() if residual is not None else out
    args = (row, weight, norm if norm is not None else row, bias if bias is not None else row, res, out, N, K, eps)
    flags = dict(HAS_NORM=norm is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, GLU=glu)
    n, k, warps, stages = config
    _row_kernel[(triton.cdiv(N, n),)](*args, **flags, BLOCK_N=n, BLOCK_K=k, PDL=pdl(row.device), num_warps=warps,
                                      num_stages=stages, **launch_options(row))
    return out


if triton is not None:
    @torch.library.custom_op("kv_fast::linear_rows", mutates_args=(),
                             schema="(Tensor row, Tensor weight, Tensor? bias, Tensor? norm, float eps, Tensor? residual,"
                                    " bool glu, int[] config) -> Tensor")
    def _rows_op(row, weight, bias, norm, eps, residual, glu, config):
        return _rows_launch(row, weight, bias, norm, eps, residual, glu, config)

    @_rows_op.register_fake
    def _(row, weight, bias, norm, eps, residual, glu, config):
        return row.new_empty(1, weight.shape[0] // 2 if glu else weight.shape[0])


def linear_rows_reference(x, weight, bias=None, norm=None, eps=1e-5, residual=None, glu=False):
    """The slow twin of linear_rows: model.RMSNorm, F.linear, silu(gate) * up, + residual, as
    model.Block runs them."""
    if norm is not None:
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm.float()).type_as(x)
    y = torch.nn.functional.linear(x, weight, bias)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y if residual is None else residual + y
