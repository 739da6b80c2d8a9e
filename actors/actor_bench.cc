#include "actors/actor_bench.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "actors/cpu_arena.h"
#include "runtime/base/status.h"
#include "runtime/moe_backend/cpu_moe_backend.h"
#include "topology/cpu_list.h"
#include "topology/placement.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int64_t DecodeContext(const bench::BenchOptions& options) {
  return options.decode_context > 0
             ? options.decode_context
             : *std::min_element(options.prompt_lens.begin(), options.prompt_lens.end());
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tokens a decode request may generate: the timed steps plus one per step in
// which the batch's prompt chunks still run (the scheduler runs one chunk per
// step), plus slack for the cancellation to arrive.
int64_t DecodeMaxTokens(int64_t steps, int64_t batch, int64_t prompt, int64_t chunk) {
  return steps + batch * CeilDiv(prompt, chunk) + 8;
}

// GGUF bytes of one routed expert (gate + up + down) per layer; 0 for dense.
std::vector<double> BytesPerExpert(const models::Deepseek2Model& model) {
  const models::Deepseek2Hparams& hp = model.hparams();
  std::vector<double> out(hp.n_layer, 0.0);
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    const models::Deepseek2LayerWeights& w = model.weights().layers[il];
    for (const gguf::TensorInfo* t : {w.ffn_gate_exps, w.ffn_up_exps, w.ffn_down_exps}) {
      out[il] += static_cast<double>(t->n_bytes) / static_cast<double>(t->ne[2]);
    }
  }
  return out;
}

void Scale(double f, ActorStageTimes* t) {
  for (double* v : {&t->attention, &t->ffn_norm, &t->gate, &t->dense_ffn, &t->moe, &t->experts,
                    &t->shared, &t->dispatch, &t->combine, &t->late_wait}) {
    *v *= f;
  }
  for (double& v : t->shards) v *= f;
}

void Add(const LayerTiming& l, ActorStageTimes* t) {
  t->attention += static_cast<double>(l.attention_us);
  t->ffn_norm += static_cast<double>(l.ffn_norm_us);
  t->gate += static_cast<double>(l.gate_us);
  t->dense_ffn += static_cast<double>(l.dense_ffn_us);
  t->moe += static_cast<double>(l.moe_us);
  t->experts += static_cast<double>(l.experts_us);
  t->shared += static_cast<double>(l.shared_us);
  t->dispatch += static_cast<double>(l.dispatch_us);
  t->combine += static_cast<double>(l.combine_us);
  t->late_wait += static_cast<double>(l.late_wait_us);
  for (size_t s = 0; s < l.shard_us.size() && s < t->shards.size(); ++s) {
    t->shards[s] += static_cast<double>(l.shard_us[s]);
  }
}

void AddTimes(const ActorStageTimes& a, ActorStageTimes* t) {
  t->attention += a.attention;
  t->ffn_norm += a.ffn_norm;
  t->gate += a.gate;
  t->dense_ffn += a.dense_ffn;
  t->moe += a.moe;
  t->experts += a.experts;
  t->shared += a.shared;
  t->dispatch += a.dispatch;
  t->combine += a.combine;
  t->late_wait += a.late_wait;
  for (size_t s = 0; s < a.shards.size() && s < t->shards.size(); ++s) t->shards[s] += a.shards[s];
}

