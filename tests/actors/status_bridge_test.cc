#include "actors/status_bridge.h"

#include "caf/atom.hpp"
#include "caf/error.hpp"
#include "caf/sec.hpp"
#include "grpcpp/support/status.h"
#include "gtest/gtest.h"

namespace ktx {
namespace {

class StatusBridgeTest : public testing::TestWithParam<int> {};

TEST_P(StatusBridgeTest, RoundTripsThroughCafAndGrpc) {
  const auto code = static_cast<absl::StatusCode>(GetParam());
  const absl::Status original(code, "shard 'numa1' is gone: expected 8 experts");
  const caf::error caf_error = ToCafError(original);
  EXPECT_EQ(static_cast<bool>(caf_error), !original.ok());
  EXPECT_EQ(FromCafError(caf_error), original);

  const grpc::Status grpc_status = ToGrpcStatus(original);
  EXPECT_EQ(static_cast<int>(grpc_status.error_code()), GetParam());
  EXPECT_EQ(FromGrpcStatus(grpc_status), original);
  // Across both bridges: absl -> caf -> absl -> grpc -> absl.
  EXPECT_EQ(FromGrpcStatus(ToGrpcStatus(FromCafError(caf_error))), original);
}

// Every canonical code, OK (0) through UNAUTHENTICATED (16).
INSTANTIATE_TEST_SUITE_P(AllCodes, StatusBridgeTest, testing::Range(0, 17));

TEST(StatusBridgeTest, OkHasNoMessage) {
  EXPECT_FALSE(ToCafError(absl::OkStatus()));
  EXPECT_TRUE(FromCafError(caf::error{}).ok());
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
}

TEST(StatusBridgeTest, CafSystemErrorsMapToCanonicalCodes) {
  EXPECT_EQ(FromCafError(caf::make_error(caf::sec::request_timeout)).code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(FromCafError(caf::make_error(caf::sec::request_receiver_down)).code(),
            absl::StatusCode::kUnavailable);
  const absl::Status other = FromCafError(caf::error(7, caf::atom("alien")));
  EXPECT_EQ(other.code(), absl::StatusCode::kUnknown);
}

TEST(StatusBridgeTest, InvalidCodesBecomeUnknown) {
  EXPECT_EQ(FromCafError(caf::error(99, caf::atom("ktx"))).code(), absl::StatusCode::kUnknown);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(static_cast<grpc::StatusCode>(42), "x")).code(),
            absl::StatusCode::kUnknown);
}

}  // namespace
}  // namespace ktx
