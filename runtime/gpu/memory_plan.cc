#include "runtime/gpu/memory_plan.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace ktx::gpu {
namespace {

constexpr uint64_t kBf16 = 2;
constexpr uint64_t kF32 = 4;

uint64_t U(int64_t v) { return static_cast<uint64_t>(std::max<int64_t>(v, 0)); }

std::string Size(uint64_t bytes) {
  if (bytes >= (uint64_t{1} << 30)) {
    return absl::StrFormat("%.2f GiB", static_cast<double>(bytes) / (1 << 30));
  }
  return absl::StrFormat("%.1f MiB", static_cast<double>(bytes) / (1 << 20));
}

}  // namespace

GpuWorkLayout GpuWorkLayout::For(const models::Deepseek2Hparams& hp, int64_t max_tokens) {
  GpuWorkLayout l;
  const int64_t T = max_tokens;
  const int64_t hd = hp.n_embd_head_qk;
  const int64_t rw = hp.kv_lora_rank + hp.n_rot;
  l.max_tokens = T;
  l.ff_max = std::max<int64_t>(hp.n_layer_dense_lead > 0 ? hp.n_ff : 0,
                               hp.n_layer_dense_lead < hp.n_layer
                                   ? hp.n_ff_exp * static_cast<int64_t>(hp.n_expert_shared)
                                   : 0);
  l.x = T * hp.n_embd;
  l.h_f32 = T * hp.n_embd;
  l.h_bf16 = T * hp.n_embd;
  l.qa = hp.q_lora_rank > 0 ? T * (hp.q_lora_rank + rw) : 0;  // room for the stacked product
  l.qa_bf16 = T * hp.q_lora_rank;
  l.q = T * hp.n_head * hd;
  l.q_nope = T * hp.n_head * hp.qk_nope();
  l.big_q = T * hp.n_head * rw;
  l.kva = T * rw;
  l.ctx = T * hp.n_head * hp.kv_lora_rank;
  l.o = T * hp.n_head * hp.n_embd_head_v;
  l.gu = T * 2 * l.ff_max;
  l.act = T * l.ff_max;
  l.router_logits = T * hp.n_expert;
  l.expert_ids = T * hp.n_expert_used;
  l.expert_weights = T * hp.n_expert_used;
  l.routed = T * hp.n_embd;
  l.logits = T * hp.n_vocab;
  l.indices = 4 * T;
  return l;
}

uint64_t GpuWorkLayout::device_bytes() const {
  return kF32 * U(x + h_f32 + qa + q + big_q + kva + gu + router_logits + expert_weights + routed +
                  logits) +
         kBf16 * U(h_bf16 + qa_bf16 + q_nope + ctx + o + act) + 4 * U(expert_ids + indices);
}

uint64_t GpuWorkLayout::pinned_bytes() const {
  return 4 * U(indices + expert_ids) + kF32 * U(h_f32 + routed + expert_weights + logits);
}

ExpertStreamLayout ExpertStreamLayout::For(const models::Deepseek2Hparams& hp, int64_t max_tokens,
                                           int32_t n_slots, uint64_t expert_raw_bytes) {
  ExpertStreamLayout l;
  const int64_t T = max_tokens;
  l.max_tokens = T;
  l.n_embd = hp.n_embd;
  l.n_ff = hp.n_ff_exp;
  l.n_slots = n_slots;
  l.slot_bytes = (expert_raw_bytes + 255) / 256 * 256;
  l.w_gate_up = 2 * hp.n_ff_exp * hp.n_embd;
  l.w_down = hp.n_embd * hp.n_ff_exp;
  l.xg = T * hp.n_embd;
  l.gu = T * 2 * hp.n_ff_exp;
  l.act = T * hp.n_ff_exp;
  l.y = T * hp.n_embd;
  l.entries = T * hp.n_expert_used;
  return l;
}

uint64_t ExpertStreamLayout::device_bytes() const {
  return U(n_slots) * slot_bytes + kBf16 * U(w_gate_up + w_down + xg + act) + kF32 * U(gu + y) +
         8 * U(entries) + cublas_workspace_bytes;
}

uint64_t ExpertStreamLayout::pinned_bytes() const { return 2 * 8 * U(entries); }

