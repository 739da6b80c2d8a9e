// File: runtime/models/moe.h
//
// The Mixture-of-Experts vocabulary shared by model stages and expert
// backends: the router's output (`Routing`: per token the chosen expert ids and
// their weights), the routing rule of DeepSeek-V3 (`RouteFromLogits`: gating
// function, selection-only bias, group-limited top-k, normalisation, scaling),
// and the interface through which routed experts are computed
// (`ExpertBackend`). The scalar reference backend lives with the model
// (deepseek2.h); fast CPU kernels, GPU and remote shards plug in here.
// Routing policies (routing_policy.h) reduce the model's top-k per token
// through `TopKRule`; a token that keeps fewer experts than its row holds has
// its row padded with `kNoExpert` entries, which every backend skips.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "runtime/models/activations.h"

namespace ktx::models {

// `expert_gating_func` values of GGUF files.
enum class GatingFunc : uint32_t {
  kSoftmax = 1,  // p = softmax(logits) over all experts (DeepSeek-V2)
  kSigmoid = 2,  // p = sigmoid(logits) per expert (DeepSeek-V3)
};

// The clamp below which a weight sum is not divided by (llama.cpp's value).
inline constexpr double kMinRoutingWeightSum = 6.103515625e-5;

struct RoutingParams {
  int32_t n_expert = 0;       // E
  int32_t n_expert_used = 0;  // K: experts per token
  int32_t n_group = 0;        // expert groups; 0 or 1: no group limit
  int32_t n_group_used = 0;   // groups kept per token when n_group > 1
  GatingFunc gating = GatingFunc::kSoftmax;
  bool norm_weights = false;   // w /= max(Σ w, kMinRoutingWeightSum)
  float weights_scale = 0.0f;  // w *= scale, applied unless scale is 0 or 1
};

// The expert id of a padding entry of a Routing row: no expert, weight 0.
// Backends skip it (it selects nothing and adds nothing).
inline constexpr int32_t kNoExpert = -1;

// The router's decision for a batch. Entries of a token are ordered by
// descending selection score (ties: lower expert id first); a token that keeps
// fewer than n_expert_used experts (a routing policy) has its kept entries
// first, then kNoExpert entries with weight 0.
struct Routing {
  int64_t n_tokens = 0;
  int32_t n_expert_used = 0;
  std::vector<int32_t> expert_ids;  // I32 [n_tokens, n_expert_used]
  std::vector<float> weights;       // F32 [n_tokens, n_expert_used]

