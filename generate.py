"""Generate text through a KV cache that evicts: `python generate.py --policy a2sf`.

The path of one token: generate.py -> load_weights.load -> model.Transformer -> cache.KVCache
-> policies. Sampling is a few small pure functions; `feed` runs a prompt through the cache in
the calls its mode asks for; `generate` is the decode loop.

Under torchrun (`torchrun --nproc-per-node 2 generate.py --model path/to/llama --policy a2sf`) the
model is split by heads over the processes, each loading only its slices (tp.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from cache import POSITION_SCHEMES, KVCache
from policies import REGISTRY, make_policy

DEFAULT_PROMPT = (
    "Read the story and answer the question.\n\n"
    "Mara kept the lighthouse on the northern cape for eleven winters. Each evening she climbed the "
    "ninety-two steps, trimmed the wick, wound the clockwork that turned the great lens, and wrote "
    "the weather in a green ledger. Ships passed far out: colliers bound south, a mail steamer every "
    "Thursday, and once a tall white schooner that did not answer her signal lamp. In the spring of "
    "her twelfth year a storm took the landing stage and the supply boat could not come for six weeks. "
    "She lived on oats, dried fish and the last tins of peaches, and she burned the ledger's spare "
    "pages to keep the kettle warm, but the light never failed. When the boat finally came, the "
    "inspector found her asleep at the top of the tower, the lens turning above her, and the last "
    "line in the ledger read: wind easing, sea calm, all ships seen safe.\n\n"
    "Question: What did Mara burn to keep the kettle warm, and why could the supply boat not come?"
)


# -- sampling: small pure functions ------------------------------------------------------------

def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (B, V); the rest -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose probability
    reaches p (the most likely token always stays)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# -- running the model through a cache ------------------------------------------------------------

def feed(model, tokens: torch.Tensor, cache: KVCache, last_only: bool = False, step=None) -> torch.Tensor:
    """Run tokens (B, T) through the cache in the calls its mode takes: chunks of `chunk` rows in
    streaming mode, the whole prompt at once in prefill mode. -> logits (B, T, V), or (B, 1, V).

    step(tokens (B, 1)) -> logits (B, 1, V), if given, runs the one-token calls of a chunk-1 stream
    after the first: each is a decode step (fast.compile_decode, fast.graph_decode). The first
    stays `model(...)`: into an empty cache the fast model takes its prompt path."""
    T = tokens.shape[1]
    n = T if cache.mode == "prefill" or cache.budget is None else cache.chunk  # rows per call
    outs = []
    for s in range(0, T, n):
        if step is not None and n == 1 and s > 0:
            logits = step(tokens[:, s:s + 1]).clone()  # a CUDA-graph step returns one buffer every call
        else:
            logits = model(tokens[:, s:s + n], cache)
        if last_only:
            outs = [logits[:, -1:]]  # only the last is kept, not every call's
        else:
            outs.append(logits)
    return torch.cat(outs, dim=1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, cache: KVCache, max_new_tokens: int, *, temperature=0.0,
             top_k=0, top_p=1.0, seed=0, eos_id=None, on_token=None, step=None):
    """prompt (B, T) -> new tokens (B, N) and timings {prefill_s, decode_s}. Stops after an
    `eos_id` (batch 1; the EOS itself is not returned or passed to on_token). step(tokens (B, 1))
    -> logits runs each decode step, and a chunk-1 stream's prompt calls after the first (`feed`;
    default the eager `model(tokens, cache)`; fast.compile_decode gives a compiled one)."""
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    logits = feed(model, prompt, cache, last_only=True, step=step)[:, -1]
    sync()
    t1 = time.perf_counter()
    step = step or (lambda tokens: model(tokens, cache))
    out = []
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, gen)  # (B,)
        if eos_id is not None and prompt.shape[0] == 1 and int(nxt[0]) == eos_id:
            break
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if len(out) == max_new_tokens:
            break
        logits = step(nxt[:, None])[:, -1]
    sync()
    t2 = time.perf_counter()
    new = torch.stack(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)
    return new, {"prefill_s": t1 - t0, "decode_s": t2 - t1}


# -- the command line ---------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends in one line ('error: ...', exit 2), like every other bad input."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


EXAMPLES = """examples:
  python generate.py --policy a2sf                    # SmolLM2-135M, the built-in story and question
  python generate.py --policy h2o --ratio 0.2 --prompt "Tell me about lighthouses."
  python generate.py --policy sink --budget 64 --mode streaming --positions slot
  python generate.py --model path/to/model.gguf --policy vatp --budget 256
  python generate.py --policy a2sf --reference        # the plain reference path (no fast/ twins)"""


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--model", default=None,
                   help="a .gguf file, a Hugging Face directory (config.json + safetensors or .bin) or a Meta directory"
                        " (params.json + consolidated.*.pth); the tokenizer comes from the same file or directory"
                        " (default: SmolLM2-135M-Instruct, fetched by load_weights.py --fetch)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: when it has one)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graph on a GPU)")
    p.add_argument("--reference", action="store_true",
                   help="run the plain reference path (model.py, cache.py) without the fast/ twins")
    add_policy_args(p)
    return p


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """The eviction flags, shared with evaluate.py."""
    p.add_argument("--policy", default="a2sf", help=f"one of {', '.join(REGISTRY)}")
    p.add_argument("--budget", type=int, default=None, help="tokens kept per layer and KV head")
    p.add_argument("--ratio", type=float, default=None, help="budget as a ratio of the prompt length (default 0.5)")
    p.add_argument("--alpha", type=float, default=None, help="forgetting factor (a2sf; default 0.2)")
    p.add_argument("--n-sink", type=int, default=None, help="first tokens never evicted")
    p.add_argument("--recent", type=int, default=None, help="latest tokens never evicted")
    p.add_argument("--mode", default="prefill", help="prefill (prompt whole, then compress) or streaming (evict per chunk)")
    p.add_argument("--chunk", type=int, default=1, help="prompt rows per call in streaming mode (1 = exact)")
    p.add_argument("--positions", default="original", help=f"one of {', '.join(POSITION_SCHEMES)}")
    p.add_argument("--gqa", default="sum", help="sum or max over the query heads of a group")


