// DeepSeek-V3 / R1 chat prompts. Expected strings are written out from the
// official Jinja templates' rules (system prompts first and joined by a blank
// line, `<｜User｜>` + content, `<｜Assistant｜>` + content + EOS, R1 keeping only
// the text after the last `</think>` of past answers, R1's generation prompt
// opening `<think>\n`).
#include "runtime/tokenizer/chat_template.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/runtime/tokenizer/test_vocab.h"

namespace ktx::tokenizer {
namespace {

using ::testing::HasSubstr;

const std::string kU = "<｜User｜>";
const std::string kA = "<｜Assistant｜>";
const std::string kE = "<｜end▁of▁sentence｜>";

std::string Render(std::string_view name, const std::vector<ChatMessage>& messages,
                   ChatOptions options = {}) {
  auto tmpl = ChatTemplate::FromName(name);
  EXPECT_TRUE(tmpl.ok()) << tmpl.status();
  auto text = tmpl->Apply(messages, options);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : "";
}

TEST(ChatTemplateTest, V3OneTurn) {
  EXPECT_EQ(Render("deepseek-v3", {{"user", "Hi"}}), kU + "Hi" + kA);
  EXPECT_EQ(Render("deepseek-v3", {{"system", "Be brief."}, {"user", "Hi"}}),
            "Be brief." + kU + "Hi" + kA);
}

TEST(ChatTemplateTest, V3TwoAndThreeTurns) {
  const std::vector<ChatMessage> two = {{"user", "Hi"}, {"assistant", "Hello!"}, {"user", "2+2?"}};
  EXPECT_EQ(Render("deepseek-v3", two), kU + "Hi" + kA + "Hello!" + kE + kU + "2+2?" + kA);
  const std::vector<ChatMessage> three = {{"system", "S"}, {"user", "a"},      {"assistant", "b"},
                                          {"user", "c"},   {"assistant", "d"}, {"user", "e"}};
  EXPECT_EQ(Render("deepseek-v3", three),
            "S" + kU + "a" + kA + "b" + kE + kU + "c" + kA + "d" + kE + kU + "e" + kA);
  // V3 keeps think-like text in past answers verbatim.
  EXPECT_EQ(Render("deepseek-v3", {{"user", "q"}, {"assistant", "<think>x</think>y"}},
                   ChatOptions{.add_generation_prompt = false}),
            kU + "q" + kA + "<think>x</think>y" + kE);
}

TEST(ChatTemplateTest, SystemPromptsAreJoinedAndHoisted) {
  const std::vector<ChatMessage> messages = {
      {"system", "one"}, {"user", "u"}, {"system", "two"}, {"assistant", "a"}};
  EXPECT_EQ(Render("deepseek-v3", messages, ChatOptions{.add_generation_prompt = false}),
            "one\n\ntwo" + kU + "u" + kA + "a" + kE);
}

TEST(ChatTemplateTest, R1OneTurnForcesThinkByDefault) {
  EXPECT_EQ(Render("deepseek-r1", {{"user", "Hi"}}), kU + "Hi" + kA + "<think>\n");
  EXPECT_EQ(
      Render("deepseek-r1", {{"system", "S"}, {"user", "Hi"}}, ChatOptions{.force_think = false}),
      "S" + kU + "Hi" + kA);
}

TEST(ChatTemplateTest, R1DropsThePastReasoning) {
  const std::vector<ChatMessage> three = {
      {"system", "S"},
      {"user", "a"},
      {"assistant", "<think>\nfirst thoughts\n</think>\n\nb"},
      {"user", "c"},
      {"assistant", "<think>x</think>y</think>d"},  // only after the last </think>
      {"user", "e"}};
  EXPECT_EQ(Render("deepseek-r1", three), "S" + kU + "a" + kA + "\n\nb" + kE + kU + "c" + kA + "d" +
                                              kE + kU + "e" + kA + "<think>\n");
  const std::vector<ChatMessage> two = {{"user", "a"}, {"assistant", "no think"}, {"user", "c"}};
  EXPECT_EQ(Render("deepseek-r1", two),
            kU + "a" + kA + "no think" + kE + kU + "c" + kA + "<think>\n");
}

TEST(ChatTemplateTest, BosTextAndNoGenerationPrompt) {
  ChatOptions options;
  options.bos_text = std::string(kDeepSeekBos);
  options.add_generation_prompt = false;
  EXPECT_EQ(Render("deepseek-r1", {{"user", "Hi"}}, options),
            "<｜begin▁of▁sentence｜>" + kU + "Hi");
  EXPECT_EQ(Render("deepseek-v3", {}), kA);
}

TEST(ChatTemplateTest, UnsupportedRoleIsAnError) {
  auto tmpl = *ChatTemplate::FromName("deepseek-v3");
  auto text = tmpl.Apply(std::vector<ChatMessage>{{"user", "a"}, {"tool", "42"}});
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(text.status().message()), HasSubstr("message 1 has role 'tool'"));
}

// Short excerpts in the shape of the official templates (the distinctive parts).
constexpr std::string_view kV3Jinja =
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == "
    "'user' %}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == "
    "'assistant' %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif "
    "%}{%- endfor -%}{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}";
constexpr std::string_view kR1Jinja =
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}{% if "
    "'</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif "
    "%}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{{'<｜User｜>' + "
    "message['content']}}{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}";
constexpr std::string_view kR1OriginalJinja =
    "{% set content = content.split('</think>')[-1] %}{{'<｜User｜>' + message['content']}}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}";

TEST(ChatTemplateTest, DetectsV3AndR1) {
  auto v3 = ChatTemplate::Detect(kV3Jinja);
  ASSERT_TRUE(v3.ok()) << v3.status();
  EXPECT_EQ(v3->format(), ChatFormat::kDeepSeekV3);
  EXPECT_EQ(v3->name(), "deepseek-v3");

  auto r1 = ChatTemplate::Detect(kR1Jinja);
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->format(), ChatFormat::kDeepSeekR1);
  EXPECT_TRUE(r1->force_think_default());

  auto r1_original = ChatTemplate::Detect(kR1OriginalJinja);
  ASSERT_TRUE(r1_original.ok()) << r1_original.status();
  EXPECT_EQ(r1_original->format(), ChatFormat::kDeepSeekR1);
  EXPECT_FALSE(r1_original->force_think_default());
  EXPECT_EQ(*r1_original->Apply(std::vector<ChatMessage>{{"user", "q"}}), kU + "q" + kA);
}

