// The CPU/GPU expert split against an exhaustive search over every subset of
// experts (small layers, copy-bound GPU, where the best set is provably a
// prefix by token count, so the planner must find the true optimum), the
// closed-form balance point of a uniform DeepSeek-V3 layer, and the edges
// (small batches, empty batches, invalid rates). No GPU needed.
#include "runtime/gpu/expert_cost_model.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace ktx::gpu {
namespace {

// DeepSeek-V3 Q4_K_M: gate/up Q4_K (144 B per 256), down Q6_K (210 B per 256).
ExpertShape Dsv3Shape() {
  ExpertShape s;
  s.n_embd = 7168;
  s.n_ff = 2048;
  s.expert_bytes = 2 * 2048ull * (7168 / 256) * 144 + 7168ull * (2048 / 256) * 210;
  return s;
}

// The GPU machine's figures (task brief): 50 GB/s H2D, ~250 ms per layer at 2048 tokens on the CPU.
ExpertCostModel Dsv3Model() {
  ExpertCostModel m;
  m.pcie_bytes_per_s = 50e9;
  m.gpu_flops_per_s = 400e12;
  m.gpu_expert_fixed_s = 40e-6;
  m.gpu_layer_fixed_s = 0.5e-3;
  m.cpu_fixed_s = 50e-6;
  m.cpu_per_token_s = 14.5e-6;
  m.min_batch_tokens = 256;
  return m;
}

// max(GPU, CPU) of an arbitrary set, straight from the model's definition.
double SetSeconds(const ExpertCostModel& m, const ExpertShape& s, const std::vector<int64_t>& count,
                  const std::vector<bool>& on_gpu) {
  double copy = 0, compute = 0, cpu = 0;
  bool any = false;
  for (size_t e = 0; e < count.size(); ++e) {
    if (count[e] == 0) continue;
    if (on_gpu[e]) {
      any = true;
      copy += static_cast<double>(s.expert_bytes) / m.pcie_bytes_per_s;
      compute += m.gpu_expert_fixed_s + 6.0 * count[e] * s.n_embd * s.n_ff / m.gpu_flops_per_s;
    } else {
      cpu += m.cpu_fixed_s + m.cpu_per_token_s * count[e];
    }
  }
  const double fill =
      m.gpu_fill_s >= 0 ? m.gpu_fill_s : static_cast<double>(s.expert_bytes) / m.pcie_bytes_per_s;
  const double gpu = any ? std::max(copy, compute) + fill + m.gpu_layer_fixed_s : 0.0;
  return std::max(gpu, cpu);
}

TEST(ExpertCostModel, PlanIsTheOptimumOverEverySubset) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const ExpertShape s = Dsv3Shape();
  for (int trial = 0; trial < 40; ++trial) {
    ExpertCostModel m = Dsv3Model();
    m.min_batch_tokens = 0;
    m.gpu_layer_fixed_s = 0;  // the exhaustive search charges it to every non-empty set
    // CPU per-expert times from 0.05x to 3x the copy time of an expert.
    const double copy1 = static_cast<double>(s.expert_bytes) / m.pcie_bytes_per_s;
    m.cpu_per_token_s = copy1 / 64 * std::uniform_real_distribution<double>(0.05, 3.0)(rng);
    // Half the trials with a set fill (the decode model's: a compute's tail).
    if (trial % 2 == 1) m.gpu_fill_s = copy1 * std::uniform_real_distribution<double>(0, 1)(rng);
    const int n_expert = 11;
    std::vector<int64_t> count(n_expert);
    for (auto& c : count) c = rng() % 4 == 0 ? 0 : 1 + rng() % 200;
    const int64_t n_tokens = std::accumulate(count.begin(), count.end(), int64_t{0});
    const ExpertSplit split = PlanExpertSplit(m, count, s, n_tokens);
    double best = 1e30;
    for (uint32_t mask = 0; mask < (1u << n_expert); ++mask) {
      std::vector<bool> on(n_expert);
      for (int e = 0; e < n_expert; ++e) on[e] = (mask >> e) & 1;
      best = std::min(best, SetSeconds(m, s, count, on));
    }
    std::vector<bool> chosen(n_expert, false);
    for (int32_t e : split.gpu_experts) {
      ASSERT_GE(e, 0);
      ASSERT_LT(e, n_expert);
      EXPECT_GT(count[e], 0) << "an expert without tokens was streamed";
      chosen[e] = true;
    }
    const double got = SetSeconds(m, s, count, chosen);
    EXPECT_NEAR(got, best, 1e-12 + 1e-9 * best) << "trial " << trial;
    EXPECT_NEAR(split.time_s(), got, 1e-12 + 1e-9 * got);
  }
}

