#include "kernels/cuda/mla.h"

#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_util.cuh"
#include "kernels/cuda/rope.cuh"

namespace ktx::kernels::cuda {
namespace {

constexpr int kMaxPairs = kRopeMaxPairs;
constexpr int kTile = 32;                   // KV rows per shared-memory tile
constexpr int kMaxKvLora = 512;             // accumulators per lane: kv_lora / 32
constexpr int kAccWords = kMaxKvLora / 64;  // bf16 pairs of the latent per lane
// Rows: one tensor-core tile; shorter splits cost more to merge.
constexpr int64_t kMinSplitLen = 64;
// Rows per block above which the tensor-core kernel takes form 3.
constexpr int64_t kTcLongRangeRows = 1024;
constexpr int32_t kMaxSplits = 256;
constexpr size_t kWorkspaceAlign = 256;

size_t AlignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

__device__ __forceinline__ __nv_bfloat16* CacheRow(const MlaPagedKv& kv, int32_t seq, int64_t pos,
                                                   int row_width) {
  const int32_t page =
      kv.block_table[static_cast<int64_t>(seq) * kv.block_table_stride + pos / kv.page_size];
  return kv.data + static_cast<int64_t>(page) * kv.page_stride + (pos % kv.page_size) * row_width;
}

// Asynchronous global -> shared copies (sm_80+): issued back to back, so a
// tile's loads are all in flight at once; src_bytes 0 writes zeros.
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void CpAsync4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src)
               : "memory");
}

__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most kPending of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Element offsets of the cache rows t0 .. t0 + n_rows - 1 of one sequence
// (-1 past n_rows), written by the threads of index `thread` < n.
__device__ __forceinline__ void TileRowOffsets(const MlaPagedKv& kv, const int32_t* table,
                                               int64_t t0, int n_rows, int row_width, int n,
                                               int thread, int64_t* out) {
  if (thread < n) {
    const int r = thread;
    const int64_t pos = t0 + r;
    out[r] = r < n_rows ? static_cast<int64_t>(table[pos / kv.page_size]) * kv.page_stride +
                              (pos % kv.page_size) * row_width
                        : -1;
  }
}

// The KV write of token t (one block): [rmsnorm(c) * kv_norm | rope(k_pe)]
// into its cache row, with the rope table of its position (cos_t / sin_t:
// shared, filled here; `scratch` 32 floats of shared memory).
__device__ __forceinline__ void WriteKvRow(const float* kva, int64_t kva_stride,
                                           const float* kv_norm, float eps, int32_t kv_lora,
                                           const RopeParams& rope, const int32_t* positions,
                                           const int32_t* seq_index, const MlaPagedKv& kv,
                                           int64_t t, double* cos_t, double* sin_t,
                                           float* scratch) {
  const float* src = kva + t * kva_stride;
  // The row and the norm's weights are loaded before the rope table is
  // computed (rows of up to 4 values per thread: DeepSeek's 512 on 256
  // threads), so that their latency overlaps it; the sums keep their order.
  constexpr int kRegs = 4;
  const bool in_regs = kv_lora <= kRegs * static_cast<int>(blockDim.x);
  float v[kRegs], wv[kRegs];
#pragma unroll
  for (int k = 0; k < kRegs; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    v[k] = in_regs && i < kv_lora ? src[i] : 0.0f;
    wv[k] = in_regs && i < kv_lora ? kv_norm[i] : 0.0f;
  }
  const int64_t pos = positions[t];
  RopeTable(rope, pos, cos_t, sin_t);
  float ss = 0.0f;
  if (in_regs) {
#pragma unroll
    for (int k = 0; k < kRegs; ++k) {
      if (threadIdx.x + k * blockDim.x < kv_lora) ss = fmaf(v[k], v[k], ss);
    }
  } else {
    for (int i = threadIdx.x; i < kv_lora; i += blockDim.x) ss = fmaf(src[i], src[i], ss);
  }
  ss = BlockSum(ss, scratch);  // its barriers also publish the rope table
  const float scale = 1.0f / sqrtf(ss / static_cast<float>(kv_lora) + eps);
  __nv_bfloat16* row = CacheRow(kv, seq_index[t], pos, kv_lora + rope.n_rot);
  if (in_regs) {
#pragma unroll
    for (int k = 0; k < kRegs; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < kv_lora) row[i] = __float2bfloat16_rn(v[k] * scale * wv[k]);
    }
  } else {
    for (int i = threadIdx.x; i < kv_lora; i += blockDim.x) {
      row[i] = __float2bfloat16_rn(src[i] * scale * kv_norm[i]);
    }
  }
  for (int i = threadIdx.x; i < rope.n_rot / 2; i += blockDim.x) {
    float a, b;
    RopePair(cos_t, sin_t, i, src + kv_lora, &a, &b);
    row[kv_lora + 2 * i] = __float2bfloat16_rn(a);
    row[kv_lora + 2 * i + 1] = __float2bfloat16_rn(b);
  }
}

__global__ void WriteKvKernel(const float* kva, int64_t kva_stride, const float* kv_norm, float eps,
                              int32_t kv_lora, RopeParams rope, const int32_t* positions,
                              const int32_t* seq_index, MlaPagedKv kv) {
  __shared__ float scratch[32];
  __shared__ double cos_t[kMaxPairs];
  __shared__ double sin_t[kMaxPairs];
  WriteKvRow(kva, kva_stride, kv_norm, eps, kv_lora, rope, positions, seq_index, kv, blockIdx.x,
             cos_t, sin_t, scratch);
}

// One block: one token, kPrepareHeads heads. A decode step has one token, so
// the heads are what spreads the work over the GPU (a single block for all
// 128 heads took ~40 us, latency-bound, on an H200).
constexpr int kPrepareHeads = 8;

