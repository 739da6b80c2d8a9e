// The Generation and NodeControl services over gRPC on loopback, in one
// process: an Engine over the q8_0 fixture served by a NodeServer on
// 127.0.0.1:0. Streamed tokens and text equal Engine::Generate's; Tokenize
// agrees with llama.cpp's ids; errors keep their codes and name the field;
// the token is required when configured while health stays open; oversized
// messages are refused; a cancelled stream frees its KV cache; draining
// refuses new calls and lets in-flight ones finish; NodeControl reports the
// shards, the KV cache and the load, and ReloadPlan says what it found.
#include <unistd.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "actors/service/health_client.h"
#include "gtest/gtest.h"
#include "runtime/gguf/fingerprint.h"
#include "runtime/tokenizer/tokenizer_gguf.h"
#include "runtime/tokenizer/utf8.h"
#include "tests/actors/service/service_test_util.h"

namespace ktx::service {
namespace {

using testing::ReadStream;
using testing::TestNode;
using testing::TestNodeOptions;

bool StartsWith(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// Polls `condition` every 10 ms until it holds or `timeout` passes.
template <class F>
bool PollUntil(F condition, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return condition();
}

TEST(GenerationServiceTest, StreamEqualsEngineGenerate) {
  TestNode node;
  ASSERT_TRUE(node.ok());
  auto stub = node.GenerationStub();
  const std::vector<int32_t> prompt = actors::testing::PromptTokens();

  struct Variant {
    const char* name;
    float temperature;
    uint64_t seed;
  };
  for (const Variant& v : {Variant{"greedy", 0.0f, 0}, Variant{"sampled", 0.9f, 1234}}) {
    SCOPED_TRACE(v.name);
    v1::GenerateRequest request = testing::GreedyTokensRequest(prompt, 24);
    request.mutable_sampling()->set_temperature(v.temperature);
    request.mutable_sampling()->set_seed(v.seed);
    request.set_ignore_eos(true);
    const testing::StreamOutcome got = ReadStream(*stub, request);
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();

    actors::GenerateRequest direct;
    direct.prompt = prompt;
    direct.max_tokens = 24;
    direct.sampling.temperature = v.temperature;
    direct.sampling.seed = v.seed;
    direct.stop_at_eos = false;
    auto want = node.engine().Generate(direct);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_EQ(got.tokens, want->tokens);
    EXPECT_EQ(got.text, want->text);
    // And the text is the tokenizer's detokenization of those tokens.
    auto tok = tokenizer::TokenizerFromGguf(node.engine().model().file().metadata());
    ASSERT_TRUE(tok.ok());
    EXPECT_EQ(got.text, tokenizer::SanitizeUtf8(*tok->Detokenize(got.tokens)));

    ASSERT_NE(got.last(), nullptr);
    const v1::GenerateResponse& last = *got.last();
    EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(last.usage().prompt_tokens(), static_cast<int>(prompt.size()));
    EXPECT_EQ(last.usage().completion_tokens(), 24);
    EXPECT_TRUE(last.token_ids().empty());
    EXPECT_GT(last.timings().time_to_first_token_ms(), 0);
    EXPECT_GE(last.timings().total_ms(), last.timings().time_to_first_token_ms());
    EXPECT_GT(last.timings().decode_tokens_per_second(), 0);
    EXPECT_GT(last.timings().prefill_tokens_per_second(), 0);
    EXPECT_GE(last.timings().queue_ms(), 0);
    for (size_t i = 0; i + 1 < got.messages.size(); ++i) {
      EXPECT_EQ(got.messages[i].finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
      EXPECT_FALSE(got.messages[i].has_usage());
    }
  }
  const GenerationCounters counters = node.generation().counters();
  EXPECT_EQ(counters.completed, 2);
  EXPECT_EQ(counters.tokens_generated, 48);
  EXPECT_EQ(counters.in_flight, 0);
}

TEST(GenerationServiceTest, TextAndChatPromptsAndStops) {
  TestNode node;
  ASSERT_TRUE(node.ok());
  auto stub = node.GenerationStub();
  // The text prompt tokenizes to the fixture's (llama.cpp's) prompt ids, so
  // it generates what the token prompt generates.
  v1::GenerateRequest by_text;
  by_text.set_text(actors::testing::Manifest()["prompt"].get<std::string>());
  by_text.set_max_tokens(12);
  by_text.mutable_sampling()->set_temperature(0);
  by_text.set_ignore_eos(true);
  const auto text_out = ReadStream(*stub, by_text);
  ASSERT_TRUE(text_out.status.ok()) << text_out.status.error_message();
  const auto ids_out = ReadStream(*stub, [&] {
    auto r = testing::GreedyTokensRequest(actors::testing::PromptTokens(), 12);
    r.set_ignore_eos(true);
    return r;
  }());
  ASSERT_TRUE(ids_out.status.ok());
  EXPECT_EQ(text_out.tokens, ids_out.tokens);
  EXPECT_EQ(text_out.last()->usage().prompt_tokens(), 65);

  // A stop string cut from the greedy text (two ASCII letters from its second
  // half; the random fixture's text has U+FFFD and control characters too):
  // the stream ends before its first occurrence.
  size_t at = ids_out.text.size() / 2;
  auto letter = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); };
  while (at + 1 < ids_out.text.size() &&
         !(letter(ids_out.text[at]) && letter(ids_out.text[at + 1]))) {
    ++at;
  }
  ASSERT_LT(at + 1, ids_out.text.size()) << ids_out.text;
  const std::string stop = ids_out.text.substr(at, 2);
  const size_t cut = ids_out.text.find(stop);
  v1::GenerateRequest stopped = by_text;
  stopped.add_stop(stop);
  const auto stop_out = ReadStream(*stub, stopped);
  ASSERT_TRUE(stop_out.status.ok()) << stop_out.status.error_message();
  EXPECT_EQ(stop_out.last()->finish_reason(), v1::FINISH_REASON_STOP_STRING);
  EXPECT_EQ(stop_out.text, ids_out.text.substr(0, cut));

  // A stop token id: the stream ends with it.
  v1::GenerateRequest stop_id = by_text;
  stop_id.add_stop_token_ids(ids_out.tokens[3]);
  const auto stop_id_out = ReadStream(*stub, stop_id);
  ASSERT_TRUE(stop_id_out.status.ok());
  EXPECT_EQ(stop_id_out.last()->finish_reason(), v1::FINISH_REASON_STOP_TOKEN);
  ASSERT_LE(stop_id_out.tokens.size(), 4u);
  EXPECT_EQ(stop_id_out.tokens.back(), ids_out.tokens[3]);

  // Chat: the prompt is what Tokenize says for the same conversation.
  v1::GenerateRequest chat;
  auto* m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("Where is the island?");
  chat.mutable_chat()->set_force_think(true);
  chat.set_max_tokens(4);
  const auto chat_out = ReadStream(*stub, chat);
  ASSERT_TRUE(chat_out.status.ok()) << chat_out.status.error_message();
  grpc::ClientContext context;
  v1::TokenizeRequest tokenize;
  *tokenize.mutable_chat() = chat.chat();
  v1::TokenizeResponse ids;
  ASSERT_TRUE(stub->Tokenize(&context, tokenize, &ids).ok());
  EXPECT_EQ(chat_out.last()->usage().prompt_tokens(), ids.ids_size());
}

TEST(GenerationServiceTest, TokenizeDetokenizeAndListModels) {
  TestNode node;
  ASSERT_TRUE(node.ok());
  auto stub = node.GenerationStub();
  const std::string prompt = actors::testing::Manifest()["prompt"].get<std::string>();
  v1::TokenizeRequest request;
  request.set_text(prompt);
  v1::TokenizeResponse tokens;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub->Tokenize(&context, request, &tokens).ok());
  }
  EXPECT_EQ(std::vector<int32_t>(tokens.ids().begin(), tokens.ids().end()),
            actors::testing::PromptTokens());
  v1::DetokenizeRequest back;
  *back.mutable_ids() = tokens.ids();
  v1::DetokenizeResponse text;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub->Detokenize(&context, back, &text).ok());
  }
  EXPECT_EQ(text.text(), prompt);  // BOS removed (render_special false)

  v1::ListModelsResponse models;
  grpc::ClientContext context;
  ASSERT_TRUE(stub->ListModels(&context, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).name(), "dsv3-tiny");
  EXPECT_EQ(models.models(0).context_length(), 512);
  EXPECT_EQ(models.models(0).n_vocab(), 512);
  EXPECT_EQ(models.models(0).chat_template(), "deepseek-r1");
  // The fingerprint is the model file's (computed by runtime/gguf, not here).
  EXPECT_EQ(models.models(0).fingerprint(), gguf::ModelFingerprint(node.engine().model().file()));
  EXPECT_EQ(models.models(0).fingerprint().size(), 64u);

  // The model name is accepted by requests.
  v1::GenerateRequest named = testing::GreedyTokensRequest({0, 87, 290}, 2);
  named.set_model("dsv3-tiny");
  EXPECT_TRUE(ReadStream(*stub, named).status.ok());
}

