"""Exercise 01: find the attention sinks. Fill in `attention_received` (README.md)."""

import torch


@torch.no_grad()
def attention_received(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) -> (n_layers, T) float: for each layer and each text position j, the mean
    attention that position j receives, A[h, q, j] averaged over the batch, every query head h
    and every row q that can see it (q >= j, so T - j rows). No cache: a plain causal forward.

    Hint: run the layers yourself as Transformer.forward and Block.forward do, but call
    model.attend(..., need_probs=True) to get the probabilities (B, Hkv, G, T, T).
    """
    # TODO: embed, and the rotary angles once (model.angles); then for each block: project, rotate
    # (attn.rope), attend with need_probs=True, reduce the probabilities to (T,), then finish the
    # block (output, residual, MLP).
    raise NotImplementedError("attention_received")
