#include "runtime/cpu_pool/cpu_pool.h"

#include <numa.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/partitioner.h"
#include "oneapi/tbb/task_arena.h"
#include "oneapi/tbb/task_scheduler_observer.h"
#include "runtime/base/logging.h"

namespace ktx::runtime {
namespace {

std::vector<int> AllowedCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  return cpus;
}

constexpr size_t kHugePage = size_t{2} << 20;

// Large buffers (expert weights, workspaces) are streamed by the kernels:
// transparent huge pages cut TLB misses and let the hardware prefetchers run
// across 4 KiB boundaries. Advisory; failures are ignored.
void AdviseHugePages(void* p, size_t bytes) {
  if (bytes >= 2 * kHugePage) madvise(p, bytes, MADV_HUGEPAGE);
}

bool NumaNodeUsable(int node) {
  return node >= 0 && numa_available() >= 0 && node <= numa_max_node();
}

// Pins threads entering the arena to cpus[slot] and restores their affinity
// when they leave: the caller of execute, and also oneTBB's workers, which
// are shared by every arena of the process (a worker left pinned to one cpu
// would take that pin into the next arena it joins, e.g. an unpinned one,
// where several such workers could crowd one cpu).
class PinningObserver : public tbb::task_scheduler_observer {
 public:
  PinningObserver(tbb::task_arena& arena, std::vector<int> cpus)
      : tbb::task_scheduler_observer(arena), cpus_(std::move(cpus)) {}

  void on_scheduler_entry(bool /*is_worker*/) override {
    inside_.fetch_add(1);
    const int slot = tbb::this_task_arena::current_thread_index();
    if (slot < 0 || slot >= static_cast<int>(cpus_.size())) return;
    saved_valid_ = pthread_getaffinity_np(pthread_self(), sizeof(saved_), &saved_) == 0;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpus_[slot], &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0 && !warned_.exchange(true)) {
      KTX_LOG(WARNING, "cpu_pool") << "could not pin a worker to cpu " << cpus_[slot];
    }
  }

  void on_scheduler_exit(bool /*is_worker*/) override {
    if (saved_valid_) {
      pthread_setaffinity_np(pthread_self(), sizeof(saved_), &saved_);
      saved_valid_ = false;
    }
    inside_.fetch_sub(1);
  }

  // Threads inside the arena now (entered, not yet left).
  int inside() const { return inside_.load(); }

 private:
  std::vector<int> cpus_;
  std::atomic<bool> warned_{false};
  std::atomic<int> inside_{0};
  // The thread's affinity before it entered (a thread is in one pool's arena
  // at a time).
  static thread_local cpu_set_t saved_;
  static thread_local bool saved_valid_;
};

thread_local cpu_set_t PinningObserver::saved_;
thread_local bool PinningObserver::saved_valid_ = false;

}  // namespace

struct CpuPool::Impl {
  tbb::task_arena arena;
  std::unique_ptr<PinningObserver> observer;
};

NumaBuffer::~NumaBuffer() { Release(); }

NumaBuffer::NumaBuffer(NumaBuffer&& other) noexcept
    : data_(other.data_), size_(other.size_), node_(other.node_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

NumaBuffer& NumaBuffer::operator=(NumaBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    data_ = other.data_;
    size_ = other.size_;
    node_ = other.node_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

void NumaBuffer::Release() {
  if (data_ == nullptr) return;
  if (node_ >= 0) {
    numa_free(data_, size_);
  } else {
    std::free(data_);
  }
  data_ = nullptr;
  size_ = 0;
}

absl::StatusOr<std::unique_ptr<CpuPool>> CpuPool::Create(const Options& options) {
  const std::vector<int> allowed = AllowedCpus();
  std::vector<int> cpus = options.cpus.empty() ? allowed : options.cpus;
  if (cpus.empty()) return absl::InvalidArgumentError("CpuPool: no cpu to run on");
  std::set<int> seen;
  for (int c : cpus) {
    if (std::find(allowed.begin(), allowed.end(), c) == allowed.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("CpuPool: cpu ", c, " is not in this process's affinity mask"));
    }
    if (!seen.insert(c).second) {
      return absl::InvalidArgumentError(absl::StrCat("CpuPool: cpu ", c, " is listed twice"));
    }
  }
  if (options.numa_node >= 0 && !NumaNodeUsable(options.numa_node)) {
    KTX_LOG(WARNING, "cpu_pool") << "NUMA node " << options.numa_node
                                 << " is not available (numa_available " << numa_available()
                                 << "); allocating plain memory";
  }
  Options::Schedule schedule = options.schedule;
  if (const char* env = std::getenv("KTX_POOL_SCHEDULE"); env != nullptr && *env != '\0') {
    const std::string v = env;
    if (v == "inorder") {
      schedule = Options::Schedule::kInOrder;
    } else if (v == "split") {
      schedule = Options::Schedule::kSplit;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("KTX_POOL_SCHEDULE: '", v, "' is neither inorder nor split"));
    }
  }
  return std::unique_ptr<CpuPool>(new CpuPool(std::move(cpus), options, schedule));
}

