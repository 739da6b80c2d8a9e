// moe_benchmark: the CPU expert kernels against the machine's limits.
//
//   read_bw                  all-core streaming read over >= 1 GiB (GB/s)
//   peak/vnni, peak/amx_int8, peak/amx_bf16   in-cache instruction peaks (TOPS)
//   decode/<variant>/tokens:N   one DeepSeek-V3 MoE layer (n_embd 7168, n_ff 2048,
//                            8 experts per token, Q4_K gate/up + Q6_K down, panel16)
//                            with random routing: GB/s of expert weights read and
//                            % of read_bw
//   kernel_in_cache/<variant>/<type>/tokens:N  one 128-row panel16 matrix in L2 (bf16: 64
//                            rows, and kernel_dram/ 4096 rows streamed), one
//                            thread: weight bytes per CPU-second (compute headroom)
//   repack/<type>/<layout>   load-time repacking, one thread (GGUF bytes per second)
//   tile_convert/<type>      the AMX path's panel16 -> int8 conversion, one thread,
//                            in L2 (ns per 1024 weights; emulated table without AMX)
//   tile_kernel/{l2,dram}/tokens:N  the AMX tile matmul alone, one thread, one Q4_K
//                            matrix (k 7168) in L2 or streamed from DRAM: ns per
//                            1024 weights and TOPS of one core (AMX hosts only)
//   crossing/<variant>       the decode/prefill switch: the layer with every expert
//                            at exactly N tokens (N = 1 .. 64), decode path vs tile
//                            path, best of 3; the crossing is the smallest N from
//                            which the tile path is never slower
//   prefill/<variant>/tokens:N  the same layer for 128/512/2048 tokens: TOPS and %
//                            of the variant's int8 peak (amx: the tile path over the
//                            panel16 weights, switched at the measured crossing)
//   crossing/amx_cache       the tile path converting vs over tile caches, every
//                            expert at exactly N = 1 .. 64 tokens, best of 3
//   prefill/amx_cache[@SPEC]/tokens:N  the tile path over tile caches (every
//                            expert's int8 conversion made once, BuildTileCacheTask:
//                            ~1 byte per weight more memory, no conversion per call)
//   prefill/amx_int8/tokens:N   the older amx form (a second, int8 copy of the
//                            weights) for comparison
//   prefill/<variant>@SPEC/tokens:N, tile_kernel/{l2,dram}@SPEC/tokens:64
//                            the tile path run as SPEC says (--ktx_amx_configs;
//                            ApplyMoeTileSpec in moe.h: phased|inloop[:key=value]),
//                            one set of rows per spec; the rows without @ use the
//                            defaults, or KTX_AMX_PREFILL=SPEC where it is set
//
// At the end a summary table (machine, date, the limits, decode and prefill per
// ISA, the crossing) goes to stdout, and with --ktx_summary_json=PATH as JSON.
//
// Flags (before Google Benchmark's own): --ktx_smoke (tiny sizes, for ctest),
// --ktx_experts=N (default 64: ~1.9 GiB of panel16 weights, far beyond the
// caches), --ktx_full_layer (all 256 experts, ~7.4 GiB; also KTX_BENCH_FULL_LAYER=1),
// --ktx_threads=N (first N allowed cpus), --ktx_variants=avx512,amx (default: avx512 and amx where
// supported; scalar and avx2 only when named), --ktx_summary_json=PATH,
// --ktx_amx_configs=SPEC,SPEC,... (tile-path variants to compare, see above),
// --ktx_prefill_tokens=N,N,... (prefill sizes; default 128,512,2048),
// --ktx_prefill_min_tokens=N (switch point of the prefill rows instead of the
// measured crossing, which then is not swept; also KTX_BENCH_PREFILL_MIN_TOKENS),
// --ktx_phase_ticks (prefill rows also report, per stage, the phased tile
// kernel's milliseconds per call and worker in conversion, tiles and fix-ups:
// s<stage>_convert_ms, s<stage>_tiles_ms, s<stage>_fixup_ms, beside
// s<stage>_ms, the stage's wall time; from the TSC, timed once against the clock;
// and s<stage>_busy_ms, s<stage>_busy_max_ms: the mean and the largest time a
// worker spent inside the stage's tasks).
// Typical: moe_benchmark --benchmark_filter=decode
#include <benchmark/benchmark.h>

#include <x86intrin.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"

#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/moe/moe.h"
#include "kernels/cpu/moe/moe_internal.h"
#include "kernels/cpu/moe/moe_kernels_amx_emulated.h"
#include "kernels/cpu/x86/cpu_variant.h"
#include "runtime/cpu_pool/cpu_pool.h"
#include "tests/kernels/cpu/moe/moe_benchmark_kernels.h"
#include "tests/kernels/cpu/moe/moe_test_util.h"

