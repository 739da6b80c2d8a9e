// Reader <-> writer round trips, the writer's byte encoding against a
// hand-written one, streaming, alignment, split files and writer validation.
#include "runtime/gguf/gguf_writer.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/base/status.h"
#include "runtime/gguf/gguf.h"
#include "tests/runtime/gguf/gguf_test_util.h"

namespace ktx::gguf {
namespace {

using kernels::TensorType;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::PatternBytes;

std::unique_ptr<GgufFile> Parse(const std::vector<uint8_t>& bytes,
                                const std::string& name = "mem.gguf") {
  absl::StatusOr<std::unique_ptr<GgufFile>> f =
      GgufFile::FromMemory(bytes.data(), bytes.size(), name);
  EXPECT_TRUE(f.ok()) << f.status();
  return f.ok() ? std::move(*f) : nullptr;
}

template <typename T>
T Get(const GgufFile& f, const std::string& key) {
  const Value* v = f.metadata().Find(key);
  KTX_CHECK_MSG(v != nullptr, key.c_str());
  return std::get<T>(v->storage());
}

TEST(GgufWriterTest, EveryValueTypeRoundTrips) {
  GgufWriter w;
  testing::AddEveryValueType(w);
  absl::StatusOr<std::vector<uint8_t>> bytes = w.WriteToMemory();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  std::unique_ptr<GgufFile> f = Parse(*bytes);
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->metadata().entries().size(), 28u);

