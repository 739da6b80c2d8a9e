// Tests of actors/rpc/security.h: token files, bind addresses, and real gRPC
// calls on loopback with and without the token and with mutual TLS (a test
// NodeControl server whose handler checks the token first).
#include "actors/rpc/security.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "gmock/gmock.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "ktx/v1/node.grpc.pb.h"

namespace ktx::rpc {
namespace {

using ::testing::HasSubstr;

const std::string kTls = std::string(KTX_SOURCE_DIR) + "/tests/data/tls/";

std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("ktx_security_test_" + std::to_string(getpid()) + "_" + name))
                               .string();
  std::ofstream(path) << text;
  return path;
}

TEST(ReadTokenFile, TrimsAndRejectsBadFiles) {
  EXPECT_EQ(*ReadTokenFile(WriteTemp("ok", "  s3cret-token\n")), "s3cret-token");
  absl::StatusOr<std::string> empty = ReadTokenFile(WriteTemp("empty", " \n"));
  ASSERT_FALSE(empty.ok());
  EXPECT_THAT(std::string(empty.status().message()), HasSubstr("empty"));
  absl::StatusOr<std::string> two = ReadTokenFile(WriteTemp("two", "a\nb\n"));
  ASSERT_FALSE(two.ok());
  EXPECT_THAT(std::string(two.status().message()), HasSubstr("more than one line"));
  absl::StatusOr<std::string> missing = ReadTokenFile("/nonexistent/ktx/token");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("/nonexistent/ktx/token"));
}

TEST(CheckBindAddress, LoopbackUnlessAllowed) {
  EXPECT_TRUE(CheckBindAddress("127.0.0.1:50051", false).ok());
  EXPECT_TRUE(CheckBindAddress("[::1]:50051", false).ok());
  EXPECT_TRUE(CheckBindAddress("localhost:1", false).ok());
  absl::Status any = CheckBindAddress("0.0.0.0:50051", false);
  EXPECT_EQ(any.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(any.message()), HasSubstr("0.0.0.0:50051"));
  EXPECT_TRUE(CheckBindAddress("0.0.0.0:50051", true).ok());
  EXPECT_FALSE(CheckBindAddress("127.0.0.1", true).ok());
  EXPECT_FALSE(CheckBindAddress("127.0.0.1:0x", true).ok());
}

TEST(RpcSecurityFromNode, ReadsFilesRelativeToTheConfig) {
  ktx::v1::NodeConfig node;
  node.set_name("n1");
  node.mutable_tls()->set_cert_file("node.pem");
  node.mutable_tls()->set_key_file("node.key");
  node.mutable_tls()->set_ca_file("ca.pem");
  absl::StatusOr<RpcSecurity> security = RpcSecurityFromNode(node, kTls);
  ASSERT_TRUE(security.ok()) << security.status();
  EXPECT_TRUE(security->tls());
  EXPECT_TRUE(security->token.empty());

  node.mutable_tls()->clear_key_file();
  absl::StatusOr<RpcSecurity> partial = RpcSecurityFromNode(node, kTls);
  ASSERT_FALSE(partial.ok());
  EXPECT_THAT(std::string(partial.status().message()), HasSubstr("node 'n1': tls"));

  node.clear_tls();
  node.set_auth_token_file("no-such-token");
  absl::StatusOr<RpcSecurity> missing = RpcSecurityFromNode(node, kTls);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("auth_token_file"));
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("no-such-token"));
}

// NodeControl whose Status checks the token like every ktx handler does.
class TokenCheckingNode final : public ktx::v1::NodeControl::Service {
 public:
  explicit TokenCheckingNode(RpcSecurity security) : security_(std::move(security)) {}
  grpc::Status Status(grpc::ServerContext* context, const ktx::v1::NodeStatusRequest*,
                      ktx::v1::NodeStatusResponse* response) override {
    if (grpc::Status s = CheckToken(*context, security_); !s.ok()) return s;
    response->set_node_name("test-node");
    return grpc::Status::OK;
  }

 private:
  RpcSecurity security_;
};

