#include "actors/attention_actor.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "actors/cpu_arena.h"
#include "actors/moe_client.h"
#include "actors/moe_combine.h"
#include "actors/remote/wire_dtype.h"
#include "actors/status_bridge.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/send.hpp"
#include "caf/stateful_actor.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "caf/typed_response_promise.hpp"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "tbb/parallel_for.h"

namespace ktx::actors {
namespace {

enum Stage : int32_t {
  kStepDone = 3,  // the step's job is done (Head and commits, or the step failed)
};

constexpr int kJoinMoe = static_cast<int>(models::DeferJoin::kNextMoe);
constexpr int kJoinAttention = static_cast<int>(models::DeferJoin::kNextAttention);

// The deferred experts of one MoE layer (expert deferral, routing_policy.h):
// made when the job routes the layer, sent to the router right after the
// layer's immediate experts, joined one layer later (per DeferJoin) so that
// the shards compute them while the next layer's attention runs. Only the
// step's job touches it.
struct LateWork {
  int il = 0;                      // the deferring layer
  int64_t n_rows = 0;              // rows of layer il's batch
  std::vector<int64_t> row_begin;  // [slices] first batch row at layer il (-1: inactive)
  models::Routing routing[2];      // [join] rows of layer il's batch; all-kNoExpert rows: none
  int64_t entries[2] = {0, 0};     // [join] deferred (token, expert) entries
  uint64_t ticket[2] = {0, 0};     // [join] MoeClient ticket once sent, 0 when not out
};

// The KV pool; shared with jobs so that a killed actor never frees rows a job
// still writes. `ids` is touched by the actor only.
struct Core {
  std::shared_ptr<const models::Deepseek2Model> model;
  kv_cache::LatentKvCache kv;
  std::map<uint64_t, kv_cache::SequenceId> ids;  // scheduler seq -> cache id
  bool bf16_expert_input = false;                // AttentionConfig::bf16_expert_input
  caf::actor_system* system = nullptr;           // outlives the jobs (the Engine's)
  router_actor router;                           // may be invalid
  MoeClient::Options moe;                        // AttentionConfig::moe_deadline / moe_spin_us

  Core(std::shared_ptr<const models::Deepseek2Model> m, kv_cache::LatentKvCache cache)
      : model(std::move(m)), kv(std::move(cache)) {}
};

// One step in flight. The actor fills it before the job starts and reads it
// after the job posted kStepDone; in between only the job touches it.
struct Step {
  uint64_t step = 0;
  std::vector<StepSlice> slices;
  std::vector<int> active;                      // slices still computing, ascending
  std::vector<kv_cache::SequenceKv*> kvs;       // [slices]
  std::vector<std::vector<int32_t>> positions;  // [slices]
  std::vector<models::Activations> xs;          // [slices] F32 [n_i, n_embd] residual stream
  std::vector<int64_t> row_begin;               // [slices] first batch row (active slices)
  int64_t n_rows = 0;                           // rows of the active slices
  std::vector<absl::Status> status;             // [slices]
  std::vector<Tensor> logits;                   // [slices]
  int il = 0;
  absl::Status fatal;  // fails every slice

  // At a MoE layer:
  models::Routing routing;  // [n_rows, K]

  // Routing policies: some slice brings its own, or the model has one (the
  // batch is then routed full and the policies applied per slice); one of
  // them defers experts.
  bool any_policy = false;
  bool may_defer = false;
  std::unique_ptr<LateWork> late_made;                 // made by RouteLayer of the current layer
  std::vector<std::unique_ptr<LateWork>> late_flight;  // sent, not yet joined
  int late_join_attention_il = -1;  // deferred experts join after this layer's attention
  int late_join_moe_il = -1;        // deferred experts join this MoE layer's output

