"""Issue 14's host-side work, counted: the aten calls one code folder issues (old/ = the landed main,
commit 783c16e; . = this checkout), on the CPU, tiny model, a2sf, through a TorchDispatchMode.

    python scripts/host_ops14.py old     python scripts/host_ops14.py .

Two counts: a 2,048-token streaming prefill in calls of 512 rows (budget 400, batch 1), and one
token-by-token call (streaming, chunk 1, batch 4, budget 16) after 64 tokens. The GPU's host-bound
rows (SmolLM2's 1k prefills, its 16k streaming prefill) spend their time issuing such calls, so equal
counts say the redesign added no host work, where the GPU timings are too noisy to say it to 3%.
"""
import collections
import os
import sys

from torch.utils._python_dispatch import TorchDispatchMode

folder = sys.argv[1] if len(sys.argv) > 1 else "."
os.chdir(folder)
sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

import bench  # noqa: E402
import generate  # noqa: E402
import policies  # noqa: E402


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


new = hasattr(bench, "fast")  # the landed main has no fast/ package
m = bench.build_model("tiny", torch.device("cpu"), torch.float32, "random")[0]
KV = bench.fast.KVCache if new else bench.KVCache
tokens = torch.randint(0, m.cfg.vocab_size, (4, 2048), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    cache = KV(m.cfg, policies.make_policy("a2sf", 400), 400, batch=1, mode="streaming", chunk=512, device="cpu")
    with Count() as prefill:
        generate.feed(m, tokens[:1], cache, last_only=True)
    cache = KV(m.cfg, policies.make_policy("a2sf", 16), 16, batch=4, mode="streaming", chunk=1, device="cpu")
    generate.feed(m, tokens[:, :64], cache, last_only=True)
    with Count() as token:
        generate.feed(m, tokens[:, 64:65], cache, last_only=True)
print(f"{folder}: {m.cfg.n_layers} layers; streaming prefill of 2,048 tokens (chunk 512): "
      f"{sum(prefill.calls.values())} aten calls; one token-by-token call: {sum(token.calls.values())}")
