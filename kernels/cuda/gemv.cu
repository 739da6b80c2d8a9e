#include "kernels/cuda/gemv.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/gemv_decode.cuh"
#include "kernels/cuda/gemv_direct.h"
#include "kernels/cuda/gemv_q8.h"

namespace ktx::kernels::cuda {
namespace {

using gemv_internal::BlockBytes;
using gemv_internal::BlockElems;
using gemv_internal::DecodePiece;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 4;  // cp.async ring depth per warp
constexpr int kMaxTokensPerPass = 8;
// Registers: at most 65536 / (3 * 256) = 85 per thread (without this ptxas
// capped them at 64 and spilled in the 2..8-token variants).
constexpr int kMinBlocksPerSm = 3;

// Elements per tile (a whole number of blocks), bytes per tile and per ring
// slot (the tile's bytes rounded out to 16-byte units on both sides).
template <TensorType T>
struct Geometry {
  static constexpr int kBlock = BlockElems(T);
  static constexpr int kBytes = BlockBytes(T);
  static constexpr int kTile = (T == TensorType::kBF16 || T == TensorType::kF16) ? 1024 : 2048;
  static constexpr int kTileBytes = kTile / kBlock * kBytes;
  static constexpr int kSlot = (kTileBytes + 30 + 15) / 16 * 16;
  static_assert(kTile % kBlock == 0);
};

__device__ __forceinline__ void CpAsync16(void* dst, uintptr_t src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// One block: kWarps warps, x of NT tokens staged in shared memory (bf16
// [NT][n_in]), then per warp a cp.async ring of kStages tiles, then
// kWarps * 8 floats for the split-row partial sums.
//
// Work split: `split` (1, 2, 4 or 8, <= tiles_per_row) warps share a row; a
// block computes kWarps / split rows at a time (a row group); warp w takes
// row slot w / split and, of that row, the tiles k = sub, sub + split, ...
// (sub = w % split). Row groups go to blocks round-robin, so every warp of a
// block runs the same number of groups (the barriers of the split-row
// reduction are uniform); rows past n_out are skipped but keep the count.
// Each warp streams its tiles of all its groups through its ring without a
// break. Sums: per lane over its weights (FMA), warp tree, then the split
// partials added in sub order (deterministic).
template <TensorType T, int NT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    QuantGemvKernel(const uint8_t* __restrict__ w, int64_t row_bytes, int64_t n_out, int n_in,
                    int tiles_per_row, int split, const __nv_bfloat16* __restrict__ x, int64_t ldx,
                    bool x_vector, float* __restrict__ y, int64_t ldy, float beta) {
  using G = Geometry<T>;
  extern __shared__ uint4 smem_u4[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem_u4);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  uint16_t* xs = reinterpret_cast<uint16_t*>(smem);
  const int64_t x_bytes = (static_cast<int64_t>(NT) * n_in * 2 + 15) / 16 * 16;
  uint8_t* ring = smem + x_bytes + warp * (kStages * G::kSlot);
  float* partial = reinterpret_cast<float*>(smem + x_bytes + kWarps * kStages * G::kSlot);

  const int rows_per_group = kWarps / split;
  const int slot = warp / split;
  const int sub = warp % split;
  const int64_t n_groups = (n_out + rows_per_group - 1) / rows_per_group;
  const int64_t my_groups =
      blockIdx.x < n_groups ? (n_groups - 1 - blockIdx.x) / gridDim.x + 1 : 0;  // block-uniform
  const int tiles_per_group = (tiles_per_row - sub + split - 1) / split;  // >= 1: split <= tiles
  const int64_t n_tiles = my_groups * tiles_per_group;

  // Tile i of this warp: its row (maybe >= n_out), tile index in the row, source address.
  auto tile_of = [&](int64_t i, int64_t* r, int* k, int* elems) -> uintptr_t {
    const int64_t j = i / tiles_per_group;
    *r = (blockIdx.x + j * gridDim.x) * rows_per_group + slot;
    *k = sub + static_cast<int>(i % tiles_per_group) * split;
    *elems = min(G::kTile, n_in - *k * G::kTile);
    return reinterpret_cast<uintptr_t>(
        w + *r * row_bytes + static_cast<int64_t>(*k) * (G::kTile / G::kBlock) * G::kBytes);
  };
  auto issue = [&](int64_t i) {
    if (i < n_tiles) {
      int64_t r = 0;
      int k = 0, elems = 0;
      const uintptr_t src = tile_of(i, &r, &k, &elems);
      if (r < n_out) {
        const int bytes = elems / G::kBlock * G::kBytes;
        const uintptr_t a0 = src & ~uintptr_t{15};
        const uintptr_t a1 = (src + bytes + 15) & ~uintptr_t{15};
        const int n16 = static_cast<int>((a1 - a0) >> 4);
        uint8_t* dst = ring + (i % kStages) * G::kSlot;
        for (int q = lane; q < n16; q += 32) CpAsync16(dst + 16 * q, a0 + 16 * q);
      }
    }
    CpAsyncCommit();  // always: keeps the group count uniform
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);

  // Stage x (the weight copies are already in flight).
  if (x_vector) {
    const int n8 = n_in / 8;
    for (int t = 0; t < NT; ++t) {
      const uint4* src = reinterpret_cast<const uint4*>(x + t * ldx);
      uint4* dst = reinterpret_cast<uint4*>(xs + static_cast<int64_t>(t) * n_in);
      for (int q = threadIdx.x; q < n8; q += kThreads) dst[q] = src[q];
    }
  } else {
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
    for (int t = 0; t < NT; ++t) {
      for (int q = threadIdx.x; q < n_in; q += kThreads) {
        xs[static_cast<int64_t>(t) * n_in + q] = xb[t * ldx + q];
      }
    }
  }
  __syncthreads();

  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;

  int64_t i = 0;
  for (int64_t j = 0; j < my_groups; ++j) {
    int64_t r = 0;
    for (int m = 0; m < tiles_per_group; ++m, ++i) {
      issue(i + kStages - 1);
      CpAsyncWait<kStages - 1>();
      __syncwarp();
      int k = 0, elems = 0;
      const uintptr_t src = tile_of(i, &r, &k, &elems);
      if (r < n_out) {
        const uint8_t* tile = ring + (i % kStages) * G::kSlot + (src & 15);
        const int n_pieces = elems / 8;
        const int col0 = k * G::kTile;
        for (int p = lane; p < n_pieces; p += 32) {
          float wv[8];
          DecodePiece<T>(tile, 8 * p, wv);
          const int c = col0 + 8 * p;
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            const uint4 xv =
                *reinterpret_cast<const uint4*>(xs + static_cast<int64_t>(t) * n_in + c);
            const float2 x0 = Bf16PairToFloat2(xv.x), x1 = Bf16PairToFloat2(xv.y);
            const float2 x2 = Bf16PairToFloat2(xv.z), x3 = Bf16PairToFloat2(xv.w);
            float a = acc[t];
            a = fmaf(wv[0], x0.x, a);
            a = fmaf(wv[1], x0.y, a);
            a = fmaf(wv[2], x1.x, a);
            a = fmaf(wv[3], x1.y, a);
            a = fmaf(wv[4], x2.x, a);
            a = fmaf(wv[5], x2.y, a);
            a = fmaf(wv[6], x3.x, a);
            a = fmaf(wv[7], x3.y, a);
            acc[t] = a;
          }
        }
      }
      __syncwarp();  // the slot is refilled by the next issue
    }
    // End of the group's row: warp sums, then (split > 1) the row's partials.
    float sum[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      sum[t] = WarpSum(acc[t]);
      acc[t] = 0.0f;
    }
    if (split == 1) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (lane == t && r < n_out) {
          float* out = y + t * ldy + r;
          *out = beta != 0.0f ? fmaf(beta, *out, sum[t]) : sum[t];
        }
      }
    } else {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (lane == t) partial[warp * kMaxTokensPerPass + t] = sum[t];
      }
      __syncthreads();
      if (sub == 0 && lane < NT && r < n_out) {
        float s = partial[warp * kMaxTokensPerPass + lane];
        for (int q = 1; q < split; ++q) s += partial[(warp + q) * kMaxTokensPerPass + lane];
        float* out = y + lane * ldy + r;
        *out = beta != 0.0f ? fmaf(beta, *out, s) : s;
      }
      __syncthreads();  // partial is rewritten by the next group
    }
  }
  CpAsyncWait<0>();
}

