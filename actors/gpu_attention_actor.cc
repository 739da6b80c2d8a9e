#include "actors/gpu_attention_actor.h"

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

#if KTX_ACTORS_CUDA

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "actors/cpu_arena.h"
#include "actors/moe_client.h"
#include "actors/moe_combine.h"
#include "actors/remote/wire_dtype.h"
#include "actors/status_bridge.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/after.hpp"
#include "caf/scoped_actor.hpp"
#include "caf/send.hpp"
#include "caf/stateful_actor.hpp"
#include "caf/system_messages.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "caf/typed_response_promise.hpp"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"
#include "runtime/gpu/cuda_buffers.h"
#include "runtime/gpu/cuda_deepseek2.h"
#include "runtime/models/parallel_copy.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;
using models::Activations;

constexpr int32_t kStepDone = 3;  // the step's job is done (same value as the CPU actor's)

int64_t Micros(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration_cast<std::chrono::microseconds>(to - from).count();
}

// Shared by the actor and its running job (the job may outlive the actor).
struct Core {
  std::shared_ptr<const models::Deepseek2Model> model;  // outlives `gpu` (member order)
  std::unique_ptr<gpu::CudaDeepseek2> gpu;
  caf::actor_system* system = nullptr;
  router_actor router;
  int device = 0;
  bool bf16_expert_input = false;
  int n_shards = 0;
  MoeClient::Options moe;  // GpuAttentionOptions::moe_deadline, AttentionConfig::moe_spin_us
  // F32 [n, n_embd] the routed experts' input of the MoE layer in flight, reused
  // while no shard or router still holds it (use_count 1): jobs run one at a
  // time on the arena, and each waits for its layer's answer.
  std::shared_ptr<models::Activations> expert_input;
};

// One step in flight. The actor fills it before the job starts and reads it
// after the job posted kStepDone; in between only the job touches it.
struct Step {
  uint64_t step = 0;
  std::vector<StepSlice> slices;
  std::vector<gpu::SequenceId> ids;  // [slices] GPU sequence of each valid slice
  std::vector<int> active;           // slices that go to the GPU, ascending
  std::vector<absl::Status> status;  // [slices]
  std::vector<Tensor> logits;        // [slices]
  Clock::time_point start;
  StepProfile prof;
};

// The hooks of one ForwardBatch: the routed experts of each MoE layer (and
// any deferred ones) through the router, from the arena thread, with the
// shared MoeClient (tags, router monitor, deadline, adaptive polling).
class GpuMoeHooks {
 public:
  GpuMoeHooks(Core& core, Step& step, std::vector<int64_t> row_begin,
              std::vector<int64_t> row_count)
      : core_(core),
        step_(step),
        row_begin_(std::move(row_begin)),
        row_count_(std::move(row_count)),
        client_(*core.system, core.router, core.moe),
        last_(Clock::now()) {
    any_policy_ = core_.model->routing_policy() != nullptr;
    may_defer_ = any_policy_ && core_.model->routing_policy()->HasDeferral();
    for (size_t i = 0; i < step_.active.size(); ++i) {
      const models::RoutingPolicy* policy = step_.slices[step_.active[i]].routing_policy.get();
      any_policy_ = any_policy_ || policy != nullptr;
      may_defer_ = may_defer_ || (policy != nullptr && policy->HasDeferral());
      row_policies_.push_back({row_begin_[i], row_begin_[i] + row_count_[i], policy});
    }
  }

  absl::Status RoutedExperts(int il, const Activations& h, const models::Routing& routing,
                             Activations* routed) {
    KTX_RETURN_IF_ERROR(StartRoutedExperts(il, h.data(), h.n_tokens(), h.n_cols(), routing));
    return FinishRoutedExperts(il, routed);
  }

