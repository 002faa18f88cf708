"""Every flag of generate.py over good and bad values, alone and combined at random: the command
either runs (exit 0, a final stats line) or says what is wrong in one line (exit 2, stderr exactly
one line starting with "error: ", nothing on stdout, no traceback). load_weights.load is replaced
by a tiny random model and a byte tokenizer (as in test_generate.py), so each run takes
milliseconds. The gaps the fuzzing found in generate.py and cache.py are fixed and tested at the end."""

import collections
import functools

import pytest
import torch
from helpers import report_after, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_generate import ByteTokenizer

import fast
import generate
import load_weights
from policies import POLICY_NAMES

PROMPT = "a short prompt for the tiny model"  # 33 byte tokens: the default budget (ratio 0.5) is 16


@pytest.fixture
def tiny(monkeypatch):
    def load(path=None, device="cpu", dtype=torch.float32):
        m = tiny_model("tiny-opt" if path == "opt" else "tiny-llama")
        return m.to(device=device, dtype=dtype), ByteTokenizer(m.cfg.vocab_size)

    monkeypatch.setattr(load_weights, "load", load)
    # --compile: the eager backend checks the wiring in seconds (inductor on a CPU takes a minute: the slow test)
    monkeypatch.setattr(fast, "compile_decode", functools.partial(fast.compile_decode, backend="eager"))


def run_cli(capsys, args):
    try:
        code = generate.main(["--prompt", PROMPT, "--max-new-tokens", "3", *args])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_runs_or_one_line(code, out, err):
    """The contract. -> 'ok' or the error line."""
    if code == 0:
        last = out.strip().splitlines()[-1]
        assert err == "" and last.startswith("[") and "KV bytes held" in last, (out, err)
        return "ok"
    assert code == 2, (code, out, err)
    assert out == "" and "Traceback" not in err, (out, err)
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


