// Request validation and translation of the Generation API (served_model.h)
// on the tiny fixture model: every bad field gives INVALID_ARGUMENT with a
// message starting with that field's proto path; good requests become the
// engine request they describe; Tokenize / Detokenize agree with llama.cpp's
// ids for the fixture's tokenizer cases (tests/data/tokenizer_cases.json).
#include "actors/service/served_model.h"

#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/actors/actors_test_util.h"

namespace ktx::service {
namespace {

constexpr int64_t kCtx = 512;

const ServedModel& Model() {
  static const ServedModel model = [] {
    auto m = ServedModel::FromModel(*actors::testing::FixtureModel("q8_0"), kCtx, "deepseek-r1");
    EXPECT_TRUE(m.ok()) << m.status();
    return *m;
  }();
  return model;
}

v1::GenerateRequest Valid() {
  v1::GenerateRequest r;
  r.set_text("Tom found an old map.");
  r.set_max_tokens(8);
  return r;
}

struct BadCase {
  std::string name;
  std::function<void(v1::GenerateRequest*)> edit;
  std::string field;  // the message must start with "<field>: "
  absl::StatusCode code = absl::StatusCode::kInvalidArgument;
};

std::vector<BadCase> BadCases() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  return {
      {"no prompt", [](v1::GenerateRequest* r) { r->clear_prompt(); }, "prompt"},
      {"empty text", [](v1::GenerateRequest* r) { r->set_text(""); }, "text"},
      {"empty tokens", [](v1::GenerateRequest* r) { r->mutable_tokens(); }, "tokens.ids"},
      {"token id too large",
       [](v1::GenerateRequest* r) {
         r->mutable_tokens()->add_ids(5);
         r->mutable_tokens()->add_ids(512);
       },
       "tokens.ids[1]"},
      {"negative token id", [](v1::GenerateRequest* r) { r->mutable_tokens()->add_ids(-1); },
       "tokens.ids[0]"},
      {"prompt longer than the context",
       [](v1::GenerateRequest* r) {
         for (int i = 0; i < kCtx; ++i) r->mutable_tokens()->add_ids(7);
       },
       "prompt"},
      {"max_tokens 0", [](v1::GenerateRequest* r) { r->set_max_tokens(0); }, "max_tokens"},
      {"max_tokens negative", [](v1::GenerateRequest* r) { r->set_max_tokens(-3); }, "max_tokens"},
      {"max_tokens above the context", [](v1::GenerateRequest* r) { r->set_max_tokens(kCtx + 1); },
       "max_tokens"},
      {"unknown model", [](v1::GenerateRequest* r) { r->set_model("gpt-17"); }, "model"},
      {"temperature < 0",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_temperature(-1); },
       "sampling.temperature"},
      {"temperature NaN",
       [=](v1::GenerateRequest* r) { r->mutable_sampling()->set_temperature(nan); },
       "sampling.temperature"},
      {"top_p 0", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_p(0); },
       "sampling.top_p"},
      {"top_p 1.5", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_p(1.5f); },
       "sampling.top_p"},
      {"top_k < 0", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_k(-1); },
       "sampling.top_k"},
      {"min_p > 1", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_min_p(1.01f); },
       "sampling.min_p"},
      {"min_p < 0", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_min_p(-0.1f); },
       "sampling.min_p"},
      {"repetition_penalty 0",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_repetition_penalty(0); },
       "sampling.repetition_penalty"},
      {"repetition_penalty 11",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_repetition_penalty(11); },
       "sampling.repetition_penalty"},
      {"presence_penalty 3",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_presence_penalty(3); },
       "sampling.presence_penalty"},
      {"frequency_penalty -2.5",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_frequency_penalty(-2.5f); },
       "sampling.frequency_penalty"},
      {"penalty_last_n < 0",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_penalty_last_n(-1); },
       "sampling.penalty_last_n"},
      {"too many stop strings",
       [](v1::GenerateRequest* r) {
         for (int i = 0; i < 17; ++i) r->add_stop("s" + std::to_string(i));
       },
       "stop"},
      {"empty stop string", [](v1::GenerateRequest* r) { r->add_stop(""); }, "stop[0]"},
      {"long stop string",
       [](v1::GenerateRequest* r) {
         r->add_stop("ok");
         r->add_stop(std::string(257, 'x'));
       },
       "stop[1]"},
      {"stop token id outside the vocabulary",
       [](v1::GenerateRequest* r) { r->add_stop_token_ids(100000); }, "stop_token_ids[0]"},
      {"too many stop token ids",
       [](v1::GenerateRequest* r) {
         for (int i = 0; i < 65; ++i) r->add_stop_token_ids(i);
       },
       "stop_token_ids"},
      {"chat without messages", [](v1::GenerateRequest* r) { r->mutable_chat(); }, "chat.messages"},
      {"chat role unknown",
       [](v1::GenerateRequest* r) {
         auto* chat = r->mutable_chat();
         auto* m = chat->add_messages();
         m->set_role("user");
         m->set_content("hi");
         m = chat->add_messages();
         m->set_role("tool");
         m->set_content("{}");
       },
       "chat.messages[1].role"},
      {"chat contents all empty",
       [](v1::GenerateRequest* r) { r->mutable_chat()->add_messages()->set_role("user"); },
       "chat.messages"},
      {"parse_special with token ids",
       [](v1::GenerateRequest* r) {
         r->mutable_tokens()->add_ids(5);
         r->set_parse_special(true);
       },
       "parse_special"},
      {"routing_policy not parsable",
       [](v1::GenerateRequest* r) { r->set_routing_policy("top_k=x"); }, "routing_policy"},
      {"routing_policy top_k above the model's",
       [](v1::GenerateRequest* r) { r->set_routing_policy("top_k=5"); }, "routing_policy"},
      {"routing_policy layers outside the model",
       [](v1::GenerateRequest* r) { r->set_routing_policy("layers=3,defer=1"); }, "routing_policy"},
  };
}

