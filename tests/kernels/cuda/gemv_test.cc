// The quantized GEMV (kernels/cuda/gemv.h) against a float64 host reference:
// weights are random rows quantized with kernels/cpu/quant QuantizeRow and
// expanded with its DequantizeRow (the CPU dequantizer, not the GPU one),
// activations are random bf16, and
//   ref[t, r] = Σ_c double(W[r, c]) · double(x[t, c]) + beta · y0[t, r].
// The GEMV expands each weight exactly as DequantizeRow does (F32, not
// rounded to bf16) and multiplies it with the exact bf16 activation, so its
// only error is F32 accumulation: at most 8 · ceil(n_in / 256) fused
// multiply-adds per lane, a 5-level warp tree, up to 7 adds of the partial
// sums of warps sharing a row, and the beta add, each one rounding of at most
// 2^-24 relative to the magnitudes involved:
//   |got - ref| <= (8 · ceil(n_in / 256) + 16) · 2^-24 · (Σ|w·x| + |beta · y0|).
// A decoding mistake (a wrong nibble, scale or block) moves a row by a
// sizeable fraction of Σ|w·x| and fails by orders of magnitude.
//
// Awkward sizes: n_out 1, 5, 17, 33, 255, 576, 2112; n_in from 96 to 18432
// (partial last tiles, 18432 needs several token passes at 8 tokens);
// n_tokens 1, 3, 8, 11 (11: two passes); x strides that are / are not 16-byte
// multiples; y strides wider than n_out (padding must stay untouched); rows
// padded beyond their bytes (row_bytes > needed); beta 0 (y poisoned with
// NaN: must not be read) and 1.
#include "kernels/cuda/gemv.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/tensor_type.h"
#include "kernels/cpu/quant/quant.h"
#include "kernels/cuda/gemv_decode.cuh"
#include "kernels/cuda/gemv_direct.h"
#include "kernels/cuda/gemv_direct_decode.cuh"
#include "kernels/cuda/gemv_q8.h"
#include "kernels/cuda/gemv_q8_decode.cuh"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::kernels::cuda {
namespace {

using cuda_test::Bf16BitsToFloat;
using cuda_test::DeviceArray;

struct Shape {
  int64_t n_out;
  int64_t n_in;
};

// Random rows of `type` (quantized with QuantizeRow), padded to row_bytes,
// with their DequantizeRow values in double.
struct Weights {
  int64_t row_bytes = 0;
  std::vector<uint8_t> raw;  // n_out rows of row_bytes, + 16 readable bytes
  std::vector<double> wref;  // [n_out, n_in]
};

Weights MakeWeights(TensorType type, const Shape& s, std::mt19937& rng) {
  const TensorTypeTraits& traits = TraitsOf(type);
  Weights w;
  // Padded rows (Q4_K/Q5_K need row_bytes % 16 == 0, so pad by 32).
  w.row_bytes = RowBytes(traits, s.n_in) + 32;
  w.raw.assign(static_cast<size_t>(s.n_out * w.row_bytes + 16), 0xA5);
  w.wref.resize(static_cast<size_t>(s.n_out * s.n_in));
  std::vector<float> row(s.n_in), deq(s.n_in);
  for (int64_t r = 0; r < s.n_out; ++r) {
    // Rows of different magnitudes with an outlier, as real weights.
    std::normal_distribution<float> dist(0.0f, 0.01f * static_cast<float>(1 + r % 7));
    for (float& v : row) v = dist(rng);
    row[rng() % s.n_in] *= 15.0f;
    QuantizeRow(type, row.data(), w.raw.data() + r * w.row_bytes, s.n_in);
    DequantizeRow(type, w.raw.data() + r * w.row_bytes, deq.data(), s.n_in);
    for (int64_t c = 0; c < s.n_in; ++c) w.wref[r * s.n_in + c] = deq[c];
  }
  return w;
}

// The kernels QuantGemv can run for `type` with rows of `row_bytes`: the
// ring kernel and every compiled direct configuration (gemv_direct.h).
std::vector<GemvKernelChoice> KernelsFor(TensorType type, int64_t row_bytes) {
  std::vector<GemvKernelChoice> out(1);
  out[0].kernel = GemvKernel::kRing;
  if (CanDirectGemv(type, row_bytes)) {
    for (const char* spec : {"direct:1", "direct:2", "direct:4", "direct:2:2"}) {
      GemvKernelChoice c;
      EXPECT_TRUE(ParseGemvKernel(spec, &c)) << spec;
      out.push_back(c);
    }
  }
  return out;
}

std::string KernelName(const GemvKernelChoice& c) {
  if (c.kernel == GemvKernel::kRing) return "ring";
  return "direct:" + std::to_string(c.direct.unroll) + ":" + std::to_string(c.direct.rows_per_warp);
}

// F32 roundings per element of a row's sum (gemv.h for the ring kernel,
// gemv_direct.h for the direct one).
double RoundingsOf(const GemvKernelChoice& c, int64_t n_in) {
  if (c.kernel == GemvKernel::kRing) return 8.0 * static_cast<double>((n_in + 255) / 256) + 16;
  return 32.0 * static_cast<double>((n_in + 1023) / 1024) + 16;
}

// One product checked against the float64 reference; returns the worst
// |error| / tolerance seen (for the log). d_w: w.raw on the device.
// Every kernel of KernelsFor runs the same product (the reference is computed
// once); the process-wide kernel choice is restored afterwards.
double CheckOne(TensorType type, const Shape& s, const Weights& w, const uint8_t* d_w,
                int64_t n_tokens, bool x_aligned, float beta, std::mt19937& rng) {
  const TensorTypeTraits& traits = TraitsOf(type);
  SCOPED_TRACE(testing::Message() << traits.name << " n_out " << s.n_out << " n_in " << s.n_in
                                  << " n_tokens " << n_tokens << " ldx "
                                  << (x_aligned ? "aligned" : "odd") << " beta " << beta);
  const int64_t row_bytes = w.row_bytes;
  const std::vector<double>& wref = w.wref;
  const int64_t ldx = s.n_in + (x_aligned ? 8 : 3);
  const int64_t ldy = s.n_out + 5;
  const std::vector<uint16_t> x = cuda_test::RandomBf16(rng, n_tokens * ldx, 1.0f);
  std::vector<float> y0(n_tokens * ldy);
  if (beta != 0.0f) {
    y0 = cuda_test::RandomF32(rng, n_tokens * ldy, 1.0f);
  } else {
    const uint32_t nan_bits = 0x7fc00001u;  // beta 0 must not read y
    for (float& v : y0) std::memcpy(&v, &nan_bits, 4);
  }
  // Padding columns of y carry a marker that must survive.
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t r = s.n_out; r < ldy; ++r) y0[t * ldy + r] = -12345.0f;
  }
  DeviceArray<uint16_t> d_x(x);
  // The float64 reference and Σ|w·x| (+ |beta · y0|) per (token, row).
  std::vector<double> refs(n_tokens * s.n_out), mags(n_tokens * s.n_out);
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t r = 0; r < s.n_out; ++r) {
      double ref = 0.0, mag = 0.0;
      for (int64_t c = 0; c < s.n_in; ++c) {
        const double p = wref[r * s.n_in + c] * Bf16BitsToFloat(x[t * ldx + c]);
        ref += p;
        mag += std::fabs(p);
      }
      if (beta != 0.0f) {
        ref += beta * static_cast<double>(y0[t * ldy + r]);
        mag += std::fabs(beta * static_cast<double>(y0[t * ldy + r]));
      }
      refs[t * s.n_out + r] = ref;
      mags[t * s.n_out + r] = mag;
    }
  }
  const GemvKernelChoice saved = CurrentGemvKernel();
  double worst = 0.0;
  for (const GemvKernelChoice& kernel : KernelsFor(type, row_bytes)) {
    SCOPED_TRACE(testing::Message() << "kernel " << KernelName(kernel));
    SetGemvKernel(kernel);
    DeviceArray<float> d_y(y0);
    EXPECT_EQ(QuantGemv(type, d_w, row_bytes, s.n_out, s.n_in,
                        reinterpret_cast<const __nv_bfloat16*>(d_x.get()), ldx, n_tokens, d_y.get(),
                        ldy, beta, nullptr),
              cudaSuccess);
    const std::vector<float> got = d_y.Download();
    const double unit = std::ldexp(1.0, -24) * RoundingsOf(kernel, s.n_in);
    int failures = 0;
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t r = 0; r < ldy; ++r) {
        const float g = got[t * ldy + r];
        if (r >= s.n_out) {
          if (g != -12345.0f && ++failures <= 5) {
            ADD_FAILURE() << "y padding overwritten at token " << t << " column " << r << ": " << g;
          }
          continue;
        }
        const double ref = refs[t * s.n_out + r], mag = mags[t * s.n_out + r];
        const double tol = unit * mag + 1e-30;
        const double err = std::fabs(static_cast<double>(g) - ref);
        if (!(err <= tol)) {
          if (++failures <= 5) {
            ADD_FAILURE() << "token " << t << " row " << r << ": got " << g
                          << ", float64 reference " << ref << " (error " << err << " > tolerance "
                          << tol << " = " << unit << " x sum|w*x| " << mag << ")";
          }
        } else {
          worst = std::max(worst, err / tol);
        }
      }
    }
    if (failures > 5) ADD_FAILURE() << failures << " mismatches in all (first 5 shown)";
  }
  SetGemvKernel(saved);
  return worst;
}

class QuantGemvTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(QuantGemvTest, MatchesFloat64ReferenceOnAwkwardShapes) {
  KTX_SKIP_WITHOUT_GPU();
  const TensorType type = GetParam();
  const TensorTypeTraits& traits = TraitsOf(type);
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::vector<Shape> shapes = {{1, 256},    {17, 7168},   {255, 1536},
                               {576, 7168}, {2112, 2304}, {33, 18432}};
  if (traits.block_size == 32 || traits.block_size == 1) {
    shapes.push_back({5, 96});
    shapes.push_back({7, 2080});
  }
  double worst = 0.0;
  int case_index = 0;
  for (const Shape& s : shapes) {
    const Weights w = MakeWeights(type, s, rng);  // once per shape: quantizing is the slow part
    DeviceArray<uint8_t> d_w(w.raw);
    for (const int64_t n_tokens : {1, 3, 8, 11}) {
      if (n_tokens == 11 && s.n_out > 64) continue;  // keeps the host reference short
      const float beta = n_tokens == 3 ? 1.0f : (n_tokens == 1 ? 0.0f : (case_index % 2));
      const bool x_aligned = n_tokens != 3 || case_index % 3 == 0;
      worst = std::max(worst, CheckOne(type, s, w, d_w.get(), n_tokens, x_aligned, beta, rng));
      if (HasFailure()) return;
      ++case_index;
    }
  }
  std::printf(
      "[ measured ] %s: worst |error| / tolerance %.3g; tokens per pass at n_in 7168: %d, "
      "16384: %d, 18432: %d\n",
      traits.name, worst, QuantGemvTokensPerPass(type, 7168), QuantGemvTokensPerPass(type, 16384),
      QuantGemvTokensPerPass(type, 18432));
}

INSTANTIATE_TEST_SUITE_P(Types, QuantGemvTest,
                         ::testing::Values(TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K,
                                           TensorType::kQ8_0, TensorType::kQ4_0, TensorType::kQ5_0,
                                           TensorType::kIQ4_XS, TensorType::kBF16,
                                           TensorType::kF16),
                         [](const auto& info) { return std::string(TraitsOf(info.param).name); });

