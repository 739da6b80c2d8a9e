// gpu_benchmark: GPU time of one DeepSeek-V3 MoE layer's non-expert work at
// decode (attention block + FFN norm + shared expert; the routed experts run
// on the CPU and are not part of it), with random bf16 weights of full width
// (one layer allocated) and a paged bf16 KV cache of the given context, for
// decode batches of 1 and 16 sequences at 1K and 8K tokens of context (and,
// arg q = 1, with the quantized GEMV on Q4_K/Q6_K blocks at 1..16 x 1K). Also:
// the same step replayed from a CUDA graph (no launch gaps), the MLA
// attention kernel alone (CUDA-core and tensor-core variants), the attention
// of a prompt chunk (BM_PrefillAttention: the MLA kernel against the
// two-product form of kernels/cuda/mla_prefill.h, the block and its core), and
// the card's limits measured in the same run: device-to-device copy bandwidth
// (bytes read + written), against which the achieved bandwidth (weights + KV
// bytes read once per step) is given, and cuBLAS's bf16 tensor-core rate on
// an 8192^3 product, against which the prompt-chunk products are given.
//
//   gpu_benchmark --benchmark_out=gpu.json --benchmark_out_format=json
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "benchmark/benchmark.h"
#include "kernels/cuda/basic_ops.h"
#include "kernels/cuda/device_query.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/mla_prefill.h"
#include "kernels/cuda/skinny_gemm.h"
#include "runtime/gpu/gpu_layer.h"
#include "tests/runtime/gpu/dsv3_hparams.h"

