// File: tests/kernels/cpu/moe/moe_test_util.h
//
// Shared by the MoE tests and the benchmark: random GGUF expert weights, an
// independent float64 reference of the MoE layer (weights dequantized by code
// written here from GGUF.md section 2, not by the kernels' decoders), and
// helpers to build MoeLayerWeights (optionally repacked) and run a layer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "kernels/common/tensor_type.h"
#include "kernels/cpu/moe/moe.h"

namespace ktx::kernels::moe::testing {

inline float HalfBitsToFloat(uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 31, man = h & 1023;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(man), -24);
  } else if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else {
    v = std::ldexp(1.0 + man / 1024.0, exp - 15);
  }
  return static_cast<float>(sign ? -v : v);
}

// Nearest half (normal range only; enough for test scales).
inline uint16_t FloatToHalfBits(float f) {
  if (f == 0.0f) return 0;
  const int sign = f < 0 ? 1 : 0;
  double a = std::fabs(static_cast<double>(f));
  int e;
  const double m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp = e - 1 + 15;
  int man = static_cast<int>(std::lround((m * 2.0 - 1.0) * 1024.0));
  if (man == 1024) {
    man = 0;
    ++exp;
  }
  if (exp >= 31) return static_cast<uint16_t>((sign << 15) | 0x7bff);
  if (exp <= 0) {  // subnormal: multiples of 2^-24
    const int sub = static_cast<int>(std::lround(std::ldexp(a, 24)));
    return static_cast<uint16_t>((sign << 15) | std::min(sub, 1023));
  }
  return static_cast<uint16_t>((sign << 15) | (exp << 10) | man);
}

inline uint16_t FloatToBf16Bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline int64_t RowBytesOf(TensorType t, int64_t k) {
  const TensorTypeTraits& tr = TraitsOf(t);
  return k / tr.block_size * tr.type_size;
}

// Random bytes for one GGUF matrix [rows][k] of `type`; values of magnitude
// about `scale` (K-quant d / dmin chosen accordingly).
inline std::vector<uint8_t> RandomMatrix(TensorType type, int64_t rows, int64_t k, float scale,
                                         std::mt19937& rng) {
  std::vector<uint8_t> out(rows * RowBytesOf(type, k));
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> unit(0.5f, 1.0f);
  for (auto& b : out) b = static_cast<uint8_t>(byte(rng));
  const int64_t bs = TraitsOf(type).type_size;
  const int64_t nblocks = static_cast<int64_t>(out.size()) / (type == TensorType::kBF16 ? 2 : bs);
  for (int64_t i = 0; i < nblocks; ++i) {
    uint8_t* b = out.data() + i * (type == TensorType::kBF16 ? 2 : bs);
    uint16_t h;
    switch (type) {
      case TensorType::kQ4_K:
      case TensorType::kQ5_K:
        // value = d*sc*q - dmin*m, sc, m < 64, q < 16 or 32.
        h = FloatToHalfBits(scale * unit(rng) / (type == TensorType::kQ4_K ? 250.0f : 500.0f));
        std::memcpy(b, &h, 2);
        h = FloatToHalfBits(scale * unit(rng) / 250.0f);
        std::memcpy(b + 2, &h, 2);
        break;
      case TensorType::kQ6_K:
        for (int j = 0; j < 16; ++j) {
          b[192 + j] = static_cast<uint8_t>(static_cast<int8_t>(byte(rng) % 255 - 127));
        }
        h = FloatToHalfBits(scale * unit(rng) / 2000.0f);
        std::memcpy(b + 208, &h, 2);
        break;
      case TensorType::kQ8_0:
        h = FloatToHalfBits(scale * unit(rng) / 64.0f);
        std::memcpy(b, &h, 2);
        for (int j = 0; j < 32; ++j) {
          if (static_cast<int8_t>(b[2 + j]) == -128) b[2 + j] = static_cast<uint8_t>(-127);
        }
        break;
      case TensorType::kBF16: {
        std::normal_distribution<float> n(0.0f, scale);
        h = FloatToBf16Bits(n(rng));
        std::memcpy(b, &h, 2);
        break;
      }
      default: break;
    }
  }
  return out;
}

