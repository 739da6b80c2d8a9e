// File: actors/remote/remote_shards.cc
#include "actors/remote/remote_shards.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "actors/remote/remote_shard_actor.h"
#include "runtime/base/logging.h"
#include "runtime/gguf/fingerprint.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;

bool Fatal(absl::StatusCode code) {
  return code == absl::StatusCode::kFailedPrecondition ||
         code == absl::StatusCode::kUnauthenticated ||
         code == absl::StatusCode::kPermissionDenied || code == absl::StatusCode::kInvalidArgument;
}

// Stands in for a shard that lives on another node.
class RemotePlaceholderBackend final : public models::ExpertBackend {
 public:
  explicit RemotePlaceholderBackend(std::string where) : where_(std::move(where)) {}
  absl::Status Compute(int, const models::Activations&, const models::Routing&,
                       std::span<const uint8_t>, models::Activations*) override {
    return absl::FailedPreconditionError(
        absl::StrCat("expert shard ", where_, " computes on its own node, not here"));
  }

 private:
  std::string where_;
};

}  // namespace

ExpertBackendFactory WithRemotePlaceholders(ExpertBackendFactory factory,
                                            const std::vector<ShardOptions>& shards) {
  std::vector<std::string> remote(shards.size());
  for (size_t s = 0; s < shards.size(); ++s) {
    if (!shards[s].address.empty()) {
      remote[s] = absl::StrCat("'", shards[s].name, "' (node '", shards[s].node, "' at ",
                               shards[s].address, ")");
    }
  }
  return [factory = std::move(factory), remote = std::move(remote)](
             int shard,
             const HeldExperts& held) -> absl::StatusOr<std::shared_ptr<models::ExpertBackend>> {
    if (shard >= 0 && shard < static_cast<int>(remote.size()) && !remote[shard].empty()) {
      return std::make_shared<RemotePlaceholderBackend>(remote[shard]);
    }
    return factory(shard, held);
  };
}

RemoteShards::~RemoteShards() = default;

absl::StatusOr<std::unique_ptr<RemoteShards>> RemoteShards::Connect(
    const models::Deepseek2Model& model, const std::vector<ShardOptions>& shards,
    const std::vector<HeldExperts>& held, const RemoteShardsOptions& options) {
  std::unique_ptr<RemoteShards> out(new RemoteShards());
  out->shards_ = shards;
  const std::string fingerprint = gguf::ModelFingerprint(model.file());
  // One RemoteNode per address, with the shards the plan puts there.
  std::map<std::string, RemoteNodeOptions> by_address;
  std::vector<std::string> order;  // addresses in plan order of their first shard
  for (size_t s = 0; s < shards.size(); ++s) {
    const ShardOptions& shard = shards[s];
    if (shard.address.empty()) continue;
    auto [it, fresh] = by_address.try_emplace(shard.address);
    RemoteNodeOptions& node = it->second;
    if (fresh) {
      order.push_back(shard.address);
      node.node = shard.node.empty() ? shard.address : shard.node;
      node.address = shard.address;
      node.security = options.security;
      node.fingerprint = fingerprint;
      node.wire_dtype = options.wire_dtype;
      node.n_embd = model.hparams().n_embd;
      node.stall_timeout = std::max(options.shard_deadline * 3 / 4, std::chrono::milliseconds(1));
      node.info_deadline = std::min(options.shard_deadline, std::chrono::milliseconds(5000));
    } else if (!shard.node.empty() && shard.node != node.node) {
      return absl::InvalidArgumentError(absl::StrCat("shard '", shard.name, "': address ",
                                                     shard.address, " is given to nodes '",
                                                     node.node, "' and '", shard.node, "'"));
    }
    node.shards.push_back({shard.name, static_cast<int>(s), held[s]});
  }
  for (const std::string& address : order) {
    KTX_ASSIGN_OR_RETURN(std::unique_ptr<RemoteNode> node,
                         RemoteNode::Create(std::move(by_address[address])));
    out->nodes_[address] = std::move(node);
  }

  // Wait for every node at once: each check waits for its peer (in steps of
  // at most a second) until it answers correctly, answers with a fatal
  // mismatch, or the wait is over.
  const Clock::time_point deadline = Clock::now() + options.wait;
  std::vector<absl::Status> result(order.size(), absl::UnknownError("not checked"));
  {
    std::vector<std::thread> waiters;
    for (size_t i = 0; i < order.size(); ++i) {
      waiters.emplace_back([&, i] {
        RemoteNode& node = *out->nodes_.at(order[i]);
        for (;;) {
          const Clock::time_point step = std::min(deadline, Clock::now() + std::chrono::seconds(1));
          result[i] = node.CheckInfo(step);
          if (result[i].ok() || Fatal(result[i].code()) || Clock::now() >= deadline) return;
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      });
    }
    for (std::thread& t : waiters) t.join();
  }
  std::vector<std::string> missing;
  for (size_t i = 0; i < order.size(); ++i) {
    if (result[i].ok()) continue;
    if (Fatal(result[i].code())) {
      return absl::Status(result[i].code(),
                          absl::StrCat("remote expert shards: ", result[i].message()));
    }
    const RemoteNodeOptions& node = out->nodes_.at(order[i])->options();
    for (const ExpectedShard& shard : node.shards) {
      missing.push_back(
          absl::StrCat("shard '", shard.name, "' (node '", node.node, "' at ", node.address, ")"));
    }
    missing.back() += absl::StrCat(": ", result[i].message());
  }
  if (!missing.empty()) {
    return absl::DeadlineExceededError(
        absl::StrCat("waited ", options.wait.count(), " ms for the remote expert shards; ",
                     missing.size(), " did not answer: ", absl::StrJoin(missing, "; ")));
  }
  // Open the streams.
  for (auto& [address, node] : out->nodes_) node->Start();
  const Clock::time_point stream_deadline =
      std::max(deadline, Clock::now() + std::chrono::seconds(5));
  for (const std::string& address : order) {
    KTX_RETURN_IF_ERROR(out->nodes_.at(address)->WaitConnected(stream_deadline));
    KTX_LOG(INFO, "remote") << out->nodes_.at(address)->Label() << ": "
                            << out->nodes_.at(address)->options().shards.size()
                            << " expert shard(s) connected, model "
                            << gguf::ShortFingerprint(fingerprint);
  }
  return out;
}

bool RemoteShards::IsRemote(int shard) const {
  return shard >= 0 && shard < static_cast<int>(shards_.size()) && !shards_[shard].address.empty();
}

expert_shard_actor RemoteShards::Spawn(caf::actor_system& system, int shard) const {
  RemoteShardConfig config;
  config.index = shard;
  config.name = shards_[shard].name;
  config.node = nodes_.at(shards_[shard].address);
  return SpawnRemoteShard(system, std::move(config));
}

std::vector<RemoteShardStatus> RemoteShards::Status() const {
  std::vector<RemoteShardStatus> out;
  for (size_t s = 0; s < shards_.size(); ++s) {
    if (shards_[s].address.empty()) continue;
    const RemoteNode& node = *nodes_.at(shards_[s].address);
    const RemoteNodeCounters c = node.counters();
    RemoteShardStatus status;
    status.index = static_cast<int>(s);
    status.name = shards_[s].name;
    status.node = node.options().node;
    status.address = shards_[s].address;
    status.connected = c.connected;
    status.last_error = c.last_error;
    status.sessions = c.sessions;
    status.node_parts_sent = c.parts_sent;
    status.node_messages_sent = c.messages_sent;
    status.node_in_flight = c.in_flight;
    out.push_back(std::move(status));
  }
  return out;
}

}  // namespace ktx::actors
