#include "runtime/models/deepseek2.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/cpu/quant/quant.h"
#include "runtime/base/status.h"
#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"

namespace ktx::models {
namespace {

constexpr std::string_view kArch = "deepseek2";

std::string Key(std::string_view name) { return std::string(kArch) + "." + std::string(name); }

// Reads a required unsigned integer key into `out`, checking [lo, hi].
absl::Status ReadInt(const gguf::Metadata& md, std::string_view name, int64_t lo, int64_t hi,
                     int64_t* out) {
  const std::string key = Key(name);
  if (!md.Has(key)) return absl::NotFoundError(absl::StrCat("missing required key ", key));
  KTX_ASSIGN_OR_RETURN(const int64_t v, md.GetI64(key));
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, " = ", v, " is outside the supported range [", lo, ", ", hi, "]"));
  }
  *out = v;
  return absl::OkStatus();
}

// Like ReadInt, but an absent key gives `fallback` (not range checked).
absl::Status ReadIntOr(const gguf::Metadata& md, std::string_view name, int64_t lo, int64_t hi,
                       int64_t fallback, int64_t* out) {
  if (!md.Has(Key(name))) {
    *out = fallback;
    return absl::OkStatus();
  }
  return ReadInt(md, name, lo, hi, out);
}

absl::Status ReadFloat(const gguf::Metadata& md, std::string_view name, bool required,
                       float fallback, float* out) {
  const std::string key = Key(name);
  if (!md.Has(key)) {
    if (required) return absl::NotFoundError(absl::StrCat("missing required key ", key));
    *out = fallback;
    return absl::OkStatus();
  }
  KTX_ASSIGN_OR_RETURN(const float v, md.GetF32(key));
  if (!std::isfinite(v)) {
    return absl::InvalidArgumentError(absl::StrCat(key, " = ", v, " is not finite"));
  }
  *out = v;
  return absl::OkStatus();
}

absl::Status Inconsistent(std::string message) {
  return absl::InvalidArgumentError(std::move(message));
}

constexpr int64_t kMaxDim = int64_t{1} << 24;    // any width of a real model is far below
constexpr int64_t kMaxCount = int64_t{1} << 16;  // layers, heads, experts
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxContext = int64_t{1} << 31;

}  // namespace

RoutingParams Deepseek2Hparams::routing() const {
  RoutingParams p;
  p.n_expert = n_expert;
  p.n_expert_used = n_expert_used;
  p.n_group = n_expert_groups;
  p.n_group_used = n_group_used;
  p.gating = gating;
  p.norm_weights = expert_weights_norm;
  p.weights_scale = expert_weights_scale;
  return p;
}

