// StreamingDetokenizer on byte tokens that split characters; the check over
// all llama.cpp fixture cases is in tokenizer_cases_test.cc.
#include "runtime/tokenizer/streaming_detokenizer.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/tokenizer/utf8.h"
#include "tests/runtime/tokenizer/test_vocab.h"

namespace ktx::tokenizer {
namespace {

using testing::ByteId;
using testing::MakeData;

constexpr int kNumSpecials = 2;
int32_t B(uint8_t b) { return ByteId(kNumSpecials, b); }

const Tokenizer& Tok() {
  static const Tokenizer* const tok = new Tokenizer(
      Tokenizer::Create(MakeData({{"<s>", TokenType::kControl}, {"</s>", TokenType::kControl}},
                                 {{"\xE2", "\x82"}, {"\xAC", "x"}}))
          .value());
  return *tok;
}
constexpr int32_t kE282 = kNumSpecials + 256;     // "\xE2\x82"
constexpr int32_t kACx = kNumSpecials + 256 + 1;  // "\xACx"

std::vector<std::string> PushAll(StreamingDetokenizer& stream, const std::vector<int32_t>& ids) {
  std::vector<std::string> out;
  for (int32_t id : ids) {
    auto text = stream.Push(id);
    EXPECT_TRUE(text.ok()) << text.status();
    out.push_back(text.ok() ? *text : "");
  }
  out.push_back(stream.Finish());
  return out;
}

TEST(StreamingDetokenizerTest, HoldsBackSplitCharacters) {
  StreamingDetokenizer stream(Tok());
  // "€" = E2 82 AC as three byte tokens, then "a".
  EXPECT_EQ(PushAll(stream, {B('a'), B(0xE2), B(0x82), B(0xAC), B('b')}),
            (std::vector<std::string>{"a", "", "", "\xE2\x82\xAC", "b", ""}));
  EXPECT_EQ(stream.pending_bytes(), 0u);
  // A merged token holding the first two bytes, then one holding "\xACx".
  EXPECT_EQ(PushAll(stream, {kE282, kACx}), (std::vector<std::string>{"", "\xE2\x82\xACx", ""}));
}

TEST(StreamingDetokenizerTest, InvalidBytesBecomeReplacementCharacters) {
  StreamingDetokenizer stream(Tok());
  const std::string r(kReplacementChar);
  // 0xFF can never start a character: replaced at once.
  EXPECT_EQ(PushAll(stream, {B(0xFF), B('a')}), (std::vector<std::string>{r, "a", ""}));
  // E2 82 then 'a': the pair is a dead maximal subpart -> one U+FFFD.
  EXPECT_EQ(PushAll(stream, {kE282, B('a')}), (std::vector<std::string>{"", r + "a", ""}));
  // A dangling tail at the end becomes one U+FFFD.
  EXPECT_EQ(PushAll(stream, {B('z'), kE282}), (std::vector<std::string>{"z", "", r}));
}

TEST(StreamingDetokenizerTest, SpecialTokensRenderedPerOption) {
  StreamingDetokenizer render(Tok());
  EXPECT_EQ(PushAll(render, {0, B('a'), 1}), (std::vector<std::string>{"<s>", "a", "</s>", ""}));
  DetokenizeOptions remove;
  remove.render_special = false;
  StreamingDetokenizer quiet(Tok(), remove);
  // A special token in the middle of a split character does not flush it.
  EXPECT_EQ(PushAll(quiet, {B(0xE2), 1, B(0x82), B(0xAC)}),
            (std::vector<std::string>{"", "", "", "\xE2\x82\xAC", ""}));
}

TEST(StreamingDetokenizerTest, RejectsIdsOutOfRangeWithoutLosingState) {
  StreamingDetokenizer stream(Tok());
  ASSERT_TRUE(stream.Push(B(0xE2)).ok());
  auto bad = stream.Push(Tok().n_vocab());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(stream.pending_bytes(), 1u);
  EXPECT_EQ(*stream.Push(B(0x82)), "");
  EXPECT_EQ(*stream.Push(B(0xAC)), "\xE2\x82\xAC");
}

TEST(StreamingDetokenizerTest, RandomStreamsEqualSanitizedFullDetokenization) {
  std::mt19937 rng(99);
  const uint8_t interesting[] = {'a',  ' ',  0xE2, 0x82, 0xAC, 0xF0, 0x9F,
                                 0x98, 0x80, 0xC3, 0xA9, 0xFF, 0xED, 0xA0};
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int32_t> ids;
    const int n = static_cast<int>(rng() % 30);
    for (int i = 0; i < n; ++i) {
      const uint32_t pick = rng() % 20;
      if (pick == 0) {
        ids.push_back(kE282);
      } else if (pick == 1) {
        ids.push_back(kACx);
      } else if (pick == 2) {
        ids.push_back(static_cast<int32_t>(rng() % 2));  // <s> or </s>
      } else {
        ids.push_back(B(interesting[rng() % sizeof(interesting)]));
      }
    }
    StreamingDetokenizer stream(Tok());
    std::string streamed;
    for (const std::string& part : PushAll(stream, ids)) {
      EXPECT_TRUE(IsValidUtf8(part));
      streamed += part;
    }
    EXPECT_EQ(streamed, SanitizeUtf8(*Tok().Detokenize(ids))) << "trial " << trial;
  }
}

}  // namespace
}  // namespace ktx::tokenizer
