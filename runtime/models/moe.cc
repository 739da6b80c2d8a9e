#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "runtime/base/status.h"
#include "runtime/models/moe.h"

namespace ktx::models {

void RouteFromLogits(const RoutingParams& params, const double* logits, int64_t n_tokens,
                     const float* bias, Routing* routing) {
  const int32_t n_expert = params.n_expert;
  const int32_t k_used = params.n_expert_used;
  KTX_CHECK(n_expert > 0 && k_used > 0 && k_used <= n_expert);
  const bool grouped = params.n_group > 1;
  int32_t group_size = n_expert;
  if (grouped) {
    KTX_CHECK(n_expert % params.n_group == 0);
    group_size = n_expert / params.n_group;
    KTX_CHECK(params.n_group_used > 0 && params.n_group_used <= params.n_group);
    KTX_CHECK(k_used <= params.n_group_used * group_size);
  }
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();

  routing->n_tokens = n_tokens;
  routing->n_expert_used = k_used;
  routing->expert_ids.assign(static_cast<size_t>(n_tokens * k_used), 0);
  routing->weights.assign(static_cast<size_t>(n_tokens * k_used), 0.0f);

  std::vector<double> prob(n_expert), sel(n_expert), group_score(std::max(params.n_group, 1));
  std::vector<int32_t> order(n_expert), group_order(std::max(params.n_group, 1));
  // Descending value, ties broken by the lower index.
  auto by_score = [](const std::vector<double>& v) {
    return [&v](int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
  };

  for (int64_t t = 0; t < n_tokens; ++t) {
    const double* l = logits + t * n_expert;
    if (params.gating == GatingFunc::kSigmoid) {
      for (int32_t e = 0; e < n_expert; ++e) prob[e] = 1.0 / (1.0 + std::exp(-l[e]));
    } else {
      double max_l = kNegInf;
      for (int32_t e = 0; e < n_expert; ++e) max_l = std::max(max_l, l[e]);
      double sum = 0.0;
      for (int32_t e = 0; e < n_expert; ++e) {
        prob[e] = std::exp(l[e] - max_l);
        sum += prob[e];
      }
      for (int32_t e = 0; e < n_expert; ++e) prob[e] /= sum;
    }
    for (int32_t e = 0; e < n_expert; ++e) {
      sel[e] = prob[e] + (bias != nullptr ? static_cast<double>(bias[e]) : 0.0);
      if (std::isnan(sel[e])) sel[e] = kNegInf;
    }

    if (grouped) {
      for (int32_t g = 0; g < params.n_group; ++g) {
        const double* s = sel.data() + g * group_size;
        double best = kNegInf, second = kNegInf;
        for (int32_t j = 0; j < group_size; ++j) {
          if (s[j] > best) {
            second = best;
            best = s[j];
          } else if (s[j] > second) {
            second = s[j];
          }
        }
        group_score[g] = group_size >= 2 ? best + second : best;
      }
      std::iota(group_order.begin(), group_order.end(), 0);
      std::sort(group_order.begin(), group_order.end(), by_score(group_score));
      for (int32_t r = params.n_group_used; r < params.n_group; ++r) {
        const int32_t g = group_order[r];
        std::fill(sel.begin() + g * group_size, sel.begin() + (g + 1) * group_size, kNegInf);
      }
    }

    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k_used, order.end(), by_score(sel));

    double sum = 0.0;
    for (int32_t k = 0; k < k_used; ++k) sum += prob[order[k]];
    const double denom = params.norm_weights ? std::max(sum, kMinRoutingWeightSum) : 1.0;
    const double scale = (params.weights_scale != 0.0f && params.weights_scale != 1.0f)
                             ? static_cast<double>(params.weights_scale)
                             : 1.0;
    for (int32_t k = 0; k < k_used; ++k) {
      routing->expert_ids[t * k_used + k] = order[k];
      routing->weights[t * k_used + k] = static_cast<float>(prob[order[k]] / denom * scale);
    }
  }
}

}  // namespace ktx::models