TEST(ExpertCostModel, UniformDsv3LayerBalancesAtTheClosedForm) {
  const ExpertShape s = Dsv3Shape();
  const ExpertCostModel m = Dsv3Model();
  const int64_t n = 2048;
  const std::vector<int64_t> count = UniformTokensPerExpert(n, 8, 256);
  const ExpertSplit split = PlanExpertSplit(m, count, s, n);
  // Copy-bound GPU: (k + 1) copy1 + layer_fixed = (256 - k) cpu1.
  const double copy1 = static_cast<double>(s.expert_bytes) / m.pcie_bytes_per_s;
  const double cpu1 = m.cpu_fixed_s + m.cpu_per_token_s * 64;
  const double k = (256 * cpu1 - copy1 - m.gpu_layer_fixed_s) / (copy1 + cpu1);
  EXPECT_NEAR(static_cast<double>(split.gpu_experts.size()), k, 1.0);
  EXPECT_NEAR(split.all_cpu_s, 256 * cpu1, 1e-9);
  EXPECT_LT(split.time_s(), 0.45 * split.all_cpu_s);  // ~250 ms -> ~84 ms per layer
  EXPECT_NEAR(split.gpu_s, split.cpu_s, copy1 + cpu1);
  EXPECT_EQ(split.gpu_tokens, 64 * static_cast<int64_t>(split.gpu_experts.size()));
}

