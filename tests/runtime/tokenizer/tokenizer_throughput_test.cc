// Tokenize throughput with a 100k-token vocabulary (the size class of
// DeepSeek-V3's 129k): the target is >= 1 MB/s of English-like text. The
// vocabulary is synthetic: all letter pairs (" a", "ab", ...) and ~99k
// four-letter merges of those pairs, so that most words merge down several
// levels, as real BPE does. Also checks that pathological inputs (one huge
// word, long runs) stay fast, i.e. nothing is quadratic.
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/runtime/tokenizer/test_vocab.h"

namespace ktx::tokenizer {
namespace {

const Tokenizer& BigTokenizer() {
  static const Tokenizer* const tok = [] {
    std::vector<std::pair<std::string, std::string>> merges;
    std::vector<std::string> pairs;
    const std::string letters = "abcdefghijklmnopqrstuvwxyz";
    for (char x : " " + letters) {
      for (char y : letters) {
        merges.push_back({std::string(1, x), std::string(1, y)});
        pairs.push_back(std::string(1, x) + y);
      }
    }
    std::vector<std::pair<std::string, std::string>> quads;
    for (const std::string& a : pairs) {
      for (const std::string& b : pairs) {
        if (b[0] != ' ') quads.push_back({a, b});
      }
    }
    std::mt19937 rng(42);
    std::shuffle(quads.begin(), quads.end(), rng);
    quads.resize(100000 - 256 - 3 - merges.size());
    merges.insert(merges.end(), quads.begin(), quads.end());
    TokenizerData data = testing::MakeData({{"<｜begin▁of▁sentence｜>", TokenType::kControl},
                                            {"<｜end▁of▁sentence｜>", TokenType::kControl},
                                            {"<｜▁pad▁｜>", TokenType::kControl}},
                                           merges);
    return new Tokenizer(Tokenizer::Create(std::move(data)).value());
  }();
  return *tok;
}

std::string RandomWord(std::mt19937& rng) {
  std::string w(1 + rng() % 9, 'a');
  for (char& c : w) c = static_cast<char>('a' + rng() % 26);
  return w;
}

// About `bytes` of text: words (from a Zipf-distributed dictionary when
// `zipf`, else all fresh), with punctuation, digits and newlines.
std::string MakeText(size_t bytes, bool zipf) {
  std::mt19937 rng(zipf ? 1 : 2);
  std::vector<std::string> dictionary;
  std::vector<double> weights;
  for (int i = 0; i < 20000; ++i) {
    dictionary.push_back(RandomWord(rng));
    weights.push_back(1.0 / (i + 1));
  }
  std::discrete_distribution<int> pick(weights.begin(), weights.end());
  std::string text;
  text.reserve(bytes + 16);
  while (text.size() < bytes) {
    text += zipf ? dictionary[pick(rng)] : RandomWord(rng);
    const uint32_t r = rng() % 40;
    if (r == 0) {
      text += ".\n";
    } else if (r == 1) {
      text += ", ";
    } else if (r == 2) {
      text += " " + std::to_string(rng() % 100000) + " ";
    } else {
      text += " ";
    }
  }
  return text;
}

double MegabytesPerSecond(const std::string& text, size_t* n_tokens) {
  const auto start = std::chrono::steady_clock::now();
  auto ids = BigTokenizer().Tokenize(text);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(ids.ok()) << ids.status();
  *n_tokens = ids.ok() ? ids->size() : 0;
  return text.size() / 1e6 / seconds;
}

TEST(TokenizerThroughputTest, OneMegabytePerSecondWithA100kVocabulary) {
  ASSERT_EQ(BigTokenizer().n_vocab(), 100000);
  for (const bool zipf : {true, false}) {
    const std::string text = MakeText(2 << 20, zipf);
    size_t n_tokens = 0;
    const double mbps = MegabytesPerSecond(text, &n_tokens);
    std::printf("[ tokenizer ] %s text: %.2f MB/s, %.2f bytes/token\n",
                zipf ? "zipf-word" : "fresh-word", mbps,
                static_cast<double>(text.size()) / n_tokens);
    // Round trip (minus the BOS) as a sanity check of what was timed.
    auto ids = BigTokenizer().Tokenize(text);
    EXPECT_EQ(BigTokenizer().Detokenize(*ids, DetokenizeOptions{.render_special = false}).value(),
              text);
    // Merges really happened: well under one token per byte (~1.8 bytes per
    // token here; only a fifth of all four-letter merges exist).
    EXPECT_LT(n_tokens, text.size() * 2 / 3);
    EXPECT_GE(mbps, 1.0) << (zipf ? "zipf" : "fresh") << " text";
  }
}

TEST(TokenizerThroughputTest, PathologicalInputsAreNotQuadratic) {
  const std::string inputs[] = {
      std::string(1 << 20, 'a'),        // one 1 MB word
      std::string(1 << 20, ' ') + "x",  // one 1 MB run of spaces
      std::string(1 << 19, '\n') + std::string(1 << 19, ' '),
      [] {  // 1 MB of alternating letters and punctuation
        std::string s;
        while (s.size() < (1 << 20)) s += "a.";
        return s;
      }(),
  };
  for (const std::string& text : inputs) {
    size_t n_tokens = 0;
    const double mbps = MegabytesPerSecond(text, &n_tokens);
    std::printf("[ tokenizer ] pathological %zu bytes: %.2f MB/s\n", text.size(), mbps);
    EXPECT_GE(mbps, 0.5);
  }
}

}  // namespace
}  // namespace ktx::tokenizer
