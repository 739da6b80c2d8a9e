#include "runtime/gpu/cuda_buffers.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace ktx::gpu {

absl::Status CudaOk(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // clear a non-sticky error
  const std::string msg = absl::StrCat(what, ": CUDA error ", static_cast<int>(err), " (",
                                       cudaGetErrorName(err), ": ", cudaGetErrorString(err), ")");
  if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

absl::Status CublasOk(cublasStatus_t st, const std::string& what) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": cuBLAS error ", static_cast<int>(st), " (",
                                       cublasGetStatusName(st), ")");
  if (st == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes, const std::string& what) {
  DeviceBuffer b;
  if (bytes == 0) return b;
  const cudaError_t err = cudaMalloc(&b.ptr_, bytes);
  if (err != cudaSuccess) {
    b.ptr_ = nullptr;
    return CudaOk(err, absl::StrCat("allocating ", bytes, " bytes of GPU memory for ", what));
  }
  b.bytes_ = bytes;
  return b;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) cudaFree(ptr_);
}

absl::StatusOr<PinnedBuffer> PinnedBuffer::Allocate(size_t bytes, const std::string& what) {
  PinnedBuffer b;
  if (bytes == 0) return b;
  const cudaError_t err = cudaHostAlloc(&b.ptr_, bytes, cudaHostAllocDefault);
  if (err != cudaSuccess) {
    b.ptr_ = nullptr;
    return CudaOk(err,
                  absl::StrCat("allocating ", bytes, " bytes of pinned host memory for ", what));
  }
  b.bytes_ = bytes;
  return b;
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& other) noexcept {
  if (this != &other) {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

PinnedBuffer::~PinnedBuffer() {
  if (ptr_ != nullptr) cudaFreeHost(ptr_);
}

}  // namespace ktx::gpu
