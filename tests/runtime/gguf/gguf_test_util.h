// File: tests/runtime/gguf/gguf_test_util.h
//
// Helpers for the GGUF tests and the fuzz driver: RawGguf, a byte-level GGUF
// encoder that does not use GgufWriter (so that reader and writer are checked
// against an encoding written separately from both), with named marks at field
// offsets for targeted corruption; a small hand-encoded "base" file; writer
// recipes covering every metadata type; fixture and temp-file helpers.
// Not thread-safe.
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/gguf/gguf_writer.h"

namespace ktx::gguf::testing {

class RawGguf {
 public:
  template <typename T>
  RawGguf& Pod(T v) {
    const size_t at = bytes_.size();
    bytes_.resize(at + sizeof(T));
    std::memcpy(bytes_.data() + at, &v, sizeof(T));
    return *this;
  }
  RawGguf& U8(uint8_t v) { return Pod(v); }
  RawGguf& U32(uint32_t v) { return Pod(v); }
  RawGguf& U64(uint64_t v) { return Pod(v); }
  RawGguf& I64(int64_t v) { return Pod(v); }
  RawGguf& Str(std::string_view s) {
    U64(s.size());
    bytes_.insert(bytes_.end(), s.begin(), s.end());
    return *this;
  }
  RawGguf& Fill(size_t n, uint8_t value) {
    bytes_.insert(bytes_.end(), n, value);
    return *this;
  }
  RawGguf& PadTo(size_t alignment) {
    bytes_.resize((bytes_.size() + alignment - 1) / alignment * alignment, 0);
    return *this;
  }
  // Records the current offset under `name`.
  RawGguf& Mark(const std::string& name) {
    marks_[name] = bytes_.size();
    return *this;
  }
  size_t mark(const std::string& name) const { return marks_.at(name); }
  const std::map<std::string, size_t>& marks() const { return marks_; }
  std::vector<uint8_t>& bytes() { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
  std::map<std::string, size_t> marks_;
};

template <typename T>
void Patch(std::vector<uint8_t>& bytes, size_t at, T v) {
  std::memcpy(bytes.data() + at, &v, sizeof(T));
}

// The hand-encoded base file (GGUF v3, alignment 32):
//   metadata: general.architecture = "test" (string), general.alignment = 32 (u32),
//     test.k1 = 7 (u8), test.k2 = 9 (u8), test.flag = true (bool),
//     test.tokens = ["a", "bc", "def"] (array[string]), test.ints = [1, -2, 3] (array[i32])
//   tensors: a f32 {32, 2} at 0 (256 B), b q4_K {256} at 256 (144 B),
//     c q8_0 {64, 3} at 416 (204 B); data byte at data-section offset i is
//     i & 255 (zero in the padding [400, 416)).
// Marks: "n_tensors", "n_kv", "kv<i>" (start of entry i), "kv<i>.type",
//   "kv<i>.value", "kv<i>.end", "ti<j>" (start of tensor info j), "ti<j>.n_dims",
//   "ti<j>.ne0", "ti<j>.ne1", "ti<j>.type", "ti<j>.offset", "ti<j>.end", "data".
RawGguf BaseFile();
inline const std::vector<std::string>& BaseKeys() {
  static const std::vector<std::string> keys = {
      "general.architecture", "general.alignment", "test.k1", "test.k2", "test.flag",
      "test.tokens",          "test.ints"};
  return keys;
}
inline const std::vector<std::string>& BaseTensorNames() {
  static const std::vector<std::string> names = {"a", "b", "c"};
  return names;
}

// Sets one key of every scalar type and an array of every element type,
// with extreme values (see the .cc for the exact list).
void AddEveryValueType(GgufWriter& w);
// Adds a few tensors of assorted types (f32, f16, q8_0, q4_K, q2_K, iq4_xs)
// with deterministic bytes.
void AddAssortedTensors(GgufWriter& w);

// Deterministic bytes for a tensor: byte i = (i * 131 + seed) & 255.
std::vector<uint8_t> PatternBytes(size_t n, uint32_t seed);

std::string FixturePath(const std::string& name);  // tests/data/<name>
// Up to `max_bytes` of a file (all of it by default).
std::vector<uint8_t> ReadFileBytes(const std::string& path, size_t max_bytes = SIZE_MAX);
// A fresh directory under $TEST_TMPDIR (or /tmp), unique per call.
std::string MakeTempDir();

}  // namespace ktx::gguf::testing
