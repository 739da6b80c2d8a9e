// GpuExpertStreamer against a float64 host reference on a small random MoE
// model held in page-aligned host memory (GGUF blocks made by
// kernels/cpu/quant QuantizeRow; types Q4_K, Q5_K, Q6_K, Q8_0, BF16): a
// subset of experts is streamed and computed into an accumulator holding
// random values, with and without prefetch, with a copy ring smaller than the
// subset, over two layers in a row, through the pinned bounce path, and run
// twice for bitwise reproducibility. The reference uses the same bf16
// rounding points as the GPU (weights, input rows, SiLU product), so the
// remaining difference is F32 accumulation order: rel L2 <= 2e-3.
// Skips without a GPU.
#include "runtime/gpu/gpu_experts.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/quant/quant.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::gpu {
namespace {

using kernels::TensorType;

constexpr int64_t kEmbd = 512, kFf = 256;
constexpr int32_t kExperts = 9, kUsed = 3;
constexpr int64_t kTokens = 37;

struct AlignedFree {
  void operator()(uint8_t* p) const { std::free(p); }
};
using HostBytes = std::unique_ptr<uint8_t, AlignedFree>;

// One layer's expert tensors in GGUF block layout, plus its bf16-rounded values.
struct HostLayer {
  HostBytes gate, up, down;
  TensorType types[3];
  std::vector<float> w[3];        // [E][rows][cols], rounded to bf16 as the GPU holds them
  std::vector<float> w_exact[3];  // the same, as DequantizeRow gives them (the GEMV's weights)
  ExpertLayerTensors tensors;
};

HostBytes Quantized(TensorType type, int64_t rows, int64_t cols, std::mt19937& rng,
                    std::vector<float>* values, std::vector<float>* exact, int64_t* row_bytes) {
  const kernels::TensorTypeTraits& tr = kernels::TraitsOf(type);
  *row_bytes = kernels::RowBytes(tr, cols);
  const size_t bytes = static_cast<size_t>(rows * *row_bytes);
  const size_t alloc = (bytes + 4095) / 4096 * 4096;
  HostBytes p(static_cast<uint8_t*>(std::aligned_alloc(4096, alloc)));
  std::memset(p.get(), 0, alloc);
  std::normal_distribution<float> dist(0.0f, 1.0f / std::sqrt(static_cast<float>(cols)));
  std::vector<float> row(cols), deq(cols);
  values->resize(rows * cols);
  exact->resize(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& v : row) v = dist(rng);
    kernels::QuantizeRow(type, row.data(), p.get() + r * *row_bytes, cols);
    kernels::DequantizeRow(type, p.get() + r * *row_bytes, deq.data(), cols);
    for (int64_t c = 0; c < cols; ++c) {
      (*values)[r * cols + c] = kernels::Bf16ToFloat(kernels::FloatToBf16(deq[c]));
      (*exact)[r * cols + c] = deq[c];
    }
  }
  return p;
}

std::unique_ptr<HostLayer> MakeLayer(TensorType g, TensorType u, TensorType d, std::mt19937& rng) {
  auto l = std::make_unique<HostLayer>();
  l->types[0] = g;
  l->types[1] = u;
  l->types[2] = d;
  l->gate = Quantized(g, kExperts * kFf, kEmbd, rng, &l->w[0], &l->w_exact[0],
                      &l->tensors.gate_row_bytes);
  l->up =
      Quantized(u, kExperts * kFf, kEmbd, rng, &l->w[1], &l->w_exact[1], &l->tensors.up_row_bytes);
  l->down = Quantized(d, kExperts * kEmbd, kFf, rng, &l->w[2], &l->w_exact[2],
                      &l->tensors.down_row_bytes);
  l->tensors.gate = l->gate.get();
  l->tensors.up = l->up.get();
  l->tensors.down = l->down.get();
  l->tensors.gate_type = g;
  l->tensors.up_type = u;
  l->tensors.down_type = d;
  return l;
}

