// The AVX2 variant (AVX2 + FMA + F16C, x86-64-v3): the panel16 kernels of the
// AVX-512 variant on 256-bit vectors. A 64-byte panel group is handled as two
// halves of 8 rows; vpdpbusd is emulated with vpmaddubsw + vpmaddwd (no
// saturation: weights are at most 6 bits unsigned here, and Q8_0 uses the
// |w| / sign(x, w) form). Up to 2 activation rows are register-blocked.
// GGUF-layout and amx_int8 matrices run the scalar code.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/moe/moe_internal.h"

namespace ktx::kernels::moe::avx2 {
namespace {

#define KTX_UNROLL _Pragma("GCC unroll 16")

constexpr int kMaxTokenBlock = 2;
constexpr int kPrefetchBlocks = 12;  // software prefetch distance, in panel blocks (into L2)

inline __m256i Bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline __m256i Load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline __m128i Load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline __m128i Load64(const uint8_t* p) {
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
}
// Prefetches stop at the end of the rows the call reads (short streams,
// e.g. 64-row down-projection tasks, would otherwise fetch useless bytes).
inline void Prefetch(const uint8_t* p, const uint8_t* end) {
  if (p < end) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T2);
}

// s + Σ over groups of 4 bytes of u8(w) * s8(x) (as vpdpbusd, for |products| small).
inline __m256i Dot4(__m256i s, __m256i w, __m256i x) {
  return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}

template <int kLeft>
inline __m256i Shift16(__m256i h) {
  if constexpr (kLeft > 0) {
    return _mm256_slli_epi16(h, kLeft);
  } else if constexpr (kLeft < 0) {
    return _mm256_srli_epi16(h, -kLeft);
  } else {
    return h;
  }
}

inline __m256i OrMasked(__m256i lo, __m256i hs, __m256i mask) {
  return _mm256_or_si256(lo, _mm256_and_si256(hs, mask));
}

template <int T, bool kQ5>
void PanelQ4K(const uint8_t* panel, const uint8_t* pf_end, int64_t nb, const ActQ8K* const* act,
              float* const* out) {
  constexpr int64_t kBytes = kQ5 ? panel::kQ5KBytes : panel::kQ4KBytes;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i m10 = _mm256_set1_epi8(0x10);
  __m256 acc[T][2];
  KTX_UNROLL
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* pb = panel + b * kBytes;
    for (int l = 0; l < static_cast<int>(kBytes); l += 64)
      Prefetch(pb + kPrefetchBlocks * kBytes + l, pf_end);
    KTX_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int ho = 32 * half;
      __m256 blk[T];
      KTX_UNROLL
      for (int t = 0; t < T; ++t) blk[t] = _mm256_setzero_ps();
      KTX_UNROLL
      for (int j = 0; j < 8; ++j) {
        __m256i s[T];
        KTX_UNROLL
        for (int t = 0; t < T; ++t) s[t] = _mm256_setzero_si256();
        __m256i h = _mm256_setzero_si256();
        if constexpr (kQ5) h = Load256(pb + panel::kQ5KQh + 64 * j + ho);
        KTX_UNROLL
        for (int gg = 0; gg < 4; ++gg) {
          const __m256i z = Load256(pb + panel::kQ4KQs + (4 * j + gg) * 64 + ho);
          __m256i lo = _mm256_and_si256(z, m4);
          __m256i hi = _mm256_and_si256(_mm256_srli_epi16(z, 4), m4);
          if constexpr (kQ5) {
            if (gg == 0) {
              lo = OrMasked(lo, Shift16<4>(h), m10);
              hi = OrMasked(hi, Shift16<3>(h), m10);
            } else if (gg == 1) {
              lo = OrMasked(lo, Shift16<2>(h), m10);
              hi = OrMasked(hi, Shift16<1>(h), m10);
            } else if (gg == 2) {
              lo = OrMasked(lo, Shift16<0>(h), m10);
              hi = OrMasked(hi, Shift16<-1>(h), m10);
            } else {
              lo = OrMasked(lo, Shift16<-2>(h), m10);
              hi = OrMasked(hi, Shift16<-3>(h), m10);
            }
          }
          KTX_UNROLL
          for (int t = 0; t < T; ++t) {
            const int8_t* xq = act[t][b].qs + 32 * j + 8 * gg;
            s[t] = Dot4(s[t], lo, Bcast32(xq));
            s[t] = Dot4(s[t], hi, Bcast32(xq + 4));
          }
        }
        const __m256 scf = _mm256_cvtepi32_ps(
            _mm256_cvtepu8_epi32(Load64(pb + panel::kQ4KSc + 16 * j + 8 * half)));
        KTX_UNROLL
        for (int t = 0; t < T; ++t) blk[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), scf, blk[t]);
      }
      const __m256 dv = _mm256_cvtph_ps(Load128(pb + panel::kQ4KD + 16 * half));
      const __m256 dm = _mm256_cvtph_ps(Load128(pb + panel::kQ4KDmin + 16 * half));
      KTX_UNROLL
      for (int t = 0; t < T; ++t) {
        __m256i m = _mm256_setzero_si256();
        KTX_UNROLL
        for (int i = 0; i < 4; ++i) {
          const __m256i mins =
              _mm256_cvtepu8_epi16(Load128(pb + panel::kQ4KM + 32 * i + 16 * half));
          m = _mm256_add_epi32(m, _mm256_madd_epi16(mins, Bcast32(&act[t][b].bsum32[2 * i])));
        }
        const __m256 r = _mm256_fmsub_ps(blk[t], dv, _mm256_mul_ps(_mm256_cvtepi32_ps(m), dm));
        acc[t][half] = _mm256_fmadd_ps(r, _mm256_set1_ps(act[t][b].d), acc[t][half]);
      }
    }
  }
  KTX_UNROLL
  for (int t = 0; t < T; ++t) {
    _mm256_storeu_ps(out[t], acc[t][0]);
    _mm256_storeu_ps(out[t] + 8, acc[t][1]);
  }
}

