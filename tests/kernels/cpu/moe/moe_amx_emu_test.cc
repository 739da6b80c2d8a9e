// The AMX tile kernels of moe_kernels_amx.cc, compiled with scalar emulation of
// the tile registers (ktx_moe_amx_emulated), against the scalar variant: checks
// the tile layout, blocking, padding rows and scale handling on CPUs without
// AMX. (On AMX machines moe_test runs the real tiles.) Needs AVX-512.
#include "kernels/cpu/moe/moe_kernels_amx_emulated.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/moe/moe.h"
#include "tests/kernels/cpu/moe/moe_test_util.h"

namespace ktx::kernels::moe {
namespace {

using testing::AlignedBuffer;

class AmxEmulationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string why = CpuVariantUnsupportedReason(CpuVariant::kAvx512);
    if (!why.empty()) GTEST_SKIP() << "the emulated AMX table uses AVX-512: " << why;
  }
};

// n_act rows of random activations in the tile format (group), `stride` bytes
// apart, with 32 rows of junk padding after them (tile kernels read whole tiles).
AlignedBuffer TileActivations(int64_t n_act, int64_t k, int64_t group, int64_t stride,
                              std::mt19937& rng) {
  AlignedBuffer act((n_act + 32) * stride);
  std::memset(act.p.get(), 0x7f, act.size);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> x(k);
  for (int64_t r = 0; r < n_act; ++r) {
    for (float& v : x) v = n(rng);
    uint8_t* row = act.p.get() + r * stride;
    MoeKernelsScalar().quantize_tile(x.data(), reinterpret_cast<int8_t*>(row),
                                     reinterpret_cast<float*>(row + k), k, group);
  }
  return act;
}

// The same n_act rows (stride bytes apart) in the k-step-major layout
// (MatmulArgs::act_kstep_stride): 64-byte column c of row t at c * 64 n_act +
// t * 64, and 32 rows of 0x7f after the last column (tile loads past n_act).
AlignedBuffer KStepMajor(const AlignedBuffer& act, int64_t n_act, int64_t stride) {
  AlignedBuffer out((n_act + 32) * stride);
  std::memset(out.p.get(), 0x7f, out.size);
  for (int64_t t = 0; t < n_act; ++t) {
    for (int64_t c = 0; c < stride / 64; ++c) {
      std::memcpy(out.p.get() + c * 64 * n_act + t * 64, act.p.get() + t * stride + 64 * c, 64);
    }
  }
  return out;
}

// A tile matmul over rows [r0, r1) of a matrix [rows][k] with those activations.
MatmulArgs TileArgs(int64_t rows, int64_t k, int64_t r0, int64_t r1, const AlignedBuffer& act,
                    int64_t stride, int64_t n_act, int64_t group, int64_t out_stride,
                    AlignedBuffer& scratch) {
  MatmulArgs a;
  a.n_rows = rows;
  a.k = k;
  a.row_begin = r0;
  a.row_end = r1;
  a.act = act.p.get();
  a.act_stride = stride;
  a.n_act = n_act;
  a.act_padded = true;
  a.act_group = group;
  a.out_stride = out_stride;
  a.scratch = scratch.p.get();
  a.scratch_bytes = static_cast<int64_t>(scratch.size);
  return a;
}

// NMSE of the first `width` values of n_act rows (stride out_stride) of y
// against ref; fails the test if y changed a value past `width` (outputs start
// at -7).
double RowsNmse(const std::vector<float>& y, const std::vector<float>& ref, int64_t n_act,
                int64_t width, int64_t out_stride) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n_act; ++i) {
    for (int64_t r = 0; r < width; ++r) {
      const double d = y[i * out_stride + r] - ref[i * out_stride + r];
      num += d * d;
      den += static_cast<double>(ref[i * out_stride + r]) * ref[i * out_stride + r];
    }
    for (int64_t r = width; r < out_stride; ++r) {
      EXPECT_EQ(y[i * out_stride + r], -7.0f) << "wrote past row_end, row " << i;
    }
  }
  EXPECT_GT(den, 0.0);
  return den > 0 ? num / den : 1.0;
}