// With write_kv, the last block of each token (blockIdx.y == gridDim.y - 1)
// writes the token's KV row instead (MlaWriteKv's work in the same launch).
__global__ void PrepareQKernel(const float* q, int64_t q_stride, int32_t n_head, int32_t qk_nope,
                               int32_t kv_lora, RopeParams rope, const int32_t* positions,
                               __nv_bfloat16* q_nope, int64_t q_nope_stride, float* big_q,
                               int64_t big_q_stride, MlaKvWrite write_kv) {
  __shared__ double cos_t[kMaxPairs];
  __shared__ double sin_t[kMaxPairs];
  const int64_t t = blockIdx.x;
  if (write_kv.kva != nullptr && blockIdx.y == gridDim.y - 1) {  // block-uniform
    __shared__ float scratch[32];
    WriteKvRow(write_kv.kva, write_kv.kva_stride, write_kv.kv_norm, write_kv.eps, kv_lora, rope,
               positions, write_kv.seq_index, write_kv.kv, t, cos_t, sin_t, scratch);
    return;
  }
  const int h0 = blockIdx.y * kPrepareHeads;
  const int n_heads = min(kPrepareHeads, n_head - h0);
  RopeTable(rope, positions[t], cos_t, sin_t);
  const int hd = qk_nope + rope.n_rot;
  const int rw = kv_lora + rope.n_rot;
  const float* src = q + t * q_stride + static_cast<int64_t>(h0) * hd;
  __nv_bfloat16* dst_nope = q_nope + t * q_nope_stride + static_cast<int64_t>(h0) * qk_nope;
  // The copy's loads are in flight while the table's first threads compute.
#pragma unroll 4
  for (int j = threadIdx.x; j < n_heads * qk_nope; j += blockDim.x) {
    const int h = j / qk_nope, c = j - h * qk_nope;
    dst_nope[j] = __float2bfloat16_rn(src[h * hd + c]);
  }
  __syncthreads();
  const int n_pairs = rope.n_rot / 2;
  for (int j = threadIdx.x; j < n_heads * n_pairs; j += blockDim.x) {
    const int h = j / n_pairs, i = j - h * n_pairs;
    float a, b;
    RopePair(cos_t, sin_t, i, src + h * hd + qk_nope, &a, &b);
    float* dst = big_q + t * big_q_stride + static_cast<int64_t>(h0 + h) * rw + kv_lora;
    dst[2 * i] = a;
    dst[2 * i + 1] = b;
  }
}

// One block: one query token, kHeads heads (one warp each), one KV range.
// Shared memory: the kHeads query rows (F32) and a tile of kTile cache rows
// (bf16 pairs, row stride odd in words so that lane r reading column w of row
// r hits bank (r * stride + w) % 32: all different).
template <int kHeads>
__global__ void __launch_bounds__(kHeads * 32)
    MlaSplitKernel(MlaAttentionArgs a, int32_t n_splits, int32_t split_len, float* part_acc,
                   float2* part_ml) {
  extern __shared__ float smem[];
  const int rw = a.kv_lora + a.n_rot;
  const int rw_words = rw / 2;
  const int kvl_words = a.kv_lora / 2;
  const int stride_words = rw_words | 1;
  float* sq = smem;
  uint32_t* skv = reinterpret_cast<uint32_t*>(smem + kHeads * rw);
  int64_t* s_rowoff = reinterpret_cast<int64_t*>(skv + kTile * stride_words);
  const int64_t qi = blockIdx.x;
  const int h0 = blockIdx.y * kHeads;
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int head = h0 + warp;
  const bool head_ok = head < a.n_head;
  const int32_t seq = a.q_seq[qi];
  const int64_t n_kv = static_cast<int64_t>(a.q_pos[qi]) + 1;
  const int64_t begin = static_cast<int64_t>(split) * split_len;
  const int64_t end = min(n_kv, begin + split_len);

  for (int i = threadIdx.x; i < kHeads * rw; i += blockDim.x) {
    const int hh = i / rw;
    sq[i] = h0 + hh < a.n_head ? a.q[qi * a.q_stride + static_cast<int64_t>(h0 + hh) * rw + i % rw]
                               : 0.0f;
  }
  float m = -INFINITY;
  float l = 0.0f;
  float acc[2 * kAccWords];
#pragma unroll
  for (int k = 0; k < 2 * kAccWords; ++k) acc[k] = 0.0f;
  const int32_t* table = a.kv.block_table + static_cast<int64_t>(seq) * a.kv.block_table_stride;

  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and sq is written on the first pass)
    const int n_rows = static_cast<int>(min(static_cast<int64_t>(kTile), end - t0));
    TileRowOffsets(a.kv, table, t0, n_rows, rw, kTile, threadIdx.x, s_rowoff);
    __syncthreads();
    for (int i = threadIdx.x; i < n_rows * rw_words; i += blockDim.x) {
      const int r = i / rw_words, w = i % rw_words;
      CpAsync4(&skv[r * stride_words + w],
               reinterpret_cast<const uint32_t*>(a.kv.data + s_rowoff[r]) + w);
    }
    CpAsyncWaitAll();
    __syncthreads();
    if (head_ok) {  // warp-uniform
      float s = -INFINITY;
      if (lane < n_rows) {
        const float* qh = sq + warp * rw;
        const uint32_t* row = skv + lane * stride_words;
        float dot0 = 0.0f, dot1 = 0.0f;
        for (int w = 0; w < rw_words; ++w) {
          const float2 c = Bf16PairToFloat2(row[w]);
          dot0 = fmaf(qh[2 * w], c.x, dot0);
          dot1 = fmaf(qh[2 * w + 1], c.y, dot1);
        }
        s = (dot0 + dot1) * a.scale;
      }
      const float m_new = fmaxf(m, WarpMax(s));
      const float p = lane < n_rows ? expf(s - m_new) : 0.0f;
      const float alpha = expf(m - m_new);  // 0 on the first tile
      l = l * alpha + WarpSum(p);
      m = m_new;
#pragma unroll
      for (int k = 0; k < 2 * kAccWords; ++k) acc[k] *= alpha;
      for (int r = 0; r < n_rows; ++r) {
        const float pr = __shfl_sync(kFullMask, p, r);
        const uint32_t* row = skv + r * stride_words;
#pragma unroll
        for (int k = 0; k < kAccWords; ++k) {
          const int w = lane + 32 * k;
          if (w < kvl_words) {
            const float2 c = Bf16PairToFloat2(row[w]);
            acc[2 * k] = fmaf(pr, c.x, acc[2 * k]);
            acc[2 * k + 1] = fmaf(pr, c.y, acc[2 * k + 1]);
          }
        }
      }
    }
  }
  if (!head_ok) return;
  if (n_splits == 1) {
    const float inv = 1.0f / l;
#pragma unroll
    for (int k = 0; k < kAccWords; ++k) {
      const int w = lane + 32 * k;
      if (w >= kvl_words) continue;
      const int64_t d = static_cast<int64_t>(head) * a.kv_lora + 2 * w;
      const float v0 = acc[2 * k] * inv, v1 = acc[2 * k + 1] * inv;
      if (a.out_bf16 != nullptr) {
        a.out_bf16[qi * a.out_bf16_stride + d] = __float2bfloat16_rn(v0);
        a.out_bf16[qi * a.out_bf16_stride + d + 1] = __float2bfloat16_rn(v1);
      }
      if (a.out_f32 != nullptr) {
        a.out_f32[qi * a.out_f32_stride + d] = v0;
        a.out_f32[qi * a.out_f32_stride + d + 1] = v1;
      }
    }
  } else {
    const int64_t slot = (qi * a.n_head + head) * n_splits + split;
    float* dst = part_acc + slot * a.kv_lora;
#pragma unroll
    for (int k = 0; k < kAccWords; ++k) {
      const int w = lane + 32 * k;
      if (w >= kvl_words) continue;
      dst[2 * w] = acc[2 * k];
      dst[2 * w + 1] = acc[2 * k + 1];
    }
    if (lane == 0) part_ml[slot] = make_float2(m, l);
  }
}

