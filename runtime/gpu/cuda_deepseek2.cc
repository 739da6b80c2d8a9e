#include "runtime/gpu/cuda_deepseek2.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/basic_ops.h"
#include "kernels/cuda/dequant.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemv.h"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"
#include "runtime/models/parallel_copy.h"
#include "runtime/models/reference_ops.h"
#include "runtime/models/routing_policy.h"

namespace ktx::gpu {

namespace kc = kernels::cuda;
using models::Activations;
using models::LogitsRows;

namespace {

// What the GPU kernels support; every DeepSeek-V2/V3 and Kimi-K2 file is inside.
absl::Status CheckSupported(const models::Deepseek2Hparams& hp) {
  if (hp.kv_lora_rank > 512 || hp.kv_lora_rank % 2 != 0 || hp.n_rot > 256 || hp.n_expert > 1024 ||
      hp.n_expert_used > 32 || hp.n_expert_groups > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the GPU path supports kv_lora_rank <= 512 (even), rope dimension <= 256, <= 1024 "
        "experts, <= 32 used per token and <= 64 groups; this model has ",
        hp.kv_lora_rank, ", ", hp.n_rot, ", ", hp.n_expert, ", ", hp.n_expert_used, ", ",
        hp.n_expert_groups));
  }
  return absl::OkStatus();
}

// A 0|1 switch from the environment into *flag (unset or empty: unchanged);
// any other value is refused naming the variable and what 1 and 0 mean.
absl::Status SwitchFromEnvironment(const char* name, const char* what_1, const char* what_0,
                                   bool* flag) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return absl::OkStatus();
  const std::string mode = v;
  if (mode != "0" && mode != "1") {
    return absl::InvalidArgumentError(
        absl::StrCat(name, "='", mode, "': expected 1 (", what_1, ") or 0 (", what_0, ")"));
  }
  *flag = mode == "1";
  return absl::OkStatus();
}

// KTX_GPU_EXPERTS=off|auto|gpu|cpu, KTX_GPU_EXPERTS_CPU="fixed_ms,per_token_us",
// KTX_GPU_EXPERT_SLOTS=N, KTX_GPU_SPLIT_SERIAL_US=us, KTX_GPU_SPLIT_REPLAN=0|1,
// KTX_GPU_SPLIT_LEARN_COPY=0|1, KTX_GPU_SPLIT_LEAD=F, KTX_GPU_EXPERTS_MIN_TOKENS=N,
// KTX_GPU_DECODE_SPLIT=0|1 and KTX_GPU_DECODE_CPU_GBPS=N.
absl::Status ApplyExpertEnvironment(GpuExpertOptions* o) {
  if (const char* v = std::getenv("KTX_GPU_EXPERTS"); v != nullptr && *v != '\0') {
    const std::string mode = v;
    if (mode == "off") {
      o->mode = GpuExpertMode::kOff;
    } else if (mode == "auto") {
      o->mode = GpuExpertMode::kAuto;
    } else if (mode == "gpu") {
      o->mode = GpuExpertMode::kAllGpu;
    } else if (mode == "cpu") {
      o->mode = GpuExpertMode::kAllCpu;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("KTX_GPU_EXPERTS='", mode,
                       "': expected off, auto, gpu (all routed experts on the GPU) "
                       "or cpu (all on the CPU, streaming set up)"));
    }
  }
  if (const char* v = std::getenv("KTX_GPU_EXPERTS_CPU"); v != nullptr && *v != '\0') {
    double fixed_ms = 0, per_token_us = 0;
    char extra = 0;
    if (std::sscanf(v, "%lf,%lf%c", &fixed_ms, &per_token_us, &extra) != 2 || fixed_ms < 0 ||
        per_token_us < 0 || fixed_ms + per_token_us <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KTX_GPU_EXPERTS_CPU='", v,
          "': expected \"fixed_ms,per_token_us\", the CPU backend's time for one expert with m "
          "tokens = fixed + per_token * m (e.g. 0.05,14.5)"));
    }
    o->cpu_expert_fixed_ms = fixed_ms;
    o->cpu_expert_per_token_us = per_token_us;
  }
  if (const char* v = std::getenv("KTX_GPU_EXPERT_SLOTS"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (end == v || *end != '\0' || n < 2 || n > 4096) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KTX_GPU_EXPERT_SLOTS='", v,
          "': expected a slot count in [2, 4096], the device buffers of one expert's raw "
          "blocks that streaming copies into ahead of the compute"));
    }
    o->n_slots = static_cast<int32_t>(n);
  }
  if (const char* v = std::getenv("KTX_GPU_SPLIT_SERIAL_US"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const double us = std::strtod(v, &end);
    if (end == v || *end != '\0' || !(us >= 0) || us > 1e6) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KTX_GPU_SPLIT_SERIAL_US='", v,
          "': expected microseconds per token >= 0, what a layer that leaves experts to the CPU "
          "pays on top (0: a split overlaps everything)"));
    }
    o->split_serial_us_per_token = us;
  }
  if (const char* v = std::getenv("KTX_GPU_EXPERTS_MIN_TOKENS"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long long n = std::strtoll(v, &end, 10);
    if (end == v || *end != '\0' || n < 1 || n > (int64_t{1} << 30)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KTX_GPU_EXPERTS_MIN_TOKENS='", v,
          "': expected a token count >= 1, the batch size from which the prefill split's model "
          "chooses the GPU's routed experts (below it: the decode split's)"));
    }
    o->min_batch_tokens = n;
  }
  KTX_RETURN_IF_ERROR(SwitchFromEnvironment(
      "KTX_GPU_DECODE_SPLIT",
      "decode batches stream a few of a layer's routed experts to the GPU while the CPU computes "
      "the rest",
      "decode experts all on the CPU", &o->decode_split));
  if (const char* v = std::getenv("KTX_GPU_DECODE_CPU_GBPS"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const double gbps = std::strtod(v, &end);
    if (end == v || *end != '\0' || !(gbps > 0) || gbps > 1e6) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KTX_GPU_DECODE_CPU_GBPS='", v,
          "': expected GB/s > 0, the rate at which the CPU experts read their weights at "
          "decode (the decode split's starting figure)"));
    }
    o->decode_cpu_gbps = gbps;
  }
  KTX_RETURN_IF_ERROR(SwitchFromEnvironment(
      "KTX_GPU_SPLIT_REPLAN",
      "choose the rest of a layer's GPU experts again once its routing is known",
      "the prefetched set", &o->replan_split));
  KTX_RETURN_IF_ERROR(SwitchFromEnvironment(
      "KTX_GPU_SPLIT_LEARN_COPY",
      "a split layer's measured GPU time corrects the copy rate the next split plans with",
      "the calibrated rate throughout", &o->learn_copy_rate));
  if (const char* v = std::getenv("KTX_GPU_SPLIT_LEAD"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const double f = std::strtod(v, &end);
    if (end == v || *end != '\0' || !(f >= 0) || !(f < 1)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "KTX_GPU_SPLIT_LEAD='", v,
          "': expected a fraction in [0, 1), how far ahead of the CPU's experts a split layer "
          "aims to finish the GPU's share (of the share's modelled time; 0: together)"));
    }
    o->split_gpu_lead = f;
  }
  return absl::OkStatus();
}

// CudaModelOptions::resident_experts against the model: MoE layers only,
// ids in range and distinct (InvalidArgument naming the layer).
absl::Status CheckResidentExperts(const models::Deepseek2Hparams& hp,
                                  const std::vector<std::vector<int32_t>>& resident) {
  if (static_cast<int64_t>(resident.size()) > hp.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("resident_experts: ", resident.size(),
                                                   " layers given, the model has ", hp.n_layer));
  }
  for (int il = 0; il < static_cast<int>(resident.size()); ++il) {
    if (resident[il].empty()) continue;
    if (!hp.IsMoeLayer(il)) {
      return absl::InvalidArgumentError(
          absl::StrCat("resident_experts, layer ", il, ": a dense layer has no routed experts"));
    }
    std::vector<uint8_t> seen(hp.n_expert, 0);
    for (int32_t e : resident[il]) {
      if (e < 0 || e >= hp.n_expert) {
        return absl::InvalidArgumentError(absl::StrCat("resident_experts, layer ", il, ": expert ",
                                                       e, " outside [0, ", hp.n_expert, ")"));
      }
      if (seen[e]++) {
        return absl::InvalidArgumentError(
            absl::StrCat("resident_experts, layer ", il, ": expert ", e, " given twice"));
      }
    }
  }
  return absl::OkStatus();
}

// A token count in 0..max from the environment variable `var` into *out
// (left as it is when the variable is unset or empty); InvalidArgument
// naming the variable, the range and `meaning` otherwise.
absl::Status TokenCountFromEnv(const char* var, int64_t max, const char* meaning, int64_t* out) {
  const char* v = std::getenv(var);
  if (v == nullptr || *v == '\0') return absl::OkStatus();
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0' || n < 0 || n > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(var, "='", v, "': expected a token count in 0..", max, " (", meaning, ")"));
  }
  *out = n;
  return absl::OkStatus();
}

// KTX_CUDA_SCHEDULE: how host threads wait for the device (the primary
// context's scheduling flag, cudaSetDeviceFlags): auto (CUDA's default: spin
// while the process has fewer contexts than cpus), spin, yield or blocking.
// For measuring what a waiting host thread takes from the CPU experts' pool.
absl::Status ApplyScheduleEnvironment() {
  const char* v = std::getenv("KTX_CUDA_SCHEDULE");
  if (v == nullptr || *v == '\0') return absl::OkStatus();
  const std::string mode = v;
  unsigned flags = 0;
  if (mode == "auto") {
    flags = cudaDeviceScheduleAuto;
  } else if (mode == "spin") {
    flags = cudaDeviceScheduleSpin;
  } else if (mode == "yield") {
    flags = cudaDeviceScheduleYield;
  } else if (mode == "blocking") {
    flags = cudaDeviceScheduleBlockingSync;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("KTX_CUDA_SCHEDULE='", mode, "': expected auto, spin, yield or blocking"));
  }
  return CudaOk(cudaSetDeviceFlags(flags),
                absl::StrCat("cudaSetDeviceFlags (KTX_CUDA_SCHEDULE=", mode, ")"));
}

// KTX_GPU_WEIGHTS=auto|bf16|quantized|both, KTX_GPU_GEMV_MAX_TOKENS=N,
// KTX_GPU_EXPERT_GEMV_MAX_TOKENS=N, KTX_GPU_SKINNY_MAX_TOKENS=N,
// KTX_GPU_MLA_PREFILL_MIN_TOKENS=N, KTX_CUDA_GRAPHS.
absl::Status ApplyWeightEnvironment(CudaModelOptions* o) {
  if (const char* v = std::getenv("KTX_GPU_WEIGHTS"); v != nullptr && *v != '\0') {
    const std::string form = v;
    if (form == "auto") {
      o->gpu_weights = GpuWeightForm::kAuto;
    } else if (form == "bf16") {
      o->gpu_weights = GpuWeightForm::kBf16;
    } else if (form == "quantized") {
      o->gpu_weights = GpuWeightForm::kQuantized;
    } else if (form == "both") {
      o->gpu_weights = GpuWeightForm::kBoth;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "KTX_GPU_WEIGHTS='", form,
          "': expected auto, bf16 (cuBLAS only), quantized (GGUF blocks and the GEMV only) or "
          "both"));
    }
  }
  KTX_RETURN_IF_ERROR(TokenCountFromEnv(
      "KTX_GPU_GEMV_MAX_TOKENS", 4096,
      "batches up to it use the quantized GEMV; 0: never where a bf16 copy exists",
      &o->gemv_max_tokens));
  KTX_RETURN_IF_ERROR(TokenCountFromEnv("KTX_GPU_EXPERT_GEMV_MAX_TOKENS", 4096,
                                        "a resident expert with at most that many tokens runs as "
                                        "quantized GEMVs; 0: never",
                                        &o->expert_gemv_max_tokens));
  KTX_RETURN_IF_ERROR(
      TokenCountFromEnv("KTX_GPU_SKINNY_MAX_TOKENS", kc::kSkinnyMaxTokens,
                        "bf16 products of batches up to it use the skinny kernel; 0: cuBLAS always",
                        &o->skinny_max_tokens));
  KTX_RETURN_IF_ERROR(TokenCountFromEnv(
      "KTX_GPU_MLA_PREFILL_MIN_TOKENS", int64_t{1} << 30,
      "prompt chunks of at least that many tokens use the two-product attention; 0: never",
      &o->mla_prefill_min_tokens));
  if (const char* v = std::getenv("KTX_CUDA_GRAPHS"); v != nullptr && *v != '\0') {
    const std::string mode = v;
    if (mode == "on" || mode == "1") {
      o->cuda_graphs = true;
    } else if (mode == "off" || mode == "0") {
      o->cuda_graphs = false;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("KTX_CUDA_GRAPHS='", mode,
                       "': expected on (replay decode layers as CUDA graphs) or off"));
    }
  }
  if (o->skinny_max_tokens < 0 || o->skinny_max_tokens > kc::kSkinnyMaxTokens) {
    return absl::InvalidArgumentError(absl::StrCat("skinny_max_tokens (", o->skinny_max_tokens,
                                                   ") must be in 0..", kc::kSkinnyMaxTokens));
  }
  if (o->gemv_max_tokens < 0 || o->expert_gemv_max_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gemv_max_tokens (", o->gemv_max_tokens, ") and expert_gemv_max_tokens (",
                     o->expert_gemv_max_tokens, ") must not be negative"));
  }
  if (!(o->experts.decode_cpu_gbps > 0) || !(o->experts.decode_gpu_layer_fixed_us >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("experts.decode_cpu_gbps (", o->experts.decode_cpu_gbps,
                     ") must be > 0 and experts.decode_gpu_layer_fixed_us (",
                     o->experts.decode_gpu_layer_fixed_us, ") >= 0"));
  }
  if (!(o->experts.split_gpu_lead >= 0) || !(o->experts.split_gpu_lead < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("experts.split_gpu_lead (", o->experts.split_gpu_lead,
                     ") must be a fraction in [0, 1) of the GPU share's modelled time"));
  }
  return absl::OkStatus();
}

