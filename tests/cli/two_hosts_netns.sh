#!/usr/bin/env bash
# Two hosts made with network namespaces: the head in one, an expert-shard node
# in the other, joined by a veth pair (10.231.X.1 <-> 10.231.X.2, nothing else
# reachable). Checks that a greedy generation through the head gives exactly
# the tokens of the same topology run as one process (`ktx-node --prompt`
# with every shard in-process), then that killing the shard host's node makes
# the next request fail with UNAVAILABLE naming the shard (no hang), and that
# a restarted shard node serves again.
#
# Usage: two_hosts_netns.sh BUILD_DIR MODEL
# Exit 77 (ctest: skipped) with a message when it cannot create namespaces
# (not root, no `ip`, or no CAP_NET_ADMIN in a container).
set -euo pipefail
BUILD_DIR=$1
MODEL=$2
CTL=$BUILD_DIR/cli/ktx-ctl
NODE=$BUILD_DIR/cli/ktx-node
TAG=$$
NS_HEAD=ktxh$TAG
NS_SHARD=ktxs$TAG
VETH_A=kva$TAG
VETH_B=kvb$TAG
NET=10.231.$((TAG % 250 + 1))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ktx-netns.XXXXXX")
PIDS=()

skip() { echo "SKIPPED: two-host test: $*" >&2; exit 77; }
fail() { echo "FAILED: $*" >&2; exit 1; }

command -v ip >/dev/null || skip "no 'ip' command (iproute2)"
[ "$(id -u)" -eq 0 ] || skip "needs root to create network namespaces (run as root, or in CI as root)"
ip netns add "$NS_HEAD" 2>/dev/null || skip "cannot create a network namespace (no CAP_NET_ADMIN?)"

cleanup() {
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  ip netns del "$NS_HEAD" 2>/dev/null || true
  ip netns del "$NS_SHARD" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS_SHARD"
ip link add "$VETH_A" type veth peer name "$VETH_B"
ip link set "$VETH_A" netns "$NS_HEAD"
ip link set "$VETH_B" netns "$NS_SHARD"
ip -n "$NS_HEAD" addr add "$NET.1/24" dev "$VETH_A"
ip -n "$NS_SHARD" addr add "$NET.2/24" dev "$VETH_B"
for ns in "$NS_HEAD" "$NS_SHARD"; do ip -n "$ns" link set lo up; done
ip -n "$NS_HEAD" link set "$VETH_A" up
ip -n "$NS_SHARD" link set "$VETH_B" up

NCPU=$(nproc)
LAST=$((NCPU - 1))
cat >"$WORK/two-hosts.textproto" <<CFG
nodes {
  name: "head"
  listen_address: "$NET.1:50051"
  head: true
  attention_device: "cpu"
  shards { name: "head/numa0" numa_node: 0 cpus: "0-$LAST" }
}
nodes {
  name: "host2"
  listen_address: "$NET.2:50051"
  shards { name: "host2/numa0" numa_node: 0 cpus: "0-$LAST" }
}
CFG

wait_ready() {  # pid logfile
  for _ in $(seq 1200); do
    grep -q "serving on" "$2" 2>/dev/null && return 0
    kill -0 "$1" 2>/dev/null || { cat "$2" >&2; fail "node exited before it was ready"; }
    sleep 0.1
  done
  cat "$2" >&2; fail "node not ready after 120 s"
}

COMMON=(--model "$MODEL" --topology "$WORK/two-hosts.textproto" --experts reference
        --shard-deadline-ms 5000)
PROMPT="Tom found an old map in the attic."

# The reference: the same topology in one process (no --node: every shard in-process).
"$NODE" --model "$MODEL" --topology "$WORK/two-hosts.textproto" --experts reference \
  --prompt "$PROMPT" --max-tokens 16 --temperature 0 \
  >"$WORK/one.txt" 2>"$WORK/one.log" || { cat "$WORK/one.log" >&2; fail "single-process run"; }

start_shard() {
  ip netns exec "$NS_SHARD" "$NODE" "${COMMON[@]}" --node host2 >"$WORK/host2.log" 2>&1 &
  SHARD_PID=$!
  PIDS+=("$SHARD_PID")
  wait_ready "$SHARD_PID" "$WORK/host2.log"
}
start_shard
ip netns exec "$NS_HEAD" "$NODE" "${COMMON[@]}" --node head >"$WORK/head.log" 2>&1 &
HEAD_PID=$!
PIDS+=("$HEAD_PID")
wait_ready "$HEAD_PID" "$WORK/head.log"

gen() {
  ip netns exec "$NS_HEAD" "$CTL" generate --target "$NET.1:50051" --timeout 60 \
    --max-tokens 16 --temperature 0 "$PROMPT"
}
gen >"$WORK/two.txt" 2>"$WORK/two.err" || { cat "$WORK/two.err" >&2; fail "generate over two hosts"; }
# ktx-node --prompt ends its text with a newline; compare without trailing whitespace.
if [ "$(sed -e 's/[[:space:]]*$//' "$WORK/one.txt")" != "$(sed -e 's/[[:space:]]*$//' "$WORK/two.txt")" ]; then
  echo "one process: $(cat "$WORK/one.txt")" >&2
  echo "two hosts:   $(cat "$WORK/two.txt")" >&2
  fail "two hosts generated other text than one process"
fi
echo "two hosts == one process: $(cat "$WORK/two.txt")"

# The shard host dies: the head stays up and the next request fails with
# UNAVAILABLE naming the shard, well within the deadline.
kill -KILL "$SHARD_PID"
wait "$SHARD_PID" 2>/dev/null || true
START=$(date +%s)
if gen >"$WORK/dead.txt" 2>"$WORK/dead.err"; then fail "generate succeeded with the shard host down"; fi
grep -q "UNAVAILABLE" "$WORK/dead.err" || { cat "$WORK/dead.err" >&2; fail "expected UNAVAILABLE"; }
grep -q "host2/numa0" "$WORK/dead.err" || { cat "$WORK/dead.err" >&2; fail "expected the shard's name"; }
[ $(( $(date +%s) - START )) -le 30 ] || fail "the failure took more than 30 s"
kill -0 "$HEAD_PID" || fail "the head died with its shard host"
echo "shard host down: $(grep -m1 UNAVAILABLE "$WORK/dead.err")"

# It comes back and serves again.
start_shard
for _ in $(seq 100); do
  gen >"$WORK/back.txt" 2>"$WORK/back.err" && break
  sleep 0.3
done
cmp -s "$WORK/two.txt" "$WORK/back.txt" || { cat "$WORK/back.err" >&2; fail "after the restart: other text or no answer"; }
echo "shard host restarted: served again"
echo "PASSED"
