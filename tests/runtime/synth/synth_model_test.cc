// Synthetic models through ktx's deepseek2 reference model (runtime/models,
// written independently): the file loads (hparams and every tensor's name,
// shape and type accepted), a forward pass gives finite logits with a spread,
// and the routers of the MoE layers use many experts (the weight scales keep
// activations sane and routing non-degenerate).
#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/deepseek2.h"
#include "runtime/synth/synth_writer.h"

namespace ktx::synth {
namespace {

// Records each MoE layer's expert choices and delegates to the reference.
class RecordingBackend : public models::ExpertBackend {
 public:
  explicit RecordingBackend(const models::Deepseek2Model& model)
      : reference_(model.hparams(), model.weights()) {}
  absl::Status Compute(int il, const models::Activations& h, const models::Routing& routing,
                       std::span<const uint8_t> expert_mask, models::Activations* out) override {
    for (size_t i = 0; i < routing.expert_ids.size(); ++i) {
      ++picks_[il][routing.expert_ids[i]];
      EXPECT_TRUE(std::isfinite(routing.weights[i])) << "layer " << il;
    }
    n_tokens_[il] = routing.n_tokens;
    return reference_.Compute(il, h, routing, expert_mask, out);
  }
  std::map<int, std::map<int32_t, int>> picks_;  // layer -> expert -> tokens
  std::map<int, int64_t> n_tokens_;

 private:
  models::ReferenceExpertBackend reference_;
};

class SynthModelTest : public ::testing::TestWithParam<Quant> {};

TEST_P(SynthModelTest, ForwardPassIsFiniteAndRoutingSpreads) {
  ConfigOverrides o;
  o.n_layer = 4;  // 1 dense + 3 MoE layers
  absl::StatusOr<ModelConfig> config = MakeConfig(Preset::kTiny, o);
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<ModelPlan> plan = PlanModel(*config, GetParam());
  ASSERT_TRUE(plan.ok()) << plan.status();
  const std::string path = ::testing::TempDir() + "ktx_synth_model_" + std::to_string(getpid()) +
                           "_" + QuantName(GetParam()) + ".gguf";
  SynthWriteOptions options;
  options.seed = 2024;
  absl::StatusOr<SynthWriteResult> written = WriteSynthModel(*plan, path, options);
  ASSERT_TRUE(written.ok()) << written.status();

  absl::StatusOr<std::unique_ptr<models::Deepseek2Model>> model =
      models::Deepseek2Model::Open(path);
  ASSERT_TRUE(model.ok()) << model.status();
  RecordingBackend backend(**model);
  (*model)->SetExpertBackend(&backend);

  std::mt19937 gen(7);
  std::uniform_int_distribution<int32_t> token(3, 511);
  std::vector<int32_t> tokens = {0};
  for (int i = 0; i < 31; ++i) tokens.push_back(token(gen));
  absl::StatusOr<std::unique_ptr<kv_cache::SequenceKv>> kv =
      kv_cache::SequenceKv::Create((*model)->kv_layout(), 64);
  ASSERT_TRUE(kv.ok()) << kv.status();
  models::Activations logits;
  absl::Status s = (*model)->Forward(tokens, kv->get(), models::LogitsRows::kAll, &logits);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_EQ(logits.n_tokens(), 32);
  ASSERT_EQ(logits.n_cols(), 512);

  double sum = 0, sum2 = 0;
  const int64_t n = logits.n_tokens() * logits.n_cols();
  for (int64_t i = 0; i < n; ++i) {
    const float v = logits.data()[i];
    ASSERT_TRUE(std::isfinite(v)) << "logit " << i;
    sum += v;
    sum2 += static_cast<double>(v) * v;
  }
  const double std = std::sqrt(sum2 / static_cast<double>(n) - (sum / n) * (sum / n));
  EXPECT_GT(std, 1.0);    // next-token distributions are not flat
  EXPECT_LT(std, 100.0);  // nor blown up
  // Greedy choices vary between positions.
  std::set<int64_t> argmax;
  for (int64_t t = 0; t < logits.n_tokens(); ++t) {
    const float* row = logits.data() + t * logits.n_cols();
    argmax.insert(std::max_element(row, row + logits.n_cols()) - row);
  }
  EXPECT_GE(argmax.size(), 8u);
  std::printf("%s: logit std %.2f, %zu distinct greedy tokens;", QuantName(GetParam()), std,
              argmax.size());
  for (const auto& [il, picks] : backend.picks_)
    std::printf(" layer %d: %zu experts", il, picks.size());
  std::printf("\n");

  // Every MoE layer routed all 32 tokens to 4 of 16 experts: at least 10
  // distinct experts used, none chosen by every token.
  ASSERT_EQ(backend.picks_.size(), 3u);
  for (const auto& [il, picks] : backend.picks_) {
    EXPECT_EQ(backend.n_tokens_[il], 32);
    EXPECT_GE(picks.size(), 10u) << "layer " << il;
    for (const auto& [expert, count] : picks) EXPECT_LT(count, 32) << "layer " << il;
  }
  (*model)->SetExpertBackend(nullptr);
  std::remove(path.c_str());
}

INSTANTIATE_TEST_SUITE_P(AllQuants, SynthModelTest,
                         ::testing::Values(Quant::kQ4_K_M, Quant::kQ8_0, Quant::kBF16),
                         [](const auto& info) { return std::string(QuantName(info.param)); });

}  // namespace
}  // namespace ktx::synth
