// File: actors/messages.h
//
// Every message type of ktx's in-process actor runtime, their CAF `inspect`
// overloads, the atoms that tag them, and the ONE type-ID block that registers
// them (AddActorMessageTypes). The typed interfaces that use them are in
// actors/*_actor.h; docs/architecture.md ("Actors") shows who sends what.
//
// Tensors inside messages are shared immutable buffers (`Tensor`: a
// std::shared_ptr<const models::Activations>), so an in-process message never
// copies activations: the sender builds a buffer, wraps it, and never writes
// it again; every receiver only reads it. `inspect` serialises the values (for
// CAF's to_string and a future remote transport) and makes a fresh buffer when
// loading.
//
// Error codes in messages are absl::StatusCode values (int32, 0 = OK) with a
// message: see ToStatus / FromStatus below and actors/status_bridge.h for the
// conversion to caf::error.
//
// Include cost: this header pulls only CAF's atom, type-ID and meta headers,
// not caf/all.hpp. Keep it out of headers that non-actor code includes
// (actors/engine.h does not include it).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "actors/generation.h"
#include "caf/atom.hpp"
#include "caf/fwd.hpp"
#include "caf/meta/type_name.hpp"
#include "caf/type_id.hpp"
#include "runtime/models/activations.h"
#include "runtime/models/routing_policy.h"
#include "runtime/sampler/sampler.h"

namespace ktx::actors {

// ---- atoms (at most 10 characters) ----
using expert_atom = caf::atom_constant<caf::atom("expert")>;         // router -> shard
using expert_done_atom = caf::atom_constant<caf::atom("expdone")>;   // shard pool -> shard
using moe_atom = caf::atom_constant<caf::atom("moe")>;               // attention -> router
using router_stats_atom = caf::atom_constant<caf::atom("rtstats")>;  // anyone -> router
using step_atom = caf::atom_constant<caf::atom("step")>;             // scheduler -> attention
using stage_atom = caf::atom_constant<caf::atom("stage")>;           // attention pool -> attention
using kv_free_atom = caf::atom_constant<caf::atom("kvfree")>;        // scheduler -> attention
using kv_stats_atom = caf::atom_constant<caf::atom("kvstats")>;      // anyone -> attention
using generate_atom = caf::atom_constant<caf::atom("generate")>;     // client -> scheduler
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;         // client -> scheduler
using step_log_atom = caf::atom_constant<caf::atom("steplog")>;      // client -> scheduler
using tick_atom = caf::atom_constant<caf::atom("tick")>;             // scheduler -> itself
using token_atom = caf::atom_constant<caf::atom("token")>;           // scheduler -> sink
using done_atom = caf::atom_constant<caf::atom("done")>;             // scheduler -> sink

// A shared, immutable F32 activation buffer [n_rows, n_cols]. Null means
// "no tensor" (e.g. no logits requested).
struct Tensor {
  std::shared_ptr<const models::Activations> data;

