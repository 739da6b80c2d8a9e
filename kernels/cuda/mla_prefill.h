// File: kernels/cuda/mla_prefill.h
//
// MLA attention (absorbed form, paged bf16 latent cache; kernels/cuda/mla.h)
// for a PROMPT CHUNK: one sequence's queries at consecutive positions
// pos0 .. pos0 + n_q - 1, each attending causally to the rows 0 .. its own
// position. Every head attends to the same latent rows (MQA), so the scores of
// all (query, head) pairs of a chunk are one matrix product and the context
// another, both on cuBLAS's bf16 tensor-core GEMMs with F32 accumulation:
//
//   G   = the sequence's rows 0 .. pos0 + n_q gathered from the pages, each
//         twice: G[s] = [row_s | row_s]                       bf16 [n_rows][2 rw]
//   per chunk of queries (rows m = (query, head)):
//   Qs  = [bf16(Q) | bf16(Q - bf16(Q))]  (hi | lo)            bf16 [M][2 rw]
//   S   = Qs · Gᵀ          (= Q_hi · row + Q_lo · row)        F32  [M][ld_s]
//   P   = softmax_s(scale · S) over s <= the query's position, written over S
//         in place as (hi, lo) bf16 pairs, zero beyond it     bf16 [M][2 ld_s]
//   ctx = P · G viewed as [2 n_rows][rw], first kv_lora columns (each row
//         twice: P_hi · c + P_lo · c)                          [M][kv_lora]
//
// The hi/lo splits give the same F32-level accuracy as the tensor-core kernel
// of mla.h (~2^-16 relative per product) at twice the tensor-core work; the
// GEMMs run near the card's bf16 rate where the one-query-per-block kernel
// re-reads the rows once per (query, 16 heads). The score matrix of a chunk
// lives in the workspace, so the plan sizes the chunks to it.
//
// Thread-safety: launchers are reentrant; they never allocate. The cuBLAS
// handle must be bound to `stream` (cublasSetStream) with its own workspace.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/mla.h"

namespace ktx::kernels::cuda {

struct MlaPrefillArgs {
  const float* q = nullptr;  // F32 [n_q][n_head][kv_lora + n_rot]: [q_abs | roped q_pe]
  int64_t q_stride = 0;      // elements from one query token to the next
  int64_t n_q = 0;
  int32_t n_head = 0;
  int32_t kv_lora = 0;  // multiple of 8
  int32_t n_rot = 0;    // kv_lora + n_rot a multiple of 8
  float scale = 1.0f;   // kq_scale
  int32_t seq = 0;      // (host) block table row of the sequence
  int64_t pos0 = 0;     // (host) position of the first query; rows 0 .. pos0 + n_q - 1 written
  MlaPagedKv kv;
  // Output ctx [n_q][n_head][kv_lora], bf16 and/or F32 (either may be null,
  // not both); each with a token stride of exactly n_head * kv_lora.
  __nv_bfloat16* out_bf16 = nullptr;
  float* out_f32 = nullptr;
};

struct MlaPrefillPlan {
  int64_t queries_per_chunk = 0;  // 0: the workspace cannot hold one query's scores
  int64_t n_rows = 0;             // pos0 + n_q: latent rows gathered
  size_t workspace_bytes = 0;     // needed by MlaPrefillAttention
};

// The largest chunk of queries whose scores fit `workspace_capacity` bytes
// beside the gathered rows, at most n_q (and at most max_chunk when > 0).
MlaPrefillPlan PlanMlaPrefill(int64_t n_q, int64_t pos0, int32_t n_head, int32_t kv_lora,
                              int32_t n_rot, size_t workspace_capacity, int64_t max_chunk = 0);

// What went wrong in MlaPrefillAttention: the step and its CUDA or cuBLAS status.
struct MlaPrefillStatus {
  cudaError_t cuda = cudaSuccess;
  cublasStatus_t cublas = CUBLAS_STATUS_SUCCESS;
  const char* step = "";
  bool ok() const { return cuda == cudaSuccess && cublas == CUBLAS_STATUS_SUCCESS; }
};

// Runs the plan (made for the same n_q, pos0 and widths). `workspace`
// (device, 256-byte aligned) holds at least plan.workspace_bytes.
MlaPrefillStatus MlaPrefillAttention(cublasHandle_t handle, const MlaPrefillArgs& args,
                                     const MlaPrefillPlan& plan, void* workspace,
                                     cudaStream_t stream);

}  // namespace ktx::kernels::cuda
