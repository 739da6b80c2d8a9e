// Hostile input: every corruption of a valid file must give an InvalidArgument
// error whose message names the file and the thing at fault, never a crash or
// a huge allocation (run this under ASan: the test command does).
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/common/tensor_type.h"
#include "runtime/gguf/gguf.h"
#include "tests/runtime/gguf/gguf_test_util.h"

namespace ktx::gguf {
namespace {

using ::testing::AllOf;
using ::testing::AnyOf;
using testing::BaseFile;
using ::testing::HasSubstr;
using testing::Patch;
using testing::RawGguf;

constexpr char kName[] = "hostile.gguf";

absl::Status Load(const std::vector<uint8_t>& bytes, size_t size, const OpenOptions& options = {}) {
  return GgufFile::FromMemory(bytes.data(), size, kName, options).status();
}
absl::Status Load(const std::vector<uint8_t>& bytes) { return Load(bytes, bytes.size()); }

// Expects an InvalidArgument error naming the file and containing every word.
void ExpectError(const absl::Status& s, const std::vector<std::string>& words) {
  ASSERT_FALSE(s.ok()) << "accepted; expected an error with: " << words[0];
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(kName));
  for (const std::string& w : words) EXPECT_THAT(std::string(s.message()), HasSubstr(w)) << s;
}

TEST(GgufHostileTest, BaseFileIsValid) {
  RawGguf g = BaseFile();
  absl::StatusOr<std::unique_ptr<GgufFile>> f =
      GgufFile::FromMemory(g.bytes().data(), g.bytes().size(), kName);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->metadata().entries().size(), testing::BaseKeys().size());
  EXPECT_EQ((*f)->tensors().size(), testing::BaseTensorNames().size());
  // Trailing bytes after the last tensor are allowed.
  g.Fill(100, 0xEE);
  EXPECT_TRUE(Load(g.bytes()).ok());
}

// Every prefix of the file fails, and the message names the part being read.
TEST(GgufHostileTest, TruncatedAtEveryByte) {
  RawGguf g = BaseFile();
  const std::vector<uint8_t>& bytes = g.bytes();
  const size_t data = g.mark("data");
  // Where a reader at `pos` is: the words a message about it must contain.
  auto region_words = [&](size_t pos) -> std::vector<std::string> {
    if (pos < 4) return {"not a GGUF file"};
    if (pos < g.mark("kv0")) return {"header"};
    for (size_t i = 0; i < testing::BaseKeys().size(); ++i) {
      const std::string k = "kv" + std::to_string(i);
      const std::string next =
          i + 1 < testing::BaseKeys().size() ? "kv" + std::to_string(i + 1) : "ti0";
      if (pos < g.mark(k + ".type")) return {"metadata"};  // "key of metadata entry i" or the key
      if (pos < g.mark(next)) return {"'" + testing::BaseKeys()[i] + "'"};
    }
    for (size_t j = 0; j < 3; ++j) {
      const std::string t = "ti" + std::to_string(j);
      if (pos < g.mark(t + ".n_dims")) return {"tensor info " + std::to_string(j)};
      if (pos < g.mark(t + ".end")) return {"tensor '" + testing::BaseTensorNames()[j] + "'"};
    }
    // In the padding or data: the first tensor (in info order) that is cut.
    if (pos < data + 256) return {"tensor 'a'", "past the end"};
    if (pos < data + 400) return {"tensor 'b'", "past the end"};
    return {"tensor 'c'", "past the end"};
  };
  for (size_t size = 0; size < bytes.size(); ++size) {
    SCOPED_TRACE(size);
    const absl::Status s = Load(bytes, size);
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    const std::string msg(s.message());
    EXPECT_THAT(msg, HasSubstr(kName));
    // The up-front count checks may fire first: they name the counts instead.
    const bool count_check = msg.find("need at least") != std::string::npos;
    if (!count_check) {
      for (const std::string& w : region_words(size)) EXPECT_THAT(msg, HasSubstr(w));
    }
    if (size >= 4 && size < g.mark("kv0")) {
      EXPECT_THAT(msg, AnyOf(HasSubstr("truncated"), HasSubstr("need at least")));
    }
  }
  EXPECT_TRUE(Load(bytes, bytes.size()).ok());
}

