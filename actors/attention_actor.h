// File: actors/attention_actor.h
//
// The attention actor: owns the model's non-expert stages (Embed,
// AttentionBlock, FfnNorm, DenseFfn, Route, SharedExperts, Combine, Head),
// the KV caches of all sequences (a LatentKvCache pool under a byte budget)
// and runs one step for a batch of sequences at a time:
//
//   Embed every slice
//   for il in layers:
//     AttentionBlock per sequence on its token slice (writes its KV rows)
//     FfnNorm on the whole batch
//     dense layer: DenseFfn, Combine
//     MoE layer:   Route; (moe_atom, MoeWork) -> router  AND  SharedExperts
//                  on its own arena while the shards work; then
//                  Combine(x, Σ partials in the router's fixed order, shared)
//   Head on the rows each slice asked for; commit the KV rows of every slice
//   that did not fail.
//
// All of that runs as ONE job per step on the actor's CpuArena (never on a
// CAF scheduler thread): at a MoE layer the job sends the MoeWork to the
// router itself through a MoeClient (moe_client.h), computes the shared
// experts in place while the shards work, and waits for the MoeResult on its
// own thread; deferred experts (routing policies) go out right after the
// layer's own and are waited for where they join. The job posts (stage_atom,
// step, kStepDone) when the step is done. Steps are served one at a time in
// arrival order (later ones wait in a queue). A slice whose rows failed in
// the router (a shard down, no replica) fails alone: its KV rows are not
// committed, the other slices of the step are unaffected (every stage is per
// token or per sequence). This is the CPU implementation; the CUDA one
// (gpu_attention_actor.h) sits behind the same interface.
//
// Ownership: the KV pool and the current step's buffers live in shared state
// that the actor and its queued jobs hold (shared_ptr), so the actor may be
// killed mid-step without freeing memory a job still uses. The model is
// shared (read-only). The arena is not owned and must outlive the jobs.
// A sequence is freed with kv_free_atom; freeing one that the running step
// uses is deferred to the end of that step.
//
// Profile: with AttentionConfig::profile set, each step records the time of
// every stage per layer, the MoE wait and each shard's compute time
// (actors/profile.h); the step's job writes them all, the actor adds them
// to the log after the job is done.
//
// Deadlines: the router answers every MoE request within its shard deadlines
// (see router_actor.h); the job's MoeClient monitors the router and fails the
// step with UNAVAILABLE if it goes down, or with DEADLINE_EXCEEDED if no
// answer comes within AttentionConfig::moe_deadline. The step itself has the
// scheduler's deadline.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>

#include "actors/messages.h"
#include "actors/profile.h"
#include "actors/router_actor.h"
#include "caf/fwd.hpp"
#include "caf/replies_to.hpp"
#include "caf/typed_actor.hpp"
#include "runtime/models/deepseek2.h"

namespace ktx::actors {

class CpuArena;

using attention_actor = caf::typed_actor<caf::replies_to<step_atom, StepRequest>::with<StepResult>,
                                         caf::reacts_to<kv_free_atom, uint64_t>,
                                         caf::replies_to<kv_stats_atom>::with<KvStats>,
                                         caf::reacts_to<stage_atom, uint64_t, int32_t>>;

struct AttentionConfig {
  std::shared_ptr<const models::Deepseek2Model> model;
  CpuArena* arena = nullptr;  // not owned; outlives the actor's jobs
  router_actor router;        // may be invalid for a model without MoE layers
  uint64_t kv_budget_bytes = uint64_t{1} << 30;
  // Wire dtype bf16 (EngineOptions::wire_dtype): the routed experts' input
  // h is rounded to bf16 before it goes to the router, for every shard
  // (the shared experts still get the F32 h).
  bool bf16_expert_input = false;
  // When set, every finished step's stage timings are added to it
  // (actors/profile.h); n_shards sizes LayerTiming::shard_us.
  std::shared_ptr<ProfileLog> profile;
  int n_shards = 0;
  // The step's job waits for the router on its own thread (MoeClient): no
  // answer within moe_deadline fails the step with DEADLINE_EXCEEDED (the
  // router answers within its shard deadlines; this catches a router that
  // hangs). moe_spin_us: how long the job polls for an answer before it
  // sleeps (MoeClient::Options::spin_us; adaptive, only while waiting).
  std::chrono::milliseconds moe_deadline{120000};
  int moe_spin_us = 0;
  // The in-process fast path past the router (MoeClient::Options::lane,
  // local_lane.h); null: every MoE layer goes through the router actor.
  std::shared_ptr<LocalLane> lane;
};

// Fails (InvalidArgument) for a KV budget that cannot hold one token.
absl::StatusOr<attention_actor> SpawnAttention(caf::actor_system& system, AttentionConfig config);

}  // namespace ktx::actors