// The GEMV's per-element decoding, run on the host (no GPU needed): every
// piece of 8 weights of a 2048-element tile equals DequantizeRow bit for bit,
// at every 2-byte tile alignment the kernel can see in shared memory (16-byte
// alignment only for Q4_K / Q5_K, as the kernel requires).
void DecodeAny(TensorType type, const uint8_t* tile, int e, float (&w)[8]) {
  namespace gi = gemv_internal;
  switch (type) {
    case TensorType::kBF16: return gi::DecodePiece<TensorType::kBF16>(tile, e, w);
    case TensorType::kF16: return gi::DecodePiece<TensorType::kF16>(tile, e, w);
    case TensorType::kQ4_0: return gi::DecodePiece<TensorType::kQ4_0>(tile, e, w);
    case TensorType::kQ5_0: return gi::DecodePiece<TensorType::kQ5_0>(tile, e, w);
    case TensorType::kQ8_0: return gi::DecodePiece<TensorType::kQ8_0>(tile, e, w);
    case TensorType::kQ4_K: return gi::DecodePiece<TensorType::kQ4_K>(tile, e, w);
    case TensorType::kQ5_K: return gi::DecodePiece<TensorType::kQ5_K>(tile, e, w);
    case TensorType::kQ6_K: return gi::DecodePiece<TensorType::kQ6_K>(tile, e, w);
    case TensorType::kIQ4_XS: return gi::DecodePiece<TensorType::kIQ4_XS>(tile, e, w);
    default: FAIL() << "no decoder for " << TraitsOf(type).name;
  }
}

class GemvDecodeTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(GemvDecodeTest, PiecesEqualDequantizeRowBitForBit) {
  const TensorType type = GetParam();
  const TensorTypeTraits& traits = TraitsOf(type);
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << traits.name << " seed " << seed);
  std::mt19937 rng(seed);
  const int64_t n = 2048;
  const int64_t bytes = RowBytes(traits, n);
  std::vector<float> x = cuda_test::RandomF32(rng, n, 0.03f);
  for (int i = 0; i < 8; ++i) x[rng() % n] *= 25.0f;
  std::vector<uint8_t> raw(bytes);
  QuantizeRow(type, x.data(), raw.data(), n);
  // Random bytes as well: every bit pattern of the quants and scales (with
  // finite half scales) must decode alike.
  std::vector<uint8_t> noisy = raw;
  for (size_t i = 0; i < noisy.size(); ++i) {
    if (rng() % 2 == 0) noisy[i] = static_cast<uint8_t>(rng());
  }
  if (type != TensorType::kBF16 && type != TensorType::kF16) {
    // Keep the half scales finite: clear bit 14 of every d / dmin field.
    const int64_t bs = traits.type_size;
    for (int64_t b = 0; b < bytes / bs; ++b) {
      uint8_t* blk = noisy.data() + b * bs;
      if (type == TensorType::kQ6_K) {
        blk[209] &= 0xbf;
      } else {
        blk[1] &= 0xbf;
        if (type == TensorType::kQ4_K || type == TensorType::kQ5_K) blk[3] &= 0xbf;
      }
    }
  } else {
    noisy = raw;
  }
  const bool k16 = type == TensorType::kQ4_K || type == TensorType::kQ5_K;
  for (const std::vector<uint8_t>* src : {&raw, &noisy}) {
    std::vector<float> want(n);
    DequantizeRow(type, src->data(), want.data(), n);
    for (int head = 0; head < 16; head += k16 ? 16 : 2) {
      alignas(16) uint8_t buf[4096 + 32];
      ASSERT_LE(static_cast<size_t>(bytes + head), sizeof(buf));
      std::memcpy(buf + head, src->data(), bytes);
      for (int64_t e = 0; e < n; e += 8) {
        float w[8];
        DecodeAny(type, buf + head, static_cast<int>(e), w);
        for (int j = 0; j < 8; ++j) {
          uint32_t got_bits = 0, want_bits = 0;
          std::memcpy(&got_bits, &w[j], 4);
          std::memcpy(&want_bits, &want[e + j], 4);
          ASSERT_EQ(got_bits, want_bits)
              << "element " << e + j << " (tile offset " << head << ", "
              << (src == &raw ? "quantized row" : "random bytes") << "): decoded " << w[j]
              << ", DequantizeRow " << want[e + j];
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Types, GemvDecodeTest,
                         ::testing::Values(TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K,
                                           TensorType::kQ8_0, TensorType::kQ4_0, TensorType::kQ5_0,
                                           TensorType::kIQ4_XS, TensorType::kBF16,
                                           TensorType::kF16),
                         [](const auto& info) { return std::string(TraitsOf(info.param).name); });

// The direct kernel's loads and decoding (gemv_direct_decode.cuh), run on
// the host: for every chunk and lane of a row, the 4 pieces the lane decodes
// equal DequantizeRow bit for bit, and together the lanes cover every
// element of the row exactly once; pieces past the row decode to zeros. Rows of 10 K-blocks / 65
// small blocks / 2080 BF16 weights end in a partial chunk; Q6_K and Q8_0 rows (2-byte aligned
// blocks) start at every 2-byte offset mod 16.
template <TensorType T>
void CheckDirectDecode(int64_t n, const std::vector<uint8_t>& row, int head) {
  namespace gi = gemv_internal;
  std::vector<float> want(n);
  DequantizeRow(T, row.data(), want.data(), n);
  std::vector<uint8_t> buf(row.size() + 64, 0);
  uint8_t* base = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) % 16) % 16 + 16;
  std::memcpy(base + head, row.data(), row.size());
  std::vector<int> seen(n, 0);
  const int n_chunks = static_cast<int>((n + gi::kDirectChunk - 1) / gi::kDirectChunk);
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    for (int lane = 0; lane < 32; ++lane) {
      gi::DirectRaw<T> raw{};
      gi::DirectLoad<T>(base + head, static_cast<int>(n), chunk, lane, &raw);
      for (int k = 0; k < gi::kDirectPieces; ++k) {
        const int e = gi::DirectPieceElem<T>(chunk, lane, k);
        ASSERT_EQ(gi::DirectPieceValid<T>(raw, k), e < n) << "chunk " << chunk << " lane " << lane;
        float w[8];
        gi::DirectDecode<T>(raw, lane, k, w);
        if (e >= n) {  // past the row: zero weights (the kernel multiplies them without a branch)
          for (int j = 0; j < 8; ++j)
            ASSERT_EQ(w[j], 0.0f) << "chunk " << chunk << " lane " << lane;
          continue;
        }
        for (int j = 0; j < 8; ++j) {
          ++seen[e + j];
          uint32_t got_bits = 0, want_bits = 0;
          std::memcpy(&got_bits, &w[j], 4);
          std::memcpy(&want_bits, &want[e + j], 4);
          ASSERT_EQ(got_bits, want_bits)
              << "element " << e + j << " (chunk " << chunk << ", lane " << lane << ", piece " << k
              << ", row offset " << head << "): decoded " << w[j] << ", DequantizeRow "
              << want[e + j];
        }
      }
    }
  }
  for (int64_t e = 0; e < n; ++e) ASSERT_EQ(seen[e], 1) << "element " << e;
}

class GemvDirectDecodeTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(GemvDirectDecodeTest, LanePiecesEqualDequantizeRowBitForBit) {
  const TensorType type = GetParam();
  const TensorTypeTraits& traits = TraitsOf(type);
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << traits.name << " seed " << seed);
  std::mt19937 rng(seed);
  const int64_t n = traits.block_size == 256 ? 2560 : 2080;
  const int64_t bytes = RowBytes(traits, n);
  std::vector<float> x = cuda_test::RandomF32(rng, n, 0.03f);
  for (int i = 0; i < 8; ++i) x[rng() % n] *= 25.0f;
  std::vector<uint8_t> raw(bytes);
  QuantizeRow(type, x.data(), raw.data(), n);
  // Random bytes as well (finite half scales: bit 14 of d / dmin cleared).
  std::vector<uint8_t> noisy = raw;
  if (type != TensorType::kBF16) {
    for (uint8_t& b : noisy) {
      if (rng() % 2 == 0) b = static_cast<uint8_t>(rng());
    }
    const int64_t bs = traits.type_size;
    for (int64_t b = 0; b < bytes / bs; ++b) {
      uint8_t* blk = noisy.data() + b * bs;
      if (type == TensorType::kQ6_K) {
        blk[209] &= 0xbf;
      } else {
        blk[1] &= 0xbf;
        if (type == TensorType::kQ4_K) blk[3] &= 0xbf;
      }
    }
  }
  const bool aligned16 = type == TensorType::kQ4_K || type == TensorType::kBF16;
  for (const std::vector<uint8_t>* src : {&raw, &noisy}) {
    SCOPED_TRACE(src == &raw ? "quantized row" : "random bytes");
    for (int head = 0; head < 16; head += aligned16 ? 16 : 2) {
      switch (type) {
        case TensorType::kQ4_K: CheckDirectDecode<TensorType::kQ4_K>(n, *src, head); break;
        case TensorType::kQ6_K: CheckDirectDecode<TensorType::kQ6_K>(n, *src, head); break;
        case TensorType::kQ8_0: CheckDirectDecode<TensorType::kQ8_0>(n, *src, head); break;
        default: CheckDirectDecode<TensorType::kBF16>(n, *src, head); break;
      }
      if (HasFatalFailure()) return;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Types, GemvDirectDecodeTest,
                         ::testing::Values(TensorType::kQ4_K, TensorType::kQ6_K, TensorType::kQ8_0,
                                           TensorType::kBF16),
                         [](const auto& info) { return std::string(TraitsOf(info.param).name); });

// ---------------------------------------------------------------------------
// The q8 kernel (gemv_q8.h): activations quantized to int8 per block of 32,
// int8 dot products. Checked in two parts against float64 references:
//  (b) against Σ W·x̂ (x̂ = the host quantizer's dx · qx, itself checked
//      against an independent double reference): the F32 bound
//      (4 · ceil(n_in / 1024) + 16) · 2^-24 · Σ (|W| + 2|mn|) · |x̂|, sharp
//      enough that a wrong nibble, scale or block fails by orders of magnitude;
//  (a)+(b) against the exact Σ W·x: plus Σ_b amax_b / 254 · (1 + 2^-12) · Σ|W|.

// x̂ of one token row: host Q8QuantizeBlock per block of 32.
struct QuantizedAct {
  std::vector<int8_t> q;
  std::vector<float> dx;
  std::vector<int32_t> sx;
};
QuantizedAct QuantizeActHost(const uint16_t* x, int64_t n_in) {
  QuantizedAct a;
  a.q.resize(n_in);
  a.dx.resize(n_in / 32);
  a.sx.resize(n_in / 32);
  for (int64_t b = 0; b < n_in / 32; ++b) {
    float xf[32];
    for (int i = 0; i < 32; ++i) xf[i] = Bf16BitsToFloat(x[32 * b + i]);
    gemv_internal::Q8QuantizeBlock(xf, a.q.data() + 32 * b, &a.dx[b], &a.sx[b]);
  }
  return a;
}

// |dmin · m| per element for Q4_K (the row dequantized with zero quants), 0 else.
std::vector<double> MinTerms(TensorType type, const Weights& w, int64_t n_out, int64_t n_in) {
  std::vector<double> mn(static_cast<size_t>(n_out * n_in), 0.0);
  if (type != TensorType::kQ4_K) return mn;
  std::vector<uint8_t> row(w.row_bytes);
  std::vector<float> deq(n_in);
  for (int64_t r = 0; r < n_out; ++r) {
    std::memcpy(row.data(), w.raw.data() + r * w.row_bytes, w.row_bytes);
    for (int64_t b = 0; b < n_in / 256; ++b) std::memset(row.data() + 144 * b + 16, 0, 128);
    DequantizeRow(type, row.data(), deq.data(), n_in);
    for (int64_t c = 0; c < n_in; ++c) mn[r * n_in + c] = std::fabs(deq[c]);
  }
  return mn;
}

// References of one (token, row): Σ W·x̂, its F32 magnitude, Σ W·x, and the
// activation-quantization bound.
struct Q8Ref {
  double ref_q = 0, mag_q = 0, ref_x = 0, act_bound = 0;
};
Q8Ref Q8Reference(const double* wrow, const double* mnrow, const uint16_t* x, const QuantizedAct& a,
                  int64_t n_in) {
  Q8Ref r;
  for (int64_t b = 0; b < n_in / 32; ++b) {
    double amax = 0.0, wabs = 0.0;
    for (int64_t c = 32 * b; c < 32 * b + 32; ++c) {
      const double xv = Bf16BitsToFloat(x[c]);
      const double xq = static_cast<double>(a.dx[b]) * a.q[c];
      r.ref_q += wrow[c] * xq;
      r.mag_q += (std::fabs(wrow[c]) + 2.0 * mnrow[c]) * std::fabs(xq);
      r.ref_x += wrow[c] * xv;
      amax = std::max(amax, std::fabs(xv));
      wabs += std::fabs(wrow[c]);
    }
    r.act_bound += amax / 254.0 * (1.0 + std::ldexp(1.0, -12)) * wabs;
  }
  return r;
}

double Q8Roundings(int64_t n_in) { return 4.0 * static_cast<double>((n_in + 1023) / 1024) + 16; }

// The host quantizer against a float64 reference (no GPU): dx = amax / 127
// rounded once to F32, qx = round-half-even(x / dx) in [-127, 127], sx = Σ qx,
// and the per-element bound |x − dx·qx| <= amax / 254 · (1 + 2^-12).
TEST(GemvQ8Host, ActivationQuantizerMatchesFloat64Reference) {
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 400; ++trial) {
    float x[32];
    const float scale = std::ldexp(1.0f, static_cast<int>(rng() % 40) - 20);
    const std::vector<uint16_t> bits = cuda_test::RandomBf16(rng, 32, scale);
    for (int i = 0; i < 32; ++i) x[i] = Bf16BitsToFloat(bits[i]);
    if (trial % 7 == 1) x[rng() % 32] *= 100.0f;                // an outlier
    if (trial % 7 == 2) x[rng() % 32] = -x[rng() % 32];         // a negative max
    if (trial % 7 == 3) std::fill(x, x + 32, 0.0f);             // an empty block
    if (trial % 7 == 4) x[5] = x[9] = -std::fabs(x[9]) - 1.0f;  // ties of the max
    int8_t q[32];
    float dx = -1.0f;
    int32_t sx = 12345;
    gemv_internal::Q8QuantizeBlock(x, q, &dx, &sx);
    double amax = 0.0;
    for (float v : x) amax = std::max(amax, std::fabs(static_cast<double>(v)));
    const float want_dx = static_cast<float>(amax / 127.0);
    ASSERT_EQ(dx, want_dx) << "trial " << trial;
    int32_t s = 0;
    for (int i = 0; i < 32; ++i) {
      int want_q = 0;
      if (want_dx != 0.0f) {
        const double r =
            static_cast<double>(static_cast<float>(static_cast<double>(x[i]) / want_dx));
        want_q = static_cast<int>(std::nearbyint(r));
      }
      ASSERT_EQ(q[i], want_q) << "trial " << trial << " element " << i << " x " << x[i];
      ASSERT_LE(std::abs(want_q), 127);
      ASSERT_LE(std::fabs(x[i] - static_cast<double>(dx) * q[i]),
                amax / 254.0 * (1.0 + std::ldexp(1.0, -12)))
          << "trial " << trial << " element " << i;
      s += q[i];
    }
    ASSERT_EQ(sx, s);
    if (amax > 0.0) {
      int top = 0;
      for (int8_t v : q) top = std::max(top, std::abs(static_cast<int>(v)));
      EXPECT_EQ(top, 127) << "the block's max maps to ±127";
    }
  }
  EXPECT_EQ(gemv_internal::Q6Minus32(0x3f20001fu), 0x1f00e0ffu);  // 63, 32, 0, 31 minus 32
}

