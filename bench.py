"""bench.py: decode and prefill speed through the evicting cache, side by side with Hugging Face
transformers on the same weights and with the memory-bandwidth bound, in one run.

    python bench.py                                   # the default grid (GPU)
    python bench.py --plan targets                    # the README's Performance rows (GPU)
    python bench.py --models tiny --contexts 64 --budgets 16 --new-tokens 8 --no-hf --no-compile   # CPU smoke run
    python bench.py --plan tokenwise --weights random --no-hf  # token-by-token eviction in a prompt (GPU)

Each row: one model, policy, budget, context and batch, on the fast path (fast.enable, fast.KVCache;
--reference for the plain one). Prefill: the context in one call (prefill mode: the fused causal
attention, the scores' column sums from its log-sum-exp, then only the kept tokens written:
fast.model.Transformer.prompt). Decode: `--new-tokens` greedy steps with the compiled step
(fast.compile_decode: CUDA graph, eviction inside), timed on the host around the loop, no host
sync inside it. The bound is
batch * copy bandwidth / bytes read per step (weights + the kept keys and values), with the
copy bandwidth measured in the same run. "peak+ GB" is the peak GPU memory above what the row
started with (the weights): the cache, activations and attention buffers. "prefill / full" is
the row's prefill time over the fused prefill's (`full`, same model, context and batch), the two
interleaved in the row (median of 5, or 3 past 8k tokens).

--plan tokenwise (bench_tokenwise): a prompt fed token by token through a streaming chunk-1 cache
(generate.feed), its calls after the first eager, replayed as a CUDA graph (fast.graph_decode) or
compiled (fast.compile_decode); "prefill tok/s" is batch * tokens / seconds of the whole feed,
"ms/step" the time of one call. scripts/tokenwise_ab.py times the same feed for an older checkout.

Tensor parallel (issue 16; tp.py): `torchrun --nproc-per-node N bench.py --plan tp` (or any grid
with `--tp`, which one process runs as TP = 1 on the same weights). Each rank builds its own part
of the model on its own GPU (tp.random_model: random bf16 weights drawn on the device, never the
whole model on the host or on one GPU; `llama70b` is the Llama-2-70B shape), its own cache
(fast.KVCache of its KV heads; tp.rank_cache_class) and its own compiled step, with the two
all-reduces per block inside it (inductor and a CUDA graph on GPUs; aot_eager under gloo on the
CPU); every rank draws the same prompt (seeded) and rank 0 alone prints the table and writes the
file. Times are the slowest rank's. "KV MB" is the cache of all ranks; "GB/GPU" is the peak memory
PyTorch allocated on one GPU in the row (the weights included; the largest over the ranks). "% bound"
counts the bytes each rank reads in a step (its slices of the weights, the replicated embeddings,
norms and output head, its own keys and values) and the copy bandwidth each rank measures: the bound
is batch * (sum of the ranks' bandwidths) / (sum of the bytes they read), i.e. every GPU streaming
its own bytes at its own speed, all at once. `--profile` adds "all-reduce ms": the device time of the
all-reduce kernels (NCCL) in one decode step, from torch.profiler over 5 steps (the largest over the
ranks; a kernel waiting for a late rank counts its wait); on the CPU, the time of the gloo all-reduce
ops. Each row's greedy tokens are in the results file ("tokens"): a TP = N run gives those of one
process in fp32 (tests/test_bench_tp.py).
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import cache as reference_cache
import fast
import generate
import model as model_mod
import policies
import tp


def now(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def copy_bandwidth(device, nbytes=2**30) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = now(device)
    for _ in range(5):
        dst.copy_(src)
    return 2 * nbytes * 5 / (now(device) - t0)


def build_model(name, device, dtype, weights=None, reference=False):
    """(model, description); with the speed twins switched on (fast.enable) unless reference."""
    if name == "smollm2" and weights != "random":
        from load_weights import load
        m, _ = load(weights, device=device, dtype=dtype)
        desc = "SmolLM2-135M (real weights)"
    else:
        cfg = {"smollm2": model_mod.preset("smollm2-135m"), "llama7b": model_mod.preset("llama-2-7b"),
               "tiny": model_mod.preset("tiny-llama")}[name]
        with torch.device(device):
            m = model_mod.Transformer(cfg).to(dtype).eval()  # random weights: speed does not depend on values
        desc = f"{name} shape (random weights)"
    return (m if reference else fast.enable(m)), desc


SHAPES = {"smollm2": "smollm2-135m", "llama7b": "llama-2-7b", "llama70b": "llama-2-70b", "tiny": "tiny-llama"}
TP_ONLY = ("llama70b",)  # built by tp.random_model even in one process: 138 GB in bf16, never materialised in fp32


def build_part(name, rank, n, device, dtype, weights=None, reference=False):
    """Rank `rank`'s part of model `name` for tensor parallelism over n ranks (tp.py), made on its own
    device: tp.load's slices of the real SmolLM2, else tp.random_model (the same weights for every n)."""
    if name == "smollm2" and weights != "random":
        m, _ = tp.load(weights, rank, n, device=device, dtype=dtype)
    else:
        m = tp.random_model(model_mod.preset(SHAPES[name]), rank, n, device, dtype)
    return m if reference else fast.enable(m)


