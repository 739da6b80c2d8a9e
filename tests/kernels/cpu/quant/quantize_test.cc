// QuantizeRow -> DequantizeRow on awkward block counts and many input shapes:
// every element must land on the nearest representable level of its block
// (levels decoded from the spec in quant_test_util.h), within an error bound
// derived from the input data alone (the format's resolution), and the
// quantizer must be deterministic. Also: the activation quantizers (Q8_0,
// Q8_K with bsums) and the reference dot products of both tiers against
// float64 dots of dequantized rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/quant/blocks.h"
#include "kernels/cpu/quant/quant.h"
#include "tests/kernels/cpu/quant/quant_test_util.h"

namespace ktx::kernels {
namespace {

using testing::Dist;
using testing::DistName;
using testing::LevelsOfElement;
using testing::RandomRow;

constexpr TensorType kBlockTypes[] = {TensorType::kQ8_0,   TensorType::kQ4_0, TensorType::kQ5_0,
                                      TensorType::kQ4_K,   TensorType::kQ5_K, TensorType::kQ6_K,
                                      TensorType::kIQ4_XS, TensorType::kQ8_K};
constexpr TensorType kWeightTypes[] = {TensorType::kF32,   TensorType::kF16,  TensorType::kBF16,
                                       TensorType::kQ8_0,  TensorType::kQ4_0, TensorType::kQ5_0,
                                       TensorType::kQ4_K,  TensorType::kQ5_K, TensorType::kQ6_K,
                                       TensorType::kIQ4_XS};
constexpr int kBlockCounts[] = {1, 3, 7, 13};

// An upper bound for a half scale chosen as ceil_half(v): v rounded up to the
// next half is at most v (1 + 2^-10) + 2^-24.
double HalfCeilBound(double v) { return v * (1.0 + std::ldexp(1.0, -10)) + std::ldexp(1.0, -24); }

// Max |x - y| the format's quantizer may leave for element i, computed from
// the input row alone (see the derivations in kernels/cpu/quant/*.cc).
std::vector<double> ErrorBounds(TensorType type, const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<double> bound(x.size());
  auto amax_of = [&](int64_t begin, int64_t len) {
    double a = 0.0;
    for (int64_t i = begin; i < begin + len; ++i) a = std::max(a, std::fabs(double{x[i]}));
    return a;
  };
  switch (type) {
    case TensorType::kQ8_0:
    case TensorType::kQ4_0:
    case TensorType::kQ5_0: {
      const double top = type == TensorType::kQ8_0 ? 127 : (type == TensorType::kQ4_0 ? 7 : 15);
      for (int64_t b = 0; b < n / 32; ++b) {
        const double amax = amax_of(32 * b, 32);
        for (int i = 0; i < 32; ++i) bound[32 * b + i] = HalfCeilBound(amax / top) / 2;
      }
      break;
    }
    case TensorType::kQ8_K:
      for (int64_t b = 0; b < n / 256; ++b) {
        const double amax = amax_of(256 * b, 256);
        for (int i = 0; i < 256; ++i) bound[256 * b + i] = amax / 254 * (1 + 1e-6);
      }
      break;
    case TensorType::kQ4_K:
    case TensorType::kQ5_K: {
      const double top = type == TensorType::kQ4_K ? 15 : 31;
      for (int64_t b = 0; b < n / 256; ++b) {
        double lo[8], hi[8], max_off = 0, max_range = 0;
        for (int j = 0; j < 8; ++j) {
          lo[j] = 0;
          hi[j] = x[256 * b + 32 * j];
          for (int i = 0; i < 32; ++i) {
            lo[j] = std::min(lo[j], double{x[256 * b + 32 * j + i]});
            hi[j] = std::max(hi[j], double{x[256 * b + 32 * j + i]});
          }
          max_off = std::max(max_off, -lo[j]);
          max_range = std::max(max_range, hi[j] - lo[j]);
        }
        const double dmin = HalfCeilBound(max_off / 63);
        const double d = HalfCeilBound((max_range + dmin) / (63 * top));
        for (int j = 0; j < 8; ++j) {
          for (int i = 0; i < 32; ++i) {
            bound[256 * b + 32 * j + i] = (hi[j] - lo[j] + dmin) / (2 * top) + d / 2;
          }
        }
      }
      break;
    }
    case TensorType::kQ6_K:
      for (int64_t b = 0; b < n / 256; ++b) {
        const double d = HalfCeilBound(amax_of(256 * b, 256) / (31 * 127));
        for (int j = 0; j < 16; ++j) {
          const double amax = amax_of(256 * b + 16 * j, 16);
          for (int i = 0; i < 16; ++i) bound[256 * b + 16 * j + i] = (amax / 31 + d) / 2;
        }
      }
      break;
    case TensorType::kIQ4_XS:
      for (int64_t b = 0; b < n / 256; ++b) {
        const double d = HalfCeilBound(amax_of(256 * b, 256) / (113 * 31));
        for (int j = 0; j < 8; ++j) {
          const double amax = amax_of(256 * b + 32 * j, 32);
          for (int i = 0; i < 32; ++i) bound[256 * b + 32 * j + i] = 12 * (amax / 113 + d);
        }
      }
      break;
    default: break;
  }
  return bound;
}

class QuantizeRoundTripTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(QuantizeRoundTripTest, NearestLevelWithinResolution) {
  const TensorType type = GetParam();
  const TensorTypeTraits& t = TraitsOf(type);
  uint32_t seed = 1000;
  for (int n_blocks : kBlockCounts) {
    for (Dist dist : testing::kAllDists) {
      SCOPED_TRACE(std::string(t.name) + " " + DistName(dist) +
                   " blocks=" + std::to_string(n_blocks));
      const int64_t n = n_blocks * t.block_size;
      const std::vector<float> x = RandomRow(dist, n, ++seed);
      std::vector<uint8_t> q(static_cast<size_t>(RowBytes(t, n)) + 4);  // +4: canary
      std::memset(q.data(), 0xa5, q.size());
      QuantizeRow(type, x.data(), q.data(), n);
      for (size_t k = q.size() - 4; k < q.size(); ++k)
        ASSERT_EQ(q[k], 0xa5) << "wrote past the row";
      std::vector<float> y(static_cast<size_t>(n));
      DequantizeRow(type, q.data(), y.data(), n);

      const std::vector<double> bound = ErrorBounds(type, x);
      double err2 = 0.0, ref2 = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_TRUE(std::isfinite(y[i])) << "element " << i;
        const double err = std::fabs(double{x[i]} - y[i]);
        err2 += err * err;
        ref2 += double{x[i]} * x[i];
        const double slack = 1e-6 * (std::fabs(double{x[i]}) + bound[i]) + 1e-30;
        ASSERT_LE(err, bound[i] + slack) << "element " << i << " x=" << x[i] << " y=" << y[i];
        // y is a level of its block, and the one nearest to x.
        const std::vector<float> levels = LevelsOfElement(type, q.data(), i);
        double nearest = INFINITY;
        double closest_to_y = INFINITY;
        for (float level : levels) {
          nearest = std::min(nearest, std::fabs(double{x[i]} - level));
          closest_to_y = std::min(closest_to_y, std::fabs(double{y[i]} - level));
        }
        ASSERT_EQ(closest_to_y, 0.0) << "element " << i << " is not a level of its block";
        ASSERT_LE(err, nearest + slack) << "element " << i << " not rounded to nearest";
      }
      if (dist == Dist::kGaussian && n_blocks == 13) {
        // The RMS error of Gaussian data, for the record (not a bound).
        RecordProperty(std::string("rel_l2_") + t.name, std::to_string(std::sqrt(err2 / ref2)));
      }
      // Deterministic, and independent of where the row sits in memory.
      std::vector<uint8_t> q2(q.size() + 64, 0);
      QuantizeRow(type, x.data(), q2.data() + 32, n);
      ASSERT_EQ(std::memcmp(q.data(), q2.data() + 32, static_cast<size_t>(RowBytes(t, n))), 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllBlockTypes, QuantizeRoundTripTest, ::testing::ValuesIn(kBlockTypes),
                         [](const auto& info) { return std::string(TraitsOf(info.param).name); });

TEST(QuantizeTest, FloatTypesRoundTrip) {
  const std::vector<float> x = RandomRow(Dist::kOutliers, 999, 7);
  std::vector<float> y(x.size());
  std::vector<uint8_t> buf(x.size() * 4);
  QuantizeRow(TensorType::kF32, x.data(), buf.data(), 999);
  DequantizeRow(TensorType::kF32, buf.data(), y.data(), 999);
  EXPECT_EQ(x, y);
  QuantizeRow(TensorType::kF16, x.data(), buf.data(), 999);
  DequantizeRow(TensorType::kF16, buf.data(), y.data(), 999);
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_LE(std::fabs(x[i] - y[i]),
              std::fabs(x[i]) * std::ldexp(1.0f, -11) + std::ldexp(1.0f, -25));
  }
  QuantizeRow(TensorType::kBF16, x.data(), buf.data(), 999);
  DequantizeRow(TensorType::kBF16, buf.data(), y.data(), 999);
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_LE(std::fabs(x[i] - y[i]), std::fabs(x[i]) * std::ldexp(1.0f, -8));
  }
}

TEST(QuantizeTest, ActivationQ8KBlocksAndBsums) {
  for (int n_blocks : kBlockCounts) {
    const int64_t n = 256 * n_blocks;
    const std::vector<float> x = RandomRow(Dist::kOutliers, n, 77 + n_blocks);
    std::vector<BlockQ8K> q(static_cast<size_t>(n_blocks));
    QuantizeRowQ8K(x.data(), q.data(), n);
    for (int b = 0; b < n_blocks; ++b) {
      float amax = 0.0f;
      for (int i = 0; i < 256; ++i) amax = std::max(amax, std::fabs(x[256 * b + i]));
      EXPECT_FLOAT_EQ(q[b].d, amax / 127.0f);
      bool reaches_127 = false;
      for (int k = 0; k < 16; ++k) {
        int sum = 0;
        for (int i = 0; i < 16; ++i) {
          const int v = q[b].qs[16 * k + i];
          ASSERT_GE(v, -127);
          ASSERT_LE(v, 127);
          reaches_127 |= (v == 127 || v == -127);
          sum += v;
        }
        EXPECT_EQ(q[b].bsums[k], sum) << "block " << b << " group " << k;
      }
      EXPECT_TRUE(reaches_127);
    }
  }
}

TEST(QuantizeTest, ActivationQ8_0FollowsFloatScaleConvention) {
  for (int n_blocks : kBlockCounts) {
    for (Dist dist : {Dist::kGaussian, Dist::kOutliers, Dist::kZeros, Dist::kTiny}) {
      const int64_t n = 32 * n_blocks;
      const std::vector<float> x = RandomRow(dist, n, 300 + n_blocks);
      std::vector<BlockQ8_0> q(static_cast<size_t>(n_blocks));
      QuantizeRowQ8_0(x.data(), q.data(), n);
      std::vector<float> y(static_cast<size_t>(n));
      QuantizeActivationRow(TensorType::kQ4_0, x.data(), q.data(), n);  // same blocks again
      DequantizeRow(TensorType::kQ8_0, q.data(), y.data(), n);
      for (int b = 0; b < n_blocks; ++b) {
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
        const float d = amax / 127.0f;
        EXPECT_EQ(q[b].d, FloatToHalf(d));
        for (int i = 0; i < 32; ++i) {
          const float xi = x[32 * b + i];
          const int expected_q =
              amax > 0 ? static_cast<int>(std::nearbyint(xi * (127.0f / amax))) : 0;
          ASSERT_EQ(q[b].qs[i], expected_q) << "block " << b << " element " << i;
          // d/2 from rounding q, plus 127 times the half rounding of d
          // (relative 2^-11, or absolute 2^-25 for subnormal halves).
          const double half_err = std::max(d * std::ldexp(1.0, -11), std::ldexp(1.0, -25));
          ASSERT_LE(std::fabs(xi - y[32 * b + i]), 0.5 * d + 127 * half_err + 1e-30);
        }
      }
    }
  }
}

TEST(QuantizeTest, VecDotTypes) {
  EXPECT_EQ(VecDotType(TensorType::kF32), TensorType::kF32);
  EXPECT_EQ(VecDotType(TensorType::kF16), TensorType::kF16);
  EXPECT_EQ(VecDotType(TensorType::kBF16), TensorType::kBF16);
  for (TensorType t : {TensorType::kQ4_0, TensorType::kQ5_0, TensorType::kQ8_0}) {
    EXPECT_EQ(VecDotType(t), TensorType::kQ8_0);
  }
  for (TensorType t :
       {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, TensorType::kIQ4_XS}) {
    EXPECT_EQ(VecDotType(t), TensorType::kQ8_K);
  }
}

class DotTest : public ::testing::TestWithParam<TensorType> {};

// Tier A: DotRowReference is the float64 dot of exactly DequantizeRow's floats.
TEST_P(DotTest, FloatActivationsMatchFloat64DotOfDequantizedRow) {
  const TensorType type = GetParam();
  const TensorTypeTraits& t = TraitsOf(type);
  const int64_t base = std::max<int64_t>(t.block_size, 32);
  uint32_t seed = 50;
  for (int n_blocks : kBlockCounts) {
    for (Dist dist : {Dist::kGaussian, Dist::kOutliers, Dist::kMixedScale, Dist::kPositive}) {
      const int64_t n = n_blocks * base + (t.block_size == 1 ? 3 : 0);  // odd n for float types
      const std::vector<float> w = RandomRow(dist, n, ++seed);
      const std::vector<float> x = RandomRow(Dist::kGaussian, n, ++seed);
      std::vector<uint8_t> q(static_cast<size_t>(RowBytes(t, n)));
      QuantizeRow(type, w.data(), q.data(), n);
      std::vector<float> wd(static_cast<size_t>(n));
      DequantizeRow(type, q.data(), wd.data(), n);
      double ref = 0.0, mag = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        ref += static_cast<double>(wd[i]) * x[i];
        mag += std::fabs(static_cast<double>(wd[i]) * x[i]);
      }
      const double got = DotRowReference(type, q.data(), x.data(), n);
      EXPECT_NEAR(got, ref, 1e-12 * mag + 1e-300) << t.name << " n=" << n << " " << DistName(dist);
    }
  }
}

// Tier B: DotRowQuantizedReference equals the float64 dot of the dequantized
// weight and dequantized activation rows (float rounding of the result and
// of the dequantized products only), and differs from the tier-A dot by no
// more than the activation rounding allows: |Σ w (x - x̂)| <= Σ |w| |x - x̂|.
TEST_P(DotTest, QuantizedActivationsMatchDequantizedDot) {
  const TensorType type = GetParam();
  const TensorTypeTraits& t = TraitsOf(type);
  const TensorType act = VecDotType(type);
  const TensorTypeTraits& ta = TraitsOf(act);
  const int64_t base = std::max<int64_t>({t.block_size, ta.block_size, 32});
  uint32_t seed = 900;
  for (int n_blocks : kBlockCounts) {
    for (Dist dist : {Dist::kGaussian, Dist::kOutliers, Dist::kMixedScale, Dist::kNegative}) {
      const int64_t n = n_blocks * base;
      const std::vector<float> w = RandomRow(dist, n, ++seed);
      const std::vector<float> x = RandomRow(Dist::kOutliers, n, ++seed);
      std::vector<uint8_t> wq(static_cast<size_t>(RowBytes(t, n)));
      QuantizeRow(type, w.data(), wq.data(), n);
      std::vector<uint8_t> xq(static_cast<size_t>(RowBytes(ta, n)));
      QuantizeActivationRow(type, x.data(), xq.data(), n);
      std::vector<float> wd(static_cast<size_t>(n));
      std::vector<float> xd(static_cast<size_t>(n));
      DequantizeRow(type, wq.data(), wd.data(), n);
      DequantizeRow(act, xq.data(), xd.data(), n);
      double ref = 0.0, mag = 0.0, act_err = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        ref += static_cast<double>(wd[i]) * xd[i];
        mag += std::fabs(static_cast<double>(wd[i]) * xd[i]);
        act_err += std::fabs(double{wd[i]}) * std::fabs(double{x[i]} - xd[i]);
      }
      const float got = DotRowQuantizedReference(type, wq.data(), xq.data(), n);
      EXPECT_NEAR(got, ref, 1e-6 * mag + 1e-7 * std::fabs(ref))
          << t.name << " n=" << n << " " << DistName(dist);
      const double tier_a = DotRowReference(type, wq.data(), x.data(), n);
      EXPECT_LE(std::fabs(got - tier_a), act_err * (1 + 1e-6) + 1e-6 * mag + 1e-7 * std::fabs(ref))
          << t.name << " n=" << n << " " << DistName(dist);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllWeightTypes, DotTest, ::testing::ValuesIn(kWeightTypes),
                         [](const auto& info) { return std::string(TraitsOf(info.param).name); });

}  // namespace
}  // namespace ktx::kernels
