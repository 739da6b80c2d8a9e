// File: runtime/moe_backend/cpu_moe_backend.h
//
// The fast CPU expert backend: the fused MoE operator of kernels/cpu/moe
// (moe.h: plan/run, caller-owned workspace, ISA variants) plugged into the
// model as a models::ExpertBackend, so that Deepseek2Model::RoutedExperts (and
// everything built on it: Forward, the engines, the bench) runs routed experts
// with the int8/VNNI/AMX kernels instead of the scalar reference path.
//
//   KTX_ASSIGN_OR_RETURN(auto pool, runtime::CpuPool::Create({}));
//   KTX_ASSIGN_OR_RETURN(auto experts, CpuMoeBackend::Create(*model, pool.get()));
//   model->SetExpertBackend(experts.get());   // nullptr restores the reference path
//
// Load. For every MoE layer, the expert tensors (ffn_gate_exps, ffn_up_exps,
// ffn_down_exps) of the held experts (CpuMoeBackendOptions::owned_experts: a
// shard holds only its experts) are repacked into the kernel layout (panel16 by
// default: one copy, about 1.02x the GGUF bytes, read by the decode kernels and,
// on the amx variant, by the AMX tile prefill path too) in parallel on the
// pool, into memory allocated on the pool's NUMA node (the pool's pinned
// workers write it, so pages are first touched there too). A progress bar goes
// to stderr when it is a terminal, else a log line every 5 s; a final log line
// gives the time, the bytes (and their ratio to the GGUF bytes), the repacking
// rate per core and the decode/prefill switch point.
//
// Decode/prefill switch. On the amx variant, experts with at least
// prefill_min_tokens tokens in a call run the AMX tile path. The switch is set
// at the measured crossing: with prefill_min_tokens = 0 (the default) Load
// times one call of the first MoE layer's experts with 1..128 tokens each on
// both paths on this pool (about a second) and takes the smallest token count
// from which the tile path is never slower (load_stats().calibration); the
// environment variable KTX_MOE_PREFILL_MIN_TOKENS=N (e.g. the crossing
// moe_benchmark printed) or the option set N instead, without timing. The
// calibration is made once per process and layer shape (variant, n_embd,
// n_ff_exp, expert types): backends created later (other shards, a second
// model instance) reuse it, so that every backend of a process routes an
// expert with a given token count to the same path.
//
// BF16 tile switch. BF16 experts on the amx variant run on AMX bf16 tiles
// from bf16_tile_min_tokens tokens per expert, on the AVX-512 BF16 dot
// products below. Likewise calibrated at load (0, the default: one call of
// the first BF16 layer's experts at 1..32 tokens each on both, about a second
// for DeepSeek-V3's shape; load_stats().bf16_calibration), or taken from
// KTX_MOE_BF16_TILE_MIN_TOKENS=N or the option; once per process and shape.
//
// A layer the kernels cannot run (expert types other than Q4_K, Q5_K, Q6_K,
// Q8_0, BF16; n_embd or n_ff_exp not a multiple of 256, e.g. DeepSeek-V2-Lite's
// 1408) falls back to the reference backend with a warning (or fails, see
// allow_reference_fallback).
//
// Compute. Runs the operator's three stages on the pool (ParallelFor) with a
// workspace allocated at load (no allocation per call after the first, except
// `out`'s own growth); batches larger than max_tokens run in chunks. The
// result of a given variant is bitwise independent of the pool's thread count.
// Accuracy: activations are quantized to int8 blocks (Q8_K / Q8_0) or rounded
// to bf16 before the dot products: NMSE against the float reference about 1e-4
// (the kernel states <= 1e-3; <= 1.5e-3 on the AMX tile prefill path, which
// also rounds the weights to int8), i.e. tier B of tests/data/README.md
// section 6 for the whole model. The path of an expert depends on its token
// count in the call (and the calibrated switch), so only a fixed
// prefill_min_tokens (or amx_prefill = false) makes results reproducible
// across loads.
//
// Re-quantization of BF16 experts (memory and bandwidth for precision). With
// requantize_bf16 (or KTX_MOE_REQUANT_BF16=q4_k|q5_k|q6_k|q8_0) the BF16
// expert matrices of the fast layers are quantized at load, in the repacking
// tasks, to that GGUF type (kernels/cpu/quant QuantizeRow) and then held and
// computed like a file of that type: panel16 for the decode kernels, the AMX
// int8 tile path and tile caches for prefill. Q8_0 holds 0.53x the BF16 bytes
// (weights' relative RMS error ~5e-3), Q4_K 0.29x (~7e-2, the error of a
// Q4_K file). The reference backend keeps the file's BF16 weights, so
// against it such a layer differs by the re-quantization as well.
// load_stats().requantized_bf16 names the type. Needs decode_layout panel16.
//
// Tile caches (memory for prefill speed). With tile_cache (or
// KTX_MOE_TILE_CACHE=1 in the environment; 0 or unset: the option decides,
// anything else fails Create naming the variable), every held expert of a
// layer on the AMX tile path also gets its tile cache (kernels/cpu/moe/moe.h,
// MoeLayerWeights::gate_tile: the int8 conversion that path otherwise does in
// every call, made once after repacking, on the pool, into the pool's NUMA
// node): ~1.0 byte per weight beside the panel16 copy (DeepSeek-V3 Q4_K_M:
// 44.4 MB per expert beside 29.0 MB, 2.55x the GGUF expert bytes in all).
// Decode still reads panel16; tile-path experts read their caches, with
// bitwise the same results. Where the tile path is off (no AMX, or a tile
// group other than 512) the option is ignored with a warning.
//
// Per-call profile. With KTX_MOE_TIMES=1 in the environment (read at load;
// any value other than 0 or 1 fails Create naming the variable), every
// Compute call on a fast layer logs one line: tokens, experts (tile path),
// pairs, and for each stage its wall time, task count, the workers that took
// tasks and their busiest and least busy time (an idle or slow worker shows
// as a gap between the two). It costs two clock reads per task.
//
// Ownership and thread-safety: owns the repacked weights, the plans, the
// workspace and the per-call pointer tables; borrows the model's hparams and
// weights (mapping) and the pool, which must outlive it. Compute calls are
// serialised by an internal mutex (the pool runs one fork-join at a time), so
// concurrent callers are safe but do not run in parallel.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cpu/moe/moe.h"
#include "kernels/cpu/moe/moe_repack.h"
#include "kernels/cpu/x86/cpu_variant.h"
#include "runtime/cpu_pool/cpu_pool.h"
#include "runtime/models/activations.h"
#include "runtime/models/deepseek2.h"
#include "runtime/models/moe.h"