namespace ktx::kernels::moe::bench {
namespace {

using runtime::CpuPool;
using runtime::NumaBuffer;

struct Config {
  bool smoke = false;
  // Tile-path specs (ApplyMoeTileSpec) to compare: one set of prefill/amx@SPEC
  // and tile_kernel/...@SPEC rows each.
  std::vector<std::string> amx_specs;
  std::vector<int64_t> prefill_tokens;  // default 128, 512, 2048
  int64_t prefill_min_tokens = 0;       // > 0: instead of the measured crossing
  int64_t n_expert = 64;
  int threads = 0;  // 0: every allowed cpu
  std::vector<CpuVariant> variants;
  std::string summary_json;
  bool phase_ticks = false;
};

Config g_config;
CpuPool* g_pool = nullptr;
double g_read_gbps = 0.0;
double g_vnni_tops = 0.0;
double g_amx_int8_tops = 0.0;
double g_amx_bf16_tops = 0.0;
// Figures for the closing summary, by name ("decode/avx512/1/GBps", ...).
std::map<std::string, double> g_results;

// CPU seconds of the whole process (all threads), for load-robust rates.
double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Bytes per CPU-second of the last MeasureReadOnce().
double g_last_read_per_cpu = 0.0;

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// TSC ticks per second, timed once against steady_clock (--ktx_phase_ticks).
double TscHz() {
  static const double hz = [] {
    const auto t0 = std::chrono::steady_clock::now();
    const uint64_t c0 = __rdtsc();
    while (Seconds(t0, std::chrono::steady_clock::now()) < 0.2) {
    }
    const uint64_t c1 = __rdtsc();
    return static_cast<double>(c1 - c0) / Seconds(t0, std::chrono::steady_clock::now());
  }();
  return hz;
}

// ---- (1) read bandwidth ----

struct ReadBuffer {
  NumaBuffer buf;
  size_t bytes = 0;
};

ReadBuffer& Buffer() {
  static ReadBuffer* rb = [] {
    auto* r = new ReadBuffer;
    r->bytes = g_config.smoke ? (16u << 20) : (size_t{1} << 30) + (size_t{256} << 20);
    r->buf = g_pool->Allocate(r->bytes);
    constexpr size_t kChunk = 4 << 20;
    g_pool->ParallelFor(static_cast<int64_t>(r->bytes / kChunk), [&](int64_t t, int) {
      std::memset(static_cast<uint8_t*>(r->buf.data()) + t * kChunk, static_cast<int>(t), kChunk);
    });
    return r;
  }();
  return *rb;
}

double MeasureReadOnce() {
  ReadBuffer& rb = Buffer();
  constexpr size_t kChunk = 4 << 20;
  std::vector<uint64_t> sums(rb.bytes / kChunk);
  const double c0 = ProcessCpuSeconds();
  const auto t0 = std::chrono::steady_clock::now();
  g_pool->ParallelFor(static_cast<int64_t>(sums.size()), [&](int64_t t, int) {
    sums[t] = ReadBytesAvx2(static_cast<const uint8_t*>(rb.buf.data()) + t * kChunk, kChunk);
  });
  const auto t1 = std::chrono::steady_clock::now();
  g_last_read_per_cpu = static_cast<double>(rb.bytes) / (ProcessCpuSeconds() - c0) / 1e9;
  benchmark::DoNotOptimize(sums.data());
  return static_cast<double>(rb.bytes) / Seconds(t0, t1) / 1e9;
}

void BM_ReadBandwidth(benchmark::State& state) {
  double best = 0, sum = 0;
  int n = 0;
  for (auto _ : state) {
    const double g = MeasureReadOnce();
    best = std::max(best, g);
    sum += g;
    ++n;
  }
  g_read_gbps = best;
  g_results["read_bw/GBps"] = best;
  state.counters["GBps_best"] = best;
  state.counters["GBps_mean"] = sum / n;
  state.counters["bytes"] = static_cast<double>(Buffer().bytes);
  state.counters["threads"] = g_pool->num_workers();
}

// ---- (2) peaks ----

template <int64_t (*Loop)(int64_t)>
double MeasurePeak(int64_t iters_per_task) {
  const int64_t n_tasks = 4 * g_pool->num_workers();
  std::vector<int64_t> ops(n_tasks);
  const auto t0 = std::chrono::steady_clock::now();
  g_pool->ParallelFor(n_tasks, [&](int64_t t, int) { ops[t] = Loop(iters_per_task); });
  const auto t1 = std::chrono::steady_clock::now();
  int64_t total = 0;
  for (int64_t o : ops) total += o;
  return static_cast<double>(total) / Seconds(t0, t1) / 1e12;
}

template <int64_t (*Loop)(int64_t)>
void BM_Peak(benchmark::State& state, int64_t iters, double* store, const char* key) {
  double best = 0;
  for (auto _ : state) best = std::max(best, MeasurePeak<Loop>(iters));
  *store = best;
  g_results[std::string(key) + "/TOPS"] = best;
  state.counters["TOPS"] = best;
  state.counters["threads"] = g_pool->num_workers();
}

// ---- (3), (4) the MoE layer ----

struct Layer {
  MoeShape shape;
  std::vector<NumaBuffer> bufs;
  std::vector<const void*> gate, up, down, gate_p, up_p, down_p, gate_c, up_c, down_c;
  MoeLayerFormat format;
  MoeLayerWeights weights;
};

// What a layer holds beside its panel16 weights.
enum class Extra { kNone = 0, kAmxInt8 = 1, kTileCache = 2 };

// One random expert (Q4_K gate/up, Q6_K down), repacked, copied to every expert
// slot (distinct memory: reads come from DRAM, not from the caches). With
// kAmxInt8 also the older amx_int8 prefill copies; with kTileCache the tile
// caches (tile512, BuildTileCacheTask) of every expert.
Layer& GetLayer(Extra extra) {
  static std::unique_ptr<Layer> layers[3];
  std::unique_ptr<Layer>& slot = layers[static_cast<int>(extra)];
  if (slot) return *slot;
  auto L = std::make_unique<Layer>();
  L->shape =
      g_config.smoke ? MoeShape{256, 256, 16, 8} : MoeShape{7168, 2048, g_config.n_expert, 8};
  const MoeShape& s = L->shape;
  std::mt19937 rng(1);
  const auto g = testing::RandomMatrix(TensorType::kQ4_K, s.n_ff, s.n_embd, 0.05f, rng);
  const auto u = testing::RandomMatrix(TensorType::kQ4_K, s.n_ff, s.n_embd, 0.05f, rng);
  const auto d = testing::RandomMatrix(TensorType::kQ6_K, s.n_embd, s.n_ff, 0.05f, rng);
  // Every expert slot gets a copy of `one` (bytes long).
  auto copies = [&](const void* one, int64_t bytes, std::vector<const void*>* out) {
    for (int64_t e = 0; e < s.n_expert; ++e) {
      L->bufs.push_back(g_pool->Allocate(bytes));
      uint8_t* dst = static_cast<uint8_t*>(L->bufs.back().data());
      constexpr int64_t kChunk = 1 << 20;
      g_pool->ParallelFor((bytes + kChunk - 1) / kChunk, [&](int64_t c, int) {
        const int64_t n = std::min(kChunk, bytes - c * kChunk);
        std::memcpy(dst + c * kChunk, static_cast<const uint8_t*>(one) + c * kChunk, n);
      });
      out->push_back(dst);
    }
  };
  auto add = [&](const std::vector<uint8_t>& src, TensorType t, MoeWeightLayout layout,
                 int64_t rows, int64_t k, std::vector<const void*>* out) {
    const auto one = testing::MakeLayout({src}, t, layout, rows, k, {true});
    copies(one.ptrs[0], *MoeMatrixBytes({t, layout}, rows, k), out);
  };
  const MoeWeightLayout panel = MoeWeightLayout::kPanel16;
  add(g, TensorType::kQ4_K, panel, s.n_ff, s.n_embd, &L->gate);
  add(u, TensorType::kQ4_K, panel, s.n_ff, s.n_embd, &L->up);
  add(d, TensorType::kQ6_K, panel, s.n_embd, s.n_ff, &L->down);
  L->format.gate = L->format.up = {TensorType::kQ4_K, panel};
  L->format.down = {TensorType::kQ6_K, panel};
  L->weights.gate = {L->format.gate, L->gate.data()};
  L->weights.up = {L->format.up, L->up.data()};
  L->weights.down = {L->format.down, L->down.data()};
  if (extra == Extra::kTileCache) {
    auto add_cache = [&](MoeMatrixFormat f, const void* w, int64_t rows, int64_t k,
                         std::vector<const void*>* out) {
      const int64_t bytes = *TileCacheBytes(f, rows, k);
      NumaBuffer one = g_pool->Allocate(bytes);
      g_pool->ParallelFor(TileCacheNumTasks(rows), [&](int64_t t, int) {
        BuildTileCacheTask(f, w, rows, k, t, one.data());
      });
      copies(one.data(), bytes, out);
    };
    add_cache(L->format.gate, L->gate[0], s.n_ff, s.n_embd, &L->gate_c);
    add_cache(L->format.up, L->up[0], s.n_ff, s.n_embd, &L->up_c);
    add_cache(L->format.down, L->down[0], s.n_embd, s.n_ff, &L->down_c);
    const MoeWeightLayout c = MoeWeightLayout::kTile512;
    L->weights.gate_tile = {{TensorType::kQ4_K, c}, L->gate_c.data()};
    L->weights.up_tile = {{TensorType::kQ4_K, c}, L->up_c.data()};
    L->weights.down_tile = {{TensorType::kQ6_K, c}, L->down_c.data()};
  }
  if (extra == Extra::kAmxInt8) {
    const MoeWeightLayout amx = MoeWeightLayout::kAmxInt8;
    add(g, TensorType::kQ4_K, amx, s.n_ff, s.n_embd, &L->gate_p);
    add(u, TensorType::kQ4_K, amx, s.n_ff, s.n_embd, &L->up_p);
    add(d, TensorType::kQ6_K, amx, s.n_embd, s.n_ff, &L->down_p);
    L->format.has_prefill = true;
    L->format.gate_prefill = L->format.up_prefill = {TensorType::kQ4_K, amx};
    L->format.down_prefill = {TensorType::kQ6_K, amx};
    L->weights.gate_prefill = {L->format.gate_prefill, L->gate_p.data()};
    L->weights.up_prefill = {L->format.up_prefill, L->up_p.data()};
    L->weights.down_prefill = {L->format.down_prefill, L->down_p.data()};
  }
  slot = std::move(L);
  return *slot;
}

struct Routing {
  std::vector<float> x, w;
  std::vector<int32_t> ids;
};

std::vector<Routing> MakeRoutings(const MoeShape& s, int64_t n_tokens, int count) {
  std::mt19937 rng(static_cast<uint32_t>(n_tokens * 7919 + count));
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<Routing> out(count);
  std::vector<int32_t> perm(s.n_expert);
  for (Routing& r : out) {
    r.x.resize(n_tokens * s.n_embd);
    for (float& v : r.x) v = n(rng);
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t i = 0; i < s.n_expert; ++i) perm[i] = static_cast<int32_t>(i);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int64_t k = 0; k < s.n_expert_used; ++k) {
        r.ids.push_back(perm[k]);
        r.w.push_back(0.125f);
      }
    }
  }
  return out;
}

// How the prefill benchmarks run the amx variant.
enum class Mode { kDecode, kPrefill, kPrefillGroup1024, kPrefillAmxInt8, kPrefillCache };

