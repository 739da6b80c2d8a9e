#include "actors/engine.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "actors/attention_actor.h"
#include "actors/cpu_arena.h"
#include "actors/expert_shard_actor.h"
#include "actors/fast_experts.h"
#include "actors/gpu_attention_actor.h"
#include "actors/messages.h"
#include "actors/remote/remote_shards.h"
#include "actors/remote/topology_shards.h"
#include "actors/router_actor.h"
#include "actors/scheduler_actor.h"
#include "actors/status_bridge.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/actor_system_config.hpp"
#include "caf/exit_reason.hpp"
#include "caf/scoped_actor.hpp"
#include "caf/send.hpp"
#include "caf/system_messages.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "runtime/base/logging.h"
#include "runtime/tokenizer/tokenizer_gguf.h"
#include "topology/config.h"
#include "topology/cpu_list.h"
#include "topology/gguf_experts.h"

namespace ktx::actors {
namespace {

// EngineOptions::moe_spin_us, unless KTX_MOE_SPIN_US says otherwise.
absl::StatusOr<int> MoeSpinUs(const EngineOptions& options) {
  const char* v = std::getenv("KTX_MOE_SPIN_US");
  if (v == nullptr || *v == '\0') {
    if (options.moe_spin_us >= 0) return options.moe_spin_us;
    return AllowedCpus().size() >= 8 ? EngineOptions::kAutoMoeSpinUs : 0;
  }
  int us = -1;
  if (!absl::SimpleAtoi(v, &us) || us < 0 || us > 100000) {
    return absl::InvalidArgumentError(
        absl::StrCat("KTX_MOE_SPIN_US='", v,
                     "': expected microseconds in [0, 100000] that a step polls for "
                     "each MoE layer's answer before it sleeps"));
  }
  return us;
}

// EngineOptions::local_lane, unless KTX_LOCAL_LANE says otherwise.
absl::StatusOr<bool> LocalLaneEnabled(const EngineOptions& options) {
  const char* v = std::getenv("KTX_LOCAL_LANE");
  if (v == nullptr || *v == '\0') return options.local_lane;
  const std::string mode = v;
  if (mode == "on" || mode == "1") return true;
  if (mode == "off" || mode == "0") return false;
  return absl::InvalidArgumentError(absl::StrCat(
      "KTX_LOCAL_LANE='", mode,
      "': expected on (MoE layers of in-process shards skip the router actor) or off"));
}

// The request's routing policy, parsed and checked against the model.
absl::StatusOr<PolicyRef> ResolvePolicy(uint64_t id, const GenerateRequest& request,
                                        const models::Deepseek2Model& model) {
  PolicyRef ref;
  auto field_error = [id](const absl::Status& status) {
    return absl::InvalidArgumentError(
        absl::StrCat("request ", id, ": routing_policy: ", status.message()));
  };
  if (!request.routing_policy_text.empty() && request.routing_policy != nullptr) {
    return field_error(absl::InvalidArgumentError(
        "give the text form (routing_policy_text) or a parsed policy, not both"));
  }
  if (!request.routing_policy_text.empty()) {
    absl::StatusOr<models::RoutingPolicy> parsed =
        models::RoutingPolicy::Parse(request.routing_policy_text);
    if (!parsed.ok()) return field_error(parsed.status());
    ref.policy = std::make_shared<const models::RoutingPolicy>(std::move(*parsed));
  } else {
    ref.policy = request.routing_policy;
  }
  if (ref.policy != nullptr) {
    const models::Deepseek2Hparams& hp = model.hparams();
    const absl::Status valid = ref.policy->Validate(hp.n_layer, hp.n_expert_used);
    if (!valid.ok()) return field_error(valid);
  }
  return ref;
}

GenerateJob MakeJob(uint64_t id, const GenerateRequest& request, PolicyRef policy) {
  GenerateJob job;
  job.routing_policy = std::move(policy);
  job.id = id;
  job.prompt = request.prompt;
  job.sampling = request.sampling;
  job.max_tokens = request.max_tokens;
  job.stop_strings = request.stop_strings;
  job.stop_token_ids = request.stop_token_ids;
  job.stop_at_eos = request.stop_at_eos;
  job.return_logits = static_cast<int32_t>(request.return_logits);
  job.deadline_ms = request.deadline.count();
  return job;
}

absl::StatusOr<GenerateResult> ToResult(const GenerateOutcome& outcome) {
  if (outcome.code != 0) return ToStatus(outcome.code, outcome.message);
  GenerateResult result;
  result.id = outcome.id;
  result.tokens = outcome.tokens;
  result.text = outcome.text;
  result.finish_reason = static_cast<FinishReason>(outcome.finish_reason);
  if (!outcome.logits.empty()) result.logits = *outcome.logits;
  result.queue_ms = outcome.queue_us / 1000.0;
  result.total_ms = outcome.total_us / 1000.0;
  return result;
}

absl::Status ScheduleDown(const caf::down_msg& msg) {
  return absl::UnavailableError(
      absl::StrCat("the engine's scheduler stopped: ", caf::to_string(msg.reason)));
}

struct SinkState {
  static inline const char* name = "ktx.sink";
};

// The sink of a GenerateAsync request: forwards to the callbacks.
token_sink_actor::behavior_type AsyncSink(token_sink_actor::stateful_pointer<SinkState> self,
                                          scheduler_actor scheduler, uint64_t id,
                                          TokenCallback on_token, DoneCallback on_done) {
  auto done = std::make_shared<DoneCallback>(std::move(on_done));
  auto cancelled = std::make_shared<bool>(false);
  self->monitor(scheduler);
  self->set_down_handler([self, done](caf::down_msg& msg) {
    if (*done) (*done)(ScheduleDown(msg));
    *done = nullptr;
    self->quit();
  });
  return {
      [self, scheduler, id, on_token, cancelled](token_atom, const TokenEvent& event) {
        if (on_token && !*cancelled && !on_token(event.token, event.text)) {
          *cancelled = true;
          self->send(scheduler, cancel_atom::value, id);
        }
      },
      [self, scheduler, done](done_atom, const GenerateOutcome& outcome) {
        if (*done) (*done)(ToResult(outcome));
        *done = nullptr;
        // Without this the scheduler keeps this sink's monitor (and, through
        // its weak reference, the sink's memory) until it ends itself.
        self->demonitor(scheduler.address());
        self->quit();
      },
  };
}

// Plan checks against the model: layer count, expert count, shard indices.
absl::Status CheckPlan(const topology::PlacementPlan& plan, const models::Deepseek2Hparams& hp,
                       size_t n_shards, const std::map<int, std::vector<int>>& on_gpu) {
  if (plan.n_layer != hp.n_layer || static_cast<int>(plan.layers.size()) != hp.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("placement plan has ", plan.n_layer, " (",
                                                   plan.layers.size(), ") layers, the model ",
                                                   hp.n_layer));
  }
  if (plan.shards.size() != n_shards) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement plan has ", plan.shards.size(), " shards, the engine ", n_shards));
  }
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    const auto& of = plan.layers[il].shards_of_expert;
    if (static_cast<int>(of.size()) != hp.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat("placement plan, layer ", il, ": ", of.size(),
                                                     " experts, the model has ", hp.n_expert));
    }
    auto gpu = on_gpu.find(il);
    for (int e = 0; e < hp.n_expert; ++e) {
      const bool resident = gpu != on_gpu.end() && std::find(gpu->second.begin(), gpu->second.end(),
                                                             e) != gpu->second.end();
      if (of[e].empty() && !resident) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement plan, layer ", il, ": expert ", e, " is on no shard"));
      }
      for (int s : of[e]) {
        if (s < 0 || s >= static_cast<int>(n_shards)) {
          return absl::InvalidArgumentError(absl::StrCat("placement plan, layer ", il, ": expert ",
                                                         e, " names shard ", s, " of ", n_shards));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

struct Engine::Impl {
  std::shared_ptr<const models::Deepseek2Model> model;
  EngineOptions options;
  topology::PlacementPlan plan;
  std::optional<tokenizer::Tokenizer> tokenizer;
  int64_t n_ctx = 0;
  int caf_threads = 0;
  std::vector<std::shared_ptr<ShardExperts>> experts;
  std::unique_ptr<RemoteShards> remote;  // the shards on other nodes (null: none)
  std::shared_ptr<ProfileLog> profile;   // null: profiling off
  int attention_device = -1;             // -1: CPU attention actor; N: cuda:N
  gpu::GpuMemoryPlan gpu_plan;           // with attention on the GPU
  topology::GpuHotExperts hot;           // routed experts resident on the GPU
  int64_t kv_budget_tokens = 0;          // the scheduler's

  // Destroyed by ~Impl in this order: actors, arenas, handles, system, config.
  std::unique_ptr<caf::actor_system_config> cfg;
  std::unique_ptr<caf::actor_system> system;
  std::unique_ptr<CpuArena> attention_arena;
  std::vector<std::unique_ptr<CpuArena>> shard_arenas;
  std::shared_ptr<LocalLane> lane;  // null: off
  std::vector<expert_shard_actor> shards;
  router_actor router;
  attention_actor attention;
  scheduler_actor scheduler;
  std::atomic<uint64_t> next_id{1};
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();

  ~Impl() {
    if (system) {
      if (scheduler) caf::anon_send_exit(scheduler, caf::exit_reason::user_shutdown);
      if (attention) caf::anon_send_exit(attention, caf::exit_reason::user_shutdown);
      if (router) caf::anon_send_exit(router, caf::exit_reason::user_shutdown);
      for (const auto& shard : shards) caf::anon_send_exit(shard, caf::exit_reason::user_shutdown);
      system->await_all_actors_done();
    }
    // Remote nodes fail what is still pending into dead mailboxes and join
    // their threads; jobs still queued or running post to dead actors
    // (dropped); the arenas join their threads before the system goes away.
    // The attention arena goes first: its job may still submit lane parts to
    // the shard arenas (the closed lane sends it to the dead router instead,
    // so it ends soon).
    if (lane) lane->Close();
    remote.reset();
    attention_arena.reset();
    shard_arenas.clear();
    scheduler = scheduler_actor{};
    attention = attention_actor{};
    router = router_actor{};
    shards.clear();
    system.reset();
    cfg.reset();
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    std::shared_ptr<const models::Deepseek2Model> model, EngineOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("Engine::Create: no model");
  const models::Deepseek2Hparams& hp = model->hparams();
  auto impl = std::make_unique<Impl>();
  impl->model = model;
  if (options.shards.empty()) options.shards.push_back(ShardOptions{"shard0", {}});
  if (options.prefill_chunk <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefill_chunk = ", options.prefill_chunk, " must be positive"));
  }
  if (options.max_running <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_running = ", options.max_running, " must be positive"));
  }
  if (options.n_ctx < 0) {
    return absl::InvalidArgumentError(absl::StrCat("n_ctx = ", options.n_ctx, " is negative"));
  }
  if (options.shard_deadline.count() <= 0 || options.step_deadline.count() <= 0) {
    return absl::InvalidArgumentError("shard_deadline and step_deadline must be positive");
  }
  {
    std::vector<std::string> names;
    for (size_t s = 0; s < options.shards.size(); ++s) {
      if (options.shards[s].name.empty()) options.shards[s].name = absl::StrCat("shard", s);
      names.push_back(options.shards[s].name);
    }
    std::sort(names.begin(), names.end());
    if (auto dup = std::adjacent_find(names.begin(), names.end()); dup != names.end()) {
      return absl::InvalidArgumentError(absl::StrCat("shard name '", *dup, "' is used twice"));
    }
  }
  if (options.remote_wait.count() < 0) {
    return absl::InvalidArgumentError("remote_wait must not be negative");
  }
  // Before anything is loaded: a device this build cannot use fails at once.
  KTX_ASSIGN_OR_RETURN(impl->attention_device,
                       ParseAttentionDevice(options.attention_device, "attention_device"));
  if (impl->attention_device >= 0 && !GpuAttentionAvailable()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "attention_device \"", options.attention_device,
        "\": ktx was built without CUDA (configure with -DKTX_CUDA=ON on a machine with nvcc), "
        "or run attention on the CPU (--attention-device cpu)"));
  }
  // A remote shard's cpus are its own machine's: here it is only a proxy.
  for (ShardOptions& shard : options.shards) {
    if (!shard.address.empty()) shard.cpus.clear();
  }
  impl->n_ctx = options.n_ctx > 0 ? std::min(options.n_ctx, hp.n_ctx_train) : hp.n_ctx_train;
  const size_t n_shards = options.shards.size();

  // Hot routed experts on the GPU: chosen before the placement, which leaves
  // them to no shard.
  topology::PlacementOptions placement = options.placement;
  if (options.gpu_hot_experts_bytes > 0) {
    if (impl->attention_device < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "gpu_hot_experts_bytes (", topology::FormatBytes(options.gpu_hot_experts_bytes),
          ") keeps routed experts on the attention GPU: it needs attention_device cuda:N"));
    }
    for (const ShardOptions& shard : options.shards) {
      if (!shard.address.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "gpu_hot_experts_bytes: shard '", shard.name,
            "' is remote, and shard nodes plan their experts without the GPU's hot experts; "
            "hot experts on the GPU work with local shards only for now"));
      }
    }
    KTX_ASSIGN_OR_RETURN(topology::ModelExpertTable table,
                         topology::ModelExpertTableFromGguf(model->file()));
    absl::StatusOr<topology::GpuHotExperts> hot =
        topology::ChooseGpuHotExperts(table, placement.profile, options.gpu_hot_experts_bytes);
    if (!hot.ok()) {
      return absl::Status(hot.status().code(),
                          absl::StrCat("gpu_hot_experts_bytes: ", hot.status().message()));
    }
    impl->hot = std::move(*hot);
    for (const auto& [il, ids] : impl->hot.experts) {
      std::vector<int>& ex = placement.excluded[il];
      ex.insert(ex.end(), ids.begin(), ids.end());
      std::sort(ex.begin(), ex.end());
      ex.erase(std::unique(ex.begin(), ex.end()), ex.end());
    }
    KTX_LOG(INFO, "engine") << topology::DescribeGpuHotExperts(impl->hot);
  }
  // Placement.
  if (options.plan) {
    impl->plan = *options.plan;
  } else {
    // The same function plans on every shard node (ShardHost).
    KTX_ASSIGN_OR_RETURN(impl->plan, PlanShards(*model, options.shards, placement));
  }
  KTX_RETURN_IF_ERROR(CheckPlan(impl->plan, hp, n_shards, impl->hot.experts));
  std::vector<HeldExperts> held(n_shards, HeldExperts(hp.n_layer));
  std::vector<std::vector<std::vector<int>>> holders(hp.n_layer);
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    holders[il] = impl->plan.layers[il].shards_of_expert;
    for (int e = 0; e < hp.n_expert; ++e) {
      std::sort(holders[il][e].begin(), holders[il][e].end());
      holders[il][e].erase(std::unique(holders[il][e].begin(), holders[il][e].end()),
                           holders[il][e].end());
      for (int s : holders[il][e]) held[s][il].push_back(e);
    }
  }

  if (options.use_tokenizer) {
    absl::StatusOr<tokenizer::Tokenizer> tok =
        tokenizer::TokenizerFromGguf(model->file().metadata());
    if (tok.ok()) {
      impl->tokenizer = std::move(*tok);
    } else {
      KTX_LOG(INFO, "engine") << "no tokenizer (" << tok.status().message()
                              << "): tokens only, no text or stop strings";
    }
  }

  // Arenas and expert stores.
  KTX_ASSIGN_OR_RETURN(impl->attention_arena, CpuArena::Create({"attention", options.attention_cpus,
                                                                options.arena_spin_us}));
  ExpertBackendFactory factory = options.expert_backend_factory;
  if (!factory && options.experts == ExpertsBackend::kReference) {
    factory = MappedExpertBackendFactory(model);
  } else if (!factory) {
    std::vector<FastShardSpec> specs;
    for (const ShardOptions& shard : options.shards) {
      specs.push_back({shard.name, shard.cpus, shard.numa_node});
    }
    factory = FastExpertBackendFactory(model, std::move(specs), options.fast_experts);
  }
  // Shards on other nodes load nothing here: a placeholder backend keeps
  // their place (and held experts) in the plan.
  factory = WithRemotePlaceholders(std::move(factory), options.shards);
  // Every shard's backend at once (the fast one repacks on the shard's own
  // pool, so shards on disjoint cpus load in parallel).
  std::vector<absl::StatusOr<std::shared_ptr<models::ExpertBackend>>> backends(
      n_shards, absl::UnknownError("not made"));
  {
    std::vector<std::thread> loaders;
    for (size_t s = 0; s < n_shards; ++s) {
      loaders.emplace_back([&, s] { backends[s] = factory(static_cast<int>(s), held[s]); });
    }
    for (std::thread& t : loaders) t.join();
  }
  for (size_t s = 0; s < n_shards; ++s) {
    const ShardOptions& shard = options.shards[s];
    KTX_ASSIGN_OR_RETURN(std::unique_ptr<CpuArena> arena,
                         CpuArena::Create({shard.name, shard.cpus, options.arena_spin_us}));
    impl->shard_arenas.push_back(std::move(arena));
    absl::StatusOr<std::shared_ptr<models::ExpertBackend>>& backend = backends[s];
    if (!backend.ok()) {
      return absl::Status(
          backend.status().code(),
          absl::StrCat("expert shard '", shard.name, "': backend: ", backend.status().message()));
    }
    KTX_ASSIGN_OR_RETURN(std::shared_ptr<ShardExperts> experts,
                         ShardExperts::Create(static_cast<int>(s), shard.name, hp.n_expert, held[s],
                                              std::move(*backend)));
    impl->experts.push_back(std::move(experts));
  }

  // Shards on other nodes: wait until each node serves this model and the
  // plan's experts, then open one stream per node.
  if (std::any_of(options.shards.begin(), options.shards.end(),
                  [](const ShardOptions& s) { return !s.address.empty(); })) {
    RemoteShardsOptions remote;
    remote.security = options.rpc_security;
    remote.wire_dtype = options.wire_dtype;
    remote.wait = options.remote_wait;
    remote.shard_deadline = options.shard_deadline;
    KTX_ASSIGN_OR_RETURN(impl->remote, RemoteShards::Connect(*model, options.shards, held, remote));
  }

  // The actor system.
  impl->caf_threads = options.caf_threads > 0
                          ? options.caf_threads
                          : std::clamp(static_cast<int>(AllowedCpus().size()), 2, 4);
  impl->cfg = std::make_unique<caf::actor_system_config>();
  ConfigureActorSystem(*impl->cfg, impl->caf_threads);
  impl->system = std::make_unique<caf::actor_system>(*impl->cfg);

  std::vector<std::string> names;
  for (size_t s = 0; s < n_shards; ++s) {
    ExpertShardConfig config;
    config.index = static_cast<int>(s);
    config.name = options.shards[s].name;
    config.experts = impl->experts[s];
    config.arena = impl->shard_arenas[s].get();
    impl->shards.push_back(impl->remote && impl->remote->IsRemote(static_cast<int>(s))
                               ? impl->remote->Spawn(*impl->system, static_cast<int>(s))
                               : SpawnExpertShard(*impl->system, std::move(config)));
    names.push_back(options.shards[s].name);
  }
  RouterConfig router;
  router.shards = impl->shards;
  router.names = names;
  router.holders = std::move(holders);
  router.n_expert = hp.n_expert;
  router.shard_deadline = options.shard_deadline;
  KTX_ASSIGN_OR_RETURN(const bool local_lane, LocalLaneEnabled(options));
  if (local_lane) {
    std::vector<LocalLane::Shard> lane_shards;
    for (size_t s = 0; s < n_shards; ++s) {
      const bool remote = impl->remote && impl->remote->IsRemote(static_cast<int>(s));
      lane_shards.push_back({names[s], remote ? nullptr : impl->experts[s],
                             remote ? nullptr : impl->shard_arenas[s].get()});
    }
    router.lane = LocalLane::Create(std::move(lane_shards), router.holders, hp.n_expert,
                                    options.shard_deadline);
  }
  impl->lane = router.lane;
  impl->router = SpawnRouter(*impl->system, std::move(router));

  AttentionConfig attention;
  attention.model = model;
  attention.arena = impl->attention_arena.get();
  attention.router = impl->router;
  attention.kv_budget_bytes = options.kv_budget_bytes;
  attention.bf16_expert_input = options.wire_dtype == WireDtype::kBf16;
  // The router answers within its shard deadlines (a re-sent part gets
  // another); this only catches a router that hangs.
  attention.moe_deadline = options.shard_deadline * 2 + std::chrono::seconds(5);
  KTX_ASSIGN_OR_RETURN(attention.moe_spin_us, MoeSpinUs(options));
  attention.lane = impl->lane;
  if (options.profile_steps > 0) {
    impl->profile = std::make_shared<ProfileLog>(static_cast<size_t>(options.profile_steps));
  }
  attention.profile = impl->profile;
  attention.n_shards = static_cast<int>(n_shards);
  impl->kv_budget_tokens =
      static_cast<int64_t>(options.kv_budget_bytes / model->kv_layout().bytes_per_token());
  if (impl->attention_device < 0) {
    KTX_ASSIGN_OR_RETURN(impl->attention, SpawnAttention(*impl->system, std::move(attention)));
  } else {
    GpuAttentionOptions gpu_options;
    gpu_options.gpu = options.gpu;
    // Shards with tile caches run their experts faster: the split's starting
    // figures for them (the run-time correction refines either).
    KTX_ASSIGN_OR_RETURN(const bool tile_caches,
                         moe_backend::TileCacheWanted(options.fast_experts));
    if (tile_caches && options.experts == ExpertsBackend::kFast) {
      gpu::UseTileCacheCpuCosts(&gpu_options.gpu.experts);
    }
    gpu_options.gpu.device = impl->attention_device;
    gpu_options.gpu.resident_experts.assign(static_cast<size_t>(hp.n_layer), {});
    for (const auto& [il, ids] : impl->hot.experts) {
      gpu_options.gpu.resident_experts[il].assign(ids.begin(), ids.end());
    }
    gpu_options.gpu.max_batch_tokens = options.prefill_chunk + options.max_running;
    gpu_options.gpu.max_sequences = options.max_running;
    gpu_options.gpu.max_context = impl->n_ctx;
    const int64_t page = std::max<int32_t>(gpu_options.gpu.kv_page_size, 1);
    gpu_options.gpu.kv_tokens =
        impl->kv_budget_tokens + static_cast<int64_t>(options.max_running) * page;
    // The router answers within its shard deadlines (a re-sent part gets
    // another); this only catches a router that hangs.
    gpu_options.moe_deadline = options.shard_deadline * 2 + std::chrono::seconds(5);
    absl::StatusOr<attention_actor> spawned =
        SpawnGpuAttention(*impl->system, std::move(attention), gpu_options, &impl->gpu_plan);
    if (!spawned.ok()) {
      return absl::Status(spawned.status().code(),
                          absl::StrCat("attention_device \"", options.attention_device,
                                       "\": ", spawned.status().message()));
    }
    impl->attention = std::move(*spawned);
  }

  SchedulerConfig scheduler;
  scheduler.attention = impl->attention;
  scheduler.n_vocab = hp.n_vocab;
  scheduler.n_ctx = impl->n_ctx;
  scheduler.kv_budget_tokens = impl->kv_budget_tokens;
  scheduler.prefill_chunk = options.prefill_chunk;
  scheduler.max_running = options.max_running;
  scheduler.step_deadline = std::max(options.step_deadline, options.shard_deadline * 4);
  scheduler.tokenizer = impl->tokenizer;
  impl->scheduler = SpawnScheduler(*impl->system, std::move(scheduler));
  impl->options = std::move(options);
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

