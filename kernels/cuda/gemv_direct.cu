#include "kernels/cuda/gemv_direct.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/gemv_decode.cuh"
#include "kernels/cuda/gemv_direct_decode.cuh"

namespace ktx::kernels::cuda {
namespace {

using gemv_internal::BlockBytes;
using gemv_internal::BlockElems;
using gemv_internal::DirectDecode;
using gemv_internal::DirectLoad;
using gemv_internal::DirectPieceElem;
using gemv_internal::DirectRaw;
using gemv_internal::kDirectChunk;
using gemv_internal::kDirectPieces;

// The kernel QuantGemv uses when neither SetGemvKernel nor KTX_GEMV_KERNEL
// says otherwise: q8 with unroll 2 (measured on the H200, 2026-11-27,
// gemv_benchmark --quick: at 1 token 1.1-2.2x faster than direct:2 on Q4_K
// and up to 1.5x on Q6_K, never slower beyond noise at 2-8 tokens). Calls
// without a workspace, and types q8 does not read, take the direct kernel
// (or the ring kernel where direct cannot read the type).
constexpr GemvKernelChoice kDefaultGemvKernel{GemvKernel::kQ8, DirectGemvConfig{2, 1}};

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxTokensPerPass = 8;
constexpr int kMaxRowsPerWarp = 2;

// 8 bf16 activations at x[e .. e + 8) as floats.
template <bool kXVector>
__device__ __forceinline__ void LoadX8(const __nv_bfloat16* __restrict__ x, float (&xf)[8]) {
  if constexpr (kXVector) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(x));
    const float2 a = Bf16PairToFloat2(v.x), b = Bf16PairToFloat2(v.y);
    const float2 c = Bf16PairToFloat2(v.z), d = Bf16PairToFloat2(v.w);
    xf[0] = a.x, xf[1] = a.y, xf[2] = b.x, xf[3] = b.y;
    xf[4] = c.x, xf[5] = c.y, xf[6] = d.x, xf[7] = d.y;
  } else {
    const unsigned short* xs = reinterpret_cast<const unsigned short*>(x);
#pragma unroll
    for (int j = 0; j < 8; ++j) xf[j] = __uint_as_float(static_cast<uint32_t>(__ldg(xs + j)) << 16);
  }
}

// Block: kWarps warps; `split` (1, 2, 4, 8) warps share a row group of R
// rows (kWarps / split groups per block). Warp `sub` of a group takes the
// steps sub, sub + split, ... of U consecutive chunks each; per step it loads
// U x R chunks (lane share: DirectLoad) before decoding any.
//
// Lane-level validity (the row's last chunk) costs no branch: pieces past the
// row decode to zero weights and multiply x[0 .. 8) instead of reading x past
// the row; whole chunks past the row and rows past n_out (warp-uniform) are
// skipped. kXVector: x rows 16-byte aligned (16-byte loads of x).
template <TensorType T, int NT, int U, int R, bool kXVector>
__global__ void __launch_bounds__(kThreads)
    DirectGemvKernel(const uint8_t* __restrict__ w, int64_t row_bytes, int64_t n_out, int n_in,
                     int split, const __nv_bfloat16* __restrict__ x, int64_t ldx,
                     float* __restrict__ y, int64_t ldy, float beta) {
  __shared__ float partial[kWarps][kMaxRowsPerWarp][kMaxTokensPerPass];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int groups_per_block = kWarps / split;
  const int sub = warp % split;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * groups_per_block + warp / split) * R;
  const int n_chunks = (n_in + kDirectChunk - 1) / kDirectChunk;

  float acc[R][NT];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[r][t] = 0.0f;
  }
  bool row_ok[R];
  const uint8_t* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row_ok[r] = row0 + r < n_out;
    rows[r] = w + (row_ok[r] ? row0 + r : 0) * row_bytes;
  }

  const int my_chunks = row_ok[0] ? n_chunks : 0;  // a group past n_out streams nothing
  for (int c0 = sub * U; c0 < my_chunks; c0 += split * U) {
    DirectRaw<T> raw[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (c0 + u < my_chunks && row_ok[r]) {  // warp-uniform
          DirectLoad<T>(rows[r], n_in, c0 + u, lane, &raw[u][r]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c0 + u >= my_chunks) break;  // warp-uniform
#pragma unroll
      for (int k = 0; k < kDirectPieces; ++k) {
        // Pieces past the row (zero weights) read x[0 .. 8) of each token.
        const int e0 = DirectPieceElem<T>(c0 + u, lane, k);
        const int e = e0 < n_in ? e0 : 0;
        float wv[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (row_ok[r]) {
            DirectDecode<T>(raw[u][r], lane, k, wv[r]);
          } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) wv[r][j] = 0.0f;
          }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          float xf[8];
          LoadX8<kXVector>(x + t * ldx + e, xf);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float a = acc[r][t];
#pragma unroll
            for (int j = 0; j < 8; ++j) a = fmaf(wv[r][j], xf[j], a);
            acc[r][t] = a;
          }
        }
      }
    }
  }

  // Warp sums, then (split > 1) the group's partials in warp order.
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[r][t] = WarpSum(acc[r][t]);
  }
  if (split == 1) {
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (!row_ok[r]) continue;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          float* out = y + t * ldy + row0 + r;
          *out = beta != 0.0f ? fmaf(beta, *out, acc[r][t]) : acc[r][t];
        }
      }
    }
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int t = 0; t < NT; ++t) partial[warp][r][t] = acc[r][t];
    }
  }
  __syncthreads();
  if (sub == 0 && lane < R * NT) {
    const int r = lane / NT, t = lane % NT;
    if (row0 + r < n_out) {
      float s = partial[warp][r][t];
      for (int q = 1; q < split; ++q) s += partial[warp + q][r][t];
      float* out = y + t * ldy + row0 + r;
      *out = beta != 0.0f ? fmaf(beta, *out, s) : s;
    }
  }
}

