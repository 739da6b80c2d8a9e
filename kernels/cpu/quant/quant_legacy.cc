// File: kernels/cpu/quant/quant_legacy.cc
//
// The 32-element block types Q4_0, Q5_0 and Q8_0: dequantization,
// quantization and the integer dot products with Q8_0 activations.
//
// Quantizer: one half scale d per block, q = clamp(round(x / d)) in the
// type's signed range [-L, L-1] (Q8_0: [-127, 127]). The scale is chosen among
// a few candidates by the smallest squared error, subject to the maximum error
// not exceeding that of the covering scale d_c = ceil_half(max|x| / (L - 1))
// (Q8_0: / 127), whose levels reach every input. Hence per element
// |x - y| <= d_c / 2 <= max|x| / (2 (L - 1)) + ulp_half(d_c) / 2.
//
// Activation Q8_0 (QuantizeQ8_0Activation) follows the convention of ggml's
// x86 CPU backend instead, so that a tier-B path rounds activations the way
// llama.cpp does: d = max|x| / 127 in float, q = round_even(x * 127 / max|x|)
// against that float scale, and d stored as the nearest half. Per element
// |x - y| <= d/2 + 127 |d - half(d)| <= 0.57 d.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/quant/quant_internal.h"

namespace ktx::kernels::quant_internal {
namespace {

constexpr int kQK = 32;

struct Fit {
  double sse = 0.0;
  float max_err = 0.0f;
};

// Error of rounding x[0..32) to q * d with q in [qmin, qmax].
Fit EvaluateScale(const float* x, float d, int qmin, int qmax) {
  Fit fit;
  for (int i = 0; i < kQK; ++i) {
    const int q = d != 0.0f ? Clamp(NearestInt(x[i] / d), qmin, qmax) : 0;
    const float err = std::fabs(x[i] - static_cast<float>(q) * d);
    fit.sse += static_cast<double>(err) * err;
    if (err > fit.max_err) fit.max_err = err;
  }
  return fit;
}

// Picks the half scale of one block for levels [qmin, qmax] (qmax = -qmin - 1
// or qmax = -qmin): covering scale first, then the scales that map the
// largest-magnitude value onto the extreme level qmin.
uint16_t ChooseScale(const float* x, int qmin, int qmax) {
  float amax = 0.0f;
  float vmax = 0.0f;  // the value with the largest magnitude (first one)
  for (int i = 0; i < kQK; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      vmax = x[i];
    }
  }
  if (amax == 0.0f) return 0;
  uint16_t candidates[3] = {HalfCeil(amax / static_cast<float>(qmax)), 0, 0};
  int n_candidates = 1;
  if (qmax != -qmin) {  // asymmetric range: the extreme value can use -qmin
    candidates[n_candidates++] = FloatToHalf(vmax / static_cast<float>(qmin));
    candidates[n_candidates++] = FloatToHalf(vmax / (static_cast<float>(qmin) - 0.5f));
  } else {
    candidates[n_candidates++] = FloatToHalf(amax / static_cast<float>(qmax));
  }
  uint16_t best = candidates[0];
  const Fit cover = EvaluateScale(x, HalfToFloat(best), qmin, qmax);
  double best_sse = cover.sse;
  for (int c = 1; c < n_candidates; ++c) {
    const Fit fit = EvaluateScale(x, HalfToFloat(candidates[c]), qmin, qmax);
    if (fit.max_err <= cover.max_err && fit.sse < best_sse) {
      best = candidates[c];
      best_sse = fit.sse;
    }
  }
  return best;
}

// Quantizes one block with scale bits `dh` into q[32] in [qmin, qmax].
void RoundBlock(const float* x, uint16_t dh, int qmin, int qmax, int* q) {
  const float d = HalfToFloat(dh);
  for (int i = 0; i < kQK; ++i) q[i] = d != 0.0f ? Clamp(NearestInt(x[i] / d), qmin, qmax) : 0;
}

uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

}  // namespace

void DequantizeQ4_0(const BlockQ4_0* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, y += kQK) {
    const float d = HalfToFloat(x[b].d);
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>((x[b].qs[j] & 15) - 8) * d;
      y[j + 16] = static_cast<float>((x[b].qs[j] >> 4) - 8) * d;
    }
  }
}

