// File: actors/service/node_control_service.h
//
// The ktx.v1.NodeControl gRPC service (proto/ktx/v1/node.proto) of one node:
//
//  * Status: node name, role, version, hardware, address, uptime, health; on
//    a head (options.engine set): every shard of the plan with its node,
//    address, experts per MoE layer, expert bytes, load share, liveness and
//    the expert requests the router sent it; the KV cache; the Generate load
//    (in flight, running, queued, counters); the other nodes (from the
//    shards' locations). A node program adds what only it knows (a shard
//    node's hosted shards) through options.add_status.
//  * Drain: NodeServer::BeginDrain (new Generate calls fail UNAVAILABLE,
//    health NOT_SERVING), waits up to wait_ms for in-flight calls, then
//    options.on_drain (ktx-node decides whether the process exits).
//  * ReloadPlan: re-reads the node's topology file, plans the expert
//    placement again from it and the model (options.plan_from_topology;
//    default: the same planner Engine::Create uses for a topology's shards,
//    PlacementOptions defaults) and compares with the running plan. It moves
//    no expert: a changed plan takes effect when the nodes restart with that
//    config. The response says so (applied = false).
//
//   NodeControlOptions options;
//   options.node_name = "node0";  options.engine = engine.get();
//   options.generation = generation.get();  options.server = &server;
//   options.topology_path = flags.topology;
//   KTX_ASSIGN_OR_RETURN(auto control, NodeControlService::Create(std::move(options)));
//   server.AddService(control.get(), NodeControlService::kServiceName);
//
// Every handler checks the token first (rpc::CheckToken). Status keeps
// answering while draining (so that `ktx-ctl status` shows it).
//
// Ownership: borrows the engine, the generation service and the server (all
// optional), which must outlive it. Thread-safety: handlers run concurrently;
// the service's own state is immutable after Create.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "actors/engine.h"
#include "actors/rpc/security.h"
#include "actors/service/generation_service.h"
#include "actors/service/node_server.h"
#include "ktx/v1/node.grpc.pb.h"
#include "topology/hardware.h"
#include "topology/placement.h"

namespace ktx::service {

// Where a shard of the engine's plan runs.
struct ShardLocation {
  std::string node;     // its node's name; empty: this node
  std::string address;  // host:port of that node; empty: in this process
};

struct NodeControlOptions {
  rpc::RpcSecurity security;
  std::string node_name;
  ktx::v1::NodeRole role = ktx::v1::NODE_ROLE_HEAD;
  std::string version;                      // empty: the build's version
  actors::Engine* engine = nullptr;         // head: shards, KV cache
  GenerationService* generation = nullptr;  // head: request load
  NodeServer* server = nullptr;             // drain, address
  std::string topology_path;                // the file ReloadPlan re-reads
  std::string model_name;                   // empty: from the generation service
  std::string model_fingerprint;            // empty: from the generation service
  // [engine shards]: where each shard of the plan runs; empty or shorter:
  // the rest as the engine's ShardOptions say (node, address; empty: this
  // node, in this process).
  std::vector<ShardLocation> shard_locations;
  // The machine; absent: discovered once at Create (a failure is logged and
  // leaves the report empty).
  std::optional<topology::HardwareTopology> hardware;
  // Adds node-specific fields to every Status answer (e.g. a shard node's
  // hosted shards). Called on the handler's thread.
  std::function<void(ktx::v1::NodeStatusResponse*)> add_status;
  // Plans from a topology file for ReloadPlan; empty: the default above.
  std::function<absl::StatusOr<topology::PlacementPlan>(const std::string& topology_path)>
      plan_from_topology;
  // Called after a Drain call began draining (and waited), on its thread.
  std::function<void()> on_drain;
};

// The `gpu` part of a head's status: where attention runs, its GPU memory
// plan and the hot routed experts resident there (layers with none left out).
ktx::v1::GpuStatus GpuStatusOf(const std::string& attention_device, const gpu::GpuMemoryPlan& plan,
                               const topology::GpuHotExperts& hot);

class NodeControlService final : public ktx::v1::NodeControl::Service {
 public:
  static constexpr char kServiceName[] = "ktx.v1.NodeControl";

  // Errors: InvalidArgument for an empty node name or shard_locations longer
  // than the engine's shards.
  static absl::StatusOr<std::unique_ptr<NodeControlService>> Create(NodeControlOptions options);

  grpc::Status Status(grpc::ServerContext* context, const ktx::v1::NodeStatusRequest* request,
                      ktx::v1::NodeStatusResponse* response) override;
  grpc::Status Drain(grpc::ServerContext* context, const ktx::v1::DrainRequest* request,
                     ktx::v1::DrainResponse* response) override;
  grpc::Status ReloadPlan(grpc::ServerContext* context, const ktx::v1::ReloadPlanRequest* request,
                          ktx::v1::ReloadPlanResponse* response) override;

  // The Status answer, without the RPC (for ktx-node's logs and tests).
  ktx::v1::NodeStatusResponse BuildStatus() const;

 private:
  explicit NodeControlService(NodeControlOptions options);

  NodeControlOptions options_;
  ktx::v1::HardwareReport hardware_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

// The hardware report of node.proto from a discovered topology.
ktx::v1::HardwareReport HardwareToProto(const topology::HardwareTopology& hardware);

// Shards of a plan as ShardStatus (no live fields: alive false, parts 0).
std::vector<ktx::v1::ShardStatus> PlanShards(const topology::PlacementPlan& plan);

// "" when `a` and `b` place every expert on the same shards (by name);
// else what differs, in words.
std::string ComparePlans(const topology::PlacementPlan& running,
                         const topology::PlacementPlan& planned);

}  // namespace ktx::service
