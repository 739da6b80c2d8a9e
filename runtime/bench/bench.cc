#include "runtime/bench/bench.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <random>
#include <set>
#include <utility>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kernels/common/tensor_type.h"
#include "kernels/cpu/cpu_features.h"
#include "runtime/base/status.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/sampler/sampler.h"

namespace ktx::bench {
namespace {

using Clock = std::chrono::steady_clock;

volatile uint64_t g_read_sink = 0;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Sum of the 64-bit words of [p, p + bytes) (bytes % 64 == 0, p 16-aligned):
// a read loop with four independent SSE2 accumulators (baseline x86-64, no
// ISA flags; one core's loads far outrun its share of DRAM bandwidth).
uint64_t ReadSum(const uint8_t* p, size_t bytes) {
#if defined(__x86_64__)
  __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < bytes; i += 64) {
    a0 = _mm_add_epi64(a0, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i)));
    a1 = _mm_add_epi64(a1, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i + 16)));
    a2 = _mm_add_epi64(a2, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i + 32)));
    a3 = _mm_add_epi64(a3, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i + 48)));
  }
  const __m128i s = _mm_add_epi64(_mm_add_epi64(a0, a1), _mm_add_epi64(a2, a3));
  uint64_t out[2];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), s);
  return out[0] + out[1];
#else
  uint64_t s[4] = {0, 0, 0, 0};
  for (size_t i = 0; i < bytes; i += 32) {
    for (int j = 0; j < 4; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      s[j] += v;
    }
  }
  return s[0] + s[1] + s[2] + s[3];
#endif
}

std::string UtcNow() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string HostName() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "";
  return buf;
}

std::string TypeName(kernels::TensorType t) {
  const auto traits = kernels::GetTensorTypeTraits(static_cast<uint32_t>(t));
  return traits ? std::string(traits->name) : absl::StrCat(static_cast<uint32_t>(t));
}

nlohmann::json MachineJson(const runtime::CpuPool& pool) {
  const kernels::CpuFeatures& f = kernels::DetectCpuFeatures();
  nlohmann::json m;
  m["cpu_brand"] = f.brand;
  m["cpu_vendor"] = f.vendor;
  m["logical_cpus_online"] = sysconf(_SC_NPROCESSORS_ONLN);
  m["threads"] = pool.num_workers();
  m["cpus"] = pool.cpus();
  m["isa"] = {{"avx2", f.avx2},
              {"fma", f.fma},
              {"f16c", f.f16c},
              {"avx512f", f.avx512f && f.os_avx512},
              {"avx512bw", f.avx512bw},
              {"avx512vl", f.avx512vl},
              {"avx512dq", f.avx512dq},
              {"avx512_vnni", f.avx512_vnni},
              {"avx512_bf16", f.avx512_bf16},
              {"avx512_fp16", f.avx512_fp16},
              {"avx_vnni", f.avx_vnni},
              {"amx_tile", f.amx_tile},
              {"amx_int8", f.amx_int8},
              {"amx_bf16", f.amx_bf16},
              {"amx_permitted", f.amx_permitted}};
  return m;
}

nlohmann::json ModelJson(const models::Deepseek2Model& model) {
  const models::Deepseek2Hparams& hp = model.hparams();
  nlohmann::json m;
  m["n_layer"] = hp.n_layer;
  m["n_layer_dense_lead"] = hp.n_layer_dense_lead;
  m["n_embd"] = hp.n_embd;
  m["n_head"] = hp.n_head;
  m["q_lora_rank"] = hp.q_lora_rank;
  m["kv_lora_rank"] = hp.kv_lora_rank;
  m["n_ff"] = hp.n_ff;
  m["n_expert"] = hp.n_expert;
  m["n_expert_used"] = hp.n_expert_used;
  m["n_expert_shared"] = hp.n_expert_shared;
  m["n_ff_exp"] = hp.n_ff_exp;
  m["n_vocab"] = hp.n_vocab;
  uint64_t bytes = 0;
  for (const gguf::TensorInfo& t : model.file().tensors()) bytes += t.n_bytes;
  m["tensor_bytes"] = bytes;
  nlohmann::json experts = nlohmann::json::array();
  double max_bytes_per_token = 0;
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    const models::Deepseek2LayerWeights& w = model.weights().layers[il];
    double per_expert = 0;
    for (const gguf::TensorInfo* t : {w.ffn_gate_exps, w.ffn_up_exps, w.ffn_down_exps}) {
      per_expert += static_cast<double>(t->n_bytes) / static_cast<double>(t->ne[2]);
    }
    max_bytes_per_token += per_expert * hp.n_expert_used;
    experts.push_back({{"layer", il},
                       {"gate", TypeName(w.ffn_gate_exps->type)},
                       {"up", TypeName(w.ffn_up_exps->type)},
                       {"down", TypeName(w.ffn_down_exps->type)},
                       {"bytes_per_expert", per_expert}});
  }
  m["moe_layers"] = experts;
  // Routed-expert bytes one token reads when no expert is shared with others.
  m["expert_bytes_per_token_max"] = max_bytes_per_token;
  return m;
}