// BF16 panel16 weights on (emulated) bf16 tiles from kAmxBf16MinTokens rows
// (or MatmulArgs::bf16_tile_min_tokens) on: activations gathered by index (the decode form) or
// contiguous, packed by the kernel or given as bf16 rows (MatmulArgs::act_bf16, the layer's form),
// token blocks of 32 with a partial one, a single tail panel, rows past
// row_end untouched. The fp32 sums run in another order than the scalar kernel's:
// NMSE ~1e-14 here; a wrong pair, row or token order gives ~1.
TEST_F(AmxEmulationTest, Bf16TilesMatchScalar) {
  std::mt19937 rng(23);
  const int64_t rows = 80, k = 512;
  const TensorType t = TensorType::kBF16;
  const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
  const auto w = testing::MakeLayout({m}, t, MoeWeightLayout::kPanel16, rows, k, {true});
  const MoeMatrixFormat f{t, MoeWeightLayout::kPanel16};
  const int64_t stride = ActRowBytes(ActFormat::kF32, k);
  AlignedBuffer scratch(MoeKernelsAmxEmulated().matmul_scratch_bytes(f, k));
  ASSERT_GE(static_cast<int64_t>(scratch.size), 32 * k * 2);
  const int64_t n_src = 50;
  AlignedBuffer act(n_src * stride);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> x(k);
  for (int64_t r = 0; r < n_src; ++r) {
    for (float& v : x) v = n(rng);
    MoeKernelsScalar().quantize(ActFormat::kF32, x.data(), act.p.get() + r * stride, k);
  }
  std::vector<int32_t> index(n_src);
  for (int64_t i = 0; i < n_src; ++i) index[i] = static_cast<int32_t>((7 * i + 3) % n_src);
  for (const int64_t n_act : {kAmxBf16MinTokens - 1, kAmxBf16MinTokens, int64_t{17}, int64_t{40}}) {
    for (const int form : {0, 1, 2}) {  // contiguous, gathered, gathered + rows given as bf16
      const bool gathered = form > 0;
      // The rows as bf16 (MatmulArgs::act_bf16: after act_index, padded to 32).
      std::vector<uint16_t> rows_bf16((n_act + 32) * k, 0x7fc0);
      for (int64_t t = 0; t < n_act; ++t) {
        F32RowToBf16(act.p.get() + (gathered ? index[t] : t) * stride, &rows_bf16[t * k], k);
      }
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, 80}, {16, 64}, {48, 80}}) {
        SCOPED_TRACE(::testing::Message()
                     << "n_act " << n_act << " form " << form << " rows " << r0 << ".." << r1);
        MatmulArgs a = TileArgs(rows, k, r0, r1, act, stride, n_act, 0, r1 - r0 + 3, scratch);
        a.format = f;
        a.w = static_cast<const uint8_t*>(w.ptrs[0]);
        a.act_index = gathered ? index.data() : nullptr;
        a.act_padded = false;  // rows past n_act are not there
        if (form == 2) {       // padding rows NaN: a token row must not leak into another
          a.act_bf16 = rows_bf16.data();
          a.act_bf16_stride = k;
        }
        std::vector<float> y_emu(n_act * a.out_stride, -7.0f), y_ref(n_act * a.out_stride, -7.0f);
        a.out = y_emu.data();
        MoeKernelsAmxEmulated().matmul(a);
        a.out = y_ref.data();
        MoeKernelsScalar().matmul(a);
        EXPECT_LT(RowsNmse(y_emu, y_ref, n_act, r1 - r0, a.out_stride), 1e-10);
        // The switch is MatmulArgs::bf16_tile_min_tokens (the plan's, which
        // CpuMoeBackend calibrates): one row above n_act, the AVX-512 BF16
        // kernel's bits; at n_act, the tiles' (another summation order).
        std::vector<float> y_dots(n_act * a.out_stride, -7.0f);
        a.out = y_dots.data();
        MoeKernelsAvx512().matmul(a);
        a.bf16_tile_min_tokens = n_act + 1;
        a.out = y_emu.data();
        MoeKernelsAmxEmulated().matmul(a);
        EXPECT_EQ(y_emu, y_dots) << "below its switch the amx matmul is the AVX-512 one";
        if (n_act >= 17) {
          a.bf16_tile_min_tokens = n_act;
          MoeKernelsAmxEmulated().matmul(a);
          EXPECT_NE(y_emu, y_dots) << "at its switch the amx matmul runs the tiles";
        }
      }
    }
  }
}

TEST_F(AmxEmulationTest, TileMatmulMatchesScalar) {
  std::mt19937 rng(21);
  const int64_t rows = 80, k = 512;  // 5 panels: pairs plus a single tail panel
  for (TensorType t : {TensorType::kQ4_K, TensorType::kQ6_K, TensorType::kQ8_0}) {
    const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
    const auto w = testing::MakeLayout({m}, t, MoeWeightLayout::kAmxInt8, rows, k, {true});
    for (int64_t n_act : {1, 17, 40}) {
      SCOPED_TRACE(::testing::Message() << "type " << static_cast<int>(t) << " n_act " << n_act);
      const int64_t stride = ActRowBytes(ActFormat::kQ8K, k);
      AlignedBuffer act((n_act + 32) * stride);
      std::memset(act.p.get(), 0x7f, act.size);  // padding rows hold junk
      std::normal_distribution<float> n(0.0f, 1.0f);
      std::vector<float> x(k);
      for (int64_t r = 0; r < n_act; ++r) {
        for (float& v : x) v = n(rng);
        MoeKernelsScalar().quantize(ActFormat::kQ8K, x.data(), act.p.get() + r * stride, k);
      }
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, 80}, {16, 64}, {48, 80}}) {
        MatmulArgs a;
        a.format = {t, MoeWeightLayout::kAmxInt8};
        a.w = static_cast<const uint8_t*>(w.ptrs[0]);
        a.n_rows = rows;
        a.k = k;
        a.row_begin = r0;
        a.row_end = r1;
        a.act = act.p.get();
        a.act_stride = stride;
        a.n_act = n_act;
        a.act_padded = true;
        a.out_stride = r1 - r0 + 3;
        std::vector<float> y_emu(n_act * a.out_stride, -7.0f), y_ref(n_act * a.out_stride, -7.0f);
        a.out = y_emu.data();
        MoeKernelsAmxEmulated().matmul(a);
        a.out = y_ref.data();
        MoeKernelsScalar().matmul(a);
        EXPECT_LT(RowsNmse(y_emu, y_ref, n_act, r1 - r0, a.out_stride), 1e-11)
            << "rows " << r0 << ".." << r1;
      }
    }
  }
}

