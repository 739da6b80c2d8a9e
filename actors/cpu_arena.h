// File: actors/cpu_arena.h
//
// The thread pool of one actor that computes: a oneTBB task_arena limited to
// a set of cpus, fed by a FIFO of jobs that one dispatcher thread of its own
// runs inside the arena. Kernel work of actors (model stages, expert
// matmuls) never runs on CAF scheduler threads: the actor Submits a job and
// the job posts its result back to the actor as a message.
//
//   KTX_ASSIGN_OR_RETURN(std::unique_ptr<CpuArena> arena,
//                        CpuArena::Create({.name = "shard0", .cpus = {0, 1, 2, 3}}));
//   arena->Submit([=] { ...compute...; caf::anon_send(actor, done_atom::value, ...); });
//
// Threads: the dispatcher thread takes the arena's one slot reserved for a
// master, so an arena always makes progress even when every oneTBB worker is
// busy elsewhere (or a job blocks); parallel loops inside a job (e.g.
// models::MatMul's tbb::parallel_for) are joined by up to cpus.size() - 1
// oneTBB workers. With cpus given, the dispatcher is pinned to them and every
// worker is pinned to them while it is inside this arena (its previous mask is
// restored when it leaves: workers are shared between arenas). If pinning
// fails (e.g. a cpu outside the process's mask), a warning is logged once and
// the arena runs unpinned.
//
// (runtime/cpu_pool/ may later offer a shared CpuPool; this is the minimal
// wrapper the actors need until then.)
//
// The dispatcher enters the task_arena once and drains the FIFO from inside it
// (no task_arena::execute per job), takes all queued jobs under one lock, and
// Submit wakes it (futex) only when it sleeps.
//
// Owns the dispatcher thread, the arena and the queued jobs. Submit is
// thread-safe. The destructor drops jobs that have not started, waits for the
// running one and joins the thread; jobs must therefore never wait for
// something only the arena's owner would do after destruction.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace ktx::actors {

class CpuArena {
 public:
  struct Options {
    std::string name;       // for logs ("shard0", "attention")
    std::vector<int> cpus;  // empty: the process's cpus, unpinned
    // The dispatcher busy-waits this long for the next job before it sleeps
    // (lower hand-off latency, at the cost of a spinning core while jobs
    // keep coming). 0: never. -1: auto, kAutoSpinUs when the process may use
    // at least 8 cpus, else 0 (on small machines the spinning dispatcher
    // would take the core the work needs); the environment variable
    // KTX_ARENA_SPIN_US=N sets what auto means. Why: a job submitted to a
    // dispatcher asleep for a while (its vCPU halted, e.g. during a decode
    // layer's GPU attention) cost the submitter 20-40 us on the GPU
    // machine; a dispatcher still spinning takes it in ~3 us.
    int spin_us = 0;
  };

  static constexpr int kAutoSpinUs = 1000;

  // InvalidArgument for a cpu id outside [0, CPU_SETSIZE) or listed twice,
  // a spin_us below -1, or a KTX_ARENA_SPIN_US that is not 0..100000.
  static absl::StatusOr<std::unique_ptr<CpuArena>> Create(Options options);

  ~CpuArena();
  CpuArena(const CpuArena&) = delete;
  CpuArena& operator=(const CpuArena&) = delete;

  // Queues `job`; jobs run one after another in submission order.
  void Submit(std::function<void()> job);

  const std::string& name() const { return options_.name; }
  int spin_us() const { return options_.spin_us; }  // resolved (never -1)
  const std::vector<int>& cpus() const { return cpus_; }
  int concurrency() const { return static_cast<int>(cpus_.size()); }
  bool pinned() const { return pinned_.load(std::memory_order_relaxed); }
  // Jobs run so far (tests).
  int64_t jobs_run() const { return jobs_run_.load(std::memory_order_relaxed); }

 private:
  struct TbbState;  // the task_arena and its pinning observer
  explicit CpuArena(Options options, std::vector<int> cpus, bool pin);
  void Run();
  void Drain();  // the dispatcher's loop, inside the task_arena

  Options options_;
  std::vector<int> cpus_;  // ascending; the arena's concurrency is their number
  bool pin_ = false;       // cpus were given explicitly
  std::atomic<bool> pinned_{false};
  std::atomic<int64_t> jobs_run_{0};

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // guarded by mu_
  bool stop_ = false;                        // guarded by mu_
  bool sleeping_ = false;                    // guarded by mu_: the dispatcher waits on cv_
  std::atomic<bool> stopping_{false};        // stop_, readable without mu_
  std::atomic<int64_t> n_queued_{0};         // mirrors queue_.size() for the spin loop

  std::unique_ptr<TbbState> tbb_;
  std::thread thread_;
};

// The cpus this process may run on (sched_getaffinity), ascending.
std::vector<int> AllowedCpus();

}  // namespace ktx::actors