// A matrix the quantized GEMV can read from its GGUF blocks.
bool GemvReads(const gguf::TensorInfo& t) {
  return kc::CanQuantGemv(t.type) && t.ne[0] % 32 == 0 &&
         t.ne[0] % kernels::TraitsOf(t.type).block_size == 0 &&
         ((t.type != kernels::TensorType::kQ4_K && t.type != kernels::TensorType::kQ5_K) ||
          t.row_bytes() % 16 == 0);
}

uint64_t Pad256(uint64_t bytes) { return (bytes + 255) / 256 * 256; }

// The device bytes of `gate` (and `up` stacked under it) as GGUF blocks:
// one buffer when both have the same type and row size, else two.
uint64_t BlockBytes(const gguf::TensorInfo& gate, const gguf::TensorInfo* up) {
  const uint64_t g = static_cast<uint64_t>(gate.n_rows() * gate.row_bytes());
  if (up == nullptr) return Pad256(g);
  const uint64_t u = static_cast<uint64_t>(up->n_rows() * up->row_bytes());
  if (up->type == gate.type && up->row_bytes() == gate.row_bytes()) return Pad256(g + u);
  return Pad256(g) + Pad256(u);
}

// The matrices that get a quantized form (memory_plan.h GpuWeightForm); a
// gate/up pair only when both parts can.
// kBoth keeps the blocks of a matrix only where the GEMV beats cuBLAS on its
// bf16 copy (every part Q4_K or Q6_K: GpuLayerRunner::GemvBeatsCublasType).
bool KeptInBoth(const gguf::TensorInfo& a, const gguf::TensorInfo* b) {
  return GpuLayerRunner::GemvBeatsCublasType(a.type) &&
         (b == nullptr || GpuLayerRunner::GemvBeatsCublasType(b->type));
}

