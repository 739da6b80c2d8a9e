// File: kernels/cpu/moe/moe.h
//
// The fused MoE expert operator of the CPU side (DeepSeek-V3 routed experts):
//
//   out[t] = Σ_k w[t][k] · down_e(silu(gate_e · x[t]) ⊙ (up_e · x[t])),  e = ids[t][k]
//
// accumulated in fp32, over the experts this shard owns (experts it does not
// own are skipped; the caller sums the partial outputs of all shards).
// Activations are quantized once per layer to the int8 blocks the weights pair
// with (Q8_K-style for K-quants and amx_int8, Q8_0 for Q8_0, bf16-rounded
// floats for BF16), and so is the intermediate h before the down projection.
//
// Plan, then run. A MoePlan is made once per layer shape (MakeMoePlan); it
// fixes the ISA variant, the weight formats, the decode/prefill switch point
// and the size of the caller-owned workspace (MoeWorkspaceSize). Each call
// builds a MoeRun (MoeRun::Begin: validates, groups tokens by expert, O(n_tokens
// * n_expert_used + n_expert), single-threaded, no allocation), then runs its
// stages in order; the tasks of one stage are independent and may run on any
// worker of the caller's pool, with a barrier between stages:
//
//   MoePlanOptions opt;  opt.max_tokens = 64;  opt.max_workers = pool.num_workers();
//   KTX_ASSIGN_OR_RETURN(MoePlan plan, MakeMoePlan(shape, formats, opt));
//   std::vector<uint8_t, ...> ws(MoeWorkspaceSize(plan));      // 64-byte aligned
//   KTX_ASSIGN_OR_RETURN(MoeRun run, MoeRun::Begin(plan, weights, input, ws.data(), ws.size()));
//   for (int s = 0; s < MoeRun::kNumStages; ++s)
//     pool.ParallelFor(run.NumTasks(s), [&](int64_t task, int worker) { run.RunTask(s, task,
//     worker); });
//
// or, ggml-style, every worker ith of nth calls RunMoeStage(run, s, ith, nth)
// between barriers. The kernels never allocate and never start threads.
//
// Work split. Stage 0 quantizes activations (chunks of tokens, or of
// (token, expert) pairs for experts on a prefill path). Stage 1 runs gate and
// up for one (expert, block of 256 rows of n_ff) per task (tile path: one
// (expert, token block of <= tile_max_tokens, block of tile_ff_rows rows),
// the experts with the most tokens first), applies SiLU and quantizes h.
// Stage 2 runs down for one block of n_embd rows per task over every active
// expert in increasing id order and accumulates into out (larger blocks when
// some expert is on a prefill path: each task reads every expert's h; then
// the last blocks' rows come as short tasks numbered last, so that a pool
// handing tasks out in index order ends the stage evenly).
// Each task reads a disjoint range of weights, and every output element is
// computed by one task in a fixed order, so the result of a given variant is
// bitwise independent of the worker count and of the task-to-worker mapping.
//
// Numerics: integer dot products per weight (sub-)block times the block scales
// in fp32; BF16 weights are multiplied in fp32 with bf16-rounded activations
// (shift + FMA; no vdpbf16ps). Every variant agrees with the scalar one up to
// fp32 summation order (tests/kernels/cpu/moe/moe_test.cc: NMSE < 1e-6), and
// with a float64 reference within the int8 activation rounding (NMSE < 1e-3;
// < 1.5e-3 on the prefill paths, which also round the weights to int8).
//
// Decode and prefill. An expert with at least `prefill_min_tokens` tokens
// takes a prefill path when the plan has one: a separate prefill form of its
// weights (MoeLayerFormat::has_prefill, e.g. amx_int8), else the tile path
// (MoePlanOptions::tile_prefill: AMX int8 tiles over the panel16 weights,
// converted to int8 per (row, tile_group) on the fly, by default one
// L2-sized chunk at a time before its tiles run (tile_phased); one copy of
// the weights serves both paths; contract in moe_internal.h), or over the
// expert's tile cache where the caller built one (MoeLayerWeights::gate_tile,
// ...: the same int8 bytes made once at load, so no conversion in the call,
// for more memory). Otherwise the decode
// form (kGguf or kPanel16: VNNI dot products with register-blocked tokens).
// The switch point should be where the two paths' measured times cross
// (CpuMoeBackend calibrates it at load; moe_benchmark reports it). BF16
// panel16 experts on the amx variant have a switch of their own inside the
// decode path: AMX bf16 tiles from bf16_tile_min_tokens tokens on, the
// AVX-512 BF16 dot products below (also calibrated at load).
//
// Thread-safety: MoePlan is immutable plain data. A MoeRun's RunTask may be
// called concurrently for distinct tasks of the same stage with distinct
// `worker` indices in [0, max_workers); stages must not overlap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cpu/moe/moe_repack.h"
#include "kernels/cpu/x86/cpu_variant.h"

