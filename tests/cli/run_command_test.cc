// ktx-ctl run / logits end to end on the fixture model: the logits file
// against the float64 reference (tier A), greedy text against the reference's
// continuation, and clear errors for bad flags.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/gguf/gguf.h"
#include "runtime/tokenizer/tokenizer_gguf.h"
#include "runtime/tokenizer/utf8.h"
#include "tests/cli/ktx_ctl_runner.h"

namespace ktx::cli {
namespace {

using ::testing::HasSubstr;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

using Output = testing_util::CommandOutput;
using testing_util::RunKtxCtl;
const auto& ReadFile = testing_util::ReadWholeFile;

nlohmann::json Manifest() {
  std::ifstream in(kDataDir + "manifest.json");
  return nlohmann::json::parse(in);
}

std::string Join(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

TEST(RunCommandTest, LogitsFileMatchesFloat64Reference) {
  const nlohmann::json m = Manifest();
  const std::string out = ::testing::TempDir() + "/ktx_logits_" + std::to_string(getpid()) + ".f32";
  const Output o =
      RunKtxCtl("logits --model " + kDataDir +
                "dsv3-tiny-bf16.gguf --experts reference --threads 2 --tokens " +
                Join(m["prompt_tokens"].get<std::vector<int32_t>>()) + " --out " + out);
  ASSERT_EQ(o.rc, 0) << o.err;
  EXPECT_THAT(o.err, HasSubstr("[65, 512]"));
  const std::string got = ReadFile(out);
  const std::string want = ReadFile(kDataDir + "dsv3-tiny-bf16.ref64.prompt.logits.f32");
  ASSERT_EQ(got.size(), 65u * 512u * 4u);
  ASSERT_EQ(want.size(), got.size());
  std::vector<float> a(got.size() / 4), b(want.size() / 4);
  std::memcpy(a.data(), got.data(), got.size());
  std::memcpy(b.data(), want.data(), want.size());
  double diff = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += std::pow(static_cast<double>(a[i]) - b[i], 2);
    ref += std::pow(static_cast<double>(b[i]), 2);
  }
  EXPECT_LT(std::sqrt(diff / ref), 1e-4);
}

TEST(RunCommandTest, GreedyRunPrintsTheReferenceContinuation) {
  const nlohmann::json m = Manifest();
  const std::string model = kDataDir + "dsv3-tiny-q8_0.gguf";
  const Output o =
      RunKtxCtl("run --model " + model + " --prompt '" + m["prompt"].get<std::string>() +
                "' --temperature 0 --max-tokens 32 --threads 2 --experts reference");
  ASSERT_EQ(o.rc, 0) << o.err;
  auto file = gguf::GgufFile::Open(model);
  ASSERT_TRUE(file.ok());
  auto tok = tokenizer::TokenizerFromGguf((*file)->metadata());
  ASSERT_TRUE(tok.ok());
  auto text =
      tok->Detokenize(m["files"]["q8_0"]["ref64_greedy_tokens"].get<std::vector<int32_t>>());
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(o.out, tokenizer::SanitizeUtf8(*text) + "\n");
  EXPECT_THAT(o.err, HasSubstr("prefill: 65 tokens"));
  EXPECT_THAT(o.err, HasSubstr("decode: 32 tokens"));
  EXPECT_THAT(o.err, HasSubstr("tok/s"));
  EXPECT_THAT(o.err, HasSubstr("stop: max_tokens"));
}

TEST(RunCommandTest, BadFlagsGiveClearErrors) {
  const std::string model = " --model " + kDataDir + "dsv3-tiny-q8_0.gguf";
  struct Case {
    std::string args;
    std::string words;
  };
  const std::vector<Case> cases = {
      {"logits" + model + " --tokens 1,x --out /dev/null", "'x'"},
      {"logits" + model + " --tokens '' --out /dev/null", "--tokens"},
      {"logits" + model + " --tokens 0,600 --out /dev/null", "600"},
      {"logits" + model + " --tokens 0,1 --out /nonexistent-dir/x.f32", "/nonexistent-dir/x.f32"},
      {"logits --model /nonexistent.gguf --tokens 0 --out /dev/null", "/nonexistent.gguf"},
      {"run" + model + " --prompt hi --max-tokens 0", "--max-tokens"},
      {"run" + model + " --prompt hi --temperature -1", "temperature"},
      {"run" + model + " --prompt hi --top-p 2", "top_p"},
      {"run" + model + " --prompt hi --threads -2", "--threads"},
      {"run" + model + " --prompt hi --system x", "--chat"},
      {"run" + model + " --prompt hi --chat", "chat template"},
      {"run" + model + " --prompt hi --stop ''", "stop"},
      {"run" + model + " --prompt hi --ctx-size 2", "context"},
      {"run" + model + " --prompt hi --no-such-flag", "no-such-flag"},
      {"run --prompt hi", "--model"},
      {"run" + model + " --prompt hi --experts slow", "--experts"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    const Output o = RunKtxCtl(c.args);
    EXPECT_NE(o.rc, 0);
    EXPECT_THAT(o.err, HasSubstr(c.words));
  }
}

}  // namespace
}  // namespace ktx::cli
