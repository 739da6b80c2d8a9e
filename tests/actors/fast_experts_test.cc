// The shards' fast experts (actors/fast_experts.h): each shard holds only its
// own experts, as copies on its NUMA node, and the copies of all shards add up
// to exactly what one backend holding the whole model repacks (never
// duplicated without replication); with the reference backend the mapped
// bytes add up to the GGUF's routed expert tensors (summed here from the
// file's tensor table, not by ktx's accounting). The shards compute on their
// own pools (kernel runs counted), and an idle engine burns no cpu.
#include "actors/fast_experts.h"

#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "actors/cpu_arena.h"
#include "actors/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/cpu_pool/cpu_pool.h"
#include "runtime/moe_backend/cpu_moe_backend.h"
#include "tests/actors/actors_test_util.h"

namespace ktx::actors {
namespace {

using testing::FixtureModel;
using ::testing::HasSubstr;

std::unique_ptr<Engine> MakeEngine(const std::string& type, int n_shards, ExpertsBackend experts,
                                   topology::PlacementOptions placement = {}) {
  EngineOptions options;
  options.shards = EvenShards(n_shards);
  options.experts = experts;
  options.placement = placement;
  options.kv_budget_bytes = 16 << 20;
  auto engine = Engine::Create(FixtureModel(type), options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

// What one CpuMoeBackend holding every expert of the model repacks.
uint64_t WholeModelRepackedBytes(const models::Deepseek2Model& model) {
  auto pool = moe_backend::CreateCpuPool(1);
  EXPECT_TRUE(pool.ok());
  auto backend = moe_backend::CpuMoeBackend::Create(model, pool->get());
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? (*backend)->load_stats().repacked_bytes : 0;
}

// The GGUF bytes of every ffn_{gate,up,down}_exps tensor, from the file's
// tensor table.
uint64_t GgufRoutedExpertBytes(const models::Deepseek2Model& model) {
  uint64_t bytes = 0;
  for (const gguf::TensorInfo& t : model.file().tensors()) {
    const std::string& name = t.name;
    if (name.find("_exps.weight") != std::string::npos) bytes += t.n_bytes;
  }
  return bytes;
}

class FastExpertsMemoryTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FastExpertsMemoryTest, ShardsHoldEveryExpertOnceAsLocalCopies) {
  const std::string type = GetParam();
  auto model = FixtureModel(type);
  const auto& hp = model->hparams();
  const uint64_t whole = WholeModelRepackedBytes(*model);
  ASSERT_GT(whole, 0u);
  int n_moe = 0;
  for (int il = 0; il < hp.n_layer; ++il) n_moe += hp.IsMoeLayer(il) ? 1 : 0;
  for (int n_shards : {1, 2, 3}) {
    SCOPED_TRACE(n_shards);
    auto engine = MakeEngine(type, n_shards, ExpertsBackend::kFast);
    ASSERT_NE(engine, nullptr);
    const std::vector<ShardInfo> shards = engine->ShardInfos();
    ASSERT_EQ(static_cast<int>(shards.size()), n_shards);
    uint64_t sum = 0;
    int64_t experts = 0;
    for (const ShardInfo& s : shards) {
      EXPECT_TRUE(s.backend.copies) << s.name;
      EXPECT_NE(s.backend.variant, "reference");
      EXPECT_EQ(s.backend.n_fast_layers, n_moe);
      EXPECT_EQ(s.backend.n_reference_layers, 0);
      EXPECT_FALSE(s.backend.cpus.empty());
      sum += s.backend.bytes_held;
      experts += s.n_experts;
      std::printf("[ measured ] %s, %d shard(s): '%s' holds %lld experts, %llu bytes, node %d\n",
                  type.c_str(), n_shards, s.name.c_str(), static_cast<long long>(s.n_experts),
                  static_cast<unsigned long long>(s.backend.bytes_held), s.backend.numa_node);
    }
    EXPECT_EQ(sum, whole);
    EXPECT_EQ(experts, static_cast<int64_t>(n_moe) * hp.n_expert);
  }
}

TEST_P(FastExpertsMemoryTest, ReferenceShardsMapTheGgufExpertsOnce) {
  const std::string type = GetParam();
  auto model = FixtureModel(type);
  const uint64_t gguf = GgufRoutedExpertBytes(*model);
  ASSERT_GT(gguf, 0u);
  for (int n_shards : {1, 2, 3}) {
    SCOPED_TRACE(n_shards);
    auto engine = MakeEngine(type, n_shards, ExpertsBackend::kReference);
    ASSERT_NE(engine, nullptr);
    uint64_t sum = 0;
    for (const ShardInfo& s : engine->ShardInfos()) {
      EXPECT_EQ(s.backend.variant, "reference");
      EXPECT_FALSE(s.backend.copies);
      sum += s.backend.bytes_held;
    }
    EXPECT_EQ(sum, gguf);
  }
}

// The accounting sees copies: with replicated hot experts the shards hold
// more than the model (so the equalities above can fail).
TEST_P(FastExpertsMemoryTest, ReplicasAreCountedOncePerCopy) {
  const std::string type = GetParam();
  auto model = FixtureModel(type);
  topology::PlacementOptions placement;
  placement.replication.n_hot = 2;
  placement.replication.n_copies = 2;
  const auto& hp = model->hparams();
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    std::vector<double> weights(hp.n_expert, 1.0);
    weights[0] = weights[1] = 10.0;
    placement.profile.weights[il] = weights;
  }
  auto engine = MakeEngine(type, 2, ExpertsBackend::kFast, placement);
  ASSERT_NE(engine, nullptr);
  ASSERT_GT(engine->plan().n_replicated, 0);
  uint64_t sum = 0;
  for (const ShardInfo& s : engine->ShardInfos()) sum += s.backend.bytes_held;
  EXPECT_GT(sum, WholeModelRepackedBytes(*model));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FastExpertsMemoryTest,
                         ::testing::Values("bf16", "q8_0", "q4_k_m"));

// The factory alone: a shard's backend holds exactly its experts.
TEST(FastExpertsTest, BackendHoldsOnlyTheShardsExperts) {
  auto model = FixtureModel("q8_0");
  const auto& hp = model->hparams();
  HeldExperts held(hp.n_layer);
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    for (int e = il % 3; e < hp.n_expert; e += 3) held[il].push_back(e);
  }
  const std::vector<int> cpus = AllowedCpus();
  ExpertBackendFactory factory =
      FastExpertBackendFactory(model, {{"a", {}, -1}, {"b", {cpus.front()}, -1}});
  auto backend = factory(1, held);
  ASSERT_TRUE(backend.ok()) << backend.status();
  moe_backend::CpuMoeBackend* fast = FastBackendOf(backend->get());
  ASSERT_NE(fast, nullptr);
  for (int il = 0; il < hp.n_layer; ++il) {
    for (int e = 0; e < hp.n_expert; ++e) {
      const bool want = hp.IsMoeLayer(il) && e % 3 == il % 3;
      EXPECT_EQ(fast->Holds(il, e), want) << "layer " << il << " expert " << e;
    }
  }
  const ShardBackendInfo info = dynamic_cast<ShardExpertBackend&>(**backend).Info();
  EXPECT_EQ(info.cpus, std::vector<int>{cpus.front()});
  EXPECT_TRUE(info.pinned);
  EXPECT_EQ(info.bytes_held, fast->load_stats().repacked_bytes);

