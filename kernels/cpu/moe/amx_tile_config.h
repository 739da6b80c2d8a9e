// File: kernels/cpu/moe/amx_tile_config.h
//
// The AMX tile configuration (palette 1) every tile loop of ktx uses: all 8
// tiles 16 rows x 64 bytes. Shared by the amx kernels (moe_kernels_amx.cc,
// also built with scalar tile emulation), moe_benchmark's peak loops and
// moe_amx_probe. LoadAmxTileConfig exists only in translation units built
// with the AMX flags (__AMX_TILE__). Header-only; no state.
#pragma once

#include <cstdint>

#ifdef __AMX_TILE__
#include <immintrin.h>
#endif

namespace ktx::kernels::moe {

// The 64-byte operand of ldtilecfg.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(AmxTileConfig) == 64);

// Tiles 0..7: 16 rows of 64 bytes.
inline AmxTileConfig AllTiles16x64() {
  AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  return cfg;
}

#ifdef __AMX_TILE__
// ldtilecfg of `cfg`. GCC 12's _tile_loadconfig tells the compiler it reads
// only a pointer's worth of the config (an "m" operand of type void*), so
// the stores of rows and colsb may be dropped as dead (seen in moe_amx_probe:
// ldtilecfg of a zeroed config, then #UD at the first tile instruction); the
// barrier makes every store of the 64 bytes happen first.
inline void LoadAmxTileConfig(const AmxTileConfig& cfg) {
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}
#endif

}  // namespace ktx::kernels::moe