// GenerateRequest.routing_policy: the stream equals the engine's Generate
// under the same policy, and differs from the node's (full) routing.
TEST(GenerationServiceTest, RoutingPolicyOfTheRequestIsUsed) {
  TestNode node;
  ASSERT_TRUE(node.ok());
  auto stub = node.GenerationStub();
  const std::vector<int32_t> prompt = actors::testing::PromptTokens();
  std::vector<std::vector<int32_t>> streams;
  for (const std::string policy : {"", "top_k=1", "mass=0.5,defer=1"}) {
    SCOPED_TRACE(policy);
    v1::GenerateRequest request = testing::GreedyTokensRequest(prompt, 16);
    request.set_ignore_eos(true);
    if (!policy.empty()) request.set_routing_policy(policy);
    const testing::StreamOutcome got = ReadStream(*stub, request);
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();
    actors::GenerateRequest direct;
    direct.prompt = prompt;
    direct.max_tokens = 16;
    direct.sampling.temperature = 0.0f;
    direct.stop_at_eos = false;
    direct.routing_policy_text = policy;
    auto want = node.engine().Generate(direct);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_EQ(got.tokens, want->tokens);
    streams.push_back(got.tokens);
  }
  EXPECT_NE(streams[1], streams[0]);  // one expert per token changes the tokens
}

