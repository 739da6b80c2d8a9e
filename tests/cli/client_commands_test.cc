// ktx-ctl generate / chat / status against a node served in this test process
// (an Engine over the q8_0 fixture behind a NodeServer on 127.0.0.1:0; the
// ktx-ctl binary runs as a child process). Streamed text equals
// Engine::Generate's; --json lines carry the same tokens; chat keeps (and
// /reset forgets) the history; status shows the shards; errors print the gRPC
// code and exit 1; the token comes from --token-file or KTX_AUTH_TOKEN; an
// unreachable target is reported by address within the connect timeout.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/actors/service/service_test_util.h"
#include "tests/cli/ktx_ctl_runner.h"

namespace ktx::cli {
namespace {

using testing_util::RunKtxCtl;

std::string Ids(const std::vector<int32_t>& ids) { return absl::StrJoin(ids, ","); }

std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path =
      ::testing::TempDir() + "/ktx_client_" + std::to_string(getpid()) + "_" + name;
  std::ofstream(path) << text;
  return path;
}

// The prompt sizes printed on stderr ("prompt N tokens"), in order.
std::vector<int> PromptSizes(const std::string& err) {
  std::vector<int> sizes;
  const std::regex re("prompt (\\d+) tokens");
  for (auto it = std::sregex_iterator(err.begin(), err.end(), re); it != std::sregex_iterator();
       ++it) {
    sizes.push_back(std::stoi((*it)[1]));
  }
  return sizes;
}

class ClientCommandsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { node_ = new service::testing::TestNode(); }
  static void TearDownTestSuite() {
    delete node_;
    node_ = nullptr;
  }
  static service::testing::TestNode* node_;

  std::string Target() const { return "--target " + node_->address(); }

  actors::GenerateResult Direct(const std::vector<int32_t>& prompt, int n) {
    actors::GenerateRequest r;
    r.prompt = prompt;
    r.max_tokens = n;
    r.sampling.temperature = 0;
    r.stop_at_eos = false;
    auto result = node_->engine().Generate(r);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? *result : actors::GenerateResult{};
  }
};

service::testing::TestNode* ClientCommandsTest::node_ = nullptr;

TEST_F(ClientCommandsTest, GenerateStreamsTheEngineText) {
  ASSERT_TRUE(node_->ok());
  const std::vector<int32_t> prompt = actors::testing::PromptTokens();
  const actors::GenerateResult want = Direct(prompt, 16);
  const auto out = RunKtxCtl("generate " + Target() + " --tokens " + Ids(prompt) +
                             " --max-tokens 16 --temperature 0 --ignore-eos");
  ASSERT_EQ(out.rc, 0) << out.err;
  EXPECT_EQ(out.out, want.text + "\n");
  EXPECT_NE(out.err.find("prompt 65 tokens"), std::string::npos) << out.err;
  EXPECT_NE(out.err.find("generated 16 tokens"), std::string::npos) << out.err;
  EXPECT_NE(out.err.find("stop: length"), std::string::npos) << out.err;
  EXPECT_NE(out.err.find("first token after"), std::string::npos) << out.err;

  // The text prompt gives the same (it tokenizes to the fixture's ids).
  const std::string text = actors::testing::Manifest()["prompt"].get<std::string>();
  const auto by_text = RunKtxCtl("generate " + Target() + " '" + text +
                                 "' --max-tokens 16 --temperature 0 --ignore-eos");
  ASSERT_EQ(by_text.rc, 0) << by_text.err;
  EXPECT_EQ(by_text.out, out.out);
}

