// File: actors/service/served_model.cc
#include "actors/service/served_model.h"

#include <cmath>
#include <filesystem>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"
#include "runtime/models/routing_policy.h"
#include "runtime/tokenizer/tokenizer_gguf.h"
#include "runtime/tokenizer/utf8.h"

namespace ktx::service {
namespace {

absl::Status FieldError(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
}

// "field: value is outside RANGE" unless lo <= value <= hi (lo_open: lo < value).
absl::Status CheckRange(absl::string_view field, double value, double lo, double hi, bool lo_open,
                        absl::string_view range) {
  const bool ok = (lo_open ? value > lo : value >= lo) && value <= hi;  // NaN fails
  if (ok) return absl::OkStatus();
  return FieldError(field, absl::StrCat(value, " is outside ", range));
}

absl::Status CheckIds(const ServedModel& model, const google::protobuf::RepeatedField<int32_t>& ids,
                      absl::string_view field) {
  for (int i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= model.n_vocab) {
      return FieldError(
          absl::StrCat(field, "[", i, "]"),
          absl::StrCat("id ", ids[i], " is outside the vocabulary [0, ", model.n_vocab, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<const tokenizer::Tokenizer*> NeedTokenizer(const ServedModel& model,
                                                          absl::string_view field) {
  if (!model.tokenizer) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": the model '", model.name,
                     "' has no usable tokenizer; send the prompt as token ids (tokens)"));
  }
  return &*model.tokenizer;
}

absl::Status CheckSampling(const ktx::v1::SamplingParams& s, sampler::SamplingParams* out) {
  if (s.has_temperature()) {
    KTX_RETURN_IF_ERROR(
        CheckRange("sampling.temperature", s.temperature(), 0, 100, false, "[0, 100]"));
    out->temperature = s.temperature();
  }
  if (s.has_top_k()) {
    if (s.top_k() < 0) {
      return FieldError("sampling.top_k", absl::StrCat(s.top_k(), " is negative (0 = off)"));
    }
    out->top_k = s.top_k();
  }
  if (s.has_top_p()) {
    KTX_RETURN_IF_ERROR(CheckRange("sampling.top_p", s.top_p(), 0, 1, true, "(0, 1]"));
    out->top_p = s.top_p();
  }
  if (s.has_min_p()) {
    KTX_RETURN_IF_ERROR(CheckRange("sampling.min_p", s.min_p(), 0, 1, false, "[0, 1]"));
    out->min_p = s.min_p();
  }
  if (s.has_repetition_penalty()) {
    KTX_RETURN_IF_ERROR(
        CheckRange("sampling.repetition_penalty", s.repetition_penalty(), 0, 10, true, "(0, 10]"));
    out->repetition_penalty = s.repetition_penalty();
  }
  if (s.has_presence_penalty()) {
    KTX_RETURN_IF_ERROR(
        CheckRange("sampling.presence_penalty", s.presence_penalty(), -2, 2, false, "[-2, 2]"));
    out->presence_penalty = s.presence_penalty();
  }
  if (s.has_frequency_penalty()) {
    KTX_RETURN_IF_ERROR(
        CheckRange("sampling.frequency_penalty", s.frequency_penalty(), -2, 2, false, "[-2, 2]"));
    out->frequency_penalty = s.frequency_penalty();
  }
  if (s.has_penalty_last_n()) {
    KTX_RETURN_IF_ERROR(CheckRange("sampling.penalty_last_n", s.penalty_last_n(), 0, 1048576, false,
                                   "[0, 1048576]"));
    out->penalty_last_n = s.penalty_last_n();
  }
  if (s.has_seed()) out->seed = s.seed();
  // The sampler's own check, in case it is stricter than the above.
  if (absl::Status status = out->Validate(); !status.ok()) {
    return FieldError("sampling", status.message());
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ServedModel> ServedModel::FromModel(const models::Deepseek2Model& model,
                                                   int64_t n_ctx, std::string_view chat_template,
                                                   std::string name) {
  const gguf::Metadata& metadata = model.file().metadata();
  const models::Deepseek2Hparams& hp = model.hparams();
  ServedModel served;
  if (name.empty()) {
    absl::StatusOr<std::string> general = metadata.GetStringOr("general.name", "");
    if (general.ok()) name = *general;
  }
  if (name.empty() && !model.file().paths().empty()) {
    name = std::filesystem::path(model.file().paths().front()).stem().string();
  }
  served.name = name.empty() ? "model" : name;
  absl::StatusOr<std::string> arch = metadata.GetStringOr("general.architecture", "deepseek2");
  served.architecture = arch.ok() ? *arch : "deepseek2";
  served.n_vocab = static_cast<int32_t>(hp.n_vocab);
  served.n_ctx = n_ctx > 0 ? n_ctx : hp.n_ctx_train;
  served.n_layer = hp.n_layer;
  served.n_expert = hp.n_expert;
  served.n_expert_used = hp.n_expert_used;
  absl::StatusOr<tokenizer::Tokenizer> tok = tokenizer::TokenizerFromGguf(metadata);
  if (tok.ok() && tok->n_vocab() <= served.n_vocab) {
    served.tokenizer = std::move(*tok);
  } else {
    KTX_LOG(WARNING, "service") << "model '" << served.name << "': no usable tokenizer ("
                                << (tok.ok() ? "more tokens than the model's vocabulary"
                                             : std::string(tok.status().message()))
                                << "): token-id prompts only";
  }
  absl::StatusOr<tokenizer::ChatTemplate> tmpl =
      tokenizer::ChatTemplateFromGguf(metadata, chat_template);
  if (tmpl.ok()) {
    served.chat_template = *tmpl;
  } else if (!chat_template.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("chat template '", std::string(chat_template),
                                                   "': ", tmpl.status().message()));
  } else {
    KTX_LOG(INFO, "service") << "model '" << served.name
                             << "': no chat template, chat prompts are refused ("
                             << tmpl.status().message() << ")";
  }
  return served;
}

ktx::v1::ModelInfo ServedModel::Info() const {
  ktx::v1::ModelInfo info;
  info.set_name(name);
  info.set_architecture(architecture);
  info.set_context_length(n_ctx);
  info.set_n_vocab(n_vocab);
  info.set_n_layer(n_layer);
  info.set_n_expert(n_expert);
  info.set_n_expert_used(n_expert_used);
  info.set_chat_template(chat_template ? std::string(chat_template->name()) : "");
  info.set_has_tokenizer(tokenizer.has_value());
  info.set_fingerprint(fingerprint);
  return info;
}

absl::Status CheckModelName(const ServedModel& model, const std::string& requested) {
  if (requested.empty() || requested == model.name) return absl::OkStatus();
  return FieldError("model",
                    absl::StrCat("'", tokenizer::SanitizeUtf8(requested),
                                 "' is not served here (this node serves '", model.name, "')"));
}

absl::StatusOr<std::vector<int32_t>> ChatPromptIds(const ServedModel& model,
                                                   const RequestLimits& limits,
                                                   const ktx::v1::ChatPrompt& chat,
                                                   std::string_view field_name) {
  const std::string field(field_name);
  if (chat.messages().empty()) return FieldError(absl::StrCat(field, ".messages"), "empty");
  if (chat.messages_size() > limits.max_chat_messages) {
    return FieldError(absl::StrCat(field, ".messages"),
                      absl::StrCat(chat.messages_size(), " messages, at most ",
                                   limits.max_chat_messages, " allowed"));
  }
  std::vector<tokenizer::ChatMessage> messages;
  size_t bytes = 0;
  bool any_content = false;
  for (int i = 0; i < chat.messages_size(); ++i) {
    const ktx::v1::ChatMessage& m = chat.messages(i);
    if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
      return FieldError(absl::StrCat(field, ".messages[", i, "].role"),
                        absl::StrCat("'", tokenizer::SanitizeUtf8(m.role()),
                                     "' is not system, user or assistant"));
    }
    bytes += m.content().size();
    any_content = any_content || !m.content().empty();
    messages.push_back({m.role(), m.content()});
  }
  if (!any_content) return FieldError(absl::StrCat(field, ".messages"), "every content is empty");
  if (bytes > limits.max_prompt_bytes) {
    return FieldError(
        absl::StrCat(field, ".messages"),
        absl::StrCat(bytes, " bytes of content, at most ", limits.max_prompt_bytes, " allowed"));
  }
  KTX_ASSIGN_OR_RETURN(const tokenizer::Tokenizer* tok, NeedTokenizer(model, field));
  if (!model.chat_template) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": the model '", model.name,
                     "' has no known chat template; send text or token ids"));
  }
  tokenizer::ChatOptions chat_options;
  if (chat.has_force_think()) chat_options.force_think = chat.force_think();
  absl::StatusOr<std::vector<tokenizer::ChatSegment>> segments =
      model.chat_template->ApplySegments(messages, chat_options);
  if (!segments.ok()) return FieldError(field, segments.status().message());
  tokenizer::TokenizeOptions options;
  options.parse_special = false;  // message contents are untrusted text
  return tokenizer::TokenizeChat(*tok, *segments, options);
}

