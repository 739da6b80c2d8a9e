// ktx-node: one ktx process. Today it runs the whole in-process actor runtime
// (actors/engine.h): the expert shards of a topology (or --shards N even
// ones), the router, the attention actor and the scheduler, all in this
// process. It loads the model, builds the engine, prints its readiness and
// layout, and then either runs one prompt (--prompt) or exits: the gRPC
// server that will make it serve requests comes with the next issue.
//
//   ktx-node --model M.gguf                          # readiness + layout, exit 0
//   ktx-node --model M.gguf --shards 2 --prompt "Once upon a time" --max-tokens 32
//   ktx-node --model M.gguf --topology configs/node.textproto --prompt "Hi" --chat
//   ktx-node --model M.gguf --shards 2 --experts reference   # the scalar oracle experts
//
// The layout printed per shard: cpus, routed experts and bytes held, NUMA node
// of the copies, kernel variant (fast experts: each shard repacks only its own
// experts on its own node; actors/fast_experts.h).
//
// Generated text goes to stdout; readiness, layout and statistics to stderr.
// Exit 1 on any error (message on stderr).
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "actors/engine.h"
#include "runtime/base/logging.h"
#include "runtime/models/deepseek2.h"
#include "runtime/moe_backend/cpu_moe_backend.h"
#include "runtime/tokenizer/chat_template.h"
#include "runtime/tokenizer/tokenizer_gguf.h"

