// File: actors/remote/wire_codec.cc
#include "actors/remote/wire_codec.h"

#include <bit>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"

namespace ktx::actors {

static_assert(std::endian::native == std::endian::little,
              "the wire format is little-endian; add byte swaps for this target");

namespace {

// Blocks of 16 with a fixed inner trip count: GCC vectorizes them at -O2.
constexpr int64_t kBlock = 16;

void FloatsToBf16(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (int64_t j = 0; j < kBlock; ++j) dst[i + j] = WireFloatToBf16(src[i + j]);
  }
  for (; i < n; ++i) dst[i] = WireFloatToBf16(src[i]);
}

void Bf16ToFloats(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (int64_t j = 0; j < kBlock; ++j) dst[i + j] = WireBf16ToFloat(src[i + j]);
  }
  for (; i < n; ++i) dst[i] = WireBf16ToFloat(src[i]);
}

}  // namespace

const char* WireDtypeName(WireDtype dtype) { return dtype == WireDtype::kBf16 ? "bf16" : "f32"; }

absl::StatusOr<WireDtype> ParseWireDtype(std::string_view text) {
  const std::string lower = absl::AsciiStrToLower(std::string(text));
  if (lower == "f32") return WireDtype::kF32;
  if (lower == "bf16") return WireDtype::kBf16;
  return absl::InvalidArgumentError(
      absl::StrCat("wire dtype '", std::string(text), "': expected \"f32\" or \"bf16\""));
}

ktx::v1::WireDtype ToProtoDtype(WireDtype dtype) {
  return dtype == WireDtype::kBf16 ? ktx::v1::WIRE_DTYPE_BF16 : ktx::v1::WIRE_DTYPE_F32;
}

int WireElementBytes(ktx::v1::WireDtype dtype) {
  switch (dtype) {
    case ktx::v1::WIRE_DTYPE_F32: return 4;
    case ktx::v1::WIRE_DTYPE_BF16: return 2;
    default: return 0;
  }
}

void EncodeRows(const models::Activations& a, std::span<const int32_t> rows, WireDtype dtype,
                ktx::v1::WireTensor* out) {
  const int64_t n_cols = a.n_cols();
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  const int element = dtype == WireDtype::kBf16 ? 2 : 4;
  out->Clear();
  out->set_dtype(ToProtoDtype(dtype));
  out->add_shape(n_rows);
  out->add_shape(n_cols);
  std::string* data = out->mutable_data();
  data->resize(static_cast<size_t>(n_rows * n_cols * element));
  char* dst = data->data();
  std::vector<uint16_t> row_bf16(dtype == WireDtype::kBf16 ? static_cast<size_t>(n_cols) : 0);
  for (int64_t j = 0; j < n_rows; ++j) {
    const int32_t r = rows[j];
    KTX_CHECK(r >= 0 && r < a.n_tokens());
    const float* src = a.row(r);
    if (dtype == WireDtype::kF32) {
      std::memcpy(dst, src, static_cast<size_t>(n_cols) * 4);
      dst += n_cols * 4;
    } else {
      FloatsToBf16(src, n_cols, row_bf16.data());
      std::memcpy(dst, row_bf16.data(), static_cast<size_t>(n_cols) * 2);
      dst += n_cols * 2;
    }
  }
}

void EncodeTensor(const models::Activations& a, WireDtype dtype, ktx::v1::WireTensor* out) {
  const int64_t n_cols = a.n_cols();
  const int64_t n = a.n_tokens() * n_cols;
  out->Clear();
  out->set_dtype(ToProtoDtype(dtype));
  out->add_shape(a.n_tokens());
  out->add_shape(n_cols);
  std::string* data = out->mutable_data();
  if (dtype == WireDtype::kF32) {
    data->assign(reinterpret_cast<const char*>(a.data()), static_cast<size_t>(n) * 4);
    return;
  }
  std::vector<uint16_t> bf16(static_cast<size_t>(n));
  FloatsToBf16(a.data(), n, bf16.data());
  data->assign(reinterpret_cast<const char*>(bf16.data()), static_cast<size_t>(n) * 2);
}

absl::Status DecodeTensor(const ktx::v1::WireTensor& t, std::string_view field_name,
                          const DecodeLimits& limits, models::Activations* out) {
  const std::string field(field_name);
  const int element = WireElementBytes(t.dtype());
  if (element == 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".dtype: ", static_cast<int>(t.dtype()),
                                                   " is not WIRE_DTYPE_F32 or WIRE_DTYPE_BF16"));
  }
  if (t.shape_size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".shape: ", t.shape_size(), " extents, expected 2 ([n_rows, n_cols])"));
  }
  const int64_t n_rows = t.shape(0);
  const int64_t n_cols = t.shape(1);
  if (n_rows < limits.min_rows || n_rows > limits.max_rows) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".shape[0] = ", n_rows,
                                                   ": rows must be in [", limits.min_rows, ", ",
                                                   limits.max_rows, "]"));
  }
  if (limits.n_cols >= 0 ? n_cols != limits.n_cols : (n_cols < 1 || n_cols > limits.max_cols)) {
    return absl::InvalidArgumentError(
        limits.n_cols >= 0
            ? absl::StrCat(field, ".shape[1] = ", n_cols, ", expected n_embd = ", limits.n_cols)
            : absl::StrCat(field, ".shape[1] = ", n_cols, ": columns must be in [1, ",
                           limits.max_cols, "]"));
  }
  // Both extents are bounded above, so the product cannot overflow.
  const uint64_t want = static_cast<uint64_t>(n_rows) * static_cast<uint64_t>(n_cols) * element;
  if (t.data().size() != want) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".data: ", t.data().size(), " bytes, expected ", want, " for [", n_rows,
                     ", ", n_cols, "] ", element == 2 ? "bf16" : "f32"));
  }
  out->Resize(n_rows, n_cols);
  const char* src = t.data().data();
  float* dst = out->data();
  const int64_t n = n_rows * n_cols;
  if (element == 4) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
  } else {
    std::vector<uint16_t> bf16(static_cast<size_t>(n));
    std::memcpy(bf16.data(), src, static_cast<size_t>(n) * 2);
    Bf16ToFloats(bf16.data(), n, dst);
  }
  return absl::OkStatus();
}

}  // namespace ktx::actors
