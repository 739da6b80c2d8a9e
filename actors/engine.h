// File: actors/engine.h
//
// The facade of ktx's in-process actor runtime. Engine::Create spawns, in one
// CAF actor system, one expert shard actor per shard of the topology (each
// with its own CpuArena on its cpus and the experts the placement plan gives
// it), the router, the attention actor (non-expert stages, KV caches, head;
// its own arena) and the scheduler (continuous batching, sampling,
// streaming). It offers a blocking and an asynchronous C++ API; no CAF type
// appears here.
//
//   KTX_ASSIGN_OR_RETURN(auto model, models::Deepseek2Model::Open(path));
//   EngineOptions options;
//   options.shards = EvenShards(2);  // or EngineOptionsFromTopologyFile(...)
//   KTX_ASSIGN_OR_RETURN(auto engine, Engine::Create(std::move(model), options));
//   GenerateRequest request;
//   request.prompt = prompt_ids;
//   request.sampling.temperature = 0;
//   request.max_tokens = 32;
//   KTX_ASSIGN_OR_RETURN(GenerateResult result, engine->Generate(request,
//       [](int32_t token, std::string_view text) { std::cout << text; return true; }));
//
// Placement: options.plan when given (checked against the model), else
// topology::PlanExpertPlacement over the model's expert table and the shards'
// budgets (with options.placement: profile, replication). Experts: each shard
// holds only the experts the plan gives it, by default as NUMA-local copies
// for the fast CPU kernels on a pool of its own cpus (options.experts).
// docs/architecture.md ("Actors") describes the actors, their messages and
// who owns which memory.
//
// Remote shards: a shard whose ShardOptions::address is set lives in another
// ktx-node (a ShardHost, actors/remote/shard_host.h). The engine talks to it
// through a proxy actor with the local shard's interface, over one
// long-lived ExpertShard stream per node; Create waits (remote_wait) until
// every such node serves this model (fingerprint) and the plan's experts.
// A node that dies or stalls fails the parts in flight with UNAVAILABLE
// naming the shard, node and address; the proxy reconnects in the
// background and the next request is served once the node is back.
//
// Ownership: the Engine owns the actor system, the arenas (destroyed after
// the actors have stopped) and shares the model with the expert backends.
// Thread-safety: every public method may be called from any thread
// concurrently, except that the Engine must not be destroyed while a call is
// in progress. Callbacks of Generate run on the calling thread; callbacks of
// GenerateAsync run on an actor thread of the engine and must return quickly.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "actors/generation.h"
#include "actors/profile.h"
#include "actors/remote/wire_dtype.h"
#include "actors/rpc/security.h"
#include "actors/shard_experts.h"
#include "runtime/gpu/memory_plan.h"
#include "runtime/models/activations.h"
#include "runtime/models/deepseek2.h"
#include "runtime/moe_backend/cpu_moe_backend.h"
#include "runtime/sampler/sampler.h"
#include "topology/gpu_hot_experts.h"
#include "topology/placement.h"

namespace ktx::topology {
struct ParsedTopologyConfig;
}

