// File: kernels/cuda/rope.h
//
// Rotary position embedding with YaRN in ggml's NORM mode (adjacent pairs
// (x[2i], x[2i+1])), as runtime/models/reference_ops.h RopeAngles/ApplyRope
// define it. RopeParams carries exactly the values of the CPU reference's
// RopeYarnParams (kernels/ may not include runtime/, so the struct is
// repeated here; the runtime copies the fields over). Angles, cos and sin are
// computed in double, as on the CPU: positions go up to 2^31 and a float angle
// would lose the low bits.
//
// Thread-safety: launchers are reentrant; they never allocate.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ktx::kernels::cuda {

inline constexpr int kRopeMaxPairs = 128;

struct RopeParams {
  int32_t n_rot = 0;  // even, at most 256
  double freq_base = 10000.0;
  double freq_scale = 1.0;
  double ext_factor = 0.0;
  double attn_factor = 1.0;
  double corr_low = 0.0;
  double corr_high = 0.0;
  // Optional: the position-independent factors, computed on the host by
  // RopeTables (with the CPU reference's std::pow / std::log) and uploaded
  // by the caller: inv_freq (device F64 [n_rot / 2]) = freq_base^(-2i / n_rot)
  // and the YaRN magnitude. Without them (inv_freq null) every kernel computes
  // them per position in double, which costs a decode step's rope kernels a
  // few microseconds of latency each.
  const double* inv_freq = nullptr;
  double magnitude = 1.0;
};

// The host side of those factors for p: inv_freq_out[0 .. n_rot / 2) and the
// magnitude. n_rot must be even and at most 2 * kRopeMaxPairs (else
// cudaErrorInvalidValue, nothing written). Host only.
cudaError_t RopeTables(const RopeParams& p, double* inv_freq_out, double* magnitude_out);

// Rotates, in place, the first n_rot floats of every head:
//   x[t * token_stride + h * head_stride + (0 .. n_rot)] for t < n_tokens, h < n_heads,
// at position positions[t] (device I32 [n_tokens]).
cudaError_t RopeInPlace(const RopeParams& params, const int32_t* positions, float* x,
                        int64_t n_tokens, int64_t token_stride, int32_t n_heads,
                        int64_t head_stride, cudaStream_t stream);

}  // namespace ktx::kernels::cuda
