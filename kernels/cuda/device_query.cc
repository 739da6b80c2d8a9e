#include "kernels/cuda/device_query.h"

#include <cuda_runtime_api.h>

namespace ktx::kernels {

bool BuiltWithCuda() { return true; }

std::vector<CudaDeviceInfo> QueryCudaDevices(std::string* note) {
  std::vector<CudaDeviceInfo> devices;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (note != nullptr) *note = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error
    return devices;
  }
  if (count == 0 && note != nullptr) *note = "no CUDA device";
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    CudaDeviceInfo info;
    info.index = i;
    info.name = prop.name;
    info.memory_bytes = prop.totalGlobalMem;
    info.compute_major = prop.major;
    info.compute_minor = prop.minor;
    info.multiprocessors = prop.multiProcessorCount;
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaSetDevice(i) == cudaSuccess &&
        cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      info.free_memory_bytes = free_bytes;
    }
    devices.push_back(std::move(info));
  }
  return devices;
}

}  // namespace ktx::kernels
