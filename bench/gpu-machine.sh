#!/usr/bin/env bash
# The standard ktx benchmark on the GPU machine, in ONE run of under 8 minutes:
#
#   bash bench/gpu-machine.sh OUTDIR [LAYERS]
#
# From the repository root with the bundle carried (bundle/ktx.tar.xz, made by
# scripts/bundle.sh; docs/gpu-machine.md), or with KTX_BUNDLE_DIR pointing at an
# unpacked bundle (its bin/ktx-ctl is used). Steps, each with its own timeout:
#
#   1. unpack the bundle to /tmp/ktx (unless KTX_BUNDLE_DIR is set);
#   2. machine facts: date, lscpu, free, nvidia-smi, `ktx-ctl topology show --json`;
#   3. synthesize the standard benchmark model (docs/performance.md, "Benchmark
#      model"): `ktx-ctl synth --preset dsv3 --layers LAYERS --dense-layers 1
#      --vocab 8192 --quant q4_k_m` (LAYERS = 4: 20.3 GiB) on /dev/shm when it has
#      room, else on local disk;
#   4. `ktx-ctl bench` with 16 threads: prefill 512 and 2048 tokens, decode 128
#      sampled steps at batch 1, 4 and 16, with a time budget (--max-seconds)
#      that keeps the whole run under the deadline; bench.json is rewritten after
#      every phase, so even a killed run leaves what it measured;
#   5. delete the model (also on error or interrupt).
#
# OUTDIR receives: progress.log (timestamped steps), machine.txt, topology.json,
# synth.log, bench.txt (the table), bench.log (bench progress), bench.json, and
# summary.txt (machine line + table). Exit status 0 when bench.json is complete.
#
# Environment (defaults are the standard benchmark): KTX_BENCH_DEADLINE_S (450: total
# seconds), KTX_BENCH_THREADS (16, capped at nproc), KTX_BENCH_PROMPTS (512,2048),
# KTX_BENCH_GEN (128), KTX_BENCH_BATCHES (1,4,16), KTX_BENCH_ARGS (extra bench flags,
# e.g. "--experts reference"), KTX_BENCH_SYNTH_ARGS (extra synth flags, e.g. "--experts 32"
# for a quick trial), KTX_BENCH_MODEL_DIR (where to write the model).
set -u -o pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash bench/gpu-machine.sh OUTDIR [LAYERS]" >&2
  exit 2
fi
out=$1
layers=${2:-4}
deadline_s=${KTX_BENCH_DEADLINE_S:-450}
threads=${KTX_BENCH_THREADS:-16}
t0=$(date +%s)
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)

elapsed() { echo $(( $(date +%s) - t0 )); }
left() { echo $(( deadline_s - $(elapsed) )); }
log() { echo "[$(date -u +%H:%M:%S) +$(elapsed)s] $*" | tee -a "$out/progress.log" >&2; }

case $layers in
  ''|*[!0-9]*) log "LAYERS must be a number, got '$layers'"; exit 2 ;;
esac
if [ "$layers" -lt 2 ]; then
  log "LAYERS must be >= 2 (one dense layer + MoE layers), got $layers"
  exit 2
fi
n_cpu=$(nproc)
if [ "$threads" -gt "$n_cpu" ]; then threads=$n_cpu; fi

model=""
cleanup() {
  if [ -n "$model" ] && [ -e "$model" ]; then
    rm -f "$model" && log "deleted $model"
  fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---- 1. bundle ----
if [ -n "${KTX_BUNDLE_DIR:-}" ]; then
  ktx=$KTX_BUNDLE_DIR
else
  ktx=/tmp/ktx
  if [ ! -f bundle/ktx.tar.xz ]; then
    log "no bundle/ktx.tar.xz here (run from the repository root with the bundle carried)"
    exit 2
  fi
  log "unpacking bundle/ktx.tar.xz to /tmp"
  rm -rf /tmp/ktx
  if ! timeout 60 tar -xf bundle/ktx.tar.xz -C /tmp; then
    log "unpacking the bundle failed"
    exit 2
  fi
fi
ctl=$ktx/bin/ktx-ctl
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}${LD_LIBRARY_PATH:+:}/usr/local/nvidia/lib64
if [ ! -x "$ctl" ] || ! "$ctl" bench --help >/dev/null 2>&1; then
  log "$ctl has no 'bench' command: rebuild the bundle (bash scripts/bundle.sh)"
  exit 2
fi

