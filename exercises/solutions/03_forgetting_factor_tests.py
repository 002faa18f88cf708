"""Exercise 03, reference tests (the solution of student_tests.py): A2SF with alpha = 1 is H2O."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import policies


@st.composite
def calls(draw):
    """An attention call: starting scores, probabilities, rows' positions with left padding."""
    B, H, G = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T = draw(st.integers(1, 5))
    S = T + draw(st.integers(0, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    pads = torch.tensor([draw(st.integers(0, T - 1)) for _ in range(B)])
    q_pos = torch.arange(T) + draw(st.integers(0, 30)) - pads[:, None]  # (B, T)
    q_pos = torch.where(torch.arange(T) < pads[:, None], -1, q_pos)  # padding rows: negative positions
    probs = torch.randn(B, H, G, T, S, generator=g).softmax(-1)  # padding rows get probabilities too
    scores = torch.rand(B, H, S, generator=g) * 4  # non-zero: the old scores must survive alpha = 1
    return scores, probs, q_pos


@settings(max_examples=60)
@given(calls())
def test_alpha_one_is_h2o(a2sf_update, call):
    scores, probs, q_pos = call
    got = a2sf_update(scores, probs, q_pos, 1.0)
    mask = torch.ones(probs.shape[:2] + probs.shape[3:], dtype=torch.bool)  # (B, Hkv, T, S)
    want = policies.accumulate(policies.make_policy("h2o", 8), {"score": scores}, probs, mask, q_pos)["score"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@settings(max_examples=30)
@given(calls(), st.floats(0.0, 1.0))
def test_alpha_zero_keeps_the_newest_row_and_any_alpha_decays_the_old_scores(a2sf_update, call, alpha):
    scores, probs, q_pos = call
    zero = a2sf_update(scores, probs, q_pos, 0.0)
    newest = (q_pos == q_pos.amax(-1, keepdim=True)).float()  # (B, T)
    torch.testing.assert_close(zero, torch.einsum("bghts,bt->bgs", probs, newest), rtol=0, atol=1e-6)
    n = (q_pos >= 0).sum(-1).float()
    no_rows = a2sf_update(scores, probs * 0, q_pos, alpha)  # attention all zero: only the decay remains
    torch.testing.assert_close(no_rows, scores * alpha ** n[:, None, None], rtol=1e-5, atol=1e-6)