StageBreakdown Breakdown(const StageProfile& p) {
  StageBreakdown b;
  const double tokens = static_cast<double>(std::max<int64_t>(p.tokens(), 1));
  b.ms_per_token_layer.assign(kNumStages, 0.0);
  b.layer_ms_per_token.assign(p.n_layer(), std::vector<double>(kNumStages, 0.0));
  for (int s = 0; s < kNumStages; ++s) {
    const Stage stage = static_cast<Stage>(s);
    const double total = p.total_seconds(stage);
    b.total_ms_per_token += 1e3 * total / tokens;
    b.ms_per_token_layer[s] = 1e3 * total / tokens / std::max(1, p.layers_with(stage));
    for (int il = 0; il < p.n_layer(); ++il) {
      b.layer_ms_per_token[il][s] = 1e3 * p.seconds(stage, il) / tokens;
    }
  }
  return b;
}

std::vector<int32_t> RandomTokens(int64_t n, int64_t n_vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t lo = std::min<int64_t>(3, n_vocab - 1);  // skip BOS/EOS/pad when possible
  std::vector<int32_t> t(n);
  for (int32_t& v : t) {
    v = static_cast<int32_t>(lo +
                             static_cast<int64_t>(rng() % static_cast<uint64_t>(n_vocab - lo)));
  }
  return t;
}

// Prefills `tokens` into `kv` in chunks; the last chunk's last logits row.
absl::Status Prefill(const models::Deepseek2Model& model, std::span<const int32_t> tokens,
                     int64_t chunk, kv_cache::SequenceKv* kv, models::Activations* logits,
                     StageProfile* profile) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t step = chunk > 0 ? chunk : n;
  for (int64_t b = 0; b < n; b += step) {
    const SequenceBatchEntry e{tokens.subspan(b, std::min(step, n - b)), kv};
    KTX_RETURN_IF_ERROR(BatchedForward(model, std::span<const SequenceBatchEntry>(&e, 1),
                                       models::LogitsRows::kLast, logits, profile));
  }
  return absl::OkStatus();
}

nlohmann::json StagesJson(const StageBreakdown& b) {
  nlohmann::json j;
  for (int s = 0; s < kNumStages; ++s)
    j[StageName(static_cast<Stage>(s))] = b.ms_per_token_layer[s];
  return j;
}

nlohmann::json LayersJson(const StageBreakdown& b) {
  nlohmann::json layers = nlohmann::json::array();
  for (size_t il = 0; il < b.layer_ms_per_token.size(); ++il) {
    nlohmann::json l;
    l["layer"] = il;
    for (int s = 0; s < kNumStages; ++s) {
      const Stage stage = static_cast<Stage>(s);
      if (stage == Stage::kEmbed || stage == Stage::kHead) continue;
      l[StageName(stage)] = b.layer_ms_per_token[il][s];
    }
    layers.push_back(l);
  }
  return layers;
}

std::string Fmt(double v) {
  if (v == 0) return "0";
  if (v >= 100) return absl::StrFormat("%.0f", v);
  if (v >= 10) return absl::StrFormat("%.1f", v);
  if (v >= 0.01) return absl::StrFormat("%.3f", v);
  return absl::StrFormat("%.2e", v);
}

double Nmse(const models::Activations& got, const models::Activations& want) {
  double d = 0, r = 0;
  for (size_t i = 0; i < want.values().size(); ++i) {
    const double e = static_cast<double>(got.values()[i]) - want.values()[i];
    d += e * e;
    r += static_cast<double>(want.values()[i]) * want.values()[i];
  }
  return r > 0 ? d / r : (d > 0 ? 1.0 : 0.0);
}

absl::StatusOr<KernelCheck> CheckKernels(const models::Deepseek2Model& model,
                                         moe_backend::CpuMoeBackend& experts, uint64_t seed) {
  KernelCheck c;
  const models::Deepseek2Hparams& hp = model.hparams();
  for (int il = 0; il < hp.n_layer && c.layer < 0; ++il) {
    if (experts.IsFastLayer(il)) c.layer = il;
  }
  if (c.layer < 0) return c;  // nothing runs on the kernels
  constexpr int64_t kTokens = 40;
  const std::vector<int32_t> tokens = RandomTokens(kTokens, hp.n_vocab, seed ^ 0x9e3779b9);
  models::Activations x, h, h4, want, got;
  KTX_RETURN_IF_ERROR(model.Embed(tokens, &x));
  KTX_RETURN_IF_ERROR(model.FfnNorm(c.layer, x, &h));
  h4.Resize(4, hp.n_embd);
  std::memcpy(h4.data(), h.data(), sizeof(float) * 4 * hp.n_embd);
  models::ReferenceExpertBackend reference(hp, model.weights());
  models::Routing routing;
  KTX_RETURN_IF_ERROR(model.Route(c.layer, h4, &routing));
  KTX_RETURN_IF_ERROR(reference.Compute(c.layer, h4, routing, {}, &want));
  KTX_RETURN_IF_ERROR(experts.Compute(c.layer, h4, routing, {}, &got));
  c.nmse_decode = Nmse(got, want);
  models::Routing same;
  same.n_tokens = kTokens;
  same.n_expert_used = hp.n_expert_used;
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int k = 0; k < hp.n_expert_used; ++k) {
      same.expert_ids.push_back(k);
      same.weights.push_back(1.0f / static_cast<float>(hp.n_expert_used));
    }
  }
  experts.ResetRunStats();
  KTX_RETURN_IF_ERROR(reference.Compute(c.layer, h, same, {}, &want));
  KTX_RETURN_IF_ERROR(experts.Compute(c.layer, h, same, {}, &got));
  c.prefill_experts = experts.run_stats().prefill_experts;
  c.nmse_prefill = Nmse(got, want);
  c.tolerance = moe_backend::ExpertsNmseBound(experts.load_stats());
  c.ok = c.nmse_decode < c.tolerance && c.nmse_prefill < c.tolerance;
  c.ran = true;
  return c;
}

}  // namespace

