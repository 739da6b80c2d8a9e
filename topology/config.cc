#include "topology/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "topology/cpu_list.h"

namespace ktx::topology {
namespace {

namespace pb = ::google::protobuf;
using ktx::v1::NodeConfig;
using ktx::v1::ShardConfig;
using ktx::v1::TopologyConfig;

// Collects the text-format parser's errors as "SOURCE:LINE:COLUMN: message".
class LineErrorCollector final : public pb::io::ErrorCollector {
 public:
  explicit LineErrorCollector(const std::string& source) : source_(source) {}
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    errors_.push_back(absl::StrCat(source_, ":", line + 1, ":", column + 1, ": ", message));
  }
  void AddWarning(int line, pb::io::ColumnNumber column, const std::string& message) override {
    errors_.push_back(
        absl::StrCat(source_, ":", line + 1, ":", column + 1, ": warning: ", message));
  }
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  std::string source_;
  std::vector<std::string> errors_;
};

// Walks the parse tree next to the message, recording "a[i].b" -> line.
void CollectLocations(const pb::Message& message, const pb::TextFormat::ParseInfoTree& tree,
                      const std::string& prefix, ConfigLocations* out) {
  const pb::Descriptor* descriptor = message.GetDescriptor();
  const pb::Reflection* reflection = message.GetReflection();
  for (int f = 0; f < descriptor->field_count(); ++f) {
    const pb::FieldDescriptor* field = descriptor->field(f);
    const std::string name = prefix.empty() ? field->name() : prefix + "." + field->name();
    const bool is_message = field->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE;
    if (field->is_repeated()) {
      const int n = reflection->FieldSize(message, field);
      for (int i = 0; i < n; ++i) {
        const std::string path = absl::StrCat(name, "[", i, "]");
        const pb::TextFormat::ParseLocation loc = tree.GetLocation(field, i);
        if (loc.line >= 0) out->Set(path, loc.line + 1);
        if (is_message) {
          if (const pb::TextFormat::ParseInfoTree* nested = tree.GetTreeForNested(field, i)) {
            CollectLocations(reflection->GetRepeatedMessage(message, field, i), *nested, path, out);
          }
        }
      }
    } else {
      const pb::TextFormat::ParseLocation loc = tree.GetLocation(field, -1);
      if (loc.line >= 0) out->Set(name, loc.line + 1);
      if (is_message && reflection->HasField(message, field)) {
        if (const pb::TextFormat::ParseInfoTree* nested = tree.GetTreeForNested(field, -1)) {
          CollectLocations(reflection->GetMessage(message, field), *nested, name, out);
        }
      }
    }
  }
}

bool AllDigits(absl::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// "cuda:N" -> N; -1 when `device` is not of that form.
int CudaIndex(absl::string_view device) {
  constexpr absl::string_view kPrefix = "cuda:";
  if (device.substr(0, kPrefix.size()) != kPrefix) return -1;
  const absl::string_view digits = device.substr(kPrefix.size());
  int index = 0;
  if (!AllDigits(digits) || digits.size() > 4 || !absl::SimpleAtoi(digits, &index)) return -1;
  return index;
}

bool ValidHostName(absl::string_view host) {
  if (host.empty() || host.size() > 253) return false;
  for (absl::string_view label : absl::StrSplit(host, '.')) {
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-') {
      return false;
    }
    for (char c : label) {
      if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-') return false;
    }
  }
  return true;
}

// Dotted quad with each part 0..255 (no leading zeros beyond "0").
bool ValidIpv4(absl::string_view host) {
  std::vector<absl::string_view> parts = absl::StrSplit(host, '.');
  if (parts.size() != 4) return false;
  for (absl::string_view p : parts) {
    int v = 0;
    if (!AllDigits(p) || p.size() > 3 || (p.size() > 1 && p[0] == '0') ||
        !absl::SimpleAtoi(p, &v) || v > 255) {
      return false;
    }
  }
  return true;
}

bool LooksLikeIpv4(absl::string_view host) {
  return !host.empty() && std::all_of(host.begin(), host.end(),
                                      [](char c) { return (c >= '0' && c <= '9') || c == '.'; });
}

bool ValidIpv6(absl::string_view host) {
  if (host.size() < 2 || host.find(':') == absl::string_view::npos) return false;
  int groups = 0;
  bool double_colon = false;
  for (size_t i = 0; i < host.size();) {
    if (host.compare(i, 2, "::") == 0) {
      if (double_colon) return false;
      double_colon = true;
      i += 2;
      continue;
    }
    if (host[i] == ':') {
      if (i == 0) return false;
      ++i;
      if (i == host.size()) return false;
      continue;
    }
    size_t j = i;
    while (j < host.size() && absl::ascii_isxdigit(static_cast<unsigned char>(host[j]))) ++j;
    if (j == i || j - i > 4) return false;
    if (j < host.size() && host[j] != ':') return false;
    ++groups;
    i = j;
  }
  return double_colon ? groups < 8 : groups == 8;
}

std::string Quoted(absl::string_view s) { return absl::StrCat("'", s, "'"); }

// Collects problems with the line of a field path.
class Problems {
 public:
  explicit Problems(const ConfigLocations& locations) : locations_(locations) {}
  void Add(const std::string& path, std::string message) {
    problems_.push_back({locations_.LineOf(path), std::move(message)});
  }
  int LineOf(const std::string& path) const { return locations_.LineOf(path); }
  std::vector<ConfigProblem> Take() {
    std::stable_sort(
        problems_.begin(), problems_.end(),
        [](const ConfigProblem& a, const ConfigProblem& b) { return a.line < b.line; });
    return std::move(problems_);
  }

