// File: kernels/cpu/moe/moe_repack.h
//
// Expert weight layouts of the MoE operator (moe.h) and the load-time repacking
// into them. Every layout stores one expert matrix W [n_rows][k] (ne0 = k is
// the contiguous input dim, as in GGUF); experts are separate slabs.
//
// kGguf      the bytes of the GGUF file: n_rows rows of k/block elements.
//
// kPanel16   exact re-arrangement (no precision change) for AVX-512 VNNI / AVX2
//            kernels, and the one copy the AMX tile prefill path reads too
//            (converted to int8 per (row, group) on the fly, moe_internal.h). Rows are grouped in
//            panels of 16 (n_rows % 16 == 0); panel p holds rows 16p..16p+15, panels are
//            consecutive, and a panel is a sequence of "panel blocks", one per k-block, so that a
//            kernel streams a panel linearly. Quants of 16 rows are
//            interleaved 4 consecutive k at a time (the operand shape of
//            vpdpbusd and of AMX B tiles): a 64-byte vector holds, for rows
//            r = 0..15, the 4 bytes at r*4 .. r*4+3. Per panel block (byte offsets):
//    Q4_K (k-block 256, 2368 B = 148 B/row): 0 d[16] f16 | 32 dmin[16] f16 |
//          64 sc[8][16] u8 (sub-block j, row r) | 192 m[4][16][2] u8 (mins of
//          sub-blocks 2i and 2i+1 of row r, adjacent) | 320 qs[32][64]: group g
//          covers k = 8g..8g+7; byte r*4+i has q[r][8g+i] in its low nibble and
//          q[r][8g+4+i] in its high nibble.
//    Q5_K (2880 B = 180 B/row): Q4_K's panel block, then 2368 qh[8][64]:
//          sub-block j (k = 32j..32j+31): bit t of byte r*4+i is the 5th bit of
//          q[r][32j + 4t + i].
//    Q6_K (3360 B = 210 B/row): 0 d[16] f16 | 32 sc[16][16] i8 | 288 16 x
//          { ql[2][64] | qh[64] }, 192 bytes per sub-block j (k = 16j..16j+15),
//          read in address order: ql groups g = 2j, 2j+1 hold the low 4 bits
//          (nibble layout as Q4_K); in qh, bits 2t..2t+1 of byte r*4+i are bits
//          4..5 of q[r][16j + 4t + i] (q in 0..63, value d*sc*(q-32)).
//    Q8_0 (k-block 32, 544 B = 34 B/row): 0 d[16] f16 | 32 q[8][64] u8: byte
//          r*4+i of group t is q[r][4t+i] + 128 (stored offset by 128 so that
//          vpdpbusd's unsigned operand is the weight).
//    BF16 (k-block 32, 1024 B = 64 B/row): w[16][64]: group t covers k = 2t,
//          2t+1; 4 bytes per row r: w[r][2t], w[r][2t+1] (bf16 bits). A block
//          is also an AMX bf16 B tile (16 rows of 64 bytes) as it is.
//
// kAmxInt8   int8 weights with one float scale per (row, 256-block), in AMX
//            B-tile order; lossy for K-quants (w ~= s * q, s = max|w| / 127 of
//            the dequantized 256 values, q = round(w / s)): relative RMS error
//            about 1/(127*sqrt(12)) of the block maximum. Panels of 16 rows,
//            panel block per 256 k (4160 B = 260 B/row): 0 s[16] f32 | 64
//            q[64][64] i8: group t (k = 4t..4t+3), byte r*4+i = q[r][4t+i].
//            The 1 KiB from 64 + 1024c is the B tile of k = 64c..64c+63 (16
//            rows of 64 bytes, stride 64). Sources Q4_K, Q5_K, Q6_K, Q8_0.
//            The first AMX prefill form, now only for comparison (a second
//            copy at ~1.8x the Q4_K bytes; the backend no longer builds it):
//            only the amx variant has a fast kernel for it (others run the
//            scalar code).
//
// kTile512   the tile path's int8 conversion of panel16 weights (moe_internal.h,
//            TileConvertPanelScalar) done once at load for groups of 512 k, so
//            that an expert whose conversion is cached runs the tile kernels
//            without converting (a tile cache: MoeLayerWeights::*_tile, built by
//            BuildTileCacheTask in moe.h; never a decode or prefill form). Panels of
//            16 rows, one block per 512 k (8256 B): 0 q[128][64] i8 (B-tile row
//            kk, k = 4kk..4kk+3, byte r*4+i = v[r][4kk+i]) | 8192 s[16] f32 (row
//            scales). Sources: the panel16 types of the tile path (Q4_K, Q5_K,
//            Q6_K, Q8_0), whose type it keeps. ~1.0 byte per weight beside the
//            panel16 copy (Q4_K: 0.58).
//
// Repacking runs once at load, in parallel: MoeRepackNumTasks() tasks, each a
// range of panels of one expert, any order, any thread (the caller's pool).
// Thread-safe: pure functions of their arguments; tasks write disjoint bytes.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "kernels/common/tensor_type.h"