  EXPECT_EQ(f->metadata().Find("t.u8")->type(), ValueType::kUint8);
  EXPECT_EQ(Get<uint8_t>(*f, "t.u8"), 255);
  EXPECT_EQ(Get<int8_t>(*f, "t.i8"), -128);
  EXPECT_EQ(Get<uint16_t>(*f, "t.u16"), 65535);
  EXPECT_EQ(Get<int16_t>(*f, "t.i16"), -32768);
  EXPECT_EQ(Get<uint32_t>(*f, "t.u32"), 4294967295u);
  EXPECT_EQ(Get<int32_t>(*f, "t.i32"), std::numeric_limits<int32_t>::min());
  EXPECT_EQ(Get<uint64_t>(*f, "t.u64"), std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(Get<int64_t>(*f, "t.i64"), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(Get<float>(*f, "t.f32"), -1.5e-38f);
  EXPECT_EQ(Get<double>(*f, "t.f64"), 1e300);
  EXPECT_EQ(Get<bool>(*f, "t.bool_true"), true);
  EXPECT_EQ(Get<bool>(*f, "t.bool_false"), false);
  EXPECT_EQ(Get<std::string>(*f, "t.string"), std::string("h\xc3\xa9llo\0world\n", 13));
  EXPECT_EQ(Get<std::string>(*f, "t.empty_string"), "");

  struct IntArray {
    const char* key;
    ValueType type;
    std::vector<int64_t> values;
  };
  const IntArray int_arrays[] = {
      {"t.arr_u8", ValueType::kUint8, {0, 1, 255}},
      {"t.arr_i8", ValueType::kInt8, {-128, 0, 127}},
      {"t.arr_u16", ValueType::kUint16, {0, 65535}},
      {"t.arr_i16", ValueType::kInt16, {-32768, 32767}},
      {"t.arr_u32", ValueType::kUint32, {0, 4294967295}},
      {"t.arr_i32", ValueType::kInt32, {std::numeric_limits<int32_t>::min(), 5}},
      {"t.arr_u64", ValueType::kUint64, {0, -1, 42}},
      {"t.arr_i64",
       ValueType::kInt64,
       {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()}},
      {"t.arr_empty", ValueType::kInt32, {}},
  };
  for (const IntArray& a : int_arrays) {
    const Value* v = f->metadata().Find(a.key);
    ASSERT_NE(v, nullptr) << a.key;
    EXPECT_EQ(v->type(), ValueType::kArray) << a.key;
    EXPECT_EQ(v->array_type(), a.type) << a.key;
    EXPECT_EQ(std::get<std::vector<int64_t>>(v->storage()), a.values) << a.key;
    EXPECT_EQ(v->array_size(), a.values.size());
  }
  const Value* f32 = f->metadata().Find("t.arr_f32");
  EXPECT_EQ(f32->array_type(), ValueType::kFloat32);
  EXPECT_THAT(std::get<std::vector<double>>(f32->storage()),
              ElementsAre(0.5, -2.0, std::numeric_limits<double>::infinity()));
  const Value* f64 = f->metadata().Find("t.arr_f64");
  EXPECT_EQ(f64->array_type(), ValueType::kFloat64);
  const auto& d = std::get<std::vector<double>>(f64->storage());
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d[0], 1e-300);
  EXPECT_EQ(d[1], 0.1);
  EXPECT_TRUE(std::signbit(d[2]));
  EXPECT_THAT(std::get<std::vector<bool>>(f->metadata().Find("t.arr_bool")->storage()),
              ElementsAre(true, false, true, true));
  EXPECT_THAT(*f->metadata().GetStringArray("t.arr_string"),
              ElementsAre("", "a", std::string(1000, 'x'), "\xe2\x96\x81tok"));
  EXPECT_TRUE(f->metadata().GetStringArray("t.arr_empty_strings")->empty());
  EXPECT_EQ(f->metadata().Find("t.arr_empty_strings")->array_type(), ValueType::kString);

  // A second generation written from the parsed metadata is identical.
  GgufWriter w2;
  ASSERT_TRUE(w2.CopyMetadata(f->metadata()).ok());
  absl::StatusOr<std::vector<uint8_t>> bytes2 = w2.WriteToMemory();
  ASSERT_TRUE(bytes2.ok()) << bytes2.status();
  std::unique_ptr<GgufFile> f2 = Parse(*bytes2);
  ASSERT_NE(f2, nullptr);
  ASSERT_EQ(f2->metadata().entries().size(), f->metadata().entries().size());
  for (const auto& [key, value] : f->metadata().entries()) {
    const Value* v2 = f2->metadata().Find(key);
    ASSERT_NE(v2, nullptr) << key;
    EXPECT_EQ(v2->type(), value.type()) << key;
    EXPECT_EQ(v2->array_type(), value.array_type()) << key;
    EXPECT_TRUE(v2->storage() == value.storage()) << key;
  }
}

TEST(GgufWriterTest, NanAndBitPatternsSurvive) {
  GgufWriter w;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  w.SetF32("nan", nan);
  w.SetF64("denorm", std::numeric_limits<double>::denorm_min());
  absl::StatusOr<std::vector<uint8_t>> bytes = w.WriteToMemory();
  ASSERT_TRUE(bytes.ok());
  std::unique_ptr<GgufFile> f = Parse(*bytes);
  EXPECT_TRUE(std::isnan(Get<float>(*f, "nan")));
  EXPECT_EQ(Get<double>(*f, "denorm"), std::numeric_limits<double>::denorm_min());
}

// The writer's bytes equal the hand-encoded base file (tests/.../gguf_test_util.cc).
TEST(GgufWriterTest, MatchesHandEncodedFile) {
  testing::RawGguf raw = testing::BaseFile();
  GgufWriter w;
  w.SetString("general.architecture", "test");
  ASSERT_TRUE(w.SetAlignment(32).ok());
  w.SetU8("test.k1", 7);
  w.SetU8("test.k2", 9);
  w.SetBool("test.flag", true);
  w.SetStringArray("test.tokens", {"a", "bc", "def"});
  ASSERT_TRUE(w.SetIntArray("test.ints", ValueType::kInt32, {1, -2, 3}).ok());
  auto data = [](size_t begin, size_t n) {
    std::vector<uint8_t> b(n);
    for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>((begin + i) & 255);
    return b;
  };
  ASSERT_TRUE(w.AddTensor("a", {32, 2}, TensorType::kF32, data(0, 256)).ok());
  ASSERT_TRUE(w.AddTensor("b", {256}, TensorType::kQ4_K, data(256, 144)).ok());
  ASSERT_TRUE(w.AddTensor("c", {64, 3}, TensorType::kQ8_0, data(416, 204)).ok());
  absl::StatusOr<std::vector<uint8_t>> bytes = w.WriteToMemory();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  // The raw file ends with the last tensor; the writer pads it to the alignment.
  std::vector<uint8_t> expected = raw.bytes();
  expected.resize((expected.size() + 31) / 32 * 32, 0);
  EXPECT_EQ(*bytes, expected);

  std::unique_ptr<GgufFile> f = Parse(raw.bytes(), "raw.gguf");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->data_offsets(), std::vector<uint64_t>{raw.mark("data")});
  const TensorInfo* c = f->FindTensor("c");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->offset, 416u);
  EXPECT_EQ(c->file_offset, raw.mark("data") + 416);
  EXPECT_EQ(c->n_bytes, 204u);
  EXPECT_EQ(c->row_bytes(), 68);
  EXPECT_EQ(c->n_rows(), 3);
  EXPECT_EQ(c->n_elements(), 192);
  EXPECT_EQ(c->ShapeString(), "{64, 3}");
  EXPECT_EQ(c->data, raw.bytes().data() + raw.mark("data") + 416);
  EXPECT_EQ(c->data[0], 416 & 255);
}