absl::StatusOr<GenerateResult> Engine::Generate(const GenerateRequest& request,
                                                const TokenCallback& on_token) {
  caf::scoped_actor self{*impl_->system};
  const uint64_t id = impl_->next_id.fetch_add(1);
  const scheduler_actor& scheduler = impl_->scheduler;
  KTX_ASSIGN_OR_RETURN(PolicyRef policy, ResolvePolicy(id, request, *impl_->model));
  self->monitor(scheduler);
  self->send(scheduler, generate_atom::value, MakeJob(id, request, std::move(policy)),
             caf::actor_cast<token_sink_actor>(self));
  bool done = false;
  bool cancelled = false;
  absl::StatusOr<GenerateResult> result = absl::UnknownError("no outcome");
  self->receive_while([&done] { return !done; })(
      [&](token_atom, const TokenEvent& event) {
        if (on_token && !cancelled && !on_token(event.token, event.text)) {
          cancelled = true;
          self->send(scheduler, cancel_atom::value, id);
        }
      },
      [&](done_atom, const GenerateOutcome& outcome) {
        result = ToResult(outcome);
        done = true;
      },
      [&](caf::down_msg& msg) {
        result = ScheduleDown(msg);
        done = true;
      });
  self->demonitor(scheduler.address());
  return result;
}

