// File: actors/service/health_client.cc
#include "actors/service/health_client.h"

#include <future>
#include <string>

#include "absl/strings/str_cat.h"
#include "actors/status_bridge.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"

namespace ktx::service {
namespace {

void AppendVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// Field 1 (varint) of a HealthCheckResponse; fields it does not know are
// skipped as protobuf's wire format allows.
absl::StatusOr<HealthState> ParseResponse(const std::string& bytes) {
  size_t i = 0;
  auto varint = [&](uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64 && i < bytes.size(); shift += 7) {
      const uint8_t b = static_cast<uint8_t>(bytes[i++]);
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  };
  HealthState state = HealthState::kUnknown;
  while (i < bytes.size()) {
    uint64_t key = 0, value = 0;
    if (!varint(&key)) break;
    const int wire = static_cast<int>(key & 7);
    if (wire == 0) {
      if (!varint(&value)) break;
      if ((key >> 3) == 1) state = static_cast<HealthState>(value <= 3 ? value : 0);
    } else if (wire == 2) {
      if (!varint(&value) || value > bytes.size() - i) break;
      i += value;
    } else if (wire == 5) {
      i += 4;
    } else if (wire == 1) {
      i += 8;
    } else {
      break;
    }
    if (i > bytes.size()) break;
  }
  if (i != bytes.size()) {
    return absl::DataLossError("grpc.health.v1.Health/Check: malformed response");
  }
  return state;
}

}  // namespace

const char* HealthStateName(HealthState state) {
  switch (state) {
    case HealthState::kServing: return "SERVING";
    case HealthState::kNotServing: return "NOT_SERVING";
    case HealthState::kServiceUnknown: return "SERVICE_UNKNOWN";
    case HealthState::kUnknown: break;
  }
  return "UNKNOWN";
}

absl::StatusOr<HealthState> CheckHealth(grpc::Channel& channel, const std::string& service,
                                        std::chrono::milliseconds timeout) {
  std::string request;
  if (!service.empty()) {
    request.push_back(0x0a);  // field 1, length-delimited
    AppendVarint(service.size(), &request);
    request += service;
  }
  grpc::Slice slice(request);
  grpc::ByteBuffer request_buffer(&slice, 1);
  grpc::ByteBuffer response_buffer;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  context.set_wait_for_ready(true);  // wait for a connection until the deadline
  grpc::GenericStub stub(std::shared_ptr<grpc::Channel>(&channel, [](grpc::Channel*) {}));
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request_buffer,
                 &response_buffer, [&done](grpc::Status status) { done.set_value(status); });
  const grpc::Status status = done.get_future().get();
  if (!status.ok()) return FromGrpcStatus(status);
  std::vector<grpc::Slice> slices;
  if (!response_buffer.Dump(&slices).ok()) {
    return absl::DataLossError("grpc.health.v1.Health/Check: unreadable response");
  }
  std::string bytes;
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return ParseResponse(bytes);
}

}  // namespace ktx::service
