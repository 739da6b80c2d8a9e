// The reference building blocks against independent long-double computations
// on awkward sizes: MatMul over every weight type ktx computes with, RMSNorm,
// and YaRN rope re-derived here from the formulas of DEEPSEEK.md.
#include "runtime/models/reference_ops.h"

#include <cmath>
#include <complex>
#include <numbers>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/tensor_type.h"
#include "kernels/cpu/quant/quant.h"

namespace ktx::models {
namespace {

using kernels::TensorType;

std::vector<float> RandomVector(int64_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

class MatMulTest
    : public ::testing::TestWithParam<std::tuple<TensorType, int64_t, int64_t, int64_t>> {};

// y = W x against a long-double product of the dequantized rows, with padded
// strides on both sides. The only rounding allowed is the final one to float.
TEST_P(MatMulTest, MatchesLongDoubleProduct) {
  const auto [type, n_cols, n_rows, n_tokens] = GetParam();
  const kernels::TensorTypeTraits& traits = kernels::TraitsOf(type);
  const int64_t row_bytes = n_cols / traits.block_size * traits.type_size;
  std::vector<uint8_t> stored(row_bytes * n_rows);
  const std::vector<float> source = RandomVector(n_cols * n_rows, 7);
  for (int64_t r = 0; r < n_rows; ++r) {
    kernels::QuantizeRow(type, source.data() + r * n_cols, stored.data() + r * row_bytes, n_cols);
  }
  const int64_t x_stride = n_cols + 5;
  const int64_t y_stride = n_rows + 3;
  const std::vector<float> x = RandomVector(x_stride * n_tokens, 11);
  std::vector<float> y(y_stride * n_tokens, -12345.0f);

  WeightMatrix w;
  w.data = stored.data();
  w.type = type;
  w.n_cols = n_cols;
  w.n_rows = n_rows;
  w.row_bytes = row_bytes;
  MatMul(w, x.data(), x_stride, n_tokens, y.data(), y_stride);

  std::vector<float> row(n_cols);
  for (int64_t r = 0; r < n_rows; ++r) {
    kernels::DequantizeRow(type, stored.data() + r * row_bytes, row.data(), n_cols);
    for (int64_t t = 0; t < n_tokens; ++t) {
      long double ref = 0.0L, mag = 0.0L;
      for (int64_t c = 0; c < n_cols; ++c) {
        ref += static_cast<long double>(row[c]) * x[t * x_stride + c];
        mag += std::fabs(static_cast<long double>(row[c]) * x[t * x_stride + c]);
      }
      const double got = y[t * y_stride + r];
      ASSERT_LE(std::fabs(got - static_cast<double>(ref)),
                6e-8 * std::fabs(static_cast<double>(ref)) + 1e-13 * static_cast<double>(mag))
          << "row " << r << " token " << t;
    }
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t pad = n_rows; pad < y_stride; ++pad) {
        ASSERT_EQ(y[t * y_stride + pad], -12345.0f);  // padding untouched
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Types, MatMulTest,
                         ::testing::Values(std::make_tuple(TensorType::kF32, 111, 19, 7),
                                           std::make_tuple(TensorType::kF32, 1, 1, 1),
                                           std::make_tuple(TensorType::kF16, 111, 19, 3),
                                           std::make_tuple(TensorType::kBF16, 989, 5, 2),
                                           std::make_tuple(TensorType::kQ8_0, 96, 111, 3),
                                           std::make_tuple(TensorType::kQ4_0, 32, 19, 1),
                                           std::make_tuple(TensorType::kQ5_0, 160, 19, 4),
                                           std::make_tuple(TensorType::kQ4_K, 512, 19, 3),
                                           std::make_tuple(TensorType::kQ5_K, 256, 7, 2),
                                           std::make_tuple(TensorType::kQ6_K, 256, 111, 2),
                                           std::make_tuple(TensorType::kIQ4_XS, 256, 5, 1),
                                           // Enough work for many parallel tasks.
                                           std::make_tuple(TensorType::kQ8_0, 256, 1024, 3)));

TEST(WeightMatrixTest, SlabIsTheContiguousBlockOfOneExpert) {
  gguf::TensorInfo t;
  t.name = "blk.1.ffn_up_exps.weight";
  t.ne = {64, 3, 5};
  t.type = TensorType::kQ8_0;
  std::vector<uint8_t> bytes(2 * 34 * 3 * 5);
  t.data = bytes.data();
  const WeightMatrix all = WeightMatrix::Of(t);
  EXPECT_EQ(all.n_rows, 15);
  EXPECT_EQ(all.row_bytes, 68);
  const WeightMatrix e3 = WeightMatrix::Slab(t, 3);
  EXPECT_EQ(e3.n_rows, 3);
  EXPECT_EQ(e3.n_cols, 64);
  EXPECT_EQ(e3.data, bytes.data() + 3 * 3 * 68);
}

TEST(RmsNormTest, MatchesLongDouble) {
  for (int64_t n : {1, 19, 111, 7168}) {
    const std::vector<float> x = RandomVector(n, n, 3.0f);
    const std::vector<float> weight = RandomVector(n, n + 1);
    std::vector<float> out(n);
    RmsNorm(x.data(), weight.data(), n, 1e-6, out.data());
    long double ss = 0.0L;
    for (float v : x) ss += static_cast<long double>(v) * v;
    const long double inv = 1.0L / std::sqrt(ss / n + 1e-6L);
    for (int64_t i = 0; i < n; ++i) {
      const double want = static_cast<double>(x[i] * inv * weight[i]);
      ASSERT_NEAR(out[i], want, 1e-7 * std::fabs(want) + 1e-30) << n << " " << i;
    }
    // In place.
    std::vector<float> y = x;
    RmsNorm(y.data(), weight.data(), n, 1e-6, y.data());
    EXPECT_EQ(y, out);
  }
}

// YaRN rope, derived independently: theta per pair from the DEEPSEEK.md
// formulas, rotation as multiplication by a complex number.
struct YarnSpec {
  int n_rot;
  long double base, factor;
  int n_ctx_orig;
  long double beta_fast, beta_slow;
};

std::vector<std::complex<long double>> Expected(const YarnSpec& s, int64_t pos,
                                                const std::vector<float>& x) {
  auto cd = [&](long double beta) {
    return s.n_rot * std::log(s.n_ctx_orig / (beta * 2 * std::numbers::pi_v<long double>)) /
           (2 * std::log(s.base));
  };
  const long double lo = std::max(0.0L, std::floor(cd(s.beta_fast)));
  const long double hi = std::min<long double>(s.n_rot - 1, std::ceil(cd(s.beta_slow)));
  std::vector<std::complex<long double>> out;
  for (int i = 0; i < s.n_rot / 2; ++i) {
    const long double extrap = pos * std::pow(s.base, -2.0L * i / s.n_rot);
    const long double interp = extrap / s.factor;
    const long double ramp = 1 - std::clamp((i - lo) / std::max(0.001L, hi - lo), 0.0L, 1.0L);
    const long double theta = interp * (1 - ramp) + extrap * ramp;
    out.push_back(std::complex<long double>(x[2 * i], x[2 * i + 1]) *
                  std::polar(1.0L, theta));  // magnitude 1 for DeepSeek files
  }
  return out;
}

TEST(RopeTest, YarnMatchesIndependentDerivation) {
  for (const YarnSpec& s : {YarnSpec{16, 10000, 40, 4096, 32, 1},    // the fixtures
                            YarnSpec{64, 10000, 40, 4096, 32, 1},    // DeepSeek-V3
                            YarnSpec{64, 10000, 4, 2048, 16, 2}}) {  // something else
    RopeYarnParams p;
    p.n_rot = s.n_rot;
    p.freq_base = static_cast<double>(s.base);
    p.freq_scale = 1.0 / static_cast<double>(s.factor);
    p.ext_factor = 1.0;
    // llama.cpp hands rope 1 / (1 + 0.1 ln factor), which rope multiplies back.
    p.attn_factor = 1.0 / (1.0 + 0.1 * std::log(static_cast<double>(s.factor)));
    p.SetCorrDims(s.n_ctx_orig, static_cast<double>(s.beta_fast), static_cast<double>(s.beta_slow));
    for (int64_t pos : {0, 1, 2, 17, 64, 96, 4095, 100000}) {
      const std::vector<float> x = RandomVector(s.n_rot, pos + 3);
      std::vector<double> c(s.n_rot / 2), sn(s.n_rot / 2);
      RopeAngles(p, pos, c.data(), sn.data());
      std::vector<float> y = x;
      ApplyRope(c.data(), sn.data(), s.n_rot, y.data());
      const auto want = Expected(s, pos, x);
      for (int i = 0; i < s.n_rot / 2; ++i) {
        const double scale = std::abs(want[i]) + 1e-6;
        ASSERT_NEAR(y[2 * i], static_cast<double>(want[i].real()), 2e-7 * scale)
            << "n_rot " << s.n_rot << " pos " << pos << " pair " << i;
        ASSERT_NEAR(y[2 * i + 1], static_cast<double>(want[i].imag()), 2e-7 * scale);
      }
    }
  }
}

TEST(RopeTest, CorrectionDimensions) {
  RopeYarnParams p;
  p.n_rot = 16;
  p.freq_base = 10000;
  p.SetCorrDims(4096, 32, 1);
  EXPECT_EQ(p.corr_low, 2.0);   // from 2.618 (tests/data/README.md 2.1)
  EXPECT_EQ(p.corr_high, 6.0);  // from 5.628
  p.n_rot = 64;
  p.SetCorrDims(4096, 32, 1);
  EXPECT_EQ(p.corr_low, 10.0);   // floor(10.47)
  EXPECT_EQ(p.corr_high, 23.0);  // ceil(22.51)
}

TEST(RopeTest, PlainRopeWithoutExtrapolation) {
  // ext_factor 0, freq_scale 1: theta_i = pos * base^(-2i/n), magnitude attn_factor.
  RopeYarnParams p;
  p.n_rot = 8;
  p.freq_base = 500;
  p.attn_factor = 1.0;
  std::vector<double> c(4), s(4);
  RopeAngles(p, 5, c.data(), s.data());
  for (int i = 0; i < 4; ++i) {
    const double theta = 5 * std::pow(500.0, -2.0 * i / 8);
    EXPECT_NEAR(c[i], std::cos(theta), 1e-15);
    EXPECT_NEAR(s[i], std::sin(theta), 1e-15);
  }
}

}  // namespace
}  // namespace ktx::models
