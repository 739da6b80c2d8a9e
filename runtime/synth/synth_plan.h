// File: runtime/synth/synth_plan.h
//
// The plan of a synthetic DeepSeek-V3-shaped model (llama.cpp architecture
// `deepseek2`): its hyper-parameters and its tensor table (name, ne, storage
// type, bytes, how the values are drawn), exactly as real DeepSeek-V3 GGUF
// files name and shape their tensors (../shared/notes/DEEPSEEK.md section 4)
// and as llama-quantize chooses per-tensor types for Q4_K_M, Q8_0 and BF16
// (../shared/notes/GGUF.md section 5). Plain data, no I/O: `ktx-ctl synth
// --dry-run` prints a plan, synth_writer.h writes one.
//
//   KTX_ASSIGN_OR_RETURN(ModelConfig config, MakeConfig(Preset::kDsv3, {}));
//   KTX_ASSIGN_OR_RETURN(ModelPlan plan, PlanModel(config, Quant::kQ4_K_M));
//   std::cout << FormatPlanTable(plan);   // 1086 tensors, 385,750.62 MiB
//
// Presets:
//   dsv3    DeepSeek-V3 (671 B): 61 layers (3 dense), 256 experts, 8 groups.
//   kimi-k2 Kimi-K2 as a DeepSeek-V3 shape: 384 experts, 64 heads, vocab
//           163840, 1 dense layer, n_group 1 (values in docs/synth.md).
//   tiny    The shape of the golden fixtures in tests/data (3 layers, 256 wide,
//           16 experts, vocab 512).
// Thread-safe: pure functions over values.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/tensor_type.h"

namespace ktx::synth {

enum class Preset { kDsv3, kKimiK2, kTiny };
// The llama-quantize ftype the per-tensor types imitate.
enum class Quant { kQ4_K_M, kQ8_0, kBF16 };

// "dsv3" | "kimi-k2" | "tiny"; InvalidArgument naming the accepted values.
absl::StatusOr<Preset> ParsePreset(std::string_view text);
// "q4_k_m" | "q8_0" | "bf16" (case-insensitive).
absl::StatusOr<Quant> ParseQuant(std::string_view text);
const char* PresetName(Preset preset);
const char* QuantName(Quant quant);
// general.file_type (llama_ftype) of a quant: Q4_K_M 15, Q8_0 7, BF16 32.
uint32_t FileType(Quant quant);

// The deepseek2 hyper-parameters (GGUF keys in DEEPSEEK.md section 3).
struct ModelConfig {
  std::string name;                 // general.name
  int64_t n_layer = 0;              // block_count
  int64_t n_dense_layer = 0;        // leading_dense_block_count
  int64_t n_embd = 0;               // embedding_length (H)
  int64_t n_ff = 0;                 // feed_forward_length (dense FFN width)
  int64_t n_head = 0;               // attention.head_count
  int64_t q_lora_rank = 0;          // attention.q_lora_rank
  int64_t kv_lora_rank = 0;         // attention.kv_lora_rank
  int64_t qk_nope_head_dim = 0;     // key_length_mla - rope.dimension_count
  int64_t qk_rope_head_dim = 0;     // rope.dimension_count
  int64_t v_head_dim = 0;           // attention.value_length_mla
  int64_t n_expert = 0;             // expert_count
  int64_t n_expert_used = 0;        // expert_used_count
  int64_t n_expert_group = 0;       // expert_group_count (1 = no group-limited routing)
  int64_t n_expert_group_used = 0;  // expert_group_used_count
  int64_t n_expert_shared = 0;      // expert_shared_count
  int64_t n_ff_exp = 0;             // expert_feed_forward_length
  int64_t n_vocab = 0;              // vocab_size
  int64_t context_length = 0;
  float rms_norm_eps = 1e-6f;
  float rope_freq_base = 10000.0f;
  float rope_scaling_factor = 40.0f;  // yarn
  int64_t rope_original_context = 4096;
  float yarn_beta_fast = 32.0f;
  float yarn_beta_slow = 1.0f;
  float yarn_log_multiplier = 0.1f;  // 0.1 * mscale_all_dim
  float expert_weights_scale = 2.5f;
  bool expert_weights_norm = true;
  uint32_t expert_gating_func = 2;  // sigmoid
  // Standard deviation of output.weight as a multiple of 1/sqrt(n_embd) (the
  // fixtures use 8 so that next-token distributions are not flat).
  float output_std_scale = 8.0f;
};

// Flags that change a preset; unset fields keep the preset's value.
struct ConfigOverrides {
  std::optional<int64_t> n_layer;        // --layers
  std::optional<int64_t> n_dense_layer;  // --dense-layers
  std::optional<int64_t> n_expert;       // --experts
  std::optional<int64_t> n_vocab;        // --vocab
};

ModelConfig PresetConfig(Preset preset);

// The preset with overrides applied, validated. Without --dense-layers, the
// preset's dense-layer count is clamped to n_layer - 1 so that a short model
// keeps at least one MoE layer. Errors name the flag and the allowed values.
absl::StatusOr<ModelConfig> MakeConfig(Preset preset, const ConfigOverrides& overrides);

// Checks what llama.cpp's loader and the synthetic writer need: positive
// dims, dense layers <= layers, n_expert_used <= n_expert, groups dividing
// the experts (0 < used groups <= groups), n_vocab >= MinSynthVocab(), etc.
absl::Status ValidateConfig(const ModelConfig& config);

// How a tensor's values are drawn.
enum class Init {
  kOnes,    // every element 1.0 (norm weights)
  kNormal,  // approximately N(0, std^2), bounded by ~3.5 std
};

// One tensor of the plan.
struct TensorPlan {
  std::string name;
  std::vector<int64_t> ne;  // ggml order, ne[0] contiguous
  kernels::TensorType type = kernels::TensorType::kF32;
  uint64_t n_bytes = 0;
  int il = -1;  // layer index, -1 for token_embd / output / output_norm
  Init init = Init::kNormal;
  float std = 0.0f;  // kNormal only

