#include "actors/shard_experts.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace ktx::actors {
namespace {

// The reference expert path over the model's mapping; keeps the model alive.
class MappedExpertBackend final : public models::ExpertBackend {
 public:
  explicit MappedExpertBackend(std::shared_ptr<const models::Deepseek2Model> model)
      : model_(std::move(model)), reference_(model_->hparams(), model_->weights()) {}

  absl::Status Compute(int il, const models::Activations& h, const models::Routing& routing,
                       std::span<const uint8_t> expert_mask, models::Activations* out) override {
    return reference_.Compute(il, h, routing, expert_mask, out);
  }

 private:
  std::shared_ptr<const models::Deepseek2Model> model_;
  models::ReferenceExpertBackend reference_;
};

}  // namespace

ExpertBackendFactory MappedExpertBackendFactory(
    std::shared_ptr<const models::Deepseek2Model> model) {
  return
      [model](int, const HeldExperts&) -> absl::StatusOr<std::shared_ptr<models::ExpertBackend>> {
        return std::make_shared<MappedExpertBackend>(model);
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

absl::Status ShardExperts::Compute(int il, const models::Activations& h,
                                   const models::Routing& routing,
                                   std::span<const uint8_t> expert_mask,
                                   models::Activations* out) const {
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
  return backend_->Compute(il, h, routing, expert_mask, out);
}

}  // namespace ktx::actors
