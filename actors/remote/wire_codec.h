// File: actors/remote/wire_codec.h
//
// The tensor codec of the ExpertShard service (proto/ktx/v1/shard.proto):
// F32 activations <-> ktx.v1.WireTensor {dtype, shape [n_rows, n_cols],
// data}, with F32 (exact) or BF16 (round to nearest even) elements,
// little-endian, row-major. Encoding can gather rows of a batch on the fly
// (the router's sub-batch of a shard goes out without an intermediate copy).
// Decoding trusts nothing: dtype, shape and byte count are checked against
// each other and against limits before any allocation, and every error is
// InvalidArgument naming the field ("parts[2].h.shape: ...").
//
//   ktx::v1::WireTensor t;
//   EncodeRows(h, rows, WireDtype::kBf16, &t);
//   models::Activations back;
//   KTX_RETURN_IF_ERROR(DecodeTensor(t, "h", {.n_cols = n_embd, .max_rows = 4096}, &back));
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "absl/status/status.h"
#include "actors/remote/wire_dtype.h"
#include "ktx/v1/shard.pb.h"
#include "runtime/models/activations.h"

namespace ktx::actors {

ktx::v1::WireDtype ToProtoDtype(WireDtype dtype);
// Bytes of one element: 4 (F32), 2 (BF16), 0 for any other value.
int WireElementBytes(ktx::v1::WireDtype dtype);

// out = rows `rows` of `a` (in that order) as `dtype`, shape [rows.size(),
// a.n_cols()]. Every row index must be inside `a` (a programmer invariant:
// KTX_CHECK).
void EncodeRows(const models::Activations& a, std::span<const int32_t> rows, WireDtype dtype,
                ktx::v1::WireTensor* out);
// out = all of `a`.
void EncodeTensor(const models::Activations& a, WireDtype dtype, ktx::v1::WireTensor* out);

struct DecodeLimits {
  int64_t n_cols = -1;   // required column count; -1: any in [1, max_cols]
  int64_t min_rows = 1;  // rows accepted: [min_rows, max_rows]
  int64_t max_rows = 1 << 20;
  int64_t max_cols = 1 << 20;
};

// Decodes `t` into `out` (F32 [n_rows, n_cols]). InvalidArgument naming
// `field` + ".dtype" (not F32 or BF16), ".shape" (not 2 extents, or outside
// the limits) or ".data" (byte count differs from n_rows * n_cols * element
// bytes).
absl::Status DecodeTensor(const ktx::v1::WireTensor& t, std::string_view field,
                          const DecodeLimits& limits, models::Activations* out);

}  // namespace ktx::actors
