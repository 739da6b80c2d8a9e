// File: actors/scheduler_actor.h
//
// The scheduler actor: accepts generation requests and runs continuous
// batching over the attention actor.
//
//  - Every step decodes one token for every running sequence and prefills a
//    chunk of at most `prefill_chunk` tokens of ONE admitted prompt, so a long
//    prompt delays running decodes by at most one chunk per step.
//  - Admission is FIFO by KV-cache capacity: a request needs prompt +
//    max_tokens tokens of KV; the head of the queue waits until that fits
//    (the scheduler mirrors the attention actor's byte budget exactly), and
//    nothing behind it overtakes it. At most `max_running` requests are
//    admitted at once.
//  - Admitted prompts take turns (round-robin) for the prefill chunk.
//  - Sampling is per request (its own Sampler: params, seed, penalty window).
//  - Every sampled token is streamed to the request's sink as
//    (token_atom, TokenEvent) with the text that became safe to show
//    (streaming detokenizer + stop-string hold-back, when a tokenizer is
//    known); the end is (done_atom, GenerateOutcome). Text held back at the
//    end comes as a TokenEvent with token -1 before the outcome.
//  - Cancellation (cancel_atom) and deadlines end a request with CANCELLED /
//    DEADLINE_EXCEEDED and free its KV cache at once (or right after the step
//    that is using it).
//  - One step is in flight at a time; each is a request to the attention
//    actor with `step_deadline`; a failed step fails its requests, never
//    hangs them. A slice that fails alone (e.g. its tokens needed a dead
//    shard) fails only its request.
//  - A log of the last `step_log_capacity` steps (who decoded, whose prefill
//    chunk ran, timings) answers step_log_atom.
//
// The actor is spawned detached (a thread of its own): sampling over a large
// vocabulary is kernel-like work that must not occupy a CAF scheduler thread.
// Ownership: owns the requests' samplers, detokenizers, stop matchers and
// their generated tokens and logits; holds the sinks' handles.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

#include "actors/attention_actor.h"
#include "actors/messages.h"
#include "caf/fwd.hpp"
#include "caf/replies_to.hpp"
#include "caf/typed_actor.hpp"
#include "runtime/tokenizer/tokenizer.h"

namespace ktx::actors {

// Whoever asked for a generation.
using token_sink_actor = caf::typed_actor<caf::reacts_to<token_atom, TokenEvent>,
                                          caf::reacts_to<done_atom, GenerateOutcome>>;

using scheduler_actor =
    caf::typed_actor<caf::reacts_to<generate_atom, GenerateJob, token_sink_actor>,
                     caf::reacts_to<cancel_atom, uint64_t>,
                     caf::replies_to<step_log_atom>::with<std::vector<StepLogEntry>>,
                     caf::reacts_to<tick_atom, uint64_t>>;

struct SchedulerConfig {
  attention_actor attention;
  int64_t n_vocab = 0;
  int64_t n_ctx = 0;             // most tokens (prompt + generated) per sequence
  int64_t kv_budget_tokens = 0;  // the attention actor's budget in tokens
  int64_t prefill_chunk = 128;   // > 0
  int max_running = 64;          // > 0
  std::chrono::milliseconds step_deadline{120000};
  std::optional<tokenizer::Tokenizer> tokenizer;  // text, EOS/EOT and stop strings
  size_t step_log_capacity = 4096;
};

scheduler_actor SpawnScheduler(caf::actor_system& system, SchedulerConfig config);

}  // namespace ktx::actors