  // The CPU's part of layer il goes to the router (or the lane) now; h (F32
  // [n, n_embd]) is copied into the shards' input buffer and the routing into
  // the request, so neither is read after this returns. One start at a time.
  absl::Status StartRoutedExperts(int il, const float* h, int64_t n, int64_t n_embd,
                                  const models::Routing& routing) {
    if (started_.il >= 0) {
      return absl::InternalError(absl::StrCat(
          "routed experts of layer ", il, " started while layer ", started_.il, " is still out"));
    }
    Started st;
    st.t_ready = Clock::now();
    step_.prof.layers[il].attention_us += Micros(last_, st.t_ready);
    st.n = n;
    st.n_embd = n_embd;
    MoeWork work;
    work.il = il;
    work.h = ExpertInput(il, h, n, n_embd);
    st.t_input = Clock::now();
    // The slices' policies were applied by AdjustRouting, before the GPU took
    // its experts: `routing` is the CPU's part.
    work.n_expert_used = routing.n_expert_used;
    work.expert_ids = routing.expert_ids;
    work.weights = routing.weights;
    {
      const int64_t n_expert = core_.model->hparams().n_expert;
      std::vector<uint8_t> used(static_cast<size_t>(std::max<int64_t>(n_expert, 0)), 0);
      for (int32_t e : work.expert_ids) {
        if (e >= 0 && e < n_expert) used[e] = 1;
      }
      step_.prof.layers[il].distinct_experts =
          static_cast<int32_t>(std::count(used.begin(), used.end(), 1));
    }
    absl::StatusOr<uint64_t> ticket = client_.Send(std::move(work));
    if (!ticket.ok()) return MoeError(ticket.status(), absl::StrCat("layer ", il));
    st.ticket = *ticket;
    st.il = il;
    st.t_sent = Clock::now();
    started_ = st;
    return absl::OkStatus();
  }

  // Waits for the part StartRoutedExperts sent for layer il and places the
  // shards' partials into *routed (F32 [n, n_embd]).
  absl::Status FinishRoutedExperts(int il, Activations* routed) {
    if (started_.il == il) routed->ResizeForOverwrite(started_.n, started_.n_embd);
    return FinishRoutedExpertsInto(il, routed->data(), routed->n_tokens(), routed->n_cols());
  }

  // The same into `routed` (F32 [n, n_embd], the GPU model's pinned buffer:
  // no copy of the batch in between).
  absl::Status FinishRoutedExpertsInto(int il, float* routed, int64_t n, int64_t n_embd) {
    if (started_.il != il) {
      return absl::InternalError(absl::StrCat("routed experts of layer ", il,
                                              " finished without a start (layer ", started_.il,
                                              " is out)"));
    }
    const Started st = started_;
    started_ = Started();
    if (n != st.n || n_embd != st.n_embd) {
      return absl::InternalError(absl::StrCat("routed experts of layer ", il, ": output [", n, ", ",
                                              n_embd, "] for a batch of [", st.n, ", ", st.n_embd,
                                              "]"));
    }
    LayerTiming& timing = step_.prof.layers[il];
    // This layer's deferred experts go out right behind its immediate ones.
    KTX_RETURN_IF_ERROR(FlushLate());
    const Clock::time_point t_wait = Clock::now();
    absl::StatusOr<MoeResult> result = client_.Wait(st.ticket);
    if (!result.ok()) return MoeError(result.status(), absl::StrCat("layer ", il));
    const Clock::time_point t_result = Clock::now();
    PlaceInto(*result, st.n, st.n_embd, routed);
    const int64_t moe_us = Micros(st.t_ready, t_result);
    const std::vector<int64_t> shard_us = ShardComputeUs(result->parts, core_.n_shards);
    int64_t critical = 0;
    for (size_t s = 0; s < shard_us.size(); ++s) {
      critical = std::max(critical, shard_us[s]);
      if (s < timing.shard_us.size()) timing.shard_us[s] += shard_us[s];
    }
    timing.moe_us += moe_us;
    timing.experts_us += critical;
    timing.dispatch_us += std::max<int64_t>(0, moe_us - critical);
    last_ = Clock::now();
    timing.combine_us += Micros(t_result, last_);
    if (core_.gpu->stage_times()) {  // with CudaDeepseek2's stage lines: the hook's parts
      KTX_LOG(INFO, "gpu_attention") << absl::StrFormat(
          "routed experts of layer %d, %lld tokens: input copy %.2f ms, send %.2f ms, GPU's "
          "share enqueued in %.2f ms, wait %.2f ms (slowest shard job %.2f ms), place %.2f ms",
          il, static_cast<long long>(st.n), Micros(st.t_ready, st.t_input) * 1e-3,
          Micros(st.t_input, st.t_sent) * 1e-3, Micros(st.t_sent, t_wait) * 1e-3,
          Micros(t_wait, t_result) * 1e-3, critical * 1e-3, Micros(t_result, last_) * 1e-3);
    }
    return absl::OkStatus();
  }

