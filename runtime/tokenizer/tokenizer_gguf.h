// File: runtime/tokenizer/tokenizer_gguf.h
//
// Builds a Tokenizer from a GGUF model's metadata (library ktx_tokenizer_gguf,
// the only part of the tokenizer that depends on the GGUF reader):
//
//   KTX_ASSIGN_OR_RETURN(std::unique_ptr<gguf::GgufFile> file, gguf::GgufFile::Open(path));
//   KTX_ASSIGN_OR_RETURN(Tokenizer tok, TokenizerFromGguf(file->metadata()));
//
// Keys read (see ../shared/notes/GGUF.md section 7):
//   tokenizer.ggml.model            string, required; "gpt2"
//   tokenizer.ggml.pre              string, required; "deepseek-v3"
//   tokenizer.ggml.tokens           string array, required
//   tokenizer.ggml.token_type       int array, optional (absent: all NORMAL)
//   tokenizer.ggml.merges           string array, required for gpt2
//   tokenizer.ggml.{bos,eos,eot,padding}_token_id   u32, optional (absent: none)
//   tokenizer.ggml.add_bos_token    bool, optional (absent: false)
//   tokenizer.ggml.add_eos_token    bool, optional (absent: false)
// Errors name the key and what was expected (a wrong type, a missing key, an
// unknown model or pre-tokenizer listing the supported ones, ids out of range).
//
// ChatTemplateFromGguf resolves `tokenizer.chat_template` (absent: empty) with
// ChatTemplate::Resolve (chat_template.h).
//
// Stateless free functions; thread-safe.
#pragma once

#include <string_view>

#include "absl/status/statusor.h"
#include "runtime/gguf/gguf.h"
#include "runtime/tokenizer/chat_template.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ktx::tokenizer {

// The TokenizerData stored in `metadata` (validated only as far as types go).
absl::StatusOr<TokenizerData> TokenizerDataFromGguf(const gguf::Metadata& metadata);

// TokenizerDataFromGguf + Tokenizer::Create.
absl::StatusOr<Tokenizer> TokenizerFromGguf(const gguf::Metadata& metadata);

// The chat template named `override_name`, or the one recognised from
// `tokenizer.chat_template`.
absl::StatusOr<ChatTemplate> ChatTemplateFromGguf(const gguf::Metadata& metadata,
                                                  std::string_view override_name = {});

}  // namespace ktx::tokenizer
