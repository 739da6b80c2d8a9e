// ShardHost (actors/remote/shard_host.h) served on loopback, driven with a
// raw ExpertShard stub:
//  - Info reports the node, the model fingerprint and each hosted shard with
//    the experts the planner gave it;
//  - a Compute part's answer equals the in-process shard's computation bit
//    for bit (F32 wire; BF16 wire equals computing on the bf16-rounded input),
//    also with several parts per message and several messages in flight;
//  - malformed parts get INVALID_ARGUMENT naming the field, and the stream
//    keeps serving afterwards;
//  - with a token configured, calls without it are refused (UNAUTHENTICATED);
//  - Stats counts what was served; ShardHost::Create from a topology hosts
//    the named node's shards with their plan indices, and names a node it
//    cannot host.
#include "actors/remote/shard_host.h"

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/remote/topology_shards.h"
#include "actors/remote/wire_codec.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "ktx/v1/shard.grpc.pb.h"
#include "runtime/gguf/fingerprint.h"
#include "tests/actors/actors_test_util.h"
#include "tests/actors/remote/remote_test_util.h"

namespace ktx::actors {
namespace {

using testing::FixtureModel;

constexpr int kLayer = 1;  // the fixture's first MoE layer

std::chrono::system_clock::time_point Deadline(int seconds = 10) {
  return std::chrono::system_clock::now() + std::chrono::seconds(seconds);
}

class ShardHostTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = FixtureModel("bf16");
    ASSERT_NE(model_, nullptr);
    shards_ = EvenShards(2, false);
    auto plan = PlanShards(*model_, shards_, {});
    ASSERT_TRUE(plan.ok()) << plan.status();
    plan_ = *plan;
    held_ = HeldByShard(plan_, model_->hparams());
  }

  void Serve(ShardHostOptions options = {}) {
    options.experts = ExpertsBackend::kReference;  // Expected() computes with it
    auto host = ShardHost::CreateWithPlan(model_, "node1", shards_, plan_, {0, 1}, options);
    ASSERT_TRUE(host.ok()) << host.status();
    host_ = std::move(*host);
    server_ = testing::StartServer(host_->service(), options.security);
    ASSERT_NE(server_.server, nullptr);
    stub_ = ktx::v1::ExpertShard::NewStub(
        grpc::CreateChannel(server_.address, grpc::InsecureChannelCredentials()));
  }

  void TearDown() override {
    if (server_.server) server_.server->Shutdown(Deadline(1));
  }

  // A valid part for shard 1: rows of a random batch that chose at least one
  // of its experts, all of its experts that they chose.
  struct Part {
    ktx::v1::ExpertPart proto;
    models::Activations h;  // the rows sent (F32, before any wire rounding)
    models::Routing routing;
    std::vector<uint8_t> mask;
  };
  Part MakePart(uint64_t id, int64_t n_rows, uint32_t seed, WireDtype dtype) {
    const auto& hp = model_->hparams();
    testing::RandomBatch b =
        testing::MakeRandomBatch(n_rows, hp.n_embd, hp.n_expert, hp.n_expert_used, seed);
    Part p;
    p.mask.assign(hp.n_expert, 0);
    for (int32_t e : b.routing.expert_ids) {
      if (std::binary_search(held_[1][kLayer].begin(), held_[1][kLayer].end(), e)) p.mask[e] = 1;
    }
    p.h = b.h;
    p.routing = b.routing;
    p.proto.set_request_id(id);
    p.proto.set_shard(shards_[1].name);
    p.proto.set_il(kLayer);
    EncodeTensor(b.h, dtype, p.proto.mutable_h());
    p.proto.set_n_expert_used(b.routing.n_expert_used);
    p.proto.mutable_expert_ids()->Add(b.routing.expert_ids.begin(), b.routing.expert_ids.end());
    p.proto.mutable_weights()->Add(b.routing.weights.begin(), b.routing.weights.end());
    for (int e = 0; e < hp.n_expert; ++e) {
      if (p.mask[e]) p.proto.add_experts(e);
    }
    return p;
  }

