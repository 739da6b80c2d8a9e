// ktx-ctl profile: expert-usage profiles (docs/experts.md).
//
//   ktx-ctl profile --model M.gguf --prompts prompts.txt [--out profile.pb]
//                   [--gen N] [--chat] [--policy SPEC] [--experts fast|reference]
//                   [--threads N] [--prefill-chunk N] [--top N]
//       runs every prompt (one per line; a line that is JSON is an object with
//       "prompt" or "text", or a JSON string) through the model, then N greedy
//       decode steps, and records per MoE layer how often each routed expert
//       is selected and how a token's gate mass splits over the ranks of its
//       top-k (runtime/models/expert_usage.h). Writes ktx.v1.ExpertUsageProfile
//       (binary, or text for *.textproto / *.txtpb / *.pbtxt / *.txt) and prints
//       its summary. The placement planner reads the file:
//       `ktx-ctl topology plan --profile profile.pb`.
//   ktx-ctl profile show FILE [--top N] [--json]
//       the summary: per layer the hot experts, the gate mass the top-m of K
//       carry, imbalance (busiest expert / mean) and unused experts.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "cli/routing_policy_flags.h"
#include "ktx/v1/profile.pb.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/reference_engine.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/expert_usage.h"
#include "runtime/moe_backend/cpu_moe_backend.h"
#include "tbb/global_control.h"
#include "topology/profile_file.h"

namespace ktx::cli {
namespace {

struct ProfileFlags {
  std::string model;
  std::string prompts;
  std::string out = "profile.pb";
  int64_t gen = 0;
  bool chat = false;
  std::string policy;
  std::string experts = "fast";
  int threads = 0;
  int64_t prefill_chunk = 512;
  int top = 8;
};

struct ShowFlags {
  std::string file;
  int top = 8;
  bool json = false;
};

// One prompt per line; JSON lines hold {"prompt": ...} / {"text": ...} or a string.
absl::StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--prompts ", path, ": cannot open"));
  std::vector<std::string> prompts;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const std::string trimmed(absl::StripAsciiWhitespace(line));
    if (trimmed.empty()) continue;
    if (trimmed.front() != '{' && trimmed.front() != '"') {
      prompts.push_back(line);
      continue;
    }
    nlohmann::json j = nlohmann::json::parse(trimmed, nullptr, /*allow_exceptions=*/false);
    if (j.is_string()) {
      prompts.push_back(j.get<std::string>());
    } else if (j.is_object() && j.contains("prompt") && j["prompt"].is_string()) {
      prompts.push_back(j["prompt"].get<std::string>());
    } else if (j.is_object() && j.contains("text") && j["text"].is_string()) {
      prompts.push_back(j["text"].get<std::string>());
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", n,
                       ": a JSON line needs a string field \"prompt\" or \"text\" (or is a "
                       "JSON string)"));
    }
  }
  if (prompts.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no prompts"));
  return prompts;
}

std::string UtcNow() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

ktx::v1::ExpertUsageProfile UsageToProto(const models::ExpertUsage& usage) {
  ktx::v1::ExpertUsageProfile p;
  p.set_n_layer(usage.n_layer());
  p.set_n_expert(usage.n_expert());
  p.set_n_expert_used(usage.n_expert_used());
  for (int il = 0; il < usage.n_layer(); ++il) {
    const models::LayerUsage& l = usage.layer(il);
    if (l.n_tokens == 0) continue;
    ktx::v1::LayerUsage* out = p.add_layers();
    out->set_layer(il);
    out->set_n_tokens(l.n_tokens);
    for (int64_t c : l.count) out->add_count(c);
    for (double w : l.weight) out->add_weight(w);
    for (double m : l.rank_mass) out->add_rank_mass(m);
    for (int64_t u : l.rank_used) out->add_rank_used(u);
  }
  return p;
}

