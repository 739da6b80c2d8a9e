// File: kernels/cpu/moe/moe_internal.h
//
// Internals shared by the MoE driver (moe.cc), the repacker and the ISA
// variants (moe_kernels_*.cc): activation block formats, panel-layout
// constants (documented in moe_repack.h), scalar block decoding, and the
// per-variant kernel table. Header-only parts carry no ISA flags.
// Thread-safe: plain data and pure functions.
//
// The helpers below are `static inline` on purpose: this header is included by
// translation units compiled with different ISA flags, and a shared (COMDAT)
// out-of-line copy built with AVX-512 could otherwise be picked by the linker
// for the scalar path. ISA translation units must not instantiate shared
// out-of-line code (check: `nm -C moe_kernels_<isa>.cc.o | grep ' W '` is empty).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/common/tensor_type.h"
#include "kernels/cpu/moe/moe_repack.h"
#include "kernels/cpu/x86/cpu_variant.h"

namespace ktx::kernels::moe {

// ---- GGUF block structs (ggml-common.h layouts; GGUF.md section 2) ----
struct GgufQ4K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
struct GgufQ5K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct GgufQ6K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
struct GgufQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
static_assert(sizeof(GgufQ4K) == 144 && sizeof(GgufQ5K) == 176 && sizeof(GgufQ6K) == 210 &&
              sizeof(GgufQ8_0) == 34);

// ---- Activation formats ----
// kQ8K: Q8_K-style blocks of 256 (d = max|x| / 127, q = round(x / d)), with
//   the sums kernels need; pairs with Q4_K/Q5_K/Q6_K and amx_int8 weights.
// kQ8_0: blocks of 32 (float d); pairs with Q8_0 weights.
// kF32: floats rounded to bf16 precision; pairs with BF16 weights.
enum class ActFormat : int { kQ8K = 0, kQ8_0 = 1, kF32 = 2 };

struct alignas(64) ActQ8K {
  int8_t qs[256];
  float d;
  int16_t bsum32[8];         // Σ qs[32j .. 32j+31]
  int32_t neg32_bsum16[16];  // -32 * Σ qs[16j .. 16j+15] (Q6_K's offset)
  uint8_t pad[60 - 16];
};
static_assert(sizeof(ActQ8K) == 384);

struct ActQ8_0 {
  int8_t qs[32];
  float d;
  int32_t neg128_sum;  // -128 * Σ qs (panel Q8_0 stores q + 128)
};
static_assert(sizeof(ActQ8_0) == 40);

static inline ActFormat ActFormatFor(MoeMatrixFormat f) {
  if (f.layout == MoeWeightLayout::kAmxInt8) return ActFormat::kQ8K;
  switch (f.type) {
    case TensorType::kQ8_0: return ActFormat::kQ8_0;
    case TensorType::kBF16: return ActFormat::kF32;
    default: return ActFormat::kQ8K;
  }
}

// The tile activation format (the int8 tile path, see TileMatmul below): k
// int8 values quantized per group of `group` (a multiple of 256 dividing k)
// with d = max|x| / 127 of the group and q = round(x / d), clamped to +-127;
// a row is q[k] at byte 0, then float d[k / group] at byte k, padded to 64.
static inline int64_t TileActRowBytes(int64_t k, int64_t group) {
  return (k + 4 * (k / group) + 63) / 64 * 64;
}

static inline int64_t ActRowBytes(ActFormat fmt, int64_t k) {
  switch (fmt) {
    case ActFormat::kQ8K: return k / 256 * static_cast<int64_t>(sizeof(ActQ8K));
    case ActFormat::kQ8_0: return k / 32 * static_cast<int64_t>(sizeof(ActQ8_0));
    case ActFormat::kF32: return k * 4;
  }
  return 0;
}

// ---- Panel layouts ----
inline constexpr int kPanelRows = 16;

namespace panel {
// Q4_K / Q5_K
inline constexpr int kQ4KD = 0, kQ4KDmin = 32, kQ4KSc = 64, kQ4KM = 192, kQ4KQs = 320;
inline constexpr int kQ4KBytes = 2368;
inline constexpr int kQ5KQh = 2368, kQ5KBytes = 2880;
// Q6_K: per sub-block j of 16 k, its two 64-byte groups of low nibbles
// (Q6KQl(2j), Q6KQl(2j + 1)) and then its 64 bytes of high bits (Q6KQh(j)),
// so that a block's quants are read in address order: one stream, which the
// hardware prefetchers follow (with the low nibbles and the high bits in two
// regions the Zen 4 decode kernel streamed ~10 GB/s without software prefetch).
inline constexpr int kQ6KD = 0, kQ6KSc = 32, kQ6KQ = 288, kQ6KBytes = 3360;
constexpr int Q6KQl(int g) { return kQ6KQ + 192 * (g / 2) + 64 * (g % 2); }
constexpr int Q6KQh(int j) { return kQ6KQ + 192 * j + 128; }
// Q8_0 (k-block 32)
inline constexpr int kQ80D = 0, kQ80Q = 32, kQ80Bytes = 544;
// BF16 (k-block 32)
inline constexpr int kBf16Bytes = 1024;
// amx_int8 (k-block 256)
inline constexpr int kAmxS = 0, kAmxQ = 64, kAmxBytes = 4160;
// tile512 (k-block 512): the tile cache
inline constexpr int kTileK = kTile512Group, kTileQ = 0, kTileS = 16 * kTileK,
                     kTileBytes = kTileS + 64;
}  // namespace panel

// k elements covered by one block of `format` (512, 256 or 32).
static inline int64_t KBlock(MoeMatrixFormat f) {
  if (f.layout == MoeWeightLayout::kAmxInt8) return 256;
  if (f.layout == MoeWeightLayout::kTile512) return panel::kTileK;
  switch (f.type) {
    case TensorType::kQ8_0:
    case TensorType::kBF16: return 32;
    default: return 256;
  }
}

// Bytes of one panel block (16 rows x KBlock) of a panel layout.
static inline int64_t PanelBlockBytes(MoeMatrixFormat f) {
  if (f.layout == MoeWeightLayout::kAmxInt8) return panel::kAmxBytes;
  if (f.layout == MoeWeightLayout::kTile512) return panel::kTileBytes;
  switch (f.type) {
    case TensorType::kQ4_K: return panel::kQ4KBytes;
    case TensorType::kQ5_K: return panel::kQ5KBytes;
    case TensorType::kQ6_K: return panel::kQ6KBytes;
    case TensorType::kQ8_0: return panel::kQ80Bytes;
    case TensorType::kBF16: return panel::kBf16Bytes;
    default: return 0;
  }
}

// Bytes of one GGUF row of k elements.
static inline int64_t GgufRowBytes(TensorType t, int64_t k) {
  switch (t) {
    case TensorType::kQ4_K: return k / 256 * 144;
    case TensorType::kQ5_K: return k / 256 * 176;
    case TensorType::kQ6_K: return k / 256 * 210;
    case TensorType::kQ8_0: return k / 32 * 34;
    case TensorType::kBF16: return k * 2;
    default: return 0;
  }
}

// ---- Scalar helpers ----
static inline float HalfToFloatScalar(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  float out;
  if (exp == 0) {
    out = std::ldexp(static_cast<float>(man), -24);
    uint32_t bits;
    std::memcpy(&bits, &out, 4);
    bits |= sign;
    std::memcpy(&out, &bits, 4);
    return out;
  }
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  std::memcpy(&out, &bits, 4);
  return out;
}

static inline float Bf16Bits(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Rounds to the nearest bf16 value (ties to even), returned as a float.
static inline float RoundToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) return f;  // Inf/NaN unchanged
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// 6-bit scale and min of sub-block j of a Q4_K/Q5_K block (get_scale_min_k4).
static inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// One row's 256-block of a K-quant, decoded to integers:
// value[i] = d * sc[i / sub] * (q[i] - offset) - dmin * m[i / 32].
struct DecodedK {
  float d = 0, dmin = 0;
  uint8_t q[256];
  int sc[16];  // Q4_K/Q5_K: 8 sub-blocks of 32; Q6_K: 16 sub-blocks of 16 (signed)
  int m[8];    // Q4_K/Q5_K mins
};

static inline void DecodeQ4K(const GgufQ4K& b, DecodedK* out) {
  out->d = HalfToFloatScalar(b.d);
  out->dmin = HalfToFloatScalar(b.dmin);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    ScaleMinK4(j, b.scales, &sc, &m);
    out->sc[j] = sc;
    out->m[j] = m;
  }
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      out->q[64 * c + l] = b.qs[32 * c + l] & 15;
      out->q[64 * c + 32 + l] = b.qs[32 * c + l] >> 4;
    }
  }
}

