// File: topology/profile_file.h
//
// Expert-usage profile files (ktx.v1.ExpertUsageProfile, proto/ktx/v1/
// profile.proto; written by `ktx-ctl profile`) for the placement planner:
// read and write them in binary or text format, check them, and turn them
// into the planner's ExpertProfile (each expert weighed by how often it was
// selected: its expected load). LoadPlacementProfile accepts either such a
// file or the planner's JSON ({"layers": {"3": [w0, ...]}}), so every
// `--profile` flag of `ktx-ctl topology` takes both.
//
//   KTX_ASSIGN_OR_RETURN(ExpertProfile p, LoadPlacementProfile("profile.pb"));
//   PlacementOptions options;
//   options.profile = std::move(p);
//   KTX_ASSIGN_OR_RETURN(PlacementPlan plan, PlanExpertPlacement(model, shards, options));
//
// Format by file name: *.textproto, *.txtpb, *.pbtxt, *.txt are text format,
// anything else binary (reading falls back to text when binary parsing
// fails). Thread-safety: pure functions.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ktx/v1/profile.pb.h"
#include "topology/placement.h"

namespace ktx::topology {

// True for the text-format file names above.
bool IsTextProtoPath(const std::string& path);

// Checks a profile on its own (no model): n_expert >= 1, n_expert_used in
// [1, n_expert], layers ascending, unique and inside [0, n_layer), each
// layer's count/weight of n_expert entries and rank_mass/rank_used of
// n_expert_used, counts >= 0 and selections <= n_tokens x n_expert_used.
// InvalidArgument naming `source`, the layer and the field.
absl::Status ValidateExpertUsageProfile(const ktx::v1::ExpertUsageProfile& profile,
                                        const std::string& source);

// Reads and checks a profile file (NotFound when it cannot be read,
// InvalidArgument when it is neither format or fails the checks).
absl::StatusOr<ktx::v1::ExpertUsageProfile> ReadExpertUsageProfile(const std::string& path);
// Writes `profile` in the format the file name asks for.
absl::Status WriteExpertUsageProfile(const ktx::v1::ExpertUsageProfile& profile,
                                     const std::string& path);

// The planner's weights: per layer with selections, the experts' counts.
ExpertProfile PlacementProfileFromUsage(const ktx::v1::ExpertUsageProfile& profile);

// A `--profile` file: the planner's JSON (first non-blank byte '{') or an
// expert-usage profile (binary or text).
absl::StatusOr<ExpertProfile> LoadPlacementProfile(const std::string& path);

}  // namespace ktx::topology
