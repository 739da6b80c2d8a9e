#!/usr/bin/env bash
# Compares the AMX tile-prefill variants (issue #4) on an AMX machine, with the
# bundled moe_benchmark (scripts/bundle.sh: /tmp/ktx/tests/moe_benchmark):
#
#   bash scripts/amx_variants.sh OUT_DIR [MOE_BENCHMARK]   # about 3-4 minutes, at most 8 (timeouts)
#
# Run 1: the full DeepSeek-V3 layer (256 experts, Q4_K gate/up + Q6_K down) at
# 2048, 512 and 128 tokens for every spec in SPECS (ApplyMoeTileSpec in
# kernels/cpu/moe/moe.h), every expert on the tile path (switch point 1
# token), with the AMX int8 peak measured beside each row and on its own, and
# the one-core tile kernel (64 tokens, in L2 and from DRAM) per spec.
# Run 2: the default (phased) and the old in-loop kernel at the measured
# switch point (32 tokens per expert) for 512 and 128 tokens.
# Then moe_test and moe_amx_emu_test (real tiles: phased == in-loop bitwise).
# Writes OUT_DIR/{run1,run2}.{txt,json,summary.json}, tests.txt, and prints the
# summary tables. Override the spec list with SPECS="a,b,..." in the environment.
set -u
OUT=${1:?usage: amx_variants.sh OUT_DIR [MOE_BENCHMARK]}
BENCH=${2:-/tmp/ktx/tests/moe_benchmark}
TESTS_DIR=$(dirname "$BENCH")
mkdir -p "$OUT"
# inloop:skew=0:pad=0 is the kernel as it was before (the baseline); inloop:skew=256:pad=0
# isolates the 4K-aliasing fix, inloop (skew 256, pad 16) adds the padded stage-1 rows; the phased ones vary chunk size, chunk shape,
# tile group, the stage-1/stage-2 task sizes and the token split.
SPECS=${SPECS:-inloop:skew=0:pad=0,inloop:skew=256:pad=0,inloop,phased,phased:pf=0,phased:skew=0,phased:pad=0,phased:chunk=256,phased:chunk=1024,phased:groups=2,phased:group=1024,phased:down=224,phased:ff=256,phased:maxtok=256}
echo "amx_variants: $(date -u +%FT%TZ) bench=$BENCH specs=$SPECS" | tee "$OUT/info.txt"
lscpu 2>/dev/null | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|L2|L3|Flags' | sed 's/Flags:.*amx/Flags: ...amx/' \
  | cut -c1-200 >> "$OUT/info.txt"

# (Google Benchmark appends /iterations:N, /min_time:T, /real_time to names: no '$'.)
FILTER='^read_bw/|^peak/amx_int8/|^tile_convert/|^tile_kernel/(l2|dram)@.*/tokens:64/|^prefill/amx@'
timeout 220 "$BENCH" --ktx_full_layer --ktx_variants=amx --ktx_amx_configs="$SPECS" \
  --ktx_prefill_tokens=2048,512,128 --ktx_prefill_min_tokens=1 \
  --ktx_summary_json="$OUT/run1.summary.json" --benchmark_filter="$FILTER" \
  --benchmark_out="$OUT/run1.json" --benchmark_out_format=json > "$OUT/run1.txt" 2>&1
echo "run1 rc=$?" | tee -a "$OUT/info.txt"

timeout 70 "$BENCH" --ktx_full_layer --ktx_variants=amx --ktx_amx_configs=phased,inloop:skew=0:pad=0 \
  --ktx_prefill_tokens=512,128 --ktx_prefill_min_tokens=32 \
  --ktx_summary_json="$OUT/run2.summary.json" --benchmark_filter='^peak/amx_int8/|^prefill/amx@' \
  --benchmark_out="$OUT/run2.json" --benchmark_out_format=json > "$OUT/run2.txt" 2>&1
echo "run2 rc=$?" | tee -a "$OUT/info.txt"

for r in run1 run2; do
  echo "== $r"
  grep -E '^(prefill|tile_kernel|tile_convert|peak)/' "$OUT/$r.txt" | cut -c1-220
  sed -n '/== moe_benchmark summary/,$p' "$OUT/$r.txt"
done

: > "$OUT/tests.txt"
for t in moe_amx_emu_test moe_test; do
  if [ -x "$TESTS_DIR/$t" ]; then
    timeout 90 "$TESTS_DIR/$t" > "$OUT/$t.log" 2>&1
    echo "$t rc=$? $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/$t.log" | tr '\n' ' ')" | tee -a "$OUT/tests.txt"
  fi
done