static inline void DecodeQ5K(const GgufQ5K& b, DecodedK* out) {
  out->d = HalfToFloatScalar(b.d);
  out->dmin = HalfToFloatScalar(b.dmin);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    ScaleMinK4(j, b.scales, &sc, &m);
    out->sc[j] = sc;
    out->m[j] = m;
  }
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      const int h_lo = (b.qh[l] >> (2 * c)) & 1;
      const int h_hi = (b.qh[l] >> (2 * c + 1)) & 1;
      out->q[64 * c + l] = static_cast<uint8_t>((b.qs[32 * c + l] & 15) | (h_lo << 4));
      out->q[64 * c + 32 + l] = static_cast<uint8_t>((b.qs[32 * c + l] >> 4) | (h_hi << 4));
    }
  }
}

// Q6_K: q in 0..63, value d * sc[i / 16] * (q - 32).
static inline void DecodeQ6K(const GgufQ6K& b, DecodedK* out) {
  out->d = HalfToFloatScalar(b.d);
  out->dmin = 0;
  for (int j = 0; j < 16; ++j) out->sc[j] = b.scales[j];
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b.ql + 64 * h;
    const uint8_t* qh = b.qh + 32 * h;
    uint8_t* q = out->q + 128 * h;
    for (int l = 0; l < 32; ++l) {
      q[l] = static_cast<uint8_t>((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4));
      q[l + 32] = static_cast<uint8_t>((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4));
      q[l + 64] = static_cast<uint8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
      q[l + 96] = static_cast<uint8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
    }
  }
}

