// Dequantization checked against a reference ktx did not write: the fixtures
// tests/data/dsv3-tiny-{bf16,q8_0,q4_k_m}.gguf hold the same random model in
// three storage types, the quantized ones made by llama.cpp's llama-quantize
// from the f32 weights (tests/data/README.md). Every quantized tensor must
// dequantize close to the bf16 tensor of the same name, by the margin its
// format implies; a layout or bit-order bug gives errors of order 100 %.
//
// The files are read with runtime/gguf (only for the tensor table and data).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/tensor_type.h"
#include "kernels/cpu/quant/quant.h"
#include "runtime/gguf/gguf.h"

namespace ktx::kernels {
namespace {

// All elements of tensor `t` as floats (through DequantizeRow, row by row).
std::vector<float> Dequantized(const gguf::TensorInfo& t) {
  std::vector<float> out(static_cast<size_t>(t.n_elements()));
  for (int64_t r = 0; r < t.n_rows(); ++r) {
    DequantizeRow(t.type, t.data + r * t.row_bytes(), out.data() + r * t.ne[0], t.ne[0]);
  }
  return out;
}

const gguf::GgufFile& Fixture(const std::string& which) {
  static std::map<std::string, std::unique_ptr<gguf::GgufFile>> cache;
  auto& slot = cache[which];
  if (!slot) {
    auto file = gguf::GgufFile::Open(std::string(KTX_SOURCE_DIR) + "/tests/data/dsv3-tiny-" +
                                     which + ".gguf");
    if (!file.ok()) {
      ADD_FAILURE() << file.status();
      std::abort();
    }
    slot = std::move(*file);
  }
  return *slot;
}

double RelL2(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = double{a[i]} - ref[i];
    num += d * d;
    den += double{ref[i]} * ref[i];
  }
  return std::sqrt(num / den);
}

// Every quantized tensor of `which` against the bf16 file; returns the worst
// and best rel L2 per storage type.
struct TypeStats {
  int n_tensors = 0;
  double min_rel = INFINITY;
  double max_rel = 0.0;
};
std::map<TensorType, TypeStats> CompareWithBf16(const std::string& which) {
  const gguf::GgufFile& bf16 = Fixture("bf16");
  const gguf::GgufFile& file = Fixture(which);
  std::map<TensorType, TypeStats> stats;
  EXPECT_EQ(file.tensors().size(), bf16.tensors().size());
  for (const gguf::TensorInfo& t : file.tensors()) {
    const std::string& name = t.name;
    SCOPED_TRACE(which + " " + name);
    const gguf::TensorInfo* ref = bf16.FindTensor(name);
    EXPECT_NE(ref, nullptr);
    if (ref == nullptr) continue;
    EXPECT_EQ(t.ne, ref->ne);
    const std::vector<float> a = Dequantized(t);
    const std::vector<float> b = Dequantized(*ref);
    if (t.type == TensorType::kF32) {
      EXPECT_EQ(ref->type, TensorType::kF32);
      EXPECT_EQ(a, b);  // norms, router, bias: stored identically
      continue;
    }
    EXPECT_EQ(ref->type, TensorType::kBF16);
    TypeStats& s = stats[t.type];
    const double rel = RelL2(a, b);
    ++s.n_tensors;
    s.min_rel = std::min(s.min_rel, rel);
    s.max_rel = std::max(s.max_rel, rel);
  }
  for (const auto& [type, s] : stats) {
    std::printf("%s vs bf16: %-5s %2d tensors, rel L2 %.4f .. %.4f\n", which.c_str(),
                TraitsOf(type).name, s.n_tensors, s.min_rel, s.max_rel);
  }
  return stats;
}

// Q8_0 weights are within half a quantization step of the weights they were
// made from; bf16 is those weights rounded to 8 significant bits. So, per
// element, |q8_0 - bf16| <= 0.5 d + 127 |d - half(d)| + 2^-8 |bf16|, with d
// the block's stored scale: a direct check of every element's position.
TEST(GgufFixtureTest, Q8_0ElementsWithinHalfAStepOfBf16) {
  const gguf::GgufFile& bf16 = Fixture("bf16");
  const gguf::GgufFile& q8 = Fixture("q8_0");
  int n_checked = 0;
  for (const gguf::TensorInfo& t : q8.tensors()) {
    const std::string& name = t.name;
    if (t.type != TensorType::kQ8_0) continue;
    SCOPED_TRACE(name);
    const gguf::TensorInfo* ref = bf16.FindTensor(name);
    ASSERT_NE(ref, nullptr);
    const std::vector<float> a = Dequantized(t);
    const std::vector<float> b = Dequantized(*ref);
    const uint8_t* blocks = t.data;
    for (size_t i = 0; i < a.size(); ++i) {
      const uint8_t* blk = blocks + (i / 32) * 34;
      const double d =
          std::fabs(double{HalfToFloat(static_cast<uint16_t>(blk[0] | (blk[1] << 8)))});
      const double bound =
          0.5 * d + 127 * d * std::ldexp(1.0, -11) + std::ldexp(1.0, -8) * std::fabs(b[i]);
      ASSERT_LE(std::fabs(double{a[i]} - b[i]), bound) << "element " << i;
    }
    ++n_checked;
  }
  EXPECT_GE(n_checked, 30);
}

TEST(GgufFixtureTest, Q8_0FileCloseToBf16) {
  const auto stats = CompareWithBf16("q8_0");
  ASSERT_EQ(stats.size(), 1u);
  const TypeStats& s = stats.at(TensorType::kQ8_0);
  // Gaussian weights, blocks of 32: step ~ 2.2 sigma / 127, rms error step / sqrt(12)
  // ~ 0.5 %; with bf16's own rounding (~0.1 %) on the reference side.
  EXPECT_GE(s.min_rel, 0.004);
  EXPECT_LE(s.max_rel, 0.0075);
}

TEST(GgufFixtureTest, Q4KMFileCloseToBf16) {
  const auto stats = CompareWithBf16("q4_k_m");
  // The file must exercise every type the Q4_K_M mix uses here.
  for (TensorType t : {TensorType::kQ4_K, TensorType::kQ5_0, TensorType::kQ6_K}) {
    ASSERT_TRUE(stats.count(t)) << TraitsOf(t).name << " missing from the q4_k_m file";
  }
  EXPECT_EQ(stats.size(), 3u);
  const TypeStats& q4k = stats.at(TensorType::kQ4_K);
  const TypeStats& q5_0 = stats.at(TensorType::kQ5_0);
  const TypeStats& q6k = stats.at(TensorType::kQ6_K);
  // Gaussian weights without an importance matrix: Q4_K (4.5 bpw, 6-bit
  // sub-block scales and mins) ~7 %, Q5_0 (step ~ amax/16 per 32) ~4 %,
  // Q6_K (16-element sub-blocks, 64 levels) ~2 %. A misread bit or scale
  // gives tens of percent.
  EXPECT_GE(q4k.min_rel, 0.05);
  EXPECT_LE(q4k.max_rel, 0.09);
  EXPECT_GE(q5_0.min_rel, 0.03);
  EXPECT_LE(q5_0.max_rel, 0.055);
  EXPECT_GE(q6k.min_rel, 0.012);
  EXPECT_LE(q6k.max_rel, 0.025);
}

// The bf16 weights have the generator's scales (tests/data/README.md 2.4):
// matrices N(0, 1/fan_in) (fan_in = ne0, except attn_k_b), token_embd N(0, 1), output.weight 8x,
// router N(0, 1/256), exp_probs_b N(0, 0.02^2), norms exactly 1. A misread bf16 could not match.
TEST(GgufFixtureTest, Bf16WeightsHaveTheGeneratorsScale) {
  const gguf::GgufFile& bf16 = Fixture("bf16");
  int n_checked = 0;
  for (const gguf::TensorInfo& t : bf16.tensors()) {
    const std::string& name = t.name;
    SCOPED_TRACE(name);
    const std::vector<float> v = Dequantized(t);
    if (name.find("norm") != std::string::npos) {
      for (float x : v) ASSERT_EQ(x, 1.0f);
      continue;
    }
    double expected_std = 1.0 / std::sqrt(static_cast<double>(t.ne[0]));
    // attn_k_b {qk_nope, kv_lora, heads} is the k half of the model's
    // kv_b_proj, whose input size is kv_lora (ne1), not ne0.
    if (name.find("attn_k_b") != std::string::npos) {
      expected_std = 1.0 / std::sqrt(static_cast<double>(t.ne[1]));
    }
    if (name == "token_embd.weight") expected_std = 1.0;
    if (name == "output.weight") expected_std = 8.0 / 16.0;
    if (name.find("exp_probs_b") != std::string::npos) expected_std = 0.02;
    double sum = 0.0, sum2 = 0.0;
    for (float x : v) {
      sum += x;
      sum2 += double{x} * x;
    }
    const double n = static_cast<double>(v.size());
    const double mean = sum / n;
    const double std = std::sqrt(sum2 / n - mean * mean);
    const double tol = v.size() >= 4096 ? 0.05 : 0.5;  // exp_probs_b has 16 values
    EXPECT_NEAR(std / expected_std, 1.0, tol);
    EXPECT_LE(std::fabs(mean), 5 * expected_std / std::sqrt(n));
    ++n_checked;
  }
  EXPECT_GE(n_checked, 30);
}

// Our own quantizers, applied to the bf16 weights, must land in the same
// error range as llama.cpp's for the same tensors (they are simpler, so allow
// some slack), and our dequantizer must read back what our quantizer wrote.
TEST(GgufFixtureTest, OwnQuantizersComparableToLlamaCpp) {
  const gguf::GgufFile& bf16 = Fixture("bf16");
  const gguf::GgufFile& q4km = Fixture("q4_k_m");
  std::map<TensorType, std::pair<double, double>> sums;  // type -> (ours, llama.cpp) squared errors
  for (const gguf::TensorInfo& t : q4km.tensors()) {
    const std::string& name = t.name;
    if (t.type == TensorType::kF32) continue;
    const gguf::TensorInfo* ref = bf16.FindTensor(name);
    ASSERT_NE(ref, nullptr);
    const TensorType type = t.type;
    const std::vector<float> theirs = Dequantized(t);
    const std::vector<float> b = Dequantized(*ref);
    std::vector<uint8_t> q(static_cast<size_t>(RowBytes(TraitsOf(type), t.n_elements())));
    QuantizeRow(type, b.data(), q.data(), t.n_elements());
    std::vector<float> ours(b.size());
    DequantizeRow(type, q.data(), ours.data(), t.n_elements());
    auto& s = sums[t.type];
    for (size_t i = 0; i < b.size(); ++i) {
      s.first += (double{ours[i]} - b[i]) * (double{ours[i]} - b[i]);
      s.second += (double{theirs[i]} - b[i]) * (double{theirs[i]} - b[i]);
    }
  }
  for (const auto& [type, s] : sums) {
    const double ratio = std::sqrt(s.first / s.second);
    std::printf("own %s quantizer: rms error %.3fx llama.cpp's\n", TraitsOf(type).name, ratio);
    EXPECT_LE(ratio, 1.3) << TraitsOf(type).name;
    EXPECT_GE(ratio, 0.7) << TraitsOf(type).name;
  }
}

}  // namespace
}  // namespace ktx::kernels
