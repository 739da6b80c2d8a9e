// File: kernels/cuda/gemv_direct_decode.cuh
//
// Loads and decoding of the direct quantized GEMV (gemv_direct.h): what one
// lane reads of one chunk of 1024 weights of a row (DirectLoad<T>, into a
// DirectRaw<T> of registers) and the 4 pieces of 8 consecutive weights it
// decodes from them (DirectDecode<T>, DirectPieceElem<T>), with the float
// operations of gemv_decode.cuh DecodePiece. Host and device code, so that
// tests/kernels/cuda/gemv_test.cc (GemvDirectDecode.*) checks loads +
// decoding bit for bit against DequantizeRow without a GPU. Included by
// gemv_direct.cu and that test only.
//
// Thread-safety: pure functions.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/common/tensor_type.h"
#include "kernels/cuda/gemv_decode.cuh"

namespace ktx::kernels::cuda::gemv_internal {

inline constexpr int kDirectChunk = 1024;  // weights per chunk (per warp step)
inline constexpr int kDirectPieces = 4;    // pieces of 8 weights per lane and chunk

// Read-only global loads (device: ld.global.nc), host: plain copies.
KTX_GEMV_HD inline uint32_t LdgU32(const uint8_t* p) {  // p 4-byte aligned
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const unsigned int*>(p));
#else
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#endif
}
KTX_GEMV_HD inline uint32_t LdgU16(const uint8_t* p) {  // p 2-byte aligned
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const unsigned short*>(p));
#else
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
#endif
}
KTX_GEMV_HD inline uint4 LdgU128(const uint8_t* p) {  // p 16-byte aligned
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const uint4*>(p));
#else
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
#endif
}
// The low 32 bits of (hi:lo) >> s, s in [0, 32).
KTX_GEMV_HD inline uint32_t FunnelR(uint32_t lo, uint32_t hi, uint32_t s) {
#ifdef __CUDA_ARCH__
  return __funnelshift_r(lo, hi, s);
#else
  return static_cast<uint32_t>(((static_cast<uint64_t>(hi) << 32) | lo) >> (s & 31));
#endif
}
// 8 bytes at a 2-byte aligned p: three aligned 4-byte loads (the third only
// when p % 4 == 2, so nothing past p + 8 rounded up to 4 is read).
KTX_GEMV_HD inline void Ldg8At2(const uint8_t* p, uint32_t* r0, uint32_t* r1) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uint8_t* q = reinterpret_cast<const uint8_t*>(a & ~uintptr_t{3});
  const uint32_t s = static_cast<uint32_t>(a & 2) * 8;
  const uint32_t w0 = LdgU32(q), w1 = LdgU32(q + 4);
  const uint32_t w2 = s != 0 ? LdgU32(q + 8) : 0u;
  *r0 = FunnelR(w0, w1, s);
  *r1 = FunnelR(w1, w2, s);
}

template <TensorType T>
struct DirectRaw;
template <>
struct DirectRaw<TensorType::kQ4_K> {
  uint4 hdr, qs;
  uint32_t valid;
};
template <>
struct DirectRaw<TensorType::kQ6_K> {
  uint32_t ql0[2], ql1[2], qh[2], sc[2], d;
  uint32_t valid;
};
template <>
struct DirectRaw<TensorType::kQ8_0> {
  uint32_t q[4][2], d[4];
  uint32_t valid;  // bit k: piece k
};
template <>
struct DirectRaw<TensorType::kBF16> {
  uint4 v[4];
  uint32_t valid;  // bit k: piece k
};

// First element (in the row) of piece k of `lane` in `chunk`.
template <TensorType T>
KTX_GEMV_HD inline int DirectPieceElem(int chunk, int lane, int k) {
  if constexpr (T == TensorType::kQ4_K) {
    const int blk = chunk * 4 + (lane >> 3), p = lane & 7;
    return 256 * blk + 64 * (p >> 1) + 32 * (k >> 1) + 16 * (p & 1) + 8 * (k & 1);
  } else if constexpr (T == TensorType::kQ6_K) {
    const int blk = chunk * 4 + (lane >> 3), u = lane & 7;
    return 256 * blk + 128 * (u >> 2) + 32 * k + 8 * (u & 3);
  } else if constexpr (T == TensorType::kQ8_0) {
    return 32 * (chunk * 32 + 8 * k + (lane >> 2)) + 8 * (lane & 3);
  } else {
    return chunk * kDirectChunk + 256 * k + 8 * lane;
  }
}

