// File: runtime/synth/synth_writer.h
//
// Writes a synthetic model (a ModelPlan from synth_plan.h) as a GGUF file, or
// a split set of files, that looks like a real DeepSeek-V3 GGUF: the deepseek2
// metadata keys, a small byte-level BPE tokenizer (synth_vocab.h), and every
// tensor of the plan with random data (random_blocks.h). Tensor data is
// generated in parallel (oneTBB, in an arena of `n_threads`) chunk by chunk and
// streamed to the file, so memory stays at about one chunk whatever the model
// size. The output depends only on the plan and the seed: not on the thread
// count, the chunk size or the split.
//
//   KTX_ASSIGN_OR_RETURN(ModelPlan plan, PlanModel(config, Quant::kQ4_K_M));
//   SynthWriteOptions options;
//   options.seed = 42;
//   KTX_ASSIGN_OR_RETURN(SynthWriteResult r, WriteSynthModel(plan, "/tmp/m.gguf", options));
//
// Thread-safe: each call is independent (it starts its own task arena).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/gguf/gguf_writer.h"
#include "runtime/synth/synth_plan.h"

namespace ktx::synth {

struct SynthWriteOptions {
  uint64_t seed = 0;
  // Number of files (llama-gguf-split naming, PATH-00001-of-0000N.gguf); >= 1.
  int n_split = 1;
  // Worker threads for generation; 0 = all hardware threads.
  int n_threads = 0;
  // Bytes generated per step (whole rows; at least one row).
  size_t chunk_bytes = size_t{128} << 20;
  // Called on the writing thread after each generated chunk with the tensor
  // bytes generated so far and the total (for progress output); optional.
  std::function<void(uint64_t done, uint64_t total)> progress;
};

struct SynthWriteResult {
  std::vector<std::string> paths;  // in part order
  uint64_t tensor_bytes = 0;       // sum of tensor sizes (no headers, no padding)
  double seconds = 0.0;            // wall time of the whole write
};

// Sets the general.*, deepseek2.* and tokenizer.* keys of `plan` on `writer`.
absl::Status AddSynthMetadata(const ModelPlan& plan, gguf::GgufWriter* writer);

// A GgufWriter holding the metadata and every tensor of `plan` as a fill
// callback (generation runs when the writer writes). `plan` must outlive it.
// Errors: a tensor type the generator cannot write, invalid options.
absl::StatusOr<gguf::GgufWriter> MakeSynthWriter(const ModelPlan& plan,
                                                 const SynthWriteOptions& options);

// Writes the model to `path` (or its split parts).
absl::StatusOr<SynthWriteResult> WriteSynthModel(const ModelPlan& plan, const std::string& path,
                                                 const SynthWriteOptions& options);

// The single-file image in memory (tests; small models only).
absl::StatusOr<std::vector<uint8_t>> WriteSynthModelToMemory(const ModelPlan& plan,
                                                             const SynthWriteOptions& options);

}  // namespace ktx::synth
