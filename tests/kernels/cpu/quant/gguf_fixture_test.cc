// Dequantization checked against a reference ktx did not write: the fixtures
// tests/data/dsv3-tiny-{bf16,q8_0,q4_k_m}.gguf hold the same random model in
// three storage types, the quantized ones made by llama.cpp's llama-quantize
// from the f32 weights (tests/data/README.md). Every quantized tensor must
// dequantize close to the bf16 tensor of the same name, by the margin its
// format implies; a layout or bit-order bug gives errors of order 100 %.
//
// The files are parsed here with a minimal GGUF reader of our own (header, KV
// pairs skipped except general.alignment, tensor infos), independent of
// runtime/gguf.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/tensor_type.h"
#include "kernels/cpu/quant/quant.h"

namespace ktx::kernels {
namespace {

struct FixtureTensor {
  std::string name;
  std::vector<int64_t> ne;
  uint32_t type_id = 0;
  uint64_t offset = 0;
  int64_t n_elements() const {
    int64_t n = 1;
    for (int64_t e : ne) n *= e;
    return n;
  }
};

class FixtureFile {
 public:
  // Returns "" on success, otherwise what went wrong.
  std::string Load(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return "cannot open " + path;
    bytes_.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    pos_ = 0;
    uint32_t magic = 0, version = 0;
    uint64_t n_tensors = 0, n_kv = 0;
    if (!Read(&magic) || magic != 0x46554747u) return path + ": bad magic";
    if (!Read(&version) || version != 3) return path + ": not GGUF v3";
    if (!Read(&n_tensors) || !Read(&n_kv)) return path + ": truncated header";
    uint64_t alignment = 32;
    for (uint64_t k = 0; k < n_kv; ++k) {
      std::string key;
      uint32_t type = 0;
      if (!ReadString(&key) || !Read(&type)) return path + ": truncated KV";
      if (key == "general.alignment" && type == 4) {
        uint32_t a = 0;
        if (!Read(&a)) return path + ": truncated alignment";
        alignment = a;
      } else if (!SkipValue(type)) {
        return path + ": bad value of " + key;
      }
    }
    for (uint64_t t = 0; t < n_tensors; ++t) {
      FixtureTensor info;
      uint32_t n_dims = 0;
      if (!ReadString(&info.name) || !Read(&n_dims) || n_dims < 1 || n_dims > 4) {
        return path + ": bad tensor info";
      }
      info.ne.resize(n_dims);
      for (uint32_t d = 0; d < n_dims; ++d) {
        if (!Read(&info.ne[d])) return path + ": truncated dims";
      }
      if (!Read(&info.type_id) || !Read(&info.offset)) return path + ": truncated tensor info";
      tensors_[info.name] = info;
    }
    data_start_ = (pos_ + alignment - 1) / alignment * alignment;
    for (const auto& [name, info] : tensors_) {
      const auto traits = GetTensorTypeTraits(info.type_id);
      if (!traits) return path + ": unknown type of " + name;
      const uint64_t size =
          static_cast<uint64_t>(RowBytes(*traits, info.ne[0]) * (info.n_elements() / info.ne[0]));
      if (data_start_ + info.offset + size > bytes_.size())
        return path + ": " + name + " out of file";
    }
    return "";
  }

  const FixtureTensor* Find(const std::string& name) const {
    const auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
  }
  const std::map<std::string, FixtureTensor>& tensors() const { return tensors_; }
  const uint8_t* Data(const FixtureTensor& t) const {
    return bytes_.data() + data_start_ + t.offset;
  }

  // All elements of `t` as floats (through DequantizeRow, row by row).
  std::vector<float> Dequantized(const FixtureTensor& t) const {
    const TensorTypeTraits traits = *GetTensorTypeTraits(t.type_id);
    std::vector<float> out(static_cast<size_t>(t.n_elements()));
    const int64_t n_rows = t.n_elements() / t.ne[0];
    const int64_t row_bytes = RowBytes(traits, t.ne[0]);
    for (int64_t r = 0; r < n_rows; ++r) {
      DequantizeRow(traits.type, Data(t) + r * row_bytes, out.data() + r * t.ne[0], t.ne[0]);
    }
    return out;
  }