// Experts already on the GPU (prefetched before the routing was known): they
// stay first, cost their copy even without tokens, leave the CPU's sum, and
// the rest is the best prefix of the others by token count: against an
// exhaustive search over every extra prefix of the others.
TEST(ExpertCostModel, ExpertsInFlightStayAndTheRestIsChosenFromTheCounts) {
  const ExpertShape s = Dsv3Shape();
  const ExpertCostModel m = Dsv3Model();
  std::mt19937 rng(7);
  const int64_t n = 2048;
  std::vector<int64_t> count(256, 0);
  std::poisson_distribution<int> tokens(64);
  for (int64_t& c : count) c = tokens(rng);
  count[5] = 0;  // in flight without tokens
  const std::vector<int32_t> in_flight = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  const ExpertSplit split = PlanExpertSplit(m, count, s, n, in_flight);
  ASSERT_GE(split.gpu_experts.size(), in_flight.size());
  EXPECT_TRUE(std::equal(in_flight.begin(), in_flight.end(), split.gpu_experts.begin()));
  // The extras: distinct, not in flight, by descending count.
  std::vector<int32_t> extras(split.gpu_experts.begin() + in_flight.size(),
                              split.gpu_experts.end());
  for (size_t i = 1; i < extras.size(); ++i) {
    EXPECT_GE(count[extras[i - 1]], count[extras[i]]);
  }
  for (int32_t e : extras) EXPECT_GT(e, 11);
  // The same optimum by brute force over the number of extras.
  std::vector<int32_t> others;
  for (int32_t e = 12; e < 256; ++e) {
    if (count[e] > 0) others.push_back(e);
  }
  std::stable_sort(others.begin(), others.end(),
                   [&](int32_t a, int32_t b) { return count[a] > count[b]; });
  const double copy1 = static_cast<double>(s.expert_bytes) / m.pcie_bytes_per_s;
  double best = 1e30;
  for (size_t k = 0; k <= others.size(); ++k) {
    double copy = 0, compute = 0, cpu = 0;
    for (int32_t e : in_flight) {
      copy += copy1;
      if (count[e] > 0) {
        compute += m.gpu_expert_fixed_s + 6.0 * count[e] * s.n_embd * s.n_ff / m.gpu_flops_per_s;
      }
    }
    for (size_t i = 0; i < others.size(); ++i) {
      const int64_t c = count[others[i]];
      if (i < k) {
        copy += copy1;
        compute += m.gpu_expert_fixed_s + 6.0 * c * s.n_embd * s.n_ff / m.gpu_flops_per_s;
      } else {
        cpu += m.cpu_fixed_s + m.cpu_per_token_s * c;
      }
    }
    best = std::min(best, std::max(std::max(copy, compute) + copy1, cpu));
  }
  EXPECT_NEAR(std::max(split.gpu_s - m.gpu_layer_fixed_s, split.cpu_s), best, 1e-12);
  // Copies that have finished cost nothing (nor a fill): the GPU's time drops
  // by theirs and it takes more of the rest.
  const ExpertSplit copied = PlanExpertSplit(m, count, s, n, in_flight, 8);
  EXPECT_TRUE(std::equal(in_flight.begin(), in_flight.end(), copied.gpu_experts.begin()));
  EXPECT_GT(copied.gpu_experts.size(), split.gpu_experts.size());
  {
    double copy = copy1 * static_cast<double>(copied.gpu_experts.size() - 8), compute = 0;
    for (int32_t e : copied.gpu_experts) {
      if (count[e] > 0) {
        compute += m.gpu_expert_fixed_s + 6.0 * count[e] * s.n_embd * s.n_ff / m.gpu_flops_per_s;
      }
    }
    EXPECT_NEAR(copied.gpu_s, std::max(copy, compute) + m.gpu_layer_fixed_s, 1e-12);
  }
  // More than the experts in flight counts as all of them.
  EXPECT_EQ(PlanExpertSplit(m, count, s, n, in_flight, 99).gpu_experts,
            PlanExpertSplit(m, count, s, n, in_flight, 12).gpu_experts);
  // Without experts in flight the plan is the plain one.
  const ExpertSplit plain = PlanExpertSplit(m, count, s, n);
  EXPECT_EQ(plain.gpu_experts, PlanExpertSplit(m, count, s, n, {}).gpu_experts);
  // A batch too small to split keeps the experts in flight (their copies run anyway).
  const std::vector<int64_t> few = UniformTokensPerExpert(16, 8, 256);
  const std::vector<int32_t> two = {3, 200};
  const ExpertSplit small = PlanExpertSplit(m, few, s, 16, two);
  EXPECT_EQ(small.gpu_experts, two);
  EXPECT_GT(small.cpu_s, 0.0);
}

// The serial part of a split: large enough, a long batch streams every expert
// (no CPU part, so no serial part); a short one still splits, and the split's
// modelled time includes it. Zero: the plan of the model without it.
TEST(ExpertCostModel, SerialPartOfASplitFavoursAllGpuForLongBatches) {
  const ExpertShape s = Dsv3Shape();
  ExpertCostModel m = Dsv3Model();
  const std::vector<int64_t> long_counts = UniformTokensPerExpert(2048, 8, 256);
  const ExpertSplit plain = PlanExpertSplit(m, long_counts, s, 2048);
  ASSERT_GT(plain.gpu_experts.size(), 0u);
  ASSERT_LT(plain.gpu_experts.size(), 256u);
  EXPECT_EQ(plain.serial_s, 0.0);
  m.split_serial_s_per_token = 40e-6;  // 82 ms at 2048 tokens: more than streaming the rest
  const ExpertSplit all = PlanExpertSplit(m, long_counts, s, 2048);
  EXPECT_EQ(all.gpu_experts.size(), 256u);
  EXPECT_EQ(all.serial_s, 0.0);
  EXPECT_EQ(all.cpu_s, 0.0);
  const ExpertSplit forced = AllExpertsOnGpu(m, long_counts, s);
  EXPECT_NEAR(all.gpu_s, forced.gpu_s + m.gpu_layer_fixed_s, 1e-9);
  // 512 tokens (16 per expert): the split still wins and carries its serial part.
  const std::vector<int64_t> short_counts = UniformTokensPerExpert(512, 8, 256);
  m.cpu_per_token_s = 40e-6;  // a CPU slow enough that the GPU takes a share at 512 tokens
  const ExpertSplit split = PlanExpertSplit(m, short_counts, s, 512);
  ASSERT_GT(split.gpu_experts.size(), 0u);
  ASSERT_LT(split.gpu_experts.size(), 256u);
  EXPECT_NEAR(split.serial_s, 40e-6 * 512, 1e-12);
  EXPECT_LT(split.time_s(), AllExpertsOnGpu(m, short_counts, s).gpu_s);
  EXPECT_NEAR(split.time_s(), std::max(split.gpu_s, split.cpu_s) + split.serial_s, 1e-12);
}

