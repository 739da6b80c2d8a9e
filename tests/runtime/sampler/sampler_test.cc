#include "runtime/sampler/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace ktx::sampler {
namespace {

Sampler MakeSampler(const SamplingParams& params) {
  absl::StatusOr<Sampler> s = Sampler::Create(params);
  EXPECT_TRUE(s.ok()) << s.status();
  return std::move(s).value();
}

// Independent float64 reference of the documented pipeline (no penalties):
// the probability with which each id is drawn.
std::vector<double> ReferenceProbs(const std::vector<double>& logits, double temperature, int top_k,
                                   double top_p, double min_p) {
  const size_t n = logits.size();
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return logits[a] > logits[b]; });
  size_t kept = n;
  if (top_k > 0 && static_cast<size_t>(top_k) < n) kept = static_cast<size_t>(top_k);
  std::vector<double> p(kept);
  double sum = 0;
  for (size_t i = 0; i < kept; ++i) {
    p[i] = std::exp((logits[order[i]] - logits[order[0]]) / temperature);
    sum += p[i];
  }
  for (double& v : p) v /= sum;
  if (top_p < 1.0) {
    double cum = 0;
    for (size_t i = 0; i < kept; ++i) {
      cum += p[i];
      if (cum >= top_p) {
        kept = i + 1;
        break;
      }
    }
  }
  std::vector<double> out(n, 0.0);
  double total = 0;
  for (size_t i = 0; i < kept; ++i) {
    if (p[i] >= min_p * p[0]) {
      out[order[i]] = p[i];
      total += p[i];
    }
  }
  for (double& v : out) v /= total;
  return out;
}

// Pearson chi-square of `counts` against `expected` probabilities over the
// categories with expected > 0; tokens with expected == 0 must never appear.
double ChiSquare(const std::vector<int64_t>& counts, const std::vector<double>& expected,
                 int64_t n_draws, int* dof) {
  double chi2 = 0;
  *dof = -1;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (expected[i] == 0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " has probability 0 but was drawn";
      continue;
    }
    const double e = expected[i] * static_cast<double>(n_draws);
    const double d = static_cast<double>(counts[i]) - e;
    chi2 += d * d / e;
    ++*dof;
  }
  return chi2;
}

// Upper 0.1% quantiles of chi-square for 1..10 degrees of freedom.
double ChiSquareCritical(int dof) {
  static const double kQ999[] = {0,     10.83, 13.82, 16.27, 18.47, 20.52,
                                 22.46, 24.32, 26.12, 27.88, 29.59};
  return kQ999[dof];
}

void ExpectDistribution(const SamplingParams& params, const std::vector<float>& logits,
                        const std::vector<double>& expected, int64_t n_draws = 200000) {
  Sampler sampler = MakeSampler(params);
  std::vector<int64_t> counts(logits.size(), 0);
  for (int64_t i = 0; i < n_draws; ++i) {
    const int32_t t = sampler.Sample(logits.data(), static_cast<int64_t>(logits.size()));
    ASSERT_GE(t, 0);
    ASSERT_LT(t, static_cast<int32_t>(logits.size()));
    ++counts[static_cast<size_t>(t)];
  }
  int dof = 0;
  const double chi2 = ChiSquare(counts, expected, n_draws, &dof);
  ASSERT_GE(dof, 1);
  ASSERT_LE(dof, 10);
  EXPECT_LT(chi2, ChiSquareCritical(dof)) << "dof " << dof;
}

const std::vector<float> kLogits7 = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, 2.5f};

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

TEST(SamplerTest, GreedyIsArgmax) {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  SamplingParams params;
  params.temperature = 0.0f;
  params.penalty_last_n = 0;
  Sampler sampler = MakeSampler(params);
  for (int64_t n_vocab : {1, 19, 111, 989, 129280}) {
    for (int rep = 0; rep < 5; ++rep) {
      std::vector<float> logits(static_cast<size_t>(n_vocab));
      for (float& l : logits) l = normal(gen);
      const auto expected = std::max_element(logits.begin(), logits.end()) - logits.begin();
      EXPECT_EQ(sampler.Sample(logits.data(), n_vocab), expected) << n_vocab;
    }
  }
}

TEST(SamplerTest, GreedyTiesPickLowestId) {
  SamplingParams params;
  params.temperature = 0.0f;
  Sampler sampler = MakeSampler(params);
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 2.0f};
  EXPECT_EQ(sampler.Sample(logits.data(), 5), 1);
}