  auto bad = factory(2, held);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("shard 2"));
  EXPECT_EQ(FastBackendOf(nullptr), nullptr);
}

TEST(FastExpertsTest, ShardsComputeOnTheirKernelsAndDescribeThemselves) {
  auto engine = MakeEngine("q8_0", 2, ExpertsBackend::kFast);
  ASSERT_NE(engine, nullptr);
  GenerateRequest request;
  request.prompt = testing::PromptTokens();
  request.sampling.temperature = 0.0f;
  request.max_tokens = 4;
  ASSERT_TRUE(engine->Generate(request).ok());
  auto counters = engine->RouterStats();
  ASSERT_TRUE(counters.ok());
  for (const ShardInfo& s : engine->ShardInfos()) {
    EXPECT_GT(s.backend.kernel_runs, 0) << s.name;
    EXPECT_GT(s.backend.kernel_weight_bytes, 0) << s.name;
  }
  ASSERT_EQ(counters->compute_us.size(), 2u);
  for (int64_t us : counters->compute_us) EXPECT_GT(us, 0);
  const std::string text = engine->Describe();
  EXPECT_THAT(text, HasSubstr("shard 0 'shard0'"));
  EXPECT_THAT(text, HasSubstr("experts " + engine->ShardInfos()[0].backend.variant));
  EXPECT_THAT(text,
              ::testing::ContainsRegex("routed experts, [0-9.]+ [KM]iB (on NUMA node [0-9]+|in "
                                       "plain memory)"));
}

double ProcessCpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

// No core spins while the engine waits for work: the shard dispatchers sleep
// on a condition variable, the pools' workers in oneTBB's sleep, CAF's workers
// on theirs.
TEST(FastExpertsTest, IdleEngineBurnsNoCpu) {
  auto engine = MakeEngine("q8_0", 2, ExpertsBackend::kFast);
  ASSERT_NE(engine, nullptr);
  GenerateRequest request;
  request.prompt = testing::PromptTokens();
  request.sampling.temperature = 0.0f;
  request.max_tokens = 8;
  ASSERT_TRUE(engine->Generate(request).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // spins end
  const double cpu0 = ProcessCpuSeconds();
  const auto t0 = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double cpu = ProcessCpuSeconds() - cpu0;
  std::printf("[ measured ] idle engine: %.1f ms of cpu in %.0f ms\n", 1e3 * cpu, 1e3 * wall);
  EXPECT_LT(cpu, 0.05 * wall);  // one spinning core would be >= 1.0 x wall
}

}  // namespace
}  // namespace ktx::actors
