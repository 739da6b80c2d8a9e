// File: runtime/gguf/gguf.cc
//
// The GGUF reader: a bounds-checked cursor over a mapped (or in-memory) file,
// the parser of one file, and the assembly of split models. Nothing here reads
// tensor data; opening touches only the header pages.
#include "runtime/gguf/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/base/status.h"

namespace ktx::gguf {

static_assert(std::endian::native == std::endian::little,
              "the GGUF reader assumes a little-endian host");

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t kDefaultAlignment = 32;
constexpr size_t kMaxNameBytes = 63;  // ggml: names are shorter than GGML_MAX_NAME = 64
constexpr int kMaxDims = 4;
// Smallest encodings, used to bound counts by the bytes that remain.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;  // key length, type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes =
    8 + 4 + 8 + 4 + 8;  // name length, n_dims, ne[0], type, offset

bool IsKnownValueType(uint32_t id) { return id <= static_cast<uint32_t>(ValueType::kFloat64); }

// Bytes of one encoded element (the minimum for strings and arrays).
uint64_t EncodedSize(ValueType type) {
  switch (type) {
    case ValueType::kUint8:
    case ValueType::kInt8:
    case ValueType::kBool: return 1;
    case ValueType::kUint16:
    case ValueType::kInt16: return 2;
    case ValueType::kUint32:
    case ValueType::kInt32:
    case ValueType::kFloat32: return 4;
    case ValueType::kUint64:
    case ValueType::kInt64:
    case ValueType::kFloat64:
    case ValueType::kString: return 8;
    case ValueType::kArray: return 4 + 8;
  }
  return 1;
}

// Length of the valid UTF-8 sequence at s[i], or 0 when the bytes there are not one.
size_t Utf8Length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t c = b(i);
  size_t n = 0;
  uint32_t min = 0;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2, min = 0x80;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3, min = 0x800;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4, min = 0x10000;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  uint32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

// `s` for display: valid UTF-8 kept, quotes, backslashes, control and invalid
// bytes escaped C-style; cut after `max_bytes` input bytes.
std::string Escape(std::string_view s, size_t max_bytes) {
  std::string out;
  out.reserve(std::min(s.size(), max_bytes) + 2);
  size_t i = 0;
  while (i < s.size() && i < max_bytes) {
    const uint8_t c = static_cast<uint8_t>(s[i]);
    if (c >= 0x80) {
      if (const size_t n = Utf8Length(s, i); n > 0) {
        out.append(s.substr(i, n));
        i += n;
        continue;
      }
    }
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '"': out += "\\\""; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20 || c >= 0x7F) {
          out += absl::StrFormat("\\x%02x", c);
        } else {
          out += static_cast<char>(c);
        }
    }
    ++i;
  }
  if (i < s.size()) absl::StrAppend(&out, "... (", s.size(), " bytes)");
  return out;
}

// Quoted and cut to `max_bytes` for messages.
std::string Quote(std::string_view s, size_t max_bytes = 80) {
  return absl::StrCat("'", Escape(s, max_bytes), "'");
}

std::string ShapeOf(const std::vector<int64_t>& ne) {
  return absl::StrCat("{", absl::StrJoin(ne, ", "), "}");
}

// ---- reading primitives ----

class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t pos() const { return pos_; }
  size_t size() const { return size_; }
  uint64_t remaining() const { return size_ - pos_; }
  const uint8_t* here() const { return data_ + pos_; }
  void Skip(size_t n) { pos_ += n; }

  template <typename T>
  bool Read(T* out) {
    if (remaining() < sizeof(T)) return false;
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

using What = absl::FunctionRef<std::string()>;

// Everything parsed from one file.
struct ParsedFile {
  uint32_t version = 0;
  uint32_t alignment = kDefaultAlignment;
  uint64_t data_offset = 0;
  Metadata metadata;
  std::vector<TensorInfo> tensors;
};

class Parser {
 public:
  Parser(const uint8_t* data, size_t size, const std::string& name, const OpenOptions& options,
         int file_index)
      : cur_(data, size), data_(data), name_(name), options_(options), file_index_(file_index) {}

  absl::Status Parse(ParsedFile* out);

 private:
  template <typename... Args>
  absl::Status Error(const Args&... args) const {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": ", args...));
  }
  absl::Status Truncated(What what, uint64_t need) const {
    return Error(what(), ": truncated: needs ", need, " bytes at offset ", cur_.pos(), " but only ",
                 cur_.remaining(), " remain (file size ", cur_.size(), ")");
  }
  template <typename T>
  absl::Status ReadPod(T* out, What what) {
    if (!cur_.Read(out)) return Truncated(what, sizeof(T));
    return absl::OkStatus();
  }
  absl::Status ReadString(std::string* out, uint64_t max_bytes, What what);
  absl::Status ReadScalar(ValueType type, Value* out, What what);
  absl::Status ReadArray(std::string_view key, Value* out);
  absl::Status ReadTensorInfo(uint64_t index, TensorInfo* out);

  Cursor cur_;
  const uint8_t* data_;
  const std::string& name_;
  const OpenOptions& options_;
  int file_index_;
};

