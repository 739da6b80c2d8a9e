#include "topology/hardware.h"

#include <numa.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/device_query.h"
#include "nlohmann/json.hpp"

namespace ktx::topology {
namespace {

class SystemSource final : public HardwareSource {
 public:
  bool NumaAvailable() override { return numa_available() != -1; }
  int MaxNumaNode() override { return numa_max_node(); }

  std::vector<int> NumaNodeCpus(int node) override {
    std::vector<int> cpus;
    struct bitmask* mask = numa_allocate_cpumask();
    if (mask == nullptr) return cpus;
    if (numa_node_to_cpus(node, mask) == 0) {
      for (unsigned i = 0; i < mask->size; ++i) {
        if (numa_bitmask_isbitset(mask, i)) cpus.push_back(static_cast<int>(i));
      }
    }
    numa_free_cpumask(mask);
    return cpus;
  }

  bool NumaNodeMemory(int node, uint64_t* total, uint64_t* free) override {
    long long free_bytes = 0;
    const long long total_bytes = numa_node_size64(node, &free_bytes);
    if (total_bytes < 0) return false;
    *total = static_cast<uint64_t>(total_bytes);
    *free = static_cast<uint64_t>(std::max(0LL, free_bytes));
    return true;
  }

  std::vector<int> AllowedCpus() override {
    std::vector<int> cpus;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      for (int i = 0; i < CPU_SETSIZE; ++i) {
        if (CPU_ISSET(i, &set)) cpus.push_back(i);
      }
    }
    if (cpus.empty()) {
      const long n = sysconf(_SC_NPROCESSORS_ONLN);
      for (long i = 0; i < n; ++i) cpus.push_back(static_cast<int>(i));
    }
    return cpus;
  }

  int CpuSocket(int cpu) override {
    std::ifstream in(
        absl::StrCat("/sys/devices/system/cpu/cpu", cpu, "/topology/physical_package_id"));
    int id = -1;
    if (in >> id) return id;
    return -1;
  }

  void SystemMemory(uint64_t* total, uint64_t* free) override {
    const long page = sysconf(_SC_PAGESIZE);
    *total = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(page);
    *free = static_cast<uint64_t>(sysconf(_SC_AVPHYS_PAGES)) * static_cast<uint64_t>(page);
  }

  kernels::CpuFeatures Isa() override { return kernels::DetectCpuFeatures(); }

  std::vector<GpuInfo> Gpus(std::string* note) override {
    std::vector<GpuInfo> gpus;
    for (const kernels::CudaDeviceInfo& d : kernels::QueryCudaDevices(note)) {
      GpuInfo g;
      g.index = d.index;
      g.name = d.name;
      g.memory_bytes = d.memory_bytes;
      g.free_memory_bytes = d.free_memory_bytes;
      g.compute_major = d.compute_major;
      g.compute_minor = d.compute_minor;
      gpus.push_back(std::move(g));
    }
    return gpus;
  }
};

std::string HumanBytes(uint64_t bytes) {
  const double gib = static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0);
  return absl::StrFormat("%.1f GiB", gib);
}

}  // namespace

std::unique_ptr<HardwareSource> SystemHardwareSource() { return std::make_unique<SystemSource>(); }

