// File: runtime/sampler/sampler.h
//
// Token sampling from one row of logits: repetition / presence / frequency
// penalties over a window of recent tokens, then top-k, temperature softmax,
// top-p (nucleus), min-p, and a draw from the remaining distribution with a
// seeded RNG. The order is fixed (llama.cpp-like) and documented on Sample():
//
//   SamplingParams params;
//   params.temperature = 0.7f;
//   params.top_p = 0.9f;
//   params.seed = 42;
//   KTX_ASSIGN_OR_RETURN(Sampler sampler, Sampler::Create(params));
//   sampler.AcceptPrompt(prompt_tokens);          // prompt counts for penalties
//   int32_t token = sampler.Sample(logits, n_vocab);  // F32 [n_vocab]
//
// A Sampler belongs to ONE sequence: it owns that sequence's RNG state and its
// window of recent tokens. Given the same params (seed included), the same
// accepted tokens and the same logits, the same tokens come out, on any
// machine (the RNG is std::mt19937_64, whose output the C++ standard fixes,
// and uniform numbers are made from its bits by ktx, not by <random>'s
// distributions, whose results vary between standard libraries).
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ktx::sampler {

// What a client asks for. Defaults sample from the full softmax at T = 1 with
// no penalties. Validate() names the first bad field and its allowed range.
struct SamplingParams {
  // Softmax temperature, [0, 100]. 0 = greedy (argmax of the penalized logits;
  // top-k/top-p/min-p and the RNG are not used).
  float temperature = 1.0f;
  // Keep the k most likely tokens, >= 0; 0 = off (also off when >= n_vocab).
  int32_t top_k = 0;
  // Nucleus: keep the smallest set of most likely tokens whose probability
  // sums to >= top_p, (0, 1]; 1 = off.
  float top_p = 1.0f;
  // Drop tokens whose probability is < min_p * (probability of the most likely
  // token), [0, 1]; 0 = off.
  float min_p = 0.0f;
  // Multiplicative penalty for tokens in the window, (0, 10]; 1 = off. A
  // positive logit is divided by it, a negative one multiplied (llama.cpp's
  // and CTRL's convention), once per distinct token.
  float repetition_penalty = 1.0f;
  // Subtracted once from the logit of every token present in the window,
  // [-2, 2] (OpenAI's range); 0 = off.
  float presence_penalty = 0.0f;
  // Subtracted count times from the logit of a token seen count times in the
  // window, [-2, 2]; 0 = off.
  float frequency_penalty = 0.0f;
  // The penalty window: the last N accepted tokens, [0, 1048576]; 0 = no
  // penalties at all.
  int32_t penalty_last_n = 64;
  // RNG seed; the same seed gives the same draws.
  uint64_t seed = 0;

  bool greedy() const { return temperature == 0.0f; }

  // OK, or InvalidArgument naming the field, the value and the allowed range
  // (e.g. "top_p = 1.5 is outside (0, 1]"). NaN is rejected everywhere.
  absl::Status Validate() const;
};

// Samples tokens for one sequence. Owns: its params, its RNG, a ring buffer of
// the last `penalty_last_n` accepted tokens, and a scratch candidate buffer
// (grown to the largest n_vocab seen, then reused: no allocation per call
// after the first). Not thread-safe: one Sampler per sequence, used by one
// thread at a time. Movable, not copyable.
class Sampler {
 public:
  // Fails with Validate()'s message when `params` is invalid.
  static absl::StatusOr<Sampler> Create(const SamplingParams& params);

  Sampler(Sampler&&) = default;
  Sampler& operator=(Sampler&&) = default;
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  const SamplingParams& params() const { return params_; }

  // Draws one token id in [0, n_vocab) from `logits` (F32 [n_vocab], not
  // modified) and accepts it into the penalty window. Steps, in this order:
  //   1. penalties, on a copy of the logits, for the tokens of the window
  //      (ids outside [0, n_vocab) are ignored): repetition_penalty, then
  //      frequency_penalty * count + presence_penalty;
  //   2. greedy (temperature == 0) or top_k == 1: return the argmax (lowest id
  //      among equal maxima);
  //   3. top-k: keep the top_k largest logits (ties broken by lower id);
  //   4. temperature softmax over the kept tokens: p_i ∝ exp((l_i - max) / T);
  //   5. top-p: keep the most likely prefix whose cumulative p reaches top_p
  //      (at least one token);
  //   6. min-p: keep tokens with p_i >= min_p * max_j p_j;
  //   7. draw u ~ U[0, Σ kept p) and walk the kept tokens (sorted by
  //      probability when a sort was needed, else in id order).
  // NaN logits count as -inf. KTX_CHECKs n_vocab >= 1 and n_vocab < 2^31.
  int32_t Sample(const float* logits, int64_t n_vocab);

  // Records tokens that were not drawn by Sample (the prompt, forced tokens)
  // into the penalty window.
  void Accept(int32_t token);
  void AcceptPrompt(std::span<const int32_t> tokens);

  // Forgets the window and reseeds the RNG with params().seed.
  void Reset();

  // The penalty window, oldest first (copies; for tests and debugging).
  std::vector<int32_t> RecentTokens() const;

 private:
  explicit Sampler(const SamplingParams& params);

  struct Candidate {
    int32_t id;
    float logit;
    float p;
  };

  void ApplyPenalties(int64_t n_vocab);
  // Uniform double in [0, 1) from the top 53 bits of one RNG output.
  double NextUniform();

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<int32_t> recent_;         // ring buffer, capacity penalty_last_n
  size_t recent_head_ = 0;              // next slot to write
  size_t recent_count_ = 0;             // valid entries (<= capacity)
  std::vector<int32_t> window_sorted_;  // scratch for counting, capacity penalty_last_n
  std::vector<Candidate> candidates_;   // scratch, size = largest n_vocab seen
};

}  // namespace ktx::sampler
