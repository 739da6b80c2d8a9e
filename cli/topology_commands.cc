// File: cli/topology_commands.cc
//
// `ktx-ctl topology ...`: this machine's hardware, topology configs and
// expert placement (docs/topology.md).
//   show [--json]                      NUMA nodes, cpus, memory, ISA, GPUs
//   init [--out FILE] [--listen ADDR]  a config for this machine
//   validate FILE [--node N] [--model GGUF]
//                                      every problem of a config, with its line
//   plan --model GGUF --topology FILE [--profile FILE] [--json]
//                                      which shard holds which experts
// `--hardware FILE` (JSON from `topology show --json`) makes init, validate
// and plan use that machine instead of this one. Results go to stdout; errors
// and config problems to stderr; exit 1 on any of them.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "topology/config.h"
#include "topology/gguf_experts.h"
#include "topology/hardware.h"
#include "topology/placement.h"
#include "topology/profile_file.h"

namespace ktx::cli {
namespace {

// The machine: `hardware_file` (JSON from `topology show --json`) or this one.
absl::StatusOr<topology::HardwareTopology> LoadMachine(const std::string& hardware_file) {
  if (hardware_file.empty()) {
    auto source = topology::SystemHardwareSource();
    return topology::DiscoverHardware(*source);
  }
  std::ifstream in(hardware_file, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("--hardware ", hardware_file, ": cannot open"));
  }
  std::ostringstream text;
  text << in.rdbuf();
  return topology::HardwareTopologyFromJson(text.str(), hardware_file);
}

// Flags shared by validate and plan.
struct CheckFlags {
  std::string config;
  std::string node;
  std::string model;
  std::string profile;
  std::string hardware;
  int replicate_hot = 0;
  int replicas = 2;
  bool json = false;
};

void AddCheckFlags(CLI::App* cmd, CheckFlags* flags) {
  cmd->add_option("--node", flags->node,
                  "The config's node that runs on this machine (loopback nodes are local too)");
  cmd->add_option("--profile", flags->profile,
                  "Expert-usage profile: a `ktx-ctl profile` file (profile.pb, binary or text) "
                  "or JSON {\"layers\": {\"3\": [w0, w1, ...]}}");
  cmd->add_option("--replicate-hot", flags->replicate_hot,
                  "Replicate the N hottest experts of each profiled layer (needs --profile)");
  cmd->add_option("--replicas", flags->replicas,
                  "Copies of each replicated expert, on distinct shards (default 2)");
  cmd->add_option("--hardware", flags->hardware,
                  "Check against the machine in this JSON (from `topology show --json`)");
}

void PrintProblems(const std::string& path, const std::vector<topology::ConfigProblem>& problems) {
  for (const topology::ConfigProblem& p : problems) {
    std::cerr << topology::FormatProblem(path, p) << "\n";
  }
  std::cerr << path << ": " << problems.size() << " problem" << (problems.size() == 1 ? "" : "s")
            << "\n";
}

// Everything validate and plan need, loaded from the flags.
struct Loaded {
  topology::ParsedTopologyConfig parsed;
  topology::HardwareTopology machine;
  std::unique_ptr<topology::ModelExpertTable> model;
  topology::PlacementOptions placement;
};

absl::StatusOr<Loaded> Load(const CheckFlags& flags) {
  Loaded out;
  absl::StatusOr<topology::ParsedTopologyConfig> parsed =
      topology::ParseTopologyConfigFile(flags.config);
  if (!parsed.ok()) return parsed.status();
  out.parsed = *std::move(parsed);
  absl::StatusOr<topology::HardwareTopology> machine = LoadMachine(flags.hardware);
  if (!machine.ok()) return machine.status();
  out.machine = *std::move(machine);
  if (!flags.model.empty()) {
    absl::StatusOr<topology::ModelExpertTable> model = topology::LoadModelExpertTable(flags.model);
    if (!model.ok()) return model.status();
    out.model = std::make_unique<topology::ModelExpertTable>(*std::move(model));
  }
  if (!flags.profile.empty()) {
    absl::StatusOr<topology::ExpertProfile> profile = topology::LoadPlacementProfile(flags.profile);
    if (!profile.ok()) return profile.status();
    out.placement.profile = *std::move(profile);
  }
  out.placement.replication = {flags.replicate_hot, flags.replicas};
  return out;
}

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

struct InitFlags {
  std::string out;
  std::string hardware;
  topology::InitOptions init;
  bool force = false;
};

int RunTopologyInit(const InitFlags& flags) {
  absl::StatusOr<topology::HardwareTopology> machine = LoadMachine(flags.hardware);
  if (!machine.ok()) {
    std::cerr << "ktx-ctl topology init: " << machine.status() << "\n";
    return 1;
  }
  if (!(flags.init.budget_fraction > 0 && flags.init.budget_fraction <= 1)) {
    std::cerr << "ktx-ctl topology init: --budget-fraction " << flags.init.budget_fraction
              << " is not in (0, 1]\n";
    return 1;
  }
  const ktx::v1::TopologyConfig config = topology::MakeLocalTopologyConfig(*machine, flags.init);
  std::vector<std::string> gpus;
  for (const topology::GpuInfo& g : machine->gpus) gpus.push_back(g.name);
  const std::string header = absl::StrCat(
      "proto-file: proto/ktx/v1/topology.proto\nproto-message: ktx.v1.TopologyConfig\n\n",
      "Written by `ktx-ctl topology init` for ",
      machine->isa.brand.empty() ? std::string("this machine") : machine->isa.brand, ": ",
      machine->nodes.size(), " NUMA node", machine->nodes.size() == 1 ? "" : "s", ", ",
      machine->n_cpus, " cpus, ",
      gpus.empty() ? std::string("no GPU") : absl::StrCat("GPUs: ", absl::StrJoin(gpus, ", ")),
      ".\nOne shard per NUMA node with ", flags.init.budget_fraction * 100,
      "% of the node's memory for expert weights.\nCheck with `ktx-ctl topology validate FILE`; "
      "see docs/topology.md.");
  const std::string text = topology::TopologyConfigToText(config, header);

  // What init writes must pass validate on the same machine.
  absl::StatusOr<topology::ParsedTopologyConfig> parsed =
      topology::ParseTopologyConfigText(text, flags.out.empty() ? "<init>" : flags.out);
  if (!parsed.ok()) {
    std::cerr << "ktx-ctl topology init: " << parsed.status() << "\n";
    return 1;
  }
  topology::ValidationOptions options;
  options.hardware = &*machine;
  options.local_node = flags.init.node_name;
  options.base_dir = ".";
  const std::vector<topology::ConfigProblem> problems =
      topology::ValidateTopologyConfig(*parsed, options);
  if (!problems.empty()) {
    PrintProblems(flags.out.empty() ? "<init>" : flags.out, problems);
    return 1;
  }
  if (flags.out.empty()) {
    std::cout << text;
    return 0;
  }
  std::error_code ec;
  if (std::filesystem::exists(flags.out, ec) && !flags.force) {
    std::cerr << "ktx-ctl topology init: " << flags.out
              << " exists; pass --force to overwrite it\n";
    return 1;
  }
  const std::string tmp = flags.out + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    if (!out.flush()) {
      std::cerr << "ktx-ctl topology init: cannot write " << tmp << "\n";
      return 1;
    }
  }
  std::filesystem::rename(tmp, flags.out, ec);
  if (ec) {
    std::cerr << "ktx-ctl topology init: cannot rename " << tmp << " to " << flags.out << ": "
              << ec.message() << "\n";
    return 1;
  }
  std::cout << "wrote " << flags.out << ": 1 node, " << config.nodes(0).shards_size() << " shard"
            << (config.nodes(0).shards_size() == 1 ? "" : "s") << "\n";
  return 0;
}

