// The AMX variant. Three tile kernels; everything else (decode on panel16,
// quantizers, SiLU) is the AVX-512 code.
//
// TileMatmulT: the prefill path over the panel16 weights themselves (the one
// copy the decode kernels read too), contract in moe_internal.h. Work items
// are (group gi of k, pair of 16-row panels), gi outer, so that the
// activation slice of a group (n_act x group bytes) stays in L2 while the
// panel pairs pass. Per item the weights of the two panels are converted to
// int8 B tiles (AVX-512, 16-bit fixed point, TileConvert* below) into one of
// two L1 buffers (2 x 8 KiB for a group of 512), while the tiles of the
// previous item run: the conversion of item i + 1 is spread over the k-steps
// of item i (software pipelining, so the vector ports and the tile unit work
// at the same time), and the weights of item i + 2 are prefetched into L2.
// Per 32-token block: four int32 C tiles (tmm0-3: 32 tokens x 32 rows), A
// tiles of activations (tmm4-5), B tiles of weights (tmm6-7), G / 64 k-steps
// of 4 tdpbssd each, then one store of the C tiles and the fp32 fix-up per
// group (int32 -> float, times weight row scale x activation group scale,
// accumulated into `out`): one fix-up per 8 k-steps (group 512) instead of
// one per 4.
//
// TileMatmulPhasedT (MatmulArgs::tile_phased, the default of MoePlanOptions):
// the same contract and the same bits, in two phases per chunk of (panel
// pairs x groups) sized for L2 (tile_chunk_bytes, 256 KiB by default): first
// the AVX-512 conversion of the whole chunk into per-worker scratch, then the
// tile loop over it, with the fp32 fix-up of each token block deferred behind
// the next block's tile instructions. Reason (docs/performance.md, "Where the
// AMX prefill time goes"): interleaved with the tiles, the conversion cost
// 2.7x what it costs alone, and without it the layer ran at 38 % of the peak
// instead of 13 %. With tile_stream_lines (MoePlanOptions' default 64) a
// prefetch cursor runs that many lines ahead of phase 1's reads and through
// the next chunk's weights during phase 2: one Xeon core converting from DRAM
// without it waits on almost every line (172 ns per 1024 weights against 60
// in L2). The last chunk of a call streams the caller's next call instead
// (MatmulArgs::next_w: a stage-2 call is a single chunk). With
// tile_phase_ticks set it adds its ticks of conversion, tiles and fix-ups
// (moe_benchmark --ktx_phase_ticks). The in-loop kernel stays selectable
// (KTX_AMX_PREFILL=inloop).
// Both place their scratch buffers `tile_skew` bytes off 4 KiB multiples of
// each other (the in-loop kernel's two B buffers were exactly 8 KiB apart, so
// the conversion stores into one aliased the tile loads of the other).
//
// MatmulTiles: the older amx_int8 form (int8 weights stored with a scale per
// (row, 256); a second copy of the weights), kept for comparison.
//
// MatmulBf16Tiles: BF16 experts (panel16 BF16, whose 32-k blocks are tdpbf16ps
// B tiles as they are) from MatmulArgs::bf16_tile_min_tokens activation rows
// on, on bf16 tiles with fp32 accumulation; fewer rows take the AVX-512 BF16
// kernel.
//
// Built twice: with the AMX flags for the real variant, and (tests only, with
// -DKTX_MOE_AMX_EMULATE and no AMX flags) with scalar tile emulation, so that
// the tile code is checked on machines without AMX (moe_amx_emu_test).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/moe/amx_tile_config.h"
#include "kernels/cpu/moe/moe_internal.h"
#include "kernels/cpu/moe/moe_kernels_avx512.h"

#ifdef KTX_MOE_AMX_EMULATE
#define KTX_MOE_AMX_NS amx_emulated
#else
#define KTX_MOE_AMX_NS amx
#endif

namespace ktx::kernels::moe::KTX_MOE_AMX_NS {
namespace {

using TileConfig = AmxTileConfig;

#ifdef KTX_MOE_AMX_EMULATE
// Scalar model of the tile registers (palette 1: 8 tiles of 16 x 64 bytes).
struct EmuTiles {
  TileConfig cfg;
  alignas(64) uint8_t t[8][16 * 64];
};
thread_local EmuTiles g_emu;

inline void LoadConfig(const TileConfig* c) { g_emu.cfg = *c; }
inline void Release() {}
inline void EmuZero(int T) { std::memset(g_emu.t[T], 0, sizeof(g_emu.t[T])); }
inline void EmuLoad(int T, const void* p, int64_t stride) {
  EmuZero(T);
  for (int r = 0; r < g_emu.cfg.rows[T]; ++r) {
    std::memcpy(g_emu.t[T] + 64 * r, static_cast<const uint8_t*>(p) + r * stride,
                g_emu.cfg.colsb[T]);
  }
}
inline void EmuStore(int T, void* p, int64_t stride) {
  for (int r = 0; r < g_emu.cfg.rows[T]; ++r) {
    std::memcpy(static_cast<uint8_t*>(p) + r * stride, g_emu.t[T] + 64 * r, g_emu.cfg.colsb[T]);
  }
}
// C[m][n] += Σ_k Σ_i A[m][4k + i] * B[k][4n + i] (int8 x int8 -> int32).
inline void EmuDpbssd(int C, int A, int B) {
  const int m_rows = g_emu.cfg.rows[C], n_cols = g_emu.cfg.colsb[C] / 4,
            k_groups = g_emu.cfg.colsb[A] / 4;
  for (int m = 0; m < m_rows; ++m) {
    for (int n = 0; n < n_cols; ++n) {
      int32_t c;
      std::memcpy(&c, g_emu.t[C] + 64 * m + 4 * n, 4);
      for (int k = 0; k < k_groups; ++k) {
        for (int i = 0; i < 4; ++i) {
          c += static_cast<int8_t>(g_emu.t[A][64 * m + 4 * k + i]) *
               static_cast<int8_t>(g_emu.t[B][64 * k + 4 * n + i]);
        }
      }
      std::memcpy(g_emu.t[C] + 64 * m + 4 * n, &c, 4);
    }
  }
}
// C[m][n] (fp32) += A[m][2k] * B[k][2n] then += A[m][2k + 1] * B[k][2n + 1]
// (bf16 pairs; each product exact in fp32, each sum rounded), k ascending.
inline void EmuDpbf16ps(int C, int A, int B) {
  const int m_rows = g_emu.cfg.rows[C], n_cols = g_emu.cfg.colsb[C] / 4,
            k_pairs = g_emu.cfg.colsb[A] / 4;
  auto bf16 = [](const uint8_t* p) {
    uint16_t b;
    std::memcpy(&b, p, 2);
    return Bf16Bits(b);
  };
  for (int m = 0; m < m_rows; ++m) {
    for (int n = 0; n < n_cols; ++n) {
      float c;
      std::memcpy(&c, g_emu.t[C] + 64 * m + 4 * n, 4);
      for (int k = 0; k < k_pairs; ++k) {
        for (int i = 0; i < 2; ++i) {
          c +=
              bf16(g_emu.t[A] + 64 * m + 4 * k + 2 * i) * bf16(g_emu.t[B] + 64 * k + 4 * n + 2 * i);
        }
      }
      std::memcpy(g_emu.t[C] + 64 * m + 4 * n, &c, 4);
    }
  }
}
#define KTX_TILE_ZERO(t) EmuZero(t)
#define KTX_TILE_LOAD(t, p, s) EmuLoad(t, p, s)
#define KTX_TILE_STORE(t, p, s) EmuStore(t, p, s)
#define KTX_TILE_DPBSSD(c, a, b) EmuDpbssd(c, a, b)
#define KTX_TILE_DPBF16PS(c, a, b) EmuDpbf16ps(c, a, b)
#else
inline void LoadConfig(const TileConfig* c) { LoadAmxTileConfig(*c); }
inline void Release() { _tile_release(); }
// GCC's tile intrinsics paste the tile number into the asm: literals only.
#define KTX_TILE_ZERO(t) _tile_zero(t)
#define KTX_TILE_LOAD(t, p, s) _tile_loadd(t, p, s)
#define KTX_TILE_STORE(t, p, s) _tile_stored(t, p, s)
#define KTX_TILE_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)
#define KTX_TILE_DPBF16PS(c, a, b) _tile_dpbf16ps(c, a, b)
#endif

void ConfigureTiles() {
  const TileConfig cfg = AllTiles16x64();
  LoadConfig(&cfg);
}

constexpr int64_t kActBlockBytes = sizeof(ActQ8K);  // 384: qs[256] then d at 256

// out[m][0..16 * n_panels) += C[m][..] * (weight row scale * activation block
// scale dx[m]) for the m_valid first of the 32 rows of the four C tiles.
inline void ScaleAccumulate(const int32_t (*c)[16 * 16], const float* sw0, const float* sw1,
                            const float* dx, int n_panels, int m_valid, float* out,
                            int64_t out_stride) {
  const __m512 w0 = _mm512_loadu_ps(sw0);
  const __m512 w1 = n_panels > 1 ? _mm512_loadu_ps(sw1) : _mm512_setzero_ps();
  for (int m = 0; m < m_valid; ++m) {
    const int mt = m / 16, i = m % 16;
    const __m512 d = _mm512_set1_ps(dx[m]);
    float* o = out + m * out_stride;
    _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c[2 * mt] + 16 * i)),
                                        _mm512_mul_ps(w0, d), _mm512_loadu_ps(o)));
    if (n_panels > 1) {
      _mm512_storeu_ps(
          o + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c[2 * mt + 1] + 16 * i)),
                                  _mm512_mul_ps(w1, d), _mm512_loadu_ps(o + 16)));
    }
  }
}