  int64_t n_elements() const;
  int64_t n_rows() const;  // n_elements / ne[0]
  int64_t row_bytes() const;
  std::string ShapeString() const;  // "{7168, 2048, 256}"
};

struct ModelPlan {
  ModelConfig config;
  Quant quant = Quant::kQ4_K_M;
  std::vector<TensorPlan> tensors;  // in file order (token_embd, blk.0..N-1, output_norm, output)

  uint64_t total_bytes() const;
  int64_t total_elements() const;
  const TensorPlan* Find(std::string_view name) const;
};

// llama-quantize's use_more_bits(i_layer, n_layer) (integer division).
bool UseMoreBits(int64_t il, int64_t n_layer);

// The storage type llama-quantize gives tensor `name` of extents `ne` in a
// model of `n_layer` blocks for `quant` (GGUF.md section 5): 1-D tensors,
// *_norm.weight, ffn_gate_inp.weight and non-".weight" tensors stay F32; the
// Q4_K_M rules (output Q6_K, ffn_down* Q6_K on use_more_bits layers, else
// Q4_K); then the fallback when ne[0] is not a multiple of the block size
// (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q8_0 -> F16).
kernels::TensorType ChooseTensorType(Quant quant, std::string_view name,
                                     const std::vector<int64_t>& ne, int64_t n_layer);

// The full tensor table. Errors when the config is invalid.
absl::StatusOr<ModelPlan> PlanModel(const ModelConfig& config, Quant quant);

// The dry-run table: one line per tensor (name, type, shape, bytes) and totals
// (tensors, parameters, bytes in MiB and GiB, bits per weight, bytes per type).
std::string FormatPlanTable(const ModelPlan& plan);

}  // namespace ktx::synth