uint64_t Engine::GenerateAsync(const GenerateRequest& request, TokenCallback on_token,
                               DoneCallback on_done) {
  const uint64_t id = impl_->next_id.fetch_add(1);
  absl::StatusOr<PolicyRef> policy = ResolvePolicy(id, request, *impl_->model);
  if (!policy.ok()) {
    if (on_done) on_done(policy.status());
    return id;
  }
  token_sink_actor sink = impl_->system->spawn(AsyncSink, impl_->scheduler, id, std::move(on_token),
                                               std::move(on_done));
  caf::anon_send(impl_->scheduler, generate_atom::value, MakeJob(id, request, std::move(*policy)),
                 sink);
  return id;
}

void Engine::Cancel(uint64_t id) { caf::anon_send(impl_->scheduler, cancel_atom::value, id); }

absl::StatusOr<models::Activations> Engine::Logits(
    std::span<const int32_t> tokens, std::shared_ptr<const models::RoutingPolicy> policy) {
  GenerateRequest request;
  request.routing_policy = std::move(policy);
  request.prompt.assign(tokens.begin(), tokens.end());
  request.max_tokens = 0;
  request.stop_at_eos = false;
  request.return_logits = ReturnLogits::kAll;
  KTX_ASSIGN_OR_RETURN(GenerateResult result, Generate(request));
  return std::move(result.logits);
}

