// Routing policies without a model: the text form (parsing, errors that name
// the field, canonical round trip), validation against a model's shape, the
// per-layer overlay, TopKRule in RouteFromLogits (fixed top-k equals the
// model's routing with a smaller K; rules that keep everything are bitwise
// identical; adaptive top-k by gate mass on hand-worked values) and the split
// of a routing into immediate and deferred entries.
#include "runtime/models/routing_policy.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/models/moe.h"

namespace ktx::models {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<int32_t> Ids(const Routing& r, int64_t t) {
  return {r.expert_ids.begin() + t * r.n_expert_used,
          r.expert_ids.begin() + (t + 1) * r.n_expert_used};
}
std::vector<float> Weights(const Routing& r, int64_t t) {
  return {r.weights.begin() + t * r.n_expert_used, r.weights.begin() + (t + 1) * r.n_expert_used};
}

// ---- text form ----

TEST(RoutingPolicyParseTest, FullAndEmpty) {
  for (const char* spec : {"", "full", "  full "}) {
    absl::StatusOr<RoutingPolicy> p = RoutingPolicy::Parse(spec);
    ASSERT_TRUE(p.ok()) << spec << ": " << p.status();
    EXPECT_TRUE(p->empty());
    EXPECT_EQ(p->ToString(), "full");
    EXPECT_TRUE(p->IsFullFor(61, 8));
  }
}

TEST(RoutingPolicyParseTest, GlobalAndLayerPartsOverlay) {
  absl::StatusOr<RoutingPolicy> p =
      RoutingPolicy::Parse("top_k=6, defer=1; layers=3-5,top_k=4; layers=5,mass=0.9,min_k=2");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->ForLayer(0).rule.top_k, 6);
  EXPECT_EQ(p->ForLayer(0).defer, 1);
  EXPECT_EQ(p->ForLayer(3).rule.top_k, 4);
  EXPECT_EQ(p->ForLayer(3).defer, 1);  // inherited from the global part
  EXPECT_EQ(p->ForLayer(3).rule.min_mass, 1.0);
  const LayerRoutingPolicy l5 = p->ForLayer(5);  // both ranges, the later last
  EXPECT_EQ(l5.rule.top_k, 4);
  EXPECT_EQ(l5.rule.min_mass, 0.9);
  EXPECT_EQ(l5.rule.min_k, 2);
  EXPECT_EQ(p->ForLayer(6).rule.top_k, 6);
  EXPECT_TRUE(p->HasDeferral());
  EXPECT_EQ(p->defer_join(), DeferJoin::kNextMoe);
  // Canonical form, and it parses back to the same policy.
  EXPECT_EQ(p->ToString(), "top_k=6,defer=1;layers=3-5,top_k=4;layers=5,mass=0.9,min_k=2");
  absl::StatusOr<RoutingPolicy> back = RoutingPolicy::Parse(p->ToString());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(*back == *p);
}

TEST(RoutingPolicyParseTest, JoinAndRoundTrips) {
  for (const char* spec : {"defer=2,join=next_attention", "mass=0.123456789", "top_k=1",
                           "layers=0-60,defer=3", "min_k=3"}) {
    absl::StatusOr<RoutingPolicy> p = RoutingPolicy::Parse(spec);
    ASSERT_TRUE(p.ok()) << spec << ": " << p.status();
    absl::StatusOr<RoutingPolicy> back = RoutingPolicy::Parse(p->ToString());
    ASSERT_TRUE(back.ok()) << p->ToString();
    EXPECT_TRUE(*back == *p) << spec << " -> " << p->ToString();
  }
  EXPECT_EQ(RoutingPolicy::Parse("defer=2,join=next_attention")->defer_join(),
            DeferJoin::kNextAttention);
  EXPECT_EQ(RoutingPolicy::Defer(1, DeferJoin::kNextAttention).ToString(),
            "defer=1,join=next_attention");
  EXPECT_EQ(RoutingPolicy::TopK(6).ToString(), "top_k=6");
  EXPECT_EQ(RoutingPolicy::Adaptive(0.8, 2).ToString(), "mass=0.8,min_k=2");
}

