// Failures in the actor runtime never hang a request:
//  - a shard killed while it computes: the request fails at once with
//    UNAVAILABLE naming the shard (well inside the deadline), later requests
//    that need its experts fail the same way, and requests the remaining plan
//    can serve keep working;
//  - with a replica holding the same experts, the request finishes (and gives
//    the reference tokens);
//  - a shard that hangs: DEADLINE_EXCEEDED naming it after the shard deadline,
//    or, with a replica, the work moves there.
// Shards are held inside Compute by a gate (a test ExpertBackend) so that
// "mid-request" is deterministic.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <future>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "actors/engine.h"
#include "gtest/gtest.h"
#include "tests/actors/actors_test_util.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;
using testing::FixtureModel;
using testing::Gate;
using testing::GatedBackend;
using testing::OpenOnExit;

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
        if (mask.empty() || mask[e]) used_[il].insert(e);
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

ExpertBackendFactory GateShard(std::shared_ptr<const models::Deepseek2Model> model, int shard,
                               std::shared_ptr<Gate> gate) {
  ExpertBackendFactory mapped = MappedExpertBackendFactory(model);
  return [mapped, shard, gate](
             int s,
             const HeldExperts& held) -> absl::StatusOr<std::shared_ptr<models::ExpertBackend>> {
    KTX_ASSIGN_OR_RETURN(auto backend, mapped(s, held));
    if (s != shard) return backend;
    return std::make_shared<GatedBackend>(std::move(backend), gate);
  };
}

// Every expert of every MoE layer on both shards.
topology::PlacementPlan FullyReplicatedPlan(const models::Deepseek2Hparams& hp) {
  topology::PlacementPlan plan;
  plan.n_layer = hp.n_layer;
  plan.layers.resize(hp.n_layer);
  plan.shards.resize(2);
  plan.shards[0].name = "shard0";
  plan.shards[1].name = "shard1";
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    plan.layers[il].shards_of_expert.assign(hp.n_expert, {0, 1});
    plan.layers[il].weight.assign(hp.n_expert, 1.0);
  }
  return plan;
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
  p.resize(n);
  return p;
}

// Every test runs with the in-process lane (the default) and without it
// (every MoE layer through the router actor).
class EngineFaultTest : public ::testing::TestWithParam<bool> {
 protected:
  // Two even shards, shard 1 held at `gate`, the lane as the parameter says.
  EngineOptions GatedOptions(std::shared_ptr<const models::Deepseek2Model> model,
                             std::shared_ptr<Gate> gate) const {
    EngineOptions options;
    options.local_lane = GetParam();
    options.shards = EvenShards(2);
    options.expert_backend_factory = GateShard(std::move(model), 1, std::move(gate));
    return options;
  }
};

bool WaitUntilDown(Engine& engine, int shard) {
  const auto until = Clock::now() + std::chrono::seconds(10);
  while (Clock::now() < until) {
    auto stats = engine.RouterStats();
    if (stats.ok() && !stats->alive[shard]) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

TEST_P(EngineFaultTest, ShardKilledMidRequestFailsNamingTheShard) {
  auto model = FixtureModel("q8_0");
  auto gate = std::make_shared<Gate>();
  EngineOptions options = GatedOptions(model, gate);
  options.shard_deadline = std::chrono::milliseconds(5000);
  auto engine_or = Engine::Create(model, options);
  ASSERT_TRUE(engine_or.ok()) << engine_or.status();
  std::unique_ptr<Engine> engine = std::move(*engine_or);
  OpenOnExit open{gate};

  std::promise<absl::StatusOr<GenerateResult>> done;
  engine->GenerateAsync(Greedy(Prompt(20), 4), {},
                        [&](absl::StatusOr<GenerateResult> r) { done.set_value(std::move(r)); });
  ASSERT_TRUE(gate->WaitEntered(1, std::chrono::seconds(30)));
  const auto killed_at = Clock::now();
  ASSERT_TRUE(engine->KillShard(1).ok());
  auto future = done.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(3)), std::future_status::ready)
      << "the request hangs after its shard died";
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - killed_at).count();
  auto result = future.get();
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable) << result.status();
  EXPECT_NE(result.status().message().find("'shard1'"), std::string::npos) << result.status();
  EXPECT_LT(ms, 5000.0);  // well before the shard deadline
  std::printf("[ measured ] failed %.1f ms after the kill: %s\n", ms,
              std::string(result.status().message()).c_str());
  gate->Open();

  // Requests that need the dead shard's experts fail at once, naming it.
  const auto start = Clock::now();
  auto again = engine->Generate(Greedy(Prompt(20), 2));
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(again.status().message().find("'shard1'"), std::string::npos) << again.status();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 2.0);

  auto kv = engine->KvStats();
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ(kv->n_sequences, 0);
  auto stats = engine->RouterStats();
  ASSERT_TRUE(stats.ok());
  EXPECT_TRUE(stats->alive[0]);
  EXPECT_FALSE(stats->alive[1]);
}