// The profile back as ExpertUsage (checked by ReadExpertUsageProfile).
models::ExpertUsage UsageFromProto(const ktx::v1::ExpertUsageProfile& p) {
  models::ExpertUsage usage(p.n_layer(), p.n_expert(), p.n_expert_used());
  for (const ktx::v1::LayerUsage& l : p.layers()) {
    models::LayerUsage& out = usage.mutable_layer(l.layer());
    out.n_tokens = l.n_tokens();
    out.count.assign(l.count().begin(), l.count().end());
    out.weight.assign(l.weight().begin(), l.weight().end());
    out.rank_mass.assign(l.rank_mass().begin(), l.rank_mass().end());
    out.rank_used.assign(l.rank_used().begin(), l.rank_used().end());
  }
  return usage;
}

std::string Pct(double v) { return absl::StrFormat("%.1f%%", 100.0 * v); }

// The summary table (Markdown): one row per profiled layer and a mean row.
std::string FormatSummary(const ktx::v1::ExpertUsageProfile& p, int top) {
  const models::ExpertUsage usage = UsageFromProto(p);
  const int k = p.n_expert_used();
  std::string out = absl::StrFormat(
      "%s: %d prompts, %d tokens, %d MoE layers profiled, %d experts, top-%d (policy %s)\n\n",
      p.model().empty() ? "profile" : p.model(), p.n_prompts(), p.n_tokens(), p.layers_size(),
      p.n_expert(), k, p.routing_policy().empty() ? "full" : p.routing_policy());
  out += "Gate mass carried by the m heaviest of a token's experts (mean over tokens):\n\n";
  out += "| layer | tokens | imbalance | unused |";
  for (int m = 1; m <= k; ++m) out += absl::StrCat(" top-", m, " |");
  out += absl::StrCat(" hot experts (share of selections), top ", top, " |\n|---:|---:|---:|---:|");
  for (int m = 1; m <= k; ++m) out += "---:|";
  out += "---|\n";
  std::vector<double> mean_mass(k, 0.0);
  double mean_imbalance = 0;
  int n = 0;
  for (const ktx::v1::LayerUsage& l : p.layers()) {
    const int il = l.layer();
    if (l.n_tokens() == 0) continue;
    out += absl::StrFormat("| %d | %d | %.2f | %d |", il, l.n_tokens(), usage.Imbalance(il),
                           usage.UnusedExperts(il));
    for (int m = 1; m <= k; ++m) {
      const double mass = usage.MassCoveredByTop(il, m);
      mean_mass[m - 1] += mass;
      out += absl::StrCat(" ", Pct(mass), " |");
    }
    std::vector<std::string> hot;
    int64_t total = 0;
    for (int64_t c : l.count()) total += c;
    for (int32_t e : usage.HotExperts(il, top)) {
      hot.push_back(absl::StrFormat(
          "%d (%.1f%%)", e, total > 0 ? 100.0 * l.count(e) / static_cast<double>(total) : 0));
    }
    out += absl::StrCat(" ", absl::StrJoin(hot, ", "), " |\n");
    mean_imbalance += usage.Imbalance(il);
    ++n;
  }
  if (n > 0) {
    out += absl::StrFormat("| mean | | %.2f | |", mean_imbalance / n);
    for (int m = 1; m <= k; ++m) out += absl::StrCat(" ", Pct(mean_mass[m - 1] / n), " |");
    out += " |\n";
  }
  return out;
}

