#include "actors/cpu_arena.h"

#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <future>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"

namespace ktx::actors {
namespace {

TEST(CpuArenaTest, RunsJobsInOrderOffTheCallingThread) {
  auto arena = CpuArena::Create({"test", {}, 0});
  ASSERT_TRUE(arena.ok()) << arena.status();
  std::mutex mu;
  std::vector<int> order;
  std::set<std::thread::id> threads;
  std::promise<void> done;
  for (int i = 0; i < 100; ++i) {
    (*arena)->Submit([&, i] {
      std::lock_guard<std::mutex> lock(mu);
      order.push_back(i);
      threads.insert(std::this_thread::get_id());
      if (i == 99) done.set_value();
    });
  }
  ASSERT_EQ(done.get_future().wait_for(std::chrono::seconds(10)), std::future_status::ready);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(order[i], i);
  EXPECT_EQ(threads.size(), 1u);  // the dispatcher
  EXPECT_EQ(threads.count(std::this_thread::get_id()), 0u);
  // jobs_run counts a job once it has returned: after one more job, all 100 have.
  std::promise<void> fence;
  (*arena)->Submit([&] { fence.set_value(); });
  fence.get_future().wait();
  EXPECT_GE((*arena)->jobs_run(), 100);
}

TEST(CpuArenaTest, JobsRunInsideTheArenaWithItsConcurrency) {
  const std::vector<int> cpus = AllowedCpus();
  ASSERT_FALSE(cpus.empty());
  auto arena = CpuArena::Create({"test", {cpus[0]}, 0});
  ASSERT_TRUE(arena.ok()) << arena.status();
  EXPECT_EQ((*arena)->concurrency(), 1);
  std::promise<int> concurrency;
  std::promise<int> cpu;
  (*arena)->Submit([&] {
    concurrency.set_value(tbb::this_task_arena::max_concurrency());
    cpu.set_value(sched_getcpu());
  });
  EXPECT_EQ(concurrency.get_future().get(), 1);
  const int ran_on = cpu.get_future().get();
  if ((*arena)->pinned()) {
    EXPECT_EQ(ran_on, cpus[0]);
  }
}

TEST(CpuArenaTest, ParallelLoopsStayOnTheArenaCpus) {
  const std::vector<int> cpus = AllowedCpus();
  if (cpus.size() < 2) GTEST_SKIP() << "needs two cpus";
  const std::vector<int> mine = {cpus[1]};
  auto arena = CpuArena::Create({"test", mine, 0});
  ASSERT_TRUE(arena.ok());
  std::promise<std::set<int>> seen;
  (*arena)->Submit([&] {
    std::mutex mu;
    std::set<int> on;
    tbb::parallel_for(0, 1000, [&](int) {
      std::lock_guard<std::mutex> lock(mu);
      on.insert(sched_getcpu());
    });
    seen.set_value(on);
  });
  const std::set<int> on = seen.get_future().get();
  if ((*arena)->pinned()) {
    EXPECT_EQ(on, std::set<int>(mine.begin(), mine.end()));
  }
}

TEST(CpuArenaTest, RejectsBadCpuLists) {
  auto negative = CpuArena::Create({"bad", {-1}, 0});
  ASSERT_FALSE(negative.ok());
  EXPECT_NE(negative.status().message().find("'bad'"), std::string::npos);
  auto twice = CpuArena::Create({"bad", {0, 0}, 0});
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.status().message().find("twice"), std::string::npos);
  auto spin = CpuArena::Create({"bad", {}, -5});
  EXPECT_FALSE(spin.ok());
}

// spin_us -1 is auto: kAutoSpinUs with 8 or more cpus, else 0;
// KTX_ARENA_SPIN_US sets what auto means (and a bad value is an error naming it).
TEST(CpuArenaTest, AutoSpinFollowsTheMachineAndTheEnvironment) {
  unsetenv("KTX_ARENA_SPIN_US");
  auto automatic = CpuArena::Create({"auto", {}, -1});
  ASSERT_TRUE(automatic.ok()) << automatic.status();
  EXPECT_EQ((*automatic)->spin_us(), AllowedCpus().size() >= 8 ? CpuArena::kAutoSpinUs : 0);
  auto given = CpuArena::Create({"given", {}, 7});
  ASSERT_TRUE(given.ok());
  EXPECT_EQ((*given)->spin_us(), 7);
  setenv("KTX_ARENA_SPIN_US", "250", 1);
  auto from_env = CpuArena::Create({"env", {}, -1});
  ASSERT_TRUE(from_env.ok()) << from_env.status();
  EXPECT_EQ((*from_env)->spin_us(), 250);
  auto explicit_wins = CpuArena::Create({"env", {}, 0});
  ASSERT_TRUE(explicit_wins.ok());
  EXPECT_EQ((*explicit_wins)->spin_us(), 0);
  setenv("KTX_ARENA_SPIN_US", "lots", 1);
  auto bad = CpuArena::Create({"env", {}, -1});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("KTX_ARENA_SPIN_US='lots'"), std::string::npos)
      << bad.status();
  unsetenv("KTX_ARENA_SPIN_US");
}

TEST(CpuArenaTest, DestructionDropsQueuedJobsAndWaitsForTheRunningOne) {
  std::atomic<int> ran{0};
  std::promise<void> started;
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  {
    auto arena = CpuArena::Create({"test", {}, 100});
    ASSERT_TRUE(arena.ok());
    (*arena)->Submit([&] {
      started.set_value();
      released.wait();
      ran++;
    });
    for (int i = 0; i < 10; ++i) (*arena)->Submit([&] { ran++; });
    started.get_future().wait();
    std::thread releaser([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      release.set_value();
    });
    arena->reset();  // joins after the running job
    releaser.join();
  }
  EXPECT_EQ(ran.load(), 1);
}

}  // namespace
}  // namespace ktx::actors
