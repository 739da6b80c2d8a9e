// File: kernels/cpu/quant/blocks.h
//
// The byte layouts of the GGUF block types ktx computes with, as plain structs
// (ggml-common.h layouts; see ../shared/notes/GGUF.md section 2). A row of n
// elements of type T is n / kBlockElements consecutive blocks, no padding.
// `d`/`dmin` fields are IEEE half bit patterns (HalfToFloat in quant.h) except
// BlockQ8K::d, which is a float. Multi-byte fields are little-endian, as on
// every host ktx runs on. Blocks of 2-byte types need 2-byte alignment (4 for
// BlockQ8K); GGUF tensor data is 32-byte aligned.
//
// Plain data; thread-safe.
#pragma once

#include <cstdint>

namespace ktx::kernels {

// Q4_0: 32 elements; y[j] = ((qs[j] & 15) - 8) * d, y[j + 16] = ((qs[j] >> 4) - 8) * d.
struct BlockQ4_0 {
  static constexpr int kBlockElements = 32;
  uint16_t d;
  uint8_t qs[16];
};

// Q5_0: 32 elements; like Q4_0 with a 5th bit per element in qh (u32 LE, bit j
// for element j) and an offset of 16.
struct BlockQ5_0 {
  static constexpr int kBlockElements = 32;
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[16];
};

// Q8_0: 32 elements; y[j] = qs[j] * d. Also the activation partner of
// Q4_0/Q5_0/Q8_0 weights.
struct BlockQ8_0 {
  static constexpr int kBlockElements = 32;
  uint16_t d;
  int8_t qs[32];
};

// Q4_K: 256 elements in 8 sub-blocks of 32; 6-bit scale and min per sub-block
// packed into `scales`; y = d * sc * q - dmin * m, q in [0, 15].
struct BlockQ4K {
  static constexpr int kBlockElements = 256;
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};

// Q5_K: Q4_K plus a 5th bit per element in qh; q in [0, 31].
struct BlockQ5K {
  static constexpr int kBlockElements = 256;
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};

// Q6_K: 256 elements in 16 sub-blocks of 16; y = d * scales[i / 16] * (q - 32),
// q in [0, 63] split into 4 low bits (ql) and 2 high bits (qh). Note d is last.
struct BlockQ6K {
  static constexpr int kBlockElements = 256;
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};

// Q8_K: activation-side type (never stored in model files): 256 elements,
// y = qs[j] * d with a float d; bsums[k] = sum of qs[16k .. 16k + 15].
struct BlockQ8K {
  static constexpr int kBlockElements = 256;
  float d;
  int8_t qs[256];
  int16_t bsums[16];
};

// IQ4_XS: 256 elements in 8 sub-blocks of 32; 6-bit scale ls per sub-block
// (4 low bits in scales_l, 2 high bits in scales_h), y = d * (ls - 32) *
// kIq4nlValues[q], q in [0, 15].
struct BlockIQ4XS {
  static constexpr int kBlockElements = 256;
  uint16_t d;
  uint16_t scales_h;
  uint8_t scales_l[4];
  uint8_t qs[128];
};

// The non-linear 4-bit codebook of IQ4_NL / IQ4_XS (kvalues_iq4nl).
inline constexpr int8_t kIq4nlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                            1,    13,   25,  38,  53,  69,  89,  113};

static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4K) == 144);
static_assert(sizeof(BlockQ5K) == 176);
static_assert(sizeof(BlockQ6K) == 210);
static_assert(sizeof(BlockQ8K) == 292);
static_assert(sizeof(BlockIQ4XS) == 136);

}  // namespace ktx::kernels