TEST(ServedModelTest, FixtureModelInfo) {
  const v1::ModelInfo info = Model().Info();
  EXPECT_EQ(info.name(), "dsv3-tiny");  // general.name of the fixture
  EXPECT_EQ(info.architecture(), "deepseek2");
  EXPECT_EQ(info.context_length(), kCtx);
  EXPECT_EQ(info.n_vocab(), 512);
  EXPECT_EQ(info.n_layer(), 3);
  EXPECT_EQ(info.n_expert(), 16);
  EXPECT_EQ(info.n_expert_used(), 4);
  EXPECT_EQ(info.chat_template(), "deepseek-r1");
  EXPECT_TRUE(info.has_tokenizer());
}

TEST(ServedModelTest, EveryBadFieldIsNamed) {
  ASSERT_TRUE(BuildGenerateRequest(Model(), {}, Valid()).ok());
  for (const BadCase& c : BadCases()) {
    SCOPED_TRACE(c.name);
    v1::GenerateRequest r = Valid();
    c.edit(&r);
    absl::StatusOr<actors::GenerateRequest> out = BuildGenerateRequest(Model(), {}, r);
    ASSERT_FALSE(out.ok());
    EXPECT_EQ(out.status().code(), c.code) << out.status();
    EXPECT_EQ(std::string(out.status().message()).rfind(c.field + ": ", 0), 0u) << out.status();
  }
}

