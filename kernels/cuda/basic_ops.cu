#include "kernels/cuda/basic_ops.h"

#include <algorithm>
#include <type_traits>

#include "kernels/cuda/cuda_util.cuh"

namespace ktx::kernels::cuda {
namespace {

constexpr int kThreads = 256;

unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>(CeilDiv(n, kThreads), 1, int64_t{1} << 20));
}

__global__ void EmbedKernel(const __nv_bfloat16* table, int64_t n_embd, const int32_t* tokens,
                            float* x, int64_t x_stride) {
  const __nv_bfloat16* src = table + static_cast<int64_t>(tokens[blockIdx.x]) * n_embd;
  float* dst = x + blockIdx.x * x_stride;
  for (int64_t i = threadIdx.x; i < n_embd; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
}

// One block per row. Rows of up to kRegs * blockDim.x values are read once
// into registers (all loads in flight together); longer rows are read twice.
constexpr int kRmsNormRegs = 8;

__global__ void RmsNormKernel(const float* x, int64_t x_stride, const int32_t* rows,
                              const float* weight, int64_t n, float eps, float* y_f32,
                              int64_t y_f32_stride, __nv_bfloat16* y_bf16, int64_t y_bf16_stride) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const float* src = x + (rows != nullptr ? static_cast<int64_t>(rows[r]) : r) * x_stride;
  float ss = 0.0f;
  if (n <= static_cast<int64_t>(kRmsNormRegs) * blockDim.x) {
    const int n32 = static_cast<int>(n);
    // The weights load with the row, not after the sum: one memory latency
    // fewer on the path of this (often one-block) kernel.
    float v[kRmsNormRegs], wv[kRmsNormRegs];
#pragma unroll
    for (int k = 0; k < kRmsNormRegs; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      v[k] = i < n32 ? src[i] : 0.0f;
      wv[k] = i < n32 ? weight[i] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kRmsNormRegs; ++k) ss = fmaf(v[k], v[k], ss);
    ss = BlockSum(ss, scratch);
    const float scale = 1.0f / sqrtf(ss / static_cast<float>(n) + eps);
#pragma unroll
    for (int k = 0; k < kRmsNormRegs; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i >= n32) break;
      const float o = v[k] * scale * wv[k];
      if (y_f32 != nullptr) y_f32[r * y_f32_stride + i] = o;
      if (y_bf16 != nullptr) y_bf16[r * y_bf16_stride + i] = __float2bfloat16_rn(o);
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(src[i], src[i], ss);
  ss = BlockSum(ss, scratch);
  const float scale = 1.0f / sqrtf(ss / static_cast<float>(n) + eps);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = src[i] * scale * weight[i];
    if (y_f32 != nullptr) y_f32[r * y_f32_stride + i] = v;
    if (y_bf16 != nullptr) y_bf16[r * y_bf16_stride + i] = __float2bfloat16_rn(v);
  }
}

__global__ void ConvertKernel(const float* x, int64_t x_stride, int64_t n_rows, int64_t n_cols,
                              __nv_bfloat16* y, int64_t y_stride) {
  const int64_t n = n_rows * n_cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n_cols, c = i % n_cols;
    y[r * y_stride + c] = __float2bfloat16_rn(x[r * x_stride + c]);
  }
}

__global__ void SiluMulKernel(const float* gu, int64_t gu_stride, int64_t n_rows, int64_t n_ff,
                              __nv_bfloat16* y, int64_t y_stride) {
  const int64_t n = n_rows * n_ff;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n_ff, c = i % n_ff;
    const float g = gu[r * gu_stride + c];
    const float u = gu[r * gu_stride + n_ff + c];
    y[r * y_stride + c] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
  }
}

__global__ void AddKernel(float* x, int64_t x_stride, const float* a, int64_t a_stride,
                          int64_t n_rows, int64_t n_cols) {
  const int64_t n = n_rows * n_cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n_cols, c = i % n_cols;
    x[r * x_stride + c] += a[r * a_stride + c];
  }
}

__device__ __forceinline__ float HashUniform(uint64_t seed, int64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i) + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;  // [-1, 1)
}

