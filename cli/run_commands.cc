// ktx-ctl run / logits: the reference engine on the command line.
//
//   ktx-ctl run --model M.gguf --prompt "Once upon a time" --max-tokens 64 --temperature 0
//       streams the generated text to stdout (then a newline), and prints the
//       prefill and decode throughput and the stop reason to stderr.
//   ktx-ctl run --model M.gguf --prompt "Hi" --chat --system "Be brief." --stop "\n\n"
//   ktx-ctl logits --model M.gguf --tokens 0,15,27 --out logits.f32
//       writes float32 little-endian logits for every position, row-major
//       [n_tokens, n_vocab], and prints the shape to stderr.
//
// Both run the reference engine (runtime/engine/reference_engine.h) on
// --threads threads (default: all), its routed experts on the fast CPU kernels
// (--experts fast, the default: runtime/moe_backend) or on the scalar
// reference path (--experts reference, the oracle). With --topology FILE or
// --shards N they run on the in-process actor runtime (actors/engine.h)
// instead (--experts picks the shards' expert backend there).
// --policy SPEC sets a routing policy (docs/experts.md); on the actor runtime
// it may also come from the topology config's routing_policy (every policy
// runs there: reduced top-k, adaptive, deferral).
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "actors/engine.h"
#include "cli/commands.h"
#include "cli/gpu_hot_experts_flags.h"
#include "cli/routing_policy_flags.h"
#include "runtime/engine/reference_engine.h"
#include "runtime/moe_backend/cpu_moe_backend.h"
#include "tbb/global_control.h"

namespace ktx::cli {
namespace {

struct CommonFlags {
  std::string model;
  int threads = 0;  // 0: all
  int64_t ctx_size = 4096;
  int64_t prefill_chunk = 0;
  std::string experts = "fast";  // fast | reference
  std::string policy;            // --policy (docs/experts.md); empty: the model's routing
};

struct RunFlags {
  CommonFlags common;
  std::string prompt;
  bool chat = false;
  std::string system;
  std::string chat_template;
  std::string think;  // "", "on", "off"
  int32_t max_tokens = 256;
  sampler::SamplingParams sampling;
  std::vector<std::string> stop;
};

struct LogitsFlags {
  CommonFlags common;
  std::string tokens;
  std::string out;
};

void AddCommonFlags(CLI::App* cmd, CommonFlags* flags) {
  cmd->add_option("--model", flags->model, "GGUF model file (the first part of a split model)")
      ->required();
  cmd->add_option("--threads", flags->threads, "Worker threads (default: all cores)");
  cmd->add_option("--prefill-chunk", flags->prefill_chunk,
                  "Prefill in batches of at most N tokens (default 0: the whole prompt at once)");
  cmd->add_option("--experts", flags->experts,
                  "Routed experts: fast (CPU kernels, default) or reference (scalar oracle)");
  cmd->add_option("--policy", flags->policy, kPolicyFlagHelp);
}

// Validates the common flags, limits the thread pool and opens the engine;
// with --experts fast (and `experts` given) attaches the CPU expert kernels,
// held in *experts, which must outlive the engine's use.
absl::StatusOr<std::unique_ptr<engine::ReferenceEngine>> OpenEngine(
    const CommonFlags& flags, const std::string& chat_template,
    std::optional<tbb::global_control>* threads,
    std::unique_ptr<moe_backend::CpuExperts>* experts = nullptr) {
  KTX_ASSIGN_OR_RETURN(const bool fast_experts, moe_backend::ParseExpertsFlag(flags.experts));
  if (flags.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--threads ", flags.threads, ": expected a positive count (or 0 for all)"));
  }
  if (flags.threads > 0) {
    threads->emplace(tbb::global_control::max_allowed_parallelism,
                     static_cast<size_t>(flags.threads));
  }
  if (flags.ctx_size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--ctx-size ", flags.ctx_size, ": expected >= 0 (0: the model's context)"));
  }
  if (flags.prefill_chunk < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--prefill-chunk ", flags.prefill_chunk,
                                                   ": expected >= 0 (0: the whole prompt)"));
  }
  engine::EngineOptions options;
  options.n_ctx = flags.ctx_size;
  options.prefill_chunk = flags.prefill_chunk;
  options.chat_template = chat_template;
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<engine::ReferenceEngine> engine,
                       engine::ReferenceEngine::Open(flags.model, options));
  if (fast_experts && experts != nullptr) {
    KTX_ASSIGN_OR_RETURN(*experts,
                         moe_backend::CpuExperts::Attach(&engine->mutable_model(), flags.threads));
  }
  return engine;
}

