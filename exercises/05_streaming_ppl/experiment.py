"""Exercise 05's experiment: `python -m exercises 05`. Streaming perplexity of 512 tokens of
Shakespeare at a budget of 64: the window breaks, the sinks fix it; a plot per 128 tokens."""

import math
import time
from pathlib import Path

import torch

import policies
from exercises import course


def main(impl, n_tokens=512, budget=64, chunk=8, window=128, out=Path("results/exercises/05_streaming_ppl.png")):
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, n_tokens)])
    runs = [("full", None, {}), ("window", budget, {}), ("sink", budget, {"n_sink": 1}), ("sink", budget, {})]
    print(f"{n_tokens} tokens of Shakespeare, budget {budget} per KV head, calls of {chunk} tokens\n")
    curves = {}
    for name, b, kw in runs:
        t0 = time.perf_counter()
        p = policies.make_policy(name, b, **kw)
        lp = impl.streaming_logprobs(m, tokens, p, b, chunk)[0]  # (T - 1,)
        label = name if name != "sink" else f"sink ({p.n_sink} + {p.recent})"
        curves[label] = [math.exp(-float(lp[s:s + window].mean())) for s in range(0, len(lp), window)]
        print(f"{label:16s} ppl {impl.perplexity(lp[None]):7.2f}   per {window} tokens: "
              + " ".join(f"{x:7.2f}" for x in curves[label]) + f"   ({time.perf_counter() - t0:.0f} s)")
    print("\nthe same with evaluate.py: python evaluate.py ppl --policies full,window,sink --budgets 64 --tokens 512"
          " --limit 1 --chunk 8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ends = [min(s + window, n_tokens - 1) for s in range(0, n_tokens - 1, window)]
    for label, ys in curves.items():
        ax.plot(ends, ys, "k--" if label == "full" else "-o", label=label)
    ax.set(yscale="log", xlabel="tokens", ylabel=f"ppl per {window} tokens", title=f"streaming, budget {budget} (SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")
