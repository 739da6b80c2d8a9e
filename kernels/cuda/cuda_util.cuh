// File: kernels/cuda/cuda_util.cuh
//
// Device-side helpers shared by ktx's CUDA kernels (warp reductions, bf16
// pair unpacking, ceil division). Included only by .cu files.
//
// Thread-safety: pure functions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace ktx::kernels::cuda {

inline constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024). `scratch`
// holds 32 floats of shared memory. Every thread gets the result.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int n_warps = blockDim.x / 32;
  v = WarpSum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < n_warps ? scratch[lane] : 0.0f;
  return WarpSum(total);
}

// Two bf16 packed in one 32-bit word (low half first) as floats.
__device__ __forceinline__ float2 Bf16PairToFloat2(uint32_t w) {
  float2 f;
  f.x = __uint_as_float(w << 16);
  f.y = __uint_as_float(w & 0xffff0000u);
  return f;
}

__device__ __forceinline__ float HalfBitsToFloat(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes` when above the
// default 48 KiB, once per device and high-water mark (`raised` holds one
// counter per device, at most 16 devices), so that launches stay cheap and
// capturable in CUDA graphs. Thread-safe.
template <typename Kernel>
cudaError_t EnsureDynamicSmem(Kernel kernel, size_t bytes, std::atomic<size_t> (&raised)[16]) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::atomic<size_t>& mark = raised[device & 15];
  if (bytes <= mark.load(std::memory_order_acquire)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  size_t cur = mark.load(std::memory_order_relaxed);
  while (cur < bytes && !mark.compare_exchange_weak(cur, bytes, std::memory_order_acq_rel)) {
  }
  return cudaSuccess;
}

// v split into two bf16 whose sum is v to ~2^-16 relative: hi = bf16(v),
// lo = bf16(v - hi). Products of both parts with bf16 data, accumulated in
// F32, keep F32-level accuracy on bf16 tensor cores (the MLA kernels).
struct Bf16HiLo {
  __nv_bfloat16 hi, lo;
};
__device__ __forceinline__ Bf16HiLo SplitBf16HiLo(float v) {
  const __nv_bfloat16 hi = __float2bfloat16_rn(v);
  return {hi, __float2bfloat16_rn(v - __bfloat162float(hi))};
}

__host__ __device__ constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace ktx::kernels::cuda
