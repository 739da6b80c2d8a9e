#include "kernels/cuda/gemv_q8.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/gemv_decode.cuh"
#include "kernels/cuda/gemv_direct_decode.cuh"
#include "kernels/cuda/gemv_q8_decode.cuh"

namespace ktx::kernels::cuda {
namespace {

using gemv_internal::BlockBytes;
using gemv_internal::BlockElems;
using gemv_internal::DirectLoad;
using gemv_internal::DirectRaw;
using gemv_internal::kDirectChunk;
using gemv_internal::kQ8ActBlock;
using gemv_internal::kQ8MetaBytes;
using gemv_internal::Q8ActQuant;
using gemv_internal::Q8ActScale;
using gemv_internal::Q8LaneDot;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxTokensPerPass = 8;

int64_t MetaOffset(int64_t n_in, int64_t n_tokens) { return (n_tokens * n_in + 15) / 16 * 16; }

// One warp per activation block of 32: lane i quantizes element i.
__global__ void __launch_bounds__(kThreads)
    QuantizeQ8Kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int64_t n_blocks_total,
                     int n_blocks_row, int n_in, int8_t* __restrict__ qx,
                     uint8_t* __restrict__ meta) {
  const int64_t gb = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (gb >= n_blocks_total) return;  // warp-uniform
  const int64_t t = gb / n_blocks_row;
  const int b = static_cast<int>(gb % n_blocks_row);
  const unsigned short bits =
      __ldg(reinterpret_cast<const unsigned short*>(x) + t * ldx + kQ8ActBlock * b + lane);
  const float v = __uint_as_float(static_cast<uint32_t>(bits) << 16);
  float amax = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, o));
  const float dx = Q8ActScale(amax);
  const int q = Q8ActQuant(v, dx);
  int s = q;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFullMask, s, o);
  qx[t * n_in + kQ8ActBlock * b + lane] = static_cast<int8_t>(q);
  if (lane == 0) {
    uint2 m;
    m.x = __float_as_uint(dx);
    m.y = static_cast<uint32_t>(s);
    *reinterpret_cast<uint2*>(meta + kQ8MetaBytes * gb) = m;
  }
}

// Block: kWarps warps; `split` warps share a row (kWarps / split rows per
// block). Warp `sub` of a row takes the steps sub, sub + split, ... of U
// consecutive chunks; per step it loads U chunks (DirectLoad) before using
// any. The order of each token's terms depends on the row, lane and split
// only (not on NT).
template <TensorType T, int NT, int U>
__global__ void __launch_bounds__(kThreads)
    Q8GemvKernel(const uint8_t* __restrict__ w, int64_t row_bytes, int64_t n_out, int n_in,
                 int split, const int8_t* __restrict__ qx, const uint8_t* __restrict__ meta,
                 float* __restrict__ y, int64_t ldy, float beta) {
  __shared__ float partial[kWarps][kMaxTokensPerPass];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int rows_per_block = kWarps / split;
  const int sub = warp % split;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + warp / split;
  const bool row_ok = row < n_out;
  const uint8_t* wr = w + (row_ok ? row : 0) * row_bytes;
  const int n_chunks = (n_in + kDirectChunk - 1) / kDirectChunk;
  const int n_blocks_row = n_in / kQ8ActBlock;

  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;

  const int my_chunks = row_ok ? n_chunks : 0;
  for (int c0 = sub * U; c0 < my_chunks; c0 += split * U) {
    DirectRaw<T> raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c0 + u < my_chunks) DirectLoad<T>(wr, n_in, c0 + u, lane, &raw[u]);  // warp-uniform
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c0 + u >= my_chunks) break;  // warp-uniform
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        acc[t] = Q8LaneDot<T>(raw[u], c0 + u, lane, qx + static_cast<int64_t>(t) * n_in,
                              meta + static_cast<int64_t>(t) * n_blocks_row * kQ8MetaBytes, acc[t]);
      }
    }
  }

