// File: cli/client_commands.cc
//
// `ktx-ctl generate | chat | status --target ADDR`: clients of a ktx node's
// gRPC API (proto/ktx/v1/generation.proto, node.proto; docs/api.md).
//
//   ktx-ctl generate --target 127.0.0.1:50051 "Once upon a time" --max-tokens 64
//       streams the text to stdout (then a newline); prompt size, queue time,
//       time to first token, prefill and decode tok/s and the stop reason go
//       to stderr. --json prints every stream message as one JSON line
//       instead of the text. --chat [--system S] [--think|--no-think] sends
//       the prompt as a user message of the model's chat template; --tokens
//       1,2,3 sends token ids.
//   ktx-ctl chat --target ADDR [--system S] [--think]
//       a conversation over stdin: each line is a user message, the answer is
//       streamed; the history is kept and sent with every turn. /reset forgets
//       it (the system message stays), /quit or end of input ends.
//   ktx-ctl status --target ADDR [--json]
//       the node: role, health (grpc.health.v1, open without a token), model,
//       load, KV cache, shards with their node, experts per layer, memory,
//       liveness and work sent; the peers.
//
// Common flags: --token-file F (else KTX_AUTH_TOKEN), --ca-file/--cert-file/
// --key-file for TLS, --timeout S (the whole call), --connect-timeout S.
// Errors print "ktx-ctl CMD: CODE: message" (CODE: the gRPC status code name)
// and exit 1; a target that cannot be reached gives UNAVAILABLE naming the
// address within the connect timeout.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "actors/rpc/security.h"
#include "actors/service/health_client.h"
#include "actors/status_bridge.h"
#include "cli/commands.h"
#include "google/protobuf/util/json_util.h"
#include "ktx/v1/generation.grpc.pb.h"
#include "ktx/v1/node.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "runtime/base/status.h"
#include "topology/cpu_list.h"
#include "topology/placement.h"

namespace ktx::cli {
namespace {

struct ClientFlags {
  std::string target;
  std::string token_file;
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  double timeout_s = 0;  // set per command
  double connect_timeout_s = 10;
};

void AddClientFlags(CLI::App* cmd, ClientFlags* flags, double default_timeout_s) {
  flags->timeout_s = default_timeout_s;
  cmd->add_option("--target", flags->target, "host:port of the ktx node")->required();
  cmd->add_option("--token-file", flags->token_file,
                  "File holding the shared auth token (default: $KTX_AUTH_TOKEN, if set)");
  cmd->add_option("--ca-file", flags->ca_file, "TLS: the CA that signed the node's certificate");
  cmd->add_option("--cert-file", flags->cert_file, "TLS: this client's certificate (mutual TLS)");
  cmd->add_option("--key-file", flags->key_file, "TLS: this client's private key");
  cmd->add_option("--timeout", flags->timeout_s,
                  absl::StrCat("Seconds the call may take (default ", default_timeout_s, ")"));
  cmd->add_option("--connect-timeout", flags->connect_timeout_s,
                  "Seconds to wait for a connection (default 10)");
}

std::chrono::milliseconds Ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

// "CODE: message" of a status.
std::string Describe(const absl::Status& status) {
  return absl::StrCat(absl::StatusCodeToString(status.code()), ": ", status.message());
}

int Fail(const std::string& command, const absl::Status& status) {
  std::cerr << "ktx-ctl " << command << ": " << Describe(status) << "\n";
  return 1;
}

// A connected channel and the client's security (for its token).
struct Connection {
  std::shared_ptr<grpc::Channel> channel;
  rpc::RpcSecurity security;
};

absl::StatusOr<Connection> Connect(const ClientFlags& flags) {
  if (flags.timeout_s <= 0 || flags.connect_timeout_s <= 0) {
    return absl::InvalidArgumentError("--timeout and --connect-timeout must be positive");
  }
  Connection c;
  KTX_ASSIGN_OR_RETURN(c.security, rpc::ClientSecurity(flags.token_file, flags.ca_file,
                                                       flags.cert_file, flags.key_file));
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      rpc::MakeChannel(flags.target, c.security);
  if (!channel.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--target '", flags.target, "': ", channel.status().message()));
  }
  c.channel = *std::move(channel);
  const double wait = std::min(flags.connect_timeout_s, flags.timeout_s);
  if (!c.channel->WaitForConnected(std::chrono::system_clock::now() + Ms(wait))) {
    return absl::UnavailableError(absl::StrCat(
        "cannot reach ", flags.target, " within ", wait, " s (is a ktx-node serving there",
        c.security.tls() ? ", with TLS from the same CA" : ", in plaintext", "?)"));
  }
  return c;
}

void PrepareContext(const Connection& c, const ClientFlags& flags, grpc::ClientContext* context) {
  context->set_deadline(std::chrono::system_clock::now() + Ms(flags.timeout_s));
  rpc::AttachToken(c.security, context);
}

std::string ToJson(const google::protobuf::Message& message, bool pretty) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.add_whitespace = pretty;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(message, &out, options).ok()) return "{}";
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

const char* FinishName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_LENGTH: return "length";
    case v1::FINISH_REASON_STOP_TOKEN: return "stop_token";
    case v1::FINISH_REASON_STOP_STRING: return "stop_string";
    default: return "unspecified";
  }
}

