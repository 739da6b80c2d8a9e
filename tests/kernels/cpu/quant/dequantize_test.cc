// Hand-built blocks with known contents for every supported type. The bytes
// are written here from the layout spec (../shared/notes/GGUF.md section 2;
// scale bytes as literal hex worked out by hand) and the expected floats are
// computed per element from the chosen integers, not from the bytes, so a
// packing or bit-order error in either direction fails.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/quant/blocks.h"
#include "kernels/cpu/quant/quant.h"

namespace ktx::kernels {
namespace {

constexpr int kIq4[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

void StoreU16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v & 0xff);
  p[1] = static_cast<uint8_t>(v >> 8);
}

// Dequantizes `bytes` (n elements of `type`) and checks against `expected`
// exactly; also checks that DotRowReference against a one-hot-free ramp
// equals the float64 dot of the expected values.
void ExpectRow(TensorType type, const std::vector<uint8_t>& bytes,
               const std::vector<double>& expected) {
  const int64_t n = static_cast<int64_t>(expected.size());
  ASSERT_EQ(static_cast<int64_t>(bytes.size()), RowBytes(TraitsOf(type), n));
  std::vector<float> y(expected.size());
  DequantizeRow(type, bytes.data(), y.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(static_cast<double>(y[i]), expected[i]) << TraitsOf(type).name << " element " << i;
  }
  std::vector<float> x(expected.size());
  double ref = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>((i % 13) - 6) * 0.25f;
    ref += expected[i] * x[i];
  }
  EXPECT_DOUBLE_EQ(DotRowReference(type, bytes.data(), x.data(), n), ref);
}

TEST(DequantizeTest, F32F16Bf16) {
  const float f32[5] = {1.5f, -0.0f, 3.0e-41f, -65504.0f, 123.456f};
  std::vector<uint8_t> bytes(sizeof(f32));
  std::memcpy(bytes.data(), f32, sizeof(f32));
  ExpectRow(TensorType::kF32, bytes,
            {1.5, -0.0, static_cast<double>(3.0e-41f), -65504.0, static_cast<double>(123.456f)});

  // F16: 1, -2, 65504, 2^-24, 2^-14, 0.333251953125, -0.
  const uint16_t f16[7] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x0400, 0x3555, 0x8000};
  bytes.assign(14, 0);
  for (int i = 0; i < 7; ++i) StoreU16(bytes.data() + 2 * i, f16[i]);
  ExpectRow(TensorType::kF16, bytes,
            {1.0, -2.0, 65504.0, std::ldexp(1.0, -24), std::ldexp(1.0, -14), 0.333251953125, 0.0});

  // BF16: 1, 3.140625, -10, 2^-133, -2^127.
  const uint16_t bf16[5] = {0x3f80, 0x4049, 0xc120, 0x0001, 0xff00};
  bytes.assign(10, 0);
  for (int i = 0; i < 5; ++i) StoreU16(bytes.data() + 2 * i, bf16[i]);
  ExpectRow(TensorType::kBF16, bytes,
            {1.0, 3.140625, -10.0, std::ldexp(1.0, -133), -std::ldexp(1.0, 127)});
}

TEST(DequantizeTest, Q8_0) {
  // Three blocks: d = 0.5, d = -1, d = 2^-24 (subnormal half).
  const uint16_t d_bits[3] = {0x3800, 0xbc00, 0x0001};
  const double d_val[3] = {0.5, -1.0, std::ldexp(1.0, -24)};
  std::vector<uint8_t> bytes(3 * 34);
  std::vector<double> expected;
  for (int b = 0; b < 3; ++b) {
    uint8_t* p = bytes.data() + 34 * b;
    StoreU16(p, d_bits[b]);
    for (int j = 0; j < 32; ++j) {
      const int q = j == 0 ? -128 : (j == 1 ? 127 : ((j * 37 + 11 * b) % 255) - 127);
      p[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(q));
      expected.push_back(q * d_val[b]);
    }
  }
  ExpectRow(TensorType::kQ8_0, bytes, expected);
}