// o[j] += w · v[j] for four columns.
__device__ __forceinline__ void AddWeighted4(float (&o)[4], float w, const float4& v) {
  o[0] = fmaf(w, v.x, o[0]);
  o[1] = fmaf(w, v.y, o[1]);
  o[2] = fmaf(w, v.z, o[2]);
  o[3] = fmaf(w, v.w, o[3]);
}

// Merges the splits of one (query, head): out = Σ_s e^(m_s - M) acc_s / Σ_s e^(m_s - M) l_s.
__global__ void MlaMergeKernel(MlaAttentionArgs a, int32_t n_splits, const float* part_acc,
                               const float2* part_ml) {
  __shared__ float weight[kMaxSplits];
  __shared__ float inv_total;
  const int64_t qi = blockIdx.x;
  const int head = blockIdx.y;
  const int64_t base = (qi * a.n_head + head) * n_splits;
  const int width = a.kv_lora % 4 == 0 ? 4 : 1;
  // Where a thread has one group of four columns (kv_lora <= 4 x 128), its
  // first kPrefetch splits' values load now, while the first warp weighs the
  // splits: the two loads' latencies overlap instead of following each other.
  constexpr int kPrefetch = 16;
  const bool prefetch = width == 4 && a.kv_lora <= 4 * static_cast<int>(blockDim.x);
  const int d_pre = 4 * threadIdx.x;
  float4 pre[kPrefetch];
#pragma unroll
  for (int s = 0; s < kPrefetch; ++s) {
    pre[s] = prefetch && d_pre < a.kv_lora && s < n_splits
                 ? *reinterpret_cast<const float4*>(part_acc + (base + s) * a.kv_lora + d_pre)
                 : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  // The first warp weighs the splits (lanes over splits), the block sums.
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float mx = -INFINITY;
    for (int s = lane; s < n_splits; s += 32) {
      const float2 ml = part_ml[base + s];
      if (ml.y > 0.0f) mx = fmaxf(mx, ml.x);
    }
    mx = WarpMax(mx);
    float total = 0.0f;
    for (int s = lane; s < n_splits; s += 32) {
      const float2 ml = part_ml[base + s];
      weight[s] = ml.y > 0.0f ? expf(ml.x - mx) : 0.0f;
      total += weight[s] * ml.y;
    }
    total = WarpSum(total);
    if (lane == 0) inv_total = 1.0f / total;
  }
  __syncthreads();
  // Splits past a query's rows hold zeros (weight 0): no branch, so the
  // loads of all splits are in flight together; four columns per thread
  // where kv_lora % 4 == 0 (DeepSeek's 512), else one.
  const float inv = inv_total;
  const int64_t idx0 = static_cast<int64_t>(head) * a.kv_lora;
  for (int d = width * threadIdx.x; d < a.kv_lora; d += width * blockDim.x) {
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (prefetch) {  // the same adds in the same order, the first splits from registers
#pragma unroll
      for (int s = 0; s < kPrefetch; ++s) {
        if (s < n_splits) AddWeighted4(o, weight[s], pre[s]);
      }
      for (int s = kPrefetch; s < n_splits; ++s) {
        AddWeighted4(o, weight[s],
                     *reinterpret_cast<const float4*>(part_acc + (base + s) * a.kv_lora + d));
      }
    } else if (width == 4) {
#pragma unroll 8
      for (int s = 0; s < n_splits; ++s) {
        AddWeighted4(o, weight[s],
                     *reinterpret_cast<const float4*>(part_acc + (base + s) * a.kv_lora + d));
      }
    } else {
#pragma unroll 8
      for (int s = 0; s < n_splits; ++s) {
        o[0] = fmaf(weight[s], part_acc[(base + s) * a.kv_lora + d], o[0]);
      }
    }
    for (int j = 0; j < width; ++j) {
      const float r = o[j] * inv;
      if (a.out_bf16 != nullptr) {
        a.out_bf16[qi * a.out_bf16_stride + idx0 + d + j] = __float2bfloat16_rn(r);
      }
      if (a.out_f32 != nullptr) a.out_f32[qi * a.out_f32_stride + idx0 + d + j] = r;
    }
  }
}

size_t SplitSharedBytes(int heads, int row_width) {
  return static_cast<size_t>(heads) * row_width * sizeof(float) +
         static_cast<size_t>(kTile) * ((row_width / 2) | 1) * sizeof(uint32_t) +
         kTile * sizeof(int64_t);
}

template <int kHeads>
cudaError_t LaunchSplit(const MlaAttentionArgs& a, const MlaAttentionPlan& plan, float* part_acc,
                        float2* part_ml, cudaStream_t stream) {
  const size_t smem = SplitSharedBytes(kHeads, a.kv_lora + a.n_rot);
  static std::atomic<size_t> raised[16];
  const cudaError_t err = EnsureDynamicSmem(MlaSplitKernel<kHeads>, smem, raised);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.n_q), static_cast<unsigned>(CeilDiv(a.n_head, kHeads)),
                  static_cast<unsigned>(plan.n_splits));
  MlaSplitKernel<kHeads>
      <<<grid, kHeads * 32, smem, stream>>>(a, plan.n_splits, plan.split_len, part_acc, part_ml);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// Tensor-core variant (mma.sync m16n8k16, bf16 inputs, F32 accumulation).
// One block: one query token, 16 heads (the MMA's 16 rows), one KV range.
// A GROUP of 8 warps works through tiles of cache rows:
//   S[16 x tile] = Q · K^T: warp w sums a quarter of k for half the tile's
//   positions, the softmax adds the quarters;
//   online softmax of each head's row (16 threads per row);
//   O[16 x kv_lora] += P · V: warp w owns the 16-column groups w, w + 8, ...
// with the next tile's rows loading (cp.async) during this tile's phases
// where the group has two buffers. Three forms (MlaAttentionPlan::
// tc_tile_groups; TcForm* below):
//   1: one group of 8 warps on tiles of 64 rows, two buffers. (Eight warps
//     on 64 rather than four on 32: a decode block spends its time in the
//     latency of each phase; docs/performance.md, tenth session.)
//   2: two groups of 8 warps in one block sharing Q, each on every other
//     tile of 32 rows of the block's range with its own softmax state,
//     barriers of its own (bar.sync with an id per group) and its own two
//     buffers; group 1 hands its O, m and l to group 0 through shared memory
//     at the end. One group's barriers, softmax and shared-memory round trips
//     then overlap the other group's products (FlashAttention-3's
//     "ping-pong" without a handshake: the schedulers interleave the groups).
//   3: form 2 on tiles of 64 rows with one buffer per group (half the reads
//     of Q per row; a group's next tile loads after its P·V, hidden by the
//     other group's products): for long ranges per block.
// Q and P are split into bf16 hi + lo parts (x = hi + lo + O(2^-17 x)) and
// both are multiplied, so the products keep F32-level accuracy although the
// tensor cores take bf16; the cache rows are bf16 already (exact).
// Shared rows are padded to an odd number of 16-byte chunks so that the 8
// row addresses of an ldmatrix hit 8 different bank groups.

