// File: actors/service/generation_service.cc
#include "actors/service/generation_service.h"

#include <algorithm>
#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"
#include "actors/status_bridge.h"
#include "runtime/base/logging.h"
#include "runtime/gguf/fingerprint.h"
#include "runtime/tokenizer/utf8.h"

namespace ktx::service {
namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// What the engine's callbacks hand to the call's thread.
struct StreamEvent {
  int32_t token = -1;  // -1: text held back until the end
  std::string text;
};

// Shared by a Generate call and its engine callbacks (which may outlive the
// call when a cancelled request ends late).
struct StreamState {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<StreamEvent> events;
  bool done = false;
  absl::StatusOr<actors::GenerateResult> result = absl::UnknownError("no result");
  int n_tokens = 0;
  Clock::time_point first_token;
  Clock::time_point last_token;
  std::atomic<bool> stop{false};
};

grpc::Status Draining() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "draining: this node is shutting down and accepts no new requests");
}

}  // namespace

absl::StatusOr<std::unique_ptr<GenerationService>> GenerationService::Create(
    actors::Engine* engine, GenerationServiceOptions options) {
  if (engine == nullptr) return absl::InvalidArgumentError("GenerationService: no engine");
  if (options.max_concurrent <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GenerationService: max_concurrent = ", options.max_concurrent, " must be positive"));
  }
  if (options.cancel_poll.count() <= 0) {
    return absl::InvalidArgumentError("GenerationService: cancel_poll must be positive");
  }
  absl::StatusOr<ServedModel> model = ServedModel::FromModel(
      engine->model(), engine->n_ctx(), options.chat_template, options.model_name);
  if (!model.ok()) return model.status();
  model->fingerprint = options.fingerprint.empty() ? gguf::ModelFingerprint(engine->model().file())
                                                   : options.fingerprint;
  if (!engine->has_tokenizer()) model->tokenizer.reset();  // the engine streams no text then
  return std::unique_ptr<GenerationService>(
      new GenerationService(engine, std::move(options), *std::move(model)));
}

GenerationService::GenerationService(actors::Engine* engine, GenerationServiceOptions options,
                                     ServedModel model)
    : engine_(engine), options_(std::move(options)), model_(std::move(model)) {}

grpc::Status GenerationService::BeginCall(const grpc::ServerContext& context, bool count) {
  if (grpc::Status s = rpc::CheckToken(context, options_.security); !s.ok()) return s;
  if (draining_.load()) return Draining();
  if (!count) return grpc::Status::OK;
  std::lock_guard<std::mutex> lock(mu_);
  if (draining_.load()) return Draining();
  if (counters_.in_flight >= options_.max_concurrent) {
    return grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("too many Generate calls at once: ", counters_.in_flight,
                     " in flight, at most ", options_.max_concurrent, "; retry later"));
  }
  ++counters_.in_flight;
  return grpc::Status::OK;
}

void GenerationService::EndCall() {
  std::lock_guard<std::mutex> lock(mu_);
  --counters_.in_flight;
  if (counters_.in_flight == 0) idle_cv_.notify_all();
}

grpc::Status GenerationService::Generate(grpc::ServerContext* context,
                                         const ktx::v1::GenerateRequest* request,
                                         grpc::ServerWriter<ktx::v1::GenerateResponse>* writer) {
  const Clock::time_point start = Clock::now();
  if (grpc::Status s = BeginCall(*context, /*count=*/true); !s.ok()) return s;
  struct EndGuard {
    GenerationService* self;
    ~EndGuard() { self->EndCall(); }
  } end_guard{this};
  absl::StatusOr<actors::GenerateRequest> engine_request =
      BuildGenerateRequest(model_, options_.limits, *request);
  if (!engine_request.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    ++counters_.failed;
    return ToGrpcStatus(engine_request.status());
  }
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::system_clock::now());
    if (left.count() <= 0) {
      std::lock_guard<std::mutex> lock(mu_);
      ++counters_.cancelled;
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          "the call's deadline passed before generation started");
    }
    engine_request->deadline = left + std::chrono::milliseconds(1);
  }
  return Stream(context, *std::move(engine_request), writer, start);
}

