"""The papers' masked simulation of KV-cache eviction: the reference the real cache is held to.

One forward over the whole text, as H2O's and A2SF's evaluation code does it: every key stays
in memory, and row t of each layer attends only to the tokens that layer would hold at step t.
Within a layer the rows go call by call (a call = `chunk` rows in streaming mode; the prompt,
then one row at a time, in prefill mode); after each call the scores are updated with the
policy's own function and the lowest-priority tokens leave the kept set, one sorted Python list
per sequence and KV head, as plainly as the papers describe it.

It shares the policy's functions (policies.token_state, accumulate, priority: the one hook every
path ranks by) with cache.py and nothing else: no storage, no slots, no top-k. A test holds the
two to the same logits; tests/test_policies.py holds the policy functions to closed forms.
"""

from __future__ import annotations

import math

import torch

import policies
from model import rotary_angles
from policies import Policy, Tokens


def call_bounds(T: int, mode: str, chunk: int, prompt_len: int | None) -> list[tuple[int, int]]:
    """[start, end) of each attention call over a text of T tokens."""
    if mode == "prefill":
        first = T if prompt_len is None else prompt_len
        return [(0, first)] + [(s, min(s + chunk, T)) for s in range(first, T, chunk)]
    return [(s, min(s + chunk, T)) for s in range(0, T, chunk)]


def masked_simulation(model, tokens: torch.Tensor, policy: Policy, budget: int | None, *,
                      mode: str = "streaming", chunk: int = 1, positions: str = "original",
                      prompt_len: int | None = None):
    """tokens (B, T) -> logits (B, T, vocab) and, per layer, the mask (B, Hkv, T, T) of the keys
    each row attended to (True = seen). Same arguments as cache.KVCache."""
    cfg = model.cfg
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device)
    text_pos = pos.expand(B, T)  # (B, T)
    key_pos = text_pos[:, None, :].expand(B, cfg.n_kv_heads, T)  # (B, Hkv, T)
    calls = call_bounds(T, mode, chunk, prompt_len)
    x = model.embed(tokens, text_pos)
    score_dtype = torch.promote_types(x.dtype, torch.float32)
    masks = []
    for layer, block in enumerate(model.layers):
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x))  # q (B, Hkv, G, T, D), k and v (B, Hkv, T, D)
        if positions == "original":
            q, k = attn.rope(q, model.angles(text_pos)), attn.rope(k, model.angles(text_pos))
        kept = torch.zeros(B, cfg.n_kv_heads, T, dtype=torch.bool, device=x.device)  # in the cache now
        state = policies.token_state(policy, k, v, score_dtype)  # every token's, from the start
        seen = torch.zeros(B, cfg.n_kv_heads, T, T, dtype=torch.bool, device=x.device)
        out = torch.zeros_like(q)
        for s, e in calls:
            kept[..., s:e] = True  # the call's tokens enter the cache
            mask = kept[:, :, None, :] & (pos[None, :] <= pos[s:e, None])  # (B, Hkv, e-s, T) causal
            if cfg.window:  # sliding window: row i sees i - window < j <= i
                mask &= pos[None, :] > pos[s:e, None] - cfg.window
            qc, kc = q[..., s:e, :], k
            if positions == "slot":  # StreamingLLM: rank inside the cache is the position
                rank = kept.long().cumsum(-1) - 1  # (B, Hkv, T)
                qc = attn.rope(qc, rotary_angles(rank[..., s:e], cfg))
                kc = attn.rope(k, rotary_angles(rank, cfg))
            logits = qc.to(score_dtype) @ kc.to(score_dtype)[:, :, None].transpose(-1, -2) / math.sqrt(cfg.head_dim)
            probs = logits.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)  # (B, Hkv, G, e-s, T)
            out[..., s:e, :] = probs.to(v.dtype) @ v[:, :, None]
            seen[:, :, s:e] = mask
            if policy.scored:
                state = policies.accumulate(policy, state, probs, mask, text_pos[:, s:e])
            if cfg.window:  # keys the next row (at e) cannot see leave the cache
                kept &= pos > e - cfg.window
            if budget is not None and not policy.keep_all:
                newest = torch.full((B,), e - 1, device=x.device)
                prio = policies.priority(policy, Tokens(k, v, key_pos, kept, state), newest, layer)
                kept = _evict_plainly(kept, prio, budget)
        x = x + attn.output(out)
        x = x + block.mlp(block.mlp_norm(x))
        masks.append(seen)
    return model.head(x), masks


def _evict_plainly(kept, prio, budget):
    """For each sequence and KV head: while more than `budget` tokens are kept, drop the one with
    the lowest priority (the oldest among equals)."""
    new, prio = kept.tolist(), prio.tolist()  # plain Python lists: one copy from the device per call
    for b in range(len(new)):
        for g in range(len(new[b])):
            held = [j for j, k in enumerate(new[b][g]) if k]
            held.sort(key=lambda j: (prio[b][g][j], j))  # lowest priority first, then oldest
            for j in held[: max(0, len(held) - budget)]:
                new[b][g][j] = False
    return torch.tensor(new, dtype=torch.bool, device=kept.device)
