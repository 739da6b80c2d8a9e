#include "topology/config.h"

#include <google/protobuf/util/message_differencer.h>

#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/topology/fake_hardware.h"

namespace ktx::topology {
namespace {

using ::ktx::topology::testing::kGiB;
using ::ktx::topology::testing::SmallMachine;
using ::ktx::topology::testing::TwoSocketMachine;
using ::testing::AllOf;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::Field;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// Joins lines so that lines[i] is line i + 1 of the text.
std::string Lines(std::initializer_list<const char*> lines) {
  std::string text;
  for (const char* line : lines) {
    text += line;
    text += '\n';
  }
  return text;
}

ParsedTopologyConfig Parse(const std::string& text) {
  absl::StatusOr<ParsedTopologyConfig> parsed = ParseTopologyConfigText(text, "test.textproto");
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  return parsed.ok() ? *std::move(parsed) : ParsedTopologyConfig{};
}

std::vector<ConfigProblem> Validate(const std::string& text, const ValidationOptions& options) {
  return ValidateTopologyConfig(Parse(text), options);
}

auto Problem(int line, const std::string& substring) {
  return AllOf(Field(&ConfigProblem::line, line),
               Field(&ConfigProblem::message, HasSubstr(substring)));
}

std::string Dump(const std::vector<ConfigProblem>& problems) {
  std::string out;
  for (const ConfigProblem& p : problems) out += FormatProblem("test.textproto", p) + "\n";
  return out;
}

// ---- parsing ----

TEST(ParseTopologyConfigTest, ErrorsCarryLineAndColumn) {
  struct Case {
    std::string text;
    std::string expected;
  } cases[] = {
      {Lines({"nodes {", "  name: \"a\"", "  shard {}", "}"}),
       "test.textproto:3:9: Message type \"ktx.v1.NodeConfig\" has no field named \"shard\"."},
      {Lines({"nodes {", "  name: \"a\"", "  shards { numa_node: \"x\" }", "}"}),
       "test.textproto:3:23: Expected integer, got: \"x\""},
      {Lines({"nodes {", "  name: \"a\"", "  name: \"b\"", "}"}),
       "test.textproto:3:7: Non-repeated field \"name\" is specified multiple times."},
      {Lines({"nodes {", "  head: true", ""}), "test.textproto:4:1: Expected identifier, got: "},
      {Lines({"nodes {", "  shards { memory_budget_bytes: -5 }", "}"}),
       "test.textproto:2:33: Expected integer, got: -"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ParsedTopologyConfig> parsed = ParseTopologyConfigText(c.text, "test.textproto");
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_THAT(std::string(parsed.status().message()), HasSubstr(c.expected)) << c.text;
  }
}

TEST(ParseTopologyConfigTest, LocationsOfFieldsAndFallbacks) {
  const ParsedTopologyConfig parsed = Parse(Lines({
      "# comment",                   // 1
      "nodes {",                     // 2
      "  name: \"a\"",               // 3
      "  shards {",                  // 4
      "    name: \"a/0\"",           // 5
      "    cpus: \"0-3\"",           // 6
      "  }",                         // 7
      "  tls { cert_file: \"c\" }",  // 8
      "}",                           // 9
      "nodes { name: \"b\" }",       // 10
  }));
  const ConfigLocations& loc = parsed.locations;
  EXPECT_EQ(loc.LineOf("nodes[0]"), 2);
  EXPECT_EQ(loc.LineOf("nodes[0].name"), 3);
  EXPECT_EQ(loc.LineOf("nodes[0].shards[0]"), 4);
  EXPECT_EQ(loc.LineOf("nodes[0].shards[0].cpus"), 6);
  EXPECT_EQ(loc.LineOf("nodes[0].shards[0].numa_node"), 4);  // not written: the shard's line
  EXPECT_EQ(loc.LineOf("nodes[0].tls.cert_file"), 8);
  EXPECT_EQ(loc.LineOf("nodes[0].tls.key_file"), 8);
  EXPECT_EQ(loc.LineOf("nodes[1].listen_address"), 10);
  EXPECT_EQ(loc.LineOf("nodes[1].tls.ca_file"), 10);
  EXPECT_EQ(loc.LineOf("nodes[7].name"), 0);
  EXPECT_EQ(loc.LineOf(""), 0);
}

TEST(ParseTopologyConfigTest, MissingFile) {
  EXPECT_EQ(LoadTopologyConfig("/nonexistent/topology.textproto").status().code(),
            absl::StatusCode::kNotFound);
}

// ---- the example configs ----

std::string ConfigPath(const std::string& name) {
  return std::string(KTX_SOURCE_DIR) + "/configs/" + name;
}

class ExampleConfigTest : public ::testing::TestWithParam<const char*> {};

TEST_P(ExampleConfigTest, ValidOnATwoSocketMachine) {
  absl::StatusOr<ParsedTopologyConfig> parsed = ParseTopologyConfigFile(ConfigPath(GetParam()));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const HardwareTopology machine = TwoSocketMachine();
  ValidationOptions options;
  options.hardware = &machine;
  const std::vector<ConfigProblem> problems = ValidateTopologyConfig(*parsed, options);
  EXPECT_THAT(problems, IsEmpty()) << Dump(problems);
  EXPECT_EQ(LoadTopologyConfig(ConfigPath(GetParam()))->nodes_size(), parsed->config.nodes_size());
}

INSTANTIATE_TEST_SUITE_P(Configs, ExampleConfigTest,
                         ::testing::Values("single-process.textproto", "two-sockets.textproto",
                                           "one-node-per-socket.textproto", "two-hosts.textproto"));

TEST(ExampleConfigTest, ShapesAreAsDocumented) {
  auto load = [](const char* name) { return *LoadTopologyConfig(ConfigPath(name)); };
  const ktx::v1::TopologyConfig single = load("single-process.textproto");
  ASSERT_EQ(single.nodes_size(), 1);
  EXPECT_EQ(single.nodes(0).shards_size(), 1);
  const ktx::v1::TopologyConfig sockets = load("two-sockets.textproto");
  ASSERT_EQ(sockets.nodes_size(), 1);
  ASSERT_EQ(sockets.nodes(0).shards_size(), 2);
  EXPECT_EQ(sockets.nodes(0).shards(1).numa_node(), 1);
  const ktx::v1::TopologyConfig per_socket = load("one-node-per-socket.textproto");
  ASSERT_EQ(per_socket.nodes_size(), 3);
  for (const auto& node : per_socket.nodes()) EXPECT_TRUE(IsLocalNode(node, ""));
  const ktx::v1::TopologyConfig hosts = load("two-hosts.textproto");
  ASSERT_EQ(hosts.nodes_size(), 2);
  EXPECT_EQ(hosts.nodes(1).tls().ca_file(), "certs/ca.crt");
  EXPECT_FALSE(IsLocalNode(hosts.nodes(0), ""));
  EXPECT_TRUE(IsLocalNode(hosts.nodes(0), "head"));
}

// two-hosts with --node head: the head's TLS and token files must exist.
TEST(ExampleConfigTest, TwoHostsChecksTheLocalNodesFiles) {
  absl::StatusOr<ParsedTopologyConfig> parsed =
      ParseTopologyConfigFile(ConfigPath("two-hosts.textproto"));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const HardwareTopology machine = TwoSocketMachine();
  ValidationOptions options;
  options.hardware = &machine;
  options.local_node = "head";
  const std::vector<ConfigProblem> missing = ValidateTopologyConfig(*parsed, options);
  EXPECT_THAT(missing, ElementsAre(Problem(15, "auth_token_file"), Problem(17, "tls.cert_file"),
                                   Problem(18, "tls.key_file"), Problem(19, "tls.ca_file")))
      << Dump(missing);

  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / "ktx_two_hosts_files";
  for (const char* f : {"secrets/ktx-token", "certs/head.crt", "certs/head.key", "certs/ca.crt"}) {
    std::filesystem::create_directories((dir / f).parent_path());
    std::ofstream(dir / f) << "x";
  }
  options.base_dir = dir.string();
  const std::vector<ConfigProblem> ok = ValidateTopologyConfig(*parsed, options);
  EXPECT_THAT(ok, IsEmpty()) << Dump(ok);
  options.local_node = "host2";  // host2's certificate and key are not there
  EXPECT_THAT(ValidateTopologyConfig(*parsed, options),
              ElementsAre(Problem(34, "host2.crt"), Problem(35, "host2.key")));
  std::filesystem::remove_all(dir);
}

// ---- every validation rule ----

class ValidateTest : public ::testing::Test {
 protected:
  HardwareTopology machine_ = TwoSocketMachine();
  ValidationOptions Options() {
    ValidationOptions o;
    o.hardware = &machine_;
    return o;
  }
};

TEST_F(ValidateTest, NoNodesNoShardsNoHead) {
  EXPECT_THAT(Validate("", Options()), ElementsAre(Problem(0, "no nodes")));
  EXPECT_THAT(Validate(Lines({"nodes {", "  name: \"a\"", "  listen_address: \"127.0.0.1:1\"",
                              "  head: true", "  attention_device: \"cpu\"", "}"}),
                       Options()),
              ElementsAre(Problem(0, "no shards")));
  const std::vector<ConfigProblem> no_head =
      Validate(Lines({"nodes {", "  name: \"a\"", "  listen_address: \"10.1.1.1:1\"",
                      "  shards { name: \"s\" numa_node: 0 cpus: \"0\" }", "}"}),
               Options());
  EXPECT_THAT(no_head, ElementsAre(Problem(0, "no node has `head: true`"))) << Dump(no_head);
}

// A valid two-node base the rule tests start from (lines noted).
std::string Base(const char* head_extra = "", const char* shard_extra = "",
                 const char* second_extra = "") {
  std::string text;
  text += "nodes {\n";                                // 1
  text += "  name: \"head\"\n";                       // 2
  text += "  listen_address: \"127.0.0.1:50051\"\n";  // 3
  text += "  head: true\n";                           // 4
  text += "  attention_device: \"cuda:0\"\n";         // 5
  text += "  shards {\n";                             // 6
  text += "    name: \"head/numa0\"\n";               // 7
  text += "    numa_node: 0\n";                       // 8
  text += "    cpus: \"0-15\"\n";                     // 9
  text += std::string("    ") + shard_extra + "\n";   // 10
  text += "  }\n";                                    // 11
  text += std::string("  ") + head_extra + "\n";      // 12
  text += "}\n";                                      // 13
  text += "nodes {\n";                                // 14
  text += "  name: \"n1\"\n";                         // 15
  text += "  listen_address: \"127.0.0.1:50052\"\n";  // 16
  text += "  shards {\n";                             // 17
  text += "    name: \"n1/numa1\"\n";                 // 18
  text += "    numa_node: 1\n";                       // 19
  text += "    cpus: \"16-31\"\n";                    // 20
  text += "  }\n";                                    // 21
  text += std::string("  ") + second_extra + "\n";    // 22
  text += "}\n";                                      // 23
  return text;
}

TEST_F(ValidateTest, BaseIsValid) {
  const std::vector<ConfigProblem> problems = Validate(Base(), Options());
  EXPECT_THAT(problems, IsEmpty()) << Dump(problems);
}

TEST_F(ValidateTest, NamesPresentAndUnique) {
  std::string text = Base("", "", "shards { name: \"head/numa0\" numa_node: 1 cpus: \"17\" }");
  text.replace(text.find("name: \"n1\""), 10, "name: \"head\"");
  const std::vector<ConfigProblem> problems = Validate(text, Options());
  EXPECT_THAT(problems,
              ElementsAre(Problem(15, "node name 'head' is used twice (line 2)"),
                          Problem(22, "shard name 'head/numa0' is used twice (line 7)"),
                          Problem(22, "cpu 17 also used by shard 'n1/numa1' (line 20) of the same"),
                          Problem(22, "budgets of the shards on NUMA node 1 add up to 512.00 GiB")))
      << Dump(problems);
  std::string unnamed = Base();
  unnamed.replace(unnamed.find("  name: \"n1\""), 12, "");
  unnamed.replace(unnamed.find("    name: \"n1/numa1\""), 20, "");
  EXPECT_THAT(Validate(unnamed, Options()),
              ElementsAre(Problem(14, "node #1 has no name"), Problem(17, "shard #0 has no name")));
}

TEST_F(ValidateTest, ExactlyOneHead) {
  const std::vector<ConfigProblem> problems =
      Validate(Base("", "", "head: true attention_device: \"cpu\""), Options());
  EXPECT_THAT(problems, ElementsAre(Problem(22, "node 'n1' is a second head; 'head' (line 4)")))
      << Dump(problems);
}

TEST_F(ValidateTest, AttentionDevice) {
  std::string text = Base();
  text.replace(text.find("cuda:0"), 6, "gpu0");
  EXPECT_THAT(Validate(text, Options()),
              ElementsAre(Problem(5, "attention_device 'gpu0' is not \"cpu\" or \"cuda:N\"")));
  text = Base();
  text.replace(text.find("cuda:0"), 6, "cuda:1");
  EXPECT_THAT(Validate(text, Options()),
              ElementsAre(Problem(5, "'cuda:1' but this machine has 1 GPU")));
  const HardwareTopology no_gpu = TwoSocketMachine(/*with_gpu=*/false);
  ValidationOptions o = Options();
  o.hardware = &no_gpu;
  EXPECT_THAT(Validate(Base(), o), ElementsAre(Problem(5, "has 0 GPUs (no CUDA device)")));
  text = Base();
  text.replace(text.find("  attention_device: \"cuda:0\""), 28, "");
  EXPECT_THAT(Validate(text, Options()), ElementsAre(Problem(1, "has no attention_device")));
  EXPECT_THAT(Validate(Base("", "", "attention_device: \"cpu\""), Options()),
              ElementsAre(Problem(22, "node 'n1' is not the head but sets attention_device")));
}

TEST_F(ValidateTest, NonHeadNodeWithoutShards) {
  std::string text = Base() + "nodes { name: \"idle\" listen_address: \"127.0.0.1:50053\" }\n";
  EXPECT_THAT(Validate(text, Options()),
              ElementsAre(Problem(24, "'idle' is not the head and holds no shard")));
}

TEST_F(ValidateTest, ListenAddresses) {
  struct Case {
    const char* address;
    const char* problem;
  } cases[] = {
      {"", "has no listen_address"},
      {"localhost", "expected host:port"},
      {":50051", "the host is empty"},
      {"127.0.0.1:0", "port '0' is not a number in 1..65535"},
      {"127.0.0.1:65536", "port '65536'"},
      {"127.0.0.1:http", "port 'http'"},
      {"127.0.0.1:", "port ''"},
      {"999.0.0.1:5", "'999.0.0.1' is not a host name or IPv4 address"},
      {"bad_host:5", "'bad_host' is not a host name"},
      {"[::1:5", "'[' without ']'"},
      {"[::1]5", "expected :port after the IPv6 address"},
      {"[fe80::1::2]:5", "is not an IPv6 address"},
      {"::1:50051", "must be written in brackets"},
      {"127.0.0.1:50051", "listen_address '127.0.0.1:50051' is used by another node too (line 3)"},
  };
  for (const Case& c : cases) {
    std::string text = Base();
    text.replace(text.find("127.0.0.1:50052"), 15, c.address);
    EXPECT_THAT(Validate(text, Options()), ElementsAre(Problem(16, c.problem))) << c.address;
  }
  for (const char* good : {"[::1]:50052", "localhost:50052", "node-2.example.com:7", "10.0.0.2:1",
                           "127.0.0.1:65535"}) {
    std::string text = Base();
    text.replace(text.find("127.0.0.1:50052"), 15, good);
    EXPECT_THAT(Validate(text, ValidationOptions{}), IsEmpty()) << good;
  }
}

TEST_F(ValidateTest, CpuLists) {
  auto with_cpus = [&](const char* cpus) {
    std::string text = Base();
    text.replace(text.find("\"0-15\""), 6, std::string("\"") + cpus + "\"");
    return Validate(text, Options());
  };
  EXPECT_THAT(with_cpus(""), ElementsAre(Problem(9, "has no cpus")));
  EXPECT_THAT(with_cpus("0-3,x"), ElementsAre(Problem(9, "'x' is not a cpu number")));
  EXPECT_THAT(with_cpus("0-3,3"), ElementsAre(Problem(9, "cpu 3 is listed twice")));
  EXPECT_THAT(
      with_cpus("0-7,100-101"),
      ElementsAre(Problem(9, "cpus 100-101 do not exist on this machine (usable cpus: 0-63)")));
  EXPECT_THAT(with_cpus("14-17"),
              ElementsAre(Problem(9,
                                  "cpus 16-17 belong to NUMA node 1, not to the shard's NUMA "
                                  "node 0"),
                          Problem(20,
                                  "cpus 16-17 also used by shard 'head/numa0' (line 9) of "
                                  "another node")));
}

TEST_F(ValidateTest, CpuUsedTwiceWithinANodeEvenWhenRemote) {
  // Remote nodes (not loopback, not --node) get no machine checks, but a cpu
  // used by two of their shards is still wrong.
  std::string text = Lines({
      "nodes {",                                                  // 1
      "  name: \"far\"",                                          // 2
      "  listen_address: \"10.0.0.9:1\"",                         // 3
      "  head: true",                                             // 4
      "  attention_device: \"cuda:3\"",                           // 5
      "  shards { name: \"a\" numa_node: 7 cpus: \"0-7\" }",      // 6
      "  shards { name: \"b\" numa_node: 8 cpus: \"6-9,200\" }",  // 7
      "}",                                                        // 8
  });
  EXPECT_THAT(Validate(text, Options()),
              ElementsAre(Problem(7,
                                  "shard 'b': cpus 6-7 also used by shard 'a' (line 6) of the "
                                  "same node")));
}

TEST_F(ValidateTest, NumaNodes) {
  std::string text = Base();
  text.replace(text.find("numa_node: 1"), 12, "numa_node: 2");
  EXPECT_THAT(Validate(text, Options()),
              ElementsAre(Problem(19,
                                  "NUMA node 2 does not exist on this machine (NUMA nodes "
                                  "with usable cpus: 0, 1)")));
  text = Base();
  text.replace(text.find("numa_node: 1"), 12, "numa_node: -1");
  EXPECT_THAT(Validate(text, Options()), ElementsAre(Problem(19, "numa_node -1 is negative")));
}

TEST_F(ValidateTest, BudgetsFitTheNumaNode) {
  EXPECT_THAT(Validate(Base("", "memory_budget_bytes: 300000000000"), Options()),
              ElementsAre(Problem(10,
                                  "memory_budget_bytes 300000000000 (279.40 GiB) exceeds NUMA "
                                  "node 0's memory, 256.00 GiB")));
  // Two shards on NUMA node 0: 200 GiB + the whole node (budget 0).
  std::string text = Base("shards { name: \"head/numa0b\" numa_node: 0 cpus: \"32-47\" }",
                          "memory_budget_bytes: 214748364800");
  EXPECT_THAT(
      Validate(text, Options()),
      ElementsAre(Problem(12, "budgets of the shards on NUMA node 0 add up to 456.00 GiB")));
}

TEST_F(ValidateTest, Tls) {
  // The nodes are local (loopback): their files must exist, so make them.
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "ktx_tls_files";
  std::filesystem::create_directories(dir);
  for (const char* f : {"a.crt", "b.crt", "b.key", "ca.crt"}) std::ofstream(dir / f) << "x";
  ValidationOptions with_files;
  with_files.base_dir = dir.string();
  const std::vector<ConfigProblem> partial = Validate(Base("tls { cert_file: \"a.crt\" }", "",
                                                           "tls { cert_file: \"b.crt\" key_file: "
                                                           "\"b.key\" ca_file: \"ca.crt\" }"),
                                                      with_files);
  EXPECT_THAT(partial, ElementsAre(Problem(12, "tls sets some files but not key_file"),
                                   Problem(12, "tls sets some files but not ca_file")))
      << Dump(partial);
  const std::vector<ConfigProblem> mixed =
      Validate(Base("", "", "tls { cert_file: \"b.crt\" key_file: \"b.key\" ca_file: \"ca.crt\" }"),
               with_files);
  std::filesystem::remove_all(dir);
  EXPECT_THAT(mixed, ElementsAre(Problem(1, "node 'head' has no tls but node 'n1' (line 22) does")))
      << Dump(mixed);
  // Local nodes: the files must exist (relative to base_dir).
  ValidationOptions o = Options();
  o.base_dir = "/nonexistent-dir";
  const std::vector<ConfigProblem> files =
      Validate(Base("tls { cert_file: \"a.crt\" key_file: \"a.key\" ca_file: \"/etc/hostname\" }",
                    "", "tls { cert_file: \"b.crt\" key_file: \"b.key\" ca_file: \"ca.crt\" }"),
               o);
  EXPECT_THAT(files, ElementsAre(Problem(12,
                                         "tls.cert_file '/nonexistent-dir/a.crt' does not "
                                         "exist"),
                                 Problem(12, "tls.key_file"), Problem(22, "tls.cert_file"),
                                 Problem(22, "tls.key_file"), Problem(22, "tls.ca_file")))
      << Dump(files);
}

TEST_F(ValidateTest, AuthTokenFileExistsOnLocalNodes) {
  ValidationOptions o = Options();
  o.base_dir = "/nonexistent-dir";
  EXPECT_THAT(Validate(Base("auth_token_file: \"token\""), o),
              ElementsAre(Problem(12, "auth_token_file '/nonexistent-dir/token' does not exist")));
}

TEST_F(ValidateTest, UnknownLocalNode) {
  ValidationOptions o = Options();
  o.local_node = "nope";
  EXPECT_THAT(Validate(Base(), o),
              ElementsAre(Problem(0,
                                  "--node 'nope' names no node of this config (nodes: 'head', "
                                  "'n1')")));
}

TEST_F(ValidateTest, ModelMustFitTheBudgets) {
  // 2 MoE layers of 64 experts of 1 GiB: 64 GiB per shard when split in two.
  ModelExpertTable model;
  model.n_layer = 2;
  model.layers = {{true, 64, kGiB}, {true, 64, kGiB}};
  ValidationOptions o = Options();
  o.model = &model;
  EXPECT_THAT(Validate(Base(), o), IsEmpty());  // budget 0: the whole 256 GiB node
  // Budgets of 40 GiB on both shards.
  auto with_budgets = [](const char* budget) {
    std::string text = Base("", budget);
    text.replace(text.find("cpus: \"16-31\""), 13, std::string("cpus: \"16-31\" ") + budget);
    return text;
  };
  const std::vector<ConfigProblem> problems =
      Validate(with_budgets("memory_budget_bytes: 42949672960"), o);
  EXPECT_THAT(problems, ElementsAre(Problem(10,
                                            "shard 'head/numa0': the expert plan puts 64.00 "
                                            "GiB (64 experts) on it but its budget is 40.00 "
                                            "GiB: 24.00 GiB missing"),
                                    Problem(20, "shard 'n1/numa1': the expert plan puts 64.00")))
      << Dump(problems);
  // One shard with room takes what the other cannot: no problem.
  EXPECT_THAT(Validate(Base("", "memory_budget_bytes: 42949672960"), o), IsEmpty());
  // Replicating 4 hot experts of layer 0 onto both shards adds 2 GiB to each.
  o.placement.profile.weights[0].assign(64, 1.0);
  o.placement.replication = {4, 2};
  EXPECT_THAT(Validate(with_budgets("memory_budget_bytes: 68719476736"), o),  // 64 GiB
              ElementsAre(Problem(10, "puts 66.00 GiB"), Problem(20, "puts 66.00 GiB")));
  o.placement.replication = {4, 3};
  EXPECT_THAT(Validate(Base(), o), ElementsAre(Problem(0,
                                                       "expert placement: replication: 3 "
                                                       "copies asked for")));
}

TEST_F(ValidateTest, EveryProblemIsReportedInLineOrder) {
  std::string text = Base("", "memory_budget_bytes: 300000000000", "attention_device: \"cpu\"");
  text.replace(text.find("\"n1/numa1\""), 10, "\"head/numa0\"");
  text.replace(text.find("\"16-31\""), 7, "\"16-31,99\"");
  const std::vector<ConfigProblem> problems = Validate(text, Options());
  EXPECT_THAT(problems, ElementsAre(Problem(10, "exceeds NUMA node 0's memory"),
                                    Problem(18, "shard name 'head/numa0' is used twice"),
                                    Problem(20, "cpu 99 does not exist"),
                                    Problem(22, "not the head but sets attention_device")))
      << Dump(problems);
}

// ---- helpers ----

TEST(ListenAddressTest, ParseAndLoopback) {
  absl::StatusOr<HostPort> hp = ParseListenAddress("[::1]:443");
  ASSERT_TRUE(hp.ok()) << hp.status();
  EXPECT_EQ(hp->host, "::1");
  EXPECT_EQ(hp->port, 443);
  EXPECT_TRUE(IsLoopbackHost("::1"));
  EXPECT_TRUE(IsLoopbackHost("127.3.2.1"));
  EXPECT_TRUE(IsLoopbackHost("LocalHost"));
  EXPECT_FALSE(IsLoopbackHost("10.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("127.example.com"));
}

TEST(ShardSpecsFromConfigTest, BudgetZeroIsTheNumaNodeOnLocalNodesOnly) {
  const ParsedTopologyConfig parsed = Parse(Lines({
      "nodes { name: \"a\" listen_address: \"127.0.0.1:1\" head: true attention_device: \"cpu\"",
      "  shards { name: \"a0\" numa_node: 1 cpus: \"16\" }",
      "  shards { name: \"a1\" numa_node: 0 cpus: \"0\" memory_budget_bytes: 5 } }",
      "nodes { name: \"b\" listen_address: \"10.0.0.2:1\"",
      "  shards { name: \"b0\" numa_node: 0 cpus: \"0\" } }",
  }));
  const HardwareTopology machine = TwoSocketMachine();
  const std::vector<ShardSpec> specs = ShardSpecsFromConfig(parsed.config, &machine, "");
  ASSERT_EQ(specs.size(), 3u);
  EXPECT_EQ(specs[0].name, "a0");
  EXPECT_EQ(specs[0].memory_budget_bytes, 256 * kGiB);
  EXPECT_EQ(specs[1].memory_budget_bytes, 5u);
  EXPECT_EQ(specs[2].memory_budget_bytes, kNoBudget);
  EXPECT_EQ(ShardSpecsFromConfig(parsed.config, &machine, "b")[2].memory_budget_bytes, 256 * kGiB);
  EXPECT_EQ(ShardSpecsFromConfig(parsed.config, nullptr, "")[0].memory_budget_bytes, kNoBudget);
}

// ---- init ----

TEST(MakeLocalTopologyConfigTest, OneShardPerNumaNodeAndItValidates) {
  const HardwareTopology machine = TwoSocketMachine();
  InitOptions init;
  init.listen_address = "127.0.0.1:6000";
  const ktx::v1::TopologyConfig config = MakeLocalTopologyConfig(machine, init);
  ASSERT_EQ(config.nodes_size(), 1);
  const ktx::v1::NodeConfig& node = config.nodes(0);
  EXPECT_TRUE(node.head());
  EXPECT_EQ(node.attention_device(), "cuda:0");
  EXPECT_EQ(node.listen_address(), "127.0.0.1:6000");
  ASSERT_EQ(node.shards_size(), 2);
  EXPECT_EQ(node.shards(0).name(), "node0/numa0");
  EXPECT_EQ(node.shards(1).cpus(), "16-31,48-63");
  EXPECT_EQ(node.shards(1).numa_node(), 1);
  // 90% of 256 GiB = 230.4 GiB, rounded down to MiB.
  EXPECT_EQ(node.shards(0).memory_budget_bytes(), 235929ULL << 20);

  const std::string text = TopologyConfigToText(config, "written for a test\nsecond line");
  EXPECT_THAT(text, HasSubstr("# written for a test\n# second line\n"));
  EXPECT_THAT(text, HasSubstr("memory_budget_bytes: 247389487104  # 230.40 GiB"));
  const ParsedTopologyConfig back = Parse(text);
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(back.config, config));
  ValidationOptions o;
  o.hardware = &machine;
  EXPECT_THAT(ValidateTopologyConfig(back, o), IsEmpty());

  const HardwareTopology small = SmallMachine();
  const ktx::v1::TopologyConfig cpu_only = MakeLocalTopologyConfig(small, {});
  EXPECT_EQ(cpu_only.nodes(0).attention_device(), "cpu");
  EXPECT_EQ(cpu_only.nodes(0).shards_size(), 1);
  EXPECT_EQ(cpu_only.nodes(0).shards(0).cpus(), "0-7");
}

TEST(TopologyConfigToTextTest, EscapesAndTls) {
  ktx::v1::TopologyConfig config;
  ktx::v1::NodeConfig* node = config.add_nodes();
  node->set_name("we\"ird\\name");
  node->set_auth_token_file("t");
  node->mutable_tls()->set_cert_file("c");
  node->mutable_tls()->set_key_file("k");
  node->mutable_tls()->set_ca_file("a");
  node->add_shards()->set_name("s");
  const ParsedTopologyConfig back = Parse(TopologyConfigToText(config));
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(back.config, config))
      << TopologyConfigToText(config);
}

}  // namespace
}  // namespace ktx::topology
