// The router actor against fake shard actors (no model): how it groups tokens
// by shard and orders the partial sums, how it picks among replicas, and what
// it answers when a shard is down or does not answer.
#include "actors/router_actor.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "actors/messages.h"
#include "actors/moe_client.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/actor_system_config.hpp"
#include "caf/exit_reason.hpp"
#include "caf/scoped_actor.hpp"
#include "caf/send.hpp"
#include "caf/stateful_actor.hpp"
#include "caf/typed_event_based_actor.hpp"
#include "caf/typed_response_promise.hpp"
#include "gtest/gtest.h"

namespace ktx::actors {
namespace {

constexpr int kNExpert = 8;
constexpr int kNEmbd = 4;

// What the fake shards were asked to do.
struct Journal {
  std::mutex mu;
  std::map<int, std::vector<ExpertWork>> works;  // shard -> works received
  void Add(int shard, const ExpertWork& work) {
    std::lock_guard<std::mutex> lock(mu);
    works[shard].push_back(work);
  }
  std::vector<ExpertWork> Of(int shard) {
    std::lock_guard<std::mutex> lock(mu);
    return works[shard];
  }
};

struct FakeState {
  std::vector<caf::typed_response_promise<ExpertPartial>> held;  // never answered
  static inline const char* name = "fake_shard";
};

// Answers every row with the value 1000 * shard + row (or never, when `hang`).
expert_shard_actor::behavior_type FakeShard(expert_shard_actor::stateful_pointer<FakeState> self,
                                            int index, bool hang,
                                            std::shared_ptr<Journal> journal) {
  return {
      [=](expert_atom, const ExpertWork& work) -> caf::typed_response_promise<ExpertPartial> {
        journal->Add(index, work);
        auto promise = self->make_response_promise<ExpertPartial>();
        if (hang) {
          self->state.held.push_back(promise);
          return promise;
        }
        models::Activations out(static_cast<int64_t>(work.rows.size()), kNEmbd);
        for (size_t j = 0; j < work.rows.size(); ++j) {
          for (int c = 0; c < kNEmbd; ++c) {
            out.row(static_cast<int64_t>(j))[c] = 1000.0f * index + work.rows[j];
          }
        }
        ExpertPartial partial;
        partial.shard = index;
        partial.partial = Tensor::Wrap(std::move(out));
        promise.deliver(std::move(partial));
        return promise;
      },
      [](expert_done_atom, ExpertJobDone&) {},
  };
}

class RouterTest : public ::testing::Test {
 protected:
  RouterTest() {
    ConfigureActorSystem(cfg_, 2);
    system_ = std::make_unique<caf::actor_system>(cfg_);
  }
  ~RouterTest() override {
    caf::anon_send_exit(router_, caf::exit_reason::user_shutdown);
    for (const auto& s : shards_) caf::anon_send_exit(s, caf::exit_reason::user_shutdown);
    system_->await_all_actors_done();
  }

  // Layer 0: expert e on shard e % 3. Layer 1: every expert on shards 0 and 1.
  void Start(std::vector<bool> hang, std::chrono::milliseconds deadline) {
    RouterConfig config;
    for (size_t s = 0; s < hang.size(); ++s) {
      shards_.push_back(
          system_->spawn(FakeShard, static_cast<int>(s), static_cast<bool>(hang[s]), journal_));
      config.shards.push_back(shards_.back());
      config.names.push_back("fake" + std::to_string(s));
    }
    config.holders.resize(2);
    for (int e = 0; e < kNExpert; ++e) {
      config.holders[0].push_back({e % 3});
      config.holders[1].push_back({0, 1});
    }
    config.n_expert = kNExpert;
    config.shard_deadline = deadline;
    router_ = SpawnRouter(*system_, std::move(config));
  }

  // h row t = t; K = 2.
  static MoeWork Work(int il, const std::vector<std::vector<int32_t>>& experts) {
    MoeWork work;
    work.il = il;
    models::Activations h(static_cast<int64_t>(experts.size()), kNEmbd);
    for (size_t t = 0; t < experts.size(); ++t) h.row(static_cast<int64_t>(t))[0] = t;
    work.h = Tensor::Wrap(std::move(h));
    work.n_expert_used = 2;
    for (const auto& token : experts) {
      for (int32_t e : token) {
        work.expert_ids.push_back(e);
        work.weights.push_back(0.5f);
      }
    }
    return work;
  }

