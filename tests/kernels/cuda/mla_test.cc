// MLA attention (absorbed form, paged bf16 latent cache) on the GPU against a
// float64 reference, for decode batches of 1, 3 and 17 sequences over
// contexts of 1, 63 and 1000 rows, causal prefill and chunked prefill, at
// DeepSeek-V3 width (128 heads, 512 + 64) and at odd widths. Pages are
// assigned in shuffled order and every unused cache slot holds NaN, so a
// wrong page lookup shows. Tolerances: the kernel accumulates in F32 from
// bf16 rows (exact in F32); the scores' rounding (~1e-6 relative) moves the
// softmax weights by ~1e-6, so the F32 output is held to 2e-5 relative L2 per
// (query, head); the bf16 output adds one rounding (2^-9), held to 3e-3.
#include "kernels/cuda/mla.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/models/reference_ops.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/kernels/cuda/mla_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::Bf16BitsToFloat;
using cuda_test::DeviceArray;
using cuda_test::Dims;
using cuda_test::FloatToBf16Bits;
using cuda_test::kNanBf16;
using cuda_test::MakeCache;
using cuda_test::PagedCache;
using cuda_test::Reference;

struct Query {
  int32_t seq, pos;
};

// Runs MlaAttention for `queries` under `plan_kind` (0: automatic for 132
// multiprocessors, 1: no split, 2: as many splits as possible) and checks
// sampled heads against the reference and every head for being written.
void CheckAttention(std::mt19937& rng, const Dims& dims, PagedCache& cache,
                    const std::vector<Query>& queries, int plan_kind) {
  const int32_t rw = dims.kv_lora + dims.n_rot;
  const int64_t n_q = static_cast<int64_t>(queries.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(rw)) * 2.0f;
  const std::vector<float> q = cuda_test::RandomF32(rng, n_q * dims.n_head * rw, 1.0f);
  std::vector<int32_t> q_seq(n_q), q_pos(n_q);
  int64_t max_len = 1;
  for (int64_t i = 0; i < n_q; ++i) {
    q_seq[i] = queries[i].seq;
    q_pos[i] = queries[i].pos;
    max_len = std::max<int64_t>(max_len, queries[i].pos + 1);
  }
  DeviceArray<float> d_q(q);
  DeviceArray<int32_t> d_seq(q_seq), d_pos(q_pos), d_table(cache.block_table);
  DeviceArray<uint16_t> d_kv(cache.data);
  const int64_t out_stride = int64_t{dims.n_head} * dims.kv_lora;
  DeviceArray<float> d_out(n_q * out_stride);
  DeviceArray<uint16_t> d_out_bf16(n_q * out_stride);
  d_out.Poison();
  d_out_bf16.Poison();

  MlaAttentionArgs a;
  a.q = d_q.get();
  a.q_stride = int64_t{dims.n_head} * rw;
  a.n_q = n_q;
  a.n_head = dims.n_head;
  a.kv_lora = dims.kv_lora;
  a.n_rot = dims.n_rot;
  a.scale = scale;
  a.q_seq = d_seq.get();
  a.q_pos = d_pos.get();
  a.kv.data = reinterpret_cast<__nv_bfloat16*>(d_kv.get());
  a.kv.page_stride = int64_t{cache.page_size} * rw;
  a.kv.page_size = cache.page_size;
  a.kv.block_table = d_table.get();
  a.kv.block_table_stride = cache.max_pages;
  a.out_f32 = d_out.get();
  a.out_f32_stride = out_stride;
  a.out_bf16 = reinterpret_cast<__nv_bfloat16*>(d_out_bf16.get());
  a.out_bf16_stride = out_stride;
  const size_t capacity = plan_kind == 1 ? 0 : size_t{1} << 30;
  const int32_t n_sm = plan_kind == 2 ? 100000 : 132;
  const MlaAttentionPlan planned =
      PlanMlaAttention(n_q, dims.n_head, dims.kv_lora, dims.n_rot, max_len, n_sm, capacity);
  // Every kernel where the tensor-core ones apply (DeepSeek widths): the
  // CUDA-core one (form 0) and the tensor-core forms 1-3 (mla.cu).
  for (const int form : {0, 1, 2, 3}) {
    const bool tensor_cores = form != 0;
    if (tensor_cores && !planned.tensor_cores) continue;
    MlaAttentionPlan plan = planned;
    plan.tensor_cores = tensor_cores;
    if (tensor_cores) plan.tc_tile_groups = form;
    // hi/lo bf16 splitting leaves ~2^-16 relative per product: 1e-4 after the softmax.
    const double tol = tensor_cores ? 1e-4 : 2e-5;
    SCOPED_TRACE(testing::Message()
                 << "plan: tensor cores " << plan.tensor_cores << " groups " << plan.tc_tile_groups
                 << " heads/block " << plan.heads_per_block << " splits " << plan.n_splits
                 << " split_len " << plan.split_len);
    ASSERT_GE(static_cast<int64_t>(plan.n_splits) * plan.split_len, max_len);
    if (plan_kind == 1) {
      ASSERT_EQ(plan.n_splits, 1);
    }
    d_out.Poison();
    d_out_bf16.Poison();
    DeviceArray<uint8_t> workspace(std::max<size_t>(plan.workspace_bytes, 1));
    workspace.Poison();
    ASSERT_CUDA_OK(MlaAttention(a, plan, workspace.get(), nullptr));
    const std::vector<float> out = d_out.Download();
    const std::vector<uint16_t> out_bf16 = d_out_bf16.Download();
    for (size_t i = 0; i < out.size(); ++i) {
      ASSERT_FALSE(std::isnan(out[i])) << "output element " << i << " not written (or NaN)";
      ASSERT_NE(out_bf16[i], kNanBf16) << "bf16 output element " << i;
    }
    std::vector<int32_t> heads = {0, dims.n_head - 1, dims.n_head / 2 + 1};
    for (int64_t i = 0; i < n_q; ++i) {
      for (int32_t h : heads) {
        if (h >= dims.n_head) continue;
        const std::vector<double> ref = Reference(
            cache, q_seq[i], q_pos[i], q.data() + (i * dims.n_head + h) * rw, dims.kv_lora, scale);
        const cuda_test::HeadError err = cuda_test::CompareHead(
            ref, out.data() + i * out_stride + h * dims.kv_lora,
            out_bf16.data() + i * out_stride + h * dims.kv_lora, dims.kv_lora);
        ASSERT_LE(err.f32, tol) << "query " << i << " (seq " << q_seq[i] << ", pos " << q_pos[i]
                                << ") head " << h;
        ASSERT_LE(err.bf16, 3e-3) << "bf16, query " << i << " head " << h;
      }
    }
  }
}

