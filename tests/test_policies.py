"""The policies' properties (policies.md, "Consequences that the tests must check")."""

import pytest
import torch
from helpers import run_through, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import policies
from cache import KVCache

FAST = settings(max_examples=25, deadline=None)


def random_probs(g, B=2, H=2, G=2, T=5, S=9):
    return torch.rand(B, H, G, T, S, generator=g).softmax(-1)


def kept_sets(m, tokens, policy, budget, chunk=1):
    c = KVCache(m.cfg, policy, budget, batch=tokens.shape[0], chunk=chunk)
    logits = run_through(m, tokens, c)
    return logits, [c.kept_positions(layer) for layer in range(m.cfg.n_layers)], c


@FAST
@given(seed=st.integers(0, 10_000), recent=st.integers(0, 3))
def test_a2sf_with_alpha_one_is_h2o_scores(seed, recent):
    g = torch.Generator().manual_seed(seed)
    probs, q_pos = random_probs(g), torch.arange(4, 9).expand(2, 5)
    mask = torch.ones(2, 2, 5, 9, dtype=torch.bool)
    start = torch.rand(2, 2, 9, generator=g)
    a2sf = policies.make_policy("a2sf", 8, alpha=1.0, recent=recent)
    h2o = policies.make_policy("h2o", 8, recent=recent)
    v = torch.randn(2, 2, 9, 4, generator=g)
    got = policies.accumulate(a2sf, start, start * 0, probs, mask, q_pos, v)
    want = policies.accumulate(h2o, start, start * 0, probs, mask, q_pos, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), budget=st.integers(5, 12), recent=st.integers(0, 4), chunk=st.integers(1, 3))
def test_a2sf_with_alpha_one_keeps_what_h2o_keeps(seed, budget, recent, chunk):
    m = tiny_model("tiny-llama")
    tokens = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(seed))
    la, ka, _ = kept_sets(m, tokens, policies.make_policy("a2sf", budget, alpha=1.0, recent=recent), budget, chunk)
    lh, kh, _ = kept_sets(m, tokens, policies.make_policy("h2o", budget, recent=recent), budget, chunk)
    assert ka == kh
    torch.testing.assert_close(la, lh, rtol=0, atol=0)


@FAST
@given(seed=st.integers(0, 10_000), alpha=st.floats(0.0, 1.0), cuts=st.lists(st.integers(1, 11), unique=True, max_size=5))
def test_a2sf_recursion_equals_closed_form_whatever_the_chunking(seed, alpha, cuts):
    """S_t = alpha S_{t-1} + A_t, applied call by call, equals sum_q alpha^(t-q) A_q (A2SF Eq. 5)."""
    g = torch.Generator().manual_seed(seed)
    T = S = 12
    A = torch.rand(1, 1, 1, T, S, generator=g, dtype=torch.float64)  # one head, rows q over keys j
    p = policies.make_policy("a2sf", 4, alpha=alpha)
    scores = torch.zeros(1, 1, S, dtype=torch.float64)
    counts = torch.zeros_like(scores)
    bounds = [0, *sorted(cuts), T]
    v = torch.ones(1, 1, S, 2)
    for s, e in zip(bounds, bounds[1:]):
        mask = torch.ones(1, 1, e - s, S, dtype=torch.bool)
        scores, counts = policies.accumulate(p, scores, counts, A[..., s:e, :], mask, torch.arange(s, e)[None], v)
    closed = sum(alpha ** (T - 1 - q) * A[0, 0, 0, q] for q in range(T))
    torch.testing.assert_close(scores[0, 0], closed, rtol=1e-12, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), budget=st.integers(6, 12), n_sink=st.integers(0, 2))
def test_vatp_with_equal_value_norms_keeps_what_h2o_keeps(seed, budget, n_sink):
    g = torch.Generator().manual_seed(seed)
    probs, q_pos = random_probs(g, T=1), torch.full((2, 1), 8)
    mask = torch.ones(2, 2, 1, 9, dtype=torch.bool)
    v = torch.sign(torch.randn(2, 2, 9, 4, generator=g)) * 0.5  # every ||v||_1 = 2 (a power of 2: exact)
    key_pos = torch.arange(9).expand(2, 2, 9)
    valid = torch.ones(2, 2, 9, dtype=torch.bool)
    start = torch.rand(2, 2, 9, generator=g)
    kw = dict(n_sink=n_sink, recent=1)
    vatp, h2o = policies.make_policy("vatp", budget, **kw), policies.make_policy("h2o", budget, **kw)
    sv, cv = policies.accumulate(vatp, start * 2.0, start * 0, probs, mask, q_pos, v)
    sh, ch = policies.accumulate(h2o, start, start * 0, probs, mask, q_pos, v)
    pv = policies.priority(vatp, sv, cv, key_pos, valid, q_pos[:, 0], 0)
    ph = policies.priority(h2o, sh, ch, key_pos, valid, q_pos[:, 0], 0)
    assert torch.equal(pv.argsort(dim=-1, stable=True), ph.argsort(dim=-1, stable=True))
    # and through a model whose values all share one l1 norm: W_v = 0 and a bias of +-0.5, so
    # every value is the bias, ||v||_1 = 0.5 * head_dim = 8 (a power of 2: scaling is exact)
    m = tiny_model("tiny-llama", seed=seed, bias=True)
    for layer in m.layers:
        layer.attn.wv.weight.data.zero_()
        layer.attn.wv.bias.data = torch.sign(layer.attn.wv.bias.data) * 0.5
    tokens = torch.randint(0, 128, (1, 24), generator=g)
    _, kv, _ = kept_sets(m, tokens, vatp, budget)
    _, kh, _ = kept_sets(m, tokens, h2o, budget)
    assert kv == kh


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), budget=st.integers(4, 12), n_sink=st.integers(0, 3),
       name=st.sampled_from(["h2o", "a2sf", "vatp", "tova", "h2o_mean", "snapkv"]))
