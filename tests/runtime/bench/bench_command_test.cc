// ktx-ctl bench end to end on a tiny synthetic model (ktx-ctl synth --preset
// tiny): exit code, the table on stdout, every JSON field the GPU-machine
// script reads, and clear errors for bad flags; `ktx-ctl logits` with the
// default fast experts lands within tier B of the float64 fixture.
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
#include "nlohmann/json.hpp"
#include "tests/cli/ktx_ctl_runner.h"

namespace ktx::bench {
namespace {

using ::testing::HasSubstr;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

using Output = testing_util::CommandOutput;
using testing_util::RunKtxCtl;
const auto& ReadFile = testing_util::ReadWholeFile;

std::string Temp(const std::string& name) {
  return ::testing::TempDir() + "/ktx_bench_" + std::to_string(getpid()) + "_" + name;
}

class BenchCommandTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = new std::string(Temp("tiny.gguf"));
    const Output o = RunKtxCtl("synth --preset tiny --quant q4_k_m --seed 3 --out " + *model_);
    ASSERT_EQ(o.rc, 0) << o.err;
  }
  static void TearDownTestSuite() {
    std::remove(model_->c_str());
    delete model_;
  }
  static std::string* model_;
};
std::string* BenchCommandTest::model_ = nullptr;

TEST_F(BenchCommandTest, WritesTableAndJson) {
  const std::string json = Temp("bench.json");
  // A KTX_* variable (one that changes nothing here) is recorded in the JSON.
  setenv("KTX_GPU_DECODE_CPU_GBPS", "123", 1);
  const Output o =
      RunKtxCtl("bench --model " + *model_ +
                " --prompt-len 16,24 --gen 4 --batch 1,2 --threads 2 --read-mib 16 --json " + json);
  unsetenv("KTX_GPU_DECODE_CPU_GBPS");
  ASSERT_EQ(o.rc, 0) << o.err;
  EXPECT_THAT(o.err, HasSubstr("CPU experts ready"));
  EXPECT_THAT(o.err, HasSubstr("bench: prefill 16 tokens"));
  EXPECT_THAT(o.err, HasSubstr("bench: wrote " + json));
  for (const char* text : {"prefill", "decode", "read bandwidth", "per layer", "experts"}) {
    EXPECT_THAT(o.out, HasSubstr(text));
  }
  const nlohmann::json j = nlohmann::json::parse(ReadFile(json));
  std::remove(json.c_str());
  EXPECT_EQ(j["schema"], "ktx-bench/1");
  EXPECT_TRUE(j["complete"].get<bool>());
  EXPECT_FALSE(j["date"].get<std::string>().empty());
  EXPECT_FALSE(j["machine"]["cpu_brand"].get<std::string>().empty());
  EXPECT_EQ(j["machine"]["threads"].get<int>(), std::min<long>(2, sysconf(_SC_NPROCESSORS_ONLN)));
  EXPECT_GT(j["machine"]["read_bandwidth"]["best_gbps"].get<double>(), 0.0);
  EXPECT_TRUE(j["machine"]["topology"].contains("nodes"));
  EXPECT_TRUE(j["machine"]["topology"]["isa"].contains("amx_int8"));
  EXPECT_EQ(j["model"]["path"], *model_);
  EXPECT_EQ(j["model"]["n_expert"].get<int>(), 16);
  EXPECT_EQ(j["config"]["experts"], "fast");
  EXPECT_EQ(j["config"]["prompt_lens"], nlohmann::json({16, 24}));
  EXPECT_EQ(j["config"]["batch_sizes"], nlohmann::json({1, 2}));
  EXPECT_EQ(j["config"]["environment"]["KTX_GPU_DECODE_CPU_GBPS"], "123");
  EXPECT_GT(j["load"]["repacked_bytes"].get<double>(), 0.0);
  // The repacking's own time, and the experts' whole load (calibration too).
  EXPECT_GT(j["load"]["repack_seconds"].get<double>(), 0.0);
  EXPECT_GE(j["load"]["experts_load_seconds"].get<double>(),
            j["load"]["repack_seconds"].get<double>());
  EXPECT_THAT(o.out, HasSubstr("GiB held, repacked in "));
  EXPECT_TRUE(j["check"]["ok"].get<bool>());
  EXPECT_TRUE(j["load"].contains("model_open_seconds"));
  ASSERT_EQ(j["prefill"].size(), 2u);
  ASSERT_EQ(j["decode"].size(), 2u);
  EXPECT_EQ(j["prefill"][1]["prompt_len"].get<int>(), 24);
  EXPECT_GT(j["prefill"][1]["tok_s"].get<double>(), 0.0);
  for (const nlohmann::json& d : j["decode"]) {
    EXPECT_EQ(d["steps"].get<int>(), 4);
    EXPECT_EQ(d["context"].get<int>(), 16 + 8);
    EXPECT_GT(d["tok_s"].get<double>(), 0.0);
    EXPECT_GT(d["expert_bytes_per_token"].get<double>(), 0.0);
    EXPECT_GT(d["kernel_bytes_per_token"].get<double>(), 0.0);
    EXPECT_GT(d["pct_of_read_bw"].get<double>(), 0.0);
    EXPECT_GT(d["stages"]["experts"].get<double>(), 0.0);
    EXPECT_GT(d["stages"]["attention"].get<double>(), 0.0);
    EXPECT_EQ(d["layers"].size(), 3u);
  }
}