int SmCount() {
  static std::atomic<int> cache[16];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  std::atomic<int>& c = cache[device & 15];
  int v = c.load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 0;
    }
    c.store(v, std::memory_order_relaxed);
  }
  return v;
}

template <TensorType T, int NT, int U, int R>
cudaError_t LaunchPass(const uint8_t* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                       const __nv_bfloat16* x, int64_t ldx, bool x_vector, float* y, int64_t ldy,
                       float beta, int n_sm, cudaStream_t stream) {
  const int64_t n_chunks = CeilDiv(n_in, kDirectChunk);
  const int64_t n_groups = CeilDiv(n_out, R);
  // Warps per row group: enough warps streaming (about 48 per SM) for few
  // rows, but at least one step of U chunks each.
  const int64_t target_warps = int64_t{48} * std::max(n_sm, 1);
  int split = 1;
  while (split < kWarps && n_groups * split < target_warps &&
         int64_t{2} * split * U <= n_chunks + U - 1) {
    split *= 2;
  }
  const int64_t blocks = CeilDiv(n_groups, kWarps / split);
  if (blocks > int64_t{0x7fffffff}) return cudaErrorInvalidValue;
  if (x_vector) {
    DirectGemvKernel<T, NT, U, R, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        w, row_bytes, n_out, static_cast<int>(n_in), split, x, ldx, y, ldy, beta);
  } else {
    DirectGemvKernel<T, NT, U, R, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        w, row_bytes, n_out, static_cast<int>(n_in), split, x, ldx, y, ldy, beta);
  }
  return cudaGetLastError();
}

template <TensorType T, int U, int R>
cudaError_t LaunchAll(const uint8_t* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                      const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens, float* y, int64_t ldy,
                      float beta, cudaStream_t stream) {
  const int n_sm = SmCount();
  if (n_sm == 0) return cudaErrorInvalidDevice;
  const bool x_vector = reinterpret_cast<uintptr_t>(x) % 16 == 0 && ldx % 8 == 0;
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kMaxTokensPerPass) {
    const int nt = static_cast<int>(std::min<int64_t>(kMaxTokensPerPass, n_tokens - t0));
    const __nv_bfloat16* xp = x + t0 * ldx;
    float* yp = y + t0 * ldy;
    cudaError_t err = cudaSuccess;
#define KTX_DIRECT_PASS(N)                                                                    \
  case N:                                                                                     \
    err = LaunchPass<T, N, U, R>(w, row_bytes, n_out, n_in, xp, ldx, x_vector, yp, ldy, beta, \
                                 n_sm, stream);                                               \
    break;
    switch (nt) {
      KTX_DIRECT_PASS(1)
      KTX_DIRECT_PASS(2)
      KTX_DIRECT_PASS(3)
      KTX_DIRECT_PASS(4)
      KTX_DIRECT_PASS(5)
      KTX_DIRECT_PASS(6)
      KTX_DIRECT_PASS(7)
      default:
        err = LaunchPass<T, 8, U, R>(w, row_bytes, n_out, n_in, xp, ldx, x_vector, yp, ldy, beta,
                                     n_sm, stream);
        break;
    }
#undef KTX_DIRECT_PASS
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <TensorType T>
cudaError_t LaunchType(const uint8_t* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                       const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens, float* y, int64_t ldy,
                       float beta, const DirectGemvConfig& c, cudaStream_t stream) {
  if (c.rows_per_warp == 1 && c.unroll == 1) {
    return LaunchAll<T, 1, 1>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta, stream);
  }
  if (c.rows_per_warp == 1 && c.unroll == 2) {
    return LaunchAll<T, 2, 1>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta, stream);
  }
  if (c.rows_per_warp == 1 && c.unroll == 4) {
    return LaunchAll<T, 4, 1>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta, stream);
  }
  if (c.rows_per_warp == 2 && c.unroll == 2) {
    return LaunchAll<T, 2, 2>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta, stream);
  }
  return cudaErrorInvalidValue;
}

