// remote_shard_benchmark: what an expert shard on another node costs per MoE
// layer, against the same shard in process.
//
// One MoE layer's routed experts for a decode batch (1 or 16 tokens) on ONE
// shard holding every expert, driven the way the attention actor drives it: a
// driver actor sends MoeWork to the router and adds the partial sums it gets
// back; timed inside the driver from the send to the end of the sum (manual
// time). The shard is either
//   inproc    an expert shard actor with its CpuArena (the in-process path),
//   remote    a proxy actor -> RemoteNode (one bidirectional stream) -> gRPC
//             over 127.0.0.1 -> ShardHost in this process -> the shard's
//             CpuArena -> back; f32 or bf16 hidden states on the wire, f32
//             partial sums back.
// Layers:
//   dsv3_null  DeepSeek-V3's MoE tensor sizes (n_embd 7168, 256 experts, 8 per
//              token) with a backend that returns zeros at once: only
//              transport and hand-offs are measured. Batch 16 moves 458 KiB
//              (f32) or 229 KiB (bf16) of hidden states out and 458 KiB back.
//   tiny       the reference expert path on the bf16 fixture (n_embd 256, 4 of
//              16 experts): small real matmuls.
// Floor: BM_StreamEcho, a raw Compute stream round trip of an empty request
// (the ShardHost answers it at once: no arena hop), over the same loopback.
// docs/performance.md ("Remote shards") records the results.
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "actors/cpu_arena.h"
#include "actors/expert_shard_actor.h"
#include "actors/messages.h"
#include "actors/remote/remote_node.h"
#include "actors/remote/remote_shard_actor.h"
#include "actors/remote/shard_host.h"
#include "actors/remote/topology_shards.h"
#include "actors/router_actor.h"
#include "actors/shard_experts.h"
#include "benchmark/benchmark.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/actor_system_config.hpp"
#include "caf/duration.hpp"
#include "caf/exit_reason.hpp"
#include "caf/scoped_actor.hpp"
#include "caf/send.hpp"
#include "caf/stateful_actor.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "caf/typed_response_promise.hpp"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "ktx/v1/shard.grpc.pb.h"
#include "runtime/gguf/fingerprint.h"
#include "runtime/models/deepseek2.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kMoeLayer = 1;

enum class Where { kInProcess, kRemoteF32, kRemoteBf16 };

std::shared_ptr<const models::Deepseek2Model> TinyModel() {
  static std::shared_ptr<const models::Deepseek2Model> model = [] {
    auto m = models::Deepseek2Model::Open(std::string(KTX_SOURCE_DIR) +
                                          "/tests/data/dsv3-tiny-bf16.gguf");
    if (!m.ok()) return std::shared_ptr<const models::Deepseek2Model>();
    return std::shared_ptr<const models::Deepseek2Model>(std::move(*m));
  }();
  return model;
}

// DeepSeek-V3's MoE shape: one dense layer, one MoE layer.
models::Deepseek2Hparams Dsv3Shape() {
  models::Deepseek2Hparams hp;
  hp.n_layer = 2;
  hp.n_layer_dense_lead = 1;
  hp.n_expert = 256;
  hp.n_expert_used = 8;
  hp.n_embd = 7168;
  return hp;
}

class NullBackend final : public models::ExpertBackend {
 public:
  explicit NullBackend(int64_t n_embd) : n_embd_(n_embd) {}
  absl::Status Compute(int, const models::Activations& h, const models::Routing&,
                       std::span<const uint8_t>, models::Activations* out) override {
    out->Resize(h.n_tokens(), n_embd_);
    return absl::OkStatus();
  }

 private:
  int64_t n_embd_;
};

// One shard holding every expert of the MoE layer.
topology::PlacementPlan OneShardPlan(const models::Deepseek2Hparams& hp) {
  topology::ModelExpertTable table;
  table.n_layer = hp.n_layer;
  table.layers.resize(hp.n_layer);
  for (int il = 0; il < hp.n_layer; ++il) {
    if (hp.IsMoeLayer(il)) table.layers[il] = {true, hp.n_expert, 1};
  }
  return *topology::PlanExpertPlacement(table, {{"node1/s0", topology::kNoBudget}});
}

