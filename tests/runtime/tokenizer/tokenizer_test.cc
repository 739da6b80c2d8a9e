// Tokenizer on small synthetic vocabularies whose BPE results are worked out
// by hand from the merge ranks; the llama.cpp-generated fixture cases are in
// tokenizer_cases_test.cc.
#include "runtime/tokenizer/tokenizer.h"

#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/runtime/tokenizer/test_vocab.h"

namespace ktx::tokenizer {
namespace {

using testing::ByteId;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::MakeData;

constexpr int kNumSpecials = 6;
constexpr int32_t kBos = 0;
constexpr int32_t kEos = 1;
constexpr int32_t kUser = 2;  // "<u>", USER_DEFINED
constexpr int32_t kX = 3;     // "<x>"
constexpr int32_t kXy = 4;    // "<x>y"
constexpr int32_t kLtLt = 5;  // "<<"

// Merge k's token id (all merge results below are distinct).
constexpr int32_t M(int k) { return kNumSpecials + 256 + k; }
int32_t B(char c) { return ByteId(kNumSpecials, static_cast<uint8_t>(c)); }

TokenizerData Data() {
  return MakeData({{"<s>", TokenType::kControl},
                   {"</s>", TokenType::kControl},
                   {"<u>", TokenType::kUserDefined},
                   {"<x>", TokenType::kControl},
                   {"<x>y", TokenType::kControl},
                   {"<<", TokenType::kControl}},
                  {
                      {"b", "c"},       // M(0) rank 0
                      {"a", "b"},       // M(1) rank 1
                      {"a", "bc"},      // M(2) rank 2
                      {"a", "a"},       // M(3) rank 3
                      {" ", "t"},       // M(4) rank 4
                      {"h", "e"},       // M(5) rank 5
                      {" t", "he"},     // M(6) rank 6
                      {"\xE2", "\x82"}  // M(7) rank 7: a partial UTF-8 sequence
                  });
}

const Tokenizer& Tok() {
  static const Tokenizer* const tok = new Tokenizer(Tokenizer::Create(Data()).value());
  return *tok;
}

std::vector<int32_t> Ids(std::string_view text, TokenizeOptions options = {}) {
  if (!options.add_bos.has_value()) options.add_bos = false;
  auto ids = Tok().Tokenize(text, options);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

TEST(TokenizerTest, MergesFollowRankNotPosition) {
  // (b,c) has rank 0 < (a,b) rank 1, so "abc" -> a + bc -> abc, never ab + c.
  EXPECT_THAT(Ids("abc"), ElementsAre(M(2)));
  EXPECT_THAT(Ids("abd"), ElementsAre(M(1), B('d')));
  EXPECT_THAT(Ids(" the"), ElementsAre(M(6)));
  EXPECT_THAT(Ids("the"), ElementsAre(B('t'), M(5)));
}

TEST(TokenizerTest, EqualRanksMergeLeftmostFirst) {
  EXPECT_THAT(Ids("aaa"), ElementsAre(M(3), B('a')));
  EXPECT_THAT(Ids("aaaaa"), ElementsAre(M(3), M(3), B('a')));
}

TEST(TokenizerTest, MergesNeverCrossPreTokenizerPieces) {
  // "a bc": pieces "a", " bc"; " bc" has no " b" merge -> ' ', bc.
  EXPECT_THAT(Ids("a bc"), ElementsAre(B('a'), B(' '), M(0)));
  EXPECT_THAT(Ids("ab12"), ElementsAre(M(1), B('1'), B('2')));
}

TEST(TokenizerTest, BosAndEos) {
  EXPECT_THAT(*Tok().Tokenize("ab"), ElementsAre(kBos, M(1)));
  TokenizeOptions options;
  options.add_eos = true;
  EXPECT_THAT(*Tok().Tokenize("ab", options), ElementsAre(kBos, M(1), kEos));
  EXPECT_THAT(*Tok().Tokenize(""), ElementsAre(kBos));
}

TEST(TokenizerTest, SpecialTokensParsedWhenAllowed) {
  EXPECT_THAT(Ids("<s>abc</s>"), ElementsAre(kBos, M(2), kEos));
  TokenizeOptions plain;
  plain.parse_special = false;
  // Pieces "<s", ">abc", "</", "s", ">".
  EXPECT_THAT(Ids("<s>abc</s>", plain),
              ElementsAre(B('<'), B('s'), B('>'), M(2), B('<'), B('/'), B('s'), B('>')));
}

TEST(TokenizerTest, SpecialTokensLeftmostLongest) {
  EXPECT_THAT(Ids("<x>y"), ElementsAre(kXy));
  EXPECT_THAT(Ids("<x>z"), ElementsAre(kX, B('z')));
  // "<<x>": the leftmost match "<<" wins over the longer "<x>" starting later.
  EXPECT_THAT(Ids("<<x>"), ElementsAre(kLtLt, B('x'), B('>')));
  EXPECT_THAT(Ids("a<x>"), ElementsAre(B('a'), kX));
}

TEST(TokenizerTest, UserDefinedTokens) {
  EXPECT_THAT(Ids("a<u>b"), ElementsAre(B('a'), kUser, B('b')));
  TokenizeOptions plain;
  plain.parse_special = false;
  EXPECT_THAT(Ids("<u>", plain), ElementsAre(B('<'), B('u'), B('>')));
  plain.always_parse_user_defined = true;
  EXPECT_THAT(Ids("<u><s>", plain), ElementsAre(kUser, B('<'), B('s'), B('>')));
}

TEST(TokenizerTest, DetokenizeRendersOrRemovesSpecials) {
  const std::vector<int32_t> ids = {kBos, M(2), kUser, B(' '), kX, kEos};
  EXPECT_EQ(*Tok().Detokenize(ids), "<s>abc<u> <x></s>");
  DetokenizeOptions remove;
  remove.render_special = false;
  EXPECT_EQ(*Tok().Detokenize(ids, remove), "abc<u> ");
  EXPECT_EQ(Tok().Piece(M(4)), " t");
  EXPECT_EQ(Tok().Piece(M(7)), "\xE2\x82");
  EXPECT_EQ(Tok().Piece(kBos, /*render_special=*/false), "");
}

TEST(TokenizerTest, DetokenizeRejectsIdsOutOfRange) {
  auto text = Tok().Detokenize(std::vector<int32_t>{M(1), Tok().n_vocab()});
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(text.status().message()), HasSubstr("position 1"));
  EXPECT_FALSE(Tok().Detokenize(std::vector<int32_t>{-1}).ok());
}

TEST(TokenizerTest, InvalidUtf8RoundTripsAsBytes) {
  TokenizeOptions plain;
  plain.parse_special = false;
  // 0xE2 0x82 is merged even though it is an incomplete character.
  EXPECT_THAT(Ids("x\xE2\x82", plain), ElementsAre(B('x'), M(7)));
  EXPECT_THAT(Ids("\xFF"
                  "ab",
                  plain),
              ElementsAre(B('\xFF'), M(1)));
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 200; ++trial) {
    std::string bytes(rng() % 40, '\0');
    for (char& c : bytes) {
      // Mostly the interesting bytes: letters, spaces, '<', high bytes.
      const char alphabet[] = {'a',    'b',    'c',    ' ',    '<',    's',    '>', '\n',
                               '\xE2', '\x82', '\xAC', '\xFF', '\xC3', '\xA9', '1', '\t'};
      c = alphabet[rng() % sizeof(alphabet)];
    }
    for (bool parse_special : {false, true}) {
      TokenizeOptions options;
      options.parse_special = parse_special;
      auto back = Tok().Detokenize(Ids(bytes, options));
      ASSERT_TRUE(back.ok());
      EXPECT_EQ(*back, bytes) << "trial " << trial;
    }
  }
}

TEST(TokenizerTest, Accessors) {
  const Tokenizer& tok = Tok();
  EXPECT_EQ(tok.n_vocab(), kNumSpecials + 256 + 8);
  EXPECT_EQ(tok.n_merges(), 8);
  EXPECT_EQ(tok.bos_id(), kBos);
  EXPECT_EQ(tok.eos_id(), kEos);
  EXPECT_TRUE(tok.IsEndOfGeneration(kEos));
  EXPECT_FALSE(tok.IsEndOfGeneration(kBos));
  EXPECT_TRUE(tok.IsSpecial(kUser));
  EXPECT_FALSE(tok.IsSpecial(M(0)));
  EXPECT_EQ(tok.FindToken("Ġt"), M(4));
  EXPECT_EQ(tok.FindToken("<x>"), kX);
  EXPECT_EQ(tok.FindToken("nope"), std::nullopt);
  EXPECT_EQ(tok.TokenTypeOf(kUser), TokenType::kUserDefined);
  EXPECT_STREQ(TokenTypeName(TokenType::kControl), "CONTROL");
}

TEST(TokenizerTest, UnusedTokensRenderAsNothing) {
  TokenizerData data = Data();
  data.tokens.push_back("<unused>");
  data.token_types.push_back(TokenType::kUnused);
  auto tok = Tokenizer::Create(std::move(data));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(*tok->Detokenize(std::vector<int32_t>{B('a'), tok->n_vocab() - 1}), "a");
}

absl::Status CreateError(TokenizerData data) { return Tokenizer::Create(std::move(data)).status(); }

void ExpectError(const absl::Status& status, std::initializer_list<std::string> parts) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  for (const std::string& part : parts) {
    EXPECT_THAT(std::string(status.message()), HasSubstr(part));
  }
}

