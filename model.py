"""A minimal LLaMA / OPT decoder whose attention talks to an explicit KV cache.

One file, read top to bottom: the config and its presets, the pieces (norms, rotary positions,
attention, MLP), the block and the transformer. The forward pass is

    model(tokens, cache=None) -> logits          tokens (B, T) long, logits (B, T, vocab)

With no cache, every row attends causally to the rows before it (positions 0..T-1). With a
cache (cache.py), positions come from the cache, and each layer's attention asks its layer of
the cache for the keys, values, key positions and mask to use, then hands the cache the
attention probabilities of the rows it just computed (when the cache's policy scores tokens).

References: LLaMA (Touvron et al. 2023, arXiv 2302.13971), rotary embeddings (Su et al. 2021,
arXiv 2104.09864), grouped-query attention (Ainslie et al. 2023, arXiv 2305.13245), OPT
(Zhang et al. 2022, arXiv 2205.01068). Layout after nanoGPT and gpt-fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import kernels


@dataclass(frozen=True)
class Config:
    arch: str = "llama"  # "llama" (RMSNorm, RoPE, SwiGLU) or "opt" (LayerNorm, learned positions, ReLU)
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention
    hidden_dim: int = 11008  # MLP width
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bias: bool = False  # biases on attention and MLP projections (OPT)

    def __post_init__(self):
        if self.arch not in ("llama", "opt"):
            raise ValueError(f"unknown architecture {self.arch!r}: use 'llama' or 'opt'")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def group(self) -> int:
        """Query heads per KV head: query head h uses KV head h // group."""
        return self.n_heads // self.n_kv_heads

    @property
    def rotary(self) -> bool:
        return self.arch == "llama"


