#include "actors/moe_client.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "actors/status_bridge.h"
#include "caf/actor_cast.hpp"
#include "caf/actor_system.hpp"
#include "caf/after.hpp"
#include "caf/error.hpp"
#include "caf/system_messages.hpp"
#include "runtime/base/status.h"

namespace ktx::actors {

using Clock = std::chrono::steady_clock;

MoeClient::MoeClient(caf::actor_system& system, const router_actor& router, Options options)
    : router_(router), options_(options) {
  if (router_) {
    self_.emplace(system, /*hide=*/true);
    (*self_)->monitor(router_);
  }
}

MoeClient::~MoeClient() = default;

absl::Status MoeClient::RouterDownStatus() const {
  return absl::UnavailableError(absl::StrCat("the router is down (", router_down_, ")"));
}

absl::StatusOr<uint64_t> MoeClient::Send(MoeWork work) {
  if (!self_) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", work.il, " is a MoE layer but the engine has no router"));
  }
  if (!router_down_.empty()) return RouterDownStatus();
  if (options_.lane) {
    const uint64_t tag = next_tag_;
    work.tag = tag;
    if (std::shared_ptr<LocalLane::Call> call = options_.lane->Start(&work)) {
      next_tag_++;
      lane_calls_.emplace(tag, std::move(call));
      return tag;
    }
  }
  return SendToRouter(std::move(work));
}

absl::StatusOr<uint64_t> MoeClient::SendToRouter(MoeWork work) {
  if (!self_) return absl::FailedPreconditionError("no router");
  if (!router_down_.empty()) return RouterDownStatus();
  const uint64_t tag = next_tag_++;
  work.tag = tag;
  pending_.insert(tag);
  // An async send: the router's answer comes back as an ordinary message
  // (no CAF request timeout, which would wake CAF's clock thread each time).
  (*self_)->send(caf::actor_cast<caf::actor>(router_), moe_atom::value, std::move(work));
  return tag;
}

void MoeClient::Receive(Clock::duration timeout, bool* timed_out) {
  caf::scoped_actor& self = *self_;
  self->receive(
      [&](MoeResult& result) {
        const uint64_t tag = result.tag;
        if (pending_.erase(tag) > 0) arrived_.emplace(tag, std::move(result));
      },
      [&](caf::down_msg& msg) {
        if (msg.source != caf::actor_cast<caf::actor_addr>(router_)) return;
        router_down_ = caf::to_string(msg.reason);
        if (router_down_.empty()) router_down_ = "down";
        for (uint64_t tag : pending_) arrived_.emplace(tag, RouterDownStatus());
        pending_.clear();
      },
      [&](caf::error& error) {
        const absl::Status status = FromCafError(error);
        for (uint64_t tag : pending_) arrived_.emplace(tag, status);
        pending_.clear();
      },
      caf::after(std::chrono::duration_cast<std::chrono::microseconds>(timeout)) >>
          [&] { *timed_out = true; });
}

absl::StatusOr<MoeResult> MoeClient::Wait(uint64_t ticket) {
  const Clock::time_point start = Clock::now();
  if (auto lane_it = lane_calls_.find(ticket); lane_it != lane_calls_.end()) {
    std::shared_ptr<LocalLane::Call> call = std::move(lane_it->second);
    lane_calls_.erase(lane_it);
    const bool spin =
        options_.spin_us > 0 && last_wait_us_ < 2 * static_cast<int64_t>(options_.spin_us);
    LocalLane::Outcome outcome = options_.lane->Finish(*call, spin ? options_.spin_us : 0);
    call.reset();
    last_wait_us_ =
        std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count();
    if (!outcome.reroute) return std::move(outcome.result);
    // Parts that failed in the lane and have replicas: the router re-splits them.
    KTX_ASSIGN_OR_RETURN(const uint64_t routed_ticket, SendToRouter(std::move(*outcome.reroute)));
    KTX_ASSIGN_OR_RETURN(MoeResult routed, Wait(routed_ticket));
    return MergeMoeResults(std::move(outcome.result), std::move(routed));
  }
  const Clock::time_point until = start + options_.deadline;
  bool waited = false;
  for (;;) {
    auto it = arrived_.find(ticket);
    if (it != arrived_.end()) {
      absl::StatusOr<MoeResult> result = std::move(it->second);
      arrived_.erase(it);
      last_wait_us_ =
          waited
              ? std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count()
              : 0;
      return result;
    }
    if (!self_) return absl::FailedPreconditionError("no router");
    if (pending_.count(ticket) == 0) {
      return absl::InternalError(absl::StrCat("MoE request ", ticket, " was never sent"));
    }
    waited = true;
    // Brief polling while answers come back fast (see the header): the reply
    // then needs no futex wake-up of this thread.
    if (options_.spin_us > 0 && last_wait_us_ < 2 * static_cast<int64_t>(options_.spin_us)) {
      const Clock::time_point spin_until =
          std::min(until, Clock::now() + std::chrono::microseconds(options_.spin_us));
      while ((*self_)->mailbox().empty() && Clock::now() < spin_until) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
    }
    const Clock::time_point now = Clock::now();
    bool timed_out = now >= until;
    if (!timed_out) Receive(until - now, &timed_out);
    if (timed_out && arrived_.count(ticket) == 0) {
      pending_.erase(ticket);
      last_wait_us_ =
          std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count();
      return absl::DeadlineExceededError(
          absl::StrCat("the router did not answer within ", options_.deadline.count(), " ms"));
    }
  }
}

}  // namespace ktx::actors
