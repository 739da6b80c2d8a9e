#include "topology/placement.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "topology/cpu_list.h"

namespace ktx::topology {
namespace {

// Saturating add for byte counts (budgets may be kNoBudget).
uint64_t AddBytes(uint64_t a, uint64_t b) {
  return a > std::numeric_limits<uint64_t>::max() - b ? std::numeric_limits<uint64_t>::max()
                                                      : a + b;
}

absl::Status ValidateInputs(const ModelExpertTable& model, const std::vector<ShardSpec>& shards,
                            const PlacementOptions& options) {
  if (absl::Status s = ValidateModelExpertTable(model); !s.ok()) return s;
  if (shards.empty()) return absl::InvalidArgumentError("expert placement: no shards given");
  for (const auto& [il, weights] : options.profile.weights) {
    const std::string where = absl::StrCat("expert profile, layer ", il);
    if (il < 0 || il >= model.n_layer) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": the model has layers 0..", model.n_layer - 1));
    }
    const LayerExperts& layer = model.layers[il];
    if (!layer.is_moe) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": not a MoE layer"));
    }
    if (static_cast<int>(weights.size()) != layer.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": ", weights.size(), " weights, the layer has ", layer.n_expert, " experts"));
    }
    double sum = 0;
    for (size_t e = 0; e < weights.size(); ++e) {
      if (!std::isfinite(weights[e]) || weights[e] < 0) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": weight of expert ", e, " is ",
                                                       weights[e], " (expected finite and >= 0)"));
      }
      sum += weights[e];
    }
    if (!(sum > 0) || !std::isfinite(sum)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": the weights sum to ", sum, " (expected a positive finite sum)"));
    }
  }
  for (const auto& [il, ids] : options.excluded) {
    const std::string where = absl::StrCat("excluded experts, layer ", il);
    if (il < 0 || il >= model.n_layer || !model.layers[il].is_moe) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": not a MoE layer of the model (", model.n_layer, " layers)"));
    }
    std::vector<int> sorted = ids;
    std::sort(sorted.begin(), sorted.end());
    for (size_t i = 0; i < sorted.size(); ++i) {
      if (sorted[i] < 0 || sorted[i] >= model.layers[il].n_expert) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": expert ", sorted[i], " outside [0, ", model.layers[il].n_expert, ")"));
      }
      if (i > 0 && sorted[i] == sorted[i - 1]) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": expert ", sorted[i], " given twice"));
      }
    }
  }
  const ReplicationOptions& rep = options.replication;
  if (rep.n_hot < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("replication: the number of hot experts is ", rep.n_hot, " (expected >= 0)"));
  }
  if (rep.n_hot > 0) {
    if (rep.n_copies < 1 || rep.n_copies > static_cast<int>(shards.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat("replication: ", rep.n_copies, " copies asked for but there are ",
                       shards.size(), " shards (expected 1..", shards.size(), ")"));
    }
    if (options.profile.weights.empty()) {
      return absl::InvalidArgumentError(
          "replication: needs an expert-usage profile to know which experts are hot");
    }
  }
  return absl::OkStatus();
}

