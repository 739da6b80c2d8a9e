// File: topology/placement.h
//
// Expert placement: which expert shard holds which routed experts of which
// MoE layer. Input is plain data (the experts' sizes per layer, the shards with
// their memory budgets, optionally an expert-usage profile and a replication
// setting); output is a deterministic plan: per layer per expert the shard(s)
// holding it, per shard its experts, bytes and expected load. The planner knows
// nothing of GGUF or protobuf (ModelExpertTableFromGguf in gguf_experts.h and
// ShardSpecsFromConfig in config.h build its inputs).
//
//   ModelExpertTable model = ...;  // e.g. from ModelExpertTableFromGguf
//   std::vector<ShardSpec> shards = {{"node0/numa0", 180ULL << 30}, {"node0/numa1", 180ULL << 30}};
//   KTX_ASSIGN_OR_RETURN(PlacementPlan plan, PlanExpertPlacement(model, shards));
//   // plan.layers[il].shards_of_expert[e] -> {shard index, ...}
//
// Algorithm (docs/topology.md has the long form). Layers are planned one at a
// time in ascending il:
//  1. Slots: a layer needs n_expert slots plus (n_copies - 1) per replicated
//     expert, each of bytes_per_expert. Slots are dealt one by one to the shard
//     with the fewest slots of this layer, then the fewest bytes so far, then
//     the lowest index, among shards whose budget still has room. This is LPT
//     (largest first onto the least-loaded shard) on bytes: per layer the shards
//     differ by at most one expert, and over the whole model the fullest and
//     emptiest shard differ by at most one expert's bytes while no budget binds.
//  2. Experts fill the slots. Without profile weights for the layer the experts
//     are dealt in contiguous index ranges, shard by shard. With weights, the
//     replicated (hottest) experts go first, each onto n_copies distinct shards
//     (those with the most free slots, then the least load); then the rest in
//     order of falling weight (ties: lower expert id), each onto the shard with
//     the least load of this layer that still has a free slot (LPT on load).
// A replicated expert's load is split evenly between its copies. Nothing is
// duplicated unless replication asks for it. Equal inputs give equal plans.
//
// Thread-safety: plain values and pure functions.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ktx::topology {

// The routed experts of one layer. All experts of a layer have the same size:
// the bytes of one expert's slices of every *_exps tensor (gate, up, down).
struct LayerExperts {
  bool is_moe = false;            // false: dense layer, nothing to place
  int n_expert = 0;               // MoE layers: >= 1
  uint64_t bytes_per_expert = 0;  // MoE layers: >= 1
};

// The routed experts of a whole model.
struct ModelExpertTable {
  int n_layer = 0;
  std::vector<LayerExperts> layers;  // [n_layer], indexed by il

  int n_moe_layers() const;
  uint64_t total_bytes() const;  // sum over MoE layers of n_expert * bytes_per_expert
};

// OK when layers.size() == n_layer and every MoE layer has n_expert >= 1 and
// bytes_per_expert >= 1. Errors name the layer.
absl::Status ValidateModelExpertTable(const ModelExpertTable& model);

// A budget that never binds.
inline constexpr uint64_t kNoBudget = std::numeric_limits<uint64_t>::max();

// One expert shard as the planner sees it.
struct ShardSpec {
  std::string name;
  uint64_t memory_budget_bytes = kNoBudget;  // bytes of expert weights it may hold
};

// Expected usage of the experts, e.g. tokens routed to each expert over a
// sample of traffic. Only the ratios within a layer matter: the planner scales
// each layer's weights to mean 1. Layers without an entry count as uniform.
struct ExpertProfile {
  std::map<int, std::vector<double>> weights;  // il -> [n_expert], finite, >= 0, sum > 0
};

// Parses a profile from JSON: {"layers": {"3": [w0, w1, ...], "4": [...]}}
// (keys are decimal layer indices, values arrays of non-negative numbers).
// `source` names the input in errors. Shapes are checked against the model by
// the planner, not here.
absl::StatusOr<ExpertProfile> ParseExpertProfileJson(std::string_view json,
                                                     const std::string& source);
absl::StatusOr<ExpertProfile> LoadExpertProfile(const std::string& path);

// Replicate the `n_hot` hottest experts of every layer that has profile
// weights onto `n_copies` distinct shards each. n_hot == 0: no replication.
struct ReplicationOptions {
  int n_hot = 0;     // 0 .. (clipped to each layer's n_expert)
  int n_copies = 2;  // 1 .. number of shards (1 = no extra copies)
};