// The phase's breakdown over the profiled steps in `steps`; *expert_bytes
// gets the GGUF bytes of the distinct experts the MoE layers used.
ActorBenchPhase Aggregate(std::string name, const std::vector<StepProfile>& profiles,
                          const std::set<uint64_t>& steps, int n_layer, int n_shards,
                          const std::vector<double>& bytes_per_expert, double* expert_bytes) {
  ActorBenchPhase p;
  p.name = std::move(name);
  ActorStageTimes zero;
  zero.shards.assign(n_shards, 0.0);
  p.layers.assign(n_layer, zero);
  p.total = zero;
  double wall_us = 0, embed_us = 0, head_us = 0;
  *expert_bytes = 0;
  for (const StepProfile& s : profiles) {
    if (!steps.count(s.step)) continue;
    p.steps++;
    p.tokens += s.n_rows;
    wall_us += static_cast<double>(s.wall_us);
    embed_us += static_cast<double>(s.embed_us);
    head_us += static_cast<double>(s.head_us);
    for (int il = 0; il < n_layer && il < static_cast<int>(s.layers.size()); ++il) {
      Add(s.layers[il], &p.layers[il]);
      *expert_bytes += s.layers[il].distinct_experts * bytes_per_expert[il];
    }
  }
  const double per_token = 1e-3 / static_cast<double>(std::max<int64_t>(p.tokens, 1));
  for (ActorStageTimes& l : p.layers) {
    Scale(per_token, &l);
    AddTimes(l, &p.total);
  }
  p.step_wall_ms = wall_us * per_token;
  p.embed_ms = embed_us * per_token;
  p.head_ms = head_us * per_token;
  return p;
}

// The phase in runtime/bench's stages (ms per token per layer where the
// stage runs; embed and head per token).
bench::StageBreakdown ToStageBreakdown(const ActorBenchPhase& p,
                                       const models::Deepseek2Hparams& hp) {
  using bench::Stage;
  bench::StageBreakdown b;
  b.ms_per_token_layer.assign(bench::kNumStages, 0.0);
  b.layer_ms_per_token.assign(hp.n_layer, std::vector<double>(bench::kNumStages, 0.0));
  int n_moe = 0;
  for (int il = 0; il < hp.n_layer; ++il) n_moe += hp.IsMoeLayer(il) ? 1 : 0;
  const int n_dense = hp.n_layer - n_moe;
  for (int il = 0; il < hp.n_layer && il < static_cast<int>(p.layers.size()); ++il) {
    const ActorStageTimes& l = p.layers[il];
    std::vector<double>& row = b.layer_ms_per_token[il];
    row[static_cast<int>(Stage::kAttention)] = l.attention;
    row[static_cast<int>(Stage::kFfnNorm)] = l.ffn_norm;
    row[static_cast<int>(Stage::kDenseFfn)] = l.dense_ffn;
    row[static_cast<int>(Stage::kRoute)] = l.gate;
    row[static_cast<int>(Stage::kExperts)] = l.experts;
    row[static_cast<int>(Stage::kShared)] = l.shared;
    row[static_cast<int>(Stage::kCombine)] = l.combine;
  }
  auto per_layer = [](double total, int layers) { return layers > 0 ? total / layers : 0.0; };
  b.ms_per_token_layer[static_cast<int>(Stage::kEmbed)] = p.embed_ms;
  b.ms_per_token_layer[static_cast<int>(Stage::kHead)] = p.head_ms;
  b.ms_per_token_layer[static_cast<int>(Stage::kAttention)] =
      per_layer(p.total.attention, hp.n_layer);
  b.ms_per_token_layer[static_cast<int>(Stage::kFfnNorm)] = per_layer(p.total.ffn_norm, hp.n_layer);
  b.ms_per_token_layer[static_cast<int>(Stage::kDenseFfn)] = per_layer(p.total.dense_ffn, n_dense);
  b.ms_per_token_layer[static_cast<int>(Stage::kRoute)] = per_layer(p.total.gate, n_moe);
  b.ms_per_token_layer[static_cast<int>(Stage::kExperts)] = per_layer(p.total.experts, n_moe);
  b.ms_per_token_layer[static_cast<int>(Stage::kShared)] = per_layer(p.total.shared, n_moe);
  b.ms_per_token_layer[static_cast<int>(Stage::kCombine)] = per_layer(p.total.combine, hp.n_layer);
  b.total_ms_per_token = p.embed_ms + p.head_ms + p.total.attention + p.total.ffn_norm +
                         p.total.dense_ffn + p.total.gate + p.total.moe + p.total.combine;
  return b;
}

nlohmann::json TimesJson(const ActorStageTimes& t) {
  return {{"attention", t.attention}, {"ffn_norm", t.ffn_norm}, {"gate", t.gate},
          {"dense_ffn", t.dense_ffn}, {"moe", t.moe},           {"experts", t.experts},
          {"shared", t.shared},       {"dispatch", t.dispatch}, {"combine", t.combine},
          {"late_wait", t.late_wait}, {"shards", t.shards}};
}