int RunGenerate(const RunFlags& flags) {
  std::optional<tbb::global_control> threads;
  std::unique_ptr<moe_backend::CpuExperts> experts;
  if (flags.max_tokens <= 0) {
    std::cerr << "ktx-ctl run: --max-tokens " << flags.max_tokens
              << ": expected a positive count\n";
    return 1;
  }
  if (!flags.chat &&
      (!flags.system.empty() || !flags.chat_template.empty() || !flags.think.empty())) {
    std::cerr << "ktx-ctl run: --system, --chat-template and --think need --chat\n";
    return 1;
  }
  if (absl::Status s = flags.sampling.Validate(); !s.ok()) {
    std::cerr << "ktx-ctl run: " << s.message() << "\n";
    return 1;
  }
  absl::StatusOr<std::shared_ptr<const models::RoutingPolicy>> policy =
      ParsePolicyFlag(flags.common.policy);
  if (!policy.ok()) {
    std::cerr << "ktx-ctl run: " << policy.status().message() << "\n";
    return 1;
  }
  absl::StatusOr<std::unique_ptr<engine::ReferenceEngine>> engine =
      OpenEngine(flags.common, flags.chat_template, &threads, &experts);
  if (!engine.ok()) {
    std::cerr << "ktx-ctl run: " << engine.status() << "\n";
    return 1;
  }
  engine::GenerateRequest request;
  request.routing_policy = *policy;  // this request's own (null: the model's routing)
  request.prompt = flags.prompt;
  request.chat = flags.chat;
  request.system = flags.system;
  if (!flags.think.empty()) request.force_think = flags.think == "on";
  request.max_tokens = flags.max_tokens;
  request.sampling = flags.sampling;
  request.stop = flags.stop;
  bool printed = false;
  absl::StatusOr<engine::GenerateResult> result =
      (*engine)->Generate(request, [&printed](std::string_view text) {
        std::cout.write(text.data(), static_cast<std::streamsize>(text.size()));
        std::cout.flush();
        printed = true;
        return true;
      });
  if (result.ok() || printed) {
    std::cout << "\n";
    std::cout.flush();
  }
  if (!result.ok()) {
    std::cerr << "ktx-ctl run: " << result.status() << "\n";
    return 1;
  }
  std::fprintf(stderr,
               "prefill: %zu tokens in %.3f s (%.2f tok/s)\n"
               "decode: %zu tokens, %lld passes in %.3f s (%.2f tok/s)\n"
               "stop: %s\n",
               result->prompt_tokens.size(), result->prefill_seconds, result->prefill_tok_s(),
               result->tokens.size(), static_cast<long long>(result->n_decode_passes),
               result->decode_seconds, result->decode_tok_s(),
               engine::StopReasonName(result->stop_reason));
  return 0;
}

absl::StatusOr<std::vector<int32_t>> ParseTokens(const std::string& text) {
  std::vector<int32_t> ids;
  if (text.empty()) return absl::InvalidArgumentError("--tokens: no token ids given");
  int index = 0;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(part, &id) || id < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--tokens: entry ", index, " ('",
                                                     std::string(part.data(), part.size()),
                                                     "') is not a token id (a number >= 0)"));
    }
    ids.push_back(id);
    ++index;
  }
  return ids;
}