TEST(ExpertCostModel, HottestExpertsGoToTheGpuFirst) {
  const ExpertShape s = Dsv3Shape();
  const ExpertCostModel m = Dsv3Model();
  std::vector<int64_t> count(256, 10);
  count[7] = 900;
  count[200] = 900;  // tie with 7: the lower id first
  count[3] = 400;
  count[5] = 0;
  const ExpertSplit split = PlanExpertSplit(m, count, s, 2048);
  ASSERT_GE(split.gpu_experts.size(), 3u);
  EXPECT_EQ(split.gpu_experts[0], 7);
  EXPECT_EQ(split.gpu_experts[1], 200);
  EXPECT_EQ(split.gpu_experts[2], 3);
  EXPECT_EQ(std::count(split.gpu_experts.begin(), split.gpu_experts.end(), 5), 0);
}

TEST(ExpertCostModel, SmallBatchesStayOnTheCpu) {
  const ExpertShape s = Dsv3Shape();
  ExpertCostModel m = Dsv3Model();
  // Below min_batch_tokens: all CPU whatever the rates.
  EXPECT_TRUE(PlanExpertSplit(m, UniformTokensPerExpert(255, 8, 256), s, 255).gpu_experts.empty());
  EXPECT_TRUE(PlanExpertSplit(m, std::vector<int64_t>(256, 0), s, 0).gpu_experts.empty());
  // Decode-sized batches never pay: 8 experts with one token each take the CPU
  // 8 * 64.5 us, less than one expert's copy (0.57 ms).
  m.min_batch_tokens = 0;
  EXPECT_TRUE(PlanExpertSplit(m, UniformTokensPerExpert(1, 8, 256), s, 1).gpu_experts.empty());
  const int64_t be = BreakEvenTokens(m, s, 8, 256, 1 << 16);
  ASSERT_GT(be, 1);
  ASSERT_LE(be, 1 << 16);
  EXPECT_FALSE(PlanExpertSplit(m, UniformTokensPerExpert(be, 8, 256), s, be).gpu_experts.empty());
  EXPECT_TRUE(
      PlanExpertSplit(m, UniformTokensPerExpert(be - 1, 8, 256), s, be - 1).gpu_experts.empty());
  // Invalid rates: all CPU, and Validate says why.
  m.pcie_bytes_per_s = 0;
  EXPECT_FALSE(m.Validate().empty());
  EXPECT_TRUE(
      PlanExpertSplit(m, UniformTokensPerExpert(2048, 8, 256), s, 2048).gpu_experts.empty());
  EXPECT_TRUE(Dsv3Model().Validate().empty());
}

