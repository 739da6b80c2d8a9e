#include "actors/moe_split.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/models/moe.h"

namespace ktx::actors {
namespace {

// The live holder of `expert` with the least load (plus `extra`), skipping
// `excluded`; -1 if none.
int PickHolder(const std::vector<int>& holders, const ShardView& view,
               const std::vector<int64_t>& extra, const std::vector<int>& excluded) {
  int best = -1;
  for (int s : holders) {
    if (!view.alive[s]) continue;
    if (std::find(excluded.begin(), excluded.end(), s) != excluded.end()) continue;
    if (best < 0 || view.load[s] + extra[s] < view.load[best] + extra[best]) best = s;
  }
  return best;
}

}  // namespace

std::string ShardLabel(const std::string& name, int shard) {
  return absl::StrCat("expert shard '", name, "' (#", shard, ")");
}

absl::Status ValidateMoeWork(const MoeWork& work, const HolderTable& holders, int n_expert) {
  const int il = work.il;
  const int64_t n = work.h.n_rows();
  const int k_used = work.n_expert_used;
  if (il < 0 || il >= static_cast<int>(holders.size()) || holders[il].empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("router: layer ", il, " has no routed experts in the plan"));
  }
  if (n <= 0 || k_used <= 0 || static_cast<int64_t>(work.expert_ids.size()) != n * k_used ||
      work.weights.size() != work.expert_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "router: layer ", il, ": ", n, " rows with ", work.expert_ids.size(), " expert ids and ",
        work.weights.size(), " weights for ", k_used, " experts per token"));
  }
  for (int32_t e : work.expert_ids) {
    if ((e < 0 || e >= n_expert) && e != models::kNoExpert) {
      return absl::InvalidArgumentError(
          absl::StrCat("router: layer ", il, ": expert id ", e, " outside [0, ", n_expert,
                       ") and not kNoExpert (", models::kNoExpert, ")"));
    }
  }
  return absl::OkStatus();
}

MoeSplit SplitMoeWork(const MoeWork& work, const std::vector<std::vector<int>>& holders_il,
                      int n_expert, const ShardView& view) {
  const int il = work.il;
  const int64_t n = work.h.n_rows();
  const int k_used = work.n_expert_used;
  const size_t n_shards = view.alive.size();
  MoeSplit split;
  split.row_failed.assign(static_cast<size_t>(n), 0);

  std::vector<int64_t> count(n_expert, 0);
  for (int32_t e : work.expert_ids) {
    if (e != models::kNoExpert) count[e]++;
  }
  std::vector<int> assign(n_expert, -1);
  std::vector<int64_t> extra(n_shards, 0);
  const std::vector<int> none;
  for (int e = 0; e < n_expert; ++e) {
    if (count[e] == 0) continue;
    assign[e] = PickHolder(holders_il[e], view, extra, none);
    if (assign[e] >= 0) extra[assign[e]] += count[e];
  }
  // Rows that need an expert nobody alive holds fail now.
  for (int64_t t = 0; t < n; ++t) {
    for (int k = 0; k < k_used; ++k) {
      const int32_t e = work.expert_ids[t * k_used + k];
      if (e == models::kNoExpert || assign[e] >= 0) continue;
      split.row_failed[t] = 1;
      if (split.code == 0) {
        std::vector<std::string> dead;
        for (int s : holders_il[e]) {
          dead.push_back(
              absl::StrCat(ShardLabel(view.names[s], s), ", down: ", view.down_reason[s]));
        }
        split.code = static_cast<int32_t>(absl::StatusCode::kUnavailable);
        split.message = dead.empty()
                            ? absl::StrCat("layer ", il, " expert ", e, " is held by no shard")
                            : absl::StrCat("layer ", il, " expert ", e,
                                           " has no live shard: ", absl::StrJoin(dead, "; "));
      }
    }
  }
  // Group rows by shard (ascending shard index).
  std::vector<int> part_of_shard(n_shards, -1);
  for (int64_t t = 0; t < n; ++t) {
    if (split.row_failed[t]) continue;
    for (int k = 0; k < k_used; ++k) {
      const int32_t e = work.expert_ids[t * k_used + k];
      if (e == models::kNoExpert) continue;  // routing-policy padding: no work anywhere
      const int s = assign[e];
      if (part_of_shard[s] < 0) {
        part_of_shard[s] = static_cast<int>(split.parts.size());
        MoePart p;
        p.shard = s;
        p.mask.assign(static_cast<size_t>(n_expert), 0);
        split.parts.push_back(std::move(p));
      }
      MoePart& p = split.parts[part_of_shard[s]];
      p.mask[e] = 1;
      p.entries++;
      if (p.rows.empty() || p.rows.back() != t) p.rows.push_back(static_cast<int32_t>(t));
    }
  }
  std::stable_sort(split.parts.begin(), split.parts.end(),
                   [](const MoePart& a, const MoePart& b) { return a.shard < b.shard; });
  return split;
}

bool ReassignToReplicas(const MoeWork& work, const std::vector<std::vector<int>>& holders_il,
                        const MoePart& failed, const std::vector<int>& excluded,
                        const ShardView& view, std::vector<MoePart>* out) {
  const int k_used = work.n_expert_used;
  std::vector<int> assign(failed.mask.size(), -1);
  std::vector<int64_t> extra(view.alive.size(), 0);
  for (size_t e = 0; e < failed.mask.size(); ++e) {
    if (!failed.mask[e]) continue;
    assign[e] = PickHolder(holders_il[e], view, extra, excluded);
    if (assign[e] < 0) return false;
    extra[assign[e]] += 1;
  }
  std::map<int, size_t> new_parts;  // shard -> index in *out
  for (int32_t row : failed.rows) {
    for (int k = 0; k < k_used; ++k) {
      const int32_t e = work.expert_ids[static_cast<size_t>(row) * k_used + k];
      if (e == models::kNoExpert || !failed.mask[e]) continue;
      const int s = assign[e];
      auto [pos, inserted] = new_parts.emplace(s, out->size());
      if (inserted) {
        MoePart p;
        p.shard = s;
        p.mask.assign(failed.mask.size(), 0);
        out->push_back(std::move(p));
      }
      MoePart& p = (*out)[pos->second];
      p.mask[e] = 1;
      p.entries++;
      if (p.rows.empty() || p.rows.back() != row) p.rows.push_back(row);
    }
  }
  return true;
}

ExpertWork MakeExpertWork(const MoeWork& work, const MoePart& part) {
  const int k_used = work.n_expert_used;
  ExpertWork out;
  out.il = work.il;
  out.h = work.h;
  out.rows = part.rows;
  out.n_expert_used = k_used;
  out.expert_ids.reserve(part.rows.size() * k_used);
  out.weights.reserve(part.rows.size() * k_used);
  for (int32_t row : part.rows) {
    const size_t base = static_cast<size_t>(row) * k_used;
    out.expert_ids.insert(out.expert_ids.end(), work.expert_ids.begin() + base,
                          work.expert_ids.begin() + base + k_used);
    out.weights.insert(out.weights.end(), work.weights.begin() + base,
                       work.weights.begin() + base + k_used);
  }
  out.expert_mask = part.mask;
  return out;
}

}  // namespace ktx::actors