absl::StatusOr<Deepseek2Hparams> Deepseek2Hparams::FromMetadata(const gguf::Metadata& md) {
  if (!md.Has("general.architecture")) {
    return absl::NotFoundError("missing required key general.architecture");
  }
  KTX_ASSIGN_OR_RETURN(const std::string arch, md.GetString("general.architecture"));
  if (arch != kArch) {
    return absl::InvalidArgumentError(absl::StrCat("general.architecture is '", arch,
                                                   "', expected 'deepseek2' (DeepSeek-V2/V3)"));
  }
  Deepseek2Hparams hp;
  int64_t v = 0;
  KTX_RETURN_IF_ERROR(ReadInt(md, "block_count", 1, kMaxCount, &v));
  hp.n_layer = static_cast<int32_t>(v);
  KTX_RETURN_IF_ERROR(ReadInt(md, "context_length", 1, kMaxContext, &hp.n_ctx_train));
  KTX_RETURN_IF_ERROR(ReadInt(md, "embedding_length", 1, kMaxDim, &hp.n_embd));
  KTX_RETURN_IF_ERROR(ReadInt(md, "attention.head_count", 1, kMaxCount, &v));
  hp.n_head = static_cast<int32_t>(v);
  KTX_RETURN_IF_ERROR(ReadIntOr(md, "attention.q_lora_rank", 1, kMaxDim, 0, &hp.q_lora_rank));
  KTX_RETURN_IF_ERROR(ReadInt(md, "attention.kv_lora_rank", 1, kMaxDim, &hp.kv_lora_rank));
  if (!md.Has(Key("attention.key_length_mla")) || !md.Has(Key("attention.value_length_mla"))) {
    return absl::NotFoundError(
        absl::StrCat("missing required key ",
                     md.Has(Key("attention.key_length_mla")) ? Key("attention.value_length_mla")
                                                             : Key("attention.key_length_mla"),
                     ": files without the split MLA tensors attn_k_b / attn_v_b (old converts with "
                     "attn_kv_b) are not supported; reconvert the model"));
  }
  KTX_RETURN_IF_ERROR(ReadInt(md, "attention.key_length_mla", 2, kMaxDim, &hp.n_embd_head_qk));
  KTX_RETURN_IF_ERROR(ReadInt(md, "attention.value_length_mla", 1, kMaxDim, &hp.n_embd_head_v));
  int64_t key_length = 0, value_length = 0, head_count_kv = 0;
  KTX_RETURN_IF_ERROR(ReadIntOr(md, "attention.key_length", 1, kMaxDim, 0, &key_length));
  KTX_RETURN_IF_ERROR(ReadIntOr(md, "attention.value_length", 1, kMaxDim, 0, &value_length));
  KTX_RETURN_IF_ERROR(ReadIntOr(md, "attention.head_count_kv", 0, kMaxCount, 1, &head_count_kv));
  if (md.Has(Key("rope.dimension_count"))) {
    KTX_RETURN_IF_ERROR(ReadInt(md, "rope.dimension_count", 2, kMaxDim, &hp.n_rot));
  } else if (key_length > hp.kv_lora_rank) {
    hp.n_rot = key_length - hp.kv_lora_rank;
  } else {
    return absl::NotFoundError(absl::StrCat("missing required key ", Key("rope.dimension_count"),
                                            " (and no ", Key("attention.key_length"),
                                            " to derive it from)"));
  }
  KTX_RETURN_IF_ERROR(ReadFloat(md, "attention.layer_norm_rms_epsilon", true, 0.0f, &hp.rms_eps));
  KTX_RETURN_IF_ERROR(ReadInt(md, "leading_dense_block_count", 0, kMaxCount, &v));
  hp.n_layer_dense_lead = static_cast<int32_t>(v);
  const bool has_dense = hp.n_layer_dense_lead > 0;
  const bool has_moe = hp.n_layer_dense_lead < hp.n_layer;
  if (has_dense) {
    KTX_RETURN_IF_ERROR(ReadInt(md, "feed_forward_length", 1, kMaxDim, &hp.n_ff));
  } else {
    KTX_RETURN_IF_ERROR(ReadIntOr(md, "feed_forward_length", 0, kMaxDim, 0, &hp.n_ff));
  }
  if (has_moe) {
    KTX_RETURN_IF_ERROR(ReadInt(md, "expert_count", 1, kMaxCount, &v));
    hp.n_expert = static_cast<int32_t>(v);
    KTX_RETURN_IF_ERROR(ReadInt(md, "expert_used_count", 1, kMaxCount, &v));
    hp.n_expert_used = static_cast<int32_t>(v);
  } else {
    KTX_RETURN_IF_ERROR(ReadIntOr(md, "expert_count", 0, kMaxCount, 0, &v));
    hp.n_expert = static_cast<int32_t>(v);
    KTX_RETURN_IF_ERROR(ReadIntOr(md, "expert_used_count", 0, kMaxCount, 0, &v));
    hp.n_expert_used = static_cast<int32_t>(v);
  }
  KTX_RETURN_IF_ERROR(ReadInt(md, "expert_shared_count", 0, kMaxCount, &v));
  hp.n_expert_shared = static_cast<int32_t>(v);
  KTX_RETURN_IF_ERROR(ReadInt(md, "expert_feed_forward_length", 1, kMaxDim, &hp.n_ff_exp));
  KTX_RETURN_IF_ERROR(ReadIntOr(md, "expert_group_count", 0, kMaxCount, 0, &v));
  hp.n_expert_groups = static_cast<int32_t>(v);
  if (hp.n_expert_groups > 1) {
    KTX_RETURN_IF_ERROR(ReadInt(md, "expert_group_used_count", 1, kMaxCount, &v));
  } else {
    KTX_RETURN_IF_ERROR(ReadIntOr(md, "expert_group_used_count", 0, kMaxCount, 0, &v));
  }
  hp.n_group_used = static_cast<int32_t>(v);
  KTX_RETURN_IF_ERROR(ReadIntOr(md, "expert_gating_func", 0, kMaxCount, 0, &v));
  if (v == 0 || v == 1) {
    hp.gating = GatingFunc::kSoftmax;  // absent/0: DeepSeek-V2 files predate the key
  } else if (v == 2) {
    hp.gating = GatingFunc::kSigmoid;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(Key("expert_gating_func"), " = ", v,
                                                   " is not supported (1 = softmax, 2 = sigmoid)"));
  }
  KTX_RETURN_IF_ERROR(ReadFloat(md, "expert_weights_scale", false, 0.0f, &hp.expert_weights_scale));
  if (md.Has(Key("expert_weights_norm"))) {
    KTX_ASSIGN_OR_RETURN(hp.expert_weights_norm, md.GetBool(Key("expert_weights_norm")));
  }
  if (md.Has(Key("vocab_size"))) {
    KTX_RETURN_IF_ERROR(ReadInt(md, "vocab_size", 1, kMaxVocab, &hp.n_vocab));
  } else if (md.Has("tokenizer.ggml.tokens")) {
    KTX_ASSIGN_OR_RETURN(const std::vector<std::string> tokens,
                         md.GetStringArray("tokenizer.ggml.tokens"));
    hp.n_vocab = static_cast<int64_t>(tokens.size());
  }

  // Rope.
  KTX_RETURN_IF_ERROR(ReadFloat(md, "rope.freq_base", false, 10000.0f, &hp.rope_freq_base));
  std::string scaling = "linear";
  if (md.Has(Key("rope.scaling.type"))) {
    KTX_ASSIGN_OR_RETURN(scaling, md.GetString(Key("rope.scaling.type")));
  }
  if (scaling == "none") {
    hp.rope_scaling = RopeScalingType::kNone;
  } else if (scaling == "linear") {
    hp.rope_scaling = RopeScalingType::kLinear;
  } else if (scaling == "yarn") {
    hp.rope_scaling = RopeScalingType::kYarn;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(Key("rope.scaling.type"), " = '", scaling,
                                                   "' is not supported (none, linear, yarn)"));
  }
  KTX_RETURN_IF_ERROR(ReadFloat(md, "rope.scaling.factor", false, 0.0f, &hp.rope_scaling_factor));
  KTX_RETURN_IF_ERROR(ReadIntOr(md, "rope.scaling.original_context_length", 1, kMaxContext,
                                hp.n_ctx_train, &hp.n_ctx_orig_yarn));
  KTX_RETURN_IF_ERROR(
      ReadFloat(md, "rope.scaling.yarn_beta_fast", false, 32.0f, &hp.yarn_beta_fast));
  KTX_RETURN_IF_ERROR(
      ReadFloat(md, "rope.scaling.yarn_beta_slow", false, 1.0f, &hp.yarn_beta_slow));
  float log_mul = 0.0f;
  KTX_RETURN_IF_ERROR(ReadFloat(md, "rope.scaling.yarn_log_multiplier", false, 0.0f, &log_mul));
  // The converter stores 0.1 x mscale_all_dim; the division is in float as in
  // llama.cpp, so that 0.1f gives exactly 1.
  hp.yarn_log_mul = log_mul / 0.1f;

  // Consistency.
  if (head_count_kv != 1) {
    return Inconsistent(absl::StrCat(Key("attention.head_count_kv"), " = ", head_count_kv,
                                     ", expected 1 (MLA runs as multi-query attention over the "
                                     "latent)"));
  }
  if (hp.n_rot % 2 != 0) {
    return Inconsistent(absl::StrCat(Key("rope.dimension_count"), " = ", hp.n_rot,
                                     " must be even (rope rotates pairs)"));
  }
  if (hp.n_embd_head_qk <= hp.n_rot) {
    return Inconsistent(absl::StrCat(Key("attention.key_length_mla"), " = ", hp.n_embd_head_qk,
                                     " must exceed ", Key("rope.dimension_count"), " = ", hp.n_rot,
                                     " (qk_nope + qk_rope)"));
  }
  if (key_length != 0 && key_length != hp.kv_lora_rank + hp.n_rot) {
    return Inconsistent(absl::StrCat(
        Key("attention.key_length"), " = ", key_length,
        ", expected kv_lora_rank + rope.dimension_count = ", hp.kv_lora_rank, " + ", hp.n_rot));
  }
  if (value_length != 0 && value_length != hp.kv_lora_rank) {
    return Inconsistent(absl::StrCat(Key("attention.value_length"), " = ", value_length,
                                     ", expected kv_lora_rank = ", hp.kv_lora_rank));
  }
  if (!(hp.rms_eps > 0.0f)) {
    return Inconsistent(absl::StrCat(Key("attention.layer_norm_rms_epsilon"), " = ", hp.rms_eps,
                                     " must be positive"));
  }
  if (hp.n_layer_dense_lead > hp.n_layer) {
    return Inconsistent(absl::StrCat(Key("leading_dense_block_count"), " = ", hp.n_layer_dense_lead,
                                     " exceeds ", Key("block_count"), " = ", hp.n_layer));
  }
  if (hp.n_expert_used > hp.n_expert) {
    return Inconsistent(absl::StrCat(Key("expert_used_count"), " = ", hp.n_expert_used, " exceeds ",
                                     Key("expert_count"), " = ", hp.n_expert));
  }
  if (hp.n_expert_groups > 1) {
    if (hp.n_expert % hp.n_expert_groups != 0) {
      return Inconsistent(absl::StrCat(Key("expert_count"), " = ", hp.n_expert,
                                       " is not a multiple of ", Key("expert_group_count"), " = ",
                                       hp.n_expert_groups));
    }
    if (hp.n_group_used > hp.n_expert_groups) {
      return Inconsistent(absl::StrCat(Key("expert_group_used_count"), " = ", hp.n_group_used,
                                       " exceeds ", Key("expert_group_count"), " = ",
                                       hp.n_expert_groups));
    }
    const int64_t reachable =
        static_cast<int64_t>(hp.n_group_used) * (hp.n_expert / hp.n_expert_groups);
    if (hp.n_expert_used > reachable) {
      return Inconsistent(absl::StrCat(Key("expert_used_count"), " = ", hp.n_expert_used,
                                       " exceeds the ", reachable, " experts of the ",
                                       hp.n_group_used, " groups kept (",
                                       Key("expert_group_used_count"), ")"));
    }
  }
  if (!(hp.rope_freq_base > 0.0f)) {
    return Inconsistent(
        absl::StrCat(Key("rope.freq_base"), " = ", hp.rope_freq_base, " must be positive"));
  }
  if (hp.rope_scaling_factor < 0.0f) {
    return Inconsistent(absl::StrCat(Key("rope.scaling.factor"), " = ", hp.rope_scaling_factor,
                                     " must not be negative"));
  }
  if (hp.rope_scaling == RopeScalingType::kYarn &&
      !(hp.yarn_beta_fast > 0.0f && hp.yarn_beta_slow > 0.0f)) {
    return Inconsistent(absl::StrCat(Key("rope.scaling.yarn_beta_fast"),
                                     " / yarn_beta_slow = ", hp.yarn_beta_fast, " / ",
                                     hp.yarn_beta_slow, " must be positive"));
  }
  KTX_RETURN_IF_ERROR(hp.Derive());
  return hp;
}

