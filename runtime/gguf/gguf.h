// File: runtime/gguf/gguf.h
//
// GGUF v3 model files (see docs/model.md and ../shared/notes/GGUF.md): a
// validated, memory-mapped view of one model, possibly split over several files
// (`NAME-00001-of-0000N.gguf`: open the first, the rest are found).
//
//   KTX_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(path));
//   KTX_ASSIGN_OR_RETURN(uint32_t n_layer, file->metadata().GetU32("deepseek2.block_count"));
//   const TensorInfo* t = file->FindTensor("blk.0.attn_norm.weight");
//
// Everything in a file is checked before Open returns: magic and version (3;
// 2 is the same encoding and accepted; 1 is rejected), every count, string and
// array length against the bytes that remain (so a hostile count cannot cause a
// huge allocation), known value and tensor type ids, dims (1..4, positive,
// ne[0] a multiple of the type's block size, no overflow), names (non-empty,
// shorter than 64 bytes, unique), `general.alignment` (a power of two; default
// 32), every tensor offset a multiple of the alignment and its data inside the
// file, no two tensors overlapping (any order is accepted). Errors
// (kInvalidArgument; kNotFound for a missing file or part) name the file, the
// key or tensor, and what was expected versus found.
//
// A tensor of a known ggml type that ktx cannot compute with (e.g. q2_K) loads
// like any other; compute code rejects it (kernels::TensorTypeTraits::supported).
//
// Split models: for `PREFIX-00001-of-0000N.gguf` (llama-gguf-split's naming)
// the parts are mapped in order; each must carry split.no = its index and
// split.count = N; split.tensors.count (when present) must equal the total.
// Metadata comes from part 0; TensorInfo::file_index says which part holds a
// tensor. Opening a later part fails with a message naming the first.
//
// Cost: Open maps the files (read-only, MAP_PRIVATE) and parses only the
// headers; tensor data is not touched (no page of it is read) unless
// OpenOptions::populate asks for it.
//
// Ownership: GgufFile owns the mappings; TensorInfo::data points into them and
// lives as long as the GgufFile. Thread-safe after Open (read-only).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/tensor_type.h"

namespace ktx::gguf {

// gguf_type: the type of a metadata value.
enum class ValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// Short name of a value type: "u8", "i32", "f32", "bool", "string", "array", ...
// ("unknown" for an id outside the enum).
const char* ValueTypeName(ValueType type);

// One metadata value: a scalar, a string, or an array of one scalar/string type.
// Arrays of integers of every width are held as int64_t; a u64 element above
// INT64_MAX keeps its bit pattern (array_type() == kUint64 tells how to read
// it back). Nested arrays do not exist in GGUF files (ggml rejects them), so
// they are not representable.
class Value {
 public:
  using Storage = std::variant<uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float, bool,
                               std::string, uint64_t, int64_t, double,
                               // arrays (element type in array_type()):
                               std::vector<int64_t>,       // any integer element type
                               std::vector<double>,        // f32 / f64 elements
                               std::vector<bool>,          // bool elements
                               std::vector<std::string>>;  // string elements
  Value() = default;
  Value(ValueType type, Storage storage, ValueType array_type = ValueType::kUint8)
      : type_(type), array_type_(array_type), storage_(std::move(storage)) {}

  ValueType type() const { return type_; }
  ValueType array_type() const { return array_type_; }  // valid when type() == kArray
  const Storage& storage() const { return storage_; }

  bool is_array() const { return type_ == ValueType::kArray; }
  // Number of elements of an array value; 0 for a scalar.
  size_t array_size() const;
  // "u32", "string", "array[string]".
  std::string TypeString() const;
  // The value as text: numbers as written; strings in double quotes with
  // valid UTF-8 kept and quotes, backslashes, control and invalid bytes
  // escaped C-style; arrays as "[a, b, c, ...]" showing at most `max_items`.
  std::string ToString(size_t max_items = 8) const;
  // OK when storage() holds the alternative that type() / array_type() call
  // for (and integer array elements fit the element type). The reader only
  // makes consistent values; the writer checks values built by hand.
  absl::Status CheckConsistent() const;

 private:
  ValueType type_ = ValueType::kUint8;
  ValueType array_type_ = ValueType::kUint8;
  Storage storage_;
};

// The key/value metadata of a model (of split models: the first part's).
// Getters convert between integer widths when the value fits, and fail with a
// message naming the file, the key, the type found and the type expected
// (kNotFound for a missing key, kInvalidArgument otherwise).
// Not thread-safe for writing; const access is.
class Metadata {
 public:
  bool Has(std::string_view key) const;
  const Value* Find(std::string_view key) const;
  const std::map<std::string, Value, std::less<>>& entries() const { return entries_; }

