// Metadata getters: integer width conversion when the value fits, clear
// errors (key, type found, type expected) otherwise; Value formatting.
#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/base/status.h"
#include "runtime/gguf/gguf.h"
#include "runtime/gguf/gguf_writer.h"
#include "tests/runtime/gguf/gguf_test_util.h"

namespace ktx::gguf {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Metadata as parsed from a written file, so that types are the file's.
class MetadataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    GgufWriter w;
    testing::AddEveryValueType(w);
    w.SetU8("small.u8", 7);
    w.SetI64("small.i64", 12);
    w.SetI32("neg.i32", -5);
    w.SetU64("big.u64", uint64_t{1} << 40);
    w.SetF64("huge.f64", 1e300);
    w.SetF64("inf.f64", std::numeric_limits<double>::infinity());
    KTX_CHECK(
        w.SetIntArray("big.arr_u64", ValueType::kUint64, {1, std::numeric_limits<int64_t>::min()})
            .ok());
    bytes_ = *w.WriteToMemory();
    file_ = std::move(*GgufFile::FromMemory(bytes_.data(), bytes_.size(), "meta.gguf"));
  }
  const Metadata& m() const { return file_->metadata(); }

  std::vector<uint8_t> bytes_;
  std::unique_ptr<GgufFile> file_;
};

void ExpectTypeError(const absl::Status& s, const std::vector<std::string>& words) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("meta.gguf: metadata key "));
  for (const std::string& w : words) EXPECT_THAT(std::string(s.message()), HasSubstr(w));
}

TEST_F(MetadataTest, IntegerGettersConvertWhenTheValueFits) {
  EXPECT_EQ(*m().GetU32("small.u8"), 7u);
  EXPECT_EQ(*m().GetU32("small.i64"), 12u);
  EXPECT_EQ(*m().GetU32("t.u16"), 65535u);
  EXPECT_EQ(*m().GetU32("t.u32"), 4294967295u);
  EXPECT_EQ(*m().GetI64("t.u32"), 4294967295);
  EXPECT_EQ(*m().GetI64("neg.i32"), -5);
  EXPECT_EQ(*m().GetI64("t.i8"), -128);
  EXPECT_EQ(*m().GetI64("big.u64"), int64_t{1} << 40);
  EXPECT_EQ(*m().GetI64("t.i64"), std::numeric_limits<int64_t>::min());
}

TEST_F(MetadataTest, IntegerGettersComplain) {
  ExpectTypeError(m().GetU32("neg.i32").status(),
                  {"'neg.i32'", "[0, 2^32)", "out of range", "found i32 -5"});
  ExpectTypeError(m().GetU32("big.u64").status(), {"'big.u64'", "found u64 1099511627776"});
  ExpectTypeError(m().GetI64("t.u64").status(), {"'t.u64'", "found u64 18446744073709551615"});
  ExpectTypeError(m().GetU32("t.f32").status(), {"'t.f32'", "found f32"});
  ExpectTypeError(m().GetU32("t.bool_true").status(), {"'t.bool_true'", "found bool true"});
  ExpectTypeError(m().GetI64("t.string").status(), {"'t.string'", "found string \"h"});
  ExpectTypeError(m().GetU32("t.arr_u8").status(), {"'t.arr_u8'", "found array[u8] [0, 1, 255]"});
  const absl::Status missing = m().GetU32("no.such.key").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(missing.message(), "meta.gguf: metadata key 'no.such.key' is missing");
}

TEST_F(MetadataTest, FloatBoolStringGetters) {
  EXPECT_EQ(*m().GetF32("t.f32"), -1.5e-38f);
  EXPECT_EQ(*m().GetF32("inf.f64"), std::numeric_limits<float>::infinity());
  ExpectTypeError(m().GetF32("huge.f64").status(),
                  {"'huge.f64'", "out of f32 range", "found f64 1e+300"});
  ExpectTypeError(m().GetF32("small.u8").status(),
                  {"'small.u8'", "expected a float", "found u8 7"});
  EXPECT_EQ(*m().GetBool("t.bool_false"), false);
  ExpectTypeError(m().GetBool("small.u8").status(), {"'small.u8'", "expected a bool"});
  EXPECT_EQ(*m().GetString("t.empty_string"), "");
  ExpectTypeError(m().GetString("t.arr_string").status(),
                  {"'t.arr_string'", "expected a string", "array[string]"});
}

