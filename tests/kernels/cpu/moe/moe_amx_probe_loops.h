// The loops of moe_amx_probe (moe_amx_probe_loops.cc, compiled with AMX flags).
#pragma once

#include <cstdint>

namespace ktx::kernels::moe::probe {

// Per-thread buffers, all L1/L2-resident (~90 KiB).
struct alignas(64) ProbeBuffers {
  int8_t a[32 * 512];   // activations: 32 tokens x 512 k, row stride 512
  int8_t b[2][16384];   // two B items: 2 panels x 8 k-steps x 1 KiB tiles
  uint8_t src[8192];    // converter input (nibbles)
  uint8_t ring[16384];  // converter output the tiles never read
  int32_t c[2][1024];   // C staging (four 16 x 16 tiles)
  float out[32 * 32];   // fix-up target
};

enum class ProbeFixup { kNone, kStoresOnly, kNow, kDeferred };

// One k-step: 2 x 2 int8 tiles (A tiles from a, B tiles from b[item], 4
// tile loads, 4 tdpbssd) when `tiles`, and `units_per_step` converter units
// (after the four products, or a quarter after each when `interleave`). Every
// k_steps_per_store k-steps the four C tiles are stored and (kNow / kDeferred:
// one block later) fixed up in fp32. Items alternate the two B buffers.
struct ProbeCase {
  const char* name;
  bool tiles = true;
  int units_per_step = 0;
  bool convert_into_b = false;
  bool interleave = false;
  ProbeFixup fixup = ProbeFixup::kNone;
  int k_steps_per_store = 8;
};

void ConfigureTilesForProbe();
void ReleaseTilesForProbe();
// ns per k-step over `items` items of two 32-token blocks.
double RunProbeLoop(const ProbeCase& pc, ProbeBuffers* bf, int64_t items);

}  // namespace ktx::kernels::moe::probe
