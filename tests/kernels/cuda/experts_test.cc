// The routed-expert gather / weighted scatter-add kernels against host
// references on awkward sizes (odd widths, strides, unaligned vectors):
// gathering bf16 rows is a copy (bitwise), the scatter-add is one F32 multiply
// and add per element (within 1 ulp of the float result: nvcc may fuse them),
// and rows not named are left untouched.
#include "kernels/cuda/experts.h"

#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::DeviceArray;

TEST(ExpertKernels, GatherRowsCopiesTheNamedRows) {
  KTX_SKIP_WITHOUT_GPU();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (const int64_t n_cols : {8, 13, 7168}) {
    for (const int64_t src_stride_extra : {0, 3, 8}) {
      const int64_t src_rows = 29, src_stride = n_cols + src_stride_extra;
      const int64_t dst_stride = n_cols + (src_stride_extra == 3 ? 1 : 0);
      const std::vector<uint16_t> src = cuda_test::RandomBf16(rng, src_rows * src_stride, 1.0f);
      std::vector<int32_t> rows = {28, 0, 5, 5, 17, 3, 11};  // repeats allowed when gathering
      const int64_t n = static_cast<int64_t>(rows.size());
      DeviceArray<uint16_t> d_src(src), d_dst(n * dst_stride);
      DeviceArray<int32_t> d_rows(rows);
      d_dst.Poison();
      ASSERT_CUDA_OK(GatherRowsBf16(
          reinterpret_cast<const __nv_bfloat16*>(d_src.get()), src_stride, d_rows.get(), n, n_cols,
          reinterpret_cast<__nv_bfloat16*>(d_dst.get()), dst_stride, nullptr));
      const std::vector<uint16_t> dst = d_dst.Download();
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t c = 0; c < n_cols; ++c) {
          ASSERT_EQ(dst[i * dst_stride + c], src[rows[i] * src_stride + c])
              << "row " << i << " col " << c << " width " << n_cols;
        }
      }
    }
  }
}

TEST(ExpertKernels, ScatterAddWeightedAddsIntoTheNamedRowsOnly) {
  KTX_SKIP_WITHOUT_GPU();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (const int64_t n_cols : {1, 255, 7168}) {
    const int64_t n_acc = 23, acc_stride = n_cols + 2, y_stride = n_cols + 5;
    std::vector<int32_t> rows = {22, 4, 0, 9, 13};
    const int64_t n = static_cast<int64_t>(rows.size());
    const std::vector<float> y = cuda_test::RandomF32(rng, n * y_stride, 1.0f);
    const std::vector<float> acc0 = cuda_test::RandomF32(rng, n_acc * acc_stride, 1.0f);
    const std::vector<float> w = {0.5f, -1.25f, 0.0f, 3.0f, 1e-3f};
    DeviceArray<float> d_y(y), d_acc(acc0), d_w(w);
    DeviceArray<int32_t> d_rows(rows);
    ASSERT_CUDA_OK(ScatterAddWeightedRows(d_y.get(), y_stride, d_rows.get(), d_w.get(), n, n_cols,
                                          d_acc.get(), acc_stride, nullptr));
    const std::vector<float> acc = d_acc.Download();
    std::vector<int> hit(n_acc, -1);
    for (int64_t i = 0; i < n; ++i) hit[rows[i]] = static_cast<int>(i);
    for (int64_t r = 0; r < n_acc; ++r) {
      for (int64_t c = 0; c < n_cols; ++c) {
        const float a0 = acc0[r * acc_stride + c];
        const float got = acc[r * acc_stride + c];
        if (hit[r] < 0) {
          ASSERT_EQ(got, a0) << "row " << r << " is not named but changed";
          continue;
        }
        const double want =
            static_cast<double>(a0) + static_cast<double>(w[hit[r]]) * y[hit[r] * y_stride + c];
        ASSERT_NEAR(
            got, want,
            2.5e-7 * (std::fabs(a0) + std::fabs(w[hit[r]] * y[hit[r] * y_stride + c])) + 1e-30)
            << "row " << r << " col " << c;
      }
    }
  }
}

TEST(ExpertKernels, RejectBadArguments) {
  EXPECT_EQ(GatherRowsBf16(nullptr, 4, nullptr, 1, 8, nullptr, 8, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(ScatterAddWeightedRows(nullptr, 8, nullptr, nullptr, 1, 8, nullptr, 4, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(GatherRowsBf16(nullptr, 8, nullptr, 0, 8, nullptr, 8, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace ktx::kernels::cuda
