#include "kernels/cpu/moe/moe_repack.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/moe/moe_internal.h"

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

void HalfBitsOfRow(TensorType type, const uint8_t* row, int64_t b, uint16_t* d, uint16_t* dmin) {
  if (type == TensorType::kQ6_K) {
    *d = reinterpret_cast<const GgufQ6K*>(row)[b].d;
    *dmin = 0;
  } else if (type == TensorType::kQ4_K) {
    *d = reinterpret_cast<const GgufQ4K*>(row)[b].d;
    *dmin = reinterpret_cast<const GgufQ4K*>(row)[b].dmin;
  } else {
    *d = reinterpret_cast<const GgufQ5K*>(row)[b].d;
    *dmin = reinterpret_cast<const GgufQ5K*>(row)[b].dmin;
  }
}

void PackNibbles(const uint8_t* q, int r, uint8_t* dst /* [32][64] */) {
  for (int g = 0; g < 32; ++g) {
    for (int i = 0; i < 4; ++i) {
      dst[64 * g + 4 * r + i] =
          static_cast<uint8_t>((q[8 * g + i] & 15) | ((q[8 * g + 4 + i] & 15) << 4));
    }
  }
}

// Panel block of 16 rows starting at `rows` (GGUF row pointers), block b.
void RepackPanelBlock(TensorType type, MoeWeightLayout to, const uint8_t* const* rows, int64_t b,
                      uint8_t* pb) {
  std::memset(pb, 0, PanelBlockBytes({type, to}));
  if (to == MoeWeightLayout::kAmxInt8) {
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
    return;
  }
  switch (type) {
    case TensorType::kQ4_K:
    case TensorType::kQ5_K: {
      for (int r = 0; r < kPanelRows; ++r) {
        DecodedK dk;
        DecodeGgufK(type, rows[r], b, &dk);
        uint16_t d, dmin;
        HalfBitsOfRow(type, rows[r], b, &d, &dmin);
        std::memcpy(pb + panel::kQ4KD + 2 * r, &d, 2);
        std::memcpy(pb + panel::kQ4KDmin + 2 * r, &dmin, 2);
        for (int j = 0; j < 8; ++j) {
          pb[panel::kQ4KSc + 16 * j + r] = static_cast<uint8_t>(dk.sc[j]);
          pb[panel::kQ4KM + 32 * (j / 2) + 2 * r + (j % 2)] = static_cast<uint8_t>(dk.m[j]);
        }
        PackNibbles(dk.q, r, pb + panel::kQ4KQs);
        if (type == TensorType::kQ5_K) {
          for (int j = 0; j < 8; ++j) {
            for (int t = 0; t < 8; ++t) {
              for (int i = 0; i < 4; ++i) {
                const int bit = (dk.q[32 * j + 4 * t + i] >> 4) & 1;
                pb[panel::kQ5KQh + 64 * j + 4 * r + i] |= static_cast<uint8_t>(bit << t);
              }
            }
          }
        }
      }
      break;
    }
    case TensorType::kQ6_K: {
      for (int r = 0; r < kPanelRows; ++r) {
        DecodedK dk;
        DecodeGgufK(type, rows[r], b, &dk);
        uint16_t d, dmin;
        HalfBitsOfRow(type, rows[r], b, &d, &dmin);
        std::memcpy(pb + panel::kQ6KD + 2 * r, &d, 2);
        for (int j = 0; j < 16; ++j) {
          pb[panel::kQ6KSc + 16 * j + r] = static_cast<uint8_t>(static_cast<int8_t>(dk.sc[j]));
        }
        PackNibbles(dk.q, r, pb + panel::kQ6KQl);
        for (int j = 0; j < 16; ++j) {
          for (int t = 0; t < 4; ++t) {
            for (int i = 0; i < 4; ++i) {
              const int hi = (dk.q[16 * j + 4 * t + i] >> 4) & 3;
              pb[panel::kQ6KQh + 64 * j + 4 * r + i] |= static_cast<uint8_t>(hi << (2 * t));
            }
          }
        }
      }
      break;
    }
    case TensorType::kQ8_0: {
      for (int r = 0; r < kPanelRows; ++r) {
        const GgufQ8_0& blk = reinterpret_cast<const GgufQ8_0*>(rows[r])[b];
        std::memcpy(pb + panel::kQ80D + 2 * r, &blk.d, 2);
        for (int t = 0; t < 8; ++t) {
          for (int i = 0; i < 4; ++i) {
            pb[panel::kQ80Q + 64 * t + 4 * r + i] = static_cast<uint8_t>(blk.qs[4 * t + i]) ^ 0x80;
          }
        }
      }
      break;
    }
    case TensorType::kBF16: {
      for (int r = 0; r < kPanelRows; ++r) {
        const uint8_t* src = rows[r] + b * 64;
        for (int t = 0; t < 16; ++t) std::memcpy(pb + 64 * t + 4 * r, src + 4 * t, 4);
      }
      break;
    }
    default: break;
  }
}

}  // namespace

const char* MoeWeightLayoutName(MoeWeightLayout layout) {
  switch (layout) {
    case MoeWeightLayout::kGguf: return "gguf";
    case MoeWeightLayout::kPanel16: return "panel16";
    case MoeWeightLayout::kAmxInt8: return "amx_int8";
  }
  return "unknown";
}

bool MoeFormatSupported(MoeMatrixFormat f) {
  const bool base = IsKQuant(f.type) || f.type == TensorType::kQ8_0;
  switch (f.layout) {
    case MoeWeightLayout::kGguf:
    case MoeWeightLayout::kPanel16: return base || f.type == TensorType::kBF16;
    case MoeWeightLayout::kAmxInt8: return base;
  }
  return false;
}

absl::StatusOr<int64_t> MoeMatrixBytes(MoeMatrixFormat f, int64_t n_rows, int64_t k) {
  const auto traits = GetTensorTypeTraits(static_cast<uint32_t>(f.type));
  const std::string name = absl::StrCat(traits ? traits->name : "unknown type", " in layout ",
                                        MoeWeightLayoutName(f.layout));
  if (!MoeFormatSupported(f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoE expert weights: ", name,
                     " is not supported (q4_K, q5_K, q6_K, q8_0, bf16; amx_int8 takes no bf16)"));
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

absl::Status ValidateMoeRepackJob(const MoeRepackJob& job) {
  if (job.to == MoeWeightLayout::kGguf) {
    return absl::InvalidArgumentError("MoE repack: the target layout must not be gguf");
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

int64_t MoeRepackTask(const MoeRepackJob& job, int64_t task) {
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
  // For amx_int8 from Q8_0 a 256-block spans 8 GGUF blocks: RepackPanelBlock
  // indexes them itself, so b counts 256-blocks there as well.
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* rows[kPanelRows];
    for (int r = 0; r < kPanelRows; ++r) rows[r] = src + (p * kPanelRows + r) * row_bytes;
    for (int64_t b = 0; b < nb; ++b)
      RepackPanelBlock(job.type, job.to, rows, b, dst + (p * nb + b) * pbb);
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