 private:
  const ConfigLocations& locations_;
  std::vector<ConfigProblem> problems_;
};

std::string LineRef(int line) { return line > 0 ? absl::StrCat(" (line ", line, ")") : ""; }

bool HasTls(const NodeConfig& node) {
  return node.has_tls() && (!node.tls().cert_file().empty() || !node.tls().key_file().empty() ||
                            !node.tls().ca_file().empty());
}

// cpu -> NUMA node id, for the machine's usable cpus.
std::map<int, int> NumaOfCpu(const HardwareTopology& hardware) {
  std::map<int, int> numa_of;
  for (const NumaNodeInfo& n : hardware.nodes) {
    for (int cpu : n.cpus) numa_of[cpu] = n.id;
  }
  return numa_of;
}

const NumaNodeInfo* FindNuma(const HardwareTopology& hardware, int id) {
  for (const NumaNodeInfo& n : hardware.nodes) {
    if (n.id == id) return &n;
  }
  return nullptr;
}

std::string NumaIds(const HardwareTopology& hardware) {
  std::vector<int> ids;
  for (const NumaNodeInfo& n : hardware.nodes) ids.push_back(n.id);
  return absl::StrJoin(ids, ", ");
}

}  // namespace

int ConfigLocations::LineOf(std::string_view path) const {
  absl::string_view p(path.data(), path.size());
  while (!p.empty()) {
    if (auto it = lines_.find(p); it != lines_.end()) return it->second;
    // Drop the last component (".name" or "[3]") and try the enclosing element.
    const size_t cut = p.find_last_of(".[");
    if (cut == absl::string_view::npos) break;
    p = p.substr(0, cut);
  }
  return 0;
}

