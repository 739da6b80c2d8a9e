// h2d_probe: host-to-device copy rates in the shapes the GPU's expert
// streaming uses (runtime/gpu/gpu_experts.cc: per DeepSeek-V3 Q4_K_M expert,
// copies of 8.26 + 8.26 + 12.04 MB from page-locked host memory), to see what
// limits the link: the kind of host memory (cudaHostAlloc, or cudaHostRegister
// over a malloc'd buffer, or over a file mapped from /dev/shm as the model is),
// how many copy streams share the experts (1, 2, 4; experts dealt round-robin),
// and host memory traffic beside the copies (N threads streaming reads of
// their own 1 GiB each, as the CPU experts do during a split prefill). Each
// case copies 2 GiB worth of experts, best of 3 (after one warm-up). Build and
// run on the GPU machine (docs/performance.md):
//
//   nvcc -O2 -std=c++17 -o h2d_probe bench/h2d_probe.cu -lpthread && ./h2d_probe [readers]
//
// Prints one line per case: GB/s of copies, and the readers' GB/s beside them.
#include <cuda_runtime.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

constexpr size_t kPart[3] = {8257536, 8257536, 12042240};  // gate, up, down of one expert
constexpr size_t kExpert = kPart[0] + kPart[1] + kPart[2];
constexpr size_t kHostBytes = size_t{3} << 30;  // experts spread over 3 GiB of host memory
constexpr int kExpertsPerCase = 75;             // ~2.1 GB copied per case

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Readers: each streams reads over its own buffer until stopped; bytes read.
struct Readers {
  std::vector<std::thread> threads;
  std::vector<std::vector<uint64_t>> bufs;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> bytes{0};
  void Start(int n) {
    stop = false;
    bytes = 0;
    bufs.resize(n);
    for (int i = 0; i < n; ++i) {
      if (bufs[i].empty()) bufs[i].assign((size_t{1} << 30) / 8, i + 1);
    }
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([this, i] {
        const std::vector<uint64_t>& b = bufs[i];
        uint64_t sum = 0, done = 0;
        while (!stop.load(std::memory_order_relaxed)) {
          for (size_t j = 0; j < b.size(); j += 8) {
            sum +=
                b[j] ^ b[j + 1] ^ b[j + 2] ^ b[j + 3] ^ b[j + 4] ^ b[j + 5] ^ b[j + 6] ^ b[j + 7];
            if ((j & ((1 << 17) - 1)) == 0 && stop.load(std::memory_order_relaxed)) break;
            done += 64;
          }
        }
        bytes += done + (sum == 42 ? 1 : 0);
      });
    }
  }
  void Stop() {
    stop = true;
    for (auto& t : threads) t.join();
    threads.clear();
  }
};

// Copies kExpertsPerCase experts from `host` (kHostBytes) into a device ring of
// 32 expert slots, expert i on stream i % n_streams; GB/s, best of 3.
double CopyRate(const uint8_t* host, uint8_t* dev, int n_streams, cudaStream_t* streams) {
  double best = 0;
  for (int rep = 0; rep < 4; ++rep) {
    CHECK(cudaDeviceSynchronize());
    const double t0 = Now();
    for (int i = 0; i < kExpertsPerCase; ++i) {
      const uint8_t* src =
          host + (static_cast<size_t>(i) * 7919 % (kHostBytes / kExpert)) * kExpert;
      uint8_t* dst = dev + static_cast<size_t>(i % 32) * kExpert;
      size_t off = 0;
      for (size_t p : kPart) {
        CHECK(cudaMemcpyAsync(dst + off, src + off, p, cudaMemcpyHostToDevice,
                              streams[i % n_streams]));
        off += p;
      }
    }
    CHECK(cudaDeviceSynchronize());
    const double gbps = kExpertsPerCase * static_cast<double>(kExpert) / (Now() - t0) / 1e9;
    if (rep > 0) best = std::max(best, gbps);  // the first is a warm-up
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const int readers = argc > 1 ? std::atoi(argv[1]) : 8;
  uint8_t* dev = nullptr;
  CHECK(cudaMalloc(&dev, 32 * kExpert));
  cudaStream_t streams[4];
  for (auto& s : streams) CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  struct Source {
    const char* name;
    uint8_t* p;
  };
  std::vector<Source> sources;
  uint8_t* alloc = nullptr;
  CHECK(cudaHostAlloc(reinterpret_cast<void**>(&alloc), kHostBytes, cudaHostAllocDefault));
  std::memset(alloc, 1, kHostBytes);
  sources.push_back({"cudaHostAlloc", alloc});
  void* m = nullptr;
  if (posix_memalign(&m, size_t{2} << 20, kHostBytes) == 0) {
    madvise(m, kHostBytes, MADV_HUGEPAGE);
    std::memset(m, 1, kHostBytes);
    if (cudaHostRegister(m, kHostBytes, cudaHostRegisterPortable) == cudaSuccess) {
      sources.push_back({"registered malloc (THP advised)", static_cast<uint8_t*>(m)});
    } else {
      cudaGetLastError();
      std::printf("h2d_probe: cudaHostRegister of malloc'd memory failed\n");
    }
  }
  const char* path = "/dev/shm/h2d_probe.bin";
  const int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd >= 0 && ftruncate(fd, kHostBytes) == 0) {
    void* f = mmap(nullptr, kHostBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (f != MAP_FAILED) {
      std::memset(f, 1, kHostBytes);
      if (cudaHostRegister(f, kHostBytes, cudaHostRegisterPortable | cudaHostRegisterReadOnly) ==
          cudaSuccess) {
        sources.push_back({"registered /dev/shm mapping (as the model)", static_cast<uint8_t*>(f)});
      } else {
        cudaGetLastError();
        std::printf("h2d_probe: cudaHostRegister of the /dev/shm mapping failed\n");
      }
    }
  }
  unlink(path);

  Readers r;
  std::printf("h2d_probe: %d experts of %.2f MB per case (3 copies each), best of 3\n",
              kExpertsPerCase, kExpert / 1e6);
  for (const Source& s : sources) {
    for (int n_streams : {1, 2, 4}) {
      const double alone = CopyRate(s.p, dev, n_streams, streams);
      r.Start(readers);
      const double t0 = Now();
      const double beside = CopyRate(s.p, dev, n_streams, streams);
      const double secs = Now() - t0;
      r.Stop();
      std::printf("%-44s streams %d: %6.2f GB/s alone, %6.2f GB/s beside %d readers (%.1f GB/s)\n",
                  s.name, n_streams, alone, beside, readers, r.bytes / secs / 1e9);
    }
  }
  r.Start(readers);
  const double t0 = Now();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const double secs = Now() - t0;
  r.Stop();
  std::printf("%d readers alone: %.1f GB/s\n", readers, r.bytes / secs / 1e9);
  return 0;
}
