"""Are the rotary angles that inductor compiles bit for bit the eager ones? (With fast.step.EMBED on, the
compiled CUDA-graph step drifted from the eager one from its 4th call of a chunk-1 stream: positions 4 on,
where the angles pass 4 radians. Triton's bundled libdevice and its division differ from eager CUDA's by
about 1 ULP in places: inductor's eager_numerics options exist for that.)

`python scripts/angles_probe.py [--model smollm2]`: model.rotary_angles for positions 0 .. N-1 as one
(1, N) call and as N one-token calls (the decode step's shape), eager, then compiled under each set of
inductor options; fast.model.Transformer.embed_and_angles compiled whole (session 10's fast.step); and
fast.step.compiled_embedding (session 11's: the phases compiled, cos and sin eager). One
row a set: how many cos and sin values differ from the eager ones, the largest difference, the first
position that differs.
"""
import argparse
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository's modules
import bench  # noqa: E402
import model as reference  # noqa: E402
from fast import model as fast_model  # noqa: E402
from fast import step as fast_step  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default="smollm2")
ap.add_argument("--positions", type=int, default=32768)
ap.add_argument("--decode", type=int, default=512, help="one-token calls at positions 0 .. this - 1")
args = ap.parse_args()

dev = torch.device(os.environ.get("DEV", "cuda"))
m = bench.build_model(args.model, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, "random")[0]
cfg = m.cfg
config = torch._inductor.config
SETS = {"default": {}, "pdl": {"triton.enable_pdl": True},
        "libdevice": {"eager_numerics.use_pytorch_libdevice": True},
        "libdevice+div": {"eager_numerics.use_pytorch_libdevice": True, "eager_numerics.division_rounding": True},
        "libdevice+div+pdl": {"eager_numerics.use_pytorch_libdevice": True, "eager_numerics.division_rounding": True,
                              "triton.enable_pdl": True},
        "precision_casts": {"emulate_precision_casts": True}}
print(f"# {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, {args.model}")
print("| options | call | differing cos | differing sin | max diff | first position |")
print("| --- | --- | --- | --- | --- | --- |")


def compare(name, call, fn, positions_list):
    bad_cos = bad_sin = 0
    worst, first = 0.0, None
    for positions in positions_list:
        want, got = reference.rotary_angles(positions, cfg), fn(positions)
        for i, (w, g) in enumerate(zip(want, got)):
            differ = (w != g)
            count = int(differ.sum())
            bad_cos, bad_sin = bad_cos + count * (i == 0), bad_sin + count * (i == 1)
            worst = max(worst, float((w - g).abs().max()))
            if count and first is None:
                first = int(positions.flatten()[differ.any(-1).flatten().nonzero()[0]])
    print(f"| {name} | {call} | {bad_cos} | {bad_sin} | {worst:.3g} | {first} |", flush=True)


whole = [torch.arange(args.positions, device=dev)[None]]  # (1, N)
one = [torch.tensor([[p]], device=dev) for p in range(args.decode)]  # (1, 1) each
with torch.no_grad():
    for name, options in SETS.items():
        if not all(hasattr(config, k) for k in options):
            print(f"| {name} | - | option missing in this torch | | | |")
            continue
        torch._dynamo.reset()
        fn = torch.compile(lambda p: reference.rotary_angles(p, cfg), fullgraph=True, options=options or None)
        compare(name, "(1, N)", fn, whole)
        torch._dynamo.reset()
        fn = torch.compile(lambda p: reference.rotary_angles(p, cfg), fullgraph=True, options=options or None)
        compare(name, "(1, 1) each", fn, one)
        torch._dynamo.reset()
        embed = torch.compile(fast_model.Transformer.embed_and_angles, fullgraph=True, options=options or None)
        tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        compare(name, "embed_and_angles (1, 1)", lambda p, embed=embed, tok=tok: embed(m, tok, p)[1], one)
        torch._dynamo.reset()  # fast.step's: embed_and_phases compiled, cos and sin eager
        embed_fn = fast_step.compiled_embedding(
            m, dev, lambda fn, options=options: torch.compile(fn, fullgraph=True, options=options or None))
        compare(name, "compiled_embedding (1, N)", lambda p, embed_fn=embed_fn: embed_fn(m, p * 0, p)[1], whole)
        compare(name, "compiled_embedding (1, 1)", lambda p, embed_fn=embed_fn: embed_fn(m, p * 0, p)[1], one)
