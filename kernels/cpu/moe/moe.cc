#include "kernels/cpu/moe/moe.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/cpu/moe/moe_internal.h"

namespace ktx::kernels::moe {
namespace {

constexpr int64_t kFfRowsPerTask = 256;
constexpr int64_t kQuantChunk = 8;  // tokens (or pairs) per stage-0 task
constexpr int64_t kPadRows = 32;    // readable rows past the last pair (tile loads)
// x rows packed to bf16 at a time for the amx variant's bf16 tiles (gate and
// up read them from L2 with one panel pair's weights: 917 + 458 KiB at
// DeepSeek-V3's n_embd).
constexpr int64_t kBf16RowsBlock = 64;

// Stage-2 rows per task by default: the largest multiple of 16 up to 512
// dividing n_embd that gives every worker at least `tasks_per_worker` tasks.
// Several tasks per worker, so that the pool's work stealing evens out cores
// that run at different speeds (on the H200 machine some vCPUs ran the tiles
// 3x slower than others, and one task per worker left the stage waiting for
// the slowest: docs/performance.md, "What one core overlaps"); at most 512
// rows (a prefill task reads every expert's h once); otherwise as large as
// that allows, since a task streams its rows of each expert's down matrix in
// one piece and short streams read DRAM slower (docs/performance.md, "Longer
// stage-2 streams at decode").
int64_t DefaultDownRowsPerTask(int64_t n_embd, int max_workers, int64_t tasks_per_worker) {
  int64_t rows = kPanelRows;  // n_embd is a multiple of 256
  for (int64_t r = 2 * kPanelRows; r <= 512; r += kPanelRows) {
    if (n_embd % r == 0 && n_embd / r >= tasks_per_worker * std::max(max_workers, 1)) rows = r;
  }
  return rows;
}
// Prefill runs: at least 4 tasks per worker (7168 rows: 512 for 1-3
// workers, 112 for 16). Decode runs: at least 6 (512 for 1-2 workers, 64 for
// 16): on the 2-vCPU Zen 4 machine the decode layer read its weights at 57-58
// % of the read loop with 64 rows and 67-71 % with 448-3584; with 16 workers
// 112 rows were level with 64 in the layer alone and 1-3 % slower at
// decode through the engine, whose GPU host threads share the cores.
constexpr int64_t kPrefillDownTasksPerWorker = 4;
constexpr int64_t kDecodeDownTasksPerWorker = 6;

// The stage-2 rows per task of option `name`: `given`, or the default where
// it is 0; InvalidArgument naming the option unless a multiple of 16 that
// divides n_embd.
absl::StatusOr<int64_t> DownRowsPerTask(const char* name, int64_t given, int64_t n_embd,
                                        int max_workers, int64_t tasks_per_worker) {
  const int64_t rows =
      given != 0 ? given : DefaultDownRowsPerTask(n_embd, max_workers, tasks_per_worker);
  if (rows <= 0 || rows % kPanelRows != 0 || n_embd % rows != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MoE plan: ", name, " (", given, ") must be a multiple of 16 that divides n_embd (", n_embd,
        "), or 0 for the default"));
  }
  return rows;
}

// Whether the plan's kernels run matrices of `format` on the amx variant's
// bf16 tiles (the plan then gives them their bf16 rows; see MakeMoePlan).
bool AmxBf16Tiles(CpuVariant variant, MoeMatrixFormat format) {
  return variant == CpuVariant::kAmx && Bf16TileFormat(format);
}

// Per-expert path of a run (workspace byte per expert).
constexpr uint8_t kPathDecode = 0;       // decode form, x per token
constexpr uint8_t kPathPrefillForm = 1;  // separate prefill weights (amx_int8), x per pair
constexpr uint8_t kPathTile = 2;         // tile kernel over the decode form, x per pair
constexpr uint8_t kPathTileCached = 3;   // tile kernel over the expert's tile cache, x per pair

bool IsTilePath(uint8_t path) { return path == kPathTile || path == kPathTileCached; }

constexpr int64_t kTileCachePanelsPerTask = 8;  // BuildTileCacheTask

int64_t Align64(int64_t n) { return (n + 63) / 64 * 64; }

std::string FormatName(MoeMatrixFormat f) {
  const auto traits = GetTensorTypeTraits(static_cast<uint32_t>(f.type));
  return absl::StrCat(traits ? traits->name : "?", "/", MoeWeightLayoutName(f.layout));
}

absl::Status CheckMatrix(const char* what, MoeMatrixFormat f, int64_t rows, int64_t k,
                         const MoeKernels& kernels) {
  auto bytes = MoeMatrixBytes(f, rows, k);
  if (!bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoE plan: ", what, ": ", bytes.status().message()));
  }
  if (f.layout == MoeWeightLayout::kTile512) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoE plan: ", what, " format ", FormatName(f),
                     " is a tile cache (MoeLayerWeights::*_tile), not a matrix form"));
  }
  if (!kernels.supports(f)) {
    return absl::InvalidArgumentError(absl::StrCat("MoE plan: ", what, " format ", FormatName(f),
                                                   " is not supported by the ", kernels.name,
                                                   " variant"));
  }
  return absl::OkStatus();
}

bool SameFormat(MoeMatrixFormat a, MoeMatrixFormat b) {
  return a.type == b.type && a.layout == b.layout;
}

// Rows [r0, r0 + rows) of expert e's matrix m (k columns) as the bytes a
// phased tile call will read (*w: their start), for MatmulArgs::next_w; 0 and
// null where m is not a panel16 tile-path format.
int64_t NextCallBytes(const MoeMatrix& m, int64_t e, int64_t r0, int64_t rows, int64_t k,
                      const uint8_t** w) {
  *w = nullptr;
  if (m.format.layout != MoeWeightLayout::kPanel16 || !TileFormatSupported(m.format)) return 0;
  const int64_t panel_bytes = k / KBlock(m.format) * PanelBlockBytes(m.format);
  *w = static_cast<const uint8_t*>(m.experts[e]) + (r0 / kPanelRows) * panel_bytes;
  return rows / kPanelRows * panel_bytes;
}

// The tile-kernel fields of MatmulArgs from the plan.
void SetTileKernelArgs(const MoePlan& p, MatmulArgs* a) {
  a->tile_phased = p.options.tile_phased;
  a->tile_chunk_bytes = p.options.tile_chunk_kib << 10;
  a->tile_chunk_groups = p.options.tile_chunk_groups;
  a->tile_skew = p.options.tile_skew;
  a->tile_prefetch = p.options.tile_prefetch;
  a->tile_stream_lines = p.options.tile_stream_lines;
  a->tile_phase_ticks = p.options.tile_phase_ticks;
}

}  // namespace

