// The MoE operator on every ISA variant the host supports against an
// independent float64 reference (weights dequantized by the test's own code,
// activations unquantized), on awkward sizes and expert subsets.
//
// Tolerance. The kernels quantize x (per 256, or per 32 for Q8_0) and h to int8
// with d = max|v| / 127: a rounding error uniform in +-d/2, i.e. a relative
// energy eps = (max/rms)^2 / (12 * 127^2) per quantization. For Gaussian x over
// 256 values max/rms ~ 3 (eps_x ~ 4.6e-5); h = silu(g) * u is heavier tailed
// (max/rms up to ~6: eps_h ~ 1.9e-4). Errors of x reach h through both g and u
// (about 2 eps_x), so NMSE(out) ~ 2 eps_x + eps_h ~ 3e-4. We allow 1e-3 (about
// 3x); the measured values are ~1e-4 (printed). amx_int8 weights add their own
// int8 rounding (three matrices, max/rms of a weight block ~ 2-3: ~3 * 4e-5),
// so the prefill-form tests allow 1.5e-3. BF16 pairs with bf16-rounded
// activations (eps ~ 2^-18 per rounding), far below these.
// The tile prefill path (int8 tiles over panel16 weights converted on the fly)
// quantizes x and h per group of 512 (256 on small shapes) and converts the
// weights to int8 per (row, group) within 0.56-0.75 of a step (moe_internal.h):
// three int8 roundings of the same order as amx_int8's, with a slightly larger
// max/rms for the coarser activation groups: the same 1.5e-3 bound.
// A wrong scale, nibble or row order gives NMSE >= 1e-2.
#include "kernels/cpu/moe/moe.h"

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/moe/moe_internal.h"
#include "kernels/cpu/quant/quant.h"
#include "tests/kernels/cpu/moe/moe_test_util.h"

namespace ktx::kernels::moe {
namespace {

using testing::AlignedBuffer;
using testing::LayoutCopy;
using testing::MakeLayout;
using testing::MakeTestLayer;
using testing::Nmse;
using testing::ReferenceMoe;
using testing::TestLayer;

constexpr double kTolerance = 1e-3;
constexpr double kAmxTolerance = 1.5e-3;
// Variant vs scalar: fp32 rounding ~1e-7 relative per sum, plus a few h int8
// rounding flips (measured: <= 1e-8; a flip costs ~1e-8..1e-6 of the energy).
constexpr double kVsScalarTolerance = 1e-6;

struct Routing {
  std::vector<float> x;
  std::vector<int32_t> ids;
  std::vector<float> w;
};

Routing RandomRouting(const MoeShape& s, int64_t n_tokens, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::uniform_real_distribution<float> u(0.05f, 1.0f);
  Routing r;
  r.x.resize(n_tokens * s.n_embd);
  for (float& v : r.x) v = n(rng);
  std::vector<int32_t> perm(s.n_expert);
  for (int64_t t = 0; t < n_tokens; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t k = 0; k < s.n_expert_used; ++k) {
      r.ids.push_back(perm[k]);
      r.w.push_back(u(rng));
    }
  }
  return r;
}

struct Case {
  const char* name;
  TensorType gate_type, down_type;
  MoeWeightLayout layout;
  int64_t n_embd, n_ff, n_used, n_tokens;
  bool subset;  // shard owns only the odd experts
};

class MoeVariantTest : public ::testing::TestWithParam<CpuVariant> {
 protected:
  void SetUp() override {
    const std::string why = CpuVariantUnsupportedReason(GetParam());
    if (!why.empty())
      GTEST_SKIP() << "host cannot run " << CpuVariantName(GetParam()) << ": " << why;
  }

