"""Checker for exercise 05 (streaming perplexity): `pytest exercises/05_streaming_ppl`
(the full measurement, 512 tokens: `pytest exercises/05_streaming_ppl -m slow`, about 2 minutes)."""

import json
import math

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import evaluate
import policies
from exercises import course

impl = course.implementation(__file__)


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), B=st.integers(1, 2), budget=st.integers(3, 10), chunk=st.integers(1, 4),
       name=st.sampled_from(["full", "window", "sink", "h2o", "a2sf"]))
def test_logprobs_are_what_evaluate_py_computes(seed, B, budget, chunk, name):
    m = tiny_model("tiny-llama", seed=seed % 3)
    tokens = course.random_tokens(seed, B, 21)
    if name == "sink":
        budget = max(budget, 5)
    b = None if name == "full" else budget
    policy = policies.make_policy(name, b)
    got = impl.streaming_logprobs(m, tokens, policy, b, chunk)
    want = evaluate.token_logprobs(m, tokens, policy, b, evaluate.Setup(chunk=chunk))
    assert got.shape == want.shape, (f"streaming_logprobs returns (B, T - 1) = {tuple(want.shape)}, got {tuple(got.shape)}: "
                                     "the last token has no next token to predict")
    assert torch.allclose(got, want, atol=1e-4), (
        f"{name}, budget {b}, chunk {chunk}: off by {(got - want).abs().max():.3g} from evaluate.token_logprobs "
        f"(first at t = {int((got - want).abs().amax(0).argmax())}). Entry t is log_softmax(logits[:, t])[tokens[:, t + 1]];"
        " feed the tokens in calls of `chunk` through one streaming KVCache.")


@given(st.lists(st.floats(-20, 0), min_size=1, max_size=30))
def test_perplexity_is_exp_of_the_mean_nll(lp):
    got = impl.perplexity(torch.tensor([lp]))
    want = math.exp(-sum(lp) / len(lp))
    assert math.isclose(got, want, rel_tol=1e-5), f"perplexity({lp}) = {got}, expected exp(-mean) = {want}"


def ppl_of(m, tokens, name, budget, chunk):
    p = policies.make_policy(name, None if name == "full" else budget)
    return impl.perplexity(impl.streaming_logprobs(m, tokens, p, None if name == "full" else budget, chunk))


def test_window_breaks_and_sinks_fix_it_on_the_real_model():
    impl.streaming_logprobs(tiny_model(), course.random_tokens(0, 1, 3), policies.make_policy("window", 2), 2, 1)
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, 128)])
    ppl = {name: ppl_of(m, tokens, name, 16, 16) for name in ("full", "window", "sink")}
    print("128 tokens, budget 16, calls of 16:", {k: round(v, 2) for k, v in ppl.items()})
    assert ppl["window"] > 1.3 * ppl["sink"], f"window should be far worse than sink here (reference: 57.5 vs 30.8): {ppl}"
    assert ppl["sink"] < 1.3 * ppl["full"], f"sink should stay near full here (reference: 30.8 vs 27.6): {ppl}"


@pytest.mark.slow
def test_512_tokens_budget_64_and_the_same_numbers_as_evaluate_py(tmp_path):
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, 512)])
    ppl = {name: ppl_of(m, tokens, name, 64, 8) for name in ("full", "window", "sink")}
    print("512 tokens, budget 64, calls of 8:", {k: round(v, 2) for k, v in ppl.items()})
    out = tmp_path / "ppl.json"
    argv = ["ppl", "--policies", "full,window,sink", "--budgets", "64", "--tokens", "512", "--limit", "1", "--chunk", "8",
            "--out", str(out)]
    assert evaluate.main(argv, m, tok) == 0
    theirs = {r["policy"]: r["ppl"] for r in json.loads(out.read_text())["results"]}
    for name in ppl:
        assert math.isclose(ppl[name], theirs[name], rel_tol=1e-3), f"{name}: {ppl[name]:.3f}, evaluate.py {theirs[name]:.3f}"
    assert ppl["window"] > 1.5 * ppl["sink"], ppl
