// File: kernels/cuda/gemv.h
//
// Quantized matrix-vector products for small token counts (decode): the
// weights are read straight from their GGUF blocks on the device (0.56 bytes
// per weight for Q4_K .. 1.06 for Q8_0, against 2 for a bf16 copy), so a
// memory-bound product at 1..8 tokens moves fewer bytes than cuBLAS on the
// dequantized bf16 matrix.
//
//   y[t, r] = Σ_c W[r, c] · x[t, c]  (+ beta · y[t, r])   r < n_out, t < n_tokens
//
// W: n_out rows of `row_bytes` bytes (GGUF block layout, as uploaded from the
// file); x: bf16 [n_tokens, ldx]; y: F32 [n_tokens, ldy].
//
//   QuantGemv(TensorType::kQ4_K, d_blocks, row_bytes, n_out, n_in, d_x, n_in, 1, d_y, n_out,
//             0.0f, stream);
//
// Numerics: every weight is expanded with the float operations of
// dequant.h (= kernels/cpu/quant DequantizeRow), in F32 (not rounded to
// bf16), multiplied by the bf16 activation and accumulated in F32: per lane
// sequentially over its elements (at most 8 · ceil(n_in / 256) of them, by
// fused multiply-adds: one rounding each), then a warp tree over 32 lanes (5
// roundings), then the partial sums of the (up to 8) warps sharing a row in
// a fixed order (7), then beta · y (1). Error against the exact dot product
// of the dequantized row is thus within (8 · ceil(n_in / 256) + 16) · 2^-24 ·
// (Σ|w·x| + |beta · y|): the tests' bound. Deterministic (fixed orders).
// The result differs from cuBLAS on the bf16 copy by that copy's rounding
// of each weight (2^-9 relative), i.e. the GEMV is slightly MORE accurate.
//
// How (docs/gpu.md, "Weight forms and the quantized GEMV"): blocks of 8
// warps, as many as are resident at once (a persistent grid); x for the
// pass's tokens is staged once per block in shared memory as bf16; 1, 2, 4 or
// 8 warps share a row (more for small n_out, so that enough warps stream),
// each taking every split-th tile of it; a block takes groups of 8 / split
// rows round-robin; each warp streams its tiles (2048 elements, 1024 for
// BF16/F16) through a 4-deep cp.async ring (16-byte copies) in its own
// shared memory; lanes expand 8 consecutive weights at a time and multiply
// them with every token of the pass, so each weight byte is read from memory
// once per pass. Token groups: up to 8 tokens, fewer
// when n_in · group · 2 bytes of x does not fit shared memory next to the
// rings (n_in 16384: 6 tokens; 18432: 5); more tokens than one group run as
// several passes (each pass re-reads W).
//
// For BF16, Q8_0, Q4_K and Q6_K (CanDirectGemv) QuantGemv runs the "direct"
// kernel instead unless KTX_GEMV_KERNEL=ring (gemv_direct.h: no shared-memory
// staging, 8 tokens per pass, its own bound of (32 · ceil(n_in / 1024) + 16)
// roundings); what follows describes the "ring" kernel.
//
// Requirements (cudaErrorInvalidValue otherwise): a supported type; n_in a
// multiple of 32 and of the block size; row_bytes >= the row's bytes; w 16-byte
// aligned and READABLE up to the next multiple of 16 bytes past its last row
// (cp.async copies whole 16-byte units; allocations from cudaMalloc padded to
// 16 bytes are); for Q4_K / Q5_K row_bytes a multiple of 16; ldx >= n_in;
// ldy >= n_out; n_tokens >= 0. x rows 16-byte aligned (ldx % 8 == 0) are
// staged with 16-byte loads, others element by element.
//
// Never allocates; one launch per token group, on `stream`; capturable in
// CUDA graphs after the first call per device (which may raise the kernel's
// shared-memory limit). Thread-safety: reentrant.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/common/tensor_type.h"

namespace ktx::kernels::cuda {

// True for the storage types QuantGemv accepts: BF16, F16, Q4_0, Q5_0, Q8_0,
// Q4_K, Q5_K, Q6_K, IQ4_XS.
bool CanQuantGemv(TensorType type);

// The most tokens one pass of QuantGemv handles for rows of n_in elements of
// `type` on the current device (<= 8; 0 when not even one token's x fits, or
// on a query error). More tokens run in ceil(n_tokens / this) passes.
int QuantGemvTokensPerPass(TensorType type, int64_t n_in);

cudaError_t QuantGemv(TensorType type, const void* w, int64_t row_bytes, int64_t n_out,
                      int64_t n_in, const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens, float* y,
                      int64_t ldy, float beta, cudaStream_t stream);

// The same product with a caller-owned device workspace (16-byte aligned)
// for kernels that need one: when the kernel choice is "q8"
// (KTX_GEMV_KERNEL=q8 or SetGemvKernel; gemv_direct.h), the type is Q4_K,
// Q6_K or Q8_0 with CanQ8Gemv(type, row_bytes) and workspace_bytes >=
// QuantGemvWorkspaceBytes(n_in, n_tokens), the int8 dot-product kernel runs
// (gemv_q8.h: activations quantized to int8, its own error bound); otherwise
// exactly QuantGemv above (the workspace unused; "q8" then means the direct
// kernel).
size_t QuantGemvWorkspaceBytes(int64_t n_in, int64_t n_tokens);
cudaError_t QuantGemv(TensorType type, const void* w, int64_t row_bytes, int64_t n_out,
                      int64_t n_in, const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens, float* y,
                      int64_t ldy, float beta, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream);

}  // namespace ktx::kernels::cuda
