// File: kernels/cuda/rope.cuh
//
// Device side of rope.h: the YaRN angle of pair i at a position, in double,
// with the same formula and operation order as the CPU reference RopeAngles.
// Included only by .cu files.
#pragma once

#include "kernels/cuda/rope.h"

namespace ktx::kernels::cuda {

__device__ __forceinline__ void RopeCosSin(const RopeParams& p, int64_t pos, int i, double* c,
                                           double* s) {
  double magnitude = p.magnitude;
  double inv_freq = 0.0;
  if (p.inv_freq != nullptr) {
    inv_freq = p.inv_freq[i];
  } else {
    magnitude = p.attn_factor;
    if (p.ext_factor != 0.0) magnitude *= 1.0 + 0.1 * log(1.0 / p.freq_scale);
    inv_freq = pow(p.freq_base, -2.0 * static_cast<double>(i) / static_cast<double>(p.n_rot));
  }
  const double theta_extrap = static_cast<double>(pos) * inv_freq;
  const double theta_interp = p.freq_scale * theta_extrap;
  double theta = theta_interp;
  if (p.ext_factor != 0.0) {
    const double y = (static_cast<double>(i) - p.corr_low) / fmax(0.001, p.corr_high - p.corr_low);
    const double ramp = 1.0 - fmin(1.0, fmax(0.0, y));
    const double mix = ramp * p.ext_factor;
    theta = theta_interp * (1.0 - mix) + theta_extrap * mix;
  }
  *c = cos(theta) * magnitude;
  *s = sin(theta) * magnitude;
}

// Fills cos_out/sin_out[0 .. n_rot/2) (shared memory) for one position; the
// whole block calls it, followed by __syncthreads() at the caller.
__device__ __forceinline__ void RopeTable(const RopeParams& p, int64_t pos, double* cos_out,
                                          double* sin_out) {
  for (int i = threadIdx.x; i < p.n_rot / 2; i += blockDim.x) {
    RopeCosSin(p, pos, i, &cos_out[i], &sin_out[i]);
  }
}

// Rotates pair i of x (float) with the table; result rounded to float.
__device__ __forceinline__ void RopePair(const double* cos_t, const double* sin_t, int i,
                                         const float* in, float* out0, float* out1) {
  const double x0 = in[2 * i];
  const double x1 = in[2 * i + 1];
  *out0 = static_cast<float>(x0 * cos_t[i] - x1 * sin_t[i]);
  *out1 = static_cast<float>(x0 * sin_t[i] + x1 * cos_t[i]);
}

}  // namespace ktx::kernels::cuda
