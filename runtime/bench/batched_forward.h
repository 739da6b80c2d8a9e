// File: runtime/bench/batched_forward.h
//
// One forward step over several independent sequences at once, composed from
// the model's stages (deepseek2.h): what continuous-batching engines and
// `ktx-ctl bench` need for batched decode. Attention is per sequence (each has
// its own KV cache and positions): AttentionBlock runs on each sequence's
// slice of the hidden rows. Everything after attention is per token, so
// FfnNorm, DenseFfn / Route, RoutedExperts, SharedExperts and Combine run once
// on the whole batch (the expert backend sees all tokens of all sequences in
// one call: each active expert's weights are read once per step, not once per
// sequence), and Head on the rows asked for.
//
//   std::vector<SequenceBatchEntry> batch = {{tokens_a, kv_a}, {tokens_b, kv_b}};
//   Activations logits;  // F32 [n_sequences, n_vocab] with kLast
//   KTX_RETURN_IF_ERROR(BatchedForward(model, batch, LogitsRows::kLast, &logits, &profile));
//
// With one sequence it computes exactly what Deepseek2Model::Forward computes
// (bitwise, with the reference experts: every stage is per token or per
// sequence). An optional StageProfile receives the wall time of every stage
// call (steady clock) and the routed-expert traffic of every MoE layer.
//
// Thread-safety: BatchedForward may run concurrently on distinct sequences as
// far as the model and its expert backend allow (see deepseek2.h); a
// StageProfile is not thread-safe (one per caller).
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/activations.h"
#include "runtime/models/deepseek2.h"

namespace ktx::bench {

// The new tokens of one sequence (at least one), appended at positions
// kv->length() ... of its KV cache.
struct SequenceBatchEntry {
  std::span<const int32_t> tokens;
  kv_cache::SequenceKv* kv = nullptr;
  // This sequence's routing policy (a request's own; not owned); null: the
  // model's. Sequences with different policies share one batch: the router
  // applies each token's own, and deferred experts (if any) join one layer
  // later exactly as in Deepseek2Model::Forward.
  const models::RoutingPolicy* policy = nullptr;
};

// The stages a step is made of, as timed by StageProfile.
enum class Stage : int {
  kEmbed = 0,
  kAttention,  // AttentionBlock, summed over the sequences
  kFfnNorm,
  kDenseFfn,  // dense layers only
  kRoute,     // router of MoE layers (gate logits, top-k)
  kExperts,   // RoutedExperts (the expert backend)
  kShared,    // SharedExperts
  kCombine,
  kHead,
};
inline constexpr int kNumStages = 9;
// "embed", "attention", "ffn_norm", "dense_ffn", "route", "experts", "shared",
// "combine", "head".
const char* StageName(Stage stage);

// Wall time per (stage, layer) and routed-expert traffic per MoE layer,
// accumulated over BatchedForward calls. Embed and Head count as layer -1.
class StageProfile {
 public:
  explicit StageProfile(const models::Deepseek2Model& model);

  void Reset();
  void AddSeconds(Stage stage, int il, double seconds);
  // Records one RoutedExperts call of layer il: the distinct experts the
  // routing used (their GGUF bytes: gate + up + down slabs) and its tokens.
  void AddRouting(int il, const models::Routing& routing);
  // Counts a step of n_tokens tokens (rows through the layers).
  void AddTokens(int64_t n_tokens) {
    tokens_ += n_tokens;
    ++steps_;
  }

  int n_layer() const { return n_layer_; }
  int64_t tokens() const { return tokens_; }
  int64_t steps() const { return steps_; }
  // Seconds of `stage` in layer il (il = -1: embed / head).
  double seconds(Stage stage, int il) const;
  // Seconds of `stage` over all layers.
  double total_seconds(Stage stage) const;
  // Number of layers where `stage` ran at least once.
  int layers_with(Stage stage) const;
  // Sum over MoE layers and calls of the GGUF bytes of the distinct experts used.
  double expert_bytes() const { return expert_bytes_; }
  int64_t expert_activations() const { return expert_activations_; }
  // Distinct experts used, summed over calls, in layer il.
  int64_t experts_used(int il) const { return experts_used_[il]; }
  // GGUF bytes of one routed expert (gate + up + down) of layer il (0: dense).
  double bytes_per_expert(int il) const { return bytes_per_expert_[il]; }

 private:
  int n_layer_ = 0;
  int64_t n_expert_ = 0;
  std::vector<std::array<double, kNumStages>> seconds_;  // [n_layer + 1]; slot 0 = layer -1
  std::vector<double> bytes_per_expert_;                 // [n_layer]
  std::vector<int64_t> experts_used_;                    // [n_layer]
  std::vector<uint8_t> seen_;                            // scratch [n_expert]
  double expert_bytes_ = 0;
  int64_t expert_activations_ = 0;
  int64_t tokens_ = 0;
  int64_t steps_ = 0;
};

// Runs one step of `batch` (see the file comment). `logits` gets, with kLast,
// one row per sequence (its last token), in batch order; with kAll, every
// token's row (sequences concatenated in batch order): F32 [n_out, n_vocab].
// On success every sequence's KV rows are committed; on error none are.
// InvalidArgument for an empty batch, an entry without tokens or KV, or the
// same KV twice; ResourceExhausted when a sequence is full.
absl::Status BatchedForward(const models::Deepseek2Model& model,
                            std::span<const SequenceBatchEntry> batch, models::LogitsRows rows,
                            models::Activations* logits, StageProfile* profile = nullptr);

}  // namespace ktx::bench