std::string Fmt(double v) {
  if (v == 0) return "0";
  if (v >= 100) return absl::StrFormat("%.0f", v);
  if (v >= 10) return absl::StrFormat("%.1f", v);
  if (v >= 0.01) return absl::StrFormat("%.3f", v);
  return absl::StrFormat("%.2e", v);
}

// What the decode callbacks share with the benchmark thread.
struct DecodeState {
  explicit DecodeState(int64_t batch, int64_t target)
      : counts(static_cast<size_t>(batch)),
        tokens(static_cast<size_t>(batch)),
        outcomes(static_cast<size_t>(batch), absl::UnknownError("not done")),
        target(target),
        batch(batch) {}
  std::vector<std::atomic<int64_t>> counts;  // tokens per sequence
  std::atomic<int64_t> reached{0};           // sequences with `target` tokens
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::vector<int32_t>> tokens;  // guarded by mu
  std::vector<absl::Status> outcomes;        // guarded by mu
  int64_t done = 0;                          // guarded by mu
  const int64_t target;
  const int64_t batch;
};

}  // namespace

absl::Status PrepareEngineOptionsForBench(const bench::BenchOptions& options,
                                          const models::Deepseek2Model& model,
                                          EngineOptions* engine_options) {
  KTX_RETURN_IF_ERROR(options.Validate());
  const int64_t context = DecodeContext(options);
  const int64_t prompt = context + options.decode_suffix;
  const int64_t longest = *std::max_element(options.prompt_lens.begin(), options.prompt_lens.end());
  const int64_t max_batch =
      *std::max_element(options.batch_sizes.begin(), options.batch_sizes.end());
  const int64_t chunk =
      options.prefill_chunk > 0 ? options.prefill_chunk : std::max(longest, prompt);
  int64_t kv_tokens = std::max(longest + 1, options.warmup_tokens + 4);
  for (int64_t b : options.batch_sizes) {
    kv_tokens =
        std::max(kv_tokens, b * (prompt + DecodeMaxTokens(options.n_gen, b, prompt, chunk)));
  }
  const uint64_t bytes_per_token = model.kv_layout().bytes_per_token();
  engine_options->kv_budget_bytes =
      std::max(engine_options->kv_budget_bytes,
               static_cast<uint64_t>(kv_tokens) * bytes_per_token * 11 / 10 + (uint64_t{1} << 20));
  engine_options->max_running = std::max(engine_options->max_running,
                                         static_cast<int>(std::min<int64_t>(max_batch, 1 << 20)));
  engine_options->prefill_chunk = chunk;
  engine_options->profile_steps = std::max(engine_options->profile_steps, 4096);
  engine_options->fast_experts.max_tokens = std::clamp<int64_t>(chunk + max_batch, 1, 2048);
  return absl::OkStatus();
}