absl::Status Parser::ReadString(std::string* out, uint64_t max_bytes, What what) {
  uint64_t n = 0;
  KTX_RETURN_IF_ERROR(ReadPod(&n, [&] { return absl::StrCat(what(), ": string length"); }));
  if (n > cur_.remaining()) {
    return Error(what(), ": string length ", n, " exceeds the ", cur_.remaining(),
                 " bytes that remain (offset ", cur_.pos(), ", file size ", cur_.size(), ")");
  }
  if (n > max_bytes) {
    return Error(what(), ": string length ", n, " exceeds the limit of ", max_bytes, " bytes");
  }
  out->assign(reinterpret_cast<const char*>(cur_.here()), n);
  cur_.Skip(n);
  return absl::OkStatus();
}

absl::Status Parser::ReadScalar(ValueType type, Value* out, What what) {
  auto read = [&](auto v) -> absl::Status {
    KTX_RETURN_IF_ERROR(ReadPod(&v, what));
    *out = Value(type, v);
    return absl::OkStatus();
  };
  switch (type) {
    case ValueType::kUint8: return read(uint8_t{});
    case ValueType::kInt8: return read(int8_t{});
    case ValueType::kUint16: return read(uint16_t{});
    case ValueType::kInt16: return read(int16_t{});
    case ValueType::kUint32: return read(uint32_t{});
    case ValueType::kInt32: return read(int32_t{});
    case ValueType::kFloat32: return read(float{});
    case ValueType::kUint64: return read(uint64_t{});
    case ValueType::kInt64: return read(int64_t{});
    case ValueType::kFloat64: return read(double{});
    case ValueType::kBool: {
      uint8_t b = 0;
      KTX_RETURN_IF_ERROR(ReadPod(&b, what));
      if (b > 1) return Error(what(), ": bool must be 0 or 1, found ", int{b});
      *out = Value(type, b == 1);
      return absl::OkStatus();
    }
    case ValueType::kString: {
      std::string s;
      KTX_RETURN_IF_ERROR(ReadString(&s, options_.max_string_bytes, what));
      *out = Value(type, std::move(s));
      return absl::OkStatus();
    }
    case ValueType::kArray: break;
  }
  return Error(what(), ": internal: not a scalar type");
}

// Reads `n` little-endian integers of type T into `out` as int64 (u64 keeps its bits).
template <typename T>
void ReadInts(Cursor& cur, uint64_t n, std::vector<int64_t>* out) {
  out->resize(n);
  const uint8_t* p = cur.here();
  for (uint64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, p + i * sizeof(T), sizeof(T));
    (*out)[i] = static_cast<int64_t>(v);
  }
  cur.Skip(n * sizeof(T));
}

template <typename T>
void ReadFloats(Cursor& cur, uint64_t n, std::vector<double>* out) {
  out->resize(n);
  const uint8_t* p = cur.here();
  for (uint64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, p + i * sizeof(T), sizeof(T));
    (*out)[i] = static_cast<double>(v);
  }
  cur.Skip(n * sizeof(T));
}

absl::Status Parser::ReadArray(std::string_view key, Value* out) {
  auto what = [&] { return absl::StrCat("metadata key ", Quote(key), " (array)"); };
  uint32_t type_id = 0;
  uint64_t n = 0;
  KTX_RETURN_IF_ERROR(ReadPod(&type_id, what));
  if (!IsKnownValueType(type_id)) {
    return Error(what(), ": unknown element type id ", type_id, ", expected 0..12");
  }
  const ValueType elem = static_cast<ValueType>(type_id);
  if (elem == ValueType::kArray) return Error(what(), ": nested arrays are not supported");
  KTX_RETURN_IF_ERROR(ReadPod(&n, what));
  if (n > options_.max_array_elements) {
    return Error(what(), ": ", n, " elements exceed the limit of ", options_.max_array_elements);
  }
  const uint64_t elem_bytes = EncodedSize(elem);
  if (n > cur_.remaining() / elem_bytes) {
    return Error(what(), ": ", n, " elements of type ", ValueTypeName(elem), " need at least ",
                 elem_bytes, " bytes each but only ", cur_.remaining(), " bytes remain (offset ",
                 cur_.pos(), ", file size ", cur_.size(), ")");
  }
  switch (elem) {
    case ValueType::kUint8:
    case ValueType::kInt8:
    case ValueType::kUint16:
    case ValueType::kInt16:
    case ValueType::kUint32:
    case ValueType::kInt32:
    case ValueType::kUint64:
    case ValueType::kInt64: {
      std::vector<int64_t> v;
      switch (elem) {
        case ValueType::kUint8: ReadInts<uint8_t>(cur_, n, &v); break;
        case ValueType::kInt8: ReadInts<int8_t>(cur_, n, &v); break;
        case ValueType::kUint16: ReadInts<uint16_t>(cur_, n, &v); break;
        case ValueType::kInt16: ReadInts<int16_t>(cur_, n, &v); break;
        case ValueType::kUint32: ReadInts<uint32_t>(cur_, n, &v); break;
        case ValueType::kInt32: ReadInts<int32_t>(cur_, n, &v); break;
        case ValueType::kUint64: ReadInts<uint64_t>(cur_, n, &v); break;
        default: ReadInts<int64_t>(cur_, n, &v); break;
      }
      *out = Value(ValueType::kArray, std::move(v), elem);
      return absl::OkStatus();
    }
    case ValueType::kFloat32:
    case ValueType::kFloat64: {
      std::vector<double> v;
      if (elem == ValueType::kFloat32) {
        ReadFloats<float>(cur_, n, &v);
      } else {
        ReadFloats<double>(cur_, n, &v);
      }
      *out = Value(ValueType::kArray, std::move(v), elem);
      return absl::OkStatus();
    }
    case ValueType::kBool: {
      std::vector<bool> v(n);
      const uint8_t* p = cur_.here();
      for (uint64_t i = 0; i < n; ++i) {
        if (p[i] > 1) {
          return Error(what(), ": element ", i, ": bool must be 0 or 1, found ", int{p[i]});
        }
        v[i] = p[i] == 1;
      }
      cur_.Skip(n);
      *out = Value(ValueType::kArray, std::move(v), elem);
      return absl::OkStatus();
    }
    case ValueType::kString: {
      std::vector<std::string> v(n);
      for (uint64_t i = 0; i < n; ++i) {
        KTX_RETURN_IF_ERROR(ReadString(&v[i], options_.max_string_bytes, [&] {
          return absl::StrCat(what(), ": element ", i, " of ", n);
        }));
      }
      *out = Value(ValueType::kArray, std::move(v), elem);
      return absl::OkStatus();
    }
    case ValueType::kArray: break;
  }
  return Error(what(), ": internal: unhandled element type");
}

