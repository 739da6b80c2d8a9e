// CpuPool: every task runs once, worker indices are in range and exclusive,
// workers run on their cpus, the caller's affinity is restored, memory comes
// back usable with or without NUMA.
#include "runtime/cpu_pool/cpu_pool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/moe/moe.h"
#include "oneapi/tbb/parallel_for.h"
#include "tests/kernels/cpu/moe/moe_test_util.h"

namespace ktx::runtime {
namespace {

std::vector<int> Allowed() {
  cpu_set_t set;
  CPU_ZERO(&set);
  sched_getaffinity(0, sizeof(set), &set);
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  return cpus;
}

TEST(CpuPoolTest, EveryTaskRunsOnceWithExclusiveWorkers) {
  for (const auto schedule :
       {CpuPool::Options::Schedule::kInOrder, CpuPool::Options::Schedule::kSplit}) {
    auto pool = CpuPool::Create({.schedule = schedule});
    ASSERT_TRUE(pool.ok()) << pool.status();
    const int n = (*pool)->num_workers();
    EXPECT_EQ(n, static_cast<int>(Allowed().size()));
    for (int64_t n_tasks : {0, 1, 7, 1000}) {
      std::vector<std::atomic<int>> hits(n_tasks);
      std::vector<std::atomic<int>> busy(n);
      std::atomic<bool> overlap{false};
      (*pool)->ParallelFor(n_tasks, [&](int64_t task, int worker) {
        ASSERT_GE(worker, 0);
        ASSERT_LT(worker, n);
        if (busy[worker].fetch_add(1) != 0) overlap = true;
        hits[task].fetch_add(1);
        busy[worker].fetch_sub(1);
      });
      for (int64_t t = 0; t < n_tasks; ++t) EXPECT_EQ(hits[t].load(), 1) << t;
      EXPECT_FALSE(overlap.load());
    }
  }
}

// kInOrder: tasks start in about index order (a task's place among the starts
// differs from its index by less than the number of workers, unless its
// worker was preempted between claiming and starting it), so that callers can
// put short tasks last. (oneTBB's halving starts a second worker mid-range.)
TEST(CpuPoolTest, InOrderScheduleStartsTasksInIndexOrder) {
  auto pool = CpuPool::Create({.schedule = CpuPool::Options::Schedule::kInOrder});
  ASSERT_TRUE(pool.ok()) << pool.status();
  const int64_t n_tasks = 2000;
  const int64_t n_workers = (*pool)->num_workers();
  std::vector<int64_t> place(n_tasks, -1);
  std::atomic<int64_t> started{0};
  (*pool)->ParallelFor(n_tasks, [&](int64_t task, int) {
    place[task] = started.fetch_add(1);
    volatile double sink = 0;  // a little work, so that every worker takes part
    for (int i = 0; i < 2000; ++i) sink = sink + std::sqrt(static_cast<double>(i));
  });
  int64_t out_of_order = 0;
  for (int64_t t = 0; t < n_tasks; ++t) {
    ASSERT_GE(place[t], 0) << t;
    if (std::abs(place[t] - t) >= n_workers) ++out_of_order;
  }
  EXPECT_LE(out_of_order, n_tasks / 20);
}

TEST(CpuPoolTest, ScheduleFromTheEnvironment) {
  setenv("KTX_POOL_SCHEDULE", "sideways", 1);
  const absl::StatusOr<std::unique_ptr<CpuPool>> bad = CpuPool::Create({});
  unsetenv("KTX_POOL_SCHEDULE");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("KTX_POOL_SCHEDULE"), std::string::npos);
  EXPECT_NE(bad.status().message().find("sideways"), std::string::npos);
  for (const char* v : {"split", "inorder"}) {
    setenv("KTX_POOL_SCHEDULE", v, 1);
    auto pool = CpuPool::Create({});
    unsetenv("KTX_POOL_SCHEDULE");
    ASSERT_TRUE(pool.ok()) << v << ": " << pool.status();
    std::atomic<int64_t> sum{0};
    (*pool)->ParallelFor(100, [&](int64_t task, int) { sum += task; });
    EXPECT_EQ(sum.load(), 4950) << v;
  }
}

TEST(CpuPoolTest, WorkersRunOnTheirCpusAndTheCallerIsRestored) {
  const std::vector<int> allowed = Allowed();
  const std::vector<int> cpus{allowed.back()};  // one worker: the caller itself
  auto pool = CpuPool::Create({.cpus = cpus});
  ASSERT_TRUE(pool.ok()) << pool.status();
  cpu_set_t before;
  pthread_getaffinity_np(pthread_self(), sizeof(before), &before);
  std::atomic<int> wrong{0};
  (*pool)->ParallelFor(50, [&](int64_t, int worker) {
    if (sched_getcpu() != cpus[worker]) wrong.fetch_add(1);
  });
  EXPECT_EQ(wrong.load(), 0);
  cpu_set_t after;
  pthread_getaffinity_np(pthread_self(), sizeof(after), &after);
  EXPECT_TRUE(CPU_EQUAL(&before, &after));

  if (allowed.size() >= 2) {
    auto pool2 = CpuPool::Create({.cpus = {allowed[0], allowed[1]}});
    ASSERT_TRUE(pool2.ok());
    std::atomic<int> wrong2{0};
    (*pool2)->ParallelFor(200, [&](int64_t, int worker) {
      volatile double s = 0;
      for (int i = 0; i < 20000; ++i) s = s + i;
      if (sched_getcpu() != (*pool2)->cpus()[worker]) wrong2.fetch_add(1);
    });
    EXPECT_EQ(wrong2.load(), 0);
  }
}

// oneTBB's workers are shared by every arena: one that served a pool slot
// must not stay pinned to that slot's cpu when it later works elsewhere (an
// unpinned arena would otherwise crowd such workers onto one cpu), neither
// while the pool lives nor after it is destroyed.
std::set<std::vector<int>> DefaultArenaMasks() {
  std::mutex mu;
  std::set<std::vector<int>> masks;
  tbb::parallel_for(0, 2000, [&](int) {
    volatile double s = 0;
    for (int i = 0; i < 20000; ++i) s = s + i;
    cpu_set_t set;
    pthread_getaffinity_np(pthread_self(), sizeof(set), &set);
    std::vector<int> mask;
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &set)) mask.push_back(c);
    }
    std::lock_guard<std::mutex> lock(mu);
    masks.insert(mask);
  });
  return masks;
}

