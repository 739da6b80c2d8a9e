// File: runtime/models/deepseek2.h
//
// The DeepSeek-V3 family (llama.cpp architecture `deepseek2`: DeepSeek-V2,
// V2.5, V3, V3.1, R1, Kimi-K2) as a reference model: hyper-parameters read and
// validated from GGUF metadata, weights looked up by name with their shapes
// and types checked (no copies: views into the mapping), and the forward pass
// as separate STAGES over a batch of tokens. docs/model.md gives the math and
// the data layout; ../shared/notes/DEEPSEEK.md the facts it was read from.
//
//   KTX_ASSIGN_OR_RETURN(std::unique_ptr<Deepseek2Model> model, Deepseek2Model::Open(path));
//   KTX_ASSIGN_OR_RETURN(auto kv, kv_cache::SequenceKv::Create(model->kv_layout(), 4096));
//   Activations logits;  // F32 [n_out, n_vocab]
//   KTX_RETURN_IF_ERROR(model->Forward(prompt_ids, kv.get(), LogitsRows::kLast, &logits));
//
// Stages (each a const method with explicit inputs and outputs, F32
// activations; Forward composes them, an actor runtime may run them on
// different threads, actors and devices):
//
//   Embed           tokens                    -> x  [n_tokens, n_embd]
//   AttentionBlock  il, positions, kv, x      -> x += MLA(rmsnorm(x))   (writes the kv rows)
//   FfnNorm         il, x                     -> h  [n_tokens, n_embd]
//   DenseFfn        il, h                     -> f  [n_tokens, n_embd]   (il < n_layer_dense_lead)
//   Route           il, h [, policies]        -> Routing (ids, weights [n_tokens, n_expert_used])
//   RoutedExperts   il, h, routing, mask      -> partial [n_tokens, n_embd] (via ExpertBackend)
//   SharedExperts   il, h                     -> s  [n_tokens, n_embd]
//   Combine         parts                     -> x += Σ parts
//   Head            x, rows                   -> logits [n_out, n_vocab]
//
// The reference path keeps activations in F32 and accumulates in double
// (reference_ops.h); it matches the float64 fixtures to ~2e-7 rel L2 (tier A).
//
// Routing policies (routing_policy.h): a policy set on the model applies to
// every Route call; Route and Forward also take per-token / per-call policies
// (a request's own). Route applies the top-k reductions; Forward also runs
// expert deferral (ExpertDeferral) when a policy asks for it.
//
// Thread-safety: a loaded model is immutable; stages may run concurrently as
// long as each call has its own outputs and KV sequence. RoutedExperts passes
// concurrent calls on to the expert backend (the reference one is
// thread-safe; see ExpertBackend). SetExpertBackend must not race with stages.
// The model owns its GGUF file (mapping) and the reference expert backend.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/gguf/gguf.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/activations.h"
#include "runtime/models/moe.h"
#include "runtime/models/reference_ops.h"
#include "runtime/models/routing_policy.h"

namespace ktx::models {

enum class RopeScalingType { kNone, kLinear, kYarn };

// Hyper-parameters of a `deepseek2` model. In brackets: the GGUF key (prefix
// `deepseek2.`) and what happens when it is absent.
struct Deepseek2Hparams {
  int32_t n_layer = 0;             // [block_count] required
  int64_t n_ctx_train = 0;         // [context_length] required
  int64_t n_embd = 0;              // [embedding_length] required
  int64_t n_ff = 0;                // [feed_forward_length] required if a dense layer exists
  int32_t n_head = 0;              // [attention.head_count] required
  int64_t q_lora_rank = 0;         // [attention.q_lora_rank] absent: 0 = "lite" layout (attn_q)
  int64_t kv_lora_rank = 0;        // [attention.kv_lora_rank] required
  int64_t n_embd_head_qk = 0;      // [attention.key_length_mla] required: qk_nope + n_rot
  int64_t n_embd_head_v = 0;       // [attention.value_length_mla] required: v_head_dim
  int64_t n_rot = 0;               // [rope.dimension_count] absent: key_length - kv_lora_rank
  float rms_eps = 0.0f;            // [attention.layer_norm_rms_epsilon] required
  int32_t n_layer_dense_lead = 0;  // [leading_dense_block_count] required
  int32_t n_expert = 0;            // [expert_count] required if a MoE layer exists
  int32_t n_expert_used = 0;       // [expert_used_count] required if a MoE layer exists
  int32_t n_expert_shared = 0;     // [expert_shared_count] required
  int64_t n_ff_exp = 0;            // [expert_feed_forward_length] required
  int32_t n_expert_groups = 0;     // [expert_group_count] absent: 0 (no group limit)
  int32_t n_group_used = 0;        // [expert_group_used_count] required if n_expert_groups > 1
  GatingFunc gating = GatingFunc::kSoftmax;  // [expert_gating_func] absent or 0: softmax
  float expert_weights_scale = 0.0f;         // [expert_weights_scale] absent: 0 (no scaling)
  bool expert_weights_norm = false;          // [expert_weights_norm] absent: false
  int64_t n_vocab = 0;  // [vocab_size] absent: tokenizer.ggml.tokens, else token_embd's ne1