absl::StatusOr<KvCacheStats> Engine::KvStats() {
  caf::scoped_actor self{*impl_->system};
  absl::StatusOr<KvCacheStats> out = absl::UnknownError("no answer");
  self->request(impl_->attention, std::chrono::seconds(30), kv_stats_atom::value)
      .receive(
          [&](const actors::KvStats& stats) {
            out = KvCacheStats{stats.budget_bytes, stats.used_bytes, stats.n_sequences,
                               stats.free_tokens};
          },
          [&](caf::error& error) { out = FromCafError(error); });
  return out;
}

absl::StatusOr<std::vector<StepRecord>> Engine::StepLog() {
  caf::scoped_actor self{*impl_->system};
  absl::StatusOr<std::vector<StepRecord>> out = absl::UnknownError("no answer");
  self->request(impl_->scheduler, std::chrono::seconds(30), step_log_atom::value)
      .receive(
          [&](const std::vector<StepLogEntry>& log) {
            std::vector<StepRecord> records;
            for (const StepLogEntry& e : log) {
              records.push_back(StepRecord{e.step, e.decode_ids, e.prefill_id, e.prefill_tokens,
                                           e.start_us / 1000.0, e.end_us / 1000.0,
                                           static_cast<absl::StatusCode>(e.code)});
            }
            out = std::move(records);
          },
          [&](caf::error& error) { out = FromCafError(error); });
  return out;
}