// Plans one layer into `plan`, updating the shards' bytes, loads and experts.
void PlanLayer(int il, const LayerExperts& layer, const std::vector<double>* profile,
               const ReplicationOptions& rep, const std::vector<int>* excluded,
               PlacementPlan* plan) {
  const int n_shard = static_cast<int>(plan->shards.size());
  const int n_expert = layer.n_expert;
  const uint64_t b = layer.bytes_per_expert;
  LayerPlacement& out = plan->layers[il];
  out.shards_of_expert.assign(n_expert, {});
  out.weight.assign(n_expert, 1.0);
  if (profile != nullptr) {
    const double sum = std::accumulate(profile->begin(), profile->end(), 0.0);
    for (int e = 0; e < n_expert; ++e) out.weight[e] = (*profile)[e] * n_expert / sum;
  }
  // The experts the shards hold: all but the excluded ones, ascending.
  std::vector<uint8_t> skip(n_expert, 0);
  if (excluded != nullptr) {
    for (int e : *excluded) skip[e] = 1;
  }
  std::vector<int> placed;
  for (int e = 0; e < n_expert; ++e) {
    if (!skip[e]) placed.push_back(e);
  }
  const int n = static_cast<int>(placed.size());

  // Expert order: heaviest first, ties by lower id (stable over equal weights).
  std::vector<int> order = placed;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int c) { return out.weight[a] > out.weight[c]; });
  const int n_hot = profile != nullptr && rep.n_copies > 1 ? std::min(rep.n_hot, n) : 0;
  const int n_copies = n_hot > 0 ? rep.n_copies : 1;

  // 1. Slots per shard: fewest slots of this layer, then fewest bytes, then
  //    lowest index, among shards with room; without room, the same rule over
  //    all shards (ComputeExpertPlacement reports the excess).
  const int n_slots = n + n_hot * (n_copies - 1);
  std::vector<int> quota(n_shard, 0);
  for (int slot = 0; slot < n_slots; ++slot) {
    int best = -1;
    for (int pass = 0; pass < 2 && best < 0; ++pass) {
      for (int s = 0; s < n_shard; ++s) {
        const ShardPlacement& shard = plan->shards[s];
        const uint64_t after = AddBytes(shard.bytes, (static_cast<uint64_t>(quota[s]) + 1) * b);
        if (pass == 0 && after > shard.memory_budget_bytes) continue;
        if (best < 0 || quota[s] < quota[best] ||
            (quota[s] == quota[best] && shard.bytes < plan->shards[best].bytes)) {
          best = s;
        }
      }
    }
    ++quota[best];
  }

  // 2. Experts into slots.
  std::vector<int> free_slots = quota;
  std::vector<double> load(n_shard, 0.0);
  auto place = [&](int e, int s, int copies) {
    out.shards_of_expert[e].push_back(s);
    --free_slots[s];
    load[s] += out.weight[e] / copies;
  };
  if (profile == nullptr) {
    int i = 0;
    for (int s = 0; s < n_shard; ++s) {
      for (int k = 0; k < quota[s]; ++k) place(placed[i++], s, 1);
    }
  } else {
    for (int h = 0; h < n_hot; ++h) {
      const int e = order[h];
      std::vector<int> candidates(n_shard);
      std::iota(candidates.begin(), candidates.end(), 0);
      // Most free slots first keeps later hot experts placeable on distinct
      // shards; then least load, then lowest index.
      std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int c) {
        if (free_slots[a] != free_slots[c]) return free_slots[a] > free_slots[c];
        return load[a] < load[c];
      });
      // Taking the shards with the most free slots always finds n_copies
      // distinct ones while no budget binds (the slots differ by at most one
      // per shard). When budgets bound, a chosen shard without a free slot
      // takes one over from the shard with the most: it then exceeds its
      // budget, which ComputeExpertPlacement reports.
      for (int k = 0; k < n_copies; ++k) {
        const int s = candidates[k];
        if (free_slots[s] == 0) {
          const int donor = static_cast<int>(
              std::max_element(free_slots.begin(), free_slots.end()) - free_slots.begin());
          --quota[donor];
          --free_slots[donor];
          ++quota[s];
          ++free_slots[s];
        }
        place(e, s, n_copies);
      }
    }
    for (int i = n_hot; i < n; ++i) {
      const int e = order[i];
      int best = -1;
      for (int s = 0; s < n_shard; ++s) {
        if (free_slots[s] == 0) continue;
        if (best < 0 || load[s] < load[best]) best = s;
      }
      place(e, best, 1);
    }
  }
  for (int e = 0; e < n_expert; ++e)
    std::sort(out.shards_of_expert[e].begin(), out.shards_of_expert[e].end());
  if (n_hot > 0) plan->n_replicated += n_hot;

  for (int s = 0; s < n_shard; ++s) {
    ShardPlacement& shard = plan->shards[s];
    shard.bytes += static_cast<uint64_t>(quota[s]) * b;
    shard.n_experts += quota[s];
    shard.load += load[s];
    shard.layer_load[il] = load[s];
  }
  for (int e = 0; e < n_expert; ++e) {
    for (int s : out.shards_of_expert[e]) plan->shards[s].experts[il].push_back(e);
  }
  for (int s = 0; s < n_shard; ++s) {
    std::sort(plan->shards[s].experts[il].begin(), plan->shards[s].experts[il].end());
  }
}