absl::StatusOr<ParsedTopologyConfig> ParseTopologyConfigText(std::string_view text,
                                                             const std::string& source) {
  ParsedTopologyConfig parsed;
  pb::TextFormat::Parser parser;
  LineErrorCollector errors(source);
  pb::TextFormat::ParseInfoTree tree;
  parser.RecordErrorsTo(&errors);
  parser.WriteLocationsTo(&tree);
  const bool ok = parser.ParseFromString(std::string(text), &parsed.config);
  if (!ok || !errors.errors().empty()) {
    std::vector<std::string> lines = errors.errors();
    if (lines.empty()) lines.push_back(absl::StrCat(source, ": not a valid TopologyConfig"));
    return absl::InvalidArgumentError(absl::StrJoin(lines, "\n"));
  }
  CollectLocations(parsed.config, tree, "", &parsed.locations);
  return parsed;
}

absl::StatusOr<ParsedTopologyConfig> ParseTopologyConfigFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open the topology config"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  absl::StatusOr<ParsedTopologyConfig> parsed = ParseTopologyConfigText(text.str(), path);
  if (parsed.ok()) parsed->path = path;
  return parsed;
}

absl::StatusOr<TopologyConfig> LoadTopologyConfig(const std::string& path) {
  absl::StatusOr<ParsedTopologyConfig> parsed = ParseTopologyConfigFile(path);
  if (!parsed.ok()) return parsed.status();
  return std::move(parsed->config);
}

std::string FormatProblem(const std::string& path, const ConfigProblem& problem) {
  return problem.line > 0 ? absl::StrCat(path, ":", problem.line, ": ", problem.message)
                          : absl::StrCat(path, ": ", problem.message);
}

absl::StatusOr<HostPort> ParseListenAddress(std::string_view address_text) {
  const absl::string_view address(address_text.data(), address_text.size());
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("listen address ", Quoted(address), ": ", what));
  };
  HostPort out;
  absl::string_view port;
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    if (close == absl::string_view::npos) return error("'[' without ']' (expected [IPv6]:port)");
    out.host = std::string(address.substr(1, close - 1));
    if (!ValidIpv6(out.host))
      return error(absl::StrCat(Quoted(out.host), " is not an IPv6 address"));
    if (close + 1 >= address.size() || address[close + 1] != ':') {
      return error("expected :port after the IPv6 address");
    }
    port = address.substr(close + 2);
  } else {
    const size_t colon = address.rfind(':');
    if (colon == absl::string_view::npos) return error("expected host:port");
    out.host = std::string(address.substr(0, colon));
    port = address.substr(colon + 1);
    if (out.host.find(':') != std::string::npos) {
      return error("an IPv6 address must be written in brackets, e.g. [::1]:50051");
    }
    if (out.host.empty()) return error("the host is empty (expected host:port)");
    if (LooksLikeIpv4(out.host) ? !ValidIpv4(out.host) : !ValidHostName(out.host)) {
      return error(absl::StrCat(Quoted(out.host), " is not a host name or IPv4 address"));
    }
  }
  if (!AllDigits(port) || port.size() > 5 || !absl::SimpleAtoi(port, &out.port) || out.port < 1 ||
      out.port > 65535) {
    return error(absl::StrCat("port ", Quoted(port), " is not a number in 1..65535"));
  }
  return out;
}

bool IsLoopbackHost(std::string_view host_text) {
  const absl::string_view host(host_text.data(), host_text.size());
  if (absl::AsciiStrToLower(host) == "localhost" || host == "::1") return true;
  return ValidIpv4(host) && host.substr(0, 4) == "127.";
}

bool IsLocalNode(const NodeConfig& node, std::string_view local_node) {
  if (!local_node.empty() && node.name() == local_node) return true;
  absl::StatusOr<HostPort> hp = ParseListenAddress(node.listen_address());
  return hp.ok() && IsLoopbackHost(hp->host);
}