// Loads lane `lane`'s bytes of chunk `chunk` of a row starting at `row` (the
// row has n_in weights; bytes past them are not read, see gemv_direct.h).
// Pieces past the row get all-zero words, which decode to weights of zero
// (so that the kernel needs no per-lane branch).
template <TensorType T>
KTX_GEMV_HD inline void DirectLoad(const uint8_t* row, int n_in, int chunk, int lane,
                                   DirectRaw<T>* raw) {
  if constexpr (T == TensorType::kQ4_K) {
    const int blk = chunk * 4 + (lane >> 3);
    raw->valid = blk < n_in / 256;
    raw->hdr = make_uint4(0, 0, 0, 0);
    raw->qs = make_uint4(0, 0, 0, 0);
    if (raw->valid) {
      const uint8_t* b = row + blk * 144;
      raw->hdr = LdgU128(b);
      raw->qs = LdgU128(b + 16 + 16 * (lane & 7));
    }
  } else if constexpr (T == TensorType::kQ6_K) {
    const int blk = chunk * 4 + (lane >> 3), u = lane & 7;
    raw->valid = blk < n_in / 256;
    raw->ql0[0] = raw->ql0[1] = raw->ql1[0] = raw->ql1[1] = 0;
    raw->qh[0] = raw->qh[1] = raw->sc[0] = raw->sc[1] = raw->d = 0;
    if (raw->valid) {
      const uint8_t* b = row + blk * 210;
      const int h = u >> 2, g = u & 3;
      Ldg8At2(b + 64 * h + 8 * g, &raw->ql0[0], &raw->ql0[1]);
      Ldg8At2(b + 64 * h + 32 + 8 * g, &raw->ql1[0], &raw->ql1[1]);
      Ldg8At2(b + 128 + 32 * h + 8 * g, &raw->qh[0], &raw->qh[1]);
      Ldg8At2(b + 192 + 8 * h, &raw->sc[0], &raw->sc[1]);
      raw->d = LdgU16(b + 208);
    }
  } else if constexpr (T == TensorType::kQ8_0) {
    raw->valid = 0;
    const int n_blocks = n_in / 32;
    KTX_GEMV_UNROLL
    for (int k = 0; k < 4; ++k) {
      const int blk = chunk * 32 + 8 * k + (lane >> 2);
      raw->d[k] = raw->q[k][0] = raw->q[k][1] = 0;
      if (blk < n_blocks) {
        raw->valid |= 1u << k;
        const uint8_t* b = row + blk * 34;
        raw->d[k] = LdgU16(b);
        Ldg8At2(b + 2 + 8 * (lane & 3), &raw->q[k][0], &raw->q[k][1]);
      }
    }
  } else {
    static_assert(T == TensorType::kBF16);
    raw->valid = 0;
    KTX_GEMV_UNROLL
    for (int k = 0; k < 4; ++k) {
      const int e = DirectPieceElem<T>(chunk, lane, k);
      raw->v[k] = make_uint4(0, 0, 0, 0);
      if (e < n_in) {
        raw->valid |= 1u << k;
        raw->v[k] = LdgU128(row + 2 * e);
      }
    }
  }
}

template <TensorType T>
KTX_GEMV_HD inline bool DirectPieceValid(const DirectRaw<T>& raw, int k) {
  if constexpr (T == TensorType::kQ4_K || T == TensorType::kQ6_K) {
    return raw.valid != 0;
  } else {
    return ((raw.valid >> k) & 1u) != 0;
  }
}

// Byte i (0..11) of the Q4_K scales (header words y, z, w).
KTX_GEMV_HD inline uint32_t Q4kScaleByte(const uint4& hdr, int i) {
  const uint32_t word = i < 4 ? hdr.y : (i < 8 ? hdr.z : hdr.w);
  return (word >> (8 * (i & 3))) & 0xffu;
}

