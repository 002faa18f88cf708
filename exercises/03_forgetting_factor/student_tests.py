"""Your tests for exercise 03. Each test takes the implementation under test as its argument
`a2sf_update` (a function with the signature of student.a2sf_update); the checker calls your
tests with its own correct implementation (they must pass), with yours, and with broken ones
(your tests must catch every one). Run them alone with

    pytest exercises/03_forgetting_factor/student_tests.py

Write at least one property test with hypothesis (@given) that A2SF with alpha = 1 is H2O:
compare a2sf_update(scores, probs, q_pos, 1.0) with H2O's scores,
policies.accumulate(policies.make_policy("h2o", 8), {"score": scores}, probs, mask, q_pos)["score"].
"""

import torch  # noqa: F401  (you will need these)
from hypothesis import given, settings  # noqa: F401
from hypothesis import strategies as st  # noqa: F401

import policies  # noqa: F401


def test_alpha_one_is_h2o(a2sf_update):
    # TODO: draw the shapes (batch, KV heads, group size, rows, keys), some left-padding rows,
    # random probabilities and non-zero starting scores; compare with H2O's scores.
    raise NotImplementedError("write this test (README.md, step 2)")
