// File: kernels/cuda/mla.h
//
// Multi-head latent attention (DeepSeek-V2/V3 MLA) in the absorbed form on the
// GPU, over a PAGED latent KV cache in bf16 (docs/model.md, "MLA in the
// absorbed form"; docs/gpu.md):
//
//   MlaWriteKv    kv_a output [c | k_pe] of each new token -> cache row
//                 [rmsnorm(c) * kv_a_norm | rope(k_pe)] (bf16)
//   MlaPrepareQ   q_b output per head [q_nope | q_pe] -> q_nope in bf16 (for the
//                 batched k_b product that the caller runs with cuBLAS) and
//                 rope(q_pe) into the attention query Q = [q_abs | q_pe] (F32)
//   MlaAttention  ctx[t, h] = Σ_s softmax_s(scale · Q[t, h] · row_s) · c_s
//                 over the rows s = 0 .. pos[t] of token t's sequence: every
//                 head shares the one latent row (MQA), so a block of threads
//                 serves up to 16 heads of one query from one tile of rows.
//
// One kernel serves decode (a batch of sequences, one query each), prefill
// (all the tokens of a prompt chunk, causal: each query sees rows up to its
// own position) and any mix: each query names its sequence (a row of the block
// table) and its position. Long contexts are split over several blocks
// (flash-decoding) and merged by a second kernel; the split count comes from
// PlanMlaAttention and needs a caller-owned workspace.
//
// Paged cache of one layer: page p holds `page_size` consecutive rows of
// `row_width` = kv_lora + n_rot bf16 at data + p * page_stride; the row of
// position s of sequence q is at page block_table[q * block_table_stride +
// s / page_size], offset s % page_size.
//
// Thread-safety: launchers are reentrant; they never allocate.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/rope.h"

namespace ktx::kernels::cuda {

struct MlaPagedKv {
  __nv_bfloat16* data = nullptr;         // bf16 [n_pages][page_size][row_width] of one layer
  int64_t page_stride = 0;               // elements from one page to the next
  int32_t page_size = 0;                 // rows per page
  const int32_t* block_table = nullptr;  // I32 [n_seq][block_table_stride] (device)
  int32_t block_table_stride = 0;
};

// Per token t < n_tokens of the batch: the row [c | k_pe] = kva[t] (F32, width
// kv_lora + n_rot) becomes cache row (seq_index[t], positions[t]):
//   [bf16(rmsnorm(c) * kv_norm) | bf16(rope(k_pe, positions[t]))].
cudaError_t MlaWriteKv(const float* kva, int64_t kva_stride, const float* kv_norm, float eps,
                       int32_t kv_lora, const RopeParams& rope, const int32_t* positions,
                       const int32_t* seq_index, int64_t n_tokens, const MlaPagedKv& kv,
                       cudaStream_t stream);

// MlaWriteKv's arguments other than those MlaPrepareQ has too (kv_lora, rope,
// positions, n_tokens), for doing both in one launch.
struct MlaKvWrite {
  const float* kva = nullptr;  // F32 [n_tokens][kva_stride]: [c | k_pe]
  int64_t kva_stride = 0;
  const float* kv_norm = nullptr;  // F32 [kv_lora]
  float eps = 0.0f;
  const int32_t* seq_index = nullptr;  // I32 [n_tokens]
  MlaPagedKv kv;
};

// q: F32 [n_tokens][n_head][qk_nope + n_rot] (token stride q_stride). Writes
// q_nope: bf16 [n_tokens][n_head][qk_nope] (token stride q_nope_stride) and
// Q[t, h, kv_lora .. kv_lora + n_rot) = rope(q_pe) in F32 [n_tokens][n_head][kv_lora + n_rot]
// (token stride big_q_stride); Q[..., 0 .. kv_lora) is left to the caller.
// With write_kv, also does MlaWriteKv's work for the same tokens in the same
// launch (one launch and one rope-table latency fewer per decode layer; the
// same bits as the two calls).
cudaError_t MlaPrepareQ(const float* q, int64_t q_stride, int32_t n_head, int32_t qk_nope,
                        int32_t kv_lora, const RopeParams& rope, const int32_t* positions,
                        int64_t n_tokens, __nv_bfloat16* q_nope, int64_t q_nope_stride,
                        float* big_q, int64_t big_q_stride, cudaStream_t stream,
                        const MlaKvWrite* write_kv = nullptr);

struct MlaAttentionArgs {
  const float* q = nullptr;  // F32 [n_q][n_head][kv_lora + n_rot]: [q_abs | roped q_pe]
  int64_t q_stride = 0;      // elements from one query token to the next
  int64_t n_q = 0;
  int32_t n_head = 0;
  int32_t kv_lora = 0;             // even, at most 512
  int32_t n_rot = 0;               // even
  float scale = 1.0f;              // kq_scale
  const int32_t* q_seq = nullptr;  // I32 [n_q]: block table row of each query
  const int32_t* q_pos = nullptr;  // I32 [n_q]: the query attends to rows 0 .. q_pos
  MlaPagedKv kv;
  // Output ctx [n_q][n_head][kv_lora]: bf16 and/or F32 (either may be null).
  __nv_bfloat16* out_bf16 = nullptr;
  int64_t out_bf16_stride = 0;  // per query token
  float* out_f32 = nullptr;
  int64_t out_f32_stride = 0;
};

struct MlaAttentionPlan {
  // Tensor-core kernel (mma.sync bf16 with hi/lo splitting of Q and the
  // softmax weights: F32-level accuracy); chosen when kv_lora % 16 == 0 and
  // (kv_lora + n_rot) % 16 == 0 (DeepSeek-V2/V3, Kimi-K2). Otherwise, or when
  // a caller clears it, the CUDA-core kernel runs.
  bool tensor_cores = false;
  int32_t heads_per_block = 16;  // 4, 8 or 16 (16 with tensor cores)
  int32_t n_splits = 1;          // KV ranges per query, merged afterwards
  int32_t split_len = 0;         // rows per range (multiple of 32)
  size_t workspace_bytes = 0;    // needed by MlaAttention (0 when n_splits == 1)
  // The tensor-core kernel's form: 1, one group of 8 warps on tiles of 64
  // rows, two buffers; 2, two groups of 8 warps in one block on alternating
  // tiles of 32 rows, two buffers each, merged at the end (one group's
  // softmax and barriers overlap the other's products); 3, two groups on
  // alternating tiles of 64 rows, one buffer each (for long ranges per block).
  int32_t tc_tile_groups = 1;
};

// Chooses the kernel, heads per block and the split of the longest context
// `max_kv_len` so that the blocks fill every multiprocessor once (tensor
// cores: one block each; CUDA cores: about two), within `workspace_capacity`
// bytes of workspace.
MlaAttentionPlan PlanMlaAttention(int64_t n_q, int32_t n_head, int32_t kv_lora, int32_t n_rot,
                                  int64_t max_kv_len, int32_t n_multiprocessors,
                                  size_t workspace_capacity);

// Runs the plan. `workspace` (device) holds at least plan.workspace_bytes.
// Every query's position must lie below max_kv_len of the plan and its rows
// must be written (MlaWriteKv) before.
cudaError_t MlaAttention(const MlaAttentionArgs& args, const MlaAttentionPlan& plan,
                         void* workspace, cudaStream_t stream);

}  // namespace ktx::kernels::cuda
