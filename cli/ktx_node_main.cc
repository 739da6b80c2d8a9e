// ktx-node: one ktx process. With a topology and a node name it runs that
// node of a (possibly multi-process, multi-host) deployment:
//
//   ktx-node --model M.gguf --topology cluster.textproto --node head     # the head
//   ktx-node --model M.gguf --topology cluster.textproto --node socket1  # a shard node
//
// The head runs the scheduler, router and attention actor (actors/engine.h)
// with its own shards in-process and every other node's shards through remote
// proxies (actors/remote/); it waits for those nodes (--remote-wait-s), checks
// their model fingerprint and experts, then serves the Generation and
// NodeControl gRPC services (actors/service/) on its listen_address. A shard
// node hosts its shards (actors/remote/shard_host.h) and serves ExpertShard
// and NodeControl. Every node serves grpc.health.v1 and reflection.
//
// Without --node, the whole topology (or --shards N even shards) runs in this
// one process and serves on --listen (default 127.0.0.1:50051):
//
//   ktx-node --model M.gguf --shards 2 --listen 127.0.0.1:50051
//   ktx-node --model M.gguf --shards 2 --prompt "Once upon a time" --max-tokens 32   # one prompt,
//   exit ktx-node --model M.gguf --check                                  # readiness + layout,
//   exit 0
//
// Readiness goes to stderr as "ktx-node: node 'NAME' (ROLE) serving on ADDR"
// once the node answers calls. SIGTERM or SIGINT drains: the head refuses new
// Generate calls with UNAVAILABLE, lets those in flight finish (up to
// --drain-timeout-s) and exits 0; a shard node stops within a few seconds.
// Exit 1 on any start-up error (message on stderr, naming the file, node or
// flag).
#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "actors/engine.h"
#include "actors/remote/shard_host.h"
#include "actors/rpc/security.h"
#include "actors/service/generation_service.h"
#include "actors/service/node_control_service.h"
#include "actors/service/node_server.h"
#include "cli/gpu_hot_experts_flags.h"
#include "runtime/base/logging.h"
#include "runtime/gguf/fingerprint.h"
#include "runtime/models/deepseek2.h"
#include "runtime/moe_backend/cpu_moe_backend.h"
#include "runtime/tokenizer/chat_template.h"
#include "runtime/tokenizer/tokenizer_gguf.h"
#include "topology/config.h"

namespace {

struct Flags {
  std::string model;
  std::string topology;
  std::string node;
  int shards = 0;
  std::string listen = "127.0.0.1:50051";
  bool check = false;
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
  int64_t shard_deadline_ms = 30000;
  double remote_wait_s = 60;
  double drain_timeout_s = 60;
  std::string log_level;
  std::string attention_device;    // empty: the topology's (else cpu)
  double gpu_hot_experts_gib = 0;  // head: hot routed experts resident on the attention GPU
  std::string profile;             // head: expert-usage profile for the placement
};

int Fail(const absl::Status& status) {
  std::cerr << "ktx-node: " << status << "\n";
  return 1;
}

// ---- signals: SIGTERM/SIGINT are blocked in every thread and taken by one
// sigwait thread, which wakes the main thread. ----
class StopSignal {
 public:
  // Call first in main, before any thread exists.
  static void BlockInAllThreads() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);  // the waiter's wake-up at exit: never delivered as a signal
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
  }
  StopSignal() {
    waiter_ = std::thread([this] {
      sigset_t set;
      sigemptyset(&set);
      sigaddset(&set, SIGTERM);
      sigaddset(&set, SIGINT);
      sigaddset(&set, SIGUSR1);  // the destructor's wake-up
      int sig = 0;
      sigwait(&set, &sig);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (sig != SIGUSR1) signal_ = sig;
        fired_ = true;
      }
      cv_.notify_all();
    });
  }
  ~StopSignal() {
    bool fired;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fired = fired_;
    }
    if (!fired) pthread_kill(waiter_.native_handle(), SIGUSR1);
    waiter_.join();
  }
  // Blocks until SIGTERM or SIGINT; returns the signal.
  int Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return fired_; });
    return signal_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool fired_ = false;
  int signal_ = 0;
  std::thread waiter_;
};

