"""The policies' properties (policies.md, "Consequences that the tests must check"), each held to a
direct implementation written here, never to another Policy object run through the same code.

The driver feeds a real cache.KVCache through its explicit call sequence (positions, update,
observe in chunks of rows, evict) with attention probabilities chosen by the test: small integers
looked up by (layer, sequence, query head, row position, key position), so every sum is exact in
float64 and ties are frequent. The oracle (`Direct`) keeps, per sequence and KV head, a dict
position -> running score written from policies.md's formula in plain Python:

    s[j] <- alpha^(rows) s[j] + nu[j] * sum_q alpha^(t - q) w[q] sum_{h in G(g)} A[h, q, j]

and evicts: the n_sink first and the `recent` latest (t - recent < j <= t) stay, the rest of the
budget goes to the highest priority, the oldest leaving first among equals. The cache (and through
it policies.row_update / apply_update / priority and cache.keep_top) must keep the same sets and
hold the same scores after every call. simulate.py shares policies.priority with the cache, so only
a direct implementation like this one catches a policy-math bug.
"""

import math
from fractions import Fraction

import pytest
import torch
from helpers import run_through, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

import model as model_mod
import policies
from cache import KVCache
from policies import Tokens

FAST = settings(max_examples=25, deadline=None)
CFG = model_mod.preset("tiny-llama")  # 2 layers, 4 query heads over 2 KV heads, head_dim 16
B = 2


# -- the direct implementation ------------------------------------------------------------------

class Direct:
    """One sequence's KV head under a score policy, in plain Python (exact: ints and Fractions).

    A(h, q, j): the attention query head h's row q gives key j (any number; the test's table)."""

    def __init__(self, budget, *, alpha=1, n_sink=0, recent=0, nu=None, mean=False, obs_window=0, pool=1):
        self.budget, self.alpha, self.n_sink, self.recent = budget, alpha, n_sink, recent
        self.nu, self.mean, self.obs_window, self.pool = nu, mean, obs_window, pool
        self.score, self.count = {}, {}  # position -> running score, rows that saw it

    def call(self, rows, A, heads):
        """rows: the call's new positions (its query rows); heads: the query heads of this KV head."""
        for j in rows:
            self.score[j], self.count[j] = 0, 0
        t = max(rows)
        for j in self.score:
            add = 0
            for q in rows:
                if j <= q and (not self.obs_window or q > t - self.obs_window):
                    add += Fraction(self.alpha) ** (t - q) * sum(A(h, q, j) for h in heads)
            nu = 1 if self.nu is None else self.nu[j]
            self.score[j] = Fraction(self.alpha) ** len(rows) * self.score[j] + nu * add
            self.count[j] += sum(j <= q for q in rows)
        self.evict(t)

    def evict(self, t):
        held = sorted(self.score)
        if len(held) <= self.budget:
            return
        prio = {j: Fraction(self.score[j]) / (max(self.count[j], 1) if self.mean else 1) for j in held}
        if self.pool > 1:  # SnapKV: average over the `pool` neighbours in text order, zeros past the ends
            r = self.pool // 2
            prio = {j: sum(prio[held[i]] for i in range(n - r, n + r + 1) if 0 <= i < len(held)) / self.pool
                    for n, j in enumerate(held)}
        protected = [j for j in held if j < self.n_sink or j > t - self.recent]
        others = sorted((j for j in held if j not in protected), key=lambda j: (prio[j], j), reverse=True)
        keep = set(protected) | set(others[: self.budget - len(protected)])
        self.score = {j: s for j, s in self.score.items() if j in keep}
        self.count = {j: c for j, c in self.count.items() if j in keep}


def direct_for(policy, budget, nu=None):
    """The Direct oracle with a built-in policy's published parameters (read from the fields of
    its Policy only, never from its functions)."""
    return Direct(budget, alpha=Fraction(policy.alpha), n_sink=policy.n_sink, recent=policy.recent, nu=nu,
                  mean=policy.mean, obs_window=policy.obs_window, pool=policy.pool)


