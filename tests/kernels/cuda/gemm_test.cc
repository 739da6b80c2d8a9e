// The cuBLAS wrappers against a float64 product of the same bf16 (or F32)
// inputs. With fp32 accumulation each output is within ~k·2^-24·Σ|w·x| of the
// exact value; we allow 1e-5·Σ|w·x| for k <= 576 (plus one bf16 rounding,
// 2^-9 relative, for bf16 outputs).
#include "kernels/cuda/gemm.h"

#include <cublas_v2.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::Bf16BitsToFloat;
using cuda_test::DeviceArray;

class GemmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KTX_SKIP_WITHOUT_GPU();
    ASSERT_EQ(cublasCreate(&handle_), CUBLAS_STATUS_SUCCESS);
  }
  void TearDown() override {
    if (handle_ != nullptr) cublasDestroy(handle_);
  }
  cublasHandle_t handle_ = nullptr;
};

const __nv_bfloat16* Bf16(const DeviceArray<uint16_t>& a) {
  return reinterpret_cast<const __nv_bfloat16*>(a.get());
}

TEST_F(GemmTest, LinearBf16MatchesFloat64) {
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (const int64_t n_tokens : {1, 3, 17}) {
    for (const int64_t n_out : {7, 129}) {
      for (const int64_t n_in : {64, 576}) {
        for (const bool bf16_out : {false, true}) {
          for (const float beta : {0.0f, 1.0f}) {
            if (bf16_out && beta != 0.0f) continue;
            SCOPED_TRACE(testing::Message() << n_tokens << "x" << n_out << "x" << n_in << " bf16 "
                                            << bf16_out << " beta " << beta);
            const int64_t ldw = n_in + 8, ldx = n_in + 16, ldy = n_out + 3;
            const auto w = cuda_test::RandomBf16(rng, n_out * ldw, 0.05f);
            const auto x = cuda_test::RandomBf16(rng, n_tokens * ldx, 1.0f);
            const auto y0 = cuda_test::RandomF32(rng, n_tokens * ldy, 1.0f);
            DeviceArray<uint16_t> d_w(w), d_x(x), d_yb(n_tokens * ldy);
            DeviceArray<float> d_y(y0);
            void* y = bf16_out ? static_cast<void*>(d_yb.get()) : static_cast<void*>(d_y.get());
            ASSERT_EQ(
                LinearBf16(handle_, Bf16(d_w), ldw, Bf16(d_x), ldx, y,
                           bf16_out ? CUDA_R_16BF : CUDA_R_32F, ldy, n_out, n_in, n_tokens, beta),
                CUBLAS_STATUS_SUCCESS);
            const std::vector<float> got_f = d_y.Download();
            const std::vector<uint16_t> got_b = d_yb.Download();
            for (int64_t t = 0; t < n_tokens; ++t) {
              for (int64_t r = 0; r < n_out; ++r) {
                double ref = beta * static_cast<double>(y0[t * ldy + r]), mag = std::fabs(ref);
                for (int64_t c = 0; c < n_in; ++c) {
                  const double p = static_cast<double>(Bf16BitsToFloat(w[r * ldw + c])) *
                                   Bf16BitsToFloat(x[t * ldx + c]);
                  ref += p;
                  mag += std::fabs(p);
                }
                const double got =
                    bf16_out ? Bf16BitsToFloat(got_b[t * ldy + r]) : got_f[t * ldy + r];
                const double tol = 1e-5 * mag + (bf16_out ? std::fabs(ref) / 256.0 : 0.0);
                ASSERT_NEAR(got, ref, tol) << "t " << t << " r " << r;
              }
            }
          }
        }
      }
    }
  }
}

