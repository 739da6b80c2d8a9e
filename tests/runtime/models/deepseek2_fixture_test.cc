// The reference model against the float64 fixtures (tests/data/README.md):
// tier A tolerances of section 6 on the bf16, q8_0 and q4_k_m files.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/deepseek2.h"

namespace ktx::models {
namespace {

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

nlohmann::json LoadManifest() {
  std::ifstream in(kDataDir + "manifest.json");
  EXPECT_TRUE(in.good());
  return nlohmann::json::parse(in);
}

std::vector<float> LoadF32(const std::string& name) {
  std::ifstream in(kDataDir + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

int64_t Argmax(const float* row, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (row[i] > row[best]) best = i;
  }
  return best;
}

struct Comparison {
  double rel_l2 = 0.0;
  double max_row_rel_l2 = 0.0;
  int argmax_mismatches = 0;
};

// `got` and `want` are [n_rows, n_vocab] row-major.
Comparison Compare(const std::vector<float>& got, const std::vector<float>& want, int64_t n_vocab) {
  Comparison c;
  double diff_all = 0.0, ref_all = 0.0;
  const int64_t n_rows = static_cast<int64_t>(want.size()) / n_vocab;
  for (int64_t r = 0; r < n_rows; ++r) {
    double diff = 0.0, ref = 0.0;
    for (int64_t i = 0; i < n_vocab; ++i) {
      const double d = static_cast<double>(got[r * n_vocab + i]) - want[r * n_vocab + i];
      diff += d * d;
      ref += static_cast<double>(want[r * n_vocab + i]) * want[r * n_vocab + i];
    }
    diff_all += diff;
    ref_all += ref;
    c.max_row_rel_l2 = std::max(c.max_row_rel_l2, std::sqrt(diff / ref));
    if (Argmax(got.data() + r * n_vocab, n_vocab) != Argmax(want.data() + r * n_vocab, n_vocab)) {
      ++c.argmax_mismatches;
    }
  }
  c.rel_l2 = std::sqrt(diff_all / ref_all);
  return c;
}

class Deepseek2FixtureTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    manifest_ = LoadManifest();
    files_ = manifest_["files"][GetParam()];
    auto model = Deepseek2Model::Open(kDataDir + files_["gguf"].get<std::string>());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    prompt_ = manifest_["prompt_tokens"].get<std::vector<int32_t>>();
    n_vocab_ = manifest_["n_vocab"].get<int64_t>();
  }

  std::unique_ptr<kv_cache::SequenceKv> NewSequence() {
    auto kv = kv_cache::SequenceKv::Create(model_->kv_layout(), 128);
    EXPECT_TRUE(kv.ok()) << kv.status();
    return std::move(*kv);
  }

  nlohmann::json manifest_;
  nlohmann::json files_;
  std::unique_ptr<Deepseek2Model> model_;
  std::vector<int32_t> prompt_;
  int64_t n_vocab_ = 0;
};

// Prompt as one batch, then llama.cpp's greedy tokens one at a time through
// the KV cache (teacher forcing), against the float64 reference.
TEST_P(Deepseek2FixtureTest, TeacherForcedLogitsMatchFloat64Reference) {
  ASSERT_EQ(model_->n_vocab(), n_vocab_);
  auto kv = NewSequence();
  Activations logits;
  ASSERT_TRUE(model_->Forward(prompt_, kv.get(), LogitsRows::kAll, &logits).ok());
  ASSERT_EQ(logits.n_tokens(), static_cast<int64_t>(prompt_.size()));
  const Comparison prompt =
      Compare(logits.ToVector(), LoadF32(files_["ref64_prompt_logits"]["file"]), n_vocab_);

  const auto gen_tokens = files_["llama_greedy_tokens"].get<std::vector<int32_t>>();
  std::vector<float> gen;
  for (int32_t token : gen_tokens) {
    const int32_t one[] = {token};
    ASSERT_TRUE(model_->Forward(one, kv.get(), LogitsRows::kLast, &logits).ok());
    ASSERT_EQ(logits.n_tokens(), 1);
    gen.insert(gen.end(), logits.values().begin(), logits.values().end());
  }
  EXPECT_EQ(kv->length(), static_cast<int64_t>(prompt_.size() + gen_tokens.size()));
  const Comparison decode = Compare(gen, LoadF32(files_["ref64_gen_logits"]["file"]), n_vocab_);

  std::printf(
      "[ measured ] %s: prompt rel L2 %.3e (max row %.3e), decode rel L2 %.3e (max row %.3e)\n",
      GetParam().c_str(), prompt.rel_l2, prompt.max_row_rel_l2, decode.rel_l2,
      decode.max_row_rel_l2);
  // Tier A (README section 6).
  EXPECT_LE(prompt.rel_l2, 1e-4);
  EXPECT_LE(prompt.max_row_rel_l2, 1e-3);
  EXPECT_EQ(prompt.argmax_mismatches, 0);
  EXPECT_LE(decode.rel_l2, 1e-4);
  EXPECT_LE(decode.max_row_rel_l2, 1e-3);
  EXPECT_EQ(decode.argmax_mismatches, 0);
}

// Free-running greedy decoding reproduces the float64 reference's tokens.
TEST_P(Deepseek2FixtureTest, GreedyContinuationMatchesFloat64Reference) {
  const auto want = files_["ref64_greedy_tokens"].get<std::vector<int32_t>>();
  auto kv = NewSequence();
  Activations logits;
  ASSERT_TRUE(model_->Forward(prompt_, kv.get(), LogitsRows::kLast, &logits).ok());
  std::vector<int32_t> got;
  while (got.size() < want.size()) {
    got.push_back(static_cast<int32_t>(Argmax(logits.row(0), n_vocab_)));
    if (got.size() == want.size()) break;
    const int32_t one[] = {got.back()};
    ASSERT_TRUE(model_->Forward(one, kv.get(), LogitsRows::kLast, &logits).ok());
  }
  EXPECT_EQ(got, want);
}

// Prefill in uneven chunks gives exactly the logits of one batch: every
// token's computation in the reference path is independent of the batch.
TEST_P(Deepseek2FixtureTest, ChunkedPrefillEqualsOneBatch) {
  auto kv_one = NewSequence();
  Activations one;
  ASSERT_TRUE(model_->Forward(prompt_, kv_one.get(), LogitsRows::kAll, &one).ok());

  auto kv = NewSequence();
  std::vector<float> chunked;
  const size_t chunks[] = {17, 1, 30, 17};
  size_t begin = 0;
  for (size_t len : chunks) {
    Activations logits;
    std::span<const int32_t> part(prompt_.data() + begin, len);
    ASSERT_TRUE(model_->Forward(part, kv.get(), LogitsRows::kAll, &logits).ok());
    chunked.insert(chunked.end(), logits.values().begin(), logits.values().end());
    begin += len;
  }
  ASSERT_EQ(begin, prompt_.size());
  ASSERT_EQ(chunked.size(), one.values().size());
  for (size_t i = 0; i < chunked.size(); ++i) {
    ASSERT_EQ(chunked[i], one.values()[i]) << "element " << i;
  }
  // The latent rows in the cache are identical too.
  for (int il = 0; il < model_->hparams().n_layer; ++il) {
    for (int64_t pos = 0; pos < kv->length(); ++pos) {
      for (int64_t i = 0; i < model_->kv_layout().row_width(); ++i) {
        ASSERT_EQ(kv->Row(il, pos)[i], kv_one->Row(il, pos)[i]);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Deepseek2FixtureTest,
                         ::testing::Values("bf16", "q8_0", "q4_k_m"));

}  // namespace
}  // namespace ktx::models
