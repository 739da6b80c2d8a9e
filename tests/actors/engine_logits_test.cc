// The actor runtime against the reference model: placement never changes
// results. With 1, 2 and 3 expert shards (cpus split between them, or all on
// the same cpus), with and without replicated experts, the Engine's logits of
// the fixture sequence equal the reference model's Forward (bit for bit with
// one shard, to float rounding of the partial sums otherwise), its greedy
// tokens equal the reference's, and its logits meet the float64 fixture's
// tier-A bounds (tests/data/README.md section 6).
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "actors/engine.h"
#include "gtest/gtest.h"
#include "tests/actors/actors_test_util.h"

namespace ktx::actors {
namespace {

using testing::CompareLogits;
using testing::FixtureModel;

struct Reference {
  std::vector<int32_t> tokens;  // prompt + ref64 greedy tokens
  std::vector<float> logits;    // reference Forward, F32 [tokens, n_vocab]
  testing::GreedyRun greedy;    // free-running from the prompt
};

constexpr int kGreedyTokens = 20;

const Reference& GetReference(const std::string& type) {
  static std::map<std::string, Reference> cache;
  auto it = cache.find(type);
  if (it != cache.end()) return it->second;
  Reference ref;
  auto model = FixtureModel(type);
  const std::vector<int32_t> prompt = testing::PromptTokens();
  ref.tokens = prompt;
  const auto gen =
      testing::Manifest()["files"][type]["ref64_greedy_tokens"].get<std::vector<int32_t>>();
  ref.tokens.insert(ref.tokens.end(), gen.begin(), gen.end());
  ref.logits = testing::ReferenceLogits(*model, ref.tokens);
  ref.greedy = testing::ReferenceGreedy(*model, prompt, kGreedyTokens);
  return cache.emplace(type, std::move(ref)).first->second;
}

// (fixture type, number of shards, split cpus between shards)
using Param = std::tuple<std::string, int, bool>;

class EngineLogitsTest : public ::testing::TestWithParam<Param> {
 protected:
  std::unique_ptr<Engine> MakeEngine(EngineOptions options = {}) {
    const auto& [type, n_shards, split] = GetParam();
    if (options.shards.empty()) options.shards = EvenShards(n_shards, split);
    options.experts = ExpertsBackend::kReference;  // tier A: the fast kernels are tested elsewhere
    options.prefill_chunk = 16;                    // the 97-token sequence runs in 7 steps
    options.kv_budget_bytes = 64 << 20;
    auto engine = Engine::Create(FixtureModel(type), options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? std::move(*engine) : nullptr;
  }
};

TEST_P(EngineLogitsTest, LogitsEqualReferenceForward) {
  const auto& [type, n_shards, split] = GetParam();
  const Reference& ref = GetReference(type);
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  const int64_t n_vocab = engine->model().n_vocab();
  auto logits = engine->Logits(ref.tokens);
  ASSERT_TRUE(logits.ok()) << logits.status();
  ASSERT_EQ(logits->n_tokens(), static_cast<int64_t>(ref.tokens.size()));
  ASSERT_EQ(logits->n_cols(), n_vocab);
  const testing::LogitsDiff diff =
      CompareLogits(logits->data(), ref.logits.data(), logits->n_tokens(), n_vocab);
  std::printf("[ measured ] %s, %d shard(s)%s: max row-relative diff %.3e, bit equal %d\n",
              type.c_str(), n_shards, split ? " (split cpus)" : "", diff.max_rel,
              diff.bit_equal ? 1 : 0);
  if (n_shards == 1) {
    // One shard computes the whole routed sum exactly as the reference does.
    EXPECT_TRUE(diff.bit_equal);
  }
  EXPECT_LE(diff.max_rel, 1e-5);
  EXPECT_EQ(diff.argmax_mismatches, 0);

  // The float64 fixture (not produced by ktx), tier A: every row's argmax and
  // a per-row relative L2 error <= 1e-3 on the prompt rows.
  const std::string file =
      testing::Manifest()["files"][type]["ref64_prompt_logits"]["file"].get<std::string>();
  const std::vector<float> ref64 = testing::LoadF32(file);
  const int64_t n_prompt = static_cast<int64_t>(ref64.size()) / n_vocab;
  for (int64_t r = 0; r < n_prompt; ++r) {
    double diff2 = 0, ref2 = 0;
    for (int64_t i = 0; i < n_vocab; ++i) {
      const double d = static_cast<double>(logits->row(r)[i]) - ref64[r * n_vocab + i];
      diff2 += d * d;
      ref2 += static_cast<double>(ref64[r * n_vocab + i]) * ref64[r * n_vocab + i];
    }
    EXPECT_LE(std::sqrt(diff2 / ref2), 1e-3) << "row " << r;
    EXPECT_EQ(testing::Argmax(logits->row(r), n_vocab),
              testing::Argmax(ref64.data() + r * n_vocab, n_vocab))
        << "row " << r;
  }
}

TEST_P(EngineLogitsTest, GreedyTokensEqualReference) {
  const auto& [type, n_shards, split] = GetParam();
  const Reference& ref = GetReference(type);
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  GenerateRequest request;
  request.prompt = testing::PromptTokens();
  request.sampling.temperature = 0.0f;
  request.max_tokens = kGreedyTokens;
  request.stop_at_eos = false;
  request.return_logits = ReturnLogits::kSampled;
  std::vector<int32_t> streamed;
  auto result = engine->Generate(request, [&](int32_t token, std::string_view) {
    if (token >= 0) streamed.push_back(token);
    return true;
  });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->tokens, ref.greedy.tokens);
  EXPECT_EQ(streamed, result->tokens);
  EXPECT_EQ(result->finish_reason, FinishReason::kLength);
  ASSERT_EQ(result->logits.n_tokens(), kGreedyTokens);
  const testing::LogitsDiff diff = CompareLogits(result->logits.data(), ref.greedy.logits.data(),
                                                 kGreedyTokens, engine->model().n_vocab());
  if (n_shards == 1) {
    EXPECT_TRUE(diff.bit_equal);
  }
  EXPECT_LE(diff.max_rel, 1e-5);
}

// Replicated hot experts (a profile and two copies of the 6 hottest experts
// per layer) change who computes what, not the result.
TEST_P(EngineLogitsTest, ReplicatedPlacementGivesTheSameLogits) {
  const auto& [type, n_shards, split] = GetParam();
  if (n_shards < 2) GTEST_SKIP() << "replication needs two shards";
  const Reference& ref = GetReference(type);
  auto model = FixtureModel(type);
  EngineOptions options;
  const auto& hp = model->hparams();
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    std::vector<double> weights(hp.n_expert);
    for (int e = 0; e < hp.n_expert; ++e) weights[e] = 1.0 + (e * 7 + il) % hp.n_expert;
    options.placement.profile.weights[il] = weights;
  }
  options.placement.replication.n_hot = 6;
  options.placement.replication.n_copies = 2;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  ASSERT_GT(engine->plan().n_replicated, 0);
  auto logits = engine->Logits(ref.tokens);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const testing::LogitsDiff diff = CompareLogits(logits->data(), ref.logits.data(),
                                                 logits->n_tokens(), engine->model().n_vocab());
  EXPECT_LE(diff.max_rel, 1e-5);
  EXPECT_EQ(diff.argmax_mismatches, 0);
  auto stats = engine->RouterStats();
  ASSERT_TRUE(stats.ok());
  for (int s = 0; s < n_shards; ++s) EXPECT_GT(stats->parts_sent[s], 0) << "shard " << s;
}

INSTANTIATE_TEST_SUITE_P(Placements, EngineLogitsTest,
                         ::testing::Values(Param{"bf16", 1, true}, Param{"bf16", 2, true},
                                           Param{"bf16", 3, true}, Param{"bf16", 2, false},
                                           Param{"q8_0", 1, true}, Param{"q8_0", 2, true},
                                           Param{"q8_0", 3, false}),
                         [](const ::testing::TestParamInfo<Param>& info) {
                           return std::get<0>(info.param) + "_" +
                                  std::to_string(std::get<1>(info.param)) +
                                  (std::get<2>(info.param) ? "_split" : "_shared");
                         });

}  // namespace
}  // namespace ktx::actors
