"""What each policy keeps, as a picture: when every token of a text entered the cache and when it left.

    python evaluate.py keep-map                                   # an essay's first 320 tokens, budget 64
    python evaluate.py keep-map --layer 3 --kv-head 1 --budget 48 --policies sink,h2o,a2sf
    python evaluate.py keep-map --mode prefill --prompt 256       # the prompt compressed at once, then decode

The text goes through a real KVCache call by call (streaming: --chunk tokens per call, from the
first token; prefill: the first --prompt tokens in one call, then --chunk per call), and after every
call we read `cache.kept_positions(layer)`. A token is kept over one interval (an evicted token
never comes back), so the record is, per policy, KV head and position, [entered, left]: the number
of tokens fed when it was first held and when it was first gone (null: still held at the end;
entered == left: evicted by the call that brought it in). The PNG has a column per policy: the
chosen KV head (black: held) and the sum over KV heads (how many heads hold the token), with the
text position up and the tokens fed so far across: StreamingLLM's sinks are the band along the
bottom, the recent window is the diagonal edge, and H2O's old heavy hitters are the horizontal lines
that A2SF's forgetting factor cuts short. A policy and size is a work cell (sweep.py): under torchrun
the ranks share them, rank 0 writes the results file and the picture, a rerun computes only the rest.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data
import evaluate
import sweep

POLICIES = "window,sink,h2o,a2sf,vatp,tova"


def new_cache(model, policy, budget, **kw):
    """The cache that goes with the model (evaluate.cache_class): the same tokens are kept either way."""
    return evaluate.cache_class(model)(model.cfg, policy, budget, device=model.device, dtype=model.dtype, **kw)


def text_tokens(tok, args) -> tuple[str, list[int]]:
    """(name, the first --tokens tokens) of --text FILE or of the first Paul Graham essay."""
    if args.text:
        name, text = Path(args.text).name, Path(args.text).read_text(encoding="utf-8")
    else:
        name, text = next(iter(data.essays().items()))
    ids = tok.encode(text)
    if len(ids) < args.tokens:
        raise ValueError(f"{name} has {len(ids)} tokens, fewer than --tokens {args.tokens}")
    return name, ids[:args.tokens]


def call_bounds(T: int, mode: str, chunk: int, prompt: int | None) -> list[tuple[int, int]]:
    """[(start, end)] of the calls: prefill feeds the prompt whole first; then `chunk` per call."""
    first = min(prompt or chunk, T) if mode == "prefill" else min(chunk, T)
    return [(0, first)] + [(s, min(s + chunk, T)) for s in range(first, T, chunk)]


@torch.no_grad()
def record(model, tokens: list[int], policy, budget, layer: int, *, mode="streaming", chunk=1, prompt=None,
           positions="original", tick=lambda n: None) -> dict:
    """Feed `tokens` through a cache call by call; after each call read what `layer` keeps.
    -> {"calls": [tokens fed after each call], "intervals": [kv_head][position] = [entered, left or None]}."""
    T, H = len(tokens), model.cfg.n_kv_heads
    cache = new_cache(model, policy, budget, mode=mode, chunk=chunk, positions=positions,
                      max_len=T if budget is None else None)
    ids = torch.tensor([tokens], device=model.device)
    entered = np.full((H, T), -1)
    left = np.full((H, T), -1)
    calls = []
    for s, e in call_bounds(T, mode, chunk, prompt):
        model(ids[:, s:e], cache)
        calls.append(e)
        held = np.zeros((H, T), dtype=bool)
        for h, kept in enumerate(cache.kept_positions(layer)[0]):
            held[h, kept] = True
        new = np.zeros((H, T), dtype=bool)
        new[:, s:e] = True
        entered[new] = e  # fed in this call: entered now (evicted at once if not held)
        left[new & ~held] = e
        left[(entered >= 0) & (entered < e) & (left < 0) & ~held] = e  # held before, gone now
        tick(1)
    intervals = [[[int(entered[h, p]), None if left[h, p] < 0 else int(left[h, p])] for p in range(T)] for h in range(H)]
    return {"calls": calls, "intervals": intervals}


def held_matrix(intervals: list, calls: list[int]) -> np.ndarray:
    """(positions, calls) bool from one KV head's intervals: held after call c iff entered <= calls[c] < left."""
    ends = np.array(calls)[None, :]
    enter = np.array([a for a, _ in intervals])[:, None]
    leave = np.array([np.inf if b is None else b for _, b in intervals])[:, None]
    return (enter <= ends) & (ends < leave)


def summary(intervals: list, calls: list[int], budget: int | None, n_sink: int = 4) -> dict:
    """Per KV head at the last call: how many of the first n_sink tokens are held, how many tokens
    older than the budget (outside any recent window of that size), and the mean age of those held
    (tokens fed since; a window of b tokens has (b - 1) / 2)."""
    out = {"sinks_held": [], "old_held": [], "mean_age": []}
    T = calls[-1]
    for head in intervals:
        final = held_matrix(head, calls)[:, -1]
        out["sinks_held"].append(int(final[:n_sink].sum()))
        out["old_held"].append(int(final[:T - (budget or T)].sum()))
        out["mean_age"].append(round(float((T - 1 - np.flatnonzero(final)).mean()), 2))
    return out