namespace ktx::moe_backend {

// How load progress is reported on stderr.
enum class ProgressMode {
  kAuto,   // a bar when stderr is a terminal, else kLines
  kBar,    // a one-line bar redrawn with '\r'
  kLines,  // a log line every 5 s
  kOff,    // only the final log line
};

struct CpuMoeBackendOptions {
  // The experts this backend holds. Empty: every expert of every MoE layer.
  // Otherwise n_layer entries; entry il is n_expert bytes (nonzero = held) or
  // empty (nothing held in layer il; always so for dense layers).
  std::vector<std::vector<uint8_t>> owned_experts;
  // Largest token count of one kernel run; larger batches run in chunks. The
  // workspace grows linearly with it (~150 KiB per token at DeepSeek-V3 width
  // with 16 workers).
  int64_t max_tokens = 512;
  // Kernel variant; unset: kernels::ActiveCpuVariant() (KTX_CPU_VARIANT or
  // the best one the host supports). InvalidArgument if the host cannot run it.
  std::optional<kernels::CpuVariant> variant;
  // Layout of the decode form: kPanel16 (repacked copy, the fast one) or kGguf
  // (no copy: the kernels read the model's mapping directly).
  kernels::moe::MoeWeightLayout decode_layout = kernels::moe::MoeWeightLayout::kPanel16;
  // On the amx variant, experts with at least prefill_min_tokens tokens in a
  // call run the AMX tile path over the same panel16 weights (int8 conversion
  // on the fly, no second copy; needs decode_layout panel16).
  bool amx_prefill = true;
  // Tests only: run the tile path on the scalar variant too (its reference
  // implementation of the AMX contract), to check the wiring without AMX.
  bool scalar_tile_reference = false;
  // Tile caches for the tile path's experts (see the file comment): faster
  // prefill for ~1.0 byte per weight of memory. Off by default.
  bool tile_cache = false;
  // The decode/prefill switch (tokens per expert in a call). 0: the value of
  // KTX_MOE_PREFILL_MIN_TOKENS if set, else calibrated at load (see above).
  int64_t prefill_min_tokens = 0;
  // The BF16 tile switch (amx variant, BF16 experts; tokens per expert in a
  // call). 0: KTX_MOE_BF16_TILE_MIN_TOKENS if set, else calibrated at load.
  int64_t bf16_tile_min_tokens = 0;
  // Re-quantize BF16 experts at load to this type (Q4_K, Q5_K, Q6_K or Q8_0;
  // see the file comment); kBF16 (the default): KTX_MOE_REQUANT_BF16 if set,
  // else keep them BF16.
  kernels::TensorType requantize_bf16 = kernels::TensorType::kBF16;
  ProgressMode progress = ProgressMode::kAuto;
  // Layers the kernels cannot run use the reference backend (true), or Create
  // fails naming the layer and the reason (false).
  bool allow_reference_fallback = true;
};

// Whether a backend made with `options` builds tile caches: options.tile_cache,
// or KTX_MOE_TILE_CACHE=1 (InvalidArgument naming the variable for a value
// other than 0 or 1). It still skips layers without the tile path.
absl::StatusOr<bool> TileCacheWanted(const CpuMoeBackendOptions& options);

// What loading did.
struct CpuMoeLoadStats {
  std::string variant;           // "avx512", ...
  std::string decode_layout;     // "panel16" / "gguf"
  bool prefill_form = false;     // the AMX tile prefill path is on (lossy int8 weights)
  int n_fast_layers = 0;         // MoE layers on the kernels
  int n_reference_layers = 0;    // MoE layers that fell back to the reference path
  int64_t n_experts_held = 0;    // over all fast layers
  uint64_t repacked_bytes = 0;   // bytes written by repacking (allocated expert memory)
  uint64_t gguf_bytes = 0;       // GGUF bytes of the held experts of the fast layers
  double repack_seconds = 0.0;   // wall time of the repacking itself
  uint64_t workspace_bytes = 0;  // the Compute workspace
  double seconds = 0.0;          // wall time of Create
  int numa_node = -1;            // node of the expert memory, -1 = plain memory
  // The decode/prefill switch in use (0: no prefill path) and where it came
  // from: "calibrated", "option", "KTX_MOE_PREFILL_MIN_TOKENS" or "none".
  int64_t prefill_min_tokens = 0;
  std::string prefill_switch = "none";
  // The calibration's measurements: one call of one layer's experts with
  // `tokens_per_expert` tokens each, best of 3, on each path.
  struct SwitchPoint {
    int64_t tokens_per_expert = 0;
    double decode_ms = 0, tile_ms = 0;
  };
  std::vector<SwitchPoint> calibration;
  // The AMX tile kernel's schedule (kernels::moe::MoeTileSpec; the defaults,
  // or KTX_AMX_PREFILL where set); empty without the tile path.
  std::string tile_spec;
  // Tile caches built (bytes, 0: none) and the wall time of their build.
  uint64_t tile_cache_bytes = 0;
  double tile_cache_seconds = 0.0;
  // The amx variant's BF16 tile switch (BF16 experts: bf16 tiles from this
  // many tokens per expert, the AVX-512 BF16 dot products below; 0: no BF16
  // tiles) and where it came from: "calibrated", "option",
  // "KTX_MOE_BF16_TILE_MIN_TOKENS" or "none"; its calibration (decode_ms:
  // the dot products, tile_ms: the tiles).
  int64_t bf16_tile_min_tokens = 0;
  std::string bf16_tile_switch = "none";
  std::vector<SwitchPoint> bf16_calibration;
  // The type BF16 experts were re-quantized to at load ("q4_K", ...; empty:
  // none were).
  std::string requantized_bf16;
};

// Counters of Compute calls on fast layers since the last ResetRunStats().
struct CpuMoeRunStats {
  int64_t calls = 0;            // Compute calls
  int64_t runs = 0;             // kernel runs (chunks)
  int64_t tokens = 0;           // token rows computed
  int64_t pairs = 0;            // (token, held expert) pairs computed
  int64_t active_experts = 0;   // sum over runs of the distinct experts used
  int64_t prefill_experts = 0;  // of those, experts that ran the prefill (AMX tile) path
  int64_t cached_experts = 0;   // of those, experts that read their tile caches
  int64_t weight_bytes = 0;     // expert weight bytes the runs read (MoeRun::weight_bytes)
};

class CpuMoeBackend final : public models::ExpertBackend {
 public:
  // Builds the backend for `model` (kept by reference: it must outlive the
  // backend) on `pool` (likewise). Errors: InvalidArgument for bad options (a
  // mask of the wrong size, max_tokens <= 0, a variant the host cannot run) or,
  // without fallback, a layer the kernels cannot run; ResourceExhausted when
  // the expert memory cannot be allocated.
  static absl::StatusOr<std::unique_ptr<CpuMoeBackend>> Create(
      const models::Deepseek2Model& model, runtime::CpuPool* pool,
      const CpuMoeBackendOptions& options = {});
  // The same from the model's parts (both must outlive the backend).
  static absl::StatusOr<std::unique_ptr<CpuMoeBackend>> Create(
      const models::Deepseek2Hparams& hparams, const models::Deepseek2Weights& weights,
      runtime::CpuPool* pool, const CpuMoeBackendOptions& options = {});

