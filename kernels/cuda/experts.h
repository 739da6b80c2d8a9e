// File: kernels/cuda/experts.h
//
// The per-expert gather / scatter of routed experts computed on the GPU
// (runtime/gpu/gpu_experts.h): the rows of the tokens routed to one expert
// are gathered from the batch's bf16 hidden state into a dense block, the
// expert runs on that block (dequant.h for its weights, gemm.h, basic_ops.h's
// SiluMulToBf16), and its output rows are added, times each token's routing
// weight, into an F32 accumulator [n_tokens, n_embd] at the tokens' rows.
//
//   GatherRowsBf16(h_bf16, n_embd, d_rows, m, n_embd, xg, n_embd, stream);
//   ... xg -> y (F32 [m, n_embd]) ...
//   ScatterAddWeightedRows(y, n_embd, d_rows, d_weights, m, n_embd, acc, n_embd, stream);
//
// Determinism: each output element is updated by exactly one thread per
// launch (the rows of one call must be distinct, which holds for one expert:
// a token selects an expert at most once), so launches in a fixed order on
// one stream give bitwise reproducible sums.
//
// Every launcher takes a stream, never allocates, returns cudaErrorInvalidValue
// for bad arguments and otherwise the launch status. Thread-safety: reentrant.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ktx::kernels::cuda {

// dst[i, c] = src[rows[i], c] for i < n_rows, c < n_cols. src bf16
// [*, src_stride], rows I32 [n_rows] (device, valid row indices), dst bf16
// [n_rows, dst_stride].
cudaError_t GatherRowsBf16(const __nv_bfloat16* src, int64_t src_stride, const int32_t* rows,
                           int64_t n_rows, int64_t n_cols, __nv_bfloat16* dst, int64_t dst_stride,
                           cudaStream_t stream);

// acc[rows[i], c] += weights[i] * y[i, c] for i < n_rows, c < n_cols (F32
// multiply, then F32 add). y F32 [n_rows, y_stride]; rows I32 [n_rows],
// distinct; weights F32 [n_rows] (device); acc F32 [*, acc_stride].
cudaError_t ScatterAddWeightedRows(const float* y, int64_t y_stride, const int32_t* rows,
                                   const float* weights, int64_t n_rows, int64_t n_cols, float* acc,
                                   int64_t acc_stride, cudaStream_t stream);

}  // namespace ktx::kernels::cuda
