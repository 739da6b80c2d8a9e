// Continuous batching in the scheduler actor: concurrent requests give the
// tokens each gives alone, cancellation frees the KV cache, a long prompt
// delays running decodes by at most one chunk per step (checked in the step
// log), admission is FIFO by KV capacity, and bad requests fail with errors
// that name what is wrong.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "actors/engine.h"
#include "gtest/gtest.h"
#include "tests/actors/actors_test_util.h"

namespace ktx::actors {
namespace {

using testing::FixtureModel;

// The fixture prompt followed by its greedy continuation: 97 valid ids.
std::vector<int32_t> BaseTokens() {
  std::vector<int32_t> tokens = testing::PromptTokens();
  const auto gen =
      testing::Manifest()["files"]["q8_0"]["ref64_greedy_tokens"].get<std::vector<int32_t>>();
  tokens.insert(tokens.end(), gen.begin(), gen.end());
  return tokens;
}

std::unique_ptr<Engine> MakeEngine(EngineOptions options) {
  if (options.shards.empty()) options.shards = EvenShards(2);
  // The reference experts: every sequence's result is independent of what it
  // is batched with (the fast kernels' amx_int8 prefill form is chosen by
  // tokens per expert in a call, so on AMX machines batching changes rounding).
  options.experts = ExpertsBackend::kReference;
  auto engine = Engine::Create(FixtureModel("q8_0"), std::move(options));
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

// Collects GenerateAsync outcomes.
class Outcomes {
 public:
  DoneCallback Callback(size_t index) {
    return [this, index](absl::StatusOr<GenerateResult> result) {
      std::lock_guard<std::mutex> lock(mu_);
      results_[index] = std::move(result);
      ++done_;
      cv_.notify_all();
    };
  }
  explicit Outcomes(size_t n) : results_(n, absl::UnknownError("not done")) {}
  bool WaitAll(std::chrono::seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [this] { return done_ == results_.size(); });
  }
  const absl::StatusOr<GenerateResult>& operator[](size_t i) const { return results_[i]; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<absl::StatusOr<GenerateResult>> results_;
  size_t done_ = 0;
};

std::vector<GenerateRequest> SixteenRequests() {
  const std::vector<int32_t> base = BaseTokens();
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < 16; ++i) {
    GenerateRequest r;
    const int start = (i * 5) % 40;
    const int len = 1 + (i * 11) % 45;
    r.prompt.assign(base.begin() + start, base.begin() + start + len);
    r.max_tokens = 3 + (i * 5) % 13;
    if (i % 4 == 3) {
      r.sampling.temperature = 0.8f;
      r.sampling.top_p = 0.9f;
      r.sampling.seed = 1000 + i;
    } else {
      r.sampling.temperature = 0.0f;
    }
    requests.push_back(std::move(r));
  }
  return requests;
}

TEST(EngineBatchingTest, ConcurrentRequestsGiveTheTokensOfEachAlone) {
  EngineOptions options;
  options.prefill_chunk = 8;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  const std::vector<GenerateRequest> requests = SixteenRequests();
  std::vector<std::vector<int32_t>> alone;
  for (const GenerateRequest& r : requests) {
    auto result = engine->Generate(r);
    ASSERT_TRUE(result.ok()) << result.status();
    alone.push_back(result->tokens);
  }
  auto before = engine->StepLog();
  ASSERT_TRUE(before.ok());
  const uint64_t first_concurrent_step = before->empty() ? 0 : before->back().step + 1;

  Outcomes outcomes(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    engine->GenerateAsync(requests[i], {}, outcomes.Callback(i));
  }
  ASSERT_TRUE(outcomes.WaitAll(std::chrono::seconds(120)));
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(outcomes[i].ok()) << "request " << i << ": " << outcomes[i].status();
    EXPECT_EQ(outcomes[i]->tokens, alone[i]) << "request " << i;
  }
  // They really ran together: some step decoded several sequences at once,
  // and no prefill chunk exceeded the limit.
  auto log = engine->StepLog();
  ASSERT_TRUE(log.ok());
  size_t widest = 0;
  for (const StepRecord& step : *log) {
    if (step.step < first_concurrent_step) continue;
    widest = std::max(widest, step.decode_ids.size());
    EXPECT_LE(step.prefill_tokens, 8);
  }
  EXPECT_GE(widest, 4u);
  auto kv = engine->KvStats();
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ(kv->n_sequences, 0);
  EXPECT_EQ(kv->used_bytes, 0u);
}

TEST(EngineBatchingTest, CancelFreesTheKvCache) {
  EngineOptions options;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  const std::vector<int32_t> base = BaseTokens();
  GenerateRequest request;
  request.prompt.assign(base.begin(), base.begin() + 10);
  request.sampling.temperature = 0.0f;
  request.max_tokens = 60;
  request.stop_at_eos = false;
  const uint64_t bytes_per_token = engine->model().kv_layout().bytes_per_token();

  // 1. Cancelled by the token callback (returns false at the third token).
  int seen = 0;
  uint64_t used_while_running = 0;
  auto result = engine->Generate(request, [&](int32_t, std::string_view) {
    if (++seen == 2) {
      auto kv = engine->KvStats();
      if (kv.ok()) used_while_running = kv->used_bytes;
    }
    return seen < 3;
  });
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled) << result.status();
  EXPECT_EQ(used_while_running, 70 * bytes_per_token);  // prompt 10 + max_tokens 60
  auto kv = engine->KvStats();
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ(kv->n_sequences, 0);
  EXPECT_EQ(kv->used_bytes, 0u);

