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
from fast import kernels
from policies import Tokens

# Slots a program of the one-victim eviction reduces, or None: one program per (sequence, KV head)
# row. Inductor never splits an argmin, and splits a min only past 8,192 values a row on Hopper, so a
# long cache's eviction runs on as many programs as there are KV heads (16 on a 7B rank at TP = 2,
# ~12 us a layer). A chunk size C cuts each row into chunks of C slots: the lowest packed key of each
# chunk, then of the chunks (two small reductions over many programs). Off by default until measured:
# `bench.py --evict-chunk C` sets it.
EVICT_CHUNK: int | None = None

# A decode step's free slot (free_slots: the lowest one, an argmax over the slots) found by the append kernel
# (kernels.append_step) in storage of up to this many slots: one program a KV head scans the slots before it
# writes, one kernel fewer a layer. Past it (a long cache, few programs) and with 0: free_slots' own kernel.
FIND_SLOT = 8192

# A decode step's new token's policy state (policies.token_state) starts in its slot inside the eviction
# (LayerCache.evict's `fresh`), not by start_state's scatter before the attention: one kernel fewer a scored
# layer. False: start_state (to time the two side by side).
START_IN_EVICT = True


def evict_one(prio, pos, valid, budget, packed: bool | None = None, chunk: int | None = None):
    """The decode-step twin of cache.keep_top for one new token: at most one eviction per head,
    the lowest priority, the oldest among equals. No sort. A test holds it equal to keep_top.

    fp32 on CUDA: one argmin over the pair (priority, position) packed in one int64 key, a single
    pass over the slots (the float's bits, negatives flipped, order as the floats do; positions of
    kept tokens are in [0, 2^32)); with `chunk` (default EVICT_CHUNK) the lowest key of each chunk of
    slots, then of the chunks, and the slot that holds it (one: positions differ within a row).
    Elsewhere: the minimum, then the oldest there (two passes, no bit tricks: the CPU gains nothing
    from one pass). packed: force either way (tests)."""
    over = valid.sum(dim=-1, keepdim=True) > budget  # (B, H, 1)
    if packed if packed is not None else (prio.dtype == torch.float32 and prio.is_cuda):
        bits = (prio + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order as integers
        none = torch.iinfo(torch.int64).max
        key = torch.where(valid, (ordered << 32) + pos, none)  # empty slots: no candidates
        chunk = chunk or EVICT_CHUNK
        if chunk and key.shape[-1] > chunk:  # (..., S) -> (..., n, chunk), the last chunk padded with no candidates
            n = -(-key.shape[-1] // chunk)
            filler = key.new_full((*key.shape[:-1], n * chunk - key.shape[-1]), none)  # (F.pad would round it via float)
            low = torch.cat([key, filler], dim=-1).unflatten(-1, (n, chunk)).amin(-1).amin(dim=-1, keepdim=True)  # (B, H, 1)
            return valid & ~((key == low) & over)  # the lowest key's slot goes (one: positions differ)
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

    def append(self, q, k, v, positions, angles, window: int = 0):
        """The decode step's twin of rotary, update and Call.mask (model.Attention.forward_heads) for
        keys stored rotated, in one kernel (kernels.append_step), the free slot found there too where
        FIND_SLOT allows. q (B, Hkv, G, 1, D), k, v (B, Hkv, 1, D) as projected; positions (B, 1);
        angles their rotary (cos, sin). -> q rotated, the call (as update's), its mask (B, Hkv, 1, S) and
        the new token's policy state for evict to start (START_IN_EVICT; else start_state writes it here: {})."""
        slots = self.step_slots(k.shape[0], positions)
        q, mask, slots = kernels.append_step(q, k, v, angles, slots, positions, self.k, self.v, self.pos, self.valid,
                                             window)
        return q, self.new_call(positions, slots), mask, self.fresh_state(k, v, slots)

    def joins(self, q) -> bool:
        """Whether append_attend applies to a decode step of queries q (B, Hkv, G, 1, D): kernels.join_fits
        on the storage the step writes into (make_room's)."""
        B, Hkv, G, _, D = q.shape
        return kernels.join_fits(G, max(self.capacity, self.owner.capacity), D, B * Hkv)

    def append_attend(self, q, k, v, positions, angles, window: int = 0):
        """append, then the step's attention over the cache (kernels.decode_attention), in one kernel
        (kernels.append_attention), where joins(q). Arguments as append's. -> the attention's output
        (B, Hkv, G, 1, D) and probabilities (B, Hkv, G, 1, S) (None if the policy needs none), then the
        call, mask and state as append's; VATP's nu (policies.token_state's ||v||_1) from the kernel, where
        evict starts it (START_IN_EVICT)."""
        slots = self.step_slots(k.shape[0], positions)
        # VATP's nu = ||v||_1 (policies.token_state) where evict starts it
        value_l1 = START_IN_EVICT and "nu" in self.state and self.state["nu"].dtype == torch.float32
        out, probs, mask, slots, nu = kernels.append_attention(q, k, v, angles, slots, positions, self.k, self.v,
                                                               self.pos, self.valid, window, self.needs_probs,
                                                               value_l1=value_l1)
        fresh = self.fresh_state(k, v, slots)  # into the slots given, or the ones the kernel found
        if value_l1:  # computed in the kernel: no kernel of its own (token_state's reduction goes unused)
            fresh["nu"] = nu
        return out, probs, self.new_call(positions, slots), mask, fresh

    def step_slots(self, B: int, positions: torch.Tensor) -> torch.Tensor | None:
        """The decode step's slots (B, Hkv, 1) (make_room's), or None where the append kernel finds
        them itself (FIND_SLOT: storage made, of at most FIND_SLOT slots, and not full's slot by position)."""
        o = self.owner
        find = (FIND_SLOT and not (self.policy.keep_all and not o.padded) and B == o.batch
                and o.capacity == self.capacity <= FIND_SLOT)  # else make_room's checks, growth, free_slots
        return None if find else self.make_room(B, positions)

    def fresh_state(self, k, v, slots) -> dict:
        """The new token's policy state {name: (B, Hkv, 1)} for evict to start (START_IN_EVICT); else
        start_state writes it into its slots now, and {}. (policies.token_state reads the values only:
        k unrotated is fine.)"""
        if START_IN_EVICT:
            return policies.token_state(self.policy, k, v, self.owner.score_dtype)
        self.start_state(k, v, slots)
        return {}

    def evict(self, call: reference.Call, fresh: dict | None = None) -> None:
        """cache.LayerCache.evict, once the new token's policy state `fresh` ({name: (B, Hkv, 1)}, from
        append; what start_state writes) is in its slot: written as a select over the slots, so that the
        compiled step computes it in the eviction's kernel (nothing reads the new token's state before:
        observe reads the probabilities alone), where start_state's scatter is a kernel of its own."""
        if fresh:
            own = call.slots == torch.arange(self.capacity, device=call.slots.device)  # (B, Hkv, S): one new token
            for name, t in fresh.items():
                self.state[name].copy_(torch.where(own, t, self.state[name]))
        super().evict(call)

    def write_prompt(self, k, v, pos, keep, state, idx) -> None:
        """A first call's tokens, ranked (rank_prompt), written into slots 0.. in text order, as the
        reference's shrink after a prompt leaves them. k, v (B, Hkv, T, D); pos, keep (which are
        kept) and state {name: (B, Hkv, T)}; idx (B, Hkv, T) the kept tokens first, in text order,
        or None when the call fits the storage. Only the kept ones are written when the storage is
        shorter than the call (at most `budget` are kept): a prompt never needs storage of its own
        length."""
        B, H, T, D = k.shape
        if T > self.capacity and self.policy.keep_all:
            self.resize(self.owner.capacity)  # all of it is kept: grow (the cache is empty)
        if T <= self.capacity:
            self.k[:, :, :T], self.v[:, :, :T], self.pos[:, :, :T], self.valid[:, :, :T] = k, v, pos, keep
            for name, t in state.items():
                self.state[name][:, :, :T] = t
            return
        idx = idx[..., :self.capacity]  # (B, Hkv, C): gathered straight into the storage
        torch.gather(k, 2, idx[..., None].expand(B, H, self.capacity, D), out=self.k)
        torch.gather(v, 2, idx[..., None].expand(B, H, self.capacity, D), out=self.v)
        torch.gather(pos, 2, idx, out=self.pos)
        torch.gather(keep, 2, idx, out=self.valid)
        for name, t in state.items():
            torch.gather(t, 2, idx, out=self.state[name])


@dataclass
class Prompt:
    """One layer's part of a first call into an empty cache, waiting for rank_prompt."""

    layer: LayerCache
    k: torch.Tensor  # (B, Hkv, T, D) as the layer stores keys (rotated, or not in slot mode)
    v: torch.Tensor  # (B, Hkv, T, D)
    q_rot: torch.Tensor | None = None  # (B, Hkv, G, T, D) the queries rotated; with k_rot and lse, where the policy
    k_rot: torch.Tensor | None = None  # scores (else None): (B, Hkv, T, D) the keys rotated
    lse: torch.Tensor | None = None  # (B, Hkv, G, T) fp32 each row's log-sum-exp

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.q_rot, self.lse) if t is not None)


