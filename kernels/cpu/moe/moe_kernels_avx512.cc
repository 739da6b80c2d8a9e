// The AVX-512 variant (F/BW/VL/DQ + VNNI): decode and blocked-prefill kernels
// over the panel16 layout (moe_repack.h). Per 16-row panel and block of up to
// 4 activation rows, the weights are unpacked once (nibbles, high bits) and
// fed to vpdpbusd against 4-byte groups of the int8 activations (broadcast
// by the instruction's memory operand); sub-block scales are applied in fp32.
// The panel (K x 16 rows) stays in L2 while the token blocks pass over it.
// GGUF-layout and amx_int8 matrices run the scalar code (compiled here with
// AVX-512 enabled).
#include "kernels/cpu/moe/moe_kernels_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/moe/moe_internal.h"

namespace ktx::kernels::moe::avx512 {
namespace {

#define KTX_UNROLL _Pragma("GCC unroll 16")

constexpr int kMaxTokenBlock = 4;
constexpr int kPrefetchBlocks = 12;  // software prefetch distance, in panel blocks (into L2)

inline __m512i Bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline __m512i Load512(const uint8_t* p) { return _mm512_loadu_si512(p); }
// acc += dpbusd(w, the 4 bytes at p in every lane), the broadcast embedded
// in the instruction's memory operand ({1to16}); GCC 12 emits a separate
// vpbroadcastd for _mm512_set1_epi32 instead. On the Zen 4 build machine the
// Q4_K kernel at 1 row in L2: 60 -> 67 GB/s (docs/performance.md, "The
// decode kernels' vector work").
inline __m512i DpbusdBcast(__m512i acc, __m512i w, const void* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*static_cast<const int32_t*>(p)));
  return acc;
}
// A 64-byte load the compiler keeps in a register: without the barrier GCC
// folds the load into each of its users (the low and the high nibbles), one
// 64-byte L1 read each (the Q6_K kernel at 1 row in L2: 52 -> 57 GB/s on Zen 4).
inline __m512i LoadOnce(const uint8_t* p) {
  __m512i v = _mm512_loadu_si512(p);
  asm("" : "+v"(v));
  return v;
}
inline __m128i Load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline __m256i Load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
// Prefetch into L2, 12 panel blocks ahead: on the Zen 4 build machine this
// doubled the single-core DRAM streaming rate of the Q6_K kernel (8 -> 17 GB/s
// per CPU-second) over an L1 prefetch 4 blocks ahead (moe_benchmark kernel_dram).
// Prefetches stop at the end of the rows the call reads (short streams,
// e.g. 64-row down-projection tasks, would otherwise fetch useless bytes).
inline void Prefetch(const uint8_t* p, const uint8_t* end) {
  if (p < end) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T2);
}

// lo | (hs & mask) per byte.
inline __m512i OrMasked(__m512i lo, __m512i hs, __m512i mask) {
  return _mm512_ternarylogic_epi32(lo, hs, mask, 0xF8);
}

template <int kLeft>
inline __m512i Shift16(__m512i h) {
  if constexpr (kLeft > 0) {
    return _mm512_slli_epi16(h, kLeft);
  } else if constexpr (kLeft < 0) {
    return _mm512_srli_epi16(h, -kLeft);
  } else {
    return h;
  }
}

