// File: actors/remote/remote_node.cc
#include "actors/remote/remote_node.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "actors/remote/wire_codec.h"
#include "actors/status_bridge.h"
#include "runtime/base/logging.h"
#include "runtime/gguf/fingerprint.h"
#include "topology/config.h"
#include "topology/cpu_list.h"

namespace ktx::actors {
namespace {

using Clock = std::chrono::steady_clock;

std::string Ranges(const std::vector<int>& ids) {
  return ids.empty() ? std::string("none") : "[" + topology::FormatIdRanges(ids) + "]";
}

int64_t Millis(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
}

}  // namespace

struct RemoteNode::Session {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<ktx::v1::ComputeRequest, ktx::v1::ComputeResponse>>
      stream;
  bool broken = false;  // guarded by RemoteNode::mu_
  std::string reason;   // guarded by RemoteNode::mu_
  std::thread writer;
  std::thread reader;
};

RemoteNode::RemoteNode(RemoteNodeOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<RemoteNode>> RemoteNode::Create(RemoteNodeOptions options) {
  if (options.address.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("remote node '", options.node, "': no address"));
  }
  if (options.stall_timeout.count() <= 0 || options.info_deadline.count() <= 0 ||
      options.reconnect_min.count() <= 0 || options.reconnect_max < options.reconnect_min) {
    return absl::InvalidArgumentError(absl::StrCat(
        "remote node '", options.node,
        "': stall_timeout, info_deadline and reconnect_min must be positive, reconnect_max >= "
        "reconnect_min"));
  }
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      rpc::MakeChannel(options.address, options.security);
  if (!channel.ok()) {
    return absl::Status(channel.status().code(),
                        absl::StrCat("remote node '", options.node, "' at ", options.address, ": ",
                                     channel.status().message()));
  }
  std::unique_ptr<RemoteNode> node(new RemoteNode(std::move(options)));
  node->channel_ = *std::move(channel);
  node->stub_ = ktx::v1::ExpertShard::NewStub(node->channel_);
  return node;
}

RemoteNode::~RemoteNode() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    connected_ = false;
    for (grpc::ClientContext* context : info_contexts_) context->TryCancel();
    if (session_ != nullptr) {
      session_->broken = true;
      if (session_->reason.empty()) session_->reason = "the engine is shutting down";
    }
    cv_.notify_all();
  }
  if (manager_.joinable()) manager_.join();
  FailAll("the engine is shutting down");
}

std::string RemoteNode::Label() const {
  return absl::StrCat("node '", options_.node, "' at ", options_.address);
}

absl::Status RemoteNode::PartError(const std::string& shard, const std::string& what) const {
  return absl::UnavailableError(
      absl::StrCat("remote expert shard '", shard, "' on ", Label(), ": ", what));
}

absl::Status RemoteNode::CheckInfo(Clock::time_point deadline) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + (deadline - Clock::now()));
  context.set_wait_for_ready(true);
  rpc::AttachToken(options_.security, &context);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return absl::CancelledError(absl::StrCat(Label(), ": shutting down"));
    info_contexts_.insert(&context);
  }
  ktx::v1::ShardInfoResponse info;
  const grpc::Status status = stub_->Info(&context, ktx::v1::ShardInfoRequest(), &info);
  {
    std::lock_guard<std::mutex> lock(mu_);
    info_contexts_.erase(&context);
  }
  if (!status.ok()) {
    const absl::Status s = FromGrpcStatus(status);
    return absl::Status(s.code(), absl::StrCat(Label(), ": Info: ", s.message()));
  }
  return CheckInfoResponse(info);
}

