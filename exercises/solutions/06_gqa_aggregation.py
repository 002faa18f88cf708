"""Exercise 06, reference solution: aggregate a GQA group, run a policy, overlap of kept sets."""

import torch

from cache import KVCache


def aggregate_group(probs: torch.Tensor, how: str) -> torch.Tensor:
    """probs (B, Hkv, G, T, S), the attention of the G query heads that share each KV head ->
    (B, Hkv, T, S) float32, one score row per KV head: how = "sum" (the project's default),
    "max" (KVCache-Factory's option) or "mean" (the sum divided by G)."""
    probs = probs.float()
    if how == "sum":
        return probs.sum(dim=2)
    if how == "max":
        return probs.amax(dim=2)
    if how == "mean":
        return probs.mean(dim=2)
    raise ValueError(f"how={how!r}: use sum, max or mean")


@torch.no_grad()
def run_policy(model, tokens, policy, budget: int, chunk: int):
    """Stream tokens (B, T) through a cache.KVCache(model.cfg, policy, budget, batch=B, chunk=chunk)
    in calls of `chunk` tokens. Returns (logits (B, T, V), kept) where kept is a list, one entry per
    layer, of (B, Hkv, T) bool: which text positions each KV head holds at the end."""
    B, T = tokens.shape
    cache = KVCache(model.cfg, policy, budget, batch=B, chunk=chunk)
    logits = torch.cat([model(tokens[:, s:s + chunk], cache) for s in range(0, T, chunk)], dim=1)
    return logits, [cache.kept_mask(layer, T) for layer in range(model.cfg.n_layers)]


def kept_overlap(kept_a: list, kept_b: list) -> torch.Tensor:
    """Two runs' kept sets (lists over layers of (B, Hkv, T) bool) -> (n_layers,) float: per layer,
    the Jaccard overlap |A & B| / |A | B| of each (sequence, KV head)'s two sets, averaged over the
    sequences and KV heads (two empty sets overlap fully: 1)."""
    out = []
    for a, b in zip(kept_a, kept_b):
        inter, union = (a & b).sum(-1).float(), (a | b).sum(-1).float()
        out.append(torch.where(union > 0, inter / union.clamp(min=1), 1.0).mean())
    return torch.stack(out)
