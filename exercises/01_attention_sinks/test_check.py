"""Checker for exercise 01 (attention sinks): `pytest exercises/01_attention_sinks`."""

import math

import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from exercises import course

impl = course.implementation(__file__)


@torch.no_grad()
def independent_attention_received(m, tokens):
    """The same quantity computed another way: the model runs its own (fused) forward, hooks catch
    each attention's input, and the probabilities are rebuilt here from the weights with a rotary
    embedding of our own and one repeated key head per query head."""
    cfg = m.cfg
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for b in m.layers]
    try:
        m(tokens)
    finally:
        for h in hooks:
            h.remove()
    B, T = tokens.shape
    D, H = cfg.head_dim, cfg.n_heads
    pos = torch.arange(T, dtype=torch.float64)
    out = []
    for block, x in zip(m.layers, inputs):
        a = block.attn
        x = x.double()
        q = torch.nn.functional.linear(x, a.wq.weight.double(), None if a.wq.bias is None else a.wq.bias.double())
        k = torch.nn.functional.linear(x, a.wk.weight.double(), None if a.wk.bias is None else a.wk.bias.double())
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, cfg.n_kv_heads, D).transpose(1, 2).repeat_interleave(cfg.group, dim=1)  # (B, H, T, D)
        if cfg.rotary:  # rotate-half: dimension i pairs with i + D/2, angle pos * theta^(-2i/D)
            angle = pos[:, None] * cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (T, D/2)
            cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
            q, k = [t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * sin for t in (q, k)]
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        A = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out.append(A.sum(dim=(0, 1, 2)) / (B * H * (T - torch.arange(T))))
    return torch.stack(out).float()


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 20), B=st.integers(1, 2), arch=st.sampled_from(["tiny-llama", "tiny-opt"]))
def test_matches_an_independent_computation(seed, T, B, arch):
    m = tiny_model(arch, seed=seed % 7)
    tokens = course.random_tokens(seed, B, T)
    got = impl.attention_received(m, tokens)
    assert isinstance(got, torch.Tensor) and got.shape == (m.cfg.n_layers, T), (
        f"attention_received must return a tensor (n_layers, T) = {(m.cfg.n_layers, T)}, got "
        f"{getattr(got, 'shape', type(got))}: one row per layer, one column per text position")
    want = independent_attention_received(m, tokens)
    rows_sum = (got.double() * (T - torch.arange(T))).sum(-1)  # every row's probabilities sum to 1
    assert torch.allclose(rows_sum, torch.full_like(rows_sum, float(T)), atol=1e-3), (
        "each row q of each head spreads exactly 1 over the positions it sees, so "
        "sum_j received[l, j] * (T - j) must be T (the number of rows). Got "
        f"{rows_sum.tolist()} for T={T}: did you average over all T rows instead of the T - j rows that "
        "see position j, or forget to average over the heads?")
    assert torch.allclose(got, want, atol=1e-5), (
        f"{arch}: your attention received differs from an independent computation by "
        f"{(got - want).abs().max():.2e} (position {int((got - want).abs().max(0).values.argmax())}). Check that "
        "queries and keys are rotated (attn.rope) before attention, that the mask is causal, and that each block "
        "adds its attention output and its MLP to the residual stream like Block.forward.")


def test_position_zero_is_the_sink_in_most_layers_of_the_real_model():
    impl.attention_received(tiny_model("tiny-llama"), course.random_tokens(0, 1, 4))  # fail fast on a stub
    m, tok = course.default_model()
    tokens = torch.tensor([course.prompt_ids(tok, 128)])
    got = impl.attention_received(m, tokens)
    want = independent_attention_received(m, tokens)
    assert torch.allclose(got, want, atol=1e-4), f"real model: off by {(got - want).abs().max():.2e} from the independent one"
    top = got.argmax(dim=-1)  # (n_layers,)
    sink_layers = int((top == 0).sum())
    print("layer: argmax position, attention to position 0, median attention")
    for layer in range(m.cfg.n_layers):
        print(f"{layer:5d}: {int(top[layer]):4d}  {got[layer, 0]:.3f}  {got[layer].median():.4f}")
    assert sink_layers >= m.cfg.n_layers // 2, (
        f"position 0 received the most attention in only {sink_layers} of {m.cfg.n_layers} layers; with the "
        "default prompt it should be about 18: look at your reduction over heads and rows")
