"""Kernel timings on CUDA behind fast/kernels.py's choices (not part of the test or bench runs):
prefill attention with and without the row log-sum-exp, the column sums, and the decode kernel's
split size against the explicit and fused decode attention. Prints a table ("split": the column sums'
split loop, kernels.COLUMN_SUMS_SPLIT). --configs: the column
sums under each of its launch configs (kernels.COLUMN_SUMS_CONFIGS) and the autotuner's pick
(with --split too: the split loop's); --decode: the decode table only."""

import functools
import math
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository's modules
import model  # noqa: E402
from fast import kernels  # noqa: E402


def timed(fn, *args, reps=20):
    fn(*args)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn(*args)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def graphed(fn, *args, reps=50):
    """Milliseconds per call on the GPU alone: `reps` calls captured in one CUDA graph and
    replayed (as the decode step runs), so the host's launch time does not count."""
    fn(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def forced(config, q, k, lse, w, reps, split=False):
    """ms of column_sums under one launch config; nan where it does not launch (out of shared memory)."""
    try:
        return timed(functools.partial(kernels.column_sums, config=config, split_loop=split), q, k, lse, w, reps=reps)
    except Exception as e:  # triton's OutOfResources and the like: the autotuner skips such a config too
        print(f"config {config}: {type(e).__name__}", file=sys.stderr)
        return float("nan")


def causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def cudnn(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                              scale=1 / math.sqrt(q.shape[-1]))


def main():
    dev, dt = "cuda", torch.bfloat16
    H, D = 32, 128
    print("| T | sdpa ms | fa2+lse ms | cudnn+lse ms | colsum h2o ms | colsum a2sf ms | split h2o ms | split a2sf ms |"
          " lse diff fa2-cudnn |")
    print("|---|---|---|---|---|---|---|---|---|")
    for T in () if "--decode" in sys.argv else (2048, 8192, 32768):  # --decode: the decode table only
        q = torch.randn(1, H, 1, T, D, device=dev, dtype=dt)
        k, v = torch.randn(1, H, T, D, device=dev, dtype=dt), torch.randn(1, H, T, D, device=dev, dtype=dt)
        q4 = q.view(1, H, T, D)
        reps = 20 if T < 32768 else 3
        t_sdpa = timed(causal, q4, k, v, reps=reps)
        t_fa2 = timed(kernels.causal_attention_lse, q, k, v, reps=reps)
        _, lse = kernels.causal_attention_lse(q, k, v)
        try:
            t_cud = timed(cudnn, q4, k, v, reps=reps)
            lse_c = cudnn(q4, k, v)[1]
            diff = f"{tuple(lse_c.shape)} {(lse_c.reshape(lse.shape).float() - lse.float()).abs().max().item():.2e}"
        except Exception as e:
            t_cud, diff = float("nan"), f"{type(e).__name__}: {str(e)[:60]}"
        w1 = torch.ones(1, T, device=dev)
        wa = 0.2 ** (T - 1 - torch.arange(T, device=dev, dtype=torch.float32))[None]
        t_c1, t_ca, t_s1, t_sa = (timed(functools.partial(kernels.column_sums, split_loop=split), q, k, lse, w, reps=reps)
                                  for split in (False, True) for w in (w1, wa))
        split_diff = (kernels.column_sums(q, k, lse, w1, split_loop=True) - kernels.column_sums(q, k, lse, w1)).abs().max()
        print(f"| {T} | {t_sdpa:.3f} | {t_fa2:.3f} | {t_cud:.3f} | {t_c1:.3f} | {t_ca:.3f} | {t_s1:.3f} | {t_sa:.3f} |"
              f" {diff}; split vs one loop (h2o) {split_diff.item():.2e} |", flush=True)
    if "--configs" in sys.argv:  # column_sums under each launch config it may take, and the autotuner's pick
        print("\n| T | weights | " + " | ".join(f"{m}x{n} w{w} s{st} ms" for m, n, w, st in kernels.COLUMN_SUMS_CONFIGS)
              + " | tuned ms | tuned pick |")
        print("|---|---|" + "---|" * (len(kernels.COLUMN_SUMS_CONFIGS) + 2))
        splits = (False, True) if "--split" in sys.argv else (False,)
        for T, split in ((T, split) for T in (4096, 8192, 32768) for split in splits):
            q = torch.randn(1, H, 1, T, D, device=dev, dtype=dt)
            k, v = torch.randn(1, H, T, D, device=dev, dtype=dt), torch.randn(1, H, T, D, device=dev, dtype=dt)
            _, lse = kernels.causal_attention_lse(q, k, v)
            reps = 10 if T < 32768 else 3
            for name, w in (("h2o", torch.ones(1, T, device=dev)),
                            ("a2sf", 0.2 ** (T - 1 - torch.arange(T, device=dev, dtype=torch.float32))[None])):
                ts = [forced(c, q, k, lse, w, reps, split) for c in kernels.COLUMN_SUMS_CONFIGS]
                tuned = timed(functools.partial(kernels.column_sums, split_loop=split), q, k, lse, w, reps=reps)
                pick = kernels._column_sums_tuned.best_config  # (the first call tunes, not timed)
                print(f"| {T} | {name}{' split' if split else ''} | " + " | ".join(f"{t:.3f}" for t in ts)
                      + f" | {tuned:.3f} | {pick} |", flush=True)
    print("\n(decode: GPU time per call, captured in a CUDA graph as the decode step is)")
    print("\n| S | split | decode kernel ms | without probs ms | explicit ms | sdpa (no probs) ms |")
    print("|---|---|---|---|---|---|")
    for S, heads in ((1096, 32), (6555, 32), (257, 3)):
        q = torch.randn(1, heads, 1, 1, D, device=dev, dtype=dt)
        k, v = torch.randn(1, heads, S, D, device=dev, dtype=dt), torch.randn(1, heads, S, D, device=dev, dtype=dt)
        mask = torch.ones(1, heads, 1, S, device=dev, dtype=torch.bool)
        t_exp = graphed(model.attend, q, k, v, mask, True)
        t_sdpa = graphed(model.attend, q, k, v, mask, False)
        orig = kernels.decode_split
        for split in (32, 64, 128, 256, 512):
            kernels.decode_split = lambda S_, h_, s=split: s
            t = graphed(kernels.decode_attention, q, k, v, mask)
            t_np = graphed(kernels.decode_attention, q, k, v, mask, False)
            print(f"| {S} x {heads} | {split} | {t:.4f} | {t_np:.4f} | {t_exp:.4f} | {t_sdpa:.4f} |", flush=True)
        kernels.decode_split = orig
        t = graphed(kernels.decode_attention, q, k, v, mask)
        t_np = graphed(kernels.decode_attention, q, k, v, mask, False)
        print(f"| {S} x {heads} | heuristic {orig(S, heads)} | {t:.4f} | {t_np:.4f} | | |")


if __name__ == "__main__":
    main()