  // 2. Cancelled from another thread with Engine::Cancel.
  std::promise<void> first_token;
  std::atomic<bool> signalled{false};
  std::promise<absl::StatusOr<GenerateResult>> done;
  const uint64_t id = engine->GenerateAsync(
      request,
      [&](int32_t, std::string_view) {
        if (!signalled.exchange(true)) first_token.set_value();
        return true;
      },
      [&](absl::StatusOr<GenerateResult> r) { done.set_value(std::move(r)); });
  ASSERT_EQ(first_token.get_future().wait_for(std::chrono::seconds(30)), std::future_status::ready);
  engine->Cancel(id);
  auto future = done.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  auto cancelled = future.get();
  ASSERT_FALSE(cancelled.ok());
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled);
  kv = engine->KvStats();
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ(kv->n_sequences, 0);
  EXPECT_EQ(kv->used_bytes, 0u);
}

TEST(EngineBatchingTest, LongPromptDelaysRunningDecodesByOneChunkAtMost) {
  constexpr int kChunk = 8;
  EngineOptions options;
  options.prefill_chunk = kChunk;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  const std::vector<int32_t> base = BaseTokens();

  GenerateRequest a;
  a.prompt.assign(base.begin(), base.begin() + 4);
  a.sampling.temperature = 0.0f;
  a.max_tokens = 40;
  a.stop_at_eos = false;
  GenerateRequest b;
  b.prompt.assign(base.begin() + 1, base.begin() + 91);  // 90 tokens: 12 chunks
  b.sampling.temperature = 0.0f;
  b.max_tokens = 2;
  b.stop_at_eos = false;

  Outcomes outcomes(2);
  std::promise<void> a_running;
  std::atomic<int> a_tokens{0};
  engine->GenerateAsync(
      a,
      [&](int32_t, std::string_view) {
        if (++a_tokens == 2) a_running.set_value();
        return true;
      },
      outcomes.Callback(0));
  ASSERT_EQ(a_running.get_future().wait_for(std::chrono::seconds(30)), std::future_status::ready);
  engine->GenerateAsync(b, {}, outcomes.Callback(1));
  ASSERT_TRUE(outcomes.WaitAll(std::chrono::seconds(60)));
  ASSERT_TRUE(outcomes[0].ok()) << outcomes[0].status();
  ASSERT_TRUE(outcomes[1].ok()) << outcomes[1].status();
  const uint64_t a_id = outcomes[0]->id;
  const uint64_t b_id = outcomes[1]->id;
  EXPECT_EQ(outcomes[0]->tokens.size(), 40u);

  auto log = engine->StepLog();
  ASSERT_TRUE(log.ok());
  uint64_t a_first = 0, a_last = 0;
  for (const StepRecord& step : *log) {
    if (std::count(step.decode_ids.begin(), step.decode_ids.end(), a_id)) {
      if (a_first == 0) a_first = step.step;
      a_last = step.step;
    }
  }
  int b_chunks = 0;
  for (const StepRecord& step : *log) {
    if (step.prefill_id == b_id) {
      ++b_chunks;
      EXPECT_LE(step.prefill_tokens, kChunk);
      if (step.step > a_first && step.step < a_last) {
        EXPECT_EQ(std::count(step.decode_ids.begin(), step.decode_ids.end(), a_id), 1)
            << "step " << step.step << " prefilled the long prompt without decoding A";
      }
    }
    // A decodes in every step between its first and last decode: a chunk of
    // the long prompt rides along, it never stalls A.
    if (step.step >= a_first && step.step <= a_last) {
      EXPECT_EQ(std::count(step.decode_ids.begin(), step.decode_ids.end(), a_id), 1)
          << "A skipped step " << step.step;
    }
  }
  EXPECT_EQ(b_chunks, 12);
}

