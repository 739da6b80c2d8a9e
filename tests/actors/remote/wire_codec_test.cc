// The ExpertShard tensor codec (actors/remote/wire_codec.h):
//  - F32 round trips are bit-exact on awkward shapes, NaN, Inf and subnormals
//    included; row gathering sends exactly the asked rows in order;
//  - BF16 encoding equals kernels::FloatToBf16 (the quantizer's independent
//    converter) on a sweep of bit patterns, and decoding its inverse;
//  - malformed tensors are refused with InvalidArgument naming the field,
//    before anything is allocated from their sizes.
#include "actors/remote/wire_codec.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/quant/quant.h"

namespace ktx::actors {
namespace {

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

models::Activations Random(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> bits;
  models::Activations a(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i) a.data()[i] = FromBits(bits(rng));
  // A few special values at known places.
  a.data()[0] = std::numeric_limits<float>::quiet_NaN();
  if (rows * cols > 3) {
    a.data()[1] = -std::numeric_limits<float>::infinity();
    a.data()[2] = std::numeric_limits<float>::denorm_min();
    a.data()[3] = -0.0f;
  }
  return a;
}

TEST(WireCodecTest, F32RoundTripIsBitExact) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {1, 111}, {19, 256}, {16, 7168}}) {
    const models::Activations a = Random(rows, cols, static_cast<uint32_t>(rows * 31 + cols));
    ktx::v1::WireTensor t;
    EncodeTensor(a, WireDtype::kF32, &t);
    EXPECT_EQ(t.dtype(), ktx::v1::WIRE_DTYPE_F32);
    ASSERT_EQ(t.shape_size(), 2);
    EXPECT_EQ(t.shape(0), rows);
    EXPECT_EQ(t.shape(1), cols);
    EXPECT_EQ(t.data().size(), static_cast<size_t>(rows * cols * 4));
    models::Activations back;
    ASSERT_TRUE(DecodeTensor(t, "h", {.n_cols = cols}, &back).ok());
    ASSERT_EQ(back.n_tokens(), rows);
    ASSERT_EQ(back.n_cols(), cols);
    for (int64_t i = 0; i < rows * cols; ++i) {
      ASSERT_EQ(Bits(back.data()[i]), Bits(a.data()[i])) << "element " << i;
    }
  }
}

TEST(WireCodecTest, EncodeRowsGathersTheAskedRowsInOrder) {
  const models::Activations a = Random(19, 111, 7);
  const std::vector<int32_t> rows = {18, 0, 5, 5, 11};
  for (WireDtype dtype : {WireDtype::kF32, WireDtype::kBf16}) {
    ktx::v1::WireTensor t;
    EncodeRows(a, rows, dtype, &t);
    models::Activations back;
    ASSERT_TRUE(DecodeTensor(t, "h", {.n_cols = 111}, &back).ok());
    ASSERT_EQ(back.n_tokens(), static_cast<int64_t>(rows.size()));
    for (size_t j = 0; j < rows.size(); ++j) {
      for (int64_t c = 0; c < 111; ++c) {
        const float want = a.row(rows[j])[c];
        const float expect =
            dtype == WireDtype::kF32 ? want : kernels::Bf16ToFloat(kernels::FloatToBf16(want));
        ASSERT_EQ(Bits(back.row(static_cast<int64_t>(j))[c]), Bits(expect))
            << WireDtypeName(dtype) << " row " << j << " col " << c;
      }
    }
  }
}