absl::Status Parser::ReadTensorInfo(uint64_t index, TensorInfo* t) {
  KTX_RETURN_IF_ERROR(ReadString(&t->name, std::numeric_limits<uint64_t>::max(),
                                 [&] { return absl::StrCat("tensor info ", index, ": name"); }));
  if (t->name.empty()) return Error("tensor info ", index, ": empty tensor name");
  if (t->name.size() > kMaxNameBytes) {
    return Error("tensor info ", index, ": name ", Quote(t->name), " is ", t->name.size(),
                 " bytes, expected at most ", kMaxNameBytes, " (names must be shorter than 64)");
  }
  auto what = [&] { return absl::StrCat("tensor ", Quote(t->name)); };
  uint32_t n_dims = 0;
  KTX_RETURN_IF_ERROR(ReadPod(&n_dims, what));
  if (n_dims < 1 || n_dims > kMaxDims) {
    return Error(what(), ": n_dims = ", n_dims, ", expected 1..", kMaxDims);
  }
  t->ne.resize(n_dims);
  for (uint32_t d = 0; d < n_dims; ++d) {
    KTX_RETURN_IF_ERROR(ReadPod(&t->ne[d], what));
    if (t->ne[d] <= 0) return Error(what(), ": ne[", d, "] = ", t->ne[d], ", expected > 0");
  }
  uint32_t type_id = 0;
  KTX_RETURN_IF_ERROR(ReadPod(&type_id, what));
  KTX_RETURN_IF_ERROR(ReadPod(&t->offset, what));
  const std::optional<kernels::TensorTypeTraits> traits = kernels::GetTensorTypeTraits(type_id);
  if (!traits) {
    return Error(what(), ": unknown tensor type id ", type_id,
                 " (not a ggml type; ktx computes with: ", kernels::SupportedTensorTypeNames(),
                 ")");
  }
  t->type = traits->type;
  if (t->ne[0] % traits->block_size != 0) {
    return Error(what(), " of type ", traits->name, ": ne[0] = ", t->ne[0],
                 " is not a multiple of the block size ", traits->block_size);
  }
  int64_t n_elements = 1;
  for (int64_t ne : t->ne) {
    if (__builtin_mul_overflow(n_elements, ne, &n_elements)) {
      return Error(what(), ": shape ", ShapeOf(t->ne), " has more than 2^63 elements");
    }
  }
  // n_bytes = ne[0] / block * type_size * ne[1] * ... (fits: checked step by step).
  uint64_t n_bytes = static_cast<uint64_t>(t->ne[0] / traits->block_size);
  bool overflow =
      __builtin_mul_overflow(n_bytes, static_cast<uint64_t>(traits->type_size), &n_bytes);
  for (size_t d = 1; d < t->ne.size() && !overflow; ++d) {
    overflow = __builtin_mul_overflow(n_bytes, static_cast<uint64_t>(t->ne[d]), &n_bytes);
  }
  if (overflow || n_bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return Error(what(), " of type ", traits->name, ": shape ", ShapeOf(t->ne),
                 " needs more than 2^63 bytes");
  }
  t->n_bytes = n_bytes;
  t->file_index = file_index_;
  return absl::OkStatus();
}