QuantizableWeights CountQuantizable(const models::Deepseek2Hparams& hp,
                                    const models::Deepseek2Weights& w) {
  QuantizableWeights q;
  auto add = [&q](const gguf::TensorInfo* a, const gguf::TensorInfo* b, bool bf16_needed) {
    if (a == nullptr || !GemvReads(*a) || (b != nullptr && !GemvReads(*b))) return;
    q.block_bytes += BlockBytes(*a, b);
    if (KeptInBoth(*a, b)) {
      q.both_block_bytes += BlockBytes(*a, b);
      ++q.both_matrices;
    }
    if (!bf16_needed) {
      q.bf16_bytes += 2 * static_cast<uint64_t>(a->n_elements() + (b ? b->n_elements() : 0));
    }
    ++q.n_matrices;
  };
  // A tied head is token_embd, whose bf16 rows the embedding needs anyway.
  add(w.output_tied ? w.token_embd : w.output, nullptr, w.output_tied);
  for (int il = 0; il < hp.n_layer; ++il) {
    const models::Deepseek2LayerWeights& l = w.layers[il];
    if (hp.is_lite()) {
      add(l.attn_q, nullptr, false);
    } else {
      add(l.attn_q_a, nullptr, false);
      add(l.attn_q_b, nullptr, false);
    }
    add(l.attn_kv_a_mqa, nullptr, false);
    add(l.attn_output, nullptr, false);
    if (!hp.IsMoeLayer(il)) {
      add(l.ffn_gate, l.ffn_up, false);
      add(l.ffn_down, nullptr, false);
    } else if (hp.n_expert_shared > 0) {
      add(l.ffn_gate_shexp, l.ffn_up_shexp, false);
      add(l.ffn_down_shexp, nullptr, false);
    }
  }
  return q;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaDeepseek2>> CudaDeepseek2::Create(
    const models::Deepseek2Model& model, const CudaModelOptions& options) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("no usable CUDA device", err != cudaSuccess ? ": " : "",
                     err != cudaSuccess ? cudaGetErrorString(err) : ""));
  }
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", options.device, " does not exist (", count, " present)"));
  }
  KTX_RETURN_IF_ERROR(CudaOk(cudaSetDevice(options.device), "cudaSetDevice"));
  KTX_RETURN_IF_ERROR(ApplyScheduleEnvironment());
  KTX_RETURN_IF_ERROR(CheckSupported(model.hparams()));
  size_t free_bytes = 0, total_bytes = 0;
  KTX_RETURN_IF_ERROR(CudaOk(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo"));
  std::unique_ptr<CudaDeepseek2> gpu(new CudaDeepseek2(model));
  gpu->hp_ = model.hparams();
  // Routed experts on the GPU: the environment overrides the options; a model
  // whose experts cannot be streamed runs them all on the CPU (logged).
  CudaModelOptions opts = options;
  KTX_RETURN_IF_ERROR(ApplyExpertEnvironment(&opts.experts));
  KTX_RETURN_IF_ERROR(ApplyWeightEnvironment(&opts));
  uint64_t expert_raw_bytes = 0, resident_bytes = 0;
  const bool resident = CountResidentExperts(opts) > 0;
  if (opts.experts.mode != GpuExpertMode::kOff || resident) {
    absl::StatusOr<std::vector<ExpertLayerTensors>> tensors =
        gpu->hp_.n_layer_dense_lead < gpu->hp_.n_layer
            ? ExpertTensorsOf(gpu->hp_, model.weights())
            : absl::FailedPreconditionError("the model has no MoE layer");
    if (!tensors.ok() && resident) {
      return absl::Status(tensors.status().code(),
                          absl::StrCat("hot routed experts cannot be kept on the GPU: ",
                                       tensors.status().message()));
    }
    if (!tensors.ok()) {
      KTX_LOG(WARNING, "gpu") << "routed experts stay on the CPU: " << tensors.status().message();
      opts.experts.mode = GpuExpertMode::kOff;
    } else {
      for (const ExpertLayerTensors& l : *tensors) {
        if (l.present()) {
          expert_raw_bytes =
              std::max(expert_raw_bytes, l.ExpertSlotBytes(gpu->hp_.n_embd, gpu->hp_.n_ff_exp));
        }
      }
      KTX_RETURN_IF_ERROR(CheckResidentExperts(gpu->hp_, opts.resident_experts));
      for (size_t il = 0; il < opts.resident_experts.size(); ++il) {
        resident_bytes += opts.resident_experts[il].size() *
                          (*tensors)[il].ExpertSlotBytes(gpu->hp_.n_embd, gpu->hp_.n_ff_exp);
      }
    }
  }
  KTX_ASSIGN_OR_RETURN(
      gpu->plan_,
      PlanGpuMemory(gpu->hp_, opts, free_bytes, model.weights().output_tied, expert_raw_bytes,
                    resident_bytes, CountQuantizable(gpu->hp_, model.weights())));
  KTX_RETURN_IF_ERROR(gpu->Load(opts, free_bytes));
  KTX_RETURN_IF_ERROR(gpu->SetUpGpuExperts(opts));
  if (const char* v = std::getenv("KTX_GPU_STAGE_TIMES"); v != nullptr && *v == '1') {
    gpu->stage_times_ = true;  // layers that run as CUDA graphs are not split into stages
    if (gpu->experts_ != nullptr) gpu->experts_->set_copy_timeline(true);
  }
  if (const char* v = std::getenv("KTX_GPU_ROUTED_ZERO_COPY"); v != nullptr && *v != '\0') {
    const std::string mode = v;
    if (mode != "0" && mode != "1") {
      return absl::InvalidArgumentError(
          absl::StrCat("KTX_GPU_ROUTED_ZERO_COPY='", mode,
                       "': expected 1 (the residual add reads the CPU experts' sum from pinned "
                       "host memory) or 0 (copy it to the GPU first); unset: read it directly "
                       "while routed experts stream"));
    }
    gpu->routed_read_ = mode == "1" ? RoutedRead::kAlways : RoutedRead::kNever;
  }
  if (opts.cuda_graphs && opts.graph_max_tokens > 0) {
    gpu->graphs_ = std::make_unique<CudaGraphCache>(
        static_cast<size_t>(std::max<int64_t>(opts.graph_capacity, 1)));
    gpu->graph_max_tokens_ = opts.graph_max_tokens;
  }
  KTX_LOG(INFO, "gpu") << "loaded the non-expert weights on GPU " << options.device << "\n"
                       << gpu->plan_.ToString();
  return gpu;
}

absl::Status CudaDeepseek2::SetUpGpuExperts(const CudaModelOptions& options) {
  expert_options_ = options.experts;
  expert_mode_ = GpuExpertMode::kOff;
  streaming_ready_ = false;
  // The plan's slot count (0: nothing to stream or keep resident).
  const int32_t slots = plan_.expert_stream_slots;
  if (slots == 0) return absl::OkStatus();
  KTX_ASSIGN_OR_RETURN(std::vector<ExpertLayerTensors> tensors,
                       ExpertTensorsOf(hp_, model_.weights()));
  GpuExpertStreamerConfig config;
  config.n_embd = hp_.n_embd;
  config.n_ff = hp_.n_ff_exp;
  config.n_expert = hp_.n_expert;
  config.n_expert_used = hp_.n_expert_used;
  config.max_tokens = runner_->max_tokens();
  config.n_slots = slots;
  config.gemv_max_tokens = options.expert_gemv_max_tokens;
  // Only resident experts: no streaming, so nothing to page-lock.
  config.register_host_memory =
      options.experts.register_host_memory && options.experts.mode != GpuExpertMode::kOff;
  KTX_ASSIGN_OR_RETURN(experts_,
                       GpuExpertStreamer::Create(config, std::move(tensors), runner_->stream()));
  if (CountResidentExperts(options) > 0) {
    KTX_RETURN_IF_ERROR(experts_->LoadResident(options.resident_experts));
  }
  if (options.experts.mode == GpuExpertMode::kOff) return absl::OkStatus();
  KTX_RETURN_IF_ERROR(experts_->Calibrate(&expert_cost_));
  calibrated_pcie_ = expert_cost_.pcie_bytes_per_s;
  expert_cost_.cpu_fixed_s = options.experts.cpu_expert_fixed_ms * 1e-3;
  expert_cost_.cpu_per_token_s = options.experts.cpu_expert_per_token_us * 1e-6;
  expert_cost_.min_batch_tokens = options.experts.min_batch_tokens;
  expert_cost_.split_serial_s_per_token = options.experts.split_serial_us_per_token * 1e-6;
  const std::string invalid = expert_cost_.Validate();
  if (!invalid.empty()) return absl::InvalidArgumentError(invalid);
  decode_cost_ =
      DecodeCostModel(expert_cost_, experts_->shape(), options.experts.decode_cpu_gbps * 1e9,
                      options.experts.decode_gpu_layer_fixed_us * 1e-6);
  expert_mode_ = options.experts.mode;
  streaming_ready_ = true;
  KTX_LOG(INFO, "gpu") << "routed-expert cost model: "
                       << DescribeCostModel(expert_cost_, experts_->shape())
                       << "; the split pays from "
                       << BreakEvenTokens(expert_cost_, experts_->shape(), hp_.n_expert_used,
                                          hp_.n_expert, runner_->max_tokens())
                       << " tokens (uniform routing)";
  if (options.experts.decode_split) {
    const std::vector<int64_t> one(hp_.n_expert_used, 1);
    const ExpertSplit s1 = PlanExpertSplit(decode_cost_, one, experts_->shape(), 1);
    KTX_LOG(INFO, "gpu") << absl::StrFormat(
        "decode split: the CPU reads an expert at %.0f GB/s (%.3f ms), one streams to the GPU in "
        "%.3f ms; at 1 token the GPU takes %d of %d experts per MoE layer (modelled %.3f ms "
        "against %.3f all on the CPU)",
        options.experts.decode_cpu_gbps, decode_cost_.cpu_fixed_s * 1e3,
        GpuCopySeconds(decode_cost_, experts_->shape()) * 1e3,
        static_cast<int>(s1.gpu_experts.size()), static_cast<int>(hp_.n_expert_used),
        s1.time_s() * 1e3, s1.all_cpu_s * 1e3);
  }
  return absl::OkStatus();
}

void CudaDeepseek2::SetGemvMaxTokens(int64_t n) {
  runner_->set_gemv_max_tokens(std::max<int64_t>(n, 0));
}

void CudaDeepseek2::MarkStage(StageMark m) {
  if (!stage_times_) return;
  if (stage_n_ == stage_events_.size()) {
    cudaEvent_t e = nullptr;
    if (cudaEventCreate(&e) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    stage_events_.push_back(e);
    stage_marks_.push_back(m);
  }
  stage_marks_[stage_n_] = m;
  if (cudaEventRecord(stage_events_[stage_n_], runner_->stream()) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  ++stage_n_;
}

void CudaDeepseek2::ReportStages() {
  if (!stage_times_ || stage_n_ < 2) return;
  static const char* const kNames[] = {"start",
                                       "attention",
                                       "dense FFN",
                                       "router + copies to host",
                                       "shared expert",
                                       "wait for the CPU (and GPU) experts",
                                       "host copy + upload of the CPU experts' sum",
                                       "add",
                                       "head"};
  constexpr int kStages = static_cast<int>(std::size(kNames));
  double ms[kStages] = {0};
  for (size_t i = 1; i < stage_n_; ++i) {
    float t = 0;
    if (cudaEventElapsedTime(&t, stage_events_[i - 1], stage_events_[i]) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    ms[static_cast<int>(stage_marks_[i])] += t;
  }
  std::string line =
      absl::StrCat("GPU stage times, ", stage_tokens_, " tokens (ms on the stream):");
  for (int c = 1; c < kStages; ++c) {
    if (ms[c] > 0) absl::StrAppend(&line, " ", kNames[c], " ", absl::StrFormat("%.3f", ms[c]), ";");
  }
  KTX_LOG(INFO, "gpu") << line;
  if (experts_ == nullptr) return;
  // Where the link went during the pass: the expert copies' timeline.
  absl::StatusOr<GpuExpertStreamer::CopyTimeline> t = experts_->TakeCopyTimeline();
  if (!t.ok() || t->copies == 0) return;
  float head = 0, tail = 0, pass = 0;
  if (cudaEventElapsedTime(&pass, stage_events_[0], stage_events_[stage_n_ - 1]) != cudaSuccess ||
      cudaEventElapsedTime(&head, stage_events_[0], t->first) != cudaSuccess ||
      cudaEventElapsedTime(&tail, t->last, stage_events_[stage_n_ - 1]) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  KTX_LOG(INFO, "gpu") << absl::StrFormat(
      "expert copies, %lld tokens: %lld experts, %.2f GB; the link busy %.1f ms of the pass's "
      "%.1f (%.1f GB/s while busy); idle %.1f ms with nothing issued, %.1f ms with a copy waiting "
      "for a free slot; first copy %.1f ms after the pass began, last one ended %.1f ms before "
      "its end",
      static_cast<long long>(stage_tokens_), static_cast<long long>(t->copies), t->bytes / 1e9,
      t->busy_ms, pass, t->busy_ms > 0 ? t->bytes / 1e6 / t->busy_ms : 0.0, t->not_issued_ms,
      t->slot_wait_ms, head, tail);
}

bool CudaDeepseek2::UsesGraphs(int64_t n_tokens) const {
  // A decode split streams only after the routing, outside the layers' graphs;
  // the prefill modes prefetch during them.
  return graphs_ != nullptr && n_tokens <= graph_max_tokens_ &&
         !(experts_ != nullptr && StreamsExperts(n_tokens) && !DecodeSplits(n_tokens));
}

int64_t CudaDeepseek2::GraphKvBucket(int64_t max_kv_len) {
  int64_t bucket = 256;
  while (bucket < max_kv_len) bucket *= 2;
  return bucket;
}

CudaGraphCache::Stats CudaDeepseek2::graph_stats() const {
  return graphs_ != nullptr ? graphs_->stats() : CudaGraphCache::Stats{};
}

void CudaDeepseek2::SetExpertGemvMaxTokens(int64_t n) {
  if (experts_ != nullptr) experts_->set_gemv_max_tokens(std::max<int64_t>(n, 0));
}

absl::Status CudaDeepseek2::SetExpertMode(GpuExpertMode mode) {
  if (mode != GpuExpertMode::kOff && !streaming_ready_) {
    return absl::FailedPreconditionError(
        "routed experts cannot run on the GPU: the model was created with experts.mode = kOff "
        "(or KTX_GPU_EXPERTS=off), or its expert tensors cannot be streamed (see the log)");
  }
  expert_mode_ = mode;
  return absl::OkStatus();
}

void CudaDeepseek2::CorrectCpuCost(double ratio) {
  if (!(ratio > 0) || !std::isfinite(ratio)) return;
  // Damped (ratio^0.7) and kept within [1/4, 8] x the configured figures.
  const double base_fixed = expert_options_.cpu_expert_fixed_ms * 1e-3;
  const double base_token = expert_options_.cpu_expert_per_token_us * 1e-6;
  const double f = std::pow(ratio, 0.7);
  expert_cost_.cpu_fixed_s =
      std::clamp(expert_cost_.cpu_fixed_s * f, base_fixed / 4, base_fixed * 8);
  expert_cost_.cpu_per_token_s =
      std::clamp(expert_cost_.cpu_per_token_s * f, base_token / 4, base_token * 8);
}

void CUDART_CB CudaDeepseek2::MarkGpuShareDone(void* self) {
  auto* model = static_cast<CudaDeepseek2*>(self);
  model->gpu_share_done_ns_.store(
      std::chrono::steady_clock::now().time_since_epoch() / std::chrono::nanoseconds(1),
      std::memory_order_release);
}

void CudaDeepseek2::LearnCopyRate() {
  if (!(gpu_share_modelled_s_ > 0)) return;
  const int64_t done = gpu_share_done_ns_.load(std::memory_order_acquire);
  const double modelled = gpu_share_modelled_s_;
  gpu_share_modelled_s_ = 0;
  // The stream passes the share's end before the next layer's routing reaches
  // the host; a share not yet marked (a failed launch of the host function)
  // teaches nothing.
  if (done <= gpu_share_t0_ns_) return;
  const double measured = static_cast<double>(done - gpu_share_t0_ns_) * 1e-9;
  const double before = expert_cost_.pcie_bytes_per_s;
  expert_cost_.pcie_bytes_per_s = CorrectedCopyRate(before, calibrated_pcie_, measured, modelled);
  ++copy_rate_corrections_;
  if (stage_times_) {
    KTX_LOG(INFO, "gpu") << absl::StrFormat(
        "split copy rate: the last GPU share took %.1f ms (modelled %.1f): %.1f -> %.1f GB/s "
        "(calibrated %.1f)",
        measured * 1e3, modelled * 1e3, before / 1e9, expert_cost_.pcie_bytes_per_s / 1e9,
        calibrated_pcie_ / 1e9);
  }
}

bool CudaDeepseek2::DecodeSplits(int64_t n_tokens) const {
  return expert_mode_ == GpuExpertMode::kAuto && expert_options_.decode_split && n_tokens > 0 &&
         n_tokens < expert_cost_.min_batch_tokens;
}

const ExpertCostModel& CudaDeepseek2::CostModelFor(int64_t n_tokens) const {
  return DecodeSplits(n_tokens) ? decode_cost_ : expert_cost_;
}

bool CudaDeepseek2::StreamsExperts(int64_t n_tokens) const {
  switch (expert_mode_) {
    case GpuExpertMode::kAllGpu: return true;
    case GpuExpertMode::kAuto:
      return n_tokens >= expert_cost_.min_batch_tokens || DecodeSplits(n_tokens);
    default: return false;
  }
}

std::vector<int32_t> CudaDeepseek2::GpuExpertsFor(int64_t n_tokens,
                                                  std::span<const int64_t> counts) const {
  if (expert_mode_ == GpuExpertMode::kAllGpu) {
    return AllExpertsOnGpu(expert_cost_, counts, experts_->shape()).gpu_experts;
  }
  if (expert_mode_ == GpuExpertMode::kAuto) {
    return PlanExpertSplit(CostModelFor(n_tokens), counts, experts_->shape(), n_tokens).gpu_experts;
  }
  return {};
}

CudaDeepseek2::~CudaDeepseek2() {
  if (runner_ != nullptr) cudaStreamSynchronize(runner_->stream());
  if (routed_ready_ != nullptr) cudaEventDestroy(routed_ready_);
  if (late_uploaded_ != nullptr) cudaEventDestroy(late_uploaded_);
  if (split_probe_ != nullptr) cudaEventDestroy(split_probe_);
  for (cudaEvent_t e : stage_events_) cudaEventDestroy(e);
}

absl::StatusOr<Bf16*> CudaDeepseek2::AllocBf16(int64_t n, const char* what) {
  KTX_ASSIGN_OR_RETURN(DeviceBuffer b,
                       DeviceBuffer::Allocate(static_cast<size_t>(n) * sizeof(Bf16), what));
  Bf16* p = b.as<Bf16>();
  weight_buffers_.push_back(std::move(b));
  return p;
}

absl::Status CudaDeepseek2::UploadMatrix(const gguf::TensorInfo& t, Bf16* dst, const char* what) {
  if (!kc::CanDequantizeOnGpu(t.type)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", t.name, "' (", what, ") has type ", kernels::TraitsOf(t.type).name,
        ", which the GPU path cannot dequantize (F32, F16, BF16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, "
        "Q6_K, IQ4_XS)"));
  }
  const int64_t cols = t.ne[0];
  const int64_t rows = t.n_rows();
  const int64_t row_bytes = t.row_bytes();
  const int64_t rows_per_chunk = static_cast<int64_t>(staging_.bytes()) / row_bytes;
  if (rows_per_chunk < 1) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "': a row of ", row_bytes,
                                                   " bytes exceeds the load staging buffer"));
  }
  const cudaStream_t stream = runner_->stream();
  for (int64_t r0 = 0; r0 < rows; r0 += rows_per_chunk) {
    const int64_t n = std::min(rows_per_chunk, rows - r0);
    // Through a pinned copy, never straight from the mapping: pages of the
    // mapping may be page-locked by the expert streamer (its ranges rounded
    // to whole pages), and a copy from a range that is partly registered
    // fails with cudaErrorInvalidValue. The previous chunk's copy has
    // finished (synchronized below).
    std::memcpy(load_pinned_.as<uint8_t>(), t.data + r0 * row_bytes,
                static_cast<size_t>(n * row_bytes));
    KTX_RETURN_IF_ERROR(
        CudaOk(cudaMemcpyAsync(staging_.get(), load_pinned_.as<uint8_t>(),
                               static_cast<size_t>(n * row_bytes), cudaMemcpyHostToDevice, stream),
               absl::StrCat("uploading tensor '", t.name, "'")));
    KTX_RETURN_IF_ERROR(CudaOk(kc::DequantizeToBf16(t.type, staging_.get(), row_bytes, n, cols,
                                                    dst + r0 * cols, cols, stream),
                               absl::StrCat("dequantizing tensor '", t.name, "'")));
    KTX_RETURN_IF_ERROR(
        CudaOk(cudaStreamSynchronize(stream), absl::StrCat("dequantizing tensor '", t.name, "'")));
  }
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::UploadBlocks(const gguf::TensorInfo* a, const gguf::TensorInfo* b,
                                         GpuMatrix* m, const char* what) {
  const bool one_buffer = b == nullptr || (b->type == a->type && b->row_bytes() == a->row_bytes());
  const gguf::TensorInfo* parts[2] = {a, b};
  m->n_blocks = 0;
  uint8_t* dst = nullptr;
  for (const gguf::TensorInfo* t : parts) {
    if (t == nullptr) break;
    const uint64_t bytes = static_cast<uint64_t>(t->n_rows() * t->row_bytes());
    if (dst == nullptr || !one_buffer) {
      // Padded to 256: the GEMV reads whole 16-byte units past the last row.
      const uint64_t alloc = one_buffer ? BlockBytes(*a, b) : Pad256(bytes);
      KTX_ASSIGN_OR_RETURN(DeviceBuffer buf,
                           DeviceBuffer::Allocate(alloc, absl::StrCat(what, " (GGUF blocks)")));
      KTX_RETURN_IF_ERROR(CudaOk(cudaMemsetAsync(buf.get(), 0, alloc, runner_->stream()),
                                 "clearing a block buffer"));
      dst = buf.as<uint8_t>();
      weight_buffers_.push_back(std::move(buf));
      GpuMatrix::Blocks& blk = m->blocks[m->n_blocks++];
      blk.data = dst;
      blk.type = t->type;
      blk.row_bytes = t->row_bytes();
      blk.n_rows = 0;
    }
    m->blocks[m->n_blocks - 1].n_rows += t->n_rows();
    // Through the pinned staging buffer, as UploadMatrix (never straight from the mapping).
    const uint64_t chunk = load_pinned_.bytes();
    for (uint64_t off = 0; off < bytes; off += chunk) {
      const uint64_t n = std::min(chunk, bytes - off);
      std::memcpy(load_pinned_.as<uint8_t>(), t->data + off, n);
      KTX_RETURN_IF_ERROR(CudaOk(cudaMemcpyAsync(dst + off, load_pinned_.as<uint8_t>(), n,
                                                 cudaMemcpyHostToDevice, runner_->stream()),
                                 absl::StrCat("uploading the blocks of tensor '", t->name, "'")));
      KTX_RETURN_IF_ERROR(CudaOk(cudaStreamSynchronize(runner_->stream()),
                                 absl::StrCat("uploading the blocks of tensor '", t->name, "'")));
    }
    dst += bytes;  // the up rows follow the gate rows in one buffer
  }
  return absl::OkStatus();
}

absl::StatusOr<const float*> CudaDeepseek2::UploadVector(const gguf::TensorInfo& t,
                                                         const char* what) {
  const std::vector<float> host = models::DequantizeTensor(t);
  KTX_ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(host.size() * sizeof(float), what));
  KTX_RETURN_IF_ERROR(
      CudaOk(cudaMemcpy(b.get(), host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice),
             absl::StrCat("uploading tensor '", t.name, "'")));
  const float* p = b.as<float>();
  weight_buffers_.push_back(std::move(b));
  return p;
}

