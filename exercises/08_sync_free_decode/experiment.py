"""Exercise 08's experiment: `python -m exercises 08`. The naive and the sync-free decode loops on
the real model: the same tokens, host syncs per step, milliseconds per step on this machine."""

import time

import torch

import policies
from cache import KVCache
from exercises import course


def main(impl, n=32, budget=64, repeats=3):
    m, tok = course.default_model()
    prompt = torch.tensor([course.prompt_ids(tok, 10_000)])
    eos = tok.encode(".")[0]  # stop at the first full stop: the naive loop stops there, yours runs on

    def cache():
        return KVCache(m.cfg, policies.make_policy("a2sf", budget), budget, mode="prefill")

    def seconds(fn, steps):  # with an eos that never comes: every run makes `steps` steps
        t0 = time.perf_counter()
        fn(m, cache(), prompt, steps, -1)
        return time.perf_counter() - t0

    names = ("decode_with_syncs", "decode_without_syncs")
    per_step = {name: [] for name in names}
    with torch.no_grad():
        seconds(impl.decode_without_syncs, 2)  # warm-up
        for _ in range(repeats):  # interleaved, so that both see the same machine load
            for name in names:
                fn = getattr(impl, name)
                per_step[name].append((seconds(fn, n) - seconds(fn, n // 2)) / (n - n // 2) * 1000)  # prefill cancels

    print(f"lighthouse prompt ({prompt.shape[1]} tokens), a2sf budget {budget} (prefill mode), greedy, eos = '.'\n")
    with torch.no_grad():
        for name in names:
            with course.HostSyncs() as syncs:
                out = getattr(impl, name)(m, cache(), prompt, n, eos)
            ms = sorted(per_step[name])[len(per_step[name]) // 2]
            print(f"{name:21s}: {out.shape[1]:2d} tokens, {len(syncs.ops):3d} host syncs ({len(syncs.ops) / out.shape[1]:.1f}"
                  f" per token), {ms:.1f} ms per decode step on this CPU (median of {repeats})")
            print(f"    {tok.decode(out[0].tolist())!r}")
    print("\nOn the CPU a sync costs nothing: every op has finished before the next starts. On a GPU, each sync makes\n"
          "the host wait for the device's queue to drain before it launches the next step.")
