// Generation speed of random valid blocks per storage type, one thread
// (google-benchmark; `synth_bench --benchmark_filter=Q4`). Bytes/s is the
// rate at which FillTensorRows produces tensor data.
#include <cmath>
#include <cstdint>
#include <vector>

#include "benchmark/benchmark.h"
#include "runtime/synth/random_blocks.h"

namespace ktx::synth {
namespace {

void BM_FillRows(benchmark::State& state) {
  TensorPlan t;
  t.name = "blk.3.ffn_up_exps.weight";
  t.type = static_cast<kernels::TensorType>(state.range(0));
  t.ne = {7168, 64};
  t.std = 1.0f / std::sqrt(7168.0f);
  t.n_bytes = static_cast<uint64_t>(t.row_bytes() * t.n_rows());
  std::vector<uint8_t> dst(t.n_bytes);
  const uint64_t key = TensorKey(1, t.name);
  for (auto _ : state) {
    if (!FillTensorRows(t, key, 0, t.n_rows(), dst.data()).ok()) state.SkipWithError("fill");
    benchmark::DoNotOptimize(dst.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) *
                          static_cast<int64_t>(t.n_bytes));
  state.SetLabel(kernels::TraitsOf(t.type).name);
}
BENCHMARK(BM_FillRows)
    ->Arg(static_cast<int>(kernels::TensorType::kQ4_K))
    ->Arg(static_cast<int>(kernels::TensorType::kQ6_K))
    ->Arg(static_cast<int>(kernels::TensorType::kQ5_0))
    ->Arg(static_cast<int>(kernels::TensorType::kQ8_0))
    ->Arg(static_cast<int>(kernels::TensorType::kBF16))
    ->Arg(static_cast<int>(kernels::TensorType::kF32));

}  // namespace
}  // namespace ktx::synth

BENCHMARK_MAIN();