template <typename T>
__global__ void FillKernel(T* p, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = HashUniform(seed, i) * scale;
    if constexpr (std::is_same_v<T, float>) {
      p[i] = v;
    } else {
      p[i] = __float2bfloat16_rn(v);
    }
  }
}

}  // namespace

cudaError_t EmbedRows(const __nv_bfloat16* table, int64_t n_embd, const int32_t* tokens,
                      int64_t n_tokens, float* x, int64_t x_stride, cudaStream_t stream) {
  if (n_tokens < 0 || n_embd <= 0 || x_stride < n_embd || n_tokens > (int64_t{1} << 31) - 1) {
    return cudaErrorInvalidValue;
  }
  if (n_tokens == 0) return cudaSuccess;
  EmbedKernel<<<static_cast<unsigned>(n_tokens), kThreads, 0, stream>>>(table, n_embd, tokens, x,
                                                                        x_stride);
  return cudaGetLastError();
}

cudaError_t RmsNorm(const float* x, int64_t x_stride, const int32_t* rows, const float* weight,
                    int64_t n, int64_t n_rows, float eps, float* y_f32, int64_t y_f32_stride,
                    __nv_bfloat16* y_bf16, int64_t y_bf16_stride, cudaStream_t stream) {
  if (n <= 0 || n_rows < 0 || x_stride < n || (y_f32 == nullptr && y_bf16 == nullptr) ||
      (y_f32 != nullptr && y_f32_stride < n) || (y_bf16 != nullptr && y_bf16_stride < n) ||
      n_rows > (int64_t{1} << 31) - 1) {
    return cudaErrorInvalidValue;
  }
  if (n_rows == 0) return cudaSuccess;
  const int threads = n >= 4096 ? 1024 : 256;
  RmsNormKernel<<<static_cast<unsigned>(n_rows), threads, 0, stream>>>(
      x, x_stride, rows, weight, n, eps, y_f32, y_f32_stride, y_bf16, y_bf16_stride);
  return cudaGetLastError();
}

cudaError_t ConvertF32ToBf16(const float* x, int64_t x_stride, int64_t n_rows, int64_t n_cols,
                             __nv_bfloat16* y, int64_t y_stride, cudaStream_t stream) {
  if (n_rows < 0 || n_cols < 0 || x_stride < n_cols || y_stride < n_cols) {
    return cudaErrorInvalidValue;
  }
  if (n_rows * n_cols == 0) return cudaSuccess;
  ConvertKernel<<<GridFor(n_rows * n_cols), kThreads, 0, stream>>>(x, x_stride, n_rows, n_cols, y,
                                                                   y_stride);
  return cudaGetLastError();
}

cudaError_t SiluMulToBf16(const float* gu, int64_t gu_stride, int64_t n_rows, int64_t n_ff,
                          __nv_bfloat16* y, int64_t y_stride, cudaStream_t stream) {
  if (n_rows < 0 || n_ff < 0 || gu_stride < 2 * n_ff || y_stride < n_ff) {
    return cudaErrorInvalidValue;
  }
  if (n_rows * n_ff == 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(n_rows * n_ff), kThreads, 0, stream>>>(gu, gu_stride, n_rows, n_ff, y,
                                                                 y_stride);
  return cudaGetLastError();
}

cudaError_t AddRows(float* x, int64_t x_stride, const float* a, int64_t a_stride, int64_t n_rows,
                    int64_t n_cols, cudaStream_t stream) {
  if (n_rows < 0 || n_cols < 0 || x_stride < n_cols || a_stride < n_cols) {
    return cudaErrorInvalidValue;
  }
  if (n_rows * n_cols == 0) return cudaSuccess;
  AddKernel<<<GridFor(n_rows * n_cols), kThreads, 0, stream>>>(x, x_stride, a, a_stride, n_rows,
                                                               n_cols);
  return cudaGetLastError();
}

cudaError_t FillRandomBf16(__nv_bfloat16* p, int64_t n, uint64_t seed, float scale,
                           cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  FillKernel<<<GridFor(n), kThreads, 0, stream>>>(p, n, seed, scale);
  return cudaGetLastError();
}

cudaError_t FillRandomF32(float* p, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  FillKernel<<<GridFor(n), kThreads, 0, stream>>>(p, n, seed, scale);
  return cudaGetLastError();
}

}  // namespace ktx::kernels::cuda
