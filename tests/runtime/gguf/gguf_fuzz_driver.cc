// A deterministic stand-in for libFuzzer (see gguf_fuzz.cc): a fixed-seed
// stream of mutations of small valid GGUF files, each fed to
// LLVMFuzzerTestOneInput. Runs in ctest (and under ASan/UBSan in the
// sanitizer tree) in a few seconds.
//
// Environment: KTX_GGUF_FUZZ_ITERATIONS (default 20000) changes the length of
// the run; KTX_GGUF_FUZZ_SEED_DIR, when set, receives the seed files (a corpus
// for the libFuzzer build).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/base/status.h"
#include "runtime/gguf/gguf.h"
#include "runtime/gguf/gguf_writer.h"
#include "tests/runtime/gguf/gguf_test_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern int64_t ktx_gguf_fuzz_accepted;  // gguf_fuzz.cc

namespace ktx::gguf {
namespace {

// xorshift64*: small, fast, the same everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t Next() {
    s_ ^= s_ >> 12;
    s_ ^= s_ << 25;
    s_ ^= s_ >> 27;
    return s_ * 0x2545F4914F6CDD1DULL;
  }
  size_t Below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(Next() % n); }

 private:
  uint64_t s_;
};

std::vector<std::vector<uint8_t>> Seeds() {
  std::vector<std::vector<uint8_t>> seeds;
  seeds.push_back(testing::BaseFile().bytes());
  {
    GgufWriter w;
    testing::AddEveryValueType(w);
    testing::AddAssortedTensors(w);
    seeds.push_back(*w.WriteToMemory());
  }
  {
    // Shaped like a split part with a larger alignment.
    GgufWriter w;
    KTX_CHECK(w.SetAlignment(64).ok());
    w.SetU16("split.no", 1);
    w.SetU16("split.count", 3);
    w.SetI32("split.tensors.count", 9);
    testing::AddAssortedTensors(w);
    seeds.push_back(*w.WriteToMemory());
  }
  {
    GgufWriter w;
    seeds.push_back(*w.WriteToMemory());  // empty model
  }
  const std::string fixture = testing::FixturePath("dsv3-tiny-q4_k_m.gguf");
  // The fixture's header region (the tensor data is cut off).
  seeds.push_back(testing::ReadFileBytes(fixture, 16384));
  {
    // The fixture's real metadata with small tensors: valid, tokenizer-sized.
    auto f = GgufFile::Open(fixture);
    KTX_CHECK(f.ok());
    GgufWriter w;
    KTX_CHECK(w.CopyMetadata((*f)->metadata()).ok());
    KTX_CHECK(w.AddTensor("blk.0.attn_norm.weight", {8}, kernels::TensorType::kF32,
                          std::vector<uint8_t>(32, 0x3f))
                  .ok());
    KTX_CHECK(w.AddTensor("blk.0.ffn_up.weight", {32, 2}, kernels::TensorType::kQ5_0,
                          testing::PatternBytes(44, 9))
                  .ok());
    seeds.push_back(*w.WriteToMemory());
  }
  return seeds;
}