int64_t Crossing(CpuVariant variant);

// The plan options of a tile-path spec: `spec` where given, else the
// defaults with KTX_AMX_PREFILL applied. False (and the benchmark skipped)
// where it does not parse.
bool TileOptions(benchmark::State& state, const std::string& spec, MoePlanOptions* o) {
  const absl::Status st = spec.empty() ? ApplyMoeTileEnv(o) : ApplyMoeTileSpec(spec, o);
  if (!st.ok()) state.SkipWithError(std::string(st.message()).c_str());
  return st.ok();
}

void BM_Layer(benchmark::State& state, CpuVariant variant, int64_t n_tokens, Mode mode,
              const std::string& spec = "") {
  const bool prefill = mode != Mode::kDecode;
  const bool amx = variant == CpuVariant::kAmx;
  if (mode == Mode::kPrefillCache && g_config.smoke) {  // its 256-wide layer takes groups of 256
    state.SkipWithError("tile caches need n_embd and n_ff multiples of 512 (not the smoke layer)");
    return;
  }
  Layer& L = GetLayer(amx && mode == Mode::kPrefillAmxInt8 ? Extra::kAmxInt8
                      : amx && mode == Mode::kPrefillCache ? Extra::kTileCache
                                                           : Extra::kNone);
  MoePlanOptions o;
  o.max_tokens = n_tokens;
  o.max_workers = g_pool->num_workers();
  o.force_variant = true;
  o.variant = variant;
  if (const char* e = std::getenv("KTX_BENCH_DOWN_ROWS")) o.down_rows_per_task = std::atoll(e);
  if ((mode == Mode::kPrefill || mode == Mode::kPrefillGroup1024 || mode == Mode::kPrefillCache) &&
      MoeKernelsFor(variant).tile_matmul != nullptr) {
    o.tile_prefill = true;
    o.prefill_min_tokens =
        g_config.prefill_min_tokens > 0 ? g_config.prefill_min_tokens : Crossing(variant);
    if (!TileOptions(state, spec, &o)) return;
    if (mode == Mode::kPrefillGroup1024) o.tile_group = 1024;
    state.SetLabel(MoeTileSpec(o));
  }
  // Phase ticks of the current stage (--ktx_phase_ticks), summed per stage.
  int64_t ticks[3] = {0, 0, 0};
  double stage_phase_ticks[MoeRun::kNumStages][3] = {};
  // With phase ticks: per stage and worker, the seconds inside tasks (so that
  // a stage's wall time splits into the kernel's phases, other work inside
  // tasks, and workers idle while others finish).
  std::vector<std::vector<double>> busy(MoeRun::kNumStages,
                                        std::vector<double>(g_pool->num_workers(), 0.0));
  if (g_config.phase_ticks && prefill) {
    TscHz();
    o.tile_phase_ticks = ticks;
  }
  auto plan = MakeMoePlan(L.shape, L.format, o);
  if (!plan.ok()) {
    state.SkipWithError(std::string(plan.status().message()).c_str());
    return;
  }
  NumaBuffer ws = g_pool->Allocate(MoeWorkspaceSize(*plan));
  std::memset(ws.data(), 0, ws.size());
  const std::vector<Routing> routings = MakeRoutings(L.shape, n_tokens, prefill ? 2 : 16);
  std::vector<float> out(n_tokens * L.shape.n_embd);
  double bytes = 0, ops = 0, seconds = 0;
  // The reference (read bandwidth or int8 peak) is measured between the timed
  // calls, so that both see the same machine load (shared build machines).
  double ref_sum = 0, read_per_cpu_sum = 0, cpu_seconds = 0;
  double stage_seconds[MoeRun::kNumStages] = {};
  int64_t prefill_experts = 0, i = 0;
  for (auto _ : state) {
    state.PauseTiming();
    if (!prefill) {
      ref_sum += MeasureReadOnce();
      read_per_cpu_sum += g_last_read_per_cpu;
    } else {
      const double c0 = ProcessCpuSeconds();
      const auto t0 = std::chrono::steady_clock::now();
      double tops = 0;
      if (amx) {
        tops = MeasurePeak<AmxInt8PeakLoop>(g_config.smoke ? 100 : 20000);
      } else if (HostSupportsCpuVariant(CpuVariant::kAvx512)) {
        tops = MeasurePeak<VnniPeakLoop>(g_config.smoke ? 1000 : 200000);
      }
      ref_sum += tops;
      // Peak per CPU-second: ops = tops * wall seconds.
      const double wall = Seconds(t0, std::chrono::steady_clock::now());
      read_per_cpu_sum += tops * wall / (ProcessCpuSeconds() - c0);
    }
    state.ResumeTiming();
    const Routing& r = routings[i++ % routings.size()];
    const double c0 = ProcessCpuSeconds();
    const auto t0 = std::chrono::steady_clock::now();
    auto run = MoeRun::Begin(*plan, L.weights,
                             {n_tokens, r.x.data(), r.ids.data(), r.w.data(), out.data()},
                             ws.data(), ws.size());
    if (!run.ok()) {
      state.SkipWithError(std::string(run.status().message()).c_str());
      return;
    }
    for (int st = 0; st < MoeRun::kNumStages; ++st) {
      const auto s0 = std::chrono::steady_clock::now();
      if (run->NumTasks(st) == 1) {
        run->RunTask(st, 0, 0);  // as RunMoe does
      } else {
        g_pool->ParallelFor(run->NumTasks(st), [&](int64_t task, int worker) {
          if (o.tile_phase_ticks == nullptr) {
            run->RunTask(st, task, worker);
            return;
          }
          const auto b0 = std::chrono::steady_clock::now();
          run->RunTask(st, task, worker);
          busy[st][worker] += Seconds(b0, std::chrono::steady_clock::now());
        });
      }
      stage_seconds[st] += Seconds(s0, std::chrono::steady_clock::now());
      for (int j = 0; j < 3; ++j) {
        stage_phase_ticks[st][j] += static_cast<double>(ticks[j]);
        ticks[j] = 0;
      }
    }
    seconds += Seconds(t0, std::chrono::steady_clock::now());
    cpu_seconds += ProcessCpuSeconds() - c0;
    bytes += static_cast<double>(run->weight_bytes());
    ops += 2.0 * static_cast<double>(run->num_pairs()) * 3.0 * static_cast<double>(L.shape.n_embd) *
           static_cast<double>(L.shape.n_ff);
    prefill_experts += run->num_prefill_experts();
  }
  benchmark::DoNotOptimize(out.data());
  state.counters["weights_GBps"] = bytes / seconds / 1e9;
  state.counters["TOPS"] = ops / seconds / 1e12;
  state.counters["threads"] = g_pool->num_workers();
  for (int st = 0; st < MoeRun::kNumStages; ++st) {
    state.counters["stage" + std::to_string(st) + "_pct"] = 100.0 * stage_seconds[st] / seconds;
  }
  if (o.tile_phase_ticks != nullptr) {
    const double per = 1e3 / (TscHz() * static_cast<double>(state.iterations()));
    const char* names[3] = {"_convert_ms", "_tiles_ms", "_fixup_ms"};
    for (int st = 0; st < MoeRun::kNumStages; ++st) {
      const std::string k = "s" + std::to_string(st);
      state.counters[k + "_ms"] = 1e3 * stage_seconds[st] / static_cast<double>(state.iterations());
      for (int j = 0; j < 3; ++j) {
        state.counters[k + names[j]] = stage_phase_ticks[st][j] * per / g_pool->num_workers();
      }
      double sum = 0, most = 0;
      for (double b : busy[st]) {
        sum += b;
        most = std::max(most, b);
      }
      const double it_ms = 1e3 / static_cast<double>(state.iterations());
      state.counters[k + "_busy_ms"] = sum * it_ms / g_pool->num_workers();
      state.counters[k + "_busy_max_ms"] = most * it_ms;
    }
  }
  state.counters["prefill_experts_per_call"] =
      static_cast<double>(prefill_experts) / static_cast<double>(state.iterations());
  if (mode != Mode::kDecode && plan->tile) {
    state.counters["prefill_min_tokens"] = static_cast<double>(plan->options.prefill_min_tokens);
  }
  const double ref = ref_sum / static_cast<double>(state.iterations());
  std::string form = CpuVariantName(variant);
  if (mode == Mode::kPrefillAmxInt8) form = "amx_int8";
  if (mode == Mode::kPrefillCache) form += "_cache";
  if (mode == Mode::kPrefillGroup1024) form += "_g1024";
  if (!spec.empty()) form += "@" + spec;
  const std::string key = std::string(mode == Mode::kDecode ? "decode/" : "prefill/") + form + "/" +
                          std::to_string(n_tokens);
  g_results[key + "/GBps"] = bytes / seconds / 1e9;
  g_results[key + "/TOPS"] = ops / seconds / 1e12;
  g_results[key + "/ms"] = 1e3 * seconds / static_cast<double>(state.iterations());
  if (!prefill) {
    g_results[key + "/pct_of_read_bw"] = 100.0 * (bytes / seconds / 1e9) / ref;
  } else if (ref > 0) {
    g_results[key + "/pct_of_int8_peak"] = 100.0 * (ops / seconds / 1e12) / ref;
    g_results[key + "/int8_peak_TOPS"] = ref;
  }
  if (!prefill) {
    state.counters["read_GBps_interleaved"] = ref;
    state.counters["pct_of_read_bw"] = 100.0 * (bytes / seconds / 1e9) / ref;
    // Per CPU-second of the process (robust to other processes taking the
    // cores; includes oneTBB's idle spinning): decode vs the read loop.
    const double per_cpu = bytes / cpu_seconds / 1e9;
    const double read_per_cpu = read_per_cpu_sum / static_cast<double>(state.iterations());
    state.counters["weights_GBps_per_cpu_s"] = per_cpu;
    state.counters["read_GBps_per_cpu_s"] = read_per_cpu;
    state.counters["pct_of_read_bw_per_cpu_s"] = 100.0 * per_cpu / read_per_cpu;
  } else if (ref > 0) {
    state.counters["int8_peak_TOPS_interleaved"] = ref;
    state.counters["pct_of_int8_peak"] = 100.0 * (ops / seconds / 1e12) / ref;
    // Per CPU-second of the process (robust to other processes on the cores).
    const double peak_per_cpu = read_per_cpu_sum / static_cast<double>(state.iterations());
    state.counters["pct_of_int8_peak_per_cpu_s"] =
        100.0 * (ops / cpu_seconds / 1e12) / peak_per_cpu;
  }
}