TEST(GgufHostileTest, BadMagicAndVersion) {
  std::vector<uint8_t> b = BaseFile().bytes();
  std::memcpy(b.data(), "GGML", 4);
  ExpectError(Load(b), {"not a GGUF file", "expected magic 'GGUF'", "'GGML'"});
  ExpectError(Load(b, 3), {"not a GGUF file", "3 bytes"});
  ExpectError(Load(b, 0), {"not a GGUF file"});

  struct V {
    uint32_t version;
    std::vector<std::string> words;
  };
  for (const V& v : {V{1, {"version 1 is not supported", "expected 2 or 3"}},
                     V{0, {"unsupported GGUF version 0", "expected 2 or 3"}},
                     V{4, {"unsupported GGUF version 4"}},
                     V{0x03000000, {"unsupported GGUF version 50331648", "big-endian"}},
                     V{0xFFFFFFFF, {"unsupported GGUF version 4294967295"}}}) {
    std::vector<uint8_t> c = BaseFile().bytes();
    Patch<uint32_t>(c, 4, v.version);
    ExpectError(Load(c), v.words);
  }
}

TEST(GgufHostileTest, AbsurdCounts) {
  RawGguf g = BaseFile();
  const size_t nt = g.mark("n_tensors");
  const size_t nkv = g.mark("n_kv");
  struct C {
    size_t at;
    uint64_t value;
    std::vector<std::string> words;
  };
  const C cases[] = {
      {nt, std::numeric_limits<uint64_t>::max(), {"tensor count 18446744073709551615", "limit"}},
      {nt, uint64_t{1} << 63, {"tensor count", "limit"}},
      {nt, 1000, {"1000 tensor infos", "need at least"}},
      {nt, 4, {"tensor"}},  // one more than present: the data section is read as a tensor info
      {nkv, std::numeric_limits<uint64_t>::max(), {"metadata count", "limit"}},
      {nkv, 100000, {"100000 metadata entries", "need at least"}},
      // One more: tensor info 'a' parses as an 8th entry (key "a", u16 value),
      // so the tensor infos start one field late.
      {nkv, 8, {"tensor info 0", "string length"}},
  };
  for (const C& c : cases) {
    std::vector<uint8_t> b = g.bytes();
    Patch<uint64_t>(b, c.at, c.value);
    ExpectError(Load(b), c.words);
  }
  // Fewer than present: the rest of the metadata is read as tensor infos and fails.
  std::vector<uint8_t> b = g.bytes();
  Patch<uint64_t>(b, nkv, 2);
  EXPECT_FALSE(Load(b).ok());
  // Limits from OpenOptions.
  OpenOptions small;
  small.max_kv = 6;
  ExpectError(Load(g.bytes(), g.bytes().size(), small),
              {"metadata count 7 exceeds the limit of 6"});
  small = {};
  small.max_tensors = 2;
  ExpectError(Load(g.bytes(), g.bytes().size(), small), {"tensor count 3 exceeds the limit of 2"});
  small = {};
  small.max_string_bytes = 3;
  ExpectError(Load(g.bytes(), g.bytes().size(), small),
              {"key of metadata entry 0", "string length 20 exceeds the limit of 3"});
  small = {};
  small.max_array_elements = 2;
  ExpectError(Load(g.bytes(), g.bytes().size(), small),
              {"'test.tokens'", "3 elements exceed the limit of 2"});
}

TEST(GgufHostileTest, AbsurdStringAndArrayLengths) {
  RawGguf g = BaseFile();
  struct C {
    std::string mark;
    uint64_t value;
    std::vector<std::string> words;
  };
  const uint64_t kMax = std::numeric_limits<uint64_t>::max();
  const std::vector<C> cases = {
      {"kv0", kMax, {"key of metadata entry 0", "string length 18446744073709551615", "exceeds"}},
      {"kv0", uint64_t{1} << 40, {"key of metadata entry 0", "string length 1099511627776"}},
      {"kv0", g.bytes().size(), {"key of metadata entry 0", "string length"}},
      {"kv3", 1 << 20, {"key of metadata entry 3", "bytes that remain"}},
      {"kv0.value", kMax, {"'general.architecture'", "string length"}},
      {"kv0.value",
       g.bytes().size() - g.mark("kv0.value") - 7,
       {"'general.architecture'", "string length"}},
      {"kv5.count", kMax, {"'test.tokens'", "elements"}},
      {"kv5.count", uint64_t{1} << 62, {"'test.tokens'", "elements"}},
      {"kv5.count",
       1000,
       {"'test.tokens'", "1000 elements of type string", "need at least 8 bytes"}},
      {"kv5.count", 40, {"'test.tokens'"}},  // fits the bound, runs into the tensor infos
      {"kv5.elem1", kMax, {"'test.tokens'", "element 1 of 3", "string length"}},
      {"kv6.count", kMax, {"'test.ints'", "elements exceed the limit"}},
      {"kv6.count", 1000, {"'test.ints'", "1000 elements of type i32", "need at least 4 bytes"}},
      {"kv6.count", 100000, {"'test.ints'", "100000 elements"}},
      {"ti1", kMax, {"tensor info 1", "name", "string length"}},
      {"ti1", 0, {"tensor info 1", "empty tensor name"}},
  };
  for (const C& c : cases) {
    SCOPED_TRACE(c.mark);
    std::vector<uint8_t> b = g.bytes();
    Patch<uint64_t>(b, g.mark(c.mark), c.value);
    ExpectError(Load(b), c.words);
  }
}