absl::Status CudaDeepseek2::Load(const CudaModelOptions& options, uint64_t free_bytes) {
  const models::Deepseek2Weights& w = model_.weights();
  const int64_t n_embd = hp_.n_embd;
  const int64_t n_head = hp_.n_head;
  const int64_t hd = hp_.n_embd_head_qk;
  const int64_t kvl = hp_.kv_lora_rank;
  const int64_t rw = kvl + hp_.n_rot;
  const int64_t hdv = hp_.n_embd_head_v;
  KTX_ASSIGN_OR_RETURN(runner_, GpuLayerRunner::Create(hp_, options.max_batch_tokens, options));
  KTX_ASSIGN_OR_RETURN(staging_,
                       DeviceBuffer::Allocate(options.load_staging_bytes, "load staging"));
  KTX_ASSIGN_OR_RETURN(load_pinned_,
                       PinnedBuffer::Allocate(options.load_staging_bytes, "pinned load staging"));

  // A matrix of the model into a new bf16 buffer.
  auto matrix = [&](const gguf::TensorInfo* t, const char* what) -> absl::StatusOr<const Bf16*> {
    KTX_ASSIGN_OR_RETURN(Bf16 * dst, AllocBf16(t->n_elements(), what));
    KTX_RETURN_IF_ERROR(UploadMatrix(*t, dst, what));
    return dst;
  };
  // A matrix (or gate and up stacked: [gate rows | up rows]) in the plan's
  // weight form: bf16 unless quantized-only and readable by the GEMV; GGUF
  // blocks when the form has them and the GEMV reads every part.
  // `bf16_dst`: where its bf16 form goes (room for it), else a new buffer.
  auto has_bf16 = [&](const gguf::TensorInfo* a, const gguf::TensorInfo* b) {
    const bool gemv = GemvReads(*a) && (b == nullptr || GemvReads(*b));
    return !(gemv && plan_.weight_form == GpuWeightForm::kQuantized);
  };
  auto weight = [&](const gguf::TensorInfo* a, const gguf::TensorInfo* b, const char* what,
                    Bf16* bf16_dst = nullptr) -> absl::StatusOr<GpuMatrix> {
    const GpuWeightForm form = plan_.weight_form;
    const bool gemv = GemvReads(*a) && (b == nullptr || GemvReads(*b));
    const bool blocks = gemv && (form == GpuWeightForm::kQuantized ||
                                 (form == GpuWeightForm::kBoth && KeptInBoth(*a, b)));
    GpuMatrix m;
    if (has_bf16(a, b)) {
      const int64_t n_a = a->n_elements();
      Bf16* dst = bf16_dst;
      if (dst == nullptr) {
        KTX_ASSIGN_OR_RETURN(dst, AllocBf16(n_a + (b ? b->n_elements() : 0), what));
      }
      KTX_RETURN_IF_ERROR(UploadMatrix(*a, dst, what));
      if (b != nullptr) KTX_RETURN_IF_ERROR(UploadMatrix(*b, dst + n_a, what));
      m.bf16 = dst;
    }
    if (blocks) KTX_RETURN_IF_ERROR(UploadBlocks(a, b, &m, what));
    return m;
  };

  KTX_ASSIGN_OR_RETURN(token_embd_, matrix(w.token_embd, "token_embd"));
  if (!w.output_tied) {
    KTX_ASSIGN_OR_RETURN(output_, weight(w.output, nullptr, "output"));
  } else {
    // The embedding's bf16 rows serve the head; the blocks only when the form has them.
    output_ = GpuMatrix(token_embd_);
    const GpuWeightForm form = plan_.weight_form;
    if (GemvReads(*w.token_embd) &&
        (form == GpuWeightForm::kQuantized ||
         (form == GpuWeightForm::kBoth && KeptInBoth(*w.token_embd, nullptr)))) {
      KTX_RETURN_IF_ERROR(UploadBlocks(w.token_embd, nullptr, &output_, "output (token_embd)"));
    }
  }
  KTX_ASSIGN_OR_RETURN(output_norm_, UploadVector(*w.output_norm, "output_norm"));
  layers_.resize(hp_.n_layer);
  for (int il = 0; il < hp_.n_layer; ++il) {
    const models::Deepseek2LayerWeights& l = w.layers[il];
    GpuLayerWeights& g = layers_[il];
    KTX_ASSIGN_OR_RETURN(g.attn_norm, UploadVector(*l.attn_norm, "attn_norm"));
    if (hp_.is_lite()) {
      KTX_ASSIGN_OR_RETURN(g.attn_q, weight(l.attn_q, nullptr, "attn_q"));
      KTX_ASSIGN_OR_RETURN(g.attn_kv_a_mqa, weight(l.attn_kv_a_mqa, nullptr, "attn_kv_a_mqa"));
    } else {
      // q_a and kv_a read the same input: their bf16 forms stacked in one
      // buffer (GpuLayerWeights::attn_qkv_a), one product where both take it.
      Bf16* stacked = nullptr;
      if (options.stack_q_a_kv_a && has_bf16(l.attn_q_a, nullptr) &&
          has_bf16(l.attn_kv_a_mqa, nullptr)) {
        KTX_ASSIGN_OR_RETURN(stacked,
                             AllocBf16(l.attn_q_a->n_elements() + l.attn_kv_a_mqa->n_elements(),
                                       "attn_q_a + attn_kv_a_mqa"));
      }
      KTX_ASSIGN_OR_RETURN(g.attn_q_a, weight(l.attn_q_a, nullptr, "attn_q_a", stacked));
      KTX_ASSIGN_OR_RETURN(g.attn_q_a_norm, UploadVector(*l.attn_q_a_norm, "attn_q_a_norm"));
      KTX_ASSIGN_OR_RETURN(g.attn_q_b, weight(l.attn_q_b, nullptr, "attn_q_b"));
      KTX_ASSIGN_OR_RETURN(
          g.attn_kv_a_mqa,
          weight(l.attn_kv_a_mqa, nullptr, "attn_kv_a_mqa",
                 stacked != nullptr ? stacked + l.attn_q_a->n_elements() : nullptr));
      g.attn_qkv_a = stacked;
    }
    KTX_ASSIGN_OR_RETURN(g.attn_kv_a_norm, UploadVector(*l.attn_kv_a_norm, "attn_kv_a_norm"));
    KTX_ASSIGN_OR_RETURN(g.attn_k_b, matrix(l.attn_k_b, "attn_k_b"));
    KTX_ASSIGN_OR_RETURN(g.attn_v_b, matrix(l.attn_v_b, "attn_v_b"));
    KTX_ASSIGN_OR_RETURN(g.attn_output, weight(l.attn_output, nullptr, "attn_output"));
    KTX_ASSIGN_OR_RETURN(g.ffn_norm, UploadVector(*l.ffn_norm, "ffn_norm"));
    if (!hp_.IsMoeLayer(il)) {
      KTX_ASSIGN_OR_RETURN(g.ffn_gate_up, weight(l.ffn_gate, l.ffn_up, "ffn_gate/up"));
      KTX_ASSIGN_OR_RETURN(g.ffn_down, weight(l.ffn_down, nullptr, "ffn_down"));
    } else {
      KTX_ASSIGN_OR_RETURN(g.ffn_gate_inp, UploadVector(*l.ffn_gate_inp, "ffn_gate_inp"));
      if (l.exp_probs_b != nullptr) {
        KTX_ASSIGN_OR_RETURN(g.exp_probs_b, UploadVector(*l.exp_probs_b, "exp_probs_b"));
      }
      if (hp_.n_expert_shared > 0) {
        KTX_ASSIGN_OR_RETURN(g.shexp_gate_up,
                             weight(l.ffn_gate_shexp, l.ffn_up_shexp, "ffn_gate/up_shexp"));
        KTX_ASSIGN_OR_RETURN(g.shexp_down, weight(l.ffn_down_shexp, nullptr, "ffn_down_shexp"));
      }
    }
  }
  staging_ = DeviceBuffer();
  load_pinned_ = PinnedBuffer();
  (void)n_embd, (void)n_head, (void)hd, (void)hdv, (void)free_bytes;

  const int64_t pages = plan_.kv_pages;
  KTX_ASSIGN_OR_RETURN(kv_pages_, DeviceBuffer::Allocate(static_cast<size_t>(hp_.n_layer) * pages *
                                                             plan_.kv_page_size * rw * sizeof(Bf16),
                                                         "the KV cache"));
  kv_ = std::make_unique<PagedKvAllocator>(pages, plan_.kv_page_size, plan_.max_sequences,
                                           plan_.max_context);
  const size_t table_bytes =
      static_cast<size_t>(plan_.max_sequences) * kv_->max_pages_per_sequence() * sizeof(int32_t);
  KTX_ASSIGN_OR_RETURN(block_table_, DeviceBuffer::Allocate(table_bytes, "the KV block table"));
  KTX_RETURN_IF_ERROR(
      CudaOk(cudaMemsetAsync(block_table_.get(), 0, table_bytes, runner_->stream()), "cudaMemset"));
  KTX_ASSIGN_OR_RETURN(pinned_table_, PinnedBuffer::Allocate(table_bytes, "the block table"));
  std::memset(pinned_table_.as<int32_t>(), 0, table_bytes);
  const GpuWorkLayout& l = runner_->layout();
  KTX_ASSIGN_OR_RETURN(pinned_indices_, PinnedBuffer::Allocate(l.indices * 4, "token indices"));
  KTX_ASSIGN_OR_RETURN(pinned_h_, PinnedBuffer::Allocate(l.h_f32 * 4, "hidden states"));
  KTX_ASSIGN_OR_RETURN(pinned_routed_, PinnedBuffer::Allocate(l.routed * 4, "routed output"));
  KTX_ASSIGN_OR_RETURN(pinned_ids_, PinnedBuffer::Allocate(l.expert_ids * 4, "expert ids"));
  KTX_ASSIGN_OR_RETURN(pinned_weights_,
                       PinnedBuffer::Allocate(l.expert_weights * 4, "expert weights"));
  KTX_ASSIGN_OR_RETURN(pinned_logits_, PinnedBuffer::Allocate(l.logits * 4, "logits"));
  KTX_RETURN_IF_ERROR(
      CudaOk(cudaEventCreateWithFlags(&routed_ready_, cudaEventDisableTiming), "cudaEventCreate"));
  return Sync("loading the model");
}

