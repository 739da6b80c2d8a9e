#include "runtime/moe_backend/cpu_moe_backend.h"

#include <numa.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"

namespace ktx::moe_backend {
namespace {

using kernels::CpuVariant;
using kernels::TensorType;
using kernels::moe::MoeLayerFormat;
using kernels::moe::MoeMatrixFormat;
using kernels::moe::MoeWeightLayout;

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string TypeName(TensorType t) {
  const auto traits = kernels::GetTensorTypeTraits(static_cast<uint32_t>(t));
  return traits ? std::string(traits->name) : absl::StrCat("type ", static_cast<uint32_t>(t));
}

// Load progress on stderr: a bar redrawn in place (terminal) or a log line
// every 5 s. Called from the loading thread only.
class LoadProgress {
 public:
  LoadProgress(ProgressMode mode, uint64_t total) : total_(total) {
    if (mode == ProgressMode::kAuto) {
      mode = isatty(STDERR_FILENO) ? ProgressMode::kBar : ProgressMode::kLines;
    }
    mode_ = total > 0 ? mode : ProgressMode::kOff;
    start_ = last_ = Clock::now();
  }

  void Update(uint64_t done) {
    const auto now = Clock::now();
    const double since_last = std::chrono::duration<double>(now - last_).count();
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double gbps = elapsed > 0 ? static_cast<double>(done) / elapsed / 1e9 : 0.0;
    const double frac = static_cast<double>(done) / static_cast<double>(total_);
    if (mode_ == ProgressMode::kBar) {
      if (since_last < 0.1 && done < total_) return;
      constexpr int kWidth = 30;
      const int filled = static_cast<int>(frac * kWidth);
      std::string bar(filled, '#');
      bar.resize(kWidth, ' ');
      std::fprintf(stderr, "\rrepacking experts [%s] %3.0f%% %.2f / %.2f GiB %.2f GB/s",
                   bar.c_str(), 100.0 * frac, static_cast<double>(done) / (1 << 30),
                   static_cast<double>(total_) / (1 << 30), gbps);
      if (done >= total_) std::fputc('\n', stderr);
      std::fflush(stderr);
      drew_ = true;
    } else if (mode_ == ProgressMode::kLines) {
      if (since_last < 5.0) return;
      KTX_LOG(INFO, "moe_backend") << absl::StrFormat(
          "repacking experts: %.0f%% (%.2f of %.2f GiB, %.2f GB/s)", 100.0 * frac,
          static_cast<double>(done) / (1 << 30), static_cast<double>(total_) / (1 << 30), gbps);
    }
    last_ = now;
  }

  // Ends a bar that did not reach 100 % (an error).
  ~LoadProgress() {
    if (drew_ && mode_ == ProgressMode::kBar && !finished_) std::fputc('\n', stderr);
  }
  void Finish() { finished_ = true; }

 private:
  ProgressMode mode_;
  uint64_t total_;
  Clock::time_point start_, last_;
  bool drew_ = false;
  bool finished_ = false;
};

// One repacking: the job plus the arrays it points into.
struct RepackJob {
  kernels::moe::MoeRepackJob job;
  std::vector<const void*> src;
  std::vector<void*> dst;
  int il = 0;
};

std::vector<int> AllowedCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  return cpus;
}

// Indices of the six per-call pointer tables: the decode form (panel16 or the
// mapping), then the tile caches (empty without them).
enum Which : int { kGate = 0, kUp = 1, kDown = 2, kGateT = 3, kUpT = 4, kDownT = 5 };

// Points w's tile caches at the tables of gate, up and down (tile512 of the
// layer's decode types).
void AttachTileCaches(const MoeLayerFormat& f, const void* const* gate, const void* const* up,
                      const void* const* down, kernels::moe::MoeLayerWeights* w) {
  const MoeWeightLayout t = MoeWeightLayout::kTile512;
  w->gate_tile = {{f.gate.type, t}, gate};
  w->up_tile = {{f.up.type, t}, up};
  w->down_tile = {{f.down.type, t}, down};
}

// A switch point no call reaches (decode path only).
constexpr int64_t kNoPrefill = int64_t{1} << 40;

// A positive token count from environment variable `name`: 0 when unset or
// empty, InvalidArgument naming the variable for anything else.
absl::StatusOr<int64_t> TokensFromEnv(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  if (end == env || *end != '\0' || v <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, "=", env, ": expected a positive token count per expert"));
  }
  return static_cast<int64_t>(v);
}

// A switch point (tokens per expert) from its option (> 0), else from
// environment variable `env`, else 0 (calibrate at load); *source names where
// it came from. InvalidArgument for a negative option or a bad variable.
absl::Status SwitchFromOptionOrEnv(const char* option_name, int64_t option, const char* env,
                                   int64_t* value, std::string* source) {
  if (option < 0) {
    return absl::InvalidArgumentError(absl::StrCat("CpuMoeBackend: ", option_name, " = ", option,
                                                   ", expected > 0 (or 0: calibrate at load)"));
  }
  *value = option;
  *source = "option";
  if (option == 0) {
    KTX_ASSIGN_OR_RETURN(*value, TokensFromEnv(env));
    if (*value > 0) *source = env;
  }
  return absl::OkStatus();
}

// A switch point measured once per process and `key` (see the header):
// `calibrate` runs for the first request of a key and fills *points; later
// requests get its value and points.
absl::StatusOr<int64_t> CalibratedOnce(const std::string& key,
                                       const std::function<absl::StatusOr<int64_t>()>& calibrate,
                                       std::vector<CpuMoeLoadStats::SwitchPoint>* points,
                                       std::string* source) {
  static std::mutex mu;
  static std::map<std::string, std::pair<int64_t, std::vector<CpuMoeLoadStats::SwitchPoint>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find(key); it != cache.end()) {
    *points = it->second.second;
    *source = "calibrated (earlier in this process)";
    return it->second.first;
  }
  KTX_ASSIGN_OR_RETURN(const int64_t value, calibrate());
  *source = "calibrated";
  cache[key] = {value, *points};
  return value;
}

