// File: runtime/gpu/memory_plan.h
//
// What the GPU model path keeps in device memory, and whether it fits: the
// bf16 copies of every non-routed weight (attention, dense FFNs, shared
// experts, embedding, output head; F32 norms and router), the work buffers
// of one batch of up to `max_batch_tokens` tokens, fixed workspaces, and the
// paged bf16 latent KV cache, which gets what is left (or a requested
// number of tokens). Pure arithmetic over the hyper-parameters, so it is
// computed and tested without a GPU; CudaDeepseek2 allocates exactly these
// amounts.
//
//   KTX_ASSIGN_OR_RETURN(GpuMemoryPlan plan, PlanGpuMemory(hparams, options, free_bytes));
//   std::cout << plan.ToString();
//
// When the plan does not fit, the error (ResourceExhausted) carries the whole
// table and what to change. Thread-safety: plain data and pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/models/deepseek2.h"

namespace ktx::gpu {

// Routed experts computed on the GPU from weights streamed over PCIe
// (gpu_experts.h, docs/gpu.md "Routed experts on the GPU").
enum class GpuExpertMode {
  kOff,     // all routed experts on the CPU; nothing allocated for streaming
  kAuto,    // the cost model (expert_cost_model.h) splits large batches CPU/GPU
  kAllGpu,  // every routed expert of every batch on the GPU (measurement)
  kAllCpu,  // streaming set up (buffers, calibration) but every expert on the CPU
};

struct GpuExpertOptions {
  GpuExpertMode mode = GpuExpertMode::kAuto;
  // Device buffers of one expert's raw blocks (the copy ring), >= 2. The
  // next layer's prefetch runs at most this many experts ahead, and it copies
  // experts chosen before the layer's routing is known (by expected, uniform
  // counts: the lowest ids). 96 slots (2026-11-30) took the link's idle time
  // in a 2048-token prefill of the standard model from 3-12 to 1-5 ms, but the
  // prefill measured 2-5 % slower than with 32 in both comparisons on the H200
  // machine: the deeper prefetch fixes more of the GPU's share before the
  // routing (docs/performance.md). KTX_GPU_EXPERT_SLOTS=N in the environment
  // overrides it.
  int32_t n_slots = 32;
  // kAuto: batches of at least this many tokens split by the prefill model
  // below; smaller ones by the decode split's (or all on the CPU without it).
  // KTX_GPU_EXPERTS_MIN_TOKENS=N in the environment overrides it.
  int64_t min_batch_tokens = 256;
  bool prefetch = true;  // kAuto/kAllGpu: copy the next MoE layer's experts early
  // kAuto with prefetch: the next layer's GPU experts are chosen before its
  // routing is known (expected, uniform counts) so that their copies start
  // early. With replan_split, once the routing is known the copies not yet
  // started are dropped and the rest of the GPU's share is chosen again from
  // the actual counts with the CPU figures as corrected up to the previous
  // layer (the experts in flight stay on the GPU). false: the prefetched set
  // is the GPU's share. KTX_GPU_SPLIT_REPLAN=0|1 in the environment overrides it.
  bool replan_split = true;
  // kAuto with replan_split: after each split layer the GPU share's measured
  // time (from its planning to the stream passing its end) corrects the cost
  // model's copy rate (CorrectedCopyRate: damped, within a quarter of and
  // twice the calibrated rate), as the CPU side's measured time corrects the
  // CPU figures: during a split the CPU experts' reads share the host's memory
  // with the copy engine (the calibration, copies alone, overrates the link),
  // and the copies prefetched before the planning shorten the share (which
  // the model counts in full). false: the calibrated rate throughout.
  // KTX_GPU_SPLIT_LEARN_COPY=0|1 in the environment overrides it.
  bool learn_copy_rate = true;
  // kAuto with replan_split, in a split layer whose next layer is a MoE layer
  // (its prefetch queued behind the GPU's share): the split aims to finish
  // the GPU's share this fraction of its modelled time before the CPU's
  // (ExpertCostModel::gpu_lead). A GPU share that ends early costs little
  // (the copy engine goes on with the next layer's experts, which the next
  // split then counts as copied); one that ends late leaves the CPU idle. The
  // last MoE layer of a pass aims for both together. 0 by default: with the
  // learnt copy rate the GPU's share already ended before the CPU's in most
  // split layers, and 0.1 measured level with 0 on the standard model
  // (docs/performance.md, 2026-11-30). In [0, 1); KTX_GPU_SPLIT_LEAD=F in the
  // environment overrides it.
  double split_gpu_lead = 0;
  bool register_host_memory = true;  // page-lock the mapped file (false: pinned bounce copy)
  // The CPU expert backend's time for one expert with m tokens:
  // fixed + per_token * m. Defaults from the AMX tile path on the GPU machine's
  // 16 cores (moe_benchmark's crossing sweep: 165-210 ms for 256 DeepSeek-V3
  // experts at 1-64 tokens each); a split layer's measured CPU time corrects
  // them at run time (CudaDeepseek2). KTX_GPU_EXPERTS_CPU="fixed_ms,per_token_us".
  // The per-token figure was 2.8 us until 2026-11-27; the shard behind the
  // actors measured 137-219 ms for ~100 experts of ~64 tokens in a split
  // prefill of 2048 tokens on the H200 machine (docs/performance.md), about
  // 4x that: 12 us (prefill 2048: 1,868 -> 2,168-2,209 tok/s). Since the
  // tile path prefetches the weights it converts (2026-11-29: 107-202 ms for
  // the 256 experts at 1-64 tokens) these overestimate the CPU until the run
  // corrects them; lower starting figures (0.4-0.5 ms + 6-9 us) measured no
  // better on the standard model, so they stay (docs/performance.md,
  // "Streaming the converted weights").
  double cpu_expert_fixed_ms = 0.65;
  double cpu_expert_per_token_us = 12.0;
  // The same with tile caches on the CPU shards (moe_backend::CpuMoeBackendOptions
  // ::tile_cache: the tile path reads int8 copies instead of converting): the
  // engine starts from these when its shards build caches and the figures
  // above are unchanged. H200 machine, 2026-11-27 20:20 UTC, prefill 2048 of
  // the standard model with caches: 7,293 / 7,436 tok/s with 0.4 + 6 us against
  // 6,650 / 7,059 with 0.65 + 12 us (docs/performance.md, "Tile caches").
  static constexpr double kTileCacheCpuExpertFixedMs = 0.4;
  static constexpr double kTileCacheCpuExpertPerTokenUs = 6.0;
  // ExpertCostModel::split_serial_s_per_token (us): what a layer with CPU
  // experts cannot overlap: the next layer's attention and the hand-off,
  // ~20 ms per layer at 2048 tokens on the H200 machine since the CPU's part
  // starts before the GPU's share is enqueued (docs/performance.md; 25 us
  // until then, which made 2048-token prompts stream every expert).
  // KTX_GPU_SPLIT_SERIAL_US in the environment overrides it.
  double split_serial_us_per_token = 10.0;
  // kAuto, batches below min_batch_tokens (decode): the GPU streams a few of
  // the layer's used experts over PCIe (no prefetch: they are known only at
  // the routing) while the CPU reads the others from host memory; the copy
  // engine adds to what the cores alone read (H200 machine: the decode layer
  // 2.07 ms alone, 2.71 ms beside 47.6 GB/s of copies, i.e. 112 + 48 against
  // 86 + 48 GB/s in all). The decode model (DecodeCostModel): the CPU reads an
  // expert at decode_cpu_gbps, the GPU at the calibrated PCIe rate, and a
  // split must save more than decode_gpu_layer_fixed_us per layer, so small
  // experts (the test fixtures) never split. Unlike the prefill figures it is
  // not corrected at run time: the split then depends on the batch's routing
  // alone, not on timing. KTX_GPU_DECODE_SPLIT=0|1 and
  // KTX_GPU_DECODE_CPU_GBPS=N in the environment override them.
  bool decode_split = true;
  double decode_cpu_gbps = 100.0;
  double decode_gpu_layer_fixed_us = 50.0;
};

// Which forms of the non-routed weight matrices CudaDeepseek2 keeps on the
// device (docs/gpu.md, "Weight forms and the quantized GEMV"). The quantized
// form is the matrix's GGUF blocks as stored in the file, read by the GEMV
// (kernels/cuda/gemv.h) for batches of at most gemv_max_tokens tokens; the
// bf16 form is read by cuBLAS. Only matrices of a type the GEMV reads
// (CanQuantGemv: Q4_K, Q5_K, Q6_K, Q8_0, Q4_0, Q5_0, IQ4_XS, BF16, F16) get a
// quantized form: attention q_a, q_b (or q), kv_a_mqa, output, dense FFN
// gate/up/down, shared experts, output head. token_embd (a row lookup) and the
// per-head k_b / v_b stay bf16 in every form.
enum class GpuWeightForm {
  kAuto,       // kBf16 when it fits with at least one sequence of KV cache, else
               // kQuantized (the plan says which). Not kBoth: its q8 GEMV beats
               // cuBLAS at 1 token on the H200 (2026-11-27, docs/gpu.md: decode
               // +4 %), but a 1-token step then rounds differently from a larger
               // one, so a sequence's logits would depend on its batch; kBf16 is
               // batch invariant. kBoth stays for explicit use.
  kBf16,       // bf16 only: cuBLAS at every batch size (the form before the GEMV)
  kQuantized,  // blocks only: the GEMV at every batch size (prefill re-reads the
               // weights once per 8 tokens: slow; for GPUs too small for bf16)
  kBoth,       // bf16 + the Q4_K / Q6_K blocks: the GEMV up to gemv_max_tokens
               // tokens on those, cuBLAS above and on every other matrix
};

// "auto", "bf16", "quantized", "both".
const char* GpuWeightFormName(GpuWeightForm form);

struct CudaModelOptions {
  int device = 0;                  // CUDA device index
  int64_t max_batch_tokens = 512;  // tokens per forward call over all sequences (longer
                                   // single-sequence prompts run in chunks of this size)
  int32_t max_sequences = 64;      // sequences alive at once
  int64_t max_context = 0;         // tokens per sequence; 0: min(n_ctx_train, 32768)
  int32_t kv_page_size = 64;       // tokens per KV page
  int64_t kv_tokens = 0;           // KV cache size in tokens; 0: what fits, at most
                                   // max_sequences * max_context
  uint64_t reserve_bytes = uint64_t{512} << 20;  // left free for the CUDA context, cuBLAS, ...
  uint64_t attention_workspace_bytes = uint64_t{64} << 20;  // split-KV partial results
  uint64_t cublas_workspace_bytes = uint64_t{32} << 20;
  // The skinny bf16 product's split-k partial sums and counters
  // (kernels/cuda/skinny_gemm.h, SkinnyGemmWorkspaceBytes: 12.3 MiB for
  // DeepSeek-V3's dense down product on 132 SMs, the largest of its shapes).
  // A product whose plan needs more runs through cuBLAS.
  uint64_t skinny_workspace_bytes = uint64_t{16} << 20;
  uint64_t load_staging_bytes = uint64_t{64} << 20;  // raw GGUF rows on their way to bf16
  bool attention_tensor_cores = true;  // false: the CUDA-core MLA kernel (for comparison)
  // Weight forms (above) and the largest batch (tokens in one forward step)
  // that uses the quantized GEMV where a matrix has Q4_K / Q6_K blocks
  // (GpuLayerRunner::GemvBeatsCublasType); larger batches use cuBLAS on the bf16
  // form. Default 1: measured on the H200 (gemv_benchmark, 2026-11-27), the
  // q8 GEMV wins at 1 token and loses from 2 tokens on.
  // KTX_GPU_WEIGHTS=auto|bf16|quantized|both and KTX_GPU_GEMV_MAX_TOKENS=N in
  // the environment override these two.
  GpuWeightForm gpu_weights = GpuWeightForm::kAuto;
  int64_t gemv_max_tokens = 1;
  // bf16 products of batches of at most this many tokens (<= 64) run through
  // the skinny tensor-core kernel (kernels/cuda/skinny_gemm.h: weights
  // streamed once, a token's result independent of the batch it is in),
  // larger ones through cuBLAS. Default 1: measured on the H200
  // (docs/performance.md, 2026-11-27 07:56 UTC) it beats cuBLAS on the
  // small and batched products of a decode step at 1 token (kv_a 2.2x,
  // k_b / v_b 1.5x) and the layer step by ~2 %, but the step loses ~4 % at
  // 16 tokens. 64: every decode batch of up to 64 tokens takes the same
  // kernel (products batch invariant). 0: cuBLAS always.
  // KTX_GPU_SKINNY_MAX_TOKENS=N in the environment overrides it.
  int64_t skinny_max_tokens = 1;
  // A prompt chunk (one sequence's run of at least this many tokens in a
  // batch) takes the prompt-chunk attention (kernels/cuda/mla_prefill.h: the
  // scores and the context as two cuBLAS products over the sequence's latent
  // rows, in the FFN gate/up buffer) instead of the MLA kernel, which serves
  // one query per block. Default 16: measured on the H200 (docs/performance.md,
  // 2026-11-27 22:55 UTC) the two products win from 16 tokens (0.050 against
  // 0.084 ms after 1024 rows) to 2048 (3.5 against 8.2 ms); steps of up to
  // graph_max_tokens that replay CUDA graphs keep to the kernel. 0: never.
  // KTX_GPU_MLA_PREFILL_MIN_TOKENS=N in the environment overrides it.
  int64_t mla_prefill_min_tokens = 16;
  // q_a and kv_a_mqa (both reading the normed hidden state) as one product
  // over their bf16 rows stacked at load (GpuLayerWeights::attn_qkv_a).
  // false: two products (for comparison).
  bool stack_q_a_kv_a = true;
  // The largest token count of one resident hot expert (resident_experts), or
  // of a streamed one (a decode split), in one layer that runs as three GEMVs
  // on its blocks; more tokens:
  // dequantize to bf16 + two GEMMs. The alternative reads and writes ~6 bytes
  // per weight more than the blocks, so the GEMV pays longer than for bf16
  // matrices: measured on the H200 (gemv_benchmark "expert" rows, Q4_K
  // gate/up and Q6_K down of DeepSeek-V3 shape) the GEMV wins up to 16 tokens.
  // KTX_GPU_EXPERT_GEMV_MAX_TOKENS=N overrides; 0: never.
  int64_t expert_gemv_max_tokens = 16;
  // CUDA graphs (docs/gpu.md "CUDA graphs"): forward steps of at most
  // graph_max_tokens tokens that prefetch no routed experts (a decode split
  // streams after the routing, outside the graphs) replay each layer's
  // GPU part (attention, norm, dense FFN or routing + the copies to the host +
  // shared expert) as one graph per (layer, token count, context bucket);
  // the attention plan then sees the context rounded up to a power of two
  // (>= 256). graph_capacity bounds the graphs held (least recently used
  // evicted). KTX_CUDA_GRAPHS=on|off in the environment overrides cuda_graphs.
  bool cuda_graphs = true;
  int64_t graph_max_tokens = 16;
  int64_t graph_capacity = 2048;
  // Routed experts on the GPU for large batches; KTX_GPU_EXPERTS=off|auto|gpu|cpu
  // in the environment overrides experts.mode.
  GpuExpertOptions experts;
  // Hot routed experts kept resident in device memory (their raw GGUF blocks,
  // loaded once) and computed on the GPU at every batch size, whatever
  // experts.mode: resident_experts[il] = distinct expert ids of MoE layer il
  // (shorter than n_layer or empty: none). topology/gpu_hot_experts.h
  // chooses them from a usage profile and a byte budget.
  std::vector<std::vector<int32_t>> resident_experts;
};

// The device and pinned memory of the routed-expert streamer (gpu_experts.h)
// for batches of up to max_tokens tokens; GpuExpertStreamer allocates exactly
// these. slot_bytes: one expert's raw gate + up + down blocks, rounded up to
// 256 bytes.
struct ExpertStreamLayout {
  int64_t max_tokens = 0;
  int64_t n_embd = 0;
  int64_t n_ff = 0;  // n_ff_exp
  int32_t n_slots = 0;
  uint64_t slot_bytes = 0;
  int64_t w_gate_up = 0;  // bf16 [2 * n_ff, n_embd] dequantized gate rows, then up rows
  int64_t w_down = 0;     // bf16 [n_embd, n_ff]
  int64_t xg = 0;         // bf16 [T, n_embd] gathered rows of one expert's tokens
  int64_t gu = 0;         // F32 [T, 2 * n_ff]
  int64_t act = 0;        // bf16 [T, n_ff]
  int64_t y = 0;          // F32 [T, n_embd]
  int64_t entries = 0;    // T * n_expert_used: I32 rows and F32 weights (device + pinned)
  uint64_t cublas_workspace_bytes = uint64_t{32} << 20;  // the streamer's own cuBLAS handle

