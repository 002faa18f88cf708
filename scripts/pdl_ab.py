"""The decode step under settings of the fast module, timed side by side in one process: each variant's step
compiled and captured on its own cache (the same prompt), then their CUDA graphs replayed in turns, so a
machine that is slower for a while slows every variant alike. Prints ms a step (the median of the turns)
and each variant's speed against the first. The variants (--ab):

    pdl     programmatic dependent launch (fast.kernels.PDL) off, on, and inductor's kernels too (fast.step.INDUCTOR_PDL)
    append  the new token's rotary, cache write and mask as inductor's kernels (fast.model.APPEND off), then
            as one kernel (kernels.append_step)
    merge   the decode attention's splits merged by a kernel after it (kernels.MERGE_ELEMENTS 0), then by its
            own last program
    fused   neither of the two, then both
    split   decode_attention's keys a program (kernels.decode_split) forced to 64, 128, 256
    split32 64 and 32 keys a program, the merge in the split pass up to 16,384 floats (kernels.MERGE_ELEMENTS)
    scored  the free slot (an argmax kernel) and the new token's state (a scatter kernel) apart; the slot found
            by the append kernel (fast.cache.FIND_SLOT); and the state started in the eviction too
            (fast.cache.START_IN_EVICT)
    scored2 the first and last of `scored`
    state   the new token's state by start_state's scatter, then in the eviction (fast.cache.START_IN_EVICT)
    slot    as it is (one variant: a row's ms a step)
    join    the append kernel and the attention's apart, then in one (fast.model.JOIN, kernels.append_attention)
    embed   the step's embedding and rotary angles eager, then compiled (fast.step.EMBED)
    chunk   the one-victim eviction as one reduction a KV head, then over chunks of 256 and 512 slots
            (fast.cache.EVICT_CHUNK)

--profile: also the top CUDA kernels of 5 steps of each variant (torch.profiler over the graph's replays).

    python scripts/pdl_ab.py [--ab pdl] [--models smollm2,llama7b] [--context 1024] [--steps 100] [--turns 7]
"""

import argparse
import faulthandler
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import fast  # noqa: E402
import generate  # noqa: E402
import policies  # noqa: E402

