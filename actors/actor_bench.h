// File: actors/actor_bench.h
//
// The end-to-end benchmark of `ktx-ctl bench --topology FILE` (docs/
// performance.md, "Method"): the phases, tok/s figures, JSON and table of
// runtime/bench/bench.h, run through the actor runtime (an Engine with the
// topology's expert shards on the fast CPU kernels) instead of one process
// calling the model's stages, plus a per-layer breakdown of where a step's
// time goes in the actor runtime (actors/profile.h): attention, gate (the
// router's top-k), dispatch (router bookkeeping, messages and thread
// hand-offs), each shard's compute time, shared experts, combine.
//
//   EngineOptions engine_options = ...;  // the topology's shards
//   KTX_RETURN_IF_ERROR(PrepareEngineOptionsForBench(bench_options, *model, &engine_options));
//   KTX_ASSIGN_OR_RETURN(auto engine, Engine::Create(model, engine_options));
//   KTX_ASSIGN_OR_RETURN(ActorBenchResult r, RunActorBenchmark(*engine, bench_options));
//   std::cout << FormatActorBenchTable(r);
//
// Phases, in this order (as runtime/bench):
//   * read bandwidth: a CpuPool over every cpu of the process;
//   * warm-up: one short request;
//   * prefill: for each prompt length p, one request of p random ids and no
//     generated token, in the engine's prefill chunks: tok/s = p / its wall
//     time (admission included);
//   * decode, per batch size B: B requests at once, each the decode context
//     (random ids, the same for all) plus its own decode_suffix random ids,
//     sampled at `temperature` with its own seed (distinct sequences). The
//     scheduler prefills them chunk by chunk while the first ones decode; the
//     timed steps are the first n_gen steps in which all B sequences decode
//     and no prompt chunk runs (from the scheduler's step log), then the
//     requests are cancelled: tok/s = B x steps / (end of the last timed step
//     - start of the first), sampling included. Unlike runtime/bench, each
//     sequence prefills its whole prompt itself (the engine has no KV copy),
//     so a long --decode-ctx costs B prefills.
// The breakdown of a phase covers exactly its timed steps (prefill: the
// steps of its chunks), from Engine::Profile.
//
// Not here: the kernel check of runtime/bench (run `ktx-ctl bench` without
// --topology for it; the shards run the same CpuMoeBackend) and the kernels'
// own byte counts (expert bytes per token are the GGUF bytes of the distinct
// experts each MoE layer used per step).
//
// Thread-safety: RunActorBenchmark uses the engine exclusively for its
// duration.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "actors/engine.h"
#include "nlohmann/json.hpp"
#include "runtime/bench/bench.h"

namespace ktx::actors {

// Times of one phase in ms per token (of the phase's tokens), summed over
// the layers (ActorBenchPhase::total) or of one layer (::layers).
struct ActorStageTimes {
  double attention = 0;
  double ffn_norm = 0;
  double gate = 0;
  double dense_ffn = 0;
  double moe = 0;       // LayerTiming::moe_us
  double experts = 0;   // the longest shard per layer (critical path)
  double shared = 0;    // overlaps moe
  double dispatch = 0;  // moe - max(experts, shared)
  double combine = 0;
  double late_wait = 0;        // LayerTiming::late_wait_us (expert deferral joins)
  std::vector<double> shards;  // [n_shards] each shard's compute
};

struct ActorBenchPhase {
  std::string name;                     // "prefill 64", "decode batch 4"
  int64_t steps = 0;                    // scheduler steps profiled
  int64_t tokens = 0;                   // token rows through the layers in those steps
  double seconds = 0;                   // the phase's wall time (as its tok/s uses)
  double step_wall_ms = 0;              // Σ of the attention actor's step times, ms per token
  double embed_ms = 0;                  // ms per token
  double head_ms = 0;                   // ms per token
  ActorStageTimes total;                // all layers
  std::vector<ActorStageTimes> layers;  // [n_layer]
};

struct ActorBenchResult {
  bench::BenchResult bench;             // phases, tok/s, stages mapped to bench::Stage
  std::vector<ShardInfo> shards;        // as built
  std::vector<ActorBenchPhase> phases;  // in the order run
  double engine_seconds = 0;            // Engine::Create (model open excluded), set by the caller
};

// Sets what the benchmark needs in the engine's options: profile_steps, a
// KV budget for the largest decode batch (B x (context + suffix + the steps a
// sequence may decode)) and the longest prompt, max_running >= the largest
// batch, prefill_chunk (options.prefill_chunk, or the longest prompt for 0),
// the fast experts' max_tokens. InvalidArgument for bad options.
absl::Status PrepareEngineOptionsForBench(const bench::BenchOptions& options,
                                          const models::Deepseek2Model& model,
                                          EngineOptions* engine_options);

// Runs the phases (see the file comment). Errors: bad options, an engine
// without step profiles (FailedPrecondition: EngineOptions::profile_steps)
// or with too small a KV budget (InvalidArgument naming the bytes needed),
// a request's error.
absl::StatusOr<ActorBenchResult> RunActorBenchmark(Engine& engine,
                                                   const bench::BenchOptions& options);

// BenchResultToJson(result.bench) plus "actors": shards (name, cpus, NUMA
// node, experts and bytes held, variant) and per phase the breakdown (ms per
// token: totals and per layer, per shard).
nlohmann::json ActorBenchResultToJson(const ActorBenchResult& result);
// FormatBenchTable(result.bench) plus the shards and the actor breakdown.
std::string FormatActorBenchTable(const ActorBenchResult& result);

}  // namespace ktx::actors
