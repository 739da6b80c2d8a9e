#include "cli/gpu_hot_experts_flags.h"

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"
#include "topology/profile_file.h"

namespace ktx::cli {

absl::Status ApplyGpuHotExpertsFlags(double gib, const std::string& profile,
                                     actors::EngineOptions* options) {
  if (!std::isfinite(gib) || gib < 0 || gib > 1e6) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--gpu-hot-experts-gib ", gib, ": expected GiB of GPU memory (0: no hot experts)"));
  }
  if (!profile.empty()) {
    KTX_ASSIGN_OR_RETURN(options->placement.profile, topology::LoadPlacementProfile(profile));
  }
  options->gpu_hot_experts_bytes = static_cast<uint64_t>(gib * static_cast<double>(1ULL << 30));
  return absl::OkStatus();
}

}  // namespace ktx::cli
