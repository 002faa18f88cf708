"""The real default model (SmolLM2-135M): real eviction equals the papers' masked simulation."""

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


@pytest.mark.parametrize("policy_name", ["a2sf", "h2o"])
def test_real_eviction_equals_masked_simulation_on_the_real_model(policy_name):
    m, tok = default_model()
    ids = tok.encode(generate.DEFAULT_PROMPT)[:200]
    tokens = torch.tensor([ids])
    budget = round(0.2 * len(ids))  # cache ratio 0.2, as in A2SF Table 1
    p = policies.make_policy(policy_name, budget)
    c = KVCache(m.cfg, p, budget)
    real = run_through(m, tokens, c)
    with torch.no_grad():
        sim, masks = simulate.masked_simulation(m, tokens, p, budget)
    assert (real - sim).abs().max() < 1e-3  # fp32; logits span about +-30
    for layer in range(m.cfg.n_layers):  # what each head keeps is what its last row saw, minus one
        kept = c.kept_mask(layer, 200)
        assert (kept <= masks[layer][:, :, -1]).all() and (kept.sum(-1) == budget).all()
        assert (masks[layer][:, :, -1].sum(-1) == budget + 1).all()
