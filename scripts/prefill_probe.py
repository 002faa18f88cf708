"""Where the time of one prefill through the cache goes, on CUDA (not part of the test or bench
runs): for each model shape, context and policy, the wall time of a prefill (median of 5, the
policies interleaved), the time the host spends issuing it (every kernel launched, before the
wait for the GPU), the GPU's busy time from the profiler (the sum of its kernels' times) and the
number of kernel launches. A prefill whose wall time is close to its host time and far above its
GPU time is bound by launches, not by the GPU: fewer tensor ops is then what makes it faster.
Prints a table.

    python scripts/prefill_probe.py                 # the table
    python scripts/prefill_probe.py --profile sink  # the host's costliest ops (SmolLM2 shape, 1k)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402
import fast  # noqa: E402
import generate  # noqa: E402
import policies  # noqa: E402

CASES = [("smollm2", 1024, 256), ("llama7b", 2048, 1024), ("llama7b", 8192, 1638)]
POLICIES = ("full", "window", "sink", "h2o", "a2sf", "vatp")


def make_cache(m, tokens, policy_name, budget):
    p = policies.make_policy(policy_name, None if policy_name == "full" else budget)
    return fast.KVCache(m.cfg, p, None if p.keep_all else budget, mode="prefill", device=tokens.device, dtype=m.dtype,
                        max_len=tokens.shape[1] + 72)


def profile_host(m, tokens, pol, budget, rows=15):
    """The host side of one prefill: the ops with the most CPU time of their own."""
    with torch.no_grad():
        cache = make_cache(m, tokens, pol, budget)
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, with_stack=False) as prof:
            generate.feed(m, tokens, cache, last_only=True)
            torch.cuda.synchronize()
    print(f"## {pol}: host ops by their own CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))


def main():
    dev = torch.device("cuda")
    if "--profile" in sys.argv:  # python scripts/prefill_probe.py --profile [policy ...]: SmolLM2 shape, 1k
        m = bench.build_model("smollm2", dev, torch.bfloat16, "random")[0]
        tokens = torch.randint(0, m.cfg.vocab_size, (1, 1024), device=dev)
        for pol in [a for a in sys.argv[1:] if a != "--profile"] or ["full", "sink", "a2sf"]:
            with torch.no_grad():
                generate.feed(m, tokens, make_cache(m, tokens, pol, 256), last_only=True)  # warm-up
            profile_host(m, tokens, pol, 256)
        return
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
        with torch.no_grad():
            for pol in POLICIES:  # warm-up: compile Triton, set up cuBLAS and the allocator
                generate.feed(m, tokens, make_cache(m, tokens, pol, budget), last_only=True)
            walls, hosts = {pol: [] for pol in POLICIES}, {pol: [] for pol in POLICIES}
            for _ in range(5):  # the policies interleaved: a slower host for a while slows them all alike
                for pol in POLICIES:
                    cache = make_cache(m, tokens, pol, budget)  # made outside the timing, as bench.py does
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    generate.feed(m, tokens, cache, last_only=True)
                    t1 = time.perf_counter()  # every launch issued
                    torch.cuda.synchronize()
                    hosts[pol].append(t1 - t0)
                    walls[pol].append(time.perf_counter() - t0)
        full_ms = 1e3 * statistics.median(walls["full"])
        for pol in POLICIES:
            with torch.no_grad():
                cache = make_cache(m, tokens, pol, budget)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    generate.feed(m, tokens, cache, last_only=True)
                    torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.device_time_total for e in kernels) / 1e3  # us -> ms
            wall, host = 1e3 * statistics.median(walls[pol]), 1e3 * statistics.median(hosts[pol])
            print(f"| {name} | {ctx} | {pol} | {wall:.1f} | {host:.1f} | {busy:.1f} | {len(kernels)} | {wall / full_ms:.2f} |",
                  flush=True)

if __name__ == "__main__":
    main()
