"""A minimal LLaMA / OPT decoder whose attention talks to an explicit KV cache.

One file, read top to bottom: the config and its presets, the pieces (norms, rotary positions,
attention, MLP), the block and the transformer. The forward pass is

    model(tokens, cache=None) -> logits          tokens (B, T) long, logits (B, T, vocab)

With no cache, every row attends causally to the rows before it (positions 0..T-1). With a
cache (cache.py), positions come from the cache, and each layer's attention (Attention.forward)
goes: project, rotate, `call = cache.update(k, v)` (the new tokens enter), attend over what the
call may see, `cache.observe(call, probs)` (the policy's score update, when it scores tokens),
`cache.evict(call)`, output.

This file is the reference: plain torch, read in one sitting. Its speed twins (fused projections,
Triton kernels, the prompt's fast ranking, compiled and graph-captured steps) live in fast/ and
are switched on with fast.enable(model); tests hold them equal to this file.

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


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for contexts past pretraining (rope_frequencies)."""

    kind: str = "default"  # "default", "linear", "llama3", "yarn", or "factors" (llama.cpp's rope_freqs tensor)
    factor: float = 1.0  # how much longer a context than in pretraining
    original_max: int = 0  # the pretraining context (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: rotations over the pretraining context where interpolation stops ...
    beta_slow: float = 1.0  # ... and where it is complete
    attention_factor: float = 0.0  # yarn: cos and sin scaled by it; 0: 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: the ramp's ends rounded to whole dimensions
    divisors: tuple = ()  # factors: each inverse frequency divided by its own (D/2 floats)


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
    qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before rotation (Qwen3)
    window: int = 0  # sliding-window attention: row i sees keys i - window < j <= i (Mistral); 0: all before it
    rope_scaling: RopeScaling = RopeScaling()

    def __post_init__(self):
        if self.arch not in ("llama", "opt"):
            raise ValueError(f"unknown architecture {self.arch!r}: use 'llama' or 'opt'")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope_scaling.kind not in ("default", "linear", "llama3", "yarn", "factors"):
            raise ValueError(f"unknown rope scaling {self.rope_scaling.kind!r}: use linear, llama3 or yarn")

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
    "llama-2-70b": Config(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, max_seq_len=4096),
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


