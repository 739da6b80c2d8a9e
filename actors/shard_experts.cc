#include "actors/shard_experts.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"

namespace ktx::actors {
namespace {

// The reference expert path over the model's mapping; keeps the model alive.
class MappedExpertBackend final : public ShardExpertBackend {
 public:
  MappedExpertBackend(std::shared_ptr<const models::Deepseek2Model> model, const HeldExperts& held)
      : model_(std::move(model)), reference_(model_->hparams(), model_->weights()) {
    info_.variant = "reference";
    info_.bytes_held = MappedExpertBytes(*model_, held);
    const models::Deepseek2Hparams& hp = model_->hparams();
    for (int il = 0; il < hp.n_layer; ++il) info_.n_reference_layers += hp.IsMoeLayer(il) ? 1 : 0;
  }

  absl::Status Compute(int il, const models::Activations& h, const models::Routing& routing,
                       std::span<const uint8_t> expert_mask, models::Activations* out) override {
    return reference_.Compute(il, h, routing, expert_mask, out);
  }
  ShardBackendInfo Info() const override { return info_; }

 private:
  std::shared_ptr<const models::Deepseek2Model> model_;
  models::ReferenceExpertBackend reference_;
  ShardBackendInfo info_;
};

}  // namespace

uint64_t MappedExpertBytes(const models::Deepseek2Model& model, const HeldExperts& held) {
  const models::Deepseek2Hparams& hp = model.hparams();
  uint64_t bytes = 0;
  for (int il = 0; il < hp.n_layer && il < static_cast<int>(held.size()); ++il) {
    if (!hp.IsMoeLayer(il) || held[il].empty()) continue;
    const models::Deepseek2LayerWeights& w = model.weights().layers[il];
    for (const gguf::TensorInfo* t : {w.ffn_gate_exps, w.ffn_up_exps, w.ffn_down_exps}) {
      // Every expert's slab of a [.., .., n_expert] tensor has the same size.
      bytes += t->n_bytes / static_cast<uint64_t>(t->ne[2]) * held[il].size();
    }
  }
  return bytes;
}

ExpertBackendFactory MappedExpertBackendFactory(
    std::shared_ptr<const models::Deepseek2Model> model) {
  return
      [model](int,
              const HeldExperts& held) -> absl::StatusOr<std::shared_ptr<models::ExpertBackend>> {
        return std::make_shared<MappedExpertBackend>(model, held);
      };
}

absl::StatusOr<std::shared_ptr<ShardExperts>> ShardExperts::Create(
    int shard, std::string name, int n_expert, HeldExperts held,
    std::shared_ptr<models::ExpertBackend> backend) {
  if (backend == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("expert shard '", name, "' has no backend"));
  }
  if (n_expert < 0) {
    return absl::InvalidArgumentError(absl::StrCat("n_expert = ", n_expert, " is negative"));
  }
  std::shared_ptr<ShardExperts> experts(new ShardExperts());
  experts->held_mask_.resize(held.size());
  for (size_t il = 0; il < held.size(); ++il) {
    std::vector<uint8_t>& mask = experts->held_mask_[il];
    mask.assign(static_cast<size_t>(n_expert), 0);
    int previous = -1;
    for (int e : held[il]) {
      if (e < 0 || e >= n_expert) {
        return absl::InvalidArgumentError(absl::StrCat("expert shard '", name, "', layer ", il,
                                                       ": expert ", e, " is outside [0, ", n_expert,
                                                       ")"));
      }
      if (e <= previous) {
        return absl::InvalidArgumentError(absl::StrCat("expert shard '", name, "', layer ", il,
                                                       ": expert ids are not ascending at ", e));
      }
      previous = e;
      mask[e] = 1;
    }
  }
  experts->shard_ = shard;
  experts->name_ = std::move(name);
  experts->n_expert_ = n_expert;
  experts->held_ = std::move(held);
  experts->backend_ = std::move(backend);
  return experts;
}

bool ShardExperts::Holds(int il, int expert) const {
  return il >= 0 && il < n_layer() && expert >= 0 && expert < n_expert_ &&
         held_mask_[il][expert] != 0;
}

int64_t ShardExperts::n_held() const {
  int64_t n = 0;
  for (const std::vector<int>& layer : held_) n += static_cast<int64_t>(layer.size());
  return n;
}

ShardBackendInfo ShardExperts::info() const {
  if (const auto* described = dynamic_cast<const ShardExpertBackend*>(backend_.get())) {
    return described->Info();
  }
  ShardBackendInfo info;
  info.variant = "custom";
  return info;
}

absl::Status ShardExperts::Compute(int il, const models::Activations& h,
                                   const models::Routing& routing,
                                   std::span<const uint8_t> expert_mask,
                                   models::Activations* out) const {
  KTX_RETURN_IF_ERROR(CheckMask(il, expert_mask));
  return backend_->Compute(il, h, routing, expert_mask, out);
}

absl::Status ShardExperts::ComputeRows(int il, const models::Activations& h,
                                       std::span<const int32_t> rows,
                                       const models::Routing& routing,
                                       std::span<const uint8_t> expert_mask,
                                       models::Activations* out) const {
  KTX_RETURN_IF_ERROR(CheckMask(il, expert_mask));
  return backend_->ComputeRows(il, h, rows, routing, expert_mask, out);
}

absl::Status ShardExperts::CheckMask(int il, std::span<const uint8_t> expert_mask) const {
  if (il < 0 || il >= n_layer()) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert shard '", name_, "': layer ", il, " is outside [0, ", n_layer(), ")"));
  }
  if (static_cast<int64_t>(expert_mask.size()) != n_expert_) {
    return absl::InvalidArgumentError(absl::StrCat("expert shard '", name_, "': expert mask has ",
                                                   expert_mask.size(), " entries, expected ",
                                                   n_expert_));
  }
  for (int e = 0; e < n_expert_; ++e) {
    if (expert_mask[e] != 0 && held_mask_[il][e] == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "expert shard '", name_, "' (#", shard_, ") does not hold expert ", e, " of layer ", il));
    }
  }
  return absl::OkStatus();
}

std::shared_ptr<models::Activations> ShardExperts::OutputBuffer() const {
  std::lock_guard<std::mutex> lock(out_mu_);
  // use_count 1: only this member holds it, and nobody can take another
  // reference without this lock.
  if (out_buffer_ == nullptr || out_buffer_.use_count() != 1) {
    out_buffer_ = std::make_shared<models::Activations>();
  }
  return out_buffer_;
}

}  // namespace ktx::actors
