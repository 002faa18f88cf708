"""Exercise 02's experiment: `python -m exercises 02`. H2O's heavy hitters on the lighthouse
prompt, with your h2o_update and h2o_keep, and the age bias of plain accumulation."""

import torch

from exercises import course


def main(impl, layers=(3, 15, 27)):
    m, tok = course.default_model()
    ids = course.prompt_ids(tok, 10_000)
    T = len(ids)
    probs = [p for p, _ in course.attention_probs(m, torch.tensor([ids]))]
    q_pos = torch.arange(T)[None]
    budget, recent = round(0.2 * T), round(0.1 * T)
    print(f"the lighthouse prompt, {T} tokens; H2O scores after the whole prompt (one call, no eviction)\n")
    for layer in layers:
        s = impl.h2o_update(torch.zeros(1, m.cfg.n_kv_heads, T), probs[layer], q_pos)[0, 0]  # KV head 0
        top = s.topk(8)
        print(f"layer {layer}, KV head 0: heaviest hitters " + ", ".join(
            f"{j}:{tok.decode([ids[j]])!r} {v:.1f}" for v, j in zip(top.values.tolist(), top.indices.tolist())))
        quarter = T // 4
        print(f"    median score of positions 0-{quarter - 1}: {s[:quarter].median():.2f}; of the last {quarter}:"
              f" {s[-quarter:].median():.2f} (age bias: an old token has had more rows to collect from)")
    layer = layers[1]
    s = impl.h2o_update(torch.zeros(1, m.cfg.n_kv_heads, T), probs[layer], q_pos)
    key_pos = torch.arange(T).expand(1, m.cfg.n_kv_heads, T)
    kept = impl.h2o_keep(s, key_pos, torch.ones_like(key_pos, dtype=torch.bool), torch.tensor([T - 1]), budget, recent)
    kept_ids = [i for i, k in zip(ids, kept[0, 0].tolist()) if k]
    print(f"\nlayer {layer}, KV head 0 keeps {len(kept_ids)} of {T} (budget {budget} = 20%, recent {recent}):")
    print(repr(tok.decode(kept_ids)))
