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
// Numerics: weights bf16 (cuBLAS, or the skinny tensor-core kernel for
// batches of up to skinny_max_tokens()) or GGUF blocks (the quantized GEMV,
// small batches); every matrix product takes bf16
// activations and accumulates in F32; the residual stream, norms, rope, softmax and
// the router (F32 weights, F32 product, routing in double) stay in F32.
//
// All methods enqueue work on stream() and return without waiting, except
// where they say so. Not thread-safe.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/tensor_type.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/rope.h"
#include "kernels/cuda/routing.h"
#include "kernels/cuda/skinny_gemm.h"
#include "runtime/gpu/cuda_buffers.h"
#include "runtime/gpu/memory_plan.h"
#include "runtime/models/deepseek2.h"

namespace ktx::gpu {

using Bf16 = __nv_bfloat16;

// One weight matrix [n_out, n_in] on the device in up to two forms (not
// owned; memory_plan.h GpuWeightForm): bf16 row-major (cuBLAS), and/or the
// GGUF blocks as stored in the file (the quantized GEMV, kernels/cuda/gemv.h),
// as up to two row ranges of different storage types (gate and up stacked
// into one matrix when their types differ). A bare bf16 pointer converts.
struct GpuMatrix {
  struct Blocks {
    const void* data = nullptr;  // rows of row_bytes, 16-byte aligned, readable to a 16 multiple
    kernels::TensorType type = kernels::TensorType::kF32;
    int64_t row_bytes = 0;
    int64_t n_rows = 0;
  };
  const Bf16* bf16 = nullptr;  // bf16 [n_out, n_in], or null (blocks only)
  Blocks blocks[2];            // rows [0, blocks[0].n_rows), then blocks[1]'s
  int n_blocks = 0;            // 0: no quantized form

