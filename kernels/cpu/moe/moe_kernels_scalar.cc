// The scalar variant: the correctness reference of the MoE kernels and the
// fallback on any x86-64 CPU. Integer dot products per (sub-)block, block
// scales applied in float, one activation row at a time.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/moe/moe_internal.h"

namespace ktx::kernels::moe {
namespace scalar {
namespace {

inline int NearestClamp127(float v) {
  const float r = std::nearbyint(v);
  return static_cast<int>(std::min(127.0f, std::max(-127.0f, r)));
}

void QuantizeQ8K(const float* x, ActQ8K* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += 256) {
    ActQ8K& o = y[b];
    std::memset(&o, 0, sizeof(o));
    float amax = 0.0f;
    for (int i = 0; i < 256; ++i) amax = std::max(amax, std::fabs(x[i]));
    if (amax == 0.0f) continue;
    const float iscale = 127.0f / amax;
    o.d = amax / 127.0f;
    for (int i = 0; i < 256; ++i) o.qs[i] = static_cast<int8_t>(NearestClamp127(x[i] * iscale));
    for (int j = 0; j < 16; ++j) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += o.qs[16 * j + i];
      o.neg32_bsum16[j] = -32 * s;
    }
    for (int j = 0; j < 8; ++j) {
      int s = 0;
      for (int i = 0; i < 32; ++i) s += o.qs[32 * j + i];
      o.bsum32[j] = static_cast<int16_t>(s);
    }
  }
}

void QuantizeQ8_0(const float* x, ActQ8_0* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += 32) {
    ActQ8_0& o = y[b];
    std::memset(&o, 0, sizeof(o));
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    if (amax == 0.0f) continue;
    const float iscale = 127.0f / amax;
    o.d = amax / 127.0f;
    int s = 0;
    for (int i = 0; i < 32; ++i) {
      o.qs[i] = static_cast<int8_t>(NearestClamp127(x[i] * iscale));
      s += o.qs[i];
    }
    o.neg128_sum = -128 * s;
  }
}

// Σ over one K-quant block of a decoded weight row with a Q8K activation block.
inline float DotDecodedK(const DecodedK& w, TensorType type, const ActQ8K& a) {
  if (type == TensorType::kQ6_K) {
    int32_t isum = 0;
    for (int j = 0; j < 16; ++j) {
      int32_t s = 0;
      for (int i = 0; i < 16; ++i) s += (w.q[16 * j + i] - 32) * a.qs[16 * j + i];
      isum += w.sc[j] * s;
    }
    return a.d * (w.d * static_cast<float>(isum));
  }
  int32_t isum = 0, imin = 0;
  for (int j = 0; j < 8; ++j) {
    int32_t s = 0;
    for (int i = 0; i < 32; ++i) s += w.q[32 * j + i] * a.qs[32 * j + i];
    isum += w.sc[j] * s;
    imin += w.m[j] * a.bsum32[j];
  }
  return a.d * (w.d * static_cast<float>(isum) - w.dmin * static_cast<float>(imin));
}

inline int32_t DotI8(const int8_t* a, const int8_t* b, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

const uint8_t* ActRow(const MatmulArgs& a, int64_t t) {
  const int64_t row = a.act_index != nullptr ? a.act_index[t] : t;
  return a.act + row * a.act_stride;
}

}  // namespace

void Quantize(ActFormat fmt, const float* x, uint8_t* dst, int64_t k) {
  switch (fmt) {
    case ActFormat::kQ8K: QuantizeQ8K(x, reinterpret_cast<ActQ8K*>(dst), k / 256); break;
    case ActFormat::kQ8_0: QuantizeQ8_0(x, reinterpret_cast<ActQ8_0*>(dst), k / 32); break;
    case ActFormat::kF32: {
      float* y = reinterpret_cast<float*>(dst);
      for (int64_t i = 0; i < k; ++i) y[i] = RoundToBf16(x[i]);
      break;
    }
  }
}