TEST_F(ClientCommandsTest, GenerateJsonLines) {
  ASSERT_TRUE(node_->ok());
  const std::vector<int32_t> prompt = {0, 87, 290, 289};
  const actors::GenerateResult want = Direct(prompt, 10);
  const auto out = RunKtxCtl("generate " + Target() + " --tokens " + Ids(prompt) +
                             " --max-tokens 10 --temperature 0 --ignore-eos --json");
  ASSERT_EQ(out.rc, 0) << out.err;
  std::istringstream lines(out.out);
  std::string line;
  std::vector<int32_t> tokens;
  std::string streamed;
  nlohmann::json last;
  int n_lines = 0;
  while (std::getline(lines, line)) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << line;
    if (j.contains("token_ids")) {
      for (const auto& id : j["token_ids"]) tokens.push_back(id.get<int32_t>());
    }
    if (j.contains("text")) streamed += j["text"].get<std::string>();
    last = j;
    ++n_lines;
  }
  EXPECT_GE(n_lines, 2);
  EXPECT_EQ(tokens, want.tokens);
  EXPECT_EQ(streamed, want.text);
  EXPECT_EQ(last["finish_reason"], "FINISH_REASON_LENGTH");
  EXPECT_EQ(last["usage"]["prompt_tokens"], 4);
  EXPECT_EQ(last["usage"]["completion_tokens"], 10);
  EXPECT_TRUE(last["timings"].contains("time_to_first_token_ms"));
}

TEST_F(ClientCommandsTest, ChatKeepsAndResetsTheHistory) {
  ASSERT_TRUE(node_->ok());
  const std::string flags = " --temperature 0 --max-tokens 4 --think";
  const std::string keep = WriteTemp("keep.txt", "hello there\nhello there\n/quit\nignored\n");
  const auto kept = RunKtxCtl("chat " + Target() + flags + " < " + keep);
  ASSERT_EQ(kept.rc, 0) << kept.err;
  std::vector<int> sizes = PromptSizes(kept.err);
  ASSERT_EQ(sizes.size(), 2u) << kept.err;
  EXPECT_GT(sizes[1], sizes[0] + 4);  // the first exchange is part of the second prompt

  const std::string reset = WriteTemp("reset.txt", "hello there\n/reset\nhello there\n");
  const auto fresh = RunKtxCtl("chat " + Target() + flags + " --system 'Be brief.' < " + reset);
  ASSERT_EQ(fresh.rc, 0) << fresh.err;
  sizes = PromptSizes(fresh.err);
  ASSERT_EQ(sizes.size(), 2u) << fresh.err;
  EXPECT_EQ(sizes[0], sizes[1]);
  EXPECT_NE(fresh.err.find("conversation reset"), std::string::npos);

  // The prompt size is the one Tokenize gives for the same conversation.
  auto stub = node_->GenerationStub();
  v1::TokenizeRequest request;
  auto* m = request.mutable_chat()->add_messages();
  m->set_role("system");
  m->set_content("Be brief.");
  m = request.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("hello there");
  request.mutable_chat()->set_force_think(true);
  grpc::ClientContext context;
  v1::TokenizeResponse ids;
  ASSERT_TRUE(stub->Tokenize(&context, request, &ids).ok());
  EXPECT_EQ(sizes[0], ids.ids_size());
}

