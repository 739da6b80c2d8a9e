// Used when ktx is built without CUDA (KTX_CUDA=OFF or no nvcc).
#include "kernels/cuda/device_query.h"

namespace ktx::kernels {

bool BuiltWithCuda() { return false; }

std::vector<CudaDeviceInfo> QueryCudaDevices(std::string* note) {
  if (note != nullptr) *note = "built without CUDA";
  return {};
}

}  // namespace ktx::kernels
