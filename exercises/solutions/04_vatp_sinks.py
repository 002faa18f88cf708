"""Exercise 04, reference solution: VATP's score, value norms, when token 0 leaves, KL to full."""

import torch

from cache import KVCache


def vatp_update(scores, probs, q_pos, values) -> torch.Tensor:
    """VATP's running score after one call (Guo et al. 2024, Eq. 4, on H2O's base): the attention
    token j received, weighted by the L1 norm of its value vector,

        s[b, g, j] <- s[b, g, j] + ||v[b, g, j]||_1 * sum over real rows q and the group's heads h of A[b, g, h, q, j]

    scores (B, Hkv, S); probs (B, Hkv, G, T, S); q_pos (B, T) (< 0 = padding row, adds nothing);
    values (B, Hkv, S, D). Returns the new scores (B, Hkv, S) float32.
    """
    received = torch.einsum("bghts,bt->bgs", probs.float(), (q_pos >= 0).float())
    return scores.float() + values.float().abs().sum(-1) * received


@torch.no_grad()
def value_norms(model, tokens) -> torch.Tensor:
    """tokens (B, T) -> (n_layers, B, Hkv, T): ||v_j||_1 of every token's value vector in every layer
    and KV head, from a plain forward of the model (no cache). Values carry no rotary embedding.
    Hint: a forward hook on each layer's `attn.wv`, or your loop of exercise 01 with attn.project."""
    cfg = model.cfg
    B, T = tokens.shape
    out = []
    hooks = [b.attn.wv.register_forward_hook(lambda mod, args, v: out.append(v)) for b in model.layers]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([v.view(B, T, cfg.n_kv_heads, cfg.head_dim).abs().sum(-1).transpose(1, 2).float() for v in out])


@torch.no_grad()
def token0_seen(model, tokens, policy, budget: int, chunk: int) -> torch.Tensor:
    """Feed tokens (B, T) through a streaming cache.KVCache(model.cfg, policy, budget, batch=B,
    chunk=chunk) in calls of `chunk` tokens. Returns (n_layers, B, Hkv, T) bool: whether row t of
    each layer and KV head could attend to token 0, i.e. token 0 was still in that head's cache
    when row t's call ran (eviction happens after a call). Hint: KVCache.kept_mask(layer, length)."""
    B, T = tokens.shape
    L = model.cfg.n_layers
    cache = KVCache(model.cfg, policy, budget, batch=B, chunk=chunk)
    seen = torch.zeros(L, B, model.cfg.n_kv_heads, T, dtype=torch.bool)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        for layer in range(L):  # before the call: what its rows will see (token 0 enters with the first call)
            seen[layer, :, :, s:e] = True if s == 0 else cache.kept_mask(layer, 1)[..., :1]
        model(tokens[:, s:e], cache)
    return seen


def kl_to_full(logits, full_logits) -> float:
    """Mean over every (sequence, position) of KL(p_full || p), p = softmax of the logits (B, T, V)
    of a run with eviction, p_full of the full cache: how far eviction moved the predictions."""
    lp, lq = full_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())
