// File: actors/remote/shard_host.cc
#include "actors/remote/shard_host.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "actors/cpu_arena.h"
#include "actors/fast_experts.h"
#include "actors/remote/topology_shards.h"
#include "actors/remote/wire_codec.h"
#include "actors/status_bridge.h"
#include "ktx/v1/shard.grpc.pb.h"
#include "runtime/base/logging.h"
#include "runtime/gguf/fingerprint.h"
#include "topology/cpu_list.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;
using Stream = grpc::ServerReaderWriter<ktx::v1::ComputeResponse, ktx::v1::ComputeRequest>;

int64_t MicrosSince(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t).count();
}

// One hosted shard. `arena` is the last member so that it is destroyed first:
// its destructor waits for the running job, which still touches the others.
struct Hosted {
  int plan_index = 0;
  std::string name;
  uint64_t bytes = 0;
  std::shared_ptr<ShardExperts> experts;
  std::atomic<int64_t> parts_served{0};
  std::atomic<int64_t> parts_failed{0};
  std::atomic<int64_t> rows{0};
  std::atomic<int64_t> compute_us{0};
  std::atomic<int32_t> queue_depth{0};
  std::unique_ptr<CpuArena> arena;
};

// One answer waiting to be written.
struct Answer {
  uint64_t request_id = 0;
  absl::Status status;
  models::Activations partial;  // F32 [n_rows, n_embd] when status is OK
  int64_t compute_us = 0;
  int64_t queue_us = 0;
};

// One Compute stream: answers are queued by jobs (any thread) and written by
// the session's writer thread, several per message when several are ready.
class Session {
 public:
  explicit Session(Stream* stream) : stream_(stream), writer_([this] { WriterLoop(); }) {}
  ~Session() { KTX_CHECK(!writer_.joinable()); }

  // A part was accepted: its answer will be pushed.
  void Accept() {
    std::lock_guard<std::mutex> lock(mu_);
    ++outstanding_;
  }
  void Push(Answer answer) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    queue_.push_back(std::move(answer));
    cv_.notify_all();
  }
  bool closed() const { return closed_flag_.load(std::memory_order_acquire); }

  // Reading has ended. With `drain`, waits (at most `timeout`) until every
  // accepted part's answer is written; then stops the writer. Jobs that
  // finish later drop their answers.
  void Finish(bool drain, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    if (drain) {
      cv_.wait_for(lock, timeout, [this] { return outstanding_ == 0 || write_failed_; });
    }
    closed_ = true;
    closed_flag_.store(true, std::memory_order_release);
    queue_.clear();
    cv_.notify_all();
    lock.unlock();
    writer_.join();
  }

 private:
  void WriterLoop() {
    for (;;) {
      std::deque<Answer> batch;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return !queue_.empty() || closed_; });
        if (closed_) return;
        batch.swap(queue_);
      }
      ktx::v1::ComputeResponse response;
      for (Answer& a : batch) {
        ktx::v1::ExpertResult* r = response.add_results();
        r->set_request_id(a.request_id);
        r->set_compute_us(a.compute_us);
        r->set_queue_us(a.queue_us);
        if (a.status.ok()) {
          EncodeTensor(a.partial, WireDtype::kF32, r->mutable_partial());
        } else {
          r->set_code(static_cast<int32_t>(a.status.code()));
          r->set_message(std::string(a.status.message()));
        }
      }
      const bool ok = stream_->Write(response);
      std::lock_guard<std::mutex> lock(mu_);
      outstanding_ -= static_cast<int64_t>(batch.size());
      if (!ok) write_failed_ = true;
      cv_.notify_all();
    }
  }

  Stream* stream_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Answer> queue_;   // guarded by mu_
  int64_t outstanding_ = 0;    // guarded by mu_: accepted, answer not written yet
  bool closed_ = false;        // guarded by mu_
  bool write_failed_ = false;  // guarded by mu_
  std::atomic<bool> closed_flag_{false};
  std::thread writer_;  // last: started once the members above exist
};

std::string HeldRanges(const std::vector<int>& experts) {
  return experts.empty() ? std::string("none") : topology::FormatIdRanges(experts);
}

}  // namespace

struct ShardHost::Impl {
  models::Deepseek2Hparams hp;  // of the model the shards come from
  std::string node;
  std::string fingerprint;
  ShardHostOptions options;
  topology::PlacementPlan plan;
  std::vector<std::unique_ptr<Hosted>> hosted;  // in plan order
  std::atomic<int32_t> streams{0};
  std::unique_ptr<Service> service;

