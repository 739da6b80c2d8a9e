// File: runtime/synth/synth_vocab.h
//
// A small, valid byte-level BPE vocabulary for synthetic models, in the form
// llama.cpp's `gpt2` tokenizer reads from GGUF metadata (tokenizer.ggml.*):
//
//   id 0        <｜begin▁of▁sentence｜>   CONTROL (BOS)
//   id 1        <｜end▁of▁sentence｜>     CONTROL (EOS)
//   id 2        <｜▁pad▁｜>               CONTROL (padding)
//   ids 3..258  the 256 byte tokens, id 3 + byte value, spelled with GPT-2's
//               byte-to-unicode characters (space = "Ġ", newline = "Ċ")
//   then        one token per merge, in merge order: first merges learned by
//               BPE on a built-in English paragraph, then synthetic letter
//               merges ("x y" -> "xy") until the vocabulary is full
//   last 4      <｜User｜>, <｜Assistant｜>, <think>, </think>  USER_DEFINED
//
// Every merge "a b" names two earlier tokens and creates the token "ab", so
// the merge list is a valid BPE ranking. Also provides a DeepSeek-V3-style
// chat template (Jinja) using these tokens. Deterministic; no inputs but the
// size. Thread-safe: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ktx::synth {

// 3 control tokens + 256 byte tokens + 4 chat tokens.
inline constexpr int64_t kMinSynthVocab = 3 + 256 + 4;

// llama_token_type values used in tokenizer.ggml.token_type.
inline constexpr int32_t kTokenTypeNormal = 1;
inline constexpr int32_t kTokenTypeControl = 3;
inline constexpr int32_t kTokenTypeUserDefined = 4;

struct SynthVocab {
  std::vector<std::string> tokens;   // [n_vocab], GPT-2 byte-to-unicode spelling
  std::vector<int32_t> token_types;  // [n_vocab]
  std::vector<std::string> merges;   // [n_vocab - kMinSynthVocab], "left right"
  int32_t bos_id = 0;
  int32_t eos_id = 1;
  int32_t pad_id = 2;
  std::string chat_template;  // tokenizer.chat_template
};

// GPT-2's byte-to-unicode character for `byte`, as UTF-8.
std::string ByteToUnicode(uint8_t byte);

// The vocabulary of exactly `n_vocab` tokens; InvalidArgument (naming --vocab)
// when n_vocab < kMinSynthVocab or > 2^22.
absl::StatusOr<SynthVocab> BuildSynthVocab(int64_t n_vocab);

// The chat template stored in synthetic models: DeepSeek-V3's turn format
// (BOS, system text, "<｜User｜>" + user text, "<｜Assistant｜>" + reply +
// EOS, a trailing "<｜Assistant｜>" for add_generation_prompt); no tool calls.
const std::string& SynthChatTemplate();

}  // namespace ktx::synth