struct TestServer {
  std::unique_ptr<TokenCheckingNode> service;
  std::unique_ptr<grpc::Server> server;
  std::string address;
};

TestServer Start(const RpcSecurity& security) {
  TestServer t;
  t.service = std::make_unique<TokenCheckingNode>(security);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", *MakeServerCredentials(security), &port);
  ApplyServerLimits(security, &builder);
  builder.RegisterService(t.service.get());
  t.server = builder.BuildAndStart();
  t.address = "127.0.0.1:" + std::to_string(port);
  return t;
}

grpc::Status Call(const std::string& address, const RpcSecurity& client) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(address, client);
  EXPECT_TRUE(channel.ok()) << channel.status();
  auto stub = ktx::v1::NodeControl::NewStub(*channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  AttachToken(client, &context);
  ktx::v1::NodeStatusRequest request;
  ktx::v1::NodeStatusResponse response;
  grpc::Status status = stub->Status(&context, request, &response);
  if (status.ok()) {
    EXPECT_EQ(response.node_name(), "test-node");
  }
  return status;
}

TEST(Token, RequiredOnEveryCallWhenConfigured) {
  RpcSecurity server;
  server.token = "right-token";
  TestServer t = Start(server);
  ASSERT_NE(t.server, nullptr);

  RpcSecurity none;
  grpc::Status missing = Call(t.address, none);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(missing.error_message(), HasSubstr("missing auth token"));

  RpcSecurity wrong;
  wrong.token = "wrong-token";
  grpc::Status bad = Call(t.address, wrong);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(bad.error_message(), HasSubstr("wrong auth token"));
  EXPECT_THAT(bad.error_message(), ::testing::Not(HasSubstr("wrong-token")));

  RpcSecurity right;
  right.token = "right-token";
  EXPECT_TRUE(Call(t.address, right).ok());
  t.server->Shutdown();
}

TEST(Token, NoTokenConfiguredAcceptsEveryCall) {
  TestServer t = Start(RpcSecurity{});
  RpcSecurity with;
  with.token = "anything";
  EXPECT_TRUE(Call(t.address, RpcSecurity{}).ok());
  EXPECT_TRUE(Call(t.address, with).ok());
  t.server->Shutdown();
}

TEST(MutualTls, PeersSignedByTheCaOnly) {
  absl::StatusOr<RpcSecurity> server =
      ClientSecurity("", kTls + "ca.pem", kTls + "node.pem", kTls + "node.key");
  ASSERT_TRUE(server.ok()) << server.status();
  TestServer t = Start(*server);
  ASSERT_NE(t.server, nullptr);
  t.address = "localhost:" + t.address.substr(t.address.rfind(':') + 1);

  absl::StatusOr<RpcSecurity> client =
      ClientSecurity("", kTls + "ca.pem", kTls + "client.pem", kTls + "client.key");
  ASSERT_TRUE(client.ok()) << client.status();
  grpc::Status ok = Call(t.address, *client);
  EXPECT_TRUE(ok.ok()) << ok.error_message();

  // A client certificate the CA did not sign, and a plaintext client.
  absl::StatusOr<RpcSecurity> rogue =
      ClientSecurity("", kTls + "ca.pem", kTls + "rogue.pem", kTls + "rogue.key");
  ASSERT_TRUE(rogue.ok());
  EXPECT_EQ(Call(t.address, *rogue).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Call(t.address, RpcSecurity{}).error_code(), grpc::StatusCode::UNAVAILABLE);
  t.server->Shutdown();
}

TEST(ClientSecurity, TokenFromTheEnvironment) {
  setenv("KTX_AUTH_TOKEN", " env-token \n", 1);
  absl::StatusOr<RpcSecurity> security = ClientSecurity("");
  unsetenv("KTX_AUTH_TOKEN");
  ASSERT_TRUE(security.ok());
  EXPECT_EQ(security->token, "env-token");
  EXPECT_FALSE(security->tls());
  absl::StatusOr<RpcSecurity> half = ClientSecurity("", "", kTls + "client.pem", "");
  EXPECT_FALSE(half.ok());
}

}  // namespace
}  // namespace ktx::rpc