  Tensor() = default;
  explicit Tensor(std::shared_ptr<const models::Activations> a) : data(std::move(a)) {}
  // Wraps a finished buffer (moved, not copied).
  static Tensor Wrap(models::Activations&& a) {
    return Tensor(std::make_shared<const models::Activations>(std::move(a)));
  }
  bool empty() const { return data == nullptr; }
  int64_t n_rows() const { return data ? data->n_tokens() : 0; }
  int64_t n_cols() const { return data ? data->n_cols() : 0; }
  const models::Activations& operator*() const { return *data; }
  const models::Activations* operator->() const { return data.get(); }
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, Tensor& x) {
  if constexpr (Inspector::reads_state) {
    int64_t rows = x.n_rows(), cols = x.n_cols();
    std::vector<float> values = x.data ? x.data->ToVector() : std::vector<float>{};
    return f(caf::meta::type_name("ktx::actors::Tensor"), rows, cols, values);
  } else {
    int64_t rows = 0, cols = 0;
    std::vector<float> values;
    auto result = f(caf::meta::type_name("ktx::actors::Tensor"), rows, cols, values);
    if (rows > 0 && cols > 0 && static_cast<int64_t>(values.size()) == rows * cols) {
      models::Activations a;
      a.ResizeForOverwrite(rows, cols);
      std::copy(values.begin(), values.end(), a.data());
      x = Tensor::Wrap(std::move(a));
    } else {
      x = Tensor();
    }
    return result;
  }
}

// A request's routing policy (routing_policy.h), shared and immutable like
// Tensor; null: the model's policy. `inspect` carries its text form
// (RoutingPolicy::ToString / Parse).
struct PolicyRef {
  std::shared_ptr<const models::RoutingPolicy> policy;
  const models::RoutingPolicy* get() const { return policy.get(); }
  bool empty() const { return policy == nullptr; }
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, PolicyRef& x) {
  if constexpr (Inspector::reads_state) {
    std::string text = x.policy ? x.policy->ToString() : std::string();
    return f(caf::meta::type_name("ktx::actors::PolicyRef"), text);
  } else {
    std::string text;
    auto result = f(caf::meta::type_name("ktx::actors::PolicyRef"), text);
    x.policy.reset();
    if (!text.empty()) {
      absl::StatusOr<models::RoutingPolicy> parsed = models::RoutingPolicy::Parse(text);
      if (parsed.ok()) x.policy = std::make_shared<const models::RoutingPolicy>(*parsed);
    }
    return result;
  }
}

// ---- router -> expert shard ----

// One shard's part of one MoE layer: the rows of `h` whose tokens selected at
// least one expert this shard computes, their routing, and which experts.
struct ExpertWork {
  int32_t il = 0;                    // layer
  Tensor h;                          // F32 [n_tokens, n_embd], the WHOLE batch (shared)
  std::vector<int32_t> rows;         // ascending row indices into h: the sub-batch
  int32_t n_expert_used = 0;         // K
  std::vector<int32_t> expert_ids;   // I32 [rows.size(), K] routing of those rows
  std::vector<float> weights;        // F32 [rows.size(), K]
  std::vector<uint8_t> expert_mask;  // [n_expert] nonzero: compute this expert here
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ExpertWork& x) {
  return f(caf::meta::type_name("ktx::actors::ExpertWork"), x.il, x.h, x.rows, x.n_expert_used,
           x.expert_ids, x.weights, x.expert_mask);
}

// A shard's answer: per row of the sub-batch the weighted sum of the masked
// experts.
struct ExpertPartial {
  int32_t shard = 0;       // index of the shard that computed it
  Tensor partial;          // F32 [rows.size(), n_embd]
  int64_t compute_us = 0;  // time spent in the backend (for logs and benchmarks)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ExpertPartial& x) {
  return f(caf::meta::type_name("ktx::actors::ExpertPartial"), x.shard, x.partial, x.compute_us);
}

// A pool job's result posted back to its shard actor (internal).
struct ExpertJobDone {
  uint64_t job = 0;
  int32_t code = 0;  // absl::StatusCode
  std::string message;
  ExpertPartial result;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ExpertJobDone& x) {
  return f(caf::meta::type_name("ktx::actors::ExpertJobDone"), x.job, x.code, x.message, x.result);
}

// ---- attention -> router ----

// Routed experts of MoE layer `il` for a batch.
struct MoeWork {
  int32_t il = 0;
  Tensor h;                         // F32 [n_tokens, n_embd] FFN-normed hidden states
  int32_t n_expert_used = 0;        // K
  std::vector<int32_t> expert_ids;  // I32 [n_tokens, K]
  std::vector<float> weights;       // F32 [n_tokens, K]
  // The sender's label for this request; the router copies it into the
  // MoeResult (MoeClient matches answers to requests by it when several are
  // out at once). 0 when unused.
  uint64_t tag = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, MoeWork& x) {
  return f(caf::meta::type_name("ktx::actors::MoeWork"), x.il, x.h, x.n_expert_used, x.expert_ids,
           x.weights, x.tag);
}

// One shard's partial sums, placed: `rows` of the batch.
struct PlacedPartial {
  int32_t shard = 0;
  std::vector<int32_t> rows;  // ascending rows of the batch
  Tensor partial;             // F32 [rows.size(), n_embd]
  int64_t compute_us = 0;     // the shard's ExpertPartial::compute_us (profiles)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, PlacedPartial& x) {
  return f(caf::meta::type_name("ktx::actors::PlacedPartial"), x.shard, x.rows, x.partial,
           x.compute_us);
}

// The router's answer. The routed-expert output of row t is the sum over
// `parts` (already in the fixed order: ascending shard index, then dispatch
// order) of the part's row for t. Rows listed in `failed_rows` have no valid
// output; `code`/`message` say why (the first failure; it names the shard).
struct MoeResult {
  std::vector<PlacedPartial> parts;
  std::vector<int32_t> failed_rows;  // ascending
  int32_t code = 0;                  // absl::StatusCode of the failure, 0 if none
  std::string message;
  uint64_t tag = 0;  // MoeWork::tag of the request
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, MoeResult& x) {
  return f(caf::meta::type_name("ktx::actors::MoeResult"), x.parts, x.failed_rows, x.code,
           x.message, x.tag);
}

// Counters of the router (tests, logs).
struct RouterStats {
  std::vector<int64_t> parts_sent;  // [n_shards] expert works dispatched per shard
  std::vector<uint8_t> alive;       // [n_shards]
  int64_t requests = 0;             // MoE requests handled
  int64_t rerouted_parts = 0;       // parts re-sent to a replica after a failure
  int64_t failed_rows = 0;          // rows answered without output
  std::vector<int64_t> compute_us;  // [n_shards] Σ ExpertPartial::compute_us of answered parts
  // [n_shards] (row, expert) entries dispatched per shard: expert evaluations
  // asked for (kNoExpert padding never counts; re-sent parts count again).
  std::vector<int64_t> entries_sent;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, RouterStats& x) {
  return f(caf::meta::type_name("ktx::actors::RouterStats"), x.parts_sent, x.alive, x.requests,
           x.rerouted_parts, x.failed_rows, x.compute_us, x.entries_sent);
}

// ---- scheduler -> attention ----

// The tokens one sequence contributes to a step.
struct StepSlice {
  uint64_t seq = 0;             // the scheduler's sequence id (= request id)
  int64_t new_capacity = 0;     // > 0: allocate the sequence's KV with this many tokens first
  std::vector<int32_t> tokens;  // appended at positions kv.length() ...
  int32_t logits = 0;           // SliceLogits
  // The request's routing policy (validated at submit); null: the model's.
  PolicyRef routing_policy;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, StepSlice& x) {
  return f(caf::meta::type_name("ktx::actors::StepSlice"), x.seq, x.new_capacity, x.tokens,
           x.logits, x.routing_policy);
}

struct StepRequest {
  uint64_t step = 0;
  std::vector<StepSlice> slices;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, StepRequest& x) {
  return f(caf::meta::type_name("ktx::actors::StepRequest"), x.step, x.slices);
}

struct SliceResult {
  uint64_t seq = 0;
  int32_t code = 0;  // absl::StatusCode; nonzero: the slice failed, its KV rows are not committed
  std::string message;
  Tensor logits;  // F32 [1 or n_tokens, n_vocab] per the slice's request; empty for kNone
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, SliceResult& x) {
  return f(caf::meta::type_name("ktx::actors::SliceResult"), x.seq, x.code, x.message, x.logits);
}

struct StepResult {
  uint64_t step = 0;
  std::vector<SliceResult> slices;  // in the order of the request
  int64_t compute_us = 0;           // wall time of the step inside the attention actor
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, StepResult& x) {
  return f(caf::meta::type_name("ktx::actors::StepResult"), x.step, x.slices, x.compute_us);
}

// The attention actor's KV pool.
struct KvStats {
  uint64_t budget_bytes = 0;
  uint64_t used_bytes = 0;
  int64_t n_sequences = 0;
  int64_t free_tokens = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, KvStats& x) {
  return f(caf::meta::type_name("ktx::actors::KvStats"), x.budget_bytes, x.used_bytes,
           x.n_sequences, x.free_tokens);
}

// ---- client -> scheduler -> sink ----

struct GenerateJob {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  sampler::SamplingParams sampling;
  int32_t max_tokens = 0;
  std::vector<std::string> stop_strings;
  std::vector<int32_t> stop_token_ids;
  bool stop_at_eos = true;    // also stop at the tokenizer's EOS / EOT (when one is known)
  int32_t return_logits = 0;  // ReturnLogits
  int64_t deadline_ms = 0;    // 0: none; else fail with DEADLINE_EXCEEDED after this long
  PolicyRef routing_policy;   // validated by the Engine; null: the model's policy
};

// ADL for SamplingParams lives in its namespace; see below.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, GenerateJob& x);

struct TokenEvent {
  uint64_t id = 0;
  int32_t token = 0;
  std::string text;  // text that became safe to show with this token (may be empty)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, TokenEvent& x) {
  return f(caf::meta::type_name("ktx::actors::TokenEvent"), x.id, x.token, x.text);
}

struct GenerateOutcome {
  uint64_t id = 0;
  int32_t code = 0;  // absl::StatusCode
  std::string message;
  int32_t finish_reason = 0;  // FinishReason
  std::vector<int32_t> tokens;
  std::string text;
  Tensor logits;         // F32 [n_rows, n_vocab] per ReturnLogits; empty for kNone
  int64_t queue_us = 0;  // from arrival to admission
  int64_t total_us = 0;  // from arrival to the end
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, GenerateOutcome& x) {
  return f(caf::meta::type_name("ktx::actors::GenerateOutcome"), x.id, x.code, x.message,
           x.finish_reason, x.tokens, x.text, x.logits, x.queue_us, x.total_us);
}

// One scheduler step, for the step log.
struct StepLogEntry {
  uint64_t step = 0;
  std::vector<uint64_t> decode_ids;  // requests that decoded one token in this step
  uint64_t prefill_id = 0;           // request whose prompt chunk ran (0: none)
  int32_t prefill_tokens = 0;        // tokens of that chunk
  int64_t start_us = 0;              // since the scheduler started
  int64_t end_us = 0;
  int32_t code = 0;  // absl::StatusCode of the step as a whole
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, StepLogEntry& x) {
  return f(caf::meta::type_name("ktx::actors::StepLogEntry"), x.step, x.decode_ids, x.prefill_id,
           x.prefill_tokens, x.start_us, x.end_us, x.code);
}

// ---- helpers ----

inline absl::Status ToStatus(int32_t code, const std::string& message) {
  return code == 0 ? absl::OkStatus() : absl::Status(static_cast<absl::StatusCode>(code), message);
}

// Registers every type above (the ktx_actors type-ID block) with CAF.
void AddActorMessageTypes(caf::actor_system_config& cfg);

// AddActorMessageTypes plus the scheduler settings of ktx's actor systems:
// `scheduler_threads` CAF workers, and workers that go from their short busy
// poll straight to a condition-variable sleep that a new message ends at once
// (work-stealing.moderate-poll-attempts = 0). CAF's default middle phase
// polls with 50 us sleep_for steps, which Linux stretches to ~100 us, and
// which doubled the per-MoE-layer latency of actors_benchmark.
void ConfigureActorSystem(caf::actor_system_config& cfg, int scheduler_threads);

}  // namespace ktx::actors

