# Device-machine runs for issue 6 (sourced by a `run` call after scripts/gpu_setup.sh's model halves).
#   tests: the kernels and fast paths on CUDA (tiny models; no model file needed)
#   bench: every target from one run (bench.py --plan targets --profile), then the real-model GPU tests
#   probe: scripts/kernel_probe.py (kernel timings behind kernels.py's choices)
#   prefill: scripts/prefill_probe.py (host time, GPU busy time and launches of one prefill)
source scripts/gpu_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=.:$PYTHONPATH
mkdir -p $OUT/r
quiet() { grep -v "Online softmax\|^\s*$\|warnings.warn\|UserWarning\|DEBUG"; }
case "$1" in
probe)
  timeout 150 python scripts/kernel_probe.py 2>&1 | quiet | tee $OUT/r/probe.log
  ;;
prefill)
  timeout ${2:-200} python scripts/prefill_probe.py 2>&1 | quiet | tee $OUT/r/prefill_probe.log
  ;;
tests)
  timeout 240 python -m pytest -q -m "not slow" -p no:logging tests/test_kernels.py 2>&1 | quiet | tail -12 | tee $OUT/r/tests.log
  timeout 150 python -m pytest -q -m gpu -p no:logging tests/test_fast.py 2>&1 | quiet | tail -12 | tee -a $OUT/r/tests.log
  ;;
bench)
  mkdir -p /root/keep/packages && cp .evaldata/* /root/keep/packages/
  timeout ${2:-480} python bench.py --plan targets --profile --out $OUT/r/bench.json 2>&1 | quiet > $OUT/r/bench.log
  grep "^|\|^#\|Error\|error" $OUT/r/bench.log | grep -v "^|--\|^| *Name" | tail -40
  [ -n "$3" ] && timeout $3 python -m pytest -q -m gpu -p no:logging tests/test_gpu.py 2>&1 | quiet | tail -8 | tee $OUT/r/gpu_tests.log
  ;;
esac
