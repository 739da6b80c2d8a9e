// The AMX variant: prefill matmuls over amx_int8 weights with AMX int8 tiles;
// everything else (decode on panel16, quantizers, SiLU) is the AVX-512 code.
//
// Blocking: 32 output rows (two 16-row panels) x 32 activation rows per step:
// four int32 C tiles (tmm0-3), two A tiles of activations (tmm4-5, 16 rows x 64
// int8 of Q8K blocks, stride = activation row bytes) and two B tiles of weights
// (tmm6-7, 16 k-groups x 64 bytes, stride 64). Per 256-k block: 4 x 4 tdpbssd,
// then the C tiles are scaled by (weight row scale x activation block scale)
// and accumulated in fp32 into the output rows. k-blocks run outside the
// token blocks, so the pair's B tiles of one k-block (8 KiB) stay in L1 while
// the token blocks pass and only activation tiles stream from L2.
// Not yet measured on AMX hardware (see docs/performance.md).
//
// Built twice: with the AMX flags for the real variant, and (tests only, with
// -DKTX_MOE_AMX_EMULATE and no AMX flags) with scalar tile emulation, so that
// the tile code is checked on machines without AMX (moe_amx_emu_test).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/moe/moe_internal.h"
#include "kernels/cpu/moe/moe_kernels_avx512.h"

#ifdef KTX_MOE_AMX_EMULATE
#define KTX_MOE_AMX_NS amx_emulated
#else
#define KTX_MOE_AMX_NS amx
#endif

namespace ktx::kernels::moe::KTX_MOE_AMX_NS {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

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
#define KTX_TILE_ZERO(t) EmuZero(t)
#define KTX_TILE_LOAD(t, p, s) EmuLoad(t, p, s)
#define KTX_TILE_STORE(t, p, s) EmuStore(t, p, s)
#define KTX_TILE_DPBSSD(c, a, b) EmuDpbssd(c, a, b)
#else
inline void LoadConfig(const TileConfig* c) { _tile_loadconfig(c); }
inline void Release() { _tile_release(); }
// GCC's tile intrinsics paste the tile number into the asm: literals only.
#define KTX_TILE_ZERO(t) _tile_zero(t)
#define KTX_TILE_LOAD(t, p, s) _tile_loadd(t, p, s)
#define KTX_TILE_STORE(t, p, s) _tile_stored(t, p, s)
#define KTX_TILE_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)
#endif

void ConfigureTiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
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

bool Supports(MoeMatrixFormat f) { return MoeFormatSupported(f); }
int64_t NoScratch(MoeMatrixFormat, int64_t) { return 0; }

}  // namespace

void Matmul(const MatmulArgs& a) {
  if (a.format.layout == MoeWeightLayout::kAmxInt8 && a.act_index == nullptr && a.act_padded &&
      a.act_stride % 64 == 0) {
    MatmulTiles(a);
  } else {
    avx512::Matmul(a);
  }
}

}  // namespace ktx::kernels::moe::KTX_MOE_AMX_NS

namespace ktx::kernels::moe {

#ifdef KTX_MOE_AMX_EMULATE
const MoeKernels& MoeKernelsAmxEmulated() {
  static const MoeKernels k = {CpuVariant::kAvx512, "amx-emulated",        &amx_emulated::Supports,
                               &avx512::Quantize,   &amx_emulated::Matmul, &amx_emulated::NoScratch,
                               &avx512::SiluMul};
  return k;
}
#else
const MoeKernels& MoeKernelsAmx() {
  static const MoeKernels k = {CpuVariant::kAmx,  "amx",        &amx::Supports,
                               &avx512::Quantize, &amx::Matmul, &amx::NoScratch,
                               &avx512::SiluMul};
  return k;
}
#endif

}  // namespace ktx::kernels::moe