  float rope_freq_base = 10000.0f;                          // [rope.freq_base]
  RopeScalingType rope_scaling = RopeScalingType::kLinear;  // [rope.scaling.type] absent: linear
  float rope_scaling_factor = 0.0f;  // [rope.scaling.factor] absent/0: no scaling
  int64_t n_ctx_orig_yarn = 0;       // [rope.scaling.original_context_length] absent: n_ctx_train
  float yarn_beta_fast = 32.0f;      // [rope.scaling.yarn_beta_fast]
  float yarn_beta_slow = 1.0f;       // [rope.scaling.yarn_beta_slow]
  // [rope.scaling.yarn_log_multiplier] / 0.1 (the converter stores 0.1 x
  // mscale_all_dim; llama.cpp divides it back). Absent: 0.
  float yarn_log_mul = 0.0f;

  // Derived as llama.cpp does (docs/model.md, "YaRN"):
  double freq_scale = 1.0;        // 1 / rope_scaling_factor (1 when no factor)
  double ext_factor = 0.0;        // 1 for YaRN, else 0
  double yarn_attn_factor = 1.0;  // attn_factor handed to rope
  double kq_scale = 0.0;          // mscale² / sqrt(n_embd_head_qk)
  RopeYarnParams rope;            // everything rope needs, corr dims included

  int64_t qk_nope() const { return n_embd_head_qk - n_rot; }
  bool is_lite() const { return q_lora_rank == 0; }
  bool IsMoeLayer(int il) const { return il >= n_layer_dense_lead; }
  RoutingParams routing() const;
  kv_cache::LatentKvLayout kv_layout() const { return {n_layer, kv_lora_rank, n_rot}; }

  // Reads and validates the metadata of a `deepseek2` file. Errors
  // (InvalidArgument / NotFound) name the key: a missing required key, a
  // wrong type, an architecture other than deepseek2, or inconsistent values
  // (n_expert_used > n_expert, n_expert % n_expert_groups != 0, head dims that
  // do not add up, an unknown gating function or rope scaling type, ...).
  static absl::StatusOr<Deepseek2Hparams> FromMetadata(const gguf::Metadata& metadata);
  // Recomputes the derived fields from the read ones (after edits in tests).
  absl::Status Derive();
};

// The tensors of one layer. Pointers into the GgufFile (not owned); shapes in
// ggml order {ne0, ne1, ne2}; any type kernels::CanDequantize accepts.
struct Deepseek2LayerWeights {
  const gguf::TensorInfo* attn_norm = nullptr;       // {n_embd}
  const gguf::TensorInfo* attn_q_a = nullptr;        // {n_embd, q_lora}       (null if lite)
  const gguf::TensorInfo* attn_q_a_norm = nullptr;   // {q_lora}               (null if lite)
  const gguf::TensorInfo* attn_q_b = nullptr;        // {q_lora, n_head*hd_qk} (null if lite)
  const gguf::TensorInfo* attn_q = nullptr;          // {n_embd, n_head*hd_qk} (lite only)
  const gguf::TensorInfo* attn_kv_a_mqa = nullptr;   // {n_embd, kv_lora + n_rot}
  const gguf::TensorInfo* attn_kv_a_norm = nullptr;  // {kv_lora}
  const gguf::TensorInfo* attn_k_b = nullptr;        // {qk_nope, kv_lora, n_head}
  const gguf::TensorInfo* attn_v_b = nullptr;        // {kv_lora, hd_v, n_head}
  const gguf::TensorInfo* attn_output = nullptr;     // {n_head*hd_v, n_embd}
  const gguf::TensorInfo* ffn_norm = nullptr;        // {n_embd}
  // Dense layers (il < n_layer_dense_lead):
  const gguf::TensorInfo* ffn_gate = nullptr;  // {n_embd, n_ff}
  const gguf::TensorInfo* ffn_up = nullptr;    // {n_embd, n_ff}
  const gguf::TensorInfo* ffn_down = nullptr;  // {n_ff, n_embd}
  // MoE layers:
  const gguf::TensorInfo* ffn_gate_inp = nullptr;    // {n_embd, n_expert} router
  const gguf::TensorInfo* exp_probs_b = nullptr;     // {n_expert} selection bias (optional)
  const gguf::TensorInfo* ffn_gate_exps = nullptr;   // {n_embd, n_ff_exp, n_expert}
  const gguf::TensorInfo* ffn_up_exps = nullptr;     // {n_embd, n_ff_exp, n_expert}
  const gguf::TensorInfo* ffn_down_exps = nullptr;   // {n_ff_exp, n_embd, n_expert}
  const gguf::TensorInfo* ffn_gate_shexp = nullptr;  // {n_embd, n_ff_exp*n_shared} (if n_shared)
  const gguf::TensorInfo* ffn_up_shexp = nullptr;    // {n_embd, n_ff_exp*n_shared}
  const gguf::TensorInfo* ffn_down_shexp = nullptr;  // {n_ff_exp*n_shared, n_embd}
};

struct Deepseek2Weights {
  const gguf::TensorInfo* token_embd = nullptr;   // {n_embd, n_vocab}
  const gguf::TensorInfo* output_norm = nullptr;  // {n_embd}
  const gguf::TensorInfo* output = nullptr;       // {n_embd, n_vocab}; = token_embd when tied
  bool output_tied = false;                       // `output.weight` absent
  std::vector<Deepseek2LayerWeights> layers;      // [n_layer]