absl::Status RemoteNode::CheckInfoResponse(const ktx::v1::ShardInfoResponse& info) const {
  if (info.model_fingerprint() != options_.fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        Label(), " (it calls itself '", info.node(), "') serves another model: fingerprint ",
        gguf::ShortFingerprint(info.model_fingerprint()), ", this head's model ",
        gguf::ShortFingerprint(options_.fingerprint)));
  }
  if (options_.n_embd > 0 && info.n_embd() != options_.n_embd) {
    return absl::FailedPreconditionError(
        absl::StrCat(Label(), " reports n_embd ", info.n_embd(), ", expected ", options_.n_embd));
  }
  const ktx::v1::WireDtype want = ToProtoDtype(options_.wire_dtype);
  if (std::find(info.wire_dtypes().begin(), info.wire_dtypes().end(), want) ==
      info.wire_dtypes().end()) {
    return absl::FailedPreconditionError(
        absl::StrCat(Label(), " does not accept wire dtype ", WireDtypeName(options_.wire_dtype)));
  }
  for (const ExpectedShard& expected : options_.shards) {
    const ktx::v1::HostedShard* hosted = nullptr;
    std::vector<std::string> names;
    for (const ktx::v1::HostedShard& s : info.shards()) {
      names.push_back(absl::StrCat("'", s.name(), "'"));
      if (s.name() == expected.name) hosted = &s;
    }
    if (hosted == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(Label(), " does not host expert shard '", expected.name, "' (it hosts ",
                       names.empty() ? std::string("none") : absl::StrJoin(names, ", "), ")"));
    }
    const std::string differs =
        absl::StrCat("expert shard '", expected.name, "' on ", Label(),
                     " holds other experts than this head's placement plan (are both started "
                     "with the same topology and placement options?): ");
    if (hosted->plan_index() != expected.plan_index) {
      return absl::FailedPreconditionError(absl::StrCat(differs, "it is shard #",
                                                        hosted->plan_index(), " of its plan, #",
                                                        expected.plan_index, " of the head's"));
    }
    HeldExperts theirs(expected.held.size());
    for (const ktx::v1::HeldLayer& layer : hosted->layers()) {
      if (layer.il() < 0 || layer.il() >= static_cast<int>(theirs.size())) {
        return absl::FailedPreconditionError(absl::StrCat(differs, "it holds experts of layer ",
                                                          layer.il(), ", the model has ",
                                                          theirs.size(), " layers"));
      }
      theirs[layer.il()].assign(layer.experts().begin(), layer.experts().end());
    }
    for (size_t il = 0; il < theirs.size(); ++il) {
      if (theirs[il] != expected.held[il]) {
        return absl::FailedPreconditionError(absl::StrCat(differs, "layer ", il, ": it holds ",
                                                          Ranges(theirs[il]), ", the plan ",
                                                          Ranges(expected.held[il])));
      }
    }
  }
  return absl::OkStatus();
}

void RemoteNode::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_ || stop_) return;
  started_ = true;
  manager_ = std::thread([this] { ManagerLoop(); });
}

bool RemoteNode::connected() const {
  std::lock_guard<std::mutex> lock(mu_);
  return connected_;
}

absl::Status RemoteNode::WaitConnected(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_until(lock, deadline, [this] { return connected_ || stop_; });
  if (connected_) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(Label(), " is not connected: ", last_error_));
}

RemoteNodeCounters RemoteNode::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  RemoteNodeCounters c = counters_;
  c.connected = connected_;
  c.last_error = last_error_;
  c.in_flight = static_cast<int64_t>(pending_.size());
  return c;
}

absl::Status RemoteNode::Submit(const std::string& shard_name, int plan_index,
                                const ExpertWork& work, Callback done) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!connected_ || stop_) {
    return PartError(shard_name, absl::StrCat("not connected (", last_error_, ")"));
  }
  const uint64_t id = next_request_++;
  Pending& p = pending_[id];
  p.shard = shard_name;
  p.plan_index = plan_index;
  p.il = work.il;
  p.n_rows = static_cast<int64_t>(work.rows.size());
  p.work = work;
  p.done = std::move(done);
  p.submitted = Clock::now();
  queue_.push_back(id);
  cv_.notify_all();
  return absl::OkStatus();
}