TEST_P(EngineFaultTest, RemainingPlanKeepsServing) {
  auto model = FixtureModel("q8_0");
  const models::Deepseek2Hparams& hp = model->hparams();
  const GenerateRequest small = Greedy(Prompt(2), 2);
  const GenerateRequest large = Greedy(Prompt(65), 2);

  // Which experts do the two requests use? (One shard, recording.)
  std::vector<std::set<int>> small_used, large_used;
  std::vector<int32_t> small_tokens;
  for (int pass = 0; pass < 2; ++pass) {
    std::shared_ptr<RecordingBackend> recorder;
    EngineOptions options;
    options.local_lane = GetParam();
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
  // Shard 1 holds one expert per MoE layer that the small request never uses.
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

  EngineOptions options;

  options.local_lane = GetParam();
  options.shards = EvenShards(2);
  options.plan = plan;
  options.experts = ExpertsBackend::kReference;  // the same experts as the recording passes
  auto engine_or = Engine::Create(model, options);
  ASSERT_TRUE(engine_or.ok()) << engine_or.status();
  auto& engine = *engine_or;
  ASSERT_TRUE(engine->KillShard(1).ok());
  ASSERT_TRUE(WaitUntilDown(*engine, 1));

  auto served = engine->Generate(small);
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_EQ(served->tokens, small_tokens);
  auto failed = engine->Generate(large);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(failed.status().message().find("'shard1'"), std::string::npos) << failed.status();
  // And again: serving goes on.
  served = engine->Generate(small);
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_EQ(served->tokens, small_tokens);
}

TEST_P(EngineFaultTest, ReplicaFinishesTheRequestOfAKilledShard) {
  auto model = FixtureModel("q8_0");
  const auto prompt = Prompt(20);
  const testing::GreedyRun ref = testing::ReferenceGreedy(*model, prompt, 6);
  auto gate = std::make_shared<Gate>();
  EngineOptions options = GatedOptions(model, gate);
  options.plan = FullyReplicatedPlan(model->hparams());
  auto engine_or = Engine::Create(model, options);
  ASSERT_TRUE(engine_or.ok()) << engine_or.status();
  std::unique_ptr<Engine> engine = std::move(*engine_or);
  OpenOnExit open{gate};

  std::promise<absl::StatusOr<GenerateResult>> done;
  engine->GenerateAsync(Greedy(prompt, 6), {},
                        [&](absl::StatusOr<GenerateResult> r) { done.set_value(std::move(r)); });
  ASSERT_TRUE(gate->WaitEntered(1, std::chrono::seconds(30)));
  ASSERT_TRUE(engine->KillShard(1).ok());
  auto future = done.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  auto result = future.get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->tokens, ref.tokens);
  auto stats = engine->RouterStats();
  ASSERT_TRUE(stats.ok());
  EXPECT_GE(stats->rerouted_parts, 1);
  EXPECT_FALSE(stats->alive[1]);
}