absl::Status ApplyMoeTileSpec(std::string_view spec_view, MoePlanOptions* options) {
  const std::string spec(spec_view);
  MoePlanOptions o = *options;
  bool first = true;
  for (const std::string& part : std::vector<std::string>(absl::StrSplit(spec, ':'))) {
    if (first) {
      first = false;
      if (part == "phased") {
        o.tile_phased = true;
      } else if (part == "inloop") {
        o.tile_phased = false;
      } else {
        return absl::InvalidArgumentError(absl::StrCat("tile spec '", spec, "': kernel '", part,
                                                       "' is neither phased nor inloop"));
      }
      continue;
    }
    const size_t eq = part.find('=');
    int64_t v = 0;
    if (eq == std::string::npos || !absl::SimpleAtoi(part.substr(eq + 1), &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tile spec '", spec, "': '", part, "' is not key=integer"));
    }
    const std::string key = part.substr(0, eq);
    // A 0/1 key into *flag.
    auto flag = [&](bool* out) {
      if (v != 0 && v != 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("tile spec '", spec, "': ", key, " must be 0 or 1"));
      }
      *out = v == 1;
      return absl::OkStatus();
    };
    absl::Status st;
    if (key == "chunk") {
      o.tile_chunk_kib = v;
    } else if (key == "groups") {
      o.tile_chunk_groups = v;
    } else if (key == "skew") {
      o.tile_skew = v;
    } else if (key == "pf") {
      st = flag(&o.tile_prefetch);
    } else if (key == "stream") {
      o.tile_stream_lines = v;
    } else if (key == "pad") {
      o.tile_out_pad = v;
    } else if (key == "group") {
      o.tile_group = v;
    } else if (key == "ff") {
      o.tile_ff_rows = v;
    } else if (key == "maxtok") {
      o.tile_max_tokens = v;
    } else if (key == "down") {
      o.prefill_down_rows_per_task = v;
    } else if (key == "next") {
      st = flag(&o.tile_stream_next);
    } else if (key == "kmajor") {
      st = flag(&o.tile_act_kmajor);
    } else if (key == "tail") {
      o.prefill_down_tail_rows = v;
    } else if (key == "tailn") {
      o.prefill_down_tail_tasks = v;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "tile spec '", spec, "': unknown key '", key,
          "' (chunk, groups, skew, pad, pf, stream, group, ff, maxtok, down, next, kmajor, tail, "
          "tailn)"));
    }
    if (!st.ok()) return st;
  }
  *options = o;
  return absl::OkStatus();
}

absl::Status ApplyMoeTileEnv(MoePlanOptions* options) {
  const char* env = std::getenv("KTX_AMX_PREFILL");
  if (env == nullptr || *env == '\0') return absl::OkStatus();
  absl::Status s = ApplyMoeTileSpec(env, options);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("KTX_AMX_PREFILL: ", s.message()));
  }
  return s;
}

std::string MoeTileSpec(const MoePlanOptions& o) {
  std::string spec = o.tile_phased ? "phased" : "inloop";
  if (o.tile_phased) {
    absl::StrAppend(&spec, ":chunk=", o.tile_chunk_kib, ":groups=", o.tile_chunk_groups,
                    ":pf=", o.tile_prefetch ? 1 : 0, ":stream=", o.tile_stream_lines,
                    ":next=", o.tile_stream_next ? 1 : 0);
  }
  absl::StrAppend(&spec, ":skew=", o.tile_skew, ":pad=", o.tile_out_pad, ":group=", o.tile_group,
                  ":ff=", o.tile_ff_rows, ":maxtok=", o.tile_max_tokens,
                  ":down=", o.prefill_down_rows_per_task, ":kmajor=", o.tile_act_kmajor ? 1 : 0,
                  ":tail=", o.prefill_down_tail_rows, ":tailn=", o.prefill_down_tail_tasks);
  return spec;
}

const MoeKernels& MoeKernelsFor(CpuVariant variant) {
  switch (variant) {
    case CpuVariant::kScalar: return MoeKernelsScalar();
    case CpuVariant::kAvx2: return MoeKernelsAvx2();
    case CpuVariant::kAvx512: return MoeKernelsAvx512();
    case CpuVariant::kAmx: return MoeKernelsAmx();
  }
  return MoeKernelsScalar();
}