# -- the driver: a real cache, attention chosen by the test ---------------------------------------

def calls_of(T, mode, chunk, prompt):
    if mode == "prefill":
        return [(0, prompt)] + [(s, min(s + chunk, T)) for s in range(prompt, T, chunk)]
    return [(s, min(s + chunk, T)) for s in range(0, T, chunk)]


def drive(policy, budget, T, *, mode="streaming", chunk=1, prompt=None, seed=0, values=None, table=None,
          row_split=2, on_call=None):
    """Run T tokens through a float64 KVCache, attention from `table` (L, B, H, T, T) (default:
    integers 0..3). values (L, B, Hkv, T, D) or random. on_call(cache, layer, rows) after each
    layer's eviction. Checks every mask the cache hands out is causal. -> the cache."""
    g = torch.Generator().manual_seed(seed)
    L, Hkv, G, D = CFG.n_layers, CFG.n_kv_heads, CFG.group, CFG.head_dim
    if table is None:
        table = torch.randint(0, 4, (L, B, CFG.n_heads, T, T), generator=g).double()
    if values is None:
        values = torch.randn(L, B, Hkv, T, D, generator=g, dtype=torch.float64)
    keys = torch.randn(L, B, Hkv, T, D, generator=g, dtype=torch.float64)
    cache = KVCache(CFG, policy, budget, batch=B, mode=mode, chunk=chunk, dtype=torch.float64)
    for s, e in calls_of(T, mode, chunk, prompt or T):
        positions = cache.positions(e - s)  # (B, T)
        assert positions.tolist() == [list(range(s, e))] * B
        for layer, lc in enumerate(cache.layers):
            call = lc.update(keys[layer, ..., s:e, :], values[layer, ..., s:e, :], positions)
            A = table[layer].view(B, Hkv, G, T, T)
            for r0 in range(0, e - s, row_split):
                r1 = min(r0 + row_split, e - s)
                mask = call.mask(r0, r1)  # (B, Hkv, R, S)
                q = call.q_pos[:, r0:r1]  # (B, R)
                own = call.slots[:, :, r0:r1, None] == torch.arange(call.pos.shape[-1])
                assert torch.equal(mask, (call.valid[:, :, None] & (call.pos[:, :, None] <= q[:, None, :, None])) | own)
                assert (mask & own).sum() == own.sum()  # each row sees itself
                rows = A.gather(3, q[:, None, None, :, None].expand(B, Hkv, G, r1 - r0, T))  # (B, Hkv, G, R, T)
                probs = rows.gather(4, call.pos.clamp(min=0)[:, :, None, None, :].expand(-1, -1, G, r1 - r0, -1))
                lc.observe(call, probs * mask[:, :, None], mask, r0, r1)
            lc.evict(call)
            if on_call:
                on_call(cache, layer, list(range(s, e)))
    return cache


def oracles(policy, budget, values=None):
    """[layer][b][kv_head] -> Direct, nu from the values (L, B, Hkv, T, D) when the policy asks."""
    def nu(layer, b, g):
        return None if not policy.value_prior else {j: Fraction(x) for j, x in
                                                    enumerate(values[layer, b, g].abs().sum(-1).tolist())}
    return [[[direct_for(policy, budget, nu(layer, b, g)) for g in range(CFG.n_kv_heads)] for b in range(B)]
            for layer in range(CFG.n_layers)]


def check_against(direct, table, scores=True):
    """An on_call for drive: each call, step the oracles and compare kept sets (and scores)."""
    def on_call(cache, layer, rows):
        lc = cache.layers[layer]
        kept = cache.kept_positions(layer)
        for b in range(B):
            for g in range(CFG.n_kv_heads):
                d = direct[layer][b][g]
                heads = range(g * CFG.group, (g + 1) * CFG.group)
                d.call(rows, lambda h, q, j, b=b: int(table[layer, b, h, q, j]), heads)
                assert kept[b][g] == sorted(d.score), (rows[-1], layer, b, g)
                if scores:
                    got = {p: s for p, s, v in zip(lc.pos[b, g].tolist(), lc.state["score"][b, g].tolist(),
                                                   lc.valid[b, g].tolist()) if v}
                    assert got == {j: float(s) for j, s in d.score.items()}, (rows[-1], layer, b, g)
    return on_call


