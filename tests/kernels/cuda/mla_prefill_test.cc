// MlaPrefillAttention (the prompt chunk's attention as two cuBLAS products)
// against the float64 reference of tests/kernels/cuda/mla_test_util.h and
// against MlaAttention's tensor-core kernel, at DeepSeek-V3 width and at odd
// widths, for whole prompts (context 1, 63, 1000), chunks after cached rows,
// and chunk sizes forced down by a small workspace or max_chunk (a chunk
// boundary inside the prompt). Tolerances as the tensor-core kernel's
// (mla_test.cc): Q and the softmax weights are split hi + lo into bf16, which
// leaves ~2^-16 relative per product; 1e-4 relative L2 per (query, head)
// after the softmax for the F32 output, 3e-3 for bf16.
#include "kernels/cuda/mla_prefill.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/mla.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/kernels/cuda/mla_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::Bf16BitsToFloat;
using cuda_test::DeviceArray;
using cuda_test::Dims;
using cuda_test::kNanBf16;
using cuda_test::MakeCache;
using cuda_test::PagedCache;
using cuda_test::Reference;

class Cublas {
 public:
  Cublas() { EXPECT_EQ(cublasCreate(&h_), CUBLAS_STATUS_SUCCESS); }
  ~Cublas() { cublasDestroy(h_); }
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

struct Case {
  int64_t pos0, n_q;
  size_t capacity;    // workspace offered to the plan
  int64_t max_chunk;  // 0: none
};

// Sequence 1 of a two-sequence cache (so that the block-table row matters)
// holds pos0 + n_q rows; queries pos0 .. pos0 + n_q - 1 attend causally.
void CheckPrefill(std::mt19937& rng, const Dims& dims, const Case& c) {
  SCOPED_TRACE(testing::Message() << "pos0 " << c.pos0 << " n_q " << c.n_q << " capacity "
                                  << c.capacity << " max_chunk " << c.max_chunk);
  const int32_t rw = dims.kv_lora + dims.n_rot;
  const int64_t n_rows = c.pos0 + c.n_q;
  PagedCache cache = MakeCache(rng, {37, n_rows}, 16, rw, true);
  const float scale = 2.0f / std::sqrt(static_cast<float>(rw));
  const std::vector<float> q = cuda_test::RandomF32(rng, c.n_q * dims.n_head * rw, 1.0f);
  DeviceArray<float> d_q(q);
  DeviceArray<int32_t> d_table(cache.block_table);
  DeviceArray<uint16_t> d_kv(cache.data);
  const int64_t out_stride = int64_t{dims.n_head} * dims.kv_lora;
  DeviceArray<float> d_out(c.n_q * out_stride);
  DeviceArray<uint16_t> d_out_bf16(c.n_q * out_stride);
  d_out.Poison();
  d_out_bf16.Poison();

  MlaPrefillArgs a;
  a.q = d_q.get();
  a.q_stride = int64_t{dims.n_head} * rw;
  a.n_q = c.n_q;
  a.n_head = dims.n_head;
  a.kv_lora = dims.kv_lora;
  a.n_rot = dims.n_rot;
  a.scale = scale;
  a.seq = 1;
  a.pos0 = c.pos0;
  a.kv.data = reinterpret_cast<__nv_bfloat16*>(d_kv.get());
  a.kv.page_stride = int64_t{cache.page_size} * rw;
  a.kv.page_size = cache.page_size;
  a.kv.block_table = d_table.get();
  a.kv.block_table_stride = cache.max_pages;
  a.out_f32 = d_out.get();
  a.out_bf16 = reinterpret_cast<__nv_bfloat16*>(d_out_bf16.get());
  const MlaPrefillPlan plan =
      PlanMlaPrefill(c.n_q, c.pos0, dims.n_head, dims.kv_lora, dims.n_rot, c.capacity, c.max_chunk);
  ASSERT_GT(plan.queries_per_chunk, 0);
  ASSERT_LE(plan.workspace_bytes, c.capacity);
  if (c.max_chunk > 0) {
    ASSERT_LE(plan.queries_per_chunk, c.max_chunk);
  }
  SCOPED_TRACE(testing::Message() << "chunk " << plan.queries_per_chunk);
  DeviceArray<uint8_t> workspace(plan.workspace_bytes);
  workspace.Poison();
  Cublas cublas;
  const MlaPrefillStatus st = MlaPrefillAttention(cublas.get(), a, plan, workspace.get(), nullptr);
  ASSERT_TRUE(st.ok()) << st.step << ": " << cudaGetErrorString(st.cuda) << " / cuBLAS "
                       << st.cublas;
  const std::vector<float> out = d_out.Download();
  const std::vector<uint16_t> out_bf16 = d_out_bf16.Download();
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_FALSE(std::isnan(out[i])) << "output element " << i << " not written (or NaN)";
    ASSERT_NE(out_bf16[i], kNanBf16) << "bf16 output element " << i;
  }
  // Every query of short prompts, a sample (first, last, around the chunk
  // boundaries) of long ones.
  std::vector<int64_t> queries;
  for (int64_t i = 0; i < c.n_q; ++i) {
    const int64_t in_chunk = i % plan.queries_per_chunk;
    if (c.n_q <= 80 || i < 3 || i + 3 >= c.n_q || in_chunk < 2 ||
        in_chunk + 2 >= plan.queries_per_chunk || rng() % 16 == 0) {
      queries.push_back(i);
    }
  }
  for (int64_t i : queries) {
    for (int32_t h : {0, dims.n_head - 1, dims.n_head / 2 + 1}) {
      if (h >= dims.n_head) continue;
      const int32_t pos = static_cast<int32_t>(c.pos0 + i);
      const std::vector<double> ref =
          Reference(cache, 1, pos, q.data() + (i * dims.n_head + h) * rw, dims.kv_lora, scale);
      const cuda_test::HeadError err =
          cuda_test::CompareHead(ref, out.data() + i * out_stride + h * dims.kv_lora,
                                 out_bf16.data() + i * out_stride + h * dims.kv_lora, dims.kv_lora);
      ASSERT_LE(err.f32, 1e-4) << "query " << i << " (pos " << pos << ") head " << h;
      ASSERT_LE(err.bf16, 3e-3) << "bf16, query " << i << " head " << h;
    }
  }
}

