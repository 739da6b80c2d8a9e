// The GPU's resident hot experts (topology/gpu_hot_experts.h) against an
// independent brute-force choice on small models, budgets and determinism,
// the too-small budget; and the placement planner leaving the chosen experts
// to no shard (PlacementOptions::excluded) with the shards' bytes falling by
// exactly their size.
#include "topology/gpu_hot_experts.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "topology/placement.h"

namespace ktx::topology {
namespace {

using ::testing::HasSubstr;

// Dense layer 0, then MoE layers with the given expert sizes.
ModelExpertTable MakeModel(int n_expert, std::vector<uint64_t> sizes) {
  ModelExpertTable m;
  m.n_layer = 1 + static_cast<int>(sizes.size());
  m.layers.resize(m.n_layer);
  for (size_t i = 0; i < sizes.size(); ++i) m.layers[1 + i] = {true, n_expert, sizes[i]};
  return m;
}

ExpertProfile RandomProfile(const ModelExpertTable& m, std::mt19937& rng, bool skip_one) {
  ExpertProfile p;
  for (int il = 0; il < m.n_layer; ++il) {
    if (!m.layers[il].is_moe || (skip_one && il == 2)) continue;
    std::vector<double> w(m.layers[il].n_expert);
    for (double& v : w) v = static_cast<double>(rng() % 50);  // zeros too
    w[0] += 1;                                                // a positive sum
    p.weights[il] = w;
  }
  return p;
}

// Independent of the implementation's data structures: every (layer,
// expert) with its share and size, sorted by share per byte (ties: layer,
// id), then the greedy fill written out.
std::map<int, std::vector<int>> Reference(const ModelExpertTable& m, const ExpertProfile& p,
                                          uint64_t budget) {
  struct Item {
    double num;  // share numerator
    double den;  // the layer's weight sum (n_expert for uniform layers)
    uint64_t bytes;
    int il, e;
  };
  std::vector<Item> items;
  for (int il = 0; il < m.n_layer; ++il) {
    if (!m.layers[il].is_moe) continue;
    auto it = p.weights.find(il);
    for (int e = 0; e < m.layers[il].n_expert; ++e) {
      if (it == p.weights.end()) {
        items.push_back({1.0, static_cast<double>(m.layers[il].n_expert),
                         m.layers[il].bytes_per_expert, il, e});
      } else if (it->second[e] > 0) {
        items.push_back({it->second[e], std::accumulate(it->second.begin(), it->second.end(), 0.0),
                         m.layers[il].bytes_per_expert, il, e});
      }
    }
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    const double l = a.num / a.den / static_cast<double>(a.bytes);
    const double r = b.num / b.den / static_cast<double>(b.bytes);
    if (l != r) return l > r;
    return std::make_pair(a.il, a.e) < std::make_pair(b.il, b.e);
  });
  std::map<int, std::vector<int>> out;
  uint64_t used = 0;
  for (const Item& i : items) {
    if (used + i.bytes > budget) continue;
    used += i.bytes;
    out[i.il].push_back(i.e);
  }
  for (auto& [il, ids] : out) std::sort(ids.begin(), ids.end());
  return out;
}

TEST(GpuHotExpertsTest, MatchesAnIndependentGreedyAndStaysWithinBudget) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 40; ++trial) {
    SCOPED_TRACE(trial);
    const ModelExpertTable m =
        MakeModel(5 + trial % 7, {300, 450, 300, static_cast<uint64_t>(256 + trial % 3)});
    const ExpertProfile p = RandomProfile(m, rng, trial % 2 == 1);
    const uint64_t budget = 256 + rng() % 6000;
    auto hot = ChooseGpuHotExperts(m, p, budget);
    ASSERT_TRUE(hot.ok()) << hot.status();
    EXPECT_EQ(hot->experts, Reference(m, p, budget));
    uint64_t bytes = 0;
    int count = 0;
    for (const auto& [il, ids] : hot->experts) {
      bytes += ids.size() * m.layers[il].bytes_per_expert;
      count += static_cast<int>(ids.size());
    }
    EXPECT_EQ(hot->bytes, bytes);
    EXPECT_EQ(hot->count, count);
    EXPECT_LE(hot->bytes, budget);
    EXPECT_EQ(hot->PerLayer(m.n_layer)[0], 0);
    // Deterministic.
    auto again = ChooseGpuHotExperts(m, p, budget);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->experts, hot->experts);
  }
}

