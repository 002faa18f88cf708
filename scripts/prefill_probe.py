"""Where the time of one prefill through the cache goes, on CUDA (not part of the test or bench
runs): for each model shape, context and policy, the wall time of a prefill (median of 5), the
time the host spends issuing it (the prefill with every kernel launch but no wait for the GPU:
torch.cuda.synchronize only at the end), the GPU's busy time from the profiler (the sum of its
kernels' times) and the number of kernel launches. A prefill whose wall time is close to its
host time and far above its GPU time is bound by launches, not by the GPU: fewer tensor ops is
then what makes it faster. Prints a table.

    python scripts/prefill_probe.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402
import generate  # noqa: E402
import policies  # noqa: E402
from cache import KVCache  # noqa: E402

CASES = [("smollm2", 1024, 256), ("llama7b", 2048, 1024), ("llama7b", 8192, 1638)]
POLICIES = ("full", "window", "sink", "h2o", "a2sf", "vatp")


def make_cache(m, tokens, policy_name, budget):
    p = policies.make_policy(policy_name, None if policy_name == "full" else budget)
    return KVCache(m.cfg, p, None if p.keep_all else budget, mode="prefill", device=tokens.device, dtype=m.dtype,
                   max_len=tokens.shape[1] + 72)


def main():
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bfloat16, random weights")
    print("| model | ctx | policy | wall ms | host ms | GPU busy ms | launches | wall / full |")
    print("|---|---|---|---|---|---|---|---|")
    loaded = {}
    for name, ctx, budget in CASES:
        if name not in loaded:
            loaded.clear()
            torch.cuda.empty_cache()
            loaded[name] = bench.build_model(name, dev, torch.bfloat16, "random")[0]
        m = loaded[name]
        tokens = torch.randint(0, m.cfg.vocab_size, (1, ctx), device=dev)
        full_ms = None
        for pol in POLICIES:
            with torch.no_grad():
                generate.feed(m, tokens, make_cache(m, tokens, pol, budget), last_only=True)  # warm-up
                walls, hosts = [], []
                for _ in range(5):
                    cache = make_cache(m, tokens, pol, budget)  # made outside the timing, as bench.py does
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    generate.feed(m, tokens, cache, last_only=True)
                    t1 = time.perf_counter()  # every launch issued
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    hosts.append(t1 - t0)
                    walls.append(t2 - t0)
                cache = make_cache(m, tokens, pol, budget)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    generate.feed(m, tokens, cache, last_only=True)
                    torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.device_time_total for e in kernels) / 1e3  # us -> ms
            wall, host = 1e3 * statistics.median(walls), 1e3 * statistics.median(hosts)
            full_ms = full_ms or wall
            print(f"| {name} | {ctx} | {pol} | {wall:.1f} | {host:.1f} | {busy:.1f} | {len(kernels)} | {wall / full_ms:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
