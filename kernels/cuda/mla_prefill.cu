#include "kernels/cuda/mla_prefill.h"

#include <algorithm>
#include <cmath>

#include "kernels/cuda/basic_ops.h"
#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/gemm.h"

namespace ktx::kernels::cuda {
namespace {

constexpr size_t kAlign = 256;
constexpr int kSoftmaxWarps = 8;  // rows per block of the softmax
constexpr int kCopyThreads = 256;

size_t AlignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }
int64_t ScoreStride(int64_t n_keys) { return (n_keys + 7) / 8 * 8; }

// G[s] = [row_s | row_s] for s < n_rows, zeros for n_rows <= s < n_padded
// (the products run over a multiple of 8 keys: cuBLAS's vectorized kernels
// need it; the softmax gives those keys weight 0), 16 bytes per thread.
__global__ void GatherRowsTwiceKernel(MlaPagedKv kv, int32_t seq, int64_t n_rows, int64_t n_padded,
                                      int32_t rw, __nv_bfloat16* g) {
  const int64_t units = rw / 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_padded * units) return;
  const int64_t s = i / units;
  const int64_t u = i - s * units;
  uint4 v = make_uint4(0, 0, 0, 0);
  if (s < n_rows) {
    const int32_t page =
        kv.block_table[static_cast<int64_t>(seq) * kv.block_table_stride + s / kv.page_size];
    v = *reinterpret_cast<const uint4*>(kv.data + static_cast<int64_t>(page) * kv.page_stride +
                                        (s % kv.page_size) * rw + u * 8);
  }
  uint4* dst = reinterpret_cast<uint4*>(g + s * 2 * rw + u * 8);
  dst[0] = v;
  dst[units] = v;
}

// Qs[m] = [hi(q) | lo(q)] for the rows m = i * n_head + h of queries i < n_q.
__global__ void SplitQueriesKernel(const float* q, int64_t q_stride, int64_t n_q, int32_t n_head,
                                   int32_t rw, __nv_bfloat16* qs) {
  const int64_t units = rw / 4;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_q * n_head * units) return;
  const int64_t m = i / units;
  const int64_t u = i - m * units;
  const int64_t t = m / n_head;
  const int64_t h = m - t * n_head;
  const float4 v = *reinterpret_cast<const float4*>(q + t * q_stride + h * rw + u * 4);
  const float x[4] = {v.x, v.y, v.z, v.w};
  __align__(8) __nv_bfloat16 hi[4], lo[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const Bf16HiLo v = SplitBf16HiLo(x[k]);
    hi[k] = v.hi;
    lo[k] = v.lo;
  }
  __nv_bfloat16* row = qs + m * 2 * rw;
  *reinterpret_cast<uint2*>(row + u * 4) = *reinterpret_cast<const uint2*>(hi);
  *reinterpret_cast<uint2*>(row + rw + u * 4) = *reinterpret_cast<const uint2*>(lo);
}

// (max, sum of exp(v - max)) merged with another such pair; empty pairs are
// (-inf, 0).
__device__ __forceinline__ void MergeMaxSum(float& m, float& l, float m_o, float l_o) {
  const float mx = fmaxf(m, m_o);
  if (mx == -INFINITY) return;
  l = (m == -INFINITY ? 0.0f : l * expf(m - mx)) + (m_o == -INFINITY ? 0.0f : l_o * expf(m_o - mx));
  m = mx;
}