TEST(DequantizeTest, Q4_0) {
  // Literal block: d = 2; qs[0] = 0x80 -> y[0] = (0-8)*2 = -16, y[16] = (8-8)*2 = 0;
  // qs[1] = 0x0f -> y[1] = 14, y[17] = -16; other bytes 0x88 -> 0.
  std::vector<uint8_t> bytes(18, 0x88);
  StoreU16(bytes.data(), 0x4000);
  bytes[2] = 0x80;
  bytes[3] = 0x0f;
  std::vector<double> expected(32, 0.0);
  expected[0] = -16.0;
  expected[1] = 14.0;
  expected[17] = -16.0;
  ExpectRow(TensorType::kQ4_0, bytes, expected);

  // Seven blocks with patterned quants: element j < 16 is the low nibble of
  // qs[j], element j >= 16 the high nibble of qs[j - 16].
  bytes.assign(7 * 18, 0);
  expected.clear();
  for (int b = 0; b < 7; ++b) {
    uint8_t* p = bytes.data() + 18 * b;
    const double d = 0.125 * (b + 1) * (b % 2 ? -1 : 1);
    StoreU16(p, static_cast<uint16_t>(FloatToHalf(static_cast<float>(d))));
    for (int e = 0; e < 32; ++e) {
      const int q = (e * 7 + b * 3) % 16;
      p[2 + e % 16] |= static_cast<uint8_t>(e < 16 ? q : q << 4);
      expected.push_back((q - 8) * d);
    }
  }
  ExpectRow(TensorType::kQ4_0, bytes, expected);
}

TEST(DequantizeTest, Q5_0) {
  // Literal block: d = 1, all nibbles 0, qh = bytes {0x01, 0x00, 0x01, 0x80}
  // = bits 0, 16, 31 -> elements 0, 16, 31 are (16 - 16) = 0, the rest -16.
  std::vector<uint8_t> bytes(22, 0);
  StoreU16(bytes.data(), 0x3c00);
  bytes[2] = 0x01;
  bytes[4] = 0x01;
  bytes[5] = 0x80;
  std::vector<double> expected(32, -16.0);
  expected[0] = expected[16] = expected[31] = 0.0;
  ExpectRow(TensorType::kQ5_0, bytes, expected);

  // Three patterned blocks: bit e of the little-endian u32 qh is the 5th bit of element e.
  bytes.assign(3 * 22, 0);
  expected.clear();
  for (int b = 0; b < 3; ++b) {
    uint8_t* p = bytes.data() + 22 * b;
    const double d = 0.25 + b;
    StoreU16(p, FloatToHalf(static_cast<float>(d)));
    for (int e = 0; e < 32; ++e) {
      const int q = (e * 13 + 2 + 5 * b) % 32;
      p[6 + e % 16] |= static_cast<uint8_t>(e < 16 ? (q & 15) : (q & 15) << 4);
      p[2 + e / 8] |= static_cast<uint8_t>((q >> 4) << (e % 8));
      expected.push_back((q - 16) * d);
    }
  }
  ExpectRow(TensorType::kQ5_0, bytes, expected);
}

// Q4_K / Q5_K scales for sc = {1, 17, 33, 63, 5, 40, 18, 63},
// m = {2, 0, 63, 31, 48, 7, 16, 33}, packed by hand:
//   bytes 0-3  = sc[j] | (sc[j+4] >> 4) << 6   = 01 91 61 ff
//   bytes 4-7  = m[j]  | (m[j+4]  >> 4) << 6   = c2 00 7f 9f
//   bytes 8-11 = (sc[j+4] & 15) | (m[j+4] & 15) << 4 = 05 78 02 1f
constexpr int kSc[8] = {1, 17, 33, 63, 5, 40, 18, 63};
constexpr int kM[8] = {2, 0, 63, 31, 48, 7, 16, 33};
constexpr uint8_t kScales[12] = {0x01, 0x91, 0x61, 0xff, 0xc2, 0x00,
                                 0x7f, 0x9f, 0x05, 0x78, 0x02, 0x1f};

struct KBlockParams {
  uint16_t d_bits, dmin_bits;
  double d, dmin;
};
constexpr KBlockParams kKBlocks[3] = {
    {0x3800, 0x3400, 0.5, 0.25}, {0x3e00, 0x3000, 1.5, 0.125}, {0x0400, 0x3c00, 1.0 / 16384, 1.0}};