constexpr int kTcHeads = 16;
constexpr int kTcTile = 64;  // rows per tile of one group, or per pair of tiles of two
constexpr int kTcWarps = 8;  // per group
constexpr int kTcGroupThreads = kTcWarps * 32;
constexpr int kTcRowThreads = kTcGroupThreads / kTcHeads;   // softmax threads per head (16)
constexpr int kTcMaxGroups = kMaxKvLora / (16 * kTcWarps);  // 16-column groups per warp (4)
constexpr int kTcMaxNt = 2 * kTcMaxGroups;                  // n8 tiles of O per warp (8)
// 16-byte chunks of a cache row per lane: rows of <= 768 bf16.
constexpr int kTcChunkIters = 3;
// The scores' k range in 4 parts, each with half the positions.
constexpr int kTcKGroups = 4;
static_assert(2 * kTcKGroups == kTcWarps, "a warp scores a quarter of k for half a tile");

// Shapes that follow from a group's tile rows (64 or 32).
template <int kTile>
struct TcTileShape {
  static constexpr int kRowPos = kTile / kTcRowThreads;  // softmax positions per thread
  static constexpr int kHalf = kTile / 2;                // positions per scoring warp
  static constexpr int kNj = kHalf / 8;                  // their n8 tiles
  static constexpr int kPStride = kTile + 8;             // bf16 per P row (5 or 9 chunks: odd)
  static constexpr int kSStride = kTile + 1;             // floats per S row
  static_assert(kTile % 32 == 0 && (kPStride / 8) % 2 == 1, "P rows an odd number of chunks");
};

__host__ __device__ constexpr int TcRowStride(int row_width) {  // bf16 elements
  return ((row_width / 8) | 1) * 8;
}

// The tensor-core kernel's forms (MlaAttentionPlan::tc_tile_groups): 1, one
// group on 64-row tiles, two buffers; 2, two groups on 32-row tiles, two
// buffers each; 3, two groups on 64-row tiles, one buffer each (a group's
// loads hidden by the other group's products only).
__host__ __device__ constexpr int TcFormGroups(int form) { return form == 1 ? 1 : 2; }
__host__ __device__ constexpr int TcFormTile(int form) { return form == 2 ? 32 : 64; }
__host__ __device__ constexpr int TcFormBuffers(int form) { return form == 3 ? 1 : 2; }

// Shared bytes of one group: its cache tiles, the partial scores, P hi and
// lo, m, l and alpha per head, the tiles' row offsets. A multiple of 16, so
// every group's tiles stay 16-byte aligned.
__host__ __device__ constexpr size_t TcGroupBytes(int row_width, int tile, int buffers) {
  return size_t{1} * buffers * tile * TcRowStride(row_width) * 2 +
         size_t{kTcKGroups} * kTcHeads * (tile + 1) * sizeof(float) +
         size_t{2} * kTcHeads * (tile + 8) * 2 + 3 * kTcHeads * sizeof(float) +
         size_t{1} * buffers * tile * sizeof(int64_t);
}

size_t TcSharedBytes(int row_width, int form) {
  return size_t{2} * kTcHeads * TcRowStride(row_width) * 2 +  // Q hi, lo
         static_cast<size_t>(TcFormGroups(form)) *
             TcGroupBytes(row_width, TcFormTile(form), TcFormBuffers(form));
}

// Shared memory a block may have on sm_90 (227 KiB); wider rows than
// DeepSeek's 576 may not fit two tiles, and take the CUDA-core kernel.
constexpr size_t kTcMaxSharedBytes = 227 * 1024;

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void Ldmatrix4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p))
               : "memory");
}

__device__ __forceinline__ void Ldmatrix2(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SmemAddr(p))
               : "memory");
}

__device__ __forceinline__ void Ldmatrix4Trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p))
               : "memory");
}