void SiluMul(const float* g, const float* u, float* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

void Matmul(const MatmulArgs& a) {
  const MoeMatrixFormat f = a.format;
  const int64_t kb = KBlock(f);
  const int64_t nb = a.k / kb;
  const int64_t n_rows_out = a.row_end - a.row_begin;
  for (int64_t t = 0; t < a.n_act; ++t) {
    std::fill(a.out + t * a.out_stride, a.out + t * a.out_stride + n_rows_out, 0.0f);
  }
  const bool k_quant =
      f.type == TensorType::kQ4_K || f.type == TensorType::kQ5_K || f.type == TensorType::kQ6_K;
  for (int64_t r = a.row_begin; r < a.row_end; ++r) {
    const int64_t ro = r - a.row_begin;
    for (int64_t b = 0; b < nb; ++b) {
      if (f.layout == MoeWeightLayout::kAmxInt8) {
        const uint8_t* pb = a.w + ((r / kPanelRows) * nb + b) * panel::kAmxBytes;
        float s;
        int8_t q[256];
        DecodePanelAmx(pb, static_cast<int>(r % kPanelRows), &s, q);
        for (int64_t t = 0; t < a.n_act; ++t) {
          const ActQ8K& x = reinterpret_cast<const ActQ8K*>(ActRow(a, t))[b];
          a.out[t * a.out_stride + ro] += x.d * (s * static_cast<float>(DotI8(q, x.qs, 256)));
        }
      } else if (k_quant) {
        DecodedK w;
        if (f.layout == MoeWeightLayout::kGguf) {
          const uint8_t* row = a.w + r * GgufRowBytes(f.type, a.k);
          if (f.type == TensorType::kQ4_K) {
            DecodeQ4K(reinterpret_cast<const GgufQ4K*>(row)[b], &w);
          } else if (f.type == TensorType::kQ5_K) {
            DecodeQ5K(reinterpret_cast<const GgufQ5K*>(row)[b], &w);
          } else {
            DecodeQ6K(reinterpret_cast<const GgufQ6K*>(row)[b], &w);
          }
        } else {
          const uint8_t* pb = a.w + ((r / kPanelRows) * nb + b) * PanelBlockBytes(f);
          const int rr = static_cast<int>(r % kPanelRows);
          if (f.type == TensorType::kQ6_K) {
            DecodePanelQ6K(pb, rr, &w);
          } else {
            DecodePanelQ4K(pb, rr, f.type == TensorType::kQ5_K, &w);
          }
        }
        for (int64_t t = 0; t < a.n_act; ++t) {
          const ActQ8K& x = reinterpret_cast<const ActQ8K*>(ActRow(a, t))[b];
          a.out[t * a.out_stride + ro] += DotDecodedK(w, f.type, x);
        }
      } else if (f.type == TensorType::kQ8_0) {
        float d;
        int8_t q[32];
        if (f.layout == MoeWeightLayout::kGguf) {
          const GgufQ8_0& blk =
              reinterpret_cast<const GgufQ8_0*>(a.w + r * GgufRowBytes(f.type, a.k))[b];
          d = HalfToFloatScalar(blk.d);
          std::memcpy(q, blk.qs, 32);
        } else {
          DecodePanelQ80(a.w + ((r / kPanelRows) * nb + b) * panel::kQ80Bytes,
                         static_cast<int>(r % kPanelRows), &d, q);
        }
        for (int64_t t = 0; t < a.n_act; ++t) {
          const ActQ8_0& x = reinterpret_cast<const ActQ8_0*>(ActRow(a, t))[b];
          a.out[t * a.out_stride + ro] += x.d * (d * static_cast<float>(DotI8(q, x.qs, 32)));
        }
      } else {  // BF16
        uint16_t w[32];
        if (f.layout == MoeWeightLayout::kGguf) {
          std::memcpy(w, a.w + r * a.k * 2 + b * 64, 64);
        } else {
          DecodePanelBf16(a.w + ((r / kPanelRows) * nb + b) * panel::kBf16Bytes,
                          static_cast<int>(r % kPanelRows), w);
        }
        for (int64_t t = 0; t < a.n_act; ++t) {
          const float* x = reinterpret_cast<const float*>(ActRow(a, t)) + b * 32;
          float s = 0.0f;
          for (int i = 0; i < 32; ++i) s += Bf16Bits(w[i]) * x[i];
          a.out[t * a.out_stride + ro] += s;
        }
      }
    }
  }
}

void QuantizeTile(const float* x, int8_t* q, float* d, int64_t n, int64_t group) {
  for (int64_t g = 0; g < n / group; ++g, x += group, q += group) {
    float amax = 0.0f;
    for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(x[i]));
    if (amax == 0.0f) {
      std::memset(q, 0, group);
      d[g] = 0.0f;
      continue;
    }
    const float iscale = 127.0f / amax;
    d[g] = amax / 127.0f;
    for (int64_t i = 0; i < group; ++i) q[i] = static_cast<int8_t>(NearestClamp127(x[i] * iscale));
  }
}

