// File: runtime/gpu/cuda_deepseek2.h
//
// The non-expert part of a `deepseek2` model (DeepSeek-V2/V3, Kimi-K2) on one
// CUDA GPU, with the routed experts computed by the model's ExpertBackend on
// the CPU. Built from a loaded Deepseek2Model (hyper-parameters, weight views,
// expert backend), it owns:
//   * bf16 copies of every non-routed weight, dequantized ON the GPU from the
//     GGUF blocks (kernels/cuda/dequant.h), and/or the blocks themselves for
//     the quantized GEMV of small batches (CudaModelOptions::gpu_weights),
//     F32 norms and routers;
//   * a paged bf16 latent KV cache (kv_lora + n_rot per token per layer),
//     sized by a memory plan (memory_plan.h) against the device's free memory;
//   * pinned host staging buffers, a stream and a cuBLAS handle (GpuLayerRunner).
//
// Forward / ForwardBatch have the semantics of Deepseek2Model::Forward for one
// or several sequences at once: the batch's tokens are appended to their
// sequences (positions length, length + 1, ...), rows are committed only on
// success. In each MoE layer the routing and the normed hidden state go to the
// host, the CPU computes the routed experts (Deepseek2Model::RoutedExperts,
// i.e. the model's expert backend) while the GPU computes the shared expert,
// and the GPU waits for the CPU's result only at the residual add.
//
//   KTX_ASSIGN_OR_RETURN(auto model, models::Deepseek2Model::Open(path));
//   KTX_ASSIGN_OR_RETURN(auto gpu, gpu::CudaDeepseek2::Create(*model, {}));
//   KTX_ASSIGN_OR_RETURN(gpu::SequenceId seq, gpu->AddSequence(4096));
//   models::Activations logits;  // F32 [n_out, n_vocab]
//   KTX_RETURN_IF_ERROR(gpu->Forward(prompt, seq, models::LogitsRows::kLast, &logits));
//
// The stage methods (Embed, AttentionBlock, FfnNorm, DenseFfn, Route,
// SharedExperts, Head) mirror Deepseek2Model's stages with host activations
// in and out (a copy each way), for stage-by-stage runtimes and tests.
//
// Numerics: bf16 weights and bf16 activations into every matrix product
// (F32 accumulation), bf16 KV cache, F32 elsewhere: llama.cpp-like "tier B"
// accuracy (docs/gpu.md gives the measured errors).
//
// Thread-safety: none; one caller at a time (one stream, shared buffers). The
// model must outlive this object; its expert backend is called from the
// calling thread. (One member, gpu_share_done_ns_, is written by a host
// function on a CUDA thread: an atomic.)
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/gpu/cuda_buffers.h"
#include "runtime/gpu/cuda_graphs.h"
#include "runtime/gpu/expert_cost_model.h"
#include "runtime/gpu/gpu_experts.h"
#include "runtime/gpu/gpu_layer.h"
#include "runtime/gpu/memory_plan.h"
#include "runtime/gpu/paged_kv.h"
#include "runtime/models/activations.h"
#include "runtime/models/deepseek2.h"
#include "runtime/models/moe.h"
#include "runtime/models/routing_policy.h"

namespace ktx::gpu {

using SequenceId = int32_t;

class CudaDeepseek2 {
 public:
  // Plans GPU memory (FailedPrecondition without a usable device;
  // ResourceExhausted with the plan when it does not fit), uploads and
  // dequantizes the weights, allocates the KV cache.
  static absl::StatusOr<std::unique_ptr<CudaDeepseek2>> Create(const models::Deepseek2Model& model,
                                                               const CudaModelOptions& options);
  ~CudaDeepseek2();
  CudaDeepseek2(const CudaDeepseek2&) = delete;
  CudaDeepseek2& operator=(const CudaDeepseek2&) = delete;

  const GpuMemoryPlan& memory_plan() const { return plan_; }
  // The KV cache's pages and sequences (capacity, length, free pages); read
  // it only between calls that change them.
  const PagedKvAllocator& kv_allocator() const { return *kv_; }
  const models::Deepseek2Model& model() const { return model_; }

