// The element-wise and row-wise GPU kernels against scalar references
// (runtime/models/reference_ops: RMSNorm in double) on fresh random inputs at
// awkward sizes. Tolerances: F32 math over n terms lands within ~n·2^-24 of the
// double result (we allow 4e-6 relative for n <= 7168); a bf16 output is the
// float result rounded once, so within one bf16 ulp (2^-8 relative) of the
// exact value.
#include "kernels/cuda/basic_ops.h"

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/models/reference_ops.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::Bf16BitsToFloat;
using cuda_test::DeviceArray;
using cuda_test::FloatToBf16Bits;

__nv_bfloat16* Bf16(const DeviceArray<uint16_t>& a) {
  return reinterpret_cast<__nv_bfloat16*>(a.get());
}

constexpr double kBf16Ulp = 1.0 / 256.0;

TEST(BasicOps, EmbedRowsCopiesTheTableRowsExactly) {
  KTX_SKIP_WITHOUT_GPU();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const int64_t n_vocab = 1000, n_embd = 7168 + 32;
  const std::vector<uint16_t> table = cuda_test::RandomBf16(rng, n_vocab * n_embd, 1.0f);
  for (const int64_t n_tokens : {1, 3, 17}) {
    std::vector<int32_t> tokens(n_tokens);
    for (auto& t : tokens) t = static_cast<int32_t>(rng() % n_vocab);
    tokens[0] = static_cast<int32_t>(n_vocab - 1);
    DeviceArray<uint16_t> d_table(table);
    DeviceArray<int32_t> d_tokens(tokens);
    const int64_t stride = n_embd + 5;
    DeviceArray<float> d_x(n_tokens * stride);
    d_x.Poison();
    ASSERT_CUDA_OK(
        EmbedRows(Bf16(d_table), n_embd, d_tokens.get(), n_tokens, d_x.get(), stride, nullptr));
    const std::vector<float> x = d_x.Download();
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t i = 0; i < n_embd; ++i) {
        ASSERT_EQ(x[t * stride + i], Bf16BitsToFloat(table[tokens[t] * n_embd + i]));
      }
    }
  }
}

TEST(BasicOps, RmsNormMatchesDoubleReference) {
  KTX_SKIP_WITHOUT_GPU();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const float eps = 1e-6f;
  for (const int64_t n : {64, 513, 7168}) {
    for (const int64_t n_rows : {1, 3, 17}) {
      for (const bool gather : {false, true}) {
        SCOPED_TRACE(testing::Message() << "n " << n << " rows " << n_rows << " gather " << gather);
        const int64_t n_src = gather ? n_rows + 4 : n_rows;
        const int64_t x_stride = n + 3;
        const std::vector<float> x = cuda_test::RandomF32(rng, n_src * x_stride, 2.0f);
        const std::vector<float> w = cuda_test::RandomF32(rng, n, 1.0f);
        std::vector<int32_t> rows(n_rows);
        for (int64_t r = 0; r < n_rows; ++r) rows[r] = static_cast<int32_t>(rng() % n_src);
        DeviceArray<float> d_x(x), d_w(w);
        DeviceArray<int32_t> d_rows(rows);
        DeviceArray<float> d_y(n_rows * n);
        DeviceArray<uint16_t> d_yb(n_rows * n);
        d_y.Poison();
        d_yb.Poison();
        ASSERT_CUDA_OK(RmsNorm(d_x.get(), x_stride, gather ? d_rows.get() : nullptr, d_w.get(), n,
                               n_rows, eps, d_y.get(), n, Bf16(d_yb), n, nullptr));
        const std::vector<float> y = d_y.Download();
        const std::vector<uint16_t> yb = d_yb.Download();
        std::vector<float> ref(n);
        for (int64_t r = 0; r < n_rows; ++r) {
          const int64_t src = gather ? rows[r] : r;
          models::RmsNorm(x.data() + src * x_stride, w.data(), n, eps, ref.data());
          for (int64_t i = 0; i < n; ++i) {
            const double tol = 4e-6 * std::fabs(ref[i]) + 1e-30;
            ASSERT_NEAR(y[r * n + i], ref[i], tol) << "row " << r << " i " << i;
            ASSERT_NEAR(Bf16BitsToFloat(yb[r * n + i]), ref[i], kBf16Ulp * std::fabs(ref[i]))
                << "bf16 row " << r << " i " << i;
          }
        }
      }
    }
  }
}

