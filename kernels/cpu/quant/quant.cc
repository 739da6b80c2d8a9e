// File: kernels/cpu/quant/quant.cc
//
// Type dispatch for the scalar reference conversions (quant.h); the formats
// themselves live in quant_float.cc, quant_legacy.cc, quant_k.cc and
// quant_iq4.cc.
#include "kernels/cpu/quant/quant.h"

#include <cstdint>
#include <cstring>

#include "kernels/cpu/quant/quant_internal.h"

namespace ktx::kernels {
namespace {

using namespace quant_internal;  // NOLINT(build/namespaces): internal entry points

// Number of blocks in a row of n elements of `type`; aborts on a bad n or a
// misaligned pointer (programmer errors: callers validate shapes).
int64_t BlockCount(TensorType type, const void* data, int64_t n) {
  const TensorTypeTraits& t = TraitsOf(type);
  KTX_QUANT_CHECK(n >= 0 && n % t.block_size == 0);
  const uintptr_t align = type == TensorType::kQ8_K ? 4 : (type == TensorType::kF32 ? 4 : 2);
  KTX_QUANT_CHECK(reinterpret_cast<uintptr_t>(data) % align == 0);
  return n / t.block_size;
}

template <typename Block>
const Block* As(const void* p) {
  return static_cast<const Block*>(p);
}

template <typename Block>
Block* AsMut(void* p) {
  return static_cast<Block*>(p);
}

}  // namespace

bool CanDequantize(TensorType type) {
  const std::optional<TensorTypeTraits> t = GetTensorTypeTraits(static_cast<uint32_t>(type));
  return t.has_value() && t->supported;
}

void DequantizeRow(TensorType type, const void* src, float* dst, int64_t n) {
  const int64_t nb = BlockCount(type, src, n);
  switch (type) {
    case TensorType::kF32: std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); return;
    case TensorType::kF16: {
      const uint16_t* h = As<uint16_t>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = HalfToFloat(h[i]);
      return;
    }
    case TensorType::kBF16: {
      const uint16_t* h = As<uint16_t>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(h[i]);
      return;
    }
    case TensorType::kQ4_0: return DequantizeQ4_0(As<BlockQ4_0>(src), dst, nb);
    case TensorType::kQ5_0: return DequantizeQ5_0(As<BlockQ5_0>(src), dst, nb);
    case TensorType::kQ8_0: return DequantizeQ8_0(As<BlockQ8_0>(src), dst, nb);
    case TensorType::kQ4_K: return DequantizeQ4K(As<BlockQ4K>(src), dst, nb);
    case TensorType::kQ5_K: return DequantizeQ5K(As<BlockQ5K>(src), dst, nb);
    case TensorType::kQ6_K: return DequantizeQ6K(As<BlockQ6K>(src), dst, nb);
    case TensorType::kQ8_K: return DequantizeQ8K(As<BlockQ8K>(src), dst, nb);
    case TensorType::kIQ4_XS: return DequantizeIQ4XS(As<BlockIQ4XS>(src), dst, nb);
    default: break;
  }
  std::fprintf(stderr, "ktx: DequantizeRow: unsupported tensor type %s\n", TraitsOf(type).name);
  std::abort();
}

double DotRowReference(TensorType type, const void* w, const float* x, int64_t n) {
  const int64_t nb = BlockCount(type, w, n);
  double sum = 0.0;
  switch (type) {
    case TensorType::kF32: {
      const float* f = As<float>(w);
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(f[i]) * x[i];
      return sum;
    }
    case TensorType::kF16: {
      const uint16_t* h = As<uint16_t>(w);
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(HalfToFloat(h[i])) * x[i];
      return sum;
    }
    case TensorType::kBF16: {
      const uint16_t* h = As<uint16_t>(w);
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(Bf16ToFloat(h[i])) * x[i];
      return sum;
    }
    default: break;
  }
  // Block types: dequantize one block at a time (exactly DequantizeRow's
  // floats), accumulate in double.
  const TensorTypeTraits& t = TraitsOf(type);
  const uint8_t* p = As<uint8_t>(w);
  float buf[256];
  for (int64_t b = 0; b < nb; ++b, p += t.type_size, x += t.block_size) {
    DequantizeRow(type, p, buf, t.block_size);
    for (int64_t i = 0; i < t.block_size; ++i) sum += static_cast<double>(buf[i]) * x[i];
  }
  return sum;
}

