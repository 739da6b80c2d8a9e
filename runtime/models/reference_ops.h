// File: runtime/models/reference_ops.h
//
// The scalar building blocks of the reference model path: a view of stored
// (possibly quantized) weight matrices, the matrix product of a weight matrix
// with a batch of F32 activations, RMSNorm, SiLU and YaRN rotary embeddings in
// ggml's NORM mode (adjacent pairs). Accuracy first: weight rows are
// dequantized exactly (kernels/cpu/quant) and every dot product, norm and
// angle is accumulated in double, so the model path lands within ~1e-6 of a
// float64 reference (tests/data/README.md section 6, tier A).
//
// Thread-safety: pure functions over caller-owned memory. MatMul runs in
// parallel on the oneTBB pool of the calling thread (its arena and its
// global_control limits).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/common/tensor_type.h"
#include "runtime/gguf/gguf.h"

namespace ktx::models {

// A read-only view of a stored weight matrix: n_rows rows of n_cols elements
// of `type`, row r at data + r * row_bytes. Does not own the data (it points
// into the model's mapping). For a GGUF tensor {ne0, ne1, ...} a row is one
// ne0-run, i.e. the weights of one output feature.
struct WeightMatrix {
  const uint8_t* data = nullptr;
  kernels::TensorType type = kernels::TensorType::kF32;
  int64_t n_cols = 0;
  int64_t n_rows = 0;
  int64_t row_bytes = 0;

  const uint8_t* row(int64_t r) const { return data + r * row_bytes; }

  // The whole tensor, every dimension above ne0 flattened into rows.
  static WeightMatrix Of(const gguf::TensorInfo& t);
  // Slab `i` of a 3-D tensor {ne0, ne1, ne2}: the ne1 rows of ne0 elements at
  // element offset i * ne0 * ne1 (routed expert i, or head i of attn_k_b /
  // attn_v_b). KTX_CHECKs 0 <= i < ne2.
  static WeightMatrix Slab(const gguf::TensorInfo& t, int64_t i);
};

// y[t * y_stride + r] = Σ_c W[r, c] · x[t * x_stride + c] for t < n_tokens,
// r < w.n_rows. Each weight row is dequantized once per call into a
// thread-local buffer and dotted with every token's activation; products and
// sums are in double, the result is rounded once to float. Parallel over
// blocks of rows.
void MatMul(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t n_tokens, float* y,
            int64_t y_stride);
// The same with double results (router logits).
void MatMulF64(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t n_tokens, double* y,
               int64_t y_stride);

// Σ a[i] · b[i] in double.
double DotF64(const float* a, const float* b, int64_t n);

// out[i] = x[i] / sqrt(mean(x²) + eps) · weight[i]; `out` may alias `x`.
void RmsNorm(const float* x, const float* weight, int64_t n, double eps, float* out);

// Dequantizes a whole (small) tensor: norms, biases. F32 [n_elements].
std::vector<float> DequantizeTensor(const gguf::TensorInfo& t);

// silu(x) = x / (1 + e^-x).
double Silu(double x);

// Rotary embedding with YaRN, as ggml computes it in NORM mode: pair i of a
// head is (x[2i], x[2i+1]), rotated by theta_i(pos):
//   theta_extrap = pos · freq_base^(-2i / n_rot),  theta_interp = freq_scale · theta_extrap,
//   ramp(i) = 1 - clamp((i - corr_low) / max(0.001, corr_high - corr_low), 0, 1),
//   mix = ramp(i) · ext_factor,  theta = theta_interp · (1 - mix) + theta_extrap · mix,
//   cos and sin scaled by attn_factor · (ext_factor != 0 ? 1 + 0.1 ln(1 / freq_scale) : 1).
struct RopeYarnParams {
  int64_t n_rot = 0;  // even
  double freq_base = 10000.0;
  double freq_scale = 1.0;
  double ext_factor = 0.0;
  double attn_factor = 1.0;
  double corr_low = 0.0;
  double corr_high = 0.0;

  // The YaRN correction dimension for `beta` rotations over n_ctx_orig tokens:
  //   n_rot · ln(n_ctx_orig / (beta · 2π)) / (2 ln freq_base).
  static double CorrDim(int64_t n_rot, int64_t n_ctx_orig, double beta, double freq_base);
  // corr_low = max(0, floor(CorrDim(beta_fast))), corr_high = min(n_rot - 1,
  // ceil(CorrDim(beta_slow))).
  void SetCorrDims(int64_t n_ctx_orig, double beta_fast, double beta_slow);
};

// cos_out[i], sin_out[i] for the n_rot / 2 pairs at position `pos` (magnitude included).
void RopeAngles(const RopeYarnParams& p, int64_t pos, double* cos_out, double* sin_out);
// Rotates x[0..n_rot) in place with the given angles (adjacent pairs).
void ApplyRope(const double* cos_in, const double* sin_in, int64_t n_rot, float* x);

}  // namespace ktx::models
