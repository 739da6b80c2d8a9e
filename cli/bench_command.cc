// ktx-ctl bench: the end-to-end benchmark (runtime/bench/bench.h) on a model.
//
//   ktx-ctl bench --model M.gguf [--prompt-len 512,2048] [--gen 128] [--batch 1,4,16]
//                 [--threads N] [--experts fast|reference] [--json FILE]
//                 [--decode-ctx N] [--prefill-chunk N] [--prefill-repeats R] [--seed S]
//                 [--temperature T]
//                 [--read-mib N] [--max-seconds S] [--topology FILE | --shards N]
//                 [--policy SPEC]
//
// Loads the model (the CPU experts repack with a progress bar), measures the
// all-core read bandwidth, warms up, then prefill tok/s per prompt length and
// batched decode tok/s per batch size with a per-stage and per-layer
// breakdown. The table goes to stdout, progress to stderr, everything (with
// the machine's topology facts and the date) to --json FILE, which is
// rewritten after every phase ("complete": false until the end), so that a run
// stopped by a timeout keeps what it measured. --max-seconds skips phases that
// would overrun a time budget for the whole command, load included (listed
// under "skipped").
//
// With --topology FILE (or --shards N) the same phases run through the actor
// runtime (actors/actor_bench.h): an Engine with the topology's expert shards
// (fast experts on NUMA-local copies unless --experts reference), plus a
// per-layer breakdown of attention, gate, dispatch, each shard's compute and
// combine, and the shards' layout, in the table and under "actors" in the
// JSON.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "actors/actor_bench.h"
#include "actors/engine.h"
#include "cli/commands.h"
#include "cli/gpu_hot_experts_flags.h"
#include "cli/routing_policy_flags.h"
#include "runtime/bench/bench.h"
#include "runtime/models/deepseek2.h"
#include "runtime/moe_backend/cpu_moe_backend.h"
#include "tbb/global_control.h"
#include "topology/hardware.h"

extern char** environ;

namespace ktx::cli {
namespace {

// The KTX_* variables of this process (name -> value): they change what the
// run measures (kernel variants, switches, the GPU's expert splits), so the
// JSON records them beside the flags.
nlohmann::json KtxEnvironment() {
  nlohmann::json env = nlohmann::json::object();
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string kv = *e;
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || kv.rfind("KTX_", 0) != 0) continue;
    env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return env;
}

struct BenchFlags {
  std::string model;
  std::string prompt_lens = "512,2048";
  int64_t gen = 128;
  std::string batches = "1,4,16";
  int threads = 0;
  std::string experts = "fast";
  std::string json;
  int64_t decode_ctx = 0;
  int64_t prefill_chunk = 0;
  int prefill_repeats = 1;  // --prefill-repeats: BenchOptions::prefill_repeats
  uint64_t seed = 1234;
  float temperature = 1.0f;
  int64_t read_mib = 1024;
  double max_seconds = 0;
  std::string topology;            // non-empty: through the actor runtime
  int shards = 0;                  // > 0: through the actor runtime with N even shards
  std::string attention_device;    // --attention-device cpu|cuda:N (actor runtime)
  std::string policy;              // --policy: routing policy of every sequence (docs/experts.md)
  double gpu_hot_experts_gib = 0;  // --gpu-hot-experts-gib: hot experts resident on the GPU
  std::string profile;             // --profile: expert-usage profile for the placement
  int moe_spin_us = -1;            // --moe-spin-us: EngineOptions::moe_spin_us (-1: auto)
  int arena_spin_us = -1;          // --arena-spin-us: EngineOptions::arena_spin_us (-1: auto)
  bool no_warmup_prefill = false;  // --no-warmup-prefill: BenchOptions::warmup_longest_prompt off
  bool tile_cache = false;         // --tile-cache: CpuMoeBackendOptions::tile_cache
  std::string requant_bf16;        // --requant-bf16: CpuMoeBackendOptions::requantize_bf16
};

// --requant-bf16's value as a type (kBF16: keep; unset: the environment decides).
absl::StatusOr<kernels::TensorType> RequantFlag(const std::string& v) {
  if (v.empty() || v == "bf16") return kernels::TensorType::kBF16;
  if (v == "q4_k") return kernels::TensorType::kQ4_K;
  if (v == "q5_k") return kernels::TensorType::kQ5_K;
  if (v == "q6_k") return kernels::TensorType::kQ6_K;
  if (v == "q8_0") return kernels::TensorType::kQ8_0;
  return absl::InvalidArgumentError(
      absl::StrCat("--requant-bf16 ", v, ": expected q4_k, q5_k, q6_k, q8_0 or bf16"));
}

absl::StatusOr<std::vector<int64_t>> ParseList(const std::string& flag, const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " ", text, ": '",
                                                     std::string(part.data(), part.size()),
                                                     "' is not a positive number"));
    }
    out.push_back(v);
  }
  return out;
}