// The re-quantization of BF16 experts asked for: the option unless it is
// kBF16 (keep), else KTX_MOE_REQUANT_BF16 (q4_k, q5_k, q6_k, q8_0; bf16, 0 or
// empty: keep). InvalidArgument naming the option or variable otherwise.
absl::StatusOr<TensorType> RequantTarget(TensorType option) {
  if (option != TensorType::kBF16) {
    if (!kernels::moe::MoeRequantTargetSupported(option)) {
      return absl::InvalidArgumentError(
          absl::StrCat("CpuMoeBackend: requantize_bf16 = ", TypeName(option),
                       ": expected q4_K, q5_K, q6_K or q8_0 (or bf16: keep BF16)"));
    }
    return option;
  }
  const char* env = std::getenv("KTX_MOE_REQUANT_BF16");
  if (env == nullptr) return TensorType::kBF16;
  const std::string v = absl::AsciiStrToLower(env);
  if (v.empty() || v == "0" || v == "bf16") return TensorType::kBF16;
  if (v == "q4_k") return TensorType::kQ4_K;
  if (v == "q5_k") return TensorType::kQ5_K;
  if (v == "q6_k") return TensorType::kQ6_K;
  if (v == "q8_0") return TensorType::kQ8_0;
  return absl::InvalidArgumentError(
      absl::StrCat("KTX_MOE_REQUANT_BF16=", env,
                   ": expected q4_k, q5_k, q6_k or q8_0 (or bf16 / 0: keep BF16)"));
}

// Whether the amx variant runs `f` on bf16 tiles (kernels/cpu/moe: BF16 panel16).
bool Bf16Tiles(kernels::CpuVariant variant, kernels::moe::MoeMatrixFormat f) {
  return variant == kernels::CpuVariant::kAmx && f.type == TensorType::kBF16 &&
         f.layout == MoeWeightLayout::kPanel16;
}

}  // namespace

// One MoE layer.
struct CpuMoeBackend::Layer {
  bool fast = false;          // on the kernels (else: reference fallback)
  std::vector<uint8_t> held;  // U8 [n_expert], nonzero = held
  int64_t n_held = 0;
  kernels::moe::MoePlan plan;
  // Expert matrices of each kind (Which): [n_expert] pointers (null = not
  // held), into decode_mem (or the mapping for the gguf layout) and tile_mem.
  std::vector<const void*> ptrs[6];
  runtime::NumaBuffer decode_mem;  // held experts x [gate | up | down], decode layout
  runtime::NumaBuffer tile_mem;    // held experts x [gate | up | down] tile caches (tile512)
  bool tile_cache = false;         // ptrs[kGateT..kDownT] are set
};

absl::StatusOr<bool> TileCacheWanted(const CpuMoeBackendOptions& options) {
  bool wanted = options.tile_cache;
  if (const char* env = std::getenv("KTX_MOE_TILE_CACHE"); env != nullptr && *env) {
    const std::string v = env;
    if (v != "0" && v != "1") {
      return absl::InvalidArgumentError(absl::StrCat(
          "KTX_MOE_TILE_CACHE=", v,
          ": expected 1 (tile caches for the AMX prefill path) or 0 (as the option says)"));
    }
    wanted = wanted || v == "1";
  }
  return wanted;
}

CpuMoeBackend::~CpuMoeBackend() = default;

absl::StatusOr<std::unique_ptr<CpuMoeBackend>> CpuMoeBackend::Create(
    const models::Deepseek2Model& model, runtime::CpuPool* pool,
    const CpuMoeBackendOptions& options) {
  return Create(model.hparams(), model.weights(), pool, options);
}

absl::StatusOr<std::unique_ptr<CpuMoeBackend>> CpuMoeBackend::Create(
    const models::Deepseek2Hparams& hparams, const models::Deepseek2Weights& weights,
    runtime::CpuPool* pool, const CpuMoeBackendOptions& options) {
  if (pool == nullptr) return absl::InvalidArgumentError("CpuMoeBackend: no CpuPool given");
  std::unique_ptr<CpuMoeBackend> b(new CpuMoeBackend());
  b->hparams_ = &hparams;
  b->weights_ = &weights;
  b->pool_ = pool;
  KTX_RETURN_IF_ERROR(b->Load(options));
  return b;
}