void TileMatmul(const MatmulArgs& a) {
  const int64_t group = a.act_group;
  const int64_t n_rows_out = a.row_end - a.row_begin;
  for (int64_t t = 0; t < a.n_act; ++t) {
    std::fill(a.out + t * a.out_stride, a.out + t * a.out_stride + n_rows_out, 0.0f);
  }
  int8_t* tiles = reinterpret_cast<int8_t*>(a.scratch);  // 16 * group bytes
  float s[kPanelRows];
  for (int64_t p = a.row_begin / kPanelRows; p < a.row_end / kPanelRows; ++p) {
    for (int64_t gi = 0; gi < a.k / group; ++gi) {
      TileConvertPanelScalar(a.format, a.w, a.k, p, gi * group, group, tiles, s);
      for (int64_t t = 0; t < a.n_act; ++t) {
        // The group's 64-byte columns of row t (either layout).
        auto x = [&](int64_t j) { return static_cast<int8_t>(*TileActByte(a, t, gi * group + j)); };
        float dx;
        std::memcpy(&dx, TileActByte(a, t, a.k + 4 * gi), 4);
        for (int r = 0; r < kPanelRows; ++r) {
          int32_t isum = 0;
          for (int64_t kk = 0; kk < group / 4; ++kk) {
            for (int i = 0; i < 4; ++i) isum += x(4 * kk + i) * tiles[64 * kk + 4 * r + i];
          }
          float* o = a.out + t * a.out_stride + p * kPanelRows + r - a.row_begin;
          *o = std::fma(static_cast<float>(isum), s[r] * dx, *o);
        }
      }
    }
  }
}

}  // namespace scalar

bool TileFormatSupported(MoeMatrixFormat f) {
  if (f.layout != MoeWeightLayout::kPanel16) return false;
  return f.type == TensorType::kQ4_K || f.type == TensorType::kQ5_K ||
         f.type == TensorType::kQ6_K || f.type == TensorType::kQ8_0;
}

int64_t TileScratchBytes(int64_t group, int64_t chunk_bytes, int64_t skew) {
  // Two converted groups of two panels (16 * group bytes each), their row
  // scales, the per-sub-block factors of one group (<= 2 panels x 32
  // sub-blocks x 128 B) and two C-tile staging areas (4 KiB each); a skew
  // after each of the 4 + 2 + 1 buffers (moe_kernels_amx.cc CarveTileScratch).
  int64_t bytes = 2 * 2 * 16 * group + 4 * 64 + 2 * (group / 256) * 16 * 128 * 2 + 2 * 4096 + 256;
  bytes += 8 * skew;
  if (chunk_bytes > 0) {  // the phased chunk: int8 items, then 2 x 16 row scales per item
    bytes += TileChunkItems(group, chunk_bytes) * (32 * group + 128) + 64;
  }
  return bytes;
}