struct DeviceLimits {
  int n_sm = 0;
  int smem_per_sm = 0;
  int smem_per_block = 0;  // opt-in maximum
};

cudaError_t GetLimits(DeviceLimits* out) {
  static std::atomic<int> cache[16][3];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::atomic<int>* c = cache[device & 15];
  if (c[0].load(std::memory_order_acquire) == 0) {
    int v[3] = {0, 0, 0};
    const cudaDeviceAttr attrs[3] = {cudaDevAttrMultiProcessorCount,
                                     cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                     cudaDevAttrMaxSharedMemoryPerBlockOptin};
    for (int i = 0; i < 3; ++i) {
      err = cudaDeviceGetAttribute(&v[i], attrs[i], device);
      if (err != cudaSuccess) return err;
    }
    c[2].store(v[2], std::memory_order_relaxed);
    c[1].store(v[1], std::memory_order_relaxed);
    c[0].store(v[0], std::memory_order_release);
  }
  out->n_sm = c[0].load(std::memory_order_acquire);
  out->smem_per_sm = c[1].load(std::memory_order_relaxed);
  out->smem_per_block = c[2].load(std::memory_order_relaxed);
  return cudaSuccess;
}

int64_t XBytes(int nt, int64_t n_in) { return (nt * n_in * 2 + 15) / 16 * 16; }

