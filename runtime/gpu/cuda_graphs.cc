#include "runtime/gpu/cuda_graphs.h"

#include <iterator>

#include "absl/strings/str_cat.h"

namespace ktx::gpu {

size_t GraphKeyHash::operator()(const GraphKey& k) const {
  uint64_t h = 0x9e3779b97f4a7c15ull;
  auto mix = [&h](uint64_t v) { h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
  mix(static_cast<uint32_t>(k.segment));
  mix(static_cast<uint32_t>(k.il));
  mix(static_cast<uint64_t>(k.n_tokens));
  mix(static_cast<uint64_t>(k.max_kv_len));
  mix(static_cast<uint64_t>(k.variant));
  return static_cast<size_t>(h);
}

CudaGraphCache::CudaGraphCache(size_t capacity) : capacity_(capacity > 0 ? capacity : 1) {}

CudaGraphCache::~CudaGraphCache() { Clear(); }

void CudaGraphCache::Clear() {
  for (auto& [key, e] : entries_) {
    if (e.exec != nullptr) cudaGraphExecDestroy(e.exec);
  }
  entries_.clear();
  lru_.clear();
  stats_.graphs = 0;
}

CudaGraphCache::Stats CudaGraphCache::stats() const { return stats_; }

void CudaGraphCache::Touch(Entry& e, const GraphKey& key) {
  if (e.exec == nullptr) return;
  lru_.erase(e.lru);
  lru_.push_front(key);
  e.lru = lru_.begin();
}

void CudaGraphCache::EvictIfFull() {
  while (stats_.graphs >= capacity_ && !lru_.empty()) {
    auto it = entries_.find(lru_.back());
    lru_.pop_back();
    if (it != entries_.end()) {
      if (it->second.exec != nullptr) cudaGraphExecDestroy(it->second.exec);
      entries_.erase(it);  // forgotten: a later use starts again with one eager run
      --stats_.graphs;
      ++stats_.evictions;
    }
  }
}

absl::Status CudaGraphCache::Run(const GraphKey& key, cudaStream_t stream,
                                 absl::FunctionRef<absl::Status()> enqueue,
                                 std::span<int64_t* const> counters) {
  if (entries_.size() >= 8 * capacity_ && entries_.find(key) == entries_.end()) {
    // Keys seen without a graph (one eager use, or uncapturable) are forgotten
    // in bulk so that the map stays bounded.
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.exec == nullptr ? entries_.erase(it) : std::next(it);
    }
  }
  Entry& e = entries_[key];
  if (e.exec != nullptr) {
    Touch(e, key);
    const cudaError_t err = cudaGraphLaunch(e.exec, stream);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return absl::InternalError(absl::StrCat("replaying a CUDA graph (layer ", key.il,
                                              ", segment ", key.segment, ", ", key.n_tokens,
                                              " tokens): ", cudaGetErrorString(err)));
    }
    for (size_t i = 0; i < counters.size() && i < e.counter_deltas.size(); ++i) {
      *counters[i] += e.counter_deltas[i];
    }
    ++stats_.replays;
    return absl::OkStatus();
  }
  ++e.uses;
  if (e.uses < 2 || e.uncapturable) {
    ++stats_.eager;
    return enqueue();
  }
  // Second use: capture. The counters' increments during the capture are what
  // every replay adds.
  std::vector<int64_t> before(counters.size());
  for (size_t i = 0; i < counters.size(); ++i) before[i] = *counters[i];
  cudaError_t err = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
  if (err != cudaSuccess) {
    cudaGetLastError();
    e.uncapturable = true;
    ++stats_.failures;
    ++stats_.eager;
    return enqueue();
  }
  const absl::Status enqueued = enqueue();
  cudaGraph_t graph = nullptr;
  err = cudaStreamEndCapture(stream, &graph);
  cudaGraphExec_t exec = nullptr;
  if (enqueued.ok() && err == cudaSuccess && graph != nullptr) {
    err = cudaGraphInstantiate(&exec, graph, 0);
  }
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (!enqueued.ok() || err != cudaSuccess || exec == nullptr) {
    // Nothing of the failed capture ran: run the work eagerly now, and keep
    // this key eager (the counters' capture-time increments are undone).
    cudaGetLastError();
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    for (size_t i = 0; i < counters.size(); ++i) *counters[i] = before[i];
    e.uncapturable = true;
    ++stats_.failures;
    ++stats_.eager;
    return enqueue();
  }
  EvictIfFull();
  Entry& held = entries_[key];  // EvictIfFull never removes this key (it has no graph yet)
  held.exec = exec;
  held.counter_deltas.resize(counters.size());
  for (size_t i = 0; i < counters.size(); ++i) held.counter_deltas[i] = *counters[i] - before[i];
  lru_.push_front(key);
  held.lru = lru_.begin();
  ++stats_.graphs;
  ++stats_.captures;
  err = cudaGraphLaunch(exec, stream);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(absl::StrCat("launching a new CUDA graph (layer ", key.il,
                                            ", segment ", key.segment,
                                            "): ", cudaGetErrorString(err)));
  }
  ++stats_.replays;
  return absl::OkStatus();
}

}  // namespace ktx::gpu