int RunTopologyValidate(const CheckFlags& flags) {
  absl::StatusOr<Loaded> loaded = Load(flags);
  if (!loaded.ok()) {
    std::cerr << "ktx-ctl topology validate: " << loaded.status().message() << "\n";
    return 1;
  }
  topology::ValidationOptions options;
  options.hardware = &loaded->machine;
  options.local_node = flags.node;
  options.model = loaded->model.get();
  options.placement = loaded->placement;
  const std::vector<topology::ConfigProblem> problems =
      topology::ValidateTopologyConfig(loaded->parsed, options);
  if (!problems.empty()) {
    PrintProblems(flags.config, problems);
    return 1;
  }
  const ktx::v1::TopologyConfig& config = loaded->parsed.config;
  int n_shards = 0;
  std::vector<std::string> local;
  for (const ktx::v1::NodeConfig& node : config.nodes()) {
    n_shards += node.shards_size();
    if (topology::IsLocalNode(node, flags.node)) local.push_back(node.name());
  }
  std::cout << flags.config << ": OK, " << config.nodes_size() << " node"
            << (config.nodes_size() == 1 ? "" : "s") << ", " << n_shards << " shard"
            << (n_shards == 1 ? "" : "s") << "; checked against this machine: "
            << (local.empty() ? std::string("none (no loopback node, no --node)")
                              : absl::StrJoin(local, ", "))
            << "\n";
  if (loaded->model != nullptr) {
    std::cout << "the routed experts of " << flags.model << " ("
              << topology::FormatBytes(loaded->model->total_bytes())
              << ") fit the shards' budgets\n";
  }
  return 0;
}

