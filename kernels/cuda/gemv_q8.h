// File: kernels/cuda/gemv_q8.h
//
// The "q8" quantized GEMV (issue #7): the product of QuantGemv (gemv.h),
//
//   y[t, r] = Σ_c W[r, c] · x[t, c]  (+ beta · y[t, r])   r < n_out, t < n_tokens
//
// W in GGUF blocks (Q4_K, Q6_K, Q8_0), x bf16 [n_tokens, ldx], y F32
// [n_tokens, ldy], computed with int8 dot products (__dp4a) instead of
// expanding every weight to F32 (the ring / direct kernels spend ~25-30
// instructions per weight and are ALU-bound on the H200).
//
// How: (1) the activations are quantized once per call into the caller's
// workspace: per token and block of 32 elements, amax = max |x|,
// dx = fl(amax / 127), qx[i] = round-half-even(fl(x[i] / dx)) in [-127, 127]
// (0 when amax = 0), sx = Σ qx (Q8GemvWorkspaceBytes; layout below).
// (2) a warp streams a row in chunks of 1024 weights with the loads of the
// direct kernel (gemv_direct_decode.cuh DirectLoad: 8 lanes per Q4_K / Q6_K
// block, 4 lanes per Q8_0 block); per lane and token it forms integer sums of
// raw quants times qx with __dp4a and adds them to an F32 accumulator:
//   Q8_0  per block piece of 8:  fma(d · dx, Σ q·qx, acc)
//   Q4_K  per half sub-block of 16 (two sub-blocks per lane):
//         fma(d·sc · dx, Σ q·qx, acc), and (first half only)
//         fma(−(dmin·m · dx), sx, acc)   (q = nibbles 0..15)
//   Q6_K  per group of 8 (one int8 scale): fma(d·sc · dx, Σ (q−32)·qx, acc)
// d·sc and dmin·m are exact in F32 (11 + 8 significant bits). All tokens of
// a pass (up to 8) share each weight load; more run as further passes.
// Blocks of 8 warps; 1, 2, 4 or 8 warps per row (more for few rows), chosen
// from n_out and n_in only. `unroll` chunks are loaded before any is used.
//
// Numerics (derived; the tests check both parts):
//  (a) activation quantization: |x − dx·qx| <= dx · (1/2 + 127 · 2^-24)
//      and dx <= amax · (1 + 2^-24) / 127, so per element
//      |x − x̂| <= amax_b / 254 · (1 + 2^-12)   (x̂ = dx · qx; amax_b the max
//      |x| of its block of 32: relative error <= 2^-8 of the block's max),
//      hence |Σ W·x − Σ W·x̂| <= Σ_b amax_b / 254 · (1 + 2^-12) · Σ_{c∈b} |W_c|.
//      (Holds while dx is a normal float, amax_b >= 2^-119; tinier blocks
//      lose relative accuracy, absolutely below 2^-119 · Σ|W|.)
//  (b) F32 arithmetic against the exact Σ W·x̂: integer sums are exact; per
//      term one rounding of (scale · dx) and one of the fused add; per lane
//      at most 4 · ceil(n_in / 1024) fused adds, a 5-level warp tree, up to
//      7 adds of warps sharing a row, beta · y: within
//      (4 · ceil(n_in / 1024) + 16) · 2^-24 · (Σ_c (|W_c| + 2·|mn_c|) · |x̂_c|
//      + |beta · y|), where mn_c = dmin·m of c's Q4_K sub-block (0 else).
// Deterministic (fixed orders). Batch invariant: a token's result does not
// depend on the other tokens of the call or their number (the quantization
// is per token, every token's sums run in the same order in every pass
// width, the launch shape does not depend on n_tokens).
//
// Workspace (device, caller-owned, 16-byte aligned, Q8GemvWorkspaceBytes):
//   int8 qx [n_tokens, n_in] at offset 0;
//   {F32 dx, I32 sx} [n_tokens, n_in / 32] at offset round_up(n_tokens · n_in, 16).
//
// Requirements (cudaErrorInvalidValue otherwise): those of DirectGemv
// (gemv_direct.h) for the type, CanQ8Gemv(type, row_bytes), a workspace of at
// least Q8GemvWorkspaceBytes(n_in, n_tokens) bytes, 16-byte aligned. Never
// allocates; two or more launches on `stream` (quantize, then one per pass of
// 8 tokens), capturable in CUDA graphs. Thread-safety: reentrant (calls
// sharing a workspace must be ordered on one stream).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/common/tensor_type.h"

namespace ktx::kernels::cuda {

// Launch shape of the q8 kernel. unroll: chunks of 1024 weights loaded per
// lane before they are used (1, 2 or 4).
struct Q8GemvConfig {
  int unroll = 2;
};

// Q4_K with row_bytes % 16 == 0, Q6_K and Q8_0 with row_bytes % 2 == 0.
bool CanQ8Gemv(TensorType type, int64_t row_bytes);

// Workspace bytes for n_tokens activation rows of n_in elements (n_in a
// multiple of 32); 0 for n_tokens <= 0 or n_in <= 0.
size_t Q8GemvWorkspaceBytes(int64_t n_in, int64_t n_tokens);

// Step (1) alone (the GEMV runs it itself): quantizes x into `workspace`.
// Exposed for tests. Requirements: n_in % 32 == 0, ldx >= n_in.
cudaError_t QuantizeActivationsQ8(const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens,
                                  int64_t n_in, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream);

cudaError_t Q8Gemv(TensorType type, const void* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                   const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens, float* y, int64_t ldy,
                   float beta, void* workspace, size_t workspace_bytes, const Q8GemvConfig& config,
                   cudaStream_t stream);

}  // namespace ktx::kernels::cuda
