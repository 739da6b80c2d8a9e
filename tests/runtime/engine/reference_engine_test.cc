// The reference engine on the fixture model: the prompt text tokenizes to the
// fixture's ids, greedy generation from text reproduces the float64
// reference's continuation, the Logits API matches the float64 logits (tier
// A), and the stop conditions (EOS, max tokens, stop strings, context,
// cancellation) and errors behave as documented.
#include "runtime/engine/reference_engine.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/gguf/gguf.h"
#include "runtime/gguf/gguf_writer.h"
#include "runtime/tokenizer/utf8.h"

namespace ktx::engine {
namespace {

using ::testing::HasSubstr;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

const nlohmann::json& Manifest() {
  static const nlohmann::json* m = [] {
    std::ifstream in(kDataDir + "manifest.json");
    return new nlohmann::json(nlohmann::json::parse(in));
  }();
  return *m;
}

std::vector<float> LoadF32(const std::string& name) {
  std::ifstream in(kDataDir + name, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

GenerateRequest Greedy(int32_t max_tokens) {
  GenerateRequest r;
  r.prompt = Manifest()["prompt"].get<std::string>();
  r.max_tokens = max_tokens;
  r.sampling.temperature = 0.0f;
  return r;
}

class ReferenceEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    EngineOptions options;
    options.n_ctx = 256;
    auto engine = ReferenceEngine::Open(kDataDir + "dsv3-tiny-q8_0.gguf", options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
  }
  std::vector<int32_t> Ref64Greedy() const {
    return Manifest()["files"]["q8_0"]["ref64_greedy_tokens"].get<std::vector<int32_t>>();
  }
  std::unique_ptr<ReferenceEngine> engine_;
};

TEST_F(ReferenceEngineTest, PromptTextTokenizesToTheFixtureIds) {
  auto ids = engine_->TokenizePrompt(Greedy(1));
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, Manifest()["prompt_tokens"].get<std::vector<int32_t>>());
}

// From the prompt TEXT to 32 greedy tokens: the float64 reference's own
// continuation; the streamed text is the detokenized continuation.
TEST_F(ReferenceEngineTest, GreedyGenerationFromTextMatchesFloat64Reference) {
  std::string streamed;
  int pieces = 0;
  auto result = engine_->Generate(Greedy(32), [&](std::string_view text) {
    EXPECT_FALSE(text.empty());
    EXPECT_TRUE(tokenizer::IsValidUtf8(text));
    streamed.append(text);
    ++pieces;
    return true;
  });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->tokens, Ref64Greedy());
  EXPECT_EQ(result->stop_reason, StopReason::kMaxTokens);
  EXPECT_EQ(result->prompt_tokens.size(), 65u);
  EXPECT_EQ(result->n_decode_passes, 31);
  EXPECT_GT(pieces, 1);
  EXPECT_EQ(streamed, result->text);
  auto tok = engine_->tokenizer();
  ASSERT_TRUE(tok.ok());
  auto full = (*tok)->Detokenize(result->tokens);
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(streamed, tokenizer::SanitizeUtf8(*full));
  EXPECT_GT(result->prefill_tok_s(), 0.0);
  EXPECT_GT(result->decode_tok_s(), 0.0);
}

TEST_F(ReferenceEngineTest, ChunkedPrefillGivesTheSameTokens) {
  EngineOptions options;
  options.n_ctx = 256;
  options.prefill_chunk = 7;
  auto engine = ReferenceEngine::Open(kDataDir + "dsv3-tiny-q8_0.gguf", options);
  ASSERT_TRUE(engine.ok());
  auto result = (*engine)->Generate(Greedy(8), {});
  ASSERT_TRUE(result.ok()) << result.status();
  const std::vector<int32_t> want = Ref64Greedy();
  EXPECT_EQ(result->tokens, std::vector<int32_t>(want.begin(), want.begin() + 8));
}

TEST_F(ReferenceEngineTest, LogitsOfEveryPositionMatchFloat64Reference) {
  const auto& files = Manifest()["files"]["q8_0"];
  std::vector<int32_t> tokens = Manifest()["prompt_tokens"].get<std::vector<int32_t>>();
  const auto gen = files["llama_greedy_tokens"].get<std::vector<int32_t>>();
  tokens.insert(tokens.end(), gen.begin(), gen.end());
  auto logits = engine_->Logits(tokens);
  ASSERT_TRUE(logits.ok()) << logits.status();
  std::vector<float> want = LoadF32(files["ref64_prompt_logits"]["file"]);
  const std::vector<float> want_gen = LoadF32(files["ref64_gen_logits"]["file"]);
  want.insert(want.end(), want_gen.begin(), want_gen.end());
  ASSERT_EQ(logits->size(), tokens.size() * 512);
  ASSERT_EQ(want.size(), logits->size());
  double diff = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += std::pow(static_cast<double>((*logits)[i]) - want[i], 2);
    ref += std::pow(static_cast<double>(want[i]), 2);
  }
  EXPECT_LT(std::sqrt(diff / ref), 1e-4);
  EXPECT_FALSE(engine_->Logits({}).ok());
  const std::vector<int32_t> bad = {0, 9999};
  EXPECT_EQ(engine_->Logits(bad).status().code(), absl::StatusCode::kOutOfRange);
}

