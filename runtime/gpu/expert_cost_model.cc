#include "runtime/gpu/expert_cost_model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace ktx::gpu {
namespace {

// The GPU time of a set with Σ copy `copy_s`, Σ compute `compute_s` and first copy `first_s`.
double GpuSetSeconds(double copy_s, double compute_s, double first_s) {
  if (copy_s <= 0 && compute_s <= 0) return 0;
  return std::max(copy_s, compute_s) + first_s;
}

// Experts with m > 0, by descending m, ties by lower id.
std::vector<int32_t> ByTokensDescending(std::span<const int64_t> m) {
  std::vector<int32_t> ids;
  for (size_t e = 0; e < m.size(); ++e) {
    if (m[e] > 0) ids.push_back(static_cast<int32_t>(e));
  }
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return m[a] > m[b]; });
  return ids;
}

}  // namespace

std::string ExpertCostModel::Validate() const {
  if (!(pcie_bytes_per_s > 0) || !(gpu_flops_per_s > 0)) {
    return absl::StrCat("expert cost model: PCIe rate (", pcie_bytes_per_s, " B/s) and GPU rate (",
                        gpu_flops_per_s, " flop/s) must be positive");
  }
  if (!(gpu_expert_fixed_s >= 0) || !(gpu_layer_fixed_s >= 0) || !(cpu_fixed_s >= 0) ||
      !(cpu_per_token_s >= 0) || cpu_fixed_s + cpu_per_token_s <= 0) {
    return absl::StrCat(
        "expert cost model: times must not be negative and the CPU time of an "
        "expert must grow (fixed ",
        cpu_fixed_s, " s, per token ", cpu_per_token_s, " s)");
  }
  if (!(gpu_lead >= 0) || !(gpu_lead < 1)) {
    return absl::StrCat("expert cost model: gpu_lead (", gpu_lead,
                        ") must be a fraction in [0, 1) of the GPU share's time");
  }
  return "";
}

double CpuExpertSeconds(const ExpertCostModel& model, int64_t m) {
  return m > 0 ? model.cpu_fixed_s + model.cpu_per_token_s * static_cast<double>(m) : 0.0;
}

double GpuCopySeconds(const ExpertCostModel& model, const ExpertShape& shape) {
  return static_cast<double>(shape.expert_bytes) / model.pcie_bytes_per_s;
}

double GpuFillSeconds(const ExpertCostModel& model, const ExpertShape& shape) {
  return model.gpu_fill_s >= 0 ? model.gpu_fill_s : GpuCopySeconds(model, shape);
}

double GpuComputeSeconds(const ExpertCostModel& model, const ExpertShape& shape, int64_t m) {
  const double flops = 6.0 * static_cast<double>(m) * static_cast<double>(shape.n_embd) *
                       static_cast<double>(shape.n_ff);
  return model.gpu_expert_fixed_s + flops / model.gpu_flops_per_s;
}

