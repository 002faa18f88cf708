# Device-machine runs for issue 18 (closer to the H200's limit, in fast/ only): the landed main (old/, the
# files of commit 783c16e: `git worktree add /tmp/old 783c16e && mkdir -p old && cp /tmp/old/*.py old/`)
# beside this checkout, every row of `bench.py --plan targets`, transformers' rows (default and static
# compiled) from this checkout's run, and the token-by-token rows. Two calls on one warm nvidia-h200, back
# to back (each well inside 600 s), carry [".whl", "old"]:
#
#   bash scripts/gpu_issue18.sh smollm2     old then new targets-smollm2
#   bash scripts/gpu_issue18.sh 7b          old then new targets-7b
#   bash scripts/gpu_issue18.sh tokenwise   scripts/tokenwise_ab.py: old and this checkout eager over the first 512
#                                           tokens, this checkout's graph and compiled steps over all 2,048 (x3)
#   bash scripts/gpu_issue18.sh flags PLAN FLAGS...  this checkout's PLAN without, then with FLAGS, --profile;
#                                           ab-flags-PLAN.md. The candidates: --evict-chunk 512 (the eviction as a
#                                           split reduction, fast.cache.EVICT_CHUNK), --max-autotune (Triton GEMM
#                                           templates with fused epilogues), --static, --tune, --reverse (the rows last to first)
#   bash scripts/gpu_issue18.sh colsum      scripts/kernel_probe.py --configs: the column sums under each launch
#                                           config and the autotuner's pick (4k, 8k, 32k rows, 7B heads)
#   bash scripts/gpu_issue18.sh static PLAN this checkout's PLAN with --static (each row's step compiled for its
#                                           own cache size), beside new-PLAN.json of the phase above
#   bash scripts/gpu_issue18.sh rows PLAN [FLAGS]  this checkout's PLAN with --no-rows (the projections as
#                                           cuBLAS matmuls, norms and adds apart), then as it is (kernels.linear_rows:
#                                           norm, matmul and residual or SwiGLU in one kernel); ab-rows-PLAN.md
#   bash scripts/gpu_issue18.sh pdl         rows_probe.py (linear_rows with and without programmatic dependent launch),
#                                           `quick` SmolLM2 and 7B rows with --no-pdl, as is, and with inductor's
#                                           kernels under PDL too; then the GPU tests of test_kernels and test_fast
#   bash scripts/gpu_issue18.sh pdl-ab [ARGS]  rows_probe.py, scripts/pdl_ab.py ARGS (the step without PDL, with it,
#                                           with inductor's kernels too: one process, replayed in turns), GPU tests
#   bash scripts/gpu_issue18.sh append      scripts/pdl_ab.py --ab append (the new token's rotary, cache write and
#                                           mask as inductor's kernels, then as kernels.append_step), SmolLM2 and the
#                                           7B; a profiled SmolLM2 row; the GPU tests of test_kernels and test_fast
#   bash scripts/gpu_issue18.sh fused       scripts/pdl_ab.py --ab fused and --ab merge (kernels.append_step and
#                                           decode_attention's merge in its split pass: neither, both, the merge alone)
#   bash scripts/gpu_issue18.sh merge       scripts/pdl_ab.py --ab merge: decode_attention's merge after its split pass,
#                                           then in it; the GPU tests of the decode kernel
#   bash scripts/gpu_issue18.sh scored      scripts/pdl_ab.py --ab scored2 / scored --profile (the free slot and the new
#                                           token's state apart, in the append kernel, in the eviction), 7B and SmolLM2
#   bash scripts/gpu_issue18.sh evict-chunk pdl_ab.py --ab chunk (7B h2o, a2sf at 2k), --ab slot (7B full at 1k), GPU tests
#   bash scripts/gpu_issue18.sh join        pdl_ab.py --ab join (the append kernel and the attention's apart, then in
#                                           one: kernels.append_attention), SmolLM2 full and a2sf at 1k, the 7B h2o at 2k;
#                                           targets-smollm2 (ours); the GPU tests of test_kernels and test_fast
#   bash scripts/gpu_issue18.sh prefill-host  scripts/host_probe.py --prefill (each prefill row's host ops)
#   bash scripts/gpu_issue18.sh all1        the closing run (nvidia-h200-x2, two calls): the landed main's targets-smollm2,
#                                           targets-7b on GPU 1 beside this checkout's targets-smollm2, targets-7b-short
#                                           (transformers' rows with them) on GPU 0; r/all/ab.md
#   bash scripts/gpu_issue18.sh all2        then this checkout's targets-7b-long and the GPU tests (GPU 0), the
#                                           token-by-token rows (GPU 1); in r/all/ beside all1's
#   bash scripts/gpu_issue18.sh capture     the token-by-token compiled step's capture error: traceback, one switch off at a time
#   bash scripts/gpu_issue18.sh capture2    scripts/capture_probe.py: the graph step against eager calls, a chunk-1 stream, bf16
#   bash scripts/gpu_issue18.sh verify      session 10's open ends: every -m gpu test (the model carried in two calls), the
#                                           compiled step's drift probes, targets-smollm2 and token by token with EMBED off
#   bash scripts/gpu_issue18.sh tokenwise2  the token-by-token rows (GPU 1) beside the GPU tests of test_tokenwise, test_fast,
#                                           test_kernels, test_gpu (GPU 0)
#   bash scripts/gpu_issue18.sh split       the column sums' split loop: its GPU tests, kernel_probe --configs --split,
#                                           the 7B's 32k rows without and with it (nvidia-h200-x2)
#   bash scripts/gpu_issue18.sh final       this checkout's targets-smollm2 (with transformers') and targets-7b-short,
#                                           the landed main's full 1k rows of both models beside them (one call)
#   bash scripts/gpu_issue18.sh final-long  the GPU tests of test_kernels and test_fast, then targets-7b-long
#   bash scripts/gpu_issue18.sh prefill-profile  SmolLM2's fused prefill (full, 1k, 8 sequences), old/ beside this
#                                           checkout: ms a prefill, the top CUDA kernels and CPU ops of one
#   bash scripts/gpu_issue18.sh probe       scripts/rows_probe.py --configs: linear_rows against cuBLAS per matrix
#   bash scripts/gpu_issue18.sh quick GPU MODEL CONTEXTS POLICIES BUDGETS TAG [FLAGS]  one bench.py grid (batch 1) on
#                                           one GPU, $OUT/TAG.txt; e.g. quick 0 smollm2 1024 full,a2sf 256 base
#   bash scripts/gpu_issue18.sh inductor    `quick` for SmolLM2 (GPU 0) and the 7B shape (GPU 1) with no setting,
#                                           --inductor combo_kernels=True, aggressive_fusion=True, and both
#
# Each writes $OUT/r/{old,new}-PLAN.json and .log; `python scripts/ab_summary.py DIR` puts old and new side
# by side (the medians when a phase ran more than once); transformers' rows are in new-PLAN.log.
source scripts/gpu_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/r
quiet() { grep -v "Online softmax\|^\s*$\|warnings.warn\|UserWarning\|DEBUG\|_warn_once\|USDT"; }
both() {  # both PLAN OLD_TIMEOUT NEW_TIMEOUT
  (cd old && timeout $2 python bench.py --plan $1 --no-hf --weights random --out $OUT/r/old-$1.json 2>&1 | quiet \
    | grep "^|\|^#\|Error" | grep -v "^|--" | tee $OUT/r/old-$1.log)
  timeout $3 python bench.py --plan $1 --weights random --profile --out $OUT/r/new-$1.json 2>&1 | quiet > $OUT/r/new-$1.log
  grep "^|\|^#\|Error" $OUT/r/new-$1.log | grep -v "^|--\|^| *Name"
  python scripts/ab_summary.py $OUT/r | tee $OUT/r/ab-$1.md
}
case "$1" in
smollm2)
  both targets-smollm2 120 220
  ;;
