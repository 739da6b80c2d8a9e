// File: runtime/gpu/gpu_experts.h
//
// Routed experts of MoE layers computed on the GPU from weights that stay in
// host memory (the mapped GGUF file) and are streamed over PCIe per batch: the
// large-batch prefill path of issue 7 (docs/gpu.md, "Routed experts on the
// GPU"). For one layer, a set of experts, the batch's bf16 hidden state on the
// device and the routing, the streamer
//   * copies each expert's raw gate / up / down blocks into one of n_slots
//     device slots on its own copy stream (only experts with >= 1 token,
//     unless they were prefetched before the routing was known),
//   * on the compute stream waits for that copy (event), dequantizes the
//     blocks to bf16 (kernels/cuda/dequant.h), releases the slot (event),
//     gathers the expert's tokens, runs gate/up (one GEMM), SiLU gate, down,
//     and adds weight * output into an F32 accumulator at the tokens' rows
//     (experts with few tokens, resident or streamed: three quantized GEMVs
//     on their blocks instead of dequantize + GEMMs, config.gemv_max_tokens;
//     a streamed expert's slot is then released after the GEMVs),
// with no host synchronisation inside the layer: copies of later experts
// (and, through Prefetch, of the next layer's experts) run while earlier ones
// are multiplied. Experts are processed one at a time in the given order on
// one stream, so the sums are bitwise reproducible.
//
// Host memory: the expert tensors of every MoE layer are page-locked once at
// creation (cudaHostRegister, read-only, over the mapped file ranges) so that
// copies run at full PCIe speed straight from the mapping. When that fails (or
// register_host_memory is off), each expert is first copied by a host callback
// on the copy stream into one pinned bounce buffer, then to the device:
// slower (a host memcpy per expert), said in the log (host_memory()).
//
//   KTX_ASSIGN_OR_RETURN(auto s, GpuExpertStreamer::Create(config, layers, stream));
//   s->Prefetch(il, gpu_experts);           // optional, before the routing is known
//   s->Compute(il, gpu_experts, routing, h_bf16, n_embd, x, n_embd);  // x += experts(h)
//
// Owns: the slots, dequantized-weight and work buffers (ExpertStreamLayout,
// counted in the GPU memory plan), a copy stream, events, a cuBLAS handle on
// the compute stream (borrowed), the host-memory registrations and a pinned
// bounce buffer when used. Borrows the mapped tensors, which must outlive it.
// Not thread-safe: one caller at a time, and the compute stream's other users
// must order their work with it (same stream).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/tensor_type.h"
#include "runtime/gpu/cuda_buffers.h"
#include "runtime/gpu/expert_cost_model.h"
#include "runtime/gpu/memory_plan.h"
#include "runtime/models/deepseek2.h"
#include "runtime/models/moe.h"

namespace ktx::gpu {

// One MoE layer's routed expert tensors in host memory, GGUF block layout:
// expert e's gate rows (n_ff rows of n_embd) start at gate + e * n_ff *
// gate_row_bytes, its up rows likewise, its down rows (n_embd rows of n_ff)
// at down + e * n_embd * down_row_bytes. A layer with gate == nullptr has no
// routed experts (dense).
struct ExpertLayerTensors {
  const uint8_t* gate = nullptr;
  const uint8_t* up = nullptr;
  const uint8_t* down = nullptr;
  kernels::TensorType gate_type = kernels::TensorType::kF32;
  kernels::TensorType up_type = kernels::TensorType::kF32;
  kernels::TensorType down_type = kernels::TensorType::kF32;
  int64_t gate_row_bytes = 0;
  int64_t up_row_bytes = 0;
  int64_t down_row_bytes = 0;

