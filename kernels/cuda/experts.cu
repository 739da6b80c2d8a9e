#include "kernels/cuda/experts.h"

#include <cstdint>

#include "kernels/cuda/cuda_util.cuh"

namespace ktx::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row; 16-byte vectors when the row and strides allow it.
__global__ void GatherRowsBf16Kernel(const __nv_bfloat16* __restrict__ src, int64_t src_stride,
                                     const int32_t* __restrict__ rows, int64_t n_cols,
                                     __nv_bfloat16* __restrict__ dst, int64_t dst_stride,
                                     bool vec) {
  const int64_t i = blockIdx.x;
  const __nv_bfloat16* s = src + static_cast<int64_t>(rows[i]) * src_stride;
  __nv_bfloat16* d = dst + i * dst_stride;
  if (vec) {
    const int64_t n_vec = n_cols / 8;
    const uint4* s4 = reinterpret_cast<const uint4*>(s);
    uint4* d4 = reinterpret_cast<uint4*>(d);
    for (int64_t c = threadIdx.x; c < n_vec; c += blockDim.x) d4[c] = s4[c];
  } else {
    for (int64_t c = threadIdx.x; c < n_cols; c += blockDim.x) d[c] = s[c];
  }
}

__global__ void ScatterAddWeightedRowsKernel(const float* __restrict__ y, int64_t y_stride,
                                             const int32_t* __restrict__ rows,
                                             const float* __restrict__ weights, int64_t n_cols,
                                             float* __restrict__ acc, int64_t acc_stride) {
  const int64_t i = blockIdx.x;
  const float w = weights[i];
  const float* yr = y + i * y_stride;
  float* a = acc + static_cast<int64_t>(rows[i]) * acc_stride;
  for (int64_t c = threadIdx.x; c < n_cols; c += blockDim.x) a[c] = a[c] + w * yr[c];
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

cudaError_t GatherRowsBf16(const __nv_bfloat16* src, int64_t src_stride, const int32_t* rows,
                           int64_t n_rows, int64_t n_cols, __nv_bfloat16* dst, int64_t dst_stride,
                           cudaStream_t stream) {
  if (n_rows < 0 || n_cols < 0 || src_stride < n_cols || dst_stride < n_cols ||
      n_rows > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (n_rows == 0 || n_cols == 0) return cudaSuccess;
  if (src == nullptr || rows == nullptr || dst == nullptr) return cudaErrorInvalidValue;
  const bool vec = n_cols % 8 == 0 && src_stride % 8 == 0 && dst_stride % 8 == 0 &&
                   Aligned16(src) && Aligned16(dst);
  GatherRowsBf16Kernel<<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
      src, src_stride, rows, n_cols, dst, dst_stride, vec);
  return cudaGetLastError();
}

cudaError_t ScatterAddWeightedRows(const float* y, int64_t y_stride, const int32_t* rows,
                                   const float* weights, int64_t n_rows, int64_t n_cols, float* acc,
                                   int64_t acc_stride, cudaStream_t stream) {
  if (n_rows < 0 || n_cols < 0 || y_stride < n_cols || acc_stride < n_cols || n_rows > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (n_rows == 0 || n_cols == 0) return cudaSuccess;
  if (y == nullptr || rows == nullptr || weights == nullptr || acc == nullptr) {
    return cudaErrorInvalidValue;
  }
  ScatterAddWeightedRowsKernel<<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
      y, y_stride, rows, weights, n_cols, acc, acc_stride);
  return cudaGetLastError();
}

}  // namespace ktx::kernels::cuda