TEST(CpuPoolTest, WorkersLeaveThePoolWithTheirOwnAffinity) {
  const std::vector<int> allowed = Allowed();
  if (allowed.size() < 2) GTEST_SKIP() << "needs two cpus";
  for (const bool destroy : {false, true}) {
    SCOPED_TRACE(destroy ? "pool destroyed" : "pool alive");
    auto pool = CpuPool::Create({.cpus = {allowed[0], allowed[1]}});
    ASSERT_TRUE(pool.ok());
    // Two tasks that wait for each other (up to 2 s): a oneTBB worker runs one.
    std::atomic<int> started{0};
    std::atomic<int> on_workers{0};
    (*pool)->ParallelFor(2, [&](int64_t, int worker) {
      started.fetch_add(1);
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (started.load() < 2 && std::chrono::steady_clock::now() < until) {
      }
      if (worker > 0) on_workers.fetch_add(1);
    });
    EXPECT_EQ(on_workers.load(), 1);
    if (destroy) {
      const auto t0 = std::chrono::steady_clock::now();
      pool->reset();
      std::printf(
          "[ measured ] pool destroyed in %.2f ms\n",
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    // The same threads in the default arena: every one must have the whole
    // process mask again (the pool's pins were single cpus).
    for (const std::vector<int>& mask : DefaultArenaMasks()) EXPECT_EQ(mask, allowed);
  }
}

TEST(CpuPoolTest, RejectsUnknownAndDuplicateCpus) {
  EXPECT_EQ(CpuPool::Create({.cpus = {100000}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  const int c = Allowed().front();
  EXPECT_FALSE(CpuPool::Create({.cpus = {c, c}}).ok());
}

TEST(CpuPoolTest, AllocatesOnANodeOrFallsBack) {
  for (int node : {-1, 0, 4096}) {
    auto pool = CpuPool::Create({.numa_node = node});
    ASSERT_TRUE(pool.ok());
    NumaBuffer b = (*pool)->Allocate(1 << 20);
    ASSERT_NE(b.data(), nullptr) << node;
    EXPECT_EQ(b.size(), 1u << 20);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % 64, 0u);
    std::memset(b.data(), 1, b.size());
    if (node == 4096 || node == -1) {
      EXPECT_EQ(b.numa_node(), -1);
    }
    NumaBuffer moved = std::move(b);
    EXPECT_EQ(b.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
    EXPECT_NE(moved.data(), nullptr);
  }
}

// The MoE operator run by the pool equals a serial run bitwise.
TEST(CpuPoolTest, RunsAMoeLayerLikeASerialRun) {
  using namespace ktx::kernels;
  using namespace ktx::kernels::moe;
  const MoeShape shape{256, 512, 8, 3};
  const auto L = moe::testing::MakeTestLayer(shape, TensorType::kQ4_K, TensorType::kQ6_K, 9, false);
  const std::vector<bool> owned(8, true);
  auto gate =
      moe::testing::MakeLayout(L.gate, TensorType::kQ4_K, MoeWeightLayout::kGguf, 512, 256, owned);
  auto up =
      moe::testing::MakeLayout(L.up, TensorType::kQ4_K, MoeWeightLayout::kGguf, 512, 256, owned);
  auto down =
      moe::testing::MakeLayout(L.down, TensorType::kQ6_K, MoeWeightLayout::kGguf, 256, 512, owned);
  MoeLayerFormat f;
  f.gate = f.up = {TensorType::kQ4_K, MoeWeightLayout::kGguf};
  f.down = {TensorType::kQ6_K, MoeWeightLayout::kGguf};
  MoeLayerWeights w;
  w.gate = {f.gate, gate.ptrs.data()};
  w.up = {f.up, up.ptrs.data()};
  w.down = {f.down, down.ptrs.data()};
  auto pool = CpuPool::Create({});
  ASSERT_TRUE(pool.ok());
  MoePlanOptions o;
  o.max_tokens = 5;
  o.max_workers = (*pool)->num_workers();
  auto plan = MakeMoePlan(shape, f, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<float> x(5 * 256);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.1f * static_cast<float>(i));
  const std::vector<int32_t> ids{0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 3, 5, 2, 4, 6};
  const std::vector<float> wt(15, 0.25f);
  std::vector<float> a(5 * 256), b(5 * 256);
  NumaBuffer ws = (*pool)->Allocate(MoeWorkspaceSize(*plan));
  auto run =
      MoeRun::Begin(*plan, w, {5, x.data(), ids.data(), wt.data(), a.data()}, ws.data(), ws.size());
  ASSERT_TRUE(run.ok()) << run.status();
  RunMoe(*run, [&](int64_t n, auto&& fn) { (*pool)->ParallelFor(n, fn); });
  auto serial =
      MoeRun::Begin(*plan, w, {5, x.data(), ids.data(), wt.data(), b.data()}, ws.data(), ws.size());
  ASSERT_TRUE(serial.ok());
  for (int s = 0; s < MoeRun::kNumStages; ++s) RunMoeStage(*serial, s, 0, 1);
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4));
  double norm = 0;
  for (float v : a) norm += v * v;
  EXPECT_GT(norm, 0.0);
}

}  // namespace
}  // namespace ktx::runtime