grpc::Status GenerationService::Stream(grpc::ServerContext* context,
                                       actors::GenerateRequest request,
                                       grpc::ServerWriter<ktx::v1::GenerateResponse>* writer,
                                       Clock::time_point start) {
  const int32_t n_prompt = static_cast<int32_t>(request.prompt.size());
  auto state = std::make_shared<StreamState>();
  const Clock::time_point submit = Clock::now();
  const uint64_t id = engine_->GenerateAsync(
      request,
      [state](int32_t token, std::string_view text) {
        std::lock_guard<std::mutex> lock(state->mu);
        if (token >= 0) {
          const Clock::time_point now = Clock::now();
          if (state->n_tokens == 0) state->first_token = now;
          state->last_token = now;
          ++state->n_tokens;
        }
        state->events.push_back({token, std::string(text)});
        state->cv.notify_one();
        return !state->stop.load();
      },
      [state](absl::StatusOr<actors::GenerateResult> result) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->result = std::move(result);
        state->done = true;
        state->cv.notify_one();
      });

  bool client_gone = false;
  bool done = false;
  std::deque<StreamEvent> batch;
  while (!done && !client_gone) {
    {
      std::unique_lock<std::mutex> lock(state->mu);
      state->cv.wait_for(lock, options_.cancel_poll,
                         [&] { return !state->events.empty() || state->done; });
      batch.swap(state->events);
      done = state->done;
    }
    if (!batch.empty()) {
      // Everything that arrived since the last write goes out as one message.
      ktx::v1::GenerateResponse response;
      std::string text;
      for (const StreamEvent& event : batch) {
        text += event.text;
        if (event.token >= 0) response.add_token_ids(event.token);
      }
      batch.clear();
      response.set_text(tokenizer::SanitizeUtf8(text));
      if (!writer->Write(response)) client_gone = true;
    }
    if (!done && context->IsCancelled()) client_gone = true;
  }

  if (client_gone && !done) {
    state->stop.store(true);
    engine_->Cancel(id);
    std::unique_lock<std::mutex> lock(state->mu);
    if (!state->cv.wait_for(lock, options_.cancel_wait, [&] { return state->done; })) {
      KTX_LOG(WARNING, "service") << "request " << id << ": no end " << options_.cancel_wait.count()
                                  << " ms after its cancellation; its KV cache is freed when the "
                                     "engine ends it";
    }
  }
  absl::StatusOr<actors::GenerateResult> result;
  int n_tokens = 0;
  Clock::time_point first_token, last_token;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    result = state->result;
    n_tokens = state->n_tokens;
    first_token = state->first_token;
    last_token = state->last_token;
  }
  const bool deadline_passed = context->deadline() <= std::chrono::system_clock::now();
  if (client_gone) {
    std::lock_guard<std::mutex> lock(mu_);
    ++counters_.cancelled;
    counters_.tokens_generated += n_tokens;
    if (deadline_passed) {
      return grpc::Status(
          grpc::StatusCode::DEADLINE_EXCEEDED,
          absl::StrCat("request ", id, ": the call's deadline passed after ", n_tokens, " tokens"));
    }
    return grpc::Status(
        grpc::StatusCode::CANCELLED,
        absl::StrCat("request ", id, ": cancelled by the client after ", n_tokens, " tokens"));
  }
  if (!result.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    if (result.status().code() == absl::StatusCode::kCancelled ||
        result.status().code() == absl::StatusCode::kDeadlineExceeded) {
      ++counters_.cancelled;
    } else {
      ++counters_.failed;
    }
    counters_.tokens_generated += n_tokens;
    return ToGrpcStatus(result.status());
  }

  const Clock::time_point end = Clock::now();
  ktx::v1::GenerateResponse last;
  last.set_finish_reason(ToProtoFinishReason(result->finish_reason));
  last.mutable_usage()->set_prompt_tokens(n_prompt);
  last.mutable_usage()->set_completion_tokens(static_cast<int32_t>(result->tokens.size()));
  ktx::v1::Timings* timings = last.mutable_timings();
  timings->set_queue_ms(result->queue_ms);
  timings->set_total_ms(Ms(start, end));
  if (n_tokens > 0) {
    timings->set_time_to_first_token_ms(Ms(start, first_token));
    const double prefill_ms = Ms(submit, first_token) - result->queue_ms;
    if (prefill_ms > 0) timings->set_prefill_tokens_per_second(n_prompt / (prefill_ms / 1000.0));
    const double decode_ms = Ms(first_token, last_token);
    if (n_tokens > 1 && decode_ms > 0) {
      timings->set_decode_tokens_per_second((n_tokens - 1) / (decode_ms / 1000.0));
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++counters_.completed;
    counters_.tokens_generated += static_cast<int64_t>(result->tokens.size());
  }
  // The stream's end: if the client is gone now, the tokens were generated
  // anyway; the status below is what it would have seen.
  writer->WriteLast(last, grpc::WriteOptions());
  return grpc::Status::OK;
}