bool ValidConfig(const DirectGemvConfig& c) {
  return (c.rows_per_warp == 1 && (c.unroll == 1 || c.unroll == 2 || c.unroll == 4)) ||
         (c.rows_per_warp == 2 && c.unroll == 2);
}

// Override: 0 none, else 1 + encoded choice.
std::atomic<int> g_override{0};

int Encode(const GemvKernelChoice& c) {
  return 1 + (c.kernel == GemvKernel::kDirect ? 1 : 0) + 2 * c.direct.unroll +
         16 * c.direct.rows_per_warp + (c.kernel == GemvKernel::kQ8 ? 256 : 0);
}
GemvKernelChoice Decode(int v) {
  v -= 1;
  GemvKernelChoice c;
  c.kernel = (v & 1) ? GemvKernel::kDirect : GemvKernel::kRing;
  c.direct.unroll = (v >> 1) & 7;
  c.direct.rows_per_warp = (v >> 4) & 15;
  if (v & 256) c.kernel = GemvKernel::kQ8;
  return c;
}

bool ParseInt(std::string_view s, int* out) {
  if (s.empty() || s.size() > 2) return false;
  int v = 0;
  for (const char ch : s) {
    if (ch < '0' || ch > '9') return false;
    v = 10 * v + (ch - '0');
  }
  *out = v;
  return true;
}

}  // namespace

bool ParseGemvKernel(std::string_view spec, GemvKernelChoice* out) {
  GemvKernelChoice c;
  if (spec == "ring") {
    c.kernel = GemvKernel::kRing;
    *out = c;
    return true;
  }
  if (spec == "q8" || spec == "q8:1" || spec == "q8:2" || spec == "q8:4") {
    c.kernel = GemvKernel::kQ8;
    c.direct = kDefaultGemvKernel.direct;  // what runs without a workspace
    if (spec.size() > 2) c.direct.unroll = spec[3] - '0';
    *out = c;
    return true;
  }
  if (spec.substr(0, 6) != "direct") return false;
  c.kernel = GemvKernel::kDirect;
  c.direct = kDefaultGemvKernel.direct;
  std::string_view rest = spec.substr(6);
  if (!rest.empty()) {
    if (rest[0] != ':') return false;
    rest = rest.substr(1);
    const size_t colon = rest.find(':');
    if (!ParseInt(rest.substr(0, colon), &c.direct.unroll)) return false;
    c.direct.rows_per_warp = 1;
    if (colon != std::string_view::npos &&
        !ParseInt(rest.substr(colon + 1), &c.direct.rows_per_warp)) {
      return false;
    }
  }
  if (!ValidConfig(c.direct)) return false;
  *out = c;
  return true;
}

GemvKernelChoice CurrentGemvKernel() {
  const int v = g_override.load(std::memory_order_acquire);
  if (v != 0) return Decode(v);
  static const GemvKernelChoice from_env = [] {
    GemvKernelChoice c = kDefaultGemvKernel;
    const char* env = std::getenv("KTX_GEMV_KERNEL");
    if (env != nullptr) ParseGemvKernel(env, &c);
    return c;
  }();
  return from_env;
}

void SetGemvKernel(const GemvKernelChoice& choice) {
  g_override.store(Encode(choice), std::memory_order_release);
}

bool CanDirectGemv(TensorType type, int64_t row_bytes) {
  switch (type) {
    case TensorType::kQ4_K:
    case TensorType::kBF16: return row_bytes % 16 == 0;
    case TensorType::kQ6_K:
    case TensorType::kQ8_0: return row_bytes % 2 == 0;
    default: return false;
  }
}

cudaError_t DirectGemv(TensorType type, const void* w, int64_t row_bytes, int64_t n_out,
                       int64_t n_in, const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens,
                       float* y, int64_t ldy, float beta, const DirectGemvConfig& config,
                       cudaStream_t stream) {
  if (!CanDirectGemv(type, row_bytes) || !ValidConfig(config) || n_out < 0 || n_in <= 0 ||
      n_in > (int64_t{1} << 24) || n_in % 32 != 0 || n_in % BlockElems(type) != 0 || n_tokens < 0 ||
      ldx < n_in || ldy < n_out || row_bytes < n_in / BlockElems(type) * BlockBytes(type)) {
    return cudaErrorInvalidValue;
  }
  if (n_out == 0 || n_tokens == 0) return cudaSuccess;
  if (w == nullptr || x == nullptr || y == nullptr || reinterpret_cast<uintptr_t>(w) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  switch (type) {
    case TensorType::kQ4_K:
      return LaunchType<TensorType::kQ4_K>(wb, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy,
                                           beta, config, stream);
    case TensorType::kQ6_K:
      return LaunchType<TensorType::kQ6_K>(wb, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy,
                                           beta, config, stream);
    case TensorType::kQ8_0:
      return LaunchType<TensorType::kQ8_0>(wb, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy,
                                           beta, config, stream);
    case TensorType::kBF16:
      return LaunchType<TensorType::kBF16>(wb, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy,
                                           beta, config, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ktx::kernels::cuda
