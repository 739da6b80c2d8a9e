#include "actors/status_bridge.h"

#include <string>

#include "caf/atom.hpp"
#include "caf/error.hpp"
#include "caf/exit_reason.hpp"
#include "caf/make_message.hpp"
#include "caf/message.hpp"
#include "caf/sec.hpp"
#include "grpcpp/support/status.h"

namespace ktx {
namespace {

constexpr caf::atom_value kKtxCategory = caf::atom("ktx");

absl::StatusCode CodeForSec(caf::sec sec) {
  switch (sec) {
    case caf::sec::request_timeout:
    case caf::sec::connection_timeout: return absl::StatusCode::kDeadlineExceeded;
    case caf::sec::request_receiver_down:
    case caf::sec::cannot_connect_to_node:
    case caf::sec::no_route_to_receiving_node:
    case caf::sec::socket_disconnected:
    case caf::sec::cannot_forward_to_invalid_actor: return absl::StatusCode::kUnavailable;
    case caf::sec::unexpected_message:
    case caf::sec::unexpected_response: return absl::StatusCode::kInternal;
    case caf::sec::feature_disabled: return absl::StatusCode::kUnimplemented;
    default: return absl::StatusCode::kUnknown;
  }
}

}  // namespace

caf::error ToCafError(const absl::Status& status) {
  if (status.ok()) return caf::error{};
  return caf::error(static_cast<uint8_t>(status.code()), kKtxCategory,
                    caf::make_message(std::string(status.message())));
}

absl::Status FromCafError(const caf::error& error) {
  if (!error) return absl::OkStatus();
  if (error.category() == kKtxCategory) {
    std::string message;
    const caf::message& ctx = error.context();
    if (ctx.size() == 1 && ctx.match_element<std::string>(0)) message = ctx.get_as<std::string>(0);
    const int code = error.code();
    if (code <= 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
      return absl::UnknownError("caf error with invalid ktx code " + std::to_string(code) + ": " +
                                message);
    }
    return absl::Status(static_cast<absl::StatusCode>(code), message);
  }
  const std::string text = caf::to_string(error);
  if (error.category() == caf::atom("system")) {
    return absl::Status(CodeForSec(static_cast<caf::sec>(error.code())), "actor system: " + text);
  }
  if (error.category() == caf::atom("exit")) {
    return absl::UnavailableError("actor exited: " + text);
  }
  return absl::UnknownError(text);
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  const int code = static_cast<int>(status.error_code());
  if (code <= 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    return absl::UnknownError("grpc status with invalid code " + std::to_string(code) + ": " +
                              status.error_message());
  }
  return absl::Status(static_cast<absl::StatusCode>(code), status.error_message());
}

}  // namespace ktx
