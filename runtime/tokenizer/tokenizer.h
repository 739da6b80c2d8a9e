// File: runtime/tokenizer/tokenizer.h
//
// Text <-> token ids for byte-level BPE models (`tokenizer.ggml.model` = gpt2)
// with DeepSeek-V3's pre-tokenizer (`tokenizer.ggml.pre` = deepseek-v3; see
// pre_tokenizer.h). Built from plain data, so it does not depend on GGUF;
// tokenizer_gguf.h builds one from a model's metadata.
//
//   KTX_ASSIGN_OR_RETURN(Tokenizer tok, Tokenizer::Create(std::move(data)));
//   KTX_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok.Tokenize("Hello world"));
//   KTX_ASSIGN_OR_RETURN(std::string text, tok.Detokenize(ids));
//
// Tokenize:
//   1. With add_bos, the BOS id comes first (even when the text itself starts
//      with the BOS token's text: then there are two, as in llama.cpp).
//   2. Special tokens (types CONTROL, UNKNOWN, USER_DEFINED) are found in the
//      text leftmost-longest and become their ids, when allowed by the options;
//      otherwise their text is ordinary text.
//   3. Each stretch of text between them is split by the pre-tokenizer into
//      words; each word is converted to byte-level symbols (one per byte) and
//      merged by BPE: repeatedly the adjacent pair with the lowest merge rank
//      (the index in `merges`), the leftmost one on ties, until no pair has a
//      rank. A per-call cache reuses the result for repeated words.
//   4. With add_eos, the EOS id comes last.
// Invalid UTF-8 never fails: invalid bytes are tokenized as raw bytes (see
// pre_tokenizer.h), so Detokenize(Tokenize(x)) == x for every byte string x
// (plus the BOS text when rendered).
//
// Detokenize maps ids to bytes: NORMAL tokens through the GPT-2 byte-level
// alphabet (byte_level.h), USER_DEFINED tokens as their text, CONTROL and
// UNKNOWN tokens as their text or nothing (DetokenizeOptions::render_special),
// UNUSED / BYTE / UNDEFINED tokens as nothing. The result can be invalid UTF-8
// (a multi-byte character may be split across tokens); StreamingDetokenizer
// (streaming_detokenizer.h) yields only complete UTF-8.
//
// Ownership and threads: a Tokenizer is an immutable, shared, reference-counted
// state (vocabulary, merge table, compiled patterns); copies are cheap and
// share it. All methods are const and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace ktx::tokenizer {

// GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
enum class TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

// "NORMAL", "CONTROL", ... ("?" for values outside the enum).
const char* TokenTypeName(TokenType type);

// Tokenizer names accepted in TokenizerData::model, in a stable order.
const std::vector<std::string>& SupportedTokenizerModels();

// Everything a tokenizer is made of, as plain data (the GGUF keys in brackets).
struct TokenizerData {
  std::string model = "gpt2";       // [tokenizer.ggml.model]; only "gpt2"
  std::string pre = "deepseek-v3";  // [tokenizer.ggml.pre]; see pre_tokenizer.h
  // [tokenizer.ggml.tokens] token texts, in GPT-2 byte-level form for NORMAL
  // tokens. With duplicated texts the last id wins in text -> id lookups.
  std::vector<std::string> tokens;
  // [tokenizer.ggml.token_type] one per token; empty means all kNormal.
  std::vector<TokenType> token_types;
  // [tokenizer.ggml.merges] "left right" (split at the first space after the
  // first character); rank = index. Both parts and their concatenation must be
  // tokens, as in HF tokenizers.
  std::vector<std::string> merges;
  int32_t bos_id = -1;   // [tokenizer.ggml.bos_token_id]; -1: none
  int32_t eos_id = -1;   // [tokenizer.ggml.eos_token_id]; -1: none
  int32_t eot_id = -1;   // [tokenizer.ggml.eot_token_id]; -1: none
  int32_t pad_id = -1;   // [tokenizer.ggml.padding_token_id]; -1: none
  bool add_bos = false;  // [tokenizer.ggml.add_bos_token]
  bool add_eos = false;  // [tokenizer.ggml.add_eos_token]
};

struct TokenizeOptions {
  // Recognise the text of special tokens (CONTROL, UNKNOWN, USER_DEFINED) as
  // those tokens. Off: all text is ordinary text, tokenized as bytes/merges
  // (the safe choice for untrusted user text).
  bool parse_special = true;
  // Recognise USER_DEFINED tokens even when parse_special is off. llama.cpp
  // and HF tokenizers always split out added non-special tokens; turn this on
  // to reproduce their `parse_special=false` ids exactly.
  bool always_parse_user_defined = false;
  // Override the model's add_bos / add_eos.
  std::optional<bool> add_bos;
  std::optional<bool> add_eos;
};

struct DetokenizeOptions {
  // CONTROL and UNKNOWN tokens as their text (true) or removed (false).
  // USER_DEFINED tokens are always rendered. llama.cpp's
  // llama_detokenize(remove_special=false, unparse_special=true) is `true`;
  // (remove_special=true, unparse_special=false) is `false`.
  bool render_special = true;
};

class Tokenizer {
 public:
  // Validates `data` and builds the tokenizer. Errors (kInvalidArgument) name
  // the field and entry: unknown model or pre-tokenizer (listing the supported
  // ones), no tokens, token_types of the wrong length or with values outside
  // 0..6, a missing byte-level token for some byte, a malformed merge or one
  // whose parts or result are not tokens, special ids out of range, add_bos /
  // add_eos without a BOS / EOS id.
  static absl::StatusOr<Tokenizer> Create(TokenizerData data);

  // Text -> ids (see the file comment). Fails only if add_bos/add_eos is
  // requested for a model without that token (kFailedPrecondition) or if the
  // regex engine gives up (kResourceExhausted; see PreTokenizer::Split).
  absl::StatusOr<std::vector<int32_t>> Tokenize(std::string_view text,
                                                const TokenizeOptions& options = {}) const;

  // Ids -> bytes. kOutOfRange naming the position and id for an id outside
  // [0, n_vocab()).
  absl::StatusOr<std::string> Detokenize(absl::Span<const int32_t> ids,
                                         const DetokenizeOptions& options = {}) const;

  // The bytes of one token as Detokenize renders it (may be an incomplete UTF-8
  // sequence). `id` must be valid (IsValidId); checked.
  std::string_view Piece(int32_t id, bool render_special = true) const;

  int32_t n_vocab() const;
  bool IsValidId(int32_t id) const { return id >= 0 && id < n_vocab(); }
  // The token's text as stored in the vocabulary (byte-level form). Checked id.
  const std::string& TokenText(int32_t id) const;
  TokenType TokenTypeOf(int32_t id) const;  // checked id
  // Whether the token is CONTROL / UNKNOWN / USER_DEFINED. Checked id.
  bool IsSpecial(int32_t id) const;
  // The id whose vocabulary text is `text` exactly (byte-level form for
  // NORMAL tokens, e.g. "Ġthe"; special tokens as written).
  std::optional<int32_t> FindToken(std::string_view text) const;

  int32_t bos_id() const;  // -1: none
  int32_t eos_id() const;
  int32_t eot_id() const;
  int32_t pad_id() const;
  bool add_bos() const;
  bool add_eos() const;
  // EOS or EOT: the model ends its answer.
  bool IsEndOfGeneration(int32_t id) const;
  const std::string& model() const;
  const std::string& pre() const;
  int32_t n_merges() const;

 private:
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

}  // namespace ktx::tokenizer