TEST(GgufWriterTest, TensorsAreContiguousAlignedAndExact) {
  for (uint32_t alignment : {1u, 32u, 64u, 4096u}) {
    SCOPED_TRACE(alignment);
    GgufWriter w;
    ASSERT_TRUE(w.SetAlignment(alignment).ok());
    testing::AddAssortedTensors(w);
    absl::StatusOr<std::vector<uint8_t>> bytes = w.WriteToMemory();
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    std::unique_ptr<GgufFile> f = Parse(*bytes);
    ASSERT_NE(f, nullptr);
    EXPECT_EQ(f->alignment(), alignment);
    EXPECT_EQ(f->data_offsets()[0] % alignment, 0u);
    ASSERT_EQ(f->tensors().size(), 6u);
    uint64_t expected_offset = 0;
    uint32_t seed = 1;
    for (const TensorInfo& t : f->tensors()) {
      EXPECT_EQ(t.offset, expected_offset) << t.name;  // ggml's contiguity rule
      expected_offset += (t.n_bytes + alignment - 1) / alignment * alignment;
      const std::vector<uint8_t> want = PatternBytes(t.n_bytes, seed++);
      EXPECT_EQ(std::vector<uint8_t>(t.data, t.data + t.n_bytes), want) << t.name;
    }
    EXPECT_EQ(bytes->size(), f->data_offsets()[0] + expected_offset);
    const TensorInfo* q2 = f->FindTensor("blk.0.ffn_down_exps.weight");
    ASSERT_NE(q2, nullptr);
    EXPECT_EQ(q2->type, TensorType::kQ2_K);  // known but not computable: still loads
    EXPECT_EQ(q2->ne, (std::vector<int64_t>{512, 1, 1, 2}));
    EXPECT_EQ(f->total_tensor_bytes(), w.tensor_bytes());
  }
}

TEST(GgufWriterTest, FillCallbackStreamsWholeRowsInOrder) {
  GgufWriter w;
  const int64_t n_rows = 1000;  // q8_0 {256, 10, 100}: 8 blocks of 34 bytes per row
  const int64_t row_bytes = 8 * 34;
  std::vector<std::pair<int64_t, int64_t>> calls;
  ASSERT_TRUE(w.AddTensor("x", {256, 10, 100}, TensorType::kQ8_0,
                          [&](int64_t row0, int64_t n, uint8_t* dst) {
                            calls.emplace_back(row0, n);
                            for (int64_t i = 0; i < n * row_bytes; ++i) {
                              dst[i] = static_cast<uint8_t>((row0 * row_bytes + i) * 7 % 251);
                            }
                            return absl::OkStatus();
                          })
                  .ok());
  WriteOptions options;
  options.chunk_bytes = 1000;  // 3 rows per call
  absl::StatusOr<std::vector<uint8_t>> bytes = w.WriteToMemory(options);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  ASSERT_EQ(calls.size(), 334u);
  int64_t next = 0;
  for (const auto& [row0, n] : calls) {
    EXPECT_EQ(row0, next);
    EXPECT_LE(n, 3);
    next += n;
  }
  EXPECT_EQ(next, n_rows);
  std::unique_ptr<GgufFile> f = Parse(*bytes);
  const TensorInfo* t = f->FindTensor("x");
  ASSERT_EQ(t->n_bytes, static_cast<uint64_t>(n_rows * row_bytes));
  for (uint64_t i = 0; i < t->n_bytes; ++i) {
    ASSERT_EQ(t->data[i], static_cast<uint8_t>(i * 7 % 251)) << i;
  }

  // A chunk smaller than a row still gets one row per call.
  calls.clear();
  options.chunk_bytes = 10;
  ASSERT_TRUE(w.WriteToMemory(options).ok());
  EXPECT_EQ(calls.size(), static_cast<size_t>(n_rows));
}