// The tile path over panel16 weights (on-the-fly int8 conversion): the
// emulated AMX kernel must equal the scalar reference of the contract bitwise
// (same int8 weights, exact int32 sums, the same fp32 fix-up order), on odd
// panel counts, partial token blocks and both group sizes.
TEST_F(AmxEmulationTest, TileMatmulOverPanel16EqualsScalarBitwise) {
  std::mt19937 rng(23);
  const int64_t rows = 80, k = 1024;
  for (TensorType t :
       {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, TensorType::kQ8_0}) {
    const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
    const auto w = testing::MakeLayout({m}, t, MoeWeightLayout::kPanel16, rows, k, {true});
    for (int64_t group : {256, 512}) {
      for (int64_t n_act : {1, 3, 17, 40, 67}) {
        SCOPED_TRACE(::testing::Message()
                     << TraitsOf(t).name << " group " << group << " n_act " << n_act);
        const int64_t stride = TileActRowBytes(k, group) + 64;  // any stride >= the row
        const AlignedBuffer act = TileActivations(n_act, k, group, stride, rng);
        AlignedBuffer scratch(TileScratchBytes(group) + 64);
        for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, 80}, {16, 64}, {48, 80}, {32, 48}}) {
          MatmulArgs a = TileArgs(rows, k, r0, r1, act, stride, n_act, group, r1 - r0 + 3, scratch);
          a.format = {t, MoeWeightLayout::kPanel16};
          a.w = static_cast<const uint8_t*>(w.ptrs[0]);
          std::vector<float> y_emu(n_act * a.out_stride, -7.0f), y_ref(n_act * a.out_stride, -7.0f);
          a.out = y_emu.data();
          MoeKernelsAmxEmulated().tile_matmul(a);
          a.out = y_ref.data();
          MoeKernelsScalar().tile_matmul(a);
          double den = 0;
          for (int64_t i = 0; i < n_act; ++i) {
            for (int64_t r = 0; r < a.out_stride; ++r) {
              ASSERT_EQ(y_emu[i * a.out_stride + r], y_ref[i * a.out_stride + r])
                  << "token " << i << " row " << r0 + r;
              if (r < r1 - r0) den += std::fabs(y_ref[i * a.out_stride + r]);
            }
            for (int64_t r = r1 - r0; r < a.out_stride; ++r) {
              ASSERT_EQ(y_emu[i * a.out_stride + r], -7.0f) << "wrote past row_end";
            }
          }
          ASSERT_GT(den, 0.0);
        }
      }
    }
  }
}

// A tile cache (tile512: the conversion done once, BuildTileCacheTask) gives
// the tile kernels the bits of converting on the fly: the emulated AMX
// kernels (in-loop and phased) and the scalar reference, every tile format.
TEST_F(AmxEmulationTest, TileMatmulOverTheCacheEqualsTheConversionBitwise) {
  std::mt19937 rng(29);
  const int64_t rows = 80, k = 1536, group = 512;
  for (TensorType t :
       {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, TensorType::kQ8_0}) {
    const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
    const auto w = testing::MakeLayout({m}, t, MoeWeightLayout::kPanel16, rows, k, {true});
    const MoeMatrixFormat src{t, MoeWeightLayout::kPanel16};
    const auto cache_bytes = TileCacheBytes(src, rows, k);
    ASSERT_TRUE(cache_bytes.ok()) << cache_bytes.status();
    ASSERT_EQ(*cache_bytes, rows / 16 * (k / 512) * 8256);
    AlignedBuffer cache(*cache_bytes);
    std::memset(cache.p.get(), 0x5a, cache.size);
    for (int64_t task = TileCacheNumTasks(rows) - 1; task >= 0; --task) {
      BuildTileCacheTask(src, w.ptrs[0], rows, k, task, cache.p.get());
    }
    for (int64_t n_act : {1, 17, 67}) {
      SCOPED_TRACE(::testing::Message() << TraitsOf(t).name << " n_act " << n_act);
      const int64_t stride = TileActRowBytes(k, group);
      const AlignedBuffer act = TileActivations(n_act, k, group, stride, rng);
      const int64_t chunk = 64 << 10;
      AlignedBuffer scratch(TileScratchBytes(group, chunk, 256) + 64);
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, 80}, {16, 64}, {48, 80}}) {
        for (const bool phased : {false, true}) {
          MatmulArgs a = TileArgs(rows, k, r0, r1, act, stride, n_act, group, r1 - r0, scratch);
          a.tile_phased = phased;
          a.tile_chunk_bytes = chunk;
          a.tile_skew = 256;
          std::vector<float> y_conv(n_act * a.out_stride), y_cache(n_act * a.out_stride, -7.0f),
              y_scalar(n_act * a.out_stride, -7.0f);
          a.format = src;
          a.w = static_cast<const uint8_t*>(w.ptrs[0]);
          a.out = y_conv.data();
          MoeKernelsAmxEmulated().tile_matmul(a);
          a.format = {t, MoeWeightLayout::kTile512};
          a.w = cache.p.get();
          a.out = y_cache.data();
          MoeKernelsAmxEmulated().tile_matmul(a);
          a.out = y_scalar.data();
          MoeKernelsScalar().tile_matmul(a);
          ASSERT_EQ(0, std::memcmp(y_conv.data(), y_cache.data(), 4 * y_conv.size()))
              << "rows " << r0 << ".." << r1 << (phased ? " phased" : " in-loop");
          ASSERT_EQ(0, std::memcmp(y_conv.data(), y_scalar.data(), 4 * y_conv.size()))
              << "scalar reference over the cache, rows " << r0 << ".." << r1;
        }
      }
    }
  }
  // Not a tile-path source: refused with its name.
  const auto bf = TileCacheBytes({TensorType::kBF16, MoeWeightLayout::kPanel16}, 16, 512);
  ASSERT_FALSE(bf.ok());
  EXPECT_NE(std::string(bf.status().message()).find("bf16/panel16"), std::string::npos)
      << bf.status();
  EXPECT_FALSE(TileCacheBytes({TensorType::kQ4_K, MoeWeightLayout::kGguf}, 16, 512).ok());
  EXPECT_FALSE(TileCacheBytes({TensorType::kQ4_K, MoeWeightLayout::kPanel16}, 16, 768).ok());
}

