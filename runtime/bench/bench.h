// File: runtime/bench/bench.h
//
// The end-to-end benchmark behind `ktx-ctl bench` (docs/performance.md,
// "Method"): on a loaded model, after a warm-up,
//
//   * prefill: for each prompt length, one fresh sequence fed the prompt
//     (random token ids, fixed seed) in chunks of prefill_chunk: tok/s (the
//     decode context's length first, then the decode batches, then the other
//     lengths, so that a time budget keeps the decode figures);
//   * decode: for each batch size B, B independent sequences decoded together
//     for n_gen steps with BatchedForward. Each sequence is a copy of the KV
//     cache of a decode_context-token prompt followed by its own random
//     suffix of decode_suffix tokens (prefilled untimed), so that the
//     sequences differ from the first step on (copies alone would sample the
//     same tokens and route to the same experts, flattering batched expert
//     traffic); every sequence samples its next token (temperature > 0, its
//     own fixed seed), so tokens and routing vary as in real generation:
//     tok/s = B * n_gen / wall time (sampling included);
//   * per phase, a per-stage and per-layer breakdown (steady-clock time of
//     every stage call, as ms per token per layer), the routed-expert weight
//     bytes per token (GGUF bytes of the distinct experts each MoE layer used
//     per step, and the kernels' own count when the fast backend runs) and the
//     rate at which the experts stage read them, against
//   * a check of the fast experts against the reference backend on one MoE
//     layer (KernelCheck; a broken kernel would otherwise only look fast);
//   * the machine's all-core read bandwidth, measured in the same run: a
//     STREAM-like read of >= 1 GiB on the same CpuPool (best of N).
//
// The result converts to JSON (BenchResultToJson, with machine facts and the
// date) and to a readable table (FormatBenchTable).
//
// Thread-safety: RunBenchmark uses the model (and its expert backend) and the
// pool exclusively for its duration.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "runtime/bench/batched_forward.h"
#include "runtime/cpu_pool/cpu_pool.h"
#include "runtime/models/deepseek2.h"
#include "runtime/moe_backend/cpu_moe_backend.h"

namespace ktx::bench {

struct BenchResult;

struct BenchOptions {
  std::vector<int64_t> prompt_lens = {512, 2048};
  int64_t n_gen = 128;  // decode steps per batch size
  std::vector<int64_t> batch_sizes = {1, 4, 16};
  int64_t decode_context = 0;  // prompt tokens before decoding; 0: min(prompt_lens)
  int64_t decode_suffix = 8;   // distinct tokens per sequence after the context
  int64_t prefill_chunk = 0;   // 0: the whole prompt as one batch
  // Timed runs of each reported prefill (--prefill-repeats, [1, 100]): the
  // result is the run of median time (its stages too), with every run's
  // tok/s beside it. One prefill is a single sample on a shared host.
  int prefill_repeats = 1;
  uint64_t seed = 1234;        // prompt tokens and sampling
  float temperature = 1.0f;    // > 0
  int64_t warmup_tokens = 16;  // warm-up prefill (and 2 decode steps)
  // The actor-runtime bench (ktx-ctl bench --shards/--topology) also runs one
  // untimed prefill of the longest prompt before timing, so that first-use
  // costs at that shape (CUDA module loading and cuBLAS set-up for the big
  // GEMMs, first touch of the large host buffers, the GPU/CPU expert split's
  // run-time CPU cost correction) are not counted: measured on the H200, the
  // first 2048-token prefill took ~0.3 s longer than the next.
  bool warmup_longest_prompt = true;
  uint64_t read_bytes = uint64_t{1} << 30;  // bandwidth buffer, >= 1 GiB for the real figure
  int read_repeats = 5;
  // Time budget of RunBenchmark in seconds, from its start (0: none). A phase
  // whose estimated time (from the phases measured before it) would overrun
  // it is skipped and listed in BenchResult::skipped; a decode phase first
  // runs fewer steps (at least kMinDecodeSteps) when those fit (listed in
  // BenchResult::reduced).
  double max_seconds = 0;
  // Called with a line of progress ("prefill 512: ...") when set.
  std::function<void(const std::string&)> progress;
  // Called with the results so far after every phase (e.g. to rewrite a JSON
  // file, so that a run killed by a timeout leaves what it measured).
  std::function<void(const BenchResult&)> on_phase;