void PrintTimings(const v1::GenerateResponse& last) {
  const v1::Timings& t = last.timings();
  std::fprintf(stderr,
               "prompt %d tokens, queue %.1f ms, first token after %.1f ms (prefill %.1f tok/s)\n"
               "generated %d tokens, decode %.2f tok/s, total %.1f ms; stop: %s\n",
               last.usage().prompt_tokens(), t.queue_ms(), t.time_to_first_token_ms(),
               t.prefill_tokens_per_second(), last.usage().completion_tokens(),
               t.decode_tokens_per_second(), t.total_ms(), FinishName(last.finish_reason()));
}

// ---- generate / chat ----

struct SamplingFlags {
  int32_t max_tokens = 0;  // 0: the server's default
  float temperature = 0.8f;
  int32_t top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  float repeat_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t repeat_last_n = 64;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  std::string model;
  bool think = false;
  bool no_think = false;
  std::string policy;  // --policy: this request's routing policy ("": the node's)
};

void AddSamplingFlags(CLI::App* cmd, SamplingFlags* f) {
  cmd->add_option("--model", f->model, "Model name (default: the node's)");
  cmd->add_option("--max-tokens", f->max_tokens,
                  "Tokens to generate at most (default: the server's, 256)");
  cmd->add_option("--temperature", f->temperature, "0 = greedy (default 0.8)");
  cmd->add_option("--top-k", f->top_k, "0 = off (default 40)");
  cmd->add_option("--top-p", f->top_p, "1 = off (default 0.95)");
  cmd->add_option("--min-p", f->min_p, "0 = off (default 0.05)");
  cmd->add_option("--repeat-penalty", f->repeat_penalty, "1 = off (default 1)");
  cmd->add_option("--presence-penalty", f->presence_penalty, "0 = off (default 0)");
  cmd->add_option("--frequency-penalty", f->frequency_penalty, "0 = off (default 0)");
  cmd->add_option("--repeat-last-n", f->repeat_last_n, "Penalty window in tokens (default 64)");
  cmd->add_option("--seed", f->seed, "RNG seed (default 0)");
  cmd->add_option("--stop", f->stop, "Stop string (repeatable); not printed");
  cmd->add_flag("--ignore-eos", f->ignore_eos, "Keep generating after the end-of-sequence token");
  cmd->add_flag("--think", f->think, "DeepSeek-R1 chat: force the answer to open with <think>");
  cmd->add_flag("--no-think", f->no_think, "DeepSeek-R1 chat: never open with <think>");
  cmd->add_option("--policy", f->policy,
                  "This request's routing policy (docs/experts.md), e.g. top_k=6 or "
                  "mass=0.9,min_k=4;layers=3-10,defer=1; 'full': the model's routing "
                  "(default: the node's policy)");
}