def check_policy_args(args) -> None:
    """The eviction flags that can be refused before any model loads, in one line each."""
    if args.policy not in REGISTRY:
        raise ValueError(f"unknown policy {args.policy!r}: choose one of {', '.join(REGISTRY)}")
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha {args.alpha} is outside [0, 1]: use a forgetting factor between 0 and 1")
    resolve_budget(args.budget, args.ratio, 1)


def cache_from_args(args, cfg, prompt_len: int, *, batch=1, device="cpu", dtype=torch.float32, max_len=None, pad=None,
                    cache_class=KVCache):
    """The cache the flags describe (budget from --budget, or --ratio of prompt_len); cache_class
    cache.KVCache or fast.KVCache."""
    check_policy_args(args)
    budget = None if args.policy == "full" else resolve_budget(args.budget, args.ratio, prompt_len)
    policy = make_policy(args.policy, budget, alpha=args.alpha, n_sink=args.n_sink, recent=args.recent, gqa=args.gqa)
    return cache_class(cfg, policy, budget, batch=batch, mode=args.mode, chunk=args.chunk, positions=args.positions,
                   device=device, dtype=dtype, max_len=max_len, pad=pad)


def resolve_budget(budget, ratio, prompt_len: int) -> int | None:
    if budget is not None and ratio is not None:
        raise ValueError("give --budget or --ratio, not both")
    if budget is not None:
        if budget < 1:
            raise ValueError(f"--budget {budget}: use a number of tokens >= 1")
        return budget
    ratio = 0.5 if ratio is None else ratio
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"--ratio {ratio} is outside (0, 1]: give the share of the prompt to keep")
    return max(1, round(ratio * prompt_len))


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: use cpu or cuda (or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but no CUDA GPU is available: use --device cpu")
    return device


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (already said in one line)
        return int(e.code or 0)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # LoadError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from load_weights import load

    check_policy_args(args)  # before the (slow) load
    if args.max_new_tokens < 0:
        raise ValueError("--max-new-tokens must be >= 0")
    if not math.isfinite(args.temperature) or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError("use --temperature >= 0, --top-k >= 0 and --top-p in (0, 1]")
    if not args.prompt.strip():
        raise ValueError("the prompt is empty: give some text with --prompt")
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    first_kv_head = 0
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun --nproc-per-node N: tensor parallel (tp.py)
        import tp

        rank, n, device = tp.setup(device)  # this rank's GPU; each rank loads only its slices of the weights
        model, tok = tp.load(args.model, rank, n, device=device, dtype=dtype)
        first_kv_head = rank * model.cfg.n_kv_heads  # its cache holds its own KV heads: no communication to evict
        if rank:  # every rank samples the same tokens (the logits are all-reduced); rank 0 prints them
            sys.stdout = open(os.devnull, "w")
    else:
        model, tok = load(args.model, device=device, dtype=dtype)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json or tokenizer.model): add one beside it")
    use_chat = tok.has_chat_template if args.chat is None else args.chat
    text = tok.chat(args.prompt) if use_chat else args.prompt
    ids = tok.encode(text)
    T, ctx = len(ids), model.cfg.max_seq_len
    if T > ctx:
        raise ValueError(f"the prompt is {T} tokens, longer than the model's context of {ctx}: shorten it")
    if T + args.max_new_tokens > ctx and (args.positions == "original" or args.policy == "full"):
        raise ValueError(f"prompt ({T}) + --max-new-tokens ({args.max_new_tokens}) exceed the context of {ctx}:"
                         " lower --max-new-tokens, or use --positions slot with a budget (a full cache cannot pass it)")
    cache_class, step = KVCache, None
    if not args.reference:  # the speed twins (fast/): the same tokens, kept and generated
        import fast

        model, cache_class = fast.enable(model), fast.KVCache
    if first_kv_head:
        cache_class = tp.rank_cache_class(cache_class, first_kv_head)  # `random` hashes the whole model's head index
    cache = cache_from_args(args, model.cfg, T, device=device, dtype=dtype, max_len=T + args.max_new_tokens,
                            cache_class=cache_class)
    if args.compile:
        if args.reference:
            raise ValueError("--compile compiles the fast path: drop --reference")
        step = fast.compile_decode(model, cache)
    elif not args.reference and cache.mode == "streaming" and cache.chunk == 1 and cache.budget is not None \
            and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        # token-by-token eviction: each prompt call after the first is a decode step (feed), replayed
        # as a CUDA graph; graph_decode, not compile_decode: one prompt does not repay a compile
        step = fast.graph_decode(model, cache)

    print(f"--- prompt ({T} tokens{', chat template' if use_chat else ''}) ---\n{args.prompt}\n--- {args.policy} ---")
    printed, new_ids = "", []

    def on_token(nxt):  # stream: decode everything so far, print what is new
        nonlocal printed
        new_ids.append(int(nxt[0]))
        s = tok.decode(new_ids)
        if not s.endswith("\ufffd"):  # wait for a multi-byte character to complete
            print(s[len(printed):], end="", flush=True)
            printed = s

    prompt = torch.tensor([ids], device=device)
    eos = tok.eos_id if use_chat else None
    new, t = generate(model, prompt, cache, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, eos_id=eos, on_token=on_token, step=step)
    print(tok.decode(new_ids)[len(printed):])
    n = new.shape[1]
    fed = T + max(n - 1, 0)  # the last new token is sampled, never fed back through the cache
    cfg = model.cfg
    full_bytes = cfg.n_layers * cfg.n_kv_heads * fed * cfg.head_dim * 2 * torch.finfo(dtype).bits // 8
    kept = int(cache.tokens_held().max())
    print(f"[{args.policy}] prefill {T} tok {T / t['prefill_s']:.1f} tok/s | decode {n} tok "
          f"{n / max(t['decode_s'], 1e-9):.1f} tok/s | kept {kept} of {fed} tokens per KV head "
          f"(budget {cache.budget if cache.budget is not None else 'all'}) | KV bytes held {cache.nbytes():,}"
          f" vs full {full_bytes:,} ({100 * cache.nbytes() / full_bytes:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