// The decode model (DecodeCostModel): a DeepSeek-V3 layer at one token (8
// experts of 1 token) with the CPU reading 100 GB/s and PCIe at 50 GB/s
// splits where g copies + the tail = the CPU's 8 - g experts: the GPU takes
// 2 or 3 (closed form 8 x 0.286 / (0.573 + 0.286) = 2.67), and the layer's
// modelled time falls by a quarter or more. A batch of 16 (~120 experts of
// 1-2 tokens) gives the GPU about a third of them, the ones with the most
// tokens first. Small experts (a test fixture's) never split: the fixed cost
// per layer is more than their CPU time. The model's other fields come from
// the calibrated one; no threshold and no serial part.
TEST(ExpertCostModel, DecodeModelSplitsAFewExpertsOfABandwidthBoundLayer) {
  const ExpertShape s = Dsv3Shape();
  const ExpertCostModel calibrated = Dsv3Model();
  const ExpertCostModel d = DecodeCostModel(calibrated, s, 100e9, 50e-6);
  EXPECT_TRUE(d.Validate().empty()) << d.Validate();
  EXPECT_EQ(d.pcie_bytes_per_s, calibrated.pcie_bytes_per_s);
  EXPECT_EQ(d.gpu_flops_per_s, calibrated.gpu_flops_per_s);
  EXPECT_EQ(d.min_batch_tokens, 0);
  EXPECT_EQ(d.split_serial_s_per_token, 0);
  EXPECT_NEAR(d.cpu_fixed_s, static_cast<double>(s.expert_bytes) / 100e9, 1e-15);
  EXPECT_NEAR(d.gpu_fill_s, GpuComputeSeconds(d, s, 1), 1e-15);
  EXPECT_NEAR(GpuFillSeconds(d, s), d.gpu_fill_s, 1e-15);
  EXPECT_NEAR(GpuFillSeconds(calibrated, s), GpuCopySeconds(calibrated, s), 1e-15);
  // One token.
  std::vector<int64_t> one(256, 0);
  for (int e = 0; e < 8; ++e) one[e * 31] = 1;
  const ExpertSplit s1 = PlanExpertSplit(d, one, s, 1);
  EXPECT_GE(s1.gpu_experts.size(), 2u);
  EXPECT_LE(s1.gpu_experts.size(), 3u);
  EXPECT_LT(s1.time_s(), 0.8 * s1.all_cpu_s);
  EXPECT_EQ(s1.serial_s, 0);
  for (int32_t e : s1.gpu_experts) EXPECT_EQ(one[e], 1);
  // Sixteen tokens: 128 selections over 256 experts.
  std::mt19937 rng(7);
  std::vector<int64_t> sixteen(256, 0);
  for (int t = 0; t < 16; ++t) {
    std::vector<int> ids(256);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int k = 0; k < 8; ++k) ++sixteen[ids[k]];
  }
  const int64_t used = std::count_if(sixteen.begin(), sixteen.end(), [](int64_t c) { return c; });
  const ExpertSplit s16 = PlanExpertSplit(d, sixteen, s, 16);
  EXPECT_GT(s16.gpu_experts.size(), static_cast<size_t>(used) / 5);
  EXPECT_LT(s16.gpu_experts.size(), static_cast<size_t>(used) / 2);
  EXPECT_GE(sixteen[s16.gpu_experts.front()], sixteen[s16.gpu_experts.back()]);
  EXPECT_LT(s16.time_s(), 0.75 * s16.all_cpu_s);
  // A small expert (64 x 32, Q8_0: ~7 KB): the CPU reads it in 0.07 us.
  ExpertShape tiny;
  tiny.n_embd = 64;
  tiny.n_ff = 32;
  tiny.expert_bytes = 3 * 64 * 32 * 34 / 32;
  const ExpertCostModel dt = DecodeCostModel(calibrated, tiny, 100e9, 50e-6);
  EXPECT_TRUE(PlanExpertSplit(dt, one, tiny, 1).gpu_experts.empty());
  EXPECT_TRUE(PlanExpertSplit(dt, sixteen, tiny, 16).gpu_experts.empty());
}

TEST(ExpertCostModel, AllOnGpuTakesEveryUsedExpert) {
  const ExpertShape s = Dsv3Shape();
  std::vector<int64_t> count = {0, 3, 1, 0, 3};
  const ExpertSplit split = AllExpertsOnGpu(Dsv3Model(), count, s);
  EXPECT_EQ(split.gpu_experts, (std::vector<int32_t>{1, 4, 2}));
  EXPECT_EQ(split.gpu_tokens, 7);
  EXPECT_GT(split.gpu_s, 0);
  EXPECT_EQ(split.cpu_s, 0);
}

