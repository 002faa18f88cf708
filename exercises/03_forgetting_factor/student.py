"""Exercise 03: A2SF's forgetting factor. Fill in `a2sf_update` here, and your own tests in
student_tests.py (README.md)."""

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
    # TODO: per-row weights alpha^(t - q) (zero on padding), a weighted sum, and the decay of the old scores
    raise NotImplementedError("a2sf_update")