int RunLogits(const LogitsFlags& flags) {
  std::optional<tbb::global_control> threads;
  std::unique_ptr<moe_backend::CpuExperts> experts;
  absl::StatusOr<std::vector<int32_t>> tokens = ParseTokens(flags.tokens);
  if (!tokens.ok()) {
    std::cerr << "ktx-ctl logits: " << tokens.status().message() << "\n";
    return 1;
  }
  absl::StatusOr<std::shared_ptr<const models::RoutingPolicy>> policy =
      ParsePolicyFlag(flags.common.policy);
  if (!policy.ok()) {
    std::cerr << "ktx-ctl logits: " << policy.status().message() << "\n";
    return 1;
  }
  absl::StatusOr<std::unique_ptr<engine::ReferenceEngine>> engine =
      OpenEngine(flags.common, "", &threads, &experts);
  if (!engine.ok()) {
    std::cerr << "ktx-ctl logits: " << engine.status() << "\n";
    return 1;
  }
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<float>> logits = (*engine)->Logits(*tokens, policy->get());
  if (!logits.ok()) {
    std::cerr << "ktx-ctl logits: " << logits.status() << "\n";
    return 1;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::ofstream out(flags.out, std::ios::binary | std::ios::trunc);
  if (out) {
    out.write(reinterpret_cast<const char*>(logits->data()),
              static_cast<std::streamsize>(logits->size() * sizeof(float)));
  }
  if (!out || !out.flush()) {
    std::cerr << "ktx-ctl logits: cannot write " << flags.out << ": " << std::strerror(errno)
              << "\n";
    return 1;
  }
  std::fprintf(stderr, "wrote float32 logits [%zu, %lld] to %s (%.3f s, %.2f tok/s)\n",
               tokens->size(), static_cast<long long>((*engine)->model().n_vocab()),
               flags.out.c_str(), seconds, seconds > 0 ? tokens->size() / seconds : 0.0);
  return 0;
}

// ---- --topology FILE / --shards N: the same commands on the in-process actor
// runtime (actors/engine.h) instead of the reference engine. ----

struct ActorFlags {
  std::string topology;
  int shards = 0;
  std::string attention_device;    // empty: the topology's (else cpu)
  double gpu_hot_experts_gib = 0;  // hot routed experts resident on the GPU
  std::string profile;             // expert-usage profile for the placement
  bool enabled() const {
    return !topology.empty() || shards != 0 || !attention_device.empty() ||
           gpu_hot_experts_gib != 0 || !profile.empty();
  }
};

std::shared_ptr<ActorFlags> AddActorFlags(CLI::App* cmd) {
  auto flags = std::make_shared<ActorFlags>();
  cmd->add_option("--topology", flags->topology,
                  "Run on the actor runtime with the expert shards of this topology config");
  cmd->add_option("--shards", flags->shards, "Run on the actor runtime with N even expert shards");
  cmd->add_option("--attention-device", flags->attention_device,
                  "With --topology/--shards: where attention (all non-expert stages) runs, cpu "
                  "or cuda:N (overrides the topology's attention_device)");
  cmd->add_option("--gpu-hot-experts-gib", flags->gpu_hot_experts_gib, kGpuHotExpertsFlagHelp);
  cmd->add_option("--profile", flags->profile, kPlacementProfileFlagHelp);
  return flags;
}

absl::StatusOr<std::unique_ptr<actors::Engine>> OpenActorEngine(const CommonFlags& common,
                                                                const ActorFlags& actor,
                                                                int64_t n_ctx) {
  if (!actor.topology.empty() && actor.shards != 0) {
    return absl::InvalidArgumentError("give --topology or --shards, not both");
  }
  if (actor.shards < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--shards ", actor.shards, ": expected a positive count"));
  }
  if (!actor.attention_device.empty()) {
    if (actor.topology.empty() && actor.shards == 0) {
      return absl::InvalidArgumentError(
          "--attention-device runs on the actor runtime: give --topology FILE or --shards N too");
    }
    KTX_RETURN_IF_ERROR(
        actors::ParseAttentionDevice(actor.attention_device, "--attention-device").status());
  }
  actors::EngineOptions options;
  if (!actor.topology.empty()) {
    KTX_ASSIGN_OR_RETURN(options, actors::EngineOptionsFromTopologyFile(actor.topology));
  } else {
    options.shards = actors::EvenShards(actor.shards);
  }
  if (!actor.attention_device.empty()) options.attention_device = actor.attention_device;
  if ((actor.gpu_hot_experts_gib != 0 || !actor.profile.empty()) && actor.topology.empty() &&
      actor.shards == 0) {
    return absl::InvalidArgumentError(
        "--gpu-hot-experts-gib and --profile run on the actor runtime: give --topology FILE or "
        "--shards N (and --attention-device cuda:N) too");
  }
  KTX_RETURN_IF_ERROR(ApplyGpuHotExpertsFlags(actor.gpu_hot_experts_gib, actor.profile, &options));
  const bool gpu_attention = options.attention_device != "cpu" && !options.attention_device.empty();
  KTX_ASSIGN_OR_RETURN(const bool fast_experts, moe_backend::ParseExpertsFlag(common.experts));
  options.experts =
      fast_experts ? actors::ExpertsBackend::kFast : actors::ExpertsBackend::kReference;
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<models::Deepseek2Model> model,
                       models::Deepseek2Model::Open(common.model));
  // The routing policy: --policy, else the topology config's routing_policy.
  KTX_ASSIGN_OR_RETURN(std::shared_ptr<const models::RoutingPolicy> policy,
                       ParsePolicyFlag(common.policy));
  if (policy == nullptr && !actor.topology.empty()) {
    KTX_ASSIGN_OR_RETURN(policy, RoutingPolicyFromTopologyFile(actor.topology));
  }
  // Every policy runs on the actor runtime: reduced top-k rows (padding
  // skipped by the router and the shards) and deferral overlapped with the
  // next layer (docs/experts.md).
  if (policy != nullptr) KTX_RETURN_IF_ERROR(model->SetRoutingPolicy(policy));
  options.n_ctx = n_ctx;
  const int64_t ctx =
      n_ctx > 0 ? std::min(n_ctx, model->hparams().n_ctx_train) : model->hparams().n_ctx_train;
  // On the GPU a step's tokens size the work buffers: whole-context chunks
  // would not fit, so the default chunk is at most 512 there.
  options.prefill_chunk = common.prefill_chunk > 0 ? common.prefill_chunk
                          : gpu_attention          ? std::min<int64_t>(ctx, 512)
                                                   : ctx;
  options.kv_budget_bytes = std::max<uint64_t>(
      options.kv_budget_bytes, static_cast<uint64_t>(ctx) * model->kv_layout().bytes_per_token());
  return actors::Engine::Create(std::move(model), options);
}

