#include "actors/cpu_arena.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "runtime/base/logging.h"
#include "tbb/task_arena.h"
#include "tbb/task_scheduler_observer.h"

namespace ktx::actors {
namespace {

cpu_set_t MakeSet(const std::vector<int>& cpus) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus) CPU_SET(c, &set);
  return set;
}

bool PinCurrentThread(const cpu_set_t& set) {
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

}  // namespace

std::vector<int> AllowedCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) {
    const unsigned n = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned i = 0; i < n; ++i) cpus.push_back(static_cast<int>(i));
    return cpus;
  }
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  return cpus;
}

// Pins oneTBB workers to the arena's cpus while they are inside it.
class PinObserverImpl : public tbb::task_scheduler_observer {
 public:
  PinObserverImpl(tbb::task_arena& arena, const std::vector<int>& cpus, std::string name,
                  std::atomic<bool>* pinned)
      : tbb::task_scheduler_observer(arena),
        set_(MakeSet(cpus)),
        name_(std::move(name)),
        pinned_(pinned) {}

  void on_scheduler_entry(bool is_worker) override {
    if (!is_worker) return;  // the dispatcher pinned itself
    Saved& saved = SavedMask();
    saved.valid = pthread_getaffinity_np(pthread_self(), sizeof(saved.set), &saved.set) == 0;
    if (!PinCurrentThread(set_)) Warn();
  }

  void on_scheduler_exit(bool is_worker) override {
    if (!is_worker) return;
    Saved& saved = SavedMask();
    if (saved.valid) PinCurrentThread(saved.set);
    saved.valid = false;
  }

 private:
  struct Saved {
    cpu_set_t set;
    bool valid = false;
  };
  static Saved& SavedMask() {
    thread_local Saved saved;
    return saved;
  }
  void Warn() {
    if (!warned_.exchange(true)) {
      pinned_->store(false);
      KTX_LOG(WARNING, "actors") << "cpu arena '" << name_
                                 << "': cannot pin a oneTBB worker to its cpus; running unpinned";
    }
  }

  cpu_set_t set_;
  std::string name_;
  std::atomic<bool>* pinned_;
  std::atomic<bool> warned_{false};
};

struct CpuArena::TbbState {
  tbb::task_arena arena;
  std::unique_ptr<PinObserverImpl> observer;
  explicit TbbState(int concurrency) : arena(concurrency, 1) {}
};

absl::StatusOr<std::unique_ptr<CpuArena>> CpuArena::Create(Options options) {
  std::vector<int> cpus = options.cpus;
  const bool pin = !cpus.empty();
  for (int c : cpus) {
    if (c < 0 || c >= CPU_SETSIZE) {
      return absl::InvalidArgumentError(absl::StrCat("cpu arena '", options.name, "': cpu ", c,
                                                     " is outside [0, ", CPU_SETSIZE, ")"));
    }
  }
  std::sort(cpus.begin(), cpus.end());
  if (std::adjacent_find(cpus.begin(), cpus.end()) != cpus.end()) {
    return absl::InvalidArgumentError(absl::StrCat("cpu arena '", options.name, "': cpu ",
                                                   *std::adjacent_find(cpus.begin(), cpus.end()),
                                                   " is listed twice"));
  }
  if (cpus.empty()) cpus = AllowedCpus();
  if (options.spin_us < -1) {
    return absl::InvalidArgumentError(absl::StrCat("cpu arena '", options.name,
                                                   "': spin_us = ", options.spin_us,
                                                   " must be >= 0, or -1 for auto"));
  }
  if (options.spin_us == -1) {
    int auto_us = AllowedCpus().size() >= 8 ? kAutoSpinUs : 0;
    if (const char* env = std::getenv("KTX_ARENA_SPIN_US"); env != nullptr && *env != '\0') {
      if (!absl::SimpleAtoi(env, &auto_us) || auto_us < 0 || auto_us > 100000) {
        return absl::InvalidArgumentError(
            absl::StrCat("KTX_ARENA_SPIN_US='", env,
                         "': expected microseconds in [0, 100000] that an arena's dispatcher "
                         "polls for the next job before it sleeps"));
      }
    }
    options.spin_us = auto_us;
  }
  return std::unique_ptr<CpuArena>(new CpuArena(std::move(options), std::move(cpus), pin));
}

CpuArena::CpuArena(Options options, std::vector<int> cpus, bool pin)
    : options_(std::move(options)), cpus_(std::move(cpus)), pin_(pin) {
  tbb_ = std::make_unique<TbbState>(static_cast<int>(cpus_.size()));
  tbb_->arena.initialize();
  if (pin_) {
    pinned_.store(true);
    tbb_->observer = std::make_unique<PinObserverImpl>(tbb_->arena, cpus_, options_.name, &pinned_);
    tbb_->observer->observe(true);
  }
  thread_ = std::thread([this] { Run(); });
}

CpuArena::~CpuArena() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    stopping_.store(true, std::memory_order_release);
    queue_.clear();
    n_queued_.store(0);
  }
  cv_.notify_all();
  thread_.join();
  if (tbb_->observer) tbb_->observer->observe(false);
  tbb_.reset();
}

void CpuArena::Submit(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return;
    queue_.push_back(std::move(job));
    n_queued_.fetch_add(1, std::memory_order_release);
    if (!sleeping_) return;  // running or spinning: it finds the job without a wake-up
  }
  cv_.notify_one();
}

void CpuArena::Run() {
  // "a:" + the arena's name, as far as the kernel's 15 characters go (top -H, gdb, /proc).
  pthread_setname_np(pthread_self(), absl::StrCat("a:", options_.name).substr(0, 15).c_str());
  if (pin_ && !PinCurrentThread(MakeSet(cpus_))) {
    pinned_.store(false);
    KTX_LOG(WARNING, "actors") << "cpu arena '" << options_.name
                               << "': cannot pin the dispatcher thread to its cpus; running "
                                  "unpinned";
  }
  // The dispatcher enters the task_arena once and drains the queue from
  // inside it: a task_arena::execute per job (attach to a slot, set up a task
  // dispatcher, leave) cost several microseconds on every hand-off.
  tbb_->arena.execute([this] { Drain(); });
}

void CpuArena::Drain() {
  const auto spin = std::chrono::microseconds(options_.spin_us);
  std::deque<std::function<void()>> batch;
  for (;;) {
    if (spin.count() > 0 && n_queued_.load(std::memory_order_acquire) == 0) {
      const auto until = std::chrono::steady_clock::now() + spin;
      while (n_queued_.load(std::memory_order_acquire) == 0 &&
             std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
    }
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (queue_.empty() && !stop_) {
        sleeping_ = true;
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        sleeping_ = false;
      }
      if (stop_) return;
      // Take every queued job at once (one lock per burst, not per job).
      batch.swap(queue_);
      n_queued_.fetch_sub(static_cast<int64_t>(batch.size()), std::memory_order_release);
    }
    while (!batch.empty()) {
      std::function<void()> job = std::move(batch.front());
      batch.pop_front();
      try {
        job();
      } catch (const std::exception& e) {
        KTX_LOG(ERROR, "actors") << "cpu arena '" << options_.name << "': job threw: " << e.what();
      }
      job = nullptr;  // captured state goes before the next job (and before jobs_run counts it)
      jobs_run_.fetch_add(1, std::memory_order_relaxed);
      if (stopping_.load(std::memory_order_acquire)) return;  // drop the rest: destructor semantics
    }
  }
}

}  // namespace ktx::actors
