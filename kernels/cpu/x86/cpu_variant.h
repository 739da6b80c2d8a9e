// File: kernels/cpu/x86/cpu_variant.h
//
// The ISA variants of ktx's CPU kernels (ggml-style: one translation unit per
// variant, each compiled with its own flags) and the choice of one of them,
// made once per process from DetectCpuFeatures() (CPUID, XGETBV and the OS AMX
// permission). Tests and benchmarks pick a variant with the environment
// variable KTX_CPU_VARIANT=scalar|avx2|avx512|amx or with ForceCpuVariant().
//
//   scalar  portable C++, the correctness reference; runs everywhere.
//   avx2    AVX2 + FMA + F16C (x86-64-v3).
//   avx512  AVX-512 F/BW/VL/DQ + VNNI (Cascade Lake, Ice Lake, Zen 4, ...).
//   amx     avx512 + AMX-TILE/INT8/BF16 with the OS permission (Sapphire Rapids+).
//
// Usage:
//   const CpuVariant v = ActiveCpuVariant();
//   if (!CpuVariantUnsupportedReason(CpuVariant::kAmx).empty()) { ... }
//
// Thread-safe: the active variant is an atomic; ForceCpuVariant is meant for
// start-up, tests and benchmarks (kernels running concurrently keep the table
// they already read).
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "kernels/cpu/cpu_features.h"

namespace ktx::kernels {

enum class CpuVariant : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };
inline constexpr int kNumCpuVariants = 4;
inline constexpr CpuVariant kAllCpuVariants[kNumCpuVariants] = {
    CpuVariant::kScalar, CpuVariant::kAvx2, CpuVariant::kAvx512, CpuVariant::kAmx};

// "scalar", "avx2", "avx512", "amx".
const char* CpuVariantName(CpuVariant variant);
// Parses a name as above (case-insensitive); nullopt for anything else.
std::optional<CpuVariant> ParseCpuVariant(std::string_view name);

// Empty when a CPU with `features` can run `variant`; otherwise what it lacks,
// e.g. "needs amx_tile, amx_int8, amx_bf16 and the OS AMX permission".
std::string CpuVariantUnsupportedReason(CpuVariant variant, const CpuFeatures& features);
inline std::string CpuVariantUnsupportedReason(CpuVariant variant) {
  return CpuVariantUnsupportedReason(variant, DetectCpuFeatures());
}
inline bool HostSupportsCpuVariant(CpuVariant variant) {
  return CpuVariantUnsupportedReason(variant).empty();
}

// The most capable variant a CPU with `features` can run.
CpuVariant BestCpuVariant(const CpuFeatures& features);

// The variant kernels dispatch to. At first use: KTX_CPU_VARIANT when it names
// a variant the host supports (otherwise a warning on stderr and the best one),
// else BestCpuVariant(DetectCpuFeatures()).
CpuVariant ActiveCpuVariant();

// Makes `variant` the active one. InvalidArgument when the host cannot run it
// (the message names what is missing); the active variant is then unchanged.
absl::Status ForceCpuVariant(CpuVariant variant);
// Parses `name` first (InvalidArgument for an unknown name).
absl::Status ForceCpuVariant(std::string_view name);

}  // namespace ktx::kernels