absl::Status Deepseek2Hparams::Derive() {
  freq_scale = rope_scaling_factor == 0.0f ? 1.0 : 1.0 / static_cast<double>(rope_scaling_factor);
  if (rope_scaling == RopeScalingType::kNone) freq_scale = 1.0;
  ext_factor = rope_scaling == RopeScalingType::kYarn ? 1.0 : 0.0;
  const double factor = 1.0 / freq_scale;
  // llama.cpp's get_mscale: 1 for factors <= 1.
  auto get_mscale = [](double scale, double mscale) {
    return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
  };
  yarn_attn_factor = 1.0;
  if (ext_factor != 0.0) {
    if (yarn_log_mul != 0.0f) {
      // DeepSeek files carry mscale == mscale_all_dim (DeepSeek-V2 special
      // case in llama.cpp): the ratio is 1.
      const double mscale_all_dims = yarn_log_mul;
      const double mscale = mscale_all_dims != 1.0 ? mscale_all_dims : 1.0;
      yarn_attn_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dims);
    } else {
      yarn_attn_factor = get_mscale(factor, 1.0);
    }
    // Cancels the magnitude factor rope itself applies for YaRN.
    yarn_attn_factor *= 1.0 / (1.0 + 0.1 * std::log(factor));
  }
  const double attn_factor_org = yarn_attn_factor * (1.0 + 0.1 * std::log(factor));
  const double mscale =
      attn_factor_org * (1.0 + 0.1 * static_cast<double>(yarn_log_mul) * std::log(factor));
  kq_scale = mscale * mscale / std::sqrt(static_cast<double>(n_embd_head_qk));

  rope = RopeYarnParams{};
  rope.n_rot = n_rot;
  rope.freq_base = rope_freq_base;
  rope.freq_scale = freq_scale;
  rope.ext_factor = ext_factor;
  rope.attn_factor = yarn_attn_factor;
  rope.SetCorrDims(n_ctx_orig_yarn, yarn_beta_fast, yarn_beta_slow);
  if (!std::isfinite(kq_scale) || !(kq_scale > 0.0)) {
    return absl::InvalidArgumentError(absl::StrCat("rope scaling of ", Key("rope.scaling.factor"),
                                                   " = ", rope_scaling_factor,
                                                   " gives an invalid attention scale ", kq_scale));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Weights.

namespace {

std::string ShapeString(const std::vector<int64_t>& ne) {
  return absl::StrCat("{", absl::StrJoin(ne, ", "), "}");
}

class TensorLookup {
 public:
  explicit TensorLookup(const gguf::GgufFile& file) : file_(file) {}

  absl::StatusOr<const gguf::TensorInfo*> Required(const std::string& name,
                                                   const std::vector<int64_t>& ne,
                                                   std::string_view why = "") const {
    if (file_.FindTensor(name) == nullptr) {
      return absl::NotFoundError(absl::StrCat("missing tensor '", name, "' (expected shape ",
                                              ShapeString(ne), why.empty() ? "" : "; ",
                                              std::string(why), ")"));
    }
    KTX_ASSIGN_OR_RETURN(const gguf::TensorInfo* t, file_.GetTensor(name, ne));
    if (!kernels::CanDequantize(t->type)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "' has type ", kernels::TraitsOf(t->type).name,
          ", which ktx cannot compute with (supported: ", kernels::SupportedTensorTypeNames(),
          ")"));
    }
    if (t->data == nullptr) {
      return absl::InternalError(absl::StrCat("tensor '", name, "' has no data"));
    }
    return t;
  }

  absl::StatusOr<const gguf::TensorInfo*> Optional(const std::string& name,
                                                   const std::vector<int64_t>& ne) const {
    if (file_.FindTensor(name) == nullptr) return nullptr;
    return Required(name, ne);
  }

  bool Has(const std::string& name) const { return file_.FindTensor(name) != nullptr; }

 private:
  const gguf::GgufFile& file_;
};

}  // namespace

