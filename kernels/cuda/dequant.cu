#include "kernels/cuda/dequant.h"

#include <algorithm>
#include <type_traits>

#include "kernels/cpu/quant/blocks.h"
#include "kernels/cuda/cuda_util.cuh"

namespace ktx::kernels::cuda {
namespace {

// kIq4nlValues, readable on the device.
__constant__ int8_t kIq4nlDevice[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                        1,    13,   25,  38,  53,  69,  89,  113};

// Each thread expands one chunk of 32 consecutive elements of a row. The
// products and differences use the _rn intrinsics so that the compiler cannot
// contract them into FMAs: the CPU reference rounds each one separately.
struct Chunk {
  float y[32];
};

__device__ __forceinline__ uint16_t LoadU16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (p[1] << 8));
}

__device__ void UnpackScaleMin(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

template <TensorType kType>
__device__ void ExpandChunk(const uint8_t* row, int64_t chunk, Chunk* out) {
  float* y = out->y;
  if constexpr (kType == TensorType::kF32) {
    const float* f = reinterpret_cast<const float*>(row) + chunk * 32;
    for (int j = 0; j < 32; ++j) y[j] = f[j];
  } else if constexpr (kType == TensorType::kF16) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row) + chunk * 32;
    for (int j = 0; j < 32; ++j) y[j] = HalfBitsToFloat(h[j]);
  } else if constexpr (kType == TensorType::kBF16) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row) + chunk * 32;
    for (int j = 0; j < 32; ++j) y[j] = __uint_as_float(static_cast<uint32_t>(h[j]) << 16);
  } else if constexpr (kType == TensorType::kQ4_0) {
    const uint8_t* b = row + chunk * sizeof(BlockQ4_0);
    const float d = HalfBitsToFloat(LoadU16(b));
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
      y[j] = __fmul_rn(static_cast<float>((qs[j] & 15) - 8), d);
      y[j + 16] = __fmul_rn(static_cast<float>((qs[j] >> 4) - 8), d);
    }
  } else if constexpr (kType == TensorType::kQ5_0) {
    const uint8_t* b = row + chunk * sizeof(BlockQ5_0);
    const float d = HalfBitsToFloat(LoadU16(b));
    const uint32_t qh = static_cast<uint32_t>(b[2]) | (static_cast<uint32_t>(b[3]) << 8) |
                        (static_cast<uint32_t>(b[4]) << 16) | (static_cast<uint32_t>(b[5]) << 24);
    const uint8_t* qs = b + 6;
    for (int j = 0; j < 16; ++j) {
      const int lo = (qs[j] & 15) | static_cast<int>(((qh >> j) & 1u) << 4);
      const int hi = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
      y[j] = __fmul_rn(static_cast<float>(lo - 16), d);
      y[j + 16] = __fmul_rn(static_cast<float>(hi - 16), d);
    }
  } else if constexpr (kType == TensorType::kQ8_0) {
    const uint8_t* b = row + chunk * sizeof(BlockQ8_0);
    const float d = HalfBitsToFloat(LoadU16(b));
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) y[j] = __fmul_rn(static_cast<float>(qs[j]), d);
  } else if constexpr (kType == TensorType::kQ4_K || kType == TensorType::kQ5_K) {
    using Block = std::conditional_t<kType == TensorType::kQ4_K, BlockQ4K, BlockQ5K>;
    const Block* b = reinterpret_cast<const Block*>(row) + chunk / 8;
    const int c = static_cast<int>(chunk % 8);  // sub-block: scale index
    const float d = HalfBitsToFloat(b->d);
    const float dmin = HalfBitsToFloat(b->dmin);
    int sc = 0, m = 0;
    UnpackScaleMin(b->scales, c, &sc, &m);
    const float d1 = __fmul_rn(d, static_cast<float>(sc));
    const float m1 = __fmul_rn(dmin, static_cast<float>(m));
    const uint8_t* qs = b->qs + 32 * (c / 2);
    const int shift = 4 * (c % 2);
    for (int l = 0; l < 32; ++l) {
      int q = (qs[l] >> shift) & 15;
      if constexpr (kType == TensorType::kQ5_K) q |= ((b->qh[l] >> c) & 1) << 4;
      y[l] = __fsub_rn(__fmul_rn(d1, static_cast<float>(q)), m1);
    }
  } else if constexpr (kType == TensorType::kQ6_K) {
    const BlockQ6K* b = reinterpret_cast<const BlockQ6K*>(row) + chunk / 8;
    const int c = static_cast<int>(chunk % 8);
    const int h = c / 4;  // half of 128
    const int k = c % 4;  // quarter of the half: q1..q4 of the reference
    const float d = HalfBitsToFloat(b->d);
    const uint8_t* ql = b->ql + 64 * h + (k % 2) * 32;
    const uint8_t* qh = b->qh + 32 * h;
    const int8_t* sc = b->scales + 8 * h + 2 * k;
    const int ql_shift = 4 * (k / 2);
    const int qh_shift = 2 * k;
    for (int l = 0; l < 32; ++l) {
      const int q = (((ql[l] >> ql_shift) & 15) | (((qh[l] >> qh_shift) & 3) << 4)) - 32;
      y[l] = __fmul_rn(__fmul_rn(d, static_cast<float>(sc[l / 16])), static_cast<float>(q));
    }
  } else if constexpr (kType == TensorType::kIQ4_XS) {
    const BlockIQ4XS* b = reinterpret_cast<const BlockIQ4XS*>(row) + chunk / 8;
    const int ib = static_cast<int>(chunk % 8);
    const float d = HalfBitsToFloat(b->d);
    const int ls =
        ((b->scales_l[ib / 2] >> (4 * (ib % 2))) & 15) | (((b->scales_h >> (2 * ib)) & 3) << 4);
    const float dl = __fmul_rn(d, static_cast<float>(ls - 32));
    const uint8_t* qs = b->qs + 16 * ib;
    for (int j = 0; j < 16; ++j) {
      y[j] = __fmul_rn(dl, static_cast<float>(kIq4nlDevice[qs[j] & 15]));
      y[j + 16] = __fmul_rn(dl, static_cast<float>(kIq4nlDevice[qs[j] >> 4]));
    }
  }
}

