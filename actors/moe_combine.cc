#include "actors/moe_combine.h"

#include <algorithm>

namespace ktx::actors {

const models::Activations* SumPlacedPartials(std::span<const PlacedPartial> parts, int64_t n_rows,
                                             int64_t n_embd, models::Activations* scratch) {
  bool identity = parts.size() == 1 && static_cast<int64_t>(parts[0].rows.size()) == n_rows &&
                  !parts[0].partial.empty() && parts[0].partial.n_cols() == n_embd;
  for (int64_t j = 0; identity && j < n_rows; ++j) identity = parts[0].rows[j] == j;
  if (identity) return parts[0].partial.data.get();
  std::vector<double> acc(static_cast<size_t>(n_rows * n_embd), 0.0);
  for (const PlacedPartial& p : parts) {
    if (p.partial.empty()) continue;
    for (size_t j = 0; j < p.rows.size(); ++j) {
      const int64_t row = p.rows[j];
      if (row < 0 || row >= n_rows) continue;
      const float* src = p.partial->row(static_cast<int64_t>(j));
      double* dst = acc.data() + row * n_embd;
      for (int64_t c = 0; c < n_embd; ++c) dst[c] += src[c];
    }
  }
  scratch->Resize(n_rows, n_embd);
  float* out = scratch->data();
  for (size_t i = 0; i < acc.size(); ++i) out[i] = static_cast<float>(acc[i]);
  return scratch;
}

std::vector<int> SlicesOwningRows(std::span<const int32_t> failed_rows,
                                  std::span<const int64_t> row_begin,
                                  std::span<const int64_t> row_count) {
  std::vector<int> out;
  for (size_t i = 0; i < row_begin.size() && i < row_count.size(); ++i) {
    const int64_t begin = row_begin[i];
    const int64_t end = begin + row_count[i];
    const bool hit = std::any_of(failed_rows.begin(), failed_rows.end(),
                                 [&](int32_t row) { return row >= begin && row < end; });
    if (hit) out.push_back(static_cast<int>(i));
  }
  return out;
}

std::vector<int64_t> ShardComputeUs(std::span<const PlacedPartial> parts, int n_shards) {
  std::vector<int64_t> us(static_cast<size_t>(std::max(n_shards, 0)), 0);
  for (const PlacedPartial& p : parts) {
    if (p.shard >= 0 && p.shard < n_shards) us[p.shard] += p.compute_us;
  }
  return us;
}

}  // namespace ktx::actors
