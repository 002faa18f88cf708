"""bench.py: decode and prefill speed through the evicting cache, side by side with Hugging Face
transformers on the same weights and with the memory-bandwidth bound, in one run.

    python bench.py                                   # the default grid (GPU)
    python bench.py --plan targets                    # the README's Performance rows (GPU)
    python bench.py --models tiny --contexts 64 --budgets 16 --new-tokens 8 --no-hf --no-compile   # CPU smoke run

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
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

import cache as reference_cache
import fast
import generate
import model as model_mod
import policies


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


def bench_ours(m, policy_name, budget, context, batch, new_tokens, compile_step, device, mode="prefill", profile=False):
    """mode prefill: the context in one call, then compress. streaming: calls of 512 rows, evicting
    after each, so even the prefill never holds more than budget + 512 tokens."""
    cfg = m.cfg
    p = policies.make_policy(policy_name, budget)
    chunk = 512 if mode == "streaming" else 1
    full = policies.make_policy("full", None)
    cache_class = fast.KVCache if isinstance(m, fast.model.Transformer) else reference_cache.KVCache
    make = lambda pol, b: cache_class(cfg, pol, b, batch=batch, mode=mode, chunk=chunk, device=device, dtype=m.dtype,
                                  max_len=context + new_tokens + 8)
    tokens = torch.randint(0, cfg.vocab_size, (batch, context), device=device)

    def prefill(cache):
        t0 = now(device)
        logits = generate.feed(m, tokens, cache, last_only=True)[:, -1]
        return now(device) - t0, logits

    # Prefill: the policy's and full's (the fused prefill), interleaved, `reps` of each after one
    # warm-up of each (Triton's compile, cuBLAS's and the allocator's set-up; the allocator stays
    # warm): a host that is slower for a while slows both alike. The last policy prefill feeds decode.
    reps = 5 if context <= 8192 else 3
    pol_s, full_s = [], []
    with torch.no_grad():
        for r in range(reps + 1):
            if not p.keep_all:
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
    pol_s, full_s = pol_s[1:], full_s[1:] or pol_s[1:]  # the warm-ups dropped
    prefill_s = statistics.median(pol_s)
    with torch.no_grad():
        step = fast.compile_decode(m, cache) if compile_step else (lambda t: m(t, cache))
        nxt = logits.argmax(-1)[:, None]
        t0 = now(device)
        for _ in range(3):  # warm-up: compile and capture the graph
            nxt = step(nxt.clone())[:, -1].argmax(-1)[:, None]
        compile_s = now(device) - t0
        t0 = now(device)
        for _ in range(new_tokens):
            nxt = step(nxt.clone())[:, -1].argmax(-1)[:, None]  # stays on the device: no host sync
        decode_s = now(device) - t0
        if profile and device.type == "cuda":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    nxt = step(nxt.clone())[:, -1].argmax(-1)[:, None]
                now(device)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else 0
    kept = int(cache.tokens_held().max())
    return dict(prefill_tok_s=batch * context / prefill_s, prefill_vs_full=prefill_s / statistics.median(full_s),
                decode_tok_s=batch * new_tokens / decode_s, compile_s=compile_s,
                ms_per_step=1000 * decode_s / new_tokens, peak_gb=peak / 2**30, kv_bytes=cache.nbytes(), kept=kept)


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
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each row's decode step")
    args = ap.parse_args(argv)
    args.no_compile = args.no_compile or args.reference
    if args.tune:
        torch._inductor.config.coordinate_descent_tuning = True
    device = generate.pick_device(args.device)
    dtype = generate.DTYPES[args.dtype]
    bw = copy_bandwidth(device) if device.type == "cuda" else None  # the bound is for a GPU's memory
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {gpu}, torch {torch.__version__}, {args.dtype}, "
          + (f"copy bandwidth {bw / 1e9:.0f} GB/s" if bw else "no bandwidth bound on the CPU (% bound: -)")
          + (", reference path" if args.reference else ""))
    header = ("model", "impl", "policy", "budget", "ctx", "B", "mode", "prefill tok/s", "prefill / full", "decode tok/s",
              "ms/step", "peak+ GB", "KV MB", "% bound", "compile s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    out_rows = []

    def emit(row):
        out_rows.append(row)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every row: a killed run keeps its rows
        Path(args.out).write_text(json.dumps(dict(device=gpu, torch=torch.__version__, copy_bandwidth=bw,
                                                  dtype=args.dtype, args=vars(args), rows=out_rows), indent=1))
        cells = [row["model"], row["impl"], row["policy"], row.get("budget", "-"), row["ctx"], row["batch"], row.get("mode", "-"),
                 f"{row['prefill_tok_s']:.0f}", f"{row.get('prefill_vs_full', float('nan')):.2f}",
                 f"{row['decode_tok_s']:.1f}", f"{row.get('ms_per_step', 0):.2f}",
                 f"{row.get('peak_gb', 0):.2f}", f"{row.get('kv_bytes', 0) / 2**20:.0f}",
                 f"{row['pct_bound']:.0f}" if row.get("pct_bound") else "-", f"{row.get('compile_s', 0):.0f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)

    rows = PLANS[args.plan] if args.plan else grid(args)
    loaded, hf_rows = {}, []
    for model_name, pol, budget, ctx, batch, *mode in rows:
        if model_name not in loaded:
            loaded.clear()  # one model on the GPU at a time
            torch.cuda.empty_cache() if device.type == "cuda" else None
            loaded[model_name] = build_model(model_name, device, dtype, args.weights, args.reference)[0]
        m = loaded[model_name]
        if isinstance(budget, str):
            budget = round(float(budget[1:]) * ctx) if budget.startswith("r") else int(budget)
        if budget is not None and budget >= ctx:
            print(f"| {model_name} | ours | {pol} | {budget} | {ctx} | {batch} | skipped: the budget is not below the"
                  " context, nothing would be evicted (lower --budgets) |")
            continue
        torch._dynamo.reset()
        try:
            r = bench_ours(m, pol, budget, ctx, batch, args.new_tokens, not args.no_compile, device, *mode,
                           profile=args.profile)
        except torch.OutOfMemoryError:
            print(f"| {model_name} | ours | {pol} | {budget} | {ctx} | {batch} | out of memory |")
            continue
        r.update(model=model_name, impl="ours", policy=pol, budget=budget or "-", ctx=ctx, batch=batch,
                 mode=(mode or ["prefill"])[0])
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
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