// amx_int8 weights x contiguous, padded Q8K activation rows. Loop order per
// 32-row panel pair: k-blocks outside, 32-token blocks inside, so that the
// pair's B tiles of one k-block (8 KiB) stay in L1 across the token blocks
// and only the activation tiles come from L2; fp32 sums go straight to `out`.
void MatmulTiles(const MatmulArgs& a) {
  const int64_t nb = a.k / 256;
  const int64_t p_begin = a.row_begin / kPanelRows, p_end = a.row_end / kPanelRows;
  ConfigureTiles();
  alignas(64) int32_t c[4][16 * 16];
  float dx[32];
  for (int64_t p0 = p_begin; p0 < p_end; p0 += 2) {
    const int n_panels = p0 + 1 < p_end ? 2 : 1;
    const uint8_t* w0 = a.w + p0 * nb * panel::kAmxBytes;
    const uint8_t* w1 = w0 + nb * panel::kAmxBytes;
    float* out = a.out + (p0 * kPanelRows - a.row_begin);
    for (int64_t m = 0; m < a.n_act; ++m) {
      std::memset(out + m * a.out_stride, 0, sizeof(float) * 16 * n_panels);
    }
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* pb0 = w0 + b * panel::kAmxBytes;
      const uint8_t* pb1 = w1 + b * panel::kAmxBytes;
      for (int64_t m0 = 0; m0 < a.n_act; m0 += 32) {
        const int m_valid = static_cast<int>(std::min<int64_t>(32, a.n_act - m0));
        const uint8_t* act0 = a.act + m0 * a.act_stride;
        const uint8_t* act1 = act0 + 16 * a.act_stride;
        KTX_TILE_ZERO(0);
        KTX_TILE_ZERO(1);
        KTX_TILE_ZERO(2);
        KTX_TILE_ZERO(3);
        for (int ch = 0; ch < 4; ++ch) {
          const int64_t ao = b * kActBlockBytes + 64 * ch;
          KTX_TILE_LOAD(4, act0 + ao, a.act_stride);
          KTX_TILE_LOAD(5, act1 + ao, a.act_stride);
          KTX_TILE_LOAD(6, pb0 + panel::kAmxQ + 1024 * ch, 64);
          KTX_TILE_DPBSSD(0, 4, 6);
          KTX_TILE_DPBSSD(2, 5, 6);
          if (n_panels > 1) {
            KTX_TILE_LOAD(7, pb1 + panel::kAmxQ + 1024 * ch, 64);
            KTX_TILE_DPBSSD(1, 4, 7);
            KTX_TILE_DPBSSD(3, 5, 7);
          }
        }
        KTX_TILE_STORE(0, c[0], 64);
        KTX_TILE_STORE(1, c[1], 64);
        KTX_TILE_STORE(2, c[2], 64);
        KTX_TILE_STORE(3, c[3], 64);
        for (int m = 0; m < m_valid; ++m) {
          std::memcpy(&dx[m], a.act + (m0 + m) * a.act_stride + b * kActBlockBytes + 256, 4);
        }
        ScaleAccumulate(c, reinterpret_cast<const float*>(pb0 + panel::kAmxS),
                        reinterpret_cast<const float*>(pb1 + panel::kAmxS), dx, n_panels, m_valid,
                        out + m0 * a.out_stride, a.out_stride);
      }
    }
  }
  Release();
}

// ---- the tile path: panel16 -> int8 B tiles on the fly ----