  MoePlanOptions Options(int64_t max_tokens, int workers) const {
    MoePlanOptions o;
    o.max_tokens = max_tokens;
    o.max_workers = workers;
    o.force_variant = true;
    o.variant = GetParam();
    return o;
  }
};

// Builds the weights of `L` in `layout` (and optionally amx_int8 prefill copies).
struct Weights {
  LayoutCopy gate, up, down, gate_p, up_p, down_p;
  MoeLayerWeights w;
  MoeLayerFormat f;
};

std::unique_ptr<Weights> BuildWeights(const TestLayer& L, MoeWeightLayout layout,
                                      const std::vector<bool>& owned, bool prefill) {
  auto W = std::make_unique<Weights>();
  const MoeShape& s = L.shape;
  W->gate = MakeLayout(L.gate, L.gate_type, layout, s.n_ff, s.n_embd, owned);
  W->up = MakeLayout(L.up, L.gate_type, layout, s.n_ff, s.n_embd, owned);
  W->down = MakeLayout(L.down, L.down_type, layout, s.n_embd, s.n_ff, owned);
  W->f.gate = W->f.up = {L.gate_type, layout};
  W->f.down = {L.down_type, layout};
  W->w.gate = {W->f.gate, W->gate.ptrs.data()};
  W->w.up = {W->f.up, W->up.ptrs.data()};
  W->w.down = {W->f.down, W->down.ptrs.data()};
  if (prefill) {
    const MoeWeightLayout amx = MoeWeightLayout::kAmxInt8;
    W->gate_p = MakeLayout(L.gate, L.gate_type, amx, s.n_ff, s.n_embd, owned);
    W->up_p = MakeLayout(L.up, L.gate_type, amx, s.n_ff, s.n_embd, owned);
    W->down_p = MakeLayout(L.down, L.down_type, amx, s.n_embd, s.n_ff, owned);
    W->f.has_prefill = true;
    W->f.gate_prefill = W->f.up_prefill = {L.gate_type, amx};
    W->f.down_prefill = {L.down_type, amx};
    W->w.gate_prefill = {W->f.gate_prefill, W->gate_p.ptrs.data()};
    W->w.up_prefill = {W->f.up_prefill, W->up_p.ptrs.data()};
    W->w.down_prefill = {W->f.down_prefill, W->down_p.ptrs.data()};
  }
  return W;
}

// Runs all stages with `workers` threads (tasks handed out round-robin, the
// worker index is the thread index); workers == 0 runs serially in reverse task order.
struct RunStats {
  int64_t active = 0, prefill = 0, cached = 0;
};

std::vector<float> RunLayer(const MoePlan& plan, const Weights& W, const Routing& r,
                            int64_t n_tokens, int workers, RunStats* stats = nullptr) {
  std::vector<float> out(n_tokens * plan.shape.n_embd, -1.0f);
  AlignedBuffer ws(MoeWorkspaceSize(plan));
  std::memset(ws.p.get(), 0xA5, ws.size);  // garbage: the run must not rely on zeroed workspace
  MoeInput in;
  in.n_tokens = n_tokens;
  in.x = r.x.data();
  in.ids = r.ids.data();
  in.weights = r.w.data();
  in.out = out.data();
  auto run = MoeRun::Begin(plan, W.w, in, ws.p.get(), ws.size);
  EXPECT_TRUE(run.ok()) << run.status();
  if (!run.ok()) return out;
  if (stats) {
    *stats = {run->num_active_experts(), run->num_prefill_experts(), run->num_cached_experts()};
  }
  if (workers == 0) {
    for (int s = 0; s < MoeRun::kNumStages; ++s) {
      for (int64_t t = run->NumTasks(s) - 1; t >= 0; --t) run->RunTask(s, t, 0);
    }
  } else {
    std::barrier sync(workers);
    std::vector<std::thread> threads;
    for (int i = 0; i < workers; ++i) {
      threads.emplace_back([&, i] {
        for (int s = 0; s < MoeRun::kNumStages; ++s) {
          RunMoeStage(*run, s, i, workers);
          sync.arrive_and_wait();
        }
      });
    }
    for (auto& t : threads) t.join();
  }
  return out;
}

const Case kCases[] = {
    // name, gate/up type, down type, layout, n_embd, n_ff, n_used, tokens, subset
    {"q4k_q6k_gguf_t1", TensorType::kQ4_K, TensorType::kQ6_K, MoeWeightLayout::kGguf, 256, 512, 8,
     1, false},
    {"q4k_q6k_panel_t1", TensorType::kQ4_K, TensorType::kQ6_K, MoeWeightLayout::kPanel16, 256, 512,
     8, 1, false},
    {"q4k_q6k_panel_t3_sub", TensorType::kQ4_K, TensorType::kQ6_K, MoeWeightLayout::kPanel16, 512,
     256, 3, 3, true},
    {"q4k_q6k_panel_t17", TensorType::kQ4_K, TensorType::kQ6_K, MoeWeightLayout::kPanel16, 256, 512,
     6, 17, false},
    {"q4k_q6k_gguf_t17_sub", TensorType::kQ4_K, TensorType::kQ6_K, MoeWeightLayout::kGguf, 512, 256,
     2, 17, true},
    {"q5k_q5k_panel_t3", TensorType::kQ5_K, TensorType::kQ5_K, MoeWeightLayout::kPanel16, 256, 512,
     4, 3, false},
    {"q5k_q4k_gguf_t3", TensorType::kQ5_K, TensorType::kQ4_K, MoeWeightLayout::kGguf, 256, 256, 1,
     3, false},
    {"q6k_q6k_panel_t17", TensorType::kQ6_K, TensorType::kQ6_K, MoeWeightLayout::kPanel16, 512, 256,
     8, 17, true},
    {"q80_q80_panel_t17", TensorType::kQ8_0, TensorType::kQ8_0, MoeWeightLayout::kPanel16, 256, 512,
     5, 17, false},
    {"q80_q80_gguf_t3", TensorType::kQ8_0, TensorType::kQ8_0, MoeWeightLayout::kGguf, 512, 256, 8,
     3, false},
    {"bf16_bf16_panel_t3", TensorType::kBF16, TensorType::kBF16, MoeWeightLayout::kPanel16, 256,
     512, 2, 3, false},
    {"bf16_bf16_gguf_t1", TensorType::kBF16, TensorType::kBF16, MoeWeightLayout::kGguf, 512, 256, 7,
     1, true},
    // Enough tokens per expert for the amx variant's bf16 tiles (blocks of 32 and a partial one).
    {"bf16_bf16_panel_t255_sub", TensorType::kBF16, TensorType::kBF16, MoeWeightLayout::kPanel16,
     256, 512, 4, 255, true},
    {"q4k_q6k_panel_t255", TensorType::kQ4_K, TensorType::kQ6_K, MoeWeightLayout::kPanel16, 256,
     256, 8, 255, false},
    {"q80_q4k_panel_t255_sub", TensorType::kQ8_0, TensorType::kQ4_K, MoeWeightLayout::kPanel16, 256,
     256, 3, 255, true},
};

TEST_P(MoeVariantTest, MatchesFloat64Reference) {
  uint32_t seed = 1;
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    const MoeShape shape{c.n_embd, c.n_ff, 16, c.n_used};
    const TestLayer L = MakeTestLayer(shape, c.gate_type, c.down_type, seed++);
    std::vector<bool> owned(16, true);
    if (c.subset) {
      for (int e = 0; e < 16; e += 2) owned[e] = false;
    }
    auto W = BuildWeights(L, c.layout, owned, false);
    auto plan = MakeMoePlan(shape, W->f, Options(c.n_tokens, 3));
    ASSERT_TRUE(plan.ok()) << plan.status();
    const Routing r = RandomRouting(shape, c.n_tokens, seed++);
    const std::vector<float> y = RunLayer(*plan, *W, r, c.n_tokens, 3);
    const std::vector<double> ref =
        ReferenceMoe(L, owned, c.n_tokens, r.x.data(), r.ids.data(), r.w.data());
    ASSERT_GT(testing::Rms(ref), 1e-2);  // a non-trivial layer
    const double nmse = Nmse(y.data(), ref);
    std::printf("  %-8s %-24s nmse %.3g\n", CpuVariantName(GetParam()), c.name, nmse);
    EXPECT_LT(nmse, kTolerance);
    // Against the scalar variant the difference is only fp32 summation order
    // (and the rare h element whose int8 rounding flips with it): far tighter.
    MoePlanOptions so = Options(c.n_tokens, 1);
    so.variant = CpuVariant::kScalar;
    const std::vector<float> ys = RunLayer(*MakeMoePlan(shape, W->f, so), *W, r, c.n_tokens, 1);
    std::vector<double> ysd(ys.begin(), ys.end());
    const double nmse_scalar = Nmse(y.data(), ysd);
    std::printf("  %-8s %-24s nmse vs scalar %.3g\n", CpuVariantName(GetParam()), c.name,
                nmse_scalar);
    EXPECT_LT(nmse_scalar, kVsScalarTolerance);
    // Tokens whose experts are all foreign get exactly zero.
    for (int64_t t = 0; t < c.n_tokens; ++t) {
      bool any = false;
      for (int64_t k = 0; k < c.n_used; ++k) any = any || owned[r.ids[t * c.n_used + k]];
      if (!any) {
        for (int64_t i = 0; i < c.n_embd; ++i) ASSERT_EQ(y[t * c.n_embd + i], 0.0f);
      }
    }
  }
}

