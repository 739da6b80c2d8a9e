#include "cli/routing_policy_flags.h"

#include "absl/strings/str_cat.h"
#include "topology/config.h"

namespace ktx::cli {
namespace {

absl::Status SettingsFromConfig(const ktx::v1::RoutingSettings& in, const std::string& where,
                                models::RoutingSettings* out) {
  auto bad = [&](const char* field, const std::string& m) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".", field, ": ", m));
  };
  if (in.has_top_k()) {
    if (in.top_k() < 1) return bad("top_k", absl::StrCat(in.top_k(), " must be >= 1"));
    out->top_k = in.top_k();
  }
  if (in.has_min_mass()) {
    if (!(in.min_mass() > 0.0 && in.min_mass() <= 1.0)) {
      return bad("min_mass", absl::StrCat(in.min_mass(), " outside (0, 1]"));
    }
    out->min_mass = in.min_mass();
  }
  if (in.has_min_k()) {
    if (in.min_k() < 1) return bad("min_k", absl::StrCat(in.min_k(), " must be >= 1"));
    out->min_k = in.min_k();
  }
  if (in.has_defer()) {
    if (in.defer() < 0) return bad("defer", absl::StrCat(in.defer(), " must be >= 0"));
    out->defer = in.defer();
  }
  return absl::OkStatus();
}

void SettingsToConfig(const models::RoutingSettings& in, ktx::v1::RoutingSettings* out) {
  if (in.top_k) out->set_top_k(*in.top_k);
  if (in.min_mass) out->set_min_mass(*in.min_mass);
  if (in.min_k) out->set_min_k(*in.min_k);
  if (in.defer) out->set_defer(*in.defer);
}

}  // namespace

absl::StatusOr<std::shared_ptr<const models::RoutingPolicy>> ParsePolicyFlag(
    const std::string& spec) {
  if (spec.empty()) return std::shared_ptr<const models::RoutingPolicy>();
  absl::StatusOr<models::RoutingPolicy> policy = models::RoutingPolicy::Parse(spec);
  if (!policy.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--policy: ", policy.status().message()));
  }
  return std::make_shared<const models::RoutingPolicy>(*std::move(policy));
}

absl::StatusOr<models::RoutingPolicy> RoutingPolicyFromConfig(
    const ktx::v1::RoutingPolicyConfig& config, const std::string& source) {
  models::RoutingPolicy policy;
  const std::string base = absl::StrCat(source, ": routing_policy");
  absl::Status s = SettingsFromConfig(config.settings(), base + ".settings", &policy.global());
  if (!s.ok()) return s;
  for (int i = 0; i < config.layers_size(); ++i) {
    const ktx::v1::RoutingLayerRange& r = config.layers(i);
    const std::string where = absl::StrCat(base, ".layers[", i, "]");
    if (r.first() < 0 || r.last() < r.first()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": first = ", r.first(), ", last = ", r.last(), " (expected 0 <= first <= last)"));
    }
    models::RoutingPolicy::LayerRange range;
    range.first = r.first();
    range.last = r.last();
    s = SettingsFromConfig(r.settings(), where + ".settings", &range.settings);
    if (!s.ok()) return s;
    if (range.settings.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".settings: sets nothing"));
    }
    policy.layers().push_back(range);
  }
  if (config.defer_join().empty() || config.defer_join() == "next_moe") {
    policy.set_defer_join(models::DeferJoin::kNextMoe);
  } else if (config.defer_join() == "next_attention") {
    policy.set_defer_join(models::DeferJoin::kNextAttention);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(base, ".defer_join: '", config.defer_join(),
                                                   "' (expected next_moe or next_attention)"));
  }
  return policy;
}

ktx::v1::RoutingPolicyConfig RoutingPolicyToConfig(const models::RoutingPolicy& policy) {
  ktx::v1::RoutingPolicyConfig config;
  SettingsToConfig(policy.global(), config.mutable_settings());
  for (const models::RoutingPolicy::LayerRange& r : policy.layers()) {
    ktx::v1::RoutingLayerRange* out = config.add_layers();
    out->set_first(r.first);
    out->set_last(r.last);
    SettingsToConfig(r.settings, out->mutable_settings());
  }
  if (policy.defer_join() != models::DeferJoin::kNextMoe) {
    config.set_defer_join(models::DeferJoinName(policy.defer_join()));
  }
  return config;
}

absl::StatusOr<std::shared_ptr<const models::RoutingPolicy>> RoutingPolicyFromTopologyFile(
    const std::string& path) {
  absl::StatusOr<ktx::v1::TopologyConfig> config = topology::LoadTopologyConfig(path);
  if (!config.ok()) return config.status();
  if (!config->has_routing_policy()) return std::shared_ptr<const models::RoutingPolicy>();
  absl::StatusOr<models::RoutingPolicy> policy =
      RoutingPolicyFromConfig(config->routing_policy(), path);
  if (!policy.ok()) return policy.status();
  return std::make_shared<const models::RoutingPolicy>(*std::move(policy));
}

}  // namespace ktx::cli