def run_checked(policy, budget, T, seed, values=None, scores=True, **kw):
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 4, (CFG.n_layers, B, CFG.n_heads, T, T), generator=g).double()
    if values is None:
        values = torch.randint(-2, 3, (CFG.n_layers, B, CFG.n_kv_heads, T, CFG.head_dim), generator=g).double()
    direct = oracles(policy, budget, values)
    return drive(policy, budget, T, seed=seed, table=table, values=values,
                 on_call=check_against(direct, table, scores), **kw)


modes = st.sampled_from([("streaming", None), ("prefill", 0)])


# -- H2O, and A2SF with alpha = 1, against plain accumulation ------------------------------------

@FAST
@given(seed=st.integers(0, 10_000), budget=st.integers(3, 10), recent=st.integers(0, 3), chunk=st.integers(1, 3),
       mode=modes, name=st.sampled_from(["h2o", "a2sf"]))
def test_h2o_and_a2sf_alpha_one_keep_the_closed_form_h2o(seed, budget, recent, chunk, mode, name):
    """Plain accumulation of the attention each token got, summed over its group's query heads;
    kept = recent window + top scores, the oldest evicted among equal scores."""
    recent = min(recent, budget)
    policy = policies.make_policy(name, budget, alpha=1.0 if name == "a2sf" else None, recent=recent)
    assert policy.alpha == 1.0 and policy.recent == recent and policy.n_sink == 0
    mode, prompt = mode
    T = 18
    run_checked(policy, budget, T, seed, mode=mode, chunk=chunk, prompt=prompt if prompt is None else budget + 4)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.integers(4, 10), n_sink=st.integers(0, 2), chunk=st.integers(1, 3),
       mode=modes, name=st.sampled_from(["tova", "vatp", "h2o_mean", "snapkv"]))
def test_the_other_score_policies_match_their_direct_form(seed, budget, n_sink, chunk, mode, name):
    """TOVA (alpha 0: the newest row only), VATP (times ||v||_1), H2O-mean (divided by the rows
    that saw the token), SnapKV (last-window rows vote, pooled): each with its published split."""
    policy = policies.make_policy(name, budget, n_sink=n_sink if name != "snapkv" else None)
    mode, prompt = mode
    T = 18
    run_checked(policy, budget, T, seed, mode=mode, chunk=chunk, prompt=prompt if prompt is None else budget + 5,
                scores=not policy.mean)


def test_the_direct_form_can_tell_the_policies_apart():
    """The oracle is not vacuous: run against H2O's direct form (recent 0), the caches of A2SF
    (alpha 0.2) and of TOVA keep other sets, so a policy whose math fell back to another's would
    be caught."""
    h2o = policies.make_policy("h2o", 6, recent=0)
    for other in (policies.make_policy("a2sf", 6), policies.make_policy("tova", 6)):
        with pytest.raises(AssertionError):
            _mismatch(h2o, other)
    _mismatch(h2o, policies.make_policy("a2sf", 6, alpha=1.0))  # and the same form passes


def _mismatch(oracle_policy, run_policy):
    """Run run_policy's cache while checking it against oracle_policy's direct form."""
    T, seed, budget = 18, 1, 6
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 4, (CFG.n_layers, B, CFG.n_heads, T, T), generator=g).double()
    drive(run_policy, budget, T, seed=seed, table=table, on_call=check_against(oracles(oracle_policy, budget), table, False))


def test_ties_evict_the_oldest():
    """Each row attends only to itself: every token's score is its own row's (2, over the group's
    two heads), all equal, so the oldest must leave first and the newest `budget` stay."""
    T, budget = 12, 4
    table = torch.zeros(CFG.n_layers, B, CFG.n_heads, T, T, dtype=torch.float64)
    idx = torch.arange(T)
    table[..., idx, idx] = 1.0
    cache = drive(policies.make_policy("h2o", budget, recent=0), budget, T, table=table)
    for layer in range(CFG.n_layers):
        assert cache.kept_positions(layer) == [[list(range(T - budget, T))] * CFG.n_kv_heads] * B


