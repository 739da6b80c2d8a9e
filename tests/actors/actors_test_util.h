// File: tests/actors/actors_test_util.h
//
// Shared by the actor-runtime tests: the tiny DeepSeek-V3 fixtures of
// tests/data (model files, prompt, ref64 logits), the reference model's own
// answers (Forward with one KV sequence, free-running greedy), logits
// comparisons, and a gate that holds expert computes (fault tests). Nothing
// here uses CAF: the tests talk to the Engine facade.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/deepseek2.h"
#include "runtime/models/moe.h"

namespace ktx::actors::testing {

// Holds every thread that calls Pass() while it is closed, and counts them,
// so that "mid-request" is deterministic in fault tests.
class Gate {
 public:
  explicit Gate(bool open = false) : open_(open) {}
  void Pass() {
    std::unique_lock<std::mutex> lock(mu_);
    ++entered_;
    cv_.notify_all();
    cv_.wait(lock, [this] { return open_; });
  }
  // Until at least n threads reached Pass() (false after `timeout`).
  bool WaitEntered(int n, std::chrono::seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return entered_ >= n; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int entered_ = 0;
  bool open_;
};

// Opens the gate when the test scope ends, before an engine declared earlier
// joins a shard arena thread held at it.
struct OpenOnExit {
  std::shared_ptr<Gate> gate;
  ~OpenOnExit() { gate->Open(); }
};

// Passes `gate` on every Compute, then computes with `inner`.
class GatedBackend final : public models::ExpertBackend {
 public:
  GatedBackend(std::shared_ptr<models::ExpertBackend> inner, std::shared_ptr<Gate> gate)
      : inner_(std::move(inner)), gate_(std::move(gate)) {}
  absl::Status Compute(int il, const models::Activations& h, const models::Routing& routing,
                       std::span<const uint8_t> mask, models::Activations* out) override {
    gate_->Pass();
    return inner_->Compute(il, h, routing, mask, out);
  }

 private:
  std::shared_ptr<models::ExpertBackend> inner_;
  std::shared_ptr<Gate> gate_;
};

inline const std::string& DataDir() {
  static const std::string dir = [] {
    const std::string source = std::string(KTX_SOURCE_DIR) + "/tests/data/";
    if (std::ifstream(source + "manifest.json").good()) return source;
    return std::string("tests/data/");  // run from the repository root elsewhere (GPU machine)
  }();
  return dir;
}

inline const nlohmann::json& Manifest() {
  static const nlohmann::json manifest = [] {
    std::ifstream in(DataDir() + "manifest.json");
    return nlohmann::json::parse(in);
  }();
  return manifest;
}

inline std::vector<int32_t> PromptTokens() {
  return Manifest()["prompt_tokens"].get<std::vector<int32_t>>();
}

inline std::vector<float> LoadF32(const std::string& name) {
  std::ifstream in(DataDir() + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

// The model of fixture `type` ("bf16", "q8_0", "q4_k_m"), opened once per process.
inline std::shared_ptr<const models::Deepseek2Model> FixtureModel(const std::string& type) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<const models::Deepseek2Model>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(type);
  if (it != cache.end()) return it->second;
  const std::string file = Manifest()["files"][type]["gguf"].get<std::string>();
  auto model = models::Deepseek2Model::Open(DataDir() + file);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  std::shared_ptr<const models::Deepseek2Model> shared = std::move(*model);
  cache[type] = shared;
  return shared;
}

// The reference model's logits of every position of `tokens` (one batch).
inline std::vector<float> ReferenceLogits(const models::Deepseek2Model& model,
                                          const std::vector<int32_t>& tokens) {
  auto kv = kv_cache::SequenceKv::Create(model.kv_layout(), static_cast<int64_t>(tokens.size()));
  EXPECT_TRUE(kv.ok());
  models::Activations logits;
  const absl::Status status = model.Forward(tokens, kv->get(), models::LogitsRows::kAll, &logits);
  EXPECT_TRUE(status.ok()) << status;
  return logits.ToVector();
}

inline int32_t Argmax(const float* row, int64_t n) {
  return static_cast<int32_t>(std::max_element(row, row + n) - row);
}

// Free-running greedy decoding with the reference model (one sequence,
// prompt as one batch, then one token per Forward): `n` tokens and the
// logits row each was chosen from (F32 [n, n_vocab]).
struct GreedyRun {
  std::vector<int32_t> tokens;
  std::vector<float> logits;
};

inline GreedyRun ReferenceGreedy(const models::Deepseek2Model& model,
                                 const std::vector<int32_t>& prompt, int n) {
  GreedyRun run;
  auto kv =
      kv_cache::SequenceKv::Create(model.kv_layout(), static_cast<int64_t>(prompt.size()) + n + 1);
  EXPECT_TRUE(kv.ok());
  models::Activations logits;
  EXPECT_TRUE(model.Forward(prompt, kv->get(), models::LogitsRows::kLast, &logits).ok());
  const int64_t n_vocab = model.n_vocab();
  for (int i = 0; i < n; ++i) {
    run.logits.insert(run.logits.end(), logits.row(0), logits.row(0) + n_vocab);
    run.tokens.push_back(Argmax(logits.row(0), n_vocab));
    if (i + 1 == n) break;
    const int32_t one[] = {run.tokens.back()};
    EXPECT_TRUE(model.Forward(one, kv->get(), models::LogitsRows::kLast, &logits).ok());
  }
  return run;
}

// Largest |got - want| over a row, relative to that row's largest |want|,
// maximised over rows; and the number of rows whose argmax differs.
struct LogitsDiff {
  double max_rel = 0.0;
  int argmax_mismatches = 0;
  bool bit_equal = true;
};

inline LogitsDiff CompareLogits(const float* got, const float* want, int64_t n_rows,
                                int64_t n_vocab) {
  LogitsDiff d;
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* g = got + r * n_vocab;
    const float* w = want + r * n_vocab;
    double scale = 0.0, diff = 0.0;
    for (int64_t i = 0; i < n_vocab; ++i) {
      scale = std::max(scale, std::fabs(static_cast<double>(w[i])));
      diff = std::max(diff, std::fabs(static_cast<double>(g[i]) - w[i]));
      if (g[i] != w[i]) d.bit_equal = false;
    }
    d.max_rel = std::max(d.max_rel, diff / std::max(scale, 1e-30));
    if (Argmax(g, n_vocab) != Argmax(w, n_vocab)) d.argmax_mismatches++;
  }
  return d;
}

}  // namespace ktx::actors::testing
