// ExpertUsage against an independent count: random routings (with padded
// rows) are counted here with maps and plain loops, then compared with what
// Record accumulated; the summaries on a hand-made layer.
#include "runtime/models/expert_usage.h"

#include <algorithm>
#include <functional>
#include <map>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ktx::models {
namespace {

using ::testing::ElementsAre;

Routing RandomRouting(int64_t n_tokens, int32_t width, int32_t n_expert, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> w(0.01f, 1.0f);
  Routing r;
  r.n_tokens = n_tokens;
  r.n_expert_used = width;
  std::vector<int32_t> perm(n_expert);
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int32_t e = 0; e < n_expert; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    const int32_t kept = 1 + static_cast<int32_t>(rng() % width);  // 1..width, rest padding
    for (int32_t k = 0; k < width; ++k) {
      r.expert_ids.push_back(k < kept ? perm[k] : kNoExpert);
      r.weights.push_back(k < kept ? 2.5f * w(rng) : 0.0f);
    }
  }
  return r;
}

TEST(ExpertUsageTest, RecordMatchesAnIndependentCount) {
  const int32_t n_layer = 4, n_expert = 11, k = 5;
  ExpertUsage usage(n_layer, n_expert, k);
  std::map<std::pair<int, int>, int64_t> count;  // (il, e) -> selections
  std::map<std::pair<int, int>, double> weight;  // (il, e) -> Σ share
  std::map<std::pair<int, int>, double> rank;    // (il, r) -> Σ share
  std::map<int, int64_t> tokens;
  uint32_t seed = 1;
  for (int il : {1, 2, 3, 2}) {
    const Routing r = RandomRouting(29, k, n_expert, seed++);
    ASSERT_TRUE(usage.Record(il, r).ok());
    for (int64_t t = 0; t < r.n_tokens; ++t) {
      std::vector<double> ws;
      for (int j = 0; j < k; ++j) {
        if (r.id(t, j) >= 0) ws.push_back(r.weight(t, j));
      }
      double sum = 0;
      for (double v : ws) sum += v;
      for (int j = 0; j < k; ++j) {
        if (r.id(t, j) < 0) continue;
        count[std::make_pair(il, r.id(t, j))] += 1;
        weight[std::make_pair(il, r.id(t, j))] += r.weight(t, j) / sum;
      }
      std::sort(ws.begin(), ws.end(), std::greater<double>());
      for (size_t j = 0; j < ws.size(); ++j)
        rank[std::make_pair(il, static_cast<int>(j))] += ws[j] / sum;
      tokens[il] += 1;
    }
  }
  for (int il = 0; il < n_layer; ++il) {
    EXPECT_EQ(usage.layer(il).n_tokens, tokens[il]);
    for (int e = 0; e < n_expert; ++e) {
      EXPECT_EQ(usage.layer(il).count[e], count[std::make_pair(il, e)]) << il << "/" << e;
      EXPECT_NEAR(usage.layer(il).weight[e], weight[std::make_pair(il, e)], 1e-9);
    }
    double mass = 0;
    for (int j = 0; j < k; ++j) {
      EXPECT_NEAR(usage.layer(il).rank_mass[j], rank[std::make_pair(il, j)], 1e-9);
      mass += usage.MeanRankMass(il, j);
    }
    if (tokens[il] > 0) {
      EXPECT_NEAR(mass, 1.0, 1e-9);  // shares of a token sum to 1
    }
  }
  EXPECT_EQ(usage.n_tokens(), 58);  // layer 2 got two batches
  EXPECT_EQ(usage.layer(0).n_tokens, 0);
}

TEST(ExpertUsageTest, RejectsBadInput) {
  ExpertUsage usage(2, 4, 2);
  Routing r;
  r.n_tokens = 1;
  r.n_expert_used = 2;
  r.expert_ids = {0, 4};
  r.weights = {1, 1};
  EXPECT_FALSE(usage.Record(1, r).ok());  // expert 4 of 4
  r.expert_ids = {0, 1};
  EXPECT_FALSE(usage.Record(2, r).ok());  // layer 2 of 2
  r.n_expert_used = 3;
  r.expert_ids = {0, 1, 2};
  r.weights = {1, 1, 1};
  EXPECT_FALSE(usage.Record(0, r).ok());  // wider than K
}

TEST(ExpertUsageTest, SummariesOnAHandMadeLayer) {
  ExpertUsage usage(1, 4, 2);
  LayerUsage& l = usage.mutable_layer(0);
  l.n_tokens = 10;
  l.count = {2, 10, 8, 0};  // 20 selections, mean 5
  l.rank_mass = {7.0, 3.0};
  EXPECT_THAT(usage.HotExperts(0, 2), ElementsAre(1, 2));
  EXPECT_THAT(usage.HotExperts(0, 9), ElementsAre(1, 2, 0, 3));
  EXPECT_DOUBLE_EQ(usage.Imbalance(0), 2.0);
  EXPECT_DOUBLE_EQ(usage.SelectionShareOfHot(0, 1), 0.5);
  EXPECT_DOUBLE_EQ(usage.MeanRankMass(0, 0), 0.7);
  EXPECT_DOUBLE_EQ(usage.MassCoveredByTop(0, 1), 0.7);
  EXPECT_DOUBLE_EQ(usage.MassCoveredByTop(0, 2), 1.0);
  EXPECT_EQ(usage.UnusedExperts(0), 1);
}

}  // namespace
}  // namespace ktx::models
