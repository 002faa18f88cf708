"""The model's speed twins, swapped into a reference model by fast.enable(model):

- fused projections: q, k, v (and LLaMA's gate and up) as one matmul each (fuse_linears);
- the decode step's attention as one Triton pass over the keys (kernels.decode_attention), and
  the explicit path's q k^T as one half-precision matmul with fp32 output (half_scores);
- the prompt's twin: a first call into an empty fast.KVCache attends with the fused causal kernel,
  takes the policy's score update from the kernel's log-sum-exp (kernels.column_sums) and ranks,
  for many layers at once (fast.cache.rank_prompt), and writes only the kept tokens;
- in a decode step, the new token's free slot, rotary, its write into the cache and the step's mask
  as one kernel (kernels.append_step; Attention.forward_heads, fast.cache.LayerCache.append), that kernel
  joined to the attention's where the attention's splits merge in its own pass (kernels.append_attention,
  LayerCache.append_attend), and its policy state started inside the eviction (fast.cache.LayerCache.evict);
- in a decode step of one sequence, each projection one kernel with its neighbours
  (kernels.linear_rows): the norm into wqkv and w_gate_up (and the final one into lm_head), the
  residual add into wo and w_down, SwiGLU into w_gate_up (Block.forward, Transformer.head);
- Transformer.forward(tokens, cache, block_fn): each block through block_fn (one compiled
  Block.forward for every layer: fast.step.compile_decode).

Every piece keeps its reference in model.py and a test that holds the two equal (tests/test_fast.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import model as reference
from fast import kernels
from fast.cache import KVCache as FastKVCache
from fast.cache import LayerCache as FastLayerCache
from fast.cache import Prompt, rank_prompt

BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")  # torch.bmm(a, b, out_dtype=...): torch >= 2.8, CUDA kernels only

# A prompt's layers wait for their ranking until their keys and values hold this many bytes (or the
# call ends): one ranking for many layers is one set of tensor ops instead of one per layer, which is
# what a short prompt's prefill costs on a GPU (it is bound by kernel launches).
PENDING_BYTES = 2**28


def half_scores(rows, k):
    """q k^T as one bf16 / fp16 batched matmul that accumulates in and writes fp32 (CUDA only).
    rows (B, Hkv, R, D), k (B, Hkv, S, D) -> (B, Hkv, R, S) fp32. It loses nothing against
    upcasting first (model.attend): the product of two half-precision numbers is exact in fp32, so
    only the order of the fp32 additions differs; upcasting copies q and k to fp32 first, slower."""
    B, Hkv, R, D = rows.shape
    S = k.shape[2]
    kt = k.reshape(B * Hkv, S, D).transpose(1, 2)  # (B*Hkv, D, S): a view of contiguous keys (the cache's), no copy
    return torch.bmm(rows.reshape(B * Hkv, R, D), kt, out_dtype=torch.float32).view(B, Hkv, R, S)


def half_scores_apply(q, k) -> bool:
    return BMM_OUT_DTYPE and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype


def fuse_linears(owner: nn.Module, name: str, *linears: nn.Linear) -> None:
    """Registers on `owner` the buffer `name` (the linears' weights stacked, out_features summed) and
    `name + "_bias"`, and makes each linear's weight and bias a view into them, so nothing is
    stored twice and state_dict is unchanged. One matmul instead of several: one launch, and in
    decode, which only streams the weights, a larger matrix streams closer to the memory bandwidth."""
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])  # (sum of out_features, in_features)
        bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    owner.register_buffer(name, weight, persistent=False)
    owner.register_buffer(name + "_bias", bias, persistent=False)
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(weight[row:row + n], requires_grad=lin.weight.requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row:row + n], requires_grad=lin.bias.requires_grad)
        row += n


# The decode step's rotary, cache write and mask as one kernel (kernels.append_step) where it applies
# (append_applies); False: never (bench.py --no-append, to time the two side by side).
APPEND = True


# In a decode step the append kernel joined to the attention's (kernels.append_attention,
# fast.cache.LayerCache.append_attend) where it applies (LayerCache.joins); False: never (bench.py --no-join,
# to time the two side by side).
JOIN = True


def append_applies(q, angles, layer_cache) -> bool:
    """Whether a call's new token enters the cache through kernels.append_step: one row per sequence
    (T = 1), the kernels apply to q (CUDA, half precision), rotary positions (not OPT's learned ones),
    and a fast.KVCache layer that stores keys rotated (original positions; slot positions rotate at read)."""
    return (APPEND and q.shape[3] == 1 and angles is not None and kernels.available(q)
            and isinstance(layer_cache, FastLayerCache) and not layer_cache.rotate_on_read)


class Attention(reference.Attention):
    def project(self, x):
        cfg = self.cfg
        sizes = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
        return self.heads(*F.linear(x, self.wqkv, self.wqkv_bias).split(sizes, dim=-1))  # one matmul, then split

    def attend(self, q, k, v, mask, need_probs: bool):
        if q.shape[3] == 1 and kernels.available(q):  # one row per sequence: one pass over the keys
            return kernels.decode_attention(q, k, v, mask, need_probs)
        if not (need_probs and half_scores_apply(q, k)):
            return super().attend(q, k, v, mask, need_probs)
        B, Hkv, G, T, D = q.shape
        scores = half_scores(q.reshape(B, Hkv, G * T, D), k) / math.sqrt(D)  # (B, Hkv, G*T, S) fp32
        probs = scores.view(B, Hkv, G, T, -1).masked_fill(~mask[:, :, None], float("-inf")).softmax(dim=-1)
        return (probs.to(v.dtype).flatten(2, 3) @ v).view(B, Hkv, G, T, D), probs

    def forward_heads(self, q, k, v, positions, angles, layer_cache=None):
        """model.Attention.forward_heads; in a decode step (append_applies) the new token's rotary,
        its write into the cache and the mask in one kernel (fast.cache.LayerCache.append), joined to the
        attention's where it fits (JOIN, LayerCache.append_attend), the new token's policy state started in
        the eviction (fast.cache.LayerCache.evict)."""
        if not append_applies(q, angles, layer_cache):
            return super().forward_heads(q, k, v, positions, angles, layer_cache)
        if JOIN and layer_cache.joins(q):  # the append and the attention: one kernel
            out, probs, call, mask, fresh = layer_cache.append_attend(q, k, v, positions, angles, self.cfg.window)
        else:
            q, call, mask, fresh = layer_cache.append(q, k, v, positions, angles, self.cfg.window)
            out, probs = self.attend(q, call.keys, call.values, mask, layer_cache.needs_probs)
        layer_cache.observe(call, probs, mask, 0, 1)
        layer_cache.evict(call, fresh)
        return out

    def prompt(self, x, positions, angles, layer_cache) -> tuple[torch.Tensor, Prompt]:
        """The twin of forward for a first call into an empty cache: row i sees tokens 0..i, so the
        fused causal kernel attends, with each row's log-sum-exp where the policy scores: from it
        rank_prompt takes the policy's update for the whole call, the weighted column sums of this
        attention (kernels.column_sums), for many layers at once.
        -> the attention's output (B, T, dim) and this layer's part for rank_prompt."""
        q, k, v = self.project(x)  # q (B, Hkv, G, T, D), k and v (B, Hkv, T, D)
        q_rot, k_rot = self.rope(q, angles), self.rope(k, angles)  # a fresh cache's slot ranks are the positions
        stored = k if layer_cache.rotate_on_read else k_rot
        if not layer_cache.policy.scored:
            return self.output(reference.causal_attention(q_rot, k_rot, v)), Prompt(layer_cache, stored, v)
        out, lse = kernels.causal_attention_lse(q_rot, k_rot, v)  # lse (B, Hkv, G, T)
        return self.output(out), Prompt(layer_cache, stored, v, q_rot, k_rot, lse)


class MLP(reference.MLP):
    def forward(self, x):
        if self.arch != "llama":
            return super().forward(x)
        gate, up = F.linear(x, self.w_gate_up, self.w_gate_up_bias).chunk(2, dim=-1)  # one matmul for both
        return self.w_down(F.silu(gate) * up)


# Decode-step projections through kernels.linear_rows where they apply (rows_apply); False: never
# (bench.py --no-rows, to time the two side by side).
ROWS = True


def rows_apply(x, *linears: nn.Module) -> bool:
    """Whether a decode step's projections run as kernels.linear_rows (norm, matmul and what follows
    in one kernel): the Triton kernels apply to x (CUDA, half precision), x is one new token of one
    sequence, and the linears are plain nn.Linear (tp.RowParallelLinear all-reduces after its
    matmul: the block's reference path runs)."""
    return (ROWS and kernels.available(x) and x.shape[:2] == (1, 1)
            and all(type(lin) is nn.Linear for lin in linears))


class Block(reference.Block):
    def forward(self, x, positions, angles, layer_cache=None):
        """model.Block.forward with, in a decode step (rows_apply), each projection one kernel with
        its neighbours fused (kernels.linear_rows): attn_norm into wqkv, the residual add into wo,
        mlp_norm into w_gate_up with the SwiGLU after it, the residual add into w_down. x (B, T, dim)."""
        attn, mlp = self.attn, self.mlp
        if mlp.arch != "llama" or not rows_apply(x, attn.wo, mlp.w_down):
            return super().forward(x, positions, angles, layer_cache)
        cfg = attn.cfg
        sizes = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
        qkv = kernels.linear_rows(x, attn.wqkv, attn.wqkv_bias, norm=self.attn_norm.weight, eps=self.attn_norm.eps)
        out = attn.forward_heads(*attn.heads(*qkv.split(sizes, dim=-1)), positions, angles, layer_cache)
        B, Hkv, G, T, D = out.shape  # (B, Hkv, G, T, D) -> (B, T, H*D), as Attention.output
        x = kernels.linear_rows(out.permute(0, 3, 1, 2, 4).reshape(B, T, Hkv * G * D), attn.wo.weight, attn.wo.bias,
                                residual=x)
        h = kernels.linear_rows(x, mlp.w_gate_up, mlp.w_gate_up_bias, norm=self.mlp_norm.weight, eps=self.mlp_norm.eps,
                                glu=True)  # (B, T, hidden)
        return kernels.linear_rows(h, mlp.w_down.weight, mlp.w_down.bias, residual=x)


class Transformer(reference.Transformer):
    def forward(self, tokens, cache=None, block_fn=None, embed_fn=None):
        """model.Transformer.forward, with the prompt's twin for a first call into an empty
        fast.KVCache, and each block through block_fn(block, x, positions, angles, layer_cache)
        when given (fast.step.compile_decode), the embedding and rotary angles through
        embed_fn(model, tokens, positions) when given (embed_and_angles compiled: one kernel or two
        where the eager rotary angles are eight)."""
        if isinstance(cache, FastKVCache) and cache.held == 0 and not cache.padded and self.prompt_applies(cache):
            return self.prompt(tokens, cache)
        if block_fn is None:
            return super().forward(tokens, cache)
        positions = cache.positions(tokens.shape[1])  # (B, T)
        x, angles = (embed_fn or Transformer.embed_and_angles)(self, tokens, positions)
        for block, layer_cache in zip(self.layers, cache.layers):
            x = block_fn(block, x, positions, angles, layer_cache)
        return self.head(x)

    def embed_and_angles(self, tokens, positions):
        """model.Transformer.forward's first two steps: the embedding (B, T, dim) and the rotary angles."""
        return self.embed(tokens, positions), self.angles(positions)

    def head(self, x):
        """model.Transformer.head; in a decode step (rows_apply) the final norm fused into lm_head."""
        if self.cfg.arch != "llama" or not rows_apply(x, self.lm_head):
            return super().head(x)
        return kernels.linear_rows(x, self.lm_head.weight, norm=self.norm.weight, eps=self.norm.eps)

    def prompt_applies(self, cache) -> bool:
        """Whether the prompt's twin runs: a policy with no scores, or the kernels for its scores; never
        with a sliding window (its causal kernels see every key before a row: the reference path runs)."""
        if self.cfg.window:
            return False
        return not cache.policy.scored or kernels.prefill_available(self.device, self.dtype, cache.policy, self.cfg)

    def prompt(self, tokens, cache):
        """The prompt's twin (Attention.prompt for each layer, then rank_prompt for groups of layers)."""
        positions = cache.positions(tokens.shape[1])  # (B, T)
        x, angles = self.embed(tokens, positions), self.angles(positions)
        waiting = []
        for block, layer_cache in zip(self.layers, cache.layers):  # model.Block.forward, with the prompt's attention
            out, part = block.attn.prompt(block.attn_norm(x), positions, angles, layer_cache)
            x, out = x + out, None
            waiting.append(part)
            if len(waiting) * part.nbytes >= PENDING_BYTES:  # every layer's part is as large
                rank_prompt(cache, waiting, positions)  # before the MLP: its keys and values are freed first
                waiting = []
            part = None
            x = x + block.mlp(block.mlp_norm(x))
        rank_prompt(cache, waiting, positions)
        waiting = None  # the layers' keys and values (views of their projections) are freed before the logits
        return self.head(x)


def enable(model: reference.Transformer) -> Transformer:
    """Swap the speed twins into a reference model, in place, and return it: fused projections,
    the Triton attention kernels, the prompt's twin (with a fast.KVCache). Call after moving the
    model to its device and dtype (a later .to() still works, but stores the stacked weights apart
    from the separate ones). Forward hooks on wq, wk, wv, w_gate, w_up stop firing: code that
    hooks them (the exercises do) runs on the reference model, as load_weights.load returns it."""
    model.__class__ = Transformer
    for block in model.layers:
        block.__class__ = Block
        if not isinstance(block.attn, Attention):
            block.attn.__class__ = Attention
            fuse_linears(block.attn, "wqkv", block.attn.wq, block.attn.wk, block.attn.wv)
        if not isinstance(block.mlp, MLP):
            block.mlp.__class__ = MLP
            if model.cfg.arch == "llama":
                fuse_linears(block.mlp, "w_gate_up", block.mlp.w_gate, block.mlp.w_up)
    return model
