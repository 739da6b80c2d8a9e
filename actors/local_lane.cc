#include "actors/local_lane.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "actors/cpu_arena.h"
#include "actors/expert_shard_actor.h"
#include "runtime/base/logging.h"
#include "runtime/models/moe.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;

void CpuRelax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

void FutexWait(std::atomic<int32_t>* word, int32_t expected, Clock::duration timeout) {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(timeout).count();
  timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
  syscall(SYS_futex, reinterpret_cast<int32_t*>(word), FUTEX_WAIT_PRIVATE, expected, &ts, nullptr,
          0);
}

void FutexWakeAll(std::atomic<int32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<int32_t*>(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr,
          nullptr, 0);
}

}  // namespace

struct LocalLane::Counters {
  explicit Counters(size_t n)
      : parts_sent(new std::atomic<int64_t>[n]()),
        entries_sent(new std::atomic<int64_t>[n]()),
        compute_us(new std::atomic<int64_t>[n]()) {}
  std::unique_ptr<std::atomic<int64_t>[]> parts_sent;
  std::unique_ptr<std::atomic<int64_t>[]> entries_sent;
  std::unique_ptr<std::atomic<int64_t>[]> compute_us;
  std::atomic<int64_t> requests{0};
  std::atomic<int64_t> failed_rows{0};
  std::atomic<int64_t> rerouted_parts{0};
  // Hop timings of the calls whose parts all succeeded, summed (ns), taken
  // on the critical part (the one that ended last).
  std::atomic<int64_t> timed_calls{0};
  std::atomic<int64_t> split_ns{0};  // Start: split + submit every part
  std::atomic<int64_t> queue_ns{0};  // every part submitted -> its job starts
  std::atomic<int64_t> job_ns{0};    // the job (RunExpertWork: gather + compute)
  std::atomic<int64_t> wake_ns{0};   // the job ended -> the caller runs again
};

// One request in the lane: its parts, each resolved exactly once (by its
// job, by MarkDown, by the deadline, or by the job's guard when the arena
// drops it). Resolving is a CAS pending -> writing, the write, then
// writing -> done and one decrement of `remaining`; the waiter reads a slot
// only after `remaining` reached 0.
class LocalLane::Call {
 public:
  enum : int { kPending = 0, kWriting = 1, kDone = 2 };
  struct Slot {
    MoePart part;
    std::atomic<int> state{kPending};
    bool ok = false;
    ExpertPartial result;  // when ok
    absl::Status status;   // when not ok
    // Steady-clock ns at which its job started and ended (hop timings).
    std::atomic<int64_t> job_start_ns{0};
    std::atomic<int64_t> job_end_ns{0};
  };
  int64_t start_ns = 0;      // Start() began
  int64_t submitted_ns = 0;  // every part submitted

  Call(std::shared_ptr<LocalLane> lane, MoeWork work, std::vector<MoePart> parts)
      : lane_(std::move(lane)),
        work_(std::move(work)),
        n_slots_(static_cast<int>(parts.size())),
        slots_(new Slot[parts.size()]),
        remaining_(static_cast<int32_t>(parts.size())) {
    for (int i = 0; i < n_slots_; ++i) slots_[i].part = std::move(parts[i]);
    lane_->Register(this);
  }
  ~Call() { lane_->Unregister(this); }

  // Resolves slot i with a partial (Succeed) or a failure (Fail); false
  // when it was already resolved (what came is dropped).
  bool Succeed(int i, ExpertPartial&& result) {
    Slot& slot = slots_[i];
    if (!Claim(slot)) return false;
    slot.ok = true;
    slot.result = std::move(result);
    Publish(slot);
    return true;
  }
  bool Fail(int i, absl::Status status) {
    Slot& slot = slots_[i];
    if (!Claim(slot)) return false;
    slot.ok = false;
    slot.status = std::move(status);
    Publish(slot);
    return true;
  }