absl::StatusOr<MoePlan> MakeMoePlan(const MoeShape& shape, const MoeLayerFormat& format,
                                    const MoePlanOptions& options) {
  MoePlan plan;
  plan.shape = shape;
  plan.format = format;
  plan.options = options;
  if (plan.options.bf16_tile_min_tokens == 0) plan.options.bf16_tile_min_tokens = kAmxBf16MinTokens;
  if (shape.n_embd <= 0 || shape.n_embd % 256 != 0 || shape.n_ff <= 0 || shape.n_ff % 256 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("MoE plan: n_embd (", shape.n_embd,
                                                   ") and n_ff (", shape.n_ff,
                                                   ") must be positive multiples of 256"));
  }
  if (shape.n_expert <= 0 || shape.n_expert_used <= 0 || shape.n_expert_used > shape.n_expert) {
    return absl::InvalidArgumentError(absl::StrCat("MoE plan: need 0 < n_expert_used (",
                                                   shape.n_expert_used, ") <= n_expert (",
                                                   shape.n_expert, ")"));
  }
  if (options.max_tokens <= 0 || options.max_workers <= 0 || options.prefill_min_tokens <= 0) {
    return absl::InvalidArgumentError(
        "MoE plan: max_tokens, max_workers and prefill_min_tokens must be positive");
  }
  if (options.bf16_tile_min_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoE plan: bf16_tile_min_tokens = ", options.bf16_tile_min_tokens,
                     ", expected > 0 (or 0: the default, ", kAmxBf16MinTokens, ")"));
  }
  const absl::StatusOr<int64_t> decode_rows =
      DownRowsPerTask("down_rows_per_task", options.down_rows_per_task, shape.n_embd,
                      options.max_workers, kDecodeDownTasksPerWorker);
  if (!decode_rows.ok()) return decode_rows.status();
  plan.decode_down_rows = *decode_rows;
  plan.variant = options.force_variant ? options.variant : ActiveCpuVariant();
  const std::string why = CpuVariantUnsupportedReason(plan.variant);
  if (!why.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MoE plan: variant ", CpuVariantName(plan.variant), " cannot run on this CPU: ", why));
  }
  plan.kernels = &MoeKernelsFor(plan.variant);
  const MoeKernels& kern = *plan.kernels;
  for (absl::Status s : {CheckMatrix("gate", format.gate, shape.n_ff, shape.n_embd, kern),
                         CheckMatrix("up", format.up, shape.n_ff, shape.n_embd, kern),
                         CheckMatrix("down", format.down, shape.n_embd, shape.n_ff, kern)}) {
    if (!s.ok()) return s;
  }
  if (!SameFormat(format.gate, format.up)) {
    return absl::InvalidArgumentError("MoE plan: gate and up must share one format");
  }
  if (format.has_prefill) {
    for (absl::Status s :
         {CheckMatrix("gate_prefill", format.gate_prefill, shape.n_ff, shape.n_embd, kern),
          CheckMatrix("up_prefill", format.up_prefill, shape.n_ff, shape.n_embd, kern),
          CheckMatrix("down_prefill", format.down_prefill, shape.n_embd, shape.n_ff, kern)}) {
      if (!s.ok()) return s;
    }
    if (!SameFormat(format.gate_prefill, format.up_prefill)) {
      return absl::InvalidArgumentError(
          "MoE plan: gate_prefill and up_prefill must share one format");
    }
  }

  plan.max_pairs = options.max_tokens * shape.n_expert_used;

  // The tile path and its geometry.
  plan.tile = options.tile_prefill && kern.tile_matmul != nullptr &&
              kern.quantize_tile != nullptr && TileFormatSupported(format.gate) &&
              TileFormatSupported(format.down);
  if (plan.tile) {
    int64_t g = options.tile_group;
    if (g == 0) g = shape.n_embd % 512 == 0 && shape.n_ff % 512 == 0 ? 512 : 256;
    if ((g != 256 && g != 512 && g != 1024) || shape.n_embd % g != 0 || shape.n_ff % g != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("MoE plan: tile_group (", g, ") must be 256, 512 or 1024 dividing n_embd (",
                       shape.n_embd, ") and n_ff (", shape.n_ff, ")"));
    }
    int64_t fb = options.tile_ff_rows;
    if (fb == 0) fb = shape.n_ff % 512 == 0 && 512 % g == 0 ? 512 : g;
    if (fb % g != 0 || shape.n_ff % fb != 0) {
      return absl::InvalidArgumentError(absl::StrCat("MoE plan: tile_ff_rows (", fb,
                                                     ") must be a multiple of tile_group (", g,
                                                     ") dividing n_ff (", shape.n_ff, ")"));
    }
    if (options.tile_max_tokens <= 0 || options.tile_max_tokens % 32 != 0) {
      return absl::InvalidArgumentError(absl::StrCat("MoE plan: tile_max_tokens (",
                                                     options.tile_max_tokens,
                                                     ") must be a positive multiple of 32"));
    }
    if (options.tile_chunk_kib < 32 || options.tile_chunk_kib > 4096) {
      return absl::InvalidArgumentError(absl::StrCat(
          "MoE plan: tile_chunk_kib (", options.tile_chunk_kib, ") must be in [32, 4096]"));
    }
    if (options.tile_chunk_groups < 0) {
      return absl::InvalidArgumentError(absl::StrCat("MoE plan: tile_chunk_groups (",
                                                     options.tile_chunk_groups, ") must be >= 0"));
    }
    if (options.tile_out_pad < 0 || options.tile_out_pad > 1024 || options.tile_out_pad % 16 != 0) {
      return absl::InvalidArgumentError(absl::StrCat("MoE plan: tile_out_pad (",
                                                     options.tile_out_pad,
                                                     ") must be a multiple of 16 in [0, 1024]"));
    }
    if (options.tile_skew < 0 || options.tile_skew > 4032 || options.tile_skew % 64 != 0) {
      return absl::InvalidArgumentError(absl::StrCat("MoE plan: tile_skew (", options.tile_skew,
                                                     ") must be a multiple of 64 in [0, 4032]"));
    }
    if (options.tile_stream_lines < 0 || options.tile_stream_lines > 4096) {
      return absl::InvalidArgumentError(absl::StrCat(
          "MoE plan: tile_stream_lines (", options.tile_stream_lines, ") must be in [0, 4096]"));
    }
    plan.tile_group = g;
    plan.tile_ff_rows = fb;
    plan.tile_max_tokens = options.tile_max_tokens;
  }
  const absl::StatusOr<int64_t> prefill_rows =
      DownRowsPerTask("prefill_down_rows_per_task", options.prefill_down_rows_per_task,
                      shape.n_embd, options.max_workers, kPrefillDownTasksPerWorker);
  if (!prefill_rows.ok()) return prefill_rows.status();
  plan.prefill_down_rows = *prefill_rows;
  if (options.prefill_down_tail_rows < 0 || options.prefill_down_tail_rows % kPanelRows != 0) {
    return absl::InvalidArgumentError(absl::StrCat("MoE plan: prefill_down_tail_rows (",
                                                   options.prefill_down_tail_rows,
                                                   ") must be a multiple of 16 (0: no tail)"));
  }
  if (options.prefill_down_tail_tasks < 0) {
    return absl::InvalidArgumentError(absl::StrCat("MoE plan: prefill_down_tail_tasks (",
                                                   options.prefill_down_tail_tasks,
                                                   ") must not be negative"));
  }
  if (options.prefill_down_tail_rows > 0) {
    const int64_t n_big = shape.n_embd / plan.prefill_down_rows;
    const int64_t tail_tasks = options.prefill_down_tail_tasks != 0
                                   ? options.prefill_down_tail_tasks
                                   : std::max(1, options.max_workers / 2);
    if (tail_tasks > n_big) {
      return absl::InvalidArgumentError(
          absl::StrCat("MoE plan: prefill_down_tail_tasks (", options.prefill_down_tail_tasks,
                       ") must be in [0, ", n_big, "] (the stage-2 tasks of ",
                       plan.prefill_down_rows, " rows)"));
    }
    plan.prefill_down_tail_rows = std::min(options.prefill_down_tail_rows, plan.prefill_down_rows);
    plan.prefill_down_tail_span = tail_tasks * plan.prefill_down_rows;
  }
  const int64_t ff_tasks_per_expert = shape.n_ff / kFfRowsPerTask;
  plan.max_gateup_tasks = shape.n_expert * ff_tasks_per_expert;
  if (plan.tile) {
    plan.max_gateup_tasks +=
        (plan.max_pairs / plan.tile_max_tokens + 1) * (shape.n_ff / plan.tile_ff_rows);
  }

  plan.x_row_bytes = ActRowBytes(ActFormatFor(format.gate), shape.n_embd);
  plan.xp_row_bytes =
      format.has_prefill ? ActRowBytes(ActFormatFor(format.gate_prefill), shape.n_embd) : 0;
  plan.h_row_bytes = ActRowBytes(ActFormatFor(format.down), shape.n_ff);
  if (format.has_prefill) {
    plan.h_row_bytes =
        std::max(plan.h_row_bytes, ActRowBytes(ActFormatFor(format.down_prefill), shape.n_ff));
  }
  if (plan.tile) {
    plan.xp_row_bytes = std::max(plan.xp_row_bytes, TileActRowBytes(shape.n_embd, plan.tile_group));
    plan.h_row_bytes = std::max(plan.h_row_bytes, TileActRowBytes(shape.n_ff, plan.tile_group));
  }
  int64_t ks = std::max(kern.matmul_scratch_bytes(format.gate, shape.n_embd),
                        kern.matmul_scratch_bytes(format.down, shape.n_ff));
  if (format.has_prefill) {
    ks = std::max({ks, kern.matmul_scratch_bytes(format.gate_prefill, shape.n_embd),
                   kern.matmul_scratch_bytes(format.down_prefill, shape.n_ff)});
  }
  if (plan.tile) {
    ks = std::max(ks, TileScratchBytes(plan.tile_group,
                                       options.tile_phased ? options.tile_chunk_kib << 10 : 0,
                                       options.tile_skew));
  }
  if (AmxBf16Tiles(plan.variant, format.gate)) {
    ks = std::max(ks, kBf16RowsBlock * shape.n_embd * 2);  // gate/up's bf16 rows of x
  }
  plan.kernel_scratch_bytes = Align64(ks);
  int64_t floats = options.max_tokens *
                   std::max({2 * kFfRowsPerTask, plan.decode_down_rows, plan.prefill_down_rows});
  if (plan.tile) {
    floats = std::max(floats, 2 * std::min(options.max_tokens, plan.tile_max_tokens) *
                                  (plan.tile_ff_rows + options.tile_out_pad));
  }
  plan.worker_scratch_bytes = Align64(floats * 4) + plan.kernel_scratch_bytes;

  int64_t off = 0;
  auto take = [&off](int64_t bytes) {
    const int64_t at = off;
    off += Align64(bytes);
    return at;
  };
  plan.off_count = take(4 * shape.n_expert);
  plan.off_offset = take(4 * (shape.n_expert + 1));
  plan.off_active = take(4 * shape.n_expert);
  plan.off_path = take(shape.n_expert);
  plan.off_order = take(4 * shape.n_expert);
  plan.off_task = take(16 * plan.max_gateup_tasks);
  plan.off_pair_token = take(4 * plan.max_pairs);
  plan.off_pair_weight = take(4 * plan.max_pairs);
  plan.off_xq = take(options.max_tokens * plan.x_row_bytes);
  plan.off_xp = take((plan.max_pairs + kPadRows) * plan.xp_row_bytes);
  plan.off_hq = take((plan.max_pairs + kPadRows) * plan.h_row_bytes);
  if (AmxBf16Tiles(plan.variant, format.down)) {
    plan.off_hb = take((plan.max_pairs + kPadRows) * shape.n_ff * 2);
  }
  plan.off_worker = take(options.max_workers * plan.worker_scratch_bytes);
  plan.workspace_bytes = off;
  return plan;
}

