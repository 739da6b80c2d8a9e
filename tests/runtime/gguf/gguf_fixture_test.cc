// The golden fixtures (written by llama.cpp's tools, see tests/data/README.md)
// open with the metadata, tensor names, types and shapes that the README's
// tables 2.2 and 2.3 list, and GgufWriter reproduces their data layout.
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/common/tensor_type.h"
#include "runtime/base/status.h"
#include "runtime/gguf/gguf.h"
#include "runtime/gguf/gguf_writer.h"
#include "tests/runtime/gguf/gguf_test_util.h"

namespace ktx::gguf {
namespace {

using ::testing::ElementsAre;

struct FixtureFile {
  std::string file;
  uint64_t bytes;      // README table 1
  uint32_t file_type;  // README 2.2: 32 (bf16), 7 (q8_0), 15 (q4_k_m)
  int column;          // column of README table 2.3: 0 bf16, 1 q8_0, 2 q4_k_m
};

void PrintTo(const FixtureFile& f, std::ostream* os) { *os << f.file; }

const FixtureFile kFiles[] = {
    {"dsv3-tiny-bf16.gguf", 15500192, 32, 0},
    {"dsv3-tiny-q8_0.gguf", 8261792, 7, 1},
    {"dsv3-tiny-q4_k_m.gguf", 4749984, 15, 2},
};

// README table 2.3, row by row. `layers`: "all", "dense" (blk.0) or "moe" (blk.1, blk.2),
// following "3 layers (1 dense + 2 MoE)". Types per column; for q4_k_m a
// "[blk 1] / [blk 2]" split is written as two entries.
struct Row {
  std::string name;  // with N for the layer
  std::vector<int64_t> ne;
  std::string layers;
  std::string types[3];
  std::string q4_k_m_blk2;  // when it differs from types[2] in blk.2
};

const std::vector<Row>& Table() {
  static const std::vector<Row> rows = {
      {"output.weight", {256, 512}, "", {"bf16", "q8_0", "q6_k"}, ""},
      {"output_norm.weight", {256}, "", {"f32", "f32", "f32"}, ""},
      {"token_embd.weight", {256, 512}, "", {"bf16", "q8_0", "q4_k"}, ""},
      {"blk.N.attn_k_b.weight", {32, 64, 4}, "all", {"bf16", "q8_0", "q5_0"}, ""},
      {"blk.N.attn_kv_a_mqa.weight", {256, 80}, "all", {"bf16", "q8_0", "q4_k"}, ""},
      {"blk.N.attn_kv_a_norm.weight", {64}, "all", {"f32", "f32", "f32"}, ""},
      {"blk.N.attn_norm.weight", {256}, "all", {"f32", "f32", "f32"}, ""},
      {"blk.N.attn_output.weight", {128, 256}, "all", {"bf16", "q8_0", "q5_0"}, ""},
      {"blk.N.attn_q_a.weight", {256, 128}, "all", {"bf16", "q8_0", "q4_k"}, ""},
      {"blk.N.attn_q_a_norm.weight", {128}, "all", {"f32", "f32", "f32"}, ""},
      {"blk.N.attn_q_b.weight", {128, 192}, "all", {"bf16", "q8_0", "q5_0"}, ""},
      {"blk.N.attn_v_b.weight", {64, 32, 4}, "all", {"bf16", "q8_0", "q5_0"}, ""},
      {"blk.N.exp_probs_b.bias", {16}, "moe", {"f32", "f32", "f32"}, ""},
      {"blk.N.ffn_down.weight", {512, 256}, "dense", {"bf16", "q8_0", "q4_k"}, ""},
      {"blk.N.ffn_down_exps.weight", {256, 256, 16}, "moe", {"bf16", "q8_0", "q4_k"}, "q6_k"},
      {"blk.N.ffn_down_shexp.weight", {256, 256}, "moe", {"bf16", "q8_0", "q4_k"}, "q6_k"},
      {"blk.N.ffn_gate.weight", {256, 512}, "dense", {"bf16", "q8_0", "q4_k"}, ""},
      {"blk.N.ffn_gate_exps.weight", {256, 256, 16}, "moe", {"bf16", "q8_0", "q4_k"}, ""},
      {"blk.N.ffn_gate_inp.weight", {256, 16}, "moe", {"f32", "f32", "f32"}, ""},
      {"blk.N.ffn_gate_shexp.weight", {256, 256}, "moe", {"bf16", "q8_0", "q4_k"}, ""},
      {"blk.N.ffn_norm.weight", {256}, "all", {"f32", "f32", "f32"}, ""},
      {"blk.N.ffn_up.weight", {256, 512}, "dense", {"bf16", "q8_0", "q4_k"}, ""},
      {"blk.N.ffn_up_exps.weight", {256, 256, 16}, "moe", {"bf16", "q8_0", "q4_k"}, ""},
      {"blk.N.ffn_up_shexp.weight", {256, 256}, "moe", {"bf16", "q8_0", "q4_k"}, ""},
  };
  return rows;
}

struct Expected {
  std::string name;
  std::vector<int64_t> ne;
  kernels::TensorType type;
};

std::vector<Expected> ExpectedTensors(int column) {
  std::vector<Expected> out;
  for (const Row& r : Table()) {
    std::vector<int> layers;
    if (r.layers.empty()) layers = {-1};
    if (r.layers == "all") layers = {0, 1, 2};
    if (r.layers == "dense") layers = {0};
    if (r.layers == "moe") layers = {1, 2};
    for (int il : layers) {
      std::string name = r.name;
      if (il >= 0) name.replace(name.find('N'), 1, std::to_string(il));
      std::string type = r.types[column];
      if (column == 2 && il == 2 && !r.q4_k_m_blk2.empty()) type = r.q4_k_m_blk2;
      std::optional<kernels::TensorType> t = kernels::TensorTypeFromName(type);
      KTX_CHECK_MSG(t.has_value(), type.c_str());
      out.push_back({name, r.ne, *t});
    }
  }
  return out;
}

class GgufFixtureTest : public ::testing::TestWithParam<FixtureFile> {};

TEST_P(GgufFixtureTest, TensorsMatchTheReadme) {
  const FixtureFile& fx = GetParam();
  const std::string path = testing::FixturePath(fx.file);
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& file = **f;
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.alignment(), 32u);
  EXPECT_THAT(file.paths(), ElementsAre(path));

