#include "actors/expert_shard_actor.h"

#include <chrono>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "actors/cpu_arena.h"
#include "actors/status_bridge.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/send.hpp"
#include "caf/stateful_actor.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "caf/typed_response_promise.hpp"

namespace ktx::actors {
namespace {

struct ExpertShardState {
  ExpertShardConfig config;
  uint64_t next_job = 1;
  std::map<uint64_t, caf::typed_response_promise<ExpertPartial>> pending;
  static inline const char* name = "ktx.expert_shard";
};

expert_shard_actor::behavior_type ExpertShardBehavior(
    expert_shard_actor::stateful_pointer<ExpertShardState> self, ExpertShardConfig config) {
  self->state.config = std::move(config);
  return {
      [self](expert_atom, const ExpertWork& work) -> caf::typed_response_promise<ExpertPartial> {
        ExpertShardState& st = self->state;
        auto promise = self->make_response_promise<ExpertPartial>();
        const uint64_t job = st.next_job++;
        st.pending.emplace(job, promise);
        expert_shard_actor me = caf::actor_cast<expert_shard_actor>(self);
        st.config.arena->Submit([me, job, experts = st.config.experts, work] {
          ExpertJobDone done;
          done.job = job;
          const absl::Status status = RunExpertWork(*experts, work, &done.result);
          if (!status.ok()) {
            done.code = static_cast<int32_t>(status.code());
            done.message = std::string(status.message());
          }
          caf::anon_send(me, expert_done_atom::value, std::move(done));
        });
        return promise;
      },
      [self](expert_done_atom, ExpertJobDone& done) {
        ExpertShardState& st = self->state;
        auto it = st.pending.find(done.job);
        if (it == st.pending.end()) return;
        if (done.code != 0) {
          it->second.deliver(ToCafError(ToStatus(done.code, done.message)));
        } else {
          it->second.deliver(std::move(done.result));
        }
        st.pending.erase(it);
      },
  };
}

}  // namespace

absl::Status RunExpertWork(const ShardExperts& experts, const ExpertWork& work,
                           ExpertPartial* result) {
  const auto start = std::chrono::steady_clock::now();
  if (work.h.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert shard '", experts.name(), "': work without activations"));
  }
  const models::Activations& h = *work.h;
  const int64_t n_rows = static_cast<int64_t>(work.rows.size());
  const int64_t k = work.n_expert_used;
  if (k <= 0 || static_cast<int64_t>(work.expert_ids.size()) != n_rows * k ||
      work.weights.size() != work.expert_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expert shard '", experts.name(), "': routing of ", work.expert_ids.size(), " ids / ",
        work.weights.size(), " weights for ", n_rows, " rows x ", k, " experts"));
  }
  bool whole_batch = n_rows == h.n_tokens();
  for (int64_t j = 0; j < n_rows; ++j) {
    const int32_t r = work.rows[j];
    if (r < 0 || r >= h.n_tokens()) {
      return absl::InvalidArgumentError(absl::StrCat("expert shard '", experts.name(), "': row ", r,
                                                     " outside the batch of ", h.n_tokens()));
    }
    whole_batch = whole_batch && r == j;
  }
  models::Routing routing;
  routing.n_tokens = n_rows;
  routing.n_expert_used = static_cast<int32_t>(k);
  routing.expert_ids = work.expert_ids;
  routing.weights = work.weights;
  // The output goes into the shard's recycled buffer (no fresh pages per
  // layer while the caller lets go of the previous partial in time).
  std::shared_ptr<models::Activations> out = experts.OutputBuffer();
  if (whole_batch) {
    KTX_RETURN_IF_ERROR(experts.Compute(work.il, h, routing, work.expert_mask, out.get()));
  } else {
    // The shard's rows of the batch, read in place by the fast backend (a
    // gathered copy cost ~40 ms per 2048-token layer of DeepSeek-V3: fresh
    // pages and one thread's copy, docs/performance.md).
    KTX_RETURN_IF_ERROR(
        experts.ComputeRows(work.il, h, work.rows, routing, work.expert_mask, out.get()));
  }
  result->shard = experts.shard();
  result->partial = Tensor(std::shared_ptr<const models::Activations>(std::move(out)));
  result->compute_us = std::chrono::duration_cast<std::chrono::microseconds>(
                           std::chrono::steady_clock::now() - start)
                           .count();
  return absl::OkStatus();
}

expert_shard_actor SpawnExpertShard(caf::actor_system& system, ExpertShardConfig config) {
  return system.spawn(ExpertShardBehavior, std::move(config));
}

}  // namespace ktx::actors
