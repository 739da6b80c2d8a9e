// File: kernels/cpu/quant/quant_float.cc
//
// IEEE half and bfloat16 conversions, written from the IEEE 754 binary16 /
// bfloat16 definitions with integer arithmetic (independent of the host's
// F16C/AVX512-BF16 support and of the FP environment).
#include <cstdint>
#include <cstring>

#include "kernels/cpu/quant/quant.h"

namespace ktx::kernels {
namespace {

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mant << 13));  // Inf / NaN
  if (exp != 0) return BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return BitsToFloat(sign);  // +-0
  // Subnormal: mant * 2^-24. Normalise into a float (always a normal float).
  uint32_t e = 113;  // biased float exponent of 2^-14
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return BitsToFloat(sign | (e << 23) | ((mant & 0x3ffu) << 13));
}

uint16_t FloatToHalf(float f) {
  const uint32_t x = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) {
    if (a == 0x7f800000u) return sign | 0x7c00u;  // Inf
    // NaN: keep the top payload bits, force quiet so it cannot become Inf.
    return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  }
  // 65520 = 65504 + half an ulp: ties to even round up to 2^16, i.e. Inf.
  if (a >= 0x477ff000u) return sign | 0x7c00u;
  if (a >= 0x38800000u) {                 // >= 2^-14: normal half
    const uint32_t r = a - (112u << 23);  // rebias the exponent from 127 to 15
    const uint32_t rounded = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;  // carries into the exponent
    return static_cast<uint16_t>(sign | rounded);
  }
  if (a <= 0x33000000u) return sign;  // <= 2^-25: rounds (ties to even) to zero
  // Subnormal half: round(a * 2^24) in units of 2^-24.
  const uint32_t e = a >> 23;  // 102..112
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // value = m * 2^(e - 150) = (m >> shift) * 2^-24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;  // may become 0x400 = 2^-14, correct
  return static_cast<uint16_t>(sign | q);
}

uint16_t FloatToBf16(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  // Ties to even on the 16 dropped bits; overflow carries into Inf correctly.
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace ktx::kernels
