// File: kernels/cpu/quant/quant.h
//
// Scalar reference conversions for the GGUF tensor types ktx computes with:
// F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K, IQ4_XS (block layouts in
// ../shared/notes/GGUF.md and docs/model.md). These are the truth that every
// vectorised kernel is tested against. They take pointers and counts, never
// allocate, never start threads. `n` must be a multiple of the type's block
// size (KTX_CHECKed by the callers that validate shapes: the GGUF reader).
// Thread-safe: pure functions.
#pragma once

#include <cstdint>

#include "kernels/common/tensor_type.h"

namespace ktx::kernels {

// IEEE half <-> float, bf16 <-> float (round to nearest even, NaN preserved).
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);
inline float Bf16ToFloat(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
uint16_t FloatToBf16(float f);

// True for the types below (the `supported` flag of TensorTypeTraits).
bool CanDequantize(TensorType type);

// dst[0..n) = the n values stored at `src` (n elements, row-contiguous).
void DequantizeRow(TensorType type, const void* src, float* dst, int64_t n);

// Σ_i w[i]·x[i] over a stored row `w` of n elements and float activations x,
// accumulated in double (the scalar reference used by the tier-A model path).
double DotRowReference(TensorType type, const void* w, const float* x, int64_t n);

// Quantizes n floats into `dst` (round to nearest, ggml-compatible block
// layouts; used by the GGUF writer, synthetic models and tests). Supported for
// every type CanDequantize() accepts.
void QuantizeRow(TensorType type, const float* src, void* dst, int64_t n);

}  // namespace ktx::kernels