  // Looks every tensor up by name and checks its shape and type. Errors name
  // the tensor and the expected shape (or the supported types).
  static absl::StatusOr<Deepseek2Weights> FromGguf(const gguf::GgufFile& file,
                                                   const Deepseek2Hparams& hparams);
};

// Which rows of logits Head / Forward produce.
enum class LogitsRows {
  kAll,   // one row per token of the batch
  kLast,  // only the last token's row
};

// Per-call settings of Deepseek2Model::Forward.
struct ForwardOptions {
  // The routing policy of this call (a request's own; not owned, must outlive
  // the call); null: the model's policy (SetRoutingPolicy), if any.
  const RoutingPolicy* policy = nullptr;
  // Called with every MoE layer's routing as Route produced it (after the
  // policy's top-k reduction, before deferral); e.g. an expert-usage profile.
  std::function<void(int il, const Routing& routing)> on_routing;
};

// The scalar reference implementation of routed experts: for each expert used
// by the batch, its tokens are gathered and pushed through gate/up/down
// (reference_ops MatMul). Holds references to the model's hparams and
// weights. Thread-safe (no state besides them).
class ReferenceExpertBackend final : public ExpertBackend {
 public:
  ReferenceExpertBackend(const Deepseek2Hparams& hparams, const Deepseek2Weights& weights)
      : hparams_(hparams), weights_(weights) {}
  absl::Status Compute(int il, const Activations& h, const Routing& routing,
                       std::span<const uint8_t> expert_mask, Activations* out) override;

 private:
  const Deepseek2Hparams& hparams_;
  const Deepseek2Weights& weights_;
};

class Deepseek2Model {
 public:
  // Opens the GGUF file (splits included) and loads the model.
  static absl::StatusOr<std::unique_ptr<Deepseek2Model>> Open(
      const std::string& path, const gguf::OpenOptions& options = {});
  // Loads from an opened file, taking ownership of it.
  static absl::StatusOr<std::unique_ptr<Deepseek2Model>> Load(std::unique_ptr<gguf::GgufFile> file);

  Deepseek2Model(const Deepseek2Model&) = delete;
  Deepseek2Model& operator=(const Deepseek2Model&) = delete;

  const Deepseek2Hparams& hparams() const { return hparams_; }
  const Deepseek2Weights& weights() const { return weights_; }
  const gguf::GgufFile& file() const { return *file_; }
  kv_cache::LatentKvLayout kv_layout() const { return hparams_.kv_layout(); }
  int64_t n_vocab() const { return hparams_.n_vocab; }
  int64_t n_embd() const { return hparams_.n_embd; }

  // Routed experts go through `backend` (not owned; must outlive its use);
  // nullptr restores the built-in ReferenceExpertBackend.
  void SetExpertBackend(ExpertBackend* backend);
  ExpertBackend* expert_backend() const { return expert_backend_; }