absl::StatusOr<Deepseek2Weights> Deepseek2Weights::FromGguf(const gguf::GgufFile& file,
                                                            const Deepseek2Hparams& hp) {
  TensorLookup lookup(file);
  Deepseek2Weights w;
  const int64_t n_embd = hp.n_embd;
  const int64_t n_vocab = hp.n_vocab;
  const int64_t n_head = hp.n_head;
  KTX_ASSIGN_OR_RETURN(w.token_embd, lookup.Required("token_embd.weight", {n_embd, n_vocab}));
  KTX_ASSIGN_OR_RETURN(w.output_norm, lookup.Required("output_norm.weight", {n_embd}));
  KTX_ASSIGN_OR_RETURN(w.output, lookup.Optional("output.weight", {n_embd, n_vocab}));
  if (w.output == nullptr) {
    w.output = w.token_embd;
    w.output_tied = true;
  }
  w.layers.resize(hp.n_layer);
  for (int il = 0; il < hp.n_layer; ++il) {
    Deepseek2LayerWeights& l = w.layers[il];
    auto name = [il](std::string_view what) {
      return absl::StrCat("blk.", il, ".") + std::string(what);
    };
    KTX_ASSIGN_OR_RETURN(l.attn_norm, lookup.Required(name("attn_norm.weight"), {n_embd}));
    const int64_t q_width = n_head * hp.n_embd_head_qk;
    if (hp.is_lite()) {
      KTX_ASSIGN_OR_RETURN(
          l.attn_q,
          lookup.Required(name("attn_q.weight"), {n_embd, q_width},
                          absl::StrCat("lite layout: ", Key("attention.q_lora_rank"), " absent")));
    } else {
      KTX_ASSIGN_OR_RETURN(l.attn_q_a,
                           lookup.Required(name("attn_q_a.weight"), {n_embd, hp.q_lora_rank}));
      KTX_ASSIGN_OR_RETURN(l.attn_q_a_norm,
                           lookup.Required(name("attn_q_a_norm.weight"), {hp.q_lora_rank}));
      KTX_ASSIGN_OR_RETURN(l.attn_q_b,
                           lookup.Required(name("attn_q_b.weight"), {hp.q_lora_rank, q_width}));
    }
    KTX_ASSIGN_OR_RETURN(l.attn_kv_a_mqa, lookup.Required(name("attn_kv_a_mqa.weight"),
                                                          {n_embd, hp.kv_lora_rank + hp.n_rot}));
    KTX_ASSIGN_OR_RETURN(l.attn_kv_a_norm,
                         lookup.Required(name("attn_kv_a_norm.weight"), {hp.kv_lora_rank}));
    if (!lookup.Has(name("attn_k_b.weight")) && lookup.Has(name("attn_kv_b.weight"))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name("attn_kv_b.weight"), "' (unsplit MLA) is not supported: expected '",
          name("attn_k_b.weight"), "' and '", name("attn_v_b.weight"), "'; reconvert the model"));
    }
    KTX_ASSIGN_OR_RETURN(l.attn_k_b, lookup.Required(name("attn_k_b.weight"),
                                                     {hp.qk_nope(), hp.kv_lora_rank, n_head}));
    KTX_ASSIGN_OR_RETURN(l.attn_v_b, lookup.Required(name("attn_v_b.weight"),
                                                     {hp.kv_lora_rank, hp.n_embd_head_v, n_head}));
    KTX_ASSIGN_OR_RETURN(l.attn_output, lookup.Required(name("attn_output.weight"),
                                                        {n_head * hp.n_embd_head_v, n_embd}));
    KTX_ASSIGN_OR_RETURN(l.ffn_norm, lookup.Required(name("ffn_norm.weight"), {n_embd}));
    if (!hp.IsMoeLayer(il)) {
      KTX_ASSIGN_OR_RETURN(l.ffn_gate, lookup.Required(name("ffn_gate.weight"), {n_embd, hp.n_ff}));
      KTX_ASSIGN_OR_RETURN(l.ffn_up, lookup.Required(name("ffn_up.weight"), {n_embd, hp.n_ff}));
      KTX_ASSIGN_OR_RETURN(l.ffn_down, lookup.Required(name("ffn_down.weight"), {hp.n_ff, n_embd}));
      continue;
    }
    const int64_t n_expert = hp.n_expert;
    KTX_ASSIGN_OR_RETURN(l.ffn_gate_inp,
                         lookup.Required(name("ffn_gate_inp.weight"), {n_embd, n_expert}));
    KTX_ASSIGN_OR_RETURN(l.exp_probs_b, lookup.Optional(name("exp_probs_b.bias"), {n_expert}));
    if (!lookup.Has(name("ffn_gate_exps.weight")) && lookup.Has(name("ffn_gate_up_exps.weight"))) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name("ffn_gate_up_exps.weight"),
                       "' (fused gate+up experts) is not supported yet: expected '",
                       name("ffn_gate_exps.weight"), "' and '", name("ffn_up_exps.weight"), "'"));
    }
    KTX_ASSIGN_OR_RETURN(l.ffn_gate_exps, lookup.Required(name("ffn_gate_exps.weight"),
                                                          {n_embd, hp.n_ff_exp, n_expert}));
    KTX_ASSIGN_OR_RETURN(l.ffn_up_exps, lookup.Required(name("ffn_up_exps.weight"),
                                                        {n_embd, hp.n_ff_exp, n_expert}));
    KTX_ASSIGN_OR_RETURN(l.ffn_down_exps, lookup.Required(name("ffn_down_exps.weight"),
                                                          {hp.n_ff_exp, n_embd, n_expert}));
    if (hp.n_expert_shared > 0) {
      const int64_t n_ff_sh = hp.n_ff_exp * hp.n_expert_shared;
      KTX_ASSIGN_OR_RETURN(l.ffn_gate_shexp,
                           lookup.Required(name("ffn_gate_shexp.weight"), {n_embd, n_ff_sh}));
      KTX_ASSIGN_OR_RETURN(l.ffn_up_shexp,
                           lookup.Required(name("ffn_up_shexp.weight"), {n_embd, n_ff_sh}));
      KTX_ASSIGN_OR_RETURN(l.ffn_down_shexp,
                           lookup.Required(name("ffn_down_shexp.weight"), {n_ff_sh, n_embd}));
    }
  }
  return w;
}

// ---------------------------------------------------------------------------
// Shared math.