TEST(ExpertCostModel, UniformCountsSumToTheSelections) {
  for (const int64_t n : {1, 3, 31, 32, 33, 2048}) {
    const std::vector<int64_t> c = UniformTokensPerExpert(n, 8, 256);
    EXPECT_EQ(std::accumulate(c.begin(), c.end(), int64_t{0}), n * 8);
    for (int64_t v : c) EXPECT_LE(v, n);
  }
  const std::vector<int64_t> c = UniformTokensPerExpert(2, 6, 4);  // K > E / ... capped at n
  for (int64_t v : c) EXPECT_LE(v, 2);
}

}  // namespace
}  // namespace ktx::gpu

namespace ktx::gpu {
namespace {

// The CPU's part of a routing: every entry naming an expert lands on exactly
// one side (the GPU's experts by on_gpu, the CPU's in its row in order, with
// its weight), CPU rows are compacted and padded with kNoExpert, on narrow
// (policy-reduced) and padded routings of awkward sizes.
// The copy rate learnt from a split's GPU share: damped toward what was
// measured, within [a quarter of, twice] the calibration, and a slower
// effective link gives the GPU fewer experts of the same layer, a faster one more.
TEST(ExpertCostModel, CopyRateLearntFromASplitStaysWithinTheCalibration) {
  const double cal = 54e9;
  // The share took 10 % longer than modelled: the rate falls by 1.1^0.7.
  EXPECT_NEAR(CorrectedCopyRate(cal, cal, 0.099, 0.090), cal / std::pow(1.1, 0.7), 1e3);
  // Repeated, it settles toward the measured rate but not past the floor.
  double r = cal;
  for (int i = 0; i < 200; ++i) r = CorrectedCopyRate(r, cal, 0.3, 0.3 * cal / r / 10);
  EXPECT_DOUBLE_EQ(r, cal / 4);
  // Faster than modelled (copies prefetched before the planning): up, at most to twice the
  // calibration.
  EXPECT_NEAR(CorrectedCopyRate(40e9, cal, 0.080, 0.088), 40e9 * std::pow(1.1, 0.7), 1e3);
  EXPECT_NEAR(CorrectedCopyRate(50e9, cal, 0.050, 0.100), 50e9 * std::pow(2.0, 0.7), 1e3);
  EXPECT_DOUBLE_EQ(CorrectedCopyRate(100e9, cal, 0.050, 0.100), 2 * cal);
  // Nothing usable measured: unchanged.
  for (const auto& [measured, modelled] : {std::pair<double, double>{0.0, 0.09},
                                           {0.09, 0.0},
                                           {-1.0, 0.09},
                                           {NAN, 0.09},
                                           {0.09, INFINITY}}) {
    EXPECT_DOUBLE_EQ(CorrectedCopyRate(45e9, cal, measured, modelled), 45e9)
        << measured << " " << modelled;
  }
  EXPECT_DOUBLE_EQ(CorrectedCopyRate(45e9, 0.0, 0.1, 0.09), 45e9);
  // What the rate is for: the same layer plans fewer GPU experts at the learnt rate.
  ExpertCostModel m = Dsv3Model();
  const ExpertShape shape = Dsv3Shape();
  const std::vector<int64_t> counts = UniformTokensPerExpert(2048, 8, 256);
  const ExpertSplit at_calibration = PlanExpertSplit(m, counts, shape, 2048);
  m.pcie_bytes_per_s = CorrectedCopyRate(m.pcie_bytes_per_s, m.pcie_bytes_per_s,
                                         1.2 * at_calibration.gpu_s, at_calibration.gpu_s);
  const ExpertSplit learnt = PlanExpertSplit(m, counts, shape, 2048);
  EXPECT_LT(learnt.gpu_experts.size(), at_calibration.gpu_experts.size());
  EXPECT_FALSE(learnt.gpu_experts.empty());
  m.pcie_bytes_per_s = CorrectedCopyRate(at_calibration.gpu_s > 0 ? 50e9 : 0, 50e9,
                                         0.8 * at_calibration.gpu_s, at_calibration.gpu_s);
  EXPECT_GT(m.pcie_bytes_per_s, 50e9);
  EXPECT_GT(PlanExpertSplit(m, counts, shape, 2048).gpu_experts.size(),
            at_calibration.gpu_experts.size());
}

// gpu_lead: the prefix minimises max((1 + lead) GPU, CPU) over every prefix
// (checked from the model's definition on random layers), so the GPU's share
// shrinks as the lead grows and ends that far ahead of the CPU near the
// balance; the reported times stay the unbiased model's. Out-of-range leads
// make the model invalid (no split).
TEST(ExpertCostModel, GpuLeadEndsTheGpuShareAheadOfTheCpu) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const ExpertShape s = Dsv3Shape();
  for (int trial = 0; trial < 20; ++trial) {
    ExpertCostModel m = Dsv3Model();
    m.min_batch_tokens = 0;
    m.gpu_layer_fixed_s = 0;
    m.cpu_per_token_s *= std::uniform_real_distribution<double>(0.5, 2.0)(rng);
    std::vector<int64_t> count(256);
    for (auto& c : count) c = rng() % 8 == 0 ? 0 : 1 + rng() % 120;
    const int64_t n_tokens = std::accumulate(count.begin(), count.end(), int64_t{0});
    std::vector<int32_t> order;
    for (int32_t e = 0; e < 256; ++e) {
      if (count[e] > 0) order.push_back(e);
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return count[a] > count[b]; });
    size_t previous = order.size() + 1;
    for (const double lead : {0.0, 0.05, 0.1, 0.25, 0.5}) {
      m.gpu_lead = lead;
      const ExpertSplit plan = PlanExpertSplit(m, count, s, n_tokens);
      // The prefix from the definition: GPU and CPU times of every k.
      std::vector<bool> on_gpu(256, false);
      double best = 0;
      size_t best_k = 0;
      for (size_t k = 0; k <= order.size(); ++k) {
        if (k > 0) on_gpu[order[k - 1]] = true;
        // The GPU's set alone and the CPU's alone.
        std::vector<int64_t> gpu_counts(256, 0), cpu_counts(256, 0);
        for (int32_t e = 0; e < 256; ++e) (on_gpu[e] ? gpu_counts : cpu_counts)[e] = count[e];
        const double gpu = SetSeconds(m, s, gpu_counts, std::vector<bool>(256, true));
        const double cpu = SetSeconds(m, s, cpu_counts, std::vector<bool>(256, false));
        const double t = std::max((1 + lead) * gpu, cpu);
        if (k == 0 || t < best) {
          best = t;
          best_k = k;
        }
      }
      ASSERT_EQ(plan.gpu_experts.size(), best_k) << "lead " << lead;
      EXPECT_LE(plan.gpu_experts.size(), previous) << "lead " << lead;
      previous = plan.gpu_experts.size();
      for (size_t i = 0; i < best_k; ++i) EXPECT_EQ(plan.gpu_experts[i], order[i]);
      // Unbiased times: the chosen GPU set's own time.
      std::vector<int64_t> gpu_counts(256, 0);
      for (int32_t e : plan.gpu_experts) gpu_counts[e] = count[e];
      EXPECT_NEAR(plan.gpu_s, SetSeconds(m, s, gpu_counts, std::vector<bool>(256, true)), 1e-9);
      if (!plan.gpu_experts.empty() && plan.cpu_s > 0) {
        // (1 + lead) GPU passes the CPU by at most the last expert moved to the GPU.
        const int32_t last = plan.gpu_experts.back();
        EXPECT_LE((1 + lead) * plan.gpu_s,
                  plan.cpu_s + m.cpu_fixed_s + m.cpu_per_token_s * count[last] + 1e-12)
            << "lead " << lead;
      }
    }
  }
  ExpertCostModel m = Dsv3Model();
  const std::vector<int64_t> counts = UniformTokensPerExpert(2048, 8, 256);
  ASSERT_FALSE(PlanExpertSplit(m, counts, Dsv3Shape(), 2048).gpu_experts.empty());
  for (const double bad : {-0.1, 1.0, 3.0, static_cast<double>(NAN)}) {
    m.gpu_lead = bad;
    EXPECT_NE(m.Validate().find("gpu_lead"), std::string::npos) << bad;
    EXPECT_TRUE(PlanExpertSplit(m, counts, Dsv3Shape(), 2048).gpu_experts.empty()) << bad;
  }
}