TEST(GgufWriterTest, FillErrorAbortsAndLeavesNoFile) {
  const std::string dir = testing::MakeTempDir();
  const std::string path = dir + "/broken.gguf";
  GgufWriter w;
  ASSERT_TRUE(w.AddTensor("ok", {4}, TensorType::kF32, std::vector<uint8_t>(16, 1)).ok());
  ASSERT_TRUE(w.AddTensor("bad", {32, 4}, TensorType::kF32, [](int64_t row0, int64_t n, uint8_t*) {
                 return row0 >= 2 ? absl::DataLossError("generator broke") : absl::OkStatus();
               }).ok());
  WriteOptions options;
  options.chunk_bytes = 128;  // one row per call
  const absl::Status s = w.Write(path, options);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("'bad'"), HasSubstr("rows 2..2"), HasSubstr("generator broke")));
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  std::filesystem::remove_all(dir);
}

TEST(GgufWriterTest, WritesAndOpensFromDisk) {
  const std::string dir = testing::MakeTempDir();
  const std::string path = dir + "/model.gguf";
  GgufWriter w;
  testing::AddEveryValueType(w);
  testing::AddAssortedTensors(w);
  std::vector<std::string> written;
  ASSERT_TRUE(w.Write(path, {}, &written).ok());
  EXPECT_THAT(written, ElementsAre(path));
  for (bool populate : {false, true}) {
    OpenOptions options;
    options.populate = populate;
    absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path, options);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_THAT((*f)->paths(), ElementsAre(path));
    EXPECT_EQ((*f)->tensors().size(), 6u);
    EXPECT_EQ(*(*f)->metadata().GetU32("t.u32"), 4294967295u);
    const TensorInfo* t = (*f)->FindTensor("blk.0.ffn_up.weight");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(std::vector<uint8_t>(t->data, t->data + t->n_bytes), PatternBytes(510, 3));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data) % 32, 0u);  // mmap base is page-aligned

    // GetTensor: exact shape, trailing 1s ignored.
    EXPECT_TRUE((*f)->GetTensor("blk.0.ffn_up.weight", {96, 5}).ok());
    EXPECT_TRUE((*f)->GetTensor("blk.0.ffn_up.weight", {96, 5, 1, 1}).ok());
    EXPECT_TRUE((*f)->GetTensor("blk.0.ffn_down_exps.weight", {512, 1, 1, 2}).ok());
    const absl::Status wrong = (*f)->GetTensor("blk.0.ffn_up.weight", {96, 6}).status();
    EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(wrong.message(),
                AllOf(HasSubstr(path), HasSubstr("'blk.0.ffn_up.weight'"),
                      HasSubstr("has shape {96, 5}"), HasSubstr("expected {96, 6}")));
    const absl::Status missing = (*f)->GetTensor("nope.weight", {1}).status();
    EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(missing.message(), HasSubstr("'nope.weight' is missing"));
    EXPECT_EQ((*f)->FindTensor("nope.weight"), nullptr);
  }
  // No temp file left behind.
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  const absl::Status s = GgufFile::Open(dir + "/absent.gguf").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("absent.gguf"));
  const absl::Status d = GgufFile::Open(dir).status();
  EXPECT_THAT(d.message(), HasSubstr("not a regular file"));
  std::filesystem::remove_all(dir);
}

