#include "runtime/synth/synth_vocab.h"

#include <map>
#include <memory>
#include <set>
#include <string>

#include "gtest/gtest.h"
#include "runtime/gguf/gguf.h"

namespace ktx::synth {
namespace {

// The byte tokens must be exactly GPT-2's byte-to-unicode characters: the
// fixture's vocabulary (written by llama.cpp tooling) holds the same 256
// strings at ids 3..258 (in GPT-2's own order).
TEST(SynthVocabTest, ByteTokensEqualFixtureByteTokens) {
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> f =
      gguf::GgufFile::Open(std::string(KTX_SOURCE_DIR) + "/tests/data/dsv3-tiny-q8_0.gguf");
  ASSERT_TRUE(f.ok()) << f.status();
  absl::StatusOr<std::vector<std::string>> tokens =
      (*f)->metadata().GetStringArray("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  const std::set<std::string> fixture_bytes(tokens->begin() + 3, tokens->begin() + 259);
  std::set<std::string> ours;
  for (int b = 0; b < 256; ++b) ours.insert(ByteToUnicode(static_cast<uint8_t>(b)));
  EXPECT_EQ(ours, fixture_bytes);
  // The same three control tokens at the same ids.
  absl::StatusOr<SynthVocab> v = BuildSynthVocab(512);
  ASSERT_TRUE(v.ok());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(v->tokens[i], (*tokens)[i]);
  EXPECT_EQ(ByteToUnicode(' '), "\xC4\xA0");   // U+0120 'Ġ'
  EXPECT_EQ(ByteToUnicode('\n'), "\xC4\x8A");  // U+010A 'Ċ'
  EXPECT_EQ(ByteToUnicode('A'), "A");
  EXPECT_EQ(ByteToUnicode(0xAD), "\xC5\x83");  // soft hyphen -> U+0143
}

void ExpectValidVocab(int64_t n_vocab) {
  absl::StatusOr<SynthVocab> v = BuildSynthVocab(n_vocab);
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_EQ(static_cast<int64_t>(v->tokens.size()), n_vocab);
  ASSERT_EQ(v->token_types.size(), v->tokens.size());
  ASSERT_EQ(static_cast<int64_t>(v->merges.size()), n_vocab - kMinSynthVocab);
  std::map<std::string, size_t> id_of;
  for (size_t i = 0; i < v->tokens.size(); ++i) {
    ASSERT_TRUE(id_of.emplace(v->tokens[i], i).second) << "duplicate token " << v->tokens[i];
  }
  // Merge k "a b": a and b exist with ids below the token it creates (259 + k),
  // and that token is exactly a + b.
  for (size_t k = 0; k < v->merges.size(); ++k) {
    const std::string& m = v->merges[k];
    const size_t space = m.find(' ');
    ASSERT_NE(space, std::string::npos) << m;
    ASSERT_EQ(m.find(' ', space + 1), std::string::npos) << m;
    const std::string a = m.substr(0, space), b = m.substr(space + 1);
    const size_t created = 259 + k;
    ASSERT_TRUE(id_of.count(a) && id_of.count(b)) << m;
    EXPECT_LT(id_of[a], created) << m;
    EXPECT_LT(id_of[b], created) << m;
    EXPECT_EQ(v->tokens[created], a + b) << m;
  }
  EXPECT_EQ(v->token_types[0], kTokenTypeControl);
  EXPECT_EQ(v->token_types[3], kTokenTypeNormal);
  EXPECT_EQ(v->tokens[static_cast<size_t>(n_vocab) - 4], "<｜User｜>");
  EXPECT_EQ(v->tokens[static_cast<size_t>(n_vocab) - 3], "<｜Assistant｜>");
  EXPECT_EQ(v->token_types.back(), kTokenTypeUserDefined);
}

TEST(SynthVocabTest, MergesAreValidBpeForManySizes) {
  for (int64_t n : {kMinSynthVocab, int64_t{300}, int64_t{512}, int64_t{4099}}) ExpectValidVocab(n);
}

TEST(SynthVocabTest, FullSizeVocabulary) { ExpectValidVocab(129280); }

TEST(SynthVocabTest, LearnedMergesComeFirst) {
  absl::StatusOr<SynthVocab> v = BuildSynthVocab(1000);
  ASSERT_TRUE(v.ok());
  // The most frequent adjacent pair of the training text (counted separately:
  // 'h e' 33 times, 'Ġ t' 31, 't h' 25) is the first merge.
  EXPECT_EQ(v->merges[0], "h e");
  // The word " the" is one token.
  bool has_the = false;
  for (const std::string& t : v->tokens) has_the |= t == "\xC4\xA0the";
  EXPECT_TRUE(has_the);
}

TEST(SynthVocabTest, TooSmallIsAnError) {
  absl::StatusOr<SynthVocab> v = BuildSynthVocab(kMinSynthVocab - 1);
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("--vocab"), std::string::npos);
}

TEST(SynthVocabTest, ChatTemplateUsesDeepSeekTurnTokens) {
  const std::string& t = SynthChatTemplate();
  // What llama.cpp's template detection looks for to pick its DeepSeek-V3 format.
  EXPECT_NE(t.find("<｜User｜>"), std::string::npos);
  EXPECT_NE(t.find("<｜Assistant｜>"), std::string::npos);
  EXPECT_NE(t.find("<｜end▁of▁sentence｜>"), std::string::npos);
  EXPECT_NE(t.find("add_generation_prompt"), std::string::npos);
}

}  // namespace
}  // namespace ktx::synth
