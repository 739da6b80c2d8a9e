// File: tests/runtime/tokenizer/test_vocab.h
//
// Synthetic byte-level BPE vocabularies for tokenizer tests: special tokens
// first, then the 256 byte symbols, then one token per merge (in byte-level
// text, e.g. "Ġt"), in the layout of the tests/data fixtures.
#pragma once

#include <set>
#include <string>
#include <utility>
#include <vector>

#include "runtime/tokenizer/byte_level.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ktx::tokenizer::testing {

// Byte-level text of raw bytes ("a b" -> "aĠb").
inline std::string Bl(std::string_view bytes) {
  std::string out;
  AppendByteLevelText(bytes, &out);
  return out;
}

// `specials` (text, type) get ids 0..; then bytes; then one token per
// distinct merge result, in merge order.
// Merges are given in raw bytes as {left, right} and stored in byte-level form.
inline TokenizerData MakeData(const std::vector<std::pair<std::string, TokenType>>& specials,
                              const std::vector<std::pair<std::string, std::string>>& merges) {
  TokenizerData data;
  for (const auto& [text, type] : specials) {
    data.tokens.push_back(text);
    data.token_types.push_back(type);
  }
  for (int b = 0; b < 256; ++b) {
    data.tokens.emplace_back(ByteToText(static_cast<uint8_t>(b)));
    data.token_types.push_back(TokenType::kNormal);
  }
  std::set<std::string> merged;
  for (const auto& [left, right] : merges) {
    data.merges.push_back(Bl(left) + " " + Bl(right));
    // Two merges may produce the same token ("a"+"bc", "ab"+"c"): add it once.
    if (merged.insert(left + right).second) {
      data.tokens.push_back(Bl(left + right));
      data.token_types.push_back(TokenType::kNormal);
    }
  }
  if (!specials.empty()) {
    data.bos_id = 0;
    data.add_bos = true;
  }
  if (specials.size() > 1) data.eos_id = 1;
  return data;
}

// The id of byte `b` in a MakeData vocabulary with `n_specials` specials.
inline int32_t ByteId(int n_specials, uint8_t b) { return n_specials + b; }

}  // namespace ktx::tokenizer::testing