namespace {

struct Flags {
  std::string model;
  std::string topology;
  int shards = 0;
  std::string prompt;
  bool chat = false;
  std::string system;
  int32_t max_tokens = 64;
  ktx::sampler::SamplingParams sampling;
  std::vector<std::string> stop;
  uint64_t kv_budget_mib = 1024;
  int64_t ctx_size = 4096;
  int64_t prefill_chunk = 128;
  int caf_threads = 0;
  std::string experts = "fast";  // fast | reference
  std::string log_level;
};

absl::StatusOr<std::vector<int32_t>> TokenizePrompt(const ktx::models::Deepseek2Model& model,
                                                    const Flags& flags) {
  KTX_ASSIGN_OR_RETURN(ktx::tokenizer::Tokenizer tok,
                       ktx::tokenizer::TokenizerFromGguf(model.file().metadata()));
  if (!flags.chat) return tok.Tokenize(flags.prompt);
  KTX_ASSIGN_OR_RETURN(const ktx::tokenizer::ChatTemplate chat,
                       ktx::tokenizer::ChatTemplateFromGguf(model.file().metadata()));
  std::vector<ktx::tokenizer::ChatMessage> messages;
  if (!flags.system.empty()) messages.push_back({"system", flags.system});
  messages.push_back({"user", flags.prompt});
  KTX_ASSIGN_OR_RETURN(const std::vector<ktx::tokenizer::ChatSegment> segments,
                       chat.ApplySegments(messages));
  ktx::tokenizer::TokenizeOptions options;
  options.parse_special = false;  // message contents are untrusted text
  return ktx::tokenizer::TokenizeChat(tok, segments, options);
}

int Run(const Flags& flags) {
  if (!flags.topology.empty() && flags.shards > 0) {
    std::cerr << "ktx-node: give --topology or --shards, not both\n";
    return 1;
  }
  if (flags.shards < 0) {
    std::cerr << "ktx-node: --shards " << flags.shards << ": expected a positive count\n";
    return 1;
  }
  if (!flags.chat && !flags.system.empty()) {
    std::cerr << "ktx-node: --system needs --chat\n";
    return 1;
  }
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<ktx::models::Deepseek2Model>> model =
      ktx::models::Deepseek2Model::Open(flags.model);
  if (!model.ok()) {
    std::cerr << "ktx-node: " << model.status() << "\n";
    return 1;
  }
  std::shared_ptr<const ktx::models::Deepseek2Model> shared_model = std::move(*model);

  ktx::actors::EngineOptions options;
  if (!flags.topology.empty()) {
    absl::StatusOr<ktx::actors::EngineOptions> from_file =
        ktx::actors::EngineOptionsFromTopologyFile(flags.topology);
    if (!from_file.ok()) {
      std::cerr << "ktx-node: " << from_file.status() << "\n";
      return 1;
    }
    options = std::move(*from_file);
  } else {
    options.shards = ktx::actors::EvenShards(flags.shards > 0 ? flags.shards : 1);
  }
  options.kv_budget_bytes = flags.kv_budget_mib << 20;
  options.n_ctx = flags.ctx_size;
  options.prefill_chunk = flags.prefill_chunk;
  options.caf_threads = flags.caf_threads;
  absl::StatusOr<bool> fast = ktx::moe_backend::ParseExpertsFlag(flags.experts);
  if (!fast.ok()) {
    std::cerr << "ktx-node: " << fast.status().message() << "\n";
    return 1;
  }
  options.experts =
      *fast ? ktx::actors::ExpertsBackend::kFast : ktx::actors::ExpertsBackend::kReference;
  absl::StatusOr<std::unique_ptr<ktx::actors::Engine>> engine =
      ktx::actors::Engine::Create(shared_model, options);
  if (!engine.ok()) {
    std::cerr << "ktx-node: " << engine.status() << "\n";
    return 1;
  }
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const ktx::models::Deepseek2Hparams& hp = shared_model->hparams();
  std::cerr << "ktx-node ready in " << load_s << " s: " << flags.model << " (" << hp.n_layer
            << " layers, " << hp.n_expert << " routed experts x " << hp.n_expert_used
            << " per token, vocabulary " << hp.n_vocab << ")\n"
            << (*engine)->Describe();
  if (flags.prompt.empty()) {
    std::cerr << "no --prompt: nothing to serve yet (the gRPC server comes with the next "
                 "issue); exiting\n";
    return 0;
  }

  absl::StatusOr<std::vector<int32_t>> prompt = TokenizePrompt(*shared_model, flags);
  if (!prompt.ok()) {
    std::cerr << "ktx-node: " << prompt.status() << "\n";
    return 1;
  }
  ktx::actors::GenerateRequest request;
  request.prompt = std::move(*prompt);
  request.sampling = flags.sampling;
  request.max_tokens = flags.max_tokens;
  request.stop_strings = flags.stop;
  const auto start = std::chrono::steady_clock::now();
  double first_token_ms = -1;
  absl::StatusOr<ktx::actors::GenerateResult> result =
      (*engine)->Generate(request, [&](int32_t, std::string_view text) {
        if (first_token_ms < 0) {
          first_token_ms =
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                  .count();
        }
        std::cout.write(text.data(), static_cast<std::streamsize>(text.size()));
        std::cout.flush();
        return true;
      });
  std::cout << "\n";
  if (!result.ok()) {
    std::cerr << "ktx-node: " << result.status() << "\n";
    return 1;
  }
  const double total_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  const size_t n = result->tokens.size();
  std::fprintf(stderr,
               "prompt %zu tokens, first token after %.1f ms; %zu tokens in %.1f ms (%.2f tok/s "
               "after the first); stop: %s\n",
               request.prompt.size(), first_token_ms, n, total_ms,
               n > 1 ? (n - 1) / ((total_ms - first_token_ms) / 1000.0) : 0.0,
               ktx::actors::FinishReasonName(result->finish_reason));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "ktx-node: the ktx actor runtime in one process (shards, router, attention, "
      "scheduler)"};
  Flags flags;
  flags.sampling.temperature = 0.8f;
  flags.sampling.top_k = 40;
  flags.sampling.top_p = 0.95f;
  flags.sampling.min_p = 0.05f;
  app.add_option("--model", flags.model, "GGUF model file (the first part of a split model)")
      ->required();
  app.add_option("--topology", flags.topology,
                 "Topology config (text-format ktx.v1.TopologyConfig): every node's shards run "
                 "in this process");
  app.add_option("--shards", flags.shards,
                 "Even expert shards over this process's cpus (default 1)");
  app.add_option("--prompt", flags.prompt, "Run this prompt and exit");
  app.add_flag("--chat", flags.chat, "Render the prompt as a user message of the chat template");
  app.add_option("--system", flags.system, "System message (with --chat)");
  app.add_option("--max-tokens", flags.max_tokens, "Tokens to generate at most (default 64)");
  app.add_option("--temperature", flags.sampling.temperature, "0 = greedy (default 0.8)");
  app.add_option("--top-k", flags.sampling.top_k, "0 = off (default 40)");
  app.add_option("--top-p", flags.sampling.top_p, "1 = off (default 0.95)");
  app.add_option("--min-p", flags.sampling.min_p, "0 = off (default 0.05)");
  app.add_option("--seed", flags.sampling.seed, "RNG seed (default 0)");
  app.add_option("--stop", flags.stop, "Stop string (repeatable); not printed");
  app.add_option("--kv-budget-mib", flags.kv_budget_mib, "KV cache budget in MiB (default 1024)");
  app.add_option("--ctx-size", flags.ctx_size,
                 "Tokens per sequence at most (default 4096; 0: the model's context)");
  app.add_option("--prefill-chunk", flags.prefill_chunk,
                 "Prompt tokens per scheduler step (default 128)");
  app.add_option("--caf-threads", flags.caf_threads, "CAF scheduler threads (default: auto)");
  app.add_option("--experts", flags.experts,
                 "Routed experts: fast (CPU kernels on NUMA-local copies, default) or reference "
                 "(scalar oracle)");
  app.add_option("--log-level", flags.log_level,
                 "debug|info|warning|error|off (default: KTX_LOG_LEVEL or info)");
  CLI11_PARSE(app, argc, argv);
  if (!flags.log_level.empty()) {
    ktx::LogLevel level;
    if (!ktx::ParseLogLevel(flags.log_level, &level)) {
      std::cerr << "ktx-node: --log-level '" << flags.log_level
                << "': expected debug|info|warning|error|off\n";
      return 1;
    }
    ktx::SetLogLevel(level);
  }
  return Run(flags);
}