grpc::Status GenerationService::Tokenize(grpc::ServerContext* context,
                                         const ktx::v1::TokenizeRequest* request,
                                         ktx::v1::TokenizeResponse* response) {
  if (grpc::Status s = BeginCall(*context, /*count=*/false); !s.ok()) return s;
  absl::StatusOr<ktx::v1::TokenizeResponse> out =
      service::Tokenize(model_, options_.limits, *request);
  if (!out.ok()) return ToGrpcStatus(out.status());
  *response = *std::move(out);
  return grpc::Status::OK;
}

grpc::Status GenerationService::Detokenize(grpc::ServerContext* context,
                                           const ktx::v1::DetokenizeRequest* request,
                                           ktx::v1::DetokenizeResponse* response) {
  if (grpc::Status s = BeginCall(*context, /*count=*/false); !s.ok()) return s;
  absl::StatusOr<ktx::v1::DetokenizeResponse> out = service::Detokenize(model_, *request);
  if (!out.ok()) return ToGrpcStatus(out.status());
  *response = *std::move(out);
  return grpc::Status::OK;
}

grpc::Status GenerationService::ListModels(grpc::ServerContext* context,
                                           const ktx::v1::ListModelsRequest* request,
                                           ktx::v1::ListModelsResponse* response) {
  if (grpc::Status s = BeginCall(*context, /*count=*/false); !s.ok()) return s;
  *response->add_models() = model_.Info();
  return grpc::Status::OK;
}

void GenerationService::BeginDrain() {
  if (!draining_.exchange(true)) {
    KTX_LOG(INFO, "service") << "Generation: draining (" << in_flight()
                             << " calls in flight; new calls are refused)";
  }
}

int GenerationService::in_flight() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_.in_flight;
}

bool GenerationService::WaitIdle(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_cv_.wait_for(lock, timeout, [this] { return counters_.in_flight == 0; });
}

GenerationCounters GenerationService::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

ktx::v1::RequestLoad GenerationService::Load() const {
  const GenerationCounters c = counters();
  ktx::v1::RequestLoad load;
  load.set_in_flight(c.in_flight);
  load.set_completed(c.completed);
  load.set_failed(c.failed);
  load.set_cancelled(c.cancelled);
  load.set_tokens_generated(c.tokens_generated);
  load.set_max_concurrent(options_.max_concurrent);
  absl::StatusOr<actors::KvCacheStats> kv = engine_->KvStats();
  const int running =
      kv.ok() ? static_cast<int>(std::min<int64_t>(kv->n_sequences, c.in_flight)) : 0;
  load.set_running(running);
  load.set_queued(c.in_flight - running);
  return load;
}

}  // namespace ktx::service
