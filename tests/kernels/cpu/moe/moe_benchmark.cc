// moe_benchmark: the CPU expert kernels against the machine's limits.
//
//   read_bw                  all-core streaming read over >= 1 GiB (GB/s)
//   peak/vnni, peak/amx_int8, peak/amx_bf16   in-cache instruction peaks (TOPS)
//   decode/<variant>/tokens:N   one DeepSeek-V3 MoE layer (n_embd 7168, n_ff 2048,
//                            8 experts per token, Q4_K gate/up + Q6_K down, panel16)
//                            with random routing: GB/s of expert weights read and
//                            % of read_bw
//   kernel_in_cache/<variant>/<type>/tokens:N  one 128-row panel16 matrix in L2, one
//                            thread: weight bytes per CPU-second (compute headroom)
//   repack/<type>/<layout>   load-time repacking, one thread (GGUF bytes per second)
//   prefill/<variant>/tokens:N  the same layer for 128/512/2048 tokens: TOPS and %
//                            of the variant's int8 peak (amx_int8 prefill form on amx)
//
// Flags (before Google Benchmark's own): --ktx_smoke (tiny sizes, for ctest),
// --ktx_experts=N (default 64: ~1.9 GiB of panel16 weights, far beyond the
// caches), --ktx_full_layer (all 256 experts, ~7.4 GiB; also KTX_BENCH_FULL_LAYER=1),
// --ktx_threads=N (first N allowed cpus), --ktx_variants=avx512,amx (default: avx512 and amx where
// supported; scalar and avx2 only when named). Typical: moe_benchmark --benchmark_filter=decode
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/moe/moe.h"
#include "kernels/cpu/moe/moe_internal.h"
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
  int64_t n_expert = 64;
  int threads = 0;  // 0: every allowed cpu
  std::vector<CpuVariant> variants;
};

Config g_config;
CpuPool* g_pool = nullptr;
double g_read_gbps = 0.0;
double g_vnni_tops = 0.0;
double g_amx_int8_tops = 0.0;

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
void BM_Peak(benchmark::State& state, int64_t iters, double* store) {
  double best = 0;
  for (auto _ : state) best = std::max(best, MeasurePeak<Loop>(iters));
  *store = best;
  state.counters["TOPS"] = best;
  state.counters["threads"] = g_pool->num_workers();
}

// ---- (3), (4) the MoE layer ----

struct Layer {
  MoeShape shape;
  std::vector<NumaBuffer> bufs;
  std::vector<const void*> gate, up, down, gate_p, up_p, down_p;
  MoeLayerFormat format;
  MoeLayerWeights weights;
};