// Panel-layout decoders (the inverse of the repacker): row r (0..15) of the
// panel block at `pb`.
static inline void DecodePanelQ4K(const uint8_t* pb, int r, bool q5, DecodedK* out) {
  uint16_t d, dmin;
  std::memcpy(&d, pb + panel::kQ4KD + 2 * r, 2);
  std::memcpy(&dmin, pb + panel::kQ4KDmin + 2 * r, 2);
  out->d = HalfToFloatScalar(d);
  out->dmin = HalfToFloatScalar(dmin);
  for (int j = 0; j < 8; ++j) {
    out->sc[j] = pb[panel::kQ4KSc + 16 * j + r];
    out->m[j] = pb[panel::kQ4KM + 32 * (j / 2) + 2 * r + (j % 2)];
  }
  for (int g = 0; g < 32; ++g) {
    for (int i = 0; i < 4; ++i) {
      const uint8_t byte = pb[panel::kQ4KQs + 64 * g + 4 * r + i];
      out->q[8 * g + i] = byte & 15;
      out->q[8 * g + 4 + i] = byte >> 4;
    }
  }
  if (q5) {
    for (int j = 0; j < 8; ++j) {
      for (int t = 0; t < 8; ++t) {
        for (int i = 0; i < 4; ++i) {
          const int bit = (pb[panel::kQ5KQh + 64 * j + 4 * r + i] >> t) & 1;
          out->q[32 * j + 4 * t + i] =
              static_cast<uint8_t>(out->q[32 * j + 4 * t + i] | (bit << 4));
        }
      }
    }
  }
}

static inline void DecodePanelQ6K(const uint8_t* pb, int r, DecodedK* out) {
  uint16_t d;
  std::memcpy(&d, pb + panel::kQ6KD + 2 * r, 2);
  out->d = HalfToFloatScalar(d);
  out->dmin = 0;
  for (int j = 0; j < 16; ++j) out->sc[j] = static_cast<int8_t>(pb[panel::kQ6KSc + 16 * j + r]);
  for (int g = 0; g < 32; ++g) {
    for (int i = 0; i < 4; ++i) {
      const uint8_t byte = pb[panel::Q6KQl(g) + 4 * r + i];
      out->q[8 * g + i] = byte & 15;
      out->q[8 * g + 4 + i] = byte >> 4;
    }
  }
  for (int j = 0; j < 16; ++j) {
    for (int t = 0; t < 4; ++t) {
      for (int i = 0; i < 4; ++i) {
        const int hi = (pb[panel::Q6KQh(j) + 4 * r + i] >> (2 * t)) & 3;
        out->q[16 * j + 4 * t + i] = static_cast<uint8_t>(out->q[16 * j + 4 * t + i] | (hi << 4));
      }
    }
  }
}