// The AVX-512 converters (used by the AMX kernels) equal the scalar
// specification bitwise: int8 tiles and row scales, every format and group.
TEST_F(AmxEmulationTest, TileConversionEqualsScalarBitwise) {
  std::mt19937 rng(25);
  const int64_t rows = 48, k = 2048;
  for (TensorType t :
       {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, TensorType::kQ8_0}) {
    const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
    const auto w = testing::MakeLayout({m}, t, MoeWeightLayout::kPanel16, rows, k, {true});
    const MoeMatrixFormat f{t, MoeWeightLayout::kPanel16};
    for (int64_t group : {256, 512, 1024}) {
      std::vector<int8_t> ta(16 * group), tb(16 * group);
      float sa[16], sb[16];
      for (int64_t p = 0; p < rows / 16; ++p) {
        for (int64_t k0 = 0; k0 < k; k0 += group) {
          SCOPED_TRACE(::testing::Message()
                       << TraitsOf(t).name << " group " << group << " panel " << p << " k0 " << k0);
          MoeKernelsAmxEmulated().tile_convert(f, static_cast<const uint8_t*>(w.ptrs[0]), k, p, k0,
                                               group, ta.data(), sa);
          MoeKernelsScalar().tile_convert(f, static_cast<const uint8_t*>(w.ptrs[0]), k, p, k0,
                                          group, tb.data(), sb);
          ASSERT_EQ(0, std::memcmp(sa, sb, sizeof(sa)));
          ASSERT_EQ(ta, tb);
        }
      }
    }
  }
}

TEST_F(AmxEmulationTest, TileQuantizerEqualsScalarBitwise) {
  std::mt19937 rng(24);
  std::normal_distribution<float> n(0.0f, 3.0f);
  std::vector<float> x(2048);
  for (float& v : x) v = n(rng);
  std::fill(x.begin() + 512, x.begin() + 1024, 0.0f);  // an all-zero group
  x[3] = 1e-30f;
  for (int64_t group : {256, 512, 1024}) {
    std::vector<int8_t> qa(2048), qb(2048);
    std::vector<float> da(2048 / group), db(2048 / group);
    MoeKernelsAmxEmulated().quantize_tile(x.data(), qa.data(), da.data(), 2048, group);
    MoeKernelsScalar().quantize_tile(x.data(), qb.data(), db.data(), 2048, group);
    EXPECT_EQ(qa, qb) << group;
    EXPECT_EQ(da, db) << group;
  }
}

TEST_F(AmxEmulationTest, LayerWithTilePrefillMatchesScalarVariant) {
  const MoeShape shape{256, 512, 16, 6};
  const auto L = testing::MakeTestLayer(shape, TensorType::kQ4_K, TensorType::kQ6_K, 31);
  const std::vector<bool> owned(16, true);
  auto mk = [&](MoeWeightLayout lay, bool down) {
    return down ? testing::MakeLayout(L.down, TensorType::kQ6_K, lay, 256, 512, owned)
                : testing::MakeLayout(L.gate, TensorType::kQ4_K, lay, 512, 256, owned);
  };
  auto gate = mk(MoeWeightLayout::kPanel16, false);
  auto up =
      testing::MakeLayout(L.up, TensorType::kQ4_K, MoeWeightLayout::kPanel16, 512, 256, owned);
  auto down = mk(MoeWeightLayout::kPanel16, true);
  auto gate_p = mk(MoeWeightLayout::kAmxInt8, false);
  auto up_p =
      testing::MakeLayout(L.up, TensorType::kQ4_K, MoeWeightLayout::kAmxInt8, 512, 256, owned);
  auto down_p = mk(MoeWeightLayout::kAmxInt8, true);
  MoeLayerFormat f;
  f.gate = f.up = {TensorType::kQ4_K, MoeWeightLayout::kPanel16};
  f.down = {TensorType::kQ6_K, MoeWeightLayout::kPanel16};
  f.has_prefill = true;
  f.gate_prefill = f.up_prefill = {TensorType::kQ4_K, MoeWeightLayout::kAmxInt8};
  f.down_prefill = {TensorType::kQ6_K, MoeWeightLayout::kAmxInt8};
  MoeLayerWeights w;
  w.gate = {f.gate, gate.ptrs.data()};
  w.up = {f.up, up.ptrs.data()};
  w.down = {f.down, down.ptrs.data()};
  w.gate_prefill = {f.gate_prefill, gate_p.ptrs.data()};
  w.up_prefill = {f.up_prefill, up_p.ptrs.data()};
  w.down_prefill = {f.down_prefill, down_p.ptrs.data()};

  const int64_t n_tokens = 100;
  std::mt19937 rng(5);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> x(n_tokens * 256), wt(n_tokens * 6, 0.3f);
  for (float& v : x) v = n(rng);
  std::vector<int32_t> ids;
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int k = 0; k < 6; ++k) ids.push_back(static_cast<int32_t>((t * 7 + k * 3 + t / 5) % 16));
  }
  std::vector<float> y[2];
  for (int which = 0; which < 2; ++which) {
    MoePlanOptions o;
    o.max_tokens = n_tokens;
    o.prefill_min_tokens = 16;
    o.force_variant = true;
    o.variant = which == 0 ? CpuVariant::kScalar : CpuVariant::kAvx512;
    auto plan = MakeMoePlan(shape, f, o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    if (which == 1) plan->kernels = &MoeKernelsAmxEmulated();  // test-only substitution
    AlignedBuffer ws(MoeWorkspaceSize(*plan));
    std::memset(ws.p.get(), 0xC3, ws.size);
    y[which].assign(n_tokens * 256, -1.0f);
    auto run = MoeRun::Begin(*plan, w, {n_tokens, x.data(), ids.data(), wt.data(), y[which].data()},
                             ws.p.get(), ws.size);
    ASSERT_TRUE(run.ok()) << run.status();
    EXPECT_GT(run->num_prefill_experts(), 8);
    for (int s = 0; s < MoeRun::kNumStages; ++s) RunMoeStage(*run, s, 0, 1);
  }
  const std::vector<double> ref =
      testing::ReferenceMoe(L, owned, n_tokens, x.data(), ids.data(), wt.data());
  std::vector<double> ys(y[0].begin(), y[0].end());
  const double nmse_ref = testing::Nmse(y[1].data(), ref);
  const double nmse_scalar = testing::Nmse(y[1].data(), ys);
  std::printf("  amx-emulated layer: nmse vs float64 %.3g, vs scalar variant %.3g\n", nmse_ref,
              nmse_scalar);
  EXPECT_LT(nmse_ref, 1.5e-3);
  EXPECT_LT(nmse_scalar, 1e-6);
}