tokenwise)  # eager (host-bound: ~70-90 ms a call at batch 64) over the first 512 tokens; the steps over all 2,048, 3 times
  timeout 150 python scripts/tokenwise_ab.py old --tokens 512 2>&1 | quiet | grep "##\|Error" | tee $OUT/r/tokenwise.log
  timeout 150 python scripts/tokenwise_ab.py . --ways eager --tokens 512 2>&1 | quiet | grep "##\|Error" \
    | tee -a $OUT/r/tokenwise.log
  timeout 220 python scripts/tokenwise_ab.py . --ways graph,compiled --reps 3 2>&1 | quiet | grep "##\|Error" \
    | tee -a $OUT/r/tokenwise.log
  ;;
7b)
  both targets-7b 200 330
  ;;
flags)
  plan=$2
  shift 2
  mkdir -p $OUT/r/flags
  timeout ${FLAGS_TIMEOUT:-270} python bench.py --plan $plan --no-hf --weights random --profile --out $OUT/r/flags/old-$plan.json 2>&1 \
    | quiet > $OUT/r/flags/old-$plan.log
  timeout ${FLAGS_TIMEOUT:-270} python bench.py --plan $plan --no-hf --weights random --profile "$@" --out $OUT/r/flags/new-$plan.json 2>&1 \
    | quiet > $OUT/r/flags/new-$plan.log
  grep "^|\|^#\|Error" $OUT/r/flags/new-$plan.log | grep -v "^|--\|^| *Name"
  echo "# new = with $*" | tee $OUT/r/ab-flags-$plan.md
  python scripts/ab_summary.py $OUT/r/flags | tee -a $OUT/r/ab-flags-$plan.md
  ;;