TEST_F(ReferenceEngineTest, StopStringEndsTheTextBeforeIt) {
  auto full = engine_->Generate(Greedy(32), {});
  ASSERT_TRUE(full.ok());
  // A stop string from the middle of the greedy text.
  const std::string& text = full->text;
  ASSERT_GT(text.size(), 20u);
  const std::string stop = text.substr(10, 3);
  const size_t first = text.find(stop);
  GenerateRequest request = Greedy(32);
  request.stop = {"never appears \x01", stop};
  std::string streamed;
  auto result = engine_->Generate(request, [&](std::string_view t) {
    streamed.append(t);
    return true;
  });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->stop_reason, StopReason::kStopString);
  EXPECT_EQ(streamed, text.substr(0, first));
  EXPECT_EQ(result->text, streamed);
  EXPECT_LT(result->tokens.size(), 32u);
}

TEST_F(ReferenceEngineTest, MaxTokensContextAndCancellation) {
  auto five = engine_->Generate(Greedy(5), {});
  ASSERT_TRUE(five.ok());
  EXPECT_EQ(five->tokens.size(), 5u);
  EXPECT_EQ(five->stop_reason, StopReason::kMaxTokens);

  EngineOptions options;
  options.n_ctx = 68;  // the prompt (65) + 3
  auto small = ReferenceEngine::Open(kDataDir + "dsv3-tiny-q8_0.gguf", options);
  ASSERT_TRUE(small.ok());
  auto ctx = (*small)->Generate(Greedy(32), {});
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  EXPECT_EQ(ctx->stop_reason, StopReason::kContextFull);
  EXPECT_EQ(ctx->tokens.size(), 4u);  // 3 fed back, the 4th sampled from the last logits
  options.n_ctx = 65;
  small = ReferenceEngine::Open(kDataDir + "dsv3-tiny-q8_0.gguf", options);
  ASSERT_TRUE(small.ok());
  auto too_long = (*small)->Generate(Greedy(32), {});
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(too_long.status().message()), HasSubstr("65 tokens"));

  int calls = 0;
  auto cancelled = engine_->Generate(Greedy(32), [&](std::string_view) { return ++calls < 2; });
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(cancelled->stop_reason, StopReason::kCancelled);
  EXPECT_EQ(calls, 2);
}

// A copy of the fixture whose EOS id is the 4th greedy token: generation stops
// there, and the EOS token's text is not emitted.
TEST_F(ReferenceEngineTest, StopsAtEndOfGeneration) {
  auto file = gguf::GgufFile::Open(kDataDir + "dsv3-tiny-q8_0.gguf");
  ASSERT_TRUE(file.ok());
  gguf::GgufWriter w;
  ASSERT_TRUE(w.CopyMetadata((*file)->metadata()).ok());
  const std::vector<int32_t> greedy = Ref64Greedy();
  w.SetU32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(greedy[3]));
  for (const gguf::TensorInfo& t : (*file)->tensors()) {
    ASSERT_TRUE(
        w.AddTensor(t.name, t.ne, t.type, std::vector<uint8_t>(t.data, t.data + t.n_bytes)).ok());
  }
  auto image = w.WriteToMemory();
  ASSERT_TRUE(image.ok());
  auto edited = gguf::GgufFile::FromMemory(image->data(), image->size(), "eos.gguf");
  ASSERT_TRUE(edited.ok()) << edited.status();
  auto model = models::Deepseek2Model::Load(std::move(*edited));
  ASSERT_TRUE(model.ok()) << model.status();
  auto engine = ReferenceEngine::Create(std::move(*model), EngineOptions{});
  ASSERT_TRUE(engine.ok());
  auto result = (*engine)->Generate(Greedy(32), {});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->stop_reason, StopReason::kEndOfGeneration);
  EXPECT_EQ(result->tokens, std::vector<int32_t>(greedy.begin(), greedy.begin() + 4));
  auto tok = (*engine)->tokenizer();
  auto three = (*tok)->Detokenize(std::vector<int32_t>(greedy.begin(), greedy.begin() + 3));
  EXPECT_EQ(result->text, tokenizer::SanitizeUtf8(*three));
}

