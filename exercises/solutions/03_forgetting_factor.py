"""Exercise 03, reference solution: A2SF's score update."""

import torch


def a2sf_update(scores: torch.Tensor, probs: torch.Tensor, q_pos: torch.Tensor, alpha: float) -> torch.Tensor:
    """A2SF's running score after one attention call (Jo & Shin 2024, Eq. 5): older attention fades
    by alpha per row. With t the newest row of the call and n its number of real rows,

        s[b, g, j] <- alpha^n * s[b, g, j] + sum over real rows q of alpha^(t - q) * sum over heads h of A[b, g, h, q, j]

    so applying it call by call, whatever the calls, gives sum_q alpha^(t - q) A_q (Eq. 5).
    scores (B, Hkv, S); probs (B, Hkv, G, T, S); q_pos (B, T) rows' positions, < 0 = padding (no
    weight, not counted in n); alpha in [0, 1], and 0^0 = 1 (alpha = 0 keeps the newest row only).
    Returns new scores (B, Hkv, S) float32; `scores` is not modified.
    """
    real = q_pos >= 0  # (B, T)
    t = q_pos.amax(dim=-1, keepdim=True)  # (B, 1) the newest row
    a = torch.tensor(alpha, dtype=torch.float32)
    w = torch.pow(a, (t - q_pos).clamp(min=0).float()) * real  # (B, T); torch.pow(0, 0) = 1
    update = torch.einsum("bghts,bt->bgs", probs.float(), w)
    decay = torch.pow(a, real.sum(dim=-1).float())  # (B,)
    return decay[:, None, None] * scores.float() + update