CpuPool::CpuPool(std::vector<int> cpus, const Options& options, Options::Schedule schedule)
    : cpus_(std::move(cpus)),
      numa_node_(options.numa_node),
      schedule_(schedule),
      impl_(std::make_unique<Impl>()) {
  // One slot reserved for the thread that calls ParallelFor (worker 0).
  impl_->arena.initialize(static_cast<int>(cpus_.size()), 1);
  if (options.pin) {
    impl_->observer = std::make_unique<PinningObserver>(impl_->arena, cpus_);
    impl_->observer->observe(true);
  }
}

CpuPool::~CpuPool() {
  if (impl_->observer) {
    // Workers linger in an idle arena for a short while; once the observer
    // stops observing they would leave without their exit callback, i.e.
    // still pinned to this pool's cpus. Wait (briefly) until they are gone.
    const auto start = std::chrono::steady_clock::now();
    while (impl_->observer->inside() > 0 &&
           std::chrono::steady_clock::now() - start < std::chrono::seconds(1)) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    impl_->observer->observe(false);
  }
  impl_->arena.terminate();
}

void CpuPool::ParallelFor(int64_t n_tasks, absl::FunctionRef<void(int64_t task, int worker)> fn) {
  if (n_tasks <= 0) return;
  if (schedule_ == Options::Schedule::kInOrder) {
    // One claiming loop per worker slot, each draining the counter (a loop
    // that starts after it ran out returns at once).
    std::atomic<int64_t> next{0};
    const int64_t n_loops = std::min<int64_t>(n_tasks, num_workers());
    impl_->arena.execute([&] {
      tbb::parallel_for(
          tbb::blocked_range<int64_t>(0, n_loops, 1),
          [&](const tbb::blocked_range<int64_t>&) {
            const int worker = tbb::this_task_arena::current_thread_index();
            for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n_tasks;
                 t = next.fetch_add(1, std::memory_order_relaxed)) {
              fn(t, worker);
            }
          },
          tbb::simple_partitioner());
    });
    return;
  }
  impl_->arena.execute([&] {
    tbb::parallel_for(
        tbb::blocked_range<int64_t>(0, n_tasks, 1),
        [&](const tbb::blocked_range<int64_t>& r) {
          const int worker = tbb::this_task_arena::current_thread_index();
          for (int64_t t = r.begin(); t < r.end(); ++t) fn(t, worker);
        },
        tbb::simple_partitioner());
  });
}

NumaBuffer CpuPool::Allocate(size_t bytes) const {
  NumaBuffer b;
  if (bytes == 0) return b;
  if (NumaNodeUsable(numa_node_)) {
    b.data_ = numa_alloc_onnode(bytes, numa_node_);
    if (b.data_ != nullptr) {
      AdviseHugePages(b.data_, bytes);
      b.size_ = bytes;
      b.node_ = numa_node_;
      return b;
    }
    KTX_LOG(WARNING, "cpu_pool") << "numa_alloc_onnode(" << bytes << ", " << numa_node_
                                 << ") failed; allocating plain memory";
  }
  const size_t align = bytes >= 2 * kHugePage ? kHugePage : 64;
  b.data_ = std::aligned_alloc(align, (bytes + align - 1) / align * align);
  if (b.data_ != nullptr) AdviseHugePages(b.data_, bytes);
  b.size_ = b.data_ != nullptr ? bytes : 0;
  b.node_ = -1;
  return b;
}

}  // namespace ktx::runtime
