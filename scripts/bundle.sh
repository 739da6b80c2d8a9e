#!/usr/bin/env bash
# Builds a relocatable ktx bundle for the GPU machine (Ubuntu 24.04 without gRPC, Abseil, CAF, TBB):
#
#   bash scripts/bundle.sh            # -> bundle/ktx/{bin,lib,tests,run-tests.sh} and bundle/ktx.tar.xz
#
# Release build with CUDA (sm_90), RPATH $ORIGIN/../lib (DT_RPATH, so it also covers the
# dependencies of bundled libraries). lib/ holds only the shared libraries that machine lacks;
# libraries it has (glibc, libstdc++, protobuf 32, numa, ssl, zlib, cuBLAS, the CUDA driver)
# stay out. On the GPU machine, from the repository root (tests read tests/data):
#
#   tar -xf bundle/ktx.tar.xz -C /tmp && /tmp/ktx/run-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_DIR=${KTX_BUNDLE_BUILD_DIR:-build-bundle}
OUT=$ROOT/bundle/ktx
JOBS=${KTX_JOBS:-$(nproc)}

bash scripts/setup.sh deps
# KTX_BUNDLE_CUDA=OFF: a CPU-only bundle (faster to build; for CPU measurements).
# KTX_BUNDLE_TARGETS="ktx_ctl moe_benchmark ...": build (and bundle) only these targets.
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKTX_CUDA="${KTX_BUNDLE_CUDA:-ON}" \
  -DKTX_BUNDLE=ON -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
# shellcheck disable=SC2086
cmake --build "$BUILD_DIR" -j "$JOBS" ${KTX_BUNDLE_TARGETS:+--target $KTX_BUNDLE_TARGETS}

rm -rf "$OUT" && mkdir -p "$OUT/bin" "$OUT/lib" "$OUT/tests"
for exe in $(find "$BUILD_DIR/cli" -maxdepth 1 -type f -executable -name 'ktx-*'); do
  cp "$exe" "$OUT/bin/"
done
for exe in $(find "$BUILD_DIR/tests" "$BUILD_DIR/kernels" "$BUILD_DIR/runtime" -type f -executable \
    \( -name '*_test' -o -name '*_benchmark' \) 2>/dev/null); do
  cp "$exe" "$OUT/tests/"
done
# The bundled tests find bin/ and lib/ next to them through RPATH $ORIGIN/../lib as well.
# ktx's own shared library (KTX_CUDA_SHARED, the default here): its RPATH points at the
# bundle, so ldd cannot find it in the build tree. The shared cudart it and the binaries
# link travels with it (0.7 MB; the GPU machine's CUDA version may differ).
[ -f "$BUILD_DIR/kernels/cuda/libktx_cuda_kernels.so" ] && cp "$BUILD_DIR/kernels/cuda/libktx_cuda_kernels.so" "$OUT/lib/"

# Libraries the GPU machine already has (STACK.md): never bundle these.
present='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|libstdc\+\+|libgcc_s|libprotobuf\.so\.32|libnuma\.so\.1|libssl\.so\.3|libcrypto\.so\.3|libz\.so\.1|libcublas|libcublasLt|libcuda\.so)'
copy_deps() {
  ldd "$1" | awk '/=> \//{print $1" "$3}' | while read -r name path; do
    if [[ ! $name =~ $present ]] && [ ! -e "$OUT/lib/$name" ]; then
      cp -L "$path" "$OUT/lib/$name"
    fi
  done
}
for f in "$OUT"/bin/* "$OUT"/tests/*; do copy_deps "$f"; done
# TBB itself (for binaries that link it), and what its NUMA support dlopens (ldd cannot see them).
for lib in libtbb.so.12 libtbbbind_2_5.so.3 libhwloc.so.15 libudev.so.1; do
  p=$(ldconfig -p | awk -v n="$lib" '$1==n && !f{print $NF; f=1}')
  [ -n "$p" ] && cp -L "$p" "$OUT/lib/$lib" && copy_deps "$OUT/lib/$lib"
done
for f in "$OUT"/lib/*; do copy_deps "$f"; done
strip --strip-unneeded "$OUT"/lib/* 2>/dev/null || true

cat > "$OUT/run-tests.sh" <<RUN
#!/usr/bin/env bash
# Runs every bundled test binary from the current directory (the repository root, for tests/data).
# Prints one line per binary and a closing "N passed, N failed" line.
# The tests find tests/data under the source root they were built from ($ROOT); when that path
# does not exist on this machine, it is made a link to the current directory.
built_root="$ROOT"
RUN
cat >> "$OUT/run-tests.sh" <<'RUN'
if [ ! -e "$built_root/tests/data" ] && [ -d tests/data ]; then
  mkdir -p "$(dirname "$built_root")" && ln -sfn "$PWD" "$built_root"
fi
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}${LD_LIBRARY_PATH:+:}/usr/local/nvidia/lib64
passed=0; failed=0
for t in "$here"/tests/*_test; do
  [ -x "$t" ] || continue
  if "$t" --gtest_brief=1 >"/tmp/$(basename "$t").log" 2>&1; then
    passed=$((passed+1)); echo "PASS $(basename "$t") $(grep -Eo '[0-9]+ tests? from [0-9]+ test suites? ran' "/tmp/$(basename "$t").log" | tail -1)"
  else
    failed=$((failed+1)); echo "FAIL $(basename "$t")"; tail -30 "/tmp/$(basename "$t").log"
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
RUN
chmod +x "$OUT/run-tests.sh"
XZ_OPT='-9 -T0' tar -C "$ROOT/bundle" -cJf "$ROOT/bundle/ktx.tar.xz" ktx  # xz: the GPU machine has no zstd
du -sh "$OUT" "$ROOT/bundle/ktx.tar.xz"
