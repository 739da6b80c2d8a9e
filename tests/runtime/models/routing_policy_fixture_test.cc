// Routing policies on the fixture model (tests/data, dsv3-tiny-bf16: 3 layers,
// 1 dense + 2 MoE, 16 experts, K = 4), reference experts:
//  * exactness: top_k = K, mass = 1 and defer = 0 give bit-identical logits to
//    the model's routing (per call and set on the model);
//  * bounded approximation: KL(full || top_k = k) is finite, positive for
//    k < K and falls as k grows (printed);
//  * deferral: Forward with defer = d equals an independent composition of
//    the model's stages written here (the d lowest-weight experts of each
//    token computed on layer 1's input, added at layer 2, for both join points).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/deepseek2.h"
#include "runtime/models/expert_usage.h"
#include "runtime/models/routing_policy.h"

namespace ktx::models {
namespace {

using ::testing::HasSubstr;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

std::vector<int32_t> PromptTokens() {
  std::ifstream in(kDataDir + "manifest.json");
  return nlohmann::json::parse(in)["prompt_tokens"].get<std::vector<int32_t>>();
}

class RoutingPolicyFixtureTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = Deepseek2Model::Open(kDataDir + "dsv3-tiny-bf16.gguf");
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
    prompt_ = new std::vector<int32_t>(PromptTokens());
    full_ = new std::vector<float>(Logits(nullptr));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete prompt_;
    delete full_;
  }

  // Logits of every prompt position under `policy` (null: the model's).
  static std::vector<float> Logits(const RoutingPolicy* policy) {
    auto kv = kv_cache::SequenceKv::Create(model_->kv_layout(), 128);
    EXPECT_TRUE(kv.ok());
    Activations out;
    ForwardOptions options;
    options.policy = policy;
    const absl::Status s = model_->Forward(*prompt_, kv->get(), LogitsRows::kAll, &out, options);
    EXPECT_TRUE(s.ok()) << s;
    return out.ToVector();
  }

  static double MeanKl(const std::vector<float>& p, const std::vector<float>& q) {
    const int64_t v = model_->n_vocab();
    const int64_t rows = static_cast<int64_t>(p.size()) / v;
    double total = 0;
    for (int64_t r = 0; r < rows; ++r) {
      double mp = -INFINITY, mq = -INFINITY;
      for (int64_t i = 0; i < v; ++i) {
        mp = std::max(mp, static_cast<double>(p[r * v + i]));
        mq = std::max(mq, static_cast<double>(q[r * v + i]));
      }
      double sp = 0, sq = 0;
      for (int64_t i = 0; i < v; ++i) {
        sp += std::exp(p[r * v + i] - mp);
        sq += std::exp(q[r * v + i] - mq);
      }
      for (int64_t i = 0; i < v; ++i) {
        const double lp = p[r * v + i] - mp - std::log(sp);
        const double lq = q[r * v + i] - mq - std::log(sq);
        total += std::exp(lp) * (lp - lq);
      }
    }
    return total / static_cast<double>(rows);
  }

  static Deepseek2Model* model_;
  static std::vector<int32_t>* prompt_;
  static std::vector<float>* full_;
};

Deepseek2Model* RoutingPolicyFixtureTest::model_ = nullptr;
std::vector<int32_t>* RoutingPolicyFixtureTest::prompt_ = nullptr;
std::vector<float>* RoutingPolicyFixtureTest::full_ = nullptr;

TEST_F(RoutingPolicyFixtureTest, PoliciesThatChangeNothingAreBitwiseIdentical) {
  ASSERT_EQ(model_->hparams().n_expert_used, 4);
  for (const char* spec : {"top_k=4", "mass=1", "mass=1,min_k=2", "defer=0", "full",
                           "layers=2,defer=3" /* the last layer never defers */}) {
    absl::StatusOr<RoutingPolicy> p = RoutingPolicy::Parse(spec);
    ASSERT_TRUE(p.ok()) << spec;
    EXPECT_EQ(Logits(&*p), *full_) << spec;
  }
  // The same set on the model.
  ASSERT_TRUE(
      model_->SetRoutingPolicy(std::make_shared<RoutingPolicy>(RoutingPolicy::TopK(4))).ok());
  EXPECT_EQ(Logits(nullptr), *full_);
  ASSERT_TRUE(model_->SetRoutingPolicy(nullptr).ok());
}