#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = WarpSum(acc[t]);
  if (split == 1) {
    if (lane == 0 && row_ok) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        float* out = y + t * ldy + row;
        *out = beta != 0.0f ? fmaf(beta, *out, acc[t]) : acc[t];
      }
    }
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < NT; ++t) partial[warp][t] = acc[t];
  }
  __syncthreads();
  if (sub == 0 && lane < NT && row_ok) {
    float s = partial[warp][lane];
    for (int q = 1; q < split; ++q) s += partial[warp + q][lane];
    float* out = y + lane * ldy + row;
    *out = beta != 0.0f ? fmaf(beta, *out, s) : s;
  }
}

int SmCount() {
  static std::atomic<int> cache[16];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  std::atomic<int>& c = cache[device & 15];
  int v = c.load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 0;
    }
    c.store(v, std::memory_order_relaxed);
  }
  return v;
}

template <TensorType T, int NT, int U>
cudaError_t LaunchPass(const uint8_t* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                       const int8_t* qx, const uint8_t* meta, float* y, int64_t ldy, float beta,
                       int split, cudaStream_t stream) {
  const int64_t blocks = CeilDiv(n_out, kWarps / split);
  if (blocks > int64_t{0x7fffffff}) return cudaErrorInvalidValue;
  Q8GemvKernel<T, NT, U><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      w, row_bytes, n_out, static_cast<int>(n_in), split, qx, meta, y, ldy, beta);
  return cudaGetLastError();
}

