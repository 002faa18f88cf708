"""Where a prefill's host time goes, by Python function (cProfile), SmolLM2 shape, random weights, bf16, on
CUDA: the fused prefill (full) beside the scored ones (a2sf one sequence, h2o eight), 1,024 tokens. A short
prompt's prefill is bound by the host (issue 18: 1,500-1,760 launches, 4.5-5.7 ms of GPU work in 23-45 ms), so
the scored rows' ratio to full is their extra host time; this says which functions hold it.

    python scripts/prefill_pyprof.py [--calls 10]
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import fast  # noqa: E402
import policies  # noqa: E402

ROWS = [("full", None, 1), ("a2sf", 256, 1), ("full", None, 8), ("h2o", 256, 8)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    m, _ = bench.build_model("smollm2", torch.device("cuda"), torch.bfloat16, weights="random")
    for pol, budget, batch in ROWS:
        p = policies.make_policy(pol, budget)
        tokens = torch.randint(0, m.cfg.vocab_size, (batch, 1024), device="cuda")
        caches = [fast.KVCache(m.cfg, p, budget, batch=batch, mode="prefill", device="cuda", dtype=torch.bfloat16,
                               max_len=1100) for _ in range(args.calls + 5)]
        with torch.no_grad():
            for c in caches[:5]:
                m(tokens, c)
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for c in caches[5:]:
                m(tokens, c)
            torch.cuda.synchronize()
            prof.disable()
            ms = (time.perf_counter() - t0) * 1000 / args.calls
        print(f"## {pol} batch {batch}: {ms:.2f} ms a prefill under cProfile")
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(r"(main|fast|policies|cache|model)\.py|kernels|jit\.py|launcher", 28)
        stats.sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