models::Routing RandomRouting(std::mt19937& rng) {
  models::Routing r;
  r.n_tokens = kTokens;
  r.n_expert_used = kUsed;
  std::uniform_real_distribution<float> wd(0.1f, 1.0f);
  for (int64_t t = 0; t < kTokens; ++t) {
    std::vector<int32_t> ids(kExperts - 1);  // expert 6 never chosen
    for (int32_t e = 0, j = 0; e < kExperts; ++e) {
      if (e != 6) ids[j++] = e;
    }
    std::shuffle(ids.begin(), ids.end(), rng);
    const int keep = t % 5 == 4 ? 1 : kUsed;  // some rows padded with kNoExpert
    for (int k = 0; k < kUsed; ++k) {
      r.expert_ids.push_back(k < keep ? ids[k] : models::kNoExpert);
      r.weights.push_back(k < keep ? wd(rng) : 0.0f);
    }
  }
  return r;
}

// acc0 + Σ over entries with expert in `subset` of w * expert(h), in double;
// the experts in `exact` with DequantizeRow's weights (the quantized GEMV),
// the others with the bf16-rounded ones (dequantize + cuBLAS).
std::vector<double> Reference(const HostLayer& l, const std::vector<uint16_t>& h,
                              const models::Routing& r, const std::vector<int32_t>& subset,
                              const std::vector<float>& acc0,
                              const std::vector<int32_t>& exact = {}) {
  std::vector<double> out(acc0.begin(), acc0.end());
  std::vector<uint8_t> in(kExperts, 0);
  for (int32_t e : subset) in[e] = 1;
  std::vector<double> act(kFf);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int k = 0; k < kUsed; ++k) {
      const int32_t e = r.id(t, k);
      if (e == models::kNoExpert || !in[e]) continue;
      const bool ex = std::find(exact.begin(), exact.end(), e) != exact.end();
      const std::vector<float>* w = ex ? l.w_exact : l.w;
      for (int64_t f = 0; f < kFf; ++f) {
        double g = 0, u = 0;
        const float* wg = &w[0][(e * kFf + f) * kEmbd];
        const float* wu = &w[1][(e * kFf + f) * kEmbd];
        for (int64_t c = 0; c < kEmbd; ++c) {
          const double x = kernels::Bf16ToFloat(h[t * kEmbd + c]);
          g += wg[c] * x;
          u += wu[c] * x;
        }
        const double a = g / (1.0 + std::exp(-g)) * u;
        act[f] = kernels::Bf16ToFloat(kernels::FloatToBf16(static_cast<float>(a)));
      }
      for (int64_t o = 0; o < kEmbd; ++o) {
        const float* wd = &w[2][(e * kEmbd + o) * kFf];
        double y = 0;
        for (int64_t f = 0; f < kFf; ++f) y += wd[f] * act[f];
        out[t * kEmbd + o] += r.weight(t, k) * y;
      }
    }
  }
  return out;
}

// rel L2 of (got - want) against (want - acc0): the experts' contribution.
double RelErr(const std::vector<float>& got, const std::vector<double>& want,
              const std::vector<float>& acc0) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += (want[i] - acc0[i]) * (want[i] - acc0[i]);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

