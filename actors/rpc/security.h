// File: actors/rpc/security.h
//
// How every ktx gRPC endpoint (Generation, ExpertShard, NodeControl servers;
// ktx-node's shard proxies and ktx-ctl as clients) is secured, in one place:
//
//  * Bind addresses: a server binds to loopback unless the operator allows
//    more (CheckBindAddress: a non-loopback host needs allow_remote, which
//    ktx-node sets when the topology names a non-loopback listen address).
//  * Shared token: when configured (a file named in the topology, or the
//    KTX_AUTH_TOKEN environment variable for ktx-ctl), every call must carry
//    the metadata "authorization: Bearer <token>"; CheckToken answers
//    UNAUTHENTICATED for a missing or wrong one (compared in constant time).
//    The standard health service (grpc.health.v1) stays open for probes.
//  * TLS: with cert, key and CA files, servers require and verify client
//    certificates signed by the CA (mutual TLS) and clients verify the server;
//    without them, plaintext (meant for loopback and private networks).
//  * Message-size limits on both sides (ApplyServerLimits, ChannelArgs).
//
//   KTX_ASSIGN_OR_RETURN(RpcSecurity security, RpcSecurityFromNode(node, config_dir));
//   KTX_ASSIGN_OR_RETURN(auto server_creds, MakeServerCredentials(security));
//   grpc::ServerBuilder builder;
//   builder.AddListeningPort(address, server_creds);
//   ApplyServerLimits(security, &builder);
//   ... in every handler:  if (grpc::Status s = CheckToken(*context, security); !s.ok()) return s;
//   client side:
//   KTX_ASSIGN_OR_RETURN(auto channel, MakeChannel(address, security));
//   grpc::ClientContext context;  AttachToken(security, &context);
//
// Thread-safety: RpcSecurity is a plain value; every function is thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/channel_arguments.h"
#include "ktx/v1/topology.pb.h"

namespace ktx::rpc {

// Default largest message either side accepts: 64 MiB (a prefill chunk of
// 2048 tokens x 7168 bf16 hidden values is 28 MiB).
inline constexpr int kDefaultMaxMessageBytes = 64 << 20;

struct RpcSecurity {
  std::string token;  // shared bearer token; empty: no token required or sent
  // PEM contents (not paths) of this side's certificate chain, private key
  // and the CA that signs the peers; all empty: plaintext.
  std::string cert_pem;
  std::string key_pem;
  std::string ca_pem;
  int max_message_bytes = kDefaultMaxMessageBytes;

  bool tls() const { return !ca_pem.empty(); }
};

// Reads a token file: its content with surrounding whitespace removed.
// NotFound / PermissionDenied naming the file; InvalidArgument when it is
// empty or holds more than one line.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// The node's token file and TLS files (paths relative to `config_dir`),
// read now so that a bad file fails at start-up naming the field and file.
absl::StatusOr<RpcSecurity> RpcSecurityFromNode(const ktx::v1::NodeConfig& node,
                                                const std::string& config_dir);

// For clients such as ktx-ctl: the token from `token_file` when non-empty,
// else the environment variable KTX_AUTH_TOKEN (unset or empty: none); TLS
// files as paths (all three empty: plaintext; a CA alone: server-verified TLS
// without a client certificate).
absl::StatusOr<RpcSecurity> ClientSecurity(const std::string& token_file,
                                           const std::string& ca_file = {},
                                           const std::string& cert_file = {},
                                           const std::string& key_file = {});

// InvalidArgument naming `address` when it is not host:port, or when its host
// is not loopback (127.0.0.0/8, ::1, localhost) and `allow_remote` is false.
absl::Status CheckBindAddress(std::string_view address, bool allow_remote);

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const RpcSecurity& security);
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const RpcSecurity& security);

// Message-size limits (both directions) for a server.
void ApplyServerLimits(const RpcSecurity& security, grpc::ServerBuilder* builder);
// Message-size limits for a channel (and keepalive pings every 10 s, so a
// dead peer on a long-lived stream is noticed without traffic).
grpc::ChannelArguments ChannelArgs(const RpcSecurity& security);
// A channel to `address` with the credentials and arguments above.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address,
                                                           const RpcSecurity& security);

// Server side, first thing in every handler: OK when no token is configured
// or the call carries "authorization: Bearer <token>"; else UNAUTHENTICATED
// ("missing ..." or "wrong ...", never echoing what was sent).
grpc::Status CheckToken(const grpc::ServerContext& context, const RpcSecurity& security);
// Client side: adds the token's metadata to a call (nothing when no token).
void AttachToken(const RpcSecurity& security, grpc::ClientContext* context);

}  // namespace ktx::rpc
