#!/usr/bin/env bash
# Packs the GPU tests and benchmark of a CUDA build (default build-cuda) with the shared libraries
# the GPU machine lacks (docs/gpu-machine.md) into bundle/ktx-cuda.tar.xz, with run_gpu.sh:
#
#   bash tests/runtime/gpu/pack_gpu_bundle.sh [build-dir]
#   # on the GPU machine, from the repository root (carry bundle/ktx-cuda.tar.xz):
#   tar -xf bundle/ktx-cuda.tar.xz -C /tmp && bash /tmp/ktxg/run_gpu.sh "$OUT" bench sanitize
#
# Smaller and faster than scripts/bundle.sh (which builds and packs everything).
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
B=${1:-build-cuda}
STAGE=$(mktemp -d)
OUT=$STAGE/ktxg
mkdir -p "$OUT/tests" "$OUT/lib"
for f in tests/kernels/cuda/cuda_kernels_test tests/runtime/gpu/cuda_deepseek2_test \
         tests/runtime/gpu/gpu_plan_test tests/runtime/gpu/gpu_benchmark \
         tests/runtime/gpu/gpu_experts_test tests/runtime/gpu/expert_cost_model_test \
         tests/runtime/gpu/gpu_experts_benchmark tests/runtime/gpu/gemv_benchmark; do
  cp "$B/$f" "$OUT/tests/" && strip --strip-debug "$OUT/tests/$(basename "$f")"
done
present='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|libstdc\+\+|libgcc_s|libprotobuf\.so\.32|libnuma\.so\.1|libssl\.so\.3|libcrypto\.so\.3|libz\.so\.1|libcublas|libcublasLt|libcuda\.so|libcudart)'
for f in "$OUT"/tests/*; do
  ldd "$f" | awk '/=> \//{print $1" "$3}' | while read -r name path; do
    if [[ ! $name =~ $present ]] && [ ! -e "$OUT/lib/$name" ]; then cp -L "$path" "$OUT/lib/$name"; fi
  done
done
strip --strip-unneeded "$OUT"/lib/* 2>/dev/null || true
cp tests/runtime/gpu/run_gpu.sh "$OUT/run_gpu.sh"
mkdir -p "$ROOT/bundle"
XZ_OPT='-9 -T2' tar -C "$STAGE" -cJf "$ROOT/bundle/ktx-cuda.tar.xz" ktxg
rm -rf "$STAGE"
du -sh "$ROOT/bundle/ktx-cuda.tar.xz"
