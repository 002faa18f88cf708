"""Issue 18's token-by-token row for one code folder (old/ = the landed main, commit 783c16e; . = this
checkout): `python scripts/tokenwise_ab.py DIR [--tokens N] [--policies a2sf,h2o] [--batch 64]`.

A prompt of random tokens fed token by token through a streaming chunk-1 cache (generate.feed: the
papers' protocol, evaluate.py's hot path), SmolLM2 shape, random weights, budget 20% of --context.
Each way of running the calls after the first: `eager` (model(...) per call: all the landed main
has), and on this checkout `graph` (fast.graph_decode) and `compiled` (fast.compile_decode). Each
way gets its own cache, warmed by a feed of 16 tokens (the compile, the capture), emptied in place
(KVCache.reset: a captured graph stays valid), then timed over the first --tokens tokens (default
all of --context), CUDA synchronized around each timing. One line per way:

    ## tokenwise DIR policy budget B T: X tok/s (eager | step graph | step compiled) Y ms a call, median of R

Environment: DEV (default cuda), MODEL (default smollm2; tiny for a CPU smoke run), DTYPE (default
bfloat16 on CUDA, float32 on the CPU), e.g. `DEV=cpu MODEL=tiny python scripts/tokenwise_ab.py .
--context 64 --batch 4`. bench.py --plan tokenwise times the same ways for this checkout alone.
"""
import argparse
import ast
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("dir", help="a code folder: old (the landed main) or . (this checkout)")
ap.add_argument("--policies", default="a2sf,h2o")
ap.add_argument("--context", type=int, default=2048, help="the prompt's length; the budget is --ratio of it")
ap.add_argument("--ratio", type=float, default=0.2)
ap.add_argument("--tokens", type=int, default=None, help="time the first N tokens only (default: --context)")
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--ways", default="eager,graph,compiled", help="this checkout's ways (the landed main: eager only)")
ap.add_argument("--reps", type=int, default=1, help="timed feeds per way (the median is printed)")
ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                help="a fast-module switch for this run, e.g. fast.step.EMBED=False (this checkout only; repeatable)")
args = ap.parse_args()

d = args.dir
os.chdir(d)
sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

import bench  # noqa: E402
import generate  # noqa: E402
import policies  # noqa: E402

new = hasattr(bench, "fast")  # the landed main has no fast/ package
dev = torch.device(os.environ.get("DEV", "cuda"))
dtype = getattr(torch, os.environ.get("DTYPE", "bfloat16" if dev.type == "cuda" else "float32"))
m = bench.build_model(os.environ.get("MODEL", "smollm2"), dev, dtype, "random")[0]
if new:
    m = bench.fast.enable(m)  # build_model has already; enable is idempotent
for setting in args.set:
    name, _, value = setting.partition("=")
    module, _, attr = name.rpartition(".")
    if not hasattr(sys.modules.get(module), attr):
        sys.exit(f"--set {setting!r}: give MODULE.NAME=VALUE with a loaded module's setting, e.g. fast.step.EMBED=False")
    setattr(sys.modules[module], attr, ast.literal_eval(value))
KV = bench.fast.KVCache if new else bench.KVCache
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
ways = [w for w in args.ways.split(",") if w] if new else ["eager"]
steps = {"eager": None, "graph": "graph_decode", "compiled": "compile_decode"}
budget = max(1, round(args.ratio * args.context))
T = min(args.tokens or args.context, args.context)
B = args.batch
tokens = torch.randint(0, m.cfg.vocab_size, (B, args.context), device=dev,
                       generator=torch.Generator(device=dev).manual_seed(0))[:, :T]


def feed(x, cache, step):
    if step is None:
        return generate.feed(m, x, cache, last_only=True)  # the landed main's signature
    return generate.feed(m, x, cache, last_only=True, step=step)


for pol in args.policies.split(","):
    for way in ways:
        torch._dynamo.reset()
        cache = KV(m.cfg, policies.make_policy(pol, budget), budget, batch=B, mode="streaming", chunk=1, device=dev,
                   dtype=dtype)
        step = getattr(bench.fast, steps[way])(m, cache) if steps[way] else None
        times = []
        with torch.no_grad():
            feed(tokens[:, :16], cache, step)  # warm-up: the compile, the capture, the allocator
            for _ in range(args.reps):
                cache.reset()
                sync()
                t0 = time.perf_counter()
                feed(tokens, cache, step)
                sync()
                times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        label = way if way == "eager" else f"step {way}"
        print(f"## tokenwise {d} {pol} {budget} {B} {T}: {B * T / s:.1f} tok/s ({label}) {1000 * s / T:.3f} ms a call,"
              f" median of {len(times)}", flush=True)
        cache = step = None