  // The routing policy of every Route / Forward call that brings none of its
  // own (null or an empty policy: the model's routing). Validated against the
  // hyper-parameters (InvalidArgument naming the field). Like
  // SetExpertBackend, must not race with stages.
  absl::Status SetRoutingPolicy(std::shared_ptr<const RoutingPolicy> policy);
  // Null when none is set.
  const RoutingPolicy* routing_policy() const { return routing_policy_.get(); }

  // ---- stages ----

  // x = token_embd rows of `tokens`: F32 [n_tokens, n_embd]. OutOfRange for an
  // id outside [0, n_vocab).
  absl::Status Embed(std::span<const int32_t> tokens, Activations* x) const;

  // x += attn_output · MLA(rmsnorm(x) · attn_norm) for layer il, in the
  // absorbed form. Writes the latent rows [c | roped k_pe] of the batch into
  // `kv` at (il, positions[t]); token t attends to positions 0..positions[t].
  // The batch must continue the sequence: positions[t] = kv->length() + t
  // (rows are committed by the caller after the last layer; Forward does).
  // x: F32 [n_tokens, n_embd], in/out.
  absl::Status AttentionBlock(int il, std::span<const int32_t> positions, kv_cache::SequenceKv* kv,
                              Activations* x) const;

  // h = rmsnorm(x) · ffn_norm: F32 [n_tokens, n_embd].
  absl::Status FfnNorm(int il, const Activations& x, Activations* h) const;

  // out = ffn_down · (silu(ffn_gate · h) ⊙ (ffn_up · h)): F32 [n_tokens, n_embd].
  // FailedPrecondition for a MoE layer.
  absl::Status DenseFfn(int il, const Activations& h, Activations* out) const;

  // Router of MoE layer il on h (see RouteFromLogits), under the model's
  // routing policy (its top-k reductions; deferral is the engine's business).
  absl::Status Route(int il, const Activations& h, Routing* routing) const;
  // The same with token policies: `policies` is empty (the model's policy),
  // one entry (every token) or one entry per token; a null entry means the
  // model's policy. Policies must be valid for this model (Validate).
  absl::Status Route(int il, const Activations& h, std::span<const RoutingPolicy* const> policies,
                     Routing* routing) const;

  // The weighted sum of the routed experts selected by `expert_mask` (empty:
  // all), computed by the expert backend: F32 [n_tokens, n_embd].
  absl::Status RoutedExperts(int il, const Activations& h, const Routing& routing,
                             std::span<const uint8_t> expert_mask, Activations* out) const;

  // The shared expert(s) on h: F32 [n_tokens, n_embd] (zeros when n_shared = 0).
  absl::Status SharedExperts(int il, const Activations& h, Activations* out) const;

  // x += Σ parts (each F32 [n_tokens, n_embd]): the residual add after the FFN.
  absl::Status Combine(std::span<const Activations* const> parts, Activations* x) const;

  // logits = output · (rmsnorm(x) · output_norm) for the chosen rows:
  // F32 [n_out, n_vocab].
  absl::Status Head(const Activations& x, LogitsRows rows, Activations* logits) const;

  // The whole forward pass of `tokens` appended to the sequence in `kv`
  // (positions kv->length() ...). On success the batch's rows are committed;
  // on error nothing is. ResourceExhausted when the sequence is full.
  // With a policy that defers experts, the deferred outputs join the
  // residual stream one layer later (ExpertDeferral).
  absl::Status Forward(std::span<const int32_t> tokens, kv_cache::SequenceKv* kv, LogitsRows rows,
                       Activations* logits, const ForwardOptions& options = {}) const;

 private:
  Deepseek2Model() = default;
  absl::Status CheckLayer(int il) const;
  absl::Status CheckActivations(const Activations& a, const char* what) const;

  std::unique_ptr<gguf::GgufFile> file_;
  Deepseek2Hparams hparams_;
  Deepseek2Weights weights_;
  std::unique_ptr<ReferenceExpertBackend> reference_experts_;
  ExpertBackend* expert_backend_ = nullptr;
  std::shared_ptr<const RoutingPolicy> routing_policy_;
};

// Shared helper: out = down · (silu(gate · h) ⊙ (up · h)) for h F32 [n_tokens,
// n_in]; out F32 [n_tokens, down.n_rows]. Used by dense, shared and reference
// routed experts.
void GatedFfn(const WeightMatrix& gate, const WeightMatrix& up, const WeightMatrix& down,
              const float* h, int64_t h_stride, int64_t n_tokens, float* out, int64_t out_stride);

}  // namespace ktx::models
