#include "kernels/cpu/moe/moe_repack.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/moe/moe_internal.h"
#include "kernels/cpu/quant/quant.h"

namespace ktx::kernels::moe {
namespace {

constexpr int64_t kPanelsPerTask = 8;

bool IsKQuant(TensorType t) {
  return t == TensorType::kQ4_K || t == TensorType::kQ5_K || t == TensorType::kQ6_K;
}

// Decodes block b of a GGUF K-quant row.
void DecodeGgufK(TensorType type, const uint8_t* row, int64_t b, DecodedK* out) {
  switch (type) {
    case TensorType::kQ4_K: DecodeQ4K(reinterpret_cast<const GgufQ4K*>(row)[b], out); break;
    case TensorType::kQ5_K: DecodeQ5K(reinterpret_cast<const GgufQ5K*>(row)[b], out); break;
    default: DecodeQ6K(reinterpret_cast<const GgufQ6K*>(row)[b], out); break;
  }
}

// amx_int8 panel block of 16 rows starting at `rows` (GGUF row pointers),
// 256-block b (scalar; this lossy form is optional and not on the load path
// of the backend any more).
void RepackAmxInt8Block(TensorType type, const uint8_t* const* rows, int64_t b, uint8_t* pb) {
  std::memset(pb, 0, panel::kAmxBytes);
  for (int r = 0; r < kPanelRows; ++r) {
    float w[256];
    if (IsKQuant(type)) {
      DecodedK dk;
      DecodeGgufK(type, rows[r], b, &dk);
      for (int i = 0; i < 256; ++i) w[i] = DecodedKValue(dk, type, i);
    } else {  // Q8_0: 8 blocks of 32
      for (int s = 0; s < 8; ++s) {
        const GgufQ8_0& blk = reinterpret_cast<const GgufQ8_0*>(rows[r])[8 * b + s];
        const float d = HalfToFloatScalar(blk.d);
        for (int i = 0; i < 32; ++i) w[32 * s + i] = d * static_cast<float>(blk.qs[i]);
      }
    }
    float amax = 0.0f;
    for (float v : w) amax = std::max(amax, std::fabs(v));
    const float scale = amax / 127.0f;
    const float iscale = amax > 0.0f ? 127.0f / amax : 0.0f;
    std::memcpy(pb + panel::kAmxS + 4 * r, &scale, 4);
    for (int t = 0; t < 64; ++t) {
      for (int i = 0; i < 4; ++i) {
        // Round half to even without a libm call (|v| <= 127 here).
        const float v = w[4 * t + i] * iscale;
        const float q = (v + 12582912.0f) - 12582912.0f;
        pb[panel::kAmxQ + 64 * t + 4 * r + i] =
            static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f)));
      }
    }
  }
}

// ---- panel16: word-wide (SWAR) re-arrangement, one GGUF row at a time ----
// These run in the shared translation unit (no ISA flags): 32/64-bit integer
// operations on groups of 4 or 8 bytes instead of per-nibble loops.

inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline void Store32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

// The 4-bit parts of 256 quants of one row into the panel nibble layout (32
// groups of 64 bytes at dst + group_offset(g), row r at 4r): group g gets
// q[8g + i] | q[8g + 4 + i] << 4.
// `lo_src(g)` returns the 8 source bytes holding q[8g .. 8g + 7] in their low
// (shift 0) or high (shift 4) nibbles, `shift` says which.
template <typename Src, typename GroupOffset>
inline void PackRowNibbles(Src src, int r, uint8_t* dst, GroupOffset group_offset) {
  for (int g = 0; g < 32; ++g) {
    int shift = 0;
    const uint64_t w = src(g, &shift);  // call first, then read shift (UBSan misorders `>>`)
    const uint64_t s = w >> shift;
    const uint32_t lo = static_cast<uint32_t>(s) & 0x0F0F0F0Fu;
    const uint32_t hi = static_cast<uint32_t>(s >> 32) & 0x0F0F0F0Fu;
    Store32(dst + group_offset(g) + 4 * r, lo | (hi << 4));
  }
}