TEST(GgufHostileTest, UnknownValueTypes) {
  RawGguf g = BaseFile();
  struct C {
    std::string mark;
    uint32_t value;
    std::vector<std::string> words;
  };
  const std::vector<C> cases = {
      {"kv0.type", 13, {"'general.architecture'", "unknown value type id 13", "expected 0..12"}},
      {"kv2.type", 0xFFFFFFFF, {"'test.k1'", "unknown value type id 4294967295"}},
      {"kv5.value", 77, {"'test.tokens'", "unknown element type id 77"}},
      {"kv5.value", 9, {"'test.tokens'", "nested arrays are not supported"}},
      // The array's element type changed from string to u64: 3 "elements" read
      // from the string bytes, then the rest is garbage.
      {"kv5.value", 10, {}},
  };
  for (const C& c : cases) {
    SCOPED_TRACE(c.mark);
    std::vector<uint8_t> b = g.bytes();
    Patch<uint32_t>(b, g.mark(c.mark), c.value);
    if (c.words.empty()) {
      EXPECT_FALSE(Load(b).ok());
    } else {
      ExpectError(Load(b), c.words);
    }
  }
  // A bool that is neither 0 nor 1.
  std::vector<uint8_t> b = g.bytes();
  b[g.mark("kv4.value")] = 2;
  ExpectError(Load(b), {"'test.flag'", "bool must be 0 or 1, found 2"});
}

TEST(GgufHostileTest, BadAlignment) {
  RawGguf g = BaseFile();
  for (uint32_t a : {0u, 3u, 48u, 100u, 0x80000001u}) {
    std::vector<uint8_t> b = g.bytes();
    Patch<uint32_t>(b, g.mark("kv1.value"), a);
    ExpectError(Load(b),
                {"'general.alignment'", "expected a power of two", "found " + std::to_string(a)});
  }
  // Valid power of two, but tensor c's offset 416 is not a multiple of 64.
  std::vector<uint8_t> b = g.bytes();
  Patch<uint32_t>(b, g.mark("kv1.value"), 64);
  ExpectError(Load(b), {"tensor 'c'", "offset 416", "not a multiple of the alignment 64"});
  // A huge alignment puts the data section past the end of the file.
  b = g.bytes();
  Patch<uint32_t>(b, g.mark("kv1.value"), 1u << 31);
  ExpectError(Load(b), {"tensor 'a'", "past the end of the file"});
  // Alignment 16: the offsets are multiples of 16 and the data section starts
  // at the header's end rounded up to 16 (at or before the 32-aligned start),
  // so every tensor still lies inside the file.
  b = g.bytes();
  Patch<uint32_t>(b, g.mark("kv1.value"), 16);
  EXPECT_TRUE(Load(b).ok());
  // The alignment as a float is a type error naming the key.
  b = g.bytes();
  Patch<uint32_t>(b, g.mark("kv1.type"), 6);  // f32 with the bits of 32u
  ExpectError(Load(b), {"'general.alignment'", "expected an integer", "found f32"});
  // As an i32 it is converted (the getters convert integer widths).
  b = g.bytes();
  Patch<uint32_t>(b, g.mark("kv1.type"), 5);
  EXPECT_TRUE(Load(b).ok());
}