// Consecutive MoE layers holding the same experts, as (first il, last il, experts).
struct LayerRun {
  int first = 0;
  int last = 0;
  const std::vector<int>* experts = nullptr;
};

std::vector<LayerRun> GroupLayers(const ShardPlacement& shard, const ModelExpertTable& model) {
  std::vector<LayerRun> runs;
  for (int il = 0; il < model.n_layer; ++il) {
    if (!model.layers[il].is_moe) continue;
    const std::vector<int>& experts = shard.experts[il];
    if (!runs.empty() && *runs.back().experts == experts && runs.back().last + 1 == il) {
      runs.back().last = il;
    } else {
      runs.push_back({il, il, &experts});
    }
  }
  return runs;
}

}  // namespace

int ModelExpertTable::n_moe_layers() const {
  int n = 0;
  for (const LayerExperts& layer : layers) n += layer.is_moe ? 1 : 0;
  return n;
}

uint64_t ModelExpertTable::total_bytes() const {
  uint64_t total = 0;
  for (const LayerExperts& layer : layers) {
    if (layer.is_moe) total += static_cast<uint64_t>(layer.n_expert) * layer.bytes_per_expert;
  }
  return total;
}

absl::Status ValidateModelExpertTable(const ModelExpertTable& model) {
  if (model.n_layer < 0 || static_cast<int>(model.layers.size()) != model.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("expert table: n_layer is ", model.n_layer,
                                                   " but ", model.layers.size(),
                                                   " layers are described"));
  }
  for (int il = 0; il < model.n_layer; ++il) {
    const LayerExperts& layer = model.layers[il];
    if (!layer.is_moe) continue;
    if (layer.n_expert < 1 || layer.bytes_per_expert < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "expert table, layer ", il, ": n_expert ", layer.n_expert, ", bytes_per_expert ",
          layer.bytes_per_expert, " (a MoE layer needs both >= 1)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ExpertProfile> ParseExpertProfileJson(std::string_view json,
                                                     const std::string& source) {
  nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": not valid JSON (expected {\"layers\": {\"3\": [w0, w1, ...]}})"));
  }
  if (!j.is_object() || !j.contains("layers") || !j["layers"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": expected an object with key \"layers\" mapping layer index to weights"));
  }
  ExpertProfile profile;
  for (const auto& [key, value] : j["layers"].items()) {
    int il = 0;
    if (!absl::SimpleAtoi(key, &il) || il < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": layer key '", key, "' is not a layer index"));
    }
    if (!value.is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": layer ", key, ": expected an array of weights"));
    }
    std::vector<double> weights;
    for (size_t e = 0; e < value.size(); ++e) {
      if (!value[e].is_number()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": layer ", key, ", expert ", e, ": not a number"));
      }
      const double w = value[e].get<double>();
      if (!std::isfinite(w) || w < 0) {
        return absl::InvalidArgumentError(absl::StrCat(source, ": layer ", key, ", expert ", e,
                                                       ": weight ", w, " (expected >= 0)"));
      }
      weights.push_back(w);
    }
    if (!profile.weights.emplace(il, std::move(weights)).second) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": layer ", il, " given twice"));
    }
  }
  return profile;
}

absl::StatusOr<ExpertProfile> LoadExpertProfile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open the expert profile"));
  std::ostringstream text;
  text << in.rdbuf();
  return ParseExpertProfileJson(text.str(), path);
}

