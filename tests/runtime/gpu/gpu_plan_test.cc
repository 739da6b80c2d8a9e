// The GPU memory plan and the paged-KV bookkeeping: plain C++, run everywhere
// (no GPU needed). The plan is checked against DeepSeek-V3's published size
// (671.026 B parameters without MTP, of which 58 x 256 routed experts of
// 3 x 7168 x 2048 stay off the GPU), not against its own formula.
#include <algorithm>
#include <cstdio>
#include <set>
#include <string>

#include "gtest/gtest.h"
#include "runtime/gpu/memory_plan.h"
#include "runtime/gpu/paged_kv.h"
#include "tests/runtime/gpu/dsv3_hparams.h"

namespace ktx::gpu {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

// Tile caches on the CPU shards: faster starting figures for the split's CPU
// cost, unless the caller set its own.
TEST(GpuExpertOptions, TileCachesStartFromTheirCpuFigures) {
  GpuExpertOptions o;
  UseTileCacheCpuCosts(&o);
  EXPECT_EQ(o.cpu_expert_fixed_ms, GpuExpertOptions::kTileCacheCpuExpertFixedMs);
  EXPECT_EQ(o.cpu_expert_per_token_us, GpuExpertOptions::kTileCacheCpuExpertPerTokenUs);
  EXPECT_LT(o.cpu_expert_fixed_ms, GpuExpertOptions{}.cpu_expert_fixed_ms);
  GpuExpertOptions mine;
  mine.cpu_expert_fixed_ms = 0.9;
  UseTileCacheCpuCosts(&mine);
  EXPECT_EQ(mine.cpu_expert_fixed_ms, 0.9);
  EXPECT_EQ(mine.cpu_expert_per_token_us, GpuExpertOptions{}.cpu_expert_per_token_us);
}

TEST(GpuMemoryPlan, DeepSeekV3FitsAnH100WithAlargeKvCache) {
  const models::Deepseek2Hparams hp = Dsv3Hparams();
  CudaModelOptions o;
  auto plan = PlanGpuMemory(hp, o, 79 * kGiB);
  ASSERT_TRUE(plan.ok()) << plan.status();
  // Non-routed parameters: 671.026e9 - 58 * 256 * 3 * 7168 * 2048 = 16.83e9; in bf16,
  // plus 2 more bytes for each F32 router weight (58 * 256 * 7168).
  const double non_routed = 671.026e9 - 58.0 * 256 * 3 * 7168 * 2048;
  const double want = 2.0 * non_routed + 2.0 * 58 * 256 * 7168;
  EXPECT_NEAR(static_cast<double>(plan->weight_bytes()), want, 0.01 * want);
  EXPECT_EQ(plan->kv_bytes_per_token, 61u * 576u * 2u);  // 70,272 bytes
  EXPECT_GT(plan->kv_tokens, 400000);                    // ~35 GiB of cache
  EXPECT_LE(plan->total_bytes() + o.reserve_bytes, 79 * kGiB);
  EXPECT_EQ(plan->kv_tokens % o.kv_page_size, 0);
  EXPECT_NE(plan->ToString().find("KV cache"), std::string::npos);
  std::printf("%s", plan->ToString().c_str());
}

// Weight forms: both = bf16 + the Q4_K / Q6_K blocks, quantized = bf16 - the
// quantizable matrices' bf16 + the blocks; auto takes bf16, then quantized,
// whichever first leaves one sequence of KV cache (never both: a 1-token
// step through the GEMV would round differently from a larger batch).
TEST(GpuMemoryPlan, WeightFormsCountTheirBytesAndAutoPicksWhatFits) {
  const models::Deepseek2Hparams hp = Dsv3Hparams();
  QuantizableWeights q;
  q.block_bytes = 9 * kGiB;  // ~Q4_K_M-sized blocks of ...
  q.bf16_bytes = 30 * kGiB;  // ... 30 GiB of bf16 matrices
  q.n_matrices = 300;
  q.both_block_bytes = 9 * kGiB;  // all of them Q4_K / Q6_K
  q.both_matrices = 300;
  CudaModelOptions o;
  o.gpu_weights = GpuWeightForm::kBf16;
  auto bf16 = PlanGpuMemory(hp, o, 139 * kGiB, false, 0, 0, q);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ(bf16->weight_form, GpuWeightForm::kBf16);
  EXPECT_EQ(bf16->quantized_weight_bytes, 0u);
  o.gpu_weights = GpuWeightForm::kBoth;
  auto both = PlanGpuMemory(hp, o, 139 * kGiB, false, 0, 0, q);
  ASSERT_TRUE(both.ok()) << both.status();
  EXPECT_EQ(both->weight_bytes(), bf16->weight_bytes() + 9 * kGiB);
  const double page = 64.0 * static_cast<double>(both->kv_bytes_per_token);
  EXPECT_NEAR(static_cast<double>(bf16->kv_bytes - both->kv_bytes), 9.0 * kGiB, page)
      << "the blocks come out of the KV cache";
  o.gpu_weights = GpuWeightForm::kQuantized;
  auto quant = PlanGpuMemory(hp, o, 139 * kGiB, false, 0, 0, q);
  ASSERT_TRUE(quant.ok()) << quant.status();
  EXPECT_EQ(quant->weight_bytes() + 21 * kGiB, bf16->weight_bytes());
  EXPECT_NE(quant->ToString().find("weight form                        quantized"),
            std::string::npos)
      << quant->ToString();
  EXPECT_NE(quant->ToString().find("bf16 copies not kept"), std::string::npos);

  // auto, from roomy to tight: bf16 (also where both would fit), quantized,
  // then an error.
  const uint64_t bf16_fixed = bf16->total_bytes() - bf16->kv_bytes + o.reserve_bytes;
  const uint64_t one_sequence = 512 * 64 * bf16->kv_bytes_per_token;  // 32768 tokens
  o.gpu_weights = GpuWeightForm::kAuto;
  const struct {
    uint64_t free;
    GpuWeightForm want;
  } cases[] = {
      {139 * kGiB, GpuWeightForm::kBf16},
      {bf16_fixed + 9 * kGiB + one_sequence + kGiB, GpuWeightForm::kBf16},
      {bf16_fixed + 9 * kGiB + one_sequence - kGiB, GpuWeightForm::kBf16},
      {bf16_fixed + one_sequence - kGiB, GpuWeightForm::kQuantized},
  };
  for (const auto& c : cases) {
    auto plan = PlanGpuMemory(hp, o, c.free, false, 0, 0, q);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->weight_form, c.want) << plan->ToString();
    EXPECT_EQ(plan->weight_form_requested, GpuWeightForm::kAuto);
    EXPECT_NE(plan->ToString().find("(auto)"), std::string::npos);
  }
  auto none = PlanGpuMemory(hp, o, bf16_fixed - 22 * kGiB, false, 0, 0, q);
  ASSERT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(none.status().message().find("the weight form"), std::string::npos) << none.status();
  // Nothing quantizable: bf16 whatever was asked.
  o.gpu_weights = GpuWeightForm::kQuantized;
  auto plain = PlanGpuMemory(hp, o, 139 * kGiB, false, 0, 0, QuantizableWeights{});
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->weight_form, GpuWeightForm::kBf16);
  EXPECT_EQ(plain->weight_bytes(), bf16->weight_bytes());
}