struct PlacementOptions {
  ExpertProfile profile;  // empty: every expert weighs the same
  ReplicationOptions replication;
  // Experts served elsewhere, held by no shard (the hot experts resident on
  // the attention GPU, gpu_hot_experts.h): il -> distinct ids of MoE layer
  // il. They get no slot and no load (shards_of_expert[e] stays empty, their
  // weight is still reported); the other experts are planned as above, and
  // replication takes the hottest experts that remain.
  std::map<int, std::vector<int>> excluded;
};

// Where the experts of one layer live.
struct LayerPlacement {
  // [n_expert] -> ascending indices of the shards holding the expert; empty
  // for dense layers and for excluded experts. One entry per expert unless
  // it is replicated.
  std::vector<std::vector<int>> shards_of_expert;
  // [n_expert] the expert's weight scaled to mean 1 (all 1 without a profile).
  std::vector<double> weight;
};

// What one shard holds.
struct ShardPlacement {
  std::string name;
  uint64_t memory_budget_bytes = kNoBudget;
  uint64_t bytes = 0;                     // expert bytes assigned
  double load = 0;                        // sum over held experts of weight / copies
  double share = 0;                       // load / plan total load
  int n_experts = 0;                      // expert slices held (over all layers)
  std::vector<std::vector<int>> experts;  // [n_layer] ascending expert ids held
  std::vector<double> layer_load;         // [n_layer] load of each layer
};

// A shard whose budget the plan exceeds.
struct ShardShortfall {
  int shard = 0;
  std::string name;
  uint64_t need_bytes = 0;
  uint64_t budget_bytes = 0;
  uint64_t missing_bytes() const { return need_bytes - budget_bytes; }
};

struct PlacementPlan {
  int n_layer = 0;
  std::vector<LayerPlacement> layers;  // [n_layer]
  std::vector<ShardPlacement> shards;  // in the order given
  uint64_t total_bytes = 0;            // sum of shard bytes (replicas included)
  uint64_t budget_bytes = kNoBudget;   // sum of budgets (kNoBudget if any has none)
  double total_load = 0;               // sum of shard loads (= number of placed MoE experts)
  int n_replicated = 0;                // experts (over all layers) with more than one copy
  // Shards over budget, ascending index. Non-empty only from
  // ComputeExpertPlacement when the experts do not fit.
  std::vector<ShardShortfall> shortfalls;
  bool fits() const { return shortfalls.empty(); }
};

// The plan (see the algorithm above). Fails with kInvalidArgument for bad
// input (table, no shards, profile shape or values, replication settings) and
// kResourceExhausted when the experts do not fit the budgets; that message
// gives the total needed and, per shard, needed, budget and missing bytes.
absl::StatusOr<PlacementPlan> PlanExpertPlacement(const ModelExpertTable& model,
                                                  const std::vector<ShardSpec>& shards,
                                                  const PlacementOptions& options = {});

// Like PlanExpertPlacement, but when a slot finds no shard with room it goes to
// the shard the rule picks with budgets ignored, and the plan comes back with
// `shortfalls` listing each shard's excess: how much each budget would have
// to grow for this plan to fit. Fails only for bad input.
absl::StatusOr<PlacementPlan> ComputeExpertPlacement(const ModelExpertTable& model,
                                                     const std::vector<ShardSpec>& shards,
                                                     const PlacementOptions& options = {});

// The shortfalls as one sentence ("the routed experts need X but ...; shard
// 'a' needs ..., budget ..., missing ...").
std::string DescribeShortfalls(const PlacementPlan& plan);

// Human-readable plan: per shard its bytes, budget and load share, and its
// experts per layer as ranges (consecutive layers holding the same experts
// share one line); then memory per shard.
std::string PlacementPlanToText(const PlacementPlan& plan, const ModelExpertTable& model);

// JSON: {n_layer, total_bytes, total_load, n_replicated, fits,
//  shards[] {name, budget_bytes (null = none), bytes, load, share, n_experts,
//            layers[] {il, experts[], ranges}},
//  layers[] {il, n_expert, bytes_per_expert, shards_of_expert[][]} (MoE layers only)}.
std::string PlacementPlanToJson(const PlacementPlan& plan, const ModelExpertTable& model,
                                int indent = 2);

// "1.5 GiB", "512.0 MiB", "300 B": sizes in messages and plans.
std::string FormatBytes(uint64_t bytes);

}  // namespace ktx::topology
