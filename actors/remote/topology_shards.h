// File: actors/remote/topology_shards.h
//
// The one place where a topology config becomes the list of expert shards
// and the placement plan, for the head (EngineOptionsFromTopology,
// Engine::Create) and for every shard node (ShardHost::Create) alike. The
// plan must come out identical on every node, so its inputs are the config
// and the model only: shards in config order (nodes, then their shards),
// their names, and memory_budget_bytes as written (0: no budget; never the
// memory of the machine that happens to compute it), plus PlacementOptions
// that every node must be given equal (profile, replication).
//
//   KTX_ASSIGN_OR_RETURN(std::vector<ShardOptions> shards, ShardsFromTopology(parsed, "node1"));
//   KTX_ASSIGN_OR_RETURN(topology::PlacementPlan plan, PlanShards(*model, shards, {}));
//   std::vector<HeldExperts> held = HeldByShard(plan, model->hparams());
//
// Thread-safety: pure functions.
#pragma once

#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "actors/engine.h"
#include "actors/shard_experts.h"
#include "runtime/models/deepseek2.h"
#include "topology/config.h"
#include "topology/placement.h"

namespace ktx::actors {

// Every shard of the topology in plan order. Shards of `local_node` get an
// empty address (they run in the calling process); every other node's shards
// get that node's listen_address. Each carries its node's name, cpus (parsed)
// and budget. Errors: InvalidArgument naming the config file, line and shard
// for an unparsable cpu list, and when `local_node` is not a node of the
// config (an empty local_node makes every shard remote).
absl::StatusOr<std::vector<ShardOptions>> ShardsFromTopology(
    const topology::ParsedTopologyConfig& parsed, std::string_view local_node);

// The plan Engine::Create computes when EngineOptions::plan is empty: the
// model's expert table (topology::ModelExpertTableFromGguf) over the shards'
// names and budgets in order, with `placement`.
absl::StatusOr<topology::PlacementPlan> PlanShards(const models::Deepseek2Model& model,
                                                   const std::vector<ShardOptions>& shards,
                                                   const topology::PlacementOptions& placement);

// held[s][il]: ascending, de-duplicated ids of the experts of MoE layer il
// that plan shard s holds ([n_shards][n_layer]). The plan must have been
// checked against the model (layer and expert counts, shard indices).
std::vector<HeldExperts> HeldByShard(const topology::PlacementPlan& plan,
                                     const models::Deepseek2Hparams& hp);

}  // namespace ktx::actors
