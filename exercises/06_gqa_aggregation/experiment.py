"""Exercise 06's experiment: `python -m exercises 06`. Sum against max over the 3 query heads of
each KV head of SmolLM2: how much the kept sets differ, and what it does to the predictions."""

import math

import torch

import policies
from exercises import course


def main(impl, n_tokens=256, budget=32, chunk=8):
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, n_tokens)])
    with torch.no_grad():
        full = m(tokens).log_softmax(-1)
    print(f"{n_tokens} tokens of Shakespeare, budget {budget}, calls of {chunk}; {m.cfg.n_heads} query heads on"
          f" {m.cfg.n_kv_heads} KV heads (groups of {m.cfg.group})\n")
    for name in ("h2o", "a2sf"):
        kept = {}
        for gqa in ("sum", "max"):
            p = policies.make_policy(name, budget, gqa=gqa)
            logits, kept[gqa] = impl.run_policy(m, tokens, p, budget, chunk)
            lq = logits.log_softmax(-1)
            kl = float((full.exp() * (full - lq)).sum(-1).mean())
            ppl = math.exp(-float(lq[0, :-1].gather(-1, tokens[0, 1:, None]).mean()))
            top1 = float((lq.argmax(-1) == full.argmax(-1)).float().mean())
            print(f"{name} gqa={gqa}: ppl {ppl:.2f}, KL to full {kl:.4f}, same top-1 as full {top1:.3f}")
        overlap = impl.kept_overlap(kept["sum"], kept["max"])
        same = sum(int((a == b).all(-1).sum()) for a, b in zip(kept["sum"], kept["max"]))
        print("    overlap of the kept sets (Jaccard), per layer: " + " ".join(f"{x:.2f}" for x in overlap.tolist()))
        print(f"    mean {float(overlap.mean()):.3f}; identical sets in {same} of {m.cfg.n_layers * m.cfg.n_kv_heads} heads\n")