// The plan's bf16_tile_min_tokens reaches both stages: an amx layer of BF16
// experts whose switch is past every expert's token count gives the avx512
// variant's bits (the AVX-512 BF16 dot products), and with the default switch
// it runs the tiles (another fp32 summation order, so other bits).
TEST_P(MoeVariantTest, Bf16TileSwitchFromThePlan) {
  if (GetParam() != CpuVariant::kAmx) {
    GTEST_SKIP() << "the bf16 tile switch is the amx variant's (emulated: moe_amx_emu_test)";
  }
  const MoeShape shape{256, 512, 16, 4};
  const TestLayer L = MakeTestLayer(shape, TensorType::kBF16, TensorType::kBF16, 41);
  auto W = BuildWeights(L, MoeWeightLayout::kPanel16, std::vector<bool>(16, true), false);
  const int64_t n_tokens = 255;  // ~64 tokens per expert
  const Routing r = RandomRouting(shape, n_tokens, 42);
  MoePlanOptions dots = Options(n_tokens, 2);
  dots.variant = CpuVariant::kAvx512;
  MoePlanOptions off = Options(n_tokens, 2);
  off.bf16_tile_min_tokens = n_tokens + 1;
  const std::vector<float> y_dots = RunLayer(*MakeMoePlan(shape, W->f, dots), *W, r, n_tokens, 2);
  const std::vector<float> y_off = RunLayer(*MakeMoePlan(shape, W->f, off), *W, r, n_tokens, 2);
  EXPECT_EQ(y_off, y_dots);
  const std::vector<float> y_tiles =
      RunLayer(*MakeMoePlan(shape, W->f, Options(n_tokens, 2)), *W, r, n_tokens, 2);
  EXPECT_NE(y_tiles, y_dots);
  std::vector<double> ref(y_dots.begin(), y_dots.end());
  EXPECT_LT(Nmse(y_tiles.data(), ref), kVsScalarTolerance);
  MoePlanOptions bad = Options(n_tokens, 2);
  bad.bf16_tile_min_tokens = -1;
  const auto rejected = MakeMoePlan(shape, W->f, bad);
  EXPECT_EQ(rejected.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(rejected.status().message().find("bf16_tile_min_tokens"), std::string::npos);
}

TEST_P(MoeVariantTest, PrefillFormMatchesFloat64Reference) {
  // Experts with >= 4 tokens take the amx_int8 form, the others the decode form.
  uint32_t seed = 100;
  for (TensorType gt : {TensorType::kQ4_K, TensorType::kQ8_0}) {
    for (int64_t n_tokens : {17, 255}) {
      SCOPED_TRACE(::testing::Message()
                   << "gate type " << static_cast<int>(gt) << " tokens " << n_tokens);
      const MoeShape shape{256, 512, 16, 6};
      const TestLayer L = MakeTestLayer(shape, gt, TensorType::kQ6_K, seed++);
      std::vector<bool> owned(16, true);
      owned[3] = false;
      auto W = BuildWeights(L, MoeWeightLayout::kPanel16, owned, true);
      MoePlanOptions o = Options(n_tokens, 2);
      o.prefill_min_tokens = 4;
      auto plan = MakeMoePlan(shape, W->f, o);
      ASSERT_TRUE(plan.ok()) << plan.status();
      const Routing r = RandomRouting(shape, n_tokens, seed++);
      RunStats stats;
      std::vector<float> y = RunLayer(*plan, *W, r, n_tokens, 2, &stats);
      EXPECT_GT(stats.prefill, 0);
      const std::vector<double> ref =
          ReferenceMoe(L, owned, n_tokens, r.x.data(), r.ids.data(), r.w.data());
      ASSERT_GT(testing::Rms(ref), 1e-2);
      const double nmse = Nmse(y.data(), ref);
      std::printf("  %-8s prefill t%-4lld nmse %.3g (%lld of %lld experts prefill)\n",
                  CpuVariantName(GetParam()), static_cast<long long>(n_tokens), nmse,
                  static_cast<long long>(stats.prefill), static_cast<long long>(stats.active));
      EXPECT_LT(nmse, kAmxTolerance);
    }
  }
}

// The tile prefill path on awkward token counts: every expert with at least
// one token takes it where the variant has a tile kernel (amx; scalar's
// reference); the other variants run the decode path on the same plan.
TEST_P(MoeVariantTest, TilePrefillMatchesFloat64Reference) {
  struct TileCase {
    TensorType gate_type, down_type;
    int64_t n_embd, n_ff, n_used;
    bool subset;
  };
  const TileCase cases[] = {{TensorType::kQ4_K, TensorType::kQ6_K, 512, 1024, 6, false},
                            {TensorType::kQ5_K, TensorType::kQ8_0, 256, 512, 4, true},
                            {TensorType::kQ8_0, TensorType::kQ4_K, 768, 256, 3, false}};
  uint32_t seed = 300;
  for (const TileCase& c : cases) {
    for (int64_t n_tokens : {1, 3, 17, 255}) {
      SCOPED_TRACE(::testing::Message() << TraitsOf(c.gate_type).name << "/"
                                        << TraitsOf(c.down_type).name << " tokens " << n_tokens);
      const MoeShape shape{c.n_embd, c.n_ff, 16, c.n_used};
      const TestLayer L = MakeTestLayer(shape, c.gate_type, c.down_type, seed++);
      std::vector<bool> owned(16, true);
      if (c.subset) {
        for (int e = 1; e < 16; e += 3) owned[e] = false;
      }
      auto W = BuildWeights(L, MoeWeightLayout::kPanel16, owned, false);
      MoePlanOptions o = Options(n_tokens, 3);
      o.prefill_min_tokens = 1;
      o.tile_prefill = true;
      o.tile_max_tokens = 64;  // 255 tokens: experts split into token blocks
      auto plan = MakeMoePlan(shape, W->f, o);
      ASSERT_TRUE(plan.ok()) << plan.status();
      const Routing r = RandomRouting(shape, n_tokens, seed++);
      RunStats stats;
      const std::vector<float> y = RunLayer(*plan, *W, r, n_tokens, 3, &stats);
      if (plan->tile) {
        EXPECT_EQ(stats.prefill, stats.active);
      }
      const std::vector<double> ref =
          ReferenceMoe(L, owned, n_tokens, r.x.data(), r.ids.data(), r.w.data());
      ASSERT_GT(testing::Rms(ref), 1e-2);
      const double nmse = Nmse(y.data(), ref);
      std::printf("  %-8s tile %s/%s t%-4lld nmse %.3g (%lld of %lld experts on tiles)\n",
                  CpuVariantName(GetParam()), TraitsOf(c.gate_type).name,
                  TraitsOf(c.down_type).name, static_cast<long long>(n_tokens), nmse,
                  static_cast<long long>(stats.prefill), static_cast<long long>(stats.active));
      EXPECT_LT(nmse, kAmxTolerance);
      if (plan->tile && GetParam() != CpuVariant::kScalar) {
        // Against the scalar reference of the same path: the int8 parts are
        // bitwise equal; SiLU's exp differs in the last bits.
        MoePlanOptions so = o;
        so.variant = CpuVariant::kScalar;
        const std::vector<float> ys = RunLayer(*MakeMoePlan(shape, W->f, so), *W, r, n_tokens, 1);
        std::vector<double> ysd(ys.begin(), ys.end());
        EXPECT_LT(Nmse(y.data(), ysd), kVsScalarTolerance);
      }
    }
  }
}

// Tile caches for some of the experts (BuildTileCacheTask): the layer's output
// is bitwise that of converting on the fly, with either amx kernel schedule;
// a plan that cannot take them is refused.
TEST_P(MoeVariantTest, TileCacheGivesTheBitsOfTheConversion) {
  const MoeShape shape{1024, 512, 16, 6};
  for (auto [gate_type, down_type] : {std::pair{TensorType::kQ4_K, TensorType::kQ6_K},
                                      std::pair{TensorType::kQ5_K, TensorType::kQ8_0}}) {
    const TestLayer L = MakeTestLayer(shape, gate_type, down_type, 41);
    std::vector<bool> owned(16, true);
    owned[5] = owned[11] = false;
    auto W = BuildWeights(L, MoeWeightLayout::kPanel16, owned, false);
    // Caches for the even owned experts only: cached and converting experts in one run.
    struct Cache {
      std::vector<AlignedBuffer> bufs;
      std::vector<const void*> ptrs = std::vector<const void*>(16, nullptr);
    } caches[3];
    const std::vector<const void*>* src[3] = {&W->gate.ptrs, &W->up.ptrs, &W->down.ptrs};
    const MoeMatrixFormat fmt[3] = {W->f.gate, W->f.up, W->f.down};
    const int64_t rows[3] = {shape.n_ff, shape.n_ff, shape.n_embd};
    const int64_t ks[3] = {shape.n_embd, shape.n_embd, shape.n_ff};
    for (int i = 0; i < 3; ++i) {
      for (int e = 0; e < 16; e += 2) {
        if (!owned[e]) continue;
        const auto bytes = TileCacheBytes(fmt[i], rows[i], ks[i]);
        ASSERT_TRUE(bytes.ok()) << bytes.status();
        caches[i].bufs.emplace_back(*bytes);
        for (int64_t t = 0; t < TileCacheNumTasks(rows[i]); ++t) {
          BuildTileCacheTask(fmt[i], (*src[i])[e], rows[i], ks[i], t,
                             caches[i].bufs.back().p.get());
        }
        caches[i].ptrs[e] = caches[i].bufs.back().p.get();
      }
    }
    Weights Wc;
    Wc.f = W->f;
    Wc.w = W->w;
    Wc.w.gate_tile = {{gate_type, MoeWeightLayout::kTile512}, caches[0].ptrs.data()};
    Wc.w.up_tile = {{gate_type, MoeWeightLayout::kTile512}, caches[1].ptrs.data()};
    Wc.w.down_tile = {{down_type, MoeWeightLayout::kTile512}, caches[2].ptrs.data()};
    for (const bool phased : {true, false}) {
      for (int64_t n_tokens : {3, 17, 100}) {
        SCOPED_TRACE(::testing::Message() << TraitsOf(gate_type).name << " tokens " << n_tokens
                                          << (phased ? " phased" : " in-loop"));
        MoePlanOptions o = Options(n_tokens, 3);
        o.prefill_min_tokens = 2;
        o.tile_prefill = true;
        o.tile_phased = phased;
        o.tile_max_tokens = 32;
        auto plan = MakeMoePlan(shape, W->f, o);
        ASSERT_TRUE(plan.ok()) << plan.status();
        if (!plan->tile) GTEST_SKIP() << CpuVariantName(GetParam()) << " has no tile path";
        ASSERT_EQ(plan->tile_group, 512);
        const Routing r = RandomRouting(shape, n_tokens, 900 + static_cast<uint32_t>(n_tokens));
        RunStats plain, cached;
        const std::vector<float> y = RunLayer(*plan, *W, r, n_tokens, 3, &plain);
        const std::vector<float> yc = RunLayer(*plan, Wc, r, n_tokens, 2, &cached);
        EXPECT_EQ(plain.cached, 0);
        EXPECT_GT(cached.cached, 0);
        EXPECT_LT(cached.cached, cached.prefill);
        ASSERT_EQ(0, std::memcmp(y.data(), yc.data(), 4 * y.size()));
      }
    }
    // Refused: a plan whose tile group is not 512, or without the tile path;
    // a cache of the wrong type.
    MoePlanOptions o = Options(8, 1);
    o.tile_prefill = true;
    o.tile_group = 256;
    auto p256 = MakeMoePlan(shape, W->f, o);
    ASSERT_TRUE(p256.ok());
    const Routing r = RandomRouting(shape, 8, 3);
    std::vector<float> out(8 * shape.n_embd);
    AlignedBuffer ws(MoeWorkspaceSize(*p256));
    const MoeInput in{8, r.x.data(), r.ids.data(), r.w.data(), out.data()};
    auto bad = MoeRun::Begin(*p256, Wc.w, in, ws.p.get(), ws.size);
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(std::string(bad.status().message()).find("tile_group 512"), std::string::npos)
        << bad.status();
    o.tile_group = 0;
    auto p512 = MakeMoePlan(shape, W->f, o);
    ASSERT_TRUE(p512.ok());
    AlignedBuffer ws2(MoeWorkspaceSize(*p512));
    MoeLayerWeights wrong = Wc.w;
    wrong.down_tile.format = {TensorType::kQ4_K, MoeWeightLayout::kTile512};
    if (down_type != TensorType::kQ4_K) {
      auto b2 = MoeRun::Begin(*p512, wrong, in, ws2.p.get(), ws2.size);
      ASSERT_FALSE(b2.ok());
      EXPECT_NE(std::string(b2.status().message()).find("down_tile"), std::string::npos)
          << b2.status();
    }
    // tile512 is never a matrix form of a plan, nor a repack target.
    MoeLayerFormat f = W->f;
    f.down = {down_type, MoeWeightLayout::kTile512};
    auto pf = MakeMoePlan(shape, f, o);
    ASSERT_FALSE(pf.ok());
    EXPECT_NE(std::string(pf.status().message()).find("tile cache"), std::string::npos)
        << pf.status();
  }
}

TEST_P(MoeVariantTest, BitwiseIndependentOfWorkerCount) {
  const MoeShape shape{512, 256, 16, 4};
  const TestLayer L = MakeTestLayer(shape, TensorType::kQ4_K, TensorType::kQ6_K, 7, false);
  std::vector<bool> owned(16, true);
  std::vector<float> tile_results[2];  // tile prefill, phased and in-loop kernel
  for (int mode : {0, 1, 2, 3}) {      // decode only, amx_int8 prefill form, tile prefill x2
    const bool prefill = mode == 1;
    auto W = BuildWeights(L, MoeWeightLayout::kPanel16, owned, prefill);
    const Routing r = RandomRouting(shape, 40, 8);
    MoePlanOptions o1 = Options(40, 1), o3 = Options(40, 3);
    o1.prefill_min_tokens = o3.prefill_min_tokens = 8;
    o1.tile_prefill = o3.tile_prefill = mode >= 2;
    o1.tile_phased = o3.tile_phased = mode != 3;
    o1.tile_chunk_kib = o3.tile_chunk_kib = 32;  // several chunks per call
    o1.tile_max_tokens = o3.tile_max_tokens = 32;
    auto p1 = MakeMoePlan(shape, W->f, o1);
    auto p3 = MakeMoePlan(shape, W->f, o3);
    ASSERT_TRUE(p1.ok() && p3.ok());
    const std::vector<float> a = RunLayer(*p1, *W, r, 40, 1);
    const std::vector<float> b = RunLayer(*p3, *W, r, 40, 3);
    const std::vector<float> c = RunLayer(*p3, *W, r, 40, 0);  // reversed task order
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4)) << "mode " << mode;
    EXPECT_EQ(0, std::memcmp(a.data(), c.data(), a.size() * 4)) << "mode " << mode;
    if (mode >= 2) tile_results[mode - 2] = a;
  }
  // The phased and the in-loop tile kernels give the same bits.
  ASSERT_EQ(tile_results[0].size(), tile_results[1].size());
  EXPECT_EQ(
      0, std::memcmp(tile_results[0].data(), tile_results[1].data(), tile_results[0].size() * 4));
}

