"""Checker for exercise 03 (A2SF's forgetting factor): `pytest exercises/03_forgetting_factor`.

Checks your a2sf_update against the project, then checks YOUR TESTS (student_tests.py): they
must pass on a correct implementation and fail on each of several broken ones (mutation testing)."""

import ast
import inspect
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import policies
from exercises import course

impl = course.implementation(__file__)
HERE = Path(__file__).resolve().parent
TESTS = HERE / "student_tests.py" if course.which() == "student" else course.HERE / "solutions" / f"{HERE.name}_tests.py"


@st.composite
def calls(draw):
    B, H, G = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T = draw(st.integers(1, 6))
    S = T + draw(st.integers(0, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    pads = torch.tensor([draw(st.integers(0, T - 1)) for _ in range(B)])
    q_pos = torch.arange(T) + draw(st.integers(0, 30)) - pads[:, None]
    q_pos = torch.where(torch.arange(T) < pads[:, None], -1, q_pos)
    return torch.rand(B, H, S, generator=g) * 3, torch.randn(B, H, G, T, S, generator=g).softmax(-1), q_pos


def project(scores, probs, q_pos, alpha):
    mask = torch.ones(probs.shape[:2] + probs.shape[3:], dtype=torch.bool)
    p = policies.make_policy("a2sf", 8, alpha=alpha)
    return policies.accumulate(p, {"score": scores}, probs, mask, q_pos)["score"]


@given(calls(), st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
def test_update_matches_the_projects_a2sf(call, alpha):
    scores, probs, q_pos = call
    before = scores.clone()
    got = impl.a2sf_update(scores, probs, q_pos, alpha)
    assert torch.equal(scores, before), "a2sf_update changed `scores` in place: return a new tensor"
    want = project(scores, probs, q_pos, alpha)
    assert got.shape == want.shape, f"a2sf_update returns (B, Hkv, S) = {tuple(want.shape)}, got {tuple(got.shape)}"
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (
        f"alpha={alpha}: a2sf_update is off by {(got - want).abs().max():.3g} from policies.accumulate (a2sf). "
        "Row q weighs alpha^(t - q) with t the call's newest row (so the newest weighs 1, also when alpha = 0: "
        "0^0 = 1), padding rows weigh 0, and the old scores are multiplied by alpha^(number of real rows).")


@settings(max_examples=15)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0.0, 1.0), cuts=st.lists(st.integers(1, 9), unique=True, max_size=4))
def test_call_by_call_equals_the_closed_form(seed, alpha, cuts):
    """A2SF Eq. 5: the recursion applied to calls of any size gives sum_q alpha^(t - q) A_q."""
    g = torch.Generator().manual_seed(seed)
    T = 10
    A = torch.rand(1, 1, 1, T, T, generator=g, dtype=torch.float64)
    s = torch.zeros(1, 1, T)
    bounds = [0, *sorted(cuts), T]
    for a, b in zip(bounds, bounds[1:]):
        s = impl.a2sf_update(s, A[..., a:b, :], torch.arange(a, b)[None], alpha)
    closed = sum(alpha ** (T - 1 - q) * A[0, 0, 0, q] for q in range(T)).float()
    assert torch.allclose(s[0, 0], closed, rtol=1e-4, atol=1e-5), (
        f"calls {list(zip(bounds, bounds[1:]))}, alpha {alpha}: call by call you get {s[0, 0].tolist()}, Eq. 5 gives "
        f"{closed.tolist()}: the decay of the old scores must be alpha^(rows in the call)")


# -- your tests, checked by mutation ------------------------------------------------------------------

def correct(scores, probs, q_pos, alpha, bug=None):
    """A correct implementation, and with `bug` one deliberate mistake."""
    real = (q_pos >= 0) if bug != "padding rows count" else torch.ones_like(q_pos, dtype=torch.bool)
    if bug == "alpha capped at 0.99":
        alpha = min(alpha, 0.99)
    t = q_pos.amax(dim=-1, keepdim=True)
    a = torch.tensor(alpha, dtype=torch.float32)
    w = torch.pow(a, (t - q_pos).clamp(min=0).float()) * real
    if bug == "newest row only":
        w = (q_pos == t).float()
    heads = probs.float()[:, :, :1] if bug == "first query head of the group only" else probs.float()
    update = torch.einsum("bghts,bt->bgs", heads, w)
    n = real.sum(dim=-1).float()
    if bug == "rows averaged, not summed":
        update = update / n[:, None, None]
    decay = torch.pow(a, n)[:, None, None]
    old = torch.zeros_like(scores) if bug == "old scores dropped" else scores.float()
    return decay * old + update


BUGS = ["old scores dropped", "newest row only", "first query head of the group only", "alpha capped at 0.99",
        "padding rows count", "rows averaged, not summed"]


def your_tests():
    """The test functions of your student_tests.py (loaded fresh)."""
    module = course.load_module(TESTS, f"exercise_{HERE.name}_{course.which()}_tests")
    found = {n: f for n, f in vars(module).items() if n.startswith("test") and callable(f)}
    if not found:
        pytest.fail(f"{TESTS} has no test function (a function whose name starts with test_)", pytrace=False)
    for name, f in found.items():
        if "a2sf_update" not in inspect.signature(f).parameters:
            pytest.fail(f"{TESTS.name}: {name} must take the implementation as its argument `a2sf_update`", pytrace=False)
    return found


def run_your_tests(update):
    """{test name: the exception it raised, or None} with `update` as the implementation under test."""
    out = {}
    for name, f in your_tests().items():
        try:
            f(a2sf_update=update)
            out[name] = None
        except Exception as e:  # an assertion, or any error your test raised
            out[name] = e
    return out


def test_your_tests_use_hypothesis():
    tree = ast.parse(TESTS.read_text())
    decorated = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name.startswith("test")
                 and any("given" in ast.unparse(d) for d in f.decorator_list)]
    assert decorated, (f"{TESTS.name}: decorate at least one test with hypothesis's @given, so it checks alpha = 1 "
                       "against H2O on many drawn inputs (shapes, padding, values), not one example")


def test_your_tests_pass_on_a_correct_implementation():
    failed = {n: e for n, e in run_your_tests(correct).items() if e is not None}
    assert not failed, "your tests fail on a CORRECT implementation of A2SF:\n" + "\n".join(
        f"    {n}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for n, e in failed.items())


def test_your_tests_pass_on_your_implementation():
    failed = {n: e for n, e in run_your_tests(impl.a2sf_update).items() if e is not None}
    assert not failed, "your tests fail on your own a2sf_update:\n" + "\n".join(
        f"    {n}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for n, e in failed.items())


@pytest.mark.parametrize("bug", BUGS)
def test_your_tests_catch_a_broken_implementation(bug):
    results = run_your_tests(lambda scores, probs, q_pos, alpha: correct(scores, probs, q_pos, alpha, bug=bug))
    if all(isinstance(e, NotImplementedError) for e in results.values()):
        pytest.fail(f"{TESTS.name} is not written yet", pytrace=False)
    assert any(e is not None for e in results.values()), (
        f"every test of {TESTS.name} passes on an implementation with this bug: {bug!r}. A2SF with alpha = 1 must "
        "still equal H2O, so a test that draws enough kinds of input catches it: vary the group size G, the number "
        "of rows T, left-padding rows (q_pos < 0) with non-zero probabilities, non-zero starting scores, and compare "
        "with a tight tolerance.")