  // ---- weight forms and the quantized GEMV (docs/gpu.md) ----
  // memory_plan().weight_form: which forms of the non-routed matrices are on
  // the device. Batches of at most gemv_max_tokens() tokens use the quantized
  // GEMV where a matrix has GGUF blocks; larger ones cuBLAS on the bf16
  // copies. SetGemvMaxTokens changes the threshold between calls (0: the GEMV
  // only where no bf16 copy exists); SetExpertGemvMaxTokens the one of the
  // resident hot experts and of streamed ones (CudaModelOptions::
  // expert_gemv_max_tokens).
  GpuWeightForm weight_form() const { return plan_.weight_form; }
  int64_t gemv_max_tokens() const { return runner_->gemv_max_tokens(); }
  void SetGemvMaxTokens(int64_t n);
  void SetExpertGemvMaxTokens(int64_t n);
  // Matrix products run so far by the GEMV and by cuBLAS (non-routed weights).
  int64_t gemv_products() const { return runner_->gemv_calls(); }
  int64_t cublas_products() const { return runner_->cublas_calls(); }
  int64_t skinny_products() const { return runner_->skinny_calls(); }
  // Layer attentions of prompt chunks run by the two-product form
  // (CudaModelOptions::mla_prefill_min_tokens).
  int64_t mla_prefill_calls() const { return runner_->mla_prefill_calls(); }
  // Products on the bf16 form, either path.
  int64_t bf16_products() const { return cublas_products() + skinny_products(); }

  // ---- CUDA graphs (CudaModelOptions::cuda_graphs; docs/gpu.md) ----
  // Whether a forward step of n_tokens tokens replays its layers as graphs.
  bool UsesGraphs(int64_t n_tokens) const;
  // The context bound the attention plan sees in graph mode: max_kv_len
  // rounded up to a power of two, at least 256.
  static int64_t GraphKvBucket(int64_t max_kv_len);
  // Eager runs, captures, replays, failures, evictions (zeros when off).
  CudaGraphCache::Stats graph_stats() const;

  // ---- routed experts on the GPU (large batches; docs/gpu.md) ----
  // The mode in use (options.experts.mode or KTX_GPU_EXPERTS; kOff when the
  // experts cannot be streamed). Switching to kAuto/kAllGpu/kAllCpu needs a
  // streamer (FailedPrecondition when the model was created with kOff).
  GpuExpertMode expert_mode() const { return expert_mode_; }
  absl::Status SetExpertMode(GpuExpertMode mode);
  // Calibrated GPU rates and the CPU figures; null streamer when off and no
  // expert is resident.
  const ExpertCostModel& expert_cost_model() const { return expert_cost_; }
  // The copy rate measured at creation (bytes/s), and how many times a split
  // layer's measured GPU share has corrected the model's rate since
  // (GpuExpertOptions::learn_copy_rate).
  double calibrated_copy_rate() const { return calibrated_pcie_; }
  int64_t copy_rate_corrections() const { return copy_rate_corrections_; }
  // The decode split's model (GpuExpertOptions::decode_split; fixed at
  // creation) and whether a batch of n tokens splits by it.
  const ExpertCostModel& decode_cost_model() const { return decode_cost_; }
  bool DecodeSplits(int64_t n_tokens) const;
  // KTX_GPU_STAGE_TIMES=1 was set at creation (stage lines are logged).
  bool stage_times() const { return stage_times_; }
  const GpuExpertStreamer* expert_streamer() const { return experts_.get(); }

  // ---- hot routed experts resident on the GPU ----
  // CudaModelOptions::resident_experts, loaded once at Create (their raw
  // blocks: memory_plan().resident_expert_bytes). In every MoE layer of every
  // batch (decode too, whatever the mode) the GPU computes the entries of
  // these experts (dequantize + GEMMs + the deterministic scatter-add of the
  // streamer, without the copy); streaming picks among the other experts;
  // the CPU gets the rest (kNoExpert-compacted routing). Each routing entry
  // is computed exactly once.
  int64_t resident_experts() const { return experts_ ? experts_->n_resident() : 0; }
  std::span<const int32_t> ResidentExperts(int il) const {
    return experts_ ? experts_->ResidentExperts(il) : std::span<const int32_t>();
  }