  bool present() const { return gate != nullptr; }
  // One expert's raw bytes, each part rounded up to 256 (its layout in a slot).
  uint64_t ExpertSlotBytes(int64_t n_embd, int64_t n_ff) const;
};

// The layers of a Deepseek2 model (dense layers absent). InvalidArgument
// naming the tensor when an expert tensor's type cannot be dequantized on the
// GPU or its shape is not {n_embd, n_ff_exp, n_expert} / {n_ff_exp, n_embd, n_expert}.
absl::StatusOr<std::vector<ExpertLayerTensors>> ExpertTensorsOf(
    const models::Deepseek2Hparams& hp, const models::Deepseek2Weights& weights);

struct GpuExpertStreamerConfig {
  int64_t n_embd = 0;
  int64_t n_ff = 0;  // n_ff_exp
  int32_t n_expert = 0;
  int32_t n_expert_used = 0;
  int64_t max_tokens = 0;  // batch size bound (work buffers)
  int32_t n_slots = 32;    // >= 2
  bool register_host_memory = true;
  // An expert (resident, or streamed into a slot) with at most this many
  // tokens runs as three quantized GEMVs straight from its blocks
  // (kernels/cuda/gemv.h) instead of dequantize + GEMMs, when the GEMV reads
  // its types (0: never).
  int64_t gemv_max_tokens = 0;
};

enum class HostMemoryMode { kRegistered, kBounce };

class GpuExpertStreamer {
 public:
  // `layers`: indexed by layer (absent entries for dense layers). Allocates
  // ExpertStreamLayout::For(..) on the current device, page-locks the expert
  // tensors (or sets up the bounce path), creates the copy stream and events.
  static absl::StatusOr<std::unique_ptr<GpuExpertStreamer>> Create(
      const GpuExpertStreamerConfig& config, std::vector<ExpertLayerTensors> layers,
      cudaStream_t compute_stream);
  ~GpuExpertStreamer();
  GpuExpertStreamer(const GpuExpertStreamer&) = delete;
  GpuExpertStreamer& operator=(const GpuExpertStreamer&) = delete;

  const ExpertStreamLayout& layout() const { return layout_; }
  HostMemoryMode host_memory() const { return host_memory_; }
  const std::string& host_memory_note() const { return host_memory_note_; }
  // The largest expert of any layer (raw bytes, slot layout), for the cost model.
  uint64_t expert_bytes() const { return layout_.slot_bytes; }
  ExpertShape shape() const { return {config_.n_embd, config_.n_ff, layout_.slot_bytes}; }

  // Measures, blocking (both streams synchronised), the H2D rate of expert
  // copies, the bf16 GEMM rate at expert shape and the fixed GPU time per
  // expert, into the GPU fields of `model` (pcie_bytes_per_s, gpu_flops_per_s,
  // gpu_expert_fixed_s). Uses the first MoE layer's first experts; must not
  // run while copies are planned.
  absl::Status Calibrate(ExpertCostModel* model);

  // Plans the copies of layer il's `experts` (in this order) and starts as
  // many as free slots allow; the rest start as Compute frees slots. The next
  // Compute must be for layer il with these experts first.
  absl::Status Prefetch(int il, std::span<const int32_t> experts);

  // Enqueues on the compute stream: for every routing entry (t, k) whose
  // expert is in `experts` (distinct ids),
  //   acc[t, :] += weight(t, k) * expert(h[t, :])
  // Resident experts of the list (LoadResident) run first, in list order,
  // from device memory; the others are streamed (the rules below apply to
  // them alone, in list order).
  // h: bf16 [routing.n_tokens, h_stride] (device); acc: F32 [n_tokens,
  // acc_stride] (device). Experts with no token are not copied (unless
  // prefetched) and not computed. Returns once everything is enqueued; the
  // host-side routing may be reused then. FailedPrecondition when copies of
  // another layer, or other experts, are planned first.
  absl::Status Compute(int il, std::span<const int32_t> experts, const models::Routing& routing,
                       const __nv_bfloat16* h, int64_t h_stride, float* acc, int64_t acc_stride);