// The whole layer through MoeRun with the tile path over the panel16 weights
// (no second copy), the emulated AMX table substituted: against the scalar
// variant's reference of the same path and against float64, on awkward token
// counts (a 255-token run splits experts into token blocks of 64).
TEST_F(AmxEmulationTest, LayerWithTilePathOverPanel16MatchesScalarVariant) {
  const MoeShape shape{512, 1024, 16, 6};
  const auto L = testing::MakeTestLayer(shape, TensorType::kQ4_K, TensorType::kQ6_K, 37);
  std::vector<bool> owned(16, true);
  owned[5] = false;
  auto gate =
      testing::MakeLayout(L.gate, TensorType::kQ4_K, MoeWeightLayout::kPanel16, 1024, 512, owned);
  auto up =
      testing::MakeLayout(L.up, TensorType::kQ4_K, MoeWeightLayout::kPanel16, 1024, 512, owned);
  auto down =
      testing::MakeLayout(L.down, TensorType::kQ6_K, MoeWeightLayout::kPanel16, 512, 1024, owned);
  MoeLayerFormat f;
  f.gate = f.up = {TensorType::kQ4_K, MoeWeightLayout::kPanel16};
  f.down = {TensorType::kQ6_K, MoeWeightLayout::kPanel16};
  MoeLayerWeights w;
  w.gate = {f.gate, gate.ptrs.data()};
  w.up = {f.up, up.ptrs.data()};
  w.down = {f.down, down.ptrs.data()};
  uint32_t seed = 40;
  for (int64_t n_tokens : {1, 3, 17, 255}) {
    SCOPED_TRACE(n_tokens);
    std::mt19937 rng(seed++);
    std::normal_distribution<float> n(0.0f, 1.0f);
    std::uniform_real_distribution<float> uw(0.05f, 1.0f);
    std::vector<float> x(n_tokens * 512), wt;
    for (float& v : x) v = n(rng);
    std::vector<int32_t> ids;
    std::vector<int32_t> perm(16);
    for (int64_t t = 0; t < n_tokens; ++t) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int k = 0; k < 6; ++k) {
        ids.push_back(perm[k]);
        wt.push_back(uw(rng));
      }
    }
    std::vector<float> y[2];
    int64_t tiles = 0;
    for (int which = 0; which < 2; ++which) {
      MoePlanOptions o;
      o.max_tokens = n_tokens;
      o.max_workers = 2;
      o.prefill_min_tokens = 1;
      o.tile_prefill = true;
      o.tile_max_tokens = 64;
      o.force_variant = true;
      o.variant = CpuVariant::kScalar;  // has the reference tile kernel
      auto plan = MakeMoePlan(shape, f, o);
      ASSERT_TRUE(plan.ok()) << plan.status();
      if (which == 1) plan->kernels = &MoeKernelsAmxEmulated();  // test-only substitution
      ASSERT_TRUE(plan->tile);
      AlignedBuffer ws(MoeWorkspaceSize(*plan));
      std::memset(ws.p.get(), 0xC3, ws.size);
      y[which].assign(n_tokens * 512, -1.0f);
      auto run =
          MoeRun::Begin(*plan, w, {n_tokens, x.data(), ids.data(), wt.data(), y[which].data()},
                        ws.p.get(), ws.size);
      ASSERT_TRUE(run.ok()) << run.status();
      tiles = run->num_prefill_experts();
      EXPECT_EQ(run->num_prefill_experts(), run->num_active_experts());
      for (int s = 0; s < MoeRun::kNumStages; ++s) RunMoeStage(*run, s, 0, 1);
    }
    const std::vector<double> ref =
        testing::ReferenceMoe(L, owned, n_tokens, x.data(), ids.data(), wt.data());
    std::vector<double> ys(y[0].begin(), y[0].end());
    const double nmse_ref = testing::Nmse(y[1].data(), ref);
    const double nmse_scalar = testing::Nmse(y[1].data(), ys);
    std::printf(
        "  amx-emulated tile layer t%lld (%lld experts on tiles): nmse vs float64 %.3g, vs "
        "scalar variant %.3g\n",
        static_cast<long long>(n_tokens), static_cast<long long>(tiles), nmse_ref, nmse_scalar);
    EXPECT_LT(nmse_ref, 1.5e-3);
    EXPECT_LT(nmse_scalar, 1e-6);
  }
}