  // ---- sequences (paged GPU KV cache) ----
  absl::StatusOr<SequenceId> AddSequence(int64_t capacity_tokens);
  absl::Status FreeSequence(SequenceId seq);
  absl::StatusOr<int64_t> SequenceLength(SequenceId seq) const;
  // Rollback to the first n_keep tokens.
  absl::Status Truncate(SequenceId seq, int64_t n_keep);
  // Commits n_new rows written by AttentionBlock stage calls (Forward commits itself).
  absl::Status Commit(SequenceId seq, int64_t n_new);

  // ---- whole forward pass ----
  struct BatchEntry {
    SequenceId seq = -1;
    std::span<const int32_t> tokens;
    models::LogitsRows rows = models::LogitsRows::kLast;
  };
  // Optional callbacks of ForwardBatch (the actor runtime's GPU attention
  // actor, actors/gpu_attention_actor.h, sends the routed experts to its
  // expert shards through them).
  struct ForwardHooks {
    // Adjusts the routing of MoE layer il on the host right after the GPU's
    // full top-k was downloaded (routing [n, K] in the router's selection
    // order), BEFORE the routed experts are split between the GPU (resident
    // and streamed experts) and the CPU: e.g. per-slice routing policies
    // (routing_policy.h ApplyRoutingPolicies). It may reweight entries, turn
    // them into kNoExpert (weight 0) and narrow n_expert_used; ids must stay
    // in [0, n_expert) or be kNoExpert. Both sides then use the adjusted
    // routing, so the result does not depend on the split. An error fails
    // the batch. Unset: the model's routing policy (Deepseek2Model::
    // routing_policy(), its top-k part) when it has one, else nothing (its
    // deferral part: split_deferred).
    std::function<absl::Status(int il, models::Routing* routing)> adjust_routing;
    // Computes the routed experts of MoE layer il instead of the model's
    // ExpertBackend: h F32 [n, n_embd] (FFN-normed), routing [n, K'] (after
    // adjust_routing; with experts on the GPU only the CPU's entries, rows
    // compacted and padded with kNoExpert) -> routed F32 [n, n_embd] (resized
    // by the hook). Not called when the GPU computes every entry. Called on the calling
    // thread once h and the routing are on the host, while the shared expert
    // is already enqueued on the GPU stream (they overlap). An error fails
    // the whole batch. Unset: Deepseek2Model::RoutedExperts.
    std::function<absl::Status(int il, const models::Activations& h, const models::Routing& routing,
                               models::Activations* routed)>
        routed_experts;
    // Optional asynchronous form of routed_experts (used when both are set):
    // start_routed_experts hands the CPU's part of MoE layer il over (h: F32
    // [n, n_embd], the model's pinned download of the layer's hidden state,
    // not copied on the host before; neither h nor routing is read after it
    // returns) and returns at once; finish_routed_experts waits for it and writes it, F32
    // [n, n_embd], straight into `routed`: the model's pinned host buffer
    // that the residual add reads (no host copy of the batch in between:
    // 58.7 MB per MoE layer at 2048 DeepSeek-V3 tokens). The GPU path starts
    // the CPU's part before it enqueues the GPU's share of the layer (the
    // launches and copies of ~180 experts take milliseconds of host time) and
    // finishes it after the next layer's prefetch. Each start is followed by
    // exactly one finish for the same layer before the next start, unless the
    // batch fails in between (then finish is not called).
    std::function<absl::Status(int il, const float* h, int64_t n, int64_t n_embd,
                               const models::Routing& routing)>
        start_routed_experts;
    std::function<absl::Status(int il, float* routed, int64_t n, int64_t n_embd)>
        finish_routed_experts;
    // false: on success no entry is committed; the caller commits the ones it
    // keeps with Commit(seq, tokens.size()) (the rows stay reserved, so an
    // uncommitted entry is simply overwritten by its next batch).
    bool commit = true;

