// ShardExperts and RunExpertWork: what one shard computes. Partial sums over
// disjoint expert sets add up to the model's routed-expert output; a shard
// refuses experts it does not hold, naming itself; a sub-batch of rows gives
// the rows of the whole batch.
#include "actors/shard_experts.h"

#include <cmath>
#include <memory>
#include <vector>

#include "actors/expert_shard_actor.h"
#include "gtest/gtest.h"
#include "tests/actors/actors_test_util.h"

namespace ktx::actors {
namespace {

struct LayerInput {
  int il = 0;
  models::Activations h;
  models::Routing routing;
};

// h and routing of the first MoE layer for the first 11 prompt tokens.
LayerInput FirstMoeLayer(const models::Deepseek2Model& model) {
  LayerInput in;
  const auto& hp = model.hparams();
  std::vector<int32_t> tokens = testing::PromptTokens();
  tokens.resize(11);
  auto kv = kv_cache::SequenceKv::Create(model.kv_layout(), 16);
  EXPECT_TRUE(kv.ok());
  std::vector<int32_t> positions(tokens.size());
  for (size_t t = 0; t < tokens.size(); ++t) positions[t] = static_cast<int32_t>(t);
  models::Activations x, f;
  EXPECT_TRUE(model.Embed(tokens, &x).ok());
  for (int il = 0; il < hp.n_layer; ++il) {
    EXPECT_TRUE(model.AttentionBlock(il, positions, kv->get(), &x).ok());
    EXPECT_TRUE(model.FfnNorm(il, x, &in.h).ok());
    if (hp.IsMoeLayer(il)) {
      in.il = il;
      EXPECT_TRUE(model.Route(il, in.h, &in.routing).ok());
      return in;
    }
    EXPECT_TRUE(model.DenseFfn(il, in.h, &f).ok());
    const models::Activations* parts[] = {&f};
    EXPECT_TRUE(model.Combine(parts, &x).ok());
  }
  ADD_FAILURE() << "no MoE layer";
  return in;
}

TEST(ShardExpertsTest, DisjointShardsAddUpToTheWholeLayer) {
  auto model = testing::FixtureModel("bf16");
  const auto& hp = model->hparams();
  const LayerInput in = FirstMoeLayer(*model);
  models::Activations full;
  ASSERT_TRUE(model->RoutedExperts(in.il, in.h, in.routing, {}, &full).ok());

  ExpertBackendFactory factory = MappedExpertBackendFactory(model);
  std::vector<double> sum(full.values().size(), 0.0);
  const int n_shards = 3;
  for (int s = 0; s < n_shards; ++s) {
    HeldExperts held(hp.n_layer);
    std::vector<uint8_t> mask(hp.n_expert, 0);
    for (int e = s; e < hp.n_expert; e += n_shards) {
      held[in.il].push_back(e);
      mask[e] = 1;
    }
    auto backend = factory(s, held);
    ASSERT_TRUE(backend.ok());
    auto experts = ShardExperts::Create(s, "s" + std::to_string(s), hp.n_expert, held, *backend);
    ASSERT_TRUE(experts.ok()) << experts.status();
    models::Activations partial;
    ASSERT_TRUE((*experts)->Compute(in.il, in.h, in.routing, mask, &partial).ok());
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += partial.values()[i];
  }
  for (size_t i = 0; i < sum.size(); ++i) {
    EXPECT_NEAR(sum[i], full.values()[i], 1e-6 * (1.0 + std::fabs(full.values()[i])));
  }
}

// RunExpertWork's output buffer: the shard's previous one again once nobody
// holds it (no fresh pages per layer), a new one while a partial is held.
TEST(ShardExpertsTest, OutputBufferIsReusedOnceReleased) {
  auto model = testing::FixtureModel("bf16");
  const auto& hp = model->hparams();
  HeldExperts held(hp.n_layer);
  auto backend = MappedExpertBackendFactory(model)(0, held);
  ASSERT_TRUE(backend.ok());
  auto experts = ShardExperts::Create(0, "s0", hp.n_expert, held, *backend);
  ASSERT_TRUE(experts.ok()) << experts.status();
  std::shared_ptr<models::Activations> a = (*experts)->OutputBuffer();
  std::shared_ptr<models::Activations> b = (*experts)->OutputBuffer();  // `a` still held
  EXPECT_NE(a.get(), b.get());
  const models::Activations* second = b.get();
  a.reset();
  b.reset();
  EXPECT_EQ((*experts)->OutputBuffer().get(), second);
}

TEST(ShardExpertsTest, RefusesExpertsItDoesNotHold) {
  auto model = testing::FixtureModel("bf16");
  const auto& hp = model->hparams();
  const LayerInput in = FirstMoeLayer(*model);
  HeldExperts held(hp.n_layer);
  held[in.il] = {0, 1, 2};
  auto backend = MappedExpertBackendFactory(model)(0, held);
  ASSERT_TRUE(backend.ok());
  auto experts = ShardExperts::Create(4, "numa1", hp.n_expert, held, *backend);
  ASSERT_TRUE(experts.ok());
  EXPECT_TRUE((*experts)->Holds(in.il, 2));
  EXPECT_FALSE((*experts)->Holds(in.il, 3));
  std::vector<uint8_t> mask(hp.n_expert, 0);
  mask[3] = 1;
  models::Activations out;
  const absl::Status status = (*experts)->Compute(in.il, in.h, in.routing, mask, &out);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(status.message().find("'numa1' (#4)"), std::string::npos) << status;
  EXPECT_NE(status.message().find("expert 3"), std::string::npos) << status;

  const absl::Status short_mask = (*experts)->Compute(in.il, in.h, in.routing, {}, &out);
  EXPECT_EQ(short_mask.code(), absl::StatusCode::kInvalidArgument);

  HeldExperts bad(hp.n_layer);
  bad[in.il] = {3, 1};
  EXPECT_FALSE(ShardExperts::Create(0, "x", hp.n_expert, bad, *backend).ok());
  bad[in.il] = {hp.n_expert};
  EXPECT_FALSE(ShardExperts::Create(0, "x", hp.n_expert, bad, *backend).ok());
}

TEST(ShardExpertsTest, SubBatchRowsEqualTheWholeBatchRows) {
  auto model = testing::FixtureModel("q8_0");
  const auto& hp = model->hparams();
  const LayerInput in = FirstMoeLayer(*model);
  HeldExperts held(hp.n_layer);
  for (int e = 0; e < hp.n_expert; ++e) held[in.il].push_back(e);
  auto backend = MappedExpertBackendFactory(model)(0, held);
  ASSERT_TRUE(backend.ok());
  auto experts = ShardExperts::Create(0, "all", hp.n_expert, held, *backend);
  ASSERT_TRUE(experts.ok());
  std::vector<uint8_t> mask(hp.n_expert, 1);
  models::Activations whole;
  ASSERT_TRUE((*experts)->Compute(in.il, in.h, in.routing, mask, &whole).ok());

  ExpertWork work;
  work.il = in.il;
  work.h = Tensor(std::make_shared<const models::Activations>(in.h));
  work.rows = {1, 4, 5, 10};
  work.n_expert_used = in.routing.n_expert_used;
  for (int32_t row : work.rows) {
    for (int k = 0; k < in.routing.n_expert_used; ++k) {
      work.expert_ids.push_back(in.routing.id(row, k));
      work.weights.push_back(in.routing.weight(row, k));
    }
  }
  work.expert_mask = mask;
  ExpertPartial partial;
  ASSERT_TRUE(RunExpertWork(**experts, work, &partial).ok());
  ASSERT_EQ(partial.partial.n_rows(), 4);
  for (size_t j = 0; j < work.rows.size(); ++j) {
    for (int64_t c = 0; c < hp.n_embd; ++c) {
      ASSERT_EQ(partial.partial->row(static_cast<int64_t>(j))[c], whole.row(work.rows[j])[c]);
    }
  }
  work.rows = {1, 99, 5, 10};
  EXPECT_EQ(RunExpertWork(**experts, work, &partial).code(), absl::StatusCode::kInvalidArgument);
}

// Counts the calls of each kind and remembers the activations it was given.
class RecordingBackend final : public models::ExpertBackend {
 public:
  explicit RecordingBackend(std::shared_ptr<models::ExpertBackend> inner)
      : inner_(std::move(inner)) {}
  absl::Status Compute(int il, const models::Activations& h, const models::Routing& routing,
                       std::span<const uint8_t> mask, models::Activations* out) override {
    ++computes;
    seen = &h;
    return inner_->Compute(il, h, routing, mask, out);
  }
  absl::Status ComputeRows(int il, const models::Activations& h, std::span<const int32_t> rows,
                           const models::Routing& routing, std::span<const uint8_t> mask,
                           models::Activations* out) override {
    ++row_computes;
    seen = &h;
    return inner_->ComputeRows(il, h, rows, routing, mask, out);
  }
  int computes = 0, row_computes = 0;
  const models::Activations* seen = nullptr;