// The rings and the split-row partial sums (kWarps x 8 floats).
template <TensorType T>
int64_t RingBytes() {
  return static_cast<int64_t>(kWarps) * kStages * Geometry<T>::kSlot +
         kWarps * kMaxTokensPerPass * 4;
}

template <TensorType T>
int TokensPerPass(int64_t n_in, const DeviceLimits& lim) {
  // Leave 1 KiB per SM for the runtime's reserved shared memory.
  const int64_t budget = std::min<int64_t>(lim.smem_per_block, lim.smem_per_sm - 1024);
  int nt = kMaxTokensPerPass;
  while (nt > 0 && XBytes(nt, n_in) + RingBytes<T>() > budget) --nt;
  return nt;
}

template <TensorType T, int NT>
cudaError_t LaunchPass(const uint8_t* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                       const __nv_bfloat16* x, int64_t ldx, float* y, int64_t ldy, float beta,
                       const DeviceLimits& lim, cudaStream_t stream) {
  static std::atomic<size_t> raised[16];
  static std::atomic<int> regs{0};  // registers per thread of this instantiation
  const int64_t smem = XBytes(NT, n_in) + RingBytes<T>();
  cudaError_t err = EnsureDynamicSmem(QuantGemvKernel<T, NT>, static_cast<size_t>(smem), raised);
  if (err != cudaSuccess) return err;
  if (regs.load(std::memory_order_relaxed) == 0) {
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, QuantGemvKernel<T, NT>);
    if (err != cudaSuccess) return err;
    regs.store(std::max(attr.numRegs, 1), std::memory_order_relaxed);
  }
  // Blocks resident per SM (threads, shared memory, registers: 64 K per SM,
  // allocated per warp in units of 256), so that the grid is one wave.
  const int64_t regs_per_block =
      kWarps * CeilDiv(int64_t{32} * regs.load(std::memory_order_relaxed), 256) * 256;
  const int64_t per_sm =
      std::max<int64_t>(1, std::min({int64_t{2048 / kThreads}, lim.smem_per_sm / (smem + 1024),
                                     int64_t{65536} / regs_per_block}));
  const int tiles_per_row = static_cast<int>(CeilDiv(n_in, Geometry<T>::kTile));
  // Warps per row: enough warps busy (about twice the resident ones) for
  // small n_out, never more than the row's tiles.
  const int64_t resident_warps = lim.n_sm * per_sm * kWarps;
  int split = 1;
  while (split < kWarps && split * 2 <= tiles_per_row && n_out * split < 2 * resident_warps) {
    split *= 2;
  }
  const int64_t n_groups = CeilDiv(n_out, kWarps / split);
  const int64_t blocks = std::min<int64_t>(n_groups, lim.n_sm * per_sm);
  const bool x_vector = reinterpret_cast<uintptr_t>(x) % 16 == 0 && ldx % 8 == 0;
  QuantGemvKernel<T, NT>
      <<<static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(smem), stream>>>(
          w, row_bytes, n_out, static_cast<int>(n_in), tiles_per_row, split, x, ldx, x_vector, y,
          ldy, beta);
  return cudaGetLastError();
}