TEST(GgufHostileTest, BadDimsAndShapes) {
  RawGguf g = BaseFile();
  struct C {
    std::string mark;
    int64_t value;
    std::vector<std::string> words;
  };
  const int64_t kMin = std::numeric_limits<int64_t>::min();
  const std::vector<C> cases = {
      {"ti0.ne0", 0, {"tensor 'a'", "ne[0] = 0", "expected > 0"}},
      {"ti0.ne1", -1, {"tensor 'a'", "ne[1] = -1", "expected > 0"}},
      {"ti0.ne0", kMin, {"tensor 'a'", "ne[0] = -9223372036854775808"}},
      {"ti0.ne0", int64_t{1} << 62, {"tensor 'a'", "more than 2^63 elements"}},
      {"ti0.ne1", int64_t{1} << 57, {"tensor 'a'", "more than 2^63 bytes"}},
      {"ti0.ne1", int64_t{1} << 40, {"tensor 'a'", "past the end of the file"}},
      {"ti0.ne1", 3, {"overlap", "'a' (data [0, 384))", "'b'"}},
      {"ti1.ne0",
       100,
       {"tensor 'b' of type q4_K", "ne[0] = 100", "not a multiple of the block size 256"}},
      {"ti2.ne0", 33, {"tensor 'c' of type q8_0", "block size 32"}},
  };
  for (const C& c : cases) {
    SCOPED_TRACE(c.mark + " = " + std::to_string(c.value));
    std::vector<uint8_t> b = g.bytes();
    Patch<int64_t>(b, g.mark(c.mark), c.value);
    const absl::Status s = Load(b);
    ExpectError(s, c.words);
  }
  for (uint32_t n_dims : {0u, 5u, 0xFFFFFFFFu}) {
    std::vector<uint8_t> b = g.bytes();
    Patch<uint32_t>(b, g.mark("ti0.n_dims"), n_dims);
    ExpectError(Load(b), {"tensor 'a'", "n_dims = " + std::to_string(n_dims), "expected 1..4"});
  }
  // n_dims 1 instead of 2: the following bytes are read one field later.
  std::vector<uint8_t> b = g.bytes();
  Patch<uint32_t>(b, g.mark("ti0.n_dims"), 1);
  EXPECT_FALSE(Load(b).ok());
}

TEST(GgufHostileTest, UnknownAndUnsupportedTensorTypes) {
  RawGguf g = BaseFile();
  for (uint32_t id : {4u, 5u, 31u, 36u, 99u, 0xFFFFFFFFu}) {
    std::vector<uint8_t> b = g.bytes();
    Patch<uint32_t>(b, g.mark("ti2.type"), id);
    ExpectError(Load(b), {"tensor 'c'", "unknown tensor type id " + std::to_string(id),
                          kernels::SupportedTensorTypeNames()});
  }
  // q2_K (id 10, 84-byte blocks of 256) is known but not computable: it loads.
  std::vector<uint8_t> b = g.bytes();
  Patch<uint32_t>(b, g.mark("ti1.type"), 10);
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::FromMemory(b.data(), b.size(), kName);
  ASSERT_TRUE(f.ok()) << f.status();
  const TensorInfo* t = (*f)->FindTensor("b");
  EXPECT_EQ(t->type, kernels::TensorType::kQ2_K);
  EXPECT_EQ(t->n_bytes, 84u);
}

TEST(GgufHostileTest, BadOffsets) {
  RawGguf g = BaseFile();
  struct C {
    std::string mark;
    uint64_t value;
    std::vector<std::string> words;
  };
  const uint64_t kMax = std::numeric_limits<uint64_t>::max();
  const std::vector<C> cases = {
      {"ti2.offset", kMax, {"tensor 'c'", "not a multiple of the alignment 32"}},
      {"ti2.offset", kMax - 31, {"tensor 'c'", "past the end of the file"}},  // wraps around
      {"ti2.offset", uint64_t{1} << 63, {"tensor 'c'", "past the end of the file"}},
      {"ti2.offset", 448, {"tensor 'c'", "(204 bytes, type q8_0, shape {64, 3})", "past the end"}},
      {"ti2.offset", 417, {"tensor 'c'", "offset 417", "alignment 32"}},
      {"ti2.offset", 0, {"overlap", "'a'", "'c'"}},
      {"ti1.offset", 224, {"overlap", "'a' (data [0, 256))", "'b' (data [224, 368))"}},
      {"ti0.offset", 352, {"overlap", "'b' (data [256, 400))", "'a' (data [352, 608))"}},
  };
  for (const C& c : cases) {
    SCOPED_TRACE(c.mark + " = " + std::to_string(c.value));
    std::vector<uint8_t> b = g.bytes();
    Patch<uint64_t>(b, g.mark(c.mark), c.value);
    ExpectError(Load(b), c.words);
  }
  // Reordered but not overlapping is fine: a after c.
  std::vector<uint8_t> b = g.bytes();
  b.resize(g.mark("data") + 640 + 256, 0);
  Patch<uint64_t>(b, g.mark("ti0.offset"), 640);
  EXPECT_TRUE(Load(b).ok());
}

