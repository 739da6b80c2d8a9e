// The deepseek-v3 split, on inputs whose expected pieces follow from the
// published regexes (see pre_tokenizer.h) by hand; the end-to-end check
// against llama.cpp is tokenizer_cases_test.
#include "runtime/tokenizer/pre_tokenizer.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ktx::tokenizer {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

std::vector<std::string> Split(std::string_view text) {
  static const PreTokenizer* const pre =
      new PreTokenizer(PreTokenizer::Create("deepseek-v3").value());
  std::vector<std::string_view> pieces;
  absl::Status status = pre->Split(text, &pieces);
  EXPECT_TRUE(status.ok()) << status;
  std::vector<std::string> out(pieces.begin(), pieces.end());
  std::string joined;
  for (const std::string& p : out) {
    EXPECT_FALSE(p.empty());
    joined += p;
  }
  EXPECT_EQ(joined, text);
  return out;
}

TEST(PreTokenizerTest, WordsKeepTheirLeadingSpace) {
  EXPECT_THAT(Split("Hello world"), ElementsAre("Hello", " world"));
  EXPECT_THAT(Split(" leading"), ElementsAre(" leading"));
}

TEST(PreTokenizerTest, DigitsInGroupsOfAtMostThree) {
  EXPECT_THAT(Split("12345 678"), ElementsAre("123", "45", " ", "678"));
  EXPECT_THAT(Split("x2y"), ElementsAre("x", "2", "y"));
  EXPECT_THAT(Split("1,000"), ElementsAre("1", ",", "000"));
}

TEST(PreTokenizerTest, SpaceRunsLeaveOneSpaceForTheNextWord) {
  EXPECT_THAT(Split("a   b"), ElementsAre("a", "  ", " b"));
  EXPECT_THAT(Split("a  "), ElementsAre("a", "  "));
  EXPECT_THAT(Split("  x"), ElementsAre(" ", " x"));
}

TEST(PreTokenizerTest, NewlineRuns) {
  EXPECT_THAT(Split("a\n\nb"), ElementsAre("a", "\n\n", "b"));
  EXPECT_THAT(Split("a \n b"), ElementsAre("a", " \n", " b"));
  EXPECT_THAT(Split("x\r\ny"), ElementsAre("x", "\r\n", "y"));
}

TEST(PreTokenizerTest, PunctuationAndContractions) {
  EXPECT_THAT(Split("don't"), ElementsAre("don", "'t"));
  EXPECT_THAT(Split("Hello, world!"), ElementsAre("Hello", ",", " world", "!"));
  EXPECT_THAT(Split("a.b"), ElementsAre("a", ".b"));
  EXPECT_THAT(Split("end.\n\nNext"), ElementsAre("end", ".\n\n", "Next"));
  EXPECT_THAT(Split("x = (y)"), ElementsAre("x", " =", " (", "y", ")"));
}

TEST(PreTokenizerTest, NonLetterLeadCharacter) {
  EXPECT_THAT(Split("tab\tx"), ElementsAre("tab", "\tx"));
  // e + COMBINING ACUTE ACCENT stays one word with the letters.
  EXPECT_THAT(Split("caf\x65\xCC\x81 ok"), ElementsAre("caf\x65\xCC\x81", " ok"));
}

TEST(PreTokenizerTest, CjkRunsAreIsolated) {
  // 中文 | ： | 你好 (the fullwidth colon is punctuation).
  EXPECT_THAT(Split("中文：你好"), ElementsAre("中文", "：", "你好"));
  // Hangul is not in the CJK class: it stays with the letters before it.
  EXPECT_THAT(Split("ab日本cd한국"), ElementsAre("ab", "日本", "cd한국"));
  EXPECT_THAT(Split("テキストと"), ElementsAre("テキストと"));
}

TEST(PreTokenizerTest, InvalidUtf8BytesArePiecesOfTheirOwn) {
  EXPECT_THAT(Split("ab\xFF"
                    "cd"),
              ElementsAre("ab", "\xFF", "cd"));
  EXPECT_THAT(Split("a\xE4\xB8"), ElementsAre("a", "\xE4\xB8"));
  EXPECT_THAT(Split("\xC0\xAF x"), ElementsAre("\xC0", "\xAF", " x"));
  EXPECT_THAT(Split(""), ElementsAre());
}

TEST(PreTokenizerTest, LongRunsSplitInLinearPieces) {
  // A megabyte of spaces and one of letters: neither crashes nor fails.
  std::string spaces(1 << 20, ' ');
  EXPECT_THAT(Split(spaces), ElementsAreArray({spaces}));
  std::string letters(1 << 20, 'a');
  EXPECT_THAT(Split(letters + " b"), ElementsAre(letters, " b"));
}

TEST(PreTokenizerTest, UnknownNameListsSupported) {
  auto pre = PreTokenizer::Create("llama3");
  ASSERT_FALSE(pre.ok());
  EXPECT_EQ(pre.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(pre.status().message()), HasSubstr("'llama3'"));
  EXPECT_THAT(std::string(pre.status().message()), HasSubstr("deepseek-v3"));
}

}  // namespace
}  // namespace ktx::tokenizer