absl::Status RunActorBench(const BenchFlags& flags, bench::BenchOptions options, bool fast,
                           std::shared_ptr<const models::RoutingPolicy> policy,
                           const nlohmann::json& topology_json);

absl::Status RunBench(const BenchFlags& flags) {
  bench::BenchOptions options;
  KTX_ASSIGN_OR_RETURN(options.prompt_lens, ParseList("--prompt-len", flags.prompt_lens));
  KTX_ASSIGN_OR_RETURN(options.batch_sizes, ParseList("--batch", flags.batches));
  options.n_gen = flags.gen;
  options.decode_context = flags.decode_ctx;
  options.prefill_chunk = flags.prefill_chunk;
  options.prefill_repeats = flags.prefill_repeats;
  options.seed = flags.seed;
  options.temperature = flags.temperature;
  if (!(flags.max_seconds >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-seconds ", flags.max_seconds, ": expected >= 0 (0: no budget)"));
  }
  if (flags.read_mib <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--read-mib ", flags.read_mib,
                                                   ": expected > 0 (1024 or more for the figure)"));
  }
  options.read_bytes = static_cast<uint64_t>(flags.read_mib) << 20;
  options.warmup_longest_prompt = !flags.no_warmup_prefill;
  options.progress = [](const std::string& line) { std::cerr << "bench: " << line << std::endl; };
  KTX_RETURN_IF_ERROR(options.Validate());
  KTX_ASSIGN_OR_RETURN(const bool fast, moe_backend::ParseExpertsFlag(flags.experts));
  if (flags.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--threads ", flags.threads, ": expected a positive count (or 0 for all)"));
  }
  KTX_ASSIGN_OR_RETURN(std::shared_ptr<const models::RoutingPolicy> policy,
                       ParsePolicyFlag(flags.policy));
  if (!flags.attention_device.empty()) {
    if (flags.topology.empty() && flags.shards == 0) {
      return absl::InvalidArgumentError(
          "--attention-device runs on the actor runtime: give --topology FILE or --shards N too");
    }
    KTX_RETURN_IF_ERROR(
        actors::ParseAttentionDevice(flags.attention_device, "--attention-device").status());
  }
  for (const auto& [name, value] :
       {std::pair<const char*, int>{"--moe-spin-us", flags.moe_spin_us},
        std::pair<const char*, int>{"--arena-spin-us", flags.arena_spin_us}}) {
    if (value < -1 || value > 10000) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, " ", value, ": expected 0 (no polling) .. 10000 microseconds, or -1 (auto)"));
    }
    if (value > 0 && flags.topology.empty() && flags.shards == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " tunes the actor runtime: give --topology FILE or --shards N too"));
    }
  }
  if ((flags.gpu_hot_experts_gib != 0 || !flags.profile.empty()) && flags.topology.empty() &&
      flags.shards == 0) {
    return absl::InvalidArgumentError(
        "--gpu-hot-experts-gib and --profile run on the actor runtime: give --topology FILE or "
        "--shards N (and --attention-device cuda:N) too");
  }
  if (!flags.topology.empty() || flags.shards != 0) {
    if (!flags.topology.empty() && flags.shards != 0) {
      return absl::InvalidArgumentError("give --topology or --shards, not both");
    }
    if (flags.shards < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--shards ", flags.shards, ": expected a positive count"));
    }
    if (flags.threads != 0) {
      return absl::InvalidArgumentError(
          "--threads does not apply with --topology/--shards: the shards' cpus do");
    }
    auto source = topology::SystemHardwareSource();
    absl::StatusOr<topology::HardwareTopology> hw = topology::DiscoverHardware(*source);
    return RunActorBench(flags, std::move(options), fast, std::move(policy),
                         hw.ok() ? nlohmann::json::parse(topology::HardwareTopologyToJson(*hw))
                                 : nlohmann::json{{"error", std::string(hw.status().message())}});
  }
  std::optional<tbb::global_control> limit;
  if (flags.threads > 0) {
    limit.emplace(tbb::global_control::max_allowed_parallelism, static_cast<size_t>(flags.threads));
  }

  if (!flags.json.empty()) {  // fail before the (long) load on an unwritable --json
    std::ofstream probe(flags.json, std::ios::trunc);
    if (!(probe << "{}\n") || !probe.flush()) {
      return absl::PermissionDeniedError(absl::StrCat("--json ", flags.json, ": cannot write"));
    }
  }
  std::cerr << "bench: loading " << flags.model << std::endl;
  const auto t0 = std::chrono::steady_clock::now();
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<models::Deepseek2Model> model,
                       models::Deepseek2Model::Open(flags.model));
  const double open_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  KTX_RETURN_IF_ERROR(model->SetRoutingPolicy(policy));  // every Route call (docs/experts.md)
  std::unique_ptr<moe_backend::CpuExperts> experts;
  std::unique_ptr<runtime::CpuPool> own_pool;
  runtime::CpuPool* pool = nullptr;
  if (fast) {
    moe_backend::CpuMoeBackendOptions eo;
    int64_t largest = 1;
    for (int64_t p : options.prompt_lens) {
      largest = std::max(largest, options.prefill_chunk > 0 ? options.prefill_chunk : p);
    }
    for (int64_t b : options.batch_sizes) largest = std::max(largest, b);
    eo.max_tokens = std::min<int64_t>(largest, 2048);
    eo.tile_cache = flags.tile_cache;
    KTX_ASSIGN_OR_RETURN(eo.requantize_bf16, RequantFlag(flags.requant_bf16));
    KTX_ASSIGN_OR_RETURN(experts, moe_backend::CpuExperts::Attach(model.get(), flags.threads, eo));
    pool = &experts->pool();
  } else {
    KTX_ASSIGN_OR_RETURN(own_pool, moe_backend::CreateCpuPool(flags.threads));
    pool = own_pool.get();
  }
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // --max-seconds is the budget of the whole command: what loading left.
  if (flags.max_seconds > 0) options.max_seconds = std::max(1e-3, flags.max_seconds - load_s);

  nlohmann::json topology_json;
  {
    auto source = topology::SystemHardwareSource();
    absl::StatusOr<topology::HardwareTopology> hw = topology::DiscoverHardware(*source);
    topology_json = hw.ok() ? nlohmann::json::parse(topology::HardwareTopologyToJson(*hw))
                            : nlohmann::json{{"error", std::string(hw.status().message())}};
  }
  // What this command adds to the library's result.
  auto complete = [&](bench::BenchResult r) {
    r.model_path = flags.model;
    r.model["routing_policy"] = policy != nullptr ? policy->ToString() : "full";
    r.load["model_open_seconds"] = open_s;
    r.load["load_seconds"] = load_s;
    r.machine["topology"] = topology_json;
    return r;
  };
  auto write_json = [&](const bench::BenchResult& r) -> absl::Status {
    if (flags.json.empty()) return absl::OkStatus();
    std::ofstream out(flags.json, std::ios::trunc);
    nlohmann::json j = bench::BenchResultToJson(complete(r));
    j["config"]["environment"] = KtxEnvironment();
    out << j.dump(2) << "\n";
    if (!out.flush()) {
      return absl::PermissionDeniedError(absl::StrCat("--json ", flags.json, ": cannot write"));
    }
    return absl::OkStatus();
  };
  // Keep --json current after every phase.
  absl::Status json_status;
  options.on_phase = [&](const bench::BenchResult& r) {
    if (json_status.ok()) json_status = write_json(r);
  };

  KTX_ASSIGN_OR_RETURN(
      bench::BenchResult result,
      bench::RunBenchmark(*model, *pool, fast ? &experts->backend() : nullptr, options));
  result = complete(std::move(result));
  std::cout << bench::FormatBenchTable(result) << std::flush;
  KTX_RETURN_IF_ERROR(json_status);
  KTX_RETURN_IF_ERROR(write_json(result));
  if (!flags.json.empty()) std::cerr << "bench: wrote " << flags.json << std::endl;
  if (experts) experts->Detach();
  return absl::OkStatus();
}

