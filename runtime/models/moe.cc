#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"
#include "runtime/models/moe.h"

namespace ktx::models {

int32_t Routing::kept(int64_t t) const {
  int32_t n = 0;
  for (int k = 0; k < n_expert_used; ++k) n += id(t, k) != kNoExpert;
  return n;
}

int32_t KeptByRule(const TopKRule& rule, const double* prob_sel, int32_t k_used, uint8_t* keep) {
  KTX_CHECK(rule.top_k >= 0 && rule.top_k <= k_used && rule.min_mass > 0.0 && rule.min_k >= 1);
  const int32_t n_cand = rule.top_k == 0 ? k_used : rule.top_k;
  std::fill(keep, keep + k_used, 0);
  if (rule.min_mass >= 1.0) {
    std::fill(keep, keep + n_cand, 1);
    return n_cand;
  }
  // Candidates by falling gate weight (ties: selection order).
  std::vector<int32_t> by_weight(n_cand);
  std::iota(by_weight.begin(), by_weight.end(), 0);
  std::stable_sort(by_weight.begin(), by_weight.end(),
                   [prob_sel](int32_t a, int32_t b) { return prob_sel[a] > prob_sel[b]; });
  double total = 0.0;
  for (int32_t k = 0; k < n_cand; ++k) total += prob_sel[k];
  const int32_t min_k = std::min(rule.min_k, n_cand);
  double cum = 0.0;
  int32_t n = 0;
  while (n < n_cand) {
    cum += prob_sel[by_weight[n]];
    keep[by_weight[n]] = 1;
    ++n;
    if (n >= min_k && total > 0.0 && cum >= rule.min_mass * total) break;
  }
  return n;
}

void RouteFromLogits(const RoutingParams& params, const double* logits, int64_t n_tokens,
                     const float* bias, Routing* routing) {
  RouteFromLogits(params, logits, n_tokens, bias, {}, routing);
}

void RouteFromLogits(const RoutingParams& params, const double* logits, int64_t n_tokens,
                     const float* bias, std::span<const TopKRule* const> rules, Routing* routing) {
  KTX_CHECK(rules.empty() || rules.size() == 1 || static_cast<int64_t>(rules.size()) == n_tokens);
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

  // Per token: the K selected experts in selection order, their p, which the
  // rule keeps.
  std::vector<int32_t> sel_ids(static_cast<size_t>(n_tokens * k_used));
  std::vector<double> sel_prob(static_cast<size_t>(n_tokens * k_used));
  std::vector<uint8_t> sel_keep(static_cast<size_t>(n_tokens * k_used), 1);
  int32_t width = 0;

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

    int32_t* ids_t = sel_ids.data() + t * k_used;
    double* prob_t = sel_prob.data() + t * k_used;
    for (int32_t k = 0; k < k_used; ++k) {
      ids_t[k] = order[k];
      prob_t[k] = prob[order[k]];
    }
    const TopKRule* rule =
        rules.empty() ? nullptr : (rules.size() == 1 ? rules[0] : rules[static_cast<size_t>(t)]);
    int32_t n_kept = k_used;
    if (rule != nullptr && !rule->KeepsAll(k_used)) {
      n_kept = KeptByRule(*rule, prob_t, k_used, sel_keep.data() + t * k_used);
    }
    width = std::max(width, n_kept);
  }

  const double scale = (params.weights_scale != 0.0f && params.weights_scale != 1.0f)
                           ? static_cast<double>(params.weights_scale)
                           : 1.0;
  routing->n_tokens = n_tokens;
  routing->n_expert_used = n_tokens > 0 ? width : k_used;
  const int32_t w_out = routing->n_expert_used;
  routing->expert_ids.assign(static_cast<size_t>(n_tokens * w_out), kNoExpert);
  routing->weights.assign(static_cast<size_t>(n_tokens * w_out), 0.0f);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const int32_t* ids_t = sel_ids.data() + t * k_used;
    const double* prob_t = sel_prob.data() + t * k_used;
    const uint8_t* keep_t = sel_keep.data() + t * k_used;
    double sum = 0.0;
    for (int32_t k = 0; k < k_used; ++k) {
      if (keep_t[k]) sum += prob_t[k];
    }
    const double denom = params.norm_weights ? std::max(sum, kMinRoutingWeightSum) : 1.0;
    int32_t j = 0;
    for (int32_t k = 0; k < k_used; ++k) {
      if (!keep_t[k]) continue;
      routing->expert_ids[t * w_out + j] = ids_t[k];
      routing->weights[t * w_out + j] = static_cast<float>(prob_t[k] / denom * scale);
      ++j;
    }
  }
}

absl::Status CheckExpertRows(const Activations& h, std::span<const int32_t> rows,
                             const Routing& routing) {
  if (static_cast<int64_t>(rows.size()) != routing.n_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "routed experts: ", rows.size(), " rows for a routing of ", routing.n_tokens, " tokens"));
  }
  for (size_t j = 0; j < rows.size(); ++j) {
    if (rows[j] < 0 || rows[j] >= h.n_tokens()) {
      return absl::InvalidArgumentError(absl::StrCat("routed experts: token ", j, " names row ",
                                                     rows[j], ", outside the batch of ",
                                                     h.n_tokens(), " rows"));
    }
  }
  return absl::OkStatus();
}

absl::Status ExpertBackend::ComputeRows(int il, const Activations& h, std::span<const int32_t> rows,
                                        const Routing& routing,
                                        std::span<const uint8_t> expert_mask, Activations* out) {
  KTX_RETURN_IF_ERROR(CheckExpertRows(h, rows, routing));
  Activations gathered;
  gathered.ResizeForOverwrite(static_cast<int64_t>(rows.size()), h.n_cols());
  for (size_t j = 0; j < rows.size(); ++j) {
    std::copy(h.row(rows[j]), h.row(rows[j]) + h.n_cols(), gathered.row(static_cast<int64_t>(j)));
  }
  return Compute(il, gathered, routing, expert_mask, out);
}

}  // namespace ktx::models