TEST(DequantizeTest, Q4_K) {
  std::vector<uint8_t> bytes(3 * 144, 0);
  std::vector<double> expected;
  for (int b = 0; b < 3; ++b) {
    uint8_t* p = bytes.data() + 144 * b;
    StoreU16(p, kKBlocks[b].d_bits);
    StoreU16(p + 2, kKBlocks[b].dmin_bits);
    std::memcpy(p + 4, kScales, 12);
    for (int i = 0; i < 256; ++i) {
      const int q = (i * (7 + 2 * b) + 3) % 16;
      // 64-element chunk c uses qs[32c .. 32c+31]: low nibbles first, then high.
      const int c = i / 64;
      const int l = i % 64;
      p[16 + 32 * c + l % 32] |= static_cast<uint8_t>(l < 32 ? q : q << 4);
      const int j = i / 32;
      expected.push_back(kKBlocks[b].d * kSc[j] * q - kKBlocks[b].dmin * kM[j]);
    }
  }
  ExpectRow(TensorType::kQ4_K, bytes, expected);
}

TEST(DequantizeTest, Q5_K) {
  std::vector<uint8_t> bytes(3 * 176, 0);
  std::vector<double> expected;
  for (int b = 0; b < 3; ++b) {
    uint8_t* p = bytes.data() + 176 * b;
    StoreU16(p, kKBlocks[b].d_bits);
    StoreU16(p + 2, kKBlocks[b].dmin_bits);
    std::memcpy(p + 4, kScales, 12);
    uint8_t* qh = p + 16;
    uint8_t* qs = p + 48;
    for (int i = 0; i < 256; ++i) {
      const int q = (i * (11 + 2 * b) + 5) % 32;
      const int c = i / 64;
      const int l = i % 64;
      qs[32 * c + l % 32] |= static_cast<uint8_t>(l < 32 ? (q & 15) : (q & 15) << 4);
      // 5th bit: qh[l % 32] bit 2c for the low half of chunk c, bit 2c+1 for the high half.
      qh[l % 32] |= static_cast<uint8_t>((q >> 4) << (2 * c + (l < 32 ? 0 : 1)));
      const int j = i / 32;
      expected.push_back(kKBlocks[b].d * kSc[j] * q - kKBlocks[b].dmin * kM[j]);
    }
  }
  ExpectRow(TensorType::kQ5_K, bytes, expected);
}

TEST(DequantizeTest, Q6_K) {
  const int8_t sc[16] = {-128, -1, 0, 1, 127, 5, -7, 33, 64, -64, 2, 3, 100, -100, 11, 13};
  const uint16_t d_bits[3] = {0x3400, 0xb800, 0x2e66};
  std::vector<uint8_t> bytes(3 * 210, 0);
  std::vector<double> expected;
  for (int b = 0; b < 3; ++b) {
    uint8_t* p = bytes.data() + 210 * b;
    uint8_t* ql = p;
    uint8_t* qh = p + 128;
    std::memcpy(p + 192, sc, 16);
    StoreU16(p + 208, d_bits[b]);  // d is the last field
    const double d = HalfToFloat(d_bits[b]);
    for (int i = 0; i < 256; ++i) {
      const int q = (i * (11 + 4 * b) + 5) % 64;
      // 128-element half h; within it, group g of 32 selects the ql byte
      // (l or l+32), the nibble (g >= 2: high) and the qh bit pair 2g.
      const int h = i / 128;
      const int g = (i % 128) / 32;
      const int l = i % 32;
      ql[64 * h + l + (g % 2) * 32] |= static_cast<uint8_t>(g < 2 ? (q & 15) : (q & 15) << 4);
      qh[32 * h + l] |= static_cast<uint8_t>((q >> 4) << (2 * g));
      const int scale = sc[8 * h + l / 16 + 2 * g];
      expected.push_back(static_cast<double>(static_cast<float>(d * scale)) * (q - 32));
    }
  }
  ExpectRow(TensorType::kQ6_K, bytes, expected);
}

