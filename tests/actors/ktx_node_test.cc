// ktx-node and `ktx-ctl run|logits --shards/--topology` end to end on the
// fixture models: readiness output, generated text equal to the reference
// engine's (`ktx-ctl run` without the actor flags, written by another
// engineer), logits files against the float64 fixture, and clear errors.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/actors/actors_test_util.h"

namespace ktx::actors {
namespace {

using ::testing::HasSubstr;

struct Output {
  int rc = -1;
  std::string out;
  std::string err;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string TempPath(const std::string& name) {
  static int counter = 0;
  return ::testing::TempDir() + "/ktx_node_" + std::to_string(getpid()) + "_" +
         std::to_string(counter++) + "_" + name;
}

Output RunBinary(const std::string& binary, const std::string& args) {
  const std::string out_path = TempPath("out");
  const std::string err_path = TempPath("err");
  const std::string command = binary + " " + args + " >" + out_path + " 2>" + err_path;
  const int status = std::system(command.c_str());
  Output o;
  o.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  o.out = ReadFile(out_path);
  o.err = ReadFile(err_path);
  std::remove(out_path.c_str());
  std::remove(err_path.c_str());
  return o;
}

std::string Model(const std::string& type) {
  return testing::DataDir() + testing::Manifest()["files"][type]["gguf"].get<std::string>();
}

std::string WriteTopology(const std::string& text) {
  const std::string path = TempPath("topology.textproto");
  std::ofstream(path) << text;
  return path;
}

// Three shards on three nodes: in this one-process runtime every node's shards
// run here (the remote addresses are never dialled).
constexpr char kThreeShards[] = R"(nodes {
  name: "node0"
  listen_address: "127.0.0.1:50051"
  head: true
  attention_device: "cpu"
  shards { name: "node0/a" numa_node: 0 cpus: "0" }
}
nodes {
  name: "node1"
  listen_address: "10.0.0.2:50051"
  shards { name: "node1/b" numa_node: 0 cpus: "0-1" }
}
nodes {
  name: "node2"
  listen_address: "10.0.0.3:50051"
  shards { name: "node2/c" numa_node: 0 cpus: "0" }
}
)";

TEST(KtxNodeTest, PrintsReadinessAndExits) {
  const Output o = RunBinary(KTX_NODE_PATH, "--model " + Model("q8_0") + " --shards 2 --check");
  ASSERT_EQ(o.rc, 0) << o.err;
  EXPECT_THAT(o.err, HasSubstr("ktx-node ready"));
  EXPECT_THAT(o.err, HasSubstr("shard 0 'shard0'"));
  EXPECT_THAT(o.err, HasSubstr("shard 1 'shard1'"));
  // Fast experts by default: each shard reports its copies and the kernels.
  EXPECT_THAT(o.err, ::testing::ContainsRegex("routed experts, [0-9.]+ [KM]iB"));
  EXPECT_THAT(o.err, ::testing::Not(HasSubstr("experts reference")));
  const Output reference = RunBinary(
      KTX_NODE_PATH, "--model " + Model("q8_0") + " --shards 2 --experts reference --check");
  ASSERT_EQ(reference.rc, 0) << reference.err;
  EXPECT_THAT(reference.err, HasSubstr("mapped (not copied), experts reference"));
  const Output bad =
      RunBinary(KTX_NODE_PATH, "--model " + Model("q8_0") + " --experts quick --check");
  EXPECT_EQ(bad.rc, 1);
  EXPECT_THAT(bad.err, HasSubstr("--experts quick"));
}

TEST(KtxNodeTest, GreedyTextEqualsTheReferenceEngine) {
  const std::string prompt =
      "--prompt 'Tom found an old map in the attic.' --max-tokens 24 "
      "--temperature 0";
  const Output reference =
      RunBinary(KTX_CTL_PATH, "run --model " + Model("bf16") + " --experts reference " + prompt);
  ASSERT_EQ(reference.rc, 0) << reference.err;
  ASSERT_FALSE(reference.out.empty());
  const Output node = RunBinary(
      KTX_NODE_PATH, "--model " + Model("bf16") + " --shards 3 --experts reference " + prompt);
  ASSERT_EQ(node.rc, 0) << node.err;
  EXPECT_EQ(node.out, reference.out);
  const std::string topology = WriteTopology(kThreeShards);
  const Output ctl = RunBinary(KTX_CTL_PATH, "run --model " + Model("bf16") + " --topology " +
                                                 topology + " --experts reference " + prompt);
  ASSERT_EQ(ctl.rc, 0) << ctl.err;
  EXPECT_EQ(ctl.out, reference.out);
  EXPECT_THAT(ctl.err, HasSubstr("actor runtime"));
}

TEST(KtxNodeTest, LogitsWithShardsMatchFloat64Reference) {
  const nlohmann::json& m = testing::Manifest();
  const auto tokens = m["prompt_tokens"].get<std::vector<int32_t>>();
  std::string list;
  for (size_t i = 0; i < tokens.size(); ++i) list += (i ? "," : "") + std::to_string(tokens[i]);
  const std::string out = TempPath("logits.f32");
  const Output o = RunBinary(KTX_CTL_PATH, "logits --model " + Model("q8_0") +
                                               " --shards 2 --experts reference --tokens " + list +
                                               " --out " + out);
  ASSERT_EQ(o.rc, 0) << o.err;
  EXPECT_THAT(o.err, HasSubstr("[65, 512]"));
  const std::vector<float> got = [&] {
    const std::string bytes = ReadFile(out);
    std::vector<float> v(bytes.size() / sizeof(float));
    std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));
    return v;
  }();
  std::remove(out.c_str());
  const std::vector<float> want =
      testing::LoadF32(m["files"]["q8_0"]["ref64_prompt_logits"]["file"].get<std::string>());
  ASSERT_EQ(got.size(), want.size());
  double diff = 0, ref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    diff += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    ref += static_cast<double>(want[i]) * want[i];
  }
  EXPECT_LE(std::sqrt(diff / ref), 1e-4);  // tier A
}

TEST(KtxNodeTest, BadFlagsAndTopologiesAreNamed) {
  const std::string topology = WriteTopology(kThreeShards);
  Output o =
      RunBinary(KTX_NODE_PATH, "--model " + Model("q8_0") + " --shards 2 --topology " + topology);
  EXPECT_EQ(o.rc, 1);
  EXPECT_THAT(o.err, HasSubstr("not both"));

  const std::string bad = WriteTopology(
      "nodes { name: \"n\" head: true listen_address: "
      "\"127.0.0.1:1\" shards { name: \"s\" cpus: \"3-1\" } }\n");
  o = RunBinary(KTX_NODE_PATH, "--model " + Model("q8_0") + " --topology " + bad + " --check");
  EXPECT_EQ(o.rc, 1);
  EXPECT_THAT(o.err, HasSubstr(bad));
  EXPECT_THAT(o.err, HasSubstr("3-1"));

  o = RunBinary(KTX_NODE_PATH, "--model /nonexistent/model.gguf");
  EXPECT_EQ(o.rc, 1);
  EXPECT_THAT(o.err, HasSubstr("/nonexistent/model.gguf"));
}

}  // namespace
}  // namespace ktx::actors
