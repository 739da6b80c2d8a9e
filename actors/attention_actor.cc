#include "actors/attention_actor.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "actors/cpu_arena.h"
#include "actors/moe_combine.h"
#include "actors/remote/wire_dtype.h"
#include "actors/status_bridge.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/duration.hpp"
#include "caf/send.hpp"
#include "caf/stateful_actor.hpp"
#include "caf/system_messages.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "caf/typed_response_promise.hpp"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "tbb/parallel_for.h"

namespace ktx::actors {
namespace {

enum Stage : int32_t {
  kMoeReady = 1,      // the job stopped at a MoE layer: h and routing are ready
  kSharedDone = 2,    // the shared experts of that layer are done
  kStepDone = 3,      // Head and commits are done (or the step failed)
  kLateAttention = 4  // the job stopped after a layer's attention: deferred experts join here
};

constexpr int kJoinMoe = static_cast<int>(models::DeferJoin::kNextMoe);
constexpr int kJoinAttention = static_cast<int>(models::DeferJoin::kNextAttention);

// The deferred experts of one MoE layer (expert deferral, routing_policy.h):
// made by the job that routed the layer, sent to the router by the actor
// right after the layer's immediate experts, joined one layer later (per
// DeferJoin) so that the shards compute them while the next layer's
// attention runs. The job writes the routing before posting kMoeReady; the
// actor writes sent/done/result/status; a job reads a result only after the
// actor handed it over (done).
struct LateWork {
  int il = 0;                      // the deferring layer
  int64_t n_rows = 0;              // rows of layer il's batch
  std::vector<int64_t> row_begin;  // [slices] first batch row at layer il (-1: inactive)
  models::Routing routing[2];      // [join] rows of layer il's batch; all-kNoExpert rows: none
  int64_t entries[2] = {0, 0};     // [join] deferred (token, expert) entries
  bool sent[2] = {false, false};
  bool done[2] = {false, false};
  bool joined[2] = {false, false};
  MoeResult result[2];
  absl::Status status[2];
  bool pending() const { return (sent[0] && !joined[0]) || (sent[1] && !joined[1]); }
};

// The KV pool; shared with jobs so that a killed actor never frees rows a job
// still writes. `ids` is touched by the actor only.
struct Core {
  std::shared_ptr<const models::Deepseek2Model> model;
  kv_cache::LatentKvCache kv;
  std::map<uint64_t, kv_cache::SequenceId> ids;  // scheduler seq -> cache id
  bool bf16_expert_input = false;                // AttentionConfig::bf16_expert_input

  Core(std::shared_ptr<const models::Deepseek2Model> m, kv_cache::LatentKvCache cache)
      : model(std::move(m)), kv(std::move(cache)) {}
};

// One step in flight. At any time either the actor or exactly one job writes
// a field (the shared-experts job writes only `shared`/`shared_status` while
// the actor writes only `moe`/`moe_status`).
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
  bool embedded = false;
  absl::Status fatal;  // fails every slice

  // At a MoE layer:
  models::Activations x;                         // F32 [n_rows, n_embd] batch residual
  std::shared_ptr<const models::Activations> h;  // F32 [n_rows, n_embd] FFN-normed
  // F32 [n_rows, n_embd] h rounded to bf16 for the routed experts (wire
  // dtype bf16); null: they get h.
  std::shared_ptr<const models::Activations> h_experts;
  models::Routing routing;     // [n_rows, K]
  models::Activations shared;  // F32 [n_rows, n_embd]
  absl::Status shared_status;
  MoeResult moe;
  absl::Status moe_status;
  bool moe_done = false;
  bool shared_done = false;
  std::vector<int64_t> moe_shard_us;  // [n_shards] this layer's shard compute (actor writes)
  int64_t moe_shared_us = 0;          // this layer's shared experts (shared job writes)

