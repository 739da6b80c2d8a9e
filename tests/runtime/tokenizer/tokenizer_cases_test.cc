// The tokenizer against llama.cpp on the fixture vocabulary: every case of
// tests/data/tokenizer_cases.json (tests/data/README.md section 8), with
// parse_special on and off: ids, pieces, both detokenizations, round trip,
// and the streaming detokenizer.
#include <algorithm>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/gguf/gguf.h"
#include "runtime/tokenizer/streaming_detokenizer.h"
#include "runtime/tokenizer/tokenizer.h"
#include "runtime/tokenizer/tokenizer_gguf.h"
#include "runtime/tokenizer/utf8.h"

namespace ktx::tokenizer {
namespace {

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

std::string FromHex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

std::string ToHex(std::string_view bytes) {
  static const char* const kDigits = "0123456789abcdef";
  std::string out;
  for (char c : bytes) {
    out.push_back(kDigits[static_cast<uint8_t>(c) >> 4]);
    out.push_back(kDigits[static_cast<uint8_t>(c) & 15]);
  }
  return out;
}

Tokenizer LoadFixtureTokenizer(const std::string& file) {
  auto gguf = gguf::GgufFile::Open(kDataDir + file);
  EXPECT_TRUE(gguf.ok()) << gguf.status();
  auto tok = TokenizerFromGguf((*gguf)->metadata());
  EXPECT_TRUE(tok.ok()) << tok.status();
  return *tok;
}

class TokenizerCasesTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tokenizer_ = new Tokenizer(LoadFixtureTokenizer("dsv3-tiny-q8_0.gguf"));
    std::ifstream in(kDataDir + "tokenizer_cases.json");
    ASSERT_TRUE(in) << "cannot open tokenizer_cases.json";
    cases_ = new nlohmann::json(nlohmann::json::parse(in));
  }
  static const Tokenizer& tok() { return *tokenizer_; }
  static const nlohmann::json& cases() { return (*cases_)["cases"]; }

  static Tokenizer* tokenizer_;
  static nlohmann::json* cases_;
};
Tokenizer* TokenizerCasesTest::tokenizer_ = nullptr;
nlohmann::json* TokenizerCasesTest::cases_ = nullptr;

TEST_F(TokenizerCasesTest, FixtureVocabularyAsDocumented) {
  EXPECT_EQ(tok().n_vocab(), 512);
  EXPECT_EQ(tok().bos_id(), 0);
  EXPECT_EQ(tok().eos_id(), 1);
  EXPECT_EQ(tok().pad_id(), 2);
  EXPECT_TRUE(tok().add_bos());
  EXPECT_EQ(tok().TokenTypeOf(0), TokenType::kControl);
  EXPECT_EQ(tok().TokenText(1), "<｜end▁of▁sentence｜>");
  EXPECT_EQ(tok().pre(), "deepseek-v3");
  EXPECT_EQ(cases().size(), 26u);
}

TEST_F(TokenizerCasesTest, AllCasesMatchLlamaCpp) {
  for (const auto& c : cases()) {
    const std::string name = c["name"];
    const std::string text = c["text"];
    for (const bool parse_special : {true, false}) {
      SCOPED_TRACE(name + (parse_special ? " / parse_special" : " / no_parse_special"));
      const auto& ref = c[parse_special ? "parse_special" : "no_parse_special"];
      TokenizeOptions options;
      options.parse_special = parse_special;
      auto ids = tok().Tokenize(text, options);
      ASSERT_TRUE(ids.ok()) << ids.status();
      EXPECT_EQ(*ids, ref["ids"].get<std::vector<int32_t>>());

      std::vector<std::string> pieces;
      for (int32_t id : *ids) pieces.push_back(ToHex(tok().Piece(id, /*render_special=*/true)));
      EXPECT_EQ(pieces, ref["pieces_hex"].get<std::vector<std::string>>());

      auto detok = tok().Detokenize(*ids);
      ASSERT_TRUE(detok.ok());
      EXPECT_EQ(*detok, FromHex(ref["detokenized_hex"]));
      EXPECT_EQ(*detok, ref["detokenized"].get<std::string>());
      DetokenizeOptions remove;
      remove.render_special = false;
      EXPECT_EQ(*tok().Detokenize(*ids, remove),
                ref["detokenized_remove_special"].get<std::string>());

      ASSERT_TRUE(ref["round_trip_equal"].get<bool>());
      EXPECT_EQ(*detok, tok().TokenText(tok().bos_id()) + text);
    }
  }
}

