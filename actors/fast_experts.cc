#include "actors/fast_experts.h"

#include <numa.h>

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "actors/cpu_arena.h"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"
#include "runtime/cpu_pool/cpu_pool.h"
#include "topology/cpu_list.h"

namespace ktx::actors {
namespace {

// A shard's pool and the CpuMoeBackend on it; keeps the model alive.
class FastShardBackend final : public ShardExpertBackend {
 public:
  static absl::StatusOr<std::shared_ptr<FastShardBackend>> Create(
      std::shared_ptr<const models::Deepseek2Model> model, const FastShardSpec& spec,
      const HeldExperts& held, moe_backend::CpuMoeBackendOptions options) {
    const models::Deepseek2Hparams& hp = model->hparams();
    auto b = std::shared_ptr<FastShardBackend>(new FastShardBackend());
    b->model_ = std::move(model);

    // The pool's cpus: the shard's, restricted to what this process may use.
    const std::vector<int> allowed = AllowedCpus();
    std::vector<int> cpus;
    for (int c : spec.cpus) {
      if (std::find(allowed.begin(), allowed.end(), c) != allowed.end()) cpus.push_back(c);
    }
    bool pin = !cpus.empty();
    if (cpus.size() != spec.cpus.size()) {
      KTX_LOG(WARNING, "actors") << "expert shard '" << spec.name << "': cpus "
                                 << topology::FormatIdRanges(spec.cpus)
                                 << " are not all in this process's affinity mask; its kernels run "
                                 << (pin ? "on " + topology::FormatIdRanges(cpus)
                                         : std::string("unpinned on every cpu"));
    }
    if (cpus.empty()) cpus = allowed;
    std::sort(cpus.begin(), cpus.end());
    cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());

    int node = spec.numa_node;
    if (node < 0 && numa_available() >= 0) node = numa_node_of_cpu(cpus.front());
    if (numa_available() >= 0) {
      std::set<int> nodes;
      for (int c : cpus) nodes.insert(numa_node_of_cpu(c));
      if (nodes.size() > 1 || (node >= 0 && *nodes.begin() != node)) {
        KTX_LOG(WARNING, "actors")
            << "expert shard '" << spec.name << "': cpus " << topology::FormatIdRanges(cpus)
            << " are on NUMA node(s) " << topology::FormatIdRanges({nodes.begin(), nodes.end()})
            << ", its experts on node " << node << ": remote memory for some of them";
      }
    }
    runtime::CpuPool::Options po;
    po.cpus = cpus;
    po.numa_node = node;
    po.pin = pin;
    KTX_ASSIGN_OR_RETURN(b->pool_, runtime::CpuPool::Create(po));

    KTX_ASSIGN_OR_RETURN(options.owned_experts, moe_backend::OwnedExpertMasks(held, hp.n_expert));
    options.owned_experts.resize(static_cast<size_t>(hp.n_layer));
    options.progress = moe_backend::ProgressMode::kOff;
    KTX_ASSIGN_OR_RETURN(b->backend_,
                         moe_backend::CpuMoeBackend::Create(*b->model_, b->pool_.get(), options));

    const moe_backend::CpuMoeLoadStats& ls = b->backend_->load_stats();
    ShardBackendInfo& info = b->info_;
    info.variant = ls.variant;
    info.bytes_held = ls.repacked_bytes;
    info.copies = ls.repacked_bytes > 0;
    info.numa_node = ls.repacked_bytes > 0 ? ls.numa_node : -1;
    info.cpus = cpus;
    info.pinned = pin;
    info.n_fast_layers = ls.n_fast_layers;
    info.n_reference_layers = ls.n_reference_layers;
    info.decode_layout = ls.decode_layout;
    info.prefill_form = ls.prefill_form;
    info.tile_cache_bytes = ls.tile_cache_bytes;
    info.bytes_held += ls.tile_cache_bytes;
    info.workspace_bytes = ls.workspace_bytes;
    if (ls.decode_layout == "gguf") {
      // The decode form reads the mapping: its bytes are views, not copies.
      info.bytes_held += MappedExpertBytes(*b->model_, held);
    }
    return b;
  }

  absl::Status Compute(int il, const models::Activations& h, const models::Routing& routing,
                       std::span<const uint8_t> expert_mask, models::Activations* out) override {
    return backend_->Compute(il, h, routing, expert_mask, out);
  }
  absl::Status ComputeRows(int il, const models::Activations& h, std::span<const int32_t> rows,
                           const models::Routing& routing, std::span<const uint8_t> expert_mask,
                           models::Activations* out) override {
    return backend_->ComputeRows(il, h, rows, routing, expert_mask, out);  // rows read in place
  }
  ShardBackendInfo Info() const override {
    ShardBackendInfo info = info_;
    const moe_backend::CpuMoeRunStats stats = backend_->run_stats();
    info.kernel_runs = stats.runs;
    info.kernel_weight_bytes = stats.weight_bytes;
    return info;
  }
  moe_backend::CpuMoeBackend* backend() { return backend_.get(); }

 private:
  FastShardBackend() = default;

  std::shared_ptr<const models::Deepseek2Model> model_;
  std::unique_ptr<runtime::CpuPool> pool_;               // destroyed after the backend
  std::unique_ptr<moe_backend::CpuMoeBackend> backend_;  // uses pool_ and the model
  ShardBackendInfo info_;
};

}  // namespace

ExpertBackendFactory FastExpertBackendFactory(std::shared_ptr<const models::Deepseek2Model> model,
                                              std::vector<FastShardSpec> specs,
                                              moe_backend::CpuMoeBackendOptions options) {
  return [model = std::move(model), specs = std::move(specs), options](
             int shard,
             const HeldExperts& held) -> absl::StatusOr<std::shared_ptr<models::ExpertBackend>> {
    if (shard < 0 || shard >= static_cast<int>(specs.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat("fast experts: shard ", shard, " outside [0, ", specs.size(), ")"));
    }
    absl::StatusOr<std::shared_ptr<FastShardBackend>> backend =
        FastShardBackend::Create(model, specs[shard], held, options);
    if (!backend.ok()) {
      return absl::Status(backend.status().code(),
                          absl::StrCat("fast experts: ", backend.status().message()));
    }
    return std::shared_ptr<models::ExpertBackend>(std::move(*backend));
  };
}

moe_backend::CpuMoeBackend* FastBackendOf(models::ExpertBackend* backend) {
  auto* fast = dynamic_cast<FastShardBackend*>(backend);
  return fast != nullptr ? fast->backend() : nullptr;
}

}  // namespace ktx::actors