TEST(GenerationServiceTest, ErrorsKeepTheirCodeAndNameTheField) {
  TestNode node;
  ASSERT_TRUE(node.ok());
  auto stub = node.GenerationStub();
  struct Case {
    v1::GenerateRequest request;
    grpc::StatusCode code;
    std::string prefix;
  };
  std::vector<Case> cases;
  {
    Case c{{}, grpc::StatusCode::INVALID_ARGUMENT, "prompt: "};
    cases.push_back(c);
  }
  {
    Case c{testing::GreedyTokensRequest({1, 2}, 0), grpc::StatusCode::INVALID_ARGUMENT,
           "max_tokens: "};
    cases.push_back(c);
  }
  {
    Case c{testing::GreedyTokensRequest({1, 2}, 4), grpc::StatusCode::INVALID_ARGUMENT,
           "sampling.top_p: "};
    c.request.mutable_sampling()->set_top_p(2);
    cases.push_back(c);
  }
  {
    Case c{testing::GreedyTokensRequest({1, 999}, 4), grpc::StatusCode::INVALID_ARGUMENT,
           "tokens.ids[1]: "};
    cases.push_back(c);
  }
  {
    Case c{testing::GreedyTokensRequest({1, 2}, 4), grpc::StatusCode::INVALID_ARGUMENT, "model: "};
    c.request.set_model("nope");
    cases.push_back(c);
  }
  {
    Case c{testing::GreedyTokensRequest({1, 2}, 4), grpc::StatusCode::INVALID_ARGUMENT,
           "routing_policy: "};
    c.request.set_routing_policy("top_k=9");
    cases.push_back(c);
  }
  for (const Case& c : cases) {
    const auto out = ReadStream(*stub, c.request);
    EXPECT_EQ(out.status.error_code(), c.code) << out.status.error_message();
    EXPECT_TRUE(StartsWith(out.status.error_message(), c.prefix)) << out.status.error_message();
    EXPECT_TRUE(out.messages.empty());
  }
  EXPECT_EQ(node.generation().counters().failed, static_cast<int64_t>(cases.size()));
  EXPECT_EQ(node.generation().counters().in_flight, 0);
}

