// File: runtime/gpu/cuda_graphs.h
//
// CudaGraphCache: CUDA graphs of the GPU work between two host hand-offs of a
// forward step (issue #7, docs/gpu.md "CUDA graphs"), keyed by what the
// launches depend on. A key's first use runs eagerly (lazy module loading,
// cuBLAS's first-call set-up and one-off shapes stay out of graphs); its
// second use captures the launches (stream capture, thread-local mode) and
// replays them; later uses replay. A capture that fails (a launch that cannot
// be captured) leaves the key eager for good and is counted, never fatal:
// the work then runs eagerly in the same call.
//
// What a replay repeats is exactly the captured launches with the captured
// arguments: the caller's enqueue function must depend only on the key and on
// device memory whose addresses do not change between calls (work buffers,
// weights, the KV cache pages and the block table, pinned staging buffers).
//
// Owns: the instantiated graphs (cudaGraphExec_t), at most `capacity`,
// least recently used evicted first. Thread-compatible: one caller at a time
// (the model's forward pass), on the stream that every call of a key uses.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"

namespace ktx::gpu {

struct GraphKey {
  int32_t segment = 0;     // which hand-off-free part of the step (caller's numbering)
  int32_t il = 0;          // layer index
  int64_t n_tokens = 0;    // tokens of the batch
  int64_t max_kv_len = 0;  // the attention plan's context bound (bucketed by the caller)
  int64_t variant = 0;     // anything else the launches depend on (e.g. the GEMV threshold)
  bool operator==(const GraphKey&) const = default;
};

struct GraphKeyHash {
  size_t operator()(const GraphKey& k) const;
};

class CudaGraphCache {
 public:
  explicit CudaGraphCache(size_t capacity);
  ~CudaGraphCache();
  CudaGraphCache(const CudaGraphCache&) = delete;
  CudaGraphCache& operator=(const CudaGraphCache&) = delete;

  // Runs `enqueue` (launches on `stream`, nothing synchronous) as described
  // above. `counters`: host counters that `enqueue` increments (e.g. products
  // by path); a replay adds what the captured call added, so that they count
  // work done whichever way it ran. Errors: those of `enqueue` when it runs
  // eagerly, or of the graph launch.
  absl::Status Run(const GraphKey& key, cudaStream_t stream,
                   absl::FunctionRef<absl::Status()> enqueue,
                   std::span<int64_t* const> counters = {});

  struct Stats {
    int64_t eager = 0;      // calls that ran eagerly (first use, or uncapturable)
    int64_t captures = 0;   // graphs captured and instantiated
    int64_t replays = 0;    // graph launches (including the one right after a capture)
    int64_t failures = 0;   // captures that failed (the key stays eager)
    int64_t evictions = 0;  // graphs destroyed to stay within the capacity
    size_t graphs = 0;      // graphs held now
  };
  Stats stats() const;
  // Destroys every graph and forgets every key (e.g. after the weights or the
  // buffers behind captured addresses changed).
  void Clear();

 private:
  struct Entry {
    int uses = 0;
    bool uncapturable = false;
    cudaGraphExec_t exec = nullptr;
    std::vector<int64_t> counter_deltas;
    std::list<GraphKey>::iterator lru;  // valid when exec != nullptr
  };
  void Touch(Entry& e, const GraphKey& key);
  void EvictIfFull();

  size_t capacity_;
  std::unordered_map<GraphKey, Entry, GraphKeyHash> entries_;
  std::list<GraphKey> lru_;  // keys with a graph, most recent first
  Stats stats_;
};

}  // namespace ktx::gpu
