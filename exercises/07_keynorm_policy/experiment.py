"""Exercise 07's experiment: `python -m exercises 07`. Do low-norm keys get the attention on SmolLM2
(Devoto et al.'s observation); the key-norm policy (your function, from the registry) against
window, sink and H2O at budget 64; the same kept positions on the reference and the fast path;
and generate.py with --policy keynorm."""

import copy
import math
import time

import torch

import evaluate
import fast
import generate
import policies
from cache import KVCache
from exercises import course
from model import attend


@torch.no_grad()
def norms_and_attention(m, tokens):
    """Per layer: key L2 norms (Hkv, T) and mean attention received over the rows that see a key (Hkv, T)."""
    T = tokens.shape[1]
    pos = torch.arange(T)[None]
    causal = (pos[:, None, :] <= pos[:, :, None])[:, None].expand(1, m.cfg.n_kv_heads, T, T)
    x, angles, out = m.embed(tokens, pos), m.angles(pos), []
    for block in m.layers:
        a = block.attn
        q, k, v = a.project(block.attn_norm(x))
        q, k = a.rope(q, angles), a.rope(k, angles)
        o, probs = attend(q, k, v, causal, need_probs=True)
        received = probs.sum(dim=(2, 3))[0] / (m.cfg.group * (T - torch.arange(T)))  # (Hkv, T)
        out.append((k[0].norm(dim=-1), received))
        x = x + a.output(o)
        x = x + block.mlp(block.mlp_norm(x))
    return out


def rank_corr(a, b):
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main(impl, n_tokens=512, budget=64, chunk=8):
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, n_tokens)])
    corr = [sum(rank_corr(-k[g, :-32], r[g, :-32]) for g in range(k.shape[0])) / k.shape[0]
            for k, r in norms_and_attention(m, tokens[:, :256])]
    print("rank correlation of -||k|| with the attention a key receives (first 256 tokens, keys seen by 32+ rows), per layer:")
    print("    " + " ".join(f"{c:+.2f}" for c in corr) + "\n")
    setup = evaluate.Setup(chunk=chunk)
    print(f"{n_tokens} tokens of Shakespeare, budget {budget}, calls of {chunk} (evaluate.token_logprobs):")
    runs = [(name, {}) for name in ("full", "window", "sink", "h2o")]
    runs += [("keynorm", dict(n_sink=n_sink, recent=recent)) for n_sink, recent in ((0, 0), (0, 8), (4, 8))]
    for name, split in runs:
        t0 = time.perf_counter()
        b = None if name == "full" else budget
        lp = evaluate.token_logprobs(m, tokens, policies.make_policy(name, b, **split), b, setup)
        label = name + "".join(f" {k} {v}" for k, v in split.items())
        print(f"    {label:26s} ppl {math.exp(-float(lp.mean())):6.2f}   ({time.perf_counter() - t0:.0f} s)")

    p = policies.make_policy("keynorm", budget, recent=8)
    c = KVCache(m.cfg, p, budget, chunk=chunk)
    with torch.no_grad():
        for s in range(0, n_tokens, chunk):
            m(tokens[:, s:s + chunk], c)
    held0 = sum(int(c.kept_mask(layer, 1).sum()) for layer in range(m.cfg.n_layers))
    heads = m.cfg.n_layers * m.cfg.n_kv_heads
    print(f"\nkeynorm with no protected sinks still holds token 0 in {held0} of {heads} heads at the end")

    prompt = torch.tensor([course.prompt_ids(tok, 10_000)])  # the lighthouse prompt, prefill mode (generate.py's default)
    kept = {}
    for path in ("reference", "fast"):
        model_here = fast.enable(copy.deepcopy(m)) if path == "fast" else m
        c = (fast.KVCache if path == "fast" else KVCache)(m.cfg, p, budget, mode="prefill")
        with torch.no_grad():
            model_here(prompt, c)
        kept[path] = [c.kept_positions(layer)[0] for layer in range(m.cfg.n_layers)]
    T = prompt.shape[1]
    window = list(range(T - budget, T))
    same = sum(a == b for la, lb in zip(kept["reference"], kept["fast"]) for a, b in zip(la, lb))
    windows = sum(k == window for lk in kept["fast"] for k in lk)
    print(f"the lighthouse prompt ({T} tokens) in prefill mode, budget {budget}: the reference and the fast path keep the "
          f"same positions in {same} of {heads} heads; {windows} of them keep a plain window of the last {budget}")

    print("\ngenerate.py --policy keynorm --budget 64 --recent 8 --max-new-tokens 40 (your policy, from the registry):")
    generate.main(["--policy", "keynorm", "--budget", str(budget), "--recent", "8", "--max-new-tokens", "40"])
