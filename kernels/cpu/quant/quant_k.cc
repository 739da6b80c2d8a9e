// File: kernels/cpu/quant/quant_k.cc
//
// The 256-element K-quant types Q4_K, Q5_K, Q6_K and the activation type Q8_K:
// dequantization, quantization and the integer dot products with Q8_K.
//
// Q4_K / Q5_K quantizer (L = 15 / 31 levels above zero), per super-block:
//   1. sub-block j: lo_j = min(0, min x), hi_j = max x (the lowest level
//      -dmin*m is never positive, so the covered range must reach 0 or below);
//   2. dmin = ceil_half(max_j(-lo_j) / 63), m_j = ceil(-lo_j / dmin): the
//      lowest level -dmin*m_j reaches lo_j;
//   3. d = ceil_half(max_j(hi_j + dmin*m_j) / (63 L)),
//      sc_j = ceil((hi_j + dmin*m_j) / (L d)): the top level reaches hi_j;
//   4. search: (sc_j - {0,1,2}) x (m_j - {0,1}), smallest squared error among
//      the candidates whose maximum error does not exceed that of step 3's
//      covering choice.
//   Then |x - y| <= d*sc_j/2 <= (hi_j - lo_j + dmin) / (2L) + d/2.
// Q6_K quantizer (q in [-32, 31], signed 8-bit sub-block scales): d =
//   ceil_half(max amax_j / (31*127)), covering sc_j = ceil(amax_j / (31 d));
//   search over |sc| in {sc_j, sc_j-1, sc_j-2, ceil(amax_j / (32 d))}, both
//   signs, with the same rule: |x - y| <= (amax_j / 31 + d) / 2.
// Q8_K (activations): iscale = 127 / amax, q = round_even(x * iscale),
//   d = 1 / iscale (float), meant to give the same products q * d as ggml's
//   CPU backend (which, as we read it, maps the largest-magnitude element to
//   -127 with a negative d instead): |x - y| <= d / 2.
#include <cmath>
#include <cstdint>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kernels/cpu/quant/quant_internal.h"