# variant: {(module, setting): value}; the settings go back to the defaults after the captures
AB = {"pdl": {"launched one by one": {(fast.kernels, "PDL"): False, (fast.step, "INDUCTOR_PDL"): False},
              "PDL (ours)": {(fast.kernels, "PDL"): None, (fast.step, "INDUCTOR_PDL"): False},
              "PDL (ours and inductor's)": {(fast.kernels, "PDL"): None, (fast.step, "INDUCTOR_PDL"): True}},
      "append": {"append apart": {(fast.model, "APPEND"): False}, "append kernel": {(fast.model, "APPEND"): True}},
      "merge": {"merge apart": {(fast.kernels, "MERGE_ELEMENTS"): 0},
                "merge in the split pass": {(fast.kernels, "MERGE_ELEMENTS"): fast.kernels.MERGE_ELEMENTS}},
      "split": {f"{n} keys a program": {(fast.kernels, "decode_split"): (lambda S, heads, n=n: n)} for n in (64, 128, 256)},
      "split32": {f"{n} keys a program, merge up to 16,384 floats": {(fast.kernels, "decode_split"): (lambda S, heads, n=n: n),
                                                                     (fast.kernels, "MERGE_ELEMENTS"): 16384}
                  for n in (64, 32)},
      "fused": {"neither": {(fast.model, "APPEND"): False, (fast.kernels, "MERGE_ELEMENTS"): 0},
                "append kernel and merge": {(fast.model, "APPEND"): True,
                                            (fast.kernels, "MERGE_ELEMENTS"): fast.kernels.MERGE_ELEMENTS}},
      "scored": {"slot and state apart": {(fast.cache, "FIND_SLOT"): 0, (fast.cache, "START_IN_EVICT"): False},
                 "slot in append": {(fast.cache, "FIND_SLOT"): fast.cache.FIND_SLOT, (fast.cache, "START_IN_EVICT"): False},
                 "slot in append, state in evict": {(fast.cache, "FIND_SLOT"): fast.cache.FIND_SLOT,
                                                    (fast.cache, "START_IN_EVICT"): True}},
      "embed": {"embedding and angles eager": {(fast.step, "EMBED"): False},
                "embedding and angles compiled": {(fast.step, "EMBED"): True}},
      "join": {"append and attention apart": {(fast.model, "JOIN"): False},
               "append and attention in one": {(fast.model, "JOIN"): True}},
      "chunk": {f"eviction chunk {c}": {(fast.cache, "EVICT_CHUNK"): c} for c in (None, 256, 512)},
      "state": {"state by start_state": {(fast.cache, "START_IN_EVICT"): False},
                "state in evict": {(fast.cache, "START_IN_EVICT"): True}},
      "slot": {"slot in append": {(fast.cache, "FIND_SLOT"): fast.cache.FIND_SLOT, (fast.cache, "START_IN_EVICT"): False}},
      "scored2": {"slot and state apart": {(fast.cache, "FIND_SLOT"): 0, (fast.cache, "START_IN_EVICT"): False},
                  "slot in append, state in evict": {(fast.cache, "FIND_SLOT"): fast.cache.FIND_SLOT,
                                                     (fast.cache, "START_IN_EVICT"): True}}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ab", default="pdl", choices=sorted(AB))
    ap.add_argument("--models", default="smollm2,llama7b")
    ap.add_argument("--policies", default="full,a2sf")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--turns", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if os.environ.get("HANG_S"):  # where a stalled run stands (the Python stacks), then exit
        faulthandler.dump_traceback_later(int(os.environ["HANG_S"]), exit=True)
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch 1, {args.context} tokens of prompt")
    variants = AB[args.ab]
    print("| model | policy | " + " | ".join(f"{v} ms/step" for v in variants) + " | " +
          " | ".join(f"{v} speed-up" for v in list(variants)[1:]) + " |")
    print("|" + " --- |" * (2 + 2 * len(variants) - 1))
    for name in args.models.split(","):
        m, _ = bench.build_model(name, device, torch.bfloat16, weights="random")
        for policy_name in args.policies.split(","):
            print(row(m, name, policy_name, variants, args), flush=True)
        m = None
        torch.cuda.empty_cache()


def row(m, name, policy_name, variants, args):
    budget = None if policy_name == "full" else args.budget
    p = policies.make_policy(policy_name, budget)
    tokens = torch.randint(0, m.cfg.vocab_size, (1, args.context), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(0))
    steps = {}
    defaults = {key: getattr(*key) for settings in variants.values() for key in settings}
    with torch.no_grad():
        for variant, settings in variants.items():
            torch._dynamo.reset()
            for (module, setting), value in settings.items():
                setattr(module, setting, value)
            cache = fast.KVCache(m.cfg, p, budget, batch=1, device="cuda", dtype=m.dtype, mode="prefill",
                                 max_len=args.context + args.steps * (args.turns + 1) + 16)
            nxt = generate.feed(m, tokens, cache, last_only=True)[:, -1].argmax(-1)[:, None]
            step = fast.compile_decode(m, cache, dynamic=False)
            for _ in range(4):  # compile, then capture (PDL is read at the capture: the launches are recorded)
                nxt = step(nxt.clone())[:, -1].argmax(-1)[:, None]
            steps[variant] = (step, nxt)
            print(f"# {name} {policy_name}: {variant} captured", flush=True)
        for (module, setting), value in defaults.items():
            setattr(module, setting, value)
        ms = {v: [] for v in variants}
        for _ in range(args.turns):
            for variant, (step, nxt) in steps.items():
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(args.steps):
                    nxt = step(nxt)[:, -1:].argmax(-1)
                b.record()
                torch.cuda.synchronize()
                ms[variant].append(a.elapsed_time(b) / args.steps)
        if args.profile:
            for variant, (step, nxt) in steps.items():
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        nxt = step(nxt)[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                print(f"## {name} {policy_name}: {variant}, 5 steps")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
    med = {v: statistics.median(t) for v, t in ms.items()}
    first = med[next(iter(variants))]
    return (f"| {name} | {policy_name} | " + " | ".join(f"{t:.3f}" for t in med.values()) + " | " +
            " | ".join(f"{first / med[v]:.3f}x" for v in list(variants)[1:]) + " |")


if __name__ == "__main__":
    main()