def run_keep_map(model, tok, args, setup) -> list[dict]:
    if setup.method != "real":
        raise ValueError("keep-map reads the real cache: use --method real")
    L = model.cfg.n_layers
    layer = L // 2 if args.layer is None else args.layer
    if not 0 <= layer < L:
        raise ValueError(f"--layer {layer}: the model has layers 0 to {L - 1}")
    if not 0 <= args.kv_head < model.cfg.n_kv_heads:
        raise ValueError(f"--kv-head {args.kv_head}: the model has KV heads 0 to {model.cfg.n_kv_heads - 1}")
    name, tokens = text_tokens(tok, args)
    T = len(tokens)
    prompt = (args.prompt or T // 2) if setup.mode == "prefill" else None
    if prompt is not None and not 1 <= prompt <= T:
        raise ValueError(f"--prompt {prompt}: use 1 to --tokens ({T})")
    runs = [(v, s) for v in args.policy_list for s in (evaluate.sizes_from(args, "budget=64") if v != "full" else [None])]
    n_calls = len(call_bounds(T, setup.mode, setup.chunk, prompt))
    if args.dry_run:
        return [{"calls": n_calls * len(runs)}]

    def compute(cell, bar) -> dict:  # a cell (sweep.py): one policy and size; its result is its row
        v, size = cell
        budget = evaluate.budget_for(size, prompt or T)
        policy = evaluate.make_variant(v, budget, setup.flags)
        rec = record(model, tokens, policy, budget, layer, mode=setup.mode, chunk=setup.chunk, prompt=prompt,
                     positions=setup.positions, tick=bar.update)
        return dict(policy=v, size=size and dict([size]), budget=budget, text=name, tokens=T, layer=layer,
                    kv_head=args.kv_head, mode=setup.mode, chunk=setup.chunk, prompt=prompt,
                    token_text=[tok.decode([t]) for t in tokens],
                    **summary(rec["intervals"], rec["calls"], budget), **rec,
                    policy_fields=asdict(policy))

    done = sweep.run(getattr(args, "out", None), sweep.config_of(args), "keep-map", runs, compute, lambda c: n_calls)
    if done is None:  # another rank of a sweep: rank 0 writes the file and the picture
        return None
    results = [done[c]["result"] for c in runs]
    if not args.no_png:
        out = Path(args.out) if args.out else evaluate.RESULTS / f"keep-map-{time.strftime('%Y%m%d-%H%M%S')}.json"
        args.out = str(out)  # evaluate.save writes the results there; the picture goes beside it
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(results, out.with_suffix(".png"), title=f"{args.model or 'SmolLM2-135M-Instruct'}: {name}")
        evaluate.say(f"keep-map: wrote {out.with_suffix('.png')}")
    return results


def plot(plt, rows, metric=None):
    """Columns: one per run (policy, size). Rows: the chosen KV head, then the sum over KV heads."""
    fig, axes = plt.subplots(2, len(rows), figsize=(2.6 * len(rows) + 0.6, 5.6), squeeze=False, sharex=True, sharey=True)
    for j, r in enumerate(rows):
        calls = r["calls"]
        heads = [held_matrix(h, calls) for h in r["intervals"]]
        one, total = heads[r["kv_head"]], np.sum(heads, axis=0)
        extent = (0, calls[-1], -0.5, r["tokens"] - 0.5)
        kw = dict(origin="lower", aspect="auto", interpolation="nearest", extent=extent)
        axes[0, j].imshow(one, cmap="Greys", vmin=0, vmax=1, **kw)
        im = axes[1, j].imshow(total, cmap="viridis", vmin=0, vmax=len(heads), **kw)
        budget = r["budget"] if r["budget"] is not None else "all"
        axes[0, j].set_title(f"{r['policy']} (budget {budget})", fontsize=9)
        axes[1, j].set_xlabel("tokens fed")
        if j == 0:
            axes[0, j].set_ylabel(f"position (layer {r['layer']}, KV head {r['kv_head']})", fontsize=8)
            axes[1, j].set_ylabel(f"position (heads holding it, of {len(heads)})", fontsize=8)
    fig.colorbar(im, cax=axes[1, -1].inset_axes([1.04, 0, 0.05, 1]), ticks=range(len(heads) + 1))
    return fig


def save_png(rows, out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(plt, rows)
    r = rows[0]
    how = f"prefill {r['prompt']} then chunk {r['chunk']}" if r["mode"] == "prefill" else f"streaming, chunk {r['chunk']}"
    fig.suptitle(f"{title}; {r['tokens']} tokens, {how}: when each token is held", fontsize=9)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def add_command(add) -> None:
    """The subcommand, on evaluate.py's parser (`add` is its helper: name, func, help, defaults)."""
    s = add("keep-map", run_keep_map, "pictures of when each token entered and left the cache, per policy",
            default_policies=POLICIES)
    s.add_argument("--text", default=None, help="a text file (default: the first shipped Paul Graham essay)")
    s.add_argument("--tokens", type=int, default=320, help="first N tokens of the text")
    s.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    s.add_argument("--kv-head", type=int, default=0)
    s.add_argument("--prompt", type=int, default=None, help="--mode prefill: tokens of the first call (default half the text)")
    s.add_argument("--no-png", action="store_true", help="results file only")
