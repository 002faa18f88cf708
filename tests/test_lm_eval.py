"""The lm-evaluation-harness model: lm-eval's accuracy on shipped ARC-Easy docs is `evaluate.py mc`'s, for
full and a2sf at ratio 0.2 (same log-likelihoods), and full's log-likelihoods are plain forwards'."""

import json
import math

import pytest
import torch
from helpers import tiny_model
from test_evaluate import CharTokenizer

pytest.importorskip("lm_eval")

import data  # noqa: E402
import evaluate  # noqa: E402
import lm_eval_model  # noqa: E402

N_DOCS = 5


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("tiny-llama", max_seq_len=32768), CharTokenizer()


def plain_ll(m, context, continuation):
    ids = context + continuation
    with torch.no_grad():
        logp = m(torch.tensor([ids])).float().log_softmax(-1)[0]
    return sum(float(logp[j - 1, ids[j]]) for j in range(len(context), len(ids)))


@pytest.mark.parametrize("policy,size", [("full", None), ("a2sf", ("ratio", 0.2))])
def test_lm_eval_accuracy_equals_mc(tiny, tmp_path, policy, size):
    m, tok = tiny
    lm = lm_eval_model.make_lm(m, tok, policy, size)
    task = lm_eval_model.local_task("arc_easy", "rc_0shot", tmp_path, N_DOCS)
    out = lm_eval_model.evaluate_lm(lm, [task], log_samples=True)
    got = out["results"]["arc_easy_shipped"]
    argv = ["mc", "--tasks", "arc_easy", "--limit", str(N_DOCS), "--policies", policy, "--out", str(tmp_path / "mc.json")]
    if size:
        argv += ["--ratios", str(size[1])]
    assert evaluate.main(argv, m, tok) == 0
    mc = json.loads((tmp_path / "mc.json").read_text())["results"][0]
    assert abs(got["acc,none"] - mc["acc"]) <= 1e-6 and abs(got["acc_norm,none"] - mc["acc_norm"]) <= 1e-6
    docs = data.mc_task("arc_easy")[:N_DOCS]
    samples = sorted(out["samples"]["arc_easy_shipped"], key=lambda s: s["doc_id"])
    assert len(samples) == N_DOCS
    for s, d, pred in zip(samples, docs, mc["pred"]):
        lls = [r[0][0] for r in s["resps"]]
        assert int(max(range(len(lls)), key=lambda i: (lls[i], -i))) == pred
        if policy == "full":  # nothing evicted: the plain forward's sums
            for ll, r in zip(lls, d["requests"]):
                assert math.isclose(ll, plain_ll(m, tok.encode(r["context"]), tok.encode(r["continuation"])), abs_tol=1e-4)


def test_rolling_and_generate_until(tiny):
    m, tok = tiny
    lm = lm_eval_model.make_lm(m, tok, "full")

    class Req:
        def __init__(self, *args):
            self.args = args

    text = "It was the best of times, it was the worst of times."
    (ll,) = lm.loglikelihood_rolling([Req(text)])
    assert math.isclose(ll, plain_ll(m, [tok.eos_id], tok.encode(text)), abs_tol=1e-4)
    gen = lm.generate_until([Req("Once upon a time", {"until": ["e"], "max_gen_toks": 12})])
    ids = tok.encode("Once upon a time")
    want = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(m(torch.tensor([ids + want]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            want.append(nxt)
    assert gen == [tok.decode(want).split("e")[0]]


def test_lm_eval_subcommand(tiny, tmp_path):
    out = tmp_path / "lm.json"
    argv = ["lm-eval", "--tasks", "arc_easy", "--limit", "3", "--policies", "full,window", "--ratio", "0.5", "--out", str(out)]
    assert evaluate.main(argv, *tiny) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["policy"], r["n_docs"]) for r in rows] == [("full", 3), ("window", 3)]
    assert evaluate.main(["lm-eval", "--tasks", "winogrande", "--limit", "2", "--out", str(out)], *tiny) == 2
