#include "actors/scheduler_actor.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "actors/status_bridge.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/send.hpp"
#include "caf/spawn_options.hpp"
#include "caf/stateful_actor.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "runtime/base/logging.h"
#include "runtime/sampler/sampler.h"
#include "runtime/sampler/stop_strings.h"
#include "runtime/tokenizer/streaming_detokenizer.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;

int64_t Micros(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::microseconds>(b - a).count();
}

enum class Phase { kWaiting, kPrefill, kDecode };

struct Request {
  GenerateJob job;
  token_sink_actor sink;
  Phase phase = Phase::kWaiting;
  int64_t capacity = 0;     // KV tokens reserved
  int64_t n_prefilled = 0;  // prompt tokens already in the KV cache
  int32_t next_token = -1;  // sampled, to be fed by the next decode slice
  std::optional<sampler::Sampler> sampler;
  std::optional<tokenizer::StreamingDetokenizer> detok;
  std::optional<sampler::StopStringMatcher> stops;
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<float> logits;  // F32 [n_logit_rows, n_vocab]
  int64_t n_logit_rows = 0;
  bool admitted = false;
  bool allocated = false;  // the attention actor was asked to allocate its KV
  bool in_step = false;
  bool cancelled = false;
  bool expired = false;
  Clock::time_point arrival;
  Clock::time_point admitted_at;
};

struct SliceInfo {
  bool prefill = false;
  int64_t n_tokens = 0;
};

struct SchedulerState {
  SchedulerConfig config;
  std::map<uint64_t, Request> requests;
  std::deque<uint64_t> waiting;     // FIFO admission
  std::deque<uint64_t> prefill_rr;  // admitted prompts, round-robin
  std::vector<uint64_t> decoding;   // admission order
  int64_t free_tokens = 0;
  bool step_in_flight = false;
  uint64_t next_step = 1;
  std::map<uint64_t, SliceInfo> in_step;  // seq -> what it does in the in-flight step
  StepLogEntry current_log;
  std::deque<StepLogEntry> log;
  Clock::time_point t0 = Clock::now();
  static inline const char* name = "ktx.scheduler";
};

using SchedulerPointer = scheduler_actor::stateful_pointer<SchedulerState>;

void Erase(std::deque<uint64_t>& q, uint64_t id) {
  q.erase(std::remove(q.begin(), q.end(), id), q.end());
}

void Send(SchedulerPointer self, const token_sink_actor& sink, TokenEvent event) {
  self->send(sink, token_atom::value, std::move(event));
}

// Ends a request: flushes held text (normal ends), sends the outcome, releases
// its KV reservation and its cache.
void Finish(SchedulerPointer self, uint64_t id, const absl::Status& status, FinishReason reason) {
  SchedulerState& st = self->state;
  auto it = st.requests.find(id);
  if (it == st.requests.end()) return;
  Request& r = it->second;
  if (status.ok() && reason != FinishReason::kStopString && r.detok && r.stops) {
    sampler::StopStringMatcher::Result tail = r.stops->Feed(r.detok->Finish());
    std::string emit = std::move(tail.emit);
    if (tail.stopped) {
      reason = FinishReason::kStopString;
    } else {
      emit += r.stops->Flush();
    }
    if (!emit.empty()) {
      r.text += emit;
      Send(self, r.sink, TokenEvent{id, -1, emit});
    }
  }
  GenerateOutcome outcome;
  outcome.id = id;
  outcome.code = static_cast<int32_t>(status.code());
  outcome.message = std::string(status.message());
  outcome.finish_reason = static_cast<int32_t>(status.ok() ? reason : FinishReason::kError);
  if (status.code() == absl::StatusCode::kCancelled) {
    outcome.finish_reason = static_cast<int32_t>(FinishReason::kCancelled);
  }
  outcome.tokens = std::move(r.tokens);
  outcome.text = std::move(r.text);
  if (r.n_logit_rows > 0) {
    models::Activations logits(r.n_logit_rows, st.config.n_vocab);
    std::copy(r.logits.begin(), r.logits.end(), logits.data());
    outcome.logits = Tensor::Wrap(std::move(logits));
  }
  const Clock::time_point now = Clock::now();
  outcome.queue_us = Micros(r.arrival, r.admitted ? r.admitted_at : now);
  outcome.total_us = Micros(r.arrival, now);
  // The KV cache is freed before the sink hears of the end, so that a client
  // that then asks the attention actor for KV statistics sees it freed.
  if (r.admitted) st.free_tokens += r.capacity;
  if (r.allocated) self->send(st.config.attention, kv_free_atom::value, id);
  self->send(r.sink, done_atom::value, std::move(outcome));
  Erase(st.waiting, id);
  Erase(st.prefill_rr, id);
  st.decoding.erase(std::remove(st.decoding.begin(), st.decoding.end(), id), st.decoding.end());
  st.requests.erase(it);
}