int64_t DecodeStepsWithinBudget(double seconds_left, double step_seconds, int64_t n_gen) {
  if (!(step_seconds > 0)) return n_gen;
  if (!(seconds_left > 0)) return 0;
  const double fit = std::floor(seconds_left / step_seconds);
  if (fit >= static_cast<double>(n_gen)) return n_gen;
  const int64_t steps = static_cast<int64_t>(fit);
  return steps >= std::min<int64_t>(kMinDecodeSteps, n_gen) ? steps : 0;
}

double EstimatePrefillSeconds(const std::vector<PrefillResult>& done, int64_t p) {
  if (done.empty()) return 0;
  // The shortest and the longest lengths measured.
  const PrefillResult* a = &done.front();
  const PrefillResult* b = &done.front();
  for (const PrefillResult& r : done) {
    if (r.prompt_len < a->prompt_len) a = &r;
    if (r.prompt_len > b->prompt_len) b = &r;
  }
  if (b->prompt_len == a->prompt_len) b = nullptr;
  auto per_token = [](const PrefillResult& r) {
    return r.seconds / static_cast<double>(r.prompt_len);
  };
  const double n = static_cast<double>(p);
  if (b != nullptr) {
    const double slope =
        (per_token(*b) - per_token(*a)) / static_cast<double>(b->prompt_len - a->prompt_len);
    const double at_p = per_token(*b) + std::max(0.0, slope) * (n - b->prompt_len);
    return n * std::max(at_p, std::min(per_token(*a), per_token(*b)));
  }
  const double ratio = n / static_cast<double>(a->prompt_len);
  return n * per_token(*a) * std::max(1.0, (1.0 + ratio) / 2.0);
}

size_t MedianRunIndex(const std::vector<double>& seconds) {
  std::vector<size_t> order(seconds.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return seconds[a] < seconds[b]; });
  return order.empty() ? 0 : order[(order.size() - 1) / 2];
}

PrefillResult MedianPrefillRun(std::vector<PrefillResult> runs) {
  std::vector<double> seconds, tok_s;
  for (const PrefillResult& r : runs) {
    seconds.push_back(r.seconds);
    tok_s.push_back(r.tok_s);
  }
  PrefillResult m = std::move(runs[MedianRunIndex(seconds)]);
  m.runs_tok_s = std::move(tok_s);
  return m;
}

absl::Status BenchOptions::Validate() const {
  if (prompt_lens.empty()) return absl::InvalidArgumentError("--prompt-len: no length given");
  for (int64_t p : prompt_lens) {
    if (p <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--prompt-len ", p, ": expected positive token counts"));
    }
  }
  if (batch_sizes.empty()) return absl::InvalidArgumentError("--batch: no batch size given");
  for (int64_t b : batch_sizes) {
    if (b <= 0 || b > 4096) {
      return absl::InvalidArgumentError(
          absl::StrCat("--batch ", b, ": expected batch sizes in [1, 4096]"));
    }
  }
  if (n_gen <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--gen ", n_gen, ": expected > 0 steps"));
  }
  if (decode_context < 0 || decode_suffix < 0 || prefill_chunk < 0 || warmup_tokens < 0) {
    return absl::InvalidArgumentError(
        "--decode-ctx, the decode suffix, --prefill-chunk and the warm-up size must be >= 0");
  }
  if (!(temperature > 0.0f) || temperature > 100.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature ", temperature, ": the benchmark samples, expected (0, 100]"));
  }
  if (read_repeats <= 0) return absl::InvalidArgumentError("read_repeats must be > 0");
  if (prefill_repeats < 1 || prefill_repeats > 100) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--prefill-repeats ", prefill_repeats, ": expected [1, 100] timed runs per prompt length"));
  }
  if (!(max_seconds >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-seconds ", max_seconds, ": expected >= 0 (0: no budget)"));
  }
  return absl::OkStatus();
}