  // The GPU routed the batch full: each slice's top-k policy (or the model's),
  // by the function the CPU attention actor uses too, on the full routing
  // before CudaDeepseek2 splits it between its GPU experts and this hook.
  // Without any policy the routing stays bitwise as routed.
  absl::Status AdjustRouting(int il, models::Routing* routing) const {
    if (!any_policy_) return absl::OkStatus();
    models::ApplyRoutingPolicies(core_.model->hparams().routing(), il, row_policies_,
                                 core_.model->routing_policy(), routing);
    return absl::OkStatus();
  }

  // Expert deferral: each slice's (or the model's) deferral on the adjusted
  // routing, as the CPU attention actor does.
  absl::StatusOr<models::DeferredCount> SplitDeferred(int il, models::Routing* routing,
                                                      models::Routing late[2]) {
    if (!may_defer_) return models::DeferredCount{};
    const models::DeferredCount count =
        models::SplitDeferredRows(il, core_.model->hparams().n_layer, row_policies_,
                                  core_.model->routing_policy(), routing, late);
    step_.prof.layers[il].deferred_entries += count.total();
    return count;
  }

  // Queues layer il's deferred entries for `join`; they are sent right after
  // the layer's immediate experts (RoutedExperts), or at the join when the
  // layer sent none to the router.
  absl::Status SendDeferred(int il, models::DeferJoin join, const Activations& h,
                            const models::Routing& routing) {
    Late late;
    late.il = il;
    late.join = join;
    late.h = ExpertInput(il, h.data(), h.n_tokens(), h.n_cols());
    late.routing = routing;
    late_.push_back(std::move(late));
    return absl::OkStatus();
  }

  absl::Status JoinDeferred(int il, models::DeferJoin join, Activations* out) {
    KTX_RETURN_IF_ERROR(FlushLate());
    auto it = std::find_if(late_.begin(), late_.end(), [&](const Late& late) {
      return late.il == il && late.join == join && late.ticket != 0;
    });
    if (it == late_.end()) {
      return absl::InternalError(
          absl::StrCat("expert deferral: deferred experts of layer ", il, " were never sent"));
    }
    const uint64_t ticket = it->ticket;
    const int64_t n = it->h.n_rows();
    const int64_t n_embd = it->h.n_cols();
    late_.erase(it);
    const Clock::time_point t0 = Clock::now();
    absl::StatusOr<MoeResult> result = client_.Wait(ticket);
    const int64_t wait_us = Micros(t0, Clock::now());
    if (il + 1 < static_cast<int>(step_.prof.layers.size())) {
      step_.prof.layers[il + 1].late_wait_us += wait_us;
    }
    if (!result.ok()) {
      return MoeError(result.status(), absl::StrCat("deferred experts of layer ", il));
    }
    Place(*result, n, n_embd, out);
    return absl::OkStatus();
  }

  Clock::time_point last() const { return last_; }
  bool may_defer() const { return may_defer_; }

 private:
  struct Late {
    int il = 0;
    models::DeferJoin join = models::DeferJoin::kNextMoe;
    Tensor h;
    models::Routing routing;
    uint64_t ticket = 0;  // once sent
  };

  // The experts' input of layer il from h (F32 [n, n_embd]), shared with the
  // shards (never copied again); one copy per layer, deferred experts included.
  Tensor ExpertInput(int il, const float* h, int64_t n, int64_t n_embd) {
    if (input_il_ == il) return input_;
    // The shards read it asynchronously: a buffer of its own (reused when
    // nobody holds an earlier layer's any more: no page faults per layer).
    input_ = Tensor();
    if (core_.expert_input == nullptr || core_.expert_input.use_count() != 1) {
      core_.expert_input = std::make_shared<Activations>();
    }
    Activations& copy = *core_.expert_input;
    copy.ResizeForOverwrite(n, n_embd);
    models::ParallelCopy(copy.data(), h, static_cast<size_t>(n * n_embd) * sizeof(float));
    if (core_.bf16_expert_input) {
      float* v = copy.data();
      for (int64_t i = 0; i < n * n_embd; ++i) v[i] = RoundToWireBf16(v[i]);
    }
    input_ = Tensor(std::shared_ptr<const Activations>(core_.expert_input));
    input_il_ = il;
    return input_;
  }

