#include <iostream>

#include "CLI/CLI.hpp"
#include "cli/commands.h"
#include "topology/hardware.h"

namespace ktx::cli {
namespace {

int RunTopologyShow(bool json) {
  auto source = topology::SystemHardwareSource();
  absl::StatusOr<topology::HardwareTopology> topo = topology::DiscoverHardware(*source);
  if (!topo.ok()) {
    std::cerr << "ktx-ctl topology show: " << topo.status() << "\n";
    return 1;
  }
  if (json) {
    std::cout << topology::HardwareTopologyToJson(*topo) << "\n";
  } else {
    std::cout << topology::HardwareTopologyToTable(*topo);
  }
  return 0;
}

}  // namespace

void AddTopologyCommands(CLI::App& app, int* exit_code) {
  CLI::App* topology = app.add_subcommand("topology", "Hardware and cluster topology");
  topology->require_subcommand(1);
  CLI::App* show = topology->add_subcommand(
      "show", "Show this machine: NUMA nodes, cpus, memory, ISA features, GPUs");
  auto json = std::make_shared<bool>(false);
  show->add_flag("--json", *json, "Print JSON instead of a table");
  show->callback([exit_code, json] { *exit_code = RunTopologyShow(*json); });
}

}  // namespace ktx::cli