# -- A2SF: the recursion is the closed form, whatever the chunking --------------------------------

@FAST
@given(seed=st.integers(0, 10_000), alpha=st.floats(0.0, 1.0), cuts=st.lists(st.integers(1, 11), unique=True, max_size=5))
def test_a2sf_recursion_equals_closed_form_whatever_the_chunking(seed, alpha, cuts):
    """S_t = alpha^n S + sum_q alpha^(t-q) A_q, applied call by call (policies.accumulate), equals
    sum_q alpha^(t-q) A_q (A2SF Eq. 5)."""
    g = torch.Generator().manual_seed(seed)
    T = S = 12
    A = torch.rand(1, 1, 1, T, S, generator=g, dtype=torch.float64)  # one head, rows q over keys j
    p = policies.make_policy("a2sf", 4, alpha=alpha)
    state = policies.token_state(p, torch.zeros(1, 1, S, 2), torch.zeros(1, 1, S, 2), torch.float64)
    bounds = [0, *sorted(cuts), T]
    for s, e in zip(bounds, bounds[1:]):
        mask = torch.ones(1, 1, e - s, S, dtype=torch.bool)
        state = policies.accumulate(p, state, A[..., s:e, :], mask, torch.arange(s, e)[None])
    closed = [sum(alpha ** (T - 1 - q) * float(A[0, 0, 0, q, j]) for q in range(T)) for j in range(S)]
    torch.testing.assert_close(state["score"][0, 0], torch.tensor(closed, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0.0, 1.0), chunk=st.integers(1, 5), row_split=st.integers(1, 4),
       mode=modes)
def test_a2sf_in_the_cache_is_the_closed_form_whatever_the_chunking(seed, alpha, chunk, row_split, mode):
    """Through the cache (calls of `chunk` rows, each observed in pieces of `row_split` rows), with
    nothing evicted: token j's score is sum_{q >= j} alpha^(t-q) sum_{h in G(g)} A[h, q, j]."""
    T = 14
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(CFG.n_layers, B, CFG.n_heads, T, T, generator=g, dtype=torch.float64)
    p = policies.make_policy("a2sf", T, alpha=alpha)
    cache = drive(p, T, T, mode=mode[0], chunk=chunk, prompt=None if mode[1] is None else 6, table=table,
                  row_split=row_split)
    t = T - 1
    weights = torch.tensor([alpha ** (t - q) for q in range(T)], dtype=torch.float64)  # (T,)
    grouped = table.view(CFG.n_layers, B, CFG.n_kv_heads, CFG.group, T, T).sum(3)  # (L, B, Hkv, q, j)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    closed = torch.einsum("lbgqj,q->lbgj", grouped * causal, weights)  # (L, B, Hkv, T)
    for layer, lc in enumerate(cache.layers):
        order = lc.pos.argsort(-1)
        got = lc.state["score"].gather(-1, order)[..., -T:]
        assert (lc.pos.gather(-1, order)[..., -T:] == torch.arange(T)).all()
        torch.testing.assert_close(got, closed[layer], rtol=1e-10, atol=1e-12)


# -- VATP with equal value norms is H2O ------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.integers(6, 10), n_sink=st.integers(0, 2), chunk=st.integers(1, 3))
def test_vatp_with_equal_value_norms_keeps_the_h2o_kept_sets(seed, budget, n_sink, chunk):
    """Every ||v||_1 = 8: VATP keeps the sets plain accumulation (H2O, with VATP's split) keeps."""
    vatp = policies.make_policy("vatp", budget, n_sink=n_sink)
    T = 18
    g = torch.Generator().manual_seed(seed)
    values = torch.sign(torch.randn(CFG.n_layers, B, CFG.n_kv_heads, T, CFG.head_dim, generator=g, dtype=torch.float64)) * 0.5
    table = torch.randint(0, 4, (CFG.n_layers, B, CFG.n_heads, T, T), generator=g).double()
    h2o = [[[Direct(budget, n_sink=vatp.n_sink, recent=vatp.recent) for _ in range(CFG.n_kv_heads)] for _ in range(B)]
           for _ in range(CFG.n_layers)]
    drive(vatp, budget, T, chunk=chunk, table=table, values=values, on_call=check_against(h2o, table, scores=False))