const char* GpuWeightFormName(GpuWeightForm form) {
  switch (form) {
    case GpuWeightForm::kAuto: return "auto";
    case GpuWeightForm::kBf16: return "bf16";
    case GpuWeightForm::kQuantized: return "quantized";
    case GpuWeightForm::kBoth: return "both";
  }
  return "?";
}

std::string GpuMemoryPlan::ToString() const {
  std::string s;
  auto line = [&s](const char* what, const std::string& v) {
    absl::StrAppend(&s, absl::StrFormat("  %-34s %s\n", what, v));
  };
  s = "GPU memory plan\n";
  line("attention weights (bf16)", Size(attention_bytes));
  line("dense FFN weights (bf16)", Size(dense_ffn_bytes));
  line("shared expert weights (bf16)", Size(shared_expert_bytes));
  line("routers (F32)", Size(router_bytes));
  line("embedding (bf16)", Size(embedding_bytes));
  line("output head (bf16)", Size(head_bytes));
  line("weight form", absl::StrCat(GpuWeightFormName(weight_form),
                                   weight_form_requested == GpuWeightForm::kAuto ? " (auto)" : ""));
  if (quantized_weight_bytes > 0) {
    line(absl::StrCat("GGUF blocks for the GEMV (", quantized_matrices, " matrices)").c_str(),
         Size(quantized_weight_bytes));
  }
  if (bf16_dropped_bytes > 0) {
    line("bf16 copies not kept (quantized)", absl::StrCat("-", Size(bf16_dropped_bytes)));
  }
  line("= weights", Size(weight_bytes()));
  line(absl::StrCat("activations (", max_batch_tokens, " tokens/batch)").c_str(),
       Size(activation_bytes));
  line("workspaces (attention, cuBLAS, skinny products, load)", Size(workspace_bytes));
  if (expert_stream_bytes > 0) {
    line(absl::StrCat("routed-expert streaming (", expert_stream_slots, " slots)").c_str(),
         Size(expert_stream_bytes));
  }
  if (resident_experts > 0) {
    line(absl::StrCat("hot routed experts (", resident_experts, ", resident)").c_str(),
         Size(resident_expert_bytes));
  }
  line(absl::StrCat("KV cache (", kv_tokens, " tokens, ", kv_pages, " pages of ", kv_page_size, ")")
           .c_str(),
       Size(kv_bytes));
  line("= total on the device", Size(total_bytes()));
  line("free on the device", Size(free_bytes));
  line("kept in reserve", Size(reserve_bytes));
  line("pinned host staging", Size(pinned_host_bytes));
  line("KV per token (all layers)", absl::StrCat(kv_bytes_per_token, " bytes"));
  line("max context / sequences",
       absl::StrCat(max_context, " tokens / ", max_sequences, " sequences"));
  return s;
}

int64_t CountResidentExperts(const CudaModelOptions& options) {
  int64_t n = 0;
  for (const std::vector<int32_t>& ids : options.resident_experts) {
    n += static_cast<int64_t>(ids.size());
  }
  return n;
}

void UseTileCacheCpuCosts(GpuExpertOptions* experts) {
  const GpuExpertOptions defaults;
  if (experts->cpu_expert_fixed_ms == defaults.cpu_expert_fixed_ms &&
      experts->cpu_expert_per_token_us == defaults.cpu_expert_per_token_us) {
    experts->cpu_expert_fixed_ms = GpuExpertOptions::kTileCacheCpuExpertFixedMs;
    experts->cpu_expert_per_token_us = GpuExpertOptions::kTileCacheCpuExpertPerTokenUs;
  }
}

int32_t ExpertStreamSlots(const CudaModelOptions& options) {
  if (options.experts.mode != GpuExpertMode::kOff) return options.experts.n_slots;
  return CountResidentExperts(options) > 0 ? 2 : 0;
}

