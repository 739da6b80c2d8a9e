#include "kernels/cpu/cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace ktx::kernels {
namespace {

constexpr int kArchGetXcompPerm = 0x1022;
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct CpuidRegs {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
};

CpuidRegs Cpuid(unsigned leaf, unsigned subleaf) {
  CpuidRegs r;
  __cpuid_count(leaf, subleaf, r.eax, r.ebx, r.ecx, r.edx);
  return r;
}

uint64_t Xgetbv0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool RequestAmxPermission() {
  // Already granted (e.g. by an earlier request in this process)?
  unsigned long bitmask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) == 0 &&
      (bitmask & (1UL << kXfeatureXtiledata)) != 0) {
    return true;
  }
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  bitmask = 0;
  return syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) == 0 &&
         (bitmask & (1UL << kXfeatureXtiledata)) != 0;
}

CpuFeatures Detect() {
  CpuFeatures f;
  const CpuidRegs leaf0 = Cpuid(0, 0);
  char vendor[13] = {};
  std::memcpy(vendor + 0, &leaf0.ebx, 4);
  std::memcpy(vendor + 4, &leaf0.edx, 4);
  std::memcpy(vendor + 8, &leaf0.ecx, 4);
  f.vendor = vendor;

  const CpuidRegs ext0 = Cpuid(0x80000000u, 0);
  if (ext0.eax >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      const CpuidRegs r = Cpuid(0x80000002u + i, 0);
      std::memcpy(brand + 16 * i + 0, &r.eax, 4);
      std::memcpy(brand + 16 * i + 4, &r.ebx, 4);
      std::memcpy(brand + 16 * i + 8, &r.ecx, 4);
      std::memcpy(brand + 16 * i + 12, &r.edx, 4);
    }
    std::string text = brand;
    const auto first = text.find_first_not_of(' ');
    const auto last = text.find_last_not_of(' ');
    f.brand = first == std::string::npos ? "" : text.substr(first, last - first + 1);
  }

  const unsigned max_leaf = leaf0.eax;
  if (max_leaf < 1) return f;
  const CpuidRegs leaf1 = Cpuid(1, 0);
  const bool osxsave = (leaf1.ecx >> 27) & 1;
  const uint64_t xcr0 = osxsave ? Xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  f.os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;
  const bool os_amx = (xcr0 & (3ULL << 17)) == (3ULL << 17);
  f.fma = os_avx && ((leaf1.ecx >> 12) & 1);
  f.f16c = os_avx && ((leaf1.ecx >> 29) & 1);
  if (max_leaf < 7) return f;

  const CpuidRegs leaf7 = Cpuid(7, 0);
  f.avx2 = os_avx && ((leaf7.ebx >> 5) & 1);
  f.avx512f = f.os_avx512 && ((leaf7.ebx >> 16) & 1);
  f.avx512dq = f.os_avx512 && ((leaf7.ebx >> 17) & 1);
  f.avx512bw = f.os_avx512 && ((leaf7.ebx >> 30) & 1);
  f.avx512vl = f.os_avx512 && ((leaf7.ebx >> 31) & 1);
  f.avx512_vnni = f.os_avx512 && ((leaf7.ecx >> 11) & 1);
  f.avx512_fp16 = f.os_avx512 && ((leaf7.edx >> 23) & 1);
  f.amx_bf16 = (leaf7.edx >> 22) & 1;
  f.amx_tile = (leaf7.edx >> 24) & 1;
  f.amx_int8 = (leaf7.edx >> 25) & 1;
  if (leaf7.eax >= 1) {
    const CpuidRegs leaf7_1 = Cpuid(7, 1);
    f.avx_vnni = os_avx && ((leaf7_1.eax >> 4) & 1);
    f.avx512_bf16 = f.os_avx512 && ((leaf7_1.eax >> 5) & 1);
  }
  if (f.amx_tile && os_amx) f.amx_permitted = RequestAmxPermission();
  return f;
}

}  // namespace

const CpuFeatures& DetectCpuFeatures() {
  static const CpuFeatures features = Detect();
  return features;
}

}  // namespace ktx::kernels