// Q4_K / Q5_K panel x T activation rows (act[t] = the row's Q8K blocks).
// kPrefetch: the software prefetch of the weights ahead of the reads (see
// PrefetchOneRow for the case without it).
template <int T, bool kQ5, bool kPrefetch = true>
void PanelQ4K(const uint8_t* panel, const uint8_t* pf_end, int64_t nb, const ActQ8K* const* act,
              float* const* out) {
  constexpr int64_t kBytes = kQ5 ? panel::kQ5KBytes : panel::kQ4KBytes;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i m10 = _mm512_set1_epi8(0x10);
  __m512 acc[T];
  KTX_UNROLL
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* pb = panel + b * kBytes;
    if constexpr (kPrefetch) {
      for (int l = 0; l < 320; l += 64) Prefetch(pb + kPrefetchBlocks * kBytes + l, pf_end);
    }
    __m512 blk[T];
    KTX_UNROLL
    for (int t = 0; t < T; ++t) blk[t] = _mm512_setzero_ps();
    KTX_UNROLL
    for (int j = 0; j < 8; ++j) {
      // Q4_K: the high nibbles stay in place (z & 0xF0 = 16 hi, still a
      // u8) in sums of their own, divided by 16 at the end (exact): one
      // shift per sub-block instead of one per 64 bytes.
      __m512i s[T], s16[T];
      KTX_UNROLL
      for (int t = 0; t < T; ++t) s[t] = s16[t] = _mm512_setzero_si512();
      __m512i h = _mm512_setzero_si512();
      if constexpr (kQ5) {
        h = LoadOnce(pb + panel::kQ5KQh + 64 * j);
        if constexpr (kPrefetch) {
          Prefetch(pb + kPrefetchBlocks * kBytes + panel::kQ5KQh + 64 * j, pf_end);
        }
      }
      KTX_UNROLL
      for (int gg = 0; gg < 4; ++gg) {
        const uint8_t* qp = pb + panel::kQ4KQs + (4 * j + gg) * 64;
        if constexpr (kPrefetch) Prefetch(qp + kPrefetchBlocks * kBytes, pf_end);
        const __m512i z = LoadOnce(qp);
        __m512i lo = _mm512_and_si512(z, m4);
        if constexpr (!kQ5) {
          const __m512i hi16 = _mm512_andnot_si512(m4, z);
          KTX_UNROLL
          for (int t = 0; t < T; ++t) {
            const int8_t* xq = act[t][b].qs + 32 * j + 8 * gg;
            s[t] = DpbusdBcast(s[t], lo, xq);
            s16[t] = DpbusdBcast(s16[t], hi16, xq + 4);
          }
        } else {
          // bit t of h to bit 4; t = 2gg (lo), 2gg + 1 (hi)
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
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
          KTX_UNROLL
          for (int t = 0; t < T; ++t) {
            const int8_t* xq = act[t][b].qs + 32 * j + 8 * gg;
            s[t] = DpbusdBcast(s[t], lo, xq);
            s[t] = DpbusdBcast(s[t], hi, xq + 4);
          }
        }
      }
      if constexpr (!kQ5) {
        KTX_UNROLL
        for (int t = 0; t < T; ++t) s[t] = _mm512_add_epi32(s[t], _mm512_srai_epi32(s16[t], 4));
      }
      const __m512 scf =
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(Load128(pb + panel::kQ4KSc + 16 * j)));
      KTX_UNROLL
      for (int t = 0; t < T; ++t) blk[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), scf, blk[t]);
    }
    const __m512 dv = _mm512_cvtph_ps(Load256(pb + panel::kQ4KD));
    const __m512 dm = _mm512_cvtph_ps(Load256(pb + panel::kQ4KDmin));
    __m512i mins[4];
    KTX_UNROLL
    for (int i = 0; i < 4; ++i) mins[i] = _mm512_cvtepu8_epi16(Load256(pb + panel::kQ4KM + 32 * i));
    KTX_UNROLL
    for (int t = 0; t < T; ++t) {
      __m512i m = _mm512_setzero_si512();
      KTX_UNROLL
      for (int i = 0; i < 4; ++i) {
        m = _mm512_dpwssd_epi32(m, mins[i], Bcast32(&act[t][b].bsum32[2 * i]));
      }
      const __m512 r = _mm512_fmsub_ps(blk[t], dv, _mm512_mul_ps(_mm512_cvtepi32_ps(m), dm));
      acc[t] = _mm512_fmadd_ps(r, _mm512_set1_ps(act[t][b].d), acc[t]);
    }
  }
  KTX_UNROLL
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out[t], acc[t]);
}

