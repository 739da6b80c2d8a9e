#include "topology/gguf_experts.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/gguf/gguf_writer.h"

namespace ktx::topology {
namespace {

using kernels::TensorType;
using ::testing::HasSubstr;

std::string Fixture(const char* name) {
  return std::string(KTX_SOURCE_DIR) + "/tests/data/" + name;
}

// Bytes of one expert's [256 x 256] slice, from ggml's block geometry
// (written out here, not taken from ktx): Q4_K 144 bytes / 256 values, Q6_K
// 210 / 256, Q8_0 34 / 32, BF16 2 per value.
constexpr uint64_t kSlice = 256 * 256;
constexpr uint64_t kQ4K = kSlice / 256 * 144;
constexpr uint64_t kQ6K = kSlice / 256 * 210;
constexpr uint64_t kQ80 = kSlice / 32 * 34;
constexpr uint64_t kBF16 = kSlice * 2;

// tests/data/README.md section 2: 3 layers, layer 0 dense, layers 1-2 MoE with
// 16 experts; gate/up/down_exps {256, 256, 16}; in q4_k_m the down tensor is
// q4_k in block 1 and q6_k in block 2.
TEST(ModelExpertTableFromGgufTest, TinyDeepSeekFixtures) {
  struct Case {
    const char* file;
    uint64_t layer1, layer2;
  } cases[] = {{"dsv3-tiny-q4_k_m.gguf", 3 * kQ4K, 2 * kQ4K + kQ6K},
               {"dsv3-tiny-q8_0.gguf", 3 * kQ80, 3 * kQ80},
               {"dsv3-tiny-bf16.gguf", 3 * kBF16, 3 * kBF16}};
  for (const Case& c : cases) {
    absl::StatusOr<ModelExpertTable> t = LoadModelExpertTable(Fixture(c.file));
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_EQ(t->n_layer, 3) << c.file;
    EXPECT_FALSE(t->layers[0].is_moe);
    for (int il : {1, 2}) {
      EXPECT_TRUE(t->layers[il].is_moe) << c.file;
      EXPECT_EQ(t->layers[il].n_expert, 16) << c.file;
    }
    EXPECT_EQ(t->layers[1].bytes_per_expert, c.layer1) << c.file;
    EXPECT_EQ(t->layers[2].bytes_per_expert, c.layer2) << c.file;
    EXPECT_EQ(t->total_bytes(), 16 * (c.layer1 + c.layer2));
  }
}

TEST(ModelExpertTableFromGgufTest, MissingFileIsAnError) {
  EXPECT_FALSE(LoadModelExpertTable(Fixture("no-such-model.gguf")).ok());
}

// A small model: `n_layer` blocks; the tensors are added by the caller.
class SyntheticModel {
 public:
  explicit SyntheticModel(uint32_t n_layer, uint32_t expert_count = 0) {
    w_.SetString("general.architecture", "deepseek2");
    w_.SetU32("deepseek2.block_count", n_layer);
    if (expert_count > 0) w_.SetU32("deepseek2.expert_count", expert_count);
  }
  void Add(const std::string& name, std::vector<int64_t> ne, TensorType type = TensorType::kF32) {
    int64_t n = 1;
    for (int64_t d : ne) n *= d;
    const size_t bytes = type == TensorType::kF32 ? n * 4 : n * 2;
    ASSERT_TRUE(w_.AddTensor(name, std::move(ne), type, std::vector<uint8_t>(bytes)).ok()) << name;
  }
  absl::StatusOr<ModelExpertTable> Table() {
    absl::StatusOr<std::vector<uint8_t>> image = w_.WriteToMemory();
    if (!image.ok()) return image.status();
    image_ = std::move(*image);
    absl::StatusOr<std::unique_ptr<gguf::GgufFile>> file =
        gguf::GgufFile::FromMemory(image_.data(), image_.size(), "synthetic.gguf");
    if (!file.ok()) return file.status();
    return ModelExpertTableFromGguf(**file);
  }

 private:
  gguf::GgufWriter w_;
  std::vector<uint8_t> image_;
};

TEST(ModelExpertTableFromGgufTest, FusedGateUpAndBiasesCount) {
  SyntheticModel m(2, 4);
  m.Add("blk.0.ffn_down.weight", {32, 8});
  m.Add("blk.1.ffn_gate_up_exps.weight", {32, 16, 4});                 // 32*16*4 B per expert
  m.Add("blk.1.ffn_down_exps.weight", {8, 32, 4}, TensorType::kBF16);  // 8*32*2
  m.Add("blk.1.ffn_down_exps.bias", {32, 4});                          // 32*4
  m.Add("blk.1.exp_probs_b.bias", {4});                                // router: not an expert
  absl::StatusOr<ModelExpertTable> t = m.Table();
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->layers[0].is_moe);
  EXPECT_TRUE(t->layers[1].is_moe);
  EXPECT_EQ(t->layers[1].n_expert, 4);
  EXPECT_EQ(t->layers[1].bytes_per_expert, 32u * 16 * 4 + 8 * 32 * 2 + 32 * 4);
}

TEST(ModelExpertTableFromGgufTest, ErrorsNameTheTensor) {
  {
    SyntheticModel m(2);
    m.Add("blk.1.ffn_gate_exps.weight", {32, 8, 4});
    m.Add("blk.1.ffn_up_exps.weight", {32, 8, 4});
    absl::StatusOr<ModelExpertTable> t = m.Table();
    EXPECT_THAT(std::string(t.status().message()),
                HasSubstr("synthetic.gguf: layer 1 has expert tensors"));
    EXPECT_THAT(std::string(t.status().message()), HasSubstr("no blk.1.ffn_down_exps.weight"));
  }
  {
    SyntheticModel m(2);
    m.Add("blk.1.ffn_gate_exps.weight", {32, 8, 4});
    m.Add("blk.1.ffn_down_exps.weight", {8, 32, 4});
    EXPECT_THAT(std::string(m.Table().status().message()),
                HasSubstr("not both blk.1.ffn_gate_exps"));
  }
  {
    SyntheticModel m(2);
    m.Add("blk.1.ffn_gate_exps.weight", {32, 8, 4});
    m.Add("blk.1.ffn_up_exps.weight", {32, 8, 5});
    m.Add("blk.1.ffn_down_exps.weight", {8, 32, 4});
    EXPECT_THAT(std::string(m.Table().status().message()),
                HasSubstr("tensor blk.1.ffn_up_exps.weight has 5 experts"));
  }
  {
    SyntheticModel m(2, 8);
    m.Add("blk.1.ffn_gate_exps.weight", {32, 8, 4});
    EXPECT_THAT(std::string(m.Table().status().message()),
                HasSubstr("deepseek2.expert_count is 8"));
  }
  {
    SyntheticModel m(2);
    m.Add("blk.2.ffn_gate_exps.weight", {32, 8, 4});
    EXPECT_THAT(
        std::string(m.Table().status().message()),
        HasSubstr("tensor blk.2.ffn_gate_exps.weight: layer 2 but deepseek2.block_count is 2"));
  }
  {
    gguf::GgufWriter w;
    w.SetString("general.architecture", "deepseek2");
    absl::StatusOr<std::vector<uint8_t>> image = w.WriteToMemory();
    ASSERT_TRUE(image.ok());
    auto file = gguf::GgufFile::FromMemory(image->data(), image->size(), "empty.gguf");
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_THAT(std::string(ModelExpertTableFromGguf(**file).status().message()),
                HasSubstr("deepseek2.block_count"));
  }
}

}  // namespace
}  // namespace ktx::topology
