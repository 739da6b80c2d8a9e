// BatchedForward: one sequence equals Deepseek2Model::Forward bitwise; a batch
// of sequences with different contexts and different numbers of new tokens
// equals running each sequence alone (bitwise with the reference experts and
// with the CPU kernels); the profile sees every stage and the experts' bytes;
// errors commit nothing.
#include "runtime/bench/batched_forward.h"

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/deepseek2.h"
#include "runtime/moe_backend/cpu_moe_backend.h"

namespace ktx::bench {
namespace {

using models::Activations;
using models::Deepseek2Model;
using models::LogitsRows;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

std::unique_ptr<Deepseek2Model> Open(const std::string& type) {
  auto model = Deepseek2Model::Open(kDataDir + "dsv3-tiny-" + type + ".gguf");
  EXPECT_TRUE(model.ok()) << model.status();
  return std::move(*model);
}

std::unique_ptr<kv_cache::SequenceKv> NewKv(const Deepseek2Model& m, int64_t capacity = 64) {
  auto kv = kv_cache::SequenceKv::Create(m.kv_layout(), capacity);
  EXPECT_TRUE(kv.ok());
  return std::move(*kv);
}

std::vector<int32_t> Tokens(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& v : t) v = static_cast<int32_t>(3 + rng() % 509);
  return t;
}

void ExpectSameRows(const Activations& a, int64_t row_a, const Activations& b, int64_t row_b) {
  ASSERT_EQ(a.n_cols(), b.n_cols());
  EXPECT_EQ(0, std::memcmp(a.row(row_a), b.row(row_b), sizeof(float) * a.n_cols()))
      << "row " << row_a << " vs " << row_b;
}

TEST(BatchedForwardTest, OneSequenceEqualsForward) {
  auto model = Open("q4_k_m");
  const std::vector<int32_t> prompt = Tokens(19, 1);
  for (LogitsRows rows : {LogitsRows::kAll, LogitsRows::kLast}) {
    auto kv_a = NewKv(*model);
    auto kv_b = NewKv(*model);
    Activations a, b;
    ASSERT_TRUE(model->Forward(prompt, kv_a.get(), rows, &a).ok());
    const SequenceBatchEntry e{prompt, kv_b.get()};
    ASSERT_TRUE(BatchedForward(*model, {&e, 1}, rows, &b).ok());
    EXPECT_EQ(a.values(), b.values());
    EXPECT_EQ(kv_b->length(), 19);
    for (int64_t pos = 0; pos < 19; ++pos) {
      EXPECT_EQ(0, std::memcmp(kv_a->Row(2, pos), kv_b->Row(2, pos),
                               sizeof(float) * model->kv_layout().row_width()));
    }
  }
}

// Three sequences with contexts of 5, 11 and 0 tokens take 1, 3 and 2 new
// tokens in one step: each row equals that sequence run alone.
void CheckBatchEqualsAlone(const Deepseek2Model& model) {
  const std::vector<int32_t> ctx[3] = {Tokens(5, 2), Tokens(11, 3), {}};
  const std::vector<int32_t> step[3] = {Tokens(1, 4), Tokens(3, 5), Tokens(2, 6)};
  std::unique_ptr<kv_cache::SequenceKv> alone[3], batched[3];
  Activations scratch;
  for (int s = 0; s < 3; ++s) {
    alone[s] = NewKv(model);
    batched[s] = NewKv(model);
    if (!ctx[s].empty()) {
      ASSERT_TRUE(model.Forward(ctx[s], alone[s].get(), LogitsRows::kLast, &scratch).ok());
      ASSERT_TRUE(model.Forward(ctx[s], batched[s].get(), LogitsRows::kLast, &scratch).ok());
    }
  }
  for (LogitsRows rows : {LogitsRows::kLast, LogitsRows::kAll}) {
    std::vector<SequenceBatchEntry> batch;
    for (int s = 0; s < 3; ++s) batch.push_back({step[s], batched[s].get()});
    Activations got;
    ASSERT_TRUE(BatchedForward(model, batch, rows, &got).ok());
    int64_t row = 0;
    for (int s = 0; s < 3; ++s) {
      Activations want;
      ASSERT_TRUE(model.Forward(step[s], alone[s].get(), rows, &want).ok());
      for (int64_t r = 0; r < want.n_tokens(); ++r) ExpectSameRows(got, row++, want, r);
      EXPECT_EQ(batched[s]->length(), alone[s]->length());
    }
    EXPECT_EQ(row, got.n_tokens());
  }
}

TEST(BatchedForwardTest, BatchEqualsEachSequenceAloneWithReferenceExperts) {
  auto model = Open("bf16");
  CheckBatchEqualsAlone(*model);
}

TEST(BatchedForwardTest, BatchEqualsEachSequenceAloneWithCpuKernels) {
  auto model = Open("q4_k_m");
  auto pool = moe_backend::CreateCpuPool(0);
  ASSERT_TRUE(pool.ok());
  moe_backend::CpuMoeBackendOptions o;
  o.progress = moe_backend::ProgressMode::kOff;
  o.amx_prefill = false;  // the prefill form depends on tokens per expert in a call
  auto backend = moe_backend::CpuMoeBackend::Create(*model, pool->get(), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  model->SetExpertBackend(backend->get());
  CheckBatchEqualsAlone(*model);
  model->SetExpertBackend(nullptr);
}

TEST(BatchedForwardTest, ProfileSeesEveryStageAndTheExperts) {
  auto model = Open("q8_0");
  StageProfile profile(*model);
  auto kv_a = NewKv(*model);
  auto kv_b = NewKv(*model);
  const std::vector<int32_t> a = Tokens(4, 7), b = Tokens(2, 8);
  const SequenceBatchEntry batch[] = {{a, kv_a.get()}, {b, kv_b.get()}};
  Activations logits;
  ASSERT_TRUE(BatchedForward(*model, batch, LogitsRows::kLast, &logits, &profile).ok());
  EXPECT_EQ(logits.n_tokens(), 2);
  EXPECT_EQ(profile.tokens(), 6);
  EXPECT_EQ(profile.steps(), 1);
  for (Stage s : {Stage::kEmbed, Stage::kAttention, Stage::kFfnNorm, Stage::kDenseFfn,
                  Stage::kRoute, Stage::kExperts, Stage::kShared, Stage::kCombine, Stage::kHead}) {
    EXPECT_GT(profile.total_seconds(s), 0.0) << StageName(s);
  }
  EXPECT_EQ(profile.layers_with(Stage::kAttention), 3);
  EXPECT_EQ(profile.layers_with(Stage::kDenseFfn), 1);
  EXPECT_EQ(profile.layers_with(Stage::kExperts), 2);
  EXPECT_EQ(profile.layers_with(Stage::kHead), 1);
  EXPECT_GT(profile.seconds(Stage::kDenseFfn, 0), 0.0);
  EXPECT_EQ(profile.seconds(Stage::kDenseFfn, 1), 0.0);
  EXPECT_EQ(profile.seconds(Stage::kExperts, 0), 0.0);
  // Q8_0 experts [256, 256]: 34 bytes per 32 values, three matrices.
  const double per_expert = 3.0 * 256 * 256 / 32 * 34;
  EXPECT_EQ(profile.bytes_per_expert(1), per_expert);
  EXPECT_EQ(profile.bytes_per_expert(0), 0.0);
  // 6 tokens x 4 experts each touch between 4 and 16 distinct experts per layer.
  for (int il : {1, 2}) {
    EXPECT_GE(profile.experts_used(il), 4);
    EXPECT_LE(profile.experts_used(il), 16);
  }
  EXPECT_EQ(profile.expert_bytes(),
            per_expert * static_cast<double>(profile.experts_used(1) + profile.experts_used(2)));
  profile.Reset();
  EXPECT_EQ(profile.tokens(), 0);
  EXPECT_EQ(profile.total_seconds(Stage::kAttention), 0.0);
}

TEST(BatchedForwardTest, ErrorsCommitNothing) {
  auto model = Open("q8_0");
  Activations logits;
  EXPECT_EQ(BatchedForward(*model, {}, LogitsRows::kLast, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  auto kv = NewKv(*model, 4);
  auto small = NewKv(*model, 2);
  const std::vector<int32_t> two = Tokens(2, 9), three = Tokens(3, 10);
  const SequenceBatchEntry same[] = {{two, kv.get()}, {two, kv.get()}};
  EXPECT_EQ(BatchedForward(*model, same, LogitsRows::kLast, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  const SequenceBatchEntry empty[] = {{{}, kv.get()}};
  EXPECT_EQ(BatchedForward(*model, empty, LogitsRows::kLast, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  const SequenceBatchEntry full[] = {{two, kv.get()}, {three, small.get()}};
  EXPECT_EQ(BatchedForward(*model, full, LogitsRows::kLast, &logits).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(kv->length(), 0);
  EXPECT_EQ(small->length(), 0);
}

}  // namespace
}  // namespace ktx::bench