absl::StatusOr<MoeRun> MoeRun::Begin(const MoePlan& plan, const MoeLayerWeights& weights,
                                     const MoeInput& input, void* workspace,
                                     size_t workspace_bytes) {
  const MoeShape& sh = plan.shape;
  if (plan.kernels == nullptr) return absl::InvalidArgumentError("MoE run: plan not made");
  if (input.n_tokens < 0 || input.n_tokens > plan.options.max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoE run: n_tokens ", input.n_tokens,
                     " outside [0, max_tokens = ", plan.options.max_tokens, "]"));
  }
  if (input.n_tokens > 0 && (input.x == nullptr || input.ids == nullptr ||
                             input.weights == nullptr || input.out == nullptr)) {
    return absl::InvalidArgumentError("MoE run: x, ids, weights and out must be non-null");
  }
  if (workspace == nullptr || workspace_bytes < MoeWorkspaceSize(plan) ||
      reinterpret_cast<uintptr_t>(workspace) % 64 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoE run: workspace must be 64-byte aligned and ", MoeWorkspaceSize(plan),
                     " bytes (got ", workspace_bytes, ")"));
  }
  if (input.x_rows != nullptr) {
    for (int64_t t = 0; t < input.n_tokens; ++t) {
      if (input.x_rows[t] < 0 || input.x_rows[t] >= input.n_x_rows) {
        return absl::InvalidArgumentError(absl::StrCat("MoE run: token ", t, " reads x row ",
                                                       input.x_rows[t], ", outside [0, ",
                                                       input.n_x_rows, ")"));
      }
    }
  }
  const MoeMatrix* mats[3] = {&weights.gate, &weights.up, &weights.down};
  const MoeMatrixFormat fmts[3] = {plan.format.gate, plan.format.up, plan.format.down};
  const char* names[3] = {"gate", "up", "down"};
  for (int i = 0; i < 3; ++i) {
    if (!SameFormat(mats[i]->format, fmts[i]) || mats[i]->experts == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("MoE run: ", names[i], " weights are ", FormatName(mats[i]->format),
                       " (or missing) but the plan expects ", FormatName(fmts[i])));
    }
  }
  const bool has_prefill = plan.format.has_prefill;
  if (has_prefill) {
    const MoeMatrix* pm[3] = {&weights.gate_prefill, &weights.up_prefill, &weights.down_prefill};
    const MoeMatrixFormat pf[3] = {plan.format.gate_prefill, plan.format.up_prefill,
                                   plan.format.down_prefill};
    for (int i = 0; i < 3; ++i) {
      if (pm[i]->experts != nullptr && !SameFormat(pm[i]->format, pf[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat("MoE run: ", names[i], "_prefill weights are ", FormatName(pm[i]->format),
                         " but the plan expects ", FormatName(pf[i])));
      }
    }
  }

  // Tile caches: tile512 of the decode forms' types, on a plan whose tile
  // path converts in groups of 512.
  const MoeMatrix* tm[3] = {&weights.gate_tile, &weights.up_tile, &weights.down_tile};
  const bool any_cache =
      tm[0]->experts != nullptr || tm[1]->experts != nullptr || tm[2]->experts != nullptr;
  if (any_cache) {
    if (!plan.tile || plan.tile_group != panel::kTileK) {
      return absl::InvalidArgumentError(absl::StrCat(
          "MoE run: tile caches need a plan with the tile path and tile_group 512 (this plan: ",
          plan.tile ? absl::StrCat("tile_group ", plan.tile_group) : std::string("no tile path"),
          ")"));
    }
    for (int i = 0; i < 3; ++i) {
      const MoeMatrixFormat want{fmts[i].type, MoeWeightLayout::kTile512};
      if (tm[i]->experts != nullptr && !SameFormat(tm[i]->format, want)) {
        return absl::InvalidArgumentError(absl::StrCat("MoE run: ", names[i], "_tile weights are ",
                                                       FormatName(tm[i]->format),
                                                       " but the plan expects ", FormatName(want)));
      }
    }
  }
  auto cached = [&](int64_t e) {
    return tm[0]->experts != nullptr && tm[1]->experts != nullptr && tm[2]->experts != nullptr &&
           tm[0]->experts[e] != nullptr && tm[1]->experts[e] != nullptr &&
           tm[2]->experts[e] != nullptr;
  };

  MoeRun run;
  run.plan_ = &plan;
  run.weights_ = &weights;
  run.input_ = input;
  run.ws_ = static_cast<uint8_t*>(workspace);
  int32_t* count = reinterpret_cast<int32_t*>(run.ws_ + plan.off_count);
  int32_t* offset = reinterpret_cast<int32_t*>(run.ws_ + plan.off_offset);
  int32_t* active = reinterpret_cast<int32_t*>(run.ws_ + plan.off_active);
  uint8_t* path = run.ws_ + plan.off_path;
  int32_t* pair_token = reinterpret_cast<int32_t*>(run.ws_ + plan.off_pair_token);
  float* pair_weight = reinterpret_cast<float*>(run.ws_ + plan.off_pair_weight);

  auto owned = [&](int64_t e) {
    return weights.gate.experts[e] != nullptr && weights.up.experts[e] != nullptr &&
           weights.down.experts[e] != nullptr;
  };
  std::fill(count, count + sh.n_expert, 0);
  const int64_t n_ids = input.n_tokens * sh.n_expert_used;
  for (int64_t i = 0; i < n_ids; ++i) {
    const int32_t e = input.ids[i];
    if (e == kMoeNoExpert) continue;  // padding of a shorter routing row
    if (e < 0 || e >= sh.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat("MoE run: expert id ", e, " of token ",
                                                     i / sh.n_expert_used, " outside [0, ",
                                                     sh.n_expert, ")"));
    }
    if (owned(e)) ++count[e];
  }
  offset[0] = 0;
  for (int64_t e = 0; e < sh.n_expert; ++e) {
    offset[e + 1] = offset[e] + count[e];
    path[e] = 0;
    if (count[e] == 0) continue;
    active[run.n_active_++] = static_cast<int32_t>(e);
    const bool prefill_weights =
        has_prefill && weights.gate_prefill.experts != nullptr &&
        weights.up_prefill.experts != nullptr && weights.down_prefill.experts != nullptr &&
        weights.gate_prefill.experts[e] != nullptr && weights.up_prefill.experts[e] != nullptr &&
        weights.down_prefill.experts[e] != nullptr;
    if (count[e] >= plan.options.prefill_min_tokens && (prefill_weights || plan.tile)) {
      path[e] = prefill_weights ? kPathPrefillForm : cached(e) ? kPathTileCached : kPathTile;
      ++run.n_prefill_;
      run.n_prefill_pairs_ += count[e];
    }
    const bool form = path[e] == kPathPrefillForm;
    MoeMatrixFormat g = form ? plan.format.gate_prefill : plan.format.gate;
    MoeMatrixFormat d = form ? plan.format.down_prefill : plan.format.down;
    if (path[e] == kPathTileCached) {
      g.layout = d.layout = MoeWeightLayout::kTile512;
      ++run.n_cached_;
    }
    run.weight_bytes_ +=
        2 * *MoeMatrixBytes(g, sh.n_ff, sh.n_embd) + *MoeMatrixBytes(d, sh.n_embd, sh.n_ff);
  }
  run.n_pairs_ = offset[sh.n_expert];
  // Second pass: pairs in expert order, tokens ascending within an expert.
  std::fill(count, count + sh.n_expert, 0);
  for (int64_t i = 0; i < n_ids; ++i) {
    const int32_t e = input.ids[i];
    if (e == kMoeNoExpert || !owned(e)) continue;
    const int32_t p = offset[e] + count[e]++;
    pair_token[p] = static_cast<int32_t>(i / sh.n_expert_used);
    pair_weight[p] = input.weights[i];
  }
  // x per token (decode format) only when some expert runs the decode path.
  run.n_token_chunks_ =
      run.n_active_ > run.n_prefill_ ? (input.n_tokens + kQuantChunk - 1) / kQuantChunk : 0;
  run.n_pair_chunks_ =
      run.n_prefill_pairs_ > 0 ? (run.n_pairs_ + kQuantChunk - 1) / kQuantChunk : 0;
  run.down_rows_ = run.n_prefill_ > 0 ? plan.prefill_down_rows : plan.decode_down_rows;
  run.down_big_tasks_ = sh.n_embd / run.down_rows_;
  if (run.n_prefill_ > 0 && plan.prefill_down_tail_rows > 0) {
    run.down_big_tasks_ -= plan.prefill_down_tail_span / run.down_rows_;
    run.down_tail_rows_ = plan.prefill_down_tail_rows;
    run.down_tail_tasks_ =
        (plan.prefill_down_tail_span + run.down_tail_rows_ - 1) / run.down_tail_rows_;
  }

  // Stage-1 tasks: tile experts first, the most tokens first (their tasks are
  // the longest), each split into near-equal token blocks of at most
  // tile_max_tokens (multiples of 32) x blocks of tile_ff_rows rows; then the
  // other experts in id order, blocks of 256 rows.
  int32_t* task = reinterpret_cast<int32_t*>(run.ws_ + plan.off_task);
  int32_t* order = reinterpret_cast<int32_t*>(run.ws_ + plan.off_order);
  int64_t n_tile = 0, n_task = 0;
  for (int64_t i = 0; i < run.n_active_; ++i) {
    if (IsTilePath(path[active[i]])) order[n_tile++] = active[i];
  }
  std::sort(order, order + n_tile, [count](int32_t a, int32_t b) {
    return count[a] != count[b] ? count[a] > count[b] : a < b;
  });
  auto add_task = [&](int64_t e, int64_t t0, int64_t nt, int64_t f0) {
    int32_t* t = task + 4 * n_task++;
    t[0] = static_cast<int32_t>(e);
    t[1] = static_cast<int32_t>(t0);
    t[2] = static_cast<int32_t>(nt);
    t[3] = static_cast<int32_t>(f0);
  };
  for (int64_t i = 0; i < n_tile; ++i) {
    const int64_t e = order[i], m = count[e];
    const int64_t n_blk = (m + plan.tile_max_tokens - 1) / plan.tile_max_tokens;
    const int64_t blk = std::min(plan.tile_max_tokens, ((m + n_blk - 1) / n_blk + 31) / 32 * 32);
    for (int64_t t0 = 0; t0 < m; t0 += blk) {
      for (int64_t f0 = 0; f0 < sh.n_ff; f0 += plan.tile_ff_rows) {
        add_task(e, t0, std::min(blk, m - t0), f0);
      }
    }
  }
  for (int64_t i = 0; i < run.n_active_; ++i) {
    const int64_t e = active[i];
    if (IsTilePath(path[e])) continue;
    for (int64_t f0 = 0; f0 < sh.n_ff; f0 += kFfRowsPerTask) add_task(e, 0, count[e], f0);
  }
  run.n_gateup_tasks_ = n_task;
  return run;
}