TEST(GenerationServiceTest, TokenRequiredWhenConfiguredAndHealthStaysOpen) {
  TestNodeOptions options;
  options.security.token = "s3cret-token";
  TestNode node(options);
  ASSERT_TRUE(node.ok());
  auto stub = node.GenerationStub();
  auto control = node.ControlStub();
  const v1::GenerateRequest request = testing::GreedyTokensRequest({0, 87, 290}, 3);

  rpc::RpcSecurity none, wrong, right;
  wrong.token = "guess";
  right.token = "s3cret-token";
  for (const rpc::RpcSecurity* client : {&none, &wrong}) {
    const auto out = ReadStream(*stub, request, *client);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
        << out.status.error_message();
    grpc::ClientContext c1, c2, c3;
    rpc::AttachToken(*client, &c1);
    rpc::AttachToken(*client, &c2);
    rpc::AttachToken(*client, &c3);
    v1::TokenizeRequest tokenize;
    tokenize.set_text("hi");
    v1::TokenizeResponse ids;
    EXPECT_EQ(stub->Tokenize(&c1, tokenize, &ids).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    v1::ListModelsResponse models;
    EXPECT_EQ(stub->ListModels(&c2, {}, &models).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    v1::NodeStatusResponse status;
    EXPECT_EQ(control->Status(&c3, {}, &status).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  const auto out = ReadStream(*stub, request, right);
  EXPECT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.tokens.size(), 3u);

  // Health answers without a token, per service and overall.
  auto channel = node.Channel();
  for (const std::string service : {"", "ktx.v1.Generation", "ktx.v1.NodeControl"}) {
    auto health = CheckHealth(*channel, service, std::chrono::seconds(10));
    ASSERT_TRUE(health.ok()) << service << ": " << health.status();
    EXPECT_EQ(*health, HealthState::kServing) << service;
  }
  auto unknown = CheckHealth(*channel, "ktx.v1.Nothing", std::chrono::seconds(10));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound) << unknown.status();
}

TEST(GenerationServiceTest, OversizedRequestIsRefused) {
  TestNodeOptions options;
  options.security.max_message_bytes = 1 << 20;
  TestNode node(options);
  ASSERT_TRUE(node.ok());
  rpc::RpcSecurity client;  // may send up to 64 MiB: the server refuses
  auto stub = node.GenerationStub(client);
  v1::GenerateRequest big;
  big.set_text(std::string(2 << 20, 'a'));
  big.set_max_tokens(1);
  const auto out = ReadStream(*stub, big);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << out.status.error_message();
  grpc::ClientContext context;
  v1::TokenizeRequest tokenize;
  tokenize.set_text(std::string(2 << 20, 'b'));
  v1::TokenizeResponse ids;
  EXPECT_EQ(stub->Tokenize(&context, tokenize, &ids).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  // A request under the limit still works.
  v1::GenerateRequest small = testing::GreedyTokensRequest({0, 87}, 2);
  EXPECT_TRUE(ReadStream(*stub, small).status.ok());
  // The service's own prompt limit (8 MiB by default) is not reached here;
  // the gRPC limit answered first.
  EXPECT_EQ(node.generation().counters().failed, 0);
}

TEST(GenerationServiceTest, CancelledStreamFreesItsKvCache) {
  TestNode node;
  ASSERT_TRUE(node.ok());
  auto stub = node.GenerationStub();
  auto empty = node.engine().KvStats();
  ASSERT_TRUE(empty.ok());
  ASSERT_EQ(empty->n_sequences, 0);
  ASSERT_EQ(empty->used_bytes, 0u);

  v1::GenerateRequest request = testing::GreedyTokensRequest(actors::testing::PromptTokens(), 400);
  request.set_ignore_eos(true);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  int tokens = 0;
  while (tokens < 3 && reader->Read(&response)) tokens += response.token_ids_size();
  ASSERT_GE(tokens, 3);
  auto busy = node.engine().KvStats();
  ASSERT_TRUE(busy.ok());
  EXPECT_EQ(busy->n_sequences, 1);
  EXPECT_GT(busy->used_bytes, 0u);
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);

  EXPECT_TRUE(PollUntil(
      [&] {
        auto kv = node.engine().KvStats();
        return kv.ok() && kv->n_sequences == 0 && kv->used_bytes == 0;
      },
      std::chrono::seconds(10)));
  EXPECT_TRUE(
      PollUntil([&] { return node.generation().in_flight() == 0; }, std::chrono::seconds(10)));
  EXPECT_EQ(node.generation().counters().cancelled, 1);

  // A deadline ends a stream the same way.
  grpc::ClientContext short_context;
  short_context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  auto late = stub->Generate(&short_context, request);
  while (late->Read(&response)) {
  }
  EXPECT_EQ(late->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(PollUntil(
      [&] {
        auto kv = node.engine().KvStats();
        return kv.ok() && kv->n_sequences == 0 && kv->used_bytes == 0;
      },
      std::chrono::seconds(10)));
  // The engine serves the next request normally.
  EXPECT_TRUE(ReadStream(*stub, testing::GreedyTokensRequest({0, 87}, 3)).status.ok());
}

TEST(GenerationServiceTest, TooManyConcurrentStreamsAreRefused) {
  TestNodeOptions options;
  options.max_concurrent = 2;
  TestNode node(options);
  ASSERT_TRUE(node.ok());
  auto stub = node.GenerationStub();
  v1::GenerateRequest request = testing::GreedyTokensRequest(actors::testing::PromptTokens(), 400);
  request.set_ignore_eos(true);
  grpc::ClientContext c1, c2;
  auto r1 = stub->Generate(&c1, request);
  auto r2 = stub->Generate(&c2, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(r1->Read(&response));
  ASSERT_TRUE(r2->Read(&response));
  const auto third = ReadStream(*stub, testing::GreedyTokensRequest({0, 87}, 2));
  EXPECT_EQ(third.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << third.status.error_message();
  c1.TryCancel();
  c2.TryCancel();
  while (r1->Read(&response)) {
  }
  while (r2->Read(&response)) {
  }
  r1->Finish();
  r2->Finish();
  EXPECT_TRUE(
      PollUntil([&] { return node.generation().in_flight() == 0; }, std::chrono::seconds(10)));
  EXPECT_TRUE(ReadStream(*stub, testing::GreedyTokensRequest({0, 87}, 2)).status.ok());
}

TEST(GenerationServiceTest, DrainRefusesNewCallsAndLetsInFlightFinish) {
  TestNode node;
  ASSERT_TRUE(node.ok());
  auto stub = node.GenerationStub();
  auto control = node.ControlStub();

  v1::GenerateRequest request = testing::GreedyTokensRequest(actors::testing::PromptTokens(), 120);
  request.set_ignore_eos(true);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  int tokens = response.token_ids_size();

  v1::DrainResponse drained;
  {
    grpc::ClientContext c;
    ASSERT_TRUE(control->Drain(&c, v1::DrainRequest(), &drained).ok());
  }
  EXPECT_TRUE(drained.draining());
  EXPECT_EQ(drained.in_flight(), 1);
  EXPECT_FALSE(drained.idle());
  EXPECT_TRUE(node.server().draining());

  const auto refused = ReadStream(*stub, testing::GreedyTokensRequest({0, 87}, 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(StartsWith(refused.status.error_message(), "draining"))
      << refused.status.error_message();
  {
    grpc::ClientContext c;
    v1::TokenizeRequest t;
    t.set_text("x");
    v1::TokenizeResponse ids;
    EXPECT_EQ(stub->Tokenize(&c, t, &ids).error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  {
    grpc::ClientContext c;
    v1::NodeStatusResponse status;
    ASSERT_TRUE(control->Status(&c, {}, &status).ok());
    EXPECT_TRUE(status.draining());
    EXPECT_EQ(status.health(), "draining");
    EXPECT_FALSE(status.has_gpu()) << "attention runs on the CPU here";
  }
  auto health = CheckHealth(*node.Channel(), "ktx.v1.Generation", std::chrono::seconds(10));
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, HealthState::kNotServing);

  // The call in flight runs to its end.
  v1::GenerateResponse last;
  while (reader->Read(&response)) {
    tokens += response.token_ids_size();
    last = response;
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 120);
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_TRUE(node.server().WaitIdle(std::chrono::seconds(10)));
  {
    grpc::ClientContext c;
    v1::DrainRequest again;
    again.set_wait_ms(1000);
    ASSERT_TRUE(control->Drain(&c, again, &drained).ok());
    EXPECT_TRUE(drained.idle());
    EXPECT_EQ(drained.in_flight(), 0);
  }
}

TEST(NodeControlServiceTest, StatusReportsShardsKvAndLoad) {
  TestNode node;
  ASSERT_TRUE(node.ok());
  ASSERT_TRUE(ReadStream(*node.GenerationStub(), testing::GreedyTokensRequest({0, 87, 290}, 5))
                  .status.ok());
  auto control = node.ControlStub();
  grpc::ClientContext context;
  v1::NodeStatusResponse status;
  ASSERT_TRUE(control->Status(&context, {}, &status).ok());
  EXPECT_EQ(status.node_name(), "head");
  EXPECT_EQ(status.role(), v1::NODE_ROLE_HEAD);
  EXPECT_FALSE(status.version().empty());
  EXPECT_EQ(status.address(), node.address());
  EXPECT_EQ(status.model_name(), "dsv3-tiny");
  EXPECT_EQ(status.model_fingerprint(), node.generation().served_model().fingerprint);
  EXPECT_GT(status.uptime_seconds(), 0);
  EXPECT_GE(status.hardware().nodes_size(), 1);
  EXPECT_EQ(status.health(), "serving");
  EXPECT_FALSE(status.draining());

  const topology::PlacementPlan& plan = node.engine().plan();
  ASSERT_EQ(status.shards_size(), 2);
  int n_experts = 0;
  uint64_t bytes = 0;
  int64_t parts = 0;
  for (int s = 0; s < 2; ++s) {
    const v1::ShardStatus& shard = status.shards(s);
    EXPECT_EQ(shard.name(), "shard" + std::to_string(s));
    EXPECT_EQ(shard.node(), "head");
    EXPECT_TRUE(shard.address().empty());
    EXPECT_TRUE(shard.alive());
    EXPECT_EQ(shard.expert_bytes(), plan.shards[s].bytes);
    int listed = 0;
    for (const v1::LayerExperts& layer : shard.layers()) {
      EXPECT_GE(layer.layer(), 1);  // layer 0 of the fixture is dense
      listed += layer.experts_size();
    }
    EXPECT_EQ(listed, shard.n_experts());
    n_experts += shard.n_experts();
    bytes += shard.expert_bytes();
    parts += shard.parts_sent();
  }
  EXPECT_EQ(n_experts, 2 * 16);  // 2 MoE layers x 16 experts, no replicas
  EXPECT_EQ(bytes, plan.total_bytes);
  EXPECT_GT(parts, 0);
  EXPECT_EQ(status.kv_cache().budget_bytes(), 16u << 20);
  EXPECT_EQ(status.kv_cache().n_sequences(), 0);
  EXPECT_EQ(status.requests().completed(), 1);
  EXPECT_EQ(status.requests().tokens_generated(), 5);
  EXPECT_EQ(status.requests().in_flight(), 0);
  EXPECT_EQ(status.peers_size(), 0);  // every shard is in this process

  // Shards on other nodes (as ktx-node describes them) make peers.
  NodeControlOptions remote;
  remote.node_name = "head";
  remote.engine = &node.engine();
  remote.hardware = topology::HardwareTopology{};
  remote.shard_locations = {{}, {"node1", "127.0.0.1:50052"}};
  auto with_peers = NodeControlService::Create(remote);
  ASSERT_TRUE(with_peers.ok()) << with_peers.status();
  const v1::NodeStatusResponse peered = (*with_peers)->BuildStatus();
  EXPECT_EQ(peered.shards(0).node(), "head");
  EXPECT_EQ(peered.shards(1).node(), "node1");
  EXPECT_EQ(peered.shards(1).address(), "127.0.0.1:50052");
  ASSERT_EQ(peered.peers_size(), 1);
  EXPECT_EQ(peered.peers(0).name(), "node1");
  EXPECT_EQ(peered.peers(0).address(), "127.0.0.1:50052");
  EXPECT_TRUE(peered.peers(0).reachable());
  ASSERT_EQ(peered.peers(0).shards_size(), 1);
  EXPECT_EQ(peered.peers(0).shards(0), "shard1");
  EXPECT_FALSE(peered.has_requests());  // no generation service given

  // A dead shard makes the node degraded, naming it.
  ASSERT_TRUE(node.engine().KillShard(1).ok());
  ASSERT_TRUE(PollUntil(
      [&] {
        auto r = node.engine().RouterStats();
        return r.ok() && !r->alive[1];
      },
      std::chrono::seconds(10)));
  const v1::NodeStatusResponse degraded = node.control().BuildStatus();
  EXPECT_FALSE(degraded.shards(1).alive());
  EXPECT_TRUE(StartsWith(degraded.health(), "degraded: shard 'shard1'")) << degraded.health();
  const v1::NodeStatusResponse peer_down = (*with_peers)->BuildStatus();
  EXPECT_FALSE(peer_down.peers(0).reachable());
  EXPECT_NE(peer_down.health().find("node 'node1', 127.0.0.1:50052"), std::string::npos)
      << peer_down.health();
}

TEST(NodeControlServiceTest, ReloadPlanComparesAndAppliesNothing) {
  const std::string dir = ::testing::TempDir();
  const std::string same = dir + "/ktx_reload_same_" + std::to_string(getpid()) + ".textproto";
  const std::string more = dir + "/ktx_reload_more_" + std::to_string(getpid()) + ".textproto";
  {
    std::ofstream out(same);
    out << "nodes { name: \"head\" listen_address: \"127.0.0.1:50051\" head: true\n"
           "  attention_device: \"cpu\"\n"
           "  shards { name: \"shard0\" cpus: \"0\" } shards { name: \"shard1\" cpus: \"1\" } }\n";
  }
  TestNodeOptions options;
  options.topology_path = same;
  TestNode node(options);
  ASSERT_TRUE(node.ok());
  auto control = node.ControlStub();
  {
    grpc::ClientContext context;
    v1::ReloadPlanResponse reload;
    const grpc::Status status = control->ReloadPlan(&context, {}, &reload);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_FALSE(reload.changed()) << reload.message();
    EXPECT_FALSE(reload.applied());
    EXPECT_EQ(reload.shards_size(), 2);
  }
  // The operator edits the file: three shards now.
  {
    std::ofstream out(same);
    out << "nodes { name: \"head\" listen_address: \"127.0.0.1:50051\" head: true\n"
           "  attention_device: \"cpu\"\n"
           "  shards { name: \"shard0\" cpus: \"0\" } shards { name: \"shard1\" cpus: \"1\" } }\n"
           "nodes { name: \"other\" listen_address: \"10.0.0.2:50052\"\n"
           "  shards { name: \"s2\" cpus: \"0-1\" } }\n";
  }
  {
    grpc::ClientContext context;
    v1::ReloadPlanResponse reload;
    const grpc::Status status = control->ReloadPlan(&context, {}, &reload);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_TRUE(reload.changed());
    EXPECT_FALSE(reload.applied());
    EXPECT_EQ(reload.shards_size(), 3);
    EXPECT_NE(reload.message().find("restart"), std::string::npos) << reload.message();
  }
  // Only the node's own file, and a broken one is reported.
  {
    grpc::ClientContext context;
    v1::ReloadPlanRequest other;
    other.set_topology_path(more);
    v1::ReloadPlanResponse reload;
    EXPECT_EQ(control->ReloadPlan(&context, other, &reload).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    std::ofstream out(same);
    out << "nodes { name: \"head\" bogus_field: 1 }\n";
  }
  {
    grpc::ClientContext context;
    v1::ReloadPlanResponse reload;
    const grpc::Status status = control->ReloadPlan(&context, {}, &reload);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(status.error_message().find(same), std::string::npos) << status.error_message();
  }
  std::remove(same.c_str());
}

TEST(NodeServerTest, BindChecksAndPortZero) {
  NodeServerOptions remote;
  remote.address = "0.0.0.0:0";
  NodeServer refused(remote);
  const absl::Status status = refused.Start();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;

  // Two servers on port 0 get different ports; a taken port is reported.
  NodeServer a{NodeServerOptions{}}, b{NodeServerOptions{}};
  ASSERT_TRUE(a.Start().ok());
  ASSERT_TRUE(b.Start().ok());
  EXPECT_GT(a.port(), 0);
  EXPECT_NE(a.port(), b.port());
  NodeServerOptions taken;
  taken.address = a.address();
  NodeServer c(taken);
  EXPECT_EQ(c.Start().code(), absl::StatusCode::kUnavailable);
  a.Shutdown(std::chrono::seconds(1));
  b.Shutdown(std::chrono::seconds(1));
}

// The `gpu` part of a head's NodeControl status (GpuStatusOf): the device,
// the plan's sizes and the resident hot experts per layer (layers without any
// left out).
TEST(NodeControlStatusTest, GpuStatusNamesTheDevicePlanAndHotExperts) {
  gpu::GpuMemoryPlan plan;
  plan.attention_bytes = 1000;
  plan.dense_ffn_bytes = 200;
  plan.shared_expert_bytes = 30;
  plan.head_bytes = 4;
  plan.activation_bytes = 50;
  plan.workspace_bytes = 6;
  plan.kv_bytes = 700;
  plan.kv_tokens = 64;
  plan.expert_stream_bytes = 80;
  plan.resident_experts = 3;
  plan.resident_expert_bytes = 900;
  plan.free_bytes = 123456;
  topology::GpuHotExperts hot;
  hot.experts = {{1, {2, 5}}, {2, {}}, {3, {7}}};
  hot.count = 3;
  hot.bytes = 900;
  hot.expected_share = 0.25;
  const v1::GpuStatus g = GpuStatusOf("cuda:1", plan, hot);
  EXPECT_EQ(g.attention_device(), "cuda:1");
  EXPECT_EQ(g.weight_bytes(), 1234u);
  EXPECT_EQ(g.activation_bytes(), 56u);
  EXPECT_EQ(g.kv_bytes(), 700u);
  EXPECT_EQ(g.kv_tokens(), 64);
  EXPECT_EQ(g.expert_stream_bytes(), 80u);
  EXPECT_EQ(g.resident_experts(), 3);
  EXPECT_EQ(g.resident_expert_bytes(), 900u);
  EXPECT_EQ(g.total_bytes(), plan.total_bytes());
  EXPECT_EQ(g.free_bytes_at_load(), 123456u);
  EXPECT_DOUBLE_EQ(g.hot_expected_share(), 0.25);
  ASSERT_EQ(g.hot_experts_size(), 2);
  EXPECT_EQ(g.hot_experts(0).layer(), 1);
  EXPECT_EQ(std::vector<int>(g.hot_experts(0).experts().begin(), g.hot_experts(0).experts().end()),
            (std::vector<int>{2, 5}));
  EXPECT_EQ(g.hot_experts(1).layer(), 3);
  EXPECT_EQ(g.hot_experts(1).experts_size(), 1);
}

}  // namespace
}  // namespace ktx::service