nlohmann::json SummaryJson(const ktx::v1::ExpertUsageProfile& p, int top) {
  const models::ExpertUsage usage = UsageFromProto(p);
  nlohmann::json j;
  j["model"] = p.model();
  j["n_prompts"] = p.n_prompts();
  j["n_tokens"] = p.n_tokens();
  j["n_expert"] = p.n_expert();
  j["n_expert_used"] = p.n_expert_used();
  j["routing_policy"] = p.routing_policy().empty() ? "full" : p.routing_policy();
  j["layers"] = nlohmann::json::array();
  for (const ktx::v1::LayerUsage& l : p.layers()) {
    const int il = l.layer();
    nlohmann::json row;
    row["layer"] = il;
    row["n_tokens"] = l.n_tokens();
    row["imbalance"] = usage.Imbalance(il);
    row["unused_experts"] = usage.UnusedExperts(il);
    row["hot_experts"] = usage.HotExperts(il, top);
    row["hot_share"] = usage.SelectionShareOfHot(il, top);
    std::vector<double> mass;
    for (int m = 1; m <= p.n_expert_used(); ++m) mass.push_back(usage.MassCoveredByTop(il, m));
    row["mass_top_m"] = mass;  // [m - 1]: mass of the m heaviest
    j["layers"].push_back(row);
  }
  return j;
}

absl::Status RunProfile(const ProfileFlags& flags) {
  if (flags.gen < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--gen ", flags.gen, ": expected >= 0"));
  }
  if (flags.prefill_chunk <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--prefill-chunk ", flags.prefill_chunk, ": expected > 0"));
  }
  if (flags.threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--threads ", flags.threads, ": expected >= 0"));
  }
  KTX_ASSIGN_OR_RETURN(const bool fast, moe_backend::ParseExpertsFlag(flags.experts));
  KTX_ASSIGN_OR_RETURN(std::shared_ptr<const models::RoutingPolicy> policy,
                       ParsePolicyFlag(flags.policy));
  KTX_ASSIGN_OR_RETURN(const std::vector<std::string> prompts, ReadPrompts(flags.prompts));
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
  const models::Deepseek2Model& model = engine->model();
  const models::Deepseek2Hparams& hp = model.hparams();
  if (policy != nullptr) KTX_RETURN_IF_ERROR(policy->Validate(hp.n_layer, hp.n_expert_used));

  models::ExpertUsage usage(hp.n_layer, hp.n_expert, hp.n_expert_used);
  absl::Status record_status;
  models::ForwardOptions forward;
  forward.policy = policy.get();
  forward.on_routing = [&](int il, const models::Routing& routing) {
    if (absl::Status s = usage.Record(il, routing); !s.ok() && record_status.ok()) {
      record_status = s;
    }
  };
  int64_t n_tokens = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < prompts.size(); ++i) {
    engine::GenerateRequest request;
    request.prompt = prompts[i];
    request.chat = flags.chat;
    KTX_ASSIGN_OR_RETURN(const std::vector<int32_t> ids, engine->TokenizePrompt(request));
    if (ids.empty()) continue;
    const int64_t len = static_cast<int64_t>(ids.size());
    if (len + flags.gen > hp.n_ctx_train) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt ", i + 1, " has ", len, " tokens; with --gen ", flags.gen,
                       " that exceeds the model's context of ", hp.n_ctx_train));
    }
    KTX_ASSIGN_OR_RETURN(std::unique_ptr<kv_cache::SequenceKv> kv,
                         kv_cache::SequenceKv::Create(model.kv_layout(), len + flags.gen));
    models::Activations logits;
    for (int64_t b = 0; b < len; b += flags.prefill_chunk) {
      const int64_t n = std::min(flags.prefill_chunk, len - b);
      KTX_RETURN_IF_ERROR(model.Forward(std::span(ids).subspan(b, n), kv.get(),
                                        models::LogitsRows::kLast, &logits, forward));
    }
    for (int64_t g = 0; g < flags.gen; ++g) {
      const float* row = logits.row(0);
      const int32_t next = static_cast<int32_t>(std::max_element(row, row + model.n_vocab()) - row);
      const int32_t one[] = {next};
      KTX_RETURN_IF_ERROR(
          model.Forward(one, kv.get(), models::LogitsRows::kLast, &logits, forward));
    }
    KTX_RETURN_IF_ERROR(record_status);
    n_tokens += len + flags.gen;
    std::fprintf(stderr, "\rprofile: prompt %zu/%zu, %lld tokens", i + 1, prompts.size(),
                 static_cast<long long>(n_tokens));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, " (%.1f s)\n", seconds);

  ktx::v1::ExpertUsageProfile profile = UsageToProto(usage);
  profile.set_model(flags.model);
  profile.set_architecture("deepseek2");
  profile.set_n_prompts(static_cast<int64_t>(prompts.size()));
  profile.set_n_tokens(n_tokens);
  profile.set_routing_policy(policy != nullptr ? policy->ToString() : "full");
  profile.set_prompts(flags.prompts);
  profile.set_created(UtcNow());
  KTX_RETURN_IF_ERROR(topology::ValidateExpertUsageProfile(profile, flags.out));
  KTX_RETURN_IF_ERROR(topology::WriteExpertUsageProfile(profile, flags.out));
  std::cout << FormatSummary(profile, flags.top);
  std::fprintf(stderr, "wrote %s\n", flags.out.c_str());
  return absl::OkStatus();
}