rows)
  plan=$2
  shift 2
  mkdir -p $OUT/r/rows-$plan
  timeout ${ROWS_TIMEOUT:-270} python bench.py --plan $plan --no-hf --weights random --no-rows "$@" \
    --out $OUT/r/rows-$plan/old-$plan.json 2>&1 | quiet > $OUT/r/rows-$plan/old-$plan.log
  timeout ${ROWS_TIMEOUT:-270} python bench.py --plan $plan --no-hf --weights random --profile "$@" \
    --out $OUT/r/rows-$plan/new-$plan.json 2>&1 | quiet > $OUT/r/rows-$plan/new-$plan.log
  grep "^|\|^#\|Error" $OUT/r/rows-$plan/new-$plan.log | grep -v "^|--\|^| *Name"
  echo "# old = --no-rows, new = linear_rows; $*" | tee $OUT/r/ab-rows-$plan.md
  python scripts/ab_summary.py $OUT/r/rows-$plan | tee -a $OUT/r/ab-rows-$plan.md
  ;;
quick)
  CUDA_VISIBLE_DEVICES=$2 timeout ${QUICK_TIMEOUT:-100} python bench.py --models $3 --contexts $4 --long "" --batches 1 \
    --policies $5 --budgets $6 --no-hf --weights random --out $OUT/$7.json "${@:8}" 2>&1 | grep "^|\|^#\|Error\|error" \
    | grep -v "^|--\|^| model" > $OUT/$7.txt
  ;;
inductor)
  for gpu_model in "0 smollm2 1024 full,a2sf 256" "1 llama7b 1024,2048 full,h2o 1024"; do
    set -- $gpu_model
    (bash scripts/gpu_issue18.sh quick $1 $2 $3 $4 $5 $2-base
     bash scripts/gpu_issue18.sh quick $1 $2 $3 $4 $5 $2-combo --inductor combo_kernels=True
     bash scripts/gpu_issue18.sh quick $1 $2 $3 $4 $5 $2-aggr --inductor aggressive_fusion=True
     bash scripts/gpu_issue18.sh quick $1 $2 $3 $4 $5 $2-both --inductor combo_kernels=True,aggressive_fusion=True) &
  done
  wait
  ;;
pdl)  # programmatic dependent launch (kernels.PDL) off and on, and inductor's own kernels with it too
  timeout 100 python scripts/rows_probe.py 2>&1 | quiet | grep "^|\|^#\|Error" | tee $OUT/r/rows-probe-pdl.log
  for run in "smollm2 1024 full,a2sf 256" "llama7b 1024 full,h2o 512"; do
    set -- $run
    QUICK_TIMEOUT=120 bash scripts/gpu_issue18.sh quick 0 $1 $2 $3 $4 $1-no-pdl --no-pdl
    QUICK_TIMEOUT=120 bash scripts/gpu_issue18.sh quick 0 $1 $2 $3 $4 $1-pdl
    QUICK_TIMEOUT=120 bash scripts/gpu_issue18.sh quick 0 $1 $2 $3 $4 $1-pdl-inductor --inductor triton.enable_pdl=True
    tail -n 2 $OUT/$1-*.txt
  done
  timeout ${TESTS_TIMEOUT:-150} python -m pytest -q -x -m gpu tests/test_kernels.py tests/test_fast.py 2>&1 | tail -n 15 \
    | tee $OUT/r/gpu-tests.log
  ;;
pdl-ab)  # scripts/pdl_ab.py: the step without PDL, with it, and with inductor's kernels too, in one process
  timeout 100 python scripts/rows_probe.py 2>&1 | quiet | grep "^|\|^#\|Error" | tee $OUT/r/rows-probe-pdl.log
  timeout ${AB_TIMEOUT:-300} python scripts/pdl_ab.py "${@:2}" 2>&1 | quiet | grep "^|\|^#\|Error\|error" \
    | tee $OUT/r/pdl-ab.log
  timeout ${TESTS_TIMEOUT:-150} python -m pytest -q -x -m gpu tests/test_kernels.py tests/test_fast.py 2>&1 | tail -n 4 \
    | tee $OUT/r/gpu-tests.log
  ;;
append)  # the new token's rotary, cache write and mask: inductor's kernels, then one (kernels.append_step)
  timeout 200 python scripts/pdl_ab.py --ab append --models smollm2 --policies full,a2sf,h2o 2>&1 | quiet \
    | grep "^|\|^#\|Error\|error" | tee $OUT/r/append-ab.log
  timeout 150 python scripts/pdl_ab.py --ab append --models llama7b --policies full --turns 5 2>&1 | quiet \
    | grep "^|\|^#\|Error\|error" | grep -v "^# NVIDIA" | tee -a $OUT/r/append-ab.log
  timeout 100 python bench.py --models smollm2 --contexts 1024 --long "" --batches 1 --policies full --no-hf \
    --weights random --profile --out $OUT/r/smollm2-profile.json 2>&1 | quiet > $OUT/r/smollm2-profile.log
  timeout ${TESTS_TIMEOUT:-200} python -m pytest -x -m gpu tests/test_kernels.py tests/test_fast.py 2>&1 | tail -n 4 \
    | tee $OUT/r/gpu-tests.log
  ;;
