// ktx-ctl eval: the quality of routing policies against the full top-k
// (runtime/eval/policy_eval.h, docs/experts.md).
//
//   ktx-ctl eval --model M.gguf --data text.txt [--policy SPEC]... [--window 256]
//                [--max-tokens N] [--json FILE] [--experts fast|reference] [--threads N]
//
// Tokenizes the text file (as plain text: special-token text stays text; the
// model's BOS first), cuts it into windows, runs each window with the full
// routing and with every --policy, and prints per policy: routed experts per
// token, the KL divergence of the next-token distributions from the full
// routing's (mean and max, nats), top-1 agreement and perplexity. Without
// --policy a standard set runs: top_k = K-1 ... K/2, mass = 0.8 and 0.9, and
// defer = 1 and 2 (each that fits the model). The table goes to stdout
// (Markdown), the JSON to --json FILE.
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "cli/routing_policy_flags.h"
#include "runtime/engine/reference_engine.h"
#include "runtime/eval/policy_eval.h"
#include "runtime/moe_backend/cpu_moe_backend.h"
#include "tbb/global_control.h"

namespace ktx::cli {
namespace {

struct EvalFlags {
  std::string model;
  std::string data;
  std::vector<std::string> policies;
  int64_t window = 256;
  int64_t max_tokens = 0;
  std::string json;
  std::string experts = "fast";
  int threads = 0;
};

// The standard set for a model with K experts per token.
std::vector<models::RoutingPolicy> StandardPolicies(int32_t k) {
  std::vector<models::RoutingPolicy> out;
  for (int32_t t = k - 1; t >= std::max(1, k / 2); --t)
    out.push_back(models::RoutingPolicy::TopK(t));
  if (k > 1) {
    out.push_back(models::RoutingPolicy::Adaptive(0.8, 1));
    out.push_back(models::RoutingPolicy::Adaptive(0.9, 1));
  }
  for (int32_t d = 1; d <= 2 && d < k; ++d) out.push_back(models::RoutingPolicy::Defer(d));
  return out;
}

absl::Status RunEval(const EvalFlags& flags) {
  if (flags.threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--threads ", flags.threads, ": expected >= 0"));
  }
  KTX_ASSIGN_OR_RETURN(const bool fast, moe_backend::ParseExpertsFlag(flags.experts));
  std::vector<models::RoutingPolicy> policies;
  for (const std::string& spec : flags.policies) {
    KTX_ASSIGN_OR_RETURN(std::shared_ptr<const models::RoutingPolicy> p, ParsePolicyFlag(spec));
    policies.push_back(p != nullptr ? *p : models::RoutingPolicy());
  }
  std::ifstream in(flags.data, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--data ", flags.data, ": cannot open"));
  std::ostringstream text;
  text << in.rdbuf();
  std::optional<tbb::global_control> threads;
  if (flags.threads > 0) {
    threads.emplace(tbb::global_control::max_allowed_parallelism,
                    static_cast<size_t>(flags.threads));
  }
  engine::EngineOptions options;
  options.n_ctx = 0;
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<engine::ReferenceEngine> engine,
                       engine::ReferenceEngine::Open(flags.model, options));
  std::unique_ptr<moe_backend::CpuExperts> experts;
  if (fast) {
    KTX_ASSIGN_OR_RETURN(experts,
                         moe_backend::CpuExperts::Attach(&engine->mutable_model(), flags.threads));
  }
  KTX_ASSIGN_OR_RETURN(const tokenizer::Tokenizer* tok, engine->tokenizer());
  tokenizer::TokenizeOptions tokenize;
  tokenize.parse_special = false;
  KTX_ASSIGN_OR_RETURN(const std::vector<int32_t> tokens, tok->Tokenize(text.str(), tokenize));
  if (policies.empty()) policies = StandardPolicies(engine->model().hparams().n_expert_used);

  eval::EvalOptions eval_options;
  eval_options.window = flags.window;
  eval_options.max_tokens = flags.max_tokens;
  eval_options.progress = [](const std::string& line) {
    std::cerr << "\reval: " << line << "          " << std::flush;
  };
  KTX_ASSIGN_OR_RETURN(const eval::EvalReport report,
                       eval::EvaluatePolicies(engine->model(), tokens, policies, eval_options));
  std::cerr << "\n";
  std::cout << "model: " << flags.model << ", data: " << flags.data
            << ", experts: " << flags.experts << "\n"
            << eval::FormatEvalTable(report);
  if (!flags.json.empty()) {
    nlohmann::json j = eval::EvalReportToJson(report);
    j["model"] = flags.model;
    j["data"] = flags.data;
    j["experts"] = flags.experts;
    std::ofstream out(flags.json, std::ios::trunc);
    out << j.dump(2) << "\n";
    if (!out || !out.flush()) {
      return absl::UnavailableError(absl::StrCat("--json ", flags.json, ": cannot write"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

void AddEvalCommands(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<EvalFlags>();
  CLI::App* cmd = app.add_subcommand(
      "eval",
      "Quality of routing policies against the full top-k: KL, top-1 agreement, perplexity");
  cmd->add_option("--model", flags->model, "GGUF model file (the first part of a split model)")
      ->required();
  cmd->add_option("--data", flags->data, "Text file to evaluate on")->required();
  cmd->add_option("--policy", flags->policies,
                  "A policy to compare (repeatable; default: a standard set). e.g. top_k=6 | "
                  "mass=0.9,min_k=4 | defer=1");
  cmd->add_option("--window", flags->window, "Tokens per window, each a fresh sequence (256)");
  cmd->add_option("--max-tokens", flags->max_tokens, "Evaluate at most N tokens (0: all)");
  cmd->add_option("--json", flags->json, "Also write the results as JSON to this file");
  cmd->add_option("--experts", flags->experts,
                  "Routed experts: fast (CPU kernels, default) or reference (scalar oracle)");
  cmd->add_option("--threads", flags->threads, "Worker threads (default: all cores)");
  cmd->callback([exit_code, flags] {
    const absl::Status s = RunEval(*flags);
    if (!s.ok()) std::cerr << "ktx-ctl eval: " << s << "\n";
    *exit_code = s.ok() ? 0 : 1;
  });
}

}  // namespace ktx::cli