ExpertSplit PlanExpertSplit(const ExpertCostModel& model,
                            std::span<const int64_t> tokens_per_expert, const ExpertShape& shape,
                            int64_t n_tokens, std::span<const int32_t> on_gpu_already,
                            int64_t n_copied_already) {
  ExpertSplit split;
  const int64_t n_expert = static_cast<int64_t>(tokens_per_expert.size());
  std::vector<uint8_t> forced(tokens_per_expert.size(), 0);
  std::vector<int32_t> forced_ids;
  for (int32_t e : on_gpu_already) {
    if (e < 0 || e >= n_expert || forced[e]) continue;
    forced[e] = 1;
    forced_ids.push_back(e);
  }
  std::vector<int32_t> order = ByTokensDescending(tokens_per_expert);
  for (int32_t e : order) split.all_cpu_s += CpuExpertSeconds(model, tokens_per_expert[e]);
  split.cpu_s = split.all_cpu_s;
  const bool valid = model.Validate().empty();
  if (forced_ids.empty() && (n_tokens < model.min_batch_tokens || order.empty() || !valid)) {
    return split;
  }
  std::erase_if(order, [&](int32_t e) { return forced[e] != 0; });
  const double copy1 = valid ? GpuCopySeconds(model, shape) : 0.0;
  const int64_t n_copied = std::clamp<int64_t>(n_copied_already, 0, forced_ids.size());
  const double fill = valid && n_copied == 0 ? GpuFillSeconds(model, shape) : 0.0;
  // Every option with CPU experts (all-CPU included) pays the serial part.
  const double serial =
      std::max(model.split_serial_s_per_token, 0.0) * static_cast<double>(n_tokens);
  // The experts already on the GPU (copies in flight): copied whatever their
  // tokens, computed where they have some; then a prefix k of `order` joins them.
  double cpu_left = split.all_cpu_s, copy = 0, compute = 0;
  for (size_t i = 0; i < forced_ids.size(); ++i) {
    const int64_t m = tokens_per_expert[forced_ids[i]];
    cpu_left -= CpuExpertSeconds(model, m);
    if (static_cast<int64_t>(i) >= n_copied) copy += copy1;
    if (m > 0 && valid) compute += GpuComputeSeconds(model, shape, m);
  }
  // The CPU's part (0 when rounding leaves only a residue) and an option's time.
  auto cpu_part = [](double cpu) { return cpu > 1e-12 ? cpu : 0.0; };
  // The GPU side counts (1 + gpu_lead) times its time in the choice only.
  const double lead = valid ? 1.0 + model.gpu_lead : 1.0;
  auto time_of = [&](double gpu, double cpu) {
    const double c = cpu_part(cpu);
    return std::max(gpu * lead, c) + (c > 0 ? serial : 0.0);
  };
  const double forced_gpu = GpuSetSeconds(copy, compute, fill);
  const double baseline = time_of(forced_gpu, cpu_left);
  double best = baseline;
  size_t best_k = 0;
  double best_gpu = forced_gpu, best_cpu = cpu_part(cpu_left);
  // Evaluate every k (none for an invalid model), keep the best (smallest k on ties).
  const bool extras = valid && n_tokens >= model.min_batch_tokens;
  for (size_t k = 1; extras && k <= order.size(); ++k) {
    const int64_t m = tokens_per_expert[order[k - 1]];
    cpu_left -= CpuExpertSeconds(model, m);
    copy += copy1;
    compute += GpuComputeSeconds(model, shape, m);
    const double gpu = GpuSetSeconds(copy, compute, fill);
    const double t = time_of(gpu, cpu_left);
    if (t < best) {
      best = t;
      best_k = k;
      best_gpu = gpu;
      best_cpu = cpu_part(cpu_left);
    }
  }
  // Without experts in flight, a split must save more than a layer's fixed GPU cost.
  if (forced_ids.empty() && (best_k == 0 || baseline - best <= model.gpu_layer_fixed_s)) {
    return split;
  }
  split.gpu_experts = forced_ids;
  split.gpu_experts.insert(split.gpu_experts.end(), order.begin(),
                           order.begin() + static_cast<std::ptrdiff_t>(best_k));
  for (int32_t e : split.gpu_experts) split.gpu_tokens += tokens_per_expert[e];
  split.gpu_s = best_gpu + model.gpu_layer_fixed_s;
  split.cpu_s = best_cpu;
  split.serial_s = best_cpu > 0 ? serial : 0.0;
  return split;
}

double CorrectedCopyRate(double rate, double calibrated, double measured_s, double modelled_s) {
  if (!(rate > 0) || !(calibrated > 0) || !(measured_s > 0) || !(modelled_s > 0) ||
      !std::isfinite(rate) || !std::isfinite(calibrated) || !std::isfinite(measured_s) ||
      !std::isfinite(modelled_s)) {
    return rate;
  }
  const double f = std::pow(modelled_s / measured_s, 0.7);
  return std::clamp(rate * f, calibrated / 4, 2 * calibrated);
}

ExpertCostModel DecodeCostModel(const ExpertCostModel& calibrated, const ExpertShape& shape,
                                double cpu_bytes_per_s, double layer_fixed_s) {
  ExpertCostModel m = calibrated;
  m.cpu_fixed_s =
      cpu_bytes_per_s > 0 ? static_cast<double>(shape.expert_bytes) / cpu_bytes_per_s : 0.0;
  m.cpu_per_token_s = m.cpu_fixed_s / 16;
  m.gpu_layer_fixed_s = layer_fixed_s;
  m.gpu_fill_s = m.gpu_flops_per_s > 0 ? GpuComputeSeconds(m, shape, 1) : 0.0;
  m.min_batch_tokens = 0;
  m.split_serial_s_per_token = 0;
  return m;
}