absl::Status Parser::Parse(ParsedFile* out) {
  auto header = [] { return std::string("header"); };
  if (cur_.size() < 4) {
    return Error("not a GGUF file: ", cur_.size(),
                 " bytes, expected at least the 4-byte magic 'GGUF'");
  }
  uint32_t magic = 0;
  KTX_RETURN_IF_ERROR(ReadPod(&magic, header));
  if (magic != kMagic) {
    return Error("not a GGUF file: expected magic 'GGUF', found ",
                 Quote(std::string_view(reinterpret_cast<const char*>(data_), 4)));
  }
  KTX_RETURN_IF_ERROR(ReadPod(&out->version, [] { return std::string("header: version"); }));
  if (out->version != 2 && out->version != 3) {
    if (out->version == 1) {
      return Error("GGUF version 1 is not supported (it uses 32-bit counts), expected 2 or 3");
    }
    const uint32_t swapped = __builtin_bswap32(out->version);
    return Error("unsupported GGUF version ", out->version, ", expected 2 or 3",
                 (swapped == 2 || swapped == 3) ? " (a big-endian file?)" : "");
  }
  uint64_t n_tensors = 0;
  uint64_t n_kv = 0;
  KTX_RETURN_IF_ERROR(ReadPod(&n_tensors, [] { return std::string("header: tensor count"); }));
  KTX_RETURN_IF_ERROR(ReadPod(&n_kv, [] { return std::string("header: metadata count"); }));
  if (n_tensors > options_.max_tensors) {
    return Error("header: tensor count ", n_tensors, " exceeds the limit of ",
                 options_.max_tensors);
  }
  if (n_kv > options_.max_kv) {
    return Error("header: metadata count ", n_kv, " exceeds the limit of ", options_.max_kv);
  }
  // Both counts must fit what remains (n_* <= 2^20 here, so no overflow).
  if (n_kv * kMinKvBytes + n_tensors * kMinTensorInfoBytes > cur_.remaining()) {
    return Error("header: ", n_kv, " metadata entries and ", n_tensors,
                 " tensor infos need at least ",
                 n_kv * kMinKvBytes + n_tensors * kMinTensorInfoBytes, " bytes but only ",
                 cur_.remaining(), " remain (file size ", cur_.size(), ")");
  }

  // ---- metadata ----
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    KTX_RETURN_IF_ERROR(ReadString(&key, options_.max_string_bytes,
                                   [&] { return absl::StrCat("key of metadata entry ", i); }));
    auto what = [&] { return absl::StrCat("metadata key ", Quote(key)); };
    uint32_t type_id = 0;
    KTX_RETURN_IF_ERROR(ReadPod(&type_id, what));
    if (!IsKnownValueType(type_id)) {
      return Error(what(), ": unknown value type id ", type_id, ", expected 0..12");
    }
    Value value;
    const ValueType type = static_cast<ValueType>(type_id);
    if (type == ValueType::kArray) {
      KTX_RETURN_IF_ERROR(ReadArray(key, &value));
    } else {
      KTX_RETURN_IF_ERROR(ReadScalar(type, &value, what));
    }
    if (out->metadata.Has(key)) return Error("duplicate metadata key ", Quote(key));
    out->metadata.Set(std::move(key), std::move(value));
  }
  out->metadata.set_source(name_);
  if (const Value* a = out->metadata.Find("general.alignment"); a != nullptr) {
    absl::StatusOr<uint32_t> alignment = out->metadata.GetU32("general.alignment");
    if (!alignment.ok()) return alignment.status();
    if (*alignment == 0 || !std::has_single_bit(*alignment)) {
      return Error("metadata key 'general.alignment': expected a power of two, found ", *alignment);
    }
    out->alignment = *alignment;
  }

  // ---- tensor infos ----
  if (n_tensors * kMinTensorInfoBytes > cur_.remaining()) {
    return Error("header: ", n_tensors, " tensor infos need at least ",
                 n_tensors * kMinTensorInfoBytes, " bytes but only ", cur_.remaining(),
                 " remain after the metadata (offset ", cur_.pos(), ", file size ", cur_.size(),
                 ")");
  }
  out->tensors.resize(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    KTX_RETURN_IF_ERROR(ReadTensorInfo(i, &out->tensors[i]));
  }

  // ---- data section ----
  const uint64_t header_end = cur_.pos();
  const uint64_t data_offset = (header_end + out->alignment - 1) / out->alignment * out->alignment;
  out->data_offset = data_offset;
  const uint64_t file_size = cur_.size();
  for (TensorInfo& t : out->tensors) {
    if (t.offset % out->alignment != 0) {
      return Error("tensor ", Quote(t.name), ": data offset ", t.offset,
                   " is not a multiple of the alignment ", out->alignment);
    }
    uint64_t begin = 0;
    uint64_t end = 0;
    if (__builtin_add_overflow(data_offset, t.offset, &begin) ||
        __builtin_add_overflow(begin, t.n_bytes, &end) || end > file_size) {
      return Error("tensor ", Quote(t.name), ": data at offset ", t.offset, " (", t.n_bytes,
                   " bytes, type ", kernels::TraitsOf(t.type).name, ", shape ", ShapeOf(t.ne),
                   ") ends past the end of the file: data section starts at ", data_offset,
                   ", file size ", file_size);
    }
    t.file_offset = begin;
    t.data = data_ + begin;
  }
  // No two tensors overlap: sort by offset and compare neighbours.
  std::vector<const TensorInfo*> by_offset(out->tensors.size());
  for (size_t i = 0; i < by_offset.size(); ++i) by_offset[i] = &out->tensors[i];
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& a = *by_offset[i - 1];
    const TensorInfo& b = *by_offset[i];
    if (b.offset < a.offset + a.n_bytes) {
      return Error("tensors ", Quote(a.name), " (data [", a.offset, ", ", a.offset + a.n_bytes,
                   ")) and ", Quote(b.name), " (data [", b.offset, ", ", b.offset + b.n_bytes,
                   ")) overlap");
    }
  }
  return absl::OkStatus();
}

std::string DescribeFound(const Value& v) {
  return absl::StrCat(v.TypeString(), " ", v.ToString(4));
}

absl::Status TypeError(const Metadata& m, std::string_view key, const std::string& expected,
                       const Value& found) {
  return absl::InvalidArgumentError(absl::StrCat(m.source(), m.source().empty() ? "" : ": ",
                                                 "metadata key ", Quote(key), ": expected ",
                                                 expected, ", found ", DescribeFound(found)));
}