// Streams one sampled token; returns why the request ends now, if it does.
FinishReason Emit(SchedulerPointer self, uint64_t id, Request& r, int32_t token) {
  SchedulerState& st = self->state;
  r.tokens.push_back(token);
  const std::vector<int32_t>& stop_ids = r.job.stop_token_ids;
  const bool stop_token =
      std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end() ||
      (r.job.stop_at_eos && st.config.tokenizer && st.config.tokenizer->IsEndOfGeneration(token));
  if (stop_token) {
    Send(self, r.sink, TokenEvent{id, token, ""});
    return FinishReason::kStopToken;
  }
  if (r.detok && r.stops) {
    absl::StatusOr<std::string> piece = r.detok->Push(token);
    sampler::StopStringMatcher::Result res = r.stops->Feed(piece.ok() ? *piece : std::string());
    r.text += res.emit;
    Send(self, r.sink, TokenEvent{id, token, res.emit});
    if (res.stopped) return FinishReason::kStopString;
  } else {
    Send(self, r.sink, TokenEvent{id, token, ""});
  }
  if (static_cast<int64_t>(r.tokens.size()) >= r.job.max_tokens) return FinishReason::kLength;
  // The next decode would feed this token: it needs a free KV row.
  if (static_cast<int64_t>(r.job.prompt.size() + r.tokens.size()) > r.capacity) {
    return FinishReason::kLength;
  }
  return FinishReason::kNone;
}

void AppendLogits(Request& r, const models::Activations& logits, int64_t first_row,
                  int64_t n_rows) {
  const int64_t n_vocab = logits.n_cols();
  r.logits.insert(r.logits.end(), logits.row(first_row), logits.row(first_row) + n_rows * n_vocab);
  r.n_logit_rows += n_rows;
}

void Admit(SchedulerState& st) {
  while (!st.waiting.empty()) {
    const int64_t running = static_cast<int64_t>(st.prefill_rr.size() + st.decoding.size());
    if (running >= st.config.max_running) break;
    Request& r = st.requests.at(st.waiting.front());
    if (r.capacity > st.free_tokens) break;  // FIFO: nobody overtakes the head
    st.free_tokens -= r.capacity;
    r.admitted = true;
    r.admitted_at = Clock::now();
    r.phase = Phase::kPrefill;
    st.prefill_rr.push_back(st.waiting.front());
    st.waiting.pop_front();
  }
}

void OnStepResult(SchedulerPointer self, StepResult& result);
void OnStepError(SchedulerPointer self, const caf::error& error);

