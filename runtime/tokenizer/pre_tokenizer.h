// File: runtime/tokenizer/pre_tokenizer.h
//
// The pre-tokenizer of a byte-level BPE model: splits text into words before
// BPE merges, so that no merge crosses a word boundary. Selected by the GGUF
// key `tokenizer.ggml.pre`; ktx knows:
//
//   deepseek-v3   DeepSeek-V3 / R1 (HF tokenizer.json: a Sequence of three
//                 `Split(..., behavior=Isolated)` pre-tokenizers, then ByteLevel
//                 without its own regex).
//
// The deepseek-v3 split runs three regular expressions one after another. Each
// one is applied to every piece left by the previous one; its matches and the
// text between them all become pieces (nothing is dropped):
//
//   1. \p{N}{1,3}                               digits, in groups of 1..3
//   2. [\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+
//                                               CJK ideographs, hiragana, katakana
//   3. [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+   ASCII punct + ASCII letters
//      | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+            letters/marks, optional lead
//      | \x20?[\p{P}\p{S}]+[\r\n]*                       punctuation/symbol runs
//      | \s*[\r\n]+                                      newline runs
//      | \s+(?!\S)                                       spaces not before a word
//      | \s+                                             other whitespace
//
// (regex 2 is `[一-龥\u3040-ゟ゠-ヿ]+` in tokenizer.json.) Regexes are PCRE2,
// 8-bit, UTF + UCP (Unicode properties, Unicode \s), JIT-compiled when the
// library supports it.
//
// Invalid UTF-8: the regexes only ever see valid UTF-8. Each invalid maximal
// subpart of the input (see utf8.h) becomes a piece of its own (so it is
// tokenized as raw bytes and round-trips exactly), and the valid runs between
// them are split as usual. llama.cpp instead replaces each invalid byte with
// U+FFFD; ktx keeps the bytes.
//
// Ownership and threads: a PreTokenizer owns its compiled patterns; Split is
// const and thread-safe (match data is per call). Movable, not copyable.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ktx::tokenizer {

// Names accepted by PreTokenizer::Create, in a stable order.
const std::vector<std::string>& SupportedPreTokenizers();

class PreTokenizer {
 public:
  // Compiles the patterns of `name` (a `tokenizer.ggml.pre` value). Unknown
  // names fail with kInvalidArgument naming the value and the supported ones.
  static absl::StatusOr<PreTokenizer> Create(std::string_view name);

  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;
  ~PreTokenizer();

  const std::string& name() const { return name_; }
  // Whether the patterns run JIT-compiled (PCRE2 JIT available on this CPU).
  bool jit() const;

  // Appends the pieces of `text` to `*pieces` (views into `text`; their
  // concatenation is `text`). Fails (kResourceExhausted) only when PCRE2 gives
  // up on a match (its match or depth limit), which well-formed patterns like
  // these do not reach in practice; the error names the pattern.
  absl::Status Split(std::string_view text, std::vector<std::string_view>* pieces) const;

 private:
  struct Impl;
  PreTokenizer(std::string name, std::unique_ptr<Impl> impl);
  std::string name_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ktx::tokenizer