// The decode/prefill crossing of `variant` (tile path vs decode path) on the
// layer: every expert at exactly n tokens (token t routed to experts 8t .. 8t
// + 7 mod n_expert), each path best of 3 after a warm-up call. Computed once.
struct CrossingPoint {
  int64_t tokens_per_expert;
  double decode_ms, tile_ms;
};
std::map<CpuVariant, std::vector<CrossingPoint>> g_crossing_points;

// Inputs of the crossing sweeps: max_tokens rows of x, token t routed to
// experts 8t .. 8t + 7 (mod n_expert), so that n_tokens = N * n_expert / 8
// gives every expert exactly N tokens; and the wall time of one layer call.
struct SweepInputs {
  std::vector<float> x, out, w;
  std::vector<int32_t> ids;
};

SweepInputs MakeSweepInputs(const MoeShape& s, int64_t max_tokens, uint32_t seed) {
  SweepInputs in;
  const int64_t per_token = s.n_expert_used;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  in.x.resize(max_tokens * s.n_embd);
  in.out.resize(max_tokens * s.n_embd);
  for (float& v : in.x) v = n(rng);
  in.ids.resize(max_tokens * per_token);
  in.w.assign(max_tokens * per_token, 1.0f / static_cast<float>(per_token));
  for (int64_t t = 0; t < max_tokens; ++t) {
    for (int64_t k = 0; k < per_token; ++k) {
      in.ids[t * per_token + k] = static_cast<int32_t>((t * per_token + k) % s.n_expert);
    }
  }
  return in;
}

double LayerCallMs(const MoePlan& plan, const MoeLayerWeights& weights, SweepInputs& in,
                   NumaBuffer& ws, int64_t n_tokens) {
  const auto t0 = std::chrono::steady_clock::now();
  auto run = MoeRun::Begin(plan, weights,
                           {n_tokens, in.x.data(), in.ids.data(), in.w.data(), in.out.data()},
                           ws.data(), ws.size());
  if (!run.ok()) return 1e30;
  RunMoe(*run, [](int64_t n_tasks, auto&& fn) { g_pool->ParallelFor(n_tasks, fn); });
  return 1e3 * Seconds(t0, std::chrono::steady_clock::now());
}

int64_t Crossing(CpuVariant variant) {
  static std::map<CpuVariant, int64_t> memo;
  if (auto it = memo.find(variant); it != memo.end()) return it->second;
  Layer& L = GetLayer(Extra::kNone);
  const MoeShape& s = L.shape;
  const int64_t per_token = s.n_expert_used;
  const std::vector<int64_t> grid = g_config.smoke
                                        ? std::vector<int64_t>{1, 2, 4}
                                        : std::vector<int64_t>{1, 2, 4, 8, 12, 16, 24, 32, 48, 64};
  const int64_t max_tokens = grid.back() * s.n_expert / per_token;
  MoePlanOptions o;
  o.max_tokens = max_tokens;
  o.max_workers = g_pool->num_workers();
  o.force_variant = true;
  o.variant = variant;
  o.tile_prefill = true;
  if (const absl::Status st = ApplyMoeTileEnv(&o); !st.ok()) {
    std::fprintf(stderr, "moe_benchmark: no crossing: %s\n", std::string(st.message()).c_str());
    return memo[variant] = 1 << 30;
  }
  o.prefill_min_tokens = int64_t{1} << 40;
  auto decode_plan = MakeMoePlan(s, L.format, o);
  o.prefill_min_tokens = 1;
  auto tile_plan = MakeMoePlan(s, L.format, o);
  if (!decode_plan.ok() || !tile_plan.ok() || !tile_plan->tile) return memo[variant] = 1 << 30;
  NumaBuffer ws = g_pool->Allocate(MoeWorkspaceSize(*tile_plan));
  std::memset(ws.data(), 0, ws.size());
  SweepInputs in = MakeSweepInputs(s, max_tokens, 77);
  auto time_ms = [&](const MoePlan& plan, int64_t n_tokens) {
    return LayerCallMs(plan, L.weights, in, ws, n_tokens);
  };
  std::vector<CrossingPoint>& points = g_crossing_points[variant];
  for (int64_t tpe : grid) {
    const int64_t n_tokens = tpe * s.n_expert / per_token;
    double best[2] = {1e30, 1e30};
    for (int rep = 0; rep < 4; ++rep) {
      for (int path = 0; path < 2; ++path) {
        const double ms = time_ms(path == 0 ? *decode_plan : *tile_plan, n_tokens);
        if (rep > 0) best[path] = std::min(best[path], ms);
      }
    }
    points.push_back({tpe, best[0], best[1]});
  }
  int64_t crossing = grid.back() + 1;
  for (auto it = points.rbegin(); it != points.rend(); ++it) {
    if (it->tile_ms > it->decode_ms) break;
    crossing = it->tokens_per_expert;
  }
  return memo[variant] = crossing;
}

void BM_Crossing(benchmark::State& state, CpuVariant variant) {
  int64_t crossing = 0;
  for (auto _ : state) crossing = Crossing(variant);
  for (const CrossingPoint& p : g_crossing_points[variant]) {
    const std::string n = std::to_string(p.tokens_per_expert);
    state.counters["tpe" + n + "_decode_ms"] = p.decode_ms;
    state.counters["tpe" + n + "_tile_ms"] = p.tile_ms;
    const std::string key = std::string("crossing/") + CpuVariantName(variant) + "/" + n;
    g_results[key + "/decode_ms"] = p.decode_ms;
    g_results[key + "/tile_ms"] = p.tile_ms;
  }
  state.counters["crossing_tokens_per_expert"] = static_cast<double>(crossing);
  g_results[std::string("crossing/") + CpuVariantName(variant) + "/tokens_per_expert"] =
      static_cast<double>(crossing);
}