// MoeInput::x_rows: the tokens' rows read in place from a larger x give the
// bits of a run over the gathered rows, on the decode and the prefill paths.
TEST_P(MoeVariantTest, ReadsRowsOfALargerBatchInPlace) {
  const MoeShape shape{512, 256, 16, 4};
  const TestLayer L = MakeTestLayer(shape, TensorType::kQ4_K, TensorType::kQ6_K, 21, false);
  const std::vector<bool> owned(16, true);
  const int64_t n_batch = 61, n = 40;
  const Routing batch = RandomRouting(shape, n_batch, 22);
  // Rows 1, 2, 4, 5, 7, ... of the batch (every third one skipped).
  std::vector<int32_t> rows;
  for (int32_t r = 0; static_cast<int64_t>(rows.size()) < n; ++r) {
    if (r % 3 != 0) rows.push_back(r);
  }
  Routing gathered;
  gathered.x.resize(n * shape.n_embd);
  for (int64_t j = 0; j < n; ++j) {
    std::copy_n(batch.x.data() + rows[j] * shape.n_embd, shape.n_embd,
                gathered.x.data() + j * shape.n_embd);
  }
  const Routing sub = RandomRouting(shape, n, 23);  // the sub-batch's own routing
  gathered.ids = sub.ids;
  gathered.w = sub.w;
  for (const bool tile : {false, true}) {
    auto W = BuildWeights(L, MoeWeightLayout::kPanel16, owned, false);
    MoePlanOptions o = Options(n, 2);
    o.prefill_min_tokens = tile ? 8 : 1 << 20;
    o.tile_prefill = tile;
    auto plan = MakeMoePlan(shape, W->f, o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    if (tile && !plan->tile) continue;  // no tile path on this variant
    const std::vector<float> want = RunLayer(*plan, *W, gathered, n, 2);
    std::vector<float> got(n * shape.n_embd, -1.0f);
    AlignedBuffer ws(MoeWorkspaceSize(*plan));
    MoeInput in;
    in.n_tokens = n;
    in.x = batch.x.data();
    in.ids = sub.ids.data();
    in.weights = sub.w.data();
    in.out = got.data();
    in.x_rows = rows.data();
    in.n_x_rows = n_batch;
    auto run = MoeRun::Begin(*plan, W->w, in, ws.p.get(), ws.size);
    ASSERT_TRUE(run.ok()) << run.status();
    for (int st = 0; st < MoeRun::kNumStages; ++st) {
      for (int64_t t = 0; t < run->NumTasks(st); ++t) run->RunTask(st, t, 0);
    }
    EXPECT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * 4)) << "tile " << tile;
    // A row outside x is refused, naming the token.
    const int32_t kept = rows[7];
    rows[7] = static_cast<int32_t>(n_batch);
    auto bad = MoeRun::Begin(*plan, W->w, in, ws.p.get(), ws.size);
    ASSERT_FALSE(bad.ok());
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(bad.status().message().find("token 7 reads x row 61"), std::string::npos)
        << bad.status();
    rows[7] = kept;
  }
}

