"""Evaluate KV-cache eviction policies: perplexity, accuracy, A2SF's alpha sweep and mask similarity,
passkey retrieval, and their plots. Each subcommand writes one results file (JSON, with its whole
configuration) under results/ and shows a progress bar on stderr.

    python evaluate.py ppl --policies full,window,sink --budgets 256 --tokens 2048 --limit 4
    python evaluate.py ppl --policy sink --budget 1024 --tokens 10000 --positions slot   # past the context
    python evaluate.py mc --tasks arc_easy,piqa --policies full,window,h2o,a2sf --ratios 0.2 --limit 100
    python evaluate.py alpha --task piqa --ratio 0.3 --limit 100        # A2SF Fig. 5
    python evaluate.py mask-sim --policies window,h2o,a2sf --ratio 0.2   # A2SF Table 2
    python evaluate.py needle --policies full,window,h2o --budgets 128 --lengths 512,1024
    python evaluate.py plot results/*.json                               # PNGs beside each file
    python evaluate.py suite --dry-run                                   # the GPU plan, one process

Policies are named as in policies.py, with two suffixes: `+sink` gives a policy the 4 sinks that
VATP gets (the rest of the budget split as the policy splits it: `h2o+sink` is VATP without the
value prior), and `@ALPHA` sets the forgetting factor (`a2sf@0.1`). The policy flags of
generate.py (--alpha, --n-sink, --recent, --gqa, --mode, --chunk, --positions) apply to every
policy of a sweep.

How a text goes through the cache (`call_spans`, `make_cache`): --mode streaming (the default here,
the papers' setting) with --chunk 1 is exact token-by-token eviction. Nothing is evicted while the
cache holds at most `budget` tokens and scores add up across calls (A2SF Eq. 5, closed form), so
the first `budget` tokens go in one call and the rest one by one; SnapKV's vote depends on the
call, so it streams from the first token. --mode prefill attends the prompt (mc: the context;
needle: the haystack) whole, compresses it to the budget, then goes on one token per call.
`--method masked` runs simulate.masked_simulation instead (slow: for checking, on small sets);
`--method both` runs both and reports how far apart they are.

Multiple choice is scored as lm-eval-harness scores it: the log-likelihood of a choice is the sum
of its continuation tokens' log-probs, tokens = encode(context) + encode(continuation); acc takes
the argmax, acc_norm the argmax of ll / len(choice) in characters (lm-eval's `completion_len`);
stderr = sqrt(p (1 - p) / (n - 1)). The budget of a request is round(ratio * its length, context +
continuation) (A2SF's convention). Requests with the same budget are batched, left-padded to the
longest (the cache never keeps padding, and a test holds padded equal to unpadded).

A results file: {"kind", "created", "seconds", "paper" (the papers' numbers to compare with),
"config" (every flag), "model", "device", "dtype", "results": [one row per policy x size (x task,
length, depth)]}; a row's "size" is {"ratio": r} or {"budget": b}, null for full.
"""

from __future__ import annotations

import argparse
import copy
import gc
import gzip
import json
import math
import random
import re
import shlex
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import cache as reference_cache
import data
import fast
import generate
import simulate
import sweep
from model import attend
from policies import REGISTRY, Policy, aggregate_heads, make_policy

SINKS = 4  # StreamingLLM's number of attention sinks; VATP's default and the `+sink` variants use it
SPLIT_OF = {"sink": "window", "vatp": "h2o"}  # how a policy splits what its sinks leave of the budget
FULL_CALL = 1024  # columns per call when nothing can be evicted (any chunking is exact then)
LOGIT_ELEMENTS = 2**27  # log-softmax in column blocks of at most this many fp32 logits (512 MB)
RESULTS = Path("results")


# -- policies by name ---------------------------------------------------------------------------

def parse_variant(variant: str) -> tuple[str, bool, float | None]:
    """'h2o+sink' -> ('h2o', True, None); 'a2sf@0.1' -> ('a2sf', False, 0.1)."""
    m = re.fullmatch(r"([a-z0-9_]+)(\+sink)?(?:@([0-9.]+))?", variant)
    if not m or m[1] not in REGISTRY:  # the built-in policies and any registered since (exercise 07)
        raise ValueError(f"unknown policy {variant!r}: use one of {', '.join(REGISTRY)}, optionally with +sink "
                         "(4 sinks) or @ALPHA (forgetting factor), e.g. h2o+sink, a2sf@0.1")
    return m[1], bool(m[2]), None if m[3] is None else float(m[3])


