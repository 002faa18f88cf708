"""The explicit KV cache: a fixed budget of tokens per layer and KV head, really evicted.

For each layer, each sequence of the batch and each KV head, the cache stores up to
`budget + chunk` slots: key, value, the token's position in the text, whether the slot holds a
token, and the per-token state its policy declares (policies.token_state: a running score, ...).
One attention call of one layer goes, with the call's state passed along, never left behind:

    call = layer_cache.update(k, v, positions)        # the new tokens enter free slots
    for each chunk of rows r0..r1:                    # (one chunk when small: no T x S buffer)
        mask = call.mask(r0, r1)                      # (B, Hkv, R, S) what these rows may see
        out, probs = attention over call.keys / call.values under mask
        layer_cache.observe(call, probs, mask, r0, r1)  # the policy's sum over these rows
    layer_cache.evict(call)                           # finish the score update, keep the `budget`
                                                      # highest policies.priority (ties: oldest goes)

Kept sets differ between KV heads. Slots are not kept in text order: a new token takes the
lowest free slot, and every slot carries its own position, so positions, rotary angles and the
causal mask all come from that one position tensor.

Modes (policies.md, "When eviction happens"):
- streaming: calls of at most `chunk` tokens; after each call the cache evicts down to `budget`
  (chunk = 1: exact token-by-token eviction, as in the papers' masked simulations).
- prefill: the first call (the whole prompt) is attended with no eviction, then compressed to
  `budget`; each layer's storage shrinks back to `budget + chunk` right after its own eviction,
  and later calls evict as in streaming.
Positions:
- original: keys are stored rotated at their text position (H2O, A2SF, VATP, TOVA).
- slot: keys are stored before rotation and rotated at read time by their rank in the cache
  (StreamingLLM Sec. 3.2); rotary models only.
Batches: sequences of different lengths are left-padded; `pad[b]` leading tokens of sequence b
have negative positions, are never kept, and never count against its budget.

The cache never imports the model; it is told the model's shape by its config. Its speed twins
(one free slot by argmax, one victim per decode step, the prompt ranked for all layers at once)
live in fast/cache.py, and tests hold them equal to this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

import policies
from policies import Policy, Tokens

MODES = ("streaming", "prefill")
POSITION_SCHEMES = ("original", "slot")


@dataclass
class Call:
    """One attention call of one layer: what its rows may attend to, and the policy's sums over
    those rows so far (S = slots in storage, T = the call's rows)."""

    keys: torch.Tensor  # (B, Hkv, S, D) the storage, new tokens written in
    values: torch.Tensor  # (B, Hkv, S, D)
    key_pos: torch.Tensor  # (B, Hkv, S) positions to rotate keys by (slot ranks in slot mode)
    query_pos: torch.Tensor  # (B, Hkv, T) positions to rotate queries by (slot mode)
    q_pos: torch.Tensor  # (B, T) the rows' text positions (< 0: left padding)
    slots: torch.Tensor  # (B, Hkv, T) where the new tokens went
    pos: torch.Tensor  # (B, Hkv, S) text position of each slot
    valid: torch.Tensor  # (B, Hkv, S) whether the slot holds a token
    window: int = 0  # sliding-window attention (model.Config.window): rows see only the last `window` positions
    sums: dict = field(default_factory=dict)  # "update", "seen": (B, Hkv, S) summed over the rows observed

    @property
    def newest(self) -> torch.Tensor:
        """(B,) the call's newest row: t in the policies' formulas."""
        return self.q_pos.amax(dim=-1)

    def mask(self, r0: int, r1: int) -> torch.Tensor:
        """(B, Hkv, r1 - r0, S): rows r0..r1 see held keys at or before their own position
        (and, with a window, after their position - window)."""
        q = self.q_pos[:, r0:r1]  # (B, R)
        causal = self.pos[:, :, None, :] <= q[:, None, :, None]  # (B, Hkv, R, S)
        if self.window:
            causal &= self.pos[:, :, None, :] > q[:, None, :, None] - self.window
        own = self.slots[:, :, r0:r1, None] == torch.arange(self.pos.shape[-1], device=q.device)  # its own slot:
        return (self.valid[:, :, None, :] & causal) | own  # a padding row sees itself, so softmax is defined


class LayerCache:
    """One layer's storage: k, v (B, Hkv, S, D), pos, valid and the policy's state (B, Hkv, S).
    Updated in place, so a compiled decode step can be captured as a CUDA graph."""

    def __init__(self, layer: int, owner: "KVCache"):
        self.layer = torch.tensor(layer, device=owner.device)  # a tensor: one compiled graph serves every layer
        self.owner = owner
        self.policy = owner.policy
        self.rotate_on_read = owner.position_scheme == "slot"
        self.needs_probs = owner.policy.scored
        self.capacity = 0
        self.resize(owner.capacity)

    def resize(self, capacity: int) -> None:
        """New storage of `capacity` slots; the held tokens move over, in text order, oldest first."""
        o = self.owner
        B, H, D = o.batch, o.cfg.n_kv_heads, o.cfg.head_dim
        k = torch.zeros(B, H, capacity, D, device=o.device, dtype=o.dtype)
        new = dict(k=k, v=torch.zeros_like(k), pos=torch.full((B, H, capacity), -1, device=o.device, dtype=torch.long),
                   valid=torch.zeros(B, H, capacity, device=o.device, dtype=torch.bool),
                   **policies.token_state(self.policy, k, k, o.score_dtype))  # + the policy's state (B, H, capacity)
        if self.capacity:  # move the held tokens over (at most `capacity` of them)
            old = dict(k=self.k, v=self.v, pos=self.pos, valid=self.valid, **self.state)
            big = torch.iinfo(torch.long).max
            order = torch.where(self.valid, self.pos, big).argsort(dim=-1, stable=True)[..., :capacity]  # (B, H, n)
            n = order.shape[-1]
            for name, t in new.items():
                t[:, :, :n] = old[name].gather(2, order if t.dim() == 3 else order[..., None].expand(-1, -1, -1, D))
        self.k, self.v, self.pos, self.valid = (new.pop(name) for name in ("k", "v", "pos", "valid"))
        self.state = new
        self.capacity = capacity

    def tokens(self) -> Tokens:
        return Tokens(self.k, self.v, self.pos, self.valid, self.state)

    def free_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, T) the T lowest free slots of each head, increasing, for tokens at positions (B, T)."""
        T = positions.shape[1]
        slot_ids = torch.arange(self.capacity, device=self.pos.device)
        free_rank = torch.where(self.valid, -1, self.capacity - slot_ids)  # the lowest free slot ranks highest
        return free_rank.topk(T, dim=-1).indices

    # -- the calls attention makes: update, observe (per chunk of rows), evict ----------------

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> Call:
        """k, v (B, Hkv, T, D) of the new tokens; positions (B, T). Writes them in, returns the call."""
        B, H, T, D = k.shape
        slots = self.make_room(B, positions)  # (B, Hkv, T)
        pos = positions[:, None, :].expand(B, H, T)  # (B, Hkv, T)
        # index_put_, not scatter_: torch.compile writes it in place (a scatter_ into a graph input
        # becomes a copy of the whole buffer every step)
        at = (torch.arange(B, device=k.device)[:, None, None], torch.arange(H, device=k.device)[None, :, None], slots)
        self.k.index_put_(at, k)  # k[b, h, slots[b, h, t]] = k_new[b, h, t]
        self.v.index_put_(at, v)
        self.pos.index_put_(at, pos)
        self.valid.index_put_(at, pos >= 0)
        self.start_state(k, v, slots)
        return self.new_call(positions, slots)

    def make_room(self, B: int, positions: torch.Tensor) -> torch.Tensor:
        """Storage for a call of B sequences' tokens at positions (B, T) -> (B, Hkv, T) the slots they go to."""
        if B != self.owner.batch:
            raise ValueError(f"this cache was made for a batch of {self.owner.batch}, not {B}: make one per batch size")
        if self.capacity < self.owner.capacity:  # the prompt in prefill mode, or a growing `full` cache
            self.resize(self.owner.capacity)
        return self.free_slots(positions)

    def start_state(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """The new tokens' policy state starts afresh (policies.token_state) in their slots (B, Hkv, T);
        k, v (B, Hkv, T, D) their keys and values."""
        B, H, T, _ = v.shape
        at = (torch.arange(B, device=v.device)[:, None, None], torch.arange(H, device=v.device)[None, :, None], slots)
        for name, t in policies.token_state(self.policy, k, v, self.owner.score_dtype).items():
            self.state[name].index_put_(at, t)

    def new_call(self, positions: torch.Tensor, slots: torch.Tensor) -> Call:
        """After the new tokens at positions (B, T) went into `slots` (B, Hkv, T): the call's view of
        the layer, with the policy's sums at 0."""
        B, H, T = slots.shape
        pos = positions[:, None, :].expand(B, H, T)  # (B, Hkv, T)
        key_pos, query_pos = self.pos, pos
        if self.rotate_on_read:  # StreamingLLM: a key's position is its rank among the held keys
            big = torch.iinfo(torch.long).max
            order = torch.where(self.valid, self.pos, big).argsort(dim=-1, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(self.capacity, device=slots.device).expand_as(order))
            key_pos, query_pos = rank, rank.gather(-1, slots)
        call = Call(self.k, self.v, key_pos, query_pos, positions, slots, self.pos, self.valid, self.owner.cfg.window)
        if self.policy.scored:
            call.sums["update"] = torch.zeros(B, H, self.capacity, device=slots.device, dtype=self.owner.score_dtype)
        if self.policy.mean:
            call.sums["seen"] = torch.zeros(B, H, self.capacity, device=slots.device, dtype=self.owner.score_dtype)
        return call

    def observe(self, call: Call, probs: torch.Tensor | None, mask: torch.Tensor, r0: int, r1: int) -> None:
        """probs (B, Hkv, G, R, S) of rows r0..r1 of the call (None for policies that score nothing)."""
        q_pos = call.q_pos[:, r0:r1]
        if self.policy.scored:
            call.sums["update"] += policies.row_update(self.policy, probs, q_pos, call.newest, self.owner.alpha)
        if self.policy.mean:
            call.sums["seen"] += policies.seen_counts(mask, q_pos)

    def evict(self, call: Call) -> None:
        """After the call's attention: finish the policy's update, drop the keys that fell out of a
        sliding window (no later row can see them), then keep the `budget` highest priority tokens
        of each head (policies.priority, keep_top)."""
        o = self.owner
        if self.policy.scored:
            n_rows = (call.q_pos >= 0).sum(dim=-1)  # (B,)
            new = policies.apply_update(self.policy, self.state, call.sums["update"], n_rows, call.sums.get("seen"), o.alpha)
            for name, t in new.items():
                self.state[name].copy_(t)
        if o.cfg.window:  # the next row, at newest + 1, sees positions after newest + 1 - window
            self.valid &= self.pos > (call.newest + 1 - o.cfg.window)[:, None, None]
        if self.policy.keep_all:
            return
        prio = policies.priority(self.policy, self.tokens(), call.newest, self.layer, o.n_sinks, o.recents)
        self.valid.copy_(self.select(prio, call))
        if self.capacity > o.base:  # prefill, then compress: free the prompt's storage
            self.resize(o.base)

    def select(self, prio: torch.Tensor, call: Call) -> torch.Tensor:
        """The new valid mask (B, Hkv, S): each sequence's `budget` highest priorities."""
        return keep_top(prio, self.pos, self.valid, self.owner.budgets)


def keep_top(prio, pos, valid, budget):
    """The general rule: keep the `budget` highest-priority tokens; on ties the oldest goes first.
    prio, pos, valid (..., S); budget an int or per sequence (B, 1, 1) -> new valid (..., S)."""
    by_newest = pos.argsort(dim=-1, descending=True, stable=True)  # newest first
    ranked = prio.gather(-1, by_newest).argsort(dim=-1, descending=True, stable=True)
    order = by_newest.gather(-1, ranked)  # slots by (priority, newer) descending
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=pos.device).expand_as(order))
    return valid & (rank < budget)


