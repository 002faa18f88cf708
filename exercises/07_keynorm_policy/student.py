"""Exercise 07: a policy of your own, the key-norm rule (Devoto et al. 2024). Write `keynorm_score`,
then register it in one line at the bottom of this file (README.md, What to do)."""

import torch

import policies  # noqa: F401  (step 2: policies.REGISTRY)


def keynorm_score(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The key-norm policy's score of every held token, higher kept: -||k||_2, the L2 norm of the
    key over the head dimension D, negated (a low norm is kept first).

    keys (..., S, D) the keys as the cache stores them, with any leading axes ((B, Hkv) for one
    layer; (L, B, Hkv) when the fast path ranks several layers at once); values (..., S, D) and
    positions (..., S) are given to every score function and unused here. Returns (..., S) float32.
    Only the score: policies.priority adds the protected slots (+inf) and the empty ones (-inf)."""
    # TODO (step 1): one line
    raise NotImplementedError("keynorm_score")


# TODO (step 2): one line that adds the policy "keynorm" to policies.REGISTRY, written as the built-in
# entries are (a description, and a function of the budget that gives the Policy's fields).
