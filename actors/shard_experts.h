// File: actors/shard_experts.h
//
// What one expert shard holds: per MoE layer the routed experts the placement
// plan gave it, and the ExpertBackend that computes them. The shard actor
// (expert_shard_actor.h) owns one ShardExperts through a shared_ptr that its
// in-flight pool jobs also hold; the backend comes from a factory: the fast
// CPU kernels over NUMA-local repacked copies of the held experts
// (FastExpertBackendFactory, actors/fast_experts.h, the Engine's default) or
// the reference path over the model's mmapped weights
// (MappedExpertBackendFactory below):
//
//   ExpertBackendFactory factory = MappedExpertBackendFactory(model);
//   KTX_ASSIGN_OR_RETURN(std::shared_ptr<models::ExpertBackend> backend, factory(s, held));
//   KTX_ASSIGN_OR_RETURN(auto experts, ShardExperts::Create(s, "shard0", n_expert, held, backend));
//   KTX_RETURN_IF_ERROR(experts->Compute(il, h, routing, mask, &partial));
//
// Thread-safety: immutable after Create except for the backend, which is
// called one Compute at a time (the shard's arena runs one job at a time),
// and the recycled output buffer (OutputBuffer, under its own mutex).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/models/activations.h"
#include "runtime/models/deepseek2.h"
#include "runtime/models/moe.h"

namespace ktx::actors {

// held[il] = ascending expert ids of layer il that a shard holds ([n_layer];
// empty for dense layers and for layers where it holds nothing).
using HeldExperts = std::vector<std::vector<int>>;

// What a shard's expert backend holds and where it computes (Engine::Describe,
// ktx-node, tests).
struct ShardBackendInfo {
  // "reference" (the scalar path over the mapping), or the CPU kernel variant
  // of the fast backend ("scalar", "avx2", "avx512", "amx").
  std::string variant;
  // Bytes of expert weights the backend computes from: its own repacked
  // copies for the fast backend (copies = true, on numa_node), the GGUF bytes
  // of the held experts in the model's mapping for the reference one (copies
  // = false: shared page cache, not owned).
  uint64_t bytes_held = 0;
  bool copies = false;
  int numa_node = -1;            // node of the copies; -1: plain memory or none
  std::vector<int> cpus;         // cpus of the backend's own pool (empty: the shard's arena)
  bool pinned = false;           // the pool's workers are pinned to those cpus
  int n_fast_layers = 0;         // MoE layers on the kernels
  int n_reference_layers = 0;    // MoE layers on the reference path
  std::string decode_layout;     // fast backend: "panel16" / "gguf"
  bool prefill_form = false;     // fast backend: the AMX tile prefill path is on
  uint64_t workspace_bytes = 0;  // kernel workspace (fast backend)
  // Fast backend: the bytes of its tile caches (0: none), included in bytes_held.
  uint64_t tile_cache_bytes = 0;
  // Kernel runs so far and the expert weight bytes they read (fast backend;
  // moe_backend::CpuMoeRunStats).
  int64_t kernel_runs = 0;
  int64_t kernel_weight_bytes = 0;
};

// An ExpertBackend that describes itself (ShardExperts::info()). The
// factories of ktx_actors make these; a factory may also return a plain
// models::ExpertBackend (then info() says "custom").
class ShardExpertBackend : public models::ExpertBackend {
 public:
  virtual ShardBackendInfo Info() const = 0;
};

// Makes the backend of shard `shard` for the experts it holds. The backend
// must compute (at least) every held expert; Compute is only ever asked for
// held ones.
using ExpertBackendFactory = std::function<absl::StatusOr<std::shared_ptr<models::ExpertBackend>>(
    int shard, const HeldExperts& held)>;

// The reference factory: the model's reference expert path over its mmapped
// weights (no copies; ShardBackendInfo::bytes_held = MappedExpertBytes). The
// backend keeps `model` alive.
ExpertBackendFactory MappedExpertBackendFactory(
    std::shared_ptr<const models::Deepseek2Model> model);

// GGUF bytes (gate + up + down slabs) of the experts in `held`.
uint64_t MappedExpertBytes(const models::Deepseek2Model& model, const HeldExperts& held);

class ShardExperts {
 public:
  // InvalidArgument (naming the shard and layer) for an expert id outside
  // [0, n_expert), a list not ascending, or a null backend.
  static absl::StatusOr<std::shared_ptr<ShardExperts>> Create(
      int shard, std::string name, int n_expert, HeldExperts held,
      std::shared_ptr<models::ExpertBackend> backend);

  int shard() const { return shard_; }
  const std::string& name() const { return name_; }
  int n_layer() const { return static_cast<int>(held_.size()); }
  const HeldExperts& held() const { return held_; }
  bool Holds(int il, int expert) const;
  // Experts held over all layers.
  int64_t n_held() const;
  // The backend's description (variant "custom" for a backend that is not a
  // ShardExpertBackend).
  ShardBackendInfo info() const;
  const std::shared_ptr<models::ExpertBackend>& backend() const { return backend_; }

  // out[t] = Σ over entries of token t whose expert is in `expert_mask` of
  // weight · expert(h[t]) (see models::ExpertBackend): F32 [n_tokens, n_embd].
  // FailedPrecondition naming the shard, the layer and the expert when the
  // mask selects an expert this shard does not hold; InvalidArgument for a
  // mask that is not n_expert long.
  absl::Status Compute(int il, const models::Activations& h, const models::Routing& routing,
                       std::span<const uint8_t> expert_mask, models::Activations* out) const;
  // The same for rows of h: token j of `routing` is row rows[j] (see
  // models::ExpertBackend::ComputeRows; the fast backend reads them in place).
  absl::Status ComputeRows(int il, const models::Activations& h, std::span<const int32_t> rows,
                           const models::Routing& routing, std::span<const uint8_t> expert_mask,
                           models::Activations* out) const;

  // A buffer for the next partial output (RunExpertWork): the previous one
  // again once nobody else holds it (its pages stay mapped: a 2048-token
  // partial of DeepSeek-V3 is 58 MB, whose first touch cost tens of ms per
  // MoE layer on a VM), else a new one. Thread-safe.
  std::shared_ptr<models::Activations> OutputBuffer() const;

 private:
  ShardExperts() = default;
  // The layer and mask checks of Compute.
  absl::Status CheckMask(int il, std::span<const uint8_t> expert_mask) const;

  int shard_ = 0;
  std::string name_;
  int n_expert_ = 0;
  HeldExperts held_;
  std::vector<std::vector<uint8_t>> held_mask_;  // [n_layer][n_expert]
  std::shared_ptr<models::ExpertBackend> backend_;
  mutable std::mutex out_mu_;
  mutable std::shared_ptr<models::Activations> out_buffer_;  // guarded by out_mu_
};

}  // namespace ktx::actors