# -- through a model: real eviction against a direct masked H2O ------------------------------------

def direct_masked_h2o(m, tokens, budget, recent, n_sink, chunk):
    """H2O as its paper describes it, on the model's own projections, row by row in float64:
    each row attends to the tokens its head holds (and itself), every held token adds the attention
    its group's query heads gave it, and after each chunk of rows the lowest score outside the
    protected slots leaves (the oldest among equals). -> logits, [layer] kept sets [b][g]."""
    cfg = m.cfg
    Bt, T = tokens.shape
    pos = torch.arange(T).expand(Bt, T)
    x = m.embed(tokens, pos)
    angles = m.angles(pos)
    kept_sets = []
    for block in m.layers:
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x))
        q, k = attn.rope(q, angles), attn.rope(k, angles)
        out = torch.zeros_like(q)
        direct = [[Direct(budget, n_sink=n_sink, recent=recent) for _ in range(cfg.n_kv_heads)] for _ in range(Bt)]
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            for b in range(Bt):
                for g in range(cfg.n_kv_heads):
                    held = sorted(set(direct[b][g].score) | set(range(s, e)))
                    A = {}
                    for r in range(s, e):
                        seen = [j for j in held if j <= r]
                        p = (q[b, g, :, r] @ k[b, g, seen].T / math.sqrt(cfg.head_dim)).softmax(-1)  # (G, len(seen))
                        out[b, g, :, r] = p @ v[b, g, seen]
                        A.update({(h, r, j): float(p[h, n]) for h in range(cfg.group) for n, j in enumerate(seen)})
                    direct[b][g].call(list(range(s, e)), lambda h, r, j, A=A: A.get((h, r, j), 0.0), range(cfg.group))
        kept_sets.append([[sorted(d.score) for d in row] for row in direct])
        x = x + attn.output(out)
        x = x + block.mlp(block.mlp_norm(x))
    return m.head(x), kept_sets


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 1000), budget=st.integers(5, 9), recent=st.integers(0, 3), chunk=st.integers(1, 3),
       name=st.sampled_from(["h2o", "a2sf"]))
def test_h2o_and_a2sf_alpha_one_through_the_model_equal_direct_masked_h2o(seed, budget, recent, chunk, name):
    m = tiny_model("tiny-llama", seed=seed, dtype=torch.float64)
    tokens = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(seed))
    policy = policies.make_policy(name, budget, alpha=1.0 if name == "a2sf" else None, recent=recent)
    cache = KVCache(m.cfg, policy, budget, chunk=chunk, dtype=torch.float64)
    got = run_through(m, tokens, cache)
    with torch.no_grad():
        want, kept = direct_masked_h2o(m, tokens, budget, recent, 0, chunk)
    assert [cache.kept_positions(layer) for layer in range(m.cfg.n_layers)] == kept
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_vatp_through_a_model_with_equal_value_norms_equals_direct_masked_h2o():
    """W_v = 0 and a bias of +-0.5: every value is the bias, ||v||_1 = 8."""
    budget = 8
    m = tiny_model("tiny-llama", seed=3, bias=True, dtype=torch.float64)
    for layer in m.layers:
        layer.attn.wv.weight.data.zero_()
        layer.attn.wv.bias.data = torch.sign(layer.attn.wv.bias.data) * 0.5
    tokens = torch.randint(0, 128, (1, 22), generator=torch.Generator().manual_seed(3))
    vatp = policies.make_policy("vatp", budget)
    cache = KVCache(m.cfg, vatp, budget, dtype=torch.float64)
    got = run_through(m, tokens, cache)
    with torch.no_grad():
        want, kept = direct_masked_h2o(m, tokens, budget, vatp.recent, vatp.n_sink, 1)
    assert [cache.kept_positions(layer) for layer in range(m.cfg.n_layers)] == kept
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# -- SnapKV: the observation window and the pooling, directly --------------------------------------