def across(values, device, n):
    """[rank 0's values, ..., rank n-1's]: each rank's list of floats, gathered on every rank."""
    if n == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


PROFILE_STEPS = 5
ALLREDUCE = ("allreduce", "all_reduce", "wait_tensor")  # the c10d ops of a collective on the CPU (launch, wait)


def allreduce_seconds(prof, cuda: bool) -> float:
    """Seconds spent in the all-reduces in a profile: on CUDA the device time of the NCCL kernels
    (ncclDevKernel_AllReduce_...: inside the CUDA graph too); on the CPU the self time of the c10d
    ops on the rank's own thread (their launch, gloo's work and the wait for the other ranks; self
    times, so nested ops count once)."""
    total = 0.0
    for e in prof.key_averages():
        key = e.key.lower()
        if cuda and "nccl" in key:
            total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        elif not cuda and any(k in key for k in ALLREDUCE):
            total += e.self_cpu_time_total
    return total / 1e6


def to_hf(m):
    """The same weights as a transformers LlamaForCausalLM (our rotary layout is HF's)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = m.cfg
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                         max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings)
    names = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head", "attn.wq": "self_attn.q_proj",
             "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "mlp.w_gate": "mlp.gate_proj",
             "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj"}
    sd = {}
    for k, v in m.state_dict().items():
        parts = k.split(".")
        if parts[0] == "layers":
            sd[f"model.layers.{parts[1]}." + names[".".join(parts[2:-1])] + "." + parts[-1]] = v
        else:
            sd[names[parts[0]] + "." + parts[-1]] = v
    with torch.device(m.device):
        hf = LlamaForCausalLM(hf_cfg).to(m.dtype).eval()
    hf.load_state_dict(sd, strict=False)
    return hf


def bench_ours(m, policy_name, budget, context, batch, new_tokens, compile_step, device, mode="prefill", profile=False,
               cache_class=None, vs_full=True, reps=None, seed=0, graph=True, dynamic=None):
    """mode prefill: the context in one call, then compress. streaming: calls of 512 rows, evicting
    after each, so even the prefill never holds more than budget + 512 tokens. cache_class: default
    fast.KVCache on a fast model, else cache.KVCache (a tensor-parallel rank passes
    tp.rank_cache_class's). vs_full False: no fused full prefill beside the row's (where the full
    cache does not fit; "prefill / full" is then nan). reps: timed prefills (default 11 up to 8k prompt
    tokens in all, 5 up to an 8k context, 3 past). The prompt is drawn from `seed` (the same on every
    rank). graph False: the compiled step without its CUDA graph. dynamic: fast.compile_decode's. -> the
    row, with its greedy tokens (the prompt's next token, then each decode step's) under "tokens", each
    rep's prefill ms, and, with profile, the all-reduce ms per step."""
    cfg = m.cfg
    p = policies.make_policy(policy_name, budget)
    chunk = 512 if mode == "streaming" else 1
    full = policies.make_policy("full", None)
    if cache_class is None:
        cache_class = fast.KVCache if isinstance(m, fast.model.Transformer) else reference_cache.KVCache
    make = lambda pol, b: cache_class(cfg, pol, b, batch=batch, mode=mode, chunk=chunk, device=device, dtype=m.dtype,
                                  max_len=context + new_tokens + 8)
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, context), device=device, generator=gen)

    def prefill(cache):
        t0 = now(device)
        logits = generate.feed(m, tokens, cache, last_only=True)[:, -1]
        return now(device) - t0, logits

    # Prefill: the policy's and full's (the fused prefill), interleaved, `reps` of each after one
    # warm-up of each (Triton's compile, cuBLAS's and the allocator's set-up; the allocator stays
    # warm): a host that is slower for a while slows both alike. "prefill / full" is the median of each
    # rep's ratio to the full prefill just before it. Up to 8k prompt tokens a prefill is a few tens of
    # ms, bound by the host's launches, and the same full prefill measured 23.6 to 43.9 ms in one row of one
    # run (issue 18, session 11): 11 reps there. The last policy prefill feeds decode.
    reps = reps or (11 if batch * context <= 8192 else 5 if context <= 8192 else 3)
    pol_s, full_s = [], []
    with torch.no_grad():
        for r in range(reps + 1):
            if not p.keep_all and vs_full:
                t, _ = prefill(make(full, None))
                full_s.append(t)
            cache = logits = None
            gc.collect()  # frees the last caches (reference cycles) now
            if r == reps and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()  # the peak of the row's own prefill and decode
            base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            cache = make(p, budget)
            t, logits = prefill(cache)
            pol_s.append(t)
    pol_s, full_s = pol_s[1:], full_s[1:] or (pol_s[1:] if p.keep_all else [])  # the warm-ups dropped
    prefill_s = statistics.median(pol_s)
    with torch.no_grad():
        step = fast.compile_decode(m, cache, dynamic=dynamic) if compile_step else (lambda t: m(t, cache))
        step = step if graph else getattr(step, "step", step)  # CudaGraphStep.step: the compiled step alone
        nxt = logits.argmax(-1)[:, None]
        greedy = [nxt]
        t0 = now(device)
        for _ in range(3):  # warm-up: compile and capture the graph
            nxt = step(nxt.clone())[:, -1].argmax(-1)[:, None]
            greedy.append(nxt)
        compile_s = now(device) - t0
        t0 = now(device)
        for _ in range(new_tokens):
            nxt = step(nxt.clone())[:, -1].argmax(-1)[:, None]  # stays on the device: no host sync
            greedy.append(nxt)
        decode_s = now(device) - t0
        allreduce = {}
        if profile:  # after the tokens kept: the same tokens with or without it
            cuda = device.type == "cuda"
            activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
            with torch.profiler.profile(activities=[activity]) as prof:
                for _ in range(PROFILE_STEPS):
                    nxt = step(nxt.clone())[:, -1].argmax(-1)[:, None]
                now(device)
            if cuda and tp.world()[0] == 0:
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
            allreduce = dict(allreduce_ms=1000 * allreduce_seconds(prof, cuda) / PROFILE_STEPS)
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else 0
    peak_gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    kept = int(cache.tokens_held().max())
    vs = statistics.median(a / b for a, b in zip(pol_s, full_s)) if full_s else float("nan")
    return dict(prefill_tok_s=batch * context / prefill_s, prefill_vs_full=vs,
                prefill_ms=[1000 * t for t in pol_s], full_prefill_ms=[1000 * t for t in full_s],
                decode_tok_s=batch * new_tokens / decode_s, compile_s=compile_s,
                ms_per_step=1000 * decode_s / new_tokens, peak_gb=peak / 2**30, kv_bytes=cache.nbytes(), kept=kept,
                peak_gpu_gb=peak_gpu / 2**30, tokens=torch.cat(greedy, 1).tolist(), **allreduce)