MoeWork MakeWork(int batch, const models::Deepseek2Hparams& hp) {
  std::mt19937 rng(1234 + batch);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  models::Activations h(batch, hp.n_embd);
  for (int64_t i = 0; i < batch * hp.n_embd; ++i) h.data()[i] = uniform(rng);
  MoeWork work;
  work.il = kMoeLayer;
  work.h = Tensor::Wrap(std::move(h));
  work.n_expert_used = hp.n_expert_used;
  for (int t = 0; t < batch; ++t) {
    std::vector<int> experts(hp.n_expert);
    for (int e = 0; e < hp.n_expert; ++e) experts[e] = e;
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int j = 0; j < hp.n_expert_used; ++j) {
      work.expert_ids.push_back(experts[j]);
      work.weights.push_back(1.0f / hp.n_expert_used);
    }
  }
  return work;
}

using run_atom = caf::atom_constant<caf::atom("run")>;
using driver_actor = caf::typed_actor<caf::replies_to<run_atom>::with<int64_t>>;

struct DriverState {
  static inline const char* name = "bench.driver";
};

// Sends the layer to the router, adds the partials (as the attention actor
// does), replies the nanoseconds (-1 on failure).
driver_actor::behavior_type Driver(driver_actor::stateful_pointer<DriverState> self,
                                   router_actor router, MoeWork work) {
  return {
      [=](run_atom) -> caf::typed_response_promise<int64_t> {
        auto promise = self->make_response_promise<int64_t>();
        const Clock::time_point start = Clock::now();
        const int64_t n = work.h.n_rows();
        const int64_t n_embd = work.h.n_cols();
        self->request(router, caf::infinite, moe_atom::value, work)
            .then(
                [=](MoeResult& result) mutable {
                  if (result.code != 0) {
                    promise.deliver(int64_t{-1});
                    return;
                  }
                  std::vector<double> acc(static_cast<size_t>(n * n_embd), 0.0);
                  for (const PlacedPartial& p : result.parts) {
                    for (size_t j = 0; j < p.rows.size(); ++j) {
                      const float* src = p.partial->row(static_cast<int64_t>(j));
                      double* dst = acc.data() + static_cast<int64_t>(p.rows[j]) * n_embd;
                      for (int64_t c = 0; c < n_embd; ++c) dst[c] += src[c];
                    }
                  }
                  benchmark::DoNotOptimize(acc.data());
                  promise.deliver(static_cast<int64_t>(
                      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start)
                          .count()));
                },
                [=](caf::error&) mutable { promise.deliver(int64_t{-1}); });
        return promise;
      },
  };
}

void ServeOn(ShardHost* host, std::unique_ptr<grpc::Server>* server, int* port) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), port);
  rpc::ApplyServerLimits(rpc::RpcSecurity(), &builder);
  builder.RegisterService(host->service());
  *server = builder.BuildAndStart();
}

