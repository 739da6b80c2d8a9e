// gemv_benchmark: the quantized GEMV (kernels/cuda/gemv.h) against cuBLAS
// bf16 (kernels/cuda/gemm.h LinearBf16, what the GPU path runs on the bf16
// copy) at DeepSeek-V3 shapes and 1, 2, 4, 8, 16 tokens, to choose the token
// count below which CudaDeepseek2 uses the GEMV (CudaModelOptions::
// gemv_max_tokens) and to see how close each type gets to the memory limit.
//
// For each (shape, type, tokens): median time of a launch (CUDA events around
// 20 back-to-back launches, 7 repetitions), "GB/s" = weight bytes read per
// launch / time (the GGUF bytes for the GEMV, 2 bytes per weight for cuBLAS),
// "%copy" = that against the device-to-device copy bandwidth measured at the
// start of the same run (bytes read + written per second, as gpu_benchmark).
// Weights are random bytes (timing only); every launch reads a different copy
// of the matrix when one copy would fit in L2 (copies cycle over >= 256 MB),
// so the numbers are HBM numbers. "speedup" = cuBLAS time / GEMV time; the
// summary gives, per type and shape, the largest token count at which the
// GEMV is still faster.
//
// Kernel variants: every row is measured for the ring kernel ("ring",
// gemv.cu) and the direct kernel (gemv_direct.h) at each compiled launch shape
// ("direct:U:R", U chunks unrolled, R rows per warp), chosen with
// SetGemvKernel; types the direct kernel lacks run "ring" only. "q8" / "q8:U"
// (gemv_q8.h, int8 dot products; Q4_K, Q6_K, Q8_0 only, other types skip it)
// runs through QuantGemv's workspace overload; its time includes quantizing x.
// Every variant gets that workspace (unused by ring / direct). The summaries
// are per variant. A "check" after each (shape, type) compares every variant's
// y at 2 tokens with the ring kernel's (max |difference| / max |y|; both sum
// in different orders, so ~1e-6 is expected; a decoding bug shows as ~1;
// q8 quantizes x to int8, so ~1e-3 is expected there, flagged above 3e-2).
//
// "expert" rows: one resident routed expert's matrix (DeepSeek-V3 gate/up
// 7168->2048 Q4_K, down 2048->7168 Q6_K) at 1..64 tokens, the GEMV against
// what it replaces there: dequantize the blocks to bf16 + cuBLAS (the
// CudaModelOptions::expert_gemv_max_tokens crossing).
//
//   gemv_benchmark [--json FILE] [--quick] [--variants ring,direct:2,...]
//
// --quick: the attention / shared-expert shapes only, Q4_K Q6_K Q8_0 BF16,
// 1, 2, 4, 8 tokens, expert rows to 16 tokens (under a minute on an H200).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "kernels/common/tensor_type.h"
#include "kernels/cuda/basic_ops.h"
#include "kernels/cuda/dequant.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemv.h"
#include "kernels/cuda/gemv_direct.h"
#include "kernels/cuda/gemv_q8.h"

