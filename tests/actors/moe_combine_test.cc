// SumPlacedPartials against a plain float64 sum written here: overlapping
// parts (summed), disjoint parts (copied), uncovered rows (zero), one part
// covering the batch in order (no copy), at a size summed inline and at one
// summed in parallel ranges.
#include "actors/moe_combine.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <vector>

namespace ktx::actors {
namespace {

PlacedPartial Part(std::vector<int32_t> rows, int64_t n_embd, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  models::Activations a(static_cast<int64_t>(rows.size()), n_embd);
  for (int64_t i = 0; i < a.n_tokens() * n_embd; ++i) a.data()[i] = nd(rng);
  a.data()[0] = -0.0f;  // a negative zero: the sum makes it +0
  PlacedPartial p;
  p.rows = std::move(rows);
  p.partial = Tensor::Wrap(std::move(a));
  return p;
}

// The reference: per row, 0.0 + each part's value in part order, in double.
std::vector<float> Reference(const std::vector<PlacedPartial>& parts, int64_t n_rows,
                             int64_t n_embd) {
  std::vector<double> acc(static_cast<size_t>(n_rows * n_embd), 0.0);
  for (const PlacedPartial& p : parts) {
    for (size_t j = 0; j < p.rows.size(); ++j) {
      for (int64_t c = 0; c < n_embd; ++c) {
        acc[p.rows[j] * n_embd + c] += p.partial->row(static_cast<int64_t>(j))[c];
      }
    }
  }
  return std::vector<float>(acc.begin(), acc.end());
}

void ExpectBitwise(const models::Activations& got, const std::vector<float>& want) {
  ASSERT_EQ(got.values().size(), want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0);
}

class SumPlacedPartialsTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(SumPlacedPartialsTest, OverlappingPartsAreSummedInOrder) {
  const int64_t n_rows = GetParam(), n_embd = 256;
  std::mt19937 rng(7);
  std::vector<int32_t> even, odd_and_some, all;
  for (int32_t r = 0; r < n_rows; ++r) {
    if (r % 2 == 0) even.push_back(r);
    if (r % 2 == 1 || r % 3 == 0) odd_and_some.push_back(r);
    if (r % 5 != 4) all.push_back(r);  // rows 4, 9, ... covered by the others only (or none)
  }
  const std::vector<PlacedPartial> parts = {
      Part(even, n_embd, rng), Part(odd_and_some, n_embd, rng), Part(all, n_embd, rng)};
  models::Activations scratch;
  const models::Activations* sum = SumPlacedPartials(parts, n_rows, n_embd, &scratch);
  EXPECT_EQ(sum, &scratch);
  ExpectBitwise(*sum, Reference(parts, n_rows, n_embd));
}

TEST_P(SumPlacedPartialsTest, DisjointPartsAreCopiedAndUncoveredRowsAreZero) {
  const int64_t n_rows = GetParam(), n_embd = 256;
  std::mt19937 rng(8);
  std::vector<int32_t> low, high;  // the last row belongs to no part
  for (int32_t r = 0; r + 1 < n_rows; ++r) (r < n_rows / 2 ? low : high).push_back(r);
  const std::vector<PlacedPartial> parts = {Part(high, n_embd, rng), Part(low, n_embd, rng)};
  models::Activations scratch;
  const models::Activations* sum = SumPlacedPartials(parts, n_rows, n_embd, &scratch);
  EXPECT_EQ(sum, &scratch);
  ExpectBitwise(*sum, Reference(parts, n_rows, n_embd));
  EXPECT_EQ(sum->row(n_rows - 1)[0], 0.0f);
}

TEST_P(SumPlacedPartialsTest, OnePartCoveringTheBatchInOrderIsReturnedAsIs) {
  const int64_t n_rows = GetParam(), n_embd = 256;
  std::mt19937 rng(9);
  std::vector<int32_t> rows(static_cast<size_t>(n_rows));
  for (int32_t r = 0; r < n_rows; ++r) rows[r] = r;
  const std::vector<PlacedPartial> parts = {Part(rows, n_embd, rng)};
  models::Activations scratch;
  EXPECT_EQ(SumPlacedPartials(parts, n_rows, n_embd, &scratch), parts[0].partial.data.get());
}

// SumPlacedPartialsInto writes the same bits into a caller's buffer in every
// case (overlapping, disjoint with an uncovered row, one part in order: then
// a copy), over whatever the buffer held before.
TEST_P(SumPlacedPartialsTest, IntoACallersBufferGivesTheSameBits) {
  const int64_t n_rows = GetParam(), n_embd = 256;
  std::mt19937 rng(10);
  std::vector<int32_t> even, all, in_order, low;
  for (int32_t r = 0; r < n_rows; ++r) {
    if (r % 2 == 0) even.push_back(r);
    if (r % 5 != 4) all.push_back(r);
    in_order.push_back(r);
    if (r + 1 < n_rows) low.push_back(r);
  }
  const std::vector<std::vector<PlacedPartial>> cases = {
      {Part(even, n_embd, rng), Part(all, n_embd, rng)},
      {Part(low, n_embd, rng)},
      {Part(in_order, n_embd, rng)}};
  for (const std::vector<PlacedPartial>& parts : cases) {
    std::vector<float> out(static_cast<size_t>(n_rows * n_embd), 7.0f);
    SumPlacedPartialsInto(parts, n_rows, n_embd, out.data());
    const std::vector<float> want = Reference(parts, n_rows, n_embd);
    models::Activations scratch;
    const models::Activations* sum = SumPlacedPartials(parts, n_rows, n_embd, &scratch);
    ASSERT_EQ(sum->values().size(), out.size());
    EXPECT_EQ(std::memcmp(out.data(), sum->data(), out.size() * sizeof(float)), 0);
    if (parts.size() > 1 || parts[0].rows.size() < static_cast<size_t>(n_rows)) {
      EXPECT_EQ(std::memcmp(out.data(), want.data(), want.size() * sizeof(float)), 0);
    }
  }
}

// 5 x 256 elements: summed on the calling thread; 600 x 256: in parallel ranges.
INSTANTIATE_TEST_SUITE_P(Sizes, SumPlacedPartialsTest, ::testing::Values(5, 600));

}  // namespace
}  // namespace ktx::actors