def test_a_budget_of_protected_slots_only_is_sink_or_window(seed, budget, n_sink, name):
    m = tiny_model("tiny-llama")
    tokens = torch.randint(0, 128, (1, 26), generator=torch.Generator().manual_seed(seed))
    scored = policies.make_policy(name, budget, n_sink=n_sink, recent=budget - n_sink)
    ref_name = "sink" if n_sink else "window"
    ref = policies.make_policy(ref_name, budget, n_sink=n_sink)
    assert ref.n_sink + ref.recent == budget
    ls, ks, _ = kept_sets(m, tokens, scored, budget)
    lr, kr, _ = kept_sets(m, tokens, ref, budget)
    assert ks == kr
    torch.testing.assert_close(ls, lr, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", policies.POLICY_NAMES)
def test_with_budget_at_least_the_length_every_policy_is_full(name):
    m = tiny_model("tiny-opt")
    tokens = torch.randint(0, 128, (2, 20))
    budget = 20
    p = policies.make_policy(name, budget, n_sink=0 if name in ("vatp",) else None)
    got, _, c = kept_sets(m, tokens, p, budget, chunk=3)
    full, _, _ = kept_sets(m, tokens, policies.make_policy("full", None), None, chunk=3)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    assert (c.tokens_held() == 20).all()


def test_gqa_max_differs_from_sum_and_both_are_allowed():
    g = torch.Generator().manual_seed(0)
    probs = random_probs(g)
    s = policies.aggregate_heads(probs, "sum")
    mx = policies.aggregate_heads(probs, "max")
    assert s.shape == mx.shape == (2, 2, 5, 9) and (s >= mx).all() and not torch.equal(s, mx)


def test_scores_accumulate_in_fp32_whatever_the_model_dtype():
    probs = random_probs(torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mask = torch.ones(2, 2, 5, 9, dtype=torch.bool)
    z = torch.zeros(2, 2, 9)
    s, c = policies.accumulate(policies.make_policy("a2sf", 4), z, z, probs, mask, torch.arange(5).expand(2, 5),
                               torch.randn(2, 2, 9, 4).bfloat16())
    assert s.dtype == torch.float32 and c.dtype == torch.float32


def test_tova_counts_only_the_newest_row():
    probs = random_probs(torch.Generator().manual_seed(3))
    mask = torch.ones(2, 2, 5, 9, dtype=torch.bool)
    z = torch.zeros(2, 2, 9)
    s, _ = policies.accumulate(policies.make_policy("tova", 4), z + 5, z, probs, mask, torch.arange(5).expand(2, 5), None)
    torch.testing.assert_close(s, probs[:, :, :, -1].sum(2))


def test_h2o_mean_divides_by_the_rows_that_saw_the_token():
    p = policies.make_policy("h2o_mean", 4, recent=0)
    scores, counts = torch.tensor([[[6.0, 2.0]]]), torch.tensor([[[3.0, 1.0]]])
    pr = policies.priority(p, scores, counts, torch.tensor([[[0, 1]]]), torch.ones(1, 1, 2, dtype=torch.bool),
                           torch.tensor([1]), 0)
    assert pr.tolist() == [[[2.0, 2.0]]]


@pytest.mark.parametrize("kwargs,words", [
    (dict(name="lru", budget=8), "choose one of full, window, sink, h2o"),
    (dict(name="h2o", budget=8, n_sink=4, recent=6), "below the protected slots"),
    (dict(name="a2sf", budget=8, alpha=1.5), "outside"),
    (dict(name="a2sf", budget=8, alpha=-0.1), "outside"),
    (dict(name="h2o", budget=None), "needs a budget"),
    (dict(name="h2o", budget=8, gqa="mean"), "gqa"),
])
def test_policy_errors_are_one_line(kwargs, words):
    with pytest.raises(ValueError, match=words) as e:
        policies.make_policy(kwargs.pop("name"), kwargs.pop("budget"), **kwargs)
    assert "\n" not in str(e.value)
