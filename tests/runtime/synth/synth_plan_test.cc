// The synthetic model's tensor table against references ktx did not compute:
// the per-tensor types and totals that llama.cpp's quantizer gives for the
// full DeepSeek-V3 shape (../shared/notes/GGUF.md section 5, typed in below as
// explicit layer lists), and the tensor tables of the golden fixtures in
// tests/data (made by llama.cpp's converter and llama-quantize).
#include "runtime/synth/synth_plan.h"

#include <cmath>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/gguf/gguf.h"

namespace ktx::synth {
namespace {

using kernels::TensorType;
using ::testing::HasSubstr;

ModelPlan Plan(Preset preset, Quant quant, const ConfigOverrides& o = {}) {
  absl::StatusOr<ModelConfig> config = MakeConfig(preset, o);
  EXPECT_TRUE(config.ok()) << config.status();
  absl::StatusOr<ModelPlan> plan = PlanModel(*config, quant);
  EXPECT_TRUE(plan.ok()) << plan.status();
  return *std::move(plan);
}

// "blk.12.ffn_down_exps.weight" -> {12, "ffn_down_exps.weight"}.
std::pair<int, std::string> SplitName(const std::string& name) {
  if (name.rfind("blk.", 0) != 0) return {-1, name};
  const size_t dot = name.find('.', 4);
  return {std::stoi(name.substr(4, dot - 4)), name.substr(dot + 1)};
}

// GGUF.md section 5, table "Result for the full DeepSeek-V3 shape", as data.
TensorType NoteQ4KMType(const std::string& name) {
  const auto [il, base] = SplitName(name);
  if (base == "token_embd.weight") return TensorType::kQ4_K;
  if (base == "output.weight") return TensorType::kQ6_K;
  if (base.find("norm") != std::string::npos || base == "ffn_gate_inp.weight" ||
      base == "exp_probs_b.bias") {
    return TensorType::kF32;
  }
  if (base == "attn_k_b.weight") return TensorType::kQ5_0;
  if (base == "ffn_down.weight") return TensorType::kQ6_K;  // dense layers 0-2
  if (base == "ffn_down_exps.weight" || base == "ffn_down_shexp.weight") {
    // q6_K [3-6, 9, 12, ..., 51 (every 3rd), 53-60]; q4_K otherwise.
    std::set<int> q6 = {3, 4, 5, 6, 53, 54, 55, 56, 57, 58, 59, 60};
    for (int i = 9; i <= 51; i += 3) q6.insert(i);
    return q6.count(il) ? TensorType::kQ6_K : TensorType::kQ4_K;
  }
  return TensorType::kQ4_K;
}

TEST(SynthPlanTest, Dsv3Q4KMMatchesLlamaQuantizeTable) {
  const ModelPlan plan = Plan(Preset::kDsv3, Quant::kQ4_K_M);
  EXPECT_EQ(plan.tensors.size(), 1086u);  // 2 + 1 + 61 * 10 + 3 * 3 + 58 * 8
  std::set<std::string> names;
  for (const TensorPlan& t : plan.tensors) {
    names.insert(t.name);
    EXPECT_EQ(t.type, NoteQ4KMType(t.name)) << t.name << " is " << kernels::TraitsOf(t.type).name;
  }
  EXPECT_EQ(names.size(), plan.tensors.size());
  // Spot checks of the list of layers with Q6_K down projections.
  EXPECT_EQ(plan.Find("blk.7.ffn_down_exps.weight")->type, TensorType::kQ4_K);
  EXPECT_EQ(plan.Find("blk.9.ffn_down_shexp.weight")->type, TensorType::kQ6_K);
  EXPECT_EQ(plan.Find("blk.52.ffn_down_exps.weight")->type, TensorType::kQ4_K);
  EXPECT_EQ(plan.Find("blk.53.ffn_down_exps.weight")->type, TensorType::kQ6_K);
  EXPECT_EQ(plan.Find("blk.2.ffn_down.weight")->type, TensorType::kQ6_K);
  // "Total 385,750.62 MiB = 376.7 GiB (4.82 bpw)".
  const double mib = static_cast<double>(plan.total_bytes()) / (1 << 20);
  EXPECT_NEAR(mib, 385750.62, 0.00501);  // the note rounds to 2 decimals
  const double gib = static_cast<double>(plan.total_bytes()) / (1 << 30);
  EXPECT_NEAR(gib, 376.7, 0.05);
  const double bpw =
      8.0 * static_cast<double>(plan.total_bytes()) / static_cast<double>(plan.total_elements());
  EXPECT_NEAR(bpw, 4.82, 0.005);
  // DEEPSEEK.md: "DSV3 preset = 671.026 B (no MTP)".
  EXPECT_NEAR(static_cast<double>(plan.total_elements()) * 1e-9, 671.026, 0.0005);
}

TEST(SynthPlanTest, Dsv3ShapesMatchDeepSeekNote) {
  const ModelPlan plan = Plan(Preset::kDsv3, Quant::kQ4_K_M);
  const std::map<std::string, std::vector<int64_t>> expected = {
      {"token_embd.weight", {7168, 129280}},
      {"output.weight", {7168, 129280}},
      {"output_norm.weight", {7168}},
      {"blk.0.attn_norm.weight", {7168}},
      {"blk.0.attn_q_a_norm.weight", {1536}},
      {"blk.0.attn_kv_a_norm.weight", {512}},
      {"blk.0.attn_q_a.weight", {7168, 1536}},
      {"blk.0.attn_q_b.weight", {1536, 24576}},
      {"blk.0.attn_kv_a_mqa.weight", {7168, 576}},
      {"blk.0.attn_k_b.weight", {128, 512, 128}},
      {"blk.0.attn_v_b.weight", {512, 128, 128}},
      {"blk.0.attn_output.weight", {16384, 7168}},
      {"blk.0.ffn_gate.weight", {7168, 18432}},
      {"blk.2.ffn_down.weight", {18432, 7168}},
      {"blk.3.ffn_gate_inp.weight", {7168, 256}},
      {"blk.3.exp_probs_b.bias", {256}},
      {"blk.3.ffn_gate_exps.weight", {7168, 2048, 256}},
      {"blk.60.ffn_up_exps.weight", {7168, 2048, 256}},
      {"blk.60.ffn_down_exps.weight", {2048, 7168, 256}},
      {"blk.3.ffn_gate_shexp.weight", {7168, 2048}},
      {"blk.3.ffn_down_shexp.weight", {2048, 7168}},
  };
  for (const auto& [name, ne] : expected) {
    const TensorPlan* t = plan.Find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->ne, ne) << name;
  }
  EXPECT_EQ(plan.Find("blk.3.ffn_gate.weight"), nullptr);  // MoE layers have no dense FFN
  EXPECT_EQ(plan.Find("blk.2.ffn_gate_inp.weight"), nullptr);
  EXPECT_EQ(plan.Find("blk.61.attn_norm.weight"), nullptr);
  // One routed expert (gate+up+down) at Q4_K: 3 x 7.875 MiB (GGUF.md).
  const TensorPlan* gate = plan.Find("blk.7.ffn_gate_exps.weight");
  EXPECT_DOUBLE_EQ(static_cast<double>(gate->n_bytes) / 256 / (1 << 20), 7.875);
}

TEST(SynthPlanTest, Dsv3Q8_0AndBf16Totals) {
  // GGUF.md: bf16 = 1,280,086 MiB; Q8_0 dry-run = 680,238 MiB.
  const ModelPlan q8 = Plan(Preset::kDsv3, Quant::kQ8_0);
  EXPECT_NEAR(static_cast<double>(q8.total_bytes()) / (1 << 20), 680238, 0.5);
  const ModelPlan bf16 = Plan(Preset::kDsv3, Quant::kBF16);
  EXPECT_NEAR(static_cast<double>(bf16.total_bytes()) / (1 << 20), 1280086, 0.5);
  for (const TensorPlan& t : q8.tensors) {
    const bool is_float = t.ne.size() == 1 || t.name.find("norm") != std::string::npos ||
                          t.name.find("ffn_gate_inp") != std::string::npos;
    EXPECT_EQ(t.type, is_float ? TensorType::kF32 : TensorType::kQ8_0) << t.name;
  }
  for (const TensorPlan& t : bf16.tensors) {
    const bool is_float = t.ne.size() == 1 || t.name.find("norm") != std::string::npos ||
                          t.name.find("ffn_gate_inp") != std::string::npos;
    EXPECT_EQ(t.type, is_float ? TensorType::kF32 : TensorType::kBF16) << t.name;
  }
}

TEST(SynthPlanTest, UseMoreBitsFor61Layers) {
  std::vector<int> more;
  for (int i = 0; i < 61; ++i) {
    if (UseMoreBits(i, 61)) more.push_back(i);
  }
  const std::vector<int> expected = {0,  1,  2,  3,  4,  5,  6,  9,  12, 15, 18, 21, 24, 27, 30,
                                     33, 36, 39, 42, 45, 48, 51, 53, 54, 55, 56, 57, 58, 59, 60};
  EXPECT_EQ(more, expected);
}

TEST(SynthPlanTest, FallbackWhenRowIsNotWholeSuperBlocks) {
  EXPECT_EQ(ChooseTensorType(Quant::kQ4_K_M, "blk.0.attn_q_b.weight", {128, 192}, 3),
            TensorType::kQ5_0);
  EXPECT_EQ(ChooseTensorType(Quant::kQ4_K_M, "output.weight", {160, 512}, 3), TensorType::kQ8_0);
  EXPECT_EQ(ChooseTensorType(Quant::kQ4_K_M, "blk.2.ffn_down_exps.weight", {96, 256, 16}, 3),
            TensorType::kQ8_0);  // Q6_K (layer 2 of 3) -> Q8_0
  EXPECT_EQ(ChooseTensorType(Quant::kQ8_0, "blk.0.attn_k_b.weight", {48, 64, 4}, 3),
            TensorType::kF16);  // 48 % 32 != 0
  EXPECT_EQ(ChooseTensorType(Quant::kQ4_K_M, "blk.0.attn_k_b.weight", {40, 64, 4}, 3),
            TensorType::kF16);  // Q4_K -> Q5_0 -> F16
  EXPECT_EQ(ChooseTensorType(Quant::kBF16, "blk.0.attn_k_b.weight", {40, 64, 4}, 3),
            TensorType::kBF16);
}

// The fixtures in tests/data are the same shape as the tiny preset: every
// tensor name, shape and type must agree with what llama.cpp wrote.
class TinyFixtureTest : public ::testing::TestWithParam<std::pair<const char*, Quant>> {};

TEST_P(TinyFixtureTest, TensorTableEqualsFixture) {
  const auto [file, quant] = GetParam();
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> f =
      gguf::GgufFile::Open(std::string(KTX_SOURCE_DIR) + "/tests/data/" + file);
  ASSERT_TRUE(f.ok()) << f.status();
  const ModelPlan plan = Plan(Preset::kTiny, quant);
  ASSERT_EQ(plan.tensors.size(), (*f)->tensors().size());
  for (const gguf::TensorInfo& info : (*f)->tensors()) {
    const TensorPlan* t = plan.Find(info.name);
    ASSERT_NE(t, nullptr) << info.name;
    EXPECT_EQ(t->ne, info.ne) << info.name;
    EXPECT_EQ(t->type, info.type) << info.name << ": plan " << kernels::TraitsOf(t->type).name
                                  << ", fixture " << kernels::TraitsOf(info.type).name;
    EXPECT_EQ(t->n_bytes, info.n_bytes) << info.name;
  }
  EXPECT_EQ(plan.total_bytes(), (*f)->total_tensor_bytes());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TinyFixtureTest,
                         ::testing::Values(std::make_pair("dsv3-tiny-q4_k_m.gguf", Quant::kQ4_K_M),
                                           std::make_pair("dsv3-tiny-q8_0.gguf", Quant::kQ8_0),
                                           std::make_pair("dsv3-tiny-bf16.gguf", Quant::kBF16)));

TEST(SynthPlanTest, KimiK2Shape) {
  const ModelPlan plan = Plan(Preset::kKimiK2, Quant::kQ4_K_M);
  const ModelConfig& c = plan.config;
  EXPECT_EQ(c.n_expert, 384);
  EXPECT_EQ(c.n_head, 64);
  EXPECT_EQ(c.n_vocab, 163840);
  EXPECT_EQ(c.n_dense_layer, 1);
  EXPECT_EQ(c.n_expert_group, 1);
  EXPECT_EQ(plan.Find("token_embd.weight")->ne, (std::vector<int64_t>{7168, 163840}));
  EXPECT_EQ(plan.Find("blk.0.attn_q_b.weight")->ne, (std::vector<int64_t>{1536, 64 * 192}));
  EXPECT_EQ(plan.Find("blk.0.attn_output.weight")->ne, (std::vector<int64_t>{64 * 128, 7168}));
  EXPECT_EQ(plan.Find("blk.1.ffn_gate_exps.weight")->ne, (std::vector<int64_t>{7168, 2048, 384}));
  EXPECT_NE(plan.Find("blk.0.ffn_down.weight"), nullptr);
  EXPECT_EQ(plan.Find("blk.1.ffn_down.weight"), nullptr);
  EXPECT_EQ(plan.tensors.size(), 2u + 1u + 61u * 10u + 1u * 3u + 60u * 8u);
}

TEST(SynthPlanTest, OverridesApply) {
  ConfigOverrides o;
  o.n_layer = 4;
  o.n_expert = 64;
  o.n_vocab = 1000;
  const ModelPlan plan = Plan(Preset::kDsv3, Quant::kQ4_K_M, o);
  EXPECT_EQ(plan.config.n_layer, 4);
  EXPECT_EQ(plan.config.n_dense_layer, 3);
  EXPECT_EQ(plan.Find("blk.3.ffn_up_exps.weight")->ne, (std::vector<int64_t>{7168, 2048, 64}));
  EXPECT_EQ(plan.Find("output.weight")->ne, (std::vector<int64_t>{7168, 1000}));
  // use_more_bits with n = 4: 4/8 = 0, 7*4/8 = 3 -> only layer 3 (and i % 3 == 2: layer 2).
  EXPECT_EQ(plan.Find("blk.3.ffn_down_exps.weight")->type, TensorType::kQ6_K);
  EXPECT_EQ(plan.Find("blk.2.ffn_down.weight")->type, TensorType::kQ6_K);
  EXPECT_EQ(plan.Find("blk.1.ffn_down.weight")->type, TensorType::kQ4_K);
  // Short models keep one MoE layer unless --dense-layers says otherwise.
  ConfigOverrides two;
  two.n_layer = 2;
  EXPECT_EQ(Plan(Preset::kDsv3, Quant::kBF16, two).config.n_dense_layer, 1);
  two.n_dense_layer = 0;
  EXPECT_EQ(Plan(Preset::kDsv3, Quant::kBF16, two).config.n_dense_layer, 0);
}

TEST(SynthPlanTest, InvalidConfigsNameTheFlag) {
  auto error = [](const ConfigOverrides& o) {
    absl::StatusOr<ModelConfig> c = MakeConfig(Preset::kDsv3, o);
    EXPECT_FALSE(c.ok());
    return c.ok() ? std::string() : std::string(c.status().message());
  };
  ConfigOverrides o;
  o.n_expert = 100;  // not a multiple of 8 groups
  EXPECT_THAT(error(o), HasSubstr("--experts = 100"));
  o.n_expert = 4;  // fewer than the 8 used
  EXPECT_THAT(error(o), HasSubstr("--experts = 4"));
  o = {};
  o.n_vocab = 100;
  EXPECT_THAT(error(o), HasSubstr("--vocab = 100"));
  o = {};
  o.n_layer = 2;
  o.n_dense_layer = 3;
  EXPECT_THAT(error(o), HasSubstr("--dense-layers = 3"));
  o = {};
  o.n_layer = 0;
  EXPECT_THAT(error(o), HasSubstr("--layers = 0"));
  EXPECT_THAT(std::string(ParsePreset("dsv4").status().message()), HasSubstr("dsv4"));
  EXPECT_THAT(std::string(ParseQuant("q2_k").status().message()), HasSubstr("q2_k"));
  EXPECT_EQ(*ParseQuant("Q4_K_M"), Quant::kQ4_K_M);
  EXPECT_EQ(*ParsePreset("kimi-k2"), Preset::kKimiK2);
}

TEST(SynthPlanTest, TableListsEveryTensorAndTotals) {
  const ModelPlan plan = Plan(Preset::kDsv3, Quant::kQ4_K_M);
  const std::string table = FormatPlanTable(plan);
  EXPECT_THAT(table, HasSubstr("blk.60.ffn_down_exps.weight"));
  EXPECT_THAT(table, HasSubstr("q5_0"));
  EXPECT_THAT(table, HasSubstr("385750.62 MiB"));
  EXPECT_THAT(table, HasSubstr("376.7 GiB"));
  EXPECT_THAT(table, HasSubstr("tensors: 1086"));
  size_t lines = 0;
  for (char c : table) lines += c == '\n';
  EXPECT_GE(lines, 1086u + 3u);
}

}  // namespace
}  // namespace ktx::synth
