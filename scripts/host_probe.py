"""Where one prefill or one streaming call spends its time on CUDA, for this checkout or another
(`python scripts/host_probe.py [ROOT] [--prefill]`, ROOT a folder with the same files of another commit;
--prefill: the prefill rows alone): the
wall time of the call, the CUDA kernels it launched, and the host ops with the most own CPU time.
SmolLM2 shape, random weights, bf16."""

import sys
import time

import torch

root = next((a for a in sys.argv[1:] if not a.startswith("--")), ".")
sys.path.insert(0, root)
import model as M  # noqa: E402
import policies  # noqa: E402

try:
    import fast  # noqa: E402

    KV, enable = fast.KVCache, fast.enable
except ImportError:  # the landed main before the redesign: the fast twins were inside the reference
    from cache import KVCache as KV  # noqa: E402

    enable = M.Transformer.fuse_projections

dev = torch.device("cuda")
torch.manual_seed(0)
cfg = M.preset("smollm2-135m")
with torch.device(dev):
    m = enable(M.Transformer(cfg).to(torch.bfloat16).eval())


def call(pol, budget, ctx, chunk, mode, batch=1):
    """(cache, tokens, the timed call): a prefill of ctx tokens, or one steady streaming call after ctx."""
    p = policies.make_policy(pol, budget)
    c = KV(cfg, p, budget, batch=batch, mode=mode, chunk=chunk, device=dev, dtype=torch.bfloat16,
           max_len=ctx + 2 * chunk + 8)
    tokens = torch.randint(0, cfg.vocab_size, (batch, ctx + 2 * chunk), device=dev)
    if mode == "prefill":
        return lambda: m(tokens[:, :ctx], c)
    with torch.no_grad():
        for s in range(0, ctx, chunk):
            m(tokens[:, s:s + chunk], c)
    return lambda: m(tokens[:, ctx:ctx + chunk], c)


ROWS = [("full", None, 1024, 1, "prefill", 1), ("a2sf", 256, 1024, 1, "prefill", 1),
        ("window", 256, 1024, 1, "prefill", 1), ("sink", 256, 1024, 1, "prefill", 1),
        ("full", None, 1024, 1, "prefill", 8), ("h2o", 256, 1024, 1, "prefill", 8),
        ("a2sf", 3277, 16384, 512, "streaming", 1)]
for pol, budget, ctx, chunk, mode, batch in ROWS[:-1] if "--prefill" in sys.argv else ROWS:
    with torch.no_grad():
        for _ in range(3):  # warm-up
            f = call(pol, budget, ctx, chunk, mode, batch)
            f()
        times = []
        for _ in range(9):
            f = call(pol, budget, ctx, chunk, mode, batch)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        f = call(pol, budget, ctx, chunk, mode, batch)
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            f()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1000
    times.sort()
    print(f"## {root} {pol} {mode} ctx {ctx} chunk {chunk} batch {batch}: wall {1000 * times[0]:.2f} ms min, "
          f"{1000 * times[4]:.2f} median of 9, "
          f"{len(kernels)} kernels, GPU busy {busy:.2f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=45))
