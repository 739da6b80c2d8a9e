// `ktx-ctl bench --topology FILE` end to end (actors/actor_bench.h) on the
// q8_0 fixture with two expert shards: exit code, the table, and the JSON's
// per-shard breakdown, checked for consistency: every time non-negative, the
// timed decode steps computing exactly batch x steps tokens and a prefill
// exactly its prompt, each shard's compute and the stages of a step adding up
// to no more than the step's wall time, the critical shard plus dispatch to no
// more than the MoE wait, the layers to the totals; sampled decode producing
// distinct tokens.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "actors/cpu_arena.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/actors/actors_test_util.h"
#include "tests/cli/ktx_ctl_runner.h"
#include "topology/cpu_list.h"

namespace ktx::actors {
namespace {

using ::testing::HasSubstr;
using testing_util::RunKtxCtl;

std::string Temp(const std::string& name) {
  return ::testing::TempDir() + "/ktx_actor_bench_" + std::to_string(getpid()) + "_" + name;
}

std::string Model() {
  return testing::DataDir() + testing::Manifest()["files"]["q8_0"]["gguf"].get<std::string>();
}

// Two shards splitting this process's cpus (both on cpu 0 with one cpu).
std::string WriteTopology() {
  const std::vector<int> cpus = AllowedCpus();
  const size_t half = std::max<size_t>(1, cpus.size() / 2);
  std::vector<int> a(cpus.begin(), cpus.begin() + half);
  std::vector<int> b = cpus.size() > 1 ? std::vector<int>(cpus.begin() + half, cpus.end()) : a;
  const std::string path = Temp("topology.textproto");
  std::ofstream(path) << "nodes {\n  name: \"node0\"\n  listen_address: \"127.0.0.1:50051\"\n"
                      << "  head: true\n  attention_device: \"cpu\"\n"
                      << "  shards { name: \"left\" numa_node: 0 cpus: \""
                      << topology::FormatIdRanges(a) << "\" }\n"
                      << "  shards { name: \"right\" numa_node: 0 cpus: \""
                      << topology::FormatIdRanges(b) << "\" }\n}\n";
  return path;
}

constexpr double kEps = 1e-6;  // ms; the figures are sums of integer microseconds

double Stages(const nlohmann::json& t) {
  return t["attention"].get<double>() + t["ffn_norm"].get<double>() + t["gate"].get<double>() +
         t["dense_ffn"].get<double>() + t["moe"].get<double>() + t["combine"].get<double>();
}

TEST(ActorBenchTest, TopologyBenchWritesThePerShardBreakdown) {
  const std::string topology = WriteTopology();
  const std::string json = Temp("bench.json");
  const auto o = RunKtxCtl("bench --model " + Model() + " --topology " + topology +
                           " --prompt-len 8,12 --gen 4 --batch 1,2 --read-mib 16 "
                           "--prefill-repeats 2 --json " +
                           json);
  ASSERT_EQ(o.rc, 0) << o.err;
  EXPECT_THAT(o.err, HasSubstr("(actor runtime)"));
  EXPECT_THAT(o.err, HasSubstr("shard 1 'right'"));
  for (const char* text : {"decode", "prefill", "actor runtime: 2 expert shard(s)", "dispatch",
                           "shard1", "left", "right"}) {
    EXPECT_THAT(o.out, HasSubstr(text));
  }
  // CPU attention: every routed expert is the shards', so no GPU-path note.
  EXPECT_THAT(o.out, ::testing::Not(HasSubstr("note: on the GPU path")));
  const nlohmann::json j = nlohmann::json::parse(testing_util::ReadWholeFile(json));
  std::remove(json.c_str());
  std::remove(topology.c_str());
  EXPECT_EQ(j["schema"], "ktx-bench/1");
  EXPECT_TRUE(j["complete"].get<bool>());
  EXPECT_EQ(j["config"]["topology"], topology);
  EXPECT_EQ(j["config"]["shards"].get<int>(), 2);
  EXPECT_EQ(j["config"]["attention_device"], "cpu");
  EXPECT_TRUE(j["config"]["environment"].is_object());
  EXPECT_EQ(j["config"]["experts"], "fast");
  EXPECT_GT(j["machine"]["read_bandwidth"]["best_gbps"].get<double>(), 0.0);

  const nlohmann::json& actors = j["actors"];
  ASSERT_EQ(actors["shards"].size(), 2u);
  EXPECT_EQ(actors["shards"][0]["name"], "left");
  EXPECT_EQ(actors["shards"][1]["name"], "right");
  int64_t experts = 0;
  for (const auto& s : actors["shards"]) {
    EXPECT_GT(s["bytes_held"].get<uint64_t>(), 0u);
    EXPECT_TRUE(s["copies"].get<bool>());
    EXPECT_NE(s["variant"], "reference");
    experts += s["experts_held"].get<int64_t>();
  }
  EXPECT_EQ(experts, 2 * 16);  // 2 MoE layers x 16 experts, each held once

  // The phases, as runtime/bench orders them: context prefill, decodes, the rest.
  const nlohmann::json& phases = actors["phases"];
  std::vector<std::string> names;
  for (const auto& p : phases) names.push_back(p["phase"].get<std::string>());
  EXPECT_EQ(names, (std::vector<std::string>{"prefill 8", "decode batch 1", "decode batch 2",
                                             "prefill 12"}));
  ASSERT_EQ(j["decode"].size(), 2u);
  ASSERT_EQ(j["prefill"].size(), 2u);
  std::vector<double> shard_total(2, 0.0);
  for (const auto& p : phases) {
    SCOPED_TRACE(p["phase"].get<std::string>());
    const std::string name = p["phase"].get<std::string>();
    const int64_t tokens = p["tokens"].get<int64_t>();
    EXPECT_GT(p["steps"].get<int64_t>(), 0);
    const std::map<std::string, int64_t> want_tokens = {
        {"decode batch 1", 4}, {"decode batch 2", 8}, {"prefill 8", 8}, {"prefill 12", 12}};
    EXPECT_EQ(tokens, want_tokens.at(name));
    const double wall = p["step_wall_ms_per_token"].get<double>();
    EXPECT_GT(wall, 0.0);
    const nlohmann::json& t = p["total"];
    for (const auto& [key, value] : t.items()) {
      if (key == "shards") continue;
      EXPECT_GE(value.get<double>(), 0.0) << key;
    }
    ASSERT_EQ(t["shards"].size(), 2u);
    double shards = 0;
    for (size_t s = 0; s < 2; ++s) {
      const double v = t["shards"][s].get<double>();
      EXPECT_GE(v, 0.0);
      EXPECT_LE(v, wall + kEps) << "shard " << s;
      shards += v;
      shard_total[s] += v;
    }
    // The fixture's experts are a small part of a step: even added up, the
    // shards' compute fits in the wall time.
    EXPECT_LE(shards, wall + kEps);
    EXPECT_LE(t["experts"].get<double>(), t["moe"].get<double>() + kEps);
    EXPECT_LE(t["experts"].get<double>() + t["dispatch"].get<double>(),
              t["moe"].get<double>() + kEps);
    EXPECT_LE(t["shared"].get<double>() + t["dispatch"].get<double>(),
              t["moe"].get<double>() + kEps);
    EXPECT_LE(Stages(t) + p["embed"].get<double>() + p["head"].get<double>(), wall + kEps);
    EXPECT_GT(t["attention"].get<double>(), 0.0);
    EXPECT_GT(t["moe"].get<double>(), 0.0);
    // Layers add up to the totals; dense layer 0 has no MoE time.
    ASSERT_EQ(p["layers"].size(), 3u);
    double attention = 0, moe = 0;
    for (const auto& l : p["layers"]) {
      attention += l["attention"].get<double>();
      moe += l["moe"].get<double>();
    }
    EXPECT_NEAR(attention, t["attention"].get<double>(), 1e-9);
    EXPECT_NEAR(moe, t["moe"].get<double>(), 1e-9);
    EXPECT_EQ(p["layers"][0]["moe"].get<double>(), 0.0);
    EXPECT_EQ(p["layers"][0]["shards"][0].get<double>(), 0.0);
    EXPECT_GT(p["layers"][0]["dense_ffn"].get<double>(), 0.0);
  }
  // Both shards computed.
  EXPECT_GT(shard_total[0], 0.0);
  EXPECT_GT(shard_total[1], 0.0);

  // runtime/bench's figures: sampled decode of distinct sequences.
  for (const auto& d : j["decode"]) {
    EXPECT_EQ(d["steps"].get<int64_t>(), 4);
    EXPECT_GT(d["tok_s"].get<double>(), 0.0);
    EXPECT_GT(d["expert_bytes_per_token"].get<double>(), 0.0);
  }
  EXPECT_GT(j["decode"][1]["distinct_tokens"].get<int64_t>(), 1);
  // --prefill-repeats 2: each prefill timed twice, the median run (the faster
  // of two) reported with both runs' tok/s; one phase per prompt length.
  EXPECT_EQ(j["config"]["prefill_repeats"].get<int>(), 2);
  for (const auto& p : j["prefill"]) {
    EXPECT_GT(p["tok_s"].get<double>(), 0.0);
    const std::vector<double> runs = p["runs_tok_s"].get<std::vector<double>>();
    ASSERT_EQ(runs.size(), 2u);
    EXPECT_DOUBLE_EQ(p["tok_s"].get<double>(), std::max(runs[0], runs[1]));
  }
  EXPECT_THAT(o.out, HasSubstr("12 tokens: median of 2 runs"));
}

TEST(ActorBenchTest, FlagsThatDoNotApplyAreRefused) {
  auto o = RunKtxCtl("bench --model " + Model() + " --shards 2 --threads 2");
  EXPECT_EQ(o.rc, 1);
  EXPECT_THAT(o.err, HasSubstr("--threads does not apply"));
  o = RunKtxCtl("bench --model " + Model() + " --shards 2 --topology /nonexistent.textproto");
  EXPECT_EQ(o.rc, 1);
  EXPECT_THAT(o.err, HasSubstr("not both"));
  o = RunKtxCtl("bench --model " + Model() + " --topology /nonexistent.textproto");
  EXPECT_EQ(o.rc, 1);
  EXPECT_THAT(o.err, HasSubstr("/nonexistent.textproto"));
}

}  // namespace
}  // namespace ktx::actors
