#include "runtime/models/expert_usage.h"

#include <algorithm>
#include <functional>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"

namespace ktx::models {

ExpertUsage::ExpertUsage(int32_t n_layer, int32_t n_expert, int32_t n_expert_used)
    : n_expert_(n_expert), n_expert_used_(n_expert_used) {
  KTX_CHECK(n_layer >= 0 && n_expert >= 0 && n_expert_used >= 0);
  layers_.resize(n_layer);
  for (LayerUsage& l : layers_) {
    l.count.assign(n_expert, 0);
    l.weight.assign(n_expert, 0.0);
    l.rank_mass.assign(n_expert_used, 0.0);
    l.rank_used.assign(n_expert_used, 0);
  }
}

absl::Status ExpertUsage::Record(int il, const Routing& routing) {
  if (il < 0 || il >= n_layer()) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert usage: layer ", il, " outside [0, ", n_layer(), ")"));
  }
  if (routing.n_expert_used > n_expert_used_) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert usage: layer ", il, ": routing of ", routing.n_expert_used,
                     " entries per token, more than n_expert_used = ", n_expert_used_));
  }
  LayerUsage& l = layers_[il];
  std::vector<double> w;
  for (int64_t t = 0; t < routing.n_tokens; ++t) {
    w.clear();
    double sum = 0.0;
    for (int k = 0; k < routing.n_expert_used; ++k) {
      const int32_t e = routing.id(t, k);
      if (e == kNoExpert) continue;
      if (e < 0 || e >= n_expert_) {
        return absl::InvalidArgumentError(absl::StrCat("expert usage: layer ", il, ", token ", t,
                                                       ": expert ", e, " outside [0, ", n_expert_,
                                                       ")"));
      }
      w.push_back(routing.weight(t, k));
      sum += routing.weight(t, k);
    }
    for (int k = 0; k < routing.n_expert_used; ++k) {
      const int32_t e = routing.id(t, k);
      if (e == kNoExpert) continue;
      ++l.count[e];
      if (sum > 0.0) l.weight[e] += routing.weight(t, k) / sum;
    }
    std::sort(w.begin(), w.end(), std::greater<double>());
    for (size_t r = 0; r < w.size(); ++r) {
      if (sum > 0.0) l.rank_mass[r] += w[r] / sum;
      ++l.rank_used[r];
    }
    ++l.n_tokens;
  }
  return absl::OkStatus();
}

int64_t ExpertUsage::n_tokens() const {
  int64_t n = 0;
  for (const LayerUsage& l : layers_) n = std::max(n, l.n_tokens);
  return n;
}

std::vector<int32_t> ExpertUsage::HotExperts(int il, int m) const {
  const LayerUsage& l = layers_[il];
  std::vector<int32_t> ids(l.count.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(),
                   [&l](int32_t a, int32_t b) { return l.count[a] > l.count[b]; });
  ids.resize(std::min<size_t>(ids.size(), static_cast<size_t>(std::max(m, 0))));
  return ids;
}

double ExpertUsage::MeanRankMass(int il, int r) const {
  const LayerUsage& l = layers_[il];
  if (l.n_tokens == 0 || r < 0 || r >= static_cast<int>(l.rank_mass.size())) return 0.0;
  return l.rank_mass[r] / static_cast<double>(l.n_tokens);
}

double ExpertUsage::MassCoveredByTop(int il, int m) const {
  double s = 0.0;
  for (int r = 0; r < m && r < n_expert_used_; ++r) s += MeanRankMass(il, r);
  return s;
}

double ExpertUsage::SelectionShareOfHot(int il, int m) const {
  const LayerUsage& l = layers_[il];
  const int64_t total = std::accumulate(l.count.begin(), l.count.end(), int64_t{0});
  if (total == 0) return 0.0;
  int64_t hot = 0;
  for (int32_t e : HotExperts(il, m)) hot += l.count[e];
  return static_cast<double>(hot) / static_cast<double>(total);
}

double ExpertUsage::Imbalance(int il) const {
  const LayerUsage& l = layers_[il];
  const int64_t total = std::accumulate(l.count.begin(), l.count.end(), int64_t{0});
  if (total == 0 || l.count.empty()) return 0.0;
  const double mean = static_cast<double>(total) / static_cast<double>(l.count.size());
  return static_cast<double>(*std::max_element(l.count.begin(), l.count.end())) / mean;
}

int32_t ExpertUsage::UnusedExperts(int il) const {
  const LayerUsage& l = layers_[il];
  return static_cast<int32_t>(std::count(l.count.begin(), l.count.end(), 0));
}

}  // namespace ktx::models
