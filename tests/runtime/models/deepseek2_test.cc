// Deepseek2 hyper-parameters, weights and stages: values read from the
// fixture's metadata, hostile files (missing keys and tensors, wrong shapes and
// types, inconsistent values) built by editing a copy of the fixture, the
// lite and tied layouts, and the stage API (composition, expert masks,
// pluggable expert backends, errors).
#include "runtime/models/deepseek2.h"

#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/quant/quant.h"
#include "nlohmann/json.hpp"
#include "runtime/gguf/gguf.h"
#include "runtime/gguf/gguf_writer.h"
#include "runtime/kv_cache/latent_kv_cache.h"

namespace ktx::models {
namespace {

using gguf::Value;
using gguf::ValueType;
using kernels::TensorType;
using ::testing::HasSubstr;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";
const std::string kBase = kDataDir + "dsv3-tiny-q4_k_m.gguf";

nlohmann::json Manifest() {
  std::ifstream in(kDataDir + "manifest.json");
  return nlohmann::json::parse(in);
}

const gguf::GgufFile& BaseFile() {
  static const gguf::GgufFile* file = [] {
    auto f = gguf::GgufFile::Open(kBase);
    KTX_CHECK(f.ok());
    return f->release();
  }();
  return *file;
}

std::vector<int32_t> PromptTokens() {
  return Manifest()["prompt_tokens"].get<std::vector<int32_t>>();
}

// ---------------------------------------------------------------------------
// Hyper-parameters.

gguf::Metadata CopyMetadata(const std::set<std::string>& drop = {}) {
  gguf::Metadata md;
  for (const auto& [key, value] : BaseFile().metadata().entries()) {
    if (drop.count(key) == 0) md.Set(key, value);
  }
  return md;
}

Value U32(uint32_t v) { return Value(ValueType::kUint32, v); }

TEST(Deepseek2HparamsTest, ReadsTheFixture) {
  auto hp = Deepseek2Hparams::FromMetadata(BaseFile().metadata());
  ASSERT_TRUE(hp.ok()) << hp.status();
  EXPECT_EQ(hp->n_layer, 3);
  EXPECT_EQ(hp->n_ctx_train, 163840);
  EXPECT_EQ(hp->n_embd, 256);
  EXPECT_EQ(hp->n_ff, 512);
  EXPECT_EQ(hp->n_head, 4);
  EXPECT_EQ(hp->q_lora_rank, 128);
  EXPECT_EQ(hp->kv_lora_rank, 64);
  EXPECT_EQ(hp->n_embd_head_qk, 48);
  EXPECT_EQ(hp->qk_nope(), 32);
  EXPECT_EQ(hp->n_embd_head_v, 32);
  EXPECT_EQ(hp->n_rot, 16);
  EXPECT_EQ(hp->n_layer_dense_lead, 1);
  EXPECT_FALSE(hp->IsMoeLayer(0));
  EXPECT_TRUE(hp->IsMoeLayer(1));
  EXPECT_EQ(hp->n_expert, 16);
  EXPECT_EQ(hp->n_expert_used, 4);
  EXPECT_EQ(hp->n_expert_groups, 4);
  EXPECT_EQ(hp->n_group_used, 2);
  EXPECT_EQ(hp->n_expert_shared, 1);
  EXPECT_EQ(hp->n_ff_exp, 256);
  EXPECT_EQ(hp->gating, GatingFunc::kSigmoid);
  EXPECT_EQ(hp->expert_weights_scale, 2.5f);
  EXPECT_TRUE(hp->expert_weights_norm);
  EXPECT_EQ(hp->n_vocab, 512);
  EXPECT_EQ(hp->rope_scaling, RopeScalingType::kYarn);
  EXPECT_EQ(hp->n_ctx_orig_yarn, 4096);
  EXPECT_EQ(hp->yarn_log_mul, 1.0f);  // 0.1f / 0.1f exactly
  EXPECT_EQ(hp->kv_layout().row_width(), 80);

  // Derived constants against the fixture generator's own (manifest config).
  const nlohmann::json config = Manifest()["config"];
  EXPECT_NEAR(hp->freq_scale, config["freq_scale"].get<double>(), 1e-15);
  EXPECT_NEAR(hp->kq_scale, config["kq_scale"].get<double>(), 1e-12);
  EXPECT_NEAR(hp->yarn_attn_factor, config["attn_factor"].get<double>(), 1e-12);
  EXPECT_NEAR(hp->rms_eps, config["eps"].get<double>(), 1e-20);
  EXPECT_EQ(hp->rope.corr_low, 2.0);
  EXPECT_EQ(hp->rope.corr_high, 6.0);
  EXPECT_EQ(hp->ext_factor, 1.0);
}

TEST(Deepseek2HparamsTest, DeepSeekV3Constants) {
  // DeepSeek-V3's rope: factor 40, log multiplier 0.1 (stored), head 192.
  gguf::Metadata md = CopyMetadata();
  md.Set("deepseek2.attention.key_length_mla", U32(192));
  md.Set("deepseek2.rope.dimension_count", U32(64));
  md.Set("deepseek2.attention.kv_lora_rank", U32(512));
  md.Set("deepseek2.attention.key_length", U32(576));
  md.Set("deepseek2.attention.value_length", U32(512));
  auto hp = Deepseek2Hparams::FromMetadata(md);
  ASSERT_TRUE(hp.ok()) << hp.status();
  const double mscale = 1.0 + 0.1 * std::log(40.0);  // 1.3689 (DEEPSEEK.md)
  EXPECT_NEAR(hp->kq_scale, mscale * mscale / std::sqrt(192.0), 1e-12);
  EXPECT_NEAR(hp->yarn_attn_factor * mscale, 1.0, 1e-12);  // rope magnitude 1
  EXPECT_EQ(hp->rope.corr_low, 10.0);
  EXPECT_EQ(hp->rope.corr_high, 23.0);
  EXPECT_EQ(hp->kv_layout().row_width(), 576);
}

// Every required key, removed, gives an error naming it.
TEST(Deepseek2HparamsTest, MissingRequiredKeys) {
  for (const std::string key :
       {"general.architecture", "deepseek2.block_count", "deepseek2.context_length",
        "deepseek2.embedding_length", "deepseek2.attention.head_count",
        "deepseek2.attention.kv_lora_rank", "deepseek2.attention.key_length_mla",
        "deepseek2.attention.value_length_mla", "deepseek2.attention.layer_norm_rms_epsilon",
        "deepseek2.leading_dense_block_count", "deepseek2.feed_forward_length",
        "deepseek2.expert_count", "deepseek2.expert_used_count", "deepseek2.expert_shared_count",
        "deepseek2.expert_feed_forward_length", "deepseek2.expert_group_used_count"}) {
    SCOPED_TRACE(key);
    auto hp = Deepseek2Hparams::FromMetadata(CopyMetadata({key}));
    ASSERT_FALSE(hp.ok());
    EXPECT_EQ(hp.status().code(), absl::StatusCode::kNotFound) << hp.status();
    EXPECT_THAT(std::string(hp.status().message()), HasSubstr(key));
  }
}

TEST(Deepseek2HparamsTest, OptionalKeysHaveDefaults) {
  // No rope dimension: derived from key_length - kv_lora_rank = 80 - 64.
  auto hp = Deepseek2Hparams::FromMetadata(CopyMetadata({"deepseek2.rope.dimension_count"}));
  ASSERT_TRUE(hp.ok()) << hp.status();
  EXPECT_EQ(hp->n_rot, 16);
  // Without either, the rope key is named.
  hp = Deepseek2Hparams::FromMetadata(
      CopyMetadata({"deepseek2.rope.dimension_count", "deepseek2.attention.key_length"}));
  EXPECT_THAT(std::string(hp.status().message()), HasSubstr("deepseek2.rope.dimension_count"));
  // No gating function: softmax (DeepSeek-V2 files); no groups; no q_lora: lite.
  hp = Deepseek2Hparams::FromMetadata(CopyMetadata(
      {"deepseek2.expert_gating_func", "deepseek2.expert_group_count",
       "deepseek2.expert_group_used_count", "deepseek2.attention.q_lora_rank",
       "deepseek2.expert_weights_scale", "deepseek2.expert_weights_norm", "deepseek2.vocab_size"}));
  ASSERT_TRUE(hp.ok()) << hp.status();
  EXPECT_EQ(hp->gating, GatingFunc::kSoftmax);
  EXPECT_EQ(hp->n_expert_groups, 0);
  EXPECT_TRUE(hp->is_lite());
  EXPECT_EQ(hp->expert_weights_scale, 0.0f);
  EXPECT_FALSE(hp->expert_weights_norm);
  EXPECT_EQ(hp->n_vocab, 512);  // from tokenizer.ggml.tokens
  // No rope scaling at all: plain rope, kq_scale = 1/sqrt(48).
  hp = Deepseek2Hparams::FromMetadata(
      CopyMetadata({"deepseek2.rope.scaling.type", "deepseek2.rope.scaling.factor",
                    "deepseek2.rope.scaling.yarn_log_multiplier"}));
  ASSERT_TRUE(hp.ok()) << hp.status();
  EXPECT_EQ(hp->ext_factor, 0.0);
  EXPECT_EQ(hp->freq_scale, 1.0);
  EXPECT_NEAR(hp->kq_scale, 1.0 / std::sqrt(48.0), 1e-15);
}

struct BadValue {
  std::string key;
  Value value;
  std::vector<std::string> words;  // the message must contain each
};

TEST(Deepseek2HparamsTest, InconsistentValuesNameTheKey) {
  const std::vector<BadValue> cases = {
      {"general.architecture",
       Value(ValueType::kString, std::string("llama")),
       {"general.architecture", "llama"}},
      {"deepseek2.expert_used_count", U32(17), {"expert_used_count", "expert_count"}},
      {"deepseek2.expert_group_count", U32(3), {"expert_count", "expert_group_count"}},
      {"deepseek2.expert_group_used_count", U32(5), {"expert_group_used_count"}},
      // 9 experts cannot come from 2 kept groups of 4.
      {"deepseek2.expert_used_count", U32(9), {"expert_used_count", "expert_group_used_count"}},
      {"deepseek2.expert_gating_func", U32(3), {"expert_gating_func", "3"}},
      {"deepseek2.attention.key_length", U32(81), {"attention.key_length", "81"}},
      {"deepseek2.attention.value_length", U32(32), {"attention.value_length"}},
      {"deepseek2.attention.head_count_kv", U32(4), {"head_count_kv"}},
      {"deepseek2.rope.dimension_count", U32(15), {"rope.dimension_count", "even"}},
      {"deepseek2.rope.dimension_count", U32(48), {"key_length_mla"}},
      {"deepseek2.leading_dense_block_count", U32(4), {"leading_dense_block_count"}},
      {"deepseek2.block_count", U32(0), {"block_count"}},
      {"deepseek2.rope.scaling.type",
       Value(ValueType::kString, std::string("longrope")),
       {"rope.scaling.type", "longrope"}},
      {"deepseek2.attention.layer_norm_rms_epsilon",
       Value(ValueType::kFloat32, -1.0f),
       {"layer_norm_rms_epsilon"}},
      {"deepseek2.block_count", Value(ValueType::kString, std::string("three")), {"block_count"}},
      {"deepseek2.rope.scaling.factor", Value(ValueType::kFloat32, -2.0f), {"rope.scaling.factor"}},
  };
  for (const BadValue& c : cases) {
    SCOPED_TRACE(c.key + " = " + c.value.ToString());
    gguf::Metadata md = CopyMetadata();
    md.Set(c.key, c.value);
    auto hp = Deepseek2Hparams::FromMetadata(md);
    ASSERT_FALSE(hp.ok());
    for (const std::string& w : c.words) {
      EXPECT_THAT(std::string(hp.status().message()), HasSubstr(w)) << hp.status();
    }
  }
}

TEST(Deepseek2HparamsTest, OldUnsplitMlaFilesAreRejectedWithAReason) {
  auto hp = Deepseek2Hparams::FromMetadata(CopyMetadata({"deepseek2.attention.key_length_mla"}));
  ASSERT_FALSE(hp.ok());
  EXPECT_THAT(std::string(hp.status().message()), HasSubstr("attn_kv_b"));
}

// ---------------------------------------------------------------------------
// Edited copies of the fixture.

struct NewTensor {
  std::string name;
  std::vector<int64_t> ne;
  TensorType type;
  std::vector<uint8_t> data;
};

struct Edit {
  std::set<std::string> drop_keys;
  std::vector<std::pair<std::string, Value>> set_keys;
  std::set<std::string> drop_tensors;
  std::vector<NewTensor> add_tensors;  // replace same-named ones
};

std::vector<uint8_t> F32Bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * sizeof(float));
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// Builds the edited file in memory and loads it. `image` must outlive the model.
absl::StatusOr<std::unique_ptr<Deepseek2Model>> LoadEdited(const Edit& edit,
                                                           std::vector<uint8_t>* image) {
  const gguf::GgufFile& base = BaseFile();
  gguf::GgufWriter w;
  for (const auto& [key, value] : base.metadata().entries()) {
    if (edit.drop_keys.count(key) == 0) KTX_RETURN_IF_ERROR(w.Set(key, value));
  }
  for (const auto& [key, value] : edit.set_keys) KTX_RETURN_IF_ERROR(w.Set(key, value));
  std::set<std::string> replaced;
  for (const NewTensor& t : edit.add_tensors) replaced.insert(t.name);
  for (const gguf::TensorInfo& t : base.tensors()) {
    if (edit.drop_tensors.count(t.name) != 0 || replaced.count(t.name) != 0) continue;
    KTX_RETURN_IF_ERROR(
        w.AddTensor(t.name, t.ne, t.type, std::vector<uint8_t>(t.data, t.data + t.n_bytes)));
  }
  for (const NewTensor& t : edit.add_tensors) {
    KTX_RETURN_IF_ERROR(w.AddTensor(t.name, t.ne, t.type, t.data));
  }
  KTX_ASSIGN_OR_RETURN(*image, w.WriteToMemory());
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<gguf::GgufFile> file,
                       gguf::GgufFile::FromMemory(image->data(), image->size(), "edited.gguf"));
  return Deepseek2Model::Load(std::move(file));
}