absl::Status RunShow(const ShowFlags& flags) {
  if (flags.top < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--top ", flags.top, ": expected >= 1"));
  }
  KTX_ASSIGN_OR_RETURN(const ktx::v1::ExpertUsageProfile profile,
                       topology::ReadExpertUsageProfile(flags.file));
  if (flags.json) {
    std::cout << SummaryJson(profile, flags.top).dump(2) << "\n";
  } else {
    std::cout << FormatSummary(profile, flags.top);
  }
  return absl::OkStatus();
}

}  // namespace

void AddProfileCommands(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<ProfileFlags>();
  CLI::App* cmd = app.add_subcommand(
      "profile", "Record which routed experts a set of prompts uses (expert-usage profile)");
  cmd->require_subcommand(0, 1);
  cmd->add_option("--model", flags->model, "GGUF model file (the first part of a split model)");
  cmd->add_option("--prompts", flags->prompts,
                  "Prompts, one per line (or JSON lines with \"prompt\" or \"text\")");
  cmd->add_option("--out", flags->out,
                  "Profile file (default profile.pb; *.textproto / *.txtpb: text format)");
  cmd->add_option("--gen", flags->gen, "Greedy decode steps after each prompt (default 0)");
  cmd->add_flag("--chat", flags->chat, "Render each prompt as a user message of the chat template");
  cmd->add_option("--policy", flags->policy, kPolicyFlagHelp);
  cmd->add_option("--experts", flags->experts,
                  "Routed experts: fast (CPU kernels, default) or reference (scalar oracle)");
  cmd->add_option("--threads", flags->threads, "Worker threads (default: all cores)");
  cmd->add_option("--prefill-chunk", flags->prefill_chunk,
                  "Prefill in batches of at most N tokens (default 512)");
  cmd->add_option("--top", flags->top, "Hot experts listed per layer (default 8)");

  auto show = std::make_shared<ShowFlags>();
  CLI::App* show_cmd =
      cmd->add_subcommand("show", "Summarise a profile: hot experts, top-m mass, imbalance");
  show_cmd->add_option("file", show->file, "Profile file (binary or text)")->required();
  show_cmd->add_option("--top", show->top, "Hot experts listed per layer (default 8)");
  show_cmd->add_flag("--json", show->json, "JSON instead of the table");
  show_cmd->callback([exit_code, show] {
    const absl::Status s = RunShow(*show);
    if (!s.ok()) std::cerr << "ktx-ctl profile show: " << s << "\n";
    *exit_code = s.ok() ? 0 : 1;
  });
  cmd->callback([exit_code, flags, show_cmd] {
    if (show_cmd->parsed()) return;
    absl::Status s;
    if (flags->model.empty() || flags->prompts.empty()) {
      s = absl::InvalidArgumentError("--model and --prompts are required (or: profile show FILE)");
    } else {
      s = RunProfile(*flags);
    }
    if (!s.ok()) std::cerr << "ktx-ctl profile: " << s << "\n";
    *exit_code = s.ok() ? 0 : 1;
  });
}

}  // namespace ktx::cli
