// h2d_load: keeps the PCIe link busy with host-to-device copies from pinned
// memory for a while, as the GPU's expert streaming does during a large
// prefill, so that CPU benchmarks can be run beside it (docs/performance.md,
// "The split at 2048 tokens again"). Build and run on the GPU machine:
//
//   nvcc -O2 -o /tmp/h2d_load bench/h2d_load.cu && /tmp/h2d_load 20 &   # 20 seconds
//
// Stops after the given seconds or at SIGTERM / SIGINT, and prints the
// achieved GB/s.
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>

namespace {
std::atomic<bool> g_stop{false};
void Stop(int) { g_stop = true; }
}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGTERM, Stop);
  std::signal(SIGINT, Stop);
  const double seconds = argc > 1 ? std::atof(argv[1]) : 10.0;
  const size_t bytes = size_t{256} << 20;
  void* host = nullptr;
  void* dev = nullptr;
  cudaStream_t stream;
  if (cudaHostAlloc(&host, bytes, cudaHostAllocDefault) != cudaSuccess ||
      cudaMalloc(&dev, bytes) != cudaSuccess || cudaStreamCreate(&stream) != cudaSuccess) {
    std::fprintf(stderr, "h2d_load: CUDA setup failed: %s\n",
                 cudaGetErrorString(cudaGetLastError()));
    return 1;
  }
  const auto t0 = std::chrono::steady_clock::now();
  double elapsed = 0;
  size_t copied = 0;
  while (elapsed < seconds && !g_stop) {
    for (int i = 0; i < 8; ++i) cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, stream);
    if (cudaStreamSynchronize(stream) != cudaSuccess) {
      std::fprintf(stderr, "h2d_load: copy failed: %s\n", cudaGetErrorString(cudaGetLastError()));
      return 1;
    }
    copied += 8 * bytes;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  std::printf("h2d_load: %.1f GB/s host to device for %.1f s\n", copied / elapsed / 1e9, elapsed);
  return 0;
}
