// File: actors/service/node_server.h
//
// The gRPC server of one ktx node: one grpc::Server on one address, secured
// by rpc::RpcSecurity (TLS credentials, message-size limits; handlers check
// the token themselves), with the services the node registers, the standard
// health service (grpc.health.v1: overall "" and one status per registered
// service; open without a token, for probes) and server reflection (the
// schemas, for grpcurl). Port 0 picks a free port; port() tells which.
//
//   NodeServerOptions options;
//   options.address = node.listen_address();
//   options.allow_remote = !topology::IsLoopbackHost(host);  // the topology asked for it
//   options.security = security;
//   NodeServer server(options);
//   server.AddService(generation.get(), GenerationService::kServiceName, generation.get());
//   server.AddService(control.get(), NodeControlService::kServiceName);
//   server.AddService(shard_host->service(), "ktx.v1.ExpertShard");
//   KTX_RETURN_IF_ERROR(server.Start());
//   ...  on SIGTERM:
//   server.BeginDrain();                       // refuse new Generate calls, health NOT_SERVING
//   server.WaitIdle(std::chrono::seconds(30)); // in-flight calls finish
//   server.Shutdown(std::chrono::seconds(5));  // cancel what is left, stop
//
// Threads: gRPC's synchronous server runs every call in progress on a thread
// of its own pool; options.max_threads bounds that pool through a
// grpc::ResourceQuota (a call that finds no thread fails RESOURCE_EXHAUSTED),
// and GenerationServiceOptions::max_concurrent bounds Generate calls below it.
//
// Ownership: the NodeServer owns the grpc::Server; it borrows the services,
// which must outlive it (or at least its Shutdown). Thread-safety: AddService
// and Start from one thread before serving; everything else from any thread.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "actors/rpc/security.h"
#include "actors/service/drainable.h"
#include "grpcpp/server.h"

namespace ktx::service {

struct NodeServerOptions {
  std::string address = "127.0.0.1:0";  // host:port; port 0: any free port
  // A non-loopback host needs this (rpc::CheckBindAddress); ktx-node sets it
  // when the topology names a non-loopback listen address.
  bool allow_remote = false;
  rpc::RpcSecurity security;
  // Threads of the synchronous server (calls in progress plus pollers).
  int max_threads = 512;
  // Idle server threads kept waiting for calls (gRPC's sync server options):
  // a thread that ends a call while more than max_pollers wait exits, and a
  // busy server then starts new ones. Up to 64 idle threads avoid that
  // thread churn under a steady load of streams.
  int min_pollers = 1;
  int max_pollers = 64;
  // Streams one client connection may have open at once.
  int max_concurrent_streams_per_connection = 256;
};

class NodeServer {
 public:
  explicit NodeServer(NodeServerOptions options);
  ~NodeServer();  // Shutdown(0) if still running
  NodeServer(const NodeServer&) = delete;
  NodeServer& operator=(const NodeServer&) = delete;

  // Registers `service` under its full proto name (for health). `drainable`
  // (may be the service itself) is drained by BeginDrain. Before Start only.
  void AddService(grpc::Service* service, std::string name, Drainable* drainable = nullptr);

  // Binds and starts serving. Errors: InvalidArgument for a bad or
  // non-loopback address (without allow_remote) or bad TLS material;
  // Unavailable when the address cannot be bound (in use, no such host).
  absl::Status Start();

  int port() const { return port_; }
  // "host:port" with the bound port (what a client dials).
  std::string address() const;
  bool running() const;

  // Health of one registered service (or "" for the whole server).
  void SetServing(const std::string& service_name, bool serving);
  // Every Drainable refuses new calls; health becomes NOT_SERVING for every
  // service. Idempotent.
  void BeginDrain();
  bool draining() const;
  // Calls in flight over the Drainables.
  int in_flight() const;
  // True once every Drainable is idle; false when `timeout` passed first.
  bool WaitIdle(std::chrono::milliseconds timeout);
  // Stops accepting calls, waits up to `deadline` for the calls in progress,
  // cancels the rest and joins the server. Idempotent.
  void Shutdown(std::chrono::milliseconds deadline);

 private:
  struct Entry {
    grpc::Service* service;
    std::string name;
    Drainable* drainable;
  };
  const NodeServerOptions options_;
  std::vector<Entry> entries_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  mutable std::mutex mu_;  // guards draining_, shut_down_
  bool draining_ = false;
  bool shut_down_ = false;
};

}  // namespace ktx::service
