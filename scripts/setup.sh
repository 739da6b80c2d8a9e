#!/usr/bin/env bash
# ktx setup: install Debian 12 packages (idempotent), configure, build, and run.
#
#   bash scripts/setup.sh demo     # install + build + run the main job
#   bash scripts/setup.sh test     # install + build + format check + the whole test suite
#   bash scripts/setup.sh deps     # only install packages
#   bash scripts/setup.sh build    # install + build (build/, RelWithDebInfo, CUDA when nvcc exists)
#   bash scripts/setup.sh tidy     # clang-tidy over the project's sources
#
# Environment: KTX_BUILD_DIR (default build), KTX_CUDA=ON|OFF (default ON; off
# when nvcc is missing), KTX_JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_DIR=${KTX_BUILD_DIR:-build}
JOBS=${KTX_JOBS:-$(nproc)}
CUDA=${KTX_CUDA:-ON}

PACKAGES=(build-essential cmake ninja-build pkg-config git
  libcaf-dev libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libnuma-dev libtbb-dev libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev
  libpcre2-dev nlohmann-json3-dev libcli11-dev clang-format clang libclang-rt-dev zstd)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

deps() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "all ${#PACKAGES[@]} Debian packages present"
    return
  fi
  log "installing: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

build() {
  deps
  log "configuring $BUILD_DIR (CUDA=$CUDA)"
  cmake -S . -B "$BUILD_DIR" -G Ninja -DKTX_CUDA="$CUDA" >"$ROOT/.setup-configure.log" 2>&1 ||
    { cat "$ROOT/.setup-configure.log"; exit 1; }
  log "building with $JOBS jobs"
  cmake --build "$BUILD_DIR" -j "$JOBS"
}

format_check() {
  log "checking clang-format"
  local files
  files=$(git ls-files --cached --others --exclude-standard -- '*.h' '*.cc' '*.cu' '*.cuh' | grep -v '^tests/data/' || true)
  [ -z "$files" ] && return
  # shellcheck disable=SC2086
  if ! clang-format --dry-run --Werror $files; then
    log "unformatted files (fix with: clang-format -i <file>)"
    exit 1
  fi
}

run_tests() {
  build
  format_check
  log "running the test suite"
  ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS"
  sanitizer_tests
}

# Input-facing code (file readers, tokenizer, ...) again under ASan+UBSan: tests marked SANITIZE.
sanitizer_tests() {
  local dir="${BUILD_DIR}-asan"
  log "configuring $dir (ASan+UBSan, kernels/runtime/topology only)"
  cmake -S . -B "$dir" -G Ninja -DKTX_SANITIZE=ON -DKTX_MINIMAL=ON -DKTX_CUDA=OFF \
    -DCMAKE_BUILD_TYPE=Debug >"$ROOT/.setup-configure-asan.log" 2>&1 ||
    { cat "$ROOT/.setup-configure-asan.log"; exit 1; }
  cmake --build "$dir" -j "$JOBS" --target sanitize_tests
  log "running the sanitizer tests"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir "$dir" --output-on-failure -j "$JOBS" -L sanitize
}

# The main job: this machine's topology, then a generation with the shipped tiny
# DeepSeek-V3-architecture model (random weights: the text is gibberish, the math is DeepSeek-V3's).
# KTX_DEMO_MODEL overrides the model (any deepseek2 GGUF, e.g. one made by `ktx-ctl synth`).
demo() {
  build
  # The main job (scripts/demo.sh): a synthesized DeepSeek-V3-architecture model (or
  # KTX_DEMO_MODEL=path.gguf), a head and a shard node on loopback, a generation streamed
  # through `ktx-ctl generate` with its timings, `ktx-ctl status`, then SIGTERM to both nodes.
  bash scripts/demo.sh "$BUILD_DIR"
}

tidy() {
  build
  git ls-files '*.cc' | grep -v '^tests/' | xargs clang-tidy -p "$BUILD_DIR" --quiet
}

case "${1:-}" in
  deps) deps ;;
  build) build ;;
  test) run_tests ;;
  demo) demo ;;
  tidy) tidy ;;
  *) echo "usage: $0 demo|test|deps|build|tidy" >&2; exit 2 ;;
esac