absl::Status CpuMoeBackend::Load(const CpuMoeBackendOptions& options) {
  const auto t0 = Clock::now();
  const models::Deepseek2Hparams& hp = *hparams_;
  const int n_layer = hp.n_layer;
  const int64_t n_expert = hp.n_expert;
  if (options.max_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("CpuMoeBackend: max_tokens = ", options.max_tokens, ", expected > 0"));
  }
  // The decode/prefill switch and the BF16 tile switch (amx variant, BF16
  // experts): the option, else the environment, else calibrated below.
  int64_t prefill_min_tokens = 0, bf16_tile_min_tokens = 0;
  std::string prefill_switch, bf16_tile_switch;
  KTX_RETURN_IF_ERROR(SwitchFromOptionOrEnv("prefill_min_tokens", options.prefill_min_tokens,
                                            "KTX_MOE_PREFILL_MIN_TOKENS", &prefill_min_tokens,
                                            &prefill_switch));
  KTX_RETURN_IF_ERROR(SwitchFromOptionOrEnv("bf16_tile_min_tokens", options.bf16_tile_min_tokens,
                                            "KTX_MOE_BF16_TILE_MIN_TOKENS", &bf16_tile_min_tokens,
                                            &bf16_tile_switch));
  if (const char* env = std::getenv("KTX_MOE_TIMES"); env != nullptr && *env) {
    const std::string v = env;
    if (v != "0" && v != "1") {
      return absl::InvalidArgumentError(absl::StrCat(
          "KTX_MOE_TIMES=", v, ": expected 1 (log every expert call's stage times) or 0"));
    }
    profile_calls_ = v == "1";
  }
  KTX_ASSIGN_OR_RETURN(const bool tile_cache, TileCacheWanted(options));
  KTX_ASSIGN_OR_RETURN(const TensorType requant, RequantTarget(options.requantize_bf16));
  if (requant != TensorType::kBF16 && options.decode_layout != MoeWeightLayout::kPanel16) {
    return absl::InvalidArgumentError(
        absl::StrCat("CpuMoeBackend: re-quantizing BF16 experts to ", TypeName(requant),
                     " (requantize_bf16 / KTX_MOE_REQUANT_BF16) needs decode_layout panel16, not ",
                     kernels::moe::MoeWeightLayoutName(options.decode_layout)));
  }
  if (options.decode_layout != MoeWeightLayout::kPanel16 &&
      options.decode_layout != MoeWeightLayout::kGguf) {
    return absl::InvalidArgumentError(
        absl::StrCat("CpuMoeBackend: decode_layout must be panel16 or gguf, got ",
                     kernels::moe::MoeWeightLayoutName(options.decode_layout)));
  }
  if (!options.owned_experts.empty()) {
    if (static_cast<int>(options.owned_experts.size()) != n_layer) {
      return absl::InvalidArgumentError(
          absl::StrCat("CpuMoeBackend: owned_experts has ", options.owned_experts.size(),
                       " layers, expected n_layer = ", n_layer, " (or none: all experts)"));
    }
    for (int il = 0; il < n_layer; ++il) {
      const auto& m = options.owned_experts[il];
      if (!m.empty() && static_cast<int64_t>(m.size()) != n_expert) {
        return absl::InvalidArgumentError(
            absl::StrCat("CpuMoeBackend: owned_experts of layer ", il, " has ", m.size(),
                         " entries, expected n_expert = ", n_expert, " (or none)"));
      }
    }
  }
  variant_ = options.variant.has_value() ? *options.variant : kernels::ActiveCpuVariant();
  if (const std::string why = kernels::CpuVariantUnsupportedReason(variant_); !why.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("CpuMoeBackend: CPU variant ",
                                                   kernels::CpuVariantName(variant_),
                                                   " cannot run on this machine: ", why));
  }
  max_tokens_ = options.max_tokens;
  reference_ = std::make_unique<models::ReferenceExpertBackend>(hp, *weights_);
  layers_.resize(n_layer);
  load_stats_.variant = kernels::CpuVariantName(variant_);
  load_stats_.decode_layout = kernels::moe::MoeWeightLayoutName(options.decode_layout);
  load_stats_.numa_node = -1;

  std::vector<RepackJob> jobs;
  const kernels::moe::MoeShape shape{hp.n_embd, hp.n_ff_exp, hp.n_expert, hp.n_expert_used};
  size_t workspace_bytes = 0;
  for (int il = 0; il < n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    auto layer = std::make_unique<Layer>();
    Layer& L = *layer;
    layers_[il] = std::move(layer);
    L.held.assign(n_expert, 1);
    if (!options.owned_experts.empty()) {
      const auto& m = options.owned_experts[il];
      for (int64_t e = 0; e < n_expert; ++e) L.held[e] = !m.empty() && m[e] != 0;
    }
    L.n_held = std::count_if(L.held.begin(), L.held.end(), [](uint8_t v) { return v != 0; });

    const models::Deepseek2LayerWeights& lw = weights_->layers[il];
    const gguf::TensorInfo* tensors[3] = {lw.ffn_gate_exps, lw.ffn_up_exps, lw.ffn_down_exps};
    MoeLayerFormat format;
    // BF16 experts re-quantized at load where asked (panel16 only: checked above).
    auto stored = [&](TensorType t) { return t == TensorType::kBF16 ? requant : t; };
    format.gate = {stored(lw.ffn_gate_exps->type), options.decode_layout};
    format.up = {stored(lw.ffn_up_exps->type), options.decode_layout};
    format.down = {stored(lw.ffn_down_exps->type), options.decode_layout};
    kernels::moe::MoePlanOptions po;
    po.max_tokens = options.max_tokens;
    po.max_workers = pool_->num_workers();
    // Until calibrated (below) the switch is out of reach: decode path only.
    po.prefill_min_tokens = prefill_min_tokens > 0 ? prefill_min_tokens : kNoPrefill;
    // The AMX tile path over the same panel16 weights (the plan ignores it
    // where the variant or the formats have none).
    po.tile_prefill =
        options.amx_prefill && (variant_ == CpuVariant::kAmx ||
                                (variant_ == CpuVariant::kScalar && options.scalar_tile_reference));
    po.force_variant = true;
    po.variant = variant_;
    // KTX_AMX_PREFILL: the tile kernel's schedule (experiments; same results
    // whatever the spec, see kernels/cpu/moe/moe.h).
    KTX_RETURN_IF_ERROR(kernels::moe::ApplyMoeTileEnv(&po));
    if (po.tile_prefill) load_stats_.tile_spec = kernels::moe::MoeTileSpec(po);
    absl::StatusOr<kernels::moe::MoePlan> plan = kernels::moe::MakeMoePlan(shape, format, po);
    if (!plan.ok()) {
      const std::string why =
          absl::StrCat("layer ", il, " (experts ", TypeName(format.gate.type), "/",
                       TypeName(format.up.type), "/", TypeName(format.down.type), ", n_embd ",
                       hp.n_embd, ", n_ff_exp ", hp.n_ff_exp, "): ", plan.status().message());
      if (!options.allow_reference_fallback) {
        return absl::InvalidArgumentError(
            absl::StrCat("CpuMoeBackend: the CPU kernels cannot run ", why));
      }
      KTX_LOG(WARNING, "moe_backend") << "reference experts for " << why;
      ++load_stats_.n_reference_layers;
      continue;
    }
    L.fast = true;
    L.plan = *plan;
    if (format.gate.type != lw.ffn_gate_exps->type || format.up.type != lw.ffn_up_exps->type ||
        format.down.type != lw.ffn_down_exps->type) {
      load_stats_.requantized_bf16 = TypeName(requant);
    }
    ++load_stats_.n_fast_layers;
    load_stats_.n_experts_held += L.n_held;
    load_stats_.prefill_form = load_stats_.prefill_form || L.plan.tile;
    for (int m = 0; m < 3; ++m) {
      load_stats_.gguf_bytes +=
          static_cast<uint64_t>(L.n_held) * [](const models::WeightMatrix& wm) {
            return static_cast<uint64_t>(wm.n_rows * wm.row_bytes);
          }(models::WeightMatrix::Slab(*tensors[m], 0));
    }
    workspace_bytes = std::max(workspace_bytes, kernels::moe::MoeWorkspaceSize(L.plan));
    for (auto& p : L.ptrs) p.assign(n_expert, nullptr);

    // Matrix geometry: gate/up [n_ff rows][n_embd], down [n_embd rows][n_ff].
    const int64_t rows[3] = {hp.n_ff_exp, hp.n_ff_exp, hp.n_embd};
    const int64_t ks[3] = {hp.n_embd, hp.n_embd, hp.n_ff_exp};
    auto add_form = [&]() -> absl::Status {
      const MoeMatrixFormat f[3] = {format.gate, format.up, format.down};
      const int base = kGate;
      if (f[0].layout == MoeWeightLayout::kGguf) {  // no copy: the mapping
        for (int m = 0; m < 3; ++m) {
          for (int64_t e = 0; e < n_expert; ++e) {
            if (L.held[e]) L.ptrs[base + m][e] = models::WeightMatrix::Slab(*tensors[m], e).data;
          }
        }
        return absl::OkStatus();
      }
      int64_t bytes[3];
      for (int m = 0; m < 3; ++m) {
        KTX_ASSIGN_OR_RETURN(bytes[m], kernels::moe::MoeMatrixBytes(f[m], rows[m], ks[m]));
      }
      const int64_t per_expert = bytes[0] + bytes[1] + bytes[2];
      const size_t total = static_cast<size_t>(per_expert * L.n_held);
      if (total == 0) return absl::OkStatus();
      runtime::NumaBuffer mem = pool_->Allocate(total);
      if (mem.data() == nullptr) {
        return absl::ResourceExhaustedError(absl::StrCat("CpuMoeBackend: cannot allocate ", total,
                                                         " bytes for the experts of layer ", il));
      }
      load_stats_.numa_node = mem.numa_node();
      uint8_t* at = static_cast<uint8_t*>(mem.data());
      for (int m = 0; m < 3; ++m) {
        RepackJob& j = jobs.emplace_back();
        j.il = il;
        j.src.assign(n_expert, nullptr);
        j.dst.assign(n_expert, nullptr);
        int64_t slot = 0;
        for (int64_t e = 0; e < n_expert; ++e) {
          if (!L.held[e]) continue;
          j.src[e] = models::WeightMatrix::Slab(*tensors[m], e).data;
          uint8_t* d = at + slot * per_expert +
                       (m == 0   ? 0
                        : m == 1 ? bytes[0]
                                 : bytes[0] + bytes[1]);
          j.dst[e] = d;
          L.ptrs[base + m][e] = d;
          ++slot;
        }
        j.job.type = f[m].type;
        j.job.from_bf16 = tensors[m]->type == TensorType::kBF16 && f[m].type != TensorType::kBF16;
        j.job.to = f[m].layout;
        j.job.n_rows = rows[m];
        j.job.k = ks[m];
        j.job.n_expert = n_expert;
      }
      L.decode_mem = std::move(mem);
      return absl::OkStatus();
    };
    KTX_RETURN_IF_ERROR(add_form());
  }

  // Repack everything on the pool, one job at a time (each job's tasks in
  // parallel), with progress between jobs.
  uint64_t total = 0;
  for (RepackJob& j : jobs) {
    j.job.src = j.src.data();
    j.job.dst = j.dst.data();
    KTX_RETURN_IF_ERROR(kernels::moe::ValidateMoeRepackJob(j.job));
    total += static_cast<uint64_t>(kernels::moe::MoeRepackBytes(j.job));
  }
  // Per-worker scratch of the re-quantizing jobs (none otherwise).
  int64_t repack_scratch = 0;
  for (const RepackJob& j : jobs) {
    repack_scratch = std::max(repack_scratch, kernels::moe::MoeRepackScratchBytes(j.job));
  }
  std::vector<uint8_t> scratch(static_cast<size_t>(repack_scratch) * pool_->num_workers());
  LoadProgress progress(options.progress, total);
  const auto repack_t0 = Clock::now();
  uint64_t done = 0;
  for (const RepackJob& j : jobs) {
    pool_->ParallelFor(kernels::moe::MoeRepackNumTasks(j.job), [&](int64_t task, int worker) {
      kernels::moe::MoeRepackTask(
          j.job, task, repack_scratch > 0 ? scratch.data() + worker * repack_scratch : nullptr);
    });
    done += static_cast<uint64_t>(kernels::moe::MoeRepackBytes(j.job));
    progress.Update(done);
  }
  progress.Finish();
  load_stats_.repack_seconds = SecondsSince(repack_t0);
  load_stats_.repacked_bytes = total;
  if (tile_cache) KTX_RETURN_IF_ERROR(BuildTileCaches());

  if (workspace_bytes > 0) {
    workspace_ = pool_->Allocate(workspace_bytes);
    if (workspace_.data() == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("CpuMoeBackend: cannot allocate the ",
                                                       workspace_bytes, "-byte kernel workspace"));
    }
  }
  load_stats_.workspace_bytes = workspace_bytes;
  table_.assign(6 * static_cast<size_t>(n_expert), nullptr);

  // The decode/prefill switch: calibrated on the first layer with a tile path
  // unless given; then every plan gets it.
  int calib_layer = -1;
  for (int il = 0; il < n_layer && calib_layer < 0; ++il) {
    if (IsFastLayer(il) && layers_[il]->plan.tile && layers_[il]->n_held > 0) calib_layer = il;
  }
  if (calib_layer < 0) {
    prefill_min_tokens = 0;
    prefill_switch = "none";
  } else if (prefill_min_tokens == 0) {
    const kernels::moe::MoePlan& cp = layers_[calib_layer]->plan;
    KTX_ASSIGN_OR_RETURN(
        prefill_min_tokens,
        CalibratedOnce(
            absl::StrCat("int8/", kernels::CpuVariantName(variant_), "/", cp.shape.n_embd, "/",
                         cp.shape.n_ff, "/", TypeName(cp.format.gate.type), "/",
                         TypeName(cp.format.down.type)),
            [&] { return CalibratePrefillSwitch(calib_layer); }, &load_stats_.calibration,
            &prefill_switch));
  }
  // The BF16 tile switch: calibrated on the first layer whose experts run on
  // bf16 tiles unless given (once per process and layer shape, as above).
  int bf16_layer = -1;
  for (int il = 0; il < n_layer && bf16_layer < 0; ++il) {
    if (!IsFastLayer(il) || layers_[il]->n_held == 0) continue;
    const MoeLayerFormat& f = layers_[il]->plan.format;
    if (Bf16Tiles(variant_, f.gate) || Bf16Tiles(variant_, f.down)) bf16_layer = il;
  }
  if (bf16_layer < 0) {
    bf16_tile_min_tokens = 0;
    bf16_tile_switch = "none";
  } else if (bf16_tile_min_tokens == 0) {
    const kernels::moe::MoePlan& cp = layers_[bf16_layer]->plan;
    KTX_ASSIGN_OR_RETURN(
        bf16_tile_min_tokens,
        CalibratedOnce(
            absl::StrCat("bf16/", cp.shape.n_embd, "/", cp.shape.n_ff, "/",
                         TypeName(cp.format.gate.type), "/", TypeName(cp.format.down.type)),
            [&] { return CalibrateBf16TileSwitch(bf16_layer); }, &load_stats_.bf16_calibration,
            &bf16_tile_switch));
  }
  if (prefill_min_tokens > 0 || bf16_tile_min_tokens > 0) {
    for (auto& layer : layers_) {
      if (layer == nullptr || !layer->fast) continue;
      kernels::moe::MoePlanOptions po = layer->plan.options;
      if (prefill_min_tokens > 0) po.prefill_min_tokens = prefill_min_tokens;
      if (bf16_tile_min_tokens > 0) po.bf16_tile_min_tokens = bf16_tile_min_tokens;
      KTX_ASSIGN_OR_RETURN(layer->plan,
                           kernels::moe::MakeMoePlan(layer->plan.shape, layer->plan.format, po));
    }
  }
  load_stats_.prefill_min_tokens = prefill_min_tokens;
  load_stats_.prefill_switch = prefill_switch;
  load_stats_.bf16_tile_min_tokens = bf16_tile_min_tokens;
  load_stats_.bf16_tile_switch = bf16_tile_switch;

  load_stats_.seconds = SecondsSince(t0);
  const double repack_gbps =
      load_stats_.repack_seconds > 0
          ? static_cast<double>(load_stats_.gguf_bytes) / load_stats_.repack_seconds / 1e9
          : 0.0;
  auto points = [](const std::vector<CpuMoeLoadStats::SwitchPoint>& v) {
    std::string s;
    for (const auto& p : v) {
      absl::StrAppend(&s, s.empty() ? "" : ", ", p.tokens_per_expert, ": ",
                      absl::StrFormat("%.2f/%.2f", p.decode_ms, p.tile_ms));
    }
    return s;
  };
  const std::string calib = points(load_stats_.calibration);
  std::string bf16_switch;
  if (bf16_tile_min_tokens > 0) {
    const std::string bf16_calib = points(load_stats_.bf16_calibration);
    bf16_switch = absl::StrCat(
        "; BF16 tile switch >= ", bf16_tile_min_tokens, " tokens per expert (", bf16_tile_switch,
        ")", bf16_calib.empty() ? "" : absl::StrCat(" [tokens: dots/tiles ms ", bf16_calib, "]"));
  }
  KTX_LOG(INFO, "moe_backend") << absl::StrFormat(
      "CPU experts ready: %d MoE layers on the %s kernels (%s%s%s), %d on the reference path, "
      "%d experts held, %.2f GiB repacked (%.3fx the %.2f GiB of GGUF expert bytes, one copy) in "
      "%.2f s of %.2f s: %.2f GB/s, %.2f GB/s per core; prefill switch %s (%s)%s%s; NUMA node "
      "%d, workspace %.1f MiB, %d threads",
      load_stats_.n_fast_layers, load_stats_.variant, load_stats_.decode_layout,
      load_stats_.requantized_bf16.empty()
          ? ""
          : absl::StrCat(", BF16 experts re-quantized to ", load_stats_.requantized_bf16),
      load_stats_.prefill_form ? absl::StrCat(" + AMX tile prefill ", load_stats_.tile_spec) : "",
      load_stats_.n_reference_layers, load_stats_.n_experts_held,
      static_cast<double>(total) / (1 << 30),
      load_stats_.gguf_bytes > 0
          ? static_cast<double>(total) / static_cast<double>(load_stats_.gguf_bytes)
          : 0.0,
      static_cast<double>(load_stats_.gguf_bytes) / (1 << 30), load_stats_.repack_seconds,
      load_stats_.seconds, repack_gbps, repack_gbps / pool_->num_workers(),
      prefill_min_tokens > 0 ? absl::StrCat(">= ", prefill_min_tokens, " tokens per expert")
                             : std::string("off"),
      prefill_switch, calib.empty() ? "" : absl::StrCat(" [tokens: decode/tile ms ", calib, "]"),
      bf16_switch, load_stats_.numa_node, static_cast<double>(workspace_bytes) / (1 << 20),
      pool_->num_workers());
  return absl::OkStatus();
}