// Each bad spec and the words its error must contain (the field, the value).
TEST(RoutingPolicyParseTest, ErrorsNameTheField) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"top_k=x", {"top_k", "'x' is not an integer"}},
      {"top_k=0", {"top_k", ">= 1"}},
      {"min_k=-1", {"min_k", ">= 1"}},
      {"defer=-2", {"defer", ">= 0"}},
      {"mass=1.5", {"mass", "outside (0, 1]"}},
      {"mass=0", {"mass", "outside (0, 1]"}},
      {"mass=abc", {"mass", "not a number"}},
      {"topk=6", {"unknown field 'topk'", "top_k"}},
      {"top_k=6,top_k=5", {"top_k", "given twice"}},
      {"top_k", {"'top_k' is not key=value"}},
      {"layers=5-3,top_k=2", {"layers", "ends before it starts"}},
      {"layers=a,top_k=2", {"layers", "'a'"}},
      {"layers=1-,top_k=2", {"layers", "range A-B"}},
      {"layers=2", {"layers", "sets nothing"}},
      {"layers=2,join=next_moe,defer=1", {"join", "whole policy"}},
      {"join=later,defer=1", {"join", "'later'"}},
      {"top_k=6;defer=1", {"second part without layers"}},
      {"top_k=6;;defer=1", {"empty part"}},
  };
  for (const auto& [spec, words] : cases) {
    absl::StatusOr<RoutingPolicy> p = RoutingPolicy::Parse(spec);
    ASSERT_FALSE(p.ok()) << spec;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << spec;
    for (const std::string& w : words) {
      EXPECT_THAT(std::string(p.status().message()), HasSubstr(w)) << spec;
    }
  }
}

TEST(RoutingPolicyValidateTest, AgainstTheModelNamingFieldAndLayers) {
  EXPECT_TRUE(RoutingPolicy::TopK(8).Validate(61, 8).ok());
  EXPECT_TRUE(RoutingPolicy::Defer(7).Validate(61, 8).ok());
  struct Case {
    std::string spec;
    std::vector<std::string> words;
  };
  const std::vector<Case> cases = {
      {"top_k=9", {"all layers", "top_k = 9", "n_expert_used = 8"}},
      {"layers=3-5,top_k=9", {"layers 3-5", "top_k = 9"}},
      {"min_k=9", {"min_k = 9"}},
      {"defer=8", {"defer = 8", "at least one expert stays immediate"}},
      {"layers=60-61,defer=1", {"layers 60-61", "n_layer = 61"}},
      {"top_k=4;layers=10,defer=4", {"layer 10", "defer = 4", "top_k = 4"}},
  };
  for (const Case& c : cases) {
    absl::StatusOr<RoutingPolicy> p = RoutingPolicy::Parse(c.spec);
    ASSERT_TRUE(p.ok()) << c.spec << ": " << p.status();
    const absl::Status s = p->Validate(61, 8);
    ASSERT_FALSE(s.ok()) << c.spec;
    for (const std::string& w : c.words) {
      EXPECT_THAT(std::string(s.message()), HasSubstr(w)) << c.spec;
    }
  }
}

TEST(RoutingPolicyTest, IsFullForKnowsTheModel) {
  EXPECT_TRUE(RoutingPolicy::TopK(8).IsFullFor(61, 8));
  EXPECT_FALSE(RoutingPolicy::TopK(6).IsFullFor(61, 8));
  EXPECT_TRUE(RoutingPolicy::Adaptive(1.0, 1).IsFullFor(61, 8));
  EXPECT_FALSE(RoutingPolicy::Adaptive(0.9, 1).IsFullFor(61, 8));
  EXPECT_TRUE(RoutingPolicy::Defer(0).IsFullFor(61, 8));
  EXPECT_FALSE(RoutingPolicy::Defer(1).IsFullFor(61, 8));
  // Deferral on the last layer alone does nothing.
  EXPECT_TRUE(RoutingPolicy::Parse("layers=60,defer=2")->IsFullFor(61, 8));
}

