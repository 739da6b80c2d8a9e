// Compiled with AMX flags; the caller checks the CPU and the OS permission.
#include <immintrin.h>

#include <cstring>

#include "kernels/cpu/moe/amx_tile_config.h"
#include "tests/kernels/cpu/moe/moe_benchmark_kernels.h"

namespace ktx::kernels::moe::bench {
namespace {

void Configure() { LoadAmxTileConfig(AllTiles16x64()); }

alignas(64) int8_t g_a[16 * 64], g_b[16 * 64];

}  // namespace

int64_t AmxInt8PeakLoop(int64_t iters) {
  Configure();
  std::memset(g_a, 1, sizeof(g_a));
  std::memset(g_b, 2, sizeof(g_b));
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, g_a, 64);
  _tile_loadd(5, g_a, 64);
  _tile_loadd(6, g_b, 64);
  _tile_loadd(7, g_b, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  alignas(64) int32_t c[16 * 16];
  _tile_stored(0, c, 64);
  _tile_release();
  volatile int32_t sink = c[0];
  (void)sink;
  return iters * 4 * 16 * 16 * 64 * 2;
}

int64_t AmxBf16PeakLoop(int64_t iters) {
  Configure();
  std::memset(g_a, 0, sizeof(g_a));
  std::memset(g_b, 0, sizeof(g_b));
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, g_a, 64);
  _tile_loadd(5, g_a, 64);
  _tile_loadd(6, g_b, 64);
  _tile_loadd(7, g_b, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float c[16 * 16];
  _tile_stored(0, c, 64);
  _tile_release();
  volatile float sink = c[0];
  (void)sink;
  return iters * 4 * 16 * 16 * 32 * 2;
}

}  // namespace ktx::kernels::moe::bench