  GpuMatrix() = default;
  GpuMatrix(const Bf16* p) : bf16(p) {}  // NOLINT(google-explicit-constructor): bf16 only
  bool empty() const { return bf16 == nullptr && n_blocks == 0; }
};

// Device pointers to one layer's weights (not owned). Matrices row-major
// [n_out, n_in] (GpuMatrix: bf16 and/or GGUF blocks; k_b and v_b bf16
// only); vectors F32. Shapes with ggml's names:
struct GpuLayerWeights {
  const float* attn_norm = nullptr;      // F32 [n_embd]
  GpuMatrix attn_q_a;                    // [q_lora, n_embd]            (empty if lite)
  const float* attn_q_a_norm = nullptr;  // F32 [q_lora]                (null if lite)
  GpuMatrix attn_q_b;                    // [n_head * hd_qk, q_lora]    (empty if lite)
  GpuMatrix attn_q;                      // [n_head * hd_qk, n_embd]    (lite only)
  GpuMatrix attn_kv_a_mqa;               // [kv_lora + n_rot, n_embd]
  // Optional: bf16 [q_lora + kv_lora + n_rot, n_embd], attn_q_a's rows then
  // attn_kv_a_mqa's in one buffer (their .bf16 point into it), so that a
  // batch whose two products both take the bf16 path runs them as one
  // (one launch, one pass over the input; docs/gpu.md "The skinny bf16
  // product"). Null: two products (lite models, quantized-only forms,
  // CudaModelOptions::stack_q_a_kv_a off).
  const Bf16* attn_qkv_a = nullptr;
  const float* attn_kv_a_norm = nullptr;  // F32 [kv_lora]
  const Bf16* attn_k_b = nullptr;         // [n_head][kv_lora][qk_nope]
  const Bf16* attn_v_b = nullptr;         // [n_head][hd_v][kv_lora]
  GpuMatrix attn_output;                  // [n_embd, n_head * hd_v]
  const float* ffn_norm = nullptr;        // F32 [n_embd]
  GpuMatrix ffn_gate_up;                  // dense: [2 * n_ff, n_embd] (gate rows, then up rows)
  GpuMatrix ffn_down;                     // dense: [n_embd, n_ff]
  const float* ffn_gate_inp = nullptr;    // MoE: F32 [n_expert, n_embd] router
  const float* exp_probs_b = nullptr;     // MoE: F32 [n_expert] selection bias (or null)
  GpuMatrix shexp_gate_up;                // MoE: [2 * n_ff_exp * n_shared, n_embd]
  GpuMatrix shexp_down;                   // MoE: [n_embd, n_ff_exp * n_shared]
};

// A run of a batch's tokens that continue one sequence (host-side): tokens
// first_token .. first_token + n_tokens - 1 at positions pos0, pos0 + 1, ...
struct GpuBatchSegment {
  int64_t first_token = 0;
  int64_t n_tokens = 0;
  int32_t seq = 0;  // block table row
  int64_t pos0 = 0;
};

// The tokens of one batch, on the device: I32 [n_tokens] each.
struct GpuBatchView {
  int64_t n_tokens = 0;
  const int32_t* positions = nullptr;  // position of each token in its sequence
  const int32_t* seq_index = nullptr;  // block table row of each token's sequence
  int64_t max_kv_len = 0;              // max over tokens of position + 1
  // Optional (host): the batch's runs of one sequence each, in token order,
  // disjoint; those of at least mla_prefill_min_tokens() tokens take the
  // prompt-chunk attention (kernels/cuda/mla_prefill.h). Must outlive the call.
  const GpuBatchSegment* segments = nullptr;
  int64_t n_segments = 0;
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
  // causally within the batch. Segments of the batch (GpuBatchView::segments)
  // of at least mla_prefill_min_tokens() tokens run the prompt-chunk form
  // (two cuBLAS products; its score matrix in the FFN gate/up buffer, which is
  // idle during attention), the other tokens the MLA kernel.
  absl::Status Attention(const GpuLayerWeights& w, const kernels::cuda::MlaPagedKv& kv,
                         const GpuBatchView& batch, float* x);
  // h = rmsnorm(x) · norm into h_f32() and h_bf16() for n tokens.
  absl::Status Norm(const float* norm, const float* x, int64_t n);
  // out = beta · out + down · (silu(gate · h) ⊙ (up · h)) on h_bf16(); out F32
  // [n, out_stride]; gate_up [2 * n_ff, n_embd], down [n_embd, n_ff].
  absl::Status GatedFfn(const GpuMatrix& gate_up, const GpuMatrix& down, int64_t n_ff, int64_t n,
                        float* out, int64_t out_stride, float beta);
  // y = beta · y + m · x for n tokens: x bf16 [n, ldx], y F32 [n, ldy], m
  // [n_out, n_in]. The quantized GEMV when m has blocks and n <=
  // gemv_max_tokens() (or m has no bf16 form), else cuBLAS on m.bf16. (A
  // matrix with both forms has blocks only where the GEMV beats cuBLAS:
  // GemvBeatsCublasType, applied when the weights are loaded.)
  // InvalidArgument naming `what` for an empty matrix.
  absl::Status Linear(const GpuMatrix& m, int64_t n_out, int64_t n_in, const Bf16* x, int64_t ldx,
                      int64_t n, float* y, int64_t ldy, float beta, const char* what);
  // Whether Linear(m, ...) of n tokens takes the quantized GEMV (else a bf16 product).
  bool TakesGemv(const GpuMatrix& m, int64_t n) const {
    return m.n_blocks > 0 && (n <= gemv_max_tokens_ || m.bf16 == nullptr);
  }
  // Whether the GEMV (q8 kernel) reads blocks of type t faster than cuBLAS
  // reads the bf16 copy at 1 token: Q4_K and Q6_K (measured on the H200,
  // docs/gpu.md; Q8_0 and BF16 blocks lose to cuBLAS there). The kBoth weight
  // form keeps blocks only for matrices whose every part passes.
  static bool GemvBeatsCublasType(kernels::TensorType t) {
    return t == kernels::TensorType::kQ4_K || t == kernels::TensorType::kQ6_K;
  }
  // Batches of at most this many tokens use the GEMV where a matrix has
  // blocks (CudaModelOptions::gemv_max_tokens; changeable between calls).
  int64_t gemv_max_tokens() const { return gemv_max_tokens_; }
  void set_gemv_max_tokens(int64_t n) { gemv_max_tokens_ = n; }
  // Products run so far by each path (Linear calls; tests and logs):
  // quantized GEMV, cuBLAS, skinny kernel.
  int64_t gemv_calls() const { return gemv_calls_; }
  int64_t cublas_calls() const { return cublas_calls_; }
  // The three counters, for CudaGraphCache::Run (a replay adds what its
  // captured call counted).
  std::array<int64_t*, 3> product_counters() {
    return {&gemv_calls_, &cublas_calls_, &skinny_calls_};
  }
  // Routes h_f32() (router product in F32, selection in double) into
  // expert_ids() and expert_weights().
  absl::Status Route(const GpuLayerWeights& w, int64_t n);
  // y[b] = beta · y[b] + w[b] · x[b] for `batch` bf16 matrices [n_out, ldw]
  // with element strides between them: the skinny kernel
  // (kernels/cuda/skinny_gemm.h) for n <= skinny_max_tokens() where it takes
  // the shape, else cuBLAS. y: F32 or bf16 (y_type). InvalidArgument naming
  // `what` on a cuBLAS or launch failure.
  absl::Status ProductBf16(const Bf16* w, int64_t ldw, int64_t w_batch_stride, const Bf16* x,
                           int64_t ldx, int64_t x_batch_stride, void* y, cudaDataType_t y_type,
                           int64_t ldy, int64_t y_batch_stride, int64_t n_out, int64_t n_in,
                           int64_t n, int64_t batch, float beta, const char* what);
  // Batches of at most this many tokens use the skinny kernel for bf16
  // products (CudaModelOptions::skinny_max_tokens; 0: never).
  int64_t skinny_max_tokens() const { return skinny_max_tokens_; }
  void set_skinny_max_tokens(int64_t n) {
    skinny_max_tokens_ = std::clamp<int64_t>(n, 0, kernels::cuda::kSkinnyMaxTokens);
  }
  int64_t skinny_calls() const { return skinny_calls_; }
  // Prompt chunks of at least this many tokens use the prompt-chunk
  // attention (CudaModelOptions::mla_prefill_min_tokens; 0: never).
  int64_t mla_prefill_min_tokens() const { return mla_prefill_min_tokens_; }
  void set_mla_prefill_min_tokens(int64_t n) { mla_prefill_min_tokens_ = std::max<int64_t>(n, 0); }
  // Segments attended by the prompt-chunk form so far (tests and logs).
  int64_t mla_prefill_calls() const { return mla_prefill_calls_; }

