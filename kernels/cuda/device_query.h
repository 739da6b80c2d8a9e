// File: kernels/cuda/device_query.h
//
// Lists the CUDA devices this process can see (name, memory, compute
// capability). Built against the CUDA runtime when ktx is built with CUDA;
// otherwise returns no devices and says why. Thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ktx::kernels {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  uint64_t memory_bytes = 0;       // total global memory
  uint64_t free_memory_bytes = 0;  // free at query time
  int compute_major = 0;
  int compute_minor = 0;
  int multiprocessors = 0;
};

// True when this binary was compiled with CUDA support.
bool BuiltWithCuda();

// Returns the visible devices. When there are none, `*note` (if given) says
// why: "built without CUDA", "no CUDA driver", "no CUDA device", ...
std::vector<CudaDeviceInfo> QueryCudaDevices(std::string* note);

}  // namespace ktx::kernels
