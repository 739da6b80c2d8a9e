// File: tests/kernels/cpu/moe/moe_benchmark_kernels.h
//
// The in-cache peak loops and the memory read loop of moe_benchmark, each in
// its own translation unit with its own ISA flags (call only what the CPU
// supports: see CpuVariantUnsupportedReason).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ktx::kernels::moe::bench {

// Sums the 64-bit words of [p, p + bytes) with AVX2 loads (bytes % 128 == 0).
uint64_t ReadBytesAvx2(const uint8_t* p, size_t bytes);

// Runs `iters` rounds of 12 independent zmm vpdpbusd; returns int8 ops (2 per MAC).
int64_t VnniPeakLoop(int64_t iters);

// Runs `iters` rounds of 4 independent 16x16x64 tdpbssd; returns int8 ops.
int64_t AmxInt8PeakLoop(int64_t iters);
// Runs `iters` rounds of 4 independent 16x16x32 tdpbf16ps; returns bf16 flops.
int64_t AmxBf16PeakLoop(int64_t iters);

}  // namespace ktx::kernels::moe::bench
