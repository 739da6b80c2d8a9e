#include "actors/router_actor.h"

#include <algorithm>
#include <map>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "actors/moe_split.h"
#include "actors/status_bridge.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/duration.hpp"
#include "caf/error.hpp"
#include "caf/sec.hpp"
#include "caf/stateful_actor.hpp"
#include "caf/system_messages.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "caf/typed_response_promise.hpp"
#include "runtime/base/logging.h"
#include "runtime/models/moe.h"

namespace ktx::actors {
namespace {

// One shard's share of a MoE request, and what came of it.
struct Part : MoePart {
  std::vector<int> excluded;  // shards that already failed these experts
  bool resolved = false;
  bool ok = false;
  Tensor result;                                   // F32 [rows.size(), n_embd] when ok
  int64_t compute_us = 0;                          // the shard's, when ok
  std::chrono::steady_clock::time_point deadline;  // set when dispatched
};

struct Call {
  caf::typed_response_promise<MoeResult> promise;
  MoeWork work;  // h shared, routing copied (small)
  std::vector<Part> parts;
  int outstanding = 0;
  std::vector<uint8_t> row_failed;  // [n_tokens]
  int32_t code = 0;
  std::string message;
};

struct RouterState {
  RouterConfig config;
  std::vector<uint8_t> alive;
  std::vector<std::string> down_reason;
  std::vector<int64_t> load;  // outstanding entries per shard
  uint64_t next_call = 1;
  std::map<uint64_t, Call> calls;
  RouterStats stats;
  std::vector<int64_t> view_load;  // scratch of View()
  bool sweep_scheduled = false;    // a (tick_atom) is on its way
  static inline const char* name = "ktx.router";
};

using RouterPointer = router_actor::stateful_pointer<RouterState>;

std::string ShardLabel(const RouterState& st, int s) {
  return actors::ShardLabel(st.config.names[s], s);
}

// The splitter's view of the shards: the load is the router's outstanding
// entries plus the local lane's (work the lane sends past the router).
ShardView View(RouterState& st) {
  st.view_load = st.load;
  if (st.config.lane) {
    for (size_t s = 0; s < st.view_load.size(); ++s)
      st.view_load[s] += st.config.lane->load(static_cast<int>(s));
  }
  return ShardView{st.alive, st.view_load, st.config.names, st.down_reason};
}

void Finish(RouterPointer self, uint64_t call_id) {
  RouterState& st = self->state;
  auto it = st.calls.find(call_id);
  if (it == st.calls.end()) return;
  Call& call = it->second;
  MoeResult result;
  std::vector<const Part*> ok;
  for (const Part& p : call.parts) {
    if (p.ok) ok.push_back(&p);
  }
  std::stable_sort(ok.begin(), ok.end(),
                   [](const Part* a, const Part* b) { return a->shard < b->shard; });
  for (const Part* p : ok) {
    // A row that failed elsewhere is dropped from the parts too: nobody reads it.
    PlacedPartial placed;
    placed.shard = p->shard;
    placed.rows = p->rows;
    placed.partial = p->result;
    placed.compute_us = p->compute_us;
    result.parts.push_back(std::move(placed));
  }
  for (size_t t = 0; t < call.row_failed.size(); ++t) {
    if (call.row_failed[t]) result.failed_rows.push_back(static_cast<int32_t>(t));
  }
  result.code = call.code;
  result.message = call.message;
  result.tag = call.work.tag;
  st.stats.requests++;
  st.stats.failed_rows += static_cast<int64_t>(result.failed_rows.size());
  call.promise.deliver(std::move(result));
  st.calls.erase(it);
}

void Dispatch(RouterPointer self, uint64_t call_id, size_t part_index);

// A part that cannot be answered by its shard: re-sent to replicas when every
// one of its experts has another live holder, else its rows fail.
void OnPartFailure(RouterPointer self, uint64_t call_id, size_t part_index,
                   const absl::Status& status) {
  RouterState& st = self->state;
  auto it = st.calls.find(call_id);
  if (it == st.calls.end()) return;
  Call& call = it->second;
  if (part_index >= call.parts.size() || call.parts[part_index].resolved) return;
  {
    Part& p = call.parts[part_index];
    p.resolved = true;
    // A part that timed out is still queued at its shard: its entries stay in
    // the shard's load (a penalty that steers later work to replicas).
    if (status.code() != absl::StatusCode::kDeadlineExceeded) st.load[p.shard] -= p.entries;
    call.outstanding--;
  }
  const Part failed = call.parts[part_index];  // copy: parts may grow below
  const int il = call.work.il;
  std::vector<int> excluded = failed.excluded;
  excluded.push_back(failed.shard);
  std::vector<MoePart> replicas;
  if (ReassignToReplicas(call.work, st.config.holders[il], failed, excluded, View(st), &replicas)) {
    KTX_LOG(WARNING, "router") << ShardLabel(st, failed.shard) << " failed layer " << il << " ("
                               << status.message() << "); re-sent " << failed.rows.size()
                               << " rows to " << replicas.size() << " replica shard(s)";
    for (MoePart& replica : replicas) {
      Part p;
      static_cast<MoePart&>(p) = std::move(replica);
      p.excluded = excluded;
      call.parts.push_back(std::move(p));
      st.stats.rerouted_parts++;
      Dispatch(self, call_id, call.parts.size() - 1);
    }
  } else {
    for (int32_t row : failed.rows) call.row_failed[row] = 1;
    if (call.code == 0) {
      call.code = static_cast<int32_t>(status.code());
      call.message = std::string(status.message());
    }
  }
  if (call.outstanding == 0) Finish(self, call_id);
}

void OnPartDone(RouterPointer self, uint64_t call_id, size_t part_index, ExpertPartial& result) {
  RouterState& st = self->state;
  auto it = st.calls.find(call_id);
  if (it == st.calls.end()) return;
  Call& call = it->second;
  if (part_index >= call.parts.size() || call.parts[part_index].resolved) return;
  Part& p = call.parts[part_index];
  if (result.partial.n_rows() != static_cast<int64_t>(p.rows.size()) ||
      result.partial.n_cols() != call.work.h.n_cols()) {
    OnPartFailure(self, call_id, part_index,
                  absl::InternalError(absl::StrCat(
                      ShardLabel(st, p.shard), " answered layer ", call.work.il, " with [",
                      result.partial.n_rows(), ", ", result.partial.n_cols(), "], expected [",
                      p.rows.size(), ", ", call.work.h.n_cols(), "]")));
    return;
  }
  p.resolved = true;
  p.ok = true;
  p.result = std::move(result.partial);
  p.compute_us = result.compute_us;
  st.stats.compute_us[p.shard] += result.compute_us;
  st.load[p.shard] -= p.entries;
  call.outstanding--;
  if (call.outstanding == 0) Finish(self, call_id);
}

absl::Status DescribePartError(const RouterState& st, int shard, int il, const caf::error& error) {
  const std::string label = ShardLabel(st, shard);
  if (error.category() == caf::atom("system")) {
    const auto sec = static_cast<caf::sec>(error.code());
    if (sec == caf::sec::request_timeout) {
      return absl::DeadlineExceededError(absl::StrCat(label, " did not answer layer ", il,
                                                      " within ", st.config.shard_deadline.count(),
                                                      " ms"));
    }
    if (sec == caf::sec::request_receiver_down) {
      return absl::UnavailableError(absl::StrCat(label, " is down"));
    }
  }
  const absl::Status inner = FromCafError(error);
  return absl::Status(inner.code(),
                      absl::StrCat(label, " failed layer ", il, ": ", inner.message()));
}

// Deadlines: while parts are outstanding, one (tick_atom) per sweep period
// checks them; a part past its deadline fails as if its shard had answered
// DEADLINE_EXCEEDED (a late answer is then ignored).
std::chrono::milliseconds SweepPeriod(const RouterState& st) {
  return std::clamp(st.config.shard_deadline / 8, std::chrono::milliseconds(1),
                    std::chrono::milliseconds(250));
}

void ScheduleSweep(RouterPointer self) {
  RouterState& st = self->state;
  if (st.sweep_scheduled) return;
  st.sweep_scheduled = true;
  self->delayed_send(self, SweepPeriod(st), tick_atom::value);
}

void Sweep(RouterPointer self) {
  RouterState& st = self->state;
  st.sweep_scheduled = false;
  const auto now = std::chrono::steady_clock::now();
  std::vector<std::tuple<uint64_t, size_t, int, int>> expired;  // call, part, shard, il
  bool outstanding = false;
  for (const auto& [id, call] : st.calls) {
    for (size_t i = 0; i < call.parts.size(); ++i) {
      const Part& p = call.parts[i];
      if (p.resolved) continue;
      if (p.deadline <= now) {
        expired.emplace_back(id, i, p.shard, call.work.il);
      } else {
        outstanding = true;
      }
    }
  }
  for (const auto& [id, index, shard, il] : expired) {
    OnPartFailure(self, id, index,
                  absl::DeadlineExceededError(
                      absl::StrCat(ShardLabel(st, shard), " did not answer layer ", il, " within ",
                                   st.config.shard_deadline.count(), " ms")));
  }
  // Re-sent parts scheduled a sweep themselves; others still need one.
  if (outstanding) ScheduleSweep(self);
}

void Dispatch(RouterPointer self, uint64_t call_id, size_t part_index) {
  RouterState& st = self->state;
  Call& call = st.calls.at(call_id);
  Part& p = call.parts[part_index];
  ExpertWork work = MakeExpertWork(call.work, p);
  st.load[p.shard] += p.entries;
  st.stats.parts_sent[p.shard]++;
  st.stats.entries_sent[p.shard] += p.entries;
  call.outstanding++;
  p.deadline = std::chrono::steady_clock::now() + st.config.shard_deadline;
  const int shard = p.shard;
  const int il = work.il;
  ScheduleSweep(self);
  // No CAF timeout: scheduling one per request costs a wake-up of CAF's clock
  // thread each time; the sweep enforces the deadline instead.
  self->request(st.config.shards[shard], caf::infinite, expert_atom::value, std::move(work))
      .then([self, call_id,
             part_index](ExpertPartial& result) { OnPartDone(self, call_id, part_index, result); },
            [self, call_id, part_index, shard, il](caf::error& error) {
              OnPartFailure(self, call_id, part_index,
                            DescribePartError(self->state, shard, il, error));
            });
}

caf::typed_response_promise<MoeResult> HandleMoe(RouterPointer self, const MoeWork& work) {
  RouterState& st = self->state;
  auto promise = self->make_response_promise<MoeResult>();
  const absl::Status invalid = ValidateMoeWork(work, st.config.holders, st.config.n_expert);
  if (!invalid.ok()) {
    promise.deliver(ToCafError(invalid));
    return promise;
  }

  const uint64_t call_id = st.next_call++;
  Call& call = st.calls[call_id];
  call.promise = promise;
  call.work = work;
  MoeSplit split = SplitMoeWork(work, st.config.holders[work.il], st.config.n_expert, View(st));
  call.row_failed = std::move(split.row_failed);
  call.code = split.code;
  call.message = std::move(split.message);
  for (MoePart& part : split.parts) {
    Part p;
    static_cast<MoePart&>(p) = std::move(part);
    call.parts.push_back(std::move(p));
  }
  const size_t n_parts = call.parts.size();
  for (size_t i = 0; i < n_parts; ++i) Dispatch(self, call_id, i);
  if (n_parts == 0) Finish(self, call_id);
  return promise;
}

router_actor::behavior_type RouterBehavior(RouterPointer self, RouterConfig config) {
  RouterState& st = self->state;
  st.config = std::move(config);
  const size_t n_shards = st.config.shards.size();
  st.alive.assign(n_shards, 1);
  st.down_reason.assign(n_shards, "");
  st.load.assign(n_shards, 0);
  st.stats.parts_sent.assign(n_shards, 0);
  st.stats.entries_sent.assign(n_shards, 0);
  st.stats.compute_us.assign(n_shards, 0);
  for (const expert_shard_actor& shard : st.config.shards) self->monitor(shard);
  self->set_down_handler([self](caf::down_msg& msg) {
    RouterState& st = self->state;
    int shard = -1;
    for (size_t s = 0; s < st.config.shards.size(); ++s) {
      if (msg.source == caf::actor_cast<caf::actor_addr>(st.config.shards[s])) {
        shard = static_cast<int>(s);
      }
    }
    if (shard < 0) return;
    st.alive[shard] = 0;
    st.down_reason[shard] = caf::to_string(msg.reason);
    if (st.config.lane) st.config.lane->MarkDown(shard, st.down_reason[shard]);
    KTX_LOG(WARNING, "router") << ShardLabel(st, shard) << " is down: " << st.down_reason[shard];
    const absl::Status status = absl::UnavailableError(
        absl::StrCat(ShardLabel(st, shard), " is down: ", st.down_reason[shard]));
    std::vector<std::pair<uint64_t, size_t>> affected;
    for (const auto& [id, call] : st.calls) {
      for (size_t i = 0; i < call.parts.size(); ++i) {
        if (call.parts[i].shard == shard && !call.parts[i].resolved) affected.emplace_back(id, i);
      }
    }
    for (const auto& [id, index] : affected) OnPartFailure(self, id, index, status);
  });
  return {
      [self](moe_atom, const MoeWork& work) { return HandleMoe(self, work); },
      [self](tick_atom) { Sweep(self); },
      [self](router_stats_atom) {
        RouterStats stats = self->state.stats;
        stats.alive = self->state.alive;
        if (self->state.config.lane) self->state.config.lane->AddStats(&stats);
        return stats;
      },
  };
}

}  // namespace

router_actor SpawnRouter(caf::actor_system& system, RouterConfig config) {
  return system.spawn(RouterBehavior, std::move(config));
}

}  // namespace ktx::actors