TEST(GpuMemoryPlan, TooSmallADeviceGetsThePlanAndAdvice) {
  const models::Deepseek2Hparams hp = Dsv3Hparams();
  auto plan = PlanGpuMemory(hp, CudaModelOptions{}, 24 * kGiB);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted);
  const std::string msg(plan.status().message());
  EXPECT_NE(msg.find("does not fit"), std::string::npos) << msg;
  EXPECT_NE(msg.find("attention weights"), std::string::npos) << msg;
  EXPECT_NE(msg.find("max_batch_tokens"), std::string::npos) << msg;
  EXPECT_NE(msg.find("24.00 GiB"), std::string::npos) << msg;
}

TEST(GpuMemoryPlan, RequestedKvTokensAreHonouredOrRefused) {
  const models::Deepseek2Hparams hp = Dsv3Hparams();
  CudaModelOptions o;
  o.kv_tokens = 100000;
  auto plan = PlanGpuMemory(hp, o, 79 * kGiB);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->kv_pages, (100000 + 63) / 64);
  o.kv_tokens = 1000000;  // 65 GiB of cache
  plan = PlanGpuMemory(hp, o, 79 * kGiB);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted);
  o.max_batch_tokens = 0;
  EXPECT_EQ(PlanGpuMemory(hp, o, 79 * kGiB).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(GpuMemoryPlan, ActivationsGrowWithTheBatch) {
  const models::Deepseek2Hparams hp = Dsv3Hparams();
  const GpuWorkLayout a = GpuWorkLayout::For(hp, 1), b = GpuWorkLayout::For(hp, 100);
  EXPECT_EQ(b.device_bytes(), 100 * a.device_bytes());
  EXPECT_EQ(a.ff_max, 18432);  // the dense FFN is wider than the shared expert
  EXPECT_EQ(a.big_q, 128 * 576);
  EXPECT_EQ(a.logits, 129280);
}

// Hot routed experts resident on the GPU: their bytes are a line of the plan
// and come out of the KV cache; with streaming off the streamer's compute
// buffers are still planned (2 slots), since the resident experts use them.
TEST(GpuMemoryPlan, ResidentHotExpertsAreALineAndShrinkTheKvCache) {
  const models::Deepseek2Hparams hp = Dsv3Hparams();
  // DeepSeek-V3 Q4_K_M: gate/up Q4_K, down Q6_K; 256-byte aligned parts.
  const uint64_t expert = 2 * 2048ull * (7168 / 256) * 144 + 7168ull * (2048 / 256) * 210;
  CudaModelOptions o;
  o.experts.mode = GpuExpertMode::kOff;
  auto base = PlanGpuMemory(hp, o, 79 * kGiB, false, expert);
  ASSERT_TRUE(base.ok()) << base.status();
  EXPECT_EQ(base->expert_stream_bytes, 0u);
  EXPECT_EQ(ExpertStreamSlots(o), 0);
  o.resident_experts.resize(hp.n_layer);
  o.resident_experts[3] = {0, 5, 7};
  o.resident_experts[60] = {255};
  EXPECT_EQ(CountResidentExperts(o), 4);
  EXPECT_EQ(ExpertStreamSlots(o), 2);
  const uint64_t resident = 4 * expert;
  auto plan = PlanGpuMemory(hp, o, 79 * kGiB, false, expert, resident);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->resident_experts, 4);
  EXPECT_EQ(plan->resident_expert_bytes, resident);
  EXPECT_EQ(plan->expert_stream_bytes,
            ExpertStreamLayout::For(hp, o.max_batch_tokens, 2, expert).device_bytes());
  EXPECT_EQ(plan->total_bytes(), plan->weight_bytes() + plan->activation_bytes +
                                     plan->workspace_bytes + plan->expert_stream_bytes + resident +
                                     plan->kv_bytes);
  EXPECT_LT(plan->kv_tokens, base->kv_tokens);
  EXPECT_LE(plan->total_bytes() + o.reserve_bytes, 79 * kGiB);
  EXPECT_NE(plan->ToString().find("hot routed experts (4, resident)"), std::string::npos)
      << plan->ToString();
  // Streaming on: its own slot count.
  o.experts.mode = GpuExpertMode::kAuto;
  EXPECT_EQ(ExpertStreamSlots(o), o.experts.n_slots);
  // Too many for the device: the error names them.
  o.experts.mode = GpuExpertMode::kOff;
  auto too_big = PlanGpuMemory(hp, o, 79 * kGiB, false, expert, 60 * kGiB);
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(too_big.status().message().find("hot routed experts"), std::string::npos);
  EXPECT_NE(too_big.status().message().find("--gpu-hot-experts-gib"), std::string::npos);
}

