#include "runtime/models/routing_policy.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "runtime/base/status.h"
#include "runtime/models/deepseek2.h"

namespace ktx::models {
namespace {

constexpr const char* kKeys = "top_k, mass, min_k, defer, layers, join";

absl::Status PartError(absl::string_view part, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("routing policy '", part, "': ", message));
}

absl::StatusOr<int32_t> ParseInt(absl::string_view part, absl::string_view key,
                                 absl::string_view value, int32_t min) {
  int32_t v = 0;
  if (!absl::SimpleAtoi(value, &v)) {
    return PartError(part, absl::StrCat(key, ": '", value, "' is not an integer"));
  }
  if (v < min) {
    return PartError(part, absl::StrCat(key, ": ", v, " must be >= ", min));
  }
  return v;
}

// "N" or "A-B".
absl::Status ParseLayers(absl::string_view part, absl::string_view value,
                         RoutingPolicy::LayerRange* range) {
  std::vector<absl::string_view> ends = absl::StrSplit(value, '-');
  if (ends.size() > 2 || ends[0].empty() || (ends.size() == 2 && ends[1].empty())) {
    return PartError(part, absl::StrCat("layers: '", value, "' is not a layer index or range A-B"));
  }
  KTX_ASSIGN_OR_RETURN(range->first, ParseInt(part, "layers", ends[0], 0));
  range->last = range->first;
  if (ends.size() == 2) {
    KTX_ASSIGN_OR_RETURN(range->last, ParseInt(part, "layers", ends[1], 0));
  }
  if (range->last < range->first) {
    return PartError(part, absl::StrCat("layers: range ", range->first, "-", range->last,
                                        " ends before it starts"));
  }
  return absl::OkStatus();
}

std::string FormatMass(double m) {
  std::string s = absl::StrFormat("%g", m);
  double back = 0;
  if (!absl::SimpleAtod(s, &back) || back != m) s = absl::StrFormat("%.17g", m);
  return s;
}

void AppendSettings(const RoutingSettings& s, std::vector<std::string>* fields) {
  if (s.top_k) fields->push_back(absl::StrCat("top_k=", *s.top_k));
  if (s.min_mass) fields->push_back(absl::StrCat("mass=", FormatMass(*s.min_mass)));
  if (s.min_k) fields->push_back(absl::StrCat("min_k=", *s.min_k));
  if (s.defer) fields->push_back(absl::StrCat("defer=", *s.defer));
}

void Overlay(const RoutingSettings& s, LayerRoutingPolicy* out) {
  if (s.top_k) out->rule.top_k = *s.top_k;
  if (s.min_mass) out->rule.min_mass = *s.min_mass;
  if (s.min_k) out->rule.min_k = *s.min_k;
  if (s.defer) out->defer = *s.defer;
}

bool SameSettings(const RoutingSettings& a, const RoutingSettings& b) {
  return a.top_k == b.top_k && a.min_mass == b.min_mass && a.min_k == b.min_k && a.defer == b.defer;
}

// Checks one part's fields against a model; `where` names the part.
absl::Status ValidateSettings(const RoutingSettings& s, const std::string& where,
                              int32_t n_expert_used) {
  auto err = [&](absl::string_view m) {
    return absl::InvalidArgumentError(absl::StrCat("routing policy, ", where, ": ", m));
  };
  if (s.top_k && (*s.top_k < 1 || *s.top_k > n_expert_used)) {
    return err(absl::StrCat(
        "top_k = ", *s.top_k, *s.top_k < 1 ? " must be >= 1" : " exceeds",
        *s.top_k < 1 ? "" : absl::StrCat(" the model's n_expert_used = ", n_expert_used)));
  }
  if (s.min_mass && !(*s.min_mass > 0.0 && *s.min_mass <= 1.0)) {
    return err(absl::StrCat("mass = ", *s.min_mass, " outside (0, 1]"));
  }
  if (s.min_k && (*s.min_k < 1 || *s.min_k > n_expert_used)) {
    return err(
        absl::StrCat("min_k = ", *s.min_k, " outside [1, n_expert_used = ", n_expert_used, "]"));
  }
  if (s.defer && (*s.defer < 0 || *s.defer > n_expert_used - 1)) {
    return err(absl::StrCat("defer = ", *s.defer, " outside [0, n_expert_used - 1 = ",
                            n_expert_used - 1, "] (at least one expert stays immediate)"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* DeferJoinName(DeferJoin join) {
  return join == DeferJoin::kNextAttention ? "next_attention" : "next_moe";
}

absl::StatusOr<RoutingPolicy> RoutingPolicy::Parse(std::string_view spec_in) {
  const absl::string_view spec(spec_in.data(), spec_in.size());
  RoutingPolicy policy;
  const absl::string_view trimmed = absl::StripAsciiWhitespace(spec);
  if (trimmed.empty() || trimmed == "full") return policy;
  bool have_global = false;
  bool have_join = false;
  for (absl::string_view raw_part : absl::StrSplit(trimmed, ';')) {
    const absl::string_view part = absl::StripAsciiWhitespace(raw_part);
    if (part.empty()) return PartError(spec, "empty part (two ';' in a row?)");
    RoutingSettings settings;
    std::optional<LayerRange> range;
    std::optional<DeferJoin> join;
    std::vector<std::string> seen;
    for (absl::string_view raw_field : absl::StrSplit(part, ',')) {
      const absl::string_view field = absl::StripAsciiWhitespace(raw_field);
      const size_t eq = field.find('=');
      if (eq == absl::string_view::npos) {
        return PartError(part, absl::StrCat("'", field, "' is not key=value (keys: ", kKeys, ")"));
      }
      const std::string key(absl::StripAsciiWhitespace(field.substr(0, eq)));
      const absl::string_view value = absl::StripAsciiWhitespace(field.substr(eq + 1));
      if (std::find(seen.begin(), seen.end(), key) != seen.end()) {
        return PartError(part, absl::StrCat(key, ": given twice"));
      }
      seen.push_back(key);
      if (key == "top_k") {
        KTX_ASSIGN_OR_RETURN(settings.top_k, ParseInt(part, key, value, 1));
      } else if (key == "min_k") {
        KTX_ASSIGN_OR_RETURN(settings.min_k, ParseInt(part, key, value, 1));
      } else if (key == "defer") {
        KTX_ASSIGN_OR_RETURN(settings.defer, ParseInt(part, key, value, 0));
      } else if (key == "mass") {
        double m = 0;
        if (!absl::SimpleAtod(value, &m) || !std::isfinite(m)) {
          return PartError(part, absl::StrCat("mass: '", value, "' is not a number"));
        }
        if (!(m > 0.0 && m <= 1.0)) {
          return PartError(part, absl::StrCat("mass: ", value, " outside (0, 1]"));
        }
        settings.min_mass = m;
      } else if (key == "layers") {
        range.emplace();
        KTX_RETURN_IF_ERROR(ParseLayers(part, value, &*range));
      } else if (key == "join") {
        if (value == "next_moe") {
          join = DeferJoin::kNextMoe;
        } else if (value == "next_attention") {
          join = DeferJoin::kNextAttention;
        } else {
          return PartError(
              part, absl::StrCat("join: '", value, "' (expected next_moe or next_attention)"));
        }
      } else {
        return PartError(part, absl::StrCat("unknown field '", key, "' (keys: ", kKeys, ")"));
      }
    }
    if (range.has_value()) {
      if (join.has_value()) {
        return PartError(part,
                         "join: applies to the whole policy; set it in the part without "
                         "layers");
      }
      if (settings.empty()) {
        return PartError(part, "layers: the part sets nothing for its layers");
      }
      range->settings = settings;
      policy.layers_.push_back(*range);
    } else {
      if (have_global) {
        return PartError(part, "a second part without layers (the global part is given once)");
      }
      have_global = true;
      policy.global_ = settings;
      if (join.has_value()) {
        policy.defer_join_ = *join;
        have_join = true;
      }
    }
  }
  (void)have_join;
  return policy;
}

RoutingPolicy RoutingPolicy::TopK(int32_t top_k) {
  RoutingPolicy p;
  p.global_.top_k = top_k;
  return p;
}

RoutingPolicy RoutingPolicy::Adaptive(double min_mass, int32_t min_k) {
  RoutingPolicy p;
  p.global_.min_mass = min_mass;
  p.global_.min_k = min_k;
  return p;
}

RoutingPolicy RoutingPolicy::Defer(int32_t defer, DeferJoin join) {
  RoutingPolicy p;
  p.global_.defer = defer;
  p.defer_join_ = join;
  return p;
}

bool RoutingPolicy::empty() const {
  if (!global_.empty()) return false;
  for (const LayerRange& r : layers_) {
    if (!r.settings.empty()) return false;
  }
  return true;
}

bool RoutingPolicy::HasDeferral() const {
  if (global_.defer.value_or(0) > 0) return true;
  for (const LayerRange& r : layers_) {
    if (r.settings.defer.value_or(0) > 0) return true;
  }
  return false;
}

LayerRoutingPolicy RoutingPolicy::ForLayer(int il) const {
  LayerRoutingPolicy out;
  out.join = defer_join_;
  Overlay(global_, &out);
  for (const LayerRange& r : layers_) {
    if (il >= r.first && il <= r.last) Overlay(r.settings, &out);
  }
  return out;
}

bool RoutingPolicy::IsFullFor(int32_t n_layer, int32_t n_expert_used) const {
  for (int il = 0; il < n_layer; ++il) {
    const LayerRoutingPolicy l = ForLayer(il);
    if (!l.rule.KeepsAll(n_expert_used) || (l.defer > 0 && il + 1 < n_layer)) return false;
  }
  return true;
}

absl::Status RoutingPolicy::Validate(int32_t n_layer, int32_t n_expert_used) const {
  KTX_RETURN_IF_ERROR(ValidateSettings(global_, "all layers", n_expert_used));
  for (const LayerRange& r : layers_) {
    const std::string where = r.first == r.last ? absl::StrCat("layers ", r.first)
                                                : absl::StrCat("layers ", r.first, "-", r.last);
    if (r.first < 0 || r.last < r.first || r.last >= n_layer) {
      return absl::InvalidArgumentError(absl::StrCat(
          "routing policy, ", where, ": layers outside [0, n_layer = ", n_layer, ") or reversed"));
    }
    KTX_RETURN_IF_ERROR(ValidateSettings(r.settings, where, n_expert_used));
  }
  // The combination per layer: deferral must leave an immediate expert of
  // the layer's fixed top-k.
  for (int il = 0; il < n_layer; ++il) {
    const LayerRoutingPolicy l = ForLayer(il);
    const int32_t k = l.rule.top_k == 0 ? n_expert_used : l.rule.top_k;
    if (l.defer > 0 && l.defer >= k) {
      return absl::InvalidArgumentError(absl::StrCat("routing policy, layer ", il,
                                                     ": defer = ", l.defer,
                                                     " leaves no immediate expert of top_k = ", k));
    }
  }
  return absl::OkStatus();
}

std::string RoutingPolicy::ToString() const {
  if (empty() && defer_join_ == DeferJoin::kNextMoe) return "full";
  std::vector<std::string> parts;
  std::vector<std::string> fields;
  AppendSettings(global_, &fields);
  if (defer_join_ != DeferJoin::kNextMoe) {
    fields.push_back(absl::StrCat("join=", DeferJoinName(defer_join_)));
  }
  if (!fields.empty()) parts.push_back(absl::StrJoin(fields, ","));
  for (const LayerRange& r : layers_) {
    fields.clear();
    fields.push_back(r.first == r.last ? absl::StrCat("layers=", r.first)
                                       : absl::StrCat("layers=", r.first, "-", r.last));
    AppendSettings(r.settings, &fields);
    parts.push_back(absl::StrJoin(fields, ","));
  }
  return absl::StrJoin(parts, ";");
}

bool operator==(const RoutingPolicy& a, const RoutingPolicy& b) {
  if (!SameSettings(a.global_, b.global_) || a.defer_join_ != b.defer_join_ ||
      a.layers_.size() != b.layers_.size()) {
    return false;
  }
  for (size_t i = 0; i < a.layers_.size(); ++i) {
    const auto& x = a.layers_[i];
    const auto& y = b.layers_[i];
    if (x.first != y.first || x.last != y.last || !SameSettings(x.settings, y.settings)) {
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------
// Deferral.

void SplitDeferred(const Routing& routing, std::span<const int32_t> defer, Routing* immediate,
                   Routing* deferred) {
  const int64_t n = routing.n_tokens;
  const int32_t width = routing.n_expert_used;
  KTX_CHECK(defer.size() == 1 || static_cast<int64_t>(defer.size()) == n);
  // Per token: which entries are deferred.
  std::vector<uint8_t> late(static_cast<size_t>(n * width), 0);
  std::vector<int32_t> n_late(n, 0), n_now(n, 0);
  std::vector<int32_t> kept;
  for (int64_t t = 0; t < n; ++t) {
    kept.clear();
    for (int k = 0; k < width; ++k) {
      if (routing.id(t, k) != kNoExpert) kept.push_back(k);
    }
    const int32_t d_req = defer.size() == 1 ? defer[0] : defer[t];
    const int32_t n_kept = static_cast<int32_t>(kept.size());
    const int32_t d = std::clamp<int32_t>(d_req, 0, std::max<int32_t>(0, n_kept - 1));
    // Lowest weight first; among equal weights the later entry first.
    std::stable_sort(kept.begin(), kept.end(), [&](int a, int b) {
      const float wa = routing.weight(t, a), wb = routing.weight(t, b);
      return wa < wb || (wa == wb && a > b);
    });
    for (int32_t j = 0; j < d; ++j) late[t * width + kept[j]] = 1;
    n_late[t] = d;
    n_now[t] = static_cast<int32_t>(kept.size()) - d;
  }
  const int32_t w_now = n > 0 ? *std::max_element(n_now.begin(), n_now.end()) : width;
  const int32_t w_late = n > 0 ? *std::max_element(n_late.begin(), n_late.end()) : 0;
  auto init = [n](Routing* r, int32_t w) {
    r->n_tokens = n;
    r->n_expert_used = std::max<int32_t>(w, 1);
    r->expert_ids.assign(static_cast<size_t>(n * r->n_expert_used), kNoExpert);
    r->weights.assign(static_cast<size_t>(n * r->n_expert_used), 0.0f);
  };
  Routing now, later;
  init(&now, w_now);
  init(&later, w_late);
  for (int64_t t = 0; t < n; ++t) {
    int32_t i = 0, j = 0;
    for (int k = 0; k < width; ++k) {
      const int32_t e = routing.id(t, k);
      if (e == kNoExpert) continue;
      if (late[t * width + k]) {
        later.expert_ids[t * later.n_expert_used + j] = e;
        later.weights[t * later.n_expert_used + j] = routing.weight(t, k);
        ++j;
      } else {
        now.expert_ids[t * now.n_expert_used + i] = e;
        now.weights[t * now.n_expert_used + i] = routing.weight(t, k);
        ++i;
      }
    }
  }
  *immediate = std::move(now);
  *deferred = std::move(later);
}

// ---------------------------------------------------------------------------
// Per-request policies in batched engines.

const RoutingPolicy* FullRoutingPolicy() {
  static const RoutingPolicy* const kFull = new RoutingPolicy();
  return kFull;
}

void ReduceRoutingRows(const RoutingParams& params, const TopKRule& rule, int64_t begin,
                       int64_t end, Routing* routing) {
  KTX_CHECK(begin >= 0 && begin <= end && end <= routing->n_tokens);
  const int32_t width = routing->n_expert_used;
  if (rule.KeepsAll(width) || begin == end) return;
  std::vector<double> w(width);
  std::vector<uint8_t> keep(width);
  std::vector<int32_t> ids(width);
  for (int64_t t = begin; t < end; ++t) {
    int32_t* id = routing->expert_ids.data() + t * width;
    float* wt = routing->weights.data() + t * width;
    int32_t n = 0;  // the row's entries (a full row: all of them)
    while (n < width && id[n] != kNoExpert) {
      w[n] = wt[n];
      ++n;
    }
    if (n == 0) continue;
    TopKRule r = rule;
    if (r.top_k > n) r.top_k = n;
    if (r.min_k > n) r.min_k = n;
    if (r.KeepsAll(n)) continue;
    KeptByRule(r, w.data(), n, keep.data());
    double sum_all = 0.0, sum_kept = 0.0;
    for (int32_t k = 0; k < n; ++k) {
      sum_all += w[k];
      if (keep[k]) sum_kept += w[k];
    }
    const double factor = params.norm_weights && sum_kept > 0.0 ? sum_all / sum_kept : 1.0;
    int32_t j = 0;
    for (int32_t k = 0; k < n; ++k) {
      if (!keep[k]) continue;
      id[j] = id[k];
      wt[j] = static_cast<float>(w[k] * factor);
      ++j;
    }
    for (; j < width; ++j) {
      id[j] = kNoExpert;
      wt[j] = 0.0f;
    }
  }
}

void CompactRouting(Routing* routing) {
  const int32_t width = routing->n_expert_used;
  int32_t w = 1;
  for (int64_t t = 0; t < routing->n_tokens; ++t) w = std::max(w, routing->kept(t));
  if (w >= width) return;
  Routing out;
  out.n_tokens = routing->n_tokens;
  out.n_expert_used = w;
  out.expert_ids.resize(static_cast<size_t>(out.n_tokens * w));
  out.weights.resize(out.expert_ids.size());
  for (int64_t t = 0; t < routing->n_tokens; ++t) {
    std::copy_n(routing->expert_ids.begin() + t * width, w, out.expert_ids.begin() + t * w);
    std::copy_n(routing->weights.begin() + t * width, w, out.weights.begin() + t * w);
  }
  *routing = std::move(out);
}

namespace {

// The policy of every row of an n-row batch.
std::vector<const RoutingPolicy*> PolicyPerRow(int64_t n, std::span<const RowPolicy> rows,
                                               const RoutingPolicy* model_policy) {
  std::vector<const RoutingPolicy*> of(static_cast<size_t>(n), model_policy);
  for (const RowPolicy& r : rows) {
    KTX_CHECK(r.begin >= 0 && r.begin <= r.end && r.end <= n);
    if (r.policy == nullptr) continue;
    std::fill(of.begin() + r.begin, of.begin() + r.end, r.policy);
  }
  return of;
}

}  // namespace

void ApplyRoutingPolicies(const RoutingParams& params, int il, std::span<const RowPolicy> rows,
                          const RoutingPolicy* model_policy, Routing* routing) {
  const std::vector<const RoutingPolicy*> of = PolicyPerRow(routing->n_tokens, rows, model_policy);
  bool reduced = false;
  int64_t t = 0;
  while (t < routing->n_tokens) {
    int64_t end = t + 1;
    while (end < routing->n_tokens && of[end] == of[t]) ++end;
    if (of[t] != nullptr) {
      const TopKRule rule = of[t]->ForLayer(il).rule;
      KTX_CHECK(rule.top_k <= params.n_expert_used && rule.min_k <= params.n_expert_used);
      if (!rule.KeepsAll(routing->n_expert_used)) {
        ReduceRoutingRows(params, rule, t, end, routing);
        reduced = true;
      }
    }
    t = end;
  }
  if (reduced) CompactRouting(routing);
}

DeferredCount SplitDeferredRows(int il, int32_t n_layer, std::span<const RowPolicy> rows,
                                const RoutingPolicy* model_policy, Routing* routing,
                                Routing deferred[2]) {
  DeferredCount count;
  const int64_t n = routing->n_tokens;
  for (int j = 0; j < 2; ++j) {
    deferred[j].n_tokens = n;
    deferred[j].n_expert_used = 1;
    deferred[j].expert_ids.assign(static_cast<size_t>(n), kNoExpert);
    deferred[j].weights.assign(static_cast<size_t>(n), 0.0f);
  }
  if (il + 1 >= n_layer) return count;
  const std::vector<const RoutingPolicy*> of = PolicyPerRow(n, rows, model_policy);
  // d per row for each join point (0 elsewhere).
  std::vector<int32_t> d[2] = {std::vector<int32_t>(n, 0), std::vector<int32_t>(n, 0)};
  const RoutingPolicy* last = nullptr;
  LayerRoutingPolicy resolved;
  bool any = false;
  for (int64_t t = 0; t < n; ++t) {
    if (of[t] == nullptr) continue;
    if (of[t] != last) {
      resolved = of[t]->ForLayer(il);
      last = of[t];
    }
    if (resolved.defer > 0) {
      d[static_cast<int>(resolved.join)][t] = resolved.defer;
      any = true;
    }
  }
  if (!any) return count;
  Routing rest;
  SplitDeferred(*routing, d[static_cast<int>(DeferJoin::kNextMoe)], &rest,
                &deferred[static_cast<int>(DeferJoin::kNextMoe)]);
  SplitDeferred(rest, d[static_cast<int>(DeferJoin::kNextAttention)], routing,
                &deferred[static_cast<int>(DeferJoin::kNextAttention)]);
  for (int j = 0; j < 2; ++j) {
    for (int32_t e : deferred[j].expert_ids) count.entries[j] += e != kNoExpert;
  }
  return count;
}

absl::Status ExpertDeferral::Defer(const Deepseek2Model& model, int il, const Activations& h,
                                   std::span<const RoutingPolicy* const> policies,
                                   Routing* routing) {
  const Deepseek2Hparams& hp = model.hparams();
  if (il + 1 >= hp.n_layer) return absl::OkStatus();  // nothing follows the last layer
  if (any_pending()) {
    return absl::FailedPreconditionError(
        absl::StrCat("expert deferral: layer ", il, " defers while the deferred experts of layer ",
                     il_, " are still pending"));
  }
  const int64_t n = routing->n_tokens;
  if (!(policies.empty() || policies.size() == 1 || static_cast<int64_t>(policies.size()) == n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert deferral: ", policies.size(), " token policies for ", n, " tokens"));
  }
  const RoutingPolicy* fallback = model.routing_policy();
  auto policy_of = [&](int64_t t) -> const RoutingPolicy* {
    const RoutingPolicy* p =
        policies.empty() ? nullptr : (policies.size() == 1 ? policies[0] : policies[t]);
    return p != nullptr ? p : fallback;
  };
  // d and join per token (policies repeat: resolve each distinct one once).
  std::vector<int32_t> d(n, 0);
  std::vector<DeferJoin> join(n, DeferJoin::kNextMoe);
  const RoutingPolicy* last = nullptr;
  LayerRoutingPolicy resolved;
  bool any = false;
  for (int64_t t = 0; t < n; ++t) {
    const RoutingPolicy* p = policy_of(t);
    if (p == nullptr) continue;
    if (p != last) {
      resolved = p->ForLayer(il);
      last = p;
    }
    d[t] = resolved.defer;
    join[t] = resolved.join;
    any = any || resolved.defer > 0;
  }
  if (!any) return absl::OkStatus();
  std::vector<int32_t> d_join[2] = {d, d};
  for (int64_t t = 0; t < n; ++t) d_join[join[t] == DeferJoin::kNextMoe ? 1 : 0][t] = 0;
  // d_join[0]: tokens joining at the next MoE; d_join[1]: at the next attention.
  Routing rest;
  SplitDeferred(*routing, d_join[0], &rest, &routing_[static_cast<int>(DeferJoin::kNextMoe)]);
  SplitDeferred(rest, d_join[1], routing, &routing_[static_cast<int>(DeferJoin::kNextAttention)]);
  for (int j = 0; j < 2; ++j) {
    int64_t entries = 0;
    for (int32_t e : routing_[j].expert_ids) entries += e != kNoExpert;
    has_[j] = entries > 0;
    deferred_entries_ += entries;
  }
  if (any_pending()) {
    il_ = il;
    h_ = h;
  }
  return absl::OkStatus();
}

absl::Status ExpertDeferral::Take(const Deepseek2Model& model, DeferJoin join, Activations* out) {
  const int j = static_cast<int>(join);
  if (!has_[j]) {
    return absl::FailedPreconditionError(
        absl::StrCat("expert deferral: nothing pending for ", DeferJoinName(join)));
  }
  KTX_RETURN_IF_ERROR(model.RoutedExperts(il_, h_, routing_[j], {}, out));
  has_[j] = false;
  routing_[j] = Routing();
  if (!any_pending()) {
    il_ = -1;
    h_ = Activations();
  }
  return absl::OkStatus();
}

}  // namespace ktx::models