kc::MlaPagedKv CudaDeepseek2::LayerKv(int il) const {
  kc::MlaPagedKv kv;
  const int64_t rw = hp_.kv_lora_rank + hp_.n_rot;
  kv.page_stride = static_cast<int64_t>(plan_.kv_page_size) * rw;
  kv.data = kv_pages_.as<Bf16>() + static_cast<int64_t>(il) * plan_.kv_pages * kv.page_stride;
  kv.page_size = plan_.kv_page_size;
  kv.block_table = block_table_.as<int32_t>();
  kv.block_table_stride = kv_->max_pages_per_sequence();
  return kv;
}

absl::Status CudaDeepseek2::Upload(const void* host, void* device, size_t bytes) {
  return CudaOk(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, runner_->stream()),
                "copying to the GPU");
}

absl::Status CudaDeepseek2::Download(const void* device, void* host, size_t bytes) {
  return CudaOk(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, runner_->stream()),
                "copying from the GPU");
}

absl::Status CudaDeepseek2::Sync(const char* what) {
  return CudaOk(cudaStreamSynchronize(runner_->stream()), what);
}

absl::Status CudaDeepseek2::UploadBlockTable(std::span<const SequenceId> seqs) {
  const int32_t width = kv_->max_pages_per_sequence();
  for (SequenceId seq : seqs) {
    const std::vector<int32_t>& pages = kv_->pages(seq);
    int32_t* row = pinned_table_.as<int32_t>() + static_cast<int64_t>(seq) * width;
    std::copy(pages.begin(), pages.end(), row);
    KTX_RETURN_IF_ERROR(Upload(row, block_table_.as<int32_t>() + static_cast<int64_t>(seq) * width,
                               pages.size() * sizeof(int32_t)));
  }
  return absl::OkStatus();
}

// ---- sequences ----

absl::StatusOr<SequenceId> CudaDeepseek2::AddSequence(int64_t capacity_tokens) {
  return kv_->AddSequence(capacity_tokens);
}

absl::Status CudaDeepseek2::FreeSequence(SequenceId seq) { return kv_->FreeSequence(seq); }

absl::StatusOr<int64_t> CudaDeepseek2::SequenceLength(SequenceId seq) const {
  if (!kv_->Has(seq)) return absl::NotFoundError(absl::StrCat("no GPU sequence ", seq));
  return kv_->length(seq);
}

absl::Status CudaDeepseek2::Truncate(SequenceId seq, int64_t n_keep) {
  return kv_->Truncate(seq, n_keep);
}

absl::Status CudaDeepseek2::Commit(SequenceId seq, int64_t n_new) {
  return kv_->Commit(seq, n_new);
}

// ---- forward ----

absl::Status CudaDeepseek2::AdjustRouting(int il, const ForwardHooks& hooks,
                                          models::Routing* routing) const {
  const int64_t n = routing->n_tokens;
  if (hooks.adjust_routing) {
    KTX_RETURN_IF_ERROR(hooks.adjust_routing(il, routing));
  } else if (const models::RoutingPolicy* policy = model_.routing_policy(); policy != nullptr) {
    models::ApplyRoutingPolicies(hp_.routing(), il, {}, policy, routing);  // deferral: later
  }
  const int32_t k = routing->n_expert_used;
  if (routing->n_tokens != n || k < 1 || k > hp_.n_expert_used ||
      routing->expert_ids.size() != static_cast<size_t>(n * k) ||
      routing->weights.size() != routing->expert_ids.size()) {
    return absl::InternalError(
        absl::StrCat("layer ", il, ": the adjusted routing has ", routing->n_tokens, " tokens x ",
                     k, " (", routing->expert_ids.size(), " ids, ", routing->weights.size(),
                     " weights), expected ", n, " tokens x 1 .. ", hp_.n_expert_used));
  }
  for (int32_t e : routing->expert_ids) {
    if (e != models::kNoExpert && (e < 0 || e >= hp_.n_expert)) {
      return absl::InternalError(absl::StrCat("layer ", il, ": the adjusted routing names expert ",
                                              e, ", outside [0, ", hp_.n_expert, ")"));
    }
  }
  return absl::OkStatus();
}

// ---- expert deferral ----