// One warp per score row m (the chunk's query m / n_head, at position
// first_pos + m / n_head): softmax over the keys s <= that position, written
// over the row as (hi, lo) bf16 pairs, zero for the keys after it up to ld.
__global__ void __launch_bounds__(kSoftmaxWarps * 32)
    SoftmaxToPairsKernel(float* s, int64_t ld, int64_t n_rows_m, int32_t n_head, int64_t first_pos,
                         float scale) {
  const int lane = threadIdx.x % 32;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kSoftmaxWarps + threadIdx.x / 32;
  if (m >= n_rows_m) return;
  float* row = s + m * ld;
  const int64_t n_valid = first_pos + m / n_head + 1;
  float mx = -INFINITY, sum = 0.0f;
  for (int64_t j = 4 * lane; j < n_valid; j += 128) {
    const float4 v4 = *reinterpret_cast<const float4*>(row + j);
    float v[4] = {v4.x * scale, v4.y * scale, v4.z * scale, v4.w * scale};
    float local = -INFINITY;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (j + k >= n_valid) v[k] = -INFINITY;
      local = fmaxf(local, v[k]);
    }
    float part = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) part += v[k] == -INFINITY ? 0.0f : expf(v[k] - local);
    MergeMaxSum(mx, sum, local, part);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m_o = __shfl_xor_sync(kFullMask, mx, o);
    const float l_o = __shfl_xor_sync(kFullMask, sum, o);
    MergeMaxSum(mx, sum, m_o, l_o);
  }
  const float inv = 1.0f / sum;  // sum >= 1: the maximum's own term
  for (int64_t j = 4 * lane; j < ld; j += 128) {
    float4 v4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (j < n_valid) v4 = *reinterpret_cast<const float4*>(row + j);
    const float v[4] = {v4.x, v4.y, v4.z, v4.w};
    uint32_t pairs[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const Bf16HiLo w = SplitBf16HiLo(j + k < n_valid ? expf(v[k] * scale - mx) * inv : 0.0f);
      pairs[k] = static_cast<uint32_t>(__bfloat16_as_ushort(w.hi)) |
                 (static_cast<uint32_t>(__bfloat16_as_ushort(w.lo)) << 16);
    }
    *reinterpret_cast<uint4*>(row + j) = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  }
}

struct Layout {
  size_t g_bytes = 0, qs_bytes = 0, s_bytes = 0;
};

Layout LayoutFor(int64_t n_rows, int64_t chunk, int32_t n_head, int32_t rw) {
  Layout l;
  l.g_bytes = AlignUp(static_cast<size_t>(ScoreStride(n_rows)) * 2 * rw * 2, kAlign);
  l.qs_bytes = AlignUp(static_cast<size_t>(chunk) * n_head * 2 * rw * 2, kAlign);
  l.s_bytes = AlignUp(static_cast<size_t>(chunk) * n_head * ScoreStride(n_rows) * 4, kAlign);
  return l;
}

MlaPrefillStatus Cuda(cudaError_t e, const char* step) {
  MlaPrefillStatus s;
  s.cuda = e;
  s.step = step;
  return s;
}

MlaPrefillStatus Cublas(cublasStatus_t e, const char* step) {
  MlaPrefillStatus s;
  s.cublas = e;
  s.step = step;
  return s;
}

}  // namespace

MlaPrefillPlan PlanMlaPrefill(int64_t n_q, int64_t pos0, int32_t n_head, int32_t kv_lora,
                              int32_t n_rot, size_t workspace_capacity, int64_t max_chunk) {
  MlaPrefillPlan plan;
  const int32_t rw = kv_lora + n_rot;
  if (n_q <= 0 || pos0 < 0 || n_head <= 0 || kv_lora <= 0 || kv_lora % 8 != 0 || n_rot < 0 ||
      rw % 8 != 0) {
    return plan;
  }
  plan.n_rows = pos0 + n_q;
  const Layout one = LayoutFor(plan.n_rows, 1, n_head, rw);
  const size_t per_query =
      static_cast<size_t>(n_head) * (2 * rw * 2 + ScoreStride(plan.n_rows) * 4);
  if (workspace_capacity < one.g_bytes + 2 * kAlign + per_query) return plan;
  int64_t chunk = static_cast<int64_t>((workspace_capacity - one.g_bytes - 2 * kAlign) / per_query);
  chunk = std::min(chunk, n_q);
  if (max_chunk > 0) chunk = std::min(chunk, max_chunk);
  // cuBLAS takes int dimensions: the (query, head) rows of a chunk.
  chunk = std::min<int64_t>(chunk, (int64_t{1} << 30) / n_head);
  const Layout l = LayoutFor(plan.n_rows, chunk, n_head, rw);
  plan.queries_per_chunk = chunk;
  plan.workspace_bytes = l.g_bytes + l.qs_bytes + l.s_bytes;
  return plan;
}

