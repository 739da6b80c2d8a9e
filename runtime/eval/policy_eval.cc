#include "runtime/eval/policy_eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/base/status.h"
#include "runtime/kv_cache/latent_kv_cache.h"

namespace ktx::eval {
namespace {

using Clock = std::chrono::steady_clock;

// log Σ exp(logits) in double.
double LogSumExp(const float* logits, int64_t n) {
  double max_l = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) max_l = std::max(max_l, static_cast<double>(logits[i]));
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i]) - max_l);
  return max_l + std::log(sum);
}

int64_t Argmax(const float* row, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (row[i] > row[best]) best = i;
  }
  return best;
}

// The logits of every window under one policy (null: the model's routing,
// forced by an empty policy), with expert counts.
struct PolicyRun {
  std::vector<std::vector<float>> logits;  // per window [len, n_vocab]
  int64_t entries = 0;                     // routed experts computed (all MoE layers)
  int64_t deferred = 0;
  int64_t token_layers = 0;  // tokens x MoE layers
  double seconds = 0;
};

absl::StatusOr<PolicyRun> RunPolicy(const models::Deepseek2Model& model,
                                    std::span<const int32_t> tokens,
                                    const std::vector<std::pair<int64_t, int64_t>>& windows,
                                    const models::RoutingPolicy& policy, const EvalOptions& options,
                                    const std::string& label) {
  PolicyRun run;
  const models::Deepseek2Hparams& hp = model.hparams();
  models::ForwardOptions forward;
  forward.policy = &policy;
  forward.on_routing = [&](int il, const models::Routing& routing) {
    const int32_t d = il + 1 < hp.n_layer ? policy.ForLayer(il).defer : 0;
    for (int64_t t = 0; t < routing.n_tokens; ++t) {
      const int32_t kept = routing.kept(t);
      run.entries += kept;
      run.deferred += std::clamp(d, 0, std::max(kept - 1, 0));
    }
    run.token_layers += routing.n_tokens;
  };
  const auto t0 = Clock::now();
  for (size_t w = 0; w < windows.size(); ++w) {
    const auto [begin, len] = windows[w];
    KTX_ASSIGN_OR_RETURN(std::unique_ptr<kv_cache::SequenceKv> kv,
                         kv_cache::SequenceKv::Create(model.kv_layout(), len));
    models::Activations out;
    KTX_RETURN_IF_ERROR(model.Forward(tokens.subspan(begin, len), kv.get(),
                                      models::LogitsRows::kAll, &out, forward));
    run.logits.push_back(out.ToVector());
    if (options.progress) {
      options.progress(absl::StrCat(label, ": window ", w + 1, "/", windows.size()));
    }
  }
  run.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return run;
}

}  // namespace

double KlDivergenceFromLogits(const float* p_logits, const float* q_logits, int64_t n) {
  const double lp = LogSumExp(p_logits, n);
  const double lq = LogSumExp(q_logits, n);
  double kl = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double log_p = static_cast<double>(p_logits[i]) - lp;
    const double log_q = static_cast<double>(q_logits[i]) - lq;
    const double p = std::exp(log_p);
    if (p > 0.0) kl += p * (log_p - log_q);
  }
  return std::max(kl, 0.0);
}

double NextTokenNll(const float* logits, int64_t n, int32_t target) {
  return LogSumExp(logits, n) - static_cast<double>(logits[target]);
}