// The tile path converting vs reading tile caches, every expert at exactly N
// tokens (N = 1 .. 64 as in the crossing sweep), best of 3: where the int8
// stream of the caches stops paying (few tokens: the conversion is cheap
// beside the Q4_K stream it saves).
void BM_CacheCrossing(benchmark::State& state) {
  Layer& L = GetLayer(Extra::kTileCache);
  const MoeShape& s = L.shape;
  const int64_t per_token = s.n_expert_used;
  const std::vector<int64_t> grid = {1, 2, 4, 8, 12, 16, 24, 32, 48, 64};
  const int64_t max_tokens = grid.back() * s.n_expert / per_token;
  MoePlanOptions o;
  o.max_tokens = max_tokens;
  o.max_workers = g_pool->num_workers();
  o.force_variant = true;
  o.variant = CpuVariant::kAmx;
  o.tile_prefill = true;
  o.prefill_min_tokens = 1;
  if (!TileOptions(state, "", &o)) return;
  auto plan = MakeMoePlan(s, L.format, o);
  if (!plan.ok() || !plan->tile) {
    state.SkipWithError("no tile path");
    return;
  }
  NumaBuffer ws = g_pool->Allocate(MoeWorkspaceSize(*plan));
  std::memset(ws.data(), 0, ws.size());
  SweepInputs in = MakeSweepInputs(s, max_tokens, 78);
  MoeLayerWeights converting = L.weights;
  converting.gate_tile = converting.up_tile = converting.down_tile = {};
  auto time_ms = [&](const MoeLayerWeights& weights, int64_t n_tokens) {
    return LayerCallMs(*plan, weights, in, ws, n_tokens);
  };
  for (auto _ : state) {
    for (int64_t tpe : grid) {
      const int64_t n_tokens = tpe * s.n_expert / per_token;
      double best[2] = {1e30, 1e30};
      for (int rep = 0; rep < 4; ++rep) {
        for (int c = 0; c < 2; ++c) {
          const double ms = time_ms(c == 0 ? converting : L.weights, n_tokens);
          if (rep > 0) best[c] = std::min(best[c], ms);
        }
      }
      const std::string k = std::to_string(tpe);
      state.counters["tpe" + k + "_convert_ms"] = best[0];
      state.counters["tpe" + k + "_cache_ms"] = best[1];
      g_results["crossing/amx_cache/" + k + "/convert_ms"] = best[0];
      g_results["crossing/amx_cache/" + k + "/cache_ms"] = best[1];
    }
  }
}

// The tile path's weight conversion alone (panel16 -> int8 B tiles), one
// thread, one 16-row panel in L2, group by group: ns per 1024 weights.
void BM_TileConvert(benchmark::State& state, TensorType type) {
  const MoeKernels& kern = HostSupportsCpuVariant(CpuVariant::kAmx)
                               ? MoeKernelsFor(CpuVariant::kAmx)
                               : MoeKernelsAmxEmulated();
  const int64_t k = type == TensorType::kQ6_K ? 2048 : 7168, group = 512;
  std::mt19937 rng(5);
  const auto m = testing::RandomMatrix(type, 16, k, 0.05f, rng);
  const auto w = testing::MakeLayout({m}, type, MoeWeightLayout::kPanel16, 16, k, {true});
  const MoeMatrixFormat f{type, MoeWeightLayout::kPanel16};
  std::vector<int8_t> tiles(16 * group);
  float sc[16];
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t k0 = 0; k0 < k; k0 += group) {
      kern.tile_convert(f, static_cast<const uint8_t*>(w.ptrs[0]), k, 0, k0, group, tiles.data(),
                        sc);
    }
    benchmark::DoNotOptimize(tiles.data());
    seconds += Seconds(t0, std::chrono::steady_clock::now());
  }
  const double weights = static_cast<double>(state.iterations()) * 16.0 * static_cast<double>(k);
  const double ns_per_k = 1e9 * seconds / (weights / 1024.0);
  state.counters["ns_per_1k_weights"] = ns_per_k;
  g_results[std::string("tile_convert/") + TraitsOf(type).name + "/ns_per_1k_weights"] = ns_per_k;
  state.SetBytesProcessed(state.iterations() * *MoeMatrixBytes(f, 16, k));
}

// (5) One kernel call in cache, one thread: GB/s of weights per CPU-second
// (the compute headroom of the decode path over DRAM bandwidth).
void BM_Kernel(benchmark::State& state, CpuVariant variant, TensorType type, int64_t n_act,
               int64_t rows, bool bf16_rows = false) {
  const int64_t k = g_config.smoke ? 512 : 7168;
  std::mt19937 rng(3);
  const auto m = testing::RandomMatrix(type, rows, k, 0.05f, rng);
  const auto w = testing::MakeLayout({m}, type, MoeWeightLayout::kPanel16, rows, k, {true});
  // Large matrices in pool memory (2 MiB aligned, transparent huge pages), as
  // the layer benchmarks have them.
  NumaBuffer big;
  const uint8_t* wp = static_cast<const uint8_t*>(w.ptrs[0]);
  if (rows > 1024) {
    const int64_t bytes = *MoeMatrixBytes({type, MoeWeightLayout::kPanel16}, rows, k);
    big = g_pool->Allocate(bytes);
    std::memcpy(big.data(), wp, bytes);
    wp = static_cast<const uint8_t*>(big.data());
  }
  const MoeMatrixFormat f{type, MoeWeightLayout::kPanel16};
  const MoeKernels& kern = MoeKernelsFor(variant);
  const ActFormat af = ActFormatFor(f);
  const int64_t stride = ActRowBytes(af, k);
  testing::AlignedBuffer act(n_act * stride);
  std::vector<float> x(k), out(n_act * rows);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int64_t t = 0; t < n_act; ++t) {
    for (float& v : x) v = n(rng);
    kern.quantize(af, x.data(), act.p.get() + t * stride, k);
  }
  MatmulArgs a;
  a.format = f;
  a.w = wp;
  a.n_rows = rows;
  a.k = k;
  a.row_begin = 0;
  a.row_end = rows;
  a.act = act.p.get();
  a.act_stride = stride;
  a.n_act = n_act;
  a.out = out.data();
  a.out_stride = rows;
  // The scratch the layer's plan gives the kernel (the amx variant's bf16 tiles).
  testing::AlignedBuffer scratch(std::max<int64_t>(kern.matmul_scratch_bytes(f, k), 64));
  a.scratch = scratch.p.get();
  a.scratch_bytes = kern.matmul_scratch_bytes(f, k);
  // bf16_rows: the activations also as bf16 rows (MatmulArgs::act_bf16, as the
  // layer's stage 2 gives them), padded to whole tiles.
  std::vector<uint16_t> act_bf16;
  if (bf16_rows) {
    act_bf16.assign((n_act + 32) * k, 0);
    for (int64_t t = 0; t < n_act; ++t) {
      F32RowToBf16(act.p.get() + t * stride, &act_bf16[t * k], k);
    }
    a.act_bf16 = act_bf16.data();
    a.act_bf16_stride = k;
  }
  for (auto _ : state) {
    kern.matmul(a);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * *MoeMatrixBytes(f, rows, k));
  // Multiply-adds x 2 per second of one thread.
  state.counters["GFLOPS"] = benchmark::Counter(
      static_cast<double>(2 * rows * k * n_act) * static_cast<double>(state.iterations()) / 1e9,
      benchmark::Counter::kIsRate);
}