void FillRequest(const SamplingFlags& f, v1::GenerateRequest* r) {
  r->set_model(f.model);
  if (f.max_tokens != 0) r->set_max_tokens(f.max_tokens);
  v1::SamplingParams* s = r->mutable_sampling();
  s->set_temperature(f.temperature);
  s->set_top_k(f.top_k);
  s->set_top_p(f.top_p);
  s->set_min_p(f.min_p);
  s->set_repetition_penalty(f.repeat_penalty);
  s->set_presence_penalty(f.presence_penalty);
  s->set_frequency_penalty(f.frequency_penalty);
  s->set_penalty_last_n(f.repeat_last_n);
  s->set_seed(f.seed);
  for (const std::string& stop : f.stop) r->add_stop(stop);
  r->set_ignore_eos(f.ignore_eos);
  if (!f.policy.empty()) r->set_routing_policy(f.policy);
}

// Runs one Generate call: text to stdout as it comes (or JSON lines), the
// timings to stderr. *text gets the whole text.
absl::Status Stream(const Connection& c, const ClientFlags& flags, const v1::GenerateRequest& r,
                    bool json, std::string* text) {
  auto stub = v1::Generation::NewStub(c.channel);
  grpc::ClientContext context;
  PrepareContext(c, flags, &context);
  auto reader = stub->Generate(&context, r);
  v1::GenerateResponse response;
  v1::GenerateResponse last;
  bool printed = false;
  while (reader->Read(&response)) {
    if (json) {
      std::cout << ToJson(response, false) << "\n";
    } else {
      std::cout << response.text();
      printed = printed || !response.text().empty();
    }
    std::cout.flush();
    *text += response.text();
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) last = response;
  }
  const grpc::Status status = reader->Finish();
  if (!json && printed) std::cout << "\n" << std::flush;
  if (!status.ok()) {
    absl::Status s = FromGrpcStatus(status);
    if (s.code() == absl::StatusCode::kDeadlineExceeded) {
      return absl::DeadlineExceededError(
          absl::StrCat(s.message(), " (--timeout ", flags.timeout_s, " s)"));
    }
    return s;
  }
  PrintTimings(last);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> ParseIds(const std::string& text) {
  std::vector<int32_t> ids;
  int index = 0;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(part, &id)) {
      return absl::InvalidArgumentError(absl::StrCat("--tokens: entry ", index, " ('",
                                                     std::string(part.data(), part.size()),
                                                     "') is not a token id"));
    }
    ids.push_back(id);
    ++index;
  }
  return ids;
}

struct GenerateFlags {
  ClientFlags client;
  SamplingFlags sampling;
  std::string prompt;
  std::string tokens;
  bool chat = false;
  std::string system;
  bool json = false;
};

int RunGenerate(const GenerateFlags& f) {
  const std::string cmd = "generate";
  const SamplingFlags& s = f.sampling;
  if (f.prompt.empty() == f.tokens.empty()) {
    return Fail(cmd, absl::InvalidArgumentError("give a prompt or --tokens (one of them)"));
  }
  if (!f.chat && (!f.system.empty() || s.think || s.no_think)) {
    return Fail(cmd, absl::InvalidArgumentError("--system, --think and --no-think need --chat"));
  }
  if (s.think && s.no_think) {
    return Fail(cmd, absl::InvalidArgumentError("give --think or --no-think, not both"));
  }
  if (f.chat && !f.tokens.empty()) {
    return Fail(cmd, absl::InvalidArgumentError("--chat needs a text prompt, not --tokens"));
  }
  v1::GenerateRequest request;
  FillRequest(s, &request);
  if (!f.tokens.empty()) {
    absl::StatusOr<std::vector<int32_t>> ids = ParseIds(f.tokens);
    if (!ids.ok()) return Fail(cmd, ids.status());
    request.mutable_tokens()->mutable_ids()->Assign(ids->begin(), ids->end());
  } else if (f.chat) {
    v1::ChatPrompt* chat = request.mutable_chat();
    if (!f.system.empty()) {
      v1::ChatMessage* m = chat->add_messages();
      m->set_role("system");
      m->set_content(f.system);
    }
    v1::ChatMessage* m = chat->add_messages();
    m->set_role("user");
    m->set_content(f.prompt);
    if (s.think || s.no_think) chat->set_force_think(s.think);
  } else {
    request.set_text(f.prompt);
  }
  absl::StatusOr<Connection> c = Connect(f.client);
  if (!c.ok()) return Fail(cmd, c.status());
  std::string text;
  const absl::Status status = Stream(*c, f.client, request, f.json, &text);
  if (!status.ok()) return Fail(cmd, status);
  return 0;
}