fused)  # kernels.append_step and the merge in the split pass: neither, the merge alone, both; GPU tests
  timeout 170 python scripts/pdl_ab.py --ab fused --models smollm2 --policies full,a2sf 2>&1 | quiet \
    | grep "^|\|^#\|Error\|error" | tee $OUT/r/fused-ab.log
  timeout 110 python scripts/pdl_ab.py --ab merge --models smollm2 --policies full 2>&1 | quiet \
    | grep "^|\|Error\|error" | tee -a $OUT/r/fused-ab.log
  timeout 120 python scripts/pdl_ab.py --ab fused --models llama7b --policies full --turns 5 2>&1 | quiet \
    | grep "^|\|Error\|error" | tee -a $OUT/r/fused-ab.log
  timeout ${TESTS_TIMEOUT:-200} python -m pytest -x -m gpu tests/test_kernels.py tests/test_fast.py 2>&1 | tail -n 4 \
    | tee $OUT/r/gpu-tests.log
  ;;
merge)  # decode_attention's merge: a kernel after the split pass, then in it (kernels.MERGE_ELEMENTS); its GPU tests
  timeout 100 python scripts/pdl_ab.py --ab merge --models smollm2 --policies full,a2sf --turns 5 2>&1 | quiet \
    | grep "^|\|^#\|Error\|error" | tee $OUT/r/merge-ab.log
  timeout 100 python scripts/pdl_ab.py --ab merge --models llama7b --policies full --turns 5 2>&1 | quiet \
    | grep "^|\|Error\|error" | tee -a $OUT/r/merge-ab.log
  timeout 100 python -m pytest -x -m gpu tests/test_kernels.py -k "merge or decode" 2>&1 | tail -n 4 | tee $OUT/r/gpu-tests.log
  ;;
scored)  # the scored step's free slot and new token's state: apart, the slot in the append kernel, the state in the
  # eviction too (scripts/pdl_ab.py --ab scored2 / scored, with profiles), 7B at 2k (budget 1024), SmolLM2 at 1k (256)
  timeout 250 python scripts/pdl_ab.py --ab scored2 --models llama7b --policies h2o --budget 1024 --context 2048 \
    --turns 5 --profile 2>&1 | quiet > $OUT/r/scored-ab-7b.log
  grep -h "^|\|^# " $OUT/r/scored-ab-7b.log
  timeout 150 python scripts/pdl_ab.py --ab scored --models smollm2 --policies a2sf --profile 2>&1 | quiet \
    > $OUT/r/scored-ab-smollm2.log
  grep -h "^|\|^# " $OUT/r/scored-ab-smollm2.log
  ;;
evict-chunk)  # the eviction's reduction split over chunks (pdl_ab --ab chunk), 7B at 2k (budget 1024); full at 1k
  # as it is, in the same call; then the GPU tests of test_kernels and test_fast
  timeout 200 python scripts/pdl_ab.py --ab chunk --models llama7b --policies h2o,a2sf --budget 1024 --context 2048 \
    --turns 5 2>&1 | quiet | grep "^|\|^# [A-Z]\|Error" | tee $OUT/r/chunk-ab-7b.log
  timeout 90 python scripts/pdl_ab.py --ab slot --models llama7b --policies full --context 1024 --turns 5 2>&1 | quiet \
    | grep "^|\|Error" | tee -a $OUT/r/chunk-ab-7b.log
  timeout ${TESTS_TIMEOUT:-200} python -m pytest -x -m gpu tests/test_kernels.py tests/test_fast.py 2>&1 | tail -n 4 \
    | tee $OUT/r/gpu-tests.log
  ;;
join)  # the append kernel joined to the attention's (kernels.append_attention): A/B, then the SmolLM2 plan; GPU tests
  timeout ${TESTS_TIMEOUT:-200} python -m pytest -x -m gpu tests/test_kernels.py tests/test_fast.py 2>&1 | tail -n 4 \
    | tee $OUT/r/gpu-tests.log
  timeout 200 python scripts/pdl_ab.py --ab join --models smollm2 --policies full,a2sf --profile 2>&1 | quiet \
    > $OUT/r/join-ab-smollm2.log
  grep -h "^|\|^# \|Error" $OUT/r/join-ab-smollm2.log
  timeout 150 python bench.py --plan targets-smollm2 --no-hf --weights random --out $OUT/r/new-targets-smollm2.json 2>&1 \
    | quiet > $OUT/r/new-targets-smollm2.log
  grep -h "^| [sl]\|Error" $OUT/r/new-targets-smollm2.log | grep -v "^| *Name"
  timeout 200 python scripts/pdl_ab.py --ab join --models llama7b --policies h2o,vatp --budget 1024 --context 2048 \
    --turns 5 2>&1 | quiet | grep "^|\|^# [A-Z]\|Error" | tee $OUT/r/join-ab-7b.log
  ;;