// The plan's slot count and its bytes: each slot one expert's raw blocks;
// the count is a line of the plan; fewer than 2 slots are refused, and with
// streaming off none are planned.
TEST(GpuMemoryPlan, ExpertSlotsAreCountedAndNamed) {
  const models::Deepseek2Hparams hp = Dsv3Hparams();
  const uint64_t expert = 2 * 2048ull * (7168 / 256) * 144 + 7168ull * (2048 / 256) * 210;
  CudaModelOptions o;
  o.gpu_weights = GpuWeightForm::kBf16;
  o.experts.mode = GpuExpertMode::kAuto;
  auto plan = PlanGpuMemory(hp, o, 79 * kGiB, false, expert);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->expert_stream_slots, 32);
  EXPECT_NE(plan->ToString().find("routed-expert streaming (32 slots)"), std::string::npos)
      << plan->ToString();
  o.experts.n_slots = 96;
  auto more = PlanGpuMemory(hp, o, 79 * kGiB, false, expert);
  ASSERT_TRUE(more.ok()) << more.status();
  EXPECT_EQ(more->expert_stream_slots, 96);
  const uint64_t slot = ExpertStreamLayout::For(hp, 1, 1, expert).slot_bytes;
  EXPECT_EQ(more->expert_stream_bytes - plan->expert_stream_bytes, 64 * slot);
  EXPECT_LT(more->kv_tokens, plan->kv_tokens);
  o.experts.n_slots = 1;
  auto bad = PlanGpuMemory(hp, o, 79 * kGiB, false, expert);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("experts.n_slots"), std::string::npos);
  o.experts.mode = GpuExpertMode::kOff;
  plan = PlanGpuMemory(hp, o, 79 * kGiB, false, expert);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->expert_stream_slots, 0);
  EXPECT_EQ(plan->expert_stream_bytes, 0u);
}

