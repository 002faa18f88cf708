"""Exercise 03's experiment: `python -m exercises 03`. Your a2sf_update inside the papers' masked
simulation (simulate.py) on the real model: perplexity of a Shakespeare text against alpha."""

import math
import time

import torch

import policies
import simulate
from exercises import course


def main(impl, n_tokens=256, budget=32, chunk=8, alphas=(0.0, 0.1, 0.2, 0.5, 0.9, 1.0)):
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, n_tokens)])

    def yours(policy, state, probs, mask, q_pos, alpha=None):  # what simulate.py calls after each call
        return {**state, "score": impl.a2sf_update(state["score"], probs, q_pos, policy.alpha)}

    def ppl(logits):
        lp = logits[0, :-1].log_softmax(-1).gather(-1, tokens[0, 1:, None])
        return math.exp(-lp.mean())

    with torch.no_grad():
        full = ppl(m(tokens))
    print(f"{n_tokens} tokens of Shakespeare, budget {budget} per KV head, calls of {chunk} rows (masked simulation)")
    print(f"full cache: ppl {full:.2f}")
    original = policies.accumulate
    policies.accumulate = yours
    try:
        for alpha in alphas:
            t0 = time.perf_counter()
            p = policies.make_policy("a2sf", budget, alpha=alpha)
            with torch.no_grad():
                logits, masks = simulate.masked_simulation(m, tokens, p, budget, chunk=chunk)
            last = torch.stack([mk[0, :, -1] for mk in masks])  # (layers, Hkv, T) what the last row saw
            age = (n_tokens - 1 - torch.arange(n_tokens)).float()
            mean_age = float((last * age).sum() / last.sum())
            print(f"a2sf alpha {alpha:3.1f}: ppl {ppl(logits):7.2f}   mean age of the kept tokens at the end {mean_age:5.1f}"
                  f"   ({time.perf_counter() - t0:.0f} s)")
    finally:
        policies.accumulate = original