  static ExpertStreamLayout For(const models::Deepseek2Hparams& hp, int64_t max_tokens,
                                int32_t n_slots, uint64_t expert_raw_bytes);
  uint64_t device_bytes() const;  // slots + dequantized weights + work buffers
  uint64_t pinned_bytes() const;  // two sets of routing entries
};

// Element counts of the per-batch work buffers for `max_tokens` tokens (the
// dtype of each is in the comment); GpuLayerRunner allocates exactly these.
struct GpuWorkLayout {
  int64_t max_tokens = 0;
  int64_t ff_max = 0;          // widest SiLU-gated FFN (dense or shared experts)
  int64_t x = 0;               // F32 [T, n_embd] residual stream
  int64_t h_f32 = 0;           // F32 [T, n_embd] normed hidden state (router, CPU experts)
  int64_t h_bf16 = 0;          // bf16 [T, n_embd]
  int64_t qa = 0;              // F32 [T, q_lora + kv_lora + n_rot] (q_a, then kv_a when stacked)
  int64_t qa_bf16 = 0;         // bf16 [T, q_lora]
  int64_t q = 0;               // F32 [T, n_head * (qk_nope + n_rot)]
  int64_t q_nope = 0;          // bf16 [T, n_head * qk_nope]
  int64_t big_q = 0;           // F32 [T, n_head * (kv_lora + n_rot)] attention query
  int64_t kva = 0;             // F32 [T, kv_lora + n_rot]
  int64_t ctx = 0;             // bf16 [T, n_head * kv_lora]
  int64_t o = 0;               // bf16 [T, n_head * n_embd_head_v]
  int64_t gu = 0;              // F32 [T, 2 * ff_max]
  int64_t act = 0;             // bf16 [T, ff_max]
  int64_t router_logits = 0;   // F32 [T, n_expert]
  int64_t expert_ids = 0;      // I32 [T, n_expert_used]
  int64_t expert_weights = 0;  // F32 [T, n_expert_used]
  int64_t routed = 0;          // F32 [T, n_embd] routed experts' output from the CPU
  int64_t logits = 0;          // F32 [T, n_vocab]
  int64_t indices = 0;         // I32 [4, T]: tokens, positions, sequence slots, head rows