  // What an in-process shard holding shard 1's experts computes.
  models::Activations Expected(const Part& p, WireDtype dtype) {
    auto backend = MappedExpertBackendFactory(model_)(1, held_[1]);
    EXPECT_TRUE(backend.ok());
    auto experts = ShardExperts::Create(1, "local", model_->hparams().n_expert, held_[1], *backend);
    EXPECT_TRUE(experts.ok());
    models::Activations in = p.h;
    if (dtype == WireDtype::kBf16) {
      for (int64_t i = 0; i < in.n_tokens() * in.n_cols(); ++i) {
        in.data()[i] = RoundToWireBf16(in.data()[i]);
      }
    }
    models::Activations out;
    EXPECT_TRUE((*experts)->Compute(kLayer, in, p.routing, p.mask, &out).ok());
    return out;
  }

  static void ExpectBitEqual(const ktx::v1::ExpertResult& r, const models::Activations& want) {
    ASSERT_EQ(r.code(), 0) << r.message();
    models::Activations got;
    ASSERT_TRUE(DecodeTensor(r.partial(), "partial", {.n_cols = want.n_cols()}, &got).ok());
    ASSERT_EQ(got.n_tokens(), want.n_tokens());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), want.values().size() * sizeof(float)), 0);
  }

  std::shared_ptr<const models::Deepseek2Model> model_;
  std::vector<ShardOptions> shards_;
  topology::PlacementPlan plan_;
  std::vector<HeldExperts> held_;
  std::unique_ptr<ShardHost> host_;
  testing::TestServer server_;
  std::unique_ptr<ktx::v1::ExpertShard::Stub> stub_;
};

TEST_F(ShardHostTest, InfoReportsFingerprintAndHeldExperts) {
  Serve();
  grpc::ClientContext context;
  context.set_deadline(Deadline());
  ktx::v1::ShardInfoResponse info;
  ASSERT_TRUE(stub_->Info(&context, {}, &info).ok());
  EXPECT_EQ(info.node(), "node1");
  EXPECT_EQ(info.model_fingerprint(), gguf::ModelFingerprint(model_->file()));
  EXPECT_EQ(info.n_embd(), model_->hparams().n_embd);
  EXPECT_EQ(info.wire_dtypes_size(), 2);
  ASSERT_EQ(info.shards_size(), 2);
  for (int s = 0; s < 2; ++s) {
    const ktx::v1::HostedShard& hosted = info.shards(s);
    EXPECT_EQ(hosted.name(), shards_[s].name);
    EXPECT_EQ(hosted.plan_index(), s);
    EXPECT_EQ(hosted.bytes(), plan_.shards[s].bytes);
    HeldExperts got(model_->hparams().n_layer);
    for (const auto& layer : hosted.layers()) {
      got[layer.il()].assign(layer.experts().begin(), layer.experts().end());
    }
    EXPECT_EQ(got, held_[s]) << "shard " << s;
  }
}

TEST_F(ShardHostTest, ComputeEqualsInProcessShardBitForBit) {
  Serve();
  for (WireDtype dtype : {WireDtype::kF32, WireDtype::kBf16}) {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    auto stream = stub_->Compute(&context);
    // 3 messages of 2 parts each, all written before any answer is read.
    std::map<uint64_t, Part> sent;
    for (int m = 0; m < 3; ++m) {
      ktx::v1::ComputeRequest request;
      for (int j = 0; j < 2; ++j) {
        const uint64_t id = 100 + m * 2 + j;
        Part p = MakePart(id, 1 + 6 * j + m, static_cast<uint32_t>(id), dtype);
        *request.add_parts() = p.proto;
        sent.emplace(id, std::move(p));
      }
      ASSERT_TRUE(stream->Write(request));
    }
    std::map<uint64_t, ktx::v1::ExpertResult> answers;
    ktx::v1::ComputeResponse response;
    while (answers.size() < sent.size() && stream->Read(&response)) {
      for (const auto& r : response.results()) answers[r.request_id()] = r;
    }
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
    ASSERT_EQ(answers.size(), sent.size()) << WireDtypeName(dtype);
    for (const auto& [id, p] : sent) {
      SCOPED_TRACE(absl::StrCat(WireDtypeName(dtype), " part ", id));
      ExpectBitEqual(answers[id], Expected(p, dtype));
    }
  }
  const ktx::v1::ShardStatsResponse stats = host_->Stats();
  ASSERT_EQ(stats.shards_size(), 2);
  EXPECT_EQ(stats.shards(1).parts_served(), 12);
  EXPECT_EQ(stats.shards(1).parts_failed(), 0);
  EXPECT_EQ(stats.shards(1).rows(), 2 * (1 + 2 + 3 + 7 + 8 + 9));
  EXPECT_EQ(stats.shards(1).queue_depth(), 0);
  EXPECT_EQ(stats.shards(0).parts_served(), 0);
}

