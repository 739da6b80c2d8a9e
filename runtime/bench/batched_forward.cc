#include "runtime/bench/batched_forward.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"

namespace ktx::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Times one stage call into `profile` (if any).
class StageTimer {
 public:
  StageTimer(StageProfile* profile, Stage stage, int il)
      : profile_(profile), stage_(stage), il_(il), t0_(Clock::now()) {}
  ~StageTimer() {
    if (profile_ != nullptr) {
      profile_->AddSeconds(stage_, il_, std::chrono::duration<double>(Clock::now() - t0_).count());
    }
  }

 private:
  StageProfile* profile_;
  Stage stage_;
  int il_;
  Clock::time_point t0_;
};

}  // namespace

const char* StageName(Stage stage) {
  switch (stage) {
    case Stage::kEmbed: return "embed";
    case Stage::kAttention: return "attention";
    case Stage::kFfnNorm: return "ffn_norm";
    case Stage::kDenseFfn: return "dense_ffn";
    case Stage::kRoute: return "route";
    case Stage::kExperts: return "experts";
    case Stage::kShared: return "shared";
    case Stage::kCombine: return "combine";
    case Stage::kHead: return "head";
  }
  return "?";
}

StageProfile::StageProfile(const models::Deepseek2Model& model)
    : n_layer_(model.hparams().n_layer), n_expert_(model.hparams().n_expert) {
  seconds_.resize(n_layer_ + 1);
  bytes_per_expert_.assign(n_layer_, 0.0);
  experts_used_.assign(n_layer_, 0);
  seen_.assign(std::max<int64_t>(n_expert_, 1), 0);
  for (int il = 0; il < n_layer_; ++il) {
    const models::Deepseek2LayerWeights& w = model.weights().layers[il];
    if (!model.hparams().IsMoeLayer(il) || w.ffn_gate_exps == nullptr) continue;
    double bytes = 0;
    for (const gguf::TensorInfo* t : {w.ffn_gate_exps, w.ffn_up_exps, w.ffn_down_exps}) {
      bytes += static_cast<double>(t->n_bytes) / static_cast<double>(t->ne[2]);
    }
    bytes_per_expert_[il] = bytes;
  }
  Reset();
}

void StageProfile::Reset() {
  for (auto& s : seconds_) s.fill(0.0);
  std::fill(experts_used_.begin(), experts_used_.end(), 0);
  expert_bytes_ = 0;
  expert_activations_ = 0;
  tokens_ = 0;
  steps_ = 0;
}

void StageProfile::AddSeconds(Stage stage, int il, double seconds) {
  KTX_CHECK(il >= -1 && il < n_layer_);
  seconds_[il + 1][static_cast<int>(stage)] += seconds;
}

void StageProfile::AddRouting(int il, const models::Routing& routing) {
  KTX_CHECK(il >= 0 && il < n_layer_);
  std::fill(seen_.begin(), seen_.end(), 0);
  int64_t distinct = 0;
  for (int32_t e : routing.expert_ids) {
    if (e >= 0 && e < n_expert_ && !seen_[e]) {
      seen_[e] = 1;
      ++distinct;
    }
  }
  experts_used_[il] += distinct;
  expert_activations_ += distinct;
  expert_bytes_ += static_cast<double>(distinct) * bytes_per_expert_[il];
}

double StageProfile::seconds(Stage stage, int il) const {
  KTX_CHECK(il >= -1 && il < n_layer_);
  return seconds_[il + 1][static_cast<int>(stage)];
}

double StageProfile::total_seconds(Stage stage) const {
  double s = 0;
  for (const auto& layer : seconds_) s += layer[static_cast<int>(stage)];
  return s;
}

int StageProfile::layers_with(Stage stage) const {
  int n = 0;
  for (const auto& layer : seconds_) n += layer[static_cast<int>(stage)] > 0;
  return n;
}