TEST_P(MoeVariantTest, ActivationQuantizersAgreeBitwiseWithScalar) {
  const MoeKernels& k = MoeKernelsFor(GetParam());
  const MoeKernels& s = MoeKernelsScalar();
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 2.0f);
  std::vector<float> x(1024);
  for (float& v : x) v = n(rng);
  std::fill(x.begin() + 256, x.begin() + 288, 0.0f);  // an all-zero block
  x[5] = 1e-30f;
  for (ActFormat f : {ActFormat::kQ8K, ActFormat::kQ8_0, ActFormat::kF32}) {
    const int64_t bytes = ActRowBytes(f, 1024);
    AlignedBuffer a(bytes), b(bytes);
    std::memset(a.p.get(), 0, bytes);
    std::memset(b.p.get(), 0, bytes);
    k.quantize(f, x.data(), a.p.get(), 1024);
    s.quantize(f, x.data(), b.p.get(), 1024);
    if (f == ActFormat::kQ8K) {  // compare fields, not padding
      for (int blk = 0; blk < 4; ++blk) {
        const ActQ8K& qa = reinterpret_cast<const ActQ8K*>(a.p.get())[blk];
        const ActQ8K& qb = reinterpret_cast<const ActQ8K*>(b.p.get())[blk];
        EXPECT_EQ(0, std::memcmp(qa.qs, qb.qs, 256));
        EXPECT_EQ(qa.d, qb.d);
        EXPECT_EQ(0, std::memcmp(qa.bsum32, qb.bsum32, sizeof(qa.bsum32)));
        EXPECT_EQ(0, std::memcmp(qa.neg32_bsum16, qb.neg32_bsum16, sizeof(qa.neg32_bsum16)));
      }
    } else {
      EXPECT_EQ(0, std::memcmp(a.p.get(), b.p.get(), bytes)) << static_cast<int>(f);
    }
  }
  std::vector<float> g(300), u(300), h1(300), h2(300);
  for (int i = 0; i < 300; ++i) {
    g[i] = n(rng) * 4;
    u[i] = n(rng);
  }
  g[0] = -100.0f;
  g[1] = 100.0f;
  k.silu_mul(g.data(), u.data(), h1.data(), 300);
  s.silu_mul(g.data(), u.data(), h2.data(), 300);
  for (int i = 0; i < 300; ++i) {
    EXPECT_NEAR(h1[i], h2[i], 2e-6f * (std::fabs(h2[i]) + 1e-3f)) << i << " g=" << g[i];
  }
}

