#include "topology/gguf_experts.h"

#include <map>
#include <memory>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace ktx::topology {
namespace {

// "blk.12.ffn_up_exps.weight" -> il 12, base "ffn_up_exps"; false for other names.
bool ParseExpertTensorName(const std::string& name, int* il, std::string* base) {
  std::vector<absl::string_view> parts = absl::StrSplit(name, '.');
  if (parts.size() < 3 || parts[0] != "blk") return false;
  if (!absl::EndsWith(parts[2], "_exps")) return false;
  if (!absl::SimpleAtoi(parts[1], il)) return false;
  *base = std::string(parts[2]);
  return true;
}

}  // namespace

absl::StatusOr<ModelExpertTable> ModelExpertTableFromGguf(const gguf::GgufFile& file) {
  const std::string source = file.paths().empty() ? std::string("gguf") : file.paths()[0];
  auto error = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
  };
  absl::StatusOr<std::string> arch = file.metadata().GetString("general.architecture");
  if (!arch.ok()) return arch.status();
  absl::StatusOr<uint32_t> block_count = file.metadata().GetU32(*arch + ".block_count");
  if (!block_count.ok()) return block_count.status();
  absl::StatusOr<uint32_t> expert_count = file.metadata().GetU32Or(*arch + ".expert_count", 0);
  if (!expert_count.ok()) return expert_count.status();
  if (*block_count > (1u << 20)) {
    return error(absl::StrCat(*arch, ".block_count is ", *block_count, " (implausibly large)"));
  }

  ModelExpertTable table;
  table.n_layer = static_cast<int>(*block_count);
  table.layers.resize(table.n_layer);
  std::vector<std::set<std::string>> bases(table.n_layer);
  std::vector<std::string> first_tensor(table.n_layer);
  for (const gguf::TensorInfo& t : file.tensors()) {
    int il = 0;
    std::string base;
    if (!ParseExpertTensorName(t.name, &il, &base)) continue;
    if (il < 0 || il >= table.n_layer) {
      return error(absl::StrCat("tensor ", t.name, ": layer ", il, " but ", *arch,
                                ".block_count is ", *block_count));
    }
    if (t.ne.size() < 2) {
      return error(absl::StrCat("tensor ", t.name, " has shape ", t.ShapeString(),
                                "; expected the experts in its last dimension"));
    }
    const int64_t n_expert = t.ne.back();
    LayerExperts& layer = table.layers[il];
    if (n_expert < 1 || n_expert > (int64_t{1} << 20)) {
      return error(absl::StrCat("tensor ", t.name, " has shape ", t.ShapeString(),
                                ": bad expert count ", n_expert));
    }
    if (layer.is_moe && layer.n_expert != n_expert) {
      return error(absl::StrCat("tensor ", t.name, " has ", n_expert, " experts (shape ",
                                t.ShapeString(), ") but ", first_tensor[il], " has ",
                                layer.n_expert));
    }
    if (*expert_count != 0 && n_expert != static_cast<int64_t>(*expert_count)) {
      return error(absl::StrCat("tensor ", t.name, " has ", n_expert, " experts (shape ",
                                t.ShapeString(), ") but ", *arch, ".expert_count is ",
                                *expert_count));
    }
    if (t.n_bytes % static_cast<uint64_t>(n_expert) != 0) {
      return error(absl::StrCat("tensor ", t.name, ": ", t.n_bytes,
                                " bytes do not split evenly into ", n_expert, " experts"));
    }
    if (!layer.is_moe) first_tensor[il] = t.name;
    layer.is_moe = true;
    layer.n_expert = static_cast<int>(n_expert);
    layer.bytes_per_expert += t.n_bytes / static_cast<uint64_t>(n_expert);
    bases[il].insert(base);
  }
  for (int il = 0; il < table.n_layer; ++il) {
    if (!table.layers[il].is_moe) continue;
    const std::set<std::string>& b = bases[il];
    if (!b.count("ffn_down_exps")) {
      return error(absl::StrCat("layer ", il, " has expert tensors (", first_tensor[il],
                                ") but no blk.", il, ".ffn_down_exps.weight"));
    }
    if (!b.count("ffn_gate_up_exps") && (!b.count("ffn_gate_exps") || !b.count("ffn_up_exps"))) {
      return error(absl::StrCat("layer ", il, " has expert tensors (", first_tensor[il],
                                ") but not both blk.", il, ".ffn_gate_exps and ffn_up_exps (nor ",
                                "the fused ffn_gate_up_exps)"));
    }
  }
  return table;
}

absl::StatusOr<ModelExpertTable> LoadModelExpertTable(const std::string& path) {
  absl::StatusOr<std::unique_ptr<gguf::GgufFile>> file = gguf::GgufFile::Open(path);
  if (!file.ok()) return file.status();
  return ModelExpertTableFromGguf(**file);
}

}  // namespace ktx::topology
