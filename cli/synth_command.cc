// File: cli/synth_command.cc
//
// `ktx-ctl synth`: writes a synthetic DeepSeek-V3-shaped GGUF model (random
// weights, real tensor names/shapes/types and metadata) or, with --dry-run,
// prints its tensor table. See docs/synth.md.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <memory>
#include <optional>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "cli/commands.h"
#include "runtime/synth/synth_plan.h"
#include "runtime/synth/synth_writer.h"

namespace ktx::cli {
namespace {

struct SynthFlags {
  std::string preset = "dsv3";
  std::optional<int64_t> layers;
  std::optional<int64_t> dense_layers;
  std::optional<int64_t> experts;
  std::optional<int64_t> vocab;
  std::string quant = "q4_k_m";
  uint64_t seed = 0;
  std::string out;
  int split = 1;
  int threads = 0;
  bool dry_run = false;
};

int RunSynth(const SynthFlags& flags) {
  auto fail = [](const absl::Status& s) {
    std::cerr << "ktx-ctl synth: " << s.message() << "\n";
    return 1;
  };
  absl::StatusOr<synth::Preset> preset = synth::ParsePreset(flags.preset);
  if (!preset.ok()) return fail(preset.status());
  absl::StatusOr<synth::Quant> quant = synth::ParseQuant(flags.quant);
  if (!quant.ok()) return fail(quant.status());
  synth::ConfigOverrides overrides;
  overrides.n_layer = flags.layers;
  overrides.n_dense_layer = flags.dense_layers;
  overrides.n_expert = flags.experts;
  overrides.n_vocab = flags.vocab;
  absl::StatusOr<synth::ModelConfig> config = synth::MakeConfig(*preset, overrides);
  if (!config.ok()) return fail(config.status());
  absl::StatusOr<synth::ModelPlan> plan = synth::PlanModel(*config, *quant);
  if (!plan.ok()) return fail(plan.status());

  if (flags.dry_run) {
    std::cout << synth::FormatPlanTable(*plan);
    return 0;
  }
  if (flags.out.empty()) {
    return fail(absl::InvalidArgumentError("--out FILE is required (or use --dry-run)"));
  }
  synth::SynthWriteOptions options;
  options.seed = flags.seed;
  options.n_split = flags.split;
  options.n_threads = flags.threads;
  const auto start = std::chrono::steady_clock::now();
  auto last = start;
  options.progress = [start, last](uint64_t done, uint64_t total) mutable {
    const auto now = std::chrono::steady_clock::now();
    if (now - last < std::chrono::seconds(5) && done != total) return;
    last = now;
    const double s = std::chrono::duration<double>(now - start).count();
    std::cerr << absl::StrFormat("ktx-ctl synth: %.2f / %.2f GiB (%.0f%%), %.2f GB/s\n",
                                 static_cast<double>(done) / (1 << 30),
                                 static_cast<double>(total) / (1 << 30),
                                 100.0 * static_cast<double>(done) / static_cast<double>(total),
                                 static_cast<double>(done) * 1e-9 / std::max(s, 1e-9));
  };
  const uint64_t total = plan->total_bytes();
  std::cerr << absl::StrFormat("ktx-ctl synth: writing %s (%s, %d tensors, %.2f GiB)\n", flags.out,
                               synth::QuantName(*quant), plan->tensors.size(),
                               static_cast<double>(total) / (1 << 30));
  absl::StatusOr<synth::SynthWriteResult> result =
      synth::WriteSynthModel(*plan, flags.out, options);
  if (!result.ok()) return fail(result.status());
  for (const std::string& path : result->paths) std::cout << path << "\n";
  std::cerr << absl::StrFormat(
      "ktx-ctl synth: %d bytes of tensors in %.2f s (%.2f GB/s)\n", result->tensor_bytes,
      result->seconds,
      static_cast<double>(result->tensor_bytes) * 1e-9 / std::max(result->seconds, 1e-9));
  return 0;
}

}  // namespace

void AddSynthCommands(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<SynthFlags>();
  CLI::App* cmd = app.add_subcommand(
      "synth",
      "Write a synthetic DeepSeek-V3-shaped GGUF model (random weights, real names, shapes, "
      "per-tensor quant types and metadata)");
  cmd->add_option("--preset", flags->preset, "dsv3 | kimi-k2 | tiny")->capture_default_str();
  cmd->add_option("--layers", flags->layers, "Number of layers (block_count)");
  cmd->add_option("--dense-layers", flags->dense_layers,
                  "Leading dense-FFN layers (default: the preset's, at most layers - 1)");
  cmd->add_option("--experts", flags->experts, "Routed experts per MoE layer");
  cmd->add_option("--vocab", flags->vocab, "Vocabulary size (>= 263)");
  cmd->add_option("--quant", flags->quant, "q4_k_m | q8_0 | bf16 (llama-quantize's mix)")
      ->capture_default_str();
  cmd->add_option("--seed", flags->seed, "Random seed; same seed, same bytes")
      ->capture_default_str();
  cmd->add_option("--out", flags->out, "Output .gguf path (split: PATH-0000i-of-0000N.gguf)");
  cmd->add_option("--split", flags->split, "Number of files")->capture_default_str();
  cmd->add_option("--threads", flags->threads, "Generator threads (0 = all)")
      ->capture_default_str();
  cmd->add_flag("--dry-run", flags->dry_run,
                "Print the tensor table (name, type, shape, bytes) and totals; write nothing");
  cmd->callback([exit_code, flags] { *exit_code = RunSynth(*flags); });
}

}  // namespace ktx::cli