absl::StatusOr<PlacementPlan> ComputeExpertPlacement(const ModelExpertTable& model,
                                                     const std::vector<ShardSpec>& shards,
                                                     const PlacementOptions& options) {
  if (absl::Status s = ValidateInputs(model, shards, options); !s.ok()) return s;
  PlacementPlan plan;
  plan.n_layer = model.n_layer;
  plan.layers.resize(model.n_layer);
  plan.budget_bytes = 0;
  for (const ShardSpec& spec : shards) {
    ShardPlacement shard;
    shard.name = spec.name;
    shard.memory_budget_bytes = spec.memory_budget_bytes;
    shard.experts.resize(model.n_layer);
    shard.layer_load.assign(model.n_layer, 0.0);
    plan.shards.push_back(std::move(shard));
    plan.budget_bytes = AddBytes(plan.budget_bytes, spec.memory_budget_bytes);
  }
  for (int il = 0; il < model.n_layer; ++il) {
    if (!model.layers[il].is_moe) continue;
    auto it = options.profile.weights.find(il);
    auto ex = options.excluded.find(il);
    PlanLayer(il, model.layers[il], it == options.profile.weights.end() ? nullptr : &it->second,
              options.replication, ex == options.excluded.end() ? nullptr : &ex->second, &plan);
  }
  for (size_t s = 0; s < plan.shards.size(); ++s) {
    const ShardPlacement& shard = plan.shards[s];
    plan.total_bytes += shard.bytes;
    plan.total_load += shard.load;
    if (shard.bytes > shard.memory_budget_bytes) {
      plan.shortfalls.push_back(
          {static_cast<int>(s), shard.name, shard.bytes, shard.memory_budget_bytes});
    }
  }
  for (ShardPlacement& shard : plan.shards) {
    shard.share = plan.total_load > 0 ? shard.load / plan.total_load : 0.0;
  }
  return plan;
}

absl::StatusOr<PlacementPlan> PlanExpertPlacement(const ModelExpertTable& model,
                                                  const std::vector<ShardSpec>& shards,
                                                  const PlacementOptions& options) {
  absl::StatusOr<PlacementPlan> plan = ComputeExpertPlacement(model, shards, options);
  if (!plan.ok()) return plan.status();
  if (!plan->fits()) return absl::ResourceExhaustedError(DescribeShortfalls(*plan));
  return plan;
}

std::string DescribeShortfalls(const PlacementPlan& plan) {
  std::string out = absl::StrCat("the routed experts do not fit the shard budgets: they need ",
                                 FormatBytes(plan.total_bytes));
  if (plan.n_replicated > 0) absl::StrAppend(&out, " (with replicas)");
  if (plan.budget_bytes != kNoBudget) {
    absl::StrAppend(&out, ", the budgets add up to ", FormatBytes(plan.budget_bytes));
  }
  for (const ShardShortfall& s : plan.shortfalls) {
    absl::StrAppend(&out, "; shard '", s.name, "' needs ", FormatBytes(s.need_bytes), ", budget ",
                    FormatBytes(s.budget_bytes), ", missing ", FormatBytes(s.missing_bytes()), " (",
                    s.missing_bytes(), " bytes)");
  }
  return out;
}

std::string FormatBytes(uint64_t bytes) {
  constexpr double kKiB = 1024.0;
  const double b = static_cast<double>(bytes);
  if (bytes >= (uint64_t{1} << 30)) return absl::StrFormat("%.2f GiB", b / (kKiB * kKiB * kKiB));
  if (bytes >= (uint64_t{1} << 20)) return absl::StrFormat("%.2f MiB", b / (kKiB * kKiB));
  if (bytes >= (uint64_t{1} << 10)) return absl::StrFormat("%.2f KiB", b / kKiB);
  return absl::StrCat(bytes, " B");
}