namespace ktx::actors {

// One expert shard of this process.
struct ShardOptions {
  std::string name;
  // Where the shard runs: empty, in this process; else host:port of the
  // ktx-node that hosts it (actors/remote/: the engine talks to it through
  // a proxy actor over the ExpertShard service). `node` is that node's name
  // (for messages).
  std::string address;
  std::string node;
  std::vector<int> cpus;                               // empty: every cpu of the process, unpinned
  uint64_t memory_budget_bytes = topology::kNoBudget;  // for the planner
  // NUMA node of the shard's expert copies (fast experts); -1: the node of
  // its first cpu.
  int numa_node = -1;
};

// What computes the routed experts of every shard.
enum class ExpertsBackend {
  // The fast CPU kernels (runtime/moe_backend) on a CpuPool per shard, over
  // NUMA-local repacked copies of ONLY the shard's experts
  // (actors/fast_experts.h). Layers the kernels cannot run (expert types or
  // widths they do not support) use the reference path, with a warning.
  kFast,
  // The scalar reference path over the model's mmapped weights (the oracle:
  // bit-equal to Deepseek2Model::Forward, slow).
  kReference,
};

// "fast" / "reference".
const char* ExpertsBackendName(ExpertsBackend experts);

struct EngineOptions {
  // Empty: one shard "shard0" on every cpu.
  std::vector<ShardOptions> shards;
  // A ready plan (its shards in the order of `shards`); empty: planned here.
  std::optional<topology::PlacementPlan> plan;
  topology::PlacementOptions placement;  // profile / replication for the planner
  std::vector<int> attention_cpus;       // empty: every cpu, unpinned
  // Where the attention actor runs the non-expert stages (embedding,
  // attention, dense layers, shared experts, routing, head): "cpu" (the CPU
  // actor, actors/attention_actor.h, on attention_cpus) or "cuda:N" (the GPU
  // attention actor, actors/gpu_attention_actor.h, on CUDA device N; needs a
  // KTX_CUDA build, else Create fails with FailedPrecondition). The routed
  // experts are computed by the shards either way. ParseAttentionDevice
  // below checks the string.
  std::string attention_device = "cpu";
  // GPU attention only: device memory (bytes) for hot routed experts kept
  // resident on the GPU; 0: none. topology/gpu_hot_experts.h chooses them
  // from placement.profile (hottest per byte; uniform without a profile),
  // the GPU computes them at every batch size (CudaModelOptions::
  // resident_experts), and the placement plan leaves them to no shard
  // (PlacementOptions::excluded), so ShardInfos' bytes drop by theirs.
  // InvalidArgument with attention on the CPU or with remote shards (their
  // nodes plan without the exclusion); ResourceExhausted when the budget
  // fits no expert.
  uint64_t gpu_hot_experts_bytes = 0;
  // GPU attention only. experts.mode is kAuto: batches of at least
  // experts.min_batch_tokens (prefill) stream the experts the cost model picks
  // to the GPU (runtime/gpu/gpu_experts.h) and send the rest to the shards
  // with kNoExpert padding; smaller batches (decode) go to the shards whole.
  // KTX_GPU_EXPERTS=off|auto|gpu|cpu overrides.
  // Create sets device, max_batch_tokens (prefill_chunk +
  // max_running: the largest step), max_sequences (max_running), max_context
  // (the engine's n_ctx) and kv_tokens (the scheduler's KV budget,
  // kv_budget_bytes / the CPU cache's bytes per token, plus one page per
  // sequence for page rounding: so the scheduler's admission holds on the
  // GPU); the page size, reserve and workspaces are used as given.
  // Create fails with ResourceExhausted and the memory plan when it does not
  // fit the device.
  gpu::CudaModelOptions gpu = [] {
    gpu::CudaModelOptions o;
    o.experts.mode = gpu::GpuExpertMode::kAuto;
    return o;
  }();
  uint64_t kv_budget_bytes = uint64_t{1} << 30;
  int64_t n_ctx = 0;            // tokens per sequence at most; 0: the model's context_length
  int64_t prefill_chunk = 128;  // N: prompt tokens per step
  int max_running = 64;         // sequences admitted at once
  // Every expert request has this deadline (a late part is re-sent to a
  // replica or fails its rows); a step has the larger of step_deadline and
  // 4 x shard_deadline.
  std::chrono::milliseconds shard_deadline{30000};
  std::chrono::milliseconds step_deadline{300000};
  int caf_threads = 0;     // CAF scheduler threads; 0: min(4, max(2, cpus))
  int arena_spin_us = -1;  // CpuArena::Options::spin_us of every arena (-1: auto)
  // How long the attention job polls for the router's answer of a MoE layer
  // before it sleeps (MoeClient::Options::spin_us: only while a step waits,
  // and only while answers come back within 2 x this, so real expert work of
  // milliseconds never spins). -1: auto, kAutoMoeSpinUs when the process may
  // use at least 8 cpus (a poll then costs an idle core a few microseconds;
  // on small machines it would steal the core the shard needs), else 0. The
  // environment variable KTX_MOE_SPIN_US overrides it.
  static constexpr int kAutoMoeSpinUs = 20;
  int moe_spin_us = -1;
  // The in-process fast path of a MoE layer (actors/local_lane.h): requests
  // whose parts all go to shards of this process skip the router actor (two
  // thread hand-offs instead of four; same split, same combine order, same
  // failures). The environment variable KTX_LOCAL_LANE=0|1 overrides it.
  bool local_lane = true;
  // What computes the routed experts (ignored when expert_backend_factory
  // is set), and the options of the fast backend (owned_experts and progress
  // are set per shard; max_tokens bounds one kernel run: larger batches run
  // in chunks).
  ExpertsBackend experts = ExpertsBackend::kFast;
  moe_backend::CpuMoeBackendOptions fast_experts;
  // Makes each shard's expert backend (called for all shards at once, one
  // thread each); empty: by `experts`.
  ExpertBackendFactory expert_backend_factory;
  // Keep the stage timings of the last N steps (Engine::Profile); 0: off.
  int profile_steps = 0;
  bool use_tokenizer = true;  // text, EOS/EOT and stop strings from the GGUF tokenizer
  // Shards with an address (actors/remote/): the channels' security (token,
  // TLS, message limits); how long Create waits for their nodes (each must
  // answer with this model's fingerprint and the plan's experts; the error
  // names every shard, node and address still missing); and how hidden
  // states cross to ALL shards: with kBf16 the routed experts' input is
  // rounded to bf16 for local shards too, so results never depend on where
  // a shard lives (partial sums return as F32).
  rpc::RpcSecurity rpc_security;
  std::chrono::milliseconds remote_wait{60000};
  WireDtype wire_dtype = WireDtype::kF32;
};

struct GenerateRequest {
  std::vector<int32_t> prompt;  // token ids, non-empty
  sampler::SamplingParams sampling;
  int32_t max_tokens = 16;  // >= 0; 0: prompt only (logits)
  std::vector<std::string> stop_strings;
  std::vector<int32_t> stop_token_ids;
  bool stop_at_eos = true;  // also stop at the tokenizer's EOS / EOT
  ReturnLogits return_logits = ReturnLogits::kNone;
  std::chrono::milliseconds deadline{0};  // 0: none
  // This request's routing policy (runtime/models/routing_policy.h,
  // docs/experts.md): the text form (`--policy`: "top_k=6",
  // "mass=0.8,min_k=2;layers=3-10,defer=1") or a parsed policy, not both.
  // Validated against the model when the request is submitted
  // (InvalidArgument naming `routing_policy`). Neither: the model's policy
  // (Deepseek2Model::SetRoutingPolicy), if any; "full" runs the model's
  // routing even where the model has a policy. Requests with different
  // policies share steps: each row is routed under its own request's policy.
  std::string routing_policy_text;
  std::shared_ptr<const models::RoutingPolicy> routing_policy;
};

struct GenerateResult {
  uint64_t id = 0;
  std::vector<int32_t> tokens;  // generated (a final stop token included)
  std::string text;             // everything streamed (empty without a tokenizer)
  FinishReason finish_reason = FinishReason::kNone;
  models::Activations logits;  // F32 [n_rows, n_vocab] per return_logits
  double queue_ms = 0;         // arrival to admission
  double total_ms = 0;         // arrival to end
};

// Receives every sampled token with the text that became safe to show (token
// -1: text held back until the end). Returning false cancels the request.
using TokenCallback = std::function<bool(int32_t token, std::string_view text)>;
using DoneCallback = std::function<void(absl::StatusOr<GenerateResult> result)>;

struct KvCacheStats {
  uint64_t budget_bytes = 0;
  uint64_t used_bytes = 0;
  int64_t n_sequences = 0;
  int64_t free_tokens = 0;
};

// One scheduler step (Engine::StepLog).
struct StepRecord {
  uint64_t step = 0;
  std::vector<uint64_t> decode_ids;  // requests that decoded a token
  uint64_t prefill_id = 0;           // request whose prompt chunk ran (0: none)
  int32_t prefill_tokens = 0;
  double start_ms = 0;  // since the engine started
  double end_ms = 0;
  absl::StatusCode code = absl::StatusCode::kOk;
};

// A shard on another node as this engine sees it (Engine::RemoteShardStates).
struct RemoteShardStatus {
  int index = 0;  // in the plan
  std::string name;
  std::string node;
  std::string address;
  bool connected = false;  // its node's stream is up
  std::string last_error;  // why it is (or last was) not
  int64_t sessions = 0;    // streams opened to its node so far (1 + reconnects)
  // Of its node's stream (shared by the node's shards):
  int64_t node_parts_sent = 0;
  int64_t node_messages_sent = 0;  // parts are coalesced into messages
  int64_t node_in_flight = 0;
};

struct RouterCounters {
  std::vector<int64_t> parts_sent;  // [n_shards]
  std::vector<bool> alive;          // [n_shards]
  int64_t requests = 0;
  int64_t rerouted_parts = 0;
  int64_t failed_rows = 0;
  std::vector<int64_t> compute_us;  // [n_shards] the shards' compute time, summed
  // [n_shards] (token, expert) entries sent per shard: expert evaluations
  // (routing policies lower them; kNoExpert padding is never sent).
  std::vector<int64_t> entries_sent;
};

// One shard as built (Engine::ShardInfos).
struct ShardInfo {
  std::string name;
  std::vector<int> cpus;  // its arena's cpus
  bool pinned = false;    // the arena's threads are pinned to them
  int64_t n_experts = 0;  // routed experts held, over all layers
  ShardBackendInfo backend;
};

class Engine {
 public:
  // Errors: InvalidArgument for bad options or a plan that does not match the
  // model (naming the layer / expert / shard), the planner's errors
  // (ResourceExhausted when the experts do not fit the budgets), the expert
  // backend factory's errors.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      std::shared_ptr<const models::Deepseek2Model> model, EngineOptions options);

  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Blocks until the request ends. Errors: the request's validation
  // (InvalidArgument, also for a routing policy the model cannot run;
  // ResourceExhausted when it can never fit the KV budget),
  // CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE naming a shard that is down.
  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                          const TokenCallback& on_token = {});
  // Starts a request and returns its id at once; `on_done` is called exactly
  // once (also when the engine shuts down first: UNAVAILABLE).
  uint64_t GenerateAsync(const GenerateRequest& request, TokenCallback on_token,
                         DoneCallback on_done);
  // Ends a request with CANCELLED and frees its KV cache (no-op for ids that
  // are done or unknown).
  void Cancel(uint64_t id);