def make_variant(variant: str, budget: int | None, flags: dict) -> Policy:
    """The policy a variant name means at this budget. flags: alpha, n_sink, recent, gqa (None = default).

    A budget below a policy's protected slots (short requests at small ratios: COPA has 14 tokens,
    so ratio 0.2 leaves 3) keeps at most budget // 2 sinks; the policy splits what they leave."""
    name, plus_sink, alpha = parse_variant(variant)
    flags = {k: v for k, v in flags.items() if v is not None}
    if alpha is not None:
        flags["alpha"] = alpha
    if name == "full" or budget is None:
        return make_policy(name, budget, **flags)
    if not plus_sink:
        try:
            return make_policy(name, budget, **flags)
        except ValueError:
            if "n_sink" in flags or "recent" in flags:
                raise  # the user's own numbers do not fit: say so
        sinks = make_policy(name, 1 << 20).n_sink  # a policy's sinks do not depend on its budget
    else:
        sinks = flags.get("n_sink", SINKS)
    for s in dict.fromkeys((sinks, min(sinks, budget // 2))):
        rest = budget - s
        if rest < 0:
            continue
        recent = flags.get("recent", make_policy(SPLIT_OF.get(name, name), rest).recent if rest > 0 else 0)
        try:
            return make_policy(name, budget, **{**flags, "n_sink": s, "recent": recent})
        except ValueError:
            continue
    raise ValueError(f"policy {variant} does not fit in a budget of {budget}")


def sizes_from(args, default: str) -> list[tuple[str, float]]:
    """[('budget', 128), ('ratio', 0.2), ...] from --budgets/--budget and --ratios/--ratio."""
    budgets = args.budgets or ([args.budget] if args.budget is not None else [])
    ratios = args.ratios or ([args.ratio] if args.ratio is not None else [])
    if not budgets and not ratios:
        kind, values = default.split("=")
        return [(kind, float(v)) for v in values.split(",")]
    return [("budget", int(b)) for b in budgets] + [("ratio", float(r)) for r in ratios]


def budget_for(size: tuple[str, float] | None, length: int) -> int | None:
    """Tokens kept for a text of `length` tokens (None: full, no budget)."""
    if size is None:
        return None
    kind, value = size
    return generate.resolve_budget(int(value), None, length) if kind == "budget" else generate.resolve_budget(
        None, value, length)


# -- running token batches through the cache -----------------------------------------------------

@dataclass
class Setup:
    """How texts go through the cache: the flags of generate.py beside the policy and budget."""
    mode: str = "streaming"
    chunk: int = 1
    positions: str = "original"
    method: str = "real"  # real: the evicting cache; masked: simulate.masked_simulation
    flags: dict = field(default_factory=dict)  # alpha, n_sink, recent, gqa for make_variant
    compile: bool = False  # steady calls through fast.compile_decode (torch.compile + CUDA graph)
    graph: bool = False  # steady calls through fast.graph_decode (the eager step as a CUDA graph)


def evicts(policy: Policy, budget: int | None, T: int) -> bool:
    """Whether a text of T columns can lose a token under this policy and budget."""
    return not policy.keep_all and budget < T


def call_spans(policy: Policy, budget: int | None, setup: Setup, T: int, prompt_len: int | None = None,
               horizon: int | None = None):
    """[(start, end)] column ranges of the calls that feed T columns (see the module docstring).
    horizon: the columns the cache will hold in all (default T; more when decoding follows)."""
    def spans(s, step):
        return [(i, min(i + step, T)) for i in range(s, T, step)]

    if setup.method == "masked":
        return [(0, T)]  # one masked forward
    if not evicts(policy, budget, horizon or T):
        return spans(0, FULL_CALL)
    if setup.mode == "prefill":
        first = prompt_len
    elif policy.obs_window:
        first = setup.chunk
    else:
        first = max(setup.chunk, budget // setup.chunk * setup.chunk)
    return [(0, min(first, T))] + spans(first, setup.chunk)


def cache_class(model):
    """fast.KVCache for a model with the speed twins on (fast.enable), else the reference cache."""
    return fast.KVCache if isinstance(model, fast.model.Transformer) else reference_cache.KVCache


def make_cache(model, policy, budget, setup: Setup, B: int, T: int, pad):
    """The cache for `call_spans`: `full` when nothing can be evicted; otherwise a prefill-mode
    cache, whose first call may be longer than a chunk (and evicts nothing in streaming).
    policy, budget: one for all sequences, or lists (one per sequence: cache.KVCache)."""
    kw = dict(batch=B, chunk=setup.chunk, positions=setup.positions, device=model.device, dtype=model.dtype, pad=pad)
    first, low = _first(policy), _lowest(budget)
    if not evicts(first, low, T):
        return cache_class(model)(model.cfg, make_policy("full", None), None, max_len=T, **kw)
    return cache_class(model)(model.cfg, policy, budget, mode="prefill", **kw)


def _first(policy):
    return policy[0] if isinstance(policy, (list, tuple)) else policy


def _lowest(budget):
    return min(budget) if isinstance(budget, (list, tuple)) else budget


class Reuse:
    """Caches (and their compiled decode steps) kept across the batches of one run, so one CUDA
    graph serves them all: a batch of B sequences whose budgets fit an earlier cache of B rows
    resets it in place (cache.KVCache.reset) instead of making a new one. Streaming mode only:
    a prefill-mode cache reallocates its storage after the prompt."""

    def __init__(self, largest: int | None = None):
        self.largest = largest  # the run's largest budget: storage is sized for it
        self.held: dict[int, tuple] = {}  # B -> (cache, step or None)

    def get(self, model, policy, budget, setup: Setup, B: int, T: int, pad):
        if setup.mode != "streaming" or not isinstance(budget, list) or not evicts(policy[0], min(budget), T):
            return make_cache(model, policy, budget, setup, B, T, pad), None
        if B in self.held and self.held[B][0].budget >= max(budget):
            cache, step = self.held[B]
            cache.reset(pad, policy, budget)
            return cache, step
        top = max(self.largest or 0, *budget)
        cache = cache_class(model)(model.cfg, [policy[0]] * B, [top] * B, batch=B, mode="prefill", chunk=setup.chunk,
                                   positions=setup.positions, device=model.device, dtype=model.dtype, pad=pad)
        cache.reset(pad, policy, budget)
        self.held[B] = (cache, None)
        return cache, None

    def keep_step(self, cache, step):
        B = cache.batch
        if B in self.held and self.held[B][0] is cache:
            self.held[B] = (cache, step)


def wants_graph(args, model) -> bool:
    """--graph, or by default a fast model on CUDA (as generate.py's CLI): its steady calls are the
    eager step replayed as a CUDA graph, the same computation without the host's launch cost (9.6x
    the eager calls token by token on an H200, README Performance). --no-graph, --compile or the
    reference model: not."""
    if args.graph:
        return True
    return (model.device.type == "cuda" and isinstance(model, fast.model.Transformer) and not getattr(args, "no_graph", False)
            and not args.compile)


def steady_step(model, cache, setup: Setup):
    """The step for a cache's steady calls (after the first, all of one shape: with --chunk 1 the
    token-by-token calls, each a decode step), or None: --graph replays the eager step as a CUDA
    graph (fast.graph_decode), --compile compiles it too (fast.compile_decode). A run here goes
    through dozens of policies and caches in one process, one step per cache: a graph costs a few
    eager calls to capture, a compile seconds per policy form, which is why the suite asks for --graph."""
    if not (setup.compile or setup.graph):
        return None
    return fast.compile_decode(model, cache) if setup.compile else fast.graph_decode(model, cache)


def _gather(out, logits, tokens, s: int, first: int) -> None:
    """out[:, j] = log p(tokens[:, j + 1]) from logits (B, n, V) of columns s..s+n, for j >= first."""
    T = tokens.shape[1]
    lo, hi = max(s, first), min(s + logits.shape[1], T - 1)
    block = max(1, LOGIT_ELEMENTS // (logits.shape[0] * logits.shape[2]))
    for a in range(lo, hi, block):
        b = min(hi, a + block)
        x = logits[:, a - s:b - s].float()  # (B, cols, V)
        out[:, a:b] = x.gather(-1, tokens[:, a + 1:b + 1, None])[..., 0] - x.logsumexp(-1)


@torch.no_grad()
def token_logprobs(model, tokens, policy, budget, setup: Setup, *, pad=None, prompt_len=None, first=0,
                   tick=lambda n: None, reuse: Reuse | None = None) -> torch.Tensor:
    """tokens (B, T), left-padded by pad (B,) -> (B, T - 1) fp32: log p(tokens[:, j + 1] | what the
    cache held) for columns j >= first, NaN before. tick(n) is called after each model call.
    policy, budget: one for all, or one per sequence (lists). reuse: caches kept across calls."""
    B, T = tokens.shape
    out = torch.full((B, T - 1), float("nan"), device=tokens.device)
    if setup.method == "masked":
        assert pad is None or not any(pad), "the masked simulation takes no padding"
        assert not isinstance(budget, list) or len(set(budget)) == 1, "the masked simulation takes one budget"
        policy, budget = _first(policy), _lowest(budget)
        logits, _ = simulate.masked_simulation(model, tokens, policy, None if policy.keep_all else budget, mode=setup.mode,
                                               chunk=setup.chunk, positions=setup.positions, prompt_len=prompt_len)
        _gather(out, logits, tokens, 0, first)
        tick(1)
        return out
    cache, step = (reuse or Reuse()).get(model, policy, budget, setup, B, T, pad)
    for s, e in call_spans(_first(policy), _lowest(budget), setup, T, prompt_len):
        if (setup.compile or setup.graph) and s > 0 and e - s == setup.chunk and cache.budget is not None:
            if step is None:  # the steady calls, all of one shape: one step for them all
                step = steady_step(model, cache, setup)
                if reuse is not None:
                    reuse.keep_step(cache, step)
            logits = step(tokens[:, s:e])
        else:
            logits = model(tokens[:, s:e], cache)
        _gather(out, logits, tokens, s, first)
        tick(1)
    return out


def budget_label(budget) -> str:
    return "all" if budget is None else str(budget)


def size_label(size) -> str:
    """("ratio", 0.2) -> "ratio 0.2"; None (full) -> "all"."""
    return "all" if size is None else f"{size[0]} {size[1]:g}"


def progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def say(line: str) -> None:
    """A line on stderr above the progress bar (stdout is kept for --json)."""
    tqdm.write(line, file=sys.stderr)


# -- ppl: streaming perplexity ---------------------------------------------------------------------

def ppl_texts(tok, args) -> dict[str, list[int]]:
    """{name: first --tokens tokens} of --text FILE, or of the first --limit Shakespeare texts."""
    if args.text:
        texts = {Path(args.text).name: Path(args.text).read_text(encoding="utf-8")}
    else:
        texts = dict(list(data.shakespeare_texts().items())[:args.limit or 1])
    out = {}
    for name, text in texts.items():
        ids = tok.encode(text)  # the whole text, no BOS
        if len(ids) < args.tokens:
            raise ValueError(f"{name} has {len(ids)} tokens, fewer than --tokens {args.tokens}")
        out[name] = ids[:args.tokens]
    return out


def run_ppl(model, tok, args, setup: Setup) -> list[dict]:
    texts = ppl_texts(tok, args)
    N, cfg = args.tokens, model.cfg
    runs = [(v, size) for v in args.policy_list for size in (sizes_from(args, "budget=256") if v != "full" else [None])]
    for v, size in runs:  # past the context only with slot positions and a cache that stays inside it
        budget = budget_for(size, N)
        if N > cfg.max_seq_len and (setup.positions != "slot" or budget is None or budget + setup.chunk > cfg.max_seq_len):
            raise ValueError(f"--tokens {N} is past the model's context of {cfg.max_seq_len}: use --positions slot and a"
                             f" budget below the context (e.g. --policy sink --budget 1024); {v} {size} does not fit")
    names, rows = list(texts), list(texts.values())
    B = args.batch_size or len(rows)
    batches = [rows[i:i + B] for i in range(0, len(rows), B)]
    plans = [(v, size, make_variant(v, budget_for(size, N), setup.flags)) for v, size in runs]
    total = sum(len(call_spans(p, budget_for(s, N), setup, N)) for _, s, p in plans) * len(batches)
    if args.dry_run:
        return [{"calls": total}]

    policy_of = {(v, size): policy for v, size, policy in plans}

    def compute(cell, bar):  # a cell (sweep.py): one policy and size on every text
        nll = torch.cat([-token_logprobs(model, torch.tensor(rows_, device=model.device), policy_of[cell], budget_for(cell[1], N),
                                         setup, tick=bar.update) for rows_ in batches]).cpu()  # (texts, N - 1)
        free_memory()
        return nll.tolist()

    done = sweep.run(args.out, sweep.config_of(args), "ppl", list(policy_of), compute,
                     lambda c: len(call_spans(policy_of[c], budget_for(c[1], N), setup, N)) * len(batches))
    if done is None:  # another rank of a sweep: rank 0 writes the file
        return None
    results = []
    for v, size, policy in plans:
        budget = budget_for(size, N)
        nll = torch.tensor(done[v, size]["result"], dtype=torch.float32)  # (texts, N - 1)
        W = args.window
        results.append(dict(
            policy=v, size=size and dict([size]), budget=budget, tokens=N, texts=names,
            ppl=math.exp(nll.mean()), per_text={n: math.exp(x.mean()) for n, x in zip(names, nll)}, window=W,
            window_end=[min(s + W, N - 1) for s in range(0, N - 1, W)],
            window_ppl=[math.exp(nll[:, s:s + W].mean()) for s in range(0, N - 1, W)],
            seconds=done[v, size]["seconds"], policy_fields=asdict(policy)))
        say(f"ppl {v} budget {budget_label(budget)}: {results[-1]['ppl']:.2f}")
    return results


# -- mc: multiple-choice accuracy, lm-eval style ----------------------------------------------------

@dataclass
class Request:
    task: str
    doc: int  # index into its task's docs
    context: list[int]
    continuation: list[int]

    @property
    def length(self) -> int:
        return len(self.context) + len(self.continuation)


def mc_requests(tok, docs_by_task: dict[str, list[dict]]) -> list[Request]:
    return [Request(task, i, tok.encode(r["context"]), tok.encode(r["continuation"]))
            for task, docs in docs_by_task.items() for i, d in enumerate(docs) for r in d["requests"]]


def mc_batches(requests: list[Request], variant: str, size, setup: Setup, batch_size: int, max_tokens: int):
    """[([budget per request], [request index])]: requests that can share a cache, longest together.
    The real cache takes a budget per sequence (cache.KVCache), so streaming with chunk 1 batches
    any requests, left-padded to the longest, and prefill those with the same continuation length
    (their prompts end in one column). The masked simulation and streaming with chunk > 1 batch
    one budget and one length (no padding)."""
    groups: dict = {}
    for i, r in enumerate(requests):
        budget = budget_for(size, r.length)
        if setup.method == "masked" or (setup.mode == "streaming" and setup.chunk > 1):
            key = (budget or 0, r.length, len(r.context) if setup.mode == "prefill" else 0)  # no padding
        else:
            key = (0, len(r.continuation) if setup.mode == "prefill" else 0)
        groups.setdefault(key, []).append(i)
    out = []
    for key in sorted(groups):
        rows = sorted(groups[key], key=lambda i: -requests[i].length)
        while rows:
            T = requests[rows[0]].length
            n = max(1, min(batch_size, max_tokens // T))
            out.append(([budget_for(size, requests[i].length) for i in rows[:n]], rows[:n]))
            rows = rows[n:]
    return out


def loglikelihoods(model, requests, variant, size, setup: Setup, args, bar) -> np.ndarray:
    """Sum of log p(continuation tokens | context) for each request, through the cache."""
    lls = np.zeros(len(requests))
    batches = mc_batches(requests, variant, size, setup, args.batch_size, args.max_batch_tokens)
    reuse = Reuse(max((b for budgets, _ in batches for b in budgets if b is not None), default=None))
    for budgets, rows in batches:
        reqs = [requests[i] for i in rows]
        T = max(r.length for r in reqs)
        pad = [T - r.length for r in reqs]
        tokens = torch.tensor([[0] * p + r.context + r.continuation for p, r in zip(pad, reqs)], device=model.device)
        starts = [p + len(r.context) - 1 for p, r in zip(pad, reqs)]  # column predicting the first continuation token
        policy = [make_variant(variant, b, setup.flags) for b in budgets]  # each request's split of its budget
        budget = None if budgets[0] is None else budgets
        lp = token_logprobs(model, tokens, policy, budget, setup, pad=pad, prompt_len=T - len(reqs[0].continuation),
                            first=min(starts), tick=bar.update, reuse=reuse)
        cols = torch.arange(T - 1, device=lp.device)
        mine = cols[None, :] >= torch.tensor(starts, device=lp.device)[:, None]  # (B, T - 1) continuation columns
        lls[rows] = torch.where(mine, lp, 0.0).sum(-1).cpu().numpy()
        free_memory()
    return lls


def free_memory() -> None:
    """A cache's layers point back at it (a reference cycle), so its GPU storage waits for Python's
    garbage collector, which counts objects, not bytes: collect after each batch."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mc_calls(requests, variant, size, setup: Setup, args) -> int:
    n = 0
    for budgets, rows in mc_batches(requests, variant, size, setup, args.batch_size, args.max_batch_tokens):
        r, low = requests[rows[0]], _lowest(budgets) if budgets[0] is not None else None
        n += len(call_spans(make_variant(variant, low, setup.flags), low, setup, r.length, r.length - len(r.continuation)))
    return n


def per_doc(lls, requests: list[Request], mine: list[int]) -> list[list[float]]:
    """The log-likelihoods of one task's requests (indices `mine`), grouped by doc in doc order."""
    out: dict[int, list[float]] = {}
    for i in mine:
        out.setdefault(requests[i].doc, []).append(float(lls[i]))
    return [out[d] for d in sorted(out)]


def accuracy(docs: list[dict], lls: list[list[float]]) -> dict:
    """acc and acc_norm (lm-eval: ll / len(choice) in characters) with their standard errors."""
    gold = np.array([d["gold"] for d in docs])
    pred = np.array([int(np.argmax(x)) for x in lls])
    pred_norm = np.array([int(np.argmax(np.array(x) / [len(r["choice"]) for r in d["requests"]])) for x, d in zip(lls, docs)])
    out = {"n_docs": len(docs)}
    for name, p in (("acc", pred), ("acc_norm", pred_norm)):
        a = float((p == gold).mean())
        out[name], out[name + "_stderr"] = a, math.sqrt(a * (1 - a) / max(1, len(docs) - 1))
    out["pred"], out["pred_norm"] = pred.tolist(), pred_norm.tolist()
    return out


def run_mc(model, tok, args, setup: Setup, docs_by_task: dict[str, list[dict]] | None = None) -> list[dict]:
    """Accuracy per task, policy and cache ratio. The requests of all tasks are batched together."""
    if docs_by_task is None:
        docs_by_task = {t: data.mc_task(t, args.variant)[:args.limit] for t in args.task_list}
    requests = mc_requests(tok, docs_by_task)
    runs = [(v, size) for v in args.policy_list for size in (sizes_from(args, "ratio=0.2") if v != "full" else [None])]
    methods = ["real", "masked"] if setup.method == "both" else [setup.method]
    setups = {m: Setup(**{**asdict(setup), "method": m}) for m in methods}
    total = sum(mc_calls(requests, v, s, setups[m], args) for v, s in runs for m in methods)
    if args.dry_run:
        return [{"calls": total}]
    n_docs = max((len(d) for d in docs_by_task.values()), default=0)
    step = getattr(args, "cell_docs", None) or max(n_docs, 1)  # a cell (sweep.py): a policy and size on docs lo..hi of every task
    in_slice = {(lo, lo + step): [i for i, r in enumerate(requests) if lo <= r.doc < lo + step] for lo in range(0, n_docs, step)}
    part = {sl: [requests[i] for i in rows] for sl, rows in in_slice.items()}

    def compute(cell, bar):
        v, size, sl = cell
        return {m: loglikelihoods(model, part[sl], v, size, setups[m], args, bar).tolist() for m in methods}

    cells = [(v, size, sl) for v, size in runs for sl in in_slice]
    done = sweep.run(args.out, sweep.config_of(args), "mc", cells, compute,
                     lambda c: sum(mc_calls(part[c[2]], c[0], c[1], setups[m], args) for m in methods))
    if done is None:  # another rank of a sweep: rank 0 writes the file
        return None
    results = []
    for v, size in runs:
        lls = {m: np.zeros(len(requests)) for m in methods}
        for sl in in_slice:
            for m in methods:
                lls[m][in_slice[sl]] = done[v, size, sl]["result"][m]
        seconds = sum(done[v, size, sl]["seconds"] for sl in in_slice)
        for task, docs in docs_by_task.items():
            mine = [i for i, r in enumerate(requests) if r.task == task]
            row = dict(task=task, variant=args.variant, policy=v, size=size and dict([size]),
                       method=setup.method, seconds=seconds, **accuracy(docs, per_doc(lls[methods[0]], requests, mine)))
            if setup.method == "both":
                masked = accuracy(docs, per_doc(lls["masked"], requests, mine))
                row.update(acc_masked=masked["acc"], acc_norm_masked=masked["acc_norm"],
                           max_abs_ll_diff=float(np.abs(lls["real"][mine] - lls["masked"][mine]).max()),
                           same_predictions=masked["pred"] == row["pred"] and masked["pred_norm"] == row["pred_norm"])
            results.append(row)
            say(f"{task} {v} {size_label(size)}: acc {row['acc']:.3f} acc_norm {row['acc_norm']:.3f}")
    return results


def run_alpha(model, tok, args, setup: Setup) -> list[dict]:
    """A2SF Fig. 5: a2sf at each alpha (its own split: all budget to scores), beside h2o and h2o_mean
    with their default split (half recent) and full, at one cache ratio."""
    args.policy_list = [f"a2sf@{a:g}" for a in args.alphas] + ["h2o", "h2o_mean", "full"]
    args.task_list = args.task.split(",")
    if not (args.budgets or args.ratios or args.budget or args.ratio):
        args.ratios = [0.3]  # the paper's Fig. 5
    return run_mc(model, tok, args, setup)


# -- mask-sim: A2SF Table 2 -------------------------------------------------------------------------

@torch.no_grad()
def ideal_keys(model, tokens, k: int, gqa: str) -> list[torch.Tensor]:
    """Per layer (B, Hkv, T, k): the k keys with the most attention from each row of a full forward
    (its own row, nothing evicted before; the group's query heads combined as the policies do)."""
    B, T = tokens.shape
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    causal = (pos[:, None, :] <= pos[:, :, None])[:, None].expand(B, model.cfg.n_kv_heads, T, T)  # (B, Hkv, T, T)
    x, out, angles = model.embed(tokens, pos), [], model.angles(pos)
    for block in model.layers:
        attn = block.attn
        q, k_, v = attn.project(block.attn_norm(x))
        q, k_ = attn.rope(q, angles), attn.rope(k_, angles)
        o, probs = attend(q, k_, v, causal, need_probs=True)  # probs (B, Hkv, G, T, T)
        A = aggregate_heads(probs, gqa).masked_fill(~causal, -1.0)  # (B, Hkv, T, T)
        out.append(A.topk(min(k, T), dim=-1).indices)
        x = x + attn.output(o)
        x = x + block.mlp(block.mlp_norm(x))
    return out


@torch.no_grad()
def seen_masks(model, tokens, policy, budget, setup: Setup, tick=lambda n: None):
    """Yield (t, [per layer (B, Hkv, T) bool]) the keys row t attended to, for every row."""
    B, T = tokens.shape
    if setup.method == "masked":
        _, masks = simulate.masked_simulation(model, tokens, policy, budget, chunk=1, positions=setup.positions)
        tick(1)
        for t in range(T):
            yield t, [m[:, :, t] for m in masks]
        return
    if setup.mode != "streaming" or setup.chunk != 1:
        raise ValueError("mask-sim records what each row saw, row by row: use --mode streaming --chunk 1 (or --method masked)")
    cache = make_cache(model, policy, budget, setup, B, T, None)
    step = steady_step(model, cache, setup) if cache.budget is not None else None
    spans = call_spans(policy, budget, setup, T)
    onehot = torch.eye(T, dtype=torch.bool, device=tokens.device)
    for s, e in spans:
        if e - s == 1:  # row s sees what was kept after the previous call, and itself
            yield s, [cache.kept_mask(layer, T) | onehot[s] for layer in range(model.cfg.n_layers)]
        if step is not None and s > 0:
            step(tokens[:, s:e])
        else:
            model(tokens[:, s:e], cache)
        tick(1)


def run_mask_sim(model, tok, args, setup: Setup) -> list[dict] | None:
    """Cosine similarity of each policy's kept set to the ideal one (A2SF Table 2), averaged over
    the rows that evicted (t > budget), layers, KV heads and texts. A cell (sweep.py): one policy
    and size on every text; its result is its row."""
    args.tokens = args.tokens or 512
    texts = ppl_texts(tok, args)
    tokens = torch.tensor(list(texts.values()), device=model.device)
    T = tokens.shape[1]
    runs = [(v, s) for v in args.policy_list for s in sizes_from(args, "ratio=0.2")]

    def calls(cell) -> int:
        v, s = cell
        return 1 if setup.method == "masked" else len(call_spans(make_variant(v, budget_for(s, T), setup.flags),
                                                                 budget_for(s, T), setup, T))

    if args.dry_run:
        return [{"calls": sum(map(calls, runs))}]
    ideals = {}  # budget -> the ideal keys (one full forward), shared by this process's cells

    def compute(cell, bar) -> dict:
        v, size = cell
        budget = budget_for(size, T)
        if budget not in ideals:
            ideals[budget] = ideal_keys(model, tokens, budget + 1, setup.flags.get("gqa") or "sum")
        ideal = ideals[budget]
        policy = make_variant(v, budget, setup.flags)
        per_layer = torch.zeros(model.cfg.n_layers, device=model.device)
        rows = 0
        for t, seen in seen_masks(model, tokens, policy, budget, setup, tick=bar.update):
            if t <= budget:
                continue  # nothing evicted yet: both sets hold every key
            for layer, m in enumerate(seen):  # both sets hold budget + 1 keys: cosine = overlap / (budget + 1)
                per_layer[layer] += m.gather(-1, ideal[layer][:, :, t]).float().mean()  # mean over B, Hkv, keys
            rows += 1
        per_layer = (per_layer / max(rows, 1)).tolist()
        row = dict(policy=v, size=dict([size]), budget=budget, tokens=T, texts=list(texts), rows=rows,
                   cosine=float(np.mean(per_layer)), per_layer=per_layer, policy_fields=asdict(policy))
        say(f"mask-sim {v} budget {budget_label(budget)}: cosine {row['cosine']:.3f}")
        return row

    done = sweep.run(getattr(args, "out", None), sweep.config_of(args), "mask-sim", runs, compute, calls)
    if done is None:  # another rank of a sweep: rank 0 writes the file
        return None
    return [done[c]["result"] for c in runs]


# -- needle: passkey retrieval ----------------------------------------------------------------------

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def needle_prompt(tok, filler: list[int], length: int, depth: float, key: str) -> list[int]:
    """Exactly `length` tokens: intro, essay filler with the needle at `depth` (0 = first, 1 = last), question."""
    intro, needle, question = tok.encode(INTRO), tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION)
    n = length - len(intro) - len(needle) - len(question)
    if n < 0 or n > len(filler):
        raise ValueError(f"--lengths {length}: use lengths from {len(intro) + len(needle) + len(question)} to "
                         f"{len(filler)} tokens")
    at = round(depth * n)
    return intro + filler[:at] + needle + filler[at:n] + question


def run_needle(model, tok, args, setup: Setup) -> list[dict] | None:
    """Passkey retrieval: every key of every depth at one length in one batch. A cell (sweep.py): one
    policy, size and length (all depths and keys); its result is its rows, one per depth."""
    filler = tok.encode("\n\n".join(data.essays().values()))
    rng = random.Random(args.seed)
    trials = args.limit or 2
    runs = [(v, s, L) for v in args.policy_list for s in (sizes_from(args, "budget=128") if v != "full" else [None])
            for L in args.lengths]
    if setup.method != "real":
        raise ValueError("needle decodes through the real cache: use --method real")

    def calls(cell) -> int:
        v, s, L = cell
        return len(call_spans(make_variant(v, budget_for(s, L), setup.flags), budget_for(s, L), setup, L - 1, L - 1,
                              L + args.new_tokens)) + args.new_tokens

    if args.dry_run:
        return [{"calls": sum(map(calls, runs))}]
    keys = {(L, d, i): str(rng.randrange(10000, 100000)) for L in args.lengths for d in args.depths for i in range(trials)}

    def compute(cell, bar) -> list[dict]:
        v, size, L = cell
        cells = [(d, i) for d in args.depths for i in range(trials)]
        prompts = torch.tensor([needle_prompt(tok, filler, L, d, keys[L, d, i]) for d, i in cells], device=model.device)
        budget = budget_for(size, L)
        policy = make_variant(v, budget, setup.flags)
        cache = make_cache(model, policy, budget, setup, len(cells), L + args.new_tokens, None)
        step = steady_step(model, cache, setup)  # the decode steps, and the prompt's one-token calls after the first
        with torch.no_grad():
            for s, e in call_spans(policy, budget, setup, L - 1, L - 1, horizon=L + args.new_tokens):  # all but the last
                if step is not None and s > 0 and e - s == 1:
                    step(prompts[:, s:e])
                else:
                    model(prompts[:, s:e], cache)
                bar.update()
        new, _ = generate.generate(model, prompts[:, -1:], cache, args.new_tokens, step=step)
        bar.update(args.new_tokens)
        answers = [tok.decode(row) for row in new.tolist()]
        rows = []
        for d in args.depths:
            got = [keys[L, d, i] in answers[j] for j, (dd, i) in enumerate(cells) if dd == d]
            rows.append(dict(policy=v, size=size and dict([size]), budget=budget, length=L,
                             depth=d, success=sum(got) / len(got), n=len(got),
                             answers=[a for a, (dd, _) in zip(answers, cells) if dd == d]))
        say(f"needle {v} budget {budget_label(budget)} length {L}: "
            + " ".join(f"{r['depth']:g}:{r['success']:.2f}" for r in rows))
        return rows

    done = sweep.run(getattr(args, "out", None), sweep.config_of(args), "needle", runs, compute, calls)
    if done is None:  # another rank of a sweep: rank 0 writes the file
        return None
    return [row for c in runs for row in done[c]["result"]]


# -- results files and plots ------------------------------------------------------------------------

PAPERS = {  # what the papers report, to set ours beside (policies.md)
    "ppl": "StreamingLLM Tab. 2 (Llama-2-7B, 400K tokens): window 3359.95, 1 sink 11.88, 4 sinks 9.59",
    "mc": "A2SF Tab. 1 (LLaMA-2-7B, ratio 0.2, 0-shot avg): full .589, local .362, H2O .399, A2SF .450",
    "alpha": "A2SF Fig. 5 (ratio 0.3): accuracy peaks for alpha in 0.1-0.3; even alpha = 0 beats H2O",
    "mask-sim": "A2SF Tab. 2: Local .318, H2O .967, A2SF .991",
    "needle": "",
}


def save(kind: str, args, results: list[dict], seconds: float, extra: dict) -> Path:
    config = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, list, type(None)))}
    record = dict(kind=kind, created=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=seconds, paper=PAPERS.get(kind, ""),
                  config=config, **extra, results=results)
    out = Path(args.out) if args.out else RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    return out


def _label(row: dict) -> str:
    size = row.get("size")
    return row["policy"] if not size else f"{row['policy']} {next(iter(size))}={next(iter(size.values())):g}"


def plot_ppl(plt, rows, metric):
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}) or [None]
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for r in rows:
            if r["budget"] in (b, None):
                ax.plot(r["window_end"], r["window_ppl"], ("k.--" if r["budget"] is None else ".-"),
                        label=f"{r['policy']} ({r['ppl']:.1f})")
        ax.set(yscale="log", xlabel="tokens", ylabel=f"ppl per {rows[0]['window']}-token window", title=f"budget {b}")
        ax.legend(fontsize=8)
    return fig


def plot_mc(plt, rows, metric):
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        xs = [next(iter(r["size"].values())) for r in mine if r["size"]] or [0]
        dodge = 0.012 * ((max(xs) - min(xs)) or max(xs) or 1)  # policies side by side at one ratio
        policies_ = list(dict.fromkeys(r["policy"] for r in mine))
        for i, policy in enumerate(policies_):
            pts = sorted((next(iter(r["size"].values())) + dodge * (i - len(policies_) / 2), r[metric], r[metric + "_stderr"])
                         for r in mine if r["policy"] == policy and r["size"])
            full = [r for r in mine if r["policy"] == policy and not r["size"]]
            if pts:
                ax.errorbar(*zip(*pts), marker="o", capsize=3, label=policy)
            for r in full:
                ax.axhline(r[metric], color="k", ls="--", label=f"{policy} (no eviction)")
                ax.axhspan(r[metric] - r[metric + "_stderr"], r[metric] + r[metric + "_stderr"], color="k", alpha=0.08)
        ax.set(xlabel="cache ratio" if "ratio" in str(mine[0].get("size") or {"ratio": 0}) else "budget", ylabel=metric,
               title=f"{task} ({mine[0]['variant']}, n={mine[0]['n_docs']})")
        ax.legend(fontsize=7)
    return fig


def plot_alpha(plt, rows, metric):
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        pts = sorted((parse_variant(r["policy"])[2], r[metric], r[metric + "_stderr"]) for r in mine if "@" in r["policy"])
        ax.errorbar(*zip(*pts), marker="o", capsize=3, label="a2sf")
        for r, color in zip([r for r in mine if "@" not in r["policy"]], ["C1", "C2", "k", "C3"]):
            ax.axhline(r[metric], color=color, ls="--", label=f"{r['policy']} {r[metric]:.3f}")
        r0 = next(r for r in mine if r["size"])
        ax.set(xlabel="alpha (forgetting factor)", ylabel=metric,
               title=f"{task} {r0['variant']}, {r0['size']}, n={r0['n_docs']}")
        ax.legend(fontsize=8)
    return fig


def plot_mask_sim(plt, rows, metric):
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 4))
    ax.bar([_label(r) for r in rows], [r["cosine"] for r in rows])
    for i, r in enumerate(rows):
        ax.text(i, r["cosine"], f"{r['cosine']:.3f}", ha="center", va="bottom")
    ax.set(ylim=(0, 1.05), ylabel="cosine to the ideal mask", title=f"{rows[0]['tokens']} tokens x {len(rows[0]['texts'])}")
    ax.tick_params(axis="x", labelrotation=30)
    return fig