absl::StatusOr<actors::GenerateRequest> BuildGenerateRequest(
    const ServedModel& model, const RequestLimits& limits,
    const ktx::v1::GenerateRequest& request) {
  KTX_RETURN_IF_ERROR(CheckModelName(model, request.model()));
  actors::GenerateRequest out;
  switch (request.prompt_case()) {
    case ktx::v1::GenerateRequest::PROMPT_NOT_SET:
      return FieldError("prompt", "empty: give text, tokens or chat");
    case ktx::v1::GenerateRequest::kText: {
      if (request.text().empty()) return FieldError("text", "empty prompt");
      if (request.text().size() > limits.max_prompt_bytes) {
        return FieldError("text", absl::StrCat(request.text().size(), " bytes, at most ",
                                               limits.max_prompt_bytes, " allowed"));
      }
      KTX_ASSIGN_OR_RETURN(const tokenizer::Tokenizer* tok, NeedTokenizer(model, "text"));
      tokenizer::TokenizeOptions options;
      options.parse_special = request.parse_special();  // default off: untrusted text
      KTX_ASSIGN_OR_RETURN(out.prompt, tok->Tokenize(request.text(), options));
      break;
    }
    case ktx::v1::GenerateRequest::kTokens:
      if (request.parse_special()) return FieldError("parse_special", "applies to text only");
      if (request.tokens().ids().empty()) return FieldError("tokens.ids", "empty prompt");
      KTX_RETURN_IF_ERROR(CheckIds(model, request.tokens().ids(), "tokens.ids"));
      out.prompt.assign(request.tokens().ids().begin(), request.tokens().ids().end());
      break;
    case ktx::v1::GenerateRequest::kChat:
      if (request.parse_special()) {
        return FieldError("parse_special", "applies to text only (chat contents stay text)");
      }
      KTX_ASSIGN_OR_RETURN(out.prompt, ChatPromptIds(model, limits, request.chat(), "chat"));
      break;
  }
  if (out.prompt.empty()) return FieldError("prompt", "empty after tokenization");
  const int64_t n_prompt = static_cast<int64_t>(out.prompt.size());
  if (n_prompt >= model.n_ctx) {
    return FieldError("prompt",
                      absl::StrCat(n_prompt, " tokens do not fit the context of ", model.n_ctx,
                                   " tokens (at least one must be left "
                                   "to generate)"));
  }
  if (request.has_max_tokens()) {
    if (request.max_tokens() <= 0) {
      return FieldError("max_tokens", absl::StrCat(request.max_tokens(), " must be positive"));
    }
    if (request.max_tokens() > model.n_ctx) {
      return FieldError("max_tokens", absl::StrCat(request.max_tokens(), " exceeds the context of ",
                                                   model.n_ctx, " tokens"));
    }
    out.max_tokens = request.max_tokens();
  } else {
    out.max_tokens =
        static_cast<int32_t>(std::min<int64_t>(limits.default_max_tokens, model.n_ctx - n_prompt));
  }
  KTX_RETURN_IF_ERROR(CheckSampling(request.sampling(), &out.sampling));
  if (request.stop_size() > limits.max_stop_strings) {
    return FieldError("stop", absl::StrCat(request.stop_size(), " stop strings, at most ",
                                           limits.max_stop_strings, " allowed"));
  }
  for (int i = 0; i < request.stop_size(); ++i) {
    const std::string& stop = request.stop(i);
    if (stop.empty() || stop.size() > limits.max_stop_string_bytes) {
      return FieldError(
          absl::StrCat("stop[", i, "]"),
          absl::StrCat(stop.size(), " bytes; expected 1 to ", limits.max_stop_string_bytes));
    }
    out.stop_strings.push_back(stop);
  }
  if (!out.stop_strings.empty() && !model.tokenizer) {
    return absl::FailedPreconditionError(absl::StrCat(
        "stop: stop strings need text, and the model '", model.name, "' has no usable tokenizer"));
  }
  if (request.stop_token_ids_size() > limits.max_stop_token_ids) {
    return FieldError("stop_token_ids",
                      absl::StrCat(request.stop_token_ids_size(), " ids, at most ",
                                   limits.max_stop_token_ids, " allowed"));
  }
  KTX_RETURN_IF_ERROR(CheckIds(model, request.stop_token_ids(), "stop_token_ids"));
  out.stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  out.stop_at_eos = !request.ignore_eos();
  if (request.has_routing_policy() && !request.routing_policy().empty()) {
    absl::StatusOr<models::RoutingPolicy> policy =
        models::RoutingPolicy::Parse(request.routing_policy());
    if (!policy.ok()) return FieldError("routing_policy", policy.status().message());
    if (model.n_layer > 0 && model.n_expert_used > 0) {
      const absl::Status valid = policy->Validate(model.n_layer, model.n_expert_used);
      if (!valid.ok()) return FieldError("routing_policy", valid.message());
    }
    out.routing_policy = std::make_shared<const models::RoutingPolicy>(std::move(*policy));
  }
  return out;
}

