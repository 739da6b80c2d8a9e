// File: cli/gpu_hot_experts_flags.h
//
// `--gpu-hot-experts-gib N` and `--profile FILE` of ktx-ctl run / logits /
// bench and ktx-node (with --attention-device cuda:N): keep the hottest
// routed experts (from the expert-usage profile, topology/gpu_hot_experts.h)
// resident on the attention GPU within N GiB; the expert shards then hold
// only the others. Shared so every command checks the flags alike.
//
//   KTX_RETURN_IF_ERROR(ApplyGpuHotExpertsFlags(flags.gpu_hot_experts_gib, flags.profile,
//                                               &engine_options));
//
// Thread-safety: pure functions (reads the profile file).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "actors/engine.h"

namespace ktx::cli {

inline constexpr const char* kGpuHotExpertsFlagHelp =
    "With --attention-device cuda:N: keep the hottest routed experts (by --profile, else "
    "uniform) resident on the GPU within this many GiB; the GPU computes them at every batch "
    "size and the expert shards do not hold them (local shards only)";
inline constexpr const char* kPlacementProfileFlagHelp =
    "Expert-usage profile (ktx-ctl profile's file, or the planner's JSON) weighing the experts "
    "for the placement and for --gpu-hot-experts-gib";

// gib < 0 or not finite: InvalidArgument naming --gpu-hot-experts-gib; a
// positive gib sets options->gpu_hot_experts_bytes (the Engine checks the
// attention device); a non-empty profile is loaded into
// options->placement.profile (the loader's errors, naming the file).
absl::Status ApplyGpuHotExpertsFlags(double gib, const std::string& profile,
                                     actors::EngineOptions* options);

}  // namespace ktx::cli
