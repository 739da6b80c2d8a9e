// File: actors/remote/remote_shards.h
//
// The remote side of an Engine: for every shard of EngineOptions::shards with
// an address, the RemoteNode of its node (one per address, shared by that
// node's shards: one stream per node) and, on request, its proxy actor.
// Engine::Create calls Connect, which waits for every node: each must answer
// Info with the head's model fingerprint and, for each of its shards, the
// experts of the head's plan. Then the streams are opened.
//
//   KTX_ASSIGN_OR_RETURN(auto remote, RemoteShards::Connect(*model, shards, held, options));
//   expert_shard_actor proxy = remote->Spawn(system, s);  // for s with IsRemote(s)
//
// Ownership: owns the RemoteNodes; proxies share them. Destroy it after the
// proxies have stopped and before the actor system (pending answers are
// failed into the actors' mailboxes). Thread-safety: const methods may be
// called from any thread.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "actors/engine.h"
#include "actors/expert_shard_actor.h"
#include "actors/remote/remote_node.h"
#include "actors/remote/wire_dtype.h"
#include "actors/rpc/security.h"
#include "caf/fwd.hpp"
#include "runtime/models/deepseek2.h"

namespace ktx::actors {

struct RemoteShardsOptions {
  rpc::RpcSecurity security;
  WireDtype wire_dtype = WireDtype::kF32;
  std::chrono::milliseconds wait{60000};  // for every node to answer Info correctly
  // The router's per-part deadline: a stream whose part is unanswered for
  // 3/4 of it is reset (UNAVAILABLE) before the router would report
  // DEADLINE_EXCEEDED.
  std::chrono::milliseconds shard_deadline{30000};
};

// `factory` for the shards of this process; for a shard with an address, a
// placeholder backend that loads nothing and refuses Compute
// (FailedPrecondition: the shard's work goes to its proxy, never here).
ExpertBackendFactory WithRemotePlaceholders(ExpertBackendFactory factory,
                                            const std::vector<ShardOptions>& shards);

class RemoteShards {
 public:
  // `shards` and `held` in plan order. Waits up to options.wait. Errors:
  // InvalidArgument for one address given with two node names;
  // FAILED_PRECONDITION (another model, other experts, a missing shard) and
  // UNAUTHENTICATED / PERMISSION_DENIED at once, naming the shard, node and
  // address; DEADLINE_EXCEEDED after options.wait naming every shard whose
  // node did not answer, with its node, address and last error.
  static absl::StatusOr<std::unique_ptr<RemoteShards>> Connect(
      const models::Deepseek2Model& model, const std::vector<ShardOptions>& shards,
      const std::vector<HeldExperts>& held, const RemoteShardsOptions& options);

  ~RemoteShards();

  bool IsRemote(int shard) const;
  // The proxy actor of remote shard `shard` (plan index).
  expert_shard_actor Spawn(caf::actor_system& system, int shard) const;
  // One entry per remote shard, in plan order.
  std::vector<RemoteShardStatus> Status() const;

 private:
  RemoteShards() = default;
  std::vector<ShardOptions> shards_;
  std::map<std::string, std::shared_ptr<RemoteNode>> nodes_;  // by address
};

}  // namespace ktx::actors