absl::StatusOr<ktx::v1::TokenizeResponse> Tokenize(const ServedModel& model,
                                                   const RequestLimits& limits,
                                                   const ktx::v1::TokenizeRequest& request) {
  KTX_RETURN_IF_ERROR(CheckModelName(model, request.model()));
  ktx::v1::TokenizeResponse response;
  std::vector<int32_t> ids;
  switch (request.input_case()) {
    case ktx::v1::TokenizeRequest::INPUT_NOT_SET:
      return FieldError("input", "empty: give text or chat");
    case ktx::v1::TokenizeRequest::kText: {
      if (request.text().size() > limits.max_prompt_bytes) {
        return FieldError("text", absl::StrCat(request.text().size(), " bytes, at most ",
                                               limits.max_prompt_bytes, " allowed"));
      }
      KTX_ASSIGN_OR_RETURN(const tokenizer::Tokenizer* tok, NeedTokenizer(model, "text"));
      tokenizer::TokenizeOptions options;
      options.parse_special = request.parse_special();
      if (request.has_add_special()) {
        options.add_bos = request.add_special() && tok->add_bos();
        options.add_eos = request.add_special() && tok->add_eos();
      }
      KTX_ASSIGN_OR_RETURN(ids, tok->Tokenize(request.text(), options));
      break;
    }
    case ktx::v1::TokenizeRequest::kChat:
      if (request.has_add_special() || request.parse_special()) {
        return FieldError(request.has_add_special() ? "add_special" : "parse_special",
                          "applies to text only (chat prompts are tokenized as Generate does)");
      }
      KTX_ASSIGN_OR_RETURN(ids, ChatPromptIds(model, limits, request.chat(), "chat"));
      break;
  }
  response.mutable_ids()->Assign(ids.begin(), ids.end());
  if (request.return_pieces()) {
    for (int32_t id : ids) {
      response.add_pieces(tokenizer::SanitizeUtf8(model.tokenizer->Piece(id)));
    }
  }
  return response;
}