namespace ktx::kernels::moe {

struct MoeKernels;  // moe_internal.h
struct MatmulArgs;  // moe_internal.h

struct MoeShape {
  int64_t n_embd = 0;         // model width (multiple of 256)
  int64_t n_ff = 0;           // expert hidden width (multiple of 256)
  int64_t n_expert = 0;       // routed experts of the layer
  int64_t n_expert_used = 0;  // experts per token
};

// Formats of the six expert matrices. gate/up: [n_ff rows][n_embd];
// down: [n_embd rows][n_ff]. The prefill forms are optional.
struct MoeLayerFormat {
  MoeMatrixFormat gate, up, down;
  bool has_prefill = false;
  MoeMatrixFormat gate_prefill, up_prefill, down_prefill;
};

struct MoePlanOptions {
  int64_t max_tokens = 1;           // largest n_tokens of a run
  int max_workers = 1;              // worker indices are in [0, max_workers)
  int64_t prefill_min_tokens = 32;  // decode/prefill switch point (tokens per expert)
  // Rows of n_embd per stage-2 task in decode runs (multiple of 16 dividing
  // n_embd); 0: the largest multiple of 16 up to 512 that gives every worker
  // at least 6 tasks (7168 rows: 512 for 1-2 workers, 64 for 16). Each task
  // reads its rows of every active expert's down matrix, one contiguous
  // stream per expert: longer streams read DRAM faster (docs/performance.md,
  // "Longer stage-2 streams at decode").
  int64_t down_rows_per_task = 0;
  // The tile prefill path: experts with at least prefill_min_tokens tokens run
  // int8 tile matmuls (AMX) over the decode-form panel16 weights themselves,
  // converted to int8 per (row, tile_group) on the fly: no second copy of the
  // weights. Ignored (decode path) where the variant has no tile kernel (only
  // amx has one; the scalar variant has its reference) or the formats do not
  // fit (panel16 Q4_K/Q5_K/Q6_K/Q8_0). Experts that have a separate prefill
  // form (MoeLayerFormat::has_prefill) use that form instead.
  bool tile_prefill = false;
  // k per int8 scale group of the tile path (activations and converted
  // weights): 256, 512 or 1024 dividing n_embd and n_ff; 0: 512 where both
  // allow it, else 256.
  int64_t tile_group = 0;
  // Rows of n_ff per stage-1 tile task (a multiple of tile_group dividing
  // n_ff); 0: 512 where possible, else tile_group.
  int64_t tile_ff_rows = 0;
  // Tokens per tile call (multiple of 32): an expert with more is split into
  // near-equal token blocks (its weights are converted once per block).
  int64_t tile_max_tokens = 128;
  // Rows of n_embd per stage-2 task in runs where some expert takes a prefill
  // path (multiple of 16 dividing n_embd; fewer, larger tasks read the
  // activations h fewer times); 0: the largest multiple of 16 up to 512 that
  // gives every worker at least 4 tasks (7168 rows, 16 workers: 112).
  int64_t prefill_down_rows_per_task = 0;
  // Prefill runs: the rows of the last prefill_down_tail_tasks stage-2 tasks
  // (of prefill_down_rows_per_task rows each) go to tasks of
  // prefill_down_tail_rows rows instead (a multiple of 16; the last one may
  // be shorter), numbered after the large ones. A pool that hands out tasks
  // in index order (CpuPool does) then ends the stage on short tasks, so
  // that a worker still in a large task when the large ones run out is not
  // waited for while the others idle. 0 rows: no tail; 0 tasks with rows
  // set: max_workers / 2 (at least 1). Same results (each output element is
  // still computed by one task, in expert order). On the H200 machine's Xeon
  // (2026-11-29) stage 2 of the 2048-token DeepSeek-V3 layer took 58 ms with
  // a tail of 32-row tasks against 65 without (the workers' mean time inside
  // tasks 54.5 / 58.6 ms, the busiest 57.3 / 64.4; docs/performance.md,
  // twenty-fourth session).
  int64_t prefill_down_tail_rows = 32;
  int64_t prefill_down_tail_tasks = 0;
  // How the amx tile kernel runs (same results either way; moe_kernels_amx.cc):
  // phased (default): per chunk of weights, convert all of it to int8 into
  // per-worker scratch, then run the tiles of every token block over it;
  // else the in-loop kernel (the next item's conversion interleaved with the
  // current item's tiles). tile_chunk_kib: int8 KiB per phased chunk (32 ..
  // 4096; the chunk is per-worker scratch, so keep it within half of L2);
  // tile_chunk_groups: groups of k per chunk (0: all that fit, i.e. whole
  // rows of k for as many panel pairs as fit); tile_skew: bytes (multiple of
  // 64, 0 .. 4032) between the kernel's scratch buffers against 4K aliasing.
  // Chunks of 256 KiB since 2026-11-29 (with tile_stream_lines: 4-13 % less
  // time than 512 at 512 and 2048 tokens in all 6 comparisons on the H200
  // machine's Xeon; level before it; docs/performance.md, "Streaming the
  // converted weights").
  bool tile_phased = true;
  int64_t tile_chunk_kib = 256;
  int64_t tile_chunk_groups = 0;
  int64_t tile_skew = 256;
  // Floats of padding after each row of the stage-1 tile outputs (gate, up:
  // [tokens][tile_ff_rows + pad]; multiple of 16, 0 .. 1024): rows of 512
  // floats would put the 32 rows of a fix-up into 2 L1 sets per column.
  int64_t tile_out_pad = 16;
  // Phased kernel: software prefetch of the next item's B tiles into L1.
  // Off by default: on the H200 machine (2026-11-26 16:51 UTC) it cost time
  // (one core, 64 tokens, in L2: 132 ns per 1024 weights with, 111 without;
  // full layer at 2048 tokens: 262 ms with, 248 without).
  bool tile_prefetch = false;
  // Phased kernel: software prefetch (into L2) of the weights phase 1 will
  // convert, this many 64-byte lines ahead of the conversion's reads, and the
  // next chunk's weights spread over the current chunk's tiles (0 .. 4096;
  // 0: the hardware prefetchers alone). Where a chunk cannot hold whole rows
  // of k (k above 8192 with 256 KiB chunks) each group slice's successor is
  // prefetched whole instead (any value > 0). On the H200 machine's Xeon
  // (2026-11-29) one core converted from DRAM at 172 ns per 1024 weights
  // without it and 82-94 ns with 8-64 lines; the full DeepSeek-V3 layer on
  // the tile path took 21-33 % less time at 8-64 tokens per expert
  // (docs/performance.md, "Streaming the converted weights").
  int64_t tile_stream_lines = 64;
  // Phased kernel with tile_stream_lines > 0: the last chunk of a call
  // streams the bytes of the worker's next call (the next expert's stage-2
  // slice; up's first panels after gate) into L2 during its tiles
  // (MatmulArgs::next_w); prefetches only, same bits. A stage-2 call is one
  // chunk, so without it every call's conversion started cold: on the H200
  // machine's Xeon (2026-11-29) stage 2 of the 2048-token layer took 2-22 %
  // less time with it in all six comparisons, its conversion 34-42 -> 20-25
  // ms per worker (docs/performance.md, twenty-second session).
  bool tile_stream_next = true;
  // Tile path: each expert's activation rows (stage 1's x, stage 2's h) are
  // stored k-step-major (64-byte columns of all its rows one after another,
  // MatmulArgs::act_kstep_stride) instead of row after row, so that an A
  // tile is 1 KiB in one piece rather than 16 lines 7 KiB apart; same bits.
  // On the H200 machine's Xeon (2026-11-29) the tile loop with A tiles from
  // an expert's rows ran at 51 ns per k-step against 35 tile-major (29 from
  // L1) (moe_amx_probe; docs/performance.md, twenty-third session).
  bool tile_act_kmajor = true;
  // Diagnostics for benchmarks: where set, the phased kernel adds its TSC
  // ticks of conversion, tiles and fix-ups to [0], [1], [2] (atomically; the
  // array must outlive the runs of the plan).
  int64_t* tile_phase_ticks = nullptr;
  // Variant to run; unset: ActiveCpuVariant() at plan time.
  bool force_variant = false;
  CpuVariant variant = CpuVariant::kScalar;
  // amx variant, BF16 panel16 matrices: AMX bf16 tiles for an expert's matmul
  // from this many tokens (pairs) on, the AVX-512 BF16 dot products below.
  // 0: the kernels' default (kAmxBf16MinTokens, moe_internal.h). Set it at
  // the measured crossing (CpuMoeBackend calibrates it at load).
  int64_t bf16_tile_min_tokens = 0;
};

// Plain data made by MakeMoePlan; read by MoeRun. Do not edit by hand. Owns
// nothing (`kernels` points at a static table). Immutable after creation, so
// any number of concurrent runs may share it (each with its own workspace).
struct MoePlan {
  MoeShape shape;
  MoeLayerFormat format;
  MoePlanOptions options;
  CpuVariant variant = CpuVariant::kScalar;
  const MoeKernels* kernels = nullptr;
  int64_t max_pairs = 0;  // max_tokens * n_expert_used
  // The tile path (options.tile_prefill where supported) and its geometry.
  bool tile = false;
  int64_t tile_group = 0, tile_ff_rows = 0, tile_max_tokens = 0;
  int64_t prefill_down_rows = 0;  // stage-2 rows per task when an expert runs a prefill path
  // Prefill runs: the last prefill_down_tail_span rows of n_embd (a multiple
  // of prefill_down_rows) in tasks of prefill_down_tail_rows (0: no tail).
  int64_t prefill_down_tail_rows = 0, prefill_down_tail_span = 0;
  int64_t decode_down_rows = 0;  // stage-2 rows per task otherwise
  int64_t max_gateup_tasks = 0;  // bound on stage-1 tasks of one run
  // Row bytes of the quantized activations.
  int64_t x_row_bytes = 0;   // decode format of x, per token
  int64_t xp_row_bytes = 0;  // prefill formats of x (Q8_K or tile), per (token, expert) pair
  int64_t h_row_bytes = 0;   // h, per pair (max of the down formats)
  int64_t worker_scratch_bytes = 0;
  int64_t kernel_scratch_bytes = 0;
  // Workspace offsets (bytes, 64-aligned).
  int64_t off_count = 0, off_offset = 0, off_active = 0, off_path = 0, off_order = 0;
  int64_t off_task = 0;  // I32 [max_gateup_tasks][4]: expert, first pair, pairs, first n_ff row
  int64_t off_pair_token = 0, off_pair_weight = 0;
  int64_t off_xq = 0, off_xp = 0, off_hq = 0, off_worker = 0;
  // amx variant with BF16 panel16 down matrices: h also as bf16 rows (U16
  // [max_pairs + 32][n_ff], the tile kernel's A rows, written once by stage 1
  // instead of packed by every stage-2 task); -1 otherwise.
  int64_t off_hb = -1;
  int64_t workspace_bytes = 0;
};

// Sets tile-path options from a spec "phased|inloop[:key=value]..." with keys
// chunk (KiB), groups (per chunk), skew (bytes), pad (tile_out_pad), pf (0/1:
// tile_prefetch), stream (lines: tile_stream_lines), group (tile_group), ff
// (tile_ff_rows), maxtok (tile_max_tokens), down (prefill_down_rows_per_task),
// next (0/1: tile_stream_next), kmajor (0/1: tile_act_kmajor), tail
// (prefill_down_tail_rows), tailn (prefill_down_tail_tasks);
// e.g. "phased:chunk=256:skew=0". Values are checked by MakeMoePlan.
// InvalidArgument names the part it cannot parse. For benchmarks and experiments.
absl::Status ApplyMoeTileSpec(std::string_view spec, MoePlanOptions* options);
// ApplyMoeTileSpec with the environment variable KTX_AMX_PREFILL where it is
// set and non-empty (OK and no change otherwise); errors name the variable.
absl::Status ApplyMoeTileEnv(MoePlanOptions* options);
// The spec that reproduces the tile options of `options` (for reports).
std::string MoeTileSpec(const MoePlanOptions& options);

// Validates the shape (multiples of 256, n_expert_used <= n_expert), the
// formats (MoeFormatSupported, supported by the variant, shape fits: panels
// need row counts % 16) and the options. InvalidArgument names what is wrong.
absl::StatusOr<MoePlan> MakeMoePlan(const MoeShape& shape, const MoeLayerFormat& format,
                                    const MoePlanOptions& options);

// Bytes of the caller-owned workspace a run of `plan` needs (64-byte aligned
// base required).
inline size_t MoeWorkspaceSize(const MoePlan& plan) {
  return static_cast<size_t>(plan.workspace_bytes);
}

// One expert matrix kind for all experts of the layer: experts[e] points at
// expert e's matrix in `format` (MoeMatrixBytes bytes), or is null when this
// shard does not own it.
struct MoeMatrix {
  MoeMatrixFormat format;
  const void* const* experts = nullptr;  // [n_expert]
};

struct MoeLayerWeights {
  MoeMatrix gate, up, down;
  // Used when the plan has_prefill; experts may be null where the prefill
  // form of an owned expert is absent (it then runs the decode form).
  MoeMatrix gate_prefill, up_prefill, down_prefill;
  // Optional tile caches (layout tile512 with the types of gate / up / down:
  // the tile path's int8 conversion of each expert, done once by
  // BuildTileCacheTask). An expert on the tile path whose three caches are
  // non-null reads them instead of converting its panel16 weights on the fly:
  // bitwise the same results for ~1 byte per weight more memory (a
  // DeepSeek-V3 expert: 44.4 MB beside its 29.0 MB of panel16). Null arrays
  // or entries: no cache for those experts. Needs a plan with the tile path
  // and tile_group 512 (MoeRun::Begin checks).
  MoeMatrix gate_tile, up_tile, down_tile;
};

// Tile caches (tile512 in moe_repack.h) of one panel16 matrix [n_rows][k] of a
// tile-path type (Q4_K, Q5_K, Q6_K, Q8_0): its bytes (InvalidArgument, naming
// what is wrong, for any other format or k % 512 != 0), and its build in
// TileCacheNumTasks(n_rows) tasks of 8 panels each: independent, any order and
// thread, disjoint writes; each converts with the host's fastest converter
// (all converters give the same bytes). `src` must have passed TileCacheBytes.
absl::StatusOr<int64_t> TileCacheBytes(MoeMatrixFormat src, int64_t n_rows, int64_t k);
int64_t TileCacheNumTasks(int64_t n_rows);
void BuildTileCacheTask(MoeMatrixFormat src, const void* w, int64_t n_rows, int64_t k, int64_t task,
                        void* cache);

// An id entry that names no expert: skipped (it adds nothing). Routing
// policies that keep fewer experts for some tokens pad their rows with it.
inline constexpr int32_t kMoeNoExpert = -1;

struct MoeInput {
  int64_t n_tokens = 0;
  // F32 [n_tokens, n_embd]; with x_rows (below), F32 [n_x_rows, n_embd].
  const float* x = nullptr;
  const int32_t* ids = nullptr;  // I32 [n_tokens, n_expert_used], in [0, n_expert) or kMoeNoExpert
  const float* weights = nullptr;  // F32 [n_tokens, n_expert_used]
  float* out = nullptr;            // F32 [n_tokens, n_embd], fully written
  // Optional: token t reads row x_rows[t] of x (a shard's rows of a batch,
  // read in place instead of gathered into a copy).
  const int32_t* x_rows = nullptr;  // I32 [n_tokens] in [0, n_x_rows), or null
  int64_t n_x_rows = 0;
};

// One call of the operator: pointers to the plan, the weights, the input and
// the workspace (it owns nothing; all must outlive it) plus the per-call
// routing counts. Copyable plain handle. The routing it wrote into the
// workspace (tokens grouped by expert: per owned expert its count, offset,
// the (token, weight) pairs in token order) is read-only during the stages.
class MoeRun {
 public:
  static constexpr int kNumStages = 3;

