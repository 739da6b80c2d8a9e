#include "runtime/models/parallel_copy.h"

#include <cstdint>
#include <cstring>

#include "tbb/parallel_for.h"

namespace ktx::models {

void ParallelCopy(void* dst, const void* src, size_t bytes) {
  constexpr size_t kChunk = size_t{2} << 20;
  if (bytes < 4 * kChunk) {
    std::memcpy(dst, src, bytes);
    return;
  }
  const size_t n_chunks = (bytes + kChunk - 1) / kChunk;
  auto* d = static_cast<uint8_t*>(dst);
  const auto* s = static_cast<const uint8_t*>(src);
  tbb::parallel_for(size_t{0}, n_chunks, [&](size_t c) {
    const size_t begin = c * kChunk;
    const size_t n = begin + kChunk <= bytes ? kChunk : bytes - begin;
    std::memcpy(d + begin, s + begin, n);
  });
}

}  // namespace ktx::models
