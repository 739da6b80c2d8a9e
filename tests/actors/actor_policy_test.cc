// Routing policies on the actor runtime (runtime/models/routing_policy.h,
// docs/experts.md): per-request policies (GenerateRequest::routing_policy),
// the model's own policy, reduced top-k rows padded with kNoExpert through
// the router, and expert deferral overlapped with the next layer. Every
// answer is checked against Deepseek2Model::Forward with the same policy
// (the single-process reference), with 1 and 2 expert shards on the tiny
// DeepSeek-V3 fixture (K = 4 experts per token of 16, layers 1 and 2 MoE).
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "actors/engine.h"
#include "gtest/gtest.h"
#include "runtime/models/routing_policy.h"
#include "tests/actors/actors_test_util.h"

namespace ktx::actors {
namespace {

using models::RoutingPolicy;
using testing::CompareLogits;
using testing::FixtureModel;

constexpr int kGreedyTokens = 12;

std::shared_ptr<const RoutingPolicy> Policy(const std::string& text) {
  absl::StatusOr<RoutingPolicy> p = RoutingPolicy::Parse(text);
  EXPECT_TRUE(p.ok()) << p.status();
  return std::make_shared<const RoutingPolicy>(p.ok() ? *p : RoutingPolicy());
}

// The fixture sequence: prompt + the float64 reference's greedy tokens.
std::vector<int32_t> Sequence(const std::string& type) {
  std::vector<int32_t> tokens = testing::PromptTokens();
  const auto gen =
      testing::Manifest()["files"][type]["ref64_greedy_tokens"].get<std::vector<int32_t>>();
  tokens.insert(tokens.end(), gen.begin(), gen.end());
  return tokens;
}

// Forward over the whole sequence under `policy` (null: the model's own).
std::vector<float> ForwardLogits(const models::Deepseek2Model& model,
                                 const std::vector<int32_t>& tokens, const RoutingPolicy* policy) {
  auto kv = kv_cache::SequenceKv::Create(model.kv_layout(), static_cast<int64_t>(tokens.size()));
  EXPECT_TRUE(kv.ok());
  models::Activations logits;
  models::ForwardOptions options;
  options.policy = policy;
  const absl::Status status =
      model.Forward(tokens, kv->get(), models::LogitsRows::kAll, &logits, options);
  EXPECT_TRUE(status.ok()) << status;
  return logits.ToVector();
}

// Free-running greedy decoding with Forward under `policy`.
std::vector<int32_t> ForwardGreedy(const models::Deepseek2Model& model,
                                   const std::vector<int32_t>& prompt, int n,
                                   const RoutingPolicy* policy) {
  auto kv =
      kv_cache::SequenceKv::Create(model.kv_layout(), static_cast<int64_t>(prompt.size()) + n + 1);
  EXPECT_TRUE(kv.ok());
  models::ForwardOptions options;
  options.policy = policy;
  models::Activations logits;
  std::vector<int32_t> out;
  EXPECT_TRUE(model.Forward(prompt, kv->get(), models::LogitsRows::kLast, &logits, options).ok());
  for (int i = 0; i < n; ++i) {
    out.push_back(testing::Argmax(logits.row(0), model.n_vocab()));
    if (i + 1 == n) break;
    const int32_t one[] = {out.back()};
    EXPECT_TRUE(model.Forward(one, kv->get(), models::LogitsRows::kLast, &logits, options).ok());
  }
  return out;
}

GenerateRequest Greedy(int max_tokens) {
  GenerateRequest request;
  request.prompt = testing::PromptTokens();
  request.sampling.temperature = 0.0f;
  request.max_tokens = max_tokens;
  request.stop_at_eos = false;
  request.return_logits = ReturnLogits::kSampled;
  return request;
}

int64_t Sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

// (fixture type, number of shards)
using Param = std::tuple<std::string, int>;

class EnginePolicyTest : public ::testing::TestWithParam<Param> {
 protected:
  std::unique_ptr<Engine> MakeEngine(
      std::shared_ptr<const models::Deepseek2Model> model = nullptr) {
    const auto& [type, n_shards] = GetParam();
    EngineOptions options;
    options.shards = EvenShards(n_shards);
    options.experts = ExpertsBackend::kReference;  // comparable with Forward to float rounding
    options.prefill_chunk = 16;
    options.kv_budget_bytes = 64 << 20;
    options.profile_steps = 64;
    auto engine = Engine::Create(model != nullptr ? model : FixtureModel(type), options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? std::move(*engine) : nullptr;
  }
  const std::string& type() const { return std::get<0>(GetParam()); }
  int n_shards() const { return std::get<1>(GetParam()); }
};

// A policy that keeps the model's K experts and all the mass changes nothing:
// the logits are bit-identical to a request without a policy.
TEST_P(EnginePolicyTest, FullPoliciesAreIdenticalToNoPolicy) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  const std::vector<int32_t> tokens = Sequence(type());
  auto none = engine->Logits(tokens);
  ASSERT_TRUE(none.ok()) << none.status();
  for (const std::string text : {"top_k=4", "mass=1.0", "top_k=4,mass=1,min_k=4", "full"}) {
    auto logits = engine->Logits(tokens, Policy(text));
    ASSERT_TRUE(logits.ok()) << text << ": " << logits.status();
    EXPECT_EQ(logits->values(), none->values()) << text;
  }
}

// Reduced top-k (fixed, adaptive, per layer): the same logits as Forward with
// the policy (to float rounding of the reweighting and the partial sums), and
// fewer expert evaluations at the shards than the full routing.
TEST_P(EnginePolicyTest, ReducedTopKMatchesForwardWithFewerExpertCalls) {
  auto model = FixtureModel(type());
  const std::vector<int32_t> tokens = Sequence(type());
  const int64_t n_vocab = model->n_vocab();
  int64_t full_entries = 0;
  {
    auto engine = MakeEngine();
    ASSERT_NE(engine, nullptr);
    ASSERT_TRUE(engine->Logits(tokens).ok());
    full_entries = Sum(engine->RouterStats()->entries_sent);
    // K entries per token and MoE layer (2 MoE layers).
    EXPECT_EQ(full_entries, static_cast<int64_t>(tokens.size()) * 4 * 2);
  }
  for (const std::string text :
       {"top_k=2", "top_k=3", "mass=0.8", "mass=0.5,min_k=2", "top_k=3;layers=2,mass=0.6"}) {
    auto engine = MakeEngine();
    ASSERT_NE(engine, nullptr);
    const auto policy = Policy(text);
    auto logits = engine->Logits(tokens, policy);
    ASSERT_TRUE(logits.ok()) << text << ": " << logits.status();
    const std::vector<float> want = ForwardLogits(*model, tokens, policy.get());
    const testing::LogitsDiff diff =
        CompareLogits(logits->data(), want.data(), static_cast<int64_t>(tokens.size()), n_vocab);
    std::printf("[ measured ] %s, %d shard(s), '%s': max row-relative diff %.3e\n", type().c_str(),
                n_shards(), text.c_str(), diff.max_rel);
    EXPECT_LE(diff.max_rel, 1e-5) << text;
    EXPECT_EQ(diff.argmax_mismatches, 0) << text;
    // The reduced rows: every kept entry is sent once, padding never.
    const int64_t entries = Sum(engine->RouterStats()->entries_sent);
    EXPECT_LT(entries, full_entries) << text;
    if (text == "top_k=2") {
      EXPECT_EQ(entries, static_cast<int64_t>(tokens.size()) * 2 * 2);
    }
  }
}

// Greedy decoding under a policy gives Forward's greedy tokens.
TEST_P(EnginePolicyTest, GreedyTokensUnderAPolicyEqualForward) {
  auto model = FixtureModel(type());
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  for (const std::string text : {"top_k=2", "mass=0.7", "top_k=3,defer=1"}) {
    const auto policy = Policy(text);
    GenerateRequest request = Greedy(kGreedyTokens);
    request.routing_policy_text = text;
    auto result = engine->Generate(request);
    ASSERT_TRUE(result.ok()) << text << ": " << result.status();
    EXPECT_EQ(result->tokens, ForwardGreedy(*model, request.prompt, kGreedyTokens, policy.get()))
        << text;
  }
}

// Requests with different policies in the same steps: each row is routed
// under its own request's policy, so each answer equals the request alone.
TEST_P(EnginePolicyTest, MixedPoliciesInOneBatchEqualEachAlone) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  const std::vector<std::string> texts = {"", "top_k=2", "mass=0.7,min_k=1", "top_k=3,defer=1",
                                          "defer=2,join=next_attention"};
  std::vector<GenerateResult> alone;
  for (const std::string& text : texts) {
    GenerateRequest request = Greedy(kGreedyTokens);
    request.routing_policy_text = text;
    auto result = engine->Generate(request);
    ASSERT_TRUE(result.ok()) << text << ": " << result.status();
    alone.push_back(std::move(*result));
  }
  std::mutex mu;
  std::vector<absl::StatusOr<GenerateResult>> batched(texts.size(), absl::UnknownError("not done"));
  int done = 0;
  std::condition_variable cv;
  for (size_t i = 0; i < texts.size(); ++i) {
    GenerateRequest request = Greedy(kGreedyTokens);
    request.routing_policy_text = texts[i];
    engine->GenerateAsync(request, {}, [&, i](absl::StatusOr<GenerateResult> r) {
      std::lock_guard<std::mutex> lock(mu);
      batched[i] = std::move(r);
      ++done;
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done == static_cast<int>(texts.size()); });
  }
  // The requests did share steps.
  auto log = engine->StepLog();
  ASSERT_TRUE(log.ok());
  size_t widest = 0;
  for (const StepRecord& r : *log) widest = std::max(widest, r.decode_ids.size());
  EXPECT_GE(widest, 2u);
  const int64_t n_vocab = engine->model().n_vocab();
  for (size_t i = 0; i < texts.size(); ++i) {
    ASSERT_TRUE(batched[i].ok()) << texts[i] << ": " << batched[i].status();
    EXPECT_EQ(batched[i]->tokens, alone[i].tokens) << "'" << texts[i] << "'";
    const testing::LogitsDiff diff =
        CompareLogits(batched[i]->logits.data(), alone[i].logits.data(), kGreedyTokens, n_vocab);
    EXPECT_LE(diff.max_rel, 1e-5) << "'" << texts[i] << "'";
    if (n_shards() == 1) {
      EXPECT_TRUE(diff.bit_equal) << "'" << texts[i] << "'";
    }
  }
  // Different policies, different routing: not all answers agree.
  bool any_differs = false;
  for (size_t i = 1; i < texts.size(); ++i) {
    any_differs = any_differs || alone[i].logits.values() != alone[0].logits.values();
  }
  EXPECT_TRUE(any_differs);
}

// Expert deferral: deferred experts go to the shards with the layer's
// immediate ones and join one layer later, as Forward computes them.
TEST_P(EnginePolicyTest, DeferralMatchesForward) {
  auto model = FixtureModel(type());
  const std::vector<int32_t> tokens = Sequence(type());
  const int64_t n_vocab = model->n_vocab();
  for (const std::string text :
       {"defer=1", "defer=2", "defer=1,join=next_attention", "top_k=3,defer=2,join=next_attention",
        "mass=0.8,defer=1", "layers=1,defer=3"}) {
    auto engine = MakeEngine();
    ASSERT_NE(engine, nullptr);
    const auto policy = Policy(text);
    auto logits = engine->Logits(tokens, policy);
    ASSERT_TRUE(logits.ok()) << text << ": " << logits.status();
    const std::vector<float> want = ForwardLogits(*model, tokens, policy.get());
    const std::vector<float> full = ForwardLogits(*model, tokens, nullptr);
    ASSERT_NE(want, full) << text << ": the policy must change something";
    const testing::LogitsDiff diff =
        CompareLogits(logits->data(), want.data(), static_cast<int64_t>(tokens.size()), n_vocab);
    std::printf("[ measured ] %s, %d shard(s), '%s': max row-relative diff %.3e\n", type().c_str(),
                n_shards(), text.c_str(), diff.max_rel);
    EXPECT_LE(diff.max_rel, 1e-5) << text;
    EXPECT_EQ(diff.argmax_mismatches, 0) << text;
    // Deferral moves entries, it does not drop them: with the full top-k the
    // shards evaluate K per token and MoE layer, as without deferral.
    if (text == "defer=1" || text == "defer=2") {
      EXPECT_EQ(Sum(engine->RouterStats()->entries_sent),
                static_cast<int64_t>(tokens.size()) * 4 * 2);
      // The step profiles count them at the deferring layer (1; the last never defers).
      int64_t deferred[3] = {0, 0, 0};
      for (const StepProfile& p : engine->Profile()) {
        for (int il = 0; il < 3; ++il) deferred[il] += p.layers[il].deferred_entries;
      }
      const int64_t d = text == "defer=1" ? 1 : 2;
      EXPECT_EQ(deferred[0], 0);
      EXPECT_EQ(deferred[1], static_cast<int64_t>(tokens.size()) * d);
      EXPECT_EQ(deferred[2], 0);
    }
  }
}

// The model's own policy (Deepseek2Model::SetRoutingPolicy) applies to
// requests without one; a request's policy replaces it.
TEST_P(EnginePolicyTest, ModelPolicyAppliesUnlessTheRequestBringsOne) {
  const std::string file = testing::Manifest()["files"][type()]["gguf"].get<std::string>();
  auto opened = models::Deepseek2Model::Open(testing::DataDir() + file);
  ASSERT_TRUE(opened.ok()) << opened.status();
  ASSERT_TRUE((*opened)->SetRoutingPolicy(Policy("top_k=2,defer=1")).ok());
  std::shared_ptr<const models::Deepseek2Model> model = std::move(*opened);
  auto engine = MakeEngine(model);
  ASSERT_NE(engine, nullptr);
  const std::vector<int32_t> tokens = Sequence(type());
  const int64_t n = static_cast<int64_t>(tokens.size());
  auto logits = engine->Logits(tokens);
  ASSERT_TRUE(logits.ok()) << logits.status();
  std::vector<float> want = ForwardLogits(*model, tokens, nullptr);  // the model's policy
  testing::LogitsDiff diff = CompareLogits(logits->data(), want.data(), n, model->n_vocab());
  EXPECT_LE(diff.max_rel, 1e-5);
  EXPECT_EQ(diff.argmax_mismatches, 0);
  // "full" overrides the model's policy: the fixture's plain routing.
  const auto full = Policy("full");
  logits = engine->Logits(tokens, full);
  ASSERT_TRUE(logits.ok()) << logits.status();
  want = ForwardLogits(*model, tokens, full.get());
  diff = CompareLogits(logits->data(), want.data(), n, model->n_vocab());
  EXPECT_LE(diff.max_rel, 1e-5);
  EXPECT_EQ(diff.argmax_mismatches, 0);
}

TEST_P(EnginePolicyTest, BadPoliciesFailAtSubmitNamingTheField) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  struct Case {
    std::string text;
    std::string expect;  // in the message
  };
  for (const Case& c : std::vector<Case>{{"top_k=x", "'x' is not an integer"},
                                         {"top_k=9", "exceeds the model's n_expert_used = 4"},
                                         {"defer=4", "defer = 4"},
                                         {"layers=7,top_k=2", "layers outside [0, n_layer = 3)"},
                                         {"speed=fast", "unknown field 'speed'"}}) {
    GenerateRequest request = Greedy(2);
    request.routing_policy_text = c.text;
    auto result = engine->Generate(request);
    ASSERT_FALSE(result.ok()) << c.text;
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_NE(result.status().message().find("routing_policy: "), std::string::npos)
        << result.status();
    EXPECT_NE(result.status().message().find(c.expect), std::string::npos) << result.status();
  }
  // Asynchronous submit: the same error through on_done, at once.
  GenerateRequest request = Greedy(2);
  request.routing_policy = Policy("top_k=5");
  absl::Status async_status;
  engine->GenerateAsync(request, {},
                        [&](absl::StatusOr<GenerateResult> r) { async_status = r.status(); });
  EXPECT_EQ(async_status.code(), absl::StatusCode::kInvalidArgument) << async_status;
  EXPECT_NE(async_status.message().find("routing_policy"), std::string::npos) << async_status;
  // Both forms at once.
  request.routing_policy_text = "top_k=2";
  request.routing_policy = Policy("top_k=2");
  auto both = engine->Generate(request);
  EXPECT_EQ(both.status().code(), absl::StatusCode::kInvalidArgument);
  // The engine still serves.
  EXPECT_TRUE(engine->Generate(Greedy(2)).ok());
}

INSTANTIATE_TEST_SUITE_P(Shards, EnginePolicyTest,
                         ::testing::Values(Param{"bf16", 1}, Param{"bf16", 2}, Param{"q8_0", 2}),
                         [](const ::testing::TestParamInfo<Param>& info) {
                           return std::get<0>(info.param) + "_" +
                                  std::to_string(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace ktx::actors