// The phased tile kernel (convert a chunk, then its tiles; deferred fix-ups)
// equals the scalar reference of the contract bitwise, and so the in-loop
// kernel too: awkward token counts (1, 3, 17, 255), partial pairs (a single
// tail panel), chunks that split the pairs, the groups or both, skews, and
// the streaming prefetch (tile_stream_lines: hints only, so the same bits),
// the next call's bytes streamed during the last chunk (next_w), and with the
// phase ticks collected (diagnostics only: the same bits, and every phase
// counted).
TEST_F(AmxEmulationTest, PhasedTileMatmulEqualsScalarBitwise) {
  std::mt19937 rng(29);
  const int64_t rows = 112, k = 1536;  // 7 panels; 3 groups of 512, 6 of 256
  struct Cfg {
    int64_t chunk_bytes, groups, skew, stream;
  };
  const Cfg cfgs[] = {{512 << 10, 0, 256, 0},  // everything in one chunk
                      {32 << 10, 0, 0, 0},     // one item per chunk
                      {48 << 10, 2, 192, 0},   // groups split 2 + 1 (or 2 + 2 + 2)
                      {96 << 10, 0, 64, 0},    // pairs split, groups whole where they fit
                      // Streamed: whole rows per chunk (the cursor) ...
                      {512 << 10, 0, 0, 1},
                      {96 << 10, 0, 256, 8},  // pairs split
                      // ... and groups split (each next slice prefetched).
                      {32 << 10, 0, 256, 64},
                      {48 << 10, 2, 0, 64}};
  for (TensorType t : {TensorType::kQ4_K, TensorType::kQ6_K, TensorType::kQ8_0}) {
    const std::vector<uint8_t> m = testing::RandomMatrix(t, rows, k, 1.0f, rng);
    const auto w = testing::MakeLayout({m}, t, MoeWeightLayout::kPanel16, rows, k, {true});
    for (int64_t group : {256, 512}) {
      for (int64_t n_act : {1, 3, 17, 255}) {
        const int64_t stride = TileActRowBytes(k, group);
        const AlignedBuffer act = TileActivations(n_act, k, group, stride, rng);
        for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, 112}, {16, 80}, {96, 112}}) {
          AlignedBuffer ref_scratch(TileScratchBytes(group) + 64);
          MatmulArgs a =
              TileArgs(rows, k, r0, r1, act, stride, n_act, group, r1 - r0 + 5, ref_scratch);
          const AlignedBuffer act_kmajor = KStepMajor(act, n_act, stride);
          a.format = {t, MoeWeightLayout::kPanel16};
          a.w = static_cast<const uint8_t*>(w.ptrs[0]);
          std::vector<float> y_ref(n_act * a.out_stride, -7.0f);
          a.out = y_ref.data();
          MoeKernelsScalar().tile_matmul(a);
          for (const Cfg& c : cfgs) {
            SCOPED_TRACE(::testing::Message()
                         << TraitsOf(t).name << " group " << group << " n_act " << n_act << " rows "
                         << r0 << ".." << r1 << " chunk " << c.chunk_bytes << " groups " << c.groups
                         << " skew " << c.skew << " stream " << c.stream);
            for (int run = 0; run < 4; ++run) {
              // The phased and in-loop kernels over the rows, then over the
              // same rows k-step-major.
              const bool phased = run % 2 == 0, kmajor = run >= 2;
              a.act = kmajor ? act_kmajor.p.get() : act.p.get();
              a.act_stride = kmajor ? 64 : stride;
              a.act_kstep_stride = kmajor ? 64 * n_act : 64;
              AlignedBuffer scratch(TileScratchBytes(group, phased ? c.chunk_bytes : 0, c.skew));
              a.scratch = scratch.p.get();
              a.scratch_bytes = static_cast<int64_t>(scratch.size);
              a.tile_phased = phased;
              a.tile_chunk_bytes = c.chunk_bytes;
              a.tile_chunk_groups = c.groups;
              a.tile_skew = c.skew;
              a.tile_prefetch = c.skew != 0;
              a.tile_stream_lines = c.stream;
              // The next call's bytes (prefetched during the last chunk).
              a.next_w = c.stream > 0 ? m.data() : nullptr;
              a.next_w_bytes = c.stream > 0 ? static_cast<int64_t>(m.size()) : 0;
              int64_t ticks[3] = {0, 0, 0};
              a.tile_phase_ticks = c.stream == 64 ? ticks : nullptr;
              std::vector<float> y(n_act * a.out_stride, -7.0f);
              a.out = y.data();
              MoeKernelsAmxEmulated().tile_matmul(a);
              ASSERT_EQ(0, std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(float)))
                  << (phased ? "phased" : "in-loop") << " kernel"
                  << (kmajor ? " over k-step-major rows" : "")
                  << " differs from the scalar reference";
              if (kmajor && c.stream == 0 && c.skew == 256 && c.groups == 0) {
                // The reference itself over the k-step-major rows.
                std::vector<float> ys(n_act * a.out_stride, -7.0f);
                a.out = ys.data();
                MoeKernelsScalar().tile_matmul(a);
                ASSERT_EQ(0, std::memcmp(ys.data(), y_ref.data(), ys.size() * sizeof(float)))
                    << "scalar reference over k-step-major rows";
              }
              if (phased && a.tile_phase_ticks != nullptr) {
                EXPECT_GT(ticks[0], 0) << "conversion ticks";
                EXPECT_GT(ticks[1], 0) << "tile ticks";
                EXPECT_GT(ticks[2], 0) << "fix-up ticks";
              }
            }
          }
        }
      }
    }
  }
}