std::vector<ShardSpec> ShardSpecsFromConfig(const TopologyConfig& config,
                                            const HardwareTopology* hardware,
                                            std::string_view local_node) {
  std::vector<ShardSpec> specs;
  for (const NodeConfig& node : config.nodes()) {
    const bool local = IsLocalNode(node, local_node);
    for (const ShardConfig& shard : node.shards()) {
      ShardSpec spec;
      spec.name = shard.name();
      spec.memory_budget_bytes = shard.memory_budget_bytes();
      if (spec.memory_budget_bytes == 0) {
        spec.memory_budget_bytes = kNoBudget;
        if (local && hardware != nullptr) {
          if (const NumaNodeInfo* numa = FindNuma(*hardware, shard.numa_node());
              numa != nullptr && numa->memory_bytes > 0) {
            spec.memory_budget_bytes = numa->memory_bytes;
          }
        }
      }
      specs.push_back(std::move(spec));
    }
  }
  return specs;
}

std::vector<ConfigProblem> ValidateTopologyConfig(const ParsedTopologyConfig& parsed,
                                                  const ValidationOptions& options) {
  const TopologyConfig& config = parsed.config;
  Problems problems(parsed.locations);
  const HardwareTopology* hw = options.hardware;
  const std::map<int, int> numa_of_cpu = hw != nullptr ? NumaOfCpu(*hw) : std::map<int, int>{};
  std::vector<int> machine_cpus;
  for (const auto& [cpu, numa] : numa_of_cpu) machine_cpus.push_back(cpu);

  namespace fs = std::filesystem;
  fs::path base =
      options.base_dir.empty() ? fs::path(parsed.path).parent_path() : fs::path(options.base_dir);
  auto check_file = [&](const std::string& path, const std::string& file, const std::string& what,
                        const std::string& node_name) {
    const fs::path p = fs::path(file).is_absolute() ? fs::path(file) : base / file;
    std::error_code ec;
    if (!fs::is_regular_file(p, ec)) {
      problems.Add(path, absl::StrCat("node ", Quoted(node_name), ": ", what, " ",
                                      Quoted(p.string()), " does not exist or is not a file"));
    }
  };

  if (config.nodes_size() == 0) {
    problems.Add("", "no nodes: a topology needs at least one `nodes { ... }` entry");
  }

  std::map<std::string, int> node_line, shard_line, address_line;
  std::vector<int> heads;
  int n_shards = 0;
  int first_tls = -1, first_plain = -1;
  // Across local nodes (one machine): cpu -> (shard name, line); budget per NUMA node.
  struct LocalCpuOwner {
    std::string shard;
    int line = 0;
    int node = 0;
  };
  std::map<int, LocalCpuOwner> local_cpu_owner;
  std::map<int, uint64_t> local_numa_budget;
  bool local_node_found = options.local_node.empty();

  for (int i = 0; i < config.nodes_size(); ++i) {
    const NodeConfig& node = config.nodes(i);
    const std::string np = absl::StrCat("nodes[", i, "]");
    const std::string label = node.name().empty() ? absl::StrCat("#", i) : node.name();
    const bool local = IsLocalNode(node, options.local_node);
    if (!options.local_node.empty() && node.name() == options.local_node) local_node_found = true;

    // Name.
    if (node.name().empty()) {
      problems.Add(np + ".name", absl::StrCat("node #", i, " has no name"));
    } else if (auto [it, fresh] = node_line.emplace(node.name(), problems.LineOf(np + ".name"));
               !fresh) {
      problems.Add(np + ".name", absl::StrCat("node name ", Quoted(node.name()), " is used twice",
                                              LineRef(it->second)));
    }

    // Head and attention device.
    if (node.head()) heads.push_back(i);
    if (node.head()) {
      const std::string& device = node.attention_device();
      const int cuda = CudaIndex(device);
      if (device.empty()) {
        problems.Add(np + ".attention_device",
                     absl::StrCat("head node ", Quoted(label),
                                  " has no attention_device (expected \"cpu\" or \"cuda:N\")"));
      } else if (device != "cpu" && cuda < 0) {
        problems.Add(np + ".attention_device",
                     absl::StrCat("node ", Quoted(label), ": attention_device ", Quoted(device),
                                  " is not \"cpu\" or \"cuda:N\""));
      } else if (cuda >= 0 && local && hw != nullptr && cuda >= static_cast<int>(hw->gpus.size())) {
        problems.Add(np + ".attention_device",
                     absl::StrCat("node ", Quoted(label), ": attention_device ", Quoted(device),
                                  " but this machine has ", hw->gpus.size(), " GPU",
                                  hw->gpus.size() == 1 ? "" : "s",
                                  hw->gpus.empty() && !hw->gpu_note.empty()
                                      ? absl::StrCat(" (", hw->gpu_note, ")")
                                      : ""));
      }
    } else if (!node.attention_device().empty()) {
      problems.Add(
          np + ".attention_device",
          absl::StrCat("node ", Quoted(label), " is not the head but sets attention_device ",
                       Quoted(node.attention_device()), " (only the head runs attention)"));
    }
    if (!node.head() && node.shards_size() == 0) {
      problems.Add(np, absl::StrCat("node ", Quoted(label),
                                    " is not the head and holds no shard: it would have nothing "
                                    "to do"));
    }

    // Listen address.
    if (node.listen_address().empty()) {
      problems.Add(np + ".listen_address",
                   absl::StrCat("node ", Quoted(label),
                                " has no listen_address (expected host:port, e.g. "
                                "\"127.0.0.1:50051\")"));
    } else if (absl::StatusOr<HostPort> hp = ParseListenAddress(node.listen_address()); !hp.ok()) {
      problems.Add(np + ".listen_address",
                   absl::StrCat("node ", Quoted(label), ": ", hp.status().message()));
    } else {
      const std::string key = absl::StrCat(absl::AsciiStrToLower(hp->host), ":", hp->port);
      if (auto [it, fresh] = address_line.emplace(key, problems.LineOf(np + ".listen_address"));
          !fresh) {
        problems.Add(
            np + ".listen_address",
            absl::StrCat("node ", Quoted(label), ": listen_address ", Quoted(node.listen_address()),
                         " is used by another node too", LineRef(it->second)));
      }
    }

    // TLS and token.
    if (HasTls(node)) {
      if (first_tls < 0) first_tls = i;
      const ktx::v1::TlsConfig& tls = node.tls();
      const std::pair<const char*, const std::string*> files[] = {{"cert_file", &tls.cert_file()},
                                                                  {"key_file", &tls.key_file()},
                                                                  {"ca_file", &tls.ca_file()}};
      for (const auto& [field, value] : files) {
        const std::string path = absl::StrCat(np, ".tls.", field);
        if (value->empty()) {
          problems.Add(np + ".tls",
                       absl::StrCat("node ", Quoted(label), ": tls sets some files but not ", field,
                                    " (cert_file, key_file and ca_file go together)"));
        } else if (local) {
          check_file(path, *value, absl::StrCat("tls.", field), label);
        }
      }
    } else {
      if (first_plain < 0) first_plain = i;
    }
    if (!node.auth_token_file().empty() && local) {
      check_file(np + ".auth_token_file", node.auth_token_file(), "auth_token_file", label);
    }

    // Shards.
    std::map<int, std::pair<std::string, int>> node_cpu_owner;  // cpu -> (shard, line)
    for (int j = 0; j < node.shards_size(); ++j) {
      const ShardConfig& shard = node.shards(j);
      const std::string sp = absl::StrCat(np, ".shards[", j, "]");
      const std::string slabel =
          shard.name().empty() ? absl::StrCat(label, " shard #", j) : shard.name();
      ++n_shards;
      if (shard.name().empty()) {
        problems.Add(sp + ".name",
                     absl::StrCat("node ", Quoted(label), ": shard #", j, " has no name"));
      } else if (auto [it, fresh] = shard_line.emplace(shard.name(), problems.LineOf(sp + ".name"));
                 !fresh) {
        problems.Add(sp + ".name", absl::StrCat("shard name ", Quoted(shard.name()),
                                                " is used twice", LineRef(it->second)));
      }
      const NumaNodeInfo* numa = nullptr;
      if (shard.numa_node() < 0) {
        problems.Add(sp + ".numa_node", absl::StrCat("shard ", Quoted(slabel), ": numa_node ",
                                                     shard.numa_node(), " is negative"));
      } else if (local && hw != nullptr) {
        numa = FindNuma(*hw, shard.numa_node());
        if (numa == nullptr) {
          problems.Add(sp + ".numa_node",
                       absl::StrCat("shard ", Quoted(slabel), ": NUMA node ", shard.numa_node(),
                                    " does not exist on this machine (NUMA nodes with usable "
                                    "cpus: ",
                                    NumaIds(*hw), ")"));
        }
      }

      // Cpus.
      std::vector<int> cpus;
      const int cpus_line = problems.LineOf(sp + ".cpus");
      if (shard.cpus().empty()) {
        problems.Add(sp + ".cpus",
                     absl::StrCat("shard ", Quoted(slabel),
                                  " has no cpus (expected e.g. cpus: \"0-7,16-23\")"));
      } else if (absl::StatusOr<std::vector<int>> parsed_cpus = ParseCpuList(shard.cpus());
                 !parsed_cpus.ok()) {
        problems.Add(sp + ".cpus",
                     absl::StrCat("shard ", Quoted(slabel), ": ", parsed_cpus.status().message()));
      } else {
        cpus = *std::move(parsed_cpus);
      }
      // Used twice within the node: grouped per earlier shard.
      std::map<std::pair<std::string, int>, std::vector<int>> clashes;
      for (int cpu : cpus) {
        auto [it, fresh] = node_cpu_owner.emplace(cpu, std::make_pair(slabel, cpus_line));
        if (!fresh) clashes[it->second].push_back(cpu);
      }
      for (const auto& [owner, which] : clashes) {
        problems.Add(sp + ".cpus",
                     absl::StrCat("shard ", Quoted(slabel), ": cpu", which.size() == 1 ? " " : "s ",
                                  FormatIdRanges(which), " also used by shard ",
                                  Quoted(owner.first), LineRef(owner.second), " of the same node"));
      }
      if (local) {
        std::map<std::pair<std::string, int>, std::vector<int>> cross;
        for (int cpu : cpus) {
          auto [it, fresh] = local_cpu_owner.emplace(cpu, LocalCpuOwner{slabel, cpus_line, i});
          if (!fresh && it->second.node != i) {
            cross[{it->second.shard, it->second.line}].push_back(cpu);
          }
        }
        for (const auto& [owner, which] : cross) {
          problems.Add(
              sp + ".cpus",
              absl::StrCat("shard ", Quoted(slabel), ": cpu", which.size() == 1 ? " " : "s ",
                           FormatIdRanges(which), " also used by shard ", Quoted(owner.first),
                           LineRef(owner.second), " of another node on this machine"));
        }
      }
      if (local && hw != nullptr && !cpus.empty()) {
        std::vector<int> missing;
        std::map<int, std::vector<int>> elsewhere;  // numa id -> cpus
        for (int cpu : cpus) {
          auto it = numa_of_cpu.find(cpu);
          if (it == numa_of_cpu.end()) {
            missing.push_back(cpu);
          } else if (numa != nullptr && it->second != numa->id) {
            elsewhere[it->second].push_back(cpu);
          }
        }
        if (!missing.empty()) {
          problems.Add(
              sp + ".cpus",
              absl::StrCat(
                  "shard ", Quoted(slabel), ": cpu", missing.size() == 1 ? " " : "s ",
                  FormatIdRanges(missing), missing.size() == 1 ? " does" : " do",
                  " not exist on this machine (usable cpus: ", FormatIdRanges(machine_cpus), ")"));
        }
        for (const auto& [other, which] : elsewhere) {
          problems.Add(
              sp + ".cpus",
              absl::StrCat("shard ", Quoted(slabel), ": cpu", which.size() == 1 ? " " : "s ",
                           FormatIdRanges(which), which.size() == 1 ? " belongs" : " belong",
                           " to NUMA node ", other, ", not to the shard's NUMA node ", numa->id));
        }
      }

      // Budget against the NUMA node's memory.
      if (local && numa != nullptr && numa->memory_bytes > 0) {
        const uint64_t budget =
            shard.memory_budget_bytes() == 0 ? numa->memory_bytes : shard.memory_budget_bytes();
        if (budget > numa->memory_bytes) {
          problems.Add(sp + ".memory_budget_bytes",
                       absl::StrCat("shard ", Quoted(slabel), ": memory_budget_bytes ", budget,
                                    " (", FormatBytes(budget), ") exceeds NUMA node ", numa->id,
                                    "'s memory, ", FormatBytes(numa->memory_bytes)));
        } else {
          uint64_t& sum = local_numa_budget[numa->id];
          sum += budget;
          if (sum > numa->memory_bytes) {
            problems.Add(
                sp + ".memory_budget_bytes",
                absl::StrCat("shard ", Quoted(slabel), ": the budgets of the shards on NUMA node ",
                             numa->id, " add up to ", FormatBytes(sum), ", more than its ",
                             FormatBytes(numa->memory_bytes),
                             " (a budget of 0 means the whole node)"));
          }
        }
      }
    }
  }

  if (config.nodes_size() > 0 && n_shards == 0) {
    problems.Add("", "no shards: at least one node needs `shards { ... }` to hold the experts");
  }
  if (config.nodes_size() > 0 && heads.empty()) {
    problems.Add("", "no node has `head: true` (exactly one head is needed)");
  }
  for (size_t h = 1; h < heads.size(); ++h) {
    const NodeConfig& node = config.nodes(heads[h]);
    problems.Add(absl::StrCat("nodes[", heads[h], "].head"),
                 absl::StrCat("node ", Quoted(node.name()), " is a second head; ",
                              Quoted(config.nodes(heads[0]).name()),
                              LineRef(problems.LineOf(absl::StrCat("nodes[", heads[0], "].head"))),
                              " is the head already (exactly one is allowed)"));
  }
  if (first_tls >= 0 && first_plain >= 0) {
    for (int i = 0; i < config.nodes_size(); ++i) {
      if (HasTls(config.nodes(i))) continue;
      problems.Add(
          absl::StrCat("nodes[", i, "]"),
          absl::StrCat("node ", Quoted(config.nodes(i).name()), " has no tls but node ",
                       Quoted(config.nodes(first_tls).name()),
                       LineRef(problems.LineOf(absl::StrCat("nodes[", first_tls, "].tls"))),
                       " does: every node uses TLS or none does"));
    }
  }
  if (!local_node_found) {
    std::vector<std::string> names;
    for (const NodeConfig& node : config.nodes()) names.push_back(Quoted(node.name()));
    problems.Add("", absl::StrCat("--node ", Quoted(options.local_node),
                                  " names no node of this config (nodes: ",
                                  absl::StrJoin(names, ", "), ")"));
  }

  if (options.model != nullptr && n_shards > 0) {
    const std::vector<ShardSpec> specs = ShardSpecsFromConfig(config, hw, options.local_node);
    absl::StatusOr<PlacementPlan> plan =
        ComputeExpertPlacement(*options.model, specs, options.placement);
    if (!plan.ok()) {
      problems.Add("", absl::StrCat("expert placement: ", plan.status().message()));
    } else {
      // Shard index -> its path, in config order.
      std::vector<std::string> shard_paths;
      for (int i = 0; i < config.nodes_size(); ++i) {
        for (int j = 0; j < config.nodes(i).shards_size(); ++j) {
          shard_paths.push_back(absl::StrCat("nodes[", i, "].shards[", j, "]"));
        }
      }
      for (const ShardShortfall& s : plan->shortfalls) {
        problems.Add(shard_paths[s.shard] + ".memory_budget_bytes",
                     absl::StrCat("shard ", Quoted(s.name), ": the expert plan puts ",
                                  FormatBytes(s.need_bytes), " (", plan->shards[s.shard].n_experts,
                                  " experts) on it but its budget is ", FormatBytes(s.budget_bytes),
                                  ": ", FormatBytes(s.missing_bytes()),
                                  " missing (the model's routed experts need ",
                                  FormatBytes(plan->total_bytes), " in all)"));
      }
    }
  }
  return problems.Take();
}