PRESETS = {
    "smollm2-135m": Config(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                           hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "llama-2-7b": Config(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                         hidden_dim=11008, max_seq_len=4096),
    "opt-125m": Config(arch="opt", vocab_size=50272, dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
                       hidden_dim=3072, max_seq_len=2048, tie_embeddings=True, bias=True),
    "opt-6.7b": Config(arch="opt", vocab_size=50272, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                       hidden_dim=16384, max_seq_len=2048, tie_embeddings=True, bias=True),
    "tiny-llama": Config(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                         max_seq_len=256),
    "tiny-opt": Config(arch="opt", vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                       hidden_dim=96, max_seq_len=256, tie_embeddings=True, bias=True),
}


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# Pieces


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w   (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def make_norm(cfg: Config) -> nn.Module:
    return RMSNorm(cfg.dim, cfg.norm_eps) if cfg.arch == "llama" else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sin (B, H|1, T, D) fp32 of the rotary angles for positions (B, T) or (B, H, T).

    Rotate-half layout (RoFormer Eq. 34; the Hugging Face convention): dimension i pairs with
    i + D/2, and both turn by angle pos * theta^(-2i/D). Checkpoints stored for the interleaved
    (Meta / GGUF) layout have their Q and K rows permuted into this one by the loader.
    """
    D = head_dim
    inv_freq = theta ** (-torch.arange(0, D, 2, device=positions.device, dtype=torch.float32) / D)  # (D/2,)
    if positions.dim() == 2:
        positions = positions[:, None, :]  # (B, 1, T): the same positions for every head
    angles = positions.float()[..., None] * inv_freq  # (B, H|1, T, D/2)
    angles = torch.cat([angles, angles], -1)  # (B, H|1, T, D): i and i + D/2 turn alike
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, D) turned by angles whose cos and sin broadcast to it: x cos + rotate_half(x) sin,
    where rotate_half(x) = (-x2, x1) for the halves x1, x2 of x. Computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # (..., T, D)
    return (x.float() * cos + rotated * sin).type_as(x)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x (B, H, T, D) by positions (B, T) or (B, H, T), angles computed here.
    The slow twin of the angles Transformer.forward computes once for every layer (a test holds
    the two equal); slot positions (rotated at read time by per-layer ranks) always come here."""
    return apply_rotary(x, *rotary_angles(positions, x.shape[-1], theta))


BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")  # torch.bmm(a, b, out_dtype=...): torch >= 2.8, CUDA kernels only


def upcast_scores(rows, k):
    """q k^T with both upcast first: rows (B, Hkv, R, D), k (B, Hkv, S, D) -> (B, Hkv, R, S) in
    fp32 or wider. The slow twin of half_scores, and the path everywhere it does not apply."""
    ct = torch.promote_types(rows.dtype, torch.float32)
    return rows.to(ct) @ k.to(ct).transpose(-1, -2)  # (B, Hkv, R, S)


def half_scores(rows, k):
    """q k^T as one bf16 / fp16 batched matmul that accumulates in and writes fp32 (CUDA only).
    rows (B, Hkv, R, D), k (B, Hkv, S, D) -> (B, Hkv, R, S) fp32."""
    B, Hkv, R, D = rows.shape
    S = k.shape[2]
    kt = k.reshape(B * Hkv, S, D).transpose(1, 2)  # (B*Hkv, D, S): a view of contiguous keys (the cache's), no copy
    return torch.bmm(rows.reshape(B * Hkv, R, D), kt, out_dtype=torch.float32).view(B, Hkv, R, S)


def attention_scores(rows, k):
    """q k^T in fp32 at least (the policies score in fp32): rows (B, Hkv, R, D), k (B, Hkv, S, D).

    bf16 / fp16 on CUDA: half_scores, a tensor-core matmul with fp32 accumulation and output. It
    loses nothing against upcasting first: the inputs are already half precision, and the product
    of two of them is exact in fp32, so only the order of the fp32 additions differs. Upcasting
    first (upcast_scores) copies q and k to fp32 and runs an fp32 matmul, several times slower.
    Elsewhere (the CPU, fp32 models, a torch without bmm's out_dtype): upcast_scores.
    """
    if BMM_OUT_DTYPE and rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16) and k.dtype == rows.dtype:
        return half_scores(rows, k)
    return upcast_scores(rows, k)


def attend(q, k, v, mask, need_probs: bool, fused: bool = False):
    """Attention of query rows over a set of keys, per KV-head group.

    q (B, Hkv, G, T, D), k and v (B, Hkv, S, D), mask (B, Hkv, T, S) bool (True = may attend).
    Returns out (B, Hkv, G, T, D) and the probabilities (B, Hkv, G, T, S), or None.
    The G query heads of a group are folded into the rows, so keys and values are never copied
    per query head.

    need_probs: the explicit path, softmax(q k^T / sqrt(D)) (Vaswani et al. 2017, Eq. 1) in fp32
    at least, whose probabilities a scoring policy needs. Otherwise the fused
    scaled_dot_product_attention, which returns none. A test holds the two paths equal.
    fused: for one row per sequence (the decode step) on CUDA, kernels.decode_attention returns
    the same output (and probabilities) in one pass over the keys (its slow twins: the explicit
    path; scaled_dot_product_attention).
    """
    B, Hkv, G, T, D = q.shape
    S = k.shape[2]
    if fused and T == 1 and kernels.available(q):
        return kernels.decode_attention(q, k, v, mask, need_probs)
    rows = q.reshape(B, Hkv, G * T, D)  # (B, Hkv, G*T, D)
    if need_probs:
        scores = attention_scores(rows, k).view(B, Hkv, G, T, S) / math.sqrt(D)  # (B, Hkv, G, T, S)
        probs = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(dim=-1)
        out = probs.to(v.dtype).view(B, Hkv, G * T, S) @ v  # (B, Hkv, G*T, D)
        return out.view(B, Hkv, G, T, D), probs
    group_mask = mask[:, :, None].expand(B, Hkv, G, T, S).reshape(B, Hkv, G * T, S)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=group_mask)  # (B, Hkv, G*T, D)
    return out.view(B, Hkv, G, T, D), None


def causal_attention(q, k, v):
    """No cache: the fused causal kernel. q (B, Hkv, G, T, D), k and v (B, Hkv, T, D)."""
    B, Hkv, G, T, D = q.shape
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv * G, T, D), k, v, is_causal=True, enable_gqa=True)
    return out.view(B, Hkv, G, T, D)


def fuse_linears(owner: nn.Module, name: str, *linears: nn.Linear) -> None:
    """Fast twin of several projections of the same input: registers on `owner` the buffer `name`
    (their weights stacked, out_features summed) and `name + "_bias"`, and makes each linear's
    weight and bias a view into them, so nothing is stored twice and state_dict is unchanged.
    One matmul instead of several: one launch, and in decode, which only streams the weights,
    a larger matrix streams closer to the memory bandwidth. A test holds it equal to the slow
    twin (the separate linears; the buffer is None until fused)."""
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])  # (sum of out_features, in_features)
        bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    setattr(owner, name, weight)
    setattr(owner, name + "_bias", bias)
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(weight[row:row + n], requires_grad=lin.weight.requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row:row + n], requires_grad=lin.bias.requires_grad)
        row += n


