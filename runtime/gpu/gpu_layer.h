// File: runtime/gpu/gpu_layer.h
//
// One transformer layer of a `deepseek2` model on the GPU, minus the routed
// experts: the attention block (MLA, absorbed form, paged bf16 KV), the FFN
// norm, SiLU-gated FFNs (dense layers and shared experts) and the router.
// The runner owns a CUDA stream, a cuBLAS handle and the work buffers for up
// to `max_tokens` tokens (GpuWorkLayout); weights come in as device pointers
// (GpuLayerWeights, not owned), so the same code runs the real model
// (CudaDeepseek2) and the benchmark's random DeepSeek-V3 layer.
//
// Numerics: weights bf16; every matrix product takes bf16 activations and
// accumulates in F32 (cuBLAS); the residual stream, norms, rope, softmax and
// the router (F32 weights, F32 product, routing in double) stay in F32.
//
// All methods enqueue work on stream() and return without waiting, except
// where they say so. Not thread-safe.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/rope.h"
#include "kernels/cuda/routing.h"
#include "runtime/gpu/cuda_buffers.h"
#include "runtime/gpu/memory_plan.h"
#include "runtime/models/deepseek2.h"

namespace ktx::gpu {

using Bf16 = __nv_bfloat16;

// Device pointers to one layer's weights (not owned). Matrices are bf16,
// row-major [n_out, n_in]; vectors F32. Shapes with ggml's names:
struct GpuLayerWeights {
  const float* attn_norm = nullptr;       // F32 [n_embd]
  const Bf16* attn_q_a = nullptr;         // [q_lora, n_embd]            (null if lite)
  const float* attn_q_a_norm = nullptr;   // F32 [q_lora]                (null if lite)
  const Bf16* attn_q_b = nullptr;         // [n_head * hd_qk, q_lora]    (null if lite)
  const Bf16* attn_q = nullptr;           // [n_head * hd_qk, n_embd]    (lite only)
  const Bf16* attn_kv_a_mqa = nullptr;    // [kv_lora + n_rot, n_embd]
  const float* attn_kv_a_norm = nullptr;  // F32 [kv_lora]
  const Bf16* attn_k_b = nullptr;         // [n_head][kv_lora][qk_nope]
  const Bf16* attn_v_b = nullptr;         // [n_head][hd_v][kv_lora]
  const Bf16* attn_output = nullptr;      // [n_embd, n_head * hd_v]
  const float* ffn_norm = nullptr;        // F32 [n_embd]
  const Bf16* ffn_gate_up = nullptr;      // dense: [2 * n_ff, n_embd] (gate rows, then up rows)
  const Bf16* ffn_down = nullptr;         // dense: [n_embd, n_ff]
  const float* ffn_gate_inp = nullptr;    // MoE: F32 [n_expert, n_embd] router
  const float* exp_probs_b = nullptr;     // MoE: F32 [n_expert] selection bias (or null)
  const Bf16* shexp_gate_up = nullptr;    // MoE: [2 * n_ff_exp * n_shared, n_embd]
  const Bf16* shexp_down = nullptr;       // MoE: [n_embd, n_ff_exp * n_shared]
};

// The tokens of one batch, on the device: I32 [n_tokens] each.
struct GpuBatchView {
  int64_t n_tokens = 0;
  const int32_t* positions = nullptr;  // position of each token in its sequence
  const int32_t* seq_index = nullptr;  // block table row of each token's sequence
  int64_t max_kv_len = 0;              // max over tokens of position + 1
};

class GpuLayerRunner {
 public:
  // Creates a stream and a cuBLAS handle on the current device and allocates
  // the work buffers for `max_tokens` tokens and the workspaces.
  static absl::StatusOr<std::unique_ptr<GpuLayerRunner>> Create(const models::Deepseek2Hparams& hp,
                                                                int64_t max_tokens,
                                                                const CudaModelOptions& options);
  ~GpuLayerRunner();
  GpuLayerRunner(const GpuLayerRunner&) = delete;
  GpuLayerRunner& operator=(const GpuLayerRunner&) = delete;

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  const GpuWorkLayout& layout() const { return layout_; }
  int64_t max_tokens() const { return layout_.max_tokens; }

  // Work buffers (device), shapes in GpuWorkLayout.
  float* x() const { return x_.as<float>(); }
  float* h_f32() const { return h_f32_.as<float>(); }
  Bf16* h_bf16() const { return h_bf16_.as<Bf16>(); }
  float* routed() const { return routed_.as<float>(); }
  float* logits() const { return logits_.as<float>(); }
  int32_t* expert_ids() const { return expert_ids_.as<int32_t>(); }
  float* expert_weights() const { return expert_weights_.as<float>(); }
  int32_t* indices() const { return indices_.as<int32_t>(); }  // I32 [4, T]

  // x[0 .. n) += attn_output · MLA(rmsnorm(x) · attn_norm); writes the batch's
  // latent rows into `kv` (this layer's pages) first, so tokens see each other
  // causally within the batch.
  absl::Status Attention(const GpuLayerWeights& w, const kernels::cuda::MlaPagedKv& kv,
                         const GpuBatchView& batch, float* x);
  // h = rmsnorm(x) · norm into h_f32() and h_bf16() for n tokens.
  absl::Status Norm(const float* norm, const float* x, int64_t n);
  // out = beta · out + down · (silu(gate · h) ⊙ (up · h)) on h_bf16(); out F32
  // [n, out_stride]; gate_up [2 * n_ff, n_embd], down [n_embd, n_ff].
  absl::Status GatedFfn(const Bf16* gate_up, const Bf16* down, int64_t n_ff, int64_t n, float* out,
                        int64_t out_stride, float beta);
  // Routes h_f32() (router product in F32, selection in double) into
  // expert_ids() and expert_weights().
  absl::Status Route(const GpuLayerWeights& w, int64_t n);

 private:
  GpuLayerRunner() = default;

  models::Deepseek2Hparams hp_;
  GpuWorkLayout layout_;
  kernels::cuda::RopeParams rope_;
  kernels::cuda::RoutingConfig routing_;
  int32_t n_multiprocessors_ = 1;
  bool attention_tensor_cores_ = true;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceBuffer x_, h_f32_, h_bf16_, qa_, qa_bf16_, q_, q_nope_, big_q_, kva_, ctx_, o_, gu_, act_,
      router_logits_, expert_ids_, expert_weights_, routed_, logits_, indices_;
  DeviceBuffer attention_workspace_, cublas_workspace_;
};

}  // namespace ktx::gpu
