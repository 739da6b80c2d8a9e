#!/usr/bin/env bash
# On the GPU machine, from the repository root: unpack the bundle, show the topology, run the
# bundled tests. Writes everything to the folder given as argument (default ./gpu-check).
#   bash scripts/gpu-machine-check.sh "$OUT"
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
tar -xf bundle/ktx.tar.xz -C /tmp
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}${LD_LIBRARY_PATH:+:}/usr/local/nvidia/lib64
{
  echo "## date"; date -u
  echo "## nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  echo "## lscpu"; lscpu | grep -E 'Model name|^CPU\(s\)|Socket|NUMA node' 2>&1
  echo "## ktx-ctl topology show"; /tmp/ktx/bin/ktx-ctl topology show 2>&1
  echo "## ktx-ctl topology show --json"; /tmp/ktx/bin/ktx-ctl topology show --json 2>&1
  echo "## bundled tests"; /tmp/ktx/run-tests.sh 2>&1
} | tee "$out/gpu-check.txt"
