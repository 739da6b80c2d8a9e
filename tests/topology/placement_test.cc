#include "topology/placement.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace ktx::topology {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr uint64_t kMiB = uint64_t{1} << 20;

// A model of `n_dense` dense layers followed by MoE layers whose expert sizes
// cycle through `sizes`.
ModelExpertTable MakeModel(int n_dense, int n_moe, int n_expert, std::vector<uint64_t> sizes) {
  ModelExpertTable m;
  m.n_layer = n_dense + n_moe;
  m.layers.resize(m.n_layer);
  for (int il = n_dense; il < m.n_layer; ++il) {
    m.layers[il] = {true, n_expert, sizes[(il - n_dense) % sizes.size()]};
  }
  return m;
}

// DeepSeek-V3 at Q4_K_M (notes/GGUF.md section 5): 3 dense + 58 MoE layers of
// 256 experts; 3 x 7.875 MiB per expert, or 2 x 7.875 + 11.48 MiB where
// ffn_down_exps is Q6_K.
ModelExpertTable DeepSeekV3Q4KM() {
  const uint64_t q4k = 7168ULL * 2048 / 256 * 144;  // one expert slice of a Q4_K tensor
  const uint64_t q6k = 7168ULL * 2048 / 256 * 210;
  ModelExpertTable m = MakeModel(3, 58, 256, {3 * q4k});
  const int n = 61;
  for (int il = 3; il < n; ++il) {
    const bool more_bits = il < n / 8 || il >= 7 * n / 8 || (il - n / 8) % 3 == 2;
    m.layers[il].bytes_per_expert = more_bits ? 2 * q4k + q6k : 3 * q4k;
  }
  return m;
}

std::vector<ShardSpec> Shards(int n, uint64_t budget = kNoBudget) {
  std::vector<ShardSpec> shards;
  for (int s = 0; s < n; ++s) shards.push_back({"shard" + std::to_string(s), budget});
  return shards;
}

// Checks a plan against the model independently of the plan's own totals:
// recomputes every shard's bytes and experts from shards_of_expert, checks the
// copies (1, or n_copies for the n_hot hottest of layers with a profile) and
// that the shards holding an expert are distinct. Returns bytes per shard.
std::vector<uint64_t> CheckConsistent(const PlacementPlan& plan, const ModelExpertTable& m,
                                      int n_shard, const PlacementOptions& options = {}) {
  std::vector<uint64_t> bytes(n_shard, 0);
  EXPECT_EQ(plan.shards.size(), static_cast<size_t>(n_shard));
  EXPECT_EQ(plan.layers.size(), static_cast<size_t>(m.n_layer));
  for (int il = 0; il < m.n_layer; ++il) {
    const LayerExperts& layer = m.layers[il];
    const auto& soe = plan.layers[il].shards_of_expert;
    if (!layer.is_moe) {
      EXPECT_TRUE(soe.empty()) << "dense layer " << il;
      for (const ShardPlacement& s : plan.shards) EXPECT_TRUE(s.experts[il].empty());
      continue;
    }
    EXPECT_EQ(soe.size(), static_cast<size_t>(layer.n_expert)) << "layer " << il;
    if (soe.size() != static_cast<size_t>(layer.n_expert)) continue;
    // Which experts must be replicated: the n_hot largest weights, ties by id.
    std::set<int> hot;
    auto it = options.profile.weights.find(il);
    if (it != options.profile.weights.end() && options.replication.n_copies > 1) {
      std::vector<int> ids(layer.n_expert);
      std::iota(ids.begin(), ids.end(), 0);
      std::stable_sort(ids.begin(), ids.end(),
                       [&](int a, int b) { return it->second[a] > it->second[b]; });
      for (int k = 0; k < std::min(options.replication.n_hot, layer.n_expert); ++k) {
        hot.insert(ids[k]);
      }
    }
    std::vector<std::vector<int>> held(n_shard);
    for (int e = 0; e < layer.n_expert; ++e) {
      const size_t want = hot.count(e) ? options.replication.n_copies : 1;
      EXPECT_EQ(soe[e].size(), want) << "layer " << il << " expert " << e;
      EXPECT_EQ(std::set<int>(soe[e].begin(), soe[e].end()).size(), soe[e].size())
          << "copies of layer " << il << " expert " << e << " on the same shard";
      for (int s : soe[e]) {
        EXPECT_GE(s, 0);
        EXPECT_LT(s, n_shard);
        bytes[s] += layer.bytes_per_expert;
        held[s].push_back(e);
      }
    }
    for (int s = 0; s < n_shard; ++s) {
      EXPECT_EQ(plan.shards[s].experts[il], held[s]) << "shard " << s << " layer " << il;
    }
  }
  uint64_t total = 0;
  for (int s = 0; s < n_shard; ++s) {
    EXPECT_EQ(plan.shards[s].bytes, bytes[s]) << "shard " << s;
    total += bytes[s];
  }
  EXPECT_EQ(plan.total_bytes, total);
  return bytes;
}

