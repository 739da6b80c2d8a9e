// File: runtime/gguf/gguf_writer.cc
//
// GgufWriter: serializes the header in memory (metadata + tensor infos are
// small), then streams tensor data to a sink (a file or a byte vector).
#include "runtime/gguf/gguf_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/base/status.h"

namespace ktx::gguf {
namespace {

// Debian's Abseil has its own string_view type (ABSL_OPTION_USE_STD_STRING_VIEW 0).
absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr uint32_t kMagic = 0x46554747;  // "GGUF"
constexpr uint32_t kVersion = 3;
constexpr uint32_t kDefaultAlignment = 32;
constexpr size_t kMaxNameBytes = 63;

std::string Quote(std::string_view s) {
  return absl::StrCat("'", absl::CHexEscape(AbslView(s)), "'");
}

absl::Status WriterError(const std::string& what, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("GgufWriter: ", what, ": ", message));
}

uint64_t AlignUp(uint64_t x, uint64_t alignment) {
  return (x + alignment - 1) / alignment * alignment;
}

// Little-endian header serialization.
class Bytes {
 public:
  template <typename T>
  void Pod(T v) {
    const size_t at = buf_.size();
    buf_.resize(at + sizeof(T));
    std::memcpy(buf_.data() + at, &v, sizeof(T));
  }
  void String(std::string_view s) {
    Pod<uint64_t>(s.size());
    buf_.insert(buf_.end(), s.begin(), s.end());
  }
  void PadTo(uint64_t alignment) { buf_.resize(AlignUp(buf_.size(), alignment), 0); }
  const std::vector<uint8_t>& data() const { return buf_; }

 private:
  std::vector<uint8_t> buf_;
};

void IntElement(Bytes& b, ValueType type, int64_t v) {
  switch (type) {
    case ValueType::kUint8: return b.Pod(static_cast<uint8_t>(v));
    case ValueType::kInt8: return b.Pod(static_cast<int8_t>(v));
    case ValueType::kUint16: return b.Pod(static_cast<uint16_t>(v));
    case ValueType::kInt16: return b.Pod(static_cast<int16_t>(v));
    case ValueType::kUint32: return b.Pod(static_cast<uint32_t>(v));
    case ValueType::kInt32: return b.Pod(static_cast<int32_t>(v));
    case ValueType::kUint64: return b.Pod(static_cast<uint64_t>(v));
    default: return b.Pod(v);
  }
}

// Appends type id and value; `value` is consistent (checked when it was set).
void EncodeValue(Bytes& b, const Value& value) {
  b.Pod(static_cast<uint32_t>(value.type()));
  std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::string>) {
          b.String(x);
        } else if constexpr (std::is_same_v<T, bool>) {
          b.Pod(static_cast<uint8_t>(x ? 1 : 0));
        } else if constexpr (std::is_arithmetic_v<T>) {
          b.Pod(x);
        } else {
          b.Pod(static_cast<uint32_t>(value.array_type()));
          b.Pod(static_cast<uint64_t>(x.size()));
          for (size_t i = 0; i < x.size(); ++i) {
            if constexpr (std::is_same_v<T, std::vector<std::string>>) {
              b.String(x[i]);
            } else if constexpr (std::is_same_v<T, std::vector<bool>>) {
              b.Pod(static_cast<uint8_t>(x[i] ? 1 : 0));
            } else if constexpr (std::is_same_v<T, std::vector<double>>) {
              if (value.array_type() == ValueType::kFloat32) {
                b.Pod(static_cast<float>(x[i]));
              } else {
                b.Pod(x[i]);
              }
            } else {
              IntElement(b, value.array_type(), x[i]);
            }
          }
        }
      },
      value.storage());
}

const uint8_t kZeros[4096] = {};

}  // namespace

namespace {

// Writes to "<path>.tmp"; Commit renames it to `path`; destruction without
// Commit removes it.
class FileSink {
 public:
  static absl::StatusOr<std::unique_ptr<FileSink>> Create(const std::string& path) {
    const std::string tmp = path + ".tmp";
    const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
      return absl::PermissionDeniedError(
          absl::StrCat(tmp, ": cannot create: ", std::strerror(errno)));
    }
    return std::unique_ptr<FileSink>(new FileSink(path, tmp, fd));
  }
  ~FileSink() {
    if (fd_ >= 0) close(fd_);
    if (!committed_) unlink(tmp_.c_str());
  }
  absl::Status Append(const uint8_t* data, size_t n) {
    while (n > 0) {
      const ssize_t k = ::write(fd_, data, std::min<size_t>(n, size_t{1} << 30));
      if (k < 0) {
        if (errno == EINTR) continue;
        return absl::ResourceExhaustedError(
            absl::StrCat(tmp_, ": write failed at byte ", written_, ": ", std::strerror(errno)));
      }
      data += k;
      n -= static_cast<size_t>(k);
      written_ += static_cast<uint64_t>(k);
    }
    return absl::OkStatus();
  }
  absl::Status Commit() {
    const int fd = fd_;
    fd_ = -1;
    if (close(fd) != 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat(tmp_, ": close failed: ", std::strerror(errno)));
    }
    if (rename(tmp_.c_str(), path_.c_str()) != 0) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot rename ", tmp_, " to ", path_, ": ", std::strerror(errno)));
    }
    committed_ = true;
    return absl::OkStatus();
  }

 private:
  FileSink(std::string path, std::string tmp, int fd)
      : path_(std::move(path)), tmp_(std::move(tmp)), fd_(fd) {}
  std::string path_;
  std::string tmp_;
  int fd_;
  uint64_t written_ = 0;
  bool committed_ = false;
};

}  // namespace

