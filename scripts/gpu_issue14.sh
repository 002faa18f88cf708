# Device-machine runs for issue 14 (the redesign): `bash scripts/gpu_issue14.sh PHASE [PLAN]`.
#   check: scripts/gpu_check_fast.py (the fast path against the reference on CUDA)
#   bench PLAN: bench.py --plan PLAN --no-hf --weights random (speed does not depend on the values) for the landed main (old/, the files of commit 783c16e)
#               and for this checkout, one after the other, same machine, same call
source scripts/gpu_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/r
quiet() { grep -v "Online softmax\|^\s*$\|warnings.warn\|UserWarning\|DEBUG\|_warn_once"; }
case "$1" in
check)
  timeout 240 python scripts/gpu_check_fast.py 2>&1 | quiet | tee $OUT/r/check.log
  ;;
bench)
  (cd old && timeout ${3:-280} python bench.py --plan $2 --no-hf --weights random --out $OUT/r/old-$2.json 2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" | tee $OUT/r/old-$2.log)
  timeout ${3:-280} python bench.py --plan $2 --no-hf --weights random --out $OUT/r/new-$2.json 2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" | tee $OUT/r/new-$2.log
  ;;
esac
# probe: scripts/host_probe.py for old/ and this checkout (wall, kernels, host ops of one prefill / streaming call)
if [ "$1" = probe ]; then
  timeout 120 python scripts/host_probe.py old 2>&1 | quiet > $OUT/r/probe-old.log
  timeout 120 python scripts/host_probe.py . 2>&1 | quiet > $OUT/r/probe-new.log
  grep "^##" $OUT/r/probe-old.log $OUT/r/probe-new.log
fi
if [ "$1" = new ]; then  # bench PLAN for this checkout only
  timeout ${3:-280} python bench.py --plan $2 --no-hf --weights random --out $OUT/r/new-$2.json 2>&1 | quiet | grep "^|\|^#\|Error" | grep -v "^|--" | tee $OUT/r/new-$2.log
fi
if [ "$1" = row ]; then  # one 7B row (memory): old/ then this checkout
  shift
  (cd old && timeout 150 python bench.py --no-hf --weights random --models llama7b --batches 1 --long "" "$@" --out $OUT/r/old-row.json 2>&1 | quiet | grep "^| llama\|Error")
  timeout 150 python bench.py --no-hf --weights random --models llama7b --batches 1 --long "" "$@" --out $OUT/r/new-row.json 2>&1 | quiet | grep "^| llama\|Error"
fi
if [ "$1" = ab ]; then  # ab PLAN RUNS: old, new, old, new, ... (RUNS of each), then the medians (scripts/ab_summary.py)
  for i in $(seq ${3:-2}); do
    (cd old && timeout 150 python bench.py --plan $2 --no-hf --weights random --out $OUT/r/old-$i.json 2>&1 | quiet | grep "Error")
    timeout 150 python bench.py --plan $2 --no-hf --weights random --out $OUT/r/new-$i.json 2>&1 | quiet | grep "Error"
  done
  python scripts/ab_summary.py $OUT/r | tee $OUT/r/ab.md
fi
