// File: topology/config.h
//
// Topology configs (ktx.v1.TopologyConfig, proto/ktx/v1/topology.proto),
// written in protobuf text format (configs/*.textproto): which ktx-node
// processes run, which one is the head (scheduler, router, attention and its
// device), and the expert shards of each node (NUMA node, cpus, memory
// budget). This file loads them with line-accurate errors, checks them against
// a machine and against themselves (naming every problem with its line),
// writes one for the running machine, and turns the shards into the
// placement planner's input.
//
//   KTX_ASSIGN_OR_RETURN(ParsedTopologyConfig parsed, ParseTopologyConfigFile(path));
//   ValidationOptions options;
//   options.hardware = &machine;  // from DiscoverHardware
//   for (const ConfigProblem& p : ValidateTopologyConfig(parsed, options))
//     std::cerr << FormatProblem(path, p) << "\n";
//
// This is the only topology library that needs protobuf (ktx_topology_config);
// hardware.h, cpu_list.h and placement.h stay proto-free.
// Thread-safety: plain values and pure functions (the checks read files only
// to see whether TLS and token files exist).
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "ktx/v1/topology.pb.h"
#include "topology/hardware.h"
#include "topology/placement.h"

namespace ktx::topology {

// Where each field of a parsed config was written. Paths name fields the way
// C++ would: "nodes[1].shards[0].cpus", "nodes[0].tls.cert_file"; lines are
// 1-based. A field left out of the file has no line of its own: LineOf gives
// the line of the closest enclosing element that was written ("nodes[1]"),
// and 0 when nothing encloses it.
class ConfigLocations {
 public:
  void Set(std::string path, int line) { lines_[std::move(path)] = line; }
  int LineOf(std::string_view path) const;
  const std::map<std::string, int, std::less<>>& lines() const { return lines_; }

 private:
  std::map<std::string, int, std::less<>> lines_;
};

// A config with the line of each of its fields.
struct ParsedTopologyConfig {
  ktx::v1::TopologyConfig config;
  ConfigLocations locations;
  std::string path;  // the file it came from ("" when parsed from memory)
};

// Parses text-format `text`. Errors (kInvalidArgument) read
// "SOURCE:LINE:COLUMN: message" (1-based) for every error the parser reports:
// syntax, unknown fields, a non-repeated field given twice, wrong value types.
absl::StatusOr<ParsedTopologyConfig> ParseTopologyConfigText(std::string_view text,
                                                             const std::string& source);
// Reads and parses `path` (kNotFound when it cannot be read).
absl::StatusOr<ParsedTopologyConfig> ParseTopologyConfigFile(const std::string& path);
// The same, keeping only the message.
absl::StatusOr<ktx::v1::TopologyConfig> LoadTopologyConfig(const std::string& path);

// One thing wrong with a config. line: 1-based; 0 = the file as a whole.
struct ConfigProblem {
  int line = 0;
  std::string message;
};

// "PATH:LINE: message" ("PATH: message" for line 0).
std::string FormatProblem(const std::string& path, const ConfigProblem& problem);

// What a config is checked against.
struct ValidationOptions {
  // The machine the local nodes run on; nullptr skips the checks against a
  // machine (cpus, NUMA nodes, memory, GPUs).
  const HardwareTopology* hardware = nullptr;
  // A node that runs on this machine (`--node`). Nodes whose listen address is
  // loopback are local too.
  std::string local_node;
  // With a model, the shards' budgets must hold the placement planned with
  // `placement` (profile and replication).
  const ModelExpertTable* model = nullptr;
  PlacementOptions placement;
  // Folder that relative TLS and token file names are relative to; empty: the
  // config file's folder (the working directory when parsed from memory).
  std::string base_dir;
};

// Every problem found, in file order (ascending line; whole-file problems
// first). Checks:
//  - at least one node; node names and shard names non-empty and unique;
//    exactly one head; a non-head node holds at least one shard;
//  - listen_address is host:port (host a name, IPv4 address or [IPv6]
//    address; port 1..65535), no two nodes share one;
//  - the head's attention_device is "cpu" or "cuda:N"; other nodes set none;
//  - cpus parse ("0-7,16-23"), no cpu twice within a node (or across the
//    local nodes, which share this machine); numa_node >= 0;
//  - TLS: cert_file, key_file and ca_file all set or all empty, and every
//    node alike;
//  - on local nodes, with hardware: the NUMA node exists, every cpu exists
//    and belongs to the shard's NUMA node, budgets fit the NUMA node's memory
//    (each, and together per NUMA node), cuda:N names an existing GPU, TLS
//    and token files exist;
//  - `local_node` names a node of the config;
//  - with a model: the planned experts fit each shard's budget (budget 0 means
//    the NUMA node's memory on local nodes and "unbounded" elsewhere).
std::vector<ConfigProblem> ValidateTopologyConfig(const ParsedTopologyConfig& parsed,
                                                  const ValidationOptions& options);

// host:port.
struct HostPort {
  std::string host;  // IPv6 without brackets
  int port = 0;
};
// Errors (kInvalidArgument) say what is wrong with `address`.
absl::StatusOr<HostPort> ParseListenAddress(std::string_view address);
// localhost, 127.0.0.0/8, ::1.
bool IsLoopbackHost(std::string_view host);
// A node runs on this machine: its name is `local_node` or its listen address is loopback.
bool IsLocalNode(const ktx::v1::NodeConfig& node, std::string_view local_node);

// The planner's shards, in config order (nodes, then their shards). Budgets:
// memory_budget_bytes, or for 0 the NUMA node's memory on local nodes when
// `hardware` knows it, else kNoBudget.
std::vector<ShardSpec> ShardSpecsFromConfig(const ktx::v1::TopologyConfig& config,
                                            const HardwareTopology* hardware,
                                            std::string_view local_node);

// `ktx-ctl topology init`: a config for one machine.
struct InitOptions {
  std::string node_name = "node0";
  std::string listen_address = "127.0.0.1:50051";
  double budget_fraction = 0.9;  // of each NUMA node's memory, (0, 1]
};
// One node (the head; attention on cuda:0 when the machine has a GPU, else
// cpu) with one shard per NUMA node: "<node>/numa<id>", the node's cpus, and
// budget_fraction of its memory (rounded down to MiB).
ktx::v1::TopologyConfig MakeLocalTopologyConfig(const HardwareTopology& hardware,
                                                const InitOptions& options);

// Text format with comments: a header (`header_comment`, one "# " line per
// line of it) and each budget in GiB. Parses back to the same message.
std::string TopologyConfigToText(const ktx::v1::TopologyConfig& config,
                                 std::string_view header_comment = {});

}  // namespace ktx::topology
