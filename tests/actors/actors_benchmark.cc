// actors_benchmark: what the actor path costs per MoE layer, in process.
//
// One MoE layer's routed experts for a decode batch (1 or 16 tokens, K = 4 of
// the tiny fixture's 16 experts each, n_embd 256), over 1, 2 or 3 expert
// shards, computed two ways:
//   Direct  the shards' ShardExperts::Compute called one after another on the
//           calling thread, partial sums added (what a single-process engine
//           without actors does);
//   Actors  an event-based driver actor (standing in for the attention actor)
//           sends MoeWork to the router, which fans ExpertWork out to the shard
//           actors, each of which runs it as a job on its CpuArena and answers
//           through a response promise; the driver then adds the partials in
//           the router's fixed order. Timed inside the driver, from the send to
//           the end of the sum (manual time: the benchmark thread's own wake-up
//           is not counted).
// Two more drivers, the attention actor's paths per MoE layer:
//   Arena   (the CPU attention actor's path since H5) a job on an "attention"
//           CpuArena sends MoeWork to the router through a MoeClient and
//           waits for the answer on its own thread, then sums the partials;
//           timed inside the job;
//   Lane    the same job with the in-process fast path (local_lane.h): the
//           job splits the request itself, submits each part to its shard's
//           arena and sleeps until the last part's job wakes it (two thread
//           hand-offs instead of the router path's four);
//   Hops    (the path before: each stage posted back to the actor) the job
//           posts to a driver actor, which requests the router and, on the
//           answer, submits a job to the arena that sums the partials;
//           timed from the first job to the end of the sum.
// Three backends: `null` (returns zeros at once: the pure overhead of the
// actor path), `tiny` (the reference expert path on the bf16 fixture: real,
// small matmuls) and `fast` (the shards' default: the CPU expert kernels on a
// CpuPool per shard over the shard's cpus, holding only its experts:
// actors/fast_experts.h). Overhead per MoE layer = Actors/null (Direct/null is
// ~0); Actors/fast - Direct/fast is what the actor path adds to the kernels.
// Arguments: batch, shards, spin in microseconds (the shard arenas'
// dispatchers and, for Arena, the MoeClient's wait; for Lane only the
// MoeClient's wait: no dispatcher spins).
//
// The fixture is found under the source tree this was built from, else under
// ./tests/data (run from a repository root, e.g. the bundle on another
// machine).
// docs/performance.md ("Actor runtime") records the results.
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "actors/cpu_arena.h"
#include "actors/expert_shard_actor.h"
#include "actors/fast_experts.h"
#include "actors/local_lane.h"
#include "actors/messages.h"
#include "actors/moe_client.h"
#include "actors/moe_combine.h"
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
#include "runtime/base/logging.h"
#include "runtime/models/deepseek2.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kMoeLayer = 1;  // the fixture's first MoE layer

std::string FixturePath() {
  const std::string built = std::string(KTX_SOURCE_DIR) + "/tests/data/dsv3-tiny-bf16.gguf";
  if (access(built.c_str(), R_OK) == 0) return built;
  return "tests/data/dsv3-tiny-bf16.gguf";
}

std::shared_ptr<const models::Deepseek2Model> TinyModel() {
  static std::shared_ptr<const models::Deepseek2Model> model = [] {
    auto m = models::Deepseek2Model::Open(FixturePath());
    if (!m.ok()) return std::shared_ptr<const models::Deepseek2Model>();
    return std::shared_ptr<const models::Deepseek2Model>(std::move(*m));
  }();
  return model;
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

// A batch: h F32 [batch, n_embd] and K distinct experts per token.
struct LayerBatch {
  std::shared_ptr<const models::Activations> h;
  models::Routing routing;
};

LayerBatch MakeBatch(int batch, int64_t n_embd, int n_expert, int k) {
  std::mt19937 rng(1234 + batch);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  models::Activations h(batch, n_embd);
  for (int64_t i = 0; i < batch * n_embd; ++i) h.data()[i] = uniform(rng);
  LayerBatch b;
  b.h = std::make_shared<const models::Activations>(std::move(h));
  b.routing.n_tokens = batch;
  b.routing.n_expert_used = k;
  for (int t = 0; t < batch; ++t) {
    std::vector<int> experts(n_expert);
    for (int e = 0; e < n_expert; ++e) experts[e] = e;
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int j = 0; j < k; ++j) {
      b.routing.expert_ids.push_back(experts[j]);
      b.routing.weights.push_back(1.0f / k);
    }
  }
  return b;
}