template <TensorType T>
cudaError_t Launch(const void* w, int64_t row_bytes, int64_t n_out, int64_t n_in,
                   const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens, float* y, int64_t ldy,
                   float beta, cudaStream_t stream) {
  using G = Geometry<T>;
  if (row_bytes < n_in / G::kBlock * G::kBytes || row_bytes % 2 != 0 ||
      ((T == TensorType::kQ4_K || T == TensorType::kQ5_K) && row_bytes % 16 != 0)) {
    return cudaErrorInvalidValue;
  }
  if (n_out == 0 || n_tokens == 0) return cudaSuccess;
  if (w == nullptr || x == nullptr || y == nullptr || reinterpret_cast<uintptr_t>(w) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  DeviceLimits lim;
  cudaError_t err = GetLimits(&lim);
  if (err != cudaSuccess) return err;
  const int per_pass = TokensPerPass<T>(n_in, lim);
  if (per_pass == 0) return cudaErrorInvalidValue;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  for (int64_t t0 = 0; t0 < n_tokens; t0 += per_pass) {
    const int nt = static_cast<int>(std::min<int64_t>(per_pass, n_tokens - t0));
    const __nv_bfloat16* xp = x + t0 * ldx;
    float* yp = y + t0 * ldy;
    switch (nt) {
      case 1:
        err = LaunchPass<T, 1>(wb, row_bytes, n_out, n_in, xp, ldx, yp, ldy, beta, lim, stream);
        break;
      case 2:
        err = LaunchPass<T, 2>(wb, row_bytes, n_out, n_in, xp, ldx, yp, ldy, beta, lim, stream);
        break;
      case 3:
        err = LaunchPass<T, 3>(wb, row_bytes, n_out, n_in, xp, ldx, yp, ldy, beta, lim, stream);
        break;
      case 4:
        err = LaunchPass<T, 4>(wb, row_bytes, n_out, n_in, xp, ldx, yp, ldy, beta, lim, stream);
        break;
      case 5:
        err = LaunchPass<T, 5>(wb, row_bytes, n_out, n_in, xp, ldx, yp, ldy, beta, lim, stream);
        break;
      case 6:
        err = LaunchPass<T, 6>(wb, row_bytes, n_out, n_in, xp, ldx, yp, ldy, beta, lim, stream);
        break;
      case 7:
        err = LaunchPass<T, 7>(wb, row_bytes, n_out, n_in, xp, ldx, yp, ldy, beta, lim, stream);
        break;
      default:
        err = LaunchPass<T, 8>(wb, row_bytes, n_out, n_in, xp, ldx, yp, ldy, beta, lim, stream);
        break;
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

bool CanQuantGemv(TensorType type) {
  switch (type) {
    case TensorType::kBF16:
    case TensorType::kF16:
    case TensorType::kQ4_0:
    case TensorType::kQ5_0:
    case TensorType::kQ8_0:
    case TensorType::kQ4_K:
    case TensorType::kQ5_K:
    case TensorType::kQ6_K:
    case TensorType::kIQ4_XS: return true;
    default: return false;
  }
}

int QuantGemvTokensPerPass(TensorType type, int64_t n_in) {
  DeviceLimits lim;
  if (!CanQuantGemv(type) || n_in <= 0 || GetLimits(&lim) != cudaSuccess) return 0;
  switch (type) {
    case TensorType::kBF16: return TokensPerPass<TensorType::kBF16>(n_in, lim);
    case TensorType::kF16: return TokensPerPass<TensorType::kF16>(n_in, lim);
    case TensorType::kQ4_0: return TokensPerPass<TensorType::kQ4_0>(n_in, lim);
    case TensorType::kQ5_0: return TokensPerPass<TensorType::kQ5_0>(n_in, lim);
    case TensorType::kQ8_0: return TokensPerPass<TensorType::kQ8_0>(n_in, lim);
    case TensorType::kQ4_K: return TokensPerPass<TensorType::kQ4_K>(n_in, lim);
    case TensorType::kQ5_K: return TokensPerPass<TensorType::kQ5_K>(n_in, lim);
    case TensorType::kQ6_K: return TokensPerPass<TensorType::kQ6_K>(n_in, lim);
    case TensorType::kIQ4_XS: return TokensPerPass<TensorType::kIQ4_XS>(n_in, lim);
    default: return 0;
  }
}

cudaError_t QuantGemv(TensorType type, const void* w, int64_t row_bytes, int64_t n_out,
                      int64_t n_in, const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens, float* y,
                      int64_t ldy, float beta, cudaStream_t stream) {
  if (!CanQuantGemv(type) || n_out < 0 || n_in <= 0 || n_in > (int64_t{1} << 24) ||
      n_in % 32 != 0 || n_in % BlockElems(type) != 0 || n_tokens < 0 || ldx < n_in || ldy < n_out) {
    return cudaErrorInvalidValue;
  }
  // The direct kernel (gemv_direct.h) unless KTX_GEMV_KERNEL / SetGemvKernel say "ring".
  if (CanDirectGemv(type, row_bytes)) {
    const GemvKernelChoice choice = CurrentGemvKernel();
    if (choice.kernel != GemvKernel::kRing) {  // kQ8 without a workspace: direct
      return DirectGemv(type, w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                        choice.direct, stream);
    }
  }
  switch (type) {
    case TensorType::kBF16:
      return Launch<TensorType::kBF16>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                                       stream);
    case TensorType::kF16:
      return Launch<TensorType::kF16>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                                      stream);
    case TensorType::kQ4_0:
      return Launch<TensorType::kQ4_0>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                                       stream);
    case TensorType::kQ5_0:
      return Launch<TensorType::kQ5_0>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                                       stream);
    case TensorType::kQ8_0:
      return Launch<TensorType::kQ8_0>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                                       stream);
    case TensorType::kQ4_K:
      return Launch<TensorType::kQ4_K>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                                       stream);
    case TensorType::kQ5_K:
      return Launch<TensorType::kQ5_K>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                                       stream);
    case TensorType::kQ6_K:
      return Launch<TensorType::kQ6_K>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                                       stream);
    case TensorType::kIQ4_XS:
      return Launch<TensorType::kIQ4_XS>(w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta,
                                         stream);
    default: return cudaErrorInvalidValue;
  }
}

size_t QuantGemvWorkspaceBytes(int64_t n_in, int64_t n_tokens) {
  return Q8GemvWorkspaceBytes(n_in, n_tokens);
}

cudaError_t QuantGemv(TensorType type, const void* w, int64_t row_bytes, int64_t n_out,
                      int64_t n_in, const __nv_bfloat16* x, int64_t ldx, int64_t n_tokens, float* y,
                      int64_t ldy, float beta, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream) {
  const GemvKernelChoice choice = CurrentGemvKernel();
  if (choice.kernel == GemvKernel::kQ8 && CanQ8Gemv(type, row_bytes) && workspace != nullptr &&
      n_in > 0 && n_tokens > 0 && workspace_bytes >= Q8GemvWorkspaceBytes(n_in, n_tokens)) {
    Q8GemvConfig config;
    config.unroll = choice.direct.unroll;
    return Q8Gemv(type, w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta, workspace,
                  workspace_bytes, config, stream);
  }
  return QuantGemv(type, w, row_bytes, n_out, n_in, x, ldx, n_tokens, y, ldy, beta, stream);
}

}  // namespace ktx::kernels::cuda
