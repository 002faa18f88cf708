"""The explicit KV cache: a fixed budget of tokens per layer and KV head, really evicted.

For each layer, each sequence of the batch and each KV head, the cache stores up to
`budget + chunk` slots (preallocated; never more than `max_len`): key, value, the token's position
in the text, its running score, how many rows saw it, its value's L1 norm (VATP), and whether the
slot holds a token. One attention call goes:

    view = layer_cache.update(k, v, positions)    # write the new tokens into free slots
    for each chunk of rows r0..r1:                # (one chunk when small: no T x S buffer)
        mask = view.mask(r0, r1)
        ... attention over view.keys / view.values under mask ...
        layer_cache.observe(probs, mask, r0, r1)  # the policy's sum over these rows (policies.row_update)
    layer_cache.evict()                           # finish the score update (policies.apply_update),
                                                  # evict down to `budget` (policies.priority + top-k)

The first call into an empty cache with no padding (a prompt) has a fast twin, LayerCache.enter:
its rows see exactly its own tokens, so the model attends with the fused causal kernel, and the
cache ranks the call's tokens (KVCache.flush, many layers at once) and writes only the kept ones
(a prompt never needs storage of its own length).

Kept sets differ between KV heads. Slots are not kept in text order: a new token takes the
lowest free slot, and every slot carries its own position, so positions, rotary angles and the
causal mask all come from that one position tensor.

Modes (policies.md, "When eviction happens"):
- streaming: calls of at most `chunk` tokens; after each call the cache evicts down to `budget`
  (chunk = 1: exact token-by-token eviction, as in the papers' masked simulations).
- prefill: the first call (the whole prompt) is attended with no eviction, then compressed to
  `budget`, the storage shrinks to `budget + chunk` (or, through enter, never grows past it),
  and later calls evict as in streaming.
Positions:
- original: keys are stored rotated at their text position (H2O, A2SF, VATP, TOVA).
- slot: keys are stored before rotation and rotated at read time by their rank in the cache
  (StreamingLLM Sec. 3.2); rotary models only.
Batches: sequences of different lengths are left-padded; `pad[b]` leading tokens of sequence b
have negative positions, are never kept, and never count against its budget.

The cache never imports the model; it is told the model's shape by its config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

import policies
from policies import Policy

MODES = ("streaming", "prefill")
POSITION_SCHEMES = ("original", "slot")


@dataclass
class View:
    """What one attention call's rows may attend to (S = slots in storage, T = new rows)."""

    keys: torch.Tensor  # (B, Hkv, S, D)
    values: torch.Tensor  # (B, Hkv, S, D)
    key_pos: torch.Tensor  # (B, Hkv, S) positions to rotate keys by (slot ranks in slot mode)
    query_pos: torch.Tensor  # (B, Hkv, T) positions to rotate queries by (slot mode)
    mask: Callable[[int, int], torch.Tensor]  # (r0, r1) -> (B, Hkv, r1 - r0, S) bool, True = may attend