    // Expert deferral (routing_policy.h: a layer's lowest-weight experts run
    // one layer late, overlapped with the next layer, and join its residual
    // stream right after its attention or with its MoE output).
    // split_deferred: right after adjust_routing at MoE layer il, moves the
    // deferred entries out of *routing into late[DeferJoin] (all n rows each,
    // rows without deferral all kNoExpert; as models::SplitDeferredRows, which
    // moves nothing on the last layer) and returns the counts. Unset: the
    // model's policy, when it defers, by SplitDeferredRows. Deferred entries of
    // experts resident on the GPU run on the GPU at once (into a buffer added
    // at the join); the rest go to send_deferred.
    std::function<absl::StatusOr<models::DeferredCount>(int il, models::Routing* routing,
                                                        models::Routing late[2])>
        split_deferred;
    // Starts the CPU's part of layer il's deferred entries for `join` (rows of
    // the batch, h F32 [n, n_embd] FFN-normed: valid only during the call, copy
    // what outlives it) and returns at once; join_deferred(il, join) then waits
    // for it and returns F32 [n, n_embd] (resized by the hook). Both or
    // neither; unset: computed at once by the model's ExpertBackend and kept.
    std::function<absl::Status(int il, models::DeferJoin join, const models::Activations& h,
                               const models::Routing& late)>
        send_deferred;
    std::function<absl::Status(int il, models::DeferJoin join, models::Activations* late)>
        join_deferred;
  };

  // Appends each entry's tokens to its sequence (distinct sequences, at most
  // max_batch_tokens tokens together). logits: F32 [n_out, n_vocab], the
  // entries' rows in entry order. On error no sequence changes length.
  absl::Status ForwardBatch(std::span<const BatchEntry> entries, models::Activations* logits);
  absl::Status ForwardBatch(std::span<const BatchEntry> entries, models::Activations* logits,
                            const ForwardHooks& hooks);
  // One sequence, any number of tokens (chunks of max_batch_tokens: chunked
  // prefill); same semantics as Deepseek2Model::Forward.
  absl::Status Forward(std::span<const int32_t> tokens, SequenceId seq, models::LogitsRows rows,
                       models::Activations* logits);

  // ---- stages, host activations in and out (see Deepseek2Model) ----
  absl::Status Embed(std::span<const int32_t> tokens, models::Activations* x);
  // positions must continue the sequence (length, length + 1, ...); rows are
  // written, not committed.
  absl::Status AttentionBlock(int il, SequenceId seq, std::span<const int32_t> positions,
                              models::Activations* x);
  absl::Status FfnNorm(int il, const models::Activations& x, models::Activations* h);
  absl::Status DenseFfn(int il, const models::Activations& h, models::Activations* out);
  absl::Status Route(int il, const models::Activations& h, models::Routing* routing);
  absl::Status SharedExperts(int il, const models::Activations& h, models::Activations* out);
  absl::Status Head(const models::Activations& x, models::LogitsRows rows,
                    models::Activations* logits);

