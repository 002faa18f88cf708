"""Tensor parallelism: the reference model split over N processes by attention heads (gpt-fast's tp.py).

    torchrun --nproc-per-node 2 generate.py --policy a2sf          # each rank holds half the heads

A transformation of the reference model, not a second model: rank r of N holds the model.Transformer
of a smaller config (shard_config): n_heads / N query heads, n_kv_heads / N KV heads (so every GQA
group stays on one rank), hidden_dim / N MLP columns, the same dim. Its weights are slices of the
whole model's (Megatron-LM, Shoeybi et al. 2019, Sec. 3):

    wq, wk, wv, w_gate, w_up (OPT: fc1)  split by output rows      x -> its heads / its MLP columns
    wo, w_down (OPT: fc2)                split by input columns    its part of the output, summed:
                                                                   one all-reduce after attention,
                                                                   one after the MLP (RowParallelLinear)
    embeddings, norms, lm_head           whole on every rank       every rank gets the same logits

The KV cache of a rank is a plain cache.KVCache (or fast.KVCache) of the rank's config: it holds
the rank's own KV heads and nothing else. Every policy ranks the tokens of one KV head from that
head's own state (its group's attention, its keys and values, its positions), so per-KV-head
eviction needs no communication at all: the rank evicts exactly what one process evicts for those
heads (tests/test_tp.py). A score shared across KV heads (one kept set per layer, say, or a
budget moved between heads by their total score) would need an all-gather of the scores; none of
ours does. The one policy that reads a head's index is `random` (a seeded hash of position, layer
and head): rank_policy turns the rank's local head index into the global one.

Weights are loaded per rank (load: each tensor read, sliced, and only the slice kept; random_model:
built on the rank's device, in its dtype), so no device ever holds the whole model. The sharded
model composes with the fast path: fast.enable(model), fast.KVCache and fast.compile_decode work on
it unchanged (the all-reduce is a functional collective: torch.compile traces it and a CUDA graph
captures it, as in gpt-fast). The reference files know nothing of this module.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from model import Config, Transformer
from policies import Policy

ROWS = ("attn.wq", "attn.wk", "attn.wv", "mlp.w_gate", "mlp.w_up", "mlp.fc1")  # split by output rows (weight, bias)
COLUMNS = ("attn.wo", "mlp.w_down", "mlp.fc2")  # split by input columns (weight); their bias stays whole


# -- the processes ---------------------------------------------------------------------------------

def world() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialised, else torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(device=None) -> tuple[int, int, torch.device]:
    """Start torch.distributed from torchrun's environment (NCCL on GPUs, gloo on CPUs) once;
    -> (rank, world size, this rank's device: cuda:LOCAL_RANK, or the CPU)."""
    rank, n = world()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device is None:
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if n > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, n, device


# -- the split -------------------------------------------------------------------------------------

def shard_config(cfg: Config, n: int) -> Config:
    """The config of one rank's part of the model: 1/n of the query heads, KV heads and MLP columns."""
    for what, size in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("hidden_dim", cfg.hidden_dim)):
        if size % n:
            raise ValueError(f"{what} {size} is not divisible by {n} ranks: tensor parallelism gives each rank whole"
                             f" KV heads (GQA groups); use a number of processes that divides {cfg.n_kv_heads}")
    return replace(cfg, n_heads=cfg.n_heads // n, n_kv_heads=cfg.n_kv_heads // n, hidden_dim=cfg.hidden_dim // n,
                   head_dim=cfg.head_dim)


def split_dim(name: str) -> int | None:
    """How parameter `name` ('layers.3.attn.wq.weight') is split: 0 by rows, 1 by columns, None whole."""
    module, leaf = name.rsplit(".", 1)
    if module.endswith(ROWS):
        return 0  # q (B, T, H*D): rank r's heads are rows r*H/n*D .. (r+1)*H/n*D, their KV heads likewise
    if module.endswith(COLUMNS) and leaf == "weight":
        return 1
    return None


