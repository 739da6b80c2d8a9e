// The GPT-2 byte-level alphabet: known fixed points of the published mapping
// ('Ġ' for space, 'Ċ' for newline, 'ĉ' for tab, 'Ā' for 0x00, 'ł' for 0xAD),
// a bijection over all 256 bytes, and its inverse.
#include "runtime/tokenizer/byte_level.h"

#include <set>
#include <string>

#include "gtest/gtest.h"

namespace ktx::tokenizer {
namespace {

TEST(ByteLevelTest, KnownSymbols) {
  EXPECT_EQ(ByteToText(' '), "Ġ");
  EXPECT_EQ(ByteToText('\n'), "Ċ");
  EXPECT_EQ(ByteToText('\t'), "ĉ");
  EXPECT_EQ(ByteToText('\r'), "č");
  EXPECT_EQ(ByteToText(0x00), "Ā");
  EXPECT_EQ(ByteToText(0x7F), "ġ");
  EXPECT_EQ(ByteToText(0xA0), "ł");
  EXPECT_EQ(ByteToText(0xAD), "Ń");
  EXPECT_EQ(ByteToText('a'), "a");
  EXPECT_EQ(ByteToText(0xE9), "é");
  EXPECT_EQ(ByteToCodepoint(0xFF), U'\u00FF');
}

TEST(ByteLevelTest, BijectionAndInverse) {
  std::set<char32_t> seen;
  std::string all;
  for (int b = 0; b < 256; ++b) {
    seen.insert(ByteToCodepoint(static_cast<uint8_t>(b)));
    all.push_back(static_cast<char>(b));
  }
  EXPECT_EQ(seen.size(), 256u);
  EXPECT_EQ(*seen.rbegin(), U'\u0143');  // 68 remapped bytes: U+0100..U+0143
  std::string text;
  AppendByteLevelText(all, &text);
  auto back = DecodeByteLevelText(text);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(*back, all);
}

TEST(ByteLevelTest, RejectsTextOutsideTheAlphabet) {
  EXPECT_FALSE(DecodeByteLevelText("\xE2\x82\xAC").has_value());  // '€' is not a symbol
  EXPECT_FALSE(DecodeByteLevelText("a b").has_value());           // raw space is not either
  EXPECT_FALSE(DecodeByteLevelText("\xC1\x81").has_value());      // overlong 'A'
  EXPECT_FALSE(DecodeByteLevelText("\xC4").has_value());          // truncated
  EXPECT_EQ(DecodeByteLevelText("ĠtheĊ").value(), " the\n");
}

}  // namespace
}  // namespace ktx::tokenizer