  // ---- hot experts resident in device memory ----
  // Copies the raw blocks of experts[il] (distinct ids of MoE layers;
  // experts.size() <= n_layer) into one device buffer, once (through a pinned
  // buffer, blocking); replaces an earlier set. From then on Compute runs
  // those experts from device memory: no copy, no slot. InvalidArgument
  // naming the layer for a dense layer, an id out of range or twice.
  absl::Status LoadResident(std::span<const std::vector<int32_t>> experts);
  bool IsResident(int il, int32_t expert) const {
    return il >= 0 && il < static_cast<int>(resident_offset_.size()) &&
           !resident_offset_[il].empty() && resident_offset_[il][expert] >= 0;
  }
  // Layer il's resident experts, ascending.
  std::span<const int32_t> ResidentExperts(int il) const {
    if (il < 0 || il >= static_cast<int>(resident_ids_.size())) return {};
    return resident_ids_[il];
  }
  int64_t n_resident() const { return n_resident_; }
  // GpuExpertStreamerConfig::gemv_max_tokens, changeable between calls.
  void set_gemv_max_tokens(int64_t n) { config_.gemv_max_tokens = n; }
  int64_t gemv_max_tokens() const { return config_.gemv_max_tokens; }
  uint64_t resident_bytes() const { return resident_.bytes(); }

  // Drops the planned copies of layer il that have not started (no free slot
  // yet: the tail of a Prefetch longer than the slots) and returns the experts
  // still planned, in order: those whose copies are in flight, which the next
  // Compute must list first. Lets the caller choose the rest of the layer's
  // GPU experts once the routing is known.
  std::vector<int32_t> DropUnissued(int il);
  // Of layer il's copies in flight (DropUnissued's order, the copy order),
  // how many have finished (their slot's copy event has completed; a query,
  // no wait).
  int64_t CopiesFinished(int il) const;
  // Drops planned copies and waits for both streams (after an error, or to
  // cancel a prefetch).
  absl::Status Reset();
  bool idle() const { return queue_.empty(); }

  // ---- the copy timeline (diagnostics) ----
  // While on, every expert copy records three events on the copy stream:
  // before its wait for the slot (the stream reaches it when the previous
  // copy has ended, or when the host issued this one, whichever is later),
  // after that wait, and after the copy. TakeCopyTimeline() then sums, over the
  // copies since the last call (waiting for them), the link's busy time, the
  // gaps where nothing was issued yet, and those where a copy waited for a
  // free slot (the compute stream had not dequantized its previous expert),
  // and restarts. KTX_GPU_STAGE_TIMES=1 turns it on (CudaDeepseek2).
  void set_copy_timeline(bool on) { copy_timeline_ = on; }
  struct CopyTimeline {
    int64_t copies = 0;
    uint64_t bytes = 0;
    double busy_ms = 0;        // Σ copy durations (after the slot wait to the end)
    double not_issued_ms = 0;  // Σ from a copy's end to the next one's issue
    double slot_wait_ms = 0;   // Σ waits for a free slot
    double span_ms = 0;        // first copy's issue to the last copy's end
    cudaEvent_t first = nullptr, last = nullptr;  // valid until the next call
  };
  absl::StatusOr<CopyTimeline> TakeCopyTimeline();

  struct Stats {
    int64_t experts_copied = 0;
    uint64_t bytes_copied = 0;
    int64_t experts_computed = 0;  // streamed and resident
    int64_t tokens_computed = 0;   // routing entries computed, streamed and resident
    int64_t resident_experts_computed = 0;
    int64_t resident_tokens_computed = 0;
    int64_t resident_gemv_experts = 0;  // of those, computed by the quantized GEMV
    int64_t streamed_gemv_experts = 0;  // streamed experts computed by the GEMV from their slot
  };
  const Stats& stats() const { return stats_; }

 private:
  struct Pending {
    int il = 0;
    int32_t expert = 0;
    int slot = -1;  // -1: not issued yet
  };