absl::Status CpuMoeBackend::BuildTileCaches() {
  const models::Deepseek2Hparams& hp = *hparams_;
  const int64_t n_expert = hp.n_expert;
  const int64_t rows[3] = {hp.n_ff_exp, hp.n_ff_exp, hp.n_embd};
  const int64_t ks[3] = {hp.n_embd, hp.n_embd, hp.n_ff_exp};
  const auto t0 = Clock::now();
  uint64_t built = 0;
  std::string skipped;
  for (size_t il = 0; il < layers_.size(); ++il) {
    if (layers_[il] == nullptr || !layers_[il]->fast || layers_[il]->n_held == 0) continue;
    Layer& L = *layers_[il];
    if (!L.plan.tile || L.plan.tile_group != kernels::moe::kTile512Group) {
      absl::StrAppend(&skipped, skipped.empty() ? "" : ", ", il);
      continue;
    }
    const MoeMatrixFormat f[3] = {L.plan.format.gate, L.plan.format.up, L.plan.format.down};
    int64_t bytes[3];
    for (int m = 0; m < 3; ++m) {
      KTX_ASSIGN_OR_RETURN(bytes[m], kernels::moe::TileCacheBytes(f[m], rows[m], ks[m]));
    }
    const int64_t per_expert = bytes[0] + bytes[1] + bytes[2];
    const size_t total = static_cast<size_t>(per_expert * L.n_held);
    runtime::NumaBuffer mem = pool_->Allocate(total);
    if (mem.data() == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("CpuMoeBackend: cannot allocate ", total, " bytes for the tile caches of ",
                       "layer ", il, " (tile_cache / KTX_MOE_TILE_CACHE: ~1 byte per expert ",
                       "weight beside the repacked copy; turn it off or hold fewer experts)"));
    }
    uint8_t* at = static_cast<uint8_t*>(mem.data());
    // Tasks: (held expert, matrix, panel range).
    struct Task {
      int m;
      const void* src;
      uint8_t* dst;
      int64_t task;
    };
    std::vector<Task> tasks;
    int64_t slot = 0;
    for (int64_t e = 0; e < n_expert; ++e) {
      if (!L.held[e]) continue;
      uint8_t* d = at + slot++ * per_expert;
      for (int m = 0; m < 3; ++m) {
        L.ptrs[kGateT + m][e] = d;
        for (int64_t t = 0; t < kernels::moe::TileCacheNumTasks(rows[m]); ++t) {
          tasks.push_back({m, L.ptrs[kGate + m][e], d, t});
        }
        d += bytes[m];
      }
    }
    pool_->ParallelFor(static_cast<int64_t>(tasks.size()), [&](int64_t i, int) {
      const Task& t = tasks[i];
      kernels::moe::BuildTileCacheTask(f[t.m], t.src, rows[t.m], ks[t.m], t.task, t.dst);
    });
    L.tile_mem = std::move(mem);
    L.tile_cache = true;
    built += total;
  }
  load_stats_.tile_cache_bytes = built;
  load_stats_.tile_cache_seconds = SecondsSince(t0);
  if (!skipped.empty() || built == 0) {
    KTX_LOG(WARNING, "moe_backend")
        << "tile caches requested, but "
        << (built == 0
                ? std::string("no layer has the AMX tile path with groups of 512 (variant ") +
                      kernels::CpuVariantName(variant_) + "): none built"
                : "layers " + skipped + " have no tile path with groups of 512: no cache");
  }
  if (built > 0) {
    KTX_LOG(INFO, "moe_backend") << absl::StrFormat(
        "tile caches: %.2f GiB for the AMX prefill path in %.2f s (%.2f GB/s)",
        static_cast<double>(built) / (1 << 30), load_stats_.tile_cache_seconds,
        static_cast<double>(built) / 1e9 / std::max(load_stats_.tile_cache_seconds, 1e-9));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<CpuMoeLoadStats::SwitchPoint>> CpuMoeBackend::TimeTwoPlans(
    int il, const kernels::moe::MoePlanOptions& first, const kernels::moe::MoePlanOptions& second,
    const std::vector<int64_t>& grid) {
  const Layer& L = *layers_[il];
  const models::Deepseek2Hparams& hp = *hparams_;
  const int64_t n_expert = hp.n_expert, k_used = hp.n_expert_used, n_embd = hp.n_embd;
  // The first n_expert_used held experts; every token goes to all of them.
  std::vector<int32_t> chosen;
  for (int64_t e = 0; e < n_expert && static_cast<int64_t>(chosen.size()) < k_used; ++e) {
    if (L.held[e]) chosen.push_back(static_cast<int32_t>(e));
  }
  const int64_t max_n = grid.back();
  kernels::moe::MoePlanOptions po = first;
  po.max_tokens = max_n;
  KTX_ASSIGN_OR_RETURN(kernels::moe::MoePlan plan_a,
                       kernels::moe::MakeMoePlan(L.plan.shape, L.plan.format, po));
  po = second;
  po.max_tokens = max_n;
  KTX_ASSIGN_OR_RETURN(kernels::moe::MoePlan plan_b,
                       kernels::moe::MakeMoePlan(L.plan.shape, L.plan.format, po));
  runtime::NumaBuffer ws = pool_->Allocate(
      std::max(kernels::moe::MoeWorkspaceSize(plan_a), kernels::moe::MoeWorkspaceSize(plan_b)));
  if (ws.data() == nullptr) {
    return absl::ResourceExhaustedError("CpuMoeBackend: no memory for the calibration workspace");
  }
  std::mt19937 rng(12345);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(max_n * n_embd), out(max_n * n_embd), wts(max_n * k_used, 0.0f);
  for (float& v : x) v = normal(rng);
  std::vector<int32_t> ids(max_n * k_used, kernels::moe::kMoeNoExpert);
  for (int64_t t = 0; t < max_n; ++t) {
    for (size_t i = 0; i < chosen.size(); ++i) {
      ids[t * k_used + i] = chosen[i];
      wts[t * k_used + i] = 1.0f / static_cast<float>(chosen.size());
    }
  }
  const auto& f = L.plan.format;
  kernels::moe::MoeLayerWeights w;
  w.gate = {f.gate, L.ptrs[kGate].data()};
  w.up = {f.up, L.ptrs[kUp].data()};
  w.down = {f.down, L.ptrs[kDown].data()};
  if (L.tile_cache) {  // the tile path as Compute runs it
    AttachTileCaches(f, L.ptrs[kGateT].data(), L.ptrs[kUpT].data(), L.ptrs[kDownT].data(), &w);
  }
  auto time_call = [&](const kernels::moe::MoePlan& plan, int64_t n) -> absl::StatusOr<double> {
    const auto c0 = Clock::now();
    KTX_ASSIGN_OR_RETURN(
        kernels::moe::MoeRun run,
        kernels::moe::MoeRun::Begin(plan, w, {n, x.data(), ids.data(), wts.data(), out.data()},
                                    ws.data(), ws.size()));
    kernels::moe::RunMoe(run,
                         [this](int64_t n_tasks, auto&& fn) { pool_->ParallelFor(n_tasks, fn); });
    return 1e3 * SecondsSince(c0);
  };
  std::vector<CpuMoeLoadStats::SwitchPoint> points;
  for (int64_t n : grid) {
    double best[2] = {1e30, 1e30};
    for (int rep = 0; rep < 4; ++rep) {  // the first round warms up and is not counted
      for (int which = 0; which < 2; ++which) {
        KTX_ASSIGN_OR_RETURN(double ms, time_call(which == 0 ? plan_a : plan_b, n));
        if (rep > 0) best[which] = std::min(best[which], ms);
      }
    }
    points.push_back({n, best[0], best[1]});
  }
  return points;
}

double ExpertsNmseBound(const CpuMoeLoadStats& stats) {
  double bound = stats.prefill_form ? 1.5e-3 : 1e-3;
  const std::pair<const char*, double> weight_error[] = {
      {"q8_0", 5.4e-3}, {"q6_K", 1.8e-2}, {"q5_K", 3.6e-2}, {"q4_K", 7.4e-2}};
  for (const auto& [name, e] : weight_error) {
    if (stats.requantized_bf16 == name) bound += 7 * e * e;
  }
  return bound;
}

int64_t SwitchCrossing(const std::vector<CpuMoeLoadStats::SwitchPoint>& points) {
  if (points.empty()) return 1;
  // The smallest count from which the second path is never slower; past the
  // grid when it never wins.
  int64_t crossing = points.back().tokens_per_expert + 1;
  for (auto it = points.rbegin(); it != points.rend(); ++it) {
    if (it->tile_ms > it->decode_ms) break;
    crossing = it->tokens_per_expert;
  }
  return crossing;
}

absl::StatusOr<int64_t> CpuMoeBackend::CalibratePrefillSwitch(int il) {
  std::vector<int64_t> grid;
  for (int64_t n : {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128}) {
    if (n <= max_tokens_) grid.push_back(n);
  }
  kernels::moe::MoePlanOptions decode = layers_[il]->plan.options, tile = decode;
  decode.prefill_min_tokens = kNoPrefill;
  tile.prefill_min_tokens = 1;
  KTX_ASSIGN_OR_RETURN(load_stats_.calibration, TimeTwoPlans(il, decode, tile, grid));
  return SwitchCrossing(load_stats_.calibration);
}

absl::StatusOr<int64_t> CpuMoeBackend::CalibrateBf16TileSwitch(int il) {
  std::vector<int64_t> grid;
  for (int64_t n : {1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32}) {
    if (n <= max_tokens_) grid.push_back(n);
  }
  kernels::moe::MoePlanOptions dots = layers_[il]->plan.options, tiles = dots;
  dots.bf16_tile_min_tokens = kNoPrefill;
  tiles.bf16_tile_min_tokens = 1;
  KTX_ASSIGN_OR_RETURN(load_stats_.bf16_calibration, TimeTwoPlans(il, dots, tiles, grid));
  return SwitchCrossing(load_stats_.bf16_calibration);
}

bool CpuMoeBackend::IsFastLayer(int il) const {
  return il >= 0 && il < static_cast<int>(layers_.size()) && layers_[il] != nullptr &&
         layers_[il]->fast;
}

bool CpuMoeBackend::Holds(int il, int e) const {
  return il >= 0 && il < static_cast<int>(layers_.size()) && layers_[il] != nullptr && e >= 0 &&
         e < static_cast<int>(layers_[il]->held.size()) && layers_[il]->held[e] != 0;
}

CpuMoeRunStats CpuMoeBackend::run_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void CpuMoeBackend::ResetRunStats() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_ = {};
}

