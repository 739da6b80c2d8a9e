// File: kernels/cuda/gemv_decode.cuh
//
// The per-element decoding of the quantized GEMV (gemv.cu): DecodePiece<T>
// expands 8 consecutive weights of a tile of GGUF blocks with the float
// operations of dequant.cu / kernels/cpu/quant DequantizeRow. Host and
// device code (__host__ __device__), so that the decoding is tested
// bit for bit against DequantizeRow on machines without a GPU
// (tests/kernels/cuda/gemv_test.cc, GemvDecode.*). Included by gemv.cu and
// that test only.
//
// Tile contract: `tile` points at the first byte of a block; blocks follow
// without padding; `tile` is 2-byte aligned (16-byte aligned for Q4_K and
// Q5_K, whose 8-byte quant loads need it); e % 8 == 0.
//
// Thread-safety: pure functions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "kernels/common/tensor_type.h"

#define KTX_GEMV_HD __host__ __device__
#ifdef __CUDACC__
#define KTX_GEMV_UNROLL _Pragma("unroll")
#else
#define KTX_GEMV_UNROLL
#endif

namespace ktx::kernels::cuda::gemv_internal {

KTX_GEMV_HD constexpr int BlockElems(TensorType t) {
  switch (t) {
    case TensorType::kQ4_K:
    case TensorType::kQ5_K:
    case TensorType::kQ6_K:
    case TensorType::kIQ4_XS: return 256;
    case TensorType::kQ4_0:
    case TensorType::kQ5_0:
    case TensorType::kQ8_0: return 32;
    default: return 1;  // BF16, F16
  }
}

KTX_GEMV_HD constexpr int BlockBytes(TensorType t) {
  switch (t) {
    case TensorType::kQ4_K: return 144;
    case TensorType::kQ5_K: return 176;
    case TensorType::kQ6_K: return 210;
    case TensorType::kIQ4_XS: return 136;
    case TensorType::kQ4_0: return 18;
    case TensorType::kQ5_0: return 22;
    case TensorType::kQ8_0: return 34;
    default: return 2;  // BF16, F16
  }
}

// Rounded F32 product / difference that the compiler cannot contract into
// an FMA (the CPU reference rounds each one).
KTX_GEMV_HD inline float MulRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  volatile float p = a * b;
  return p;
#endif
}
KTX_GEMV_HD inline float SubRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  volatile float p = a - b;
  return p;