 private:
  template <typename T>
  bool Read(T* v) {
    if (pos_ + sizeof(T) > bytes_.size()) return false;
    std::memcpy(v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool ReadString(std::string* s) {
    uint64_t len = 0;
    if (!Read(&len) || pos_ + len > bytes_.size()) return false;
    s->assign(reinterpret_cast<const char*>(bytes_.data() + pos_), len);
    pos_ += len;
    return true;
  }
  bool SkipValue(uint32_t type) {
    static constexpr int kScalarSize[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    if (type > 12) return false;
    if (type == 8) {
      std::string s;
      return ReadString(&s);
    }
    if (type == 9) {
      uint32_t elem = 0;
      uint64_t count = 0;
      if (!Read(&elem) || !Read(&count) || elem == 9) return false;
      for (uint64_t i = 0; i < count; ++i) {
        if (!SkipValue(elem)) return false;
      }
      return true;
    }
    if (pos_ + kScalarSize[type] > bytes_.size()) return false;
    pos_ += kScalarSize[type];
    return true;
  }

  std::vector<uint8_t> bytes_;
  size_t pos_ = 0;
  size_t data_start_ = 0;
  std::map<std::string, FixtureTensor> tensors_;
};

const FixtureFile& Fixture(const std::string& which) {
  static std::map<std::string, std::unique_ptr<FixtureFile>> cache;
  auto& slot = cache[which];
  if (!slot) {
    slot = std::make_unique<FixtureFile>();
    const std::string error =
        slot->Load(std::string(KTX_SOURCE_DIR) + "/tests/data/dsv3-tiny-" + which + ".gguf");
    EXPECT_EQ(error, "");
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

uint32_t Id(TensorType t) { return static_cast<uint32_t>(t); }

// Every quantized tensor of `which` against the bf16 file; returns the worst
// and best rel L2 per storage type.
struct TypeStats {
  int n_tensors = 0;
  double min_rel = INFINITY;
  double max_rel = 0.0;
};
std::map<uint32_t, TypeStats> CompareWithBf16(const std::string& which) {
  const FixtureFile& bf16 = Fixture("bf16");
  const FixtureFile& file = Fixture(which);
  std::map<uint32_t, TypeStats> stats;
  EXPECT_EQ(file.tensors().size(), bf16.tensors().size());
  for (const auto& [name, t] : file.tensors()) {
    SCOPED_TRACE(which + " " + name);
    const FixtureTensor* ref = bf16.Find(name);
    EXPECT_NE(ref, nullptr);
    if (ref == nullptr) continue;
    EXPECT_EQ(t.ne, ref->ne);
    const std::vector<float> a = file.Dequantized(t);
    const std::vector<float> b = bf16.Dequantized(*ref);
    if (t.type_id == Id(TensorType::kF32)) {
      EXPECT_EQ(ref->type_id, Id(TensorType::kF32));
      EXPECT_EQ(a, b);  // norms, router, bias: stored identically
      continue;
    }
    EXPECT_EQ(ref->type_id, Id(TensorType::kBF16));
    TypeStats& s = stats[t.type_id];
    const double rel = RelL2(a, b);
    ++s.n_tensors;
    s.min_rel = std::min(s.min_rel, rel);
    s.max_rel = std::max(s.max_rel, rel);
  }
  for (const auto& [type_id, s] : stats) {
    std::printf("%s vs bf16: %-5s %2d tensors, rel L2 %.4f .. %.4f\n", which.c_str(),
                GetTensorTypeTraits(type_id)->name, s.n_tensors, s.min_rel, s.max_rel);
  }
  return stats;
}

// Q8_0 weights are within half a quantization step of the weights they were
// made from; bf16 is those weights rounded to 8 significant bits. So, per
// element, |q8_0 - bf16| <= 0.5 d + 127 |d - half(d)| + 2^-8 |bf16|, with d
// the block's stored scale: a direct check of every element's position.
TEST(GgufFixtureTest, Q8_0ElementsWithinHalfAStepOfBf16) {
  const FixtureFile& bf16 = Fixture("bf16");
  const FixtureFile& q8 = Fixture("q8_0");
  int n_checked = 0;
  for (const auto& [name, t] : q8.tensors()) {
    if (t.type_id != Id(TensorType::kQ8_0)) continue;
    SCOPED_TRACE(name);
    const FixtureTensor* ref = bf16.Find(name);
    ASSERT_NE(ref, nullptr);
    const std::vector<float> a = q8.Dequantized(t);
    const std::vector<float> b = bf16.Dequantized(*ref);
    const uint8_t* blocks = q8.Data(t);
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
  const TypeStats& s = stats.at(Id(TensorType::kQ8_0));
  // Gaussian weights, blocks of 32: step ~ 2.2 sigma / 127, rms error step / sqrt(12)
  // ~ 0.5 %; with bf16's own rounding (~0.1 %) on the reference side.
  EXPECT_GE(s.min_rel, 0.004);
  EXPECT_LE(s.max_rel, 0.0075);
}

TEST(GgufFixtureTest, Q4KMFileCloseToBf16) {
  const auto stats = CompareWithBf16("q4_k_m");
  // The file must exercise every type the Q4_K_M mix uses here.
  for (TensorType t : {TensorType::kQ4_K, TensorType::kQ5_0, TensorType::kQ6_K}) {
    ASSERT_TRUE(stats.count(Id(t))) << TraitsOf(t).name << " missing from the q4_k_m file";
  }
  EXPECT_EQ(stats.size(), 3u);
  const TypeStats& q4k = stats.at(Id(TensorType::kQ4_K));
  const TypeStats& q5_0 = stats.at(Id(TensorType::kQ5_0));
  const TypeStats& q6k = stats.at(Id(TensorType::kQ6_K));
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
  const FixtureFile& bf16 = Fixture("bf16");
  int n_checked = 0;
  for (const auto& [name, t] : bf16.tensors()) {
    SCOPED_TRACE(name);
    const std::vector<float> v = bf16.Dequantized(t);
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
  const FixtureFile& bf16 = Fixture("bf16");
  const FixtureFile& q4km = Fixture("q4_k_m");
  std::map<uint32_t, std::pair<double, double>> sums;  // type -> (ours, llama.cpp) squared errors
  for (const auto& [name, t] : q4km.tensors()) {
    if (t.type_id == Id(TensorType::kF32)) continue;
    const FixtureTensor* ref = bf16.Find(name);
    ASSERT_NE(ref, nullptr);
    const TensorType type = static_cast<TensorType>(t.type_id);
    const std::vector<float> theirs = q4km.Dequantized(t);
    const std::vector<float> b = bf16.Dequantized(*ref);
    std::vector<uint8_t> q(static_cast<size_t>(RowBytes(TraitsOf(type), t.n_elements())));
    QuantizeRow(type, b.data(), q.data(), t.n_elements());
    std::vector<float> ours(b.size());
    DequantizeRow(type, q.data(), ours.data(), t.n_elements());
    auto& s = sums[t.type_id];
    for (size_t i = 0; i < b.size(); ++i) {
      s.first += (double{ours[i]} - b[i]) * (double{ours[i]} - b[i]);
      s.second += (double{theirs[i]} - b[i]) * (double{theirs[i]} - b[i]);
    }
  }
  for (const auto& [type_id, s] : sums) {
    const double ratio = std::sqrt(s.first / s.second);
    std::printf("own %s quantizer: rms error %.3fx llama.cpp's\n",
                GetTensorTypeTraits(type_id)->name, ratio);
    EXPECT_LE(ratio, 1.3) << GetTensorTypeTraits(type_id)->name;
    EXPECT_GE(ratio, 0.7) << GetTensorTypeTraits(type_id)->name;
  }
}

}  // namespace
}  // namespace ktx::kernels