  absl::Status FlushLate() {
    for (Late& late : late_) {
      if (late.ticket != 0) continue;
      MoeWork work;
      work.il = late.il;
      work.h = late.h;
      work.n_expert_used = late.routing.n_expert_used;
      work.expert_ids = std::move(late.routing.expert_ids);
      work.weights = std::move(late.routing.weights);
      late.routing = models::Routing();
      absl::StatusOr<uint64_t> ticket = client_.Send(std::move(work));
      if (!ticket.ok()) {
        return MoeError(ticket.status(), absl::StrCat("deferred experts of layer ", late.il));
      }
      late.ticket = *ticket;
    }
    return absl::OkStatus();
  }

  // The router's answer as F32 [n, n_embd] in *out: partials summed in its
  // fixed order; rows it could not serve fail their slices and get zeros.
  void Place(const MoeResult& result, int64_t n, int64_t n_embd, Activations* out) {
    out->ResizeForOverwrite(n, n_embd);
    PlaceInto(result, n, n_embd, out->data());
  }

  // The shards' partials summed into out (F32 [n, n_embd]: CudaDeepseek2's
  // reused host buffer, or its pinned one), failed rows zero and their
  // slices failed.
  void PlaceInto(const MoeResult& result, int64_t n, int64_t n_embd, float* out) {
    if (!result.failed_rows.empty()) {
      for (int i : SlicesOwningRows(result.failed_rows, row_begin_, row_count_)) {
        absl::Status& status = step_.status[step_.active[i]];
        if (status.ok()) status = ToStatus(result.code, result.message);
      }
    }
    SumPlacedPartialsInto(result.parts, n, n_embd, out);
    for (int32_t row : result.failed_rows) {
      if (row >= 0 && row < n) std::fill(out + row * n_embd, out + (row + 1) * n_embd, 0.0f);
    }
  }

  // A failed wait for the router as the step's error: the router's own
  // conditions (no router, router down) as they are, the rest naming `what`.
  static absl::Status MoeError(const absl::Status& status, const std::string& what) {
    if (status.code() == absl::StatusCode::kFailedPrecondition ||
        (status.code() == absl::StatusCode::kUnavailable &&
         absl::StartsWith(status.message(), "the router is down"))) {
      return status;
    }
    return absl::Status(status.code(), absl::StrCat("router, ", what, ": ", status.message()));
  }

  // The part StartRoutedExperts sent and FinishRoutedExperts waits for.
  struct Started {
    int il = -1;  // -1: none out
    uint64_t ticket = 0;
    int64_t n = 0, n_embd = 0;
    Clock::time_point t_ready, t_input, t_sent;
  };
  Started started_;
  Core& core_;
  Step& step_;
  const std::vector<int64_t> row_begin_;  // [active] first batch row of each active slice
  const std::vector<int64_t> row_count_;  // [active]
  MoeClient client_;
  Clock::time_point last_;   // when the previous hook returned (or the job began)
  bool any_policy_ = false;  // a slice or the model has a routing policy
  bool may_defer_ = false;   // one of them defers experts
  std::vector<models::RowPolicy> row_policies_;  // [active] each slice's rows and policy
  Tensor input_;                                 // the experts' input of layer input_il_
  int input_il_ = -1;
  std::vector<Late> late_;  // deferred experts queued or out, not yet joined
};

void Post(const attention_actor& me, uint64_t step) {
  caf::anon_send(me, stage_atom::value, step, kStepDone);
}