int64_t MoeRun::NumTasks(int stage) const {
  switch (stage) {
    case 0: return n_token_chunks_ + n_pair_chunks_;
    case 1: return n_gateup_tasks_;
    case 2: return input_.n_tokens > 0 ? down_big_tasks_ + down_tail_tasks_ : 0;
    default: return 0;
  }
}

const MoeMatrix& MoeRun::Matrix(int which, uint8_t path) const {
  const MoeLayerWeights& w = *weights_;
  if (path == kPathPrefillForm)
    return which == 0 ? w.gate_prefill : which == 1 ? w.up_prefill : w.down_prefill;
  if (path == kPathTileCached)
    return which == 0 ? w.gate_tile : which == 1 ? w.up_tile : w.down_tile;
  return which == 0 ? w.gate : which == 1 ? w.up : w.down;
}

void MoeRun::RunTask(int stage, int64_t task, int worker) const {
  switch (stage) {
    case 0: QuantizeTask(task); break;
    case 1: GateUpTask(task, worker); break;
    case 2: DownTask(task, worker); break;
    default: break;
  }
}

void MoeRun::QuantizeTask(int64_t task) const {
  const MoePlan& p = *plan_;
  const int64_t n_embd = p.shape.n_embd;
  if (task < n_token_chunks_) {
    const ActFormat fmt = ActFormatFor(p.format.gate);
    const int64_t t0 = task * kQuantChunk;
    const int64_t t1 = std::min(input_.n_tokens, t0 + kQuantChunk);
    for (int64_t t = t0; t < t1; ++t) {
      p.kernels->quantize(fmt, XRow(t), ws_ + p.off_xq + t * p.x_row_bytes, n_embd);
    }
    return;
  }
  // Prefill experts read x per (token, expert) pair, contiguous per expert.
  const int32_t* pair_token = reinterpret_cast<const int32_t*>(ws_ + p.off_pair_token);
  const int32_t* offset = reinterpret_cast<const int32_t*>(ws_ + p.off_offset);
  const uint8_t* path = ws_ + p.off_path;
  const int64_t q0 = (task - n_token_chunks_) * kQuantChunk;
  const int64_t q1 = std::min(n_pairs_, q0 + kQuantChunk);
  // Expert of pair q0 by binary search over the offsets.
  int64_t e = std::upper_bound(offset, offset + p.shape.n_expert + 1, static_cast<int32_t>(q0)) -
              offset - 1;
  for (int64_t q = q0; q < q1; ++q) {
    while (offset[e + 1] <= q) ++e;
    const float* x = XRow(pair_token[q]);
    uint8_t* row = ws_ + p.off_xp + q * p.xp_row_bytes;
    if (path[e] == kPathPrefillForm) {
      p.kernels->quantize(ActFormatFor(p.format.gate_prefill), x, row, n_embd);
    } else if (IsTilePath(path[e])) {
      WriteTileAct(x, n_embd, 0, n_embd, ws_ + p.off_xp, p.xp_row_bytes, e, q - offset[e]);
    }
  }
}

