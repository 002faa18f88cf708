"""Issue 14's last figures, for one code folder (old/ = the landed main, . = this checkout):
`python scripts/probe14.py DIR [--decode] [--prefill N]`.
--prefill N: each SmolLM2 1k row of `bench.py --plan targets-smollm2` (and the 16k streaming one),
  N timed prefills after one warm-up; prints the minimum and the median (ms). These prefills take
  20-50 ms of which the GPU is busy ~5: they time the host, whose noise only ever adds time, so the
  minimum is the figure least touched by it.
--decode: the 16k a2sf streaming row's decode step, profiled (bench.bench_ours(profile=True))."""
import os
import statistics
import sys
import time

d = sys.argv[1]
os.chdir(d)
sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

import bench  # noqa: E402
import generate  # noqa: E402
import policies  # noqa: E402

new = hasattr(bench, "fast")
dev = torch.device(os.environ.get("DEV", "cuda"))
m = bench.build_model(os.environ.get("MODEL", "smollm2"), dev, torch.bfloat16, "random")[0]
if new:
    m = bench.fast.enable(m)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
KV = bench.fast.KVCache if new else bench.KVCache
args = sys.argv[2:]
if "--prefill" in args:
    n = int(args[args.index("--prefill") + 1])
    rows = [r for r in [("full", None, 1024, 1, "prefill"), ("full", None, 1024, 8, "prefill"), ("a2sf", 256, 1024, 1, "prefill"),
            ("sink", 256, 1024, 1, "prefill"), ("window", 256, 1024, 1, "prefill"), ("h2o", 256, 1024, 8, "prefill"),
            ("a2sf", 3277, 16384, 1, "streaming")] if os.environ.get("ROWS", "all") in ("all", r[4])]
    for pol, budget, ctx, B, mode in rows:
        tokens = torch.randint(0, m.cfg.vocab_size, (B, ctx), device=dev)
        ts = []
        reps = n if ctx <= 8192 else max(3, n // 4)
        with torch.no_grad():
            for _ in range(reps + 1):
                cache = KV(m.cfg, policies.make_policy(pol, budget), budget, batch=B, mode=mode,
                           chunk=512 if mode == "streaming" else 1, device=dev, dtype=m.dtype, max_len=ctx + 72)
                sync()
                t0 = time.perf_counter()
                generate.feed(m, tokens, cache, last_only=True)
                sync()
                ts.append(time.perf_counter() - t0)
                cache = None
        ts = ts[1:]
        print(f"## prefill {d} {pol} {budget} {ctx} B{B} {mode}: min {1000 * min(ts):.2f} ms,"
              f" median {1000 * statistics.median(ts):.2f} ms (n={len(ts)})", flush=True)
if "--decode" in args:
    kw = dict(mode="streaming", profile=True)
    row = bench.bench_ours(m, "a2sf", 3277, 16384, 1, 64, True, dev, **kw)
    print(f"## decode {d} a2sf 3277 16384 streaming: {row['decode_tok_s']:.1f} tok/s, {row['ms_per_step']:.3f} ms/step")
