"""Exercise 07: a policy of your own, the key-norm rule of Devoto et al. 2024 ("A Simple and
Effective L2 Norm-Based Strategy for KV Cache Compression"): keep the keys with the LOWEST L2
norm. Fill in `keynorm_priority` and `KeyNormLayer.evict` (README.md); the rest is given."""

from unittest import mock

import torch

import evaluate
from cache import KVCache, LayerCache, keep_top  # noqa: F401  (keep_top: you will need it)
from policies import Policy, check


def keynorm_priority(keys, key_pos, valid, newest, n_sink: int, recent: int) -> torch.Tensor:
    """What eviction ranks by, highest kept first, as policies.priority does: (B, Hkv, S) float32.

    keys (B, Hkv, S, D) the stored keys; key_pos, valid (B, Hkv, S); newest (B,) the newest row's
    position. A low key norm is a high priority: -||k||_2. The n_sink first tokens (key_pos < n_sink)
    and the `recent` latest (key_pos > newest - recent) get +inf; empty slots get -inf."""
    raise NotImplementedError("keynorm_priority")


class KeyNormLayer(LayerCache):
    """One layer of the cache, evicting by key norm. The policy is unscored (no attention
    probabilities needed: the model keeps its fused attention, the paper's point)."""

    def evict(self) -> None:
        """After a call's attention: if the cache may be over budget (self.owner.evicting), keep the
        self.owner.budget tokens of highest keynorm_priority per KV head, oldest evicted first on
        ties, by updating self.valid in place. Read LayerCache.evict in cache.py first: the stored
        keys are self.k, their positions self.pos, the call's row positions self.q_pos."""
        raise NotImplementedError("KeyNormLayer.evict")


# -- given: the cache, the policy, and evaluate.py's token_logprobs with this cache ------------------

class KeyNormCache(KVCache):
    """A KVCache whose layers evict by key norm."""

    def __init__(self, cfg, policy, budget, **kwargs):
        super().__init__(cfg, policy, budget, **kwargs)
        self.layers = [KeyNormLayer(i, self) for i in range(cfg.n_layers)]


def keynorm_policy(budget: int, n_sink: int = 0, recent: int = 0) -> Policy:
    """The key-norm policy's protected slots; scored=False: it needs no attention probabilities."""
    policy = Policy(name="keynorm", scored=False, n_sink=n_sink, recent=recent)
    check(policy, budget)
    return policy


def keynorm_logprobs(model, tokens, policy, budget: int, chunk: int) -> torch.Tensor:
    """evaluate.token_logprobs (streaming, calls of `chunk`) with a KeyNormCache: (B, T - 1)."""
    def make_cache(cfg, policy, budget, setup, B, T, pad, device, dtype):  # evaluate.make_cache, our class
        return KeyNormCache(cfg, policy, budget, batch=B, mode="prefill", chunk=setup.chunk, positions=setup.positions,
                            device=device, dtype=dtype, pad=pad)

    with mock.patch.object(evaluate, "make_cache", make_cache):
        return evaluate.token_logprobs(model, tokens, policy, budget, evaluate.Setup(chunk=chunk))