int RunGenerateWithActors(const RunFlags& flags, const ActorFlags& actor) {
  std::optional<tbb::global_control> threads;
  if (flags.max_tokens <= 0 || (!flags.chat && !flags.system.empty())) {
    return RunGenerate(flags);  // its checks print the error
  }
  // The reference engine tokenizes exactly as `run` does without --topology.
  absl::StatusOr<std::unique_ptr<engine::ReferenceEngine>> reference =
      OpenEngine(flags.common, flags.chat_template, &threads);
  if (!reference.ok()) {
    std::cerr << "ktx-ctl run: " << reference.status() << "\n";
    return 1;
  }
  engine::GenerateRequest text_request;
  text_request.prompt = flags.prompt;
  text_request.chat = flags.chat;
  text_request.system = flags.system;
  absl::StatusOr<std::vector<int32_t>> ids = (*reference)->TokenizePrompt(text_request);
  if (!ids.ok()) {
    std::cerr << "ktx-ctl run: " << ids.status() << "\n";
    return 1;
  }
  absl::StatusOr<std::unique_ptr<actors::Engine>> engine =
      OpenActorEngine(flags.common, actor, (*reference)->n_ctx());
  if (!engine.ok()) {
    std::cerr << "ktx-ctl run: " << engine.status() << "\n";
    return 1;
  }
  actors::GenerateRequest request;
  request.prompt = std::move(*ids);
  request.sampling = flags.sampling;
  request.max_tokens = flags.max_tokens;
  request.stop_strings = flags.stop;
  const auto t0 = std::chrono::steady_clock::now();
  double first_s = 0;
  absl::StatusOr<actors::GenerateResult> result =
      (*engine)->Generate(request, [&](int32_t, std::string_view text) {
        if (first_s == 0) {
          first_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
        std::cout.write(text.data(), static_cast<std::streamsize>(text.size()));
        std::cout.flush();
        return true;
      });
  std::cout << "\n";
  if (!result.ok()) {
    std::cerr << "ktx-ctl run: " << result.status() << "\n";
    return 1;
  }
  const double total_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const size_t n = result->tokens.size();
  std::fprintf(stderr,
               "actor runtime: prompt %zu tokens, first token after %.3f s\n"
               "decode: %zu tokens in %.3f s (%.2f tok/s after the first)\nstop: %s\n",
               request.prompt.size(), first_s, n, total_s,
               n > 1 && total_s > first_s ? (n - 1) / (total_s - first_s) : 0.0,
               actors::FinishReasonName(result->finish_reason));
  return 0;
}

int RunLogitsWithActors(const LogitsFlags& flags, const ActorFlags& actor) {
  std::optional<tbb::global_control> threads;
  if (flags.common.threads > 0) {
    threads.emplace(tbb::global_control::max_allowed_parallelism,
                    static_cast<size_t>(flags.common.threads));
  }
  absl::StatusOr<std::vector<int32_t>> tokens = ParseTokens(flags.tokens);
  if (!tokens.ok()) {
    std::cerr << "ktx-ctl logits: " << tokens.status().message() << "\n";
    return 1;
  }
  absl::StatusOr<std::unique_ptr<actors::Engine>> engine = OpenActorEngine(flags.common, actor, 0);
  if (!engine.ok()) {
    std::cerr << "ktx-ctl logits: " << engine.status() << "\n";
    return 1;
  }
  absl::StatusOr<models::Activations> logits = (*engine)->Logits(*tokens);
  if (!logits.ok()) {
    std::cerr << "ktx-ctl logits: " << logits.status() << "\n";
    return 1;
  }
  std::ofstream out(flags.out, std::ios::binary | std::ios::trunc);
  if (out) {
    out.write(reinterpret_cast<const char*>(logits->data()),
              static_cast<std::streamsize>(logits->values().size() * sizeof(float)));
  }
  if (!out || !out.flush()) {
    std::cerr << "ktx-ctl logits: cannot write " << flags.out << ": " << std::strerror(errno)
              << "\n";
    return 1;
  }
  std::fprintf(stderr, "wrote float32 logits [%lld, %lld] to %s (actor runtime)\n",
               static_cast<long long>(logits->n_tokens()), static_cast<long long>(logits->n_cols()),
               flags.out.c_str());
  return 0;
}

}  // namespace

