// File: runtime/eval/policy_eval.h
//
// Quality of routing policies, measured against the model's full top-k
// (`ktx-ctl eval`, docs/experts.md): a token sequence (a text file, tokenized)
// is cut into windows, each run as a fresh sequence with all logits, once
// with the full routing and once per policy. For every position that has a
// next token in its window:
//
//   KL(full || policy) = Σ_v p_full(v) (log p_full(v) - log p_policy(v)),
//                        p = softmax(logits) in double (nats);
//   top-1 agreement    = argmax of the policy's logits equals the full one's;
//   NLL                = -log p(next token), perplexity = exp(mean NLL).
//
// Also counted per policy: routed experts computed per token per MoE layer
// (immediate + deferred) and how many of them were deferred.
//
//   std::vector<models::RoutingPolicy> policies = {models::RoutingPolicy::TopK(6)};
//   KTX_ASSIGN_OR_RETURN(EvalReport report, EvaluatePolicies(model, tokens, policies, {}));
//   std::cout << FormatEvalTable(report);
//
// Thread-safety: pure functions over a const model (the model's own routing
// policy is overridden by the "full" baseline and by each policy).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "runtime/models/deepseek2.h"
#include "runtime/models/routing_policy.h"

namespace ktx::eval {

struct EvalOptions {
  // Tokens per window (a fresh sequence each); >= 2. The last window may be
  // shorter (at least 2 tokens, else it is dropped).
  int64_t window = 256;
  // Evaluate at most this many tokens of the input (0: all).
  int64_t max_tokens = 0;
  // Called after each (policy, window) pass with a line of progress, if set.
  std::function<void(const std::string&)> progress;
};

struct PolicyEvalResult {
  std::string policy;             // canonical text form ("full" for the baseline)
  int64_t n_positions = 0;        // predictions compared
  double kl_mean = 0;             // nats per position (0 for the baseline)
  double kl_max = 0;              // nats
  double top1_agreement = 0;      // share of positions whose argmax equals the full one's
  double nll_mean = 0;            // nats per predicted token
  double perplexity = 0;          // exp(nll_mean)
  double experts_per_token = 0;   // routed experts computed per token per MoE layer
  double deferred_per_token = 0;  // of which deferred to the next layer
  double seconds = 0;             // wall time of this policy's passes
};

struct EvalReport {
  int64_t n_tokens = 0;   // tokens evaluated
  int64_t n_windows = 0;  // windows run per policy
  int64_t window = 0;
  int32_t n_expert_used = 0;  // the model's K
  PolicyEvalResult full;      // the model's routing
  std::vector<PolicyEvalResult> policies;
};

// KL(P || Q) in nats for two logit rows of n entries (softmax in double).
double KlDivergenceFromLogits(const float* p_logits, const float* q_logits, int64_t n);
// -log softmax(logits)[target] in nats (double).
double NextTokenNll(const float* logits, int64_t n, int32_t target);

// Runs the evaluation (see the file comment). InvalidArgument for fewer than
// two tokens, a bad window, or a policy that does not fit the model (its
// Validate message, prefixed with the policy's index); model errors pass
// through. Policies that change nothing for this model still run (KL 0).
absl::StatusOr<EvalReport> EvaluatePolicies(const models::Deepseek2Model& model,
                                            std::span<const int32_t> tokens,
                                            std::span<const models::RoutingPolicy> policies,
                                            const EvalOptions& options);

// {"n_tokens", "n_windows", "window", "n_expert_used", "full": {...},
//  "policies": [{"policy", "n_positions", "kl_mean", "kl_max", "top1_agreement",
//                "nll_mean", "perplexity", "experts_per_token",
//                "deferred_per_token", "seconds"}, ...]}
nlohmann::json EvalReportToJson(const EvalReport& report);
// A Markdown table: one row for the full routing, one per policy.
std::string FormatEvalTable(const EvalReport& report);

}  // namespace ktx::eval