TEST(Deepseek2WeightsTest, UneditedCopyLoads) {
  std::vector<uint8_t> image;
  auto model = LoadEdited({}, &image);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_FALSE((*model)->weights().output_tied);
  EXPECT_EQ((*model)->weights().layers.size(), 3u);
  EXPECT_EQ((*model)->weights().layers[0].ffn_gate_inp, nullptr);  // dense
  EXPECT_NE((*model)->weights().layers[1].ffn_gate_inp, nullptr);  // MoE
  EXPECT_NE((*model)->weights().layers[1].exp_probs_b, nullptr);
}

TEST(Deepseek2WeightsTest, MissingTensorIsNamedWithItsShape) {
  for (const auto& [name, shape] : std::vector<std::pair<std::string, std::string>>{
           {"blk.1.ffn_down_exps.weight", "{256, 256, 16}"},
           {"blk.0.attn_k_b.weight", "{32, 64, 4}"},
           {"blk.2.ffn_up_shexp.weight", "{256, 256}"},
           {"blk.0.ffn_gate.weight", "{256, 512}"},
           {"token_embd.weight", "{256, 512}"},
           {"output_norm.weight", "{256}"},
           {"blk.2.attn_q_a_norm.weight", "{128}"}}) {
    SCOPED_TRACE(name);
    std::vector<uint8_t> image;
    Edit edit;
    edit.drop_tensors = {name};
    auto model = LoadEdited(edit, &image);
    ASSERT_FALSE(model.ok());
    EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound) << model.status();
    EXPECT_THAT(std::string(model.status().message()), HasSubstr(name));
    EXPECT_THAT(std::string(model.status().message()), HasSubstr(shape));
    EXPECT_THAT(std::string(model.status().message()), HasSubstr("edited.gguf"));
  }
}

