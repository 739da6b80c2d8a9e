#include "runtime/kv_cache/latent_kv_cache.h"

#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"

namespace ktx::kv_cache {

absl::Status LatentKvLayout::Validate() const {
  if (n_layer <= 0 || kv_lora_rank <= 0 || n_rot <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("latent KV layout needs positive extents, got n_layer = ", n_layer,
                     ", kv_lora_rank = ", kv_lora_rank, ", n_rot = ", n_rot));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SequenceKv>> SequenceKv::Create(const LatentKvLayout& layout,
                                                               int64_t capacity) {
  KTX_RETURN_IF_ERROR(layout.Validate());
  if (capacity <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache sequence capacity must be positive, got ", capacity, " tokens"));
  }
  constexpr uint64_t kMaxBytes = uint64_t{1} << 50;  // far above any machine
  if (static_cast<uint64_t>(capacity) > kMaxBytes / layout.bytes_per_token()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache sequence of ", capacity,
                                                     " tokens x ", layout.bytes_per_token(),
                                                     " bytes per token is too large"));
  }
  const uint64_t n_floats = static_cast<uint64_t>(capacity) * layout.bytes_per_token() / 4;
  // Uninitialised on purpose: pages are touched only when rows are written.
  std::unique_ptr<float[]> rows(new (std::nothrow) float[n_floats]);
  if (rows == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate a KV cache of ", capacity,
                                                     " tokens (", n_floats * sizeof(float),
                                                     " bytes)"));
  }
  return std::unique_ptr<SequenceKv>(new SequenceKv(layout, capacity, std::move(rows)));
}

float* SequenceKv::Row(int il, int64_t pos) {
  KTX_CHECK(il >= 0 && il < layout_.n_layer);
  KTX_CHECK(pos >= 0 && pos < capacity_);
  return rows_.get() + (static_cast<int64_t>(il) * capacity_ + pos) * layout_.row_width();
}

const float* SequenceKv::Row(int il, int64_t pos) const {
  return const_cast<SequenceKv*>(this)->Row(il, pos);
}

absl::Status SequenceKv::CheckRoom(int64_t n_new) const {
  if (n_new < 0) {
    return absl::InvalidArgumentError(absl::StrCat("negative token count ", n_new));
  }
  if (n_new > capacity_ - length_) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache full: capacity ", capacity_,
                                                     " tokens, ", length_, " in use, ", n_new,
                                                     " more requested"));
  }
  return absl::OkStatus();
}

absl::Status SequenceKv::Commit(int64_t n_new) {
  KTX_RETURN_IF_ERROR(CheckRoom(n_new));
  length_ += n_new;
  return absl::OkStatus();
}

absl::Status SequenceKv::Truncate(int64_t n_keep) {
  if (n_keep < 0 || n_keep > length_) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot truncate a KV cache sequence of ", length_, " tokens to ", n_keep));
  }
  length_ = n_keep;
  return absl::OkStatus();
}

absl::StatusOr<LatentKvCache> LatentKvCache::Create(const LatentKvLayout& layout,
                                                    uint64_t budget_bytes) {
  KTX_RETURN_IF_ERROR(layout.Validate());
  if (budget_bytes < layout.bytes_per_token()) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache budget of ", budget_bytes, " bytes is below one token (",
                     layout.bytes_per_token(), " bytes: ", layout.n_layer, " layers x ",
                     layout.row_width(), " floats)"));
  }
  return LatentKvCache(layout, budget_bytes);
}

absl::StatusOr<SequenceId> LatentKvCache::AddSequence(int64_t capacity_tokens) {
  if (capacity_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache sequence capacity must be positive, got ", capacity_tokens));
  }
  if (capacity_tokens > free_tokens()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache budget exhausted: ", budget_bytes_, " bytes, ", used_bytes_,
                     " in use; a sequence of ", capacity_tokens, " tokens needs ",
                     static_cast<uint64_t>(capacity_tokens) * layout_.bytes_per_token(), " bytes (",
                     free_tokens(), " tokens still fit)"));
  }
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<SequenceKv> seq,
                       SequenceKv::Create(layout_, capacity_tokens));
  used_bytes_ += seq->bytes();
  const SequenceId id = next_id_++;
  sequences_.emplace(id, std::move(seq));
  return id;
}

absl::Status LatentKvCache::FreeSequence(SequenceId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("no KV cache sequence with id ", id));
  }
  used_bytes_ -= it->second->bytes();
  sequences_.erase(it);
  return absl::OkStatus();
}

SequenceKv* LatentKvCache::Find(SequenceId id) {
  auto it = sequences_.find(id);
  return it == sequences_.end() ? nullptr : it->second.get();
}

}  // namespace ktx::kv_cache