TOKENWISE_WAYS = {"eager": None, "graph": fast.graph_decode, "compiled": fast.compile_decode}


def bench_tokenwise(m, policy_name, budget, context, batch, device, ways=tuple(TOKENWISE_WAYS), warmup=16, seed=0):
    """Token-by-token eviction inside a prompt (streaming, chunk 1: the papers' protocol and
    evaluate.py's hot path): generate.feed of `context` random tokens, one call each, the calls
    after the first run each way: eager `model(...)` (what the landed main does), fast.graph_decode
    (the eager step replayed as a CUDA graph), fast.compile_decode (compiled blocks, a CUDA graph).
    Each way gets its own cache (a step captures its cache's tensors), warmed by a feed of `warmup`
    tokens (the compile, the capture), emptied in place (KVCache.reset: the graph stays valid), then
    timed. -> one row per way: tok/s = batch * context / seconds, ms per call, and "agree": the
    share of sequences whose next token (argmax) is the eager way's."""
    p = policies.make_policy(policy_name, budget)
    cache_class = fast.KVCache if isinstance(m, fast.model.Transformer) else reference_cache.KVCache
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, m.cfg.vocab_size, (batch, context), device=device, generator=gen)
    rows, eager_next = [], None
    for way in ways:
        cache = cache_class(m.cfg, p, budget, batch=batch, mode="streaming", chunk=1, device=device, dtype=m.dtype)
        step = TOKENWISE_WAYS[way] and TOKENWISE_WAYS[way](m, cache)
        with torch.no_grad():
            t0 = now(device)
            generate.feed(m, tokens[:, :warmup], cache, last_only=True, step=step)
            warm_s = now(device) - t0
            cache.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            t0 = now(device)
            logits = generate.feed(m, tokens, cache, last_only=True, step=step)
            seconds = now(device) - t0
        peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else 0
        nxt = logits[:, -1].argmax(-1)
        eager_next = nxt if way == "eager" else eager_next
        agree = float((nxt == eager_next).float().mean()) if eager_next is not None else float("nan")
        rows.append(dict(way=way, prefill_tok_s=batch * context / seconds, ms_per_step=1000 * seconds / context,
                         compile_s=warm_s, peak_gb=peak / 2**30, kv_bytes=cache.nbytes(),
                         kept=int(cache.tokens_held().max()), agree=agree))
        cache = step = logits = None
        gc.collect()
    eager = next((r for r in rows if r["way"] == "eager"), None)
    for r in rows:
        r["vs_eager"] = r["prefill_tok_s"] / eager["prefill_tok_s"] if eager else float("nan")
    return rows