// Q4_K / Q5_K: GGUF qs chunk c (64 k) holds k = 64c + l in the low nibble of
// byte l and k = 64c + 32 + l in its high nibble.
inline void RepackRowQ4K(const uint8_t* blk, bool q5, int r, uint8_t* pb) {
  const uint8_t* scales = blk + 4;
  const uint8_t* qh = blk + 16;
  const uint8_t* qs = blk + (q5 ? 48 : 16);
  std::memcpy(pb + panel::kQ4KD + 2 * r, blk, 2);
  std::memcpy(pb + panel::kQ4KDmin + 2 * r, blk + 2, 2);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    ScaleMinK4(j, scales, &sc, &m);
    pb[panel::kQ4KSc + 16 * j + r] = sc;
    pb[panel::kQ4KM + 32 * (j / 2) + 2 * r + (j % 2)] = m;
  }
  PackRowNibbles(
      [qs](int g, int* shift) {
        const int c = g / 8, kk = 8 * g - 64 * c;  // k within the chunk: 0, 8, .., 56
        *shift = kk < 32 ? 0 : 4;
        return Load64(qs + 32 * c + (kk & 31));
      },
      r, pb + panel::kQ4KQs, [](int g) { return 64 * g; });
  if (q5) {
    // 5th bit of k: bit j = k / 32 of qh[k % 32]. Panel: bit t of byte 4r + i
    // of sub-block j is the 5th bit of q[32j + 4t + i].
    for (int j = 0; j < 8; ++j) {
      uint32_t out = 0;
      for (int t = 0; t < 8; ++t) out |= ((Load32(qh + 4 * t) >> j) & 0x01010101u) << t;
      Store32(pb + panel::kQ5KQh + 64 * j + 4 * r, out);
    }
  }
}

// Q6_K: per half h (128 k), quarter u (32 k) of k = 128h + 32u + l: low 4
// bits in ql[64h + 32(u & 1) + l] (low nibble for u < 2, high otherwise),
// bits 4..5 at bits 2u..2u+1 of qh[32h + l].
inline void RepackRowQ6K(const uint8_t* blk, int r, uint8_t* pb) {
  const uint8_t* ql = blk;
  const uint8_t* qh = blk + 128;
  const uint8_t* sc = blk + 192;
  std::memcpy(pb + panel::kQ6KD + 2 * r, blk + 208, 2);
  for (int j = 0; j < 16; ++j) pb[panel::kQ6KSc + 16 * j + r] = sc[j];
  PackRowNibbles(
      [ql](int g, int* shift) {
        const int k = 8 * g, h = k / 128, u = (k % 128) / 32, l = k % 32;
        *shift = u < 2 ? 0 : 4;
        return Load64(ql + 64 * h + 32 * (u & 1) + l);
      },
      r, pb, [](int g) { return panel::Q6KQl(g); });
  for (int j = 0; j < 16; ++j) {  // sub-block of 16 k
    const int k = 16 * j, h = k / 128, u = (k % 128) / 32, l = k % 32;
    const uint8_t* src = qh + 32 * h + l;
    uint32_t out = 0;
    for (int t = 0; t < 4; ++t) out |= ((Load32(src + 4 * t) >> (2 * u)) & 0x03030303u) << (2 * t);
    Store32(pb + panel::Q6KQh(j) + 4 * r, out);
  }
}

inline void RepackRowQ80(const uint8_t* blk, int r, uint8_t* pb) {
  std::memcpy(pb + panel::kQ80D + 2 * r, blk, 2);
  for (int t = 0; t < 8; ++t) {
    Store32(pb + panel::kQ80Q + 64 * t + 4 * r, Load32(blk + 2 + 4 * t) ^ 0x80808080u);
  }
}

inline void RepackRowBf16(const uint8_t* src, int r, uint8_t* pb) {
  for (int t = 0; t < 16; ++t) std::memcpy(pb + 64 * t + 4 * r, src + 4 * t, 4);
}