TEST(SamplerTest, TopK1IsArgmaxAtAnyTemperature) {
  std::mt19937 gen(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  SamplingParams params;
  params.temperature = 5.0f;
  params.top_k = 1;
  params.penalty_last_n = 0;
  params.seed = 3;
  Sampler sampler = MakeSampler(params);
  for (int rep = 0; rep < 50; ++rep) {
    std::vector<float> logits(989);
    for (float& l : logits) l = normal(gen);
    const auto expected = std::max_element(logits.begin(), logits.end()) - logits.begin();
    EXPECT_EQ(sampler.Sample(logits.data(), 989), expected);
  }
}

TEST(SamplerTest, NanLogitsAreNeverDrawn) {
  SamplingParams params;
  params.seed = 5;
  params.penalty_last_n = 0;
  Sampler sampler = MakeSampler(params);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> logits = {nan, 0.0f, nan, 0.5f};
  for (int i = 0; i < 1000; ++i) {
    const int32_t t = sampler.Sample(logits.data(), 4);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
}

TEST(SamplerTest, TemperatureDistribution) {
  SamplingParams params;
  params.temperature = 0.8f;
  params.penalty_last_n = 0;
  params.seed = 1234;
  ExpectDistribution(params, kLogits7, ReferenceProbs(ToDouble(kLogits7), 0.8, 0, 1.0, 0.0));
}

TEST(SamplerTest, TemperatureDistributionRejectsWrongTemperature) {
  // The same draws must NOT fit the T = 1 distribution: the test has power.
  SamplingParams params;
  params.temperature = 0.8f;
  params.penalty_last_n = 0;
  params.seed = 1234;
  Sampler sampler = MakeSampler(params);
  const int64_t n_draws = 200000;
  std::vector<int64_t> counts(7, 0);
  for (int64_t i = 0; i < n_draws; ++i) ++counts[sampler.Sample(kLogits7.data(), 7)];
  int dof = 0;
  const double chi2 =
      ChiSquare(counts, ReferenceProbs(ToDouble(kLogits7), 1.0, 0, 1.0, 0.0), n_draws, &dof);
  EXPECT_GT(chi2, 10 * ChiSquareCritical(dof));
}

TEST(SamplerTest, TopKDistribution) {
  SamplingParams params;
  params.temperature = 1.3f;
  params.top_k = 3;
  params.penalty_last_n = 0;
  params.seed = 99;
  ExpectDistribution(params, kLogits7, ReferenceProbs(ToDouble(kLogits7), 1.3, 3, 1.0, 0.0));
}

TEST(SamplerTest, TopPDistribution) {
  SamplingParams params;
  params.temperature = 1.0f;
  params.top_p = 0.8f;
  params.penalty_last_n = 0;
  params.seed = 7;
  const std::vector<double> expected = ReferenceProbs(ToDouble(kLogits7), 1.0, 0, 0.8, 0.0);
  // p sorted: .502 .305 .185 ... -> three tokens kept (ids 4, 6, 1).
  EXPECT_EQ(std::count_if(expected.begin(), expected.end(), [](double p) { return p > 0; }), 3);
  ExpectDistribution(params, kLogits7, expected);
}

TEST(SamplerTest, MinPDistribution) {
  SamplingParams params;
  params.temperature = 1.0f;
  params.min_p = 0.2f;
  params.penalty_last_n = 0;
  params.seed = 8;
  const std::vector<double> expected = ReferenceProbs(ToDouble(kLogits7), 1.0, 0, 1.0, 0.2);
  // Kept: logit >= 3 + ln 0.2 = 1.39 -> ids 1, 4, 6.
  EXPECT_EQ(std::count_if(expected.begin(), expected.end(), [](double p) { return p > 0; }), 3);
  ExpectDistribution(params, kLogits7, expected);
}

TEST(SamplerTest, CombinedPipelineDistribution) {
  std::vector<float> logits = {0.3f, -0.2f, 1.1f, 0.9f, 0.0f, -2.0f, 1.4f, 0.7f, 0.2f, -0.5f, 1.0f};
  SamplingParams params;
  params.temperature = 0.7f;
  params.top_k = 8;
  params.top_p = 0.9f;
  params.min_p = 0.1f;
  params.penalty_last_n = 0;
  params.seed = 2024;
  const std::vector<double> expected = ReferenceProbs(ToDouble(logits), 0.7, 8, 0.9, 0.1);
  ExpectDistribution(params, logits, expected);
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedDifferentTokens) {
  std::vector<float> logits(989);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& l : logits) l = normal(gen);
  SamplingParams params;
  params.top_p = 0.95f;
  params.repetition_penalty = 1.1f;
  params.seed = 77;
  auto run = [&](uint64_t seed) {
    SamplingParams p = params;
    p.seed = seed;
    Sampler s = MakeSampler(p);
    std::vector<int32_t> out;
    for (int i = 0; i < 200; ++i) out.push_back(s.Sample(logits.data(), 989));
    return out;
  };
  EXPECT_EQ(run(77), run(77));
  EXPECT_NE(run(77), run(78));
  // Reset() restarts the same stream.
  Sampler s = MakeSampler(params);
  std::vector<int32_t> a, b;
  for (int i = 0; i < 50; ++i) a.push_back(s.Sample(logits.data(), 989));
  s.Reset();
  for (int i = 0; i < 50; ++i) b.push_back(s.Sample(logits.data(), 989));
  EXPECT_EQ(a, b);
}

// Greedy decisions that flip exactly at hand-computed penalized values.
int32_t GreedyWithWindow(const SamplingParams& base, const std::vector<int32_t>& window,
                         const std::vector<float>& logits) {
  SamplingParams params = base;
  params.temperature = 0.0f;
  Sampler s = MakeSampler(params);
  s.AcceptPrompt(window);
  return s.Sample(logits.data(), static_cast<int64_t>(logits.size()));
}

TEST(SamplerTest, RepetitionPenaltyHandComputed) {
  SamplingParams params;
  params.repetition_penalty = 1.25f;
  // Positive logit divided: 2.0 / 1.25 = 1.6.
  EXPECT_EQ(GreedyWithWindow(params, {0}, {2.0f, 1.59f}), 0);
  EXPECT_EQ(GreedyWithWindow(params, {0}, {2.0f, 1.61f}), 1);
  // Negative logit multiplied: -1.0 * 1.25 = -1.25.
  EXPECT_EQ(GreedyWithWindow(params, {0}, {-1.0f, -1.26f}), 0);
  EXPECT_EQ(GreedyWithWindow(params, {0}, {-1.0f, -1.24f}), 1);
  // Applied once per distinct token, however often it occurs.
  EXPECT_EQ(GreedyWithWindow(params, {0, 0, 0}, {2.0f, 1.59f}), 0);
}

TEST(SamplerTest, FrequencyAndPresencePenaltyHandComputed) {
  SamplingParams params;
  params.frequency_penalty = 0.5f;
  params.presence_penalty = 0.2f;
  // Token 0 seen 3 times: 3.0 - 3 * 0.5 - 0.2 = 1.3.
  EXPECT_EQ(GreedyWithWindow(params, {0, 2, 0, 0}, {3.0f, 1.29f, -9.0f}), 0);
  EXPECT_EQ(GreedyWithWindow(params, {0, 2, 0, 0}, {3.0f, 1.31f, -9.0f}), 1);
  // All three penalties: (3.0 / 1.5) - 2 * 0.5 - 0.2 = 0.8.
  params.repetition_penalty = 1.5f;
  EXPECT_EQ(GreedyWithWindow(params, {0, 0}, {3.0f, 0.79f}), 0);
  EXPECT_EQ(GreedyWithWindow(params, {0, 0}, {3.0f, 0.81f}), 1);
  // Ids outside the vocabulary are ignored.
  EXPECT_EQ(GreedyWithWindow(params, {-4, 70000}, {3.0f, 0.81f}), 0);
}

TEST(SamplerTest, PenaltyWindowKeepsLastN) {
  SamplingParams params;
  params.frequency_penalty = 1.0f;
  params.penalty_last_n = 2;
  // Window after [0, 0, 1, 2] is {1, 2}: token 0 is no longer penalized
  // (else l0 = -1 and token 2 would win) ...
  EXPECT_EQ(GreedyWithWindow(params, {0, 0, 1, 2}, {1.0f, 0.5f, 0.6f}), 0);
  // ... and token 1 is (1.9 - 1 = 0.9 < 1.0).
  EXPECT_EQ(GreedyWithWindow(params, {0, 0, 1, 2}, {1.0f, 1.9f, 0.0f}), 0);
  EXPECT_EQ(GreedyWithWindow(params, {0, 0, 1, 2}, {1.0f, 2.1f, 0.0f}), 1);
  Sampler s = MakeSampler(params);
  s.AcceptPrompt(std::vector<int32_t>{0, 0, 1, 2});
  EXPECT_EQ(s.RecentTokens(), (std::vector<int32_t>{1, 2}));
  // Sample() accepts its own token.
  const std::vector<float> logits = {0.0f, 0.0f, 0.0f, 5.0f};
  SamplingParams greedy = params;
  greedy.temperature = 0.0f;
  Sampler g = MakeSampler(greedy);
  g.AcceptPrompt(std::vector<int32_t>{1, 2});
  EXPECT_EQ(g.Sample(logits.data(), 4), 3);
  EXPECT_EQ(g.RecentTokens(), (std::vector<int32_t>{2, 3}));
  // penalty_last_n = 0 disables penalties.
  params.penalty_last_n = 0;
  EXPECT_EQ(GreedyWithWindow(params, {0, 0, 0}, {1.0f, 0.9f}), 0);
}

TEST(SamplerTest, PenalizedDistribution) {
  // Window {0, 0, 1}: l0 = 0 - 2*0.5 - 0.25 = -1.25, l1 = -0.75, l2 = l3 = 0.
  SamplingParams params;
  params.frequency_penalty = 0.5f;
  params.presence_penalty = 0.25f;
  params.seed = 31;
  const std::vector<float> logits = {0.0f, 0.0f, 0.0f, 0.0f};
  const std::vector<double> expected = ReferenceProbs({-1.25, -0.75, 0.0, 0.0}, 1.0, 0, 1.0, 0.0);
  // Re-prime the window before each draw so that it stays {0, 0, 1} (the
  // sampler accepts its own draws too).
  params.penalty_last_n = 3;
  Sampler s = MakeSampler(params);
  const int64_t n_draws = 100000;
  std::vector<int64_t> counts(4, 0);
  for (int64_t i = 0; i < n_draws; ++i) {
    s.AcceptPrompt(std::vector<int32_t>{0, 0, 1});
    ++counts[static_cast<size_t>(s.Sample(logits.data(), 4))];
  }
  int dof = 0;
  const double chi2 = ChiSquare(counts, expected, n_draws, &dof);
  EXPECT_EQ(dof, 3);
  EXPECT_LT(chi2, ChiSquareCritical(dof));
}

TEST(SamplingParamsTest, DefaultsAreValid) { EXPECT_TRUE(SamplingParams{}.Validate().ok()); }

TEST(SamplingParamsTest, ErrorsNameFieldAndRange) {
  struct Case {
    SamplingParams params;
    std::string field;
    std::string range;
  };
  std::vector<Case> cases;
  auto add = [&](auto mutate, const char* field, const char* range) {
    SamplingParams p;
    mutate(p);
    cases.push_back({p, field, range});
  };
  add([](SamplingParams& p) { p.temperature = -0.1f; }, "temperature", "[0, 100]");
  add([](SamplingParams& p) { p.temperature = std::nanf(""); }, "temperature", "[0, 100]");
  add([](SamplingParams& p) { p.top_k = -1; }, "top_k", "[0, 2^31)");
  add([](SamplingParams& p) { p.top_p = 0.0f; }, "top_p", "(0, 1]");
  add([](SamplingParams& p) { p.top_p = 1.5f; }, "top_p", "(0, 1]");
  add([](SamplingParams& p) { p.min_p = -0.01f; }, "min_p", "[0, 1]");
  add([](SamplingParams& p) { p.repetition_penalty = 0.0f; }, "repetition_penalty", "(0, 10]");
  add([](SamplingParams& p) { p.presence_penalty = 2.5f; }, "presence_penalty", "[-2, 2]");
  add([](SamplingParams& p) { p.frequency_penalty = -3.0f; }, "frequency_penalty", "[-2, 2]");
  add([](SamplingParams& p) { p.penalty_last_n = -1; }, "penalty_last_n", "[0, 1048576]");
  for (const Case& c : cases) {
    const absl::Status s = c.params.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_NE(s.message().find(c.field), std::string::npos) << s.message();
    EXPECT_NE(s.message().find(c.range), std::string::npos) << s.message();
    EXPECT_FALSE(Sampler::Create(c.params).ok()) << c.field;
  }
}

TEST(SamplingParamsTest, BoundariesAreValid) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.top_p = 1.0f;
  p.min_p = 1.0f;
  p.repetition_penalty = 10.0f;
  p.presence_penalty = -2.0f;
  p.frequency_penalty = 2.0f;
  p.penalty_last_n = 0;
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
}

}  // namespace
}  // namespace ktx::sampler
