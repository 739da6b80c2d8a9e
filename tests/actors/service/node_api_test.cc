// NodeApi (actors/service/node_api.h), the assembly ktx-node uses: a head
// serves Generation, NodeControl and its extra services, each healthy; a node
// without an engine serves NodeControl (role SHARD) and its extras but no
// Generation; DrainAndStop lets an in-flight stream finish within the grace,
// and after a short grace cancels what is left, freeing its KV cache.
#include "actors/service/node_api.h"

#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "actors/service/health_client.h"
#include "gtest/gtest.h"
#include "ktx/v1/shard.grpc.pb.h"
#include "tests/actors/service/service_test_util.h"

namespace ktx::service {
namespace {

std::unique_ptr<actors::Engine> MakeEngine() {
  actors::EngineOptions options;
  options.shards = actors::EvenShards(2);
  options.n_ctx = 512;
  options.kv_budget_bytes = 16 << 20;
  auto engine = actors::Engine::Create(actors::testing::FixtureModel("q8_0"), options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

std::shared_ptr<grpc::Channel> Channel(const std::string& address) {
  auto channel = rpc::MakeChannel(address, {});
  EXPECT_TRUE(channel.ok());
  return *channel;
}

// The generated base class answers UNIMPLEMENTED: enough to see that a
// service is registered.
class FakeShardService final : public v1::ExpertShard::Service {};

TEST(NodeApiTest, HeadServesGenerationControlAndExtras) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  FakeShardService shard_service;
  NodeApiOptions options;
  options.node_name = "head";
  options.engine = engine.get();
  options.generation.chat_template = "deepseek-v3";
  options.server.security.token = "t0k";
  options.extra_services.push_back({&shard_service, "ktx.v1.ExpertShard"});
  auto api = NodeApi::Start(std::move(options));
  ASSERT_TRUE(api.ok()) << api.status();
  ASSERT_NE((*api)->generation(), nullptr);
  EXPECT_GT((*api)->port(), 0);

  auto channel = Channel((*api)->address());
  for (const std::string service :
       {"", "ktx.v1.Generation", "ktx.v1.NodeControl", "ktx.v1.ExpertShard"}) {
    auto health = CheckHealth(*channel, service, std::chrono::seconds(10));
    ASSERT_TRUE(health.ok()) << service << ": " << health.status();
    EXPECT_EQ(*health, HealthState::kServing) << service;
  }
  // The server's security reaches every service: Generation and NodeControl
  // check the token.
  rpc::RpcSecurity client;
  client.token = "t0k";
  auto stub = v1::Generation::NewStub(channel);
  EXPECT_EQ(
      testing::ReadStream(*stub, testing::GreedyTokensRequest({0, 87}, 2)).status.error_code(),
      grpc::StatusCode::UNAUTHENTICATED);
  const auto out = testing::ReadStream(*stub, testing::GreedyTokensRequest({0, 87}, 2), client);
  EXPECT_TRUE(out.status.ok()) << out.status.error_message();
  v1::ListModelsResponse models;
  {
    grpc::ClientContext context;
    rpc::AttachToken(client, &context);
    ASSERT_TRUE(stub->ListModels(&context, {}, &models).ok());
    EXPECT_EQ(models.models(0).chat_template(), "deepseek-v3");  // generation options applied
  }
  v1::NodeStatusResponse status;
  {
    grpc::ClientContext context;
    rpc::AttachToken(client, &context);
    ASSERT_TRUE(v1::NodeControl::NewStub(channel)->Status(&context, {}, &status).ok());
  }
  EXPECT_EQ(status.role(), v1::NODE_ROLE_HEAD);
  EXPECT_EQ(status.shards_size(), 2);
  EXPECT_EQ(status.requests().completed(), 1);
  {
    grpc::ClientContext context;
    v1::ShardInfoResponse info;
    EXPECT_EQ(v1::ExpertShard::NewStub(channel)->Info(&context, {}, &info).error_code(),
              grpc::StatusCode::UNIMPLEMENTED);
  }
  api->reset();  // the server stops before the engine goes
}

TEST(NodeApiTest, NodeWithoutEngineServesControlOnly) {
  FakeShardService shard_service;
  NodeApiOptions options;
  options.node_name = "socket1";
  options.extra_services.push_back({&shard_service, "ktx.v1.ExpertShard"});
  options.add_status = [](v1::NodeStatusResponse* status) {
    v1::ShardStatus* shard = status->add_shards();
    shard->set_name("socket1/numa1");
    shard->set_node("socket1");
    shard->set_alive(true);
  };
  auto api = NodeApi::Start(std::move(options));
  ASSERT_TRUE(api.ok()) << api.status();
  EXPECT_EQ((*api)->generation(), nullptr);
  auto channel = Channel((*api)->address());
  v1::NodeStatusResponse status;
  grpc::ClientContext context;
  ASSERT_TRUE(v1::NodeControl::NewStub(channel)->Status(&context, {}, &status).ok());
  EXPECT_EQ(status.role(), v1::NODE_ROLE_SHARD);
  EXPECT_EQ(status.node_name(), "socket1");
  ASSERT_EQ(status.shards_size(), 1);
  EXPECT_EQ(status.shards(0).name(), "socket1/numa1");
  EXPECT_EQ(status.health(), "serving");
  EXPECT_FALSE(status.has_kv_cache());
  auto stub = v1::Generation::NewStub(channel);
  EXPECT_EQ(
      testing::ReadStream(*stub, testing::GreedyTokensRequest({0, 87}, 2)).status.error_code(),
      grpc::StatusCode::UNIMPLEMENTED);
  auto health = CheckHealth(*channel, "ktx.v1.Generation", std::chrono::seconds(10));
  EXPECT_EQ(health.status().code(), absl::StatusCode::kNotFound) << health.status();
}

TEST(NodeApiTest, DrainAndStopFinishesInFlightThenStops) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  NodeApiOptions options;
  options.node_name = "head";
  options.engine = engine.get();
  bool on_drain_called = false;
  options.on_drain = [&] { on_drain_called = true; };
  auto api = NodeApi::Start(std::move(options));
  ASSERT_TRUE(api.ok()) << api.status();
  auto stub = v1::Generation::NewStub(Channel((*api)->address()));

  v1::GenerateRequest request = testing::GreedyTokensRequest(actors::testing::PromptTokens(), 100);
  request.set_ignore_eos(true);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  int tokens = response.token_ids_size();
  auto drained = std::async(std::launch::async, [&] {
    return (*api)->DrainAndStop(std::chrono::seconds(60), std::chrono::seconds(1));
  });
  while (reader->Read(&response)) tokens += response.token_ids_size();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 100);
  EXPECT_TRUE(drained.get());
  EXPECT_FALSE((*api)->server().running());
  EXPECT_FALSE(on_drain_called);  // only a Drain call runs the hook
  // Nothing serves there any more.
  grpc::ClientContext late;
  late.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  v1::ListModelsResponse models;
  EXPECT_EQ(stub->ListModels(&late, {}, &models).error_code(), grpc::StatusCode::UNAVAILABLE);
  api->reset();
}

TEST(NodeApiTest, DrainAndStopCancelsWhatOutlastsTheGrace) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  NodeApiOptions options;
  options.node_name = "head";
  options.engine = engine.get();
  auto api = NodeApi::Start(std::move(options));
  ASSERT_TRUE(api.ok()) << api.status();
  auto stub = v1::Generation::NewStub(Channel((*api)->address()));
  v1::GenerateRequest request = testing::GreedyTokensRequest(actors::testing::PromptTokens(), 440);
  request.set_ignore_eos(true);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_FALSE((*api)->DrainAndStop(std::chrono::milliseconds(1), std::chrono::milliseconds(1)));
  while (reader->Read(&response)) {
  }
  EXPECT_FALSE(reader->Finish().ok());
  // The cancelled request's KV cache is freed.
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  bool empty = false;
  while (!empty && std::chrono::steady_clock::now() < end) {
    auto kv = engine->KvStats();
    empty = kv.ok() && kv->n_sequences == 0 && kv->used_bytes == 0;
    if (!empty) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(empty);
  api->reset();
}

TEST(NodeApiTest, StartErrorsAreReported) {
  NodeApiOptions remote;
  remote.node_name = "n";
  remote.server.address = "10.1.2.3:50051";
  EXPECT_EQ(NodeApi::Start(remote).status().code(), absl::StatusCode::kInvalidArgument);
  NodeApiOptions unnamed;
  EXPECT_EQ(NodeApi::Start(unnamed).status().code(), absl::StatusCode::kInvalidArgument);
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  NodeApiOptions bad_template;
  bad_template.node_name = "n";
  bad_template.engine = engine.get();
  bad_template.generation.chat_template = "chatml";
  EXPECT_EQ(NodeApi::Start(bad_template).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ktx::service