  const std::vector<Expected> expected = ExpectedTensors(fx.column);
  ASSERT_EQ(expected.size(), 52u);  // 3 global + 13 (dense blk.0) + 2 x 18 (MoE)
  EXPECT_EQ(file.tensors().size(), expected.size());
  for (const Expected& e : expected) {
    SCOPED_TRACE(e.name);
    absl::StatusOr<const TensorInfo*> t = file.GetTensor(e.name, e.ne);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ((*t)->ne, e.ne);
    EXPECT_EQ((*t)->type, e.type) << kernels::TraitsOf((*t)->type).name;
    EXPECT_EQ((*t)->n_bytes, static_cast<uint64_t>((*t)->row_bytes() * (*t)->n_rows()));
    EXPECT_EQ((*t)->file_index, 0);
  }

  // llama.cpp lays tensors out back to back (32-aligned) to the end of the file.
  uint64_t end = 0;
  for (const TensorInfo& t : file.tensors()) end = std::max(end, t.file_offset + t.n_bytes);
  EXPECT_EQ(end, fx.bytes);

  // "all norm weights 1.0" (README 2.4): read through the mapping.
  for (const TensorInfo& t : file.tensors()) {
    if (t.name.find("norm.weight") == std::string::npos) continue;
    ASSERT_EQ(t.type, kernels::TensorType::kF32) << t.name;
    const float* x = reinterpret_cast<const float*>(t.data);
    for (int64_t i = 0; i < t.n_elements(); ++i) ASSERT_EQ(x[i], 1.0f) << t.name << "[" << i << "]";
  }
}

TEST_P(GgufFixtureTest, MetadataMatchesTheReadme) {
  const FixtureFile& fx = GetParam();
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(testing::FixturePath(fx.file));
  ASSERT_TRUE(f.ok()) << f.status();
  const Metadata& m = (*f)->metadata();
  EXPECT_EQ(m.entries().size(), 47u);  // the rows of README table 2.2
  EXPECT_EQ(*m.GetString("general.architecture"), "deepseek2");
  EXPECT_EQ(*m.GetString("general.type"), "model");
  EXPECT_EQ(*m.GetString("general.name"), "dsv3-tiny");
  EXPECT_EQ(*m.GetU32("general.file_type"), fx.file_type);
  EXPECT_EQ(*m.GetU32("general.quantization_version"), 2u);
  const std::pair<const char*, uint32_t> u32s[] = {
      {"block_count", 3},
      {"context_length", 163840},
      {"embedding_length", 256},
      {"feed_forward_length", 512},
      {"attention.head_count", 4},
      {"attention.head_count_kv", 1},
      {"rope.scaling.original_context_length", 4096},
      {"expert_count", 16},
      {"expert_used_count", 4},
      {"expert_group_count", 4},
      {"expert_group_used_count", 2},
      {"expert_gating_func", 2},
      {"leading_dense_block_count", 1},
      {"vocab_size", 512},
      {"attention.q_lora_rank", 128},
      {"attention.kv_lora_rank", 64},
      {"attention.key_length", 80},
      {"attention.value_length", 64},
      {"attention.key_length_mla", 48},
      {"attention.value_length_mla", 32},
      {"expert_feed_forward_length", 256},
      {"expert_shared_count", 1},
      {"rope.dimension_count", 16},
  };
  for (const auto& [key, value] : u32s) {
    EXPECT_EQ(*m.GetU32(std::string("deepseek2.") + key), value) << key;
    EXPECT_EQ(*m.GetI64(std::string("deepseek2.") + key), value) << key;
  }
  EXPECT_EQ(*m.GetString("deepseek2.rope.scaling.type"), "yarn");
  EXPECT_EQ(*m.GetF32("deepseek2.rope.scaling.factor"), 40.0f);
  EXPECT_EQ(*m.GetF32("deepseek2.rope.scaling.yarn_beta_fast"), 32.0f);
  EXPECT_EQ(*m.GetF32("deepseek2.rope.scaling.yarn_beta_slow"), 1.0f);
  EXPECT_EQ(*m.GetF32("deepseek2.rope.freq_base"), 10000.0f);
  EXPECT_EQ(*m.GetF32("deepseek2.attention.layer_norm_rms_epsilon"), 1e-6f);
  EXPECT_EQ(*m.GetF32("deepseek2.expert_weights_scale"), 2.5f);
  EXPECT_EQ(*m.GetF32("deepseek2.rope.scaling.yarn_log_multiplier"), 0.1f);
  EXPECT_EQ(*m.GetBool("deepseek2.expert_weights_norm"), true);
  EXPECT_EQ(*m.GetString("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(*m.GetString("tokenizer.ggml.pre"), "deepseek-v3");
  EXPECT_EQ(*m.GetU32("tokenizer.ggml.bos_token_id"), 0u);
  EXPECT_EQ(*m.GetU32("tokenizer.ggml.eos_token_id"), 1u);
  EXPECT_EQ(*m.GetU32("tokenizer.ggml.padding_token_id"), 2u);
  EXPECT_EQ(*m.GetBool("tokenizer.ggml.add_bos_token"), true);
  EXPECT_EQ(*m.GetBool("tokenizer.ggml.add_eos_token"), false);

  absl::StatusOr<std::vector<std::string>> tokens = m.GetStringArray("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  ASSERT_EQ(tokens->size(), 512u);
  EXPECT_EQ((*tokens)[0],
            "<\xef\xbd\x9c"
            "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>");
  EXPECT_EQ((*tokens)[1],
            "<\xef\xbd\x9c"
            "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>");
  EXPECT_EQ((*tokens)[2], "<\xef\xbd\x9c\xe2\x96\x81pad\xe2\x96\x81\xef\xbd\x9c>");
  absl::StatusOr<std::vector<int64_t>> types = m.GetIntArray("tokenizer.ggml.token_type");
  ASSERT_TRUE(types.ok()) << types.status();
  ASSERT_EQ(types->size(), 512u);
  // llama.cpp token types: 3 = CONTROL (ids 0..2), 1 = NORMAL (the byte tokens).
  EXPECT_THAT(std::vector<int64_t>(types->begin(), types->begin() + 4), ElementsAre(3, 3, 3, 1));
  EXPECT_EQ(m.GetStringArray("tokenizer.ggml.merges")->size(), 253u);
}

INSTANTIATE_TEST_SUITE_P(Files, GgufFixtureTest, ::testing::ValuesIn(kFiles),
                         [](const ::testing::TestParamInfo<FixtureFile>& info) {
                           std::string n = info.param.file.substr(10);  // after "dsv3-tiny-"
                           n = n.substr(0, n.find('.'));
                           return n;
                         });

// Rewriting a fixture with GgufWriter (metadata copied, tensors copied in file
// order) gives a file of the same size whose data section is byte-identical:
// the writer's layout rules are llama.cpp's.
TEST(GgufFixtureRewriteTest, WriterReproducesLlamaCppLayout) {
  const std::string path = testing::FixturePath("dsv3-tiny-q4_k_m.gguf");
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  GgufWriter w;
  ASSERT_TRUE(w.CopyMetadata((*f)->metadata()).ok());
  for (const TensorInfo& t : (*f)->tensors()) {
    ASSERT_TRUE(
        w.AddTensor(t.name, t.ne, t.type, std::vector<uint8_t>(t.data, t.data + t.n_bytes)).ok());
  }
  absl::StatusOr<std::vector<uint8_t>> bytes = w.WriteToMemory();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  const std::vector<uint8_t> original = testing::ReadFileBytes(path);
  ASSERT_EQ(bytes->size(), original.size());
  const size_t data = (*f)->data_offsets()[0];
  EXPECT_TRUE(std::equal(bytes->begin() + data, bytes->end(), original.begin() + data));
  // The header holds the same entries, in another order (ktx's metadata is sorted).
  absl::StatusOr<std::unique_ptr<GgufFile>> g =
      GgufFile::FromMemory(bytes->data(), bytes->size(), "rewritten");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)->metadata().entries().size(), 47u);
  for (const auto& [key, value] : (*f)->metadata().entries()) {
    const Value* v = (*g)->metadata().Find(key);
    ASSERT_NE(v, nullptr) << key;
    EXPECT_TRUE(v->storage() == value.storage()) << key;
    EXPECT_EQ(v->type(), value.type()) << key;
    EXPECT_EQ(v->array_type(), value.array_type()) << key;
  }
}

}  // namespace
}  // namespace ktx::gguf