namespace ktx::sampler {
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, SamplingParams& x) {
  return f(caf::meta::type_name("ktx::sampler::SamplingParams"), x.temperature, x.top_k, x.top_p,
           x.min_p, x.repetition_penalty, x.presence_penalty, x.frequency_penalty, x.penalty_last_n,
           x.seed);
}
}  // namespace ktx::sampler

namespace ktx::actors {
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, GenerateJob& x) {
  return f(caf::meta::type_name("ktx::actors::GenerateJob"), x.id, x.prompt, x.sampling,
           x.max_tokens, x.stop_strings, x.stop_token_ids, x.stop_at_eos, x.return_logits,
           x.deadline_ms, x.routing_policy);
}
}  // namespace ktx::actors

// The one type-ID block of ktx's actor messages (add_message_type also
// registers std::vector<T> of each). Typed actor handles that travel inside
// messages are registered in AddActorMessageTypes.
CAF_BEGIN_TYPE_ID_BLOCK(ktx_actors, caf::first_custom_type_id)
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::Tensor))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::ExpertWork))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::ExpertPartial))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::ExpertJobDone))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::MoeWork))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::PlacedPartial))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::MoeResult))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::RouterStats))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::StepSlice))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::StepRequest))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::SliceResult))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::StepResult))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::KvStats))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::sampler::SamplingParams))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::GenerateJob))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::TokenEvent))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::GenerateOutcome))
CAF_ADD_TYPE_ID(ktx_actors, (ktx::actors::StepLogEntry))
CAF_END_TYPE_ID_BLOCK(ktx_actors)
