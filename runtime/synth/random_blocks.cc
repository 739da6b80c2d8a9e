#include "runtime/synth/random_blocks.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/quant/blocks.h"
#include "kernels/cpu/quant/quant.h"

namespace ktx::synth {
namespace {

using kernels::TensorType;

constexpr int64_t kFloatGroup = 16;  // elements per RNG stream for float types

// Standard deviation of a uniform integer on [0, n): sqrt((n^2 - 1) / 12).
constexpr float UniformIntStd(int n) {
  return static_cast<float>(__builtin_sqrt((static_cast<double>(n) * n - 1.0) / 12.0));
}

void FillRandomBytes(BlockRng& rng, uint8_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t r = rng.Next();
    std::memcpy(dst + i, &r, 8);
  }
  if (i < n) {
    const uint64_t r = rng.Next();
    std::memcpy(dst + i, &r, n - i);
  }
}

// A block scale of `std_target / level_std`, varied by +-15 % between blocks
// so that blocks differ as in real files.
float BlockScale(BlockRng& rng, float std_target, float level_std) {
  return std_target / level_std * (0.85f + 0.3f * rng.Uniform());
}

void GenQ8_0(BlockRng& rng, float std, kernels::BlockQ8_0* b) {
  // q uniform on [-127, 127].
  b->d = kernels::FloatToHalf(BlockScale(rng, std, UniformIntStd(255)));
  uint8_t bytes[32];
  FillRandomBytes(rng, bytes, 32);
  for (int j = 0; j < 32; ++j) b->qs[j] = static_cast<int8_t>(bytes[j] % 255 - 127);
}

void GenQ5_0(BlockRng& rng, float std, kernels::BlockQ5_0* b) {
  // q uniform on [0, 31], value (q - 16) d.
  b->d = kernels::FloatToHalf(BlockScale(rng, std, UniformIntStd(32)));
  FillRandomBytes(rng, b->qh, 4);
  FillRandomBytes(rng, b->qs, 16);
}

void GenQ4K(BlockRng& rng, float std, kernels::BlockQ4K* b) {
  // Sub-block j: y = d sc_j q - dmin m_j, q uniform on [0, 15]. With
  // dmin = 7.5 d and m_j = sc_j the sub-block mean is 0 and its standard
  // deviation d sc_j * 4.61; sc_j uniform on [40, 63].
  const float d = BlockScale(rng, std, UniformIntStd(16) * 51.5f);
  b->d = kernels::FloatToHalf(d);
  b->dmin = kernels::FloatToHalf(7.5f * d);
  int sc[8], m[8];
  const uint64_t r = rng.Next();
  for (int j = 0; j < 8; ++j) {
    sc[j] = 40 + static_cast<int>(((r >> (8 * j)) & 0xFF) % 24);
    m[j] = sc[j];
  }
  for (int j = 0; j < 4; ++j) {
    b->scales[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    b->scales[j + 4] = static_cast<uint8_t>(m[j] | ((m[j + 4] >> 4) << 6));
    b->scales[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
  }
  FillRandomBytes(rng, b->qs, 128);
}

void GenQ6K(BlockRng& rng, float std, kernels::BlockQ6K* b) {
  // y = d sc_i (q - 32), q uniform on [0, 63]; sc_i uniform on [64, 127].
  b->d = kernels::FloatToHalf(BlockScale(rng, std, UniformIntStd(64) * 95.5f));
  FillRandomBytes(rng, b->ql, 128);
  FillRandomBytes(rng, b->qh, 64);
  uint8_t s[16];
  FillRandomBytes(rng, s, 16);
  for (int i = 0; i < 16; ++i) b->scales[i] = static_cast<int8_t>(64 + (s[i] & 63));
}

template <typename Block, typename Gen>
void FillBlocks(const TensorPlan& t, uint64_t key, int64_t row0, int64_t n_rows, uint8_t* dst,
                Gen gen) {
  const int64_t blocks_per_row = t.ne[0] / Block::kBlockElements;
  Block* out = reinterpret_cast<Block*>(dst);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t first = (row0 + r) * blocks_per_row;
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      BlockRng rng(key, static_cast<uint64_t>(first + b));
      gen(rng, t.std, out++);
    }
  }
}

template <typename Store>
void FillFloats(const TensorPlan& t, uint64_t key, int64_t row0, int64_t n_rows, Store store) {
  const int64_t ne0 = t.ne[0];
  const int64_t groups_per_row = (ne0 + kFloatGroup - 1) / kFloatGroup;
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t g = 0; g < groups_per_row; ++g) {
      BlockRng rng(key, static_cast<uint64_t>((row0 + r) * groups_per_row + g));
      const int64_t end = std::min(ne0, (g + 1) * kFloatGroup);
      for (int64_t i = g * kFloatGroup; i < end; ++i) {
        const float v = t.init == Init::kOnes ? 1.0f : t.std * rng.Normal();
        store(r * ne0 + i, v);
      }
    }
  }
}

}  // namespace