void GatedFfn(const WeightMatrix& gate, const WeightMatrix& up, const WeightMatrix& down,
              const float* h, int64_t h_stride, int64_t n_tokens, float* out, int64_t out_stride) {
  const int64_t n_ff = gate.n_rows;
  KTX_CHECK(up.n_rows == n_ff && down.n_cols == n_ff && gate.n_cols == up.n_cols);
  std::vector<float> g(static_cast<size_t>(n_tokens * n_ff));
  std::vector<float> u(static_cast<size_t>(n_tokens * n_ff));
  MatMul(gate, h, h_stride, n_tokens, g.data(), n_ff);
  MatMul(up, h, h_stride, n_tokens, u.data(), n_ff);
  for (size_t i = 0; i < g.size(); ++i) {
    g[i] = static_cast<float>(Silu(g[i]) * static_cast<double>(u[i]));
  }
  MatMul(down, g.data(), n_ff, n_tokens, out, out_stride);
}

absl::Status ReferenceExpertBackend::Compute(int il, const Activations& h, const Routing& routing,
                                             std::span<const uint8_t> expert_mask,
                                             Activations* out) {
  if (il < 0 || il >= hparams_.n_layer || !hparams_.IsMoeLayer(il)) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", il, " is not a MoE layer"));
  }
  const int64_t n = h.n_tokens();
  const int64_t n_embd = hparams_.n_embd;
  const int32_t k_used = routing.n_expert_used;
  if (h.n_cols() != n_embd || routing.n_tokens != n ||
      static_cast<int64_t>(routing.expert_ids.size()) != n * k_used ||
      routing.weights.size() != routing.expert_ids.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("routed experts of layer ", il, ": activations [", h.n_tokens(), ", ",
                     h.n_cols(), "] and routing of ", routing.n_tokens, " tokens x ", k_used,
                     " do not match (n_embd ", n_embd, ")"));
  }
  if (!expert_mask.empty() && static_cast<int64_t>(expert_mask.size()) != hparams_.n_expert) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert mask has ", expert_mask.size(),
                     " entries, expected n_expert = ", hparams_.n_expert));
  }
  // Entries (token t, slot k) per expert.
  std::vector<std::vector<int64_t>> entries(hparams_.n_expert);
  for (int64_t t = 0; t < n; ++t) {
    for (int k = 0; k < k_used; ++k) {
      const int32_t e = routing.id(t, k);
      if (e == kNoExpert) continue;
      if (e < 0 || e >= hparams_.n_expert) {
        return absl::InvalidArgumentError(absl::StrCat("routing of token ", t, " names expert ", e,
                                                       ", outside [0, ", hparams_.n_expert, ")"));
      }
      if (expert_mask.empty() || expert_mask[e] != 0) entries[e].push_back(t * k_used + k);
    }
  }
  const Deepseek2LayerWeights& l = weights_.layers[il];
  std::vector<double> acc(static_cast<size_t>(n * n_embd), 0.0);
  Activations xs, ys;
  for (int32_t e = 0; e < hparams_.n_expert; ++e) {
    const std::vector<int64_t>& list = entries[e];
    if (list.empty()) continue;
    const int64_t m = static_cast<int64_t>(list.size());
    xs.Resize(m, n_embd);
    ys.Resize(m, n_embd);
    for (int64_t j = 0; j < m; ++j) {
      const float* src = h.row(list[j] / k_used);
      std::copy(src, src + n_embd, xs.row(j));
    }
    GatedFfn(WeightMatrix::Slab(*l.ffn_gate_exps, e), WeightMatrix::Slab(*l.ffn_up_exps, e),
             WeightMatrix::Slab(*l.ffn_down_exps, e), xs.data(), n_embd, m, ys.data(), n_embd);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t t = list[j] / k_used;
      const double w = routing.weights[list[j]];
      double* dst = acc.data() + t * n_embd;
      const float* y = ys.row(j);
      for (int64_t i = 0; i < n_embd; ++i) dst[i] += w * y[i];
    }
  }
  out->Resize(n, n_embd);
  for (size_t i = 0; i < acc.size(); ++i) out->data()[i] = static_cast<float>(acc[i]);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Model.

absl::StatusOr<std::unique_ptr<Deepseek2Model>> Deepseek2Model::Open(
    const std::string& path, const gguf::OpenOptions& options) {
  KTX_ASSIGN_OR_RETURN(std::unique_ptr<gguf::GgufFile> file, gguf::GgufFile::Open(path, options));
  return Load(std::move(file));
}

absl::StatusOr<std::unique_ptr<Deepseek2Model>> Deepseek2Model::Load(
    std::unique_ptr<gguf::GgufFile> file) {
  if (file == nullptr) return absl::InvalidArgumentError("no GGUF file");
  const std::string file_name = file->paths().empty() ? "model" : file->paths().front();
  // Errors name the file (once: the GGUF getters may have done so already).
  auto with_file = [&file_name](const absl::Status& s) {
    if (absl::StartsWith(s.message(), file_name)) return s;
    return absl::Status(s.code(), absl::StrCat(file_name, ": ", s.message()));
  };
  absl::StatusOr<Deepseek2Hparams> hp = Deepseek2Hparams::FromMetadata(file->metadata());
  if (!hp.ok()) return with_file(hp.status());
  if (hp->n_vocab == 0) {
    // No vocab_size key and no tokenizer: the embedding table decides.
    const gguf::TensorInfo* embd = file->FindTensor("token_embd.weight");
    if (embd == nullptr || embd->ne.size() < 2) {
      return with_file(absl::NotFoundError(
          absl::StrCat("cannot tell the vocabulary size: no ", Key("vocab_size"),
                       ", no tokenizer.ggml.tokens and no 2-D token_embd.weight")));
    }
    hp->n_vocab = embd->ne[1];
  }
  std::unique_ptr<Deepseek2Model> model(new Deepseek2Model());
  model->hparams_ = *std::move(hp);
  absl::StatusOr<Deepseek2Weights> weights = Deepseek2Weights::FromGguf(*file, model->hparams_);
  if (!weights.ok()) return with_file(weights.status());
  model->weights_ = *std::move(weights);
  model->file_ = std::move(file);
  model->reference_experts_ =
      std::make_unique<ReferenceExpertBackend>(model->hparams_, model->weights_);
  model->expert_backend_ = model->reference_experts_.get();
  return model;
}

void Deepseek2Model::SetExpertBackend(ExpertBackend* backend) {
  expert_backend_ = backend != nullptr ? backend : reference_experts_.get();
}