absl::StatusOr<ActorBenchResult> RunActorBenchmark(Engine& engine,
                                                   const bench::BenchOptions& options) {
  const auto bench_start = Clock::now();
  KTX_RETURN_IF_ERROR(options.Validate());
  const models::Deepseek2Model& model = engine.model();
  const models::Deepseek2Hparams& hp = model.hparams();
  const int64_t n_vocab = hp.n_vocab;
  const int64_t context = DecodeContext(options);
  const int64_t suffix = options.decode_suffix;
  const int64_t chunk = engine.options().prefill_chunk;
  const int n_shards = static_cast<int>(engine.shards().size());
  const std::vector<double> bytes_per_expert = BytesPerExpert(model);
  {
    const int64_t longest =
        *std::max_element(options.prompt_lens.begin(), options.prompt_lens.end());
    int64_t need = longest;
    for (int64_t b : options.batch_sizes) {
      need = std::max(
          need, context + suffix + DecodeMaxTokens(options.n_gen, b, context + suffix, chunk));
    }
    if (need > engine.n_ctx()) {
      return absl::InvalidArgumentError(absl::StrCat("benchmark sequences of up to ", need,
                                                     " tokens exceed the engine's context of ",
                                                     engine.n_ctx()));
    }
  }
  auto say = [&](const std::string& line) {
    if (options.progress) options.progress(line);
  };
  auto elapsed = [&] { return Seconds(bench_start, Clock::now()); };

  ActorBenchResult out;
  bench::BenchResult& result = out.bench;
  result.date = bench::BenchUtcNow();
  result.host = bench::BenchHostName();
  result.options = options;
  result.options.decode_context = context;
  result.experts = ExpertsBackendName(engine.options().experts);
  out.shards = engine.ShardInfos();
  std::set<int> cpus;
  uint64_t held = 0;
  for (const ShardInfo& s : out.shards) {
    cpus.insert(s.backend.cpus.begin(), s.backend.cpus.end());
    cpus.insert(s.cpus.begin(), s.cpus.end());
    held += s.backend.bytes_held;
  }
  result.cpus.assign(cpus.begin(), cpus.end());
  result.threads = static_cast<int>(cpus.size());
  if (!out.shards.empty() && out.shards[0].backend.variant != "reference") {
    result.variant = out.shards[0].backend.variant;
  }
  result.model = bench::BenchModelJson(model);
  result.load = {{"shards", n_shards}, {"repacked_bytes", held}};
  result.load["attention_device"] = engine.attention_device();
  if (const std::optional<gpu::GpuMemoryPlan> plan = engine.gpu_memory_plan()) {
    result.load["gpu_kv_tokens"] = plan->kv_tokens;
    result.load["gpu_weight_bytes"] = plan->weight_bytes();
    result.load["gpu_total_bytes"] = plan->total_bytes();
    result.load["gpu_max_batch_tokens"] = plan->max_batch_tokens;
  }
  if (!out.shards.empty()) {
    result.load["decode_layout"] = out.shards[0].backend.decode_layout;
    result.load["prefill_form"] = out.shards[0].backend.prefill_form;
    uint64_t tile_cache = 0;
    for (const auto& s : out.shards) tile_cache += s.backend.tile_cache_bytes;
    result.load["tile_cache_bytes"] = tile_cache;
  }

  {
    KTX_ASSIGN_OR_RETURN(std::unique_ptr<runtime::CpuPool> pool, moe_backend::CreateCpuPool(0));
    result.machine = bench::BenchMachineJson(*pool);
    say(absl::StrFormat("measuring read bandwidth (%.2f GiB, %d threads)",
                        static_cast<double>(options.read_bytes) / (1 << 30), pool->num_workers()));
    result.read_bw = bench::MeasureReadBandwidth(*pool, options.read_bytes, options.read_repeats);
    say(absl::StrFormat("read bandwidth %.1f GB/s (best of %d)", result.read_bw.best_gbps,
                        options.read_repeats));
  }

  // Warm-up; also proves the engine keeps profiles.
  {
    say("warm-up");
    GenerateRequest warm;
    warm.prompt = bench::BenchRandomTokens(std::max<int64_t>(options.warmup_tokens, 1), n_vocab,
                                           options.seed);
    warm.max_tokens = 2;
    warm.stop_at_eos = false;
    warm.sampling.temperature = options.temperature;
    warm.sampling.seed = options.seed;
    KTX_RETURN_IF_ERROR(engine.Generate(warm).status());
    const int64_t longest =
        *std::max_element(options.prompt_lens.begin(), options.prompt_lens.end());
    if (options.warmup_longest_prompt && longest > options.warmup_tokens) {
      say(absl::StrFormat("warm-up prefill of %d tokens (untimed)", longest));
      GenerateRequest warm_prefill = warm;
      warm_prefill.prompt = bench::BenchRandomTokens(longest, n_vocab, options.seed + 7);
      warm_prefill.max_tokens = 1;
      KTX_RETURN_IF_ERROR(engine.Generate(warm_prefill).status());
    }
    if (engine.Profile().empty()) {
      return absl::FailedPreconditionError(
          "the engine keeps no step profiles (EngineOptions::profile_steps = 0; see "
          "PrepareEngineOptionsForBench)");
    }
  }

  auto fits = [&](const std::string& phase, double estimate) {
    if (options.max_seconds <= 0 || elapsed() + estimate <= options.max_seconds) return true;
    say(absl::StrFormat("skipping %s: estimated %.0f s, %.0f s of the %.0f s budget left", phase,
                        estimate, options.max_seconds - elapsed(), options.max_seconds));
    result.skipped.push_back(phase);
    return false;
  };
  auto phase_done = [&] {
    if (options.on_phase) options.on_phase(result);
  };
  // Steps of the step log for which `pick` holds.
  auto steps_where = [&](const std::function<bool(const StepRecord&)>& pick)
      -> absl::StatusOr<std::vector<StepRecord>> {
    KTX_ASSIGN_OR_RETURN(std::vector<StepRecord> log, engine.StepLog());
    std::vector<StepRecord> picked;
    for (const StepRecord& r : log) {
      if (pick(r)) picked.push_back(r);
    }
    std::sort(picked.begin(), picked.end(),
              [](const StepRecord& a, const StepRecord& b) { return a.step < b.step; });
    return picked;
  };

  const std::vector<int32_t> context_tokens =
      bench::BenchRandomTokens(context, n_vocab, options.seed + context);
  {
    // Every decode batch must fit the scheduler's KV budget at once (else
    // it would run its sequences one after another). In tokens: the GPU
    // attention actor's cache has other bytes per token than the CPU's.
    const int64_t budget_tokens = engine.kv_budget_tokens();
    for (int64_t b : options.batch_sizes) {
      const int64_t need =
          b * (context + suffix + DecodeMaxTokens(options.n_gen, b, context + suffix, chunk));
      if (need > budget_tokens) {
        return absl::InvalidArgumentError(absl::StrCat(
            "decode batch ", b, " needs a KV budget of ", need, " tokens, the engine has ",
            budget_tokens, " (see PrepareEngineOptionsForBench)"));
      }
    }
  }

  // A prefill of p tokens, timed prefill_repeats times: the median run's
  // figures and phase, every run's tok/s beside them.
  auto run_prefill = [&](int64_t p, int repeats) -> absl::Status {
    GenerateRequest request;
    request.prompt =
        p == context ? context_tokens : bench::BenchRandomTokens(p, n_vocab, options.seed + p);
    request.max_tokens = 0;
    request.stop_at_eos = false;
    say(absl::StrCat("prefill ", p, " tokens"));
    std::vector<bench::PrefillResult> runs;
    std::vector<ActorBenchPhase> phases;
    std::vector<double> seconds_of;
    for (int run = 0; run < repeats; ++run) {
      const auto t0 = Clock::now();
      KTX_ASSIGN_OR_RETURN(GenerateResult r, engine.Generate(request));
      const double seconds = Seconds(t0, Clock::now());
      KTX_ASSIGN_OR_RETURN(std::vector<StepRecord> steps, steps_where([&](const StepRecord& s) {
                             return s.prefill_id == r.id && s.code == absl::StatusCode::kOk;
                           }));
      std::set<uint64_t> ids;
      for (const StepRecord& s : steps) ids.insert(s.step);
      double expert_bytes = 0;
      ActorBenchPhase phase = Aggregate(absl::StrCat("prefill ", p), engine.Profile(), ids,
                                        hp.n_layer, n_shards, bytes_per_expert, &expert_bytes);
      phase.seconds = seconds;
      bench::PrefillResult pr;
      pr.prompt_len = p;
      pr.seconds = seconds;
      pr.tok_s = static_cast<double>(p) / seconds;
      pr.stages = ToStageBreakdown(phase, hp);
      pr.expert_bytes_per_token =
          expert_bytes / static_cast<double>(std::max<int64_t>(phase.tokens, 1));
      say(absl::StrFormat(
          "prefill %d tokens: %.2f s, %.2f tok/s (%d steps)%s", p, seconds, pr.tok_s, phase.steps,
          repeats > 1 ? absl::StrFormat(" (run %d of %d)", run + 1, repeats) : std::string()));
      seconds_of.push_back(seconds);
      runs.push_back(std::move(pr));
      phases.push_back(std::move(phase));
    }
    out.phases.push_back(std::move(phases[bench::MedianRunIndex(seconds_of)]));
    result.prefill.push_back(bench::MedianPrefillRun(std::move(runs)));
    phase_done();
    return absl::OkStatus();
  };

  auto run_decode = [&](int64_t batch, int64_t steps) -> absl::Status {
    const int64_t prompt_len = context + suffix;
    auto state = std::make_shared<DecodeState>(batch, steps + 1);
    std::vector<uint64_t> ids(batch);
    say(absl::StrCat("decode batch ", batch, ": ", batch, " prompts of ", prompt_len, " tokens, ",
                     steps, " timed steps"));
    const auto t0 = Clock::now();
    for (int64_t b = 0; b < batch; ++b) {
      GenerateRequest request;
      request.prompt = context_tokens;
      const std::vector<int32_t> own = bench::BenchRandomTokens(
          suffix, n_vocab, options.seed + 7919 * static_cast<uint64_t>(b + 1));
      request.prompt.insert(request.prompt.end(), own.begin(), own.end());
      request.max_tokens = static_cast<int32_t>(DecodeMaxTokens(steps, batch, prompt_len, chunk));
      request.stop_at_eos = false;
      request.sampling.temperature = options.temperature;
      request.sampling.seed = options.seed + 1000003 * static_cast<uint64_t>(b + 1);
      ids[b] = engine.GenerateAsync(
          request,
          [state, b](int32_t token, std::string_view) {
            if (token < 0) return !state->stop.load();
            {
              std::lock_guard<std::mutex> lock(state->mu);
              state->tokens[b].push_back(token);
            }
            if (state->counts[b].fetch_add(1) + 1 == state->target &&
                state->reached.fetch_add(1) + 1 == state->batch) {
              state->stop.store(true);
            }
            return !state->stop.load();
          },
          [state, b](absl::StatusOr<GenerateResult> r) {
            std::lock_guard<std::mutex> lock(state->mu);
            state->outcomes[b] = r.status();
            state->done++;
            state->cv.notify_all();
          });
    }
    {
      std::unique_lock<std::mutex> lock(state->mu);
      state->cv.wait(lock, [&] { return state->done == batch; });
    }
    const double phase_seconds = Seconds(t0, Clock::now());
    for (int64_t b = 0; b < batch; ++b) {
      const absl::Status& s = state->outcomes[b];
      if (!s.ok() && s.code() != absl::StatusCode::kCancelled) {
        return absl::Status(
            s.code(), absl::StrCat("decode batch ", batch, ", sequence ", b, ": ", s.message()));
      }
    }
    const std::set<uint64_t> id_set(ids.begin(), ids.end());
    KTX_ASSIGN_OR_RETURN(std::vector<StepRecord> all, steps_where([&](const StepRecord& s) {
                           if (s.prefill_id != 0 || s.code != absl::StatusCode::kOk) return false;
                           int64_t n = 0;
                           for (uint64_t id : s.decode_ids) n += id_set.count(id);
                           return n == batch;
                         }));
    if (static_cast<int64_t>(all.size()) < steps) {
      return absl::InternalError(
          absl::StrCat("decode batch ", batch, ": only ", all.size(), " of ", steps,
                       " steps decoded every sequence without a prompt chunk"));
    }
    all.resize(steps);
    std::set<uint64_t> step_ids;
    for (const StepRecord& s : all) step_ids.insert(s.step);
    const double seconds = (all.back().end_ms - all.front().start_ms) / 1e3;
    double expert_bytes = 0;
    ActorBenchPhase phase =
        Aggregate(absl::StrCat("decode batch ", batch), engine.Profile(), step_ids, hp.n_layer,
                  n_shards, bytes_per_expert, &expert_bytes);
    phase.seconds = seconds;

    bench::DecodeResult r;
    r.batch = batch;
    r.steps = steps;
    r.context = prompt_len;
    r.seconds = seconds;
    const double tokens = static_cast<double>(batch * steps);
    r.tok_s = tokens / std::max(seconds, 1e-9);
    r.step_ms = 1e3 * seconds / static_cast<double>(steps);
    std::set<int32_t> distinct;
    {
      std::lock_guard<std::mutex> lock(state->mu);
      for (const std::vector<int32_t>& t : state->tokens) {
        distinct.insert(t.begin(), t.end());
        r.generated += static_cast<int64_t>(t.size());
      }
    }
    r.distinct_tokens = static_cast<int64_t>(distinct.size());
    r.stages = ToStageBreakdown(phase, hp);
    r.expert_bytes_per_token = expert_bytes / std::max(1.0, static_cast<double>(phase.tokens));
    r.experts_ms_per_token = phase.total.experts;
    const double experts_s = phase.total.experts * 1e-3 * static_cast<double>(phase.tokens);
    r.expert_read_gbps = experts_s > 0 ? expert_bytes / experts_s / 1e9 : 0;
    r.pct_of_read_bw =
        result.read_bw.best_gbps > 0 ? 100.0 * r.expert_read_gbps / result.read_bw.best_gbps : 0;
    say(absl::StrFormat(
        "decode batch %d: %.2f tok/s over %d steps (phase %.1f s with the prompts); dispatch "
        "%.3f ms per token",
        batch, r.tok_s, steps, phase_seconds, phase.total.dispatch));
    result.decode.push_back(std::move(r));
    out.phases.push_back(std::move(phase));
    phase_done();
    return absl::OkStatus();
  };

  // Order as runtime/bench: the decode context's prefill, the decode
  // batches, the other prompt lengths.
  const bool context_listed = std::find(options.prompt_lens.begin(), options.prompt_lens.end(),
                                        context) != options.prompt_lens.end();
  KTX_RETURN_IF_ERROR(run_prefill(context, context_listed ? options.prefill_repeats : 1));
  for (int64_t batch : options.batch_sizes) {
    const std::string phase = absl::StrCat("decode batch ", batch);
    // Its prompts' prefill, from the measured prefills, and its steps.
    const double prefill_s = static_cast<double>(batch) *
                             bench::EstimatePrefillSeconds(result.prefill, context + suffix);
    int64_t steps = options.n_gen;
    if (options.max_seconds > 0 && !result.decode.empty()) {
      const bench::DecodeResult& last = result.decode.back();
      const double step_s =
          last.seconds / static_cast<double>(last.batch * last.steps) * static_cast<double>(batch);
      steps = bench::DecodeStepsWithinBudget(options.max_seconds - elapsed() - prefill_s, step_s,
                                             options.n_gen);
      if (steps == 0) {
        fits(phase, prefill_s + step_s * static_cast<double>(options.n_gen));
        continue;
      }
      if (steps < options.n_gen) {
        result.reduced.push_back(absl::StrCat(phase, ": ", steps, " of ", options.n_gen, " steps"));
        say(absl::StrCat("time budget: ", result.reduced.back()));
      }
    } else if (!fits(phase, prefill_s)) {
      continue;
    }
    KTX_RETURN_IF_ERROR(run_decode(batch, steps));
  }
  std::set<int64_t> done = {context};
  for (int64_t p : options.prompt_lens) {
    if (!done.insert(p).second) continue;
    if (!fits(absl::StrCat("prefill ", p),
              options.prefill_repeats * bench::EstimatePrefillSeconds(result.prefill, p))) {
      continue;
    }
    KTX_RETURN_IF_ERROR(run_prefill(p, options.prefill_repeats));
  }
  if (!context_listed) {
    // The context's prefill ran for the decode phases only.
    result.prefill.erase(result.prefill.begin());
    out.phases.erase(out.phases.begin());
  }
  result.complete = result.skipped.empty() && result.reduced.empty();
  result.seconds = elapsed();
  return out;
}

