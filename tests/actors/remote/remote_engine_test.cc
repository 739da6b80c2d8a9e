// The Engine with expert shards on other nodes (actors/remote/), all in one
// process: each "node" is a ShardHost served by a real gRPC server on
// 127.0.0.1 (port 0), the head an Engine whose shards have addresses.
//  - 2 remote shards give bit for bit the logits and greedy tokens of the
//    in-process Engine with the same shards, on the fixtures (F32 wire), and
//    with the BF16 wire those of the in-process engine with the BF16 wire;
//  - a shard server shut down mid-generation fails the request with
//    UNAVAILABLE naming the shard, well within the deadline; while it is down
//    requests fail fast; once a new server is up on the same address the next
//    request succeeds (the proxy reconnected and re-checked Info);
//  - a node serving another model or another plan is refused at
//    Engine::Create, naming it; missing nodes time out naming each shard;
//    without the configured token the node refuses (UNAUTHENTICATED);
//  - EngineOptionsFromTopology: local and remote shards, security, wire
//    dtype, and errors naming the file, line and field.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <future>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "actors/engine.h"
#include "actors/remote/shard_host.h"
#include "actors/remote/topology_shards.h"
#include "gtest/gtest.h"
#include "tests/actors/actors_test_util.h"
#include "tests/actors/remote/remote_test_util.h"
#include "topology/config.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;
using testing::FixtureModel;

constexpr int kGreedyTokens = 12;

// The head's shards: two nodes with one shard each.
std::vector<ShardOptions> HeadShards(const std::string& a1, const std::string& a2) {
  std::vector<ShardOptions> shards(2);
  shards[0].name = "n1/a";
  shards[0].node = "n1";
  shards[0].address = a1;
  shards[1].name = "n2/a";
  shards[1].node = "n2";
  shards[1].address = a2;
  return shards;
}

// One shard node: a ShardHost over shard `index` of `shards`'s plan, served
// on loopback.
struct Node {
  std::unique_ptr<ShardHost> host;
  testing::TestServer server;

  void Stop() {
    if (server.server) server.server->Shutdown(std::chrono::system_clock::now());
    server.server.reset();
    host.reset();
  }
  ~Node() { Stop(); }
};

// Experts on the reference path unless `fast`.
std::unique_ptr<Node> StartNode(std::shared_ptr<const models::Deepseek2Model> model,
                                const std::string& name, int index,
                                const std::vector<ShardOptions>& shards,
                                ShardHostOptions options = {},
                                const std::string& address = "127.0.0.1:0", bool fast = false) {
  auto plan = PlanShards(*model, shards, options.placement);
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return nullptr;
  options.experts = fast ? ExpertsBackend::kFast : ExpertsBackend::kReference;
  const rpc::RpcSecurity security = options.security;
  auto host = ShardHost::CreateWithPlan(model, name, shards, *plan, {index}, std::move(options));
  EXPECT_TRUE(host.ok()) << host.status();
  if (!host.ok()) return nullptr;
  auto node = std::make_unique<Node>();
  node->host = std::move(*host);
  node->server = testing::StartServer(node->host->service(), security, address);
  EXPECT_NE(node->server.server, nullptr) << "cannot serve on " << address;
  if (node->server.server == nullptr) return nullptr;
  return node;
}

EngineOptions BaseOptions(bool fast = false) {
  EngineOptions options;
  options.experts = fast ? ExpertsBackend::kFast : ExpertsBackend::kReference;
  options.prefill_chunk = 16;
  options.kv_budget_bytes = 64 << 20;
  options.remote_wait = std::chrono::seconds(20);
  options.shard_deadline = std::chrono::seconds(10);
  return options;
}

struct EngineRun {
  std::vector<float> logits;  // F32 [tokens, n_vocab] of the fixture sequence
  std::vector<int32_t> tokens;
};

GenerateRequest GreedyRequest() {
  GenerateRequest request;
  request.prompt = testing::PromptTokens();
  request.sampling.temperature = 0.0f;
  request.max_tokens = kGreedyTokens;
  request.stop_at_eos = false;
  request.deadline = std::chrono::seconds(60);
  return request;
}

