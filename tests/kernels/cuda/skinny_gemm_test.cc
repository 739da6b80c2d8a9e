// The decode-sized bf16 product (kernels/cuda/skinny_gemm.h) against a float64
// product of the same bf16 inputs, on awkward shapes (rows not a multiple of
// 16, n_in not a multiple of 32, 1 .. 64 tokens, strided batches), for the
// planned launch shape and forced ones (every tiles-per-block, splits of 2, 3
// and 5 blocks); bit-for-bit batch invariance; untouched padding; refusals.
//
// Bound (skinny_gemm.h): |y - ref| <= (2 ceil(n_in / 16) + 16 + split) 2^-24
// (Σ|w x| + |beta y|), plus 2^-9 |ref| for bf16 outputs. The factor 2 per
// k-step covers the tensor cores' accumulation, which is not specified as
// round-to-nearest.
#include "kernels/cuda/skinny_gemm.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::Bf16BitsToFloat;
using cuda_test::DeviceArray;

const __nv_bfloat16* Bf16(const DeviceArray<uint16_t>& a) {
  return reinterpret_cast<const __nv_bfloat16*>(a.get());
}

int DeviceSms() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  return sms > 0 ? sms : 1;
}

struct Case {
  int64_t n_out, n_in, n_tokens, batch;
  bool bf16_out;
  float beta;
};