const char* SignalName(int sig) { return sig == SIGINT ? "SIGINT" : "SIGTERM"; }

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

// One prompt through the engine, text to stdout (the pre-server mode, kept
// for scripts and tests).
int RunPrompt(ktx::actors::Engine& engine, const ktx::models::Deepseek2Model& model,
              const Flags& flags) {
  absl::StatusOr<std::vector<int32_t>> prompt = TokenizePrompt(model, flags);
  if (!prompt.ok()) return Fail(prompt.status());
  ktx::actors::GenerateRequest request;
  request.prompt = std::move(*prompt);
  request.sampling = flags.sampling;
  request.max_tokens = flags.max_tokens;
  request.stop_strings = flags.stop;
  const auto start = std::chrono::steady_clock::now();
  double first_token_ms = -1;
  absl::StatusOr<ktx::actors::GenerateResult> result =
      engine.Generate(request, [&](int32_t, std::string_view text) {
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
  if (!result.ok()) return Fail(result.status());
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

void ApplyEngineFlags(const Flags& flags, ktx::actors::EngineOptions* options) {
  options->kv_budget_bytes = flags.kv_budget_mib << 20;
  options->n_ctx = flags.ctx_size;
  options->prefill_chunk = flags.prefill_chunk;
  options->caf_threads = flags.caf_threads;
  options->shard_deadline = std::chrono::milliseconds(flags.shard_deadline_ms);
  options->remote_wait =
      std::chrono::milliseconds(static_cast<int64_t>(flags.remote_wait_s * 1000));
}

absl::StatusOr<ktx::actors::ExpertsBackend> ParseExperts(const std::string& name) {
  KTX_ASSIGN_OR_RETURN(bool fast, ktx::moe_backend::ParseExpertsFlag(name));
  return fast ? ktx::actors::ExpertsBackend::kFast : ktx::actors::ExpertsBackend::kReference;
}

// The node's server: address, security (from the node's entry or none).
struct ServerSetup {
  std::string address;
  bool allow_remote = false;
  ktx::rpc::RpcSecurity security;
};

absl::StatusOr<ServerSetup> ServerSetupFor(const ktx::topology::ParsedTopologyConfig* parsed,
                                           const std::string& node_name,
                                           const std::string& listen) {
  ServerSetup setup;
  setup.address = listen;
  if (parsed != nullptr && !node_name.empty()) {
    for (const ktx::v1::NodeConfig& node : parsed->config.nodes()) {
      if (node.name() != node_name) continue;
      setup.address = node.listen_address();
      const std::string dir = std::filesystem::path(parsed->path).parent_path().string();
      KTX_ASSIGN_OR_RETURN(setup.security, ktx::rpc::RpcSecurityFromNode(node, dir));
      // The topology names this address: serving on it is the operator's choice.
      KTX_ASSIGN_OR_RETURN(ktx::topology::HostPort hp,
                           ktx::topology::ParseListenAddress(node.listen_address()));
      setup.allow_remote = !ktx::topology::IsLoopbackHost(hp.host);
      return setup;
    }
    return absl::InvalidArgumentError(
        absl::StrCat("--node '", node_name, "': not a node of ", parsed->path));
  }
  return setup;
}

ktx::service::NodeServerOptions ServerOptionsFor(const ServerSetup& setup) {
  ktx::service::NodeServerOptions options;
  options.address = setup.address;
  options.allow_remote = setup.allow_remote;
  options.security = setup.security;
  return options;
}

void PrintReady(const std::string& node, const std::string& role, const std::string& address) {
  std::cerr << "ktx-node: node '" << node << "' (" << role << ") serving on " << address
            << std::endl;
}

// Serves until SIGTERM/SIGINT; drains; returns the exit code.
int ServeHead(StopSignal& stop, std::shared_ptr<const ktx::models::Deepseek2Model> model,
              std::unique_ptr<ktx::actors::Engine> engine, const ServerSetup& setup,
              const std::string& node_name, const Flags& flags) {
  ktx::service::GenerationServiceOptions gen_options;
  gen_options.security = setup.security;
  gen_options.fingerprint = ktx::gguf::ModelFingerprint(model->file());
  absl::StatusOr<std::unique_ptr<ktx::service::GenerationService>> generation =
      ktx::service::GenerationService::Create(engine.get(), gen_options);
  if (!generation.ok()) return Fail(generation.status());

  ktx::service::NodeServer server(ServerOptionsFor(setup));

  ktx::service::NodeControlOptions control_options;
  control_options.security = setup.security;
  control_options.node_name = node_name;
  control_options.role = ktx::v1::NODE_ROLE_HEAD;
  control_options.engine = engine.get();
  control_options.generation = generation->get();
  control_options.server = &server;
  control_options.topology_path = flags.topology;
  control_options.model_fingerprint = gen_options.fingerprint;
  for (const ktx::actors::ShardOptions& s : engine->shards()) {
    control_options.shard_locations.push_back({s.node, s.address});
  }
  absl::StatusOr<std::unique_ptr<ktx::service::NodeControlService>> control =
      ktx::service::NodeControlService::Create(std::move(control_options));
  if (!control.ok()) return Fail(control.status());

  server.AddService(generation->get(), ktx::service::GenerationService::kServiceName,
                    generation->get());
  server.AddService(control->get(), ktx::service::NodeControlService::kServiceName);
  if (absl::Status s = server.Start(); !s.ok()) return Fail(s);
  PrintReady(node_name, "head", server.address());

  const int sig = stop.Wait();
  std::cerr << "ktx-node: " << SignalName(sig) << ": draining (" << server.in_flight()
            << " requests in flight, waiting up to " << flags.drain_timeout_s << " s)" << std::endl;
  server.BeginDrain();
  const bool idle = server.WaitIdle(
      std::chrono::milliseconds(static_cast<int64_t>(flags.drain_timeout_s * 1000)));
  if (!idle) {
    std::cerr << "ktx-node: drain timeout: cancelling " << server.in_flight()
              << " requests still running" << std::endl;
  }
  server.Shutdown(std::chrono::seconds(5));
  control->reset();
  generation->reset();
  engine.reset();
  std::cerr << "ktx-node: node '" << node_name << "' stopped" << std::endl;
  return 0;
}

int ServeShards(StopSignal& stop, std::shared_ptr<const ktx::models::Deepseek2Model> model,
                const ktx::topology::ParsedTopologyConfig& parsed, const ServerSetup& setup,
                const std::string& node_name, const Flags& flags) {
  ktx::actors::ShardHostOptions host_options;
  host_options.security = setup.security;
  absl::StatusOr<ktx::actors::ExpertsBackend> experts = ParseExperts(flags.experts);
  if (!experts.ok()) return Fail(experts.status());
  host_options.experts = *experts;  // fast: NUMA-local copies of this node's shards
  absl::StatusOr<std::unique_ptr<ktx::actors::ShardHost>> host =
      ktx::actors::ShardHost::Create(model, parsed, node_name, host_options);
  if (!host.ok()) return Fail(host.status());
  std::cerr << (*host)->Describe();

  ktx::service::NodeServer server(ServerOptionsFor(setup));

  ktx::service::NodeControlOptions control_options;
  control_options.security = setup.security;
  control_options.node_name = node_name;
  control_options.role = ktx::v1::NODE_ROLE_SHARD;
  control_options.server = &server;
  control_options.topology_path = flags.topology;
  control_options.model_fingerprint = (*host)->fingerprint();
  ktx::actors::ShardHost* host_ptr = host->get();
  control_options.add_status = [host_ptr, node_name](ktx::v1::NodeStatusResponse* response) {
    const ktx::v1::ShardInfoResponse info = host_ptr->Info();
    for (const ktx::v1::HostedShard& hosted : info.shards()) {
      ktx::v1::ShardStatus* shard = response->add_shards();
      shard->set_name(hosted.name());
      shard->set_node(node_name);
      shard->set_alive(true);
      shard->set_expert_bytes(hosted.bytes());
      shard->set_n_experts(static_cast<int32_t>(hosted.n_experts()));
    }
  };
  absl::StatusOr<std::unique_ptr<ktx::service::NodeControlService>> control =
      ktx::service::NodeControlService::Create(std::move(control_options));
  if (!control.ok()) return Fail(control.status());

  server.AddService((*host)->service(), "ktx.v1.ExpertShard");
  server.AddService(control->get(), ktx::service::NodeControlService::kServiceName);
  if (absl::Status s = server.Start(); !s.ok()) return Fail(s);
  PrintReady(node_name, "shards", server.address());

  const int sig = stop.Wait();
  std::cerr << "ktx-node: " << SignalName(sig) << ": stopping (parts in progress finish)"
            << std::endl;
  server.BeginDrain();
  server.Shutdown(std::chrono::seconds(2));
  control->reset();
  host->reset();
  std::cerr << "ktx-node: node '" << node_name << "' stopped" << std::endl;
  return 0;
}

int Run(const Flags& flags) {
  if (!flags.topology.empty() && flags.shards > 0) {
    return Fail(absl::InvalidArgumentError("give --topology or --shards, not both"));
  }
  if (!flags.node.empty() && flags.topology.empty()) {
    return Fail(absl::InvalidArgumentError("--node needs --topology"));
  }
  if (flags.shards < 0) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--shards ", flags.shards, ": expected a positive count")));
  }
  if (!flags.chat && !flags.system.empty()) {
    return Fail(absl::InvalidArgumentError("--system needs --chat"));
  }
  if (flags.check && !flags.prompt.empty()) {
    return Fail(absl::InvalidArgumentError("give --check or --prompt, not both"));
  }
  absl::StatusOr<ktx::actors::ExpertsBackend> experts = ParseExperts(flags.experts);
  if (!experts.ok()) return Fail(experts.status());
  if (!flags.attention_device.empty()) {
    const absl::Status device =
        ktx::actors::ParseAttentionDevice(flags.attention_device, "--attention-device").status();
    if (!device.ok()) return Fail(device);
  }

  // Parse (and check) the config before the long model load.
  std::optional<ktx::topology::ParsedTopologyConfig> parsed;
  bool head = true;
  if (!flags.topology.empty()) {
    absl::StatusOr<ktx::topology::ParsedTopologyConfig> p =
        ktx::topology::ParseTopologyConfigFile(flags.topology);
    if (!p.ok()) return Fail(p.status());
    parsed = std::move(*p);
    if (!flags.node.empty()) {
      bool found = false;
      for (const ktx::v1::NodeConfig& node : parsed->config.nodes()) {
        if (node.name() == flags.node) {
          found = true;
          head = node.head();
        }
      }
      if (!found) {
        return Fail(absl::InvalidArgumentError(
            absl::StrCat("--node '", flags.node, "': not a node of ", flags.topology)));
      }
    }
  }
  const std::string node_name = flags.node.empty() ? "local" : flags.node;
  if (!head && (!flags.prompt.empty())) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--prompt: node '", flags.node, "' is not the head")));
  }
  absl::StatusOr<ServerSetup> setup =
      ServerSetupFor(parsed ? &*parsed : nullptr, flags.node, flags.listen);
  if (!setup.ok()) return Fail(setup.status());
  if (flags.prompt.empty() && !flags.check) {
    if (absl::Status s = ktx::rpc::CheckBindAddress(setup->address, setup->allow_remote); !s.ok()) {
      return Fail(s);
    }
  }

  StopSignal stop;
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<ktx::models::Deepseek2Model>> opened =
      ktx::models::Deepseek2Model::Open(flags.model);
  if (!opened.ok()) return Fail(opened.status());
  std::shared_ptr<const ktx::models::Deepseek2Model> model = std::move(*opened);
  const ktx::models::Deepseek2Hparams& hp = model->hparams();

  if (!head) {
    std::cerr << "ktx-node: node '" << node_name << "': " << flags.model << " (" << hp.n_layer
              << " layers, " << hp.n_expert << " routed experts)\n";
    return ServeShards(stop, model, *parsed, *setup, node_name, flags);
  }

  ktx::actors::EngineOptions options;
  if (parsed && !flags.node.empty()) {
    absl::StatusOr<ktx::actors::EngineOptions> from =
        ktx::actors::EngineOptionsFromTopology(*parsed, flags.node);
    if (!from.ok()) return Fail(from.status());
    options = std::move(*from);
  } else if (parsed) {
    absl::StatusOr<ktx::actors::EngineOptions> from =
        ktx::actors::EngineOptionsFromTopologyFile(flags.topology);
    if (!from.ok()) return Fail(from.status());
    options = std::move(*from);
  } else {
    options.shards = ktx::actors::EvenShards(flags.shards > 0 ? flags.shards : 1);
  }
  ApplyEngineFlags(flags, &options);
  options.experts = *experts;
  if (!flags.attention_device.empty()) options.attention_device = flags.attention_device;
  if (const absl::Status hot =
          ktx::cli::ApplyGpuHotExpertsFlags(flags.gpu_hot_experts_gib, flags.profile, &options);
      !hot.ok()) {
    return Fail(hot);
  }
  absl::StatusOr<std::unique_ptr<ktx::actors::Engine>> engine =
      ktx::actors::Engine::Create(model, options);
  if (!engine.ok()) return Fail(engine.status());
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cerr << "ktx-node ready in " << load_s << " s: " << flags.model << " (" << hp.n_layer
            << " layers, " << hp.n_expert << " routed experts x " << hp.n_expert_used
            << " per token, vocabulary " << hp.n_vocab << ")\n"
            << (*engine)->Describe();
  if (flags.check) return 0;
  if (!flags.prompt.empty()) return RunPrompt(**engine, *model, flags);
  return ServeHead(stop, model, std::move(*engine), *setup, node_name, flags);
}

}  // namespace

