// moe_amx_probe: what one core's AMX loop structure costs (issue #4). Times a
// k-step of the tile path's loop (2 x 2 int8 tiles over 64 tokens) alone, with
// the panel16 -> int8 conversion work of a given number of units (8 units per
// k-step is the Q4_K conversion at 64 tokens per expert, 4 at 128), with the
// fp32 fix-up of the C tiles (every 8 k-steps = a 512-k group, or every 16),
// and combinations, so that one sees whether the vector work overlaps with the
// tile unit (docs/performance.md, "What one core overlaps"). Cases run in
// rounds (each case once per round, best of the rounds) so that a noisy
// neighbour on a shared host hits them alike. With --threads=N every thread
// (pinned to cpus 0..N-1) runs the same loop at the same time; --scaling
// times the tiles alone on 1..N threads (aggregate TOPS); --pairs runs them on
// cpu 0 and each other cpu at once (a pair that slows down shares a tile unit).
// The memory cases take the operands where the kernel's phase 2 finds them: B
// tiles from a 256 KiB ring (a converted chunk in L2), A tiles from one
// expert's activation rows at the kernel's row stride (7168 k + scales) or
// the same bytes tile-major, with software prefetches streaming a large
// array meanwhile (docs/performance.md, twenty-third session).
//
// The 4x1 cases block the registers as 4 token tiles x 1 panel (one B tile
// per k-step used 4 times, the 64 tokens' A tiles of one group L1-resident)
// against the kernel's 2 x 2 (twenty-fifth session).
//
// --rows times register-only products with A and C tiles of fewer rows (and
// with a configuration load every 32 products).
//
//   moe_amx_probe [--threads=N] [--rounds=R] [--scaling | --pairs | --rows]
//
// Exits 2 with a message where the CPU or the OS offers no AMX.
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu/cpu_features.h"
#include "tests/kernels/cpu/moe/moe_amx_probe_loops.h"

namespace ktx::kernels::moe::probe {
namespace {

constexpr int64_t kItems = 8000;

// A 2 MiB-aligned array advised for transparent huge pages, filled with 1.
struct HugeArray {
  explicit HugeArray(int64_t bytes) {
    const size_t n =
        (static_cast<size_t>(bytes) + (size_t{2} << 20) - 1) & ~((size_t{2} << 20) - 1);
    p = static_cast<uint8_t*>(std::aligned_alloc(size_t{2} << 20, n));
    madvise(p, n, MADV_HUGEPAGE);
    std::memset(p, 1, n);
  }
  ~HugeArray() { std::free(p); }
  HugeArray(const HugeArray&) = delete;
  HugeArray& operator=(const HugeArray&) = delete;
  uint8_t* p = nullptr;
};

// Runs `body(thread, buffers)` on one thread per cpu of `cpus` (thread t
// pinned to cpus[t]), started together.
template <typename Body>
void OnCpus(const std::vector<int>& cpus, Body body) {
  const int n = static_cast<int>(cpus.size());
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(cpus[t], &set);
      pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
      auto buffers = std::make_unique<ProbeBuffers>();
      std::memset(static_cast<void*>(buffers.get()), 1, sizeof(ProbeBuffers));
      // The memory cases' arrays, on transparent huge pages where the OS
      // gives them (as the kernels' workspace and weights), touched.
      HugeArray ring(ProbeBuffers::kRingItems * 16384);
      HugeArray rows(64 * ProbeBuffers::kActStride);
      HugeArray tiles(64 * 7168);
      HugeArray stream(ProbeBuffers::kStreamBytes);
      buffers->b_ring = reinterpret_cast<int8_t*>(ring.p);
      buffers->a_rows = reinterpret_cast<int8_t*>(rows.p);
      buffers->a_tiles = reinterpret_cast<int8_t*>(tiles.p);
      buffers->stream = stream.p;
      ready.fetch_add(1);
      while (ready.load() < n) {
      }
      ConfigureTilesForProbe();
      body(t, buffers.get());
      ReleaseTilesForProbe();
    });
  }
  for (std::thread& th : threads) th.join();
}

// OnCpus on cpus 0..n-1.
template <typename Body>
void OnThreads(int n, Body body) {
  std::vector<int> cpus(n);
  for (int t = 0; t < n; ++t) cpus[t] = t;
  OnCpus(cpus, body);
}