prefill-host)  # each prefill row's host ops (scripts/host_probe.py --prefill)
  timeout 120 python scripts/host_probe.py --prefill 2>&1 | quiet > $OUT/r/host-probe.log
  grep "^##" $OUT/r/host-probe.log
  ;;
split)  # on an nvidia-h200-x2: GPU 0 the column sums' GPU tests (both loops, autotuned) and kernel_probe.py --configs
  # --split; GPU 1 the 7B's 32k prefill rows (full, h2o, a2sf), then with --colsum-split (kernels.COLUMN_SUMS_SPLIT)
  (CUDA_VISIBLE_DEVICES=0 timeout 120 python -m pytest -p no:warnings -m gpu tests/test_kernels.py -k column_sums 2>&1 \
     | tail -n 4 | tee $OUT/r/gpu-tests-colsum.log
   CUDA_VISIBLE_DEVICES=0 timeout 330 python scripts/kernel_probe.py --configs --split 2>&1 | quiet | grep "^|" \
     | tee $OUT/r/colsum-split.log) &
  for flags in "" "--colsum-split"; do
    QUICK_TIMEOUT=230 bash scripts/gpu_issue18.sh quick 1 llama7b 32768 full,h2o,a2sf r0.2 7b-32k${flags:+-split} $flags
    cat $OUT/7b-32k${flags:+-split}.txt
  done
  wait
  ;;
