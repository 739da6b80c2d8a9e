// File: runtime/models/routing_policy.h
//
// Routing policies: opt-in ways to run fewer routed experts per token than
// the model's top-k, or to run some of them one layer late (docs/experts.md).
// A policy is plain data, set globally on a model (Deepseek2Model::
// SetRoutingPolicy, so every engine that calls the model's Route stage gets
// it) or passed per request / per sequence (ForwardOptions, BatchedForward).
// Three mechanisms, each settable for all layers and per layer range:
//
//   top_k = k      fixed top-k below the model's K: the first k experts in the
//                  model's selection order (what a model with
//                  expert_used_count = k would select), weights renormalised
//                  over them by the model's rule (norm_weights, weights_scale);
//   mass = m       adaptive top-k: the experts ranked by gate weight are kept
//   min_k = j      until their cumulative share of the gate mass reaches m, at
//                  least j of them; renormalised likewise (moe.h, TopKRule);
//   defer = d      expert deferral: the d lowest-weight experts of each token
//                  (at least one expert stays immediate) are computed on this
//                  layer's input but added to the residual stream one layer
//                  later; weights are not renormalised (every selected expert
//                  still counts, only later). The last layer never defers.
//
// Where deferred outputs join (`join`): `next_moe` (default) adds them to the
// next layer's MoE output, as KTransformers does (kt-kernel writes the
// deferred experts of layer L into the output buffer of layer L+1, which that
// layer's immediate experts then accumulate into): neither the next layer's
// attention nor its router see them. `next_attention` adds them right after
// the next layer's attention, before its FFN norm: the next MoE layer's
// router and experts see them. Deferral is computed by the single-process
// engines (Deepseek2Model::Forward, BatchedForward) for quality measurement;
// overlapping it with the next layer in the actor runtime is later work.
//
// Text form (`--policy`, docs/experts.md): parts separated by ';', each a
// comma list of key=value. The part without `layers` is the global setting;
// a part with `layers=A-B` (or `layers=N`) overrides the fields it names for
// those layers, later parts winning. Keys: top_k, mass, min_k, defer, layers,
// join (global part only: next_moe | next_attention). "" or "full": the
// model's routing.
//
//   KTX_ASSIGN_OR_RETURN(RoutingPolicy p, RoutingPolicy::Parse("top_k=6;layers=3-10,defer=1"));
//   KTX_RETURN_IF_ERROR(p.Validate(hparams.n_layer, hparams.n_expert_used));
//   LayerRoutingPolicy l = p.ForLayer(5);  // top_k 6, defer 1
//
// Thread-safety: RoutingPolicy is a value, immutable once shared; the free
// functions are pure. ExpertDeferral belongs to one forward pass.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/models/activations.h"
#include "runtime/models/moe.h"

namespace ktx::models {

class Deepseek2Model;

// Where the outputs of deferred experts enter the residual stream.
enum class DeferJoin : int {
  kNextMoe = 0,        // with the next layer's MoE (or dense FFN) output (KTransformers)
  kNextAttention = 1,  // right after the next layer's attention
};
// "next_moe" / "next_attention".
const char* DeferJoinName(DeferJoin join);

// The policy of one layer, all fields resolved.
struct LayerRoutingPolicy {
  TopKRule rule;
  int32_t defer = 0;
  DeferJoin join = DeferJoin::kNextMoe;
};

// Fields a policy part sets; unset fields inherit (layer parts from the
// global part, the global part from the model's routing).
struct RoutingSettings {
  std::optional<int32_t> top_k;    // >= 1
  std::optional<double> min_mass;  // (0, 1]
  std::optional<int32_t> min_k;    // >= 1
  std::optional<int32_t> defer;    // >= 0
  bool empty() const { return !top_k && !min_mass && !min_k && !defer; }
};

class RoutingPolicy {
 public:
  struct LayerRange {
    int32_t first = 0;  // inclusive
    int32_t last = 0;   // inclusive
    RoutingSettings settings;
  };

  // The model's routing (no reduction, no deferral).
  RoutingPolicy() = default;

