// The model fingerprint (runtime/gguf/fingerprint.h):
//  - its SHA-256 against the FIPS 180-2 example digests (not computed by ktx),
//    one-shot and streamed in awkward pieces;
//  - stable across two opens of the same fixture file, different for the
//    fixture's three storage types;
//  - two synthetic models (runtime/synth, the `ktx-ctl synth` writer) with
//    different seeds differ; the same seed written twice, or written as a
//    split set of files, gives the same fingerprint;
//  - one flipped byte inside a sampled window changes it.
#include "runtime/gguf/fingerprint.h"

#include <unistd.h>

#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/gguf/gguf.h"
#include "runtime/synth/synth_plan.h"
#include "runtime/synth/synth_writer.h"

namespace ktx::gguf {
namespace {

std::string DataPath(const std::string& name) {
  return std::string(KTX_SOURCE_DIR) + "/tests/data/" + name;
}

TEST(Sha256Test, FipsExamples) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Sha256Hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256Test, StreamingInAwkwardPiecesEqualsOneShot) {
  std::string data;
  for (int i = 0; i < 1000; ++i) data.push_back(static_cast<char>((i * 131 + 7) & 0xff));
  const std::string want = Sha256Hex(data);
  for (size_t piece : {1, 3, 55, 56, 63, 64, 65, 111, 989}) {
    Sha256 sha;
    for (size_t at = 0; at < data.size(); at += piece) {
      sha.Update(data.data() + at, std::min(piece, data.size() - at));
    }
    EXPECT_EQ(sha.FinishHex(), want) << "pieces of " << piece;
  }
}

TEST(ModelFingerprintTest, StableAcrossOpensDistinctAcrossFixtures) {
  std::set<std::string> seen;
  for (const char* type : {"bf16", "q8_0", "q4_k_m"}) {
    const std::string path = DataPath(std::string("dsv3-tiny-") + type + ".gguf");
    auto a = GgufFile::Open(path);
    auto b = GgufFile::Open(path);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    const std::string fa = ModelFingerprint(**a);
    EXPECT_EQ(fa.size(), 64u);
    EXPECT_EQ(fa.find_first_not_of("0123456789abcdef"), std::string::npos) << fa;
    EXPECT_EQ(fa, ModelFingerprint(**b)) << type;
    EXPECT_TRUE(seen.insert(fa).second) << type << " has the fingerprint of another fixture";
  }
}

class SynthFingerprintTest : public ::testing::Test {
 protected:
  static synth::ModelPlan Plan() {
    auto config = synth::MakeConfig(synth::Preset::kTiny, {});
    EXPECT_TRUE(config.ok()) << config.status();
    auto plan = synth::PlanModel(*config, synth::Quant::kQ4_K_M);
    EXPECT_TRUE(plan.ok()) << plan.status();
    return *std::move(plan);
  }
  static std::vector<uint8_t> Image(uint64_t seed) {
    synth::SynthWriteOptions options;
    options.seed = seed;
    options.n_threads = 2;
    auto bytes = synth::WriteSynthModelToMemory(Plan(), options);
    EXPECT_TRUE(bytes.ok()) << bytes.status();
    return bytes.ok() ? *std::move(bytes) : std::vector<uint8_t>();
  }
  static std::string Fingerprint(const std::vector<uint8_t>& image) {
    auto file = GgufFile::FromMemory(image.data(), image.size(), "synth");
    EXPECT_TRUE(file.ok()) << file.status();
    return file.ok() ? ModelFingerprint(**file) : std::string();
  }
};

TEST_F(SynthFingerprintTest, DifferentSeedsDifferSameSeedAgrees) {
  const std::vector<uint8_t> a1 = Image(1);
  const std::vector<uint8_t> a2 = Image(1);
  const std::vector<uint8_t> b = Image(2);
  ASSERT_FALSE(a1.empty());
  ASSERT_FALSE(b.empty());
  EXPECT_EQ(Fingerprint(a1), Fingerprint(a2));
  EXPECT_NE(Fingerprint(a1), Fingerprint(b));
}

TEST_F(SynthFingerprintTest, OneByteInASampledWindowChangesIt) {
  std::vector<uint8_t> image = Image(3);
  ASSERT_FALSE(image.empty());
  const std::string before = Fingerprint(image);
  auto file = GgufFile::FromMemory(image.data(), image.size(), "synth");
  ASSERT_TRUE(file.ok()) << file.status();
  // The last byte of the last tensor's data is always in its last window.
  const TensorInfo* t = &(*file)->tensors().back();
  const size_t at = static_cast<size_t>(t->data - image.data()) + t->n_bytes - 1;
  file->reset();
  image[at] ^= 0x40;
  EXPECT_NE(Fingerprint(image), before);
}

TEST_F(SynthFingerprintTest, SplitFilesHaveTheFingerprintOfOneFile) {
  const std::string dir = ::testing::TempDir() + "ktx_fp_" + std::to_string(getpid());
  synth::SynthWriteOptions options;
  options.seed = 5;
  options.n_threads = 2;
  const synth::ModelPlan plan = Plan();
  auto one = synth::WriteSynthModel(plan, dir + "_one.gguf", options);
  ASSERT_TRUE(one.ok()) << one.status();
  options.n_split = 2;
  auto split = synth::WriteSynthModel(plan, dir + "_split.gguf", options);
  ASSERT_TRUE(split.ok()) << split.status();
  ASSERT_EQ(split->paths.size(), 2u);
  auto a = GgufFile::Open(one->paths[0]);
  auto b = GgufFile::Open(split->paths[0]);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(ModelFingerprint(**a), ModelFingerprint(**b));
  for (const std::string& p : one->paths) std::remove(p.c_str());
  for (const std::string& p : split->paths) std::remove(p.c_str());
}

}  // namespace
}  // namespace ktx::gguf