// Layers whose experts have very different token counts (1, 3, 17, 255 and
// others; max_tokens 300): the emulated AMX table, phased and in-loop, with
// 1 and 3 workers (stages run in reverse worker order), against the scalar variant (same plan) and
// each other.
TEST_F(AmxEmulationTest, LayerPhasedAndInLoopAgreeOnUnequalExperts) {
  const MoeShape shape{512, 1024, 8, 2};
  const auto L = testing::MakeTestLayer(shape, TensorType::kQ4_K, TensorType::kQ6_K, 41);
  const std::vector<bool> owned(8, true);
  auto gate =
      testing::MakeLayout(L.gate, TensorType::kQ4_K, MoeWeightLayout::kPanel16, 1024, 512, owned);
  auto up =
      testing::MakeLayout(L.up, TensorType::kQ4_K, MoeWeightLayout::kPanel16, 1024, 512, owned);
  auto down =
      testing::MakeLayout(L.down, TensorType::kQ6_K, MoeWeightLayout::kPanel16, 512, 1024, owned);
  MoeLayerFormat f;
  f.gate = f.up = {TensorType::kQ4_K, MoeWeightLayout::kPanel16};
  f.down = {TensorType::kQ6_K, MoeWeightLayout::kPanel16};
  MoeLayerWeights w;
  w.gate = {f.gate, gate.ptrs.data()};
  w.up = {f.up, up.ptrs.data()};
  w.down = {f.down, down.ptrs.data()};
  // Slot 0 of token t: expert 0 for t < 255, else 6; slot 1 cycles through
  // experts 1..5 and 7 with counts 1, 3, 17, ... (expert 6: rest).
  const int64_t n_tokens = 300;
  std::vector<int32_t> ids(2 * n_tokens);
  const int64_t want[] = {1, 3, 17, 64, 33};  // experts 1..5 in slot 1
  int64_t t = 0;
  for (int64_t e = 0; e < 5; ++e) {
    for (int64_t i = 0; i < want[e]; ++i, ++t) ids[2 * t + 1] = static_cast<int32_t>(e + 1);
  }
  for (; t < n_tokens; ++t) ids[2 * t + 1] = 7;
  for (t = 0; t < n_tokens; ++t) ids[2 * t] = t < 255 ? 0 : 6;
  std::mt19937 rng(43);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::uniform_real_distribution<float> uw(0.05f, 1.0f);
  std::vector<float> x(n_tokens * 512), wt(2 * n_tokens);
  for (float& v : x) v = n(rng);
  for (float& v : wt) v = uw(rng);
  auto run_layer = [&](const char* spec, bool emulated, int nth) {
    MoePlanOptions o;
    o.max_tokens = n_tokens;
    o.max_workers = 3;
    o.prefill_min_tokens = 1;
    o.tile_prefill = true;
    o.force_variant = true;
    o.variant = CpuVariant::kScalar;
    EXPECT_TRUE(ApplyMoeTileSpec(spec, &o).ok()) << spec;
    auto plan = MakeMoePlan(shape, f, o);
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return std::vector<float>();
    if (emulated) plan->kernels = &MoeKernelsAmxEmulated();  // test-only substitution
    AlignedBuffer ws(MoeWorkspaceSize(*plan));
    std::memset(ws.p.get(), 0xC3, ws.size);
    std::vector<float> y(n_tokens * 512, -1.0f);
    auto run = MoeRun::Begin(*plan, w, {n_tokens, x.data(), ids.data(), wt.data(), y.data()},
                             ws.p.get(), ws.size);
    EXPECT_TRUE(run.ok()) << run.status();
    if (!run.ok()) return y;
    EXPECT_EQ(run->num_prefill_experts(), 8);
    for (int s = 0; s < MoeRun::kNumStages; ++s) {
      for (int ith = nth - 1; ith >= 0; --ith) RunMoeStage(*run, s, ith, nth);
    }
    return y;
  };
  const std::vector<double> ref =
      testing::ReferenceMoe(L, owned, n_tokens, x.data(), ids.data(), wt.data());
  const std::vector<float> base = run_layer("phased", true, 1);
  const std::vector<float> scalar = run_layer("phased", false, 1);
  std::vector<double> sd(scalar.begin(), scalar.end());
  EXPECT_LT(testing::Nmse(base.data(), ref), 1.5e-3);
  EXPECT_LT(testing::Nmse(base.data(), sd), 1e-6);
  for (const char* spec :
       {"phased:chunk=32:skew=0", "phased:chunk=64:groups=1:skew=64",
        "phased:chunk=4096:ff=512:maxtok=96", "inloop:skew=0:pad=0", "inloop:skew=256",
        "phased:pad=0:pf=0", "inloop:maxtok=64:down=128", "phased:chunk=32:stream=0",
        "phased:stream=8", "phased:next=0", "phased:chunk=1024:stream=0:next=1", "phased:kmajor=0",
        "inloop:kmajor=0:maxtok=64", "phased:tail=0", "phased:tail=16:tailn=4",
        "phased:down=128:tail=48", "inloop:maxtok=64:down=128:tail=16:tailn=4"}) {
    for (int nth : {1, 3}) {
      SCOPED_TRACE(::testing::Message() << spec << " workers " << nth);
      const std::vector<float> y = run_layer(spec, true, nth);
      ASSERT_EQ(y.size(), base.size());
      EXPECT_EQ(0, std::memcmp(y.data(), base.data(), y.size() * sizeof(float)));
    }
  }
}