// c += a (16x16, row) · b (16x8, col), bf16 in, F32 accumulate.
__device__ __forceinline__ void Mma(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A barrier of one group's 256 threads (the whole block when there is one).
template <int kGroups>
__device__ __forceinline__ void TcGroupSync(int group) {
  if constexpr (kGroups == 1) {
    __syncthreads();
  } else {
    asm volatile("bar.sync %0, %1;\n" ::"r"(group + 1), "n"(kTcGroupThreads) : "memory");
  }
}

// One group's pointers into shared memory.
template <int kTile, int kBuffers>
struct TcGroupSmem {
  __nv_bfloat16* kv0;  // tiles of even index (in this group's sequence)
  __nv_bfloat16* kv1;  // tiles of odd index (kv0 with one buffer)
  float* s;            // [k group][head][position] partial scores
  __nv_bfloat16* p_hi;
  __nv_bfloat16* p_lo;
  float* m;
  float* l;
  float* alpha;
  int64_t* rowoff;  // [kBuffers][kTile]

  __device__ __forceinline__ TcGroupSmem(unsigned char* base, int rs) {
    using S = TcTileShape<kTile>;
    kv0 = reinterpret_cast<__nv_bfloat16*>(base);
    kv1 = kv0 + (kBuffers - 1) * kTile * rs;
    s = reinterpret_cast<float*>(kv1 + kTile * rs);
    p_hi = reinterpret_cast<__nv_bfloat16*>(s + kTcKGroups * kTcHeads * S::kSStride);
    p_lo = p_hi + kTcHeads * S::kPStride;
    m = reinterpret_cast<float*>(p_lo + kTcHeads * S::kPStride);
    l = m + kTcHeads;
    alpha = l + kTcHeads;
    rowoff = reinterpret_cast<int64_t*>(alpha + kTcHeads);
  }
};

template <int kForm>
__global__ void __launch_bounds__(TcFormGroups(kForm) * kTcGroupThreads)
    MlaSplitTcKernel(MlaAttentionArgs a, int32_t n_splits, int32_t split_len, float* part_acc,
                     float2* part_ml) {
  constexpr int kGroups = TcFormGroups(kForm);
  constexpr int kTile = TcFormTile(kForm);
  constexpr int kBuffers = TcFormBuffers(kForm);
  using Shape = TcTileShape<kTile>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rw = a.kv_lora + a.n_rot;
  const int rs = TcRowStride(rw);
  __nv_bfloat16* s_qhi = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* s_qlo = s_qhi + kTcHeads * rs;
  unsigned char* groups_base = reinterpret_cast<unsigned char*>(s_qlo + kTcHeads * rs);
  // 32-bit offsets (shared memory), so that the addresses stay 32-bit arithmetic.
  const int group_bytes = static_cast<int>(TcGroupBytes(rw, kTile, kBuffers));

  const int64_t qi = blockIdx.x;
  const int h0 = blockIdx.y * kTcHeads;
  const int split = blockIdx.z;
  const int tid = threadIdx.x;
  const int grp = kGroups == 1 ? 0 : tid / kTcGroupThreads;  // this thread's group
  const int gtid = kGroups == 1 ? tid : tid % kTcGroupThreads;
  const int warp = gtid / 32;  // within the group
  const int lane = tid % 32;
  const int g = lane / 4;  // MMA row group
  const int t = lane % 4;  // thread in group
  const TcGroupSmem<kTile, kBuffers> sm(groups_base + grp * group_bytes, rs);
  const int32_t seq = a.q_seq[qi];
  const int64_t n_kv = static_cast<int64_t>(a.q_pos[qi]) + 1;
  const int64_t begin = static_cast<int64_t>(split) * split_len;
  const int64_t end = min(n_kv, begin + split_len);

  const int n_groups = a.kv_lora / 16;  // 16-column groups of O; warp w owns w, w + 8, ...
  float acc[kTcMaxNt][4];
#pragma unroll
  for (int j = 0; j < kTcMaxNt; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  const int32_t* table = a.kv.block_table + static_cast<int64_t>(seq) * a.kv.block_table_stride;
  const int chunks = rw / 8;  // 16-byte chunks per cache row

  // Issues the loads of the tile at t0 into buffer `buf` as one cp.async
  // group. Group-uniform (it has the group's barrier).
  auto issue = [&](int64_t t0, int buf) {
    const int n_rows = static_cast<int>(min(static_cast<int64_t>(kTile), end - t0));
    int64_t* rowoff = sm.rowoff + buf * kTile;
    TileRowOffsets(a.kv, table, t0, n_rows, rw, kTile, gtid, rowoff);
    TcGroupSync<kGroups>(grp);
    __nv_bfloat16* dst = buf != 0 ? sm.kv1 : sm.kv0;
    // Warp w loads rows w, w + 8, ...; lane l the 16-byte chunks l, l + 32,
    // l + 64 of a row (unrolled: the loop's address arithmetic was a third of
    // the kernel's instructions).
#pragma unroll
    for (int rr = 0; rr < kTile / kTcWarps; ++rr) {
      const int r = warp + kTcWarps * rr;
      const int64_t off = rowoff[r];
      // Rows past the range are zero-filled: P is 0 there, and 0 * garbage could be NaN.
      const bool ok = off >= 0;
      const __nv_bfloat16* src = a.kv.data + (ok ? off + 8 * lane : 0);
      __nv_bfloat16* d = dst + r * rs + 8 * lane;
#pragma unroll
      for (int it = 0; it < kTcChunkIters; ++it) {
        if (lane + 32 * it < chunks)
          CpAsync16(d + 256 * it, ok ? src + 256 * it : src, ok ? 16 : 0);
      }
    }
    CpAsyncCommit();
  };
  // This group's tiles: every kGroups-th one of the range. Double-buffered:
  // the next tile's rows load during this tile's products.
  const int64_t step = int64_t{kTile} * kGroups;
  const int64_t first = begin + int64_t{kTile} * grp;
  // Two buffers per group (forms 1 and 2): the first tile's rows are in
  // flight while Q is converted (one memory latency fewer before the first
  // products; the regions are disjoint: the kernel 19.1-19.3 -> 18.2-18.5 us
  // at 1 x 1K on the H200; level at 1 x 8K, +1 % at 16 x 1K). Form 3 (one
  // buffer per group, long ranges) issues it after Q, as before: with the
  // early issue the layer step at 16 x 8K was 2 % slower (and form 2 forced
  // on that shape 6 % slower), after Q 1 % faster than before
  // (docs/performance.md, eighteenth session).
  if constexpr (kBuffers == 2) {
    if (first < end) issue(first, 0);
  }
  // Query rows: warp w of the block converts heads w, w + 8 kGroups, ...; no
  // index division (it was a third of a decode block's instructions).
  for (int hh = tid / 32; hh < kTcHeads; hh += kGroups * kTcWarps) {
    const bool ok = h0 + hh < a.n_head;
    const float* src = a.q + qi * a.q_stride + static_cast<int64_t>(h0 + hh) * rw;
#pragma unroll 6
    for (int j = lane; j < rw; j += 32) {
      const Bf16HiLo v = SplitBf16HiLo(ok ? src[j] : 0.0f);
      s_qhi[hh * rs + j] = v.hi;
      s_qlo[hh * rs + j] = v.lo;
    }
  }
  if (gtid < kTcHeads) {
    sm.m[gtid] = -INFINITY;
    sm.l[gtid] = 0.0f;
  }
  // Q visible to every warp: this barrier with two groups; with one, the
  // group barrier before the first tile's products.
  if constexpr (kGroups > 1) __syncthreads();
  if constexpr (kBuffers != 2) {
    if (first < end) issue(first, 0);
  }
  int buf = 0;
  for (int64_t t0 = first; t0 < end; t0 += step, buf ^= kBuffers - 1) {
    const int n_rows = static_cast<int>(min(static_cast<int64_t>(kTile), end - t0));
    const __nv_bfloat16* s_kv = buf != 0 ? sm.kv1 : sm.kv0;
    if (kBuffers == 2 && t0 + step < end) {
      issue(t0 + step, buf ^ 1);
      CpAsyncWait<1>();  // this tile's group is complete, the next one's may fly
    } else {
      CpAsyncWait<0>();
    }
    TcGroupSync<kGroups>(grp);  // this tile's rows visible to every warp of the group

    // Partial scores: warp w sums k-steps of group w % 4 (a quarter of the
    // row) for the positions of half w / 4, so that each warp reads a
    // quarter of Q from shared memory per tile, not all of it (with every
    // warp on all of k, Q's reads were 4x the tile's). Hi and lo products in
    // separate accumulators: independent MMA chains.
    {
      const int kg = warp % kTcKGroups, half = warp / kTcKGroups;
      const int n_ks = rw / 16;
      const int ks_begin = n_ks * kg / kTcKGroups, ks_end = n_ks * (kg + 1) / kTcKGroups;
      float acc_hi[Shape::kNj][4] = {}, acc_lo[Shape::kNj][4] = {};
      const int mat = lane / 8, r8 = lane % 8;
      const __nv_bfloat16* a_hi = s_qhi + (r8 + 8 * (mat % 2)) * rs + 8 * (mat / 2);
      const __nv_bfloat16* a_lo = s_qlo + (r8 + 8 * (mat % 2)) * rs + 8 * (mat / 2);
      const __nv_bfloat16* b_ptr = s_kv + (Shape::kHalf * half + r8) * rs + 8 * (mat % 2);
      for (int ks = ks_begin; ks < ks_end; ++ks) {
        uint32_t fa_hi[4], fa_lo[4];
        Ldmatrix4(fa_hi, a_hi + 16 * ks);
        Ldmatrix4(fa_lo, a_lo + 16 * ks);
#pragma unroll
        for (int j = 0; j < Shape::kNj; ++j) {  // positions kHalf half + 8 j ..
          uint32_t fb[2];
          Ldmatrix2(fb, b_ptr + 8 * j * rs + 16 * ks);
          Mma(acc_hi[j], fa_hi, fb);
          Mma(acc_lo[j], fa_lo, fb);
        }
      }
      float* part = sm.s + kg * kTcHeads * Shape::kSStride;
#pragma unroll
      for (int j = 0; j < Shape::kNj; ++j) {
        const int p0 = Shape::kHalf * half + 8 * j + 2 * t;
        part[g * Shape::kSStride + p0] = acc_hi[j][0] + acc_lo[j][0];
        part[g * Shape::kSStride + p0 + 1] = acc_hi[j][1] + acc_lo[j][1];
        part[(g + 8) * Shape::kSStride + p0] = acc_hi[j][2] + acc_lo[j][2];
        part[(g + 8) * Shape::kSStride + p0 + 1] = acc_hi[j][3] + acc_lo[j][3];
      }
    }
    TcGroupSync<kGroups>(grp);

    // Online softmax: 16 threads per head row, kRowPos positions each.
    {
      const int row = gtid / kTcRowThreads, part = gtid % kTcRowThreads;
      const float m_old = sm.m[row];
      const float l_old = sm.l[row];
      float v[Shape::kRowPos];
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < Shape::kRowPos; ++j) {
        // The four k groups' partial sums, in a fixed order; masked past the range.
        const int pos = Shape::kRowPos * part + j, i = row * Shape::kSStride + pos;
        constexpr int kG = kTcHeads * Shape::kSStride;
        const float sc = (sm.s[i] + sm.s[i + kG]) + (sm.s[i + 2 * kG] + sm.s[i + 3 * kG]);
        v[j] = pos < n_rows ? sc * a.scale : -INFINITY;
        mx = fmaxf(mx, v[j]);
      }
#pragma unroll
      for (int o = 1; o < kTcRowThreads; o <<= 1) {
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
      }
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < Shape::kRowPos; ++j) {
        const float p = expf(v[j] - m_new);  // 0 for masked positions
        sum += p;
        const Bf16HiLo w = SplitBf16HiLo(p);
        sm.p_hi[row * Shape::kPStride + Shape::kRowPos * part + j] = w.hi;
        sm.p_lo[row * Shape::kPStride + Shape::kRowPos * part + j] = w.lo;
      }
#pragma unroll
      for (int o = 1; o < kTcRowThreads; o <<= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
      __syncwarp();  // every lane of the row has read m_old / l_old
      if (part == 0) {
        const float alpha = expf(m_old - m_new);  // 0 on the first tile
        sm.alpha[row] = alpha;
        sm.m[row] = m_new;
        sm.l[row] = l_old * alpha + sum;
      }
    }
    TcGroupSync<kGroups>(grp);

    // O = alpha · O + P · V over this warp's columns.
    {
      const float al_lo = sm.alpha[g], al_hi = sm.alpha[g + 8];
#pragma unroll
      for (int j = 0; j < kTcMaxNt; ++j) {
        acc[j][0] *= al_lo;
        acc[j][1] *= al_lo;
        acc[j][2] *= al_hi;
        acc[j][3] *= al_hi;
      }
      const int mat = lane / 8, r8 = lane % 8;
#pragma unroll
      for (int ks = 0; ks < kTile / 16; ++ks) {
        uint32_t fp_hi[4], fp_lo[4];
        const int p_off = (r8 + 8 * (mat % 2)) * Shape::kPStride + 16 * ks + 8 * (mat / 2);
        Ldmatrix4(fp_hi, sm.p_hi + p_off);
        Ldmatrix4(fp_lo, sm.p_lo + p_off);
        const __nv_bfloat16* v_row = s_kv + (16 * ks + r8 + 8 * (mat % 2)) * rs + 8 * (mat / 2);
#pragma unroll
        for (int jg = 0; jg < kTcMaxGroups; ++jg) {
          const int group = warp + kTcWarps * jg;
          if (group < n_groups) {
            uint32_t fb[4];
            Ldmatrix4Trans(fb, v_row + 16 * group);
            Mma(acc[2 * jg], fp_hi, fb);
            Mma(acc[2 * jg], fp_lo, fb);
            Mma(acc[2 * jg + 1], fp_hi, fb + 2);
            Mma(acc[2 * jg + 1], fp_lo, fb + 2);
          }
        }
      }
    }
    // One buffer: the next tile loads once every warp of the group is past
    // this one's P·V (issue's barrier comes before its copies).
    if (kBuffers == 1 && t0 + step < end) issue(t0 + step, 0);
  }

  // This thread's two head rows (g and g + 8): their m and l, merged over
  // the groups.
  float row_m[2], row_l[2];
  if constexpr (kGroups == 1) {
    __syncthreads();  // final m, l visible
    row_m[0] = sm.m[g], row_m[1] = sm.m[g + 8];
    row_l[0] = sm.l[g], row_l[1] = sm.l[g + 8];
  } else {
    static_assert(kGroups == 2, "two groups at most");
    // Group 1 hands its O to group 0 through its own (now idle) tile buffers,
    // lanes contiguous, only the live column groups: kv_lora * 64 bytes, less
    // than the buffers' 2 * 32 * (kv_lora + 8) * 2; its m and l stay where
    // they are.
    __syncthreads();  // both groups' last tiles done, their m and l final
    const TcGroupSmem<kTile, kBuffers> other(groups_base + group_bytes, rs);
    float* s_o = reinterpret_cast<float*>(other.kv0);
    auto handoff = [&](int j, int c) {
      return (((warp + kTcWarps * (j / 2)) * 2 + j % 2) * 4 + c) * 32 + lane;
    };
    if (grp == 1) {
#pragma unroll
      for (int j = 0; j < kTcMaxNt; ++j) {
        if (warp + kTcWarps * (j / 2) >= n_groups) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) s_o[handoff(j, c)] = acc[j][c];
      }
    }
    __syncthreads();
    if (grp == 1) return;  // no block-wide barrier follows
    float w_self[2], w_other[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = g + 8 * half;
      const float m0 = sm.m[row], m1 = other.m[row];
      const float m = fmaxf(m0, m1);
      // A group without rows has m = -inf and l = 0; with none at all, m stays -inf.
      w_self[half] = m0 == -INFINITY ? 0.0f : expf(m0 - m);
      w_other[half] = m1 == -INFINITY ? 0.0f : expf(m1 - m);
      row_m[half] = m;
      row_l[half] = sm.l[row] * w_self[half] + other.l[row] * w_other[half];
    }
#pragma unroll
    for (int j = 0; j < kTcMaxNt; ++j) {
      if (warp + kTcWarps * (j / 2) >= n_groups) continue;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        acc[j][c] = acc[j][c] * w_self[c / 2] + s_o[handoff(j, c)] * w_other[c / 2];
      }
    }
  }

  const int heads[2] = {h0 + g, h0 + g + 8};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int head = heads[half];
    if (head >= a.n_head) continue;
    const float l = row_l[half];