// Q6_K panel x T activation rows. kPrefetch: as PanelQ4K's (PrefetchOneRow).
template <int T, bool kPrefetch = true>
void PanelQ6K(const uint8_t* panel, const uint8_t* pf_end, int64_t nb, const ActQ8K* const* act,
              float* const* out) {
  constexpr int64_t kBytes = panel::kQ6KBytes;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i m30 = _mm512_set1_epi8(0x30);
  __m512 acc[T];
  KTX_UNROLL
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* pb = panel + b * kBytes;
    if constexpr (kPrefetch) {
      for (int l = 0; l < 288; l += 64) Prefetch(pb + kPrefetchBlocks * kBytes + l, pf_end);
    }
    __m512 blk[T];
    KTX_UNROLL
    for (int t = 0; t < T; ++t) blk[t] = _mm512_setzero_ps();
    KTX_UNROLL
    for (int j = 0; j < 16; ++j) {
      const uint8_t* ql = pb + panel::Q6KQl(2 * j);  // and the next 64 bytes
      const uint8_t* qh = pb + panel::Q6KQh(j);
      if constexpr (kPrefetch) {
        Prefetch(ql + kPrefetchBlocks * kBytes, pf_end);
        Prefetch(ql + 64 + kPrefetchBlocks * kBytes, pf_end);
        Prefetch(qh + kPrefetchBlocks * kBytes, pf_end);
      }
      const __m512i z0 = LoadOnce(ql);
      const __m512i z1 = LoadOnce(ql + 64);
      const __m512i h = LoadOnce(qh);
      const __m512i q0 = OrMasked(_mm512_and_si512(z0, m4), _mm512_slli_epi16(h, 4), m30);
      const __m512i q1 =
          OrMasked(_mm512_and_si512(_mm512_srli_epi16(z0, 4), m4), _mm512_slli_epi16(h, 2), m30);
      const __m512i q2 = OrMasked(_mm512_and_si512(z1, m4), h, m30);
      const __m512i q3 =
          OrMasked(_mm512_and_si512(_mm512_srli_epi16(z1, 4), m4), _mm512_srli_epi16(h, 2), m30);
      const __m512 scf =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(Load128(pb + panel::kQ6KSc + 16 * j)));
      KTX_UNROLL
      for (int t = 0; t < T; ++t) {
        const int8_t* xq = act[t][b].qs + 16 * j;
        __m512i s = _mm512_set1_epi32(act[t][b].neg32_bsum16[j]);
        s = DpbusdBcast(s, q0, xq);
        s = DpbusdBcast(s, q1, xq + 4);
        s = DpbusdBcast(s, q2, xq + 8);
        s = DpbusdBcast(s, q3, xq + 12);
        blk[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scf, blk[t]);
      }
    }
    const __m512 dv = _mm512_cvtph_ps(Load256(pb + panel::kQ6KD));
    KTX_UNROLL
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(blk[t], dv), _mm512_set1_ps(act[t][b].d), acc[t]);
    }
  }
  KTX_UNROLL
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out[t], acc[t]);
}

// Q8_0 panel x T activation rows (blocks of 32).
template <int T>
void PanelQ80(const uint8_t* panel, const uint8_t* pf_end, int64_t nb, const ActQ8_0* const* act,
              float* const* out) {
  constexpr int64_t kBytes = panel::kQ80Bytes;
  __m512 acc[T];
  KTX_UNROLL
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* pb = panel + b * kBytes;
    __m512i s[T];
    KTX_UNROLL
    for (int t = 0; t < T; ++t) s[t] = _mm512_set1_epi32(act[t][b].neg128_sum);
    KTX_UNROLL
    for (int g = 0; g < 8; ++g) {
      const uint8_t* qp = pb + panel::kQ80Q + 64 * g;
      Prefetch(qp + kPrefetchBlocks * 4 * kBytes, pf_end);
      const __m512i z = Load512(qp);
      KTX_UNROLL
      for (int t = 0; t < T; ++t) s[t] = DpbusdBcast(s[t], z, act[t][b].qs + 4 * g);
    }
    const __m512 dv = _mm512_cvtph_ps(Load256(pb + panel::kQ80D));
    KTX_UNROLL
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]),
                               _mm512_mul_ps(dv, _mm512_set1_ps(act[t][b].d)), acc[t]);
    }
  }
  KTX_UNROLL
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out[t], acc[t]);
}

// BF16 panel x T activation rows (floats already rounded to bf16).
template <int T>
void PanelBf16(const uint8_t* panel, const uint8_t* pf_end, int64_t nb, const float* const* act,
               float* const* out) {
  constexpr int64_t kBytes = panel::kBf16Bytes;
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc0[T], acc1[T];
  KTX_UNROLL
  for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* pb = panel + b * kBytes;
    KTX_UNROLL
    for (int g = 0; g < 16; ++g) {
      Prefetch(pb + 64 * g + kPrefetchBlocks * kBytes, pf_end);
      const __m512i z = LoadOnce(pb + 64 * g);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(z, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(z, hi_mask));
      KTX_UNROLL
      for (int t = 0; t < T; ++t) {
        const float* x = act[t] + 32 * b + 2 * g;
        acc0[t] = _mm512_fmadd_ps(we, _mm512_set1_ps(x[0]), acc0[t]);
        acc1[t] = _mm512_fmadd_ps(wo, _mm512_set1_ps(x[1]), acc1[t]);
      }
    }
  }
  KTX_UNROLL
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out[t], _mm512_add_ps(acc0[t], acc1[t]));
}