  MoeResult Ask(MoeWork work) {
    caf::scoped_actor self{*system_};
    MoeResult out;
    self->request(router_, std::chrono::seconds(10), moe_atom::value, std::move(work))
        .receive([&](MoeResult& r) { out = std::move(r); },
                 [&](caf::error& e) { ADD_FAILURE() << caf::to_string(e); });
    return out;
  }

  RouterStats Stats() {
    caf::scoped_actor self{*system_};
    RouterStats out;
    self->request(router_, std::chrono::seconds(10), router_stats_atom::value)
        .receive([&](RouterStats& r) { out = std::move(r); }, [&](caf::error&) {});
    return out;
  }

  caf::actor_system_config cfg_;
  std::unique_ptr<caf::actor_system> system_;
  std::shared_ptr<Journal> journal_ = std::make_shared<Journal>();
  std::vector<expert_shard_actor> shards_;
  router_actor router_;
};

TEST_F(RouterTest, GroupsTokensByShardInShardOrder) {
  Start({false, false, false}, std::chrono::seconds(10));
  // Experts by shard (e % 3): shard 0 {0,3,6}, shard 1 {1,4,7}, shard 2 {2,5}.
  const MoeResult r = Ask(Work(0, {{2, 3}, {5, 7}, {0, 6}, {1, 4}}));
  EXPECT_EQ(r.code, 0) << r.message;
  EXPECT_TRUE(r.failed_rows.empty());
  ASSERT_EQ(r.parts.size(), 3u);
  const std::vector<std::vector<int32_t>> rows = {{0, 2}, {1, 3}, {0, 1}};
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(r.parts[s].shard, s);
    EXPECT_EQ(r.parts[s].rows, rows[s]) << "shard " << s;
    ASSERT_EQ(r.parts[s].partial.n_rows(), static_cast<int64_t>(rows[s].size()));
    for (size_t j = 0; j < rows[s].size(); ++j) {
      EXPECT_EQ(r.parts[s].partial->row(static_cast<int64_t>(j))[0], 1000.0f * s + rows[s][j]);
    }
  }
  // Each shard got exactly its experts, its rows' routing and the shared h.
  const std::vector<std::vector<int>> masks = {{0, 3, 6}, {1, 4, 7}, {2, 5}};
  for (int s = 0; s < 3; ++s) {
    const auto works = journal_->Of(s);
    ASSERT_EQ(works.size(), 1u);
    std::vector<int> mask;
    for (int e = 0; e < kNExpert; ++e) {
      if (works[0].expert_mask[e]) mask.push_back(e);
    }
    EXPECT_EQ(mask, masks[s]) << "shard " << s;
    EXPECT_EQ(works[0].rows, rows[s]);
    EXPECT_EQ(works[0].expert_ids.size(), rows[s].size() * 2);
    EXPECT_EQ(works[0].h.n_rows(), 4);
  }
}

TEST_F(RouterTest, SpreadsReplicatedExpertsByLoad) {
  Start({false, false, false}, std::chrono::seconds(10));
  // Layer 1: all experts on shards 0 and 1; ties go to shard 0, then load
  // steers the next expert to shard 1.
  const MoeResult r = Ask(Work(1, {{2, 5}, {2, 6}}));
  ASSERT_EQ(r.parts.size(), 2u);
  EXPECT_EQ(r.parts[0].shard, 0);
  EXPECT_EQ(r.parts[1].shard, 1);
  const RouterStats stats = Stats();
  EXPECT_EQ(stats.parts_sent[0], 1);
  EXPECT_EQ(stats.parts_sent[1], 1);
  EXPECT_EQ(stats.parts_sent[2], 0);
}

TEST_F(RouterTest, RowsNeedingADeadShardFailNamingIt) {
  Start({false, false, false}, std::chrono::seconds(10));
  caf::anon_send_exit(shards_[2], caf::exit_reason::kill);
  for (int i = 0; i < 1000 && Stats().alive[2]; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_FALSE(Stats().alive[2]);
  const MoeResult r = Ask(Work(0, {{0, 1}, {2, 3}, {4, 6}}));
  EXPECT_EQ(r.failed_rows, std::vector<int32_t>{1});
  EXPECT_EQ(r.code, static_cast<int32_t>(absl::StatusCode::kUnavailable));
  EXPECT_NE(r.message.find("'fake2' (#2)"), std::string::npos) << r.message;
  for (const PlacedPartial& p : r.parts) {
    EXPECT_NE(p.shard, 2);
    for (int32_t row : p.rows) EXPECT_NE(row, 1);
  }
}

TEST_F(RouterTest, LateShardFailsAtTheDeadlineOrItsWorkMovesToAReplica) {
  Start({false, true, false}, std::chrono::milliseconds(100));
  // Layer 0: shard 1 holds {1,4,7} alone: its rows fail after the deadline.
  auto start = std::chrono::steady_clock::now();
  MoeResult r = Ask(Work(0, {{0, 1}, {2, 3}}));
  double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(r.failed_rows, std::vector<int32_t>{0});
  EXPECT_EQ(r.code, static_cast<int32_t>(absl::StatusCode::kDeadlineExceeded));
  EXPECT_NE(r.message.find("'fake1' (#1)"), std::string::npos) << r.message;
  EXPECT_GE(ms, 100.0);
  EXPECT_LT(ms, 2000.0);
  // Layer 1: replicas on shards 0 and 1: what shard 1 never answers is re-sent to shard 0.
  r = Ask(Work(1, {{2, 5}, {3, 6}}));
  EXPECT_TRUE(r.failed_rows.empty()) << r.message;
  for (const PlacedPartial& p : r.parts) EXPECT_EQ(p.shard, 0);
  EXPECT_GE(Stats().rerouted_parts, 1);
}

TEST_F(RouterTest, SkipsNoExpertPaddingAndSendsNothingForAllPaddingRows) {
  Start({false, false, false}, std::chrono::seconds(10));
  constexpr int32_t kNo = models::kNoExpert;
  // Row 0 keeps one expert (3, shard 0), row 1 none, row 2 two (2 on shard 2,
  // 7 on shard 1), row 3 none: padding selects nothing and costs nothing.
  const MoeResult r = Ask(Work(0, {{3, kNo}, {kNo, kNo}, {2, 7}, {kNo, kNo}}));
  EXPECT_EQ(r.code, 0) << r.message;
  EXPECT_TRUE(r.failed_rows.empty());
  ASSERT_EQ(r.parts.size(), 3u);
  const std::vector<std::vector<int32_t>> rows = {{0}, {2}, {2}};
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(r.parts[s].shard, s);
    EXPECT_EQ(r.parts[s].rows, rows[s]) << "shard " << s;
    const auto works = journal_->Of(s);
    ASSERT_EQ(works.size(), 1u);
    int masked = 0;
    for (int e = 0; e < kNExpert; ++e) masked += works[0].expert_mask[e] != 0;
    EXPECT_EQ(masked, 1) << "shard " << s;
  }
  RouterStats stats = Stats();
  EXPECT_EQ(stats.entries_sent, (std::vector<int64_t>{1, 1, 1}));
  // A batch of padding only: answered at once, no shard asked, no row failed.
  const MoeResult empty = Ask(Work(0, {{kNo, kNo}, {kNo, kNo}}));
  EXPECT_EQ(empty.code, 0) << empty.message;
  EXPECT_TRUE(empty.parts.empty());
  EXPECT_TRUE(empty.failed_rows.empty());
  stats = Stats();
  EXPECT_EQ(stats.parts_sent, (std::vector<int64_t>{1, 1, 1}));
  EXPECT_EQ(stats.requests, 2);
  // Any other negative id is still refused.
  caf::scoped_actor self{*system_};
  bool refused = false;
  self->request(router_, std::chrono::seconds(10), moe_atom::value, Work(0, {{-2, 1}}))
      .receive([&](MoeResult&) {}, [&](caf::error&) { refused = true; });
  EXPECT_TRUE(refused);
}

TEST_F(RouterTest, PaddedRowsMoveToAReplicaWhenTheirShardIsLate) {
  Start({false, true, false}, std::chrono::milliseconds(100));
  constexpr int32_t kNo = models::kNoExpert;
  // Layer 1: every expert on shards 0 and 1. The row of (2, pad) goes to
  // shard 0 (ties), then (5, pad) to shard 1 (load), which never answers:
  // its part is re-sent to shard 0, padding and all.
  const MoeResult r = Ask(Work(1, {{2, kNo}, {5, kNo}, {kNo, kNo}}));
  EXPECT_TRUE(r.failed_rows.empty()) << r.message;
  std::vector<int32_t> rows;
  for (const PlacedPartial& p : r.parts) {
    EXPECT_EQ(p.shard, 0);
    rows.insert(rows.end(), p.rows.begin(), p.rows.end());
  }
  std::sort(rows.begin(), rows.end());
  EXPECT_EQ(rows, (std::vector<int32_t>{0, 1}));
  EXPECT_GE(Stats().rerouted_parts, 1);
}

// MoeClient (actors/moe_client.h), against the real router: answers arrive
// out of order and are matched to their requests by the tag the router
// copies; with the poll before blocking (spin_us) as without.
TEST_F(RouterTest, MoeClientMatchesOutOfOrderAnswersToTheirRequests) {
  Start({false, true, false}, std::chrono::milliseconds(150));
  for (int spin_us : {0, 2000}) {
    MoeClient client(*system_, router_, {std::chrono::seconds(10), spin_us});
    // Layer 0: expert e on shard e % 3; shard 1 never answers.
    absl::StatusOr<uint64_t> late = client.Send(Work(0, {{1, 4}, {0, 3}}));  // rows 0 -> shard 1
    absl::StatusOr<uint64_t> fast = client.Send(Work(0, {{0, 3}, {2, 5}, {3, 6}}));
    ASSERT_TRUE(late.ok() && fast.ok());
    EXPECT_NE(*late, *fast);
    // The slow one first: the fast answer arrives meanwhile and is kept.
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<MoeResult> a = client.Wait(*late);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(100));
    EXPECT_EQ(a->tag, *late);
    EXPECT_EQ(a->failed_rows, (std::vector<int32_t>{0}));
    EXPECT_EQ(a->code, static_cast<int32_t>(absl::StatusCode::kDeadlineExceeded)) << a->message;
    absl::StatusOr<MoeResult> b = client.Wait(*fast);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(b->tag, *fast);
    EXPECT_TRUE(b->failed_rows.empty()) << b->message;
    ASSERT_EQ(b->parts.size(), 2u);
    EXPECT_EQ(b->parts[0].shard, 0);
    EXPECT_EQ(b->parts[0].rows, (std::vector<int32_t>{0, 2}));
    EXPECT_EQ(b->parts[0].partial->row(1)[0], 2.0f);  // 1000 * shard 0 + row 2
    EXPECT_EQ(b->parts[1].shard, 2);
    EXPECT_EQ(b->parts[1].rows, (std::vector<int32_t>{1}));
    EXPECT_EQ(b->parts[1].partial->row(0)[0], 2001.0f);
  }
}

