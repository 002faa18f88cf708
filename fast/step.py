"""The decode step, compiled and captured (gpt-fast's way): the reference step `model(tokens, cache)`
with each block compiled by torch.compile and, on CUDA, the whole call replayed as one CUDA graph.

The cache's state is updated in place and the step never syncs with the host, so the graph replays
on the same memory every step. Its Python side (the cache's host-side bookkeeping included) runs
once, at capture: capture a step only once the cache is in its steady state (full and evicting, a
preallocated `full` cache, or a streaming chunk-1 cache after its first call: its storage is
`budget + 1` slots from the start, so generate.feed runs a prompt's later calls through the step).
Tests hold each step equal to the eager one (tests/test_fast.py, tests/test_tokenwise.py,
tests/test_gpu.py).
"""

from __future__ import annotations

import torch

import model as reference
from fast import kernels

# Where fast.kernels launches with programmatic dependent launch (kernels.PDL), inductor's kernels in the
# compiled step launch that way too, so that each kernel of the step may start in the tail of the one before
# (SmolLM2's step is bound by its launches: scripts/pdl_ab.py times the step with neither, with only
# fast.kernels', and with both). False: only fast.kernels'.
INDUCTOR_PDL = True


# The step's embedding and rotary angles compiled too (compiled_embedding: a kernel or two and an eager cos and
# sin, where the eager ops are about thirteen, a few microseconds each in SmolLM2's launch-bound step: 2,064
# against 2,008 tok/s, issue 18 session 11, README). Session 10 compiled cos and sin too: Triton's
# libdevice puts them up to 3e-5 from eager CUDA's (scripts/angles_probe.py), and the bf16 logits of a chunk-1
# stream drifted up to 2.0 from the eager step's. bench.py --no-embed: off, to time it.
EMBED = True


def embed_and_phases(model, tokens, positions, inv_freq):
    """model.Transformer.embed, and model.rotary_angles up to its cos and sin: the embedding (B, T, dim)
    and the phases positions * inv_freq (B, 1, T, D) fp32 for positions (B, T). Compiled, the conversion,
    the product and the copy are the eager ones bit for bit (cos and sin are not: compiled_embedding)."""
    phases = positions[:, None, :].float()[..., None] * inv_freq  # (B, 1, T, D/2)
    return model.embed(tokens, positions), torch.cat([phases, phases], -1)  # i and i + D/2 turn alike


def compiled_embedding(model, device, compile_fn):
    """embed_fn for fast.model.Transformer.forward: Transformer.embed_and_angles's results, bit for bit,
    with embed_and_phases compiled by compile_fn and the phases' cos and sin eager (Triton's are up to
    3e-5 away). The inverse frequencies are computed once, eagerly, here (a compiled pow is not eager's
    either). OPT (no rotary): embed_and_angles compiled as it is."""
    if not model.cfg.rotary:
        return compile_fn(type(model).embed_and_angles)
    inv_freq, scale = reference.rope_frequencies(model.cfg, device)  # (D/2,) fp32, and yarn's factor
    phases_fn = compile_fn(embed_and_phases)

    def embed_fn(m, tokens, positions):
        x, phases = phases_fn(m, tokens, positions, inv_freq)  # (B, T, dim), (B, 1, T, D)
        if scale == 1.0:  # model.rotary_angles multiplies by 1.0 then: the same values
            return x, (phases.cos(), phases.sin())
        return x, (phases.cos() * scale, phases.sin() * scale)
    return embed_fn


def compile_decode(model, cache, backend: str | None = None, warmup: int = 2, dynamic: bool | None = None):
    """The decode step, score update and eviction included, with each transformer block compiled
    by torch.compile (one compiled Block.forward serves every layer: same graph, other weights and
    cache tensors, so it compiles in seconds), the embedding and rotary angles too (EMBED), and, on
    CUDA, the whole step captured as one CUDA graph. model: a fast.enable'd model (its forward takes
    block_fn and embed_fn). backend: default inductor on
    CUDA, aot_eager on the CPU (inductor's C++ backend fails on the scored step with torch 2.13:
    KeyError in its outer-loop fusion; the CPU step is not launch-bound, so little is lost).
    dynamic: torch.compile's. In a process that compiles steps for caches of several sizes (bench.py's
    rows), dynamo makes the storage size symbolic from the second size on, which rules out
    inductor's split reductions (the eviction's argmin over the slots is one program per KV head);
    False compiles each size as its own static graph, as a process with one cache gets."""
    backend = backend or ("inductor" if cache.device.type == "cuda" else "aot_eager")
    # every policy family and cache shape is one more compiled entry of Block.forward (evaluate.py
    # runs dozens in one process); past the default limit of 8, dynamo would fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    options = ({"triton.enable_pdl": True} if INDUCTOR_PDL and backend == "inductor" and kernels.pdl(cache.device)
               and hasattr(torch._inductor.config, "triton.enable_pdl") else None)

    def compile_fn(fn):
        return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic, options=options)
    block_fn = compile_fn(type(model.layers[0]).forward)
    embed_fn = compiled_embedding(model, cache.device, compile_fn) if EMBED else None
    step = lambda tokens: model(tokens, cache, block_fn=block_fn, embed_fn=embed_fn)  # noqa: E731
    return CudaGraphStep(step, warmup) if cache.device.type == "cuda" else step


def graph_decode(model, cache, warmup: int = 2):
    """The eager step, `model(tokens, cache)`, captured as one CUDA graph on CUDA (no torch.compile,
    so nothing to compile: a graph per cache costs a few eager steps). Replaying the step's few
    thousand small kernels from a graph removes Python and launch overhead, the eager step's cost
    at evaluation sizes. Works for any fixed call shape."""
    step = lambda tokens: model(tokens, cache)  # noqa: E731
    return CudaGraphStep(step, warmup) if cache.device.type == "cuda" else step


class CudaGraphStep:
    """Runs `step` for the first `warmup` calls (real decode steps: they compile it), then
    captures one call as a CUDA graph and replays it from then on. The step must keep its state
    in place and never sync with the host; its Python side runs once, at capture.

    Every call, warm-up and capture alike, hands the step one buffer, `self.tokens`, the call's tokens
    copied in: a compiled step sees the same strides at capture as in its warm-up, so torch.compile has
    nothing to recompile there (a recompile inside the capture autotunes inductor's new kernels, which
    syncs with the host: a CUDA error. generate.feed passes slices of the prompt, (B, T)-strided; a
    fresh clone at capture was (B, 1)-strided)."""

    def __init__(self, step, warmup: int = 2):
        self.step, self.warmup, self.graph, self.tokens = step, warmup, None, None

    def __call__(self, tokens):
        if self.tokens is None:
            self.tokens = torch.empty_like(tokens, memory_format=torch.contiguous_format)  # (B, 1) the step's input
        self.tokens.copy_(tokens)
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            return self.step(self.tokens)
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step(self.tokens)  # recorded, not run: the replay below runs it
        self.graph.replay()
        return self.logits