void MoeRun::GateUpTask(int64_t task, int worker) const {
  const MoePlan& p = *plan_;
  const int32_t* tk = reinterpret_cast<const int32_t*>(ws_ + p.off_task) + 4 * task;
  const int64_t e = tk[0];
  const uint8_t path = ws_[p.off_path + e];
  if (IsTilePath(path)) {
    TileGateUp(e, tk[1], tk[2], tk[3], worker);
    return;
  }
  const int32_t* offset = reinterpret_cast<const int32_t*>(ws_ + p.off_offset);
  const int32_t* pair_token = reinterpret_cast<const int32_t*>(ws_ + p.off_pair_token);
  const bool prefill = path == kPathPrefillForm;
  const int64_t n = offset[e + 1] - offset[e];
  uint8_t* scratch = ws_ + p.off_worker + worker * p.worker_scratch_bytes;
  float* g = reinterpret_cast<float*>(scratch);
  float* u = g + n * kFfRowsPerTask;

  MatmulArgs a;
  a.n_rows = p.shape.n_ff;
  a.k = p.shape.n_embd;
  a.row_begin = tk[3];
  a.row_end = a.row_begin + kFfRowsPerTask;
  a.n_act = n;
  a.out_stride = kFfRowsPerTask;
  a.scratch = scratch + (p.worker_scratch_bytes - p.kernel_scratch_bytes);
  a.scratch_bytes = p.kernel_scratch_bytes;
  a.bf16_tile_min_tokens = p.options.bf16_tile_min_tokens;
  if (prefill) {
    a.act = ws_ + p.off_xp + offset[e] * p.xp_row_bytes;
    a.act_stride = p.xp_row_bytes;
    a.act_padded = true;
  } else {
    a.act = ws_ + p.off_xq;
    a.act_stride = p.x_row_bytes;
    a.act_index = pair_token + offset[e];
  }
  // Gate and up of `x`'s pairs into g and u from pair r0 on.
  auto gate_up = [&](MatmulArgs& x, int64_t r0) {
    for (int which = 0; which < 2; ++which) {
      const MoeMatrix& m = Matrix(which, path);
      x.format = m.format;
      x.w = static_cast<const uint8_t*>(m.experts[e]);
      x.out = (which == 0 ? g : u) + r0 * kFfRowsPerTask;
      p.kernels->matmul(x);
    }
  };
  // (The plan sized the kernel scratch for these rows from format.gate; an up
  // matrix of another format reads `act` as before.)
  if (AmxBf16Tiles(p.variant, Matrix(0, path).format) && n >= a.bf16_tile_min_tokens) {
    // The amx variant's bf16 tiles: each block of kBf16RowsBlock pairs' rows of
    // x as bf16 once into the kernel scratch, for gate and up (the kernel would
    // pack them for each).
    uint16_t* rows = reinterpret_cast<uint16_t*>(a.scratch);
    MatmulArgs c = a;
    c.act_bf16 = rows;
    c.act_bf16_stride = a.k;
    for (int64_t c0 = 0; c0 < n; c0 += kBf16RowsBlock) {
      c.n_act = std::min(kBf16RowsBlock, n - c0);
      for (int64_t i = 0; i < c.n_act; ++i) {
        const int64_t row = a.act_index != nullptr ? a.act_index[c0 + i] : c0 + i;
        F32RowToBf16(a.act + row * a.act_stride, rows + i * a.k, a.k);
      }
      if (a.act_index != nullptr) {
        c.act_index = a.act_index + c0;
      } else {
        c.act = a.act + c0 * a.act_stride;
      }
      gate_up(c, c0);
    }
  } else {
    gate_up(a, 0);
  }
  p.kernels->silu_mul(g, u, g, n * kFfRowsPerTask);
  const MoeMatrixFormat down = prefill ? p.format.down_prefill : p.format.down;
  const ActFormat hfmt = ActFormatFor(down);
  const int64_t col = ActRowBytes(hfmt, a.row_begin);
  for (int64_t i = 0; i < n; ++i) {
    p.kernels->quantize(hfmt, g + i * kFfRowsPerTask,
                        ws_ + p.off_hq + (offset[e] + i) * p.h_row_bytes + col, kFfRowsPerTask);
  }
  if (p.off_hb >= 0 && Bf16TileFormat(down)) {
    // The same values as bf16 (the F32 rows hold bf16 values: their top halves).
    uint16_t* hb = reinterpret_cast<uint16_t*>(ws_ + p.off_hb);
    for (int64_t i = 0; i < n; ++i) {
      F32RowToBf16(ws_ + p.off_hq + (offset[e] + i) * p.h_row_bytes + col,
                   hb + (offset[e] + i) * p.shape.n_ff + a.row_begin, kFfRowsPerTask);
    }
  }
}

