// File: kernels/cuda/skinny_gemm.cu
//
// The decode-sized bf16 product (skinny_gemm.h). Thread-safety: reentrant.
#include "kernels/cuda/skinny_gemm.h"

#include <algorithm>
#include <string>

#include "kernels/cuda/cuda_util.cuh"

namespace ktx::kernels::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileRows = 16;
constexpr int kStepK = 32;  // k per warp step (two m16n8k16 products)
constexpr int kPartialFloats = static_cast<int>(kSkinnyMaxTokens) * kTileRows;

struct Params {
  const __nv_bfloat16* w;
  int64_t ldw, w_batch_stride;
  const __nv_bfloat16* x;
  int64_t ldx, x_batch_stride;
  void* y;
  int64_t ldy, y_batch_stride;
  int n_out, n_in, n_tokens;
  float beta;
  int n_tiles;          // row tiles per product
  int tiles_per_block;  // 1, 2, 4, 8
  int split;            // blocks per tile (tiles_per_block == 1 when > 1)
  int steps_per_part;   // k-steps per (warp, block) part
  float* partials;      // [batch][n_tiles][split][kSkinnyMaxTokens][16] (split > 1)
  int* counters;        // [batch][n_tiles] (split > 1)
};

// Weights: read once, not kept in L1; L2::128B asks L2 to fetch the whole
// 128-byte line of each access (a lane's 16 bytes are a quarter of a row's
// 64 bytes per k-step), so that DRAM serves whole lines per row in one burst.
// (H200, 2026-11-29: the layer step 1.5-2 % faster than without the hint,
// the dense gate/up product 93 -> 98 % of the copy bandwidth; L2::256B was
// level with no hint.)
__device__ __forceinline__ uint4 LoadStream(const __nv_bfloat16* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 LoadCached(const __nv_bfloat16* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// d += A (16 x 16, rows g / g + 8) · B (16 x 8, column g), bf16 in, F32 out.
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <typename Y>
__device__ __forceinline__ void Store(Y* y, float v, float beta);
template <>
__device__ __forceinline__ void Store<float>(float* y, float v, float beta) {
  *y = beta != 0.0f ? fmaf(beta, *y, v) : v;
}
template <>
__device__ __forceinline__ void Store<__nv_bfloat16>(__nv_bfloat16* y, float v, float beta) {
  *y = __float2bfloat16_rn(beta != 0.0f ? fmaf(beta, __bfloat162float(*y), v) : v);
}

// NT column tiles of 8 tokens; U k-steps loaded ahead.
template <int NT, int U, bool kPipe, typename Y>
__global__ void __launch_bounds__(kThreads) SkinnyGemmKernel(Params p) {
  __shared__ float red[kWarps][NT * 8 * kTileRows];
  __shared__ int last_block;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4, c = lane % 4;
  const int64_t b = blockIdx.y;
  const int warps_per_tile = kWarps / p.tiles_per_block;
  const int tile_in_block = warp / warps_per_tile;
  const int wk = warp % warps_per_tile;
  const int s = static_cast<int>(blockIdx.x) % p.split;
  const int tile = (static_cast<int>(blockIdx.x) / p.split) * p.tiles_per_block + tile_in_block;
  const int row0 = tile * kTileRows;
  const int n_steps = (p.n_in + kStepK - 1) / kStepK;
  const int part = s * warps_per_tile + wk;
  const int step_begin = min(n_steps, part * p.steps_per_part);
  const int step_end = min(n_steps, step_begin + p.steps_per_part);

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

  if (tile < p.n_tiles) {
    const __nv_bfloat16* w = p.w + b * p.w_batch_stride;
    const __nv_bfloat16* x = p.x + b * p.x_batch_stride;
    // Rows past n_out read the last row (never stored).
    const __nv_bfloat16* w_lo =
        w + static_cast<int64_t>(min(row0 + g, p.n_out - 1)) * p.ldw + 8 * c;
    const __nv_bfloat16* w_hi =
        w + static_cast<int64_t>(min(row0 + g + 8, p.n_out - 1)) * p.ldw + 8 * c;
    // Round r loads U k-steps of W (and of x); with kPipe the loads of round
    // r + 1 are issued before round r is multiplied (two register sets).
    auto load = [&](int st, uint4(&wl)[U], uint4(&wh)[U], uint4(&xv)[U][NT]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = (st + u) * kStepK + 8 * c;
        const bool ok = st + u < step_end && k < p.n_in;
        const uint4 zero = make_uint4(0, 0, 0, 0);
        wl[u] = ok ? LoadStream(w_lo + (st + u) * kStepK) : zero;
        wh[u] = ok ? LoadStream(w_hi + (st + u) * kStepK) : zero;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int t = nt * 8 + g;
          xv[u][nt] =
              ok && t < p.n_tokens ? LoadCached(x + static_cast<int64_t>(t) * p.ldx + k) : zero;
        }
      }
    };
    auto multiply = [&](const uint4(&wl)[U], const uint4(&wh)[U], const uint4(&xv)[U][NT]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          Mma(acc[nt], wl[u].x, wh[u].x, wl[u].y, wh[u].y, xv[u][nt].x, xv[u][nt].y);
          Mma(acc[nt], wl[u].z, wh[u].z, wl[u].w, wh[u].w, xv[u][nt].z, xv[u][nt].w);
        }
      }
    };
    if constexpr (kPipe) {
      uint4 wl0[U], wh0[U], xv0[U][NT], wl1[U], wh1[U], xv1[U][NT];
      int st = step_begin;
      if (st < step_end) load(st, wl0, wh0, xv0);
      while (st < step_end) {
        if (st + U < step_end) load(st + U, wl1, wh1, xv1);
        multiply(wl0, wh0, xv0);
        st += U;
        if (st >= step_end) break;
        if (st + U < step_end) load(st + U, wl0, wh0, xv0);
        multiply(wl1, wh1, xv1);
        st += U;
      }
    } else {
      for (int st = step_begin; st < step_end; st += U) {
        uint4 wl[U], wh[U], xv[U][NT];
        load(st, wl, wh, xv);
        multiply(wl, wh, xv);
      }
    }
  }
  // d0: (row g, token 2c), d1: (g, 2c + 1), d2: (g + 8, 2c), d3: (g + 8, 2c + 1);
  // red[warp][token * 16 + row].
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int t = nt * 8 + 2 * c;
    red[warp][t * kTileRows + g] = acc[nt][0];
    red[warp][(t + 1) * kTileRows + g] = acc[nt][1];
    red[warp][t * kTileRows + g + 8] = acc[nt][2];
    red[warp][(t + 1) * kTileRows + g + 8] = acc[nt][3];
  }
  __syncthreads();
  // The warps of a tile add their sums in warp order.
  const int n_out_tile = NT * 8 * kTileRows;
  const int tid_in_tile = wk * 32 + lane;
  const int threads_per_tile = warps_per_tile * 32;
  const int first_warp = tile_in_block * warps_per_tile;
  Y* y = static_cast<Y*>(p.y) + b * p.y_batch_stride;
  if (p.split == 1) {
    if (tile >= p.n_tiles) return;
    for (int i = tid_in_tile; i < n_out_tile; i += threads_per_tile) {
      const int t = i / kTileRows, r = row0 + i % kTileRows;
      if (t >= p.n_tokens || r >= p.n_out) continue;
      float v = red[first_warp][i];
      for (int j = 1; j < warps_per_tile; ++j) v += red[first_warp + j][i];
      Store(y + static_cast<int64_t>(t) * p.ldy + r, v, p.beta);
    }
    return;
  }
  // split > 1 (one tile per block): this block's sum to the workspace; the
  // last block of the tile adds all of them in block order.
  const int64_t tile_id = b * p.n_tiles + tile;
  float* partial = p.partials + (tile_id * p.split) * kPartialFloats;
  for (int i = threadIdx.x; i < n_out_tile; i += kThreads) {
    float v = red[0][i];
    for (int j = 1; j < kWarps; ++j) v += red[j][i];
    partial[s * kPartialFloats + i] = v;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&p.counters[tile_id], 1) == p.split - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for (int i = threadIdx.x; i < n_out_tile; i += kThreads) {
    const int t = i / kTileRows, r = row0 + i % kTileRows;
    if (t >= p.n_tokens || r >= p.n_out) continue;
    float v = __ldcg(partial + i);
    for (int j = 1; j < p.split; ++j) v += __ldcg(partial + j * kPartialFloats + i);
    Store(y + static_cast<int64_t>(t) * p.ldy + r, v, p.beta);
  }
  if (threadIdx.x == 0) p.counters[tile_id] = 0;
}

