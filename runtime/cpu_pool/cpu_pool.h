// File: runtime/cpu_pool/cpu_pool.h
//
// A pool of CPU workers for kernel work (the MoE operator's stages, repacking):
// a oneTBB task_arena with one slot per cpu of a given list, each worker thread
// pinned to its cpu by a task_scheduler_observer, plus memory on a chosen NUMA
// node (libnuma numa_alloc_onnode; without NUMA support, or for a node that
// does not exist, plain aligned memory and one warning). Kernels never start
// threads: they expose tasks, and ParallelFor runs them here.
//
//   KTX_ASSIGN_OR_RETURN(auto pool, CpuPool::Create({.cpus = {0, 1, 2, 3}, .numa_node = 0}));
//   pool->ParallelFor(run.NumTasks(s), [&](int64_t task, int worker) { run.RunTask(s, task,
//   worker); }); NumaBuffer weights = pool->Allocate(bytes);
//
// The calling thread joins the arena as worker 0 for the duration of a
// ParallelFor (pinned to cpus[0] meanwhile; its previous affinity is restored
// afterwards; oneTBB's workers, shared by every arena of the process, get
// their previous affinity back too when they leave the pool's arena). Idle
// workers block in oneTBB's sleep (after its short spin):
// no busy waiting between calls.
//
// Thread-safety: ParallelFor may be called from one thread at a time per pool
// (it is a fork-join over the whole pool). Allocate is thread-safe. The pool
// owns its arena, observer and threads; NumaBuffer owns its memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"

namespace ktx::runtime {

// Memory from CpuPool::Allocate (64-byte aligned; buffers of 4 MiB and more
// are 2 MiB aligned where plain and advised for transparent huge pages;
// freed on destruction).
class NumaBuffer {
 public:
  NumaBuffer() = default;
  ~NumaBuffer();
  NumaBuffer(NumaBuffer&& other) noexcept;
  NumaBuffer& operator=(NumaBuffer&& other) noexcept;
  NumaBuffer(const NumaBuffer&) = delete;
  NumaBuffer& operator=(const NumaBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  // The node the pages were requested on, or -1 for plain memory.
  int numa_node() const { return node_; }

 private:
  friend class CpuPool;
  void Release();
  void* data_ = nullptr;
  size_t size_ = 0;
  int node_ = -1;
};

class CpuPool {
 public:
  struct Options {
    // One worker per listed cpu (logical cpu ids). Empty: every cpu of the
    // process's affinity mask.
    std::vector<int> cpus;
    // NUMA node for Allocate(); -1 allocates plain (first-touch) memory.
    int numa_node = -1;
    // Pin each worker to its cpu.
    bool pin = true;
    // How ParallelFor hands out tasks. kInOrder: the free workers claim the
    // next task in index order (one shared counter), so that callers can put
    // short tasks last (the MoE operator's stage-2 tail). kSplit: oneTBB's
    // parallel_for (recursive halving of the range, work stealing). The
    // environment variable KTX_POOL_SCHEDULE=inorder|split overrides it
    // (Create: InvalidArgument naming the variable for another value).
    enum class Schedule { kInOrder, kSplit };
    Schedule schedule = Schedule::kInOrder;
  };

  // InvalidArgument when a cpu is not in the process's affinity mask (or the
  // list has duplicates).
  static absl::StatusOr<std::unique_ptr<CpuPool>> Create(const Options& options);
  ~CpuPool();
  CpuPool(const CpuPool&) = delete;
  CpuPool& operator=(const CpuPool&) = delete;

  int num_workers() const { return static_cast<int>(cpus_.size()); }
  const std::vector<int>& cpus() const { return cpus_; }

  // Calls fn(task, worker) once for every task in [0, n_tasks), worker in
  // [0, num_workers()) being the arena slot of the thread (distinct threads at
  // any moment have distinct workers), and returns when all tasks are done.
  // Tasks are handed out one at a time (dynamic load balancing), in index
  // order with Schedule::kInOrder.
  void ParallelFor(int64_t n_tasks, absl::FunctionRef<void(int64_t task, int worker)> fn);

  // `bytes` on the pool's NUMA node (see Options::numa_node).
  NumaBuffer Allocate(size_t bytes) const;

 private:
  struct Impl;
  CpuPool(std::vector<int> cpus, const Options& options, Options::Schedule schedule);
  std::vector<int> cpus_;
  int numa_node_ = -1;
  Options::Schedule schedule_ = Options::Schedule::kInOrder;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ktx::runtime
