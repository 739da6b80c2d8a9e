#include "kernels/cuda/routing.h"

#include <algorithm>
#include <climits>

#include "kernels/cuda/cuda_util.cuh"

namespace ktx::kernels::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr double kMinWeightSum = 6.103515625e-5;  // moe.h kMinRoutingWeightSum

// The better of two (value, index) candidates: larger value, then lower index.
__device__ __forceinline__ void Better(double* v, int* i, double v2, int i2) {
  if (v2 > *v || (v2 == *v && i2 < *i)) {
    *v = v2;
    *i = i2;
  }
}

// Warp-wide argmax of vals[0..n) over entries with taken[e] == 0.
__device__ int WarpArgmax(const double* vals, const uint8_t* taken, int n) {
  const int lane = threadIdx.x % 32;
  double best = -INFINITY;
  int best_i = INT_MAX;
  for (int e = lane; e < n; e += 32) {
    if (!taken[e]) Better(&best, &best_i, vals[e], e);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double v2 = __shfl_xor_sync(kFullMask, best, o);
    const int i2 = __shfl_xor_sync(kFullMask, best_i, o);
    Better(&best, &best_i, v2, i2);
  }
  return best_i;
}

__device__ double WarpSumD(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ double WarpMaxD(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// One warp per token. Shared memory per warp: prob[E], sel[E], group[G] (double),
// taken[max(E, G)] (bytes).
__global__ void RouteKernel(RoutingConfig cfg, const float* logits, int64_t logits_stride,
                            int64_t n_tokens, const float* bias, int32_t* ids, float* weights) {
  extern __shared__ double smem_d[];
  const int E = cfg.n_expert;
  const int G = cfg.n_group > 1 ? cfg.n_group : 1;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  const size_t doubles_per_warp = 2 * static_cast<size_t>(E) + G;
  const size_t bytes_per_warp = (max(E, G) + 7) / 8 * 8;
  double* prob = smem_d + warp * doubles_per_warp;
  double* sel = prob + E;
  double* group = sel + E;
  uint8_t* taken = reinterpret_cast<uint8_t*>(smem_d + kWarpsPerBlock * doubles_per_warp) +
                   warp * bytes_per_warp;
  if (t >= n_tokens) return;  // whole warp; no block-wide barrier below
  const float* l = logits + t * logits_stride;

  if (cfg.sigmoid) {
    for (int e = lane; e < E; e += 32) prob[e] = 1.0 / (1.0 + exp(-static_cast<double>(l[e])));
  } else {
    double mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmax(mx, static_cast<double>(l[e]));
    mx = WarpMaxD(mx);
    double sum = 0.0;
    for (int e = lane; e < E; e += 32) {
      prob[e] = exp(static_cast<double>(l[e]) - mx);
      sum += prob[e];
    }
    sum = WarpSumD(sum);
    for (int e = lane; e < E; e += 32) prob[e] /= sum;
  }
  for (int e = lane; e < E; e += 32) {
    double s = prob[e] + (bias != nullptr ? static_cast<double>(bias[e]) : 0.0);
    if (isnan(s)) s = -INFINITY;
    sel[e] = s;
  }
  __syncwarp();

  if (cfg.n_group > 1) {
    const int gs = E / G;
    for (int g = lane; g < G; g += 32) {
      const double* s = sel + g * gs;
      double best = -INFINITY, second = -INFINITY;
      for (int j = 0; j < gs; ++j) {
        if (s[j] > best) {
          second = best;
          best = s[j];
        } else if (s[j] > second) {
          second = s[j];
        }
      }
      group[g] = gs >= 2 ? best + second : best;
      taken[g] = 0;
    }
    __syncwarp();
    uint64_t kept = 0;  // G <= 64
    for (int r = 0; r < cfg.n_group_used; ++r) {
      const int g = WarpArgmax(group, taken, G);
      kept |= uint64_t{1} << g;
      __syncwarp();
      if (lane == 0) taken[g] = 1;
      __syncwarp();
    }
    for (int e = lane; e < E; e += 32) {
      if (((kept >> (e / gs)) & 1) == 0) sel[e] = -INFINITY;
    }
    __syncwarp();
  }

  for (int e = lane; e < E; e += 32) taken[e] = 0;
  __syncwarp();
  int chosen_lane = 0;  // lane k keeps the k-th choice
  double sum = 0.0;
  for (int k = 0; k < cfg.n_expert_used; ++k) {
    const int e = WarpArgmax(sel, taken, E);
    sum += prob[e];
    if (lane == k) chosen_lane = e;
    __syncwarp();
    if (lane == 0) taken[e] = 1;
    __syncwarp();
  }
  const double denom = cfg.norm_weights ? fmax(sum, kMinWeightSum) : 1.0;
  const double scale = (cfg.weights_scale != 0.0f && cfg.weights_scale != 1.0f)
                           ? static_cast<double>(cfg.weights_scale)
                           : 1.0;
  if (lane < cfg.n_expert_used) {
    ids[t * cfg.n_expert_used + lane] = chosen_lane;
    weights[t * cfg.n_expert_used + lane] = static_cast<float>(prob[chosen_lane] / denom * scale);
  }
}

}  // namespace

cudaError_t RouteTopK(const RoutingConfig& cfg, const float* logits, int64_t logits_stride,
                      int64_t n_tokens, const float* bias, int32_t* ids, float* weights,
                      cudaStream_t stream) {
  const int E = cfg.n_expert;
  if (E <= 0 || E > 1024 || cfg.n_expert_used <= 0 || cfg.n_expert_used > E ||
      cfg.n_expert_used > 32 || logits_stride < E || n_tokens < 0) {
    return cudaErrorInvalidValue;
  }
  if (cfg.n_group > 1) {
    if (cfg.n_group > 64 || E % cfg.n_group != 0 || cfg.n_group_used <= 0 ||
        cfg.n_group_used > cfg.n_group ||
        cfg.n_expert_used > cfg.n_group_used * (E / cfg.n_group)) {
      return cudaErrorInvalidValue;
    }
  }
  if (n_tokens == 0) return cudaSuccess;
  const int G = cfg.n_group > 1 ? cfg.n_group : 1;
  const size_t doubles_per_warp = 2 * static_cast<size_t>(E) + G;
  const size_t bytes_per_warp = (std::max(E, G) + 7) / 8 * 8;
  const size_t smem = kWarpsPerBlock * (doubles_per_warp * sizeof(double) + bytes_per_warp);
  static std::atomic<size_t> raised[16];
  const cudaError_t err = EnsureDynamicSmem(RouteKernel, smem, raised);
  if (err != cudaSuccess) return err;
  const int64_t blocks = CeilDiv(n_tokens, kWarpsPerBlock);
  if (blocks > (int64_t{1} << 31) - 1) return cudaErrorInvalidValue;
  RouteKernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, smem, stream>>>(
      cfg, logits, logits_stride, n_tokens, bias, ids, weights);
  return cudaGetLastError();
}

}  // namespace ktx::kernels::cuda
