// File: tests/actors/remote/remote_test_util.h
//
// Shared by the remote-shard tests and benchmark: a gRPC server on loopback
// (port 0, or a given address to come back on after a restart) serving one
// service with ktx's security settings, and a random MoE batch.
#pragma once

#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "actors/rpc/security.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "runtime/models/activations.h"
#include "runtime/models/moe.h"

namespace ktx::actors::testing {

struct TestServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  std::string address;  // "127.0.0.1:<port>"
};

// Serves `service` on `address` ("127.0.0.1:0": a free port). server is null
// when binding failed.
inline TestServer StartServer(grpc::Service* service, const rpc::RpcSecurity& security,
                              const std::string& address = "127.0.0.1:0") {
  TestServer out;
  auto credentials = rpc::MakeServerCredentials(security);
  EXPECT_TRUE(credentials.ok()) << credentials.status();
  if (!credentials.ok()) return out;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, *credentials, &out.port);
  rpc::ApplyServerLimits(security, &builder);
  builder.RegisterService(service);
  out.server = builder.BuildAndStart();
  if (out.server == nullptr || out.port == 0) {
    out.server.reset();
    return out;
  }
  out.address = "127.0.0.1:" + std::to_string(out.port);
  return out;
}

// A batch of `n_rows` tokens, F32 [n_rows, n_embd] with values in [-1, 1),
// each token routed to k distinct experts of [0, n_expert) with positive
// weights.
struct RandomBatch {
  models::Activations h;
  models::Routing routing;
};

inline RandomBatch MakeRandomBatch(int64_t n_rows, int64_t n_embd, int n_expert, int k,
                                   uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  RandomBatch b;
  b.h.Resize(n_rows, n_embd);
  for (int64_t i = 0; i < n_rows * n_embd; ++i) b.h.data()[i] = uniform(rng);
  b.routing.n_tokens = n_rows;
  b.routing.n_expert_used = k;
  for (int64_t t = 0; t < n_rows; ++t) {
    std::vector<int> experts(n_expert);
    for (int e = 0; e < n_expert; ++e) experts[e] = e;
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int j = 0; j < k; ++j) {
      b.routing.expert_ids.push_back(experts[j]);
      b.routing.weights.push_back(0.1f + 0.2f * static_cast<float>(j));
    }
  }
  return b;
}

}  // namespace ktx::actors::testing