// Panel p (16 rows of GGUF bytes starting at `rows0`, `row_bytes` apart) into
// its nb consecutive panel blocks at `dst`. Every byte of the panel is written.
void RepackPanel16(TensorType type, const uint8_t* rows0, int64_t row_bytes, int64_t nb,
                   uint8_t* dst) {
  const int64_t pbb = PanelBlockBytes({type, MoeWeightLayout::kPanel16});
  for (int r = 0; r < kPanelRows; ++r) {
    const uint8_t* row = rows0 + r * row_bytes;
    switch (type) {
      case TensorType::kQ4_K:
        for (int64_t b = 0; b < nb; ++b) RepackRowQ4K(row + 144 * b, false, r, dst + b * pbb);
        break;
      case TensorType::kQ5_K:
        for (int64_t b = 0; b < nb; ++b) RepackRowQ4K(row + 176 * b, true, r, dst + b * pbb);
        break;
      case TensorType::kQ6_K:
        for (int64_t b = 0; b < nb; ++b) RepackRowQ6K(row + 210 * b, r, dst + b * pbb);
        break;
      case TensorType::kQ8_0:
        for (int64_t b = 0; b < nb; ++b) RepackRowQ80(row + 34 * b, r, dst + b * pbb);
        break;
      case TensorType::kBF16:
        for (int64_t b = 0; b < nb; ++b) RepackRowBf16(row + 64 * b, r, dst + b * pbb);
        break;
      default: break;
    }
  }
}

}  // namespace

const char* MoeWeightLayoutName(MoeWeightLayout layout) {
  switch (layout) {
    case MoeWeightLayout::kGguf: return "gguf";
    case MoeWeightLayout::kPanel16: return "panel16";
    case MoeWeightLayout::kAmxInt8: return "amx_int8";
    case MoeWeightLayout::kTile512: return "tile512";
  }
  return "unknown";
}

bool MoeFormatSupported(MoeMatrixFormat f) {
  const bool base = IsKQuant(f.type) || f.type == TensorType::kQ8_0;
  switch (f.layout) {
    case MoeWeightLayout::kGguf:
    case MoeWeightLayout::kPanel16: return base || f.type == TensorType::kBF16;
    case MoeWeightLayout::kAmxInt8:
    case MoeWeightLayout::kTile512: return base;
  }
  return false;
}

absl::StatusOr<int64_t> MoeMatrixBytes(MoeMatrixFormat f, int64_t n_rows, int64_t k) {
  const auto traits = GetTensorTypeTraits(static_cast<uint32_t>(f.type));
  const std::string name = absl::StrCat(traits ? traits->name : "unknown type", " in layout ",
                                        MoeWeightLayoutName(f.layout));
  if (!MoeFormatSupported(f)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MoE expert weights: ", name,
        " is not supported (q4_K, q5_K, q6_K, q8_0, bf16; amx_int8 and tile512 take no bf16)"));
  }
  const int64_t kb = KBlock(f);
  if (n_rows <= 0 || k <= 0 || k % kb != 0) {
    return absl::InvalidArgumentError(absl::StrCat("MoE expert weights: ", name, " needs k (", k,
                                                   ") a positive multiple of ", kb,
                                                   " and rows > 0 (", n_rows, ")"));
  }
  if (f.layout == MoeWeightLayout::kGguf) return n_rows * GgufRowBytes(f.type, k);
  if (n_rows % kPanelRows != 0) {
    return absl::InvalidArgumentError(absl::StrCat("MoE expert weights: ", name,
                                                   " needs a row count (", n_rows,
                                                   ") that is a multiple of 16"));
  }
  return n_rows / kPanelRows * (k / kb) * PanelBlockBytes(f);
}

bool MoeRequantTargetSupported(TensorType type) {
  return type == TensorType::kQ4_K || type == TensorType::kQ5_K || type == TensorType::kQ6_K ||
         type == TensorType::kQ8_0;
}

namespace {
bool Requantizes(const MoeRepackJob& job) { return job.from_bf16 && job.type != TensorType::kBF16; }
}  // namespace

