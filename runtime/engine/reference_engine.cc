#include "runtime/engine/reference_engine.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/sampler/stop_strings.h"
#include "runtime/tokenizer/streaming_detokenizer.h"
#include "runtime/tokenizer/tokenizer_gguf.h"

namespace ktx::engine {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

const char* StopReasonName(StopReason reason) {
  switch (reason) {
    case StopReason::kEndOfGeneration: return "eos";
    case StopReason::kMaxTokens: return "max_tokens";
    case StopReason::kStopString: return "stop_string";
    case StopReason::kContextFull: return "context_full";
    case StopReason::kCancelled: return "cancelled";
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<ReferenceEngine>> ReferenceEngine::Open(
    const std::string& model_path, const EngineOptions& options) {
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<models::Deepseek2Model> model,
                       models::Deepseek2Model::Open(model_path));
  return Create(std::move(model), options);
}

absl::StatusOr<std::unique_ptr<ReferenceEngine>> ReferenceEngine::Create(
    std::unique_ptr<models::Deepseek2Model> model, const EngineOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("no model");
  if (options.n_ctx < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_ctx = ", options.n_ctx, " must be >= 0 (0: the model's context)"));
  }
  if (options.prefill_chunk < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefill_chunk = ", options.prefill_chunk, " must be >= 0 (0: one batch)"));
  }
  std::unique_ptr<ReferenceEngine> engine(new ReferenceEngine());
  engine->options_ = options;
  engine->n_ctx_ = options.n_ctx == 0 ? model->hparams().n_ctx_train : options.n_ctx;
  engine->tokenizer_ = tokenizer::TokenizerFromGguf(model->file().metadata());
  if (engine->tokenizer_.ok() && engine->tokenizer_->n_vocab() > model->n_vocab()) {
    engine->tokenizer_ = absl::InvalidArgumentError(
        absl::StrCat("the tokenizer has ", engine->tokenizer_->n_vocab(),
                     " tokens but the model's vocabulary has ", model->n_vocab()));
  }
  engine->model_ = std::move(model);
  return engine;
}

absl::StatusOr<const tokenizer::Tokenizer*> ReferenceEngine::tokenizer() const {
  if (!tokenizer_.ok()) {
    return absl::Status(
        tokenizer_.status().code(),
        absl::StrCat("the model has no usable tokenizer: ", tokenizer_.status().message()));
  }
  return &*tokenizer_;
}

absl::StatusOr<std::vector<int32_t>> ReferenceEngine::TokenizePrompt(
    const GenerateRequest& request) const {
  KTX_ASSIGN_OR_RETURN(const tokenizer::Tokenizer* tok, tokenizer());
  if (!request.chat) {
    if (!request.system.empty()) {
      return absl::InvalidArgumentError("a system message needs chat mode");
    }
    if (request.force_think.has_value()) {
      return absl::InvalidArgumentError("force_think needs chat mode");
    }
    return tok->Tokenize(request.prompt);
  }
  KTX_ASSIGN_OR_RETURN(
      const tokenizer::ChatTemplate chat,
      tokenizer::ChatTemplateFromGguf(model_->file().metadata(), options_.chat_template));
  std::vector<tokenizer::ChatMessage> messages;
  if (!request.system.empty()) messages.push_back({"system", request.system});
  messages.push_back({"user", request.prompt});
  tokenizer::ChatOptions chat_options;
  chat_options.force_think = request.force_think;
  KTX_ASSIGN_OR_RETURN(const std::vector<tokenizer::ChatSegment> segments,
                       chat.ApplySegments(messages, chat_options));
  tokenizer::TokenizeOptions options;
  options.parse_special = false;  // message contents are untrusted text
  return tokenizer::TokenizeChat(*tok, segments, options);
}

absl::Status ReferenceEngine::CheckPolicy(const models::RoutingPolicy* policy) const {
  if (policy == nullptr) return absl::OkStatus();
  return policy->Validate(model_->hparams().n_layer, model_->hparams().n_expert_used);
}

absl::Status ReferenceEngine::Prefill(std::span<const int32_t> tokens, kv_cache::SequenceKv* kv,
                                      models::LogitsRows rows,
                                      const models::ForwardOptions& forward,
                                      std::vector<float>* logits) const {
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t chunk = options_.prefill_chunk == 0 ? n : options_.prefill_chunk;
  models::Activations out;
  for (int64_t begin = 0; begin < n; begin += chunk) {
    const int64_t len = std::min(chunk, n - begin);
    const bool last = begin + len == n;
    const models::LogitsRows chunk_rows =
        rows == models::LogitsRows::kAll ? models::LogitsRows::kAll : models::LogitsRows::kLast;
    KTX_RETURN_IF_ERROR(model_->Forward(tokens.subspan(begin, len), kv, chunk_rows, &out, forward));
    if (rows == models::LogitsRows::kAll) {
      logits->insert(logits->end(), out.values().begin(), out.values().end());
    } else if (last) {
      logits->assign(out.values().begin(), out.values().end());
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> ReferenceEngine::Logits(std::span<const int32_t> tokens,
                                                           const models::RoutingPolicy* policy) {
  if (tokens.empty()) return absl::InvalidArgumentError("no tokens to compute logits for");
  KTX_RETURN_IF_ERROR(CheckPolicy(policy));
  models::ForwardOptions forward;
  forward.policy = policy;
  KTX_ASSIGN_OR_RETURN(
      std::unique_ptr<kv_cache::SequenceKv> kv,
      kv_cache::SequenceKv::Create(model_->kv_layout(), static_cast<int64_t>(tokens.size())));
  std::vector<float> logits;
  logits.reserve(tokens.size() * model_->n_vocab());
  KTX_RETURN_IF_ERROR(Prefill(tokens, kv.get(), models::LogitsRows::kAll, forward, &logits));
  return logits;
}

absl::StatusOr<GenerateResult> ReferenceEngine::Generate(const GenerateRequest& request,
                                                         const TextCallback& on_text) {
  KTX_ASSIGN_OR_RETURN(const std::vector<int32_t> ids, TokenizePrompt(request));
  return GenerateFromTokens(ids, request, on_text);
}

absl::StatusOr<GenerateResult> ReferenceEngine::GenerateFromTokens(
    std::span<const int32_t> prompt_tokens, const GenerateRequest& request,
    const TextCallback& on_text) {
  KTX_ASSIGN_OR_RETURN(const tokenizer::Tokenizer* tok, tokenizer());
  if (prompt_tokens.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  if (request.max_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens = ", request.max_tokens, " must be positive"));
  }
  const int64_t n_prompt = static_cast<int64_t>(prompt_tokens.size());
  if (n_prompt >= n_ctx_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the prompt has ", n_prompt, " tokens; the context holds ", n_ctx_,
                     " (prompt + at least one generated token); raise the context size (n_ctx)"));
  }
  KTX_RETURN_IF_ERROR(CheckPolicy(request.routing_policy.get()));
  models::ForwardOptions forward;
  forward.policy = request.routing_policy.get();
  KTX_ASSIGN_OR_RETURN(sampler::Sampler sampler, sampler::Sampler::Create(request.sampling));
  KTX_ASSIGN_OR_RETURN(sampler::StopStringMatcher stops,
                       sampler::StopStringMatcher::Create(request.stop));
  const int64_t capacity = std::min<int64_t>(n_ctx_, n_prompt + request.max_tokens);
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<kv_cache::SequenceKv> kv,
                       kv_cache::SequenceKv::Create(model_->kv_layout(), capacity));

  GenerateResult result;
  result.prompt_tokens.assign(prompt_tokens.begin(), prompt_tokens.end());
  sampler.AcceptPrompt(prompt_tokens);
  tokenizer::StreamingDetokenizer detok(*tok);
  bool cancelled = false;
  auto emit = [&](std::string_view text) {
    if (text.empty() || cancelled) return;
    result.text.append(text);
    if (on_text && !on_text(text)) cancelled = true;
  };

  const auto t0 = Clock::now();
  std::vector<float> logits;
  KTX_RETURN_IF_ERROR(
      Prefill(prompt_tokens, kv.get(), models::LogitsRows::kLast, forward, &logits));
  const auto t1 = Clock::now();
  result.prefill_seconds = Seconds(t0, t1);

  const int64_t n_vocab = model_->n_vocab();
  bool stopped = false;
  models::Activations out;
  while (true) {
    const int32_t token = sampler.Sample(logits.data(), n_vocab);
    result.tokens.push_back(token);
    if (tok->IsEndOfGeneration(token)) {
      result.stop_reason = StopReason::kEndOfGeneration;
      break;
    }
    if (!tok->IsValidId(token)) {
      return absl::InternalError(
          absl::StrCat("sampled token ", token, " is outside the tokenizer's vocabulary"));
    }
    KTX_ASSIGN_OR_RETURN(const std::string piece, detok.Push(token));
    sampler::StopStringMatcher::Result r = stops.Feed(piece);
    emit(r.emit);
    if (r.stopped) {
      result.stop_reason = StopReason::kStopString;
      stopped = true;
      break;
    }
    if (cancelled) {
      result.stop_reason = StopReason::kCancelled;
      break;
    }
    if (static_cast<int64_t>(result.tokens.size()) >= request.max_tokens) {
      result.stop_reason = StopReason::kMaxTokens;
      break;
    }
    if (kv->length() >= n_ctx_) {
      result.stop_reason = StopReason::kContextFull;
      break;
    }
    const int32_t one[] = {token};
    KTX_RETURN_IF_ERROR(model_->Forward(one, kv.get(), models::LogitsRows::kLast, &out, forward));
    ++result.n_decode_passes;
    logits.assign(out.values().begin(), out.values().end());
  }
  if (!stopped && !cancelled) {
    // The end of the text: the detokenizer's held-back bytes, then whatever the
    // stop matcher still holds.
    sampler::StopStringMatcher::Result r = stops.Feed(detok.Finish());
    emit(r.emit);
    if (r.stopped) {
      result.stop_reason = StopReason::kStopString;
    } else {
      emit(stops.Flush());
    }
  }
  result.decode_seconds = Seconds(t1, Clock::now());
  KTX_LOG(DEBUG, "engine") << "prompt " << n_prompt << " tokens in " << result.prefill_seconds
                           << " s, " << result.tokens.size() << " generated ("
                           << StopReasonName(result.stop_reason) << ")";
  return result;
}

}  // namespace ktx::engine