  // InvalidArgument naming the field for empty lists, non-positive sizes or
  // temperature <= 0.
  absl::Status Validate() const;
};

struct ReadBandwidth {
  uint64_t bytes = 0;
  int threads = 0;
  double best_gbps = 0;
  double mean_gbps = 0;
};

// Reads a buffer of `bytes` (allocated on the pool's NUMA node, first touched
// by the pool's workers) with every worker of `pool`, `repeats` times: GB/s.
ReadBandwidth MeasureReadBandwidth(runtime::CpuPool& pool, uint64_t bytes, int repeats);

// Stage times of one phase, as ms per token per layer.
struct StageBreakdown {
  // [kNumStages]: ms per token per layer where the stage ran (embed and head:
  // ms per token).
  std::vector<double> ms_per_token_layer;
  // [n_layer][kNumStages]: ms per token of each stage in each layer.
  std::vector<std::vector<double>> layer_ms_per_token;
  double total_ms_per_token = 0;  // all stages
};

struct PrefillResult {
  int64_t prompt_len = 0;
  double seconds = 0;  // the median run's (BenchOptions::prefill_repeats)
  double tok_s = 0;
  std::vector<double> runs_tok_s;  // every timed run's tok/s, in run order
  StageBreakdown stages;
  double expert_bytes_per_token = 0;
};

// Of `runs` prefill results of one prompt length (one per timed run, in run
// order; at least one), the run of median time (the lower middle of an even
// count) with every run's tok/s in runs_tok_s.
PrefillResult MedianPrefillRun(std::vector<PrefillResult> runs);
// Its index in `seconds` (the same rule).
size_t MedianRunIndex(const std::vector<double>& seconds);

struct DecodeResult {
  int64_t batch = 0;
  int64_t steps = 0;
  int64_t context = 0;  // tokens in each sequence before the first step (incl. suffix)
  double seconds = 0;   // all steps, sampling included
  double tok_s = 0;     // batch * steps / seconds
  double step_ms = 0;
  int64_t distinct_tokens = 0;  // over all generated tokens
  int64_t generated = 0;
  StageBreakdown stages;
  double expert_bytes_per_token = 0;  // GGUF bytes of the distinct experts per step / batch
  double kernel_bytes_per_token = 0;  // MoeRun::weight_bytes per token (fast backend; else 0)
  double experts_ms_per_token = 0;    // experts stage, all layers
  double expert_read_gbps = 0;        // bytes read by the experts stage / its time
  double pct_of_read_bw = 0;          // expert_read_gbps / machine read bandwidth
};

// The fast experts against the reference backend on one MoE layer, before
// the measurements: 4 tokens routed by the model (decode form) and 40 tokens
// all routed to experts 0..n_expert_used-1 (the prefill form where the variant
// has one). NMSE = ||fast - reference||^2 / ||reference||^2.
struct KernelCheck {
  bool ran = false;
  int layer = -1;
  double nmse_decode = 0;
  double nmse_prefill = 0;
  int64_t prefill_experts = 0;  // expert runs on the prefill form in the 40-token call
  double tolerance = 0;         // the backend's stated bound (moe_backend::ExpertsNmseBound)
  bool ok = false;
};

struct BenchResult {
  std::string date;  // UTC, ISO 8601
  std::string host;
  std::string model_path;
  std::string experts;  // "fast" / "reference"
  std::string variant;  // CPU variant of the fast experts ("" for reference)
  int threads = 0;
  std::vector<int> cpus;
  ReadBandwidth read_bw;
  nlohmann::json machine;  // cpu, isa (+ "topology" when the caller adds it)
  nlohmann::json model;    // hyper-parameters and sizes
  nlohmann::json load;     // load / repack figures
  KernelCheck check;       // fast backend only
  BenchOptions options;
  std::vector<PrefillResult> prefill;  // in the order run
  std::vector<DecodeResult> decode;
  std::vector<std::string> skipped;  // phases left out by the time budget
  std::vector<std::string> reduced;  // decode phases run with fewer steps ("... 40 of 128 steps")
  bool complete = false;             // every phase ran in full
  double seconds = 0;                // wall time of RunBenchmark
};

// Runs the benchmark. `experts` is the fast backend when the model uses one
// (for its kernel byte counts and load figures), else null. Errors: bad
// options, a model error (e.g. a context larger than the model's).
absl::StatusOr<BenchResult> RunBenchmark(const models::Deepseek2Model& model,
                                         runtime::CpuPool& pool,
                                         moe_backend::CpuMoeBackend* experts,
                                         const BenchOptions& options);

// Decode steps that fit in `seconds_left` at `step_seconds` each: n_gen when
// all fit (or nothing is known), else as many as fit if at least
// min(kMinDecodeSteps, n_gen), else 0 (skip).
inline constexpr int64_t kMinDecodeSteps = 8;
int64_t DecodeStepsWithinBudget(double seconds_left, double step_seconds, int64_t n_gen);

// Seconds a prefill of p tokens should take, from the prefills measured so
// far (0: none; what the time budget uses). The time per token grows with the
// length (causal attention over the tokens before it): with two lengths
// measured, a line through their per-token times; with one length q, its
// per-token time x (1 + p / q) / 2 for p > q, as if all of it grew with the
// context (an upper bound).
double EstimatePrefillSeconds(const std::vector<PrefillResult>& done, int64_t p);

nlohmann::json BenchResultToJson(const BenchResult& result);
std::string FormatBenchTable(const BenchResult& result);

// The pieces of RunBenchmark that other benchmarks reuse (the actor-path
// bench, actors/actor_bench.h): BenchResult::date, ::host, ::machine (for
// `pool`), ::model; the benchmark's random token ids (ids >= 3 where the
// vocabulary allows, fixed by `seed`).
std::string BenchUtcNow();
std::string BenchHostName();
nlohmann::json BenchMachineJson(const runtime::CpuPool& pool);
nlohmann::json BenchModelJson(const models::Deepseek2Model& model);
std::vector<int32_t> BenchRandomTokens(int64_t n, int64_t n_vocab, uint64_t seed);

}  // namespace ktx::bench
