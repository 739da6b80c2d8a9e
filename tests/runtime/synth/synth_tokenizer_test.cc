// The synthetic vocabulary as a tokenizer: ktx's GGUF tokenizer factory
// (runtime/tokenizer, written independently) accepts the metadata of a
// synthetic model, round-trips text through it, uses the merges, and
// recognises the chat template as DeepSeek-V3's.
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/gguf/gguf.h"
#include "runtime/synth/synth_writer.h"
#include "runtime/tokenizer/tokenizer_gguf.h"

namespace ktx::synth {
namespace {

class SynthTokenizerTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(SynthTokenizerTest, LoadsRoundTripsAndMerges) {
  ConfigOverrides o;
  o.n_vocab = GetParam();
  o.n_layer = 1;
  absl::StatusOr<ModelConfig> config = MakeConfig(Preset::kTiny, o);
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<ModelPlan> plan = PlanModel(*config, Quant::kQ8_0);
  ASSERT_TRUE(plan.ok()) << plan.status();
  absl::StatusOr<std::vector<uint8_t>> bytes = WriteSynthModelToMemory(*plan, {});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> f =
      gguf::GgufFile::FromMemory(bytes->data(), bytes->size(), "synth.gguf");
  ASSERT_TRUE(f.ok()) << f.status();
  absl::StatusOr<tokenizer::Tokenizer> tok = tokenizer::TokenizerFromGguf((*f)->metadata());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(tok->n_vocab(), GetParam());
  EXPECT_EQ(tok->bos_id(), 0);
  EXPECT_EQ(tok->eos_id(), 1);
  EXPECT_TRUE(tok->add_bos());

  const std::vector<std::string> texts = {
      "The river ran past the old mill and under the stone bridge.",
      "  leading spaces, tabs\t and\nnewlines\r\n",
      "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC 12345 \xF0\x9F\x98\x80 don't",
      "",
  };
  for (const std::string& text : texts) {
    absl::StatusOr<std::vector<int32_t>> ids = tok->Tokenize(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    ASSERT_FALSE(ids->empty());
    EXPECT_EQ((*ids)[0], 0);  // BOS
    tokenizer::DetokenizeOptions plain;
    plain.render_special = false;
    absl::StatusOr<std::string> back = tok->Detokenize(*ids, plain);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, text);
  }
  // Merges are used: English text needs far fewer tokens than bytes.
  const std::string english = texts[0];
  absl::StatusOr<std::vector<int32_t>> ids = tok->Tokenize(english);
  ASSERT_TRUE(ids.ok());
  EXPECT_LT(ids->size(), english.size() / 2) << ids->size() << " tokens";
  // The chat tokens are single tokens.
  ids = tok->Tokenize("<｜User｜>hi<｜Assistant｜>");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ((*ids)[1], GetParam() - 4);
  EXPECT_EQ(ids->back(), GetParam() - 3);

  absl::StatusOr<tokenizer::ChatTemplate> tmpl = tokenizer::ChatTemplateFromGguf((*f)->metadata());
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  EXPECT_EQ(tmpl->name(), "deepseek-v3");
}

INSTANTIATE_TEST_SUITE_P(Sizes, SynthTokenizerTest, ::testing::Values(512, 4096, 129280));

}  // namespace
}  // namespace ktx::synth
