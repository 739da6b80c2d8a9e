// File: tests/kernels/cuda/mla_test_util.h
//
// Shared by the MLA kernels' tests: a host-side paged bf16 latent cache with
// pages in shuffled physical order and NaN in every unused slot (so that a
// wrong page lookup shows), and the float64 reference of one (query, head)'s
// attention over rows 0 .. pos. Not thread-safe (test code).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::cuda_test {

inline constexpr uint16_t kNanBf16 = 0xffff;

struct Dims {
  int32_t n_head, kv_lora, n_rot;
};

// A paged cache for `lengths.size()` sequences, pages in shuffled physical order.
struct PagedCache {
  int32_t page_size = 0;
  int32_t row_width = 0;
  int32_t max_pages = 0;
  std::vector<int32_t> block_table;  // [n_seq][max_pages], -1 unused
  std::vector<uint16_t> data;        // bf16 [n_pages][page_size][row_width]

  uint16_t* Row(int32_t seq, int64_t pos) {
    const int32_t page = block_table[seq * max_pages + pos / page_size];
    return data.data() + (static_cast<int64_t>(page) * page_size + pos % page_size) * row_width;
  }
};

inline PagedCache MakeCache(std::mt19937& rng, const std::vector<int64_t>& lengths,
                            int32_t page_size, int32_t row_width, bool fill) {
  PagedCache c;
  c.page_size = page_size;
  c.row_width = row_width;
  int64_t n_pages = 3;  // spare pages never referenced
  for (int64_t len : lengths) {
    c.max_pages =
        std::max<int32_t>(c.max_pages, static_cast<int32_t>((len + page_size - 1) / page_size));
    n_pages += (len + page_size - 1) / page_size;
  }
  std::vector<int32_t> order(n_pages);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  c.block_table.assign(lengths.size() * c.max_pages, -1);
  int64_t next = 0;
  for (size_t s = 0; s < lengths.size(); ++s) {
    for (int64_t p = 0; p < (lengths[s] + page_size - 1) / page_size; ++p) {
      c.block_table[s * c.max_pages + p] = order[next++];
    }
  }
  c.data.assign(n_pages * page_size * row_width, kNanBf16);
  if (fill) {
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (size_t s = 0; s < lengths.size(); ++s) {
      for (int64_t pos = 0; pos < lengths[s]; ++pos) {
        uint16_t* row = c.Row(static_cast<int32_t>(s), pos);
        for (int32_t i = 0; i < row_width; ++i) row[i] = FloatToBf16Bits(dist(rng));
      }
    }
  }
  return c;
}

// ctx[d] for one (query, head): float64 softmax attention over rows 0..pos.
inline std::vector<double> Reference(PagedCache& cache, int32_t seq, int32_t pos, const float* q,
                                     int32_t kv_lora, float scale) {
  const int32_t rw = cache.row_width;
  std::vector<double> scores(pos + 1);
  double mx = -INFINITY;
  for (int32_t s = 0; s <= pos; ++s) {
    const uint16_t* row = cache.Row(seq, s);
    double dot = 0.0;
    for (int32_t j = 0; j < rw; ++j) dot += static_cast<double>(q[j]) * Bf16BitsToFloat(row[j]);
    scores[s] = dot * scale;
    mx = std::max(mx, scores[s]);
  }
  double sum = 0.0;
  for (double& v : scores) sum += (v = std::exp(v - mx));
  std::vector<double> ctx(kv_lora, 0.0);
  for (int32_t s = 0; s <= pos; ++s) {
    const uint16_t* row = cache.Row(seq, s);
    for (int32_t d = 0; d < kv_lora; ++d) ctx[d] += scores[s] / sum * Bf16BitsToFloat(row[d]);
  }
  return ctx;
}

// Relative L2 errors of one (query, head)'s context, F32 (out) and bf16
// (out_bf16, kv_lora values each), against the float64 reference.
struct HeadError {
  double f32 = 0, bf16 = 0;
};
inline HeadError CompareHead(const std::vector<double>& ref, const float* out,
                             const uint16_t* out_bf16, int32_t kv_lora) {
  double diff = 0.0, diff_b = 0.0, norm = 0.0;
  for (int32_t d = 0; d < kv_lora; ++d) {
    const double g = out[d];
    const double gb = Bf16BitsToFloat(out_bf16[d]);
    diff += (g - ref[d]) * (g - ref[d]);
    diff_b += (gb - ref[d]) * (gb - ref[d]);
    norm += ref[d] * ref[d];
  }
  return {std::sqrt(diff / norm), std::sqrt(diff_b / norm)};
}

}  // namespace ktx::cuda_test
