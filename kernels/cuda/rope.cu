#include "kernels/cuda/rope.h"

#include <cmath>

#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/rope.cuh"

namespace ktx::kernels::cuda {
namespace {

constexpr int kMaxPairs = kRopeMaxPairs;

__global__ void RopeKernel(RopeParams p, const int32_t* positions, float* x, int64_t token_stride,
                           int32_t n_heads, int64_t head_stride) {
  __shared__ double cos_t[kMaxPairs];
  __shared__ double sin_t[kMaxPairs];
  const int64_t t = blockIdx.x;
  RopeTable(p, positions[t], cos_t, sin_t);
  __syncthreads();
  const int n_pairs = p.n_rot / 2;
  for (int j = threadIdx.x; j < n_heads * n_pairs; j += blockDim.x) {
    const int h = j / n_pairs, i = j % n_pairs;
    float* v = x + t * token_stride + h * head_stride;
    float a, b;
    RopePair(cos_t, sin_t, i, v, &a, &b);
    v[2 * i] = a;
    v[2 * i + 1] = b;
  }
}

}  // namespace

cudaError_t RopeTables(const RopeParams& p, double* inv_freq_out, double* magnitude_out) {
  if (p.n_rot <= 0 || p.n_rot % 2 != 0 || p.n_rot / 2 > kRopeMaxPairs) {
    return cudaErrorInvalidValue;
  }
  // The CPU reference's expressions (runtime/models/reference_ops.cc RopeAngles).
  double magnitude = p.attn_factor;
  if (p.ext_factor != 0.0) magnitude *= 1.0 + 0.1 * std::log(1.0 / p.freq_scale);
  *magnitude_out = magnitude;
  for (int i = 0; i < p.n_rot / 2; ++i) {
    inv_freq_out[i] =
        std::pow(p.freq_base, -2.0 * static_cast<double>(i) / static_cast<double>(p.n_rot));
  }
  return cudaSuccess;
}

cudaError_t RopeInPlace(const RopeParams& params, const int32_t* positions, float* x,
                        int64_t n_tokens, int64_t token_stride, int32_t n_heads,
                        int64_t head_stride, cudaStream_t stream) {
  if (params.n_rot <= 0 || params.n_rot % 2 != 0 || params.n_rot / 2 > kMaxPairs || n_tokens < 0 ||
      n_heads < 0 || n_tokens > (int64_t{1} << 31) - 1) {
    return cudaErrorInvalidValue;
  }
  if (n_tokens == 0 || n_heads == 0) return cudaSuccess;
  RopeKernel<<<static_cast<unsigned>(n_tokens), 128, 0, stream>>>(
      params, positions, x, token_stride, n_heads, head_stride);
  return cudaGetLastError();
}

}  // namespace ktx::kernels::cuda