all1)  # the closing run's first call, on an nvidia-h200-x2 (carry [".whl", "old"]): GPU 1 the landed main's (old/)
  # targets-smollm2 and targets-7b; GPU 0 this checkout's targets-smollm2 and targets-7b-short, transformers' rows with them
  mkdir -p $OUT/r/all
  (cd old && export CUDA_VISIBLE_DEVICES=1
   for plan in targets-smollm2 targets-7b; do
     timeout 330 python bench.py --plan $plan --no-hf --weights random --out $OUT/r/all/old-$plan.json 2>&1 | quiet \
       | grep "^|\|^#\|Error" | grep -v "^|--" > $OUT/r/all/old-$plan.log
   done) &
  for plan in targets-smollm2 targets-7b-short; do
    CUDA_VISIBLE_DEVICES=0 timeout 300 python bench.py --plan $plan --weights random --out $OUT/r/all/new-$plan.json 2>&1 \
      | quiet | grep "^|\|^#\|Error" | grep -v "^|--" > $OUT/r/all/new-$plan.log
  done
  wait
  cat $OUT/r/all/*.log
  python scripts/ab_summary.py $OUT/r/all | tee $OUT/r/all/ab.md
  ;;
all2)  # the closing run's second call: GPU 0 this checkout's targets-7b-long, then the GPU tests of test_kernels and
  # test_fast; GPU 1 the token-by-token rows (as `tokenwise`: the landed main eager, this checkout eager, graph, compiled)
  mkdir -p $OUT/r/all
  (export CUDA_VISIBLE_DEVICES=1
   timeout 150 python scripts/tokenwise_ab.py old --tokens 512 2>&1 | quiet | grep "##\|Error" > $OUT/r/all/tokenwise.log
   timeout 150 python scripts/tokenwise_ab.py . --ways eager --tokens 512 2>&1 | quiet | grep "##\|Error" \
     >> $OUT/r/all/tokenwise.log
   timeout 220 python scripts/tokenwise_ab.py . --ways graph,compiled --reps 3 2>&1 | quiet | grep "##\|Error" \
     >> $OUT/r/all/tokenwise.log) &
  CUDA_VISIBLE_DEVICES=0 timeout 330 python bench.py --plan targets-7b-long --no-hf --weights random \
    --out $OUT/r/all/new-targets-7b-long.json 2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" \
    > $OUT/r/all/new-targets-7b-long.log
  CUDA_VISIBLE_DEVICES=0 timeout 200 python -m pytest -p no:warnings -m gpu tests/test_kernels.py tests/test_fast.py 2>&1 \
    | tail -n 4 > $OUT/r/all/gpu-tests.log
  wait
  cat $OUT/r/all/*.log
  ;;
capture)  # the token-by-token compiled step's capture error (all2): the traceback and recompiles, then one switch off
  # at a time (tokenwise_ab.py --set), two GPUs; the GPU tests of test_tokenwise
  tw() { timeout 120 python scripts/tokenwise_ab.py . --ways compiled --policies a2sf --tokens 64 "$@" 2>&1; }
  (export CUDA_VISIBLE_DEVICES=0
   TORCH_LOGS=recompiles tw | quiet | tail -n 60 > $OUT/r/capture-default.log
   for s in fast.step.EMBED=False fast.model.JOIN=False fast.step.INDUCTOR_PDL=False; do
     echo "# $s: $(tw --set $s | grep '##\|Error' | tail -n 2)" >> $OUT/r/capture-bisect0.log
   done) &
  (export CUDA_VISIBLE_DEVICES=1
   for s in fast.kernels.PDL=False fast.model.ROWS=False fast.model.APPEND=False; do
     echo "# $s: $(tw --set $s | grep '##\|Error' | tail -n 2)" >> $OUT/r/capture-bisect1.log
   done
   timeout 150 python -m pytest -p no:warnings -m gpu tests/test_tokenwise.py 2>&1 | tail -n 15 > $OUT/r/capture-tests.log) &
  wait
  cat $OUT/r/capture-*.log
  ;;
tokenwise2)  # after the capture fix: GPU 1 the token-by-token rows (as `tokenwise`), GPU 0 the GPU tests
  mkdir -p $OUT/r/all
  (export CUDA_VISIBLE_DEVICES=0
   timeout 300 python -m pytest -p no:warnings -m gpu tests/test_tokenwise.py tests/test_fast.py tests/test_kernels.py \
     tests/test_gpu.py 2>&1 | tail -n 15 > $OUT/r/all/gpu-tests-2.log) &
  export CUDA_VISIBLE_DEVICES=1
  timeout 150 python scripts/tokenwise_ab.py old --tokens 512 2>&1 | quiet | grep "##\|Error" > $OUT/r/all/tokenwise-2.log
  timeout 150 python scripts/tokenwise_ab.py . --ways eager --tokens 512 2>&1 | quiet | grep "##\|Error" \
    >> $OUT/r/all/tokenwise-2.log
  timeout 250 python scripts/tokenwise_ab.py . --ways graph,compiled --reps 3 2>&1 | quiet | grep "##\|Error" \
    >> $OUT/r/all/tokenwise-2.log
  wait
  cat $OUT/r/all/*-2.log
  ;;
capture2)  # scripts/capture_probe.py: the graph (and compiled) step against the eager calls through a streaming chunk-1
  # cache before it is full, bf16; as is, then one switch off at a time, on two GPUs
  probe() { timeout 100 python scripts/capture_probe.py "$@" 2>&1 | quiet | grep "^##\|Error" | tail -n 4; }
  (export CUDA_VISIBLE_DEVICES=0
   (probe; probe --compiled; probe --set fast.model.JOIN=False; probe --set fast.model.APPEND=False) > $OUT/r/capture2-0.log) &
  (export CUDA_VISIBLE_DEVICES=1
   (probe --set fast.kernels.PDL=False; probe --set fast.cache.FIND_SLOT=0; probe --set fast.model.ROWS=False
    probe --set fast.cache.START_IN_EVICT=False) > $OUT/r/capture2-1.log) &
  wait
  cat $OUT/r/capture2-*.log
  ;;
verify)  # session 10's open ends, one call on an nvidia-h200-x2 carrying [".whl", ".gguf_b"] right after a call that
  # carried [".whl", ".gguf_a"] (`source scripts/gpu_setup.sh`: the model's first half into /root/keep). GPU 0: every
  # -m gpu test of the fast path and the real model (the new bf16 chunk-1 test among them). GPU 1: capture_probe.py
  # --compiled as it is (EMBED off), then EMBED on with inductor's PDL off, with fast.kernels' PDL off; this checkout's
  # targets-smollm2 (EMBED off); the token-by-token graph and compiled steps (EMBED off)
  mkdir -p $OUT/r/verify
  (export CUDA_VISIBLE_DEVICES=0
   timeout 420 python -m pytest -p no:warnings -m gpu tests/test_tokenwise.py tests/test_fast.py tests/test_kernels.py \
     tests/test_gpu.py 2>&1 | tail -n 15 > $OUT/r/verify/gpu-tests.log) &
  export CUDA_VISIBLE_DEVICES=1
  probe() { timeout 100 python scripts/capture_probe.py --compiled "$@" 2>&1 | quiet | grep "^##\|Error" | tail -n 4; }
  (probe; probe --set fast.step.EMBED=True --set fast.step.INDUCTOR_PDL=False
   probe --set fast.step.EMBED=True --set fast.kernels.PDL=False) > $OUT/r/verify/capture.log
  timeout 150 python bench.py --plan targets-smollm2 --no-hf --weights random --out $OUT/r/verify/new-targets-smollm2.json \
    2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" > $OUT/r/verify/new-targets-smollm2.log
  timeout 200 python scripts/tokenwise_ab.py . --ways graph,compiled --reps 3 2>&1 | quiet | grep "##\|Error" \
    > $OUT/r/verify/tokenwise.log
  wait
  cat $OUT/r/verify/*.log
  ;;
embed)  # session 11: the compiled embedding's drift. GPU 0: scripts/angles_probe.py (compiled rotary angles against
  # eager, under inductor's eager_numerics options), capture_probe.py --compiled with EMBED on (it ran with session
  # 11's first try, fast.step.EMBED_NUMERICS, inductor options torch 2.11 lacks: removed since, so both probes now run
  # fast.step.compiled_embedding); GPU 1: SmolLM2 full 1k, EMBED off then on, twice
  mkdir -p $OUT/r/embed
  (export CUDA_VISIBLE_DEVICES=0
   timeout 300 python scripts/angles_probe.py 2>&1 | quiet | grep "^|\|^#\|Error" > $OUT/r/embed/angles.log
   probe() { timeout 100 python scripts/capture_probe.py --compiled "$@" 2>&1 | quiet | grep "^##\|Error" | tail -n 4; }
   (probe --set fast.step.EMBED=True; probe --set fast.step.EMBED=True --set "fast.step.EMBED_NUMERICS={}") \
     > $OUT/r/embed/capture.log) &
  export CUDA_VISIBLE_DEVICES=1
  for rep in 1 2; do for flag in "" --embed; do
    timeout 90 python bench.py --models smollm2 --contexts 1024 --long "" --batches 1 --policies full --no-hf \
      --weights random $flag --out $OUT/r/embed/smollm2-1k-$rep$flag.json 2>&1 | quiet | grep "^| smollm2" \
      | sed "s/^/$rep ${flag:-off} /" >> $OUT/r/embed/bench.log
  done; done
  wait
  cat $OUT/r/embed/*.log
  ;;
verify2)  # session 11, with fast.step.compiled_embedding (EMBED on again, cos and sin eager): one call on an
  # nvidia-h200-x2 carrying [".whl", ".gguf_b"] right after one carrying [".whl", ".gguf_a"]. GPU 0: every -m gpu test
  # of the fast path and the real model, then targets-7b-short; GPU 1: angles_probe.py, capture_probe.py --compiled,
  # targets-smollm2 (transformers' rows too), the token-by-token graph and compiled steps
  mkdir -p $OUT/r/verify2
  (export CUDA_VISIBLE_DEVICES=0
   timeout 330 python -m pytest -p no:warnings -m gpu tests/test_tokenwise.py tests/test_fast.py tests/test_kernels.py \
     tests/test_gpu.py 2>&1 | tail -n 15 > $OUT/r/verify2/gpu-tests.log
   timeout 190 python bench.py --plan targets-7b-short --no-hf --weights random --out $OUT/r/verify2/new-targets-7b-short.json \
     2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" > $OUT/r/verify2/new-targets-7b-short.log) &
  export CUDA_VISIBLE_DEVICES=1
  timeout 100 python scripts/angles_probe.py 2>&1 | quiet | grep "^|\|^#\|Error" > $OUT/r/verify2/angles.log
  timeout 100 python scripts/capture_probe.py --compiled 2>&1 | quiet | grep "^##\|Error" > $OUT/r/verify2/capture.log
  timeout 220 python bench.py --plan targets-smollm2 --weights random --out $OUT/r/verify2/new-targets-smollm2.json \
    2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" > $OUT/r/verify2/new-targets-smollm2.log
  timeout 150 python scripts/tokenwise_ab.py . --ways graph,compiled --reps 3 2>&1 | quiet | grep "##\|Error" \
    > $OUT/r/verify2/tokenwise.log
  wait
  cat $OUT/r/verify2/*.log
  ;;
smollm2-ab)  # session 11, on an nvidia-h200-x2 (carry [".whl", "old"]): the landed main's targets-smollm2 on GPU 1 and
  # this checkout's on GPU 0 at the same time (the closing run's protocol), then this checkout's again alone (the 1k
  # prefill rows are host-bound: verify2's ran beside pytest on the other GPU, a2sf 1k at 1.57x)
  mkdir -p $OUT/r/ab $OUT/r/solo
  (cd old && CUDA_VISIBLE_DEVICES=1 timeout 200 python bench.py --plan targets-smollm2 --no-hf --weights random \
     --out $OUT/r/ab/old-targets-smollm2.json 2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" \
     > $OUT/r/ab/old-targets-smollm2.log) &
  CUDA_VISIBLE_DEVICES=0 timeout 250 python bench.py --plan targets-smollm2 --weights random \
    --out $OUT/r/ab/new-targets-smollm2.json 2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" \
    > $OUT/r/ab/new-targets-smollm2.log
  wait
  CUDA_VISIBLE_DEVICES=0 timeout 200 python bench.py --plan targets-smollm2 --no-hf --weights random \
    --out $OUT/r/solo/new-targets-smollm2.json 2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" \
    > $OUT/r/solo/new-targets-smollm2.log
  cat $OUT/r/ab/*.log $OUT/r/solo/*.log
  python scripts/ab_summary.py $OUT/r/ab | tee $OUT/r/ab/ab.md
  ;;
7b-ab)  # session 11, on an nvidia-h200-x2 (carry [".whl", "old"]): the landed main's targets-7b on GPU 1 beside this
  # checkout's targets-7b-long on GPU 0 (its targets-7b-short ran in verify2)
  mkdir -p $OUT/r/ab7
  (cd old && CUDA_VISIBLE_DEVICES=1 timeout 340 python bench.py --plan targets-7b --no-hf --weights random \
     --out $OUT/r/ab7/old-targets-7b.json 2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" \
     > $OUT/r/ab7/old-targets-7b.log) &
  CUDA_VISIBLE_DEVICES=0 timeout 340 python bench.py --plan targets-7b-long --no-hf --weights random \
    --out $OUT/r/ab7/new-targets-7b-long.json 2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" \
    > $OUT/r/ab7/new-targets-7b-long.log
  wait
  cat $OUT/r/ab7/*.log
  ;;
final)  # one call: this checkout's targets-smollm2 (transformers' rows too) and targets-7b-short, the landed main's
  # (old/) full 1k rows beside them
  timeout 230 python bench.py --plan targets-smollm2 --weights random --profile --out $OUT/r/new-targets-smollm2.json 2>&1 \
    | quiet > $OUT/r/new-targets-smollm2.log
  (cd old && timeout 75 python bench.py --models smollm2 --contexts 1024 --long "" --batches 1 --policies full --no-hf \
    --weights random --out $OUT/r/old-smollm2-1k.json 2>&1 | quiet | grep "^|\|^#\|Error" > $OUT/r/old-smollm2-1k.log)
  timeout 185 python bench.py --plan targets-7b-short --no-hf --weights random --out $OUT/r/new-targets-7b-short.json 2>&1 \
    | quiet > $OUT/r/new-targets-7b-short.log
  (cd old && timeout 90 python bench.py --models llama7b --contexts 1024 --long "" --batches 1 --policies full --no-hf \
    --weights random --out $OUT/r/old-7b-1k.json 2>&1 | quiet | grep "^|\|^#\|Error" > $OUT/r/old-7b-1k.log)
  grep -h "^| [sl]" $OUT/r/*.log | grep -v "^| *Name"
  ;;
final-long)  # the GPU tests of test_kernels and test_fast, then this checkout's targets-7b-long
  timeout 110 python -m pytest -x -m gpu tests/test_kernels.py tests/test_fast.py 2>&1 | tail -n 4 | tee $OUT/r/gpu-tests.log
  timeout 320 python bench.py --plan targets-7b-long --no-hf --weights random --out $OUT/r/new-targets-7b-long.json 2>&1 \
    | quiet > $OUT/r/new-targets-7b-long.log
  grep -h "^| [sl]" $OUT/r/*.log | grep -v "^| *Name"
  ;;
prefill-profile)  # SmolLM2's fused prefill, full, 1k, 8 sequences: the landed main (old/) beside this checkout,
  # each call's CUDA kernels and CPU ops (session 6 found it at 0.51x the landed main's speed)
  for dir in old .; do
    (cd $dir && timeout 150 python - <<'PY' 2>&1 | grep -v "Warn\|warn" | tee -a $OUT/r/prefill-profile.log
import sys, time, torch
sys.path.insert(0, ".")
import bench, generate, policies
m, _ = bench.build_model("smollm2", torch.device("cuda"), torch.bfloat16, weights="random")
cache_mod = __import__("fast").KVCache if hasattr(bench, "fast") else __import__("cache").KVCache
tokens = torch.randint(0, m.cfg.vocab_size, (8, 1024), device="cuda")
p = policies.make_policy("full", None)
make = lambda: cache_mod(m.cfg, p, None, batch=8, mode="prefill", chunk=1, device="cuda", dtype=m.dtype, max_len=1100)
with torch.no_grad():
    for _ in range(3):
        generate.feed(m, tokens, make(), last_only=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate.feed(m, tokens, make(), last_only=True)
    torch.cuda.synchronize()
    print(f"# {sys.argv[0]} in {__import__('os').getcwd()}: {(time.perf_counter() - t0) * 1000:.1f} ms a prefill")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate.feed(m, tokens, make(), last_only=True)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
PY
    )
  done
  ;;
probe)
  timeout ${PROBE_TIMEOUT:-200} python scripts/rows_probe.py --configs 2>&1 | quiet | grep "^|\|^#\|Error" | tee $OUT/r/rows-probe.log
  ;;
colsum)
  timeout ${COLSUM_TIMEOUT:-300} python scripts/kernel_probe.py --configs 2>&1 | quiet | grep "^|" | tee $OUT/r/colsum.log
  ;;
static)
  timeout 300 python bench.py --plan $2 --no-hf --weights random --static --out $OUT/r/static-$2.json 2>&1 | quiet \
    | grep "^|\|^#\|Error" | grep -v "^|--" | tee $OUT/r/static-$2.log
  ;;
esac