  int32_t id(int64_t t, int k) const { return expert_ids[t * n_expert_used + k]; }
  float weight(int64_t t, int k) const { return weights[t * n_expert_used + k]; }
  // Entries of token t that name an expert (not kNoExpert).
  int32_t kept(int64_t t) const;
};

// A per-token reduction of the model's top-k (routing_policy.h makes them
// from a policy). Applied between selection (steps 1-4 below) and weighting
// (step 5): of the n_expert_used selected experts, in selection order,
//   a. fixed: only the first top_k are candidates (0: all) -- the same
//      experts a model with expert_used_count = top_k would select;
//   b. adaptive (min_mass < 1): the candidates are ranked by gate weight p
//      (descending, ties: selection order) and kept until their cumulative
//      share of the candidates' Σ p reaches min_mass, at least min_k of them
//      (clipped to the candidates);
// then the kept experts are weighted by the model's rule over the kept set
// only (renormalised: w = p / max(Σ_kept p, floor) when norm_weights, times
// weights_scale). A rule that keeps every expert gives bit-identical results
// to no rule.
struct TopKRule {
  int32_t top_k = 0;      // 0: the model's n_expert_used
  double min_mass = 1.0;  // (0, 1]; >= 1: adaptive off
  int32_t min_k = 1;      // >= 1
  bool KeepsAll(int32_t n_expert_used) const {
    return (top_k == 0 || top_k >= n_expert_used) && min_mass >= 1.0;
  }
};
// Which of one token's K selected experts `rule` keeps (steps a and b above):
// prob_sel[k] is the gate weight p of the k-th in selection order (any
// positive multiple of p, the same for the token, keeps the same experts);
// sets keep[k] (K bytes) and returns the count. The rule must be valid.
int32_t KeptByRule(const TopKRule& rule, const double* prob_sel, int32_t k_used, uint8_t* keep);

// Routes a batch from router logits (F64 [n_tokens, n_expert]) and an optional
// selection bias (F32 [n_expert], `exp_probs_b`; null = none):
//   1. p = sigmoid(logits) or softmax(logits) (params.gating), in double;
//   2. sel = p + bias (the bias only selects; weights use p);
//   3. if n_group > 1: group score = sum of the two largest sel of the group
//      (the one value for groups of one); the n_group_used best groups are
//      kept, every expert of the other groups gets sel = -inf;
//   4. the n_expert_used largest sel are chosen (ties: lower id; NaN counts
//      as -inf);
//   5. w = p[chosen]; if norm_weights: w /= max(Σ w, 6.103515625e-5);
//      if weights_scale is not 0 or 1: w *= weights_scale.
// The params must be consistent (KTX_CHECKed; Deepseek2Hparams validates
// them when a file is loaded).
void RouteFromLogits(const RoutingParams& params, const double* logits, int64_t n_tokens,
                     const float* bias, Routing* routing);

// The same with a TopKRule per token: `rules` is empty (no rule), one entry
// (every token) or n_tokens entries; a null entry means no rule. The routing's
// n_expert_used is the largest kept count of the batch (shorter rows padded
// with kNoExpert); with no reduction it equals params.n_expert_used and the
// result is bitwise that of the overload above. Rules must be valid
// (KTX_CHECKed: top_k in [0, K], min_mass in (0, 1] or >= 1, min_k >= 1;
// RoutingPolicy::Validate reports them as errors first).
void RouteFromLogits(const RoutingParams& params, const double* logits, int64_t n_tokens,
                     const float* bias, std::span<const TopKRule* const> rules, Routing* routing);

// Computes routed experts for one MoE layer. Given the FFN-normed hidden state
// h (F32 [n_tokens, n_embd]) and the routing, an implementation writes
//   out[t] = Σ_k weight(t, k) · expert_{id(t, k)}(h[t])
// over the entries whose expert is selected by `expert_mask` (n_expert bytes,
// nonzero = computed here; empty = all experts), skipping kNoExpert entries
// (a routing may have any width n_expert_used >= 1), where
//   expert_e(v) = down_e · (silu(gate_e · v) ⊙ (up_e · v)).
// `out` is resized to [n_tokens, n_embd] and overwritten (zero rows for tokens
// with no selected entry). Partial sums over disjoint masks add up to the full
// MoE output, which is how experts are split across sockets, GPUs and nodes.
// The model does not serialise calls: a backend used by stages running
// concurrently (several sequences or layers in flight) must be thread-safe,
// and each implementation documents whether it is.
//
// ComputeRows is the same for some rows of a larger batch: token j of
// `routing` is row rows[j] of h (F32 [n_rows, n_embd], every rows[j] in
// [0, n_rows), InvalidArgument otherwise), and `out` gets routing.n_tokens
// rows. An expert shard serving its part of a batch calls it: the default
// gathers the rows into a copy and calls Compute; a backend that can read
// the rows in place (CpuMoeBackend) overrides it and skips the copy.
class ExpertBackend {
 public:
  virtual ~ExpertBackend() = default;
  virtual absl::Status Compute(int il, const Activations& h, const Routing& routing,
                               std::span<const uint8_t> expert_mask, Activations* out) = 0;
  virtual absl::Status ComputeRows(int il, const Activations& h, std::span<const int32_t> rows,
                                   const Routing& routing, std::span<const uint8_t> expert_mask,
                                   Activations* out);
};

// InvalidArgument unless rows has routing.n_tokens entries, each in [0, h.n_tokens()).
absl::Status CheckExpertRows(const Activations& h, std::span<const int32_t> rows,
                             const Routing& routing);

}  // namespace ktx::models
