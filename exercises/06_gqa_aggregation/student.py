"""Exercise 06: grouped-query attention, sum against max over a group. Fill in the three
functions (README.md)."""

import torch


def aggregate_group(probs: torch.Tensor, how: str) -> torch.Tensor:
    """probs (B, Hkv, G, T, S), the attention of the G query heads that share each KV head ->
    (B, Hkv, T, S) float32, one score row per KV head: how = "sum" (the project's default),
    "max" (KVCache-Factory's option) or "mean" (the sum divided by G)."""
    raise NotImplementedError("aggregate_group")


@torch.no_grad()
def run_policy(model, tokens, policy, budget: int, chunk: int):
    """Stream tokens (B, T) through a cache.KVCache(model.cfg, policy, budget, batch=B, chunk=chunk)
    in calls of `chunk` tokens. Returns (logits (B, T, V), kept) where kept is a list, one entry per
    layer, of (B, Hkv, T) bool: which text positions each KV head holds at the end."""
    raise NotImplementedError("run_policy")


def kept_overlap(kept_a: list, kept_b: list) -> torch.Tensor:
    """Two runs' kept sets (lists over layers of (B, Hkv, T) bool) -> (n_layers,) float: per layer,
    the Jaccard overlap |A & B| / |A | B| of each (sequence, KV head)'s two sets, averaged over the
    sequences and KV heads (two empty sets overlap fully: 1)."""
    raise NotImplementedError("kept_overlap")
