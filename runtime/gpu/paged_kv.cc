#include "runtime/gpu/paged_kv.h"

#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"

namespace ktx::gpu {

PagedKvAllocator::PagedKvAllocator(int64_t n_pages, int32_t page_size, int32_t max_sequences,
                                   int64_t max_context)
    : n_pages_(n_pages), page_size_(page_size), max_context_(max_context) {
  KTX_CHECK(n_pages >= 0 && page_size > 0 && max_sequences > 0 && max_context > 0);
  max_pages_per_seq_ = static_cast<int32_t>((max_context + page_size - 1) / page_size);
  free_.reserve(static_cast<size_t>(n_pages));
  for (int64_t p = n_pages - 1; p >= 0; --p) free_.push_back(static_cast<int32_t>(p));
  slots_.resize(static_cast<size_t>(max_sequences));
}

absl::Status PagedKvAllocator::Check(int32_t seq) const {
  if (!Has(seq)) return absl::NotFoundError(absl::StrCat("no GPU KV sequence with id ", seq));
  return absl::OkStatus();
}

bool PagedKvAllocator::Has(int32_t seq) const {
  return seq >= 0 && seq < static_cast<int32_t>(slots_.size()) && slots_[seq].used;
}

absl::StatusOr<int32_t> PagedKvAllocator::AddSequence(int64_t capacity_tokens) {
  if (capacity_tokens <= 0 || capacity_tokens > max_context_) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence capacity ", capacity_tokens,
                     " tokens outside [1, max_context = ", max_context_, "]"));
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (!slots_[i].used) {
      slots_[i] = Slot{true, capacity_tokens, 0, {}};
      return static_cast<int32_t>(i);
    }
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("all ", slots_.size(), " GPU sequence slots are in use (max_sequences)"));
}

absl::Status PagedKvAllocator::FreeSequence(int32_t seq) {
  KTX_RETURN_IF_ERROR(Check(seq));
  KTX_RETURN_IF_ERROR(Truncate(seq, 0));
  slots_[seq] = Slot{};
  return absl::OkStatus();
}

int64_t PagedKvAllocator::length(int32_t seq) const {
  KTX_CHECK(Has(seq));
  return slots_[seq].length;
}

int64_t PagedKvAllocator::capacity(int32_t seq) const {
  KTX_CHECK(Has(seq));
  return slots_[seq].capacity;
}

const std::vector<int32_t>& PagedKvAllocator::pages(int32_t seq) const {
  KTX_CHECK(Has(seq));
  return slots_[seq].pages;
}

absl::Status PagedKvAllocator::Reserve(int32_t seq, int64_t n_tokens) {
  KTX_RETURN_IF_ERROR(Check(seq));
  Slot& s = slots_[seq];
  if (n_tokens > s.capacity) {
    return absl::ResourceExhaustedError(absl::StrCat("GPU KV sequence ", seq, " holds at most ",
                                                     s.capacity, " tokens; ", n_tokens,
                                                     " requested (length ", s.length, ")"));
  }
  const int64_t need = (n_tokens + page_size_ - 1) / page_size_;
  const int64_t extra = need - static_cast<int64_t>(s.pages.size());
  if (extra <= 0) return absl::OkStatus();
  if (extra > free_pages()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("GPU KV cache is full: sequence ", seq, " needs ", extra, " more pages of ",
                     page_size_, " tokens, ", free_pages(), " of ", n_pages_, " are free"));
  }
  for (int64_t i = 0; i < extra; ++i) {
    s.pages.push_back(free_.back());
    free_.pop_back();
  }
  return absl::OkStatus();
}

absl::Status PagedKvAllocator::Commit(int32_t seq, int64_t n_new) {
  KTX_RETURN_IF_ERROR(Check(seq));
  Slot& s = slots_[seq];
  if (n_new < 0 || s.length + n_new > static_cast<int64_t>(s.pages.size()) * page_size_ ||
      s.length + n_new > s.capacity) {
    return absl::FailedPreconditionError(absl::StrCat("GPU KV sequence ", seq, ": cannot commit ",
                                                      n_new, " tokens after ", s.length, " with ",
                                                      s.pages.size(), " pages reserved"));
  }
  s.length += n_new;
  return absl::OkStatus();
}

absl::Status PagedKvAllocator::Truncate(int32_t seq, int64_t n_keep) {
  KTX_RETURN_IF_ERROR(Check(seq));
  Slot& s = slots_[seq];
  if (n_keep < 0 || n_keep > s.length) {
    return absl::InvalidArgumentError(absl::StrCat("GPU KV sequence ", seq, ": cannot keep ",
                                                   n_keep, " of ", s.length, " tokens"));
  }
  s.length = n_keep;
  const size_t keep_pages = static_cast<size_t>((n_keep + page_size_ - 1) / page_size_);
  while (s.pages.size() > keep_pages) {
    free_.push_back(s.pages.back());
    s.pages.pop_back();
  }
  return absl::OkStatus();
}

}  // namespace ktx::gpu