absl::Status CudaDeepseek2::EnsureLateBuffers(bool gpu_part) {
  const GpuWorkLayout& l = runner_->layout();
  if (gpu_part && late_gpu_[0].get() == nullptr) {
    for (DeviceBuffer& b : late_gpu_) {
      KTX_ASSIGN_OR_RETURN(b, DeviceBuffer::Allocate(l.routed * 4, "deferred experts (GPU part)"));
    }
  }
  if (late_uploaded_ == nullptr) {
    KTX_ASSIGN_OR_RETURN(pinned_late_,
                         PinnedBuffer::Allocate(l.routed * 4, "deferred experts (CPU part)"));
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventCreateWithFlags(&late_uploaded_, cudaEventDisableTiming),
                               "cudaEventCreate"));
  }
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::SplitDeferred(int il, const ForwardHooks& hooks,
                                          models::Routing* routing, models::Routing late[2],
                                          bool* any) const {
  *any = false;
  models::DeferredCount count;
  if (hooks.split_deferred) {
    KTX_ASSIGN_OR_RETURN(count, hooks.split_deferred(il, routing, late));
  } else if (const models::RoutingPolicy* policy = model_.routing_policy();
             policy != nullptr && policy->HasDeferral()) {
    count = models::SplitDeferredRows(il, hp_.n_layer, {}, policy, routing, late);
  } else {
    return absl::OkStatus();
  }
  if (count.total() == 0) return absl::OkStatus();
  const int64_t n = routing->n_tokens;
  for (int j = 0; j < 2; ++j) {
    if (count.entries[j] == 0) continue;
    const models::Routing& r = late[j];
    if (r.n_tokens != n || r.n_expert_used < 1 ||
        r.expert_ids.size() != static_cast<size_t>(n * r.n_expert_used) ||
        r.weights.size() != r.expert_ids.size()) {
      return absl::InternalError(absl::StrCat(
          "layer ", il, ": the deferred routing (", models::DeferJoinName(models::DeferJoin(j)),
          ") has ", r.n_tokens, " tokens x ", r.n_expert_used, ", expected ", n, " tokens"));
    }
    for (int32_t e : r.expert_ids) {
      if (e != models::kNoExpert && (e < 0 || e >= hp_.n_expert)) {
        return absl::InternalError(absl::StrCat("layer ", il,
                                                ": the deferred routing names expert ", e,
                                                ", outside [0, ", hp_.n_expert, ")"));
      }
    }
  }
  if (il + 1 >= hp_.n_layer) {
    return absl::InternalError(
        absl::StrCat("layer ", il, " is the last layer but deferred experts to a next one"));
  }
  *any = true;
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::StartDeferred(int il, const ForwardHooks& hooks,
                                          const models::Activations& h,
                                          const models::Routing late[2], LateJoin made[2]) {
  const int64_t n = h.n_tokens();
  const int64_t n_embd = hp_.n_embd;
  // Resident experts compute their deferred entries on the GPU now (they are
  // on no shard); everything else goes to the CPU side.
  std::vector<uint8_t> resident(hp_.n_expert, 0);
  if (experts_ != nullptr) {
    for (int32_t e : experts_->ResidentExperts(il)) resident[e] = 1;
  }
  models::Routing cpu_late;
  for (int j = 0; j < 2; ++j) {
    made[j] = LateJoin{};
    const models::Routing& r = late[j];
    if (r.expert_ids.empty()) continue;
    std::vector<int32_t> gpu_experts;
    {
      std::vector<uint8_t> seen(hp_.n_expert, 0);
      for (int32_t e : r.expert_ids) {
        if (e >= 0 && e < hp_.n_expert && resident[e] && !seen[e]) {
          seen[e] = 1;
          gpu_experts.push_back(e);
        }
      }
      std::sort(gpu_experts.begin(), gpu_experts.end());
    }
    const int64_t n_cpu = CpuPartOfRouting(r, resident, &cpu_late);
    if (n_cpu == 0 && gpu_experts.empty()) continue;  // no entry deferred to this join
    made[j].il = il;
    KTX_RETURN_IF_ERROR(EnsureLateBuffers(!gpu_experts.empty()));
    if (!gpu_experts.empty()) {
      float* acc = late_gpu_[j].as<float>();
      KTX_RETURN_IF_ERROR(
          CudaOk(cudaMemsetAsync(acc, 0, static_cast<size_t>(n * n_embd) * 4, runner_->stream()),
                 "clearing the deferred experts' buffer"));
      KTX_RETURN_IF_ERROR(
          experts_->Compute(il, gpu_experts, r, runner_->h_bf16(), n_embd, acc, n_embd));
      made[j].gpu = true;
    }
    if (n_cpu > 0) {
      const auto join = static_cast<models::DeferJoin>(j);
      if (hooks.send_deferred && hooks.join_deferred) {
        KTX_RETURN_IF_ERROR(hooks.send_deferred(il, join, h, cpu_late));
      } else {
        KTX_RETURN_IF_ERROR(model_.RoutedExperts(il, h, cpu_late, {}, &late_host_[j][il % 2]));
      }
      made[j].cpu = true;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::JoinDeferredGpu(LateJoin* late, models::DeferJoin join, int64_t n) {
  if (late->il < 0 || !late->gpu) return absl::OkStatus();
  const int64_t n_embd = hp_.n_embd;
  KTX_RETURN_IF_ERROR(
      CudaOk(kc::AddRows(runner_->x(), n_embd, late_gpu_[static_cast<int>(join)].as<float>(),
                         n_embd, n, n_embd, runner_->stream()),
             "adding deferred experts"));
  late->gpu = false;
  if (!late->cpu) late->il = -1;
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::JoinDeferredCpu(LateJoin* late, models::DeferJoin join, int64_t n,
                                            const ForwardHooks& hooks) {
  if (late->il < 0 || !late->cpu) return absl::OkStatus();
  const int j = static_cast<int>(join);
  const int64_t n_embd = hp_.n_embd;
  models::Activations* part = &late_host_[j][late->il % 2];
  if (hooks.send_deferred && hooks.join_deferred) {
    KTX_RETURN_IF_ERROR(hooks.join_deferred(late->il, join, part));
  }
  if (part->n_tokens() != n || part->n_cols() != n_embd) {
    return absl::InternalError(absl::StrCat("the deferred experts of layer ", late->il,
                                            " came back as [", part->n_tokens(), ", ",
                                            part->n_cols(), "], expected [", n, ", ", n_embd, "]"));
  }
  // The previous upload from pinned_late_ must be done before it is rewritten.
  KTX_RETURN_IF_ERROR(
      CudaOk(cudaEventSynchronize(late_uploaded_), "waiting for the deferred experts' upload"));
  models::ParallelCopy(pinned_late_.as<float>(), part->data(), static_cast<size_t>(n * n_embd) * 4);
  // runner_->routed() is free here: every earlier use of it is earlier in
  // stream order.
  KTX_RETURN_IF_ERROR(
      Upload(pinned_late_.as<float>(), runner_->routed(), static_cast<size_t>(n * n_embd) * 4));
  KTX_RETURN_IF_ERROR(
      CudaOk(cudaEventRecord(late_uploaded_, runner_->stream()), "cudaEventRecord"));
  KTX_RETURN_IF_ERROR(CudaOk(
      kc::AddRows(runner_->x(), n_embd, runner_->routed(), n_embd, n, n_embd, runner_->stream()),
      "adding deferred experts"));
  late->cpu = false;
  if (!late->gpu) late->il = -1;
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::RunLayers(const GpuBatchView& batch, const ForwardHooks& hooks) {
  const int64_t n = batch.n_tokens;
  const int64_t n_embd = hp_.n_embd;
  const int32_t k_used = hp_.n_expert_used;
  const cudaStream_t stream = runner_->stream();
  float* x = runner_->x();
  // Host copies of h and of the routed experts' sum: members, so that their
  // pages are reused from step to step (tens of MiB at prefill).
  Activations& h = host_h_;
  Activations& routed = host_routed_;
  models::Routing routing;
  // Routed experts on the GPU (large batches): the GPU's share of the first MoE
  // layer is chosen from expected counts and its copies start now, behind the
  // dense layers and the attention; each MoE layer starts the next one's.
  // Routing policies (adjust_routing) act before the split, so the split runs
  // under them too (cuda_deepseek2_test RoutingPoliciesApplyBeforeTheGpuCpuSplit).
  const bool stream_experts = experts_ != nullptr && StreamsExperts(n);
  // A decode split chooses its experts at the routing: nothing to prefetch.
  const bool prefetch = stream_experts && expert_options_.prefetch && !DecodeSplits(n);
  std::vector<int32_t> prefetched;  // the GPU's experts of the next MoE layer, copying
  if (experts_ != nullptr && !experts_->idle()) {
    KTX_RETURN_IF_ERROR(experts_->Reset());  // left over from a failed pass
  }
  auto prefetch_layer = [&](int il) -> absl::Status {
    prefetched.clear();
    if (!prefetch || il >= hp_.n_layer || !hp_.IsMoeLayer(il)) return absl::OkStatus();
    std::vector<int64_t> expected = UniformTokensPerExpert(n, hp_.n_expert_used, hp_.n_expert);
    for (int32_t e : experts_->ResidentExperts(il)) expected[e] = 0;  // never streamed
    prefetched = GpuExpertsFor(n, expected);
    return experts_->Prefetch(il, prefetched);
  };
  if (prefetch) {
    int first_moe = 0;
    while (first_moe < hp_.n_layer && !hp_.IsMoeLayer(first_moe)) ++first_moe;
    KTX_RETURN_IF_ERROR(prefetch_layer(first_moe));
  }
  models::Routing cpu_routing;
  std::vector<int64_t> counts;
  std::vector<uint8_t> on_gpu;
  // Expert deferral: what the previous MoE layer deferred (pending) and what
  // this one defers (made), per join point; as Deepseek2Model::Forward, the
  // previous layer's part joins right after this layer's attention or with
  // this layer's FFN output.
  constexpr models::DeferJoin kJoinMoe = models::DeferJoin::kNextMoe;
  constexpr models::DeferJoin kJoinAttention = models::DeferJoin::kNextAttention;
  constexpr int kMoe = static_cast<int>(kJoinMoe);
  constexpr int kAttn = static_cast<int>(kJoinAttention);
  LateJoin pending[2], made[2];
  models::Routing late[2];
  // At the end of a MoE layer: the previous layer's deferred experts that
  // join its output (the GPU's part was added before this layer's own
  // deferred experts started), then this layer's become the pending ones.
  auto finish_moe_layer = [&]() -> absl::Status {
    KTX_RETURN_IF_ERROR(JoinDeferredCpu(&pending[kMoe], kJoinMoe, n, hooks));
    for (int j = 0; j < 2; ++j) {
      if (pending[j].il >= 0) {
        return absl::InternalError(absl::StrCat("expert deferral: the experts layer ",
                                                pending[j].il, " deferred were never joined"));
      }
      pending[j] = made[j];
      made[j] = LateJoin{};
    }
    return absl::OkStatus();
  };
  // CUDA graphs (small batches without streaming): each layer's GPU part up
  // to its hand-off is one graph; with a deferred part joining after this
  // layer's attention the layer runs eagerly (the join waits on the host).
  const bool graphs = UsesGraphs(n);
  stage_n_ = 0;
  stage_tokens_ = n;
  MarkStage(StageMark::kStart);
  const std::array<int64_t*, 3> product_counters = runner_->product_counters();
  for (int il = 0; il < hp_.n_layer; ++il) {
    const GpuLayerWeights& w = layers_[il];
    const bool moe = hp_.IsMoeLayer(il);
    const bool graphed = graphs && pending[kAttn].il < 0;
    // The layer's GPU work up to the hand-off: attention (and the deferred
    // experts joining after it), the FFN norm, then the dense FFN, or the
    // routing, the copies of h and the routing to the host (routed_ready_)
    // and the shared expert, which runs while the host waits.
    auto mark = [&](StageMark m) {
      if (!graphed) MarkStage(m);
    };
    auto gpu_part = [&]() -> absl::Status {
      KTX_RETURN_IF_ERROR(runner_->Attention(w, LayerKv(il), batch, x));
      mark(StageMark::kAttention);
      if (!graphed) {
        KTX_RETURN_IF_ERROR(JoinDeferredGpu(&pending[kAttn], kJoinAttention, n));
        KTX_RETURN_IF_ERROR(JoinDeferredCpu(&pending[kAttn], kJoinAttention, n, hooks));
      }
      KTX_RETURN_IF_ERROR(runner_->Norm(w.ffn_norm, x, n));
      if (!moe) {
        KTX_RETURN_IF_ERROR(
            runner_->GatedFfn(w.ffn_gate_up, w.ffn_down, hp_.n_ff, n, x, n_embd, 1.0f));
        mark(StageMark::kDenseFfn);
        return absl::OkStatus();
      }
      KTX_RETURN_IF_ERROR(runner_->Route(w, n));
      KTX_RETURN_IF_ERROR(Download(runner_->h_f32(), pinned_h_.as<float>(), n * n_embd * 4));
      KTX_RETURN_IF_ERROR(
          Download(runner_->expert_ids(), pinned_ids_.as<int32_t>(), n * k_used * 4));
      KTX_RETURN_IF_ERROR(
          Download(runner_->expert_weights(), pinned_weights_.as<float>(), n * k_used * 4));
      // While captured: an external event node of the graph, so that the
      // host's wait below sees each replay's copies (the flag is refused
      // outside a capture).
      cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
      KTX_RETURN_IF_ERROR(
          CudaOk(cudaStreamIsCapturing(stream, &capturing), "cudaStreamIsCapturing"));
      KTX_RETURN_IF_ERROR(
          CudaOk(capturing == cudaStreamCaptureStatusActive
                     ? cudaEventRecordWithFlags(routed_ready_, stream, cudaEventRecordExternal)
                     : cudaEventRecord(routed_ready_, stream),
                 "cudaEventRecord"));
      mark(StageMark::kRoute);
      if (hp_.n_expert_shared > 0) {
        KTX_RETURN_IF_ERROR(runner_->GatedFfn(
            w.shexp_gate_up, w.shexp_down, hp_.n_ff_exp * hp_.n_expert_shared, n, x, n_embd, 1.0f));
        mark(StageMark::kShared);
      }
      return absl::OkStatus();
    };
    if (graphed) {
      GraphKey key;
      key.il = il;
      key.n_tokens = n;
      key.max_kv_len = batch.max_kv_len;
      key.variant = runner_->gemv_max_tokens();
      KTX_RETURN_IF_ERROR(graphs_->Run(key, stream, gpu_part, product_counters));
    } else {
      KTX_RETURN_IF_ERROR(gpu_part());
    }
    if (!moe) {
      KTX_RETURN_IF_ERROR(JoinDeferredGpu(&pending[kMoe], kJoinMoe, n));
      KTX_RETURN_IF_ERROR(JoinDeferredCpu(&pending[kMoe], kJoinMoe, n, hooks));
      continue;
    }
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventSynchronize(routed_ready_), "waiting for the routing"));
    // The host copy of h (F32 [n, n_embd]) for the synchronous hooks and the
    // deferred experts, made on first use: the asynchronous start hook reads
    // the pinned download itself (one copy of the batch fewer per MoE layer;
    // pinned_h_ is rewritten only at the next layer's routing).
    bool h_on_host = false;
    auto host_h = [&]() -> const Activations& {
      if (!h_on_host) {
        h.ResizeForOverwrite(n, n_embd);
        models::ParallelCopy(h.data(), pinned_h_.as<float>(), n * n_embd * 4);
        h_on_host = true;
      }
      return h;
    };
    routing.n_tokens = n;
    routing.n_expert_used = k_used;
    routing.expert_ids.assign(pinned_ids_.as<int32_t>(), pinned_ids_.as<int32_t>() + n * k_used);
    routing.weights.assign(pinned_weights_.as<float>(), pinned_weights_.as<float>() + n * k_used);
    // Routing policies act on the full top-k, before the GPU/CPU split;
    // deferred entries leave the routing here.
    KTX_RETURN_IF_ERROR(AdjustRouting(il, hooks, &routing));
    bool deferred = false;
    KTX_RETURN_IF_ERROR(SplitDeferred(il, hooks, &routing, late, &deferred));
    // Stream order: the previous layer's GPU part of the deferred experts
    // joining here is added before this layer's deferred experts reuse its
    // buffer (StartDeferred).
    auto start_deferred = [&]() -> absl::Status {
      KTX_RETURN_IF_ERROR(JoinDeferredGpu(&pending[kMoe], kJoinMoe, n));
      if (deferred) KTX_RETURN_IF_ERROR(StartDeferred(il, hooks, host_h(), late, made));
      return absl::OkStatus();
    };
    const models::Routing* cpu_side = &routing;
    // The asynchronous hooks let the CPU's experts start before the GPU's are
    // enqueued (~180 experts' launches and copies: milliseconds of host time).
    const bool async_cpu = hooks.start_routed_experts && hooks.finish_routed_experts;
    bool cpu_started = false;
    auto cpu_t0 = std::chrono::steady_clock::now();
    const bool resident = experts_ != nullptr && !experts_->ResidentExperts(il).empty();
    // A cost-model split's planning time and modelled GPU time (LearnCopyRate).
    int64_t share_t0_ns = 0;
    double share_modelled_s = 0;
    if (stream_experts || resident) {
      // The GPU's experts: the resident ones with tokens (every batch size),
      // then, streaming, the prefetched ones (plus, all-GPU, every other used
      // expert), else the cost model's choice among the non-resident experts
      // from the actual counts. They run on the stream (after the shared
      // expert) while the CPU computes the rest.
      counts.assign(hp_.n_expert, 0);
      for (int32_t e : routing.expert_ids) {
        if (e >= 0 && e < hp_.n_expert) ++counts[e];
      }
      std::vector<int32_t> gpu_experts;
      on_gpu.assign(hp_.n_expert, 0);
      for (int32_t e : experts_->ResidentExperts(il)) {
        if (counts[e] == 0) continue;
        gpu_experts.push_back(e);
        on_gpu[e] = 1;
      }
      if (stream_experts) {
        std::vector<int64_t> rest = counts;
        for (int32_t e : experts_->ResidentExperts(il)) rest[e] = 0;
        std::vector<int32_t> chosen;
        if (prefetch && expert_mode_ == GpuExpertMode::kAuto && expert_options_.replan_split) {
          // The copies in flight stay; the rest of the GPU's share from the
          // actual counts and the CPU figures and copy rate as corrected so far.
          if (expert_options_.learn_copy_rate) LearnCopyRate();
          const std::vector<int32_t> in_flight = experts_->DropUnissued(il);
          share_t0_ns =
              std::chrono::steady_clock::now().time_since_epoch() / std::chrono::nanoseconds(1);
          const int64_t copied = experts_->CopiesFinished(il);
          // With a MoE layer next, its prefetch follows the share on the copy
          // stream: the share aims to end ahead of the CPU (split_gpu_lead).
          ExpertCostModel model = expert_cost_;
          model.gpu_lead =
              il + 1 < hp_.n_layer && hp_.IsMoeLayer(il + 1) ? expert_options_.split_gpu_lead : 0.0;
          const ExpertSplit split =
              PlanExpertSplit(model, rest, experts_->shape(), n, in_flight, copied);
          chosen = split.gpu_experts;
          share_modelled_s = split.gpu_s;
        } else {
          chosen = prefetch ? prefetched : GpuExpertsFor(n, rest);
        }
        for (int32_t e : chosen) {
          gpu_experts.push_back(e);
          on_gpu[e] = 1;
        }
        if (prefetch && expert_mode_ == GpuExpertMode::kAllGpu) {
          for (int32_t e = 0; e < hp_.n_expert; ++e) {
            if (counts[e] > 0 && !on_gpu[e]) {
              gpu_experts.push_back(e);
              on_gpu[e] = 1;
            }
          }
        }
      }
      // The CPU's routing: the GPU's entries removed, rows compacted and padded
      // with kNoExpert (weight 0); with the asynchronous hooks it starts now.
      const int64_t cpu_entries = CpuPartOfRouting(routing, on_gpu, &cpu_routing);
      if (cpu_entries > 0 && async_cpu) {
        cpu_t0 = std::chrono::steady_clock::now();
        KTX_RETURN_IF_ERROR(
            hooks.start_routed_experts(il, pinned_h_.as<float>(), n, n_embd, cpu_routing));
        cpu_started = true;
      }
      if (!gpu_experts.empty()) {  // (a decode split may give the GPU none)
        KTX_RETURN_IF_ERROR(
            experts_->Compute(il, gpu_experts, routing, runner_->h_bf16(), n_embd, x, n_embd));
        // A split's GPU share: the stream marks its end for LearnCopyRate.
        if (share_modelled_s > 0 && cpu_entries > 0 && expert_options_.learn_copy_rate) {
          gpu_share_done_ns_.store(0, std::memory_order_relaxed);
          KTX_RETURN_IF_ERROR(CudaOk(cudaLaunchHostFunc(stream, &MarkGpuShareDone, this),
                                     "marking the end of the GPU's experts"));
          gpu_share_t0_ns_ = share_t0_ns;
          gpu_share_modelled_s_ = share_modelled_s;
        }
      }
      if (stage_times_) {
        if (split_probe_ == nullptr) {
          KTX_RETURN_IF_ERROR(CudaOk(cudaEventCreate(&split_probe_), "creating the split probe"));
        }
        KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(split_probe_, stream), "split probe"));
      }
      KTX_RETURN_IF_ERROR(start_deferred());
      if (cpu_entries == 0) {  // all on the GPU
        if (stream_experts) KTX_RETURN_IF_ERROR(prefetch_layer(il + 1));
        KTX_RETURN_IF_ERROR(finish_moe_layer());
        continue;
      }
      cpu_side = &cpu_routing;
    } else {
      KTX_RETURN_IF_ERROR(start_deferred());
    }
    // With a cost-model split, the CPU side's measured time corrects the
    // model's CPU figures before the next MoE layer's experts are chosen (the
    // defaults are estimates; the shards' speed depends on the machine, the
    // load and the PCIe traffic beside them).
    // The decode split does not learn: its CPU time is mostly the hand-off for
    // small experts (which no split shortens), and a split fixed by the
    // routing alone keeps a batch's results independent of timing.
    const bool learn = stream_experts && expert_mode_ == GpuExpertMode::kAuto && !DecodeSplits(n);
    double modelled_cpu_s = 0;
    if (learn) {
      for (int32_t e = 0; e < hp_.n_expert; ++e) {
        if (counts[e] > 0 && !on_gpu[e])
          modelled_cpu_s += CpuExpertSeconds(expert_cost_, counts[e]);
      }
    }
    // The next MoE layer's GPU experts start copying now, while the CPU works
    // (before 2026-11-27 only after it answered, which left the PCIe link
    // idle for the CPU's whole time in a split layer); they are chosen with
    // the CPU figures as corrected up to the previous layer.
    if (stream_experts) KTX_RETURN_IF_ERROR(prefetch_layer(il + 1));
    // How long the host waited for the CPU's answer: little when the CPU
    // finished while the host was still enqueueing the GPU's share (the first
    // call at a batch size takes ~200 ms for that; the answer then waited 2-4
    // ms for the hand-off, H200 machine 2026-11-27), and then the measured
    // time says only that the CPU took at most that long: it may correct the
    // CPU figures down, not up.
    double cpu_wait_s = 0.0;
    if (cpu_started) {  // straight into the pinned buffer the add reads
      const auto w0 = std::chrono::steady_clock::now();
      KTX_RETURN_IF_ERROR(hooks.finish_routed_experts(il, pinned_routed_.as<float>(), n, n_embd));
      cpu_wait_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
    } else {
      cpu_t0 = std::chrono::steady_clock::now();
      if (hooks.routed_experts) {
        KTX_RETURN_IF_ERROR(hooks.routed_experts(il, host_h(), *cpu_side, &routed));
      } else {
        KTX_RETURN_IF_ERROR(model_.RoutedExperts(il, host_h(), *cpu_side, {}, &routed));
      }
    }
    const double cpu_measured_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - cpu_t0).count();
    if (!cpu_started) cpu_wait_s = cpu_measured_s;  // the host ran the CPU's part itself
    const bool upper_bound_only = cpu_wait_s < 0.1 * cpu_measured_s;
    if (learn && modelled_cpu_s > 0 && !(upper_bound_only && cpu_measured_s > modelled_cpu_s)) {
      CorrectCpuCost(cpu_measured_s / modelled_cpu_s);
    }
    if (stage_times_ && stream_experts && cpu_side == &cpu_routing) {
      // Which side of the split finished last: the GPU's experts (and the
      // next layer's prefetch queued before them) or the CPU's.
      int64_t gpu_n = 0, cpu_n = 0, gpu_tokens = 0, cpu_tokens = 0;
      for (int32_t e = 0; e < hp_.n_expert; ++e) {
        if (counts[e] == 0) continue;
        (on_gpu[e] ? gpu_n : cpu_n) += 1;
        (on_gpu[e] ? gpu_tokens : cpu_tokens) += counts[e];
      }
      double gpu_extra_ms = 0;
      if (split_probe_ != nullptr) {
        const auto t = std::chrono::steady_clock::now();
        KTX_RETURN_IF_ERROR(CudaOk(cudaEventSynchronize(split_probe_), "split probe"));
        gpu_extra_ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
      }
      KTX_LOG(INFO, "gpu") << absl::StrFormat(
          "split layer %d, %lld tokens: GPU %lld experts (%lld entries), CPU %lld experts (%lld "
          "entries): CPU %.1f ms (modelled %.1f; the host waited %.1f ms for it), GPU modelled "
          "%.1f ms; the GPU's experts finished %.1f ms after the CPU",
          il, static_cast<long long>(n), static_cast<long long>(gpu_n),
          static_cast<long long>(gpu_tokens), static_cast<long long>(cpu_n),
          static_cast<long long>(cpu_tokens), cpu_measured_s * 1e3, modelled_cpu_s * 1e3,
          cpu_wait_s * 1e3, share_modelled_s * 1e3, gpu_extra_ms);
    }
    if (!cpu_started && (routed.n_tokens() != n || routed.n_cols() != n_embd)) {
      return absl::InternalError(absl::StrCat("the expert backend returned [", routed.n_tokens(),
                                              ", ", routed.n_cols(), "], expected [", n, ", ",
                                              n_embd, "]"));
    }
    MarkStage(StageMark::kExpertsWait);
    if (!cpu_started) {
      models::ParallelCopy(pinned_routed_.as<float>(), routed.data(), n * n_embd * 4);
    }
    // pinned_routed_ is rewritten only after the next layer's routing, i.e.
    // after this add in stream order (routed_ready_), copy or direct read.
    const float* routed_on_gpu = pinned_routed_.as<float>();  // mapped (UVA)
    const bool zero_copy = routed_read_ == RoutedRead::kAlways ||
                           (routed_read_ == RoutedRead::kAuto && stream_experts);
    if (!zero_copy) {
      KTX_RETURN_IF_ERROR(Upload(pinned_routed_.as<float>(), runner_->routed(), n * n_embd * 4));
      routed_on_gpu = runner_->routed();
    }
    MarkStage(StageMark::kRoutedUpload);
    KTX_RETURN_IF_ERROR(
        CudaOk(kc::AddRows(x, n_embd, routed_on_gpu, n_embd, n, n_embd, stream), "residual add"));
    MarkStage(StageMark::kRoutedAdd);
    KTX_RETURN_IF_ERROR(finish_moe_layer());
  }
  for (const LateJoin& p : pending) {
    if (p.il >= 0) {
      return absl::InternalError(absl::StrCat("expert deferral: experts deferred by layer ", p.il,
                                              " after the last layer"));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::RunHead(std::span<const int32_t> rows, Activations* logits) {
  const int64_t n_out = static_cast<int64_t>(rows.size());
  const int64_t n_embd = hp_.n_embd;
  const int64_t n_vocab = hp_.n_vocab;
  const int64_t T = runner_->max_tokens();
  int32_t* d_rows = runner_->indices() + 3 * T;
  int32_t* h_rows = pinned_indices_.as<int32_t>() + 3 * T;
  std::copy(rows.begin(), rows.end(), h_rows);
  KTX_RETURN_IF_ERROR(Upload(h_rows, d_rows, n_out * 4));
  KTX_RETURN_IF_ERROR(
      CudaOk(kc::RmsNorm(runner_->x(), n_embd, d_rows, output_norm_, n_embd, n_out, hp_.rms_eps,
                         nullptr, 0, runner_->h_bf16(), n_embd, runner_->stream()),
             "output norm"));
  KTX_RETURN_IF_ERROR(runner_->Linear(output_, n_vocab, n_embd, runner_->h_bf16(), n_embd, n_out,
                                      runner_->logits(), n_vocab, 0.0f, "output head"));
  KTX_RETURN_IF_ERROR(Download(runner_->logits(), pinned_logits_.as<float>(), n_out * n_vocab * 4));
  MarkStage(StageMark::kHead);
  KTX_RETURN_IF_ERROR(Sync("the forward pass"));
  ReportStages();
  logits->Resize(n_out, n_vocab);
  std::memcpy(logits->data(), pinned_logits_.as<float>(), n_out * n_vocab * 4);
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::ForwardBatch(std::span<const BatchEntry> entries, Activations* logits) {
  return ForwardBatch(entries, logits, ForwardHooks{});
}

absl::Status CudaDeepseek2::ForwardBatch(std::span<const BatchEntry> entries, Activations* logits,
                                         const ForwardHooks& hooks) {
  if (entries.empty()) return absl::InvalidArgumentError("ForwardBatch: no entries");
  const int64_t T = runner_->max_tokens();
  int64_t n = 0;
  std::set<SequenceId> seen;
  for (const BatchEntry& e : entries) {
    if (!kv_->Has(e.seq)) return absl::NotFoundError(absl::StrCat("no GPU sequence ", e.seq));
    if (!seen.insert(e.seq).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("ForwardBatch: sequence ", e.seq, " appears twice in one batch"));
    }
    if (e.tokens.empty()) return absl::InvalidArgumentError("ForwardBatch: an entry has no tokens");
    for (size_t t = 0; t < e.tokens.size(); ++t) {
      if (e.tokens[t] < 0 || e.tokens[t] >= hp_.n_vocab) {
        return absl::OutOfRangeError(absl::StrCat("token ", t, " of sequence ", e.seq, " has id ",
                                                  e.tokens[t], ", outside the vocabulary [0, ",
                                                  hp_.n_vocab, ")"));
      }
    }
    const int64_t len = kv_->length(e.seq) + static_cast<int64_t>(e.tokens.size());
    if (len > std::numeric_limits<int32_t>::max()) {
      return absl::OutOfRangeError("ForwardBatch: positions beyond 2^31");
    }
    n += static_cast<int64_t>(e.tokens.size());
  }
  if (n > T) {
    return absl::InvalidArgumentError(
        absl::StrCat("ForwardBatch: ", n, " tokens exceed max_batch_tokens = ", T));
  }
  std::vector<SequenceId> seqs;
  for (const BatchEntry& e : entries) {
    KTX_RETURN_IF_ERROR(kv_->Reserve(e.seq, kv_->length(e.seq) + e.tokens.size()));
    seqs.push_back(e.seq);
  }
  int32_t* idx = pinned_indices_.as<int32_t>();
  std::vector<int32_t> rows;
  std::vector<GpuBatchSegment> segments;
  int64_t t = 0, max_kv_len = 0;
  for (const BatchEntry& e : entries) {
    const int64_t base = kv_->length(e.seq);
    const int64_t m = static_cast<int64_t>(e.tokens.size());
    segments.push_back({t, m, static_cast<int32_t>(e.seq), base});
    for (int64_t i = 0; i < m; ++i, ++t) {
      idx[t] = e.tokens[i];
      idx[T + t] = static_cast<int32_t>(base + i);
      idx[2 * T + t] = e.seq;
      if (e.rows == LogitsRows::kAll || i == m - 1) rows.push_back(static_cast<int32_t>(t));
    }
    max_kv_len = std::max(max_kv_len, base + m);
  }
  KTX_RETURN_IF_ERROR(UploadBlockTable(seqs));
  int32_t* d_idx = runner_->indices();
  KTX_RETURN_IF_ERROR(Upload(idx, d_idx, n * 4));
  KTX_RETURN_IF_ERROR(Upload(idx + T, d_idx + T, n * 4));
  KTX_RETURN_IF_ERROR(Upload(idx + 2 * T, d_idx + 2 * T, n * 4));
  KTX_RETURN_IF_ERROR(CudaOk(
      kc::EmbedRows(token_embd_, hp_.n_embd, d_idx, n, runner_->x(), hp_.n_embd, runner_->stream()),
      "embedding"));
  GpuBatchView batch;
  batch.n_tokens = n;
  batch.positions = d_idx + T;
  batch.seq_index = d_idx + 2 * T;
  batch.max_kv_len = UsesGraphs(n) ? GraphKvBucket(max_kv_len) : max_kv_len;
  if (!UsesGraphs(n)) {
    // (A graph replays with other positions than it was captured with: its
    // steps keep to the MLA kernel, which reads them from the device.)
    batch.segments = segments.data();
    batch.n_segments = static_cast<int64_t>(segments.size());
  }
  absl::Status status = RunLayers(batch, hooks);
  if (status.ok()) status = RunHead(rows, logits);
  if (!status.ok()) {
    Sync("after a failed forward pass").IgnoreError();
    return status;
  }
  if (!hooks.commit) return absl::OkStatus();
  for (const BatchEntry& e : entries) {
    KTX_RETURN_IF_ERROR(kv_->Commit(e.seq, static_cast<int64_t>(e.tokens.size())));
  }
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::Forward(std::span<const int32_t> tokens, SequenceId seq,
                                    LogitsRows rows, Activations* logits) {
  if (tokens.empty()) return absl::InvalidArgumentError("Forward: empty token batch");
  if (!kv_->Has(seq)) return absl::NotFoundError(absl::StrCat("no GPU sequence ", seq));
  const int64_t T = runner_->max_tokens();
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (kv_->length(seq) + n > kv_->capacity(seq)) {
    return absl::ResourceExhaustedError(absl::StrCat("GPU sequence ", seq, " holds at most ",
                                                     kv_->capacity(seq), " tokens; ",
                                                     kv_->length(seq), " + ", n, " requested"));
  }
  if (n <= T) {
    const BatchEntry entry{seq, tokens, rows};
    return ForwardBatch(std::span<const BatchEntry>(&entry, 1), logits);
  }
  // Chunked prefill; on error the sequence is rolled back.
  const int64_t start = kv_->length(seq);
  std::vector<float> all;
  Activations part;
  for (int64_t b = 0; b < n; b += T) {
    const int64_t m = std::min(T, n - b);
    const bool last = b + m == n;
    const BatchEntry entry{seq, tokens.subspan(b, m),
                           rows == LogitsRows::kAll ? rows : LogitsRows::kLast};
    absl::Status s = ForwardBatch(std::span<const BatchEntry>(&entry, 1), &part);
    if (!s.ok()) {
      kv_->Truncate(seq, start).IgnoreError();
      return s;
    }
    if (rows == LogitsRows::kAll || last) {
      all.insert(all.end(), part.values().begin(), part.values().end());
    }
  }
  const int64_t n_rows = rows == LogitsRows::kAll ? n : 1;
  logits->Resize(n_rows, hp_.n_vocab);
  std::copy(all.begin(), all.end(), logits->data());
  return absl::OkStatus();
}

// ---- stages ----

absl::Status CudaDeepseek2::CheckLayer(int il) const {
  if (il < 0 || il >= hp_.n_layer) {
    return absl::OutOfRangeError(absl::StrCat("layer ", il, " outside [0, ", hp_.n_layer, ")"));
  }
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::CheckRows(const Activations& a, const char* what) const {
  if (a.n_cols() != hp_.n_embd || a.n_tokens() <= 0 || a.n_tokens() > runner_->max_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": activations of shape [", a.n_tokens(),
                                                   ", ", a.n_cols(), "], expected [1 .. ",
                                                   runner_->max_tokens(), ", ", hp_.n_embd, "]"));
  }
  return absl::OkStatus();
}

absl::Status CudaDeepseek2::Embed(std::span<const int32_t> tokens, Activations* x) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n <= 0 || n > runner_->max_tokens()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Embed: ", n, " tokens, expected 1 .. ", runner_->max_tokens()));
  }
  for (int64_t t = 0; t < n; ++t) {
    if (tokens[t] < 0 || tokens[t] >= hp_.n_vocab) {
      return absl::OutOfRangeError(absl::StrCat("token ", t, " has id ", tokens[t],
                                                ", outside the vocabulary [0, ", hp_.n_vocab, ")"));
    }
  }
  std::copy(tokens.begin(), tokens.end(), pinned_indices_.as<int32_t>());
  KTX_RETURN_IF_ERROR(Upload(pinned_indices_.as<int32_t>(), runner_->indices(), n * 4));
  KTX_RETURN_IF_ERROR(CudaOk(kc::EmbedRows(token_embd_, hp_.n_embd, runner_->indices(), n,
                                           runner_->x(), hp_.n_embd, runner_->stream()),
                             "embedding"));
  x->Resize(n, hp_.n_embd);
  KTX_RETURN_IF_ERROR(Download(runner_->x(), x->data(), n * hp_.n_embd * 4));
  return Sync("Embed");
}

absl::Status CudaDeepseek2::AttentionBlock(int il, SequenceId seq,
                                           std::span<const int32_t> positions, Activations* x) {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckRows(*x, "AttentionBlock"));
  if (!kv_->Has(seq)) return absl::NotFoundError(absl::StrCat("no GPU sequence ", seq));
  const int64_t n = x->n_tokens();
  const int64_t T = runner_->max_tokens();
  if (static_cast<int64_t>(positions.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("AttentionBlock: ", positions.size(), " positions for ", n, " tokens"));
  }
  const int64_t base = kv_->length(seq);
  for (int64_t t = 0; t < n; ++t) {
    if (positions[t] != base + t) {
      return absl::InvalidArgumentError(absl::StrCat("AttentionBlock: token ", t, " has position ",
                                                     positions[t], ", expected ", base + t,
                                                     " (the batch must continue the sequence)"));
    }
  }
  KTX_RETURN_IF_ERROR(kv_->Reserve(seq, base + n));
  const SequenceId seqs[] = {seq};
  KTX_RETURN_IF_ERROR(UploadBlockTable(seqs));
  int32_t* idx = pinned_indices_.as<int32_t>();
  for (int64_t t = 0; t < n; ++t) {
    idx[T + t] = positions[t];
    idx[2 * T + t] = seq;
  }
  int32_t* d_idx = runner_->indices();
  KTX_RETURN_IF_ERROR(Upload(idx + T, d_idx + T, n * 4));
  KTX_RETURN_IF_ERROR(Upload(idx + 2 * T, d_idx + 2 * T, n * 4));
  KTX_RETURN_IF_ERROR(Upload(x->data(), runner_->x(), n * hp_.n_embd * 4));
  GpuBatchView batch;
  batch.n_tokens = n;
  batch.positions = d_idx + T;
  batch.seq_index = d_idx + 2 * T;
  batch.max_kv_len = base + n;
  const GpuBatchSegment segment{0, n, static_cast<int32_t>(seq), base};
  batch.segments = &segment;
  batch.n_segments = 1;
  KTX_RETURN_IF_ERROR(runner_->Attention(layers_[il], LayerKv(il), batch, runner_->x()));
  KTX_RETURN_IF_ERROR(Download(runner_->x(), x->data(), n * hp_.n_embd * 4));
  return Sync("AttentionBlock");
}

absl::Status CudaDeepseek2::FfnNorm(int il, const Activations& x, Activations* h) {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckRows(x, "FfnNorm"));
  const int64_t n = x.n_tokens();
  KTX_RETURN_IF_ERROR(Upload(x.data(), runner_->x(), n * hp_.n_embd * 4));
  KTX_RETURN_IF_ERROR(runner_->Norm(layers_[il].ffn_norm, runner_->x(), n));
  h->Resize(n, hp_.n_embd);
  KTX_RETURN_IF_ERROR(Download(runner_->h_f32(), h->data(), n * hp_.n_embd * 4));
  return Sync("FfnNorm");
}