// The benchmark through the actor runtime (actors/actor_bench.h).
absl::Status RunActorBench(const BenchFlags& flags, bench::BenchOptions options, bool fast,
                           std::shared_ptr<const models::RoutingPolicy> policy,
                           const nlohmann::json& topology_json) {
  actors::EngineOptions engine_options;
  if (!flags.topology.empty()) {
    KTX_ASSIGN_OR_RETURN(engine_options, actors::EngineOptionsFromTopologyFile(flags.topology));
  } else {
    engine_options.shards = actors::EvenShards(flags.shards);
  }
  if (!flags.attention_device.empty()) engine_options.attention_device = flags.attention_device;
  if (flags.moe_spin_us >= 0) engine_options.moe_spin_us = flags.moe_spin_us;
  if (flags.arena_spin_us >= 0) engine_options.arena_spin_us = flags.arena_spin_us;
  KTX_RETURN_IF_ERROR(
      ApplyGpuHotExpertsFlags(flags.gpu_hot_experts_gib, flags.profile, &engine_options));
  engine_options.experts =
      fast ? actors::ExpertsBackend::kFast : actors::ExpertsBackend::kReference;
  engine_options.fast_experts.tile_cache = flags.tile_cache;
  KTX_ASSIGN_OR_RETURN(engine_options.fast_experts.requantize_bf16,
                       RequantFlag(flags.requant_bf16));
  if (!flags.json.empty()) {  // fail before the (long) load on an unwritable --json
    std::ofstream probe(flags.json, std::ios::trunc);
    if (!(probe << "{}\n") || !probe.flush()) {
      return absl::PermissionDeniedError(absl::StrCat("--json ", flags.json, ": cannot write"));
    }
  }
  std::cerr << "bench: loading " << flags.model << " (actor runtime)" << std::endl;
  const auto t0 = std::chrono::steady_clock::now();
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<models::Deepseek2Model> model,
                       models::Deepseek2Model::Open(flags.model));
  const double open_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // The model's policy routes every sequence (the attention actor applies it
  // per row; deferred experts overlap the next layer: docs/experts.md).
  KTX_RETURN_IF_ERROR(model->SetRoutingPolicy(policy));
  KTX_RETURN_IF_ERROR(actors::PrepareEngineOptionsForBench(options, *model, &engine_options));
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<actors::Engine> engine,
                       actors::Engine::Create(std::move(model), engine_options));
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cerr << engine->Describe();
  if (flags.max_seconds > 0) options.max_seconds = std::max(1e-3, flags.max_seconds - load_s);

  auto complete = [&](actors::ActorBenchResult r) {
    r.engine_seconds = load_s - open_s;
    r.bench.model_path = flags.model;
    r.bench.load["model_open_seconds"] = open_s;
    r.bench.load["load_seconds"] = load_s;
    r.bench.load["experts_load_seconds"] = load_s - open_s;  // Engine::Create, shards in parallel
    r.bench.machine["topology"] = topology_json;
    r.bench.model["routing_policy"] = policy != nullptr ? policy->ToString() : "full";
    return r;
  };
  auto write_json = [&](const actors::ActorBenchResult& r) -> absl::Status {
    if (flags.json.empty()) return absl::OkStatus();
    std::ofstream out(flags.json, std::ios::trunc);
    nlohmann::json j = actors::ActorBenchResultToJson(complete(r));
    j["config"]["topology"] = flags.topology;
    j["config"]["shards"] = static_cast<int>(engine->shards().size());
    j["config"]["routing_policy"] = policy != nullptr ? policy->ToString() : "full";
    j["config"]["attention_device"] = engine->attention_device();
    j["config"]["environment"] = KtxEnvironment();
    // Expert evaluations the shards were asked for (routing policies lower
    // them; deferral moves them to the next layer).
    if (absl::StatusOr<actors::RouterCounters> rs = engine->RouterStats(); rs.ok()) {
      j["router"] = {{"requests", rs->requests},
                     {"parts_sent", rs->parts_sent},
                     {"entries_sent", rs->entries_sent}};
    }
    out << j.dump(2) << "\n";
    if (!out.flush()) {
      return absl::PermissionDeniedError(absl::StrCat("--json ", flags.json, ": cannot write"));
    }
    return absl::OkStatus();
  };
  // Keep --json current after every phase (the actor part at the end).
  absl::Status json_status;
  options.on_phase = [&](const bench::BenchResult& r) {
    if (!json_status.ok()) return;
    actors::ActorBenchResult partial;
    partial.bench = r;
    partial.shards = engine->ShardInfos();
    json_status = write_json(partial);
  };
  KTX_ASSIGN_OR_RETURN(actors::ActorBenchResult result,
                       actors::RunActorBenchmark(*engine, options));
  result = complete(std::move(result));
  std::cout << actors::FormatActorBenchTable(result);
  if (engine->attention_device() != "cpu") {
    // The GPU's share of the routed experts is not in the shards' figures.
    std::cout << "\nnote: on the GPU path the GPU streams part of the routed experts over PCIe "
                 "(prompts of 256+ tokens: the prefill split; smaller batches: the decode split, "
                 "KTX_GPU_DECODE_SPLIT); expert MB/t, exp GB/s and % read count the CPU shards' "
                 "reads only (docs/gpu.md)\n";
  }
  std::cout << std::flush;
  KTX_RETURN_IF_ERROR(json_status);
  KTX_RETURN_IF_ERROR(write_json(result));
  if (!flags.json.empty()) std::cerr << "bench: wrote " << flags.json << std::endl;
  return absl::OkStatus();
}

}  // namespace