absl::StatusOr<RouterCounters> Engine::RouterStats() {
  caf::scoped_actor self{*impl_->system};
  absl::StatusOr<RouterCounters> out = absl::UnknownError("no answer");
  self->request(impl_->router, std::chrono::seconds(30), router_stats_atom::value)
      .receive(
          [&](const actors::RouterStats& stats) {
            RouterCounters c;
            c.parts_sent = stats.parts_sent;
            for (uint8_t a : stats.alive) c.alive.push_back(a != 0);
            c.requests = stats.requests;
            c.rerouted_parts = stats.rerouted_parts;
            c.failed_rows = stats.failed_rows;
            c.compute_us = stats.compute_us;
            c.entries_sent = stats.entries_sent;
            out = std::move(c);
          },
          [&](caf::error& error) { out = FromCafError(error); });
  return out;
}

std::vector<RemoteShardStatus> Engine::RemoteShardStates() const {
  return impl_->remote ? impl_->remote->Status() : std::vector<RemoteShardStatus>{};
}

absl::Status Engine::KillShard(int index) {
  if (index < 0 || index >= static_cast<int>(impl_->shards.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard index ", index, " outside [0, ", impl_->shards.size(), ")"));
  }
  caf::anon_send_exit(impl_->shards[index], caf::exit_reason::kill);
  return absl::OkStatus();
}

std::vector<StepProfile> Engine::Profile() const {
  return impl_->profile ? impl_->profile->Snapshot() : std::vector<StepProfile>{};
}

void Engine::ClearProfile() {
  if (impl_->profile) impl_->profile->Clear();
}

std::vector<ShardInfo> Engine::ShardInfos() const {
  std::vector<ShardInfo> out;
  for (size_t s = 0; s < impl_->experts.size(); ++s) {
    ShardInfo info;
    info.name = impl_->options.shards[s].name;
    info.cpus = impl_->shard_arenas[s]->cpus();
    info.pinned = impl_->shard_arenas[s]->pinned();
    info.n_experts = impl_->experts[s]->n_held();
    info.backend = impl_->experts[s]->info();
    out.push_back(std::move(info));
  }
  return out;
}

const models::Deepseek2Model& Engine::model() const { return *impl_->model; }
const topology::PlacementPlan& Engine::plan() const { return impl_->plan; }
const std::vector<ShardOptions>& Engine::shards() const { return impl_->options.shards; }
const EngineOptions& Engine::options() const { return impl_->options; }
int64_t Engine::n_ctx() const { return impl_->n_ctx; }
bool Engine::has_tokenizer() const { return impl_->tokenizer.has_value(); }

std::string Engine::Describe() const {
  const Impl& im = *impl_;
  std::string out;
  for (size_t s = 0; s < im.options.shards.size(); ++s) {
    if (im.remote && im.remote->IsRemote(static_cast<int>(s))) {
      const ShardOptions& shard = im.options.shards[s];
      absl::StrAppend(&out, "shard ", s, " '", shard.name, "': remote, node '", shard.node, "' at ",
                      shard.address, ", ", im.experts[s]->n_held(), " routed experts\n");
      continue;
    }
    const CpuArena& arena = *im.shard_arenas[s];
    const ShardBackendInfo info = im.experts[s]->info();
    std::string where = info.numa_node >= 0 ? absl::StrCat(" on NUMA node ", info.numa_node)
                                            : std::string(" in plain memory");
    if (!info.copies) where = info.variant == "custom" ? "" : " mapped (not copied)";
    std::string layers;
    if (info.n_fast_layers > 0 && info.n_reference_layers > 0) {
      layers = absl::StrCat(", ", info.n_reference_layers, " layer(s) on the reference path");
    }
    absl::StrAppend(&out, "shard ", s, " '", im.options.shards[s].name, "': cpus ",
                    topology::FormatIdRanges(arena.cpus()),
                    arena.pinned() ? " (pinned)" : " (unpinned)", ", ", im.experts[s]->n_held(),
                    " routed experts, ", topology::FormatBytes(info.bytes_held), where,
                    ", experts ", info.variant, layers, "\n");
  }
  if (im.attention_device >= 0) {
    const gpu::GpuMemoryPlan& plan = im.gpu_plan;
    absl::StrAppend(&out, "attention: GPU cuda:", im.attention_device,
                    " (non-expert stages; routed experts on the shards), host thread on cpus ",
                    topology::FormatIdRanges(im.attention_arena->cpus()), "\n");
    if (im.hot.count > 0) {
      const std::vector<int> per_layer = im.hot.PerLayer(im.model->hparams().n_layer);
      std::vector<std::string> layers;
      for (int il = 0; il < static_cast<int>(per_layer.size()); ++il) {
        if (im.model->hparams().IsMoeLayer(il)) layers.push_back(absl::StrCat(per_layer[il]));
      }
      absl::StrAppend(&out, "routed experts on the GPU: ", topology::DescribeGpuHotExperts(im.hot),
                      "; per MoE layer in order: ", absl::StrJoin(layers, " "), "\n");
    }
    absl::StrAppend(&out, "kv cache: GPU, ", plan.kv_tokens, " tokens (bf16, ",
                    topology::FormatBytes(plan.kv_bytes), ", pages of ", plan.kv_page_size,
                    "); scheduler budget ", im.kv_budget_tokens, " tokens; context ", im.n_ctx,
                    "; prefill chunk ", im.options.prefill_chunk, "; batch ", plan.max_batch_tokens,
                    " tokens; caf threads ", im.caf_threads, "\n");
    absl::StrAppend(&out, plan.ToString());
    return out;
  }
  absl::StrAppend(&out, "attention: cpus ", topology::FormatIdRanges(im.attention_arena->cpus()),
                  im.attention_arena->pinned() ? " (pinned)" : " (unpinned)", "\n");
  absl::StrAppend(&out, "kv cache: ", topology::FormatBytes(im.options.kv_budget_bytes), ", ",
                  im.options.kv_budget_bytes / im.model->kv_layout().bytes_per_token(),
                  " tokens; context ", im.n_ctx, "; prefill chunk ", im.options.prefill_chunk,
                  "; caf threads ", im.caf_threads, "\n");
  return out;
}

std::string Engine::attention_device() const {
  return impl_->attention_device < 0 ? std::string("cpu")
                                     : absl::StrCat("cuda:", impl_->attention_device);
}

const topology::GpuHotExperts& Engine::gpu_hot_experts() const { return impl_->hot; }

std::optional<gpu::GpuMemoryPlan> Engine::gpu_memory_plan() const {
  if (impl_->attention_device < 0) return std::nullopt;
  return impl_->gpu_plan;
}

int64_t Engine::kv_budget_tokens() const { return impl_->kv_budget_tokens; }

absl::StatusOr<int> ParseAttentionDevice(std::string_view device, std::string_view option) {
  if (device.empty() || device == "cpu") return -1;
  constexpr std::string_view kCuda = "cuda:";
  if (device.substr(0, kCuda.size()) == kCuda) {
    const std::string_view digits = device.substr(kCuda.size());
    int index = 0;
    bool ok = !digits.empty() && digits.size() <= 4;
    for (char c : digits) {
      if (c < '0' || c > '9') ok = false;
      index = index * 10 + (c - '0');
    }
    if (ok) return index;
  }
  return absl::InvalidArgumentError(absl::StrCat(std::string(option), " \"", std::string(device),
                                                 "\" is not \"cpu\" or \"cuda:N\" (N: a CUDA "
                                                 "device index)"));
}

const char* ExpertsBackendName(ExpertsBackend experts) {
  return experts == ExpertsBackend::kFast ? "fast" : "reference";
}

std::vector<ShardOptions> EvenShards(int n_shards, bool split_cpus) {
  std::vector<ShardOptions> shards;
  const std::vector<int> cpus = AllowedCpus();
  const bool split = split_cpus && static_cast<int>(cpus.size()) >= n_shards;
  for (int s = 0; s < n_shards; ++s) {
    ShardOptions shard;
    shard.name = absl::StrCat("shard", s);
    if (split) {
      const size_t begin = cpus.size() * s / n_shards;
      const size_t end = cpus.size() * (s + 1) / n_shards;
      shard.cpus.assign(cpus.begin() + begin, cpus.begin() + end);
    }
    shards.push_back(std::move(shard));
  }
  return shards;
}

absl::StatusOr<EngineOptions> EngineOptionsFromTopologyFile(const std::string& path) {
  KTX_ASSIGN_OR_RETURN(topology::ParsedTopologyConfig parsed,
                       topology::ParseTopologyConfigFile(path));
  // Structural checks only (names, head, addresses, cpu lists): the config may
  // describe other machines; cpus this process cannot use are reported when
  // the shard arenas fail to pin.
  const std::vector<topology::ConfigProblem> problems =
      topology::ValidateTopologyConfig(parsed, topology::ValidationOptions{});
  if (!problems.empty()) {
    std::vector<std::string> lines;
    for (const topology::ConfigProblem& p : problems) {
      lines.push_back(topology::FormatProblem(path, p));
    }
    return absl::InvalidArgumentError(absl::StrJoin(lines, "\n"));
  }
  EngineOptions options;
  for (const ktx::v1::NodeConfig& node : parsed.config.nodes()) {
    if (node.head() && !node.attention_device().empty()) {
      options.attention_device = node.attention_device();
    }
    for (const ktx::v1::ShardConfig& shard : node.shards()) {
      ShardOptions s;
      s.name = shard.name();
      if (!shard.cpus().empty()) {
        absl::StatusOr<std::vector<int>> cpus = topology::ParseCpuList(shard.cpus());
        if (!cpus.ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": shard '", shard.name(), "': ", cpus.status().message()));
        }
        s.cpus = std::move(*cpus);
      }
      if (shard.memory_budget_bytes() > 0) s.memory_budget_bytes = shard.memory_budget_bytes();
      s.numa_node = shard.numa_node();
      options.shards.push_back(std::move(s));
    }
  }
  if (options.shards.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": the topology has no expert shard"));
  }
  return options;
}

}  // namespace ktx::actors
