# Device-machine runs for issue 6 (sourced by a `run` call; see scripts/gpu_setup.sh).
#   phase tests: the kernels and fast paths on CUDA, then the 7B plan with a profile (no model file needed)
#   phase bench: every target from one run (bench.py --plan targets), then the GPU tests on the real model
source scripts/gpu_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/r
quiet() { grep -v "Online softmax\|^\s*$\|warnings.warn\|UserWarning"; }
case "$1" in
probe)
  timeout 150 python scripts/kernel_probe.py 2>&1 | tee $OUT/r/probe.log | grep -v Warning
  timeout 240 python -m pytest -q -m "not slow" -x tests/test_kernels.py 2>&1 | tail -4 | tee $OUT/r/tests.log
  timeout 150 python -m pytest -q -m gpu -x tests/test_fast.py 2>&1 | tail -4 | tee -a $OUT/r/tests.log
  ;;
tests)
  timeout 240 python -m pytest -q -m "not slow" -x tests/test_kernels.py 2>&1 | tail -25 | tee $OUT/r/tests.log
  timeout 120 python -m pytest -q -m gpu -x tests/test_fast.py 2>&1 | tail -15 | tee -a $OUT/r/tests.log
  timeout ${2:-240} python bench.py --plan targets-7b --no-hf --profile --out $OUT/r/b7.json 2>&1 | quiet > $OUT/r/b7.log
  grep "^|\|Error\|error" $OUT/r/b7.log | tail -30
  ;;
bench)
  mkdir -p /root/keep/packages && cp .evaldata/* /root/keep/packages/
  timeout ${2:-480} python bench.py --plan targets --profile --out $OUT/r/bench.json 2>&1 | quiet > $OUT/r/bench.log
  grep "^|\|^#\|Error\|error" $OUT/r/bench.log | tail -45
  ;;
esac