inline __m512i Load512(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline __m256i Load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline __m128i Load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// Each dword lane's low 16 bits copied into both of its words.
inline __m512i DupWords(__m512i v) {
  const __m512i idx = _mm512_set4_epi32(0x0d0c0d0c, 0x09080908, 0x05040504, 0x01000100);
  return _mm512_shuffle_epi8(v, idx);
}

// The 16-bit quants of even (e) and odd (o) bytes -> 64 int8 (a * q - b) >> 8
// with a, b the 16-bit factors of each row (DupWords form). The products may
// wrap; a * q - b itself fits int16 (moe_internal.h), so its high byte is the
// result: odd bytes take it in place, even bytes shifted down.
inline __m512i ConvertWords8(__m512i e, __m512i o, __m512i a, __m512i b) {
  const __m512i te = _mm512_sub_epi16(_mm512_mullo_epi16(e, a), b);
  const __m512i to = _mm512_sub_epi16(_mm512_mullo_epi16(o, a), b);
  return _mm512_ternarylogic_epi32(_mm512_srli_epi16(te, 8), to, _mm512_set1_epi16(0x00FF), 0xE4);
}

// 64 bytes of unsigned quants x (byte 4r + i: row r) -> 64 int8.
inline __m512i ConvertBytes8(__m512i x, __m512i a, __m512i b) {
  return ConvertWords8(_mm512_and_si512(x, _mm512_set1_epi16(0x00FF)), _mm512_srli_epi16(x, 8), a,
                       b);
}

// 1 / 0 mask of amax > 0: 127 / amax, else 0.
inline __m512 InvScale(__m512 amax) {
  const __mmask16 pos = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_maskz_div_ps(pos, _mm512_set1_ps(127.0f), amax);
}

inline __m512 U8ToFloat(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }

// Per-format converters. Setup(pb0, nbg, fac, s) reads the nbg panel blocks
// of one panel in the group (pb0 = its first one), writes the row scales s[16]
// and the factor vectors; Unit(pb0, fac, u, dst) converts unit u (128
// weights: 16 rows x 8 k) into two B-tile rows (128 bytes) at dst. Units are in
// k order: unit u covers k = 8u .. 8u + 7 of the group. Bitwise equal to
// TileConvertPanelScalar.
// The tile cache (tile512, moe_repack.h): converted once at load, so a unit is
// a 128-byte copy and Setup reads the stored row scales. Bitwise the bytes the
// converters above produce.
struct ConvCopy {
  static constexpr int64_t kBlockBytes = panel::kTileBytes;
  static constexpr int64_t kUnitsPerBlock = panel::kTileK / 8;

  static void Setup(const uint8_t* pb0, int64_t /*nbg*/, __m512i* /*fac*/, float* s) {
    std::memcpy(s, pb0 + panel::kTileS, 4 * kPanelRows);
  }
  static void Unit(const uint8_t* pb0, const __m512i* /*fac*/, int64_t u, uint8_t* dst) {
    const uint8_t* src = pb0 + panel::kTileQ + 128 * u;  // u < kUnitsPerBlock: one block
    _mm512_storeu_si512(dst, Load512(src));
    _mm512_storeu_si512(dst + 64, Load512(src + 64));
  }
};

template <bool kQ5>
struct ConvQ4K {
  static constexpr int64_t kBlockBytes = kQ5 ? panel::kQ5KBytes : panel::kQ4KBytes;
  static constexpr int64_t kUnitsPerBlock = 32;
  static constexpr float kQMax = kQ5 ? 31.0f : 15.0f;

  static __m512 Mins(const uint8_t* pb, int j) {
    const __m512i w = _mm512_cvtepu16_epi32(Load256(pb + panel::kQ4KM + 32 * (j / 2)));
    const __m512i m =
        (j % 2) ? _mm512_srli_epi32(w, 8) : _mm512_and_si512(w, _mm512_set1_epi32(255));
    return _mm512_cvtepi32_ps(m);
  }

  static void Setup(const uint8_t* pb0, int64_t nbg, __m512i* fac, float* s) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t b = 0; b < nbg; ++b) {
      const uint8_t* pb = pb0 + b * kBlockBytes;
      const __m512 dv = _mm512_cvtph_ps(Load256(pb + panel::kQ4KD));
      const __m512 mv = _mm512_cvtph_ps(Load256(pb + panel::kQ4KDmin));
      for (int j = 0; j < 8; ++j) {
        const __m512 scq =
            _mm512_mul_ps(U8ToFloat(Load128(pb + panel::kQ4KSc + 16 * j)), _mm512_set1_ps(kQMax));
        const __m512 mm = _mm512_mul_ps(mv, Mins(pb, j));
        const __m512 hi = _mm512_fmsub_ps(dv, scq, mm);
        amax = _mm512_max_ps(amax, _mm512_max_ps(_mm512_abs_ps(hi), _mm512_abs_ps(mm)));
      }
    }
    _mm512_storeu_ps(s, _mm512_div_ps(amax, _mm512_set1_ps(127.0f)));
    const __m512 inv = InvScale(amax);
    const __m512 c256 = _mm512_set1_ps(256.0f);
    for (int64_t b = 0; b < nbg; ++b) {
      const uint8_t* pb = pb0 + b * kBlockBytes;
      const __m512 dq = _mm512_mul_ps(_mm512_cvtph_ps(Load256(pb + panel::kQ4KD)), inv);
      const __m512 mq = _mm512_mul_ps(_mm512_cvtph_ps(Load256(pb + panel::kQ4KDmin)), inv);
      for (int j = 0; j < 8; ++j) {
        const __m512 sc = _mm512_mul_ps(U8ToFloat(Load128(pb + panel::kQ4KSc + 16 * j)), c256);
        const __m512 mm = _mm512_mul_ps(Mins(pb, j), c256);
        fac[2 * (8 * b + j)] = DupWords(_mm512_cvtps_epi32(_mm512_mul_ps(dq, sc)));
        fac[2 * (8 * b + j) + 1] = DupWords(
            _mm512_sub_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(mq, mm)), _mm512_set1_epi32(128)));
      }
    }
  }

  static void Unit(const uint8_t* pb0, const __m512i* fac, int64_t u, uint8_t* dst) {
    const int64_t b = u / kUnitsPerBlock;
    const int g = static_cast<int>(u % kUnitsPerBlock), j = g / 4;
    const uint8_t* pb = pb0 + b * kBlockBytes;
    const __m512i z = Load512(pb + panel::kQ4KQs + 64 * g);
    const __m512i a = fac[2 * (8 * b + j)], bb = fac[2 * (8 * b + j) + 1];
    if constexpr (kQ5) {  // bit t of h -> bit 4; t = 2 (g % 4) (lo), t + 1 (hi)
      const __m512i m4 = _mm512_set1_epi8(0x0F);
      const __m512i m10 = _mm512_set1_epi8(0x10);
      const __m512i h = Load512(pb + panel::kQ5KQh + 64 * j);
      const int t = 2 * (g % 4);
      const __m512i hl = t <= 4 ? _mm512_slli_epi16(h, 4 - t) : _mm512_srli_epi16(h, t - 4);
      const __m512i hh = t + 1 <= 4 ? _mm512_slli_epi16(h, 3 - t) : _mm512_srli_epi16(h, t - 3);
      const __m512i lo = _mm512_ternarylogic_epi32(_mm512_and_si512(z, m4), hl, m10, 0xF8);
      const __m512i hi =
          _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(z, 4), m4), hh, m10, 0xF8);
      _mm512_storeu_si512(dst, ConvertBytes8(lo, a, bb));
      _mm512_storeu_si512(dst + 64, ConvertBytes8(hi, a, bb));
    } else {  // the four nibbles of each 16-bit lane straight into words
      const __m512i m = _mm512_set1_epi16(0x000F);
      const __m512i e_lo = _mm512_and_si512(z, m);
      const __m512i e_hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), m);
      const __m512i o_lo = _mm512_and_si512(_mm512_srli_epi16(z, 8), m);
      const __m512i o_hi = _mm512_srli_epi16(z, 12);
      _mm512_storeu_si512(dst, ConvertWords8(e_lo, o_lo, a, bb));
      _mm512_storeu_si512(dst + 64, ConvertWords8(e_hi, o_hi, a, bb));
    }
  }
};

struct ConvQ6K {
  static constexpr int64_t kBlockBytes = panel::kQ6KBytes;
  static constexpr int64_t kUnitsPerBlock = 32;

  static __m512 Scales(const uint8_t* pb, int j) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(Load128(pb + panel::kQ6KSc + 16 * j)));
  }

  static void Setup(const uint8_t* pb0, int64_t nbg, __m512i* fac, float* s) {
    __m512 amax = _mm512_setzero_ps();
    const __m512 c32 = _mm512_set1_ps(32.0f);
    for (int64_t b = 0; b < nbg; ++b) {
      const uint8_t* pb = pb0 + b * kBlockBytes;
      const __m512 dv = _mm512_cvtph_ps(Load256(pb + panel::kQ6KD));
      for (int j = 0; j < 16; ++j) {
        amax = _mm512_max_ps(amax,
                             _mm512_mul_ps(_mm512_abs_ps(_mm512_mul_ps(dv, Scales(pb, j))), c32));
      }
    }
    _mm512_storeu_ps(s, _mm512_div_ps(amax, _mm512_set1_ps(127.0f)));
    const __m512 inv = InvScale(amax);
    const __m512 c256 = _mm512_set1_ps(256.0f);
    for (int64_t b = 0; b < nbg; ++b) {
      const uint8_t* pb = pb0 + b * kBlockBytes;
      const __m512 dq = _mm512_mul_ps(_mm512_cvtph_ps(Load256(pb + panel::kQ6KD)), inv);
      for (int j = 0; j < 16; ++j) {
        const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(dq, _mm512_mul_ps(Scales(pb, j), c256)));
        fac[2 * (16 * b + j)] = DupWords(a);
        fac[2 * (16 * b + j) + 1] =
            DupWords(_mm512_sub_epi32(_mm512_slli_epi32(a, 5), _mm512_set1_epi32(128)));
      }
    }
  }

  static void Unit(const uint8_t* pb0, const __m512i* fac, int64_t u, uint8_t* dst) {
    const int64_t b = u / kUnitsPerBlock;
    const int g = static_cast<int>(u % kUnitsPerBlock), j = g / 2;
    const uint8_t* pb = pb0 + b * kBlockBytes;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i m30 = _mm512_set1_epi8(0x30);
    const __m512i z = Load512(pb + panel::Q6KQl(g));
    const __m512i h = Load512(pb + panel::Q6KQh(j));
    // bits 2t..2t+1 of h -> bits 4..5; t = 2 (g % 2) (lo), t + 1 (hi).
    const __m512i hl = (g % 2) ? h : _mm512_slli_epi16(h, 4);
    const __m512i hh = (g % 2) ? _mm512_srli_epi16(h, 2) : _mm512_slli_epi16(h, 2);
    const __m512i lo = _mm512_ternarylogic_epi32(_mm512_and_si512(z, m4), hl, m30, 0xF8);
    const __m512i hi =
        _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(z, 4), m4), hh, m30, 0xF8);
    const __m512i a = fac[2 * (16 * b + j)], bb = fac[2 * (16 * b + j) + 1];
    _mm512_storeu_si512(dst, ConvertBytes8(lo, a, bb));
    _mm512_storeu_si512(dst + 64, ConvertBytes8(hi, a, bb));
  }
};

struct ConvQ80 {
  static constexpr int64_t kBlockBytes = panel::kQ80Bytes;
  static constexpr int64_t kUnitsPerBlock = 4;