  // Validates the input against the plan (token count, ids in range, formats
  // of `weights` equal to the plan's, workspace size and alignment) and groups
  // tokens by owned expert into the workspace. `plan`, `weights`, `input` and
  // the workspace must outlive the run.
  static absl::StatusOr<MoeRun> Begin(const MoePlan& plan, const MoeLayerWeights& weights,
                                      const MoeInput& input, void* workspace,
                                      size_t workspace_bytes);

  int64_t NumTasks(int stage) const;
  // Runs task `task` of `stage` with per-worker scratch `worker`.
  void RunTask(int stage, int64_t task, int worker) const;

  // Statistics of this call.
  int64_t n_tokens() const { return input_.n_tokens; }
  int64_t num_active_experts() const { return n_active_; }
  int64_t num_prefill_experts() const { return n_prefill_; }
  // Of those, the experts that read their tile caches (no conversion).
  int64_t num_cached_experts() const { return n_cached_; }
  int64_t num_pairs() const { return n_pairs_; }
  // Bytes of expert weights the run reads once (gate + up + down of the active experts).
  int64_t weight_bytes() const { return weight_bytes_; }

 private:
  MoeRun() = default;
  // Token t's activations (MoeInput::x, x_rows).
  const float* XRow(int64_t t) const {
    const int64_t row = input_.x_rows != nullptr ? input_.x_rows[t] : t;
    return input_.x + row * plan_->shape.n_embd;
  }
  void QuantizeTask(int64_t task) const;
  void GateUpTask(int64_t task, int worker) const;
  void TileGateUp(int64_t e, int64_t t0, int64_t nt, int64_t f0, int worker) const;
  // Tile path: the act fields of `a` for rows [t0, ...) of expert e's tile
  // activation rows in `region` (rows of row_bytes per pair), and the write
  // of n values of `x` as bytes [j0, j0 + n) (and their group scales) of its
  // row t, in the plan's layout (MoePlanOptions::tile_act_kmajor).
  void TileActArgs(const uint8_t* region, int64_t row_bytes, int64_t e, int64_t t0,
                   MatmulArgs* a) const;
  void WriteTileAct(const float* x, int64_t n, int64_t j0, int64_t k, uint8_t* region,
                    int64_t row_bytes, int64_t e, int64_t t) const;
  void DownTask(int64_t task, int worker) const;
  // Matrix `which` (0 gate, 1 up, 2 down) in the weights an expert on `path`
  // reads: the decode form, the prefill form or the tile cache.
  const MoeMatrix& Matrix(int which, uint8_t path) const;
  void PrefetchRows(const MoeMatrix& m, int64_t e, int64_t r0, int64_t rows) const;