TEST_F(MetadataTest, ArrayGetters) {
  EXPECT_THAT(*m().GetIntArray("t.arr_i16"), ElementsAre(-32768, 32767));
  EXPECT_THAT(*m().GetIntArray("t.arr_u32"), ElementsAre(0, 4294967295));
  EXPECT_THAT(*m().GetFloatArray("t.arr_f64"), ElementsAre(1e-300, 0.1, -0.0));
  EXPECT_THAT(*m().GetStringArray("t.arr_string"), ::testing::SizeIs(4));
  ExpectTypeError(m().GetIntArray("big.arr_u64").status(),
                  {"'big.arr_u64'", "below 2^63", "element 1 is 9223372036854775808"});
  ExpectTypeError(m().GetIntArray("t.arr_f32").status(),
                  {"expected an array of integers", "array[f32]"});
  ExpectTypeError(m().GetFloatArray("t.arr_i8").status(), {"expected an array of floats"});
  ExpectTypeError(m().GetStringArray("t.arr_bool").status(),
                  {"expected an array of strings", "array[bool]"});
  ExpectTypeError(m().GetIntArray("t.u8").status(),
                  {"expected an array of integers", "found u8 255"});
}

TEST_F(MetadataTest, FallbackGetters) {
  EXPECT_EQ(*m().GetU32Or("absent", 17), 17u);
  EXPECT_EQ(*m().GetU32Or("small.u8", 17), 7u);
  EXPECT_EQ(*m().GetF32Or("absent", 0.25f), 0.25f);
  EXPECT_EQ(*m().GetBoolOr("absent", true), true);
  EXPECT_EQ(*m().GetStringOr("absent", "x"), "x");
  // Present with the wrong type: still an error.
  ExpectTypeError(m().GetU32Or("t.string", 1).status(), {"'t.string'"});
  ExpectTypeError(m().GetF32Or("t.string", 1).status(), {"'t.string'"});
  ExpectTypeError(m().GetBoolOr("t.string", true).status(), {"'t.string'"});
  ExpectTypeError(m().GetStringOr("t.u8", "x").status(), {"'t.u8'"});
}

TEST(ValueTest, Formatting) {
  EXPECT_STREQ(ValueTypeName(ValueType::kFloat64), "f64");
  EXPECT_STREQ(ValueTypeName(static_cast<ValueType>(42)), "unknown");
  EXPECT_EQ(Value(ValueType::kInt8, int8_t{-3}).ToString(), "-3");
  EXPECT_EQ(Value(ValueType::kFloat32, 0.1f).ToString(), "0.100000001");
  EXPECT_EQ(Value(ValueType::kString, std::string("a\"b\n")).ToString(), "\"a\\\"b\\n\"");
  // Valid UTF-8 stays readable; control and invalid bytes are escaped.
  EXPECT_EQ(Value(ValueType::kString, std::string("\xe2\x96\x81tok\x01\xff\xc3")).ToString(),
            "\"\xe2\x96\x81tok\\x01\\xff\\xc3\"");
  EXPECT_EQ(Value(ValueType::kString, std::string("\xed\xa0\x80")).ToString(),  // a surrogate
            "\"\\xed\\xa0\\x80\"");
  const Value arr(ValueType::kArray, std::vector<int64_t>{1, 2, 3, 4, 5}, ValueType::kInt32);
  EXPECT_EQ(arr.TypeString(), "array[i32]");
  EXPECT_EQ(arr.array_size(), 5u);
  EXPECT_EQ(arr.ToString(3), "[1, 2, 3, ...]");
  EXPECT_EQ(arr.ToString(5), "[1, 2, 3, 4, 5]");
  EXPECT_EQ(arr.ToString(0), "[...]");
  const Value u64s(ValueType::kArray, std::vector<int64_t>{-1}, ValueType::kUint64);
  EXPECT_EQ(u64s.ToString(), "[18446744073709551615]");
  EXPECT_EQ(
      Value(ValueType::kArray, std::vector<std::string>{"x", "y"}, ValueType::kString).ToString(),
      "[\"x\", \"y\"]");
  EXPECT_EQ(Value(ValueType::kBool, true).array_size(), 0u);
}

TEST(MetadataSetTest, HandBuiltMetadataHasNoSourcePrefix) {
  Metadata m;
  m.Set("k", Value(ValueType::kUint32, uint32_t{3}));
  EXPECT_TRUE(m.Has("k"));
  EXPECT_FALSE(m.Has("x"));
  EXPECT_EQ(*m.GetU32("k"), 3u);
  EXPECT_EQ(m.GetString("k").status().message(),
            "metadata key 'k': expected a string, found u32 3");
  m.set_source("src");
  EXPECT_THAT(m.GetString("k").status().message(), AllOf(HasSubstr("src: "), HasSubstr("'k'")));
}

}  // namespace
}  // namespace ktx::gguf
