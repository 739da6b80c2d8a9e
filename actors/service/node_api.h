// File: actors/service/node_api.h
//
// Everything one ktx node serves, assembled and started in one call: a
// NodeServer on the node's address with its RpcSecurity, NodeControl, on a
// head the Generation service over its Engine, and any extra services the
// node program adds (a shard node's ExpertShard service). This is what
// ktx-node calls; the pieces (generation_service.h, node_control_service.h,
// node_server.h) stay usable on their own.
//
//   NodeApiOptions api;
//   api.node_name = "head";
//   api.server.address = node.listen_address();
//   api.server.allow_remote = !topology::IsLoopbackHost(host);
//   api.server.security = security;            // rpc::RpcSecurityFromNode(...)
//   api.engine = engine.get();                 // head only (nullptr on a shard node)
//   api.topology_path = flags.topology;        // for ReloadPlan
//   api.extra_services.push_back({shard_host->service(), "ktx.v1.ExpertShard"});
//   KTX_ASSIGN_OR_RETURN(std::unique_ptr<NodeApi> node_api, NodeApi::Start(std::move(api)));
//   std::cerr << "serving on " << node_api->address() << "\n";
//   ... wait for SIGTERM (sigwait in the main thread, never in a handler), then:
//   node_api->DrainAndStop(std::chrono::seconds(60), std::chrono::seconds(5));
//   node_api.reset();   // before the engine and the ShardHost
//
// Ownership: owns the server and the ktx services; borrows the engine and the
// extra services, which must outlive it. Destruction stops the server first
// (DrainAndStop with no grace if it was not called), then the services.
// Thread-safety: DrainAndStop, the accessors and the services' methods may be
// called from any thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "actors/engine.h"
#include "actors/service/generation_service.h"
#include "actors/service/node_control_service.h"
#include "actors/service/node_server.h"

namespace ktx::service {

struct NodeApiOptions {
  std::string node_name;
  // Address, allow_remote, security (also used for every service's token
  // check), thread limits.
  NodeServerOptions server;
  // A head's engine: Generation is served over it and NodeControl reports its
  // shards, KV cache and load. nullptr: a node without Generation (role SHARD).
  actors::Engine* engine = nullptr;
  // Generation's options; its `security` is replaced by server.security.
  GenerationServiceOptions generation;
  std::string topology_path;  // ReloadPlan re-reads it
  // Other services to serve, each with its full name for the health service.
  std::vector<std::pair<grpc::Service*, std::string>> extra_services;
  // NodeControl hooks (node_control_service.h): node-specific status fields,
  // shard locations when they are not in the engine's ShardOptions, a
  // ReloadPlan planner, and what to do once a Drain call began draining
  // (ktx-node: start its shutdown, as on SIGTERM).
  std::function<void(ktx::v1::NodeStatusResponse*)> add_status;
  std::vector<ShardLocation> shard_locations;
  std::function<absl::StatusOr<topology::PlacementPlan>(const std::string&)> plan_from_topology;
  std::function<void()> on_drain;
};

class NodeApi {
 public:
  // Errors: the services' (bad options, unknown chat template) and the
  // server's (address not loopback without allow_remote, cannot bind, TLS).
  static absl::StatusOr<std::unique_ptr<NodeApi>> Start(NodeApiOptions options);

  ~NodeApi();
  NodeApi(const NodeApi&) = delete;
  NodeApi& operator=(const NodeApi&) = delete;

  // "host:port" with the bound port.
  std::string address() const { return server_->address(); }
  int port() const { return server_->port(); }
  NodeServer& server() { return *server_; }
  GenerationService* generation() { return generation_.get(); }  // nullptr without engine
  NodeControlService& control() { return *control_; }

  // The SIGTERM path: refuse new Generate calls (UNAVAILABLE "draining",
  // health NOT_SERVING), wait up to `grace` for the calls in flight, then
  // shut the server down (calls still running after `stop_deadline` are
  // cancelled, which frees their KV cache) and wait for it. Returns true
  // when every call had ended within `grace`. Idempotent.
  bool DrainAndStop(std::chrono::milliseconds grace, std::chrono::milliseconds stop_deadline);

 private:
  NodeApi() = default;
  std::unique_ptr<NodeServer> server_;
  std::unique_ptr<GenerationService> generation_;
  std::unique_ptr<NodeControlService> control_;
};

}  // namespace ktx::service