ExpertSplit AllExpertsOnGpu(const ExpertCostModel& model,
                            std::span<const int64_t> tokens_per_expert, const ExpertShape& shape) {
  ExpertSplit split;
  split.gpu_experts = ByTokensDescending(tokens_per_expert);
  double copy = 0, compute = 0;
  const double copy1 = model.pcie_bytes_per_s > 0 ? GpuCopySeconds(model, shape) : 0;
  for (int32_t e : split.gpu_experts) {
    const int64_t m = tokens_per_expert[e];
    split.all_cpu_s += CpuExpertSeconds(model, m);
    split.gpu_tokens += m;
    copy += copy1;
    if (model.gpu_flops_per_s > 0) compute += GpuComputeSeconds(model, shape, m);
  }
  split.gpu_s =
      GpuSetSeconds(copy, compute, model.pcie_bytes_per_s > 0 ? GpuFillSeconds(model, shape) : 0.0);
  return split;
}

std::vector<int64_t> UniformTokensPerExpert(int64_t n_tokens, int32_t n_expert_used,
                                            int32_t n_expert) {
  std::vector<int64_t> m(std::max(n_expert, 0), 0);
  if (n_expert <= 0) return m;
  const int64_t total = n_tokens * std::min(n_expert_used, n_expert);
  for (int32_t e = 0; e < n_expert; ++e) {
    // Each token picks an expert at most once.
    m[e] = std::min(n_tokens, total / n_expert + (e < total % n_expert ? 1 : 0));
  }
  return m;
}

int64_t BreakEvenTokens(const ExpertCostModel& model, const ExpertShape& shape,
                        int32_t n_expert_used, int32_t n_expert, int64_t max_tokens) {
  ExpertCostModel m = model;
  m.min_batch_tokens = 0;
  auto pays = [&](int64_t n) {
    const std::vector<int64_t> counts = UniformTokensPerExpert(n, n_expert_used, n_expert);
    return !PlanExpertSplit(m, counts, shape, n).gpu_experts.empty();
  };
  int64_t lo = 0, hi = 1;  // pays(lo) false (lo = 0: no tokens), pays(hi) to be found
  while (hi <= max_tokens && !pays(hi)) {
    lo = hi;
    hi *= 2;
  }
  if (hi > max_tokens) {
    if (lo >= max_tokens || !pays(max_tokens)) return max_tokens + 1;
    hi = max_tokens;
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (pays(mid) ? hi : lo) = mid;
  }
  return hi;
}

std::string DescribeCostModel(const ExpertCostModel& model, const ExpertShape& shape) {
  return absl::StrFormat(
      "PCIe %.1f GB/s, GPU %.0f TFLOP/s + %.0f us per expert, CPU %.0f us + %.2f us per token "
      "per expert; one expert (%.1f MB) copies in %.2f ms; all CPU below %d tokens",
      model.pcie_bytes_per_s / 1e9, model.gpu_flops_per_s / 1e12, model.gpu_expert_fixed_s * 1e6,
      model.cpu_fixed_s * 1e6, model.cpu_per_token_s * 1e6,
      static_cast<double>(shape.expert_bytes) / 1e6,
      model.pcie_bytes_per_s > 0 ? GpuCopySeconds(model, shape) * 1e3 : 0.0,
      static_cast<int>(model.min_batch_tokens));
}

int64_t CpuPartOfRouting(const models::Routing& routing, std::span<const uint8_t> on_gpu,
                         models::Routing* cpu) {
  const int64_t n = routing.n_tokens;
  const int32_t k_used = routing.n_expert_used;
  const int64_t n_expert = static_cast<int64_t>(on_gpu.size());
  cpu->n_tokens = n;
  cpu->n_expert_used = k_used;
  cpu->expert_ids.assign(static_cast<size_t>(n * k_used), models::kNoExpert);
  cpu->weights.assign(static_cast<size_t>(n * k_used), 0.0f);
  int64_t cpu_entries = 0;
  for (int64_t t = 0; t < n; ++t) {
    int32_t j = 0;
    for (int32_t k = 0; k < k_used; ++k) {
      const int32_t e = routing.id(t, k);
      if (e == models::kNoExpert || (e >= 0 && e < n_expert && on_gpu[e])) continue;
      cpu->expert_ids[t * k_used + j] = e;
      cpu->weights[t * k_used + j] = routing.weight(t, k);
      ++j;
    }
    cpu_entries += j;
  }
  return cpu_entries;
}

}  // namespace ktx::gpu
