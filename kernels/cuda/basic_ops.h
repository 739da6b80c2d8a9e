// File: kernels/cuda/basic_ops.h
//
// The small element-wise and row-wise kernels of the GPU model path: embedding
// lookup from a bf16 table, RMSNorm (optionally over a gathered set of rows,
// F32 and/or bf16 output), F32 -> bf16 conversion, the SiLU gate of the FFNs,
// residual adds and deterministic random fills for benchmarks. All activations
// are row-major with an explicit row stride (in elements).
//
// Every launcher takes a stream, never allocates, returns cudaErrorInvalidValue
// for bad arguments and otherwise the launch status (cudaGetLastError).
// Thread-safety: launchers are reentrant.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ktx::kernels::cuda {

// x[t, :] = float(table[tokens[t], :]) for t < n_tokens. table: bf16 [n_vocab, n_embd];
// tokens must be valid ids (checked by the caller); x: F32 [n_tokens, x_stride].
cudaError_t EmbedRows(const __nv_bfloat16* table, int64_t n_embd, const int32_t* tokens,
                      int64_t n_tokens, float* x, int64_t x_stride, cudaStream_t stream);

// For r < n_rows, with src = rows ? rows[r] : r:
//   y[r, i] = x[src, i] / sqrt(mean_i(x[src, :]^2) + eps) * weight[i]   (F32 math)
// written to y_f32 (F32 [n_rows, y_f32_stride]) and/or y_bf16 (bf16 [n_rows,
// y_bf16_stride]); either may be null, not both. y_f32 may alias x when rows is null.
cudaError_t RmsNorm(const float* x, int64_t x_stride, const int32_t* rows, const float* weight,
                    int64_t n, int64_t n_rows, float eps, float* y_f32, int64_t y_f32_stride,
                    __nv_bfloat16* y_bf16, int64_t y_bf16_stride, cudaStream_t stream);

// y[r, c] = bf16(x[r, c]) (round to nearest even).
cudaError_t ConvertF32ToBf16(const float* x, int64_t x_stride, int64_t n_rows, int64_t n_cols,
                             __nv_bfloat16* y, int64_t y_stride, cudaStream_t stream);

// y[r, c] = bf16(silu(gu[r, c]) * gu[r, n_ff + c]) for c < n_ff: the gate and up
// projections side by side in one F32 row [gate (n_ff) | up (n_ff)].
cudaError_t SiluMulToBf16(const float* gu, int64_t gu_stride, int64_t n_rows, int64_t n_ff,
                          __nv_bfloat16* y, int64_t y_stride, cudaStream_t stream);

// x[r, c] += a[r, c].
cudaError_t AddRows(float* x, int64_t x_stride, const float* a, int64_t a_stride, int64_t n_rows,
                    int64_t n_cols, cudaStream_t stream);

// p[i] = bf16 / F32 of a uniform value in [-scale, scale) from a hash of (seed, i):
// deterministic, never all zeros. For benchmarks with random weights.
cudaError_t FillRandomBf16(__nv_bfloat16* p, int64_t n, uint64_t seed, float scale,
                           cudaStream_t stream);
cudaError_t FillRandomF32(float* p, int64_t n, uint64_t seed, float scale, cudaStream_t stream);

}  // namespace ktx::kernels::cuda