  absl::StatusOr<uint32_t> GetU32(std::string_view key) const;
  absl::StatusOr<int64_t> GetI64(std::string_view key) const;
  absl::StatusOr<float> GetF32(std::string_view key) const;  // from f32 or f64
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(std::string_view key) const;

  // Like the getters above, but a missing key gives `fallback`; a present key
  // of the wrong type is still an error.
  absl::StatusOr<uint32_t> GetU32Or(std::string_view key, uint32_t fallback) const;
  absl::StatusOr<float> GetF32Or(std::string_view key, float fallback) const;
  absl::StatusOr<bool> GetBoolOr(std::string_view key, bool fallback) const;
  absl::StatusOr<std::string> GetStringOr(std::string_view key, std::string fallback) const;

  void Set(std::string key, Value value);
  // Prefix of error messages (the file name); empty gives none.
  void set_source(std::string source) { source_ = std::move(source); }
  const std::string& source() const { return source_; }

 private:
  std::map<std::string, Value, std::less<>> entries_;
  std::string source_;
};

// One tensor of the model. `type` may be a type ktx cannot compute with
// (e.g. q2_K); it is still a known ggml type with valid block geometry.
// data: `type` blocks, shape ne (row-major with ne[0] fastest), n_bytes long.
struct TensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ne[0] is the contiguous dimension; 1..4 dims
  kernels::TensorType type = kernels::TensorType::kF32;
  uint64_t offset = 0;            // relative to the data section of its file
  uint64_t file_offset = 0;       // absolute offset in its file (data section start + offset)
  uint64_t n_bytes = 0;           // size of the tensor's data
  int file_index = 0;             // which split file holds it (index into GgufFile::paths())
  const uint8_t* data = nullptr;  // into the mapping; valid while the GgufFile lives

  int64_t n_elements() const;
  int64_t row_bytes() const;        // bytes of one ne[0]-row
  int64_t n_rows() const;           // n_elements / ne[0]
  std::string ShapeString() const;  // "{7168, 2048, 256}"
};

struct OpenOptions {
  // Fault the mapping in ahead of use (MAP_POPULATE) — faster first pass.
  bool populate = false;
  // Limits that protect against hostile files (defaults are far above real models).
  uint64_t max_string_bytes = 1ULL << 24;    // one string
  uint64_t max_array_elements = 1ULL << 26;  // one array
  uint64_t max_tensors = 1ULL << 20;
  uint64_t max_kv = 1ULL << 20;
};

// The name of part `index` (0-based) of an `n_parts` split model whose parts
// share `prefix`: "PREFIX-00001-of-00003.gguf" (llama-gguf-split's pattern).
std::string SplitPath(std::string_view prefix, int index, int n_parts);

// Parses a split path "PREFIX-0000I-of-0000N.gguf" into prefix, 0-based index
// and count; false when `path` does not follow the pattern.
bool ParseSplitPath(std::string_view path, std::string* prefix, int* index, int* n_parts);

class GgufFile {
 public:
  // Opens and validates `path`; split models are opened from their first part.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path,
                                                        const OpenOptions& options = {});
  // Parses and validates an in-memory image (no copy; `bytes` must outlive the
  // result). `name` is used in error messages. Used by tests and the fuzzer.
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromMemory(const uint8_t* bytes, size_t size,
                                                              std::string name,
                                                              const OpenOptions& options = {});
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  const Metadata& metadata() const { return metadata_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::vector<std::string>& paths() const { return paths_; }  // one per split part
  uint64_t total_tensor_bytes() const;
  // Absolute offset of the data section in each part (tensor offsets are relative to it).
  const std::vector<uint64_t>& data_offsets() const { return data_offsets_; }

  // nullptr when absent.
  const TensorInfo* FindTensor(std::string_view name) const;
  // The tensor, checked: present, of shape `ne` exactly (trailing 1s ignored).
  // Errors name the tensor and the expected and found shape.
  absl::StatusOr<const TensorInfo*> GetTensor(std::string_view name,
                                              const std::vector<int64_t>& ne) const;

 private:
  GgufFile() = default;
  struct Mapping;
  static absl::StatusOr<std::unique_ptr<Mapping>> MapFile(const std::string& path, bool populate);
  absl::Status BuildIndex();  // fills tensor_index_; fails on duplicate names
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  Metadata metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
  std::vector<std::string> paths_;
  std::vector<uint64_t> data_offsets_;
  std::vector<std::unique_ptr<Mapping>> mappings_;
};

}  // namespace ktx::gguf