  // Until every slot is resolved or `until`; true when all are.
  bool WaitAll(Clock::time_point until, int spin_us) {
    if (remaining_.load(std::memory_order_acquire) == 0) return true;
    if (spin_us > 0) {
      const Clock::time_point spin_until =
          std::min(until, Clock::now() + std::chrono::microseconds(spin_us));
      while (remaining_.load(std::memory_order_acquire) != 0 && Clock::now() < spin_until) {
        CpuRelax();
      }
    }
    for (;;) {
      if (remaining_.load(std::memory_order_acquire) == 0) break;
      const Clock::time_point now = Clock::now();
      if (now >= until) return false;
      sleeping_.store(1);
      const int32_t value = remaining_.load();
      if (value == 0) break;
      FutexWait(&remaining_, value, until - now);
    }
    sleeping_.store(0);
    return true;
  }

  // After every slot resolved: spins out the writers that won their CAS.
  void AwaitWriters() {
    while (remaining_.load(std::memory_order_acquire) != 0) CpuRelax();
  }

  const MoeWork& work() const { return work_; }
  int n_slots() const { return n_slots_; }

 private:
  static bool Claim(Slot& slot) {
    int expected = kPending;
    return slot.state.compare_exchange_strong(expected, kWriting);
  }
  void Publish(Slot& slot) {
    slot.state.store(kDone, std::memory_order_release);
    if (remaining_.fetch_sub(1) == 1 && sleeping_.load() != 0) FutexWakeAll(&remaining_);
  }

 public:
  Slot& slot(int i) { return slots_[i]; }
  LocalLane& lane() { return *lane_; }

 private:
  std::shared_ptr<LocalLane> lane_;
  MoeWork work_;
  int n_slots_;
  std::unique_ptr<Slot[]> slots_;
  std::atomic<int32_t> remaining_;
  std::atomic<int32_t> sleeping_{0};
};

namespace {

// Held by a lane job: whatever happens to the job (it runs, or its arena
// drops it unrun), its part is resolved and its entries leave the load.
struct JobGuard {
  std::shared_ptr<LocalLane::Call> call;
  int slot = 0;
  std::atomic<int64_t>* load = nullptr;
  bool ran = false;
  bool released = false;
  std::string Label() const { return call->lane().Label(call->slot(slot).part.shard); }
  // The part's entries leave the shard's load (before the part resolves, so
  // a woken caller's next split sees it).
  void Release() {
    if (released) return;
    released = true;
    load->fetch_sub(call->slot(slot).part.entries);
  }
  ~JobGuard() {
    Release();
    if (!ran) {
      call->Fail(slot, absl::UnavailableError(absl::StrCat(
                           Label(), " stopped before it computed layer ", call->work().il)));
    }
  }
};

}  // namespace

LocalLane::LocalLane(std::vector<Shard> shards, HolderTable holders, int n_expert,
                     std::chrono::milliseconds shard_deadline)
    : shards_(std::move(shards)),
      holders_(std::move(holders)),
      n_expert_(n_expert),
      shard_deadline_(shard_deadline),
      load_(new std::atomic<int64_t>[shards_.size()]()),
      counters_(std::make_unique<Counters>(shards_.size())),
      alive_(shards_.size(), 1),
      down_reason_(shards_.size()) {
  for (const Shard& s : shards_) names_.push_back(s.name);
  all_alive_.assign(shards_.size(), 1);
  no_reasons_.assign(shards_.size(), "");
}

LocalLane::~LocalLane() {
  const char* env = std::getenv("KTX_LANE_TIMES");
  const int64_t n = counters_->timed_calls.load();
  if (env == nullptr || std::string(env) != "1" || n == 0) return;
  auto us = [n](const std::atomic<int64_t>& ns) {
    return static_cast<double>(ns.load()) / n / 1e3;
  };
  KTX_LOG(INFO, "lane") << "local lane, " << n << " calls, mean us per call: split+submit "
                        << us(counters_->split_ns) << ", submitted->job start "
                        << us(counters_->queue_ns) << ", job " << us(counters_->job_ns)
                        << ", job end->caller awake " << us(counters_->wake_ns);
}

