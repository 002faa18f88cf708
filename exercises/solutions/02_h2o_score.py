"""Exercise 02, reference solution: H2O's score update and its kept set."""

import torch


def h2o_update(scores: torch.Tensor, probs: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """H2O's running score after one attention call (Zhang et al. 2023): every kept token j of KV
    head g adds the attention it just received,

        s[b, g, j] <- s[b, g, j] + sum over the call's real rows q and the group's query heads h of A[b, g, h, q, j]

    scores (B, Hkv, S) the scores before the call; probs (B, Hkv, G, T, S) the call's attention
    (G query heads per KV head, T rows, S key slots); q_pos (B, T) the rows' text positions, < 0
    for left padding (a padding row adds nothing). Returns the new scores (B, Hkv, S) in float32
    (do not modify `scores` in place).
    """
    real = (q_pos >= 0).float()  # (B, T)
    received = torch.einsum("bghts,bt->bgs", probs.float(), real)  # sum over heads of the group and real rows
    return scores.float() + received


def h2o_keep(scores, key_pos, valid, newest, budget: int, recent: int) -> torch.Tensor:
    """Which tokens H2O keeps after the call: the `recent` latest (text positions > newest - recent,
    the newest included) always; then the highest scores, up to `budget` tokens in all; on equal
    scores the OLDER token (smaller position) is evicted first.

    scores (B, Hkv, S) float; key_pos (B, Hkv, S) text position of each slot (distinct within a
    head); valid (B, Hkv, S) bool, which slots hold a token; newest (B,) the newest row's position.
    Returns the new valid mask (B, Hkv, S): a subset of `valid` with min(budget, held) tokens per head.
    """
    protected = key_pos > newest[:, None, None] - recent
    prio = torch.where(protected, float("inf"), scores.float())
    prio = torch.where(valid, prio, float("-inf"))
    # rank by (priority, position) descending: sort by position first, then a stable sort by priority
    by_newest = key_pos.argsort(dim=-1, descending=True, stable=True)
    order = by_newest.gather(-1, prio.gather(-1, by_newest).argsort(dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return valid & (rank < budget)
