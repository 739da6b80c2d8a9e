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
  // Where the operands come from in the memory cases (set by the caller):
  // kRingItems B items of 16 KiB (a converted chunk, L2-resident), the
  // activation rows of one expert's 64 tokens as the kernel reads them
  // (row stride kActStride: 7168 k plus the group scales), and a large array
  // streamed with software prefetches (as the kernel streams the next
  // chunk's weights from DRAM).
  static constexpr int kRingItems = 16;
  static constexpr int64_t kActStride = 7168 + 56;
  static constexpr int64_t kStreamBytes = int64_t{64} << 20;
  int8_t* b_ring = nullptr;         // kRingItems x 16 KiB
  int8_t* a_rows = nullptr;         // 64 x kActStride
  int8_t* a_tiles = nullptr;        // the same activations tile-major: 1 KiB per A tile
  const uint8_t* stream = nullptr;  // kStreamBytes
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
  // Memory cases: B tiles from the 256 KiB ring instead of two L1 items;
  // A tiles from the expert's activation rows (group slice item % 14, the
  // kernel's stride) instead of one 16 KiB block; prefetcht1 of this many
  // lines of the streamed array per k-step.
  bool b_from_ring = false;
  bool a_from_rows = false;
  int stream_lines = 0;
  // With a_from_rows: the same bytes laid out tile-major ([token block of
  // 16][k-step][16 rows][64 bytes]: every A tile 1 KiB contiguous).
  bool a_tile_major = false;
  // The hint of the stream's prefetches: 0 T0, 1 T1 (as the kernel), 2 T2, 3 NTA.
  int stream_hint = 1;
  // Lines the stream advances per prefetch (2: every other line, leaving the
  // 128-byte pair's other line to the L2 spatial prefetcher).
  int stream_step = 1;
  // Register blocking 4 x 1 instead of 2 x 2: the four C tiles are the 64
  // tokens' four 16-row tiles against one 16-row panel, so that a k-step
  // loads one B tile (from the ring, once, 4 products) and the four A tiles
  // of one group's activations (32 KiB tile-major, L1-resident across the
  // panels); two A and two B registers alternate. Takes b_from_ring,
  // stream_lines, stream_hint and fixup from the fields above.
  bool one_by_four = false;
};

void ConfigureTilesForProbe();
void ReleaseTilesForProbe();
// ns per k-step over `items` items of two 32-token blocks.
double RunProbeLoop(const ProbeCase& pc, ProbeBuffers* bf, int64_t items);
// ns per tdpbssd of a register-only loop (2 x 2 tiles, 4 products per
// iteration) with the C and A tiles configured to `rows` rows (B: 16 x 64);
// with switch_config an ldtilecfg (alternating with the 16-row one) and the
// four A / B tile loads every 8 iterations.
double RunRowsLoop(int rows, bool switch_config, int64_t iters);

}  // namespace ktx::kernels::moe::probe