absl::Status CpuMoeBackend::Compute(int il, const models::Activations& h,
                                    const models::Routing& routing,
                                    std::span<const uint8_t> expert_mask,
                                    models::Activations* out) {
  return Run(il, h, /*indexed=*/false, {}, routing, expert_mask, out);
}

absl::Status CpuMoeBackend::ComputeRows(int il, const models::Activations& h,
                                        std::span<const int32_t> rows,
                                        const models::Routing& routing,
                                        std::span<const uint8_t> expert_mask,
                                        models::Activations* out) {
  KTX_RETURN_IF_ERROR(models::CheckExpertRows(h, rows, routing));
  return Run(il, h, /*indexed=*/true, rows, routing, expert_mask, out);
}

absl::Status CpuMoeBackend::Run(int il, const models::Activations& h, bool indexed,
                                std::span<const int32_t> rows, const models::Routing& routing,
                                std::span<const uint8_t> expert_mask, models::Activations* out) {
  const auto call_t0 = Clock::now();
  const models::Deepseek2Hparams& hp = *hparams_;
  if (il < 0 || il >= hp.n_layer || layers_[il] == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", il, " is not a MoE layer"));
  }
  if (out == nullptr) return absl::InvalidArgumentError("routed experts: no output given");
  const Layer& L = *layers_[il];
  // Indexed: token j is row rows[j] of h (checked by ComputeRows).
  const int64_t n = indexed ? static_cast<int64_t>(rows.size()) : h.n_tokens();
  const int64_t n_embd = hp.n_embd;
  const int32_t k_used = routing.n_expert_used;
  if (h.n_cols() != n_embd || routing.n_tokens != n || k_used < 1 || k_used > hp.n_expert_used ||
      static_cast<int64_t>(routing.expert_ids.size()) != n * k_used ||
      routing.weights.size() != routing.expert_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "routed experts of layer ", il, ": activations [", h.n_tokens(), ", ", h.n_cols(),
        "] and routing of ", routing.n_tokens, " tokens x ", k_used, " do not match (n_embd ",
        n_embd, ", n_expert_used <= ", hp.n_expert_used, ")"));
  }
  if (!expert_mask.empty() && static_cast<int64_t>(expert_mask.size()) != hp.n_expert) {
    return absl::InvalidArgumentError(absl::StrCat("expert mask has ", expert_mask.size(),
                                                   " entries, expected n_expert = ", hp.n_expert));
  }
  for (int64_t i = 0; i < n * k_used; ++i) {
    const int32_t e = routing.expert_ids[i];
    if (e == models::kNoExpert) continue;  // padding (routing policies)
    if (e < 0 || e >= hp.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat("routing of token ", i / k_used,
                                                     " names expert ", e, ", outside [0, ",
                                                     hp.n_expert, ")"));
    }
    if ((expert_mask.empty() || expert_mask[e] != 0) && L.held[e] == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("routed experts: expert ", e, " of layer ", il,
                       " is selected but not held by this CPU expert backend"));
    }
  }
  if (!L.fast) {
    return indexed ? reference_->ComputeRows(il, h, rows, routing, expert_mask, out)
                   : reference_->Compute(il, h, routing, expert_mask, out);
  }

  // The kernels write every element of out (MoeInput::out), so no zeroing
  // pass (a single-threaded 58 MB memset for 2048 tokens of DeepSeek-V3).
  out->ResizeForOverwrite(n, n_embd);
  if (n == 0) return absl::OkStatus();
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t n_expert = hp.n_expert;
  const void** table[6];
  for (int m = 0; m < 6; ++m) {
    table[m] = table_.data() + m * n_expert;
    const bool present = !L.ptrs[m].empty();
    for (int64_t e = 0; e < n_expert; ++e) {
      const bool selected = expert_mask.empty() || expert_mask[e] != 0;
      table[m][e] = present && selected ? L.ptrs[m][e] : nullptr;
    }
  }
  const auto& f = L.plan.format;
  kernels::moe::MoeLayerWeights w;
  w.gate = {f.gate, table[kGate]};
  w.up = {f.up, table[kUp]};
  w.down = {f.down, table[kDown]};
  if (L.tile_cache) AttachTileCaches(f, table[kGateT], table[kUpT], table[kDownT], &w);
  // The kernels' plan has rows of n_expert_used entries: a narrower routing
  // (a routing policy) is padded with kMoeNoExpert entries, which they skip.
  const int32_t k_plan = hp.n_expert_used;
  const int32_t* ids = routing.expert_ids.data();
  const float* weights = routing.weights.data();
  std::vector<int32_t> padded_ids;
  std::vector<float> padded_weights;
  static_assert(models::kNoExpert == kernels::moe::kMoeNoExpert);
  if (k_used != k_plan) {
    padded_ids.assign(static_cast<size_t>(n * k_plan), kernels::moe::kMoeNoExpert);
    padded_weights.assign(static_cast<size_t>(n * k_plan), 0.0f);
    for (int64_t t = 0; t < n; ++t) {
      std::copy_n(ids + t * k_used, k_used, padded_ids.data() + t * k_plan);
      std::copy_n(weights + t * k_used, k_used, padded_weights.data() + t * k_plan);
    }
    ids = padded_ids.data();
    weights = padded_weights.data();
  }
  ++stats_.calls;
  for (int64_t t0 = 0; t0 < n; t0 += max_tokens_) {
    // The first run's setup includes the call's checks and the output's resize.
    const auto run_t0 = t0 == 0 ? call_t0 : Clock::now();
    const int64_t cnt = std::min(max_tokens_, n - t0);
    kernels::moe::MoeInput input;
    input.n_tokens = cnt;
    if (indexed) {
      input.x = h.data();
      input.x_rows = rows.data() + t0;
      input.n_x_rows = h.n_tokens();
    } else {
      input.x = h.row(t0);
    }
    input.ids = ids + t0 * k_plan;
    input.weights = weights + t0 * k_plan;
    input.out = out->row(t0);
    KTX_ASSIGN_OR_RETURN(
        kernels::moe::MoeRun run,
        kernels::moe::MoeRun::Begin(L.plan, w, input, workspace_.data(), workspace_.size()));
    if (profile_calls_) {
      RunProfiled(il, run, 1e3 * SecondsSince(run_t0));
    } else {
      kernels::moe::RunMoe(run,
                           [this](int64_t n_tasks, auto&& fn) { pool_->ParallelFor(n_tasks, fn); });
    }
    ++stats_.runs;
    stats_.tokens += cnt;
    stats_.pairs += run.num_pairs();
    stats_.active_experts += run.num_active_experts();
    stats_.prefill_experts += run.num_prefill_experts();
    stats_.cached_experts += run.num_cached_experts();
    stats_.weight_bytes += run.weight_bytes();
  }
  return absl::OkStatus();
}

