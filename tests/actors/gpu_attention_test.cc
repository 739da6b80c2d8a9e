// The GPU attention actor (actors/gpu_attention_actor.h) through the Engine
// with attention_device "cuda:0": non-expert stages on the GPU, routed
// experts on 1 or 2 expert shards through the router. Skips LOUDLY without a
// usable GPU (or without CUDA in the build).
//
// Tolerances are those of tests/runtime/gpu/cuda_deepseek2_test.cc (the same
// GPU numerics: bf16 activations into every product, bf16 KV cache): the
// fixtures' tier-B bounds per file (tests/data/README.md section 6) for the
// prompt logits against the float64 reference, and greedy tokens equal to
// the reference (= the CPU engine's) at least up to the first step whose
// reference top-2 margin is below 1.0. Between two GPU runs that differ only
// in batch composition (concurrent vs alone) tokens must agree while the
// alone run's top-2 margin is at least 0.25 (bf16 rounding moves logits by
// ~1e-2 at most on these files).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <future>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "actors/engine.h"
#include "actors/gpu_attention_actor.h"
#include "gtest/gtest.h"
#include "kernels/cuda/device_query.h"
#include "runtime/base/status.h"
#include "tests/actors/actors_test_util.h"
#include "topology/gguf_experts.h"
#include "topology/gpu_hot_experts.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;
using testing::FixtureModel;
using testing::LoadF32;
using testing::Manifest;

std::string NoGpuReason() {
  if (!GpuAttentionAvailable()) return "ktx_actors was built without CUDA (KTX_CUDA=OFF)";
  std::string note;
  if (kernels::QueryCudaDevices(&note).empty()) {
    return note.empty() ? std::string("no CUDA device") : note;
  }
  return "";
}

#define KTX_SKIP_WITHOUT_GPU_LOUDLY()                                                          \
  do {                                                                                         \
    const std::string ktx_why_ = NoGpuReason();                                                \
    if (!ktx_why_.empty()) {                                                                   \
      std::fprintf(stderr, "\n*** SKIPPED: the GPU attention test needs a CUDA GPU: %s ***\n", \
                   ktx_why_.c_str());                                                          \
      GTEST_SKIP() << "needs a CUDA GPU (" << ktx_why_ << ")";                                 \
    }                                                                                          \
  } while (false)

double RelL2(const float* got, const float* want, int64_t n) {
  double d = 0.0, r = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = static_cast<double>(got[i]) - want[i];
    d += e * e;
    r += static_cast<double>(want[i]) * want[i];
  }
  return r > 0.0 ? std::sqrt(d / r) : std::sqrt(d);
}

double Margin(const float* row, int64_t n) {
  std::vector<float> v(row, row + n);
  std::partial_sort(v.begin(), v.begin() + 2, v.end(), std::greater<float>());
  return static_cast<double>(v[0]) - v[1];
}

struct TierB {
  double rel_l2, median_row, argmax_agree;
};

// Row-by-row comparison of logits F32 [n_rows, n_vocab] against `want`: the
// whole-matrix and median/max row relative L2, and the argmax agreement on
// the rows where want's top-2 margin exceeds 1.
struct LogitRows {
  double all = 0, median = 0, max = 0, agreement = 0;
  int confident = 0;
};

LogitRows CompareLogitRows(const float* got, const float* want, int64_t n_rows, int64_t n_vocab) {
  LogitRows out;
  std::vector<double> rows;
  int agree = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* g = got + r * n_vocab;
    const float* w = want + r * n_vocab;
    rows.push_back(RelL2(g, w, n_vocab));
    if (Margin(w, n_vocab) > 1.0) {
      ++out.confident;
      agree += testing::Argmax(g, n_vocab) == testing::Argmax(w, n_vocab);
    }
  }
  std::sort(rows.begin(), rows.end());
  out.all = RelL2(got, want, n_rows * n_vocab);
  out.median = rows.empty() ? 0 : rows[rows.size() / 2];
  out.max = rows.empty() ? 0 : rows.back();
  out.agreement = static_cast<double>(agree) / std::max(out.confident, 1);
  return out;
}

// The largest routed expert of any layer, bytes (GGUF blocks).
uint64_t LargestExpertBytes(const models::Deepseek2Model& model) {
  auto table = topology::ModelExpertTableFromGguf(model.file());
  EXPECT_TRUE(table.ok()) << table.status();
  uint64_t per_expert = 0;
  if (!table.ok()) return 0;
  for (const topology::LayerExperts& l : table->layers) {
    per_expert = std::max(per_expert, l.bytes_per_expert);
  }
  return per_expert;
}