template <TensorType T, int U>
cudaError_t LaunchAll(const uint8_t* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                      int64_t n_tokens, const int8_t* qx, const uint8_t* meta, float* y,
                      int64_t ldy, float beta, cudaStream_t stream) {
  const int n_sm = SmCount();
  if (n_sm == 0) return cudaErrorInvalidDevice;
  // Warps per row: enough warps streaming (about 48 per SM) for few rows,
  // at least one step of U chunks each. Independent of n_tokens (batch
  // invariance: split changes the order of a row's sums).
  const int64_t n_chunks = CeilDiv(n_in, kDirectChunk);
  const int64_t target_warps = int64_t{48} * n_sm;
  int split = 1;
  while (split < kWarps && n_out * split < target_warps &&
         int64_t{2} * split * U <= n_chunks + U - 1) {
    split *= 2;
  }
  const int64_t n_blocks_row = n_in / kQ8ActBlock;
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kMaxTokensPerPass) {
    const int nt = static_cast<int>(std::min<int64_t>(kMaxTokensPerPass, n_tokens - t0));
    const int8_t* qp = qx + t0 * n_in;
    const uint8_t* mp = meta + t0 * n_blocks_row * kQ8MetaBytes;
    float* yp = y + t0 * ldy;
    cudaError_t err = cudaSuccess;
#define KTX_Q8_PASS(N)                                                                          \
  case N:                                                                                       \
    err = LaunchPass<T, N, U>(w, row_bytes, n_out, n_in, qp, mp, yp, ldy, beta, split, stream); \
    break;
    switch (nt) {
      KTX_Q8_PASS(1)
      KTX_Q8_PASS(2)
      KTX_Q8_PASS(3)
      KTX_Q8_PASS(4)
      KTX_Q8_PASS(5)
      KTX_Q8_PASS(6)
      KTX_Q8_PASS(7)
      default:
        err = LaunchPass<T, 8, U>(w, row_bytes, n_out, n_in, qp, mp, yp, ldy, beta, split, stream);
        break;
    }
#undef KTX_Q8_PASS
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <TensorType T>
cudaError_t LaunchType(const uint8_t* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                       int64_t n_tokens, const int8_t* qx, const uint8_t* meta, float* y,
                       int64_t ldy, float beta, const Q8GemvConfig& c, cudaStream_t stream) {
  switch (c.unroll) {
    case 1:
      return LaunchAll<T, 1>(w, row_bytes, n_out, n_in, n_tokens, qx, meta, y, ldy, beta, stream);
    case 2:
      return LaunchAll<T, 2>(w, row_bytes, n_out, n_in, n_tokens, qx, meta, y, ldy, beta, stream);
    case 4:
      return LaunchAll<T, 4>(w, row_bytes, n_out, n_in, n_tokens, qx, meta, y, ldy, beta, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool CanQ8Gemv(TensorType type, int64_t row_bytes) {
  switch (type) {
    case TensorType::kQ4_K: return row_bytes % 16 == 0;
    case TensorType::kQ6_K:
    case TensorType::kQ8_0: return row_bytes % 2 == 0;
    default: return false;
  }
}

size_t Q8GemvWorkspaceBytes(int64_t n_in, int64_t n_tokens) {
  if (n_in <= 0 || n_tokens <= 0) return 0;
  return static_cast<size_t>(MetaOffset(n_in, n_tokens) +
                             n_tokens * (n_in / kQ8ActBlock) * kQ8MetaBytes);
}

cudaError_t QuantizeActivationsQ8(const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens,
                                  int64_t n_in, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  if (n_in <= 0 || n_in % kQ8ActBlock != 0 || n_in > (int64_t{1} << 24) || n_tokens < 0 ||
      ldx < n_in) {
    return cudaErrorInvalidValue;
  }
  if (n_tokens == 0) return cudaSuccess;
  if (x == nullptr || workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 16 != 0 ||
      workspace_bytes < Q8GemvWorkspaceBytes(n_in, n_tokens)) {
    return cudaErrorInvalidValue;
  }
  int8_t* qx = static_cast<int8_t*>(workspace);
  uint8_t* meta = static_cast<uint8_t*>(workspace) + MetaOffset(n_in, n_tokens);
  const int64_t n_blocks_row = n_in / kQ8ActBlock;
  const int64_t total = n_tokens * n_blocks_row;
  const int64_t grid = CeilDiv(total, kWarps);
  if (grid > int64_t{0x7fffffff}) return cudaErrorInvalidValue;
  QuantizeQ8Kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      x, ldx, total, static_cast<int>(n_blocks_row), static_cast<int>(n_in), qx, meta);
  return cudaGetLastError();
}

cudaError_t Q8Gemv(TensorType type, const void* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                   const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens, float* y, int64_t ldy,
                   float beta, void* workspace, size_t workspace_bytes, const Q8GemvConfig& config,
                   cudaStream_t stream) {
  if (!CanQ8Gemv(type, row_bytes) || n_out < 0 || n_in <= 0 || n_in > (int64_t{1} << 24) ||
      n_in % 32 != 0 || n_in % BlockElems(type) != 0 || n_tokens < 0 || ldx < n_in || ldy < n_out ||
      row_bytes < n_in / BlockElems(type) * BlockBytes(type) ||
      (config.unroll != 1 && config.unroll != 2 && config.unroll != 4)) {
    return cudaErrorInvalidValue;
  }
  if (n_out == 0 || n_tokens == 0) return cudaSuccess;
  if (w == nullptr || x == nullptr || y == nullptr || reinterpret_cast<uintptr_t>(w) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err =
      QuantizeActivationsQ8(x, ldx, n_tokens, n_in, workspace, workspace_bytes, stream);
  if (err != cudaSuccess) return err;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  const int8_t* qx = static_cast<const int8_t*>(workspace);
  const uint8_t* meta = static_cast<const uint8_t*>(workspace) + MetaOffset(n_in, n_tokens);
  switch (type) {
    case TensorType::kQ4_K:
      return LaunchType<TensorType::kQ4_K>(wb, row_bytes, n_out, n_in, n_tokens, qx, meta, y, ldy,
                                           beta, config, stream);
    case TensorType::kQ6_K:
      return LaunchType<TensorType::kQ6_K>(wb, row_bytes, n_out, n_in, n_tokens, qx, meta, y, ldy,
                                           beta, config, stream);
    case TensorType::kQ8_0:
      return LaunchType<TensorType::kQ8_0>(wb, row_bytes, n_out, n_in, n_tokens, qx, meta, y, ldy,
                                           beta, config, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ktx::kernels::cuda
