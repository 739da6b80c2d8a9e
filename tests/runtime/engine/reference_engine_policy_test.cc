// The reference engine with per-request routing policies: Logits with a
// policy equal the model's Forward with it; a request's policy changes the
// generation (a full-routing-equivalent policy does not, token for token);
// a policy that does not fit the model is refused naming the field; the
// request's policy overrides the model's.
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/reference_engine.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/routing_policy.h"

namespace ktx::engine {
namespace {

using models::RoutingPolicy;
using ::testing::HasSubstr;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

class ReferenceEnginePolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    EngineOptions options;
    options.n_ctx = 128;
    options.prefill_chunk = 16;  // chunks: deferral stays within each Forward
    auto engine = ReferenceEngine::Open(kDataDir + "dsv3-tiny-bf16.gguf", options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    std::ifstream in(kDataDir + "manifest.json");
    const nlohmann::json m = nlohmann::json::parse(in);
    prompt_ = m["prompt"].get<std::string>();
    tokens_ = m["prompt_tokens"].get<std::vector<int32_t>>();
  }

  GenerateRequest Greedy(std::shared_ptr<const RoutingPolicy> policy) const {
    GenerateRequest r;
    r.prompt = prompt_;
    r.max_tokens = 12;
    r.sampling.temperature = 0.0f;
    r.routing_policy = std::move(policy);
    return r;
  }

  std::unique_ptr<ReferenceEngine> engine_;
  std::string prompt_;
  std::vector<int32_t> tokens_;
};

TEST_F(ReferenceEnginePolicyTest, LogitsWithAPolicyEqualForwardChunkByChunk) {
  const RoutingPolicy p = *RoutingPolicy::Parse("top_k=2;layers=2,defer=1");
  auto got = engine_->Logits(tokens_, &p);
  ASSERT_TRUE(got.ok()) << got.status();
  // The same chunks through the model directly.
  const models::Deepseek2Model& m = engine_->model();
  auto kv = kv_cache::SequenceKv::Create(m.kv_layout(), 128);
  std::vector<float> want;
  models::ForwardOptions options;
  options.policy = &p;
  for (size_t b = 0; b < tokens_.size(); b += 16) {
    const size_t len = std::min<size_t>(16, tokens_.size() - b);
    models::Activations out;
    ASSERT_TRUE(m.Forward(std::span(tokens_).subspan(b, len), kv->get(), models::LogitsRows::kAll,
                          &out, options)
                    .ok());
    want.insert(want.end(), out.values().begin(), out.values().end());
  }
  EXPECT_EQ(*got, want);
  auto full = engine_->Logits(tokens_);
  ASSERT_TRUE(full.ok());
  EXPECT_NE(*full, *got);
}

TEST_F(ReferenceEnginePolicyTest, RequestPolicyChangesGenerationOnlyWhenItReduces) {
  auto full = engine_->Generate(Greedy(nullptr), {});
  ASSERT_TRUE(full.ok()) << full.status();
  auto same =
      engine_->Generate(Greedy(std::make_shared<RoutingPolicy>(RoutingPolicy::TopK(4))), {});
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(same->tokens, full->tokens);
  auto one = engine_->Generate(Greedy(std::make_shared<RoutingPolicy>(RoutingPolicy::TopK(1))), {});
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_NE(one->tokens, full->tokens);  // top-1 on the tiny random model: 7.5 nats of KL
  // The request's policy overrides the model's.
  ASSERT_TRUE(engine_->mutable_model()
                  .SetRoutingPolicy(std::make_shared<RoutingPolicy>(RoutingPolicy::TopK(1)))
                  .ok());
  auto model_policy = engine_->Generate(Greedy(nullptr), {});
  ASSERT_TRUE(model_policy.ok());
  EXPECT_EQ(model_policy->tokens, one->tokens);
  auto overridden = engine_->Generate(Greedy(std::make_shared<RoutingPolicy>()), {});
  ASSERT_TRUE(overridden.ok());
  EXPECT_EQ(overridden->tokens, full->tokens);
}

TEST_F(ReferenceEnginePolicyTest, PoliciesThatDoNotFitAreRefusedNamingTheField) {
  auto r = engine_->Generate(Greedy(std::make_shared<RoutingPolicy>(RoutingPolicy::Defer(4))), {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("defer = 4"));
  const RoutingPolicy bad = *RoutingPolicy::Parse("layers=3,top_k=1");
  auto l = engine_->Logits(tokens_, &bad);
  ASSERT_FALSE(l.ok());
  EXPECT_THAT(std::string(l.status().message()), HasSubstr("layers 3"));
}

}  // namespace
}  // namespace ktx::engine
