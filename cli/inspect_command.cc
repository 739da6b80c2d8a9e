// File: cli/inspect_command.cc
//
// `ktx-ctl inspect FILE [--json] [--items N]`: opens a GGUF model (the first
// part of a split model finds the rest) with the validating reader and prints
// its metadata (arrays summarised: type, length, first N items), a tensor
// table (name, type, shape, bytes, part) and totals per type and overall.
// Reads only headers: fast on any model size. Errors go to stderr, exit 1.
#include <algorithm>
#include <cstdint>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "cli/commands.h"
#include "kernels/common/tensor_type.h"
#include "nlohmann/json.hpp"
#include "runtime/gguf/gguf.h"

namespace ktx::cli {
namespace {

constexpr size_t kMaxStringBytes = 160;  // longer strings (chat templates) are cut in text output

struct TypeTotal {
  int64_t tensors = 0;
  uint64_t bytes = 0;
};

// "1,234,567".
std::string Grouped(uint64_t v) {
  std::string digits = std::to_string(v);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string HumanBytes(uint64_t v) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double x = static_cast<double>(v);
  int u = 0;
  while (x >= 1024 && u < 4) x /= 1024, ++u;
  return u == 0 ? absl::StrFormat("%d B", v) : absl::StrFormat("%.2f %s", x, units[u]);
}

std::string ValueText(const gguf::Value& v, size_t items) {
  if (const auto* s = std::get_if<std::string>(&v.storage());
      s != nullptr && s->size() > kMaxStringBytes) {
    return gguf::Value(gguf::ValueType::kString, s->substr(0, kMaxStringBytes)).ToString() +
           absl::StrFormat("... (%d bytes)", s->size());
  }
  if (v.is_array()) return absl::StrFormat("%d items: %s", v.array_size(), v.ToString(items));
  return v.ToString(items);
}

nlohmann::json ValueJson(const gguf::Value& v, size_t items) {
  nlohmann::json j;
  if (!v.is_array()) {
    j["type"] = gguf::ValueTypeName(v.type());
    std::visit(
        [&](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, std::string> || std::is_same_v<T, bool> ||
                        std::is_arithmetic_v<T>) {
            j["value"] = x;
          }
        },
        v.storage());
    return j;
  }
  j["type"] = "array";
  j["element_type"] = gguf::ValueTypeName(v.array_type());
  j["length"] = v.array_size();
  nlohmann::json first = nlohmann::json::array();
  std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
          for (size_t i = 0; i < std::min(items, x.size()); ++i) {
            if (v.array_type() == gguf::ValueType::kUint64) {
              first.push_back(static_cast<uint64_t>(x[i]));
            } else {
              first.push_back(x[i]);
            }
          }
        } else if constexpr (std::is_same_v<T, std::vector<double>> ||
                             std::is_same_v<T, std::vector<std::string>>) {
          for (size_t i = 0; i < std::min(items, x.size()); ++i) first.push_back(x[i]);
        } else if constexpr (std::is_same_v<T, std::vector<bool>>) {
          for (size_t i = 0; i < std::min(items, x.size()); ++i)
            first.push_back(static_cast<bool>(x[i]));
        }
      },
      v.storage());
  j["first"] = std::move(first);
  return j;
}

std::map<std::string, TypeTotal> Totals(const gguf::GgufFile& f) {
  std::map<std::string, TypeTotal> totals;
  for (const gguf::TensorInfo& t : f.tensors()) {
    TypeTotal& tt = totals[kernels::TraitsOf(t.type).name];
    ++tt.tensors;
    tt.bytes += t.n_bytes;
  }
  return totals;
}

void PrintJson(const gguf::GgufFile& f, size_t items) {
  nlohmann::json j;
  j["paths"] = f.paths();
  j["version"] = f.version();
  j["alignment"] = f.alignment();
  j["data_offsets"] = f.data_offsets();
  nlohmann::json meta = nlohmann::json::object();
  for (const auto& [key, value] : f.metadata().entries()) meta[key] = ValueJson(value, items);
  j["metadata"] = std::move(meta);
  nlohmann::json tensors = nlohmann::json::array();
  for (const gguf::TensorInfo& t : f.tensors()) {
    tensors.push_back({{"name", t.name},
                       {"type", kernels::TraitsOf(t.type).name},
                       {"supported", kernels::TraitsOf(t.type).supported},
                       {"ne", t.ne},
                       {"bytes", t.n_bytes},
                       {"offset", t.offset},
                       {"part", t.file_index}});
  }
  j["tensors"] = std::move(tensors);
  nlohmann::json by_type = nlohmann::json::object();
  for (const auto& [name, tt] : Totals(f))
    by_type[name] = {{"tensors", tt.tensors}, {"bytes", tt.bytes}};
  j["totals"] = {
      {"tensors", f.tensors().size()}, {"bytes", f.total_tensor_bytes()}, {"by_type", by_type}};
  // Token strings need not be valid UTF-8: replace bad bytes instead of throwing.
  std::cout << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
}

