"""On a GPU (opt-in: `python -m pytest -m gpu -s`): the real model in bf16 on CUDA against fp32
on the CPU, and real eviction against the masked simulation in bf16. Figures are printed and,
when $OUT is set, written to $OUT/gpu_checks.json."""

import functools
import json
import os

import pytest
import torch
from helpers import run_through

import generate
import load_weights
import policies
import simulate
from cache import KVCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FIGURES = {}


def record(name, **figures):
    FIGURES[name] = figures
    print(name, figures)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_checks.json"), "w") as f:
            json.dump(FIGURES, f, indent=1)


@functools.lru_cache
def loaded(device, dtype):
    return load_weights.load(None, device=device, dtype=dtype)


def greedy(m, ids, n, device):
    cache = KVCache(m.cfg, policies.make_policy("full", None), None, device=device, dtype=m.dtype, max_len=len(ids) + n)
    new, _ = generate.generate(m, torch.tensor([ids], device=device), cache, n)
    return new[0].tolist()


def test_bf16_on_cuda_gives_the_greedy_text_of_fp32_on_the_cpu():
    m32, tok = loaded("cpu", torch.float32)
    m16, _ = loaded("cuda", torch.bfloat16)
    ids = tok.encode(tok.chat("Write a short poem about the sea."))
    a, b = greedy(m32, ids, 32, "cpu"), greedy(m16, ids, 32, "cuda")
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    record("bf16_cuda_vs_fp32_cpu_greedy_32", same=a == b, first_divergence=first_diff,
           fp32_text=tok.decode(a), bf16_text=tok.decode(b))
    assert first_diff is None or first_diff >= 8  # bf16 rounding may flip a near-tie late, not at once


@pytest.mark.parametrize("policy_name", ["a2sf", "h2o", "sink", "vatp"])
def test_masked_simulation_and_real_eviction_agree_in_bf16_on_cuda(policy_name):
    m, tok = loaded("cuda", torch.bfloat16)
    ids = tok.encode(generate.DEFAULT_PROMPT)[:200]
    tokens = torch.tensor([ids], device="cuda")
    budget = round(0.2 * len(ids))
    p = policies.make_policy(policy_name, budget)
    real = run_through(m, tokens, KVCache(m.cfg, p, budget, device="cuda", dtype=torch.bfloat16)).float()
    with torch.no_grad():
        sim, _ = simulate.masked_simulation(m, tokens, p, budget)
    sim = sim.float()
    diff = (real - sim).abs()
    agree = (real.argmax(-1) == sim.argmax(-1)).float().mean().item()
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[0, :-1], tokens[0, 1:]).item()
    record(f"masked_vs_real_bf16_{policy_name}", max_abs=diff.max().item(), mean_abs=diff.mean().item(),
           argmax_agreement=agree, nll_real=nll(real), nll_masked=nll(sim))
    # bf16 keeps 8 significant bits: logits of size ~30 round to ~0.1, and a near-tie in the scores
    # can evict a different token, after which the two paths see different keys. We hold them to
    # the same predictions almost everywhere and the same loss within 2%.
    assert agree >= 0.95 and abs(nll(real) - nll(sim)) <= 0.02 * nll(sim)