TEST(GpuHotExpertsTest, TakesTheHottestPerByteAndSkipsUnseenExperts) {
  // Layer 1: 100-byte experts; layer 2: 200-byte experts. Expert 2 of layer 2
  // has half its layer's selections (0.5 / 200 per byte), expert 0 of layer 1
  // 40% (0.4 / 100 per byte: hotter per byte).
  ModelExpertTable m = MakeModel(4, {100, 200});
  ExpertProfile p;
  p.weights[1] = {4, 3, 3, 0};
  p.weights[2] = {1, 1, 5, 3};
  auto hot = ChooseGpuHotExperts(m, p, 300);
  ASSERT_TRUE(hot.ok());
  // Per byte: l1e0 .004, l1e1 .003, l1e2 .003, l2e2 .0025, l2e3 .0015, ...
  EXPECT_EQ(hot->experts, (std::map<int, std::vector<int>>{{1, {0, 1, 2}}}));
  EXPECT_NEAR(hot->expected_share, (1.0 + 0.0) / 2, 1e-12);
  // A budget for everything still leaves layer 1's expert 3 (never selected).
  hot = ChooseGpuHotExperts(m, p, 1 << 20);
  ASSERT_TRUE(hot.ok());
  EXPECT_EQ(hot->experts.at(1), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(hot->experts.at(2), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_NEAR(hot->expected_share, 1.0, 1e-12);
  EXPECT_THAT(DescribeGpuHotExperts(*hot), HasSubstr("7 routed experts resident on the GPU"));
  EXPECT_THAT(DescribeGpuHotExperts(*hot), HasSubstr("1: 3, 2: 4"));
  // Zero budget: none.
  hot = ChooseGpuHotExperts(m, p, 0);
  ASSERT_TRUE(hot.ok());
  EXPECT_EQ(hot->count, 0);
}

TEST(GpuHotExpertsTest, ErrorsNameTheBudgetAndTheProfile) {
  ModelExpertTable m = MakeModel(4, {100, 200});
  auto small = ChooseGpuHotExperts(m, {}, 99);
  EXPECT_EQ(small.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(small.status().message(), HasSubstr("does not fit one routed expert"));
  EXPECT_THAT(small.status().message(), HasSubstr("layer 1"));
  ExpertProfile bad;
  bad.weights[1] = {1, 2};
  auto shape = ChooseGpuHotExperts(m, bad, 1000);
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(shape.status().message(), HasSubstr("layer 1: 2 weights"));
  ExpertProfile dense;
  dense.weights[0] = {1, 1, 1, 1};
  EXPECT_THAT(ChooseGpuHotExperts(m, dense, 1000).status().message(),
              HasSubstr("layer 0: not a MoE layer"));
}

// The planner with the hot set excluded: no shard holds an excluded expert,
// every other expert has exactly one shard, and the shards' bytes drop by
// exactly the excluded bytes; with and without a profile, with replication.
TEST(GpuHotExpertsTest, PlannerLeavesExcludedExpertsToNoShard) {
  std::mt19937 rng(11);
  const ModelExpertTable m = MakeModel(16, {300, 450, 300});
  const ExpertProfile p = RandomProfile(m, rng, false);
  auto hot = ChooseGpuHotExperts(m, p, 2000);
  ASSERT_TRUE(hot.ok());
  ASSERT_GT(hot->count, 0);
  const std::vector<ShardSpec> shards = {{"a", kNoBudget}, {"b", kNoBudget}, {"c", kNoBudget}};
  for (const bool with_profile : {false, true}) {
    SCOPED_TRACE(with_profile ? "profile" : "no profile");
    PlacementOptions base;
    if (with_profile) base.profile = p;
    auto full = PlanExpertPlacement(m, shards, base);
    ASSERT_TRUE(full.ok()) << full.status();
    PlacementOptions options = base;
    options.excluded = hot->experts;
    auto plan = PlanExpertPlacement(m, shards, options);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->total_bytes + hot->bytes, full->total_bytes);
    for (int il = 1; il < m.n_layer; ++il) {
      const std::set<int> ex(options.excluded[il].begin(), options.excluded[il].end());
      for (int e = 0; e < m.layers[il].n_expert; ++e) {
        EXPECT_EQ(plan->layers[il].shards_of_expert[e].size(), ex.count(e) ? 0u : 1u)
            << "layer " << il << " expert " << e;
      }
      for (const ShardPlacement& s : plan->shards) {
        for (int e : s.experts[il]) EXPECT_EQ(ex.count(e), 0u);
      }
    }
  }
  // Replication takes the hottest experts that remain on the shards.
  PlacementOptions options;
  options.profile = p;
  options.excluded = hot->experts;
  options.replication = {1, 2};
  auto plan = PlanExpertPlacement(m, shards, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->n_replicated, 3);
  for (int il = 1; il < m.n_layer; ++il) {
    for (int e : options.excluded[il]) EXPECT_TRUE(plan->layers[il].shards_of_expert[e].empty());
  }
  // Bad exclusions name the layer.
  PlacementOptions bad;
  bad.excluded[1] = {3, 3};
  EXPECT_THAT(PlanExpertPlacement(m, shards, bad).status().message(),
              HasSubstr("excluded experts, layer 1: expert 3 given twice"));
  bad.excluded.clear();
  bad.excluded[0] = {1};
  EXPECT_THAT(PlanExpertPlacement(m, shards, bad).status().message(),
              HasSubstr("layer 0: not a MoE layer"));
}

}  // namespace
}  // namespace ktx::topology