// The shards of one configuration: experts split evenly (expert e on shard
// e % n_shards), one arena each.
struct Shards {
  std::vector<std::shared_ptr<ShardExperts>> experts;
  std::vector<std::unique_ptr<CpuArena>> arenas;
  std::vector<std::vector<uint8_t>> masks;  // [n_shards][n_expert]
  std::vector<std::vector<std::vector<int>>> holders;
};

enum class Backend { kNull, kTiny, kFast };

Shards MakeShards(const models::Deepseek2Hparams& hp, int n_shards, Backend kind, int spin_us) {
  Shards s;
  s.holders.resize(hp.n_layer);
  s.holders[kMoeLayer].resize(hp.n_expert);
  const std::vector<int> cpus = AllowedCpus();
  std::vector<FastShardSpec> specs;
  for (int i = 0; i < n_shards; ++i) {
    std::vector<int> mine;
    if (static_cast<int>(cpus.size()) >= n_shards) {
      mine.assign(cpus.begin() + cpus.size() * i / n_shards,
                  cpus.begin() + cpus.size() * (i + 1) / n_shards);
    }
    specs.push_back({"shard" + std::to_string(i), mine, -1});
  }
  // One "CPU experts ready" line per shard and run would drown the table
  // (KTX_LOG_LEVEL=debug shows them).
  if (kind == Backend::kFast && GetLogLevel() == LogLevel::kInfo) SetLogLevel(LogLevel::kWarning);
  ExpertBackendFactory fast = FastExpertBackendFactory(TinyModel(), specs);
  for (int i = 0; i < n_shards; ++i) {
    HeldExperts held(hp.n_layer);
    std::vector<uint8_t> mask(hp.n_expert, 0);
    for (int e = i; e < hp.n_expert; e += n_shards) {
      held[kMoeLayer].push_back(e);
      mask[e] = 1;
      s.holders[kMoeLayer][e] = {i};
    }
    std::shared_ptr<models::ExpertBackend> backend;
    if (kind == Backend::kNull) {
      backend = std::make_shared<NullBackend>(hp.n_embd);
    } else if (kind == Backend::kTiny) {
      backend = *MappedExpertBackendFactory(TinyModel())(i, held);
    } else {
      backend = *fast(i, held);
    }
    s.experts.push_back(*ShardExperts::Create(i, "shard" + std::to_string(i), hp.n_expert, held,
                                              std::move(backend)));
    s.arenas.push_back(*CpuArena::Create({"shard" + std::to_string(i), specs[i].cpus, spin_us}));
    s.masks.push_back(std::move(mask));
  }
  return s;
}

// Σ partials in the router's order (what the attention actor's combine does).
void SumParts(const std::vector<PlacedPartial>& parts, int64_t n, int64_t n_embd,
              std::vector<double>* acc, models::Activations* out) {
  acc->assign(static_cast<size_t>(n * n_embd), 0.0);
  for (const PlacedPartial& p : parts) {
    for (size_t j = 0; j < p.rows.size(); ++j) {
      const float* src = p.partial->row(static_cast<int64_t>(j));
      double* dst = acc->data() + static_cast<int64_t>(p.rows[j]) * n_embd;
      for (int64_t c = 0; c < n_embd; ++c) dst[c] += src[c];
    }
  }
  out->Resize(n, n_embd);
  for (size_t i = 0; i < acc->size(); ++i) out->data()[i] = static_cast<float>((*acc)[i]);
}

