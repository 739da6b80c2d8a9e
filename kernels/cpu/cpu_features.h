// File: kernels/cpu/cpu_features.h
//
// What the CPU can do, read once from CPUID and XGETBV, and whether the OS
// grants AMX tile data to this process (Linux arch_prctl ARCH_REQ_XCOMP_PERM).
// Kernel dispatch (kernels/cpu/dispatch.h) and `ktx-ctl topology show` read it.
// Thread-safe: DetectCpuFeatures() computes once and caches (the AMX request is
// made at most once per process).
#pragma once

#include <string>

namespace ktx::kernels {

struct CpuFeatures {
  std::string vendor;  // "GenuineIntel", "AuthenticAMD", ...
  std::string brand;   // e.g. "Intel(R) Xeon(R) Platinum 8580"
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool avx512_fp16 = false;
  bool avx_vnni = false;
  bool amx_tile = false;
  bool amx_int8 = false;
  bool amx_bf16 = false;
  // The OS saves the AVX-512 state (XCR0 bits 5-7) and so allows AVX-512 use.
  bool os_avx512 = false;
  // The kernel granted XTILEDATA to this process; AMX kernels may run.
  bool amx_permitted = false;
};

// Reads CPUID once and, when the CPU has AMX, asks Linux for permission to use
// it. Later calls return the cached result.
const CpuFeatures& DetectCpuFeatures();

}  // namespace ktx::kernels
