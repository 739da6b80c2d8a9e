// File: runtime/synth/random_blocks.h
//
// Random tensor data for synthetic models, written directly in the storage
// type: quantized types get random VALID blocks (random quants, block scales
// chosen so that the dequantized values have the requested standard
// deviation and about zero mean), float types get approximately normal
// values. Nothing is quantized from floats, so this runs at memory speed.
//
// Determinism: a counter-based RNG. Every block (every group of 16 elements
// for float types) draws from its own stream, seeded by hashing the tensor
// key with the block's index in the tensor. The bytes of a row therefore do
// not depend on which rows are generated together, in what order, or on how
// many threads share the work.
//
//   const uint64_t key = TensorKey(seed, plan.name);
//   KTX_RETURN_IF_ERROR(FillTensorRows(plan, key, row0, n_rows, dst));
//
// Supported types: F32, F16, BF16, Q8_0, Q5_0, Q4_K, Q6_K (every type the
// Q4_K_M / Q8_0 / BF16 mixes of synth_plan.h can choose).
// Thread-safe: pure functions; callers give each thread its own rows.
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "kernels/common/tensor_type.h"
#include "runtime/synth/synth_plan.h"

namespace ktx::synth {

// splitmix64's output function: a bijective 64-bit mix.
inline uint64_t Mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The RNG stream of one block: splitmix64 from a per-block seed.
class BlockRng {
 public:
  BlockRng(uint64_t tensor_key, uint64_t block_index)
      : state_(Mix64(tensor_key ^ Mix64(block_index))) {}
  uint64_t Next() {
    state_ += 0x9E3779B97F4A7C15ull;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1).
  float Uniform() { return static_cast<float>(Next() >> 40) * 0x1.0p-24f; }
  // Approximately N(0, 1): sum of four 16-bit uniforms, centred and scaled
  // (Irwin-Hall, |z| <= 2 sqrt(3)).
  float Normal();

 private:
  uint64_t state_;
};

// The key of a tensor's streams: FNV-1a of the name, mixed with the seed.
uint64_t TensorKey(uint64_t seed, std::string_view tensor_name);

// The types FillTensorRows can generate.
bool CanGenerate(kernels::TensorType type);

// Fills rows [row0, row0 + n_rows) of `tensor` (a row is tensor.ne[0]
// elements of tensor.type; dst holds n_rows * tensor.row_bytes() bytes) with
// its Init (ones, or random values of standard deviation tensor.std).
// InvalidArgument for a type CanGenerate() rejects or rows out of range.
absl::Status FillTensorRows(const TensorPlan& tensor, uint64_t tensor_key, int64_t row0,
                            int64_t n_rows, uint8_t* dst);

}  // namespace ktx::synth