  ~CpuMoeBackend() override;
  CpuMoeBackend(const CpuMoeBackend&) = delete;
  CpuMoeBackend& operator=(const CpuMoeBackend&) = delete;

  // See models::ExpertBackend. Besides its errors: InvalidArgument for h,
  // routing or mask shapes that do not match the layer, FailedPrecondition
  // naming the layer and the expert when an entry selected by the mask (or by
  // an empty mask) uses an expert this backend does not hold.
  absl::Status Compute(int il, const models::Activations& h, const models::Routing& routing,
                       std::span<const uint8_t> expert_mask, models::Activations* out) override;
  // The same for rows of h (see models::ExpertBackend): the kernels read the
  // rows in place (MoeInput::x_rows), no gathered copy.
  absl::Status ComputeRows(int il, const models::Activations& h, std::span<const int32_t> rows,
                           const models::Routing& routing, std::span<const uint8_t> expert_mask,
                           models::Activations* out) override;

  kernels::CpuVariant variant() const { return variant_; }
  const CpuMoeLoadStats& load_stats() const { return load_stats_; }
  // True when MoE layer il runs on the kernels (false: reference fallback or dense).
  bool IsFastLayer(int il) const;
  // Whether this backend holds expert e of layer il.
  bool Holds(int il, int e) const;