EngineRun RunEngine(Engine& engine) {
  EngineRun run;
  std::vector<int32_t> sequence = testing::PromptTokens();
  const auto gen =
      testing::Manifest()["files"]["bf16"]["ref64_greedy_tokens"].get<std::vector<int32_t>>();
  sequence.insert(sequence.end(), gen.begin(), gen.begin() + 16);
  auto logits = engine.Logits(sequence);
  EXPECT_TRUE(logits.ok()) << logits.status();
  if (logits.ok()) run.logits = logits->ToVector();
  auto result = engine.Generate(GreedyRequest());
  EXPECT_TRUE(result.ok()) << result.status();
  if (result.ok()) run.tokens = result->tokens;
  return run;
}

void ExpectSameRun(const EngineRun& remote, const EngineRun& local) {
  ASSERT_FALSE(local.logits.empty());
  ASSERT_EQ(remote.logits.size(), local.logits.size());
  size_t differ = 0;
  for (size_t i = 0; i < local.logits.size(); ++i) differ += remote.logits[i] != local.logits[i];
  EXPECT_EQ(differ, 0u) << "logits differ (of " << local.logits.size() << ")";
  EXPECT_EQ(remote.tokens, local.tokens);
  EXPECT_EQ(static_cast<int>(local.tokens.size()), kGreedyTokens);
}

// (fixture, fast experts on every shard: else the reference path)
class RemoteEngineTest : public ::testing::TestWithParam<std::tuple<std::string, bool>> {};

TEST_P(RemoteEngineTest, TwoRemoteShardsEqualInProcessBitForBit) {
  const auto& [type, fast] = GetParam();
  auto model = FixtureModel(type);
  ASSERT_NE(model, nullptr);
  const std::vector<ShardOptions> plan_shards = HeadShards("", "");
  auto n1 = StartNode(model, "n1", 0, plan_shards, {}, "127.0.0.1:0", fast);
  auto n2 = StartNode(model, "n2", 1, plan_shards, {}, "127.0.0.1:0", fast);
  ASSERT_TRUE(n1 && n2);
  for (WireDtype dtype : {WireDtype::kF32, WireDtype::kBf16}) {
    SCOPED_TRACE(WireDtypeName(dtype));
    EngineOptions local = BaseOptions(fast);
    local.shards = plan_shards;
    local.wire_dtype = dtype;
    auto in_process = Engine::Create(model, local);
    ASSERT_TRUE(in_process.ok()) << in_process.status();
    const EngineRun want = RunEngine(**in_process);
    in_process->reset();

    EngineOptions remote = local;
    remote.shards = HeadShards(n1->server.address, n2->server.address);
    auto engine = Engine::Create(model, remote);
    ASSERT_TRUE(engine.ok()) << engine.status();
    const EngineRun got = RunEngine(**engine);
    ExpectSameRun(got, want);
    const std::vector<RemoteShardStatus> states = (*engine)->RemoteShardStates();
    ASSERT_EQ(states.size(), 2u);
    for (const RemoteShardStatus& s : states) {
      EXPECT_TRUE(s.connected) << s.name;
      EXPECT_GT(s.node_parts_sent, 0) << s.name;
      EXPECT_EQ(s.sessions, 1) << s.name;
    }
    EXPECT_NE((*engine)->Describe().find("remote, node 'n2' at " + n2->server.address),
              std::string::npos)
        << (*engine)->Describe();
    if (dtype == WireDtype::kBf16) {
      // The rounding happened: not the F32 wire's numbers.
      EngineOptions f32 = local;
      f32.wire_dtype = WireDtype::kF32;
      auto exact = Engine::Create(model, f32);
      ASSERT_TRUE(exact.ok());
      EXPECT_NE(RunEngine(**exact).logits, got.logits);
    }
  }
  const ktx::v1::ShardStatsResponse stats = n2->host->Stats();
  ASSERT_EQ(stats.shards_size(), 1);
  EXPECT_GT(stats.shards(0).parts_served(), 0);
  EXPECT_EQ(stats.shards(0).parts_failed(), 0);
}