// ---- TopKRule in RouteFromLogits ----

RoutingParams DsParams(int32_t k) {
  RoutingParams p;
  p.n_expert = 16;
  p.n_expert_used = k;
  p.n_group = 4;
  p.n_group_used = 2;
  p.gating = GatingFunc::kSigmoid;
  p.norm_weights = true;
  p.weights_scale = 2.5f;
  return p;
}

struct RandomBatch {
  std::vector<double> logits;
  std::vector<float> bias;
};

RandomBatch MakeBatch(int64_t n_tokens, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0.0, 1.5);
  std::uniform_real_distribution<float> b(-0.05f, 0.05f);
  RandomBatch out;
  out.logits.resize(n_tokens * 16);
  for (double& v : out.logits) v = n(rng);
  out.bias.resize(16);
  for (float& v : out.bias) v = b(rng);
  return out;
}

TEST(TopKRuleTest, FixedTopKIsTheModelWithSmallerK) {
  const int64_t n = 37;
  const RandomBatch batch = MakeBatch(n, 3);
  for (int32_t k = 1; k <= 4; ++k) {
    TopKRule rule;
    rule.top_k = k;
    const TopKRule* rules[] = {&rule};
    Routing with_rule, smaller_k;
    RouteFromLogits(DsParams(4), batch.logits.data(), n, batch.bias.data(), rules, &with_rule);
    RouteFromLogits(DsParams(k), batch.logits.data(), n, batch.bias.data(), &smaller_k);
    EXPECT_EQ(with_rule.n_expert_used, k);
    EXPECT_EQ(with_rule.expert_ids, smaller_k.expert_ids) << "k = " << k;
    EXPECT_EQ(with_rule.weights, smaller_k.weights) << "k = " << k;  // bitwise
  }
}

TEST(TopKRuleTest, RulesThatKeepEverythingAreBitwiseIdentical) {
  const int64_t n = 23;
  const RandomBatch batch = MakeBatch(n, 5);
  Routing plain;
  RouteFromLogits(DsParams(4), batch.logits.data(), n, batch.bias.data(), &plain);
  TopKRule k4, mass1, both;
  k4.top_k = 4;
  mass1.min_mass = 1.0;
  both.top_k = 4;
  both.min_mass = 1.0;
  both.min_k = 3;
  for (const TopKRule* r : {&k4, &mass1, &both}) {
    const TopKRule* rules[] = {r};
    Routing got;
    RouteFromLogits(DsParams(4), batch.logits.data(), n, batch.bias.data(), rules, &got);
    EXPECT_EQ(got.n_expert_used, 4);
    EXPECT_EQ(got.expert_ids, plain.expert_ids);
    EXPECT_EQ(got.weights, plain.weights);
  }
}

double Logit(double p) { return std::log(p / (1.0 - p)); }

