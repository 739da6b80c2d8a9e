// File: actors/router_actor.h
//
// The router actor: for one MoE layer of a batch it takes the FFN-normed
// hidden states h and the Routing, assigns every selected expert to one live
// shard that holds it (replicas: the least-loaded holder, ties to the lower
// shard index), groups the tokens by shard (a token goes to every shard that
// computes one of its experts), fans the ExpertWork out and gathers the
// partial sums. It does no arithmetic: the MoeResult lists the partials in a
// FIXED order (ascending shard index, then dispatch order) and the attention
// actor sums them in that order, so results do not depend on timing. (Which
// replica computes an expert does depend on load; see docs/architecture.md:
// without replicas results are bit-reproducible, with replicas they may differ
// by float rounding.)
//
// Routing-policy padding (models::kNoExpert entries, routing_policy.h):
// those entries select no expert, so no shard receives work for them; a row
// whose entries are all kNoExpert is in no part, and the attention actor
// adds a zero partial for it without any shard call. MoeWork of any width
// K >= 1 is accepted (reduced top-k rows are narrower than the model's K).
//
// Failures never hang a request:
//  - every ExpertWork has a deadline (shard_deadline), enforced by a sweep
//    that runs every shard_deadline / 8 (1..250 ms) while work is out (not by
//    CAF request timeouts: each of those wakes CAF's clock thread, which
//    doubled the per-layer latency in actors_benchmark); a part that timed
//    out keeps counting in its shard's load (it is still queued there), which
//    steers later work to replicas;
//  - the router monitors every shard; when one goes down, its in-flight parts
//    fail at once;
//  - a failed part (down, deadline, shard error) is re-sent to replicas that
//    hold the same experts when every one of its experts has a live replica;
//    otherwise its rows are answered as failed, with an error naming the shard
//    (UNAVAILABLE when it is down, DEADLINE_EXCEEDED when it did not answer,
//    else the shard's own code);
//  - experts whose every holder is down fail their rows immediately with
//    UNAVAILABLE naming the shard(s); rows that need no dead expert are
//    computed as usual, so the engine keeps serving what the plan can serve.
//
// Ownership: holds handles to the shards and a copy of the plan's holder
// table; the activations of a request are shared (never copied) with the
// shards. Runs on the CAF scheduler; no kernel work.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "actors/expert_shard_actor.h"
#include "actors/local_lane.h"
#include "actors/messages.h"
#include "caf/fwd.hpp"
#include "caf/replies_to.hpp"
#include "caf/typed_actor.hpp"

namespace ktx::actors {

using router_actor = caf::typed_actor<caf::replies_to<moe_atom, MoeWork>::with<MoeResult>,
                                      caf::replies_to<router_stats_atom>::with<RouterStats>,
                                      caf::reacts_to<tick_atom>>;  // internal: deadline sweep

struct RouterConfig {
  std::vector<expert_shard_actor> shards;  // [n_shards]
  std::vector<std::string> names;          // [n_shards]
  HolderTable holders;                     // moe_split.h
  int n_expert = 0;
  std::chrono::milliseconds shard_deadline{30000};
  // The in-process fast path (local_lane.h), or null: the router tells it
  // which shards went down, counts its outstanding entries in every holder
  // choice and adds its counters to RouterStats.
  std::shared_ptr<LocalLane> lane;
};

router_actor SpawnRouter(caf::actor_system& system, RouterConfig config);

}  // namespace ktx::actors
