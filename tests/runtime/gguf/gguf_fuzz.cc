// File: tests/runtime/gguf/gguf_fuzz.cc
//
// Fuzz target for the GGUF reader: parses the input with GgufFile::FromMemory
// and, when it is accepted, checks the reader's promises (every tensor inside
// the input, aligned, no overlaps, names unique and findable) and reads every
// byte of every tensor, every metadata value and the getters' conversions.
// Any crash, sanitizer report or broken promise (abort) is a finding.
//
// Built two ways (tests/runtime/gguf/CMakeLists.txt):
//  * always: `gguf_fuzz_test`, a gtest that feeds this target a fixed-seed
//    stream of mutated seed files (gguf_fuzz_driver.cc), part of ctest;
//  * with -DKTX_FUZZ=ON and clang: `gguf_fuzzer`, a libFuzzer binary built
//    with -fsanitize=fuzzer,address,undefined. To run it for longer:
//
//      CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DKTX_FUZZ=ON -DKTX_MINIMAL=ON
//      -DKTX_CUDA=OFF ninja -C build-fuzz gguf_fuzzer gguf_fuzz_test mkdir -p /tmp/gguf_corpus
//      KTX_GGUF_FUZZ_SEED_DIR=/tmp/gguf_corpus build-fuzz/tests/runtime/gguf/gguf_fuzz_test
//      build-fuzz/tests/runtime/gguf/gguf_fuzzer -max_len=65536 -max_total_time=3600 -jobs=2
//      -workers=2 /tmp/gguf_corpus
//
//    The first run of gguf_fuzz_test writes the seed corpus (small valid files
//    and the first 16 KiB of the q4_k_m fixture) into the directory; libFuzzer
//    adds what it finds there. Reproduce a crash with `gguf_fuzzer crash-<sha>`.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/gguf/gguf.h"

namespace {

void Require(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

// Inputs the reader accepted (the deterministic driver reports the ratio).
int64_t ktx_gguf_fuzz_accepted = 0;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using ktx::gguf::GgufFile;
  using ktx::gguf::TensorInfo;
  ktx::gguf::OpenOptions options;
  // Keep single inputs cheap: a few MiB of metadata at most.
  options.max_string_bytes = 1 << 16;
  options.max_array_elements = 1 << 20;
  auto file = GgufFile::FromMemory(data, size, "fuzz.gguf", options);
  if (!file.ok()) {
    Require(!file.status().message().empty());
    return 0;
  }
  ++ktx_gguf_fuzz_accepted;
  const GgufFile& f = **file;
  const uint32_t alignment = f.alignment();
  Require(alignment != 0 && (alignment & (alignment - 1)) == 0);
  uint64_t checksum = 0;
  uint64_t total = 0;
  for (const TensorInfo& t : f.tensors()) {
    Require(!t.name.empty() && t.name.size() < 64);
    Require(f.FindTensor(t.name) == &t);
    Require(t.ne.size() >= 1 && t.ne.size() <= 4);
    Require(t.offset % alignment == 0);
    Require(t.data >= data && t.n_bytes <= size &&
            t.data - data <= static_cast<ptrdiff_t>(size - t.n_bytes));
    Require(t.file_offset == static_cast<uint64_t>(t.data - data));
    Require(static_cast<uint64_t>(t.row_bytes()) * static_cast<uint64_t>(t.n_rows()) == t.n_bytes);
    for (uint64_t i = 0; i < t.n_bytes; ++i) checksum += t.data[i];
    total += t.n_bytes;
    Require(f.GetTensor(t.name, t.ne).ok());
    (void)t.ShapeString();
  }
  Require(total == f.total_tensor_bytes());
  // Tensors are disjoint: their bytes add up to no more than the input.
  Require(total <= size);
  const ktx::gguf::Metadata& m = f.metadata();
  using ktx::gguf::ValueType;
  for (const auto& [key, value] : m.entries()) {
    checksum += value.ToString(4).size() + value.array_size();
    // The getter for the value's own kind (integer getters convert or refuse).
    switch (value.type()) {
      case ValueType::kString: Require(m.GetString(key).ok()); break;
      case ValueType::kBool: Require(m.GetBool(key).ok()); break;
      case ValueType::kFloat32:
      case ValueType::kFloat64:
        (void)m.GetF32(key);  // an f64 may be out of f32 range
        break;
      case ValueType::kArray:
        if (value.array_type() == ValueType::kString) {
          Require(m.GetStringArray(key).ok());
        } else if (value.array_type() == ValueType::kFloat32 ||
                   value.array_type() == ValueType::kFloat64) {
          Require(m.GetFloatArray(key).ok());
        } else if (value.array_type() != ValueType::kBool) {
          (void)m.GetIntArray(key);  // u64 elements may not fit
        }
        break;
      default:
        (void)m.GetU32(key);
        (void)m.GetI64(key);
        break;
    }
  }
  // The error paths, once per input (each error formats a message).
  if (!m.entries().empty()) {
    const std::string& key = m.entries().begin()->first;
    (void)m.GetU32(key);
    (void)m.GetBool(key);
    (void)m.GetStringArray(key);
  }
  // Keep the reads alive.
  volatile uint64_t sink = checksum;
  (void)sink;
  return 0;
}