// Tile path, stage 1: gate and up rows [f0, f0 + tile_ff_rows) for the pairs
// [t0, t0 + nt) of expert e, SiLU, and h of those rows in the tile format.
void MoeRun::TileGateUp(int64_t e, int64_t t0, int64_t nt, int64_t f0, int worker) const {
  const MoePlan& p = *plan_;
  const int64_t fb = p.tile_ff_rows, n_ff = p.shape.n_ff;
  uint8_t* scratch = ws_ + p.off_worker + worker * p.worker_scratch_bytes;
  // Rows of g and u padded by tile_out_pad floats: at 512 rows (2 KiB) the
  // 32 rows of one fix-up would fall into 2 L1 sets per column.
  const int64_t os = fb + p.options.tile_out_pad;
  float* g = reinterpret_cast<float*>(scratch);  // F32 [nt][os], row i: fb values
  float* u = g + nt * os;                        // F32 [nt][os]

  MatmulArgs a;
  a.n_rows = n_ff;
  a.k = p.shape.n_embd;
  a.row_begin = f0;
  a.row_end = f0 + fb;
  TileActArgs(ws_ + p.off_xp, p.xp_row_bytes, e, t0, &a);
  a.act_padded = true;
  a.act_group = p.tile_group;
  SetTileKernelArgs(p, &a);
  a.n_act = nt;
  a.out_stride = os;
  a.scratch = scratch + (p.worker_scratch_bytes - p.kernel_scratch_bytes);
  a.scratch_bytes = p.kernel_scratch_bytes;
  const uint8_t path = ws_[p.off_path + e];
  for (int which = 0; which < 2; ++which) {
    const MoeMatrix& m = Matrix(which, path);
    a.format = m.format;
    a.w = static_cast<const uint8_t*>(m.experts[e]);
    a.out = which == 0 ? g : u;
    // While gate's last chunk runs its tiles, up's first pair of panels
    // streams in (NextCallBytes).
    a.next_w = nullptr;
    a.next_w_bytes = 0;
    if (which == 0 && p.options.tile_phased && p.options.tile_stream_next) {
      a.next_w_bytes = NextCallBytes(Matrix(1, path), e, f0, std::min<int64_t>(fb, 2 * kPanelRows),
                                     p.shape.n_embd, &a.next_w);
    }
    p.kernels->tile_matmul(a);
  }
  p.kernels->silu_mul(g, u, g, nt * os);  // the pad columns too (unread)
  for (int64_t i = 0; i < nt; ++i) {
    WriteTileAct(g + i * os, fb, f0, n_ff, ws_ + p.off_hq, p.h_row_bytes, e, t0 + i);
  }
}

void MoeRun::TileActArgs(const uint8_t* region, int64_t row_bytes, int64_t e, int64_t t0,
                         MatmulArgs* a) const {
  const int32_t* offset = reinterpret_cast<const int32_t*>(ws_ + plan_->off_offset);
  const uint8_t* block = region + offset[e] * row_bytes;  // the expert's rows
  if (plan_->options.tile_act_kmajor) {
    // Column c of row t at block + c * 64 n + t * 64 (n rows): the expert's
    // n * row_bytes bytes hold its TileActRowBytes / 64 columns; tile loads
    // past row n read the next column (or past the block: kPadRows), rows
    // that the kernels never use.
    a->act = block + t0 * 64;
    a->act_stride = 64;
    a->act_kstep_stride = 64 * (offset[e + 1] - offset[e]);
  } else {
    a->act = block + t0 * row_bytes;
    a->act_stride = row_bytes;
    a->act_kstep_stride = 64;
  }
}

void MoeRun::WriteTileAct(const float* x, int64_t n, int64_t j0, int64_t k, uint8_t* region,
                          int64_t row_bytes, int64_t e, int64_t t) const {
  const MoePlan& p = *plan_;
  // Written where the tile kernels will read it (TileActByte over the act
  // fields TileActArgs gives them), in either layout: group by group (each
  // independent in the format) through a row piece on the stack, then column
  // by column.
  MatmulArgs a;
  TileActArgs(region, row_bytes, e, 0, &a);
  uint8_t* row = region + (TileActByte(a, t, 0) - region);
  const int64_t group = p.tile_group, kss = a.act_kstep_stride;
  alignas(64) int8_t q[1024];  // tile_group <= 1024 (MakeMoePlan)
  for (int64_t gi = 0; gi < n / group; ++gi) {
    float d = 0.0f;
    p.kernels->quantize_tile(x + gi * group, q, &d, group, group);
    const int64_t j = j0 + gi * group;
    for (int64_t c = 0; c < group / 64; ++c) std::memcpy(row + (j / 64 + c) * kss, q + 64 * c, 64);
    const int64_t js = k + 4 * (j / group);  // the group's scale
    std::memcpy(row + (js / 64) * kss + js % 64, &d, 4);
  }
}