std::shared_ptr<LocalLane> LocalLane::Create(std::vector<Shard> shards, HolderTable holders,
                                             int n_expert,
                                             std::chrono::milliseconds shard_deadline) {
  return std::shared_ptr<LocalLane>(
      new LocalLane(std::move(shards), std::move(holders), n_expert, shard_deadline));
}

void LocalLane::Register(Call* call) {
  std::lock_guard<std::mutex> lock(mu_);
  calls_.insert(call);
}

void LocalLane::Unregister(Call* call) {
  std::lock_guard<std::mutex> lock(mu_);
  calls_.erase(call);
}

void LocalLane::MarkDown(int shard, const std::string& reason) {
  if (shard < 0 || shard >= n_shards()) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (!alive_[shard]) return;
  alive_[shard] = 0;
  down_reason_[shard] = reason;
  n_down_.fetch_add(1);
  const absl::Status status =
      absl::UnavailableError(absl::StrCat(Label(shard), " is down: ", reason));
  // A Call being destroyed waits in Unregister for this lock, so every call
  // in the set is alive here.
  for (Call* call : calls_) {
    for (int i = 0; i < call->n_slots(); ++i) {
      if (call->slot(i).part.shard == shard) call->Fail(i, status);
    }
  }
}

int64_t LocalLane::load(int shard) const {
  return shard >= 0 && shard < n_shards() ? load_[shard].load(std::memory_order_relaxed) : 0;
}

void LocalLane::AddStats(RouterStats* stats) const {
  const size_t n = shards_.size();
  stats->parts_sent.resize(n, 0);
  stats->entries_sent.resize(n, 0);
  stats->compute_us.resize(n, 0);
  for (size_t s = 0; s < n; ++s) {
    stats->parts_sent[s] += counters_->parts_sent[s].load();
    stats->entries_sent[s] += counters_->entries_sent[s].load();
    stats->compute_us[s] += counters_->compute_us[s].load();
  }
  stats->requests += counters_->requests.load();
  stats->failed_rows += counters_->failed_rows.load();
  stats->rerouted_parts += counters_->rerouted_parts.load();
}

std::shared_ptr<LocalLane::Call> LocalLane::Start(MoeWork* taken) {
  const MoeWork& work = *taken;
  // Anything unusual is the router's: a shard down, an invalid request.
  if (n_down_.load() != 0 || closed_.load()) return nullptr;
  if (!ValidateMoeWork(work, holders_, n_expert_).ok()) return nullptr;
  std::vector<int64_t> load(shards_.size());
  for (size_t s = 0; s < shards_.size(); ++s) load[s] = load_[s].load(std::memory_order_relaxed);
  MoeSplit split = SplitMoeWork(work, holders_[work.il], n_expert_,
                                ShardView{all_alive_, load, names_, no_reasons_});
  if (split.code != 0) return nullptr;
  for (const MoePart& part : split.parts) {
    if (shards_[part.shard].experts == nullptr || shards_[part.shard].arena == nullptr) {
      return nullptr;
    }
  }
  const int64_t start_ns = NowNs();
  auto call = std::make_shared<Call>(shared_from_this(), std::move(*taken), std::move(split.parts));
  call->start_ns = start_ns;
  for (int i = 0; i < call->n_slots(); ++i) {
    const MoePart& part = call->slot(i).part;
    const int s = part.shard;
    load_[s].fetch_add(part.entries, std::memory_order_relaxed);
    counters_->parts_sent[s].fetch_add(1, std::memory_order_relaxed);
    counters_->entries_sent[s].fetch_add(part.entries, std::memory_order_relaxed);
    auto guard = std::make_shared<JobGuard>();
    guard->call = call;
    guard->slot = i;
    guard->load = &load_[s];
    shards_[s].arena->Submit([guard, experts = shards_[s].experts,
                              ew = MakeExpertWork(call->work(), part),
                              compute_us = &counters_->compute_us[s]] {
      guard->ran = true;
      Call::Slot& slot = guard->call->slot(guard->slot);
      slot.job_start_ns.store(NowNs(), std::memory_order_relaxed);
      ExpertPartial partial;
      absl::Status status = RunExpertWork(*experts, ew, &partial);
      slot.job_end_ns.store(NowNs(), std::memory_order_relaxed);
      if (status.ok()) {
        compute_us->fetch_add(partial.compute_us, std::memory_order_relaxed);
      } else {
        status = absl::Status(status.code(), absl::StrCat(guard->Label(), " failed layer ", ew.il,
                                                          ": ", status.message()));
      }
      guard->Release();
      if (status.ok()) {
        guard->call->Succeed(guard->slot, std::move(partial));
      } else {
        guard->call->Fail(guard->slot, std::move(status));
      }
    });
  }
  call->submitted_ns = NowNs();
  return call;
}