class LayerCache:
    """One layer's storage. All state is updated in place, so a compiled decode step can be
    captured as a CUDA graph; host-side bookkeeping (sizes, whether eviction can happen) lives
    in KVCache._reserve and depends on shapes only."""

    def __init__(self, layer: int, owner: "KVCache"):
        self.layer = torch.tensor(layer, device=owner.device)  # a tensor: one compiled graph serves every layer
        self.owner = owner
        self.policy = owner.policy
        self.rotate_on_read = owner.position_scheme == "slot"
        self.needs_probs = owner.policy.scored
        self.capacity = 0
        self._allocate(owner.capacity)

    def _allocate(self, capacity: int, move: bool = True):
        """New storage of `capacity` slots; move=True moves the held tokens over (False: the cache
        is empty, nothing to move)."""
        o = self.owner
        B, H, D = o.batch, o.cfg.n_kv_heads, o.cfg.head_dim
        new = dict(
            k=torch.zeros(B, H, capacity, D, device=o.device, dtype=o.dtype),
            v=torch.zeros(B, H, capacity, D, device=o.device, dtype=o.dtype),
            pos=torch.full((B, H, capacity), -1, device=o.device, dtype=torch.long),
            valid=torch.zeros(B, H, capacity, device=o.device, dtype=torch.bool),
            scores=torch.zeros(B, H, capacity, device=o.device, dtype=o.score_dtype),
            counts=torch.zeros(B, H, capacity, device=o.device, dtype=o.score_dtype),
            value_norms=torch.zeros(B, H, capacity, device=o.device, dtype=o.score_dtype),  # ||v||_1 (VATP)
        )
        if self.capacity and move:  # move the held tokens over, in text order
            big = torch.iinfo(torch.long).max
            order = torch.where(self.valid, self.pos, big).argsort(dim=-1, stable=True)[..., :capacity]
            n = order.shape[-1]
            for name, t in new.items():
                old = getattr(self, name)
                idx = order if old.dim() == 3 else order[..., None].expand(-1, -1, -1, D)
                t[:, :, :n] = old.gather(2, idx)
        for name, t in new.items():
            setattr(self, name, t)
        self.capacity = capacity

    def _check_batch(self, B: int) -> None:
        if B != self.owner.batch:
            raise ValueError(f"this cache was made for a batch of {self.owner.batch}, not {B}: make one per batch size")

    # -- the calls attention makes: update, observe (per chunk of rows), evict ----------------

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> View:
        """k, v (B, Hkv, T, D) of the new tokens; positions (B, T). Writes them in, returns the view."""
        B, H, T, D = k.shape
        self._check_batch(B)
        if self.capacity < self.owner.capacity:  # grow to what KVCache._reserve asked for (host-side, on sizes)
            self._allocate(self.owner.capacity, move=not self.owner.empty)
        slot_ids = torch.arange(self.capacity, device=k.device)
        pos = positions[:, None, :].expand(B, H, T)  # (B, H, T)
        if self.owner.budget is None and not self.owner.padded and self.owner.fast:
            slots = pos  # fast twin: a full cache with no padding holds position p in slot p (the lowest free)
        elif T == 1:  # the decode step: one free slot, an argmax (fuses; topk would not)
            free_rank = torch.where(self.valid, -1, self.capacity - slot_ids)  # lowest free slot ranks highest
            slots = free_rank.argmax(dim=-1, keepdim=True)  # (B, H, 1)
        else:
            free_rank = torch.where(self.valid, -1, self.capacity - slot_ids)
            slots = free_rank.topk(T, dim=-1).indices  # (B, H, T) free slots, increasing
        # index_put_, not scatter_: torch.compile writes it in place (a scatter_ into a graph input
        # becomes a copy of the whole buffer every step: the KV cache read twice more per token)
        at = (torch.arange(B, device=k.device)[:, None, None], torch.arange(H, device=k.device)[None, :, None], slots)
        self.k.index_put_(at, k)  # k[b, h, slots[b, h, t]] = k_new[b, h, t]
        self.v.index_put_(at, v)
        self.pos.index_put_(at, pos)
        self.valid.index_put_(at, pos >= 0)
        if self.policy.scored:
            self.scores.index_put_(at, torch.zeros((), dtype=self.scores.dtype, device=k.device))  # a score starts on entry
            self.update_sum = torch.zeros_like(self.scores)  # this call's sum over rows (policies.row_update)
        if self.policy.mean:
            self.counts.index_put_(at, torch.zeros((), dtype=self.counts.dtype, device=k.device))
        if self.policy.value_prior:  # VATP's nu = ||v||_1, once per token (policies.apply_update)
            self.value_norms.index_put_(at, v.to(self.value_norms.dtype).abs().sum(dim=-1))
        self.q_pos, self.slots = positions, slots
        key_pos, query_pos = self.pos, pos
        if self.rotate_on_read:  # StreamingLLM: a key's position is its rank among the kept keys
            big = torch.iinfo(torch.long).max
            order = torch.where(self.valid, self.pos, big).argsort(dim=-1, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, slot_ids.expand_as(order))  # (B, H, S)
            key_pos, query_pos = rank, rank.gather(-1, slots)
        return View(self.k, self.v, key_pos, query_pos, self.mask)

    def mask(self, r0: int, r1: int) -> torch.Tensor:
        """(B, Hkv, r1 - r0, S): rows r0..r1 of this call see kept keys at or before their position."""
        q = self.q_pos[:, r0:r1]  # (B, R)
        causal = self.pos[:, :, None, :] <= q[:, None, :, None]  # (B, H, R, S)
        own = self.slots[:, :, r0:r1, None] == torch.arange(self.capacity, device=q.device)  # its own slot:
        return (self.valid[:, :, None, :] & causal) | own  # a padding row sees itself, so softmax is defined

    def observe(self, probs: torch.Tensor | None, mask: torch.Tensor, r0: int, r1: int) -> None:
        """probs (B, Hkv, G, R, S) of rows r0..r1 of this call (None for unscored policies)."""
        if self.policy.scored:
            newest = self.q_pos.amax(dim=-1)
            self.update_sum += policies.row_update(self.policy, probs, self.q_pos[:, r0:r1], newest, self.owner.alpha)
            if self.policy.mean:  # only H2O-mean divides by how many rows saw a token
                self.counts += policies.seen_counts(mask, self.q_pos[:, r0:r1]).to(self.counts.dtype)

    def row_weights(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, T) the weight of each row of a call at positions (B, T) in its score update,
        alpha^(t - q) w[q] (policies.row_weights), for kernels.column_sums: the same for every
        layer, so computed once per call (KVCache._reserve forgets it)."""
        o = self.owner
        if o.call_row_weights is None:
            o.call_row_weights = policies.row_weights(self.policy, positions, positions.amax(dim=-1), alpha=o.alpha)
        return o.call_row_weights

    def enter(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, sums: torch.Tensor | None) -> None:
        """The fast twin of update + observe + evict (and of the shrink after a prompt) for a first
        call into an empty cache with no padding (KVCache.fresh). Row i of such a call sees keys
        0..i, so its attention ran on k, v directly (the fused causal kernel), and its score update
        is `sums` (B, Hkv, T), the weighted column sums of that attention (kernels.column_sums),
        None for unscored policies. k, v (B, Hkv, T, D) as update stores them; positions (B, T).

        Here the scores are finished; KVCache.flush then ranks the call's tokens as evict ranks
        them (policies.priority, keep_top), for several layers at once, and write_prompt writes
        only the kept ones. A test holds the whole equal to the slow twin."""
        o = self.owner
        self._check_batch(k.shape[0])
        scores = norms = None
        if self.policy.scored:  # policies.apply_update on scores of 0: alpha^T * 0 + nu * sums
            scores = sums.to(o.score_dtype)
            if self.policy.value_prior:  # VATP's nu = ||v||_1
                norms = v.to(o.score_dtype).abs().sum(dim=-1)  # (B, H, T)
                scores = scores * norms
        o.stash(Pending(self, k, v, positions, scores, norms))

    def write_prompt(self, k, v, pos, keep, scores, counts, norms, idx) -> None:
        """Write a first call's tokens into slots 0.. in text order (as the slow path's shrink leaves
        them). k, v (B, H, T, D); pos, keep (which are kept), scores, counts, norms (B, H, T) or None;
        idx (B, H, >= capacity) the kept tokens first, in text order: only these are written, when
        the storage is shorter than the call (at most `budget` are kept). A prompt never needs
        storage of its own length."""
        B, H, T, D = k.shape
        o = self.owner
        if T > self.capacity and (o.budget is None or self.capacity < o.budget):
            self._allocate(o.capacity, move=False)  # all of it may be kept: grow (the cache is empty)
        if T <= self.capacity:
            self.k[:, :, :T] = k
            self.v[:, :, :T] = v
            self.pos[:, :, :T] = pos
            self.valid[:, :, :T] = keep
            for name, t in (("scores", scores), ("counts", counts), ("value_norms", norms)):
                if t is not None:
                    getattr(self, name)[:, :, :T] = t
            return
        idx = idx[..., :self.capacity]  # (B, H, C): gathered straight into the storage
        torch.gather(k, 2, idx[..., None].expand(B, H, self.capacity, D), out=self.k)
        torch.gather(v, 2, idx[..., None].expand(B, H, self.capacity, D), out=self.v)
        torch.gather(pos, 2, idx, out=self.pos)
        torch.gather(keep, 2, idx, out=self.valid)
        for name, t in (("scores", scores), ("counts", counts), ("value_norms", norms)):
            if t is not None:
                torch.gather(t, 2, idx, out=getattr(self, name))

    def evict(self) -> None:
        """After the call's attention: finish the score update, then evict down to the budget."""
        if self.policy.scored:
            n_rows = (self.q_pos >= 0).sum(dim=-1)
            norms = self.value_norms if self.owner.fast else None  # slow twin: from the values, every call
            self.scores.copy_(policies.apply_update(self.policy, self.scores, self.update_sum, self.v, n_rows,
                                                    self.owner.alpha, norms))
        if not self.owner.evicting:
            return  # nothing can be over budget yet (decided on shapes in KVCache._reserve)
        o = self.owner
        budget = o.budgets  # (B, 1, 1): each sequence's own budget
        newest = self.q_pos.amax(dim=-1)  # (B,)
        prio = policies.priority(self.policy, self.scores, self.counts, self.pos, self.valid, newest, self.layer,
                                 n_sink=o.n_sinks, recent=o.recents)
        if self.q_pos.shape[1] == 1 and o.fast:
            self.valid.copy_(evict_one(prio, self.pos, self.valid, budget))
        else:
            self.valid.copy_(keep_top(prio, self.pos, self.valid, budget))