nlohmann::json ActorBenchResultToJson(const ActorBenchResult& r) {
  nlohmann::json j = bench::BenchResultToJson(r.bench);
  nlohmann::json shards = nlohmann::json::array();
  for (const ShardInfo& s : r.shards) {
    shards.push_back({{"name", s.name},
                      {"cpus", s.cpus},
                      {"pinned", s.pinned},
                      {"kernel_cpus", s.backend.cpus},
                      {"numa_node", s.backend.numa_node},
                      {"experts_held", s.n_experts},
                      {"bytes_held", s.backend.bytes_held},
                      {"copies", s.backend.copies},
                      {"variant", s.backend.variant},
                      {"fast_layers", s.backend.n_fast_layers},
                      {"reference_layers", s.backend.n_reference_layers}});
  }
  nlohmann::json phases = nlohmann::json::array();
  for (const ActorBenchPhase& p : r.phases) {
    nlohmann::json layers = nlohmann::json::array();
    for (size_t il = 0; il < p.layers.size(); ++il) {
      nlohmann::json l = TimesJson(p.layers[il]);
      l["layer"] = il;
      layers.push_back(l);
    }
    phases.push_back({{"phase", p.name},
                      {"steps", p.steps},
                      {"tokens", p.tokens},
                      {"seconds", p.seconds},
                      {"step_wall_ms_per_token", p.step_wall_ms},
                      {"embed", p.embed_ms},
                      {"head", p.head_ms},
                      {"total", TimesJson(p.total)},
                      {"layers", layers}});
  }
  j["actors"] = {{"engine_seconds", r.engine_seconds},
                 {"units", "ms per token; total: summed over the layers"},
                 {"shards", shards},
                 {"phases", phases}};
  return j;
}

