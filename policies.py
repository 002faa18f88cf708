"""KV-cache scoring policies: which tokens a layer's KV head keeps when it must drop some.

Every built-in attention-based policy is one instance of a single form (../shared/docs/policies.md).
After each attention call, with the rows q it just computed (t = the newest row), each kept token j
of KV head g gets

    s[g, j]  <-  alpha^(n_rows) * s[g, j]  +  nu[g, j] * sum_q alpha^(t - q) * w[q] * sum_{h in G(g)} A[h, q, j]

and the cache keeps the n_sink first tokens, the `recent` latest ones, and fills the rest of the
budget with the highest priority (ties: the oldest token goes first).

    policy     w[q]                          alpha       nu[g, j]     paper
    h2o        1                             1           1            Zhang et al. 2023, Sec. 4.2 (heavy hitters)
    h2o_mean   1                             1           1, / rows    kvpress ObservedAttentionPress
    a2sf       1                             0.2         1            Jo & Shin 2024, Eq. 5
    vatp       1                             1           ||v_j||_1    Guo et al. 2024, Eq. 4
    tova       1                             0           1            Oren et al. 2024 (newest row only)
    snapkv     1 on the last `obs_window`    1           1            Li et al. 2024 (+ pooling, kernel 5)
               rows of a call
    window, sink, full, random: no scores (positions or a seeded hash decide).

A policy of your own is either new parameters of that form, or a per-token score computed from
what the cache stores, one function and one registry line (exercise 07):

    def keynorm(keys, values, positions):   # (..., S, D), (..., S, D), (..., S) -> (..., S), higher kept
        return -keys.float().norm(dim=-1)   # Devoto et al. 2024: low key norms get the attention
    REGISTRY["keynorm"] = ("keep the lowest key norms", lambda budget: dict(scored=False, score_fn=keynorm))

Every path (the cache, its fast twins, the masked simulation) ranks by it, because they all call
`priority` below. (Give a named function: policies are compared by value, a function by identity,
so a lambda made anew for each policy would make two equal policies differ.)

The per-token state a policy needs is declared by `token_state` (its running score, H2O-mean's
row counts, VATP's ||v||_1): the cache stores whatever it returns, slot by slot, and knows none of
them by name. Everything here is a pure function of tensors: no layers, no files, no host syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Policy:
    name: str
    scored: bool = True  # needs the attention probabilities (explicit attention path)
    alpha: float = 1.0  # forgetting factor (A2SF); 1 = plain accumulation (H2O)
    n_sink: int = 0  # first tokens of the text, never evicted (StreamingLLM's attention sinks)
    recent: int = 0  # latest tokens, never evicted, the newest included (H2O's local window)
    value_prior: bool = False  # VATP: nu = ||v||_1
    mean: bool = False  # H2O-mean: divide by the number of rows that saw the token
    obs_window: int = 0  # SnapKV: only the last obs_window rows of a call vote (0: every row)
    pool: int = 1  # SnapKV: average-pool the scores over neighbouring kept keys (odd kernel)
    keep_all: bool = False  # full: never evict
    random: bool = False  # random: a seeded hash of (position, layer, head) is the score
    seed: int = 0
    gqa: str = "sum"  # how the query heads of a group combine: "sum" or "max"
    score_fn: Callable | None = None  # a custom per-token score (keys, values, positions) -> (..., S)


# name -> (description, fields as a function of the budget). The budget only sets the split.
REGISTRY: dict[str, tuple[str, Callable[[int], dict]]] = {
    "full": ("keep everything (the reference)", lambda b: dict(scored=False, keep_all=True)),
    "window": ("the `budget` latest tokens (\"local\")", lambda b: dict(scored=False, recent=b)),
    "sink": ("StreamingLLM: 4 sinks + the latest", lambda b: dict(scored=False, n_sink=4, recent=b - 4)),
    "h2o": ("H2O: half heavy hitters, half recent", lambda b: dict(recent=b // 2)),
    "h2o_mean": ("H2O with mean (observed) attention", lambda b: dict(recent=b // 2, mean=True)),
    "a2sf": ("A2SF: accumulation with forgetting", lambda b: dict(alpha=0.2)),
    "vatp": ("VATP: attention x ||v||_1, 4 sinks", lambda b: dict(value_prior=True, n_sink=4, recent=(b - 4) // 2)),
    "tova": ("TOVA: the newest row's attention", lambda b: dict(alpha=0.0)),
    "snapkv": ("SnapKV: last-32-row vote, pooled", lambda b: dict(obs_window=32, pool=5, recent=min(32, b // 2))),
    "random": ("a seeded random subset (a floor)", lambda b: dict(scored=False, random=True)),
}
POLICY_NAMES = tuple(REGISTRY)  # the built-in policies (REGISTRY may grow: exercise 07)


def make_policy(name: str, budget: int | None, **overrides) -> Policy:
    """The policy `name` with its paper's defaults for this budget, then the given overrides.

    Overrides left as None keep the default. For `sink` and `window`, a changed n_sink moves the
    rest of the budget to the recent window, so the whole budget stays protected.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}: choose one of {', '.join(REGISTRY)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    b = budget if budget is not None else 0
    fields = dict(REGISTRY[name][1](b))
    if name in ("sink", "window") and "n_sink" in overrides and "recent" not in overrides:
        overrides["recent"] = b - overrides["n_sink"]
    fields.update(overrides)
    policy = Policy(name=name, **fields)
    check(policy, budget)
    return policy


def check(policy: Policy, budget: int | None) -> None:
    """One-line errors for settings that cannot work."""
    if not 0.0 <= policy.alpha <= 1.0:
        raise ValueError(f"alpha {policy.alpha} is outside [0, 1]: use a forgetting factor between 0 and 1")
    if policy.n_sink < 0 or policy.recent < 0:
        raise ValueError("n_sink and recent must be >= 0")
    if policy.gqa not in ("sum", "max"):
        raise ValueError(f"gqa {policy.gqa!r}: use 'sum' or 'max'")
    if policy.pool < 1 or policy.pool % 2 == 0:
        raise ValueError(f"pool kernel {policy.pool} must be odd and >= 1")
    if policy.keep_all:
        return
    if budget is None or budget < 1:
        raise ValueError(f"policy {policy.name} needs a budget >= 1 (give --budget N or --ratio R)")
    if policy.n_sink + policy.recent > budget:
        raise ValueError(
            f"budget {budget} is below the protected slots (n_sink {policy.n_sink} + recent {policy.recent}):"
            " raise --budget or lower --n-sink / --recent")


# -- the per-token state and its update after each attention call ---------------------------------

def token_state(policy: Policy, k: torch.Tensor, v: torch.Tensor, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The state the policy keeps per token, as it starts when tokens enter the cache.
    k, v (..., T, D) -> {name: (..., T)} in dtype (fp32 at least). A score starts at 0 when its
    token enters (its own row's attention to itself is the first thing it adds)."""
    state = {}
    if policy.scored:
        state["score"] = torch.zeros(v.shape[:-1], dtype=dtype, device=v.device)
    if policy.mean:  # H2O-mean: how many rows have seen the token
        state["count"] = torch.zeros(v.shape[:-1], dtype=dtype, device=v.device)
    if policy.value_prior:  # VATP's nu = ||v||_1, once per token (values never change)
        state["nu"] = v.to(dtype).abs().sum(dim=-1)
    return state


def aggregate_heads(probs: torch.Tensor, how: str) -> torch.Tensor:
    """probs (B, Hkv, G, T, S) -> (B, Hkv, T, S) in fp32: the query heads of each KV head's group,
    summed (A2SF authors' later code) or their max (KVCache-Factory's option)."""
    probs = probs.to(torch.promote_types(probs.dtype, torch.float32))
    return probs.sum(dim=2) if how == "sum" else probs.amax(dim=2)


def _alpha(policy: Policy, alpha, dtype, device) -> torch.Tensor:
    """The forgetting factor as a tensor: the policy's, or `alpha` (a 0-dim tensor the cache holds,
    so a compiled step does not specialise on its value)."""
    return torch.tensor(policy.alpha, dtype=dtype, device=device) if alpha is None else alpha.to(dtype)


def row_weights(policy: Policy, q_pos: torch.Tensor, newest: torch.Tensor, dtype=torch.float32, alpha=None) -> torch.Tensor:
    """q_pos (B, R) text positions of rows (< 0: padding), newest (B,) the call's newest row t
    -> (B, R) weights w[q] * alpha^(t - q). 0^0 = 1, so alpha = 0 keeps the newest row only."""
    t = newest[:, None]  # (B, 1)
    age = (t - q_pos).clamp(min=0).to(dtype)  # (B, R)
    w = torch.pow(_alpha(policy, alpha, dtype, q_pos.device), age)
    if policy.obs_window:  # SnapKV: only the last obs_window rows of the call vote
        w = w * (q_pos > t - policy.obs_window)
    return w * (q_pos >= 0)


def row_update(policy: Policy, probs, q_pos, newest, alpha=None):
    """The inner sum of the shared form for some of a call's rows: (B, Hkv, S) fp32
    sum_q alpha^(t - q) w[q] sum_{h in G(g)} A[h, q, j].

    probs (B, Hkv, G, R, S) attention of R rows; q_pos (B, R) their positions; newest (B,) the
    newest row of the whole call (t). Rows may come in chunks: the updates of the chunks add up.
    """
    A = aggregate_heads(probs, policy.gqa)  # (B, Hkv, R, S)
    w = row_weights(policy, q_pos, newest, A.dtype, alpha)  # (B, R)
    return torch.einsum("bgrs,br->bgs", A, w)


def seen_counts(mask, q_pos):
    """mask (B, Hkv, R, S), q_pos (B, R) -> (B, Hkv, S): how many real rows saw each key."""
    return (mask & (q_pos >= 0)[:, None, :, None]).sum(dim=2)


def apply_update(policy: Policy, state: dict, update, n_rows, seen=None, alpha=None) -> dict:
    """The state after a call: s <- alpha^(n_rows) s + nu * update (A2SF Eq. 5; VATP Eq. 4 for
    nu = ||v||_1), and H2O-mean's count + seen. state {name: (B, Hkv, S)}; update (B, Hkv, S)
    (row_update summed over the call's rows); n_rows (B,) real rows of the call; seen (B, Hkv, S)
    seen_counts of the call (H2O-mean). Returns a new dict (the cache copies it into its slots)."""
    new = dict(state)
    if "nu" in state:
        update = update * state["nu"]
    decay = torch.pow(_alpha(policy, alpha, update.dtype, update.device), n_rows.to(update.dtype))  # (B,)
    new["score"] = decay[:, None, None] * state["score"] + update
    if "count" in state:
        new["count"] = state["count"] + seen.to(state["count"].dtype)
    return new


def accumulate(policy: Policy, state: dict, probs, mask, q_pos, alpha=None) -> dict:
    """The shared form for one whole call at once (what the masked simulation uses).
    state {name: (B, Hkv, S)}; probs (B, Hkv, G, T, S) attention of this call's rows; mask
    (B, Hkv, T, S) which keys each row saw; q_pos (B, T). Returns the new state."""
    update = row_update(policy, probs, q_pos, q_pos.amax(dim=-1), alpha)
    return apply_update(policy, state, update, (q_pos >= 0).sum(dim=-1), seen_counts(mask, q_pos), alpha)


# -- the one ranking every path evicts by --------------------------------------------------------

class Tokens(NamedTuple):
    """What a cache holds, as a policy sees it. Shapes (..., S) with any leading axes (B, Hkv), or
    (L, B, Hkv) for several layers at once; keys and values (..., S, D)."""

    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor  # text position of each slot's token
    valid: torch.Tensor  # whether the slot holds a token
    state: dict  # {name: (..., S)} as token_state declares it


def _hash01(x: torch.Tensor) -> torch.Tensor:
    """A deterministic integer hash (three LCG rounds) mapped to [0, 1); same on CPU and CUDA."""
    x = x & 0x7FFFFFFF
    for _ in range(3):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return x.float() / 2**31


def pool_scores(scores, key_pos, valid, kernel: int):
    """SnapKV's 1-D average pooling over neighbouring kept keys in text order (zero-padded ends).
    scores, key_pos, valid (..., S); slots may be in any order."""
    big = torch.iinfo(key_pos.dtype).max
    order = torch.where(valid, key_pos, big).argsort(dim=-1, stable=True)  # kept keys first, by position
    s = torch.where(valid, scores, 0.0).gather(-1, order)  # (..., S) in text order
    pooled = F.avg_pool1d(s.reshape(-1, 1, s.shape[-1]), kernel, stride=1, padding=kernel // 2).view(s.shape)
    return torch.empty_like(pooled).scatter_(-1, order, pooled)  # back to slot order


def token_score(policy: Policy, tokens: Tokens, layer) -> torch.Tensor:
    """The policy's score of each held token (..., S) fp32, before protection: higher is kept."""
    if policy.score_fn is not None:  # a policy of your own (exercise 07)
        return policy.score_fn(tokens.keys, tokens.values, tokens.pos).float()
    if policy.random:
        head = torch.arange(tokens.pos.shape[-2], device=tokens.pos.device)[:, None]  # (Hkv, 1)
        return _hash01(tokens.pos * 1000003 + head * 7919 + layer * 104729 + policy.seed * 15485863)
    if not policy.scored:  # window, sink, full: positions alone decide
        return torch.zeros(tokens.pos.shape, device=tokens.pos.device)
    p = tokens.state["score"]
    if policy.mean:  # H2O-mean: the mean attention over the rows that saw the token
        p = p / tokens.state["count"].clamp(min=1.0)
    if policy.pool > 1:
        p = pool_scores(p, tokens.pos, tokens.valid, policy.pool)
    return p


def priority(policy: Policy, tokens: Tokens, newest, layer, n_sink=None, recent=None) -> torch.Tensor:
    """What eviction ranks by, highest kept first: (..., B, Hkv, S) fp32. The one hook every path
    calls (the cache, its fast twins, the masked simulation).

    newest (B,) the newest row's position; layer an int or a tensor that broadcasts against the
    leading axes (random's hash). Protected slots (the n_sink first, the `recent` latest, newest
    included) get +inf; empty slots -inf. The caller breaks ties by evicting the oldest. n_sink,
    recent: per-sequence (B, 1, 1) tensors where the sequences of a batch have budgets of their own
    (cache.KVCache); default the policy's.
    """
    n_sink = policy.n_sink if n_sink is None else n_sink
    recent = policy.recent if recent is None else recent
    p = token_score(policy, tokens, layer)
    protected = (tokens.pos < n_sink) | (tokens.pos > newest[:, None, None] - recent)
    p = torch.where(protected, float("inf"), p)
    return torch.where(tokens.valid, p, float("-inf"))