TEST(Deepseek2WeightsTest, WrongShapeIsNamed) {
  // attn_k_b stored untransposed: {kv_lora, qk_nope, n_head} instead of {qk_nope, kv_lora, n_head}.
  const gguf::TensorInfo* k_b = BaseFile().FindTensor("blk.0.attn_k_b.weight");
  ASSERT_NE(k_b, nullptr);
  Edit edit;
  edit.add_tensors.push_back({"blk.0.attn_k_b.weight",
                              {64, 32, 4},
                              k_b->type,
                              std::vector<uint8_t>(k_b->data, k_b->data + k_b->n_bytes)});
  std::vector<uint8_t> image;
  auto model = LoadEdited(edit, &image);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("blk.0.attn_k_b.weight"));
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("{32, 64, 4}"));
}

TEST(Deepseek2WeightsTest, UnsupportedTypeIsNamed) {
  // q4_1: a valid ggml type ktx does not compute with.
  Edit edit;
  edit.add_tensors.push_back({"blk.2.ffn_gate_inp.weight",
                              {256, 16},
                              TensorType::kQ4_1,
                              std::vector<uint8_t>(256 / 32 * 20 * 16, 0)});
  std::vector<uint8_t> image;
  auto model = LoadEdited(edit, &image);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("blk.2.ffn_gate_inp.weight"));
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("q4_1"));
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("supported"));
}

