// Strict UTF-8 scanning and U+FFFD substitution. The expected outputs are
// CPython's bytes.decode('utf-8', 'replace') (which substitutes maximal
// subparts), written down here as data.
#include "runtime/tokenizer/utf8.h"

#include <string>

#include "gtest/gtest.h"

namespace ktx::tokenizer {
namespace {

const std::string kR(kReplacementChar);

struct SanitizeCase {
  std::string input;
  std::string expected;
};

TEST(Utf8Test, SanitizeMatchesMaximalSubpartReference) {
  const SanitizeCase cases[] = {
      {"", ""},
      {"plain ascii", "plain ascii"},
      {"\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80", "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80"},
      {"a\xFF"
       "b",
       "a" + kR + "b"},
      {"\xE2\x82", kR},
      {"\xE2\x82"
       "a",
       kR + "a"},
      {"\xF0\x9F\x98", kR},
      {"\xED\xA0\x80", kR + kR + kR},           // surrogate U+D800
      {"\xC0\xAF", kR + kR},                    // overlong '/'
      {"\xF4\x90\x80\x80", kR + kR + kR + kR},  // above U+10FFFF
      {"\xE0\x80\xAF", kR + kR + kR},           // overlong
      {"\xF0\x80\x80", kR + kR + kR},           // overlong
      {"a\x80\x80"
       "b",
       "a" + kR + kR + "b"},  // stray continuations
      {"\xF5", kR},
      {"\xE2\x82\xE2\x82\xAC", kR + "\xE2\x82\xAC"},
  };
  for (const SanitizeCase& c : cases) {
    EXPECT_EQ(SanitizeUtf8(c.input), c.expected) << "input of " << c.input.size() << " bytes";
    EXPECT_EQ(IsValidUtf8(c.input), c.input == c.expected);
  }
}

TEST(Utf8Test, ScanClassifiesPrefixes) {
  size_t len = 0;
  EXPECT_EQ(ScanUtf8("\xE2\x82\xAC", &len), Utf8Scan::kValid);
  EXPECT_EQ(len, 3u);
  EXPECT_EQ(ScanUtf8("\xE2\x82", &len), Utf8Scan::kIncomplete);
  EXPECT_EQ(len, 2u);
  EXPECT_EQ(ScanUtf8("\xF0", &len), Utf8Scan::kIncomplete);
  EXPECT_EQ(len, 1u);
  EXPECT_EQ(ScanUtf8("\xF0\x8F", &len), Utf8Scan::kInvalid);  // overlong 4-byte
  EXPECT_EQ(len, 1u);
  EXPECT_EQ(ScanUtf8("\xE2\x82x", &len), Utf8Scan::kInvalid);
  EXPECT_EQ(len, 2u);
  EXPECT_EQ(ValidUtf8Prefix("ab\xC3\xA9\xE2\x82"), 4u);
}

TEST(Utf8Test, HoldingTheTailPieceByPieceEqualsWholeSanitize) {
  const std::string inputs[] = {
      "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9",
      "x\xE2\x82\xE2\x82\xAC\xFF\xF0\x9F\x98",
      "\xED\xA0\x80\xC3",
  };
  for (const std::string& input : inputs) {
    for (size_t step = 1; step <= 3; ++step) {
      std::string out;
      std::string pending;
      for (size_t pos = 0; pos < input.size(); pos += step) {
        std::string bytes = pending + input.substr(pos, step);
        const size_t held = AppendSanitizedUtf8(bytes, /*hold_incomplete_tail=*/true, &out);
        pending = bytes.substr(bytes.size() - held);
        EXPECT_TRUE(IsValidUtf8(out));
      }
      out += SanitizeUtf8(pending);
      EXPECT_EQ(out, SanitizeUtf8(input)) << "step " << step;
    }
  }
}

TEST(Utf8Test, AppendUtf8EncodesEachLength) {
  std::string s;
  AppendUtf8(U'A', &s);
  AppendUtf8(U'\u00E9', &s);
  AppendUtf8(U'\u20AC', &s);
  AppendUtf8(U'\U0001F600', &s);
  EXPECT_EQ(s, "A\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80");
}

}  // namespace
}  // namespace ktx::tokenizer