ReadBandwidth MeasureReadBandwidth(runtime::CpuPool& pool, uint64_t bytes, int repeats) {
  constexpr uint64_t kChunk = uint64_t{4} << 20;
  ReadBandwidth r;
  r.threads = pool.num_workers();
  const uint64_t n_chunks = std::max<uint64_t>(1, (bytes + kChunk - 1) / kChunk);
  r.bytes = n_chunks * kChunk;
  runtime::NumaBuffer buf = pool.Allocate(r.bytes);
  if (buf.data() == nullptr) return r;
  uint8_t* base = static_cast<uint8_t*>(buf.data());
  pool.ParallelFor(static_cast<int64_t>(n_chunks), [&](int64_t c, int) {
    std::memset(base + c * kChunk, static_cast<int>(c & 0xff), kChunk);
  });
  std::vector<uint64_t> sums(n_chunks);
  uint64_t sink = 0;
  double sum_gbps = 0;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = Clock::now();
    pool.ParallelFor(static_cast<int64_t>(n_chunks),
                     [&](int64_t c, int) { sums[c] = ReadSum(base + c * kChunk, kChunk); });
    const double s = Seconds(t0, Clock::now());
    for (uint64_t v : sums) sink += v;
    const double gbps = static_cast<double>(r.bytes) / s / 1e9;
    r.best_gbps = std::max(r.best_gbps, gbps);
    sum_gbps += gbps;
  }
  r.mean_gbps = sum_gbps / repeats;
  g_read_sink = sink;  // the sums stay observable: the reads cannot be optimised away
  return r;
}

