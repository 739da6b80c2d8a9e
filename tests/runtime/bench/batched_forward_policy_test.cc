// BatchedForward with per-sequence routing policies (a request's own): in one
// batch, sequences with different policies (fewer experts, adaptive, deferral,
// none) get exactly the logits each gets alone from Deepseek2Model::Forward
// with its policy (bitwise with the reference experts: every stage after
// attention is per token).
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/bench/batched_forward.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/deepseek2.h"
#include "runtime/models/routing_policy.h"

namespace ktx::bench {
namespace {

using models::Activations;
using models::RoutingPolicy;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

TEST(BatchedForwardPolicyTest, EachSequenceGetsItsOwnPolicy) {
  auto model = models::Deepseek2Model::Open(kDataDir + "dsv3-tiny-bf16.gguf");
  ASSERT_TRUE(model.ok()) << model.status();
  const models::Deepseek2Model& m = **model;
  std::ifstream in(kDataDir + "manifest.json");
  const auto prompt = nlohmann::json::parse(in)["prompt_tokens"].get<std::vector<int32_t>>();
  const std::vector<int32_t> a(prompt.begin(), prompt.begin() + 9);
  const std::vector<int32_t> b(prompt.begin() + 9, prompt.begin() + 30);
  const std::vector<int32_t> c(prompt.begin() + 30, prompt.begin() + 31);
  const std::vector<int32_t> d(prompt.begin() + 31, prompt.begin() + 45);
  const RoutingPolicy top2 = RoutingPolicy::TopK(2);
  const RoutingPolicy defer = *RoutingPolicy::Parse("defer=2,join=next_attention");
  const RoutingPolicy mixed = *RoutingPolicy::Parse("mass=0.6;layers=2,top_k=3");
  const std::vector<std::pair<const std::vector<int32_t>*, const RoutingPolicy*>> seqs = {
      {&a, &top2}, {&b, &defer}, {&c, nullptr}, {&d, &mixed}};

  // Alone, with Forward.
  std::vector<std::vector<float>> alone;
  for (const auto& [tokens, policy] : seqs) {
    auto kv = kv_cache::SequenceKv::Create(m.kv_layout(), 64);
    Activations out;
    models::ForwardOptions options;
    options.policy = policy;
    ASSERT_TRUE(m.Forward(*tokens, kv->get(), models::LogitsRows::kAll, &out, options).ok());
    alone.push_back(out.ToVector());
  }
  // Together.
  std::vector<std::unique_ptr<kv_cache::SequenceKv>> kvs;
  std::vector<SequenceBatchEntry> batch;
  for (const auto& [tokens, policy] : seqs) {
    kvs.push_back(std::move(*kv_cache::SequenceKv::Create(m.kv_layout(), 64)));
    batch.push_back({*tokens, kvs.back().get(), policy});
  }
  Activations together;
  StageProfile profile(m);
  ASSERT_TRUE(BatchedForward(m, batch, models::LogitsRows::kAll, &together, &profile).ok());
  size_t offset = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const std::vector<float> rows(together.values().begin() + offset,
                                  together.values().begin() + offset + alone[s].size());
    EXPECT_EQ(rows, alone[s]) << "sequence " << s;
    offset += alone[s].size();
  }
  EXPECT_EQ(offset, together.values().size());
  // The policies changed something: the first sequence differs from the full routing.
  auto kv = kv_cache::SequenceKv::Create(m.kv_layout(), 64);
  Activations full;
  ASSERT_TRUE(m.Forward(a, kv->get(), models::LogitsRows::kAll, &full).ok());
  EXPECT_NE(full.ToVector(), alone[0]);
  // An invalid policy is refused, naming the field.
  const RoutingPolicy bad = RoutingPolicy::TopK(7);
  batch[0].policy = &bad;
  Activations unused;
  const absl::Status s = BatchedForward(m, batch, models::LogitsRows::kLast, &unused);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("top_k = 7"), std::string::npos) << s;
}

}  // namespace
}  // namespace ktx::bench