TEST(GgufHostileTest, DuplicateNamesAndKeys) {
  RawGguf g = BaseFile();
  std::vector<uint8_t> b = g.bytes();
  b[g.mark("ti2") + 8] = 'a';  // tensor "c" becomes a second "a"
  ExpectError(Load(b), {"duplicate tensor name 'a'"});
  b = g.bytes();
  b[g.mark("kv3") + 8 + 6] = '1';  // "test.k2" becomes a second "test.k1"
  ExpectError(Load(b), {"duplicate metadata key 'test.k1'"});
}

TEST(GgufHostileTest, LongTensorName) {
  for (size_t len : {63u, 64u, 1000u}) {
    RawGguf g;
    const std::string name(len, 'x');
    g.U32(0x46554747).U32(3).U64(1).U64(0);
    g.Str(name).U32(1).I64(8).U32(0).U64(0).PadTo(32).Fill(32, 0);
    const absl::Status s = Load(g.bytes());
    if (len == 63) {
      EXPECT_TRUE(s.ok()) << s;
    } else {
      ExpectError(s, {"tensor info 0", std::to_string(len) + " bytes", "at most 63"});
    }
  }
}

TEST(GgufHostileTest, EmptyModelIsValid) {
  // No tensors, no metadata, not even padding.
  RawGguf g;
  g.U32(0x46554747).U32(3).U64(0).U64(0);
  absl::StatusOr<std::unique_ptr<GgufFile>> f =
      GgufFile::FromMemory(g.bytes().data(), g.bytes().size(), kName);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->tensors().empty());
  EXPECT_EQ((*f)->total_tensor_bytes(), 0u);
}

// The real fixture: prefixes of the header fail with a message naming the
// file and what was being read; so does a cut inside every tensor. Every byte
// is tried in the fixed header, the first metadata entries, the first tensor
// infos and around the end of the header; a stride elsewhere (each prefix
// parses up to 16 KiB of metadata; ASan makes that slow).
TEST(GgufHostileTest, FixtureTruncations) {
  const std::string path = testing::FixturePath("dsv3-tiny-q4_k_m.gguf");
  const std::vector<uint8_t> bytes = testing::ReadFileBytes(path);
  absl::StatusOr<std::unique_ptr<GgufFile>> full =
      GgufFile::FromMemory(bytes.data(), bytes.size(), kName);
  ASSERT_TRUE(full.ok()) << full.status();
  const uint64_t data = (*full)->data_offsets()[0];
  const uint64_t header_end = 15884;  // hand-decoded; data starts at the next multiple of 32
  ASSERT_EQ(data, 15904u);
  uint64_t infos = 0;  // bytes of the tensor infos: name, n_dims, ne, type, offset
  for (const TensorInfo& t : (*full)->tensors())
    infos += 8 + t.name.size() + 4 + 8 * t.ne.size() + 4 + 8;
  const uint64_t infos_begin = header_end - infos;
  std::vector<uint64_t> sizes;
  for (uint64_t size = 0; size <= data + 1; ++size) {
    const bool dense =
        size < 4096 || (size >= infos_begin && size < infos_begin + 600) || size + 64 >= header_end;
    if (dense || size % 61 == 0) sizes.push_back(size);
  }
  for (uint64_t size : sizes) {
    const absl::Status s = Load(bytes, size);
    ASSERT_FALSE(s.ok()) << size;
    ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << size;
    const std::string msg(s.message());
    ASSERT_THAT(msg, HasSubstr(kName)) << size;
    ASSERT_THAT(msg,
                AnyOf(HasSubstr("not a GGUF file"), HasSubstr("truncated"), HasSubstr("exceeds"),
                      HasSubstr("need at least"), HasSubstr("past the end of the file")))
        << size << ": " << msg;
    if (size >= infos_begin && size < header_end) {
      ASSERT_THAT(msg, AnyOf(HasSubstr("tensor info"), HasSubstr("tensor '")))
          << size << ": " << msg;
    }
    if (size >= header_end) {
      // Header complete: the first tensor's data is what is missing.
      ASSERT_THAT(msg, HasSubstr("tensor 'output.weight'")) << msg;
    }
  }
  for (const TensorInfo& t : (*full)->tensors()) {
    const absl::Status s = Load(bytes, t.file_offset + t.n_bytes - 1);
    ExpectError(s, {"tensor '" + t.name + "'", "past the end of the file"});
  }
}

}  // namespace
}  // namespace ktx::gguf
