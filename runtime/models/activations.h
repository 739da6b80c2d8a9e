// File: runtime/models/activations.h
//
// The activation buffer that flows between model stages: F32, row-major
// [n_tokens, n_cols], one row per token of a batch. Stages take their inputs as
// `const Activations&` and write their outputs into caller-owned
// `Activations*` (resized by the stage), so that a stage can run on another
// thread, actor or device given only its inputs.
//
// Owns its storage. Not thread-safe for resizing; distinct rows may be
// written concurrently.
//
// The storage's allocator default-initializes: ResizeForOverwrite leaves new
// elements unwritten (a 2048-token DeepSeek-V3 buffer is 58 MB, whose zeroing
// by std::vector's value-initialization cost ~10-50 ms of one thread per MoE
// layer on the GPU machine, docs/performance.md); Resize zeroes explicitly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "runtime/base/status.h"

namespace ktx::models {

// std::allocator whose construct() with no arguments default-initializes
// (no zeroing of floats); every other construct is std::allocator's.
template <typename T>
class DefaultInitAllocator : public std::allocator<T> {
 public:
  using std::allocator<T>::allocator;
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    std::construct_at(p, std::forward<Args>(args)...);
  }
};

// F32 storage of Activations (std::vector<float> but for the allocator).
using FloatStorage = std::vector<float, DefaultInitAllocator<float>>;

class Activations {
 public:
  Activations() = default;
  Activations(int64_t n_tokens, int64_t n_cols) { Resize(n_tokens, n_cols); }

  // Sets the shape; every element becomes 0.
  void Resize(int64_t n_tokens, int64_t n_cols) {
    KTX_CHECK(n_tokens >= 0 && n_cols >= 0);
    n_tokens_ = n_tokens;
    n_cols_ = n_cols;
    data_.assign(static_cast<size_t>(n_tokens * n_cols), 0.0f);
  }
  // Sets the shape for a caller that overwrites every element next: kept
  // elements keep their old values (no zeroing pass over a reused buffer).
  void ResizeForOverwrite(int64_t n_tokens, int64_t n_cols) {
    KTX_CHECK(n_tokens >= 0 && n_cols >= 0);
    n_tokens_ = n_tokens;
    n_cols_ = n_cols;
    data_.resize(static_cast<size_t>(n_tokens * n_cols));
  }
  void SetZero() { std::fill(data_.begin(), data_.end(), 0.0f); }

  int64_t n_tokens() const { return n_tokens_; }
  int64_t n_cols() const { return n_cols_; }
  bool empty() const { return data_.empty(); }

  float* data() { return data_.data(); }
  const float* data() const { return data_.data(); }
  float* row(int64_t t) { return data_.data() + t * n_cols_; }
  const float* row(int64_t t) const { return data_.data() + t * n_cols_; }
  const FloatStorage& values() const { return data_; }
  // A copy as a plain vector (for code that keeps logits and the like).
  std::vector<float> ToVector() const { return std::vector<float>(data_.begin(), data_.end()); }

 private:
  int64_t n_tokens_ = 0;
  int64_t n_cols_ = 0;
  FloatStorage data_;  // F32 [n_tokens, n_cols]
};

}  // namespace ktx::models