absl::StatusOr<EvalReport> EvaluatePolicies(const models::Deepseek2Model& model,
                                            std::span<const int32_t> tokens,
                                            std::span<const models::RoutingPolicy> policies,
                                            const EvalOptions& options) {
  const models::Deepseek2Hparams& hp = model.hparams();
  if (options.window < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("eval window = ", options.window, " must be >= 2 tokens"));
  }
  if (options.window > hp.n_ctx_train) {
    return absl::InvalidArgumentError(absl::StrCat(
        "eval window = ", options.window, " exceeds the model's context of ", hp.n_ctx_train));
  }
  if (options.max_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("eval max_tokens = ", options.max_tokens, " must be >= 0 (0: all)"));
  }
  if (options.max_tokens > 0 && static_cast<int64_t>(tokens.size()) > options.max_tokens) {
    tokens = tokens.subspan(0, options.max_tokens);
  }
  for (size_t i = 0; i < policies.size(); ++i) {
    if (absl::Status s = policies[i].Validate(hp.n_layer, hp.n_expert_used); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("policy ", i + 1, " ('", policies[i].ToString(), "'): ", s.message()));
    }
  }
  std::vector<std::pair<int64_t, int64_t>> windows;
  for (int64_t b = 0; b < static_cast<int64_t>(tokens.size()); b += options.window) {
    const int64_t len = std::min<int64_t>(options.window, tokens.size() - b);
    if (len >= 2) windows.emplace_back(b, len);
  }
  if (windows.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("eval needs at least 2 tokens, got ", tokens.size()));
  }
  const int64_t n_vocab = hp.n_vocab;
  EvalReport report;
  report.n_windows = static_cast<int64_t>(windows.size());
  report.window = options.window;
  report.n_expert_used = hp.n_expert_used;
  for (const auto& [b, len] : windows) report.n_tokens += len;

  auto summarize = [&](const PolicyRun& run, const PolicyRun* full, const std::string& name) {
    PolicyEvalResult r;
    r.policy = name;
    double kl_sum = 0, nll_sum = 0;
    int64_t agree = 0;
    for (size_t w = 0; w < windows.size(); ++w) {
      const auto [begin, len] = windows[w];
      for (int64_t i = 0; i + 1 < len; ++i) {
        const float* q = run.logits[w].data() + i * n_vocab;
        nll_sum += NextTokenNll(q, n_vocab, tokens[begin + i + 1]);
        if (full != nullptr) {
          const float* p = full->logits[w].data() + i * n_vocab;
          const double kl = KlDivergenceFromLogits(p, q, n_vocab);
          kl_sum += kl;
          r.kl_max = std::max(r.kl_max, kl);
          agree += Argmax(p, n_vocab) == Argmax(q, n_vocab);
        } else {
          ++agree;
        }
        ++r.n_positions;
      }
    }
    const double n = static_cast<double>(std::max<int64_t>(r.n_positions, 1));
    r.kl_mean = kl_sum / n;
    r.top1_agreement = static_cast<double>(agree) / n;
    r.nll_mean = nll_sum / n;
    r.perplexity = std::exp(r.nll_mean);
    const double tl = static_cast<double>(std::max<int64_t>(run.token_layers, 1));
    r.experts_per_token = static_cast<double>(run.entries) / tl;
    r.deferred_per_token = static_cast<double>(run.deferred) / tl;
    r.seconds = run.seconds;
    return r;
  };

  const models::RoutingPolicy full_policy;  // empty: overrides the model's own policy
  KTX_ASSIGN_OR_RETURN(PolicyRun full,
                       RunPolicy(model, tokens, windows, full_policy, options, "full"));
  report.full = summarize(full, nullptr, "full");
  for (const models::RoutingPolicy& policy : policies) {
    const std::string name = policy.ToString();
    KTX_ASSIGN_OR_RETURN(PolicyRun run, RunPolicy(model, tokens, windows, policy, options, name));
    report.policies.push_back(summarize(run, &full, name));
  }
  return report;
}

nlohmann::json EvalReportToJson(const EvalReport& report) {
  auto row = [](const PolicyEvalResult& r) {
    nlohmann::json j;
    j["policy"] = r.policy;
    j["n_positions"] = r.n_positions;
    j["kl_mean"] = r.kl_mean;
    j["kl_max"] = r.kl_max;
    j["top1_agreement"] = r.top1_agreement;
    j["nll_mean"] = r.nll_mean;
    j["perplexity"] = r.perplexity;
    j["experts_per_token"] = r.experts_per_token;
    j["deferred_per_token"] = r.deferred_per_token;
    j["seconds"] = r.seconds;
    return j;
  };
  nlohmann::json j;
  j["n_tokens"] = report.n_tokens;
  j["n_windows"] = report.n_windows;
  j["window"] = report.window;
  j["n_expert_used"] = report.n_expert_used;
  j["full"] = row(report.full);
  j["policies"] = nlohmann::json::array();
  for (const PolicyEvalResult& r : report.policies) j["policies"].push_back(row(r));
  return j;
}

std::string FormatEvalTable(const EvalReport& report) {
  std::string out = absl::StrFormat(
      "%d tokens in %d window(s) of up to %d; KL(full || policy) in nats per position\n\n",
      report.n_tokens, report.n_windows, report.window);
  out +=
      "| policy | experts/token | deferred/token | KL mean | KL max | top-1 agree | perplexity |\n";
  out += "|---|---:|---:|---:|---:|---:|---:|\n";
  auto line = [&](const PolicyEvalResult& r, bool baseline) {
    out += absl::StrFormat(
        "| %s | %.2f | %.2f | %s | %s | %.2f%% | %.4g |\n", r.policy, r.experts_per_token,
        r.deferred_per_token, baseline ? "-" : absl::StrFormat("%.3g", r.kl_mean),
        baseline ? "-" : absl::StrFormat("%.3g", r.kl_max), 100.0 * r.top1_agreement, r.perplexity);
  };
  line(report.full, true);
  for (const PolicyEvalResult& r : report.policies) line(r, false);
  return out;
}

}  // namespace ktx::eval