float BlockRng::Normal() {
  const uint64_t r = Next();
  const float s =
      static_cast<float>((r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48)) *
      (1.0f / 65536.0f);
  return (s - 2.0f) * 1.7320508f;
}

uint64_t TensorKey(uint64_t seed, std::string_view tensor_name) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (char c : tensor_name) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001B3ull;
  }
  return Mix64(h ^ Mix64(seed));
}

bool CanGenerate(TensorType type) {
  switch (type) {
    case TensorType::kF32:
    case TensorType::kF16:
    case TensorType::kBF16:
    case TensorType::kQ8_0:
    case TensorType::kQ5_0:
    case TensorType::kQ4_K:
    case TensorType::kQ6_K: return true;
    default: return false;
  }
}

absl::Status FillTensorRows(const TensorPlan& t, uint64_t key, int64_t row0, int64_t n_rows,
                            uint8_t* dst) {
  if (!CanGenerate(t.type)) {
    return absl::InvalidArgumentError(absl::StrCat("synth: tensor '", t.name, "' has type ",
                                                   kernels::TraitsOf(t.type).name,
                                                   ", which the generator cannot write"));
  }
  if (row0 < 0 || n_rows < 0 || row0 + n_rows > t.n_rows()) {
    return absl::InvalidArgumentError(absl::StrCat("synth: rows [", row0, ", ", row0 + n_rows,
                                                   ") outside tensor '", t.name, "' of ",
                                                   t.n_rows(), " rows"));
  }
  if (t.init == Init::kOnes && t.type != TensorType::kF32 && t.type != TensorType::kF16 &&
      t.type != TensorType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("synth: tensor '", t.name, "': ones are only written as float types"));
  }
  switch (t.type) {
    case TensorType::kF32:
      FillFloats(t, key, row0, n_rows,
                 [dst](int64_t i, float v) { std::memcpy(dst + 4 * i, &v, 4); });
      break;
    case TensorType::kF16:
      FillFloats(t, key, row0, n_rows, [dst](int64_t i, float v) {
        const uint16_t h = kernels::FloatToHalf(v);
        std::memcpy(dst + 2 * i, &h, 2);
      });
      break;
    case TensorType::kBF16:
      FillFloats(t, key, row0, n_rows, [dst](int64_t i, float v) {
        const uint16_t h = kernels::FloatToBf16(v);
        std::memcpy(dst + 2 * i, &h, 2);
      });
      break;
    case TensorType::kQ8_0:
      FillBlocks<kernels::BlockQ8_0>(t, key, row0, n_rows, dst, GenQ8_0);
      break;
    case TensorType::kQ5_0:
      FillBlocks<kernels::BlockQ5_0>(t, key, row0, n_rows, dst, GenQ5_0);
      break;
    case TensorType::kQ4_K: FillBlocks<kernels::BlockQ4K>(t, key, row0, n_rows, dst, GenQ4K); break;
    case TensorType::kQ6_K: FillBlocks<kernels::BlockQ6K>(t, key, row0, n_rows, dst, GenQ6K); break;
    default: break;
  }
  return absl::OkStatus();
}

}  // namespace ktx::synth