TEST_F(BenchCommandTest, ReferenceExperts) {
  const Output o = RunKtxCtl("bench --model " + *model_ +
                             " --prompt-len 8 --gen 2 --batch 2 --threads 1 --read-mib 8"
                             " --experts reference");
  ASSERT_EQ(o.rc, 0) << o.err;
  EXPECT_THAT(o.out, HasSubstr("experts    reference"));
}

TEST_F(BenchCommandTest, BadFlagsGiveClearErrors) {
  const std::string model = " --model " + *model_;
  struct Case {
    std::string args;
    std::string words;
  };
  const std::vector<Case> cases = {
      {"bench" + model + " --prompt-len 8,x", "--prompt-len"},
      {"bench" + model + " --batch 0", "--batch"},
      {"bench" + model + " --gen 0", "--gen"},
      {"bench" + model + " --experts slow", "--experts"},
      {"bench" + model + " --threads -1", "--threads"},
      {"bench" + model + " --temperature 0", "temperature"},
      {"bench" + model + " --max-seconds -5", "--max-seconds"},
      {"bench" + model + " --shards 1 --moe-spin-us -2", "--moe-spin-us"},  // -1 is auto
      {"bench" + model + " --shards 1 --arena-spin-us -2", "--arena-spin-us"},
      {"bench" + model + " --shards 1 --arena-spin-us 20000", "--arena-spin-us"},
      {"bench" + model + " --moe-spin-us 50", "--moe-spin-us"},
      {"bench" + model + " --requant-bf16 int3", "--requant-bf16"},
      {"bench" + model + " --shards 1 --requant-bf16 q4_0", "--requant-bf16"},
      {"bench --model /nonexistent.gguf --read-mib 8", "/nonexistent.gguf"},
      {"bench" + model +
           " --read-mib 8 --gen 2 --batch 1 --prompt-len 8 --json /nonexistent/x.json",
       "/nonexistent/x.json"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    const Output o = RunKtxCtl(c.args);
    EXPECT_NE(o.rc, 0);
    EXPECT_THAT(o.err, HasSubstr(c.words));
  }
}

// `ktx-ctl logits` runs the fast experts by default: tier B of the float64
// reference (tests/data/README.md section 6), not tier A's bit-closeness.
TEST(LogitsFastExpertsTest, TierBOfTheFloat64Reference) {
  std::ifstream in(kDataDir + "manifest.json");
  const nlohmann::json m = nlohmann::json::parse(in);
  const auto prompt = m["prompt_tokens"].get<std::vector<int32_t>>();
  std::string ids;
  for (size_t i = 0; i < prompt.size(); ++i) ids += (i ? "," : "") + std::to_string(prompt[i]);
  const std::string out = Temp("logits.f32");
  const Output o = RunKtxCtl("logits --model " + kDataDir +
                             "dsv3-tiny-q4_k_m.gguf --threads 2 --tokens " + ids + " --out " + out);
  ASSERT_EQ(o.rc, 0) << o.err;
  EXPECT_THAT(o.err, HasSubstr("CPU experts ready"));
  const std::string got = ReadFile(out);
  std::remove(out.c_str());
  const std::string want = ReadFile(kDataDir + "dsv3-tiny-q4_k_m.ref64.prompt.logits.f32");
  ASSERT_EQ(got.size(), want.size());
  std::vector<float> a(got.size() / 4), b(want.size() / 4);
  std::memcpy(a.data(), got.data(), got.size());
  std::memcpy(b.data(), want.data(), want.size());
  double diff = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += std::pow(static_cast<double>(a[i]) - b[i], 2);
    ref += std::pow(static_cast<double>(b[i]), 2);
  }
  const double rel = std::sqrt(diff / ref);
  EXPECT_LT(rel, 0.30);  // tier B, q4_k_m
  EXPECT_GT(rel, 1e-4);  // the activations were rounded: not the reference path
}

}  // namespace
}  // namespace ktx::bench
