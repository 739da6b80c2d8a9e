// Opening a DeepSeek-V3-sized model (61 layers, 256 experts, 129280-token
// vocabulary, ~400 GB over 9 split files) reads only the headers: the files
// here are sparse (headers written, the data section a hole made by
// ftruncate), Open must finish well under a second, and no page of tensor
// data may become resident.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/tensor_type.h"
#include "runtime/base/status.h"
#include "runtime/gguf/gguf.h"
#include "tests/runtime/gguf/gguf_test_util.h"

namespace ktx::gguf {
namespace {

using kernels::TensorType;

struct Spec {
  std::string name;
  std::vector<int64_t> ne;
  TensorType type;
  uint64_t n_bytes;
};

std::vector<Spec> DeepSeekV3Tensors() {
  std::vector<Spec> out;
  auto add = [&out](std::string name, std::vector<int64_t> ne, TensorType type) {
    const kernels::TensorTypeTraits& t = kernels::TraitsOf(type);
    uint64_t bytes = static_cast<uint64_t>(kernels::RowBytes(t, ne[0]));
    for (size_t d = 1; d < ne.size(); ++d) bytes *= static_cast<uint64_t>(ne[d]);
    out.push_back({std::move(name), std::move(ne), type, bytes});
  };
  const int64_t n_embd = 7168, n_vocab = 129280, n_expert = 256, n_ff = 18432, n_ff_exp = 2048;
  add("token_embd.weight", {n_embd, n_vocab}, TensorType::kQ4_K);
  add("output_norm.weight", {n_embd}, TensorType::kF32);
  add("output.weight", {n_embd, n_vocab}, TensorType::kQ6_K);
  for (int il = 0; il < 61; ++il) {
    const std::string p = "blk." + std::to_string(il) + ".";
    add(p + "attn_norm.weight", {n_embd}, TensorType::kF32);
    add(p + "attn_q_a.weight", {n_embd, 1536}, TensorType::kQ4_K);
    add(p + "attn_q_a_norm.weight", {1536}, TensorType::kF32);
    add(p + "attn_q_b.weight", {1536, 128 * 192}, TensorType::kQ4_K);
    add(p + "attn_kv_a_mqa.weight", {n_embd, 576}, TensorType::kQ4_K);
    add(p + "attn_kv_a_norm.weight", {512}, TensorType::kF32);
    add(p + "attn_k_b.weight", {128, 512, 128}, TensorType::kQ5_0);
    add(p + "attn_v_b.weight", {512, 128, 128}, TensorType::kQ4_K);
    add(p + "attn_output.weight", {128 * 128, n_embd}, TensorType::kQ4_K);
    add(p + "ffn_norm.weight", {n_embd}, TensorType::kF32);
    if (il < 3) {
      add(p + "ffn_gate.weight", {n_embd, n_ff}, TensorType::kQ4_K);
      add(p + "ffn_up.weight", {n_embd, n_ff}, TensorType::kQ4_K);
      add(p + "ffn_down.weight", {n_ff, n_embd}, TensorType::kQ6_K);
    } else {
      add(p + "ffn_gate_inp.weight", {n_embd, n_expert}, TensorType::kF32);
      add(p + "exp_probs_b.bias", {n_expert}, TensorType::kF32);
      add(p + "ffn_gate_exps.weight", {n_embd, n_ff_exp, n_expert}, TensorType::kQ4_K);
      add(p + "ffn_up_exps.weight", {n_embd, n_ff_exp, n_expert}, TensorType::kQ4_K);
      add(p + "ffn_down_exps.weight", {n_ff_exp, n_embd, n_expert}, TensorType::kQ6_K);
      add(p + "ffn_gate_shexp.weight", {n_embd, n_ff_exp}, TensorType::kQ4_K);
      add(p + "ffn_up_shexp.weight", {n_embd, n_ff_exp}, TensorType::kQ4_K);
      add(p + "ffn_down_shexp.weight", {n_ff_exp, n_embd}, TensorType::kQ6_K);
    }
  }
  return out;
}

// Writes part `part` of `n_parts` as a header followed by a hole; returns its size.
uint64_t WriteSparsePart(const std::string& path, const std::vector<Spec>& all, size_t begin,
                         size_t end, int part, int n_parts) {
  testing::RawGguf g;
  const bool first = part == 0;
  const uint64_t n_kv = first ? 3 + 6 : 3;
  g.U32(0x46554747).U32(3).U64(end - begin).U64(n_kv);
  g.Str("split.no").U32(2).Pod<uint16_t>(static_cast<uint16_t>(part));
  g.Str("split.count").U32(2).Pod<uint16_t>(static_cast<uint16_t>(n_parts));
  g.Str("split.tensors.count").U32(5).Pod<int32_t>(static_cast<int32_t>(all.size()));
  if (first) {
    g.Str("general.architecture").U32(8).Str("deepseek2");
    g.Str("deepseek2.block_count").U32(4).U32(61);
    g.Str("tokenizer.ggml.model").U32(8).Str("gpt2");
    const int n_vocab = 129280;
    g.Str("tokenizer.ggml.tokens").U32(9).U32(8).U64(n_vocab);
    for (int i = 0; i < n_vocab; ++i) g.Str("tok" + std::to_string(i));
    g.Str("tokenizer.ggml.token_type").U32(9).U32(5).U64(n_vocab);
    for (int i = 0; i < n_vocab; ++i) g.Pod<int32_t>(1);
    g.Str("tokenizer.ggml.merges").U32(9).U32(8).U64(127741);
    for (int i = 0; i < 127741; ++i) g.Str("m" + std::to_string(i) + " x");
  }
  uint64_t offset = 0;
  for (size_t i = begin; i < end; ++i) {
    const Spec& s = all[i];
    g.Str(s.name).U32(static_cast<uint32_t>(s.ne.size()));
    for (int64_t x : s.ne) g.I64(x);
    g.U32(static_cast<uint32_t>(s.type)).U64(offset);
    offset += (s.n_bytes + 31) / 32 * 32;
  }
  g.PadTo(32);
  const uint64_t size = g.bytes().size() + offset;
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  KTX_CHECK(fd >= 0);
  KTX_CHECK(write(fd, g.bytes().data(), g.bytes().size()) ==
            static_cast<ssize_t>(g.bytes().size()));
  const bool ok = ftruncate(fd, static_cast<off_t>(size)) == 0;
  close(fd);
  return ok ? size : 0;
}

TEST(GgufScaleTest, DeepSeekV3SizedSplitModelOpensFastWithoutTouchingData) {
  const std::vector<Spec> tensors = DeepSeekV3Tensors();
  uint64_t total = 0;
  for (const Spec& s : tensors) total += s.n_bytes;
  ASSERT_GT(total, uint64_t{380} << 30);  // ~ 400 GB of Q4_K/Q6_K weights

  const std::string dir = testing::MakeTempDir();
  const int n_parts = 9;
  std::vector<std::string> paths;
  for (int p = 0; p < n_parts; ++p) {
    paths.push_back(SplitPath(dir + "/DeepSeek-V3-Q4_K_M", p, n_parts));
    const size_t begin = tensors.size() * p / n_parts;
    const size_t end = tensors.size() * (p + 1) / n_parts;
    if (WriteSparsePart(paths.back(), tensors, begin, end, p, n_parts) == 0) {
      std::filesystem::remove_all(dir);
      GTEST_SKIP() << "the temp file system does not take ~45 GB sparse files";
    }
  }

  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(paths[0]);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(f.ok()) << f.status();
  std::printf("opened %zu tensors, %.1f GiB in %d parts in %.3f s\n", (*f)->tensors().size(),
              static_cast<double>((*f)->total_tensor_bytes()) / (1 << 30), n_parts, seconds);
  EXPECT_EQ((*f)->tensors().size(), tensors.size());
  EXPECT_EQ((*f)->total_tensor_bytes(), total);
  EXPECT_EQ((*f)->paths(), paths);
  EXPECT_EQ((*f)->metadata().GetStringArray("tokenizer.ggml.tokens")->size(), 129280u);
#if defined(__SANITIZE_ADDRESS__)
  const double limit = 10.0;  // instrumented build
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  const double limit = 10.0;
#else
  const double limit = 1.0;
#endif
#else
  const double limit = 1.0;
#endif
  EXPECT_LT(seconds, limit);

  // No page of tensor data was read: the last tensor of every part is not resident.
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (const TensorInfo* t : {(*f)->FindTensor("output.weight"), &(*f)->tensors().back(),
                              (*f)->FindTensor("blk.30.ffn_down_exps.weight")}) {
    ASSERT_NE(t, nullptr);
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t->data) / page * page + page;
    const size_t n_pages = 64;
    std::vector<unsigned char> resident(n_pages);
    ASSERT_EQ(mincore(reinterpret_cast<void*>(begin), n_pages * page, resident.data()), 0)
        << t->name;
    for (size_t i = 0; i < n_pages; ++i) EXPECT_EQ(resident[i] & 1, 0) << t->name << " page " << i;
  }
  f->reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ktx::gguf