def skewed(shape, g):
    """Integer attention 0..10, mostly 0: a few strong votes, so windows and pooling matter."""
    return (torch.rand(shape, generator=g, dtype=torch.float64) ** 8 * 10).round()


def direct_snapkv(table_g, T, budget, window=32, kernel=5, recent=None):
    """SnapKV's prompt compression written out: table_g (G, T, T) the attention of one KV head's
    query heads. The last `window` rows vote (summed over the group's heads), the votes are
    averaged over `kernel` neighbours (zeros past the ends), the `recent` latest are protected, the
    rest of the budget goes to the highest, the oldest leaving first among equals."""
    recent = min(32, budget // 2) if recent is None else recent
    votes = [sum(float(table_g[h, q, j]) for h in range(table_g.shape[0]) for q in range(max(0, T - window), T) if j <= q)
             for j in range(T)]
    r = kernel // 2
    pooled = [sum(votes[i] for i in range(j - r, j + r + 1) if 0 <= i < T) for j in range(T)]  # x kernel: same order
    protected = [j for j in range(T) if j > T - 1 - recent]
    others = sorted((j for j in range(T) if j not in protected), key=lambda j: (pooled[j], j), reverse=True)
    return sorted(protected + others[: budget - len(protected)])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(36, 56), budget=st.integers(4, 20))
def test_snapkv_prompt_window_and_pooling_against_a_direct_implementation(seed, T, budget):
    """Prefill mode, a prompt longer than the 32-row window: the kept set after the prompt."""
    g = torch.Generator().manual_seed(seed)
    table = skewed((CFG.n_layers, B, CFG.n_heads, T, T), g)
    policy = policies.make_policy("snapkv", budget)
    assert (policy.obs_window, policy.pool, policy.recent) == (32, 5, min(32, budget // 2))
    cache = drive(policy, budget, T, mode="prefill", prompt=T, table=table)
    for layer in range(CFG.n_layers):
        kept = cache.kept_positions(layer)
        for b in range(B):
            for kv in range(CFG.n_kv_heads):
                heads = table[layer, b, kv * CFG.group:(kv + 1) * CFG.group]
                assert kept[b][kv] == direct_snapkv(heads, T, budget), (layer, b, kv)


def test_snapkv_direct_implementation_is_sensitive_to_window_and_pooling():
    """The direct form tells the window and the pooling apart on the attention the test uses, so
    the cache's agreement with it says something about both."""
    T, budget = 48, 10
    heads = skewed((CFG.group, T, T), torch.Generator().manual_seed(1))
    snap = direct_snapkv(heads, T, budget)
    assert snap != direct_snapkv(heads, T, budget, window=T)  # every row voting: another set
    assert snap != direct_snapkv(heads, T, budget, kernel=1)  # no pooling: another set


# -- protected slots only: sink / window -----------------------------------------------------------

@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 1000), budget=st.integers(4, 10), n_sink=st.integers(0, 3), chunk=st.integers(1, 3),
       name=st.sampled_from(["h2o", "a2sf", "vatp", "tova", "h2o_mean", "snapkv"]))
def test_a_budget_of_protected_slots_only_is_sink_or_window(seed, budget, n_sink, chunk, name):
    """n_sink + recent = budget: whatever the scores, the n_sink first and the latest stay."""
    policy = policies.make_policy(name, budget, n_sink=n_sink, recent=budget - n_sink)
    T = 20

    def on_call(cache, layer, rows):
        t = rows[-1]
        want = sorted({j for j in range(t + 1) if j < n_sink or j > t - (budget - n_sink)})
        assert cache.kept_positions(layer) == [[want] * CFG.n_kv_heads] * B

    drive(policy, budget, T, chunk=chunk, seed=seed, on_call=on_call)


