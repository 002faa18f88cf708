"""Fast paths against their slow twins. On the CPU the compiled decode step is traced with the
aot_eager backend (the same graph, no C++ build); the GPU run (tests marked gpu) uses inductor
and CUDA graphs."""

import pytest
import torch
from helpers import tiny_model

import generate
import policies
from cache import KVCache


def _decode_both(m, policy_name, budget, device="cpu", backend="aot_eager", dtype=torch.float32, steps=16):
    p = policies.make_policy(policy_name, budget)
    tokens = torch.randint(0, 128, (2, 24 + steps), generator=torch.Generator().manual_seed(7)).to(device)
    caches = [KVCache(m.cfg, p, budget, batch=2, max_len=64, device=device, dtype=dtype) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            generate.feed(m, tokens[:, :24], c) if c.budget is None else [m(tokens[:, i:i + 1], c) for i in range(24)]
        step = generate.compile_decode(m, caches[1], backend=backend)
        for i in range(24, 24 + steps):
            slow = m(tokens[:, i:i + 1], caches[0])
            fast = step(tokens[:, i:i + 1].clone())
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5 if dtype == torch.float32 else 5e-2)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.valid, b.valid) and torch.equal(torch.where(a.valid, a.pos, -1), torch.where(b.valid, b.pos, -1))


SLOW = [pytest.param(n, marks=pytest.mark.slow) for n in ("sink", "h2o", "vatp")]


@pytest.mark.parametrize("policy_name", ["full", "a2sf", *SLOW])
def test_compiled_decode_step_equals_eager(policy_name):
    torch._dynamo.reset()
    _decode_both(tiny_model("tiny-llama"), policy_name, None if policy_name == "full" else 12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy_name", ["full", "sink", "h2o", "a2sf", "vatp"])
def test_cuda_graph_decode_step_equals_eager(policy_name):
    torch._dynamo.reset()
    m = tiny_model("tiny-llama").cuda()
    _decode_both(m, policy_name, None if policy_name == "full" else 12, device="cuda", backend="inductor")