TEST(Deepseek2WeightsTest, FusedAndUnsplitVariantsAreRejectedWithAReason) {
  const gguf::TensorInfo* gate = BaseFile().FindTensor("blk.1.ffn_gate_exps.weight");
  Edit fused;
  fused.drop_tensors = {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"};
  fused.add_tensors.push_back({"blk.1.ffn_gate_up_exps.weight",
                               {256, 512, 16},
                               gate->type,
                               std::vector<uint8_t>(gate->n_bytes * 2, 0)});
  std::vector<uint8_t> image;
  auto model = LoadEdited(fused, &image);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("ffn_gate_up_exps"));

  Edit unsplit;
  unsplit.drop_tensors = {"blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"};
  unsplit.add_tensors.push_back({"blk.0.attn_kv_b.weight",
                                 {64, 256},
                                 TensorType::kF32,
                                 std::vector<uint8_t>(64 * 256 * 4, 0)});
  model = LoadEdited(unsplit, &image);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("attn_kv_b"));
}

TEST(Deepseek2WeightsTest, MissingKeyInFileNamesFileAndKey) {
  Edit edit;
  edit.drop_keys = {"deepseek2.expert_shared_count"};
  std::vector<uint8_t> image;
  auto model = LoadEdited(edit, &image);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("edited.gguf"));
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("deepseek2.expert_shared_count"));
}