namespace ktx::kernels::quant_internal {
namespace {

constexpr int kQK = 256;

// 6-bit scales and mins of the 8 sub-blocks of a Q4_K/Q5_K block: bytes 0-3
// hold sc[0..3] (low 6 bits) and the top 2 bits of sc[4..7]; bytes 4-7 the
// same for m; bytes 8-11 the low 4 bits of sc[4..7] (low nibble) and m[4..7]
// (high nibble).
void UnpackScales(const uint8_t* s, int* sc, int* m) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    m[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
    m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

void PackScales(const int* sc, const int* m, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>(m[j] | ((m[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
  }
}

struct Fit {
  double sse = 0.0;
  float max_err = 0.0f;
};

// Rounds x[0..n) to step * q - mn with q in [0, top]; optional q output.
Fit FitAffine(const float* x, int n, float step, float mn, int top, int* q_out) {
  Fit fit;
#if defined(__SSE2__)
  // Four at a time with the same float operations in the same order (SSE2,
  // the x86-64 baseline): the division, the clamp to [0, top] before the
  // rounding (which rounds to the same q as rounding first and clamping
  // after), cvtps2dq's round to nearest even (the default environment's, as
  // nearbyint), the error; the squared errors are then summed in order, so
  // the result is bit for bit the scalar loop's. This loop is most of the
  // load-time re-quantization of BF16 experts (several fits per sub-block).
  if (step > 0.0f && n <= 32 && n % 4 == 0) {
    alignas(16) float err[32];
    alignas(16) int32_t q[32];
    const __m128 vstep = _mm_set1_ps(step), vmn = _mm_set1_ps(mn);
    const __m128 vtop = _mm_set1_ps(static_cast<float>(top)), zero = _mm_setzero_ps();
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    for (int i = 0; i < n; i += 4) {
      const __m128 xv = _mm_loadu_ps(x + i);
      const __m128 v = _mm_min_ps(_mm_max_ps(_mm_div_ps(_mm_add_ps(xv, vmn), vstep), zero), vtop);
      const __m128i qi = _mm_cvtps_epi32(v);
      const __m128 y = _mm_sub_ps(_mm_mul_ps(vstep, _mm_cvtepi32_ps(qi)), vmn);
      _mm_store_ps(err + i, _mm_and_ps(_mm_sub_ps(xv, y), abs_mask));
      _mm_store_si128(reinterpret_cast<__m128i*>(q + i), qi);
    }
    for (int i = 0; i < n; ++i) {
      fit.sse += static_cast<double>(err[i]) * err[i];
      if (err[i] > fit.max_err) fit.max_err = err[i];
      if (q_out != nullptr) q_out[i] = q[i];
    }
    return fit;
  }
#endif
  for (int i = 0; i < n; ++i) {
    const int q = step > 0.0f ? Clamp(NearestInt((x[i] + mn) / step), 0, top) : 0;
    const float err = std::fabs(x[i] - (step * static_cast<float>(q) - mn));
    fit.sse += static_cast<double>(err) * err;
    if (err > fit.max_err) fit.max_err = err;
    if (q_out != nullptr) q_out[i] = q;
  }
  return fit;
}

// Rounds x[0..n) to step * q with q in [-32, 31]; optional q output.
Fit FitSymmetric(const float* x, int n, float step, int* q_out) {
  Fit fit;
#if defined(__SSE2__)
  // As FitAffine's: the same operations four at a time, errors summed in order.
  if (step != 0.0f && n <= 32 && n % 4 == 0) {
    alignas(16) float err[32];
    alignas(16) int32_t q[32];
    const __m128 vstep = _mm_set1_ps(step);
    const __m128 lo = _mm_set1_ps(-32.0f), hi = _mm_set1_ps(31.0f);
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    for (int i = 0; i < n; i += 4) {
      const __m128 xv = _mm_loadu_ps(x + i);
      const __m128 v = _mm_min_ps(_mm_max_ps(_mm_div_ps(xv, vstep), lo), hi);
      const __m128i qi = _mm_cvtps_epi32(v);
      const __m128 y = _mm_mul_ps(vstep, _mm_cvtepi32_ps(qi));
      _mm_store_ps(err + i, _mm_and_ps(_mm_sub_ps(xv, y), abs_mask));
      _mm_store_si128(reinterpret_cast<__m128i*>(q + i), qi);
    }
    for (int i = 0; i < n; ++i) {
      fit.sse += static_cast<double>(err[i]) * err[i];
      if (err[i] > fit.max_err) fit.max_err = err[i];
      if (q_out != nullptr) q_out[i] = q[i];
    }
    return fit;
  }
#endif
  for (int i = 0; i < n; ++i) {
    const int q = step != 0.0f ? Clamp(NearestInt(x[i] / step), -32, 31) : 0;
    const float err = std::fabs(x[i] - step * static_cast<float>(q));
    fit.sse += static_cast<double>(err) * err;
    if (err > fit.max_err) fit.max_err = err;
    if (q_out != nullptr) q_out[i] = q;
  }
  return fit;
}

// Steps 1-4 of the Q4_K/Q5_K quantizer for one super-block: fills d, dmin
// (half bits), sc[8], m[8] and q[256] in [0, top].
void QuantizeAffineSuperBlock(const float* x, int top, uint16_t* d_out, uint16_t* dmin_out, int* sc,
                              int* m, int* q) {
  float lo[8];
  float hi[8];
  float max_off = 0.0f;
  for (int j = 0; j < 8; ++j) {
    lo[j] = 0.0f;
    hi[j] = x[32 * j];
    for (int i = 0; i < 32; ++i) {
      lo[j] = std::fmin(lo[j], x[32 * j + i]);
      hi[j] = std::fmax(hi[j], x[32 * j + i]);
    }
    max_off = std::fmax(max_off, -lo[j]);
  }
  const uint16_t dmin_h = HalfCeil(max_off / 63.0f);
  const float dmin = HalfToFloat(dmin_h);
  float need[8];
  float max_need = 0.0f;
  for (int j = 0; j < 8; ++j) {
    m[j] = dmin > 0.0f ? Clamp(CeilInt(-lo[j] / dmin), 0, 63) : 0;
    need[j] = std::fmax(0.0f, hi[j] + dmin * static_cast<float>(m[j]));
    max_need = std::fmax(max_need, need[j]);
  }
  const float top_f = static_cast<float>(top);
  const uint16_t d_h = HalfCeil(max_need / (63.0f * top_f));
  const float d = HalfToFloat(d_h);
  for (int j = 0; j < 8; ++j) {
    const float* xj = x + 32 * j;
    const int sc_cover = d > 0.0f ? Clamp(CeilInt(need[j] / (top_f * d)), 0, 63) : 0;
    const int m_cover = m[j];
    const Fit cover = FitAffine(xj, 32, d * static_cast<float>(sc_cover),
                                dmin * static_cast<float>(m_cover), top, nullptr);
    int best_sc = sc_cover;
    int best_m = m_cover;
    double best_sse = cover.sse;
    for (int dm = 0; dm <= 1; ++dm) {
      for (int ds = 0; ds <= 2; ++ds) {
        const int sc_c = sc_cover - ds;
        const int m_c = m_cover - dm;
        if (sc_c < 0 || m_c < 0 || (ds == 0 && dm == 0)) continue;
        const Fit fit = FitAffine(xj, 32, d * static_cast<float>(sc_c),
                                  dmin * static_cast<float>(m_c), top, nullptr);
        if (fit.max_err <= cover.max_err && fit.sse < best_sse) {
          best_sc = sc_c;
          best_m = m_c;
          best_sse = fit.sse;
        }
      }
    }
    sc[j] = best_sc;
    m[j] = best_m;
    FitAffine(xj, 32, d * static_cast<float>(sc[j]), dmin * static_cast<float>(m[j]), top,
              q + 32 * j);
  }
  *d_out = d_h;
  *dmin_out = dmin_h;
}

}  // namespace

void DequantizeQ4K(const BlockQ4K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = HalfToFloat(x[b].d);
    const float dmin = HalfToFloat(x[b].dmin);
    int sc[8];
    int m[8];
    UnpackScales(x[b].scales, sc, m);
    const uint8_t* qs = x[b].qs;
    for (int c = 0; c < 4; ++c, qs += 32, y += 64) {
      const float d1 = d * static_cast<float>(sc[2 * c]);
      const float m1 = dmin * static_cast<float>(m[2 * c]);
      const float d2 = d * static_cast<float>(sc[2 * c + 1]);
      const float m2 = dmin * static_cast<float>(m[2 * c + 1]);
      for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>(qs[l] & 15) - m1;
      for (int l = 0; l < 32; ++l) y[l + 32] = d2 * static_cast<float>(qs[l] >> 4) - m2;
    }
  }
}

void DequantizeQ5K(const BlockQ5K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = HalfToFloat(x[b].d);
    const float dmin = HalfToFloat(x[b].dmin);
    int sc[8];
    int m[8];
    UnpackScales(x[b].scales, sc, m);
    const uint8_t* qs = x[b].qs;
    const uint8_t* qh = x[b].qh;
    for (int c = 0; c < 4; ++c, qs += 32, y += 64) {
      const float d1 = d * static_cast<float>(sc[2 * c]);
      const float m1 = dmin * static_cast<float>(m[2 * c]);
      const float d2 = d * static_cast<float>(sc[2 * c + 1]);
      const float m2 = dmin * static_cast<float>(m[2 * c + 1]);
      for (int l = 0; l < 32; ++l) {
        const int q = (qs[l] & 15) | (((qh[l] >> (2 * c)) & 1) << 4);
        y[l] = d1 * static_cast<float>(q) - m1;
      }
      for (int l = 0; l < 32; ++l) {
        const int q = (qs[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
        y[l + 32] = d2 * static_cast<float>(q) - m2;
      }
    }
  }
}

void DequantizeQ6K(const BlockQ6K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float d = HalfToFloat(x[b].d);
    for (int h = 0; h < 2; ++h, y += 128) {
      const uint8_t* ql = x[b].ql + 64 * h;
      const uint8_t* qh = x[b].qh + 32 * h;
      const int8_t* sc = x[b].scales + 8 * h;
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
        y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
    }
  }
}

void DequantizeQ8K(const BlockQ8K* x, float* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, y += kQK) {
    for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(x[b].qs[j]) * x[b].d;
  }
}

void QuantizeQ4K(const float* x, BlockQ4K* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    int sc[8];
    int m[8];
    int q[kQK];
    QuantizeAffineSuperBlock(x, 15, &y[b].d, &y[b].dmin, sc, m, q);
    PackScales(sc, m, y[b].scales);
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        y[b].qs[32 * c + l] = static_cast<uint8_t>(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
      }
    }
  }
}

void QuantizeQ5K(const float* x, BlockQ5K* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    int sc[8];
    int m[8];
    int q[kQK];
    QuantizeAffineSuperBlock(x, 31, &y[b].d, &y[b].dmin, sc, m, q);
    PackScales(sc, m, y[b].scales);
    for (int l = 0; l < 32; ++l) y[b].qh[l] = 0;
    for (int c = 0; c < 4; ++c) {
      for (int l = 0; l < 32; ++l) {
        const int lo = q[64 * c + l];
        const int hi = q[64 * c + 32 + l];
        y[b].qs[32 * c + l] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
        y[b].qh[l] |= static_cast<uint8_t>(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
      }
    }
  }
}

void QuantizeQ6K(const float* x, BlockQ6K* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    float amax[16];
    float max_amax = 0.0f;
    for (int j = 0; j < 16; ++j) {
      amax[j] = 0.0f;
      for (int i = 0; i < 16; ++i) amax[j] = std::fmax(amax[j], std::fabs(x[16 * j + i]));
      max_amax = std::fmax(max_amax, amax[j]);
    }
    const uint16_t d_h = HalfCeil(max_amax / (31.0f * 127.0f));
    const float d = HalfToFloat(d_h);
    int q[kQK];
    for (int j = 0; j < 16; ++j) {
      const float* xj = x + 16 * j;
      const int sc_cover = d > 0.0f ? Clamp(CeilInt(amax[j] / (31.0f * d)), 0, 127) : 0;
      const Fit cover = FitSymmetric(xj, 16, d * static_cast<float>(sc_cover), nullptr);
      const int sc_wide = d > 0.0f ? Clamp(CeilInt(amax[j] / (32.0f * d)), 0, 127) : 0;
      const int magnitudes[4] = {sc_cover, sc_cover - 1, sc_cover - 2, sc_wide};
      int best = sc_cover;
      double best_sse = cover.sse;
      for (int k = 0; k < 4; ++k) {
        for (int sign = 1; sign >= -1; sign -= 2) {
          const int sc_c = sign * magnitudes[k];
          if (magnitudes[k] < 0 || sc_c == sc_cover) continue;
          const Fit fit = FitSymmetric(xj, 16, d * static_cast<float>(sc_c), nullptr);
          if (fit.max_err <= cover.max_err && fit.sse < best_sse) {
            best = sc_c;
            best_sse = fit.sse;
          }
        }
      }
      y[b].scales[j] = static_cast<int8_t>(best);
      FitSymmetric(xj, 16, d * static_cast<float>(best), q + 16 * j);
    }
    y[b].d = d_h;
    for (int h = 0; h < 2; ++h) {
      uint8_t* ql = y[b].ql + 64 * h;
      uint8_t* qh = y[b].qh + 32 * h;
      const int* qq = q + 128 * h;
      for (int l = 0; l < 32; ++l) {
        const int q1 = qq[l] + 32;
        const int q2 = qq[l + 32] + 32;
        const int q3 = qq[l + 64] + 32;
        const int q4 = qq[l + 96] + 32;
        ql[l] = static_cast<uint8_t>((q1 & 15) | ((q3 & 15) << 4));
        ql[l + 32] = static_cast<uint8_t>((q2 & 15) | ((q4 & 15) << 4));
        qh[l] = static_cast<uint8_t>((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) |
                                     ((q4 >> 4) << 6));
      }
    }
  }
}