template <int T>
void PanelQ6K(const uint8_t* panel, const uint8_t* pf_end, int64_t nb, const ActQ8K* const* act,
              float* const* out) {
  constexpr int64_t kBytes = panel::kQ6KBytes;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i m30 = _mm256_set1_epi8(0x30);
  __m256 acc[T][2];
  KTX_UNROLL
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* pb = panel + b * kBytes;
    for (int l = 0; l < static_cast<int>(kBytes); l += 64)
      Prefetch(pb + kPrefetchBlocks * kBytes + l, pf_end);
    KTX_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int ho = 32 * half;
      __m256 blk[T];
      KTX_UNROLL
      for (int t = 0; t < T; ++t) blk[t] = _mm256_setzero_ps();
      KTX_UNROLL
      for (int j = 0; j < 16; ++j) {
        const __m256i z0 = Load256(pb + panel::Q6KQl(2 * j) + ho);
        const __m256i z1 = Load256(pb + panel::Q6KQl(2 * j + 1) + ho);
        const __m256i h = Load256(pb + panel::Q6KQh(j) + ho);
        const __m256i q0 = OrMasked(_mm256_and_si256(z0, m4), _mm256_slli_epi16(h, 4), m30);
        const __m256i q1 =
            OrMasked(_mm256_and_si256(_mm256_srli_epi16(z0, 4), m4), _mm256_slli_epi16(h, 2), m30);
        const __m256i q2 = OrMasked(_mm256_and_si256(z1, m4), h, m30);
        const __m256i q3 =
            OrMasked(_mm256_and_si256(_mm256_srli_epi16(z1, 4), m4), _mm256_srli_epi16(h, 2), m30);
        const __m256 scf = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(Load64(pb + panel::kQ6KSc + 16 * j + 8 * half)));
        KTX_UNROLL
        for (int t = 0; t < T; ++t) {
          const int8_t* xq = act[t][b].qs + 16 * j;
          __m256i s = _mm256_set1_epi32(act[t][b].neg32_bsum16[j]);
          s = Dot4(s, q0, Bcast32(xq));
          s = Dot4(s, q1, Bcast32(xq + 4));
          s = Dot4(s, q2, Bcast32(xq + 8));
          s = Dot4(s, q3, Bcast32(xq + 12));
          blk[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scf, blk[t]);
        }
      }
      const __m256 dv = _mm256_cvtph_ps(Load128(pb + panel::kQ6KD + 16 * half));
      KTX_UNROLL
      for (int t = 0; t < T; ++t) {
        acc[t][half] =
            _mm256_fmadd_ps(_mm256_mul_ps(blk[t], dv), _mm256_set1_ps(act[t][b].d), acc[t][half]);
      }
    }
  }
  KTX_UNROLL
  for (int t = 0; t < T; ++t) {
    _mm256_storeu_ps(out[t], acc[t][0]);
    _mm256_storeu_ps(out[t] + 8, acc[t][1]);
  }
}