 private:
  explicit CudaDeepseek2(const models::Deepseek2Model& model) : model_(model) {}
  absl::Status Load(const CudaModelOptions& options, uint64_t free_bytes);
  absl::Status UploadMatrix(const gguf::TensorInfo& t, Bf16* dst, const char* what);
  // The GGUF blocks of `a` (and `b` stacked under it: one buffer when both
  // have the same type and row size, else two parts) into m->blocks.
  absl::Status UploadBlocks(const gguf::TensorInfo* a, const gguf::TensorInfo* b, GpuMatrix* m,
                            const char* what);
  absl::StatusOr<const float*> UploadVector(const gguf::TensorInfo& t, const char* what);
  absl::StatusOr<Bf16*> AllocBf16(int64_t n, const char* what);
  kernels::cuda::MlaPagedKv LayerKv(int il) const;
  absl::Status CheckLayer(int il) const;
  absl::Status CheckRows(const models::Activations& a, const char* what) const;
  // Mirrors the block table rows of `seqs` to the device (stream order).
  absl::Status UploadBlockTable(std::span<const SequenceId> seqs);
  absl::Status Upload(const void* host, void* device, size_t bytes);
  absl::Status Download(const void* device, void* host, size_t bytes);
  absl::Status Sync(const char* what);
  // The layers of a batch already embedded in runner_->x(); routed experts via
  // hooks.routed_experts, else the model.
  absl::Status RunLayers(const GpuBatchView& batch, const ForwardHooks& hooks);
  absl::Status RunHead(std::span<const int32_t> rows, models::Activations* logits);
  // hooks.adjust_routing (or the model's policy) on layer il's full routing,
  // then checks its shape and ids.
  absl::Status AdjustRouting(int il, const ForwardHooks& hooks, models::Routing* routing) const;
  // Expert deferral within one RunLayers pass (see ForwardHooks): what MoE
  // layer il deferred to one join point, on the GPU (late_gpu_[join]) and/or
  // on the CPU (send_deferred, or late_host_[join][il % 2] without hooks).
  struct LateJoin {
    int il = -1;  // the deferring layer; -1: nothing pending
    bool gpu = false;
    bool cpu = false;
  };
  // Moves layer il's deferred entries out of *routing (hooks.split_deferred
  // or the model's policy) into late[join]; *any: whether an entry moved.
  absl::Status SplitDeferred(int il, const ForwardHooks& hooks, models::Routing* routing,
                             models::Routing late[2], bool* any) const;
  // Starts layer il's deferred entries: those of resident experts on the GPU
  // into late_gpu_[join] (stream order: after every earlier use of it), the
  // rest through hooks.send_deferred (or computed at once); fills made[join].
  absl::Status StartDeferred(int il, const ForwardHooks& hooks, const models::Activations& h,
                             const models::Routing late[2], LateJoin made[2]);
  // x[0, n) += the GPU's part of `late` (stream order); clears late.gpu.
  absl::Status JoinDeferredGpu(LateJoin* late, models::DeferJoin join, int64_t n);
  // Waits for the CPU's part of `late` and adds it to x (stream order);
  // clears late.cpu and, with both parts joined, late.il.
  absl::Status JoinDeferredCpu(LateJoin* late, models::DeferJoin join, int64_t n,
                               const ForwardHooks& hooks);
  absl::Status EnsureLateBuffers(bool gpu_part);