def bench_hf(hf, context, batch, new_tokens, device, static: bool):
    """transformers' generate, greedy; decode time = (N+1 tokens) - (1 token). static: its static
    cache, which generate compiles by itself (transformers' auto-compile, mode reduce-overhead)."""
    tokens = torch.randint(0, hf.config.vocab_size, (batch, context), device=device)
    kw = dict(do_sample=False, pad_token_id=0)
    if static:
        kw.update(cache_implementation="static")

    def run(n):
        t0 = now(device)
        hf.generate(tokens, max_new_tokens=n, min_new_tokens=n, **kw)
        return now(device) - t0

    with torch.no_grad():
        for _ in range(2):  # warm-up both lengths: a static cache is sized by them, so each compiles once
            run(1), run(new_tokens + 1)
        one, many = run(1), run(new_tokens + 1)
    return dict(prefill_tok_s=batch * context / one, decode_tok_s=batch * new_tokens / (many - one))


def step_bytes(m, cache_kv_bytes):
    """Bytes one decode step must read: every weight once (the embedding row aside), plus the cache."""
    weights = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if n != "tok_emb.weight")
    if m.cfg.tie_embeddings:
        weights += m.tok_emb.weight.numel() * m.tok_emb.weight.element_size()  # the output head reads it
    return weights + cache_kv_bytes