  // Logits of every position of `tokens` as one fresh sequence (prefilled in
  // chunks through the scheduler): F32 [n_tokens, n_vocab]. `policy`: the
  // request's routing policy (GenerateRequest::routing_policy).
  absl::StatusOr<models::Activations> Logits(
      std::span<const int32_t> tokens,
      std::shared_ptr<const models::RoutingPolicy> policy = nullptr);

  absl::StatusOr<KvCacheStats> KvStats();
  absl::StatusOr<std::vector<StepRecord>> StepLog();
  absl::StatusOr<RouterCounters> RouterStats();
  // The shards that run on other nodes (empty when all are in this process).
  std::vector<RemoteShardStatus> RemoteShardStates() const;
  // Stage timings of the last EngineOptions::profile_steps steps, oldest
  // first (actors/profile.h); empty when profiling is off. ClearProfile
  // forgets them.
  std::vector<StepProfile> Profile() const;
  void ClearProfile();

  // Fault injection: kills shard `index`'s actor (its arena and memory stay
  // until the engine is destroyed). InvalidArgument for a bad index.
  absl::Status KillShard(int index);

  const models::Deepseek2Model& model() const;
  const topology::PlacementPlan& plan() const;
  const std::vector<ShardOptions>& shards() const;
  // The options the engine runs with (defaults filled in: shard names, ...).
  const EngineOptions& options() const;
  // Per shard: cpus, experts held, bytes held, NUMA node, backend variant.
  std::vector<ShardInfo> ShardInfos() const;
  int64_t n_ctx() const;
  bool has_tokenizer() const;
  // Shards (cpus, experts and bytes held, NUMA node, variant), attention
  // cpus or GPU (with the GPU memory plan), KV budget, threads.
  std::string Describe() const;
  // "cpu" or "cuda:N": where the attention actor runs.
  std::string attention_device() const;
  // The GPU attention actor's memory plan; nullopt with attention on the CPU.
  std::optional<gpu::GpuMemoryPlan> gpu_memory_plan() const;
  // The hot routed experts resident on the attention GPU (empty: none);
  // PerLayer(n_layer) counts them per layer.
  const topology::GpuHotExperts& gpu_hot_experts() const;
  // The scheduler's KV budget in tokens (kv_budget_bytes / the CPU cache's
  // bytes per token, also with attention on the GPU).
  int64_t kv_budget_tokens() const;

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// `n_shards` shards "shard0".. splitting the process's cpus into contiguous
// groups; with fewer cpus than shards (or split_cpus false) every shard runs
// on every cpu, unpinned.
std::vector<ShardOptions> EvenShards(int n_shards, bool split_cpus = true);

// Where attention runs, from `device` ("cpu" or empty: -1; "cuda:N": N).
// InvalidArgument naming `option` (e.g. "--attention-device") and the
// accepted forms otherwise.
absl::StatusOr<int> ParseAttentionDevice(std::string_view device, std::string_view option);

// The shards of a topology config (text-format ktx.v1.TopologyConfig): in
// this one-process runtime every node's shards run here, with their names,
// cpus and budgets (0: no budget); attention_device is the head's ("cpu" when
// it sets none). Errors name the file and line (parse) or the shard (cpu
// list).
absl::StatusOr<EngineOptions> EngineOptionsFromTopologyFile(const std::string& path);

// The head's options for a multi-process topology (ktx-node --node NAME):
// the shards of every node in config order (the plan's order on every
// node), those of `node_name` in this process and every other node's remote
// at its listen_address (actors/remote/); budgets as written (0: none), so
// the head and every shard node compute the same plan (ShardsFromTopology,
// PlanShards in actors/remote/topology_shards.h); rpc_security from the
// named node's entry (token and TLS files relative to the config's folder);
// wire_dtype from the config's expert_wire_dtype; attention_device from the
// named node's attention_device. InvalidArgument naming the
// file, line and field: `node_name` missing or not the head, a bad cpu list
// or wire dtype, no shard at all; the token and TLS files' errors.
absl::StatusOr<EngineOptions> EngineOptionsFromTopology(
    const topology::ParsedTopologyConfig& parsed, std::string_view node_name);

}  // namespace ktx::actors