TEST(ServedModelTest, GoodRequestBecomesEngineRequest) {
  v1::GenerateRequest r;
  r.mutable_tokens()->add_ids(0);
  r.mutable_tokens()->add_ids(87);
  r.set_max_tokens(5);
  r.mutable_sampling()->set_temperature(0.5f);
  r.mutable_sampling()->set_top_k(7);
  r.mutable_sampling()->set_top_p(0.9f);
  r.mutable_sampling()->set_min_p(0.1f);
  r.mutable_sampling()->set_repetition_penalty(1.1f);
  r.mutable_sampling()->set_penalty_last_n(9);
  r.mutable_sampling()->set_seed(42);
  r.add_stop("\n\n");
  r.add_stop_token_ids(3);
  r.set_ignore_eos(true);
  auto out = BuildGenerateRequest(Model(), {}, r);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->prompt, (std::vector<int32_t>{0, 87}));
  EXPECT_EQ(out->max_tokens, 5);
  EXPECT_FLOAT_EQ(out->sampling.temperature, 0.5f);
  EXPECT_EQ(out->sampling.top_k, 7);
  EXPECT_FLOAT_EQ(out->sampling.top_p, 0.9f);
  EXPECT_FLOAT_EQ(out->sampling.min_p, 0.1f);
  EXPECT_FLOAT_EQ(out->sampling.repetition_penalty, 1.1f);
  EXPECT_EQ(out->sampling.penalty_last_n, 9);
  EXPECT_EQ(out->sampling.seed, 42u);
  EXPECT_EQ(out->stop_strings, (std::vector<std::string>{"\n\n"}));
  EXPECT_EQ(out->stop_token_ids, (std::vector<int32_t>{3}));
  EXPECT_FALSE(out->stop_at_eos);
  EXPECT_EQ(out->deadline.count(), 0);
  EXPECT_EQ(out->routing_policy, nullptr);  // absent: the node's policy

  // A routing policy travels parsed; "" is the same as absent.
  r.set_routing_policy("mass=0.8,min_k=2;layers=2,defer=1");
  out = BuildGenerateRequest(Model(), {}, r);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_NE(out->routing_policy, nullptr);
  EXPECT_EQ(out->routing_policy->ToString(), "mass=0.8,min_k=2;layers=2,defer=1");
  r.set_routing_policy("");
  out = BuildGenerateRequest(Model(), {}, r);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->routing_policy, nullptr);

  // Absent fields: the sampler's defaults; max_tokens 256 capped by the context.
  v1::GenerateRequest plain;
  for (int i = 0; i < 300; ++i) plain.mutable_tokens()->add_ids(5);
  auto defaults = BuildGenerateRequest(Model(), {}, plain);
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->max_tokens, kCtx - 300);
  const sampler::SamplingParams fresh;
  EXPECT_EQ(defaults->sampling.temperature, fresh.temperature);
  EXPECT_EQ(defaults->sampling.top_p, fresh.top_p);
  EXPECT_EQ(defaults->sampling.penalty_last_n, fresh.penalty_last_n);
  EXPECT_TRUE(defaults->stop_at_eos);
  plain.mutable_tokens()->mutable_ids()->Truncate(10);
  EXPECT_EQ(BuildGenerateRequest(Model(), {}, plain)->max_tokens, 256);
}

TEST(ServedModelTest, TextPromptIsTheFixturePrompt) {
  // The fixture's prompt ids come from llama.cpp (tests/data/manifest.json).
  v1::GenerateRequest r;
  r.set_text(actors::testing::Manifest()["prompt"].get<std::string>());
  auto out = BuildGenerateRequest(Model(), {}, r);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->prompt, actors::testing::PromptTokens());
}

TEST(ServedModelTest, ChatPromptFollowsTheTemplateText) {
  // The rendered text written out by hand from chat_template.h's description.
  v1::ChatPrompt chat;
  auto* m = chat.add_messages();
  m->set_role("system");
  m->set_content("Be brief.");
  m = chat.add_messages();
  m->set_role("user");
  m->set_content("Where is the map?");
  m = chat.add_messages();
  m->set_role("assistant");
  m->set_content("<think>hmm</think>In the attic.");
  m = chat.add_messages();
  m->set_role("user");
  m->set_content("And the island?");
  const tokenizer::Tokenizer& tok = *Model().tokenizer;
  const std::string base =
      "Be brief.<｜User｜>Where is the map?<｜Assistant｜>In the attic.<｜end▁of▁sentence｜>"
      "<｜User｜>And the island?<｜Assistant｜>";
  for (const bool think : {true, false}) {
    SCOPED_TRACE(think ? "force_think" : "no think");
    chat.set_force_think(think);
    auto ids = ChatPromptIds(Model(), {}, chat, "chat");
    ASSERT_TRUE(ids.ok()) << ids.status();
    auto want = tok.Tokenize(base + (think ? "<think>\n" : ""));
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(*ids, *want);
  }
}

