"""evaluate.py's flags over good and bad values, on a tiny random model (passed to evaluate.main, as
test_evaluate.py does) and a fake multiple-choice task: each run either succeeds (exit 0, a results
file) or ends in one line `error: ...` (exit 2, nothing on stdout, no traceback). A progress bar
may come before the error line; the error is the last line and the only one. The gaps the
fuzzing found (multi-line argparse errors, --tokens/--window/--batch-size below 1) are tested at the end."""

import copy
import json

import pytest
import torch
from helpers import tiny_model
from test_evaluate import FAKE_DOCS, CharTokenizer

import data
import evaluate
import fast
import model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("tiny-llama", max_seq_len=32768), CharTokenizer()  # the suite is sized for 8k-context models


@pytest.fixture
def setting(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "mc_task", lambda task, variant="rc_0shot": json.loads(json.dumps(FAKE_DOCS)))
    text = tmp_path / "text.txt"
    text.write_text(open(evaluate.__file__).read()[:400])

    def run(args):
        args = [a.replace("TEXT", str(text)) for a in args]
        out_file = tmp_path / "out.json"
        try:
            code = evaluate.main([*args, "--out", str(out_file)], *tiny)
        except SystemExit as e:  # argparse
            code = e.code
        out, err = capsys.readouterr()
        if code == 0:
            assert out_file.exists() or "--dry-run" in args, (out, err)
            return "ok"
        assert code == 2 and out == "" and "Traceback" not in err, (code, out, err)
        lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]
        errors = [line for line in lines if "error" in line]
        assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
        return errors[0]

    return run


PPL = ["ppl", "--text", "TEXT", "--tokens", "120", "--window", "40"]
MC = ["mc", "--tasks", "copa", "--limit", "2"]
OK = "ok"
GRID = [
    (PPL, OK), (PPL + ["--policies", "h2o,a2sf@0.3,h2o+sink"], OK), (PPL + ["--policies", "lru"], "unknown policy 'lru'"),
    (PPL + ["--policies", "a2sf@x"], "unknown policy"), (PPL + ["--policies", "a2sf@2"], "a2sf@2"),
    (PPL + ["--budgets", "0"], "--budget 0"), (PPL + ["--budgets", "-1"], "--budget -1"), (PPL + ["--budgets", "8,500"], OK),
    (PPL + ["--ratios", "0"], "outside (0, 1]"), (PPL + ["--ratios", "1.5"], "outside (0, 1]"), (PPL + ["--ratios", "0.3"], OK),
    (PPL + ["--alpha", "2"], "outside [0, 1]"), (PPL + ["--alpha", "0.5", "--policy", "a2sf"], OK),
    (PPL + ["--n-sink", "-1"], ">= 0"), (PPL + ["--recent", "-1"], ">= 0"), (PPL + ["--mode", "prefill"], "--mode streaming"),
    (PPL + ["--chunk", "7"], OK), (PPL + ["--positions", "slot"], OK), (PPL + ["--positions", "rank"], "positions"),
    (PPL + ["--gqa", "max"], OK), (PPL + ["--gqa", "x"], "gqa 'x'"), (PPL + ["--method", "both"], OK),
    (PPL + ["--dtype", "bfloat16"], OK), (PPL + ["--seed", "3"], OK), (PPL + ["--dry-run"], OK), (PPL + ["--json"], OK),
    (["ppl", "--text", "/nonexistent.txt"], "No such file"),
    (MC, OK), (MC + ["--tasks", "nope"], "unknown task 'nope'"), (MC + ["--ratios", "0.5", "--policies", "h2o"], OK),
    (MC + ["--batch-size", "1"], OK), (MC + ["--method", "both", "--ratios", "0.5", "--policies", "h2o"], OK),
    (["alpha", "--task", "copa", "--limit", "1", "--alphas", "0,0.5"], OK),
    (["alpha", "--task", "copa", "--alphas", "2"], "a2sf@2"),
    (["mask-sim", "--text", "TEXT", "--tokens", "80", "--policies", "h2o", "--ratio", "0.3"], OK),
    (["mask-sim", "--text", "TEXT", "--tokens", "1000"], "fewer than --tokens"),
    (["suite", "--dry-run"], OK), (["suite", "--stages", "nope", "--dry-run"], "unknown stage 'nope'"),
    (PPL + ["--no-graph"], OK), (PPL + ["--graph", "--no-graph"], "--graph and --no-graph"),
]


@pytest.mark.parametrize("args,expected", GRID, ids=[" ".join(a[:1] + a[-2:])[:50] for a, _ in GRID])
def test_evaluate_flag_grid(setting, args, expected):
    outcome = setting(args)
    assert outcome == OK if expected == OK else expected in outcome, outcome


@pytest.mark.parametrize("args", [PPL + ["--method", "x"], PPL + ["--budgets", "a"]], ids=["method", "budgets"])
def test_evaluate_argparse_errors_are_one_line(setting, args):
    setting(args)


def test_ppl_tokens_zero(setting):
    assert "--tokens" in setting(PPL + ["--tokens", "0"])


@pytest.mark.parametrize("tokens", ["1", "-1"])
def test_ppl_too_few_tokens(setting, tokens):
    assert "--tokens" in setting(PPL + ["--tokens", tokens])


@pytest.mark.parametrize("window", ["0", "-5"])
def test_ppl_window(setting, window):
    assert "--window" in setting(PPL + ["--window", window])


def test_negative_batch_size(setting):
    assert "--batch-size" in setting(PPL + ["--batch-size", "-1"])


def test_steady_calls_replay_a_cuda_graph_by_default_on_cuda_only(tiny, monkeypatch):
    """evaluate.py's steady calls (token by token: its hot path) go through fast.graph_decode by
    default where the model is a fast one on CUDA, as generate.py's CLI does; eager on the CPU, with
    --no-graph or --compile, and for the reference model. (The device is faked: no CUDA here.)"""
    ref = tiny[0]
    fast_model = fast.enable(copy.deepcopy(ref))
    args = lambda *flags: evaluate.parser().parse_args(PPL + list(flags))  # noqa: E731
    assert not evaluate.wants_graph(args(), fast_model)  # the CPU
    assert evaluate.wants_graph(args("--graph"), fast_model)
    monkeypatch.setattr(model.Transformer, "device", property(lambda self: torch.device("cuda")))
    assert fast_model.device.type == "cuda" and ref.device.type == "cuda"
    assert evaluate.wants_graph(args(), fast_model)
    assert not evaluate.wants_graph(args("--no-graph"), fast_model)
    assert not evaluate.wants_graph(args("--compile"), fast_model)
    assert not evaluate.wants_graph(args(), ref)  # the reference model has no graph step