namespace ktx::kernels::moe {

enum class MoeWeightLayout : int { kGguf = 0, kPanel16 = 1, kAmxInt8 = 2, kTile512 = 3 };

// k per int8 scale group of the tile512 layout: tile caches serve tile paths of this group.
inline constexpr int64_t kTile512Group = 512;

// "gguf", "panel16", "amx_int8", "tile512".
const char* MoeWeightLayoutName(MoeWeightLayout layout);

// The storage of one expert matrix: its GGUF type and layout.
struct MoeMatrixFormat {
  TensorType type = TensorType::kQ4_K;
  MoeWeightLayout layout = MoeWeightLayout::kGguf;
};

// Whether the operator can hold `type` in `layout` (see above; GGUF and
// panel16: Q4_K, Q5_K, Q6_K, Q8_0, BF16; amx_int8 and tile512: Q4_K, Q5_K, Q6_K,
// Q8_0).
bool MoeFormatSupported(MoeMatrixFormat format);

// Bytes of one expert matrix [n_rows][k]. InvalidArgument when the format is
// unsupported or the shape does not fit it (k % 256 for K-quants and amx_int8,
// k % 512 for tile512, k % 32 otherwise; n_rows % 16 for the panel layouts).
absl::StatusOr<int64_t> MoeMatrixBytes(MoeMatrixFormat format, int64_t n_rows, int64_t k);

// One repacking: `n_expert` matrices [n_rows][k] of `type` from GGUF bytes
// src[e] into `to` at dst[e] (MoeMatrixBytes bytes each). A null src[e] or
// dst[e] skips expert e (not owned by this shard).
//
// Re-quantization at load: with from_bf16 and `type` one of Q4_K, Q5_K,
// Q6_K, Q8_0 (a panel16 target), the sources are BF16 GGUF slabs and every
// panel's 16 rows are first quantized to `type` (QuantizeRow of
// kernels/cpu/quant: round to nearest on the format's grid, the bounds stated
// there) in the task's scratch (MoeRepackScratchBytes), then repacked as if
// the file had held them: less memory and fewer bytes per token for the
// kernels, at the format's rounding (BF16 -> Q8_0 relative RMS ~5e-3 of a
// Gaussian matrix, Q4_K ~7e-2).
struct MoeRepackJob {
  TensorType type = TensorType::kQ4_K;
  MoeWeightLayout to = MoeWeightLayout::kPanel16;
  int64_t n_rows = 0;
  int64_t k = 0;
  int64_t n_expert = 0;
  const void* const* src = nullptr;  // [n_expert] GGUF expert slabs
  void* const* dst = nullptr;        // [n_expert] destinations
  // The sources are BF16 GGUF slabs, re-quantized to `type` (see above).
  bool from_bf16 = false;
};

// Whether BF16 experts can be re-quantized to `type` at load (Q4_K, Q5_K,
// Q6_K, Q8_0).
bool MoeRequantTargetSupported(TensorType type);
// Validates the job (format and shape as MoeMatrixBytes).
absl::Status ValidateMoeRepackJob(const MoeRepackJob& job);
// Number of independent tasks (expert x range of 8 panels).
int64_t MoeRepackNumTasks(const MoeRepackJob& job);
// Bytes of scratch a task needs (0 without re-quantization): 16 rows of
// `type` plus k floats.
int64_t MoeRepackScratchBytes(const MoeRepackJob& job);
// Runs task `task` in [0, MoeRepackNumTasks); returns the bytes it wrote.
// `scratch`: MoeRepackScratchBytes(job) bytes of the calling worker's own
// (may be null when that is 0).
int64_t MoeRepackTask(const MoeRepackJob& job, int64_t task, void* scratch = nullptr);
// Total bytes the job writes (sum over the experts it repacks).
int64_t MoeRepackBytes(const MoeRepackJob& job);

}  // namespace ktx::kernels::moe
