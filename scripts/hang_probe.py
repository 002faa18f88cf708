"""Where a streaming prompt fed token by token stalls on CUDA with the append kernel's found slot (a diagnostic):
SmolLM2 shape, random weights, a2sf budget 256, 300 tokens eagerly, under each setting."""
import faulthandler
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
faulthandler.dump_traceback_later(100, exit=True)
import bench  # noqa: E402
import fast  # noqa: E402
import generate  # noqa: E402
import policies  # noqa: E402

m, _ = bench.build_model("smollm2", torch.device("cuda"), torch.bfloat16, weights="random")
tokens = torch.randint(0, m.cfg.vocab_size, (1, 300), device="cuda")
p = policies.make_policy("a2sf", 256)
for find, pdl, merge in [(0, False, 8192), (8192, False, 8192), (8192, False, 0), (8192, None, 8192)]:
    fast.cache.FIND_SLOT, fast.kernels.PDL, fast.kernels.MERGE_ELEMENTS = find, pdl, merge
    cache = fast.KVCache(m.cfg, p, 256, batch=1, device="cuda", dtype=m.dtype, max_len=400)
    t = time.time()
    with torch.no_grad():
        for n in (260, 300):
            generate.feed(m, tokens[:, :n], cache, last_only=True) if n == 260 else \
                generate.feed(m, tokens[:, 260:n], cache, last_only=True)
            torch.cuda.synchronize()
            print(f"find {find} pdl {pdl} merge {merge}: {n} tokens in {time.time() - t:.1f}s,"
                  f" held {cache.layers[0].valid.sum().item()}", flush=True)