// The 8 weights of piece k (a valid one) of `lane`, as DecodePiece<T> at
// DirectPieceElem<T>(chunk, lane, k).
template <TensorType T>
KTX_GEMV_HD inline void DirectDecode(const DirectRaw<T>& raw, int lane, int k, float (&w)[8]) {
  if constexpr (T == TensorType::kQ4_K) {
    const int p = lane & 7;
    const int c = 2 * (p >> 1) + (k >> 1);  // sub-block
    const float d = HalfToF32(static_cast<uint16_t>(raw.hdr.x & 0xffffu));
    const float dmin = HalfToF32(static_cast<uint16_t>(raw.hdr.x >> 16));
    int sc = 0, m = 0;
    if (c < 4) {
      sc = static_cast<int>(Q4kScaleByte(raw.hdr, c) & 63);
      m = static_cast<int>(Q4kScaleByte(raw.hdr, c + 4) & 63);
    } else {
      sc = static_cast<int>((Q4kScaleByte(raw.hdr, c + 4) & 15) |
                            ((Q4kScaleByte(raw.hdr, c - 4) >> 6) << 4));
      m = static_cast<int>((Q4kScaleByte(raw.hdr, c + 4) >> 4) |
                           ((Q4kScaleByte(raw.hdr, c) >> 6) << 4));
    }
    const float d1 = MulRn(d, static_cast<float>(sc));
    const float m1 = MulRn(dmin, static_cast<float>(m));
    const uint32_t lo_src = (k & 1) ? raw.qs.z : raw.qs.x;
    const uint32_t hi_src = (k & 1) ? raw.qs.w : raw.qs.y;
    const int shift = 4 * (k >> 1);
    const uint32_t lo = (lo_src >> shift) & 0x0F0F0F0Fu, hi = (hi_src >> shift) & 0x0F0F0F0Fu;
    // d1 · q is exact (d1 has at most 17 significant bits, q 4), so the fused
    // d1 · q − m1 equals DecodePiece's rounded product then rounded difference.
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) {
      w[j] = fmaf(d1, ByteMinus(j < 4 ? lo : hi, j & 3, 8388608.0f), -m1);
    }
  } else if constexpr (T == TensorType::kQ6_K) {
    const int g = lane & 3;
    const float d = HalfToF32(static_cast<uint16_t>(raw.d));
    const int si = 2 * k + (g >> 1);  // scale byte of the half
    const uint32_t sword = si < 4 ? raw.sc[0] : raw.sc[1];
    const int sc = static_cast<int8_t>(static_cast<uint8_t>(sword >> (8 * (si & 3))));
    const float dd = MulRn(d, static_cast<float>(sc));
    const uint32_t ql_a = (k & 1) ? raw.ql1[0] : raw.ql0[0];
    const uint32_t ql_b = (k & 1) ? raw.ql1[1] : raw.ql0[1];
    const int ql_shift = 4 * (k >> 1);
    const int qh_shift = 2 * k;
    const uint32_t q_lo =
        ((ql_a >> ql_shift) & 0x0F0F0F0Fu) | (((raw.qh[0] >> qh_shift) & 0x03030303u) << 4);
    const uint32_t q_hi =
        ((ql_b >> ql_shift) & 0x0F0F0F0Fu) | (((raw.qh[1] >> qh_shift) & 0x03030303u) << 4);
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) {
      w[j] = MulRn(dd, ByteMinus(j < 4 ? q_lo : q_hi, j & 3, 8388640.0f));
    }
  } else if constexpr (T == TensorType::kQ8_0) {
    const float d = HalfToF32(static_cast<uint16_t>(raw.d[k]));
    const uint32_t lo = raw.q[k][0] ^ 0x80808080u, hi = raw.q[k][1] ^ 0x80808080u;
    KTX_GEMV_UNROLL
    for (int j = 0; j < 8; ++j) {
      w[j] = MulRn(ByteMinus(j < 4 ? lo : hi, j & 3, 8388736.0f), d);
    }
  } else {
    const uint4& v = raw.v[k];
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    KTX_GEMV_UNROLL
    for (int j = 0; j < 4; ++j) {
      w[2 * j] = BitsToFloat(words[j] << 16);
      w[2 * j + 1] = BitsToFloat(words[j] & 0xffff0000u);
    }
  }
}

}  // namespace ktx::kernels::cuda::gemv_internal