TEST_F(RoutingPolicyFixtureTest, ModelPolicyAppliesUnlessTheCallBringsItsOwn) {
  const RoutingPolicy k2 = RoutingPolicy::TopK(2);
  const std::vector<float> per_call = Logits(&k2);
  EXPECT_NE(per_call, *full_);
  ASSERT_TRUE(model_->SetRoutingPolicy(std::make_shared<RoutingPolicy>(k2)).ok());
  EXPECT_EQ(Logits(nullptr), per_call);  // the model's policy
  const RoutingPolicy full;
  EXPECT_EQ(Logits(&full), *full_);  // an empty per-call policy means the full routing
  ASSERT_TRUE(model_->SetRoutingPolicy(nullptr).ok());
  // Invalid policies are refused, naming the field.
  const absl::Status s =
      model_->SetRoutingPolicy(std::make_shared<RoutingPolicy>(RoutingPolicy::TopK(5)));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("top_k = 5"));
  EXPECT_EQ(model_->routing_policy(), nullptr);
}

TEST_F(RoutingPolicyFixtureTest, KlIsFiniteAndFallsAsTopKGrows) {
  double previous = INFINITY;
  for (int32_t k = 1; k <= 4; ++k) {
    const RoutingPolicy p = RoutingPolicy::TopK(k);
    const double kl = MeanKl(*full_, Logits(&p));
    std::printf("  top_k=%d: mean KL(full || policy) = %.4g nats\n", k, kl);
    ASSERT_TRUE(std::isfinite(kl));
    if (k < 4) {
      EXPECT_GT(kl, 0.0);
    } else {
      EXPECT_EQ(kl, 0.0);
    }
    EXPECT_LT(kl, previous);
    previous = kl;
  }
  // Adaptive: a higher mass keeps more experts and comes closer.
  const RoutingPolicy m5 = RoutingPolicy::Adaptive(0.5, 1);
  const RoutingPolicy m7 = RoutingPolicy::Adaptive(0.7, 1);
  const double kl5 = MeanKl(*full_, Logits(&m5));
  const double kl7 = MeanKl(*full_, Logits(&m7));
  std::printf("  mass=0.5: %.4g, mass=0.7: %.4g nats\n", kl5, kl7);
  EXPECT_GT(kl5, kl7);
  EXPECT_GT(kl7, 0.0);
}

TEST_F(RoutingPolicyFixtureTest, OnRoutingSeesTheReducedRouting) {
  ExpertUsage usage(3, 16, 4);
  ForwardOptions options;
  const RoutingPolicy k3 = RoutingPolicy::TopK(3);
  options.policy = &k3;
  options.on_routing = [&](int il, const Routing& r) { ASSERT_TRUE(usage.Record(il, r).ok()); };
  auto kv = kv_cache::SequenceKv::Create(model_->kv_layout(), 128);
  Activations out;
  ASSERT_TRUE(model_->Forward(*prompt_, kv->get(), LogitsRows::kLast, &out, options).ok());
  const int64_t n = static_cast<int64_t>(prompt_->size());
  for (int il : {1, 2}) {
    int64_t total = 0;
    for (int64_t c : usage.layer(il).count) total += c;
    EXPECT_EQ(total, 3 * n) << il;
    EXPECT_EQ(usage.layer(il).rank_used[3], 0);
  }
  EXPECT_EQ(usage.layer(0).n_tokens, 0);  // dense
}