  CpuMoeRunStats run_stats() const;
  void ResetRunStats();

 private:
  struct Layer;
  CpuMoeBackend() = default;
  absl::Status Load(const CpuMoeBackendOptions& options);
  // Compute (indexed false, rows unused) and ComputeRows (rows checked).
  absl::Status Run(int il, const models::Activations& h, bool indexed,
                   std::span<const int32_t> rows, const models::Routing& routing,
                   std::span<const uint8_t> expert_mask, models::Activations* out);
  // Measures the crossing of the decode and tile paths on MoE layer il (see
  // the file comment); fills load_stats_.calibration.
  absl::StatusOr<int64_t> CalibratePrefillSwitch(int il);
  // Likewise for the BF16 tile switch (AVX-512 BF16 dot products against
  // bf16 tiles); fills load_stats_.bf16_calibration.
  absl::StatusOr<int64_t> CalibrateBf16TileSwitch(int il);
  // One call of layer il's first n_expert_used held experts with n tokens
  // each (every token to all of them) on plans made with `first` and
  // `second`, for each n of `grid` (ascending): best of 3 after a warm-up
  // round, first's time as decode_ms and second's as tile_ms.
  absl::StatusOr<std::vector<CpuMoeLoadStats::SwitchPoint>> TimeTwoPlans(
      int il, const kernels::moe::MoePlanOptions& first, const kernels::moe::MoePlanOptions& second,
      const std::vector<int64_t>& grid);
  // Builds the tile caches of every fast layer on the tile path (groups of
  // 512); warns about the others. ResourceExhausted when memory runs out.
  absl::Status BuildTileCaches();
  // One kernel run, stage by stage, timing every task (KTX_MOE_TIMES); logs
  // its line. Called with mu_ held.
  void RunProfiled(int il, const kernels::moe::MoeRun& run, double setup_ms);