TEST(GgufWriterTest, VersionTwoIsAccepted) {
  GgufWriter w;
  testing::AddAssortedTensors(w);
  std::vector<uint8_t> bytes = *w.WriteToMemory();
  testing::Patch<uint32_t>(bytes, 4, 2);
  std::unique_ptr<GgufFile> f = Parse(bytes);
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->version(), 2u);
  EXPECT_EQ(f->tensors().size(), 6u);
}

TEST(GgufWriterTest, SplitRoundTrip) {
  const std::string dir = testing::MakeTempDir();
  GgufWriter w;
  testing::AddEveryValueType(w);
  ASSERT_TRUE(w.SetAlignment(64).ok());
  testing::AddAssortedTensors(w);
  WriteOptions options;
  options.n_split = 3;
  std::vector<std::string> written;
  ASSERT_TRUE(w.Write(dir + "/m.gguf", options, &written).ok());
  EXPECT_THAT(written, ElementsAre(dir + "/m-00001-of-00003.gguf", dir + "/m-00002-of-00003.gguf",
                                   dir + "/m-00003-of-00003.gguf"));

  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(written[0]);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->paths(), written);
  EXPECT_EQ((*f)->data_offsets().size(), 3u);
  EXPECT_EQ((*f)->alignment(), 64u);
  ASSERT_EQ((*f)->tensors().size(), 6u);
  std::vector<int> parts;
  uint32_t seed = 1;
  for (const TensorInfo& t : (*f)->tensors()) {
    parts.push_back(t.file_index);
    EXPECT_EQ(std::vector<uint8_t>(t.data, t.data + t.n_bytes), PatternBytes(t.n_bytes, seed++))
        << t.name;
  }
  EXPECT_TRUE(std::is_sorted(parts.begin(), parts.end()));
  EXPECT_EQ(parts.front(), 0);
  EXPECT_EQ(parts.back(), 2);
  EXPECT_NE(std::find(parts.begin(), parts.end(), 1), parts.end());
  EXPECT_EQ(*(*f)->metadata().GetU32("split.count"), 3u);
  EXPECT_EQ(*(*f)->metadata().GetU32("split.no"), 0u);
  EXPECT_EQ(*(*f)->metadata().GetI64("split.tensors.count"), 6);
  EXPECT_EQ((*f)->metadata().Find("split.count")->type(), ValueType::kUint16);
  EXPECT_EQ((*f)->metadata().Find("split.tensors.count")->type(), ValueType::kInt32);
  EXPECT_EQ(*(*f)->metadata().GetU32("t.u32"), 4294967295u);

  // Later parts: only alignment and split keys (llama-gguf-split does the same).
  std::vector<uint8_t> part1 = testing::ReadFileBytes(written[1]);
  std::unique_ptr<GgufFile> p1 = Parse(part1, written[1]);
  ASSERT_NE(p1, nullptr);
  std::vector<std::string> keys;
  for (const auto& [key, value] : p1->metadata().entries()) keys.push_back(key);
  EXPECT_THAT(keys,
              ElementsAre("general.alignment", "split.count", "split.no", "split.tensors.count"));
  EXPECT_EQ(*p1->metadata().GetU32("split.no"), 1u);

  // Opening a later part points at the first.
  absl::Status s = GgufFile::Open(written[1]).status();
  EXPECT_THAT(s.message(), AllOf(HasSubstr("part 2 of 3"), HasSubstr("m-00001-of-00003.gguf")));

  // A missing part is named.
  std::filesystem::rename(written[2], dir + "/elsewhere.gguf");
  s = GgufFile::Open(written[0]).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("part 3 of 3"), HasSubstr(written[2])));
  std::filesystem::rename(dir + "/elsewhere.gguf", written[2]);
  EXPECT_TRUE(GgufFile::Open(written[0]).ok());

  // A first part whose name lost the pattern cannot find the others.
  std::filesystem::copy_file(written[0], dir + "/renamed.gguf");
  s = GgufFile::Open(dir + "/renamed.gguf").status();
  EXPECT_THAT(s.message(), AllOf(HasSubstr("split.count = 3"), HasSubstr("split pattern")));
  std::filesystem::remove_all(dir);
}