template <TensorType kType>
__global__ void DequantizeKernel(const uint8_t* src, int64_t src_row_bytes, int64_t n_rows,
                                 int64_t chunks_per_row, __nv_bfloat16* dst, int64_t dst_stride) {
  const int64_t n_chunks = n_rows * chunks_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_chunks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / chunks_per_row;
    const int64_t chunk = i % chunks_per_row;
    Chunk c;
    ExpandChunk<kType>(src + r * src_row_bytes, chunk, &c);
    __nv_bfloat16* out = dst + r * dst_stride + chunk * 32;
    if ((reinterpret_cast<uintptr_t>(out) & 15) == 0) {
      // Four 16-byte stores instead of 32 two-byte ones: each 2-byte store
      // of a warp touched 32 separate sectors (threads are 64 bytes apart),
      // which made the kernel store-bound at ~150 GB/s (measured on the
      // H200: 0.58 ms per DeepSeek-V3 expert, dequantize + FFN of 1 token).
      uint4* out4 = reinterpret_cast<uint4*>(out);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint32_t w[4];
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(c.y[8 * q + 2 * h]));
          const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(c.y[8 * q + 2 * h + 1]));
          w[h] = lo | (hi << 16);
        }
        out4[q] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 32; ++j) out[j] = __float2bfloat16_rn(c.y[j]);
    }
  }
}

template <TensorType kType>
cudaError_t Launch(const void* src, int64_t src_row_bytes, int64_t n_rows, int64_t n_cols,
                   __nv_bfloat16* dst, int64_t dst_stride, cudaStream_t stream) {
  const int64_t chunks_per_row = n_cols / 32;
  const int64_t n_chunks = n_rows * chunks_per_row;
  if (n_chunks == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(CeilDiv(n_chunks, kThreads), int64_t{1} << 20);
  DequantizeKernel<kType><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(src), src_row_bytes, n_rows, chunks_per_row, dst, dst_stride);
  return cudaGetLastError();
}

}  // namespace

bool CanDequantizeOnGpu(TensorType type) {
  switch (type) {
    case TensorType::kF32:
    case TensorType::kF16:
    case TensorType::kBF16:
    case TensorType::kQ4_0:
    case TensorType::kQ5_0:
    case TensorType::kQ8_0:
    case TensorType::kQ4_K:
    case TensorType::kQ5_K:
    case TensorType::kQ6_K:
    case TensorType::kIQ4_XS: return true;
    default: return false;
  }
}

cudaError_t DequantizeToBf16(TensorType type, const void* src, int64_t src_row_bytes,
                             int64_t n_rows, int64_t n_cols, __nv_bfloat16* dst, int64_t dst_stride,
                             cudaStream_t stream) {
  if (!CanDequantizeOnGpu(type) || n_rows < 0 || n_cols < 0 || dst_stride < n_cols) {
    return cudaErrorInvalidValue;
  }
  const TensorTypeTraits& traits = TraitsOf(type);
  if (n_cols % traits.block_size != 0 || n_cols % 32 != 0 ||
      src_row_bytes < n_cols / traits.block_size * traits.type_size) {
    return cudaErrorInvalidValue;
  }
  switch (type) {
    case TensorType::kF32:
      return Launch<TensorType::kF32>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride, stream);
    case TensorType::kF16:
      return Launch<TensorType::kF16>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride, stream);
    case TensorType::kBF16:
      return Launch<TensorType::kBF16>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride, stream);
    case TensorType::kQ4_0:
      return Launch<TensorType::kQ4_0>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride, stream);
    case TensorType::kQ5_0:
      return Launch<TensorType::kQ5_0>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride, stream);
    case TensorType::kQ8_0:
      return Launch<TensorType::kQ8_0>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride, stream);
    case TensorType::kQ4_K:
      return Launch<TensorType::kQ4_K>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride, stream);
    case TensorType::kQ5_K:
      return Launch<TensorType::kQ5_K>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride, stream);
    case TensorType::kQ6_K:
      return Launch<TensorType::kQ6_K>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride, stream);
    case TensorType::kIQ4_XS:
      return Launch<TensorType::kIQ4_XS>(src, src_row_bytes, n_rows, n_cols, dst, dst_stride,
                                         stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ktx::kernels::cuda