// Routing policies through remote shards: adaptive top-k pads rows with
// kNoExpert (the wire's expert_ids carries -1 and the ShardHost skips it),
// deferral sends a second MoE request per layer; both equal the in-process
// engine bit for bit (same plan, F32 wire), and no part fails.
TEST(RemoteEnginePolicyTest, PaddedRowsAndDeferralOnRemoteShardsEqualInProcess) {
  auto model = FixtureModel("bf16");
  ASSERT_NE(model, nullptr);
  const std::vector<ShardOptions> plan_shards = HeadShards("", "");
  auto n1 = StartNode(model, "n1", 0, plan_shards);
  auto n2 = StartNode(model, "n2", 1, plan_shards);
  ASSERT_TRUE(n1 && n2);
  EngineOptions local = BaseOptions();
  local.shards = plan_shards;
  auto in_process = Engine::Create(model, local);
  ASSERT_TRUE(in_process.ok()) << in_process.status();
  EngineOptions remote = local;
  remote.shards = HeadShards(n1->server.address, n2->server.address);
  auto engine = Engine::Create(model, remote);
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::vector<int32_t> sequence = testing::PromptTokens();
  for (const std::string text : {"mass=0.4", "top_k=1;layers=2,mass=0.5", "top_k=3,defer=1",
                                 "defer=2,join=next_attention"}) {
    absl::StatusOr<models::RoutingPolicy> parsed = models::RoutingPolicy::Parse(text);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    auto policy = std::make_shared<const models::RoutingPolicy>(*parsed);
    auto want = (*in_process)->Logits(sequence, policy);
    ASSERT_TRUE(want.ok()) << text << ": " << want.status();
    auto got = (*engine)->Logits(sequence, policy);
    ASSERT_TRUE(got.ok()) << text << ": " << got.status();
    EXPECT_EQ(got->values(), want->values()) << text;
    GenerateRequest request = GreedyRequest();
    request.routing_policy = policy;
    auto a = (*in_process)->Generate(request);
    auto b = (*engine)->Generate(request);
    ASSERT_TRUE(a.ok() && b.ok()) << text;
    EXPECT_EQ(b->tokens, a->tokens) << text;
  }
  // Padded rows were served like any other: nothing failed anywhere.
  auto stats = (*engine)->RouterStats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->failed_rows, 0);
  for (Node* node : {n1.get(), n2.get()}) {
    const ktx::v1::ShardStatsResponse s = node->host->Stats();
    ASSERT_EQ(s.shards_size(), 1);
    EXPECT_GT(s.shards(0).parts_served(), 0);
    EXPECT_EQ(s.shards(0).parts_failed(), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RemoteEngineTest,
                         ::testing::Values(std::tuple<std::string, bool>{"bf16", false},
                                           std::tuple<std::string, bool>{"q4_k_m", false},
                                           std::tuple<std::string, bool>{"q4_k_m", true}),
                         [](const auto& info) {
                           return std::get<0>(info.param) +
                                  (std::get<1>(info.param) ? "_fast" : "_reference");
                         });

TEST(RemoteEngineFaultTest, ServerShutDownMidGenerationFailsFastThenRecovers) {
  auto model = FixtureModel("bf16");
  ASSERT_NE(model, nullptr);
  const std::vector<ShardOptions> plan_shards = HeadShards("", "");
  auto n1 = StartNode(model, "n1", 0, plan_shards);
  auto n2 = StartNode(model, "n2", 1, plan_shards);
  ASSERT_TRUE(n1 && n2);
  const std::string address2 = n2->server.address;
  EngineOptions options = BaseOptions();
  options.shards = HeadShards(n1->server.address, address2);
  options.shard_deadline = std::chrono::seconds(5);
  auto engine = Engine::Create(model, options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto reference = (*engine)->Generate(GreedyRequest());
  ASSERT_TRUE(reference.ok()) << reference.status();

  // Shut node 2's server down after the third token of a long generation.
  GenerateRequest request = GreedyRequest();
  request.max_tokens = 400;
  std::atomic<int> tokens{0};
  std::promise<void> third;
  Clock::time_point shut_at;
  std::thread killer;
  auto result = (*engine)->Generate(request, [&](int32_t, std::string_view) {
    if (++tokens == 3) {
      shut_at = Clock::now();
      killer = std::thread([&] { n2->Stop(); });
    }
    return true;
  });
  const Clock::time_point failed_at = Clock::now();
  if (killer.joinable()) killer.join();
  ASSERT_FALSE(result.ok()) << "generated " << tokens << " tokens with node 2 down";
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable) << result.status();
  EXPECT_NE(result.status().message().find("n2/a"), std::string::npos) << result.status();
  EXPECT_NE(result.status().message().find(address2), std::string::npos) << result.status();
  EXPECT_LT(failed_at - shut_at, std::chrono::seconds(3)) << "the failure took too long";

  // While node 2 is down, requests fail fast.
  const Clock::time_point t0 = Clock::now();
  auto down = (*engine)->Generate(GreedyRequest());
  ASSERT_FALSE(down.ok());
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
  EXPECT_NE(down.status().message().find("n2/a"), std::string::npos) << down.status();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(2));

  // A new server on the same address: the proxy reconnects, checks Info again
  // and the next request gives the reference tokens.
  n2 = StartNode(model, "n2", 1, plan_shards, {}, address2);
  ASSERT_NE(n2, nullptr);
  const Clock::time_point limit = Clock::now() + std::chrono::seconds(15);
  bool connected = false;
  while (!connected && Clock::now() < limit) {
    for (const RemoteShardStatus& s : (*engine)->RemoteShardStates()) {
      if (s.name == "n2/a") connected = s.connected;
    }
    if (!connected) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(connected) << "node 2 did not come back";
  auto again = (*engine)->Generate(GreedyRequest());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->tokens, reference->tokens);
  for (const RemoteShardStatus& s : (*engine)->RemoteShardStates()) {
    if (s.name == "n2/a") {
      EXPECT_EQ(s.sessions, 2);
    }
  }
}