ATTN_ELEMENTS = 2**26  # attention with a cache runs in row chunks of at most this many scores (256 MB fp32)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, H * D, bias=cfg.bias)
        self.wk = nn.Linear(cfg.dim, Hkv * D, bias=cfg.bias)
        self.wv = nn.Linear(cfg.dim, Hkv * D, bias=cfg.bias)
        self.wo = nn.Linear(H * D, cfg.dim, bias=cfg.bias)
        self.register_buffer("wqkv", None, persistent=False)  # wq, wk, wv stacked (fuse_linears), or None
        self.register_buffer("wqkv_bias", None, persistent=False)

    def project(self, x):
        """x (B, T, dim) -> q (B, Hkv, G, T, D), k and v (B, Hkv, T, D), before any rotation."""
        cfg = self.cfg
        B, T, _ = x.shape
        if self.wqkv is not None:  # fast twin: one matmul, then split (Transformer.fuse_projections)
            sizes = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
            q, k, v = F.linear(x, self.wqkv, self.wqkv_bias).split(sizes, dim=-1)  # (B, T, H*D), 2 x (B, T, Hkv*D)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, cfg.n_kv_heads, cfg.group, cfg.head_dim).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, T, D)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        return q, k, v

    def output(self, out):
        """out (B, Hkv, G, T, D) -> (B, T, dim)."""
        B, Hkv, G, T, D = out.shape
        return self.wo(out.permute(0, 3, 1, 2, 4).reshape(B, T, Hkv * G * D))  # (B, T, H*D) -> (B, T, dim)

    def rope(self, x, positions, angles=None):
        """Rotate x (B, Hkv, [G,] T, D) by positions (B, T) or per KV head (B, Hkv, T).
        angles: (cos, sin) (B, 1, T, D) of positions (B, T), computed once per forward for every
        layer (Transformer.forward); None computes them here from positions (the slow twin)."""
        if not self.cfg.rotary:
            return x
        if angles is not None:  # the same angles for every head: broadcast over the heads (and the group)
            cos, sin = angles if x.dim() == 4 else (a[:, :, None] for a in angles)  # (B, 1, [1,] T, D)
            return apply_rotary(x, cos, sin)
        if x.dim() == 5:  # queries: fold the group into the head axis
            B, Hkv, G, T, D = x.shape
            pos = positions if positions.dim() == 2 else positions[:, :, None].expand(B, Hkv, G, T).reshape(B, Hkv * G, T)
            return rotate(x.reshape(B, Hkv * G, T, D), pos, self.cfg.rope_theta).view(B, Hkv, G, T, D)
        return rotate(x, positions, self.cfg.rope_theta)

    def forward(self, x, positions, layer_cache=None, explicit: bool = False, angles=None):
        """x (B, T, dim), positions (B, T) text positions of the rows. -> (B, T, dim).
        angles: rotary_angles(positions) when the caller computed them once for all layers, or None."""
        q, k, v = self.project(x)
        if layer_cache is None:  # plain causal attention over this call's rows
            q, k = self.rope(q, positions, angles), self.rope(k, positions, angles)
            if not explicit:
                return self.output(causal_attention(q, k, v))
            mask = (positions[:, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, T)
            mask = mask.expand(x.shape[0], self.cfg.n_kv_heads, *mask.shape[-2:])  # (B, Hkv, T, T)
            out, _ = attend(q, k, v, mask, need_probs=True)
            return self.output(out)
        fast = layer_cache.owner.fast and not explicit
        if fast and layer_cache.owner.fresh and (not layer_cache.needs_probs
                                                 or kernels.prefill_available(q, layer_cache.policy)):
            # fast twin: the first call into an empty cache sees exactly its own rows, causally
            # (slot ranks of a fresh cache are the text positions, so slot mode rotates alike)
            q, k_rot = self.rope(q, positions, angles), self.rope(k, positions, angles)
            sums = None
            if layer_cache.needs_probs:  # the fused kernel's row log-sum-exp, then the scores' column sums
                out, lse = kernels.causal_attention_lse(q, k_rot, v)
                sums = kernels.column_sums(q, k_rot, lse, layer_cache.row_weights(positions))  # (B, Hkv, T)
            else:
                out = causal_attention(q, k_rot, v)
            layer_cache.enter(k if layer_cache.rotate_on_read else k_rot, v, positions, sums)  # keys as stored
            return self.output(out)
        if not layer_cache.rotate_on_read:  # original positions: keys are stored rotated
            q, k = self.rope(q, positions, angles), self.rope(k, positions, angles)
        view = layer_cache.update(k, v, positions)  # what this call's rows may attend to
        k_all = view.keys
        if layer_cache.rotate_on_read:  # slot positions (StreamingLLM 3.2): rotate at read time, per layer
            q, k_all = self.rope(q, view.query_pos), self.rope(k_all, view.key_pos)
        need_probs = explicit or layer_cache.needs_probs
        B, Hkv, G, T, D = q.shape
        rows = max(1, min(T, ATTN_ELEMENTS // (B * Hkv * G * k_all.shape[2])))  # rows per chunk: no T x S buffer
        outs = []
        for r0 in range(0, T, rows):
            mask = view.mask(r0, r0 + rows)  # (B, Hkv, R, S)
            out, probs = attend(q[:, :, :, r0:r0 + rows], k_all, view.values, mask, need_probs, fast)
            layer_cache.observe(probs, mask, r0, r0 + rows)  # the policy's score update, chunk by chunk
            outs.append(out)
        layer_cache.evict()  # after this layer's attention, before the next layer runs
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)  # (B, Hkv, G, T, D)
        return self.output(out)


class MLP(nn.Module):
    """LLaMA: w_down(silu(w_gate x) * w_up x) (SwiGLU, Shazeer 2020). OPT: fc2(relu(fc1 x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.arch = cfg.arch
        if cfg.arch == "llama":
            self.w_gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.bias)
            self.w_up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.bias)
            self.w_down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.bias)
        else:
            self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.bias)
            self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.bias)
        self.register_buffer("w_gate_up", None, persistent=False)  # w_gate, w_up stacked (fuse_linears), or None
        self.register_buffer("w_gate_up_bias", None, persistent=False)

    def forward(self, x):
        if self.arch == "llama" and self.w_gate_up is not None:  # fast twin: one matmul for both
            gate, up = F.linear(x, self.w_gate_up, self.w_gate_up_bias).chunk(2, dim=-1)  # 2 x (B, T, hidden)
            return self.w_down(F.silu(gate) * up)
        if self.arch == "llama":
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        return self.fc2(F.relu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, layer_cache=None, explicit=False, angles=None):
        x = x + self.attn(self.attn_norm(x), positions, layer_cache, explicit, angles)
        return x + self.mlp(self.mlp_norm(x))


OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (fairseq padding legacy)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.arch == "opt":
            self.pos_emb = nn.Embedding(cfg.max_seq_len + OPT_POSITION_OFFSET, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def embed(self, tokens, positions):
        """tokens (B, T), positions (B, T) -> (B, T, dim)."""
        x = self.tok_emb(tokens)
        if self.cfg.arch == "opt":  # learned absolute positions; padding rows (pos < 0) clamp to 0
            x = x + self.pos_emb(positions.clamp(min=0) + OPT_POSITION_OFFSET)
        return x

    def head(self, x):
        """x (B, T, dim) -> logits (B, T, vocab)."""
        return self.lm_head(self.norm(x))

    def forward(self, tokens: torch.Tensor, cache=None, explicit: bool = False, block_fn=None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). explicit=True forces the softmax attention path.
        block_fn(block, x, positions, layer_cache, explicit, angles) runs each block (default:
        Block.forward); generate.compile_decode passes one compiled Block.forward that every layer
        shares. angles: the rotary cos and sin of positions, computed here once for every layer."""
        block_fn = block_fn or Block.forward
        B, T = tokens.shape
        if cache is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
        else:
            positions = cache.positions(T)  # (B, T): each row's position in its text
        x = self.embed(tokens, positions)
        angles = rotary_angles(positions, self.cfg.head_dim, self.cfg.rope_theta) if self.cfg.rotary else None  # (B, 1, T, D)
        for i, block in enumerate(self.layers):
            x = block_fn(block, x, positions, None if cache is None else cache.layers[i], explicit, angles)
        if cache is not None:
            cache.advance(T)
        return self.head(x)

    def fuse_projections(self) -> "Transformer":
        """Stack q, k, v (and LLaMA's gate and up) projections into one matmul each (fuse_linears):
        the fast twin of the separate ones. Call after moving the model to its device and dtype
        (a later .to() still works, but stores the stacked weights apart from the separate ones).
        The separate linears are no longer called: forward hooks on them stop firing, so code that
        hooks wq, wk, wv (the exercises do) runs on an unfused model, as load_weights.load returns."""
        for block in self.layers:
            if block.attn.wqkv is None:
                fuse_linears(block.attn, "wqkv", block.attn.wq, block.attn.wk, block.attn.wv)
            if self.cfg.arch == "llama" and block.mlp.w_gate_up is None:
                fuse_linears(block.mlp, "w_gate_up", block.mlp.w_gate, block.mlp.w_up)
        return self

    @property
    def device(self):
        return self.tok_emb.weight.device

    @property
    def dtype(self):
        return self.tok_emb.weight.dtype