std::string PlacementPlanToText(const PlacementPlan& plan, const ModelExpertTable& model) {
  std::ostringstream out;
  int n_expert_max = 0;
  for (const LayerExperts& layer : model.layers) {
    if (layer.is_moe) n_expert_max = std::max(n_expert_max, layer.n_expert);
  }
  out << "Expert placement: " << model.n_moe_layers() << " MoE layers of " << model.n_layer
      << " (up to " << n_expert_max << " experts each) on " << plan.shards.size() << " shard"
      << (plan.shards.size() == 1 ? "" : "s") << "; " << FormatBytes(plan.total_bytes)
      << " of routed experts";
  if (plan.n_replicated > 0) out << ", " << plan.n_replicated << " experts replicated";
  out << "\n";
  auto budget = [](uint64_t b) { return b == kNoBudget ? std::string("none") : FormatBytes(b); };
  for (const ShardPlacement& shard : plan.shards) {
    out << "\nshard " << shard.name << ": " << FormatBytes(shard.bytes) << " (budget "
        << budget(shard.memory_budget_bytes) << "), " << shard.n_experts << " experts, load share "
        << absl::StrFormat("%.1f%%", 100.0 * shard.share) << "\n";
    for (const LayerRun& run : GroupLayers(shard, model)) {
      const std::string layers = run.first == run.last
                                     ? absl::StrCat("layer  ", run.first)
                                     : absl::StrCat("layers ", run.first, "-", run.last);
      out << "  " << layers << ": "
          << (run.experts->empty() ? std::string("(none)")
                                   : absl::StrCat("experts ", FormatIdRanges(*run.experts)))
          << "\n";
    }
  }
  out << "\nmemory per shard\n";
  out << absl::StrFormat("  %-24s %8s %14s %14s %14s %8s\n", "shard", "experts", "bytes", "budget",
                         "left", "share");
  for (const ShardPlacement& shard : plan.shards) {
    std::string left = "-";
    if (shard.memory_budget_bytes != kNoBudget) {
      left = shard.bytes <= shard.memory_budget_bytes
                 ? FormatBytes(shard.memory_budget_bytes - shard.bytes)
                 : "-" + FormatBytes(shard.bytes - shard.memory_budget_bytes);
    }
    out << absl::StrFormat("  %-24s %8d %14s %14s %14s %7.1f%%\n", shard.name, shard.n_experts,
                           FormatBytes(shard.bytes), budget(shard.memory_budget_bytes), left,
                           100.0 * shard.share);
  }
  if (!plan.fits()) out << "\nDOES NOT FIT: " << DescribeShortfalls(plan) << "\n";
  return out.str();
}

std::string PlacementPlanToJson(const PlacementPlan& plan, const ModelExpertTable& model,
                                int indent) {
  nlohmann::json j;
  j["n_layer"] = plan.n_layer;
  j["total_bytes"] = plan.total_bytes;
  j["total_load"] = plan.total_load;
  j["n_replicated"] = plan.n_replicated;
  j["fits"] = plan.fits();
  j["shards"] = nlohmann::json::array();
  for (const ShardPlacement& shard : plan.shards) {
    nlohmann::json s;
    s["name"] = shard.name;
    s["budget_bytes"] = shard.memory_budget_bytes == kNoBudget
                            ? nlohmann::json(nullptr)
                            : nlohmann::json(shard.memory_budget_bytes);
    s["bytes"] = shard.bytes;
    s["load"] = shard.load;
    s["share"] = shard.share;
    s["n_experts"] = shard.n_experts;
    s["layers"] = nlohmann::json::array();
    for (int il = 0; il < model.n_layer; ++il) {
      if (!model.layers[il].is_moe) continue;
      s["layers"].push_back({{"il", il},
                             {"experts", shard.experts[il]},
                             {"ranges", FormatIdRanges(shard.experts[il])}});
    }
    j["shards"].push_back(std::move(s));
  }
  j["layers"] = nlohmann::json::array();
  for (int il = 0; il < model.n_layer; ++il) {
    const LayerExperts& layer = model.layers[il];
    if (!layer.is_moe) continue;
    j["layers"].push_back({{"il", il},
                           {"n_expert", layer.n_expert},
                           {"bytes_per_expert", layer.bytes_per_expert},
                           {"shards_of_expert", plan.layers[il].shards_of_expert}});
  }
  return j.dump(indent);
}

}  // namespace ktx::topology
