// File: cli/routing_policy_flags.h
//
// Routing policies on the command line and in topology configs, shared by
// `ktx-ctl run`, `logits`, `bench`, `eval` and `profile`: `--policy SPEC`
// (the text form of runtime/models/routing_policy.h, e.g. "top_k=6" or
// "mass=0.9,min_k=4;layers=3-10,defer=1") and the `routing_policy` message of
// a topology config (proto/ktx/v1/topology.proto). docs/experts.md.
//
// Thread-safety: pure functions.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "ktx/v1/topology.pb.h"
#include "runtime/models/routing_policy.h"

namespace ktx::cli {

// The help text of --policy.
inline constexpr const char* kPolicyFlagHelp =
    "Routing policy (docs/experts.md): e.g. top_k=6 | mass=0.9,min_k=4 | defer=1 | "
    "top_k=6;layers=3-10,defer=1 (default: the model's routing, or the topology config's)";

// `--policy SPEC` as given: empty -> null (no policy of its own); else the
// parsed policy, errors prefixed with "--policy".
absl::StatusOr<std::shared_ptr<const models::RoutingPolicy>> ParsePolicyFlag(
    const std::string& spec);

// A topology config's routing_policy. Errors (InvalidArgument) name `source`
// and the field ("routing_policy.layers[1].settings.top_k: 0 must be >= 1").
absl::StatusOr<models::RoutingPolicy> RoutingPolicyFromConfig(
    const ktx::v1::RoutingPolicyConfig& config, const std::string& source);

// The config message of a policy (its inverse).
ktx::v1::RoutingPolicyConfig RoutingPolicyToConfig(const models::RoutingPolicy& policy);

// The policy of a topology config file, or null when it sets none.
absl::StatusOr<std::shared_ptr<const models::RoutingPolicy>> RoutingPolicyFromTopologyFile(
    const std::string& path);

}  // namespace ktx::cli