  const models::Deepseek2Model& model_;
  models::Deepseek2Hparams hp_;
  GpuMemoryPlan plan_;
  std::unique_ptr<GpuLayerRunner> runner_;
  std::vector<DeviceBuffer> weight_buffers_;  // every weight allocation
  std::vector<GpuLayerWeights> layers_;       // [n_layer] views into weight_buffers_
  const Bf16* token_embd_ = nullptr;          // bf16 [n_vocab, n_embd]
  GpuMatrix output_;                          // [n_vocab, n_embd] bf16 and/or blocks
  const float* output_norm_ = nullptr;        // F32 [n_embd]
  DeviceBuffer staging_;                      // raw GGUF rows during Load
  PinnedBuffer load_pinned_;                  // the same rows on the host, during Load
  DeviceBuffer kv_pages_;                     // bf16 [n_layer][n_pages][page_size][kv_lora + n_rot]
  DeviceBuffer block_table_;                  // I32 [max_sequences][max_pages_per_sequence]
  PinnedBuffer pinned_table_;                 // host mirror of block_table_
  PinnedBuffer pinned_indices_;               // I32 [4, T]
  PinnedBuffer pinned_h_;                     // F32 [T, n_embd]
  PinnedBuffer pinned_routed_;                // F32 [T, n_embd]
  PinnedBuffer pinned_ids_;                   // I32 [T, n_expert_used]
  PinnedBuffer pinned_weights_;               // F32 [T, n_expert_used]
  PinnedBuffer pinned_logits_;                // F32 [T, n_vocab]
  models::Activations host_h_;                // F32 [n, n_embd] h of the MoE layer in flight
  models::Activations host_routed_;           // F32 [n, n_embd] its routed experts' sum
  // Expert deferral, allocated at its first use: the GPU's part of a layer's
  // deferred experts per join (F32 [T, n_embd] each, device), the staging of
  // the CPU's part (F32 [T, n_embd], pinned; uploaded into runner_->routed()),
  // and, without deferral hooks, the CPU's part computed at once per join.
  DeviceBuffer late_gpu_[2];
  PinnedBuffer pinned_late_;
  cudaEvent_t late_uploaded_ = nullptr;  // pinned_late_ may be rewritten
  models::Activations late_host_[2][2];  // [join][il % 2]
  cudaEvent_t routed_ready_ = nullptr;   // h and routing are on the host
  std::unique_ptr<PagedKvAllocator> kv_;
  std::unique_ptr<CudaGraphCache> graphs_;  // null: CUDA graphs off
  // KTX_GPU_STAGE_TIMES=1: CUDA events on the stream after each stage of the
  // non-graphed layers; each forward pass logs the summed time per stage.
  enum class StageMark {
    kStart,
    kAttention,
    kDenseFfn,
    kRoute,
    kShared,
    kExpertsWait,
    kRoutedUpload,
    kRoutedAdd,
    kHead
  };
  void MarkStage(StageMark m);
  void ReportStages();
  bool stage_times_ = false;
  // How the residual add gets the CPU experts' sum (pinned host memory): by a
  // copy on the stream, or read straight from host memory by the add kernel
  // (SM loads over PCIe), which does not queue behind the expert streaming's
  // copies. Auto (the default): read directly while experts stream (large
  // batches), copy otherwise. KTX_GPU_ROUTED_ZERO_COPY=1 / 0: always / never.
  enum class RoutedRead { kAuto, kAlways, kNever };
  RoutedRead routed_read_ = RoutedRead::kAuto;
  // With stage_times_: recorded after a split layer's GPU experts, to log
  // whether the GPU or the CPU side finished last (created on first use).
  cudaEvent_t split_probe_ = nullptr;
  std::vector<cudaEvent_t> stage_events_;
  std::vector<StageMark> stage_marks_;
  size_t stage_n_ = 0;
  int64_t stage_tokens_ = 0;
  int64_t graph_max_tokens_ = 0;
  // Routed experts on the GPU: set up by SetUpGpuExperts; the GPU's share of
  // MoE layer il for a batch of n tokens comes from GpuExpertsFor.
  absl::Status SetUpGpuExperts(const CudaModelOptions& options);
  bool StreamsExperts(int64_t n_tokens) const;
  // Scales the cost model's CPU figures by ratio^0.7 (measured / modelled CPU
  // time of a split layer), within [1/4, 8] x the configured figures.
  void CorrectCpuCost(double ratio);
  // GpuExpertOptions::learn_copy_rate: a split layer's GPU share, planned at
  // host time gpu_share_t0_ns_ (steady clock) with modelled time
  // gpu_share_modelled_s_ (0: none pending), is followed on the stream by a
  // host function (MarkGpuShareDone, on a CUDA thread) that stores the time
  // the stream passed its end in gpu_share_done_ns_; LearnCopyRate, called
  // when the next split is planned, corrects expert_cost_'s copy rate from
  // them (CorrectedCopyRate against calibrated_pcie_).
  static void CUDART_CB MarkGpuShareDone(void* self);
  void LearnCopyRate();
  double calibrated_pcie_ = 0;  // bytes/s, Calibrate's
  int64_t gpu_share_t0_ns_ = 0;
  double gpu_share_modelled_s_ = 0;
  std::atomic<int64_t> gpu_share_done_ns_{0};
  int64_t copy_rate_corrections_ = 0;
  // DecodeSplits: kAuto with experts.decode_split and a batch below
  // min_batch_tokens; the decode model then chooses the GPU's experts at the
  // routing.
  const ExpertCostModel& CostModelFor(int64_t n_tokens) const;
  std::vector<int32_t> GpuExpertsFor(int64_t n_tokens, std::span<const int64_t> counts) const;
  GpuExpertMode expert_mode_ = GpuExpertMode::kOff;
  bool streaming_ready_ = false;  // the streamer is calibrated: modes other than kOff allowed
  GpuExpertOptions expert_options_;
  ExpertCostModel expert_cost_;  // prefill batches (>= min_batch_tokens), all-GPU
  ExpertCostModel decode_cost_;  // decode batches (DecodeCostModel of the calibrated rates; fixed)
  std::unique_ptr<GpuExpertStreamer> experts_;  // null when off
};

}  // namespace ktx::gpu