std::string FormatActorBenchTable(const ActorBenchResult& r) {
  std::string out = bench::FormatBenchTable(r.bench);
  absl::StrAppend(&out, "\nactor runtime: ", r.shards.size(), " expert shard(s), engine built in ",
                  absl::StrFormat("%.2f s", r.engine_seconds), "\n");
  absl::StrAppend(&out, absl::StrFormat("%-16s %-12s %5s %8s %11s %-9s\n", "shard", "cpus", "node",
                                        "experts", "held", "variant"));
  for (const ShardInfo& s : r.shards) {
    absl::StrAppend(
        &out, absl::StrFormat(
                  "%-16s %-12s %5s %8d %11s %-9s\n", s.name, topology::FormatIdRanges(s.cpus),
                  s.backend.numa_node >= 0 ? absl::StrCat(s.backend.numa_node) : std::string("-"),
                  s.n_experts, topology::FormatBytes(s.backend.bytes_held), s.backend.variant));
  }
  auto header = [&](const std::string& lead) {
    std::string h = lead;
    for (const char* c : {"attention", "gate", "moe", "experts", "dispatch", "shared", "combine"}) {
      absl::StrAppend(&h, absl::StrFormat(" %9s", c));
    }
    for (size_t s = 0; s < r.shards.size(); ++s) {
      absl::StrAppend(&h, absl::StrFormat(" %9s", absl::StrCat("shard", s)));
    }
    return h + "\n";
  };
  auto cells = [&](const ActorStageTimes& t) {
    std::string c;
    for (double v : {t.attention, t.gate, t.moe, t.experts, t.dispatch, t.shared, t.combine}) {
      absl::StrAppend(&c, absl::StrFormat(" %9s", Fmt(v)));
    }
    for (double v : t.shards) absl::StrAppend(&c, absl::StrFormat(" %9s", Fmt(v)));
    return c;
  };
  absl::StrAppend(&out,
                  "\nper phase, summed over layers (ms per token; moe = experts or shared, "
                  "whichever is longer, + dispatch)\n",
                  header(absl::StrFormat("%-16s %9s", "phase", "step")));
  for (const ActorBenchPhase& p : r.phases) {
    absl::StrAppend(&out, absl::StrFormat("%-16s %9s", p.name, Fmt(p.step_wall_ms)), cells(p.total),
                    "\n");
  }
  for (const ActorBenchPhase& p : r.phases) {
    if (p.name.rfind("decode", 0) != 0) continue;
    absl::StrAppend(&out, "\n", p.name, " per layer (ms per token)\n",
                    header(absl::StrFormat("%-16s %9s", "layer", "")));
    for (size_t il = 0; il < p.layers.size(); ++il) {
      absl::StrAppend(&out, absl::StrFormat("%-16d %9s", il, ""), cells(p.layers[il]), "\n");
    }
    break;  // the first decode phase
  }
  return out;
}

}  // namespace ktx::actors