void RemoteNode::FailAll(const std::string& why) {
  std::map<uint64_t, Pending> failed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed.swap(pending_);
    queue_.clear();
    counters_.parts_failed += static_cast<int64_t>(failed.size());
  }
  for (auto& [id, p] : failed) p.done(PartError(p.shard, why));
}

void RemoteNode::ManagerLoop() {
  std::chrono::milliseconds backoff = options_.reconnect_min;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return;
    }
    absl::Status status = CheckInfo(Clock::now() + options_.info_deadline);
    if (status.ok()) {
      auto session = std::make_unique<Session>();
      rpc::AttachToken(options_.security, &session->context);
      session->stream = stub_->Compute(&session->context);
      RunSession(std::move(session));
      backoff = options_.reconnect_min;
    } else {
      std::lock_guard<std::mutex> lock(mu_);
      if (last_error_ != status.message()) {
        KTX_LOG(WARNING, "remote") << Label() << ": cannot serve: " << status.message();
      }
      last_error_ = std::string(status.message());
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, backoff, [this] { return stop_; });
    backoff = std::min(backoff * 2, options_.reconnect_max);
  }
}

void RemoteNode::RunSession(std::unique_ptr<Session> session) {
  Session* s = session.get();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) {
      s->broken = true;
      s->reason = "the engine is shutting down";
    } else {
      connected_ = true;
      session_ = s;
      counters_.sessions++;
      if (counters_.sessions > 1) {
        KTX_LOG(INFO, "remote") << Label() << ": connected again (was: " << last_error_ << ")";
      }
      last_error_.clear();
      cv_.notify_all();
    }
  }
  if (!s->broken) {
    s->writer = std::thread([this, s] { WriterLoop(s); });
    s->reader = std::thread([this, s] { ReaderLoop(s); });
  }
  // Watch the session: a part without an answer for stall_timeout means a
  // stalled peer; the session ends then, or when a thread finds it broken.
  const auto period = std::clamp(options_.stall_timeout / 4, std::chrono::milliseconds(5),
                                 std::chrono::milliseconds(250));
  {
    std::unique_lock<std::mutex> lock(mu_);
    while (!s->broken) {
      cv_.wait_for(lock, period, [&] { return s->broken || stop_; });
      if (stop_ && !s->broken) {
        s->broken = true;
        s->reason = "the engine is shutting down";
      }
      if (s->broken) break;
      const Clock::time_point now = Clock::now();
      for (const auto& [id, p] : pending_) {
        if (now - p.submitted > options_.stall_timeout) {
          s->broken = true;
          s->reason =
              absl::StrCat("no answer to layer ", p.il, " within ", Millis(options_.stall_timeout),
                           " ms: the node is stalled or unreachable; stream reset");
          break;
        }
      }
    }
    connected_ = false;
    session_ = nullptr;
    cv_.notify_all();
  }
  s->context.TryCancel();
  if (s->writer.joinable()) s->writer.join();
  if (s->reader.joinable()) s->reader.join();
  const grpc::Status finish = s->stream->Finish();
  std::string why;
  {
    std::lock_guard<std::mutex> lock(mu_);
    why = s->reason;
    if (!finish.ok() && finish.error_code() != grpc::StatusCode::CANCELLED) {
      absl::StrAppend(&why, " (", FromGrpcStatus(finish).ToString(), ")");
    }
    last_error_ = why;
  }
  bool stopping = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping = stop_;
  }
  if (stopping) {
    KTX_LOG(INFO, "remote") << Label() << ": stream closed: " << why;
  } else {
    KTX_LOG(WARNING, "remote") << Label() << ": stream closed: " << why;
  }
  FailAll(why);
}

