// File: actors/fast_experts.h
//
// The expert backend of a shard on the fast CPU kernels: per shard a
// runtime::CpuPool on the shard's cpus (one pinned worker per cpu) whose
// memory lives on the shard's NUMA node, and a moe_backend::CpuMoeBackend on
// that pool that holds ONLY the shard's experts (OwnedExpertMasks of the
// placement), repacked by the pool's own workers into memory of that node.
// This is what Engine::Create uses by default (EngineOptions::experts).
//
//   std::vector<FastShardSpec> specs = {{"shard0", {0, 1, 2, 3}, 0}, {"shard1", {4, 5, 6, 7}, 0}};
//   ExpertBackendFactory factory = FastExpertBackendFactory(model, specs);
//   KTX_ASSIGN_OR_RETURN(std::shared_ptr<models::ExpertBackend> backend, factory(1, held));
//
// Threads. The shard actor runs each ExpertWork as a job on its CpuArena
// (one dispatcher thread, never a CAF thread); the job calls the backend,
// whose ParallelFor makes that dispatcher thread the pool's worker 0 (pinned
// to cpus[0] meanwhile) and lets cpus.size() - 1 oneTBB workers join it, each
// pinned to its own cpu. Jobs of a shard run one at a time, so at any moment
// either the pool or (for a layer on the reference fallback) the arena has
// parallel work, never both: a shard never runs more threads than it has
// cpus. Idle, the dispatcher sleeps on a condition variable and the oneTBB
// workers in oneTBB's sleep after their short spin (no busy core;
// tests/actors/fast_experts_test.cc measures it). docs/architecture.md
// ("Actors") and docs/performance.md ("Actor runtime") say why the pool and
// the arena are separate.
//
// Ownership: each backend owns its pool and CpuMoeBackend (destroyed in that
// order's reverse) and keeps the model alive (shared_ptr). Thread-safety: the
// factory may be called from several threads at once (for distinct shards);
// a backend's Compute calls are serialised by CpuMoeBackend.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "actors/shard_experts.h"
#include "runtime/models/deepseek2.h"
#include "runtime/moe_backend/cpu_moe_backend.h"

namespace ktx::actors {

// Where one shard's kernels run.
struct FastShardSpec {
  std::string name;       // for logs and errors
  std::vector<int> cpus;  // empty: every cpu of the process, workers unpinned
  // NUMA node of the repacked experts and the workspace; -1: the node of the
  // first cpu (plain memory without NUMA support).
  int numa_node = -1;
};

// Makes the backend of shard s from specs[s]: a pool on its cpus (cpus the
// process may not use are dropped with a warning; none left: every cpu,
// unpinned) and a CpuMoeBackend holding the shard's experts, with `options`
// except owned_experts (set from the shard's held experts) and progress
// (off: shards load at the same time; each logs one line when ready).
// Errors: InvalidArgument for a shard index outside specs; the pool's and
// the backend's errors (e.g. a variant the host cannot run, ResourceExhausted
// when the copies do not fit); Engine::Create adds the shard's name.
ExpertBackendFactory FastExpertBackendFactory(std::shared_ptr<const models::Deepseek2Model> model,
                                              std::vector<FastShardSpec> specs,
                                              moe_backend::CpuMoeBackendOptions options = {});

// The CpuMoeBackend behind a backend made by FastExpertBackendFactory, or
// null for any other backend (run statistics for benchmarks and tests).
moe_backend::CpuMoeBackend* FastBackendOf(models::ExpertBackend* backend);

}  // namespace ktx::actors