// Parts written by hand (n_split = 1 each, split keys set explicitly).
TEST(GgufWriterTest, SplitConsistencyIsChecked) {
  const std::string dir = testing::MakeTempDir();
  const std::string p0 = dir + "/s-00001-of-00002.gguf";
  const std::string p1 = dir + "/s-00002-of-00002.gguf";
  auto write_part = [](const std::string& path, uint16_t no, uint16_t count, int32_t total,
                       const std::vector<std::string>& names) {
    GgufWriter w;
    w.SetU16("split.no", no);
    w.SetU16("split.count", count);
    w.SetI32("split.tensors.count", total);
    for (const std::string& n : names) {
      KTX_CHECK(w.AddTensor(n, {8}, TensorType::kF32, std::vector<uint8_t>(32, 0)).ok());
    }
    KTX_CHECK(w.Write(path).ok());
  };
  write_part(p0, 0, 2, 3, {"x", "y"});
  write_part(p1, 1, 2, 3, {"z"});
  absl::StatusOr<std::unique_ptr<GgufFile>> ok = GgufFile::Open(p0);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->FindTensor("z")->file_index, 1);

  write_part(p0, 0, 2, 4, {"x", "y"});
  absl::Status s = GgufFile::Open(p0).status();
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("split.tensors.count"), HasSubstr("= 4"), HasSubstr("hold 3")));

  write_part(p0, 0, 2, 3, {"x", "y"});
  write_part(p1, 0, 2, 3, {"z"});
  s = GgufFile::Open(p0).status();
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr(p1), HasSubstr("expected split.no = 1"), HasSubstr("found 0")));

  write_part(p1, 1, 3, 3, {"z"});
  s = GgufFile::Open(p0).status();
  EXPECT_THAT(s.message(), AllOf(HasSubstr(p1), HasSubstr("split.count = 2")));

  write_part(p1, 1, 2, 3, {"x"});
  s = GgufFile::Open(p0).status();
  EXPECT_THAT(s.message(), AllOf(HasSubstr("duplicate tensor name 'x'"), HasSubstr(p1)));

  // The name says 2 parts, the metadata 3.
  write_part(p0, 0, 3, 3, {"x", "y"});
  s = GgufFile::Open(p0).status();
  EXPECT_THAT(s.message(), AllOf(HasSubstr("says 2 parts"), HasSubstr("split.count = 3")));
  std::filesystem::remove_all(dir);
}

TEST(GgufWriterTest, SplitPathHelpers) {
  EXPECT_EQ(SplitPath("/m/DeepSeek-V3-Q4_K_M", 0, 9), "/m/DeepSeek-V3-Q4_K_M-00001-of-00009.gguf");
  std::string prefix;
  int index = -1;
  int count = -1;
  ASSERT_TRUE(ParseSplitPath("/m/DeepSeek-V3-Q4_K_M-00003-of-00009.gguf", &prefix, &index, &count));
  EXPECT_EQ(prefix, "/m/DeepSeek-V3-Q4_K_M");
  EXPECT_EQ(index, 2);
  EXPECT_EQ(count, 9);
  EXPECT_FALSE(ParseSplitPath("model.gguf", &prefix, &index, &count));
  EXPECT_FALSE(ParseSplitPath("m-00010-of-00009.gguf", &prefix, &index, &count));
  EXPECT_FALSE(ParseSplitPath("m-00000-of-00009.gguf", &prefix, &index, &count));
  EXPECT_FALSE(ParseSplitPath("m-0001a-of-00009.gguf", &prefix, &index, &count));
  EXPECT_FALSE(ParseSplitPath("-00001-of-00009.gguf", &prefix, &index, &count));
  EXPECT_FALSE(ParseSplitPath("m-00001-of-00009.ggml", &prefix, &index, &count));
}

