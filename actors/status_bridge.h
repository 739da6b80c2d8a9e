// File: actors/status_bridge.h
//
// The one place where ktx's error vocabulary (absl::Status) meets the actor
// system (caf::error) and RPC (grpc::Status). Message handlers return
// caf::result<T> built from ToCafError(status); gRPC handlers return
// ToGrpcStatus(status); whatever comes back from CAF or gRPC is turned into an
// absl::Status with FromCafError / FromGrpcStatus before host code looks at it.
// absl::StatusCode and grpc::StatusCode share their numbering, so codes are
// preserved exactly in every direction; messages too.
//
// caf::error encoding: category atom "ktx", code = absl::StatusCode value,
// context = one std::string with the message. CAF's own system errors
// (category "system", caf::sec) and exit reasons (category "exit") map to the
// nearest canonical code, keeping CAF's text.
// Thread-safe: pure functions.
#pragma once

#include "absl/status/status.h"

namespace caf {
class error;
}
namespace grpc {
class Status;
}

namespace ktx {

caf::error ToCafError(const absl::Status& status);
absl::Status FromCafError(const caf::error& error);

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace ktx