  // Parses the text form above. InvalidArgument naming the field and the
  // part ("routing policy 'top_k=x': top_k: 'x' is not an integer").
  static absl::StatusOr<RoutingPolicy> Parse(std::string_view spec);
  // Shorthands for tests and tools.
  static RoutingPolicy TopK(int32_t top_k);
  static RoutingPolicy Adaptive(double min_mass, int32_t min_k);
  static RoutingPolicy Defer(int32_t defer, DeferJoin join = DeferJoin::kNextMoe);

  RoutingSettings& global() { return global_; }
  const RoutingSettings& global() const { return global_; }
  std::vector<LayerRange>& layers() { return layers_; }
  const std::vector<LayerRange>& layers() const { return layers_; }
  DeferJoin defer_join() const { return defer_join_; }
  void set_defer_join(DeferJoin join) { defer_join_ = join; }

  // No field set anywhere: the model's routing for any model.
  bool empty() const;
  // Some layer may defer (a defer > 0 is set somewhere).
  bool HasDeferral() const;
  // The resolved policy of layer il: the global fields, then the fields of
  // every range containing il, in order.
  LayerRoutingPolicy ForLayer(int il) const;
  // True when, for a model of n_layer layers and K experts per token, every
  // layer keeps all K experts and defers none (the policy changes nothing).
  bool IsFullFor(int32_t n_layer, int32_t n_expert_used) const;

  // Checks the policy against a model. InvalidArgument naming the field and
  // where it was set ("routing policy, layers 3-5: top_k = 9 exceeds the
  // model's n_expert_used = 8"): top_k and min_k in [1, K], min_mass in
  // (0, 1], defer in [0, K - 1] and below the layer's top_k, layer ranges
  // inside [0, n_layer) with first <= last.
  absl::Status Validate(int32_t n_layer, int32_t n_expert_used) const;

  // Canonical text form ("full" when empty); Parse(ToString()) gives an
  // equal policy.
  std::string ToString() const;

  friend bool operator==(const RoutingPolicy& a, const RoutingPolicy& b);