  static void Setup(const uint8_t* pb0, int64_t nbg, __m512i* fac, float* s) {
    __m512 amax = _mm512_setzero_ps();
    const __m512 c128 = _mm512_set1_ps(128.0f);
    for (int64_t b = 0; b < nbg; ++b) {
      const __m512 dv = _mm512_cvtph_ps(Load256(pb0 + b * kBlockBytes + panel::kQ80D));
      amax = _mm512_max_ps(amax, _mm512_mul_ps(_mm512_abs_ps(dv), c128));
    }
    _mm512_storeu_ps(s, _mm512_div_ps(amax, _mm512_set1_ps(127.0f)));
    const __m512 inv = InvScale(amax);
    for (int64_t b = 0; b < nbg; ++b) {
      const __m512 dv = _mm512_cvtph_ps(Load256(pb0 + b * kBlockBytes + panel::kQ80D));
      fac[b] = DupWords(
          _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(dv, inv), _mm512_set1_ps(256.0f))));
    }
  }

  // (a * q + 128) >> 8 for the signed quants of one 64-byte row (stored q + 128).
  static __m512i Row(__m512i z, __m512i a) {
    const __m512i x = _mm512_xor_si512(z, _mm512_set1_epi8(static_cast<char>(0x80)));
    const __m512i e = _mm512_srai_epi16(_mm512_slli_epi16(x, 8), 8);
    const __m512i o = _mm512_srai_epi16(x, 8);
    const __m512i r = _mm512_set1_epi16(128);
    const __m512i te = _mm512_add_epi16(_mm512_mullo_epi16(e, a), r);
    const __m512i to = _mm512_add_epi16(_mm512_mullo_epi16(o, a), r);
    return _mm512_ternarylogic_epi32(_mm512_srli_epi16(te, 8), to, _mm512_set1_epi16(0x00FF), 0xE4);
  }

  static void Unit(const uint8_t* pb0, const __m512i* fac, int64_t u, uint8_t* dst) {
    const int64_t b = u / kUnitsPerBlock;
    const uint8_t* q = pb0 + b * kBlockBytes + panel::kQ80Q + 128 * (u % kUnitsPerBlock);
    _mm512_storeu_si512(dst, Row(Load512(q), fac[b]));
    _mm512_storeu_si512(dst + 64, Row(Load512(q + 64), fac[b]));
  }
};

// Scratch of TileMatmulT and TileMatmulPhasedT (fits TileScratchBytes(group,
// chunk_bytes, skew)). `skew` bytes after each B buffer, the C staging areas
// and before the chunk, so that (skew not a multiple of 4 KiB) the tile loads
// of one buffer do not alias the AVX-512 stores into another in the low 12
// address bits (4K aliasing stalls the loads behind the stores).
struct TileScratch {
  uint8_t* bbuf[2][2];  // [buffer][panel]: group / 4 B-tile rows of 64 bytes
  float* sw[2][2];      // [buffer][panel]: row scales
  __m512i* fac[2];      // [panel]: factors of the item being converted
  int32_t* cst[2];      // C-tile staging, 4 tiles of 16 x 16 int32 each
  // Phased kernel: chunk_items items of 32 * group int8 (panel 0 then panel
  // 1, B-tile rows of 64 bytes), then their row scales (2 x 16 floats each).
  uint8_t* chunk = nullptr;
  float* chunk_sw = nullptr;
  int64_t chunk_items = 0;
};

TileScratch CarveTileScratch(uint8_t* p, int64_t group, int64_t chunk_bytes, int64_t skew) {
  TileScratch t;
  p = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
  for (auto& buf : t.bbuf) {
    for (auto& panel : buf) {
      panel = p;
      p += 16 * group + skew;
    }
  }
  for (auto& buf : t.sw) {
    for (auto& panel : buf) {
      panel = reinterpret_cast<float*>(p);
      p += 64;
    }
  }
  for (auto& f : t.fac) {
    f = reinterpret_cast<__m512i*>(p);
    p += 2 * (group / 256) * 16 * 128;
  }
  for (auto& c : t.cst) {
    c = reinterpret_cast<int32_t*>(p);
    p += 4096 + skew;
  }
  if (chunk_bytes > 0) {
    p += skew;
    t.chunk_items = TileChunkItems(group, chunk_bytes);
    t.chunk = p;
    p += t.chunk_items * 32 * group;
    t.chunk_sw = reinterpret_cast<float*>(p);
  }
  return t;
}

// One k-step of a block of up to 32 tokens: C tiles 0..3 (tokens 0-15 / 16-31
// x panels 0 / 1) += A (act0, act1: 64 k of the activations) x B (b0, b1:
// the pair's two B tiles of 64 k).
inline void TileKStep(const uint8_t* act0, const uint8_t* act1, int64_t act_stride,
                      const uint8_t* b0, const uint8_t* b1, bool two_a, int np) {
  KTX_TILE_LOAD(4, act0, act_stride);
  KTX_TILE_LOAD(6, b0, 64);
  KTX_TILE_DPBSSD(0, 4, 6);
  if (two_a) {
    KTX_TILE_LOAD(5, act1, act_stride);
    KTX_TILE_DPBSSD(2, 5, 6);
  }
  if (np > 1) {
    KTX_TILE_LOAD(7, b1, 64);
    KTX_TILE_DPBSSD(1, 4, 7);
    if (two_a) KTX_TILE_DPBSSD(3, 5, 7);
  }
}

inline void ZeroCTiles() {
  KTX_TILE_ZERO(0);
  KTX_TILE_ZERO(1);
  KTX_TILE_ZERO(2);
  KTX_TILE_ZERO(3);
}

// The four C tiles into c: [tile][16 rows][16] int32, tile t at c + 256 t.
inline void StoreCTiles(int32_t* c) {
  KTX_TILE_STORE(0, c, 64);
  KTX_TILE_STORE(1, c + 256, 64);
  KTX_TILE_STORE(2, c + 512, 64);
  KTX_TILE_STORE(3, c + 768, 64);
}

// The fp32 fix-up of one stored token block (the contract in moe_internal.h):
// out[m][r] = fma(C, s_r * d_m, out[m][r]) for its m_valid tokens and the
// pair's np panels, group gi's activation scales.
struct TileFixup {
  const int32_t* c = nullptr;
  const float* sw[2] = {nullptr, nullptr};  // each panel's 16 row scales
  float* out = nullptr;                     // row m0 of out, column of the pair's first row
  int64_t m0 = 0, gi = 0;
  int m_valid = 0, np = 0;
};

inline void ApplyFixup(const MatmulArgs& a, const TileFixup& f) {
  const __m512 sw0 = _mm512_loadu_ps(f.sw[0]);
  const __m512 sw1 = f.np > 1 ? _mm512_loadu_ps(f.sw[1]) : _mm512_setzero_ps();
  for (int m = 0; m < f.m_valid; ++m) {
    const int mt = m / 16, i = m % 16;
    float sx;
    std::memcpy(&sx, TileActByte(a, f.m0 + m, a.k + 4 * f.gi), 4);
    const __m512 sv = _mm512_set1_ps(sx);
    float* o = f.out + m * a.out_stride;
    _mm512_storeu_ps(
        o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(f.c + 512 * mt + 16 * i)),
                           _mm512_mul_ps(sw0, sv), _mm512_loadu_ps(o)));
    if (f.np > 1) {
      _mm512_storeu_ps(
          o + 16,
          _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(f.c + 512 * mt + 256 + 16 * i)),
                          _mm512_mul_ps(sw1, sv), _mm512_loadu_ps(o + 16)));
    }
  }
}

// Work item `it` of the in-loop and cached kernels (groups outer, panel
// pairs inner): group gi = it / n_pairs of panels p0 and p0 + 1 (the second
// only when < p_end); pb: each panel's first block of the group, panels
// panel_bytes apart, groups group_bytes apart. Past n_items: np = 0.
struct TileItem {
  int64_t gi = 0, p0 = 0;
  int np = 0;
  const uint8_t* pb[2] = {nullptr, nullptr};
};