namespace ktx::gpu {
namespace {

namespace kc = kernels::cuda;

#define BENCH_CHECK(expr)                                                             \
  do {                                                                                \
    const auto ktx_s_ = (expr);                                                       \
    if (!ktx_s_.ok()) {                                                               \
      std::fprintf(stderr, "%s: %s\n", #expr, std::string(ktx_s_.message()).c_str()); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (false)

#define CUDA_BENCH_CHECK(expr)                                             \
  do {                                                                     \
    const cudaError_t ktx_e_ = (expr);                                     \
    if (ktx_e_ != cudaSuccess) {                                           \
      std::fprintf(stderr, "%s: %s\n", #expr, cudaGetErrorString(ktx_e_)); \
      std::abort();                                                        \
    }                                                                      \
  } while (false)

constexpr int64_t kMaxBatch = 16;
constexpr int64_t kMaxPrefill = 2048;  // tokens of one prompt chunk (the runner's max_tokens)
constexpr int64_t kMaxContext = 8192;
constexpr int32_t kPageSize = 64;

double g_copy_gbps = 0.0;  // measured by BM_DeviceCopy, which runs first

// One random DeepSeek-V3 MoE layer and a KV cache for kMaxBatch x kMaxContext.
struct Layer {
  models::Deepseek2Hparams hp = Dsv3Hparams();
  std::unique_ptr<GpuLayerRunner> runner;
  std::vector<DeviceBuffer> buffers;
  GpuLayerWeights w;
  uint64_t weight_bytes = 0;  // bf16 matrices read per step
  // The same layer with GGUF blocks (random bytes, Q4_K; shared-expert down
  // Q6_K, as in Q4_K_M files) next to the bf16 matrices, for the quantized
  // GEMV (the runner's threshold is 16 tokens; `w` has no blocks, so it
  // always runs cuBLAS).
  GpuLayerWeights wq;
  uint64_t quant_weight_bytes = 0;  // blocks + bf16 k_b / v_b read per step by the GEMV path
  DeviceBuffer kv_pages, block_table, positions, seq_index;
  kc::MlaPagedKv kv;

  const Bf16* Matrix(int64_t rows, int64_t cols, uint64_t seed) {
    auto b = DeviceBuffer::Allocate(rows * cols * 2, "weights");
    BENCH_CHECK(b.status());
    CUDA_BENCH_CHECK(kc::FillRandomBf16(b->as<Bf16>(), rows * cols, seed,
                                        1.7f / std::sqrt(static_cast<float>(cols)), nullptr));
    weight_bytes += rows * cols * 2;
    buffers.push_back(std::move(*b));
    return buffers.back().as<Bf16>();
  }
  // Random GGUF blocks of `type` for an [rows, cols] matrix, added to `m`.
  void AddBlocks(GpuMatrix* m, int64_t rows, int64_t cols, kernels::TensorType type,
                 uint64_t seed) {
    const int64_t row_bytes = kernels::RowBytes(kernels::TraitsOf(type), cols);
    const int64_t bytes = (rows * row_bytes + 255) / 256 * 256;
    auto b = DeviceBuffer::Allocate(bytes, "blocks");
    BENCH_CHECK(b.status());
    // Random bf16 values as bytes: finite half scales, any quants (timing only).
    CUDA_BENCH_CHECK(kc::FillRandomBf16(b->as<Bf16>(), bytes / 2, seed, 0.02f, nullptr));
    m->blocks[0] = {b->get(), type, row_bytes, rows};
    m->n_blocks = 1;
    quant_weight_bytes += rows * row_bytes;
    buffers.push_back(std::move(*b));
  }
  const float* Vector(int64_t n, uint64_t seed) {
    auto b = DeviceBuffer::Allocate(n * 4, "norm");
    BENCH_CHECK(b.status());
    CUDA_BENCH_CHECK(kc::FillRandomF32(b->as<float>(), n, seed, 1.0f, nullptr));
    buffers.push_back(std::move(*b));
    return buffers.back().as<float>();
  }

  Layer() {
    CudaModelOptions o;
    auto r = GpuLayerRunner::Create(hp, kMaxPrefill, o);
    BENCH_CHECK(r.status());
    runner = std::move(*r);
    const int64_t n_embd = hp.n_embd, n_head = hp.n_head, hd = hp.n_embd_head_qk;
    const int64_t kvl = hp.kv_lora_rank, rw = kvl + hp.n_rot, ql = hp.q_lora_rank;
    const int64_t ff = hp.n_ff_exp * hp.n_expert_shared;
    w.attn_norm = Vector(n_embd, 1);
    // q_a and kv_a stacked as CudaDeepseek2 loads them (one product);
    // KTX_BENCH_QKV_SEPARATE=1: two products, as before the stacking.
    w.attn_qkv_a = Matrix(ql + rw, n_embd, 2);
    w.attn_q_a = w.attn_qkv_a;
    w.attn_q_a_norm = Vector(ql, 3);
    w.attn_q_b = Matrix(n_head * hd, ql, 4);
    w.attn_kv_a_mqa = w.attn_qkv_a + ql * n_embd;
    if (const char* e = std::getenv("KTX_BENCH_QKV_SEPARATE"); e != nullptr && e[0] == '1') {
      w.attn_qkv_a = nullptr;
    }
    w.attn_kv_a_norm = Vector(kvl, 6);
    w.attn_k_b = Matrix(n_head * kvl, hp.qk_nope(), 7);
    w.attn_v_b = Matrix(n_head * hp.n_embd_head_v, kvl, 8);
    w.attn_output = Matrix(n_embd, n_head * hp.n_embd_head_v, 9);
    w.ffn_norm = Vector(n_embd, 10);
    w.shexp_gate_up = Matrix(2 * ff, n_embd, 11);
    w.shexp_down = Matrix(n_embd, ff, 12);
    wq = w;
    const kernels::TensorType q4 = kernels::TensorType::kQ4_K;
    AddBlocks(&wq.attn_q_a, ql, n_embd, q4, 21);
    AddBlocks(&wq.attn_q_b, n_head * hd, ql, q4, 22);
    AddBlocks(&wq.attn_kv_a_mqa, rw, n_embd, q4, 23);
    AddBlocks(&wq.attn_output, n_embd, n_head * hp.n_embd_head_v, q4, 24);
    AddBlocks(&wq.shexp_gate_up, 2 * ff, n_embd, q4, 25);
    AddBlocks(&wq.shexp_down, n_embd, ff, kernels::TensorType::kQ6_K, 26);
    quant_weight_bytes += 2 * (n_head * kvl * hp.qk_nope() + n_head * hp.n_embd_head_v * kvl);
    runner->set_gemv_max_tokens(16);
    const int64_t pages_per_seq = kMaxContext / kPageSize;
    const int64_t n_pages = kMaxBatch * pages_per_seq;
    auto kvb = DeviceBuffer::Allocate(n_pages * kPageSize * rw * 2, "kv");
    BENCH_CHECK(kvb.status());
    kv_pages = std::move(*kvb);
    CUDA_BENCH_CHECK(
        kc::FillRandomBf16(kv_pages.as<Bf16>(), n_pages * kPageSize * rw, 13, 1.0f, nullptr));
    std::vector<int32_t> table(n_pages);
    for (int64_t p = 0; p < n_pages; ++p) table[p] = static_cast<int32_t>((p * 7919) % n_pages);
    auto tb = DeviceBuffer::Allocate(n_pages * 4, "block table");
    BENCH_CHECK(tb.status());
    block_table = std::move(*tb);
    CUDA_BENCH_CHECK(
        cudaMemcpy(block_table.get(), table.data(), n_pages * 4, cudaMemcpyHostToDevice));
    kv.data = kv_pages.as<Bf16>();
    kv.page_stride = kPageSize * rw;
    kv.page_size = kPageSize;
    kv.block_table = block_table.as<int32_t>();
    kv.block_table_stride = static_cast<int32_t>(pages_per_seq);
    auto pb = DeviceBuffer::Allocate(kMaxPrefill * 4, "positions");
    auto sb = DeviceBuffer::Allocate(kMaxPrefill * 4, "seq");
    BENCH_CHECK(pb.status());
    BENCH_CHECK(sb.status());
    positions = std::move(*pb);
    seq_index = std::move(*sb);
    std::vector<int32_t> seq(kMaxBatch);
    for (int64_t b = 0; b < kMaxBatch; ++b) seq[b] = static_cast<int32_t>(b);
    CUDA_BENCH_CHECK(
        cudaMemcpy(seq_index.get(), seq.data(), kMaxBatch * 4, cudaMemcpyHostToDevice));
    CUDA_BENCH_CHECK(kc::FillRandomF32(runner->x(), kMaxPrefill * n_embd, 14, 1.0f, nullptr));
    CUDA_BENCH_CHECK(cudaDeviceSynchronize());
  }

  GpuBatchView Batch(int64_t batch, int64_t ctx) {
    std::vector<int32_t> pos(batch, static_cast<int32_t>(ctx - 1));  // decode the ctx-th token
    CUDA_BENCH_CHECK(cudaMemcpy(positions.get(), pos.data(), batch * 4, cudaMemcpyHostToDevice));
    GpuBatchView v;
    v.n_tokens = batch;
    v.positions = positions.as<int32_t>();
    v.seq_index = seq_index.as<int32_t>();
    v.max_kv_len = ctx;
    return v;
  }

  // One prompt chunk of sequence 0: n tokens at positions pos0 .. pos0 + n - 1
  // (its segment in *segment, which the view points to).
  GpuBatchView Prefill(int64_t n, int64_t pos0, GpuBatchSegment* segment) {
    std::vector<int32_t> pos(n), seq(n, 0);
    for (int64_t t = 0; t < n; ++t) pos[t] = static_cast<int32_t>(pos0 + t);
    CUDA_BENCH_CHECK(cudaMemcpy(positions.get(), pos.data(), n * 4, cudaMemcpyHostToDevice));
    CUDA_BENCH_CHECK(cudaMemcpy(seq_index.get(), seq.data(), n * 4, cudaMemcpyHostToDevice));
    *segment = {0, n, 0, pos0};
    GpuBatchView v;
    v.n_tokens = n;
    v.positions = positions.as<int32_t>();
    v.seq_index = seq_index.as<int32_t>();
    v.max_kv_len = pos0 + n;
    v.segments = segment;
    v.n_segments = 1;
    return v;
  }
  // Sequence rows 0 .. kMaxBatch - 1 again (the decode benchmarks' batch).
  void ResetSequences() {
    std::vector<int32_t> seq(kMaxBatch);
    for (int64_t b = 0; b < kMaxBatch; ++b) seq[b] = static_cast<int32_t>(b);
    CUDA_BENCH_CHECK(
        cudaMemcpy(seq_index.get(), seq.data(), kMaxBatch * 4, cudaMemcpyHostToDevice));
  }

  // mode 0: bf16 through cuBLAS; 1: the quantized GEMV (k_b / v_b cuBLAS);
  // 2: bf16 through the skinny kernel (kernels/cuda/skinny_gemm.h).
  void Step(const GpuBatchView& v, int64_t mode = 0) {
    const bool quantized = mode == 1;
    runner->set_skinny_max_tokens(mode == 2 ? kc::kSkinnyMaxTokens : 0);
    const GpuLayerWeights& lw = quantized ? wq : w;
    BENCH_CHECK(runner->Attention(lw, kv, v, runner->x()));
    BENCH_CHECK(runner->Norm(lw.ffn_norm, runner->x(), v.n_tokens));
    BENCH_CHECK(runner->GatedFfn(lw.shexp_gate_up, lw.shexp_down, hp.n_ff_exp * hp.n_expert_shared,
                                 v.n_tokens, runner->x(), hp.n_embd, 1.0f));
  }
};

Layer& GetLayer() {
  static Layer* layer = new Layer();
  return *layer;
}

// Times `fn` with CUDA events per iteration (manual time); returns the total
// GPU seconds of the timed iterations.
template <typename Fn>
double TimeWithEvents(benchmark::State& state, cudaStream_t stream, Fn fn) {
  cudaEvent_t start, stop;
  CUDA_BENCH_CHECK(cudaEventCreate(&start));
  CUDA_BENCH_CHECK(cudaEventCreate(&stop));
  double total = 0.0;
  for (int i = 0; i < 3; ++i) fn();  // warm-up: handles, module load, cuBLAS heuristics
  CUDA_BENCH_CHECK(cudaStreamSynchronize(stream));
  for (auto _ : state) {
    CUDA_BENCH_CHECK(cudaEventRecord(start, stream));
    fn();
    CUDA_BENCH_CHECK(cudaEventRecord(stop, stream));
    CUDA_BENCH_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms / 1000.0);
    total += ms / 1000.0;
  }
  CUDA_BENCH_CHECK(cudaGetLastError());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return total;
}

void BM_DeviceCopy(benchmark::State& state) {
  const size_t bytes = size_t{1} << 30;
  auto a = DeviceBuffer::Allocate(bytes, "copy source");
  auto b = DeviceBuffer::Allocate(bytes, "copy destination");
  BENCH_CHECK(a.status());
  BENCH_CHECK(b.status());
  CUDA_BENCH_CHECK(kc::FillRandomF32(a->as<float>(), bytes / 4, 1, 1.0f, nullptr));
  cudaStream_t stream;
  CUDA_BENCH_CHECK(cudaStreamCreate(&stream));
  const double secs = TimeWithEvents(state, stream, [&] {
    CUDA_BENCH_CHECK(cudaMemcpyAsync(b->get(), a->get(), bytes, cudaMemcpyDeviceToDevice, stream));
  });
  // Bytes read + written per second of GPU time.
  g_copy_gbps = 2.0 * static_cast<double>(bytes) * state.iterations() / secs / 1e9;
  state.counters["GB/s(r+w)"] = g_copy_gbps;
  cudaStreamDestroy(stream);
}

// The card's bf16 tensor-core rate as cuBLAS reaches it: an 8192^3 product
// (bf16 in, F32 accumulation, bf16 out), the limit the attention products are
// given against.
double g_tensor_tflops = 0.0;

void BM_TensorCorePeak(benchmark::State& state) {
  constexpr int64_t kN = 8192;
  auto a = DeviceBuffer::Allocate(kN * kN * 2, "a");
  auto b = DeviceBuffer::Allocate(kN * kN * 2, "b");
  auto c = DeviceBuffer::Allocate(kN * kN * 2, "c");
  BENCH_CHECK(a.status());
  BENCH_CHECK(b.status());
  BENCH_CHECK(c.status());
  CUDA_BENCH_CHECK(kc::FillRandomBf16(a->as<Bf16>(), kN * kN, 1, 0.1f, nullptr));
  CUDA_BENCH_CHECK(kc::FillRandomBf16(b->as<Bf16>(), kN * kN, 2, 0.1f, nullptr));
  Layer& l = GetLayer();  // the runner's stream and cuBLAS handle
  const double secs = TimeWithEvents(state, l.runner->stream(), [&] {
    if (kc::LinearBf16(l.runner->cublas(), a->as<Bf16>(), kN, b->as<Bf16>(), kN, c->get(),
                       CUDA_R_16BF, kN, kN, kN, kN) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "cuBLAS failed\n");
      std::abort();
    }
  });
  g_tensor_tflops = 2.0 * kN * kN * kN * state.iterations() / secs / 1e12;
  state.counters["TFLOP/s"] = g_tensor_tflops;
}

void Report(benchmark::State& state, double secs, double bytes) {
  const double per_step = secs / static_cast<double>(state.iterations());
  state.counters["us/step"] = per_step * 1e6;
  state.counters["MB/step"] = bytes / 1e6;
  state.counters["GB/s"] = bytes / per_step / 1e9;
  if (g_copy_gbps > 0.0) state.counters["HBM%"] = 100.0 * bytes / per_step / 1e9 / g_copy_gbps;
}

// Attention block + FFN norm + shared expert of one layer, decode (q: as below).
void BM_LayerAttentionSharedExpert(benchmark::State& state) {
  Layer& l = GetLayer();
  const int64_t batch = state.range(0), ctx = state.range(1);
  const int64_t mode = state.range(2);
  const bool quantized = mode == 1;
  const GpuBatchView v = l.Batch(batch, ctx);
  const double secs = TimeWithEvents(state, l.runner->stream(), [&] { l.Step(v, mode); });
  const double kv_bytes = static_cast<double>(batch) * ctx * (l.hp.kv_lora_rank + l.hp.n_rot) * 2;
  Report(state, secs,
         static_cast<double>(quantized ? l.quant_weight_bytes : l.weight_bytes) + kv_bytes);
}

// The same step captured once into a CUDA graph and replayed: no launch gaps.
// Arg q = 1: the quantized GEMV on Q4_K/Q6_K blocks instead of cuBLAS bf16
// (bytes: the blocks, k_b / v_b in bf16, the KV rows); q = 2: the bf16
// weights through the skinny kernel instead of cuBLAS.
void BM_LayerAttentionSharedExpertGraph(benchmark::State& state) {
  Layer& l = GetLayer();
  const int64_t batch = state.range(0), ctx = state.range(1);
  const int64_t mode = state.range(2);
  const bool quantized = mode == 1;
  const GpuBatchView v = l.Batch(batch, ctx);
  const cudaStream_t stream = l.runner->stream();
  l.Step(v, mode);  // warm-up outside the capture (cuBLAS heuristics, attributes)
  CUDA_BENCH_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_BENCH_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  l.Step(v, mode);
  CUDA_BENCH_CHECK(cudaStreamEndCapture(stream, &graph));
  CUDA_BENCH_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double secs =
      TimeWithEvents(state, stream, [&] { CUDA_BENCH_CHECK(cudaGraphLaunch(exec, stream)); });
  const double kv_bytes = static_cast<double>(batch) * ctx * (l.hp.kv_lora_rank + l.hp.n_rot) * 2;
  Report(state, secs,
         static_cast<double>(quantized ? l.quant_weight_bytes : l.weight_bytes) + kv_bytes);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// Random queries, an output buffer, a workspace of `workspace_bytes` and the
// MLA kernel's arguments for n_q queries of the view `v` over the layer's cache.
struct MlaCoreInputs {
  DeviceBuffer q, out, workspace;
  kc::MlaAttentionArgs args;
  int n_sm = 0;

  MlaCoreInputs(const Layer& l, const GpuBatchView& v, int64_t n_q, size_t workspace_bytes) {
    const int64_t n_head = l.hp.n_head, kvl = l.hp.kv_lora_rank, rw = kvl + l.hp.n_rot;
    auto qb = DeviceBuffer::Allocate(n_q * n_head * rw * 4, "q");
    auto ob = DeviceBuffer::Allocate(n_q * n_head * kvl * 2, "ctx");
    auto wb = DeviceBuffer::Allocate(workspace_bytes, "workspace");
    BENCH_CHECK(qb.status());
    BENCH_CHECK(ob.status());
    BENCH_CHECK(wb.status());
    q = std::move(*qb);
    out = std::move(*ob);
    workspace = std::move(*wb);
    CUDA_BENCH_CHECK(kc::FillRandomF32(q.as<float>(), n_q * n_head * rw, 3, 0.1f, nullptr));
    int device = 0;
    CUDA_BENCH_CHECK(cudaGetDevice(&device));
    CUDA_BENCH_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device));
    args.q = q.as<float>();
    args.q_stride = n_head * rw;
    args.n_q = n_q;
    args.n_head = static_cast<int32_t>(n_head);
    args.kv_lora = static_cast<int32_t>(kvl);
    args.n_rot = static_cast<int32_t>(l.hp.n_rot);
    args.scale = static_cast<float>(l.hp.kq_scale);
    args.q_seq = v.seq_index;
    args.q_pos = v.positions;
    args.kv = l.kv;
    args.out_bf16 = out.as<Bf16>();
    args.out_bf16_stride = n_head * kvl;
  }
};

// The MLA attention kernel alone (scores, softmax, context) over the paged cache.
void BM_MlaAttentionKernel(benchmark::State& state) {
  Layer& l = GetLayer();
  const int64_t batch = state.range(0), ctx = state.range(1);
  const GpuBatchView v = l.Batch(batch, ctx);
  l.Step(v);  // fills the query buffers
  const int64_t n_head = l.hp.n_head, kvl = l.hp.kv_lora_rank, rw = kvl + l.hp.n_rot;
  MlaCoreInputs in(l, v, batch, size_t{64} << 20);
  const kc::MlaAttentionArgs& a = in.args;
  DeviceBuffer* ws = &in.workspace;
  const int n_sm = in.n_sm;
  kc::MlaAttentionPlan plan =
      kc::PlanMlaAttention(batch, a.n_head, a.kv_lora, a.n_rot, ctx, n_sm, ws->bytes());
  // Arg tc: 0 the CUDA-core kernel, 1-3 the tensor-core one in that form (mla.cu).
  plan.tensor_cores = state.range(2) != 0;
  if (plan.tensor_cores) plan.tc_tile_groups = static_cast<int32_t>(state.range(2));
  // Arg split_len > 0: that many cache rows per split instead of the plan's.
  if (state.range(3) > 0) {
    plan.split_len = static_cast<int32_t>(state.range(3));
    plan.n_splits = static_cast<int32_t>((ctx + plan.split_len - 1) / plan.split_len);
  }
  const double secs = TimeWithEvents(state, l.runner->stream(), [&] {
    CUDA_BENCH_CHECK(kc::MlaAttention(a, plan, ws->get(), l.runner->stream()));
  });
  Report(state, secs, static_cast<double>(batch) * ctx * rw * 2);
  // Multiply-adds: scores (rw) and context (kvl) per head and row.
  state.counters["TFLOP/s"] = 2.0 * batch * n_head * ctx * (rw + kvl) /
                              (secs / static_cast<double>(state.iterations())) / 1e12;
  state.counters["splits"] = plan.n_splits;
}

// The attention block of one prompt chunk (n tokens after pos0 cached rows of
// one sequence; arg path 0: the MLA kernel, 1: the two-product prompt-chunk
// form, kernels/cuda/mla_prefill.h), and its attention core alone (arg
// core = 1: MlaAttention or MlaPrefillAttention on random queries). FLOPs:
// the causal attention's multiply-adds (scores over rw, context over kv_lora),
// counted once (not the hi/lo doubling, nor the masked part of a chunk).
void BM_PrefillAttention(benchmark::State& state) {
  Layer& l = GetLayer();
  const int64_t n = state.range(0), pos0 = state.range(1);
  const bool products = state.range(2) != 0;
  const bool core = state.range(3) != 0;
  GpuBatchSegment segment;
  const GpuBatchView v = l.Prefill(n, pos0, &segment);
  const int64_t n_head = l.hp.n_head, kvl = l.hp.kv_lora_rank, rw = kvl + l.hp.n_rot;
  l.runner->set_skinny_max_tokens(0);
  l.runner->set_mla_prefill_min_tokens(products ? 1 : 0);
  double secs = 0.0;
  if (!core) {
    secs = TimeWithEvents(state, l.runner->stream(),
                          [&] { BENCH_CHECK(l.runner->Attention(l.w, l.kv, v, l.runner->x())); });
  } else {
    MlaCoreInputs in(l, v, n, size_t{512} << 20);
    const kc::MlaAttentionArgs& a = in.args;
    DeviceBuffer* ws = &in.workspace;
    const int n_sm = in.n_sm;
    const kc::MlaAttentionPlan plan =
        kc::PlanMlaAttention(n, a.n_head, a.kv_lora, a.n_rot, pos0 + n, n_sm, 64 << 20);
    kc::MlaPrefillArgs p;
    p.q = a.q;
    p.q_stride = a.q_stride;
    p.n_q = n;
    p.n_head = a.n_head;
    p.kv_lora = a.kv_lora;
    p.n_rot = a.n_rot;
    p.scale = a.scale;
    p.seq = 0;
    p.pos0 = pos0;
    p.kv = l.kv;
    p.out_bf16 = a.out_bf16;
    // The workspace the runner would offer: its FFN gate/up buffer.
    const size_t offered = static_cast<size_t>(l.runner->layout().gu) * 4;
    const kc::MlaPrefillPlan pplan =
        kc::PlanMlaPrefill(n, pos0, p.n_head, p.kv_lora, p.n_rot, std::min(offered, ws->bytes()));
    state.counters["chunk"] = static_cast<double>(pplan.queries_per_chunk);
    secs = TimeWithEvents(state, l.runner->stream(), [&] {
      if (products) {
        const kc::MlaPrefillStatus st =
            kc::MlaPrefillAttention(l.runner->cublas(), p, pplan, ws->get(), l.runner->stream());
        if (!st.ok()) {
          std::fprintf(stderr, "MlaPrefillAttention: %s\n", st.step);
          std::abort();
        }
      } else {
        CUDA_BENCH_CHECK(kc::MlaAttention(a, plan, ws->get(), l.runner->stream()));
      }
    });
  }
  const double per = secs / static_cast<double>(state.iterations());
  // Σ over queries of (pos + 1) rows, times heads, times (rw + kvl) multiply-adds.
  const double rows = static_cast<double>(n) * pos0 + static_cast<double>(n) * (n + 1) / 2.0;
  state.counters["ms"] = per * 1e3;
  state.counters["TFLOP/s"] = 2.0 * rows * n_head * (rw + kvl) / per / 1e12;
  // The tensor cores' actual work: twice that (hi + lo) on the products path.
  if (g_tensor_tflops > 0.0 && products) {
    state.counters["peak%"] = 100.0 * 2.0 * state.counters["TFLOP/s"] / g_tensor_tflops;
  }
  state.counters["tok/s"] = static_cast<double>(n) / per;
  l.runner->set_mla_prefill_min_tokens(0);
  l.ResetSequences();
}

// One bf16 product of a DeepSeek-V3 decode shape: cuBLAS (path 0) or the
// skinny kernel (path 1). Each iteration runs the product over every copy of
// the weights (copies cycle over >= 256 MB so that L2 never holds them).
struct ProductShape {
  const char* name;
  int64_t n_out, n_in, batch;
};
constexpr ProductShape kProductShapes[] = {
    {"q_a", 1536, 7168, 1},          {"q_b", 24576, 1536, 1},
    {"kv_a", 576, 7168, 1},          {"q_a+kv_a", 2112, 7168, 1},
    {"k_b", 512, 128, 128},          {"v_b", 128, 512, 128},
    {"attn_output", 7168, 16384, 1}, {"shexp_gate_up", 4096, 7168, 1},
    {"shexp_down", 7168, 2048, 1},   {"dense_gate_up", 36864, 7168, 1},
    {"dense_down", 7168, 18432, 1},  {"head_8k", 8192, 7168, 1},
};

// Random copies of a shape's bf16 weights, cycling through >= 256 MB (so that
// L2 never holds the next launch's weights); each call frees the last set.
std::vector<const Bf16*> WeightCopies(const ProductShape& sh) {
  static std::vector<DeviceBuffer> pool;
  pool.clear();
  const int64_t elems = sh.n_out * sh.n_in * sh.batch;
  const int64_t bytes = elems * 2;
  const int64_t copies = std::max<int64_t>(1, ((int64_t{256} << 20) + bytes - 1) / bytes);
  std::vector<const Bf16*> w;
  for (int64_t i = 0; i < copies; ++i) {
    auto b = DeviceBuffer::Allocate(bytes, "product weights");
    BENCH_CHECK(b.status());
    CUDA_BENCH_CHECK(kc::FillRandomBf16(b->as<Bf16>(), elems, 100 + i, 0.02f, nullptr));
    w.push_back(b->as<Bf16>());
    pool.push_back(std::move(*b));
  }
  return w;
}

void BM_Bf16Product(benchmark::State& state) {
  const ProductShape& sh = kProductShapes[state.range(0)];
  const int64_t n = state.range(1);
  const bool skinny = state.range(2) != 0;
  state.SetLabel(sh.name);
  Layer& l = GetLayer();  // the runner's stream and cuBLAS handle
  const int64_t bytes = sh.n_out * sh.n_in * sh.batch * 2;
  const std::vector<const Bf16*> w = WeightCopies(sh);
  const int64_t copies = static_cast<int64_t>(w.size());
  auto x = DeviceBuffer::Allocate(n * sh.n_in * sh.batch * 2, "x");
  auto y = DeviceBuffer::Allocate(n * sh.n_out * sh.batch * 4, "y");
  BENCH_CHECK(x.status());
  BENCH_CHECK(y.status());
  CUDA_BENCH_CHECK(kc::FillRandomBf16(x->as<Bf16>(), n * sh.n_in * sh.batch, 7, 1.0f, nullptr));
  l.runner->set_skinny_max_tokens(skinny ? kc::kSkinnyMaxTokens : 0);
  // Batched like the attention's k_b / v_b: product b's x and y are columns
  // of one token row.
  const double secs = TimeWithEvents(state, l.runner->stream(), [&] {
    for (int64_t i = 0; i < copies; ++i) {
      BENCH_CHECK(l.runner->ProductBf16(w[i], sh.n_in, sh.n_out * sh.n_in, x->as<Bf16>(),
                                        sh.n_in * sh.batch, sh.n_in, y->get(), CUDA_R_32F,
                                        sh.n_out * sh.batch, sh.n_out, sh.n_out, sh.n_in, n,
                                        sh.batch, 0.0f, sh.name));
    }
  });
  const double per_launch = secs / static_cast<double>(state.iterations()) / copies;
  state.counters["us"] = per_launch * 1e6;
  state.counters["GB/s"] = bytes / per_launch / 1e9;
  if (g_copy_gbps > 0.0) state.counters["HBM%"] = 100.0 * bytes / per_launch / 1e9 / g_copy_gbps;
}

// The skinny kernel's launch variants on one product shape at `tok` tokens:
// variant 0: the plan; 1: no split; 2: twice the split; 3 / 4: not pipelined,
// unroll 2 / 4.
void BM_SkinnyVariant(benchmark::State& state) {
  const ProductShape& sh = kProductShapes[state.range(0)];
  const int64_t n = state.range(1);
  const int variant = static_cast<int>(state.range(2));
  Layer& l = GetLayer();
  int device = 0, n_sm = 0;
  CUDA_BENCH_CHECK(cudaGetDevice(&device));
  CUDA_BENCH_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device));
  kc::SkinnyGemmPlan plan = kc::PlanSkinnyGemm(sh.n_out, sh.n_in, sh.batch, n_sm);
  // 0: the plan; 1: the plan without a split; 2: the plan with twice its
  // split; 3, 4: no pipelining, unroll 2, 4.
  if (variant == 1 && plan.tiles_per_block == 1) plan.split = 1;
  if (variant == 2 && plan.tiles_per_block == 1) plan.split *= 2;
  // Pipelined where a (warp, part) keeps >= 4 k-steps of 32, as the plan does.
  auto pipelined = [&](int64_t parts) { return (sh.n_in / 32 + parts - 1) / parts >= 4; };
  if (variant >= 20) {  // tiles per block forced to variant - 20 (1, 2, 4, 8), no split
    plan.tiles_per_block = variant - 20;
    plan.split = 1;
    plan.pipelined = pipelined(8 / plan.tiles_per_block);
  } else if (variant >= 10 && plan.tiles_per_block == 1) {  // split forced to variant - 10
    plan.split = variant - 10;
    plan.pipelined = pipelined(int64_t{8} * plan.split);
  } else if (variant >= 3) {
    plan.pipelined = false;
    plan.unroll = variant == 3 ? 2 : 4;
  }
  state.SetLabel(std::string(sh.name) + " unroll " + std::to_string(plan.unroll) +
                 (plan.pipelined ? " pipelined" : "") + " split " + std::to_string(plan.split));
  const int64_t bytes = sh.n_out * sh.n_in * sh.batch * 2;
  const std::vector<const Bf16*> w = WeightCopies(sh);
  const int64_t copies = static_cast<int64_t>(w.size());
  auto x = DeviceBuffer::Allocate(n * sh.n_in * sh.batch * 2, "x");
  auto y = DeviceBuffer::Allocate(n * sh.n_out * sh.batch * 4, "y");
  auto ws = DeviceBuffer::Allocate(64 << 20, "ws");
  BENCH_CHECK(x.status());
  BENCH_CHECK(y.status());
  BENCH_CHECK(ws.status());
  CUDA_BENCH_CHECK(cudaMemset(ws->get(), 0, ws->bytes()));
  CUDA_BENCH_CHECK(kc::FillRandomBf16(x->as<Bf16>(), n * sh.n_in * sh.batch, 7, 1.0f, nullptr));
  kc::SkinnyGemmArgs a;
  a.ldw = sh.n_in;
  a.w_batch_stride = sh.n_out * sh.n_in;
  a.x = x->as<Bf16>();
  a.ldx = sh.n_in * sh.batch;
  a.x_batch_stride = sh.n_in;
  a.y = y->get();
  a.ldy = sh.n_out * sh.batch;
  a.y_batch_stride = sh.n_out;
  a.n_out = sh.n_out;
  a.n_in = sh.n_in;
  a.n_tokens = n;
  a.batch = sh.batch;
  const double secs = TimeWithEvents(state, l.runner->stream(), [&] {
    for (int64_t i = 0; i < copies; ++i) {
      a.w = w[i];
      CUDA_BENCH_CHECK(kc::SkinnyGemm(a, plan, ws->get(), ws->bytes(), l.runner->stream()));
    }
  });
  const double per_launch = secs / static_cast<double>(state.iterations()) / copies;
  state.counters["us"] = per_launch * 1e6;
  if (g_copy_gbps > 0.0) state.counters["HBM%"] = 100.0 * bytes / per_launch / 1e9 / g_copy_gbps;
}

}  // namespace
}  // namespace ktx::gpu

