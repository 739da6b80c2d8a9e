// File: tests/kernels/cpu/quant/quant_test_util.h
//
// Test helpers for the quant tests: seeded input rows of several shapes of
// distribution, and the representable levels of each element of a quantized
// row decoded straight from the block-layout spec (../shared/notes/GGUF.md
// section 2), independently of kernels/cpu/quant's own decoders.
// Thread-compatible (pure functions).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/tensor_type.h"
#include "kernels/cpu/quant/quant.h"

namespace ktx::kernels::testing {

enum class Dist {
  kGaussian,    // N(0, 1)
  kUniform,     // U(-1, 1)
  kOutliers,    // N(0, 1) with every 37th element x20
  kPositive,    // |N(0, 1)| + 0.5: no element near 0
  kNegative,    // -|N(0, 1)| - 0.5
  kMixedScale,  // N(0, 1) scaled 1e-3 .. 1 per 32-element group
  kConstant,    // all 0.37
  kZeros,       // all 0
  kSparse,      // mostly 0, every 11th element N(0, 1)
  kTiny,        // N(0, 1) * 1e-5: half scales become subnormal
};

inline const Dist kAllDists[] = {
    Dist::kGaussian,   Dist::kUniform,  Dist::kOutliers, Dist::kPositive, Dist::kNegative,
    Dist::kMixedScale, Dist::kConstant, Dist::kZeros,    Dist::kSparse,   Dist::kTiny};

inline std::string DistName(Dist d) {
  const char* names[] = {"gaussian", "uniform",  "outliers", "positive", "negative",
                         "mixed",    "constant", "zeros",    "sparse",   "tiny"};
  return names[static_cast<int>(d)];
}

inline std::vector<float> RandomRow(Dist dist, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float v = 0.0f;
    switch (dist) {
      case Dist::kGaussian: v = gauss(rng); break;
      case Dist::kUniform: v = uni(rng); break;
      case Dist::kOutliers: v = gauss(rng) * (i % 37 == 5 ? 20.0f : 1.0f); break;
      case Dist::kPositive: v = std::fabs(gauss(rng)) + 0.5f; break;
      case Dist::kNegative: v = -std::fabs(gauss(rng)) - 0.5f; break;
      case Dist::kMixedScale: {
        const float scales[4] = {1.0f, 1e-3f, 3e-2f, 0.2f};
        v = gauss(rng) * scales[(i / 32) % 4];
        break;
      }
      case Dist::kConstant: v = 0.37f; break;
      case Dist::kZeros: v = 0.0f; break;
      case Dist::kSparse: v = i % 11 == 3 ? gauss(rng) : 0.0f; break;
      case Dist::kTiny: v = gauss(rng) * 1e-5f; break;
    }
    x[static_cast<size_t>(i)] = v;
  }
  return x;
}

inline uint16_t LoadU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// HalfToFloat written from the binary16 definition with ldexp (independent of
// the library's bit manipulation).
inline double SpecHalf(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 31;
  const int mant = h & 1023;
  if (exp == 0) return sign * std::ldexp(static_cast<double>(mant), -24);
  if (exp == 31) return mant ? NAN : sign * INFINITY;
  return sign * std::ldexp(static_cast<double>(1024 + mant), exp - 25);
}

// Q4_K/Q5_K 6-bit scale and min of sub-block j, as the spec states them.
inline void SpecScaleMinK4(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// The representable values of the group that element i of a quantized row
// belongs to (block type `type`, row bytes at `row`), decoded from the spec.
// Values are computed in float exactly as the spec's dequantization does.
inline std::vector<float> LevelsOfElement(TensorType type, const uint8_t* row, int64_t i) {
  std::vector<float> levels;
  const TensorTypeTraits& t = TraitsOf(type);
  const uint8_t* b = row + (i / t.block_size) * t.type_size;
  const int e = static_cast<int>(i % t.block_size);
  switch (type) {
    case TensorType::kQ8_0: {
      const float d = static_cast<float>(SpecHalf(LoadU16(b)));
      for (int q = -128; q <= 127; ++q) levels.push_back(static_cast<float>(q) * d);
      break;
    }
    case TensorType::kQ4_0:
    case TensorType::kQ5_0: {
      const float d = static_cast<float>(SpecHalf(LoadU16(b)));
      const int half_range = type == TensorType::kQ4_0 ? 8 : 16;
      for (int q = 0; q < 2 * half_range; ++q) {
        levels.push_back(static_cast<float>(q - half_range) * d);
      }
      break;
    }
    case TensorType::kQ4_K:
    case TensorType::kQ5_K: {
      const float d = static_cast<float>(SpecHalf(LoadU16(b)));
      const float dmin = static_cast<float>(SpecHalf(LoadU16(b + 2)));
      int sc = 0;
      int m = 0;
      SpecScaleMinK4(b + 4, e / 32, &sc, &m);
      const int n_q = type == TensorType::kQ4_K ? 16 : 32;
      for (int q = 0; q < n_q; ++q) {
        levels.push_back(d * static_cast<float>(sc) * static_cast<float>(q) -
                         dmin * static_cast<float>(m));
      }
      break;
    }
    case TensorType::kQ6_K: {
      const float d = static_cast<float>(SpecHalf(LoadU16(b + 208)));
      const int8_t sc = static_cast<int8_t>(b[192 + e / 16]);
      for (int q = -32; q < 32; ++q) {
        levels.push_back(d * static_cast<float>(sc) * static_cast<float>(q));
      }
      break;
    }
    case TensorType::kIQ4_XS: {
      static constexpr int kValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                          1,    13,   25,  38,  53,  69,  89,  113};
      const float d = static_cast<float>(SpecHalf(LoadU16(b)));
      const int ib = e / 32;
      const int scales_h = LoadU16(b + 2);
      const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((scales_h >> (2 * ib)) & 3) << 4);
      const float dl = d * static_cast<float>(ls - 32);
      for (int k = 0; k < 16; ++k) levels.push_back(dl * static_cast<float>(kValues[k]));
      break;
    }
    case TensorType::kQ8_K: {
      float d;
      std::memcpy(&d, b, 4);
      for (int q = -128; q <= 127; ++q) levels.push_back(static_cast<float>(q) * d);
      break;
    }
    default: break;
  }
  return levels;
}

}  // namespace ktx::kernels::testing