  const Hosted* Find(std::string_view name) const {
    for (const auto& h : hosted) {
      if (h->name == name) return h.get();
    }
    return nullptr;
  }
  Hosted* Find(std::string_view name) {
    return const_cast<Hosted*>(static_cast<const Impl*>(this)->Find(name));
  }
  std::string HostedNames() const {
    std::vector<std::string> names;
    for (const auto& h : hosted) names.push_back(absl::StrCat("'", h->name, "'"));
    return absl::StrJoin(names, ", ");
  }

  // Validates part `index` and, when it is well formed, queues it on its
  // shard's arena. Every accepted part gets exactly one answer.
  void HandlePart(const std::shared_ptr<Session>& session, const ktx::v1::ExpertPart& part,
                  int index);
};

class ShardHost::Service final : public ktx::v1::ExpertShard::Service {
 public:
  explicit Service(ShardHost::Impl* impl) : impl_(impl) {}

  grpc::Status Info(grpc::ServerContext* context, const ktx::v1::ShardInfoRequest*,
                    ktx::v1::ShardInfoResponse* response) override;
  grpc::Status Stats(grpc::ServerContext* context, const ktx::v1::ShardStatsRequest*,
                     ktx::v1::ShardStatsResponse* response) override;
  grpc::Status Compute(grpc::ServerContext* context, Stream* stream) override;

 private:
  ShardHost::Impl* impl_;
};

void ShardHost::Impl::HandlePart(const std::shared_ptr<Session>& session,
                                 const ktx::v1::ExpertPart& part, int index) {
  const Clock::time_point arrived = Clock::now();
  const std::string f = absl::StrCat("parts[", index, "]");
  session->Accept();
  Hosted* shard = Find(part.shard());
  auto fail = [&](absl::Status status) {
    if (shard != nullptr) {
      shard->parts_served.fetch_add(1, std::memory_order_relaxed);
      shard->parts_failed.fetch_add(1, std::memory_order_relaxed);
    }
    Answer answer;
    answer.request_id = part.request_id();
    answer.status = std::move(status);
    session->Push(std::move(answer));
  };
  if (shard == nullptr) {
    return fail(absl::InvalidArgumentError(absl::StrCat(f, ".shard: '", part.shard(),
                                                        "' is not hosted by node '", node,
                                                        "' (it hosts ", HostedNames(), ")")));
  }
  const int il = part.il();
  if (il < 0 || il >= hp.n_layer || !hp.IsMoeLayer(il)) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat(f, ".il = ", il, ": not a MoE layer of the model (", hp.n_layer,
                     " layers, the first ", hp.n_layer_dense_lead, " dense)")));
  }
  const int64_t k = part.n_expert_used();
  if (k < 1 || k > hp.n_expert) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat(f, ".n_expert_used = ", k, ": expected 1..", hp.n_expert)));
  }
  if (part.experts_size() == 0) {
    return fail(absl::InvalidArgumentError(absl::StrCat(f, ".experts: empty")));
  }
  std::vector<uint8_t> mask(static_cast<size_t>(hp.n_expert), 0);
  int previous = -1;
  for (int j = 0; j < part.experts_size(); ++j) {
    const int e = part.experts(j);
    if (e < 0 || e >= hp.n_expert) {
      return fail(absl::InvalidArgumentError(
          absl::StrCat(f, ".experts[", j, "] = ", e, ": outside [0, ", hp.n_expert, ")")));
    }
    if (e <= previous) {
      return fail(absl::InvalidArgumentError(
          absl::StrCat(f, ".experts[", j, "] = ", e, ": not ascending")));
    }
    if (!shard->experts->Holds(il, e)) {
      return fail(absl::InvalidArgumentError(absl::StrCat(
          f, ".experts[", j, "] = ", e, ": shard '", shard->name, "' does not hold expert ", e,
          " of layer ", il, " (it holds ", HeldRanges(shard->experts->held()[il]), ")")));
    }
    previous = e;
    mask[e] = 1;
  }
  // The tensor's size is checked against its shape before it is decoded.
  auto h = std::make_shared<models::Activations>();
  DecodeLimits limits;
  limits.n_cols = hp.n_embd;
  limits.max_rows = options.max_rows;
  if (absl::Status s = DecodeTensor(part.h(), f + ".h", limits, h.get()); !s.ok()) {
    return fail(std::move(s));
  }
  const int64_t n_rows = h->n_tokens();
  if (part.expert_ids_size() != n_rows * k) {
    return fail(absl::InvalidArgumentError(absl::StrCat(f, ".expert_ids: ", part.expert_ids_size(),
                                                        " ids, expected n_rows * "
                                                        "n_expert_used = ",
                                                        n_rows, " * ", k, " = ", n_rows * k)));
  }
  for (int j = 0; j < part.expert_ids_size(); ++j) {
    const int32_t e = part.expert_ids(j);
    if ((e < 0 || e >= hp.n_expert) && e != models::kNoExpert) {
      return fail(absl::InvalidArgumentError(
          absl::StrCat(f, ".expert_ids[", j, "] = ", e, ": outside [0, ", hp.n_expert,
                       ") and not kNoExpert (", models::kNoExpert, ")")));
    }
  }
  if (part.weights_size() != n_rows * k) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat(f, ".weights: ", part.weights_size(), " weights, expected ", n_rows * k)));
  }
  for (int j = 0; j < part.weights_size(); ++j) {
    if (!std::isfinite(part.weights(j))) {
      return fail(absl::InvalidArgumentError(
          absl::StrCat(f, ".weights[", j, "] = ", part.weights(j), ": not finite")));
    }
  }
  models::Routing routing;
  routing.n_tokens = n_rows;
  routing.n_expert_used = static_cast<int32_t>(k);
  routing.expert_ids.assign(part.expert_ids().begin(), part.expert_ids().end());
  routing.weights.assign(part.weights().begin(), part.weights().end());

  shard->queue_depth.fetch_add(1, std::memory_order_relaxed);
  const uint64_t request_id = part.request_id();
  shard->arena->Submit([session, shard, request_id, il, arrived, h = std::move(h),
                        routing = std::move(routing), mask = std::move(mask)] {
    Answer answer;
    answer.request_id = request_id;
    if (!session->closed()) {
      const Clock::time_point start = Clock::now();
      answer.queue_us =
          std::chrono::duration_cast<std::chrono::microseconds>(start - arrived).count();
      answer.status = shard->experts->Compute(il, *h, routing, mask, &answer.partial);
      answer.compute_us = MicrosSince(start);
      shard->parts_served.fetch_add(1, std::memory_order_relaxed);
      if (answer.status.ok()) {
        shard->rows.fetch_add(h->n_tokens(), std::memory_order_relaxed);
        shard->compute_us.fetch_add(answer.compute_us, std::memory_order_relaxed);
      } else {
        shard->parts_failed.fetch_add(1, std::memory_order_relaxed);
      }
    }
    shard->queue_depth.fetch_sub(1, std::memory_order_relaxed);
    session->Push(std::move(answer));
  });
}

