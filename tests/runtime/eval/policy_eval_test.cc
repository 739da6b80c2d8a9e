// Policy evaluation: the KL and NLL helpers on hand-worked values, and
// EvaluatePolicies on the fixture model (dsv3-tiny-bf16, K = 4) against a
// perplexity computed here from Forward's logits: a policy equal to the full
// routing has KL 0 and full agreement; KL falls as top_k grows; expert counts
// per token are what the policies ask for; bad inputs are named.
#include "runtime/eval/policy_eval.h"

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/kv_cache/latent_kv_cache.h"

namespace ktx::eval {
namespace {

using models::RoutingPolicy;
using ::testing::HasSubstr;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

TEST(PolicyEvalMathTest, KlAndNllOnHandWorkedValues) {
  const float p[] = {0.0f, 0.0f};
  const float q[] = {0.0f, static_cast<float>(std::log(3.0))};
  // P = (1/2, 1/2), Q = (1/4, 3/4).
  EXPECT_NEAR(KlDivergenceFromLogits(p, q, 2), 0.5 * std::log(2.0) + 0.5 * std::log(2.0 / 3.0),
              1e-7);
  EXPECT_EQ(KlDivergenceFromLogits(q, q, 2), 0.0);
  const float shifted[] = {5.0f, 5.0f};  // softmax is shift-invariant
  EXPECT_NEAR(KlDivergenceFromLogits(p, shifted, 2), 0.0, 1e-12);
  const float uniform[] = {1.0f, 1.0f, 1.0f, 1.0f};
  EXPECT_NEAR(NextTokenNll(uniform, 4, 2), std::log(4.0), 1e-12);
  EXPECT_NEAR(NextTokenNll(q, 2, 1), -std::log(0.75), 1e-7);
}

class PolicyEvalFixtureTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = models::Deepseek2Model::Open(kDataDir + "dsv3-tiny-bf16.gguf");
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    std::ifstream in(kDataDir + "manifest.json");
    tokens_ = nlohmann::json::parse(in)["prompt_tokens"].get<std::vector<int32_t>>();
  }
  std::unique_ptr<models::Deepseek2Model> model_;
  std::vector<int32_t> tokens_;
};

TEST_F(PolicyEvalFixtureTest, ReportsAgainstTheFullRouting) {
  std::vector<RoutingPolicy> policies = {RoutingPolicy::TopK(4), RoutingPolicy::TopK(3),
                                         RoutingPolicy::TopK(2), RoutingPolicy::TopK(1),
                                         RoutingPolicy::Defer(1)};
  EvalOptions options;
  options.window = 33;  // 65 tokens: windows of 33 and 32
  auto report = EvaluatePolicies(*model_, tokens_, policies, options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->n_tokens, 65);
  EXPECT_EQ(report->n_windows, 2);
  EXPECT_EQ(report->full.n_positions, 32 + 31);
  EXPECT_EQ(report->full.kl_mean, 0.0);
  EXPECT_EQ(report->full.top1_agreement, 1.0);
  EXPECT_DOUBLE_EQ(report->full.experts_per_token, 4.0);

  // Perplexity of the full routing, from Forward's logits window by window.
  double nll = 0;
  int n = 0;
  for (int64_t b : {0, 33}) {
    const int64_t len = b == 0 ? 33 : 32;
    auto kv = kv_cache::SequenceKv::Create(model_->kv_layout(), len);
    models::Activations out;
    ASSERT_TRUE(
        model_
            ->Forward(std::span(tokens_).subspan(b, len), kv->get(), models::LogitsRows::kAll, &out)
            .ok());
    for (int64_t i = 0; i + 1 < len; ++i) {
      nll += NextTokenNll(out.row(i), model_->n_vocab(), tokens_[b + i + 1]);
      ++n;
    }
  }
  EXPECT_NEAR(report->full.perplexity, std::exp(nll / n), 1e-9 * std::exp(nll / n));

  ASSERT_EQ(report->policies.size(), 5u);
  const PolicyEvalResult& k4 = report->policies[0];
  EXPECT_EQ(k4.policy, "top_k=4");
  EXPECT_EQ(k4.kl_mean, 0.0);
  EXPECT_EQ(k4.kl_max, 0.0);
  EXPECT_EQ(k4.top1_agreement, 1.0);
  EXPECT_EQ(k4.perplexity, report->full.perplexity);
  double previous = 0;
  for (int i = 1; i <= 3; ++i) {  // top_k 3, 2, 1
    const PolicyEvalResult& r = report->policies[i];
    EXPECT_TRUE(std::isfinite(r.kl_mean) && std::isfinite(r.kl_max));
    EXPECT_GT(r.kl_mean, previous) << r.policy;
    EXPECT_GE(r.kl_max, r.kl_mean);
    EXPECT_LT(r.top1_agreement, 1.0);
    EXPECT_DOUBLE_EQ(r.experts_per_token, 4 - i);
    previous = r.kl_mean;
  }
  // Deferral: all 4 experts still run, one of them late in layer 1 of the two
  // MoE layers (the last layer never defers).
  const PolicyEvalResult& d1 = report->policies[4];
  EXPECT_DOUBLE_EQ(d1.experts_per_token, 4.0);
  EXPECT_DOUBLE_EQ(d1.deferred_per_token, 0.5);
  EXPECT_GT(d1.kl_mean, 0.0);

  const nlohmann::json j = EvalReportToJson(*report);
  EXPECT_EQ(j["policies"].size(), 5u);
  EXPECT_EQ(j["policies"][3]["policy"], "top_k=1");
  EXPECT_EQ(j["full"]["policy"], "full");
  const std::string table = FormatEvalTable(*report);
  EXPECT_THAT(table, HasSubstr("| top_k=1 |"));
  EXPECT_THAT(table, HasSubstr("| full |"));
}

TEST_F(PolicyEvalFixtureTest, BadInputsAreNamed) {
  EvalOptions options;
  options.window = 1;
  EXPECT_THAT(std::string(EvaluatePolicies(*model_, tokens_, {}, options).status().message()),
              HasSubstr("window"));
  options.window = 16;
  const std::vector<int32_t> one = {5};
  EXPECT_THAT(std::string(EvaluatePolicies(*model_, one, {}, options).status().message()),
              HasSubstr("at least 2 tokens"));
  const std::vector<RoutingPolicy> bad = {RoutingPolicy::TopK(2), RoutingPolicy::TopK(9)};
  const absl::Status s = EvaluatePolicies(*model_, tokens_, bad, options).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("policy 2"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("top_k = 9"));
}

}  // namespace
}  // namespace ktx::eval
