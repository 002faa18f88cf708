"""Test-wide settings. One intra-op thread: the tests run many tiny ops, where OpenMP threads
on a busy 2-core machine spin-wait and make each op milliseconds slower (measured: 0.11 s vs
3.4 s for the same 8-token call with another process running).

With no GPU, Triton kernels (fast/kernels.py) run in Triton's interpreter on CPU tensors, so the
default run holds them equal to their slow twins too; it must be set before Triton loads."""

import os

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