  // Routing policies: some slice brings its own, or the model has one (the
  // batch is then routed full and the policies applied per slice); one of
  // them defers experts.
  bool any_policy = false;
  bool may_defer = false;
  std::shared_ptr<LateWork> late_made;                 // the job -> the actor at kMoeReady
  std::vector<std::shared_ptr<LateWork>> late_flight;  // actor only: sent, not yet joined
  bool waiting_late_attention = false;                 // actor only
  int late_join_attention_il = -1;  // jobs: deferred experts join after this layer's attention
  int late_join_moe_il = -1;        // jobs: deferred experts join this MoE layer's output
  int attention_done_il = -1;       // jobs: this layer's attention ran (resuming after a join)
  std::chrono::steady_clock::time_point late_posted;  // jobs: stop for a next_attention join
  // actor only: when the layer's MoE was ready while the deferred experts were not
  std::optional<std::chrono::steady_clock::time_point> late_blocked;

  std::chrono::steady_clock::time_point start;
  // Stage timings (actors/profile.h): jobs write their stage's fields, the
  // actor the shard times of a MoE result.
  StepProfile prof;
  std::chrono::steady_clock::time_point moe_posted;  // end of Route of the current MoE layer
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

void Post(const attention_actor& me, uint64_t step, Stage stage) {
  caf::anon_send(me, stage_atom::value, step, static_cast<int32_t>(stage));
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
                        const std::shared_ptr<Step>& step) {
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
  auto late = std::make_shared<LateWork>();
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

// The deferred result of `join` as rows of the current batch, F32 [n_rows,
// n_embd] (partials summed in double, in the router's fixed order); rows the
// router could not serve fail their slices.
void PlaceLate(const LateWork& late, int join, int64_t n_embd, Step* step,
               models::Activations* out) {
  Step& st = *step;
  const MoeResult& result = late.result[join];
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

// Runs layers from step->il until a MoE layer needs the router (posts
// kMoeReady) or the model is done (Head, commits; posts kStepDone).
void RunLayers(const std::shared_ptr<Core>& core, const std::shared_ptr<Step>& step,
               const attention_actor& me) {
  const models::Deepseek2Model& model = *core->model;
  const models::Deepseek2Hparams& hp = model.hparams();
  Step& st = *step;
  if (!st.embedded) {
    const Clock::time_point t0 = Clock::now();
    for (int s : st.active) st.status[s] = model.Embed(st.slices[s].tokens, &st.xs[s]);
    st.embedded = true;
    DropFailed(st);
    st.prof.embed_us += MicrosSince(t0);
  }
  while (st.il < hp.n_layer && !st.active.empty()) {
    const int il = st.il;
    LayerTiming& timing = st.prof.layers[il];
    Clock::time_point t0 = Clock::now();
    if (st.attention_done_il != il) {
      tbb::parallel_for(size_t{0}, st.active.size(), [&](size_t i) {
        const int s = st.active[i];
        absl::Status status = model.AttentionBlock(il, st.positions[s], st.kvs[s], &st.xs[s]);
        if (!status.ok()) st.status[s] = std::move(status);
      });
      DropFailed(st);
      timing.attention_us += MicrosSince(t0);
      st.attention_done_il = il;
      if (st.active.empty()) break;
      if (st.late_join_attention_il == il) {
        // Deferred experts of layer il - 1 join right after this attention.
        st.late_posted = Clock::now();
        Post(me, st.step, kLateAttention);
        return;
      }
    }
    if (st.active.empty()) break;
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
      st.il++;
      continue;
    }
    t0 = Clock::now();
    st.fatal = RouteLayer(model, il, h, step);
    timing.gate_us += MicrosSince(t0);
    if (!st.fatal.ok()) break;
    {
      std::vector<uint8_t> used(static_cast<size_t>(hp.n_expert), 0);
      for (int32_t e : st.routing.expert_ids) {
        if (e >= 0 && e < hp.n_expert) used[e] = 1;
      }
      timing.distinct_experts = static_cast<int32_t>(std::count(used.begin(), used.end(), 1));
    }
    st.x = std::move(x);
    if (core->bf16_expert_input) {
      models::Activations rounded = h;
      float* v = rounded.data();
      for (int64_t i = 0; i < rounded.n_tokens() * rounded.n_cols(); ++i) {
        v[i] = RoundToWireBf16(v[i]);
      }
      st.h_experts = std::make_shared<const models::Activations>(std::move(rounded));
    }
    st.h = std::make_shared<const models::Activations>(std::move(h));
    st.moe_posted = Clock::now();
    Post(me, st.step, kMoeReady);
    return;
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
  Post(me, st.step, kStepDone);
}

// x += Σ routed partials (fixed order) + shared; then on to the next layer.
void CombineAndContinue(const std::shared_ptr<Core>& core, const std::shared_ptr<Step>& step,
                        const attention_actor& me, std::shared_ptr<const LateWork> late,
                        int64_t late_wait_us) {
  const models::Deepseek2Model& model = *core->model;
  Step& st = *step;
  const Clock::time_point t0 = Clock::now();
  LayerTiming& timing = st.prof.layers[st.il];
  timing.late_wait_us += late_wait_us;
  timing.moe_us +=
      std::chrono::duration_cast<std::chrono::microseconds>(t0 - st.moe_posted).count();
  const int64_t n_embd = model.n_embd();
  const int64_t n = st.n_rows;
  // Rows the router could not serve fail their slices.
  if (!st.moe.failed_rows.empty()) {
    std::vector<int64_t> begin, count;
    for (int s : st.active) {
      begin.push_back(st.row_begin[s]);
      count.push_back(static_cast<int64_t>(st.slices[s].tokens.size()));
    }
    for (int i : SlicesOwningRows(st.moe.failed_rows, begin, count)) {
      const int s = st.active[i];
      if (st.status[s].ok()) st.status[s] = ToStatus(st.moe.code, st.moe.message);
    }
  }
  models::Activations summed;
  const models::Activations* routed = SumPlacedPartials(st.moe.parts, n, n_embd, &summed);
  // Deferred experts of the previous layer joining this layer's output (as
  // Deepseek2Model::Forward: x += routed + shared + deferred).
  models::Activations late_part;
  if (late != nullptr) {
    PlaceLate(*late, kJoinMoe, n_embd, &st, &late_part);
    st.late_join_moe_il = -1;
  }
  const models::Activations* all_parts[] = {routed, &st.shared, &late_part};
  st.fatal = model.Combine(std::span(all_parts, late != nullptr ? 3 : 2), &st.x);
  if (!st.fatal.ok()) {
    Post(me, st.step, kStepDone);
    return;
  }
  Scatter(st.x, &st);
  timing.combine_us += MicrosSince(t0);
  {
    const int64_t moe_us =
        std::chrono::duration_cast<std::chrono::microseconds>(t0 - st.moe_posted).count();
    int64_t critical = 0;
    for (int64_t us : st.moe_shard_us) critical = std::max(critical, us);
    timing.experts_us += critical;
    timing.dispatch_us += std::max<int64_t>(0, moe_us - std::max(critical, st.moe_shared_us));
    for (size_t s = 0; s < st.moe_shard_us.size() && s < timing.shard_us.size(); ++s) {
      timing.shard_us[s] += st.moe_shard_us[s];
    }
  }
  st.x = models::Activations();
  st.h.reset();
  st.h_experts.reset();
  st.moe = MoeResult();
  st.il++;
  DropFailed(st);
  RunLayers(core, step, me);
}

// x += the deferred experts of the previous layer (join next_attention),
// then on with this layer's FFN.
void JoinLateAttention(const std::shared_ptr<Core>& core, const std::shared_ptr<Step>& step,
                       const attention_actor& me, std::shared_ptr<const LateWork> late) {
  const models::Deepseek2Model& model = *core->model;
  Step& st = *step;
  st.prof.layers[st.il].late_wait_us += MicrosSince(st.late_posted);
  const int64_t n_embd = model.n_embd();
  models::Activations late_part, x;
  PlaceLate(*late, kJoinAttention, n_embd, &st, &late_part);
  Gather(st, n_embd, &x);
  const models::Activations* parts[] = {&late_part};
  st.fatal = model.Combine(parts, &x);
  if (!st.fatal.ok()) {
    Post(me, st.step, kStepDone);
    return;
  }
  Scatter(x, &st);
  st.late_join_attention_il = -1;
  DropFailed(st);
  RunLayers(core, step, me);
}

struct AttentionState {
  AttentionConfig config;
  std::shared_ptr<Core> core;
  std::shared_ptr<Step> current;
  caf::typed_response_promise<StepResult> promise;
  std::deque<std::pair<StepRequest, caf::typed_response_promise<StepResult>>> queue;
  std::set<uint64_t> deferred_free;
  bool waiting_moe = false;  // a moe_atom request to the router is out
  std::string router_down;   // the router's exit reason once it is down
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
    SliceResult slice;
    slice.seq = step->slices[s].seq;
    absl::Status status = step->status[s];
    if (status.ok() && !step->fatal.ok()) status = step->fatal;
    if (!status.ok()) {
      slice.code = static_cast<int32_t>(status.code());
      slice.message = std::string(status.message());
    } else {
      slice.logits = std::move(step->logits[s]);
    }
    result.slices.push_back(std::move(slice));
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

// The in-flight deferred work of layer il that joins at `join` (null: none).
std::shared_ptr<LateWork> FindLate(Step& step, int il, int join) {
  for (const std::shared_ptr<LateWork>& late : step.late_flight) {
    if (late->il == il && late->sent[join] && !late->joined[join]) return late;
  }
  return nullptr;
}

// Marks `join` of `late` as handed to a job; forgets works with nothing left.
void Consume(Step& step, const std::shared_ptr<LateWork>& late, int join) {
  late->joined[join] = true;
  if (!late->pending()) {
    std::erase_if(step.late_flight, [](const auto& l) { return !l->pending(); });
  }
}

void MaybeCombine(AttentionPointer self) {
  AttentionState& st = self->state;
  std::shared_ptr<Step> step = st.current;
  if (!step->moe_done || !step->shared_done) return;
  // Deferred experts of the previous layer that join this layer's output.
  std::shared_ptr<LateWork> late = FindLate(*step, step->il - 1, kJoinMoe);
  if (late != nullptr && !late->done[kJoinMoe]) {
    if (!step->late_blocked) step->late_blocked = Clock::now();
    return;
  }
  int64_t late_wait_us = 0;
  if (step->late_blocked) {
    late_wait_us = MicrosSince(*step->late_blocked);
    step->late_blocked.reset();
  }
  step->moe_done = false;
  step->shared_done = false;
  if (!step->moe_status.ok()) step->fatal = step->moe_status;
  if (!step->shared_status.ok()) step->fatal = step->shared_status;
  if (late != nullptr) {
    Consume(*step, late, kJoinMoe);
    if (!late->status[kJoinMoe].ok()) step->fatal = late->status[kJoinMoe];
  }
  if (!step->fatal.ok()) {
    FinishStep(self);
    return;
  }
  attention_actor me = caf::actor_cast<attention_actor>(self);
  st.config.arena->Submit(
      [core = st.core, step, me, late = std::shared_ptr<const LateWork>(late), late_wait_us] {
        CombineAndContinue(core, step, me, late, late_wait_us);
      });
}

// After a layer's attention (kLateAttention): once the previous layer's
// deferred experts (join next_attention) are back, a job adds them and goes
// on with the layer.
void MaybeJoinAttention(AttentionPointer self) {
  AttentionState& st = self->state;
  std::shared_ptr<Step> step = st.current;
  if (!step->waiting_late_attention) return;
  std::shared_ptr<LateWork> late = FindLate(*step, step->il - 1, kJoinAttention);
  if (late == nullptr) {
    step->waiting_late_attention = false;
    step->fatal = absl::InternalError(absl::StrCat(
        "expert deferral: layer ", step->il, " waits for deferred experts that were never sent"));
    FinishStep(self);
    return;
  }
  if (!late->done[kJoinAttention]) return;
  step->waiting_late_attention = false;
  Consume(*step, late, kJoinAttention);
  if (!late->status[kJoinAttention].ok()) {
    step->fatal = late->status[kJoinAttention];
    FinishStep(self);
    return;
  }
  attention_actor me = caf::actor_cast<attention_actor>(self);
  st.config.arena->Submit([core = st.core, step, me, late = std::shared_ptr<const LateWork>(late)] {
    JoinLateAttention(core, step, me, late);
  });
}

// Sends the deferred experts the job made at this MoE layer (right after the
// layer's immediate experts, so the shards compute them while the next
// layer's attention runs).
void SendLate(AttentionPointer self, const Tensor& h) {
  AttentionState& st = self->state;
  std::shared_ptr<Step> step = st.current;
  std::shared_ptr<LateWork> late = std::move(step->late_made);
  step->late_made.reset();
  if (late == nullptr) return;
  const uint64_t step_id = step->step;
  for (int j = 0; j < 2; ++j) {
    if (late->entries[j] == 0) continue;
    MoeWork work;
    work.il = late->il;
    work.h = h;
    work.n_expert_used = late->routing[j].n_expert_used;
    work.expert_ids = std::move(late->routing[j].expert_ids);
    work.weights = std::move(late->routing[j].weights);
    late->routing[j].expert_ids.clear();
    late->routing[j].weights.clear();
    late->sent[j] = true;
    const int il = late->il;
    auto on_done = [self, step_id, late, j](absl::Status status, MoeResult result) {
      if (late->done[j]) return;
      late->done[j] = true;
      late->status[j] = std::move(status);
      late->result[j] = std::move(result);
      AttentionState& st = self->state;
      if (!st.current || st.current->step != step_id) return;
      MaybeJoinAttention(self);
      if (st.current && st.current->step == step_id) MaybeCombine(self);
    };
    self->request(st.config.router, caf::infinite, moe_atom::value, std::move(work))
        .then([on_done](MoeResult& result) { on_done(absl::OkStatus(), std::move(result)); },
              [on_done, il](caf::error& error) {
                const absl::Status inner = FromCafError(error);
                on_done(
                    absl::Status(inner.code(), absl::StrCat("router, deferred experts of layer ",
                                                            il, ": ", inner.message())),
                    MoeResult());
              });
  }
  step->late_flight.push_back(std::move(late));
}

void OnMoeReady(AttentionPointer self) {
  AttentionState& st = self->state;
  std::shared_ptr<Step> step = st.current;
  attention_actor me = caf::actor_cast<attention_actor>(self);
  const uint64_t step_id = step->step;
  if (!st.config.router || !st.router_down.empty()) {
    step->fatal =
        st.config.router
            ? absl::UnavailableError(absl::StrCat("the router is down (", st.router_down, ")"))
            : absl::FailedPreconditionError(
                  absl::StrCat("layer ", step->il, " is a MoE layer but the engine has no router"));
    FinishStep(self);
    return;
  }
  MoeWork work;
  work.il = step->il;
  work.h = Tensor(step->h_experts ? step->h_experts : step->h);
  const Tensor h_experts = work.h;
  work.n_expert_used = step->routing.n_expert_used;
  work.expert_ids = std::move(step->routing.expert_ids);
  work.weights = std::move(step->routing.weights);
  step->routing = models::Routing();
  const int il = step->il;
  st.waiting_moe = true;
  // No CAF timeout (it would wake CAF's clock thread once per layer): the
  // router answers every request within its shard deadlines, and its death
  // reaches this actor as a down message.
  self->request(st.config.router, caf::infinite, moe_atom::value, std::move(work))
      .then(
          [self, step_id](MoeResult& result) {
            AttentionState& st = self->state;
            if (!st.current || st.current->step != step_id || !st.waiting_moe) return;
            st.waiting_moe = false;
            st.current->moe_shard_us = ShardComputeUs(result.parts, st.config.n_shards);
            st.current->moe = std::move(result);
            st.current->moe_done = true;
            MaybeCombine(self);
          },
          [self, step_id, il](caf::error& error) {
            AttentionState& st = self->state;
            if (!st.current || st.current->step != step_id || !st.waiting_moe) return;
            st.waiting_moe = false;
            const absl::Status inner = FromCafError(error);
            st.current->moe_status = absl::Status(
                inner.code(), absl::StrCat("router, layer ", il, ": ", inner.message()));
            st.current->moe_done = true;
            MaybeCombine(self);
          });
  SendLate(self, h_experts);
  // The shared experts run on the attention arena while the shards work.
  st.config.arena->Submit([core = st.core, step, me] {
    const Clock::time_point t0 = Clock::now();
    step->shared_status = core->model->SharedExperts(step->il, *step->h, &step->shared);
    step->moe_shared_us = MicrosSince(t0);
    step->prof.layers[step->il].shared_us += step->moe_shared_us;
    Post(me, step->step, kSharedDone);
  });
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
    if (!seen.insert(slice.seq).second) {
      status = absl::InvalidArgumentError(
          absl::StrCat("sequence ", slice.seq, " appears twice in step ", request.step));
      continue;
    }
    if (slice.tokens.empty()) {
      status = absl::InvalidArgumentError(
          absl::StrCat("sequence ", slice.seq, ": empty token slice in step ", request.step));
      continue;
    }
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
  st.config.arena->Submit([core = st.core, step, me] { RunLayers(core, step, me); });
}

attention_actor::behavior_type AttentionBehavior(AttentionPointer self, AttentionConfig config,
                                                 std::shared_ptr<Core> core) {
  self->state.config = std::move(config);
  self->state.core = std::move(core);
  if (self->state.config.router) self->monitor(self->state.config.router);
  self->set_down_handler([self](caf::down_msg& msg) {
    AttentionState& st = self->state;
    if (msg.source != caf::actor_cast<caf::actor_addr>(st.config.router)) return;
    st.router_down = caf::to_string(msg.reason);
    if (st.current) {
      for (const std::shared_ptr<LateWork>& late : st.current->late_flight) {
        for (int j = 0; j < 2; ++j) {
          if (!late->sent[j] || late->done[j]) continue;
          late->done[j] = true;
          late->status[j] =
              absl::UnavailableError(absl::StrCat("the router is down (", st.router_down, ")"));
        }
      }
      MaybeJoinAttention(self);
    }
    if (st.current && st.waiting_moe) {
      st.waiting_moe = false;
      st.current->moe_status =
          absl::UnavailableError(absl::StrCat("the router is down (", st.router_down, ")"));
      st.current->moe_done = true;
      MaybeCombine(self);
    }
  });
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
        switch (stage) {
          case kMoeReady: OnMoeReady(self); break;
          case kSharedDone:
            st.current->shared_done = true;
            MaybeCombine(self);
            break;
          case kStepDone: FinishStep(self); break;
          case kLateAttention:
            st.current->waiting_late_attention = true;
            MaybeJoinAttention(self);
            break;
          default: break;
        }
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
  return system.spawn(AttentionBehavior, std::move(config), std::move(core));
}

}  // namespace ktx::actors