std::string VariantName(const ::testing::TestParamInfo<CpuVariant>& info) {
  return CpuVariantName(info.param);
}

INSTANTIATE_TEST_SUITE_P(AllVariants, MoeVariantTest, ::testing::ValuesIn(kAllCpuVariants),
                         VariantName);

// ---- Variant-independent checks ----

TEST(MoeRepackTest, PanelLayoutsDecodeToTheGgufValues) {
  std::mt19937 rng(11);
  for (TensorType t : {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, TensorType::kQ8_0,
                       TensorType::kBF16}) {
    SCOPED_TRACE(static_cast<int>(t));
    const int64_t rows = 32, k = 512;
    const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
    std::vector<bool> owned{true};
    const LayoutCopy c = MakeLayout({m}, t, MoeWeightLayout::kPanel16, rows, k, owned);
    const MoeMatrixFormat f{t, MoeWeightLayout::kPanel16};
    const int64_t kb = KBlock(f), nb = k / kb;
    const uint8_t* base = static_cast<const uint8_t*>(c.ptrs[0]);
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> ref(k);
      testing::DequantRow(t, m.data() + r * testing::RowBytesOf(t, k), k, ref.data());
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* pb = base + ((r / 16) * nb + b) * PanelBlockBytes(f);
        const int rr = static_cast<int>(r % 16);
        for (int i = 0; i < kb; ++i) {
          double v;
          if (t == TensorType::kQ8_0) {
            float d;
            int8_t q[32];
            DecodePanelQ80(pb, rr, &d, q);
            v = static_cast<double>(d) * q[i];
          } else if (t == TensorType::kBF16) {
            uint16_t w[32];
            DecodePanelBf16(pb, rr, w);
            v = Bf16Bits(w[i]);
          } else {
            DecodedK dk;
            if (t == TensorType::kQ6_K) {
              DecodePanelQ6K(pb, rr, &dk);
              v = static_cast<double>(dk.d) * dk.sc[i / 16] * (dk.q[i] - 32);
            } else {
              DecodePanelQ4K(pb, rr, t == TensorType::kQ5_K, &dk);
              v = static_cast<double>(dk.d) * dk.sc[i / 32] * dk.q[i] -
                  static_cast<double>(dk.dmin) * dk.m[i / 32];
            }
          }
          ASSERT_EQ(v, ref[b * kb + i]) << "row " << r << " element " << b * kb + i;
        }
      }
    }
  }
}

// Re-quantization at load (MoeRepackJob::from_bf16): BF16 expert slabs
// repacked as Q4_K / Q5_K / Q6_K / Q8_0 panel16 give exactly the bytes of
// quantizing the rows with QuantizeRow and repacking that file form; tasks
// run in any order with their own scratch; bad targets are refused.
TEST(MoeRepackTest, Bf16ExpertsRequantizeToTheFileForm) {
  std::mt19937 rng(13);
  const int64_t rows = 48, k = 512;
  std::vector<std::vector<uint8_t>> bf16;
  for (int e = 0; e < 3; ++e)
    bf16.push_back(testing::RandomMatrix(TensorType::kBF16, rows, k, 0.5f, rng));
  for (TensorType t :
       {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, TensorType::kQ8_0}) {
    SCOPED_TRACE(static_cast<int>(t));
    ASSERT_TRUE(MoeRequantTargetSupported(t));
    // The file form: each row through float into t.
    std::vector<std::vector<uint8_t>> file;
    std::vector<float> row(k);
    double err = 0, ref = 0;
    for (const auto& m : bf16) {
      auto& f = file.emplace_back(rows * testing::RowBytesOf(t, k));
      for (int64_t r = 0; r < rows; ++r) {
        DequantizeRow(TensorType::kBF16, m.data() + r * 2 * k, row.data(), k);
        QuantizeRow(t, row.data(), f.data() + r * testing::RowBytesOf(t, k), k);
        std::vector<double> back(k);
        testing::DequantRow(t, f.data() + r * testing::RowBytesOf(t, k), k, back.data());
        for (int64_t i = 0; i < k; ++i) {
          err += (back[i] - row[i]) * (back[i] - row[i]);
          ref += static_cast<double>(row[i]) * row[i];
        }
      }
    }
    std::printf("  bf16 -> type %d: relative RMS error %.3g\n", static_cast<int>(t),
                std::sqrt(err / ref));
    EXPECT_LT(std::sqrt(err / ref), t == TensorType::kQ8_0 ? 1e-2 : 0.1);
    const LayoutCopy want =
        MakeLayout(file, t, MoeWeightLayout::kPanel16, rows, k, {true, false, true});
    // The same from the BF16 slabs, tasks in reverse order.
    const int64_t bytes = *MoeMatrixBytes({t, MoeWeightLayout::kPanel16}, rows, k);
    std::vector<std::vector<uint8_t>> out(3, std::vector<uint8_t>(bytes, 0xAB));
    const void* src[3] = {bf16[0].data(), bf16[1].data(), bf16[2].data()};
    void* dst[3] = {out[0].data(), nullptr, out[2].data()};
    MoeRepackJob job;
    job.type = t;
    job.to = MoeWeightLayout::kPanel16;
    job.n_rows = rows;
    job.k = k;
    job.n_expert = 3;
    job.src = src;
    job.dst = dst;
    job.from_bf16 = true;
    ASSERT_TRUE(ValidateMoeRepackJob(job).ok());
    ASSERT_EQ(MoeRepackBytes(job), 2 * bytes);
    const int64_t sb = MoeRepackScratchBytes(job);
    ASSERT_GT(sb, 0);
    std::vector<uint8_t> scratch(sb);
    for (int64_t task = MoeRepackNumTasks(job) - 1; task >= 0; --task) {
      MoeRepackTask(job, task, scratch.data());
    }
    EXPECT_EQ(0, std::memcmp(out[0].data(), want.ptrs[0], bytes));
    EXPECT_EQ(0, std::memcmp(out[2].data(), want.ptrs[2], bytes));
    EXPECT_EQ(out[1][0], 0xAB);  // expert 1 is not held: untouched
  }
  MoeRepackJob bad;
  bad.type = TensorType::kBF16;
  bad.n_rows = rows;
  bad.k = k;
  bad.from_bf16 = true;
  EXPECT_TRUE(ValidateMoeRepackJob(bad).ok());  // BF16 to BF16: nothing to re-quantize
  EXPECT_EQ(MoeRepackScratchBytes(bad), 0);
  bad.type = TensorType::kQ4_0;
  EXPECT_FALSE(MoeRequantTargetSupported(TensorType::kQ4_0));
  const absl::Status st = ValidateMoeRepackJob(bad);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("re-quantize"), std::string::npos) << st;
  bad.type = TensorType::kQ4_K;
  bad.to = MoeWeightLayout::kAmxInt8;
  EXPECT_FALSE(ValidateMoeRepackJob(bad).ok());
}

