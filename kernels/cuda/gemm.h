// File: kernels/cuda/gemm.h
//
// The matrix products of the GPU model path, through cuBLAS (bf16 inputs,
// fp32 accumulation: cublasGemmEx with CUBLAS_COMPUTE_32F). ktx stores a
// weight as row-major [n_out, n_in] (one row per output feature, as GGUF's
// ne0-rows) and activations as row-major [n_tokens, n_in], so
//   y[t, r] = Σ_c W[r, c] · x[t, c]  (+ beta · y[t, r])
// is, in cuBLAS's column-major terms, C (n_out x n_tokens, ld = ldy) =
// op_T(W) · X with W seen as an (n_in x n_out) matrix of leading dimension ldw.
//
// The caller owns the handle (its stream and its workspace, set with
// cublasSetStream / cublasSetWorkspace, so that cuBLAS allocates nothing),
// and gets cuBLAS's status back. Thread-safety: as the handle's.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdint>

namespace ktx::kernels::cuda {

// y: F32 (CUDA_R_32F) or bf16 (CUDA_R_16BF) [n_tokens, ldy]; W bf16 [n_out, ldw]; x bf16
// [n_tokens, ldx]. beta = 0 overwrites y, 1 accumulates (residual adds).
cublasStatus_t LinearBf16(cublasHandle_t handle, const __nv_bfloat16* w, int64_t ldw,
                          const __nv_bfloat16* x, int64_t ldx, void* y, cudaDataType_t y_type,
                          int64_t ldy, int64_t n_out, int64_t n_in, int64_t n_tokens,
                          float beta = 0.0f);

// `batch` independent products (one per attention head): product b uses
// w + b * w_batch_stride, x + b * x_batch_stride, y + b * y_batch_stride
// (strides in elements).
cublasStatus_t LinearBf16Batched(cublasHandle_t handle, const __nv_bfloat16* w, int64_t ldw,
                                 int64_t w_batch_stride, const __nv_bfloat16* x, int64_t ldx,
                                 int64_t x_batch_stride, void* y, cudaDataType_t y_type,
                                 int64_t ldy, int64_t y_batch_stride, int64_t n_out, int64_t n_in,
                                 int64_t n_tokens, int64_t batch, float beta = 0.0f);

// y[t, r] = Σ_c W[c, r] · x[t, c] (+ beta · y[t, r]) with the weight stored
// the other way round: W bf16 [n_in, ldw], one row per input feature (the MLA
// prefill's context product, whose "weight" is the latent rows). y: F32 or
// bf16 [n_tokens, ldy]; x bf16 [n_tokens, ldx].
cublasStatus_t LinearBf16TransposedWeight(cublasHandle_t handle, const __nv_bfloat16* w,
                                          int64_t ldw, const __nv_bfloat16* x, int64_t ldx, void* y,
                                          cudaDataType_t y_type, int64_t ldy, int64_t n_out,
                                          int64_t n_in, int64_t n_tokens, float beta = 0.0f);

// The same in F32 with F32 accumulation and no TF32 (the MoE router, whose
// small score gaps decide which experts run).
cublasStatus_t LinearF32(cublasHandle_t handle, const float* w, int64_t ldw, const float* x,
                         int64_t ldx, float* y, int64_t ldy, int64_t n_out, int64_t n_in,
                         int64_t n_tokens, float beta = 0.0f);

}  // namespace ktx::kernels::cuda