// One token, 6 experts, K = 4, no groups, norm + scale 2: gate weights
// p = 0.8, 0.6, 0.4, 0.2 for experts 2, 0, 5, 3 (selection order = weight
// order without a bias). Σ p = 2.0: shares 0.4, 0.3, 0.2, 0.1.
TEST(TopKRuleTest, AdaptiveKeepsHeaviestUntilTheMassAndRenormalises) {
  RoutingParams params;
  params.n_expert = 6;
  params.n_expert_used = 4;
  params.gating = GatingFunc::kSigmoid;
  params.norm_weights = true;
  params.weights_scale = 2.0f;
  const std::vector<double> logits = {Logit(0.6), Logit(0.05), Logit(0.8),
                                      Logit(0.2), Logit(0.1),  Logit(0.4)};
  auto route = [&](double mass, int32_t min_k) {
    TopKRule rule;
    rule.min_mass = mass;
    rule.min_k = min_k;
    const TopKRule* rules[] = {&rule};
    Routing r;
    RouteFromLogits(params, logits.data(), 1, nullptr, rules, &r);
    return r;
  };
  // 0.4 + 0.3 = 0.7 >= 0.65: two experts, weights 0.8/1.4 and 0.6/1.4, x2.
  Routing r = route(0.65, 1);
  EXPECT_EQ(r.n_expert_used, 2);
  EXPECT_THAT(Ids(r, 0), ElementsAre(2, 0));
  EXPECT_FLOAT_EQ(r.weight(0, 0), static_cast<float>(0.8 / 1.4 * 2.0));
  EXPECT_FLOAT_EQ(r.weight(0, 1), static_cast<float>(0.6 / 1.4 * 2.0));
  // 0.75 needs the third (0.9).
  r = route(0.75, 1);
  EXPECT_THAT(Ids(r, 0), ElementsAre(2, 0, 5));
  EXPECT_FLOAT_EQ(r.weight(0, 2), static_cast<float>(0.4 / 1.8 * 2.0));
  // A low mass stops at the first, unless min_k asks for more.
  EXPECT_THAT(Ids(route(0.1, 1), 0), ElementsAre(2));
  EXPECT_FLOAT_EQ(route(0.1, 1).weight(0, 0), 2.0f);
  EXPECT_THAT(Ids(route(0.1, 3), 0), ElementsAre(2, 0, 5));
  EXPECT_THAT(Ids(route(0.1, 9), 0), ElementsAre(2, 0, 5, 3));  // clipped to K
}

// With a selection bias the selection order differs from the weight order:
// adaptive top-k ranks by weight, fixed top-k by selection.
TEST(TopKRuleTest, AdaptiveRanksByWeightFixedBySelection) {
  RoutingParams params;
  params.n_expert = 4;
  params.n_expert_used = 3;
  params.gating = GatingFunc::kSigmoid;
  params.norm_weights = true;
  const std::vector<double> logits = {Logit(0.5), Logit(0.9), Logit(0.3), Logit(0.1)};
  const std::vector<float> bias = {0.5f, 0.0f, 0.0f, 0.0f};  // expert 0 selected first
  Routing full;
  RouteFromLogits(params, logits.data(), 1, bias.data(), &full);
  EXPECT_THAT(Ids(full, 0), ElementsAre(0, 1, 2));
  TopKRule fixed;
  fixed.top_k = 1;
  TopKRule adaptive;
  adaptive.min_mass = 0.5;  // 0.9 / 1.7 = 0.53 alone
  for (auto [rule, want] : {std::pair{&fixed, 0}, std::pair{&adaptive, 1}}) {
    const TopKRule* rules[] = {rule};
    Routing r;
    RouteFromLogits(params, logits.data(), 1, bias.data(), rules, &r);
    EXPECT_THAT(Ids(r, 0), ElementsAre(want));
    EXPECT_FLOAT_EQ(r.weight(0, 0), 1.0f);  // renormalised alone
  }
}

