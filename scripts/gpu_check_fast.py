"""A quick CUDA check of the fast path against the reference (before timing it): for every policy,
prefill and streaming, a tiny bf16 LLaMA through fast.enable + fast.KVCache and through the reference
model + cache.KVCache, then the compiled decode step against the eager one. Prints one line per case."""

import sys

import torch

sys.path.insert(0, ".")
import fast  # noqa: E402
import policies  # noqa: E402
from cache import KVCache  # noqa: E402
from model import Transformer, preset  # noqa: E402


def run(m, C, p, budget, mode, tokens, prompt):
    c = C(m.cfg, p, budget, batch=tokens.shape[0], mode=mode, chunk=1, device="cuda", dtype=m.dtype)
    with torch.no_grad():
        if mode == "prefill":
            outs = [m(tokens[:, :prompt], c)] + [m(tokens[:, s:s + 1], c) for s in range(prompt, tokens.shape[1])]
        else:
            outs = [m(tokens[:, s:s + 1], c) for s in range(tokens.shape[1])]
    return torch.cat(outs, 1).float(), [c.kept_positions(i) for i in range(m.cfg.n_layers)], c


torch.manual_seed(0)
cfg = preset("tiny-llama", n_kv_heads=2)
ref = Transformer(cfg).cuda().to(torch.bfloat16).eval()
fm = fast.enable(Transformer(cfg).cuda().to(torch.bfloat16).eval())
fm.load_state_dict(ref.state_dict())
tokens = torch.randint(0, 128, (2, 80), device="cuda")
bad = 0
for name in policies.POLICY_NAMES:
    for mode in ("prefill", "streaming"):
        budget = None if name == "full" else 24
        p = policies.make_policy(name, budget)
        a, ka, _ = run(ref, KVCache, p, budget, mode, tokens, 60)
        b, kb, _ = run(fm, fast.KVCache, p, budget, mode, tokens, 60)
        same = sum(x == y for x, y in zip(ka, kb))
        print(f"{name:9s} {mode:9s} max|logit diff| {(a - b).abs().max().item():.3g}  equal kept sets {same}/{len(ka)}")
        bad += (a - b).abs().max().item() > 0.25
for name in ("full", "sink", "h2o", "a2sf", "vatp", "snapkv"):
    budget = None if name == "full" else 24
    p = policies.make_policy(name, budget)
    c1 = fast.KVCache(cfg, p, budget, batch=2, mode="prefill", device="cuda", dtype=torch.bfloat16, max_len=200)
    c2 = fast.KVCache(cfg, p, budget, batch=2, mode="prefill", device="cuda", dtype=torch.bfloat16, max_len=200)
    with torch.no_grad():
        fm(tokens[:, :60], c1), fm(tokens[:, :60], c2)
        step = fast.compile_decode(fm, c2)
        worst = 0.0
        for s in range(60, 80):
            x = tokens[:, s:s + 1]
            worst = max(worst, (fm(x, c1).float() - step(x.clone()).float()).abs().max().item())
    print(f"compiled step {name:7s} max|logit diff| vs eager {worst:.3g}")
    bad += worst > 0.25
print("FAILED" if bad else "ok")