void BM_MoeLayerDirect(benchmark::State& state, Backend kind) {
  auto model = TinyModel();
  if (!model) {
    state.SkipWithError("cannot open tests/data/dsv3-tiny-bf16.gguf");
    return;
  }
  const auto& hp = model->hparams();
  const int batch = static_cast<int>(state.range(0));
  const int n_shards = static_cast<int>(state.range(1));
  Shards shards = MakeShards(hp, n_shards, kind, 0);
  const LayerBatch b = MakeBatch(batch, hp.n_embd, hp.n_expert, hp.n_expert_used);
  std::vector<models::Activations> partials(n_shards);
  std::vector<double> acc;
  models::Activations out;
  for (auto _ : state) {
    acc.assign(static_cast<size_t>(batch * hp.n_embd), 0.0);
    for (int s = 0; s < n_shards; ++s) {
      (void)shards.experts[s]->Compute(kMoeLayer, *b.h, b.routing, shards.masks[s], &partials[s]);
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += partials[s].data()[i];
    }
    out.Resize(batch, hp.n_embd);
    for (size_t i = 0; i < acc.size(); ++i) out.data()[i] = static_cast<float>(acc[i]);
    benchmark::DoNotOptimize(out.data());
  }
}

using run_atom = caf::atom_constant<caf::atom("run")>;
using driver_actor = caf::typed_actor<caf::replies_to<run_atom>::with<int64_t>>;

struct DriverState {
  static inline const char* name = "bench.driver";
};

// Sends one MoE layer to the router, sums the answer, replies the nanoseconds.
driver_actor::behavior_type Driver(driver_actor::stateful_pointer<DriverState> self,
                                   router_actor router, LayerBatch batch, int64_t n_embd) {
  return {
      [=](run_atom) -> caf::typed_response_promise<int64_t> {
        auto promise = self->make_response_promise<int64_t>();
        MoeWork work;
        work.il = kMoeLayer;
        work.h = Tensor(batch.h);
        work.n_expert_used = batch.routing.n_expert_used;
        work.expert_ids = batch.routing.expert_ids;
        work.weights = batch.routing.weights;
        const Clock::time_point start = Clock::now();
        // As the attention actor does: no CAF timeout (the router enforces deadlines).
        self->request(router, caf::infinite, moe_atom::value, std::move(work))
            .then(
                [=](MoeResult& result) mutable {
                  std::vector<double> acc;
                  models::Activations out;
                  SumParts(result.parts, batch.h->n_tokens(), n_embd, &acc, &out);
                  benchmark::DoNotOptimize(out.data());
                  promise.deliver(static_cast<int64_t>(
                      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start)
                          .count()));
                },
                [=](caf::error&) mutable { promise.deliver(int64_t{-1}); });
        return promise;
      },
  };
}

void BM_MoeLayerActors(benchmark::State& state, Backend kind) {
  auto model = TinyModel();
  if (!model) {
    state.SkipWithError("cannot open tests/data/dsv3-tiny-bf16.gguf");
    return;
  }
  const auto& hp = model->hparams();
  const int batch = static_cast<int>(state.range(0));
  const int n_shards = static_cast<int>(state.range(1));
  const int spin_us = static_cast<int>(state.range(2));
  Shards shards = MakeShards(hp, n_shards, kind, spin_us);
  caf::actor_system_config cfg;
  ConfigureActorSystem(cfg, 2);
  {
    caf::actor_system system{cfg};
    RouterConfig rc;
    for (int s = 0; s < n_shards; ++s) {
      ExpertShardConfig sc;
      sc.index = s;
      sc.name = "shard" + std::to_string(s);
      sc.experts = shards.experts[s];
      sc.arena = shards.arenas[s].get();
      rc.shards.push_back(SpawnExpertShard(system, std::move(sc)));
      rc.names.push_back("shard" + std::to_string(s));
    }
    rc.holders = shards.holders;
    rc.n_expert = hp.n_expert;
    rc.shard_deadline = std::chrono::seconds(10);
    std::vector<expert_shard_actor> shard_handles = rc.shards;
    router_actor router = SpawnRouter(system, std::move(rc));
    driver_actor driver = system.spawn(
        Driver, router, MakeBatch(batch, hp.n_embd, hp.n_expert, hp.n_expert_used), hp.n_embd);
    {
      caf::scoped_actor self{system};  // not hidden: must be gone before await_all_actors_done
      for (auto _ : state) {
        int64_t ns = -1;
        self->request(driver, std::chrono::seconds(10), run_atom::value)
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
    for (const auto& shard : shard_handles) {
      caf::anon_send_exit(shard, caf::exit_reason::user_shutdown);
    }
    system.await_all_actors_done();
    shards.arenas.clear();  // jobs hold actor handles: gone before the system
  }
}

// ---- the attention actor's paths: from an arena thread ----

// What the benchmark thread waits for: one job's result.
struct JobDone {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  int64_t ns = -1;
  void Set(int64_t value) {
    {
      std::lock_guard<std::mutex> lock(mu);
      ns = value;
      done = true;
    }
    cv.notify_one();
  }
  int64_t Take() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return done; });
    done = false;
    return ns;
  }
};