int RunTopologyPlan(const CheckFlags& flags) {
  absl::StatusOr<Loaded> loaded = Load(flags);
  if (!loaded.ok()) {
    std::cerr << "ktx-ctl topology plan: " << loaded.status().message() << "\n";
    return 1;
  }
  // The config must be sound; the fit is the plan's to report.
  topology::ValidationOptions options;
  options.hardware = &loaded->machine;
  options.local_node = flags.node;
  const std::vector<topology::ConfigProblem> problems =
      topology::ValidateTopologyConfig(loaded->parsed, options);
  if (!problems.empty()) {
    PrintProblems(flags.config, problems);
    return 1;
  }
  const std::vector<topology::ShardSpec> shards =
      topology::ShardSpecsFromConfig(loaded->parsed.config, &loaded->machine, flags.node);
  absl::StatusOr<topology::PlacementPlan> plan =
      topology::ComputeExpertPlacement(*loaded->model, shards, loaded->placement);
  if (!plan.ok()) {
    std::cerr << "ktx-ctl topology plan: " << plan.status().message() << "\n";
    return 1;
  }
  if (flags.json) {
    std::cout << topology::PlacementPlanToJson(*plan, *loaded->model) << "\n";
  } else {
    std::cout << topology::PlacementPlanToText(*plan, *loaded->model);
  }
  if (!plan->fits()) {
    std::cerr << "ktx-ctl topology plan: " << topology::DescribeShortfalls(*plan) << "\n";
    return 1;
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

  CLI::App* init = topology->add_subcommand(
      "init", "Write a topology config for this machine: one head node, one shard per NUMA node");
  auto init_flags = std::make_shared<InitFlags>();
  init->add_option("--out", init_flags->out, "Write the config here (default: stdout)");
  init->add_option("--listen", init_flags->init.listen_address,
                   "The node's listen address host:port (default 127.0.0.1:50051)");
  init->add_option("--name", init_flags->init.node_name, "The node's name (default node0)");
  init->add_option("--budget-fraction", init_flags->init.budget_fraction,
                   "Share of each NUMA node's memory for expert weights (default 0.9)");
  init->add_option("--hardware", init_flags->hardware,
                   "Describe the machine in this JSON (from `topology show --json`) instead");
  init->add_flag("--force", init_flags->force, "Overwrite --out if it exists");
  init->callback([exit_code, init_flags] { *exit_code = RunTopologyInit(*init_flags); });

  CLI::App* validate = topology->add_subcommand(
      "validate", "Check a topology config against itself and this machine; list every problem");
  auto validate_flags = std::make_shared<CheckFlags>();
  validate->add_option("file", validate_flags->config, "Topology config (text format)")->required();
  validate->add_option("--model", validate_flags->model,
                       "GGUF model: the shards' budgets must hold its planned experts");
  AddCheckFlags(validate, validate_flags.get());
  validate->callback(
      [exit_code, validate_flags] { *exit_code = RunTopologyValidate(*validate_flags); });

  CLI::App* plan = topology->add_subcommand(
      "plan", "Plan which shard holds which experts of a model; memory and load per shard");
  auto plan_flags = std::make_shared<CheckFlags>();
  plan->add_option("--model", plan_flags->model, "GGUF model (first part of a split model)")
      ->required();
  plan->add_option("--topology", plan_flags->config, "Topology config (text format)")->required();
  plan->add_flag("--json", plan_flags->json, "Print JSON instead of text");
  AddCheckFlags(plan, plan_flags.get());
  plan->callback([exit_code, plan_flags] { *exit_code = RunTopologyPlan(*plan_flags); });
}

}  // namespace ktx::cli