TEST(Deepseek2WeightsTest, NoExpProbsBiasIsAllowed) {
  Edit edit;
  edit.drop_tensors = {"blk.1.exp_probs_b.bias", "blk.2.exp_probs_b.bias"};
  std::vector<uint8_t> image;
  auto model = LoadEdited(edit, &image);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->weights().layers[1].exp_probs_b, nullptr);
}

// Without output.weight the head is tied to token_embd: the logits are then
// token_embd · normed hidden state, checked here against a long-double product.
TEST(Deepseek2WeightsTest, TiedOutputUsesTokenEmbd) {
  Edit edit;
  edit.drop_tensors = {"output.weight"};
  std::vector<uint8_t> image;
  auto model = LoadEdited(edit, &image);
  ASSERT_TRUE(model.ok()) << model.status();
  const Deepseek2Model& m = **model;
  EXPECT_TRUE(m.weights().output_tied);
  EXPECT_EQ(m.weights().output, m.weights().token_embd);

  Activations x(2, 256);
  for (int64_t i = 0; i < 512; ++i) x.data()[i] = std::sin(0.37 * i) + 0.1f;
  Activations logits;
  ASSERT_TRUE(m.Head(x, LogitsRows::kAll, &logits).ok());
  ASSERT_EQ(logits.n_tokens(), 2);
  ASSERT_EQ(logits.n_cols(), 512);
  const gguf::TensorInfo& embd = *m.weights().token_embd;
  std::vector<float> row(256);
  for (int64_t t = 0; t < 2; ++t) {
    long double ss = 0;
    for (int64_t i = 0; i < 256; ++i) ss += static_cast<long double>(x.row(t)[i]) * x.row(t)[i];
    const long double inv = 1.0L / std::sqrt(ss / 256 + m.hparams().rms_eps);
    for (int64_t v = 0; v < 512; v += 37) {
      kernels::DequantizeRow(embd.type, embd.data + v * embd.row_bytes(), row.data(), 256);
      long double want = 0;
      for (int64_t i = 0; i < 256; ++i) want += row[i] * (x.row(t)[i] * inv);  // output_norm = 1
      EXPECT_NEAR(logits.row(t)[v], static_cast<double>(want), 1e-5 * (1 + std::fabs(want)));
    }
  }
}