int Main(int argc, char** argv) {
  int n_threads = 1, rounds = 9;
  bool scaling = false, pairs = false, rows = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--threads=", 0) == 0) {
      n_threads = std::atoi(arg.c_str() + 10);
    } else if (arg.rfind("--rounds=", 0) == 0) {
      rounds = std::atoi(arg.c_str() + 9);
    } else if (arg == "--scaling") {
      scaling = true;
    } else if (arg == "--pairs") {
      pairs = true;
    } else if (arg == "--rows") {
      rows = true;
    } else {
      std::fprintf(stderr,
                   "moe_amx_probe: unknown argument '%s' (--threads=N --rounds=R --scaling --pairs "
                   "--rows)\n",
                   arg.c_str());
      return 2;
    }
  }
  const int n_cpus = static_cast<int>(std::thread::hardware_concurrency());
  if (n_threads < 1 || n_threads > n_cpus || rounds < 1) {
    std::fprintf(stderr, "moe_amx_probe: --threads must be 1..%d and --rounds >= 1\n", n_cpus);
    return 2;
  }
  const CpuFeatures& f = DetectCpuFeatures();
  if (!f.amx_int8 || !f.amx_permitted || !f.avx512bw || !f.os_avx512) {
    std::fprintf(stderr,
                 "moe_amx_probe: no AMX here (%s: amx_int8=%d, OS permission=%d, avx512bw=%d): "
                 "nothing measured\n",
                 f.brand.c_str(), f.amx_int8, f.amx_permitted, f.avx512bw);
    return 2;
  }
  std::printf(
      "moe_amx_probe: %s, %d thread(s), best of %d rounds, ns per k-step "
      "(4 tile loads + 4 tdpbssd over 64 tokens; 8 units = Q4_K conversion at 64 tokens)\n",
      f.brand.c_str(), n_threads, rounds);
  if (pairs) {  // cpu 0 beside each other cpu: do two cpus share a tile unit?
    for (int j = 1; j < n_cpus; ++j) {
      double ns[2] = {1e30, 1e30};
      for (int r = 0; r < rounds; ++r) {
        OnCpus({0, j}, [&](int t, ProbeBuffers* b) {
          ns[t] = std::min(ns[t], RunProbeLoop({"tiles"}, b, kItems));
        });
      }
      std::printf("tiles on cpus 0 and %2d at once: %6.1f and %6.1f ns per k-step\n", j, ns[0],
                  ns[1]);
    }
    return 0;
  }
  if (rows) {  // does a product's time follow the rows of its A and C tiles?
    for (const bool sw : {false, true}) {
      for (const int r : {16, 12, 8, 4, 2, 1}) {
        std::vector<double> ns(n_threads, 1e30);
        for (int rd = 0; rd < rounds; ++rd) {
          OnThreads(n_threads, [&](int t, ProbeBuffers*) {
            ns[t] = std::min(ns[t], RunRowsLoop(r, sw, 200000));
          });
        }
        std::sort(ns.begin(), ns.end());
        std::printf("A and C tiles of %2d rows%s: median %5.2f, slowest %5.2f ns per tdpbssd\n", r,
                    sw ? ", ldtilecfg / 32 products" : "", ns[n_threads / 2], ns[n_threads - 1]);
      }
    }
    return 0;
  }
  if (scaling) {
    for (int n = 1; n <= n_threads; n = n < 2 ? n + 1 : n + 2) {
      std::vector<double> ns(n, 1e30);
      for (int r = 0; r < rounds; ++r) {
        OnThreads(n, [&](int t, ProbeBuffers* b) {
          ns[t] = std::min(ns[t], RunProbeLoop({"tiles"}, b, kItems));
        });
      }
      double tops = 0.0;
      for (double x : ns) tops += 4.0 * 16 * 16 * 64 * 2 / x / 1e3;
      std::sort(ns.begin(), ns.end());
      std::printf(
          "tiles on %2d threads: median %6.1f, slowest %6.1f ns per k-step; %5.1f TOPS in all\n", n,
          ns[n / 2], ns[n - 1], tops);
    }
    return 0;
  }
  using F = ProbeFixup;
  const ProbeCase cases[] = {
      {"tiles", true, 0},
      {"conversion 4 units", false, 4},
      {"conversion 8 units", false, 8},
      {"tiles + conversion 4 (a ring)", true, 4},
      {"tiles + conversion 8 (a ring)", true, 8},
      {"tiles + conversion 4 (into B)", true, 4, true},
      {"tiles + conversion 8 (into B)", true, 8, true},
      {"tiles + conversion 8 (into B), interleaved", true, 8, true, true},
      {"tiles + C tile stores / 8 k-steps", true, 0, false, false, F::kStoresOnly},
      {"tiles + fix-up / 8 k-steps", true, 0, false, false, F::kNow},
      {"tiles + fix-up / 8 k-steps, deferred", true, 0, false, false, F::kDeferred},
      {"tiles + C tile stores / 16 k-steps", true, 0, false, false, F::kStoresOnly, 16},
      {"tiles + fix-up / 16 k-steps, deferred", true, 0, false, false, F::kDeferred, 16},
      {"tiles + conv 8 (into B) + fix-up / 8, deferred", true, 8, true, false, F::kDeferred},
      {"same, interleaved", true, 8, true, true, F::kDeferred},
      {"tiles + conv 8 (into B) + fix-up / 16, deferred", true, 8, true, false, F::kDeferred, 16},
      {"tiles + conv 4 (into B) + fix-up / 8, deferred", true, 4, true, false, F::kDeferred},
      // Where the operands come from (the kernel's phase 2: B from a 256 KiB
      // chunk in L2, A from the expert's activation rows, and the next
      // chunk's weights streamed from DRAM meanwhile).
      {"tiles, B from a 256 KiB ring", true, 0, false, false, F::kNone, 8, true},
      {"tiles, A from the activation rows", true, 0, false, false, F::kNone, 8, false, true},
      {"tiles, A from the activations tile-major", true, 0, false, false, F::kNone, 8, false, true,
       0, true},
      {"tiles, B ring + A rows", true, 0, false, false, F::kNone, 8, true, true},
      {"tiles, B ring + A tile-major", true, 0, false, false, F::kNone, 8, true, true, 0, true},
      {"tiles, B ring + A rows + stores / 8", true, 0, false, false, F::kStoresOnly, 8, true, true},
      {"tiles + stream 1 line / k-step", true, 0, false, false, F::kNone, 8, false, false, 1},
      {"tiles + stream 2 lines / k-step", true, 0, false, false, F::kNone, 8, false, false, 2},
      {"tiles + stream 4 lines / k-step", true, 0, false, false, F::kNone, 8, false, false, 4},
      {"tiles + stream 8 lines / k-step", true, 0, false, false, F::kNone, 8, false, false, 8},
      {"tiles + stream 16 lines / k-step", true, 0, false, false, F::kNone, 8, false, false, 16},
      {"B ring + A tile-major + stream 8", true, 0, false, false, F::kNone, 8, true, true, 8, true},
      {"B ring + A tile-major + stream 16", true, 0, false, false, F::kNone, 8, true, true, 16,
       true},
      // The stream's prefetch hint (the kernel's is T1).
      {"B ring + A tile-major + stream 8, T0", true, 0, false, false, F::kNone, 8, true, true, 8,
       true, 0},
      {"B ring + A tile-major + stream 8, T2", true, 0, false, false, F::kNone, 8, true, true, 8,
       true, 2},
      {"B ring + A tile-major + stream 8, NTA", true, 0, false, false, F::kNone, 8, true, true, 8,
       true, 3},
      {"tiles + stream 8, T2", true, 0, false, false, F::kNone, 8, false, false, 8, false, 2},
      {"tiles + stream 8, NTA", true, 0, false, false, F::kNone, 8, false, false, 8, false, 3},
      {"B ring + A tile-major + stream 8 as 4 (every other line)", true, 0, false, false, F::kNone,
       8, true, true, 4, true, 1, 2},
      {"B ring + A tile-major + stream 16 as 8 (every other line)", true, 0, false, false, F::kNone,
       8, true, true, 8, true, 1, 2},
      {"tiles, B ring + A rows + stream 2", true, 0, false, false, F::kNone, 8, true, true, 2},
      {"same + fix-up / 8, deferred", true, 0, false, false, F::kDeferred, 8, true, true, 2},
      {"tiles, B ring + A tile-major + stream 2 + fix-up / 8", true, 0, false, false, F::kDeferred,
       8, true, true, 2, true},
      // Register blocking 4 x 1 (one B tile per k-step, the 64 tokens' A
      // tiles of one group in L1) against 2 x 2 with the same memory.
      {"B ring + A tile-major + stream 8 + fix-up / 8", true, 0, false, false, F::kDeferred, 8,
       true, true, 8, true},
      {"4x1: B from two 16 KiB items, A 32 KiB", true, 0, false, false, F::kNone, 8, false, false,
       0, false, 1, 1, true},
      {"4x1: B ring, A in L1", true, 0, false, false, F::kNone, 8, true, false, 0, false, 1, 1,
       true},
      {"4x1: B ring, A in L1 + stream 8", true, 0, false, false, F::kNone, 8, true, false, 8, false,
       1, 1, true},
      {"4x1: B ring, A in L1 + stream 8 + fix-up / 8", true, 0, false, false, F::kDeferred, 8, true,
       false, 8, false, 1, 1, true},
  };
  const int n_cases = static_cast<int>(sizeof(cases) / sizeof(cases[0]));
  std::vector<std::vector<double>> best(n_cases, std::vector<double>(n_threads, 1e30));
  for (int r = 0; r < rounds; ++r) {
    for (int c = 0; c < n_cases; ++c) {
      OnThreads(n_threads, [&](int t, ProbeBuffers* b) {
        best[c][t] = std::min(best[c][t], RunProbeLoop(cases[c], b, kItems));
      });
    }
  }
  for (int c = 0; c < n_cases; ++c) {
    std::vector<double> v = best[c];
    std::sort(v.begin(), v.end());
    std::printf("%-50s %7.1f", cases[c].name, v[n_threads / 2]);
    if (n_threads > 1) std::printf("  (fastest thread %.1f, slowest %.1f)", v[0], v[n_threads - 1]);
    std::printf("\n");
  }
  return 0;
}

}  // namespace
}  // namespace ktx::kernels::moe::probe

int main(int argc, char** argv) { return ktx::kernels::moe::probe::Main(argc, argv); }