void DequantizeQ5_0(const BlockQ5_0* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, y += kQK) {
    const float d = HalfToFloat(x[b].d);
    const uint32_t qh = LoadU32(x[b].qh);
    for (int j = 0; j < 16; ++j) {
      const int lo = (x[b].qs[j] & 15) | static_cast<int>(((qh >> j) & 1u) << 4);
      const int hi = (x[b].qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
      y[j] = static_cast<float>(lo - 16) * d;
      y[j + 16] = static_cast<float>(hi - 16) * d;
    }
  }
}

void DequantizeQ8_0(const BlockQ8_0* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, y += kQK) {
    const float d = HalfToFloat(x[b].d);
    for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(x[b].qs[j]) * d;
  }
}

void QuantizeQ4_0(const float* x, BlockQ4_0* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    const uint16_t dh = ChooseScale(x, -8, 7);
    int q[kQK];
    RoundBlock(x, dh, -8, 7, q);
    y[b].d = dh;
    for (int j = 0; j < 16; ++j) {
      y[b].qs[j] = static_cast<uint8_t>((q[j] + 8) | ((q[j + 16] + 8) << 4));
    }
  }
}

void QuantizeQ5_0(const float* x, BlockQ5_0* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    const uint16_t dh = ChooseScale(x, -16, 15);
    int q[kQK];
    RoundBlock(x, dh, -16, 15, q);
    y[b].d = dh;
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int lo = q[j] + 16;
      const int hi = q[j + 16] + 16;
      y[b].qs[j] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
      qh |= static_cast<uint32_t>(lo >> 4) << j;
      qh |= static_cast<uint32_t>(hi >> 4) << (j + 16);
    }
    std::memcpy(y[b].qh, &qh, 4);
  }
}

void QuantizeQ8_0(const float* x, BlockQ8_0* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    const uint16_t dh = ChooseScale(x, -127, 127);
    int q[kQK];
    RoundBlock(x, dh, -127, 127, q);
    y[b].d = dh;
    for (int j = 0; j < kQK; ++j) y[b].qs[j] = static_cast<int8_t>(q[j]);
  }
}

void QuantizeQ8_0Activation(const float* x, BlockQ8_0* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float iscale = amax > 0.0f ? 127.0f / amax : 0.0f;
    y[b].d = FloatToHalf(amax / 127.0f);
    for (int j = 0; j < kQK; ++j) {
      y[b].qs[j] = static_cast<int8_t>(Clamp(NearestInt(x[j] * iscale), -127, 127));
    }
  }
}

double DotQ4_0Q8_0(const BlockQ4_0* w, const BlockQ8_0* x, int64_t nb) {
  double sum = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t isum = 0;
    for (int j = 0; j < 16; ++j) {
      isum += ((w[b].qs[j] & 15) - 8) * x[b].qs[j];
      isum += ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + 16];
    }
    sum += static_cast<double>(HalfToFloat(w[b].d)) * HalfToFloat(x[b].d) * isum;
  }
  return sum;
}

double DotQ5_0Q8_0(const BlockQ5_0* w, const BlockQ8_0* x, int64_t nb) {
  double sum = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const uint32_t qh = LoadU32(w[b].qh);
    int32_t isum = 0;
    for (int j = 0; j < 16; ++j) {
      const int lo = (w[b].qs[j] & 15) | static_cast<int>(((qh >> j) & 1u) << 4);
      const int hi = (w[b].qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
      isum += (lo - 16) * x[b].qs[j] + (hi - 16) * x[b].qs[j + 16];
    }
    sum += static_cast<double>(HalfToFloat(w[b].d)) * HalfToFloat(x[b].d) * isum;
  }
  return sum;
}

double DotQ8_0Q8_0(const BlockQ8_0* w, const BlockQ8_0* x, int64_t nb) {
  double sum = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t isum = 0;
    for (int j = 0; j < kQK; ++j) isum += w[b].qs[j] * x[b].qs[j];
    sum += static_cast<double>(HalfToFloat(w[b].d)) * HalfToFloat(x[b].d) * isum;
  }
  return sum;
}

}  // namespace ktx::kernels::quant_internal
