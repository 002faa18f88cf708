"""Exercise 04's experiment: `python -m exercises 04`. Does VATP need protected sinks on SmolLM2?
Value norms of token 0, where it ranks under VATP's score, and the real cache without and with sinks."""

import math

import torch

import policies
from cache import KVCache
from exercises import course


def main(impl, n_tokens=256, budget=32, chunk=8):
    m, tok = course.default_model()
    tokens = torch.tensor([course.shakespeare_ids(tok, n_tokens)])
    T = n_tokens
    norms = impl.value_norms(m, tokens)[:, 0]  # (layers, Hkv, T)
    ratio = norms[..., 0] / norms[..., 1:].median(-1).values
    print(f"{T} tokens of Shakespeare. ||v_0||_1 / median ||v_j||_1, per layer (mean over the 3 KV heads):")
    print("    " + " ".join(f"{x:.2f}" for x in ratio.mean(-1).tolist()))
    print(f"    token 0's value is below the median in {int((ratio < 1).sum())} of {ratio.numel()} (layer, KV head) pairs\n")
    q_pos, zeros = torch.arange(T)[None], torch.zeros(1, m.cfg.n_kv_heads, T)
    ranks = []
    for probs, v in course.attention_probs(m, tokens):  # one call over the whole text: where does token 0 rank?
        s = impl.vatp_update(zeros, probs, q_pos, v)[0]  # (Hkv, T)
        ranks.append((s > s[:, :1]).sum(-1) + 1)  # 1 = the highest VATP score of its head
    ranks = torch.stack(ranks)
    print("rank of token 0 under VATP's score (attention x ||v||_1) over the whole text, 1 = highest,"
          " per layer (worst of its heads):")
    print("    " + " ".join(str(r) for r in ranks.amax(-1).tolist()))
    print(f"    token 0 ranks first in {int((ranks == 1).sum())} of {ranks.numel()} heads, within the top {budget // 2}"
          f" in {int((ranks <= budget // 2).sum())}\n")
    with torch.no_grad():
        full = m(tokens)
    print(f"the real cache, streaming, budget {budget}, calls of {chunk}:")
    for name, n_sink in (("vatp", 0), ("vatp", 4), ("h2o", 0), ("h2o", 4)):
        p = policies.make_policy(name, budget, n_sink=n_sink)
        seen = impl.token0_seen(m, tokens, p, budget, chunk)[:, 0]  # (layers, Hkv, T)
        lost = ~seen[..., -1]
        cache = KVCache(m.cfg, p, budget, chunk=chunk)
        with torch.no_grad():
            logits = torch.cat([m(tokens[:, s:s + chunk], cache) for s in range(0, T, chunk)], dim=1)
        lp = logits[0, :-1].log_softmax(-1).gather(-1, tokens[0, 1:, None])
        where = sorted({int(x) for x in lost.nonzero()[:, 0]})
        print(f"    {name} n_sink {n_sink} (recent {p.recent:2d}): token 0 gone from {int(lost.sum()):2d} of {lost.numel()} heads"
              f"{' (layers ' + ', '.join(map(str, where)) + ')' if where else ''}; ppl {math.exp(-lp.mean()):.2f}, "
              f"KL to full {impl.kl_to_full(logits, full):.4f}")
    full_lp = full[0, :-1].log_softmax(-1).gather(-1, tokens[0, 1:, None])
    print(f"    full: ppl {math.exp(-full_lp.mean()):.2f}")
