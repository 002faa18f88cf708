"""RULER-style tasks: each prompt holds its answers where the depth says, the scorer is RULER's, and the
subcommand runs on a tiny model (full's answers equal greedy decoding by plain forwards)."""

import copy
import gzip
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from test_evaluate import CharTokenizer

import cache as cache_mod
import evaluate
import fast
import ruler

TOK = CharTokenizer()  # one token per character: token offsets are character offsets
L = 2400


def haystack_units(text: str, task: str) -> list[str]:
    if ruler.NIAH[task][0] == "essay":
        return [u for u in re.split(r"(?<=[.!?]) ", text) if u]  # sentences
    return [u for u in text.split("\n") if u]


@pytest.mark.parametrize("task", list(ruler.NIAH))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_niah_needles_sit_at_their_depth(task, depth):
    n = {"niah_multikey_1": 4, "niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
    depths = [depth] + [0.5] * (n - 1)
    s = ruler.sample(TOK, task, L, 0, depths=depths)
    ids = s["tokens"]
    text = TOK.decode(ids)
    assert L - 500 < len(ids) + s["new_tokens"] <= L  # filled to the length, up to one haystack unit
    for needle, start in zip(s["needles"], s["needle_starts"]):  # each needle's tokens where the sample says
        assert text[start:start + len(needle)] == needle
    assert len(s["outputs"]) == n if task != "niah_multikey_1" else 1
    for value in s["outputs"]:  # every answer is in a needle of a key the question asks for
        assert sum(f"for {k} is: {value}." in text for k in s["keys"]) == 1
        assert text.count(value) == 1
    question = text[s["context_len"]:]
    assert all(k in question for k in s["keys"]) and not any(v in question for v in s["outputs"])
    # depth: the first needle's offset in the haystack (other needles taken out) is depth x its length,
    # up to one haystack unit (the needle goes between units)
    hay = text[s["head_len"]:s["context_len"]]
    first = s["needle_starts"][0] - s["head_len"]
    before = hay[:first]
    for other, st in zip(s["needles"][1:], s["needle_starts"][1:]):
        if st < s["needle_starts"][0]:
            before = before.replace(other, "", 1)
    rest = hay
    for needle in s["needles"]:
        rest = rest.replace(needle, "", 1)
    longest = max(len(u) for u in haystack_units(rest, task)) // 2 + 2  # the nearest boundary
    assert abs(len(before) - depth * len(rest)) <= longest, (len(before), depth * len(rest), longest)


def test_niah_depths_random_but_seeded():
    a, b = (ruler.sample(TOK, "niah_multiquery", L, 3, seed=0) for _ in range(2))
    c = ruler.sample(TOK, "niah_multiquery", L, 3, seed=1)
    assert a == b and a["tokens"] != c["tokens"]
    assert all(d * 100 in ruler.DEPTHS or round(d * 100) in ruler.DEPTHS for d in a["depths"])


def test_vt_chain_in_order_and_answers():
    s = ruler.sample(TOK, "vt", 3000, 0)  # its one-shot example alone is ~1400 characters
    text = TOK.decode(s["tokens"])
    main = text[text.rindex("Memorize and track"):]  # after the one-shot example
    names = s["outputs"]
    value = re.search(r"VAR " + names[0] + r" = (\d+)", main)[1]
    at = [main.index(f"VAR {names[0]} = {value}")] + [main.index(f"VAR {b} = VAR {a}") for a, b in zip(names, names[1:])]
    assert at == sorted(at) and len(names) == 5
    assert f"assigned the value {value}" in text[s["context_len"]:]


def test_cwe_common_words_are_the_most_common():
    s = ruler.sample(TOK, "cwe", L, 0)
    text = TOK.decode(s["tokens"])
    main = text[text.rindex("Below is a numbered list"):s["context_len"]]
    counts = Counter(re.findall(r"\d+\. (\S+)", main))
    assert all(counts[w] == 6 for w in s["outputs"]) and len(s["outputs"]) == 10  # below 4096: 6 repeats
    assert max(c for w, c in counts.items() if w not in s["outputs"]) == 1


def test_fwe_answers_are_the_most_frequent_coded_words():
    s = ruler.sample(TOK, "fwe", L, 0)
    text = TOK.decode(s["tokens"][:s["context_len"]])
    words = text.split("coded words. ", 1)[1].split()
    top = [w for w, _ in Counter(w for w in words if w != "...").most_common(3)]
    assert top == s["outputs"]


def test_score_is_rulers_string_match_all():
    refs = ["1234567", "7654321", "abc-def", "XYZ"]
    assert ruler.score(" ".join(refs), refs) == 1.0
    assert ruler.score("nothing of the sort", refs) == 0.0
    assert ruler.score("the numbers are 1234567 and abc-DEF", refs) == 0.5  # case-blind, share found
    assert ruler.score("123456", refs[:1]) == 0.0


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("tiny-llama", max_seq_len=32768), CharTokenizer()


def greedy_by_forwards(m, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(m(torch.tensor([ids]))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def test_ruler_subcommand_smoke(tiny, tmp_path):
    out = tmp_path / "ruler.json"
    argv = ["ruler", "--tasks", "niah_single_1,fwe", "--lengths", "900", "--limit", "2", "--policies", "full,a2sf,window",
            "--ratios", "0.3", "--new-tokens", "6", "--out", str(out)]
    assert evaluate.main(argv, *tiny) == 0
    rec = json.loads(out.read_text())
    rows = rec["results"]
    assert {(r["policy"], r["setting"]) for r in rows} == {("full", "full"), ("a2sf", "end"), ("a2sf", "agnostic"),
                                                          ("window", "end"), ("window", "agnostic")}
    for r in rows:
        assert r["n"] == 2 and 0 <= r["score"] <= 1 and len(r["predictions"]) == 2
        if r["policy"] != "full":
            assert r["budget"] == round(0.3 * max(r["prompt_tokens"])) or r["setting"] == "agnostic"
            assert round(0.3 * min(r["prompt_tokens"])) <= min(r["budgets"]) <= r["budget"]
    m, tok = tiny
    full = next(r for r in rows if r["policy"] == "full" and r["task"] == "niah_single_1")
    s = ruler.sample(tok, "niah_single_1", 900, 1)
    want = tok.decode(greedy_by_forwards(m, s["tokens"], 6))
    assert full["predictions"][1] == want.split(chr(0))[0]
    assert evaluate.plot_file(out).exists() and rec["config"]["mode"] == "prefill"
    cut = tmp_path / "cut.json"  # a run cut short: the table and the plot from its cells alone
    assert table_maker().main([str(out.with_suffix(".cells")), "--save", str(cut)]) == 0
    key = lambda r: (r["task"], r["policy"], str(r["size"]), r["setting"])  # noqa: E731
    assert sorted(json.loads(cut.read_text())["results"], key=key) == sorted(rows, key=key)
    assert evaluate.plot_file(cut).exists()
    assert evaluate.parser().parse_args(["ppl"]).mode == "streaming"  # ruler's default is its own
    assert evaluate.main(argv[:-2] + ["--tasks", "qa_1"], *tiny) == 2


def questions_of_different_lengths(tok, n=3):
    samples = [ruler.sample(tok, "niah_multiquery", 1200, i) for i in range(n)]
    assert len({len(s["tokens"]) - s["context_len"] for s in samples}) == n  # the keys' words differ in length
    return samples


def by_hand(m, tok, s, variant, budget, setting, n):
    """One sample through a plain cache.KVCache: its first part in one call (agnostic: the context;
    end: the whole prompt), the rest a token per call, then n greedy tokens (cut at EOS)."""
    cache = cache_mod.KVCache(m.cfg, evaluate.make_variant(variant, budget, {}), budget, mode="prefill")
    ids = s["tokens"]
    first = s["context_len"] if setting == "agnostic" else len(ids)
    with torch.no_grad():
        logits = m(torch.tensor([ids[:first]]), cache)
        for t in ids[first:]:
            logits = m(torch.tensor([[t]]), cache)
        out = []
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            logits = m(torch.tensor([out[-1:]]), cache)
    return tok.decode(out).split(chr(0))[0]


@pytest.mark.parametrize("variant,setting", [(v, "agnostic") for v in ("full", "a2sf", "window", "snapkv")]
                         + [("a2sf", "end")])
def test_a_batch_answers_as_each_sample_alone(tiny, variant, setting):
    """Agnostic: rows whose questions differ in length share a batch, a row answering while another
    still reads its question; each answers as it does alone, by hand (a fixed budget: the batch's
    longest prompt would set a ratio's)."""
    m, tok = tiny
    samples = questions_of_different_lengths(tok)
    budget = None if variant == "full" else 160
    together, got = ruler.answer(m, tok, samples, variant, budget and ("budget", budget), evaluate.Setup(mode="prefill"),
                                 setting, 10)
    assert together == [by_hand(m, tok, s, variant, budget, setting, 10) for s in samples] and got == budget
    assert len(set(together)) > 1  # not one text for all (the test would hold nothing)


def test_question_chunks_need_one_question_length(tiny):
    m, tok = tiny
    samples = questions_of_different_lengths(tok)
    setup = evaluate.Setup(mode="prefill", chunk=4)
    one_length = [s for s in samples[:1]] * 2
    texts, _ = ruler.answer(m, tok, one_length, "h2o", ("budget", 160), setup, "agnostic", 6)
    assert texts[0] == texts[1] == ruler.answer(m, tok, samples[:1], "h2o", ("budget", 160), setup, "agnostic", 6)[0][0]
    with pytest.raises(ValueError, match="one question length"):
        ruler.answer(m, tok, samples, "h2o", ("budget", 160), setup, "agnostic", 6)


@pytest.mark.parametrize("variant", ["full", "a2sf", "tova"])
def test_graph_step_answers_as_the_reference(tiny, variant):
    """--graph: the fast model (fast.enable, fast.KVCache) with the calls of one token through
    fast.graph_decode (on the CPU the plain step; tests/test_fast.py holds the CUDA graph to it)
    answers as the reference model does, question tokens and answer tokens alike."""
    m, tok = tiny
    samples = questions_of_different_lengths(tok)
    size = None if variant == "full" else ("ratio", 0.3)
    ref, _ = ruler.answer(m, tok, samples, variant, size, evaluate.Setup(mode="prefill"), "agnostic", 10)
    quick = fast.enable(copy.deepcopy(m))
    got, _ = ruler.answer(quick, tok, samples, variant, size, evaluate.Setup(mode="prefill", graph=True), "agnostic", 10)
    assert got == ref


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["full", "sink", "h2o", "snapkv"])
def test_cuda_graph_answers_as_eager_calls(tiny, variant):
    """On CUDA, fp32: the answers with the CUDA-graph step equal those with eager calls of one token."""
    m, tok = tiny
    quick = fast.enable(copy.deepcopy(m)).cuda()
    samples = questions_of_different_lengths(tok)
    size = None if variant == "full" else ("ratio", 0.3)
    eager, _ = ruler.answer(quick, tok, samples, variant, size, evaluate.Setup(mode="prefill"), "agnostic", 24)
    graph, _ = ruler.answer(quick, tok, samples, variant, size, evaluate.Setup(mode="prefill", graph=True), "agnostic", 24)
    assert graph == eager


def table_maker():
    spec = importlib.util.spec_from_file_location("ruler_table", Path(__file__).parents[1] / "scripts" / "ruler_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_maker_on_the_committed_cpu_run(capsys):
    """scripts/ruler_table.py on results/ruler_cpu/ruler-1k.json: Wilson's intervals (8 of 8 right:
    [0.68, 1]; 0 of 12: [0, 0.24]), pooled over the family's tasks, and kvpress's ordering beside ours."""
    assert table_maker().main([str(Path(__file__).parents[1] / "results" / "ruler_cpu" / "ruler-1k.json")]) == 0
    text = capsys.readouterr().out
    assert "| retrieval (niah) | full (no eviction) | 8 | 1.00 [0.68, 1.00] |" in text
    assert "| overall | h2o | 12 | 0.00 [0.00, 0.24] |" in text
    assert "| retrieval (niah) | a2sf | 8 | 0.50 [0.22, 0.78] |" in text  # one task all right, one all wrong
    assert "- ours, end, ratio 0.5: " in text and "TOVA > SnapKV >= StreamingLLM > ObservedAttention" in text


def test_gzipped_results_read_as_the_file_itself(tmp_path, capsys):
    """results/ keeps the large results files gzipped: ruler_table.py and `evaluate.py plot` read a
    .json.gz as its .json (the same table; the plot named X.png, not X.json.png), and anything else
    gets one line saying what to pass."""
    src = Path(__file__).parents[1] / "results" / "ruler_cpu" / "ruler-1k.json"
    gz = tmp_path / "ruler-1k.json.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    maker = table_maker()
    assert maker.main([str(src)]) == 0
    plain = capsys.readouterr().out
    assert maker.main([str(gz)]) == 0
    assert capsys.readouterr().out == plain and "| overall | h2o | 12 |" in plain
    assert evaluate.plot_file(gz) == tmp_path / "ruler-1k.png" and (tmp_path / "ruler-1k.png").stat().st_size > 0
    bad = tmp_path / "notes.json"
    bad.write_text("not json")
    with pytest.raises(SystemExit, match="not a results file of evaluate.py ruler.*pass its .json or .json.gz"):
        maker.main([str(bad)])