// The deferral math, composed here from the model's stages independently of
// ExpertDeferral: layer 1's d lowest-weight entries (ties: the later entry)
// are computed on layer 1's h and added at layer 2 after its attention
// (kNextAttention) or with its MoE output (kNextMoe).
std::vector<float> ComposeWithDeferral(const Deepseek2Model& m, const std::vector<int32_t>& tokens,
                                       int d, DeferJoin join) {
  auto kv = kv_cache::SequenceKv::Create(m.kv_layout(), 128);
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<int32_t> pos(n);
  for (int64_t t = 0; t < n; ++t) pos[t] = static_cast<int32_t>(t);
  Activations x, h, h1, f, shared, late, logits;
  Routing routing, now, later;
  EXPECT_TRUE(m.Embed(tokens, &x).ok());
  for (int il = 0; il < 3; ++il) {
    EXPECT_TRUE(m.AttentionBlock(il, pos, kv->get(), &x).ok());
    if (il == 2 && join == DeferJoin::kNextAttention) {
      EXPECT_TRUE(m.RoutedExperts(1, h1, later, {}, &late).ok());
      const Activations* parts[] = {&late};
      EXPECT_TRUE(m.Combine(parts, &x).ok());
    }
    EXPECT_TRUE(m.FfnNorm(il, x, &h).ok());
    if (il == 0) {
      EXPECT_TRUE(m.DenseFfn(il, h, &f).ok());
      const Activations* parts[] = {&f};
      EXPECT_TRUE(m.Combine(parts, &x).ok());
      continue;
    }
    EXPECT_TRUE(m.Route(il, h, &routing).ok());
    if (il == 1) {
      // Same width as the routing, entries masked out with kNoExpert.
      now = routing;
      later = routing;
      for (int64_t t = 0; t < n; ++t) {
        std::vector<int> order = {0, 1, 2, 3};
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
          return routing.weight(t, a) < routing.weight(t, b) ||
                 (routing.weight(t, a) == routing.weight(t, b) && a > b);
        });
        for (int k = 0; k < 4; ++k) {
          const bool is_late = std::find(order.begin(), order.begin() + d, k) != order.begin() + d;
          (is_late ? now : later).expert_ids[t * 4 + k] = kNoExpert;
          (is_late ? now : later).weights[t * 4 + k] = 0.0f;
        }
      }
      h1 = h;
      EXPECT_TRUE(m.RoutedExperts(il, h, now, {}, &f).ok());
    } else {
      EXPECT_TRUE(m.RoutedExperts(il, h, routing, {}, &f).ok());
    }
    EXPECT_TRUE(m.SharedExperts(il, h, &shared).ok());
    if (il == 2 && join == DeferJoin::kNextMoe) {
      EXPECT_TRUE(m.RoutedExperts(1, h1, later, {}, &late).ok());
      const Activations* parts[] = {&f, &shared, &late};
      EXPECT_TRUE(m.Combine(parts, &x).ok());
    } else {
      const Activations* parts[] = {&f, &shared};
      EXPECT_TRUE(m.Combine(parts, &x).ok());
    }
  }
  EXPECT_TRUE(m.Head(x, LogitsRows::kAll, &logits).ok());
  return logits.ToVector();
}

TEST_F(RoutingPolicyFixtureTest, DeferralMatchesAnIndependentComposition) {
  for (DeferJoin join : {DeferJoin::kNextMoe, DeferJoin::kNextAttention}) {
    for (int d : {1, 3}) {
      SCOPED_TRACE(absl::StrCat(DeferJoinName(join), " d=", d));
      const RoutingPolicy p = RoutingPolicy::Defer(d, join);
      const std::vector<float> got = Logits(&p);
      const std::vector<float> want = ComposeWithDeferral(*model_, *prompt_, d, join);
      EXPECT_EQ(got, want);
      EXPECT_NE(got, *full_);
      const double kl = MeanKl(*full_, got);
      std::printf("  defer=%d join=%s: mean KL %.4g nats\n", d, DeferJoinName(join), kl);
      EXPECT_TRUE(std::isfinite(kl));
    }
  }
}

}  // namespace
}  // namespace ktx::models
