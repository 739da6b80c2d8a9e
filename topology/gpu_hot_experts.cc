#include "topology/gpu_hot_experts.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace ktx::topology {

std::vector<int> GpuHotExperts::PerLayer(int n_layer) const {
  std::vector<int> out(static_cast<size_t>(std::max(n_layer, 0)), 0);
  for (const auto& [il, ids] : experts) {
    if (il >= 0 && il < n_layer) out[il] = static_cast<int>(ids.size());
  }
  return out;
}

absl::StatusOr<GpuHotExperts> ChooseGpuHotExperts(const ModelExpertTable& model,
                                                  const ExpertProfile& profile,
                                                  uint64_t budget_bytes) {
  if (absl::Status s = ValidateModelExpertTable(model); !s.ok()) return s;
  for (const auto& [il, weights] : profile.weights) {
    const std::string where = absl::StrCat("GPU hot experts: expert profile, layer ", il);
    if (il < 0 || il >= model.n_layer || !model.layers[il].is_moe) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": not a MoE layer of the model (", model.n_layer, " layers)"));
    }
    if (static_cast<int>(weights.size()) != model.layers[il].n_expert) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", weights.size(),
                                                     " weights, the layer has ",
                                                     model.layers[il].n_expert, " experts"));
    }
    double sum = 0;
    for (double w : weights) {
      if (!std::isfinite(w) || w < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": weight ", w, " (expected finite and >= 0)"));
      }
      sum += w;
    }
    if (!(sum > 0) || !std::isfinite(sum)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": the weights sum to ", sum));
    }
  }
  GpuHotExperts hot;
  hot.budget_bytes = budget_bytes;
  if (budget_bytes == 0) return hot;
  uint64_t smallest = 0;
  int smallest_layer = -1;
  int n_moe = 0;
  for (int il = 0; il < model.n_layer; ++il) {
    const LayerExperts& layer = model.layers[il];
    if (!layer.is_moe) continue;
    ++n_moe;
    if (smallest_layer < 0 || layer.bytes_per_expert < smallest) {
      smallest = layer.bytes_per_expert;
      smallest_layer = il;
    }
  }
  if (n_moe == 0) return hot;
  if (budget_bytes < smallest) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "GPU hot experts: a budget of ", FormatBytes(budget_bytes),
        " does not fit one routed expert (the smallest, layer ", smallest_layer, ", takes ",
        FormatBytes(smallest), "); give at least that much or 0 for none"));
  }
  struct Candidate {
    double share = 0;  // of the layer's selections
    double score = 0;  // share per byte
    int il = 0;
    int e = 0;
  };
  std::vector<Candidate> candidates;
  for (int il = 0; il < model.n_layer; ++il) {
    const LayerExperts& layer = model.layers[il];
    if (!layer.is_moe) continue;
    auto it = profile.weights.find(il);
    double sum = 0;
    if (it != profile.weights.end())
      sum = std::accumulate(it->second.begin(), it->second.end(), 0.0);
    for (int e = 0; e < layer.n_expert; ++e) {
      const double share = it != profile.weights.end() ? it->second[e] / sum : 1.0 / layer.n_expert;
      if (!(share > 0)) continue;
      candidates.push_back({share, share / static_cast<double>(layer.bytes_per_expert), il, e});
    }
  }
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    if (a.score != b.score) return a.score > b.score;
    return std::tie(a.il, a.e) < std::tie(b.il, b.e);
  });
  double share_sum = 0;
  for (const Candidate& c : candidates) {
    const uint64_t b = model.layers[c.il].bytes_per_expert;
    if (b > budget_bytes - hot.bytes) continue;
    hot.bytes += b;
    hot.experts[c.il].push_back(c.e);
    ++hot.count;
    share_sum += c.share;
  }
  for (auto& [il, ids] : hot.experts) std::sort(ids.begin(), ids.end());
  hot.expected_share = share_sum / n_moe;
  return hot;
}

std::string DescribeGpuHotExperts(const GpuHotExperts& hot) {
  std::string out =
      absl::StrCat(hot.count, " routed experts resident on the GPU (", FormatBytes(hot.bytes),
                   " of a ", FormatBytes(hot.budget_bytes), " budget, ~",
                   absl::StrFormat("%.1f%%", 100.0 * hot.expected_share), " of the selections)");
  if (!hot.experts.empty()) {
    absl::StrAppend(&out, "; per MoE layer:");
    bool first = true;
    for (const auto& [il, ids] : hot.experts) {
      absl::StrAppend(&out, first ? " " : ", ", il, ": ", ids.size());
      first = false;
    }
  }
  return out;
}

}  // namespace ktx::topology