absl::StatusOr<HardwareTopology> DiscoverHardware(HardwareSource& source) {
  HardwareTopology topo;
  std::vector<int> allowed = source.AllowedCpus();
  std::sort(allowed.begin(), allowed.end());
  const std::set<int> allowed_set(allowed.begin(), allowed.end());
  topo.numa_available = source.NumaAvailable();
  if (topo.numa_available) {
    const int max_node = source.MaxNumaNode();
    for (int node = 0; node <= max_node; ++node) {
      NumaNodeInfo info;
      info.id = node;
      for (int cpu : source.NumaNodeCpus(node)) {
        if (allowed_set.count(cpu)) info.cpus.push_back(cpu);
      }
      if (info.cpus.empty()) continue;  // memory-only or not ours
      std::sort(info.cpus.begin(), info.cpus.end());
      if (!source.NumaNodeMemory(node, &info.memory_bytes, &info.free_memory_bytes)) {
        info.memory_bytes = info.free_memory_bytes = 0;
      }
      topo.nodes.push_back(std::move(info));
    }
  }
  if (topo.nodes.empty()) {
    // No NUMA (or libnuma gave nothing usable): one node with every allowed cpu.
    topo.numa_available = false;
    NumaNodeInfo info;
    info.id = 0;
    info.cpus = allowed;
    source.SystemMemory(&info.memory_bytes, &info.free_memory_bytes);
    topo.nodes.push_back(std::move(info));
  }
  if (topo.numa_available && topo.nodes.size() == 1) {
    // One node owns all memory by definition. Some VMs report only part of it
    // per node (memory hot-plugged outside the node's zones), so take the
    // system's figure when it is larger.
    uint64_t total = 0, free = 0;
    source.SystemMemory(&total, &free);
    NumaNodeInfo& only = topo.nodes[0];
    if (total > only.memory_bytes) {
      only.memory_bytes = total;
      only.free_memory_bytes = std::max(only.free_memory_bytes, free);
    }
  }
  std::set<int> all_sockets;
  for (NumaNodeInfo& node : topo.nodes) {
    std::set<int> sockets;
    for (int cpu : node.cpus) sockets.insert(std::max(0, source.CpuSocket(cpu)));
    node.sockets.assign(sockets.begin(), sockets.end());
    all_sockets.insert(sockets.begin(), sockets.end());
    topo.n_cpus += static_cast<int>(node.cpus.size());
  }
  if (topo.n_cpus == 0) {
    return absl::FailedPreconditionError(
        "hardware discovery: this process may run on no cpu (empty affinity mask)");
  }
  topo.n_sockets = static_cast<int>(all_sockets.size());
  topo.isa = source.Isa();
  topo.gpus = source.Gpus(&topo.gpu_note);
  if (!topo.gpus.empty()) topo.gpu_note.clear();
  return topo;
}

std::string FormatCpuList(const std::vector<int>& cpus) {
  std::string out;
  size_t i = 0;
  while (i < cpus.size()) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += j == i ? absl::StrCat(cpus[i]) : absl::StrCat(cpus[i], "-", cpus[j]);
    i = j + 1;
  }
  return out;
}

std::string HardwareTopologyToJson(const HardwareTopology& topo, int indent) {
  nlohmann::json j;
  j["numa_available"] = topo.numa_available;
  j["n_sockets"] = topo.n_sockets;
  j["n_cpus"] = topo.n_cpus;
  j["nodes"] = nlohmann::json::array();
  for (const NumaNodeInfo& n : topo.nodes) {
    j["nodes"].push_back({{"id", n.id},
                          {"cpus", n.cpus},
                          {"memory_bytes", n.memory_bytes},
                          {"free_memory_bytes", n.free_memory_bytes},
                          {"sockets", n.sockets}});
  }
  j["cpu"] = {{"vendor", topo.isa.vendor}, {"brand", topo.isa.brand}};
  const kernels::CpuFeatures& f = topo.isa;
  j["isa"] = {{"avx2", f.avx2},
              {"fma", f.fma},
              {"avx512f", f.avx512f},
              {"avx512bw", f.avx512bw},
              {"avx512vl", f.avx512vl},
              {"avx512_vnni", f.avx512_vnni},
              {"avx512_bf16", f.avx512_bf16},
              {"avx512_fp16", f.avx512_fp16},
              {"avx_vnni", f.avx_vnni},
              {"amx_tile", f.amx_tile},
              {"amx_int8", f.amx_int8},
              {"amx_bf16", f.amx_bf16},
              {"amx_permitted", f.amx_permitted}};
  j["gpus"] = nlohmann::json::array();
  for (const GpuInfo& g : topo.gpus) {
    j["gpus"].push_back(
        {{"index", g.index},
         {"name", g.name},
         {"memory_bytes", g.memory_bytes},
         {"free_memory_bytes", g.free_memory_bytes},
         {"compute_capability", absl::StrCat(g.compute_major, ".", g.compute_minor)}});
  }
  j["gpu_note"] = topo.gpu_note;
  return j.dump(indent);
}

