// File: runtime/gguf/gguf_writer.h
//
// Writes GGUF v3 files that ggml's strict reader accepts: metadata in
// insertion order, tensor infos in insertion order, tensor data laid out
// contiguously in that order, each blob padded with zeros to the alignment
// (`general.alignment`, default 32). Optionally splits the model over N files
// the way llama-gguf-split does (`PREFIX-00001-of-0000N.gguf`, keys split.no
// u16, split.count u16, split.tensors.count i32; all metadata in part 0).
//
//   GgufWriter w;
//   w.SetString("general.architecture", "deepseek2");
//   w.SetU32("deepseek2.block_count", 3);
//   w.SetStringArray("tokenizer.ggml.tokens", tokens);
//   KTX_RETURN_IF_ERROR(w.AddTensor("output_norm.weight", {256}, TensorType::kF32, bytes));
//   KTX_RETURN_IF_ERROR(w.AddTensor("blk.1.ffn_up_exps.weight", {7168, 2048, 256},
//       TensorType::kQ4_K, [&](int64_t row0, int64_t n_rows, uint8_t* dst) { ... }));
//   KTX_RETURN_IF_ERROR(w.Write("model.gguf"));
//
// Tensor data is streamed: bytes given as a vector are written from it;
// callback tensors are produced chunk by chunk into one staging buffer
// (WriteOptions::chunk_bytes, whole rows per call), so a 20 GiB file needs
// only the buffer in memory. Files are written to "<path>.tmp" and renamed
// into place when complete, so a failed write never leaves a valid-looking
// file behind.
//
// Ownership: the writer owns the metadata values and the byte vectors given to
// it; callbacks (and what they capture) must stay valid until Write returns.
// Not thread-safe; Write calls the callbacks on the calling thread, in tensor
// order, each tensor's rows in increasing order.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/tensor_type.h"
#include "runtime/gguf/gguf.h"

namespace ktx::gguf {

struct WriteOptions {
  // Number of files; > 1 writes PREFIX-00001-of-0000N.gguf ... where PREFIX is
  // the path without its ".gguf" suffix. Tensors are assigned in order, each
  // part getting about 1/N of the bytes and at least one tensor.
  int n_split = 1;
  // Staging buffer for callback tensors (rounded to whole rows; at least one row).
  size_t chunk_bytes = size_t{64} << 20;
};

class GgufWriter {
 public:
  // Fills rows [first_row, first_row + n_rows) of a tensor into dst
  // (n_rows * row_bytes bytes; a row is ne[0] elements of the tensor's type,
  // rows counted over ne[1] * ne[2] * ne[3]). An error aborts the write.
  using FillFn = std::function<absl::Status(int64_t first_row, int64_t n_rows, uint8_t* dst)>;

  GgufWriter() = default;

  // ---- metadata (a key set again keeps its position, takes the new value) ----
  void SetU8(std::string key, uint8_t v) { Put(std::move(key), Value(ValueType::kUint8, v)); }
  void SetI8(std::string key, int8_t v) { Put(std::move(key), Value(ValueType::kInt8, v)); }
  void SetU16(std::string key, uint16_t v) { Put(std::move(key), Value(ValueType::kUint16, v)); }
  void SetI16(std::string key, int16_t v) { Put(std::move(key), Value(ValueType::kInt16, v)); }
  void SetU32(std::string key, uint32_t v) { Put(std::move(key), Value(ValueType::kUint32, v)); }
  void SetI32(std::string key, int32_t v) { Put(std::move(key), Value(ValueType::kInt32, v)); }
  void SetU64(std::string key, uint64_t v) { Put(std::move(key), Value(ValueType::kUint64, v)); }
  void SetI64(std::string key, int64_t v) { Put(std::move(key), Value(ValueType::kInt64, v)); }
  void SetF32(std::string key, float v) { Put(std::move(key), Value(ValueType::kFloat32, v)); }
  void SetF64(std::string key, double v) { Put(std::move(key), Value(ValueType::kFloat64, v)); }
  void SetBool(std::string key, bool v) { Put(std::move(key), Value(ValueType::kBool, v)); }
  void SetString(std::string key, std::string v) {
    Put(std::move(key), Value(ValueType::kString, std::move(v)));
  }
  // `element_type` is one of the eight integer types; every value must fit it
  // (u64 elements are given as their int64 bit pattern).
  absl::Status SetIntArray(std::string key, ValueType element_type, std::vector<int64_t> values);
  // `element_type` is kFloat32 or kFloat64 (f32 elements are rounded to float).
  absl::Status SetFloatArray(std::string key, ValueType element_type, std::vector<double> values);
  void SetBoolArray(std::string key, std::vector<bool> values);
  void SetStringArray(std::string key, std::vector<std::string> values);
  // Any value (e.g. copied from a GgufFile's Metadata); checked with Value::CheckConsistent.
  absl::Status Set(std::string key, Value value);
  // general.alignment (u32); must be a power of two.
  absl::Status SetAlignment(uint32_t alignment);
  // Copies every entry of `metadata` (split.* keys excepted).
  absl::Status CopyMetadata(const Metadata& metadata);

  // ---- tensors (written in the order added) ----
  // Checks: non-empty name shorter than 64 bytes, unique; 1..4 dims, each > 0;
  // a known type with ne[0] % block_size == 0; data.size() == the tensor's bytes.
  absl::Status AddTensor(std::string name, std::vector<int64_t> ne, kernels::TensorType type,
                         std::vector<uint8_t> data);
  absl::Status AddTensor(std::string name, std::vector<int64_t> ne, kernels::TensorType type,
                         FillFn fill);

  // Writes the file(s). `written` (optional) receives the paths in part order.
  absl::Status Write(const std::string& path, const WriteOptions& options = {},
                     std::vector<std::string>* written = nullptr) const;
  // The single-file image in memory (tests, fuzz seeds).
  absl::StatusOr<std::vector<uint8_t>> WriteToMemory(const WriteOptions& options = {}) const;

  size_t n_tensors() const { return tensors_.size(); }
  uint64_t tensor_bytes() const;  // sum of tensor sizes, without padding

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> ne;
    kernels::TensorType type = kernels::TensorType::kF32;
    uint64_t n_bytes = 0;
    int64_t row_bytes = 0;
    int64_t n_rows = 0;
    std::vector<uint8_t> data;  // used when fill is empty
    FillFn fill;
  };
  using AppendFn = std::function<absl::Status(const uint8_t* data, size_t n)>;
  void Put(std::string key, Value value);
  absl::Status CheckTensor(const std::string& name, const std::vector<int64_t>& ne,
                           kernels::TensorType type, Tensor* out) const;
  absl::StatusOr<uint32_t> Alignment() const;
  // Assigns tensors to parts: part_of[i] for tensor i.
  absl::StatusOr<std::vector<int>> AssignParts(int n_split) const;
  absl::Status WritePart(const AppendFn& append, int part, int n_split,
                         const std::vector<int>& part_of, uint32_t alignment,
                         size_t chunk_bytes) const;

  std::vector<std::pair<std::string, Value>> kv_;  // insertion order
  std::map<std::string, size_t, std::less<>> kv_index_;
  std::vector<Tensor> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace ktx::gguf
