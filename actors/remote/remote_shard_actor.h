// File: actors/remote/remote_shard_actor.h
//
// The remote shard proxy: an actor with exactly the typed interface of an
// in-process expert shard (expert_shard_actor), so the router treats local
// and remote shards alike. It computes nothing: each (expert_atom,
// ExpertWork) is handed to its node's RemoteNode (one long-lived stream per
// node, see remote_node.h) and answered through a response promise when the
// node's reader thread posts the result back as (expert_done_atom,
// ExpertJobDone). Encoding, writing, reading and decoding run on the
// RemoteNode's own threads, never on CAF scheduler threads.
//
// Failures arrive as errors of the request (ToCafError): UNAVAILABLE naming
// the shard, node and address while the node is disconnected (at once) or
// when its stream breaks or stalls (every part in flight); the peer's own
// errors with their codes. The actor itself stays up, so the router keeps
// trying it: once the RemoteNode has reconnected (and checked Info again),
// the next request is served.
//
// Ownership: shares the RemoteNode (which the Engine destroys after the
// actors have stopped). Killing the actor mid-request is safe: the late
// answer is dropped.
#pragma once

#include <memory>
#include <string>

#include "actors/expert_shard_actor.h"
#include "actors/remote/remote_node.h"
#include "caf/fwd.hpp"

namespace ktx::actors {

struct RemoteShardConfig {
  int index = 0;     // position of the shard in the plan
  std::string name;  // the shard's name (the node knows it by this name)
  std::shared_ptr<RemoteNode> node;
};

expert_shard_actor SpawnRemoteShard(caf::actor_system& system, RemoteShardConfig config);

}  // namespace ktx::actors
