// File: actors/moe_combine.h
//
// What an attention actor (CPU: attention_actor.cc, GPU:
// gpu_attention_actor.cc) does with the router's MoeResult of one MoE layer:
// sum the placed partials into the batch's routed-expert output in the
// router's FIXED order (ascending shard, then dispatch order; float64
// accumulation, so the sum does not depend on which shard answered first),
// find the slices that own failed rows, and add up each shard's compute time
// for the step profile. One implementation, so both attention actors give
// bit-identical routed sums for the same partials. Also the per-step checks
// and results both attention actors share (CheckSliceShape, MakeSliceResult).
//
//   models::Activations scratch;
//   const models::Activations* routed = SumPlacedPartials(result.parts, n, n_embd, &scratch);
//
// Plain functions over their arguments; thread-safe as far as the arguments
// are not shared.
#pragma once

#include <cstdint>
#include <set>
#include <span>
#include <vector>

#include "absl/status/status.h"

#include "actors/messages.h"
#include "runtime/models/activations.h"

namespace ktx::actors {

// The routed-expert output F32 [n_rows, n_embd]: Σ over `parts` (in order) of
// each part's rows placed at PlacedPartial::rows. Rows no part covers (e.g.
// MoeResult::failed_rows) are zero. Returns parts[0]'s own buffer when that
// one part covers every row in order (no copy), else `scratch`, resized.
const models::Activations* SumPlacedPartials(std::span<const PlacedPartial> parts, int64_t n_rows,
                                             int64_t n_embd, models::Activations* scratch);

// The same sums written into `out` (F32 [n_rows, n_embd], caller-owned, e.g.
// a GPU model's pinned buffer): bit for bit SumPlacedPartials' result, a copy
// when one part covers every row in order.
void SumPlacedPartialsInto(std::span<const PlacedPartial> parts, int64_t n_rows, int64_t n_embd,
                           float* out);

// Which of the slices own a row of `failed_rows`: slice i owns the batch rows
// [row_begin[i], row_begin[i] + row_count[i]). Returns the indices i (into
// row_begin), ascending, each once.
std::vector<int> SlicesOwningRows(std::span<const int32_t> failed_rows,
                                  std::span<const int64_t> row_begin,
                                  std::span<const int64_t> row_count);

// Each shard's compute time in this result (ExpertPartial::compute_us summed
// per shard): [n_shards]; parts naming a shard outside [0, n_shards) are
// ignored.
std::vector<int64_t> ShardComputeUs(std::span<const PlacedPartial> parts, int n_shards);

// The checks every attention actor makes on a slice of step `step` before
// anything else: its sequence appears once in the step (`seen` collects the
// step's sequences) and it has tokens (InvalidArgument naming both).
absl::Status CheckSliceShape(const StepSlice& slice, uint64_t step, std::set<uint64_t>* seen);

// A slice's answer: its error (code, message), else its logits.
SliceResult MakeSliceResult(uint64_t seq, const absl::Status& status, Tensor logits);

}  // namespace ktx::actors