absl::StatusOr<GpuMemoryPlan> PlanGpuMemory(const models::Deepseek2Hparams& hp,
                                            const CudaModelOptions& o, uint64_t free_bytes,
                                            bool output_tied, uint64_t expert_raw_bytes,
                                            uint64_t resident_expert_bytes,
                                            const QuantizableWeights& quantizable) {
  if (o.max_batch_tokens <= 0 || o.max_sequences <= 0 || o.kv_page_size <= 0 || o.max_context < 0 ||
      o.kv_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU options: max_batch_tokens (", o.max_batch_tokens, "), max_sequences (",
                     o.max_sequences, ") and kv_page_size (", o.kv_page_size,
                     ") must be positive, max_context (", o.max_context, ") and kv_tokens (",
                     o.kv_tokens, ") not negative"));
  }
  GpuMemoryPlan p;
  const uint64_t n_embd = U(hp.n_embd);
  const uint64_t n_head = U(hp.n_head);
  const uint64_t hd = U(hp.n_embd_head_qk);
  const uint64_t kvl = U(hp.kv_lora_rank);
  const uint64_t rw = kvl + U(hp.n_rot);
  for (int il = 0; il < hp.n_layer; ++il) {
    uint64_t attn =
        kF32 * (2 * n_embd + kvl) +  // attn_norm, ffn_norm, kv_a_norm
        kBf16 * (rw * n_embd + n_head * kvl * U(hp.qk_nope()) + n_head * U(hp.n_embd_head_v) * kvl +
                 n_embd * n_head * U(hp.n_embd_head_v));
    if (hp.is_lite()) {
      attn += kBf16 * n_head * hd * n_embd;
    } else {
      attn += kF32 * U(hp.q_lora_rank) +
              kBf16 * (U(hp.q_lora_rank) * n_embd + n_head * hd * U(hp.q_lora_rank));
    }
    p.attention_bytes += attn;
    if (!hp.IsMoeLayer(il)) {
      p.dense_ffn_bytes += kBf16 * 3 * U(hp.n_ff) * n_embd;
    } else {
      p.router_bytes += kF32 * (U(hp.n_expert) * n_embd + U(hp.n_expert));
      p.shared_expert_bytes += kBf16 * 3 * U(hp.n_ff_exp) * U(hp.n_expert_shared) * n_embd;
    }
  }
  p.embedding_bytes = kBf16 * U(hp.n_vocab) * n_embd;
  p.head_bytes = kF32 * n_embd + (output_tied ? 0 : kBf16 * U(hp.n_vocab) * n_embd);
  const GpuWorkLayout work = GpuWorkLayout::For(hp, o.max_batch_tokens);
  p.activation_bytes = work.device_bytes();
  p.pinned_host_bytes = work.pinned_bytes();
  p.workspace_bytes = o.attention_workspace_bytes + o.cublas_workspace_bytes +
                      o.skinny_workspace_bytes + o.load_staging_bytes;
  p.max_context = o.max_context > 0 ? o.max_context : std::min<int64_t>(hp.n_ctx_train, 32768);
  p.max_batch_tokens = o.max_batch_tokens;
  p.max_sequences = o.max_sequences;
  p.kv_page_size = o.kv_page_size;
  p.kv_bytes_per_token = U(hp.n_layer) * rw * kBf16;
  const uint64_t page_bytes = p.kv_bytes_per_token * U(o.kv_page_size);
  const int64_t pages_per_seq = (p.max_context + o.kv_page_size - 1) / o.kv_page_size;
  const uint64_t pinned_table = 4 * U(o.max_sequences) * U(pages_per_seq);
  p.activation_bytes += pinned_table;  // the device copy of the block tables
  p.pinned_host_bytes += pinned_table;
  p.free_bytes = free_bytes;
  p.reserve_bytes = o.reserve_bytes;
  const int32_t stream_slots = ExpertStreamSlots(o);
  if (stream_slots > 0 && hp.n_layer_dense_lead < hp.n_layer && hp.n_expert > 0 &&
      expert_raw_bytes > 0) {
    if (stream_slots < 2) {
      return absl::InvalidArgumentError(absl::StrCat("GPU options: experts.n_slots (",
                                                     o.experts.n_slots, ") must be at least 2"));
    }
    const ExpertStreamLayout stream =
        ExpertStreamLayout::For(hp, o.max_batch_tokens, stream_slots, expert_raw_bytes);
    p.expert_stream_bytes = stream.device_bytes();
    p.expert_stream_slots = stream_slots;
    p.pinned_host_bytes += stream.pinned_bytes();
  }
  p.resident_experts = CountResidentExperts(o);
  p.resident_expert_bytes = p.resident_experts > 0 ? resident_expert_bytes : 0;

  const uint64_t usable = free_bytes > o.reserve_bytes ? free_bytes - o.reserve_bytes : 0;
  const int64_t want_pages = o.kv_tokens > 0 ? (o.kv_tokens + o.kv_page_size - 1) / o.kv_page_size
                                             : pages_per_seq * o.max_sequences;
  const int64_t min_pages = o.kv_tokens > 0 ? want_pages : pages_per_seq;
  // The weight form: kAuto takes the first of bf16, quantized that leaves
  // room for min_pages of KV cache. Not kBoth, although its q8 GEMV on Q4_K /
  // Q6_K blocks beats cuBLAS at 1 token on the H200 (docs/gpu.md): a step of
  // 1 token would then round differently from a larger one, so a sequence's
  // logits would depend on the batch it decodes in (kBf16 is batch
  // invariant); kBoth is for explicit use.
  p.weight_form_requested = o.gpu_weights;
  auto apply_form = [&](GpuWeightForm form) {
    if (quantizable.n_matrices == 0 ||
        (form == GpuWeightForm::kBoth && quantizable.both_matrices == 0)) {
      form = GpuWeightForm::kBf16;
    }
    p.weight_form = form;
    const bool both = form == GpuWeightForm::kBoth;
    p.quantized_matrices = form == GpuWeightForm::kQuantized ? quantizable.n_matrices
                           : both                            ? quantizable.both_matrices
                                                             : 0;
    p.quantized_weight_bytes = form == GpuWeightForm::kQuantized ? quantizable.block_bytes
                               : both                            ? quantizable.both_block_bytes
                                                                 : 0;
    p.bf16_dropped_bytes = form == GpuWeightForm::kQuantized ? quantizable.bf16_bytes : 0;
  };
  auto fixed_bytes = [&] {
    return p.weight_bytes() + p.activation_bytes + p.workspace_bytes + p.expert_stream_bytes +
           p.resident_expert_bytes;
  };
  if (o.gpu_weights == GpuWeightForm::kAuto) {
    for (GpuWeightForm form : {GpuWeightForm::kBf16, GpuWeightForm::kQuantized}) {
      apply_form(form);
      const uint64_t f = fixed_bytes();
      if (f <= usable && (usable - f) / std::max<uint64_t>(page_bytes, 1) >= U(min_pages)) break;
    }
  } else {
    apply_form(o.gpu_weights);
  }
  const uint64_t fixed = fixed_bytes();
  const uint64_t left = usable > fixed ? usable - fixed : 0;
  const int64_t fit_pages = static_cast<int64_t>(left / std::max<uint64_t>(page_bytes, 1));
  p.kv_pages = std::min(want_pages, fit_pages);
  p.kv_tokens = p.kv_pages * o.kv_page_size;
  p.kv_bytes = U(p.kv_pages) * page_bytes;
  if (p.kv_pages < min_pages || fixed > usable) {
    GpuMemoryPlan need = p;
    need.kv_pages = min_pages;
    need.kv_tokens = min_pages * o.kv_page_size;
    need.kv_bytes = U(min_pages) * page_bytes;
    const uint64_t per_batch_token = work.device_bytes() / U(o.max_batch_tokens);
    return absl::ResourceExhaustedError(absl::StrCat(
        "the model's non-expert part does not fit on the GPU: it needs ",
        Size(need.total_bytes() + o.reserve_bytes), " (with the reserve) but ", Size(free_bytes),
        " are free.\n", need.ToString(), "To fit: lower max_batch_tokens (", Size(per_batch_token),
        " per token of batch), max_context or kv_tokens (", Size(p.kv_bytes_per_token),
        " per token of KV cache), reserve_bytes, experts.n_slots (", Size(p.expert_stream_bytes),
        " for routed-expert streaming; experts.mode = kOff frees "
        "it), the hot experts kept on the GPU (",
        Size(p.resident_expert_bytes), "; --gpu-hot-experts-gib), the weight form (",
        GpuWeightFormName(p.weight_form), ": ", Size(quantizable.block_bytes),
        " of GGUF blocks for the GEMV, ", Size(quantizable.bf16_bytes),
        " of their bf16 copies; gpu_weights = bf16 or quantized keeps one); or use a GPU with "
        "more memory. Keeping the "
        "embedding or output head in host memory is not implemented yet."));
  }
  return p;
}

}  // namespace ktx::gpu
