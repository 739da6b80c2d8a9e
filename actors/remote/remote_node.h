// File: actors/remote/remote_node.h
//
// RemoteNode: the head's connection to one shard node (one address): a gRPC
// channel and ONE long-lived bidirectional ExpertShard.Compute stream that
// carries the expert work of every shard the head expects there. The proxy
// actors (remote_shard_actor.h) Submit parts; answers come back through a
// callback. No CAF here.
//
//   RemoteNodeOptions options;  // node, address, security, fingerprint, expected shards
//   KTX_ASSIGN_OR_RETURN(std::unique_ptr<RemoteNode> node, RemoteNode::Create(options));
//   KTX_RETURN_IF_ERROR(node->CheckInfo(deadline));   // Engine::Create waits with this
//   node->Start();                                     // the stream, reconnects
//   KTX_RETURN_IF_ERROR(node->WaitConnected(deadline));
//   KTX_RETURN_IF_ERROR(node->Submit("node1/s0", shard_index, work, [](auto result) { ... }));
//
// Threads (none touches CAF; none blocks a caller for long):
//   manager  connects (Info check with a deadline, then opens the stream),
//            watches the parts in flight and tears the session down when the
//            stream breaks or a part stalls, then reconnects with backoff;
//   writer   per session: takes every queued part, gathers and encodes the
//            rows (F32 or BF16) and writes them as one ComputeRequest;
//   reader   per session: reads answers, decodes them, calls the callbacks.
//
// Failure semantics:
//  - Submit fails fast (UNAVAILABLE naming shard, node, address and the last
//    error) while the node is not connected; the callback is then not called.
//  - When the stream breaks (peer gone, write or read failed) or a part gets
//    no answer within stall_timeout (the peer is stalled: the stream is
//    cancelled), every part in flight fails with UNAVAILABLE naming the
//    shard, node and address, at once.
//  - The manager reconnects in the background and checks Info again (same
//    model fingerprint, the expected shards with the same held experts)
//    before it serves again; a node that comes back with another model stays
//    disconnected with that reason.
//  - Every unary call has a deadline (info_deadline); the stream has none of
//    its own (it lives as long as the engine): its parts have stall_timeout,
//    and channel keepalive pings (rpc::ChannelArgs) notice a dead peer on an
//    idle stream.
//
// Ownership: owns the channel, the stream and the threads; callbacks of
// pending parts are called (with UNAVAILABLE "shutting down") before the
// destructor returns. Thread-safety: every method may be called from any
// thread; callbacks run on the reader or manager thread (or the destructor's)
// and must return quickly.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "actors/messages.h"
#include "actors/remote/wire_dtype.h"
#include "actors/rpc/security.h"
#include "actors/shard_experts.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "ktx/v1/shard.grpc.pb.h"

namespace ktx::actors {

// A shard the head expects on a node: its name, plan index and the experts
// its plan gives it ([n_layer] ascending ids).
struct ExpectedShard {
  std::string name;
  int plan_index = 0;
  HeldExperts held;
};

struct RemoteNodeOptions {
  std::string node;     // for messages
  std::string address;  // host:port
  rpc::RpcSecurity security;
  std::string fingerprint;  // the head's gguf::ModelFingerprint
  std::vector<ExpectedShard> shards;
  WireDtype wire_dtype = WireDtype::kF32;
  int64_t n_embd = 0;  // expected columns of every partial
  // A part unanswered this long breaks the stream (UNAVAILABLE); keep it
  // below the router's shard deadline so that a stall is reported as one.
  std::chrono::milliseconds stall_timeout{20000};
  std::chrono::milliseconds info_deadline{5000};  // each Info call
  std::chrono::milliseconds reconnect_min{100};   // backoff between attempts
  std::chrono::milliseconds reconnect_max{1000};
};

// Counters of one node's connection.
struct RemoteNodeCounters {
  bool connected = false;
  std::string last_error;     // why it is (or last was) disconnected
  int64_t sessions = 0;       // streams opened so far
  int64_t parts_sent = 0;     // parts written
  int64_t parts_failed = 0;   // parts failed by the connection (not by the peer)
  int64_t messages_sent = 0;  // ComputeRequests written (parts are coalesced)
  int64_t in_flight = 0;      // parts submitted and not answered
};

class RemoteNode {
 public:
  // The answer to one part: the partial sums (F32 [rows, n_embd]) with the
  // peer's compute time, or an error.
  using Callback = std::function<void(absl::StatusOr<ExpertPartial> result)>;