TEST_F(RouterTest, MoeClientFailsWaitsAndSendsOnceTheRouterIsDown) {
  Start({true, true, true}, std::chrono::seconds(10));
  MoeClient client(*system_, router_, {std::chrono::seconds(10), 0});
  absl::StatusOr<uint64_t> ticket = client.Send(Work(0, {{0, 1}}));
  ASSERT_TRUE(ticket.ok());
  caf::anon_send_exit(router_, caf::exit_reason::kill);
  absl::StatusOr<MoeResult> r = client.Wait(*ticket);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_TRUE(absl::StartsWith(r.status().message(), "the router is down (")) << r.status();
  EXPECT_FALSE(client.router_down().empty());
  EXPECT_EQ(client.Send(Work(0, {{0, 1}})).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(RouterTest, MoeClientGivesUpAfterItsDeadline) {
  Start({true, true, true}, std::chrono::seconds(10));
  MoeClient client(*system_, router_, {std::chrono::milliseconds(100), 0});
  absl::StatusOr<uint64_t> ticket = client.Send(Work(0, {{0, 1}}));
  ASSERT_TRUE(ticket.ok());
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<MoeResult> r = client.Wait(*ticket);
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_GE(waited, std::chrono::milliseconds(90));
  EXPECT_LT(waited, std::chrono::seconds(5));
}

TEST_F(RouterTest, MoeClientWithoutARouterRefusesToSend) {
  MoeClient client(*system_, router_actor(), {});
  absl::StatusOr<uint64_t> ticket = client.Send(Work(3, {{0, 1}}));
  EXPECT_EQ(ticket.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(ticket.status().message().find("layer 3"), std::string::npos) << ticket.status();
}

}  // namespace
}  // namespace ktx::actors
