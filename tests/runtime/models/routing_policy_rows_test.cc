// The per-slice policy functions of batched engines (routing_policy.h:
// ApplyRoutingPolicies, ReduceRoutingRows, CompactRouting, SplitDeferredRows)
// against RouteFromLogits with per-token TopKRules (the single-process
// engines' path, written independently): a FULL routing reduced afterwards
// keeps the same experts with the same weights (to float rounding of the
// reweighting), on random DeepSeek-V3-style gates (16 experts, 4 groups,
// sigmoid, bias, norm, scale 2.5) and awkward range layouts.
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/models/moe.h"
#include "runtime/models/routing_policy.h"

namespace ktx::models {
namespace {

RoutingParams Params() {
  RoutingParams p;
  p.n_expert = 16;
  p.n_expert_used = 4;
  p.n_group = 4;
  p.n_group_used = 2;
  p.gating = GatingFunc::kSigmoid;
  p.norm_weights = true;
  p.weights_scale = 2.5f;
  return p;
}

struct Gates {
  std::vector<double> logits;  // [n, 16]
  std::vector<float> bias;     // [16]
};

Gates MakeGates(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> g(0.0, 1.5);
  std::uniform_real_distribution<float> b(-0.05f, 0.05f);
  Gates out;
  out.logits.resize(static_cast<size_t>(n * 16));
  for (double& v : out.logits) v = g(rng);
  out.bias.resize(16);
  for (float& v : out.bias) v = b(rng);
  return out;
}

RoutingPolicy Parsed(const char* text) {
  absl::StatusOr<RoutingPolicy> p = RoutingPolicy::Parse(text);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? *p : RoutingPolicy();
}

// Same experts per row (kept entries in order), weights within `tol`
// relative, padding after them.
void ExpectSameRouting(const Routing& got, const Routing& want, double tol) {
  ASSERT_EQ(got.n_tokens, want.n_tokens);
  EXPECT_EQ(got.n_expert_used, want.n_expert_used);
  for (int64_t t = 0; t < want.n_tokens; ++t) {
    ASSERT_EQ(got.kept(t), want.kept(t)) << "row " << t;
    for (int k = 0; k < want.kept(t); ++k) {
      EXPECT_EQ(got.id(t, k), want.id(t, k)) << "row " << t << " entry " << k;
      EXPECT_NEAR(got.weight(t, k), want.weight(t, k), tol * std::fabs(want.weight(t, k)))
          << "row " << t << " entry " << k;
    }
    for (int k = got.kept(t); k < got.n_expert_used; ++k) {
      EXPECT_EQ(got.id(t, k), kNoExpert);
      EXPECT_EQ(got.weight(t, k), 0.0f);
    }
  }
}

TEST(ApplyRoutingPoliciesTest, ReducingAFullRoutingEqualsRoutingWithTheRules) {
  const int64_t n = 53;
  const Gates gates = MakeGates(n, 11);
  const RoutingParams params = Params();
  const RoutingPolicy a = RoutingPolicy::TopK(2);
  const RoutingPolicy b = RoutingPolicy::Adaptive(0.6, 1);
  const RoutingPolicy c = Parsed("mass=0.9,min_k=2;layers=1,top_k=3,mass=0.5");
  const RoutingPolicy model = Parsed("top_k=3");
  // Rows 0-6 a, 7 b (one row), 8-19 none (the model's), 20-40 c, 41-52 the
  // model's (outside every range).
  const std::vector<RowPolicy> rows = {{0, 7, &a}, {7, 8, &b}, {8, 20, nullptr}, {20, 41, &c}};
  for (int il : {0, 1}) {
    for (const RoutingPolicy* model_policy : {&model, static_cast<const RoutingPolicy*>(nullptr)}) {
      std::vector<TopKRule> rule_of(n);
      std::vector<const TopKRule*> rules(n, nullptr);
      for (int64_t t = 0; t < n; ++t) {
        const RoutingPolicy* p = model_policy;
        for (const RowPolicy& r : rows) {
          if (t >= r.begin && t < r.end && r.policy != nullptr) p = r.policy;
        }
        if (p != nullptr) {
          rule_of[t] = p->ForLayer(il).rule;
          rules[t] = &rule_of[t];
        }
      }
      Routing want, got;
      RouteFromLogits(params, gates.logits.data(), n, gates.bias.data(), rules, &want);
      RouteFromLogits(params, gates.logits.data(), n, gates.bias.data(), &got);
      ApplyRoutingPolicies(params, il, rows, model_policy, &got);
      SCOPED_TRACE(::testing::Message() << "il " << il << ", model policy "
                                        << (model_policy ? model_policy->ToString() : "none"));
      ExpectSameRouting(got, want, 2e-7);
    }
  }
}

TEST(ApplyRoutingPoliciesTest, PoliciesThatKeepEverythingLeaveTheRoutingBitwise) {
  const int64_t n = 19;
  const Gates gates = MakeGates(n, 5);
  Routing plain;
  RouteFromLogits(Params(), gates.logits.data(), n, gates.bias.data(), &plain);
  const RoutingPolicy k4 = RoutingPolicy::TopK(4);
  const RoutingPolicy mass1 = RoutingPolicy::Adaptive(1.0, 2);
  const RoutingPolicy full;
  const RoutingPolicy defer_only = RoutingPolicy::Defer(2);
  const std::vector<RowPolicy> rows = {
      {0, 5, &k4}, {5, 6, &mass1}, {6, 12, &full}, {12, 19, &defer_only}};
  Routing got = plain;
  ApplyRoutingPolicies(Params(), 1, rows, nullptr, &got);
  EXPECT_EQ(got.n_expert_used, 4);
  EXPECT_EQ(got.expert_ids, plain.expert_ids);
  EXPECT_EQ(got.weights, plain.weights);
  got = plain;
  ApplyRoutingPolicies(Params(), 1, {}, nullptr, &got);
  EXPECT_EQ(got.expert_ids, plain.expert_ids);
}

TEST(ApplyRoutingPoliciesTest, WidthShrinksToTheWidestRow) {
  const int64_t n = 8;
  const Gates gates = MakeGates(n, 7);
  Routing r;
  RouteFromLogits(Params(), gates.logits.data(), n, gates.bias.data(), &r);
  const RoutingPolicy one = RoutingPolicy::TopK(1);
  const RoutingPolicy two = RoutingPolicy::TopK(2);
  const std::vector<RowPolicy> rows = {{0, 3, &one}, {3, 8, &two}};
  ApplyRoutingPolicies(Params(), 1, rows, nullptr, &r);
  EXPECT_EQ(r.n_expert_used, 2);
  for (int64_t t = 0; t < 3; ++t) {
    EXPECT_EQ(r.kept(t), 1);
    EXPECT_FLOAT_EQ(r.weight(t, 0), 2.5f);  // all the (scaled) mass on the one expert
  }
  for (int64_t t = 3; t < 8; ++t) EXPECT_EQ(r.kept(t), 2);
}

// SplitDeferredRows == SplitDeferred with each row's d, per join point.
TEST(SplitDeferredRowsTest, MovesEachRowsDeferredEntriesToItsJoinPoint) {
  const int64_t n = 31;
  const Gates gates = MakeGates(n, 3);
  const RoutingParams params = Params();
  const RoutingPolicy moe = RoutingPolicy::Defer(1);
  const RoutingPolicy attention = Parsed("top_k=3,defer=2,join=next_attention");
  const RoutingPolicy model = Parsed("layers=1,defer=3");
  const std::vector<RowPolicy> rows = {{0, 10, &moe}, {10, 20, &attention}};
  Routing full;
  RouteFromLogits(params, gates.logits.data(), n, gates.bias.data(), &full);
  Routing routing = full;
  ApplyRoutingPolicies(params, 1, rows, &model, &routing);
  const Routing reduced = routing;
  Routing late[2];
  const DeferredCount count = SplitDeferredRows(1, 3, rows, &model, &routing, late);
  // Expected: rows 0-9 defer 1 at next_moe, 10-19 defer 2 at next_attention,
  // 20-30 (the model's policy) defer 3 at next_moe.
  std::vector<int32_t> d_moe(n, 0), d_attention(n, 0);
  for (int64_t t = 0; t < n; ++t) {
    if (t < 10) {
      d_moe[t] = 1;
    } else if (t < 20) {
      d_attention[t] = 2;
    } else {
      d_moe[t] = 3;
    }
  }
  Routing rest, want_moe, want_now, want_attention;
  SplitDeferred(reduced, d_moe, &rest, &want_moe);
  SplitDeferred(rest, d_attention, &want_now, &want_attention);
  EXPECT_EQ(routing.expert_ids, want_now.expert_ids);
  EXPECT_EQ(routing.weights, want_now.weights);
  EXPECT_EQ(late[static_cast<int>(DeferJoin::kNextMoe)].expert_ids, want_moe.expert_ids);
  EXPECT_EQ(late[static_cast<int>(DeferJoin::kNextAttention)].expert_ids,
            want_attention.expert_ids);
  EXPECT_EQ(count.entries[static_cast<int>(DeferJoin::kNextMoe)], 10 * 1 + 11 * 3);
  EXPECT_EQ(count.entries[static_cast<int>(DeferJoin::kNextAttention)], 10 * 2);
  // Every row keeps at least one immediate expert.
  for (int64_t t = 0; t < n; ++t) EXPECT_GE(routing.kept(t), 1);
  // The last layer never defers.
  routing = reduced;
  const DeferredCount last = SplitDeferredRows(2, 3, rows, &model, &routing, late);
  EXPECT_EQ(last.total(), 0);
  EXPECT_EQ(routing.expert_ids, reduced.expert_ids);
  for (int j = 0; j < 2; ++j) {
    EXPECT_EQ(late[j].n_tokens, n);
    for (int32_t e : late[j].expert_ids) EXPECT_EQ(e, kNoExpert);
  }
}

}  // namespace
}  // namespace ktx::models
