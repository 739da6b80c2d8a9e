#include "kernels/cuda/gemm.h"

#include <limits>

namespace ktx::kernels::cuda {
namespace {

bool FitsInt(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

}  // namespace

cublasStatus_t LinearBf16(cublasHandle_t handle, const __nv_bfloat16* w, int64_t ldw,
                          const __nv_bfloat16* x, int64_t ldx, void* y, cudaDataType_t y_type,
                          int64_t ldy, int64_t n_out, int64_t n_in, int64_t n_tokens, float beta) {
  if (!FitsInt(n_out) || !FitsInt(n_in) || !FitsInt(n_tokens) || !FitsInt(ldw) || !FitsInt(ldx) ||
      !FitsInt(ldy) || ldw < n_in || ldx < n_in || ldy < n_out ||
      (y_type != CUDA_R_32F && y_type != CUDA_R_16BF)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (n_out == 0 || n_tokens == 0) return CUBLAS_STATUS_SUCCESS;
  const float alpha = 1.0f;
  return cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n_out),
                      static_cast<int>(n_tokens), static_cast<int>(n_in), &alpha, w, CUDA_R_16BF,
                      static_cast<int>(ldw), x, CUDA_R_16BF, static_cast<int>(ldx), &beta, y,
                      y_type, static_cast<int>(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t LinearBf16Batched(cublasHandle_t handle, const __nv_bfloat16* w, int64_t ldw,
                                 int64_t w_batch_stride, const __nv_bfloat16* x, int64_t ldx,
                                 int64_t x_batch_stride, void* y, cudaDataType_t y_type,
                                 int64_t ldy, int64_t y_batch_stride, int64_t n_out, int64_t n_in,
                                 int64_t n_tokens, int64_t batch, float beta) {
  if (!FitsInt(n_out) || !FitsInt(n_in) || !FitsInt(n_tokens) || !FitsInt(ldw) || !FitsInt(ldx) ||
      !FitsInt(ldy) || !FitsInt(batch) || ldw < n_in || ldx < n_in || ldy < n_out ||
      (y_type != CUDA_R_32F && y_type != CUDA_R_16BF)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (n_out == 0 || n_tokens == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  const float alpha = 1.0f;
  return cublasGemmStridedBatchedEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n_out), static_cast<int>(n_tokens),
      static_cast<int>(n_in), &alpha, w, CUDA_R_16BF, static_cast<int>(ldw), w_batch_stride, x,
      CUDA_R_16BF, static_cast<int>(ldx), x_batch_stride, &beta, y, y_type, static_cast<int>(ldy),
      y_batch_stride, static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t LinearBf16TransposedWeight(cublasHandle_t handle, const __nv_bfloat16* w,
                                          int64_t ldw, const __nv_bfloat16* x, int64_t ldx, void* y,
                                          cudaDataType_t y_type, int64_t ldy, int64_t n_out,
                                          int64_t n_in, int64_t n_tokens, float beta) {
  if (!FitsInt(n_out) || !FitsInt(n_in) || !FitsInt(n_tokens) || !FitsInt(ldw) || !FitsInt(ldx) ||
      !FitsInt(ldy) || ldw < n_out || ldx < n_in || ldy < n_out ||
      (y_type != CUDA_R_32F && y_type != CUDA_R_16BF)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (n_out == 0 || n_tokens == 0) return CUBLAS_STATUS_SUCCESS;
  const float alpha = 1.0f;
  // Column-major: W is (n_out x n_in) with leading dimension ldw, not transposed.
  return cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n_out),
                      static_cast<int>(n_tokens), static_cast<int>(n_in), &alpha, w, CUDA_R_16BF,
                      static_cast<int>(ldw), x, CUDA_R_16BF, static_cast<int>(ldx), &beta, y,
                      y_type, static_cast<int>(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t LinearF32(cublasHandle_t handle, const float* w, int64_t ldw, const float* x,
                         int64_t ldx, float* y, int64_t ldy, int64_t n_out, int64_t n_in,
                         int64_t n_tokens, float beta) {
  if (!FitsInt(n_out) || !FitsInt(n_in) || !FitsInt(n_tokens) || !FitsInt(ldw) || !FitsInt(ldx) ||
      !FitsInt(ldy) || ldw < n_in || ldx < n_in || ldy < n_out) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (n_out == 0 || n_tokens == 0) return CUBLAS_STATUS_SUCCESS;
  const float alpha = 1.0f;
  return cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n_out),
                      static_cast<int>(n_tokens), static_cast<int>(n_in), &alpha, w, CUDA_R_32F,
                      static_cast<int>(ldw), x, CUDA_R_32F, static_cast<int>(ldx), &beta, y,
                      CUDA_R_32F, static_cast<int>(ldy), CUBLAS_COMPUTE_32F_PEDANTIC,
                      CUBLAS_GEMM_DEFAULT);
}

}  // namespace ktx::kernels::cuda