void MoeRun::DownTask(int64_t task, int worker) const {
  const MoePlan& p = *plan_;
  const int64_t n_embd = p.shape.n_embd;
  int64_t r0 = task * down_rows_, rows = down_rows_;
  if (task >= down_big_tasks_) {  // the tail (MoePlanOptions::prefill_down_tail_rows)
    r0 = down_big_tasks_ * down_rows_ + (task - down_big_tasks_) * down_tail_rows_;
    rows = std::min(down_tail_rows_, n_embd - r0);
  }
  for (int64_t t = 0; t < input_.n_tokens; ++t) {
    std::fill(input_.out + t * n_embd + r0, input_.out + t * n_embd + r0 + rows, 0.0f);
  }
  const int32_t* active = reinterpret_cast<const int32_t*>(ws_ + p.off_active);
  const int32_t* offset = reinterpret_cast<const int32_t*>(ws_ + p.off_offset);
  const int32_t* pair_token = reinterpret_cast<const int32_t*>(ws_ + p.off_pair_token);
  const float* pair_weight = reinterpret_cast<const float*>(ws_ + p.off_pair_weight);
  uint8_t* scratch = ws_ + p.off_worker + worker * p.worker_scratch_bytes;
  float* y = reinterpret_cast<float*>(scratch);
  const uint8_t* path = ws_ + p.off_path;

  MatmulArgs a;
  a.n_rows = n_embd;
  a.k = p.shape.n_ff;
  a.row_begin = r0;
  a.row_end = r0 + rows;
  a.act_padded = true;
  a.out = y;
  a.out_stride = rows;
  a.scratch = scratch + (p.worker_scratch_bytes - p.kernel_scratch_bytes);
  a.scratch_bytes = p.kernel_scratch_bytes;
  a.bf16_tile_min_tokens = p.options.bf16_tile_min_tokens;
  // out rows of pairs [q0, q0 + n) += weight * y.
  auto accumulate = [&](int64_t q0, int64_t n) {
    for (int64_t q = 0; q < n; ++q) {
      const float w = pair_weight[q0 + q];
      float* o = input_.out + pair_token[q0 + q] * n_embd + r0;
      const float* yq = y + q * rows;
      for (int64_t r = 0; r < rows; ++r) o[r] += w * yq[r];
    }
  };
  for (int64_t i = 0; i < n_active_; ++i) {
    const int64_t e = active[i];
    const MoeMatrix& m = Matrix(2, path[e]);
    // The next expert's slice: streamed by the phased tile kernel during this
    // call's tiles where it can (NextCallBytes), else its first lines now.
    const uint8_t* next_w = nullptr;
    int64_t next_bytes = 0;
    if (i + 1 < n_active_) {
      const MoeMatrix& next = Matrix(2, path[active[i + 1]]);
      // (Only the phased kernel over panel16 streams it; the tile caches' kernel does not.)
      if (IsTilePath(path[e]) && m.format.layout == MoeWeightLayout::kPanel16 &&
          p.options.tile_phased && p.options.tile_stream_next) {
        next_bytes = NextCallBytes(next, active[i + 1], r0, rows, p.shape.n_ff, &next_w);
      }
      if (next_w == nullptr) PrefetchRows(next, active[i + 1], r0, rows);
    }
    a.format = m.format;
    a.w = static_cast<const uint8_t*>(m.experts[e]);
    const int64_t n = offset[e + 1] - offset[e];
    if (IsTilePath(path[e])) {
      a.act_group = p.tile_group;
      SetTileKernelArgs(p, &a);
      // The phased kernel converts each weight once per call: all the
      // expert's tokens in one call (y holds max_tokens rows); the in-loop
      // kernel in blocks of tile_max_tokens, as before.
      const int64_t step = p.options.tile_phased ? p.options.max_tokens : p.tile_max_tokens;
      for (int64_t t0 = 0; t0 < n; t0 += step) {
        TileActArgs(ws_ + p.off_hq, p.h_row_bytes, e, t0, &a);
        a.n_act = std::min(step, n - t0);
        const bool last = t0 + step >= n;
        a.next_w = last ? next_w : nullptr;
        a.next_w_bytes = last ? next_bytes : 0;
        p.kernels->tile_matmul(a);
        accumulate(offset[e] + t0, a.n_act);
      }
      continue;
    }
    a.act = ws_ + p.off_hq + offset[e] * p.h_row_bytes;
    a.act_stride = p.h_row_bytes;  // rows in order (tile experts: TileActArgs)
    a.act_kstep_stride = 64;
    a.n_act = n;
    const bool hb = p.off_hb >= 0 && Bf16TileFormat(m.format);
    a.act_bf16 =
        hb ? reinterpret_cast<const uint16_t*>(ws_ + p.off_hb) + offset[e] * p.shape.n_ff : nullptr;
    a.act_bf16_stride = hb ? p.shape.n_ff : 0;
    p.kernels->matmul(a);
    accumulate(offset[e], n);
  }
}

void MoeRun::PrefetchRows(const MoeMatrix& m, int64_t e, int64_t r0, int64_t rows) const {
  // The kernels prefetch within their own rows; the first ~48 KiB of the next
  // short stream (the next expert's slice) would otherwise start cold.
  if (m.format.layout == MoeWeightLayout::kGguf) return;
  const int64_t nb = plan_->shape.n_ff / KBlock(m.format);
  const int64_t panel_bytes = nb * PanelBlockBytes(m.format);
  const uint8_t* base = static_cast<const uint8_t*>(m.experts[e]) + (r0 / kPanelRows) * panel_bytes;
  const int64_t bytes = std::min<int64_t>(rows / kPanelRows * panel_bytes, 48 << 10);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(base + off, 0, 1);
}

absl::StatusOr<int64_t> TileCacheBytes(MoeMatrixFormat src, int64_t n_rows, int64_t k) {
  if (!TileFormatSupported(src)) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoE tile cache: the source ", FormatName(src),
                     " is not a tile-path format (panel16 q4_K, q5_K, q6_K or q8_0)"));
  }
  return MoeMatrixBytes({src.type, MoeWeightLayout::kTile512}, n_rows, k);
}

int64_t TileCacheNumTasks(int64_t n_rows) {
  return (n_rows / kPanelRows + kTileCachePanelsPerTask - 1) / kTileCachePanelsPerTask;
}

void BuildTileCacheTask(MoeMatrixFormat src, const void* w, int64_t n_rows, int64_t k, int64_t task,
                        void* cache) {
  const MoeKernels& kern = MoeKernelsFor(ActiveCpuVariant());
  const auto convert = kern.tile_convert != nullptr ? kern.tile_convert : &TileConvertPanelScalar;
  const int64_t n_groups = k / panel::kTileK;
  const int64_t p1 = std::min(n_rows / kPanelRows, (task + 1) * kTileCachePanelsPerTask);
  for (int64_t p = task * kTileCachePanelsPerTask; p < p1; ++p) {
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      uint8_t* blk = static_cast<uint8_t*>(cache) + (p * n_groups + gi) * panel::kTileBytes;
      convert(src, static_cast<const uint8_t*>(w), k, p, gi * panel::kTileK, panel::kTileK,
              reinterpret_cast<int8_t*>(blk + panel::kTileQ),
              reinterpret_cast<float*>(blk + panel::kTileS));
    }
  }
}

void RunMoeStage(const MoeRun& run, int stage, int ith, int nth) {
  const int64_t n = run.NumTasks(stage);
  for (int64_t t = ith; t < n; t += nth) run.RunTask(stage, t, ith);
}

}  // namespace ktx::kernels::moe
