// File: topology/hardware.h
//
// Hardware discovery: NUMA nodes with their cpus and memory, sockets, CPU ISA
// features (and whether the OS grants AMX), and GPUs. The facts come from a
// HardwareSource so that tests can inject fake layouts (no NUMA, 2 sockets);
// SystemHardwareSource() reads the real machine through libnuma, sysfs,
// CPUID and the CUDA runtime. Plain data; no threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/cpu_features.h"

namespace ktx::topology {

struct NumaNodeInfo {
  int id = 0;
  std::vector<int> cpus;           // logical cpu ids usable by this process, ascending
  uint64_t memory_bytes = 0;       // total memory of the node
  uint64_t free_memory_bytes = 0;  // free at discovery time
  std::vector<int> sockets;        // physical package ids of its cpus
};

struct GpuInfo {
  int index = 0;
  std::string name;
  uint64_t memory_bytes = 0;
  uint64_t free_memory_bytes = 0;
  int compute_major = 0;
  int compute_minor = 0;
};

struct HardwareTopology {
  bool numa_available = false;  // false: libnuma reported no NUMA; one node was synthesised
  std::vector<NumaNodeInfo> nodes;
  int n_sockets = 0;
  int n_cpus = 0;  // sum over nodes
  kernels::CpuFeatures isa;
  std::vector<GpuInfo> gpus;
  std::string gpu_note;  // why `gpus` is empty, if it is
};

// The facts discovery is made from. Implementations: the real system, or a fake.
class HardwareSource {
 public:
  virtual ~HardwareSource() = default;
  // True when libnuma works (numa_available() != -1).
  virtual bool NumaAvailable() = 0;
  // Highest NUMA node id (numa_max_node()); only called when NumaAvailable().
  virtual int MaxNumaNode() = 0;
  // Cpus of a node (empty if the node has none or does not exist).
  virtual std::vector<int> NumaNodeCpus(int node) = 0;
  // Total and free memory of a node, in bytes; false if unknown.
  virtual bool NumaNodeMemory(int node, uint64_t* total, uint64_t* free) = 0;
  // Cpus this process may run on (its affinity mask).
  virtual std::vector<int> AllowedCpus() = 0;
  // Physical package (socket) id of a cpu, -1 if unknown.
  virtual int CpuSocket(int cpu) = 0;
  // Total and free system memory in bytes.
  virtual void SystemMemory(uint64_t* total, uint64_t* free) = 0;
  virtual kernels::CpuFeatures Isa() = 0;
  virtual std::vector<GpuInfo> Gpus(std::string* note) = 0;
};

// The running machine (libnuma, sysfs, sched_getaffinity, CPUID, CUDA).
std::unique_ptr<HardwareSource> SystemHardwareSource();

// Builds the topology from `source`. With no NUMA, one node 0 holds every
// allowed cpu and all system memory. Fails only when no cpu at all is usable.
absl::StatusOr<HardwareTopology> DiscoverHardware(HardwareSource& source);

// JSON with keys: nodes[] {id, cpus[], memory_bytes, free_memory_bytes, sockets[]},
// numa_available, n_sockets, n_cpus, cpu {vendor, brand}, isa {avx2, fma, avx512f,
// avx512bw, avx512vl, avx512_vnni, avx512_bf16, avx512_fp16, avx_vnni, amx_tile,
// amx_int8, amx_bf16, amx_permitted}, gpus[] {index, name, memory_bytes,
// free_memory_bytes, compute_capability}, gpu_note.
std::string HardwareTopologyToJson(const HardwareTopology& topology, int indent = 2);

// Reads JSON written by HardwareTopologyToJson back, e.g. the output of
// `ktx-ctl topology show --json` on another machine, so that configs can be
// checked against it. Required: nodes[] with id and cpus[]; every other key
// may be missing (defaults; n_cpus and n_sockets are recomputed from the
// nodes). `source` names the input in errors (kInvalidArgument).
absl::StatusOr<HardwareTopology> HardwareTopologyFromJson(std::string_view json,
                                                          const std::string& source);

// A human-readable table of the same facts.
std::string HardwareTopologyToTable(const HardwareTopology& topology);

// "0-3,8,10-11" for {0,1,2,3,8,10,11}.
std::string FormatCpuList(const std::vector<int>& cpus);

}  // namespace ktx::topology
