// File: actors/service/node_control_service.cc
#include "actors/service/node_control_service.h"

#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "actors/status_bridge.h"
#include "runtime/base/logging.h"
#include "topology/cpu_list.h"
#include "topology/gguf_experts.h"

#ifndef KTX_VERSION
#define KTX_VERSION "unknown"
#endif

namespace ktx::service {
namespace {

// The default ReloadPlan planner: the topology's shards (every node's, in
// file order) planned as Engine::Create plans them.
absl::StatusOr<topology::PlacementPlan> DefaultPlan(const actors::Engine& engine,
                                                    const std::string& path) {
  KTX_ASSIGN_OR_RETURN(actors::EngineOptions options, actors::EngineOptionsFromTopologyFile(path));
  KTX_ASSIGN_OR_RETURN(topology::ModelExpertTable table,
                       topology::ModelExpertTableFromGguf(engine.model().file()));
  std::vector<topology::ShardSpec> specs;
  for (const actors::ShardOptions& s : options.shards) {
    specs.push_back({s.name, s.memory_budget_bytes});
  }
  return topology::PlanExpertPlacement(table, specs, options.placement);
}

std::vector<int> Sorted(std::vector<int> v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

}  // namespace

ktx::v1::HardwareReport HardwareToProto(const topology::HardwareTopology& hw) {
  ktx::v1::HardwareReport report;
  report.set_numa_available(hw.numa_available);
  for (const topology::NumaNodeInfo& n : hw.nodes) {
    ktx::v1::NumaNode* node = report.add_nodes();
    node->set_id(n.id);
    node->mutable_cpus()->Assign(n.cpus.begin(), n.cpus.end());
    node->set_memory_bytes(n.memory_bytes);
    node->set_free_memory_bytes(n.free_memory_bytes);
    node->mutable_sockets()->Assign(n.sockets.begin(), n.sockets.end());
  }
  report.set_n_sockets(hw.n_sockets);
  const kernels::CpuFeatures& f = hw.isa;
  auto& isa = *report.mutable_isa();
  isa["avx2"] = f.avx2;
  isa["fma"] = f.fma;
  isa["avx512f"] = f.avx512f;
  isa["avx512bw"] = f.avx512bw;
  isa["avx512vl"] = f.avx512vl;
  isa["avx512_vnni"] = f.avx512_vnni;
  isa["avx512_bf16"] = f.avx512_bf16;
  isa["avx512_fp16"] = f.avx512_fp16;
  isa["avx_vnni"] = f.avx_vnni;
  isa["amx_tile"] = f.amx_tile;
  isa["amx_int8"] = f.amx_int8;
  isa["amx_bf16"] = f.amx_bf16;
  isa["amx_permitted"] = f.amx_permitted;
  for (const topology::GpuInfo& g : hw.gpus) {
    ktx::v1::Gpu* gpu = report.add_gpus();
    gpu->set_index(g.index);
    gpu->set_name(g.name);
    gpu->set_memory_bytes(g.memory_bytes);
    gpu->set_compute_capability(absl::StrCat(g.compute_major, ".", g.compute_minor));
  }
  report.set_cpu_brand(f.brand);
  return report;
}

std::vector<ktx::v1::ShardStatus> PlanShards(const topology::PlacementPlan& plan) {
  std::vector<ktx::v1::ShardStatus> out;
  for (const topology::ShardPlacement& shard : plan.shards) {
    ktx::v1::ShardStatus s;
    s.set_name(shard.name);
    s.set_expert_bytes(shard.bytes);
    s.set_n_experts(shard.n_experts);
    s.set_load_share(shard.share);
    for (size_t il = 0; il < shard.experts.size(); ++il) {
      if (shard.experts[il].empty()) continue;
      ktx::v1::LayerExperts* layer = s.add_layers();
      layer->set_layer(static_cast<int32_t>(il));
      layer->mutable_experts()->Assign(shard.experts[il].begin(), shard.experts[il].end());
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::string ComparePlans(const topology::PlacementPlan& running,
                         const topology::PlacementPlan& planned) {
  std::vector<std::string> a, b;
  for (const auto& s : running.shards) a.push_back(s.name);
  for (const auto& s : planned.shards) b.push_back(s.name);
  if (a != b) {
    return absl::StrCat("the shards differ: running [", absl::StrJoin(a, ", "), "], planned [",
                        absl::StrJoin(b, ", "), "]");
  }
  if (running.n_layer != planned.n_layer || running.layers.size() != planned.layers.size()) {
    return absl::StrCat("the layer count differs: running ", running.n_layer, ", planned ",
                        planned.n_layer);
  }
  std::vector<std::string> moves;
  int n_moved = 0;
  for (size_t il = 0; il < running.layers.size(); ++il) {
    const auto& ra = running.layers[il].shards_of_expert;
    const auto& pa = planned.layers[il].shards_of_expert;
    int moved = 0;
    for (size_t e = 0; e < std::max(ra.size(), pa.size()); ++e) {
      const std::vector<int> x = e < ra.size() ? Sorted(ra[e]) : std::vector<int>{};
      const std::vector<int> y = e < pa.size() ? Sorted(pa[e]) : std::vector<int>{};
      if (x != y) ++moved;
    }
    if (moved > 0) {
      n_moved += moved;
      if (moves.size() < 8) moves.push_back(absl::StrCat("layer ", il, ": ", moved));
    }
  }
  if (n_moved == 0) return "";
  return absl::StrCat(n_moved, " expert placements differ (", absl::StrJoin(moves, ", "),
                      moves.size() < 8 ? "" : ", ...", ")");
}

absl::StatusOr<std::unique_ptr<NodeControlService>> NodeControlService::Create(
    NodeControlOptions options) {
  if (options.node_name.empty()) {
    return absl::InvalidArgumentError("NodeControlService: the node needs a name");
  }
  if (options.engine != nullptr &&
      options.shard_locations.size() > options.engine->shards().size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("NodeControlService: ", options.shard_locations.size(),
                     " shard locations for ", options.engine->shards().size(), " shards"));
  }
  if (options.version.empty()) options.version = KTX_VERSION;
  if (!options.hardware) {
    absl::StatusOr<topology::HardwareTopology> hw =
        topology::DiscoverHardware(*topology::SystemHardwareSource());
    if (hw.ok()) {
      options.hardware = *std::move(hw);
    } else {
      KTX_LOG(WARNING, "service") << "hardware discovery failed: " << hw.status();
    }
  }
  return std::unique_ptr<NodeControlService>(new NodeControlService(std::move(options)));
}

NodeControlService::NodeControlService(NodeControlOptions options) : options_(std::move(options)) {
  if (options_.hardware) hardware_ = HardwareToProto(*options_.hardware);
}

ktx::v1::GpuStatus GpuStatusOf(const std::string& attention_device, const gpu::GpuMemoryPlan& plan,
                               const topology::GpuHotExperts& hot) {
  ktx::v1::GpuStatus out;
  out.set_attention_device(attention_device);
  out.set_weight_bytes(plan.weight_bytes());
  out.set_kv_bytes(plan.kv_bytes);
  out.set_kv_tokens(plan.kv_tokens);
  out.set_activation_bytes(plan.activation_bytes + plan.workspace_bytes);
  out.set_expert_stream_bytes(plan.expert_stream_bytes);
  out.set_resident_expert_bytes(plan.resident_expert_bytes);
  out.set_resident_experts(static_cast<int32_t>(plan.resident_experts));
  for (const auto& [il, ids] : hot.experts) {
    if (ids.empty()) continue;
    ktx::v1::LayerExperts* layer = out.add_hot_experts();
    layer->set_layer(il);
    for (int e : ids) layer->add_experts(e);
  }
  out.set_hot_expected_share(hot.expected_share);
  out.set_total_bytes(plan.total_bytes());
  out.set_free_bytes_at_load(plan.free_bytes);
  return out;
}

ktx::v1::NodeStatusResponse NodeControlService::BuildStatus() const {
  ktx::v1::NodeStatusResponse out;
  out.set_node_name(options_.node_name);
  out.set_version(options_.version);
  *out.mutable_hardware() = hardware_;
  out.set_role(options_.role);
  out.set_uptime_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  if (options_.server != nullptr) out.set_address(options_.server->address());
  const bool draining = (options_.server != nullptr && options_.server->draining()) ||
                        (options_.generation != nullptr && options_.generation->draining());
  out.set_draining(draining);
  std::string model_name = options_.model_name;
  if (model_name.empty() && options_.generation != nullptr) {
    model_name = options_.generation->served_model().name;
  }
  out.set_model_name(model_name);
  std::string fingerprint = options_.model_fingerprint;
  if (fingerprint.empty() && options_.generation != nullptr) {
    fingerprint = options_.generation->served_model().fingerprint;
  }
  out.set_model_fingerprint(fingerprint);

  std::vector<std::string> down;
  if (options_.engine != nullptr) {
    actors::Engine& engine = *options_.engine;
    const topology::PlacementPlan& plan = engine.plan();
    const std::vector<actors::ShardOptions>& shards = engine.shards();
    absl::StatusOr<actors::RouterCounters> router = engine.RouterStats();
    std::vector<ktx::v1::ShardStatus> statuses = PlanShards(plan);
    // Peers in order of first appearance.
    std::vector<std::string> peer_order;
    std::map<std::string, ktx::v1::PeerNode> peers;
    for (size_t s = 0; s < statuses.size(); ++s) {
      ktx::v1::ShardStatus& st = statuses[s];
      ShardLocation where;
      if (s < options_.shard_locations.size()) {
        where = options_.shard_locations[s];
      } else if (s < shards.size()) {
        where = {shards[s].node, shards[s].address};  // ShardOptions: remote shards
      }
      st.set_node(where.node.empty() ? options_.node_name : where.node);
      st.set_address(where.address);
      if (s < shards.size()) st.set_cpus(topology::FormatIdRanges(shards[s].cpus));
      bool alive = false;
      if (router.ok() && s < router->alive.size()) {
        alive = router->alive[s];
        st.set_parts_sent(s < router->parts_sent.size() ? router->parts_sent[s] : 0);
      }
      st.set_alive(alive);
      if (!alive) {
        down.push_back(absl::StrCat("shard '", st.name(), "' (node '", st.node(), "'",
                                    st.address().empty() ? "" : absl::StrCat(", ", st.address()),
                                    ")"));
      }
      if (st.node() != options_.node_name) {
        auto [it, inserted] = peers.try_emplace(st.node());
        if (inserted) {
          peer_order.push_back(st.node());
          it->second.set_name(st.node());
          it->second.set_address(st.address());
          it->second.set_role(ktx::v1::NODE_ROLE_SHARD);
          it->second.set_reachable(true);
        }
        it->second.add_shards(st.name());
        if (!alive) it->second.set_reachable(false);
      }
      *out.add_shards() = std::move(st);
    }
    for (const std::string& name : peer_order) *out.add_peers() = peers[name];
    if (!router.ok()) down.push_back(absl::StrCat("router: ", router.status().message()));
    if (const std::optional<gpu::GpuMemoryPlan> gpu_plan = engine.gpu_memory_plan(); gpu_plan) {
      *out.mutable_gpu() =
          GpuStatusOf(engine.attention_device(), *gpu_plan, engine.gpu_hot_experts());
    }
    absl::StatusOr<actors::KvCacheStats> kv = engine.KvStats();
    if (kv.ok()) {
      out.mutable_kv_cache()->set_budget_bytes(kv->budget_bytes);
      out.mutable_kv_cache()->set_used_bytes(kv->used_bytes);
      out.mutable_kv_cache()->set_n_sequences(kv->n_sequences);
      out.mutable_kv_cache()->set_free_tokens(kv->free_tokens);
    }
  }
  if (options_.generation != nullptr) *out.mutable_requests() = options_.generation->Load();
  if (options_.add_status) options_.add_status(&out);
  if (draining) {
    out.set_health("draining");
  } else if (!down.empty()) {
    out.set_health(absl::StrCat("degraded: ", absl::StrJoin(down, "; "), " down"));
  } else if (out.health().empty()) {
    out.set_health("serving");
  }
  return out;
}

grpc::Status NodeControlService::Status(grpc::ServerContext* context,
                                        const ktx::v1::NodeStatusRequest* request,
                                        ktx::v1::NodeStatusResponse* response) {
  if (grpc::Status s = rpc::CheckToken(*context, options_.security); !s.ok()) return s;
  *response = BuildStatus();
  return grpc::Status::OK;
}

grpc::Status NodeControlService::Drain(grpc::ServerContext* context,
                                       const ktx::v1::DrainRequest* request,
                                       ktx::v1::DrainResponse* response) {
  if (grpc::Status s = rpc::CheckToken(*context, options_.security); !s.ok()) return s;
  if (options_.server == nullptr && options_.generation == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this node has nothing to drain (no server or generation service)");
  }
  KTX_LOG(INFO, "service") << "Drain requested by " << context->peer();
  if (options_.server != nullptr) {
    options_.server->BeginDrain();
  } else {
    options_.generation->BeginDrain();
  }
  const std::chrono::milliseconds wait(request->wait_ms());
  bool idle = options_.server != nullptr ? options_.server->WaitIdle(wait)
                                         : options_.generation->WaitIdle(wait);
  const int in_flight =
      options_.server != nullptr ? options_.server->in_flight() : options_.generation->in_flight();
  response->set_draining(true);
  response->set_in_flight(in_flight);
  response->set_idle(idle && in_flight == 0);
  if (options_.on_drain) options_.on_drain();
  return grpc::Status::OK;
}

grpc::Status NodeControlService::ReloadPlan(grpc::ServerContext* context,
                                            const ktx::v1::ReloadPlanRequest* request,
                                            ktx::v1::ReloadPlanResponse* response) {
  if (grpc::Status s = rpc::CheckToken(*context, options_.security); !s.ok()) return s;
  if (options_.engine == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "ReloadPlan: this node is not a head (it runs no plan of its own)");
  }
  if (options_.topology_path.empty()) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "ReloadPlan: this node was started without a topology file");
  }
  if (!request->topology_path().empty() && request->topology_path() != options_.topology_path) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("topology_path: only the node's own topology file ('",
                                     options_.topology_path, "') can be re-read"));
  }
  absl::StatusOr<topology::PlacementPlan> plan =
      options_.plan_from_topology ? options_.plan_from_topology(options_.topology_path)
                                  : DefaultPlan(*options_.engine, options_.topology_path);
  if (!plan.ok()) return ToGrpcStatus(plan.status());
  const std::string diff = ComparePlans(options_.engine->plan(), *plan);
  response->set_changed(!diff.empty());
  response->set_applied(false);
  response->set_message(
      diff.empty()
          ? absl::StrCat("'", options_.topology_path, "' gives the running plan; nothing to do")
          : absl::StrCat("'", options_.topology_path, "' gives a different plan: ", diff,
                         ". Not applied: experts do not move while serving; restart the "
                         "nodes with this config to use it"));
  for (ktx::v1::ShardStatus& s : PlanShards(*plan)) *response->add_shards() = std::move(s);
  return grpc::Status::OK;
}

}  // namespace ktx::service
