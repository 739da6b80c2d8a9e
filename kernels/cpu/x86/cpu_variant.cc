#include "kernels/cpu/x86/cpu_variant.h"

#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ktx::kernels {
namespace {

std::string Missing(const std::vector<std::string>& what) {
  if (what.empty()) return "";
  return absl::StrCat("needs ", absl::StrJoin(what, ", "));
}

void NeedAvx2(const CpuFeatures& f, std::vector<std::string>* m) {
  if (!f.avx2) m->push_back("avx2");
  if (!f.fma) m->push_back("fma");
  if (!f.f16c) m->push_back("f16c");
}

void NeedAvx512(const CpuFeatures& f, std::vector<std::string>* m) {
  NeedAvx2(f, m);
  if (!f.avx512f) m->push_back("avx512f");
  if (!f.avx512bw) m->push_back("avx512bw");
  if (!f.avx512vl) m->push_back("avx512vl");
  if (!f.avx512dq) m->push_back("avx512dq");
  if (!f.avx512_vnni) m->push_back("avx512_vnni");
}

CpuVariant InitialVariant() {
  const CpuFeatures& f = DetectCpuFeatures();
  const CpuVariant best = BestCpuVariant(f);
  const char* env = std::getenv("KTX_CPU_VARIANT");
  if (env == nullptr || *env == '\0') return best;
  const std::optional<CpuVariant> wanted = ParseCpuVariant(env);
  if (!wanted) {
    std::fprintf(stderr, "ktx: KTX_CPU_VARIANT=%s is not one of scalar|avx2|avx512|amx; using %s\n",
                 env, CpuVariantName(best));
    return best;
  }
  const std::string why = CpuVariantUnsupportedReason(*wanted, f);
  if (!why.empty()) {
    std::fprintf(stderr, "ktx: KTX_CPU_VARIANT=%s: this CPU cannot run it (%s); using %s\n", env,
                 why.c_str(), CpuVariantName(best));
    return best;
  }
  return *wanted;
}

std::atomic<int>& ActiveSlot() {
  static std::atomic<int> slot{static_cast<int>(InitialVariant())};
  return slot;
}

}  // namespace

const char* CpuVariantName(CpuVariant variant) {
  switch (variant) {
    case CpuVariant::kScalar: return "scalar";
    case CpuVariant::kAvx2: return "avx2";
    case CpuVariant::kAvx512: return "avx512";
    case CpuVariant::kAmx: return "amx";
  }
  return "unknown";
}

std::optional<CpuVariant> ParseCpuVariant(std::string_view name) {
  std::string lower(name);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (CpuVariant v : kAllCpuVariants) {
    if (lower == CpuVariantName(v)) return v;
  }
  return std::nullopt;
}

std::string CpuVariantUnsupportedReason(CpuVariant variant, const CpuFeatures& f) {
  std::vector<std::string> missing;
  switch (variant) {
    case CpuVariant::kScalar: break;
    case CpuVariant::kAvx2: NeedAvx2(f, &missing); break;
    case CpuVariant::kAvx512: NeedAvx512(f, &missing); break;
    case CpuVariant::kAmx:
      NeedAvx512(f, &missing);
      if (!f.amx_tile) missing.push_back("amx_tile");
      if (!f.amx_int8) missing.push_back("amx_int8");
      if (!f.amx_bf16) missing.push_back("amx_bf16");
      if (f.amx_tile && !f.amx_permitted) missing.push_back("the OS AMX permission");
      break;
  }
  return Missing(missing);
}

CpuVariant BestCpuVariant(const CpuFeatures& features) {
  for (CpuVariant v : {CpuVariant::kAmx, CpuVariant::kAvx512, CpuVariant::kAvx2}) {
    if (CpuVariantUnsupportedReason(v, features).empty()) return v;
  }
  return CpuVariant::kScalar;
}

CpuVariant ActiveCpuVariant() {
  return static_cast<CpuVariant>(ActiveSlot().load(std::memory_order_acquire));
}

absl::Status ForceCpuVariant(CpuVariant variant) {
  const std::string why = CpuVariantUnsupportedReason(variant);
  if (!why.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("CPU variant '", CpuVariantName(variant), "' cannot run here: ", why));
  }
  ActiveSlot().store(static_cast<int>(variant), std::memory_order_release);
  return absl::OkStatus();
}

absl::Status ForceCpuVariant(std::string_view name) {
  const std::optional<CpuVariant> v = ParseCpuVariant(name);
  if (!v) {
    return absl::InvalidArgumentError(absl::StrCat("unknown CPU variant '", std::string(name),
                                                   "' (expected scalar|avx2|avx512|amx)"));
  }
  return ForceCpuVariant(*v);
}

}  // namespace ktx::kernels