void PrintText(const gguf::GgufFile& f, size_t items) {
  const size_t n_parts = f.paths().size();
  for (size_t i = 0; i < n_parts; ++i) {
    std::cout << (i == 0 ? "file:  " : "       ") << f.paths()[i];
    if (n_parts > 1) std::cout << absl::StrFormat("  (part %d of %d)", i + 1, n_parts);
    std::cout << "\n";
  }
  std::cout << absl::StrFormat(
      "GGUF v%d, alignment %d, %d metadata keys, %d tensors, %s of tensor data\n", f.version(),
      f.alignment(), f.metadata().entries().size(), f.tensors().size(),
      HumanBytes(f.total_tensor_bytes()));

  std::cout << "\nmetadata:\n";
  size_t key_width = 0;
  for (const auto& [key, value] : f.metadata().entries())
    key_width = std::max(key_width, key.size());
  for (const auto& [key, value] : f.metadata().entries()) {
    std::cout << absl::StrFormat("  %-*s  %-13s  %s\n", key_width, key, value.TypeString(),
                                 ValueText(value, items));
  }

  std::cout << "\ntensors:\n";
  size_t name_width = 4;
  size_t shape_width = 5;
  for (const gguf::TensorInfo& t : f.tensors()) {
    name_width = std::max(name_width, t.name.size());
    shape_width = std::max(shape_width, t.ShapeString().size());
  }
  const bool split = n_parts > 1;
  std::cout << absl::StrFormat("  %-*s  %-7s  %-*s  %15s%s\n", name_width, "name", "type",
                               shape_width, "shape", "bytes", split ? "  part" : "");
  for (const gguf::TensorInfo& t : f.tensors()) {
    const kernels::TensorTypeTraits& traits = kernels::TraitsOf(t.type);
    std::cout << absl::StrFormat("  %-*s  %-7s  %-*s  %15s", name_width, t.name, traits.name,
                                 shape_width, t.ShapeString(), Grouped(t.n_bytes));
    if (split) std::cout << absl::StrFormat("  %4d", t.file_index + 1);
    if (!traits.supported) std::cout << "  (type not supported for compute)";
    std::cout << "\n";
  }

  std::cout << "\ntotals:\n";
  for (const auto& [name, tt] : Totals(f)) {
    std::cout << absl::StrFormat("  %-7s  %6d tensors  %18s bytes  %12s\n", name, tt.tensors,
                                 Grouped(tt.bytes), HumanBytes(tt.bytes));
  }
  std::cout << absl::StrFormat("  %-7s  %6d tensors  %18s bytes  %12s\n", "all", f.tensors().size(),
                               Grouped(f.total_tensor_bytes()), HumanBytes(f.total_tensor_bytes()));
}

int RunInspect(const std::string& path, bool json, size_t items) {
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> f = gguf::GgufFile::Open(path);
  if (!f.ok()) {
    std::cerr << "ktx-ctl inspect: " << f.status() << "\n";
    return 1;
  }
  if (json) {
    PrintJson(**f, items);
  } else {
    PrintText(**f, items);
  }
  return 0;
}

}  // namespace

void AddInspectCommands(CLI::App& app, int* exit_code) {
  CLI::App* inspect = app.add_subcommand(
      "inspect", "Show a GGUF model's metadata and tensors (validates the whole header)");
  auto path = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  auto items = std::make_shared<size_t>(8);
  inspect->add_option("file", *path, "GGUF file; for a split model, its first part")->required();
  inspect->add_flag("--json", *json, "Print JSON instead of tables");
  inspect->add_option("--items", *items, "Array items to show (default 8)");
  inspect->callback(
      [exit_code, path, json, items] { *exit_code = RunInspect(*path, *json, *items); });
}

}  // namespace ktx::cli