def keep_top(prio, pos, valid, budget):
    """The general rule: keep the `budget` highest-priority tokens; on ties the oldest goes first.
    prio, pos, valid (B, H, S); budget an int or per sequence (B, 1, 1) -> new valid (B, H, S)."""
    by_newest = pos.argsort(dim=-1, descending=True, stable=True)  # newest first
    ranked = prio.gather(-1, by_newest).argsort(dim=-1, descending=True, stable=True)
    order = by_newest.gather(-1, ranked)  # slots by (priority, newer) descending
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=pos.device).expand_as(order))
    return valid & (rank < budget)


def evict_one(prio, pos, valid, budget):
    """The decode-step fast twin of keep_top for one new token: at most one eviction per head,
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


@dataclass
class Pending:
    """One layer's part of a first call, waiting for KVCache.flush (LayerCache.enter)."""

    layer: LayerCache
    k: torch.Tensor  # (B, Hkv, T, D)
    v: torch.Tensor  # (B, Hkv, T, D)
    positions: torch.Tensor  # (B, T)
    scores: torch.Tensor | None  # (B, Hkv, T) score_dtype; None for unscored policies
    norms: torch.Tensor | None  # (B, Hkv, T) ||v||_1 (VATP)


# A first call's layers wait for their ranking until their keys and values hold this many bytes
# (or the call ends): one ranking for many layers is one set of tensor ops instead of one per layer,
# which is what a short prompt's prefill costs on a GPU (it is bound by kernel launches).
PENDING_BYTES = 2**28