void AddBenchCommands(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* cmd = app.add_subcommand(
      "bench", "Benchmark prefill and batched decode (tok/s, per-stage times, expert bandwidth)");
  cmd->add_option("--model", flags->model, "GGUF model file (the first part of a split model)")
      ->required();
  cmd->add_option("--prompt-len", flags->prompt_lens,
                  "Prompt lengths for prefill, comma-separated (default 512,2048)");
  cmd->add_option("--gen", flags->gen, "Decode steps per batch size (default 128)");
  cmd->add_option("--batch", flags->batches,
                  "Decode batch sizes (independent sequences), comma-separated (default 1,4,16)");
  cmd->add_option("--threads", flags->threads, "Worker threads (default: all cores)");
  cmd->add_option("--experts", flags->experts,
                  "Routed experts: fast (CPU kernels, default) or reference (scalar oracle)");
  cmd->add_option("--json", flags->json, "Write the results as JSON to this file");
  cmd->add_option("--decode-ctx", flags->decode_ctx,
                  "Context tokens before decoding (default: the smallest --prompt-len)");
  cmd->add_option("--prefill-chunk", flags->prefill_chunk,
                  "Prefill in batches of at most N tokens (default 0: the whole prompt)");
  cmd->add_option("--prefill-repeats", flags->prefill_repeats,
                  "Timed runs of each prefill, 1..100 (default 1): the median run is reported, "
                  "with every run's tok/s beside it");
  cmd->add_option("--seed", flags->seed, "Seed of the prompt tokens and the sampling (1234)");
  cmd->add_option("--temperature", flags->temperature, "Sampling temperature, > 0 (default 1)");
  cmd->add_option("--read-mib", flags->read_mib,
                  "MiB read by the bandwidth measurement (default 1024)");
  cmd->add_option("--max-seconds", flags->max_seconds,
                  "Time budget of the command, load included: skip phases that would overrun it "
                  "(default 0: none)");
  cmd->add_option("--topology", flags->topology,
                  "Run through the actor runtime with the expert shards of this topology config "
                  "(per-layer breakdown: attention, gate, dispatch, each shard, combine)");
  cmd->add_option("--shards", flags->shards,
                  "Run through the actor runtime with N even expert shards over this process's "
                  "cpus");
  cmd->add_option("--policy", flags->policy, kPolicyFlagHelp);
  cmd->add_option("--attention-device", flags->attention_device,
                  "With --topology/--shards: where attention (all non-expert stages) runs, cpu "
                  "or cuda:N (overrides the topology's attention_device)");
  cmd->add_option("--gpu-hot-experts-gib", flags->gpu_hot_experts_gib, kGpuHotExpertsFlagHelp);
  cmd->add_option("--profile", flags->profile, kPlacementProfileFlagHelp);
  cmd->add_option("--moe-spin-us", flags->moe_spin_us,
                  "With --topology/--shards: the CPU attention job polls this long for the "
                  "answer of a MoE layer before it sleeps (adaptive: only while answers come "
                  "back within twice that; default -1: auto, 20 with 8 or more cpus, else 0)");
  cmd->add_option("--arena-spin-us", flags->arena_spin_us,
                  "With --topology/--shards: the actors' arena dispatchers poll this long for the "
                  "next job before they sleep (default -1: auto, 1000 with 8 or more cpus, else "
                  "0)");
  cmd->add_flag("--tile-cache", flags->tile_cache,
                "Keep the AMX prefill path's int8 conversion of every expert in memory (tile "
                "caches: ~1 byte per expert weight more, prefill without conversion; also "
                "KTX_MOE_TILE_CACHE=1; docs/experts.md)");
  cmd->add_option("--requant-bf16", flags->requant_bf16,
                  "Re-quantize BF16 routed experts at load to q4_k, q5_k, q6_k or q8_0 (less "
                  "memory and fewer bytes per token, at that format's rounding; also "
                  "KTX_MOE_REQUANT_BF16; docs/deployment.md)");
  cmd->add_flag("--no-warmup-prefill", flags->no_warmup_prefill,
                "With --topology/--shards: skip the untimed prefill of the longest prompt before "
                "timing (first-use costs then count in the first prefill)");
  cmd->callback([flags, exit_code] {
    const absl::Status s = RunBench(*flags);
    if (!s.ok()) std::cerr << "ktx-ctl bench: " << s << "\n";
    *exit_code = s.ok() ? 0 : 1;
  });
}

}  // namespace ktx::cli
