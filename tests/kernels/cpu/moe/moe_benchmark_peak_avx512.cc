// Compiled with AVX-512 + VNNI flags.
#include <immintrin.h>

#include "tests/kernels/cpu/moe/moe_benchmark_kernels.h"

namespace ktx::kernels::moe::bench {

int64_t VnniPeakLoop(int64_t iters) {
  constexpr int kAcc = 12;
  __m512i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_epi32(i);
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(acc[0]), "+v"(acc[1]), "+v"(acc[2]), "+v"(acc[3]));
  }
  __m512i s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm512_add_epi32(s, acc[i]);
  volatile int sink = _mm512_reduce_add_epi32(s);
  (void)sink;
  return iters * kAcc * 64 * 2;
}

}  // namespace ktx::kernels::moe::bench