absl::Status Deepseek2Model::SetRoutingPolicy(std::shared_ptr<const RoutingPolicy> policy) {
  if (policy != nullptr) {
    KTX_RETURN_IF_ERROR(policy->Validate(hparams_.n_layer, hparams_.n_expert_used));
    if (policy->empty()) policy = nullptr;
  }
  routing_policy_ = std::move(policy);
  return absl::OkStatus();
}

absl::Status Deepseek2Model::CheckLayer(int il) const {
  if (il < 0 || il >= hparams_.n_layer) {
    return absl::OutOfRangeError(
        absl::StrCat("layer ", il, " outside [0, ", hparams_.n_layer, ")"));
  }
  return absl::OkStatus();
}

absl::Status Deepseek2Model::CheckActivations(const Activations& a, const char* what) const {
  if (a.n_cols() != hparams_.n_embd || a.n_tokens() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": activations of shape [", a.n_tokens(),
                                                   ", ", a.n_cols(), "], expected [n_tokens > 0, ",
                                                   hparams_.n_embd, "]"));
  }
  return absl::OkStatus();
}

absl::Status Deepseek2Model::Embed(std::span<const int32_t> tokens, Activations* x) const {
  const int64_t n = static_cast<int64_t>(tokens.size());
  for (int64_t t = 0; t < n; ++t) {
    if (tokens[t] < 0 || tokens[t] >= hparams_.n_vocab) {
      return absl::OutOfRangeError(absl::StrCat("token ", t, " has id ", tokens[t],
                                                ", outside the vocabulary [0, ", hparams_.n_vocab,
                                                ")"));
    }
  }
  const gguf::TensorInfo& embd = *weights_.token_embd;
  const int64_t row_bytes = embd.row_bytes();
  x->Resize(n, hparams_.n_embd);
  for (int64_t t = 0; t < n; ++t) {
    kernels::DequantizeRow(embd.type, embd.data + tokens[t] * row_bytes, x->row(t),
                           hparams_.n_embd);
  }
  return absl::OkStatus();
}

absl::Status Deepseek2Model::AttentionBlock(int il, std::span<const int32_t> positions,
                                            kv_cache::SequenceKv* kv, Activations* x) const {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  if (kv == nullptr) return absl::InvalidArgumentError("AttentionBlock: no KV cache sequence");
  KTX_RETURN_IF_ERROR(CheckActivations(*x, "AttentionBlock"));
  const Deepseek2Hparams& hp = hparams_;
  const int64_t n = x->n_tokens();
  const kv_cache::LatentKvLayout& layout = kv->layout();
  if (layout.n_layer != hp.n_layer || layout.kv_lora_rank != hp.kv_lora_rank ||
      layout.n_rot != hp.n_rot) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache layout (", layout.n_layer, " layers, ", layout.kv_lora_rank, " + ",
                     layout.n_rot, ") does not match the model (", hp.n_layer, " layers, ",
                     hp.kv_lora_rank, " + ", hp.n_rot, ")"));
  }
  if (static_cast<int64_t>(positions.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("AttentionBlock: ", positions.size(), " positions for ", n, " tokens"));
  }
  KTX_RETURN_IF_ERROR(kv->CheckRoom(n));
  for (int64_t t = 0; t < n; ++t) {
    if (positions[t] != kv->length() + t) {
      return absl::InvalidArgumentError(absl::StrCat("AttentionBlock: token ", t, " has position ",
                                                     positions[t], ", expected ", kv->length() + t,
                                                     " (the batch must continue the sequence)"));
    }
  }

  const Deepseek2LayerWeights& w = weights_.layers[il];
  const int64_t n_embd = hp.n_embd;
  const int64_t n_head = hp.n_head;
  const int64_t hd = hp.n_embd_head_qk;
  const int64_t nope = hp.qk_nope();
  const int64_t n_rot = hp.n_rot;
  const int64_t half = n_rot / 2;
  const int64_t kvl = hp.kv_lora_rank;
  const int64_t hdv = hp.n_embd_head_v;
  const double eps = hp.rms_eps;

  // h = rmsnorm(x) · attn_norm
  const std::vector<float> attn_norm = DequantizeTensor(*w.attn_norm);
  Activations h(n, n_embd);
  for (int64_t t = 0; t < n; ++t) RmsNorm(x->row(t), attn_norm.data(), n_embd, eps, h.row(t));

  // q: [n, n_head * hd], per head [q_nope | q_pe].
  Activations q(n, n_head * hd);
  if (hp.is_lite()) {
    MatMul(WeightMatrix::Of(*w.attn_q), h.data(), n_embd, n, q.data(), n_head * hd);
  } else {
    const int64_t ql = hp.q_lora_rank;
    Activations qa(n, ql);
    MatMul(WeightMatrix::Of(*w.attn_q_a), h.data(), n_embd, n, qa.data(), ql);
    const std::vector<float> q_norm = DequantizeTensor(*w.attn_q_a_norm);
    for (int64_t t = 0; t < n; ++t) RmsNorm(qa.row(t), q_norm.data(), ql, eps, qa.row(t));
    MatMul(WeightMatrix::Of(*w.attn_q_b), qa.data(), ql, n, q.data(), n_head * hd);
  }

  // The latent row [c | k_pe] of every new token goes straight into the cache.
  Activations kva(n, kvl + n_rot);
  MatMul(WeightMatrix::Of(*w.attn_kv_a_mqa), h.data(), n_embd, n, kva.data(), kvl + n_rot);
  const std::vector<float> kv_norm = DequantizeTensor(*w.attn_kv_a_norm);
  std::vector<double> cos_t(static_cast<size_t>(n * half)), sin_t(static_cast<size_t>(n * half));
  for (int64_t t = 0; t < n; ++t) {
    RopeAngles(hp.rope, positions[t], cos_t.data() + t * half, sin_t.data() + t * half);
    float* row = kv->Row(il, positions[t]);
    RmsNorm(kva.row(t), kv_norm.data(), kvl, eps, row);
    std::copy(kva.row(t) + kvl, kva.row(t) + kvl + n_rot, row + kvl);
    ApplyRope(cos_t.data() + t * half, sin_t.data() + t * half, n_rot, row + kvl);
  }

  // Absorbed queries: q_abs[t, head] = attn_k_b[head] · q_nope[t, head]  (kvl wide).
  Activations q_abs(n, n_head * kvl);
  for (int64_t head = 0; head < n_head; ++head) {
    MatMul(WeightMatrix::Slab(*w.attn_k_b, head), q.data() + head * hd, n_head * hd, n,
           q_abs.data() + head * kvl, n_head * kvl);
  }
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t head = 0; head < n_head; ++head) {
      ApplyRope(cos_t.data() + t * half, sin_t.data() + t * half, n_rot,
                q.row(t) + head * hd + nope);
    }
  }

  // Attention over the latents: ctx[t, head] = Σ_s softmax(score) c[s].
  Activations ctx(n, n_head * kvl);
  const double kq_scale = hp.kq_scale;
  const kv_cache::SequenceKv& kv_read = *kv;
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(0, n * n_head), [&](const tbb::blocked_range<int64_t>& range) {
        std::vector<double> scores, acc(kvl);
        for (int64_t i = range.begin(); i != range.end(); ++i) {
          const int64_t t = i / n_head;
          const int64_t head = i % n_head;
          const int64_t n_kv = positions[t] + 1;
          const float* qa = q_abs.row(t) + head * kvl;
          const float* qp = q.row(t) + head * hd + nope;
          scores.resize(n_kv);
          double max_score = -std::numeric_limits<double>::infinity();
          for (int64_t s = 0; s < n_kv; ++s) {
            const float* row = kv_read.Row(il, s);
            scores[s] = (DotF64(qa, row, kvl) + DotF64(qp, row + kvl, n_rot)) * kq_scale;
            max_score = std::max(max_score, scores[s]);
          }
          double sum = 0.0;
          for (int64_t s = 0; s < n_kv; ++s) {
            scores[s] = std::exp(scores[s] - max_score);
            sum += scores[s];
          }
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t s = 0; s < n_kv; ++s) {
            const double p = scores[s] / sum;
            const float* row = kv_read.Row(il, s);
            for (int64_t c = 0; c < kvl; ++c) acc[c] += p * row[c];
          }
          float* dst = ctx.row(t) + head * kvl;
          for (int64_t c = 0; c < kvl; ++c) dst[c] = static_cast<float>(acc[c]);
        }
      });

  // Per-head values: o[t, head] = attn_v_b[head] · ctx[t, head]  (hdv wide).
  Activations o(n, n_head * hdv);
  for (int64_t head = 0; head < n_head; ++head) {
    MatMul(WeightMatrix::Slab(*w.attn_v_b, head), ctx.data() + head * kvl, n_head * kvl, n,
           o.data() + head * hdv, n_head * hdv);
  }

  // x += attn_output · o
  Activations out(n, n_embd);
  MatMul(WeightMatrix::Of(*w.attn_output), o.data(), n_head * hdv, n, out.data(), n_embd);
  for (int64_t i = 0; i < n * n_embd; ++i) {
    x->data()[i] = static_cast<float>(static_cast<double>(x->data()[i]) + out.data()[i]);
  }
  return absl::OkStatus();
}