grpc::Status ShardHost::Service::Info(grpc::ServerContext* context,
                                      const ktx::v1::ShardInfoRequest*,
                                      ktx::v1::ShardInfoResponse* response) {
  if (grpc::Status s = rpc::CheckToken(*context, impl_->options.security); !s.ok()) return s;
  *response = ShardHost::InfoOf(*impl_);
  return grpc::Status::OK;
}

grpc::Status ShardHost::Service::Stats(grpc::ServerContext* context,
                                       const ktx::v1::ShardStatsRequest*,
                                       ktx::v1::ShardStatsResponse* response) {
  if (grpc::Status s = rpc::CheckToken(*context, impl_->options.security); !s.ok()) return s;
  *response = ShardHost::StatsOf(*impl_);
  return grpc::Status::OK;
}

grpc::Status ShardHost::Service::Compute(grpc::ServerContext* context, Stream* stream) {
  if (grpc::Status s = rpc::CheckToken(*context, impl_->options.security); !s.ok()) return s;
  impl_->streams.fetch_add(1);
  auto session = std::make_shared<Session>(stream);
  ktx::v1::ComputeRequest request;
  while (stream->Read(&request)) {
    if (request.parts_size() == 0) {
      session->Accept();
      Answer answer;
      answer.status = absl::InvalidArgumentError("parts: the request has no parts");
      session->Push(std::move(answer));
      continue;
    }
    for (int i = 0; i < request.parts_size(); ++i) impl_->HandlePart(session, request.parts(i), i);
  }
  // The client half-closed (answers still wanted) or the call is gone.
  session->Finish(!context->IsCancelled(), std::chrono::seconds(60));
  impl_->streams.fetch_sub(1);
  return grpc::Status::OK;
}