// (5b) The tile path alone, one thread: one Q4_K gate-shaped matrix (k 7168)
// with n_act tokens, either in L2 (64 rows, the same matrix every call) or
// streamed from DRAM (512-row matrices cycled over ~1 GiB). ns per 1024
// weights and TOPS, to split the prefill cost into conversion + tiles (hot)
// and memory (cold minus hot) on the machine itself.
void BM_TileKernel(benchmark::State& state, int64_t n_act, bool cold, const std::string& spec) {
  const MoeKernels& kern = MoeKernelsFor(CpuVariant::kAmx);
  MoePlanOptions o;
  if (!TileOptions(state, spec, &o)) return;
  state.SetLabel(MoeTileSpec(o));
  const int64_t chunk_bytes = o.tile_phased ? o.tile_chunk_kib << 10 : 0;
  const TensorType type = TensorType::kQ4_K;
  const int64_t k = g_config.smoke ? 512 : 7168, group = 512;
  const int64_t rows = cold ? 512 : 64;
  const MoeMatrixFormat f{type, MoeWeightLayout::kPanel16};
  std::mt19937 rng(6);
  const auto m = testing::RandomMatrix(type, rows, k, 0.05f, rng);
  const auto w = testing::MakeLayout({m}, type, MoeWeightLayout::kPanel16, rows, k, {true});
  const int64_t mat_bytes = *MoeMatrixBytes(f, rows, k);
  const int64_t n_mats =
      cold ? std::max<int64_t>(2, (g_config.smoke ? (64 << 20) : (1 << 30)) / mat_bytes) : 1;
  NumaBuffer big = g_pool->Allocate(n_mats * mat_bytes);
  g_pool->ParallelFor(n_mats, [&](int64_t i, int) {
    std::memcpy(static_cast<uint8_t*>(big.data()) + i * mat_bytes, w.ptrs[0], mat_bytes);
  });
  const int64_t row_bytes = (k + 4 * (k / group) + 63) / 64 * 64;
  const int64_t n_pad = (n_act + 31) / 32 * 32;
  testing::AlignedBuffer act(n_pad * row_bytes);
  std::memset(act.p.get(), 0, n_pad * row_bytes);
  std::vector<float> x(k);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t t = 0; t < n_act; ++t) {
    for (float& v : x) v = nd(rng);
    uint8_t* row = act.p.get() + t * row_bytes;
    kern.quantize_tile(x.data(), reinterpret_cast<int8_t*>(row), reinterpret_cast<float*>(row + k),
                       k, group);
  }
  const int64_t scratch_bytes = TileScratchBytes(group, chunk_bytes, o.tile_skew) + 64;
  testing::AlignedBuffer scratch(scratch_bytes);
  std::vector<float> out(n_act * rows);
  MatmulArgs a;
  a.format = f;
  a.n_rows = rows;
  a.k = k;
  a.row_begin = 0;
  a.row_end = rows;
  a.act = act.p.get();
  a.act_stride = row_bytes;
  a.act_padded = true;
  a.act_group = group;
  a.n_act = n_act;
  a.out = out.data();
  a.out_stride = rows;
  a.scratch = scratch.p.get();
  a.scratch_bytes = scratch_bytes;
  a.tile_phased = o.tile_phased;
  a.tile_chunk_bytes = chunk_bytes;
  a.tile_chunk_groups = o.tile_chunk_groups;
  a.tile_skew = o.tile_skew;
  int64_t i = 0;
  double seconds = 0;
  for (auto _ : state) {
    a.w = static_cast<const uint8_t*>(big.data()) + (i++ % n_mats) * mat_bytes;
    const auto t0 = std::chrono::steady_clock::now();
    kern.tile_matmul(a);
    seconds += Seconds(t0, std::chrono::steady_clock::now());
    benchmark::DoNotOptimize(out.data());
  }
  const double weights = static_cast<double>(state.iterations()) * static_cast<double>(rows * k);
  const double ns_per_k = 1e9 * seconds / (weights / 1024.0);
  const double tops = 2.0 * static_cast<double>(n_act) * weights / seconds / 1e12;
  state.counters["ns_per_1k_weights"] = ns_per_k;
  state.counters["TOPS_one_core"] = tops;
  state.counters["weights_GBps"] =
      static_cast<double>(state.iterations() * mat_bytes) / seconds / 1e9;
  const std::string key = std::string("tile_kernel/") + (cold ? "dram" : "l2") +
                          (spec.empty() ? "" : "@" + spec) + "/" + std::to_string(n_act);
  g_results[key + "/ns_per_1k_weights"] = ns_per_k;
  g_results[key + "/TOPS_one_core"] = tops;
}

// (6) Load-time repacking, one thread: GGUF bytes read per second.
void BM_Repack(benchmark::State& state, TensorType type, MoeWeightLayout to) {
  const int64_t rows = 256, k = g_config.smoke ? 512 : 7168;
  std::mt19937 rng(4);
  const auto m = testing::RandomMatrix(type, rows, k, 0.05f, rng);
  const int64_t out_bytes = *MoeMatrixBytes({type, to}, rows, k);
  testing::AlignedBuffer dst(out_bytes);
  const void* src_ptr = m.data();
  void* dst_ptr = dst.p.get();
  MoeRepackJob job;
  job.type = type;
  job.to = to;
  job.n_rows = rows;
  job.k = k;
  job.n_expert = 1;
  job.src = &src_ptr;
  job.dst = &dst_ptr;
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t t = 0; t < MoeRepackNumTasks(job); ++t) MoeRepackTask(job, t);
    benchmark::DoNotOptimize(dst.p.get());
    seconds += Seconds(t0, std::chrono::steady_clock::now());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(m.size()));
  g_results[std::string("repack/") + TraitsOf(type).name + "/" + MoeWeightLayoutName(to) +
            "/GBps_per_core"] =
      static_cast<double>(state.iterations()) * static_cast<double>(m.size()) / seconds / 1e9;
}

// "a,b,c" -> {"a", "b", "c"} (empty items dropped).
std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t comma = std::min(s.find(',', pos), s.size());
    if (comma > pos) out.push_back(s.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}

void ParseFlags(int* argc, char** argv) {
  if (const char* e = std::getenv("KTX_BENCH_PREFILL_MIN_TOKENS")) {
    g_config.prefill_min_tokens = std::atoll(e);
  }
  const char* full = std::getenv("KTX_BENCH_FULL_LAYER");
  if (full != nullptr && std::string(full) == "1") g_config.n_expert = 256;
  std::string variants;
  int out = 1;
  for (int i = 1; i < *argc; ++i) {
    const std::string a = argv[i];
    if (a == "--ktx_smoke") {
      g_config.smoke = true;
    } else if (a == "--ktx_full_layer") {
      g_config.n_expert = 256;
    } else if (a.rfind("--ktx_experts=", 0) == 0) {
      g_config.n_expert = std::max<int64_t>(8, std::atoll(a.c_str() + 14));
    } else if (a.rfind("--ktx_threads=", 0) == 0) {
      g_config.threads = std::atoi(a.c_str() + 14);
    } else if (a.rfind("--ktx_variants=", 0) == 0) {
      variants = a.substr(15);
    } else if (a.rfind("--ktx_summary_json=", 0) == 0) {
      g_config.summary_json = a.substr(19);
    } else if (a.rfind("--ktx_amx_configs=", 0) == 0) {
      for (const std::string& spec : SplitList(a.substr(18))) g_config.amx_specs.push_back(spec);
    } else if (a.rfind("--ktx_prefill_tokens=", 0) == 0) {
      for (const std::string& n : SplitList(a.substr(21))) {
        g_config.prefill_tokens.push_back(std::max<int64_t>(1, std::atoll(n.c_str())));
      }
    } else if (a == "--ktx_phase_ticks") {
      g_config.phase_ticks = true;
    } else if (a.rfind("--ktx_prefill_min_tokens=", 0) == 0) {
      g_config.prefill_min_tokens = std::atoll(a.c_str() + 25);
    } else {
      argv[out++] = argv[i];
    }
  }
  *argc = out;
  if (variants.empty()) {
    for (CpuVariant v : {CpuVariant::kAvx512, CpuVariant::kAmx}) {
      if (HostSupportsCpuVariant(v)) g_config.variants.push_back(v);
    }
    if (g_config.variants.empty()) g_config.variants.push_back(BestCpuVariant(DetectCpuFeatures()));
    if (g_config.smoke)
      g_config.variants = {CpuVariant::kScalar, BestCpuVariant(DetectCpuFeatures())};
  } else {
    size_t pos = 0;
    while (pos <= variants.size()) {
      const size_t comma = std::min(variants.find(',', pos), variants.size());
      const auto v = ParseCpuVariant(variants.substr(pos, comma - pos));
      if (v) g_config.variants.push_back(*v);
      pos = comma + 1;
    }
  }
}

