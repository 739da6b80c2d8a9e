// ktx as real processes on loopback: a head and two shard nodes
// (`ktx-node --topology T --node NAME`), driven with `ktx-ctl generate` and
// `ktx-ctl status`, against the same topology run in one process. Faults:
// kill -9 of a shard node mid-stream (UNAVAILABLE naming the shard, no hang,
// the head stays up, the restarted node serves the next request), a missing
// shard node and a node with another model at start-up, the shared token, and
// SIGTERM draining.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/actors/actors_test_util.h"
#include "tests/cli/node_process.h"

namespace ktx::testing_util {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

std::string Model(const std::string& type) {
  return actors::testing::DataDir() +
         actors::testing::Manifest()["files"][type]["gguf"].get<std::string>();
}

std::string TempFile(const std::string& name, const std::string& text) {
  static int counter = 0;
  const std::string path = ::testing::TempDir() + "/ktx_mp_" + std::to_string(getpid()) + "_" +
                           std::to_string(counter++) + "_" + name;
  std::ofstream(path) << text;
  return path;
}

struct Cluster {
  std::string topology;  // path
  int head_port = 0;
  std::vector<int> shard_ports;
  std::string head_address() const { return "127.0.0.1:" + std::to_string(head_port); }
};

// A head (no experts) and `n_shard_nodes` shard nodes "s0", "s1", ... with one
// shard each ("s0/numa0", ...), on fresh loopback ports. cpus: one each when
// the machine has enough, else all.
Cluster MakeCluster(int n_shard_nodes, const std::string& extra_node_fields = "") {
  Cluster c;
  c.head_port = FreeLoopbackPort();
  const long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  std::ostringstream text;
  text << "nodes {\n  name: \"head\"\n  listen_address: \"127.0.0.1:" << c.head_port
       << "\"\n  head: true\n  attention_device: \"cpu\"\n"
       << extra_node_fields << "}\n";
  for (int i = 0; i < n_shard_nodes; ++i) {
    int port = FreeLoopbackPort();
    while (port == c.head_port) port = FreeLoopbackPort();
    c.shard_ports.push_back(port);
    const std::string cpus =
        ncpu >= n_shard_nodes ? std::to_string(i) : "0-" + std::to_string(ncpu - 1);
    text << "nodes {\n  name: \"s" << i << "\"\n  listen_address: \"127.0.0.1:" << port << "\"\n"
         << extra_node_fields << "  shards { name: \"s" << i << "/numa0\" numa_node: 0 cpus: \""
         << cpus << "\" }\n}\n";
  }
  c.topology = TempFile("topology.textproto", text.str());
  return c;
}

std::vector<std::string> NodeArgs(const std::string& model, const Cluster& c,
                                  const std::string& node, std::vector<std::string> extra = {},
                                  const std::string& remote_wait_s = "30") {
  std::vector<std::string> args = {KTX_NODE_PATH, "--model",         model, "--topology",
                                   c.topology,    "--node",          node,  "--shard-deadline-ms",
                                   "3000",        "--remote-wait-s", "30",  "--log-level",
                                   "warning"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// Starts a node and waits for its readiness line.
void StartNode(NodeProcess* p, const std::vector<std::string>& args, const std::string& name) {
  ASSERT_TRUE(p->Start(args, name));
  ASSERT_TRUE(p->WaitForStderr("serving on", 120s)) << name << " not ready:\n" << p->err();
}

struct CtlResult {
  int rc = -1;
  std::string out;
  std::string err;
};

CtlResult RunCtl(const std::vector<std::string>& args, std::chrono::seconds timeout = 120s) {
  NodeProcess p;
  std::vector<std::string> argv = {KTX_CTL_PATH};
  argv.insert(argv.end(), args.begin(), args.end());
  EXPECT_TRUE(p.Start(argv, "ctl"));
  CtlResult r;
  if (!PollUntil([&] { return !p.Running(); }, timeout)) {
    ADD_FAILURE() << "ktx-ctl did not finish within " << timeout.count() << " s";
    p.Kill(SIGKILL);
  }
  r.rc = p.ExitCode();
  r.out = p.out();
  r.err = p.err();
  return r;
}

// Greedy generation through `address`; the token ids from --json lines.
std::vector<int> GenerateTokens(const std::string& address, int max_tokens, CtlResult* raw,
                                const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args = {"generate",      "--target",
                                   address,         "--json",
                                   "--max-tokens",  std::to_string(max_tokens),
                                   "--temperature", "0",
                                   "--timeout",     "60"};
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back("Tom found an old map in the attic.");
  *raw = RunCtl(args);
  std::vector<int> tokens;
  std::istringstream lines(raw->out);
  std::string line;
  while (std::getline(lines, line)) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) continue;
    for (const char* key : {"tokenIds", "token_ids"}) {
      if (j.contains(key)) {
        for (const auto& t : j[key]) tokens.push_back(t.get<int>());
      }
    }
  }
  return tokens;
}

TEST(Multiprocess, HeadAndTwoShardNodesGiveTheTokensOfOneProcess) {
  const std::string model = Model("q8_0");
  Cluster c = MakeCluster(2);
  NodeProcess s0, s1, head;
  StartNode(&s0, NodeArgs(model, c, "s0"), "s0");
  StartNode(&s1, NodeArgs(model, c, "s1"), "s1");
  StartNode(&head, NodeArgs(model, c, "head"), "head");

  CtlResult three;
  const std::vector<int> tokens3 = GenerateTokens(c.head_address(), 24, &three);
  ASSERT_EQ(three.rc, 0) << three.err;
  ASSERT_EQ(tokens3.size(), 24u) << three.out;

  CtlResult status = RunCtl({"status", "--target", c.head_address(), "--json"});
  ASSERT_EQ(status.rc, 0) << status.err;
  EXPECT_THAT(status.out, HasSubstr("s0/numa0"));
  EXPECT_THAT(status.out, HasSubstr("s1/numa0"));

  // The same topology in one process (every shard in-process), same cpus.
  NodeProcess one;
  const int port = FreeLoopbackPort();
  StartNode(&one,
            {KTX_NODE_PATH, "--model", model, "--topology", c.topology, "--listen",
             "127.0.0.1:" + std::to_string(port), "--log-level", "warning"},
            "one");
  CtlResult single;
  const std::vector<int> tokens1 = GenerateTokens("127.0.0.1:" + std::to_string(port), 24, &single);
  ASSERT_EQ(single.rc, 0) << single.err;
  EXPECT_EQ(tokens3, tokens1);

  EXPECT_EQ(head.Stop(SIGTERM), 0) << head.err();
  EXPECT_EQ(one.Stop(SIGTERM), 0) << one.err();
  EXPECT_EQ(s0.Stop(SIGTERM), 0) << s0.err();
  EXPECT_EQ(s1.Stop(SIGTERM), 0) << s1.err();
}

TEST(Multiprocess, KilledShardNodeFailsTheStreamAndServesAgainAfterRestart) {
  const std::string model = Model("q8_0");
  Cluster c = MakeCluster(2);
  NodeProcess s0, s1, head;
  StartNode(&s0, NodeArgs(model, c, "s0"), "s0");
  StartNode(&s1, NodeArgs(model, c, "s1"), "s1");
  StartNode(&head, NodeArgs(model, c, "head"), "head");

  // A long stream; kill -9 a shard node once text flows.
  NodeProcess stream;
  ASSERT_TRUE(
      stream.Start({KTX_CTL_PATH, "generate", "--target", c.head_address(), "--max-tokens", "3000",
                    "--ignore-eos", "--temperature", "0.8", "--timeout", "300", "Once upon a time"},
                   "stream"));
  ASSERT_TRUE(PollUntil([&] { return stream.out().size() > 16 || !stream.Running(); }, 120s));
  ASSERT_TRUE(stream.Running()) << stream.err();
  const auto killed_at = std::chrono::steady_clock::now();
  s1.Kill(SIGKILL);
  // Within the shard deadline (3 s) plus slack, never a hang.
  ASSERT_TRUE(PollUntil([&] { return !stream.Running(); }, 30s)) << "stream still running";
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  EXPECT_LT(seconds, 30.0);
  EXPECT_NE(stream.ExitCode(), 0);
  EXPECT_THAT(stream.err(), HasSubstr("UNAVAILABLE"));
  EXPECT_THAT(stream.err(), HasSubstr("s1/numa0"));
  EXPECT_TRUE(head.Running()) << head.err();

  // While s1 is down, requests fail fast with its name.
  CtlResult down;
  GenerateTokens(c.head_address(), 4, &down);
  EXPECT_NE(down.rc, 0);
  EXPECT_THAT(down.err, HasSubstr("s1/numa0"));

  // Restarted, it serves the next request (the head reconnects on its own).
  NodeProcess s1_again;
  StartNode(&s1_again, NodeArgs(model, c, "s1"), "s1-again");
  CtlResult back;
  std::vector<int> tokens;
  PollUntil(
      [&] {
        tokens = GenerateTokens(c.head_address(), 8, &back);
        return back.rc == 0;
      },
      30s, 500ms);
  EXPECT_EQ(back.rc, 0) << back.err;
  EXPECT_EQ(tokens.size(), 8u);
}

TEST(Multiprocess, HeadNamesMissingShardNodesAndOtherModels) {
  Cluster c = MakeCluster(1);
  // Nobody serves s0: the head gives up after --remote-wait-s, naming it.
  NodeProcess head;
  ASSERT_TRUE(head.Start(NodeArgs(Model("q8_0"), c, "head", {}, "2"), "head"));
  ASSERT_TRUE(PollUntil([&] { return !head.Running(); }, 60s));
  EXPECT_EQ(head.ExitCode(), 1);
  EXPECT_THAT(head.err(), HasSubstr("s0/numa0"));
  EXPECT_THAT(head.err(), HasSubstr("127.0.0.1:" + std::to_string(c.shard_ports[0])));

  // s0 serves another model: refused by fingerprint, naming the node.
  NodeProcess s0;
  StartNode(&s0, NodeArgs(Model("q4_k_m"), c, "s0"), "s0");
  NodeProcess head2;
  ASSERT_TRUE(head2.Start(NodeArgs(Model("q8_0"), c, "head", {}, "5"), "head2"));
  ASSERT_TRUE(PollUntil([&] { return !head2.Running(); }, 60s));
  EXPECT_EQ(head2.ExitCode(), 1);
  EXPECT_THAT(head2.err(), HasSubstr("s0"));
  EXPECT_THAT(head2.err(), HasSubstr("fingerprint"));
}

TEST(Multiprocess, SharedTokenIsRequiredOnEveryNode) {
  const std::string token = TempFile("token", "multiprocess-secret\n");
  Cluster c = MakeCluster(1, "  auth_token_file: \"" + token + "\"\n");
  const std::string model = Model("q8_0");
  NodeProcess s0, head;
  StartNode(&s0, NodeArgs(model, c, "s0"), "s0");
  StartNode(&head, NodeArgs(model, c, "head"), "head");

  CtlResult without;
  GenerateTokens(c.head_address(), 4, &without);
  EXPECT_NE(without.rc, 0);
  EXPECT_THAT(without.err, HasSubstr("UNAUTHENTICATED"));
  const std::string wrong = TempFile("wrong", "not-the-token\n");
  CtlResult bad;
  GenerateTokens(c.head_address(), 4, &bad, {"--token-file", wrong});
  EXPECT_NE(bad.rc, 0);
  EXPECT_THAT(bad.err, HasSubstr("UNAUTHENTICATED"));
  CtlResult with;
  const std::vector<int> tokens =
      GenerateTokens(c.head_address(), 4, &with, {"--token-file", token});
  EXPECT_EQ(with.rc, 0) << with.err;
  EXPECT_EQ(tokens.size(), 4u);
  // The shard node refuses callers without the token too.
  CtlResult shard_status =
      RunCtl({"status", "--target", "127.0.0.1:" + std::to_string(c.shard_ports[0])});
  EXPECT_NE(shard_status.rc, 0);
  EXPECT_THAT(shard_status.err, HasSubstr("UNAUTHENTICATED"));
}

TEST(Multiprocess, SigtermDrainsTheHead) {
  const std::string model = Model("q8_0");
  Cluster c = MakeCluster(1);
  NodeProcess s0, head;
  StartNode(&s0, NodeArgs(model, c, "s0"), "s0");
  StartNode(&head, NodeArgs(model, c, "head"), "head");

  NodeProcess stream;
  ASSERT_TRUE(
      stream.Start({KTX_CTL_PATH, "generate", "--target", c.head_address(), "--max-tokens", "1500",
                    "--ignore-eos", "--temperature", "0", "--timeout", "300", "Once upon a time"},
                   "stream"));
  ASSERT_TRUE(PollUntil([&] { return stream.out().size() > 4 || !stream.Running(); }, 120s));
  ASSERT_TRUE(stream.Running()) << stream.err();
  head.Signal(SIGTERM);
  ASSERT_TRUE(head.WaitForStderr("draining", 10s)) << head.err();
  // New calls are refused while the stream in flight finishes.
  CtlResult refused;
  GenerateTokens(c.head_address(), 4, &refused);
  EXPECT_NE(refused.rc, 0);
  ASSERT_TRUE(PollUntil([&] { return !stream.Running(); }, 120s));
  EXPECT_EQ(stream.ExitCode(), 0) << stream.err();
  ASSERT_TRUE(PollUntil([&] { return !head.Running(); }, 60s));
  EXPECT_EQ(head.ExitCode(), 0) << head.err();
}

}  // namespace
}  // namespace ktx::testing_util