void QuantizeQ8K(const float* x, BlockQ8K* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQK) {
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    if (amax == 0.0f) {
      y[b].d = 0.0f;
      for (int j = 0; j < kQK; ++j) y[b].qs[j] = 0;
      for (int k = 0; k < 16; ++k) y[b].bsums[k] = 0;
      continue;
    }
    const float iscale = 127.0f / amax;
    y[b].d = 1.0f / iscale;
    for (int k = 0; k < 16; ++k) {
      int sum = 0;
      for (int i = 0; i < 16; ++i) {
        const int q = Clamp(NearestInt(x[16 * k + i] * iscale), -127, 127);
        y[b].qs[16 * k + i] = static_cast<int8_t>(q);
        sum += q;
      }
      y[b].bsums[k] = static_cast<int16_t>(sum);
    }
  }
}

double DotQ4KQ8K(const BlockQ4K* w, const BlockQ8K* x, int64_t nb) {
  double sum = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    int sc[8];
    int m[8];
    UnpackScales(w[b].scales, sc, m);
    int64_t sum_q = 0;  // Σ_j sc_j Σ q·xq
    int64_t sum_m = 0;  // Σ_j m_j Σ xq
    for (int c = 0; c < 4; ++c) {
      const uint8_t* qs = w[b].qs + 32 * c;
      const int8_t* xq = x[b].qs + 64 * c;
      int32_t lo = 0, hi = 0, xlo = 0, xhi = 0;
      for (int l = 0; l < 32; ++l) {
        lo += (qs[l] & 15) * xq[l];
        hi += (qs[l] >> 4) * xq[l + 32];
        xlo += xq[l];
        xhi += xq[l + 32];
      }
      sum_q += static_cast<int64_t>(sc[2 * c]) * lo + static_cast<int64_t>(sc[2 * c + 1]) * hi;
      sum_m += static_cast<int64_t>(m[2 * c]) * xlo + static_cast<int64_t>(m[2 * c + 1]) * xhi;
    }
    const double d = HalfToFloat(w[b].d);
    const double dmin = HalfToFloat(w[b].dmin);
    sum += static_cast<double>(x[b].d) *
           (d * static_cast<double>(sum_q) - dmin * static_cast<double>(sum_m));
  }
  return sum;
}