void Register() {
  benchmark::RegisterBenchmark("read_bw", BM_ReadBandwidth)
      ->Iterations(g_config.smoke ? 2 : 5)
      ->UseRealTime();
  if (HostSupportsCpuVariant(CpuVariant::kAvx512)) {
    benchmark::RegisterBenchmark("peak/vnni",
                                 [](benchmark::State& s) {
                                   BM_Peak<VnniPeakLoop>(s, g_config.smoke ? 1000 : 2000000,
                                                         &g_vnni_tops, "peak/vnni");
                                 })
        ->Iterations(3)
        ->UseRealTime();
  }
  if (HostSupportsCpuVariant(CpuVariant::kAmx)) {
    benchmark::RegisterBenchmark("peak/amx_int8",
                                 [](benchmark::State& s) {
                                   BM_Peak<AmxInt8PeakLoop>(s, g_config.smoke ? 100 : 200000,
                                                            &g_amx_int8_tops, "peak/amx_int8");
                                 })
        ->Iterations(3)
        ->UseRealTime();
    benchmark::RegisterBenchmark("peak/amx_bf16",
                                 [](benchmark::State& s) {
                                   BM_Peak<AmxBf16PeakLoop>(s, g_config.smoke ? 100 : 200000,
                                                            &g_amx_bf16_tops, "peak/amx_bf16");
                                 })
        ->Iterations(3)
        ->UseRealTime();
  }
  if (HostSupportsCpuVariant(CpuVariant::kAvx512)) {  // AMX, or its emulated table
    for (TensorType t : {TensorType::kQ4_K, TensorType::kQ6_K}) {
      benchmark::RegisterBenchmark((std::string("tile_convert/") + TraitsOf(t).name).c_str(),
                                   [t](benchmark::State& s) { BM_TileConvert(s, t); })
          ->MinTime(g_config.smoke ? 0.01 : 0.3);
    }
  }
  if (HostSupportsCpuVariant(CpuVariant::kAmx)) {
    for (bool cold : {false, true}) {
      for (int64_t n : {1, 32, 64, 128, 256}) {
        benchmark::RegisterBenchmark(
            (std::string("tile_kernel/") + (cold ? "dram" : "l2") + "/tokens:" + std::to_string(n))
                .c_str(),
            [n, cold](benchmark::State& s) { BM_TileKernel(s, n, cold, ""); })
            ->MinTime(g_config.smoke ? 0.01 : 0.3);
      }
      for (const std::string& spec : g_config.amx_specs) {  // per spec: 64 tokens only
        benchmark::RegisterBenchmark(
            (std::string("tile_kernel/") + (cold ? "dram" : "l2") + "@" + spec + "/tokens:64")
                .c_str(),
            [spec, cold](benchmark::State& s) { BM_TileKernel(s, 64, cold, spec); })
            ->MinTime(g_config.smoke ? 0.01 : 0.3);
      }
    }
  }
  for (TensorType t : {TensorType::kQ4_K, TensorType::kQ6_K}) {
    for (MoeWeightLayout to : {MoeWeightLayout::kPanel16, MoeWeightLayout::kAmxInt8}) {
      benchmark::RegisterBenchmark(
          (std::string("repack/") + TraitsOf(t).name + "/" + MoeWeightLayoutName(to)).c_str(),
          [t, to](benchmark::State& s) { BM_Repack(s, t, to); })
          ->MinTime(g_config.smoke ? 0.01 : 0.3);
    }
  }
  for (CpuVariant v : g_config.variants) {
    if (!HostSupportsCpuVariant(v)) {
      std::fprintf(stderr, "moe_benchmark: skipping variant %s: %s\n", CpuVariantName(v),
                   CpuVariantUnsupportedReason(v).c_str());
      continue;
    }
    const std::vector<int64_t> decode =
        g_config.smoke ? std::vector<int64_t>{1, 2} : std::vector<int64_t>{1, 2, 4, 8};
    for (int64_t n : decode) {
      benchmark::RegisterBenchmark(
          (std::string("decode/") + CpuVariantName(v) + "/tokens:" + std::to_string(n)).c_str(),
          [v, n](benchmark::State& s) { BM_Layer(s, v, n, Mode::kDecode); })
          ->UseRealTime()
          ->MinTime(g_config.smoke ? 0.01 : 1.0)
          ->Unit(benchmark::kMillisecond);
    }
    for (TensorType t : {TensorType::kQ4_K, TensorType::kQ6_K}) {
      for (int64_t n : {1, 4}) {
        benchmark::RegisterBenchmark((std::string("kernel_in_cache/") + CpuVariantName(v) + "/" +
                                      TraitsOf(t).name + "/tokens:" + std::to_string(n))
                                         .c_str(),
                                     [v, t, n](benchmark::State& s) { BM_Kernel(s, v, t, n, 128); })
            ->MinTime(g_config.smoke ? 0.01 : 0.5);
        // The same kernel streaming a matrix far larger than the caches.
        benchmark::RegisterBenchmark(
            (std::string("kernel_dram/") + CpuVariantName(v) + "/" + TraitsOf(t).name +
             "/tokens:" + std::to_string(n))
                .c_str(),
            [v, t, n](benchmark::State& s) { BM_Kernel(s, v, t, n, g_config.smoke ? 256 : 16384); })
            ->MinTime(g_config.smoke ? 0.01 : 0.5);
      }
    }
    // BF16 experts: the AVX-512 BF16 dot products against (amx) the bf16 tiles
    // from kAmxBf16MinTokens rows on; in L2 (64 rows) and streamed (4096 rows).
    for (int64_t n : {1, 2, 3, 4, 5, 6, 8, 16, 32, 64}) {
      for (const int64_t rows : {int64_t{64}, g_config.smoke ? int64_t{256} : int64_t{4096}}) {
        benchmark::RegisterBenchmark(
            (std::string(rows == 64 ? "kernel_in_cache/" : "kernel_dram/") + CpuVariantName(v) +
             "/bf16/tokens:" + std::to_string(n))
                .c_str(),
            [v, n, rows](benchmark::State& s) { BM_Kernel(s, v, TensorType::kBF16, n, rows); })
            ->MinTime(g_config.smoke ? 0.01 : 0.3);
      }
      if (v == CpuVariant::kAmx && n >= 8) {  // the rows given as bf16: no packing per call
        benchmark::RegisterBenchmark(
            ("kernel_in_cache/amx/bf16_rows/tokens:" + std::to_string(n)).c_str(),
            [v, n](benchmark::State& s) { BM_Kernel(s, v, TensorType::kBF16, n, 64, true); })
            ->MinTime(g_config.smoke ? 0.01 : 0.3);
      }
    }
    std::vector<int64_t> prefill =
        g_config.smoke ? std::vector<int64_t>{32} : std::vector<int64_t>{128, 512, 2048};
    if (!g_config.prefill_tokens.empty()) prefill = g_config.prefill_tokens;
    if (MoeKernelsFor(v).tile_matmul != nullptr) {
      benchmark::RegisterBenchmark((std::string("crossing/") + CpuVariantName(v)).c_str(),
                                   [v](benchmark::State& s) { BM_Crossing(s, v); })
          ->UseRealTime()
          ->Iterations(1)
          ->Unit(benchmark::kMillisecond);
    }
    for (int64_t n : prefill) {
      benchmark::RegisterBenchmark(
          (std::string("prefill/") + CpuVariantName(v) + "/tokens:" + std::to_string(n)).c_str(),
          [v, n](benchmark::State& s) { BM_Layer(s, v, n, Mode::kPrefill); })
          ->UseRealTime()
          ->Iterations(g_config.smoke ? 1 : 2)
          ->Unit(benchmark::kMillisecond);
    }
    if (MoeKernelsFor(v).tile_matmul != nullptr) {  // each tile-path spec to compare
      for (const std::string& spec : g_config.amx_specs) {
        for (int64_t n : prefill) {
          benchmark::RegisterBenchmark(
              (std::string("prefill/") + CpuVariantName(v) + "@" + spec +
               "/tokens:" + std::to_string(n))
                  .c_str(),
              [v, n, spec](benchmark::State& s) { BM_Layer(s, v, n, Mode::kPrefill, spec); })
              ->UseRealTime()
              ->Iterations(g_config.smoke ? 1 : 3)
              ->Unit(benchmark::kMillisecond);
        }
      }
    }
    if (v == CpuVariant::kAmx && !g_config.smoke) {  // the tile path with groups of 1024
      benchmark::RegisterBenchmark(
          "prefill/amx_g1024/tokens:2048",
          [v](benchmark::State& s) { BM_Layer(s, v, 2048, Mode::kPrefillGroup1024); })
          ->UseRealTime()
          ->Iterations(2)
          ->Unit(benchmark::kMillisecond);
    }
    if (v == CpuVariant::kAmx && !g_config.smoke) {
      benchmark::RegisterBenchmark("crossing/amx_cache", BM_CacheCrossing)
          ->UseRealTime()
          ->Iterations(1)
          ->Unit(benchmark::kMillisecond);
    }
    if (v == CpuVariant::kAmx) {  // the tile path over tile caches, each spec too
      std::vector<std::string> specs = {""};
      specs.insert(specs.end(), g_config.amx_specs.begin(), g_config.amx_specs.end());
      for (const std::string& spec : specs) {
        for (int64_t n : prefill) {
          benchmark::RegisterBenchmark(
              (std::string("prefill/amx_cache") + (spec.empty() ? "" : "@" + spec) +
               "/tokens:" + std::to_string(n))
                  .c_str(),
              [v, n, spec](benchmark::State& s) { BM_Layer(s, v, n, Mode::kPrefillCache, spec); })
              ->UseRealTime()
              ->Iterations(g_config.smoke ? 1 : 2)
              ->Unit(benchmark::kMillisecond);
        }
      }
    }
    if (v == CpuVariant::kAmx) {
      for (int64_t n : prefill) {
        benchmark::RegisterBenchmark(
            (std::string("prefill/amx_int8/tokens:") + std::to_string(n)).c_str(),
            [v, n](benchmark::State& s) { BM_Layer(s, v, n, Mode::kPrefillAmxInt8); })
            ->UseRealTime()
            ->Iterations(g_config.smoke ? 1 : 2)
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
}

std::string Fmt(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, v);
  return buf;
}

// The closing summary: one table for what the issue asks, and JSON.
void PrintSummary(const std::string& brand) {
  auto get = [](const std::string& k) {
    auto it = g_results.find(k);
    return it == g_results.end() ? -1.0 : it->second;
  };
  char date[64];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  std::printf("\n== moe_benchmark summary: %s, %d threads, %lld experts%s, %s ==\n", brand.c_str(),
              g_pool->num_workers(), static_cast<long long>(g_config.n_expert),
              g_config.smoke ? " (smoke: a 256-wide toy layer of 16)" : "", date);
  std::printf("limits: read %s GB/s | VNNI int8 %s TOPS | AMX int8 %s TOPS | AMX bf16 %s TFLOPS\n",
              Fmt("%.1f", get("read_bw/GBps")).c_str(), Fmt("%.2f", get("peak/vnni/TOPS")).c_str(),
              Fmt("%.1f", get("peak/amx_int8/TOPS")).c_str(),
              Fmt("%.1f", get("peak/amx_bf16/TOPS")).c_str());
  std::printf(
      "| form | decode 1 | 2 | 4 | 8 (GB/s, %% of read bw) | prefill 128 | 512 | 2048 (TOPS, "
      "%% of int8 peak) | crossing (tokens/expert) |\n|---|---|---|---|---|---|---|---|---|\n");
  std::vector<std::string> forms;
  for (CpuVariant v : g_config.variants) forms.push_back(CpuVariantName(v));
  // Every other prefill form measured (amx_g1024, amx_int8, <variant>@<spec>).
  for (const auto& [k, v] : g_results) {
    if (k.rfind("prefill/", 0) != 0) continue;
    // The form is what lies between "prefill/" and "/<tokens>/<what>".
    const size_t last = k.rfind('/');
    const size_t prev = last <= 8 ? std::string::npos : k.rfind('/', last - 1);
    if (prev == std::string::npos || prev <= 8) continue;
    const std::string form = k.substr(8, prev - 8);
    if (std::find(forms.begin(), forms.end(), form) == forms.end()) forms.push_back(form);
  }
  nlohmann::json j;
  j["machine"] = brand;
  j["date"] = date;
  j["threads"] = g_pool->num_workers();
  j["experts"] = g_config.n_expert;
  j["limits"] = {{"read_GBps", get("read_bw/GBps")},
                 {"vnni_int8_TOPS", get("peak/vnni/TOPS")},
                 {"amx_int8_TOPS", get("peak/amx_int8/TOPS")},
                 {"amx_bf16_TFLOPS", get("peak/amx_bf16/TOPS")}};
  for (const std::string& f : forms) {
    std::string row = "| " + f + " |";
    nlohmann::json jf;
    for (int64_t n : {1, 2, 4, 8}) {
      const std::string k = "decode/" + f + "/" + std::to_string(n);
      const double g = get(k + "/GBps"), pct = get(k + "/pct_of_read_bw");
      row += g < 0 ? " - |" : " " + Fmt("%.1f", g) + " (" + Fmt("%.0f", pct) + " %) |";
      if (g >= 0) jf["decode"][std::to_string(n)] = {{"GBps", g}, {"pct_of_read_bw", pct}};
    }
    for (int64_t n : {128, 512, 2048}) {
      const std::string k = "prefill/" + f + "/" + std::to_string(n);
      const double t = get(k + "/TOPS"), pct = get(k + "/pct_of_int8_peak");
      row += t < 0 ? " - |" : " " + Fmt("%.2f", t) + " (" + Fmt("%.1f", pct) + " %) |";
      if (t >= 0) {
        jf["prefill"][std::to_string(n)] = {
            {"TOPS", t}, {"pct_of_int8_peak", pct}, {"ms", get(k + "/ms")}};
      }
    }
    const double c = get("crossing/" + f + "/tokens_per_expert");
    row += c < 0 ? " - |" : " " + Fmt("%.0f", c) + " |";
    if (c >= 0) jf["crossing_tokens_per_expert"] = c;
    std::printf("%s\n", row.c_str());
    j["forms"][f] = jf;
  }
  for (const auto& [k, v] : g_results) {
    if (k.rfind("crossing/", 0) == 0 || k.rfind("repack/", 0) == 0 ||
        k.rfind("tile_convert/", 0) == 0 || k.rfind("tile_kernel/", 0) == 0 ||
        k.rfind("prefill/", 0) == 0) {
      j["detail"][k] = v;
    }
  }
  if (!g_config.summary_json.empty()) {
    std::ofstream out(g_config.summary_json);
    out << j.dump(2) << "\n";
    std::printf("summary JSON: %s\n", g_config.summary_json.c_str());
  }
}

}  // namespace
}  // namespace ktx::kernels::moe::bench

int main(int argc, char** argv) {
  using namespace ktx::kernels::moe::bench;
  ParseFlags(&argc, argv);
  ktx::runtime::CpuPool::Options pool_options;
  if (g_config.threads > 0) {
    auto all = ktx::runtime::CpuPool::Create({});
    if (all.ok()) {
      const auto& cpus = (*all)->cpus();
      pool_options.cpus.assign(cpus.begin(),
                               cpus.begin() + std::min<size_t>(cpus.size(), g_config.threads));
    }
  }
  auto pool = ktx::runtime::CpuPool::Create(pool_options);
  if (!pool.ok()) {
    std::fprintf(stderr, "moe_benchmark: %s\n", std::string(pool.status().message()).c_str());
    return 1;
  }
  g_pool = pool->get();
  const auto& f = ktx::kernels::DetectCpuFeatures();
  std::fprintf(stderr, "moe_benchmark: %s, %d workers, %lld experts%s\n", f.brand.c_str(),
               g_pool->num_workers(), static_cast<long long>(g_config.n_expert),
               g_config.smoke ? " (smoke)" : "");
  Register();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  PrintSummary(f.brand);
  benchmark::Shutdown();
  return 0;
}
