// File: runtime/kv_cache/latent_kv_cache.h
//
// The KV cache of MLA models (DeepSeek-V2/V3, llama.cpp arch `deepseek2`) in
// the absorbed form: per token and per layer it holds ONE row of
// `kv_lora_rank + n_rot` floats, the RMS-normalised latent c followed by the
// roped shared key part k_pe (576 floats for DeepSeek-V3: 512 + 64). Keys and
// values of every head are recomputed from c by the attention stage, so nothing
// else is stored (see docs/model.md, "MLA in the absorbed form").
//
//   KTX_ASSIGN_OR_RETURN(LatentKvCache cache, LatentKvCache::Create(layout, 1 << 30));
//   KTX_ASSIGN_OR_RETURN(SequenceId seq, cache.AddSequence(/*capacity_tokens=*/4096));
//   SequenceKv* kv = cache.Find(seq);
//   KTX_RETURN_IF_ERROR(kv->CheckRoom(n_new));     // before writing rows
//   ... write kv->Row(il, kv->length() + t) for every layer and new token ...
//   KTX_RETURN_IF_ERROR(kv->Commit(n_new));        // the rows now count
//   KTX_RETURN_IF_ERROR(kv->Truncate(n_keep));     // rollback (e.g. rejected drafts)
//   KTX_RETURN_IF_ERROR(cache.FreeSequence(seq));
//
// Reference dtype: F32. The storage of one sequence is one block,
// F32 [n_layer][capacity][kv_lora_rank + n_rot], allocated when the sequence is
// added (pages are touched on first write) and released when it is freed.
#pragma once

#include <cstdint>
#include <map>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ktx::kv_cache {

// The row geometry of one model's latent cache.
struct LatentKvLayout {
  int32_t n_layer = 0;
  int64_t kv_lora_rank = 0;  // width of the normalised latent c
  int64_t n_rot = 0;         // width of the roped shared key k_pe

  int64_t row_width() const { return kv_lora_rank + n_rot; }
  // Bytes one token occupies over all layers (F32).
  uint64_t bytes_per_token() const {
    return static_cast<uint64_t>(n_layer) * static_cast<uint64_t>(row_width()) * sizeof(float);
  }
  // InvalidArgument unless every extent is positive.
  absl::Status Validate() const;
};

using SequenceId = int64_t;

// The cached rows of one sequence: F32 [n_layer][capacity][row_width].
// Rows 0..length()-1 of every layer are committed; rows beyond may be written
// by a forward pass in progress and count only after Commit().
// Owns its storage. Not thread-safe for mutation (Commit/Truncate/Clear); the
// rows may be written concurrently at distinct (layer, position) pairs.
class SequenceKv {
 public:
  // A sequence of `capacity` tokens (> 0); ResourceExhausted when the memory
  // cannot be allocated, InvalidArgument for a bad layout or capacity.
  static absl::StatusOr<std::unique_ptr<SequenceKv>> Create(const LatentKvLayout& layout,
                                                            int64_t capacity);
  SequenceKv(const SequenceKv&) = delete;
  SequenceKv& operator=(const SequenceKv&) = delete;

  const LatentKvLayout& layout() const { return layout_; }
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  uint64_t bytes() const { return static_cast<uint64_t>(capacity_) * layout_.bytes_per_token(); }

  // Row `pos` of layer `il`: F32 [row_width] = [c (kv_lora_rank) | k_pe (n_rot)].
  // KTX_CHECKs 0 <= il < n_layer and 0 <= pos < capacity.
  float* Row(int il, int64_t pos);
  const float* Row(int il, int64_t pos) const;

  // OK when `n_new` more tokens fit after length(); ResourceExhausted naming
  // the capacity, the length and the request otherwise.
  absl::Status CheckRoom(int64_t n_new) const;
  // Makes the next `n_new` rows (already written) part of the sequence.
  absl::Status Commit(int64_t n_new);
  // Rollback: keeps the first `n_keep` tokens (n_keep <= length()).
  absl::Status Truncate(int64_t n_keep);
  void Clear() { length_ = 0; }

 private:
  SequenceKv(const LatentKvLayout& layout, int64_t capacity, std::unique_ptr<float[]> rows)
      : layout_(layout), capacity_(capacity), rows_(std::move(rows)) {}

  LatentKvLayout layout_;
  int64_t capacity_ = 0;
  int64_t length_ = 0;
  std::unique_ptr<float[]> rows_;  // F32 [n_layer][capacity][row_width]
};

// A pool of sequences under a byte budget. Sequences are created with a fixed
// capacity in tokens; creating one that would exceed the budget fails with a
// message giving the budget, what is in use and what was asked for.
// Owns the sequences. Not thread-safe: the owner (an engine or an actor)
// serialises AddSequence/FreeSequence/Find.
class LatentKvCache {
 public:
  static absl::StatusOr<LatentKvCache> Create(const LatentKvLayout& layout, uint64_t budget_bytes);

  LatentKvCache(LatentKvCache&&) = default;
  LatentKvCache& operator=(LatentKvCache&&) = default;

  const LatentKvLayout& layout() const { return layout_; }
  uint64_t budget_bytes() const { return budget_bytes_; }
  uint64_t used_bytes() const { return used_bytes_; }
  // Tokens that still fit into the budget for a new sequence.
  int64_t free_tokens() const {
    return static_cast<int64_t>((budget_bytes_ - used_bytes_) / layout_.bytes_per_token());
  }

  // A new empty sequence that can hold `capacity_tokens` tokens.
  absl::StatusOr<SequenceId> AddSequence(int64_t capacity_tokens);
  // NotFound for an unknown id.
  absl::Status FreeSequence(SequenceId id);
  // nullptr for an unknown id.
  SequenceKv* Find(SequenceId id);
  int64_t n_sequences() const { return static_cast<int64_t>(sequences_.size()); }

 private:
  LatentKvCache(const LatentKvLayout& layout, uint64_t budget_bytes)
      : layout_(layout), budget_bytes_(budget_bytes) {}

  LatentKvLayout layout_;
  uint64_t budget_bytes_ = 0;
  uint64_t used_bytes_ = 0;
  SequenceId next_id_ = 0;
  std::map<SequenceId, std::unique_ptr<SequenceKv>> sequences_;
};

}  // namespace ktx::kv_cache
