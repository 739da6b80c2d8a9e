// File: kernels/cpu/quant/quant.h
//
// Scalar reference conversions for the GGUF tensor types ktx computes with:
// F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K, IQ4_XS (block layouts in
// ../shared/notes/GGUF.md and kernels/cpu/quant/blocks.h), plus the
// activation-side types Q8_0 and Q8_K that vectorised integer kernels pair
// weights with. These are the truth that every vectorised kernel is tested
// against. They take pointers and counts, never allocate, never start threads.
// `n` must be a multiple of the type's block size (validated by the callers
// that check shapes, e.g. the GGUF reader; violating it aborts). Block data
// must be 2-byte aligned (4 for Q8_K).
//
// Usage (tier A: float activations; tier B: quantized activations):
//   DequantizeRow(TensorType::kQ4_K, row, out, n_embd);
//   double y = DotRowReference(TensorType::kQ4_K, row, x, n_embd);
//   std::vector<BlockQ8K> xq(n_embd / 256);
//   QuantizeRowQ8K(x, xq.data(), n_embd);
//   float yq = DotRowQuantizedReference(TensorType::kQ4_K, row, xq.data(), n_embd);
//
// Thread-safe: pure functions.
#pragma once

#include <cstdint>

#include "kernels/common/tensor_type.h"
#include "kernels/cpu/quant/blocks.h"

namespace ktx::kernels {

// IEEE half <-> float, bf16 <-> float (round to nearest even, NaN preserved
// and kept quiet, overflow to +-Inf, subnormals handled exactly).
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
// Accepts every CanDequantize() type and also kQ8_K (activation blocks).
void DequantizeRow(TensorType type, const void* src, float* dst, int64_t n);

// Σ_i w[i]·x[i] over a stored row `w` of n elements and float activations x,
// accumulated in double (the scalar reference used by the tier-A model path).
// w[i] is exactly the float DequantizeRow produces.
double DotRowReference(TensorType type, const void* w, const float* x, int64_t n);

// Quantizes n floats into `dst` (round to nearest given the block's scales,
// ggml-compatible block layouts; used by the GGUF writer, synthetic models and
// tests). Supported for every type CanDequantize() accepts and for kQ8_K.
// Deterministic. Per element, |x - dequantized| is bounded by the format's
// resolution in that block (see quant_k.cc etc.: e.g. Q8_0 <= d/2, Q4_K <=
// (sub-block range + dmin) / 30 + d / 2). Inputs must be finite and small
// enough that the block scales fit in a half (|x| < ~65504 * levels).
void QuantizeRow(TensorType type, const float* src, void* dst, int64_t n);

// ---- Activation side (tier B: integer dot products) ----

// The activation type a weight type's dot product pairs with (ggml's
// vec_dot_type): kQ8_0 for Q4_0/Q5_0/Q8_0, kQ8_K for Q4_K/Q5_K/Q6_K/IQ4_XS,
// the weight type itself for F32/F16/BF16. KTX_CHECK-style abort for others.
TensorType VecDotType(TensorType weight_type);

// The activation quantizers are meant to follow the rounding convention of
// ggml's x86 CPU backend (scale from max|x| in float, q rounded half-to-even
// against that float scale), so that a tier-B path rounds activations the way
// llama.cpp does; bit-identity with it is not tested.

// Activations to Q8_0 blocks: d = max|x| / 127, q = round(x * 127 / max|x|) in
// [-127, 127], d stored as the nearest half (|x - y| <= 0.57 d while d is a
// normal half; + 127 * 2^-25 below that). Differs from
// QuantizeRow(kQ8_0), which picks the half scale first (|x - y| <= d / 2).
void QuantizeRowQ8_0(const float* x, BlockQ8_0* y, int64_t n);

// Activations to Q8_K blocks: iscale = 127 / max|x|, q = round(x * iscale) in
// [-127, 127], d = 1 / iscale (float), bsums filled. Same as QuantizeRow(kQ8_K).
void QuantizeRowQ8K(const float* x, BlockQ8K* y, int64_t n);

// Quantizes activations x into VecDotType(weight_type) (Q8_0 or Q8_K blocks,
// or F32/F16/BF16 elements); `dst` holds RowBytes(TraitsOf(VecDotType(...)), n).
void QuantizeActivationRow(TensorType weight_type, const float* x, void* dst, int64_t n);

// Σ_i w[i]·x[i] with the weight row `w` of `weight_type` and the activation row
// `x` stored in VecDotType(weight_type): integer sums per (sub-)block times
// the block scales, accumulated in double and rounded to float once at the
// end. This is the reference for the vectorised tier-B kernels (which may
// differ by float accumulation order only).
float DotRowQuantizedReference(TensorType weight_type, const void* w, const void* x, int64_t n);

}  // namespace ktx::kernels