absl::StatusOr<BenchResult> RunBenchmark(const models::Deepseek2Model& model,
                                         runtime::CpuPool& pool,
                                         moe_backend::CpuMoeBackend* experts,
                                         const BenchOptions& options) {
  const auto bench_start = Clock::now();
  KTX_RETURN_IF_ERROR(options.Validate());
  const models::Deepseek2Hparams& hp = model.hparams();
  const int64_t n_vocab = hp.n_vocab;
  const int64_t context =
      options.decode_context > 0
          ? options.decode_context
          : *std::min_element(options.prompt_lens.begin(), options.prompt_lens.end());
  const int64_t longest =
      std::max(*std::max_element(options.prompt_lens.begin(), options.prompt_lens.end()),
               context + options.decode_suffix + options.n_gen);
  if (longest > hp.n_ctx_train) {
    return absl::InvalidArgumentError(absl::StrCat("benchmark sequences of ", longest,
                                                   " tokens exceed the model's context of ",
                                                   hp.n_ctx_train));
  }
  auto say = [&](const std::string& line) {
    if (options.progress) options.progress(line);
  };

  BenchResult result;
  result.date = UtcNow();
  result.host = HostName();
  result.options = options;
  result.options.decode_context = context;
  result.threads = pool.num_workers();
  result.cpus = pool.cpus();
  result.experts = experts != nullptr ? "fast" : "reference";
  result.variant = experts != nullptr ? kernels::CpuVariantName(experts->variant()) : "";
  result.machine = MachineJson(pool);
  result.model = ModelJson(model);
  if (experts != nullptr) {
    const moe_backend::CpuMoeLoadStats& ls = experts->load_stats();
    result.load = {{"variant", ls.variant},
                   {"decode_layout", ls.decode_layout},
                   {"prefill_form", ls.prefill_form},
                   {"tile_cache_bytes", ls.tile_cache_bytes},
                   {"prefill_min_tokens", ls.prefill_min_tokens},
                   {"prefill_switch", ls.prefill_switch},
                   {"bf16_tile_min_tokens", ls.bf16_tile_min_tokens},
                   {"bf16_tile_switch", ls.bf16_tile_switch},
                   {"fast_layers", ls.n_fast_layers},
                   {"reference_layers", ls.n_reference_layers},
                   {"experts_held", ls.n_experts_held},
                   {"repacked_bytes", ls.repacked_bytes},
                   {"repack_seconds", ls.repack_seconds},
                   {"experts_load_seconds", ls.seconds},
                   {"workspace_bytes", ls.workspace_bytes},
                   {"numa_node", ls.numa_node}};
  } else {
    result.load = nlohmann::json::object();
  }

  // Read bandwidth first, on an idle machine.
  say(absl::StrFormat("measuring read bandwidth (%.2f GiB, %d threads)",
                      static_cast<double>(options.read_bytes) / (1 << 30), pool.num_workers()));
  result.read_bw = MeasureReadBandwidth(pool, options.read_bytes, options.read_repeats);
  say(absl::StrFormat("read bandwidth %.1f GB/s (best of %d)", result.read_bw.best_gbps,
                      options.read_repeats));

  if (experts != nullptr) {
    say("checking the CPU expert kernels against the reference backend");
    KTX_ASSIGN_OR_RETURN(result.check, CheckKernels(model, *experts, options.seed));
    if (result.check.ran) {
      say(absl::StrFormat(
          "kernel check, layer %d: NMSE %.2e (decode), %.2e (40 tokens per expert, "
          "%d on the prefill form), bound %.1e: %s",
          result.check.layer, result.check.nmse_decode, result.check.nmse_prefill,
          result.check.prefill_experts, result.check.tolerance, result.check.ok ? "ok" : "FAILED"));
    }
  }

  const kv_cache::LatentKvLayout layout = model.kv_layout();
  StageProfile profile(model);
  models::Activations logits;

  // Warm-up: page in the weights used by every stage, start the workers.
  if (options.warmup_tokens > 0) {
    say("warm-up");
    const std::vector<int32_t> warm = RandomTokens(options.warmup_tokens, n_vocab, options.seed);
    KTX_ASSIGN_OR_RETURN(auto kv, kv_cache::SequenceKv::Create(layout, options.warmup_tokens + 2));
    KTX_RETURN_IF_ERROR(Prefill(model, warm, 0, kv.get(), &logits, nullptr));
    for (int i = 0; i < 2; ++i) {
      const int32_t one[] = {warm[i]};
      const SequenceBatchEntry e{one, kv.get()};
      KTX_RETURN_IF_ERROR(BatchedForward(model, std::span<const SequenceBatchEntry>(&e, 1),
                                         models::LogitsRows::kLast, &logits, nullptr));
    }
  }

  auto elapsed = [&] { return Seconds(bench_start, Clock::now()); };
  // Whether a phase estimated to take `estimate` seconds still fits the budget.
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

  std::unique_ptr<kv_cache::SequenceKv> context_kv;
  std::vector<float> context_logits;
  // One prefill phase; keeps the KV and logits when p is the decode context.
  auto run_prefill = [&](int64_t p, bool report) -> absl::Status {
    const std::vector<int32_t> prompt = RandomTokens(p, n_vocab, options.seed + p);
    KTX_ASSIGN_OR_RETURN(auto kv, kv_cache::SequenceKv::Create(layout, p + 1));
    profile.Reset();
    if (experts != nullptr) experts->ResetRunStats();
    say(absl::StrCat(report ? "prefill " : "decode context: prefill ", p, " tokens"));
    auto t0 = Clock::now();
    KTX_RETURN_IF_ERROR(Prefill(model, prompt, options.prefill_chunk, kv.get(), &logits, &profile));
    if (p == context && context_kv == nullptr) {
      context_kv = std::move(kv);
      context_logits = logits.ToVector();
    }
    if (!report) return absl::OkStatus();
    std::vector<PrefillResult> runs;
    for (int run = 0;; ++run) {
      PrefillResult r;
      r.prompt_len = p;
      r.seconds = Seconds(t0, Clock::now());
      r.tok_s = static_cast<double>(p) / r.seconds;
      r.stages = Breakdown(profile);
      r.expert_bytes_per_token = profile.expert_bytes() / static_cast<double>(p);
      say(absl::StrFormat("prefill %d tokens: %.2f s, %.2f tok/s%s", p, r.seconds, r.tok_s,
                          options.prefill_repeats > 1
                              ? absl::StrFormat(" (run %d of %d)", run + 1, options.prefill_repeats)
                              : std::string()));
      runs.push_back(std::move(r));
      if (run + 1 == options.prefill_repeats) break;
      KTX_ASSIGN_OR_RETURN(auto again, kv_cache::SequenceKv::Create(layout, p + 1));
      profile.Reset();
      if (experts != nullptr) experts->ResetRunStats();
      t0 = Clock::now();
      KTX_RETURN_IF_ERROR(
          Prefill(model, prompt, options.prefill_chunk, again.get(), &logits, &profile));
    }
    result.prefill.push_back(MedianPrefillRun(std::move(runs)));
    phase_done();
    return absl::OkStatus();
  };

  auto run_decode = [&](int64_t batch, int64_t steps) -> absl::Status {
    std::vector<std::unique_ptr<kv_cache::SequenceKv>> kvs;
    std::vector<sampler::Sampler> samplers;
    std::vector<int32_t> next(batch);
    std::set<int32_t> distinct;
    const int64_t suffix = options.decode_suffix;
    std::vector<std::vector<int32_t>> suffixes(batch);
    for (int64_t b = 0; b < batch; ++b) {
      KTX_ASSIGN_OR_RETURN(auto kv, kv_cache::SequenceKv::Create(layout, context + suffix + steps));
      for (int il = 0; il < layout.n_layer; ++il) {
        for (int64_t pos = 0; pos < context; ++pos) {
          std::memcpy(kv->Row(il, pos), context_kv->Row(il, pos),
                      sizeof(float) * layout.row_width());
        }
      }
      KTX_RETURN_IF_ERROR(kv->Commit(context));
      kvs.push_back(std::move(kv));
      sampler::SamplingParams sp;
      sp.temperature = options.temperature;
      sp.seed = options.seed + 1000003 * static_cast<uint64_t>(b + 1);
      KTX_ASSIGN_OR_RETURN(sampler::Sampler s, sampler::Sampler::Create(sp));
      if (suffix == 0) next[b] = s.Sample(context_logits.data(), n_vocab);
      samplers.push_back(std::move(s));
      suffixes[b] =
          RandomTokens(suffix, n_vocab, options.seed + 7919 * static_cast<uint64_t>(b + 1));
    }
    std::vector<SequenceBatchEntry> entries(batch);
    if (suffix > 0) {  // untimed: every sequence gets its own last tokens
      for (int64_t b = 0; b < batch; ++b) entries[b] = {suffixes[b], kvs[b].get()};
      KTX_RETURN_IF_ERROR(BatchedForward(model, entries, models::LogitsRows::kLast, &logits));
      for (int64_t b = 0; b < batch; ++b) next[b] = samplers[b].Sample(logits.row(b), n_vocab);
    }
    for (int32_t t : next) distinct.insert(t);
    profile.Reset();
    if (experts != nullptr) experts->ResetRunStats();
    say(absl::StrCat("decode batch ", batch, ": ", steps, " steps"));
    const auto t0 = Clock::now();
    for (int64_t step = 0; step < steps; ++step) {
      for (int64_t b = 0; b < batch; ++b) {
        entries[b] = {std::span<const int32_t>(&next[b], 1), kvs[b].get()};
      }
      KTX_RETURN_IF_ERROR(
          BatchedForward(model, entries, models::LogitsRows::kLast, &logits, &profile));
      for (int64_t b = 0; b < batch; ++b) {
        next[b] = samplers[b].Sample(logits.row(b), n_vocab);
        distinct.insert(next[b]);
      }
    }
    DecodeResult r;
    r.batch = batch;
    r.steps = steps;
    r.context = context + suffix;
    r.seconds = Seconds(t0, Clock::now());
    r.generated = batch * (steps + 1);
    r.distinct_tokens = static_cast<int64_t>(distinct.size());
    const double tokens = static_cast<double>(batch * steps);
    r.tok_s = tokens / r.seconds;
    r.step_ms = 1e3 * r.seconds / static_cast<double>(steps);
    r.stages = Breakdown(profile);
    r.expert_bytes_per_token = profile.expert_bytes() / tokens;
    const double experts_s = profile.total_seconds(Stage::kExperts);
    r.experts_ms_per_token = 1e3 * experts_s / tokens;
    double read_bytes = profile.expert_bytes();
    if (experts != nullptr) {
      const moe_backend::CpuMoeRunStats st = experts->run_stats();
      r.kernel_bytes_per_token = static_cast<double>(st.weight_bytes) / tokens;
      if (st.weight_bytes > 0) read_bytes = static_cast<double>(st.weight_bytes);
    }
    r.expert_read_gbps = experts_s > 0 ? read_bytes / experts_s / 1e9 : 0;
    r.pct_of_read_bw =
        result.read_bw.best_gbps > 0 ? 100.0 * r.expert_read_gbps / result.read_bw.best_gbps : 0;
    say(absl::StrFormat("decode batch %d: %.2f tok/s, experts %.2f GB/s (%.0f%% of read bw)", batch,
                        r.tok_s, r.expert_read_gbps, r.pct_of_read_bw));
    result.decode.push_back(std::move(r));
    phase_done();
    return absl::OkStatus();
  };

  // Order: the decode context's prefill, the decode batches, the other
  // prompt lengths (so that a time budget keeps the decode figures).
  const bool context_listed = std::find(options.prompt_lens.begin(), options.prompt_lens.end(),
                                        context) != options.prompt_lens.end();
  KTX_RETURN_IF_ERROR(run_prefill(context, context_listed));
  for (int64_t batch : options.batch_sizes) {
    const std::string phase = absl::StrCat("decode batch ", batch);
    int64_t steps = options.n_gen;
    if (!result.decode.empty() && options.max_seconds > 0) {
      // The last phase's time per token, no batching gain assumed; as many
      // steps as the budget allows, at least kMinDecodeSteps.
      const DecodeResult& last = result.decode.back();
      const double step_s =
          last.seconds / static_cast<double>(last.batch * last.steps) * static_cast<double>(batch);
      steps = DecodeStepsWithinBudget(options.max_seconds - elapsed(), step_s, options.n_gen);
      if (steps == 0) {
        fits(phase, step_s * static_cast<double>(options.n_gen));  // records the skip
        continue;
      }
      if (steps < options.n_gen) {
        result.reduced.push_back(absl::StrCat(phase, ": ", steps, " of ", options.n_gen, " steps"));
        say(absl::StrCat("time budget: ", result.reduced.back()));
      }
    } else if (!fits(phase, 0)) {
      continue;
    }
    KTX_RETURN_IF_ERROR(run_decode(batch, steps));
  }
  std::set<int64_t> done = {context};
  for (int64_t p : options.prompt_lens) {
    if (!done.insert(p).second) continue;
    const double estimate = options.prefill_repeats * EstimatePrefillSeconds(result.prefill, p);
    if (!fits(absl::StrCat("prefill ", p), estimate)) continue;
    KTX_RETURN_IF_ERROR(run_prefill(p, true));
  }
  result.complete = result.skipped.empty() && result.reduced.empty();
  result.seconds = elapsed();
  return result;
}

