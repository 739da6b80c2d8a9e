// File: runtime/models/parallel_copy.h
//
// ParallelCopy: memcpy of large host buffers (a batch's hidden states, tens of
// MiB at prefill) spread over the calling thread's oneTBB arena in 2 MiB
// chunks, so that a copy between pinned staging memory and activations does
// not serialize a whole step on one core. Below 8 MiB it is a plain memcpy.
// The ranges must not overlap. Thread-safety: none needed (pure function);
// call it from a thread whose arena may run parallel work (never a CAF thread).
#pragma once

#include <cstddef>

namespace ktx::models {

void ParallelCopy(void* dst, const void* src, size_t bytes);

}  // namespace ktx::models
