// The loops of moe_amx_probe (compiled with AMX and AVX-512 flags; the caller
// checks the CPU and the OS permission). See moe_amx_probe.cc.
#include <immintrin.h>

#include <chrono>
#include <cstring>

#include "kernels/cpu/moe/amx_tile_config.h"
#include "tests/kernels/cpu/moe/moe_amx_probe_loops.h"

namespace ktx::kernels::moe::probe {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One converter unit, as the Q4_K tile converter (moe_kernels_amx.cc): one
// 64-byte load of nibbles, ~19 AVX-512 operations, two 64-byte stores (128
// int8 weights).
inline void ConvertUnit(const uint8_t* src, uint8_t* dst, __m512i a, __m512i b) {
  const __m512i m = _mm512_set1_epi16(15);
  const __m512i z = _mm512_load_si512(src);
  const __m512i el = _mm512_and_si512(z, m);
  const __m512i eh = _mm512_and_si512(_mm512_srli_epi16(z, 4), m);
  const __m512i ol = _mm512_and_si512(_mm512_srli_epi16(z, 8), m);
  const __m512i oh = _mm512_srli_epi16(z, 12);
  auto words8 = [&](__m512i e, __m512i o) {
    const __m512i te = _mm512_sub_epi16(_mm512_mullo_epi16(e, a), b);
    const __m512i to = _mm512_sub_epi16(_mm512_mullo_epi16(o, a), b);
    return _mm512_ternarylogic_epi32(_mm512_srli_epi16(te, 8), to, _mm512_set1_epi16(255), 0xE4);
  };
  _mm512_store_si512(dst, words8(el, ol));
  _mm512_store_si512(dst + 64, words8(eh, oh));
}

// The fp32 fix-up of one 32 x 32 block (four 16 x 16 int32 C tiles at c).
void FixUp(const int32_t* c, float* out) {
  const __m512 scale = _mm512_set1_ps(0.5f);
  for (int m = 0; m < 32; ++m) {
    float* o = out + m * 32;
    const int32_t* row = c + 512 * (m / 16) + 16 * (m % 16);
    _mm512_storeu_ps(
        o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(row)), scale, _mm512_loadu_ps(o)));
    _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(row + 256)),
                                             scale, _mm512_loadu_ps(o + 16)));
  }
}

// The four C tiles into the next staging buffer, fixed up now (kNow) or
// left pending for the next block (kDeferred).
void StoreC(const ProbeCase& pc, ProbeBuffers* bf, int* cb, const int32_t** pending) {
  int32_t* c = bf->c[*cb];
  *cb ^= 1;
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  _tile_stored(2, c + 512, 64);
  _tile_stored(3, c + 768, 64);
  if (pc.fixup == ProbeFixup::kNow) FixUp(c, bf->out);
  if (pc.fixup == ProbeFixup::kDeferred) *pending = c;
}

// One k-step of the 4 x 1 blocking with the B tile in register 6 or 7
// (GCC's tile intrinsics take literal register numbers: one function each).
#define KTX_PROBE_KSTEP_4X1(TB)                                                                    \
  inline void KStep4x1B##TB(const int8_t* b, const int8_t* a0, const int8_t* a1, const int8_t* a2, \
                            const int8_t* a3) {                                                    \
    _tile_loadd(TB, b, 64);                                                                        \
    _tile_loadd(4, a0, 64);                                                                        \
    _tile_dpbssd(0, 4, TB);                                                                        \
    _tile_loadd(5, a1, 64);                                                                        \
    _tile_dpbssd(1, 5, TB);                                                                        \
    _tile_loadd(4, a2, 64);                                                                        \
    _tile_dpbssd(2, 4, TB);                                                                        \
    _tile_loadd(5, a3, 64);                                                                        \
    _tile_dpbssd(3, 5, TB);                                                                        \
  }
KTX_PROBE_KSTEP_4X1(6)
KTX_PROBE_KSTEP_4X1(7)
#undef KTX_PROBE_KSTEP_4X1

void StreamLines(const ProbeCase& pc, const uint8_t* stream, int64_t* off) {
  for (int l = 0; l < pc.stream_lines; ++l) {
    const char* line = reinterpret_cast<const char*>(stream + *off);
    switch (pc.stream_hint) {
      case 0: _mm_prefetch(line, _MM_HINT_T0); break;
      case 2: _mm_prefetch(line, _MM_HINT_T2); break;
      case 3: _mm_prefetch(line, _MM_HINT_NTA); break;
      default: _mm_prefetch(line, _MM_HINT_T1); break;
    }
    *off = (*off + 64 * pc.stream_step) % ProbeBuffers::kStreamBytes;
  }
}

// The 4 x 1 loop (ProbeCase::one_by_four): per item two 16-row panels of one
// 512-k group (the ring's 16 KiB item, or the L1 buffer), each 8 k-steps of
// 4 products against the 64 tokens' A tiles of group 0 (tile-major, 4 x 8 KiB).
double RunOneByFourLoop(const ProbeCase& pc, ProbeBuffers* bf, int64_t items) {
  int64_t steps = 0, stream_off = 0;
  int cb = 0;
  const int32_t* pending = nullptr;
  const int8_t* a = bf->a_tiles;  // token tile t, k-step kk: a + (t * 112 + kk) * 1024
  const double t0 = Now();
  for (int64_t it = 0; it < items; ++it) {
    const int8_t* item =
        pc.b_from_ring ? bf->b_ring + (it % ProbeBuffers::kRingItems) * 16384 : bf->b[it & 1];
    for (int panel = 0; panel < 2; ++panel) {
      const int8_t* b = item + 8192 * panel;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int kk = 0; kk < 8; kk += 2, steps += 2) {
        KStep4x1B6(b + 1024 * kk, a + kk * 1024, a + (112 + kk) * 1024, a + (224 + kk) * 1024,
                   a + (336 + kk) * 1024);
        StreamLines(pc, bf->stream, &stream_off);
        if (pc.fixup == ProbeFixup::kDeferred && kk == 0 && pending != nullptr) {
          FixUp(pending, bf->out);
          pending = nullptr;
        }
        KStep4x1B7(b + 1024 * (kk + 1), a + (kk + 1) * 1024, a + (113 + kk) * 1024,
                   a + (225 + kk) * 1024, a + (337 + kk) * 1024);
        StreamLines(pc, bf->stream, &stream_off);
      }
      if (pc.fixup != ProbeFixup::kNone) StoreC(pc, bf, &cb, &pending);
    }
  }
  return (Now() - t0) / static_cast<double>(steps) * 1e9;
}

}  // namespace

