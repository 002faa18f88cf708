"""The real default model (SmolLM2-135M): real eviction equals the papers' masked simulation, in
both modes (streaming token by token; prefill of a prompt, then one token per decode step)."""

import functools

import pytest
import torch
from helpers import run_through

import generate
import load_weights
import policies
import simulate
from cache import KVCache


@functools.lru_cache
def default_model():
    return load_weights.load(None)


@pytest.mark.parametrize("policy_name,mode,T,prompt_len", [("a2sf", "streaming", 120, None), ("h2o", "prefill", 200, 160)])
def test_real_eviction_equals_masked_simulation_on_the_real_model(policy_name, mode, T, prompt_len):
    m, tok = default_model()
    ids = tok.encode(generate.DEFAULT_PROMPT)[:T]
    assert len(ids) == T
    tokens = torch.tensor([ids])
    budget = round(0.2 * (prompt_len or T))  # cache ratio 0.2, as in A2SF Table 1
    p = policies.make_policy(policy_name, budget)
    c = KVCache(m.cfg, p, budget, mode=mode)
    real = run_through(m, tokens, c, prompt_len)
    with torch.no_grad():
        sim, masks = simulate.masked_simulation(m, tokens, p, budget, mode=mode, prompt_len=prompt_len)
    assert (real - sim).abs().max() < 1e-3  # fp32; logits span about +-30
    assert real.abs().max() > 5  # real logits, not a degenerate run
    for layer in range(m.cfg.n_layers):  # what each head keeps is what its last row saw, minus one
        kept = c.kept_mask(layer, T)
        assert (kept <= masks[layer][:, :, -1]).all() and (kept.sum(-1) == budget).all()
        assert (masks[layer][:, :, -1].sum(-1) == budget + 1).all()
        assert kept[..., T - p.recent:].all()  # the recent window, newest included