// Runs the product with `plan` and checks every output against float64, and
// that padding columns of y (r >= n_out) and the rows of tokens >= n_tokens
// keep their poison.
void CheckCase(const Case& cs, const SkinnyGemmPlan& plan, std::mt19937& rng) {
  SCOPED_TRACE(testing::Message() << cs.batch << " x " << cs.n_tokens << "x" << cs.n_out << "x"
                                  << cs.n_in << " bf16 " << cs.bf16_out << " beta " << cs.beta
                                  << " plan tiles/block " << plan.tiles_per_block << " split "
                                  << plan.split << " unroll " << plan.unroll << " pipelined "
                                  << plan.pipelined);
  const int64_t ldw = cs.n_in + 8, ldx = cs.n_in + 16, ldy = cs.n_out + 3;
  const int64_t wbs = cs.n_out * ldw + 24, xbs = cs.n_tokens * ldx + 8,
                ybs = (cs.n_tokens + 1) * ldy;
  const auto w = cuda_test::RandomBf16(rng, cs.batch * wbs, 0.05f);
  const auto x = cuda_test::RandomBf16(rng, cs.batch * xbs, 1.0f);
  std::vector<float> y0 = cuda_test::RandomF32(rng, cs.batch * ybs, 1.0f);
  std::vector<uint16_t> y0b(y0.size());
  for (size_t i = 0; i < y0.size(); ++i) {
    y0b[i] = cuda_test::FloatToBf16Bits(y0[i]);
    if (cs.bf16_out) y0[i] = Bf16BitsToFloat(y0b[i]);
  }
  DeviceArray<uint16_t> d_w(w), d_x(x), d_yb(y0b);
  DeviceArray<float> d_y(y0);
  if (cs.beta == 0.0f) {  // y must never be read: NaN everywhere
    d_y.Poison();
    d_yb.Poison();
  }
  const size_t ws_bytes = SkinnyGemmWorkspaceBytes(plan);
  DeviceArray<uint8_t> ws(ws_bytes + 16);
  if (ws_bytes > 0) ASSERT_CUDA_OK(cudaMemset(ws.get(), 0, ws_bytes + 16));
  SkinnyGemmArgs a;
  a.w = Bf16(d_w);
  a.ldw = ldw;
  a.w_batch_stride = wbs;
  a.x = Bf16(d_x);
  a.ldx = ldx;
  a.x_batch_stride = xbs;
  a.y = cs.bf16_out ? static_cast<void*>(d_yb.get()) : static_cast<void*>(d_y.get());
  a.y_bf16 = cs.bf16_out;
  a.ldy = ldy;
  a.y_batch_stride = ybs;
  a.n_out = cs.n_out;
  a.n_in = cs.n_in;
  a.n_tokens = cs.n_tokens;
  a.batch = cs.batch;
  a.beta = cs.beta;
  ASSERT_EQ(SkinnyGemmUnsupportedReason(a), "");
  // Twice: the second call checks that the first left the counters at zero.
  for (int rep = 0; rep < 2; ++rep) {
    ASSERT_CUDA_OK(SkinnyGemm(a, plan, ws.get(), ws_bytes, nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    if (rep == 0 && cs.beta != 0.0f) break;  // accumulating twice would change y
  }
  const std::vector<float> got_f = d_y.Download();
  const std::vector<uint16_t> got_b = d_yb.Download();
  const int64_t steps16 = (cs.n_in + 15) / 16;
  const double eps = std::ldexp(1.0, -24) * static_cast<double>(2 * steps16 + 16 + plan.split);
  for (int64_t b = 0; b < cs.batch; ++b) {
    for (int64_t t = 0; t < cs.n_tokens + 1; ++t) {
      for (int64_t r = 0; r < ldy; ++r) {
        const int64_t iy = b * ybs + t * ldy + r;
        const double got = cs.bf16_out ? Bf16BitsToFloat(got_b[iy]) : got_f[iy];
        if (t >= cs.n_tokens || r >= cs.n_out) {  // padding: untouched
          if (cs.beta == 0.0f) {
            ASSERT_TRUE(std::isnan(got)) << "padding t " << t << " r " << r << " written";
          } else {
            ASSERT_EQ(got, static_cast<double>(y0[iy])) << "padding t " << t << " r " << r;
          }
          continue;
        }
        double ref = cs.beta * static_cast<double>(y0[iy]), mag = std::fabs(ref);
        for (int64_t c = 0; c < cs.n_in; ++c) {
          const double p = static_cast<double>(Bf16BitsToFloat(w[b * wbs + r * ldw + c])) *
                           Bf16BitsToFloat(x[b * xbs + t * ldx + c]);
          ref += p;
          mag += std::fabs(p);
        }
        const double tol = eps * mag + (cs.bf16_out ? std::fabs(ref) / 256.0 : 0.0);
        ASSERT_NEAR(got, ref, tol) << "b " << b << " t " << t << " r " << r;
      }
    }
  }
}

class SkinnyGemmTest : public ::testing::Test {
 protected:
  void SetUp() override { KTX_SKIP_WITHOUT_GPU(); }
};

TEST_F(SkinnyGemmTest, MatchesFloat64WithThePlannedShape) {
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const int sms = DeviceSms();
  for (const int64_t n_tokens : {1, 3, 8, 9, 17, 40, 64}) {
    for (const int64_t n_out : {1, 7, 16, 33, 129}) {
      for (const int64_t n_in : {8, 40, 576, 1000, 7168}) {
        const Case cs{n_out, n_in, n_tokens, 1, false, 0.0f};
        CheckCase(cs, PlanSkinnyGemm(n_out, n_in, 1, sms), rng);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_F(SkinnyGemmTest, OutputsBetaAndBatches) {
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const int sms = DeviceSms();
  for (const bool bf16_out : {false, true}) {
    for (const float beta : {0.0f, 1.0f, 0.5f}) {
      for (const int64_t batch : {1, 3}) {
        for (const int64_t n_tokens : {1, 11}) {
          for (const auto& [n_out, n_in] :
               {std::pair<int64_t, int64_t>{129, 128}, std::pair<int64_t, int64_t>{40, 2056}}) {
            const Case cs{n_out, n_in, n_tokens, batch, bf16_out, beta};
            CheckCase(cs, PlanSkinnyGemm(n_out, n_in, batch, sms), rng);
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

TEST_F(SkinnyGemmTest, EveryForcedLaunchShapeMatches) {
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (const auto& [n_out, n_in] :
       {std::pair<int64_t, int64_t>{33, 1000}, std::pair<int64_t, int64_t>{200, 4104}}) {
    for (const int64_t n_tokens : {1, 5, 16, 64}) {
      std::vector<SkinnyGemmPlan> plans;
      for (const int tpb : {1, 2, 4, 8}) {
        for (const int unroll : {2, 4, 8}) {
          for (const bool pipelined : {false, true}) {
            if (pipelined && unroll == 8) continue;
            plans.push_back(SkinnyGemmPlan{n_out, n_in, 1, tpb, 1, unroll, pipelined});
          }
        }
      }
      for (const int split : {2, 3, 5}) {
        plans.push_back(SkinnyGemmPlan{n_out, n_in, 1, 1, split, 2, true});
        plans.push_back(SkinnyGemmPlan{n_out, n_in, 1, 1, split, 4, false});
      }
      for (const SkinnyGemmPlan& p : plans) {
        CheckCase(Case{n_out, n_in, n_tokens, 1, false, 1.0f}, p, rng);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// A token's outputs are the same bits whatever else is in its batch (the plan
// does not depend on the token count), for a plan with and without a split.
TEST_F(SkinnyGemmTest, BatchInvariant) {
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  const int sms = DeviceSms();
  for (const auto& [n_out, n_in] :
       {std::pair<int64_t, int64_t>{48, 7168}, std::pair<int64_t, int64_t>{1040, 1536}}) {
    const SkinnyGemmPlan plan = PlanSkinnyGemm(n_out, n_in, 1, sms);
    SCOPED_TRACE(testing::Message() << n_out << "x" << n_in << " split " << plan.split);
    const int64_t n_max = kSkinnyMaxTokens;
    const auto w = cuda_test::RandomBf16(rng, n_out * n_in, 0.05f);
    const auto x = cuda_test::RandomBf16(rng, n_max * n_in, 1.0f);
    DeviceArray<uint16_t> d_w(w), d_x(x);
    DeviceArray<float> d_y(n_max * n_out);
    const size_t ws_bytes = SkinnyGemmWorkspaceBytes(plan);
    DeviceArray<uint8_t> ws(ws_bytes + 16);
    ASSERT_CUDA_OK(cudaMemset(ws.get(), 0, ws_bytes + 16));
    std::vector<float> all;
    for (const int64_t n : {n_max, int64_t{1}, int64_t{2}, int64_t{7}, int64_t{8}, int64_t{9},
                            int64_t{16}, int64_t{17}, int64_t{33}}) {
      SkinnyGemmArgs a;
      a.w = Bf16(d_w);
      a.ldw = n_in;
      a.x = Bf16(d_x);
      a.ldx = n_in;
      a.y = d_y.get();
      a.ldy = n_out;
      a.n_out = n_out;
      a.n_in = n_in;
      a.n_tokens = n;
      d_y.Poison();
      ASSERT_CUDA_OK(SkinnyGemm(a, plan, ws.get(), ws_bytes, nullptr));
      const std::vector<float> got = d_y.Download();
      if (n == n_max) {
        all = got;
        continue;
      }
      for (int64_t i = 0; i < n * n_out; ++i) {
        ASSERT_EQ(std::memcmp(&got[i], &all[i], sizeof(float)), 0)
            << "token " << i / n_out << " row " << i % n_out << " in a batch of " << n << ": "
            << got[i] << " vs " << all[i] << " in the batch of " << n_max;
      }
    }
  }
}

TEST_F(SkinnyGemmTest, RefusesWhatItCannotTake) {
  DeviceArray<uint16_t> d_w(64 * 80), d_x(64 * 80);
  DeviceArray<float> d_y(64 * 64);
  SkinnyGemmArgs a;
  a.w = Bf16(d_w);
  a.ldw = 80;
  a.x = Bf16(d_x);
  a.ldx = 80;
  a.y = d_y.get();
  a.ldy = 64;
  a.n_out = 64;
  a.n_in = 80;
  a.n_tokens = 4;
  ASSERT_EQ(SkinnyGemmUnsupportedReason(a), "");
  const SkinnyGemmPlan plan = PlanSkinnyGemm(64, 80, 1, 1);
  auto refused = [&](SkinnyGemmArgs b, const char* what) {
    SCOPED_TRACE(what);
    EXPECT_NE(SkinnyGemmUnsupportedReason(b), "");
    const SkinnyGemmPlan p = PlanSkinnyGemm(b.n_out, b.n_in, b.batch, 1);
    EXPECT_EQ(SkinnyGemm(b, p, nullptr, 0, nullptr), cudaErrorInvalidValue);
  };
  SkinnyGemmArgs b = a;
  b.n_tokens = 0;
  refused(b, "no tokens");
  b = a;
  b.n_tokens = kSkinnyMaxTokens + 1;
  refused(b, "too many tokens");
  b = a;
  b.n_in = 76;
  refused(b, "n_in not a multiple of 8");
  b = a;
  b.w = reinterpret_cast<const __nv_bfloat16*>(d_w.get() + 1);
  refused(b, "misaligned w");
  b = a;
  b.ldx = 84;
  refused(b, "ldx not a multiple of 8");
  // A plan for another shape, and a split plan without its workspace.
  EXPECT_EQ(SkinnyGemm(a, PlanSkinnyGemm(64, 160, 1, 1), nullptr, 0, nullptr),
            cudaErrorInvalidValue);
  const SkinnyGemmPlan split{64, 80, 1, 1, 2, 2, false};
  EXPECT_EQ(SkinnyGemm(a, split, nullptr, 0, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(SkinnyGemm(a, plan, nullptr, 0, nullptr), cudaSuccess);
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
}

// The plan: a function of the shape and SM count (never of the token count):
// a tile per block where rows are long, splits for few tiles and for long
// rows on few tiles per SM, and a workspace within ~192 KiB per SM.
TEST(SkinnyGemmPlanTest, SplitsFewTilesAndLongRowsWithinTheWorkspaceBound) {
  const SkinnyGemmPlan kv_a = PlanSkinnyGemm(576, 7168, 1, 132);  // 36 tiles of 224 k-steps
  EXPECT_EQ(kv_a.tiles_per_block, 1);
  EXPECT_EQ(kv_a.split, 14);     // min(ceil(4 * 132 / 36), 224 / 16)
  EXPECT_FALSE(kv_a.pipelined);  // 2 k-steps per warp
  EXPECT_GT(SkinnyGemmWorkspaceBytes(kv_a), SkinnyGemmCounterOffset(kv_a));
  // Rows of fewer than 256 k-steps on more than one tile per SM: one block per tile.
  for (const auto& [n_out, n_in] : {std::pair<int64_t, int64_t>{24576, 1536},    // q_b
                                    std::pair<int64_t, int64_t>{4096, 7168},     // shexp gate/up
                                    std::pair<int64_t, int64_t>{7168, 2048},     // shexp down
                                    std::pair<int64_t, int64_t>{8192, 7168}}) {  // head
    EXPECT_EQ(PlanSkinnyGemm(n_out, n_in, 1, 132).split, 1) << n_out << "x" << n_in;
    EXPECT_TRUE(PlanSkinnyGemm(n_out, n_in, 1, 132).pipelined) << n_out << "x" << n_in;
  }
  // Between half a tile and one tile per SM (rows of >= 128 k-steps): two parts.
  for (const auto& [n_out, n_in] : {std::pair<int64_t, int64_t>{1536, 7168},     // q_a: 96 tiles
                                    std::pair<int64_t, int64_t>{2112, 7168}}) {  // q_a + kv_a: 132
    EXPECT_EQ(PlanSkinnyGemm(n_out, n_in, 1, 132).split, 2) << n_out << "x" << n_in;
    EXPECT_TRUE(PlanSkinnyGemm(n_out, n_in, 1, 132).pipelined) << n_out << "x" << n_in;
  }
  EXPECT_EQ(PlanSkinnyGemm(1536, 2048, 1, 132).split, 1);  // 64 k-steps: one block per tile
  // Long rows (>= 256 k-steps) on fewer than 6 tiles per SM: parts of ~10
  // k-steps per warp (docs/performance.md, 2026-11-29), within the runner's
  // default workspace of 16 MiB; with 6 or more tiles per SM, one block each.
  const SkinnyGemmPlan attn_output = PlanSkinnyGemm(7168, 16384, 1, 132);  // 448 tiles, 512 steps
  EXPECT_EQ(attn_output.split, 6);
  EXPECT_TRUE(attn_output.pipelined);                       // 10 k-steps per warp
  EXPECT_EQ(PlanSkinnyGemm(7168, 18432, 1, 132).split, 7);  // dense down: 576 steps
  EXPECT_LE(SkinnyGemmWorkspaceBytes(PlanSkinnyGemm(7168, 18432, 1, 132)), size_t{16} << 20);
  EXPECT_EQ(PlanSkinnyGemm(7168, 16384, 1, 70).split, 1);
  const SkinnyGemmPlan gate_up = PlanSkinnyGemm(36864, 7168, 1, 132);  // 2304 tiles
  EXPECT_EQ(gate_up.split, 1);
  EXPECT_EQ(gate_up.tiles_per_block, 1);
  EXPECT_EQ(SkinnyGemmWorkspaceBytes(gate_up), 0u);
  const SkinnyGemmPlan k_b = PlanSkinnyGemm(512, 128, 128, 132);  // 4096 tiles of 4 steps
  EXPECT_EQ(k_b.split, 1);
  EXPECT_EQ(k_b.tiles_per_block, 8);
  const SkinnyGemmPlan v_b = PlanSkinnyGemm(128, 512, 128, 132);  // 16 steps: 4 warps a tile
  EXPECT_EQ(v_b.tiles_per_block, 2);
  for (const int n_sm : {1, 2, 16, 132, 264}) {
    for (const int64_t n_out : {1, 16, 100, 576, 1536, 7168, 36864}) {
      for (const int64_t n_in : {8, 128, 512, 2048, 7168, 18432}) {
        const SkinnyGemmPlan p = PlanSkinnyGemm(n_out, n_in, 1, n_sm);
        EXPECT_LE(SkinnyGemmCounterOffset(p), size_t{192 << 10} * n_sm + (16 << 10))
            << n_out << "x" << n_in << " on " << n_sm << " SMs";
        EXPECT_TRUE(p.split == 1 || p.tiles_per_block == 1);
      }
    }
  }
}

}  // namespace
}  // namespace ktx::kernels::cuda