  const MoePlan* plan_ = nullptr;
  const MoeLayerWeights* weights_ = nullptr;
  MoeInput input_;
  uint8_t* ws_ = nullptr;
  int64_t n_active_ = 0, n_prefill_ = 0, n_cached_ = 0, n_pairs_ = 0, n_prefill_pairs_ = 0;
  int64_t weight_bytes_ = 0;
  int64_t n_token_chunks_ = 0, n_pair_chunks_ = 0, n_gateup_tasks_ = 0, down_rows_ = 0;
  // Stage 2: tasks [0, down_big_tasks_) of down_rows_ rows, then tasks of
  // down_tail_rows_ rows (the last one shorter where they do not divide) up
  // to n_embd; down_tail_tasks_ of them.
  int64_t down_big_tasks_ = 0, down_tail_rows_ = 0, down_tail_tasks_ = 0;
};

// Runs every task t of `stage` with t % nth == ith (ggml's ith/nth split).
void RunMoeStage(const MoeRun& run, int stage, int ith, int nth);

// Runs all stages with the caller's pool: parallel_for(n_tasks, fn) must call
// fn(task, worker) for every task in [0, n_tasks) and return when all are done.
// A stage of at most one task runs on the calling thread as worker 0 (no
// fork-join for the single activation-quantization task of a 1-8 token decode).
template <typename ParallelFor>
void RunMoe(const MoeRun& run, ParallelFor&& parallel_for) {
  for (int s = 0; s < MoeRun::kNumStages; ++s) {
    const int64_t n = run.NumTasks(s);
    if (n <= 1) {
      if (n == 1) run.RunTask(s, 0, 0);
      continue;
    }
    parallel_for(n, [&run, s](int64_t task, int worker) { run.RunTask(s, task, worker); });
  }
}

// The name of the variant a plan runs ("scalar", "avx512", ...).
inline const char* MoePlanVariantName(const MoePlan& plan) { return CpuVariantName(plan.variant); }

}  // namespace ktx::kernels::moe
