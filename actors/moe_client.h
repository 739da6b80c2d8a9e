// File: actors/moe_client.h
//
// A blocking client of the router for a job running on a CpuArena thread
// (never a CAF scheduler thread): the attention job of a step sends each MoE
// layer's MoeWork to the router itself, computes the shared experts in place
// while the shards work, then waits for the MoeResult on its own thread.
// Compared with posting every stage back to the attention actor and being
// resubmitted, this removes three thread hand-offs per MoE layer (job ->
// actor, actor -> shared-experts job, actor -> combine job).
//
//   MoeClient client(system, router, {.deadline = 65s, .spin_us = 30});
//   KTX_ASSIGN_OR_RETURN(uint64_t ticket, client.Send(std::move(work)));
//   ... shared experts ...
//   KTX_ASSIGN_OR_RETURN(MoeResult result, client.Wait(ticket));
//
// Several requests may be out at once (expert deferral sends a layer's
// deferred experts right after its immediate ones and waits for them one
// layer later): each MoeWork carries a tag that the router copies into its
// MoeResult. The client's hidden scoped actor monitors the router: once it is
// down, every waiting and later request fails with UNAVAILABLE ("the router
// is down (reason)"). A request not answered within Options::deadline fails
// with DEADLINE_EXCEEDED (the router answers within its shard deadlines; this
// only catches a router that hangs). An error the router answers instead of a
// MoeResult (an invalid request) carries no tag and fails every request out.
//
// In-process fast path: with Options::lane, a request whose parts all go to
// shards of this process skips the router actor (local_lane.h: two thread
// hand-offs instead of four); everything else, and the lane's failed parts
// that have replicas, go through the router as before.
//
// Waiting: with Options::spin_us > 0, Wait first polls the mailbox for up to
// spin_us before it blocks, but only while answers have recently come back
// within that time (the last wait was shorter than 2 x spin_us): a reply that
// lands while the waiter polls costs no futex wake-up, and a client whose
// answers take long (real expert compute of milliseconds) never burns its
// core. Spinning happens only inside Wait, i.e. while a step is in flight.
//
// Ownership: the scoped actor (hidden: the actor system does not wait for
// it); answers to requests nobody waits for any more are dropped with it.
// Not thread-safe: one job thread uses it; it must be destroyed before the
// actor system.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "actors/local_lane.h"
#include "actors/messages.h"
#include "actors/router_actor.h"
#include "caf/scoped_actor.hpp"

namespace ktx::actors {

class MoeClient {
 public:
  struct Options {
    std::chrono::milliseconds deadline{120000};  // > 0
    int spin_us = 0;                             // 0: block at once
    // The in-process fast path (local_lane.h), or null: Send gives a request
    // to the lane when it takes it (every part on a shard of this process,
    // every shard alive), else to the router. Wait then merges what the lane
    // computed with the router's answer for the parts that moved to replicas.
    std::shared_ptr<LocalLane> lane;
  };

  // `router` may be invalid (a model without MoE layers): Send then fails
  // with FailedPrecondition.
  MoeClient(caf::actor_system& system, const router_actor& router, Options options);
  ~MoeClient();
  MoeClient(const MoeClient&) = delete;
  MoeClient& operator=(const MoeClient&) = delete;

  // Sends `work` (its tag is overwritten) and returns the ticket to Wait on.
  // FailedPrecondition without a router, UNAVAILABLE once it is down.
  absl::StatusOr<uint64_t> Send(MoeWork work);

  // Blocks until the answer of `ticket` (from Send); each ticket once. The
  // router's own errors come back with its message unchanged (callers add
  // the layer).
  absl::StatusOr<MoeResult> Wait(uint64_t ticket);

  // The router's exit reason once the client saw it go down, else empty.
  const std::string& router_down() const { return router_down_; }
  // How long the last Wait blocked or spun (not counting answers that had
  // already arrived), microseconds.
  int64_t last_wait_us() const { return last_wait_us_; }

 private:
  absl::Status RouterDownStatus() const;
  absl::StatusOr<uint64_t> SendToRouter(MoeWork work);
  void Receive(std::chrono::steady_clock::duration timeout, bool* timed_out);

  router_actor router_;
  Options options_;
  std::optional<caf::scoped_actor> self_;
  uint64_t next_tag_ = 1;
  std::set<uint64_t> pending_;                                       // sent, not yet answered
  std::map<uint64_t, absl::StatusOr<MoeResult>> arrived_;            // answered, not yet waited for
  std::map<uint64_t, std::shared_ptr<LocalLane::Call>> lane_calls_;  // in the lane
  std::string router_down_;
  int64_t last_wait_us_ = 0;
};

}  // namespace ktx::actors
