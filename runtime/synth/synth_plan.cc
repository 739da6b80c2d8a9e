#include "runtime/synth/synth_plan.h"

#include <cmath>
#include <map>

#include <charconv>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/base/status.h"
#include "runtime/synth/synth_vocab.h"

namespace ktx::synth {

using kernels::TensorType;

namespace {

std::string Lower(std::string_view text) {
  std::string out(text);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

bool Contains(std::string_view s, std::string_view part) {
  return s.find(part) != std::string_view::npos;
}

}  // namespace

absl::StatusOr<Preset> ParsePreset(std::string_view text) {
  const std::string t = Lower(text);
  if (t == "dsv3") return Preset::kDsv3;
  if (t == "kimi-k2") return Preset::kKimiK2;
  if (t == "tiny") return Preset::kTiny;
  return absl::InvalidArgumentError(absl::StrCat("--preset: unknown preset '", std::string(text),
                                                 "'; expected dsv3, kimi-k2 or tiny"));
}

absl::StatusOr<Quant> ParseQuant(std::string_view text) {
  const std::string t = Lower(text);
  if (t == "q4_k_m") return Quant::kQ4_K_M;
  if (t == "q8_0") return Quant::kQ8_0;
  if (t == "bf16") return Quant::kBF16;
  return absl::InvalidArgumentError(absl::StrCat(
      "--quant: unknown quantization '", std::string(text), "'; expected q4_k_m, q8_0 or bf16"));
}

const char* PresetName(Preset preset) {
  switch (preset) {
    case Preset::kDsv3: return "dsv3";
    case Preset::kKimiK2: return "kimi-k2";
    case Preset::kTiny: return "tiny";
  }
  return "?";
}

const char* QuantName(Quant quant) {
  switch (quant) {
    case Quant::kQ4_K_M: return "q4_k_m";
    case Quant::kQ8_0: return "q8_0";
    case Quant::kBF16: return "bf16";
  }
  return "?";
}

uint32_t FileType(Quant quant) {
  switch (quant) {
    case Quant::kQ4_K_M: return 15;
    case Quant::kQ8_0: return 7;
    case Quant::kBF16: return 32;
  }
  return 0;
}

ModelConfig PresetConfig(Preset preset) {
  ModelConfig c;
  switch (preset) {
    case Preset::kDsv3:
      c.name = "synth-dsv3";
      c.n_layer = 61;
      c.n_dense_layer = 3;
      c.n_embd = 7168;
      c.n_ff = 18432;
      c.n_head = 128;
      c.q_lora_rank = 1536;
      c.kv_lora_rank = 512;
      c.qk_nope_head_dim = 128;
      c.qk_rope_head_dim = 64;
      c.v_head_dim = 128;
      c.n_expert = 256;
      c.n_expert_used = 8;
      c.n_expert_group = 8;
      c.n_expert_group_used = 4;
      c.n_expert_shared = 1;
      c.n_ff_exp = 2048;
      c.n_vocab = 129280;
      c.context_length = 163840;
      break;
    case Preset::kKimiK2:
      // Kimi-K2 (Moonshot AI), DeepSeek-V3 architecture; see docs/synth.md.
      c = PresetConfig(Preset::kDsv3);
      c.name = "synth-kimi-k2";
      c.n_dense_layer = 1;
      c.n_head = 64;
      c.n_expert = 384;
      c.n_expert_group = 1;
      c.n_expert_group_used = 1;
      c.n_vocab = 163840;
      c.context_length = 131072;
      c.rope_freq_base = 50000.0f;
      c.rope_scaling_factor = 32.0f;
      c.yarn_beta_fast = 1.0f;
      c.yarn_beta_slow = 1.0f;
      c.expert_weights_scale = 2.827f;
      break;
    case Preset::kTiny:
      // The golden fixtures' model (tests/data/README.md section 2.1).
      c.name = "synth-tiny";
      c.n_layer = 3;
      c.n_dense_layer = 1;
      c.n_embd = 256;
      c.n_ff = 512;
      c.n_head = 4;
      c.q_lora_rank = 128;
      c.kv_lora_rank = 64;
      c.qk_nope_head_dim = 32;
      c.qk_rope_head_dim = 16;
      c.v_head_dim = 32;
      c.n_expert = 16;
      c.n_expert_used = 4;
      c.n_expert_group = 4;
      c.n_expert_group_used = 2;
      c.n_expert_shared = 1;
      c.n_ff_exp = 256;
      c.n_vocab = 512;
      c.context_length = 163840;
      break;
  }
  return c;
}

absl::Status ValidateConfig(const ModelConfig& c) {
  struct Dim {
    const char* what;
    int64_t value;
  };
  const Dim dims[] = {{"--layers (n_layer)", c.n_layer},
                      {"n_embd", c.n_embd},
                      {"n_ff", c.n_ff},
                      {"n_head", c.n_head},
                      {"q_lora_rank", c.q_lora_rank},
                      {"kv_lora_rank", c.kv_lora_rank},
                      {"qk_nope_head_dim", c.qk_nope_head_dim},
                      {"qk_rope_head_dim", c.qk_rope_head_dim},
                      {"v_head_dim", c.v_head_dim},
                      {"--experts (n_expert)", c.n_expert},
                      {"n_expert_used", c.n_expert_used},
                      {"n_expert_group", c.n_expert_group},
                      {"n_expert_group_used", c.n_expert_group_used},
                      {"n_expert_shared", c.n_expert_shared},
                      {"n_ff_exp", c.n_ff_exp},
                      {"context_length", c.context_length}};
  for (const Dim& d : dims) {
    if (d.value < 1 || d.value > (int64_t{1} << 24)) {
      return absl::InvalidArgumentError(
          absl::StrCat("synth: ", d.what, " = ", d.value, " must be in [1, 16777216]"));
    }
  }
  if (c.n_layer > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("--layers = ", c.n_layer, " must be in [1, 1000]"));
  }
  if (c.n_dense_layer < 0 || c.n_dense_layer > c.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("--dense-layers = ", c.n_dense_layer,
                                                   " must be in [0, --layers = ", c.n_layer, "]"));
  }
  if (c.n_expert < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("--experts = ", c.n_expert, " must be >= 2 (a MoE model)"));
  }
  if (c.n_expert_used > c.n_expert) {
    return absl::InvalidArgumentError(absl::StrCat("--experts = ", c.n_expert,
                                                   " must be >= n_expert_used = ", c.n_expert_used,
                                                   " (experts chosen per token)"));
  }
  if (c.n_expert_group > 1) {
    if (c.n_expert % c.n_expert_group != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--experts = ", c.n_expert, " must be a multiple of the expert group count ",
                       c.n_expert_group, " (llama.cpp requires n_expert % n_expert_groups == 0)"));
    }
    if (c.n_expert_group_used >= c.n_expert_group) {
      return absl::InvalidArgumentError(
          absl::StrCat("n_expert_group_used = ", c.n_expert_group_used, " must be < ",
                       "n_expert_group = ", c.n_expert_group));
    }
    // Group-limited routing keeps the top n_expert_used among the experts of
    // the kept groups: there must be enough of them.
    if (c.n_expert / c.n_expert_group * c.n_expert_group_used < c.n_expert_used) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--experts = ", c.n_expert, ": the ", c.n_expert_group_used, " kept of ",
          c.n_expert_group, " expert groups hold fewer than n_expert_used = ", c.n_expert_used,
          " experts"));
    }
  }
  if (c.n_vocab < kMinSynthVocab || c.n_vocab > (int64_t{1} << 22)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--vocab = ", c.n_vocab, " must be in [", kMinSynthVocab,
        ", 4194304] (3 control tokens, 256 byte tokens and the chat-template tokens)"));
  }
  if (c.qk_rope_head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("qk_rope_head_dim = ", c.qk_rope_head_dim, " must be even (RoPE pairs)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> MakeConfig(Preset preset, const ConfigOverrides& o) {
  ModelConfig c = PresetConfig(preset);
  if (o.n_layer) {
    if (*o.n_layer < 1 || *o.n_layer > 1000) {
      return absl::InvalidArgumentError(
          absl::StrCat("--layers = ", *o.n_layer, " must be in [1, 1000]"));
    }
    c.n_layer = *o.n_layer;
    if (!o.n_dense_layer) c.n_dense_layer = std::min(c.n_dense_layer, c.n_layer - 1);
  }
  if (o.n_dense_layer) c.n_dense_layer = *o.n_dense_layer;
  if (o.n_expert) c.n_expert = *o.n_expert;
  if (o.n_vocab) c.n_vocab = *o.n_vocab;
  if (o.n_layer || o.n_dense_layer || o.n_expert || o.n_vocab) {
    absl::StrAppend(&c.name, "-custom");
  }
  KTX_RETURN_IF_ERROR(ValidateConfig(c));
  return c;
}

int64_t TensorPlan::n_elements() const {
  int64_t n = 1;
  for (int64_t e : ne) n *= e;
  return n;
}

int64_t TensorPlan::n_rows() const { return n_elements() / ne[0]; }

int64_t TensorPlan::row_bytes() const { return kernels::RowBytes(kernels::TraitsOf(type), ne[0]); }

std::string TensorPlan::ShapeString() const {
  return absl::StrCat("{", absl::StrJoin(ne, ", "), "}");
}

uint64_t ModelPlan::total_bytes() const {
  uint64_t total = 0;
  for (const TensorPlan& t : tensors) total += t.n_bytes;
  return total;
}

int64_t ModelPlan::total_elements() const {
  int64_t total = 0;
  for (const TensorPlan& t : tensors) total += t.n_elements();
  return total;
}

const TensorPlan* ModelPlan::Find(std::string_view name) const {
  for (const TensorPlan& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

bool UseMoreBits(int64_t il, int64_t n_layer) {
  return il < n_layer / 8 || il >= 7 * n_layer / 8 || (il - n_layer / 8) % 3 == 2;
}

namespace {

// "blk.12.ffn_down_exps.weight" -> 12; -1 when the name has no layer.
int64_t LayerOfName(std::string_view name) {
  if (!name.starts_with("blk.")) return -1;
  name.remove_prefix(4);
  int64_t il = -1;
  const auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), il);
  if (ec != std::errc() || end == name.data() || end == name.data() + name.size() || *end != '.') {
    return -1;
  }
  return il;
}

TensorType Fallback(TensorType type, int64_t ne0) {
  // llama.cpp tensor_type_fallback: each step is taken while the row does not
  // divide into blocks of the type.
  while (ne0 % kernels::TraitsOf(type).block_size != 0) {
    switch (type) {
      case TensorType::kQ4_K: type = TensorType::kQ5_0; break;
      case TensorType::kQ5_K: type = TensorType::kQ5_1; break;
      case TensorType::kQ6_K: type = TensorType::kQ8_0; break;
      default: return TensorType::kF16;
    }
  }
  return type;
}

}  // namespace

TensorType ChooseTensorType(Quant quant, std::string_view name, const std::vector<int64_t>& ne,
                            int64_t n_layer) {
  const bool quantize = ne.size() >= 2 && name.ends_with("weight") &&
                        !name.ends_with("_norm.weight") && !Contains(name, "ffn_gate_inp.weight");
  if (!quantize) return TensorType::kF32;
  TensorType type = TensorType::kQ4_K;
  switch (quant) {
    case Quant::kBF16: return TensorType::kBF16;
    case Quant::kQ8_0: type = TensorType::kQ8_0; break;
    case Quant::kQ4_K_M:
      if (name == "output.weight") {
        type = TensorType::kQ6_K;
      } else if (Contains(name, "ffn_down")) {
        type = UseMoreBits(LayerOfName(name), n_layer) ? TensorType::kQ6_K : TensorType::kQ4_K;
      } else {
        type = TensorType::kQ4_K;
      }
      break;
  }
  return Fallback(type, ne[0]);
}

absl::StatusOr<ModelPlan> PlanModel(const ModelConfig& config, Quant quant) {
  KTX_RETURN_IF_ERROR(ValidateConfig(config));
  ModelPlan plan;
  plan.config = config;
  plan.quant = quant;
  const ModelConfig& c = config;
  const int64_t H = c.n_embd;

  auto add = [&](std::string name, std::vector<int64_t> ne, int il, Init init, float std) {
    TensorPlan t;
    t.type = ChooseTensorType(quant, name, ne, c.n_layer);
    t.name = std::move(name);
    t.ne = std::move(ne);
    t.il = il;
    t.init = init;
    t.std = std;
    t.n_bytes = static_cast<uint64_t>(t.row_bytes()) * static_cast<uint64_t>(t.n_rows());
    plan.tensors.push_back(std::move(t));
  };
  // Weights ~ N(0, 1/fan_in), fan_in = ne[0] (the input size).
  auto weight = [&](std::string name, std::vector<int64_t> ne, int il) {
    const float std = 1.0f / std::sqrt(static_cast<float>(ne[0]));
    add(std::move(name), std::move(ne), il, Init::kNormal, std);
  };
  auto norm = [&](std::string name, int64_t n, int il) {
    add(std::move(name), {n}, il, Init::kOnes, 0.0f);
  };

  add("token_embd.weight", {H, c.n_vocab}, -1, Init::kNormal, 1.0f);
  const int64_t qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim;
  for (int il = 0; il < c.n_layer; ++il) {
    const std::string p = absl::StrCat("blk.", il, ".");
    norm(p + "attn_norm.weight", H, il);
    norm(p + "attn_q_a_norm.weight", c.q_lora_rank, il);
    norm(p + "attn_kv_a_norm.weight", c.kv_lora_rank, il);
    weight(p + "attn_q_a.weight", {H, c.q_lora_rank}, il);
    weight(p + "attn_q_b.weight", {c.q_lora_rank, c.n_head * qk_head}, il);
    weight(p + "attn_kv_a_mqa.weight", {H, c.kv_lora_rank + c.qk_rope_head_dim}, il);
    weight(p + "attn_k_b.weight", {c.qk_nope_head_dim, c.kv_lora_rank, c.n_head}, il);
    weight(p + "attn_v_b.weight", {c.kv_lora_rank, c.v_head_dim, c.n_head}, il);
    weight(p + "attn_output.weight", {c.n_head * c.v_head_dim, H}, il);
    norm(p + "ffn_norm.weight", H, il);
    if (il < c.n_dense_layer) {
      weight(p + "ffn_gate.weight", {H, c.n_ff}, il);
      weight(p + "ffn_up.weight", {H, c.n_ff}, il);
      weight(p + "ffn_down.weight", {c.n_ff, H}, il);
    } else {
      const int64_t n_ff_shexp = c.n_ff_exp * c.n_expert_shared;
      add(p + "ffn_gate_inp.weight", {H, c.n_expert}, il, Init::kNormal,
          1.0f / std::sqrt(static_cast<float>(H)));
      add(p + "exp_probs_b.bias", {c.n_expert}, il, Init::kNormal, 0.02f);
      weight(p + "ffn_gate_exps.weight", {H, c.n_ff_exp, c.n_expert}, il);
      weight(p + "ffn_up_exps.weight", {H, c.n_ff_exp, c.n_expert}, il);
      weight(p + "ffn_down_exps.weight", {c.n_ff_exp, H, c.n_expert}, il);
      weight(p + "ffn_gate_shexp.weight", {H, n_ff_shexp}, il);
      weight(p + "ffn_up_shexp.weight", {H, n_ff_shexp}, il);
      weight(p + "ffn_down_shexp.weight", {n_ff_shexp, H}, il);
    }
  }
  norm("output_norm.weight", H, -1);
  add("output.weight", {H, c.n_vocab}, -1, Init::kNormal,
      c.output_std_scale / std::sqrt(static_cast<float>(H)));
  return plan;
}

std::string FormatPlanTable(const ModelPlan& plan) {
  const ModelConfig& c = plan.config;
  std::string out = absl::StrFormat(
      "synthetic deepseek2 model '%s' (%s): %d layers (%d dense), n_embd %d, %d heads, "
      "%d experts (%d used, %d groups), vocab %d\n",
      c.name, QuantName(plan.quant), c.n_layer, c.n_dense_layer, c.n_embd, c.n_head, c.n_expert,
      c.n_expert_used, c.n_expert_group, c.n_vocab);
  absl::StrAppendFormat(&out, "%-36s %-6s %-22s %16s\n", "tensor", "type", "ne", "bytes");
  std::map<std::string, std::pair<int, uint64_t>> per_type;
  for (const TensorPlan& t : plan.tensors) {
    const char* type_name = kernels::TraitsOf(t.type).name;
    absl::StrAppendFormat(&out, "%-36s %-6s %-22s %16d\n", t.name, type_name, t.ShapeString(),
                          t.n_bytes);
    auto& entry = per_type[type_name];
    ++entry.first;
    entry.second += t.n_bytes;
  }
  const uint64_t total = plan.total_bytes();
  const int64_t n_params = plan.total_elements();
  absl::StrAppendFormat(&out, "tensors: %d, parameters: %d (%.3f B)\n", plan.tensors.size(),
                        n_params, static_cast<double>(n_params) * 1e-9);
  for (const auto& [name, entry] : per_type) {
    absl::StrAppendFormat(&out, "  %-6s %5d tensors %18d bytes (%.2f MiB)\n", name, entry.first,
                          entry.second, static_cast<double>(entry.second) / (1 << 20));
  }
  absl::StrAppendFormat(&out, "total: %d bytes = %.2f MiB = %.1f GiB (%.2f bpw)\n", total,
                        static_cast<double>(total) / (1 << 20),
                        static_cast<double>(total) / (1 << 30),
                        8.0 * static_cast<double>(total) / static_cast<double>(n_params));
  return out;
}

}  // namespace ktx::synth