inline TileItem TileItemAt(const MatmulArgs& a, int64_t it, int64_t n_items, int64_t n_pairs,
                           int64_t panel_bytes, int64_t group_bytes) {
  TileItem x;
  if (it >= n_items) return x;
  const int64_t p_begin = a.row_begin / kPanelRows, p_end = a.row_end / kPanelRows;
  x.gi = it / n_pairs;
  x.p0 = p_begin + 2 * (it % n_pairs);
  x.np = x.p0 + 1 < p_end ? 2 : 1;
  for (int pp = 0; pp < x.np; ++pp) x.pb[pp] = a.w + (x.p0 + pp) * panel_bytes + x.gi * group_bytes;
  return x;
}

// The tile kernels accumulate into out: rows [0, n_act) of the call's columns start at 0.
inline void ZeroOut(const MatmulArgs& a) {
  for (int64_t t = 0; t < a.n_act; ++t) {
    std::memset(a.out + t * a.out_stride, 0, sizeof(float) * (a.row_end - a.row_begin));
  }
}

template <typename Conv>
void TileMatmulT(const MatmulArgs& a) {
  const int64_t group = a.act_group;
  const int64_t n_groups = a.k / group;
  const int64_t kb = KBlock(a.format);
  const int64_t nb = a.k / kb, nbg = group / kb;
  const int64_t panel_bytes = nb * Conv::kBlockBytes;
  const int64_t p_begin = a.row_begin / kPanelRows, p_end = a.row_end / kPanelRows;
  const int64_t n_pairs = (p_end - p_begin + 1) / 2;
  const int64_t n_items = n_groups * n_pairs;
  const int64_t units_per_panel = nbg * Conv::kUnitsPerBlock;  // group / 8
  const int64_t k_steps = group / 64;
  const int64_t n_blocks = (a.n_act + 31) / 32;
  TileScratch ts = CarveTileScratch(a.scratch, group, 0, a.tile_skew);

  ZeroOut(a);
  using Item = TileItem;
  auto item = [&](int64_t it) {
    return TileItemAt(a, it, n_items, n_pairs, panel_bytes, nbg * Conv::kBlockBytes);
  };
  auto setup = [&](const Item& x, int buf) {
    for (int pp = 0; pp < x.np; ++pp) Conv::Setup(x.pb[pp], nbg, ts.fac[pp], ts.sw[buf][pp]);
  };
  // Units [u0, u1) of an item (u < units_per_panel: panel 0, then panel 1).
  auto convert = [&](const Item& x, int buf, int64_t u0, int64_t u1) {
    for (int pp = 0; pp < x.np; ++pp) {
      const int64_t lo = std::max(u0, pp * units_per_panel) - pp * units_per_panel;
      const int64_t hi = std::min(u1, (pp + 1) * units_per_panel) - pp * units_per_panel;
      for (int64_t u = lo; u < hi; ++u) {
        Conv::Unit(x.pb[pp], ts.fac[pp], u, ts.bbuf[buf][pp] + 128 * u);
      }
    }
  };
  // Prefetch (into L2) the 64-byte lines [l0, l1) of an item's weights.
  const int64_t panel_lines = nbg * Conv::kBlockBytes / 64;
  auto prefetch = [&](const Item& x, int64_t l0, int64_t l1) {
    for (int pp = 0; pp < x.np; ++pp) {
      const int64_t lo = std::max(l0, pp * panel_lines) - pp * panel_lines;
      const int64_t hi = std::min(l1, (pp + 1) * panel_lines) - pp * panel_lines;
      for (int64_t l = lo; l < hi; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(x.pb[pp] + 64 * l), _MM_HINT_T1);
      }
    }
  };

  ConfigureTiles();
  Item cur = item(0);
  setup(cur, 0);
  convert(cur, 0, 0, cur.np * units_per_panel);
  for (int64_t it = 0; it < n_items; ++it) {
    const int buf = static_cast<int>(it & 1);
    const int64_t gi = cur.gi, p0 = cur.p0;
    const int np = cur.np;
    const bool has_next = it + 1 < n_items;
    const Item next = has_next ? item(it + 1) : Item{};
    const Item after = it + 2 < n_items ? item(it + 2) : Item{};
    const int64_t next_units = next.np * units_per_panel;
    if (has_next) setup(next, buf ^ 1);
    const int64_t steps = n_blocks * k_steps;
    const int64_t per_step = (next_units + steps - 1) / steps;
    const int64_t pf_per_step = (after.np * panel_lines + steps - 1) / steps;
    int64_t next_u = 0, pf_l = 0;
    const uint8_t* b0 = ts.bbuf[buf][0];
    const uint8_t* b1 = ts.bbuf[buf][1];
    float* out = a.out + (p0 * kPanelRows - a.row_begin);
    int cb = 0;
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t m0 = 32 * blk;
      const int m_valid = static_cast<int>(std::min<int64_t>(32, a.n_act - m0));
      const bool two_a = m_valid > 16;
      const uint8_t* act0 = TileActByte(a, m0, gi * group);
      const uint8_t* act1 = TileActByte(a, m0 + 16, gi * group);
      ZeroCTiles();
      for (int64_t ks = 0; ks < k_steps; ++ks) {
        TileKStep(act0 + ks * a.act_kstep_stride, act1 + ks * a.act_kstep_stride, a.act_stride,
                  b0 + 1024 * ks, b1 + 1024 * ks, two_a, np);
        if (next_u < next_units) {  // the next item's conversion, a slice per k-step
          const int64_t u1 = std::min(next_units, next_u + per_step);
          convert(next, buf ^ 1, next_u, u1);
          next_u = u1;
        }
        if (after.np > 0) {  // and the weights of the one after it
          prefetch(after, pf_l, pf_l + pf_per_step);
          pf_l += pf_per_step;
        }
      }
      int32_t* c = ts.cst[cb];
      cb ^= 1;
      StoreCTiles(c);
      TileFixup f;
      f.c = c;
      f.sw[0] = ts.sw[buf][0];
      f.sw[1] = ts.sw[buf][1];
      f.out = out + m0 * a.out_stride;
      f.m0 = m0;
      f.gi = gi;
      f.m_valid = m_valid;
      f.np = np;
      ApplyFixup(a, f);
    }
    if (has_next) convert(next, buf ^ 1, next_u, next_units);
    cur = next;
  }
  Release();
}

