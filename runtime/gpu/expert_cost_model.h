// File: runtime/gpu/expert_cost_model.h
//
// Which routed experts of a MoE layer the GPU should take for a batch, so
// that the GPU (streaming each expert's raw blocks over PCIe, then
// dequantizing and multiplying) and the CPU expert backend (the rest) finish
// together. Plain data and pure functions, built and tested without a GPU.
//
// Model, for an expert with m tokens:
//   CPU time   = cpu_fixed_s + cpu_per_token_s * m          (backend, measured outside)
//   GPU copy   = expert_bytes / pcie_bytes_per_s            (copy stream)
//   GPU compute= gpu_expert_fixed_s + 6 m n_embd n_ff / gpu_flops_per_s  (compute stream)
// A set S on the GPU costs max(Σ copy, Σ compute) plus the pipeline's fill
// (gpu_fill_s; by default one expert's copy, before which nothing computes;
// the decode model sets it to one expert's compute, the tail after the last
// copy, since its sets are copy-bound); the CPU costs Σ over the other experts with m > 0. The GPU
// saves most on the experts with the most tokens (its cost hardly depends on
// m), so S is a prefix of the experts sorted by m (descending, ties: lower
// id): the prefix that minimises max(GPU, CPU), the smaller one on ties, and
// none when the batch is below min_batch_tokens or no prefix beats the CPU
// alone by gpu_layer_fixed_s. A layer that leaves any expert to the CPU also
// pays split_serial_s_per_token * n_tokens: the work that cannot overlap the
// CPU's (the routed sum's copy and add, the next layer's attention, the
// hand-off), which a layer with every expert on the GPU pipelines behind the
// streaming (measured on the H200: ~20 ms per layer at 2048 tokens, i.e.
// ~10 us per token, since the CPU's part starts before the GPU's share is
// enqueued; ~25 us before that, docs/performance.md).
//
//   ExpertCostModel m = ...;  // Calibrate on the GPU, CPU figures from outside
//   ExpertSplit s = PlanExpertSplit(m, tokens_per_expert, shape, n_tokens);
//   // s.gpu_experts: ids for the GPU, in the order to stream them
//
// Thread-safety: plain data; the functions are pure.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "runtime/models/moe.h"

namespace ktx::gpu {

struct ExpertCostModel {
  double pcie_bytes_per_s = 0;        // pinned host -> device copy rate (measured)
  double gpu_flops_per_s = 0;         // bf16 GEMM rate at expert shape (measured)
  double gpu_expert_fixed_s = 0;      // per expert on the GPU: dequantize + launches (measured)
  double gpu_layer_fixed_s = 0.5e-3;  // per layer: routing lists, launches; a split must save more
  double gpu_fill_s = -1;             // per GPU set: the pipeline's fill (< 0: one expert's copy)
  double cpu_fixed_s = 0;             // CPU time of an expert: fixed + per token * m
  double cpu_per_token_s = 0;
  int64_t min_batch_tokens = 0;         // below: all experts on the CPU
  double split_serial_s_per_token = 0;  // see above (0: a split overlaps everything)
  // How far ahead of the CPU the split aims to finish the GPU's share, as a
  // fraction of the GPU's modelled time: the prefix minimises
  // max((1 + gpu_lead) * GPU, CPU) (0: both together). Worth it where the
  // copy engine has the next MoE layer's prefetch queued behind the share:
  // a GPU that finishes first keeps copying, a CPU that finishes first idles
  // until the GPU's share and the next layer's attention are done. The
  // reported gpu_s / cpu_s stay the unbiased model's. In [0, 1).
  double gpu_lead = 0;