 private:
  std::shared_ptr<models::ExpertBackend> inner_;
};

// A sub-batch goes to the backend as the batch's own activations plus the row
// list (ComputeRows: the fast backend reads the rows in place, no gathered
// copy); the whole batch in order goes to Compute.
TEST(ShardExpertsTest, SubBatchRowsReachTheBackendInPlace) {
  auto model = testing::FixtureModel("q8_0");
  const auto& hp = model->hparams();
  const LayerInput in = FirstMoeLayer(*model);
  HeldExperts held(hp.n_layer);
  for (int e = 0; e < hp.n_expert; ++e) held[in.il].push_back(e);
  auto mapped = MappedExpertBackendFactory(model)(0, held);
  ASSERT_TRUE(mapped.ok());
  auto recording = std::make_shared<RecordingBackend>(*mapped);
  auto experts = ShardExperts::Create(0, "all", hp.n_expert, held, recording);
  ASSERT_TRUE(experts.ok());
  ExpertWork work;
  work.il = in.il;
  auto h = std::make_shared<const models::Activations>(in.h);
  work.h = Tensor(h);
  work.n_expert_used = in.routing.n_expert_used;
  work.expert_mask.assign(hp.n_expert, 1);
  auto set_rows = [&](std::vector<int32_t> rows) {
    work.rows = std::move(rows);
    work.expert_ids.clear();
    work.weights.clear();
    for (int32_t row : work.rows) {
      for (int k = 0; k < in.routing.n_expert_used; ++k) {
        work.expert_ids.push_back(in.routing.id(row, k));
        work.weights.push_back(in.routing.weight(row, k));
      }
    }
  };
  ExpertPartial partial;
  set_rows({2, 3, 7});
  ASSERT_TRUE(RunExpertWork(**experts, work, &partial).ok());
  EXPECT_EQ(recording->row_computes, 1);
  EXPECT_EQ(recording->computes, 0);
  EXPECT_EQ(recording->seen, h.get());  // the batch itself, not a gathered copy
  EXPECT_EQ(partial.partial.n_rows(), 3);
  std::vector<int32_t> all(static_cast<size_t>(in.h.n_tokens()));
  for (size_t t = 0; t < all.size(); ++t) all[t] = static_cast<int32_t>(t);
  set_rows(all);
  recording->row_computes = recording->computes = 0;
  ASSERT_TRUE(RunExpertWork(**experts, work, &partial).ok());
  EXPECT_EQ(recording->row_computes, 0);
  EXPECT_EQ(recording->computes, 1);
  EXPECT_EQ(recording->seen, h.get());
}

}  // namespace
}  // namespace ktx::actors