TEST(PagedKvAllocator, SequencesGrowPageByPageFromOnePool) {
  PagedKvAllocator kv(/*n_pages=*/9, /*page_size=*/16, /*max_sequences=*/3, /*max_context=*/100);
  EXPECT_EQ(kv.max_pages_per_sequence(), 7);
  auto a = kv.AddSequence(100);
  auto b = kv.AddSequence(40);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(*a, *b);
  ASSERT_TRUE(kv.Reserve(*a, 17).ok());  // 2 pages
  EXPECT_EQ(kv.pages(*a).size(), 2u);
  ASSERT_TRUE(kv.Reserve(*a, 32).ok());  // still 2
  EXPECT_EQ(kv.pages(*a).size(), 2u);
  ASSERT_TRUE(kv.Reserve(*b, 40).ok());  // 3 pages
  EXPECT_EQ(kv.free_pages(), 4);
  std::set<int32_t> all(kv.pages(*a).begin(), kv.pages(*a).end());
  all.insert(kv.pages(*b).begin(), kv.pages(*b).end());
  EXPECT_EQ(all.size(), 5u);  // no page shared
  // Capacity and pool limits, with nothing changed on failure.
  EXPECT_EQ(kv.Reserve(*b, 41).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(kv.Reserve(*a, 100).code(), absl::StatusCode::kResourceExhausted);  // 7 > 2 + 4
  EXPECT_EQ(kv.pages(*a).size(), 2u);
  EXPECT_EQ(kv.free_pages(), 4);
  // Commit only what is reserved.
  EXPECT_TRUE(kv.Commit(*a, 30).ok());
  EXPECT_EQ(kv.Commit(*a, 3).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(kv.length(*a), 30);
  // Truncate returns pages past the kept tokens.
  EXPECT_TRUE(kv.Truncate(*a, 10).ok());
  EXPECT_EQ(kv.pages(*a).size(), 1u);
  EXPECT_EQ(kv.free_pages(), 5);
  EXPECT_EQ(kv.Truncate(*a, 11).code(), absl::StatusCode::kInvalidArgument);
  // Slots.
  auto c = kv.AddSequence(10);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(kv.AddSequence(10).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(kv.AddSequence(101).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(kv.FreeSequence(*b).ok());
  EXPECT_EQ(kv.free_pages(), 8);
  EXPECT_FALSE(kv.Has(*b));
  EXPECT_EQ(kv.FreeSequence(*b).code(), absl::StatusCode::kNotFound);
  auto d = kv.AddSequence(10);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(*d, *b);  // the slot is reused
  EXPECT_EQ(kv.length(*d), 0);
}

}  // namespace
}  // namespace ktx::gpu
