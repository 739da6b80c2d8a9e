#include "actors/moe_combine.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/models/parallel_copy.h"
#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"

namespace ktx::actors {

namespace {

// parts[0] alone covers every row in order: its buffer is the sum.
bool OnePartInOrder(std::span<const PlacedPartial> parts, int64_t n_rows, int64_t n_embd) {
  bool identity = parts.size() == 1 && static_cast<int64_t>(parts[0].rows.size()) == n_rows &&
                  !parts[0].partial.empty() && parts[0].partial.n_cols() == n_embd;
  for (int64_t j = 0; identity && j < n_rows; ++j) identity = parts[0].rows[j] == j;
  return identity;
}

// The sum of SumPlacedPartials (not the one-part case) into out.
void SumInto(std::span<const PlacedPartial> parts, int64_t n_rows, int64_t n_embd, float* out);

}  // namespace

const models::Activations* SumPlacedPartials(std::span<const PlacedPartial> parts, int64_t n_rows,
                                             int64_t n_embd, models::Activations* scratch) {
  if (OnePartInOrder(parts, n_rows, n_embd)) return parts[0].partial.data.get();
  scratch->ResizeForOverwrite(n_rows, n_embd);
  SumInto(parts, n_rows, n_embd, scratch->data());
  return scratch;
}

void SumPlacedPartialsInto(std::span<const PlacedPartial> parts, int64_t n_rows, int64_t n_embd,
                           float* out) {
  if (OnePartInOrder(parts, n_rows, n_embd)) {
    models::ParallelCopy(out, parts[0].partial->data(),
                         static_cast<size_t>(n_rows * n_embd) * sizeof(float));
    return;
  }
  SumInto(parts, n_rows, n_embd, out);
}

namespace {

void SumInto(std::span<const PlacedPartial> parts, int64_t n_rows, int64_t n_embd, float* out) {
  // Each output row sums its contributions in the fixed order (parts in
  // order, rows of a part in order) in double; rows are independent, so they
  // run in parallel on the caller's arena with the same result bit for bit.
  std::vector<int64_t> begin(static_cast<size_t>(n_rows) + 1, 0);
  for (const PlacedPartial& p : parts) {
    if (p.partial.empty()) continue;
    for (int32_t row : p.rows) {
      if (row >= 0 && row < n_rows) ++begin[static_cast<size_t>(row) + 1];
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) begin[r + 1] += begin[r];
  std::vector<const float*> src(static_cast<size_t>(begin[n_rows]));
  {
    std::vector<int64_t> fill(begin.begin(), begin.end() - 1);
    for (const PlacedPartial& p : parts) {
      if (p.partial.empty()) continue;
      for (size_t j = 0; j < p.rows.size(); ++j) {
        const int64_t row = p.rows[j];
        if (row < 0 || row >= n_rows) continue;
        src[static_cast<size_t>(fill[row]++)] = p.partial->row(static_cast<int64_t>(j));
      }
    }
  }
  // Small sums (decode batches of small models) stay on the calling thread:
  // waking oneTBB workers for a few KiB costs more than the sum (issue #5,
  // per-MoE-layer overhead). Same result either way: rows are independent.
  constexpr int64_t kParallelMinElements = int64_t{1} << 16;
  // body(r0, r1) runs rows [r0, r1): one range inline, or ranges in parallel.
  auto for_rows = [&](auto&& body) {
    if (n_rows * n_embd < kParallelMinElements) {
      body(int64_t{0}, n_rows);
    } else {
      tbb::parallel_for(
          tbb::blocked_range<int64_t>(0, n_rows),
          [&](const tbb::blocked_range<int64_t>& range) { body(range.begin(), range.end()); });
    }
  };
  bool disjoint = true;  // every row has at most one contribution: copy, no sum
  for (int64_t r = 0; disjoint && r < n_rows; ++r) disjoint = begin[r + 1] - begin[r] <= 1;
  if (disjoint) {
    // float -> double -> float of 0 + one value is exact: v + 0.0f gives the
    // same bits as the sum (including -0 -> +0).
    for_rows([&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* dst = out + r * n_embd;
        if (begin[r + 1] > begin[r]) {
          const float* row = src[static_cast<size_t>(begin[r])];
          for (int64_t c = 0; c < n_embd; ++c) dst[c] = row[c] + 0.0f;
        } else {
          std::fill(dst, dst + n_embd, 0.0f);
        }
      }
    });
    return;
  }
  for_rows([&](int64_t r0, int64_t r1) {
    std::vector<double> acc(static_cast<size_t>(n_embd));  // one per range, not per row
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t i = begin[r]; i < begin[r + 1]; ++i) {
        const float* row = src[static_cast<size_t>(i)];
        for (int64_t c = 0; c < n_embd; ++c) acc[c] += row[c];
      }
      float* dst = out + r * n_embd;
      for (int64_t c = 0; c < n_embd; ++c) dst[c] = static_cast<float>(acc[c]);
    }
  });
}

}  // namespace

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

absl::Status CheckSliceShape(const StepSlice& slice, uint64_t step, std::set<uint64_t>* seen) {
  if (!seen->insert(slice.seq).second) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence ", slice.seq, " appears twice in step ", step));
  }
  if (slice.tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence ", slice.seq, ": empty token slice in step ", step));
  }
  return absl::OkStatus();
}

SliceResult MakeSliceResult(uint64_t seq, const absl::Status& status, Tensor logits) {
  SliceResult slice;
  slice.seq = seq;
  if (!status.ok()) {
    slice.code = static_cast<int32_t>(status.code());
    slice.message = std::string(status.message());
  } else {
    slice.logits = std::move(logits);
  }
  return slice;
}

}  // namespace ktx::actors