class MlaPrefillTest : public ::testing::TestWithParam<Dims> {};

TEST_P(MlaPrefillTest, MatchesTheReferenceForPromptsAndChunks) {
  KTX_SKIP_WITHOUT_GPU();
  const Dims dims = GetParam();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed << " heads " << dims.n_head << " kv_lora "
                                  << dims.kv_lora << " n_rot " << dims.n_rot);
  std::mt19937 rng(seed);
  const size_t big = size_t{1} << 30;
  // A workspace that holds the rows and only 3 queries' scores.
  const int32_t rw = dims.kv_lora + dims.n_rot;
  const auto tight = [&](int64_t n_rows) {
    const size_t per_query = size_t{static_cast<size_t>(dims.n_head)} *
                             (4 * rw + static_cast<size_t>((n_rows + 7) / 8 * 8) * 4);
    return static_cast<size_t>(n_rows) * 4 * rw + 3 * per_query + 1024;
  };
  const std::vector<Case> cases = {
      {0, 1, big, 0},         // context 1
      {0, 63, big, 0},        // one chunk
      {0, 63, big, 17},       // boundaries at 17, 34, 51
      {46, 17, big, 0},       // a chunk after 46 cached rows
      {0, 1000, big, 0},      // context 1000
      {13, 987, big, 300},    // 1000 rows, chunks of 300 after 13 cached
      {0, 50, tight(50), 0},  // chunks of 3 from the workspace's size
  };
  for (const Case& c : cases) {
    CheckPrefill(rng, dims, c);
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Widths, MlaPrefillTest,
                         ::testing::Values(Dims{128, 512, 64}, Dims{4, 64, 16}, Dims{20, 96, 32}),
                         [](const auto& info) {
                           return "h" + std::to_string(info.param.n_head) + "_kvl" +
                                  std::to_string(info.param.kv_lora) + "_rot" +
                                  std::to_string(info.param.n_rot);
                         });

TEST(MlaPrefillPlan, RefusesWidthsAndWorkspacesItCannotServe) {
  // Planning needs no GPU.
  EXPECT_EQ(PlanMlaPrefill(10, 0, 4, 60, 16, size_t{1} << 30).queries_per_chunk, 0)
      << "kv_lora not a multiple of 8";
  EXPECT_EQ(PlanMlaPrefill(10, 0, 4, 64, 12, size_t{1} << 30).queries_per_chunk, 0)
      << "row width not a multiple of 8";
  EXPECT_EQ(PlanMlaPrefill(10, 0, 4, 64, 16, 4096).queries_per_chunk, 0) << "workspace too small";
  EXPECT_EQ(PlanMlaPrefill(0, 0, 4, 64, 16, size_t{1} << 30).queries_per_chunk, 0) << "no queries";
  const MlaPrefillPlan p = PlanMlaPrefill(10, 5, 4, 64, 16, size_t{1} << 30);
  EXPECT_EQ(p.queries_per_chunk, 10);
  EXPECT_EQ(p.n_rows, 15);
  EXPECT_GT(p.workspace_bytes, 0u);
}

TEST(MlaPrefillAttention, RefusesAPlanForAnotherPrompt) {
  KTX_SKIP_WITHOUT_GPU();
  Cublas cublas;
  DeviceArray<float> q(4 * 80 * 4);
  DeviceArray<uint8_t> ws(1 << 20);
  DeviceArray<int32_t> table(std::vector<int32_t>{0});
  DeviceArray<uint16_t> kv(16 * 80);
  DeviceArray<float> out(4 * 4 * 64);
  MlaPrefillArgs a;
  a.q = q.get();
  a.q_stride = 4 * 80;
  a.n_q = 4;
  a.n_head = 4;
  a.kv_lora = 64;
  a.n_rot = 16;
  a.kv.data = reinterpret_cast<__nv_bfloat16*>(kv.get());
  a.kv.page_stride = 16 * 80;
  a.kv.page_size = 16;
  a.kv.block_table = table.get();
  a.kv.block_table_stride = 1;
  a.out_f32 = out.get();
  const MlaPrefillPlan plan = PlanMlaPrefill(3, 0, 4, 64, 16, ws.size());
  ASSERT_GT(plan.queries_per_chunk, 0);
  const MlaPrefillStatus st = MlaPrefillAttention(cublas.get(), a, plan, ws.get(), nullptr);
  EXPECT_EQ(st.cuda, cudaErrorInvalidValue);
  EXPECT_FALSE(st.ok());
}

}  // namespace
}  // namespace ktx::kernels::cuda