  // Makes the channel (no I/O). InvalidArgument for a bad address or
  // options (naming them).
  static absl::StatusOr<std::unique_ptr<RemoteNode>> Create(RemoteNodeOptions options);
  ~RemoteNode();
  RemoteNode(const RemoteNode&) = delete;
  RemoteNode& operator=(const RemoteNode&) = delete;

  // One Info call that waits for the peer until `deadline` (wait for ready)
  // and checks what it serves. Errors name the node and address:
  // UNAVAILABLE / DEADLINE_EXCEEDED when it cannot be reached,
  // UNAUTHENTICATED when it refuses the token, FAILED_PRECONDITION when it
  // serves another model (fingerprints) or other experts than the plan's
  // (naming the shard and the first differing layer), or lacks a shard.
  absl::Status CheckInfo(std::chrono::steady_clock::time_point deadline);

  // Starts the manager thread (idempotent).
  void Start();
  // Blocks until the stream is up, or `deadline` (UNAVAILABLE with the last
  // error).
  absl::Status WaitConnected(std::chrono::steady_clock::time_point deadline);
  bool connected() const;

  // Queues one part for shard `shard_name`: the rows `work.rows` of work.h
  // with their routing and the experts of work.expert_mask. `done` is called
  // exactly once when Submit returns OK. `plan_index` goes into the
  // ExpertPartial.
  absl::Status Submit(const std::string& shard_name, int plan_index, const ExpertWork& work,
                      Callback done);

  RemoteNodeCounters counters() const;
  const RemoteNodeOptions& options() const { return options_; }
  // "node 'n1' at 127.0.0.1:5001".
  std::string Label() const;

 private:
  struct Pending {
    std::string shard;
    int plan_index = 0;
    int32_t il = 0;
    int64_t n_rows = 0;
    ExpertWork work;  // released once written
    Callback done;
    std::chrono::steady_clock::time_point submitted;
  };
  struct Session;

  explicit RemoteNode(RemoteNodeOptions options);
  absl::Status CheckInfoResponse(const ktx::v1::ShardInfoResponse& info) const;
  void ManagerLoop();
  // One connected session: returns when it has ended (broken or stopping).
  void RunSession(std::unique_ptr<Session> session);
  void WriterLoop(Session* session);
  void ReaderLoop(Session* session);
  // Fails every pending part with UNAVAILABLE naming its shard, the node and
  // `why` (callbacks are called without the lock).
  void FailAll(const std::string& why);
  absl::Status PartError(const std::string& shard, const std::string& what) const;

  const RemoteNodeOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<ktx::v1::ExpertShard::Stub> stub_;

  mutable std::mutex mu_;
  std::condition_variable cv_;  // state changes, queue, stop
  bool started_ = false;
  bool stop_ = false;
  bool connected_ = false;
  std::string last_error_ = "not connected yet";
  uint64_t next_request_ = 1;
  std::map<uint64_t, Pending> pending_;           // submitted, not answered
  std::vector<uint64_t> queue_;                   // submitted, not written yet (ids into pending_)
  Session* session_ = nullptr;                    // the live session
  std::set<grpc::ClientContext*> info_contexts_;  // Info calls in progress (cancelled on stop)
  RemoteNodeCounters counters_;
  std::thread manager_;
};

}  // namespace ktx::actors
