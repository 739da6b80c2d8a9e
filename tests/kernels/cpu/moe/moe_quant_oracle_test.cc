// The MoE kernels against ktx_quant (kernels/cpu/quant, written independently
// from GGUF.md): block decoding (GGUF and panel16 layouts) equals
// DequantizeRow bitwise, the Q8_K activation quantizer equals QuantizeRowQ8K
// bitwise, and every variant's row dot products match DotRowQuantizedReference.
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/moe/moe_internal.h"
#include "kernels/cpu/quant/quant.h"
#include "tests/kernels/cpu/moe/moe_test_util.h"

namespace ktx::kernels::moe {
namespace {

constexpr TensorType kTypes[] = {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K,
                                 TensorType::kQ8_0, TensorType::kBF16};

TEST(MoeQuantOracleTest, DecodersEqualDequantizeRow) {
  std::mt19937 rng(41);
  for (TensorType t : kTypes) {
    SCOPED_TRACE(TraitsOf(t).name);
    const int64_t rows = 16, k = 512;
    const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
    const auto panel = testing::MakeLayout({m}, t, MoeWeightLayout::kPanel16, rows, k, {true});
    const MoeMatrixFormat f{t, MoeWeightLayout::kPanel16};
    const int64_t kb = KBlock(f);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* row = m.data() + r * GgufRowBytes(t, k);
      std::vector<float> ref(k);
      DequantizeRow(t, row, ref.data(), k);
      for (int64_t b = 0; b < k / kb; ++b) {
        const uint8_t* pb = static_cast<const uint8_t*>(panel.ptrs[0]) + b * PanelBlockBytes(f);
        const int rr = static_cast<int>(r);
        for (int i = 0; i < kb; ++i) {
          float gguf_v = 0, panel_v = 0;
          if (t == TensorType::kQ8_0) {
            const GgufQ8_0& blk = reinterpret_cast<const GgufQ8_0*>(row)[b];
            gguf_v = HalfToFloatScalar(blk.d) * static_cast<float>(blk.qs[i]);
            float d;
            int8_t q[32];
            DecodePanelQ80(pb, rr, &d, q);
            panel_v = d * static_cast<float>(q[i]);
          } else if (t == TensorType::kBF16) {
            uint16_t bits;
            std::memcpy(&bits, row + 2 * (b * kb + i), 2);
            gguf_v = Bf16Bits(bits);
            uint16_t w[32];
            DecodePanelBf16(pb, rr, w);
            panel_v = Bf16Bits(w[i]);
          } else {
            DecodedK g, p;
            if (t == TensorType::kQ4_K) {
              DecodeQ4K(reinterpret_cast<const GgufQ4K*>(row)[b], &g);
            } else if (t == TensorType::kQ5_K) {
              DecodeQ5K(reinterpret_cast<const GgufQ5K*>(row)[b], &g);
            } else {
              DecodeQ6K(reinterpret_cast<const GgufQ6K*>(row)[b], &g);
            }
            if (t == TensorType::kQ6_K) {
              DecodePanelQ6K(pb, rr, &p);
            } else {
              DecodePanelQ4K(pb, rr, t == TensorType::kQ5_K, &p);
            }
            gguf_v = DecodedKValue(g, t, i);
            panel_v = DecodedKValue(p, t, i);
          }
          ASSERT_EQ(gguf_v, ref[b * kb + i]) << "row " << r << " element " << b * kb + i;
          ASSERT_EQ(panel_v, ref[b * kb + i]) << "row " << r << " element " << b * kb + i;
        }
      }
    }
  }
}

TEST(MoeQuantOracleTest, Q8KActivationsEqualQuantizeRowQ8K) {
  std::mt19937 rng(42);
  std::normal_distribution<float> n(0.0f, 3.0f);
  std::vector<float> x(1024);
  for (float& v : x) v = n(rng);
  std::fill(x.begin() + 512, x.begin() + 768, 0.0f);
  std::vector<BlockQ8K> ref(4);
  QuantizeRowQ8K(x.data(), ref.data(), 1024);
  for (CpuVariant v : kAllCpuVariants) {
    if (!HostSupportsCpuVariant(v)) continue;
    SCOPED_TRACE(CpuVariantName(v));
    std::vector<ActQ8K> mine(4);
    MoeKernelsFor(v).quantize(ActFormat::kQ8K, x.data(), reinterpret_cast<uint8_t*>(mine.data()),
                              1024);
    for (int b = 0; b < 4; ++b) {
      EXPECT_EQ(mine[b].d, ref[b].d) << b;
      EXPECT_EQ(0, std::memcmp(mine[b].qs, ref[b].qs, 256)) << b;
      for (int j = 0; j < 16; ++j) EXPECT_EQ(mine[b].neg32_bsum16[j], -32 * ref[b].bsums[j]);
      for (int j = 0; j < 8; ++j)
        EXPECT_EQ(mine[b].bsum32[j], ref[b].bsums[2 * j] + ref[b].bsums[2 * j + 1]);
    }
  }
}

TEST(MoeQuantOracleTest, RowDotsMatchDotRowQuantizedReference) {
  std::mt19937 rng(43);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const int64_t rows = 32, k = 768;
  std::vector<float> x(k);
  for (float& v : x) v = n(rng);
  for (TensorType t : {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K}) {
    const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
    std::vector<BlockQ8K> xq(k / 256);
    QuantizeRowQ8K(x.data(), xq.data(), k);
    std::vector<double> ref(rows);
    for (int64_t r = 0; r < rows; ++r) {
      ref[r] = DotRowQuantizedReference(t, m.data() + r * GgufRowBytes(t, k), xq.data(), k);
    }
    for (MoeWeightLayout layout : {MoeWeightLayout::kGguf, MoeWeightLayout::kPanel16}) {
      const auto w = testing::MakeLayout({m}, t, layout, rows, k, {true});
      for (CpuVariant v : kAllCpuVariants) {
        if (!HostSupportsCpuVariant(v)) continue;
        SCOPED_TRACE(::testing::Message() << TraitsOf(t).name << " " << MoeWeightLayoutName(layout)
                                          << " " << CpuVariantName(v));
        const MoeKernels& kern = MoeKernelsFor(v);
        std::vector<ActQ8K> act(k / 256);
        kern.quantize(ActFormat::kQ8K, x.data(), reinterpret_cast<uint8_t*>(act.data()), k);
        MatmulArgs a;
        a.format = {t, layout};
        a.w = static_cast<const uint8_t*>(w.ptrs[0]);
        a.n_rows = rows;
        a.k = k;
        a.row_begin = 0;
        a.row_end = rows;
        a.act = reinterpret_cast<const uint8_t*>(act.data());
        a.act_stride = ActRowBytes(ActFormat::kQ8K, k);
        a.n_act = 1;
        std::vector<float> y(rows);
        a.out = y.data();
        a.out_stride = rows;
        kern.matmul(a);
        double scale = 0;
        for (double v2 : ref) scale = std::max(scale, std::fabs(v2));
        for (int64_t r = 0; r < rows; ++r) EXPECT_NEAR(y[r], ref[r], 2e-6 * scale) << "row " << r;
      }
    }
  }
}

}  // namespace
}  // namespace ktx::kernels::moe
