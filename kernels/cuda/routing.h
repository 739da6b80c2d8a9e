// File: kernels/cuda/routing.h
//
// The Mixture-of-Experts router's selection on the GPU, with exactly the rules
// of runtime/models/moe.h RouteFromLogits (DeepSeek-V3 / llama.cpp): gating
// (sigmoid or softmax, in double), selection-only bias, group-limited top-k
// (group score = sum of the two best biased scores of a group; the best
// n_group_used groups are kept), top-k by biased score with ties to the lower
// expert id and NaN as -inf, weights from the unbiased probabilities,
// normalisation with the 6.103515625e-5 clamp and scaling unless the scale is
// 0 or 1. The router's matrix product is not part of this kernel (cuBLAS F32).
//
// Thread-safety: launchers are reentrant; they never allocate.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ktx::kernels::cuda {

struct RoutingConfig {
  int32_t n_expert = 0;       // E, at most 1024
  int32_t n_expert_used = 0;  // K, at most E and at most 32
  int32_t n_group = 0;        // 0 or 1: no group limit; else divides E, at most 64
  int32_t n_group_used = 0;
  bool sigmoid = true;         // false: softmax over all experts
  bool norm_weights = false;   // w /= max(Σ w, 6.103515625e-5)
  float weights_scale = 0.0f;  // w *= scale unless 0 or 1
};

// logits: F32 [n_tokens, logits_stride] (device); bias: F32 [n_expert] or null.
// Writes ids I32 [n_tokens, K] and weights F32 [n_tokens, K], each token's
// entries by descending biased score. cudaErrorInvalidValue for an
// inconsistent config.
cudaError_t RouteTopK(const RoutingConfig& config, const float* logits, int64_t logits_stride,
                      int64_t n_tokens, const float* bias, int32_t* ids, float* weights,
                      cudaStream_t stream);

}  // namespace ktx::kernels::cuda
