// File: kernels/cuda/gemv_q8_decode.cuh
//
// Host and device pieces of the q8 GEMV (gemv_q8.h): the activation
// quantizer's per-element operations (Q8ActScale, Q8ActQuant, and a whole
// block of 32 on the host: Q8QuantizeBlock) and one lane's integer dot
// products of one chunk of 1024 weights with one token's quantized
// activations (Q8LaneDot, on the raw bytes DirectLoad of
// gemv_direct_decode.cuh loaded). Host and device code, so that
// tests/kernels/cuda/gemv_test.cc (GemvQ8Host.*) checks them without a GPU.
// Included by gemv_q8.cu and that test only.
//
// Thread-safety: pure functions.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/common/tensor_type.h"
#include "kernels/cuda/gemv_decode.cuh"
#include "kernels/cuda/gemv_direct_decode.cuh"

namespace ktx::kernels::cuda::gemv_internal {

inline constexpr int kQ8ActBlock = 32;  // activation elements per scale
inline constexpr int kQ8MetaBytes = 8;  // {F32 dx, I32 sx} per activation block

KTX_GEMV_HD inline float DivRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  volatile float q = a / b;
  return q;
#endif
}

// dx of a block whose max |x| is amax.
KTX_GEMV_HD inline float Q8ActScale(float amax) { return DivRn(amax, 127.0f); }

// qx of one element (round half to even of fl(x / dx), clamped to ±127).
KTX_GEMV_HD inline int Q8ActQuant(float x, float dx) {
  if (dx == 0.0f) return 0;
  const float r = DivRn(x, dx);
#ifdef __CUDA_ARCH__
  int q = __float2int_rn(r);
#else
  int q = static_cast<int>(std::nearbyint(r));
#endif
  return q > 127 ? 127 : (q < -127 ? -127 : q);
}

// A block of 32 activations on the host (the device kernel applies the same
// two functions per lane).
inline void Q8QuantizeBlock(const float* x, int8_t* q, float* dx, int32_t* sx) {
  float amax = 0.0f;
  for (int i = 0; i < kQ8ActBlock; ++i) amax = std::fmax(amax, std::fabs(x[i]));
  *dx = Q8ActScale(amax);
  int32_t s = 0;
  for (int i = 0; i < kQ8ActBlock; ++i) {
    q[i] = static_cast<int8_t>(Q8ActQuant(x[i], *dx));
    s += q[i];
  }
  *sx = s;
}

// Σ of the 4 products of signed bytes of a and b, plus c.
KTX_GEMV_HD inline int Dp4a(uint32_t a, uint32_t b, int c) {
#ifdef __CUDA_ARCH__
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int j = 0; j < 4; ++j) {
    c += static_cast<int>(static_cast<int8_t>(a >> (8 * j))) *
         static_cast<int>(static_cast<int8_t>(b >> (8 * j)));
  }
  return c;
#endif
}

KTX_GEMV_HD inline uint2 LdgU64(const uint8_t* p) {  // p 8-byte aligned
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const uint2*>(p));
#else
  uint2 v;
  std::memcpy(&v, p, 8);
  return v;
#endif
}

// Bytes q (each 0..63) minus 32, as signed bytes: q + 96 has no carry and
// flipping bit 7 subtracts 128 modulo 256.
KTX_GEMV_HD inline uint32_t Q6Minus32(uint32_t q) { return (q + 0x60606060u) ^ 0x80808080u; }

// Scale and min (6 bits each) of Q4_K sub-block c (0..7).
KTX_GEMV_HD inline void Q4kScaleMin(const uint4& hdr, int c, int* sc, int* m) {
  if (c < 4) {
    *sc = static_cast<int>(Q4kScaleByte(hdr, c) & 63);
    *m = static_cast<int>(Q4kScaleByte(hdr, c + 4) & 63);
  } else {
    *sc =
        static_cast<int>((Q4kScaleByte(hdr, c + 4) & 15) | ((Q4kScaleByte(hdr, c - 4) >> 6) << 4));
    *m = static_cast<int>((Q4kScaleByte(hdr, c + 4) >> 4) | ((Q4kScaleByte(hdr, c) >> 6) << 4));
  }
}