TEST(TopKRuleTest, PerTokenRulesPadShorterRows) {
  const int64_t n = 3;
  const RandomBatch batch = MakeBatch(n, 9);
  TopKRule two;
  two.top_k = 2;
  TopKRule one;
  one.top_k = 1;
  const TopKRule* rules[] = {&two, nullptr, &one};
  Routing got, full, k2, k1;
  RouteFromLogits(DsParams(4), batch.logits.data(), n, batch.bias.data(), rules, &got);
  RouteFromLogits(DsParams(4), batch.logits.data(), n, batch.bias.data(), &full);
  RouteFromLogits(DsParams(2), batch.logits.data(), n, batch.bias.data(), &k2);
  RouteFromLogits(DsParams(1), batch.logits.data(), n, batch.bias.data(), &k1);
  ASSERT_EQ(got.n_expert_used, 4);  // the widest row
  EXPECT_EQ(got.kept(0), 2);
  EXPECT_EQ(got.kept(1), 4);
  EXPECT_EQ(got.kept(2), 1);
  EXPECT_THAT(Ids(got, 0), ElementsAre(k2.id(0, 0), k2.id(0, 1), kNoExpert, kNoExpert));
  EXPECT_THAT(Weights(got, 0), ElementsAre(k2.weight(0, 0), k2.weight(0, 1), 0.0f, 0.0f));
  EXPECT_EQ(Ids(got, 1), Ids(full, 1));
  EXPECT_EQ(Weights(got, 1), Weights(full, 1));
  EXPECT_THAT(Ids(got, 2), ElementsAre(k1.id(2, 0), kNoExpert, kNoExpert, kNoExpert));
  EXPECT_EQ(got.weight(2, 0), k1.weight(2, 0));
}

// ---- deferral split ----

Routing Hand(int32_t width, std::vector<int32_t> ids, std::vector<float> w) {
  Routing r;
  r.n_expert_used = width;
  r.n_tokens = static_cast<int64_t>(ids.size()) / width;
  r.expert_ids = std::move(ids);
  r.weights = std::move(w);
  return r;
}

TEST(SplitDeferredTest, LowestWeightsGoLateAtLeastOneStays) {
  // Token 0: weights 0.5 0.1 0.3 0.1 -> the two 0.1 (later first on ties).
  // Token 1: one kept entry + padding: nothing can be deferred.
  // Token 2: 0.2 0.4 0.4 0.0(pad) -> with d = 2: 0.2 and the later 0.4.
  const Routing r = Hand(4, {7, 3, 9, 1, 5, kNoExpert, kNoExpert, kNoExpert, 2, 4, 6, kNoExpert},
                         {0.5f, 0.1f, 0.3f, 0.1f, 1.0f, 0, 0, 0, 0.2f, 0.4f, 0.4f, 0});
  Routing now, late;
  const int32_t d[] = {2};
  SplitDeferred(r, d, &now, &late);
  ASSERT_EQ(now.n_expert_used, 2);
  ASSERT_EQ(late.n_expert_used, 2);
  EXPECT_THAT(Ids(now, 0), ElementsAre(7, 9));
  EXPECT_THAT(Ids(late, 0), ElementsAre(3, 1));
  EXPECT_THAT(Weights(late, 0), ElementsAre(0.1f, 0.1f));
  EXPECT_THAT(Ids(now, 1), ElementsAre(5, kNoExpert));
  EXPECT_THAT(Ids(late, 1), ElementsAre(kNoExpert, kNoExpert));
  EXPECT_THAT(Ids(now, 2), ElementsAre(4, kNoExpert));
  EXPECT_THAT(Ids(late, 2), ElementsAre(2, 6));
  EXPECT_THAT(Weights(late, 2), ElementsAre(0.2f, 0.4f));
  // Per-token d, and d = 0 everywhere leaves an empty (all padding) late routing.
  const int32_t per_token[] = {1, 3, 0};
  SplitDeferred(r, per_token, &now, &late);
  EXPECT_THAT(Ids(late, 0), ElementsAre(1));  // the later of the two 0.1
  EXPECT_THAT(Ids(late, 1), ElementsAre(kNoExpert));
  EXPECT_THAT(Ids(late, 2), ElementsAre(kNoExpert));
  EXPECT_EQ(now.n_expert_used, 3);
  const int32_t none[] = {0};
  SplitDeferred(r, none, &now, &late);
  EXPECT_EQ(now.expert_ids, r.expert_ids);
  EXPECT_EQ(now.weights, r.weights);
  for (int32_t e : late.expert_ids) EXPECT_EQ(e, kNoExpert);
}

}  // namespace
}  // namespace ktx::models
