#include "topology/hardware.h"

#include "tests/topology/fake_hardware.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace ktx::topology {
namespace {

using ::testing::ElementsAre;

// A fake machine (tests/topology/fake_hardware.h) with AVX-512 and AMX granted.
class FakeSource : public testing::FakeHardwareSource {
 public:
  FakeSource() {
    isa.avx512f = true;
    isa.amx_tile = true;
    isa.amx_permitted = true;
  }
};

TEST(DiscoverHardwareTest, NoNumaGivesOneNodeWithAllAllowedCpus) {
  FakeSource src;
  src.numa = false;
  src.allowed = {1, 0};
  src.system_memory = 24ULL << 30;
  auto topo = DiscoverHardware(src);
  ASSERT_TRUE(topo.ok()) << topo.status();
  EXPECT_FALSE(topo->numa_available);
  ASSERT_EQ(topo->nodes.size(), 1u);
  EXPECT_EQ(topo->nodes[0].id, 0);
  EXPECT_THAT(topo->nodes[0].cpus, ElementsAre(0, 1));
  EXPECT_EQ(topo->nodes[0].memory_bytes, 24ULL << 30);
  EXPECT_EQ(topo->n_cpus, 2);
  EXPECT_EQ(topo->n_sockets, 1);
  EXPECT_TRUE(topo->gpus.empty());
  EXPECT_EQ(topo->gpu_note, "no CUDA device");
}

TEST(DiscoverHardwareTest, FakeTwoSocketLayout) {
  FakeSource src;
  src.node_cpus = {{0, {0, 1, 2, 3, 8, 9, 10, 11}}, {1, {4, 5, 6, 7, 12, 13, 14, 15}}};
  src.node_memory = {{0, 64ULL << 30}, {1, 64ULL << 30}};
  for (int c = 0; c < 16; ++c) {
    src.allowed.push_back(c);
    src.socket_of[c] = (c / 4) % 2;
  }
  src.gpus.push_back({0, "NVIDIA H200", 143ULL << 30, 140ULL << 30, 9, 0});
  auto topo = DiscoverHardware(src);
  ASSERT_TRUE(topo.ok()) << topo.status();
  EXPECT_TRUE(topo->numa_available);
  ASSERT_EQ(topo->nodes.size(), 2u);
  EXPECT_THAT(topo->nodes[1].cpus, ElementsAre(4, 5, 6, 7, 12, 13, 14, 15));
  EXPECT_THAT(topo->nodes[0].sockets, ElementsAre(0));
  EXPECT_THAT(topo->nodes[1].sockets, ElementsAre(1));
  EXPECT_EQ(topo->n_sockets, 2);
  EXPECT_EQ(topo->n_cpus, 16);

  const nlohmann::json j = nlohmann::json::parse(HardwareTopologyToJson(*topo));
  EXPECT_EQ(j["nodes"].size(), 2u);
  EXPECT_EQ(j["nodes"][1]["id"], 1);
  EXPECT_EQ(j["nodes"][1]["cpus"].size(), 8u);
  EXPECT_EQ(j["nodes"][0]["memory_bytes"], 64ULL << 30);
  EXPECT_TRUE(j["isa"]["avx512f"].get<bool>());
  EXPECT_TRUE(j["isa"]["amx_permitted"].get<bool>());
  EXPECT_FALSE(j["isa"]["avx512_vnni"].get<bool>());
  EXPECT_EQ(j["gpus"][0]["name"], "NVIDIA H200");
  EXPECT_EQ(j["gpus"][0]["memory_bytes"], 143ULL << 30);
  const std::string table = HardwareTopologyToTable(*topo);
  EXPECT_NE(table.find("4-7,12-15"), std::string::npos) << table;
  EXPECT_NE(table.find("NVIDIA H200"), std::string::npos) << table;
}

TEST(DiscoverHardwareTest, AffinityMaskRestrictsNodesAndDropsEmptyOnes) {
  FakeSource src;
  src.node_cpus = {{0, {0, 1}}, {1, {2, 3}}};
  src.node_memory = {{0, 1ULL << 30}, {1, 1ULL << 30}};
  src.allowed = {2, 3};
  auto topo = DiscoverHardware(src);
  ASSERT_TRUE(topo.ok());
  ASSERT_EQ(topo->nodes.size(), 1u);
  EXPECT_EQ(topo->nodes[0].id, 1);
}

TEST(DiscoverHardwareTest, NoUsableCpuIsAnError) {
  FakeSource src;
  src.numa = false;
  auto topo = DiscoverHardware(src);
  EXPECT_EQ(topo.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(topo.status().message().find("affinity"), std::string_view::npos);
}

TEST(DiscoverHardwareTest, SingleNodeOwnsAllSystemMemory) {
  // Some VMs report only part of the memory per node; one node owns all of it.
  FakeSource src;
  src.node_cpus = {{0, {0, 1}}};
  src.node_memory = {{0, 4ULL << 30}};
  src.allowed = {0, 1};
  src.system_memory = 24ULL << 30;
  auto topo = DiscoverHardware(src);
  ASSERT_TRUE(topo.ok());
  ASSERT_EQ(topo->nodes.size(), 1u);
  EXPECT_TRUE(topo->numa_available);
  EXPECT_EQ(topo->nodes[0].memory_bytes, 24ULL << 30);
}

TEST(HardwareTopologyFromJsonTest, RoundTripsTheJsonWritten) {
  FakeSource src;
  src.node_cpus = {{0, {0, 1, 2, 3}}, {1, {4, 5, 6, 7}}};
  src.node_memory = {{0, 8ULL << 30}, {1, 16ULL << 30}};
  for (int c = 0; c < 8; ++c) {
    src.allowed.push_back(c);
    src.socket_of[c] = c / 4;
  }
  src.gpus.push_back({0, "NVIDIA H100", 80ULL << 30, 79ULL << 30, 9, 0});
  auto topo = DiscoverHardware(src);
  ASSERT_TRUE(topo.ok());
  auto back = HardwareTopologyFromJson(HardwareTopologyToJson(*topo), "hw.json");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(HardwareTopologyToJson(*back), HardwareTopologyToJson(*topo));
  EXPECT_EQ(back->nodes[1].memory_bytes, 16ULL << 30);
  EXPECT_THAT(back->nodes[1].cpus, ElementsAre(4, 5, 6, 7));
  EXPECT_EQ(back->n_sockets, 2);
  EXPECT_EQ(back->n_cpus, 8);
  EXPECT_EQ(back->gpus[0].compute_major, 9);
  EXPECT_TRUE(back->isa.amx_permitted);
}

TEST(HardwareTopologyFromJsonTest, MinimalAndBadInput) {
  auto minimal = HardwareTopologyFromJson(R"({"nodes": [{"id": 3, "cpus": [2, 1]}]})", "m.json");
  ASSERT_TRUE(minimal.ok()) << minimal.status();
  EXPECT_EQ(minimal->nodes[0].id, 3);
  EXPECT_THAT(minimal->nodes[0].cpus, ElementsAre(1, 2));
  EXPECT_EQ(minimal->n_cpus, 2);
  EXPECT_TRUE(minimal->gpus.empty());
  for (const char* bad : {"", "[]", R"({"nodes": []})", R"({"nodes": [{"cpus": [1]}]})",
                          R"({"nodes": [{"id": 0, "cpus": "0-3"}]})",
                          R"({"nodes": [{"id": 0, "cpus": [0]}, {"id": 0, "cpus": [1]}]})"}) {
    auto topo = HardwareTopologyFromJson(bad, "bad.json");
    EXPECT_EQ(topo.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(topo.status().message().find("bad.json"), std::string_view::npos) << bad;
  }
}

TEST(FormatCpuListTest, Ranges) {
  EXPECT_EQ(FormatCpuList({}), "");
  EXPECT_EQ(FormatCpuList({5}), "5");
  EXPECT_EQ(FormatCpuList({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
}

TEST(SystemHardwareTest, RealMachineIsSane) {
  auto src = SystemHardwareSource();
  auto topo = DiscoverHardware(*src);
  ASSERT_TRUE(topo.ok()) << topo.status();
  EXPECT_GE(topo->n_cpus, 1);
  EXPECT_GE(topo->nodes.size(), 1u);
  EXPECT_GT(topo->nodes[0].memory_bytes, 0u);
}

}  // namespace
}  // namespace ktx::topology
