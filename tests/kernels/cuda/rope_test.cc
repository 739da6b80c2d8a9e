// YaRN rope on the GPU against the CPU reference (reference_ops RopeAngles +
// ApplyRope) with DeepSeek-V3's constants, at positions up to the trained
// context. Both compute angles and rotations in double and round once to
// float, so they agree to a float ulp or two.
#include "kernels/cuda/rope.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/models/reference_ops.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::DeviceArray;

// DeepSeek-V3: n_rot 64, base 10000, YaRN factor 40 over 4096 tokens, beta 32 / 1.
models::RopeYarnParams Dsv3Rope() {
  models::RopeYarnParams p;
  p.n_rot = 64;
  p.freq_base = 10000.0;
  p.freq_scale = 1.0 / 40.0;
  p.ext_factor = 1.0;
  p.attn_factor = 1.0 / (1.0 + 0.1 * std::log(40.0));
  p.SetCorrDims(4096, 32.0, 1.0);
  return p;
}

RopeParams ToGpu(const models::RopeYarnParams& p) {
  RopeParams g;
  g.n_rot = static_cast<int32_t>(p.n_rot);
  g.freq_base = p.freq_base;
  g.freq_scale = p.freq_scale;
  g.ext_factor = p.ext_factor;
  g.attn_factor = p.attn_factor;
  g.corr_low = p.corr_low;
  g.corr_high = p.corr_high;
  return g;
}

TEST(Rope, MatchesCpuReference) {
  KTX_SKIP_WITHOUT_GPU();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  models::RopeYarnParams linear;  // no YaRN: the plain path
  linear.n_rot = 16;
  linear.freq_base = 500000.0;
  for (const models::RopeYarnParams& p : {Dsv3Rope(), linear}) {
    for (const int64_t n_tokens : {1, 3, 17}) {
      const int32_t n_heads = 3;
      const int64_t head_stride = p.n_rot + 10;  // rope part followed by other data
      const int64_t token_stride = n_heads * head_stride + 1;
      std::vector<int32_t> pos(n_tokens);
      for (int64_t t = 0; t < n_tokens; ++t) pos[t] = static_cast<int32_t>(rng() % 163840);
      pos[0] = 0;
      if (n_tokens > 2) pos[1] = 163839, pos[2] = 1;
      std::vector<float> x = cuda_test::RandomF32(rng, n_tokens * token_stride, 1.0f);
      DeviceArray<float> d_x(x);
      DeviceArray<int32_t> d_pos(pos);
      ASSERT_CUDA_OK(RopeInPlace(ToGpu(p), d_pos.get(), d_x.get(), n_tokens, token_stride, n_heads,
                                 head_stride, nullptr));
      const std::vector<float> got = d_x.Download();
      std::vector<double> c(p.n_rot / 2), s(p.n_rot / 2);
      for (int64_t t = 0; t < n_tokens; ++t) {
        models::RopeAngles(p, pos[t], c.data(), s.data());
        for (int32_t h = 0; h < n_heads; ++h) {
          float* want = x.data() + t * token_stride + h * head_stride;
          const float* have = got.data() + t * token_stride + h * head_stride;
          std::vector<float> orig(want, want + head_stride);
          models::ApplyRope(c.data(), s.data(), p.n_rot, want);
          for (int64_t i = 0; i < head_stride; ++i) {
            const double tol =
                3e-7 * (std::fabs(orig[i & ~int64_t{1}]) + std::fabs(orig[i | 1])) + 1e-30;
            ASSERT_NEAR(have[i], want[i], i < p.n_rot ? tol : 0.0)
                << "token " << t << " pos " << pos[t] << " head " << h << " i " << i;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace ktx::kernels::cuda
