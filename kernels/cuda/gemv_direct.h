// File: kernels/cuda/gemv_direct.h
//
// The "direct" quantized GEMV (issues #7, #9): the same product as
// QuantGemv (gemv.h),
//
//   y[t, r] = Σ_c W[r, c] · x[t, c]  (+ beta · y[t, r])   r < n_out, t < n_tokens
//
// with W in GGUF blocks, x bf16 [n_tokens, ldx], y F32 [n_tokens, ldy], but
// without shared-memory staging or cp.async: lanes load their GGUF bytes
// straight from global memory into registers (read-only path, __ldg) and
// decode them there. QuantGemv (gemv.cu) dispatches to it for the types it
// supports (BF16, Q8_0, Q4_K, Q6_K) unless the kernel choice says "ring"
// (CurrentGemvKernel below: SetGemvKernel, else env KTX_GEMV_KERNEL, else
// kDefaultGemvKernel in gemv_direct.cu).
//
// How: a row is cut into chunks of 1024 weights (4 Q4_K/Q6_K blocks, 32
// Q8_0 blocks, 2048 BF16 bytes); a warp takes one chunk per step and each
// lane owns 32 weights of it as 4 pieces of 8 consecutive weights:
//   Q4_K  8 lanes per block: one 16-byte load of the block's header (d,
//         dmin, scales; the same address for the 8 lanes) and one 16-byte
//         load of its quants (32 nibbles = two 16-weight runs);
//   Q6_K  8 lanes per block (half h, 8-byte column group g): ql, ql + 32,
//         qh, the 8 scale bytes of the half and d; blocks are 210 bytes, so
//         only 2-byte aligned: each 8 bytes come from 3 aligned 4-byte loads
//         and two funnel shifts;
//   Q8_0  4 lanes per block, 4 blocks per lane: d and 8 quant bytes (as Q6_K);
//   BF16  4 16-byte loads per lane, lanes interleaved (fully coalesced).
// Consecutive lanes read consecutive bytes. `unroll` chunks (x rows_per_warp
// rows) are loaded before any is decoded, so that many independent loads are
// in flight per lane (Q4_K: 576 bytes per warp per chunk and row). x is read
// from global memory (16-byte loads when x is 16-byte aligned and ldx % 8 ==
// 0, else element by element; it stays in L1/L2), every weight is multiplied
// with all tokens of the pass (up to 8; more run as further passes). Blocks of
// 8 warps; a row (or a group of rows_per_warp rows) is owned by 1, 2, 4 or 8
// warps of one block (more for few rows, so that enough warps stream), which
// take every split-th step of it; grid = row groups (not persistent).
//
// Numerics: weights are expanded with the float operations of
// gemv_decode.cuh DecodePiece (= dequant.cu = kernels/cpu/quant
// DequantizeRow), bit for bit (tested on the host: GemvDirectDecode.*); for
// Q4_K d1·q − m1 is one fused multiply-add, which is the same value because
// d1·q is exact (11 + 6 + 4 significant bits). Sums: per lane sequentially
// over its weights (fused multiply-adds, at most 32 · ceil(n_in / 1024)),
// then a warp tree (5), then the partials of the up to 8 warps sharing a row
// in warp order (7), then beta · y (1): error within
// (32 · ceil(n_in / 1024) + 16) · 2^-24 · (Σ|w·x| + |beta · y|) of the exact
// product of the dequantized row. Deterministic (fixed orders, independent of
// the launch geometry's timing).
//
// Requirements (cudaErrorInvalidValue otherwise): those of QuantGemv, and
// CanDirectGemv(type, row_bytes). Reads never go past the last row's bytes
// rounded up to 4 (Q6_K, Q8_0) or 16 (Q4_K, BF16: whole 16-byte units).
// Never allocates; one launch per pass of up to 8 tokens, capturable in CUDA
// graphs. Thread-safety: reentrant; SetGemvKernel is atomic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string_view>

#include "kernels/common/tensor_type.h"

namespace ktx::kernels::cuda {

// Launch shape of the direct kernel. unroll: chunks loaded per lane before
// decoding (1, 2 or 4); rows_per_warp: rows a warp streams side by side,
// sharing each x load (1 or 2). Compiled combinations: (1,1), (2,1), (4,1),
// (2,2); others are rejected.
struct DirectGemvConfig {
  int unroll = 2;
  int rows_per_warp = 1;
};

// kQ8: the int8 dot-product kernel (gemv_q8.h); it needs a workspace
// (QuantGemv's workspace overload, gemv.h); without one, kDirect runs.
enum class GemvKernel { kRing, kDirect, kQ8 };

struct GemvKernelChoice {
  GemvKernel kernel = GemvKernel::kDirect;
  DirectGemvConfig direct;  // for kQ8: direct.unroll is the q8 kernel's unroll (1, 2, 4)
};

// "ring" | "direct" | "direct:U" | "direct:U:R" (U unroll, R rows per warp,
// a compiled combination) | "q8" | "q8:U" (U 1, 2 or 4). False (and *out
// untouched) on anything else.
bool ParseGemvKernel(std::string_view spec, GemvKernelChoice* out);

// The kernel QuantGemv uses: the last SetGemvKernel, else KTX_GEMV_KERNEL
// (read once; an unparsable value is ignored), else the built-in default.
GemvKernelChoice CurrentGemvKernel();
// Process-wide override (tests, benchmarks).
void SetGemvKernel(const GemvKernelChoice& choice);

// Types and row strides the direct kernel handles: Q4_K and BF16 with
// row_bytes % 16 == 0, Q6_K and Q8_0 with row_bytes % 2 == 0.
bool CanDirectGemv(TensorType type, int64_t row_bytes);

// The direct kernel itself (QuantGemv's arguments plus the launch shape).
cudaError_t DirectGemv(TensorType type, const void* w, int64_t row_bytes, int64_t n_out,
                       int64_t n_in, const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens,
                       float* y, int64_t ldy, float beta, const DirectGemvConfig& config,
                       cudaStream_t stream);

}  // namespace ktx::kernels::cuda
