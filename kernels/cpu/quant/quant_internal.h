// File: kernels/cpu/quant/quant_internal.h
//
// Per-family entry points behind the dispatch in quant.cc (not a public
// header: include quant.h). Every function works on whole blocks: `nb` is the
// number of blocks. Thread-safe: pure functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "kernels/cpu/quant/blocks.h"
#include "kernels/cpu/quant/quant.h"

// Programmer-invariant check for kernels/ (which cannot use runtime/base).
#define KTX_QUANT_CHECK(cond)                                                            \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "ktx: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

namespace ktx::kernels::quant_internal {

// Smallest half >= x (x >= 0, finite), saturating at the largest finite half.
// Used for block scales so that the integer scales computed from them never
// overflow their range.
inline uint16_t HalfCeil(float x) {
  if (!(x > 0.0f)) return 0;
  if (x >= 65504.0f) return 0x7bff;
  uint16_t h = FloatToHalf(x);
  if (HalfToFloat(h) < x) ++h;  // positive finite halves are ordered like their bits
  return h;
}

// Round to nearest, ties to even (default FP environment; deterministic).
// Saturates far outside any quantization range (and maps NaN to the low end)
// so that the conversion to int is always defined.
inline int NearestInt(float x) {
  if (!(x > -1e9f)) return -1000000000;
  if (!(x < 1e9f)) return 1000000000;
  return static_cast<int>(std::nearbyint(x));
}

// Ceiling with the same saturation as NearestInt.
inline int CeilInt(float x) {
  if (!(x > -1e9f)) return -1000000000;
  if (!(x < 1e9f)) return 1000000000;
  return static_cast<int>(std::ceil(x));
}

inline int Clamp(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Legacy 32-element types (quant_legacy.cc).
void DequantizeQ4_0(const BlockQ4_0* x, float* y, int64_t nb);
void DequantizeQ5_0(const BlockQ5_0* x, float* y, int64_t nb);
void DequantizeQ8_0(const BlockQ8_0* x, float* y, int64_t nb);
void QuantizeQ4_0(const float* x, BlockQ4_0* y, int64_t nb);
void QuantizeQ5_0(const float* x, BlockQ5_0* y, int64_t nb);
void QuantizeQ8_0(const float* x, BlockQ8_0* y, int64_t nb);
void QuantizeQ8_0Activation(const float* x, BlockQ8_0* y, int64_t nb);
double DotQ4_0Q8_0(const BlockQ4_0* w, const BlockQ8_0* x, int64_t nb);
double DotQ5_0Q8_0(const BlockQ5_0* w, const BlockQ8_0* x, int64_t nb);
double DotQ8_0Q8_0(const BlockQ8_0* w, const BlockQ8_0* x, int64_t nb);

// K-quants and Q8_K (quant_k.cc).
void DequantizeQ4K(const BlockQ4K* x, float* y, int64_t nb);
void DequantizeQ5K(const BlockQ5K* x, float* y, int64_t nb);
void DequantizeQ6K(const BlockQ6K* x, float* y, int64_t nb);
void DequantizeQ8K(const BlockQ8K* x, float* y, int64_t nb);
void QuantizeQ4K(const float* x, BlockQ4K* y, int64_t nb);
void QuantizeQ5K(const float* x, BlockQ5K* y, int64_t nb);
void QuantizeQ6K(const float* x, BlockQ6K* y, int64_t nb);
void QuantizeQ8K(const float* x, BlockQ8K* y, int64_t nb);
double DotQ4KQ8K(const BlockQ4K* w, const BlockQ8K* x, int64_t nb);
double DotQ5KQ8K(const BlockQ5K* w, const BlockQ8K* x, int64_t nb);
double DotQ6KQ8K(const BlockQ6K* w, const BlockQ8K* x, int64_t nb);

// IQ4_XS (quant_iq4.cc).
void DequantizeIQ4XS(const BlockIQ4XS* x, float* y, int64_t nb);
void QuantizeIQ4XS(const float* x, BlockIQ4XS* y, int64_t nb);
double DotIQ4XSQ8K(const BlockIQ4XS* w, const BlockQ8K* x, int64_t nb);

}  // namespace ktx::kernels::quant_internal