void MaybeStep(SchedulerPointer self) {
  SchedulerState& st = self->state;
  if (st.step_in_flight) return;
  Admit(st);
  StepRequest request;
  request.step = st.next_step;
  st.in_step.clear();
  StepLogEntry entry;
  entry.step = request.step;
  for (uint64_t id : st.decoding) {
    Request& r = st.requests.at(id);
    StepSlice slice;
    slice.seq = id;
    slice.tokens = {r.next_token};
    slice.logits = static_cast<int32_t>(SliceLogits::kLast);
    slice.routing_policy = r.job.routing_policy;
    request.slices.push_back(std::move(slice));
    st.in_step[id] = SliceInfo{false, 1};
    r.in_step = true;
    entry.decode_ids.push_back(id);
  }
  if (!st.prefill_rr.empty()) {
    const uint64_t id = st.prefill_rr.front();
    st.prefill_rr.pop_front();
    Request& r = st.requests.at(id);
    const int64_t n_prompt = static_cast<int64_t>(r.job.prompt.size());
    const int64_t chunk = std::min(st.config.prefill_chunk, n_prompt - r.n_prefilled);
    const bool completes = r.n_prefilled + chunk == n_prompt;
    StepSlice slice;
    slice.seq = id;
    slice.tokens.assign(r.job.prompt.begin() + r.n_prefilled,
                        r.job.prompt.begin() + r.n_prefilled + chunk);
    if (!r.allocated) {
      slice.new_capacity = r.capacity;
      r.allocated = true;
    }
    const auto ret = static_cast<ReturnLogits>(r.job.return_logits);
    SliceLogits want = SliceLogits::kNone;
    if (ret == ReturnLogits::kAll) {
      want = SliceLogits::kAll;
    } else if (completes && r.job.max_tokens > 0) {
      want = SliceLogits::kLast;
    }
    slice.logits = static_cast<int32_t>(want);
    slice.routing_policy = r.job.routing_policy;
    request.slices.push_back(std::move(slice));
    st.in_step[id] = SliceInfo{true, chunk};
    r.in_step = true;
    entry.prefill_id = id;
    entry.prefill_tokens = static_cast<int32_t>(chunk);
  }
  if (request.slices.empty()) return;
  st.next_step++;
  st.step_in_flight = true;
  entry.start_us = Micros(st.t0, Clock::now());
  st.current_log = std::move(entry);
  self->request(st.config.attention, st.config.step_deadline, step_atom::value, std::move(request))
      .then([self](StepResult& result) { OnStepResult(self, result); },
            [self](caf::error& error) { OnStepError(self, error); });
}

void LogStep(SchedulerState& st, int32_t code) {
  st.current_log.end_us = Micros(st.t0, Clock::now());
  st.current_log.code = code;
  st.log.push_back(std::move(st.current_log));
  st.current_log = StepLogEntry();
  while (st.log.size() > st.config.step_log_capacity) st.log.pop_front();
}

void OnStepResult(SchedulerPointer self, StepResult& result) {
  SchedulerState& st = self->state;
  st.step_in_flight = false;
  LogStep(st, 0);
  const int64_t n_vocab = st.config.n_vocab;
  for (SliceResult& slice : result.slices) {
    const uint64_t id = slice.seq;
    auto info_it = st.in_step.find(id);
    auto it = st.requests.find(id);
    if (info_it == st.in_step.end() || it == st.requests.end()) continue;
    const SliceInfo info = info_it->second;
    Request& r = it->second;
    r.in_step = false;
    if (r.cancelled) {
      Finish(self, id, absl::CancelledError(absl::StrCat("request ", id, " was cancelled")),
             FinishReason::kCancelled);
      continue;
    }
    if (r.expired) {
      Finish(self, id,
             absl::DeadlineExceededError(absl::StrCat("request ", id, " exceeded its deadline of ",
                                                      r.job.deadline_ms, " ms")),
             FinishReason::kError);
      continue;
    }
    if (slice.code != 0) {
      Finish(self, id, ToStatus(slice.code, slice.message), FinishReason::kError);
      continue;
    }
    const auto ret = static_cast<ReturnLogits>(r.job.return_logits);
    const bool has_logits = !slice.logits.empty() && slice.logits.n_cols() == n_vocab;
    if (info.prefill) {
      r.n_prefilled += info.n_tokens;
      if (ret == ReturnLogits::kAll && has_logits) {
        AppendLogits(r, *slice.logits, 0, slice.logits.n_rows());
      }
      if (r.n_prefilled < static_cast<int64_t>(r.job.prompt.size())) {
        st.prefill_rr.push_back(id);
        continue;
      }
      if (r.job.max_tokens == 0) {
        Finish(self, id, absl::OkStatus(), FinishReason::kLength);
        continue;
      }
    } else if (ret == ReturnLogits::kAll && has_logits) {
      AppendLogits(r, *slice.logits, 0, slice.logits.n_rows());
    }
    if (!has_logits) {
      Finish(self, id,
             absl::InternalError(absl::StrCat("step ", result.step,
                                              " returned no logits for "
                                              "request ",
                                              id)),
             FinishReason::kError);
      continue;
    }
    const int64_t last = slice.logits.n_rows() - 1;
    if (ret == ReturnLogits::kSampled) AppendLogits(r, *slice.logits, last, 1);
    const int32_t token = r.sampler->Sample(slice.logits->row(last), n_vocab);
    const FinishReason reason = Emit(self, id, r, token);
    if (reason != FinishReason::kNone) {
      Finish(self, id, absl::OkStatus(), reason);
      continue;
    }
    r.next_token = token;
    if (r.phase != Phase::kDecode) {
      r.phase = Phase::kDecode;
      st.decoding.push_back(id);
    }
  }
  st.in_step.clear();
  MaybeStep(self);
}

