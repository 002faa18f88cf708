"""Exercise 05, reference solution: streaming log-probabilities and perplexity."""

import math

import torch

from cache import KVCache


@torch.no_grad()
def streaming_logprobs(model, tokens, policy, budget, chunk: int) -> torch.Tensor:
    """Stream tokens (B, T) through a cache.KVCache(model.cfg, policy, budget, batch=B, chunk=chunk)
    (streaming mode: after every call the cache evicts down to `budget`; `full` takes budget None),
    in calls of `chunk` tokens. Returns (B, T - 1) float32: entry t is log p(tokens[:, t + 1]), the
    log-probability the model gave the next token at row t, attending only to what the cache held."""
    B, T = tokens.shape
    cache = KVCache(model.cfg, policy, budget, batch=B, chunk=chunk)
    logits = torch.cat([model(tokens[:, s:s + chunk], cache) for s in range(0, T, chunk)], dim=1)  # (B, T, V)
    return logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]


def perplexity(logprobs: torch.Tensor) -> float:
    """exp of the mean negative log-probability over all entries (a float)."""
    return math.exp(-float(logprobs.double().mean()))