int main(int argc, char** argv) {
  std::string note;
  const auto devices = ktx::kernels::QueryCudaDevices(&note);
  if (devices.empty()) {
    std::printf("gpu_benchmark: no CUDA device (%s); nothing to measure\n", note.c_str());
    return 0;
  }
  std::printf("device: %s, %d SMs, %.1f GiB\n", devices[0].name.c_str(), devices[0].multiprocessors,
              devices[0].memory_bytes / double(1 << 30));
  benchmark::Initialize(&argc, argv);
  benchmark::RegisterBenchmark("BM_DeviceCopy_1GiB", ktx::gpu::BM_DeviceCopy)
      ->UseManualTime()
      ->Iterations(20);
  benchmark::RegisterBenchmark("BM_TensorCorePeak_bf16", ktx::gpu::BM_TensorCorePeak)
      ->UseManualTime()
      ->Iterations(20);
  auto* eager = benchmark::RegisterBenchmark("BM_LayerAttentionSharedExpert",
                                             ktx::gpu::BM_LayerAttentionSharedExpert);
  auto* graph = benchmark::RegisterBenchmark("BM_LayerAttentionSharedExpertGraph",
                                             ktx::gpu::BM_LayerAttentionSharedExpertGraph);
  auto* kernel =
      benchmark::RegisterBenchmark("BM_MlaAttentionKernel", ktx::gpu::BM_MlaAttentionKernel);
  for (auto* b : {eager, graph}) {
    b->ArgNames({"batch", "ctx", "q"})->UseManualTime()->Unit(benchmark::kMicrosecond);
  }
  kernel->ArgNames({"batch", "ctx", "tc", "split_len"})
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  for (int64_t batch : {1, 16}) {
    for (int64_t ctx : {1024, 8192}) {
      eager->Args({batch, ctx, 0});
      graph->Args({batch, ctx, 0});
      kernel->Args({batch, ctx, 0, 0});
      kernel->Args({batch, ctx, 1, 0});
      kernel->Args({batch, ctx, 2, 0});
      kernel->Args({batch, ctx, 3, 0});
    }
  }
  // The quantized GEMV (Q4_K/Q6_K blocks) against cuBLAS bf16 on the same step.
  for (int64_t batch : {1, 2, 4, 8, 16}) {
    for (int64_t q : {0, 1}) {
      if (q == 0 && (batch == 1 || batch == 16)) continue;  // registered above at 1K
      eager->Args({batch, 1024, q});
      graph->Args({batch, 1024, q});
    }
  }
  // Prompt chunks: the MLA kernel against the two-product form, the block and the core alone.
  auto* prefill =
      benchmark::RegisterBenchmark("BM_PrefillAttention", ktx::gpu::BM_PrefillAttention);
  prefill->ArgNames({"n", "pos0", "products", "core"})
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  for (const auto& [n, pos0] : std::vector<std::pair<int64_t, int64_t>>{
           {2048, 0}, {512, 0}, {512, 4096}, {128, 1024}, {64, 1024}, {32, 1024}, {16, 1024}}) {
    for (int64_t core : {0, 1}) {
      for (int64_t products : {0, 1}) prefill->Args({n, pos0, products, core});
    }
  }
  // The skinny bf16 kernel against cuBLAS, per decode product shape.
  auto* product = benchmark::RegisterBenchmark("BM_Bf16Product", ktx::gpu::BM_Bf16Product);
  product->ArgNames({"shape", "tok", "skinny"})->UseManualTime()->Unit(benchmark::kMicrosecond);
  for (int64_t shape = 0; shape < static_cast<int64_t>(std::size(ktx::gpu::kProductShapes));
       ++shape) {
    for (int64_t tok : {1, 4, 16, 64}) {
      product->Args({shape, tok, 0});
      product->Args({shape, tok, 1});
    }
  }
  auto* variant = benchmark::RegisterBenchmark("BM_SkinnyVariant", ktx::gpu::BM_SkinnyVariant);
  variant->ArgNames({"shape", "tok", "v"})->UseManualTime()->Unit(benchmark::kMicrosecond);
  for (int64_t shape = 0; shape < static_cast<int64_t>(std::size(ktx::gpu::kProductShapes));
       ++shape) {
    for (int64_t v = 0; v < 5; ++v) variant->Args({shape, 1, v});
  }
  // Forced tiles per block (v = 20 + tiles), at 1 token.
  for (int64_t shape = 0; shape < static_cast<int64_t>(std::size(ktx::gpu::kProductShapes));
       ++shape) {
    for (int64_t tpb : {1, 2, 4, 8}) variant->Args({shape, 1, 20 + tpb});
  }
  // Forced splits (v = 10 + split) on the larger products, at 1 and 16 tokens.
  for (const char* name :
       {"q_a", "q_b", "q_a+kv_a", "attn_output", "shexp_gate_up", "shexp_down", "dense_down"}) {
    for (int64_t shape = 0; shape < static_cast<int64_t>(std::size(ktx::gpu::kProductShapes));
         ++shape) {
      if (std::string(ktx::gpu::kProductShapes[shape].name) != name) continue;
      for (int64_t tok : {1, 16}) {
        for (int64_t split : {1, 2, 3, 4, 5, 6, 7, 8}) variant->Args({shape, tok, 10 + split});
      }
    }
  }
  // Split lengths of the tensor-core kernel's two forms at batch 1, and of the
  // two-group form at batch 16 x 8K.
  for (int64_t tc : {1, 2}) {
    for (int64_t ctx : {1024, 8192}) {
      for (int64_t split_len : {32, 64, 128, 256, 512, 1024}) {
        if (ctx / split_len <= 128 && split_len < ctx) {
          kernel->Args({1, ctx, tc, split_len});  // 64 MiB workspace
        }
      }
    }
  }
  for (int64_t split_len : {1024, 2048, 4096, 8192}) kernel->Args({16, 8192, 2, split_len});
  for (int64_t split_len : {512, 1024}) kernel->Args({16, 1024, 2, split_len});
  // The whole step with the skinny kernel on the bf16 weights.
  for (int64_t batch : {1, 16}) {
    for (int64_t ctx : {1024, 8192}) {
      eager->Args({batch, ctx, 2});
      graph->Args({batch, ctx, 2});
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