using testing::Gate;
using testing::GatedBackend;
using testing::OpenOnExit;

// A node that stops answering (its shard hangs) is a stalled peer: the parts
// in flight fail with UNAVAILABLE naming it before the router's deadline
// would report DEADLINE_EXCEEDED; once it answers again, so does the engine.
TEST(RemoteEngineFaultTest, StalledNodeFailsWithUnavailableThenServesAgain) {
  auto model = FixtureModel("bf16");
  ASSERT_NE(model, nullptr);
  const std::vector<ShardOptions> plan_shards = HeadShards("", "");
  auto gate = std::make_shared<Gate>();
  ShardHostOptions gated;
  gated.expert_backend_factory = [model, gate](int s, const HeldExperts& held)
      -> absl::StatusOr<std::shared_ptr<models::ExpertBackend>> {
    KTX_ASSIGN_OR_RETURN(std::shared_ptr<models::ExpertBackend> inner,
                         MappedExpertBackendFactory(model)(s, held));
    return std::make_shared<GatedBackend>(std::move(inner), gate);
  };
  auto n1 = StartNode(model, "n1", 0, plan_shards);
  auto n2 = StartNode(model, "n2", 1, plan_shards, gated);
  ASSERT_TRUE(n1 && n2);
  OpenOnExit open_on_exit{gate};
  EngineOptions options = BaseOptions();
  options.shards = HeadShards(n1->server.address, n2->server.address);
  options.shard_deadline = std::chrono::seconds(4);  // stall reset after 3 s
  auto engine = Engine::Create(model, options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const Clock::time_point t0 = Clock::now();
  auto stalled = (*engine)->Generate(GreedyRequest());
  const auto took = Clock::now() - t0;
  ASSERT_FALSE(stalled.ok());
  EXPECT_EQ(stalled.status().code(), absl::StatusCode::kUnavailable) << stalled.status();
  EXPECT_NE(stalled.status().message().find("n2/a"), std::string::npos) << stalled.status();
  EXPECT_NE(stalled.status().message().find("stalled"), std::string::npos) << stalled.status();
  EXPECT_LT(took, std::chrono::seconds(4)) << "not before the router's deadline";
  EXPECT_GE(took, std::chrono::milliseconds(2900));

  gate->Open();
  const Clock::time_point limit = Clock::now() + std::chrono::seconds(15);
  absl::StatusOr<GenerateResult> again = absl::UnknownError("not tried");
  while (Clock::now() < limit) {
    again = (*engine)->Generate(GreedyRequest());
    if (again.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(static_cast<int>(again->tokens.size()), kGreedyTokens);
}

TEST(RemoteEngineCreateTest, AnotherModelIsRefusedNamingTheNode) {
  auto model = FixtureModel("bf16");
  auto other = FixtureModel("q8_0");
  ASSERT_TRUE(model && other);
  const std::vector<ShardOptions> plan_shards = HeadShards("", "");
  auto n1 = StartNode(model, "n1", 0, plan_shards);
  auto n2 = StartNode(other, "n2", 1, plan_shards);
  ASSERT_TRUE(n1 && n2);
  EngineOptions options = BaseOptions();
  options.shards = HeadShards(n1->server.address, n2->server.address);
  const Clock::time_point t0 = Clock::now();
  auto engine = Engine::Create(model, options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kFailedPrecondition) << engine.status();
  EXPECT_NE(engine.status().message().find("another model"), std::string::npos);
  EXPECT_NE(engine.status().message().find("node 'n2' at " + n2->server.address), std::string::npos)
      << engine.status();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5)) << "a mismatch must not wait";
}

TEST(RemoteEngineCreateTest, AnotherPlanIsRefusedNamingTheShard) {
  auto model = FixtureModel("bf16");
  ASSERT_NE(model, nullptr);
  const std::vector<ShardOptions> plan_shards = HeadShards("", "");
  // Node 2 planned with a third shard: its n2/a holds fewer experts.
  std::vector<ShardOptions> other_shards = plan_shards;
  other_shards.push_back(ShardOptions{"n3/a"});
  auto n1 = StartNode(model, "n1", 0, plan_shards);
  auto n2 = StartNode(model, "n2", 1, other_shards);
  ASSERT_TRUE(n1 && n2);
  EngineOptions options = BaseOptions();
  options.shards = HeadShards(n1->server.address, n2->server.address);
  auto engine = Engine::Create(model, options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kFailedPrecondition) << engine.status();
  EXPECT_NE(engine.status().message().find("expert shard 'n2/a'"), std::string::npos)
      << engine.status();
  EXPECT_NE(engine.status().message().find("placement plan"), std::string::npos) << engine.status();
}

TEST(RemoteEngineCreateTest, MissingNodesTimeOutNamingEach) {
  auto model = FixtureModel("bf16");
  ASSERT_NE(model, nullptr);
  // Two ports nobody listens on: take free ones, then close them.
  std::vector<std::string> addresses;
  for (int i = 0; i < 2; ++i) {
    auto host = ShardHost::CreateWithPlan(model, "tmp", HeadShards("", ""),
                                          *PlanShards(*model, HeadShards("", ""), {}), {0}, {});
    ASSERT_TRUE(host.ok());
    testing::TestServer server = testing::StartServer((*host)->service(), {});
    ASSERT_NE(server.server, nullptr);
    addresses.push_back(server.address);
    server.server->Shutdown();
  }
  EngineOptions options = BaseOptions();
  options.shards = HeadShards(addresses[0], addresses[1]);
  options.remote_wait = std::chrono::milliseconds(600);
  const Clock::time_point t0 = Clock::now();
  auto engine = Engine::Create(model, options);
  const auto waited = Clock::now() - t0;
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kDeadlineExceeded) << engine.status();
  const std::string message(engine.status().message());
  for (int i = 0; i < 2; ++i) {
    EXPECT_NE(message.find(absl::StrCat("shard 'n", i + 1, "/a' (node 'n", i + 1, "' at ",
                                        addresses[i], ")")),
              std::string::npos)
        << message;
  }
  EXPECT_GE(waited, std::chrono::milliseconds(550));
  EXPECT_LT(waited, std::chrono::seconds(3));
}