void RemoteNode::WriterLoop(Session* s) {
  const size_t budget = static_cast<size_t>(std::max(options_.security.max_message_bytes / 2, 1));
  for (;;) {
    std::vector<std::pair<uint64_t, Pending>> batch;  // the parts' data, without callbacks
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !queue_.empty() || s->broken; });
      if (s->broken) return;
      size_t bytes = 0;
      size_t taken = 0;
      for (; taken < queue_.size(); ++taken) {
        auto it = pending_.find(queue_[taken]);
        if (it == pending_.end()) continue;
        const Pending& p = it->second;
        const size_t part_bytes = static_cast<size_t>(p.n_rows) *
                                  static_cast<size_t>(p.work.h.n_cols()) *
                                  (options_.wire_dtype == WireDtype::kBf16 ? 2 : 4);
        if (!batch.empty() && bytes + part_bytes > budget) break;
        bytes += part_bytes;
        Pending copy;
        copy.shard = p.shard;
        copy.il = p.il;
        copy.work = std::move(it->second.work);  // written once; the rest stays for the answer
        batch.emplace_back(queue_[taken], std::move(copy));
      }
      queue_.erase(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(taken));
    }
    if (batch.empty()) continue;
    ktx::v1::ComputeRequest request;
    for (auto& [id, p] : batch) {
      const ExpertWork& work = p.work;
      ktx::v1::ExpertPart* part = request.add_parts();
      part->set_request_id(id);
      part->set_shard(p.shard);
      part->set_il(work.il);
      EncodeRows(*work.h, work.rows, options_.wire_dtype, part->mutable_h());
      part->set_n_expert_used(work.n_expert_used);
      part->mutable_expert_ids()->Add(work.expert_ids.begin(), work.expert_ids.end());
      part->mutable_weights()->Add(work.weights.begin(), work.weights.end());
      for (size_t e = 0; e < work.expert_mask.size(); ++e) {
        if (work.expert_mask[e] != 0) part->add_experts(static_cast<int32_t>(e));
      }
    }
    batch.clear();  // drop the activations before blocking in Write
    const bool ok = s->stream->Write(request);
    std::lock_guard<std::mutex> lock(mu_);
    if (!ok) {
      if (!s->broken) {
        s->broken = true;
        s->reason = "the stream failed while sending";
        cv_.notify_all();
      }
      return;
    }
    counters_.messages_sent++;
    counters_.parts_sent += request.parts_size();
  }
}

void RemoteNode::ReaderLoop(Session* s) {
  ktx::v1::ComputeResponse response;
  while (s->stream->Read(&response)) {
    for (const ktx::v1::ExpertResult& r : response.results()) {
      Pending p;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = pending_.find(r.request_id());
        if (it == pending_.end()) continue;  // already failed (late answer)
        p = std::move(it->second);
        pending_.erase(it);
      }
      if (r.code() != 0) {
        const absl::StatusCode code = r.code() > 0 && r.code() <= 16
                                          ? static_cast<absl::StatusCode>(r.code())
                                          : absl::StatusCode::kUnknown;
        p.done(absl::Status(code, absl::StrCat("remote expert shard '", p.shard, "' on ", Label(),
                                               ": ", r.message())));
        continue;
      }
      models::Activations partial;
      DecodeLimits limits;
      limits.n_cols = options_.n_embd > 0 ? options_.n_embd : -1;
      limits.min_rows = p.n_rows;
      limits.max_rows = p.n_rows;
      if (absl::Status bad = DecodeTensor(r.partial(), "results[].partial", limits, &partial);
          !bad.ok()) {
        p.done(absl::InternalError(absl::StrCat("remote expert shard '", p.shard, "' on ", Label(),
                                                " answered layer ", p.il,
                                                " with a bad tensor: ", bad.message())));
        continue;
      }
      ExpertPartial result;
      result.shard = p.plan_index;
      result.partial = Tensor::Wrap(std::move(partial));
      result.compute_us = r.compute_us();
      p.done(std::move(result));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!s->broken) {
    s->broken = true;
    s->reason = "the stream ended";
    cv_.notify_all();
  }
}

}  // namespace ktx::actors