// Q8_0 panel block (32 k): d and q[32] of row r.
static inline void DecodePanelQ80(const uint8_t* pb, int r, float* d, int8_t* q) {
  uint16_t dh;
  std::memcpy(&dh, pb + panel::kQ80D + 2 * r, 2);
  *d = HalfToFloatScalar(dh);
  for (int t = 0; t < 8; ++t) {
    for (int i = 0; i < 4; ++i) {
      q[4 * t + i] = static_cast<int8_t>(pb[panel::kQ80Q + 64 * t + 4 * r + i] ^ 0x80);
    }
  }
}

// BF16 panel block (32 k): the 32 bf16 bit patterns of row r.
static inline void DecodePanelBf16(const uint8_t* pb, int r, uint16_t* w) {
  for (int t = 0; t < 16; ++t) std::memcpy(w + 2 * t, pb + 64 * t + 4 * r, 4);
}

// amx_int8 panel block (256 k): scale and q[256] of row r.
static inline void DecodePanelAmx(const uint8_t* pb, int r, float* s, int8_t* q) {
  std::memcpy(s, pb + panel::kAmxS + 4 * r, 4);
  for (int t = 0; t < 64; ++t) {
    for (int i = 0; i < 4; ++i) {
      q[4 * t + i] = static_cast<int8_t>(pb[panel::kAmxQ + 64 * t + 4 * r + i]);
    }
  }
}

// The float value of element i of a decoded K-quant block (as ggml computes it).
static inline float DecodedKValue(const DecodedK& b, TensorType type, int i) {
  if (type == TensorType::kQ6_K) {
    return b.d * static_cast<float>(b.sc[i / 16]) * static_cast<float>(b.q[i] - 32);
  }
  return b.d * static_cast<float>(b.sc[i / 32]) * static_cast<float>(b.q[i]) -
         b.dmin * static_cast<float>(b.m[i / 32]);
}

// The amx variant's matmul runs BF16 panel16 weights on AMX bf16 tiles
// (tdpbf16ps) from MatmulArgs::bf16_tile_min_tokens activation rows on (by
// default this many: the crossing measured on the 2-vCPU AMX build machine,
// 4 -> 5 rows), given matmul_scratch_bytes of scratch or the rows as bf16;
// below, and without either, on the AVX-512 BF16 dot products.
inline constexpr int64_t kAmxBf16MinTokens = 5;

// ---- Kernel table ----