  std::chrono::steady_clock::time_point start;
  StepProfile prof;  // the job writes it; the actor reads it after kStepDone
};

using Clock = std::chrono::steady_clock;

int64_t MicrosSince(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count();
}

void Recount(Step& step) {
  step.n_rows = 0;
  for (int s : step.active) {
    step.row_begin[s] = step.n_rows;
    step.n_rows += static_cast<int64_t>(step.slices[s].tokens.size());
  }
}

void DropFailed(Step& step) {
  std::vector<int> kept;
  for (int s : step.active) {
    if (step.status[s].ok()) kept.push_back(s);
  }
  if (kept.size() != step.active.size()) {
    step.active = std::move(kept);
    Recount(step);
  }
}

void Gather(const Step& step, int64_t n_embd, models::Activations* x) {
  x->Resize(step.n_rows, n_embd);
  for (int s : step.active) {
    const models::Activations& xs = step.xs[s];
    std::copy(xs.data(), xs.data() + xs.n_tokens() * n_embd, x->row(step.row_begin[s]));
  }
}

void Scatter(const models::Activations& x, Step* step) {
  const int64_t n_embd = x.n_cols();
  for (int s : step->active) {
    models::Activations& xs = step->xs[s];
    std::copy(x.row(step->row_begin[s]), x.row(step->row_begin[s]) + xs.n_tokens() * n_embd,
              xs.data());
  }
}

// The batch's routing policies: one range per active slice.
std::vector<models::RowPolicy> RowPolicies(const Step& st) {
  std::vector<models::RowPolicy> rows;
  for (int s : st.active) {
    const int64_t n = static_cast<int64_t>(st.slices[s].tokens.size());
    rows.push_back({st.row_begin[s], st.row_begin[s] + n, st.slices[s].routing_policy.get()});
  }
  return rows;
}

// Routes MoE layer il into step->routing under the slices' policies; moves
// deferred entries into step->late_made.
absl::Status RouteLayer(const models::Deepseek2Model& model, int il, const models::Activations& h,
                        Step* step) {
  Step& st = *step;
  const models::Deepseek2Hparams& hp = model.hparams();
  if (!st.any_policy) return model.Route(il, h, &st.routing);
  // Full routing, then each slice's policy (the one function the attention
  // actors share, routing_policy.h).
  const models::RoutingPolicy* full[] = {models::FullRoutingPolicy()};
  KTX_RETURN_IF_ERROR(model.Route(il, h, full, &st.routing));
  const std::vector<models::RowPolicy> rows = RowPolicies(st);
  models::ApplyRoutingPolicies(hp.routing(), il, rows, model.routing_policy(), &st.routing);
  if (!st.may_defer) return absl::OkStatus();
  auto late = std::make_unique<LateWork>();
  const models::DeferredCount count = models::SplitDeferredRows(
      il, hp.n_layer, rows, model.routing_policy(), &st.routing, late->routing);
  if (count.total() == 0) return absl::OkStatus();
  st.prof.layers[il].deferred_entries += count.total();
  if (!hp.IsMoeLayer(il + 1)) {
    return absl::InternalError(
        absl::StrCat("expert deferral: layer ", il + 1, " after deferring layer ", il,
                     " is dense (the actor runtime joins deferred experts at MoE layers)"));
  }
  late->il = il;
  late->n_rows = st.n_rows;
  late->row_begin.assign(st.slices.size(), -1);
  for (int s : st.active) late->row_begin[s] = st.row_begin[s];
  for (int j = 0; j < 2; ++j) late->entries[j] = count.entries[j];
  if (count.entries[kJoinAttention] > 0) st.late_join_attention_il = il + 1;
  if (count.entries[kJoinMoe] > 0) st.late_join_moe_il = il + 1;
  st.late_made = std::move(late);
  return absl::OkStatus();
}

// The deferred result `result` (of `late`) as rows of the current batch, F32
// [n_rows, n_embd] (partials summed in double, in the router's fixed order);
// rows the router could not serve fail their slices.
void PlaceLate(const LateWork& late, const MoeResult& result, int64_t n_embd, Step* step,
               models::Activations* out) {
  Step& st = *step;
  auto slice_of = [&](int64_t row) {
    for (int s : st.active) {
      const int64_t b = late.row_begin[s];
      if (b >= 0 && row >= b && row < b + static_cast<int64_t>(st.slices[s].tokens.size())) {
        return s;
      }
    }
    return -1;
  };
  for (int32_t row : result.failed_rows) {
    const int s = slice_of(row);
    if (s >= 0 && st.status[s].ok()) st.status[s] = ToStatus(result.code, result.message);
  }
  const int64_t n_late = late.n_rows;
  std::vector<double> acc(static_cast<size_t>(n_late * n_embd), 0.0);
  for (const PlacedPartial& p : result.parts) {
    for (size_t j = 0; j < p.rows.size(); ++j) {
      const float* src = p.partial->row(static_cast<int64_t>(j));
      double* dst = acc.data() + static_cast<int64_t>(p.rows[j]) * n_embd;
      for (int64_t c = 0; c < n_embd; ++c) dst[c] += src[c];
    }
  }
  out->Resize(st.n_rows, n_embd);
  for (int s : st.active) {
    const int64_t n = static_cast<int64_t>(st.slices[s].tokens.size());
    const double* src = acc.data() + late.row_begin[s] * n_embd;
    float* dst = out->row(st.row_begin[s]);
    for (int64_t i = 0; i < n * n_embd; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// A failed wait for the router, as the step's error: the router's own
// conditions (no router, router down) as they are, the rest naming `what`.
absl::Status MoeError(const absl::Status& status, const std::string& what) {
  if (status.code() == absl::StatusCode::kFailedPrecondition ||
      (status.code() == absl::StatusCode::kUnavailable &&
       absl::StartsWith(status.message(), "the router is down"))) {
    return status;
  }
  return absl::Status(status.code(), absl::StrCat("router, ", what, ": ", status.message()));
}

// Sends the deferred experts RouteLayer made at this MoE layer (right after
// the layer's immediate experts, so the shards compute them while the next
// layer's attention runs).
absl::Status SendLate(MoeClient& client, const Tensor& h, Step* step) {
  Step& st = *step;
  std::unique_ptr<LateWork> late = std::move(st.late_made);
  st.late_made.reset();
  if (late == nullptr) return absl::OkStatus();
  for (int j = 0; j < 2; ++j) {
    if (late->entries[j] == 0) continue;
    MoeWork work;
    work.il = late->il;
    work.h = h;
    work.n_expert_used = late->routing[j].n_expert_used;
    work.expert_ids = std::move(late->routing[j].expert_ids);
    work.weights = std::move(late->routing[j].weights);
    late->routing[j] = models::Routing();
    absl::StatusOr<uint64_t> ticket = client.Send(std::move(work));
    if (!ticket.ok()) {
      return MoeError(ticket.status(), absl::StrCat("deferred experts of layer ", late->il));
    }
    late->ticket[j] = *ticket;
  }
  st.late_flight.push_back(std::move(late));
  return absl::OkStatus();
}

// Waits for the deferred experts of layer il that join at `join` and returns
// their part of the current batch in *out (F32 [n_rows, n_embd]); failed rows
// fail their slices. *wait_us: how long the job waited for them.
absl::Status JoinLate(MoeClient& client, int il, int join, int64_t n_embd, Step* step,
                      models::Activations* out, int64_t* wait_us) {
  Step& st = *step;
  auto it = std::find_if(st.late_flight.begin(), st.late_flight.end(), [&](const auto& late) {
    return late->il == il && late->ticket[join] != 0;
  });
  if (it == st.late_flight.end()) {
    return absl::InternalError(absl::StrCat("expert deferral: layer ", il + 1,
                                            " waits for deferred experts that were never sent"));
  }
  LateWork& late = **it;
  const Clock::time_point t0 = Clock::now();
  absl::StatusOr<MoeResult> result = client.Wait(late.ticket[join]);
  *wait_us = MicrosSince(t0);
  late.ticket[join] = 0;
  if (!result.ok()) {
    return MoeError(result.status(), absl::StrCat("deferred experts of layer ", il));
  }
  PlaceLate(late, *result, n_embd, &st, out);
  if (late.ticket[0] == 0 && late.ticket[1] == 0) st.late_flight.erase(it);
  return absl::OkStatus();
}

// One MoE layer il from the FFN-normed batch h (x: the batch residual, F32
// [n_rows, n_embd]): routes, sends the routed experts (and any deferred ones)
// to the router, computes the shared experts in place while the shards
// work, waits for the router, then x += Σ routed partials (fixed order) +
// shared (+ the previous layer's deferred experts joining here).
absl::Status MoeLayer(const Core& core, MoeClient& client, int il, models::Activations h,
                      Step* step, models::Activations* x) {
  const models::Deepseek2Model& model = *core.model;
  const models::Deepseek2Hparams& hp = model.hparams();
  Step& st = *step;
  LayerTiming& timing = st.prof.layers[il];
  Clock::time_point t0 = Clock::now();
  KTX_RETURN_IF_ERROR(RouteLayer(model, il, h, step));
  timing.gate_us += MicrosSince(t0);
  {
    std::vector<uint8_t> used(static_cast<size_t>(hp.n_expert), 0);
    for (int32_t e : st.routing.expert_ids) {
      if (e >= 0 && e < hp.n_expert) used[e] = 1;
    }
    timing.distinct_experts = static_cast<int32_t>(std::count(used.begin(), used.end(), 1));
  }
  auto h_shared = std::make_shared<const models::Activations>(std::move(h));
  Tensor h_experts(h_shared);
  if (core.bf16_expert_input) {
    models::Activations rounded = *h_shared;
    float* v = rounded.data();
    for (int64_t i = 0; i < rounded.n_tokens() * rounded.n_cols(); ++i) {
      v[i] = RoundToWireBf16(v[i]);
    }
    h_experts = Tensor::Wrap(std::move(rounded));
  }
  const Clock::time_point moe_posted = Clock::now();
  MoeWork work;
  work.il = il;
  work.h = h_experts;
  work.n_expert_used = st.routing.n_expert_used;
  work.expert_ids = std::move(st.routing.expert_ids);
  work.weights = std::move(st.routing.weights);
  st.routing = models::Routing();
  absl::StatusOr<uint64_t> ticket = client.Send(std::move(work));
  if (!ticket.ok()) return MoeError(ticket.status(), absl::StrCat("layer ", il));
  KTX_RETURN_IF_ERROR(SendLate(client, h_experts, step));

  // The shared experts on this thread while the shards work.
  models::Activations shared;
  t0 = Clock::now();
  const absl::Status shared_status = model.SharedExperts(il, *h_shared, &shared);
  const int64_t shared_us = MicrosSince(t0);
  timing.shared_us += shared_us;

  absl::StatusOr<MoeResult> moe = client.Wait(*ticket);
  absl::Status status =
      moe.ok() ? absl::OkStatus() : MoeError(moe.status(), absl::StrCat("layer ", il));
  if (!shared_status.ok()) status = shared_status;
  // Deferred experts of the previous layer that join this layer's output.
  models::Activations late_part;
  const bool join_late = st.late_join_moe_il == il;
  if (join_late) {
    int64_t late_wait_us = 0;
    absl::Status late_status =
        JoinLate(client, il - 1, kJoinMoe, hp.n_embd, step, &late_part, &late_wait_us);
    timing.late_wait_us += late_wait_us;
    st.late_join_moe_il = -1;
    if (!late_status.ok()) status = std::move(late_status);
  }
  KTX_RETURN_IF_ERROR(status);

  t0 = Clock::now();
  const MoeResult& result = *moe;
  const int64_t n_embd = hp.n_embd;
  const int64_t n = st.n_rows;
  // Rows the router could not serve fail their slices.
  if (!result.failed_rows.empty()) {
    std::vector<int64_t> begin, count;
    for (int s : st.active) {
      begin.push_back(st.row_begin[s]);
      count.push_back(static_cast<int64_t>(st.slices[s].tokens.size()));
    }
    for (int i : SlicesOwningRows(result.failed_rows, begin, count)) {
      const int s = st.active[i];
      if (st.status[s].ok()) st.status[s] = ToStatus(result.code, result.message);
    }
  }
  models::Activations summed;
  const models::Activations* routed = SumPlacedPartials(result.parts, n, n_embd, &summed);
  // As Deepseek2Model::Forward: x += routed + shared (+ deferred).
  const models::Activations* all_parts[] = {routed, &shared, &late_part};
  KTX_RETURN_IF_ERROR(model.Combine(std::span(all_parts, join_late ? 3 : 2), x));
  timing.combine_us += MicrosSince(t0);
  {
    const int64_t moe_us =
        std::chrono::duration_cast<std::chrono::microseconds>(t0 - moe_posted).count();
    const std::vector<int64_t> shard_us =
        ShardComputeUs(result.parts, static_cast<int>(timing.shard_us.size()));
    int64_t critical = 0;
    for (int64_t us : shard_us) critical = std::max(critical, us);
    timing.moe_us += moe_us;
    timing.experts_us += critical;
    timing.dispatch_us += std::max<int64_t>(0, moe_us - std::max(critical, shared_us));
    for (size_t s = 0; s < shard_us.size(); ++s) timing.shard_us[s] += shard_us[s];
  }
  return absl::OkStatus();
}

// The step's one job: every layer (MoE layers through the router, waited for
// on this thread), then Head on the rows each slice asked for and the
// commits of the slices that did not fail; posts kStepDone.
void RunStep(const std::shared_ptr<Core>& core, const std::shared_ptr<Step>& step,
             const attention_actor& me) {
  const models::Deepseek2Model& model = *core->model;
  const models::Deepseek2Hparams& hp = model.hparams();
  Step& st = *step;
  MoeClient client(*core->system, core->router, core->moe);
  {
    const Clock::time_point t0 = Clock::now();
    for (int s : st.active) st.status[s] = model.Embed(st.slices[s].tokens, &st.xs[s]);
    DropFailed(st);
    st.prof.embed_us += MicrosSince(t0);
  }
  while (st.il < hp.n_layer && !st.active.empty()) {
    const int il = st.il;
    LayerTiming& timing = st.prof.layers[il];
    Clock::time_point t0 = Clock::now();
    tbb::parallel_for(size_t{0}, st.active.size(), [&](size_t i) {
      const int s = st.active[i];
      absl::Status status = model.AttentionBlock(il, st.positions[s], st.kvs[s], &st.xs[s]);
      if (!status.ok()) st.status[s] = std::move(status);
    });
    DropFailed(st);
    timing.attention_us += MicrosSince(t0);
    if (st.active.empty()) break;
    if (st.late_join_attention_il == il) {
      // Deferred experts of layer il - 1 join right after this attention.
      models::Activations late_part, x;
      int64_t late_wait_us = 0;
      st.fatal = JoinLate(client, il - 1, kJoinAttention, hp.n_embd, step.get(), &late_part,
                          &late_wait_us);
      timing.late_wait_us += late_wait_us;
      st.late_join_attention_il = -1;
      if (!st.fatal.ok()) break;
      Gather(st, hp.n_embd, &x);
      const models::Activations* parts[] = {&late_part};
      st.fatal = model.Combine(parts, &x);
      if (!st.fatal.ok()) break;
      Scatter(x, &st);
      DropFailed(st);
      if (st.active.empty()) break;
    }
    t0 = Clock::now();
    models::Activations x, h;
    Gather(st, hp.n_embd, &x);
    st.fatal = model.FfnNorm(il, x, &h);
    timing.ffn_norm_us += MicrosSince(t0);
    if (!st.fatal.ok()) break;
    if (!hp.IsMoeLayer(il)) {
      t0 = Clock::now();
      models::Activations f;
      st.fatal = model.DenseFfn(il, h, &f);
      timing.dense_ffn_us += MicrosSince(t0);
      if (!st.fatal.ok()) break;
      t0 = Clock::now();
      const models::Activations* parts[] = {&f};
      st.fatal = model.Combine(parts, &x);
      if (!st.fatal.ok()) break;
      Scatter(x, &st);
      timing.combine_us += MicrosSince(t0);
    } else {
      st.fatal = MoeLayer(*core, client, il, std::move(h), step.get(), &x);
      if (!st.fatal.ok()) break;
      Scatter(x, &st);
    }
    st.il++;
    DropFailed(st);
  }
  if (st.fatal.ok()) {
    const Clock::time_point t0 = Clock::now();
    for (int s : st.active) {
      if (!st.status[s].ok()) continue;
      const auto want = static_cast<SliceLogits>(st.slices[s].logits);
      if (want != SliceLogits::kNone) {
        models::Activations logits;
        st.status[s] = model.Head(
            st.xs[s],
            want == SliceLogits::kAll ? models::LogitsRows::kAll : models::LogitsRows::kLast,
            &logits);
        if (!st.status[s].ok()) continue;
        st.logits[s] = Tensor::Wrap(std::move(logits));
      }
      st.status[s] = st.kvs[s]->Commit(static_cast<int64_t>(st.slices[s].tokens.size()));
    }
    st.prof.head_us += MicrosSince(t0);
  }
  caf::anon_send(me, stage_atom::value, st.step, static_cast<int32_t>(kStepDone));
}

struct AttentionState {
  AttentionConfig config;
  std::shared_ptr<Core> core;
  std::shared_ptr<Step> current;
  caf::typed_response_promise<StepResult> promise;
  std::deque<std::pair<StepRequest, caf::typed_response_promise<StepResult>>> queue;
  std::set<uint64_t> deferred_free;
  static inline const char* name = "ktx.attention";
};

using AttentionPointer = attention_actor::stateful_pointer<AttentionState>;

void FreeSequence(AttentionState& st, uint64_t seq) {
  auto it = st.core->ids.find(seq);
  if (it == st.core->ids.end()) return;
  (void)st.core->kv.FreeSequence(it->second);
  st.core->ids.erase(it);
}

void Start(AttentionPointer self, StepRequest request,
           caf::typed_response_promise<StepResult> promise);

void FinishStep(AttentionPointer self) {
  AttentionState& st = self->state;
  std::shared_ptr<Step> step = std::move(st.current);
  st.current.reset();
  StepResult result;
  result.step = step->step;
  result.compute_us = std::chrono::duration_cast<std::chrono::microseconds>(
                          std::chrono::steady_clock::now() - step->start)
                          .count();
  if (st.config.profile) {
    step->prof.step = step->step;
    step->prof.wall_us = result.compute_us;
    st.config.profile->Add(std::move(step->prof));
  }
  for (size_t s = 0; s < step->slices.size(); ++s) {
    const absl::Status& status = step->status[s].ok() ? step->fatal : step->status[s];
    result.slices.push_back(
        MakeSliceResult(step->slices[s].seq, status, std::move(step->logits[s])));
  }
  st.promise.deliver(std::move(result));
  for (uint64_t seq : st.deferred_free) FreeSequence(st, seq);
  st.deferred_free.clear();
  if (!st.queue.empty()) {
    auto next = std::move(st.queue.front());
    st.queue.pop_front();
    Start(self, std::move(next.first), std::move(next.second));
  }
}

void Start(AttentionPointer self, StepRequest request,
           caf::typed_response_promise<StepResult> promise) {
  AttentionState& st = self->state;
  auto step = std::make_shared<Step>();
  step->start = std::chrono::steady_clock::now();
  step->step = request.step;
  step->slices = std::move(request.slices);
  const size_t n = step->slices.size();
  step->kvs.assign(n, nullptr);
  step->positions.resize(n);
  step->xs.resize(n);
  step->row_begin.assign(n, 0);
  step->status.assign(n, absl::OkStatus());
  step->logits.resize(n);
  std::set<uint64_t> seen;
  for (size_t s = 0; s < n; ++s) {
    const StepSlice& slice = step->slices[s];
    absl::Status& status = step->status[s];
    status = CheckSliceShape(slice, request.step, &seen);
    if (!status.ok()) continue;
    if (slice.new_capacity > 0) {
      if (st.core->ids.count(slice.seq)) {
        status = absl::AlreadyExistsError(
            absl::StrCat("sequence ", slice.seq, " already has a KV cache"));
        continue;
      }
      absl::StatusOr<kv_cache::SequenceId> id = st.core->kv.AddSequence(slice.new_capacity);
      if (!id.ok()) {
        status = absl::Status(id.status().code(),
                              absl::StrCat("sequence ", slice.seq, ": ", id.status().message()));
        continue;
      }
      st.core->ids[slice.seq] = *id;
    }
    auto it = st.core->ids.find(slice.seq);
    if (it == st.core->ids.end()) {
      status = absl::NotFoundError(absl::StrCat("sequence ", slice.seq, " has no KV cache"));
      continue;
    }
    kv_cache::SequenceKv* kv = st.core->kv.Find(it->second);
    status = kv->CheckRoom(static_cast<int64_t>(slice.tokens.size()));
    if (!status.ok()) continue;
    step->kvs[s] = kv;
    step->positions[s].resize(slice.tokens.size());
    for (size_t t = 0; t < slice.tokens.size(); ++t) {
      step->positions[s][t] = static_cast<int32_t>(kv->length() + static_cast<int64_t>(t));
    }
    step->active.push_back(static_cast<int>(s));
  }
  Recount(*step);
  {
    const models::RoutingPolicy* model_policy = st.core->model->routing_policy();
    step->any_policy = model_policy != nullptr;
    step->may_defer = model_policy != nullptr && model_policy->HasDeferral();
    for (int s : step->active) {
      const models::RoutingPolicy* p = step->slices[s].routing_policy.get();
      if (p == nullptr) continue;
      step->any_policy = true;
      step->may_defer = step->may_defer || p->HasDeferral();
    }
  }
  step->prof.n_rows = step->n_rows;
  step->prof.layers.resize(static_cast<size_t>(st.core->model->hparams().n_layer));
  for (LayerTiming& layer : step->prof.layers) {
    layer.shard_us.assign(static_cast<size_t>(std::max(st.config.n_shards, 0)), 0);
  }
  st.current = step;
  st.promise = std::move(promise);
  if (step->active.empty()) {
    FinishStep(self);
    return;
  }
  attention_actor me = caf::actor_cast<attention_actor>(self);
  st.config.arena->Submit([core = st.core, step, me] { RunStep(core, step, me); });
}

attention_actor::behavior_type AttentionBehavior(AttentionPointer self, AttentionConfig config,
                                                 std::shared_ptr<Core> core) {
  self->state.config = std::move(config);
  self->state.core = std::move(core);
  return {
      [self](step_atom, StepRequest& request) -> caf::typed_response_promise<StepResult> {
        AttentionState& st = self->state;
        auto promise = self->make_response_promise<StepResult>();
        if (st.current) {
          st.queue.emplace_back(std::move(request), promise);
        } else {
          Start(self, std::move(request), promise);
        }
        return promise;
      },
      [self](kv_free_atom, uint64_t seq) {
        AttentionState& st = self->state;
        if (st.current) {
          for (const StepSlice& slice : st.current->slices) {
            if (slice.seq == seq) {
              st.deferred_free.insert(seq);
              return;
            }
          }
        }
        FreeSequence(st, seq);
      },
      [self](kv_stats_atom) {
        const kv_cache::LatentKvCache& kv = self->state.core->kv;
        KvStats stats;
        stats.budget_bytes = kv.budget_bytes();
        stats.used_bytes = kv.used_bytes();
        stats.n_sequences = kv.n_sequences();
        stats.free_tokens = kv.free_tokens();
        return stats;
      },
      [self](stage_atom, uint64_t step, int32_t stage) {
        AttentionState& st = self->state;
        if (!st.current || st.current->step != step) return;
        if (stage == kStepDone) FinishStep(self);
      },
  };
}

}  // namespace

absl::StatusOr<attention_actor> SpawnAttention(caf::actor_system& system, AttentionConfig config) {
  if (config.model == nullptr || config.arena == nullptr) {
    return absl::InvalidArgumentError("attention actor: no model or no cpu arena");
  }
  KTX_ASSIGN_OR_RETURN(
      kv_cache::LatentKvCache cache,
      kv_cache::LatentKvCache::Create(config.model->kv_layout(), config.kv_budget_bytes));
  if (cache.free_tokens() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache budget of ", config.kv_budget_bytes, " bytes holds no token (",
                     config.model->kv_layout().bytes_per_token(), " bytes per token)"));
  }
  auto core = std::make_shared<Core>(config.model, std::move(cache));
  core->bf16_expert_input = config.bf16_expert_input;
  if (config.moe_deadline.count() <= 0 || config.moe_spin_us < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention actor: moe_deadline (", config.moe_deadline.count(),
        " ms) must be positive and moe_spin_us (", config.moe_spin_us, ") not negative"));
  }
  core->system = &system;
  core->router = config.router;
  core->moe.deadline = config.moe_deadline;
  core->moe.spin_us = config.moe_spin_us;
  core->moe.lane = config.lane;
  return system.spawn(AttentionBehavior, std::move(config), std::move(core));
}

}  // namespace ktx::actors
