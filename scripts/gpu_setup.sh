# Sourced at the start of a device call: the gguf wheel, then the default model joined from its
# two halves (.gguf_a, .gguf_b: a call carries at most 64 MiB). See ../shared/docs/assets.md.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export KV_EVICTION_HOME=/root/keep
mkdir -p /root/keep
[ -f .gguf_a/part_aa ] && cp .gguf_a/part_aa /root/keep/
if [ -f .gguf_b/part_ab ]; then cp .gguf_b/part_ab /root/keep/; fi
if [ -f /root/keep/part_aa ] && [ -f /root/keep/part_ab ] && [ ! -f /root/keep/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /root/keep/part_aa /root/keep/part_ab > /root/keep/SmolLM2-135M-Instruct.Q4_1.gguf
fi
ls -la /root/keep
