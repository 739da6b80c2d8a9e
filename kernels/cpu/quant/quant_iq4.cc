// File: kernels/cpu/quant/quant_iq4.cc
//
// IQ4_XS: 256-element super-blocks of 8 sub-blocks of 32 with a 6-bit scale
// each and the non-linear 4-bit codebook kIq4nlValues.
//
// Quantizer: d = ceil_half(max_j amax_j / (113 * 31)); covering sub-block
// scale dl_j = d * k_j with k_j = ceil(amax_j / (113 d)) > 0, whose levels
// dl_j * [-127, 113] reach every input; search over k in {k_j, k_j - 1,
// k_j - 2, ceil(amax_j / (127 d))} with both signs (ls - 32 in [-32, 31]),
// smallest squared error among the candidates whose maximum error does not
// exceed the covering one. Each element takes its nearest codebook level.
// The largest gap of the codebook is 24 (89 -> 113), so
// |x - y| <= 12 dl_j <= 12 (amax_j / 113 + d).
#include <cmath>
#include <cstdint>

#include "kernels/cpu/quant/quant_internal.h"

namespace ktx::kernels::quant_internal {
namespace {

constexpr int kQK = 256;

int SubBlockScale(const BlockIQ4XS& b, int ib) {
  return ((b.scales_l[ib / 2] >> (4 * (ib % 2))) & 15) | (((b.scales_h >> (2 * ib)) & 3) << 4);
}

struct Fit {
  double sse = 0.0;
  float max_err = 0.0f;
};

// Midpoints between neighbouring codebook values (ascending).
constexpr float kMidpoints[15] = {-115.5f, -93.5f, -74.0f, -57.0f, -42.0f, -28.5f, -16.0f, -4.5f,
                                  7.0f,    19.0f,  31.5f,  45.5f,  61.0f,  79.0f,  101.0f};

// Nearest codebook level of each x[0..32) for sub-block scale dl: the number
// of midpoints below x / dl, found by binary search.
Fit FitCodebook(const float* x, float dl, int* q_out) {
  Fit fit;
  for (int i = 0; i < 32; ++i) {
    int q = 8;  // dl == 0: every level is 0; any index will do
    if (dl != 0.0f) {
      const float t = x[i] / dl;
      q = 0;
      for (int step = 8; step > 0; step >>= 1) {
        if (q + step <= 15 && kMidpoints[q + step - 1] < t) q += step;
      }
    }
    const float err = std::fabs(x[i] - dl * static_cast<float>(kIq4nlValues[q]));
    fit.sse += static_cast<double>(err) * err;
    if (err > fit.max_err) fit.max_err = err;
    if (q_out != nullptr) q_out[i] = q;
  }
  return fit;
}

}  // namespace

void DequantizeIQ4XS(const BlockIQ4XS* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = HalfToFloat(x[b].d);
    for (int ib = 0; ib < 8; ++ib, y += 32) {
      const float dl = d * static_cast<float>(SubBlockScale(x[b], ib) - 32);
      const uint8_t* qs = x[b].qs + 16 * ib;
      for (int j = 0; j < 16; ++j) {
        y[j] = dl * static_cast<float>(kIq4nlValues[qs[j] & 15]);
        y[j + 16] = dl * static_cast<float>(kIq4nlValues[qs[j] >> 4]);
      }
    }
  }
}

void QuantizeIQ4XS(const float* x, BlockIQ4XS* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    float amax[8];
    float max_amax = 0.0f;
    for (int j = 0; j < 8; ++j) {
      amax[j] = 0.0f;
      for (int i = 0; i < 32; ++i) amax[j] = std::fmax(amax[j], std::fabs(x[32 * j + i]));
      max_amax = std::fmax(max_amax, amax[j]);
    }
    const uint16_t d_h = HalfCeil(max_amax / (113.0f * 31.0f));
    const float d = HalfToFloat(d_h);
    y[b].d = d_h;
    y[b].scales_h = 0;
    for (int j = 0; j < 4; ++j) y[b].scales_l[j] = 0;
    for (int j = 0; j < 8; ++j) {
      const float* xj = x + 32 * j;
      const int k_cover = d > 0.0f ? Clamp(CeilInt(amax[j] / (113.0f * d)), 0, 31) : 0;
      const Fit cover = FitCodebook(xj, d * static_cast<float>(k_cover), nullptr);
      const int k_wide = d > 0.0f ? Clamp(CeilInt(amax[j] / (127.0f * d)), 0, 32) : 0;
      const int magnitudes[4] = {k_cover, k_cover - 1, k_cover - 2, k_wide};
      int best = k_cover;
      double best_sse = cover.sse;
      for (int c = 0; c < 4; ++c) {
        for (int sign = 1; sign >= -1; sign -= 2) {
          const int k = sign * magnitudes[c];
          if (magnitudes[c] < 0 || k < -32 || k > 31 || k == k_cover) continue;
          const Fit fit = FitCodebook(xj, d * static_cast<float>(k), nullptr);
          if (fit.max_err <= cover.max_err && fit.sse < best_sse) {
            best = k;
            best_sse = fit.sse;
          }
        }
      }
      int q[32];
      FitCodebook(xj, d * static_cast<float>(best), q);
      const int ls = best + 32;
      y[b].scales_l[j / 2] |= static_cast<uint8_t>((ls & 15) << (4 * (j % 2)));
      y[b].scales_h |= static_cast<uint16_t>((ls >> 4) << (2 * j));
      for (int i = 0; i < 16; ++i) {
        y[b].qs[16 * j + i] = static_cast<uint8_t>(q[i] | (q[i + 16] << 4));
      }
    }
  }
}

double DotIQ4XSQ8K(const BlockIQ4XS* w, const BlockQ8K* x, int64_t nb) {
  double sum = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    int64_t isum = 0;
    for (int ib = 0; ib < 8; ++ib) {
      const uint8_t* qs = w[b].qs + 16 * ib;
      const int8_t* xq = x[b].qs + 32 * ib;
      int32_t s = 0;
      for (int j = 0; j < 16; ++j) {
        s += kIq4nlValues[qs[j] & 15] * xq[j] + kIq4nlValues[qs[j] >> 4] * xq[j + 16];
      }
      isum += static_cast<int64_t>(SubBlockScale(w[b], ib) - 32) * s;
    }
    sum += static_cast<double>(HalfToFloat(w[b].d)) * static_cast<double>(x[b].d) *
           static_cast<double>(isum);
  }
  return sum;
}

}  // namespace ktx::kernels::quant_internal