class GpuExpertsTest : public testing::Test {
 protected:
  void SetUp() override {
    const std::string why = cuda_test::NoGpuReason();
    if (!why.empty()) GTEST_SKIP() << "needs a CUDA GPU (" << why << ")";
    seed_ = cuda_test::FreshSeed();
    rng_.seed(seed_);
    layers_[1] = MakeLayer(TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K, rng_);
    layers_[2] = MakeLayer(TensorType::kQ8_0, TensorType::kBF16, TensorType::kQ4_K, rng_);
    h_ = cuda_test::RandomBf16(rng_, kTokens * kEmbd, 1.0f);
    acc0_ = cuda_test::RandomF32(rng_, kTokens * kEmbd, 0.5f);
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  std::unique_ptr<GpuExpertStreamer> Make(int32_t n_slots, bool register_memory) {
    GpuExpertStreamerConfig c;
    c.n_embd = kEmbd;
    c.n_ff = kFf;
    c.n_expert = kExperts;
    c.n_expert_used = kUsed;
    c.max_tokens = kTokens + 3;
    c.n_slots = n_slots;
    c.register_host_memory = register_memory;
    std::vector<ExpertLayerTensors> t(3);  // layer 0 dense
    t[1] = layers_[1]->tensors;
    t[2] = layers_[2]->tensors;
    auto s = GpuExpertStreamer::Create(c, std::move(t), stream_);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  uint32_t seed_ = 0;
  std::mt19937 rng_;
  std::unique_ptr<HostLayer> layers_[3];
  std::vector<uint16_t> h_;
  std::vector<float> acc0_;
  cudaStream_t stream_ = nullptr;
};

TEST_F(GpuExpertsTest, SubsetMatchesFloat64ReferenceInEveryMode) {
  SCOPED_TRACE(testing::Message() << "seed " << seed_);
  const models::Routing r1 = RandomRouting(rng_);
  const models::Routing r2 = RandomRouting(rng_);
  // Expert 6 has no token; 8 is not in the subset (the CPU's).
  const std::vector<int32_t> subset = {4, 0, 6, 7, 2, 5, 1};
  const std::vector<double> want1 = Reference(*layers_[1], h_, r1, subset, acc0_);
  std::vector<float> acc1(acc0_.size());
  for (size_t i = 0; i < acc1.size(); ++i) acc1[i] = static_cast<float>(want1[i]);
  const std::vector<double> want2 = Reference(*layers_[2], h_, r2, subset, acc1);
  cuda_test::DeviceArray<uint16_t> d_h(h_);
  const auto* h = reinterpret_cast<const __nv_bfloat16*>(d_h.get());
  std::vector<float> first;
  struct Mode {
    const char* name;
    int32_t slots;
    bool reg, prefetch;
  };
  for (const Mode& m :
       {Mode{"registered", 4, true, false}, Mode{"prefetch, 2 slots", 2, true, true},
        Mode{"bounce", 3, false, true}, Mode{"registered again", 4, true, false}}) {
    SCOPED_TRACE(m.name);
    std::unique_ptr<GpuExpertStreamer> s = Make(m.slots, m.reg);
    ASSERT_NE(s, nullptr);
    if (!m.reg) {
      EXPECT_EQ(s->host_memory(), HostMemoryMode::kBounce);
    }
    std::cout << "[ info ] " << m.name << ": " << s->host_memory_note() << "\n";
    cuda_test::DeviceArray<float> acc(acc0_);
    // The copy timeline (diagnostics) in every mode but the first: same bits.
    const bool timeline = !first.empty();
    s->set_copy_timeline(timeline);
    if (m.prefetch) {
      ASSERT_TRUE(s->Prefetch(1, subset).ok());
    }
    ASSERT_TRUE(s->Compute(1, subset, r1, h, kEmbd, acc.get(), kEmbd).ok());
    const std::vector<float> got1 = acc.Download();
    EXPECT_LE(RelErr(got1, want1, acc0_), 2e-3);
    if (m.prefetch) {
      ASSERT_TRUE(s->Prefetch(2, subset).ok());
    }
    ASSERT_TRUE(s->Compute(2, subset, r2, h, kEmbd, acc.get(), kEmbd).ok());
    const std::vector<float> got2 = acc.Download();
    EXPECT_LE(RelErr(got2, want2, acc1), 2e-3);
    if (first.empty()) {
      first = got2;
    } else {
      EXPECT_EQ(std::memcmp(first.data(), got2.data(), got2.size() * 4), 0)
          << "results differ bitwise between modes";
    }
    // Without prefetch expert 6 (no token) is not copied.
    EXPECT_EQ(s->stats().experts_copied, m.prefetch ? 14 : 12);
    EXPECT_EQ(s->stats().experts_computed, 12);
    EXPECT_TRUE(s->idle());
    absl::StatusOr<GpuExpertStreamer::CopyTimeline> t = s->TakeCopyTimeline();
    ASSERT_TRUE(t.ok()) << t.status();
    if (!timeline) {
      EXPECT_EQ(t->copies, 0);
      continue;
    }
    EXPECT_EQ(t->copies, s->stats().experts_copied);
    EXPECT_EQ(t->bytes, s->stats().bytes_copied);
    EXPECT_GT(t->busy_ms, 0);
    EXPECT_GE(t->not_issued_ms, 0);
    EXPECT_GE(t->slot_wait_ms, 0);
    // The span is made of the copies, the gaps between them and the slot waits.
    EXPECT_NEAR(t->span_ms, t->busy_ms + t->not_issued_ms + t->slot_wait_ms,
                0.01 + 1e-3 * t->span_ms);
    std::cout << "[ info ] copy timeline: " << t->copies << " copies, busy " << t->busy_ms
              << " ms, not issued " << t->not_issued_ms << " ms, slot waits " << t->slot_wait_ms
              << " ms, span " << t->span_ms << " ms\n";
    absl::StatusOr<GpuExpertStreamer::CopyTimeline> again = s->TakeCopyTimeline();
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->copies, 0);
  }
}

TEST_F(GpuExpertsTest, MismatchedPrefetchAndBadIdsAreErrors) {
  SCOPED_TRACE(testing::Message() << "seed " << seed_);
  std::unique_ptr<GpuExpertStreamer> s = Make(2, true);
  ASSERT_NE(s, nullptr);
  const models::Routing r = RandomRouting(rng_);
  cuda_test::DeviceArray<uint16_t> d_h(h_);
  cuda_test::DeviceArray<float> acc(acc0_);
  const auto* h = reinterpret_cast<const __nv_bfloat16*>(d_h.get());
  const std::vector<int32_t> a = {1, 2, 3}, b = {2, 1, 3};
  ASSERT_TRUE(s->Prefetch(2, a).ok());
  EXPECT_EQ(s->Compute(1, a, r, h, kEmbd, acc.get(), kEmbd).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s->Compute(2, b, r, h, kEmbd, acc.get(), kEmbd).code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(s->Reset().ok());
  EXPECT_TRUE(s->idle());
  const std::vector<int32_t> bad = {1, 9}, twice = {3, 3};
  EXPECT_EQ(s->Prefetch(1, bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s->Prefetch(1, twice).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s->Prefetch(0, a).code(), absl::StatusCode::kInvalidArgument);  // dense layer
  EXPECT_TRUE(s->Compute(1, a, r, h, kEmbd, acc.get(), kEmbd).ok());        // still usable
}

// A prefetch longer than the slots, re-planned once the routing is known:
// DropUnissued keeps the copies in flight (the first n_slots), the caller
// appends other experts, and the sum is the reference's for that set.
TEST_F(GpuExpertsTest, DroppingUnissuedCopiesKeepsThoseInFlight) {
  SCOPED_TRACE(testing::Message() << "seed " << seed_);
  std::unique_ptr<GpuExpertStreamer> s = Make(2, true);
  ASSERT_NE(s, nullptr);
  const models::Routing r = RandomRouting(rng_);
  cuda_test::DeviceArray<uint16_t> d_h(h_);
  cuda_test::DeviceArray<float> acc(acc0_);
  const auto* h = reinterpret_cast<const __nv_bfloat16*>(d_h.get());
  ASSERT_TRUE(s->Prefetch(1, std::vector<int32_t>{3, 0, 5, 7, 1}).ok());
  EXPECT_TRUE(s->DropUnissued(2).size() == 0) << "no copies of layer 2 planned";
  const std::vector<int32_t> kept = s->DropUnissued(1);
  EXPECT_EQ(kept, (std::vector<int32_t>{3, 0})) << "two slots: two copies in flight";
  std::vector<int32_t> set = kept;
  set.push_back(6);
  set.push_back(2);
  ASSERT_TRUE(s->Compute(1, set, r, h, kEmbd, acc.get(), kEmbd).ok());
  const std::vector<double> want = Reference(*layers_[1], h_, r, set, acc0_);
  EXPECT_LE(RelErr(acc.Download(), want, acc0_), 2e-3);
  EXPECT_TRUE(s->idle());
}

// Hot experts resident in device memory (LoadResident): mixed into the
// subset, they are computed from device memory without a copy, the others
// streamed (with and without prefetch of the streamed ones), and the sum
// equals the float64 reference; bad sets are errors naming the layer.
TEST_F(GpuExpertsTest, ResidentExpertsMatchFloat64ReferenceWithoutCopies) {
  SCOPED_TRACE(testing::Message() << "seed " << seed_);
  const models::Routing r1 = RandomRouting(rng_);
  const models::Routing r2 = RandomRouting(rng_);
  const std::vector<int32_t> subset = {4, 0, 6, 7, 2, 5, 1};  // 6: no token
  const std::vector<double> want1 = Reference(*layers_[1], h_, r1, subset, acc0_);
  std::vector<float> acc1(acc0_.size());
  for (size_t i = 0; i < acc1.size(); ++i) acc1[i] = static_cast<float>(want1[i]);
  const std::vector<double> want2 = Reference(*layers_[2], h_, r2, subset, acc1);
  cuda_test::DeviceArray<uint16_t> d_h(h_);
  const auto* h = reinterpret_cast<const __nv_bfloat16*>(d_h.get());
  // Layer 1: 4, 7, 1 resident (streamed: 0, 6, 2, 5); layer 2: 0 and 6.
  const std::vector<std::vector<int32_t>> resident = {{}, {7, 4, 1}, {6, 0}};
  const std::vector<int32_t> streamed1 = {0, 6, 2, 5}, streamed2 = {4, 7, 2, 5, 1};
  for (const bool prefetch : {false, true}) {
    SCOPED_TRACE(prefetch ? "prefetch" : "no prefetch");
    std::unique_ptr<GpuExpertStreamer> s = Make(2, true);
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->LoadResident(resident).ok());
    EXPECT_EQ(s->n_resident(), 5);
    EXPECT_TRUE(s->IsResident(1, 4));
    EXPECT_FALSE(s->IsResident(1, 0));
    EXPECT_EQ(std::vector<int32_t>(s->ResidentExperts(1).begin(), s->ResidentExperts(1).end()),
              (std::vector<int32_t>{1, 4, 7}));
    EXPECT_EQ(s->resident_bytes(), 3 * layers_[1]->tensors.ExpertSlotBytes(kEmbd, kFf) +
                                       2 * layers_[2]->tensors.ExpertSlotBytes(kEmbd, kFf));
    cuda_test::DeviceArray<float> acc(acc0_);
    if (prefetch) {
      ASSERT_TRUE(s->Prefetch(1, streamed1).ok());
    }
    ASSERT_TRUE(s->Compute(1, subset, r1, h, kEmbd, acc.get(), kEmbd).ok());
    EXPECT_LE(RelErr(acc.Download(), want1, acc0_), 2e-3);
    if (prefetch) {
      ASSERT_TRUE(s->Prefetch(2, streamed2).ok());
    }
    ASSERT_TRUE(s->Compute(2, subset, r2, h, kEmbd, acc.get(), kEmbd).ok());
    EXPECT_LE(RelErr(acc.Download(), want2, acc1), 2e-3);
    // Resident: 3 + 1 computed (layer 2's 6 has no token), none copied.
    EXPECT_EQ(s->stats().resident_experts_computed, 4);
    EXPECT_EQ(s->stats().experts_computed, 12);
    EXPECT_EQ(s->stats().experts_copied, prefetch ? 4 + 5 : 3 + 5);
    EXPECT_TRUE(s->idle());
  }
  std::unique_ptr<GpuExpertStreamer> s = Make(2, true);
  ASSERT_NE(s, nullptr);
  const std::vector<std::vector<int32_t>> dense = {{1}}, out_of_range = {{}, {9}},
                                          twice = {{}, {}, {3, 3}};
  EXPECT_EQ(s->LoadResident(dense).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s->LoadResident(out_of_range).code(), absl::StatusCode::kInvalidArgument);
  const absl::Status t = s->LoadResident(twice);
  EXPECT_EQ(t.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.message().find("layer 2"), std::string::npos) << t;
  EXPECT_EQ(s->n_resident(), 0);
}

// Experts with at most gemv_max_tokens tokens run as three quantized GEMVs
// straight from their blocks, the resident ones from device memory and the
// streamed ones from their slots (a decode split's experts): the sum equals
// the float64 reference with DequantizeRow's (unrounded) weights for all of
// them, within the same 2e-3; with the threshold 0 they take the dequantize +
// GEMM path again (bf16 weights in the reference). (About 14 tokens per
// expert here: two token passes of the GEMV.)
TEST_F(GpuExpertsTest, ResidentExpertsByQuantizedGemvMatchFloat64Reference) {
  SCOPED_TRACE(testing::Message() << "seed " << seed_);
  const models::Routing r1 = RandomRouting(rng_);
  const models::Routing r2 = RandomRouting(rng_);
  const std::vector<int32_t> subset = {4, 0, 6, 7, 2, 5, 1};  // 6: no token
  const std::vector<std::vector<int32_t>> resident = {{}, {7, 4, 1}, {6, 0}};
  cuda_test::DeviceArray<uint16_t> d_h(h_);
  const auto* h = reinterpret_cast<const __nv_bfloat16*>(d_h.get());
  for (const int64_t threshold : {int64_t{64}, int64_t{0}}) {
    SCOPED_TRACE(testing::Message() << "gemv_max_tokens " << threshold);
    const std::vector<int32_t> exact = threshold > 0 ? subset : std::vector<int32_t>{};
    const std::vector<int32_t>& exact1 = exact;
    const std::vector<int32_t>& exact2 = exact;
    // Streamed experts of the subset with tokens: the GEMV's from the slots.
    int64_t streamed_with_tokens = 0;
    for (int il : {1, 2}) {
      const models::Routing& r = il == 1 ? r1 : r2;
      for (int32_t e : subset) {
        if (std::find(resident[il].begin(), resident[il].end(), e) != resident[il].end()) continue;
        streamed_with_tokens +=
            std::find(r.expert_ids.begin(), r.expert_ids.end(), e) != r.expert_ids.end();
      }
    }
    ASSERT_GT(streamed_with_tokens, 0);
    const std::vector<double> want1 = Reference(*layers_[1], h_, r1, subset, acc0_, exact1);
    std::vector<float> acc1(acc0_.size());
    for (size_t i = 0; i < acc1.size(); ++i) acc1[i] = static_cast<float>(want1[i]);
    const std::vector<double> want2 = Reference(*layers_[2], h_, r2, subset, acc1, exact2);
    std::unique_ptr<GpuExpertStreamer> s = Make(2, true);
    ASSERT_NE(s, nullptr);
    s->set_gemv_max_tokens(threshold);
    ASSERT_TRUE(s->LoadResident(resident).ok());
    cuda_test::DeviceArray<float> acc(acc0_);
    ASSERT_TRUE(s->Compute(1, subset, r1, h, kEmbd, acc.get(), kEmbd).ok());
    const double e1 = RelErr(acc.Download(), want1, acc0_);
    ASSERT_TRUE(s->Compute(2, subset, r2, h, kEmbd, acc.get(), kEmbd).ok());
    const double e2 = RelErr(acc.Download(), want2, acc1);
    std::printf(
        "[ measured ] resident experts, gemv_max_tokens %lld: rel err %.2e (Q4_K/Q5_K/"
        "Q6_K layer), %.2e (Q8_0/BF16/Q4_K layer)\n",
        static_cast<long long>(threshold), e1, e2);
    EXPECT_LE(e1, 2e-3);
    EXPECT_LE(e2, 2e-3);
    EXPECT_EQ(s->stats().resident_experts_computed, 4);
    EXPECT_EQ(s->stats().resident_gemv_experts, threshold > 0 ? 4 : 0);
    EXPECT_EQ(s->stats().streamed_gemv_experts, threshold > 0 ? streamed_with_tokens : 0);
  }
}

TEST_F(GpuExpertsTest, CalibrationGivesPositiveRates) {
  std::unique_ptr<GpuExpertStreamer> s = Make(4, true);
  ASSERT_NE(s, nullptr);
  ExpertCostModel m;
  ASSERT_TRUE(s->Calibrate(&m).ok());
  std::cout << "[ measured ] tiny experts: PCIe " << m.pcie_bytes_per_s / 1e9 << " GB/s, GEMM "
            << m.gpu_flops_per_s / 1e12 << " TFLOP/s, " << m.gpu_expert_fixed_s * 1e6
            << " us per expert\n";
  EXPECT_GT(m.pcie_bytes_per_s, 1e8);
  EXPECT_GT(m.gpu_flops_per_s, 1e9);
  EXPECT_GT(m.gpu_expert_fixed_s, 0);
  EXPECT_TRUE(s->idle());
}

}  // namespace
}  // namespace ktx::gpu