absl::StatusOr<ShardHostOptions> ShardHostOptionsFromTopology(
    const topology::ParsedTopologyConfig& parsed, std::string_view node_name) {
  for (const ktx::v1::NodeConfig& node : parsed.config.nodes()) {
    if (node.name() != node_name) continue;
    const std::string dir = parsed.path.empty()
                                ? std::string()
                                : std::filesystem::path(parsed.path).parent_path().string();
    ShardHostOptions options;
    KTX_ASSIGN_OR_RETURN(options.security, rpc::RpcSecurityFromNode(node, dir));
    return options;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(parsed.path.empty() ? std::string("topology") : parsed.path,
                   ": no node is named '", std::string(node_name), "'"));
}

ShardHost::ShardHost(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ShardHost::~ShardHost() = default;

absl::StatusOr<std::unique_ptr<ShardHost>> ShardHost::Create(
    std::shared_ptr<const models::Deepseek2Model> model,
    const topology::ParsedTopologyConfig& parsed, std::string_view node_name,
    ShardHostOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("ShardHost::Create: no model");
  if (node_name.empty()) return absl::InvalidArgumentError("ShardHost::Create: no node name");
  KTX_ASSIGN_OR_RETURN(std::vector<ShardOptions> shards, ShardsFromTopology(parsed, node_name));
  std::vector<int> hosted;
  for (size_t s = 0; s < shards.size(); ++s) {
    if (shards[s].address.empty()) hosted.push_back(static_cast<int>(s));
  }
  if (hosted.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(parsed.path.empty() ? std::string("topology") : parsed.path, ": node '",
                     std::string(node_name), "' holds no expert shard"));
  }
  KTX_ASSIGN_OR_RETURN(topology::PlacementPlan plan, PlanShards(*model, shards, options.placement));
  return CreateWithPlan(std::move(model), std::string(node_name), shards, plan, hosted,
                        std::move(options));
}

absl::StatusOr<std::unique_ptr<ShardHost>> ShardHost::CreateWithPlan(
    std::shared_ptr<const models::Deepseek2Model> model, std::string node_name,
    const std::vector<ShardOptions>& shards, const topology::PlacementPlan& plan,
    const std::vector<int>& hosted, ShardHostOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("ShardHost: no model");
  if (!options.expert_backend_factory && options.experts == ExpertsBackend::kReference) {
    options.expert_backend_factory = MappedExpertBackendFactory(model);
  } else if (!options.expert_backend_factory) {
    std::vector<FastShardSpec> specs;
    for (const ShardOptions& shard : shards) {
      specs.push_back({shard.name, shard.cpus, shard.numa_node});
    }
    options.expert_backend_factory =
        FastExpertBackendFactory(model, std::move(specs), options.fast_experts);
  }
  return CreateWithPlan(model->hparams(), gguf::ModelFingerprint(model->file()),
                        std::move(node_name), shards, plan, hosted, std::move(options));
}

absl::StatusOr<std::unique_ptr<ShardHost>> ShardHost::CreateWithPlan(
    const models::Deepseek2Hparams& hp, std::string fingerprint, std::string node_name,
    const std::vector<ShardOptions>& shards, const topology::PlacementPlan& plan,
    const std::vector<int>& hosted, ShardHostOptions options) {
  if (!options.expert_backend_factory) {
    return absl::InvalidArgumentError("ShardHost: no expert backend factory");
  }
  if (plan.n_layer != hp.n_layer || static_cast<int>(plan.layers.size()) != hp.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ShardHost: the placement plan has ", plan.n_layer, " layers, the model ", hp.n_layer));
  }
  if (plan.shards.size() != shards.size()) {
    return absl::InvalidArgumentError(absl::StrCat("ShardHost: the placement plan has ",
                                                   plan.shards.size(), " shards, the topology ",
                                                   shards.size()));
  }
  for (int il = 0; il < hp.n_layer; ++il) {
    if (hp.IsMoeLayer(il) &&
        static_cast<int>(plan.layers[il].shards_of_expert.size()) != hp.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ShardHost: the placement plan's layer ", il, " has ",
          plan.layers[il].shards_of_expert.size(), " experts, the model ", hp.n_expert));
    }
  }
  auto impl = std::make_unique<Impl>();
  impl->hp = hp;
  impl->node = std::move(node_name);
  impl->plan = plan;
  impl->options = std::move(options);
  impl->fingerprint = std::move(fingerprint);
  const std::vector<HeldExperts> held = HeldByShard(plan, hp);
  const ExpertBackendFactory& factory = impl->options.expert_backend_factory;
  for (int s : hosted) {
    if (s < 0 || s >= static_cast<int>(shards.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat("ShardHost: shard index ", s, " outside the plan's ", shards.size()));
    }
    const ShardOptions& spec = shards[s];
    auto h = std::make_unique<Hosted>();
    h->plan_index = s;
    h->name = spec.name;
    h->bytes = plan.shards[s].bytes;
    absl::StatusOr<std::shared_ptr<models::ExpertBackend>> backend = factory(s, held[s]);
    if (!backend.ok()) {
      return absl::Status(
          backend.status().code(),
          absl::StrCat("expert shard '", spec.name, "': backend: ", backend.status().message()));
    }
    KTX_ASSIGN_OR_RETURN(
        h->experts, ShardExperts::Create(s, spec.name, hp.n_expert, held[s], *std::move(backend)));
    KTX_ASSIGN_OR_RETURN(h->arena,
                         CpuArena::Create({spec.name, spec.cpus, impl->options.arena_spin_us}));
    impl->hosted.push_back(std::move(h));
  }
  impl->service = std::make_unique<Service>(impl.get());
  KTX_LOG(INFO, "shard_host") << "node '" << impl->node << "': " << impl->hosted.size()
                              << " expert shard(s), model "
                              << gguf::ShortFingerprint(impl->fingerprint);
  return std::unique_ptr<ShardHost>(new ShardHost(std::move(impl)));
}