TEST(WireCodecTest, Bf16MatchesTheQuantizersConverter) {
  // Every 2^12-th bit pattern plus the neighbourhood of ties and specials.
  std::vector<uint32_t> patterns;
  for (uint64_t b = 0; b <= 0xffffffffull; b += 4093) patterns.push_back(static_cast<uint32_t>(b));
  for (uint32_t base : {0x3f800000u, 0x7f7f0000u, 0x7f800000u, 0x00010000u, 0xff800000u}) {
    for (uint32_t d = 0; d < 0x20000u; d += 0x1001u) {
      patterns.push_back(base + d);
      patterns.push_back(base - d);
    }
    patterns.push_back(base | 0x8000u);  // an exact tie
    patterns.push_back(base | 0x18000u);
  }
  models::Activations a(1, static_cast<int64_t>(patterns.size()));
  for (size_t i = 0; i < patterns.size(); ++i) a.data()[i] = FromBits(patterns[i]);
  ktx::v1::WireTensor t;
  EncodeTensor(a, WireDtype::kBf16, &t);
  EXPECT_EQ(t.dtype(), ktx::v1::WIRE_DTYPE_BF16);
  ASSERT_EQ(t.data().size(), patterns.size() * 2);
  models::Activations back;
  ASSERT_TRUE(DecodeTensor(t, "h", {.max_cols = int64_t{1} << 22}, &back).ok());
  for (size_t i = 0; i < patterns.size(); ++i) {
    uint16_t wire;
    std::memcpy(&wire, t.data().data() + 2 * i, 2);
    const uint16_t want = kernels::FloatToBf16(FromBits(patterns[i]));
    ASSERT_EQ(wire, want) << std::hex << patterns[i];
    ASSERT_EQ(Bits(back.data()[i]), Bits(kernels::Bf16ToFloat(want))) << std::hex << patterns[i];
    ASSERT_EQ(Bits(RoundToWireBf16(FromBits(patterns[i]))), Bits(kernels::Bf16ToFloat(want)));
  }
}

ktx::v1::WireTensor Valid(int64_t rows, int64_t cols) {
  ktx::v1::WireTensor t;
  EncodeTensor(Random(rows, cols, 1), WireDtype::kF32, &t);
  return t;
}

void ExpectInvalid(const ktx::v1::WireTensor& t, const DecodeLimits& limits,
                   const std::string& field) {
  models::Activations out;
  const absl::Status s = DecodeTensor(t, "parts[3].h", limits, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(field), std::string::npos) << s << " should name " << field;
}

TEST(WireCodecTest, MalformedTensorsNameTheField) {
  const DecodeLimits limits{.n_cols = 8, .min_rows = 1, .max_rows = 64};
  ktx::v1::WireTensor t = Valid(4, 8);
  t.set_dtype(ktx::v1::WIRE_DTYPE_UNSPECIFIED);
  ExpectInvalid(t, limits, "parts[3].h.dtype");
  t.set_dtype(static_cast<ktx::v1::WireDtype>(77));
  ExpectInvalid(t, limits, "parts[3].h.dtype");

  t = Valid(4, 8);
  t.add_shape(1);
  ExpectInvalid(t, limits, "parts[3].h.shape");
  t.clear_shape();
  t.add_shape(32);
  ExpectInvalid(t, limits, "parts[3].h.shape");

  t = Valid(4, 8);
  t.set_shape(1, 7);
  ExpectInvalid(t, limits, "parts[3].h.shape[1]");
  t = Valid(4, 8);
  t.set_shape(0, 0);
  ExpectInvalid(t, limits, "parts[3].h.shape[0]");
  t.set_shape(0, -3);
  ExpectInvalid(t, limits, "parts[3].h.shape[0]");
  t.set_shape(0, 65);
  ExpectInvalid(t, limits, "parts[3].h.shape[0]");
  // Huge extents whose product would overflow: refused by the limits, no allocation.
  t.set_shape(0, int64_t{1} << 40);
  ExpectInvalid(t, limits, "parts[3].h.shape[0]");
  t = Valid(4, 8);
  t.set_shape(1, int64_t{1} << 40);
  ExpectInvalid(t, {.n_cols = -1}, "parts[3].h.shape[1]");

  t = Valid(4, 8);
  t.mutable_data()->pop_back();
  ExpectInvalid(t, limits, "parts[3].h.data");
  t = Valid(4, 8);
  t.set_dtype(ktx::v1::WIRE_DTYPE_BF16);  // 128 bytes for 64 bf16 values
  ExpectInvalid(t, limits, "parts[3].h.data");
}

TEST(WireCodecTest, ParseWireDtype) {
  EXPECT_EQ(*ParseWireDtype("f32"), WireDtype::kF32);
  EXPECT_EQ(*ParseWireDtype("BF16"), WireDtype::kBf16);
  const absl::StatusOr<WireDtype> bad = ParseWireDtype("fp8");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("fp8"), std::string::npos);
}

}  // namespace
}  // namespace ktx::actors
