#include "runtime/sampler/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"

namespace ktx::sampler {
namespace {

// "name = value is outside RANGE" unless lo <= value <= hi (lo_open makes the
// lower bound exclusive). NaN fails every comparison and is reported too.
absl::Status CheckRange(const char* name, double value, double lo, double hi, bool lo_open,
                        const char* range) {
  const bool ok = (lo_open ? value > lo : value >= lo) && value <= hi;
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("sampling parameter ", name, " = ", value, " is outside ", range));
}

}  // namespace

absl::Status SamplingParams::Validate() const {
  KTX_RETURN_IF_ERROR(CheckRange("temperature", temperature, 0, 100, false, "[0, 100]"));
  if (top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling parameter top_k = ", top_k, " is outside [0, 2^31) (0 = off)"));
  }
  KTX_RETURN_IF_ERROR(CheckRange("top_p", top_p, 0, 1, true, "(0, 1]"));
  KTX_RETURN_IF_ERROR(CheckRange("min_p", min_p, 0, 1, false, "[0, 1]"));
  KTX_RETURN_IF_ERROR(CheckRange("repetition_penalty", repetition_penalty, 0, 10, true, "(0, 10]"));
  KTX_RETURN_IF_ERROR(CheckRange("presence_penalty", presence_penalty, -2, 2, false, "[-2, 2]"));
  KTX_RETURN_IF_ERROR(CheckRange("frequency_penalty", frequency_penalty, -2, 2, false, "[-2, 2]"));
  KTX_RETURN_IF_ERROR(
      CheckRange("penalty_last_n", penalty_last_n, 0, 1048576, false, "[0, 1048576]"));
  return absl::OkStatus();
}

absl::StatusOr<Sampler> Sampler::Create(const SamplingParams& params) {
  KTX_RETURN_IF_ERROR(params.Validate());
  return Sampler(params);
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {
  recent_.resize(static_cast<size_t>(params_.penalty_last_n));
  window_sorted_.reserve(recent_.size());
}

void Sampler::Reset() {
  rng_.seed(params_.seed);
  recent_head_ = 0;
  recent_count_ = 0;
}

void Sampler::Accept(int32_t token) {
  if (recent_.empty()) return;
  recent_[recent_head_] = token;
  recent_head_ = (recent_head_ + 1) % recent_.size();
  recent_count_ = std::min(recent_count_ + 1, recent_.size());
}

void Sampler::AcceptPrompt(std::span<const int32_t> tokens) {
  for (int32_t t : tokens) Accept(t);
}

std::vector<int32_t> Sampler::RecentTokens() const {
  std::vector<int32_t> out;
  out.reserve(recent_count_);
  const size_t cap = recent_.size();
  for (size_t i = 0; i < recent_count_; ++i) {
    out.push_back(recent_[(recent_head_ + cap - recent_count_ + i) % cap]);
  }
  return out;
}

double Sampler::NextUniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

void Sampler::ApplyPenalties(int64_t n_vocab) {
  if (recent_count_ == 0) return;
  const bool any = params_.repetition_penalty != 1.0f || params_.presence_penalty != 0.0f ||
                   params_.frequency_penalty != 0.0f;
  if (!any) return;
  // Count each distinct token of the window: sort a copy (capacity reserved at
  // construction, so no allocation), then walk runs.
  window_sorted_.clear();
  for (size_t i = 0; i < recent_count_; ++i) window_sorted_.push_back(recent_[i]);
  std::sort(window_sorted_.begin(), window_sorted_.end());
  for (size_t i = 0; i < window_sorted_.size();) {
    const int32_t token = window_sorted_[i];
    size_t j = i;
    while (j < window_sorted_.size() && window_sorted_[j] == token) ++j;
    const int count = static_cast<int>(j - i);
    i = j;
    if (token < 0 || token >= n_vocab) continue;
    float& logit = candidates_[static_cast<size_t>(token)].logit;
    if (logit > 0) {
      logit /= params_.repetition_penalty;
    } else {
      logit *= params_.repetition_penalty;
    }
    logit -= static_cast<float>(count) * params_.frequency_penalty + params_.presence_penalty;
  }
}

int32_t Sampler::Sample(const float* logits, int64_t n_vocab) {
  KTX_CHECK(n_vocab >= 1 && n_vocab < (int64_t{1} << 31));
  const size_t n_all = static_cast<size_t>(n_vocab);
  if (candidates_.size() < n_all) candidates_.resize(n_all);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n_all; ++i) {
    const float l = logits[i];
    candidates_[i] = {static_cast<int32_t>(i), std::isnan(l) ? kNegInf : l, 0.0f};
  }
  ApplyPenalties(n_vocab);

  Candidate* const c = candidates_.data();
  auto argmax = [&]() {
    size_t best = 0;
    for (size_t i = 1; i < n_all; ++i) {
      if (c[i].logit > c[best].logit) best = i;
    }
    return c[best].id;
  };
  int32_t token;
  if (params_.greedy() || params_.top_k == 1) {
    token = argmax();
  } else {
    // Descending logit, ties by ascending id: a strict total order, so the
    // result does not depend on the sort algorithm.
    auto before = [](const Candidate& a, const Candidate& b) {
      return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
    };
    size_t n = n_all;
    bool sorted = false;
    if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < n) {
      n = static_cast<size_t>(params_.top_k);
      std::partial_sort(c, c + n, c + n_all, before);
      sorted = true;
    } else if (params_.top_p < 1.0f) {
      std::sort(c, c + n, before);
      sorted = true;
    }
    float max_logit = c[0].logit;
    if (!sorted) {
      for (size_t i = 1; i < n; ++i) max_logit = std::max(max_logit, c[i].logit);
    }
    if (!std::isfinite(max_logit)) {
      // Every logit is -inf (or +inf somewhere): no distribution to draw from.
      token = argmax();
    } else {
      const double inv_t = 1.0 / static_cast<double>(params_.temperature);
      double sum = 0;
      for (size_t i = 0; i < n; ++i) {
        const double e = std::exp((static_cast<double>(c[i].logit) - max_logit) * inv_t);
        c[i].p = static_cast<float>(e);
        sum += e;
      }
      const double inv_sum = 1.0 / sum;
      float p_max = 0;
      for (size_t i = 0; i < n; ++i) {
        c[i].p = static_cast<float>(c[i].p * inv_sum);
        p_max = std::max(p_max, c[i].p);
      }
      if (params_.top_p < 1.0f) {  // sorted here
        double cum = 0;
        for (size_t i = 0; i < n; ++i) {
          cum += c[i].p;
          if (cum >= params_.top_p) {
            n = i + 1;
            break;
          }
        }
      }
      if (params_.min_p > 0.0f) {
        const float threshold = params_.min_p * p_max;
        size_t kept = 0;
        for (size_t i = 0; i < n; ++i) {
          if (c[i].p >= threshold) c[kept++] = c[i];
        }
        n = kept;  // >= 1: the maximum itself passes
      }
      double total = 0;
      for (size_t i = 0; i < n; ++i) total += c[i].p;
      const double u = NextUniform() * total;
      double cum = 0;
      token = c[n - 1].id;
      for (size_t i = 0; i < n; ++i) {
        cum += c[i].p;
        if (u < cum) {
          token = c[i].id;
          break;
        }
      }
    }
  }
  Accept(token);
  return token;
}

}  // namespace ktx::sampler