// out[t * out_stride + (r - row_begin)] = Σ_i W[r][i] * act_t[i] for rows r in
// [row_begin, row_end) and activation rows t in [0, n_act), where act_t
// starts at act + (act_index ? act_index[t] : t) * act_stride and is stored in
// ActFormatFor(format). Panel layouts need row_begin, row_end multiples of 16.
struct MatmulArgs {
  MoeMatrixFormat format;
  const uint8_t* w = nullptr;  // one expert matrix [n_rows][k] in `format`
  int64_t n_rows = 0;
  int64_t k = 0;
  int64_t row_begin = 0;
  int64_t row_end = 0;
  const uint8_t* act = nullptr;
  int64_t act_stride = 0;  // bytes between activation rows
  // Tile path: bytes between the 64-byte columns of a tile activation row
  // (byte j of row t at TileActByte: act + t * act_stride + (j / 64) *
  // act_kstep_stride + j % 64). 64: each row's bytes in order (rows as
  // quantized); the k-step-major layout of an expert's rows (MoeRun) has
  // act_stride 64 and act_kstep_stride 64 * its row count, so that the 16
  // rows x 64 k of an A tile are 1 KiB in one piece.
  int64_t act_kstep_stride = 64;
  const int32_t* act_index = nullptr;
  int64_t n_act = 0;
  // True when act rows [0, n_act rounded up to 32) are readable (padding
  // rows may hold anything): lets tile kernels load whole tiles.
  bool act_padded = false;
  float* out = nullptr;
  int64_t out_stride = 0;
  uint8_t* scratch = nullptr;  // per-worker, MoeKernels::matmul_scratch_bytes
  int64_t scratch_bytes = 0;
  // Tile path only: activation rows in the tile format with this group.
  int64_t act_group = 0;
  // Tile path only: how the amx kernel schedules the work (every choice gives
  // the same bits; the scalar reference ignores them). tile_phased: convert a
  // chunk of (panel pairs x groups) of at most tile_chunk_bytes int8 weights
  // (tile_chunk_groups groups per chunk, 0: all that fit) into scratch, then
  // run all tiles of all token blocks over it; else the in-loop kernel (the
  // next item converted during the k-steps of the current one).
  // tile_skew: bytes (multiple of 64) added after each scratch buffer so that
  // live buffers are not a multiple of 4 KiB apart. Scratch must hold
  // TileScratchBytes(act_group, tile_phased ? tile_chunk_bytes : 0, tile_skew).
  bool tile_phased = false;
  int64_t tile_chunk_bytes = 0;
  int64_t tile_chunk_groups = 0;
  int64_t tile_skew = 0;
  // Phased kernel: prefetch the next item's B tiles into L1 during the
  // current item's k-steps (tile registers are not renamed, so a tile load
  // from L2 stalls its k-step).
  bool tile_prefetch = false;
  // Phased kernel: lines of weights prefetched into L2 ahead of phase 1's
  // reads (and the next chunk's during phase 2); 0: none.
  int64_t tile_stream_lines = 0;
  // Phased kernel with tile_stream_lines > 0: the bytes [next_w, next_w +
  // next_w_bytes) that this worker's next call will read (hint only; null:
  // unknown). They are prefetched into L2 during the last chunk's tiles, a
  // slice per k-step, so that the next call's conversion does not start cold
  // (a stage-2 call is a single chunk, with no chunk of its own to stream).
  const uint8_t* next_w = nullptr;
  int64_t next_w_bytes = 0;
  // Diagnostics: where non-null the phased kernel adds (atomically) its TSC
  // ticks of phase 1 (conversion) to [0], of phase 2 without the fix-ups to
  // [1] and of the fix-ups to [2].
  int64_t* tile_phase_ticks = nullptr;
  // BF16 weights on the amx variant: the n_act activation rows (after
  // act_index) also as bf16, row t at act_bf16 + t * act_bf16_stride
  // elements, rows up to n_act rounded up to 32 readable, so that the bf16
  // tile kernel need not pack them. Other kernels read `act`.
  const uint16_t* act_bf16 = nullptr;
  int64_t act_bf16_stride = 0;
  // BF16 panel16 weights on the amx variant: bf16 tiles from this many
  // activation rows on, the AVX-512 BF16 dot products below (the plan's
  // MoePlanOptions::bf16_tile_min_tokens; CpuMoeBackend calibrates it).
  int64_t bf16_tile_min_tokens = kAmxBf16MinTokens;
};

// Whether the amx variant's bf16 tiles take `format` (BF16 panel16).
static inline bool Bf16TileFormat(MoeMatrixFormat f) {
  return f.type == TensorType::kBF16 && f.layout == MoeWeightLayout::kPanel16;
}

// n floats of an ActFormat::kF32 row (bf16 values) at src -> their bf16 bits:
// the form of MatmulArgs::act_bf16.
static inline void F32RowToBf16(const uint8_t* src, uint16_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, src + 4 * j, 4);
    dst[j] = static_cast<uint16_t>(bits >> 16);
  }
}

// The int8 tile path (the prefill path of the amx variant). Weights stay in
// their panel16 form (Q4_K, Q5_K, Q6_K, Q8_0): per (row, group of
// `act_group` k) they are converted on the fly to int8 v with one float scale
// s = amax / 127, amax = the largest |value| the row's blocks in the group can
// take (from their scales and mins), so that s * v approximates the GGUF value
// within (0.5 + (0.5 * |q|max + 0.5) / 256) * s (Q4_K: 0.531 s, Q5_K: 0.5625 s,
// Q6_K: 0.5625 s, Q8_0: 0.75 s): v = (A q - B) >> 8 in 16-bit fixed point with
// per-(row, sub-block) factors A, B (TileConvertPanelScalar below is the
// specification).
// Per group the int8 x int8 products are summed exactly in int32 (I), then
//   out[t][r] = fma((float)I, s_r * d_t, out[t][r])
// group after group, starting from 0: every implementation of this contract
// (scalar, AMX, emulated AMX) gives bitwise equal results.
// Activation row t's bytes j (the q[k] then the d[k / group] of the tile
// format) are read at TileActByte(args, t, j) (MatmulArgs::act_kstep_stride:
// rows in order, or k-step-major).
// Requirements: act_padded (rows up to n_act rounded up to 32 are readable),
// row_begin / row_end multiples of 16, k % act_group == 0, scratch of
// TileScratchBytes(act_group, tile_phased ? tile_chunk_bytes : 0, tile_skew)
// bytes (MatmulArgs: the tile_* fields choose the amx kernel's schedule).