  static GpuWorkLayout For(const models::Deepseek2Hparams& hp, int64_t max_tokens);
  uint64_t device_bytes() const;
  // Pinned host staging: indices, h, routed, ids, weights, logits.
  uint64_t pinned_bytes() const;
};

// The non-routed matrices that can have a quantized form (CanQuantGemv
// types; see GpuWeightForm): their GGUF bytes as stored on the device (each
// matrix padded to 256 bytes) and their bytes in bf16. Computed by
// CudaDeepseek2 from the model's tensor types.
struct QuantizableWeights {
  uint64_t block_bytes = 0;  // every matrix the GEMV reads (kQuantized keeps these)
  uint64_t bf16_bytes = 0;
  int64_t n_matrices = 0;
  // Those whose blocks beat cuBLAS on the bf16 copy (Q4_K / Q6_K only,
  // GpuLayerRunner::GemvBeatsCublasType): kBoth keeps only these; with none,
  // kBoth is kBf16.
  uint64_t both_block_bytes = 0;
  int64_t both_matrices = 0;
};

struct GpuMemoryPlan {
  // Weights on the GPU (bf16 matrices, F32 vectors and router).
  uint64_t attention_bytes = 0;      // all layers: norms, q, kv_a, k_b, v_b, output
  uint64_t dense_ffn_bytes = 0;      // the leading dense layers' FFNs
  uint64_t shared_expert_bytes = 0;  // MoE layers' shared experts
  uint64_t router_bytes = 0;         // F32 routers and selection biases
  uint64_t embedding_bytes = 0;      // token_embd in bf16
  uint64_t head_bytes = 0;           // output_norm + output (the norm only when tied)
  // The weight form in use (never kAuto) and its effect: the quantized
  // matrices' blocks (kBoth, kQuantized) and the bf16 bytes not kept
  // (kQuantized: the quantizable matrices' bf16 copies).
  GpuWeightForm weight_form = GpuWeightForm::kBf16;
  GpuWeightForm weight_form_requested = GpuWeightForm::kBf16;
  int64_t quantized_matrices = 0;
  uint64_t quantized_weight_bytes = 0;
  uint64_t bf16_dropped_bytes = 0;
  // Work memory.
  uint64_t activation_bytes = 0;     // GpuWorkLayout::device_bytes()
  uint64_t workspace_bytes = 0;      // attention + cuBLAS workspaces + load staging
  uint64_t pinned_host_bytes = 0;    // host side, not device memory
  uint64_t expert_stream_bytes = 0;  // routed-expert streaming (ExpertStreamLayout), 0 if off
  int32_t expert_stream_slots = 0;   // its slot count (ExpertStreamSlots), 0 if off
  // Hot routed experts resident on the device (raw blocks; CudaModelOptions::
  // resident_experts): their count and bytes.
  int64_t resident_experts = 0;
  uint64_t resident_expert_bytes = 0;
  // Paged latent KV cache, bf16.
  int32_t kv_page_size = 0;
  int64_t kv_pages = 0;
  int64_t kv_tokens = 0;            // kv_pages * kv_page_size
  uint64_t kv_bytes_per_token = 0;  // n_layer * (kv_lora + n_rot) * 2
  uint64_t kv_bytes = 0;
  int64_t max_context = 0;
  int64_t max_batch_tokens = 0;
  int32_t max_sequences = 0;
  // The device.
  uint64_t free_bytes = 0;
  uint64_t reserve_bytes = 0;

