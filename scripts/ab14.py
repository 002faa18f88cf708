"""Issue 14's before/after, interleaved: the landed main's files (old/, commit 783c16e) and this
checkout's, each in a worker process of its own, driven in turn by this one, so every SmolLM2 row of
`bench.py --plan targets-smollm2` is timed old, new, old, new, ... on the same GPU, the same host,
the same minute. `python scripts/ab14.py [--prefill N] [--decode ROUNDS]` (env ONLY="a2sf 16384"
picks rows; DEV=cpu MODEL=tiny for a smoke run).

Why: the 1k-token prefills take 20-50 ms of which the GPU is busy ~5: they time the host (Python and
kernel launches), whose speed drifts by 20% between runs of the same code. Alternating single
prefills cancels the drift; the table gives each side's minimum and median and the median of the
paired ratios new / old. Decode: each side's compiled, graph-captured step, timed in alternating
blocks of 32 steps.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = [("full", None, 1024, 1, "prefill"), ("full", None, 1024, 8, "prefill"), ("a2sf", 256, 1024, 1, "prefill"),
        ("sink", 256, 1024, 1, "prefill"), ("window", 256, 1024, 1, "prefill"), ("h2o", 256, 1024, 8, "prefill"),
        ("full", None, 16384, 1, "prefill"), ("a2sf", 3277, 16384, 1, "prefill"), ("a2sf", 3277, 16384, 1, "streaming")]


def worker(folder: str, conn) -> None:
    """One side: its bench, model and caches; answers ("prefill", row) with seconds, ("decode", row)
    (compile and capture on the last prefill's cache), ("steps", n) with seconds per step."""
    os.chdir(folder)
    sys.path.insert(0, folder)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", f"/tmp/ab14-inductor-{Path(folder).name}")  # its kernels: kernel_source()
    import torch

    import bench
    import generate
    import policies
    new = hasattr(bench, "fast")
    dev = torch.device(os.environ.get("DEV", "cuda"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    m = bench.build_model(os.environ.get("MODEL", "smollm2"), dev,
                          torch.bfloat16 if dev.type == "cuda" else torch.float32, "random")[0]
    m = bench.fast.enable(m) if new else m
    KV = bench.fast.KVCache if new else bench.KVCache
    compile_decode = bench.fast.compile_decode if new else generate.compile_decode
    state = {}
    conn.send("ready")
    with torch.no_grad():
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                return
            if cmd == "prefill":
                pol, budget, ctx, B, mode = arg
                state.clear()
                gen = torch.Generator(device=dev).manual_seed(ctx + B)
                tokens = torch.randint(0, m.cfg.vocab_size, (B, ctx), device=dev, generator=gen)
                cache = KV(m.cfg, policies.make_policy(pol, budget), budget, batch=B, mode=mode,
                           chunk=512 if mode == "streaming" else 1, device=dev, dtype=m.dtype, max_len=ctx + 400)
                sync()
                t0 = time.perf_counter()
                logits = generate.feed(m, tokens, cache, last_only=True)[:, -1]
                sync()
                conn.send(time.perf_counter() - t0)
                state.update(cache=cache, nxt=logits.argmax(-1)[:, None])
            elif cmd == "decode":
                state["step"] = compile_decode(m, state["cache"])
                for _ in range(3):  # compile, capture
                    state["nxt"] = state["step"](state["nxt"].clone())[:, -1].argmax(-1)[:, None]
                sync()
                conn.send("ok")
            elif cmd == "steps":
                sync()
                t0 = time.perf_counter()
                for _ in range(arg):
                    state["nxt"] = state["step"](state["nxt"].clone())[:, -1].argmax(-1)[:, None]
                sync()
                conn.send((time.perf_counter() - t0) / arg)


def kernel_source(pattern: str) -> None:
    """Print each side's generated Triton kernels whose name holds `pattern` (--kernels PATTERN)."""
    for folder in (ROOT / "old", ROOT):
        for f in sorted(Path(f"/tmp/ab14-inductor-{folder.name}").rglob("*.py")):
            text = f.read_text(errors="replace")
            for part in text.split("@triton.jit")[1:]:
                name = part.split("def ", 1)[1].split("(", 1)[0] if "def " in part else ""
                if pattern in name:
                    print(f"### {folder.name} {f.name} {name}\n@triton.jit{part.split(chr(39) * 3, 1)[0]}")


def main() -> None:
    args = sys.argv[1:]
    n_prefill = int(args[args.index("--prefill") + 1]) if "--prefill" in args else 30
    rounds = int(args[args.index("--decode") + 1]) if "--decode" in args else 6
    ctx = mp.get_context("spawn")
    sides = {}
    for side, folder in (("old", ROOT / "old"), ("new", ROOT)):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(str(folder), there), daemon=True)
        proc.start()
        sides[side] = here
    for conn in sides.values():
        assert conn.recv() == "ready"

    def ask(side, cmd, arg=None):
        sides[side].send((cmd, arg))
        return sides[side].recv()

    print("| policy | budget | ctx | B | mode | prefill ms old min / med | new min / med | new/old (median of pairs)"
          " | decode ms/step old min / med | new min / med | decode new/old (medians) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        pol, budget, ctxlen, B, mode = row
        if os.environ.get("ONLY") and os.environ["ONLY"] not in f"{pol} {ctxlen} {mode}":
            continue
        reps = n_prefill if ctxlen <= 8192 else max(3, n_prefill // 6)
        times = {"old": [], "new": []}
        for r in range(reps + 1):  # the first of each: warm-up
            for side in (("old", "new") if r % 2 else ("new", "old")):
                t = ask(side, "prefill", row)
                if r:
                    times[side].append(t)
        pairs = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
        dts = {"old": [], "new": []}
        for side in sides:
            ask(side, "decode", row)
        for r in range(rounds):
            for side in (("old", "new") if r % 2 else ("new", "old")):
                dts[side].append(ask(side, "steps", 32))
        ms = lambda xs: f"{1000 * min(xs):.2f} / {1000 * statistics.median(xs):.2f}"  # noqa: E731
        dec = statistics.median(dts["new"]) / statistics.median(dts["old"])
        print(f"| {pol} | {budget or '-'} | {ctxlen} | {B} | {mode} | {ms(times['old'])} | {ms(times['new'])} | {pairs:.3f}"
              f" | {ms(dts['old'])} | {ms(dts['new'])} | {dec:.3f} |", flush=True)
    for side in sides:
        sides[side].send(("stop", None))
    if "--kernels" in args:
        kernel_source(args[args.index("--kernels") + 1])


if __name__ == "__main__":
    main()
