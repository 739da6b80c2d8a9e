// TokenizerFromGguf / ChatTemplateFromGguf on hand-built metadata: the keys
// read, and the errors for missing, mistyped and unsupported values.
#include "runtime/tokenizer/tokenizer_gguf.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/tokenizer/byte_level.h"

namespace ktx::tokenizer {
namespace {

using gguf::Value;
using gguf::ValueType;
using ::testing::HasSubstr;

Value Str(std::string s) { return Value(ValueType::kString, std::move(s)); }
Value U32(uint32_t v) { return Value(ValueType::kUint32, v); }
Value Bool(bool v) { return Value(ValueType::kBool, v); }
Value StrArray(std::vector<std::string> v) {
  return Value(ValueType::kArray, std::move(v), ValueType::kString);
}
Value IntArray(std::vector<int64_t> v) {
  return Value(ValueType::kArray, std::move(v), ValueType::kInt32);
}

// BOS, EOS, 256 bytes, "ab"; one merge "a b".
gguf::Metadata Meta() {
  std::vector<std::string> tokens = {"<s>", "</s>"};
  std::vector<int64_t> types = {3, 3};
  for (int b = 0; b < 256; ++b) {
    tokens.emplace_back(ByteToText(static_cast<uint8_t>(b)));
    types.push_back(1);
  }
  tokens.push_back("ab");
  types.push_back(1);
  gguf::Metadata m;
  m.Set("tokenizer.ggml.model", Str("gpt2"));
  m.Set("tokenizer.ggml.pre", Str("deepseek-v3"));
  m.Set("tokenizer.ggml.tokens", StrArray(tokens));
  m.Set("tokenizer.ggml.token_type", IntArray(types));
  m.Set("tokenizer.ggml.merges", StrArray({"a b"}));
  m.Set("tokenizer.ggml.bos_token_id", U32(0));
  m.Set("tokenizer.ggml.eos_token_id", U32(1));
  m.Set("tokenizer.ggml.add_bos_token", Bool(true));
  return m;
}

// Meta() less one key (Metadata has no way to delete one).
gguf::Metadata MetaWithout(std::string_view skipped) {
  const gguf::Metadata full = Meta();
  gguf::Metadata m;
  for (const auto& [key, value] : full.entries()) {
    if (key != skipped) m.Set(key, value);
  }
  return m;
}

std::string Error(const gguf::Metadata& m) {
  auto tok = TokenizerFromGguf(m);
  EXPECT_FALSE(tok.ok());
  return tok.ok() ? "" : std::string(tok.status().message());
}

TEST(TokenizerGgufTest, ReadsTheKeys) {
  auto tok = TokenizerFromGguf(Meta());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(tok->n_vocab(), 259);
  EXPECT_EQ(tok->bos_id(), 0);
  EXPECT_EQ(tok->eos_id(), 1);
  EXPECT_EQ(tok->pad_id(), -1);
  EXPECT_TRUE(tok->add_bos());
  EXPECT_FALSE(tok->add_eos());
  EXPECT_EQ(*tok->Tokenize("ab</s>"), (std::vector<int32_t>{0, 258, 1}));
}

TEST(TokenizerGgufTest, ErrorsNameTheKey) {
  gguf::Metadata m = Meta();
  m.Set("tokenizer.ggml.model", Str("llama"));
  EXPECT_THAT(Error(m), HasSubstr("tokenizer.ggml.model is 'llama'; ktx supports: gpt2"));

  m = gguf::Metadata();
  EXPECT_THAT(Error(m), HasSubstr("no tokenizer.ggml.model"));

  m = Meta();
  m.Set("tokenizer.ggml.pre", Str("llama-bpe"));
  EXPECT_THAT(Error(m), HasSubstr("'llama-bpe'; ktx supports: deepseek-v3"));

  EXPECT_THAT(Error(MetaWithout("tokenizer.ggml.merges")), HasSubstr("no tokenizer.ggml.merges"));
  EXPECT_THAT(Error(MetaWithout("tokenizer.ggml.pre")), HasSubstr("no tokenizer.ggml.pre"));

  m = Meta();
  m.Set("tokenizer.ggml.eos_token_id", U32(5000));
  EXPECT_THAT(Error(m),
              HasSubstr("EOS token id 5000 (tokenizer.ggml.eos_token_id) is out of range"));

  m = Meta();
  m.Set("tokenizer.ggml.tokens", Str("not an array"));
  EXPECT_THAT(Error(m), HasSubstr("tokenizer.ggml.tokens"));

  m = Meta();
  m.Set("tokenizer.ggml.token_type", IntArray({1, 2, 99}));
  EXPECT_THAT(Error(m), HasSubstr("tokenizer.ggml.token_type[2] is 99"));

  m = Meta();
  m.Set("tokenizer.ggml.merges", StrArray({"a b", "x q"}));
  EXPECT_THAT(Error(m), HasSubstr("tokenizer.ggml.merges[1] 'x q': 'xq' is not a token"));
}

TEST(TokenizerGgufTest, ChatTemplateFromMetadata) {
  gguf::Metadata m = Meta();
  auto missing = ChatTemplateFromGguf(m);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ChatTemplateFromGguf(m, "deepseek-r1")->format(), ChatFormat::kDeepSeekR1);
  m.Set("tokenizer.chat_template",
        Str("{{'<｜User｜>' + c}}{{'<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>'}}"));
  EXPECT_EQ(ChatTemplateFromGguf(m)->format(), ChatFormat::kDeepSeekV3);
}

}  // namespace
}  // namespace ktx::tokenizer
