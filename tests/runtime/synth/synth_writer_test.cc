// Synthetic models written to memory and to /tmp, read back with ktx's GGUF
// reader, and checked: the fixture's metadata keys and values, every block of
// every tensor valid (finite, positive scales; finite dequantized values, with
// the dequantizer of kernels/cpu/quant), value statistics at the planned
// scale, and byte-identical output for the same seed whatever the thread
// count, chunk size or split.
#include "runtime/synth/synth_writer.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/quant/blocks.h"
#include "kernels/cpu/quant/quant.h"
#include "runtime/gguf/gguf.h"
#include "runtime/synth/random_blocks.h"

namespace ktx::synth {
namespace {

using kernels::TensorType;

ModelPlan TinyPlan(Quant quant) {
  absl::StatusOr<ModelConfig> config = MakeConfig(Preset::kTiny, {});
  EXPECT_TRUE(config.ok()) << config.status();
  absl::StatusOr<ModelPlan> plan = PlanModel(*config, quant);
  EXPECT_TRUE(plan.ok()) << plan.status();
  return *std::move(plan);
}

std::vector<uint8_t> ToMemory(const ModelPlan& plan, uint64_t seed, int n_threads,
                              size_t chunk_bytes = size_t{128} << 20) {
  SynthWriteOptions options;
  options.seed = seed;
  options.n_threads = n_threads;
  options.chunk_bytes = chunk_bytes;
  absl::StatusOr<std::vector<uint8_t>> bytes = WriteSynthModelToMemory(plan, options);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.ok() ? *std::move(bytes) : std::vector<uint8_t>();
}

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "ktx_synth_" + std::to_string(getpid()) + "_" + name;
}

// Block scales must be finite and positive (and dmin >= 0).
void ExpectValidScales(const gguf::TensorInfo& t) {
  const int64_t n_blocks = static_cast<int64_t>(t.n_bytes) / kernels::TraitsOf(t.type).type_size;
  auto check = [&](uint16_t half, const char* field, int64_t b, bool allow_zero) {
    const float v = kernels::HalfToFloat(half);
    ASSERT_TRUE(std::isfinite(v) && (allow_zero ? v >= 0 : v > 0))
        << t.name << " block " << b << " " << field << " = " << v;
  };
  for (int64_t b = 0; b < n_blocks; ++b) {
    switch (t.type) {
      case TensorType::kQ8_0: {
        const auto* blk = reinterpret_cast<const kernels::BlockQ8_0*>(t.data) + b;
        check(blk->d, "d", b, false);
        for (int8_t q : blk->qs) ASSERT_GE(q, -127) << t.name;  // -128 is never produced
        break;
      }
      case TensorType::kQ5_0:
        check((reinterpret_cast<const kernels::BlockQ5_0*>(t.data) + b)->d, "d", b, false);
        break;
      case TensorType::kQ4_K: {
        const auto* blk = reinterpret_cast<const kernels::BlockQ4K*>(t.data) + b;
        check(blk->d, "d", b, false);
        check(blk->dmin, "dmin", b, true);
        break;
      }
      case TensorType::kQ6_K:
        check((reinterpret_cast<const kernels::BlockQ6K*>(t.data) + b)->d, "d", b, false);
        break;
      default: return;
    }
  }
}

struct Stats {
  double mean = 0, std = 0;
  bool finite = true;
};

Stats DequantizedStats(const gguf::TensorInfo& t) {
  const int64_t ne0 = t.ne[0];
  std::vector<float> row(static_cast<size_t>(ne0));
  double sum = 0, sum2 = 0;
  const int64_t n_rows = t.n_rows();
  Stats s;
  for (int64_t r = 0; r < n_rows; ++r) {
    kernels::DequantizeRow(t.type, t.data + r * t.row_bytes(), row.data(), ne0);
    for (float v : row) {
      s.finite &= std::isfinite(v);
      sum += v;
      sum2 += static_cast<double>(v) * v;
    }
  }
  const double n = static_cast<double>(ne0 * n_rows);
  s.mean = sum / n;
  s.std = std::sqrt(std::max(0.0, sum2 / n - s.mean * s.mean));
  return s;
}

void CheckModelImage(const gguf::GgufFile& f, const ModelPlan& plan) {
  ASSERT_EQ(f.tensors().size(), plan.tensors.size());
  for (size_t i = 0; i < plan.tensors.size(); ++i) {
    const TensorPlan& p = plan.tensors[i];
    const gguf::TensorInfo& t = f.tensors()[i];
    ASSERT_EQ(t.name, p.name);
    ASSERT_EQ(t.ne, p.ne) << p.name;
    ASSERT_EQ(t.type, p.type) << p.name;
    ASSERT_EQ(t.n_bytes, p.n_bytes) << p.name;
    ExpectValidScales(t);
    const Stats s = DequantizedStats(t);
    EXPECT_TRUE(s.finite) << p.name;
    if (p.init == Init::kOnes) {
      EXPECT_EQ(s.mean, 1.0) << p.name;
      EXPECT_EQ(s.std, 0.0) << p.name;
    } else if (p.n_elements() >= 4096) {
      EXPECT_NEAR(s.std, p.std, 0.05 * p.std) << p.name;
      EXPECT_LT(std::fabs(s.mean), 0.08 * p.std) << p.name;
    }
  }
}

class SynthQuantTest : public ::testing::TestWithParam<Quant> {};

TEST_P(SynthQuantTest, TinyModelFileOpensAndEveryBlockIsValid) {
  const ModelPlan plan = TinyPlan(GetParam());
  const std::string path = TempPath(std::string(QuantName(GetParam())) + ".gguf");
  SynthWriteOptions options;
  options.seed = 42;
  absl::StatusOr<SynthWriteResult> r = WriteSynthModel(plan, path, options);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->paths, std::vector<std::string>{path});
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> f = gguf::GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  CheckModelImage(**f, plan);
  EXPECT_EQ((*f)->metadata().GetU32("general.file_type").value(), FileType(GetParam()));
  std::remove(path.c_str());
}