TEST(MoeRepackTest, AmxInt8IsWithinHalfAStepOfTheGgufValues) {
  std::mt19937 rng(12);
  for (TensorType t :
       {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, TensorType::kQ8_0}) {
    const int64_t rows = 16, k = 512;
    const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
    const LayoutCopy c = MakeLayout({m}, t, MoeWeightLayout::kAmxInt8, rows, k, {true});
    const uint8_t* base = static_cast<const uint8_t*>(c.ptrs[0]);
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> ref(k);
      testing::DequantRow(t, m.data() + r * testing::RowBytesOf(t, k), k, ref.data());
      for (int64_t b = 0; b < k / 256; ++b) {
        float s;
        int8_t q[256];
        DecodePanelAmx(base + b * panel::kAmxBytes, static_cast<int>(r), &s, q);
        double amax = 0;
        for (int i = 0; i < 256; ++i) amax = std::max(amax, std::fabs(ref[b * 256 + i]));
        EXPECT_NEAR(s, amax / 127, 1e-6 * amax);
        for (int i = 0; i < 256; ++i) {
          ASSERT_LE(std::fabs(s * q[i] - ref[b * 256 + i]), 0.5001 * s + 1e-12)
              << "type " << static_cast<int>(t) << " row " << r << " i " << b * 256 + i;
        }
      }
    }
  }
}

// The tile path's on-the-fly int8 form of panel16 weights (the scalar
// specification, which the AMX kernels equal bitwise): every value within its
// stated fraction of a step of the GGUF value (dequantized by the test's own
// code), the scale from the row's largest representable |value|.
TEST(MoeRepackTest, TileConversionIsWithinItsBoundOfTheGgufValues) {
  std::mt19937 rng(13);
  struct Bound {
    TensorType type;
    double steps;  // 0.5 + (0.5 * max|q| + 0.5) / 256
  };
  for (Bound bd : {Bound{TensorType::kQ4_K, 0.53125}, Bound{TensorType::kQ5_K, 0.5625},
                   Bound{TensorType::kQ6_K, 0.5625}, Bound{TensorType::kQ8_0, 0.75}}) {
    const int64_t rows = 32, k = 1024;
    const std::vector<uint8_t> m = testing::RandomMatrix(bd.type, rows, k, 1.0f, rng);
    const LayoutCopy c = MakeLayout({m}, bd.type, MoeWeightLayout::kPanel16, rows, k, {true});
    const MoeMatrixFormat f{bd.type, MoeWeightLayout::kPanel16};
    for (int64_t group : {256, 512}) {
      std::vector<int8_t> tiles(16 * group);
      float s[16];
      double worst = 0;
      for (int64_t p = 0; p < rows / 16; ++p) {
        for (int64_t k0 = 0; k0 < k; k0 += group) {
          TileConvertPanelScalar(f, static_cast<const uint8_t*>(c.ptrs[0]), k, p, k0, group,
                                 tiles.data(), s);
          for (int r = 0; r < 16; ++r) {
            std::vector<double> ref(k);
            const int64_t row = 16 * p + r;
            testing::DequantRow(bd.type, m.data() + row * testing::RowBytesOf(bd.type, k), k,
                                ref.data());
            double amax = 0;
            for (int64_t i = k0; i < k0 + group; ++i) amax = std::max(amax, std::fabs(ref[i]));
            ASSERT_GE(s[r] * 127.0 * (1 + 1e-6), amax) << "row " << row;
            for (int64_t i = 0; i < group; ++i) {
              const int v = tiles[64 * (i / 4) + 4 * r + i % 4];
              ASSERT_LE(std::abs(v), 127);
              const double err = std::fabs(s[r] * v - ref[k0 + i]);
              worst = std::max(worst, s[r] > 0 ? err / s[r] : err);
              ASSERT_LE(err, (bd.steps + 1e-4) * s[r] + 1e-30)
                  << TraitsOf(bd.type).name << " row " << row << " k " << k0 + i << " v " << v;
            }
          }
        }
      }
      std::printf("  tile conversion %-5s group %4lld: worst error %.3f steps (bound %.4f)\n",
                  TraitsOf(bd.type).name, static_cast<long long>(group), worst, bd.steps);
    }
  }
}

TEST(MoeRepackTest, ReportsBytesAndRejectsBadShapes) {
  EXPECT_EQ(*MoeMatrixBytes({TensorType::kQ4_K, MoeWeightLayout::kGguf}, 2048, 7168),
            2048LL * 28 * 144);
  EXPECT_EQ(*MoeMatrixBytes({TensorType::kQ4_K, MoeWeightLayout::kPanel16}, 2048, 7168),
            2048LL * 28 * 148);
  EXPECT_EQ(*MoeMatrixBytes({TensorType::kQ6_K, MoeWeightLayout::kPanel16}, 7168, 2048),
            7168LL * 8 * 210);
  EXPECT_FALSE(MoeMatrixBytes({TensorType::kQ4_K, MoeWeightLayout::kPanel16}, 20, 256).ok());
  EXPECT_FALSE(MoeMatrixBytes({TensorType::kQ4_K, MoeWeightLayout::kGguf}, 16, 100).ok());
  EXPECT_FALSE(MoeMatrixBytes({TensorType::kBF16, MoeWeightLayout::kAmxInt8}, 16, 256).ok());
  EXPECT_FALSE(MoeMatrixBytes({TensorType::kQ4_0, MoeWeightLayout::kGguf}, 16, 256).ok());
  // The tile cache: 8256 bytes per 16 rows x 512 k (a DeepSeek-V3 gate: 14.8 MB).
  EXPECT_EQ(*MoeMatrixBytes({TensorType::kQ4_K, MoeWeightLayout::kTile512}, 2048, 7168),
            2048LL / 16 * 14 * 8256);
  EXPECT_FALSE(MoeMatrixBytes({TensorType::kQ4_K, MoeWeightLayout::kTile512}, 16, 256).ok());
  EXPECT_FALSE(MoeMatrixBytes({TensorType::kBF16, MoeWeightLayout::kTile512}, 16, 512).ok());
  // Made from panel16 (BuildTileCacheTask), never repacked from GGUF.
  const void* src[1] = {nullptr};
  void* dst[1] = {nullptr};
  MoeRepackJob job{TensorType::kQ4_K, MoeWeightLayout::kTile512, 16, 512, 1, src, dst};
  const absl::Status st = ValidateMoeRepackJob(job);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(std::string(st.message()).find("BuildTileCache"), std::string::npos) << st;
}

