"""Exercise 01, reference solution: the attention each position receives, per layer."""

import torch

from model import attend


@torch.no_grad()
def attention_received(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) -> (n_layers, T) float: for each layer and each text position j, the mean
    attention that position j receives, A[h, q, j] averaged over the batch, every query head h
    and every row q that can see it (q >= j, so T - j rows). No cache: a plain causal forward.
    """
    cfg = model.cfg
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
    causal = (pos[:, None, :] <= pos[:, :, None])[:, None].expand(B, cfg.n_kv_heads, T, T)  # (B, Hkv, T, T)
    rows_seeing = (T - torch.arange(T, device=tokens.device)).float()  # (T,) rows q >= j
    x, angles = model.embed(tokens, pos), model.angles(pos)  # angles: rotary (cos, sin), None for OPT
    out = []
    for block in model.layers:
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x))  # q (B, Hkv, G, T, D), k and v (B, Hkv, T, D)
        q, k = attn.rope(q, angles), attn.rope(k, angles)
        o, probs = attend(q, k, v, causal, need_probs=True)  # probs (B, Hkv, G, T, T)
        out.append(probs.float().sum(dim=(0, 1, 2, 3)) / (B * cfg.n_heads * rows_seeing))
        x = x + attn.output(o)
        x = x + block.mlp(block.mlp_norm(x))
    return torch.stack(out)  # (n_layers, T)
