// File: actors/expert_shard_actor.h
//
// The expert shard actor: owns the routed experts the placement plan gave it
// (a ShardExperts, shared with its in-flight jobs) and computes one MoE
// layer's routed experts for a sub-batch of tokens, returning per row the
// weighted partial sum over the experts the router asked it for.
//
//   router --(expert_atom, ExpertWork)--> shard --job--> CpuArena
//   shard <--(expert_done_atom, ExpertJobDone)-- job    (posted back by the job)
//   router <--ExpertPartial or error-- shard             (response promise)
//
// Kernel work never runs on the CAF scheduler thread: the handler gathers
// nothing and computes nothing; it queues a job on the shard's CpuArena and
// answers through a response promise when the job posts its result back.
// Errors (a mask naming an expert the shard does not hold, a backend failure)
// come back as caf::error made by ToCafError (status_bridge.h), naming the
// shard.
//
// Ownership: the actor state holds the ShardExperts (shared_ptr, also held by
// each queued job) and the pending promises; the CpuArena is not owned and
// must outlive every job (the Engine destroys arenas after the actors are
// gone). Killing the actor mid-job is safe: the job finishes on its arena and
// its result is dropped.
#pragma once

#include <memory>
#include <string>

#include "actors/messages.h"
#include "actors/shard_experts.h"
#include "caf/fwd.hpp"
#include "caf/replies_to.hpp"
#include "caf/typed_actor.hpp"

namespace ktx::actors {

class CpuArena;

using expert_shard_actor =
    caf::typed_actor<caf::replies_to<expert_atom, ExpertWork>::with<ExpertPartial>,
                     caf::reacts_to<expert_done_atom, ExpertJobDone>>;

struct ExpertShardConfig {
  int index = 0;     // position of the shard in the plan
  std::string name;  // for errors and logs
  std::shared_ptr<ShardExperts> experts;
  CpuArena* arena = nullptr;  // not owned; outlives the actor's jobs
};

expert_shard_actor SpawnExpertShard(caf::actor_system& system, ExpertShardConfig config);

// Runs one ExpertWork on the calling thread (what the shard's job does):
// gathers the rows of work.h (none when the rows are the whole batch),
// computes the masked experts and wraps the result. Exposed for benchmarks
// and tests.
absl::Status RunExpertWork(const ShardExperts& experts, const ExpertWork& work,
                           ExpertPartial* result);

}  // namespace ktx::actors