TEST(RemoteEngineCreateTest, ATokenIsRequiredWhenTheNodeHasOne) {
  auto model = FixtureModel("bf16");
  ASSERT_NE(model, nullptr);
  const std::vector<ShardOptions> plan_shards = HeadShards("", "");
  ShardHostOptions secured;
  secured.security.token = "remote-shard-token";
  auto n1 = StartNode(model, "n1", 0, plan_shards, secured);
  auto n2 = StartNode(model, "n2", 1, plan_shards, secured);
  ASSERT_TRUE(n1 && n2);
  EngineOptions options = BaseOptions();
  options.shards = HeadShards(n1->server.address, n2->server.address);
  auto refused = Engine::Create(model, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated) << refused.status();
  EXPECT_NE(refused.status().message().find(" at 127.0.0.1:"), std::string::npos)
      << refused.status();
  options.rpc_security.token = "remote-shard-token";
  auto engine = Engine::Create(model, options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto result = (*engine)->Generate(GreedyRequest());
  EXPECT_TRUE(result.ok()) << result.status();
}

// ---- EngineOptionsFromTopology ----

constexpr char kTopology[] = R"(
expert_wire_dtype: "bf16"
nodes {
  name: "head"
  listen_address: "127.0.0.1:50051"
  head: true
  attention_device: "cpu"
  auth_token_file: "token.txt"
  shards { name: "head/a" cpus: "0" memory_budget_bytes: 4000000000 }
}
nodes {
  name: "n1"
  listen_address: "127.0.0.1:PORT1"
  auth_token_file: "token.txt"
  shards { name: "n1/a" cpus: "1" }
  shards { name: "n1/b" cpus: "3" }
}
nodes {
  name: "n2"
  listen_address: "127.0.0.1:PORT2"
  auth_token_file: "token.txt"
  shards { name: "n2/a" cpus: "2" }
}
)";

class TopologyOptionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "ktx_remote_topo_" + std::to_string(getpid());
    std::string mkdir = "mkdir -p " + dir_;
    ASSERT_EQ(std::system(mkdir.c_str()), 0);
    std::ofstream(dir_ + "/token.txt") << "topology-token\n";
  }
  absl::StatusOr<topology::ParsedTopologyConfig> Parse(const std::string& text) {
    const std::string path = dir_ + "/topology.textproto";
    std::ofstream(path) << text;
    return topology::ParseTopologyConfigFile(path);
  }
  std::string dir_;
};

TEST_F(TopologyOptionsTest, LocalAndRemoteShardsSecurityAndWireDtype) {
  auto parsed = Parse(absl::StrReplaceAll(kTopology, {{"PORT1", "50052"}, {"PORT2", "50053"}}));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  auto options = EngineOptionsFromTopology(*parsed, "head");
  ASSERT_TRUE(options.ok()) << options.status();
  ASSERT_EQ(options->shards.size(), 4u);
  EXPECT_EQ(options->shards[0].name, "head/a");
  EXPECT_EQ(options->shards[0].address, "");
  EXPECT_EQ(options->shards[0].memory_budget_bytes, 4000000000u);
  EXPECT_EQ(options->shards[1].name, "n1/a");
  EXPECT_EQ(options->shards[1].node, "n1");
  EXPECT_EQ(options->shards[1].address, "127.0.0.1:50052");
  EXPECT_EQ(options->shards[1].cpus, std::vector<int>{1});
  EXPECT_EQ(options->shards[1].memory_budget_bytes, topology::kNoBudget);
  EXPECT_EQ(options->shards[2].name, "n1/b");
  EXPECT_EQ(options->shards[2].address, "127.0.0.1:50052");
  EXPECT_EQ(options->shards[3].address, "127.0.0.1:50053");
  EXPECT_EQ(options->rpc_security.token, "topology-token");
  EXPECT_EQ(options->wire_dtype, WireDtype::kBf16);

  auto not_head = EngineOptionsFromTopology(*parsed, "n1");
  EXPECT_EQ(not_head.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(not_head.status().message().find("not the head"), std::string::npos)
      << not_head.status();
  EXPECT_NE(not_head.status().message().find("topology.textproto:11:"), std::string::npos)
      << not_head.status();
  auto unknown = EngineOptionsFromTopology(*parsed, "n9");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("n9"), std::string::npos) << unknown.status();

  auto bad = Parse(absl::StrReplaceAll(
      kTopology, {{"PORT1", "50052"}, {"PORT2", "50053"}, {"\"bf16\"", "\"fp8\""}}));
  ASSERT_TRUE(bad.ok());
  auto bad_dtype = EngineOptionsFromTopology(*bad, "head");
  EXPECT_EQ(bad_dtype.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_dtype.status().message().find("topology.textproto:2: expert_wire_dtype"),
            std::string::npos)
      << bad_dtype.status();
}