// Whether the Q4_K and Q6_K kernels prefetch their weights at one activation
// row. Measured on two machines (docs/performance.md, "The decode kernels'
// vector work"): on the H200 machine's Xeon (16 threads) the decode layer
// read its weights at 90-91 % of the read loop with the Q4_K prefetch and
// 82-84 % without; on the 2-vCPU AMD Zen 4 build machine one Q4_K row
// streamed from DRAM at 21-24 GB/s with it and 26-30 without (its hardware
// prefetcher follows the quants' single stream; the prefetch instructions
// only add work), and the decode layer went from 54 to 60 % of a ~67 GB/s
// read loop. Q6_K reads its block in address order too since its panel
// layout interleaves the low nibbles and high bits per sub-block
// (moe_internal.h): one row from DRAM on Zen 4 22-25 GB/s with the prefetch
// against 27-30 without (docs/performance.md, "Longer stage-2 streams at
// decode"). So: off on AMD at one row. Q5_K reads two streams per block and
// keeps it everywhere, and at 2-4 rows Q4_K and Q6_K need it (Zen 4, 4 rows:
// Q4_K 24 with, 11 without; Q6_K 24 against 12).
bool PrefetchOneRow() {
  static const bool on = DetectCpuFeatures().vendor != "AuthenticAMD";
  return on;
}

template <typename ActT, typename Kernel1, typename Kernel2, typename Kernel3, typename Kernel4>
void PanelDriver(const MatmulArgs& a, int64_t nb, int64_t panel_bytes, Kernel1 k1, Kernel2 k2,
                 Kernel3 k3, Kernel4 k4) {
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
      switch (T) {
        case 1: k1(panel, pf_end, nb, act, out); break;
        case 2: k2(panel, pf_end, nb, act, out); break;
        case 3: k3(panel, pf_end, nb, act, out); break;
        default: k4(panel, pf_end, nb, act, out); break;
      }
    }
  }
}

// ---- activation quantizers (bitwise equal to scalar::Quantize) ----

inline float ReduceMaxAbs(const float* x, int n) {
  __m512 m = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  return _mm512_reduce_max_ps(m);
}

// Rounds x * iscale to int32 in [-127, 127] (nearest even, as std::nearbyint).
inline __m512i QuantizeLanes(const float* x, __m512 iscale) {
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), iscale));
  return _mm512_max_epi32(_mm512_set1_epi32(-127), _mm512_min_epi32(_mm512_set1_epi32(127), q));
}

void QuantizeQ8K(const float* x, ActQ8K* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += 256) {
    ActQ8K& o = y[b];
    std::memset(&o, 0, sizeof(o));
    const float amax = ReduceMaxAbs(x, 256);
    if (amax == 0.0f) continue;
    const float iscale_s = 127.0f / amax;
    o.d = amax / 127.0f;
    const __m512 iscale = _mm512_set1_ps(iscale_s);
    int s16[16];
    KTX_UNROLL
    for (int j = 0; j < 16; ++j) {
      const __m512i q = QuantizeLanes(x + 16 * j, iscale);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o.qs + 16 * j), _mm512_cvtepi32_epi8(q));
      s16[j] = _mm512_reduce_add_epi32(q);
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
    const float amax = ReduceMaxAbs(x, 32);
    if (amax == 0.0f) continue;
    const float iscale_s = 127.0f / amax;
    o.d = amax / 127.0f;
    const __m512 iscale = _mm512_set1_ps(iscale_s);
    int s = 0;
    for (int j = 0; j < 2; ++j) {
      const __m512i q = QuantizeLanes(x + 16 * j, iscale);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o.qs + 16 * j), _mm512_cvtepi32_epi8(q));
      s += _mm512_reduce_add_epi32(q);
    }
    o.neg128_sum = -128 * s;
  }
}