// ---- metadata ----

void GgufWriter::Put(std::string key, Value value) {
  auto it = kv_index_.find(key);
  if (it != kv_index_.end()) {
    kv_[it->second].second = std::move(value);
    return;
  }
  kv_index_.emplace(key, kv_.size());
  kv_.emplace_back(std::move(key), std::move(value));
}

absl::Status GgufWriter::Set(std::string key, Value value) {
  if (absl::Status s = value.CheckConsistent(); !s.ok()) {
    return WriterError(absl::StrCat("metadata key ", Quote(key)), s.message());
  }
  if (key == "general.alignment") {
    const uint32_t* a = std::get_if<uint32_t>(&value.storage());
    if (a == nullptr || *a == 0 || !std::has_single_bit(*a)) {
      return WriterError("metadata key 'general.alignment'",
                         absl::StrCat("expected a u32 power of two, found ", value.TypeString(),
                                      " ", value.ToString()));
    }
  }
  Put(std::move(key), std::move(value));
  return absl::OkStatus();
}

absl::Status GgufWriter::SetIntArray(std::string key, ValueType element_type,
                                     std::vector<int64_t> values) {
  return Set(std::move(key), Value(ValueType::kArray, std::move(values), element_type));
}

absl::Status GgufWriter::SetFloatArray(std::string key, ValueType element_type,
                                       std::vector<double> values) {
  return Set(std::move(key), Value(ValueType::kArray, std::move(values), element_type));
}

void GgufWriter::SetBoolArray(std::string key, std::vector<bool> values) {
  Put(std::move(key), Value(ValueType::kArray, std::move(values), ValueType::kBool));
}

void GgufWriter::SetStringArray(std::string key, std::vector<std::string> values) {
  Put(std::move(key), Value(ValueType::kArray, std::move(values), ValueType::kString));
}

absl::Status GgufWriter::SetAlignment(uint32_t alignment) {
  return Set("general.alignment", Value(ValueType::kUint32, alignment));
}