namespace {

namespace kc = ktx::kernels::cuda;
using ktx::kernels::TensorType;

#define CHECK_CUDA(expr)                                                                         \
  do {                                                                                           \
    const cudaError_t e_ = (expr);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (false)

#define CHECK_CUBLAS(expr)                                                            \
  do {                                                                                \
    const cublasStatus_t s_ = (expr);                                                 \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                \
      std::fprintf(stderr, "%s:%d %s: cuBLAS status %d\n", __FILE__, __LINE__, #expr, \
                   static_cast<int>(s_));                                             \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (false)

constexpr int kLaunchesPerTiming = 20;
const char* const kVariants[] = {"ring", "direct:1", "direct:2", "direct:4", "direct:2:2"};
constexpr int kRepetitions = 7;
constexpr uint64_t kRotationBytes = uint64_t{256} << 20;

struct Shape {
  const char* name;
  int64_t n_in;
  int64_t n_out;
};

// DeepSeek-V3 (n_embd 7168, q_lora 1536, 128 heads x 192, kv_lora 512 + 64,
// n_ff 18432, n_ff_exp 2048, n_vocab 129280).
const Shape kShapes[] = {
    {"attn_q_a 7168->1536", 7168, 1536},
    {"attn_q_b 1536->24576", 1536, 24576},
    {"attn_kv_a_mqa 7168->576", 7168, 576},
    {"attn_output 16384->7168", 16384, 7168},
    {"ffn_down 18432->7168", 18432, 7168},
    {"ffn_gate|up 7168->18432", 7168, 18432},
    {"shexp/expert gate|up 7168->2048", 7168, 2048},
    {"shexp gate+up 7168->4096", 7168, 4096},
    {"shexp/expert down 2048->7168", 2048, 7168},
    {"output 7168->129280", 7168, 129280},
};

struct Timer {
  cudaEvent_t start = nullptr, stop = nullptr;
  Timer() {
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
  }
  ~Timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  // Median over kRepetitions of the mean time of one call of `f(i)`, in us.
  template <typename F>
  double Median(cudaStream_t stream, F&& f) {
    for (int i = 0; i < 3; ++i) f(i);  // warm-up (and the first-call attribute setup)
    std::vector<double> us;
    int call = 0;
    for (int r = 0; r < kRepetitions; ++r) {
      CHECK_CUDA(cudaEventRecord(start, stream));
      for (int i = 0; i < kLaunchesPerTiming; ++i) f(call++);
      CHECK_CUDA(cudaEventRecord(stop, stream));
      CHECK_CUDA(cudaEventSynchronize(stop));
      float ms = 0;
      CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
      us.push_back(1000.0 * ms / kLaunchesPerTiming);
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  }
};

// Device-to-device copy bandwidth (read + write), best of 5, 1 GiB.
double CopyGbps(cudaStream_t stream) {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  Timer t;
  double best = 1e30;
  for (int r = 0; r < 6; ++r) {
    CHECK_CUDA(cudaEventRecord(t.start, stream));
    CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
    CHECK_CUDA(cudaEventRecord(t.stop, stream));
    CHECK_CUDA(cudaEventSynchronize(t.stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, t.start, t.stop));
    if (r > 0) best = std::min(best, static_cast<double>(ms));
  }
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  return 2.0 * bytes / (best * 1e-3) / 1e9;
}

// `copies` consecutive matrices of `bytes` each (16-byte aligned), random bytes.
struct Rotation {
  void* base = nullptr;
  uint64_t stride = 0;
  int copies = 1;
  Rotation(uint64_t bytes, cudaStream_t stream) {
    stride = (bytes + 255) / 256 * 256;
    copies = static_cast<int>(std::max<uint64_t>(1, (kRotationBytes + stride - 1) / stride));
    CHECK_CUDA(cudaMalloc(&base, stride * copies + 256));
    // Random bf16 values as bytes: finite scales, any quants.
    CHECK_CUDA(kc::FillRandomBf16(static_cast<__nv_bfloat16*>(base),
                                  static_cast<int64_t>((stride * copies) / 2), 1234, 0.02f,
                                  stream));
  }
  ~Rotation() { cudaFree(base); }
  const void* Get(int i) const { return static_cast<const uint8_t*>(base) + (i % copies) * stride; }
};

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  bool quick = false;
  std::vector<std::string> variant_names(std::begin(kVariants), std::end(kVariants));
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--variants") == 0 && i + 1 < argc) {
      variant_names.clear();
      std::string list = argv[++i];
      size_t start = 0;
      while (start <= list.size()) {
        const size_t comma = std::min(list.find(',', start), list.size());
        variant_names.push_back(list.substr(start, comma - start));
        start = comma + 1;
      }
    } else {
      std::fprintf(stderr, "usage: %s [--json FILE] [--quick] [--variants ring,direct:2,...]\n",
                   argv[0]);
      return 2;
    }
  }
  struct Variant {
    std::string name;
    kc::GemvKernelChoice choice;
  };
  std::vector<Variant> variants;
  for (const std::string& v : variant_names) {
    Variant var{v, {}};
    if (!kc::ParseGemvKernel(v, &var.choice)) {
      std::fprintf(stderr,
                   "gemv_benchmark: --variants: '%s' is not ring, direct[:U[:R]] or q8[:U]\n",
                   v.c_str());
      return 2;
    }
    variants.push_back(var);
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "gemv_benchmark: no usable CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream = nullptr;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t cublas = nullptr;
  CHECK_CUBLAS(cublasCreate(&cublas));
  CHECK_CUBLAS(cublasSetStream(cublas, stream));
  void* cublas_ws = nullptr;
  const size_t ws_bytes = size_t{32} << 20;
  CHECK_CUDA(cudaMalloc(&cublas_ws, ws_bytes));
  CHECK_CUBLAS(cublasSetWorkspace(cublas, cublas_ws, ws_bytes));

  const double copy_gbps = CopyGbps(stream);
  std::printf("device: %s, %d SMs, L2 %d MB; device-to-device copy %.0f GB/s (read + write)\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_gbps);

  std::vector<TensorType> types = {TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K,
                                   TensorType::kQ8_0, TensorType::kBF16};
  std::vector<int64_t> tokens = {1, 2, 4, 8, 16};
  if (quick) {
    types = {TensorType::kQ4_K, TensorType::kQ6_K, TensorType::kQ8_0, TensorType::kBF16};
    tokens = {1, 2, 4, 8};
  }
  const int64_t max_tokens = 64;  // x and y rows (the expert rows go to 64)

  // Activations and outputs: the largest shapes.
  int64_t max_in = 0, max_out = 0;
  for (const Shape& s : kShapes) {
    max_in = std::max(max_in, s.n_in);
    max_out = std::max(max_out, s.n_out);
  }
  __nv_bfloat16* x = nullptr;
  float* y = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&x), max_in * max_tokens * 2));
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&y), max_out * max_tokens * 4));
  CHECK_CUDA(kc::FillRandomBf16(x, max_in * max_tokens, 7, 1.0f, stream));
  const size_t gemv_ws_bytes = kc::QuantGemvWorkspaceBytes(max_in, max_tokens);
  void* gemv_ws = nullptr;
  CHECK_CUDA(cudaMalloc(&gemv_ws, gemv_ws_bytes));

  std::string json = "{\"device\": \"" + std::string(prop.name) +
                     "\", \"copy_gbps\": " + std::to_string(copy_gbps) + ", \"rows\": [";
  bool first_row = true;
  std::printf("\n%-34s %-5s %-10s %3s | %9s %7s %6s | %9s %7s %6s | %7s\n", "shape (n_in->n_out)",
              "type", "kernel", "tok", "gemv us", "GB/s", "%copy", "cublas us", "GB/s", "%copy",
              "speedup");
  struct Crossing {
    std::string what;
    int64_t last_win = 0;
  };
  std::vector<Crossing> crossings;
  Timer timer;
  const kc::GemvKernelChoice default_kernel = kc::CurrentGemvKernel();
  for (const Shape& s : kShapes) {
    if (quick && (s.n_out > 24576 || s.n_in == 18432 || s.n_out == 18432)) continue;
    // cuBLAS bf16 on the same shape, once per token count.
    const uint64_t bf16_bytes = static_cast<uint64_t>(s.n_out) * s.n_in * 2;
    std::vector<double> cublas_us;
    {
      Rotation w(bf16_bytes, stream);
      for (const int64_t nt : tokens) {
        cublas_us.push_back(timer.Median(stream, [&](int i) {
          CHECK_CUBLAS(kc::LinearBf16(cublas, static_cast<const __nv_bfloat16*>(w.Get(i)), s.n_in,
                                      x, s.n_in, y, CUDA_R_32F, s.n_out, s.n_out, s.n_in, nt));
        }));
      }
    }
    for (const TensorType type : types) {
      const ktx::kernels::TensorTypeTraits& tr = ktx::kernels::TraitsOf(type);
      if (s.n_in % tr.block_size != 0) continue;
      const int64_t row_bytes = ktx::kernels::RowBytes(tr, s.n_in);
      const uint64_t bytes = static_cast<uint64_t>(row_bytes) * s.n_out;
      Rotation w(bytes, stream);
      std::vector<std::vector<float>> check_y;  // per variant, 2 tokens on copy 0
      std::string check_first;
      for (const Variant& v : variants) {
        if (v.choice.kernel == kc::GemvKernel::kDirect && !kc::CanDirectGemv(type, row_bytes)) {
          continue;
        }
        if (v.choice.kernel == kc::GemvKernel::kQ8 && !kc::CanQ8Gemv(type, row_bytes)) continue;
        kc::SetGemvKernel(v.choice);
        Crossing c{std::string(s.name) + " " + tr.name + " " + v.name, 0};
        for (size_t k = 0; k < tokens.size(); ++k) {
          const int64_t nt = tokens[k];
          const double us = timer.Median(stream, [&](int i) {
            CHECK_CUDA(kc::QuantGemv(type, w.Get(i), row_bytes, s.n_out, s.n_in, x, s.n_in, nt, y,
                                     s.n_out, 0.0f, gemv_ws, gemv_ws_bytes, stream));
          });
          const double gbps = bytes / (us * 1e-6) / 1e9;
          const double cb_gbps = bf16_bytes / (cublas_us[k] * 1e-6) / 1e9;
          const double speedup = cublas_us[k] / us;
          if (speedup > 1.0) c.last_win = nt;
          std::printf(
              "%-34s %-5s %-10s %3lld | %9.2f %7.0f %5.0f%% | %9.2f %7.0f %5.0f%% | %6.2fx\n",
              s.name, tr.name, v.name.c_str(), static_cast<long long>(nt), us, gbps,
              100.0 * gbps / copy_gbps, cublas_us[k], cb_gbps, 100.0 * cb_gbps / copy_gbps,
              speedup);
          char buf[640];
          std::snprintf(buf, sizeof(buf),
                        "%s{\"shape\": \"%s\", \"n_in\": %lld, \"n_out\": %lld, \"type\": \"%s\", "
                        "\"kernel\": \"%s\", \"tokens\": %lld, \"gemv_us\": %.3f, "
                        "\"gemv_gbps\": %.1f, \"cublas_bf16_us\": %.3f, \"cublas_gbps\": %.1f, "
                        "\"tokens_per_pass\": %d}",
                        first_row ? "" : ", ", s.name, static_cast<long long>(s.n_in),
                        static_cast<long long>(s.n_out), tr.name, v.name.c_str(),
                        static_cast<long long>(nt), us, gbps, cublas_us[k], cb_gbps,
                        v.choice.kernel != kc::GemvKernel::kRing
                            ? 8  // the direct and q8 kernels: always 8 tokens per pass
                            : kc::QuantGemvTokensPerPass(type, s.n_in));
          json += buf;
          first_row = false;
        }
        crossings.push_back(c);
        // The check: 2 tokens on copy 0.
        CHECK_CUDA(kc::QuantGemv(type, w.Get(0), row_bytes, s.n_out, s.n_in, x, s.n_in, 2, y,
                                 s.n_out, 0.0f, gemv_ws, gemv_ws_bytes, stream));
        std::vector<float> got(2 * s.n_out);
        CHECK_CUDA(cudaMemcpyAsync(got.data(), y, got.size() * 4, cudaMemcpyDeviceToHost, stream));
        CHECK_CUDA(cudaStreamSynchronize(stream));
        check_y.push_back(std::move(got));
        if (check_y.size() == 1) check_first = v.name;
        if (check_y.size() > 1) {
          double diff = 0.0, mag = 0.0;
          for (size_t i = 0; i < check_y[0].size(); ++i) {
            diff =
                std::max(diff, std::fabs(static_cast<double>(check_y.back()[i]) - check_y[0][i]));
            mag = std::max(mag, std::fabs(static_cast<double>(check_y[0][i])));
          }
          std::printf("%-34s %-5s %-10s check vs %s: max |diff| / max |y| = %.3g%s\n", s.name,
                      tr.name, v.name.c_str(), check_first.c_str(), diff / (mag + 1e-30),
                      diff / (mag + 1e-30) > (v.choice.kernel == kc::GemvKernel::kQ8 ? 3e-2 : 1e-4)
                          ? "  <-- MISMATCH"
                          : "");
        }
      }
      kc::SetGemvKernel(default_kernel);
    }
  }
  json += "], \"expert_rows\": [";
  // Resident experts: GEMV vs dequantize + cuBLAS.
  struct ExpertShape {
    const char* name;
    int64_t n_in, n_out;
    TensorType type;
  };
  const ExpertShape expert_shapes[] = {
      {"expert gate|up 7168->2048", 7168, 2048, TensorType::kQ4_K},
      {"expert down 2048->7168", 2048, 7168, TensorType::kQ6_K},
  };
  std::printf("\n%-34s %-5s %-10s %3s | %9s | %14s | %7s\n", "expert (n_in->n_out)", "type",
              "kernel", "tok", "gemv us", "dequant+cublas", "speedup");
  std::vector<Crossing> expert_crossings;
  bool first_expert = true;
  for (const ExpertShape& e : expert_shapes) {
    const ktx::kernels::TensorTypeTraits& tr = ktx::kernels::TraitsOf(e.type);
    const int64_t row_bytes = ktx::kernels::RowBytes(tr, e.n_in);
    Rotation w(static_cast<uint64_t>(row_bytes) * e.n_out, stream);
    __nv_bfloat16* wd = nullptr;
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&wd), e.n_out * e.n_in * 2));
    std::vector<Crossing> per_variant;
    for (const Variant& v : variants) {
      per_variant.push_back(Crossing{std::string(e.name) + " " + tr.name + " " + v.name, 0});
    }
    const std::vector<int64_t> expert_tokens =
        quick ? std::vector<int64_t>{1, 2, 4, 8, 16} : std::vector<int64_t>{1, 2, 4, 8, 16, 32, 64};
    for (const int64_t nt : expert_tokens) {
      const double deq_us = timer.Median(stream, [&](int i) {
        CHECK_CUDA(
            kc::DequantizeToBf16(e.type, w.Get(i), row_bytes, e.n_out, e.n_in, wd, e.n_in, stream));
        CHECK_CUBLAS(kc::LinearBf16(cublas, wd, e.n_in, x, e.n_in, y, CUDA_R_32F, e.n_out, e.n_out,
                                    e.n_in, nt));
      });
      for (size_t vi = 0; vi < variants.size(); ++vi) {
        const Variant& v = variants[vi];
        kc::SetGemvKernel(v.choice);
        const double gemv_us = timer.Median(stream, [&](int i) {
          CHECK_CUDA(kc::QuantGemv(e.type, w.Get(i), row_bytes, e.n_out, e.n_in, x, e.n_in, nt, y,
                                   e.n_out, 0.0f, gemv_ws, gemv_ws_bytes, stream));
        });
        if (deq_us / gemv_us > 1.0) per_variant[vi].last_win = nt;
        std::printf("%-34s %-5s %-10s %3lld | %9.2f | %14.2f | %6.2fx\n", e.name, tr.name,
                    v.name.c_str(), static_cast<long long>(nt), gemv_us, deq_us, deq_us / gemv_us);
        char buf[320];
        std::snprintf(buf, sizeof(buf),
                      "%s{\"shape\": \"%s\", \"type\": \"%s\", \"kernel\": \"%s\", "
                      "\"tokens\": %lld, \"gemv_us\": %.3f, \"dequant_cublas_us\": %.3f}",
                      first_expert ? "" : ", ", e.name, tr.name, v.name.c_str(),
                      static_cast<long long>(nt), gemv_us, deq_us);
        json += buf;
        first_expert = false;
      }
      kc::SetGemvKernel(default_kernel);
    }
    for (const Crossing& c : per_variant) expert_crossings.push_back(c);
    CHECK_CUDA(cudaFree(wd));
  }
  json += "]}\n";
  std::printf("\nlargest token count measured at which the GEMV beats cuBLAS bf16, per kernel:\n");
  for (const Crossing& c : crossings) {
    std::printf("  %-44s %s\n", c.what.c_str(),
                c.last_win == 0 ? "never" : std::to_string(c.last_win).c_str());
  }
  std::printf(
      "largest token count measured at which the GEMV beats dequantize + cuBLAS "
      "(expert_gemv_max_tokens), per kernel:\n");
  for (const Crossing& c : expert_crossings) {
    std::printf("  %-44s %s\n", c.what.c_str(),
                c.last_win == 0 ? "never" : std::to_string(c.last_win).c_str());
  }
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::fputs(json.c_str(), f);
    std::fclose(f);
  }
  cudaFree(x);
  cudaFree(y);
  cudaFree(gemv_ws);
  cudaFree(cublas_ws);
  cublasDestroy(cublas);
  cudaStreamDestroy(stream);
  return 0;
}