  const models::Deepseek2Hparams* hparams_ = nullptr;
  const models::Deepseek2Weights* weights_ = nullptr;
  runtime::CpuPool* pool_ = nullptr;
  kernels::CpuVariant variant_ = kernels::CpuVariant::kScalar;
  int64_t max_tokens_ = 0;
  std::vector<std::unique_ptr<Layer>> layers_;  // [n_layer]; null for dense layers
  std::unique_ptr<models::ReferenceExpertBackend> reference_;
  CpuMoeLoadStats load_stats_;
  bool profile_calls_ = false;  // KTX_MOE_TIMES=1

  // Serialises Compute (the pool runs one fork-join at a time) and guards
  // everything below.
  mutable std::mutex mu_;
  runtime::NumaBuffer workspace_;   // U8 [max over layers of MoeWorkspaceSize], 64-aligned
  std::vector<const void*> table_;  // per call: [6][n_expert] expert pointers (null = skip)
  CpuMoeRunStats stats_;
};

// The NMSE against the reference backend (the file's weights in float64)
// within which a layer of a backend that loaded with `stats` is expected:
// 1e-3 (1.5e-3 with the AMX tile prefill path, which rounds weights to int8),
// plus, where BF16 experts were re-quantized, 7 e^2 for the format's relative
// RMS weight error e on Gaussian weights (moe_test: q8_0 5.4e-3, q6_K 1.8e-2,
// q5_K 3.6e-2, q4_K 7.4e-2), for three matrices in series and the SiLU's gain
// (the fixture measured 1.75e-2 for q4_K against this bound's 3.98e-2).
double ExpertsNmseBound(const CpuMoeLoadStats& stats);

// The switch a calibration gives: the smallest token count from which the
// second path (tile_ms) is never slower than the first (decode_ms), one past
// the grid when the second path never wins, 1 for no points.
int64_t SwitchCrossing(const std::vector<CpuMoeLoadStats::SwitchPoint>& points);

// A pool on the first `n_threads` cpus of this process's affinity mask (0 or
// more than there are: all of them), memory on the NUMA node of the first cpu.
absl::StatusOr<std::unique_ptr<runtime::CpuPool>> CreateCpuPool(int n_threads);

// Per-layer held-expert masks (the CpuMoeBackendOptions::owned_experts form)
// from per-layer ascending id lists (actors::HeldExperts). InvalidArgument
// for an id outside [0, n_expert).
absl::StatusOr<std::vector<std::vector<uint8_t>>> OwnedExpertMasks(
    const std::vector<std::vector<int>>& held, int n_expert);

// A pool and a CpuMoeBackend attached to a model: what `ktx-ctl run/logits
// --experts fast` and `ktx-ctl bench` hold. Detach() gives the model its
// reference backend back. The destructor does not touch the model (which may
// already be gone): a model that outlives its CpuExperts must be detached
// first.
class CpuExperts {
 public:
  // Creates the pool (CreateCpuPool(n_threads)) and the backend, and sets it
  // as the model's expert backend.
  static absl::StatusOr<std::unique_ptr<CpuExperts>> Attach(
      models::Deepseek2Model* model, int n_threads, const CpuMoeBackendOptions& options = {});
  ~CpuExperts();
  CpuExperts(const CpuExperts&) = delete;
  CpuExperts& operator=(const CpuExperts&) = delete;

  // Restores the model's reference backend (if this one is still set).
  void Detach();
  runtime::CpuPool& pool() { return *pool_; }
  CpuMoeBackend& backend() { return *backend_; }

 private:
  CpuExperts() = default;
  models::Deepseek2Model* model_ = nullptr;
  std::unique_ptr<runtime::CpuPool> pool_;  // destroyed after the backend
  std::unique_ptr<CpuMoeBackend> backend_;
};

// Parses "fast" / "reference" (the --experts flag); InvalidArgument naming
// the flag otherwise. true = fast.
absl::StatusOr<bool> ParseExpertsFlag(const std::string& value);

}  // namespace ktx::moe_backend