 private:
  RoutingSettings global_;
  std::vector<LayerRange> layers_;
  DeferJoin defer_join_ = DeferJoin::kNextMoe;
};

// Splits `routing` per token into its immediate entries and its min(d,
// kept - 1) lowest-weight entries (ties: the later entry is deferred), where
// kept counts the token's non-kNoExpert entries and d = defer[t] (`defer` has
// one entry for all tokens or n_tokens entries). Both outputs keep the
// entries' order and weights; each is as wide as its longest row, shorter
// rows padded with kNoExpert. A token with d = 0 has an empty deferred row.
void SplitDeferred(const Routing& routing, std::span<const int32_t> defer, Routing* immediate,
                   Routing* deferred);

// ---- Per-request policies in batched engines ----
//
// The actor runtime's attention actors (CPU: actors/attention_actor.cc; GPU)
// route a whole step at once, where each request's slice of rows may bring
// its own policy. They route the batch FULL (the model's K experts per row:
// Route under FullRoutingPolicy(), or a GPU router), then apply the slices'
// policies with ApplyRoutingPolicies and move deferred entries out with
// SplitDeferredRows:
//
//   std::vector<RowPolicy> rows = {{0, 5, request_a_policy}, {5, 6, nullptr}};
//   ApplyRoutingPolicies(hp.routing(), il, rows, model.routing_policy(), &routing);
//   Routing late[2];
//   SplitDeferredRows(il, hp.n_layer, rows, model.routing_policy(), &routing, late);

// Rows [begin, end) of a batch under one policy (a request's own; not owned).
// A null policy, and every row outside the ranges, takes the model's policy.
struct RowPolicy {
  int64_t begin = 0;
  int64_t end = 0;
  const RoutingPolicy* policy = nullptr;
};

// An empty policy: as a per-token policy of Deepseek2Model::Route it
// overrides the model's own and gives the full routing.
const RoutingPolicy* FullRoutingPolicy();

// Reduces rows [begin, end) of a FULL routing (each row the model's K
// entries in selection order with the model's weights) by `rule`: the kept
// entries stay first, in order, reweighted over the kept set as
// RouteFromLogits with the rule does (norm_weights: w' = w * Σ_all w /
// Σ_kept w, in double: p / Σ_kept p up to float rounding, unless a token's
// whole gate mass is below kMinRoutingWeightSum); the dropped ones become
// kNoExpert entries of weight 0. The width stays (CompactRouting shrinks
// it). A rule that keeps all leaves the rows bitwise untouched.
void ReduceRoutingRows(const RoutingParams& params, const TopKRule& rule, int64_t begin,
                       int64_t end, Routing* routing);

// Shrinks routing->n_expert_used to its widest row (at least 1); rows must
// have their kNoExpert entries last.
void CompactRouting(Routing* routing);

// Applies, to a FULL routing of MoE layer il, each row's top-k reduction:
// rows of a range with a policy take that policy's ForLayer(il).rule, all
// others `model_policy`'s (null: none); then CompactRouting. Policies must
// be Validate()d for the model (KTX_CHECKed ranges inside the batch). With
// no reducing rule anywhere the routing is bitwise untouched.
void ApplyRoutingPolicies(const RoutingParams& params, int il, std::span<const RowPolicy> rows,
                          const RoutingPolicy* model_policy, Routing* routing);

// Expert deferral of MoE layer il in a batched engine, per row policy as
// ExpertDeferral::Defer does per token: each row's min(defer, kept - 1)
// lowest-weight entries move out of `routing` into deferred[join] (indexed by
// DeferJoin: [kNextMoe], [kNextAttention]); both have all n_tokens rows
// (rows without deferral are all kNoExpert). Nothing moves on the last layer
// (il + 1 >= n_layer). Returns the entries moved per join.
struct DeferredCount {
  int64_t entries[2] = {0, 0};
  int64_t total() const { return entries[0] + entries[1]; }
};
DeferredCount SplitDeferredRows(int il, int32_t n_layer, std::span<const RowPolicy> rows,
                                const RoutingPolicy* model_policy, Routing* routing,
                                Routing deferred[2]);

// Carries the deferred experts of one MoE layer to the next layer within one
// forward pass (the reference form of expert deferral). Per step:
//
//   after AttentionBlock(il):    if (d.pending(kNextAttention)) Take -> x += out
//   MoE layer, after Route(il):  if (d.pending(kNextMoe)) Take -> an extra part
//                                d.Defer(model, il, h, policies, &routing)
//                                RoutedExperts(routing) ... Combine(parts)
//   dense layer:                 if (d.pending(kNextMoe)) Take -> an extra part
//
// Owns a copy of the deferring layer's h (F32 [n_tokens, n_embd]) and the
// deferred entries per join point. Not thread-safe (one per forward pass).
class ExpertDeferral {
 public:
  // Moves the deferred entries of MoE layer il out of `routing` (the layer's
  // routing on `h`, after its policy) according to the token policies:
  // `policies` is empty (the model's policy for every token), one entry (all
  // tokens) or one per token; a null entry means the model's policy. Does
  // nothing on the model's last layer or when no token defers. Fails if
  // something is still pending (a Take was skipped).
  absl::Status Defer(const Deepseek2Model& model, int il, const Activations& h,
                     std::span<const RoutingPolicy* const> policies, Routing* routing);
  bool pending(DeferJoin join) const { return has_[static_cast<int>(join)]; }
  bool any_pending() const { return has_[0] || has_[1]; }
  // Computes the pending entries of `join` with the model's RoutedExperts on
  // the deferring layer's h: out F32 [n_tokens, n_embd]; clears them.
  absl::Status Take(const Deepseek2Model& model, DeferJoin join, Activations* out);
  // Experts deferred so far (entries), for statistics.
  int64_t deferred_entries() const { return deferred_entries_; }

 private:
  int il_ = -1;
  Activations h_;
  Routing routing_[2];
  bool has_[2] = {false, false};
  int64_t deferred_entries_ = 0;
};

}  // namespace ktx::models