// The job: one ForwardBatch over the active slices, commits, logits per slice.
void RunStep(const std::shared_ptr<Core>& core, const std::shared_ptr<Step>& step,
             const attention_actor& me) {
  Step& st = *step;
  const int64_t n_vocab = core->model->hparams().n_vocab;
  std::vector<gpu::CudaDeepseek2::BatchEntry> entries;
  std::vector<int64_t> row_begin, row_count;
  int64_t n_rows = 0;
  for (int s : st.active) {
    const StepSlice& slice = st.slices[s];
    const bool all = static_cast<SliceLogits>(slice.logits) == SliceLogits::kAll;
    entries.push_back(
        {st.ids[s], slice.tokens, all ? models::LogitsRows::kAll : models::LogitsRows::kLast});
    row_begin.push_back(n_rows);
    row_count.push_back(static_cast<int64_t>(slice.tokens.size()));
    n_rows += static_cast<int64_t>(slice.tokens.size());
  }
  st.prof.n_rows = n_rows;
  absl::Status status = gpu::CudaOk(cudaSetDevice(core->device), "cudaSetDevice");
  Clock::time_point last = Clock::now();
  Activations logits;
  {
    GpuMoeHooks client(*core, st, row_begin, row_count);
    gpu::CudaDeepseek2::ForwardHooks hooks;
    hooks.commit = false;
    hooks.routed_experts = [&client](int il, const Activations& h, const models::Routing& routing,
                                     Activations* routed) {
      return client.RoutedExperts(il, h, routing, routed);
    };
    hooks.start_routed_experts = [&client](int il, const float* h, int64_t n, int64_t n_embd,
                                           const models::Routing& routing) {
      return client.StartRoutedExperts(il, h, n, n_embd, routing);
    };
    hooks.finish_routed_experts = [&client](int il, float* routed, int64_t n, int64_t n_embd) {
      return client.FinishRoutedExpertsInto(il, routed, n, n_embd);
    };
    hooks.adjust_routing = [&client](int il, models::Routing* routing) {
      return client.AdjustRouting(il, routing);
    };
    if (client.may_defer()) {
      hooks.split_deferred = [&client](int il, models::Routing* routing, models::Routing late[2]) {
        return client.SplitDeferred(il, routing, late);
      };
      hooks.send_deferred = [&client](int il, models::DeferJoin join, const Activations& h,
                                      const models::Routing& routing) {
        return client.SendDeferred(il, join, h, routing);
      };
      hooks.join_deferred = [&client](int il, models::DeferJoin join, Activations* late) {
        return client.JoinDeferred(il, join, late);
      };
    } else {
      // No slice defers: the model's own deferral must not apply either.
      hooks.split_deferred = [](int, models::Routing*, models::Routing*) {
        return absl::StatusOr<models::DeferredCount>(models::DeferredCount{});
      };
    }
    if (status.ok()) status = core->gpu->ForwardBatch(entries, &logits, hooks);
    last = client.last();
  }
  if (!status.ok()) {
    for (int s : st.active) {
      if (st.status[s].ok()) st.status[s] = status;
    }
  } else {
    int64_t row = 0;
    for (int s : st.active) {
      const StepSlice& slice = st.slices[s];
      const auto want = static_cast<SliceLogits>(slice.logits);
      const int64_t n_out =
          want == SliceLogits::kAll ? static_cast<int64_t>(slice.tokens.size()) : 1;
      if (st.status[s].ok()) {
        if (want != SliceLogits::kNone) {
          Activations out(n_out, n_vocab);
          std::memcpy(out.data(), logits.row(row), sizeof(float) * n_out * n_vocab);
          st.logits[s] = Tensor::Wrap(std::move(out));
        }
        st.status[s] = core->gpu->Commit(st.ids[s], static_cast<int64_t>(slice.tokens.size()));
      }
      row += n_out;
    }
  }
  st.prof.head_us += Micros(last, Clock::now());
  Post(me, st.step);
}

struct SeqInfo {
  gpu::SequenceId id = -1;
  int64_t capacity = 0;
};

struct GpuAttentionState {
  AttentionConfig config;
  std::shared_ptr<Core> core;
  std::shared_ptr<Step> current;
  caf::typed_response_promise<StepResult> promise;
  std::deque<std::pair<StepRequest, caf::typed_response_promise<StepResult>>> queue;
  std::set<uint64_t> deferred_free;  // freed at the end of the running step
  std::map<uint64_t, SeqInfo> ids;   // scheduler seq -> GPU sequence
  KvStats stats;                     // refreshed whenever no step is in flight
  static inline const char* name = "ktx.gpu_attention";
};

