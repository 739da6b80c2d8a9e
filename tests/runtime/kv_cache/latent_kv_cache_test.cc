#include "runtime/kv_cache/latent_kv_cache.h"

#include <memory>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ktx::kv_cache {
namespace {

using ::testing::HasSubstr;

// DeepSeek-V3's row: 512 + 64 floats; 3 layers keep the test small.
constexpr LatentKvLayout kLayout{3, 512, 64};

TEST(LatentKvLayoutTest, Geometry) {
  EXPECT_EQ(kLayout.row_width(), 576);
  EXPECT_EQ(kLayout.bytes_per_token(), 3u * 576u * 4u);
  const LatentKvLayout dsv3{61, 512, 64};
  EXPECT_EQ(dsv3.bytes_per_token(), 61u * 576u * 4u);  // 137.25 KiB per token at F32
  EXPECT_FALSE((LatentKvLayout{0, 512, 64}).Validate().ok());
  EXPECT_FALSE((LatentKvLayout{3, 0, 64}).Validate().ok());
}

TEST(SequenceKvTest, RowsAreDisjointAndStable) {
  auto seq = SequenceKv::Create(kLayout, 7);
  ASSERT_TRUE(seq.ok()) << seq.status();
  SequenceKv& kv = **seq;
  // Write a distinct value into every element of every row, then read all back.
  for (int il = 0; il < 3; ++il) {
    for (int64_t pos = 0; pos < 7; ++pos) {
      float* row = kv.Row(il, pos);
      for (int64_t i = 0; i < 576; ++i) row[i] = static_cast<float>((il * 7 + pos) * 1000 + i);
    }
  }
  for (int il = 0; il < 3; ++il) {
    for (int64_t pos = 0; pos < 7; ++pos) {
      const float* row = static_cast<const SequenceKv&>(kv).Row(il, pos);
      for (int64_t i = 0; i < 576; ++i) {
        ASSERT_EQ(row[i], static_cast<float>((il * 7 + pos) * 1000 + i)) << il << " " << pos;
      }
    }
  }
  EXPECT_EQ(kv.Row(1, 0) - kv.Row(0, 0), 7 * 576);  // layer-major layout
  EXPECT_EQ(kv.Row(0, 1) - kv.Row(0, 0), 576);
}

TEST(SequenceKvTest, CommitTruncateAndFull) {
  auto seq = SequenceKv::Create(kLayout, 5);
  ASSERT_TRUE(seq.ok());
  SequenceKv& kv = **seq;
  EXPECT_EQ(kv.length(), 0);
  ASSERT_TRUE(kv.Commit(3).ok());
  EXPECT_EQ(kv.length(), 3);
  ASSERT_TRUE(kv.CheckRoom(2).ok());
  const absl::Status full = kv.CheckRoom(3);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("capacity 5 tokens"));
  EXPECT_THAT(full.message(), HasSubstr("3 in use"));
  EXPECT_FALSE(kv.Commit(3).ok());
  EXPECT_EQ(kv.length(), 3);  // a failed commit changes nothing
  ASSERT_TRUE(kv.Truncate(1).ok());
  EXPECT_EQ(kv.length(), 1);
  EXPECT_FALSE(kv.Truncate(2).ok());  // cannot grow by truncation
  EXPECT_FALSE(kv.Truncate(-1).ok());
  EXPECT_FALSE(kv.CheckRoom(-1).ok());
  ASSERT_TRUE(kv.Commit(4).ok());
  EXPECT_EQ(kv.length(), 5);
  kv.Clear();
  EXPECT_EQ(kv.length(), 0);
}

TEST(SequenceKvTest, BadCapacity) {
  EXPECT_FALSE(SequenceKv::Create(kLayout, 0).ok());
  EXPECT_FALSE(SequenceKv::Create(kLayout, -4).ok());
  const auto huge = SequenceKv::Create(kLayout, int64_t{1} << 60);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(LatentKvCacheTest, BudgetInBytes) {
  const uint64_t per_token = kLayout.bytes_per_token();
  auto cache_or = LatentKvCache::Create(kLayout, 10 * per_token + 17);
  ASSERT_TRUE(cache_or.ok()) << cache_or.status();
  LatentKvCache cache = std::move(*cache_or);
  EXPECT_EQ(cache.free_tokens(), 10);

  auto a = cache.AddSequence(6);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(cache.used_bytes(), 6 * per_token);
  EXPECT_EQ(cache.free_tokens(), 4);
  auto b = cache.AddSequence(5);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(b.status().message(), HasSubstr("4 tokens still fit"));
  auto c = cache.AddSequence(4);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(*a, *c);
  EXPECT_EQ(cache.n_sequences(), 2);

  ASSERT_NE(cache.Find(*a), nullptr);
  EXPECT_EQ(cache.Find(*a)->capacity(), 6);
  EXPECT_EQ(cache.Find(12345), nullptr);

  ASSERT_TRUE(cache.FreeSequence(*a).ok());
  EXPECT_EQ(cache.Find(*a), nullptr);
  EXPECT_EQ(cache.FreeSequence(*a).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache.used_bytes(), 4 * per_token);
  EXPECT_TRUE(cache.AddSequence(6).ok());  // the freed bytes are reusable
}

TEST(LatentKvCacheTest, BudgetBelowOneToken) {
  const auto cache = LatentKvCache::Create(kLayout, kLayout.bytes_per_token() - 1);
  EXPECT_EQ(cache.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(cache.status().message(), HasSubstr("below one token"));
}

}  // namespace
}  // namespace ktx::kv_cache