void CpuMoeBackend::RunProfiled(int il, const kernels::moe::MoeRun& run, double setup_ms) {
  const int n_workers = pool_->num_workers();
  static constexpr const char* kStageNames[kernels::moe::MoeRun::kNumStages] = {"quantize",
                                                                                "gate/up", "down"};
  std::string line = absl::StrFormat(
      "layer %d: %lld tokens, %lld experts (%lld tile, %lld cached), %lld pairs: setup %.2f ms", il,
      static_cast<long long>(run.n_tokens()), static_cast<long long>(run.num_active_experts()),
      static_cast<long long>(run.num_prefill_experts()),
      static_cast<long long>(run.num_cached_experts()), static_cast<long long>(run.num_pairs()),
      setup_ms);
  double total_ms = setup_ms;
  std::vector<double> busy_ms(n_workers);
  std::vector<int64_t> tasks(n_workers);
  for (int s = 0; s < kernels::moe::MoeRun::kNumStages; ++s) {
    const int64_t n = run.NumTasks(s);
    if (n == 0) continue;
    std::fill(busy_ms.begin(), busy_ms.end(), 0.0);
    std::fill(tasks.begin(), tasks.end(), 0);
    const auto s0 = Clock::now();
    // A worker index names one thread at a time, so the per-worker sums need no atomics.
    auto timed = [&](int64_t task, int worker) {
      const auto t0 = Clock::now();
      run.RunTask(s, task, worker);
      busy_ms[worker] += 1e3 * SecondsSince(t0);
      ++tasks[worker];
    };
    if (n == 1) {
      timed(0, 0);
    } else {
      pool_->ParallelFor(n, timed);
    }
    const double wall_ms = 1e3 * SecondsSince(s0);
    total_ms += wall_ms;
    int used = 0;
    double max_busy = 0, min_busy = 1e30, sum_busy = 0;
    for (int w = 0; w < n_workers; ++w) {
      if (tasks[w] == 0) continue;
      ++used;
      max_busy = std::max(max_busy, busy_ms[w]);
      min_busy = std::min(min_busy, busy_ms[w]);
      sum_busy += busy_ms[w];
    }
    absl::StrAppendFormat(
        &line, "; %s %.2f ms (%lld tasks on %d/%d workers, busy %.2f-%.2f ms, %.0f%%)",
        kStageNames[s], wall_ms, static_cast<long long>(n), used, n_workers, min_busy, max_busy,
        wall_ms > 0 ? 100.0 * sum_busy / (wall_ms * n_workers) : 0.0);
  }
  absl::StrAppendFormat(&line, "; total %.2f ms", total_ms);
  KTX_LOG(INFO, "moe_backend") << line;
}

