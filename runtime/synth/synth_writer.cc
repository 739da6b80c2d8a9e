#include "runtime/synth/synth_writer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "runtime/base/status.h"
#include "runtime/synth/random_blocks.h"
#include "runtime/synth/synth_vocab.h"
#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"

namespace ktx::synth {

using gguf::GgufWriter;
using gguf::ValueType;

absl::Status AddSynthMetadata(const ModelPlan& plan, GgufWriter* w) {
  const ModelConfig& c = plan.config;
  auto u32 = [](int64_t v) { return static_cast<uint32_t>(v); };
  w->SetString("general.architecture", "deepseek2");
  w->SetString("general.type", "model");
  w->SetString("general.name", c.name);
  w->SetU32("general.file_type", FileType(plan.quant));
  w->SetU32("general.quantization_version", 2);
  const std::string a = "deepseek2.";
  w->SetU32(a + "block_count", u32(c.n_layer));
  w->SetU32(a + "context_length", u32(c.context_length));
  w->SetU32(a + "embedding_length", u32(c.n_embd));
  w->SetU32(a + "feed_forward_length", u32(c.n_ff));
  w->SetU32(a + "attention.head_count", u32(c.n_head));
  w->SetU32(a + "attention.head_count_kv", 1);  // MLA runs as MQA over the latent
  w->SetString(a + "rope.scaling.type", "yarn");
  w->SetF32(a + "rope.scaling.factor", c.rope_scaling_factor);
  w->SetU32(a + "rope.scaling.original_context_length", u32(c.rope_original_context));
  w->SetF32(a + "rope.scaling.yarn_beta_fast", c.yarn_beta_fast);
  w->SetF32(a + "rope.scaling.yarn_beta_slow", c.yarn_beta_slow);
  w->SetF32(a + "rope.freq_base", c.rope_freq_base);
  w->SetF32(a + "attention.layer_norm_rms_epsilon", c.rms_norm_eps);
  w->SetU32(a + "expert_count", u32(c.n_expert));
  w->SetU32(a + "expert_used_count", u32(c.n_expert_used));
  w->SetU32(a + "expert_group_count", u32(c.n_expert_group));
  w->SetU32(a + "expert_group_used_count", u32(c.n_expert_group_used));
  w->SetU32(a + "expert_gating_func", c.expert_gating_func);
  w->SetU32(a + "leading_dense_block_count", u32(c.n_dense_layer));
  w->SetU32(a + "vocab_size", u32(c.n_vocab));
  w->SetU32(a + "attention.q_lora_rank", u32(c.q_lora_rank));
  w->SetU32(a + "attention.kv_lora_rank", u32(c.kv_lora_rank));
  w->SetU32(a + "attention.key_length", u32(c.kv_lora_rank + c.qk_rope_head_dim));
  w->SetU32(a + "attention.value_length", u32(c.kv_lora_rank));
  w->SetU32(a + "attention.key_length_mla", u32(c.qk_nope_head_dim + c.qk_rope_head_dim));
  w->SetU32(a + "attention.value_length_mla", u32(c.v_head_dim));
  w->SetU32(a + "expert_feed_forward_length", u32(c.n_ff_exp));
  w->SetU32(a + "expert_shared_count", u32(c.n_expert_shared));
  w->SetF32(a + "expert_weights_scale", c.expert_weights_scale);
  if (c.expert_weights_norm) w->SetBool(a + "expert_weights_norm", true);
  w->SetU32(a + "rope.dimension_count", u32(c.qk_rope_head_dim));
  w->SetF32(a + "rope.scaling.yarn_log_multiplier", c.yarn_log_multiplier);

  KTX_ASSIGN_OR_RETURN(SynthVocab vocab, BuildSynthVocab(c.n_vocab));
  w->SetString("tokenizer.ggml.model", "gpt2");
  w->SetString("tokenizer.ggml.pre", "deepseek-v3");
  w->SetStringArray("tokenizer.ggml.tokens", std::move(vocab.tokens));
  KTX_RETURN_IF_ERROR(w->SetIntArray("tokenizer.ggml.token_type", ValueType::kInt32,
                                     {vocab.token_types.begin(), vocab.token_types.end()}));
  w->SetStringArray("tokenizer.ggml.merges", std::move(vocab.merges));
  w->SetU32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(vocab.bos_id));
  w->SetU32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(vocab.eos_id));
  w->SetU32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(vocab.pad_id));
  w->SetBool("tokenizer.ggml.add_bos_token", true);
  w->SetBool("tokenizer.ggml.add_eos_token", false);
  w->SetString("tokenizer.chat_template", vocab.chat_template);
  return absl::OkStatus();
}

