// File: actors/profile.h
//
// Stage timings of the actor runtime, one record per scheduler step: what the
// attention actor's jobs spent in each stage of each layer, how long each
// MoE layer waited for the router and the shards, and each shard's compute
// time (ExpertPartial::compute_us, passed on by the router). Engine::Profile
// returns them (EngineOptions::profile_steps keeps the last N steps; 0 = off)
// and `ktx-ctl bench --topology` turns them into its per-layer breakdown.
//
// How a MoE layer's time splits (all steady-clock microseconds):
//
//   ... Route | moe_us ........................................ | combine ...
//             | router, messages, shards (in parallel)          |
//             | shared experts (the attention job, meanwhile)   |
//
//   moe_us      from the send of the MoeWork (right after Route) to the start
//               of the combine: everything between, on the critical path;
//   experts_us  the longest shard's compute time in that layer (the shards
//               run in parallel, so the critical one);
//   shared_us   the shared experts' compute (overlaps the routed experts);
//   dispatch_us moe_us - max(experts_us, shared_us), >= 0: router
//               bookkeeping, CAF messages and the hand-offs between CAF
//               threads and the arenas, i.e. the cost of the actor path.
//
// Plain data, no CAF type. ProfileLog is thread-safe (one mutex).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <utility>
#include <vector>

namespace ktx::actors {

// One layer of one step.
struct LayerTiming {
  int64_t attention_us = 0;       // AttentionBlock of every sequence (parallel over sequences)
  int64_t ffn_norm_us = 0;        // gather of the batch + FfnNorm
  int64_t gate_us = 0;            // Route: router logits and the group-limited top-k (MoE layers)
  int64_t dense_ffn_us = 0;       // the dense FFN (dense layers)
  int64_t moe_us = 0;             // see the file comment (MoE layers)
  int64_t experts_us = 0;         // the longest shard's compute
  int64_t shared_us = 0;          // shared experts
  int64_t dispatch_us = 0;        // moe_us - max(experts_us, shared_us)
  int64_t combine_us = 0;         // Σ partials + residual add + scatter to the sequences
  std::vector<int64_t> shard_us;  // [n_shards] compute time of each shard in this layer
  int32_t distinct_experts = 0;   // routed experts the batch used (MoE layers)
  // Expert deferral (routing_policy.h): (token, expert) entries this layer
  // deferred to the next one, and how long this layer waited for the previous
  // layer's deferred experts at its join point (next_attention: from the end
  // of its attention to the join; next_moe: from its own MoE result to the
  // deferred result: the attention job's wait in both). ~0: the overlap hid them.
  int64_t deferred_entries = 0;
  int64_t late_wait_us = 0;
};

struct StepProfile {
  uint64_t step = 0;                // the scheduler's step number (StepRecord::step)
  int64_t n_rows = 0;               // tokens computed (all sequences of the step)
  int64_t wall_us = 0;              // in the attention actor: from the request to the result
  int64_t embed_us = 0;             // Embed of every sequence
  int64_t head_us = 0;              // Head where logits are wanted, and the KV commits
  std::vector<LayerTiming> layers;  // [n_layer]
};

// The last `capacity` step records, oldest first.
class ProfileLog {
 public:
  explicit ProfileLog(size_t capacity) : capacity_(capacity) {}

  void Add(StepProfile step) {
    std::lock_guard<std::mutex> lock(mu_);
    if (capacity_ == 0) return;
    if (steps_.size() == capacity_) steps_.pop_front();
    steps_.push_back(std::move(step));
  }
  std::vector<StepProfile> Snapshot() const {
    std::lock_guard<std::mutex> lock(mu_);
    return std::vector<StepProfile>(steps_.begin(), steps_.end());
  }
  void Clear() {
    std::lock_guard<std::mutex> lock(mu_);
    steps_.clear();
  }
  size_t capacity() const { return capacity_; }

 private:
  const size_t capacity_;
  mutable std::mutex mu_;
  std::deque<StepProfile> steps_;  // guarded by mu_
};

}  // namespace ktx::actors
