#!/usr/bin/env bash
# On the GPU machine, from the repository root (packed by pack_gpu_attention_bundle.sh):
# the GPU attention actor's tests, then, with a model, `ktx-ctl bench --shards 1` with attention
# on cuda:0 and on the CPU (the baseline), JSON under OUTDIR.
# Usage: bash /tmp/ktxa/run_gpu_attention.sh OUTDIR [MODEL.gguf [extra bench flags...]]
out=${1:-/tmp/gpu-attention-out}
model=${2:-}
shift 2 2>/dev/null || shift $#
mkdir -p "$out"
here=/tmp/ktxa
export LD_LIBRARY_PATH=$here/lib:${LD_LIBRARY_PATH:-}${LD_LIBRARY_PATH:+:}/usr/local/nvidia/lib64
export KTX_LOG_LEVEL=warning
{ date -u; pwd; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } 2>&1 \
  | tee "$out/machine.txt"
status=0
for t in attention_device_test gpu_attention_test; do
  timeout 600 "$here/bin/$t" --gtest_brief=1 >"$out/$t.log" 2>&1; rc=$?
  [ $rc -ne 0 ] && status=1
  echo "== $t rc=$rc: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$t.log" | tr '\n' ' ')"
done
grep -h "measured\|SKIPPED" "$out"/gpu_attention_test.log | head -60
grep -h -B2 -A12 "Failure" "$out"/*.log | head -100
if [ -n "$model" ]; then
  for device in cuda:0 cpu; do
    timeout 580 "$here/bin/ktx-ctl" bench --model "$model" --shards 1 --attention-device "$device" \
      --json "$out/bench-${device/:/}.json" "$@" 2>&1 | tee "$out/bench-${device/:/}.log" | tail -30
  done
fi
exit $status