absl::StatusOr<HardwareTopology> HardwareTopologyFromJson(std::string_view json,
                                                          const std::string& source) {
  const nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  auto error = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
  };
  if (j.is_discarded() || !j.is_object()) {
    return error("not a JSON object (expected the output of ktx-ctl topology show --json)");
  }
  if (!j.contains("nodes") || !j["nodes"].is_array() || j["nodes"].empty()) {
    return error("expected a non-empty array \"nodes\"");
  }
  // Typed reads that never throw: a missing key gives the default.
  auto get_bool = [](const nlohmann::json& o, const char* key) {
    return o.contains(key) && o[key].is_boolean() && o[key].get<bool>();
  };
  auto get_u64 = [](const nlohmann::json& o, const char* key) -> uint64_t {
    return o.contains(key) && o[key].is_number_unsigned() ? o[key].get<uint64_t>() : 0;
  };
  auto get_string = [](const nlohmann::json& o, const char* key) {
    return o.contains(key) && o[key].is_string() ? o[key].get<std::string>() : std::string();
  };
  auto get_ints = [](const nlohmann::json& o, const char* key, std::vector<int>* out) {
    if (!o.contains(key)) return true;
    if (!o[key].is_array()) return false;
    for (const nlohmann::json& v : o[key]) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > (1 << 20)) {
        return false;
      }
      out->push_back(v.get<int>());
    }
    return true;
  };
  HardwareTopology topo;
  topo.numa_available = get_bool(j, "numa_available");
  std::set<int> ids, sockets;
  for (size_t i = 0; i < j["nodes"].size(); ++i) {
    const nlohmann::json& n = j["nodes"][i];
    if (!n.is_object() || !n.contains("id") || !n["id"].is_number_integer() ||
        n["id"].get<int64_t>() < 0 || n["id"].get<int64_t>() > (1 << 20) || !n.contains("cpus")) {
      return error(absl::StrCat("nodes[", i, "]: expected an object with id (>= 0) and cpus[]"));
    }
    NumaNodeInfo info;
    info.id = n["id"].get<int>();
    if (!ids.insert(info.id).second) {
      return error(absl::StrCat("nodes[", i, "]: NUMA node ", info.id, " listed twice"));
    }
    if (!get_ints(n, "cpus", &info.cpus) || !get_ints(n, "sockets", &info.sockets)) {
      return error(absl::StrCat("nodes[", i, "]: cpus and sockets must be arrays of ids"));
    }
    std::sort(info.cpus.begin(), info.cpus.end());
    info.memory_bytes = get_u64(n, "memory_bytes");
    info.free_memory_bytes = get_u64(n, "free_memory_bytes");
    topo.n_cpus += static_cast<int>(info.cpus.size());
    sockets.insert(info.sockets.begin(), info.sockets.end());
    topo.nodes.push_back(std::move(info));
  }
  topo.n_sockets = std::max<int>(1, static_cast<int>(sockets.size()));
  if (j.contains("cpu") && j["cpu"].is_object()) {
    topo.isa.vendor = get_string(j["cpu"], "vendor");
    topo.isa.brand = get_string(j["cpu"], "brand");
  }
  if (j.contains("isa") && j["isa"].is_object()) {
    const nlohmann::json& f = j["isa"];
    kernels::CpuFeatures& isa = topo.isa;
    isa.avx2 = get_bool(f, "avx2");
    isa.fma = get_bool(f, "fma");
    isa.avx512f = get_bool(f, "avx512f");
    isa.avx512bw = get_bool(f, "avx512bw");
    isa.avx512vl = get_bool(f, "avx512vl");
    isa.avx512_vnni = get_bool(f, "avx512_vnni");
    isa.avx512_bf16 = get_bool(f, "avx512_bf16");
    isa.avx512_fp16 = get_bool(f, "avx512_fp16");
    isa.avx_vnni = get_bool(f, "avx_vnni");
    isa.amx_tile = get_bool(f, "amx_tile");
    isa.amx_int8 = get_bool(f, "amx_int8");
    isa.amx_bf16 = get_bool(f, "amx_bf16");
    isa.amx_permitted = get_bool(f, "amx_permitted");
  }
  if (j.contains("gpus") && j["gpus"].is_array()) {
    for (const nlohmann::json& g : j["gpus"]) {
      if (!g.is_object()) return error("gpus[]: expected objects");
      GpuInfo gpu;
      gpu.index = g.contains("index") && g["index"].is_number_integer() ? g["index"].get<int>() : 0;
      gpu.name = get_string(g, "name");
      gpu.memory_bytes = get_u64(g, "memory_bytes");
      gpu.free_memory_bytes = get_u64(g, "free_memory_bytes");
      const std::string cc = get_string(g, "compute_capability");
      if (std::sscanf(cc.c_str(), "%d.%d", &gpu.compute_major, &gpu.compute_minor) != 2) {
        gpu.compute_major = gpu.compute_minor = 0;
      }
      topo.gpus.push_back(std::move(gpu));
    }
  }
  topo.gpu_note = get_string(j, "gpu_note");
  return topo;
}

