"""Exercise 05: streaming perplexity, StreamingLLM broken (window) and fixed (sink). Fill in
`streaming_logprobs` and `perplexity` (README.md)."""

import torch


@torch.no_grad()
def streaming_logprobs(model, tokens, policy, budget, chunk: int) -> torch.Tensor:
    """Stream tokens (B, T) through a cache.KVCache(model.cfg, policy, budget, batch=B, chunk=chunk)
    (streaming mode: after every call the cache evicts down to `budget`; `full` takes budget None),
    in calls of `chunk` tokens. Returns (B, T - 1) float32: entry t is log p(tokens[:, t + 1]), the
    log-probability the model gave the next token at row t, attending only to what the cache held."""
    raise NotImplementedError("streaming_logprobs")


def perplexity(logprobs: torch.Tensor) -> float:
    """exp of the mean negative log-probability over all entries (a float)."""
    raise NotImplementedError("perplexity")