TEST_F(TokenizerCasesTest, StreamingEqualsFullDetokenization) {
  for (const auto& c : cases()) {
    for (const char* mode : {"parse_special", "no_parse_special"}) {
      const auto ids = c[mode]["ids"].get<std::vector<int32_t>>();
      const std::string full = FromHex(c[mode]["detokenized_hex"]);
      for (const bool render_special : {true, false}) {
        SCOPED_TRACE(std::string(c["name"]) + " / " + mode + (render_special ? "" : " / removed"));
        DetokenizeOptions options;
        options.render_special = render_special;
        StreamingDetokenizer stream(tok(), options);
        std::string streamed;
        for (int32_t id : ids) {
          auto part = stream.Push(id);
          ASSERT_TRUE(part.ok());
          EXPECT_TRUE(IsValidUtf8(*part)) << ToHex(*part);
          streamed += *part;
        }
        EXPECT_EQ(stream.pending_bytes(), 0u);
        streamed += stream.Finish();
        EXPECT_EQ(streamed,
                  render_special ? full : c[mode]["detokenized_remove_special"].get<std::string>());
      }
    }
  }
}

TEST_F(TokenizerCasesTest, InvalidUtf8TokenizesAsBytesAndRoundTrips) {
  TokenizeOptions options;
  options.add_bos = false;
  // 0xFF and a truncated "中" (E4 B8): byte tokens, nothing lost, no crash.
  auto ids = tok().Tokenize(
      "ab\xFF"
      "cd\xE4\xB8",
      options);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*tok().Detokenize(*ids),
            "ab\xFF"
            "cd\xE4\xB8");
  EXPECT_NE(std::find(ids->begin(), ids->end(), *tok().FindToken("ÿ")), ids->end());  // byte 0xFF

  std::mt19937 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    std::string bytes(rng() % 64, '\0');
    for (char& ch : bytes) ch = static_cast<char>(rng() % 4 == 0 ? rng() % 256 : 'a' + rng() % 5);
    for (bool parse_special : {true, false}) {
      options.parse_special = parse_special;
      auto t = tok().Tokenize(bytes, options);
      ASSERT_TRUE(t.ok()) << t.status();
      EXPECT_EQ(*tok().Detokenize(*t), bytes) << "trial " << trial;
      StreamingDetokenizer stream(tok());
      std::string streamed;
      for (int32_t id : *t) streamed += *stream.Push(id);
      streamed += stream.Finish();
      EXPECT_EQ(streamed, SanitizeUtf8(bytes));
    }
  }
}

TEST_F(TokenizerCasesTest, AllFixturesShareTheVocabulary) {
  for (const char* file : {"dsv3-tiny-bf16.gguf", "dsv3-tiny-q4_k_m.gguf"}) {
    Tokenizer other = LoadFixtureTokenizer(file);
    ASSERT_EQ(other.n_vocab(), tok().n_vocab()) << file;
    EXPECT_EQ(other.n_merges(), tok().n_merges()) << file;
    for (int32_t id = 0; id < tok().n_vocab(); ++id) {
      ASSERT_EQ(other.TokenText(id), tok().TokenText(id)) << file << " id " << id;
    }
    const std::string text = "Tom found an old map in the attic.";
    EXPECT_EQ(*other.Tokenize(text), *tok().Tokenize(text)) << file;
  }
}

TEST_F(TokenizerCasesTest, ManifestPromptTokens) {
  std::ifstream in(kDataDir + "manifest.json");
  ASSERT_TRUE(in);
  const nlohmann::json manifest = nlohmann::json::parse(in);
  auto ids = tok().Tokenize(manifest["prompt"].get<std::string>());
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, manifest["prompt_tokens"].get<std::vector<int32_t>>());
}

}  // namespace
}  // namespace ktx::tokenizer