TEST_F(ClientCommandsTest, StatusShowsShardsAndJson) {
  ASSERT_TRUE(node_->ok());
  const auto text = RunKtxCtl("status " + Target());
  ASSERT_EQ(text.rc, 0) << text.err;
  std::printf("[ output ] ktx-ctl status:\n%s", text.out.c_str());
  for (const char* want :
       {"node head (head)", "health: serving (grpc.health.v1: SERVING)", "model: dsv3-tiny",
        "kv cache:", "shard0", "shard1", "experts per MoE layer:", "requests:"}) {
    EXPECT_NE(text.out.find(want), std::string::npos) << want << "\n" << text.out;
  }
  const auto json = RunKtxCtl("status " + Target() + " --json");
  ASSERT_EQ(json.rc, 0) << json.err;
  const nlohmann::json j = nlohmann::json::parse(json.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << json.out;
  EXPECT_EQ(j["health_check"], "SERVING");
  ASSERT_EQ(j["status"]["shards"].size(), 2u);
  int n_experts = 0;
  for (const auto& shard : j["status"]["shards"]) n_experts += shard["n_experts"].get<int>();
  EXPECT_EQ(n_experts, 32);
  EXPECT_EQ(j["status"]["role"], "NODE_ROLE_HEAD");
}

TEST_F(ClientCommandsTest, ErrorsPrintTheCodeAndExitNonZero) {
  ASSERT_TRUE(node_->ok());
  const auto bad = RunKtxCtl("generate " + Target() + " --tokens 1,2 --max-tokens -5");
  EXPECT_EQ(bad.rc, 1);
  EXPECT_NE(bad.err.find("ktx-ctl generate: INVALID_ARGUMENT: max_tokens: -5 must be positive"),
            std::string::npos)
      << bad.err;
  const auto top_p = RunKtxCtl("generate " + Target() + " hi --top-p 1.5");
  EXPECT_EQ(top_p.rc, 1);
  EXPECT_NE(top_p.err.find("INVALID_ARGUMENT: sampling.top_p: "), std::string::npos) << top_p.err;
  const auto usage = RunKtxCtl("generate " + Target());
  EXPECT_EQ(usage.rc, 1);
  EXPECT_NE(usage.err.find("give a prompt or --tokens"), std::string::npos) << usage.err;
}

TEST(ClientCommandsAuthTest, TokenFromFileOrEnvironment) {
  service::testing::TestNodeOptions options;
  options.security.token = "tok-123";
  service::testing::TestNode node(options);
  ASSERT_TRUE(node.ok());
  const std::string target = "--target " + node.address();
  unsetenv("KTX_AUTH_TOKEN");
  const auto refused = RunKtxCtl("generate " + target + " --tokens 0,87 --max-tokens 2");
  EXPECT_EQ(refused.rc, 1);
  EXPECT_NE(refused.err.find("UNAUTHENTICATED: missing auth token"), std::string::npos)
      << refused.err;
  const auto status = RunKtxCtl("status " + target);
  EXPECT_EQ(status.rc, 1);
  EXPECT_NE(status.err.find("SERVING"), std::string::npos) << status.err;  // health is open
  EXPECT_NE(status.err.find("UNAUTHENTICATED"), std::string::npos) << status.err;

  const std::string token_file = WriteTemp("token", "tok-123\n");
  const auto with_file = RunKtxCtl("generate " + target + " --tokens 0,87 --max-tokens 2 " +
                                   "--token-file " + token_file);
  EXPECT_EQ(with_file.rc, 0) << with_file.err;
  setenv("KTX_AUTH_TOKEN", "tok-123", 1);
  const auto with_env = RunKtxCtl("status " + target);
  EXPECT_EQ(with_env.rc, 0) << with_env.err;
  setenv("KTX_AUTH_TOKEN", "wrong", 1);
  const auto wrong = RunKtxCtl("status " + target);
  EXPECT_EQ(wrong.rc, 1);
  EXPECT_NE(wrong.err.find("UNAUTHENTICATED: wrong auth token"), std::string::npos) << wrong.err;
  unsetenv("KTX_AUTH_TOKEN");
}

TEST(ClientCommandsUnreachableTest, NamesTheAddressWithinTheTimeout) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto out = RunKtxCtl("status --target 127.0.0.1:1 --connect-timeout 1");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(out.rc, 1);
  EXPECT_NE(out.err.find("UNAVAILABLE: cannot reach 127.0.0.1:1 within 1 s"), std::string::npos)
      << out.err;
  EXPECT_LT(seconds, 10);
  const auto gen = RunKtxCtl("generate --target 127.0.0.1:1 --connect-timeout 1 hi");
  EXPECT_EQ(gen.rc, 1);
  EXPECT_NE(gen.err.find("cannot reach 127.0.0.1:1"), std::string::npos) << gen.err;
  const auto bad = RunKtxCtl("status --target nonsense");
  EXPECT_EQ(bad.rc, 1);
  EXPECT_NE(bad.err.find("--target 'nonsense'"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace ktx::cli