absl::Status Deepseek2Model::FfnNorm(int il, const Activations& x, Activations* h) const {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckActivations(x, "FfnNorm"));
  const std::vector<float> norm = DequantizeTensor(*weights_.layers[il].ffn_norm);
  h->Resize(x.n_tokens(), hparams_.n_embd);
  for (int64_t t = 0; t < x.n_tokens(); ++t) {
    RmsNorm(x.row(t), norm.data(), hparams_.n_embd, hparams_.rms_eps, h->row(t));
  }
  return absl::OkStatus();
}

absl::Status Deepseek2Model::DenseFfn(int il, const Activations& h, Activations* out) const {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckActivations(h, "DenseFfn"));
  if (hparams_.IsMoeLayer(il)) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", il, " is a MoE layer, not dense"));
  }
  const Deepseek2LayerWeights& l = weights_.layers[il];
  out->Resize(h.n_tokens(), hparams_.n_embd);
  GatedFfn(WeightMatrix::Of(*l.ffn_gate), WeightMatrix::Of(*l.ffn_up),
           WeightMatrix::Of(*l.ffn_down), h.data(), hparams_.n_embd, h.n_tokens(), out->data(),
           hparams_.n_embd);
  return absl::OkStatus();
}

absl::Status Deepseek2Model::Route(int il, const Activations& h, Routing* routing) const {
  return Route(il, h, {}, routing);
}

absl::Status Deepseek2Model::Route(int il, const Activations& h,
                                   std::span<const RoutingPolicy* const> policies,
                                   Routing* routing) const {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckActivations(h, "Route"));
  if (!hparams_.IsMoeLayer(il)) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", il, " is dense, it has no router"));
  }
  const Deepseek2LayerWeights& l = weights_.layers[il];
  const int64_t n = h.n_tokens();
  std::vector<double> logits(static_cast<size_t>(n * hparams_.n_expert));
  MatMulF64(WeightMatrix::Of(*l.ffn_gate_inp), h.data(), hparams_.n_embd, n, logits.data(),
            hparams_.n_expert);
  std::vector<float> bias;
  if (l.exp_probs_b != nullptr) bias = DequantizeTensor(*l.exp_probs_b);
  if (!(policies.empty() || policies.size() == 1 || static_cast<int64_t>(policies.size()) == n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Route: ", policies.size(), " token policies for ", n, " tokens"));
  }
  // Each token's top-k rule (null: keeps all K); distinct policies resolved once.
  const int32_t k_used = hparams_.n_expert_used;
  std::vector<TopKRule> resolved;
  std::vector<const RoutingPolicy*> resolved_of;
  auto rule_of = [&](const RoutingPolicy* p) -> std::optional<size_t> {
    if (p == nullptr) p = routing_policy_.get();
    if (p == nullptr) return std::nullopt;
    for (size_t i = 0; i < resolved_of.size(); ++i) {
      if (resolved_of[i] == p) return i;
    }
    const TopKRule rule = p->ForLayer(il).rule;
    KTX_CHECK(rule.top_k <= k_used && rule.min_k <= k_used);  // Validate()d policies only
    resolved_of.push_back(p);
    resolved.push_back(rule);
    return resolved.size() - 1;
  };
  const size_t n_rules = policies.size() <= 1 ? 1 : policies.size();
  std::vector<std::optional<size_t>> index(n_rules);
  bool any_rule = false;
  for (size_t t = 0; t < n_rules; ++t) {
    index[t] = rule_of(policies.empty() ? nullptr : policies[t]);
    if (index[t].has_value() && resolved[*index[t]].KeepsAll(k_used)) index[t].reset();
    any_rule = any_rule || index[t].has_value();
  }
  std::vector<const TopKRule*> rules;
  if (any_rule) {
    rules.resize(n_rules, nullptr);
    for (size_t t = 0; t < n_rules; ++t) {
      if (index[t].has_value()) rules[t] = &resolved[*index[t]];
    }
  }
  RouteFromLogits(hparams_.routing(), logits.data(), n, bias.empty() ? nullptr : bias.data(), rules,
                  routing);
  return absl::OkStatus();
}