#pragma unroll
    for (int j = 0; j < kTcMaxNt; ++j) {
      const int group = warp + kTcWarps * (j / 2);
      if (group >= n_groups) continue;
      const int d = 16 * group + 8 * (j % 2) + 2 * t;
      const float v0 = acc[j][2 * half], v1 = acc[j][2 * half + 1];
      if (n_splits == 1) {
        const float inv = 1.0f / l;
        const int64_t idx = static_cast<int64_t>(head) * a.kv_lora + d;
        if (a.out_bf16 != nullptr) {
          a.out_bf16[qi * a.out_bf16_stride + idx] = __float2bfloat16_rn(v0 * inv);
          a.out_bf16[qi * a.out_bf16_stride + idx + 1] = __float2bfloat16_rn(v1 * inv);
        }
        if (a.out_f32 != nullptr) {
          a.out_f32[qi * a.out_f32_stride + idx] = v0 * inv;
          a.out_f32[qi * a.out_f32_stride + idx + 1] = v1 * inv;
        }
      } else {
        const int64_t slot = (qi * a.n_head + head) * n_splits + split;
        // d and kv_lora are even: one 8-byte store.
        *reinterpret_cast<float2*>(part_acc + slot * a.kv_lora + d) = make_float2(v0, v1);
      }
    }
    if (n_splits > 1 && t == 0 && warp == 0) {
      part_ml[(qi * a.n_head + head) * n_splits + split] = make_float2(row_m[half], l);
    }
  }
}

