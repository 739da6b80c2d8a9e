// File: actors/local_lane.h
//
// The in-process fast path of a MoE layer: a request whose every part goes
// to a shard in this process is split on the caller's thread (the attention
// job's, through MoeClient) exactly as the router splits it (moe_split.h),
// each part runs as a job on its shard's CpuArena, and the job hands its
// partial straight back to the waiting caller. Two thread hand-offs per
// layer (caller -> shard dispatcher -> caller) instead of the router path's
// four (caller -> CAF worker -> shard dispatcher -> CAF worker -> caller),
// and no message copies.
//
//   attention job --Submit--> shard arena job --Resolve (futex)--> attention job
//
// The router actor stays the owner of the plan's liveness and the only path
// for everything the lane does not take: a request with a part for a shard
// on another node, any request once a shard is down, an invalid request,
// and every part that failed in the lane but has replicas (MoeClient sends
// those to the router, which re-splits them over the live holders and
// enforces its own deadlines). What the lane promises is the router's:
//  - the same split (holder = the live holder with the least load, ties to
//    the lower index; the router's load view adds the lane's outstanding
//    entries, LocalLane::load), the same fixed combine order (ascending
//    shard), so results equal the router path's bit for bit;
//  - a shard killed while a lane part runs fails that part at once
//    (MarkDown, called by the router's down handler): UNAVAILABLE naming the
//    shard, or the part moves to a replica through the router;
//  - a part not answered within the shard deadline fails DEADLINE_EXCEEDED
//    naming the shard (or moves to a replica); its entries keep counting in
//    the shard's load until its job really ends, steering work to replicas;
//  - a job dropped by a shard arena that shuts down resolves its part with
//    UNAVAILABLE, so no caller waits for it.
// Counters (parts, entries, compute time, requests, failed rows, re-sent
// parts) are added to the router's RouterStats. Hop timings (split + submit,
// submit -> job start, the job, job end -> caller awake, on each call's
// critical part) are summed too; KTX_LANE_TIMES=1 logs their means when the
// lane goes away.
//
// Waiting: the caller sleeps on a futex over the call's count of parts
// still out (the last job to finish wakes it); with spin_us > 0 it first
// polls that count for up to spin_us.
//
// Ownership: the lane holds the shards' ShardExperts (shared) and pointers
// to their arenas (not owned). The arenas must outlive every caller that may
// still Start: the Engine closes the lane, then destroys the attention arena
// (whose job is the caller), then the shard arenas; a Call keeps the lane
// alive. Thread-safety: every
// member function is thread-safe; a Call is waited for by one thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "actors/messages.h"
#include "actors/moe_split.h"
#include "actors/shard_experts.h"

namespace ktx::actors {

class CpuArena;

class LocalLane : public std::enable_shared_from_this<LocalLane> {
 public:
  struct Shard {
    std::string name;
    std::shared_ptr<ShardExperts> experts;  // null: the shard lives in another process
    CpuArena* arena = nullptr;              // not owned; null with experts
  };

  static std::shared_ptr<LocalLane> Create(std::vector<Shard> shards, HolderTable holders,
                                           int n_expert, std::chrono::milliseconds shard_deadline);
  ~LocalLane();
  LocalLane(const LocalLane&) = delete;
  LocalLane& operator=(const LocalLane&) = delete;

  // ---- the router's side ----
  // Shard `shard` is down: parts out there fail now (UNAVAILABLE, naming it
  // and `reason`), and the lane takes no request while any shard is down.
  void MarkDown(int shard, const std::string& reason);
  // The engine is shutting down: Start takes nothing more (callers go to the
  // router, which is gone by then, and fail at once). Parts already out
  // finish or are dropped with their arenas as usual.
  void Close() { closed_.store(true); }
  // Entries the lane has out at `shard` (queued or running).
  int64_t load(int shard) const;
  // Adds the lane's counters to the router's ([n_shards] vectors sized).
  void AddStats(RouterStats* stats) const;

  // ---- a client's side ----
  class Call;
  // Splits `*work` and submits its parts; the call then owns the work (moved
  // from *work: no copy of the routing per layer). Null when the lane does not
  // take it, with *work untouched (the caller sends it to the router instead).
  std::shared_ptr<Call> Start(MoeWork* work);

  // What came of a call: `result` holds the parts computed in the lane (fixed
  // order) and the rows that failed without a replica (code / message: the
  // first failure, naming the shard); `reroute`, when set, is a request for
  // the router with the entries of the failed parts that have replicas (every
  // other entry kNoExpert), whose answer the caller merges (MergeMoeResults).
  struct Outcome {
    MoeResult result;
    std::optional<MoeWork> reroute;
  };
  // Blocks until every part of `call` is answered or the shard deadline
  // passed. spin_us > 0: polls for up to that long before it sleeps.
  Outcome Finish(Call& call, int spin_us);

  int n_shards() const { return static_cast<int>(shards_.size()); }
  // "expert shard 'NAME' (#S)" (moe_split.h).
  std::string Label(int shard) const { return ShardLabel(shards_[shard].name, shard); }
  std::chrono::milliseconds shard_deadline() const { return shard_deadline_; }

 private:
  struct Counters;
  LocalLane(std::vector<Shard> shards, HolderTable holders, int n_expert,
            std::chrono::milliseconds shard_deadline);
  void Register(Call* call);
  void Unregister(Call* call);

  const std::vector<Shard> shards_;
  const HolderTable holders_;
  const int n_expert_;
  const std::chrono::milliseconds shard_deadline_;
  std::vector<std::string> names_;       // [n_shards]
  std::vector<uint8_t> all_alive_;       // [n_shards] 1s: the split's view while none is down
  std::vector<std::string> no_reasons_;  // [n_shards] empty

  std::unique_ptr<std::atomic<int64_t>[]> load_;  // [n_shards] outstanding entries
  std::atomic<int> n_down_{0};
  std::atomic<bool> closed_{false};
  std::unique_ptr<Counters> counters_;

  mutable std::mutex mu_;
  std::vector<uint8_t> alive_;            // guarded by mu_
  std::vector<std::string> down_reason_;  // guarded by mu_
  std::unordered_set<Call*> calls_;       // guarded by mu_: calls with parts out
};

// The sum of a lane outcome and the router's answer to its reroute request:
// parts in the fixed order (ascending shard, stable), failed rows merged
// (ascending, unique), the first failure's code and message.
MoeResult MergeMoeResults(MoeResult lane, MoeResult router);

}  // namespace ktx::actors