absl::Status Deepseek2Model::RoutedExperts(int il, const Activations& h, const Routing& routing,
                                           std::span<const uint8_t> expert_mask,
                                           Activations* out) const {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckActivations(h, "RoutedExperts"));
  if (!hparams_.IsMoeLayer(il)) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", il, " is dense, it has no experts"));
  }
  return expert_backend_->Compute(il, h, routing, expert_mask, out);
}

absl::Status Deepseek2Model::SharedExperts(int il, const Activations& h, Activations* out) const {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckActivations(h, "SharedExperts"));
  if (!hparams_.IsMoeLayer(il)) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", il, " is dense, it has no shared experts"));
  }
  out->Resize(h.n_tokens(), hparams_.n_embd);
  if (hparams_.n_expert_shared == 0) return absl::OkStatus();
  const Deepseek2LayerWeights& l = weights_.layers[il];
  GatedFfn(WeightMatrix::Of(*l.ffn_gate_shexp), WeightMatrix::Of(*l.ffn_up_shexp),
           WeightMatrix::Of(*l.ffn_down_shexp), h.data(), hparams_.n_embd, h.n_tokens(),
           out->data(), hparams_.n_embd);
  return absl::OkStatus();
}

absl::Status Deepseek2Model::Combine(std::span<const Activations* const> parts,
                                     Activations* x) const {
  KTX_RETURN_IF_ERROR(CheckActivations(*x, "Combine"));
  for (const Activations* p : parts) {
    if (p == nullptr || p->n_tokens() != x->n_tokens() || p->n_cols() != x->n_cols()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Combine: a part's shape does not match the residual stream [",
                       x->n_tokens(), ", ", x->n_cols(), "]"));
    }
  }
  const int64_t n = x->n_tokens() * x->n_cols();
  for (int64_t i = 0; i < n; ++i) {
    double sum = x->data()[i];
    for (const Activations* p : parts) sum += p->data()[i];
    x->data()[i] = static_cast<float>(sum);
  }
  return absl::OkStatus();
}

absl::Status Deepseek2Model::Head(const Activations& x, LogitsRows rows,
                                  Activations* logits) const {
  KTX_RETURN_IF_ERROR(CheckActivations(x, "Head"));
  const int64_t first = rows == LogitsRows::kAll ? 0 : x.n_tokens() - 1;
  const int64_t n_out = x.n_tokens() - first;
  const std::vector<float> norm = DequantizeTensor(*weights_.output_norm);
  Activations hn(n_out, hparams_.n_embd);
  for (int64_t t = 0; t < n_out; ++t) {
    RmsNorm(x.row(first + t), norm.data(), hparams_.n_embd, hparams_.rms_eps, hn.row(t));
  }
  logits->Resize(n_out, hparams_.n_vocab);
  MatMul(WeightMatrix::Of(*weights_.output), hn.data(), hparams_.n_embd, n_out, logits->data(),
         hparams_.n_vocab);
  return absl::OkStatus();
}

absl::Status Deepseek2Model::Forward(std::span<const int32_t> tokens, kv_cache::SequenceKv* kv,
                                     LogitsRows rows, Activations* logits,
                                     const ForwardOptions& options) const {
  if (tokens.empty()) return absl::InvalidArgumentError("Forward: empty token batch");
  if (kv == nullptr) return absl::InvalidArgumentError("Forward: no KV cache sequence");
  const int64_t n = static_cast<int64_t>(tokens.size());
  KTX_RETURN_IF_ERROR(kv->CheckRoom(n));
  if (kv->length() + n > std::numeric_limits<int32_t>::max()) {
    return absl::OutOfRangeError("Forward: positions beyond 2^31");
  }
  std::vector<int32_t> positions(n);
  for (int64_t t = 0; t < n; ++t) positions[t] = static_cast<int32_t>(kv->length() + t);

  Activations x, h, f, shared, late;
  Routing routing;
  const RoutingPolicy* policy_list[] = {options.policy};
  const std::span<const RoutingPolicy* const> policies =
      options.policy != nullptr ? std::span<const RoutingPolicy* const>(policy_list)
                                : std::span<const RoutingPolicy* const>();
  const RoutingPolicy* effective =
      options.policy != nullptr ? options.policy : routing_policy_.get();
  const bool may_defer = effective != nullptr && effective->HasDeferral();
  ExpertDeferral deferral;
  KTX_RETURN_IF_ERROR(Embed(tokens, &x));
  for (int il = 0; il < hparams_.n_layer; ++il) {
    KTX_RETURN_IF_ERROR(AttentionBlock(il, positions, kv, &x));
    if (deferral.pending(DeferJoin::kNextAttention)) {
      KTX_RETURN_IF_ERROR(deferral.Take(*this, DeferJoin::kNextAttention, &late));
      const Activations* parts[] = {&late};
      KTX_RETURN_IF_ERROR(Combine(parts, &x));
    }
    KTX_RETURN_IF_ERROR(FfnNorm(il, x, &h));
    const bool late_here = deferral.pending(DeferJoin::kNextMoe);
    if (!hparams_.IsMoeLayer(il)) {
      KTX_RETURN_IF_ERROR(DenseFfn(il, h, &f));
      if (late_here) KTX_RETURN_IF_ERROR(deferral.Take(*this, DeferJoin::kNextMoe, &late));
      const Activations* parts[] = {&f, &late};
      KTX_RETURN_IF_ERROR(Combine(std::span(parts, late_here ? 2 : 1), &x));
    } else {
      KTX_RETURN_IF_ERROR(Route(il, h, policies, &routing));
      if (options.on_routing) options.on_routing(il, routing);
      if (late_here) KTX_RETURN_IF_ERROR(deferral.Take(*this, DeferJoin::kNextMoe, &late));
      if (may_defer) KTX_RETURN_IF_ERROR(deferral.Defer(*this, il, h, policies, &routing));
      KTX_RETURN_IF_ERROR(RoutedExperts(il, h, routing, {}, &f));
      KTX_RETURN_IF_ERROR(SharedExperts(il, h, &shared));
      const Activations* parts[] = {&f, &shared, &late};
      KTX_RETURN_IF_ERROR(Combine(std::span(parts, late_here ? 3 : 2), &x));
    }
  }
  if (deferral.any_pending()) {
    return absl::InternalError("Forward: deferred experts left after the last layer");
  }
  KTX_RETURN_IF_ERROR(Head(x, rows, logits));
  return kv->Commit(n);
}

}  // namespace ktx::models
