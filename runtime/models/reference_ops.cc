#include "runtime/models/reference_ops.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "kernels/cpu/quant/quant.h"
#include "runtime/base/status.h"
#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"

namespace ktx::models {

WeightMatrix WeightMatrix::Of(const gguf::TensorInfo& t) {
  WeightMatrix w;
  w.data = t.data;
  w.type = t.type;
  w.n_cols = t.ne[0];
  w.n_rows = t.n_rows();
  w.row_bytes = t.row_bytes();
  return w;
}

WeightMatrix WeightMatrix::Slab(const gguf::TensorInfo& t, int64_t i) {
  KTX_CHECK(t.ne.size() >= 3);
  KTX_CHECK(i >= 0 && i < t.ne[2]);
  WeightMatrix w;
  w.type = t.type;
  w.n_cols = t.ne[0];
  w.n_rows = t.ne[1];
  w.row_bytes = t.row_bytes();
  w.data = t.data + i * w.n_rows * w.row_bytes;
  return w;
}

double DotF64(const float* a, const float* b, int64_t n) {
  // Four independent partial sums: exact products (24 x 24 bits fit a double)
  // and a short dependency chain.
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += static_cast<double>(a[i]) * b[i];
    s1 += static_cast<double>(a[i + 1]) * b[i + 1];
    s2 += static_cast<double>(a[i + 2]) * b[i + 2];
    s3 += static_cast<double>(a[i + 3]) * b[i + 3];
  }
  for (; i < n; ++i) s0 += static_cast<double>(a[i]) * b[i];
  return (s0 + s1) + (s2 + s3);
}

namespace {

template <typename Out>
void MatMulImpl(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t n_tokens, Out* y,
                int64_t y_stride) {
  if (w.n_rows == 0 || n_tokens == 0) return;
  const int64_t n_cols = w.n_cols;
  // F32 rows are used in place when they are float-aligned.
  const bool direct = w.type == kernels::TensorType::kF32 &&
                      reinterpret_cast<uintptr_t>(w.data) % alignof(float) == 0 &&
                      w.row_bytes % static_cast<int64_t>(sizeof(float)) == 0;
  // About 64k multiply-adds per task.
  const int64_t work_per_row = std::max<int64_t>(1, n_cols * n_tokens);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work_per_row);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, w.n_rows, grain),
                    [&](const tbb::blocked_range<int64_t>& range) {
                      thread_local std::vector<float> buffer;
                      if (!direct && static_cast<int64_t>(buffer.size()) < n_cols) {
                        buffer.resize(n_cols);
                      }
                      for (int64_t r = range.begin(); r != range.end(); ++r) {
                        const float* row;
                        if (direct) {
                          row = reinterpret_cast<const float*>(w.row(r));
                        } else {
                          kernels::DequantizeRow(w.type, w.row(r), buffer.data(), n_cols);
                          row = buffer.data();
                        }
                        for (int64_t t = 0; t < n_tokens; ++t) {
                          y[t * y_stride + r] =
                              static_cast<Out>(DotF64(row, x + t * x_stride, n_cols));
                        }
                      }
                    });
}

}  // namespace

void MatMul(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t n_tokens, float* y,
            int64_t y_stride) {
  MatMulImpl<float>(w, x, x_stride, n_tokens, y, y_stride);
}

void MatMulF64(const WeightMatrix& w, const float* x, int64_t x_stride, int64_t n_tokens, double* y,
               int64_t y_stride) {
  MatMulImpl<double>(w, x, x_stride, n_tokens, y, y_stride);
}

void RmsNorm(const float* x, const float* weight, int64_t n, double eps, float* out) {
  const double mean_sq = DotF64(x, x, n) / static_cast<double>(n);
  const double scale = 1.0 / std::sqrt(mean_sq + eps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<float>(static_cast<double>(x[i]) * scale * weight[i]);
  }
}

std::vector<float> DequantizeTensor(const gguf::TensorInfo& t) {
  std::vector<float> out(static_cast<size_t>(t.n_elements()));
  const int64_t n_cols = t.ne[0];
  const int64_t row_bytes = t.row_bytes();
  for (int64_t r = 0; r < t.n_rows(); ++r) {
    kernels::DequantizeRow(t.type, t.data + r * row_bytes, out.data() + r * n_cols, n_cols);
  }
  return out;
}

double Silu(double x) { return x / (1.0 + std::exp(-x)); }

double RopeYarnParams::CorrDim(int64_t n_rot, int64_t n_ctx_orig, double beta, double freq_base) {
  return static_cast<double>(n_rot) *
         std::log(static_cast<double>(n_ctx_orig) / (beta * 2.0 * std::numbers::pi)) /
         (2.0 * std::log(freq_base));
}

void RopeYarnParams::SetCorrDims(int64_t n_ctx_orig, double beta_fast, double beta_slow) {
  corr_low = std::max(0.0, std::floor(CorrDim(n_rot, n_ctx_orig, beta_fast, freq_base)));
  corr_high = std::min(static_cast<double>(n_rot - 1),
                       std::ceil(CorrDim(n_rot, n_ctx_orig, beta_slow, freq_base)));
}

void RopeAngles(const RopeYarnParams& p, int64_t pos, double* cos_out, double* sin_out) {
  const int64_t n_pairs = p.n_rot / 2;
  double magnitude = p.attn_factor;
  if (p.ext_factor != 0.0) magnitude *= 1.0 + 0.1 * std::log(1.0 / p.freq_scale);
  for (int64_t i = 0; i < n_pairs; ++i) {
    const double theta_extrap =
        static_cast<double>(pos) *
        std::pow(p.freq_base, -2.0 * static_cast<double>(i) / static_cast<double>(p.n_rot));
    const double theta_interp = p.freq_scale * theta_extrap;
    double theta = theta_interp;
    if (p.ext_factor != 0.0) {
      const double y =
          (static_cast<double>(i) - p.corr_low) / std::max(0.001, p.corr_high - p.corr_low);
      const double ramp = 1.0 - std::min(1.0, std::max(0.0, y));
      const double mix = ramp * p.ext_factor;
      theta = theta_interp * (1.0 - mix) + theta_extrap * mix;
    }
    cos_out[i] = std::cos(theta) * magnitude;
    sin_out[i] = std::sin(theta) * magnitude;
  }
}

void ApplyRope(const double* cos_in, const double* sin_in, int64_t n_rot, float* x) {
  for (int64_t i = 0; i < n_rot / 2; ++i) {
    const double x0 = x[2 * i];
    const double x1 = x[2 * i + 1];
    x[2 * i] = static_cast<float>(x0 * cos_in[i] - x1 * sin_in[i]);
    x[2 * i + 1] = static_cast<float>(x0 * sin_in[i] + x1 * cos_in[i]);
  }
}

}  // namespace ktx::models