  GpuExpertStreamer() = default;
  absl::Status RegisterHostMemory();
  absl::Status CheckExperts(int il, std::span<const int32_t> experts) const;
  // Issues planned copies into free slots, in queue order.
  absl::Status Issue();
  absl::Status CopyExpert(int il, int32_t expert, int slot);
  // Dequantizes slot's expert into w_gate_up_ / w_down_ on the compute stream.
  absl::Status Dequantize(int il, int slot);
  // The same from raw blocks in the slot layout at `src` (device).
  absl::Status DequantizeFrom(int il, const uint8_t* src);
  // The FFN of m gathered tokens (rows/weights: device, m entries) into acc.
  absl::Status RunExpert(int64_t m, const int32_t* rows, const float* weights,
                         const __nv_bfloat16* h, int64_t h_stride, float* acc, int64_t acc_stride);
  // The same straight from raw blocks in the slot layout at `src` (device)
  // with the quantized GEMV (GemvReads(il) must hold).
  absl::Status RunExpertGemv(int il, const uint8_t* src, int64_t m, const int32_t* rows,
                             const float* weights, const __nv_bfloat16* h, int64_t h_stride,
                             float* acc, int64_t acc_stride);
  // The GEMV reads layer il's expert types and shapes.
  bool GemvReads(int il) const;

  GpuExpertStreamerConfig config_;
  ExpertStreamLayout layout_;
  std::vector<ExpertLayerTensors> layers_;
  cudaStream_t compute_ = nullptr;  // borrowed
  cudaStream_t copy_ = nullptr;     // owned
  cublasHandle_t cublas_ = nullptr;
  HostMemoryMode host_memory_ = HostMemoryMode::kBounce;
  std::string host_memory_note_;
  std::vector<void*> registered_;  // page-aligned starts passed to cudaHostRegister
  DeviceBuffer slots_;             // raw blocks [n_slots][slot_bytes]
  DeviceBuffer w_gate_up_;         // bf16 [2 * n_ff, n_embd]
  DeviceBuffer w_down_;            // bf16 [n_embd, n_ff]
  DeviceBuffer xg_;                // bf16 [T, n_embd]
  DeviceBuffer gu_;                // F32 [T, 2 * n_ff]
  DeviceBuffer act_;               // bf16 [T, n_ff]
  DeviceBuffer y_;                 // F32 [T, n_embd]
  DeviceBuffer entries_;           // I32 rows [T * K], then F32 weights [T * K]
  DeviceBuffer cublas_workspace_;
  PinnedBuffer pinned_entries_[2];  // host staging of entries_, alternating per Compute
  cudaEvent_t entries_done_[2] = {nullptr, nullptr};
  int entries_parity_ = 0;
  PinnedBuffer bounce_;              // one expert's raw blocks (kBounce only)
  std::vector<cudaEvent_t> copied_;  // per slot: its copy finished (copy stream)
  std::vector<cudaEvent_t> freed_;   // per slot: its blocks were dequantized (compute stream)
  // Released slots, oldest release first: a copy takes the slot whose
  // dequantization was queued earliest (most likely done), so the copy
  // stream does not wait for the compute stream's latest work. (Taking the
  // latest, as before 2026-11-27, made the next layer's first copy wait for
  // the end of this layer's GPU experts: with a deep ring the link idled
  // ~30 ms per layer.)
  std::deque<int> free_slots_;
  std::deque<Pending> queue_;  // planned copies in order; issued ones first
  // The copy timeline: events [3 per copy] (pre-wait, post-wait, end) of the
  // copies recorded since the last TakeCopyTimeline; bytes of each copy.
  bool copy_timeline_ = false;
  std::vector<cudaEvent_t> timeline_events_;  // a pool, grown as needed
  size_t timeline_used_ = 0;                  // events in use (3 per copy)
  std::vector<uint64_t> timeline_bytes_;
  DeviceBuffer resident_;  // raw blocks of the resident experts, slot layout each
  std::vector<std::vector<int64_t>> resident_offset_;  // [n_layer][n_expert] byte offset or -1
  std::vector<std::vector<int32_t>> resident_ids_;     // [n_layer] ascending resident ids
  int64_t n_resident_ = 0;
  Stats stats_;
};

}  // namespace ktx::gpu
