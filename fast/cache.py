"""The cache's speed twins: a KVCache whose layers find a free slot and evict one token per
decode step without a sort, and the prompt's twin that ranks many layers at once.

    cache = fast.KVCache(cfg, policy, budget, ...)    # same arguments as cache.KVCache

Every ranking still goes through policies.priority, the one hook (so a policy of your own, a
`score_fn` in the registry, behaves the same here); only how the kept set is selected and
written differs. Tests hold each twin equal to cache.py (tests/test_fast.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cache as reference
import policies
from policies import Tokens


def evict_one(prio, pos, valid, budget):
    """The decode-step twin of cache.keep_top for one new token: at most one eviction per head,
    the lowest priority, the oldest among equals. No sort. A test holds it equal to keep_top.

    fp32 priorities: one argmin over the pair (priority, position) packed in one int64 key, a
    single pass over the slots (the float's bits, negatives flipped, order as the floats do;
    positions of kept tokens are in [0, 2^32)). Other dtypes: the minimum, then the oldest there."""
    over = valid.sum(dim=-1, keepdim=True) > budget  # (B, H, 1)
    if prio.dtype == torch.float32:
        bits = (prio + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order as integers
        key = torch.where(valid, (ordered << 32) + pos, torch.iinfo(torch.int64).max)  # empty slots: no candidates
        victim = key.argmin(dim=-1, keepdim=True)  # lowest priority, oldest among equals
    else:
        prio = torch.where(valid, prio, float("inf"))  # empty slots are no candidates
        low = prio.amin(dim=-1, keepdim=True)
        big = torch.iinfo(pos.dtype).max
        victim = torch.where(prio == low, pos, big).argmin(dim=-1, keepdim=True)  # oldest among the lowest
    slot = torch.arange(valid.shape[-1], device=valid.device)
    return valid & ~((slot == victim) & over)  # elementwise, not a scatter: fuses with what follows


class LayerCache(reference.LayerCache):
    def free_slots(self, positions: torch.Tensor) -> torch.Tensor:
        B, T = positions.shape
        if self.policy.keep_all and not self.owner.padded:  # full, no padding: position p is in slot p
            return positions[:, None, :].expand(B, self.owner.cfg.n_kv_heads, T)
        if T == 1:  # the decode step: one free slot, an argmax (fuses; topk would not)
            slot_ids = torch.arange(self.capacity, device=positions.device)
            return torch.where(self.valid, -1, self.capacity - slot_ids).argmax(dim=-1, keepdim=True)  # (B, Hkv, 1)
        return super().free_slots(positions)

    def select(self, prio: torch.Tensor, call: reference.Call) -> torch.Tensor:
        if call.q_pos.shape[1] == 1:  # one new token: at most one victim per head
            return evict_one(prio, self.pos, self.valid, self.owner.budgets)
        return super().select(prio, call)

    def write_prompt(self, k, v, pos, keep, state) -> None:
        """A first call's tokens, ranked (rank_prompt), written into slots 0.. in text order, as the
        reference's shrink after a prompt leaves them. k, v (B, Hkv, T, D); pos, keep (which are
        kept) and state {name: (B, Hkv, T)}. Only the kept ones are written when the storage is
        shorter than the call (at most `budget` are kept): a prompt never needs storage of its own
        length."""
        B, H, T, D = k.shape
        if T > self.capacity and self.policy.keep_all:
            self.resize(self.owner.capacity)  # all of it is kept: grow (the cache is empty)
        n = min(T, self.capacity)
        idx = keep.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :n]  # kept first, in text order
        if T <= self.capacity:
            idx = torch.arange(T, device=k.device).expand(B, H, T)  # all fit: every token, kept or not, in order
        self.k[:, :, :n] = k.gather(2, idx[..., None].expand(B, H, n, D))
        self.v[:, :, :n] = v.gather(2, idx[..., None].expand(B, H, n, D))
        self.pos[:, :, :n] = pos.gather(2, idx)
        self.valid[:, :, :n] = keep.gather(2, idx)
        for name, t in state.items():
            self.state[name][:, :, :n] = t.gather(2, idx)


@dataclass
class Prompt:
    """One layer's part of a first call into an empty cache, waiting for rank_prompt."""

    layer: LayerCache
    k: torch.Tensor  # (B, Hkv, T, D) as the layer stores keys (rotated, or not in slot mode)
    v: torch.Tensor  # (B, Hkv, T, D)
    state: dict  # {name: (B, Hkv, T)} the policy's state after the call's update

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def rank_prompt(cache: "KVCache", group: list[Prompt], positions: torch.Tensor) -> None:
    """The twin of each layer's evict for a first call into an empty cache: every token of the call
    was seen by the rows after it, and the policy's state is final (FastAttention.prompt), so the
    layers of `group` are ranked together (policies.priority over (L, B, Hkv, T), keep_top), then
    each writes only its kept tokens (LayerCache.write_prompt). positions (B, T)."""
    if not group:
        return
    p = cache.policy
    B, H, T, D = group[0].k.shape
    pos = positions[:, None, :].expand(B, H, T)  # (B, Hkv, T)
    keep = (pos >= 0)[None].expand(len(group), B, H, T)  # (L, B, Hkv, T): nothing evicted
    if not p.keep_all:
        L = len(group)
        stack = lambda xs: torch.stack(xs) if L > 1 else xs[0][None]  # noqa: E731
        tokens = Tokens(stack([e.k for e in group]) if p.score_fn else None, stack([e.v for e in group]) if p.score_fn else None,
                        pos.expand(L, B, H, T), torch.ones(L, B, H, T, dtype=torch.bool, device=pos.device),
                        {name: stack([e.state[name] for e in group]) for name in group[0].state})
        layers = torch.stack([e.layer.layer for e in group]).view(L, 1, 1, 1)
        prio = policies.priority(p, tokens, positions.amax(dim=-1), layers, cache.n_sinks, cache.recents)
        keep = reference.keep_top(prio, tokens.pos, tokens.valid, cache.budgets)  # (L, B, Hkv, T)
    for e, kept in zip(group, keep):
        e.layer.write_prompt(e.k, e.v, pos, kept, e.state)


class KVCache(reference.KVCache):
    """cache.KVCache with the fast layers (same arguments, same kept tokens)."""

    layer_class = LayerCache