template <int T>
void PanelQ80(const uint8_t* panel, const uint8_t* pf_end, int64_t nb, const ActQ8_0* const* act,
              float* const* out) {
  constexpr int64_t kBytes = panel::kQ80Bytes;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[T][2];
  KTX_UNROLL
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* pb = panel + b * kBytes;
    for (int l = 0; l < static_cast<int>(kBytes); l += 64)
      Prefetch(pb + 4 * kPrefetchBlocks * kBytes + l, pf_end);
    KTX_UNROLL
    for (int half = 0; half < 2; ++half) {
      __m256i s[T];
      KTX_UNROLL
      for (int t = 0; t < T; ++t) s[t] = _mm256_setzero_si256();
      KTX_UNROLL
      for (int g = 0; g < 8; ++g) {
        const __m256i w = _mm256_xor_si256(Load256(pb + panel::kQ80Q + 64 * g + 32 * half), flip);
        const __m256i aw = _mm256_abs_epi8(w);
        KTX_UNROLL
        for (int t = 0; t < T; ++t)
          s[t] = Dot4(s[t], aw, _mm256_sign_epi8(Bcast32(act[t][b].qs + 4 * g), w));
      }
      const __m256 dv = _mm256_cvtph_ps(Load128(pb + panel::kQ80D + 16 * half));
      KTX_UNROLL
      for (int t = 0; t < T; ++t) {
        acc[t][half] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(dv, _mm256_set1_ps(act[t][b].d)), acc[t][half]);
      }
    }
  }
  KTX_UNROLL
  for (int t = 0; t < T; ++t) {
    _mm256_storeu_ps(out[t], acc[t][0]);
    _mm256_storeu_ps(out[t] + 8, acc[t][1]);
  }
}

template <int T>
void PanelBf16(const uint8_t* panel, const uint8_t* pf_end, int64_t nb, const float* const* act,
               float* const* out) {
  constexpr int64_t kBytes = panel::kBf16Bytes;
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[T][2][2];
  KTX_UNROLL
  for (int t = 0; t < T; ++t) {
    KTX_UNROLL
    for (int h = 0; h < 2; ++h) acc[t][h][0] = acc[t][h][1] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* pb = panel + b * kBytes;
    KTX_UNROLL
    for (int g = 0; g < 16; ++g) {
      Prefetch(pb + 64 * g + kPrefetchBlocks * kBytes, pf_end);
      KTX_UNROLL
      for (int half = 0; half < 2; ++half) {
        const __m256i z = Load256(pb + 64 * g + 32 * half);
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(z, 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(z, hi_mask));
        KTX_UNROLL
        for (int t = 0; t < T; ++t) {
          const float* x = act[t] + 32 * b + 2 * g;
          acc[t][half][0] = _mm256_fmadd_ps(we, _mm256_set1_ps(x[0]), acc[t][half][0]);
          acc[t][half][1] = _mm256_fmadd_ps(wo, _mm256_set1_ps(x[1]), acc[t][half][1]);
        }
      }
    }
  }
  KTX_UNROLL
  for (int t = 0; t < T; ++t) {
    _mm256_storeu_ps(out[t], _mm256_add_ps(acc[t][0][0], acc[t][0][1]));
    _mm256_storeu_ps(out[t] + 8, _mm256_add_ps(acc[t][1][0], acc[t][1][1]));
  }
}

template <typename ActT, typename K1, typename K2>
void PanelDriver(const MatmulArgs& a, int64_t nb, int64_t panel_bytes, K1 k1, K2 k2) {
  for (int64_t p = a.row_begin / kPanelRows; p < a.row_end / kPanelRows; ++p) {
    const uint8_t* panel = a.w + p * nb * panel_bytes;
    const uint8_t* pf_end = a.w + (a.row_end / kPanelRows) * nb * panel_bytes;
    const int64_t col = p * kPanelRows - a.row_begin;
    for (int64_t t0 = 0; t0 < a.n_act; t0 += kMaxTokenBlock) {
      const int T = static_cast<int>(std::min<int64_t>(kMaxTokenBlock, a.n_act - t0));
      const ActT* act[kMaxTokenBlock];
      float* out[kMaxTokenBlock];
      KTX_UNROLL
      for (int t = 0; t < T; ++t) {
        const int64_t row = a.act_index != nullptr ? a.act_index[t0 + t] : t0 + t;
        act[t] = reinterpret_cast<const ActT*>(a.act + row * a.act_stride);
        out[t] = a.out + (t0 + t) * a.out_stride + col;
      }
      if (T == 1) {
        k1(panel, pf_end, nb, act, out);
      } else {
        k2(panel, pf_end, nb, act, out);
      }
    }
  }
}

// ---- quantizers (bitwise equal to scalar::Quantize) ----

inline float MaxAbs(const float* x, int n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8)
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 v = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  v = _mm_max_ps(v, _mm_movehl_ps(v, v));
  v = _mm_max_ss(v, _mm_shuffle_ps(v, v, 1));
  return _mm_cvtss_f32(v);
}

