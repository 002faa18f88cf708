"""Tensor parallelism (tp.py) on the CPU: two processes over gloo, a tiny model, fp32.

Each rank's logits equal one process's, and each rank's cache keeps exactly the positions one
process keeps in the rank's KV heads, layer by layer, after every call: for a policy that scores
by attention probabilities (a2sf), one that ranks by position alone (sink) and one that reads the
head index (random, through tp.rank_cache_class), in prefill and streaming modes, on LLaMA (GQA)
and OPT (biases), on the reference path and the fast twins (fast.enable, fast.KVCache). Per-KV-head
eviction needs no communication: the only collectives are the two all-reduces per block.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_model

import cache as reference_cache
import fast
import policies
import tp

WORLD = 2
CASES = [(arch, name, mode, path) for arch in ("tiny-llama", "tiny-opt") for name in ("a2sf", "sink", "random")
         for mode in ("prefill", "streaming") for path in ("reference", "fast")]


def _whole(arch):
    overrides = dict(n_heads=8, n_kv_heads=4) if arch == "tiny-llama" else {}  # 2 KV heads per rank, groups of 2
    return tiny_model(arch, seed=3, **overrides)


def _check_case(rank, arch, name, mode, path):
    whole = _whole(arch)
    part = tp.shard(whole, rank, WORLD)
    if path == "fast":
        whole, part = fast.enable(whole), fast.enable(part)
    cls = fast.KVCache if path == "fast" else reference_cache.KVCache
    budget, T, prompt_len = 8, 20, 14
    policy = policies.make_policy(name, budget)
    heads = tp.kv_heads(whole.cfg, rank, WORLD)
    one = cls(whole.cfg, policy, budget, mode=mode)
    mine = tp.rank_cache_class(cls, heads.start)(part.cfg, policy, budget, mode=mode)
    tokens = torch.randint(0, whole.cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(7))
    bounds = [(0, prompt_len)] + [(s, s + 1) for s in range(prompt_len, T)] if mode == "prefill" else \
        [(s, s + 1) for s in range(T)]
    wrong = []  # every call still runs on both ranks after a mismatch: the collectives stay in step
    with torch.no_grad():
        for s, e in bounds:
            expected, got = whole(tokens[:, s:e], one), part(tokens[:, s:e], mine)
            if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
                wrong.append(f"logits at call {s}: max abs diff {(got - expected).abs().max():.2e}")
            for layer in range(whole.cfg.n_layers):
                want = [seq[heads.start:heads.stop] for seq in one.kept_positions(layer)]
                if mine.kept_positions(layer) != want:
                    wrong.append(f"layer {layer} after call {s}: kept {mine.kept_positions(layer)}, one process {want}")
    return wrong


def _worker(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        failures = []
        for case in CASES:
            failures += [f"rank {rank} {case}: {line}" for line in _check_case(rank, *case)[:2]]
        assert not failures, "\n".join(failures)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)


def test_shard_config_and_split():
    cfg = _whole("tiny-llama").cfg
    part = tp.shard_config(cfg, 2)
    assert (part.n_heads, part.n_kv_heads, part.hidden_dim, part.head_dim, part.dim) == (4, 2, 48, cfg.head_dim, 64)
    assert part.group == cfg.group  # every GQA group stays on one rank
    assert list(tp.kv_heads(cfg, 1, 2)) == [2, 3]
    with pytest.raises(ValueError, match="n_kv_heads 4 is not divisible by 3"):
        tp.shard_config(cfg.__class__(n_heads=12, n_kv_heads=4, hidden_dim=96, dim=96), 3)
    assert tp.split_dim("layers.0.attn.wq.weight") == 0 and tp.split_dim("layers.0.attn.wo.weight") == 1
    assert tp.split_dim("layers.0.attn.wo.bias") is None and tp.split_dim("tok_emb.weight") is None


def test_random_policy_seed_moves_the_head():
    """random's hash of local head h under rank_policy equals the whole model's head first + h."""
    pos = torch.arange(50)[None, None, :].expand(1, 4, 50)
    tokens = policies.Tokens(None, None, pos, torch.ones_like(pos, dtype=torch.bool), {})
    p = policies.make_policy("random", 8)
    whole = policies.token_score(p, tokens, 1)
    part = policies.token_score(tp.rank_policy(p, 2), policies.Tokens(None, None, pos[:, :2], tokens.valid[:, :2], {}), 1)
    assert torch.equal(part, whole[:, 2:4])


if __name__ == "__main__":  # python tests/test_tp.py: the spawn test alone
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        test_tensor_parallel_equals_one_process(__import__("pathlib").Path(d))
    print("ok", os.getpid())


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_load_reads_each_rank_s_slices(tmp_path, fmt):
    """tp.load (each tensor sliced as it is read) gives every rank the slices tp.shard cuts from the
    whole loaded model: Hugging Face (with biases), Meta and GGUF (Wq, Wk rows interleaved on disk)."""
    from test_load_weights import tiny_llama, write_gguf, write_hf, write_meta

    import load_weights

    hf = tiny_llama(tie=fmt != "meta", bias=fmt == "hf")
    path = {"hf": lambda: write_hf(hf, tmp_path, "safetensors"), "meta": lambda: write_meta(hf, tmp_path, 2),
            "gguf": lambda: write_gguf(hf, tmp_path / "tiny.gguf")}[fmt]()
    whole, _ = load_weights.load(path)
    for rank in range(WORLD):
        part, _ = tp.load(path, rank, WORLD)
        want = tp.shard(whole, rank, WORLD).state_dict()
        got = part.state_dict()
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
        assert isinstance(part.layers[0].attn.wo, tp.RowParallelLinear) and part.cfg == tp.shard_config(whole.cfg, WORLD)
