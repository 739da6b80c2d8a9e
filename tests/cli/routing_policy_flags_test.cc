// The routing policy of a topology config (proto/ktx/v1/topology.proto,
// routing_policy) and --policy: conversion to RoutingPolicy and back, errors
// that name the field, and a config file read through the topology loader.
#include "cli/routing_policy_flags.h"

#include <cstdio>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"

namespace ktx::cli {
namespace {

using ::testing::HasSubstr;

ktx::v1::RoutingPolicyConfig Config(const std::string& text) {
  ktx::v1::RoutingPolicyConfig c;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &c)) << text;
  return c;
}

TEST(RoutingPolicyFlagsTest, ConfigConvertsToThePolicyAndBack) {
  const ktx::v1::RoutingPolicyConfig c = Config(R"(
    settings { top_k: 6 }
    layers { first: 3 last: 10 settings { defer: 1 } }
    layers { first: 5 last: 5 settings { min_mass: 0.9 min_k: 4 } }
    defer_join: "next_attention")");
  auto p = RoutingPolicyFromConfig(c, "cfg");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->ToString(),
            "top_k=6,join=next_attention;layers=3-10,defer=1;layers=5,mass=0.9,min_k=4");
  EXPECT_EQ(p->ForLayer(5).defer, 1);
  EXPECT_EQ(p->ForLayer(5).rule.min_k, 4);
  EXPECT_EQ(p->ForLayer(2).rule.top_k, 6);
  // Back to the message and again: the same policy.
  auto again = RoutingPolicyFromConfig(RoutingPolicyToConfig(*p), "cfg");
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(*again == *p);
  // The flag's text form gives the same policy.
  auto flag = ParsePolicyFlag(p->ToString());
  ASSERT_TRUE(flag.ok());
  EXPECT_TRUE(**flag == *p);
  EXPECT_EQ(*ParsePolicyFlag(""), nullptr);
}

TEST(RoutingPolicyFlagsTest, ConfigErrorsNameTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"settings { top_k: 0 }", "cfg: routing_policy.settings.top_k: 0 must be >= 1"},
      {"settings { min_mass: 1.5 }", "routing_policy.settings.min_mass: 1.5 outside (0, 1]"},
      {"layers { first: 4 last: 2 settings { defer: 1 } }", "routing_policy.layers[0]: first = 4"},
      {"layers { first: 1 last: 2 }", "routing_policy.layers[0].settings: sets nothing"},
      {"layers { first: 1 last: 2 settings { min_k: 0 } }",
       "routing_policy.layers[0].settings.min_k"},
      {"defer_join: \"soon\"", "routing_policy.defer_join: 'soon'"},
  };
  for (const auto& [text, words] : cases) {
    auto p = RoutingPolicyFromConfig(Config(text), "cfg");
    ASSERT_FALSE(p.ok()) << text;
    EXPECT_THAT(std::string(p.status().message()), HasSubstr(words)) << text;
  }
  auto flag = ParsePolicyFlag("top_k=abc");
  ASSERT_FALSE(flag.ok());
  EXPECT_THAT(std::string(flag.status().message()), HasSubstr("--policy: routing policy"));
  EXPECT_THAT(std::string(flag.status().message()), HasSubstr("top_k: 'abc'"));
}

TEST(RoutingPolicyFlagsTest, ReadsTheTopologyConfigFile) {
  const std::string path = ::testing::TempDir() + "/policy_topology.textproto";
  {
    std::ofstream out(path);
    out << "nodes { name: \"node0\" listen_address: \"127.0.0.1:6000\" head: true\n"
           "  shards { name: \"node0/numa0\" numa_node: 0 cpus: \"0\" } }\n"
           "routing_policy { settings { top_k: 3 } }\n";
  }
  auto p = RoutingPolicyFromTopologyFile(path);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_NE(*p, nullptr);
  EXPECT_EQ((*p)->ToString(), "top_k=3");
  {
    std::ofstream out(path);
    out << "nodes { name: \"node0\" listen_address: \"127.0.0.1:6000\" head: true }\n";
  }
  p = RoutingPolicyFromTopologyFile(path);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, nullptr);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace ktx::cli