MoeWork LayerWork(const LayerBatch& batch) {
  MoeWork work;
  work.il = kMoeLayer;
  work.h = Tensor(batch.h);
  work.n_expert_used = batch.routing.n_expert_used;
  work.expert_ids = batch.routing.expert_ids;
  work.weights = batch.routing.weights;
  return work;
}

int64_t NanosSince(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
}

using hop_atom = caf::atom_constant<caf::atom("hop")>;
using hop_actor = caf::typed_actor<caf::reacts_to<hop_atom, int64_t>>;

struct HopState {
  static inline const char* name = "bench.hop";
};

// The old attention actor's share of a MoE layer: (stage) from the job, a
// request to the router, the sum as a new job on the arena.
hop_actor::behavior_type HopDriver(hop_actor::stateful_pointer<HopState> self, router_actor router,
                                   CpuArena* arena, LayerBatch batch, int64_t n_embd,
                                   JobDone* out) {
  return {
      [=](hop_atom, int64_t start_ns) {
        self->request(router, caf::infinite, moe_atom::value, LayerWork(batch))
            .then(
                [=](MoeResult& result) {
                  arena->Submit([result = std::move(result), start_ns, batch, n_embd, out] {
                    models::Activations scratch;
                    const models::Activations* sum =
                        SumPlacedPartials(result.parts, batch.h->n_tokens(), n_embd, &scratch);
                    benchmark::DoNotOptimize(sum->data());
                    out->Set(Clock::now().time_since_epoch().count() - start_ns);
                  });
                },
                [=](caf::error&) { out->Set(-1); });
      },
  };
}

enum class Path { kArena, kHops, kLane };