void OnStepError(SchedulerPointer self, const caf::error& error) {
  SchedulerState& st = self->state;
  st.step_in_flight = false;
  const absl::Status inner = FromCafError(error);
  const absl::Status status(inner.code(),
                            absl::StrCat("step ", st.current_log.step,
                                         " failed in the attention actor: ", inner.message()));
  LogStep(st, static_cast<int32_t>(status.code()));
  std::map<uint64_t, SliceInfo> in_step = std::move(st.in_step);
  st.in_step.clear();
  for (const auto& [id, info] : in_step) {
    auto it = st.requests.find(id);
    if (it == st.requests.end()) continue;
    it->second.in_step = false;
    Finish(self, id, status, FinishReason::kError);
  }
  MaybeStep(self);
}

absl::Status Validate(const SchedulerConfig& config, const GenerateJob& job, int64_t* capacity) {
  if (job.prompt.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("request ", job.id, ": empty prompt"));
  }
  for (size_t t = 0; t < job.prompt.size(); ++t) {
    if (job.prompt[t] < 0 || job.prompt[t] >= config.n_vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("request ", job.id, ": prompt token ", t, " has id ", job.prompt[t],
                       ", outside the vocabulary [0, ", config.n_vocab, ")"));
    }
  }
  if (job.max_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("request ", job.id, ": max_tokens = ", job.max_tokens, " is negative"));
  }
  if (job.deadline_ms < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("request ", job.id, ": deadline of ", job.deadline_ms, " ms is negative"));
  }
  if (!job.stop_strings.empty() && !config.tokenizer) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request ", job.id, ": stop strings need a tokenizer, and the model has none"));
  }
  const int64_t n_prompt = static_cast<int64_t>(job.prompt.size());
  if (n_prompt >= config.n_ctx) {
    return absl::InvalidArgumentError(absl::StrCat("request ", job.id, ": the prompt of ", n_prompt,
                                                   " tokens does not fit the context of ",
                                                   config.n_ctx, " tokens"));
  }
  *capacity = std::min<int64_t>(config.n_ctx, n_prompt + job.max_tokens);
  if (*capacity > config.kv_budget_tokens) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request ", job.id, ": needs ", *capacity, " tokens of KV cache (prompt ",
                     n_prompt, " + max_tokens ", job.max_tokens, "), the whole KV budget holds ",
                     config.kv_budget_tokens));
  }
  return absl::OkStatus();
}

