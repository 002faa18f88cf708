"""Where the append kernel's found slot stalls on CUDA (a diagnostic)."""
import faulthandler
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
faulthandler.dump_traceback_later(60, exit=True)
import model  # noqa: E402
from fast import kernels  # noqa: E402

dev = "cuda"
B, Hkv, G, S, D = 1, 2, 3, 1025, 64
q = torch.randn(B, Hkv, G, 1, D, device=dev, dtype=torch.bfloat16)
k, v = (torch.randn(B, Hkv, 1, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
ck, cv = (torch.zeros(B, Hkv, S, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
cp = torch.full((B, Hkv, S), -1, device=dev)
cval = torch.zeros(B, Hkv, S, dtype=torch.bool, device=dev)
cval[..., :700] = True
positions = torch.tensor([[900]], device=dev)
angles = model.rotary_angles(positions, model.Config(dim=D, n_heads=1, n_kv_heads=1))
for pdl in (False, None):
    kernels.PDL = pdl
    t = time.time()
    print("eager", pdl, flush=True)
    out = kernels.append_step(q, k, v, angles, None, positions, ck, cv, cp, cval)
    torch.cuda.synchronize()
    print("  found", out[2].flatten().tolist(), f"{time.time() - t:.1f}s", flush=True)
    f = torch.compile(lambda *a: kernels.append_step(*a), fullgraph=True)
    t = time.time()
    out = f(q, k, v, angles, None, positions, ck, cv, cp, cval)
    torch.cuda.synchronize()
    print("  compiled found", out[2].flatten().tolist(), f"{time.time() - t:.1f}s", flush=True)