class KVCache:
    """One LayerCache per layer, plus the text positions of the next tokens per sequence.

    cfg: model.Config (its shape); policy: policies.Policy; budget: tokens per layer and KV head
    (None only for `full`); pad: (B,) leading padding tokens per sequence; max_len: storage to
    preallocate for `full` (else it grows by doubling).

    Per-sequence budgets (evaluation batches texts of different lengths at one cache ratio):
    budget may be a list of B budgets, and policy a list of B policies that differ only in their
    split (n_sink, recent; policies.make_policy at each budget). Each sequence is then evicted
    exactly as it would be alone; a test holds the two equal. Storage is sized by the largest.

    Host-side state, from call lengths alone (never read back from the device): `held`, a bound
    on the tokens any head holds, and `capacity`, the storage each layer needs for the current call.
    """

    layer_class = LayerCache  # fast.KVCache swaps in its own

    def __init__(self, cfg, policy: Policy | list[Policy], budget: int | list[int] | None = None, *, batch: int = 1,
                 mode: str = "streaming", chunk: int = 1, positions: str = "original",
                 device="cpu", dtype=torch.float32, pad=None, max_len: int | None = None):
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
        self.cfg, self.policy = cfg, policy_list[0]
        self.budget = None if self.policy.keep_all else max(budget_list)  # the largest: what storage is sized by
        self.batch, self.mode, self.chunk, self.position_scheme = batch, mode, chunk, positions
        self.device, self.dtype = torch.device(device), dtype
        self.score_dtype = torch.promote_types(dtype, torch.float32)  # scores in fp32 at least
        self.max_len = max_len
        if self.budget is None:
            self.base = max_len or chunk
        else:  # budget + chunk slots, and never more than the text can fill
            self.base = min(self.budget + chunk, max_len) if max_len else self.budget + chunk
        self.capacity, self.held = self.base, 0
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) position of the next token
        self.budgets = torch.zeros(batch, 1, 1, dtype=torch.long, device=self.device)  # (B, 1, 1) per sequence
        self.n_sinks, self.recents = torch.zeros_like(self.budgets), torch.zeros_like(self.budgets)
        self.alpha = torch.tensor(self.policy.alpha, dtype=self.score_dtype, device=self.device)  # a tensor: no recompiles
        self._set_budgets(policy_list, budget_list)
        self.layers = [self.layer_class(i, self) for i in range(cfg.n_layers)]
        self.reset(pad)

    def _set_budgets(self, policy_list: list[Policy], budget_list: list[int]) -> None:
        """Each sequence's budget and split, in place (a captured decode step reads these tensors)."""
        for t, values in ((self.budgets, budget_list), (self.n_sinks, [p.n_sink for p in policy_list]),
                          (self.recents, [p.recent for p in policy_list])):
            t.copy_(torch.tensor(values, dtype=torch.long)[:, None, None])

    def positions(self, T: int) -> torch.Tensor:
        """Called by the model first in its forward: (B, T) text positions of the next T tokens
        (negative for left padding). Makes room for them and moves the next position on."""
        if self.budget is not None and T > self.chunk and (self.mode == "streaming" or self.held > 0):
            raise ValueError(f"{self.mode} mode takes at most chunk={self.chunk} tokens per call here:"
                             " feed longer inputs with generate.feed(model, tokens, cache)")
        needed = self.held + T
        if self.budget is not None:  # budget + chunk slots, more for a prompt (each layer grows when it writes)
            self.capacity = max(self.base, needed)
        elif self.max_len is not None and needed > self.max_len:
            raise ValueError(f"the full cache holds max_len={self.max_len} tokens: make it larger")
        elif needed > self.capacity:  # `full` with no max_len: grow by doubling
            self.capacity = max(needed, 2 * self.capacity)
        self.held = needed if self.budget is None else min(needed, self.budget)
        positions = self.next_pos[:, None] + torch.arange(T, device=self.device)
        self.next_pos += T
        return positions

    def reset(self, pad=None, policy=None, budget=None) -> None:
        """Empty the cache in place for a new batch of texts (same shapes: no new compile), with new
        per-sequence budgets and policies if given (same policy form, budgets within the storage)."""
        if budget is not None:
            if self.policy.keep_all:
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
        self.padded = bool(pad.any())
        self.held = 0

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
    return policy_list, [0 if policy_list[0].keep_all else int(b) for b in budget_list]