template <int kForm>
cudaError_t LaunchSplitTc(const MlaAttentionArgs& a, const MlaAttentionPlan& plan, float* part_acc,
                          float2* part_ml, cudaStream_t stream) {
  const size_t smem = TcSharedBytes(a.kv_lora + a.n_rot, kForm);
  static std::atomic<size_t> raised[16];
  const cudaError_t err = EnsureDynamicSmem(MlaSplitTcKernel<kForm>, smem, raised);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.n_q), static_cast<unsigned>(CeilDiv(a.n_head, kTcHeads)),
                  static_cast<unsigned>(plan.n_splits));
  MlaSplitTcKernel<kForm><<<grid, TcFormGroups(kForm) * kTcGroupThreads, smem, stream>>>(
      a, plan.n_splits, plan.split_len, part_acc, part_ml);
  return cudaGetLastError();
}

bool TcSupported(int32_t kv_lora, int32_t n_rot, int32_t form) {
  return form >= 1 && form <= 3 && kv_lora % 16 == 0 && kv_lora <= kMaxKvLora &&
         (kv_lora + n_rot) % 16 == 0 && (kv_lora + n_rot) / 8 <= 32 * kTcChunkIters &&
         TcSharedBytes(kv_lora + n_rot, form) <= kTcMaxSharedBytes;
}

}  // namespace

cudaError_t MlaWriteKv(const float* kva, int64_t kva_stride, const float* kv_norm, float eps,
                       int32_t kv_lora, const RopeParams& rope, const int32_t* positions,
                       const int32_t* seq_index, int64_t n_tokens, const MlaPagedKv& kv,
                       cudaStream_t stream) {
  if (kv_lora <= 0 || rope.n_rot <= 0 || rope.n_rot % 2 != 0 || rope.n_rot / 2 > kMaxPairs ||
      kva_stride < kv_lora + rope.n_rot || kv.page_size <= 0 || n_tokens < 0 ||
      n_tokens > (int64_t{1} << 31) - 1) {
    return cudaErrorInvalidValue;
  }
  if (n_tokens == 0) return cudaSuccess;
  WriteKvKernel<<<static_cast<unsigned>(n_tokens), 256, 0, stream>>>(
      kva, kva_stride, kv_norm, eps, kv_lora, rope, positions, seq_index, kv);
  return cudaGetLastError();
}

cudaError_t MlaPrepareQ(const float* q, int64_t q_stride, int32_t n_head, int32_t qk_nope,
                        int32_t kv_lora, const RopeParams& rope, const int32_t* positions,
                        int64_t n_tokens, __nv_bfloat16* q_nope, int64_t q_nope_stride,
                        float* big_q, int64_t big_q_stride, cudaStream_t stream,
                        const MlaKvWrite* write_kv) {
  if (n_head <= 0 || qk_nope <= 0 || kv_lora <= 0 || rope.n_rot <= 0 || rope.n_rot % 2 != 0 ||
      rope.n_rot / 2 > kMaxPairs || q_stride < int64_t{n_head} * (qk_nope + rope.n_rot) ||
      q_nope_stride < int64_t{n_head} * qk_nope ||
      big_q_stride < int64_t{n_head} * (kv_lora + rope.n_rot) || n_tokens < 0 ||
      n_tokens > (int64_t{1} << 31) - 1) {
    return cudaErrorInvalidValue;
  }
  if (write_kv != nullptr &&
      (write_kv->kva == nullptr || write_kv->kv_norm == nullptr || write_kv->seq_index == nullptr ||
       write_kv->kva_stride < kv_lora + rope.n_rot || write_kv->kv.page_size <= 0)) {
    return cudaErrorInvalidValue;
  }
  if (n_tokens == 0) return cudaSuccess;
  const int64_t head_blocks = CeilDiv(n_head, kPrepareHeads);
  const dim3 grid(static_cast<unsigned>(n_tokens),
                  static_cast<unsigned>(head_blocks + (write_kv != nullptr ? 1 : 0)));
  PrepareQKernel<<<grid, 256, 0, stream>>>(q, q_stride, n_head, qk_nope, kv_lora, rope, positions,
                                           q_nope, q_nope_stride, big_q, big_q_stride,
                                           write_kv != nullptr ? *write_kv : MlaKvWrite{});
  return cudaGetLastError();
}

