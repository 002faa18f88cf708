"""Does a CUDA-graph decode step replay what the eager step computes while the cache is not yet full?
(test_gpu's fast-path greedy text diverged at its fourth decode token for a2sf and sink at budget 64
with a 40-token prompt: the first replay after the capture; full did not.)

`python scripts/capture_probe.py [--compiled] [--set MODULE.NAME=VALUE ...]`: SmolLM2's shape, random
bf16 weights, batch 1, 96 tokens fed token by token (a streaming chunk-1 cache, budget 64, as
generate.feed does: the first call plain, each later one the step) through two fast caches: the eager
call `model(tokens, cache)` every time, and fast.graph_decode's (or, with --compiled,
fast.compile_decode's) step. One line a policy: the largest logit difference in the warm-up and
capture calls, the first replays, the rest before the cache is full, and once it evicts; whether the
kept positions agree at the end.
"""
import argparse
import ast
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository's modules
import bench  # noqa: E402
import fast  # noqa: E402
import policies  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--compiled", action="store_true")
ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE")
ap.add_argument("--policies", default="sink,a2sf,h2o")
ap.add_argument("--tokens", type=int, default=96)
ap.add_argument("--budget", type=int, default=64)
args = ap.parse_args()
for setting in args.set:
    name, _, value = setting.partition("=")
    module, _, attr = name.rpartition(".")
    setattr(sys.modules[module], attr, ast.literal_eval(value))

dev = torch.device(os.environ.get("DEV", "cuda"))  # DEV=cpu MODEL=tiny: a smoke run (no graph on the CPU)
dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
m = bench.build_model(os.environ.get("MODEL", "smollm2"), dev, dt, "random")[0]
T = args.tokens
tokens = torch.randint(0, m.cfg.vocab_size, (1, T), device=dev, generator=torch.Generator(dev).manual_seed(0))
for pol in args.policies.split(","):
    torch._dynamo.reset()
    p = policies.make_policy(pol, args.budget)
    a, b = (fast.KVCache(m.cfg, p, args.budget, mode="streaming", chunk=1, device=dev, dtype=dt, max_len=T)
            for _ in range(2))
    step = (fast.compile_decode if args.compiled else fast.graph_decode)(m, b)
    diffs = []
    with torch.no_grad():
        for i in range(T):  # generate.feed's calls: the first a plain call, each later one the step
            want = m(tokens[:, i:i + 1], a)
            got = (m(tokens[:, i:i + 1], b) if i == 0 else step(tokens[:, i:i + 1])).clone()
            diffs.append((got.float() - want.float()).abs().max().item())
    kept = all(a.kept_positions(k) == b.kept_positions(k) for k in range(m.cfg.n_layers))
    parts = {"warm-up+capture (1-3)": diffs[1:4], "first replays (4-7)": diffs[4:8],
             f"not full (8-{args.budget - 1})": diffs[8:args.budget], f"evicting ({args.budget}-)": diffs[args.budget:]}
    print(f"## {'compiled' if args.compiled else 'graph'} {pol} {' '.join(args.set) or 'as is'}: max |logit diff| "
          + ", ".join(f"{k} {max(v, default=0):.3f}" for k, v in parts.items()) + f"; kept the same: {kept}", flush=True)