TEST(TokenizerTest, CreateErrorsNameTheProblem) {
  TokenizerData d = Data();
  d.model = "llama";
  ExpectError(CreateError(d), {"'llama'", "gpt2"});

  d = Data();
  d.pre = "qwen2";
  ExpectError(CreateError(d), {"'qwen2'", "deepseek-v3"});

  d = Data();
  d.tokens.clear();
  d.token_types.clear();
  ExpectError(CreateError(d), {"no tokens"});

  d = Data();
  d.token_types.pop_back();
  ExpectError(CreateError(d), {"token_type", "one per token"});

  d = Data();
  d.token_types[7] = static_cast<TokenType>(9);
  ExpectError(CreateError(d), {"token_type[7]", "9"});

  d = Data();
  d.tokens[B('A')] = "A-renamed";
  ExpectError(CreateError(d), {"byte 0x41"});

  d = Data();
  d.merges.push_back("ab");
  ExpectError(CreateError(d), {"merges[8]", "'ab'"});

  d = Data();
  d.merges.push_back("x y");  // "xy" is not a token
  ExpectError(CreateError(d), {"merges[8]", "'xy'", "not a token"});

  d = Data();
  d.bos_id = static_cast<int32_t>(d.tokens.size());
  ExpectError(CreateError(d), {"BOS token id", "tokenizer.ggml.bos_token_id", "out of range"});

  d = Data();
  d.pad_id = -5;
  ExpectError(CreateError(d), {"padding token id -5"});

  d = Data();
  d.bos_id = -1;
  ExpectError(CreateError(d), {"add_bos_token", "no BOS id"});
}

}  // namespace
}  // namespace ktx::tokenizer