TEST(ServedModelTest, TokenizeAndDetokenizeMatchLlamaCpp) {
  std::ifstream in(actors::testing::DataDir() + "tokenizer_cases.json");
  const nlohmann::json cases = nlohmann::json::parse(in)["cases"];
  ASSERT_GE(cases.size(), 20u);
  for (const auto& c : cases) {
    for (const bool parse_special : {true, false}) {
      SCOPED_TRACE(std::string(c["name"]) + (parse_special ? " / parse_special" : ""));
      const auto& ref = c[parse_special ? "parse_special" : "no_parse_special"];
      v1::TokenizeRequest request;
      request.set_text(c["text"].get<std::string>());
      request.set_parse_special(parse_special);
      request.set_return_pieces(true);
      auto tokens = Tokenize(Model(), {}, request);
      ASSERT_TRUE(tokens.ok()) << tokens.status();
      const std::vector<int32_t> ids(tokens->ids().begin(), tokens->ids().end());
      EXPECT_EQ(ids, ref["ids"].get<std::vector<int32_t>>());
      EXPECT_EQ(tokens->pieces_size(), tokens->ids_size());
      for (const bool render_special : {false, true}) {
        v1::DetokenizeRequest back;
        back.mutable_ids()->Assign(ids.begin(), ids.end());
        back.set_render_special(render_special);
        auto text = Detokenize(Model(), back);
        ASSERT_TRUE(text.ok()) << text.status();
        EXPECT_EQ(
            text->text(),
            ref[render_special ? "detokenized" : "detokenized_remove_special"].get<std::string>());
      }
    }
  }
  v1::TokenizeRequest no_bos;
  no_bos.set_text("Hello world");
  no_bos.set_add_special(false);
  auto ids = Tokenize(Model(), {}, no_bos);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(std::vector<int32_t>(ids->ids().begin(), ids->ids().end()),
            (std::vector<int32_t>{75, 409, 392, 337, 393}));  // llama.cpp's, BOS removed
}

TEST(ServedModelTest, TokenizeAndDetokenizeErrorsNameTheField) {
  v1::TokenizeRequest none;
  auto t = Tokenize(Model(), {}, none);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(std::string(t.status().message()).rfind("input: ", 0), 0u) << t.status();

  v1::DetokenizeRequest bad;
  bad.add_ids(4);
  bad.add_ids(512);
  auto d = Detokenize(Model(), bad);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(std::string(d.status().message()).rfind("ids[1]: ", 0), 0u) << d.status();

  v1::DetokenizeRequest wrong_model;
  wrong_model.set_model("other");
  EXPECT_EQ(Detokenize(Model(), wrong_model).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ServedModelTest, WithoutChatTemplateChatIsAPreconditionError) {
  auto plain = ServedModel::FromModel(*actors::testing::FixtureModel("q8_0"), kCtx);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->chat_template.has_value());  // the fixture has no tokenizer.chat_template
  v1::GenerateRequest r;
  auto* m = r.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("hi");
  auto out = BuildGenerateRequest(*plain, {}, r);
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(std::string(out.status().message()).rfind("chat: ", 0), 0u) << out.status();

  auto unknown = ServedModel::FromModel(*actors::testing::FixtureModel("q8_0"), kCtx, "llama-3");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ktx::service