INSTANTIATE_TEST_SUITE_P(AllQuants, SynthQuantTest,
                         ::testing::Values(Quant::kQ4_K_M, Quant::kQ8_0, Quant::kBF16),
                         [](const auto& info) { return std::string(QuantName(info.param)); });

// Every key of the fixture (written by llama.cpp's tools for the same shape)
// is present with the same type; numeric and string values are equal too.
TEST(SynthWriterTest, MetadataMatchesFixture) {
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> fixture =
      gguf::GgufFile::Open(std::string(KTX_SOURCE_DIR) + "/tests/data/dsv3-tiny-q4_k_m.gguf");
  ASSERT_TRUE(fixture.ok()) << fixture.status();
  const std::vector<uint8_t> bytes = ToMemory(TinyPlan(Quant::kQ4_K_M), 1, 0);
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> ours =
      gguf::GgufFile::FromMemory(bytes.data(), bytes.size(), "synth.gguf");
  ASSERT_TRUE(ours.ok()) << ours.status();
  const std::set<std::string> differ = {"general.name", "tokenizer.ggml.tokens",
                                        "tokenizer.ggml.token_type", "tokenizer.ggml.merges"};
  for (const auto& [key, value] : (*fixture)->metadata().entries()) {
    const gguf::Value* mine = (*ours)->metadata().Find(key);
    ASSERT_NE(mine, nullptr) << "missing key " << key;
    EXPECT_EQ(mine->TypeString(), value.TypeString()) << key;
    if (!differ.count(key)) {
      EXPECT_EQ(mine->ToString(), value.ToString()) << key;
    }
  }
  const gguf::Metadata& m = (*ours)->metadata();
  EXPECT_EQ(m.GetStringArray("tokenizer.ggml.tokens")->size(), 512u);
  EXPECT_EQ(m.GetStringArray("tokenizer.ggml.merges")->size(), 512u - 263u);
  EXPECT_NE(m.GetString("tokenizer.chat_template")->find("<｜Assistant｜>"), std::string::npos);
}

TEST(SynthWriterTest, SameSeedSameBytesDifferentSeedDifferentBytes) {
  const ModelPlan plan = TinyPlan(Quant::kQ4_K_M);
  const std::vector<uint8_t> a = ToMemory(plan, 7, 0);
  const std::vector<uint8_t> b = ToMemory(plan, 7, 0);
  const std::vector<uint8_t> c = ToMemory(plan, 8, 0);
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b);
  ASSERT_EQ(a.size(), c.size());  // same layout, different data
  EXPECT_FALSE(a == c);
}

TEST(SynthWriterTest, ThreadCountAndChunkSizeDoNotChangeBytes) {
  for (Quant quant : {Quant::kQ4_K_M, Quant::kQ8_0, Quant::kBF16}) {
    const ModelPlan plan = TinyPlan(quant);
    const std::vector<uint8_t> one = ToMemory(plan, 3, 1);
    EXPECT_TRUE(one == ToMemory(plan, 3, 2)) << QuantName(quant);
    EXPECT_TRUE(one == ToMemory(plan, 3, 5, 4096)) << QuantName(quant);  // tiny chunks
    EXPECT_TRUE(one == ToMemory(plan, 3, 0, 100000)) << QuantName(quant);
  }
}

TEST(SynthWriterTest, ProgressCountsEveryTensorByte) {
  const ModelPlan plan = TinyPlan(Quant::kQ4_K_M);
  SynthWriteOptions options;
  options.chunk_bytes = 65536;
  uint64_t last = 0;
  int calls = 0;
  options.progress = [&](uint64_t done, uint64_t total) {
    EXPECT_GT(done, last);
    EXPECT_EQ(total, plan.total_bytes());
    last = done;
    ++calls;
  };
  ASSERT_TRUE(WriteSynthModelToMemory(plan, options).ok());
  EXPECT_EQ(last, plan.total_bytes());
  EXPECT_GE(calls, static_cast<int>(plan.tensors.size()));
}

