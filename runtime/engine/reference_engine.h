// File: runtime/engine/reference_engine.h
//
// The reference generation engine: one model (Deepseek2Model, scalar
// reference path), its tokenizer, one sequence at a time. It turns a prompt
// (raw text, or a chat rendered through the model's chat template) into ids,
// prefills them as one batch (or in chunks), then decodes token by token with
// the sampler, streaming text through the streaming detokenizer and the stop
// string matcher to a callback, and stops on end-of-generation tokens (EOS /
// EOT), max_tokens, a stop string or a full context. It reports prefill and
// decode throughput. A Logits API gives the logits of every position of a
// token sequence (what `ktx-ctl logits` writes and what tests compare).
//
//   KTX_ASSIGN_OR_RETURN(auto engine, ReferenceEngine::Open("model.gguf", {}));
//   GenerateRequest request;
//   request.prompt = "Tell me a story";
//   request.sampling.temperature = 0;  // greedy
//   KTX_ASSIGN_OR_RETURN(GenerateResult result, engine->Generate(request,
//       [](std::string_view text) { std::cout << text << std::flush; return true; }));
//   std::cerr << result.decode_tok_s() << " tok/s\n";
//
// Parallelism: the model's stages use the oneTBB pool of the calling thread;
// limit it with tbb::global_control (ktx-ctl --threads does).
// Ownership: owns the model (and through it the GGUF mapping) and a shared
// copy of the tokenizer. Not thread-safe: one Generate/Logits call at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/models/deepseek2.h"
#include "runtime/sampler/sampler.h"
#include "runtime/tokenizer/chat_template.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ktx::engine {

struct EngineOptions {
  // Context per sequence in tokens (prompt + generated); 0 = the model's
  // training context (context_length). Sets the KV cache capacity.
  int64_t n_ctx = 4096;
  // Prefill batch size: the prompt is fed in chunks of at most this many
  // tokens; 0 = the whole prompt as one batch.
  int64_t prefill_chunk = 0;
  // Chat template name ("deepseek-v3", "deepseek-r1"); empty = recognised from
  // the model's tokenizer.chat_template.
  std::string chat_template;
};

struct GenerateRequest {
  std::string prompt;
  // Render {system, user: prompt} through the chat template (message contents
  // are tokenized without parsing special-token text); otherwise the prompt is
  // tokenized as is, special-token text included.
  bool chat = false;
  std::string system;  // system message when chat (empty: none)
  // deepseek-r1 template: open the answer with "<think>\n" (true), never
  // (false), or as the template does by default (nullopt). Needs chat.
  std::optional<bool> force_think;
  int32_t max_tokens = 256;  // > 0
  sampler::SamplingParams sampling;
  std::vector<std::string> stop;  // stop strings (not emitted)
  // This request's routing policy (runtime/models/routing_policy.h: fewer or
  // deferred routed experts); null: the model's (Deepseek2Model::
  // SetRoutingPolicy). Checked against the model (InvalidArgument naming the
  // field).
  std::shared_ptr<const models::RoutingPolicy> routing_policy;
};

enum class StopReason {
  kEndOfGeneration,  // the model produced EOS / EOT (not emitted)
  kMaxTokens,
  kStopString,
  kContextFull,  // the sequence reached n_ctx
  kCancelled,    // the text callback returned false
};
const char* StopReasonName(StopReason reason);

struct GenerateResult {
  std::vector<int32_t> prompt_tokens;
  std::vector<int32_t> tokens;  // generated, including a final EOS/EOT
  std::string text;             // everything streamed to the callback
  StopReason stop_reason = StopReason::kMaxTokens;
  int64_t n_decode_passes = 0;   // single-token forward passes after prefill
  double prefill_seconds = 0.0;  // prompt forward passes
  double decode_seconds = 0.0;   // sampling + decode passes + detokenizing

  double prefill_tok_s() const {
    return prefill_seconds > 0 ? static_cast<double>(prompt_tokens.size()) / prefill_seconds : 0;
  }
  // Decode passes per second (the first token comes from the prefill logits).
  double decode_tok_s() const {
    return decode_seconds > 0 ? static_cast<double>(n_decode_passes) / decode_seconds : 0;
  }
};

// Receives each non-empty piece of generated text (complete UTF-8). Returning
// false cancels the generation (stop reason kCancelled).
using TextCallback = std::function<bool(std::string_view text)>;

class ReferenceEngine {
 public:
  // Opens the model file; the tokenizer and chat template come from its
  // metadata. A model without a usable tokenizer still serves Logits;
  // Generate then fails with the tokenizer's error.
  static absl::StatusOr<std::unique_ptr<ReferenceEngine>> Open(const std::string& model_path,
                                                               const EngineOptions& options);
  static absl::StatusOr<std::unique_ptr<ReferenceEngine>> Create(
      std::unique_ptr<models::Deepseek2Model> model, const EngineOptions& options);

  const models::Deepseek2Model& model() const { return *model_; }
  models::Deepseek2Model& mutable_model() { return *model_; }
  // The tokenizer, or the error that prevented building it.
  absl::StatusOr<const tokenizer::Tokenizer*> tokenizer() const;
  const EngineOptions& options() const { return options_; }
  int64_t n_ctx() const { return n_ctx_; }

  // The prompt ids Generate would use.
  absl::StatusOr<std::vector<int32_t>> TokenizePrompt(const GenerateRequest& request) const;

  // Tokenizes, prefills and decodes (see the file comment). `on_text` may be
  // empty.
  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                          const TextCallback& on_text);
  // The same from prompt ids (request.prompt, chat and system are ignored).
  absl::StatusOr<GenerateResult> GenerateFromTokens(std::span<const int32_t> prompt_tokens,
                                                    const GenerateRequest& request,
                                                    const TextCallback& on_text);

  // Logits of every position of `tokens` run as one fresh sequence (chunked
  // per prefill_chunk): F32 [n_tokens, n_vocab], row-major. `policy`: the
  // routing policy of this call (null: the model's).
  absl::StatusOr<std::vector<float>> Logits(std::span<const int32_t> tokens,
                                            const models::RoutingPolicy* policy = nullptr);

 private:
  ReferenceEngine() = default;
  // Runs `tokens` through the model in chunks; `logits` gets the last row
  // (kLast) or all rows (kAll, appended).
  absl::Status Prefill(std::span<const int32_t> tokens, kv_cache::SequenceKv* kv,
                       models::LogitsRows rows, const models::ForwardOptions& forward,
                       std::vector<float>* logits) const;
  // OK for null, else the policy's Validate against the model.
  absl::Status CheckPolicy(const models::RoutingPolicy* policy) const;

  EngineOptions options_;
  int64_t n_ctx_ = 0;
  std::unique_ptr<models::Deepseek2Model> model_;
  absl::StatusOr<tokenizer::Tokenizer> tokenizer_ = absl::UnknownError("no tokenizer");
};

}  // namespace ktx::engine