absl::StatusOr<const Value*> FindOrNotFound(const Metadata& m, std::string_view key) {
  const Value* v = m.Find(key);
  if (v == nullptr) {
    return absl::NotFoundError(absl::StrCat(m.source(), m.source().empty() ? "" : ": ",
                                            "metadata key ", Quote(key), " is missing"));
  }
  return v;
}

template <typename Out>
absl::StatusOr<Out> GetInteger(const Metadata& m, std::string_view key, const char* expected) {
  KTX_ASSIGN_OR_RETURN(const Value* v, FindOrNotFound(m, key));
  return std::visit(
      [&](const auto& x) -> absl::StatusOr<Out> {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
          if (std::in_range<Out>(x)) return static_cast<Out>(x);
          return TypeError(m, key, absl::StrCat(expected, " (value out of range)"), *v);
        } else {
          return TypeError(m, key, expected, *v);
        }
      },
      v->storage());
}

// ---- memory mapping ----

std::string ErrnoText(int err) { return std::strerror(err); }

}  // namespace

// ---- ValueType, Value ----

const char* ValueTypeName(ValueType type) {
  switch (type) {
    case ValueType::kUint8: return "u8";
    case ValueType::kInt8: return "i8";
    case ValueType::kUint16: return "u16";
    case ValueType::kInt16: return "i16";
    case ValueType::kUint32: return "u32";
    case ValueType::kInt32: return "i32";
    case ValueType::kFloat32: return "f32";
    case ValueType::kBool: return "bool";
    case ValueType::kString: return "string";
    case ValueType::kArray: return "array";
    case ValueType::kUint64: return "u64";
    case ValueType::kInt64: return "i64";
    case ValueType::kFloat64: return "f64";
  }
  return "unknown";
}

size_t Value::array_size() const {
  if (!is_array()) return 0;
  return std::visit(
      [](const auto& x) -> size_t {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::vector<int64_t>> ||
                      std::is_same_v<T, std::vector<double>> ||
                      std::is_same_v<T, std::vector<bool>> ||
                      std::is_same_v<T, std::vector<std::string>>) {
          return x.size();
        } else {
          return 0;
        }
      },
      storage_);
}

std::string Value::TypeString() const {
  if (!is_array()) return ValueTypeName(type_);
  return absl::StrCat("array[", ValueTypeName(array_type_), "]");
}

namespace {

std::string FormatDouble(double d) { return absl::StrFormat("%.9g", d); }

std::string FormatElement(const Value& v, int64_t x) {
  if (v.array_type() == ValueType::kUint64) return absl::StrCat(static_cast<uint64_t>(x));
  return absl::StrCat(x);
}

}  // namespace

std::string Value::ToString(size_t max_items) const {
  return std::visit(
      [&](const auto& x) -> std::string {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::string>) {
          return absl::StrCat("\"", Escape(x, SIZE_MAX), "\"");
        } else if constexpr (std::is_same_v<T, bool>) {
          return x ? "true" : "false";
        } else if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
          return FormatDouble(x);
        } else if constexpr (std::is_same_v<T, uint8_t> || std::is_same_v<T, int8_t>) {
          return absl::StrCat(static_cast<int>(x));
        } else if constexpr (std::is_integral_v<T>) {
          return absl::StrCat(x);
        } else {
          std::string out = "[";
          const size_t n = std::min(max_items, x.size());
          for (size_t i = 0; i < n; ++i) {
            if (i > 0) out += ", ";
            if constexpr (std::is_same_v<T, std::vector<std::string>>) {
              absl::StrAppend(&out, "\"", Escape(x[i], SIZE_MAX), "\"");
            } else if constexpr (std::is_same_v<T, std::vector<bool>>) {
              out += x[i] ? "true" : "false";
            } else if constexpr (std::is_same_v<T, std::vector<double>>) {
              out += FormatDouble(x[i]);
            } else {
              out += FormatElement(*this, x[i]);
            }
          }
          if (n < x.size()) out += n > 0 ? ", ..." : "...";
          out += "]";
          return out;
        }
      },
      storage_);
}