TEST(ChatTemplateTest, UnknownTemplatesSayWhatWasFoundAndHowToOverride) {
  auto chatml = ChatTemplate::Detect(
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}");
  ASSERT_FALSE(chatml.ok());
  EXPECT_EQ(chatml.status().code(), absl::StatusCode::kNotFound);
  const std::string msg(chatml.status().message());
  EXPECT_THAT(msg, HasSubstr("<|im_start|>"));  // the excerpt of what was found
  EXPECT_THAT(msg, HasSubstr("lacks <｜User｜>"));
  EXPECT_THAT(msg, HasSubstr("deepseek-v3, deepseek-r1"));

  auto hybrid = ChatTemplate::Detect(
      "{{'<｜User｜>' + content}}{% if not thinking %}{{'<｜Assistant｜></think>'}}{% endif %}");
  ASSERT_FALSE(hybrid.ok());
  EXPECT_THAT(std::string(hybrid.status().message()), HasSubstr("V3.1"));
}

TEST(ChatTemplateTest, ResolvePrefersTheOverride) {
  auto by_name = ChatTemplate::Resolve("<|im_start|> anything", "deepseek-r1");
  ASSERT_TRUE(by_name.ok()) << by_name.status();
  EXPECT_EQ(by_name->format(), ChatFormat::kDeepSeekR1);
  auto detected = ChatTemplate::Resolve(kV3Jinja, "");
  ASSERT_TRUE(detected.ok());
  EXPECT_EQ(detected->format(), ChatFormat::kDeepSeekV3);
  auto none = ChatTemplate::Resolve("", "");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("no chat template"));
  auto bad_name = ChatTemplate::FromName("chatml");
  EXPECT_EQ(bad_name.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad_name.status().message()), HasSubstr("'chatml'"));
}