// One row's q8 dot products emulated on the host (no GPU): every lane of
// every chunk through DirectLoad + Q8LaneDot, lanes summed in double; checked
// against the float64 Σ W·x̂ and Σ W·x. Rows end in a partial chunk.
class GemvQ8HostTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(GemvQ8HostTest, LaneDotsMatchFloat64Reference) {
  namespace gi = gemv_internal;
  const TensorType type = GetParam();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << TraitsOf(type).name << " seed " << seed);
  std::mt19937 rng(seed);
  const Shape s{3, type == TensorType::kQ8_0 ? 2080 : 2560};
  const Weights w = MakeWeights(type, s, rng);
  const std::vector<double> mn = MinTerms(type, w, s.n_out, s.n_in);
  const std::vector<uint16_t> x = cuda_test::RandomBf16(rng, s.n_in, 1.0f);
  const QuantizedAct a = QuantizeActHost(x.data(), s.n_in);
  std::vector<uint8_t> meta(8 * a.dx.size());
  for (size_t b = 0; b < a.dx.size(); ++b) {
    std::memcpy(meta.data() + 8 * b, &a.dx[b], 4);
    std::memcpy(meta.data() + 8 * b + 4, &a.sx[b], 4);
  }
  alignas(16) static uint8_t row_buf[8192];
  ASSERT_LE(static_cast<size_t>(w.row_bytes), sizeof(row_buf));
  for (int64_t r = 0; r < s.n_out; ++r) {
    std::memcpy(row_buf, w.raw.data() + r * w.row_bytes, w.row_bytes);
    double got = 0.0;
    const int n_chunks = static_cast<int>((s.n_in + 1023) / 1024);
    for (int lane = 0; lane < 32; ++lane) {
      float acc = 0.0f;
      for (int chunk = 0; chunk < n_chunks; ++chunk) {
        auto run = [&](auto tag) {
          constexpr TensorType T = decltype(tag)::value;
          gi::DirectRaw<T> raw{};
          gi::DirectLoad<T>(row_buf, static_cast<int>(s.n_in), chunk, lane, &raw);
          acc = gi::Q8LaneDot<T>(raw, chunk, lane, a.q.data(), meta.data(), acc);
        };
        if (type == TensorType::kQ4_K) {
          run(std::integral_constant<TensorType, TensorType::kQ4_K>{});
        } else if (type == TensorType::kQ6_K) {
          run(std::integral_constant<TensorType, TensorType::kQ6_K>{});
        } else {
          run(std::integral_constant<TensorType, TensorType::kQ8_0>{});
        }
      }
      got += acc;
    }
    const Q8Ref ref =
        Q8Reference(w.wref.data() + r * s.n_in, mn.data() + r * s.n_in, x.data(), a, s.n_in);
    const double tol_q = Q8Roundings(s.n_in) * std::ldexp(1.0, -24) * ref.mag_q + 1e-30;
    EXPECT_LE(std::fabs(got - ref.ref_q), tol_q)
        << "row " << r << ": got " << got << ", Σ W·x̂ " << ref.ref_q;
    EXPECT_LE(std::fabs(got - ref.ref_x), tol_q + ref.act_bound)
        << "row " << r << ": got " << got << ", Σ W·x " << ref.ref_x;
  }
}