def shard_tensor(name: str, t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """Rank `rank`'s slice of the whole model's parameter `name`."""
    dim = split_dim(name)
    return t if dim is None else t.chunk(n, dim=dim)[rank]


class RowParallelLinear(nn.Linear):
    """wo, w_down, fc2 of one rank: its input columns times its part of the input, summed over the
    ranks (one all-reduce); the bias, whole on every rank, added once after the sum."""

    group = None  # the process group (default: every rank)

    def forward(self, x):
        y = funcol.all_reduce(F.linear(x, self.weight), "sum", self.group or dist.group.WORLD)  # (B, T, dim)
        return y if self.bias is None else y + self.bias


def parallelize(model: Transformer, group=None) -> Transformer:
    """Make a rank's model (already holding its slices) sum its partial outputs across the ranks:
    wo and w_down (fc2) become RowParallelLinear, in place. Works before or after fast.enable."""
    for block in model.layers:
        mlp_out = block.mlp.w_down if model.cfg.arch == "llama" else block.mlp.fc2
        for lin in (block.attn.wo, mlp_out):
            lin.__class__ = RowParallelLinear
            lin.group = group
    return model


def shard(whole: Transformer, rank: int, n: int, group=None) -> Transformer:
    """Rank `rank`'s part of a whole model (for models that fit one device, and for tests)."""
    with torch.device("meta"):
        part = Transformer(shard_config(whole.cfg, n))
    part = part.to_empty(device=whole.device).to(whole.dtype)
    state = {name: shard_tensor(name, t, rank, n) for name, t in whole.state_dict().items()}
    part.load_state_dict(state, assign=False)
    if whole.cfg.tie_embeddings:
        part.lm_head.weight = part.tok_emb.weight
    return parallelize(part.eval(), group)


def random_model(cfg: Config, rank: int, n: int, device, dtype, seed: int = 0, group=None) -> Transformer:
    """Rank `rank`'s part of a model of random weights (speed runs, bench.py under torchrun), made on
    `device` in `dtype`: never on the host, never the whole model on one device. Each parameter is
    drawn whole on the device (one tensor at a time: at most the largest matrix, 0.5 GB for the 70B
    shape's embedding, beside the part) from a generator seeded by `seed` and the parameter's name,
    and only the rank's slice is kept; so the n parts together are exactly the model
    random_model(cfg, 0, 1) makes on the same kind of device, and a tensor-parallel run can be
    held token for token against one process (tests/test_bench_tp.py). n = 1: no all-reduce."""
    with torch.device("meta"):
        part = Transformer(shard_config(cfg, n)).to(dtype)
    part = part.to_empty(device=device)
    gen = torch.Generator(device=device)
    with torch.no_grad():
        for name, p in part.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                dim = split_dim(name)
                if dim is None or n == 1:
                    p.normal_(0.0, 0.02, generator=gen)
                else:
                    shape = list(p.shape)
                    shape[dim] *= n
                    whole = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
                    p.copy_(whole.chunk(n, dim=dim)[rank])
                    del whole
    if cfg.tie_embeddings:
        part.lm_head.weight = part.tok_emb.weight
    return parallelize(part.eval(), group) if n > 1 else part.eval()


def load(path=None, rank: int = 0, n: int = 1, device="cpu", dtype=torch.float32, group=None):
    """(rank's model, tokenizer) from a checkpoint, as load_weights.load reads it, but each tensor
    is sliced as it is read and only the rank's slice is kept: the host holds one whole tensor at a
    time, the device only the rank's part."""
    import load_weights as lw

    if path is None:
        path = lw.default_model_path()
        lw._check_sha256(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise lw.LoadError(f"{path}: no such file or directory")
    if path.is_file():
        cfg, table, tensors, tokenizer = lw._read_gguf(path)
    elif (path / "config.json").exists():
        cfg, table, tensors, tokenizer = lw._read_hf(path)
    elif (path / "params.json").exists():
        cfg, table, tensors, tokenizer = lw._read_meta(path)
    else:
        raise lw.LoadError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) in this directory")
    local = shard_config(cfg, n)
    sliced = dict(tensors)
    for ours, (theirs, _) in table.items():  # their name -> our name, to know how each tensor is split
        for i in range(cfg.n_layers) if "{i}" in ours else [0]:
            for leaf in ("weight", "bias"):
                key, name = f"{theirs.format(i=i)}.{leaf}" if theirs else None, f"{ours.format(i=i)}.{leaf}"
                dim = split_dim(name)
                if key in tensors and dim is not None:
                    file, shape, read = tensors[key]
                    shape = list(shape)
                    shape[dim] //= n
                    sliced[key] = (file, tuple(shape), lambda read=read, dim=dim: read().chunk(n, dim=dim)[rank].clone())
    part = lw._build(local, table, sliced, path).to(device=device, dtype=dtype).eval()
    return parallelize(part, group), tokenizer


# -- the cache of a rank ---------------------------------------------------------------------------

def kv_heads(cfg: Config, rank: int, n: int) -> range:
    """The whole model's KV heads that rank `rank` holds (its cache's heads 0.. are these)."""
    per = cfg.n_kv_heads // n
    return range(rank * per, (rank + 1) * per)


# random's hash (policies.token_score): pos * 1000003 + head * 7919 + layer * 104729 + seed * 15485863,
# taken mod 2^31. Head h + offset of the whole model is local head h with seed + offset * 7919 / 15485863 (mod 2^31).
_SEED_STEP = 7919 * pow(15485863, -1, 2**31) % 2**31


def rank_policy(policy: Policy, first_kv_head: int) -> Policy:
    """The policy as rank sees it: `random` with its seed moved so that the rank's local head h
    hashes as the whole model's head first_kv_head + h (every other policy unchanged)."""
    if not policy.random or first_kv_head == 0:
        return policy
    return replace(policy, seed=(policy.seed + first_kv_head * _SEED_STEP) % 2**31)


def rank_cache_class(cache_class, first_kv_head: int):
    """cache_class (cache.KVCache or fast.KVCache) whose policies are rank_policy's."""
    if first_kv_head == 0:
        return cache_class

    def fix(policy):
        if isinstance(policy, (list, tuple)):
            return [rank_policy(p, first_kv_head) for p in policy]
        return policy if policy is None else rank_policy(policy, first_kv_head)

    class RankKVCache(cache_class):
        def __init__(self, cfg, policy, *args, **kwargs):
            super().__init__(cfg, fix(policy), *args, **kwargs)

        def reset(self, pad=None, policy=None, budget=None):
            super().reset(pad, fix(policy), budget)

    RankKVCache.__name__ = f"Rank{cache_class.__name__}"
    return RankKVCache


__all__ = ["world", "setup", "shard_config", "shard", "parallelize", "random_model", "load", "kv_heads", "rank_policy",
           "rank_cache_class", "RowParallelLinear"]
