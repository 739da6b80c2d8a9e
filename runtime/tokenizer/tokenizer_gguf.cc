#include "runtime/tokenizer/tokenizer_gguf.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/base/status.h"
#include "runtime/tokenizer/pre_tokenizer.h"

namespace ktx::tokenizer {
namespace {

constexpr std::string_view kModel = "tokenizer.ggml.model";
constexpr std::string_view kPre = "tokenizer.ggml.pre";
constexpr std::string_view kTokens = "tokenizer.ggml.tokens";
constexpr std::string_view kTokenType = "tokenizer.ggml.token_type";
constexpr std::string_view kMerges = "tokenizer.ggml.merges";
constexpr std::string_view kBos = "tokenizer.ggml.bos_token_id";
constexpr std::string_view kEos = "tokenizer.ggml.eos_token_id";
constexpr std::string_view kEot = "tokenizer.ggml.eot_token_id";
constexpr std::string_view kPad = "tokenizer.ggml.padding_token_id";
constexpr std::string_view kAddBos = "tokenizer.ggml.add_bos_token";
constexpr std::string_view kAddEos = "tokenizer.ggml.add_eos_token";
constexpr std::string_view kChatTemplate = "tokenizer.chat_template";

// Debian's Abseil has its own string_view type; StrCat takes that one.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status Missing(std::string_view key, std::string_view what) {
  return absl::NotFoundError(absl::StrCat("GGUF metadata has no ", Av(key), " (", Av(what), ")"));
}

// An optional token id: -1 when absent. Ids must fit the vocabulary, which
// Tokenizer::Create checks; here only that they are below 2^31.
absl::StatusOr<int32_t> OptionalId(const gguf::Metadata& metadata, std::string_view key) {
  if (!metadata.Has(key)) return -1;
  KTX_ASSIGN_OR_RETURN(uint32_t id, metadata.GetU32(key));
  if (id > static_cast<uint32_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat(Av(key), " is ", id, "; not a valid token id"));
  }
  return static_cast<int32_t>(id);
}

}  // namespace

absl::StatusOr<TokenizerData> TokenizerDataFromGguf(const gguf::Metadata& metadata) {
  TokenizerData data;
  if (!metadata.Has(kModel)) return Missing(kModel, "the tokenizer type, e.g. gpt2");
  KTX_ASSIGN_OR_RETURN(data.model, metadata.GetString(kModel));
  if (data.model != "gpt2") {
    // Checked here too so that a model without merges gets the clearer error.
    const auto& supported = SupportedTokenizerModels();
    return absl::InvalidArgumentError(
        absl::StrCat(Av(kModel), " is '", data.model,
                     "'; ktx supports: ", absl::StrJoin(supported, ", "), " (byte-level BPE)"));
  }
  if (!metadata.Has(kPre)) {
    return Missing(kPre, absl::StrCat("the pre-tokenizer; ktx supports: ",
                                      absl::StrJoin(SupportedPreTokenizers(), ", ")));
  }
  KTX_ASSIGN_OR_RETURN(data.pre, metadata.GetString(kPre));
  if (!metadata.Has(kTokens)) return Missing(kTokens, "the vocabulary");
  KTX_ASSIGN_OR_RETURN(data.tokens, metadata.GetStringArray(kTokens));
  if (metadata.Has(kTokenType)) {
    KTX_ASSIGN_OR_RETURN(std::vector<int64_t> types, metadata.GetIntArray(kTokenType));
    data.token_types.reserve(types.size());
    for (size_t i = 0; i < types.size(); ++i) {
      if (types[i] < 0 || types[i] > static_cast<int64_t>(TokenType::kByte)) {
        return absl::InvalidArgumentError(
            absl::StrCat(Av(kTokenType), "[", i, "] is ", types[i], "; expected 0..6"));
      }
      data.token_types.push_back(static_cast<TokenType>(types[i]));
    }
  }
  if (!metadata.Has(kMerges)) {
    return Missing(kMerges, "byte-level BPE (gpt2) needs its merge list");
  }
  KTX_ASSIGN_OR_RETURN(data.merges, metadata.GetStringArray(kMerges));
  KTX_ASSIGN_OR_RETURN(data.bos_id, OptionalId(metadata, kBos));
  KTX_ASSIGN_OR_RETURN(data.eos_id, OptionalId(metadata, kEos));
  KTX_ASSIGN_OR_RETURN(data.eot_id, OptionalId(metadata, kEot));
  KTX_ASSIGN_OR_RETURN(data.pad_id, OptionalId(metadata, kPad));
  KTX_ASSIGN_OR_RETURN(data.add_bos, metadata.GetBoolOr(kAddBos, false));
  KTX_ASSIGN_OR_RETURN(data.add_eos, metadata.GetBoolOr(kAddEos, false));
  return data;
}

absl::StatusOr<Tokenizer> TokenizerFromGguf(const gguf::Metadata& metadata) {
  KTX_ASSIGN_OR_RETURN(TokenizerData data, TokenizerDataFromGguf(metadata));
  return Tokenizer::Create(std::move(data));
}

absl::StatusOr<ChatTemplate> ChatTemplateFromGguf(const gguf::Metadata& metadata,
                                                  std::string_view override_name) {
  if (!override_name.empty()) return ChatTemplate::FromName(override_name);
  KTX_ASSIGN_OR_RETURN(std::string jinja, metadata.GetStringOr(kChatTemplate, ""));
  return ChatTemplate::Resolve(jinja, override_name);
}

}  // namespace ktx::tokenizer