nlohmann::json BenchResultToJson(const BenchResult& r) {
  nlohmann::json j;
  j["schema"] = "ktx-bench/1";
  j["date"] = r.date;
  j["host"] = r.host;
  j["machine"] = r.machine;
  j["machine"]["read_bandwidth"] = {{"best_gbps", r.read_bw.best_gbps},
                                    {"mean_gbps", r.read_bw.mean_gbps},
                                    {"bytes", r.read_bw.bytes},
                                    {"threads", r.read_bw.threads},
                                    {"repeats", r.options.read_repeats}};
  j["model"] = r.model;
  j["model"]["path"] = r.model_path;
  j["config"] = {{"experts", r.experts},
                 {"variant", r.variant},
                 {"threads", r.threads},
                 {"prompt_lens", r.options.prompt_lens},
                 {"gen", r.options.n_gen},
                 {"batch_sizes", r.options.batch_sizes},
                 {"decode_context", r.options.decode_context},
                 {"decode_suffix", r.options.decode_suffix},
                 {"prefill_chunk", r.options.prefill_chunk},
                 {"prefill_repeats", r.options.prefill_repeats},
                 {"seed", r.options.seed},
                 {"temperature", r.options.temperature},
                 {"warmup_tokens", r.options.warmup_tokens},
                 {"max_seconds", r.options.max_seconds}};
  j["load"] = r.load;
  if (r.check.ran) {
    j["check"] = {{"layer", r.check.layer},
                  {"nmse_decode", r.check.nmse_decode},
                  {"nmse_prefill", r.check.nmse_prefill},
                  {"prefill_experts", r.check.prefill_experts},
                  {"tolerance", r.check.tolerance},
                  {"ok", r.check.ok}};
  }
  j["complete"] = r.complete;
  j["skipped"] = r.skipped;
  j["reduced"] = r.reduced;
  j["bench_seconds"] = r.seconds;
  j["units"] = {{"stages", "ms per token per layer (embed, head: ms per token)"},
                {"layers", "ms per token"},
                {"bytes", "bytes"},
                {"rates", "GB/s = 1e9 bytes/s"}};
  j["prefill"] = nlohmann::json::array();
  for (const PrefillResult& p : r.prefill) {
    j["prefill"].push_back({{"prompt_len", p.prompt_len},
                            {"seconds", p.seconds},
                            {"tok_s", p.tok_s},
                            {"runs_tok_s", p.runs_tok_s},
                            {"total_ms_per_token", p.stages.total_ms_per_token},
                            {"expert_bytes_per_token", p.expert_bytes_per_token},
                            {"stages", StagesJson(p.stages)},
                            {"layers", LayersJson(p.stages)}});
  }
  j["decode"] = nlohmann::json::array();
  for (const DecodeResult& d : r.decode) {
    j["decode"].push_back({{"batch", d.batch},
                           {"steps", d.steps},
                           {"context", d.context},
                           {"seconds", d.seconds},
                           {"tok_s", d.tok_s},
                           {"step_ms", d.step_ms},
                           {"generated_tokens", d.generated},
                           {"distinct_tokens", d.distinct_tokens},
                           {"total_ms_per_token", d.stages.total_ms_per_token},
                           {"expert_bytes_per_token", d.expert_bytes_per_token},
                           {"kernel_bytes_per_token", d.kernel_bytes_per_token},
                           {"experts_ms_per_token", d.experts_ms_per_token},
                           {"expert_read_gbps", d.expert_read_gbps},
                           {"pct_of_read_bw", d.pct_of_read_bw},
                           {"stages", StagesJson(d.stages)},
                           {"layers", LayersJson(d.stages)}});
  }
  return j;
}

