#include "tests/runtime/gguf/gguf_test_util.h"

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>

#include "gtest/gtest.h"
#include "runtime/base/status.h"

#ifndef KTX_SOURCE_DIR
#error "KTX_SOURCE_DIR must be defined (ktx_cc_test does it)"
#endif

namespace ktx::gguf::testing {

RawGguf BaseFile() {
  RawGguf g;
  g.U32(0x46554747).U32(3);
  g.Mark("n_tensors").U64(3);
  g.Mark("n_kv").U64(7);
  auto kv = [&g](int i, std::string_view key, uint32_t type) -> RawGguf& {
    const std::string k = "kv" + std::to_string(i);
    g.Mark(k).Str(key).Mark(k + ".type").U32(type).Mark(k + ".value");
    return g;
  };
  kv(0, "general.architecture", 8).Str("test").Mark("kv0.end");
  kv(1, "general.alignment", 4).U32(32).Mark("kv1.end");
  kv(2, "test.k1", 0).U8(7).Mark("kv2.end");
  kv(3, "test.k2", 0).U8(9).Mark("kv3.end");
  kv(4, "test.flag", 7).U8(1).Mark("kv4.end");
  kv(5, "test.tokens", 9).U32(8).Mark("kv5.count").U64(3).Str("a").Mark("kv5.elem1").Str("bc");
  g.Str("def").Mark("kv5.end");
  kv(6, "test.ints", 9).U32(5).Mark("kv6.count").U64(3).Pod<int32_t>(1).Pod<int32_t>(-2);
  g.Pod<int32_t>(3).Mark("kv6.end");
  struct Info {
    const char* name;
    std::vector<int64_t> ne;
    uint32_t type;
    uint64_t offset;
  };
  const Info infos[] = {{"a", {32, 2}, 0, 0}, {"b", {256}, 12, 256}, {"c", {64, 3}, 8, 416}};
  for (int j = 0; j < 3; ++j) {
    const std::string t = "ti" + std::to_string(j);
    g.Mark(t).Str(infos[j].name).Mark(t + ".n_dims").U32(static_cast<uint32_t>(infos[j].ne.size()));
    for (size_t d = 0; d < infos[j].ne.size(); ++d) {
      g.Mark(t + ".ne" + std::to_string(d)).I64(infos[j].ne[d]);
    }
    g.Mark(t + ".type")
        .U32(infos[j].type)
        .Mark(t + ".offset")
        .U64(infos[j].offset)
        .Mark(t + ".end");
  }
  g.PadTo(32).Mark("data");
  const size_t data_bytes = 416 + 204;
  for (size_t i = 0; i < data_bytes; ++i) {
    const bool padding = i >= 400 && i < 416;  // between b (ends at 400) and c
    g.U8(padding ? 0 : static_cast<uint8_t>(i & 255));
  }
  return g;
}

void AddEveryValueType(GgufWriter& w) {
  w.SetU8("t.u8", 255);
  w.SetI8("t.i8", -128);
  w.SetU16("t.u16", 65535);
  w.SetI16("t.i16", -32768);
  w.SetU32("t.u32", 4294967295u);
  w.SetI32("t.i32", std::numeric_limits<int32_t>::min());
  w.SetU64("t.u64", std::numeric_limits<uint64_t>::max());
  w.SetI64("t.i64", std::numeric_limits<int64_t>::min());
  w.SetF32("t.f32", -1.5e-38f);
  w.SetF64("t.f64", 1e300);
  w.SetBool("t.bool_true", true);
  w.SetBool("t.bool_false", false);
  w.SetString("t.string", std::string("h\xc3\xa9llo\0world\n", 13));
  w.SetString("t.empty_string", "");
  KTX_CHECK(w.SetIntArray("t.arr_u8", ValueType::kUint8, {0, 1, 255}).ok());
  KTX_CHECK(w.SetIntArray("t.arr_i8", ValueType::kInt8, {-128, 0, 127}).ok());
  KTX_CHECK(w.SetIntArray("t.arr_u16", ValueType::kUint16, {0, 65535}).ok());
  KTX_CHECK(w.SetIntArray("t.arr_i16", ValueType::kInt16, {-32768, 32767}).ok());
  KTX_CHECK(w.SetIntArray("t.arr_u32", ValueType::kUint32, {0, 4294967295}).ok());
  KTX_CHECK(
      w.SetIntArray("t.arr_i32", ValueType::kInt32, {std::numeric_limits<int32_t>::min(), 5}).ok());
  // u64 2^64 - 1 travels as its int64 bit pattern (-1).
  KTX_CHECK(w.SetIntArray("t.arr_u64", ValueType::kUint64, {0, -1, 42}).ok());
  KTX_CHECK(
      w.SetIntArray("t.arr_i64", ValueType::kInt64,
                    {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()})
          .ok());
  KTX_CHECK(w.SetFloatArray("t.arr_f32", ValueType::kFloat32,
                            {0.5, -2.0, std::numeric_limits<double>::infinity()})
                .ok());
  KTX_CHECK(w.SetFloatArray("t.arr_f64", ValueType::kFloat64, {1e-300, 0.1, -0.0}).ok());
  w.SetBoolArray("t.arr_bool", {true, false, true, true});
  w.SetStringArray("t.arr_string", {"", "a", std::string(1000, 'x'), "\xe2\x96\x81tok"});
  KTX_CHECK(w.SetIntArray("t.arr_empty", ValueType::kInt32, {}).ok());
  w.SetStringArray("t.arr_empty_strings", {});
}

std::vector<uint8_t> PatternBytes(size_t n, uint32_t seed) {
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>((i * 131 + seed) & 255);
  return b;
}

void AddAssortedTensors(GgufWriter& w) {
  using kernels::TensorType;
  struct T {
    const char* name;
    std::vector<int64_t> ne;
    TensorType type;
    size_t bytes;
  };
  const T tensors[] = {
      {"token_embd.weight", {64, 7}, TensorType::kF32, 64 * 7 * 4},
      {"blk.0.attn_norm.weight", {19}, TensorType::kF16, 19 * 2},
      {"blk.0.ffn_up.weight", {96, 5}, TensorType::kQ8_0, 3 * 34 * 5},
      {"blk.0.ffn_up_exps.weight", {256, 3, 2}, TensorType::kQ4_K, 144 * 3 * 2},
      {"blk.0.ffn_down_exps.weight", {512, 1, 1, 2}, TensorType::kQ2_K, 2 * 84 * 2},
      {"blk.1.ffn_gate.weight", {256, 2}, TensorType::kIQ4_XS, 136 * 2},
  };
  uint32_t seed = 1;
  for (const T& t : tensors) {
    KTX_CHECK(w.AddTensor(t.name, t.ne, t.type, PatternBytes(t.bytes, seed++)).ok());
  }
}

std::string FixturePath(const std::string& name) {
  return std::string(KTX_SOURCE_DIR) + "/tests/data/" + name;
}

std::vector<uint8_t> ReadFileBytes(const std::string& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  KTX_CHECK_MSG(in.good(), path.c_str());
  std::vector<uint8_t> out;
  char buf[1 << 16];
  while (out.size() < max_bytes && in) {
    in.read(buf, static_cast<std::streamsize>(std::min(sizeof(buf), max_bytes - out.size())));
    out.insert(out.end(), buf, buf + in.gcount());
  }
  return out;
}

std::string MakeTempDir() {
  const char* base = getenv("TEST_TMPDIR");
  std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/ktx_gguf_test_XXXXXX";
  KTX_CHECK(mkdtemp(tmpl.data()) != nullptr);
  return tmpl;
}

}  // namespace ktx::gguf::testing
