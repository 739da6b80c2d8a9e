// File: tests/kernels/cuda/cuda_test_util.h
//
// Helpers for tests of CUDA code: skip (GTEST_SKIP) with the reason when no
// usable GPU is present, so the tests compile and skip on CI machines; a
// typed RAII device array with upload/download; fresh random seeds that are
// printed with every failure; and a bf16 helper pair for host references.
//
// Not thread-safe (test code).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/quant/quant.h"
#include "kernels/cuda/device_query.h"

namespace ktx::cuda_test {

// Empty when a CUDA device is usable, else why not.
inline std::string NoGpuReason() {
  std::string note;
  const std::vector<kernels::CudaDeviceInfo> devices = kernels::QueryCudaDevices(&note);
  if (!devices.empty()) return "";
  return note.empty() ? std::string("no CUDA device") : note;
}

#define KTX_SKIP_WITHOUT_GPU()                                                            \
  do {                                                                                    \
    const std::string ktx_no_gpu_ = ::ktx::cuda_test::NoGpuReason();                      \
    if (!ktx_no_gpu_.empty()) GTEST_SKIP() << "needs a CUDA GPU (" << ktx_no_gpu_ << ")"; \
  } while (false)

#define ASSERT_CUDA_OK(expr)                                                           \
  do {                                                                                 \
    const cudaError_t ktx_err_ = (expr);                                               \
    ASSERT_EQ(ktx_err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(ktx_err_); \
  } while (false)

// A device array of n elements of T, freed on destruction.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : n_(n) {
    if (n > 0 && cudaMalloc(&ptr_, n * sizeof(T)) != cudaSuccess) {
      ptr_ = nullptr;
      ADD_FAILURE() << "cudaMalloc of " << n * sizeof(T) << " bytes failed";
    }
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { Upload(host); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }

  T* get() const { return static_cast<T*>(ptr_); }
  size_t size() const { return n_; }

  void Upload(const std::vector<T>& host) {
    ASSERT_LE(host.size(), n_);
    ASSERT_EQ(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  std::vector<T> Download() const {
    std::vector<T> host(n_);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }
  // Fills every byte with `byte` (0xff: NaN for floats and bf16), so that an
  // element the kernel does not write shows up.
  void Poison(uint8_t byte = 0xff) {
    ASSERT_EQ(cudaMemset(ptr_, byte, n_ * sizeof(T)), cudaSuccess);
  }

 private:
  void* ptr_ = nullptr;
  size_t n_ = 0;
};

// A fresh seed per call; the caller records it with SCOPED_TRACE.
inline uint32_t FreshSeed() { return std::random_device{}(); }

inline float Bf16BitsToFloat(uint16_t b) { return kernels::Bf16ToFloat(b); }
inline uint16_t FloatToBf16Bits(float f) { return kernels::FloatToBf16(f); }

// Random values exactly representable in bf16 (so a bf16 store is lossless).
inline std::vector<uint16_t> RandomBf16(std::mt19937& rng, size_t n, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<uint16_t> out(n);
  for (auto& v : out) v = FloatToBf16Bits(dist(rng));
  return out;
}

inline std::vector<float> RandomF32(std::mt19937& rng, size_t n, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> out(n);
  for (auto& v : out) v = dist(rng);
  return out;
}

}  // namespace ktx::cuda_test