using GpuAttentionPointer = attention_actor::stateful_pointer<GpuAttentionState>;

// Only while no job runs (the GPU object is not thread-safe).
void RefreshStats(GpuAttentionState& st) {
  const gpu::PagedKvAllocator& kv = st.core->gpu->kv_allocator();
  const gpu::GpuMemoryPlan& plan = st.core->gpu->memory_plan();
  const uint64_t page_bytes = plan.kv_bytes_per_token * static_cast<uint64_t>(kv.page_size());
  st.stats.budget_bytes = plan.kv_bytes;
  st.stats.used_bytes = static_cast<uint64_t>(kv.n_pages() - kv.free_pages()) * page_bytes;
  st.stats.n_sequences = static_cast<int64_t>(st.ids.size());
  st.stats.free_tokens = kv.free_pages() * kv.page_size();
}

void FreeSequence(GpuAttentionState& st, uint64_t seq) {
  auto it = st.ids.find(seq);
  if (it == st.ids.end()) return;
  (void)st.core->gpu->FreeSequence(it->second.id);
  st.ids.erase(it);
}

void Start(GpuAttentionPointer self, StepRequest request,
           caf::typed_response_promise<StepResult> promise);

void FinishStep(GpuAttentionPointer self) {
  GpuAttentionState& st = self->state;
  std::shared_ptr<Step> step = std::move(st.current);
  st.current.reset();
  StepResult result;
  result.step = step->step;
  result.compute_us = Micros(step->start, Clock::now());
  if (st.config.profile) {
    step->prof.step = step->step;
    step->prof.wall_us = result.compute_us;
    st.config.profile->Add(std::move(step->prof));
  }
  for (size_t s = 0; s < step->slices.size(); ++s) {
    result.slices.push_back(
        MakeSliceResult(step->slices[s].seq, step->status[s], std::move(step->logits[s])));
  }
  st.promise.deliver(std::move(result));
  for (uint64_t seq : st.deferred_free) FreeSequence(st, seq);
  st.deferred_free.clear();
  RefreshStats(st);
  if (!st.queue.empty()) {
    auto next = std::move(st.queue.front());
    st.queue.pop_front();
    Start(self, std::move(next.first), std::move(next.second));
  }
}