void BM_MoeLayerFromArena(benchmark::State& state, Backend kind, Path path) {
  auto model = TinyModel();
  if (!model) {
    state.SkipWithError("cannot open tests/data/dsv3-tiny-bf16.gguf");
    return;
  }
  const auto& hp = model->hparams();
  const int batch = static_cast<int>(state.range(0));
  const int n_shards = static_cast<int>(state.range(1));
  const int spin_us = static_cast<int>(state.range(2));
  // Lane: spin_us is only the waiting job's poll (no shard dispatcher spins).
  Shards shards = MakeShards(hp, n_shards, kind, path == Path::kLane ? 0 : spin_us);
  std::unique_ptr<CpuArena> attention = *CpuArena::Create({"attention", {}, 0});
  const LayerBatch layer = MakeBatch(batch, hp.n_embd, hp.n_expert, hp.n_expert_used);
  caf::actor_system_config cfg;
  ConfigureActorSystem(cfg, 2);
  {
    caf::actor_system system{cfg};
    RouterConfig rc;
    for (int s = 0; s < n_shards; ++s) {
      ExpertShardConfig sc;
      sc.index = s;
      sc.name = "shard" + std::to_string(s);
      sc.experts = shards.experts[s];
      sc.arena = shards.arenas[s].get();
      rc.shards.push_back(SpawnExpertShard(system, std::move(sc)));
      rc.names.push_back("shard" + std::to_string(s));
    }
    rc.holders = shards.holders;
    rc.n_expert = hp.n_expert;
    rc.shard_deadline = std::chrono::seconds(10);
    if (path == Path::kLane) {
      std::vector<LocalLane::Shard> lane_shards;
      for (int s = 0; s < n_shards; ++s) {
        lane_shards.push_back(
            {"shard" + std::to_string(s), shards.experts[s], shards.arenas[s].get()});
      }
      rc.lane =
          LocalLane::Create(std::move(lane_shards), rc.holders, rc.n_expert, rc.shard_deadline);
    }
    std::shared_ptr<LocalLane> lane = rc.lane;
    std::vector<expert_shard_actor> shard_handles = rc.shards;
    router_actor router = SpawnRouter(system, std::move(rc));
    JobDone done;
    hop_actor hop;
    std::unique_ptr<MoeClient> client;  // created, used and destroyed on the arena thread
    if (path == Path::kHops) {
      hop = system.spawn(HopDriver, router, attention.get(), layer, hp.n_embd, &done);
    } else {
      attention->Submit([&] {
        client = std::make_unique<MoeClient>(
            system, router, MoeClient::Options{std::chrono::seconds(10), spin_us, lane});
        done.Set(0);
      });
      done.Take();
    }
    for (auto _ : state) {
      if (path != Path::kHops) {
        attention->Submit([&] {
          const Clock::time_point start = Clock::now();
          absl::StatusOr<uint64_t> ticket = client->Send(LayerWork(layer));
          absl::StatusOr<MoeResult> result =
              ticket.ok() ? client->Wait(*ticket) : absl::StatusOr<MoeResult>(ticket.status());
          if (!result.ok()) {
            done.Set(-1);
            return;
          }
          models::Activations scratch;
          const models::Activations* sum =
              SumPlacedPartials(result->parts, layer.h->n_tokens(), hp.n_embd, &scratch);
          benchmark::DoNotOptimize(sum->data());
          done.Set(NanosSince(start));
        });
      } else {
        attention->Submit([&] {
          caf::anon_send(hop, hop_atom::value,
                         static_cast<int64_t>(Clock::now().time_since_epoch().count()));
        });
      }
      const int64_t ns = done.Take();
      if (ns < 0) {
        state.SkipWithError("MoE request failed");
        break;
      }
      state.SetIterationTime(static_cast<double>(ns) * 1e-9);
    }
    if (client) {
      attention->Submit([&] {
        client.reset();
        done.Set(0);
      });
      done.Take();
    }
    if (hop) caf::anon_send_exit(hop, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(router, caf::exit_reason::user_shutdown);
    for (const auto& shard : shard_handles) {
      caf::anon_send_exit(shard, caf::exit_reason::user_shutdown);
    }
    system.await_all_actors_done();
    attention.reset();
    shards.arenas.clear();  // jobs hold actor handles: gone before the system
  }
}

// ---- the floor: what one request costs without any MoE work ----
// BM_CafRequest: driver -> echo actor -> driver (same CAF system, no thread
// hand-off needed). BM_ArenaRequest: driver -> actor -> CpuArena job ->
// actor -> driver, the hand-off every shard does (two thread wake-ups).
// BM_ThreadPingPong: a bare condition-variable round trip between two
// threads, the machine's wake-up cost.

using ping_atom = caf::atom_constant<caf::atom("ping")>;
using pong_atom = caf::atom_constant<caf::atom("pong")>;
using echo_actor = caf::typed_actor<caf::replies_to<ping_atom>::with<int32_t>,
                                    caf::reacts_to<pong_atom, uint64_t>>;

struct EchoState {
  std::map<uint64_t, caf::typed_response_promise<int32_t>> pending;
  uint64_t next = 0;
  static inline const char* name = "bench.echo";
};

echo_actor::behavior_type Echo(echo_actor::stateful_pointer<EchoState> self, CpuArena* arena) {
  return {
      [=](ping_atom) -> caf::typed_response_promise<int32_t> {
        auto promise = self->make_response_promise<int32_t>();
        if (arena == nullptr) {
          promise.deliver(int32_t{1});
          return promise;
        }
        const uint64_t id = self->state.next++;
        self->state.pending.emplace(id, promise);
        echo_actor me = caf::actor_cast<echo_actor>(self);
        arena->Submit([me, id] { caf::anon_send(me, pong_atom::value, id); });
        return promise;
      },
      [=](pong_atom, uint64_t id) {
        auto it = self->state.pending.find(id);
        it->second.deliver(int32_t{1});
        self->state.pending.erase(it);
      },
  };
}

driver_actor::behavior_type EchoDriver(driver_actor::stateful_pointer<DriverState> self,
                                       echo_actor echo) {
  return {
      [=](run_atom) -> caf::typed_response_promise<int64_t> {
        auto promise = self->make_response_promise<int64_t>();
        const Clock::time_point start = Clock::now();
        self->request(echo, caf::infinite, ping_atom::value)
            .then(
                [=](int32_t) mutable {
                  promise.deliver(static_cast<int64_t>(
                      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start)
                          .count()));
                },
                [=](caf::error&) mutable { promise.deliver(int64_t{-1}); });
        return promise;
      },
  };
}

