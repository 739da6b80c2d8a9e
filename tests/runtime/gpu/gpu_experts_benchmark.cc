// gpu_experts_benchmark: routed experts of one DeepSeek-V3 MoE layer streamed
// over PCIe and computed on the GPU (GpuExpertStreamer), against the card's
// pinned host -> device copy rate measured in the same run (the limit), and
// the CPU/GPU split the cost model makes from its calibration.
//
// The layer: 256 experts of 7168 x 2048, gate/up Q4_K + down Q6_K
// (Q4_K_M-like, ~6.3 GB in host memory; one expert is quantized from random
// values and copied to all 256), random routing with 8 experts per token.
// For 512 and 2048 tokens: every expert on the GPU (time, GB/s of expert
// bytes against the limit, with and without prefetch), the cost model's
// split (experts on the GPU, modelled GPU / CPU / all-CPU times) and the
// measured time of the GPU part of that split. CPU figures: the defaults of
// GpuExpertOptions or KTX_GPU_EXPERTS_CPU="fixed_ms,per_token_us".
//
//   gpu_experts_benchmark [--experts N] [--json FILE]
//
// Exits 2 with the reason when there is no GPU; 1 on a CUDA error.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/quant/quant.h"
#include "kernels/cuda/basic_ops.h"
#include "kernels/cuda/device_query.h"
#include "runtime/gpu/cuda_buffers.h"
#include "runtime/gpu/expert_cost_model.h"
#include "runtime/gpu/gpu_experts.h"