int main(int argc, char** argv) {
  StopSignal::BlockInAllThreads();
  CLI::App app{
      "ktx-node: one ktx process: the head (scheduler, router, attention; serves Generate) "
      "and/or expert shards, of a topology or on its own"};
  Flags flags;
  flags.sampling.temperature = 0.8f;
  flags.sampling.top_k = 40;
  flags.sampling.top_p = 0.95f;
  flags.sampling.min_p = 0.05f;
  app.add_option("--model", flags.model, "GGUF model file (the first part of a split model)")
      ->required();
  app.add_option("--topology", flags.topology,
                 "Topology config (text-format ktx.v1.TopologyConfig)");
  app.add_option("--node", flags.node,
                 "Run this node of the topology (its shards here, the other nodes' over gRPC); "
                 "without it every node's shards run in this process");
  app.add_option("--shards", flags.shards,
                 "Even expert shards over this process's cpus (default 1; no --topology)");
  app.add_option("--listen", flags.listen,
                 "host:port to serve on without --node (default 127.0.0.1:50051; port 0: any)");
  app.add_flag("--check", flags.check, "Load, print readiness and layout, and exit");
  app.add_option("--prompt", flags.prompt, "Run this prompt, print the text and exit (no server)");
  app.add_flag("--chat", flags.chat, "Render --prompt as a user message of the chat template");
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
  app.add_option("--attention-device", flags.attention_device,
                 "Head: where attention (all non-expert stages) runs: cpu or cuda:N (default: the "
                 "topology's attention_device, else cpu); routed experts stay on the shards");
  app.add_option("--gpu-hot-experts-gib", flags.gpu_hot_experts_gib,
                 ktx::cli::kGpuHotExpertsFlagHelp);
  app.add_option("--profile", flags.profile, ktx::cli::kPlacementProfileFlagHelp);
  app.add_option("--experts", flags.experts,
                 "Routed experts: fast (CPU kernels on NUMA-local copies, default) or reference "
                 "(scalar oracle)");
  app.add_option("--shard-deadline-ms", flags.shard_deadline_ms,
                 "Deadline of every expert request to a shard (default 30000)");
  app.add_option("--remote-wait-s", flags.remote_wait_s,
                 "Head: how long to wait for the remote shard nodes at start (default 60)");
  app.add_option("--drain-timeout-s", flags.drain_timeout_s,
                 "On SIGTERM: how long in-flight requests may run before they are cancelled "
                 "(default 60)");
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