void BM_MoeLayer(benchmark::State& state, bool dsv3_null, Where where) {
  std::shared_ptr<const models::Deepseek2Model> model;
  models::Deepseek2Hparams hp;
  if (dsv3_null) {
    hp = Dsv3Shape();
  } else {
    model = TinyModel();
    if (!model) {
      state.SkipWithError("cannot open tests/data/dsv3-tiny-bf16.gguf");
      return;
    }
    hp = model->hparams();
  }
  const int batch = static_cast<int>(state.range(0));
  const topology::PlacementPlan plan = OneShardPlan(hp);
  const std::vector<HeldExperts> held = HeldByShard(plan, hp);
  ExpertBackendFactory factory =
      dsv3_null
          ? ExpertBackendFactory([n_embd = hp.n_embd](int, const HeldExperts&)
                                     -> absl::StatusOr<std::shared_ptr<models::ExpertBackend>> {
              return std::make_shared<NullBackend>(n_embd);
            })
          : MappedExpertBackendFactory(model);
  const std::string fingerprint = model ? gguf::ModelFingerprint(model->file()) : "dsv3-shape";
  std::vector<ShardOptions> shards(1);
  shards[0].name = "node1/s0";

  // The shard's side: in process, or a ShardHost behind a loopback server.
  std::unique_ptr<CpuArena> arena;
  std::shared_ptr<ShardExperts> experts;
  std::unique_ptr<ShardHost> host;
  std::unique_ptr<grpc::Server> server;
  std::shared_ptr<RemoteNode> node;
  if (where == Where::kInProcess) {
    arena = *CpuArena::Create({"node1/s0", {}, 0});
    experts = *ShardExperts::Create(0, "node1/s0", hp.n_expert, held[0], *factory(0, held[0]));
  } else {
    ShardHostOptions options;
    options.expert_backend_factory = factory;
    auto made = ShardHost::CreateWithPlan(hp, fingerprint, "node1", shards, plan, {0}, options);
    if (!made.ok()) {
      state.SkipWithError(std::string(made.status().message()).c_str());
      return;
    }
    host = std::move(*made);
    int port = 0;
    ServeOn(host.get(), &server, &port);
    if (server == nullptr || port == 0) {
      state.SkipWithError("cannot serve on 127.0.0.1");
      return;
    }
    RemoteNodeOptions options_node;
    options_node.node = "node1";
    options_node.address = "127.0.0.1:" + std::to_string(port);
    options_node.fingerprint = fingerprint;
    options_node.shards.push_back({"node1/s0", 0, held[0]});
    options_node.wire_dtype = where == Where::kRemoteBf16 ? WireDtype::kBf16 : WireDtype::kF32;
    options_node.n_embd = hp.n_embd;
    auto remote = RemoteNode::Create(options_node);
    if (!remote.ok()) {
      state.SkipWithError(std::string(remote.status().message()).c_str());
      return;
    }
    node = std::move(*remote);
    node->Start();
    if (!node->WaitConnected(Clock::now() + std::chrono::seconds(10)).ok()) {
      state.SkipWithError("the remote node did not connect");
      return;
    }
  }

  caf::actor_system_config cfg;
  ConfigureActorSystem(cfg, 2);
  {
    caf::actor_system system{cfg};
    expert_shard_actor shard;
    if (where == Where::kInProcess) {
      ExpertShardConfig config;
      config.index = 0;
      config.name = "node1/s0";
      config.experts = experts;
      config.arena = arena.get();
      shard = SpawnExpertShard(system, std::move(config));
    } else {
      shard = SpawnRemoteShard(system, RemoteShardConfig{0, "node1/s0", node});
    }
    RouterConfig rc;
    rc.shards = {shard};
    rc.names = {"node1/s0"};
    rc.holders.resize(hp.n_layer);
    rc.holders[kMoeLayer] = plan.layers[kMoeLayer].shards_of_expert;
    rc.n_expert = hp.n_expert;
    rc.shard_deadline = std::chrono::seconds(10);
    router_actor router = SpawnRouter(system, std::move(rc));
    driver_actor driver = system.spawn(Driver, router, MakeWork(batch, hp));
    {
      caf::scoped_actor self{system};
      for (auto _ : state) {
        int64_t ns = -1;
        self->request(driver, std::chrono::seconds(20), run_atom::value)
            .receive([&](int64_t value) { ns = value; }, [&](caf::error&) {});
        if (ns < 0) {
          state.SkipWithError("MoE request failed");
          break;
        }
        state.SetIterationTime(static_cast<double>(ns) * 1e-9);
      }
    }
    caf::anon_send_exit(driver, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(router, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(shard, caf::exit_reason::user_shutdown);
    system.await_all_actors_done();
    node.reset();
    arena.reset();
  }
  if (server) server->Shutdown(std::chrono::system_clock::now());
  const double out_bytes =
      where == Where::kRemoteBf16 ? 2.0 * batch * hp.n_embd : 4.0 * batch * hp.n_embd;
  state.counters["wire_KiB"] =
      where == Where::kInProcess ? 0.0 : (out_bytes + 4.0 * batch * hp.n_embd) / 1024.0;
}

// A raw Compute stream round trip that the host answers without an arena hop.
void BM_StreamEcho(benchmark::State& state) {
  const models::Deepseek2Hparams hp = Dsv3Shape();
  const topology::PlacementPlan plan = OneShardPlan(hp);
  std::vector<ShardOptions> shards(1);
  shards[0].name = "node1/s0";
  ShardHostOptions options;
  options.expert_backend_factory =
      [](int, const HeldExperts&) -> absl::StatusOr<std::shared_ptr<models::ExpertBackend>> {
    return std::make_shared<NullBackend>(7168);
  };
  auto host = ShardHost::CreateWithPlan(hp, "x", "node1", shards, plan, {0}, options);
  if (!host.ok()) {
    state.SkipWithError(std::string(host.status().message()).c_str());
    return;
  }
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  ServeOn(host->get(), &server, &port);
  if (server == nullptr || port == 0) {
    state.SkipWithError("cannot serve on 127.0.0.1");
    return;
  }
  auto stub = ktx::v1::ExpertShard::NewStub(grpc::CreateCustomChannel(
      "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials(),
      rpc::ChannelArgs(rpc::RpcSecurity())));
  {
    grpc::ClientContext context;
    auto stream = stub->Compute(&context);
    const ktx::v1::ComputeRequest empty;
    ktx::v1::ComputeResponse response;
    for (auto _ : state) {
      if (!stream->Write(empty) || !stream->Read(&response)) {
        state.SkipWithError("stream failed");
        break;
      }
    }
    stream->WritesDone();
    (void)stream->Finish();
  }
  server->Shutdown(std::chrono::system_clock::now());
}

BENCHMARK(BM_StreamEcho);

void Args(benchmark::internal::Benchmark* b) {
  b->Arg(1)->Arg(16)->ArgName("batch")->UseManualTime();
}

BENCHMARK_CAPTURE(BM_MoeLayer, dsv3_null_inproc, true, Where::kInProcess)->Apply(Args);
BENCHMARK_CAPTURE(BM_MoeLayer, dsv3_null_remote_f32, true, Where::kRemoteF32)->Apply(Args);
BENCHMARK_CAPTURE(BM_MoeLayer, dsv3_null_remote_bf16, true, Where::kRemoteBf16)->Apply(Args);
BENCHMARK_CAPTURE(BM_MoeLayer, tiny_inproc, false, Where::kInProcess)->Apply(Args);
BENCHMARK_CAPTURE(BM_MoeLayer, tiny_remote_f32, false, Where::kRemoteF32)->Apply(Args);

// The console reporter, counting runs that ended in an error (SkipWithError),
// so that the ctest smoke run fails when the remote path does.
class CountingReporter final : public benchmark::ConsoleReporter {
 public:
  CountingReporter() : ConsoleReporter(OO_None) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) failures_ += run.error_occurred ? 1 : 0;
    ConsoleReporter::ReportRuns(runs);
  }
  int failures() const { return failures_; }

 private:
  int failures_ = 0;
};

}  // namespace
}  // namespace ktx::actors

// Exit status 1 when no benchmark matched the filter or one failed.
int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  ktx::actors::CountingReporter reporter;
  const size_t n = benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  if (n == 0) {
    std::fprintf(stderr, "remote_shard_benchmark: no benchmark matched the filter\n");
    return 1;
  }
  if (reporter.failures() > 0) {
    std::fprintf(stderr, "remote_shard_benchmark: %d benchmark(s) failed\n", reporter.failures());
    return 1;
  }
  return 0;
}