// One lane's share of chunk `chunk` (raw: DirectLoad<T>(row, n_in, chunk,
// lane)) dotted with one token: qx = the token's int8 [n_in], meta = its
// {dx, sx} [n_in / 32]. Returns acc plus the lane's terms, added in a fixed
// order (gemv_q8.h). Parts past the row (invalid) add nothing.
template <TensorType T>
KTX_GEMV_HD inline float Q8LaneDot(const DirectRaw<T>& raw, int chunk, int lane, const int8_t* qx,
                                   const uint8_t* meta, float acc) {
  const uint8_t* qb = reinterpret_cast<const uint8_t*>(qx);
  if constexpr (T == TensorType::kQ4_K) {
    if (!raw.valid) return acc;
    const int blk = chunk * 4 + (lane >> 3), p = lane & 7, c = p >> 1, h = p & 1;
    const float d = HalfToF32(static_cast<uint16_t>(raw.hdr.x & 0xffffu));
    const float dmin = HalfToF32(static_cast<uint16_t>(raw.hdr.x >> 16));
    int sc0 = 0, m0 = 0, sc1 = 0, m1 = 0;
    Q4kScaleMin(raw.hdr, 2 * c, &sc0, &m0);
    Q4kScaleMin(raw.hdr, 2 * c + 1, &sc1, &m1);
    const int e0 = 256 * blk + 64 * c + 16 * h;  // low nibbles: sub-block 2c; high: 2c + 1 (+32)
    const uint4 xa = LdgU128(qb + e0), xb = LdgU128(qb + e0 + 32);
    constexpr uint32_t kLo = 0x0F0F0F0Fu;
    int i0 = Dp4a(raw.qs.x & kLo, xa.x, 0);
    i0 = Dp4a(raw.qs.y & kLo, xa.y, i0);
    i0 = Dp4a(raw.qs.z & kLo, xa.z, i0);
    i0 = Dp4a(raw.qs.w & kLo, xa.w, i0);
    int i1 = Dp4a((raw.qs.x >> 4) & kLo, xb.x, 0);
    i1 = Dp4a((raw.qs.y >> 4) & kLo, xb.y, i1);
    i1 = Dp4a((raw.qs.z >> 4) & kLo, xb.z, i1);
    i1 = Dp4a((raw.qs.w >> 4) & kLo, xb.w, i1);
    const int ab = 8 * blk + 2 * c;  // activation block of sub-block 2c
    const uint2 ma = LdgU64(meta + kQ8MetaBytes * ab), mb = LdgU64(meta + kQ8MetaBytes * (ab + 1));
    const float dxa = BitsToFloat(ma.x), dxb = BitsToFloat(mb.x);
    // Only the first half-lane of a sub-block adds its min term (with the
    // whole block's Σ qx); the other adds zero times it.
    const float mscale = h == 0 ? 1.0f : 0.0f;
    acc = fmaf(MulRn(MulRn(d, static_cast<float>(sc0)), dxa), static_cast<float>(i0), acc);
    acc = fmaf(-MulRn(MulRn(dmin, static_cast<float>(m0) * mscale), dxa),
               static_cast<float>(static_cast<int32_t>(ma.y)), acc);
    acc = fmaf(MulRn(MulRn(d, static_cast<float>(sc1)), dxb), static_cast<float>(i1), acc);
    acc = fmaf(-MulRn(MulRn(dmin, static_cast<float>(m1) * mscale), dxb),
               static_cast<float>(static_cast<int32_t>(mb.y)), acc);
    return acc;
  } else if constexpr (T == TensorType::kQ6_K) {
    if (!raw.valid) return acc;
    const int blk = chunk * 4 + (lane >> 3), u = lane & 7, hh = u >> 2, g = u & 3;
    const float d = HalfToF32(static_cast<uint16_t>(raw.d));
    KTX_GEMV_UNROLL
    for (int k = 0; k < 4; ++k) {
      const int si = 2 * k + (g >> 1);  // scale byte of the half
      const uint32_t sword = si < 4 ? raw.sc[0] : raw.sc[1];
      const int sc = static_cast<int8_t>(static_cast<uint8_t>(sword >> (8 * (si & 3))));
      const uint32_t ql_a = (k & 1) ? raw.ql1[0] : raw.ql0[0];
      const uint32_t ql_b = (k & 1) ? raw.ql1[1] : raw.ql0[1];
      const int ql_shift = 4 * (k >> 1), qh_shift = 2 * k;
      const uint32_t q_lo =
          ((ql_a >> ql_shift) & 0x0F0F0F0Fu) | (((raw.qh[0] >> qh_shift) & 0x03030303u) << 4);
      const uint32_t q_hi =
          ((ql_b >> ql_shift) & 0x0F0F0F0Fu) | (((raw.qh[1] >> qh_shift) & 0x03030303u) << 4);
      const int e = 256 * blk + 128 * hh + 32 * k + 8 * g;
      const uint2 xv = LdgU64(qb + e);
      const int isum = Dp4a(Q6Minus32(q_hi), xv.y, Dp4a(Q6Minus32(q_lo), xv.x, 0));
      const uint2 m = LdgU64(meta + kQ8MetaBytes * (8 * blk + 4 * hh + k));
      acc = fmaf(MulRn(MulRn(d, static_cast<float>(sc)), BitsToFloat(m.x)),
                 static_cast<float>(isum), acc);
    }
    return acc;
  } else {
    static_assert(T == TensorType::kQ8_0);
    KTX_GEMV_UNROLL
    for (int k = 0; k < 4; ++k) {
      if (((raw.valid >> k) & 1u) == 0) continue;
      const int blk = chunk * 32 + 8 * k + (lane >> 2);
      const int e = 32 * blk + 8 * (lane & 3);
      const uint2 xv = LdgU64(qb + e);
      const int isum = Dp4a(raw.q[k][1], xv.y, Dp4a(raw.q[k][0], xv.x, 0));
      const uint2 m = LdgU64(meta + kQ8MetaBytes * blk);
      const float d = HalfToF32(static_cast<uint16_t>(raw.d[k]));
      acc = fmaf(MulRn(d, BitsToFloat(m.x)), static_cast<float>(isum), acc);
    }
    return acc;
  }
}

}  // namespace ktx::kernels::cuda::gemv_internal
