// File: actors/service/node_api.cc
#include "actors/service/node_api.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"

namespace ktx::service {

absl::StatusOr<std::unique_ptr<NodeApi>> NodeApi::Start(NodeApiOptions options) {
  std::unique_ptr<NodeApi> api(new NodeApi());
  api->server_ = std::make_unique<NodeServer>(options.server);
  if (options.engine != nullptr) {
    GenerationServiceOptions generation = options.generation;
    generation.security = options.server.security;
    KTX_ASSIGN_OR_RETURN(api->generation_,
                         GenerationService::Create(options.engine, std::move(generation)));
  }
  NodeControlOptions control;
  control.security = options.server.security;
  control.node_name = options.node_name;
  control.role = options.engine != nullptr ? ktx::v1::NODE_ROLE_HEAD : ktx::v1::NODE_ROLE_SHARD;
  control.engine = options.engine;
  control.generation = api->generation_.get();
  control.server = api->server_.get();
  control.topology_path = options.topology_path;
  control.shard_locations = std::move(options.shard_locations);
  control.add_status = std::move(options.add_status);
  control.plan_from_topology = std::move(options.plan_from_topology);
  control.on_drain = std::move(options.on_drain);
  KTX_ASSIGN_OR_RETURN(api->control_, NodeControlService::Create(std::move(control)));

  if (api->generation_ != nullptr) {
    api->server_->AddService(api->generation_.get(), GenerationService::kServiceName,
                             api->generation_.get());
  }
  api->server_->AddService(api->control_.get(), NodeControlService::kServiceName);
  for (auto& [service, name] : options.extra_services) {
    if (service == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("NodeApi: extra service '", name, "' is null"));
    }
    api->server_->AddService(service, name);
  }
  KTX_RETURN_IF_ERROR(api->server_->Start());
  return api;
}

NodeApi::~NodeApi() {
  if (server_ != nullptr) server_->Shutdown(std::chrono::milliseconds(0));
  server_.reset();  // no call runs now: the services can go
  control_.reset();
  generation_.reset();
}

bool NodeApi::DrainAndStop(std::chrono::milliseconds grace,
                           std::chrono::milliseconds stop_deadline) {
  server_->BeginDrain();
  const bool idle = server_->WaitIdle(grace);
  if (!idle) {
    KTX_LOG(WARNING, "service") << server_->in_flight() << " calls still running after the "
                                << grace.count() << " ms drain; cancelling them";
  }
  server_->Shutdown(stop_deadline);
  return idle;
}

}  // namespace ktx::service