TEST(DequantizeTest, IQ4_XS) {
  // ls = {0, 63, 32, 31, 33, 17, 48, 1}: scales_l = low nibbles in pairs
  // (f0 f0 11 10), scales_h = top 2 bits at 2*ib = 0x366c.
  const int ls[8] = {0, 63, 32, 31, 33, 17, 48, 1};
  const uint8_t scales_l[4] = {0xf0, 0xf0, 0x11, 0x10};
  const uint16_t d_bits[2] = {0x3000, 0xc400};  // 0.125, -4
  std::vector<uint8_t> bytes(2 * 136, 0);
  std::vector<double> expected;
  for (int b = 0; b < 2; ++b) {
    uint8_t* p = bytes.data() + 136 * b;
    StoreU16(p, d_bits[b]);
    StoreU16(p + 2, 0x366c);
    std::memcpy(p + 4, scales_l, 4);
    const double d = HalfToFloat(d_bits[b]);
    for (int i = 0; i < 256; ++i) {
      const int q = (i * (3 + 2 * b) + 7) % 16;
      const int ib = i / 32;
      const int e = i % 32;
      p[8 + 16 * ib + e % 16] |= static_cast<uint8_t>(e < 16 ? q : q << 4);
      expected.push_back(d * (ls[ib] - 32) * kIq4[q]);
    }
  }
  ExpectRow(TensorType::kIQ4_XS, bytes, expected);
}

TEST(DequantizeTest, Q8_KActivationBlock) {
  std::vector<uint8_t> bytes(2 * 292, 0);
  std::vector<double> expected;
  const float d[2] = {0.01f, -3.5f};
  for (int b = 0; b < 2; ++b) {
    uint8_t* p = bytes.data() + 292 * b;
    std::memcpy(p, &d[b], 4);
    for (int i = 0; i < 256; ++i) {
      const int q = (i * 29 + b) % 255 - 127;
      p[4 + i] = static_cast<uint8_t>(static_cast<int8_t>(q));
      expected.push_back(static_cast<double>(static_cast<float>(q) * d[b]));
    }
  }
  ExpectRow(TensorType::kQ8_K, bytes, expected);
}

TEST(DequantizeTest, CanDequantizeMatchesSupportedTypes) {
  for (TensorType t : {TensorType::kF32, TensorType::kF16, TensorType::kBF16, TensorType::kQ8_0,
                       TensorType::kQ4_0, TensorType::kQ5_0, TensorType::kQ4_K, TensorType::kQ5_K,
                       TensorType::kQ6_K, TensorType::kIQ4_XS}) {
    EXPECT_TRUE(CanDequantize(t)) << TraitsOf(t).name;
  }
  for (TensorType t : {TensorType::kQ4_1, TensorType::kQ2_K, TensorType::kQ8_K,
                       TensorType::kIQ2_XXS, TensorType::kI32}) {
    EXPECT_FALSE(CanDequantize(t)) << TraitsOf(t).name;
  }
}

TEST(DequantizeTest, BlockSizesMatchTraits) {
  EXPECT_EQ(TraitsOf(TensorType::kQ4_0).type_size, static_cast<int64_t>(sizeof(BlockQ4_0)));
  EXPECT_EQ(TraitsOf(TensorType::kQ5_0).type_size, static_cast<int64_t>(sizeof(BlockQ5_0)));
  EXPECT_EQ(TraitsOf(TensorType::kQ8_0).type_size, static_cast<int64_t>(sizeof(BlockQ8_0)));
  EXPECT_EQ(TraitsOf(TensorType::kQ4_K).type_size, static_cast<int64_t>(sizeof(BlockQ4K)));
  EXPECT_EQ(TraitsOf(TensorType::kQ5_K).type_size, static_cast<int64_t>(sizeof(BlockQ5K)));
  EXPECT_EQ(TraitsOf(TensorType::kQ6_K).type_size, static_cast<int64_t>(sizeof(BlockQ6K)));
  EXPECT_EQ(TraitsOf(TensorType::kQ8_K).type_size, static_cast<int64_t>(sizeof(BlockQ8K)));
  EXPECT_EQ(TraitsOf(TensorType::kIQ4_XS).type_size, static_cast<int64_t>(sizeof(BlockIQ4XS)));
  EXPECT_EQ(offsetof(BlockQ6K, d), 208u);
  EXPECT_EQ(offsetof(BlockQ8K, bsums), 260u);
  EXPECT_EQ(offsetof(BlockQ5K, qs), 48u);
}

}  // namespace
}  // namespace ktx::kernels