std::string FormatBenchTable(const BenchResult& r) {
  std::string out;
  const nlohmann::json& m = r.machine;
  absl::StrAppend(&out, "ktx bench  ", r.date, "  host ", r.host, "\n");
  absl::StrAppend(&out, "model      ", r.model_path, "  (", r.model["n_layer"].get<int>(),
                  " layers, ", r.model["n_layer_dense_lead"].get<int>(), " dense; n_embd ",
                  r.model["n_embd"].get<int64_t>(), ", ", r.model["n_expert"].get<int>(),
                  " experts x ", r.model["n_expert_used"].get<int>(), " used; vocab ",
                  r.model["n_vocab"].get<int64_t>(), ")\n");
  absl::StrAppend(&out, "machine    ", m["cpu_brand"].get<std::string>(), ", ", r.threads,
                  " threads (of ", m["logical_cpus_online"].get<int64_t>(),
                  " cpus online), read bandwidth ",
                  absl::StrFormat("%.1f GB/s", r.read_bw.best_gbps),
                  absl::StrFormat(" (best of %d, %.2f GiB)", r.options.read_repeats,
                                  static_cast<double>(r.read_bw.bytes) / (1 << 30)),
                  "\n");
  absl::StrAppend(&out, "experts    ", r.experts);
  if (!r.variant.empty()) {
    absl::StrAppend(
        &out, " (", r.variant, ", ", r.load.value("decode_layout", ""),
        r.load.value("prefill_form", false) ? " + AMX tile prefill" : "",
        absl::StrFormat("; %.3g GiB held", r.load.value("repacked_bytes", 0.0) / (1 << 30)));
    // The repacking alone (in-process backend) and the experts' whole load
    // (repacking, tile caches, the kernel switches' calibration; through the
    // actors: the engine's construction, GPU upload included).
    if (const double s = r.load.value("repack_seconds", 0.0); s > 0) {
      absl::StrAppend(&out, absl::StrFormat(", repacked in %.3g s", s));
    }
    if (const double s = r.load.value("experts_load_seconds", 0.0); s > 0) {
      absl::StrAppend(&out, absl::StrFormat(", loaded in %.3g s", s));
    }
    absl::StrAppend(&out, ")");
  }
  absl::StrAppend(&out, "\n");
  if (r.check.ran) {
    absl::StrAppend(
        &out,
        absl::StrFormat("check      layer %d vs reference experts: NMSE %.2e decode, "
                        "%.2e prefill (%d prefill-form runs), bound %.1e: %s\n",
                        r.check.layer, r.check.nmse_decode, r.check.nmse_prefill,
                        r.check.prefill_experts, r.check.tolerance, r.check.ok ? "ok" : "FAILED"));
  }
  absl::StrAppend(&out, "\n");

  const Stage cols[] = {Stage::kAttention, Stage::kFfnNorm, Stage::kRoute,    Stage::kExperts,
                        Stage::kShared,    Stage::kCombine, Stage::kDenseFfn, Stage::kHead};
  auto header = [&](const std::string& lead) {
    std::string h = lead;
    for (Stage s : cols) absl::StrAppend(&h, absl::StrFormat(" %10s", StageName(s)));
    return h + "\n";
  };
  auto stage_cells = [&](const StageBreakdown& b) {
    std::string c;
    for (Stage s : cols) {
      absl::StrAppend(&c, absl::StrFormat(" %10s", Fmt(b.ms_per_token_layer[static_cast<int>(s)])));
    }
    return c;
  };
  absl::StrAppend(&out, "prefill (stage columns: ms per token per layer; head: ms per token)\n");
  absl::StrAppend(&out, header(absl::StrFormat("%8s %9s %10s", "tokens", "seconds", "tok/s")));
  for (const PrefillResult& p : r.prefill) {
    absl::StrAppend(&out,
                    absl::StrFormat("%8d %9s %10s", p.prompt_len, Fmt(p.seconds), Fmt(p.tok_s)),
                    stage_cells(p.stages), "\n");
  }
  for (const PrefillResult& p : r.prefill) {
    if (p.runs_tok_s.size() < 2) continue;
    const auto [lo, hi] = std::minmax_element(p.runs_tok_s.begin(), p.runs_tok_s.end());
    std::vector<std::string> each;
    for (double t : p.runs_tok_s) each.push_back(Fmt(t));
    absl::StrAppend(&out,
                    absl::StrFormat("  %d tokens: median of %d runs; min %s, max %s tok/s (%s)\n",
                                    p.prompt_len, static_cast<int>(p.runs_tok_s.size()), Fmt(*lo),
                                    Fmt(*hi), absl::StrJoin(each, ", ")));
  }
  absl::StrAppend(&out, "\ndecode (up to ", r.options.n_gen, " steps from a ",
                  r.options.decode_context, "-token context + ", r.options.decode_suffix,
                  " distinct tokens per sequence, sampled at T = ",
                  absl::StrFormat("%g", r.options.temperature), ")\n");
  absl::StrAppend(&out,
                  absl::StrFormat("%6s %6s %9s %9s %11s %10s %8s %9s\n", "batch", "steps", "tok/s",
                                  "step ms", "expert MB/t", "exp GB/s", "% read", "distinct"));
  for (const DecodeResult& d : r.decode) {
    const double bytes =
        d.kernel_bytes_per_token > 0 ? d.kernel_bytes_per_token : d.expert_bytes_per_token;
    absl::StrAppend(&out, absl::StrFormat("%6d %6d %9s %9s %11s %10s %7.0f%% %4d/%-4d\n", d.batch,
                                          d.steps, Fmt(d.tok_s), Fmt(d.step_ms), Fmt(bytes / 1e6),
                                          Fmt(d.expert_read_gbps), d.pct_of_read_bw,
                                          d.distinct_tokens, d.generated));
  }
  absl::StrAppend(&out, "\n", header(absl::StrFormat("%6s %9s", "batch", "ms/tok")));
  for (const DecodeResult& d : r.decode) {
    absl::StrAppend(&out, absl::StrFormat("%6d %9s", d.batch, Fmt(d.stages.total_ms_per_token)),
                    stage_cells(d.stages), "\n");
  }
  if (!r.skipped.empty()) {
    absl::StrAppend(&out, "\nskipped (time budget): ", absl::StrJoin(r.skipped, ", "), "\n");
  }
  if (!r.reduced.empty()) {
    absl::StrAppend(&out, "\nreduced (time budget): ", absl::StrJoin(r.reduced, ", "), "\n");
  }
  // Per layer: decode at the first batch size, prefill at the first length.
  auto per_layer = [&](const std::string& title, const StageBreakdown& b) {
    absl::StrAppend(&out, "\n", title, " per layer (ms per token)\n");
    absl::StrAppend(&out, header(absl::StrFormat("%6s", "layer")));
    for (size_t il = 0; il < b.layer_ms_per_token.size(); ++il) {
      absl::StrAppend(&out, absl::StrFormat("%6d", il));
      for (Stage s : cols) {
        const double v = s == Stage::kHead ? 0 : b.layer_ms_per_token[il][static_cast<int>(s)];
        absl::StrAppend(&out, absl::StrFormat(" %10s", v == 0 ? "-" : Fmt(v)));
      }
      absl::StrAppend(&out, "\n");
    }
  };
  if (!r.decode.empty()) {
    per_layer(absl::StrCat("decode batch ", r.decode.front().batch), r.decode.front().stages);
  }
  if (!r.prefill.empty()) {
    per_layer(absl::StrCat("prefill ", r.prefill.front().prompt_len), r.prefill.front().stages);
  }
  return out;
}

std::string BenchUtcNow() { return UtcNow(); }
std::string BenchHostName() { return HostName(); }
nlohmann::json BenchMachineJson(const runtime::CpuPool& pool) { return MachineJson(pool); }
nlohmann::json BenchModelJson(const models::Deepseek2Model& model) { return ModelJson(model); }
std::vector<int32_t> BenchRandomTokens(int64_t n, int64_t n_vocab, uint64_t seed) {
  return RandomTokens(n, n_vocab, seed);
}

}  // namespace ktx::bench
