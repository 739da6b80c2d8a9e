// File: tests/topology/fake_hardware.h
//
// Fake machines for topology tests, discovered through DiscoverHardware from a
// table-driven HardwareSource (no real NUMA, sysfs or GPU involved).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "topology/hardware.h"

namespace ktx::topology::testing {

// A machine described by tables: NUMA node -> cpus and memory, cpu -> socket.
class FakeHardwareSource : public HardwareSource {
 public:
  bool numa = true;
  std::map<int, std::vector<int>> node_cpus;
  std::map<int, uint64_t> node_memory;
  std::vector<int> allowed;
  std::map<int, int> socket_of;
  uint64_t system_memory = 0;
  std::vector<GpuInfo> gpus;
  kernels::CpuFeatures isa;

  bool NumaAvailable() override { return numa; }
  int MaxNumaNode() override { return node_cpus.empty() ? 0 : node_cpus.rbegin()->first; }
  std::vector<int> NumaNodeCpus(int node) override {
    auto it = node_cpus.find(node);
    return it == node_cpus.end() ? std::vector<int>{} : it->second;
  }
  bool NumaNodeMemory(int node, uint64_t* total, uint64_t* free) override {
    auto it = node_memory.find(node);
    if (it == node_memory.end()) return false;
    *total = it->second;
    *free = it->second / 2;
    return true;
  }
  std::vector<int> AllowedCpus() override { return allowed; }
  int CpuSocket(int cpu) override {
    auto it = socket_of.find(cpu);
    return it == socket_of.end() ? -1 : it->second;
  }
  void SystemMemory(uint64_t* total, uint64_t* free) override {
    *total = system_memory;
    *free = system_memory / 4;
  }
  kernels::CpuFeatures Isa() override { return isa; }
  std::vector<GpuInfo> Gpus(std::string* note) override {
    if (gpus.empty()) *note = "no CUDA device";
    return gpus;
  }
};

inline constexpr uint64_t kGiB = uint64_t{1} << 30;

// Two sockets, one NUMA node each, 16 cores with 2 hyperthreads per socket:
// node 0 = cpus 0-15,32-47, node 1 = cpus 16-31,48-63, 256 GiB each; with
// `with_gpu` one 80 GiB GPU.
inline HardwareTopology TwoSocketMachine(bool with_gpu = true) {
  FakeHardwareSource src;
  for (int c = 0; c < 64; ++c) {
    const int socket = (c / 16) % 2;
    src.node_cpus[socket].push_back(c);
    src.socket_of[c] = socket;
    src.allowed.push_back(c);
  }
  src.node_memory = {{0, 256 * kGiB}, {1, 256 * kGiB}};
  src.system_memory = 512 * kGiB;
  if (with_gpu) src.gpus.push_back({0, "NVIDIA H100 80GB HBM3", 80 * kGiB, 79 * kGiB, 9, 0});
  absl::StatusOr<HardwareTopology> topo = DiscoverHardware(src);
  EXPECT_TRUE(topo.ok()) << topo.status();
  return topo.ok() ? *topo : HardwareTopology{};
}

// One NUMA node with cpus 0-7 and 32 GiB, no GPU.
inline HardwareTopology SmallMachine() {
  FakeHardwareSource src;
  for (int c = 0; c < 8; ++c) {
    src.node_cpus[0].push_back(c);
    src.allowed.push_back(c);
    src.socket_of[c] = 0;
  }
  src.node_memory = {{0, 32 * kGiB}};
  src.system_memory = 32 * kGiB;
  absl::StatusOr<HardwareTopology> topo = DiscoverHardware(src);
  EXPECT_TRUE(topo.ok()) << topo.status();
  return topo.ok() ? *topo : HardwareTopology{};
}

}  // namespace ktx::topology::testing