absl::Status Value::CheckConsistent() const {
  auto mismatch = [&] {
    return absl::InvalidArgumentError(absl::StrCat("value of type ", TypeString(),
                                                   " holds storage alternative ", storage_.index(),
                                                   " of Value::Storage"));
  };
  const size_t index = storage_.index();
  // Storage alternatives 0..11 follow ValueType order with kArray (9) replaced by u64/i64/f64.
  switch (type_) {
    case ValueType::kUint8: return index == 0 ? absl::OkStatus() : mismatch();
    case ValueType::kInt8: return index == 1 ? absl::OkStatus() : mismatch();
    case ValueType::kUint16: return index == 2 ? absl::OkStatus() : mismatch();
    case ValueType::kInt16: return index == 3 ? absl::OkStatus() : mismatch();
    case ValueType::kUint32: return index == 4 ? absl::OkStatus() : mismatch();
    case ValueType::kInt32: return index == 5 ? absl::OkStatus() : mismatch();
    case ValueType::kFloat32: return index == 6 ? absl::OkStatus() : mismatch();
    case ValueType::kBool: return index == 7 ? absl::OkStatus() : mismatch();
    case ValueType::kString: return index == 8 ? absl::OkStatus() : mismatch();
    case ValueType::kUint64: return index == 9 ? absl::OkStatus() : mismatch();
    case ValueType::kInt64: return index == 10 ? absl::OkStatus() : mismatch();
    case ValueType::kFloat64: return index == 11 ? absl::OkStatus() : mismatch();
    case ValueType::kArray: break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("unknown value type id ", static_cast<uint32_t>(type_)));
  }
  switch (array_type_) {
    case ValueType::kFloat32:
    case ValueType::kFloat64:
      return std::holds_alternative<std::vector<double>>(storage_) ? absl::OkStatus() : mismatch();
    case ValueType::kBool:
      return std::holds_alternative<std::vector<bool>>(storage_) ? absl::OkStatus() : mismatch();
    case ValueType::kString:
      return std::holds_alternative<std::vector<std::string>>(storage_) ? absl::OkStatus()
                                                                        : mismatch();
    case ValueType::kUint8:
    case ValueType::kInt8:
    case ValueType::kUint16:
    case ValueType::kInt16:
    case ValueType::kUint32:
    case ValueType::kInt32:
    case ValueType::kUint64:
    case ValueType::kInt64: {
      const auto* v = std::get_if<std::vector<int64_t>>(&storage_);
      if (v == nullptr) return mismatch();
      int64_t lo = 0;
      int64_t hi = 0;
      switch (array_type_) {
        case ValueType::kUint8: hi = UINT8_MAX; break;
        case ValueType::kInt8: lo = INT8_MIN, hi = INT8_MAX; break;
        case ValueType::kUint16: hi = UINT16_MAX; break;
        case ValueType::kInt16: lo = INT16_MIN, hi = INT16_MAX; break;
        case ValueType::kUint32: hi = UINT32_MAX; break;
        case ValueType::kInt32: lo = INT32_MIN, hi = INT32_MAX; break;
        default:  // 64-bit: every int64 (u64 keeps its bit pattern)
          return absl::OkStatus();
      }
      for (size_t i = 0; i < v->size(); ++i) {
        if ((*v)[i] < lo || (*v)[i] > hi) {
          return absl::InvalidArgumentError(absl::StrCat("element ", i, " = ", (*v)[i],
                                                         " does not fit the element type ",
                                                         ValueTypeName(array_type_)));
        }
      }
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("array element type ", ValueTypeName(array_type_), " (id ",
                       static_cast<uint32_t>(array_type_), ") is not allowed"));
  }
}

// ---- Metadata ----

bool Metadata::Has(std::string_view key) const { return entries_.find(key) != entries_.end(); }

const Value* Metadata::Find(std::string_view key) const {
  auto it = entries_.find(key);
  return it == entries_.end() ? nullptr : &it->second;
}

void Metadata::Set(std::string key, Value value) { entries_[std::move(key)] = std::move(value); }

absl::StatusOr<uint32_t> Metadata::GetU32(std::string_view key) const {
  return GetInteger<uint32_t>(*this, key, "an integer in [0, 2^32)");
}

absl::StatusOr<int64_t> Metadata::GetI64(std::string_view key) const {
  return GetInteger<int64_t>(*this, key, "an integer in [-2^63, 2^63)");
}

absl::StatusOr<float> Metadata::GetF32(std::string_view key) const {
  KTX_ASSIGN_OR_RETURN(const Value* v, FindOrNotFound(*this, key));
  if (const float* f = std::get_if<float>(&v->storage())) return *f;
  if (const double* d = std::get_if<double>(&v->storage())) {
    if (std::isfinite(*d) && std::fabs(*d) > std::numeric_limits<float>::max()) {
      return TypeError(*this, key, "a float (f64 value out of f32 range)", *v);
    }
    return static_cast<float>(*d);
  }
  return TypeError(*this, key, "a float (f32 or f64)", *v);
}

absl::StatusOr<bool> Metadata::GetBool(std::string_view key) const {
  KTX_ASSIGN_OR_RETURN(const Value* v, FindOrNotFound(*this, key));
  if (const bool* b = std::get_if<bool>(&v->storage())) return *b;
  return TypeError(*this, key, "a bool", *v);
}

absl::StatusOr<std::string> Metadata::GetString(std::string_view key) const {
  KTX_ASSIGN_OR_RETURN(const Value* v, FindOrNotFound(*this, key));
  if (const std::string* s = std::get_if<std::string>(&v->storage())) return *s;
  return TypeError(*this, key, "a string", *v);
}

absl::StatusOr<std::vector<std::string>> Metadata::GetStringArray(std::string_view key) const {
  KTX_ASSIGN_OR_RETURN(const Value* v, FindOrNotFound(*this, key));
  if (const auto* a = std::get_if<std::vector<std::string>>(&v->storage())) return *a;
  return TypeError(*this, key, "an array of strings", *v);
}

absl::StatusOr<std::vector<int64_t>> Metadata::GetIntArray(std::string_view key) const {
  KTX_ASSIGN_OR_RETURN(const Value* v, FindOrNotFound(*this, key));
  const auto* a = std::get_if<std::vector<int64_t>>(&v->storage());
  if (a == nullptr) return TypeError(*this, key, "an array of integers", *v);
  if (v->array_type() == ValueType::kUint64) {
    for (size_t i = 0; i < a->size(); ++i) {
      if ((*a)[i] < 0) {
        return TypeError(*this, key,
                         absl::StrCat("an array of integers below 2^63 (element ", i, " is ",
                                      static_cast<uint64_t>((*a)[i]), ")"),
                         *v);
      }
    }
  }
  return *a;
}