struct ChatFlags {
  ClientFlags client;
  SamplingFlags sampling;
  std::string system;
};

int RunChat(const ChatFlags& f) {
  const std::string cmd = "chat";
  if (f.sampling.think && f.sampling.no_think) {
    return Fail(cmd, absl::InvalidArgumentError("give --think or --no-think, not both"));
  }
  absl::StatusOr<Connection> c = Connect(f.client);
  if (!c.ok()) return Fail(cmd, c.status());
  const bool interactive = isatty(STDIN_FILENO) != 0;
  if (interactive) {
    std::cerr << "chat with " << f.client.target
              << ": type a message and Enter; /reset forgets the conversation, /quit ends\n";
  }
  std::vector<v1::ChatMessage> history;
  int failures = 0;
  std::string line;
  while (true) {
    if (interactive) std::cerr << "> " << std::flush;
    if (!std::getline(std::cin, line)) break;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    if (line == "/quit" || line == "/exit") break;
    if (line == "/reset") {
      history.clear();
      std::cerr << "(conversation reset)\n";
      continue;
    }
    v1::GenerateRequest request;
    FillRequest(f.sampling, &request);
    v1::ChatPrompt* chat = request.mutable_chat();
    if (!f.system.empty()) {
      v1::ChatMessage* m = chat->add_messages();
      m->set_role("system");
      m->set_content(f.system);
    }
    for (const v1::ChatMessage& m : history) *chat->add_messages() = m;
    v1::ChatMessage* user = chat->add_messages();
    user->set_role("user");
    user->set_content(line);
    if (f.sampling.think || f.sampling.no_think) chat->set_force_think(f.sampling.think);
    std::string answer;
    const absl::Status status = Stream(*c, f.client, request, /*json=*/false, &answer);
    if (!status.ok()) {
      std::cerr << "ktx-ctl chat: " << Describe(status) << " (this turn is dropped)\n";
      ++failures;
      continue;
    }
    history.push_back(*user);
    v1::ChatMessage assistant;
    assistant.set_role("assistant");
    assistant.set_content(answer);
    history.push_back(std::move(assistant));
  }
  return failures == 0 ? 0 : 1;
}

// ---- status ----

struct StatusFlags {
  ClientFlags client;
  bool json = false;
};

std::string Percent(double share) {
  return absl::StrCat(static_cast<int>(share * 1000) / 10.0, "%");
}