LocalLane::Outcome LocalLane::Finish(Call& call, int spin_us) {
  const MoeWork& work = call.work();
  const int il = work.il;
  if (!call.WaitAll(Clock::now() + shard_deadline_, spin_us)) {
    for (int i = 0; i < call.n_slots(); ++i) {
      call.Fail(i, absl::DeadlineExceededError(
                       absl::StrCat(Label(call.slot(i).part.shard), " did not answer layer ", il,
                                    " within ", shard_deadline_.count(), " ms")));
    }
  }
  call.AwaitWriters();
  if (call.n_slots() > 0) {
    const int64_t awake_ns = NowNs();
    int critical = -1;
    bool all_ok = true;
    for (int i = 0; i < call.n_slots(); ++i) {
      all_ok = all_ok && call.slot(i).ok;
      if (critical < 0 || call.slot(i).job_end_ns.load(std::memory_order_relaxed) >
                              call.slot(critical).job_end_ns.load(std::memory_order_relaxed)) {
        critical = i;
      }
    }
    if (all_ok) {
      const Call::Slot& c = call.slot(critical);
      const int64_t begin = c.job_start_ns.load(std::memory_order_relaxed);
      const int64_t end = c.job_end_ns.load(std::memory_order_relaxed);
      counters_->timed_calls.fetch_add(1, std::memory_order_relaxed);
      counters_->split_ns.fetch_add(call.submitted_ns - call.start_ns, std::memory_order_relaxed);
      counters_->queue_ns.fetch_add(begin - call.submitted_ns, std::memory_order_relaxed);
      counters_->job_ns.fetch_add(end - begin, std::memory_order_relaxed);
      counters_->wake_ns.fetch_add(awake_ns - end, std::memory_order_relaxed);
    }
  }

  Outcome out;
  out.result.tag = work.tag;
  const int64_t n = work.h.n_rows();
  const int64_t n_embd = work.h.n_cols();
  const int k_used = work.n_expert_used;
  std::vector<uint8_t> row_failed;     // [n] once a part failed without a replica
  std::vector<uint8_t> reroute_entry;  // [n, K] entries for the router
  // The view for replicas (the shards alive now, the lane's load), taken at
  // the first failed part: a call without failures never takes the lock.
  std::vector<uint8_t> alive;
  std::vector<std::string> reasons;
  std::vector<int64_t> load;
  auto view = [&]() -> ShardView {
    if (load.empty()) {
      std::lock_guard<std::mutex> lock(mu_);
      alive = alive_;
      reasons = down_reason_;
      load.resize(shards_.size());
      for (size_t s = 0; s < shards_.size(); ++s)
        load[s] = load_[s].load(std::memory_order_relaxed);
    }
    return ShardView{alive, load, names_, reasons};
  };

  for (int i = 0; i < call.n_slots(); ++i) {
    Call::Slot& slot = call.slot(i);
    const MoePart& part = slot.part;
    if (slot.ok && (slot.result.partial.n_rows() != static_cast<int64_t>(part.rows.size()) ||
                    slot.result.partial.n_cols() != n_embd)) {
      slot.ok = false;
      slot.status = absl::InternalError(absl::StrCat(
          Label(part.shard), " answered layer ", il, " with [", slot.result.partial.n_rows(), ", ",
          slot.result.partial.n_cols(), "], expected [", part.rows.size(), ", ", n_embd, "]"));
    }
    if (slot.ok) {
      PlacedPartial placed;
      placed.shard = part.shard;
      placed.rows = std::move(slot.part.rows);  // the slot is not read again
      placed.partial = std::move(slot.result.partial);
      placed.compute_us = slot.result.compute_us;
      out.result.parts.push_back(std::move(placed));
      continue;
    }
    std::vector<MoePart> replicas;
    if (ReassignToReplicas(work, holders_[il], part, {part.shard}, view(), &replicas)) {
      KTX_LOG(WARNING, "router") << Label(part.shard) << " failed layer " << il << " in the lane ("
                                 << slot.status.message() << "); re-sending " << part.rows.size()
                                 << " rows through the router";
      if (reroute_entry.empty()) reroute_entry.assign(static_cast<size_t>(n * k_used), 0);
      for (int32_t row : part.rows) {
        for (int k = 0; k < k_used; ++k) {
          const size_t at = static_cast<size_t>(row) * k_used + k;
          const int32_t e = work.expert_ids[at];
          if (e != models::kNoExpert && part.mask[e]) reroute_entry[at] = 1;
        }
      }
      counters_->rerouted_parts.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (row_failed.empty()) row_failed.assign(static_cast<size_t>(n), 0);
    for (int32_t row : part.rows) row_failed[row] = 1;
    if (out.result.code == 0) {
      out.result.code = static_cast<int32_t>(slot.status.code());
      out.result.message = std::string(slot.status.message());
    }
  }
  for (int64_t t = 0; t < static_cast<int64_t>(row_failed.size()); ++t) {
    if (row_failed[t]) out.result.failed_rows.push_back(static_cast<int32_t>(t));
  }
  counters_->failed_rows.fetch_add(static_cast<int64_t>(out.result.failed_rows.size()),
                                   std::memory_order_relaxed);
  if (!reroute_entry.empty()) {
    MoeWork reroute;
    reroute.il = il;
    reroute.h = work.h;
    reroute.n_expert_used = k_used;
    reroute.expert_ids = work.expert_ids;
    reroute.weights = work.weights;
    for (size_t at = 0; at < reroute_entry.size(); ++at) {
      if (!reroute_entry[at]) reroute.expert_ids[at] = models::kNoExpert;
    }
    out.reroute = std::move(reroute);
  } else {
    counters_->requests.fetch_add(1, std::memory_order_relaxed);
  }
  return out;
}

MoeResult MergeMoeResults(MoeResult lane, MoeResult router) {
  MoeResult out;
  out.tag = lane.tag;
  out.parts = std::move(lane.parts);
  for (PlacedPartial& p : router.parts) out.parts.push_back(std::move(p));
  std::stable_sort(
      out.parts.begin(), out.parts.end(),
      [](const PlacedPartial& a, const PlacedPartial& b) { return a.shard < b.shard; });
  out.failed_rows = std::move(lane.failed_rows);
  out.failed_rows.insert(out.failed_rows.end(), router.failed_rows.begin(),
                         router.failed_rows.end());
  std::sort(out.failed_rows.begin(), out.failed_rows.end());
  out.failed_rows.erase(std::unique(out.failed_rows.begin(), out.failed_rows.end()),
                        out.failed_rows.end());
  if (lane.code != 0) {
    out.code = lane.code;
    out.message = std::move(lane.message);
  } else {
    out.code = router.code;
    out.message = std::move(router.message);
  }
  return out;
}

}  // namespace ktx::actors