# The rows the README's targets need (issue 6): model, policy, budget ('r0.2' = 20% of ctx), ctx, batch[, mode].
# Decode "at the same kept length": full at 1k context against a budget of 1024 at 2k. Prefill with
# scores against the fused prefill: the same context, full against h2o (every row weighs) and a2sf.
PLANS = {
    "targets-7b": [("llama7b", "full", None, 1024, 1), ("llama7b", "full", None, 1024, 8),
                   ("llama7b", "full", None, 2048, 1), ("llama7b", "h2o", 1024, 2048, 1),
                   ("llama7b", "a2sf", 1024, 2048, 1), ("llama7b", "vatp", 1024, 2048, 1),
                   ("llama7b", "full", None, 8192, 1), ("llama7b", "h2o", "r0.2", 8192, 1),
                   ("llama7b", "a2sf", "r0.2", 8192, 1),
                   ("llama7b", "full", None, 32768, 1), ("llama7b", "h2o", "r0.2", 32768, 1),
                   ("llama7b", "a2sf", "r0.2", 32768, 1), ("llama7b", "a2sf", "r0.2", 32768, 1, "streaming")],
    "targets-smollm2": [("smollm2", "full", None, 1024, 1), ("smollm2", "full", None, 1024, 8),
                        ("smollm2", "a2sf", 256, 1024, 1), ("smollm2", "sink", 256, 1024, 1),
                        ("smollm2", "window", 256, 1024, 1), ("smollm2", "h2o", 256, 1024, 8),
                        ("smollm2", "full", None, 16384, 1), ("smollm2", "a2sf", "r0.2", 16384, 1),
                        ("smollm2", "a2sf", "r0.2", 16384, 1, "streaming")],
}
PLANS["targets"] = PLANS["targets-smollm2"] + PLANS["targets-7b"]  # every target from one run
PLANS["targets-7b-short"] = PLANS["targets-7b"][:6]  # the 7B's decode targets (1k, 2k), without the long prompts
PLANS["targets-7b-long"] = PLANS["targets-7b"][6:]  # and the rest: 8k and 32k prompts
# Issue 18's token-by-token row (bench_tokenwise): a streaming chunk-1 prompt, each way of running its
# calls. Not `full`: a full cache takes a prompt in one call, never token by token.
PLANS["tokenwise"] = [("smollm2", "a2sf", "r0.2", 2048, 64, "tokenwise"), ("smollm2", "h2o", "r0.2", 2048, 64, "tokenwise")]
# Issue 16's rows, tensor parallel: run once in one process (TP = 1) and once under
# `torchrun --nproc-per-node 2` (TP = 2); a row whose options say {"tp": k} runs only at world size k.
# The 70B shape at 64k: 138 GB (128.5 GiB) of bf16 weights + a full cache of 20 GiB (80 layers x 8 KV
# heads x 128 x 2 (k, v) x 2 B = 320 KiB a token) do not fit one H200 (~139 GiB usable: full fits up to
# ~30k tokens), its a2sf at 20% (4 GiB) does, streamed (calls of 512 rows: no 64k-row activations).
PLANS["tp"] = [("llama7b", "full", None, 32768, 1), ("llama7b", "a2sf", "r0.2", 32768, 1),
               ("llama70b", "full", None, 65536, 1, "prefill", {"tp": 2}),
               ("llama70b", "a2sf", "r0.2", 65536, 1, "prefill", {"tp": 2}),
               ("llama70b", "a2sf", "r0.2", 65536, 1, "streaming", {"tp": 1, "vs_full": False}),
               ("llama70b", "full", None, 65536, 1, "streaming", {"tp": 1})]  # one GPU: expected out of memory
PLANS["tp-70b"] = PLANS["tp"][2:]  # the 70B rows alone (one process: the one-GPU rows)


# The fast module's switches, each a flag that times a piece beside its absence (or a candidate beside the
# default): (flag, module, setting, its value without the flag, with it, help).
SWITCHES = [
    ("--no-rows", fast.model, "ROWS", True, False, "the decode step's projections as cuBLAS matmuls with the norms and"
     " adds apart (fast.model.ROWS off), to time beside the fused kernels.linear_rows"),
    ("--no-pdl", fast.kernels, "PDL", None, False, "the decode step's kernels launched one after another, not with"
     " programmatic dependent launch (fast.kernels.PDL off), to time beside it"),
    ("--no-append", fast.model, "APPEND", True, False, "the decode step's rotary, cache write and mask as torch ops"
     " (fast.model.APPEND off), to time beside the one kernel (kernels.append_step)"),
    ("--no-join", fast.model, "JOIN", True, False, "the decode step's append kernel and attention kernel apart"
     " (fast.model.JOIN off), to time beside the two in one (kernels.append_attention)"),
    ("--no-embed", fast.step, "EMBED", True, False, "the decode step's embedding and rotary angles as eager ops"
     " (fast.step.EMBED off), to time beside them compiled (cos and sin eager: fast.step.compiled_embedding)"),
    ("--no-colsum-split", fast.kernels, "COLUMN_SUMS_SPLIT", True, False, "the prompt's column sums in one loop, the"
     " row weight multiplied and the mask on every tile (fast.kernels.COLUMN_SUMS_SPLIT off), to time beside the split loop"),
]


