"""Does cuDNN's fused attention with its log-sum-exp (kernels.causal_attention_lse) take fewer key heads than
query heads (grouped queries) without the keys expanded? Prints the largest difference against the expanded call,
or the error, SmolLM2's and the 7B's shapes at 1,024 tokens."""

import math

import torch

for H, Hkv, D in ((9, 3, 64), (32, 8, 128)):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, 1024, D, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, Hkv, 1024, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    ke, ve = (x.repeat_interleave(H // Hkv, dim=1) for x in (k, v))
    want, want_lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, ke, ve, None, True, 0.0, True, False,
                                                                        scale=1 / math.sqrt(D))[:2]
    try:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                      scale=1 / math.sqrt(D))[:2]
        print(f"## H {H} Hkv {Hkv}: grouped call ran; out {(out - want).abs().max().item():.3g} apart, "
              f"lse {(lse - want_lse).abs().max().item():.3g} apart")
    except RuntimeError as e:
        print(f"## H {H} Hkv {Hkv}: grouped call refused: {str(e).splitlines()[0][:160]}")