TEST_F(GemmTest, TransposedWeightMatchesFloat64) {
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  // W stored [n_in, ldw] (one row per input feature), as the MLA prefill's
  // latent rows; odd sizes, padded strides, both output types.
  for (const int64_t n_tokens : {1, 17}) {
    for (const int64_t n_out : {8, 136}) {
      for (const int64_t n_in : {2, 126, 1000}) {
        for (const bool bf16_out : {false, true}) {
          SCOPED_TRACE(testing::Message()
                       << n_tokens << "x" << n_out << "x" << n_in << " bf16 " << bf16_out);
          const int64_t ldw = n_out + 8, ldx = n_in + 6, ldy = n_out + 3;
          const auto w = cuda_test::RandomBf16(rng, n_in * ldw, 0.05f);
          const auto x = cuda_test::RandomBf16(rng, n_tokens * ldx, 1.0f);
          DeviceArray<uint16_t> d_w(w), d_x(x), d_yb(n_tokens * ldy);
          DeviceArray<float> d_y(n_tokens * ldy);
          void* y = bf16_out ? static_cast<void*>(d_yb.get()) : static_cast<void*>(d_y.get());
          ASSERT_EQ(LinearBf16TransposedWeight(handle_, Bf16(d_w), ldw, Bf16(d_x), ldx, y,
                                               bf16_out ? CUDA_R_16BF : CUDA_R_32F, ldy, n_out,
                                               n_in, n_tokens),
                    CUBLAS_STATUS_SUCCESS);
          const std::vector<float> got_f = d_y.Download();
          const std::vector<uint16_t> got_b = d_yb.Download();
          for (int64_t t = 0; t < n_tokens; ++t) {
            for (int64_t r = 0; r < n_out; ++r) {
              double ref = 0.0, mag = 0.0;
              for (int64_t c = 0; c < n_in; ++c) {
                const double p = static_cast<double>(Bf16BitsToFloat(w[c * ldw + r])) *
                                 Bf16BitsToFloat(x[t * ldx + c]);
                ref += p;
                mag += std::fabs(p);
              }
              const double got =
                  bf16_out ? Bf16BitsToFloat(got_b[t * ldy + r]) : got_f[t * ldy + r];
              const double tol = 2e-5 * mag + (bf16_out ? std::fabs(ref) / 256.0 : 0.0);
              ASSERT_NEAR(got, ref, tol) << "t " << t << " r " << r;
            }
          }
        }
      }
    }
  }
  // A weight stride shorter than the output is refused.
  DeviceArray<uint16_t> d(64);
  float y = 0.0f;
  EXPECT_EQ(LinearBf16TransposedWeight(handle_, Bf16(d), 4, Bf16(d), 8, &y, CUDA_R_32F, 8, 8, 8, 1),
            CUBLAS_STATUS_INVALID_VALUE);
}

TEST_F(GemmTest, BatchedPerHeadProducts) {
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  // The absorbed-query shape: per head [kv_lora x qk_nope] times q_nope of each token,
  // written into a wider per-token row (stride n_head * 80, head slot 80).
  const int64_t n_head = 5, kvl = 64, nope = 32, slot = 80;
  for (const int64_t n_tokens : {1, 3, 17}) {
    const auto w = cuda_test::RandomBf16(rng, n_head * kvl * nope, 0.1f);
    const auto x = cuda_test::RandomBf16(rng, n_tokens * n_head * nope, 1.0f);
    DeviceArray<uint16_t> d_w(w), d_x(x);
    DeviceArray<float> d_y(n_tokens * n_head * slot);
    d_y.Poison(0);
    ASSERT_EQ(
        LinearBf16Batched(handle_, Bf16(d_w), nope, kvl * nope, Bf16(d_x), n_head * nope, nope,
                          d_y.get(), CUDA_R_32F, n_head * slot, slot, kvl, nope, n_tokens, n_head),
        CUBLAS_STATUS_SUCCESS);
    const std::vector<float> y = d_y.Download();
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t h = 0; h < n_head; ++h) {
        for (int64_t r = 0; r < slot; ++r) {
          const float got = y[(t * n_head + h) * slot + r];
          if (r >= kvl) {
            ASSERT_EQ(got, 0.0f) << "beyond the head's rows";
            continue;
          }
          double ref = 0.0, mag = 0.0;
          for (int64_t c = 0; c < nope; ++c) {
            const double p = static_cast<double>(Bf16BitsToFloat(w[(h * kvl + r) * nope + c])) *
                             Bf16BitsToFloat(x[(t * n_head + h) * nope + c]);
            ref += p;
            mag += std::fabs(p);
          }
          ASSERT_NEAR(got, ref, 1e-5 * mag) << t << " " << h << " " << r;
        }
      }
    }
  }
}

TEST_F(GemmTest, LinearF32IsFullPrecision) {
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const int64_t n_out = 256, n_in = 7168;
  for (const int64_t n_tokens : {1, 3, 17}) {
    const auto w = cuda_test::RandomF32(rng, n_out * n_in, 0.02f);
    const auto x = cuda_test::RandomF32(rng, n_tokens * n_in, 1.0f);
    DeviceArray<float> d_w(w), d_x(x), d_y(n_tokens * n_out);
    ASSERT_EQ(LinearF32(handle_, d_w.get(), n_in, d_x.get(), n_in, d_y.get(), n_out, n_out, n_in,
                        n_tokens),
              CUBLAS_STATUS_SUCCESS);
    const std::vector<float> y = d_y.Download();
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t r = 0; r < n_out; ++r) {
        double ref = 0.0, mag = 0.0;
        for (int64_t c = 0; c < n_in; ++c) {
          const double p = static_cast<double>(w[r * n_in + c]) * x[t * n_in + c];
          ref += p;
          mag += std::fabs(p);
        }
        // Sequential F32 sums land near 1e-7 * mag; TF32 products (10-bit
        // mantissa) would land near 5e-4 / sqrt(n_in) * mag = 6e-6 * mag.
        ASSERT_NEAR(y[t * n_out + r], ref, 2e-6 * mag) << t << " " << r;
      }
    }
  }
}

}  // namespace
}  // namespace ktx::kernels::cuda