  uint64_t weight_bytes() const {
    return attention_bytes + dense_ffn_bytes + shared_expert_bytes + router_bytes +
           embedding_bytes + head_bytes + quantized_weight_bytes - bf16_dropped_bytes;
  }
  uint64_t total_bytes() const {
    return weight_bytes() + activation_bytes + workspace_bytes + expert_stream_bytes +
           resident_expert_bytes + kv_bytes;
  }
  // A table, one item per line, sizes in GiB/MiB.
  std::string ToString() const;
};

// Plans the GPU memory for `hp` on a device with `free_bytes` free;
// `output_tied`: the head reuses the embedding (no `output.weight`).
// InvalidArgument for bad options; ResourceExhausted (with the table and
// advice) when the weights and buffers, plus one sequence of max_context
// tokens of KV cache, do not fit, or when options.kv_tokens does not.
// `expert_raw_bytes`: one routed expert's gate + up + down blocks in the file;
// with options.experts.mode != kOff and a MoE layer, the streamer's
// ExpertStreamLayout is planned too (expert_stream_bytes).
// `resident_expert_bytes`: the raw blocks of options.resident_experts (each
// expert's slot layout, ExpertLayerTensors::ExpertSlotBytes); with any
// resident expert the streamer's buffers are planned even when
// experts.mode = kOff (2 slots then: the resident experts need its compute
// buffers, not its copy ring).
// `quantizable`: the matrices that can have a quantized form; options.
// gpu_weights is resolved against it (kAuto: kBoth if that fits, else kBf16,
// else kQuantized; no quantizable matrix: kBf16) into weight_form.
absl::StatusOr<GpuMemoryPlan> PlanGpuMemory(const models::Deepseek2Hparams& hp,
                                            const CudaModelOptions& options, uint64_t free_bytes,
                                            bool output_tied = false, uint64_t expert_raw_bytes = 0,
                                            uint64_t resident_expert_bytes = 0,
                                            const QuantizableWeights& quantizable = {});

// The streamer's slot count for these options: experts.n_slots when
// streaming (mode != kOff), 2 when only resident experts use it, 0 when
// nothing does (GpuMemoryPlan::expert_stream_slots: the same, 0 where the
// model has nothing to stream).
int32_t ExpertStreamSlots(const CudaModelOptions& options);

// Experts in options.resident_experts.
int64_t CountResidentExperts(const CudaModelOptions& options);

// For CPU shards with tile caches: the kTileCache* starting figures of the
// split's CPU cost, where `experts` still has the default ones (figures the
// caller chose stay).
void UseTileCacheCpuCosts(GpuExpertOptions* experts);

}  // namespace ktx::gpu