TEST(GgufWriterTest, RejectsBadTensorsAndValues) {
  GgufWriter w;
  ASSERT_TRUE(w.AddTensor("t", {32}, TensorType::kF32, std::vector<uint8_t>(128)).ok());
  struct Case {
    absl::Status status;
    std::vector<std::string> words;
  };
  const std::vector<Case> cases = {
      {w.AddTensor("t", {32}, TensorType::kF32, std::vector<uint8_t>(128)), {"'t'", "added twice"}},
      {w.AddTensor("", {32}, TensorType::kF32, std::vector<uint8_t>(128)), {"empty name"}},
      {w.AddTensor(std::string(64, 'n'), {32}, TensorType::kF32, std::vector<uint8_t>(128)),
       {"64 bytes", "at most 63"}},
      {w.AddTensor("d0", {}, TensorType::kF32, std::vector<uint8_t>()), {"'d0'", "0 dims"}},
      {w.AddTensor("d5", {1, 1, 1, 1, 1}, TensorType::kF32, std::vector<uint8_t>(4)), {"5 dims"}},
      {w.AddTensor("z", {32, 0}, TensorType::kF32, std::vector<uint8_t>()), {"ne[1] = 0"}},
      {w.AddTensor("q", {100}, TensorType::kQ4_K, std::vector<uint8_t>()),
       {"'q'", "ne[0] = 100", "q4_K block size 256"}},
      {w.AddTensor("s", {32}, TensorType::kF32, std::vector<uint8_t>(127)),
       {"'s'", "got 127 bytes", "expected 128"}},
      {w.AddTensor("u", {32}, static_cast<TensorType>(99), std::vector<uint8_t>(128)),
       {"unknown tensor type id 99"}},
      {w.AddTensor("big", {1 << 30, 1 << 30, 1 << 30, 1 << 30}, TensorType::kF32,
                   GgufWriter::FillFn([](int64_t, int64_t, uint8_t*) { return absl::OkStatus(); })),
       {"'big'", "overflows"}},
      {w.AddTensor("nofill", {32}, TensorType::kF32, GgufWriter::FillFn()),
       {"empty fill callback"}},
      {w.SetIntArray("k.u8", ValueType::kUint8, {1, 256}), {"'k.u8'", "element 1 = 256", "u8"}},
      {w.SetIntArray("k.i16", ValueType::kInt16, {-32769}), {"'k.i16'", "-32769"}},
      {w.SetIntArray("k.bad", ValueType::kFloat32, {1}), {"'k.bad'", "array[f32]"}},
      {w.SetFloatArray("k.f", ValueType::kInt32, {1.0}), {"'k.f'", "array[i32]"}},
      {w.Set("k.mismatch", Value(ValueType::kUint32, std::string("x"))), {"'k.mismatch'", "u32"}},
      {w.Set("k.nested", Value(ValueType::kArray, std::vector<int64_t>{}, ValueType::kArray)),
       {"'k.nested'", "not allowed"}},
      {w.SetAlignment(48), {"general.alignment", "power of two", "48"}},
      {w.SetAlignment(0), {"general.alignment", "power of two"}},
      {w.Set("general.alignment", Value(ValueType::kUint64, uint64_t{64})), {"u32", "u64 64"}},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(c.status.code(), absl::StatusCode::kInvalidArgument) << c.status;
    for (const std::string& word : c.words) EXPECT_THAT(c.status.message(), HasSubstr(word));
  }
  EXPECT_EQ(w.n_tensors(), 1u);  // nothing bad was added
  EXPECT_EQ(w.tensor_bytes(), 128u);

  WriteOptions too_many;
  too_many.n_split = 2;
  EXPECT_THAT(w.Write("/nonexistent/x.gguf", too_many).message(), HasSubstr("only 1 tensors"));
  too_many.n_split = 0;
  EXPECT_THAT(w.Write("/nonexistent/x.gguf", too_many).message(), HasSubstr("n_split"));
  EXPECT_THAT(w.WriteToMemory(WriteOptions{2}).status().message(), HasSubstr("n_split must be 1"));
  EXPECT_THAT(w.Write("/nonexistent-dir/x.gguf").message(),
              HasSubstr("/nonexistent-dir/x.gguf.tmp"));
}

}  // namespace
}  // namespace ktx::gguf