absl::StatusOr<std::unique_ptr<runtime::CpuPool>> CreateCpuPool(int n_threads) {
  if (n_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("thread count ", n_threads, ": expected >= 0 (0: all cpus)"));
  }
  std::vector<int> cpus = AllowedCpus();
  if (cpus.empty()) return absl::InternalError("no cpu in this process's affinity mask");
  if (n_threads > 0 && n_threads < static_cast<int>(cpus.size())) cpus.resize(n_threads);
  runtime::CpuPool::Options options;
  options.cpus = cpus;
  options.numa_node = numa_available() >= 0 ? numa_node_of_cpu(cpus.front()) : -1;
  return runtime::CpuPool::Create(options);
}

absl::StatusOr<std::vector<std::vector<uint8_t>>> OwnedExpertMasks(
    const std::vector<std::vector<int>>& held, int n_expert) {
  std::vector<std::vector<uint8_t>> masks(held.size());
  for (size_t il = 0; il < held.size(); ++il) {
    if (held[il].empty()) continue;
    masks[il].assign(n_expert, 0);
    for (int e : held[il]) {
      if (e < 0 || e >= n_expert) {
        return absl::InvalidArgumentError(
            absl::StrCat("held expert ", e, " of layer ", il, " is outside [0, ", n_expert, ")"));
      }
      masks[il][e] = 1;
    }
  }
  return masks;
}

absl::StatusOr<std::unique_ptr<CpuExperts>> CpuExperts::Attach(
    models::Deepseek2Model* model, int n_threads, const CpuMoeBackendOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("CpuExperts: no model given");
  std::unique_ptr<CpuExperts> experts(new CpuExperts());
  KTX_ASSIGN_OR_RETURN(experts->pool_, CreateCpuPool(n_threads));
  KTX_ASSIGN_OR_RETURN(experts->backend_,
                       CpuMoeBackend::Create(*model, experts->pool_.get(), options));
  experts->model_ = model;
  model->SetExpertBackend(experts->backend_.get());
  return experts;
}

CpuExperts::~CpuExperts() = default;

void CpuExperts::Detach() {
  if (model_ != nullptr && model_->expert_backend() == backend_.get()) {
    model_->SetExpertBackend(nullptr);
  }
  model_ = nullptr;
}

absl::StatusOr<bool> ParseExpertsFlag(const std::string& value) {
  if (value == "fast") return true;
  if (value == "reference") return false;
  return absl::InvalidArgumentError(
      absl::StrCat("--experts ", value, ": expected fast or reference"));
}

}  // namespace ktx::moe_backend
