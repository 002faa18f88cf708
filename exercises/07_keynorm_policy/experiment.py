"""Exercise 07's experiment: `python -m exercises 07`. Do low-norm keys get the attention on SmolLM2
(Devoto et al.'s observation), and the key-norm policy against window, sink and H2O at budget 64."""

import math
import time

import torch

import evaluate
import policies
from exercises import course
from model import attend


@torch.no_grad()
def norms_and_attention(m, tokens):
    """Per layer: key L2 norms (Hkv, T) and mean attention received over the rows that see a key (Hkv, T)."""
    T = tokens.shape[1]
    pos = torch.arange(T)[None]
    causal = (pos[:, None, :] <= pos[:, :, None])[:, None].expand(1, m.cfg.n_kv_heads, T, T)
    x, out = m.embed(tokens, pos), []
    for block in m.layers:
        a = block.attn
        q, k, v = a.project(block.attn_norm(x))
        q, k = a.rope(q, pos), a.rope(k, pos)
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
    print(f"{n_tokens} tokens of Shakespeare, budget {budget}, calls of {chunk}:")
    for name in ("full", "window", "sink", "h2o"):
        t0 = time.perf_counter()
        b = None if name == "full" else budget
        lp = evaluate.token_logprobs(m, tokens, policies.make_policy(name, b), b, setup)
        print(f"    {name:24s} ppl {math.exp(-float(lp.mean())):6.2f}   ({time.perf_counter() - t0:.0f} s)")
    for n_sink, recent in ((0, 0), (0, 8), (4, 8)):
        t0 = time.perf_counter()
        p = impl.keynorm_policy(budget, n_sink, recent)
        lp = impl.keynorm_logprobs(m, tokens, p, budget, chunk)
        print(f"    keynorm n_sink {n_sink} recent {recent}  ppl {math.exp(-float(lp.mean())):6.2f}"
              f"   ({time.perf_counter() - t0:.0f} s)")
    p = impl.keynorm_policy(budget, 0, 8)
    cache = impl.KeyNormCache(m.cfg, p, budget, chunk=chunk)
    with torch.no_grad():
        for s in range(0, n_tokens, chunk):
            m(tokens[:, s:s + chunk], cache)
    held0 = sum(int(cache.kept_mask(layer, 1).sum()) for layer in range(m.cfg.n_layers))
    print(f"\nkeynorm with no protected sinks still holds token 0 in {held0} of {m.cfg.n_layers * m.cfg.n_kv_heads} heads"
          " at the end")