void PrintStatus(const std::string& health, const v1::NodeStatusResponse& s) {
  const char* role = s.role() == v1::NODE_ROLE_HEAD    ? "head"
                     : s.role() == v1::NODE_ROLE_SHARD ? "shard node"
                                                       : "node";
  std::printf("node %s (%s) at %s: ktx %s, up %.1f s\n", s.node_name().c_str(), role,
              s.address().c_str(), s.version().c_str(), s.uptime_seconds());
  std::printf("health: %s (grpc.health.v1: %s)\n", s.health().c_str(), health.c_str());
  if (!s.model_name().empty()) {
    std::printf("model: %s%s\n", s.model_name().c_str(),
                s.model_fingerprint().empty()
                    ? ""
                    : absl::StrCat(" (fingerprint ", s.model_fingerprint(), ")").c_str());
  }
  if (s.has_requests()) {
    const v1::RequestLoad& r = s.requests();
    std::printf(
        "requests: %d in flight (%d running, %d queued; at most %d), %lld completed, %lld failed, "
        "%lld cancelled, %lld tokens generated\n",
        r.in_flight(), r.running(), r.queued(), r.max_concurrent(),
        static_cast<long long>(r.completed()), static_cast<long long>(r.failed()),
        static_cast<long long>(r.cancelled()), static_cast<long long>(r.tokens_generated()));
  }
  if (s.has_kv_cache()) {
    const v1::KvCacheStatus& kv = s.kv_cache();
    std::printf("kv cache: %s of %s used, %lld sequences, %lld tokens free\n",
                topology::FormatBytes(kv.used_bytes()).c_str(),
                topology::FormatBytes(kv.budget_bytes()).c_str(),
                static_cast<long long>(kv.n_sequences()), static_cast<long long>(kv.free_tokens()));
  }
  if (s.has_gpu()) {
    const v1::GpuStatus& g = s.gpu();
    std::printf(
        "attention on %s: %s planned (weights %s, KV cache %s for %lld tokens, work %s, expert "
        "streaming %s, hot experts %s) of %s free at load\n",
        g.attention_device().c_str(), topology::FormatBytes(g.total_bytes()).c_str(),
        topology::FormatBytes(g.weight_bytes()).c_str(),
        topology::FormatBytes(g.kv_bytes()).c_str(), static_cast<long long>(g.kv_tokens()),
        topology::FormatBytes(g.activation_bytes()).c_str(),
        topology::FormatBytes(g.expert_stream_bytes()).c_str(),
        topology::FormatBytes(g.resident_expert_bytes()).c_str(),
        topology::FormatBytes(g.free_bytes_at_load()).c_str());
    if (g.resident_experts() > 0) {
      std::vector<std::string> layers;
      for (const v1::LayerExperts& l : g.hot_experts()) {
        layers.push_back(absl::StrCat(
            "layer ", l.layer(), ": ",
            topology::FormatIdRanges(std::vector<int>(l.experts().begin(), l.experts().end()))));
      }
      std::printf("hot routed experts on the GPU: %d (%s of the expected expert work): %s\n",
                  g.resident_experts(), Percent(g.hot_expected_share()).c_str(),
                  absl::StrJoin(layers, "; ").c_str());
    }
  }
  const v1::HardwareReport& hw = s.hardware();
  int n_cpus = 0;
  uint64_t memory = 0;
  for (const v1::NumaNode& n : hw.nodes()) {
    n_cpus += n.cpus_size();
    memory += n.memory_bytes();
  }
  std::printf("hardware: %d NUMA node(s), %d socket(s), %d cpus, %s memory; %s%s\n",
              hw.nodes_size(), hw.n_sockets(), n_cpus, topology::FormatBytes(memory).c_str(),
              hw.cpu_brand().empty() ? "cpu unknown" : hw.cpu_brand().c_str(),
              hw.gpus_size() > 0 ? absl::StrCat(", ", hw.gpus_size(), " GPU(s)").c_str() : "");
  if (s.shards_size() > 0) {
    std::printf("shards:\n  %-20s %-12s %-22s %-5s %7s %10s %6s %10s  %s\n", "name", "node",
                "address", "alive", "experts", "memory", "load", "parts sent", "cpus");
    for (const v1::ShardStatus& sh : s.shards()) {
      std::printf("  %-20s %-12s %-22s %-5s %7d %10s %6s %10lld  %s\n", sh.name().c_str(),
                  sh.node().c_str(), sh.address().empty() ? "(in process)" : sh.address().c_str(),
                  sh.alive() ? "yes" : "NO", sh.n_experts(),
                  topology::FormatBytes(sh.expert_bytes()).c_str(),
                  Percent(sh.load_share()).c_str(), static_cast<long long>(sh.parts_sent()),
                  sh.cpus().empty() ? "-" : sh.cpus().c_str());
    }
    std::printf("experts per MoE layer:\n");
    for (const v1::ShardStatus& sh : s.shards()) {
      std::vector<std::string> layers;
      for (const v1::LayerExperts& l : sh.layers()) {
        layers.push_back(absl::StrCat(
            "layer ", l.layer(), ": ",
            topology::FormatIdRanges(std::vector<int>(l.experts().begin(), l.experts().end()))));
      }
      std::printf("  %s: %s\n", sh.name().c_str(),
                  layers.empty() ? "(none)" : absl::StrJoin(layers, "; ").c_str());
    }
  }
  for (const v1::PeerNode& p : s.peers()) {
    std::printf("peer %s at %s: %s, shards %s\n", p.name().c_str(), p.address().c_str(),
                p.reachable() ? "reachable" : "UNREACHABLE",
                absl::StrJoin(p.shards(), ", ").c_str());
  }
}