  // InvalidArgument-like text when a rate is not positive or a time negative; "" if valid.
  std::string Validate() const;
};

// The layer's expert geometry.
struct ExpertShape {
  int64_t n_embd = 0;
  int64_t n_ff = 0;           // n_ff_exp
  uint64_t expert_bytes = 0;  // one expert's raw gate + up + down blocks
};

struct ExpertSplit {
  std::vector<int32_t> gpu_experts;  // ids, by descending token count (ties: lower id)
  int64_t gpu_tokens = 0;            // Σ m over gpu_experts
  double gpu_s = 0;                  // modelled GPU time of gpu_experts
  double cpu_s = 0;                  // modelled CPU time of the others
  double all_cpu_s = 0;              // modelled CPU time of every expert
  double serial_s = 0;               // the split's serial part (0 without CPU experts)
  double time_s() const { return (gpu_s > cpu_s ? gpu_s : cpu_s) + serial_s; }
};

// Modelled times of single experts with m tokens.
double CpuExpertSeconds(const ExpertCostModel& model, int64_t m);
double GpuCopySeconds(const ExpertCostModel& model, const ExpertShape& shape);
double GpuComputeSeconds(const ExpertCostModel& model, const ExpertShape& shape, int64_t m);
// The fill a GPU set pays once (gpu_fill_s, or one expert's copy).
double GpuFillSeconds(const ExpertCostModel& model, const ExpertShape& shape);

// tokens_per_expert: I64 [n_expert], token count of each expert in the batch
// (actual after routing, or expected before it). n_tokens: the batch size.
// on_gpu_already: experts the GPU takes in any case (their copies are in
// flight: chosen before the routing was known); they come first in
// gpu_experts, count in the GPU's time (copied even without tokens) and not
// in the CPU's, and the prefix is chosen among the others. With some, the
// split is kept even when it saves less than gpu_layer_fixed_s, and below
// min_batch_tokens they are the whole GPU share. n_copied_already: how many of
// on_gpu_already (the first ones: copies finish in order) have finished their
// copy: they cost no copy time, and with any the set pays no fill (the GPU
// computes them while the next copies run).
ExpertSplit PlanExpertSplit(const ExpertCostModel& model,
                            std::span<const int64_t> tokens_per_expert, const ExpertShape& shape,
                            int64_t n_tokens, std::span<const int32_t> on_gpu_already = {},
                            int64_t n_copied_already = 0);

// The copy rate learnt from a split layer whose GPU share took `measured_s`
// (host time from its planning to the stream passing its end) against the
// `modelled_s` the split planned at `rate` (the share's copies set its time
// at prefill): rate * (modelled / measured)^0.7, damped as the CPU figures'
// correction, within [calibrated / 4, 2 calibrated]. An effective rate: during
// a split the CPU experts' reads share the host's memory with the copy engine
// and the link gives less than its calibration (copies alone), while the
// copies prefetched before the planning (which the model counts in full)
// shorten the share; on the H200 machine (2026-11-30) shares took 0.7x to
// 1.1x their modelled time, machine by machine. `rate` unchanged for
// non-positive or non-finite inputs.
double CorrectedCopyRate(double rate, double calibrated, double measured_s, double modelled_s);

// The model for decode-sized batches (below the prefill model's
// min_batch_tokens), where the CPU's experts are bound by host memory
// bandwidth: the GPU rates of `calibrated`; CPU time of an expert =
// expert_bytes / cpu_bytes_per_s (its weights read once) plus a sixteenth of
// that per token (the decode kernels stay bandwidth-bound for a few tokens per
// expert); the fill is one expert's compute at one token (the sets are
// copy-bound: the tail after the last copy); layer_fixed_s per split layer; no
// batch threshold and no serial part (every option hands the CPU its part).
ExpertCostModel DecodeCostModel(const ExpertCostModel& calibrated, const ExpertShape& shape,
                                double cpu_bytes_per_s, double layer_fixed_s);

// Every expert with m > 0 on the GPU (forced all-GPU), with the modelled times.
ExpertSplit AllExpertsOnGpu(const ExpertCostModel& model,
                            std::span<const int64_t> tokens_per_expert, const ExpertShape& shape);

// Expected token counts before routing: n_tokens * n_expert_used spread evenly
// over n_expert experts (the remainder to the lower ids).
std::vector<int64_t> UniformTokensPerExpert(int64_t n_tokens, int32_t n_expert_used,
                                            int32_t n_expert);

// The smallest batch size (uniform routing, powers of two up to max_tokens,
// then refined by bisection) from which PlanExpertSplit gives the GPU at
// least one expert; max_tokens + 1 when none.
int64_t BreakEvenTokens(const ExpertCostModel& model, const ExpertShape& shape,
                        int32_t n_expert_used, int32_t n_expert, int64_t max_tokens);

// One line: rates and per-expert times, for logs and the benchmark.
std::string DescribeCostModel(const ExpertCostModel& model, const ExpertShape& shape);

// The CPU's part of a MoE layer's routing when the experts with on_gpu[e] != 0
// (I8 [n_expert]; resident and streamed ones) run on the GPU: `cpu` gets the
// routing's shape, each row holding the entries whose expert is not on the
// GPU (in order, with their weights), padded with kNoExpert (weight 0).
// Every entry that names an expert goes to exactly one side (ids outside
// [0, on_gpu.size()) stay on the CPU, which rejects them). Returns the CPU's
// entries; 0 means the GPU computes the whole layer.
int64_t CpuPartOfRouting(const models::Routing& routing, std::span<const uint8_t> on_gpu,
                         models::Routing* cpu);

}  // namespace ktx::gpu
