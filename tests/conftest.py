"""Test-wide settings. One intra-op thread: the tests run many tiny ops, where OpenMP threads
on a busy 2-core machine spin-wait and make each op milliseconds slower (measured: 0.11 s vs
3.4 s for the same 8-token call with another process running)."""

import torch

torch.set_num_threads(1)
