"""Sampling is seeded: the same seed gives the same tokens (temperature > 0, top-k, top-p, through
an evicting cache), another seed other tokens; on the CPU here, on CUDA with `-m gpu`."""

import pytest
import torch
from helpers import tiny_model

import generate
import policies
from cache import KVCache

SAMPLING = dict(temperature=1.2, top_k=40, top_p=0.95)


def sample_text(device, dtype, policy, seed, n=48):
    m = tiny_model("tiny-llama").to(device=device, dtype=dtype)
    prompt = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(7)).to(device)
    budget = None if policy == "full" else 12
    cache = KVCache(m.cfg, policies.make_policy(policy, budget), budget, device=device, dtype=dtype, mode="prefill",
                    max_len=24 + n)
    new, _ = generate.generate(m, prompt, cache, n, seed=seed, **SAMPLING)
    return new[0].tolist()


def check_seeding(device, dtype, policy):
    first = sample_text(device, dtype, policy, seed=1234)
    assert len(first) == 48 and len(set(first)) > 8  # really sampled, not one greedy token
    assert sample_text(device, dtype, policy, seed=1234) == first
    others = [sample_text(device, dtype, policy, seed=s) for s in (1235, 99)]
    assert all(o != first for o in others)
    return first


@pytest.mark.parametrize("policy", ["a2sf", "h2o", "snapkv", "random", "full"])
def test_same_seed_same_tokens_on_cpu(policy):
    check_seeding("cpu", torch.float32, policy)


def test_the_command_line_is_seeded(monkeypatch, capsys):
    """The same through generate.main: the printed text (before the stats line) repeats with --seed."""
    from test_generate import ByteTokenizer

    import load_weights

    def load(path=None, device="cpu", dtype=torch.float32):
        m = tiny_model("tiny-llama").to(device=device, dtype=dtype)
        return m, ByteTokenizer(m.cfg.vocab_size)

    monkeypatch.setattr(load_weights, "load", load)

    def text(seed):
        assert generate.main(["--prompt", "the same prompt each time", "--max-new-tokens", "24", "--temperature", "1.2",
                              "--top-k", "40", "--top-p", "0.95", "--seed", str(seed)]) == 0
        return capsys.readouterr().out.rsplit("[", 1)[0]

    assert text(5) == text(5) != text(6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("policy", ["a2sf", "h2o", "full"])
def test_same_seed_same_tokens_on_cuda(policy, dtype):
    check_seeding("cuda", dtype, policy)