// A deterministic skewed profile: a few very hot experts, a long cold tail.
ExpertProfile SkewedProfile(const ModelExpertTable& m, uint32_t seed) {
  ExpertProfile p;
  uint32_t x = seed;
  for (int il = 0; il < m.n_layer; ++il) {
    if (!m.layers[il].is_moe) continue;
    std::vector<double> w(m.layers[il].n_expert);
    for (double& v : w) {
      x = x * 1664525u + 1013904223u;
      const double u = (x >> 8) / double(1 << 24);  // [0, 1)
      v = 1.0 / (0.02 + u * u);                     // heavy-tailed, 1..50
    }
    p.weights[il] = std::move(w);
  }
  return p;
}

class PlacementShardsTest : public ::testing::TestWithParam<int> {};

TEST_P(PlacementShardsTest, BytesBalancedWithinOneExpertAndEveryExpertOnce) {
  const int n_shard = GetParam();
  for (const ModelExpertTable& m :
       {DeepSeekV3Q4KM(), MakeModel(1, 7, 19, {1000, 1500, 999}), MakeModel(0, 5, 1, {7})}) {
    absl::StatusOr<PlacementPlan> plan = PlanExpertPlacement(m, Shards(n_shard));
    ASSERT_TRUE(plan.ok()) << plan.status();
    const std::vector<uint64_t> bytes = CheckConsistent(*plan, m, n_shard);
    uint64_t largest = 0;
    for (const LayerExperts& l : m.layers) largest = std::max(largest, l.bytes_per_expert);
    const auto [lo, hi] = std::minmax_element(bytes.begin(), bytes.end());
    EXPECT_LE(*hi - *lo, largest) << n_shard << " shards";
    EXPECT_EQ(plan->total_bytes, m.total_bytes());
    EXPECT_EQ(plan->n_replicated, 0);
    // Per layer the shards' expert counts differ by at most one.
    for (int il = 0; il < m.n_layer; ++il) {
      if (!m.layers[il].is_moe) continue;
      size_t cmin = SIZE_MAX, cmax = 0;
      for (const ShardPlacement& s : plan->shards) {
        cmin = std::min(cmin, s.experts[il].size());
        cmax = std::max(cmax, s.experts[il].size());
      }
      EXPECT_LE(cmax - cmin, 1u) << "layer " << il;
    }
    double share = 0;
    for (const ShardPlacement& s : plan->shards) share += s.share;
    EXPECT_NEAR(share, 1.0, 1e-12);
  }
}

TEST_P(PlacementShardsTest, Deterministic) {
  const int n_shard = GetParam();
  const ModelExpertTable m = MakeModel(2, 9, 23, {300, 410});
  PlacementOptions options;
  options.profile = SkewedProfile(m, 7);
  options.replication = {3, std::min(2, n_shard)};
  absl::StatusOr<PlacementPlan> a = PlanExpertPlacement(m, Shards(n_shard), options);
  absl::StatusOr<PlacementPlan> b = PlanExpertPlacement(m, Shards(n_shard), options);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(PlacementPlanToJson(*a, m), PlacementPlanToJson(*b, m));
  CheckConsistent(*a, m, n_shard, options);
}

