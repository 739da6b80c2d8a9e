#!/usr/bin/env bash
# The main job (README, `bash scripts/setup.sh demo`): a real multi-process ktx
# deployment on loopback.
#
#   1. the model: KTX_DEMO_MODEL (a GGUF path) or, by default, a small
#      DeepSeek-V3-architecture model synthesized now (`ktx-ctl synth
#      --preset tiny`: random weights, a small BPE tokenizer, so the text is
#      gibberish but every stage of the real model runs);
#   2. a topology with two nodes on 127.0.0.1: the head (scheduler, router,
#      attention) and one expert-shard node holding every routed expert;
#   3. starts both `ktx-node` processes, waits until the head serves;
#   4. streams a generation through `ktx-ctl generate` (timings on stderr) and
#      prints `ktx-ctl status`;
#   5. stops the nodes with SIGTERM (they drain and exit).
#
# Usage: scripts/demo.sh BUILD_DIR   (setup.sh builds first)
set -euo pipefail
BUILD_DIR=${1:-build}
CTL=$BUILD_DIR/cli/ktx-ctl
NODE=$BUILD_DIR/cli/ktx-node
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ktx-demo.XXXXXX")
PIDS=()

log() { printf '\033[1m[demo]\033[0m %s\n' "$*" >&2; }

cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits for a readiness line in a node's log; fails with the log when the node exits first.
wait_ready() {
  local pid=$1 logfile=$2 what=$3
  for _ in $(seq 1200); do
    grep -q "serving on" "$logfile" 2>/dev/null && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$what exited before it was ready:"; cat "$logfile" >&2; return 1
    fi
    sleep 0.1
  done
  log "$what not ready after 120 s:"; cat "$logfile" >&2; return 1
}

MODEL=${KTX_DEMO_MODEL:-}
if [ -z "$MODEL" ]; then
  MODEL=$WORK/dsv3-tiny-synth.gguf
  log "1/5 synthesizing a small DeepSeek-V3-architecture model: $MODEL"
  "$CTL" synth --preset tiny --quant q4_k_m --seed 7 --out "$MODEL"
else
  log "1/5 model: $MODEL"
fi

HEAD_PORT=$(free_port)
SHARD_PORT=$(free_port)
while [ "$SHARD_PORT" = "$HEAD_PORT" ]; do SHARD_PORT=$(free_port); done
NCPU=$(nproc)
cat >"$WORK/topology.textproto" <<CFG
# proto-file: proto/ktx/v1/topology.proto
# proto-message: ktx.v1.TopologyConfig
# The demo: a head and one expert-shard node, both on loopback.
nodes {
  name: "head"
  listen_address: "127.0.0.1:$HEAD_PORT"
  head: true
  attention_device: "cpu"
}
nodes {
  name: "shard0"
  listen_address: "127.0.0.1:$SHARD_PORT"
  shards { name: "shard0/experts" numa_node: 0 cpus: "0-$((NCPU - 1))" }
}
CFG
log "2/5 topology ($WORK/topology.textproto): head on 127.0.0.1:$HEAD_PORT, shard node on 127.0.0.1:$SHARD_PORT"
"$CTL" topology validate "$WORK/topology.textproto" --model "$MODEL" >&2

log "3/5 starting the nodes"
"$NODE" --model "$MODEL" --topology "$WORK/topology.textproto" --node shard0 >"$WORK/shard0.log" 2>&1 &
PIDS+=($!)
wait_ready "${PIDS[0]}" "$WORK/shard0.log" "shard node"
"$NODE" --model "$MODEL" --topology "$WORK/topology.textproto" --node head >"$WORK/head.log" 2>&1 &
PIDS+=($!)
wait_ready "${PIDS[1]}" "$WORK/head.log" "head node"
sed 's/^/  head | /' "$WORK/head.log" >&2

log "4/5 ktx-ctl generate --target 127.0.0.1:$HEAD_PORT"
"$CTL" generate --target "127.0.0.1:$HEAD_PORT" --max-tokens 48 --temperature 0.8 --seed 7 \
  "Tom found an old map in the attic."
echo
"$CTL" status --target "127.0.0.1:$HEAD_PORT"

log "5/5 stopping the nodes (SIGTERM: drain, then exit)"
for pid in "${PIDS[@]}"; do kill -TERM "$pid"; done
for pid in "${PIDS[@]}"; do wait "$pid" || { log "a node exited with $?"; exit 1; }; done
PIDS=()
log "done"
