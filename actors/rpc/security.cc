// File: actors/rpc/security.cc
#include "actors/rpc/security.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "runtime/base/status.h"
#include "topology/config.h"

namespace ktx::rpc {
namespace {

constexpr char kAuthKey[] = "authorization";
constexpr char kBearer[] = "Bearer ";

absl::StatusOr<std::string> ReadWholeFile(const std::string& path, const std::string& what) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat(what, " '", path, "': no such file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::PermissionDeniedError(
        absl::StrCat(what, " '", path, "': cannot be read: ", std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(what, " '", path, "': read error"));
  return text.str();
}

std::string Resolve(const std::string& path, const std::string& base_dir) {
  if (path.empty() || base_dir.empty() || std::filesystem::path(path).is_absolute()) return path;
  return (std::filesystem::path(base_dir) / path).string();
}

// Constant-time comparison (the length is not secret).
bool SameToken(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

absl::StatusOr<RpcSecurity> WithTls(RpcSecurity security, const std::string& ca_file,
                                    const std::string& cert_file, const std::string& key_file,
                                    const std::string& where) {
  if (!ca_file.empty()) {
    KTX_ASSIGN_OR_RETURN(security.ca_pem, ReadWholeFile(ca_file, absl::StrCat(where, "ca_file")));
  }
  if (!cert_file.empty()) {
    KTX_ASSIGN_OR_RETURN(security.cert_pem,
                         ReadWholeFile(cert_file, absl::StrCat(where, "cert_file")));
  }
  if (!key_file.empty()) {
    KTX_ASSIGN_OR_RETURN(security.key_pem,
                         ReadWholeFile(key_file, absl::StrCat(where, "key_file")));
  }
  if (security.cert_pem.empty() != security.key_pem.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "cert_file and key_file: give both or neither"));
  }
  if (!security.cert_pem.empty() && security.ca_pem.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "cert_file without ca_file: TLS needs the CA that signs the peers"));
  }
  return security;
}

}  // namespace

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  KTX_ASSIGN_OR_RETURN(std::string text, ReadWholeFile(path, "token file"));
  std::string token(absl::StripAsciiWhitespace(text));
  if (token.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token file '", path, "': empty; expected one line holding the token"));
  }
  if (token.find_first_of("\r\n") != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("token file '", path, "': more than one line; expected one line"));
  }
  for (char c : token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file '", path, "': the token has a character that is not printable ASCII"));
    }
  }
  return token;
}

absl::StatusOr<RpcSecurity> RpcSecurityFromNode(const ktx::v1::NodeConfig& node,
                                                const std::string& config_dir) {
  RpcSecurity security;
  const std::string where = absl::StrCat("node '", node.name(), "': ");
  if (!node.auth_token_file().empty()) {
    absl::StatusOr<std::string> token = ReadTokenFile(Resolve(node.auth_token_file(), config_dir));
    if (!token.ok()) {
      return absl::Status(token.status().code(),
                          absl::StrCat(where, "auth_token_file: ", token.status().message()));
    }
    security.token = *std::move(token);
  }
  const ktx::v1::TlsConfig& tls = node.tls();
  const int n_set = !tls.cert_file().empty() + !tls.key_file().empty() + !tls.ca_file().empty();
  if (n_set != 0 && n_set != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "tls: set cert_file, key_file and ca_file together (mutual TLS) or none"));
  }
  return WithTls(std::move(security), Resolve(tls.ca_file(), config_dir),
                 Resolve(tls.cert_file(), config_dir), Resolve(tls.key_file(), config_dir),
                 absl::StrCat(where, "tls."));
}

absl::StatusOr<RpcSecurity> ClientSecurity(const std::string& token_file,
                                           const std::string& ca_file, const std::string& cert_file,
                                           const std::string& key_file) {
  RpcSecurity security;
  if (!token_file.empty()) {
    KTX_ASSIGN_OR_RETURN(security.token, ReadTokenFile(token_file));
  } else if (const char* env = std::getenv("KTX_AUTH_TOKEN"); env != nullptr) {
    security.token = std::string(absl::StripAsciiWhitespace(env));
  }
  return WithTls(std::move(security), ca_file, cert_file, key_file, "--");
}

absl::Status CheckBindAddress(std::string_view address, bool allow_remote) {
  KTX_ASSIGN_OR_RETURN(topology::HostPort host_port, topology::ParseListenAddress(address));
  if (!allow_remote && !topology::IsLoopbackHost(host_port.host)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "listen address '", std::string(address),
        "': not a loopback address; ktx serves on loopback unless the node's topology entry "
        "names another address (and then set an auth token and TLS)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const RpcSecurity& security) {
  if (!security.tls()) return grpc::InsecureServerCredentials();
  if (security.cert_pem.empty() || security.key_pem.empty()) {
    return absl::InvalidArgumentError(
        "TLS server: needs its certificate and private key besides the CA");
  }
  grpc::SslServerCredentialsOptions options(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = security.ca_pem;
  options.pem_key_cert_pairs.push_back({security.key_pem, security.cert_pem});
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const RpcSecurity& security) {
  if (!security.tls()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = security.ca_pem;
  options.pem_private_key = security.key_pem;
  options.pem_cert_chain = security.cert_pem;
  return grpc::SslCredentials(options);
}

void ApplyServerLimits(const RpcSecurity& security, grpc::ServerBuilder* builder) {
  builder->SetMaxReceiveMessageSize(security.max_message_bytes);
  builder->SetMaxSendMessageSize(security.max_message_bytes);
  // Answer clients' keepalive pings on idle long-lived streams.
  builder->AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
}

grpc::ChannelArguments ChannelArgs(const RpcSecurity& security) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(security.max_message_bytes);
  args.SetMaxSendMessageSize(security.max_message_bytes);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // Reconnect quickly once a restarted peer is back.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return args;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address,
                                                           const RpcSecurity& security) {
  KTX_RETURN_IF_ERROR(topology::ParseListenAddress(address).status());
  KTX_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                       MakeChannelCredentials(security));
  return grpc::CreateCustomChannel(address, credentials, ChannelArgs(security));
}

grpc::Status CheckToken(const grpc::ServerContext& context, const RpcSecurity& security) {
  if (security.token.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  auto it = metadata.find(kAuthKey);
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing auth token: this server requires 'authorization: Bearer "
                        "<token>' (ktx-ctl: --token-file or KTX_AUTH_TOKEN)");
  }
  std::string_view value(it->second.data(), it->second.size());
  const std::string_view bearer(kBearer);
  if (value.substr(0, bearer.size()) != bearer ||
      !SameToken(value.substr(bearer.size()), security.token)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong auth token");
  }
  return grpc::Status::OK;
}

void AttachToken(const RpcSecurity& security, grpc::ClientContext* context) {
  if (!security.token.empty())
    context->AddMetadata(kAuthKey, absl::StrCat(kBearer, security.token));
}

}  // namespace ktx::rpc
