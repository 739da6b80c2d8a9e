#!/usr/bin/env bash
# Packs what the GPU machine needs to test and measure the GPU attention actor
# (actors/gpu_attention_actor.h) from a CUDA build (default build-g1):
# gpu_attention_test, attention_device_test, ktx-ctl and the shared libraries
# the GPU machine lacks (as tests/runtime/gpu/pack_gpu_bundle.sh), with
# run_gpu_attention.sh, into bundle/ktx-gpu-attention.tar.xz:
#
#   bash tests/actors/pack_gpu_attention_bundle.sh [build-dir]
#   # on the GPU machine, from the repository root (carry the tarball; the
#   # tests read tests/data/ from there):
#   tar -xf bundle/ktx-gpu-attention.tar.xz -C /tmp && \
#     bash /tmp/ktxa/run_gpu_attention.sh "$OUT" [MODEL.gguf]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
B=${1:-build-g1}
STAGE=$(mktemp -d)
OUT=$STAGE/ktxa
mkdir -p "$OUT/bin" "$OUT/lib"
for f in tests/actors/gpu_attention_test tests/actors/attention_device_test cli/ktx-ctl; do
  cp "$B/$f" "$OUT/bin/" && strip --strip-debug "$OUT/bin/$(basename "$f")"
done
present='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|libstdc\+\+|libgcc_s|libprotobuf\.so\.32|libnuma\.so\.1|libssl\.so\.3|libcrypto\.so\.3|libz\.so\.1|libcublas|libcublasLt|libcuda\.so|libcudart)'
for f in "$OUT"/bin/*; do
  ldd "$f" | awk '/=> \//{print $1" "$3}' | while read -r name path; do
    if [[ ! $name =~ $present ]] && [ ! -e "$OUT/lib/$name" ]; then cp -L "$path" "$OUT/lib/$name"; fi
  done
done
strip --strip-unneeded "$OUT"/lib/* 2>/dev/null || true
cp tests/actors/run_gpu_attention.sh "$OUT/run_gpu_attention.sh"
mkdir -p "$ROOT/bundle"
XZ_OPT='-9 -T2' tar -C "$STAGE" -cJf "$ROOT/bundle/ktx-gpu-attention.tar.xz" ktxa
rm -rf "$STAGE"
du -sh "$ROOT/bundle/ktx-gpu-attention.tar.xz"