void ConfigureTilesForProbe() { LoadAmxTileConfig(AllTiles16x64()); }

void ReleaseTilesForProbe() { _tile_release(); }

double RunProbeLoop(const ProbeCase& pc, ProbeBuffers* bf, int64_t items) {
  if (pc.one_by_four) return RunOneByFourLoop(pc, bf, items);
  const __m512i fa = _mm512_set1_epi16(301), fb = _mm512_set1_epi16(77);
  constexpr int kBlocks = 2;  // 64 tokens: two 32-token blocks over one A slice in L1
  int64_t steps = 0;
  int cb = 0;
  const int32_t* pending = nullptr;
  int64_t stream_off = 0;
  const double t0 = Now();
  for (int64_t it = 0; it < items; ++it) {
    const int cur = static_cast<int>(it & 1);
    const int8_t* b0 =
        pc.b_from_ring ? bf->b_ring + (it % ProbeBuffers::kRingItems) * 16384 : bf->b[cur];
    const int8_t* b1 = b0 + 8192;
    // The converter's output: the B buffer the tiles read for the next item,
    // or a ring the tiles never read.
    uint8_t* dst = pc.convert_into_b ? reinterpret_cast<uint8_t*>(bf->b[cur ^ 1]) : bf->ring;
    int u = 0;
    auto convert = [&](int n) {
      for (int k = 0; k < n; ++k, ++u)
        ConvertUnit(bf->src + 64 * (u & 127), dst + 128 * (u & 127), fa, fb);
    };
    for (int blk = 0; blk < kBlocks; ++blk) {
      if (pc.tiles) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int ks = 0; ks < pc.k_steps_per_store; ++ks, ++steps) {
        const int kk = ks & 7;
        const int quarter = pc.interleave ? pc.units_per_step / 4 : 0;
        if (pc.tiles) {
          const bool tm = pc.a_from_rows && pc.a_tile_major;
          const int64_t a_stride = tm ? 64 : pc.a_from_rows ? ProbeBuffers::kActStride : 512;
          const int8_t* a0 = tm ? bf->a_tiles + (2 * blk * 112 + 8 * (it % 14) + kk) * 1024
                             : pc.a_from_rows
                                 ? bf->a_rows + 32 * blk * a_stride + 512 * (it % 14) + 64 * kk
                                 : bf->a + 64 * kk;
          const int8_t* a1 = tm ? a0 + 112 * 1024 : a0 + 16 * a_stride;
          _tile_loadd(4, a0, a_stride);
          _tile_loadd(6, b0 + 1024 * kk, 64);
          _tile_dpbssd(0, 4, 6);
          convert(quarter);
          _tile_loadd(5, a1, a_stride);
          _tile_dpbssd(2, 5, 6);
          convert(quarter);
          _tile_loadd(7, b1 + 1024 * kk, 64);
          _tile_dpbssd(1, 4, 7);
          convert(quarter);
          _tile_dpbssd(3, 5, 7);
        }
        convert(pc.units_per_step - 3 * quarter);
        StreamLines(pc, bf->stream, &stream_off);
        if (pc.fixup == ProbeFixup::kDeferred && ks == 0 && pending != nullptr) {
          FixUp(pending, bf->out);
          pending = nullptr;
        }
      }
      if (pc.tiles && pc.fixup != ProbeFixup::kNone) StoreC(pc, bf, &cb, &pending);
    }
  }
  return (Now() - t0) / static_cast<double>(steps) * 1e9;
}

double RunRowsLoop(int rows, bool switch_config, int64_t iters) {
  AmxTileConfig cfg = AllTiles16x64();
  for (int t = 0; t < 6; ++t) cfg.rows[t] = static_cast<uint8_t>(rows);  // C 0-3, A 4-5
  const AmxTileConfig full = AllTiles16x64();
  alignas(64) static thread_local int8_t src[16 * 64];
  std::memset(src, 3, sizeof(src));
  LoadAmxTileConfig(cfg);
  _tile_loadd(4, src, 64);
  _tile_loadd(5, src, 64);
  _tile_loadd(6, src, 64);
  _tile_loadd(7, src, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const double t0 = Now();
  for (int64_t i = 0; i < iters; ++i) {
    if (switch_config && (i & 7) == 0) {
      // A configuration load every 8 iterations (32 products), alternating
      // two configurations; it zeroes the tiles, so reload A and B.
      LoadAmxTileConfig((i & 8) != 0 ? full : cfg);
      _tile_loadd(4, src, 64);
      _tile_loadd(5, src, 64);
      _tile_loadd(6, src, 64);
      _tile_loadd(7, src, 64);
    }
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  const double ns = (Now() - t0) / static_cast<double>(4 * iters) * 1e9;
  _tile_stored(0, src, 64);  // keep the products live
  LoadAmxTileConfig(full);
  return ns;
}

}  // namespace ktx::kernels::moe::probe