static inline const uint8_t* TileActByte(const MatmulArgs& a, int64_t t, int64_t j) {
  return a.act + t * a.act_stride + (j / 64) * a.act_kstep_stride + j % 64;
}

// Whether the tile path takes `format`, and the scalar converter (the
// specification the AVX-512 converters equal bitwise): TileConvertPanelScalar converts 16 rows
// (panel p of the matrix) x `group` k starting at k0 into int8 v[k - k0][r] stored as the B-tile
// rows of the group: row kk (k = k0 + 4kk .. 4kk + 3) is 64 bytes, byte 4r + i = v of row r at k0 +
// 4kk + i; s[r] gets the row scale.
bool TileFormatSupported(MoeMatrixFormat format);
void TileConvertPanelScalar(MoeMatrixFormat format, const uint8_t* w, int64_t k, int64_t panel,
                            int64_t k0, int64_t group, int8_t* tiles, float* s);
// Bytes of per-worker scratch the tile kernels of any variant need: the
// in-loop buffers, plus (chunk_bytes > 0) the phased kernel's chunk of
// TileChunkItems(group, chunk_bytes) items, with `skew` bytes after each buffer.
int64_t TileScratchBytes(int64_t group, int64_t chunk_bytes = 0, int64_t skew = 0);
// Items (one pair of 16-row panels x one group of k: 32 * group int8 bytes) a
// phased chunk of chunk_bytes holds (at least 1).
static inline int64_t TileChunkItems(int64_t group, int64_t chunk_bytes) {
  const int64_t n = chunk_bytes / (32 * group);
  return n > 0 ? n : 1;
}

struct MoeKernels {
  CpuVariant variant;
  const char* name;
  bool (*supports)(MoeMatrixFormat format);
  // Quantizes k floats into `dst` (ActRowBytes(fmt, k) bytes).
  void (*quantize)(ActFormat fmt, const float* x, uint8_t* dst, int64_t k);
  void (*matmul)(const MatmulArgs& args);
  // Per-worker scratch `matmul` needs for a matrix with k columns.
  int64_t (*matmul_scratch_bytes)(MoeMatrixFormat format, int64_t k);
  // h[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u.
  void (*silu_mul)(const float* g, const float* u, float* h, int64_t n);
  // Tile path (null where the variant has none). quantize_tile writes n
  // values of x in the tile format: q[n] to `q`, float d[n / group] to `d`.
  void (*quantize_tile)(const float* x, int8_t* q, float* d, int64_t n, int64_t group);
  // The tile matmul (contract above); args.scratch holds TileScratchBytes.
  void (*tile_matmul)(const MatmulArgs& args);
  // The conversion the tile matmul uses (TileConvertPanelScalar's contract),
  // exposed for tests and benchmarks; null where tile_matmul is.
  void (*tile_convert)(MoeMatrixFormat format, const uint8_t* w, int64_t k, int64_t panel,
                       int64_t k0, int64_t group, int8_t* tiles, float* s);
};

// The table of each variant (moe_kernels_<variant>.cc).
const MoeKernels& MoeKernelsScalar();
const MoeKernels& MoeKernelsAvx2();
const MoeKernels& MoeKernelsAvx512();
const MoeKernels& MoeKernelsAmx();
// The table of `variant` (the caller checks the host supports it).
const MoeKernels& MoeKernelsFor(CpuVariant variant);

// Scalar building blocks shared by the variants (moe_kernels_scalar.cc).
namespace scalar {
void Quantize(ActFormat fmt, const float* x, uint8_t* dst, int64_t k);
void Matmul(const MatmulArgs& args);
void SiluMul(const float* g, const float* u, float* h, int64_t n);
void QuantizeTile(const float* x, int8_t* q, float* d, int64_t n, int64_t group);
void TileMatmul(const MatmulArgs& args);
}  // namespace scalar

}  // namespace ktx::kernels::moe