absl::Status GgufWriter::CopyMetadata(const Metadata& metadata) {
  for (const auto& [key, value] : metadata.entries()) {
    if (absl::StartsWith(key, "split.")) continue;
    KTX_RETURN_IF_ERROR(Set(key, value));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint32_t> GgufWriter::Alignment() const {
  auto it = kv_index_.find("general.alignment");
  if (it == kv_index_.end()) return kDefaultAlignment;
  return std::get<uint32_t>(kv_[it->second].second.storage());  // checked by Set
}

// ---- tensors ----

absl::Status GgufWriter::CheckTensor(const std::string& name, const std::vector<int64_t>& ne,
                                     kernels::TensorType type, Tensor* t) const {
  const std::string what = absl::StrCat("tensor ", Quote(name));
  if (name.empty()) return WriterError("tensor", "empty name");
  if (name.size() > kMaxNameBytes) {
    return WriterError(
        what, absl::StrCat("name is ", name.size(), " bytes, expected at most ", kMaxNameBytes));
  }
  if (tensor_index_.count(name) != 0) return WriterError(what, "added twice");
  if (ne.empty() || ne.size() > 4) {
    return WriterError(what, absl::StrCat(ne.size(), " dims, expected 1..4"));
  }
  const auto traits = kernels::GetTensorTypeTraits(static_cast<uint32_t>(type));
  if (!traits) {
    return WriterError(what, absl::StrCat("unknown tensor type id ", static_cast<uint32_t>(type)));
  }
  uint64_t n_bytes = 1;
  int64_t n_rows = 1;
  bool overflow = false;
  for (size_t d = 0; d < ne.size(); ++d) {
    if (ne[d] <= 0)
      return WriterError(what, absl::StrCat("ne[", d, "] = ", ne[d], ", expected > 0"));
    if (d > 0) overflow |= __builtin_mul_overflow(n_rows, ne[d], &n_rows);
  }
  if (ne[0] % traits->block_size != 0) {
    return WriterError(what, absl::StrCat("ne[0] = ", ne[0], " is not a multiple of the ",
                                          traits->name, " block size ", traits->block_size));
  }
  const uint64_t row_bytes = static_cast<uint64_t>(kernels::RowBytes(*traits, ne[0]));
  overflow |= __builtin_mul_overflow(row_bytes, static_cast<uint64_t>(n_rows), &n_bytes);
  if (overflow || n_bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return WriterError(what, "size overflows");
  }
  t->name = name;
  t->ne = ne;
  t->type = type;
  t->n_bytes = n_bytes;
  t->row_bytes = static_cast<int64_t>(row_bytes);
  t->n_rows = n_rows;
  return absl::OkStatus();
}

absl::Status GgufWriter::AddTensor(std::string name, std::vector<int64_t> ne,
                                   kernels::TensorType type, std::vector<uint8_t> data) {
  Tensor t;
  KTX_RETURN_IF_ERROR(CheckTensor(name, ne, type, &t));
  if (data.size() != t.n_bytes) {
    return WriterError(
        absl::StrCat("tensor ", Quote(name)),
        absl::StrCat("got ", data.size(), " bytes of data, expected ", t.n_bytes, " for ",
                     kernels::TraitsOf(type).name, " shape {", absl::StrJoin(ne, ", "), "}"));
  }
  t.data = std::move(data);
  tensor_index_.emplace(t.name, tensors_.size());
  tensors_.push_back(std::move(t));
  return absl::OkStatus();
}

absl::Status GgufWriter::AddTensor(std::string name, std::vector<int64_t> ne,
                                   kernels::TensorType type, FillFn fill) {
  Tensor t;
  KTX_RETURN_IF_ERROR(CheckTensor(name, ne, type, &t));
  if (!fill) return WriterError(absl::StrCat("tensor ", Quote(name)), "empty fill callback");
  t.fill = std::move(fill);
  tensor_index_.emplace(t.name, tensors_.size());
  tensors_.push_back(std::move(t));
  return absl::OkStatus();
}

uint64_t GgufWriter::tensor_bytes() const {
  uint64_t total = 0;
  for (const Tensor& t : tensors_) total += t.n_bytes;
  return total;
}

// ---- writing ----

absl::StatusOr<std::vector<int>> GgufWriter::AssignParts(int n_split) const {
  const size_t n = tensors_.size();
  if (n_split < 1 || n_split > 65535) {
    return WriterError("WriteOptions::n_split", absl::StrCat("expected 1..65535, found ", n_split));
  }
  if (n_split > 1 && static_cast<size_t>(n_split) > n) {
    return WriterError("WriteOptions::n_split",
                       absl::StrCat(n_split, " parts but only ", n, " tensors"));
  }
  std::vector<int> part_of(n, 0);
  if (n_split == 1) return part_of;
  const uint64_t total = tensor_bytes();
  uint64_t before = 0;  // bytes of the tensors before tensor i
  int part = 0;
  for (size_t i = 0; i < n; ++i) {
    // Move on when this part has its share (and has a tensor), or when the
    // remaining tensors are just enough for one per remaining part.
    const size_t tensors_left = n - i;
    const int parts_left = n_split - part;  // including the current one
    const bool current_empty = i == 0 || part_of[i - 1] != part;
    if (!current_empty && part + 1 < n_split) {
      const long double share = static_cast<long double>(total) * (part + 1) / n_split;
      if (static_cast<long double>(before) >= share ||
          tensors_left < static_cast<size_t>(parts_left)) {
        ++part;
      }
    }
    part_of[i] = part;
    before += tensors_[i].n_bytes;
  }
  return part_of;
}

absl::Status GgufWriter::WritePart(const AppendFn& append, int part, int n_split,
                                   const std::vector<int>& part_of, uint32_t alignment,
                                   size_t chunk_bytes) const {
  std::vector<const Tensor*> tensors;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    if (part_of[i] == part) tensors.push_back(&tensors_[i]);
  }
  // Metadata: all of it in part 0; the others carry only alignment and split keys.
  std::vector<const std::pair<std::string, Value>*> kv;
  for (const auto& entry : kv_) {
    if (n_split > 1 && absl::StartsWith(entry.first, "split.")) continue;
    if (part == 0 || entry.first == "general.alignment") kv.push_back(&entry);
  }
  std::vector<std::pair<std::string, Value>> split_kv;
  if (n_split > 1) {
    split_kv.emplace_back("split.no", Value(ValueType::kUint16, static_cast<uint16_t>(part)));
    split_kv.emplace_back("split.count", Value(ValueType::kUint16, static_cast<uint16_t>(n_split)));
    split_kv.emplace_back("split.tensors.count",
                          Value(ValueType::kInt32, static_cast<int32_t>(tensors_.size())));
    for (const auto& entry : split_kv) kv.push_back(&entry);
  }

  Bytes header;
  header.Pod(kMagic);
  header.Pod(kVersion);
  header.Pod(static_cast<uint64_t>(tensors.size()));
  header.Pod(static_cast<uint64_t>(kv.size()));
  for (const auto* entry : kv) {
    header.String(entry->first);
    EncodeValue(header, entry->second);
  }
  uint64_t offset = 0;
  for (const Tensor* t : tensors) {
    header.String(t->name);
    header.Pod(static_cast<uint32_t>(t->ne.size()));
    for (int64_t x : t->ne) header.Pod(x);
    header.Pod(static_cast<uint32_t>(t->type));
    header.Pod(offset);
    offset += AlignUp(t->n_bytes, alignment);
  }
  header.PadTo(alignment);
  KTX_RETURN_IF_ERROR(append(header.data().data(), header.data().size()));

  std::vector<uint8_t> buffer;
  for (const Tensor* t : tensors) {
    if (!t->fill) {
      KTX_RETURN_IF_ERROR(append(t->data.data(), t->data.size()));
    } else {
      const int64_t rows_per_chunk = std::max<int64_t>(
          1, std::min<int64_t>(t->n_rows, static_cast<int64_t>(chunk_bytes) /
                                              std::max<int64_t>(1, t->row_bytes)));
      const size_t need = static_cast<size_t>(rows_per_chunk * t->row_bytes);
      if (buffer.size() < need) buffer.resize(need);
      for (int64_t row = 0; row < t->n_rows; row += rows_per_chunk) {
        const int64_t n = std::min(rows_per_chunk, t->n_rows - row);
        if (absl::Status s = t->fill(row, n, buffer.data()); !s.ok()) {
          return absl::Status(
              s.code(), absl::StrCat("GgufWriter: tensor ", Quote(t->name), ": filling rows ", row,
                                     "..", row + n - 1, " failed: ", s.message()));
        }
        KTX_RETURN_IF_ERROR(append(buffer.data(), static_cast<size_t>(n * t->row_bytes)));
      }
    }
    const uint64_t pad = AlignUp(t->n_bytes, alignment) - t->n_bytes;  // < alignment
    for (uint64_t done = 0; done < pad; done += sizeof(kZeros)) {
      KTX_RETURN_IF_ERROR(
          append(kZeros, static_cast<size_t>(std::min<uint64_t>(pad - done, sizeof(kZeros)))));
    }
  }
  return absl::OkStatus();
}

absl::Status GgufWriter::Write(const std::string& path, const WriteOptions& options,
                               std::vector<std::string>* written) const {
  KTX_ASSIGN_OR_RETURN(const uint32_t alignment, Alignment());
  KTX_ASSIGN_OR_RETURN(const std::vector<int> part_of, AssignParts(options.n_split));
  std::vector<std::string> paths;
  if (options.n_split == 1) {
    paths.push_back(path);
  } else {
    if (!absl::EndsWith(path, ".gguf")) {
      return WriterError(
          "Write", absl::StrCat("a split model's path must end in .gguf, found ", Quote(path)));
    }
    const std::string prefix = path.substr(0, path.size() - 5);
    for (int i = 0; i < options.n_split; ++i)
      paths.push_back(SplitPath(prefix, i, options.n_split));
  }
  for (int part = 0; part < options.n_split; ++part) {
    KTX_ASSIGN_OR_RETURN(std::unique_ptr<FileSink> sink, FileSink::Create(paths[part]));
    KTX_RETURN_IF_ERROR(
        WritePart([&sink](const uint8_t* data, size_t n) { return sink->Append(data, n); }, part,
                  options.n_split, part_of, alignment, options.chunk_bytes));
    KTX_RETURN_IF_ERROR(sink->Commit());
  }
  if (written != nullptr) *written = std::move(paths);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> GgufWriter::WriteToMemory(const WriteOptions& options) const {
  if (options.n_split != 1) {
    return WriterError("WriteToMemory", "writes a single file; n_split must be 1");
  }
  KTX_ASSIGN_OR_RETURN(const uint32_t alignment, Alignment());
  const std::vector<int> part_of(tensors_.size(), 0);
  std::vector<uint8_t> bytes;
  KTX_RETURN_IF_ERROR(WritePart(
      [&bytes](const uint8_t* data, size_t n) {
        bytes.insert(bytes.end(), data, data + n);
        return absl::OkStatus();
      },
      0, 1, part_of, alignment, options.chunk_bytes));
  return bytes;
}

}  // namespace ktx::gguf
