// File: actors/remote/wire_dtype.h
//
// How hidden states cross to expert shards (EngineOptions::wire_dtype): F32
// (exact) or BF16 (half the bytes). The rule that keeps results independent
// of where a shard lives: with BF16 the attention actor rounds the routed
// experts' input to bf16 for EVERY shard, local ones too, so a remote shard
// computes on exactly the values an in-process shard would. Partial sums
// always come back as F32. No gRPC or protobuf here (actors/engine.h includes
// it); the codec is in wire_codec.h.
//
// Thread-safety: pure functions.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace ktx::actors {

enum class WireDtype {
  kF32,
  kBf16,
};

// "f32" / "bf16".
const char* WireDtypeName(WireDtype dtype);
// "f32" | "bf16" (case-insensitive); InvalidArgument naming the accepted values.
absl::StatusOr<WireDtype> ParseWireDtype(std::string_view text);

// bf16 bits of `f`: round to nearest, ties to even; NaN stays NaN (quiet);
// overflow rounds to +-Inf. Equals kernels::FloatToBf16 (tested).
// Branch-free, so that loops over it vectorize.
inline uint16_t WireFloatToBf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (x >> 16) | 0x40u;
  return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float WireBf16ToFloat(uint16_t b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

// f rounded to the nearest bf16 value, as a float.
inline float RoundToWireBf16(float f) { return WireBf16ToFloat(WireFloatToBf16(f)); }

}  // namespace ktx::actors
