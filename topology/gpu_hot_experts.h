// File: topology/gpu_hot_experts.h
//
// Which routed experts stay resident on the attention GPU (issue #9 "hot
// experts on the GPU", issue #7's memory plan): from an expert-usage profile
// and a byte budget, the set of (layer, expert) to keep in device memory,
// hottest first by expected tokens per byte. The GPU computes those experts
// for every batch (runtime/gpu/cuda_deepseek2.h, CudaModelOptions::
// resident_experts), and the placement planner leaves them out of the expert
// shards (PlacementOptions::excluded), so no CPU shard holds what the GPU
// serves. Plain data: no GPU, no GGUF, no protobuf.
//
// Score of expert e of MoE layer il: its share of the layer's selections in
// the profile (w_e / Σ_layer w; 1 / n_expert for a layer the profile does not
// cover), divided by the layer's bytes_per_expert. Experts are taken in
// falling score (ties: lower layer, then lower id) while they fit the budget;
// one that does not fit is skipped and smaller ones may still follow.
// Experts a profile never saw (weight 0) are never taken. Equal inputs give
// equal sets.
//
//   KTX_ASSIGN_OR_RETURN(GpuHotExperts hot, ChooseGpuHotExperts(table, profile, 8ULL << 30));
//   PlacementOptions placement;
//   placement.profile = profile;
//   placement.excluded = hot.experts;  // the shards hold the rest
//
// Thread-safety: plain values and pure functions.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "topology/placement.h"

namespace ktx::topology {

struct GpuHotExperts {
  std::map<int, std::vector<int>> experts;  // il -> ascending expert ids resident on the GPU
  int count = 0;                            // experts over all layers
  uint64_t bytes = 0;                       // Σ bytes_per_expert of the chosen experts
  uint64_t budget_bytes = 0;
  // Mean over MoE layers of the chosen experts' share of the layer's
  // selections (the profile's, uniform where it has none): the expected
  // fraction of routed-expert work the GPU takes.
  double expected_share = 0;

  // [n_layer] experts on the GPU per layer.
  std::vector<int> PerLayer(int n_layer) const;
};

// The set for `budget_bytes` (0: none). `profile` may be empty (every layer
// uniform: then the lowest layers and ids win ties). InvalidArgument for a
// bad table or a profile that does not match it (naming the layer);
// ResourceExhausted, naming the budget and the smallest expert, when the
// budget is positive but below every MoE layer's bytes_per_expert.
absl::StatusOr<GpuHotExperts> ChooseGpuHotExperts(const ModelExpertTable& model,
                                                  const ExpertProfile& profile,
                                                  uint64_t budget_bytes);

// One line: "12 routed experts resident on the GPU (3.0 GiB of a 4.0 GiB
// budget, ~21.5% of the selections); per MoE layer: 3: 4, 4: 8".
std::string DescribeGpuHotExperts(const GpuHotExperts& hot);

}  // namespace ktx::topology