// Dequantizes row r of a GGUF matrix into doubles (GGUF.md section 2).
inline void DequantRow(TensorType type, const uint8_t* row, int64_t k, double* y) {
  switch (type) {
    case TensorType::kBF16:
      for (int64_t i = 0; i < k; ++i) {
        uint16_t b;
        std::memcpy(&b, row + 2 * i, 2);
        const uint32_t bits = static_cast<uint32_t>(b) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        y[i] = f;
      }
      return;
    case TensorType::kQ8_0:
      for (int64_t blk = 0; blk < k / 32; ++blk) {
        const uint8_t* b = row + blk * 34;
        uint16_t d;
        std::memcpy(&d, b, 2);
        for (int j = 0; j < 32; ++j) {
          y[32 * blk + j] = static_cast<double>(HalfBitsToFloat(d)) * static_cast<int8_t>(b[2 + j]);
        }
      }
      return;
    case TensorType::kQ4_K:
    case TensorType::kQ5_K: {
      const bool q5 = type == TensorType::kQ5_K;
      const int bs = q5 ? 176 : 144;
      for (int64_t blk = 0; blk < k / 256; ++blk) {
        const uint8_t* b = row + blk * bs;
        uint16_t dh, mh;
        std::memcpy(&dh, b, 2);
        std::memcpy(&mh, b + 2, 2);
        const double d = HalfBitsToFloat(dh), dmin = HalfBitsToFloat(mh);
        const uint8_t* sc = b + 4;
        const uint8_t* qh = b + 16;
        const uint8_t* qs = b + (q5 ? 48 : 16);
        for (int j = 0; j < 8; ++j) {
          int s, m;
          if (j < 4) {
            s = sc[j] & 63;
            m = sc[j + 4] & 63;
          } else {
            s = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
            m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
          }
          const int c = j / 2;  // 64-element chunk
          for (int l = 0; l < 32; ++l) {
            int q = (j % 2 == 0) ? (qs[32 * c + l] & 15) : (qs[32 * c + l] >> 4);
            if (q5 && (qh[l] >> j) & 1) q += 16;
            y[256 * blk + 32 * j + l] = d * s * q - dmin * m;
          }
        }
      }
      return;
    }
    case TensorType::kQ6_K:
      for (int64_t blk = 0; blk < k / 256; ++blk) {
        const uint8_t* b = row + blk * 210;
        const uint8_t* ql = b;
        const uint8_t* qh = b + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
        uint16_t dh;
        std::memcpy(&dh, b + 208, 2);
        const double d = HalfBitsToFloat(dh);
        for (int i = 0; i < 256; ++i) {
          const int h = i / 128, w = i % 128, quarter = w / 32, l = w % 32;
          const uint8_t lowbyte = ql[64 * h + l + (quarter % 2) * 32];
          const int low = quarter < 2 ? (lowbyte & 15) : (lowbyte >> 4);
          const int high = (qh[32 * h + l] >> (2 * quarter)) & 3;
          const int q = (low | (high << 4)) - 32;
          y[256 * blk + i] = d * sc[8 * h + (w / 16)] * q;
        }
      }
      return;
    default: return;
  }
}

// A whole layer of random expert weights in GGUF form, plus optional repacked copies.
struct TestLayer {
  MoeShape shape;
  TensorType gate_type = TensorType::kQ4_K, down_type = TensorType::kQ6_K;
  std::vector<std::vector<uint8_t>> gate, up, down;       // [n_expert] GGUF bytes
  std::vector<std::vector<double>> gate_f, up_f, down_f;  // dequantized (empty when not needed)
};

inline TestLayer MakeTestLayer(const MoeShape& shape, TensorType gate_type, TensorType down_type,
                               uint32_t seed, bool dequantize = true) {
  TestLayer L;
  L.shape = shape;
  L.gate_type = gate_type;
  L.down_type = down_type;
  std::mt19937 rng(seed);
  for (int64_t e = 0; e < shape.n_expert; ++e) {
    L.gate.push_back(RandomMatrix(gate_type, shape.n_ff, shape.n_embd, 0.08f, rng));
    L.up.push_back(RandomMatrix(gate_type, shape.n_ff, shape.n_embd, 0.08f, rng));
    L.down.push_back(RandomMatrix(down_type, shape.n_embd, shape.n_ff, 0.05f, rng));
    if (!dequantize) continue;
    auto deq = [](TensorType t, const std::vector<uint8_t>& m, int64_t rows, int64_t k) {
      std::vector<double> out(rows * k);
      for (int64_t r = 0; r < rows; ++r)
        DequantRow(t, m.data() + r * RowBytesOf(t, k), k, &out[r * k]);
      return out;
    };
    L.gate_f.push_back(deq(gate_type, L.gate[e], shape.n_ff, shape.n_embd));
    L.up_f.push_back(deq(gate_type, L.up[e], shape.n_ff, shape.n_embd));
    L.down_f.push_back(deq(down_type, L.down[e], shape.n_embd, shape.n_ff));
  }
  return L;
}