grpc::Service* ShardHost::service() { return impl_->service.get(); }
const std::string& ShardHost::node() const { return impl_->node; }
const std::string& ShardHost::fingerprint() const { return impl_->fingerprint; }

ktx::v1::ShardInfoResponse ShardHost::Info() const { return InfoOf(*impl_); }
ktx::v1::ShardStatsResponse ShardHost::Stats() const { return StatsOf(*impl_); }

ktx::v1::ShardInfoResponse ShardHost::InfoOf(const Impl& im) {
  const models::Deepseek2Hparams& hp = im.hp;
  ktx::v1::ShardInfoResponse info;
  info.set_node(im.node);
  info.set_model_fingerprint(im.fingerprint);
  info.add_wire_dtypes(ktx::v1::WIRE_DTYPE_F32);
  info.add_wire_dtypes(ktx::v1::WIRE_DTYPE_BF16);
  info.set_n_layer(hp.n_layer);
  info.set_n_expert(hp.n_expert);
  info.set_n_embd(hp.n_embd);
  info.set_version(im.options.version);
  for (const auto& h : im.hosted) {
    ktx::v1::HostedShard* s = info.add_shards();
    s->set_name(h->name);
    s->set_plan_index(h->plan_index);
    s->set_bytes(h->bytes);
    s->set_n_experts(h->experts->n_held());
    const HeldExperts& held = h->experts->held();
    for (int il = 0; il < static_cast<int>(held.size()); ++il) {
      if (held[il].empty()) continue;
      ktx::v1::HeldLayer* layer = s->add_layers();
      layer->set_il(il);
      layer->mutable_experts()->Add(held[il].begin(), held[il].end());
    }
  }
  return info;
}

ktx::v1::ShardStatsResponse ShardHost::StatsOf(const Impl& im) {
  ktx::v1::ShardStatsResponse stats;
  stats.set_node(im.node);
  stats.set_streams(im.streams.load());
  for (const auto& h : im.hosted) {
    ktx::v1::ShardStats* s = stats.add_shards();
    s->set_name(h->name);
    s->set_parts_served(h->parts_served.load());
    s->set_parts_failed(h->parts_failed.load());
    s->set_rows(h->rows.load());
    s->set_compute_us(h->compute_us.load());
    s->set_queue_depth(h->queue_depth.load());
  }
  return stats;
}

std::string ShardHost::Describe() const {
  std::string out;
  for (const auto& h : impl_->hosted) {
    absl::StrAppend(&out, "shard '", h->name, "' (#", h->plan_index, "): cpus ",
                    topology::FormatIdRanges(h->arena->cpus()),
                    h->arena->pinned() ? " (pinned)" : " (unpinned)", ", ", h->experts->n_held(),
                    " routed experts, ", topology::FormatBytes(h->bytes), "\n");
  }
  absl::StrAppend(&out, "node '", impl_->node, "', model ",
                  gguf::ShortFingerprint(impl_->fingerprint), "\n");
  return out;
}

}  // namespace ktx::actors