// Checks the slices, adds new sequences; the valid ones become `active`.
void Start(GpuAttentionPointer self, StepRequest request,
           caf::typed_response_promise<StepResult> promise) {
  GpuAttentionState& st = self->state;
  gpu::CudaDeepseek2& gpu = *st.core->gpu;
  const models::Deepseek2Hparams& hp = st.core->model->hparams();
  auto step = std::make_shared<Step>();
  step->start = Clock::now();
  step->step = request.step;
  step->slices = std::move(request.slices);
  const size_t n = step->slices.size();
  step->ids.assign(n, -1);
  step->status.assign(n, absl::OkStatus());
  step->logits.resize(n);
  std::set<uint64_t> seen;
  for (size_t s = 0; s < n; ++s) {
    const StepSlice& slice = step->slices[s];
    absl::Status& status = step->status[s];
    status = CheckSliceShape(slice, request.step, &seen);
    if (!status.ok()) continue;
    for (size_t t = 0; t < slice.tokens.size() && status.ok(); ++t) {
      if (slice.tokens[t] < 0 || slice.tokens[t] >= hp.n_vocab) {
        status = absl::OutOfRangeError(
            absl::StrCat("sequence ", slice.seq, ": token ", t, " has id ", slice.tokens[t],
                         ", outside the vocabulary [0, ", hp.n_vocab, ")"));
      }
    }
    if (!status.ok()) continue;
    if (slice.new_capacity > 0) {
      if (st.ids.count(slice.seq)) {
        status = absl::AlreadyExistsError(
            absl::StrCat("sequence ", slice.seq, " already has a KV cache"));
        continue;
      }
      absl::StatusOr<gpu::SequenceId> id = gpu.AddSequence(slice.new_capacity);
      if (!id.ok()) {
        status = absl::Status(id.status().code(), absl::StrCat("sequence ", slice.seq, ": GPU ",
                                                               id.status().message()));
        continue;
      }
      st.ids[slice.seq] = SeqInfo{*id, slice.new_capacity};
    }
    auto it = st.ids.find(slice.seq);
    if (it == st.ids.end()) {
      status = absl::NotFoundError(absl::StrCat("sequence ", slice.seq, " has no KV cache"));
      continue;
    }
    const absl::StatusOr<int64_t> length = gpu.SequenceLength(it->second.id);
    if (!length.ok()) {
      status = length.status();
      continue;
    }
    const int64_t want = *length + static_cast<int64_t>(slice.tokens.size());
    if (want > it->second.capacity) {
      status = absl::ResourceExhaustedError(
          absl::StrCat("sequence ", slice.seq, ": its KV cache holds ", it->second.capacity,
                       " tokens; ", *length, " + ", slice.tokens.size(), " requested"));
      continue;
    }
    step->ids[s] = it->second.id;
    step->active.push_back(static_cast<int>(s));
  }
  step->prof.layers.resize(static_cast<size_t>(hp.n_layer));
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

attention_actor::behavior_type GpuAttentionBehavior(GpuAttentionPointer self,
                                                    AttentionConfig config,
                                                    std::shared_ptr<Core> core) {
  self->state.config = std::move(config);
  self->state.core = std::move(core);
  RefreshStats(self->state);
  return {
      [self](step_atom, StepRequest& request) -> caf::typed_response_promise<StepResult> {
        GpuAttentionState& st = self->state;
        auto promise = self->make_response_promise<StepResult>();
        if (st.current) {
          st.queue.emplace_back(std::move(request), promise);
        } else {
          Start(self, std::move(request), promise);
        }
        return promise;
      },
      [self](kv_free_atom, uint64_t seq) {
        GpuAttentionState& st = self->state;
        if (st.current) {
          st.deferred_free.insert(seq);  // the job uses the GPU object now
          return;
        }
        FreeSequence(st, seq);
        RefreshStats(st);
      },
      [self](kv_stats_atom) { return self->state.stats; },
      [self](stage_atom, uint64_t step, int32_t stage) {
        GpuAttentionState& st = self->state;
        if (!st.current || st.current->step != step || stage != kStepDone) return;
        FinishStep(self);
      },
  };
}

}  // namespace

bool GpuAttentionAvailable() { return true; }

absl::StatusOr<attention_actor> SpawnGpuAttention(caf::actor_system& system, AttentionConfig config,
                                                  GpuAttentionOptions options,
                                                  gpu::GpuMemoryPlan* plan) {
  if (config.model == nullptr || config.arena == nullptr) {
    return absl::InvalidArgumentError("GPU attention actor: no model or no cpu arena");
  }
  if (options.moe_deadline.count() <= 0) {
    return absl::InvalidArgumentError("GPU attention actor: moe_deadline must be positive");
  }
  auto core = std::make_shared<Core>();
  core->model = config.model;
  KTX_ASSIGN_OR_RETURN(core->gpu, gpu::CudaDeepseek2::Create(*config.model, options.gpu));
  if (plan != nullptr) *plan = core->gpu->memory_plan();
  core->system = &system;
  core->router = config.router;
  core->device = options.gpu.device;
  core->bf16_expert_input = config.bf16_expert_input;
  core->n_shards = config.n_shards;
  core->moe.deadline = options.moe_deadline;
  core->moe.spin_us = std::max(config.moe_spin_us, 0);
  core->moe.lane = config.lane;
  return system.spawn(GpuAttentionBehavior, std::move(config), std::move(core));
}

}  // namespace ktx::actors

#else  // !KTX_ACTORS_CUDA

namespace ktx::actors {

bool GpuAttentionAvailable() { return false; }

absl::StatusOr<attention_actor> SpawnGpuAttention(caf::actor_system&, AttentionConfig,
                                                  GpuAttentionOptions options,
                                                  gpu::GpuMemoryPlan*) {
  return absl::FailedPreconditionError(
      absl::StrCat("attention on cuda:", options.gpu.device,
                   " needs the GPU attention actor, but ktx was built without CUDA (configure with "
                   "-DKTX_CUDA=ON on a machine with nvcc)"));
}

}  // namespace ktx::actors

#endif  // KTX_ACTORS_CUDA