TEST(CpuPartOfRoutingTest, EveryEntryLandsOnExactlyOneSide) {
  std::mt19937 rng(20261126);
  for (const int32_t k_used : {1, 3, 8}) {
    for (const int64_t n : {int64_t{1}, int64_t{7}, int64_t{33}}) {
      const int32_t n_expert = 13;
      models::Routing routing;
      routing.n_tokens = n;
      routing.n_expert_used = k_used;
      for (int64_t t = 0; t < n; ++t) {
        std::vector<int32_t> ids(n_expert);
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), rng);
        const int32_t kept = 1 + static_cast<int32_t>(rng() % k_used);  // the rest: padding
        for (int32_t k = 0; k < k_used; ++k) {
          routing.expert_ids.push_back(k < kept ? ids[k] : models::kNoExpert);
          routing.weights.push_back(k < kept ? 0.01f * (1 + rng() % 97) : 0.0f);
        }
      }
      std::vector<uint8_t> on_gpu(n_expert);
      for (uint8_t& g : on_gpu) g = rng() % 3 == 0;
      models::Routing cpu;
      const int64_t cpu_entries = CpuPartOfRouting(routing, on_gpu, &cpu);
      ASSERT_EQ(cpu.n_tokens, n);
      ASSERT_EQ(cpu.n_expert_used, k_used);
      ASSERT_EQ(cpu.expert_ids.size(), routing.expert_ids.size());
      int64_t counted = 0;
      for (int64_t t = 0; t < n; ++t) {
        // Independent: the row's CPU entries in order, then padding.
        std::vector<std::pair<int32_t, float>> want;
        int64_t gpu_side = 0, named = 0;
        for (int32_t k = 0; k < k_used; ++k) {
          const int32_t e = routing.id(t, k);
          if (e == models::kNoExpert) continue;
          ++named;
          if (on_gpu[e]) {
            ++gpu_side;
          } else {
            want.emplace_back(e, routing.weight(t, k));
          }
        }
        for (int32_t k = 0; k < k_used; ++k) {
          if (k < static_cast<int32_t>(want.size())) {
            EXPECT_EQ(cpu.id(t, k), want[k].first) << "token " << t << " entry " << k;
            EXPECT_EQ(cpu.weight(t, k), want[k].second);
          } else {
            EXPECT_EQ(cpu.id(t, k), models::kNoExpert);
            EXPECT_EQ(cpu.weight(t, k), 0.0f);
          }
        }
        EXPECT_EQ(gpu_side + static_cast<int64_t>(want.size()), named);
        counted += static_cast<int64_t>(want.size());
      }
      EXPECT_EQ(cpu_entries, counted);
    }
  }
  // Everything on the GPU: nothing left for the CPU.
  models::Routing routing;
  routing.n_tokens = 2;
  routing.n_expert_used = 2;
  routing.expert_ids = {0, 1, 1, models::kNoExpert};
  routing.weights = {0.5f, 0.5f, 1.0f, 0.0f};
  const std::vector<uint8_t> all = {1, 1};
  models::Routing cpu;
  EXPECT_EQ(CpuPartOfRouting(routing, all, &cpu), 0);
  EXPECT_EQ(cpu.expert_ids, std::vector<int32_t>(4, models::kNoExpert));
}

}  // namespace
}  // namespace ktx::gpu