TEST_F(ReferenceEngineTest, ChatNeedsATemplate) {
  GenerateRequest request = Greedy(2);
  request.chat = true;
  request.system = "Be brief.";
  // The fixture has no tokenizer.chat_template.
  auto result = engine_->Generate(request, {});
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("chat template"));

  // Named explicitly, it renders: BOS, system text, then the role markers
  // (plain bytes in this tiny vocabulary) around the prompt.
  EngineOptions options;
  options.chat_template = "deepseek-v3";
  auto engine = ReferenceEngine::Open(kDataDir + "dsv3-tiny-q8_0.gguf", options);
  ASSERT_TRUE(engine.ok());
  auto ids = (*engine)->TokenizePrompt(request);
  ASSERT_TRUE(ids.ok()) << ids.status();
  auto tok = (*engine)->tokenizer();
  auto text = (*tok)->Detokenize(*ids);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, std::string(tokenizer::kDeepSeekBos) + "Be brief." +
                       std::string(tokenizer::kDeepSeekUser) + request.prompt +
                       std::string(tokenizer::kDeepSeekAssistant));
  EXPECT_TRUE((*engine)->Generate(request, {}).ok());

  // A system message without chat mode is an error.
  GenerateRequest raw = Greedy(2);
  raw.system = "x";
  EXPECT_FALSE(engine_->Generate(raw, {}).ok());
}

TEST_F(ReferenceEngineTest, ForceThinkOpensTheR1Answer) {
  EngineOptions options;
  options.chat_template = "deepseek-r1";
  auto engine = ReferenceEngine::Open(kDataDir + "dsv3-tiny-q8_0.gguf", options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto tok = (*engine)->tokenizer();
  ASSERT_TRUE(tok.ok());
  GenerateRequest request = Greedy(2);
  request.chat = true;
  const std::string head = std::string(tokenizer::kDeepSeekBos) +
                           std::string(tokenizer::kDeepSeekUser) + request.prompt +
                           std::string(tokenizer::kDeepSeekAssistant);
  for (const bool think : {true, false}) {
    request.force_think = think;
    auto ids = (*engine)->TokenizePrompt(request);
    ASSERT_TRUE(ids.ok()) << ids.status();
    auto text = (*tok)->Detokenize(*ids);
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(*text, head + (think ? "<think>\n" : "")) << "force_think=" << think;
  }
  // force_think without chat mode is an error that names it.
  GenerateRequest raw = Greedy(2);
  raw.force_think = true;
  auto ids = (*engine)->TokenizePrompt(raw);
  ASSERT_FALSE(ids.ok());
  EXPECT_THAT(std::string(ids.status().message()), HasSubstr("force_think"));
}

TEST_F(ReferenceEngineTest, BadRequests) {
  GenerateRequest request = Greedy(0);
  EXPECT_THAT(std::string(engine_->Generate(request, {}).status().message()),
              HasSubstr("max_tokens"));
  request = Greedy(4);
  request.sampling.top_p = 1.5f;
  EXPECT_THAT(std::string(engine_->Generate(request, {}).status().message()), HasSubstr("top_p"));
  request = Greedy(4);
  request.stop = {""};
  EXPECT_FALSE(engine_->Generate(request, {}).ok());
  EngineOptions options;
  options.prefill_chunk = -1;
  EXPECT_FALSE(ReferenceEngine::Open(kDataDir + "dsv3-tiny-q8_0.gguf", options).ok());
}

// Sampling with a seed is reproducible.
TEST_F(ReferenceEngineTest, SeededSamplingIsReproducible) {
  GenerateRequest request = Greedy(12);
  request.sampling.temperature = 0.8f;
  request.sampling.top_k = 40;
  request.sampling.seed = 1234;
  auto a = engine_->Generate(request, {});
  auto b = engine_->Generate(request, {});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_EQ(a->tokens.size(), 12u);
}

}  // namespace
}  // namespace ktx::engine