void Reject(SchedulerPointer self, const GenerateJob& job, const token_sink_actor& sink,
            const absl::Status& status) {
  GenerateOutcome outcome;
  outcome.id = job.id;
  outcome.code = static_cast<int32_t>(status.code());
  outcome.message = std::string(status.message());
  outcome.finish_reason = static_cast<int32_t>(FinishReason::kError);
  self->send(sink, done_atom::value, std::move(outcome));
}

void HandleGenerate(SchedulerPointer self, GenerateJob& job, const token_sink_actor& sink) {
  SchedulerState& st = self->state;
  const uint64_t id = job.id;
  if (st.requests.count(id)) {
    Reject(self, job, sink,
           absl::AlreadyExistsError(absl::StrCat("request id ", id, " is already in use")));
    return;
  }
  int64_t capacity = 0;
  absl::Status status = Validate(st.config, job, &capacity);
  absl::StatusOr<sampler::Sampler> sampler = sampler::Sampler::Create(job.sampling);
  if (status.ok() && !sampler.ok()) {
    status =
        absl::InvalidArgumentError(absl::StrCat("request ", id, ": ", sampler.status().message()));
  }
  std::optional<sampler::StopStringMatcher> stops;
  if (status.ok() && st.config.tokenizer) {
    absl::StatusOr<sampler::StopStringMatcher> matcher =
        sampler::StopStringMatcher::Create(job.stop_strings);
    if (!matcher.ok()) {
      status = absl::InvalidArgumentError(
          absl::StrCat("request ", id, ": ", matcher.status().message()));
    } else {
      stops.emplace(std::move(*matcher));
    }
  }
  if (!status.ok()) {
    Reject(self, job, sink, status);
    return;
  }
  Request& r = st.requests[id];
  r.job = std::move(job);
  r.sink = sink;
  r.capacity = capacity;
  r.arrival = Clock::now();
  r.sampler.emplace(std::move(*sampler));
  r.sampler->AcceptPrompt(r.job.prompt);
  if (st.config.tokenizer) r.detok.emplace(*st.config.tokenizer);
  r.stops = std::move(stops);
  st.waiting.push_back(id);
  if (r.job.deadline_ms > 0) {
    self->delayed_send(self, std::chrono::milliseconds(r.job.deadline_ms), tick_atom::value, id);
  }
  MaybeStep(self);
}

scheduler_actor::behavior_type SchedulerBehavior(SchedulerPointer self, SchedulerConfig config) {
  SchedulerState& st = self->state;
  st.config = std::move(config);
  st.free_tokens = st.config.kv_budget_tokens;
  st.t0 = Clock::now();
  return {
      [self](generate_atom, GenerateJob& job, const token_sink_actor& sink) {
        HandleGenerate(self, job, sink);
      },
      [self](cancel_atom, uint64_t id) {
        SchedulerState& st = self->state;
        auto it = st.requests.find(id);
        if (it == st.requests.end()) return;
        if (it->second.in_step) {
          it->second.cancelled = true;
          return;
        }
        Finish(self, id, absl::CancelledError(absl::StrCat("request ", id, " was cancelled")),
               FinishReason::kCancelled);
        MaybeStep(self);
      },
      [self](step_log_atom) {
        const std::deque<StepLogEntry>& log = self->state.log;
        return std::vector<StepLogEntry>(log.begin(), log.end());
      },
      [self](tick_atom, uint64_t id) {
        SchedulerState& st = self->state;
        auto it = st.requests.find(id);
        if (it == st.requests.end()) return;
        if (it->second.in_step) {
          it->second.expired = true;
          return;
        }
        Finish(
            self, id,
            absl::DeadlineExceededError(absl::StrCat("request ", id, " exceeded its deadline of ",
                                                     it->second.job.deadline_ms, " ms")),
            FinishReason::kError);
        MaybeStep(self);
      },
  };
}

}  // namespace

scheduler_actor SpawnScheduler(caf::actor_system& system, SchedulerConfig config) {
  return system.spawn<caf::detached>(SchedulerBehavior, std::move(config));
}

}  // namespace ktx::actors