def rank_prompt(cache: "KVCache", group: list[Prompt], positions: torch.Tensor) -> None:
    """The twin of each layer's evict for a first call into an empty cache, for the layers of
    `group` at once: the policy's state of the new tokens (policies.token_state) and its update
    (policies.apply_update; every row of the call saw the tokens before it), whose sums are the
    weighted column sums of each layer's attention (kernels.column_sums, Eq. (1), with the rows'
    weights policies.row_weights: one launch for the group, its layers as more sequences), then one
    ranking (policies.priority over (L, B, Hkv, T), keep_top; one for all layers when the policy ranks
    by position alone), then each layer writes only its kept tokens (LayerCache.write_prompt).
    positions (B, T)."""
    if not group:
        return
    p, L = cache.policy, len(group)
    B, H, T, D = group[0].k.shape
    pos = positions[:, None, :].expand(B, H, T)  # (B, Hkv, T)
    stack = lambda xs: torch.stack(xs) if len(xs) > 1 else xs[0][None]  # noqa: E731  (L, ...)
    if p.scored or p.score_fn:  # the group's keys and values stacked once (L, B, Hkv, T, D): one state for all
        keys, values = stack([e.k for e in group]), stack([e.v for e in group])
        state = policies.token_state(p, keys, values, cache.score_dtype)  # {name: (L, B, Hkv, T)}
    else:  # no copies: each layer's state (none where positions alone rank)
        layer_states = [policies.token_state(p, e.k, e.v, cache.score_dtype) for e in group]
        state = {name: stack([s[name] for s in layer_states]) for name in layer_states[0]}
    if p.scored:
        weights = policies.row_weights(p, positions, positions.amax(dim=-1), alpha=cache.alpha)  # (B, T)
        first = kernels.first_weighted_row(weights)  # (B,) the rows before it add nothing: column_sums skips them
        q, lse = stack([e.q_rot for e in group]), stack([e.lse for e in group])  # (L, B, Hkv, G, T, D|)
        update = kernels.column_sums(q.flatten(0, 1), stack([e.k_rot for e in group]).flatten(0, 1), lse.flatten(0, 1),
                                     weights.repeat(L, 1), first.repeat(L)).view(L, B, H, T)
        seen = (T - torch.arange(T, device=pos.device)).expand(B, H, T) if p.mean else None  # rows q >= j saw j
        state = policies.apply_update(p, state, update, (positions >= 0).sum(dim=-1), seen, cache.alpha)
    keep, idx = (pos >= 0)[None], None  # (1, B, Hkv, T): nothing evicted
    if not p.keep_all:
        n = L if p.scored or p.random or p.score_fn else 1  # else positions alone decide: one ranking serves all
        tokens = Tokens(keys[:n] if p.score_fn else None, values[:n] if p.score_fn else None, pos.expand(n, B, H, T),
                        torch.ones(n, B, H, T, dtype=torch.bool, device=pos.device), {name: t[:n] for name, t in state.items()})
        layers = torch.stack([e.layer.layer for e in group[:n]]).view(n, 1, 1, 1)
        prio = policies.priority(p, tokens, positions.amax(dim=-1), layers, cache.n_sinks, cache.recents)
        keep = reference.keep_top(prio, tokens.pos, tokens.valid, cache.budgets)  # (n, B, Hkv, T)
        if T > min(e.layer.capacity for e in group):  # the kept tokens first, in text order
            idx = keep.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)  # (n, B, Hkv, T)
    for i, e in enumerate(group):
        j = min(i, keep.shape[0] - 1)
        e.layer.write_prompt(e.k, e.v, pos, keep[j], {name: t[i] for name, t in state.items()},
                             None if idx is None else idx[j])


class KVCache(reference.KVCache):
    """cache.KVCache with the fast layers (same arguments, same kept tokens)."""

    layer_class = LayerCache
