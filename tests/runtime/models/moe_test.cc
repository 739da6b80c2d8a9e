// RouteFromLogits on hand-made router scores: gating functions, the
// selection-only bias, group-limited top-k with masking, ties, the weight-sum
// floor and scaling. Expected values are worked out by hand in each test.
// Also ExpertBackend::ComputeRows's default (gather, then Compute) and the
// Activations resize contract.
#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/models/activations.h"
#include "runtime/models/moe.h"

namespace ktx::models {
namespace {

using ::testing::ElementsAre;

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
// The logit whose sigmoid is p.
double Logit(double p) { return std::log(p / (1.0 - p)); }

RoutingParams Sig(int32_t n_expert, int32_t k) {
  RoutingParams p;
  p.n_expert = n_expert;
  p.n_expert_used = k;
  p.gating = GatingFunc::kSigmoid;
  return p;
}

std::vector<int32_t> Ids(const Routing& r, int64_t t) {
  return {r.expert_ids.begin() + t * r.n_expert_used,
          r.expert_ids.begin() + (t + 1) * r.n_expert_used};
}

TEST(RouteFromLogitsTest, SigmoidTopKWithoutNormOrScale) {
  const std::vector<double> logits = {0.1, 2.0, -1.0, 1.5, 0.0, 3.0};
  Routing r;
  RouteFromLogits(Sig(6, 2), logits.data(), 1, nullptr, &r);
  EXPECT_EQ(r.n_tokens, 1);
  EXPECT_EQ(r.n_expert_used, 2);
  EXPECT_THAT(Ids(r, 0), ElementsAre(5, 1));  // best first
  EXPECT_FLOAT_EQ(r.weight(0, 0), static_cast<float>(Sigmoid(3.0)));
  EXPECT_FLOAT_EQ(r.weight(0, 1), static_cast<float>(Sigmoid(2.0)));
}

TEST(RouteFromLogitsTest, BiasSelectsButDoesNotWeigh) {
  // sigmoid(1.0) = 0.731 beats sigmoid(0.9) = 0.711, but the bias of 0.1 on
  // expert 1 makes it win the selection; its weight stays the unbiased 0.711.
  const std::vector<double> logits = {1.0, 0.9, 0.0, 0.0};
  const std::vector<float> bias = {0.0f, 0.1f, 0.0f, 0.0f};
  Routing r;
  RouteFromLogits(Sig(4, 1), logits.data(), 1, bias.data(), &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(1));
  EXPECT_FLOAT_EQ(r.weight(0, 0), static_cast<float>(Sigmoid(0.9)));
  // Without the bias expert 0 wins.
  RouteFromLogits(Sig(4, 1), logits.data(), 1, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(0));
}

TEST(RouteFromLogitsTest, GroupLimitedTopKMasksDroppedGroups) {
  // 4 groups of 2. Group scores (sum of the top 2): g0 = 0.95 + 0.01 = 0.96,
  // g1 = 0.60 + 0.55 = 1.15, g2 = 0.50 + 0.50 = 1.00, g3 = 0.30 + 0.20 = 0.50.
  // Two groups are kept: g1 and g2. Expert 0 has the largest single score but
  // its group is dropped, so the top 2 are experts 2 and 3.
  const std::vector<double> p = {0.95, 0.01, 0.60, 0.55, 0.50, 0.50, 0.30, 0.20};
  std::vector<double> logits;
  for (double v : p) logits.push_back(Logit(v));
  // Token 1 is the same scores with group 0 strengthened (0.95 + 0.40 = 1.35):
  // g0 and g1 are kept, the top 2 are experts 0 and 2.
  std::vector<double> p1 = p;
  p1[1] = 0.40;
  for (double v : p1) logits.push_back(Logit(v));

  RoutingParams params = Sig(8, 2);
  params.n_group = 4;
  params.n_group_used = 2;
  Routing r;
  RouteFromLogits(params, logits.data(), 2, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(2, 3));
  EXPECT_NEAR(r.weight(0, 0), 0.60, 1e-6);
  EXPECT_NEAR(r.weight(0, 1), 0.55, 1e-6);
  EXPECT_THAT(Ids(r, 1), ElementsAre(0, 2));

  // Without the group limit expert 0 is chosen for token 0 as well.
  params.n_group = 0;
  RouteFromLogits(params, logits.data(), 2, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(0, 2));
}

TEST(RouteFromLogitsTest, GroupScoresUseTheBiasedSelection) {
  // Bias lifts group 1 (experts 2, 3) above group 0.
  const std::vector<double> logits = {Logit(0.5), Logit(0.5), Logit(0.4), Logit(0.4)};
  const std::vector<float> bias = {0.0f, 0.0f, 0.2f, 0.2f};
  RoutingParams params = Sig(4, 1);
  params.n_group = 2;
  params.n_group_used = 1;
  Routing r;
  RouteFromLogits(params, logits.data(), 1, bias.data(), &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(2));
  EXPECT_NEAR(r.weight(0, 0), 0.4, 1e-6);
}

TEST(RouteFromLogitsTest, TiesGoToTheLowerId) {
  const std::vector<double> equal = {0.0, 0.0, 0.0, 0.0};
  Routing r;
  RouteFromLogits(Sig(4, 2), equal.data(), 1, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(0, 1));

  const std::vector<double> three_way = {-1.0, 0.7, 0.7, 0.7};
  RouteFromLogits(Sig(4, 2), three_way.data(), 1, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(1, 2));

  // Tied group scores: the lower group is kept.
  RoutingParams params = Sig(4, 2);
  params.n_group = 2;
  params.n_group_used = 1;
  RouteFromLogits(params, equal.data(), 1, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(0, 1));
  const std::vector<double> later = {-1.0, 0.5, 0.5, -1.0};  // groups tie at sigmoid sums
  RouteFromLogits(params, later.data(), 1, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(1, 0));
}

TEST(RouteFromLogitsTest, NormalisationScalingAndTheFloor) {
  const std::vector<double> logits = {Logit(0.2), Logit(0.6), Logit(0.1), Logit(0.3)};
  RoutingParams params = Sig(4, 2);  // picks 1 (0.6) and 3 (0.3)
  params.norm_weights = true;
  Routing r;
  RouteFromLogits(params, logits.data(), 1, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(1, 3));
  EXPECT_NEAR(r.weight(0, 0), 0.6 / 0.9, 1e-6);
  EXPECT_NEAR(r.weight(0, 1), 0.3 / 0.9, 1e-6);

  params.weights_scale = 2.5f;
  RouteFromLogits(params, logits.data(), 1, nullptr, &r);
  EXPECT_NEAR(r.weight(0, 0), 2.5 * 0.6 / 0.9, 1e-6);
  EXPECT_NEAR(r.weight(0, 1), 2.5 * 0.3 / 0.9, 1e-6);

  // A scale of 1 or 0 is not applied.
  params.weights_scale = 0.0f;
  RouteFromLogits(params, logits.data(), 1, nullptr, &r);
  EXPECT_NEAR(r.weight(0, 0), 0.6 / 0.9, 1e-6);
  params.weights_scale = 1.0f;
  RouteFromLogits(params, logits.data(), 1, nullptr, &r);
  EXPECT_NEAR(r.weight(0, 0), 0.6 / 0.9, 1e-6);

  // Tiny probabilities: the sum 2e-6 is below 6.103515625e-5, which divides.
  const std::vector<double> tiny = {Logit(1e-6), Logit(1e-6), Logit(1e-9), Logit(1e-9)};
  params.weights_scale = 0.0f;
  RouteFromLogits(params, tiny.data(), 1, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(0, 1));
  EXPECT_NEAR(r.weight(0, 0), 1e-6 / 6.103515625e-5, 1e-9);
  EXPECT_NEAR(r.weight(0, 1), 1e-6 / 6.103515625e-5, 1e-9);
}

TEST(RouteFromLogitsTest, SoftmaxGating) {
  const std::vector<double> logits = {1.0, 2.0, 3.0};
  RoutingParams params;
  params.n_expert = 3;
  params.n_expert_used = 2;
  params.gating = GatingFunc::kSoftmax;
  Routing r;
  RouteFromLogits(params, logits.data(), 1, nullptr, &r);
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  EXPECT_THAT(Ids(r, 0), ElementsAre(2, 1));
  EXPECT_NEAR(r.weight(0, 0), std::exp(3.0) / z, 1e-7);
  EXPECT_NEAR(r.weight(0, 1), std::exp(2.0) / z, 1e-7);
  params.norm_weights = true;
  RouteFromLogits(params, logits.data(), 1, nullptr, &r);
  EXPECT_NEAR(r.weight(0, 0), std::exp(3.0) / (std::exp(3.0) + std::exp(2.0)), 1e-7);
}

TEST(RouteFromLogitsTest, NanScoresAreNeverChosen) {
  const std::vector<double> logits = {std::numeric_limits<double>::quiet_NaN(), 0.0, -1.0};
  Routing r;
  RouteFromLogits(Sig(3, 1), logits.data(), 1, nullptr, &r);
  EXPECT_THAT(Ids(r, 0), ElementsAre(1));
}

// out[t] = (t + 1) * h[t] for every token, whatever the routing.
class ScaleBackend final : public ExpertBackend {
 public:
  absl::Status Compute(int, const Activations& h, const Routing&, std::span<const uint8_t>,
                       Activations* out) override {
    out->Resize(h.n_tokens(), h.n_cols());
    for (int64_t t = 0; t < h.n_tokens(); ++t) {
      for (int64_t c = 0; c < h.n_cols(); ++c) out->row(t)[c] = (t + 1) * h.row(t)[c];
    }
    return absl::OkStatus();
  }
};

TEST(ExpertBackendTest, DefaultComputeRowsGathersTheRows) {
  Activations h(5, 3);
  for (int64_t i = 0; i < 15; ++i) h.data()[i] = static_cast<float>(i);
  Routing routing;
  routing.n_tokens = 2;
  routing.n_expert_used = 1;
  routing.expert_ids = {0, 0};
  routing.weights = {1.0f, 1.0f};
  ScaleBackend backend;
  Activations out;
  const std::vector<int32_t> rows = {4, 1};
  ASSERT_TRUE(backend.ComputeRows(0, h, rows, routing, {}, &out).ok());
  ASSERT_EQ(out.n_tokens(), 2);
  EXPECT_THAT(out.ToVector(), ElementsAre(12, 13, 14, 2 * 3, 2 * 4, 2 * 5));
  const std::vector<int32_t> outside = {4, 5};
  absl::Status s = backend.ComputeRows(0, h, outside, routing, {}, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("token 1 names row 5, outside the batch of 5 rows"), std::string::npos)
      << s;
  const std::vector<int32_t> short_list = {4};
  s = backend.ComputeRows(0, h, short_list, routing, {}, &out);
  EXPECT_NE(s.message().find("1 rows for a routing of 2 tokens"), std::string::npos) << s;
}

// ResizeForOverwrite keeps the values it keeps (and need not zero new ones);
// Resize zeroes everything; ToVector copies.
TEST(ActivationsTest, ResizeContracts) {
  Activations a(2, 3);
  for (float v : a.values()) EXPECT_EQ(v, 0.0f);
  std::fill(a.data(), a.data() + 6, 7.0f);
  a.ResizeForOverwrite(4, 3);
  EXPECT_EQ(a.n_tokens(), 4);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a.data()[i], 7.0f);
  a.ResizeForOverwrite(1, 3);
  EXPECT_EQ(a.values().size(), 3u);
  a.Resize(4, 3);
  for (float v : a.values()) EXPECT_EQ(v, 0.0f);
  a.data()[5] = 2.5f;
  const std::vector<float> copy = a.ToVector();
  ASSERT_EQ(copy.size(), 12u);
  EXPECT_EQ(copy[5], 2.5f);
}

}  // namespace
}  // namespace ktx::models