// One random expert (Q4_K gate/up, Q6_K down), repacked, copied to every expert
// slot (distinct memory: reads come from DRAM, not from the caches).
Layer& GetLayer(bool with_amx) {
  static std::unique_ptr<Layer> layers[2];
  std::unique_ptr<Layer>& slot = layers[with_amx ? 1 : 0];
  if (slot) return *slot;
  auto L = std::make_unique<Layer>();
  L->shape =
      g_config.smoke ? MoeShape{256, 256, 16, 8} : MoeShape{7168, 2048, g_config.n_expert, 8};
  const MoeShape& s = L->shape;
  std::mt19937 rng(1);
  const auto g = testing::RandomMatrix(TensorType::kQ4_K, s.n_ff, s.n_embd, 0.05f, rng);
  const auto u = testing::RandomMatrix(TensorType::kQ4_K, s.n_ff, s.n_embd, 0.05f, rng);
  const auto d = testing::RandomMatrix(TensorType::kQ6_K, s.n_embd, s.n_ff, 0.05f, rng);
  auto add = [&](const std::vector<uint8_t>& src, TensorType t, MoeWeightLayout layout,
                 int64_t rows, int64_t k, std::vector<const void*>* out) {
    const auto one = testing::MakeLayout({src}, t, layout, rows, k, {true});
    const int64_t bytes = *MoeMatrixBytes({t, layout}, rows, k);
    for (int64_t e = 0; e < s.n_expert; ++e) {
      L->bufs.push_back(g_pool->Allocate(bytes));
      uint8_t* dst = static_cast<uint8_t*>(L->bufs.back().data());
      constexpr int64_t kChunk = 1 << 20;
      g_pool->ParallelFor((bytes + kChunk - 1) / kChunk, [&](int64_t c, int) {
        const int64_t n = std::min(kChunk, bytes - c * kChunk);
        std::memcpy(dst + c * kChunk, static_cast<const uint8_t*>(one.ptrs[0]) + c * kChunk, n);
      });
      out->push_back(dst);
    }
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
  if (with_amx) {
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

void BM_Layer(benchmark::State& state, CpuVariant variant, int64_t n_tokens, bool prefill) {
  const bool amx = variant == CpuVariant::kAmx;
  Layer& L = GetLayer(amx && prefill);
  MoePlanOptions o;
  o.max_tokens = n_tokens;
  o.max_workers = g_pool->num_workers();
  o.force_variant = true;
  o.variant = variant;
  if (const char* e = std::getenv("KTX_BENCH_DOWN_ROWS")) o.down_rows_per_task = std::atoll(e);
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
        g_pool->ParallelFor(run->NumTasks(st),
                            [&](int64_t task, int worker) { run->RunTask(st, task, worker); });
      }
      stage_seconds[st] += Seconds(s0, std::chrono::steady_clock::now());
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
  state.counters["prefill_experts_per_call"] =
      static_cast<double>(prefill_experts) / static_cast<double>(state.iterations());
  const double ref = ref_sum / static_cast<double>(state.iterations());
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

// (5) One kernel call in cache, one thread: GB/s of weights per CPU-second
// (the compute headroom of the decode path over DRAM bandwidth).
void BM_Kernel(benchmark::State& state, CpuVariant variant, TensorType type, int64_t n_act,
               int64_t rows) {
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
  for (auto _ : state) {
    kern.matmul(a);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * *MoeMatrixBytes(f, rows, k));
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
  for (auto _ : state) {
    for (int64_t t = 0; t < MoeRepackNumTasks(job); ++t) MoeRepackTask(job, t);
    benchmark::DoNotOptimize(dst.p.get());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(m.size()));
}

void ParseFlags(int* argc, char** argv) {
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
                                                         &g_vnni_tops);
                                 })
        ->Iterations(3)
        ->UseRealTime();
  }
  if (HostSupportsCpuVariant(CpuVariant::kAmx)) {
    benchmark::RegisterBenchmark("peak/amx_int8",
                                 [](benchmark::State& s) {
                                   BM_Peak<AmxInt8PeakLoop>(s, g_config.smoke ? 100 : 200000,
                                                            &g_amx_int8_tops);
                                 })
        ->Iterations(3)
        ->UseRealTime();
    benchmark::RegisterBenchmark("peak/amx_bf16",
                                 [](benchmark::State& s) {
                                   double unused = 0;
                                   BM_Peak<AmxBf16PeakLoop>(s, g_config.smoke ? 100 : 200000,
                                                            &unused);
                                 })
        ->Iterations(3)
        ->UseRealTime();
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
          [v, n](benchmark::State& s) { BM_Layer(s, v, n, false); })
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
    const std::vector<int64_t> prefill =
        g_config.smoke ? std::vector<int64_t>{32} : std::vector<int64_t>{128, 512, 2048};
    for (int64_t n : prefill) {
      benchmark::RegisterBenchmark(
          (std::string("prefill/") + CpuVariantName(v) + "/tokens:" + std::to_string(n)).c_str(),
          [v, n](benchmark::State& s) { BM_Layer(s, v, n, true); })
          ->UseRealTime()
          ->Iterations(g_config.smoke ? 1 : 2)
          ->Unit(benchmark::kMillisecond);
    }
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
  benchmark::Shutdown();
  return 0;
}