TEST_P(PlacementShardsTest, ProfileBalancesLoadPerLayer) {
  const int n_shard = GetParam();
  const ModelExpertTable m = MakeModel(0, 12, 64, {1000});
  PlacementOptions options;
  options.profile = SkewedProfile(m, 12345);
  absl::StatusOr<PlacementPlan> with = PlanExpertPlacement(m, Shards(n_shard), options);
  absl::StatusOr<PlacementPlan> without = PlanExpertPlacement(m, Shards(n_shard));
  ASSERT_TRUE(with.ok() && without.ok());
  CheckConsistent(*with, m, n_shard, options);
  double spread_with = 0, spread_without = 0;
  for (int il = 0; il < m.n_layer; ++il) {
    // Independent load per shard: normalised weights (mean 1) of its experts.
    const std::vector<double>& w = options.profile.weights.at(il);
    const double scale = w.size() / std::accumulate(w.begin(), w.end(), 0.0);
    const double w_max = *std::max_element(w.begin(), w.end()) * scale;
    auto spread = [&](const PlacementPlan& plan, bool check_plan_load) {
      std::vector<double> load(n_shard, 0.0);
      for (int s = 0; s < n_shard; ++s) {
        for (int e : plan.shards[s].experts[il]) load[s] += w[e] * scale;
        if (check_plan_load) {
          EXPECT_NEAR(plan.shards[s].layer_load[il], load[s], 1e-9);
        }
      }
      const auto [lo, hi] = std::minmax_element(load.begin(), load.end());
      return *hi - *lo;
    };
    const double sw = spread(*with, true);
    // LPT bound: the busiest and idlest shard differ by at most the heaviest expert.
    EXPECT_LE(sw, w_max + 1e-9) << "layer " << il;
    spread_with += sw;
    spread_without += spread(*without, false);
  }
  if (n_shard > 1) {
    EXPECT_LT(spread_with, 0.25 * spread_without);
  } else {
    EXPECT_EQ(spread_with, 0.0);
  }
}

TEST_P(PlacementShardsTest, DoesNotFitNamesMissingBytesPerShard) {
  const int n_shard = GetParam();
  // One layer of 6 * n_shard experts of 1 MiB; each budget holds 4.5 of them.
  const ModelExpertTable m = MakeModel(0, 1, 6 * n_shard, {kMiB});
  const std::vector<ShardSpec> shards = Shards(n_shard, 4 * kMiB + kMiB / 2);
  absl::StatusOr<PlacementPlan> plan = PlanExpertPlacement(m, shards);
  ASSERT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(plan.status().message()), HasSubstr("shard 'shard0' needs 6.00 MiB"));
  EXPECT_THAT(std::string(plan.status().message()), HasSubstr("missing 1.50 MiB (1572864 bytes)"));
  absl::StatusOr<PlacementPlan> computed = ComputeExpertPlacement(m, shards);
  ASSERT_TRUE(computed.ok());
  ASSERT_EQ(computed->shortfalls.size(), static_cast<size_t>(n_shard));
  for (const ShardShortfall& s : computed->shortfalls) {
    EXPECT_EQ(s.need_bytes, 6 * kMiB);
    EXPECT_EQ(s.missing_bytes(), kMiB + kMiB / 2);
  }
  CheckConsistent(*computed, m, n_shard);
}

INSTANTIATE_TEST_SUITE_P(OneTwoThree, PlacementShardsTest, ::testing::Values(1, 2, 3));

TEST(PlacementTest, ContiguousRangesAndAlternatingRemainders) {
  // 2 shards, layers of 5 experts of equal size: the odd expert goes to the
  // shard with fewer bytes so far, so layer 1 starts on shard 1.
  const ModelExpertTable m = MakeModel(1, 3, 5, {100});
  absl::StatusOr<PlacementPlan> plan = PlanExpertPlacement(m, Shards(2));
  ASSERT_TRUE(plan.ok());
  EXPECT_THAT(plan->shards[0].experts[1], ElementsAre(0, 1, 2));
  EXPECT_THAT(plan->shards[1].experts[1], ElementsAre(3, 4));
  EXPECT_THAT(plan->shards[0].experts[2], ElementsAre(0, 1));
  EXPECT_THAT(plan->shards[1].experts[2], ElementsAre(2, 3, 4));
  EXPECT_THAT(plan->shards[0].experts[3], ElementsAre(0, 1, 2));
  EXPECT_EQ(plan->shards[0].bytes, 800u);
  EXPECT_EQ(plan->shards[1].bytes, 700u);
  EXPECT_THAT(plan->layers[2].shards_of_expert[2], ElementsAre(1));
}

TEST(PlacementTest, UnequalBudgetsFillTheSmallShardFirstThenTheRest) {
  const ModelExpertTable m = MakeModel(0, 2, 12, {10});
  const std::vector<ShardSpec> shards = {{"small", 40}, {"big", 1000}};
  absl::StatusOr<PlacementPlan> plan = PlanExpertPlacement(m, shards);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->shards[0].bytes, 40u);
  EXPECT_EQ(plan->shards[1].bytes, 200u);
  CheckConsistent(*plan, m, 2);
}