TEST(MoeTileSpecTest, ParsesAndRejects) {
  MoePlanOptions o;
  ASSERT_TRUE(ApplyMoeTileSpec("inloop:skew=0:group=1024:ff=1024:maxtok=64:down=256", &o).ok());
  EXPECT_FALSE(o.tile_phased);
  EXPECT_EQ(o.tile_skew, 0);
  EXPECT_EQ(o.tile_group, 1024);
  EXPECT_EQ(o.tile_ff_rows, 1024);
  EXPECT_EQ(o.tile_max_tokens, 64);
  EXPECT_EQ(o.prefill_down_rows_per_task, 256);
  ASSERT_TRUE(ApplyMoeTileSpec("phased:chunk=256:groups=2:next=0", &o).ok());
  EXPECT_TRUE(o.tile_phased);
  EXPECT_EQ(o.tile_chunk_kib, 256);
  EXPECT_EQ(o.tile_chunk_groups, 2);
  EXPECT_FALSE(o.tile_stream_next);
  EXPECT_EQ(MoeTileSpec(o),
            "phased:chunk=256:groups=2:pf=0:stream=64:next=0:skew=0:pad=16:group=1024:ff=1024:"
            "maxtok=64:down=256:kmajor=1:tail=32:tailn=0");
  ASSERT_TRUE(ApplyMoeTileSpec("inloop:kmajor=0", &o).ok());
  EXPECT_FALSE(o.tile_act_kmajor);
  ASSERT_TRUE(ApplyMoeTileSpec("phased:kmajor=1", &o).ok());
  EXPECT_TRUE(o.tile_act_kmajor);
  const MoePlanOptions before = o;
  for (const char* bad : {"fast", "phased:pf=2", "phased:chunk", "phased:chunk=x", "phased:size=3",
                          "phased:next=2", "phased:kmajor=2", "phased:tail=x", ""}) {
    const absl::Status s = ApplyMoeTileSpec(bad, &o);
    EXPECT_FALSE(s.ok()) << bad;
    EXPECT_EQ(MoeTileSpec(o), MoeTileSpec(before)) << "changed by a bad spec: " << bad;
  }
  // Values are checked by the plan.
  const MoeShape shape{512, 1024, 8, 2};
  MoeLayerFormat f;
  f.gate = f.up = {TensorType::kQ4_K, MoeWeightLayout::kPanel16};
  f.down = {TensorType::kQ6_K, MoeWeightLayout::kPanel16};
  for (const char* bad :
       {"phased:chunk=8", "phased:pad=8", "phased:skew=100", "phased:skew=8192", "inloop:groups=-1",
        "phased:stream=-1", "phased:stream=5000", "phased:tail=8", "phased:tail=-16",
        "phased:tail=16:tailn=100", "phased:tail=16:tailn=-1", "phased:tail=0:tailn=-2"}) {
    MoePlanOptions p;
    p.tile_prefill = true;
    p.force_variant = true;
    p.variant = CpuVariant::kScalar;
    ASSERT_TRUE(ApplyMoeTileSpec(bad, &p).ok()) << bad;
    EXPECT_FALSE(MakeMoePlan(shape, f, p).ok()) << bad;
  }
  // The stage-2 tail: the last tailn tasks' rows (default max_workers / 2 of
  // them) in tasks of `tail` rows, never more than a large task's.
  for (const auto& [spec, rows, span] : std::vector<std::tuple<const char*, int64_t, int64_t>>{
           {"phased:down=128:tail=48", 48, 128},
           {"phased:down=128:tail=48:tailn=3", 48, 384},
           {"phased:down=64:tail=256", 64, 64},
           {"phased:down=128", 32, 128},
           {"phased:down=128:tail=0", 0, 0}}) {
    MoePlanOptions p;
    p.tile_prefill = true;
    p.max_workers = 3;
    p.force_variant = true;
    p.variant = CpuVariant::kScalar;
    ASSERT_TRUE(ApplyMoeTileSpec(spec, &p).ok()) << spec;
    const absl::StatusOr<MoePlan> plan = MakeMoePlan(shape, f, p);
    ASSERT_TRUE(plan.ok()) << spec << ": " << plan.status();
    EXPECT_EQ(plan->prefill_down_tail_rows, rows) << spec;
    EXPECT_EQ(plan->prefill_down_tail_span, span) << spec;
  }
}

// DeepSeek-V3's layer as panel16 Q4_K gate/up and Q6_K down, and plan options
// on the scalar variant for `workers` workers.
MoeLayerFormat DeepSeekV3PanelFormat() {
  MoeLayerFormat f;
  f.gate = f.up = {TensorType::kQ4_K, MoeWeightLayout::kPanel16};
  f.down = {TensorType::kQ6_K, MoeWeightLayout::kPanel16};
  return f;
}
MoePlanOptions ScalarPlanOptions(int workers) {
  MoePlanOptions o;
  o.force_variant = true;
  o.variant = CpuVariant::kScalar;
  o.max_workers = workers;
  return o;
}
constexpr MoeShape kDeepSeekV3Shape{7168, 2048, 256, 8};

// Stage 2 of prefill runs: by default at least 4 tasks per worker (so that
// work stealing can move rows off slow cores), at most 512 rows per task.
TEST(MoePlanTest, PrefillDownRowsGiveEveryWorkerSeveralTasks) {
  const MoeShape shape = kDeepSeekV3Shape;
  for (const auto& [workers, rows] : {std::pair{1, 512}, {2, 512}, {16, 112}, {32, 32}}) {
    MoePlanOptions o = ScalarPlanOptions(workers);
    o.tile_prefill = true;
    auto plan = MakeMoePlan(shape, DeepSeekV3PanelFormat(), o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->prefill_down_rows, rows) << workers << " workers";
    EXPECT_GE(shape.n_embd / plan->prefill_down_rows, std::min<int64_t>(4 * workers, 14));
  }
}

// Stage 2 of decode runs: by default at least 6 tasks per worker and at most
// 512 rows, as long as that allows (one stream per expert per task); a given
// value is used as it is, and one that is not a multiple of 16 dividing
// n_embd is refused by name.
TEST(MoePlanTest, DecodeDownRowsDefaultAndGiven) {
  const MoeShape shape = kDeepSeekV3Shape;
  for (const auto& [workers, rows] : {std::pair{1, 512}, {2, 512}, {3, 256}, {16, 64}, {32, 32}}) {
    MoePlanOptions o = ScalarPlanOptions(workers);
    auto plan = MakeMoePlan(shape, DeepSeekV3PanelFormat(), o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->decode_down_rows, rows) << workers << " workers";
    EXPECT_GE(shape.n_embd / plan->decode_down_rows, std::min<int64_t>(6 * workers, 14));
    o.down_rows_per_task = 64;
    plan = MakeMoePlan(shape, DeepSeekV3PanelFormat(), o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->decode_down_rows, 64);
  }
  for (int64_t bad : {-16, 24, 7168 + 16, 1024 + 16}) {
    MoePlanOptions o = ScalarPlanOptions(1);
    o.down_rows_per_task = bad;
    const auto plan = MakeMoePlan(shape, DeepSeekV3PanelFormat(), o);
    ASSERT_FALSE(plan.ok()) << bad;
    EXPECT_NE(plan.status().message().find("down_rows_per_task"), std::string::npos)
        << plan.status();
  }
}

}  // namespace
}  // namespace ktx::kernels::moe