absl::StatusOr<std::vector<double>> Metadata::GetFloatArray(std::string_view key) const {
  KTX_ASSIGN_OR_RETURN(const Value* v, FindOrNotFound(*this, key));
  if (const auto* a = std::get_if<std::vector<double>>(&v->storage())) return *a;
  return TypeError(*this, key, "an array of floats", *v);
}

absl::StatusOr<uint32_t> Metadata::GetU32Or(std::string_view key, uint32_t fallback) const {
  if (!Has(key)) return fallback;
  return GetU32(key);
}

absl::StatusOr<float> Metadata::GetF32Or(std::string_view key, float fallback) const {
  if (!Has(key)) return fallback;
  return GetF32(key);
}

absl::StatusOr<bool> Metadata::GetBoolOr(std::string_view key, bool fallback) const {
  if (!Has(key)) return fallback;
  return GetBool(key);
}

absl::StatusOr<std::string> Metadata::GetStringOr(std::string_view key,
                                                  std::string fallback) const {
  if (!Has(key)) return fallback;
  return GetString(key);
}

// ---- TensorInfo ----

int64_t TensorInfo::n_elements() const {
  int64_t n = 1;
  for (int64_t x : ne) n *= x;
  return n;
}

int64_t TensorInfo::row_bytes() const {
  return ne.empty() ? 0 : kernels::RowBytes(kernels::TraitsOf(type), ne[0]);
}

int64_t TensorInfo::n_rows() const { return ne.empty() ? 0 : n_elements() / ne[0]; }

std::string TensorInfo::ShapeString() const { return ShapeOf(ne); }

// ---- split paths ----

std::string SplitPath(std::string_view prefix, int index, int n_parts) {
  return absl::StrFormat("%s-%05d-of-%05d.gguf", prefix, index + 1, n_parts);
}

bool ParseSplitPath(std::string_view path, std::string* prefix, int* index, int* n_parts) {
  // PREFIX-DDDDD-of-DDDDD.gguf
  constexpr std::string_view kSuffix = ".gguf";
  constexpr size_t kTail = 1 + 5 + 4 + 5 + 5;  // "-00001-of-00003.gguf"
  if (path.size() <= kTail) return false;
  const std::string_view tail = path.substr(path.size() - kTail);
  if (tail[0] != '-' || tail.substr(6, 4) != "-of-" || tail.substr(15) != kSuffix) return false;
  auto digits = [](std::string_view s, int* out) {
    int v = 0;
    for (char c : s) {
      if (c < '0' || c > '9') return false;
      v = v * 10 + (c - '0');
    }
    *out = v;
    return true;
  };
  int no = 0;
  int count = 0;
  if (!digits(tail.substr(1, 5), &no) || !digits(tail.substr(10, 5), &count)) return false;
  if (no < 1 || count < 1 || no > count) return false;
  *prefix = std::string(path.substr(0, path.size() - kTail));
  *index = no - 1;
  *n_parts = count;
  return true;
}

// ---- GgufFile ----

struct GgufFile::Mapping {
  const uint8_t* data = nullptr;
  size_t size = 0;
  bool owned = false;  // munmap on destruction
  ~Mapping() {
    if (owned && data != nullptr) munmap(const_cast<uint8_t*>(data), size);
  }
};

GgufFile::~GgufFile() = default;

namespace {}  // namespace

absl::StatusOr<std::unique_ptr<GgufFile::Mapping>> GgufFile::MapFile(const std::string& path,
                                                                     bool populate) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string msg = absl::StrCat(path, ": cannot open: ", ErrnoText(err));
    if (err == ENOENT) return absl::NotFoundError(msg);
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
    return absl::InvalidArgumentError(msg);
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat failed: ", ErrnoText(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  if (st.st_size == 0) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a GGUF file: the file is empty"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* addr = mmap(nullptr, size, PROT_READ, MAP_PRIVATE | (populate ? MAP_POPULATE : 0), fd, 0);
  const int err = errno;
  close(fd);
  if (addr == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat(path, ": mmap of ", size, " bytes failed: ", ErrnoText(err)));
  }
  auto m = std::make_unique<GgufFile::Mapping>();
  m->data = static_cast<const uint8_t*>(addr);
  m->size = size;
  m->owned = true;
  return m;
}

namespace {

absl::Status ParseInto(const uint8_t* data, size_t size, const std::string& name,
                       const OpenOptions& options, int file_index, ParsedFile* out) {
  Parser parser(data, size, name, options, file_index);
  return parser.Parse(out);
}

}  // namespace

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromMemory(const uint8_t* bytes, size_t size,
                                                               std::string name,
                                                               const OpenOptions& options) {
  ParsedFile parsed;
  KTX_RETURN_IF_ERROR(ParseInto(bytes, size, name, options, 0, &parsed));
  std::unique_ptr<GgufFile> file(new GgufFile());
  auto mapping = std::make_unique<Mapping>();
  mapping->data = bytes;
  mapping->size = size;
  file->mappings_.push_back(std::move(mapping));
  file->paths_.push_back(std::move(name));
  file->version_ = parsed.version;
  file->alignment_ = parsed.alignment;
  file->metadata_ = std::move(parsed.metadata);
  file->tensors_ = std::move(parsed.tensors);
  file->data_offsets_.push_back(parsed.data_offset);
  KTX_RETURN_IF_ERROR(file->BuildIndex());
  return file;
}