TEST(EngineBatchingTest, AdmissionIsFifoByKvCapacity) {
  EngineOptions options;
  options.prefill_chunk = 16;
  auto model = FixtureModel("q8_0");
  const uint64_t bytes_per_token = model->kv_layout().bytes_per_token();
  options.kv_budget_bytes = 100 * bytes_per_token;  // two requests of 40 tokens fit, not three
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  const std::vector<int32_t> base = BaseTokens();
  std::vector<GenerateRequest> requests;
  std::vector<std::vector<int32_t>> alone;
  for (int i = 0; i < 4; ++i) {
    GenerateRequest r;
    r.prompt.assign(base.begin() + 3 * i, base.begin() + 3 * i + 10);
    r.sampling.temperature = 0.0f;
    r.max_tokens = 30;
    r.stop_at_eos = false;
    auto result = engine->Generate(r);
    ASSERT_TRUE(result.ok()) << result.status();
    alone.push_back(result->tokens);
    requests.push_back(std::move(r));
  }
  Outcomes outcomes(requests.size());
  std::vector<uint64_t> ids;
  for (size_t i = 0; i < requests.size(); ++i) {
    ids.push_back(engine->GenerateAsync(requests[i], {}, outcomes.Callback(i)));
  }
  ASSERT_TRUE(outcomes.WaitAll(std::chrono::seconds(60)));
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(outcomes[i].ok()) << outcomes[i].status();
    EXPECT_EQ(outcomes[i]->tokens, alone[i]);
  }
  auto log = engine->StepLog();
  ASSERT_TRUE(log.ok());
  std::vector<uint64_t> first_prefill;
  for (const StepRecord& step : *log) {
    std::set<uint64_t> running(step.decode_ids.begin(), step.decode_ids.end());
    if (step.prefill_id != 0) running.insert(step.prefill_id);
    EXPECT_LE(running.size(), 2u) << "step " << step.step << " exceeds the KV budget";
    if (step.prefill_id != 0 && std::find(ids.begin(), ids.end(), step.prefill_id) != ids.end() &&
        std::find(first_prefill.begin(), first_prefill.end(), step.prefill_id) ==
            first_prefill.end()) {
      first_prefill.push_back(step.prefill_id);
    }
  }
  EXPECT_EQ(first_prefill, ids);  // admitted in arrival order

  // A request that can never fit fails at once.
  GenerateRequest huge;
  huge.prompt.assign(base.begin(), base.begin() + 50);
  huge.max_tokens = 60;
  auto result = engine->Generate(huge);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(result.status().message().find("KV"), std::string::npos) << result.status();
}

TEST(EngineBatchingTest, StopStringEndsTheTextBeforeIt) {
  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  ASSERT_TRUE(engine->has_tokenizer());
  GenerateRequest request;
  request.prompt = testing::PromptTokens();
  request.sampling.temperature = 0.0f;
  request.max_tokens = 24;
  request.stop_at_eos = false;
  auto full = engine->Generate(request);
  ASSERT_TRUE(full.ok()) << full.status();
  const std::string& text = full->text;
  if (text.size() < 8) GTEST_SKIP() << "greedy text too short: " << text.size() << " bytes";
  const std::string stop = text.substr(text.size() / 2, 3);
  const size_t at = text.find(stop);
  request.stop_strings = {stop};
  std::string streamed;
  auto stopped = engine->Generate(request, [&](int32_t, std::string_view piece) {
    streamed += piece;
    return true;
  });
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  EXPECT_EQ(stopped->finish_reason, FinishReason::kStopString);
  EXPECT_EQ(stopped->text, text.substr(0, at));
  EXPECT_EQ(streamed, stopped->text);
}

TEST(EngineBatchingTest, InvalidRequestsNameTheProblem) {
  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  GenerateRequest empty;
  auto r = engine->Generate(empty);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("empty prompt"), std::string::npos);

  GenerateRequest bad_token;
  bad_token.prompt = {1, 2, 100000};
  r = engine->Generate(bad_token);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("100000"), std::string::npos) << r.status();

  GenerateRequest bad_sampling;
  bad_sampling.prompt = {1, 2, 3};
  bad_sampling.sampling.top_p = 1.5f;
  r = engine->Generate(bad_sampling);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("top_p"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace ktx::actors