TierB Bounds(const std::string& file) {
  if (file == "bf16") return {0.16, 0.022, 0.90};
  if (file == "q8_0") return {0.23, 0.046, 0.90};
  return {0.30, 0.074, 0.90};
}

EngineOptions Options(int n_shards, const std::string& device) {
  EngineOptions options;
  options.shards = EvenShards(n_shards);
  options.attention_device = device;
  options.kv_budget_bytes = uint64_t{256} << 20;
  return options;
}

GenerateRequest Greedy(std::vector<int32_t> prompt, int max_tokens) {
  GenerateRequest r;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.max_tokens = max_tokens;
  r.stop_at_eos = false;
  return r;
}

std::vector<int32_t> Prompt(int n) {
  std::vector<int32_t> p = testing::PromptTokens();
  while (static_cast<int>(p.size()) < n) p.push_back(p[p.size() % 7]);
  p.resize(n);
  return p;
}

struct Param {
  std::string file;
  int shards;
};

class GpuAttentionFixtureTest : public ::testing::TestWithParam<Param> {};

// Prompt logits (Engine::Logits: chunked prefill through the scheduler)
// within tier B of the float64 reference, greedy tokens equal to the
// reference while it is confident, and the CPU engine's tokens alongside.
TEST_P(GpuAttentionFixtureTest, MatchesTheReferenceAndTheCpuEngine) {
  KTX_SKIP_WITHOUT_GPU_LOUDLY();
  const Param p = GetParam();
  auto model = FixtureModel(p.file);
  ASSERT_NE(model, nullptr);
  const nlohmann::json& files = Manifest()["files"][p.file];
  const int64_t n_vocab = model->n_vocab();
  const std::vector<int32_t> prompt = testing::PromptTokens();

  auto gpu = Engine::Create(model, Options(p.shards, "cuda:0"));
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ((*gpu)->attention_device(), "cuda:0");
  ASSERT_TRUE((*gpu)->gpu_memory_plan().has_value());
  std::printf("%s", (*gpu)->Describe().c_str());

  auto logits = (*gpu)->Logits(prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const std::vector<float> want = LoadF32(files["ref64_prompt_logits"]["file"]);
  ASSERT_EQ(logits->values().size(), want.size());
  const int64_t n_rows = static_cast<int64_t>(want.size()) / n_vocab;
  const LogitRows cmp = CompareLogitRows(logits->data(), want.data(), n_rows, n_vocab);
  const double all = cmp.all, median = cmp.median, agreement = cmp.agreement;
  const int confident = cmp.confident;
  std::printf(
      "[ measured ] %s, %d shard(s): prompt logits rel L2 %.3e, median row %.3e, max row %.3e, "
      "argmax agreement %.3f (%d rows with margin > 1)\n",
      p.file.c_str(), p.shards, all, median, cmp.max, agreement, confident);
  const TierB b = Bounds(p.file);
  EXPECT_LE(all, b.rel_l2);
  EXPECT_LE(median, b.median_row);
  EXPECT_GE(agreement, b.argmax_agree);

  const auto ref_tokens = files["ref64_greedy_tokens"].get<std::vector<int32_t>>();
  const auto margins = files["ref64_greedy_top2_margin"].get<std::vector<double>>();
  const int n_gen = static_cast<int>(ref_tokens.size());
  auto gpu_run = (*gpu)->Generate(Greedy(prompt, n_gen));
  ASSERT_TRUE(gpu_run.ok()) << gpu_run.status();
  auto cpu = Engine::Create(model, Options(p.shards, "cpu"));
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto cpu_run = (*cpu)->Generate(Greedy(prompt, n_gen));
  ASSERT_TRUE(cpu_run.ok()) << cpu_run.status();
  size_t same_ref = 0, same_cpu = 0;
  while (same_ref < ref_tokens.size() && same_ref < gpu_run->tokens.size() &&
         gpu_run->tokens[same_ref] == ref_tokens[same_ref]) {
    ++same_ref;
  }
  while (same_cpu < cpu_run->tokens.size() && same_cpu < gpu_run->tokens.size() &&
         gpu_run->tokens[same_cpu] == cpu_run->tokens[same_cpu]) {
    ++same_cpu;
  }
  size_t required = 0;
  while (required < margins.size() && margins[required] >= 1.0) ++required;
  std::printf(
      "[ measured ] %s, %d shard(s): GPU engine greedy tokens equal to the reference for %zu "
      "of %d, to the CPU engine for %zu (required: %zu)\n",
      p.file.c_str(), p.shards, same_ref, n_gen, same_cpu, required);
  EXPECT_GE(same_ref, required);
  EXPECT_GE(same_cpu, required);

  // Everything was freed again.
  auto kv = (*gpu)->KvStats();
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ(kv->n_sequences, 0);
  EXPECT_EQ(kv->used_bytes, 0u);
}

// Hot routed experts resident on the GPU (EngineOptions::gpu_hot_experts_bytes,
// 1.5 layers' worth, uniform without a profile): the shards hold exactly the
// other experts (ShardInfos), Describe names them, the prompt logits stay
// within tier B of the float64 reference and greedy tokens equal the CPU
// engine's while the reference is confident.
TEST_P(GpuAttentionFixtureTest, HotExpertsOnTheGpuMatchTheReference) {
  KTX_SKIP_WITHOUT_GPU_LOUDLY();
  const Param p = GetParam();
  auto model = FixtureModel(p.file);
  ASSERT_NE(model, nullptr);
  const models::Deepseek2Hparams& hp = model->hparams();
  const nlohmann::json& files = Manifest()["files"][p.file];
  const int64_t n_vocab = model->n_vocab();
  const std::vector<int32_t> prompt = testing::PromptTokens();
  const uint64_t per_expert = LargestExpertBytes(*model);
  ASSERT_GT(per_expert, 0u);
  EngineOptions options = Options(p.shards, "cuda:0");
  options.gpu_hot_experts_bytes = per_expert * (hp.n_expert + hp.n_expert / 2);
  auto gpu = Engine::Create(model, options);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const topology::GpuHotExperts& hot = (*gpu)->gpu_hot_experts();
  EXPECT_GE(hot.count, hp.n_expert);
  EXPECT_LE(hot.bytes, options.gpu_hot_experts_bytes);
  EXPECT_EQ((*gpu)->gpu_memory_plan()->resident_experts, hot.count);
  const std::string described = (*gpu)->Describe();
  std::printf("%s", described.c_str());
  EXPECT_NE(described.find("routed experts on the GPU"), std::string::npos);
  auto base = Engine::Create(model, Options(p.shards, "cuda:0"));
  ASSERT_TRUE(base.ok()) << base.status();
  int64_t held = 0, held_base = 0;
  for (const ShardInfo& s : (*gpu)->ShardInfos()) held += s.n_experts;
  for (const ShardInfo& s : (*base)->ShardInfos()) held_base += s.n_experts;
  EXPECT_EQ(held + hot.count, held_base) << "the shards still hold the GPU's experts";
  base->reset();

  auto logits = (*gpu)->Logits(prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const std::vector<float> want = LoadF32(files["ref64_prompt_logits"]["file"]);
  ASSERT_EQ(logits->values().size(), want.size());
  const int64_t n_rows = static_cast<int64_t>(want.size()) / n_vocab;
  const LogitRows cmp = CompareLogitRows(logits->data(), want.data(), n_rows, n_vocab);
  const double all = cmp.all, median = cmp.median, agreement = cmp.agreement;
  std::printf(
      "[ measured ] %s, %d shard(s), %d hot experts on the GPU: prompt logits rel L2 %.3e, "
      "median row %.3e, argmax agreement %.3f\n",
      p.file.c_str(), p.shards, hot.count, all, median, agreement);
  const TierB b = Bounds(p.file);
  EXPECT_LE(all, b.rel_l2);
  EXPECT_LE(median, b.median_row);
  EXPECT_GE(agreement, b.argmax_agree);

  const auto ref_tokens = files["ref64_greedy_tokens"].get<std::vector<int32_t>>();
  const auto margins = files["ref64_greedy_top2_margin"].get<std::vector<double>>();
  const int n_gen = static_cast<int>(ref_tokens.size());
  auto gpu_run = (*gpu)->Generate(Greedy(prompt, n_gen));
  ASSERT_TRUE(gpu_run.ok()) << gpu_run.status();
  size_t same_ref = 0;
  while (same_ref < ref_tokens.size() && same_ref < gpu_run->tokens.size() &&
         gpu_run->tokens[same_ref] == ref_tokens[same_ref]) {
    ++same_ref;
  }
  size_t required = 0;
  while (required < margins.size() && margins[required] >= 1.0) ++required;
  std::printf(
      "[ measured ] %s: with hot experts, greedy tokens equal to the reference for %zu "
      "of %d (required: %zu)\n",
      p.file.c_str(), same_ref, n_gen, required);
  EXPECT_GE(same_ref, required);
}

// Expert deferral per request on the GPU attention path: for both join
// points the prompt logits equal the CPU engine's under the same policy
// (within the GPU's tier-B row bounds), also with hot experts resident on the
// GPU (their deferred entries run there); deferral really changes the logits;
// and a deferring request batched with a plain one leaves the plain one's
// tokens as they are alone.
TEST_P(GpuAttentionFixtureTest, ExpertDeferralMatchesTheCpuEngine) {
  KTX_SKIP_WITHOUT_GPU_LOUDLY();
  const Param p = GetParam();
  auto model = FixtureModel(p.file);
  ASSERT_NE(model, nullptr);
  const models::Deepseek2Hparams& hp = model->hparams();
  const int64_t n_vocab = model->n_vocab();
  const std::vector<int32_t> prompt = testing::PromptTokens();
  auto gpu = Engine::Create(model, Options(p.shards, "cuda:0"));
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = Engine::Create(model, Options(p.shards, "cpu"));
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const uint64_t per_expert = LargestExpertBytes(*model);
  ASSERT_GT(per_expert, 0u);
  EngineOptions hot_options = Options(p.shards, "cuda:0");
  hot_options.gpu_hot_experts_bytes = per_expert * (hp.n_expert + hp.n_expert / 2);
  auto hot = Engine::Create(model, hot_options);
  ASSERT_TRUE(hot.ok()) << hot.status();

  auto compare = [&](const models::Activations& got, const models::Activations& want,
                     const char* what) {
    ASSERT_EQ(got.values().size(), want.values().size());
    const LogitRows cmp = CompareLogitRows(got.data(), want.data(), want.n_tokens(), n_vocab);
    const double median = cmp.median, agreement = cmp.agreement;
    std::printf("[ measured ] %s, %d shard(s): %s: median row rel L2 %.3e, argmax %.3f\n",
                p.file.c_str(), p.shards, what, median, agreement);
    const TierB b = Bounds(p.file);
    EXPECT_LE(median, b.median_row) << what;
    EXPECT_GE(agreement, b.argmax_agree) << what;
  };
  auto full = (*cpu)->Logits(prompt);
  ASSERT_TRUE(full.ok()) << full.status();
  for (const models::DeferJoin join :
       {models::DeferJoin::kNextMoe, models::DeferJoin::kNextAttention}) {
    auto policy = std::make_shared<models::RoutingPolicy>(models::RoutingPolicy::Defer(2, join));
    SCOPED_TRACE(policy->ToString());
    auto want = (*cpu)->Logits(prompt, policy);
    ASSERT_TRUE(want.ok()) << want.status();
    std::vector<double> moved;
    for (int64_t r = 0; r < want->n_tokens(); ++r) {
      moved.push_back(RelL2(want->row(r), full->row(r), n_vocab));
    }
    std::sort(moved.begin(), moved.end());
    EXPECT_GT(moved[moved.size() / 2], 1e-3) << "deferral hardly changes the logits";
    auto got = (*gpu)->Logits(prompt, policy);
    ASSERT_TRUE(got.ok()) << got.status();
    compare(*got, *want, "deferral, GPU vs CPU engine");
    auto got_hot = (*hot)->Logits(prompt, policy);
    ASSERT_TRUE(got_hot.ok()) << got_hot.status();
    compare(*got_hot, *want, "deferral with hot experts on the GPU, GPU vs CPU engine");
  }
  // A deferring request batched with a plain one.
  GenerateRequest plain = Greedy(Prompt(29), 8);
  plain.return_logits = ReturnLogits::kSampled;
  auto alone = (*gpu)->Generate(plain);
  ASSERT_TRUE(alone.ok()) << alone.status();
  GenerateRequest deferring = Greedy(prompt, 8);
  deferring.routing_policy =
      std::make_shared<models::RoutingPolicy>(models::RoutingPolicy::Defer(3));
  std::promise<absl::StatusOr<GenerateResult>> a, b;
  (*gpu)->GenerateAsync(deferring, {},
                        [&](absl::StatusOr<GenerateResult> r) { a.set_value(std::move(r)); });
  (*gpu)->GenerateAsync(plain, {},
                        [&](absl::StatusOr<GenerateResult> r) { b.set_value(std::move(r)); });
  auto ra = a.get_future().get();
  auto rb = b.get_future().get();
  ASSERT_TRUE(ra.ok()) << ra.status();
  ASSERT_TRUE(rb.ok()) << rb.status();
  EXPECT_EQ(ra->tokens.size(), 8u);
  ASSERT_EQ(rb->tokens.size(), alone->tokens.size());
  double worst = 0.0;
  for (size_t t = 0; t < alone->tokens.size(); ++t) {
    const float* x = alone->logits.row(static_cast<int64_t>(t));
    worst = std::max(worst, RelL2(rb->logits.row(static_cast<int64_t>(t)), x, n_vocab));
    if (Margin(x, n_vocab) < 0.25) break;  // a rounding-sized gap: may flip
    EXPECT_EQ(rb->tokens[t], alone->tokens[t]) << "token " << t;
    if (rb->tokens[t] != alone->tokens[t]) break;
  }
  std::printf("[ measured ] plain request beside a deferring one: worst row rel L2 %.2e\n", worst);
  EXPECT_LT(worst, 2e-2) << "a deferring neighbour changed a plain request";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GpuAttentionFixtureTest,
                         ::testing::Values(Param{"bf16", 1}, Param{"q8_0", 1}, Param{"q4_k_m", 1},
                                           Param{"bf16", 2}, Param{"q8_0", 2}, Param{"q4_k_m", 2}),
                         [](const ::testing::TestParamInfo<Param>& info) {
                           return info.param.file + "_shards" + std::to_string(info.param.shards);
                         });

// 16 requests of different lengths at once (mixed prefill and decode steps)
// give each request's own tokens, as when it runs alone.
TEST(GpuAttentionTest, SixteenConcurrentRequestsEqualEachAlone) {
  KTX_SKIP_WITHOUT_GPU_LOUDLY();
  auto model = FixtureModel("q8_0");
  ASSERT_NE(model, nullptr);
  const int64_t n_vocab = model->n_vocab();
  EngineOptions options = Options(2, "cuda:0");
  options.prefill_chunk = 16;  // long prompts take several steps next to the decodes
  auto engine = Engine::Create(model, options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  constexpr int kRequests = 16;
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < kRequests; ++i) {
    GenerateRequest r = Greedy(Prompt(1 + 7 * i), 6 + i % 5);
    r.return_logits = ReturnLogits::kSampled;
    requests.push_back(std::move(r));
  }
  std::vector<std::promise<absl::StatusOr<GenerateResult>>> done(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    (*engine)->GenerateAsync(requests[i], {}, [&done, i](absl::StatusOr<GenerateResult> r) {
      done[i].set_value(std::move(r));
    });
  }
  std::vector<GenerateResult> together(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    auto future = done[i].get_future();
    ASSERT_EQ(future.wait_for(std::chrono::seconds(120)), std::future_status::ready) << i;
    auto r = future.get();
    ASSERT_TRUE(r.ok()) << i << ": " << r.status();
    together[i] = std::move(*r);
  }
  int compared = 0;
  for (int i = 0; i < kRequests; ++i) {
    auto alone = (*engine)->Generate(requests[i]);
    ASSERT_TRUE(alone.ok()) << i << ": " << alone.status();
    ASSERT_EQ(alone->tokens.size(), together[i].tokens.size()) << i;
    double worst = 0.0;
    for (size_t t = 0; t < alone->tokens.size(); ++t) {
      const float* a = alone->logits.row(static_cast<int64_t>(t));
      const float* b = together[i].logits.row(static_cast<int64_t>(t));
      worst = std::max(worst, RelL2(b, a, n_vocab));
      if (Margin(a, n_vocab) < 0.25) break;  // a rounding-sized gap: may flip
      EXPECT_EQ(together[i].tokens[t], alone->tokens[t]) << "request " << i << ", token " << t;
      ++compared;
      if (together[i].tokens[t] != alone->tokens[t]) break;
    }
    std::printf("[ measured ] request %d (prompt %zu): worst sampled-row rel L2 %.2e\n", i,
                requests[i].prompt.size(), worst);
  }
  EXPECT_GT(compared, kRequests * 3);
  auto kv = (*engine)->KvStats();
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ(kv->n_sequences, 0);
  EXPECT_EQ(kv->used_bytes, 0u);
}

// Cancelling a request frees its GPU KV pages (KvStats).
TEST(GpuAttentionTest, CancelFreesTheGpuKvCache) {
  KTX_SKIP_WITHOUT_GPU_LOUDLY();
  auto model = FixtureModel("q8_0");
  ASSERT_NE(model, nullptr);
  auto engine = Engine::Create(model, Options(1, "cuda:0"));
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto idle = (*engine)->KvStats();
  ASSERT_TRUE(idle.ok());
  EXPECT_EQ(idle->n_sequences, 0);
  EXPECT_EQ(idle->used_bytes, 0u);
  EXPECT_GT(idle->budget_bytes, 0u);
  EXPECT_GT(idle->free_tokens, 0);
  KvCacheStats during;
  int seen = 0;
  auto result = (*engine)->Generate(Greedy(Prompt(40), 200), [&](int32_t, std::string_view) {
    if (++seen == 3) {
      auto kv = (*engine)->KvStats();
      EXPECT_TRUE(kv.ok());
      if (kv.ok()) during = *kv;
      return false;  // cancel
    }
    return true;
  });
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled) << result.status();
  std::printf("[ measured ] during: %lld sequence(s), %llu bytes used, %lld free tokens\n",
              static_cast<long long>(during.n_sequences),
              static_cast<unsigned long long>(during.used_bytes),
              static_cast<long long>(during.free_tokens));
  EXPECT_EQ(during.n_sequences, 1);
  EXPECT_GT(during.used_bytes, 0u);
  EXPECT_LT(during.free_tokens, idle->free_tokens);
  const auto until = Clock::now() + std::chrono::seconds(10);
  absl::StatusOr<KvCacheStats> after = (*engine)->KvStats();
  while (Clock::now() < until && after.ok() && after->n_sequences != 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    after = (*engine)->KvStats();
  }
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->n_sequences, 0);
  EXPECT_EQ(after->used_bytes, 0u);
  EXPECT_EQ(after->free_tokens, idle->free_tokens);
}

