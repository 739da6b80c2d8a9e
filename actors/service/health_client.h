// File: actors/service/health_client.h
//
// A client of the standard gRPC health service (grpc.health.v1.Health/Check)
// that NodeServer runs: open without a token, so probes and `ktx-ctl status`
// can tell whether a node serves even when they hold no token. The two tiny
// messages are encoded by hand (HealthCheckRequest{string service = 1},
// HealthCheckResponse{ServingStatus status = 1}), so no generated code is
// needed.
//
//   KTX_ASSIGN_OR_RETURN(HealthState state,
//                        CheckHealth(*channel, "ktx.v1.Generation", std::chrono::seconds(5)));
//
// Thread-safety: thread-safe (one call per invocation).
#pragma once

#include <chrono>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/channel.h"

namespace ktx::service {

// grpc.health.v1.HealthCheckResponse.ServingStatus.
enum class HealthState { kUnknown = 0, kServing = 1, kNotServing = 2, kServiceUnknown = 3 };

const char* HealthStateName(HealthState state);  // "SERVING", "NOT_SERVING", ...

// The health of `service` ("" = the whole server). Errors: the call's status
// (UNAVAILABLE when the server cannot be reached in time, NOT_FOUND for a
// service the server does not know, ...).
absl::StatusOr<HealthState> CheckHealth(grpc::Channel& channel, const std::string& service,
                                        std::chrono::milliseconds timeout);

}  // namespace ktx::service