# ---- 2. machine facts ----
log "machine facts"
{
  echo "## date"; date -u
  echo "## git"; git rev-parse --short HEAD 2>/dev/null || echo "(no git)"
  echo "## lscpu"; lscpu 2>&1 | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|NUMA|MHz|L3' || true
  echo "## free -g"; free -g 2>&1 || true
  echo "## df"; df -h /dev/shm /tmp . 2>&1 || true
  echo "## nvidia-smi"
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  echo "## transparent huge pages"; cat /sys/kernel/mm/transparent_hugepage/enabled 2>&1 || true
} > "$out/machine.txt"
timeout 30 "$ctl" topology show --json > "$out/topology.json" 2>>"$out/progress.log" ||
  log "topology show failed (continuing)"

# ---- 3. the benchmark model ----
need_kib=$(( ((layers - 1) * 7 + 3) * 1024 * 1024 ))  # ~6.5 GiB per MoE layer + ~1 GiB, margin
free_kib() { df -Pk "$1" 2>/dev/null | awk 'NR==2 {print $4}'; }
dir=${KTX_BENCH_MODEL_DIR:-}
if [ -z "$dir" ]; then
  for d in /dev/shm /tmp "$PWD"; do
    f=$(free_kib "$d")
    if [ -n "$f" ] && [ "$f" -gt "$need_kib" ] && [ -w "$d" ]; then dir=$d; break; fi
  done
fi
if [ -z "$dir" ]; then
  log "no directory with $(( need_kib / 1048576 )) GiB free for the model (set KTX_BENCH_MODEL_DIR)"
  exit 2
fi
model=$dir/ktx-bench-dsv3-${layers}l-$$.gguf
log "synthesizing the model ($layers layers, 1 dense, vocab 8192, q4_k_m) at $model"
synth_timeout=$(( $(left) - 150 ))
if [ "$synth_timeout" -gt 240 ]; then synth_timeout=240; fi
if [ "$synth_timeout" -lt 30 ]; then
  log "not enough time left for synth ($(left) s)"
  exit 3
fi
# shellcheck disable=SC2086  # KTX_BENCH_SYNTH_ARGS is a list of flags
if ! timeout --kill-after=10 "$synth_timeout" "$ctl" synth --preset dsv3 --layers "$layers" \
    --dense-layers 1 --vocab 8192 --quant q4_k_m --seed 1 --threads "$threads" --out "$model" \
    ${KTX_BENCH_SYNTH_ARGS:-} > "$out/synth.log" 2>&1; then
  log "synth failed or timed out after ${synth_timeout} s (tail of synth.log follows)"
  tail -5 "$out/synth.log" | tee -a "$out/progress.log" >&2
  exit 3
fi
log "model written: $(du -h "$model" | cut -f1) ($(grep -Eo '[0-9.]+ GB/s' "$out/synth.log" | tail -1))"

# ---- 4. the benchmark ----
# The bench's budget covers its load and repack too; the timeout (15 s for cleanup left)
# is the backstop for a phase that runs longer than estimated.
bench_timeout=$(( $(left) - 15 ))
budget=$(( bench_timeout - 20 ))
if [ "$budget" -lt 30 ]; then
  log "not enough time left for the benchmark ($(left) s)"
  exit 3
fi
log "ktx-ctl bench: $threads threads, budget ${budget} s, timeout ${bench_timeout} s"
# shellcheck disable=SC2086  # KTX_BENCH_ARGS is a list of flags
timeout --kill-after=10 "$bench_timeout" "$ctl" bench --model "$model" --threads "$threads" \
  --prompt-len "${KTX_BENCH_PROMPTS:-512,2048}" --gen "${KTX_BENCH_GEN:-128}" \
  --batch "${KTX_BENCH_BATCHES:-1,4,16}" --max-seconds "$budget" \
  --json "$out/bench.json" ${KTX_BENCH_ARGS:-} > "$out/bench.txt" 2> "$out/bench.log"
rc=$?
if [ "$rc" -ne 0 ]; then
  log "ktx-ctl bench exited $rc (124/137: timeout); bench.json holds the phases that finished"
  tail -5 "$out/bench.log" | tee -a "$out/progress.log" >&2
fi
cleanup
model=""

# ---- 5. summary ----
{
  echo "## ktx bench on $(hostname) $(date -u +%Y-%m-%dT%H:%M:%SZ), $layers layers, $threads threads"
  grep -m1 'Model name' "$out/machine.txt" || true
  cat "$out/bench.txt"
  grep -E 'skipping|CPU experts ready' "$out/bench.log" || true
} > "$out/summary.txt"
cat "$out/summary.txt"
complete=false
if [ -s "$out/bench.json" ] && grep -q '"complete": true' "$out/bench.json"; then complete=true; fi
log "done in $(elapsed) s; bench.json complete: $complete"
[ "$complete" = true ]