TEST(BasicOps, ConvertSiluMulAndAdd) {
  KTX_SKIP_WITHOUT_GPU();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (const int64_t n_rows : {1, 3, 17}) {
    const int64_t n_ff = 2048 + 7;
    const int64_t gu_stride = 2 * n_ff + 1;
    const std::vector<float> gu = cuda_test::RandomF32(rng, n_rows * gu_stride, 3.0f);
    DeviceArray<float> d_gu(gu);
    DeviceArray<uint16_t> d_act(n_rows * n_ff), d_conv(n_rows * n_ff);
    d_act.Poison();
    d_conv.Poison();
    ASSERT_CUDA_OK(SiluMulToBf16(d_gu.get(), gu_stride, n_rows, n_ff, Bf16(d_act), n_ff, nullptr));
    ASSERT_CUDA_OK(
        ConvertF32ToBf16(d_gu.get(), gu_stride, n_rows, n_ff, Bf16(d_conv), n_ff, nullptr));
    const std::vector<uint16_t> act = d_act.Download(), conv = d_conv.Download();
    for (int64_t r = 0; r < n_rows; ++r) {
      for (int64_t c = 0; c < n_ff; ++c) {
        const double g = gu[r * gu_stride + c], u = gu[r * gu_stride + n_ff + c];
        const double want = models::Silu(g) * u;
        // float silu: a few float ulps, then one bf16 rounding.
        ASSERT_NEAR(Bf16BitsToFloat(act[r * n_ff + c]), want, kBf16Ulp * std::fabs(want) + 1e-30)
            << r << "," << c;
        ASSERT_EQ(conv[r * n_ff + c], FloatToBf16Bits(gu[r * gu_stride + c]));
      }
    }
    // x += a, in F32: exactly the float sums.
    std::vector<float> x = cuda_test::RandomF32(rng, n_rows * 300, 1.0f);
    const std::vector<float> a = cuda_test::RandomF32(rng, n_rows * 257, 1.0f);
    DeviceArray<float> d_x(x), d_a(a);
    ASSERT_CUDA_OK(AddRows(d_x.get(), 300, d_a.get(), 257, n_rows, 257, nullptr));
    const std::vector<float> got = d_x.Download();
    for (int64_t r = 0; r < n_rows; ++r) {
      for (int64_t c = 0; c < 300; ++c) {
        const float want = c < 257 ? x[r * 300 + c] + a[r * 257 + c] : x[r * 300 + c];
        ASSERT_EQ(got[r * 300 + c], want);
      }
    }
  }
}

TEST(BasicOps, RandomFillIsDeterministicAndSpread) {
  KTX_SKIP_WITHOUT_GPU();
  const int64_t n = 100003;
  DeviceArray<float> a(n), b(n);
  ASSERT_CUDA_OK(FillRandomF32(a.get(), n, 7, 0.5f, nullptr));
  ASSERT_CUDA_OK(FillRandomF32(b.get(), n, 7, 0.5f, nullptr));
  const std::vector<float> va = a.Download(), vb = b.Download();
  EXPECT_EQ(va, vb);
  double mean = 0.0, mean_sq = 0.0;
  for (float v : va) {
    ASSERT_GE(v, -0.5f);
    ASSERT_LT(v, 0.5f);
    mean += v;
    mean_sq += static_cast<double>(v) * v;
  }
  mean /= n;
  mean_sq /= n;
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(mean_sq, 0.25 / 3.0, 0.01);  // uniform on [-0.5, 0.5)
}

}  // namespace
}  // namespace ktx::kernels::cuda