namespace ktx::gpu {
namespace {

using kernels::TensorType;
using Bf16 = __nv_bfloat16;

#define CHECK_OK(expr)                                                                \
  do {                                                                                \
    const auto ktx_s_ = (expr);                                                       \
    if (!ktx_s_.ok()) {                                                               \
      std::fprintf(stderr, "%s: %s\n", #expr, std::string(ktx_s_.message()).c_str()); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (false)
#define CHECK_CUDA(expr) CHECK_OK(CudaOk((expr), #expr))

double Seconds(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms * 1e-3;
}

// Pinned host -> device rate: 4 copies of 256 MiB, best of 3.
double PinnedH2D(cudaStream_t s) {
  const size_t bytes = size_t{256} << 20;
  auto host = PinnedBuffer::Allocate(bytes, "bandwidth test");
  CHECK_OK(host.status());
  auto dev = DeviceBuffer::Allocate(bytes, "bandwidth test");
  CHECK_OK(dev.status());
  std::memset(host->as<uint8_t>(), 1, bytes);
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    CHECK_CUDA(cudaEventRecord(a, s));
    for (int i = 0; i < 4; ++i) {
      CHECK_CUDA(
          cudaMemcpyAsync(dev->get(), host->as<uint8_t>(), bytes, cudaMemcpyHostToDevice, s));
    }
    CHECK_CUDA(cudaEventRecord(b, s));
    CHECK_CUDA(cudaEventSynchronize(b));
    best = std::max(best, 4.0 * bytes / Seconds(a, b));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return best;
}

struct Aligned {
  void operator()(uint8_t* p) const { std::free(p); }
};

int Main(int argc, char** argv) {
  int32_t n_expert = 256;
  std::string json_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--experts" && i + 1 < argc) {
      n_expert = std::atoi(argv[++i]);
    } else if (a == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else {
      std::fprintf(stderr, "usage: gpu_experts_benchmark [--experts N] [--json FILE]\n");
      return 1;
    }
  }
  std::string note;
  if (kernels::QueryCudaDevices(&note).empty()) {
    std::fprintf(stderr, "gpu_experts_benchmark: no usable CUDA device (%s)\n", note.c_str());
    return 2;
  }
  const int64_t n_embd = 7168, n_ff = 2048, max_tokens = 2048;
  const int32_t n_used = 8;
  // One expert quantized from random values, copied to every expert.
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t g_row = kernels::RowBytes(kernels::TraitsOf(TensorType::kQ4_K), n_embd);
  const int64_t d_row = kernels::RowBytes(kernels::TraitsOf(TensorType::kQ6_K), n_ff);
  const size_t g_bytes = static_cast<size_t>(n_ff * g_row),
               d_bytes = static_cast<size_t>(n_embd * d_row);
  auto alloc = [&](size_t bytes) {
    const size_t rounded = (bytes + 4095) / 4096 * 4096;
    std::unique_ptr<uint8_t, Aligned> p(static_cast<uint8_t*>(std::aligned_alloc(4096, rounded)));
    if (!p) {
      std::fprintf(stderr, "cannot allocate %zu bytes of host memory\n", rounded);
      std::exit(1);
    }
    return p;
  };
  auto gate = alloc(g_bytes * n_expert), up = alloc(g_bytes * n_expert),
       down = alloc(d_bytes * n_expert);
  {
    std::mt19937 rng(7);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    std::vector<float> row(n_embd);
    for (int64_t r = 0; r < n_ff; ++r) {
      for (auto& v : row) v = dist(rng);
      kernels::QuantizeRow(TensorType::kQ4_K, row.data(), gate.get() + r * g_row, n_embd);
      for (auto& v : row) v = dist(rng);
      kernels::QuantizeRow(TensorType::kQ4_K, row.data(), up.get() + r * g_row, n_embd);
    }
    for (int64_t r = 0; r < n_embd; ++r) {
      for (int64_t c = 0; c < n_ff; ++c) row[c] = dist(rng);
      kernels::QuantizeRow(TensorType::kQ6_K, row.data(), down.get() + r * d_row, n_ff);
    }
    for (int32_t e = 1; e < n_expert; ++e) {
      std::memcpy(gate.get() + e * g_bytes, gate.get(), g_bytes);
      std::memcpy(up.get() + e * g_bytes, up.get(), g_bytes);
      std::memcpy(down.get() + e * d_bytes, down.get(), d_bytes);
    }
  }
  const double make_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("layer: %d experts, %.2f GB in host memory (made in %.1f s)\n", n_expert,
              (2.0 * g_bytes + d_bytes) * n_expert / 1e9, make_s);

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double limit = PinnedH2D(stream);
  std::printf("pinned H2D (the limit): %.2f GB/s\n", limit / 1e9);

  ExpertLayerTensors t;
  t.gate = gate.get();
  t.up = up.get();
  t.down = down.get();
  t.gate_type = t.up_type = TensorType::kQ4_K;
  t.down_type = TensorType::kQ6_K;
  t.gate_row_bytes = t.up_row_bytes = g_row;
  t.down_row_bytes = d_row;
  GpuExpertStreamerConfig c;
  c.n_embd = n_embd;
  c.n_ff = n_ff;
  c.n_expert = n_expert;
  c.n_expert_used = n_used;
  c.max_tokens = max_tokens;
  c.n_slots = 32;
  const auto reg0 = std::chrono::steady_clock::now();
  auto made = GpuExpertStreamer::Create(c, {t}, stream);
  CHECK_OK(made.status());
  GpuExpertStreamer& s = **made;
  const double reg_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - reg0).count();
  std::printf("streamer: %s (set up in %.1f s)\n", s.host_memory_note().c_str(), reg_s);
  ExpertCostModel model;
  CHECK_OK(s.Calibrate(&model));
  GpuExpertOptions defaults;
  model.cpu_fixed_s = defaults.cpu_expert_fixed_ms * 1e-3;
  model.cpu_per_token_s = defaults.cpu_expert_per_token_us * 1e-6;
  if (const char* v = std::getenv("KTX_GPU_EXPERTS_CPU"); v != nullptr) {
    double f = 0, p = 0;
    if (std::sscanf(v, "%lf,%lf", &f, &p) == 2) {
      model.cpu_fixed_s = f * 1e-3;
      model.cpu_per_token_s = p * 1e-6;
    }
  }
  model.min_batch_tokens = defaults.min_batch_tokens;
  std::printf("cost model: %s\n", DescribeCostModel(model, s.shape()).c_str());
  std::printf("break-even batch (uniform routing): %lld tokens\n",
              static_cast<long long>(BreakEvenTokens(model, s.shape(), n_used, n_expert, 1 << 16)));

  auto h = DeviceBuffer::Allocate(max_tokens * n_embd * 2, "h");
  auto acc = DeviceBuffer::Allocate(max_tokens * n_embd * 4, "acc");
  CHECK_OK(h.status());
  CHECK_OK(acc.status());
  CHECK_CUDA(kernels::cuda::FillRandomBf16(h->as<Bf16>(), max_tokens * n_embd, 3, 1.0f, stream));
  CHECK_CUDA(cudaMemsetAsync(acc->get(), 0, acc->bytes(), stream));
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::string json =
      "{\"pinned_h2d_gbps\": " + std::to_string(limit / 1e9) + ", \"host_memory\": \"" +
      (s.host_memory() == HostMemoryMode::kRegistered ? "registered" : "bounce") +
      "\", \"calibrated_pcie_gbps\": " + std::to_string(model.pcie_bytes_per_s / 1e9) +
      ", \"gpu_tflops\": " + std::to_string(model.gpu_flops_per_s / 1e12) + ", \"runs\": [";
  std::mt19937 rng(11);
  for (const int64_t n : {int64_t{512}, int64_t{2048}}) {
    models::Routing r;
    r.n_tokens = n;
    r.n_expert_used = n_used;
    std::vector<int32_t> ids(n_expert);
    for (int32_t e = 0; e < n_expert; ++e) ids[e] = e;
    for (int64_t tok = 0; tok < n; ++tok) {
      std::shuffle(ids.begin(), ids.end(), rng);
      for (int k = 0; k < n_used; ++k) {
        r.expert_ids.push_back(ids[k]);
        r.weights.push_back(1.0f / n_used);
      }
    }
    std::vector<int64_t> counts(n_expert, 0);
    for (int32_t e : r.expert_ids) ++counts[e];
    // Time of Compute for a set, best of 2 (the first also pages in).
    auto timed = [&](const std::vector<int32_t>& set, bool prefetch, uint64_t* bytes) {
      double best = 1e30;
      for (int rep = 0; rep < 2; ++rep) {
        CHECK_CUDA(cudaStreamSynchronize(stream));
        const uint64_t before = s.stats().bytes_copied;
        CHECK_CUDA(cudaEventRecord(a, stream));
        if (prefetch) CHECK_OK(s.Prefetch(0, set));
        CHECK_OK(s.Compute(0, set, r, h->as<Bf16>(), n_embd, acc->as<float>(), n_embd));
        CHECK_CUDA(cudaEventRecord(b, stream));
        CHECK_CUDA(cudaEventSynchronize(b));
        best = std::min(best, Seconds(a, b));
        *bytes = s.stats().bytes_copied - before;
      }
      return best;
    };
    const ExpertSplit all = AllExpertsOnGpu(model, counts, s.shape());
    uint64_t bytes = 0;
    const double t_all = timed(all.gpu_experts, false, &bytes);
    const double t_all_pf = timed(all.gpu_experts, true, &bytes);
    const ExpertSplit split = PlanExpertSplit(model, counts, s.shape(), n);
    uint64_t split_bytes = 0;
    const double t_split =
        split.gpu_experts.empty() ? 0 : timed(split.gpu_experts, false, &split_bytes);
    std::printf(
        "%lld tokens: all %zu experts on the GPU: %.1f ms (%.1f ms with prefetch), %.2f GB -> "
        "%.2f GB/s = %.0f %% of the limit; modelled %.1f ms\n",
        static_cast<long long>(n), all.gpu_experts.size(), t_all * 1e3, t_all_pf * 1e3, bytes / 1e9,
        bytes / t_all / 1e9, 100.0 * bytes / t_all / limit, all.gpu_s * 1e3);
    std::printf(
        "%lld tokens: split: %zu experts (%lld tokens) on the GPU, modelled GPU %.1f ms / CPU %.1f "
        "ms (all CPU %.1f ms); GPU part measured %.1f ms; projected 3 MoE layers -> %.0f tok/s "
        "(experts only)\n",
        static_cast<long long>(n), split.gpu_experts.size(),
        static_cast<long long>(split.gpu_tokens), split.gpu_s * 1e3, split.cpu_s * 1e3,
        split.all_cpu_s * 1e3, t_split * 1e3, n / (3.0 * std::max(split.time_s(), 1e-9)));
    json += std::string(n == 512 ? "" : ", ") + "{\"tokens\": " + std::to_string(n) +
            ", \"all_gpu_ms\": " + std::to_string(t_all * 1e3) +
            ", \"all_gpu_prefetch_ms\": " + std::to_string(t_all_pf * 1e3) +
            ", \"all_gpu_gbps\": " + std::to_string(bytes / t_all / 1e9) +
            ", \"split_gpu_experts\": " + std::to_string(split.gpu_experts.size()) +
            ", \"split_model_gpu_ms\": " + std::to_string(split.gpu_s * 1e3) +
            ", \"split_model_cpu_ms\": " + std::to_string(split.cpu_s * 1e3) +
            ", \"all_cpu_model_ms\": " + std::to_string(split.all_cpu_s * 1e3) +
            ", \"split_gpu_measured_ms\": " + std::to_string(t_split * 1e3) + "}";
  }
  json += "]}\n";
  std::printf("%s", json.c_str());
  if (!json_path.empty()) {
    if (FILE* f = std::fopen(json_path.c_str(), "w")) {
      std::fputs(json.c_str(), f);
      std::fclose(f);
    }
  }
  return 0;
}

}  // namespace
}  // namespace ktx::gpu

int main(int argc, char** argv) { return ktx::gpu::Main(argc, argv); }