INSTANTIATE_TEST_SUITE_P(Types, GemvQ8HostTest,
                         ::testing::Values(TensorType::kQ4_K, TensorType::kQ6_K, TensorType::kQ8_0),
                         [](const auto& info) { return std::string(TraitsOf(info.param).name); });

// The q8 kernel on the GPU through QuantGemv's workspace overload
// (KTX_GEMV_KERNEL=q8[:U]): the device quantizer equals the host one bit for
// bit; y within the two bounds above; batch invariance: each token of a
// multi-token call equals, bit for bit, a 1-token call on that token alone.
class Q8GemvTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(Q8GemvTest, MatchesFloat64ReferenceAndIsBatchInvariant) {
  KTX_SKIP_WITHOUT_GPU();
  const TensorType type = GetParam();
  const uint32_t seed = cuda_test::FreshSeed();
  SCOPED_TRACE(testing::Message() << TraitsOf(type).name << " seed " << seed);
  std::mt19937 rng(seed);
  std::vector<Shape> shapes = {{1, 256}, {17, 7168}, {255, 1536}, {576, 7168}, {2112, 2304}};
  if (type == TensorType::kQ8_0) shapes.push_back({7, 2080});
  const GemvKernelChoice saved = CurrentGemvKernel();
  double worst_q = 0.0, worst_x = 0.0;
  for (const Shape& s : shapes) {
    const Weights w = MakeWeights(type, s, rng);
    const std::vector<double> mn = MinTerms(type, w, s.n_out, s.n_in);
    DeviceArray<uint8_t> d_w(w.raw);
    for (const int64_t n_tokens : {1, 3, 8, 11}) {
      if (n_tokens == 11 && s.n_out > 64) continue;
      SCOPED_TRACE(testing::Message()
                   << "n_out " << s.n_out << " n_in " << s.n_in << " n_tokens " << n_tokens);
      const bool x_aligned = n_tokens != 3;
      const int64_t ldx = s.n_in + (x_aligned ? 8 : 3);
      const int64_t ldy = s.n_out + 5;
      const float beta = n_tokens == 3 ? 1.0f : 0.0f;
      const std::vector<uint16_t> x = cuda_test::RandomBf16(rng, n_tokens * ldx, 1.0f);
      std::vector<float> y0 = cuda_test::RandomF32(rng, n_tokens * ldy, 1.0f);
      if (beta == 0.0f) {
        const uint32_t nan_bits = 0x7fc00001u;
        for (float& v : y0) std::memcpy(&v, &nan_bits, 4);
      }
      for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t r = s.n_out; r < ldy; ++r) y0[t * ldy + r] = -12345.0f;
      }
      DeviceArray<uint16_t> d_x(x);
      const auto* xb = reinterpret_cast<const __nv_bfloat16*>(d_x.get());
      const size_t ws_bytes = QuantGemvWorkspaceBytes(s.n_in, n_tokens);
      ASSERT_EQ(ws_bytes, Q8GemvWorkspaceBytes(s.n_in, n_tokens));
      DeviceArray<uint8_t> d_ws(ws_bytes);
      // The device quantizer against the host one.
      std::vector<QuantizedAct> acts;
      for (int64_t t = 0; t < n_tokens; ++t) acts.push_back(QuantizeActHost(&x[t * ldx], s.n_in));
      ASSERT_EQ(QuantizeActivationsQ8(xb, ldx, n_tokens, s.n_in, d_ws.get(), ws_bytes, nullptr),
                cudaSuccess);
      {
        const std::vector<uint8_t> ws = d_ws.Download();
        const int64_t meta0 = (n_tokens * s.n_in + 15) / 16 * 16;
        for (int64_t t = 0; t < n_tokens; ++t) {
          ASSERT_EQ(std::memcmp(ws.data() + t * s.n_in, acts[t].q.data(), s.n_in), 0)
              << "qx of token " << t;
          for (int64_t b = 0; b < s.n_in / 32; ++b) {
            float dx = 0.0f;
            int32_t sx = 0;
            std::memcpy(&dx, ws.data() + meta0 + 8 * (t * (s.n_in / 32) + b), 4);
            std::memcpy(&sx, ws.data() + meta0 + 8 * (t * (s.n_in / 32) + b) + 4, 4);
            ASSERT_EQ(dx, acts[t].dx[b]) << "dx of token " << t << " block " << b;
            ASSERT_EQ(sx, acts[t].sx[b]) << "sx of token " << t << " block " << b;
          }
        }
      }
      std::vector<Q8Ref> refs(n_tokens * s.n_out);
      for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t r = 0; r < s.n_out; ++r) {
          Q8Ref& q = refs[t * s.n_out + r];
          q = Q8Reference(w.wref.data() + r * s.n_in, mn.data() + r * s.n_in, &x[t * ldx], acts[t],
                          s.n_in);
          if (beta != 0.0f) {
            const double by = beta * static_cast<double>(y0[t * ldy + r]);
            q.ref_q += by;
            q.ref_x += by;
            q.mag_q += std::fabs(by);
          }
        }
      }
      for (const char* spec : {"q8:1", "q8:2", "q8:4"}) {
        SCOPED_TRACE(spec);
        GemvKernelChoice choice;
        ASSERT_TRUE(ParseGemvKernel(spec, &choice));
        SetGemvKernel(choice);
        DeviceArray<float> d_y(y0);
        ASSERT_EQ(QuantGemv(type, d_w.get(), w.row_bytes, s.n_out, s.n_in, xb, ldx, n_tokens,
                            d_y.get(), ldy, beta, d_ws.get(), ws_bytes, nullptr),
                  cudaSuccess);
        const std::vector<float> got = d_y.Download();
        int failures = 0;
        const double unit = Q8Roundings(s.n_in) * std::ldexp(1.0, -24);
        for (int64_t t = 0; t < n_tokens; ++t) {
          for (int64_t r = 0; r < ldy; ++r) {
            const float g = got[t * ldy + r];
            if (r >= s.n_out) {
              if (g != -12345.0f && ++failures <= 5) {
                ADD_FAILURE() << "y padding overwritten at token " << t << " column " << r;
              }
              continue;
            }
            const Q8Ref& q = refs[t * s.n_out + r];
            const double tol_q = unit * q.mag_q + 1e-30;
            const double err_q = std::fabs(g - q.ref_q), err_x = std::fabs(g - q.ref_x);
            if (!(err_q <= tol_q) || !(err_x <= tol_q + q.act_bound)) {
              if (++failures <= 5) {
                ADD_FAILURE() << "token " << t << " row " << r << ": got " << g << ", Σ W·x̂ "
                              << q.ref_q << " (error " << err_q << ", tolerance " << tol_q
                              << "), Σ W·x " << q.ref_x << " (error " << err_x << ", tolerance "
                              << tol_q + q.act_bound << ")";
              }
            } else {
              worst_q = std::max(worst_q, err_q / tol_q);
              worst_x = std::max(worst_x, err_x / (tol_q + q.act_bound));
            }
          }
        }
        if (failures > 5) ADD_FAILURE() << failures << " mismatches in all (first 5 shown)";
        // Batch invariance: every token alone (its own workspace contents).
        for (int64_t t = 0; t < n_tokens && n_tokens > 1; ++t) {
          DeviceArray<float> d_y1(y0);
          ASSERT_EQ(QuantGemv(type, d_w.get(), w.row_bytes, s.n_out, s.n_in, xb + t * ldx, ldx, 1,
                              d_y1.get() + t * ldy, ldy, beta, d_ws.get(), ws_bytes, nullptr),
                    cudaSuccess);
          const std::vector<float> one = d_y1.Download();
          ASSERT_EQ(std::memcmp(one.data() + t * ldy, got.data() + t * ldy, 4 * s.n_out), 0)
              << "token " << t << " differs between the " << n_tokens
              << "-token call and a 1-token call";
        }
        if (HasFailure()) {
          SetGemvKernel(saved);
          return;
        }
      }
    }
  }
  SetGemvKernel(saved);
  std::printf("[ measured ] q8 %s: worst |error| / tolerance vs Σ W·x̂ %.3g, vs Σ W·x %.3g\n",
              TraitsOf(type).name, worst_q, worst_x);
}

