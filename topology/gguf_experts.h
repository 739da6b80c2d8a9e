// File: topology/gguf_experts.h
//
// Builds the planner's ModelExpertTable from a GGUF model: the layer count
// from `<general.architecture>.block_count`, and per layer the routed-expert
// tensors `blk.<il>.<name>_exps.<suffix>` (ffn_gate_exps, ffn_up_exps,
// ffn_down_exps, or the fused ffn_gate_up_exps, plus any per-expert biases or
// scales of the same form). Each is a tensor whose last dimension is n_expert;
// one expert's bytes are the tensor's bytes / n_expert, summed over the
// layer's *_exps tensors. A layer without *_exps tensors is dense. Separate
// from placement.h so that the planner and its tests need no GGUF.
// Pure functions; the GgufFile is only read.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "runtime/gguf/gguf.h"
#include "topology/placement.h"

namespace ktx::topology {

// Errors (kInvalidArgument, naming the file and tensor): no block_count, an
// *_exps tensor outside 0..block_count-1, a MoE layer without ffn_down_exps or
// without gate and up (separate or fused), tensors of one layer disagreeing on
// n_expert (or with `<arch>.expert_count` when present), a tensor whose bytes
// do not divide evenly by n_expert.
absl::StatusOr<ModelExpertTable> ModelExpertTableFromGguf(const gguf::GgufFile& file);

// Opens `path` (split models: the first part) and calls the above.
absl::StatusOr<ModelExpertTable> LoadModelExpertTable(const std::string& path);

}  // namespace ktx::topology
