// The GPU router selection against runtime/models/moe.h RouteFromLogits (the
// CPU reference, in double) on the same F32 logits: identical expert ids in
// the same order, weights within 1e-6 relative (both compute in double and
// round once to float; exp may differ in the last double ulp). Covers
// DeepSeek-V3's sigmoid + bias + group-limited top-8 of 256, a softmax router
// without groups (DeepSeek-V2 style), exact ties (lower id first) and NaN.
#include "kernels/cuda/routing.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/models/moe.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::DeviceArray;

struct Case {
  const char* name;
  models::RoutingParams params;
  bool with_bias;
  int logit_kind;  // 0: normal, 1: few distinct values (ties), 2: some NaN
};

RoutingConfig ToGpu(const models::RoutingParams& p) {
  RoutingConfig c;
  c.n_expert = p.n_expert;
  c.n_expert_used = p.n_expert_used;
  c.n_group = p.n_group;
  c.n_group_used = p.n_group_used;
  c.sigmoid = p.gating == models::GatingFunc::kSigmoid;
  c.norm_weights = p.norm_weights;
  c.weights_scale = p.weights_scale;
  return c;
}

class RoutingTest : public ::testing::TestWithParam<Case> {};

TEST_P(RoutingTest, MatchesCpuReference) {
  KTX_SKIP_WITHOUT_GPU();
  const Case& tc = GetParam();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << tc.name << " seed " << seed);
  std::mt19937 rng(seed);
  const int32_t E = tc.params.n_expert, K = tc.params.n_expert_used;
  for (const int64_t n_tokens : {1, 3, 17, 100}) {
    const int64_t stride = E + 3;
    std::vector<float> logits = cuda_test::RandomF32(rng, n_tokens * stride, 2.0f);
    for (auto& v : logits) {
      if (tc.logit_kind == 1) v = std::round(v);
      if (tc.logit_kind == 2 && rng() % 17 == 0) v = std::numeric_limits<float>::quiet_NaN();
    }
    std::vector<float> bias;
    if (tc.with_bias) bias = cuda_test::RandomF32(rng, E, 0.1f);
    DeviceArray<float> d_logits(logits), d_bias(bias), d_w(n_tokens * K);
    DeviceArray<int32_t> d_ids(n_tokens * K);
    d_ids.Poison();
    ASSERT_CUDA_OK(RouteTopK(ToGpu(tc.params), d_logits.get(), stride, n_tokens,
                             tc.with_bias ? d_bias.get() : nullptr, d_ids.get(), d_w.get(),
                             nullptr));
    const std::vector<int32_t> ids = d_ids.Download();
    const std::vector<float> w = d_w.Download();
    std::vector<double> logits64(n_tokens * E);
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int32_t e = 0; e < E; ++e) logits64[t * E + e] = logits[t * stride + e];
    }
    models::Routing want;
    models::RouteFromLogits(tc.params, logits64.data(), n_tokens,
                            tc.with_bias ? bias.data() : nullptr, &want);
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int32_t k = 0; k < K; ++k) {
        ASSERT_EQ(ids[t * K + k], want.id(t, k)) << "token " << t << " entry " << k;
        const float wv = want.weight(t, k);
        if (std::isnan(wv)) {
          ASSERT_TRUE(std::isnan(w[t * K + k]));
        } else {
          ASSERT_NEAR(w[t * K + k], wv, 1e-6 * std::fabs(wv) + 1e-30) << "token " << t;
        }
      }
    }
  }
}

models::RoutingParams Dsv3() {
  models::RoutingParams p;
  p.n_expert = 256;
  p.n_expert_used = 8;
  p.n_group = 8;
  p.n_group_used = 4;
  p.gating = models::GatingFunc::kSigmoid;
  p.norm_weights = true;
  p.weights_scale = 2.5f;
  return p;
}

models::RoutingParams V2Softmax() {
  models::RoutingParams p;
  p.n_expert = 160;
  p.n_expert_used = 6;
  p.gating = models::GatingFunc::kSoftmax;
  p.weights_scale = 16.0f;
  return p;
}

models::RoutingParams TinyGroups() {  // the fixtures' router: 16 experts, 4 groups of 4, keep 2
  models::RoutingParams p;
  p.n_expert = 16;
  p.n_expert_used = 4;
  p.n_group = 4;
  p.n_group_used = 2;
  p.gating = models::GatingFunc::kSigmoid;
  p.norm_weights = true;
  p.weights_scale = 2.5f;
  return p;
}

models::RoutingParams OddGroups() {  // groups of one expert; no scaling (scale 1)
  models::RoutingParams p;
  p.n_expert = 24;
  p.n_expert_used = 3;
  p.n_group = 24;
  p.n_group_used = 5;
  p.gating = models::GatingFunc::kSigmoid;
  p.norm_weights = true;
  p.weights_scale = 1.0f;
  return p;
}

INSTANTIATE_TEST_SUITE_P(Configs, RoutingTest,
                         ::testing::Values(Case{"dsv3", Dsv3(), true, 0},
                                           Case{"dsv3_ties", Dsv3(), false, 1},
                                           Case{"dsv3_nan", Dsv3(), true, 2},
                                           Case{"v2_softmax", V2Softmax(), false, 0},
                                           Case{"v2_softmax_ties", V2Softmax(), false, 1},
                                           Case{"tiny_groups", TinyGroups(), true, 0},
                                           Case{"odd_groups", OddGroups(), true, 1}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(RoutingErrors, RejectsInconsistentConfigs) {
  RoutingConfig c;
  c.n_expert = 256;
  c.n_expert_used = 8;
  c.n_group = 7;  // does not divide 256
  c.n_group_used = 4;
  EXPECT_EQ(RouteTopK(c, nullptr, 256, 1, nullptr, nullptr, nullptr, nullptr),
            cudaErrorInvalidValue);
  c.n_group = 8;
  c.n_group_used = 1;  // 32 experts reachable: fine; 40 used is not
  c.n_expert_used = 40;
  EXPECT_EQ(RouteTopK(c, nullptr, 256, 1, nullptr, nullptr, nullptr, nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace ktx::kernels::cuda