MlaPrefillStatus MlaPrefillAttention(cublasHandle_t handle, const MlaPrefillArgs& a,
                                     const MlaPrefillPlan& plan, void* workspace,
                                     cudaStream_t stream) {
  const int32_t rw = a.kv_lora + a.n_rot;
  const int64_t out_stride = int64_t{a.n_head} * a.kv_lora;
  if (a.q == nullptr || a.n_q <= 0 || a.n_head <= 0 || a.kv_lora <= 0 || a.kv_lora % 8 != 0 ||
      a.n_rot < 0 || rw % 8 != 0 || a.q_stride < int64_t{a.n_head} * rw || a.q_stride % 4 != 0 ||
      (reinterpret_cast<uintptr_t>(a.q) % 16) != 0 || a.pos0 < 0 || a.seq < 0 ||
      a.kv.data == nullptr || a.kv.block_table == nullptr || a.kv.page_size <= 0 ||
      a.kv.page_stride % 8 != 0 || (reinterpret_cast<uintptr_t>(a.kv.data) % 16) != 0 ||
      (a.out_bf16 == nullptr && a.out_f32 == nullptr) || plan.queries_per_chunk <= 0 ||
      plan.n_rows != a.pos0 + a.n_q || workspace == nullptr ||
      (reinterpret_cast<uintptr_t>(workspace) % kAlign) != 0) {
    return Cuda(cudaErrorInvalidValue, "checking the arguments");
  }
  const Layout l = LayoutFor(plan.n_rows, plan.queries_per_chunk, a.n_head, rw);
  auto* base = static_cast<unsigned char*>(workspace);
  auto* g = reinterpret_cast<__nv_bfloat16*>(base);
  auto* qs = reinterpret_cast<__nv_bfloat16*>(base + l.g_bytes);
  auto* s = reinterpret_cast<float*>(base + l.g_bytes + l.qs_bytes);

  const int64_t n_padded = ScoreStride(plan.n_rows);
  const int64_t gather_units = n_padded * (rw / 8);
  GatherRowsTwiceKernel<<<static_cast<unsigned>((gather_units + kCopyThreads - 1) / kCopyThreads),
                          kCopyThreads, 0, stream>>>(a.kv, a.seq, plan.n_rows, n_padded, rw, g);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return Cuda(e, "gathering the rows");

  for (int64_t i0 = 0; i0 < a.n_q; i0 += plan.queries_per_chunk) {
    const int64_t n = std::min(plan.queries_per_chunk, a.n_q - i0);
    const int64_t rows_m = n * a.n_head;
    const int64_t n_keys = a.pos0 + i0 + n;
    const int64_t ld = ScoreStride(n_keys);
    const int64_t q_units = rows_m * (rw / 4);
    SplitQueriesKernel<<<static_cast<unsigned>((q_units + kCopyThreads - 1) / kCopyThreads),
                         kCopyThreads, 0, stream>>>(a.q + i0 * a.q_stride, a.q_stride, n, a.n_head,
                                                    rw, qs);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess)
      return Cuda(e, "splitting the queries");
    // S[m, s] = Qs[m] · G[s] for the keys of the chunk's last query (padded to ld).
    if (cublasStatus_t e =
            LinearBf16(handle, g, 2 * rw, qs, 2 * rw, s, CUDA_R_32F, ld, ld, 2 * rw, rows_m);
        e != CUBLAS_STATUS_SUCCESS) {
      return Cublas(e, "the score product");
    }
    SoftmaxToPairsKernel<<<static_cast<unsigned>((rows_m + kSoftmaxWarps - 1) / kSoftmaxWarps),
                           kSoftmaxWarps * 32, 0, stream>>>(s, ld, rows_m, a.n_head, a.pos0 + i0,
                                                            a.scale);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return Cuda(e, "the softmax");
    // ctx[m] = Σ_k P[m, k] · G2[k] with G2 = G as [2 n_rows][rw]: rows 2s, 2s + 1 both row_s.
    const auto* p = reinterpret_cast<const __nv_bfloat16*>(s);
    void* out = a.out_f32 != nullptr ? static_cast<void*>(a.out_f32 + i0 * out_stride)
                                     : static_cast<void*>(a.out_bf16 + i0 * out_stride);
    if (cublasStatus_t e = LinearBf16TransposedWeight(
            handle, g, rw, p, 2 * ld, out, a.out_f32 != nullptr ? CUDA_R_32F : CUDA_R_16BF,
            a.kv_lora, a.kv_lora, 2 * ld, rows_m);
        e != CUBLAS_STATUS_SUCCESS) {
      return Cublas(e, "the context product");
    }
    if (a.out_f32 != nullptr && a.out_bf16 != nullptr) {
      if (cudaError_t e =
              ConvertF32ToBf16(a.out_f32 + i0 * out_stride, a.kv_lora, rows_m, a.kv_lora,
                               a.out_bf16 + i0 * out_stride, a.kv_lora, stream);
          e != cudaSuccess) {
        return Cuda(e, "converting the context to bf16");
      }
    }
  }
  return {};
}

}  // namespace ktx::kernels::cuda
