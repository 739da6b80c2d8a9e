// File: kernels/cuda/skinny_gemm.h
//
// The bf16 product of decode-sized batches (issue #7, "HBM >= 60 % for
// decode attention + dense GEMV"):
//
//   y[b][t, r] = Σ_c W[b][r, c] · x[b][t, c]  (+ beta · y[b][t, r])
//   r < n_out, t < n_tokens <= kSkinnyMaxTokens, b < batch
//
// W bf16 row-major [n_out, ldw] (one row per output feature, as gemm.h), x
// bf16 [n_tokens, ldx], y F32 or bf16 [n_tokens, ldy]; `batch` independent
// products with element strides between them (the absorbed attention's
// per-head k_b / v_b products).
//
// Why not cuBLAS: for 1..16 tokens its GEMM kernels read the weights at
// ~58 % of the H200's copy bandwidth (docs/performance.md, "GPU"), and the
// algorithm it picks may change with the token count, so a token's result
// may depend on how many others share its batch. This kernel streams every
// weight once with 16-byte read-only loads straight into tensor-core
// registers (mma.sync m16n8k16, F32 accumulation; the loads skip L1 and ask
// L2 for whole 128-byte lines) and keeps a fixed order:
//
// How: a warp owns a tile of 16 rows and a contiguous range of 32-element
// k-steps; per k-step each lane loads 8 consecutive weights of row g and of
// row g + 8 (g = lane / 4, k = 32 s + 8 (lane % 4)) and the same 8 elements
// of token g's x, which are exactly the operands of two m16n8k16 products
// (their k order inside a product is permuted alike for W and x, which a sum
// does not see). A warp works in rounds of `unroll` k-steps; pipelined, the
// next round's loads are issued before the current round is multiplied (two
// register sets; the plan's choice where a warp has >= 2 rounds). The
// warps of a tile (and, for few tiles, several blocks: `split`) take
// consecutive k ranges; their partial sums are added in a fixed order (warps
// of a block through shared memory, then blocks in index order by the last
// block to finish, found with a per-tile counter in the workspace).
//
// Batch invariant, bit for bit: the plan (PlanSkinnyGemm) depends on n_out,
// n_in, batch and the device only, never on n_tokens; a token's column of
// every product depends only on its own x (tensor-core products compute each
// output element from its row and column alone), and tokens beyond the first
// 8, 16 or 32 only add further column tiles. So a token's y is the same
// whether it is computed alone or with up to kSkinnyMaxTokens others
// (tested: SkinnyGemmTest.BatchInvariant). Deterministic.
//
// Numerics: products of bf16 are exact in F32; sums in F32 (the tensor
// cores' internal order within a k-step of 16, then one add per k-step per
// warp, then at most 7 adds of warps and split - 1 of blocks): within
// (ceil(n_in / 16) + 16 + split) · 2^-24 · Σ_c |W_rc · x_tc| (+ |beta · y|),
// plus one bf16 rounding (2^-9 relative) for bf16 outputs (the test checks
// against float64 with this bound).
//
// Requirements (cudaErrorInvalidValue otherwise; SkinnyGemmSupported says
// which): 1 <= n_tokens <= kSkinnyMaxTokens; n_in % 8 == 0; w, x 16-byte
// aligned; ldw, ldx, w_batch_stride, x_batch_stride multiples of 8; a
// workspace of SkinnyGemmWorkspaceBytes(plan) bytes, 16-byte aligned, whose
// counter area is zero before the first call (cudaMemset once; every call
// leaves it zero again), unless the plan has split == 1 (no workspace).
// Calls sharing a workspace must be ordered on one stream. One launch, no
// allocation, capturable in CUDA graphs. Thread-safety: reentrant.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace ktx::kernels::cuda {

inline constexpr int64_t kSkinnyMaxTokens = 64;

struct SkinnyGemmArgs {
  const __nv_bfloat16* w = nullptr;
  int64_t ldw = 0;
  int64_t w_batch_stride = 0;
  const __nv_bfloat16* x = nullptr;
  int64_t ldx = 0;
  int64_t x_batch_stride = 0;
  void* y = nullptr;  // F32, or bf16 with y_bf16
  bool y_bf16 = false;
  int64_t ldy = 0;
  int64_t y_batch_stride = 0;
  int64_t n_out = 0;
  int64_t n_in = 0;
  int64_t n_tokens = 0;
  int64_t batch = 1;
  float beta = 0.0f;  // 0: y is only written (never read)
};

// Launch shape, from the matrix shape and the device only. Blocks of 8 warps;
// tiles_per_block (1, 2, 4 or 8) row tiles of 16 per block, each taken by
// 8 / tiles_per_block warps (one tile per block unless rows are short);
// split > 1 (then tiles_per_block == 1): the k range of a tile is cut among
// `split` blocks (tiles for fewer than half the SMs, or long rows of >= 256
// k-steps on fewer than 6 tiles per SM: see PlanSkinnyGemm). unroll: k-steps per
// round of loads; pipelined: see above. Column tiles of more than 16 tokens
// always run unroll 2, not pipelined (their accumulators need the registers).
struct SkinnyGemmPlan {
  int64_t n_out = 0;
  int64_t n_in = 0;
  int64_t batch = 1;
  int tiles_per_block = 1;
  int split = 1;
  int unroll = 2;          // 2, 4 or 8 (8 is not pipelined)
  bool pipelined = false;  // the next round's loads issued before this round's products
};

// n_sm: the device's multiprocessors.
SkinnyGemmPlan PlanSkinnyGemm(int64_t n_out, int64_t n_in, int64_t batch, int n_sm);

// Workspace bytes (0 when split == 1): F32 partial sums of kSkinnyMaxTokens x
// 16 per (product, tile, block of the split), then one I32 counter per
// (product, tile). At most ~192 KiB per SM (under 6 tiles per SM in at most
// 8 parts, or fewer than half a tile per SM in ~4 parts per SM); 11-12.3 MiB
// for DeepSeek-V3's attn_output and dense down on 132 SMs.
size_t SkinnyGemmWorkspaceBytes(const SkinnyGemmPlan& plan);
// Offset of the counter area in the workspace (zero it once).
size_t SkinnyGemmCounterOffset(const SkinnyGemmPlan& plan);

// "" when the kernel takes these arguments (shape and alignment; the
// workspace is checked at the call), else why not.
std::string SkinnyGemmUnsupportedReason(const SkinnyGemmArgs& args);

// Enqueues the product on `stream`. plan: PlanSkinnyGemm for args' shape.
cudaError_t SkinnyGemm(const SkinnyGemmArgs& args, const SkinnyGemmPlan& plan, void* workspace,
                       size_t workspace_bytes, cudaStream_t stream);

}  // namespace ktx::kernels::cuda