// Float64 reference over the owned experts.
inline std::vector<double> ReferenceMoe(const TestLayer& L, const std::vector<bool>& owned,
                                        int64_t n_tokens, const float* x, const int32_t* ids,
                                        const float* w) {
  const MoeShape& s = L.shape;
  std::vector<double> out(n_tokens * s.n_embd, 0.0);
  std::vector<double> h(s.n_ff);
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t k = 0; k < s.n_expert_used; ++k) {
      const int32_t e = ids[t * s.n_expert_used + k];
      if (!owned[e]) continue;
      for (int64_t f = 0; f < s.n_ff; ++f) {
        double g = 0, u = 0;
        const double* gr = &L.gate_f[e][f * s.n_embd];
        const double* ur = &L.up_f[e][f * s.n_embd];
        for (int64_t i = 0; i < s.n_embd; ++i) {
          g += gr[i] * x[t * s.n_embd + i];
          u += ur[i] * x[t * s.n_embd + i];
        }
        h[f] = g / (1.0 + std::exp(-g)) * u;
      }
      const double wk = w[t * s.n_expert_used + k];
      for (int64_t r = 0; r < s.n_embd; ++r) {
        const double* dr = &L.down_f[e][r * s.n_ff];
        double y = 0;
        for (int64_t f = 0; f < s.n_ff; ++f) y += dr[f] * h[f];
        out[t * s.n_embd + r] += wk * y;
      }
    }
  }
  return out;
}

// Root mean square of `v` (tests require a non-trivial reference).
inline double Rms(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return v.empty() ? 0.0 : std::sqrt(s / static_cast<double>(v.size()));
}

// Σ (y - ref)^2 / Σ ref^2.
inline double Nmse(const float* y, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (y[i] - ref[i]) * (y[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? num / den : num;
}

// Expert matrices of one kind in some layout (owns the bytes, 64-byte aligned).
struct LayoutCopy {
  std::vector<std::unique_ptr<uint8_t[], void (*)(void*)>> bufs;
  std::vector<const void*> ptrs;
};

inline uint8_t* AlignedAlloc(int64_t bytes) {
  return static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
}

// Copies (kGguf) or repacks (other layouts) `src` for the experts with owned[e].
inline LayoutCopy MakeLayout(const std::vector<std::vector<uint8_t>>& src, TensorType type,
                             MoeWeightLayout layout, int64_t rows, int64_t k,
                             const std::vector<bool>& owned) {
  LayoutCopy c;
  const int64_t bytes = *MoeMatrixBytes({type, layout}, rows, k);
  std::vector<const void*> s(src.size());
  std::vector<void*> d(src.size());
  for (size_t e = 0; e < src.size(); ++e) {
    if (!owned[e]) {
      c.bufs.emplace_back(nullptr, &std::free);
      c.ptrs.push_back(nullptr);
      s[e] = nullptr;
      d[e] = nullptr;
      continue;
    }
    c.bufs.emplace_back(AlignedAlloc(bytes), &std::free);
    c.ptrs.push_back(c.bufs.back().get());
    s[e] = src[e].data();
    d[e] = c.bufs.back().get();
    if (layout == MoeWeightLayout::kGguf) std::memcpy(d[e], src[e].data(), bytes);
  }
  if (layout != MoeWeightLayout::kGguf) {
    MoeRepackJob job;
    job.type = type;
    job.to = layout;
    job.n_rows = rows;
    job.k = k;
    job.n_expert = static_cast<int64_t>(src.size());
    job.src = s.data();
    job.dst = d.data();
    for (int64_t t = 0; t < MoeRepackNumTasks(job); ++t) MoeRepackTask(job, t);
  }
  return c;
}

struct AlignedBuffer {
  std::unique_ptr<uint8_t[], void (*)(void*)> p{nullptr, &std::free};
  size_t size = 0;
  explicit AlignedBuffer(size_t n)
      : p(AlignedAlloc(static_cast<int64_t>(n)), &std::free), size(n) {}
};

}  // namespace ktx::kernels::moe::testing