// Records which experts (per layer) are computed.
class RecordingBackend final : public models::ExpertBackend {
 public:
  RecordingBackend(std::shared_ptr<models::ExpertBackend> inner, int n_layer)
      : inner_(std::move(inner)), used_(n_layer) {}
  absl::Status Compute(int il, const models::Activations& h, const models::Routing& routing,
                       std::span<const uint8_t> mask, models::Activations* out) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int32_t e : routing.expert_ids) {
        if (e >= 0 && (mask.empty() || mask[e])) used_[il].insert(e);
      }
    }
    return inner_->Compute(il, h, routing, mask, out);
  }
  std::vector<std::set<int>> used() {
    std::lock_guard<std::mutex> lock(mu_);
    return used_;
  }

 private:
  std::shared_ptr<models::ExpertBackend> inner_;
  std::mutex mu_;
  std::vector<std::set<int>> used_;
};

// Shard 1 holds one expert per MoE layer that a small request never uses
// and is killed: a larger request that needs it fails with UNAVAILABLE
// naming 'shard1' while the small one, decoding in the same steps, finishes
// with its own tokens.
TEST(GpuAttentionTest, AFailedShardFailsOnlyItsSlices) {
  KTX_SKIP_WITHOUT_GPU_LOUDLY();
  auto model = FixtureModel("q8_0");
  ASSERT_NE(model, nullptr);
  const models::Deepseek2Hparams& hp = model->hparams();
  const GenerateRequest small = Greedy(Prompt(2), 12);
  const GenerateRequest large = Greedy(Prompt(65), 2);
  std::vector<std::set<int>> small_used, large_used;
  std::vector<int32_t> small_tokens;
  for (int pass = 0; pass < 2; ++pass) {
    std::shared_ptr<RecordingBackend> recorder;
    EngineOptions options = Options(1, "cuda:0");
    ExpertBackendFactory mapped = MappedExpertBackendFactory(model);
    options.expert_backend_factory =
        [&](int s,
            const HeldExperts& held) -> absl::StatusOr<std::shared_ptr<models::ExpertBackend>> {
      KTX_ASSIGN_OR_RETURN(auto backend, mapped(s, held));
      recorder = std::make_shared<RecordingBackend>(std::move(backend), hp.n_layer);
      return recorder;
    };
    auto engine = Engine::Create(model, options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    auto result = (*engine)->Generate(pass == 0 ? small : large);
    ASSERT_TRUE(result.ok()) << result.status();
    if (pass == 0) {
      small_used = recorder->used();
      small_tokens = result->tokens;
    } else {
      large_used = recorder->used();
    }
  }
  topology::PlacementPlan plan;
  plan.n_layer = hp.n_layer;
  plan.layers.resize(hp.n_layer);
  plan.shards.resize(2);
  bool large_needs_shard1 = false;
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    int unused = -1;
    for (int e = 0; e < hp.n_expert && unused < 0; ++e) {
      if (!small_used[il].count(e) && large_used[il].count(e)) unused = e;
    }
    for (int e = 0; e < hp.n_expert && unused < 0; ++e) {
      if (!small_used[il].count(e)) unused = e;
    }
    ASSERT_GE(unused, 0) << "layer " << il;
    large_needs_shard1 = large_needs_shard1 || large_used[il].count(unused);
    plan.layers[il].shards_of_expert.assign(hp.n_expert, {0});
    plan.layers[il].shards_of_expert[unused] = {1};
  }
  ASSERT_TRUE(large_needs_shard1);

  EngineOptions options = Options(2, "cuda:0");
  options.plan = plan;
  options.experts = ExpertsBackend::kReference;  // the same experts as the recording passes
  auto engine_or = Engine::Create(model, options);
  ASSERT_TRUE(engine_or.ok()) << engine_or.status();
  auto& engine = *engine_or;
  ASSERT_TRUE(engine->KillShard(1).ok());
  const auto until = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < until) {
    auto stats = engine->RouterStats();
    if (stats.ok() && !stats->alive[1]) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }

  // The small request decodes; the large one joins its steps and fails.
  std::mutex mu;
  std::condition_variable cv;
  int small_seen = 0;
  std::promise<absl::StatusOr<GenerateResult>> small_done;
  engine->GenerateAsync(
      small,
      [&](int32_t, std::string_view) {
        std::lock_guard<std::mutex> lock(mu);
        ++small_seen;
        cv.notify_all();
        return true;
      },
      [&](absl::StatusOr<GenerateResult> r) { small_done.set_value(std::move(r)); });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return small_seen >= 1; }));
  }
  auto failed = engine->Generate(large);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable) << failed.status();
  EXPECT_NE(failed.status().message().find("'shard1'"), std::string::npos) << failed.status();
  auto future = small_done.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(60)), std::future_status::ready);
  auto served = future.get();
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_EQ(served->tokens, small_tokens);
  auto log = engine->StepLog();
  ASSERT_TRUE(log.ok());
  std::printf("[ measured ] %zu steps; the small request finished %zu tokens: %s\n", log->size(),
              served->tokens.size(), std::string(failed.status().message()).c_str());
}