void TileConvertPanelScalar(MoeMatrixFormat format, const uint8_t* w, int64_t k, int64_t panel,
                            int64_t k0, int64_t group, int8_t* tiles, float* s) {
  if (format.layout == MoeWeightLayout::kTile512) {                 // converted at load: a copy
    if (group != panel::kTileK || k0 % panel::kTileK != 0) return;  // not a tile512 request
    const uint8_t* pb = w + (panel * (k / panel::kTileK) + k0 / panel::kTileK) * panel::kTileBytes;
    std::memcpy(tiles, pb + panel::kTileQ, 16 * panel::kTileK);
    std::memcpy(s, pb + panel::kTileS, 4 * kPanelRows);
    return;
  }
  const TensorType type = format.type;
  const int64_t kb = KBlock(format), nb = k / kb, pbb = PanelBlockBytes(format);
  const uint8_t* pw = w + panel * nb * pbb;
  const int64_t b0 = k0 / kb, nbg = group / kb;
  const bool q5 = type == TensorType::kQ5_K;
  const int qmax = q5 ? 31 : 15;
  auto put = [&](int64_t kk_elem, int r, int v) {  // kk_elem: k - k0
    tiles[64 * (kk_elem / 4) + 4 * r + kk_elem % 4] = static_cast<int8_t>(v);
  };
  for (int r = 0; r < kPanelRows; ++r) {
    float amax = 0.0f;
    for (int64_t b = b0; b < b0 + nbg; ++b) {
      const uint8_t* pb = pw + b * pbb;
      DecodedK dk;
      switch (type) {
        case TensorType::kQ4_K:
        case TensorType::kQ5_K:
          DecodePanelQ4K(pb, r, q5, &dk);
          for (int j = 0; j < 8; ++j) {
            const float mm = dk.dmin * static_cast<float>(dk.m[j]);
            const float hi = std::fma(dk.d, static_cast<float>(dk.sc[j] * qmax), -mm);
            amax = std::max(amax, std::max(std::fabs(hi), std::fabs(mm)));
          }
          break;
        case TensorType::kQ6_K:
          DecodePanelQ6K(pb, r, &dk);
          for (int j = 0; j < 16; ++j) {
            amax = std::max(amax, std::fabs(dk.d * static_cast<float>(dk.sc[j])) * 32.0f);
          }
          break;
        default: {  // Q8_0
          float d;
          int8_t q[32];
          DecodePanelQ80(pb, r, &d, q);
          amax = std::max(amax, std::fabs(d) * 128.0f);
          break;
        }
      }
    }
    s[r] = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int64_t b = b0; b < b0 + nbg; ++b) {
      const uint8_t* pb = pw + b * pbb;
      const int64_t kb0 = (b - b0) * kb;
      DecodedK dk;
      switch (type) {
        case TensorType::kQ4_K:
        case TensorType::kQ5_K: {
          DecodePanelQ4K(pb, r, q5, &dk);
          const float dq = dk.d * inv, mq = dk.dmin * inv;
          for (int j = 0; j < 8; ++j) {
            const int a = static_cast<int>(std::nearbyint(dq * static_cast<float>(dk.sc[j] * 256)));
            const int bc =
                static_cast<int>(std::nearbyint(mq * static_cast<float>(dk.m[j] * 256))) - 128;
            for (int i = 0; i < 32; ++i) put(kb0 + 32 * j + i, r, (a * dk.q[32 * j + i] - bc) >> 8);
          }
          break;
        }
        case TensorType::kQ6_K: {
          DecodePanelQ6K(pb, r, &dk);
          const float dq = dk.d * inv;
          for (int j = 0; j < 16; ++j) {
            const int a = static_cast<int>(std::nearbyint(dq * static_cast<float>(dk.sc[j] * 256)));
            for (int i = 0; i < 16; ++i) {
              put(kb0 + 16 * j + i, r, (a * dk.q[16 * j + i] - (32 * a - 128)) >> 8);
            }
          }
          break;
        }
        default: {  // Q8_0
          float d;
          int8_t q[32];
          DecodePanelQ80(pb, r, &d, q);
          const int a = static_cast<int>(std::nearbyint(d * inv * 256.0f));
          for (int i = 0; i < 32; ++i) put(kb0 + i, r, (a * q[i] + 128) >> 8);
          break;
        }
      }
    }
  }
}

namespace {

bool Supports(MoeMatrixFormat f) { return MoeFormatSupported(f); }
int64_t NoScratch(MoeMatrixFormat, int64_t) { return 0; }

}  // namespace

const MoeKernels& MoeKernelsScalar() {
  static const MoeKernels k = {CpuVariant::kScalar, "scalar",
                               &Supports,           &scalar::Quantize,
                               &scalar::Matmul,     &NoScratch,
                               &scalar::SiluMul,    &scalar::QuantizeTile,
                               &scalar::TileMatmul, &TileConvertPanelScalar};
  return k;
}

}  // namespace ktx::kernels::moe