INSTANTIATE_TEST_SUITE_P(Types, Q8GemvTest,
                         ::testing::Values(TensorType::kQ4_K, TensorType::kQ6_K, TensorType::kQ8_0),
                         [](const auto& info) { return std::string(TraitsOf(info.param).name); });

// Kernel choice strings (KTX_GEMV_KERNEL) and which rows the direct kernel takes.
TEST(GemvKernelChoice, ParsesSpecsAndRejectsOthers) {
  GemvKernelChoice c;
  ASSERT_TRUE(ParseGemvKernel("ring", &c));
  EXPECT_EQ(c.kernel, GemvKernel::kRing);
  ASSERT_TRUE(ParseGemvKernel("direct:4", &c));
  EXPECT_EQ(c.kernel, GemvKernel::kDirect);
  EXPECT_EQ(c.direct.unroll, 4);
  EXPECT_EQ(c.direct.rows_per_warp, 1);
  ASSERT_TRUE(ParseGemvKernel("direct:2:2", &c));
  EXPECT_EQ(c.direct.unroll, 2);
  EXPECT_EQ(c.direct.rows_per_warp, 2);
  ASSERT_TRUE(ParseGemvKernel("direct", &c));
  EXPECT_EQ(c.kernel, GemvKernel::kDirect);
  for (const char* bad : {"", "rin", "direct:3", "direct:4:2", "direct:", "direct:2:", "directx",
                          "direct:2:2:2", "direct:-1"}) {
    GemvKernelChoice d;
    d.kernel = GemvKernel::kRing;
    EXPECT_FALSE(ParseGemvKernel(bad, &d)) << bad;
    EXPECT_EQ(d.kernel, GemvKernel::kRing) << bad << ": untouched on failure";
  }
  ASSERT_TRUE(ParseGemvKernel("q8", &c));
  EXPECT_EQ(c.kernel, GemvKernel::kQ8);
  ASSERT_TRUE(ParseGemvKernel("q8:4", &c));
  EXPECT_EQ(c.kernel, GemvKernel::kQ8);
  EXPECT_EQ(c.direct.unroll, 4);
  for (const char* bad : {"q8:3", "q8:", "q8x", "q8:2:2"}) {
    GemvKernelChoice d;
    EXPECT_FALSE(ParseGemvKernel(bad, &d)) << bad;
  }
  const GemvKernelChoice saved = CurrentGemvKernel();
  SetGemvKernel(c);
  EXPECT_EQ(CurrentGemvKernel().kernel, GemvKernel::kQ8);
  EXPECT_EQ(CurrentGemvKernel().direct.unroll, 4);
  ASSERT_TRUE(ParseGemvKernel("direct:2:2", &c));
  GemvKernelChoice ring;
  ring.kernel = GemvKernel::kRing;
  SetGemvKernel(ring);
  EXPECT_EQ(CurrentGemvKernel().kernel, GemvKernel::kRing);
  SetGemvKernel(c);
  EXPECT_EQ(CurrentGemvKernel().kernel, GemvKernel::kDirect);
  EXPECT_EQ(CurrentGemvKernel().direct.unroll, c.direct.unroll);
  SetGemvKernel(saved);

  EXPECT_TRUE(CanDirectGemv(TensorType::kQ4_K, 144 * 28));
  EXPECT_FALSE(CanDirectGemv(TensorType::kQ4_K, 144 * 28 + 8));
  EXPECT_TRUE(CanDirectGemv(TensorType::kQ6_K, 210 * 6));
  EXPECT_TRUE(CanDirectGemv(TensorType::kQ8_0, 34 * 3));
  EXPECT_FALSE(CanDirectGemv(TensorType::kBF16, 2 * 36));
  EXPECT_FALSE(CanDirectGemv(TensorType::kQ5_K, 176));
  EXPECT_TRUE(CanQ8Gemv(TensorType::kQ4_K, 144 * 28));
  EXPECT_FALSE(CanQ8Gemv(TensorType::kQ4_K, 144 * 28 + 8));
  EXPECT_TRUE(CanQ8Gemv(TensorType::kQ6_K, 210 * 6));
  EXPECT_TRUE(CanQ8Gemv(TensorType::kQ8_0, 34 * 3));
  EXPECT_FALSE(CanQ8Gemv(TensorType::kBF16, 2 * 256));
  EXPECT_EQ(Q8GemvWorkspaceBytes(7168, 8), size_t{7168 * 8 + 8 * 224 * 8});
  EXPECT_EQ(Q8GemvWorkspaceBytes(32, 3), size_t{96 + 3 * 8});
  EXPECT_EQ(Q8GemvWorkspaceBytes(256, 0), size_t{0});
}

