// File: actors/remote/remote_shard_actor.cc
#include "actors/remote/remote_shard_actor.h"

#include <map>
#include <utility>

#include "actors/status_bridge.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/send.hpp"
#include "caf/stateful_actor.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "caf/typed_response_promise.hpp"

namespace ktx::actors {
namespace {

struct RemoteShardState {
  RemoteShardConfig config;
  uint64_t next_job = 1;
  std::map<uint64_t, caf::typed_response_promise<ExpertPartial>> pending;
  static inline const char* name = "ktx.remote_shard";
};

expert_shard_actor::behavior_type RemoteShardBehavior(
    expert_shard_actor::stateful_pointer<RemoteShardState> self, RemoteShardConfig config) {
  self->state.config = std::move(config);
  return {
      [self](expert_atom, const ExpertWork& work) -> caf::typed_response_promise<ExpertPartial> {
        RemoteShardState& st = self->state;
        auto promise = self->make_response_promise<ExpertPartial>();
        const uint64_t job = st.next_job++;
        expert_shard_actor me = caf::actor_cast<expert_shard_actor>(self);
        const absl::Status submitted = st.config.node->Submit(
            st.config.name, st.config.index, work, [me, job](absl::StatusOr<ExpertPartial> result) {
              ExpertJobDone done;
              done.job = job;
              if (result.ok()) {
                done.result = *std::move(result);
              } else {
                done.code = static_cast<int32_t>(result.status().code());
                done.message = std::string(result.status().message());
              }
              caf::anon_send(me, expert_done_atom::value, std::move(done));
            });
        if (!submitted.ok()) {
          promise.deliver(ToCafError(submitted));
        } else {
          st.pending.emplace(job, promise);
        }
        return promise;
      },
      [self](expert_done_atom, ExpertJobDone& done) {
        RemoteShardState& st = self->state;
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

expert_shard_actor SpawnRemoteShard(caf::actor_system& system, RemoteShardConfig config) {
  return system.spawn(RemoteShardBehavior, std::move(config));
}

}  // namespace ktx::actors
