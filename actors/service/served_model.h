// File: actors/service/served_model.h
//
// What the Generation API knows about the model a node serves, and the
// translation of API requests (ktx.v1.GenerateRequest, TokenizeRequest,
// DetokenizeRequest) into engine requests and token ids, with validation.
// Every error a client can cause is INVALID_ARGUMENT with a message that
// starts with the request field at fault, in proto path form:
//
//   "prompt: empty"                       "tokens.ids[3]: id 600 is outside the vocabulary [0,
//   512)" "max_tokens: 0 must be positive"      "sampling.top_p: 1.5 is outside (0, 1]"
//   "chat.messages[1].role: 'tool' is not system, user or assistant"
//
// except a text or chat prompt on a model without tokenizer or chat template
// (FAILED_PRECONDITION naming the field and what is missing).
//
//   KTX_ASSIGN_OR_RETURN(ServedModel served, ServedModel::FromModel(model, n_ctx, {}));
//   KTX_ASSIGN_OR_RETURN(actors::GenerateRequest request,
//                        BuildGenerateRequest(served, RequestLimits{}, api_request));
//
// Ownership and threads: a ServedModel is an immutable value (the tokenizer is
// a shared, immutable state); every function here is const and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "actors/engine.h"
#include "ktx/v1/generation.pb.h"
#include "runtime/models/deepseek2.h"
#include "runtime/tokenizer/chat_template.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ktx::service {

// Bounds on a request beyond what the model imposes.
struct RequestLimits {
  int32_t default_max_tokens = 256;  // when max_tokens is absent (capped by the context)
  int max_stop_strings = 16;
  size_t max_stop_string_bytes = 256;
  int max_stop_token_ids = 64;
  size_t max_prompt_bytes = size_t{8} << 20;  // text, or chat contents summed
  int max_chat_messages = 1024;
};

struct ServedModel {
  std::string name;          // GGUF general.name, else the file name without .gguf
  std::string architecture;  // general.architecture
  std::string fingerprint;   // given by the node ("" when not computed)
  int32_t n_vocab = 0;
  int64_t n_ctx = 0;  // tokens per sequence (prompt + generated)
  int32_t n_layer = 0;
  int32_t n_expert = 0;
  int32_t n_expert_used = 0;
  std::optional<tokenizer::Tokenizer> tokenizer;         // none: token-id prompts only
  std::optional<tokenizer::ChatTemplate> chat_template;  // none: no chat prompts

  // From an opened model: the tokenizer when the GGUF has a usable one, the
  // chat template named `chat_template` (e.g. "deepseek-r1") or else the one
  // recognised from tokenizer.chat_template (none when absent or unknown:
  // logged). Errors: InvalidArgument for an unknown `chat_template` name.
  static absl::StatusOr<ServedModel> FromModel(const models::Deepseek2Model& model, int64_t n_ctx,
                                               std::string_view chat_template = {},
                                               std::string name = {});

  ktx::v1::ModelInfo Info() const;
};

// OK when `requested` is empty or names the served model; else
// INVALID_ARGUMENT "model: 'x' is not served here (this node serves 'y')".
absl::Status CheckModelName(const ServedModel& model, const std::string& requested);

// Token ids of a chat prompt (template text with special tokens, message
// contents as plain text; BOS as the model adds it). `field` prefixes errors
// ("chat").
absl::StatusOr<std::vector<int32_t>> ChatPromptIds(const ServedModel& model,
                                                   const RequestLimits& limits,
                                                   const ktx::v1::ChatPrompt& chat,
                                                   std::string_view field);

// Validates `request` and builds the engine request (prompt ids, sampling,
// max_tokens, stop strings and ids, EOS handling, the routing policy parsed
// and checked against the model: "routing_policy: ..."). The deadline is left 0:
// the caller sets it from the RPC's.
absl::StatusOr<actors::GenerateRequest> BuildGenerateRequest(
    const ServedModel& model, const RequestLimits& limits, const ktx::v1::GenerateRequest& request);

absl::StatusOr<ktx::v1::TokenizeResponse> Tokenize(const ServedModel& model,
                                                   const RequestLimits& limits,
                                                   const ktx::v1::TokenizeRequest& request);

absl::StatusOr<ktx::v1::DetokenizeResponse> Detokenize(const ServedModel& model,
                                                       const ktx::v1::DetokenizeRequest& request);

ktx::v1::FinishReason ToProtoFinishReason(actors::FinishReason reason);

}  // namespace ktx::service
