// File: runtime/models/expert_usage.h
//
// Expert-usage profiles as plain data: per MoE layer, how often each routed
// expert was selected and how the gate-weight mass of a token splits over the
// ranks of its top-k, recorded from the routings of real traffic
// (`ktx-ctl profile`, which stores them as ktx.v1.ExpertUsageProfile; the
// placement planner weighs experts by these counts) and summarised for people
// (`ktx-ctl profile show`): hot experts, the mass the top-m of K carry, load
// imbalance. docs/experts.md describes the file.
//
//   ExpertUsage usage(model.hparams().n_layer, model.hparams().n_expert,
//                     model.hparams().n_expert_used);
//   ForwardOptions options;
//   options.on_routing = [&](int il, const Routing& r) { usage.Record(il, r); };
//   model.Forward(tokens, kv, LogitsRows::kLast, &logits, options);
//   double top6 = usage.MassCoveredByTop(il, 6);  // mean share of the 6 heaviest
//
// Thread-safety: not thread-safe (one recorder per forward loop); const
// methods may run concurrently.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "runtime/models/moe.h"

namespace ktx::models {

// The counts of one layer. Dense layers (and MoE layers never recorded) have
// n_tokens == 0.
struct LayerUsage {
  int64_t n_tokens = 0;            // tokens routed through this layer
  std::vector<int64_t> count;      // [n_expert] times each expert was selected
  std::vector<double> weight;      // [n_expert] Σ of its normalised gate weight
  std::vector<double> rank_mass;   // [n_expert_used] Σ over tokens of the normalised
                                   // weight of the r-th heaviest entry (r = 0 first)
  std::vector<int64_t> rank_used;  // [n_expert_used] tokens that had an r-th entry
};

class ExpertUsage {
 public:
  ExpertUsage() = default;
  ExpertUsage(int32_t n_layer, int32_t n_expert, int32_t n_expert_used);

  int32_t n_layer() const { return static_cast<int32_t>(layers_.size()); }
  int32_t n_expert() const { return n_expert_; }
  int32_t n_expert_used() const { return n_expert_used_; }
  const LayerUsage& layer(int il) const { return layers_[il]; }
  LayerUsage& mutable_layer(int il) { return layers_[il]; }

  // Adds one routing of layer il: every non-kNoExpert entry counts once for
  // its expert; a token's weights are normalised to sum 1 (its share of the
  // token's gate mass, whatever the model's scale), sorted falling and added
  // to rank_mass. InvalidArgument for a layer out of range, an expert id out
  // of range or a routing wider than n_expert_used.
  absl::Status Record(int il, const Routing& routing);

  // Tokens recorded in the busiest layer (= tokens profiled).
  int64_t n_tokens() const;

  // ---- summaries of layer il (0 for a layer without tokens) ----

  // The m most selected experts, by falling count (ties: lower id).
  std::vector<int32_t> HotExperts(int il, int m) const;
  // Mean share of a token's gate mass carried by its r-th heaviest expert.
  double MeanRankMass(int il, int r) const;
  // Mean share carried by the m heaviest experts of a token (m <= K).
  double MassCoveredByTop(int il, int m) const;
  // Share of all selections that went to the m most selected experts.
  double SelectionShareOfHot(int il, int m) const;
  // Imbalance: the largest count over the mean count (selections / n_expert);
  // 1 is perfectly even.
  double Imbalance(int il) const;
  // Experts never selected.
  int32_t UnusedExperts(int il) const;

 private:
  int32_t n_expert_ = 0;
  int32_t n_expert_used_ = 0;
  std::vector<LayerUsage> layers_;  // [n_layer]
};

}  // namespace ktx::models