int RunStatus(const StatusFlags& f) {
  const std::string cmd = "status";
  absl::StatusOr<Connection> c = Connect(f.client);
  if (!c.ok()) return Fail(cmd, c.status());
  absl::StatusOr<service::HealthState> health =
      service::CheckHealth(*c->channel, "", Ms(f.client.timeout_s));
  const std::string health_text =
      health.ok() ? service::HealthStateName(*health) : Describe(health.status());
  auto stub = v1::NodeControl::NewStub(c->channel);
  grpc::ClientContext context;
  PrepareContext(*c, f.client, &context);
  v1::NodeStatusResponse status;
  const grpc::Status rpc_status = stub->Status(&context, v1::NodeStatusRequest(), &status);
  if (!rpc_status.ok()) {
    std::cerr << "grpc.health.v1 of " << f.client.target << ": " << health_text << "\n";
    return Fail(cmd, FromGrpcStatus(rpc_status));
  }
  if (f.json) {
    nlohmann::json j;
    j["target"] = f.client.target;
    j["health_check"] = health_text;
    j["status"] = nlohmann::json::parse(ToJson(status, false), nullptr, false);
    std::cout << j.dump(2) << "\n";
  } else {
    PrintStatus(health_text, status);
  }
  return 0;
}

}  // namespace

void AddClientCommands(CLI::App& app, int* exit_code) {
  auto generate = std::make_shared<GenerateFlags>();
  CLI::App* g = app.add_subcommand(
      "generate", "Stream a generation from a ktx node (Generation API); timings on stderr");
  AddClientFlags(g, &generate->client, 600);
  AddSamplingFlags(g, &generate->sampling);
  g->add_option("prompt", generate->prompt, "The prompt text");
  g->add_option("--tokens", generate->tokens, "The prompt as token ids, comma-separated");
  g->add_flag("--chat", generate->chat, "Send the prompt as a user message of the chat template");
  g->add_option("--system", generate->system, "System message (with --chat)");
  g->add_flag("--json", generate->json, "Print each stream message as a JSON line");
  g->callback([exit_code, generate] { *exit_code = RunGenerate(*generate); });

  auto chat = std::make_shared<ChatFlags>();
  CLI::App* ch = app.add_subcommand(
      "chat", "Chat with a ktx node over stdin (multi-turn, the model's chat template)");
  AddClientFlags(ch, &chat->client, 600);
  AddSamplingFlags(ch, &chat->sampling);
  ch->add_option("--system", chat->system, "System message for the whole conversation");
  ch->callback([exit_code, chat] { *exit_code = RunChat(*chat); });

  auto status = std::make_shared<StatusFlags>();
  CLI::App* st = app.add_subcommand(
      "status", "A ktx node's status: role, health, load, KV cache, shards, experts, peers");
  AddClientFlags(st, &status->client, 10);
  st->add_flag("--json", status->json, "Print JSON");
  st->callback([exit_code, status] { *exit_code = RunStatus(*status); });
}

}  // namespace ktx::cli