class KVCache:
    """One LayerCache per layer, plus the text positions of the next tokens per sequence.

    cfg: model.Config (its shape); policy: policies.Policy; budget: tokens per layer and KV head
    (None only for `full`); pad: (B,) leading padding tokens per sequence; max_len: storage to
    preallocate for `full` (else it grows by doubling). fast: use the fast twins (evict_one, no
    sort, for one-token calls; the fused causal kernel for a first call into an empty cache);
    fast=False runs their slow twins (keep_top; the masked path), and tests hold them equal.

    Per-sequence budgets (evaluation batches texts of different lengths at one cache ratio):
    budget may be a list of B budgets, and policy a list of B policies that differ only in their
    split (n_sink, recent; policies.make_policy at each budget). Each sequence is then evicted
    exactly as it would be alone; a test holds the two equal. Storage is sized by the largest.
    """

    def __init__(self, cfg, policy: Policy | list[Policy], budget: int | list[int] | None = None, *, batch: int = 1,
                 mode: str = "streaming", chunk: int = 1, positions: str = "original",
                 device="cpu", dtype=torch.float32, pad=None, max_len: int | None = None,
                 fast: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk {chunk!r}: use an integer >= 1 (1 = evict after every token)")
        if positions not in POSITION_SCHEMES:
            raise ValueError(f"positions {positions!r}: use one of {', '.join(POSITION_SCHEMES)}")
        if positions == "slot" and not cfg.rotary:
            raise ValueError("slot positions need rotary embeddings: OPT's learned positions cannot be"
                             " re-indexed; use --positions original")
        policy_list, budget_list = _per_sequence(policy, budget, batch)
        policy = policy_list[0]
        self.cfg, self.policy = cfg, policy
        self.budget = None if policy.keep_all else max(budget_list)  # the largest: what storage is sized by
        self.batch, self.mode, self.chunk, self.position_scheme = batch, mode, chunk, positions
        self.device, self.dtype = torch.device(device), dtype
        self.score_dtype = torch.promote_types(dtype, torch.float32)  # scores in fp32 at least
        self.fast = fast
        self.padded = pad is not None and bool(torch.as_tensor(pad).any())
        self.empty = True  # the current call is the first into the cache
        self.fresh = False  # ... and it has no padding, and the fast twins are on (LayerCache.enter)
        self.pending, self.pending_bytes = [], 0  # layers of a first call waiting for their ranking (flush)
        self.call_row_weights = None
        self.fixed = self.budget is not None or max_len is not None  # storage never grows in decode
        if self.budget is None:
            self.capacity = max_len or chunk
        else:  # budget + chunk slots, and never more than the text can fill
            self.capacity = min(self.budget + chunk, max_len) if max_len else self.budget + chunk
        self.held = 0  # host-side bound on the tokens any head holds after the current call
        self.evicting = False  # whether the current call can go over budget
        self.prompt_done = False  # prefill mode: the first call (the prompt) is over
        pad = torch.zeros(batch, dtype=torch.long) if pad is None else torch.as_tensor(pad, dtype=torch.long)
        self.next_pos = (-pad).to(self.device)  # (B,) position of each sequence's next token
        self.budgets = torch.zeros(batch, 1, 1, dtype=torch.long, device=self.device)  # (B, 1, 1) per sequence
        self.n_sinks, self.recents = torch.zeros_like(self.budgets), torch.zeros_like(self.budgets)
        self.alpha = torch.tensor(policy.alpha, dtype=self.score_dtype, device=self.device)  # a tensor: no recompiles
        self._set_budgets(policy_list, budget_list)
        self.layers = [LayerCache(i, self) for i in range(cfg.n_layers)]

    def _set_budgets(self, policy_list: list[Policy], budget_list: list) -> None:
        """Each sequence's budget and split, in place (a captured decode step reads these tensors)."""
        keep_all = self.policy.keep_all
        self.min_budget = None if keep_all else min(budget_list)
        for t, values in ((self.budgets, [0 if keep_all else b for b in budget_list]),
                          (self.n_sinks, [p.n_sink for p in policy_list]), (self.recents, [p.recent for p in policy_list])):
            t.copy_(torch.tensor(values, dtype=torch.long)[:, None, None])

    def positions(self, T: int) -> torch.Tensor:
        """Called by the model first in its forward: (B, T) text positions of the next T tokens
        (negative for left padding). Also makes room for them."""
        if self.budget is not None and T > self.chunk and (self.mode == "streaming" or self.prompt_done):
            raise ValueError(f"{self.mode} mode takes at most chunk={self.chunk} tokens per call here:"
                             " feed longer inputs with generate.feed(model, tokens, cache)")
        self._reserve(T)
        return self.next_pos[:, None] + torch.arange(T, device=self.device)

    def _reserve(self, T: int) -> None:
        """Host-side bookkeeping from shapes alone (no host sync): the storage the call needs if it
        cannot fit (the prompt in prefill mode, or `full` with no max_len; each layer grows to it
        when it writes), and whether it evicts.
        In the decode steady state nothing here changes, so a compiled step never recompiles."""
        self.empty = self.held == 0  # this call is the first into the cache
        self.call_row_weights = None  # LayerCache.row_weights of this call
        if self.budget is None and self.fixed:
            self.fresh = self.fast and self.empty and not self.padded
            if not torch.compiler.is_compiling():  # eager: refuse to overrun a preallocated full cache
                if self.held + T > self.capacity:
                    raise ValueError(f"the full cache holds max_len={self.capacity} tokens: make it larger")
                self.held += T
            return
        self.fresh = self.fast and self.empty and not self.padded
        needed = self.held + T
        if needed > self.capacity:  # each layer grows when it writes (LayerCache.update): a first call
            # into an empty cache that keeps only its budget (LayerCache.enter) never needs the room
            self.capacity = needed if self.budget is not None else max(needed, 2 * self.capacity)
        self.evicting = self.budget is not None and needed > self.min_budget
        self.held = needed if self.budget is None else min(needed, self.budget)

    def stash(self, entry: Pending) -> None:
        """A layer's first call waits for its ranking (LayerCache.enter); flush when enough wait."""
        self.pending.append(entry)
        self.pending_bytes += entry.k.nbytes + entry.v.nbytes
        if self.pending_bytes >= PENDING_BYTES:
            self.flush()

    def flush(self) -> None:
        """Rank the waiting layers' tokens at once, as LayerCache.evict would one layer at a time
        (policies.priority over (L, B, H, T), keep_top), then write each layer's kept tokens
        (LayerCache.write_prompt). sink and window rank by position alone: one ranking serves all."""
        group, self.pending, self.pending_bytes = self.pending, [], 0
        if not group:
            return
        p, first = self.policy, group[0]
        B, H, T, D = first.k.shape
        positions = first.positions
        pos = positions[:, None, :].expand(B, H, T)  # (B, H, T)
        counts = (T - torch.arange(T, device=pos.device)).to(self.score_dtype).expand(B, H, T) if p.mean else None
        keep = (pos >= 0)[None]  # (1, B, H, T): nothing evicted
        idx = None
        if self.evicting:
            per_layer = p.scored or p.random
            L = len(group) if per_layer else 1
            scores = (torch.stack([e.scores for e in group]) if p.scored
                      else torch.zeros(1, B, H, T, device=pos.device, dtype=self.score_dtype))  # (L, B, H, T)
            layers = torch.stack([e.layer.layer for e in group[:L]]).view(L, 1, 1, 1)
            everything = torch.ones(L, B, H, T, device=pos.device, dtype=torch.bool)
            pos_l = pos.expand(L, B, H, T)
            prio = policies.priority(p, scores, counts, pos_l, everything, positions.amax(dim=-1), layers,
                                     n_sink=self.n_sinks, recent=self.recents)
            keep = keep_top(prio, pos_l, everything, self.budgets)  # (L, B, H, T)
            if T > min(e.layer.capacity for e in group):  # the kept tokens first, in text order
                idx = keep.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)  # (L, B, H, T)
        for i, e in enumerate(group):
            j = min(i, keep.shape[0] - 1)
            e.layer.write_prompt(e.k, e.v, pos, keep[j], e.scores, counts, e.norms, None if idx is None else idx[j])

    def advance(self, T: int) -> None:
        """Called by the model at the end of its forward."""
        self.flush()
        self.next_pos += T
        if self.mode == "prefill" and not self.prompt_done:
            self.prompt_done = True
            if self.budget is not None and self.capacity > self.budget + self.chunk:
                for layer in self.layers:  # prefill, then compress: free the prompt's storage
                    if layer.capacity > self.budget + self.chunk:
                        layer._allocate(self.budget + self.chunk)
                self.capacity = self.budget + self.chunk

    def reset(self, pad=None, policy=None, budget=None) -> None:
        """Empty the cache in place for a new batch of texts (same shapes: no new compile), with new
        per-sequence budgets and policies if given (same policy form, budgets within the storage)."""
        if budget is not None:
            if self.budget is None:
                raise ValueError("a cache made for `full` takes no budgets")
            policy_list, budget_list = _per_sequence(policy or self.policy, budget, self.batch)
            if _form(policy_list[0]) != _form(self.policy):
                raise ValueError("reset changes budgets and splits, not the policy: make a new cache")
            if max(budget_list) > self.budget:
                raise ValueError(f"budget {max(budget_list)} is above this cache's {self.budget}: make a new cache")
            self._set_budgets(policy_list, budget_list)
        for layer in self.layers:
            layer.valid.zero_()
            layer.pos.fill_(-1)
        pad = torch.zeros(self.batch, dtype=torch.long) if pad is None else torch.as_tensor(pad, dtype=torch.long)
        self.next_pos.copy_(-pad)
        self.held, self.evicting, self.prompt_done = 0, False, False
        self.pending, self.pending_bytes = [], 0
        self.padded = pad is not None and bool(torch.as_tensor(pad).any())

    # -- inspection (host side; not for the decode step) ---------------------------------------

    def kept_positions(self, layer: int) -> list[list[list[int]]]:
        """[b][kv_head] -> sorted text positions that layer holds."""
        lc = self.layers[layer]
        pos = torch.where(lc.valid, lc.pos, -1).sort(dim=-1).values.cpu()
        return [[[p for p in row.tolist() if p >= 0] for row in seq] for seq in pos]

    def kept_mask(self, layer: int, length: int) -> torch.Tensor:
        """(B, Hkv, length) bool: which text positions the layer holds."""
        lc = self.layers[layer]
        out = torch.zeros(self.batch, self.cfg.n_kv_heads, length + 1, dtype=torch.bool, device=lc.pos.device)
        idx = torch.where(lc.valid & (lc.pos < length), lc.pos, length)
        return out.scatter_(-1, idx, True)[..., :length]

    def tokens_held(self) -> torch.Tensor:
        """(n_layers, B, Hkv) tokens each layer's KV head holds."""
        return torch.stack([lc.valid.sum(dim=-1) for lc in self.layers])

    def nbytes(self) -> int:
        """Bytes of key and value storage allocated (what the memory really costs)."""
        return sum(lc.k.nbytes + lc.v.nbytes for lc in self.layers)


def _form(policy: Policy) -> Policy:
    """A policy without its split: what every sequence of one cache must share."""
    return replace(policy, n_sink=0, recent=0)


def _per_sequence(policy, budget, batch: int) -> tuple[list[Policy], list]:
    """(one policy per sequence, one budget per sequence), checked; a single one is repeated."""
    policy_list = list(policy) if isinstance(policy, (list, tuple)) else [policy] * batch
    budget_list = list(budget) if isinstance(budget, (list, tuple)) else [budget] * batch
    if len(policy_list) != batch or len(budget_list) != batch:
        raise ValueError(f"give one policy and one budget per sequence ({batch}), or one for all")
    if len({_form(p) for p in policy_list}) > 1:
        raise ValueError("the sequences of one cache share one policy form; only the split (n_sink, recent) may differ")
    for p, b in zip(policy_list, budget_list):
        policies.check(p, b)
    return policy_list, [None if policy_list[0].keep_all else int(b) for b in budget_list]
