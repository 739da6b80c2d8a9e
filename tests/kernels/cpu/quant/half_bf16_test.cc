// Half and bfloat16 conversions: exhaustive over all 65536 encodings, against
// hand values, against references written from the IEEE definitions (nearest
// representable value found by search, ties to even) and, where the compiler
// has it, against _Float16.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/quant/quant.h"
#include "tests/kernels/cpu/quant/quant_test_util.h"

namespace ktx::kernels {
namespace {

using testing::SpecHalf;

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Nearest half by search over the sorted finite non-negative halves, ties to
// the even encoding, |x| >= 65520 (65504 + half an ulp) to Inf.
uint16_t SearchFloatToHalf(float f) {
  static const std::vector<double> kValues = [] {
    std::vector<double> v;
    for (uint32_t h = 0; h <= 0x7bff; ++h) v.push_back(SpecHalf(static_cast<uint16_t>(h)));
    return v;
  }();
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7c00;
  const auto it = std::lower_bound(kValues.begin(), kValues.end(), a);
  size_t hi = static_cast<size_t>(it - kValues.begin());
  if (hi == 0) return sign;
  if (hi == kValues.size()) return sign | 0x7bff;
  const size_t lo = hi - 1;
  const double dlo = a - kValues[lo];
  const double dhi = kValues[hi] - a;
  size_t pick = dlo < dhi ? lo : (dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi));
  return static_cast<uint16_t>(sign | pick);
}

// Nearest bf16: the two truncation candidates compared in double, ties to even.
uint16_t SearchFloatToBf16(float f) {
  const uint32_t u = Bits(f);
  const uint32_t lo = u & 0xffff0000u;
  const uint32_t hi = lo + 0x10000u;  // next magnitude (may be Inf)
  const double a = std::fabs(static_cast<double>(f));
  const double vlo = std::fabs(static_cast<double>(FromBits(lo)));
  // Upper candidate as the exact real value, even when it is Inf in float.
  const double vhi = (hi & 0x7fffffffu) >= 0x7f800000u
                         ? std::ldexp(1.0, 128)
                         : std::fabs(static_cast<double>(FromBits(hi)));
  const double dlo = a - vlo;
  const double dhi = vhi - a;
  const uint32_t pick = dlo < dhi ? lo : (dhi < dlo ? hi : (((lo >> 16) & 1u) == 0 ? lo : hi));
  return static_cast<uint16_t>(pick >> 16);
}

TEST(HalfTest, HandValues) {
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(HalfToFloat(0x3555), 0.333251953125f);
  EXPECT_EQ(HalfToFloat(0x7c00), INFINITY);
  EXPECT_EQ(HalfToFloat(0xfc00), -INFINITY);
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7c01)));
  EXPECT_EQ(Bits(HalfToFloat(0x8000)), 0x80000000u);

  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65519.99f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // tie, rounds to the even 2^16 = Inf
  EXPECT_EQ(FloatToHalf(-1e6f), 0xfc00);
  EXPECT_EQ(FloatToHalf(INFINITY), 0x7c00);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);          // tie -> even
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);      // tie -> even
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11) + 1e-7f), 0x3c01);  // above the tie
  EXPECT_EQ(FloatToHalf(1e-8f), 0x0000);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);      // tie -> even zero
  EXPECT_EQ(FloatToHalf(3e-8f), 0x0001);                      // just above the tie
  EXPECT_EQ(FloatToHalf(3 * std::ldexp(1.0f, -25)), 0x0002);  // tie 1.5 units -> 2
  EXPECT_EQ(FloatToHalf(std::ldexp(1023.5f, -24)), 0x0400);   // tie rounds up into the normals
  EXPECT_EQ(FloatToHalf(-std::ldexp(5.0f, -24)), 0x8005);
  EXPECT_EQ(FloatToHalf(0.1f), 0x2e66);
  const uint16_t nan = FloatToHalf(NAN);
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x3ff, 0);
  EXPECT_EQ(FloatToHalf(-NAN) & 0x8000, 0x8000);
  // A float NaN whose payload lives only in the low bits must stay NaN.
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(FromBits(0x7f800001u)))));
}

TEST(HalfTest, ExhaustiveDecodeAndRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t hh = static_cast<uint16_t>(h);
    const float f = HalfToFloat(hh);
    const double ref = SpecHalf(hh);
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;
      const uint16_t back = FloatToHalf(f);
      ASSERT_TRUE(std::isnan(HalfToFloat(back))) << std::hex << h;
      if (h & 0x200) {
        ASSERT_EQ(back, hh) << std::hex << h;  // quiet NaNs keep their bits
      }
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), ref) << std::hex << h;
    ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;
    ASSERT_EQ(FloatToHalf(f), hh) << std::hex << h;
  }
}

