"""Exercise 04: VATP's value norm, and whether the sinks need protecting. Fill in the four
functions (README.md)."""

import torch


def vatp_update(scores, probs, q_pos, values) -> torch.Tensor:
    """VATP's running score after one call (Guo et al. 2024, Eq. 4, on H2O's base): the attention
    token j received, weighted by the L1 norm of its value vector,

        s[b, g, j] <- s[b, g, j] + ||v[b, g, j]||_1 * sum over real rows q and the group's heads h of A[b, g, h, q, j]

    scores (B, Hkv, S); probs (B, Hkv, G, T, S); q_pos (B, T) (< 0 = padding row, adds nothing);
    values (B, Hkv, S, D). Returns the new scores (B, Hkv, S) float32.
    """
    raise NotImplementedError("vatp_update")


@torch.no_grad()
def value_norms(model, tokens) -> torch.Tensor:
    """tokens (B, T) -> (n_layers, B, Hkv, T): ||v_j||_1 of every token's value vector in every layer
    and KV head, from a plain forward of the model (no cache). Values carry no rotary embedding.
    Hint: a forward hook on each layer's `attn.wv`, or your loop of exercise 01 with attn.project."""
    raise NotImplementedError("value_norms")


@torch.no_grad()
def token0_seen(model, tokens, policy, budget: int, chunk: int) -> torch.Tensor:
    """Feed tokens (B, T) through a streaming cache.KVCache(model.cfg, policy, budget, batch=B,
    chunk=chunk) in calls of `chunk` tokens. Returns (n_layers, B, Hkv, T) bool: whether row t of
    each layer and KV head could attend to token 0, i.e. token 0 was still in that head's cache
    when row t's call ran (eviction happens after a call). Hint: KVCache.kept_mask(layer, length)."""
    raise NotImplementedError("token0_seen")


def kl_to_full(logits, full_logits) -> float:
    """Mean over every (sequence, position) of KL(p_full || p), p = softmax of the logits (B, T, V)
    of a run with eviction, p_full of the full cache: how far eviction moved the predictions."""
    raise NotImplementedError("kl_to_full")