// The lite layout (no q_lora: q = attn_q · h) against the full layout with
// q_a = identity, q_a_norm = 1 and q_b = attn_q: both compute the same q up to
// RMSNorm's epsilon (h already has unit RMS), so the logits agree to ~1e-6.
TEST(Deepseek2WeightsTest, LiteLayoutMatchesFullLayoutWithIdentityQa) {
  const int64_t n_embd = 256, q_width = 4 * 48;
  Edit full, lite;
  full.set_keys.push_back({"deepseek2.attention.q_lora_rank", U32(256)});
  lite.drop_keys = {"deepseek2.attention.q_lora_rank"};
  std::vector<float> identity(n_embd * n_embd, 0.0f);
  for (int64_t i = 0; i < n_embd; ++i) identity[i * n_embd + i] = 1.0f;
  for (int il = 0; il < 3; ++il) {
    const std::string p = "blk." + std::to_string(il) + ".";
    std::vector<float> m(n_embd * q_width);
    for (size_t i = 0; i < m.size(); ++i) {
      m[i] = 0.0625f * static_cast<float>(std::sin(1.7 * i + il) + std::cos(0.3 * i));
    }
    full.add_tensors.push_back(
        {p + "attn_q_a.weight", {n_embd, n_embd}, TensorType::kF32, F32Bytes(identity)});
    full.add_tensors.push_back({p + "attn_q_a_norm.weight",
                                {n_embd},
                                TensorType::kF32,
                                F32Bytes(std::vector<float>(n_embd, 1.0f))});
    full.add_tensors.push_back(
        {p + "attn_q_b.weight", {n_embd, q_width}, TensorType::kF32, F32Bytes(m)});
    lite.drop_tensors.insert(p + "attn_q_a.weight");
    lite.drop_tensors.insert(p + "attn_q_a_norm.weight");
    lite.drop_tensors.insert(p + "attn_q_b.weight");
    lite.add_tensors.push_back(
        {p + "attn_q.weight", {n_embd, q_width}, TensorType::kF32, F32Bytes(m)});
  }
  std::vector<uint8_t> full_image, lite_image;
  auto full_model = LoadEdited(full, &full_image);
  ASSERT_TRUE(full_model.ok()) << full_model.status();
  auto lite_model = LoadEdited(lite, &lite_image);
  ASSERT_TRUE(lite_model.ok()) << lite_model.status();
  EXPECT_TRUE((*lite_model)->hparams().is_lite());
  EXPECT_NE((*lite_model)->weights().layers[0].attn_q, nullptr);

  const std::vector<int32_t> tokens = PromptTokens();
  Activations a, b;
  auto kv_a = kv_cache::SequenceKv::Create((*full_model)->kv_layout(), 80);
  auto kv_b = kv_cache::SequenceKv::Create((*lite_model)->kv_layout(), 80);
  ASSERT_TRUE((*full_model)->Forward(tokens, kv_a->get(), LogitsRows::kAll, &a).ok());
  ASSERT_TRUE((*lite_model)->Forward(tokens, kv_b->get(), LogitsRows::kAll, &b).ok());
  double diff = 0, ref = 0;
  for (size_t i = 0; i < a.values().size(); ++i) {
    diff += std::pow(static_cast<double>(a.values()[i]) - b.values()[i], 2);
    ref += std::pow(static_cast<double>(a.values()[i]), 2);
  }
  EXPECT_LT(std::sqrt(diff / ref), 1e-5);

  // A lite file without attn_q names the tensor and the reason.
  Edit broken = lite;
  broken.add_tensors.erase(broken.add_tensors.begin());  // blk.0.attn_q.weight
  std::vector<uint8_t> broken_image;
  auto broken_model = LoadEdited(broken, &broken_image);
  ASSERT_FALSE(broken_model.ok());
  EXPECT_THAT(std::string(broken_model.status().message()), HasSubstr("blk.0.attn_q.weight"));
  EXPECT_THAT(std::string(broken_model.status().message()), HasSubstr("lite"));
}

// ---------------------------------------------------------------------------
// Stages.

class Deepseek2StagesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = Deepseek2Model::Open(kBase);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    tokens_ = PromptTokens();
    tokens_.resize(23);
  }
  std::unique_ptr<kv_cache::SequenceKv> NewSequence(int64_t capacity = 64) {
    auto kv = kv_cache::SequenceKv::Create(model_->kv_layout(), capacity);
    KTX_CHECK(kv.ok());
    return std::move(*kv);
  }
  std::unique_ptr<Deepseek2Model> model_;
  std::vector<int32_t> tokens_;
};