// Every midpoint between neighbouring halves (exactly representable in float),
// the floats either side of it, and a stride over all float bit patterns.
std::vector<float> HalfProbeFloats() {
  std::vector<float> probes;
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const double lo = SpecHalf(static_cast<uint16_t>(h));
    const double hi = h + 1 < 0x7c00 ? SpecHalf(static_cast<uint16_t>(h + 1)) : 65536.0;
    const float mid = static_cast<float>((lo + hi) / 2);
    EXPECT_EQ(static_cast<double>(mid), (lo + hi) / 2);
    for (float v :
         {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY), static_cast<float>(lo)}) {
      probes.push_back(v);
      probes.push_back(-v);
    }
  }
  for (uint64_t u = 0; u < (1ull << 32); u += 65537) {
    const float f = FromBits(static_cast<uint32_t>(u));
    if (!std::isnan(f)) probes.push_back(f);
  }
  return probes;
}

TEST(HalfTest, EncodeMatchesNearestSearch) {
  for (float f : HalfProbeFloats()) {
    ASSERT_EQ(FloatToHalf(f), SearchFloatToHalf(f)) << f << " bits " << std::hex << Bits(f);
  }
}

#if defined(__FLT16_MAX__)
TEST(HalfTest, EncodeMatchesCompilerFloat16) {
  for (float f : HalfProbeFloats()) {
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t bits;
    std::memcpy(&bits, &h, 2);
    ASSERT_EQ(FloatToHalf(f), bits) << f << " bits " << std::hex << Bits(f);
  }
}
#endif

TEST(Bf16Test, HandValues) {
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(0x4049), 3.140625f);
  EXPECT_EQ(Bf16ToFloat(0xc120), -10.0f);
  EXPECT_EQ(Bf16ToFloat(0x7f80), INFINITY);
  EXPECT_EQ(Bf16ToFloat(0x0001), std::ldexp(1.0f, -133));  // smallest subnormal
  EXPECT_TRUE(std::isnan(Bf16ToFloat(0x7fc0)));

  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(3.14159265f), 0x4049);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000u)), 0x3f80);  // tie -> even
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000u)), 0x3f82);  // tie -> even
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(FloatToBf16(FromBits(0x7f7fffffu)), 0x7f80);  // FLT_MAX rounds to Inf
  EXPECT_EQ(FloatToBf16(FromBits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(FloatToBf16(FromBits(0x00018000u)), 0x0002);  // subnormal tie -> even
  EXPECT_EQ(FloatToBf16(FromBits(0x00008000u)), 0x0000);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(-INFINITY), 0xff80);
  EXPECT_EQ(FloatToBf16(FromBits(0x7fc00000u)), 0x7fc0);
  // Signalling NaN with a payload only in the dropped bits stays NaN.
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(FromBits(0xff800001u)))));
  EXPECT_EQ(FloatToBf16(FromBits(0xff800001u)) & 0x8000, 0x8000);
}

TEST(Bf16Test, ExhaustiveRoundTrip) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t bb = static_cast<uint16_t>(b);
    const float f = Bf16ToFloat(bb);
    ASSERT_EQ(Bits(f), b << 16);
    if (std::isnan(f)) {
      const uint16_t back = FloatToBf16(f);
      ASSERT_TRUE(std::isnan(Bf16ToFloat(back))) << std::hex << b;
      if (b & 0x40) {
        ASSERT_EQ(back, bb) << std::hex << b;  // quiet NaNs keep their bits
      }
      continue;
    }
    ASSERT_EQ(FloatToBf16(f), bb) << std::hex << b;
  }
}

TEST(Bf16Test, EncodeMatchesNearestSearch) {
  std::vector<float> probes;
  for (uint32_t b = 0; b < 0x7f80; ++b) {
    for (uint32_t low : {0x0000u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      probes.push_back(FromBits((b << 16) | low));
      probes.push_back(FromBits(0x80000000u | (b << 16) | low));
    }
  }
  for (uint64_t u = 0; u < (1ull << 32); u += 65521) {
    const float f = FromBits(static_cast<uint32_t>(u));
    if (!std::isnan(f)) probes.push_back(f);
  }
  for (float f : probes) {
    ASSERT_EQ(FloatToBf16(f), SearchFloatToBf16(f)) << f << " bits " << std::hex << Bits(f);
  }
}

}  // namespace
}  // namespace ktx::kernels