absl::Status CudaDeepseek2::DenseFfn(int il, const Activations& h, Activations* out) {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckRows(h, "DenseFfn"));
  if (hp_.IsMoeLayer(il)) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", il, " is a MoE layer, not dense"));
  }
  const int64_t n = h.n_tokens(), n_embd = hp_.n_embd;
  KTX_RETURN_IF_ERROR(Upload(h.data(), runner_->h_f32(), n * n_embd * 4));
  KTX_RETURN_IF_ERROR(CudaOk(kc::ConvertF32ToBf16(runner_->h_f32(), n_embd, n, n_embd,
                                                  runner_->h_bf16(), n_embd, runner_->stream()),
                             "DenseFfn input"));
  KTX_RETURN_IF_ERROR(runner_->GatedFfn(layers_[il].ffn_gate_up, layers_[il].ffn_down, hp_.n_ff, n,
                                        runner_->routed(), n_embd, 0.0f));
  out->Resize(n, n_embd);
  KTX_RETURN_IF_ERROR(Download(runner_->routed(), out->data(), n * n_embd * 4));
  return Sync("DenseFfn");
}

absl::Status CudaDeepseek2::Route(int il, const Activations& h, models::Routing* routing) {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckRows(h, "Route"));
  if (!hp_.IsMoeLayer(il)) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", il, " is dense, it has no router"));
  }
  const int64_t n = h.n_tokens();
  const int32_t k = hp_.n_expert_used;
  KTX_RETURN_IF_ERROR(Upload(h.data(), runner_->h_f32(), n * hp_.n_embd * 4));
  KTX_RETURN_IF_ERROR(runner_->Route(layers_[il], n));
  routing->n_tokens = n;
  routing->n_expert_used = k;
  routing->expert_ids.resize(n * k);
  routing->weights.resize(n * k);
  KTX_RETURN_IF_ERROR(Download(runner_->expert_ids(), routing->expert_ids.data(), n * k * 4));
  KTX_RETURN_IF_ERROR(Download(runner_->expert_weights(), routing->weights.data(), n * k * 4));
  return Sync("Route");
}