class MlaAttentionTest : public ::testing::TestWithParam<Dims> {};

TEST_P(MlaAttentionTest, DecodeBatchesOverPagedContexts) {
  KTX_SKIP_WITHOUT_GPU();
  const Dims dims = GetParam();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed << " heads " << dims.n_head << " kv_lora "
                                  << dims.kv_lora << " n_rot " << dims.n_rot);
  std::mt19937 rng(seed);
  for (const int64_t batch : {1, 3, 17}) {
    for (const int64_t ctx : {1, 63, 1000}) {
      SCOPED_TRACE(testing::Message() << "batch " << batch << " context " << ctx);
      std::vector<int64_t> lengths(batch);
      for (int64_t b = 0; b < batch; ++b) lengths[b] = b == 0 ? ctx : 1 + rng() % ctx;
      PagedCache cache = MakeCache(rng, lengths, 16, dims.kv_lora + dims.n_rot, true);
      std::vector<Query> queries;
      for (int64_t b = 0; b < batch; ++b) {
        queries.push_back({static_cast<int32_t>(b), static_cast<int32_t>(lengths[b] - 1)});
      }
      for (int plan_kind = 0; plan_kind < 3; ++plan_kind) {
        CheckAttention(rng, dims, cache, queries, plan_kind);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_P(MlaAttentionTest, CausalAndChunkedPrefill) {
  KTX_SKIP_WITHOUT_GPU();
  const Dims dims = GetParam();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  // One prompt of 63 tokens, every position a query (causal); then a chunk of
  // 17 tokens at positions 46..62 after 46 cached ones; then two sequences
  // mixed in one batch (prefill of one, decode of the other).
  PagedCache cache = MakeCache(rng, {63, 1000}, 64, dims.kv_lora + dims.n_rot, true);
  std::vector<Query> full, chunk, mixed;
  for (int32_t p = 0; p < 63; ++p) full.push_back({0, p});
  for (int32_t p = 46; p < 63; ++p) chunk.push_back({0, p});
  mixed = chunk;
  mixed.push_back({1, 999});
  for (const auto* queries : {&full, &chunk, &mixed}) {
    CheckAttention(rng, dims, cache, *queries, 0);
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Widths, MlaAttentionTest,
                         ::testing::Values(Dims{128, 512, 64}, Dims{4, 64, 16}, Dims{20, 96, 32},
                                           Dims{48, 128, 32}),
                         [](const auto& info) {
                           return "h" + std::to_string(info.param.n_head) + "_kvl" +
                                  std::to_string(info.param.kv_lora) + "_rot" +
                                  std::to_string(info.param.n_rot);
                         });

// The plan alone (host code: runs without a GPU too). Splits fill whole
// waves of one tensor-core block per multiprocessor with the fewest splits;
// the two-group forms where their shared memory fits, form 3 for ranges of
// more than 1024 rows per block.
TEST(MlaAttentionPlan, SplitsFillWholeWavesAndTheFormFitsSharedMemory) {
  constexpr size_t kGiB = size_t{1} << 30;
  struct Case {
    int64_t n_q, n_kv;
    int32_t n_splits, split_len, form;
  };
  // DeepSeek-V3: 128 heads = 8 blocks of 16 per query, 132 SMs.
  for (const Case& c :
       {Case{1, 8192, 16, 512, 2}, Case{4, 8192, 4, 2048, 3}, Case{5, 8192, 3, 2752, 3},
        Case{16, 8192, 1, 8192, 3}, Case{17, 8192, 1, 8192, 3}, Case{16, 1024, 1, 1024, 2}}) {
    const MlaAttentionPlan p = PlanMlaAttention(c.n_q, 128, 512, 64, c.n_kv, 132, kGiB);
    SCOPED_TRACE(testing::Message() << c.n_q << " queries, " << c.n_kv << " rows");
    EXPECT_TRUE(p.tensor_cores);
    EXPECT_EQ(p.tc_tile_groups, c.form);
    EXPECT_EQ(p.heads_per_block, 16);
    EXPECT_EQ(p.n_splits, c.n_splits);
    EXPECT_EQ(p.split_len, c.split_len);
    EXPECT_EQ(p.workspace_bytes > 0, c.n_splits > 1);
  }
  EXPECT_EQ(PlanMlaAttention(1, 128, 512, 64, 8192, 132, 0).n_splits, 1) << "no workspace";
  // Rows of 640 still fit two groups of 32-row tiles but not of 64-row ones;
  // rows of 704 fit no form.
  EXPECT_EQ(PlanMlaAttention(1, 128, 512, 128, 8192, 132, kGiB).tc_tile_groups, 2);
  EXPECT_EQ(PlanMlaAttention(16, 128, 512, 128, 8192, 132, kGiB).tc_tile_groups, 2);
  EXPECT_FALSE(PlanMlaAttention(1, 128, 512, 192, 8192, 132, kGiB).tensor_cores);
}

RopeParams Dsv3Rope(models::RopeYarnParams* cpu) {
  cpu->n_rot = 64;
  cpu->freq_base = 10000.0;
  cpu->freq_scale = 1.0 / 40.0;
  cpu->ext_factor = 1.0;
  cpu->attn_factor = 1.0 / (1.0 + 0.1 * std::log(40.0));
  cpu->SetCorrDims(4096, 32.0, 1.0);
  RopeParams g;
  g.n_rot = 64;
  g.freq_base = cpu->freq_base;
  g.freq_scale = cpu->freq_scale;
  g.ext_factor = cpu->ext_factor;
  g.attn_factor = cpu->attn_factor;
  g.corr_low = cpu->corr_low;
  g.corr_high = cpu->corr_high;
  return g;
}

// A batch writing the next rows of two sequences (of 40 and 70 rows, pages of
// 16): token t goes to sequence t % 2, after its first 20 or 50 rows.
void NextRowsOfTwoSequences(int64_t n_tokens, std::vector<int32_t>* pos,
                            std::vector<int32_t>* seq) {
  pos->resize(n_tokens);
  seq->resize(n_tokens);
  for (int64_t t = 0; t < n_tokens; ++t) {
    (*seq)[t] = static_cast<int32_t>(t % 2);
    (*pos)[t] = static_cast<int32_t>(t / 2 + ((*seq)[t] == 0 ? 20 : 50));
  }
}

// `rope` with its frequency table computed on the host (RopeTables) and
// uploaded into *table (the form GpuLayerRunner uses).
RopeParams WithTables(RopeParams rope, std::unique_ptr<DeviceArray<double>>* table) {
  std::vector<double> inv(kRopeMaxPairs);
  double magnitude = 0.0;
  EXPECT_EQ(RopeTables(rope, inv.data(), &magnitude), cudaSuccess);
  inv.resize(rope.n_rot / 2);
  *table = std::make_unique<DeviceArray<double>>(inv);
  rope.inv_freq = (*table)->get();
  rope.magnitude = magnitude;
  return rope;
}

TEST(MlaWriteKv, WritesNormedAndRopedRowsIntoTheirPages) {
  KTX_SKIP_WITHOUT_GPU();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  models::RopeYarnParams cpu_rope;
  std::unique_ptr<DeviceArray<double>> table;
  const RopeParams plain = Dsv3Rope(&cpu_rope);
  const RopeParams tabled = WithTables(plain, &table);
  const int32_t kvl = 512, rw = kvl + 64;
  for (int64_t n_tokens : {1, 3, 17, -1, -3, -17}) {
    // Negative: the same token count with the host-computed frequency table.
    const RopeParams& rope = n_tokens > 0 ? plain : tabled;
    SCOPED_TRACE(testing::Message() << (n_tokens > 0 ? "device" : "host") << " frequencies");
    n_tokens = std::abs(n_tokens);
    // Two sequences; the batch writes the next rows of each.
    const std::vector<int64_t> lengths = {40, 70};
    PagedCache cache = MakeCache(rng, lengths, 16, rw, false);
    std::vector<int32_t> pos, seq;
    NextRowsOfTwoSequences(n_tokens, &pos, &seq);
    const int64_t kva_stride = rw + 8;
    const std::vector<float> kva = cuda_test::RandomF32(rng, n_tokens * kva_stride, 1.5f);
    const std::vector<float> norm = cuda_test::RandomF32(rng, kvl, 1.0f);
    DeviceArray<float> d_kva(kva), d_norm(norm);
    DeviceArray<int32_t> d_pos(pos), d_seq(seq), d_table(cache.block_table);
    DeviceArray<uint16_t> d_kv(cache.data);
    MlaPagedKv kv;
    kv.data = reinterpret_cast<__nv_bfloat16*>(d_kv.get());
    kv.page_stride = int64_t{16} * rw;
    kv.page_size = 16;
    kv.block_table = d_table.get();
    kv.block_table_stride = cache.max_pages;
    ASSERT_CUDA_OK(MlaWriteKv(d_kva.get(), kva_stride, d_norm.get(), 1e-6f, kvl, rope, d_pos.get(),
                              d_seq.get(), n_tokens, kv, nullptr));
    const std::vector<uint16_t> got = d_kv.Download();
    PagedCache want = cache;
    std::vector<double> c(32), s(32);
    for (int64_t t = 0; t < n_tokens; ++t) {
      std::vector<float> row(rw);
      models::RmsNorm(kva.data() + t * kva_stride, norm.data(), kvl, 1e-6, row.data());
      std::copy(kva.data() + t * kva_stride + kvl, kva.data() + t * kva_stride + rw,
                row.begin() + kvl);
      models::RopeAngles(cpu_rope, pos[t], c.data(), s.data());
      models::ApplyRope(c.data(), s.data(), 64, row.data() + kvl);
      uint16_t* dst = want.Row(seq[t], pos[t]);
      for (int32_t i = 0; i < rw; ++i) dst[i] = FloatToBf16Bits(row[i]);
    }
    ASSERT_EQ(got.size(), want.data.size());
    for (size_t i = 0; i < got.size(); ++i) {
      if (want.data[i] == kNanBf16) {
        ASSERT_EQ(got[i], kNanBf16) << "slot " << i << " written but no token maps to it";
        continue;
      }
      const double w = Bf16BitsToFloat(want.data[i]);
      ASSERT_NEAR(Bf16BitsToFloat(got[i]), w, std::fabs(w) / 128.0) << "slot " << i;
    }
  }
}

TEST(MlaPrepareQ, SplitsNopeAndRopesThePositionalPart) {
  KTX_SKIP_WITHOUT_GPU();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  models::RopeYarnParams cpu_rope;
  std::unique_ptr<DeviceArray<double>> table;
  const RopeParams plain = Dsv3Rope(&cpu_rope);
  const RopeParams tabled = WithTables(plain, &table);
  const int32_t n_head = 128, nope = 128, kvl = 512, hd = nope + 64, rw = kvl + 64;
  for (int64_t n_tokens : {1, 3, 17, -1, -3, -17}) {
    // Negative: the same token count with the host-computed frequency table.
    const RopeParams& rope = n_tokens > 0 ? plain : tabled;
    SCOPED_TRACE(testing::Message() << (n_tokens > 0 ? "device" : "host") << " frequencies");
    n_tokens = std::abs(n_tokens);
    std::vector<int32_t> pos(n_tokens);
    for (auto& p : pos) p = static_cast<int32_t>(rng() % 100000);
    const std::vector<float> q = cuda_test::RandomF32(rng, n_tokens * n_head * hd, 1.0f);
    DeviceArray<float> d_q(q), d_big(n_tokens * n_head * rw);
    DeviceArray<int32_t> d_pos(pos);
    DeviceArray<uint16_t> d_nope(n_tokens * n_head * nope);
    d_big.Poison(0x00);
    d_nope.Poison();
    ASSERT_CUDA_OK(MlaPrepareQ(d_q.get(), int64_t{n_head} * hd, n_head, nope, kvl, rope,
                               d_pos.get(), n_tokens,
                               reinterpret_cast<__nv_bfloat16*>(d_nope.get()),
                               int64_t{n_head} * nope, d_big.get(), int64_t{n_head} * rw, nullptr));
    const std::vector<float> big = d_big.Download();
    const std::vector<uint16_t> qn = d_nope.Download();
    std::vector<double> c(32), s(32);
    for (int64_t t = 0; t < n_tokens; ++t) {
      models::RopeAngles(cpu_rope, pos[t], c.data(), s.data());
      for (int32_t h = 0; h < n_head; ++h) {
        const float* src = q.data() + (t * n_head + h) * hd;
        for (int32_t i = 0; i < nope; ++i) {
          ASSERT_EQ(qn[(t * n_head + h) * nope + i], FloatToBf16Bits(src[i]));
        }
        std::vector<float> pe(src + nope, src + hd);
        models::ApplyRope(c.data(), s.data(), 64, pe.data());
        const float* got = big.data() + (t * n_head + h) * rw;
        for (int32_t i = 0; i < kvl; ++i) ASSERT_EQ(got[i], 0.0f) << "q_abs part touched";
        for (int32_t i = 0; i < 64; ++i) {
          ASSERT_NEAR(
              got[kvl + i], pe[i],
              3e-7 * (std::fabs(src[nope + (i & ~1)]) + std::fabs(src[nope + (i | 1)])) + 1e-30);
        }
      }
    }
  }
}

// The fused launch (MlaPrepareQ with write_kv) against the two separate
// calls, bit for bit, with a head count that is not a multiple of the
// kernel's heads per block; and its argument checks.
TEST(MlaPrepareQ, WithTheKvWriteGivesTheBitsOfTheTwoCalls) {
  KTX_SKIP_WITHOUT_GPU();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  models::RopeYarnParams cpu_rope;
  const RopeParams rope = Dsv3Rope(&cpu_rope);
  const int32_t n_head = 13, nope = 128, kvl = 512, hd = nope + 64, rw = kvl + 64;
  for (const int64_t n_tokens : {1, 3, 17}) {
    SCOPED_TRACE(testing::Message() << n_tokens << " tokens");
    const std::vector<int64_t> lengths = {40, 70};
    PagedCache cache = MakeCache(rng, lengths, 16, rw, false);
    std::vector<int32_t> pos, seq;
    NextRowsOfTwoSequences(n_tokens, &pos, &seq);
    const std::vector<float> q = cuda_test::RandomF32(rng, n_tokens * n_head * hd, 1.0f);
    const std::vector<float> kva = cuda_test::RandomF32(rng, n_tokens * rw, 1.5f);
    const std::vector<float> norm = cuda_test::RandomF32(rng, kvl, 1.0f);
    DeviceArray<float> d_q(q), d_kva(kva), d_norm(norm);
    DeviceArray<int32_t> d_pos(pos), d_seq(seq), d_table(cache.block_table);
    std::vector<uint16_t> caches[2], nopes[2];
    std::vector<float> bigs[2];
    for (int fused = 0; fused < 2; ++fused) {
      DeviceArray<uint16_t> d_kv(cache.data), d_nope(n_tokens * n_head * nope);
      DeviceArray<float> d_big(n_tokens * n_head * rw);
      d_big.Poison(0x00);
      d_nope.Poison();
      MlaKvWrite w;
      w.kva = d_kva.get();
      w.kva_stride = rw;
      w.kv_norm = d_norm.get();
      w.eps = 1e-6f;
      w.seq_index = d_seq.get();
      w.kv.data = reinterpret_cast<__nv_bfloat16*>(d_kv.get());
      w.kv.page_stride = int64_t{16} * rw;
      w.kv.page_size = 16;
      w.kv.block_table = d_table.get();
      w.kv.block_table_stride = cache.max_pages;
      if (fused == 0) {
        ASSERT_CUDA_OK(MlaWriteKv(w.kva, rw, w.kv_norm, w.eps, kvl, rope, d_pos.get(), w.seq_index,
                                  n_tokens, w.kv, nullptr));
      }
      ASSERT_CUDA_OK(MlaPrepareQ(
          d_q.get(), int64_t{n_head} * hd, n_head, nope, kvl, rope, d_pos.get(), n_tokens,
          reinterpret_cast<__nv_bfloat16*>(d_nope.get()), int64_t{n_head} * nope, d_big.get(),
          int64_t{n_head} * rw, nullptr, fused == 1 ? &w : nullptr));
      caches[fused] = d_kv.Download();
      nopes[fused] = d_nope.Download();
      bigs[fused] = d_big.Download();
    }
    EXPECT_NE(caches[0], cache.data) << "no row was written";
    EXPECT_EQ(caches[1], caches[0]);
    EXPECT_EQ(nopes[1], nopes[0]);
    ASSERT_EQ(bigs[1].size(), bigs[0].size());
    EXPECT_EQ(std::memcmp(bigs[1].data(), bigs[0].data(), bigs[0].size() * sizeof(float)), 0);
    // Every head's rope part is written (13 heads: two blocks, the second partial).
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int32_t h = 0; h < n_head; ++h) {
        const float* got = bigs[1].data() + (t * n_head + h) * rw + kvl;
        bool any = false;
        for (int32_t i = 0; i < 64; ++i) any = any || got[i] != 0.0f;
        EXPECT_TRUE(any) << "token " << t << " head " << h << ": rope part not written";
      }
    }
  }
  // A KV write without its input is refused before any launch.
  MlaKvWrite bad;
  DeviceArray<float> d_q(std::vector<float>(n_head * hd, 0.0f)), d_big(n_head * rw);
  DeviceArray<int32_t> d_pos(std::vector<int32_t>{0});
  DeviceArray<uint16_t> d_nope(n_head * nope);
  EXPECT_EQ(MlaPrepareQ(d_q.get(), int64_t{n_head} * hd, n_head, nope, kvl, rope, d_pos.get(), 1,
                        reinterpret_cast<__nv_bfloat16*>(d_nope.get()), int64_t{n_head} * nope,
                        d_big.get(), int64_t{n_head} * rw, nullptr, &bad),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace ktx::kernels::cuda
