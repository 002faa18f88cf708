"""Checker for exercise 04 (VATP and sinks): `pytest exercises/04_vatp_sinks`
(the measurement on the real model: `pytest exercises/04_vatp_sinks -m slow`)."""

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import policies
import simulate
from exercises import course

impl = course.implementation(__file__)


@st.composite
def calls(draw):
    B, H, G = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T = draw(st.integers(1, 5))
    S, D = T + draw(st.integers(0, 5)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    pads = torch.tensor([draw(st.integers(0, T - 1)) for _ in range(B)])
    q_pos = torch.where(torch.arange(T) < pads[:, None], -1, torch.arange(T) + 9 - pads[:, None])
    return (torch.rand(B, H, S, generator=g), torch.randn(B, H, G, T, S, generator=g).softmax(-1), q_pos,
            torch.randn(B, H, S, D, generator=g))


@given(calls())
def test_vatp_update_is_the_shared_form_with_the_value_prior(call):
    scores, probs, q_pos, values = call
    got = impl.vatp_update(scores, probs, q_pos, values)
    mask = torch.ones(probs.shape[:2] + probs.shape[3:], dtype=torch.bool)
    vatp = policies.make_policy("vatp", 8)
    state = {**policies.token_state(vatp, values, values), "score": scores}  # "nu": ||v||_1, declared by the policy
    want = policies.accumulate(vatp, state, probs, mask, q_pos)["score"]
    assert got.shape == want.shape, f"vatp_update returns (B, Hkv, S) = {tuple(want.shape)}, got {tuple(got.shape)}"
    l2 = torch.einsum("bghts,bt->bgs", probs, (q_pos >= 0).float()) * values.norm(dim=-1) + scores
    assert not torch.allclose(got, l2, atol=1e-5) or torch.allclose(want, l2, atol=1e-5), (
        "that is the L2 norm of the values: VATP weighs by the L1 norm, sum_d |v_d|")
    assert torch.allclose(got, want, atol=1e-5), (
        f"vatp_update is off by {(got - want).abs().max():.3g} from policies.accumulate with the vatp policy: "
        "old score + ||v_j||_1 * (attention j received from the call's real rows, summed over the group's heads)")


def independent_value_norms(m, tokens):
    """From the hidden states each attention receives (a pre-hook) and the weights of wv."""
    xs = []
    hooks = [b.attn.register_forward_pre_hook(lambda mod, args: xs.append(args[0])) for b in m.layers]
    try:
        with torch.no_grad():
            m(tokens)
    finally:
        for h in hooks:
            h.remove()
    B, T = tokens.shape
    out = []
    for b, x in zip(m.layers, xs):
        v = x.double() @ b.attn.wv.weight.double().T
        if b.attn.wv.bias is not None:
            v = v + b.attn.wv.bias.double()
        out.append(v.view(B, T, m.cfg.n_kv_heads, -1).abs().sum(-1).permute(0, 2, 1))
    return torch.stack(out).float()


@settings(max_examples=8)
@given(seed=st.integers(0, 1000), B=st.integers(1, 2), T=st.integers(1, 16), arch=st.sampled_from(["tiny-llama", "tiny-opt"]))
def test_value_norms_match_an_independent_computation(seed, B, T, arch):
    m = tiny_model(arch, seed=seed % 5)
    tokens = course.random_tokens(seed, B, T)
    got = impl.value_norms(m, tokens)
    want = independent_value_norms(m, tokens)
    assert got.shape == want.shape, (f"value_norms returns (n_layers, B, Hkv, T) = {tuple(want.shape)}, got "
                                     f"{tuple(got.shape)}")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (
        f"{arch}: off by {(got - want).abs().max():.3g}. ||v||_1 = sum of |v_d| over the head's D dimensions of "
        "attn.wv(attn_norm(x)), per KV head (values are (B, T, Hkv * D) out of wv)")


@settings(max_examples=8)
@given(seed=st.integers(0, 1000), budget=st.integers(3, 9), chunk=st.integers(1, 4),
       name=st.sampled_from(["vatp", "h2o", "window", "sink", "a2sf"]))
def test_token0_seen_is_what_the_masked_simulation_saw(seed, budget, chunk, name):
    m = tiny_model("tiny-llama")
    tokens = course.random_tokens(seed, 1, 18)
    n_sink = 0 if name in ("vatp", "h2o", "a2sf") else None
    budget = max(budget, 5) if name == "sink" else budget  # 4 sinks + the newest
    policy = policies.make_policy(name, budget, n_sink=n_sink, recent=min(2, budget - 1) if name in ("vatp", "h2o") else None)
    got = impl.token0_seen(m, tokens, policy, budget, chunk)
    with torch.no_grad():
        _, masks = simulate.masked_simulation(m, tokens, policy, budget, chunk=chunk)
    want = torch.stack([mk[..., 0] for mk in masks])  # (layers, B, Hkv, T): row t saw key 0
    assert got.shape == want.shape and got.dtype == torch.bool, (
        f"token0_seen returns bool (n_layers, B, Hkv, T) = {tuple(want.shape)}, got {got.dtype} {tuple(got.shape)}")
    if not torch.equal(got, want):
        layer, b, g, t = (got != want).nonzero()[0].tolist()
        raise AssertionError(
            f"{name}, budget {budget}, chunk {chunk}: layer {layer} KV head {g}, row {t}: you say token 0 was "
            f"{'' if got[layer, b, g, t] else 'not '}visible, the masked simulation says the opposite. The rows of a call "
            "see what the cache held BEFORE the call (plus the call's own tokens): record kept_mask before each call.")


def test_kl_to_full_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    p, q = a.double().softmax(-1), b.double().softmax(-1)
    want = float((p * (p / q).log()).sum(-1).mean())
    got = impl.kl_to_full(b, a)
    assert abs(got - want) < 1e-6, (f"kl_to_full(logits, full_logits) = {got}, expected KL(p_full || p) averaged over "
                                    f"positions = {want} (the full run's distribution comes first)")
    assert abs(impl.kl_to_full(a, a)) < 1e-9, "KL of a distribution to itself is 0"


def test_token0_has_small_values_in_the_real_model():
    impl.value_norms(tiny_model(), course.random_tokens(0, 1, 3))  # fail fast on a stub
    m, tok = course.default_model()
    norms = impl.value_norms(m, torch.tensor([course.prompt_ids(tok, 128)]))[:, 0]  # (layers, Hkv, T)
    ratio = norms[..., 0] / norms[..., 1:].median(-1).values  # (layers, Hkv)
    small = int((ratio < 1).sum())
    print("||v_0||_1 / median ||v_j||_1 per layer (mean over KV heads):", [round(x, 2) for x in ratio.mean(-1).tolist()])
    assert small >= 0.6 * ratio.numel(), (
        f"token 0's value is below the median value norm in only {small} of {ratio.numel()} (layer, KV head) pairs; "
        "expected about 75 (VATP's premise: sinks draw attention but carry small values)")


@pytest.mark.slow
def test_measure_whether_vatp_evicts_the_sink_on_the_real_model():
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, 256)])
    lost = {}
    for name in ("vatp", "h2o"):
        p = policies.make_policy(name, 32, n_sink=0)
        seen = impl.token0_seen(m, tokens, p, 32, 8)[:, 0]  # (layers, Hkv, T)
        lost[name] = int((~seen[..., -1]).sum())
        print(f"{name} with no sinks: token 0 gone from {lost[name]} of {seen[..., -1].numel()} heads by the end")
    assert lost["vatp"] <= 9, (f"VATP without sinks lost token 0 in {lost['vatp']} of 90 heads; the reference measures 0: "
                               "check token0_seen against the tiny-model test first")
