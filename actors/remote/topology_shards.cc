// File: actors/remote/topology_shards.cc
#include "actors/remote/topology_shards.h"

#include <algorithm>
#include <filesystem>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "actors/remote/wire_dtype.h"
#include "actors/rpc/security.h"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"
#include "topology/cpu_list.h"
#include "topology/gguf_experts.h"

namespace ktx::actors {

absl::StatusOr<std::vector<ShardOptions>> ShardsFromTopology(
    const topology::ParsedTopologyConfig& parsed, std::string_view local_node) {
  const std::string source = parsed.path.empty() ? std::string("topology") : parsed.path;
  bool found = local_node.empty();
  std::vector<ShardOptions> shards;
  const auto& nodes = parsed.config.nodes();
  for (int i = 0; i < nodes.size(); ++i) {
    const ktx::v1::NodeConfig& node = nodes[i];
    const bool local = !local_node.empty() && node.name() == local_node;
    found = found || local;
    for (int j = 0; j < node.shards_size(); ++j) {
      const ktx::v1::ShardConfig& shard = node.shards(j);
      ShardOptions s;
      s.name = shard.name();
      s.node = node.name();
      if (!local) s.address = node.listen_address();
      if (!shard.cpus().empty()) {
        absl::StatusOr<std::vector<int>> cpus = topology::ParseCpuList(shard.cpus());
        if (!cpus.ok()) {
          const std::string field = absl::StrCat("nodes[", i, "].shards[", j, "].cpus");
          return absl::InvalidArgumentError(topology::FormatProblem(
              source,
              {parsed.locations.LineOf(field),
               absl::StrCat(field, " of shard '", shard.name(), "': ", cpus.status().message())}));
        }
        s.cpus = *std::move(cpus);
      }
      if (shard.memory_budget_bytes() > 0) s.memory_budget_bytes = shard.memory_budget_bytes();
      s.numa_node = shard.numa_node();
      shards.push_back(std::move(s));
    }
  }
  if (!found) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": no node is named '", std::string(local_node), "'"));
  }
  return shards;
}

absl::StatusOr<topology::PlacementPlan> PlanShards(const models::Deepseek2Model& model,
                                                   const std::vector<ShardOptions>& shards,
                                                   const topology::PlacementOptions& placement) {
  KTX_ASSIGN_OR_RETURN(topology::ModelExpertTable table,
                       topology::ModelExpertTableFromGguf(model.file()));
  std::vector<topology::ShardSpec> specs;
  for (const ShardOptions& s : shards) specs.push_back({s.name, s.memory_budget_bytes});
  return topology::PlanExpertPlacement(table, specs, placement);
}

std::vector<HeldExperts> HeldByShard(const topology::PlacementPlan& plan,
                                     const models::Deepseek2Hparams& hp) {
  std::vector<HeldExperts> held(plan.shards.size(), HeldExperts(hp.n_layer));
  for (int il = 0; il < hp.n_layer && il < static_cast<int>(plan.layers.size()); ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    const auto& of = plan.layers[il].shards_of_expert;
    for (int e = 0; e < static_cast<int>(of.size()); ++e) {
      std::vector<int> holders = of[e];
      std::sort(holders.begin(), holders.end());
      holders.erase(std::unique(holders.begin(), holders.end()), holders.end());
      for (int s : holders) {
        if (s >= 0 && s < static_cast<int>(held.size())) held[s][il].push_back(e);
      }
    }
  }
  return held;
}

absl::StatusOr<EngineOptions> EngineOptionsFromTopology(
    const topology::ParsedTopologyConfig& parsed, std::string_view node_name) {
  const std::string source = parsed.path.empty() ? std::string("topology") : parsed.path;
  const std::string name(node_name);
  // Structural checks only: the other nodes' cpus and budgets are their
  // machines' business.
  topology::ValidationOptions validation;
  validation.local_node = name;
  const std::vector<topology::ConfigProblem> problems =
      topology::ValidateTopologyConfig(parsed, validation);
  if (!problems.empty()) {
    std::vector<std::string> lines;
    for (const topology::ConfigProblem& p : problems) {
      lines.push_back(topology::FormatProblem(source, p));
    }
    return absl::InvalidArgumentError(absl::StrJoin(lines, "\n"));
  }
  const ktx::v1::NodeConfig* self = nullptr;
  int self_index = -1;
  for (int i = 0; i < parsed.config.nodes_size(); ++i) {
    if (parsed.config.nodes(i).name() == name) {
      self = &parsed.config.nodes(i);
      self_index = i;
    }
  }
  if (self == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": no node is named '", name, "'"));
  }
  if (!self->head()) {
    return absl::InvalidArgumentError(topology::FormatProblem(
        source, {parsed.locations.LineOf(absl::StrCat("nodes[", self_index, "]")),
                 absl::StrCat("node '", name,
                              "' is not the head: it hosts expert shards (ShardHost), the "
                              "engine runs on the head")}));
  }
  EngineOptions options;
  if (!self->attention_device().empty()) options.attention_device = self->attention_device();
  KTX_ASSIGN_OR_RETURN(options.shards, ShardsFromTopology(parsed, name));
  if (options.shards.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": the topology has no expert shard"));
  }
  const std::string dir = parsed.path.empty()
                              ? std::string()
                              : std::filesystem::path(parsed.path).parent_path().string();
  KTX_ASSIGN_OR_RETURN(options.rpc_security, rpc::RpcSecurityFromNode(*self, dir));
  if (!parsed.config.expert_wire_dtype().empty()) {
    absl::StatusOr<WireDtype> dtype = ParseWireDtype(parsed.config.expert_wire_dtype());
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(topology::FormatProblem(
          source, {parsed.locations.LineOf("expert_wire_dtype"),
                   absl::StrCat("expert_wire_dtype: ", dtype.status().message())}));
    }
    options.wire_dtype = *dtype;
  }
  return options;
}

}  // namespace ktx::actors