// Forward is exactly the composition of the public stages.
TEST_F(Deepseek2StagesTest, StagesComposeToForward) {
  auto kv_forward = NewSequence();
  Activations want;
  ASSERT_TRUE(model_->Forward(tokens_, kv_forward.get(), LogitsRows::kAll, &want).ok());

  auto kv = NewSequence();
  std::vector<int32_t> positions(tokens_.size());
  for (size_t t = 0; t < positions.size(); ++t) positions[t] = static_cast<int32_t>(t);
  Activations x, h, f, routed_a, routed_b, shared, logits;
  ASSERT_TRUE(model_->Embed(tokens_, &x).ok());
  const int32_t n_expert = model_->hparams().n_expert;
  for (int il = 0; il < model_->hparams().n_layer; ++il) {
    ASSERT_TRUE(model_->AttentionBlock(il, positions, kv.get(), &x).ok());
    ASSERT_TRUE(model_->FfnNorm(il, x, &h).ok());
    if (!model_->hparams().IsMoeLayer(il)) {
      ASSERT_TRUE(model_->DenseFfn(il, h, &f).ok());
      const Activations* parts[] = {&f};
      ASSERT_TRUE(model_->Combine(parts, &x).ok());
      continue;
    }
    Routing routing;
    ASSERT_TRUE(model_->Route(il, h, &routing).ok());
    // Experts split in two disjoint halves, as two shards would compute them.
    std::vector<uint8_t> even(n_expert), odd(n_expert);
    for (int e = 0; e < n_expert; ++e) (e % 2 == 0 ? even : odd)[e] = 1;
    ASSERT_TRUE(model_->RoutedExperts(il, h, routing, even, &routed_a).ok());
    ASSERT_TRUE(model_->RoutedExperts(il, h, routing, odd, &routed_b).ok());
    ASSERT_TRUE(model_->SharedExperts(il, h, &shared).ok());
    const Activations* parts[] = {&routed_a, &routed_b, &shared};
    ASSERT_TRUE(model_->Combine(parts, &x).ok());
  }
  ASSERT_TRUE(kv->Commit(static_cast<int64_t>(tokens_.size())).ok());
  ASSERT_TRUE(model_->Head(x, LogitsRows::kAll, &logits).ok());
  ASSERT_EQ(logits.values().size(), want.values().size());
  double max_rel = 0;
  for (size_t i = 0; i < want.values().size(); ++i) {
    max_rel = std::max(max_rel, std::fabs(logits.values()[i] - want.values()[i]) /
                                    (1.0 + std::fabs(want.values()[i])));
  }
  EXPECT_LT(max_rel, 1e-5);  // shard partials are rounded once more than the full sum
}

TEST_F(Deepseek2StagesTest, ExpertMaskPartialsAddUpToTheFullSum) {
  auto kv = NewSequence();
  std::vector<int32_t> positions(tokens_.size());
  for (size_t t = 0; t < positions.size(); ++t) positions[t] = static_cast<int32_t>(t);
  Activations x, h;
  ASSERT_TRUE(model_->Embed(tokens_, &x).ok());
  ASSERT_TRUE(model_->AttentionBlock(0, positions, kv.get(), &x).ok());
  ASSERT_TRUE(model_->FfnNorm(1, x, &h).ok());
  Routing routing;
  ASSERT_TRUE(model_->Route(1, h, &routing).ok());
  // Routing of the fixture: 4 distinct experts from at most 2 groups of 4,
  // weights summing to the scale 2.5.
  for (int64_t t = 0; t < routing.n_tokens; ++t) {
    std::set<int32_t> ids, groups;
    double sum = 0;
    for (int k = 0; k < routing.n_expert_used; ++k) {
      ids.insert(routing.id(t, k));
      groups.insert(routing.id(t, k) / 4);
      sum += routing.weight(t, k);
    }
    EXPECT_EQ(ids.size(), 4u);
    EXPECT_LE(groups.size(), 2u);
    EXPECT_NEAR(sum, 2.5, 1e-6);
  }
  Activations full, part_a, part_b;
  ASSERT_TRUE(model_->RoutedExperts(1, h, routing, {}, &full).ok());
  std::vector<uint8_t> low(16, 0), high(16, 0);
  for (int e = 0; e < 16; ++e) (e < 5 ? low : high)[e] = 1;
  ASSERT_TRUE(model_->RoutedExperts(1, h, routing, low, &part_a).ok());
  ASSERT_TRUE(model_->RoutedExperts(1, h, routing, high, &part_b).ok());
  double diff = 0, norm = 0, norm_a = 0;
  for (size_t i = 0; i < full.values().size(); ++i) {
    diff += std::pow(
        static_cast<double>(part_a.values()[i]) + part_b.values()[i] - full.values()[i], 2);
    norm += std::pow(static_cast<double>(full.values()[i]), 2);
    norm_a += std::pow(static_cast<double>(part_a.values()[i]), 2);
  }
  EXPECT_LT(std::sqrt(diff / norm), 1e-6);
  EXPECT_GT(norm_a, 0.0);  // the split is not trivial
  // A mask of the wrong length is an error.
  EXPECT_FALSE(model_->RoutedExperts(1, h, routing, std::vector<uint8_t>(3, 1), &full).ok());
}