TEST(MoePlanTest, RejectsBadShapesAndInputs) {
  MoeLayerFormat f;
  f.gate = f.up = {TensorType::kQ4_K, MoeWeightLayout::kGguf};
  f.down = {TensorType::kQ6_K, MoeWeightLayout::kGguf};
  MoePlanOptions o;
  o.max_tokens = 4;
  o.force_variant = true;
  EXPECT_FALSE(MakeMoePlan({300, 512, 16, 2}, f, o).ok());
  EXPECT_FALSE(MakeMoePlan({256, 512, 4, 8}, f, o).ok());
  MoeLayerFormat bad = f;
  bad.up = {TensorType::kQ5_K, MoeWeightLayout::kGguf};
  EXPECT_FALSE(MakeMoePlan({256, 512, 16, 2}, bad, o).ok());
  auto plan = MakeMoePlan({256, 512, 16, 2}, f, o);
  ASSERT_TRUE(plan.ok()) << plan.status();

  const MoeShape shape{256, 512, 16, 2};
  const TestLayer L = MakeTestLayer(shape, TensorType::kQ4_K, TensorType::kQ6_K, 5, false);
  auto W = BuildWeights(L, MoeWeightLayout::kGguf, std::vector<bool>(16, true), false);
  Routing r = RandomRouting(shape, 4, 6);
  std::vector<float> out(4 * 256);
  AlignedBuffer ws(MoeWorkspaceSize(*plan));
  MoeInput in{4, r.x.data(), r.ids.data(), r.w.data(), out.data()};
  EXPECT_TRUE(MoeRun::Begin(*plan, W->w, in, ws.p.get(), ws.size).ok());
  r.ids[3] = 16;
  auto bad_id = MoeRun::Begin(*plan, W->w, in, ws.p.get(), ws.size);
  EXPECT_EQ(bad_id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_id.status().message().find("expert id 16"), std::string::npos);
  r.ids[3] = 1;
  in.n_tokens = 5;
  EXPECT_FALSE(MoeRun::Begin(*plan, W->w, in, ws.p.get(), ws.size).ok());
  in.n_tokens = 4;
  EXPECT_FALSE(MoeRun::Begin(*plan, W->w, in, ws.p.get(), ws.size - 64).ok());
  // No tokens: a valid run with no tasks.
  auto empty =
      MoeRun::Begin(*plan, W->w, {0, nullptr, nullptr, nullptr, nullptr}, ws.p.get(), ws.size);
  ASSERT_TRUE(empty.ok()) << empty.status();
  for (int s = 0; s < MoeRun::kNumStages; ++s) EXPECT_EQ(empty->NumTasks(s), 0);
  r.ids[0] = -2;  // -1 (kMoeNoExpert) is padding, any other negative id an error
  EXPECT_FALSE(MoeRun::Begin(*plan, W->w, in, ws.p.get(), ws.size).ok());
  r.ids[0] = 0;
  MoeLayerWeights wrong = W->w;
  wrong.down.format = {TensorType::kQ4_K, MoeWeightLayout::kGguf};
  EXPECT_FALSE(MoeRun::Begin(*plan, wrong, in, ws.p.get(), ws.size).ok());
}

// Rows padded with kMoeNoExpert (routing policies that keep fewer experts for
// some tokens): the padding adds nothing; the result is the float64 reference
// of the routing with those entries' weights set to 0.
TEST(MoePlanTest, NoExpertEntriesAreSkipped) {
  const MoeShape shape{256, 256, 16, 4};
  const TestLayer L = MakeTestLayer(shape, TensorType::kQ8_0, TensorType::kQ8_0, 11);
  const std::vector<bool> owned(16, true);
  auto W = BuildWeights(L, MoeWeightLayout::kGguf, owned, false);
  MoePlanOptions o;
  o.max_tokens = 7;
  o.force_variant = true;
  o.variant = CpuVariant::kScalar;
  auto plan = MakeMoePlan(shape, W->f, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  Routing r = RandomRouting(shape, 7, 12);
  std::vector<float> w_ref = r.w;
  int padded = 0;
  for (int64_t t = 0; t < 7; ++t) {
    for (int64_t k = 4 - (t % 4); k < 4; ++k) {  // token t keeps 4 - t % 4 entries
      r.ids[t * 4 + k] = kMoeNoExpert;
      w_ref[t * 4 + k] = 0.0f;
      ++padded;
    }
  }
  ASSERT_GT(padded, 0);
  std::vector<int32_t> ids_ref = r.ids;
  for (int32_t& e : ids_ref) e = e == kMoeNoExpert ? 0 : e;  // any valid id: weight 0
  RunStats stats;
  const std::vector<float> y = RunLayer(*plan, *W, r, 7, 0, &stats);
  const std::vector<double> ref =
      ReferenceMoe(L, owned, 7, r.x.data(), ids_ref.data(), w_ref.data());
  EXPECT_LT(Nmse(y.data(), ref), kTolerance);
  // A token whose every entry is padding gets zeros.
  for (int64_t k = 0; k < 4; ++k) r.ids[k] = kMoeNoExpert;
  const std::vector<float> y0 = RunLayer(*plan, *W, r, 7, 0);
  for (int64_t i = 0; i < 256; ++i) ASSERT_EQ(y0[i], 0.0f) << i;
}

TEST(CpuVariantTest, NamesParseAndForcingChecksTheHost) {
  for (CpuVariant v : kAllCpuVariants) EXPECT_EQ(ParseCpuVariant(CpuVariantName(v)), v);
  EXPECT_EQ(ParseCpuVariant("AVX512"), CpuVariant::kAvx512);
  EXPECT_FALSE(ParseCpuVariant("sse2").has_value());
  EXPECT_TRUE(CpuVariantUnsupportedReason(CpuVariant::kScalar).empty());
  CpuFeatures none;
  EXPECT_NE(CpuVariantUnsupportedReason(CpuVariant::kAmx, none).find("amx_tile"),
            std::string::npos);
  EXPECT_EQ(BestCpuVariant(none), CpuVariant::kScalar);
  const CpuVariant before = ActiveCpuVariant();
  EXPECT_TRUE(ForceCpuVariant("scalar").ok());
  EXPECT_EQ(ActiveCpuVariant(), CpuVariant::kScalar);
  EXPECT_FALSE(ForceCpuVariant("neon").ok());
  if (!HostSupportsCpuVariant(CpuVariant::kAmx)) {
    EXPECT_EQ(ForceCpuVariant(CpuVariant::kAmx).code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_TRUE(ForceCpuVariant(before).ok());
}

}  // namespace
}  // namespace ktx::kernels::moe