def rope_frequencies(cfg: Config, device=None) -> tuple[torch.Tensor, float]:
    """The rotary inverse frequencies (D/2,) fp32 of a config, its scaling applied, and the factor
    cos and sin are multiplied by (1 but for yarn). Every rotary call takes its angles from here."""
    D, s = cfg.head_dim, cfg.rope_scaling
    inv_freq = cfg.rope_theta ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)  # RoFormer Eq. 15
    if s.kind == "linear":  # position interpolation (Chen et al. 2023, arXiv 2306.15595, Eq. 2): pos / factor
        return inv_freq / s.factor, 1.0
    if s.kind == "factors":  # llama.cpp's rope_freqs.weight: Llama 3's scaling, precomputed per frequency
        return inv_freq / torch.tensor(s.divisors, device=device, dtype=torch.float32), 1.0
    if s.kind == "llama3":  # Llama 3.1 (arXiv 2407.21783; Meta's apply_scaling): long waves / factor, short kept
        wavelen = 2 * math.pi / inv_freq
        keep = ((s.original_max / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
        return (1 - keep) * inv_freq / s.factor + keep * inv_freq, 1.0  # keep: 0 long waves, 1 short, a ramp between
    if s.kind == "yarn":  # YaRN (Peng et al. 2023, arXiv 2309.00071, Eq. 18-21): "NTK-by-parts", then scale
        def dim_of(rotations):  # the dimension that turns `rotations` times over the pretraining context
            return D * math.log(s.original_max / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, D - 1)
        ramp = ((torch.arange(D // 2, device=device, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
        inv_freq = ramp * inv_freq / s.factor + (1 - ramp) * inv_freq  # ramp: 0 extrapolate (fast), 1 interpolate
        return inv_freq, s.attention_factor or (0.1 * math.log(s.factor) + 1 if s.factor > 1 else 1.0)  # Eq. 22
    return inv_freq, 1.0


def rotary_angles(positions: torch.Tensor, cfg: Config):
    """cos and sin (B, H|1, T, D) fp32 of the rotary angles for positions (B, T) or (B, H, T).

    Rotate-half layout (RoFormer Eq. 34; the Hugging Face convention): dimension i pairs with
    i + D/2, and both turn by angle pos * inv_freq[i] (rope_frequencies). Checkpoints stored for
    the interleaved (Meta / GGUF) layout have their Q and K rows permuted into this one by the loader.
    """
    inv_freq, scale = rope_frequencies(cfg, positions.device)  # (D/2,)
    if positions.dim() == 2:
        positions = positions[:, None, :]  # (B, 1, T): the same positions for every head
    angles = positions.float()[..., None] * inv_freq  # (B, H|1, T, D/2)
    angles = torch.cat([angles, angles], -1)  # (B, H|1, T, D): i and i + D/2 turn alike
    return angles.cos() * scale, angles.sin() * scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, D) turned by angles whose cos and sin broadcast to it: x cos + rotate_half(x) sin,
    where rotate_half(x) = (-x2, x1) for the halves x1, x2 of x. Computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # (..., T, D)
    return (x.float() * cos + rotated * sin).type_as(x)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x (B, H, T, D) by positions (B, T) or (B, H, T), unscaled frequencies of base theta."""
    D = x.shape[-1]
    return apply_rotary(x, *rotary_angles(positions, Config(dim=D, n_heads=1, n_kv_heads=1, rope_theta=theta)))


def attend(q, k, v, mask, need_probs: bool):
    """Attention of query rows over a set of keys, per KV-head group.

    q (B, Hkv, G, T, D), k and v (B, Hkv, S, D), mask (B, Hkv, T, S) bool (True = may attend).
    Returns out (B, Hkv, G, T, D) and the probabilities (B, Hkv, G, T, S), or None.
    The G query heads of a group are folded into the rows, so keys and values are never copied
    per query head.

    need_probs: the explicit path, softmax(q k^T / sqrt(D)) (Vaswani et al. 2017, Eq. 1) in fp32
    at least, whose probabilities a scoring policy needs. Otherwise the fused
    scaled_dot_product_attention, which returns none. A test holds the two paths equal.
    """
    B, Hkv, G, T, D = q.shape
    S = k.shape[2]
    rows = q.reshape(B, Hkv, G * T, D)  # (B, Hkv, G*T, D)
    if need_probs:
        ct = torch.promote_types(q.dtype, torch.float32)  # the policies score in fp32 at least
        scores = (rows.to(ct) @ k.to(ct).transpose(-1, -2)).view(B, Hkv, G, T, S) / math.sqrt(D)  # (B, Hkv, G, T, S)
        probs = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(dim=-1)
        out = probs.to(v.dtype).view(B, Hkv, G * T, S) @ v  # (B, Hkv, G*T, D)
        return out.view(B, Hkv, G, T, D), probs
    group_mask = mask[:, :, None].expand(B, Hkv, G, T, S).reshape(B, Hkv, G * T, S)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=group_mask)  # (B, Hkv, G*T, D)
    return out.view(B, Hkv, G, T, D), None


def causal_attention(q, k, v, window: int = 0):
    """No cache: the fused causal kernel. q (B, Hkv, G, T, D), k and v (B, Hkv, T, D).
    window > 0: row i sees only keys i - window < j <= i (sliding-window attention, Mistral)."""
    B, Hkv, G, T, D = q.shape
    rows = q.reshape(B, Hkv * G, T, D)
    if window and T > window:
        i = torch.arange(T, device=q.device)
        near = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # (T, T)
        out = F.scaled_dot_product_attention(rows, k, v, attn_mask=near, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(rows, k, v, is_causal=True, enable_gqa=True)
    return out.view(B, Hkv, G, T, D)


ATTN_ELEMENTS = 2**26  # attention with a cache runs in row chunks of at most this many scores (256 MB fp32)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, H * D, bias=cfg.bias or cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, Hkv * D, bias=cfg.bias or cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, Hkv * D, bias=cfg.bias or cfg.qkv_bias)
        self.wo = nn.Linear(H * D, cfg.dim, bias=cfg.bias)
        if cfg.qk_norm:  # Qwen3: each head's q and k normalized (one weight of D, shared by the heads)
            self.q_norm, self.k_norm = RMSNorm(D, cfg.norm_eps), RMSNorm(D, cfg.norm_eps)

    def project(self, x):
        """x (B, T, dim) -> q (B, Hkv, G, T, D), k and v (B, Hkv, T, D), before any rotation."""
        return self.heads(self.wq(x), self.wk(x), self.wv(x))

    def heads(self, q, k, v):
        """q (B, T, H*D), k and v (B, T, Hkv*D) -> q (B, Hkv, G, T, D), k and v (B, Hkv, T, D),
        each head of q and k normalized where the config says so (qk_norm)."""
        cfg = self.cfg
        B, T, _ = q.shape
        q = q.view(B, T, cfg.n_kv_heads, cfg.group, cfg.head_dim).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, T, D)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def output(self, out):
        """out (B, Hkv, G, T, D) -> (B, T, dim)."""
        B, Hkv, G, T, D = out.shape
        return self.wo(out.permute(0, 3, 1, 2, 4).reshape(B, T, Hkv * G * D))  # (B, T, H*D) -> (B, T, dim)

    def rope(self, x, angles):
        """x (B, Hkv, [G,] T, D) turned by angles = (cos, sin) (B, Hkv|1, T, D) (rotary_angles);
        None (OPT: its positions are learned and added to the embeddings) leaves x as it is."""
        if angles is None:
            return x
        cos, sin = angles if x.dim() == 4 else (a[:, :, None] for a in angles)  # queries: the same for the group
        return apply_rotary(x, cos, sin)

    def attend(self, q, k, v, mask, need_probs: bool):
        return attend(q, k, v, mask, need_probs)

    def forward(self, x, positions, angles, layer_cache=None):
        """x (B, T, dim); positions (B, T) the rows' text positions; angles their rotary (cos, sin)
        or None (OPT). -> (B, T, dim)."""
        q, k, v = self.project(x)  # q (B, Hkv, G, T, D), k and v (B, Hkv, T, D)
        return self.output(self.forward_heads(q, k, v, positions, angles, layer_cache))

    def forward_heads(self, q, k, v, positions, angles, layer_cache=None):
        """The middle of forward, from the projected heads (project) to the heads' outputs, before
        wo: rotate, the cache's update, attend, the policy's score update, evict.
        -> (B, Hkv, G, T, D)."""
        if layer_cache is None:  # no cache: plain causal attention over this call's rows
            return causal_attention(self.rope(q, angles), self.rope(k, angles), v, self.cfg.window)
        if not layer_cache.rotate_on_read:  # original positions: keys are stored rotated
            q, k = self.rope(q, angles), self.rope(k, angles)
        call = layer_cache.update(k, v, positions)  # the new tokens enter; what the rows may attend to
        keys = call.keys  # (B, Hkv, S, D)
        if layer_cache.rotate_on_read:  # slot positions (StreamingLLM 3.2): rotate by rank in the cache, at read time
            q = self.rope(q, rotary_angles(call.query_pos, self.cfg))
            keys = self.rope(keys, rotary_angles(call.key_pos, self.cfg))
        B, Hkv, G, T, D = q.shape
        rows = max(1, min(T, ATTN_ELEMENTS // (B * Hkv * G * keys.shape[2])))  # rows per chunk: no T x S buffer
        outs = []
        for r0 in range(0, T, rows):
            mask = call.mask(r0, r0 + rows)  # (B, Hkv, R, S)
            out, probs = self.attend(q[:, :, :, r0:r0 + rows], keys, call.values, mask, layer_cache.needs_probs)
            layer_cache.observe(call, probs, mask, r0, r0 + rows)  # the policy's sum over these rows
            outs.append(out)
        layer_cache.evict(call)  # after this layer's attention, before the next layer runs
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)  # (B, Hkv, G, T, D)


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

    def forward(self, x):
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

    def forward(self, x, positions, angles, layer_cache=None):
        x = x + self.attn(self.attn_norm(x), positions, angles, layer_cache)
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

    def angles(self, positions):
        """The rotary (cos, sin) (B, 1, T, D) of positions (B, T), once for every layer; None for OPT."""
        return rotary_angles(positions, self.cfg) if self.cfg.rotary else None

    def head(self, x):
        """x (B, T, dim) -> logits (B, T, vocab)."""
        return self.lm_head(self.norm(x))

    def forward(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). With a cache, each layer's attention goes through
        its layer of the cache (cache.py), and the positions come from the cache."""
        B, T = tokens.shape
        if cache is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
        else:
            positions = cache.positions(T)  # (B, T): each row's position in its text
        x = self.embed(tokens, positions)  # (B, T, dim)
        angles = self.angles(positions)
        for i, block in enumerate(self.layers):
            x = block(x, positions, angles, None if cache is None else cache.layers[i])
        return self.head(x)

    @property
    def device(self):
        return self.tok_emb.weight.device

    @property
    def dtype(self):
        return self.tok_emb.weight.dtype