TEST(SynthWriterTest, SplitFilesHoldTheSameTensors) {
  const ModelPlan plan = TinyPlan(Quant::kQ8_0);
  const std::vector<uint8_t> single = ToMemory(plan, 11, 0);
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> whole =
      gguf::GgufFile::FromMemory(single.data(), single.size(), "whole.gguf");
  ASSERT_TRUE(whole.ok()) << whole.status();
  SynthWriteOptions options;
  options.seed = 11;
  options.n_split = 3;
  const std::string path = TempPath("split.gguf");
  absl::StatusOr<SynthWriteResult> r = WriteSynthModel(plan, path, options);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->paths.size(), 3u);
  EXPECT_NE(r->paths[0].find("-00001-of-00003.gguf"), std::string::npos);
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> parts = gguf::GgufFile::Open(r->paths[0]);
  ASSERT_TRUE(parts.ok()) << parts.status();
  ASSERT_EQ((*parts)->tensors().size(), (*whole)->tensors().size());
  std::set<int> files;
  for (const gguf::TensorInfo& t : (*whole)->tensors()) {
    const gguf::TensorInfo* p = (*parts)->FindTensor(t.name);
    ASSERT_NE(p, nullptr) << t.name;
    files.insert(p->file_index);
    ASSERT_EQ(p->n_bytes, t.n_bytes);
    EXPECT_EQ(std::memcmp(p->data, t.data, t.n_bytes), 0) << t.name;
  }
  EXPECT_EQ(files.size(), 3u);
  for (const std::string& p : r->paths) std::remove(p.c_str());
}

// The router of a MoE layer spreads tokens over the experts: for random
// unit-RMS inputs the top-4 of sigmoid(router x) + bias picks many different
// experts, and no expert is picked for every input.
TEST(SynthWriterTest, RoutingIsNotDegenerate) {
  const ModelPlan plan = TinyPlan(Quant::kQ4_K_M);
  const std::vector<uint8_t> bytes = ToMemory(plan, 5, 0);
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> f =
      gguf::GgufFile::FromMemory(bytes.data(), bytes.size(), "synth.gguf");
  ASSERT_TRUE(f.ok());
  const gguf::TensorInfo* router = (*f)->FindTensor("blk.1.ffn_gate_inp.weight");
  const gguf::TensorInfo* bias = (*f)->FindTensor("blk.1.exp_probs_b.bias");
  ASSERT_TRUE(router && bias);
  const int64_t n_embd = router->ne[0], n_expert = router->ne[1];
  const float* w = reinterpret_cast<const float*>(router->data);
  const float* b = reinterpret_cast<const float*>(bias->data);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<int> picked(static_cast<size_t>(n_expert), 0);
  const int n_inputs = 64;
  for (int n = 0; n < n_inputs; ++n) {
    std::vector<float> x(static_cast<size_t>(n_embd));
    for (float& v : x) v = normal(gen);
    std::vector<std::pair<double, int>> score;
    for (int64_t e = 0; e < n_expert; ++e) {
      double dot = 0;
      for (int64_t i = 0; i < n_embd; ++i) dot += w[e * n_embd + i] * x[static_cast<size_t>(i)];
      score.emplace_back(1.0 / (1.0 + std::exp(-dot)) + b[e], static_cast<int>(e));
    }
    std::partial_sort(score.begin(), score.begin() + 4, score.end(), std::greater<>());
    for (int k = 0; k < 4; ++k) ++picked[static_cast<size_t>(score[k].second)];
  }
  const int used =
      static_cast<int>(std::count_if(picked.begin(), picked.end(), [](int c) { return c > 0; }));
  EXPECT_GE(used, 12);
  EXPECT_LT(*std::max_element(picked.begin(), picked.end()), n_inputs);
}

TEST(RandomBlocksTest, F16AndRowRangesAndErrors) {
  TensorPlan t;
  t.name = "x.weight";
  t.ne = {48, 10};
  t.type = TensorType::kF16;
  t.std = 0.5f;
  t.n_bytes = 48 * 10 * 2;
  std::vector<uint8_t> all(t.n_bytes), part(t.n_bytes);
  const uint64_t key = TensorKey(9, t.name);
  ASSERT_TRUE(FillTensorRows(t, key, 0, 10, all.data()).ok());
  // Rows generated in pieces equal rows generated at once.
  ASSERT_TRUE(FillTensorRows(t, key, 0, 3, part.data()).ok());
  ASSERT_TRUE(FillTensorRows(t, key, 3, 7, part.data() + 3 * 96).ok());
  EXPECT_TRUE(all == part);
  std::vector<float> v(480);
  kernels::DequantizeRow(TensorType::kF16, all.data(), v.data(), 480);
  for (float x : v) EXPECT_LE(std::fabs(x), 0.5f * 3.5f);
  EXPECT_FALSE(FillTensorRows(t, key, 5, 6, part.data()).ok());  // past the end
  t.type = TensorType::kQ2_K;
  t.ne = {256, 1};
  EXPECT_FALSE(FillTensorRows(t, key, 0, 1, part.data()).ok());
}

}  // namespace
}  // namespace ktx::synth
