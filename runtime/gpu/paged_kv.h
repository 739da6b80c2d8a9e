// File: runtime/gpu/paged_kv.h
//
// The bookkeeping of a paged KV cache: a pool of `n_pages` fixed-size pages
// (`page_size` token rows each, in every layer) shared by up to
// `max_sequences` sequences. A sequence is a slot with a capacity, a
// committed length and the list of pages that hold its rows in order (its
// row of the block table that the attention kernel reads). Pages are taken
// from the pool as a sequence grows (Reserve) and given back when it shrinks
// or is freed, so memory follows the tokens actually held, not capacities.
// Host-side only: the device pages and block table live with their owner
// (CudaDeepseek2), which mirrors pages(seq) to the GPU.
//
//   PagedKvAllocator kv(/*n_pages=*/1024, /*page_size=*/64, /*max_sequences=*/8, 4096);
//   KTX_ASSIGN_OR_RETURN(int32_t seq, kv.AddSequence(/*capacity_tokens=*/2048));
//   KTX_RETURN_IF_ERROR(kv.Reserve(seq, kv.length(seq) + n_new));  // pages for the new rows
//   ... write rows, run attention ...
//   KTX_RETURN_IF_ERROR(kv.Commit(seq, n_new));
//
// Not thread-safe: the owner serialises all calls.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ktx::gpu {

class PagedKvAllocator {
 public:
  // max_context: the largest capacity a sequence may ask for (sets the block
  // table's width, max_pages_per_sequence()).
  PagedKvAllocator(int64_t n_pages, int32_t page_size, int32_t max_sequences, int64_t max_context);

  int32_t page_size() const { return page_size_; }
  int64_t n_pages() const { return n_pages_; }
  int64_t free_pages() const { return static_cast<int64_t>(free_.size()); }
  int32_t max_sequences() const { return static_cast<int32_t>(slots_.size()); }
  int64_t max_context() const { return max_context_; }
  int32_t max_pages_per_sequence() const { return max_pages_per_seq_; }

  // A new empty sequence; its id is its slot (block table row). InvalidArgument
  // for a capacity outside [1, max_context]; ResourceExhausted when every slot
  // is taken.
  absl::StatusOr<int32_t> AddSequence(int64_t capacity_tokens);
  // NotFound for an unknown id. Its pages go back to the pool.
  absl::Status FreeSequence(int32_t seq);
  bool Has(int32_t seq) const;

  int64_t length(int32_t seq) const;    // committed tokens (KTX_CHECKs Has)
  int64_t capacity(int32_t seq) const;  // KTX_CHECKs Has
  // The pages holding positions 0 .. reserved-1, in order (KTX_CHECKs Has).
  const std::vector<int32_t>& pages(int32_t seq) const;

  // Makes pages hold positions [0, n_tokens). ResourceExhausted when n_tokens
  // exceeds the sequence's capacity or the pool has too few free pages (the
  // message gives both numbers); nothing changes then.
  absl::Status Reserve(int32_t seq, int64_t n_tokens);
  // length += n_new; the rows must be reserved (FailedPrecondition otherwise).
  absl::Status Commit(int32_t seq, int64_t n_new);
  // Keeps the first n_keep <= length tokens; pages past them return to the pool.
  absl::Status Truncate(int32_t seq, int64_t n_keep);

 private:
  struct Slot {
    bool used = false;
    int64_t capacity = 0;
    int64_t length = 0;
    std::vector<int32_t> pages;
  };
  absl::Status Check(int32_t seq) const;

  int64_t n_pages_;
  int32_t page_size_;
  int64_t max_context_;
  int32_t max_pages_per_seq_;
  std::vector<int32_t> free_;  // a stack; the lowest page id on top
  std::vector<Slot> slots_;
};

}  // namespace ktx::gpu