// Zero tokens / zero rows are no-ops; y is untouched.
TEST(QuantGemvEdges, EmptyProductsLaunchNothing) {
  EXPECT_EQ(QuantGemv(TensorType::kQ4_K, nullptr, 144, 0, 256, nullptr, 256, 1, nullptr, 0, 0.0f,
                      nullptr),
            cudaSuccess);
  EXPECT_EQ(QuantGemv(TensorType::kQ4_K, nullptr, 144, 4, 256, nullptr, 256, 0, nullptr, 4, 0.0f,
                      nullptr),
            cudaSuccess);
}

// Argument checks happen before any launch: no GPU needed.
TEST(QuantGemvEdges, RejectsUnsupportedTypesAndShapes) {
  EXPECT_TRUE(CanQuantGemv(TensorType::kQ4_K));
  EXPECT_TRUE(CanQuantGemv(TensorType::kQ8_0));
  EXPECT_FALSE(CanQuantGemv(TensorType::kQ2_K));
  EXPECT_FALSE(CanQuantGemv(TensorType::kF32));
  void* fake = reinterpret_cast<void*>(uintptr_t{4096});
  auto* xb = reinterpret_cast<const __nv_bfloat16*>(fake);
  float* y = reinterpret_cast<float*>(fake);
  const auto call = [&](TensorType type, const void* w, int64_t row_bytes, int64_t n_out,
                        int64_t n_in, int64_t ldx, int64_t ldy) {
    return QuantGemv(type, w, row_bytes, n_out, n_in, xb, ldx, 1, y, ldy, 0.0f, nullptr);
  };
  EXPECT_EQ(call(TensorType::kQ2_K, fake, 84, 1, 256, 256, 1), cudaErrorInvalidValue)
      << "unsupported type";
  EXPECT_EQ(call(TensorType::kQ4_K, fake, 144, 1, 100, 100, 1), cudaErrorInvalidValue)
      << "n_in not a multiple of the block";
  EXPECT_EQ(call(TensorType::kQ8_0, fake, 34, 1, 48, 48, 1), cudaErrorInvalidValue)
      << "n_in not a multiple of 32";
  EXPECT_EQ(call(TensorType::kQ4_K, fake, 143, 1, 256, 256, 1), cudaErrorInvalidValue)
      << "row_bytes below the row's bytes";
  EXPECT_EQ(call(TensorType::kQ4_K, fake, 152, 1, 256, 256, 1), cudaErrorInvalidValue)
      << "Q4_K rows must be 16-byte multiples";
  EXPECT_EQ(call(TensorType::kQ8_0, reinterpret_cast<void*>(uintptr_t{4104}), 34, 1, 32, 32, 1),
            cudaErrorInvalidValue)
      << "weights not 16-byte aligned";
  EXPECT_EQ(call(TensorType::kQ8_0, fake, 34, 1, 32, 16, 1), cudaErrorInvalidValue) << "ldx < n_in";
  EXPECT_EQ(call(TensorType::kQ8_0, fake, 34, 4, 32, 32, 3), cudaErrorInvalidValue)
      << "ldy < n_out";
}

}  // namespace
}  // namespace ktx::kernels::cuda
