"""Soak: stream a long text through an evicting cache and watch memory, numerics and speed.

    python soak.py --policies sink,a2sf --budget 1024 --tokens 1000000 --chunk 64 --positions slot \\
        --device cuda --dtype bfloat16 --out results/soak_h100.json
    python soak.py --weights random --preset tiny-llama --tokens 4000 --every 1000 --budget 64 --chunk 8

The text (teacher forcing: it is the input, so the model's loss on it comes for free) is the
Shakespeare texts of data.shakespeare_texts() joined and tokenized once, no BOS, or --text FILE,
repeated cyclically until --tokens are fed. It goes in streaming mode, --chunk tokens per call; the
cache evicts down to --budget after each call (KVCache(..., mode="streaming", chunk=C)), so its
storage is budget + C slots per layer and KV head from the first call to the last. With slot
positions (StreamingLLM Sec. 3.2) the keys are rotated by their rank in the cache, so the stream
runs far past the model's context.

The model and cache run on the fast path (fast.enable, fast.KVCache; --reference for the plain
one). The calls run eagerly until the cache is full, then (--compile, the default on CUDA) through
fast.compile_decode: one compiled Block.forward and, on CUDA, the whole call as one CUDA graph.
Nothing inside the loop syncs with the host: the sum of the next-token NLL, the count of
non-finite logits and (scored policies) of non-finite scores accumulate on the device and are read
at the checkpoints only: 10,000 tokens (--at), every --every tokens and the end, each rounded up to
a whole call. A checkpoint row: tokens fed, tokens/s since the last row, peak and current memory
(CUDA: max_memory_allocated / memory_allocated; CPU: the process's peak and current RSS), the
interval's perplexity, non-finite counts, and the most tokens any layer's KV head holds.

One JSON file (--out) holds the whole configuration and the rows; it is rewritten after every row,
so a killed run keeps what it measured. Exit code 1 when any non-finite value was seen (or a head
held more than its budget), 2 on bad input (one line, "error: ...").
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import fast
import generate
import model as model_mod
from cache import KVCache
from generate import DTYPES, OneLineParser, pick_device
from policies import POLICY_NAMES, make_policy

FIRST_CHECKPOINT = 10_000  # the issue asks for memory at 10k, 100k and 1M tokens
GRAPH_WARMUP = 2  # CudaGraphStep's compiled calls before it captures the graph (fast.compile_decode's default)


# -- the token stream ------------------------------------------------------------------------------

def byte_ids(text: str, vocab: int) -> list[int]:
    """A stand-in tokenizer for random weights: one token per UTF-8 byte, mod the vocabulary."""
    return [b % vocab for b in text.encode("utf-8")]


def stream_text(args) -> tuple[str, str]:
    """(text, where it came from): --text FILE, or every Shakespeare text joined by blank lines."""
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise ValueError(f"--text {args.text}: no such file; give a UTF-8 text file")
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    import data

    texts = data.shakespeare_texts()
    return "\n\n".join(texts.values()), f"shakespeare: {len(texts)} texts joined"


def cyclic(ids: list[int], chunk: int, device) -> torch.Tensor:
    """The stream as one device tensor (L + chunk + 1,): the text, then its start again, so every
    call's inputs ids[s:s+C] and targets ids[s+1:s+C+1] (s = k*C mod L) are one slice, no copy."""
    L = len(ids)
    reps = -(-(L + chunk + 1) // L)
    return torch.tensor((ids * reps)[:L + chunk + 1], dtype=torch.long, device=device)


def checkpoints(tokens: int, every: int, at: list[int], chunk: int) -> list[int]:
    """sorted({at} | multiples of every | {tokens}), clipped to tokens, each rounded up to a whole
    call of `chunk` tokens (a call's shape never changes, so a row can only come between calls)."""
    wanted = {t for t in at if 0 < t <= tokens} | set(range(every, tokens + 1, every)) | {tokens}
    return sorted({-(-t // chunk) * chunk for t in wanted})


# -- device-side meters, read at checkpoints only --------------------------------------------------

class Meter:
    """Running sums on the device: NLL (float64), non-finite logits and scores (int64). add() makes
    no host sync; read() does (at checkpoints)."""

    def __init__(self, device, scored: bool):
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_logits = torch.zeros((), dtype=torch.long, device=device)
        self.bad_scores = torch.zeros((), dtype=torch.long, device=device)
        self.scored = scored

    def add(self, logits: torch.Tensor, targets: torch.Tensor, cache) -> None:
        """logits (1, C, V) of one call, targets (C,) the tokens that come next."""
        x = logits[0].float()  # (C, V)
        picked = x.gather(-1, targets[:, None])[:, 0]  # (C,)
        self.nll += (x.logsumexp(-1) - picked).sum()  # -log p(next token), summed over the call
        self.bad_logits += x.isfinite().logical_not().sum()
        if self.scored:  # one stack, not one check per layer: a few kernels per call whatever the depth
            self.bad_scores += torch.stack([lc.state["score"] for lc in cache.layers]).isfinite().logical_not().sum()

    def read(self) -> tuple[float, int, int]:
        return float(self.nll), int(self.bad_logits), int(self.bad_scores)


def memory_mb(device) -> tuple[float, float]:
    """(peak so far, now) in MB: CUDA's allocator on a GPU; the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    try:
        now = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        now = float("nan")
    return peak, now


def perplexity(nll_mean: float) -> float:
    return math.exp(min(nll_mean, 700.0)) if math.isfinite(nll_mean) else float("nan")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one policy's soak -----------------------------------------------------------------------------

def cache_args(args, name: str) -> argparse.Namespace:
    """The flags generate.cache_from_args reads, for one policy of the sweep."""
    return argparse.Namespace(policy=name, budget=args.budget, ratio=None, alpha=args.alpha, n_sink=args.n_sink,
                              recent=args.recent, mode="streaming", chunk=args.chunk, positions=args.positions, gqa=args.gqa)


def full_and_evicting(cache) -> bool:
    """True once the cache is full: from then on every call sees the same host-side state
    (KVCache.positions: held = budget, capacity = budget + chunk), so a compiled step, and a CUDA
    graph that replays it without running its Python side, serves every later call."""
    return cache.held == cache.budget


@torch.no_grad()
def soak(model, stream: torch.Tensor, name: str, args, device, on_row=lambda row: None, bar=None) -> dict:
    """Feed args.tokens tokens of the cyclic stream through a fresh cache for policy `name`.
    -> {policy, budget, ..., rows: [one per checkpoint], summary}."""
    torch._dynamo.reset()  # a fresh compile per policy (bench.py does the same per row)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start_peak, start_now = memory_mb(device)
    cache = generate.cache_from_args(cache_args(args, name), model.cfg, args.tokens, device=device, dtype=model.dtype,
                                     cache_class=fast.KVCache if isinstance(model, fast.model.Transformer) else KVCache)
    C, L = args.chunk, stream.shape[0] - args.chunk - 1
    capacity = cache.capacity  # budget + C slots from the first call: the shapes never change
    if capacity != cache.budget + C:
        raise RuntimeError(f"streaming cache capacity {capacity} is not budget + chunk = {cache.budget + C}")
    marks = checkpoints(args.tokens, args.every, args.at, C)
    mark_set = set(marks)
    meter = Meter(device, cache.policy.scored)
    compiled = args.compile
    step, eager_calls, warm_calls = None, 0, None  # warm_calls: calls until the compiled step runs steady
    rows, last = [], dict(tokens=0, nll=0.0, bad_logits=0, bad_scores=0)
    warmup, fed = None, 0
    sync(device)
    t_start = time.perf_counter()
    clock, clock_tokens = t_start, 0  # tok/s is timed from here: the last row, or the end of the warm-up
    for k in range(marks[-1] // C):
        s = k * C % L
        x = stream[None, s:s + C]  # (1, C) inputs; their targets are stream[s + 1:s + C + 1]
        if step is None and compiled and full_and_evicting(cache):
            # From here on every call is the steady one (the eager calls before filled the cache and
            # flipped its `fresh` and `evicting` flags): compile it, and on CUDA capture it as a graph.
            step = fast.compile_decode(model, cache, backend=args.backend)
            eager_calls = k
            warm_calls = k + (GRAPH_WARMUP + 1 if device.type == "cuda" else 1)  # compile (+ capture) happen in these
        logits = step(x) if step is not None else model(x, cache)  # (1, C, V)
        meter.add(logits, stream[s + 1:s + C + 1], cache)
        fed += C
        if bar is not None:
            bar.update(C)
        if fed in mark_set:  # a checkpoint: the only host syncs of the loop
            sync(device)
            now = time.perf_counter()
            nll, bad_logits, bad_scores = meter.read()
            peak, current = memory_mb(device)
            n, nll_mean = fed - last["tokens"], (nll - last["nll"]) / (fed - last["tokens"])
            row = dict(tokens=fed, interval_tokens=n, timed_tokens=fed - clock_tokens, seconds=now - clock,
                       tok_s=(fed - clock_tokens) / max(now - clock, 1e-9), warmup_in_interval=warmup is None,
                       peak_mb=peak, allocated_mb=current, nll=nll_mean, ppl=perplexity(nll_mean),
                       nonfinite_logits=bad_logits - last["bad_logits"],
                       nonfinite_scores=bad_scores - last["bad_scores"] if meter.scored else None,
                       held=int(cache.tokens_held().max()))
            rows.append(row)
            last = dict(tokens=fed, nll=nll, bad_logits=bad_logits, bad_scores=bad_scores)
            on_row(row)
            sync(device)
            clock, clock_tokens = time.perf_counter(), fed
        if warmup is None and (k + 1 == warm_calls or (not compiled and full_and_evicting(cache))):
            sync(device)  # once, at the end of the warm-up: later rows time steady calls only
            clock, clock_tokens = time.perf_counter(), fed
            warmup = dict(tokens=fed, calls=k + 1, eager_calls=eager_calls if compiled else k + 1,
                          seconds=clock - t_start)
    nll, bad_logits, bad_scores = meter.read()
    steady = [r["tok_s"] for r in rows if not r["warmup_in_interval"]]
    summary = dict(tokens=fed, seconds=time.perf_counter() - t_start, nll_sum=nll, ppl=perplexity(nll / fed),
                   nonfinite_logits=bad_logits,
                   nonfinite_scores=bad_scores if cache.policy.scored else None,
                   peak_growth_mb=rows[-1]["peak_mb"] - rows[0]["peak_mb"],
                   allocated_growth_mb=rows[-1]["allocated_mb"] - rows[0]["allocated_mb"],
                   tok_s_min=min(steady, default=float("nan")), tok_s_max=max(steady, default=float("nan")),
                   held_max=max(r["held"] for r in rows), over_budget=any(r["held"] > cache.budget for r in rows))
    result = dict(policy=name, budget=cache.budget, chunk=C, positions=args.positions, compiled=compiled and step is not None,
                  cuda_graph=isinstance(step, fast.CudaGraphStep), warmup=warmup, kv_bytes=cache.nbytes(),
                  start_peak_mb=start_peak, start_allocated_mb=start_now, policy_fields=asdict(cache.policy),
                  rows=rows, summary=summary)
    del step, cache
    return result


# -- the table ------------------------------------------------------------------------------------

HEADER = ("tokens", "tok/s", "peak MB", "alloc MB", "ppl", "non-finite (logits / scores)", "held")


def table_head(result_or_name: str, args) -> str:
    return (f"\n### {result_or_name}: budget {args.budget}, chunk {args.chunk}, {args.positions} positions\n\n"
            "| " + " | ".join(HEADER) + " |\n|" + "---:|" * len(HEADER))


def table_row(row: dict) -> str:
    scores = "-" if row["nonfinite_scores"] is None else f"{row['nonfinite_scores']:,}"
    tok_s = f"{row['tok_s']:,.0f}" + (" (warm-up)" if row["warmup_in_interval"] else "")
    cells = (f"{row['tokens']:,}", tok_s, f"{row['peak_mb']:,.1f}", f"{row['allocated_mb']:,.1f}", f"{row['ppl']:.2f}",
             f"{row['nonfinite_logits']:,} / {scores}", f"{row['held']:,}")
    return "| " + " | ".join(cells) + " |"


def summary_line(r: dict) -> str:
    s = r["summary"]
    bad = s["nonfinite_logits"] + (s["nonfinite_scores"] or 0)
    return (f"{r['policy']}: {s['tokens']:,} tokens in {s['seconds']:.0f} s; peak {r['rows'][0]['peak_mb']:,.1f} -> "
            f"{r['rows'][-1]['peak_mb']:,.1f} MB ({s['peak_growth_mb']:+.1f}); steady tok/s {s['tok_s_min']:,.0f} to "
            f"{s['tok_s_max']:,.0f}; ppl {s['ppl']:.2f}; {'no' if not bad else f'{bad:,}'} non-finite values; "
            f"held <= {s['held_max']:,} (budget {r['budget']:,})")


# -- the command line -----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="sink,a2sf", help=f"comma list of {', '.join(n for n in POLICY_NAMES if n != 'full')}")
    p.add_argument("--budget", type=int, default=1024, help="tokens kept per layer and KV head")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens to stream (rounded up to whole calls)")
    p.add_argument("--chunk", type=int, default=64, help="tokens per call; the cache evicts after each")
    p.add_argument("--positions", default="slot", choices=("slot", "original"),
                   help="slot: keys rotated by their rank in the cache (past the context); original: text positions")
    p.add_argument("--every", type=int, default=100_000, help="a checkpoint row every this many tokens")
    p.add_argument("--at", default=str(FIRST_CHECKPOINT), help="more checkpoints, a comma list of token counts")
    p.add_argument("--alpha", type=float, default=None, help="forgetting factor (a2sf; default 0.2)")
    p.add_argument("--n-sink", type=int, default=None, help="first tokens never evicted")
    p.add_argument("--recent", type=int, default=None, help="latest tokens never evicted")
    p.add_argument("--gqa", default="sum", help="sum or max over the query heads of a group")
    p.add_argument("--text", default=None, help="a UTF-8 text file to stream (default: the Shakespeare texts)")
    p.add_argument("--model", default=None, help="a .gguf, a Hugging Face or a Meta directory (default: SmolLM2-135M)")
    p.add_argument("--weights", default="checkpoint", choices=("checkpoint", "random"),
                   help="random: seeded random weights of --preset, a byte tokenizer (no download)")
    p.add_argument("--preset", default="smollm2-135m", help=f"with --weights random: one of {', '.join(model_mod.PRESETS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled steady calls, a CUDA graph on a GPU (default: on with CUDA)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor on CUDA, aot_eager on the CPU)")
    p.add_argument("--reference", action="store_true", help="the plain reference path (model.py, cache.py), no fast/")
    p.add_argument("--out", default="results/soak.json")
    p.add_argument("--json", action="store_true", help="print the JSON to stdout (the tables go to stderr)")
    return p


def check_args(args) -> None:
    """Every check that needs no model, before the (slow) load."""
    args.policy_list = [n for n in args.policies.split(",") if n]
    if not args.policy_list:
        raise ValueError("--policies is empty: give one or more of " + ", ".join(POLICY_NAMES))
    for flag, least in (("tokens", 1), ("chunk", 1), ("every", 1)):
        if getattr(args, flag) < least:
            raise ValueError(f"--{flag} {getattr(args, flag)}: use a number >= {least}")
    if args.budget < 1:
        raise ValueError(f"--budget {args.budget}: use a number of tokens >= 1")
    try:
        args.at = [int(t) for t in args.at.split(",") if t.strip()] if isinstance(args.at, str) else list(args.at)
    except ValueError:
        raise ValueError(f"--at {args.at!r}: give token counts separated by commas (e.g. 10000,50000)") from None
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha {args.alpha} is outside [0, 1]: use a forgetting factor between 0 and 1")
    for name in args.policy_list:
        if name == "full":
            raise ValueError("policy full keeps every token: a soak needs a budget; choose among "
                             + ", ".join(n for n in POLICY_NAMES if n != "full"))
        if name not in POLICY_NAMES:
            raise ValueError(f"unknown policy {name!r}: choose one of {', '.join(POLICY_NAMES)}")
        try:
            make_policy(name, args.budget, alpha=args.alpha, n_sink=args.n_sink, recent=args.recent, gqa=args.gqa)
        except ValueError as e:  # say which policy of the sweep (policies.check's line names none)
            raise ValueError(f"policy {name} at --budget {args.budget}: {e}") from None
    if args.weights == "random":
        if args.model:
            raise ValueError("give --model or --weights random, not both")
        model_mod.preset(args.preset)  # unknown preset: one line


def check_context(args, cfg) -> None:
    """The stream against the model's context (max_seq_len)."""
    ctx = cfg.max_seq_len
    if args.positions == "original" and args.tokens > ctx:
        raise ValueError(f"--tokens {args.tokens} is past the model's context of {ctx} with --positions original:"
                         " use --positions slot (keys rotated by their rank in the cache, StreamingLLM 3.2)")
    if args.positions == "slot":
        if not cfg.rotary:
            raise ValueError("slot positions need rotary embeddings: OPT's learned positions cannot be re-indexed;"
                             f" use --positions original with --tokens <= {ctx}")
        if args.budget + args.chunk > ctx:
            raise ValueError(f"--budget {args.budget} + --chunk {args.chunk} slots are past the model's context of {ctx}:"
                             " slot positions rotate keys by their rank in the cache, which must stay inside it;"
                             " lower --budget or --chunk")


def build_model(args, device, dtype):
    """(model, encode, description): the checkpoint with its tokenizer, or seeded random weights
    of a preset with a byte tokenizer."""
    if args.weights == "random":
        cfg = model_mod.preset(args.preset)
        torch.manual_seed(args.seed)
        m = model_mod.Transformer(cfg).eval()  # on the CPU: the same weights whatever the device
        return m.to(device=device, dtype=dtype), (lambda s: byte_ids(s, cfg.vocab_size)), \
            f"random {args.preset} (seed {args.seed})"
    from load_weights import load

    m, tok = load(args.model, device=device, dtype=dtype)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json or tokenizer.model): add one beside it")
    return m, tok.encode, args.model or "SmolLM2-135M-Instruct (default)"


def run(args, argv) -> int:
    check_args(args)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    t0 = time.perf_counter()
    model, encode, description = build_model(args, device, dtype)
    if not args.reference:  # the speed twins (fast/): the same tokens kept
        model = fast.enable(model)
    elif args.compile:
        raise ValueError("--compile runs the fast path: drop --reference (or add --no-compile)")
    check_context(args, model.cfg)
    text, source = stream_text(args)
    ids = encode(text)  # the whole text once, no BOS
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} tokens: give a longer one")
    stream = cyclic(ids, args.chunk, device)
    load_s = time.perf_counter() - t0

    table = sys.stderr if args.json else sys.stdout
    out = Path(args.out)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    record = dict(kind="soak", created=time.strftime("%Y-%m-%d %H:%M:%S"), argv=list(argv), device=gpu,
                  device_type=device.type, torch=torch.__version__, dtype=str(dtype).removeprefix("torch."),
                  model=description, text=dict(source=source, tokens=len(ids)), load_seconds=load_s,
                  memory=("cuda max_memory_allocated / memory_allocated" if device.type == "cuda"
                          else "process peak RSS / current RSS"),
                  checkpoints=checkpoints(args.tokens, args.every, args.at, args.chunk),
                  config={k: v for k, v in vars(args).items() if k != "policy_list"}, results=[])

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))

    calls = record["checkpoints"][-1] // args.chunk
    with tqdm(total=calls * args.chunk * len(args.policy_list), desc="soak", unit="tok", unit_scale=True,
              file=sys.stderr, dynamic_ncols=True, mininterval=1.0) as bar:
        for name in args.policy_list:
            tqdm.write(table_head(name, args), file=table)
            partial = dict(policy=name, rows=[])
            record["results"].append(partial)

            def on_row(row, partial=partial):
                partial["rows"].append(row)
                save()
                tqdm.write(table_row(row), file=table)

            result = soak(model, stream, name, args, device, on_row, bar)
            record["results"][-1] = result
            save()
            tqdm.write("\n" + summary_line(result), file=table)
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        print(f"wrote {out}", file=sys.stderr)
    failed = [r for r in record["results"] if r["summary"]["nonfinite_logits"] or r["summary"]["nonfinite_scores"]
              or r["summary"]["over_budget"]]
    if failed:
        print("soak failed: " + "; ".join(
            f"{r['policy']}: {r['summary']['nonfinite_logits']:,} non-finite logits, "
            f"{r['summary']['nonfinite_scores'] or 0:,} non-finite scores, held up to {r['summary']['held_max']:,}"
            f" (budget {r['budget']:,})" for r in failed) + f" ({out})", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (already said in one line)
        return int(e.code or 0)
    try:
        return run(args, argv)
    except (ValueError, FileNotFoundError) as e:  # LoadError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