TopologyConfig MakeLocalTopologyConfig(const HardwareTopology& hardware,
                                       const InitOptions& options) {
  TopologyConfig config;
  NodeConfig* node = config.add_nodes();
  node->set_name(options.node_name);
  node->set_listen_address(options.listen_address);
  node->set_head(true);
  node->set_attention_device(hardware.gpus.empty() ? "cpu" : "cuda:0");
  const double fraction = std::clamp(options.budget_fraction, 0.0, 1.0);
  for (const NumaNodeInfo& numa : hardware.nodes) {
    ShardConfig* shard = node->add_shards();
    shard->set_name(absl::StrCat(options.node_name, "/numa", numa.id));
    shard->set_numa_node(numa.id);
    shard->set_cpus(FormatIdRanges(numa.cpus));
    constexpr uint64_t kMiB = uint64_t{1} << 20;
    const uint64_t budget =
        static_cast<uint64_t>(static_cast<double>(numa.memory_bytes) * fraction);
    shard->set_memory_budget_bytes(budget / kMiB * kMiB);
  }
  return config;
}

std::string TopologyConfigToText(const TopologyConfig& config, std::string_view header_text) {
  const absl::string_view header_comment(header_text.data(), header_text.size());
  std::ostringstream out;
  if (!header_comment.empty()) {
    for (absl::string_view line : absl::StrSplit(header_comment, '\n')) {
      out << (line.empty() ? "#" : absl::StrCat("# ", line)) << "\n";
    }
    out << "\n";
  }
  auto str = [](const std::string& s) { return absl::StrCat("\"", absl::CEscape(s), "\""); };
  for (const NodeConfig& node : config.nodes()) {
    out << "nodes {\n";
    out << "  name: " << str(node.name()) << "\n";
    out << "  listen_address: " << str(node.listen_address()) << "\n";
    if (node.head()) out << "  head: true\n";
    if (!node.attention_device().empty()) {
      out << "  attention_device: " << str(node.attention_device()) << "\n";
    }
    if (!node.auth_token_file().empty()) {
      out << "  auth_token_file: " << str(node.auth_token_file()) << "\n";
    }
    if (node.has_tls()) {
      out << "  tls {\n";
      if (!node.tls().cert_file().empty())
        out << "    cert_file: " << str(node.tls().cert_file()) << "\n";
      if (!node.tls().key_file().empty())
        out << "    key_file: " << str(node.tls().key_file()) << "\n";
      if (!node.tls().ca_file().empty())
        out << "    ca_file: " << str(node.tls().ca_file()) << "\n";
      out << "  }\n";
    }
    for (const ShardConfig& shard : node.shards()) {
      out << "  shards {\n";
      out << "    name: " << str(shard.name()) << "\n";
      out << "    numa_node: " << shard.numa_node() << "\n";
      out << "    cpus: " << str(shard.cpus()) << "\n";
      out << "    memory_budget_bytes: " << shard.memory_budget_bytes();
      out << (shard.memory_budget_bytes() == 0
                  ? "  # 0 = all of the NUMA node's memory"
                  : absl::StrCat("  # ", FormatBytes(shard.memory_budget_bytes())))
          << "\n";
      out << "  }\n";
    }
    out << "}\n";
  }
  return out.str();
}

}  // namespace ktx::topology