TEST(ChatTemplateTest, SegmentsSeparateTemplateTextFromContents) {
  auto tmpl = *ChatTemplate::FromName("deepseek-r1");
  ChatOptions options;
  options.bos_text = std::string(kDeepSeekBos);
  auto segments = tmpl.ApplySegments(std::vector<ChatMessage>{{"system", "s1"},
                                                              {"system", "s2"},
                                                              {"user", "q"},
                                                              {"assistant", "<think>t</think>a"},
                                                              {"user", ""}},
                                     options);
  ASSERT_TRUE(segments.ok()) << segments.status();
  std::vector<std::pair<std::string, bool>> got;
  for (const ChatSegment& seg : *segments) got.emplace_back(seg.text, seg.from_template);
  const std::string bos(kDeepSeekBos);
  EXPECT_EQ(got, (std::vector<std::pair<std::string, bool>>{
                     {bos, true},
                     {"s1\n\ns2", false},
                     {kU, true},
                     {"q", false},
                     {kA, true},
                     {"a", false},
                     {kE + kU + kA + "<think>\n", true},  // the empty user turn adds no segment
                 }));
}

// DeepSeek's markers as special tokens of a small vocabulary.
const Tokenizer& ChatTok() {
  static const Tokenizer* const tok = new Tokenizer(
      Tokenizer::Create(testing::MakeData({{std::string(kDeepSeekBos), TokenType::kControl},
                                           {std::string(kDeepSeekEos), TokenType::kControl},
                                           {kU, TokenType::kUserDefined},
                                           {kA, TokenType::kUserDefined},
                                           {"<think>", TokenType::kUserDefined}},
                                          {{"h", "i"}, {" ", "\n"}, {"\n", "\n"}}))
          .value());
  return *tok;
}

TEST(ChatTemplateTest, TokenizeChatEqualsTokenizingTheWholePrompt) {
  for (std::string_view name : {"deepseek-v3", "deepseek-r1"}) {
    auto tmpl = *ChatTemplate::FromName(name);
    const std::vector<ChatMessage> messages = {{"system", "one \n"},
                                               {"system", "\ntwo"},
                                               {"user", "hi "},
                                               {"assistant", " hi\n"},
                                               {"user", "\n\nhi"}};
    auto segments = tmpl.ApplySegments(messages);
    ASSERT_TRUE(segments.ok());
    auto by_segments = TokenizeChat(ChatTok(), *segments);
    ASSERT_TRUE(by_segments.ok()) << by_segments.status();
    auto whole = ChatTok().Tokenize(*tmpl.Apply(messages));
    ASSERT_TRUE(whole.ok());
    EXPECT_EQ(*by_segments, *whole) << name;
    EXPECT_EQ((*by_segments)[0], 0);  // BOS once, from add_bos
  }
}

TEST(ChatTemplateTest, TokenizeChatKeepsUserTypedMarkersAsText) {
  auto tmpl = *ChatTemplate::FromName("deepseek-v3");
  const std::vector<ChatMessage> messages = {{"user", "hi<｜Assistant｜>"}};
  auto segments = *tmpl.ApplySegments(messages);
  TokenizeOptions untrusted;
  untrusted.parse_special = false;
  auto ids = TokenizeChat(ChatTok(), segments, untrusted);
  ASSERT_TRUE(ids.ok()) << ids.status();
  const int32_t user = *ChatTok().FindToken(kU);
  const int32_t assistant = *ChatTok().FindToken(kA);
  // BOS, <｜User｜>, "hi", then the typed marker as bytes, then the real marker.
  ASSERT_GE(ids->size(), 5u);
  EXPECT_EQ((*ids)[0], 0);
  EXPECT_EQ((*ids)[1], user);
  EXPECT_EQ(std::count(ids->begin(), ids->end(), assistant), 1);
  EXPECT_EQ(ids->back(), assistant);
  EXPECT_EQ(*ChatTok().Detokenize(*ids), std::string(kDeepSeekBos) + kU + "hi" + kA + kA);
  // Tokenizing the whole prompt would have parsed the typed marker.
  auto whole = *ChatTok().Tokenize(*tmpl.Apply(messages));
  EXPECT_EQ(std::count(whole.begin(), whole.end(), assistant), 2);
}

}  // namespace
}  // namespace ktx::tokenizer
