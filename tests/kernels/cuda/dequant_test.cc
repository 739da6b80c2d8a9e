// GPU dequantization to bf16 against the scalar CPU reference
// (kernels/cpu/quant DequantizeRow, then round-to-nearest-even bf16): bit
// equality on fresh random rows of every supported GGUF type.
#include "kernels/cuda/dequant.h"

#include <cuda_bf16.h>

#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/tensor_type.h"
#include "kernels/cpu/quant/quant.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::DeviceArray;

class DequantTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(DequantTest, MatchesCpuReferenceBitForBit) {
  KTX_SKIP_WITHOUT_GPU();
  const TensorType type = GetParam();
  const TensorTypeTraits& traits = TraitsOf(type);
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "type " << traits.name << " seed " << seed);
  std::mt19937 rng(seed);
  for (const int64_t n_rows : {1, 3, 17}) {
    for (const int64_t n_cols :
         {traits.block_size == 256 ? int64_t{256} : int64_t{96}, int64_t{768}}) {
      if (n_cols % traits.block_size != 0) continue;
      const int64_t row_bytes = n_cols / traits.block_size * traits.type_size;
      // Rows with different magnitudes and some outliers, as real weights have.
      std::vector<uint8_t> raw(static_cast<size_t>(n_rows * row_bytes));
      std::vector<uint16_t> want;
      for (int64_t r = 0; r < n_rows; ++r) {
        std::vector<float> x = cuda_test::RandomF32(rng, n_cols, 0.02f * static_cast<float>(r + 1));
        x[rng() % n_cols] *= 20.0f;
        QuantizeRow(type, x.data(), raw.data() + r * row_bytes, n_cols);
        std::vector<float> y(n_cols);
        DequantizeRow(type, raw.data() + r * row_bytes, y.data(), n_cols);
        for (float v : y) want.push_back(FloatToBf16(v));
      }
      // A destination wider than the row: the padding must stay untouched.
      const int64_t dst_stride = n_cols + 32;
      DeviceArray<uint8_t> d_raw(raw);
      DeviceArray<uint16_t> d_out(static_cast<size_t>(n_rows * dst_stride));
      d_out.Poison(0x7f);
      ASSERT_CUDA_OK(DequantizeToBf16(type, d_raw.get(), row_bytes, n_rows, n_cols,
                                      reinterpret_cast<__nv_bfloat16*>(d_out.get()), dst_stride,
                                      nullptr));
      const std::vector<uint16_t> got = d_out.Download();
      for (int64_t r = 0; r < n_rows; ++r) {
        for (int64_t c = 0; c < dst_stride; ++c) {
          const uint16_t g = got[r * dst_stride + c];
          if (c < n_cols) {
            ASSERT_EQ(g, want[r * n_cols + c]) << "row " << r << " col " << c << " of " << n_cols;
          } else {
            ASSERT_EQ(g, 0x7f7f) << "padding overwritten at row " << r << " col " << c;
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Types, DequantTest,
                         ::testing::Values(TensorType::kF32, TensorType::kF16, TensorType::kBF16,
                                           TensorType::kQ4_0, TensorType::kQ5_0, TensorType::kQ8_0,
                                           TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K,
                                           TensorType::kIQ4_XS),
                         [](const auto& info) { return std::string(TraitsOf(info.param).name); });

TEST(DequantErrors, RejectsUnsupportedTypesAndShapes) {
  EXPECT_FALSE(CanDequantizeOnGpu(TensorType::kQ2_K));
  EXPECT_TRUE(CanDequantizeOnGpu(TensorType::kQ4_K));
  // Argument checks happen before any launch: no GPU needed.
  EXPECT_EQ(DequantizeToBf16(TensorType::kQ2_K, nullptr, 84, 1, 256, nullptr, 256, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(DequantizeToBf16(TensorType::kQ4_K, nullptr, 144, 1, 100, nullptr, 100, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(DequantizeToBf16(TensorType::kQ8_0, nullptr, 34, 1, 64, nullptr, 32, nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace ktx::kernels::cuda