void BM_Request(benchmark::State& state, bool through_arena) {
  std::unique_ptr<CpuArena> arena;
  if (through_arena) arena = *CpuArena::Create({"echo", {}, 0});
  caf::actor_system_config cfg;
  ConfigureActorSystem(cfg, 2);
  {
    caf::actor_system system{cfg};
    echo_actor echo = system.spawn(Echo, arena.get());
    driver_actor driver = system.spawn(EchoDriver, echo);
    {
      caf::scoped_actor self{system};
      for (auto _ : state) {
        int64_t ns = -1;
        self->request(driver, std::chrono::seconds(10), run_atom::value)
            .receive([&](int64_t value) { ns = value; }, [&](caf::error&) {});
        state.SetIterationTime(static_cast<double>(ns) * 1e-9);
      }
    }
    caf::anon_send_exit(driver, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
    system.await_all_actors_done();
    arena.reset();
  }
}

void BM_ThreadPingPong(benchmark::State& state) {
  std::mutex mu;
  std::condition_variable cv;
  int turn = 0;  // 0: main, 1: partner, 2: stop
  std::thread partner([&] {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      cv.wait(lock, [&] { return turn != 0; });
      if (turn == 2) return;
      turn = 0;
      cv.notify_all();
    }
  });
  for (auto _ : state) {
    std::unique_lock<std::mutex> lock(mu);
    turn = 1;
    cv.notify_all();
    cv.wait(lock, [&] { return turn == 0; });
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    turn = 2;
  }
  cv.notify_all();
  partner.join();
}

BENCHMARK_CAPTURE(BM_Request, caf_echo, false)->UseManualTime();
BENCHMARK_CAPTURE(BM_Request, arena_echo, true)->UseManualTime();
BENCHMARK(BM_ThreadPingPong);

void Args(benchmark::internal::Benchmark* b, bool with_spin) {
  for (int batch : {1, 16}) {
    for (int shards : {1, 2, 3}) {
      b->Args({batch, shards, 0});
      if (with_spin) b->Args({batch, shards, 20});
      if (with_spin) b->Args({batch, shards, 50});
    }
  }
  b->ArgNames({"batch", "shards", "spin_us"});
}

BENCHMARK_CAPTURE(BM_MoeLayerDirect, null, Backend::kNull)->Apply([](auto* b) { Args(b, false); });
BENCHMARK_CAPTURE(BM_MoeLayerActors, null, Backend::kNull)
    ->Apply([](auto* b) { Args(b, true); }) -> UseManualTime();
BENCHMARK_CAPTURE(BM_MoeLayerFromArena, null_arena, Backend::kNull, Path::kArena)
    ->Apply([](auto* b) { Args(b, true); }) -> UseManualTime();
BENCHMARK_CAPTURE(BM_MoeLayerFromArena, null_lane, Backend::kNull, Path::kLane)
    ->Apply([](auto* b) { Args(b, true); }) -> UseManualTime();
BENCHMARK_CAPTURE(BM_MoeLayerFromArena, null_hops, Backend::kNull, Path::kHops)
    ->Apply([](auto* b) { Args(b, false); }) -> UseManualTime();
BENCHMARK_CAPTURE(BM_MoeLayerDirect, tiny, Backend::kTiny)->Apply([](auto* b) { Args(b, false); });
BENCHMARK_CAPTURE(BM_MoeLayerActors, tiny, Backend::kTiny)
    ->Apply([](auto* b) { Args(b, false); }) -> UseManualTime();
BENCHMARK_CAPTURE(BM_MoeLayerDirect, fast, Backend::kFast)->Apply([](auto* b) { Args(b, false); });
BENCHMARK_CAPTURE(BM_MoeLayerActors, fast, Backend::kFast)
    ->Apply([](auto* b) { Args(b, true); }) -> UseManualTime();
BENCHMARK_CAPTURE(BM_MoeLayerFromArena, fast_lane, Backend::kFast, Path::kLane)
    ->Apply([](auto* b) { Args(b, false); }) -> UseManualTime();

}  // namespace
}  // namespace ktx::actors

BENCHMARK_MAIN();