def grid(args):
    ints = lambda s: [int(x) for x in s.split(",") if x]
    rows = []
    for model_name in args.models.split(","):
        contexts = ints(args.contexts) + (ints(args.long) if model_name == "llama7b" else [])
        for ctx in contexts:
            for batch in ints(args.batches):
                for pol in args.policies.split(","):
                    for budget in ([None] if pol == "full" else args.budgets.split(",")):
                        rows.append((model_name, pol, budget, ctx, batch))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", choices=PLANS, default=None, help="a fixed list of rows instead of the grid")
    ap.add_argument("--models", default="smollm2,llama7b")
    ap.add_argument("--weights", default=None, help="SmolLM2 checkpoint (default: the embedded GGUF; 'random' for random)")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--policies", default="full,window,sink,h2o,a2sf,vatp")
    ap.add_argument("--budgets", default="256,1024", help="tokens; 'r0.2' = 20%% of the context")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--long", default="32768", help="extra contexts for the 7B shape")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-compile", action="store_true", help="decode eagerly (no torch.compile, no CUDA graph)")
    ap.add_argument("--reference", action="store_true", help="the plain reference path (implies --no-compile)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=generate.DTYPES)
    ap.add_argument("--out", default="results/bench.json")
    ap.add_argument("--tune", action="store_true", help="inductor coordinate-descent tuning (gpt-fast's setting)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each row's decode step"
                    " (and, tensor parallel, the all-reduce ms per step)")
    ap.add_argument("--tp", action="store_true", help="tensor parallel (tp.py): each rank builds its part on its device;"
                    " implied under torchrun with more than one process and by --plan tp; one process: TP = 1")
    ap.add_argument("--prefill-reps", type=int, default=None, help="timed prefills per row"
                    " (default 11 up to 8k prompt tokens in all, 5 up to an 8k context, 3 past)")
    ap.add_argument("--no-graph", action="store_true", help="the compiled decode step without its CUDA graph")
    ap.add_argument("--static", action="store_true", help="compile each row's step for its cache size alone"
                    " (torch.compile dynamic=False: what a process with one cache gets; fast.compile_decode)")
    ap.add_argument("--evict-chunk", type=int, default=None, metavar="C",
                    help="the one-victim eviction as a split reduction over chunks of C slots (fast.cache.EVICT_CHUNK)")
    ap.add_argument("--reverse", action="store_true", help="run the rows last to first (does a row's speed follow its"
                    " place in the process? Issue 18: idle time inside the step from the fourth row on)")
    ap.add_argument("--max-autotune", action="store_true", help="inductor's max-autotune for the compiled step's"
                    " matmuls (Triton GEMM templates beside cuBLAS, pointwise epilogues fused into them)")
    ap.add_argument("--inductor", default="", metavar="KEY=VALUE,...", help="torch._inductor.config settings for the"
                    " compiled step, e.g. combo_kernels=True (independent small kernels launched as one)")
    for flag, _, _, _, _, text in SWITCHES:
        ap.add_argument(flag, action="store_true", help=text)
    args = ap.parse_args(argv)
    if args.evict_chunk is not None and args.evict_chunk < 1:
        ap.error("--evict-chunk takes a positive number of slots, e.g. 512")
    fast.cache.EVICT_CHUNK = args.evict_chunk
    for flag, module, setting, unset, given, _ in SWITCHES:
        setattr(module, setting, given if getattr(args, flag[2:].replace("-", "_")) else unset)
    for setting in filter(None, args.inductor.split(",")):
        key, _, value = setting.partition("=")
        if not hasattr(torch._inductor.config, key) or not value:
            ap.error(f"--inductor {setting!r}: give KEY=VALUE with a torch._inductor.config KEY, e.g. combo_kernels=True")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        setattr(torch._inductor.config, key, value)
    args.no_compile = args.no_compile or args.reference
    if args.tune:
        torch._inductor.config.coordinate_descent_tuning = True
    if args.max_autotune:
        torch._inductor.config.max_autotune_gemm = True
        torch._inductor.config.max_autotune_gemm_backends = "ATEN,TRITON"
    tp_mode = args.tp or args.plan in ("tp", "tp-70b") or tp.world()[1] > 1
    if tp_mode:  # each rank: its GPU (LOCAL_RANK), its process group (NCCL; gloo on the CPU)
        rank, n, device = tp.setup(generate.pick_device(args.device))
        args.no_hf = True  # transformers holds no part of a model
    else:
        rank, n, device = 0, 1, generate.pick_device(args.device)
    main_rank = rank == 0
    say = print if main_rank else (lambda *a, **k: None)
    dtype = generate.DTYPES[args.dtype]
    bw = copy_bandwidth(device) if device.type == "cuda" else None  # the bound is for a GPU's memory
    bws = [b[0] for b in across([bw or 0.0], device, n)] if tp_mode else [bw]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    say(f"# {gpu}, torch {torch.__version__}, {args.dtype}, "
        + (f"copy bandwidth {bw / 1e9:.0f} GB/s" if bw else "no bandwidth bound on the CPU (% bound: -)")
        + (", reference path" if args.reference else "")
        + (f", tensor parallel over {n} rank(s) ({dist.get_backend() if n > 1 else 'one process'}), copy bandwidth "
           f"{sum(bws) / 1e9:.0f} GB/s in all" if tp_mode else ""))
    header = ("model", "impl", "policy", "budget", "ctx", "B", "mode", "prefill tok/s", "prefill / full", "decode tok/s",
              "ms/step", "peak+ GB", "KV MB", "% bound", "compile s") + (("TP", "GB/GPU", "all-reduce ms") if tp_mode else ())
    say("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    out_rows = []

    def emit(row):
        if not main_rank:  # rank 0 alone prints and writes
            return
        out_rows.append(row)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every row: a killed run keeps its rows
        Path(args.out).write_text(json.dumps(dict(device=gpu, torch=torch.__version__, copy_bandwidth=bw,
                                                  dtype=args.dtype, args=vars(args), rows=out_rows, world_size=n,
                                                  copy_bandwidth_ranks=bws), indent=1))
        cells = [row["model"], row["impl"], row["policy"], row.get("budget", "-"), row["ctx"], row["batch"], row.get("mode", "-"),
                 f"{row['prefill_tok_s']:.0f}", f"{row.get('prefill_vs_full', float('nan')):.2f}",
                 f"{row['decode_tok_s']:.1f}" if "decode_tok_s" in row else "-", f"{row.get('ms_per_step', 0):.2f}",
                 f"{row.get('peak_gb', 0):.2f}", f"{row.get('kv_bytes', 0) / 2**20:.0f}",
                 f"{row['pct_bound']:.0f}" if row.get("pct_bound") else "-", f"{row.get('compile_s', 0):.0f}"]
        if tp_mode:
            cells += [row.get("tp", n), f"{row.get('peak_gpu_gb', 0):.1f}",
                      f"{row['allreduce_ms']:.2f}" if "allreduce_ms" in row else "-"]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)

    rows = PLANS[args.plan] if args.plan else grid(args)
    rows = rows[::-1] if args.reverse else rows
    loaded, hf_rows = {}, []
    m = None
    for model_name, pol, budget, ctx, batch, *mode in rows:
        opts = mode.pop() if mode and isinstance(mode[-1], dict) else {}  # a plan row's options ({"tp": k, "vs_full": ...})
        if opts.get("tp", n) != n:
            say(f"# {model_name} {pol} {budget} {ctx} {(mode or ['prefill'])[0]}: a TP = {opts['tp']} row, skipped at TP = {n}")
            continue
        if model_name not in loaded:
            m = None  # one model on the GPU at a time: the last one freed before the next is built
            loaded.clear()
            gc.collect()
            torch._dynamo.reset()
            torch.cuda.empty_cache() if device.type == "cuda" else None
            loaded[model_name] = (build_part(model_name, rank, n, device, dtype, args.weights, args.reference)
                                  if tp_mode or model_name in TP_ONLY else
                                  build_model(model_name, device, dtype, args.weights, args.reference)[0])
        m = loaded[model_name]
        if isinstance(budget, str):
            budget = round(float(budget[1:]) * ctx) if budget.startswith("r") else int(budget)
        if budget is not None and budget >= ctx:
            say(f"| {model_name} | ours | {pol} | {budget} | {ctx} | {batch} | skipped: the budget is not below the"
                " context, nothing would be evicted (lower --budgets) |")
            continue
        torch._dynamo.reset()
        cache_class = None
        if tp_mode:  # `random` hashes the whole model's KV head index: the rank's heads start at rank * its count
            base_class = fast.KVCache if isinstance(m, fast.model.Transformer) else reference_cache.KVCache
            cache_class = tp.rank_cache_class(base_class, rank * m.cfg.n_kv_heads)
        try:
            if mode == ["tokenwise"]:  # one row per way of running the calls; "prefill tok/s" is the feed's
                if tp_mode:
                    say(f"# {model_name} {pol} {budget} {ctx} tokenwise: not under tensor parallelism, skipped")
                    continue
                ways = ["eager"] if args.reference else ["eager", "graph"] + ([] if args.no_compile else ["compiled"])
                tw = bench_tokenwise(m, pol, budget, ctx, batch, device, ways)
                for r in tw:
                    r.update(model=model_name, impl=f"ours, {r['way']}", policy=pol, budget=budget, ctx=ctx,
                             batch=batch, mode="streaming, chunk 1")
                    emit(r)
                say(f"# tokenwise {pol}: " + ", ".join(f"{r['way']} {r['vs_eager']:.2f}x the eager feed (next tokens"
                                                         f" agree: {100 * r['agree']:.0f}%)" for r in tw[1:]))
                continue
            r = bench_ours(m, pol, budget, ctx, batch, args.new_tokens, not args.no_compile, device, *mode,
                           profile=args.profile, cache_class=cache_class, vs_full=opts.get("vs_full", True),
                           reps=args.prefill_reps, graph=not args.no_graph, dynamic=False if args.static else None)
        except torch.OutOfMemoryError:
            say(f"| {model_name} | ours | {pol} | {budget} | {ctx} | {batch} | out of memory |")
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
            continue
        r.update(model=model_name, impl="ours", policy=pol, budget=budget or "-", ctx=ctx, batch=batch,
                 mode=(mode or ["prefill"])[0])
        if tp_mode:  # the slowest rank's times, the largest rank's memory; the bound from every rank's bytes and bandwidth
            cols = list(zip(*across([r["decode_tok_s"], r["ms_per_step"], r["compile_s"], r["peak_gb"], r["peak_gpu_gb"],
                                     r.get("allreduce_ms", 0.0), step_bytes(m, r["kv_bytes"]), r["kv_bytes"],
                                     bw or 0.0], device, n)))
            r.update(decode_tok_s=min(cols[0]), ms_per_step=max(cols[1]), compile_s=max(cols[2]), peak_gb=max(cols[3]),
                     peak_gpu_gb=max(cols[4]), step_bytes=int(sum(cols[6])), kv_bytes=int(sum(cols[7])), tp=n)
            if "allreduce_ms" in r:
                r["allreduce_ms"] = max(cols[5])
            r["pct_bound"] = 100 * r["decode_tok_s"] / (batch * sum(cols[8]) / sum(cols[6])) if bw else None
        else:
            r["pct_bound"] = 100 * r["decode_tok_s"] / (batch * bw / step_bytes(m, r["kv_bytes"])) if bw else None
        emit(r)
        if not args.no_hf and pol == "full" and batch == 1 and ctx == 1024:
            hf_rows.append((model_name, r))  # after all of ours: a slow compile of transformers' cannot cost our rows
    for model_name, r in hf_rows:
        if model_name not in loaded:
            loaded.clear()
            torch.cuda.empty_cache() if device.type == "cuda" else None
            loaded[model_name] = build_model(model_name, device, dtype, args.weights)[0]
        hf = to_hf(loaded[model_name])
        for static in (False, True):
            torch._dynamo.reset()
            try:
                h = bench_hf(hf, r["ctx"], r["batch"], args.new_tokens, device, static)
            except Exception as e:  # report and go on: the table is the product
                print(f"| {model_name} | transformers {'static' if static else 'dynamic'} | failed: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:80]} |")
                continue
            h.update(model=model_name, impl="hf-static-compiled" if static else "hf-default", policy="full",
                     ctx=r["ctx"], batch=r["batch"], ratio_ours_over_this=r["decode_tok_s"] / h["decode_tok_s"])
            emit(h)
        del hf
    say(f"# wrote {args.out}")
    if tp_mode and n > 1 and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