// The whole path a ktx-node head takes: topology -> options -> Engine with
// its own shard in process and two ShardHosts (made from the same topology)
// over gRPC, bit-equal to one process.
TEST_F(TopologyOptionsTest, HeadAndShardNodesFromOneTopologyEqualOneProcess) {
  auto model = FixtureModel("bf16");
  ASSERT_NE(model, nullptr);
  // Shard nodes first (their plan does not depend on the ports), then the
  // head's topology with the ports they got.
  auto draft = Parse(absl::StrReplaceAll(kTopology, {{"PORT1", "1"}, {"PORT2", "2"}}));
  ASSERT_TRUE(draft.ok()) << draft.status();
  std::vector<std::unique_ptr<ShardHost>> hosts;
  std::vector<testing::TestServer> servers;
  for (const char* name : {"n1", "n2"}) {
    auto host_options = ShardHostOptionsFromTopology(*draft, name);
    ASSERT_TRUE(host_options.ok()) << host_options.status();
    EXPECT_EQ(host_options->security.token, "topology-token");
    host_options->experts = ExpertsBackend::kReference;
    auto host = ShardHost::Create(model, *draft, name, *host_options);
    ASSERT_TRUE(host.ok()) << host.status();
    servers.push_back(testing::StartServer((*host)->service(), host_options->security));
    ASSERT_NE(servers.back().server, nullptr);
    hosts.push_back(std::move(*host));
  }
  auto parsed = Parse(absl::StrReplaceAll(kTopology, {{"PORT1", std::to_string(servers[0].port)},
                                                      {"PORT2", std::to_string(servers[1].port)}}));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  auto options = EngineOptionsFromTopology(*parsed, "head");
  ASSERT_TRUE(options.ok()) << options.status();
  EngineOptions base = BaseOptions();
  options->experts = base.experts;
  options->prefill_chunk = base.prefill_chunk;
  options->kv_budget_bytes = base.kv_budget_bytes;
  auto engine = Engine::Create(model, *options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const EngineRun got = RunEngine(**engine);
  // n1's two shards share one stream: the counters they report are its.
  const std::vector<RemoteShardStatus> states = (*engine)->RemoteShardStates();
  ASSERT_EQ(states.size(), 3u);
  EXPECT_EQ(states[0].name, "n1/a");
  EXPECT_EQ(states[1].name, "n1/b");
  EXPECT_EQ(states[0].node_parts_sent, states[1].node_parts_sent);
  EXPECT_GT(states[0].node_parts_sent, 0);
  EXPECT_LE(states[0].node_messages_sent, states[0].node_parts_sent);
  const ktx::v1::ShardStatsResponse n1_stats = hosts[0]->Stats();
  ASSERT_EQ(n1_stats.shards_size(), 2);
  EXPECT_GT(n1_stats.shards(0).parts_served(), 0);
  EXPECT_GT(n1_stats.shards(1).parts_served(), 0);
  EXPECT_EQ(n1_stats.streams(), 1);
  engine->reset();

  EngineOptions local = *options;
  for (ShardOptions& s : local.shards) s.address.clear();
  auto in_process = Engine::Create(model, local);
  ASSERT_TRUE(in_process.ok()) << in_process.status();
  ExpectSameRun(got, RunEngine(**in_process));
  for (auto& server : servers) server.server->Shutdown(std::chrono::system_clock::now());
}

}  // namespace
}  // namespace ktx::actors
