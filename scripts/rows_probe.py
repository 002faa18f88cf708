"""kernels.linear_rows (norm, matmul, epilogue in one kernel) against cuBLAS on the decode step's
shapes, each call inside a CUDA graph (no launch overhead counted twice), the weights rotating
through enough copies that none is read from L2 (as the layers of a step). Prints a table:
microseconds a call and the share of the copy bound (the weights' bytes at the measured copy
bandwidth) for cuBLAS alone (F.linear), the unfused sequence as torch runs it (norm, F.linear, silu *
up or + residual: what the compiled step had before, less inductor's fusion of the small ops), the
kernel with row_config's launch, one call after another and with programmatic dependent launch
(kernels.PDL: each call may start in the tail of the one before), and each launch config forced.

    python scripts/rows_probe.py [--models 7b,smollm2] [--configs]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fast import kernels  # noqa: E402

SHAPES = {  # name: (N out, K in, norm, glu, residual)
    "7b": [("qkv", 12288, 4096, True, False, False), ("o", 4096, 4096, False, False, True),
           ("gate_up", 11008, 4096, True, True, False), ("down", 4096, 11008, False, False, True),
           ("head", 32000, 4096, True, False, False)],
    "smollm2": [("qkv", 960, 576, True, False, False), ("o", 576, 576, False, False, True),
                ("gate_up", 1536, 576, True, True, False), ("down", 576, 1536, False, False, True),
                ("head", 49152, 576, True, False, False)],
}


def timed(fn, copies, reps=20):
    """Microseconds a call of fn(i) for i over the copies, all captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / (reps * copies)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="7b,smollm2")
    ap.add_argument("--configs", action="store_true", help="also each launch config forced")
    args = ap.parse_args()
    big = torch.empty(2**29, device="cuda", dtype=torch.uint8)
    copy_us = timed(lambda i: big[: 2**28].copy_(big[2**28:]), 1, 10)
    bw = 2 * 2**28 / copy_us / 1e6  # TB/s: read and write
    print(f"# copy bandwidth {bw:.2f} TB/s; one row; {torch.cuda.get_device_name()}")
    print("| model | matrix | N x K | bound us | cuBLAS only | unfused torch | linear_rows (row_config) | with PDL |"
          " best config |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models.split(","):
        for shape in SHAPES[model]:
            print(probe(model, *shape, bw, args.configs), flush=True)


def probe(model, name, N, K, norm, glu, res, bw, configs):
    """One table row for one matrix shape."""
    dev, dt = "cuda", torch.bfloat16
    rowsN = 2 * N if glu else N
    nbytes = rowsN * K * 2
    copies = max(2, min(64, -(-400 * 2**20 // nbytes)))  # > 400 MB in all: none from L2
    ws = [torch.randn(rowsN, K, device=dev, dtype=dt) / K**0.5 for _ in range(copies)]
    x = torch.randn(1, K, device=dev, dtype=dt)
    g = torch.rand(K, device=dev, dtype=dt) + 0.5 if norm else None
    r = torch.randn(1, N, device=dev, dtype=dt) if res else None
    bound = nbytes / bw / 1e6
    cublas = timed(lambda i: torch.nn.functional.linear(x, ws[i]), copies)
    unfused = timed(lambda i: kernels.linear_rows_reference(x, ws[i], None, g, 1e-5, r, glu), copies)
    kernels.PDL = False
    tuned = timed(lambda i: kernels.linear_rows(x, ws[i], None, g, 1e-5, r, glu), copies)
    kernels.PDL = None  # on where the device has it: each call may start in the tail of the one before
    chained = timed(lambda i: kernels.linear_rows(x, ws[i], None, g, 1e-5, r, glu), copies)
    pick = kernels.row_config(N, K, glu)
    best = ""
    if configs:
        t = {c: timed(lambda i, c=c: kernels.linear_rows(x, ws[i], None, g, 1e-5, r, glu, config=c), copies)
             for c in kernels.ROW_CONFIGS}
        c = min(t, key=t.get)
        best = f"{t[c]:.1f} {c}; all: " + " ".join(f"{v:.1f}" for v in t.values())
    ref = kernels.linear_rows_reference(x, ws[0], None, g, 1e-5, r, glu).float()
    err = (kernels.linear_rows(x, ws[0], None, g, 1e-5, r, glu).float() - ref).abs().max().item()
    return (f"| {model} | {name} | {rowsN} x {K} | {bound:.1f} | {cublas:.1f} ({bound / cublas:.0%}) | "
            f"{unfused:.1f} | {tuned:.1f} ({bound / tuned:.0%}) {pick} err {err:.2g} | {chained:.1f} ({bound / chained:.0%}) | "
            f"{best} |")

if __name__ == "__main__":
    main()