def test_sink_and_window_through_the_model_keep_their_closed_form():
    m = tiny_model("tiny-llama")
    tokens = torch.randint(0, 128, (1, 26), generator=torch.Generator().manual_seed(0))
    for name, want in [("sink", [0, 1, 2, 3] + list(range(22, 26))), ("window", list(range(18, 26)))]:
        cache = KVCache(m.cfg, policies.make_policy(name, 8), 8, chunk=3)
        run_through(m, tokens, cache)
        assert all(cache.kept_positions(layer) == [[want] * 2] for layer in range(2)), name


@pytest.mark.parametrize("name", policies.POLICY_NAMES)
def test_with_budget_at_least_the_length_every_policy_is_full(name):
    m = tiny_model("tiny-opt")
    tokens = torch.randint(0, 128, (2, 20))
    budget = 20
    p = policies.make_policy(name, budget, n_sink=0 if name in ("vatp",) else None)
    c = KVCache(m.cfg, p, budget, batch=2, chunk=3)
    got = run_through(m, tokens, c)
    with torch.no_grad():
        full = m(tokens)  # no cache at all: plain causal attention
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    assert (c.tokens_held() == 20).all()


# -- the small functions ------------------------------------------------------------------------------

def random_probs(g, B=2, H=2, G=2, T=5, S=9):
    return torch.rand(B, H, G, T, S, generator=g).softmax(-1)


def test_gqa_sum_and_max_over_the_group():
    probs = random_probs(torch.Generator().manual_seed(0))
    s, mx = policies.aggregate_heads(probs, "sum"), policies.aggregate_heads(probs, "max")
    torch.testing.assert_close(s, probs[:, :, 0] + probs[:, :, 1])
    torch.testing.assert_close(mx, torch.maximum(probs[:, :, 0], probs[:, :, 1]))


def test_scores_accumulate_in_fp32_whatever_the_model_dtype():
    probs = random_probs(torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mask = torch.ones(2, 2, 5, 9, dtype=torch.bool)
    k = v = torch.randn(2, 2, 9, 4).bfloat16()
    for name in ("a2sf", "vatp", "h2o_mean"):
        p = policies.make_policy(name, 8, n_sink=0)
        state = policies.token_state(p, k, v)
        new = policies.accumulate(p, state, probs, mask, torch.arange(5).expand(2, 5))
        assert set(new) == set(state) and all(t.dtype == torch.float32 for t in new.values()), name


def test_tova_counts_only_the_newest_row():
    probs = random_probs(torch.Generator().manual_seed(3))
    mask = torch.ones(2, 2, 5, 9, dtype=torch.bool)
    p = policies.make_policy("tova", 4)
    state = {"score": torch.full((2, 2, 9), 5.0)}
    new = policies.accumulate(p, state, probs, mask, torch.arange(5).expand(2, 5))
    torch.testing.assert_close(new["score"], probs[:, :, 0, -1] + probs[:, :, 1, -1])


def test_h2o_mean_divides_by_the_rows_that_saw_the_token():
    p = policies.make_policy("h2o_mean", 4, recent=0)
    state = {"score": torch.tensor([[[6.0, 2.0, 1.0]]]), "count": torch.tensor([[[3.0, 1.0, 4.0]]])}
    tokens = Tokens(None, None, torch.tensor([[[0, 1, 2]]]), torch.ones(1, 1, 3, dtype=torch.bool), state)
    assert policies.priority(p, tokens, torch.tensor([2]), 0).tolist() == [[[2.0, 2.0, 0.25]]]


def test_priority_protects_sinks_and_the_recent_window_newest_included():
    p = policies.make_policy("h2o", 8, n_sink=2, recent=3)
    pos = torch.arange(10)[None, None]
    state = {"score": torch.arange(10.0)[None, None]}
    valid = pos != 4
    pr = policies.priority(p, Tokens(None, None, pos, valid, state), torch.tensor([9]), 0)[0, 0].tolist()
    inf = float("inf")
    assert pr == [inf, inf, 2.0, 3.0, -inf, 5.0, 6.0, inf, inf, inf]


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
