"""kernels.decode_attention (the decode kernel and its merge) under launch configs, on the decode
step's shapes, each call inside a CUDA graph, the keys and values rotating through copies that do
not fit in L2. Prints microseconds a call and the share of the keys' and values' copy bound.

    python scripts/decode_probe.py
"""

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rows_probe import timed  # noqa: E402

from fast import kernels  # noqa: E402

SHAPES = [("7b", 32, 1, 1024, 128), ("7b", 32, 1, 2048, 128), ("7b", 32, 1, 8192, 128), ("smollm2", 3, 3, 1024, 64)]


def main():
    big = torch.empty(2**29, device="cuda", dtype=torch.uint8)
    bw = 2 * 2**28 / timed(lambda i, big=big: big[: 2**28].copy_(big[2**28:]), 1, 10) / 1e6  # TB/s
    big = None
    print(f"# copy bandwidth {bw:.2f} TB/s; {torch.cuda.get_device_name()}")
    print("| model | Hkv x G | keys | probs | bound us | default | best | config (SPLIT, BLOCK_N, warps, stages) | next 3 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, need in itertools.product(SHAPES, (False, True)):
        print(probe(*shape, need, bw), flush=True)


def probe(model, Hkv, G, S, D, need, bw):
    nbytes = 2 * Hkv * S * D * 2
    copies = max(2, min(64, -(-400 * 2**20 // nbytes)))
    kv = [(torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16),
           torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]
    q = torch.randn(1, Hkv, G, 1, D, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, Hkv, 1, S, device="cuda", dtype=torch.bool)
    default = timed(lambda i: kernels.decode_attention(q, *kv[i], mask, need), copies)
    t = {}
    for c in itertools.product((64, 128, 256), (32, 64), (2, 4, 8), (1, 2, 3)):  # SPLIT, BLOCK_N, warps, stages
        if c[1] > c[0]:
            continue
        try:
            t[c] = timed(lambda i, c=c: kernels.decode_attention(q, *kv[i], mask, need, config=c), copies)
        except Exception as e:  # noqa: BLE001 (a config out of resources)
            print(f"# {c}: {type(e).__name__}")
    ranked = sorted(t, key=t.get)
    bound = nbytes / bw / 1e6
    return (f"| {model} | {Hkv} x {G} | {S} | {need} | {bound:.1f} | {default:.1f} | {t[ranked[0]]:.1f} | {ranked[0]} | "
            + "; ".join(f"{c} {t[c]:.1f}" for c in ranked[1:4]) + " |")

if __name__ == "__main__":
    main()