absl::Status CudaDeepseek2::SharedExperts(int il, const Activations& h, Activations* out) {
  KTX_RETURN_IF_ERROR(CheckLayer(il));
  KTX_RETURN_IF_ERROR(CheckRows(h, "SharedExperts"));
  if (!hp_.IsMoeLayer(il)) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", il, " is dense, it has no shared experts"));
  }
  const int64_t n = h.n_tokens(), n_embd = hp_.n_embd;
  out->Resize(n, n_embd);
  if (hp_.n_expert_shared == 0) return absl::OkStatus();
  KTX_RETURN_IF_ERROR(Upload(h.data(), runner_->h_f32(), n * n_embd * 4));
  KTX_RETURN_IF_ERROR(CudaOk(kc::ConvertF32ToBf16(runner_->h_f32(), n_embd, n, n_embd,
                                                  runner_->h_bf16(), n_embd, runner_->stream()),
                             "SharedExperts input"));
  KTX_RETURN_IF_ERROR(runner_->GatedFfn(layers_[il].shexp_gate_up, layers_[il].shexp_down,
                                        hp_.n_ff_exp * hp_.n_expert_shared, n, runner_->routed(),
                                        n_embd, 0.0f));
  KTX_RETURN_IF_ERROR(Download(runner_->routed(), out->data(), n * n_embd * 4));
  return Sync("SharedExperts");
}

absl::Status CudaDeepseek2::Head(const Activations& x, LogitsRows rows, Activations* logits) {
  KTX_RETURN_IF_ERROR(CheckRows(x, "Head"));
  const int64_t n = x.n_tokens();
  KTX_RETURN_IF_ERROR(Upload(x.data(), runner_->x(), n * hp_.n_embd * 4));
  std::vector<int32_t> idx;
  for (int64_t t = rows == LogitsRows::kAll ? 0 : n - 1; t < n; ++t) {
    idx.push_back(static_cast<int32_t>(t));
  }
  return RunHead(idx, logits);
}

}  // namespace ktx::gpu
