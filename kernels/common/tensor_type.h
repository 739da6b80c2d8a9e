// File: kernels/common/tensor_type.h
//
// The tensor storage types of GGUF files (ggml_type ids) and their block
// geometry. A row of `n` elements of a block type occupies
// n / block_size * type_size bytes and requires n % block_size == 0.
// Plain constexpr data; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ktx::kernels {

// Values are the ggml_type ids stored in GGUF tensor infos.
enum class TensorType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

struct TensorTypeTraits {
  TensorType type;
  const char* name;    // as ggml prints it: "f32", "q4_K", "bf16", ...
  int64_t block_size;  // elements per block
  int64_t type_size;   // bytes per block
  bool supported;      // ktx can dequantize and compute with it
};

// Traits of a known ggml type id, or nullopt for an id ggml does not define.
std::optional<TensorTypeTraits> GetTensorTypeTraits(uint32_t type_id);

// Traits of a known type (KTX_CHECKs that it is known).
const TensorTypeTraits& TraitsOf(TensorType type);

// "f32, f16, bf16, q8_0, q4_0, q5_0, q4_K, q5_K, q6_K, iq4_xs": the types ktx computes with.
std::string SupportedTensorTypeNames();

// Looks a type up by its ggml name ("q4_K", "Q4_K", "bf16"); case-insensitive.
std::optional<TensorType> TensorTypeFromName(std::string_view name);

// Bytes of a row of `n_elements` (n_elements must be a multiple of the block size).
inline int64_t RowBytes(const TensorTypeTraits& t, int64_t n_elements) {
  return n_elements / t.block_size * t.type_size;
}

}  // namespace ktx::kernels