void Mutate(Rng& rng, std::vector<uint8_t>& b) {
  static const uint64_t kInteresting[] = {0,
                                          1,
                                          2,
                                          3,
                                          4,
                                          8,
                                          9,
                                          12,
                                          13,
                                          32,
                                          63,
                                          64,
                                          255,
                                          256,
                                          65535,
                                          0x7fffffffULL,
                                          0x80000000ULL,
                                          0xffffffffULL,
                                          0x100000000ULL,
                                          0x7fffffffffffffffULL,
                                          0x8000000000000000ULL,
                                          0xffffffffffffffffULL,
                                          0xfffffffffffffff0ULL};
  if (b.empty()) {
    b.push_back(static_cast<uint8_t>(rng.Next()));
    return;
  }
  switch (rng.Below(8)) {
    case 0:
    case 1: {  // bit flips
      const size_t n = 1 + rng.Below(4);
      for (size_t i = 0; i < n; ++i)
        b[rng.Below(b.size())] ^= static_cast<uint8_t>(1u << rng.Below(8));
      break;
    }
    case 2:
    case 3: {  // an integer field overwritten with an extreme or size-related value
      const size_t width = size_t{1} << rng.Below(4);  // 1, 2, 4, 8
      if (b.size() < width) break;
      // Prefer 4-aligned positions: GGUF fields mostly are.
      size_t at = rng.Below(b.size() - width + 1);
      if (rng.Below(2) == 0) at &= ~size_t{3};
      uint64_t v = 0;
      switch (rng.Below(4)) {
        case 0: v = b.size(); break;
        case 1: v = b.size() - at + rng.Below(17) - 8; break;
        default: v = kInteresting[rng.Below(sizeof(kInteresting) / sizeof(kInteresting[0]))]; break;
      }
      std::memcpy(b.data() + at, &v, width);
      break;
    }
    case 4:  // truncation
      b.resize(rng.Below(b.size()));
      break;
    case 5: {  // delete a range
      const size_t at = rng.Below(b.size());
      const size_t n = 1 + rng.Below(std::min<size_t>(64, b.size() - at));
      b.erase(b.begin() + static_cast<ptrdiff_t>(at), b.begin() + static_cast<ptrdiff_t>(at + n));
      break;
    }
    case 6: {  // insert random bytes
      const size_t at = rng.Below(b.size() + 1);
      const size_t n = 1 + rng.Below(16);
      std::vector<uint8_t> junk(n);
      for (uint8_t& x : junk) x = static_cast<uint8_t>(rng.Next());
      b.insert(b.begin() + static_cast<ptrdiff_t>(at), junk.begin(), junk.end());
      break;
    }
    default: {  // copy a chunk over another place
      const size_t from = rng.Below(b.size());
      const size_t to = rng.Below(b.size());
      const size_t n = std::min({1 + rng.Below(32), b.size() - from, b.size() - to});
      std::memmove(b.data() + to, b.data() + from, n);
      break;
    }
  }
}

TEST(GgufFuzzTest, SeedsAreValid) {
  ASSERT_EQ(Seeds().size(), 6u);  // DeterministicMutations picks them by index
  for (const std::vector<uint8_t>& s : Seeds()) {
    const bool header_only = s.size() == 16384;
    auto f = GgufFile::FromMemory(s.data(), s.size(), "seed");
    EXPECT_EQ(f.ok(), !header_only) << f.status();
  }
}

TEST(GgufFuzzTest, DeterministicMutations) {
  const std::vector<std::vector<uint8_t>> seeds = Seeds();
  if (const char* dir = std::getenv("KTX_GGUF_FUZZ_SEED_DIR"); dir != nullptr) {
    for (size_t i = 0; i < seeds.size(); ++i) {
      std::ofstream out(std::string(dir) + "/seed" + std::to_string(i) + ".gguf", std::ios::binary);
      out.write(reinterpret_cast<const char*>(seeds[i].data()),
                static_cast<std::streamsize>(seeds[i].size()));
    }
  }
  int iterations = 20000;
  if (const char* n = std::getenv("KTX_GGUF_FUZZ_ITERATIONS"); n != nullptr)
    iterations = std::atoi(n);
  Rng rng(0x6b7478u);  // "ktx"
  ktx_gguf_fuzz_accepted = 0;
  for (int it = 0; it < iterations; ++it) {
    // The two fixture-sized seeds (16 KiB of real metadata) are the slow ones: 1 pick in 8.
    const size_t pick = rng.Below(16);
    std::vector<uint8_t> input = seeds[pick < 14 ? pick % 4 : 4 + (pick - 14)];
    const size_t n_mutations = 1 + rng.Below(3);
    for (size_t k = 0; k < n_mutations; ++k) Mutate(rng, input);
    // A missing byte past the end is a real read overflow under ASan: give the
    // target an exactly-sized heap copy.
    std::unique_ptr<uint8_t[]> exact(new uint8_t[input.size()]);
    std::memcpy(exact.get(), input.data(), input.size());
    LLVMFuzzerTestOneInput(exact.get(), input.size());
  }
  const int64_t accepted = ktx_gguf_fuzz_accepted;
  // Both outcomes must be common, else the mutations test nothing.
  EXPECT_GT(accepted, iterations / 20);
  EXPECT_LT(accepted, iterations * 3 / 4);
  std::printf("%lld of %d mutated inputs accepted\n", static_cast<long long>(accepted), iterations);
}

}  // namespace
}  // namespace ktx::gguf