def plot_needle(plt, rows, metric):
    cells = list(dict.fromkeys((r["policy"], r["budget"]) for r in rows))
    lengths, depths = sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 3.4), squeeze=False)
    for ax, (policy, budget) in zip(axes[0], cells):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in rows:
            if (r["policy"], r["budget"]) == (policy, budget):
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["success"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set(xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)), yticklabels=depths,
               xlabel="length", ylabel="depth", title=f"{policy} {budget or ''}")
        for (i, j), x in np.ndenumerate(grid):
            ax.text(j, i, f"{x:.1f}", ha="center", va="center", fontsize=8)
    return fig


PLOTS = {"ppl": plot_ppl, "mc": plot_mc, "alpha": plot_alpha, "mask-sim": plot_mask_sim, "needle": plot_needle}


def plot_file(paths, metric: str = "acc", out: Path | None = None) -> Path:
    """One PNG of the rows of results files of one kind (default: beside the first file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    records = [json.loads(gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_text()) for p in paths]
    kinds = {r["kind"] for r in records}
    if len(kinds) > 1:
        raise ValueError(f"cannot plot results of kinds {', '.join(sorted(kinds))} in one figure: give one kind")
    kind = kinds.pop()
    plot = PLOTS[kind] if kind in PLOTS else more_commands()[kind].plot
    fig = plot(plt, [row for r in records for row in r["results"]], metric)
    title = f"{records[0]['model']}; paper: {PAPERS[kind]}" if PAPERS.get(kind) else records[0]["model"]
    fig.suptitle("\n".join(textwrap.wrap(title, int(12 * fig.get_figwidth()))), fontsize=8)
    fig.tight_layout()
    out = out or paths[0].with_name(paths[0].name.removesuffix(".gz")).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- the command line -------------------------------------------------------------------------------

def _list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def more_commands() -> dict:
    """Subcommands that live in files of their own (they import this one): kind -> module with
    add_command(add) and plot(plt, rows, metric)."""
    import keepmap
    import lm_eval_model
    import ruler

    return {"keep-map": keepmap, "ruler": ruler, "lm-eval": lm_eval_model}


def parser() -> argparse.ArgumentParser:
    lines = __doc__.split("\n\n")  # the first paragraph, whole, then the examples
    p = generate.OneLineParser(description=lines[0].replace("\n", " "), epilog="examples:\n" + lines[1],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = generate.OneLineParser(add_help=False)
    generate.add_policy_args(common)
    common.set_defaults(policy=None, mode="streaming")  # the papers' setting (generate.py defaults to prefill)
    common.add_argument("--policies", type=_list(str), help="comma-separated policies (with +sink, @ALPHA)")
    common.add_argument("--budgets", type=_list(int), help="comma-separated budgets in tokens")
    common.add_argument("--ratios", type=_list(float), help="comma-separated cache ratios")
    common.add_argument("--method", default="real", choices=["real", "masked", "both"],
                        help="real: the evicting cache; masked: simulate.masked_simulation; both: compare them")
    common.add_argument("--limit", type=int, default=None,
                        help="docs per task (mc), texts (ppl, mask-sim), keys per cell (needle)")
    common.add_argument("--batch-size", type=int, default=None, help="sequences per batch (mc default 64; ppl: all texts)")
    common.add_argument("--max-batch-tokens", type=int, default=32768, help="batch size x length at most (memory)")
    common.add_argument("--compile", action="store_true", help="steady calls through fast.compile_decode")
    common.add_argument("--graph", action="store_true",
                        help="steady calls replayed as a CUDA graph of the eager step (fast.graph_decode; no compile);"
                        " the default on CUDA with the fast path")
    common.add_argument("--no-graph", action="store_true", help="steady calls eager, one model call each (on CUDA too)")
    common.add_argument("--reference", action="store_true",
                        help="the plain reference path (model.py, cache.py) without the fast/ twins")
    common.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    common.add_argument("--dtype", choices=generate.DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    common.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--json", action="store_true", help="print the results file on stdout")
    common.add_argument("--out", default=None, help="results file (default results/KIND-TIME.json)")
    common.add_argument("--dry-run", action="store_true", help="count the model calls, run nothing")

    def add(name, func, help, **defaults):
        s = sub.add_parser(name, parents=[common], help=help, description=help)
        s.set_defaults(func=func, **defaults)
        return s

    s = add("ppl", run_ppl, "streaming perplexity of long texts", default_policies="full,window,sink,h2o,a2sf")
    s.add_argument("--text", default=None, help="a text file (default: the first --limit Shakespeare texts)")
    s.add_argument("--tokens", type=int, default=1024, help="first N tokens of each text")
    s.add_argument("--window", type=int, default=256, help="perplexity per window of this many tokens")
    s = add("mc", run_mc, "multiple-choice accuracy (lm-eval style)", default_policies="full,window,h2o,a2sf")
    s.add_argument("--tasks", dest="task_list", type=_list(str), default=["arc_easy"], help=", ".join(data.MC_TASKS))
    s.add_argument("--variant", default="rc_0shot", help="rc_0shot, rc_5shot, ...")
    s.add_argument("--cell-docs", type=int, default=None,
                   help="documents of each task per work cell (default all): finer resume and sharding (sweep.py)")
    s = add("alpha", run_alpha, "A2SF's alpha sweep against H2O and H2O-mean", default_policies="")
    s.add_argument("--task", default="piqa", help="a task, or comma-separated tasks (one panel each)")
    s.add_argument("--variant", default="rc_0shot")
    s.add_argument("--alphas", type=_list(float), default=[round(0.1 * i, 1) for i in range(11)])
    s = add("mask-sim", run_mask_sim, "cosine of kept masks to the ideal mask (A2SF Table 2)",
            default_policies="window,h2o,a2sf")
    s.add_argument("--text", default=None)
    s.add_argument("--tokens", type=int, default=512)
    s = add("needle", run_needle, "passkey retrieval in essay filler", default_policies="full,window,sink,h2o,a2sf")
    s.add_argument("--lengths", type=_list(int), default=[512, 1024, 2048, 4096])
    s.add_argument("--depths", type=_list(float), default=[0.0, 0.25, 0.5, 0.75, 1.0])
    s.add_argument("--new-tokens", type=int, default=8)
    for module in more_commands().values():  # keep-map, ruler, lm-eval: subcommands in files of their own
        module.add_command(add)
    s = sub.add_parser("plot", help="PNGs from results files")
    s.add_argument("files", nargs="+")
    s.add_argument("--metric", default="acc", choices=["acc", "acc_norm"])
    s.add_argument("--merge", default=None, metavar="PNG", help="one figure of all the files' rows (one kind)")
    s.set_defaults(func=None)
    s = add("suite", None, "the GPU plan in one process (results/suite-TIME/)", default_policies="")
    s.add_argument("--stages", type=_list(str), default=list(SUITE))
    s.add_argument("--set", action="append", default=[], metavar="STAGE=ARGS",
                   help='extra flags for a stage: --set "mc=--limit 50"')
    s.add_argument("--time-budget", type=float, default=420,
                   help="seconds after the model load; a stage that would not fit is skipped")
    s.add_argument("--ms-per-call", type=float, default=30, help="first guess, replaced by what the stages measure")
    return p


ALL_TASKS = ",".join(data.MC_TASKS)
PAPER_POLICIES = "full,window,sink,h2o,h2o+sink,h2o_mean,a2sf,vatp,tova,snapkv"
SUITE = {  # stage -> command line, in order of priority: the GPU plan (README "Results"). `suite --dry-run` counts
    # the calls, --set changes any size. Accuracy runs batch thousands of requests, each with its own budget
    # (cache.KVCache), and replay their steady calls as CUDA graphs (--graph: nothing to compile).
    "check": "mc --tasks copa --limit 10 --ratios 0.2 --policies h2o,a2sf --method both --dtype float32",
    "mc": f"mc --tasks {ALL_TASKS} --limit 200 --ratios 0.1,0.2,0.3,0.5,0.7 --policies {PAPER_POLICIES} "
          "--batch-size 2048 --max-batch-tokens 100000 --graph",
    "alpha": "alpha --task piqa,arc_easy,openbookqa,winogrande --limit 200 --ratio 0.2 "
             "--alphas 0,0.1,0.2,0.3,0.5,0.7,0.9,1 --batch-size 2048 --max-batch-tokens 100000 --graph",
    "ppl": "ppl --policies full,window,sink,h2o,a2sf,tova --budgets 64,256,1024 --tokens 8192 --limit 4 --chunk 16 --graph",
    "long": "ppl --policies window,sink,a2sf --budgets 1024 --tokens 20000 --positions slot --limit 1 --window 1000 "
            "--chunk 16 --graph",
    "fewshot": f"mc --variant rc_5shot --tasks {ALL_TASKS} --limit 50 --ratios 0.2 --policies full,window,h2o,a2sf "
               "--batch-size 1024 --max-batch-tokens 100000 --graph",
    "needle": "needle --policies full,window,sink,h2o,a2sf,snapkv --budgets 128,512 --lengths 1024,2048,4096 --limit 4 "
              "--mode prefill",
    "ppl1": "ppl --policies window,sink,h2o,a2sf --budgets 256 --tokens 4096 --limit 4 --graph",
    "mask-sim": "mask-sim --policies window,sink,h2o,a2sf,tova,vatp --ratio 0.2 --tokens 512 --limit 2 --graph",
}


def run(args, model=None, tok=None):
    """Run one subcommand; returns the path of its results file (or, for plot, the PNGs)."""
    if args.command == "plot":
        if args.merge:
            return [plot_file(args.files, args.metric, Path(args.merge))]
        return [plot_file(f, args.metric) for f in args.files]
    for flag, least in (("tokens", 2), ("window", 1), ("batch_size", 1), ("chunk", 1)):  # before the slow part
        value = getattr(args, flag, None)
        if value is not None and value < least:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: use a number >= {least}")
    if getattr(args, "graph", False) and getattr(args, "no_graph", False):
        raise ValueError("--graph and --no-graph: give one of them")
    args.policy_list = args.policies or ([args.policy] if args.policy else _list(str)(args.default_policies))
    sweep.init()  # under torchrun: the ranks share each command's cells (sweep.py)
    if not args.out and not args.dry_run:  # one name for every rank: rank 0's time
        stamp = sweep.shared(time.strftime("%Y%m%d-%H%M%S"))
        args.out = str(RESULTS / (f"suite-{stamp}" if args.command == "suite" else f"{args.command}-{stamp}.json"))
    for v in args.policy_list:
        parse_variant(v)  # one-line errors before the slow load
    if args.mode == "prefill" and args.command in ("ppl", "mask-sim"):
        raise ValueError(f"{args.command} streams a text: use --mode streaming")
    if args.command in ("mc", "alpha"):
        for t in args.task_list if args.command == "mc" else args.task.split(","):
            if t not in data.MC_TASKS:
                raise ValueError(f"unknown task {t!r}: use one of {', '.join(data.MC_TASKS)}")
        args.batch_size = args.batch_size or 64
    device = generate.pick_device(args.device) if model is None else model.device
    if model is not None and args.dtype and generate.DTYPES[args.dtype] != model.dtype:
        model = copy.deepcopy(model).to(generate.DTYPES[args.dtype])  # a stage of the suite in another dtype
    if model is None:
        from load_weights import load

        dtype = generate.DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
        model, tok = load(args.model, device=device, dtype=dtype)
        if tok is None:
            raise ValueError(f"{args.model} has no tokenizer (tokenizer.json or tokenizer.model): add one beside it")
        if not args.reference:  # the speed twins (fast/): the same tokens kept, the same log-likelihoods
            model = fast.enable(model)
    if (args.compile or args.graph) and not isinstance(model, fast.model.Transformer):
        if args.reference:
            raise ValueError("--compile and --graph run the fast path: drop --reference")
        model = fast.enable(copy.deepcopy(model))  # a caller's reference model stays as it is
    if args.command == "suite":
        return run_suite(args, model, tok)
    setup = Setup(mode=args.mode, chunk=args.chunk, positions=args.positions, method=args.method, compile=args.compile,
                  graph=wants_graph(args, model),
                  flags=dict(alpha=args.alpha, n_sink=args.n_sink, recent=args.recent, gqa=args.gqa))
    t0 = time.perf_counter()
    results = args.func(model, tok, args, setup)
    if args.dry_run:
        return results[0]["calls"]
    if results is None:  # another rank of a sweep: rank 0 writes the file
        return None
    return save(args.command, args, results, time.perf_counter() - t0,
                dict(model=args.model or "SmolLM2-135M-Instruct (default)", device=str(model.device), dtype=str(model.dtype)))


def run_suite(args, model, tok):
    """The stages one after another in this process (one model load), each its own results file,
    then the plots; returns summary.json (its calls, seconds and files). Before a stage runs, its
    model calls are counted; a stage that would overrun --time-budget at the seconds per call
    measured so far is skipped (and said so). A dry run returns the number of calls."""
    folder = Path(args.out) if args.out else RESULTS / f"suite-{time.strftime('%Y%m%d-%H%M%S')}"
    extra = {}
    for item in args.set:
        stage, _, flags = item.partition("=")
        extra[stage] = extra.get(stage, []) + shlex.split(flags)
    common = [f for k in ("device", "dtype", "model") if getattr(args, k) for f in (f"--{k}", getattr(args, k))]
    t_start, summary = time.perf_counter(), []
    spent, timed = 0.0, [0.0, 0]  # seconds (estimated in a dry run); seconds and calls of the timed stages
    for stage in args.stages:
        if stage not in SUITE:
            raise ValueError(f"unknown stage {stage!r}: use {', '.join(SUITE)}")
        argv = shlex.split(SUITE[stage]) + extra.get(stage, []) + common + ["--out", str(folder / f"{stage}.json")]
        calls = run(parser().parse_args(argv + ["--dry-run"]), model, tok)
        ms = 1000 * timed[0] / timed[1] if timed[1] else args.ms_per_call
        estimate, left = calls * ms / 1000, args.time_budget - spent
        line = dict(stage=stage, argv=argv, calls=calls, estimate_s=round(estimate, 1))
        print(f"suite: {stage}: {calls} calls, ~{estimate:.0f} s at {ms:.0f} ms/call ({left:.0f} s left)", file=sys.stderr)
        if sweep.shared(estimate > left):  # rank 0's measure decides for every rank
            print(f"suite: {stage} skipped: it would overrun --time-budget", file=sys.stderr)
            summary.append({**line, "skipped": True})
            continue
        if args.dry_run:
            spent += estimate
            summary.append(line)
            continue
        t0 = time.perf_counter()
        path = run(parser().parse_args(argv), model, tok)
        seconds = time.perf_counter() - t0
        spent = time.perf_counter() - t_start
        if "--method" not in argv and argv[0] != "mask-sim":  # masked runs cost far more per call: not a rate for others
            timed = [timed[0] + seconds, timed[1] + calls]
        if path is None:  # another rank of a sweep: rank 0 plots and sums up
            continue
        summary.append({**line, "seconds": round(seconds, 1), "ms_per_call": round(1000 * seconds / max(calls, 1), 1),
                        "file": str(path), "png": str(plot_file(path))})
    if args.dry_run:
        print(f"suite: ~{spent:.0f} s", file=sys.stderr)
        return sum(s["calls"] for s in summary if not s.get("skipped"))
    if not sweep.is_main():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    accuracy_files = [folder / f"{s}.json" for s in ("mc", "ratios") if (folder / f"{s}.json").exists()]
    if len(accuracy_files) > 1:  # accuracy against the cache ratio: the main stage's 0.2 with the sweep's others
        plot_file(accuracy_files, out=folder / "accuracy.png")
    out = folder / "summary.json"
    out.write_text(json.dumps(dict(created=time.strftime("%Y-%m-%d %H:%M:%S"), device=str(model.device),
                                   seconds=time.perf_counter() - t_start, stages=summary), indent=1))
    return out


def main(argv=None, model=None, tok=None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad flag (already said in one line)
        return int(exit_.code or 0)
    try:
        out = run(args, model, tok)
    except (ValueError, FileNotFoundError) as e:  # LoadError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out is None:  # another rank of a sweep: rank 0 wrote the file
        return 0
    if args.command == "plot" or args.dry_run:
        print(*out, sep="\n") if args.command == "plot" else print(f"{out} model calls")
    elif args.json:
        print(Path(out).read_text())
    else:
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
