// File: actors/service/node_server.cc
#include "actors/service/node_server.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/resource_quota.h"
#include "grpcpp/server_builder.h"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"
#include "topology/config.h"

namespace ktx::service {

NodeServer::NodeServer(NodeServerOptions options) : options_(std::move(options)) {}

NodeServer::~NodeServer() { Shutdown(std::chrono::milliseconds(0)); }

void NodeServer::AddService(grpc::Service* service, std::string name, Drainable* drainable) {
  KTX_CHECK(server_ == nullptr);
  entries_.push_back({service, std::move(name), drainable});
}

absl::Status NodeServer::Start() {
  if (server_ != nullptr) return absl::FailedPreconditionError("NodeServer: already started");
  if (options_.max_threads < 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("NodeServer: max_threads = ", options_.max_threads, ", expected >= 4"));
  }
  // Port 0 (any free port) is fine for a server; the check wants 1..65535.
  std::string checked = options_.address;
  if (checked.size() >= 2 && checked.compare(checked.size() - 2, 2, ":0") == 0) {
    checked.back() = '1';
  }
  KTX_RETURN_IF_ERROR(rpc::CheckBindAddress(checked, options_.allow_remote));
  KTX_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                       rpc::MakeServerCredentials(options_.security));
  // Both are process-wide switches read when a server is built.
  static std::once_flag once;
  std::call_once(once, [] {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  });
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.address, credentials, &port_);
  rpc::ApplyServerLimits(options_.security, &builder);
  grpc::ResourceQuota quota(absl::StrCat("ktx-node ", options_.address));
  quota.SetMaxThreads(options_.max_threads);
  builder.SetResourceQuota(quota);
  builder.SetSyncServerOption(grpc::ServerBuilder::MIN_POLLERS, options_.min_pollers);
  builder.SetSyncServerOption(grpc::ServerBuilder::MAX_POLLERS, options_.max_pollers);
  // A port already in use is an error, not a second server sharing it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             options_.max_concurrent_streams_per_connection);
  for (const Entry& entry : entries_) builder.RegisterService(entry.service);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    return absl::UnavailableError(absl::StrCat("cannot listen on '", options_.address,
                                               "' (address in use, or not an address of this "
                                               "host)"));
  }
  if (grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService()) {
    health->SetServingStatus(true);
    for (const Entry& entry : entries_) health->SetServingStatus(entry.name, true);
  }
  KTX_LOG(INFO, "service") << "serving on " << address() << " ("
                           << (options_.security.tls() ? "mutual TLS" : "plaintext")
                           << (options_.security.token.empty() ? "" : ", token required") << ")";
  return absl::OkStatus();
}

std::string NodeServer::address() const {
  absl::StatusOr<topology::HostPort> host_port = topology::ParseListenAddress(options_.address);
  std::string host = host_port.ok() ? host_port->host : "127.0.0.1";
  if (host.find(':') != std::string::npos) host = absl::StrCat("[", host, "]");
  return absl::StrCat(host, ":", port_);
}

bool NodeServer::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return server_ != nullptr && !shut_down_;
}

void NodeServer::SetServing(const std::string& service_name, bool serving) {
  std::lock_guard<std::mutex> lock(mu_);
  if (server_ == nullptr || shut_down_) return;
  if (grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService()) {
    if (service_name.empty()) {
      health->SetServingStatus(serving);
    } else {
      health->SetServingStatus(service_name, serving);
    }
  }
}

void NodeServer::BeginDrain() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_) return;
    draining_ = true;
  }
  for (const Entry& entry : entries_) {
    if (entry.drainable != nullptr) entry.drainable->BeginDrain();
  }
  SetServing("", false);
  for (const Entry& entry : entries_) SetServing(entry.name, false);
  KTX_LOG(INFO, "service") << "draining: " << in_flight() << " calls in flight";
}

bool NodeServer::draining() const {
  std::lock_guard<std::mutex> lock(mu_);
  return draining_;
}

int NodeServer::in_flight() const {
  int n = 0;
  for (const Entry& entry : entries_) {
    if (entry.drainable != nullptr) n += entry.drainable->in_flight();
  }
  return n;
}

bool NodeServer::WaitIdle(std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (const Entry& entry : entries_) {
    if (entry.drainable == nullptr) continue;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    if (!entry.drainable->WaitIdle(std::max(left, std::chrono::milliseconds(0)))) return false;
  }
  return true;
}

void NodeServer::Shutdown(std::chrono::milliseconds deadline) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (server_ == nullptr || shut_down_) return;
    shut_down_ = true;
  }
  server_->Shutdown(std::chrono::system_clock::now() + deadline);
  server_->Wait();
  KTX_LOG(INFO, "service") << "server on " << address() << " stopped";
}

}  // namespace ktx::service