void QuantizeRow(TensorType type, const float* src, void* dst, int64_t n) {
  const int64_t nb = BlockCount(type, dst, n);
  switch (type) {
    case TensorType::kF32: std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); return;
    case TensorType::kF16: {
      uint16_t* h = AsMut<uint16_t>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = FloatToHalf(src[i]);
      return;
    }
    case TensorType::kBF16: {
      uint16_t* h = AsMut<uint16_t>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = FloatToBf16(src[i]);
      return;
    }
    case TensorType::kQ4_0: return QuantizeQ4_0(src, AsMut<BlockQ4_0>(dst), nb);
    case TensorType::kQ5_0: return QuantizeQ5_0(src, AsMut<BlockQ5_0>(dst), nb);
    case TensorType::kQ8_0: return QuantizeQ8_0(src, AsMut<BlockQ8_0>(dst), nb);
    case TensorType::kQ4_K: return QuantizeQ4K(src, AsMut<BlockQ4K>(dst), nb);
    case TensorType::kQ5_K: return QuantizeQ5K(src, AsMut<BlockQ5K>(dst), nb);
    case TensorType::kQ6_K: return QuantizeQ6K(src, AsMut<BlockQ6K>(dst), nb);
    case TensorType::kQ8_K: return QuantizeQ8K(src, AsMut<BlockQ8K>(dst), nb);
    case TensorType::kIQ4_XS: return QuantizeIQ4XS(src, AsMut<BlockIQ4XS>(dst), nb);
    default: break;
  }
  std::fprintf(stderr, "ktx: QuantizeRow: unsupported tensor type %s\n", TraitsOf(type).name);
  std::abort();
}

TensorType VecDotType(TensorType weight_type) {
  switch (weight_type) {
    case TensorType::kF32:
    case TensorType::kF16:
    case TensorType::kBF16: return weight_type;
    case TensorType::kQ4_0:
    case TensorType::kQ5_0:
    case TensorType::kQ8_0: return TensorType::kQ8_0;
    case TensorType::kQ4_K:
    case TensorType::kQ5_K:
    case TensorType::kQ6_K:
    case TensorType::kIQ4_XS: return TensorType::kQ8_K;
    default: break;
  }
  std::fprintf(stderr, "ktx: VecDotType: unsupported tensor type %s\n", TraitsOf(weight_type).name);
  std::abort();
}

void QuantizeRowQ8_0(const float* x, BlockQ8_0* y, int64_t n) {
  QuantizeQ8_0Activation(x, y, BlockCount(TensorType::kQ8_0, y, n));
}

void QuantizeRowQ8K(const float* x, BlockQ8K* y, int64_t n) {
  QuantizeRow(TensorType::kQ8_K, x, y, n);
}

void QuantizeActivationRow(TensorType weight_type, const float* x, void* dst, int64_t n) {
  const TensorType act = VecDotType(weight_type);
  if (act == TensorType::kQ8_0) return QuantizeRowQ8_0(x, AsMut<BlockQ8_0>(dst), n);
  QuantizeRow(act, x, dst, n);
}

float DotRowQuantizedReference(TensorType weight_type, const void* w, const void* x, int64_t n) {
  const int64_t nb = BlockCount(weight_type, w, n);
  BlockCount(VecDotType(weight_type), x, n);
  double sum = 0.0;
  switch (weight_type) {
    case TensorType::kF32: {
      const float* a = As<float>(w);
      const float* b = As<float>(x);
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(a[i]) * b[i];
      break;
    }
    case TensorType::kF16: {
      const uint16_t* a = As<uint16_t>(w);
      const uint16_t* b = As<uint16_t>(x);
      for (int64_t i = 0; i < n; ++i) {
        sum += static_cast<double>(HalfToFloat(a[i])) * HalfToFloat(b[i]);
      }
      break;
    }
    case TensorType::kBF16: {
      const uint16_t* a = As<uint16_t>(w);
      const uint16_t* b = As<uint16_t>(x);
      for (int64_t i = 0; i < n; ++i) {
        sum += static_cast<double>(Bf16ToFloat(a[i])) * Bf16ToFloat(b[i]);
      }
      break;
    }
    case TensorType::kQ4_0: sum = DotQ4_0Q8_0(As<BlockQ4_0>(w), As<BlockQ8_0>(x), nb); break;
    case TensorType::kQ5_0: sum = DotQ5_0Q8_0(As<BlockQ5_0>(w), As<BlockQ8_0>(x), nb); break;
    case TensorType::kQ8_0: sum = DotQ8_0Q8_0(As<BlockQ8_0>(w), As<BlockQ8_0>(x), nb); break;
    case TensorType::kQ4_K: sum = DotQ4KQ8K(As<BlockQ4K>(w), As<BlockQ8K>(x), nb); break;
    case TensorType::kQ5_K: sum = DotQ5KQ8K(As<BlockQ5K>(w), As<BlockQ8K>(x), nb); break;
    case TensorType::kQ6_K: sum = DotQ6KQ8K(As<BlockQ6K>(w), As<BlockQ8K>(x), nb); break;
    case TensorType::kIQ4_XS: sum = DotIQ4XSQ8K(As<BlockIQ4XS>(w), As<BlockQ8K>(x), nb); break;
    default:
      std::fprintf(stderr, "ktx: DotRowQuantizedReference: unsupported tensor type %s\n",
                   TraitsOf(weight_type).name);
      std::abort();
  }
  return static_cast<float>(sum);
}

}  // namespace ktx::kernels