template <int NT, typename Y>
cudaError_t LaunchNt(const Params& p, dim3 grid, int unroll, bool pipelined, cudaStream_t stream) {
  // Wider column tiles hold 4 NT accumulators per lane: unrolling more k-steps
  // on top would cost occupancy (146 registers at NT = 8, unroll 4).
  if constexpr (NT <= 2) {
    if (pipelined) {
      if (unroll >= 4) {
        SkinnyGemmKernel<NT, 4, true, Y><<<grid, kThreads, 0, stream>>>(p);
      } else {
        SkinnyGemmKernel<NT, 2, true, Y><<<grid, kThreads, 0, stream>>>(p);
      }
      return cudaGetLastError();
    }
    if (unroll >= 8) {
      SkinnyGemmKernel<NT, 8, false, Y><<<grid, kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    }
    if (unroll >= 4) {
      SkinnyGemmKernel<NT, 4, false, Y><<<grid, kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
  SkinnyGemmKernel<NT, 2, false, Y><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Y>
cudaError_t Launch(const Params& p, dim3 grid, int unroll, bool pipelined, cudaStream_t stream) {
  if (p.n_tokens <= 8) return LaunchNt<1, Y>(p, grid, unroll, pipelined, stream);
  if (p.n_tokens <= 16) return LaunchNt<2, Y>(p, grid, unroll, pipelined, stream);
  if (p.n_tokens <= 32) return LaunchNt<4, Y>(p, grid, unroll, pipelined, stream);
  return LaunchNt<8, Y>(p, grid, unroll, pipelined, stream);
}

int64_t Tiles(int64_t n_out) { return (n_out + kTileRows - 1) / kTileRows; }
int64_t Steps(int64_t n_in) { return (n_in + kStepK - 1) / kStepK; }

}  // namespace

SkinnyGemmPlan PlanSkinnyGemm(int64_t n_out, int64_t n_in, int64_t batch, int n_sm) {
  SkinnyGemmPlan plan;
  plan.n_out = n_out;
  plan.n_in = n_in;
  plan.batch = std::max<int64_t>(batch, 1);
  const int64_t tiles = Tiles(n_out) * plan.batch;
  const int64_t steps = Steps(n_in);
  // Warps per tile: all 8 of a block when every warp still gets >= 4
  // k-steps (a tile per block: blocks stay small, so that the hardware
  // scheduler balances them over the SMs), fewer for short rows.
  int warps_per_tile = 1;
  while (warps_per_tile < kWarps && steps >= 4 * int64_t{2 * warps_per_tile}) warps_per_tile *= 2;
  plan.tiles_per_block = kWarps / warps_per_tile;
  plan.split = 1;
  // Blocks for fewer than half the SMs: cut each tile's k range among `split`
  // blocks (~4 per SM), each warp keeping >= 2 k-steps. (Measured on the
  // H200: 36 tiles of 224 k-steps 18.6 us unsplit, 7.5 us in 14 parts; 96,
  // 256 and 448 tiles run as fast or faster unsplit than split.)
  const int64_t blocks = (tiles + plan.tiles_per_block - 1) / plan.tiles_per_block;
  const int64_t target_blocks = 4 * static_cast<int64_t>(std::max(n_sm, 1));
  if (plan.tiles_per_block == 1 && 2 * blocks < std::max(n_sm, 1)) {
    const int64_t want = (target_blocks + blocks - 1) / blocks;
    const int64_t most = steps / (2 * int64_t{kWarps});
    plan.split = static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
  }
  // Between half a tile and one tile per SM, rows of >= 128 k-steps: two
  // parts per tile. (H200, 2026-11-29: q_a, 96 tiles of 224 k-steps, 12.2 us
  // unsplit, 10.7 in 2 parts, 11.0 in 3; q_a + kv_a stacked, 132 tiles,
  // 13.3-13.7 against 12.6-12.9.)
  if (plan.tiles_per_block == 1 && plan.split == 1 && 2 * blocks >= std::max(n_sm, 1) &&
      blocks <= std::max(n_sm, 1) && steps >= 128) {
    plan.split = 2;
  }
  // Long rows on a few tiles per SM (>= 256 k-steps, under 6 tiles per SM):
  // a block per tile leaves the SMs that drew one block more than the others
  // working alone at the end (attn_output, 448 tiles of 512 k-steps on 132
  // SMs: 78 % of the copy bandwidth at 1 token). Cut each tile's k range so
  // that a warp keeps ~10 k-steps: more, shorter blocks that the scheduler
  // evens out. (Measured on the H200, 2026-11-29: attn_output at 1 token
  // 72.2 us unsplit, 68.7 / 68.3 / 69.7 / 66.0 / 65.0 / 67.9 / 69.2 in 2..8
  // parts; shorter rows lose with a split: shexp_gate_up (224 k-steps, 256
  // tiles) 18.9 us against 21.9-24.8, q_b (48) 23.6 against 32.8-60.7.)
  constexpr int64_t kLongRowSteps = 256;
  constexpr int64_t kStepsPerWarp = 10;
  if (plan.tiles_per_block == 1 && plan.split == 1 && steps >= kLongRowSteps &&
      tiles < 6 * static_cast<int64_t>(std::max(n_sm, 1))) {
    plan.split = static_cast<int>(
        std::clamp<int64_t>(steps / (int64_t{kWarps} * kStepsPerWarp), 1, int64_t{8}));
  }
  // Rounds of 2 k-steps, the next round's loads in flight while a round is
  // multiplied, where a warp has >= 2 rounds (measured on the H200: 93 % of
  // the copy bandwidth on 36864 x 7168, against 59 % loading 4 steps and
  // then multiplying them); shorter parts load everything first.
  const int64_t parts = int64_t{warps_per_tile} * plan.split;
  const int64_t steps_per_part = (steps + parts - 1) / parts;
  plan.unroll = 2;
  plan.pipelined = steps_per_part >= 4;
  return plan;
}

size_t SkinnyGemmCounterOffset(const SkinnyGemmPlan& plan) {
  if (plan.split <= 1) return 0;
  return static_cast<size_t>(plan.batch * Tiles(plan.n_out) * plan.split) * kPartialFloats *
         sizeof(float);
}

size_t SkinnyGemmWorkspaceBytes(const SkinnyGemmPlan& plan) {
  if (plan.split <= 1) return 0;
  const size_t counters = static_cast<size_t>(plan.batch * Tiles(plan.n_out)) * sizeof(int);
  return SkinnyGemmCounterOffset(plan) + (counters + 15) / 16 * 16;
}

std::string SkinnyGemmUnsupportedReason(const SkinnyGemmArgs& a) {
  auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (a.w == nullptr || a.x == nullptr || a.y == nullptr) return "null pointer";
  if (a.n_tokens < 1 || a.n_tokens > kSkinnyMaxTokens) {
    return "n_tokens " + std::to_string(a.n_tokens) + " outside 1.." +
           std::to_string(kSkinnyMaxTokens);
  }
  if (a.n_out < 1 || a.n_in < 8 || a.n_in % 8 != 0 || a.batch < 1) {
    return "shape " + std::to_string(a.n_out) + " x " + std::to_string(a.n_in) +
           " (n_in must be a positive multiple of 8)";
  }
  if (a.n_out > (int64_t{1} << 30) || a.n_in > (int64_t{1} << 30) || a.batch > 65535) {
    return "shape too large";
  }
  if (!aligned16(a.w) || !aligned16(a.x)) return "w and x must be 16-byte aligned";
  if (a.ldw % 8 != 0 || a.ldx % 8 != 0 || a.w_batch_stride % 8 != 0 || a.x_batch_stride % 8 != 0) {
    return "ldw, ldx and the batch strides of w and x must be multiples of 8 elements";
  }
  if (a.ldw < a.n_in || a.ldx < a.n_in || a.ldy < a.n_out) return "a leading dimension too small";
  return "";
}

cudaError_t SkinnyGemm(const SkinnyGemmArgs& a, const SkinnyGemmPlan& plan, void* workspace,
                       size_t workspace_bytes, cudaStream_t stream) {
  if (!SkinnyGemmUnsupportedReason(a).empty()) return cudaErrorInvalidValue;
  if (plan.n_out != a.n_out || plan.n_in != a.n_in || plan.batch != a.batch ||
      plan.tiles_per_block < 1 || plan.tiles_per_block > kWarps ||
      kWarps % plan.tiles_per_block != 0 || plan.split < 1 ||
      (plan.split > 1 && plan.tiles_per_block != 1)) {
    return cudaErrorInvalidValue;
  }
  if (plan.split > 1 && (workspace == nullptr || workspace_bytes < SkinnyGemmWorkspaceBytes(plan) ||
                         reinterpret_cast<uintptr_t>(workspace) % 16 != 0)) {
    return cudaErrorInvalidValue;
  }
  Params p;
  p.w = a.w;
  p.ldw = a.ldw;
  p.w_batch_stride = a.w_batch_stride;
  p.x = a.x;
  p.ldx = a.ldx;
  p.x_batch_stride = a.x_batch_stride;
  p.y = a.y;
  p.ldy = a.ldy;
  p.y_batch_stride = a.y_batch_stride;
  p.n_out = static_cast<int>(a.n_out);
  p.n_in = static_cast<int>(a.n_in);
  p.n_tokens = static_cast<int>(a.n_tokens);
  p.beta = a.beta;
  p.n_tiles = static_cast<int>(Tiles(a.n_out));
  p.tiles_per_block = plan.tiles_per_block;
  p.split = plan.split;
  const int64_t parts = int64_t{kWarps} / plan.tiles_per_block * plan.split;
  p.steps_per_part = static_cast<int>((Steps(a.n_in) + parts - 1) / parts);
  p.partials = plan.split > 1 ? static_cast<float*>(workspace) : nullptr;
  p.counters =
      plan.split > 1
          ? reinterpret_cast<int*>(static_cast<uint8_t*>(workspace) + SkinnyGemmCounterOffset(plan))
          : nullptr;
  const int64_t blocks =
      (Tiles(a.n_out) + plan.tiles_per_block - 1) / plan.tiles_per_block * plan.split;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(a.batch));
  return a.y_bf16 ? Launch<__nv_bfloat16>(p, grid, plan.unroll, plan.pipelined, stream)
                  : Launch<float>(p, grid, plan.unroll, plan.pipelined, stream);
}

}  // namespace ktx::kernels::cuda