TEST(PlacementTest, ReplicationPutsHottestExpertsOnDistinctShards) {
  const ModelExpertTable m = MakeModel(1, 2, 10, {50});
  PlacementOptions options;
  // Layer 1: experts 7 and 2 are hottest; layer 2: expert 0, then a tie
  // between 5 and 9 (lower id wins).
  options.profile.weights[1] = {1, 1, 30, 1, 1, 1, 1, 40, 1, 1};
  options.profile.weights[2] = {50, 1, 1, 1, 1, 8, 1, 1, 1, 8};
  options.replication = {2, 3};
  absl::StatusOr<PlacementPlan> plan = PlanExpertPlacement(m, Shards(4), options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  CheckConsistent(*plan, m, 4, options);
  EXPECT_EQ(plan->layers[1].shards_of_expert[7].size(), 3u);
  EXPECT_EQ(plan->layers[1].shards_of_expert[2].size(), 3u);
  EXPECT_EQ(plan->layers[2].shards_of_expert[0].size(), 3u);
  EXPECT_EQ(plan->layers[2].shards_of_expert[5].size(), 3u);
  EXPECT_EQ(plan->layers[2].shards_of_expert[9].size(), 1u);
  EXPECT_EQ(plan->n_replicated, 4);
  EXPECT_EQ(plan->total_bytes, 2u * (10 + 2 * 2) * 50);
  // Each copy of expert 7 carries a third of its load.
  const double w7 = 40.0 * 10 / 78;
  double sum = 0;
  for (int s : plan->layers[1].shards_of_expert[7]) {
    EXPECT_GE(plan->shards[s].layer_load[1], w7 / 3 - 1e-9);
    sum += w7 / 3;
  }
  EXPECT_NEAR(sum, w7, 1e-9);
  double total = 0;
  for (const ShardPlacement& s : plan->shards) total += s.load;
  EXPECT_NEAR(total, 20.0, 1e-9);  // the load is conserved: n_expert per layer
}

TEST(PlacementTest, NoReplicationWithoutItBeingAsked) {
  const ModelExpertTable m = MakeModel(0, 3, 9, {50});
  PlacementOptions options;
  options.profile = SkewedProfile(m, 3);
  absl::StatusOr<PlacementPlan> plan = PlanExpertPlacement(m, Shards(3), options);
  ASSERT_TRUE(plan.ok());
  CheckConsistent(*plan, m, 3, options);  // every expert exactly once
  EXPECT_EQ(plan->total_bytes, m.total_bytes());
}

TEST(PlacementTest, ReplicationOverBudgetIsReportedNotDropped) {
  // 2 shards, the second full: 2 copies of the hot expert cannot both fit.
  const ModelExpertTable m = MakeModel(0, 1, 4, {10});
  PlacementOptions options;
  options.profile.weights[0] = {9, 1, 1, 1};
  options.replication = {1, 2};
  absl::StatusOr<PlacementPlan> plan = ComputeExpertPlacement(m, {{"a", 1000}, {"b", 0}}, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_FALSE(plan->fits());
  CheckConsistent(*plan, m, 2, options);
  ASSERT_EQ(plan->shortfalls.size(), 1u);
  EXPECT_EQ(plan->shortfalls[0].name, "b");
  EXPECT_EQ(plan->shortfalls[0].missing_bytes(), 10u);
}

TEST(PlacementTest, BadInputsAreErrors) {
  const ModelExpertTable m = MakeModel(1, 1, 4, {10});
  auto code = [&](const std::vector<ShardSpec>& shards, const PlacementOptions& o) {
    return PlanExpertPlacement(m, shards, o).status();
  };
  EXPECT_THAT(std::string(code({}, {}).message()), HasSubstr("no shards"));
  PlacementOptions o;
  o.profile.weights[1] = {1, 2, 3};
  EXPECT_THAT(std::string(code(Shards(2), o).message()), HasSubstr("3 weights, the layer has 4"));
  o.profile.weights.clear();
  o.profile.weights[0] = {1, 1, 1, 1};
  EXPECT_THAT(std::string(code(Shards(2), o).message()), HasSubstr("layer 0: not a MoE layer"));
  o.profile.weights.clear();
  o.profile.weights[1] = {1, -1, 1, 1};
  EXPECT_THAT(std::string(code(Shards(2), o).message()), HasSubstr("weight of expert 1 is -1"));
  o.profile.weights[1] = {0, 0, 0, 0};
  EXPECT_THAT(std::string(code(Shards(2), o).message()), HasSubstr("sum to 0"));
  o.profile.weights[1] = {1, 1, 1, 1};
  o.replication = {1, 3};
  EXPECT_THAT(std::string(code(Shards(2), o).message()), HasSubstr("3 copies asked for"));
  PlacementOptions no_profile;
  no_profile.replication = {1, 2};
  EXPECT_THAT(std::string(code(Shards(2), no_profile).message()),
              HasSubstr("needs an expert-usage"));
  ModelExpertTable bad = m;
  bad.layers[1].bytes_per_expert = 0;
  EXPECT_THAT(std::string(PlanExpertPlacement(bad, Shards(1)).status().message()),
              HasSubstr("layer 1"));
  bad.n_layer = 5;
  EXPECT_EQ(PlanExpertPlacement(bad, Shards(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PlacementTest, TextAndJson) {
  const ModelExpertTable m = MakeModel(1, 4, 10, {kMiB});
  absl::StatusOr<PlacementPlan> plan =
      PlanExpertPlacement(m, {{"a", 100 * kMiB}, {"b", kNoBudget}});
  ASSERT_TRUE(plan.ok());
  const std::string text = PlacementPlanToText(*plan, m);
  EXPECT_THAT(text,
              HasSubstr("shard a: 20.00 MiB (budget 100.00 MiB), 20 experts, load share 50.0%"));
  EXPECT_THAT(text, HasSubstr("  layers 1-4: experts 0-4\n"));
  EXPECT_THAT(text, HasSubstr("  layers 1-4: experts 5-9\n"));
  EXPECT_THAT(text, HasSubstr("80.00 MiB"));  // left on shard a
  const nlohmann::json j = nlohmann::json::parse(PlacementPlanToJson(*plan, m));
  EXPECT_EQ(j["total_bytes"], 40 * kMiB);
  EXPECT_TRUE(j["fits"].get<bool>());
  EXPECT_EQ(j["shards"][0]["budget_bytes"], 100 * kMiB);
  EXPECT_TRUE(j["shards"][1]["budget_bytes"].is_null());
  EXPECT_EQ(j["shards"][1]["layers"][0]["il"], 1);
  EXPECT_EQ(j["shards"][1]["layers"][0]["ranges"], "5-9");
  EXPECT_EQ(j["layers"].size(), 4u);
  EXPECT_EQ(j["layers"][0]["shards_of_expert"][7][0], 1);
}

TEST(ExpertProfileTest, ParsesLayersAndRejectsBadInput) {
  absl::StatusOr<ExpertProfile> p =
      ParseExpertProfileJson(R"({"layers": {"3": [1, 2.5, 0], "10": [4]}})", "p.json");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_THAT(p->weights.at(3), ElementsAre(1.0, 2.5, 0.0));
  EXPECT_THAT(p->weights.at(10), ElementsAre(4.0));
  EXPECT_THAT(std::string(ParseExpertProfileJson("{", "p.json").status().message()),
              HasSubstr("p.json: not valid JSON"));
  EXPECT_THAT(
      std::string(ParseExpertProfileJson(R"({"layers": {"x": []}})", "p.json").status().message()),
      HasSubstr("layer key 'x'"));
  EXPECT_THAT(
      std::string(
          ParseExpertProfileJson(R"({"layers": {"3": [1, -2]}})", "p.json").status().message()),
      HasSubstr("layer 3, expert 1: weight -2"));
  EXPECT_THAT(
      std::string(
          ParseExpertProfileJson(R"({"layers": {"3": [1, "a"]}})", "p.json").status().message()),
      HasSubstr("not a number"));
  EXPECT_THAT(std::string(ParseExpertProfileJson(R"([1])", "p.json").status().message()),
              HasSubstr("\"layers\""));
  EXPECT_EQ(LoadExpertProfile("/nonexistent/p.json").status().code(), absl::StatusCode::kNotFound);
}

TEST(FormatBytesTest, Units) {
  EXPECT_EQ(FormatBytes(300), "300 B");
  EXPECT_EQ(FormatBytes(1536), "1.50 KiB");
  EXPECT_EQ(FormatBytes(3 * kMiB), "3.00 MiB");
  EXPECT_EQ(FormatBytes(uint64_t{5} << 30), "5.00 GiB");
}

}  // namespace
}  // namespace ktx::topology
