// EngineOptions::attention_device without a GPU (CI): bad strings fail with
// InvalidArgument naming the option, "cuda:N" fails with FailedPrecondition
// in a build without CUDA (or, in a CUDA build on a machine without a usable
// GPU, with the device error), always before any work is done; "cpu" and ""
// run the CPU attention actor. The GPU itself is tested in
// gpu_attention_test (label cuda).
#include <string>

#include "actors/engine.h"
#include "actors/gpu_attention_actor.h"
#include "gtest/gtest.h"
#include "kernels/cuda/device_query.h"
#include "tests/actors/actors_test_util.h"

namespace ktx::actors {
namespace {

using testing::FixtureModel;

bool HasSubstr(const absl::Status& s, const std::string& part) {
  return std::string(s.message()).find(part) != std::string::npos;
}

TEST(AttentionDeviceTest, ParseAcceptsCpuAndCudaN) {
  auto cpu = ParseAttentionDevice("cpu", "--attention-device");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ(*cpu, -1);
  auto empty = ParseAttentionDevice("", "--attention-device");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, -1);
  auto zero = ParseAttentionDevice("cuda:0", "--attention-device");
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(*zero, 0);
  auto seven = ParseAttentionDevice("cuda:7", "--attention-device");
  ASSERT_TRUE(seven.ok());
  EXPECT_EQ(*seven, 7);
}

TEST(AttentionDeviceTest, ParseRejectsBadStringsNamingTheOption) {
  for (const char* bad :
       {"cuda:x", "tpu", "cuda:", "cuda:-1", "cuda", "CUDA:0", "cuda:0 ", "gpu0", "cuda:123456"}) {
    auto parsed = ParseAttentionDevice(bad, "--attention-device");
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_TRUE(HasSubstr(parsed.status(), "--attention-device")) << parsed.status();
    EXPECT_TRUE(HasSubstr(parsed.status(), std::string("\"") + bad + "\"")) << parsed.status();
    EXPECT_TRUE(HasSubstr(parsed.status(), "cuda:N")) << parsed.status();
  }
}

TEST(AttentionDeviceTest, EngineRejectsBadStringsNamingTheOption) {
  auto model = FixtureModel("q8_0");
  ASSERT_NE(model, nullptr);
  for (const char* bad : {"cuda:x", "tpu"}) {
    EngineOptions options;
    options.attention_device = bad;
    auto engine = Engine::Create(model, options);
    ASSERT_FALSE(engine.ok()) << bad;
    EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument) << engine.status();
    EXPECT_TRUE(HasSubstr(engine.status(), "attention_device")) << engine.status();
    EXPECT_TRUE(HasSubstr(engine.status(), bad)) << engine.status();
  }
}

TEST(AttentionDeviceTest, CudaDeviceWithoutCudaBuildOrGpuFailsClearly) {
  auto model = FixtureModel("q8_0");
  ASSERT_NE(model, nullptr);
  std::string note;
  const bool has_gpu = !kernels::QueryCudaDevices(&note).empty();
  if (GpuAttentionAvailable() && has_gpu) {
    GTEST_SKIP() << "this machine has a usable GPU: gpu_attention_test covers cuda:N";
  }
  EngineOptions options;
  options.attention_device = "cuda:0";
  auto engine = Engine::Create(model, options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kFailedPrecondition) << engine.status();
  EXPECT_TRUE(HasSubstr(engine.status(), "attention_device \"cuda:0\"")) << engine.status();
  if (!GpuAttentionAvailable()) {
    EXPECT_TRUE(HasSubstr(engine.status(), "ktx was built without CUDA")) << engine.status();
    EXPECT_TRUE(HasSubstr(engine.status(), "--attention-device cpu")) << engine.status();
  }
  std::printf("[ measured ] cuda:0 here: %s\n", std::string(engine.status().message()).c_str());
}

// Hot experts on the GPU need the GPU attention actor: with attention on the
// CPU the option fails before anything is loaded, naming it.
TEST(AttentionDeviceTest, GpuHotExpertsNeedGpuAttention) {
  auto model = FixtureModel("q8_0");
  ASSERT_NE(model, nullptr);
  EngineOptions options;
  options.attention_device = "cpu";
  options.gpu_hot_experts_bytes = uint64_t{1} << 20;
  auto engine = Engine::Create(model, options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument) << engine.status();
  EXPECT_TRUE(HasSubstr(engine.status(), "gpu_hot_experts_bytes")) << engine.status();
  EXPECT_TRUE(HasSubstr(engine.status(), "cuda:N")) << engine.status();
}

TEST(AttentionDeviceTest, CpuStillServes) {
  auto model = FixtureModel("q8_0");
  ASSERT_NE(model, nullptr);
  EngineOptions options;
  options.attention_device = "cpu";
  auto engine = Engine::Create(model, options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->attention_device(), "cpu");
  EXPECT_FALSE((*engine)->gpu_memory_plan().has_value());
  GenerateRequest request;
  request.prompt = testing::PromptTokens();
  request.prompt.resize(8);
  request.sampling.temperature = 0.0f;
  request.max_tokens = 2;
  request.stop_at_eos = false;
  auto result = (*engine)->Generate(request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->tokens.size(), 2u);
}

}  // namespace
}  // namespace ktx::actors