absl::StatusOr<ktx::v1::DetokenizeResponse> Detokenize(const ServedModel& model,
                                                       const ktx::v1::DetokenizeRequest& request) {
  KTX_RETURN_IF_ERROR(CheckModelName(model, request.model()));
  KTX_ASSIGN_OR_RETURN(const tokenizer::Tokenizer* tok, NeedTokenizer(model, "ids"));
  for (int i = 0; i < request.ids_size(); ++i) {
    if (!tok->IsValidId(request.ids(i))) {
      return FieldError(absl::StrCat("ids[", i, "]"),
                        absl::StrCat("id ", request.ids(i), " is outside the vocabulary [0, ",
                                     tok->n_vocab(), ")"));
    }
  }
  tokenizer::DetokenizeOptions options;
  options.render_special = request.render_special();
  const std::vector<int32_t> ids(request.ids().begin(), request.ids().end());
  KTX_ASSIGN_OR_RETURN(std::string text, tok->Detokenize(ids, options));
  ktx::v1::DetokenizeResponse response;
  response.set_text(tokenizer::SanitizeUtf8(text));
  return response;
}

ktx::v1::FinishReason ToProtoFinishReason(actors::FinishReason reason) {
  switch (reason) {
    case actors::FinishReason::kLength: return ktx::v1::FINISH_REASON_LENGTH;
    case actors::FinishReason::kStopToken: return ktx::v1::FINISH_REASON_STOP_TOKEN;
    case actors::FinishReason::kStopString: return ktx::v1::FINISH_REASON_STOP_STRING;
    default: return ktx::v1::FINISH_REASON_UNSPECIFIED;
  }
}

}  // namespace ktx::service