absl::Status ValidateMoeRepackJob(const MoeRepackJob& job) {
  if (Requantizes(job) &&
      (!MoeRequantTargetSupported(job.type) || job.to != MoeWeightLayout::kPanel16)) {
    const auto traits = GetTensorTypeTraits(static_cast<uint32_t>(job.type));
    return absl::InvalidArgumentError(
        absl::StrCat("MoE repack: BF16 experts re-quantize to q4_K, q5_K, q6_K or q8_0 in panel16, "
                     "not to ",
                     traits ? traits->name : "?", " in ", MoeWeightLayoutName(job.to)));
  }
  if (job.to == MoeWeightLayout::kGguf) {
    return absl::InvalidArgumentError("MoE repack: the target layout must not be gguf");
  }
  if (job.to == MoeWeightLayout::kTile512) {
    return absl::InvalidArgumentError(
        "MoE repack: tile512 is made from panel16 weights by BuildTileCacheTask (moe.h), not from "
        "GGUF");
  }
  if (!MoeFormatSupported({job.type, MoeWeightLayout::kGguf})) {
    return absl::InvalidArgumentError("MoE repack: unsupported source type");
  }
  auto bytes = MoeMatrixBytes({job.type, job.to}, job.n_rows, job.k);
  if (!bytes.ok()) return bytes.status();
  if (job.n_expert < 0 || (job.n_expert > 0 && (job.src == nullptr || job.dst == nullptr))) {
    return absl::InvalidArgumentError("MoE repack: src/dst arrays missing");
  }
  return absl::OkStatus();
}

int64_t MoeRepackNumTasks(const MoeRepackJob& job) {
  const int64_t panels = job.n_rows / kPanelRows;
  return job.n_expert * ((panels + kPanelsPerTask - 1) / kPanelsPerTask);
}

int64_t MoeRepackScratchBytes(const MoeRepackJob& job) {
  if (!Requantizes(job)) return 0;
  return kPanelRows * GgufRowBytes(job.type, job.k) + job.k * static_cast<int64_t>(sizeof(float));
}

int64_t MoeRepackTask(const MoeRepackJob& job, int64_t task, void* scratch) {
  const int64_t panels = job.n_rows / kPanelRows;
  const int64_t per_expert = (panels + kPanelsPerTask - 1) / kPanelsPerTask;
  const int64_t e = task / per_expert;
  const int64_t p0 = (task % per_expert) * kPanelsPerTask;
  const int64_t p1 = std::min(panels, p0 + kPanelsPerTask);
  if (job.src[e] == nullptr || job.dst[e] == nullptr) return 0;
  const MoeMatrixFormat to{job.type, job.to};
  const int64_t kb = KBlock(to);
  const int64_t nb = job.k / kb;
  const int64_t pbb = PanelBlockBytes(to);
  const int64_t row_bytes = GgufRowBytes(job.type, job.k);
  const uint8_t* src = static_cast<const uint8_t*>(job.src[e]);
  uint8_t* dst = static_cast<uint8_t*>(job.dst[e]);
  const bool requant = Requantizes(job);
  // Re-quantization: the panel's 16 rows in `type` and one row of floats.
  uint8_t* panel_rows = static_cast<uint8_t*>(scratch);
  float* row_f32 =
      requant ? reinterpret_cast<float*>(panel_rows + kPanelRows * row_bytes) : nullptr;
  const int64_t src_row_bytes = requant ? GgufRowBytes(TensorType::kBF16, job.k) : row_bytes;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* rows0 = src + p * kPanelRows * src_row_bytes;
    if (requant) {
      for (int r = 0; r < kPanelRows; ++r) {
        DequantizeRow(TensorType::kBF16, rows0 + r * src_row_bytes, row_f32, job.k);
        QuantizeRow(job.type, row_f32, panel_rows + r * row_bytes, job.k);
      }
      rows0 = panel_rows;
    }
    uint8_t* out = dst + p * nb * pbb;
    if (job.to == MoeWeightLayout::kPanel16) {
      RepackPanel16(job.type, rows0, row_bytes, nb, out);
      continue;
    }
    // amx_int8: from Q8_0 a 256-block spans 8 GGUF blocks; the block
    // repacker indexes them itself, so b counts 256-blocks there as well.
    const uint8_t* rows[kPanelRows];
    for (int r = 0; r < kPanelRows; ++r) rows[r] = rows0 + r * row_bytes;
    for (int64_t b = 0; b < nb; ++b) RepackAmxInt8Block(job.type, rows, b, out + b * pbb);
  }
  return (p1 - p0) * nb * pbb;
}

int64_t MoeRepackBytes(const MoeRepackJob& job) {
  auto bytes = MoeMatrixBytes({job.type, job.to}, job.n_rows, job.k);
  if (!bytes.ok()) return 0;
  int64_t n = 0;
  for (int64_t e = 0; e < job.n_expert; ++e) {
    if (job.src[e] != nullptr && job.dst[e] != nullptr) n += *bytes;
  }
  return n;
}

}  // namespace ktx::kernels::moe