void AddRunCommands(CLI::App& app, int* exit_code) {
  auto run = std::make_shared<RunFlags>();
  // Command-line defaults: the usual llama.cpp-like sampling.
  run->sampling.temperature = 0.8f;
  run->sampling.top_k = 40;
  run->sampling.top_p = 0.95f;
  run->sampling.min_p = 0.05f;
  CLI::App* cmd = app.add_subcommand(
      "run", "Generate text with the reference engine; prefill and decode tok/s on stderr");
  AddCommonFlags(cmd, &run->common);
  cmd->add_option("--ctx-size", run->common.ctx_size,
                  "Context in tokens, prompt + generated (default 4096; 0: the model's)");
  cmd->add_option("--prompt", run->prompt, "The prompt text")->required();
  cmd->add_flag("--chat", run->chat, "Render the prompt as a user message of the chat template");
  cmd->add_option("--system", run->system, "System message (with --chat)");
  cmd->add_option("--chat-template", run->chat_template,
                  "deepseek-v3 or deepseek-r1 (default: recognised from the model)");
  cmd->add_option("--think", run->think,
                  "deepseek-r1: on = force the answer to open with <think>, off = never "
                  "(default: the template's)")
      ->check(CLI::IsMember({"on", "off"}));
  cmd->add_option("--max-tokens", run->max_tokens, "Tokens to generate at most (default 256)");
  cmd->add_option("--temperature", run->sampling.temperature,
                  "Sampling temperature, 0 = greedy (default 0.8)");
  cmd->add_option("--top-k", run->sampling.top_k, "Keep the k most likely tokens, 0 = off (40)");
  cmd->add_option("--top-p", run->sampling.top_p, "Nucleus sampling, 1 = off (default 0.95)");
  cmd->add_option("--min-p", run->sampling.min_p, "Min-p filter, 0 = off (default 0.05)");
  cmd->add_option("--repeat-penalty", run->sampling.repetition_penalty,
                  "Repetition penalty, 1 = off (default 1)");
  cmd->add_option("--presence-penalty", run->sampling.presence_penalty,
                  "Presence penalty, 0 = off (default 0)");
  cmd->add_option("--frequency-penalty", run->sampling.frequency_penalty,
                  "Frequency penalty, 0 = off (default 0)");
  cmd->add_option("--repeat-last-n", run->sampling.penalty_last_n,
                  "Penalty window in tokens (default 64)");
  cmd->add_option("--seed", run->sampling.seed, "RNG seed (default 0)");
  cmd->add_option("--stop", run->stop, "Stop string (repeatable); not printed");
  auto run_actors = AddActorFlags(cmd);
  cmd->callback([exit_code, run, run_actors] {
    *exit_code =
        run_actors->enabled() ? RunGenerateWithActors(*run, *run_actors) : RunGenerate(*run);
  });

  auto logits = std::make_shared<LogitsFlags>();
  CLI::App* lcmd = app.add_subcommand(
      "logits", "Write float32 logits of every position of a token sequence [n_tokens, n_vocab]");
  AddCommonFlags(lcmd, &logits->common);
  logits->common.ctx_size = 0;
  lcmd->add_option("--tokens", logits->tokens, "Token ids, comma-separated (e.g. 0,15,27)")
      ->required();
  lcmd->add_option("--out", logits->out, "Output file (raw little-endian float32)")->required();
  auto logits_actors = AddActorFlags(lcmd);
  lcmd->callback([exit_code, logits, logits_actors] {
    *exit_code = logits_actors->enabled() ? RunLogitsWithActors(*logits, *logits_actors)
                                          : RunLogits(*logits);
  });
}

}  // namespace ktx::cli