void RoundRowToBf16(const float* x, float* y, int64_t n) {
  const __m512i exp_mask = _mm512_set1_epi32(0x7f800000);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(x + i));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
    const __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exp_mask), exp_mask);
    r = _mm512_mask_mov_epi32(r, special, bits);
    _mm512_storeu_ps(y + i, _mm512_castsi512_ps(r));
  }
  for (; i < n; ++i) y[i] = RoundToBf16(x[i]);
}

// e^x for x in [-88, 88] (Cody-Waite reduction, degree-7 Taylor; ~1 ulp).
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-88.0f), _mm512_min_ps(_mm512_set1_ps(88.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace

void Quantize(ActFormat fmt, const float* x, uint8_t* dst, int64_t k) {
  switch (fmt) {
    case ActFormat::kQ8K: QuantizeQ8K(x, reinterpret_cast<ActQ8K*>(dst), k / 256); break;
    case ActFormat::kQ8_0: QuantizeQ8_0(x, reinterpret_cast<ActQ8_0*>(dst), k / 32); break;
    case ActFormat::kF32: RoundRowToBf16(x, reinterpret_cast<float*>(dst), k); break;
  }
}

void QuantizeTile(const float* x, int8_t* q, float* d, int64_t n, int64_t group) {
  for (int64_t g = 0; g < n / group; ++g, x += group, q += group) {
    const float amax = ReduceMaxAbs(x, static_cast<int>(group));
    if (amax == 0.0f) {
      std::memset(q, 0, group);
      d[g] = 0.0f;
      continue;
    }
    const __m512 iscale = _mm512_set1_ps(127.0f / amax);
    d[g] = amax / 127.0f;
    for (int64_t i = 0; i < group; i += 16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                       _mm512_cvtepi32_epi8(QuantizeLanes(x + i, iscale)));
    }
  }
}

void SiluMul(const float* g, const float* u, float* h, int64_t n) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = Exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
    _mm512_storeu_ps(h + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
  }
  if (i < n) scalar::SiluMul(g + i, u + i, h + i, n - i);
}

bool MatmulPanel(const MatmulArgs& a) {
  if (a.format.layout != MoeWeightLayout::kPanel16) return false;
  const int64_t nb = a.k / KBlock(a.format);
  const int64_t pbb = PanelBlockBytes(a.format);
  switch (a.format.type) {
    case TensorType::kQ4_K:
      PanelDriver<ActQ8K>(a, nb, pbb,
                          PrefetchOneRow() ? &PanelQ4K<1, false, true> : &PanelQ4K<1, false, false>,
                          PanelQ4K<2, false>, PanelQ4K<3, false>, PanelQ4K<4, false>);
      return true;
    case TensorType::kQ5_K:
      PanelDriver<ActQ8K>(a, nb, pbb, PanelQ4K<1, true>, PanelQ4K<2, true>, PanelQ4K<3, true>,
                          PanelQ4K<4, true>);
      return true;
    case TensorType::kQ6_K:
      PanelDriver<ActQ8K>(a, nb, pbb, PrefetchOneRow() ? &PanelQ6K<1, true> : &PanelQ6K<1, false>,
                          PanelQ6K<2>, PanelQ6K<3>, PanelQ6K<4>);
      return true;
    case TensorType::kQ8_0:
      PanelDriver<ActQ8_0>(a, nb, pbb, PanelQ80<1>, PanelQ80<2>, PanelQ80<3>, PanelQ80<4>);
      return true;
    case TensorType::kBF16:
      PanelDriver<float>(a, nb, pbb, PanelBf16<1>, PanelBf16<2>, PanelBf16<3>, PanelBf16<4>);
      return true;
    default: return false;
  }
}

void Matmul(const MatmulArgs& a) {
  if (!MatmulPanel(a)) scalar::Matmul(a);
}

}  // namespace ktx::kernels::moe::avx512

namespace ktx::kernels::moe {
namespace {
bool Supports(MoeMatrixFormat f) { return MoeFormatSupported(f); }
int64_t NoScratch(MoeMatrixFormat, int64_t) { return 0; }
}  // namespace

const MoeKernels& MoeKernelsAvx512() {
  static const MoeKernels k = {
      CpuVariant::kAvx512, "avx512",         &Supports, &avx512::Quantize, &avx512::Matmul,
      &NoScratch,          &avx512::SiluMul, nullptr,   nullptr,           nullptr};
  return k;
}

}  // namespace ktx::kernels::moe