// The phased tile kernel (MatmulArgs::tile_phased). Per chunk of (panel pairs
// x groups), at most ts.chunk_items items of one pair x one group: phase 1
// converts the whole chunk (AVX-512 only, each panel's blocks in address
// order) into scratch; phase 2 runs the tiles over it (groups outer, pairs
// inner, 32-token blocks innermost: a pair's 16 KiB of B tiles stay in L1
// across the token blocks, a group's activation slice across the pairs). No
// conversion store is in flight while the tiles load, and each weight is
// converted once per call whatever the number of tokens. The fp32 fix-up of a
// token block runs after the next block's tile instructions are issued (C
// staging double-buffered), so that it overlaps with the tile unit; the
// fix-ups of each output element still come in group order, so the result is
// bitwise that of the contract (and of TileMatmulT).
template <typename Conv>
void TileMatmulPhasedT(const MatmulArgs& a) {
  const int64_t group = a.act_group;
  const int64_t n_groups = a.k / group;
  const int64_t kb = KBlock(a.format);
  const int64_t nb = a.k / kb, nbg = group / kb;
  const int64_t panel_bytes = nb * Conv::kBlockBytes;
  const int64_t p_begin = a.row_begin / kPanelRows, p_end = a.row_end / kPanelRows;
  const int64_t n_pairs = (p_end - p_begin + 1) / 2;
  const int64_t units_per_panel = nbg * Conv::kUnitsPerBlock;  // group / 8
  const int64_t k_steps = group / 64;
  const int64_t n_blocks = (a.n_act + 31) / 32;
  TileScratch ts =
      CarveTileScratch(a.scratch, group, std::max<int64_t>(a.tile_chunk_bytes, 1), a.tile_skew);
  int64_t gpc = a.tile_chunk_groups > 0 ? std::min(a.tile_chunk_groups, n_groups) : n_groups;
  gpc = std::min(gpc, ts.chunk_items);
  const int64_t ppc = std::max<int64_t>(1, std::min(n_pairs, ts.chunk_items / gpc));

  ZeroOut(a);
  // The fix-up of the last stored token block, deferred (see above).
  TileFixup pend;
  // Streaming prefetch (tile_stream_lines > 0). With whole rows of k per
  // chunk phase 1 reads the call's panels [p_begin, p_end) in address order,
  // so one cursor runs ahead of it: up to `stream` lines past each group slice
  // it converts, and through the next chunk's bytes during phase 2. With the
  // groups split between chunks (k beyond the chunk's reach) phase 1's reads
  // jump between panels; there each slice's successor in phase 1's order is
  // prefetched whole before the slice is converted (and a chunk's first slice
  // itself).
  const int64_t stream = gpc == n_groups ? a.tile_stream_lines : 0;
  const bool slice_stream = a.tile_stream_lines > 0 && gpc < n_groups;
  const int64_t slice_bytes = nbg * Conv::kBlockBytes;
  auto prefetch_slice = [&](const uint8_t* pb) {
    for (int64_t l = 0; l < slice_bytes; l += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(pb + l), _MM_HINT_T1);
    }
  };
  // Offsets from the first panel's first byte.
  const uint8_t* const range_begin = a.w + p_begin * panel_bytes;
  const int64_t range_bytes = (p_end - p_begin) * panel_bytes;
  int64_t pf_cursor = 0;
  auto stream_to = [&](int64_t target) {
    target = std::min(target, range_bytes);
    for (; pf_cursor < target; pf_cursor += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(range_begin + pf_cursor), _MM_HINT_T1);
    }
  };

  const bool ticks = a.tile_phase_ticks != nullptr;
  uint64_t tick[3] = {0, 0, 0};
  uint64_t t_mark = ticks ? __rdtsc() : 0;
  // The pending fix-up; with ticks its time goes to tick[2] and is kept out
  // of the phase it interrupts (t_mark moves past it).
  auto fixup_pending = [&]() {
    if (!ticks) {
      ApplyFixup(a, pend);
      return;
    }
    const uint64_t t0 = __rdtsc();
    ApplyFixup(a, pend);
    const uint64_t dt = __rdtsc() - t0;
    tick[2] += dt;
    t_mark += dt;
  };
  ConfigureTiles();
  int cb = 0;
  for (int64_t pc0 = 0; pc0 < n_pairs; pc0 += ppc) {
    const int64_t pc1 = std::min(n_pairs, pc0 + ppc), npc = pc1 - pc0;
    for (int64_t gc0 = 0; gc0 < n_groups; gc0 += gpc) {
      const int64_t gc1 = std::min(n_groups, gc0 + gpc);
      // Item (pair pi, group gi) of the chunk: slot (gi - gc0) * npc + (pi - pc0),
      // in the order phase 2 reads them.
      auto slot = [&](int64_t pi, int64_t gi) { return (gi - gc0) * npc + (pi - pc0); };
      if (pend.m_valid > 0) {  // it reads the chunk's scales: finish it first
        fixup_pending();
        pend = TileFixup{};
      }
      // Phase 1: convert, each panel's bytes in address order.
      for (int64_t pi = pc0; pi < pc1; ++pi) {
        const int64_t p0 = p_begin + 2 * pi;
        const int np = p0 + 1 < p_end ? 2 : 1;
        for (int pp = 0; pp < np; ++pp) {
          const uint8_t* wp = a.w + (p0 + pp) * panel_bytes;
          for (int64_t gi = gc0; gi < gc1; ++gi) {
            const int64_t sl = slot(pi, gi);
            const uint8_t* pb = wp + gi * slice_bytes;
            uint8_t* dst = ts.chunk + sl * 32 * group + pp * 16 * group;
            if (stream > 0) {
              stream_to((pb - range_begin) + slice_bytes + 64 * stream);
            } else if (slice_stream) {
              if (pi == pc0 && pp == 0 && gi == gc0) prefetch_slice(pb);
              const uint8_t* next = gi + 1 < gc1  ? pb + slice_bytes
                                    : pp + 1 < np ? wp + panel_bytes + gc0 * slice_bytes
                                    : pi + 1 < pc1
                                        ? a.w + (p0 + 2) * panel_bytes + gc0 * slice_bytes
                                        : nullptr;
              if (next != nullptr) prefetch_slice(next);
            }
            Conv::Setup(pb, nbg, ts.fac[0], ts.chunk_sw + 32 * sl + 16 * pp);
            for (int64_t u = 0; u < units_per_panel; ++u)
              Conv::Unit(pb, ts.fac[0], u, dst + 128 * u);
          }
        }
      }
      if (ticks) {
        const uint64_t t = __rdtsc();
        tick[0] += t - t_mark;
        t_mark = t;
      }
      // Phase 2: the tiles; the next chunk's weights stream in meanwhile, a
      // slice per k-step.
      const int64_t next_end = (std::min(p_end, p_begin + 2 * (pc1 + ppc)) - p_begin) * panel_bytes;
      const int64_t phase2_steps = (gc1 - gc0) * npc * n_blocks * k_steps;
      const int64_t stream_per_step =
          stream > 0 && next_end > pf_cursor
              ? ((next_end - pf_cursor) / 64 + phase2_steps - 1) / phase2_steps
              : 0;
      // The last chunk streams the next call's bytes instead (next_w).
      const bool last_chunk = pc1 == n_pairs && gc1 == n_groups;
      const int64_t next_lines =
          last_chunk && a.tile_stream_lines > 0 && a.next_w != nullptr ? a.next_w_bytes / 64 : 0;
      const int64_t next_per_step = (next_lines + phase2_steps - 1) / phase2_steps;
      int64_t next_l = 0;
      for (int64_t gi = gc0; gi < gc1; ++gi) {
        for (int64_t pi = pc0; pi < pc1; ++pi) {
          const int64_t p0 = p_begin + 2 * pi;
          const int np = p0 + 1 < p_end ? 2 : 1;
          const int64_t sl = slot(pi, gi);
          const uint8_t* b0 = ts.chunk + sl * 32 * group;
          const uint8_t* b1 = b0 + 16 * group;
          float* out = a.out + (p0 * kPanelRows - a.row_begin);
          // The next item of the chunk (the next slot in memory) into L1, a
          // slice per k-step.
          const bool pf = a.tile_prefetch && sl + 1 < (gc1 - gc0) * npc;
          const uint8_t* pf_base = b0 + 32 * group;
          const int64_t pf_lines = group / 2;  // 32 * group bytes
          const int64_t pf_per_step = (pf_lines + n_blocks * k_steps - 1) / (n_blocks * k_steps);
          int64_t pf_l = 0;
          for (int64_t blk = 0; blk < n_blocks; ++blk) {
            const int64_t m0 = 32 * blk;
            const int m_valid = static_cast<int>(std::min<int64_t>(32, a.n_act - m0));
            const bool two_a = m_valid > 16;
            const uint8_t* act0 = TileActByte(a, m0, gi * group);
            const uint8_t* act1 = TileActByte(a, m0 + 16, gi * group);
            ZeroCTiles();
            for (int64_t ks = 0; ks < k_steps; ++ks) {
              TileKStep(act0 + ks * a.act_kstep_stride, act1 + ks * a.act_kstep_stride,
                        a.act_stride, b0 + 1024 * ks, b1 + 1024 * ks, two_a, np);
              if (stream_per_step > 0 && pf_cursor < next_end) {
                stream_to(std::min(next_end, pf_cursor + 64 * stream_per_step));
              }
              if (next_l < next_lines) {
                const int64_t l1 = std::min(next_lines, next_l + next_per_step);
                for (; next_l < l1; ++next_l) {
                  _mm_prefetch(reinterpret_cast<const char*>(a.next_w + 64 * next_l), _MM_HINT_T1);
                }
              }
              if (pf && pf_l < pf_lines) {
                const int64_t l1 = std::min(pf_lines, pf_l + pf_per_step);
                for (; pf_l < l1; ++pf_l) {
                  _mm_prefetch(reinterpret_cast<const char*>(pf_base + 64 * pf_l), _MM_HINT_T0);
                }
              }
            }
            int32_t* c = ts.cst[cb];
            cb ^= 1;
            StoreCTiles(c);
            if (pend.m_valid > 0) fixup_pending();
            pend.c = c;
            pend.sw[0] = ts.chunk_sw + 32 * sl;
            pend.sw[1] = ts.chunk_sw + 32 * sl + 16;
            pend.out = out + m0 * a.out_stride;
            pend.m0 = m0;
            pend.gi = gi;
            pend.m_valid = m_valid;
            pend.np = np;
          }
        }
      }
      if (ticks) {
        const uint64_t t = __rdtsc();
        tick[1] += t - t_mark;
        t_mark = t;
      }
    }
  }
  if (pend.m_valid > 0) fixup_pending();
  if (ticks) {
    for (int i = 0; i < 3; ++i) {
      __atomic_fetch_add(a.tile_phase_ticks + i, static_cast<int64_t>(tick[i]), __ATOMIC_RELAXED);
    }
  }
  Release();
}