absl::Status GgufFile::BuildIndex() {
  tensor_index_.clear();
  for (size_t i = 0; i < tensors_.size(); ++i) {
    auto [it, inserted] = tensor_index_.emplace(tensors_[i].name, i);
    if (!inserted) {
      const TensorInfo& first = tensors_[it->second];
      return absl::InvalidArgumentError(
          absl::StrCat(paths_[tensors_[i].file_index], ": duplicate tensor name ",
                       Quote(tensors_[i].name), " (first seen in ", paths_[first.file_index], ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path,
                                                         const OpenOptions& options) {
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<Mapping> first, MapFile(path, options.populate));
  ParsedFile parsed;
  KTX_RETURN_IF_ERROR(ParseInto(first->data, first->size, path, options, 0, &parsed));

  const Metadata& meta = parsed.metadata;
  KTX_ASSIGN_OR_RETURN(const uint32_t n_parts, meta.GetU32Or("split.count", 1));
  KTX_ASSIGN_OR_RETURN(const uint32_t split_no, meta.GetU32Or("split.no", 0));
  std::string prefix;
  int name_index = 0;
  int name_count = 0;
  const bool split_name = ParseSplitPath(path, &prefix, &name_index, &name_count);
  if (n_parts == 0 || n_parts > 99999) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": metadata key 'split.count': expected 1..99999, found ", n_parts));
  }
  if (split_no != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": this is part ", split_no + 1, " of ", n_parts,
        " of a split model (split.no = ", split_no, "); open the first part",
        split_name ? absl::StrCat(" '", SplitPath(prefix, 0, n_parts), "'") : std::string()));
  }
  if (n_parts > 1 && split_name && name_index != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the file name says part ", name_index + 1, " but split.no = 0"));
  }
  if (n_parts > 1 && !split_name) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": split.count = ", n_parts,
        " but the file name does not follow the split pattern NAME-00001-of-",
        absl::StrFormat("%05d", n_parts), ".gguf, so the other parts cannot be found"));
  }
  if (split_name && static_cast<uint32_t>(name_count) != n_parts &&
      (n_parts > 1 || meta.Has("split.count"))) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": the file name says ", name_count,
                                                   " parts but split.count = ", n_parts));
  }

  std::unique_ptr<GgufFile> file(new GgufFile());
  file->paths_.push_back(path);
  file->version_ = parsed.version;
  file->alignment_ = parsed.alignment;
  file->metadata_ = std::move(parsed.metadata);
  file->tensors_ = std::move(parsed.tensors);
  file->data_offsets_.push_back(parsed.data_offset);
  file->mappings_.push_back(std::move(first));

  for (uint32_t i = 1; i < n_parts; ++i) {
    const std::string part_path = SplitPath(prefix, static_cast<int>(i), static_cast<int>(n_parts));
    absl::StatusOr<std::unique_ptr<Mapping>> m = MapFile(part_path, options.populate);
    if (!m.ok()) {
      return absl::Status(m.status().code(),
                          absl::StrCat(path, ": part ", i + 1, " of ", n_parts, " '", part_path,
                                       "' is missing or unreadable: ", m.status().message()));
    }
    ParsedFile part;
    KTX_RETURN_IF_ERROR(
        ParseInto((*m)->data, (*m)->size, part_path, options, static_cast<int>(i), &part));
    KTX_ASSIGN_OR_RETURN(const uint32_t part_no, part.metadata.GetU32("split.no"));
    KTX_ASSIGN_OR_RETURN(const uint32_t part_count, part.metadata.GetU32("split.count"));
    if (part_no != i || part_count != n_parts) {
      return absl::InvalidArgumentError(absl::StrCat(part_path, ": expected split.no = ", i,
                                                     " and split.count = ", n_parts, ", found ",
                                                     part_no, " and ", part_count));
    }
    file->paths_.push_back(part_path);
    file->data_offsets_.push_back(part.data_offset);
    file->mappings_.push_back(std::move(*m));
    for (TensorInfo& t : part.tensors) file->tensors_.push_back(std::move(t));
  }
  if (const Value* v = file->metadata_.Find("split.tensors.count"); v != nullptr) {
    KTX_ASSIGN_OR_RETURN(const int64_t expected, file->metadata_.GetI64("split.tensors.count"));
    if (expected != static_cast<int64_t>(file->tensors_.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": metadata key 'split.tensors.count' = ", expected, " but the ",
                       n_parts, " part(s) hold ", file->tensors_.size(), " tensors"));
    }
  }
  KTX_RETURN_IF_ERROR(file->BuildIndex());
  return file;
}

uint64_t GgufFile::total_tensor_bytes() const {
  uint64_t total = 0;
  for (const TensorInfo& t : tensors_) total += t.n_bytes;
  return total;
}

const TensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<const TensorInfo*> GgufFile::GetTensor(std::string_view name,
                                                      const std::vector<int64_t>& ne) const {
  const TensorInfo* t = FindTensor(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(paths_.empty() ? "" : paths_[0], ": tensor ",
                                            Quote(name), " is missing (expected shape ",
                                            ShapeOf(ne), ")"));
  }
  auto trimmed = [](std::vector<int64_t> v) {
    while (!v.empty() && v.back() == 1) v.pop_back();
    return v;
  };
  if (trimmed(t->ne) != trimmed(ne)) {
    return absl::InvalidArgumentError(absl::StrCat(paths_[t->file_index], ": tensor ", Quote(name),
                                                   " has shape ", t->ShapeString(), ", expected ",
                                                   ShapeOf(ne)));
  }
  return t;
}

}  // namespace ktx::gguf