TEST_P(EngineFaultTest, HungShardFailsAtTheDeadlineOrMovesToAReplica) {
  auto model = FixtureModel("q8_0");
  const auto prompt = Prompt(12);
  for (const bool replicated : {false, true}) {
    SCOPED_TRACE(replicated ? "replicated" : "no replica");
    auto gate = std::make_shared<Gate>();
    EngineOptions options = GatedOptions(model, gate);
    if (replicated) options.plan = FullyReplicatedPlan(model->hparams());
    options.shard_deadline = std::chrono::milliseconds(300);
    auto engine_or = Engine::Create(model, options);
    ASSERT_TRUE(engine_or.ok()) << engine_or.status();
    std::unique_ptr<Engine> engine = std::move(*engine_or);
    OpenOnExit open{gate};
    const auto start = Clock::now();
    auto result = engine->Generate(Greedy(prompt, 3));
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (replicated) {
      ASSERT_TRUE(result.ok()) << result.status();
      EXPECT_EQ(result->tokens, testing::ReferenceGreedy(*model, prompt, 3).tokens);
    } else {
      ASSERT_FALSE(result.ok());
      EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded) << result.status();
      EXPECT_NE(result.status().message().find("'shard1'"), std::string::npos) << result.status();
      EXPECT_LT(seconds, 3.0);
    }
    std::printf("[ measured ] %s: %.2f s\n", replicated ? "replicated" : "no replica", seconds);
  }
}

// Destroying the engine while a step waits for a shard's part ends cleanly
// and soon. (The Engine closes the lane and joins the attention arena before
// the shard arenas, so the step's job never submits to an arena already
// gone; a use after free there would only show reliably under a sanitizer,
// LocalLaneTest.ClosedLaneTakesNothing checks the lane's side.)
TEST_P(EngineFaultTest, EngineDestroyedMidRequestEndsCleanly) {
  auto model = FixtureModel("q8_0");
  auto gate = std::make_shared<Gate>();
  EngineOptions options = GatedOptions(model, gate);
  auto engine_or = Engine::Create(model, options);
  ASSERT_TRUE(engine_or.ok()) << engine_or.status();
  std::unique_ptr<Engine> engine = std::move(*engine_or);
  OpenOnExit open{gate};
  engine->GenerateAsync(Greedy(Prompt(20), 8), {}, [](absl::StatusOr<GenerateResult>) {});
  ASSERT_TRUE(gate->WaitEntered(1, std::chrono::seconds(30)));
  std::thread opener([gate] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    gate->Open();
  });
  const auto start = Clock::now();
  engine.reset();
  opener.join();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 20.0);
}

// Bad values of the latency environment variables are refused by name at
// Engine::Create, never silently ignored.
TEST(EngineEnvironmentTest, BadLatencyKnobsAreRefusedByName) {
  auto model = FixtureModel("q8_0");
  struct Case {
    const char* name;
    const char* value;
  };
  for (const Case& c : {Case{"KTX_LOCAL_LANE", "maybe"}, Case{"KTX_MOE_SPIN_US", "-3"},
                        Case{"KTX_ARENA_SPIN_US", "fast"}}) {
    SCOPED_TRACE(c.name);
    setenv(c.name, c.value, 1);
    EngineOptions options;
    options.shards = EvenShards(1);
    auto engine = Engine::Create(model, options);
    unsetenv(c.name);
    ASSERT_FALSE(engine.ok());
    EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(engine.status().message().find(std::string(c.name) + "='" + c.value + "'"),
              std::string::npos)
        << engine.status();
  }
}

INSTANTIATE_TEST_SUITE_P(Lane, EngineFaultTest, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? std::string("Lane") : std::string("RouterOnly");
                         });

}  // namespace
}  // namespace ktx::actors
