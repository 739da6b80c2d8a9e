// File: actors/remote/shard_host.h
//
// ShardHost: the expert shards of one shard node, served to a head node over
// the ExpertShard gRPC service (proto/ktx/v1/shard.proto). It plans the
// topology exactly as the head does (actors/remote/topology_shards.h), loads
// the named node's shards (a ShardExperts and a CpuArena each, like an
// in-process shard) and implements the service:
//
//   Info     node, model fingerprint, every hosted shard with its plan index,
//            held experts per layer and bytes; wire dtypes accepted.
//   Compute  a long-lived bidirectional stream: each ComputeRequest carries
//            parts (request id, shard, layer, hidden states [n_rows, n_embd]
//            as F32 or BF16, routing, experts to compute); each part is
//            validated, decoded and queued as a job on its shard's arena; the
//            answers (F32 partial sums, or an error naming the field) go back
//            on the same stream, several per message when they are ready
//            together, in completion order.
//   Stats    per shard: parts served and failed, rows, compute time, queue
//            depth; open streams.
//
//   KTX_ASSIGN_OR_RETURN(auto parsed, topology::ParseTopologyConfigFile(path));
//   KTX_ASSIGN_OR_RETURN(std::unique_ptr<ShardHost> host,
//                        ShardHost::Create(model, parsed, "node1", ShardHostOptions{...}));
//   builder.RegisterService(host->service());     // on the node's grpc::Server
//   ... server->Shutdown(deadline); then destroy the host.
//
// Validation: every incoming part is checked before anything is allocated
// from its sizes: the shard is hosted here, il is a MoE layer, h has dtype
// F32/BF16, shape [n_rows, n_embd] with 1 <= n_rows <= max_rows and the
// matching byte count, n_expert_used in [1, n_expert], expert_ids and weights
// hold n_rows * n_expert_used entries (ids in range or models::kNoExpert,
// the padding of a routing policy; weights finite), experts
// is non-empty, ascending, in range and held by the shard. A malformed part
// is answered with code INVALID_ARGUMENT and a message naming the field
// ("parts[0].h.shape[1] = 100, expected n_embd = 256"); the stream stays open.
// Every call first checks the shared token (rpc::CheckToken).
//
// Threads: gRPC's sync-server threads run the handlers; a Compute stream
// holds one of them (reading and decoding) plus a writer thread of its own
// (encoding and writing answers); expert work runs on the shards' arenas.
// Nothing here uses CAF.
//
// Ownership: owns the shards (ShardExperts, CpuArena) and the service. The
// model is shared. The grpc::Server that serves service() must be shut down
// before the ShardHost is destroyed. Thread-safety: service() handlers run
// concurrently; Describe(), Stats() and Info() may be called from any thread.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "actors/engine.h"
#include "actors/rpc/security.h"
#include "actors/shard_experts.h"
#include "grpcpp/impl/service_type.h"
#include "ktx/v1/shard.pb.h"
#include "runtime/models/deepseek2.h"
#include "topology/config.h"
#include "topology/placement.h"

namespace ktx::actors {

struct ShardHostOptions {
  // Token, TLS and message limits: the token is checked on every call.
  rpc::RpcSecurity security;
  // Must equal the head's EngineOptions::placement (profile, replication):
  // the plan is computed on every node from (config, model, placement).
  topology::PlacementOptions placement;
  // What computes the routed experts, as EngineOptions::experts and
  // fast_experts (default: the fast CPU kernels over NUMA-local copies of
  // only the shard's experts, actors/fast_experts.h). Give a shard node the
  // same kind as the head's in-process shards: the results then do not
  // depend on where a shard lives.
  ExpertsBackend experts = ExpertsBackend::kFast;
  moe_backend::CpuMoeBackendOptions fast_experts;
  // Makes each hosted shard's backend (called with the shard's plan index);
  // when set, `experts` is ignored.
  ExpertBackendFactory expert_backend_factory;
  int arena_spin_us = -1;  // CpuArena::Options::spin_us (-1: auto)
  // Largest n_rows of one part (a prefill chunk of the head is one part per
  // shard and layer).
  int64_t max_rows = 1 << 16;
  std::string version;  // reported by Info
};

// A shard node's options from its topology entry: security (token and TLS
// files, relative to the config's folder) from node `node_name`; the rest
// default. InvalidArgument naming the node when it is not in the config;
// the token and TLS files' errors.
absl::StatusOr<ShardHostOptions> ShardHostOptionsFromTopology(
    const topology::ParsedTopologyConfig& parsed, std::string_view node_name);

class ShardHost {
 public:
  // Plans the topology (ShardsFromTopology + PlanShards with
  // options.placement) and loads the shards of node `node_name`. Errors:
  // InvalidArgument when the node is not in the config or holds no shard
  // (naming it), the planner's errors, the backend factory's errors (naming
  // the shard).
  static absl::StatusOr<std::unique_ptr<ShardHost>> Create(
      std::shared_ptr<const models::Deepseek2Model> model,
      const topology::ParsedTopologyConfig& parsed, std::string_view node_name,
      ShardHostOptions options);

  // Lower level (tests, benchmarks): `shards` and `plan` as the head has
  // them (plan order); hosts the shards whose indices are in `hosted`
  // (their cpus from `shards`). InvalidArgument for a plan that does not
  // match the model or an index outside the plan.
  static absl::StatusOr<std::unique_ptr<ShardHost>> CreateWithPlan(
      std::shared_ptr<const models::Deepseek2Model> model, std::string node_name,
      const std::vector<ShardOptions>& shards, const topology::PlacementPlan& plan,
      const std::vector<int>& hosted, ShardHostOptions options);

  // Lowest level (benchmarks with a model's shape but no model file): the
  // model's hyper-parameters and fingerprint; options.expert_backend_factory
  // is required (InvalidArgument without it).
  static absl::StatusOr<std::unique_ptr<ShardHost>> CreateWithPlan(
      const models::Deepseek2Hparams& hp, std::string fingerprint, std::string node_name,
      const std::vector<ShardOptions>& shards, const topology::PlacementPlan& plan,
      const std::vector<int>& hosted, ShardHostOptions options);

  ~ShardHost();
  ShardHost(const ShardHost&) = delete;
  ShardHost& operator=(const ShardHost&) = delete;

  // The ExpertShard service, to register on a grpc::ServerBuilder. Owned by
  // the host.
  grpc::Service* service();

  const std::string& node() const;
  const std::string& fingerprint() const;  // gguf::ModelFingerprint of the model
  // What Info answers.
  ktx::v1::ShardInfoResponse Info() const;
  // What Stats answers.
  ktx::v1::ShardStatsResponse Stats() const;
  // One line per hosted shard: name, plan index, cpus, experts and bytes held.
  std::string Describe() const;

 private:
  struct Impl;
  class Service;
  explicit ShardHost(std::unique_ptr<Impl> impl);
  static ktx::v1::ShardInfoResponse InfoOf(const Impl& impl);
  static ktx::v1::ShardStatsResponse StatsOf(const Impl& impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ktx::actors