MlaAttentionPlan PlanMlaAttention(int64_t n_q, int32_t n_head, int32_t kv_lora, int32_t n_rot,
                                  int64_t max_kv_len, int32_t n_multiprocessors,
                                  size_t workspace_capacity) {
  MlaAttentionPlan plan;
  // The two-group form where its shared memory fits (docs/performance.md,
  // fourteenth session: faster at every measured batch and context).
  plan.tc_tile_groups = TcSupported(kv_lora, n_rot, 2) ? 2 : 1;
  plan.tensor_cores = TcSupported(kv_lora, n_rot, plan.tc_tile_groups);
  plan.heads_per_block = 4;
  while (plan.heads_per_block < n_head && plan.heads_per_block < 16) plan.heads_per_block *= 2;
  if (plan.tensor_cores) plan.heads_per_block = kTcHeads;
  max_kv_len = std::max<int64_t>(max_kv_len, 1);
  const int64_t groups = CeilDiv(std::max(n_head, 1), plan.heads_per_block);
  const int64_t base_blocks = std::max<int64_t>(n_q, 1) * groups;
  // Blocks per multiprocessor that fit: one of the tensor-core kernel (204
  // KiB of shared memory at DeepSeek's widths), about two of the CUDA-core one.
  const int64_t target = (plan.tensor_cores ? 1 : 2) * std::max(n_multiprocessors, 1);
  // The split count with the least time in waves of `target` blocks per unit
  // of context (waves / splits), the fewest splits among equals: 16 queries x
  // 8 head groups (128 blocks on 132 SMs) take one wave unsplit rather than
  // two waves of half ranges and a merge (3 % at 16 x 8K; fourteenth session).
  int64_t splits = 1;
  for (int64_t s = 2; s <= CeilDiv(target, base_blocks); ++s) {
    if (CeilDiv(base_blocks * s, target) * splits < CeilDiv(base_blocks * splits, target) * s) {
      splits = s;
    }
  }
  splits = std::min(splits, CeilDiv(max_kv_len, kMinSplitLen));
  splits = std::min<int64_t>(splits, kMaxSplits);
  const size_t per_split = static_cast<size_t>(std::max<int64_t>(n_q, 1)) * n_head *
                           (static_cast<size_t>(kv_lora) * sizeof(float) + sizeof(float2));
  if (splits > 1) {
    const int64_t fit =
        static_cast<int64_t>(workspace_capacity > 2 * kWorkspaceAlign
                                 ? (workspace_capacity - 2 * kWorkspaceAlign) / per_split
                                 : 0);
    splits = std::min(splits, fit);
    if (splits < 2) splits = 1;
  }
  // Splits of whole tiles of the chosen kernel (64 rows with tensor cores).
  const int64_t tile = plan.tensor_cores ? kTcTile : kTile;
  int64_t split_len = CeilDiv(CeilDiv(max_kv_len, splits), tile) * tile;
  splits = CeilDiv(max_kv_len, split_len);
  plan.n_splits = static_cast<int32_t>(splits);
  plan.split_len = static_cast<int32_t>(split_len);
  // Long ranges per block take form 3 (two groups on 64-row tiles with one
  // buffer each: half the reads of Q per row; a group's loads then wait, which
  // the other group's products hide only when each group has many tiles):
  // 6.6 % faster at 16 x 8K (8192 rows per block), level at 1024 rows, 3 %
  // slower at 512 (1 x 8K); fourteenth session.
  if (plan.tensor_cores && split_len > kTcLongRangeRows && TcSupported(kv_lora, n_rot, 3)) {
    plan.tc_tile_groups = 3;
  }
  if (plan.n_splits > 1) {
    const size_t n_slots = static_cast<size_t>(n_q) * n_head * plan.n_splits;
    plan.workspace_bytes = AlignUp(n_slots * kv_lora * sizeof(float), kWorkspaceAlign) +
                           AlignUp(n_slots * sizeof(float2), kWorkspaceAlign);
  }
  return plan;
}

cudaError_t MlaAttention(const MlaAttentionArgs& a, const MlaAttentionPlan& plan, void* workspace,
                         cudaStream_t stream) {
  if (a.n_q < 0 || a.n_q > (int64_t{1} << 31) - 1 || a.n_head <= 0 || a.kv_lora <= 0 ||
      a.kv_lora % 2 != 0 || a.kv_lora > kMaxKvLora || a.n_rot < 0 || a.n_rot % 2 != 0 ||
      a.q_stride < int64_t{a.n_head} * (a.kv_lora + a.n_rot) || a.kv.page_size <= 0 ||
      a.kv.page_stride % 2 != 0 || (a.out_bf16 == nullptr && a.out_f32 == nullptr) ||
      plan.n_splits < 1 || plan.n_splits > kMaxSplits || plan.split_len <= 0 ||
      (plan.n_splits > 1 && workspace == nullptr) ||
      (a.out_bf16 != nullptr && a.out_bf16_stride < int64_t{a.n_head} * a.kv_lora) ||
      (a.out_f32 != nullptr && a.out_f32_stride < int64_t{a.n_head} * a.kv_lora) ||
      CeilDiv(a.n_head, plan.heads_per_block) > 65535) {
    return cudaErrorInvalidValue;
  }
  if (a.n_q == 0) return cudaSuccess;
  float* part_acc = nullptr;
  float2* part_ml = nullptr;
  if (plan.n_splits > 1) {
    const size_t n_slots = static_cast<size_t>(a.n_q) * a.n_head * plan.n_splits;
    part_acc = static_cast<float*>(workspace);
    part_ml =
        reinterpret_cast<float2*>(static_cast<char*>(workspace) +
                                  AlignUp(n_slots * a.kv_lora * sizeof(float), kWorkspaceAlign));
  }
  cudaError_t err;
  if (plan.tensor_cores) {
    if (!TcSupported(a.kv_lora, a.n_rot, plan.tc_tile_groups) || plan.heads_per_block != kTcHeads) {
      return cudaErrorInvalidValue;
    }
    switch (plan.tc_tile_groups) {
      case 1: err = LaunchSplitTc<1>(a, plan, part_acc, part_ml, stream); break;
      case 2: err = LaunchSplitTc<2>(a, plan, part_acc, part_ml, stream); break;
      default: err = LaunchSplitTc<3>(a, plan, part_acc, part_ml, stream); break;
    }
  } else {
    switch (plan.heads_per_block) {
      case 4: err = LaunchSplit<4>(a, plan, part_acc, part_ml, stream); break;
      case 8: err = LaunchSplit<8>(a, plan, part_acc, part_ml, stream); break;
      case 16: err = LaunchSplit<16>(a, plan, part_acc, part_ml, stream); break;
      default: return cudaErrorInvalidValue;
    }
  }
  if (err != cudaSuccess || plan.n_splits == 1) return err;
  const dim3 grid(static_cast<unsigned>(a.n_q), static_cast<unsigned>(a.n_head));
  MlaMergeKernel<<<grid, 128, 0, stream>>>(a, plan.n_splits, part_acc, part_ml);
  return cudaGetLastError();
}

}  // namespace ktx::kernels::cuda