// An expert backend that records calls and delegates to the reference.
class RecordingBackend : public ExpertBackend {
 public:
  explicit RecordingBackend(const Deepseek2Model& model)
      : reference_(model.hparams(), model.weights()) {}
  absl::Status Compute(int il, const Activations& h, const Routing& routing,
                       std::span<const uint8_t> mask, Activations* out) override {
    layers.push_back(il);
    if (fail) return absl::UnavailableError("shard 3 is down");
    return reference_.Compute(il, h, routing, mask, out);
  }
  std::vector<int> layers;
  bool fail = false;

 private:
  ReferenceExpertBackend reference_;
};

TEST_F(Deepseek2StagesTest, ExpertBackendIsPluggable) {
  auto kv_ref = NewSequence();
  Activations want;
  ASSERT_TRUE(model_->Forward(tokens_, kv_ref.get(), LogitsRows::kLast, &want).ok());

  RecordingBackend backend(*model_);
  model_->SetExpertBackend(&backend);
  auto kv = NewSequence();
  Activations got;
  ASSERT_TRUE(model_->Forward(tokens_, kv.get(), LogitsRows::kLast, &got).ok());
  EXPECT_EQ(backend.layers, (std::vector<int>{1, 2}));
  EXPECT_EQ(got.values(), want.values());

  // A failing backend fails the pass, and the sequence is unchanged.
  backend.fail = true;
  const int64_t before = kv->length();
  const absl::Status s = model_->Forward(tokens_, kv.get(), LogitsRows::kLast, &got);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(kv->length(), before);

  model_->SetExpertBackend(nullptr);  // back to the reference
  EXPECT_TRUE(model_->Forward(tokens_, kv.get(), LogitsRows::kLast, &got).ok());
}

TEST_F(Deepseek2StagesTest, ForwardErrors) {
  Activations logits;
  // Token out of the vocabulary.
  auto kv = NewSequence();
  const std::vector<int32_t> bad = {0, 5, 512};
  absl::Status s = model_->Forward(bad, kv.get(), LogitsRows::kAll, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(s.message()), HasSubstr("512"));
  EXPECT_EQ(kv->length(), 0);
  // Empty batch.
  EXPECT_FALSE(model_->Forward({}, kv.get(), LogitsRows::kAll, &logits).ok());
  // The sequence is full.
  auto small = NewSequence(10);
  s = model_->Forward(tokens_, small.get(), LogitsRows::kAll, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("capacity 10"));
  EXPECT_EQ(small->length(), 0);
  // A cache of another layout.
  auto other = kv_cache::SequenceKv::Create({3, 512, 64}, 64);
  ASSERT_TRUE(other.ok());
  s = model_->Forward(tokens_, other->get(), LogitsRows::kAll, &logits);
  EXPECT_THAT(std::string(s.message()), HasSubstr("does not match"));
  // Positions that do not continue the sequence.
  Activations x;
  ASSERT_TRUE(model_->Embed(tokens_, &x).ok());
  std::vector<int32_t> positions(tokens_.size(), 0);
  s = model_->AttentionBlock(0, positions, kv.get(), &x);
  EXPECT_THAT(std::string(s.message()), HasSubstr("position"));
  // Stages on the wrong kind of layer, and bad layer indices.
  Activations h = x, out;
  Routing routing;
  EXPECT_EQ(model_->DenseFfn(1, h, &out).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(model_->Route(0, h, &routing).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(model_->FfnNorm(3, h, &out).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(model_->FfnNorm(-1, h, &out).code(), absl::StatusCode::kOutOfRange);
  // Activations of the wrong width.
  Activations narrow(2, 100);
  EXPECT_EQ(model_->FfnNorm(0, narrow, &out).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ktx::models