absl::Status BatchedForward(const models::Deepseek2Model& model,
                            std::span<const SequenceBatchEntry> batch, models::LogitsRows rows,
                            models::Activations* logits, StageProfile* profile) {
  if (batch.empty()) return absl::InvalidArgumentError("BatchedForward: empty batch");
  if (logits == nullptr) return absl::InvalidArgumentError("BatchedForward: no logits output");
  const models::Deepseek2Hparams& hp = model.hparams();
  const int64_t n_embd = hp.n_embd;
  const size_t n_seq = batch.size();
  // Row offsets of each sequence in the batch, positions of every row.
  std::vector<int64_t> begin(n_seq + 1, 0);
  std::set<const kv_cache::SequenceKv*> seen;
  for (size_t s = 0; s < n_seq; ++s) {
    const SequenceBatchEntry& e = batch[s];
    if (e.tokens.empty() || e.kv == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("BatchedForward: sequence ", s, " has no tokens or no KV cache"));
    }
    if (!seen.insert(e.kv).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("BatchedForward: sequence ", s, " repeats the KV cache of another one"));
    }
    KTX_RETURN_IF_ERROR(e.kv->CheckRoom(static_cast<int64_t>(e.tokens.size())));
    if (e.kv->length() + static_cast<int64_t>(e.tokens.size()) >
        std::numeric_limits<int32_t>::max()) {
      return absl::OutOfRangeError("BatchedForward: positions beyond 2^31");
    }
    begin[s + 1] = begin[s] + static_cast<int64_t>(e.tokens.size());
  }
  const int64_t n = begin[n_seq];
  std::vector<int32_t> tokens(n), positions(n);
  for (size_t s = 0; s < n_seq; ++s) {
    for (int64_t t = 0; t < begin[s + 1] - begin[s]; ++t) {
      tokens[begin[s] + t] = batch[s].tokens[t];
      positions[begin[s] + t] = static_cast<int32_t>(batch[s].kv->length() + t);
    }
  }

  // Token policies (one per row when any sequence brings its own).
  std::vector<const models::RoutingPolicy*> token_policies;
  bool may_defer = model.routing_policy() != nullptr && model.routing_policy()->HasDeferral();
  for (size_t s = 0; s < n_seq; ++s) {
    const models::RoutingPolicy* p = batch[s].policy;
    if (p == nullptr) continue;
    KTX_RETURN_IF_ERROR(p->Validate(hp.n_layer, hp.n_expert_used));
    may_defer = may_defer || p->HasDeferral();
    if (token_policies.empty()) token_policies.assign(n, nullptr);
    std::fill(token_policies.begin() + begin[s], token_policies.begin() + begin[s + 1], p);
  }
  models::ExpertDeferral deferral;
  models::Activations x, xs, h, f, shared, late;
  models::Routing routing;
  {
    StageTimer timer(profile, Stage::kEmbed, -1);
    KTX_RETURN_IF_ERROR(model.Embed(tokens, &x));
  }
  for (int il = 0; il < hp.n_layer; ++il) {
    {
      StageTimer timer(profile, Stage::kAttention, il);
      if (n_seq == 1) {
        KTX_RETURN_IF_ERROR(model.AttentionBlock(il, positions, batch[0].kv, &x));
      } else {
        for (size_t s = 0; s < n_seq; ++s) {
          const int64_t rows_s = begin[s + 1] - begin[s];
          xs.Resize(rows_s, n_embd);
          std::memcpy(xs.data(), x.row(begin[s]), sizeof(float) * rows_s * n_embd);
          KTX_RETURN_IF_ERROR(model.AttentionBlock(
              il, std::span<const int32_t>(positions.data() + begin[s], rows_s), batch[s].kv, &xs));
          std::memcpy(x.row(begin[s]), xs.data(), sizeof(float) * rows_s * n_embd);
        }
      }
    }
    if (deferral.pending(models::DeferJoin::kNextAttention)) {
      {
        StageTimer timer(profile, Stage::kExperts, il);
        KTX_RETURN_IF_ERROR(deferral.Take(model, models::DeferJoin::kNextAttention, &late));
      }
      StageTimer timer(profile, Stage::kCombine, il);
      const models::Activations* parts[] = {&late};
      KTX_RETURN_IF_ERROR(model.Combine(parts, &x));
    }
    {
      StageTimer timer(profile, Stage::kFfnNorm, il);
      KTX_RETURN_IF_ERROR(model.FfnNorm(il, x, &h));
    }
    const bool late_here = deferral.pending(models::DeferJoin::kNextMoe);
    if (late_here) {
      StageTimer timer(profile, Stage::kExperts, il);
      KTX_RETURN_IF_ERROR(deferral.Take(model, models::DeferJoin::kNextMoe, &late));
    }
    if (!hp.IsMoeLayer(il)) {
      {
        StageTimer timer(profile, Stage::kDenseFfn, il);
        KTX_RETURN_IF_ERROR(model.DenseFfn(il, h, &f));
      }
      StageTimer timer(profile, Stage::kCombine, il);
      const models::Activations* parts[] = {&f, &late};
      KTX_RETURN_IF_ERROR(model.Combine(std::span(parts, late_here ? 2 : 1), &x));
      continue;
    }
    {
      StageTimer timer(profile, Stage::kRoute, il);
      KTX_RETURN_IF_ERROR(model.Route(il, h, token_policies, &routing));
      if (may_defer) KTX_RETURN_IF_ERROR(deferral.Defer(model, il, h, token_policies, &routing));
    }
    if (profile != nullptr) profile->AddRouting(il, routing);
    {
      StageTimer timer(profile, Stage::kExperts, il);
      KTX_RETURN_IF_ERROR(model.RoutedExperts(il, h, routing, {}, &f));
    }
    {
      StageTimer timer(profile, Stage::kShared, il);
      KTX_RETURN_IF_ERROR(model.SharedExperts(il, h, &shared));
    }
    StageTimer timer(profile, Stage::kCombine, il);
    const models::Activations* parts[] = {&f, &shared, &late};
    KTX_RETURN_IF_ERROR(model.Combine(std::span(parts, late_here ? 3 : 2), &x));
  }
  if (deferral.any_pending()) {
    return absl::InternalError("BatchedForward: deferred experts left after the last layer");
  }
  {
    StageTimer timer(profile, Stage::kHead, -1);
    if (rows == models::LogitsRows::kAll || n_seq == 1) {
      KTX_RETURN_IF_ERROR(model.Head(x, rows, logits));
    } else {
      models::Activations last(static_cast<int64_t>(n_seq), n_embd);
      for (size_t s = 0; s < n_seq; ++s) {
        std::memcpy(last.row(static_cast<int64_t>(s)), x.row(begin[s + 1] - 1),
                    sizeof(float) * n_embd);
      }
      KTX_RETURN_IF_ERROR(model.Head(last, models::LogitsRows::kAll, logits));
    }
  }
  for (size_t s = 0; s < n_seq; ++s) {
    KTX_RETURN_IF_ERROR(batch[s].kv->Commit(begin[s + 1] - begin[s]));
  }
  if (profile != nullptr) profile->AddTokens(n);
  return absl::OkStatus();
}

}  // namespace ktx::bench
