#!/usr/bin/env bash
# On the GPU machine, from the repository root: the GPU tests and the benchmark.
# Usage: bash /tmp/ktxg/run_gpu.sh OUTDIR [bench] [sanitize] [experts] [gemv]   (packed by pack_gpu_bundle.sh)
out=${1:-/tmp/gpu-out}
mkdir -p "$out"
here=/tmp/ktxg
export LD_LIBRARY_PATH=$here/lib:${LD_LIBRARY_PATH:-}${LD_LIBRARY_PATH:+:}/usr/local/nvidia/lib64
export KTX_LOG_LEVEL=warning
{ date -u; pwd; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv; } 2>&1 | tee "$out/machine.txt"
status=0
for t in gpu_plan_test expert_cost_model_test cuda_kernels_test gpu_experts_test cuda_deepseek2_test; do
  timeout 200 "$here/tests/$t" --gtest_brief=1 >"$out/$t.log" 2>&1; rc=$?
  [ $rc -ne 0 ] && status=1
  echo "== $t rc=$rc: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$t.log" | tr '\n' ' ')"
done
grep -h "measured" "$out"/cuda_deepseek2_test.log "$out"/gpu_experts_test.log
grep -h -B2 -A12 "Failure" "$out"/*.log | head -100
if [[ " $* " == *" sanitize "* ]]; then
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  timeout 150 "$cs" --tool memcheck --error-exitcode 3 "$here/tests/cuda_kernels_test" --gtest_brief=1 \
    --gtest_filter='Widths/MlaAttentionTest.*/h4*:Widths/MlaAttentionTest.*/h20*:MlaWriteKv.*:MlaPrepareQ.*:Configs/*:BasicOps.*:Types/QuantGemvTest.*/q4_K:Types/QuantGemvTest.*/q6_K:Types/QuantGemvTest.*/q8_0' \
    >"$out/memcheck.log" 2>&1
  echo "== memcheck rc=$?: $(grep -E 'ERROR SUMMARY|PASSED|FAILED' "$out/memcheck.log" | tr '\n' ' ')"
fi
if [[ " $* " == *" bench "* ]]; then
  timeout 200 "$here/tests/gpu_benchmark" --benchmark_out="$out/gpu_benchmark.json" \
    --benchmark_out_format=json 2>&1 | tee "$out/gpu_benchmark.log" | grep -E "^BM_|^device"
fi
if [[ " $* " == *" experts "* ]]; then
  # Routed experts streamed over PCIe (needs ~7 GB of host memory; ~1-2 min).
  timeout 400 "$here/tests/gpu_experts_benchmark" --json "$out/gpu_experts_benchmark.json" 2>&1 \
    | tee "$out/gpu_experts_benchmark.log"
fi
if [[ " $* " == *" gemv "* ]]; then
  # Quantized GEMV vs cuBLAS bf16 at DeepSeek-V3 shapes, 1..16 tokens (~1 min).
  timeout 300 "$here/tests/gemv_benchmark" --json "$out/gemv_benchmark.json" 2>&1 \
    | tee "$out/gemv_benchmark.log"
fi
exit $status
