"""RULER-style tasks: each prompt holds its answers where the depth says, the scorer is RULER's, and the
subcommand runs on a tiny model (full's answers equal greedy decoding by plain forwards)."""

import json
import re
from collections import Counter

import pytest
import torch
from helpers import tiny_model
from test_evaluate import CharTokenizer

import evaluate
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
    assert evaluate.parser().parse_args(["ppl"]).mode == "streaming"  # ruler's default is its own
    assert evaluate.main(argv[:-2] + ["--tasks", "qa_1"], *tiny) == 2