TEST_F(ShardHostTest, MalformedPartsGetInvalidArgumentNamingTheField) {
  Serve();
  const auto& hp = model_->hparams();
  const int not_held = held_[0][kLayer][0];  // held by shard 0 only
  struct Case {
    std::string field;
    std::function<void(ktx::v1::ExpertPart*)> mutate;
  };
  const std::vector<Case> cases = {
      {"parts[0].shard", [](auto* p) { p->set_shard("nobody"); }},
      {"parts[0].il", [](auto* p) { p->set_il(0); }},  // the dense layer
      {"parts[0].il", [](auto* p) { p->set_il(99); }},
      {"parts[0].il", [](auto* p) { p->set_il(-1); }},
      {"parts[0].n_expert_used", [](auto* p) { p->set_n_expert_used(0); }},
      {"parts[0].n_expert_used", [&](auto* p) { p->set_n_expert_used(hp.n_expert + 1); }},
      {"parts[0].experts", [](auto* p) { p->clear_experts(); }},
      {"parts[0].experts[", [&](auto* p) { p->set_experts(0, hp.n_expert); }},
      {"parts[0].experts[", [&](auto* p) { p->add_experts(p->experts(0)); }},  // not ascending
      {"does not hold expert",
       [&](auto* p) {
         p->clear_experts();
         p->add_experts(not_held);
       }},
      {"parts[0].h.dtype",
       [](auto* p) { p->mutable_h()->set_dtype(ktx::v1::WIRE_DTYPE_UNSPECIFIED); }},
      {"parts[0].h.shape", [](auto* p) { p->mutable_h()->add_shape(1); }},
      {"parts[0].h.shape[1]", [](auto* p) { p->mutable_h()->set_shape(1, 100); }},
      {"parts[0].h.shape[0]", [](auto* p) { p->mutable_h()->set_shape(0, int64_t{1} << 40); }},
      {"parts[0].h.data", [](auto* p) { p->mutable_h()->mutable_data()->append("xy"); }},
      {"parts[0].expert_ids", [](auto* p) { p->mutable_expert_ids()->RemoveLast(); }},
      {"parts[0].expert_ids[2]", [&](auto* p) { p->set_expert_ids(2, -5); }},
      {"parts[0].weights", [](auto* p) { p->add_weights(1.0f); }},
      {"parts[0].weights[1]", [](auto* p) { p->set_weights(1, std::nanf("")); }},
  };
  grpc::ClientContext context;
  context.set_deadline(Deadline());
  auto stream = stub_->Compute(&context);
  const Part good = MakePart(1, 5, 42, WireDtype::kF32);
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].field);
    ktx::v1::ComputeRequest request;
    ktx::v1::ExpertPart* part = request.add_parts();
    *part = good.proto;
    part->set_request_id(1000 + i);
    cases[i].mutate(part);
    ASSERT_TRUE(stream->Write(request));
    ktx::v1::ComputeResponse response;
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_EQ(response.results_size(), 1);
    EXPECT_EQ(response.results(0).request_id(), 1000 + i);
    EXPECT_EQ(response.results(0).code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_NE(response.results(0).message().find(cases[i].field), std::string::npos)
        << response.results(0).message();
  }
  // An empty request names `parts`.
  ASSERT_TRUE(stream->Write(ktx::v1::ComputeRequest()));
  ktx::v1::ComputeResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_EQ(response.results_size(), 1);
  EXPECT_EQ(response.results(0).code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_NE(response.results(0).message().find("parts"), std::string::npos);
  // The stream still serves a valid part.
  ktx::v1::ComputeRequest request;
  *request.add_parts() = good.proto;
  ASSERT_TRUE(stream->Write(request));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_EQ(response.results_size(), 1);
  ExpectBitEqual(response.results(0), Expected(good, WireDtype::kF32));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// A routing policy pads rows with kNoExpert (weight 0): accepted and skipped,
// as in process.
TEST_F(ShardHostTest, RoutingPaddingIsAccepted) {
  Serve();
  Part p = MakePart(7, 9, 99, WireDtype::kF32);
  const int k = p.routing.n_expert_used;
  for (int64_t t = 0; t < p.routing.n_tokens; t += 2) {
    p.routing.expert_ids[t * k + k - 1] = models::kNoExpert;
    p.routing.weights[t * k + k - 1] = 0.0f;
  }
  p.proto.mutable_expert_ids()->Assign(p.routing.expert_ids.begin(), p.routing.expert_ids.end());
  p.proto.mutable_weights()->Assign(p.routing.weights.begin(), p.routing.weights.end());
  grpc::ClientContext context;
  context.set_deadline(Deadline());
  auto stream = stub_->Compute(&context);
  ktx::v1::ComputeRequest request;
  *request.add_parts() = p.proto;
  ASSERT_TRUE(stream->Write(request));
  ktx::v1::ComputeResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_EQ(response.results_size(), 1);
  ExpectBitEqual(response.results(0), Expected(p, WireDtype::kF32));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ShardHostTest, TokenIsRequiredWhenConfigured) {
  ShardHostOptions options;
  options.security.token = "s3cret-token";
  Serve(options);
  {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    ktx::v1::ShardInfoResponse info;
    EXPECT_EQ(stub_->Info(&context, {}, &info).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    rpc::AttachToken(options.security, &context);
    ktx::v1::ShardInfoResponse info;
    EXPECT_TRUE(stub_->Info(&context, {}, &info).ok());
  }
  {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    auto stream = stub_->Compute(&context);
    ktx::v1::ComputeRequest request;
    *request.add_parts() = MakePart(1, 2, 3, WireDtype::kF32).proto;
    stream->Write(request);
    ktx::v1::ComputeResponse response;
    EXPECT_FALSE(stream->Read(&response));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    ktx::v1::ShardStatsResponse stats;
    EXPECT_EQ(stub_->Stats(&context, {}, &stats).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
}

constexpr char kTopology[] = R"(
nodes { name: "head" listen_address: "127.0.0.1:50051" head: true attention_device: "cpu" }
nodes {
  name: "node1"
  listen_address: "127.0.0.1:50052"
  shards { name: "node1/a" }
  shards { name: "node1/b" }
}
nodes { name: "node2" listen_address: "127.0.0.1:50053" shards { name: "node2/a" cpus: "0" } }
)";

TEST(ShardHostTopologyTest, HostsTheNamedNodesShardsWithTheirPlanIndices) {
  auto model = FixtureModel("bf16");
  ASSERT_NE(model, nullptr);
  auto parsed = topology::ParseTopologyConfigText(kTopology, "test.textproto");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  auto host = ShardHost::Create(model, *parsed, "node1", {});
  ASSERT_TRUE(host.ok()) << host.status();
  const ktx::v1::ShardInfoResponse info = (*host)->Info();
  ASSERT_EQ(info.shards_size(), 2);
  EXPECT_EQ(info.shards(0).name(), "node1/a");
  EXPECT_EQ(info.shards(0).plan_index(), 0);
  EXPECT_EQ(info.shards(1).name(), "node1/b");
  EXPECT_EQ(info.shards(1).plan_index(), 1);
  // The plan is the head's: all three shards, in config order.
  auto all = ShardsFromTopology(*parsed, "head");
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 3u);
  EXPECT_EQ((*all)[2].address, "127.0.0.1:50053");
  EXPECT_EQ((*all)[2].node, "node2");
  auto plan = PlanShards(*model, *all, {});
  ASSERT_TRUE(plan.ok());
  const std::vector<HeldExperts> held = HeldByShard(*plan, model->hparams());
  for (int s = 0; s < 2; ++s) {
    int64_t n = 0;
    for (const auto& layer : held[s]) n += static_cast<int64_t>(layer.size());
    EXPECT_EQ(info.shards(s).n_experts(), n);
  }

  auto unknown = ShardHost::Create(model, *parsed, "node9", {});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("node9"), std::string::npos);
  auto head = ShardHost::Create(model, *parsed, "head", {});
  EXPECT_EQ(head.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(head.status().message().find("holds no expert shard"), std::string::npos);
}

}  // namespace
}  // namespace ktx::actors
