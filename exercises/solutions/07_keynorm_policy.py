"""Exercise 07, reference solution: a policy of your own, the key-norm rule of Devoto et al. 2024
("A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"): keep the keys with the
LOWEST L2 norm. One function and one registry line: every path (the cache, its fast twins, the
masked simulation) ranks through policies.priority, which calls the function."""

import torch

import policies


def keynorm_score(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The key-norm policy's score of every held token, higher kept: -||k||_2, the L2 norm of the
    key over the head dimension D, negated (a low norm is kept first).

    keys (..., S, D) the keys as the cache stores them, with any leading axes ((B, Hkv) for one
    layer; (L, B, Hkv) when the fast path ranks several layers at once); values (..., S, D) and
    positions (..., S) are given to every score function and unused here. Returns (..., S) float32.
    Only the score: policies.priority adds the protected slots (+inf) and the empty ones (-inf)."""
    return -keys.float().norm(dim=-1)  # a rotation (RoPE) keeps the norm: stored rotated or not, the same


# the registry line: a description, and the Policy's fields as a function of the budget (this policy's split is
# the budget alone; make_policy's n_sink and recent overrides protect slots)
policies.REGISTRY["keynorm"] = ("keynorm: lowest key norms (Devoto et al. 2024)",
                                lambda b: dict(scored=False, score_fn=keynorm_score))
