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

from fast import kernels

# Where fast.kernels launches with programmatic dependent launch (kernels.PDL), inductor's kernels in the
# compiled step launch that way too, so that each kernel of the step may start in the tail of the one before
# (SmolLM2's step is bound by its launches: scripts/pdl_ab.py times the step with neither, with only
# fast.kernels', and with both). False: only fast.kernels'.
INDUCTOR_PDL = True


# The step's embedding and rotary angles compiled too (fast.model.Transformer.embed_and_angles: a kernel or two
# where the eager ops are about nine, a few microseconds each in SmolLM2's launch-bound step; 1.024x on its step,
# 1.005x on the 7B's, scripts/pdl_ab.py --ab embed). Off: on the H200, bf16, a chunk-1 stream fed through the
# compiled step with it on replayed logits up to 2.0 away from the eager calls' from the second replay on, and
# exactly the eager ones with it off (scripts/capture_probe.py --compiled, --set fast.step.EMBED=False; issue
# 18, session 10). The cause is not found: the same drift for sink, a2sf and h2o (1.25, then 2.0) looks
# deterministic, yet with INDUCTOR_PDL off it began later (after 7 exact calls). bench.py --embed: on, to time it.
EMBED = False

# Inductor options for the compiled embedding and angles alone (EMBED): eager CUDA's libdevice and division,
# so that the compiled cos and sin can be the eager ones bit for bit (scripts/angles_probe.py: which do).
EMBED_NUMERICS = {"eager_numerics.use_pytorch_libdevice": True, "eager_numerics.division_rounding": True}


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
    block_fn = torch.compile(type(model.layers[0]).forward, backend=backend, fullgraph=True, dynamic=dynamic,
                             options=options)
    numerics = {k: v for k, v in EMBED_NUMERICS.items() if backend == "inductor" and hasattr(torch._inductor.config, k)}
    embed_fn = (torch.compile(type(model).embed_and_angles, backend=backend, fullgraph=True, dynamic=dynamic,
                              options={**(options or {}), **numerics} or None) if EMBED else None)
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