OK = "ok"
GRID = [  # (flags, OK or words of the one-line error)
    *[(["--policy", name], OK) for name in POLICY_NAMES],
    (["--policy", "lru"], "unknown policy 'lru'"),
    (["--budget", "0"], "--budget 0"), (["--budget", "-3"], "--budget -3"), (["--budget", "1"], OK),
    (["--budget", "5"], OK), (["--budget", "100"], OK),  # above the 36 tokens: nothing is evicted
    (["--budget", "5", "--ratio", "0.5"], "not both"),
    (["--ratio", "0"], "outside (0, 1]"), (["--ratio", "1"], OK), (["--ratio", "1.5"], "outside (0, 1]"),
    (["--ratio", "-1"], "outside (0, 1]"), (["--ratio", "nan"], "outside (0, 1]"),
    (["--alpha", "-0.1"], "outside [0, 1]"), (["--alpha", "0"], OK), (["--alpha", "1"], OK),
    (["--alpha", "1.1"], "outside [0, 1]"), (["--alpha", "nan"], "outside [0, 1]"),
    (["--n-sink", "-1"], "must be >= 0"), (["--n-sink", "3"], OK), (["--n-sink", "17"], "below the protected slots"),
    (["--recent", "-1"], "must be >= 0"), (["--recent", "3"], OK), (["--recent", "17"], "below the protected slots"),
    (["--policy", "h2o", "--budget", "6", "--n-sink", "3", "--recent", "4"], "below the protected slots"),
    (["--policy", "sink", "--budget", "4", "--n-sink", "4"], OK),
    (["--mode", "prefill"], OK), (["--mode", "streaming"], OK), (["--mode", "both"], "mode 'both'"),
    (["--chunk", "0"], "chunk 0"), (["--chunk", "-1"], "chunk -1"), (["--chunk", "1"], OK), (["--chunk", "3"], OK),
    (["--mode", "streaming", "--chunk", "3"], OK),
    (["--positions", "original"], OK), (["--positions", "slot"], OK), (["--positions", "rank"], "positions 'rank'"),
    (["--positions", "slot", "--model", "opt"], "rotary"), (["--model", "opt"], OK),
    (["--gqa", "sum"], OK), (["--gqa", "max"], OK), (["--gqa", "mean"], "gqa 'mean'"),
    (["--temperature", "-1"], "--temperature >= 0"), (["--temperature", "0"], OK), (["--temperature", "1.5"], OK),
    (["--top-k", "-1"], "--top-k >= 0"), (["--top-k", "0"], OK), (["--top-k", "5"], OK),
    (["--top-p", "0"], "--top-p in (0, 1]"), (["--top-p", "0.5"], OK), (["--top-p", "1"], OK),
    (["--top-p", "1.5"], "--top-p in (0, 1]"),
    (["--seed", "0"], OK), (["--seed", "12345"], OK), (["--seed", "-1"], OK),
    (["--device", "cpu"], OK), (["--device", "bad"], "use cpu or cuda"),
    *[(["--dtype", name], OK) for name in generate.DTYPES],
    (["--max-new-tokens", "0"], OK), (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--max-new-tokens", "400"], "exceed the context"),
    (["--prompt", "   "], "empty"), (["--prompt", "x" * 300], "longer than the model's context"),
    (["--chat"], OK), (["--no-chat"], OK), (["--compile"], OK),
]


@pytest.mark.parametrize("args,expected", GRID, ids=[" ".join(a)[:40] for a, _ in GRID])
def test_flag_grid(tiny, capsys, args, expected):
    outcome = assert_runs_or_one_line(*run_cli(capsys, args))
    assert outcome == OK if expected == OK else expected in outcome, outcome


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu(tiny, capsys, device):
    assert "no CUDA GPU" in assert_runs_or_one_line(*run_cli(capsys, ["--device", device]))


# Flags combined at random: good values, and at most one bad one (those tested one by one below left out)
GOOD = {
    "--policy": list(POLICY_NAMES), "--budget": ["1", "4", "12", "100"], "--ratio": ["0.2", "1"],
    "--alpha": ["0", "0.3", "1"], "--n-sink": ["0", "2"], "--recent": ["0", "3"], "--mode": ["prefill", "streaming"],
    "--chunk": ["1", "2", "5"], "--positions": ["original", "slot"], "--gqa": ["sum", "max"],
    "--temperature": ["0", "0.7", "1.5"], "--top-k": ["0", "3"], "--top-p": ["0.5", "1"], "--seed": ["0", "3"],
    "--device": ["cpu"], "--dtype": list(generate.DTYPES), "--max-new-tokens": ["0", "1", "4"], "--model": ["opt"],
    "--prompt": [PROMPT, "héllo, wörld"], "--chat": [None], "--no-chat": [None],
}
BAD = [("--policy", "lru"), ("--budget", "0"), ("--budget", "-2"), ("--ratio", "0"), ("--ratio", "1.5"),
       ("--alpha", "-0.1"), ("--alpha", "1.1"), ("--n-sink", "-1"), ("--n-sink", "40"), ("--recent", "-1"),
       ("--recent", "40"), ("--mode", "x"), ("--chunk", "0"), ("--chunk", "-1"), ("--positions", "x"), ("--gqa", "x"),
       ("--temperature", "-1"), ("--top-k", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--device", "bad"),
       ("--max-new-tokens", "-1"), ("--max-new-tokens", "300"), ("--prompt", " ")]
OUTCOMES = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def print_outcomes(request):
    yield
    if OUTCOMES:
        report_after(request, [f"test_cli: {sum(OUTCOMES.values())} random flag sets: {OUTCOMES['ok']} ran, "
                               f"{OUTCOMES['error']} one-line errors"])


good_flags = st.fixed_dictionaries({}, optional={flag: st.sampled_from(values) for flag, values in GOOD.items()})


def combined(capsys, flags, bad):
    if bad:
        flags[bad[0]] = bad[1]
    args = [part for flag, value in flags.items() for part in (flag, value) if part is not None]
    outcome = assert_runs_or_one_line(*run_cli(capsys, args))
    OUTCOMES["ok" if outcome == OK else "error"] += 1


CLI = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=150, **CLI)
@given(flags=good_flags, bad=st.none() | st.sampled_from(BAD))
def test_flags_combined_run_or_fail_in_one_line(tiny, capsys, flags, bad):
    combined(capsys, flags, bad)


@pytest.mark.slow
@settings(max_examples=3000, **CLI)
@given(flags=good_flags, bad=st.none() | st.sampled_from(BAD))
def test_flags_combined_many(tiny, capsys, flags, bad):
    combined(capsys, flags, bad)


@pytest.mark.slow
def test_compile_with_inductor(monkeypatch, capsys):
    """--compile as shipped (inductor): up to a minute of compiling on a 2-core CPU with a cold cache."""
    def load(path=None, device="cpu", dtype=torch.float32):
        m = tiny_model("tiny-llama")
        return m.to(device=device, dtype=dtype), ByteTokenizer(m.cfg.vocab_size)

    monkeypatch.setattr(load_weights, "load", load)
    assert assert_runs_or_one_line(*run_cli(capsys, ["--compile"])) == OK


# Gaps the fuzzing found in generate.py / cache.py, fixed: each now ends in this exact outcome

@pytest.mark.parametrize("args,words", [
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--budget", "abc"], "argument --budget: invalid int value: 'abc'"),
    (["--policy"], "argument --policy: expected one argument"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
], ids=["dtype", "budget", "missing-value", "unknown-flag"])
def test_argparse_errors_are_one_line(tiny, capsys, args, words):
    """argparse's own errors (usage, then 'generate.py: error: ...') come as one line too."""
    outcome = assert_runs_or_one_line(*run_cli(capsys, args))
    assert outcome.startswith("error: ") and words in outcome and outcome.endswith("(see --help)"), outcome


def test_nan_temperature(tiny, capsys):
    outcome = assert_runs_or_one_line(*run_cli(capsys, ["--temperature", "nan"]))
    assert outcome == "error: use --temperature >= 0, --top-k >= 0 and --top-p in (0, 1]"


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_devices_other_than_cpu_and_cuda(tiny, capsys, device):
    outcome = assert_runs_or_one_line(*run_cli(capsys, ["--device", device]))
    assert outcome == f"error: --device '{device}': use cpu or cuda (or cuda:N)"


@pytest.mark.parametrize("args", [["--budget", str(10**12)], ["--chunk", str(10**12)],
                                  ["--mode", "streaming", "--chunk", str(10**12)]], ids=["budget", "chunk", "streaming-chunk"])
def test_huge_budget_or_chunk(tiny, capsys, args):
    code, out, err = run_cli(capsys, args)
    assert assert_runs_or_one_line(code, out, err) == OK
    kept, fed = (int(x) for x in out.split("| kept ")[1].split(" tokens")[0].split(" of "))
    assert fed == 33 + 3 - 1 and kept == (fed if args[0] == "--budget" else 16)  # a huge budget keeps all; else ratio 0.5


def test_full_cache_with_a_huge_max_new_tokens(tiny, capsys):
    outcome = assert_runs_or_one_line(*run_cli(capsys, ["--policy", "full", "--positions", "slot",
                                                         "--max-new-tokens", str(10**12)]))
    assert outcome.startswith("error: prompt (33) + --max-new-tokens (1000000000000) exceed the context of 256")