// Rounds 8 values, stores them as int8 and returns their sum.
inline int Quantize8(const float* x, __m256 iscale, int8_t* q) {
  __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), iscale));
  v = _mm256_max_epi32(_mm256_set1_epi32(-127), _mm256_min_epi32(_mm256_set1_epi32(127), v));
  alignas(32) int32_t tmp[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
  int s = 0;
  for (int i = 0; i < 8; ++i) {
    q[i] = static_cast<int8_t>(tmp[i]);
    s += tmp[i];
  }
  return s;
}

void QuantizeQ8K(const float* x, ActQ8K* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += 256) {
    ActQ8K& o = y[b];
    std::memset(&o, 0, sizeof(o));
    const float amax = MaxAbs(x, 256);
    if (amax == 0.0f) continue;
    const __m256 iscale = _mm256_set1_ps(127.0f / amax);
    o.d = amax / 127.0f;
    int s16[16];
    KTX_UNROLL
    for (int j = 0; j < 16; ++j) {
      s16[j] = Quantize8(x + 16 * j, iscale, o.qs + 16 * j) +
               Quantize8(x + 16 * j + 8, iscale, o.qs + 16 * j + 8);
      o.neg32_bsum16[j] = -32 * s16[j];
    }
    KTX_UNROLL
    for (int j = 0; j < 8; ++j) o.bsum32[j] = static_cast<int16_t>(s16[2 * j] + s16[2 * j + 1]);
  }
}

void QuantizeQ8_0(const float* x, ActQ8_0* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += 32) {
    ActQ8_0& o = y[b];
    std::memset(&o, 0, sizeof(o));
    const float amax = MaxAbs(x, 32);
    if (amax == 0.0f) continue;
    const __m256 iscale = _mm256_set1_ps(127.0f / amax);
    o.d = amax / 127.0f;
    int s = 0;
    for (int j = 0; j < 4; ++j) s += Quantize8(x + 8 * j, iscale, o.qs + 8 * j);
    o.neg128_sum = -128 * s;
  }
}

// e^x for x in [-87, 88]: 2^n built in the exponent field.
inline __m256 Exp(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_min_ps(_mm256_set1_ps(88.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void Quantize(ActFormat fmt, const float* x, uint8_t* dst, int64_t k) {
  switch (fmt) {
    case ActFormat::kQ8K: QuantizeQ8K(x, reinterpret_cast<ActQ8K*>(dst), k / 256); break;
    case ActFormat::kQ8_0: QuantizeQ8_0(x, reinterpret_cast<ActQ8_0*>(dst), k / 32); break;
    case ActFormat::kF32: scalar::Quantize(fmt, x, dst, k); break;
  }
}

void SiluMul(const float* g, const float* u, float* h, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = Exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(
        h + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
  if (i < n) scalar::SiluMul(g + i, u + i, h + i, n - i);
}

void Matmul(const MatmulArgs& a) {
  if (a.format.layout != MoeWeightLayout::kPanel16) {
    scalar::Matmul(a);
    return;
  }
  const int64_t nb = a.k / KBlock(a.format);
  const int64_t pbb = PanelBlockBytes(a.format);
  switch (a.format.type) {
    case TensorType::kQ4_K:
      PanelDriver<ActQ8K>(a, nb, pbb, PanelQ4K<1, false>, PanelQ4K<2, false>);
      break;
    case TensorType::kQ5_K:
      PanelDriver<ActQ8K>(a, nb, pbb, PanelQ4K<1, true>, PanelQ4K<2, true>);
      break;
    case TensorType::kQ6_K: PanelDriver<ActQ8K>(a, nb, pbb, PanelQ6K<1>, PanelQ6K<2>); break;
    case TensorType::kQ8_0: PanelDriver<ActQ8_0>(a, nb, pbb, PanelQ80<1>, PanelQ80<2>); break;
    case TensorType::kBF16: PanelDriver<float>(a, nb, pbb, PanelBf16<1>, PanelBf16<2>); break;
    default: scalar::Matmul(a); break;
  }
}

bool Supports(MoeMatrixFormat f) { return MoeFormatSupported(f); }
int64_t NoScratch(MoeMatrixFormat, int64_t) { return 0; }

}  // namespace
}  // namespace ktx::kernels::moe::avx2

namespace ktx::kernels::moe {

const MoeKernels& MoeKernelsAvx2() {
  static const MoeKernels k = {
      CpuVariant::kAvx2, "avx2",         &avx2::Supports, &avx2::Quantize, &avx2::Matmul,
      &avx2::NoScratch,  &avx2::SiluMul, nullptr,         nullptr,         nullptr};
  return k;
}

}  // namespace ktx::kernels::moe
