#include "runtime/base/status.h"

#include "gtest/gtest.h"

namespace ktx {
namespace {

absl::Status FailIf(bool fail) {
  return fail ? absl::InvalidArgumentError("bad thing") : absl::OkStatus();
}

absl::StatusOr<int> Half(int x) {
  if (x % 2 != 0) return absl::InvalidArgumentError("odd");
  return x / 2;
}

absl::Status Chain(bool fail, int* calls) {
  KTX_RETURN_IF_ERROR(FailIf(fail));
  ++*calls;
  return absl::OkStatus();
}

absl::StatusOr<int> Quarter(int x) {
  KTX_ASSIGN_OR_RETURN(int half, Half(x));
  KTX_ASSIGN_OR_RETURN(const int quarter, Half(half));
  return quarter;
}

TEST(StatusMacrosTest, ReturnIfErrorStopsOnError) {
  int calls = 0;
  EXPECT_TRUE(Chain(false, &calls).ok());
  EXPECT_EQ(calls, 1);
  const absl::Status s = Chain(true, &calls);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "bad thing");
  EXPECT_EQ(calls, 1);
}

TEST(StatusMacrosTest, AssignOrReturn) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(6).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Quarter(3).status().message(), "odd");
}

TEST(CheckDeathTest, CheckAbortsWithCondition) {
  EXPECT_DEATH(KTX_CHECK_MSG(1 + 1 == 3, "arithmetic"), "1 \\+ 1 == 3.*arithmetic");
}

}  // namespace
}  // namespace ktx