// The tile path over a tile cache (tile512), tiles loaded straight from it:
// no conversion and no copy. Items (group of 512 k, pair of 16-row panels)
// with groups outer (a group's activation slice stays in L1/L2 across the
// pairs), 32-token blocks inner; during an item's k-steps the blocks of the
// item after the next one are prefetched into L2, a slice per k-step, so that
// the tile loads find them there (tile registers are not renamed: a load from
// DRAM stalls the tile unit). Prefetching into L1 as well was slower on the
// H200 machine (5.8 against 6.8 TOPS for the layer at 2048 tokens: the line
// fill buffers and L1 are shared with the activation tiles), and so was the
// order with pairs outer (6.2; 6.7 with an L1 prefetch of the next item). The fp32 fix-up of a
// token block runs after the next block's tiles are issued (C staging double-buffered), in group
// order per output element: bitwise the contract, as the other kernels.
void TileMatmulCached(const MatmulArgs& a) {
  constexpr int64_t group = panel::kTileK;
  const int64_t n_groups = a.k / group;
  const int64_t panel_bytes = n_groups * panel::kTileBytes;
  const int64_t p_begin = a.row_begin / kPanelRows, p_end = a.row_end / kPanelRows;
  const int64_t n_pairs = (p_end - p_begin + 1) / 2;
  const int64_t n_items = n_groups * n_pairs;
  constexpr int64_t k_steps = group / 64;
  const int64_t n_blocks = (a.n_act + 31) / 32;
  TileScratch ts = CarveTileScratch(a.scratch, group, 0, a.tile_skew);
  ZeroOut(a);
  using Item = TileItem;
  auto item = [&](int64_t it) {
    return TileItemAt(a, it, n_items, n_pairs, panel_bytes, panel::kTileBytes);
  };
  constexpr int64_t kLines = (panel::kTileBytes + 63) / 64;  // 129 lines per panel block
  // Lines [l0, l1) of both panels' blocks of an item, into L2.
  auto prefetch = [&](const Item& x, int64_t l0, int64_t l1) {
    for (int pp = 0; pp < x.np; ++pp) {
      const char* base = reinterpret_cast<const char*>(x.pb[pp]);
      for (int64_t l = l0; l < l1 && l < kLines; ++l) _mm_prefetch(base + 64 * l, _MM_HINT_T1);
    }
  };
  TileFixup pend;  // the last stored token block's fix-up, deferred

  ConfigureTiles();
  const int64_t steps = n_blocks * k_steps;
  const int64_t pf_per_step = (kLines + steps - 1) / steps;
  Item cur = item(0);
  Item next = item(1);
  prefetch(cur, 0, kLines);
  prefetch(next, 0, kLines);
  int cb = 0;
  for (int64_t it = 0; it < n_items; ++it) {
    const Item after = item(it + 2);
    const uint8_t* b0 = cur.pb[0];
    const uint8_t* b1 = cur.pb[1];
    float* out = a.out + (cur.p0 * kPanelRows - a.row_begin);
    int64_t pf_l = 0;
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t m0 = 32 * blk;
      const int m_valid = static_cast<int>(std::min<int64_t>(32, a.n_act - m0));
      const bool two_a = m_valid > 16;
      const uint8_t* act0 = TileActByte(a, m0, cur.gi * group);
      const uint8_t* act1 = TileActByte(a, m0 + 16, cur.gi * group);
      ZeroCTiles();
      for (int64_t ks = 0; ks < k_steps; ++ks) {
        TileKStep(act0 + ks * a.act_kstep_stride, act1 + ks * a.act_kstep_stride, a.act_stride,
                  b0 + 1024 * ks, b1 + 1024 * ks, two_a, cur.np);
        if (pf_l < kLines) {
          prefetch(after, pf_l, pf_l + pf_per_step);
          pf_l += pf_per_step;
        }
      }
      int32_t* c = ts.cst[cb];
      cb ^= 1;
      StoreCTiles(c);
      if (pend.m_valid > 0) ApplyFixup(a, pend);
      pend.c = c;
      pend.sw[0] = reinterpret_cast<const float*>(b0 + panel::kTileS);
      pend.sw[1] = cur.np > 1 ? reinterpret_cast<const float*>(b1 + panel::kTileS) : nullptr;
      pend.out = out + m0 * a.out_stride;
      pend.m0 = m0;
      pend.gi = cur.gi;
      pend.m_valid = m_valid;
      pend.np = cur.np;
    }
    cur = next;
    next = after;
  }
  if (pend.m_valid > 0) ApplyFixup(a, pend);
  Release();
}

bool Supports(MoeMatrixFormat f) { return MoeFormatSupported(f); }

// ---- BF16 experts: AMX bf16 tiles over the panel16 BF16 weights ----
// A panel16 BF16 block (32 k x 16 rows: group t holds rows 0..15's pair
// (2t, 2t + 1), 4 bytes each) is exactly a tdpbf16ps B tile (16 rows of 64
// bytes). The activations (kF32 rows whose values are bf16 already, so their
// top halves are exact) are packed per block of 32 tokens into scratch as bf16
// A rows [32][k]; per pair of panels four fp32 C tiles (32 tokens x 32 rows)
// run over all of k and are written to `out`. Products of bf16 values are
// exact in fp32; the tile unit sums them in its own order (the avx512 and
// scalar kernels in theirs): the results agree to fp32 rounding, not bitwise.
constexpr int kBf16TileTokens = 32;

int64_t MatmulScratch(MoeMatrixFormat f, int64_t k) {
  return Bf16TileFormat(f) ? kBf16TileTokens * k * 2 : 0;
}

// Rows [m0, m0 + m_valid) of the activations as bf16 into dst [32][k]; rows
// past m_valid zero.
void PackBf16Rows(const MatmulArgs& a, int64_t m0, int m_valid, uint16_t* dst) {
  for (int m = 0; m < kBf16TileTokens; ++m) {
    uint16_t* d = dst + m * a.k;
    if (m >= m_valid) {
      std::memset(d, 0, static_cast<size_t>(a.k) * 2);
      continue;
    }
    const int64_t row = a.act_index != nullptr ? a.act_index[m0 + m] : m0 + m;
    const float* src = reinterpret_cast<const float*>(a.act + row * a.act_stride);
    for (int64_t i = 0; i < a.k; i += 16) {
      const __m512i v = _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(src + i)), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtepi32_epi16(v));
    }
  }
}

// Blocks (1 KiB per panel) of a panel pair's weights prefetched ahead of the
// bf16 tile loads. One core streaming 4096 x 7168 BF16 rows on the H200
// machine's Xeon (2026-11-29): 1-4 tokens 21 GB/s with it, 17-19 without;
// 32 tokens 12-16 against 8-11 (docs/performance.md, "Streaming the converted
// weights").
constexpr int64_t kBf16StreamBlocks = 8;