 private:
  GpuLayerRunner() = default;
  // MLA attention of the batch's tokens [t0, t1) by the MLA kernel, from the
  // query rows in big_q_ into ctx_.
  absl::Status MlaKernelRange(const kernels::cuda::MlaPagedKv& kv, const GpuBatchView& b,
                              int64_t t0, int64_t t1);
  // ProductBf16, telling whether the skinny kernel ran (true) or cuBLAS.
  absl::StatusOr<bool> RunProductBf16(const Bf16* w, int64_t ldw, int64_t w_batch_stride,
                                      const Bf16* x, int64_t ldx, int64_t x_batch_stride, void* y,
                                      cudaDataType_t y_type, int64_t ldy, int64_t y_batch_stride,
                                      int64_t n_out, int64_t n_in, int64_t n, int64_t batch,
                                      float beta, const char* what);

  models::Deepseek2Hparams hp_;
  GpuWorkLayout layout_;
  kernels::cuda::RopeParams rope_;
  kernels::cuda::RoutingConfig routing_;
  int32_t n_multiprocessors_ = 1;
  bool attention_tensor_cores_ = true;
  int64_t gemv_max_tokens_ = 1;
  int64_t gemv_calls_ = 0;
  int64_t cublas_calls_ = 0;
  int64_t skinny_max_tokens_ = 0;
  int64_t skinny_calls_ = 0;
  int64_t mla_prefill_min_tokens_ = 0;
  int64_t mla_prefill_calls_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceBuffer x_, h_f32_, h_bf16_, qa_, qa_bf16_, q_, q_nope_, big_q_, kva_, ctx_, o_, gu_, act_,
      router_logits_, expert_ids_, expert_weights_, routed_, logits_, indices_;
  // gemv_workspace_: the q8 GEMV's activations (int8 and scales) for at most
  // gemv_workspace_tokens_ tokens of the widest product input.
  // skinny_workspace_: split-k partial sums of the skinny kernel, sized for
  // the layer's product shapes (counters zeroed at creation).
  DeviceBuffer attention_workspace_, cublas_workspace_, gemv_workspace_, skinny_workspace_;
  DeviceBuffer rope_inv_freq_;  // F64 [n_rot / 2]: rope_.inv_freq (RopeTables, host-computed)
  int64_t gemv_workspace_tokens_ = 0;
};

}  // namespace ktx::gpu
