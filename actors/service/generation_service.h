// File: actors/service/generation_service.h
//
// The ktx.v1.Generation gRPC service (proto/ktx/v1/generation.proto) over an
// actors::Engine: Generate streams the tokens of one engine request, Tokenize
// and Detokenize use the model's tokenizer, ListModels describes the model.
// It runs on gRPC's synchronous server (one server thread per call in
// progress; NodeServer bounds the threads): a Generate call submits the
// request with Engine::GenerateAsync, whose callbacks only queue events, and
// the call's thread writes them to the stream. While waiting it looks at the
// call every `cancel_poll` for a client that went away (cancellation, broken
// stream, deadline): then it cancels the engine request, which frees its KV
// cache, and returns CANCELLED (DEADLINE_EXCEEDED for a deadline).
//
//   GenerationServiceOptions options;
//   options.security = security;            // the node's RpcSecurity (token)
//   KTX_ASSIGN_OR_RETURN(auto generation, GenerationService::Create(engine.get(), options));
//   server.AddService(generation.get(), GenerationService::kServiceName, generation.get());
//
// Every handler first checks the token (rpc::CheckToken), then draining, then
// the request (served_model.h: INVALID_ARGUMENT naming the field). Errors of
// the engine keep their code (RESOURCE_EXHAUSTED when a request can never fit
// the KV cache, UNAVAILABLE naming a shard that is down, ...).
//
// Draining (Drainable): after BeginDrain every new call fails UNAVAILABLE
// ("draining"); calls in flight run to their end; WaitIdle waits for them.
//
// Ownership: borrows the Engine, which must outlive the service and every
// call in it: shut the grpc::Server down (NodeServer::Shutdown) before
// destroying the service, and the service before the engine. Owns the
// ServedModel (tokenizer, chat template) and the counters.
// Thread-safety: every method may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "actors/engine.h"
#include "actors/rpc/security.h"
#include "actors/service/drainable.h"
#include "actors/service/served_model.h"
#include "ktx/v1/generation.grpc.pb.h"
#include "ktx/v1/node.pb.h"

namespace ktx::service {

struct GenerationServiceOptions {
  rpc::RpcSecurity security;  // token checked on every call
  // "deepseek-v3" / "deepseek-r1" to override the template recognised from
  // the GGUF (needed for models without tokenizer.chat_template).
  std::string chat_template;
  std::string model_name;   // empty: GGUF general.name, else the file name
  std::string fingerprint;  // reported by ListModels; empty: gguf::ModelFingerprint of the model
  RequestLimits limits;
  // Generate calls at once; beyond: RESOURCE_EXHAUSTED. Keep it below
  // NodeServerOptions::max_threads so that other calls still get a thread.
  int max_concurrent = 128;
  // How often a waiting Generate call checks whether its client went away.
  std::chrono::milliseconds cancel_poll{50};
  // After cancelling an engine request, how long to wait for its end before
  // returning anyway (the engine finishes it later on its own).
  std::chrono::milliseconds cancel_wait{10000};
};

// Counters of the Generate calls since the service started.
struct GenerationCounters {
  int in_flight = 0;
  int64_t completed = 0;
  int64_t failed = 0;
  int64_t cancelled = 0;
  int64_t tokens_generated = 0;
};

class GenerationService final : public ktx::v1::Generation::Service, public Drainable {
 public:
  static constexpr char kServiceName[] = "ktx.v1.Generation";

  // Errors: InvalidArgument for a null engine, bad options or an unknown
  // chat_template name.
  static absl::StatusOr<std::unique_ptr<GenerationService>> Create(
      actors::Engine* engine, GenerationServiceOptions options);

  grpc::Status Generate(grpc::ServerContext* context, const ktx::v1::GenerateRequest* request,
                        grpc::ServerWriter<ktx::v1::GenerateResponse>* writer) override;
  grpc::Status Tokenize(grpc::ServerContext* context, const ktx::v1::TokenizeRequest* request,
                        ktx::v1::TokenizeResponse* response) override;
  grpc::Status Detokenize(grpc::ServerContext* context, const ktx::v1::DetokenizeRequest* request,
                          ktx::v1::DetokenizeResponse* response) override;
  grpc::Status ListModels(grpc::ServerContext* context, const ktx::v1::ListModelsRequest* request,
                          ktx::v1::ListModelsResponse* response) override;

  // Drainable.
  void BeginDrain() override;
  bool draining() const override { return draining_.load(); }
  int in_flight() const override;
  bool WaitIdle(std::chrono::milliseconds timeout) override;

  GenerationCounters counters() const;
  // in_flight, running (KV sequences), queued and the counters.
  ktx::v1::RequestLoad Load() const;
  const ServedModel& served_model() const { return model_; }
  actors::Engine* engine() const { return engine_; }

 private:
  GenerationService(actors::Engine* engine, GenerationServiceOptions options, ServedModel model);
  // Token, then draining. `count`: a Generate call (counted in flight; the
  // caller must call EndCall exactly once when OK is returned).
  grpc::Status BeginCall(const grpc::ServerContext& context, bool count);
  void EndCall();
  grpc::Status Stream(grpc::ServerContext* context, actors::GenerateRequest request,
                      grpc::ServerWriter<ktx::v1::GenerateResponse>* writer,
                      std::chrono::steady_clock::time_point start);

  actors::Engine* const engine_;
  const GenerationServiceOptions options_;
  const ServedModel model_;
  std::atomic<bool> draining_{false};
  mutable std::mutex mu_;
  std::condition_variable idle_cv_;
  GenerationCounters counters_;  // guarded by mu_
};

}  // namespace ktx::service