// The per-layer profile is filled on the GPU path (bench breakdowns).
TEST(GpuAttentionTest, ProfileHasAttentionMoeAndShardTimes) {
  KTX_SKIP_WITHOUT_GPU_LOUDLY();
  auto model = FixtureModel("q8_0");
  ASSERT_NE(model, nullptr);
  EngineOptions options = Options(2, "cuda:0");
  options.profile_steps = 64;
  auto engine = Engine::Create(model, options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto result = (*engine)->Generate(Greedy(Prompt(20), 4));
  ASSERT_TRUE(result.ok()) << result.status();
  const std::vector<StepProfile> steps = (*engine)->Profile();
  ASSERT_FALSE(steps.empty());
  const models::Deepseek2Hparams& hp = model->hparams();
  for (const StepProfile& step : steps) {
    EXPECT_GT(step.wall_us, 0);
    EXPECT_GT(step.n_rows, 0);
    int64_t moe = 0, shards = 0;
    for (int il = 0; il < hp.n_layer; ++il) {
      const LayerTiming& l = step.layers[il];
      if (!hp.IsMoeLayer(il)) continue;
      moe += l.moe_us;
      for (int64_t us : l.shard_us) shards += us;
      EXPECT_GT(l.distinct_experts, 0);
      EXPECT_GE(l.moe_us, l.experts_us);
    }
    EXPECT_GT(moe, 0);
    EXPECT_GT(shards, 0);
  }
}

}  // namespace
}  // namespace ktx::actors