absl::StatusOr<GgufWriter> MakeSynthWriter(const ModelPlan& plan,
                                           const SynthWriteOptions& options) {
  if (options.n_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--threads = ", options.n_threads, " must be >= 0 (0 = all)"));
  }
  if (options.n_split < 1 || options.n_split > static_cast<int>(plan.tensors.size())) {
    return absl::InvalidArgumentError(absl::StrCat("--split = ", options.n_split,
                                                   " must be in [1, ", plan.tensors.size(),
                                                   "] (at most one file per tensor)"));
  }
  for (const TensorPlan& t : plan.tensors) {
    if (!CanGenerate(t.type)) {
      return absl::InvalidArgumentError(absl::StrCat("synth: tensor '", t.name, "' has type ",
                                                     kernels::TraitsOf(t.type).name,
                                                     ", which the generator cannot write"));
    }
  }
  GgufWriter writer;
  KTX_RETURN_IF_ERROR(AddSynthMetadata(plan, &writer));
  auto arena = options.n_threads > 0 ? std::make_shared<tbb::task_arena>(options.n_threads)
                                     : std::make_shared<tbb::task_arena>();
  // Bytes generated so far, for options.progress (fills run one at a time).
  auto done = std::make_shared<uint64_t>(0);
  const uint64_t total = plan.total_bytes();
  for (const TensorPlan& t : plan.tensors) {
    const TensorPlan* tp = &t;
    const uint64_t key = TensorKey(options.seed, t.name);
    GgufWriter::FillFn fill = [tp, key, arena, done, total, progress = options.progress](
                                  int64_t row0, int64_t n_rows, uint8_t* dst) -> absl::Status {
      const int64_t row_bytes = tp->row_bytes();
      // Tasks of about 256 KiB: enough to amortise scheduling, small enough
      // to balance 16+ threads on a 128 MiB chunk.
      const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / row_bytes);
      std::mutex mu;
      absl::Status first_error;
      arena->execute([&] {
        tbb::parallel_for(tbb::blocked_range<int64_t>(0, n_rows, grain),
                          [&](const tbb::blocked_range<int64_t>& r) {
                            absl::Status s = FillTensorRows(*tp, key, row0 + r.begin(), r.size(),
                                                            dst + r.begin() * row_bytes);
                            if (!s.ok()) {
                              std::lock_guard<std::mutex> lock(mu);
                              if (first_error.ok()) first_error = std::move(s);
                            }
                          });
      });
      if (first_error.ok() && progress) {
        *done += static_cast<uint64_t>(n_rows * row_bytes);
        progress(*done, total);
      }
      return first_error;
    };
    KTX_RETURN_IF_ERROR(writer.AddTensor(t.name, t.ne, t.type, std::move(fill)));
  }
  return writer;
}

absl::StatusOr<SynthWriteResult> WriteSynthModel(const ModelPlan& plan, const std::string& path,
                                                 const SynthWriteOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  KTX_ASSIGN_OR_RETURN(GgufWriter writer, MakeSynthWriter(plan, options));
  gguf::WriteOptions write_options;
  write_options.n_split = options.n_split;
  write_options.chunk_bytes = options.chunk_bytes;
  SynthWriteResult result;
  KTX_RETURN_IF_ERROR(writer.Write(path, write_options, &result.paths));
  result.tensor_bytes = plan.total_bytes();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

absl::StatusOr<std::vector<uint8_t>> WriteSynthModelToMemory(const ModelPlan& plan,
                                                             const SynthWriteOptions& options) {
  KTX_ASSIGN_OR_RETURN(GgufWriter writer, MakeSynthWriter(plan, options));
  gguf::WriteOptions write_options;
  write_options.chunk_bytes = options.chunk_bytes;
  return writer.WriteToMemory(write_options);
}

}  // namespace ktx::synth