#endif
}
KTX_GEMV_HD inline float BitsToFloat(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
// IEEE half bits to float (exact).
KTX_GEMV_HD inline float HalfToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 31u;
  const uint32_t man = h & 1023u;
  if (exp == 31) return BitsToFloat(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return BitsToFloat(sign | ((exp + 112) << 23) | (man << 13));
  // Subnormal or zero: man * 2^-24, exact in float.
  const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
  return sign != 0 ? -v : v;
}

// Shared-memory reads of a tile: blocks are only 2-byte aligned for most
// types, so multi-byte fields are assembled from 16-bit loads.
KTX_GEMV_HD inline uint32_t LdU16(const uint8_t* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}
KTX_GEMV_HD inline uint32_t LdU32(const uint8_t* p) {  // p 2-byte aligned
  return LdU16(p) | (LdU16(p + 2) << 16);
}
// Byte j of the 8 bytes (lo, hi).
KTX_GEMV_HD inline uint32_t ByteOf(uint32_t lo, uint32_t hi, int j) {
  return ((j < 4 ? lo : hi) >> (8 * (j & 3))) & 0xffu;
}

// __byte_perm (host: the same selection, selectors 0..7 without sign mode).
KTX_GEMV_HD inline uint32_t BytePerm(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, sel);
#else
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    r |= static_cast<uint32_t>((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  }
  return r;
#endif
}

// Byte j of `word` (an unsigned value u < 256) minus `offset`, exactly, as a
// float: one byte permute builds the float 2^23 + u, one subtraction of
// 2^23 + offset leaves u - offset (an integer, exact).
KTX_GEMV_HD inline float ByteMinus(uint32_t word, int j, float big_plus_offset) {
  return SubRn(BitsToFloat(BytePerm(word, 0x4B000000u, 0x7540u | static_cast<uint32_t>(j))),
               big_plus_offset);
}

// Exact int -> float for small magnitudes without the slow I2F unit: the
// float 2^23 + u has u in its low mantissa bits.
KTX_GEMV_HD inline float SmallUintToFloat(uint32_t u) {  // u < 2^23
  return SubRn(BitsToFloat(0x4B000000u | u), 8388608.0f);
}
KTX_GEMV_HD inline float SmallIntToFloat(int q) {  // -128 <= q < 2^22
  return SubRn(BitsToFloat(0x4B000000u | static_cast<uint32_t>(q + 128)), 8388736.0f);
}

// kIq4nlValues as two 64-bit words (byte i = value i), read without memory.
KTX_GEMV_HD inline int Iq4nl(uint32_t q) {
  constexpr uint64_t kLo = 0xF6EADDCFBFAD9881ull;  // -127 -104 -83 -65 -49 -35 -22 -10
  constexpr uint64_t kHi = 0x7159453526190D01ull;  //  1 13 25 38 53 69 89 113
  const uint64_t word = q < 8 ? kLo : kHi;
  return static_cast<int8_t>(static_cast<uint8_t>(word >> (8 * (q & 7))));
}

KTX_GEMV_HD inline void UnpackScaleMinGemv(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// The 8 weights at elements e .. e + 7 of a tile (e % 8 == 0; the tile
// starts at a block boundary), with dequant.cu's float operations.
template <TensorType T>
KTX_GEMV_HD inline void DecodePiece(const uint8_t* tile, int e, float (&w)[8]) {
  if constexpr (T == TensorType::kBF16) {
    const uint8_t* p = tile + 2 * e;
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) w[j] = BitsToFloat(LdU16(p + 2 * j) << 16);
  } else if constexpr (T == TensorType::kF16) {
    const uint8_t* p = tile + 2 * e;
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) w[j] = HalfToF32(static_cast<uint16_t>(LdU16(p + 2 * j)));
  } else if constexpr (T == TensorType::kQ4_0) {
    const uint8_t* b = tile + (e >> 5) * 18;
    const int o = e & 31;
    const float d = HalfToF32(static_cast<uint16_t>(LdU16(b)));
    const uint8_t* qs = b + 2 + (o & 15);
    const int shift = o < 16 ? 0 : 4;
    const uint32_t lo = (LdU32(qs) >> shift) & 0x0F0F0F0Fu;
    const uint32_t hi = (LdU32(qs + 4) >> shift) & 0x0F0F0F0Fu;
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) w[j] = MulRn(ByteMinus(j < 4 ? lo : hi, j & 3, 8388616.0f), d);
  } else if constexpr (T == TensorType::kQ5_0) {
    const uint8_t* b = tile + (e >> 5) * 22;
    const int o = e & 31;
    const float d = HalfToF32(static_cast<uint16_t>(LdU16(b)));
    const uint32_t qh = LdU32(b + 2);
    const uint8_t* qs = b + 6 + (o & 15);
    const uint32_t lo = LdU32(qs), hi = LdU32(qs + 4);
    const int shift = o < 16 ? 0 : 4;
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) {
      const uint32_t q = ((ByteOf(lo, hi, j) >> shift) & 15u) | (((qh >> (o + j)) & 1u) << 4);
      w[j] = MulRn(SmallIntToFloat(static_cast<int>(q) - 16), d);
    }
  } else if constexpr (T == TensorType::kQ8_0) {
    const uint8_t* b = tile + (e >> 5) * 34;
    const float d = HalfToF32(static_cast<uint16_t>(LdU16(b)));
    const uint8_t* qs = b + 2 + (e & 31);
    // q + 128 in every byte (sign bit flipped), then 2^23 + 128 subtracted.
    const uint32_t lo = LdU32(qs) ^ 0x80808080u, hi = LdU32(qs + 4) ^ 0x80808080u;
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) {
      w[j] = MulRn(ByteMinus(j < 4 ? lo : hi, j & 3, 8388736.0f), d);
    }
  } else if constexpr (T == TensorType::kQ4_K || T == TensorType::kQ5_K) {
    // Blocks are 16-byte aligned here (row_bytes % 16 == 0 is required).
    constexpr int kSize = T == TensorType::kQ4_K ? 144 : 176;
    const uint8_t* b = tile + (e >> 8) * kSize;
    const int ie = e & 255;
    const int c = ie >> 5;  // sub-block
    const int l0 = ie & 31;
    const float d = HalfToF32(static_cast<uint16_t>(LdU16(b)));
    const float dmin = HalfToF32(static_cast<uint16_t>(LdU16(b + 2)));
    int sc = 0, m = 0;
    UnpackScaleMinGemv(b + 4, c, &sc, &m);
    const float d1 = MulRn(d, static_cast<float>(sc));
    const float m1 = MulRn(dmin, static_cast<float>(m));
    const int qs_offset = T == TensorType::kQ4_K ? 16 : 48;
    const uint2 qv = *reinterpret_cast<const uint2*>(b + qs_offset + 32 * (c >> 1) + l0);
    const int shift = 4 * (c & 1);
    const uint32_t lo = (qv.x >> shift) & 0x0F0F0F0Fu, hi = (qv.y >> shift) & 0x0F0F0F0Fu;
    uint32_t hlo = 0, hhi = 0;
    if constexpr (T == TensorType::kQ5_K) {
      const uint2 hv = *reinterpret_cast<const uint2*>(b + 16 + l0);
      hlo = ((hv.x >> c) & 0x01010101u) << 4;
      hhi = ((hv.y >> c) & 0x01010101u) << 4;
    }
    const uint32_t qlo = lo | hlo, qhi = hi | hhi;
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) {
      w[j] = SubRn(MulRn(d1, ByteMinus(j < 4 ? qlo : qhi, j & 3, 8388608.0f)), m1);
    }
  } else if constexpr (T == TensorType::kQ6_K) {
    const uint8_t* b = tile + (e >> 8) * 210;
    const int ie = e & 255;
    const int c = ie >> 5;
    const int h = c >> 2;  // half of 128
    const int k = c & 3;   // quarter of the half
    const int l0 = ie & 31;
    const float d = HalfToF32(static_cast<uint16_t>(LdU16(b + 208)));
    const int sc = static_cast<int8_t>(b[192 + 8 * h + 2 * k + (l0 >> 4)]);
    const float dd = MulRn(d, static_cast<float>(sc));
    const uint8_t* ql = b + 64 * h + (k & 1) * 32 + l0;
    const uint8_t* qh = b + 128 + 32 * h + l0;
    const uint32_t ql_lo = LdU32(ql), ql_hi = LdU32(ql + 4);
    const uint32_t qh_lo = LdU32(qh), qh_hi = LdU32(qh + 4);
    const int ql_shift = 4 * (k >> 1);
    const int qh_shift = 2 * k;
    // The 6-bit values of 4 weights per word, then 2^23 + 32 subtracted: q - 32.
    const uint32_t q_lo =
        ((ql_lo >> ql_shift) & 0x0F0F0F0Fu) | (((qh_lo >> qh_shift) & 0x03030303u) << 4);
    const uint32_t q_hi =
        ((ql_hi >> ql_shift) & 0x0F0F0F0Fu) | (((qh_hi >> qh_shift) & 0x03030303u) << 4);
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) {
      w[j] = MulRn(dd, ByteMinus(j < 4 ? q_lo : q_hi, j & 3, 8388640.0f));
    }
  } else if constexpr (T == TensorType::kIQ4_XS) {
    const uint8_t* b = tile + (e >> 8) * 136;
    const int ie = e & 255;
    const int ib = ie >> 5;
    const int o = ie & 31;
    const float d = HalfToF32(static_cast<uint16_t>(LdU16(b)));
    const uint32_t scales_h = LdU16(b + 2);
    const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((scales_h >> (2 * ib)) & 3) << 4);
    const float dl = MulRn(d, static_cast<float>(ls - 32));
    const uint8_t* qs = b + 8 + 16 * ib + (o & 15);
    const uint32_t lo = LdU32(qs), hi = LdU32(qs + 4);
    const int shift = o < 16 ? 0 : 4;
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) {
      w[j] = MulRn(dl, SmallIntToFloat(Iq4nl((ByteOf(lo, hi, j) >> shift) & 15u)));
    }
  }
}

}  // namespace ktx::kernels::cuda::gemv_internal