// With a.act_bf16 the rows are read from there as they are (no packing),
// panel pairs outside and token blocks inside, so that a pair's weights (2 x
// 16 rows x k bf16) stay in L2 across the token blocks; packing per call
// keeps token blocks outside (one block's rows packed at a time).
void MatmulBf16Tiles(const MatmulArgs& a) {
  const int64_t nb = a.k / 32;
  const int64_t p_begin = a.row_begin / kPanelRows, p_end = a.row_end / kPanelRows;
  const bool packed = a.act_bf16 != nullptr;
  uint16_t* pack = reinterpret_cast<uint16_t*>(a.scratch);
  const int64_t row_elems = packed ? a.act_bf16_stride : a.k;
  const int64_t lda = row_elems * 2;
  ConfigureTiles();
  alignas(64) float c[4][16 * 16];
  // Tokens [m0, m0 + 32) (rows from act0) x the panel pair at p0; `stream`:
  // prefetch the pair's weights kBf16StreamBlocks blocks ahead into L2 (the
  // first pass over a pair reads them from DRAM, and a tile load that misses
  // stalls its product).
  auto block = [&](int64_t m0, int64_t p0, const uint16_t* act0, bool stream) {
    const int m_valid = static_cast<int>(std::min<int64_t>(kBf16TileTokens, a.n_act - m0));
    const bool two = m_valid > 16;  // the second A tile holds tokens
    const uint16_t* act1 = act0 + 16 * row_elems;
    const int n_panels = p0 + 1 < p_end ? 2 : 1;
    const uint8_t* w0 = a.w + p0 * nb * panel::kBf16Bytes;
    const uint8_t* w1 = w0 + nb * panel::kBf16Bytes;
    KTX_TILE_ZERO(0);
    KTX_TILE_ZERO(1);
    KTX_TILE_ZERO(2);
    KTX_TILE_ZERO(3);
    for (int64_t b = 0; b < nb; ++b) {
      if (stream && b + kBf16StreamBlocks < nb) {
        for (int pn = 0; pn < n_panels; ++pn) {
          const char* pf = reinterpret_cast<const char*>(
              (pn == 0 ? w0 : w1) + (b + kBf16StreamBlocks) * panel::kBf16Bytes);
          for (int l = 0; l < panel::kBf16Bytes / 64; ++l) _mm_prefetch(pf + 64 * l, _MM_HINT_T1);
        }
      }
      KTX_TILE_LOAD(4, act0 + 32 * b, lda);
      KTX_TILE_LOAD(6, w0 + b * panel::kBf16Bytes, 64);
      KTX_TILE_DPBF16PS(0, 4, 6);
      if (two) {
        KTX_TILE_LOAD(5, act1 + 32 * b, lda);
        KTX_TILE_DPBF16PS(2, 5, 6);
      }
      if (n_panels > 1) {
        KTX_TILE_LOAD(7, w1 + b * panel::kBf16Bytes, 64);
        KTX_TILE_DPBF16PS(1, 4, 7);
        if (two) KTX_TILE_DPBF16PS(3, 5, 7);
      }
    }
    KTX_TILE_STORE(0, c[0], 64);
    KTX_TILE_STORE(1, c[1], 64);
    KTX_TILE_STORE(2, c[2], 64);
    KTX_TILE_STORE(3, c[3], 64);
    float* out = a.out + (p0 * kPanelRows - a.row_begin);
    for (int m = 0; m < m_valid; ++m) {
      const int mt = m / 16, i = m % 16;
      float* o = out + (m0 + m) * a.out_stride;
      std::memcpy(o, c[2 * mt] + 16 * i, 64);
      if (n_panels > 1) std::memcpy(o + 16, c[2 * mt + 1] + 16 * i, 64);
    }
  };
  if (packed) {
    for (int64_t p0 = p_begin; p0 < p_end; p0 += 2) {
      for (int64_t m0 = 0; m0 < a.n_act; m0 += kBf16TileTokens) {
        block(m0, p0, a.act_bf16 + m0 * row_elems, m0 == 0);
      }
    }
  } else {
    for (int64_t m0 = 0; m0 < a.n_act; m0 += kBf16TileTokens) {
      PackBf16Rows(a, m0, static_cast<int>(std::min<int64_t>(kBf16TileTokens, a.n_act - m0)), pack);
      for (int64_t p0 = p_begin; p0 < p_end; p0 += 2) block(m0, p0, pack, true);
    }
  }
  Release();
}

}  // namespace

template <typename Conv>
void TileConvertT(MoeMatrixFormat format, const uint8_t* w, int64_t k, int64_t panel, int64_t k0,
                  int64_t group, int8_t* tiles, float* s) {
  const int64_t kb = KBlock(format);
  const int64_t nbg = group / kb;
  __m512i fac[2 * 16 * 4];  // group <= 1024: <= 64 sub-blocks
  const uint8_t* pb0 = w + (panel * (k / kb) + k0 / kb) * Conv::kBlockBytes;
  Conv::Setup(pb0, nbg, fac, s);
  for (int64_t u = 0; u < nbg * Conv::kUnitsPerBlock; ++u) {
    Conv::Unit(pb0, fac, u, reinterpret_cast<uint8_t*>(tiles) + 128 * u);
  }
}

void TileConvert(MoeMatrixFormat format, const uint8_t* w, int64_t k, int64_t panel, int64_t k0,
                 int64_t group, int8_t* tiles, float* s) {
  switch (format.type) {
    case TensorType::kQ4_K:
      TileConvertT<ConvQ4K<false>>(format, w, k, panel, k0, group, tiles, s);
      break;
    case TensorType::kQ5_K:
      TileConvertT<ConvQ4K<true>>(format, w, k, panel, k0, group, tiles, s);
      break;
    case TensorType::kQ6_K: TileConvertT<ConvQ6K>(format, w, k, panel, k0, group, tiles, s); break;
    case TensorType::kQ8_0: TileConvertT<ConvQ80>(format, w, k, panel, k0, group, tiles, s); break;
    default: break;
  }
}

void TileMatmul(const MatmulArgs& a) {
  if (a.format.layout == MoeWeightLayout::kTile512) {
    if (a.act_group != panel::kTileK) return;  // the driver checks this at Begin
    if (a.tile_phased) {
      TileMatmulCached(a);
    } else {
      TileMatmulT<ConvCopy>(a);
    }
    return;
  }
  if (a.tile_phased) {
    switch (a.format.type) {
      case TensorType::kQ4_K: TileMatmulPhasedT<ConvQ4K<false>>(a); break;
      case TensorType::kQ5_K: TileMatmulPhasedT<ConvQ4K<true>>(a); break;
      case TensorType::kQ6_K: TileMatmulPhasedT<ConvQ6K>(a); break;
      case TensorType::kQ8_0: TileMatmulPhasedT<ConvQ80>(a); break;
      default: break;  // not TileFormatSupported: the driver never calls it
    }
    return;
  }
  switch (a.format.type) {
    case TensorType::kQ4_K: TileMatmulT<ConvQ4K<false>>(a); break;
    case TensorType::kQ5_K: TileMatmulT<ConvQ4K<true>>(a); break;
    case TensorType::kQ6_K: TileMatmulT<ConvQ6K>(a); break;
    case TensorType::kQ8_0: TileMatmulT<ConvQ80>(a); break;
    default: break;  // not TileFormatSupported: the driver never calls it
  }
}

void Matmul(const MatmulArgs& a) {
  if (a.format.layout == MoeWeightLayout::kAmxInt8 && a.act_index == nullptr && a.act_padded &&
      a.act_stride % 64 == 0) {
    MatmulTiles(a);
  } else if (Bf16TileFormat(a.format) && a.n_act >= a.bf16_tile_min_tokens &&
             (a.act_bf16 != nullptr || a.scratch_bytes >= MatmulScratch(a.format, a.k))) {
    MatmulBf16Tiles(a);
  } else {
    avx512::Matmul(a);
  }
}

}  // namespace ktx::kernels::moe::KTX_MOE_AMX_NS

namespace ktx::kernels::moe {

#ifdef KTX_MOE_AMX_EMULATE
const MoeKernels& MoeKernelsAmxEmulated() {
  static const MoeKernels k = {CpuVariant::kAvx512,       "amx-emulated",
                               &amx_emulated::Supports,   &avx512::Quantize,
                               &amx_emulated::Matmul,     &amx_emulated::MatmulScratch,
                               &avx512::SiluMul,          &avx512::QuantizeTile,
                               &amx_emulated::TileMatmul, &amx_emulated::TileConvert};
  return k;
}
#else
const MoeKernels& MoeKernelsAmx() {
  static const MoeKernels k = {CpuVariant::kAmx, "amx",
                               &amx::Supports,   &avx512::Quantize,
                               &amx::Matmul,     &amx::MatmulScratch,
                               &avx512::SiluMul, &avx512::QuantizeTile,
                               &amx::TileMatmul, &amx::TileConvert};
  return k;
}
#endif

}  // namespace ktx::kernels::moe