double DotQ5KQ8K(const BlockQ5K* w, const BlockQ8K* x, int64_t nb) {
  double sum = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    int sc[8];
    int m[8];
    UnpackScales(w[b].scales, sc, m);
    int64_t sum_q = 0;
    int64_t sum_m = 0;
    for (int c = 0; c < 4; ++c) {
      const uint8_t* qs = w[b].qs + 32 * c;
      const uint8_t* qh = w[b].qh;
      const int8_t* xq = x[b].qs + 64 * c;
      int32_t lo = 0, hi = 0, xlo = 0, xhi = 0;
      for (int l = 0; l < 32; ++l) {
        lo += ((qs[l] & 15) | (((qh[l] >> (2 * c)) & 1) << 4)) * xq[l];
        hi += ((qs[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4)) * xq[l + 32];
        xlo += xq[l];
        xhi += xq[l + 32];
      }
      sum_q += static_cast<int64_t>(sc[2 * c]) * lo + static_cast<int64_t>(sc[2 * c + 1]) * hi;
      sum_m += static_cast<int64_t>(m[2 * c]) * xlo + static_cast<int64_t>(m[2 * c + 1]) * xhi;
    }
    const double d = HalfToFloat(w[b].d);
    const double dmin = HalfToFloat(w[b].dmin);
    sum += static_cast<double>(x[b].d) *
           (d * static_cast<double>(sum_q) - dmin * static_cast<double>(sum_m));
  }
  return sum;
}

double DotQ6KQ8K(const BlockQ6K* w, const BlockQ8K* x, int64_t nb) {
  double sum = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t sub[16] = {};  // Σ q·xq per 16-element sub-block
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = w[b].ql + 64 * h;
      const uint8_t* qh = w[b].qh + 32 * h;
      const int8_t* xq = x[b].qs + 128 * h;
      int32_t* s = sub + 8 * h;
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        s[is] += q1 * xq[l];
        s[is + 2] += q2 * xq[l + 32];
        s[is + 4] += q3 * xq[l + 64];
        s[is + 6] += q4 * xq[l + 96];
      }
    }
    int64_t isum = 0;
    for (int k = 0; k < 16; ++k) isum += static_cast<int64_t>(w[b].scales[k]) * sub[k];
    sum += static_cast<double>(HalfToFloat(w[b].d)) * static_cast<double>(x[b].d) *
           static_cast<double>(isum);
  }
  return sum;
}

}  // namespace ktx::kernels::quant_internal