std::string HardwareTopologyToTable(const HardwareTopology& topo) {
  std::ostringstream out;
  out << "CPU      " << (topo.isa.brand.empty() ? topo.isa.vendor : topo.isa.brand) << "\n";
  out << "Sockets  " << topo.n_sockets << "    cpus " << topo.n_cpus << "    NUMA "
      << (topo.numa_available ? "available" : "unavailable (one node synthesised)") << "\n\n";
  out << absl::StrFormat("%-6s %-8s %-6s %-24s %12s %12s\n", "node", "sockets", "cpus", "cpu list",
                         "memory", "free");
  for (const NumaNodeInfo& n : topo.nodes) {
    std::string sockets;
    for (int s : n.sockets) absl::StrAppend(&sockets, sockets.empty() ? "" : ",", s);
    out << absl::StrFormat("%-6d %-8s %-6d %-24s %12s %12s\n", n.id, sockets, n.cpus.size(),
                           FormatCpuList(n.cpus), HumanBytes(n.memory_bytes),
                           HumanBytes(n.free_memory_bytes));
  }
  const kernels::CpuFeatures& f = topo.isa;
  auto yn = [](bool b) { return b ? "yes" : "no"; };
  out << "\nISA      avx2 " << yn(f.avx2) << "  avx512f " << yn(f.avx512f) << "  avx512bw "
      << yn(f.avx512bw) << "  avx512vl " << yn(f.avx512vl) << "  avx512_vnni " << yn(f.avx512_vnni)
      << "  avx512_bf16 " << yn(f.avx512_bf16) << "\n";
  out << "         amx_tile " << yn(f.amx_tile) << "  amx_int8 " << yn(f.amx_int8) << "  amx_bf16 "
      << yn(f.amx_bf16) << "  amx_permitted " << yn(f.amx_permitted) << "\n\n";
  if (topo.gpus.empty()) {
    out << "GPUs     none (" << topo.gpu_note << ")\n";
  } else {
    for (const GpuInfo& g : topo.gpus) {
      out << "GPU " << g.index << "    " << g.name << "  " << HumanBytes(g.memory_bytes) << " ("
          << HumanBytes(g.free_memory_bytes) << " free)  sm_" << g.compute_major << g.compute_minor
          << "\n";
    }
  }
  return out.str();
}

}  // namespace ktx::topology
