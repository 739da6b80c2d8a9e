// CudaDeepseek2 (the non-expert stages on the GPU, routed experts on the CPU)
// against the CPU reference model and the float64 fixtures (tests/data/README.md).
// Skips without a GPU.
//
// Tolerances. The GPU rounds every activation entering a matrix product to
// bf16 (2^-9 relative), keeps the KV cache in bf16 and rounds dequantized
// weights to bf16: per operation that is ~2e-3 relative, the size of
// llama.cpp's bf16 path (README section 5: 1.7e-3 .. 2e-3 per op) and below
// its Q8_0 / Q8_K activation rounding (0.9 .. 1.9 %). So the fixtures' tier-B
// bounds (README section 6: about 2x llama.cpp's own error) are the right
// end-to-end bounds, per file. Single stages are held to ~5x their expected
// error: 2e-2 relative L2 for the attention update (five chained bf16
// products), 1e-2 for FFNs and the head (two or three), 1e-5 for the F32 norm;
// routing on identical inputs must pick identical experts (the fixtures'
// smallest routing gap, 1.8e-4, is far above the F32 router's ~1e-6 error).
#include "runtime/gpu/cuda_deepseek2.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/gemv_direct.h"
#include "nlohmann/json.hpp"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/deepseek2.h"
#include "runtime/models/routing_policy.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace ktx::gpu {
namespace {

using models::Activations;
using models::LogitsRows;

std::string DataDir() {
  const std::string source = std::string(KTX_SOURCE_DIR) + "/tests/data/";
  if (std::filesystem::exists(source + "manifest.json")) return source;
  return "tests/data/";  // run from the repository root elsewhere (the GPU machine)
}

nlohmann::json Manifest() {
  std::ifstream in(DataDir() + "manifest.json");
  EXPECT_TRUE(in.good()) << DataDir();
  return nlohmann::json::parse(in);
}

std::vector<float> LoadF32(const std::string& name) {
  std::ifstream in(DataDir() + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

double RelL2(const float* got, const float* want, int64_t n) {
  double d = 0.0, r = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    d += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    r += static_cast<double>(want[i]) * want[i];
  }
  return r > 0.0 ? std::sqrt(d / r) : std::sqrt(d);
}

double RelL2(const Activations& got, const Activations& want) {
  EXPECT_EQ(got.n_tokens(), want.n_tokens());
  EXPECT_EQ(got.n_cols(), want.n_cols());
  return RelL2(got.data(), want.data(), std::min(got.values().size(), want.values().size()));
}

int64_t Argmax(const float* row, int64_t n) { return std::max_element(row, row + n) - row; }

double Margin(const float* row, int64_t n) {
  std::vector<float> v(row, row + n);
  std::partial_sort(v.begin(), v.begin() + 2, v.end(), std::greater<float>());
  return static_cast<double>(v[0]) - v[1];
}

// Two runs of the same rows that differ only in rounding: their typical row
// agrees to ~1e-3, but where a rounding difference flips one routed expert
// (the tiny model's routing gaps can be ~1e-4 on a GPU-rounded hidden state)
// that row moves by up to ~0.6 (README section 5). So: the median row within
// 1e-2, and the same argmax wherever the reference's top-2 margin exceeds 1.
struct RowAgreement {
  double median = 0.0, worst = 0.0;
  int confident = 0, agree = 0;
};

RowAgreement CompareRows(const Activations& got, const Activations& want) {
  EXPECT_EQ(got.n_tokens(), want.n_tokens());
  EXPECT_EQ(got.n_cols(), want.n_cols());
  RowAgreement a;
  std::vector<double> rows;
  for (int64_t r = 0; r < std::min(got.n_tokens(), want.n_tokens()); ++r) {
    rows.push_back(RelL2(got.row(r), want.row(r), want.n_cols()));
    if (Margin(want.row(r), want.n_cols()) > 1.0) {
      ++a.confident;
      a.agree += Argmax(got.row(r), got.n_cols()) == Argmax(want.row(r), want.n_cols());
    }
  }
  std::sort(rows.begin(), rows.end());
  if (!rows.empty()) {
    a.median = rows[rows.size() / 2];
    a.worst = rows.back();
  }
  return a;
}

// allowed_flips: confident rows whose argmax may differ (a routing gap crossed
// by rounding, see RoutingPoliciesApplyBeforeTheGpuCpuSplit).
void ExpectAgree(const RowAgreement& a, const char* what, const std::string& file,
                 int allowed_flips = 0) {
  std::printf("[ measured ] %s: %s, median row rel L2 %.2e, worst row %.2e, argmax %d/%d\n",
              file.c_str(), what, a.median, a.worst, a.agree, a.confident);
  EXPECT_LE(a.median, 1e-2) << what;
  EXPECT_LE(a.agree, a.confident) << what;
  EXPECT_GE(a.agree, a.confident - allowed_flips) << what;
}

CudaModelOptions TestOptions() {
  CudaModelOptions o;
  o.max_batch_tokens = 128;
  o.max_sequences = 8;
  o.max_context = 256;
  o.kv_page_size = 16;  // several pages per sequence
  o.kv_tokens = 8 * 256;
  o.reserve_bytes = 0;
  o.attention_workspace_bytes = 8 << 20;
  o.cublas_workspace_bytes = 8 << 20;
  o.load_staging_bytes = 1 << 20;  // many chunks per tensor
  return o;
}

class CudaDeepseek2Test : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    KTX_SKIP_WITHOUT_GPU();
    manifest_ = Manifest();
    files_ = manifest_["files"][GetParam()];
    auto model = models::Deepseek2Model::Open(DataDir() + files_["gguf"].get<std::string>());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto gpu = CudaDeepseek2::Create(*model_, TestOptions());
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = std::move(*gpu);
    prompt_ = manifest_["prompt_tokens"].get<std::vector<int32_t>>();
    n_vocab_ = manifest_["n_vocab"].get<int64_t>();
  }

  nlohmann::json manifest_, files_;
  std::unique_ptr<models::Deepseek2Model> model_;
  std::unique_ptr<CudaDeepseek2> gpu_;
  std::vector<int32_t> prompt_;
  int64_t n_vocab_ = 0;
};

// Every stage on the same host inputs as the CPU reference's stage.
TEST_P(CudaDeepseek2Test, StagesMatchTheCpuReference) {
  const models::Deepseek2Hparams& hp = model_->hparams();
  Activations x_cpu, x_gpu;
  ASSERT_TRUE(model_->Embed(prompt_, &x_cpu).ok());
  ASSERT_TRUE(gpu_->Embed(prompt_, &x_gpu).ok());
  // bf16 token_embd: exact; quantized: one bf16 rounding of the dequantized value.
  EXPECT_LE(RelL2(x_gpu, x_cpu), GetParam() == "bf16" ? 0.0 : 4e-3);

  auto kv = kv_cache::SequenceKv::Create(model_->kv_layout(), 256);
  ASSERT_TRUE(kv.ok());
  auto seq = gpu_->AddSequence(256);
  ASSERT_TRUE(seq.ok());
  std::vector<int32_t> pos(prompt_.size());
  for (size_t t = 0; t < pos.size(); ++t) pos[t] = static_cast<int32_t>(t);
  for (int il = 0; il < hp.n_layer; ++il) {
    SCOPED_TRACE(testing::Message() << "layer " << il);
    // Attention: compare the residual updates.
    Activations a_cpu = x_cpu, a_gpu = x_cpu;
    ASSERT_TRUE(model_->AttentionBlock(il, pos, kv->get(), &a_cpu).ok());
    ASSERT_TRUE(gpu_->AttentionBlock(il, *seq, pos, &a_gpu).ok());
    Activations d_cpu = a_cpu, d_gpu = a_gpu;
    for (size_t i = 0; i < d_cpu.values().size(); ++i) {
      d_cpu.data()[i] -= x_cpu.data()[i];
      d_gpu.data()[i] -= x_cpu.data()[i];
    }
    const double attn = RelL2(d_gpu, d_cpu);
    EXPECT_LE(attn, 2e-2);
    Activations h_cpu, h_gpu;
    ASSERT_TRUE(model_->FfnNorm(il, a_cpu, &h_cpu).ok());
    ASSERT_TRUE(gpu_->FfnNorm(il, a_cpu, &h_gpu).ok());
    EXPECT_LE(RelL2(h_gpu, h_cpu), 1e-5);
    Activations f_cpu, f_gpu;
    double ffn = 0.0;
    if (!hp.IsMoeLayer(il)) {
      ASSERT_TRUE(model_->DenseFfn(il, h_cpu, &f_cpu).ok());
      ASSERT_TRUE(gpu_->DenseFfn(il, h_cpu, &f_gpu).ok());
      ffn = RelL2(f_gpu, f_cpu);
      EXPECT_LE(ffn, 1e-2);
    } else {
      models::Routing r_cpu, r_gpu;
      ASSERT_TRUE(model_->Route(il, h_cpu, &r_cpu).ok());
      ASSERT_TRUE(gpu_->Route(il, h_cpu, &r_gpu).ok());
      EXPECT_EQ(r_gpu.expert_ids, r_cpu.expert_ids);
      ASSERT_EQ(r_gpu.weights.size(), r_cpu.weights.size());
      for (size_t i = 0; i < r_cpu.weights.size(); ++i) {
        EXPECT_NEAR(r_gpu.weights[i], r_cpu.weights[i], 1e-5 * std::fabs(r_cpu.weights[i]));
      }
      ASSERT_TRUE(model_->SharedExperts(il, h_cpu, &f_cpu).ok());
      ASSERT_TRUE(gpu_->SharedExperts(il, h_cpu, &f_gpu).ok());
      ffn = RelL2(f_gpu, f_cpu);
      EXPECT_LE(ffn, 1e-2);
    }
    std::printf("[ measured ] %s layer %d: attention update rel L2 %.2e, FFN rel L2 %.2e\n",
                GetParam().c_str(), il, attn, ffn);
    x_cpu = a_cpu;  // continue on the CPU's stream (the FFN part does not feed back here)
  }
  Activations l_cpu, l_gpu;
  ASSERT_TRUE(model_->Head(x_cpu, LogitsRows::kAll, &l_cpu).ok());
  ASSERT_TRUE(gpu_->Head(x_cpu, LogitsRows::kAll, &l_gpu).ok());
  EXPECT_LE(RelL2(l_gpu, l_cpu), 1e-2);
  ASSERT_TRUE(gpu_->Head(x_cpu, LogitsRows::kLast, &l_gpu).ok());
  ASSERT_EQ(l_gpu.n_tokens(), 1);
  EXPECT_LE(RelL2(l_gpu.data(), l_cpu.row(l_cpu.n_tokens() - 1), n_vocab_), 1e-2);
}

struct TierB {
  double rel_l2, median_row, argmax_agree;
};

TierB Bounds(const std::string& file) {
  if (file == "bf16") return {0.16, 0.022, 0.90};
  if (file == "q8_0") return {0.23, 0.046, 0.90};
  return {0.30, 0.074, 0.90};
}

// Prompt as one batch, then llama.cpp's greedy tokens one at a time (teacher
// forcing), against the float64 reference: tier B of README section 6.
TEST_P(CudaDeepseek2Test, TeacherForcedLogitsWithinTierB) {
  auto seq = gpu_->AddSequence(256);
  ASSERT_TRUE(seq.ok());
  Activations logits;
  ASSERT_TRUE(gpu_->Forward(prompt_, *seq, LogitsRows::kAll, &logits).ok());
  std::vector<float> got = logits.ToVector();
  for (int32_t token : files_["llama_greedy_tokens"].get<std::vector<int32_t>>()) {
    const int32_t one[] = {token};
    ASSERT_TRUE(gpu_->Forward(one, *seq, LogitsRows::kLast, &logits).ok());
    got.insert(got.end(), logits.values().begin(), logits.values().end());
  }
  std::vector<float> want = LoadF32(files_["ref64_prompt_logits"]["file"]);
  const std::vector<float> gen = LoadF32(files_["ref64_gen_logits"]["file"]);
  want.insert(want.end(), gen.begin(), gen.end());
  ASSERT_EQ(got.size(), want.size());
  const int64_t n_rows = static_cast<int64_t>(want.size()) / n_vocab_;
  std::vector<double> rows;
  int confident = 0, agree = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* g = got.data() + r * n_vocab_;
    const float* w = want.data() + r * n_vocab_;
    rows.push_back(RelL2(g, w, n_vocab_));
    if (Margin(w, n_vocab_) > 1.0) {
      ++confident;
      agree += Argmax(g, n_vocab_) == Argmax(w, n_vocab_);
    }
  }
  std::vector<double> sorted = rows;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2];
  const double all = RelL2(got.data(), want.data(), static_cast<int64_t>(want.size()));
  const double agreement = static_cast<double>(agree) / std::max(confident, 1);
  std::printf(
      "[ measured ] %s: rel L2 %.3e, median row %.3e, max row %.3e, argmax agreement "
      "%.3f (%d rows with margin > 1)\n",
      GetParam().c_str(), all, median, sorted.back(), agreement, confident);
  const TierB b = Bounds(GetParam());
  EXPECT_LE(all, b.rel_l2);
  EXPECT_LE(median, b.median_row);
  EXPECT_GE(agreement, b.argmax_agree);
  auto length = gpu_->SequenceLength(*seq);
  ASSERT_TRUE(length.ok());
  EXPECT_EQ(*length, n_rows);
}

// Free-running greedy decoding: the CPU path reproduces ref64_greedy_tokens
// exactly (deepseek2_fixture_test); the GPU must agree with it at least up to
// the first step whose reference top-2 margin is below 1.0 (tier B: a smaller
// gap may flip under bf16 rounding; after a flip the texts diverge).
TEST_P(CudaDeepseek2Test, GreedyTokensMatchTheCpuPathWhileConfident) {
  const auto want = files_["ref64_greedy_tokens"].get<std::vector<int32_t>>();
  const auto margins = files_["ref64_greedy_top2_margin"].get<std::vector<double>>();
  auto seq = gpu_->AddSequence(256);
  ASSERT_TRUE(seq.ok());
  Activations logits;
  ASSERT_TRUE(gpu_->Forward(prompt_, *seq, LogitsRows::kLast, &logits).ok());
  std::vector<int32_t> got;
  while (got.size() < want.size()) {
    got.push_back(static_cast<int32_t>(Argmax(logits.row(0), n_vocab_)));
    if (got.size() == want.size()) break;
    const int32_t one[] = {got.back()};
    ASSERT_TRUE(gpu_->Forward(one, *seq, LogitsRows::kLast, &logits).ok());
  }
  size_t same = 0;
  while (same < want.size() && got[same] == want[same]) ++same;
  size_t required = 0;
  while (required < margins.size() && margins[required] >= 1.0) ++required;
  std::printf(
      "[ measured ] %s: greedy tokens equal to the CPU path's for %zu of %zu steps "
      "(required: %zu, the steps before the first reference margin < 1)\n",
      GetParam().c_str(), same, want.size(), required);
  EXPECT_GE(same, required);
}

// Several sequences of different lengths in one batch give each sequence's
// own logits (prefill of three, then a decode step of all three together).
TEST_P(CudaDeepseek2Test, BatchOfSequencesMatchesOneAtATime) {
  const std::vector<std::vector<int32_t>> prompts = {
      std::vector<int32_t>(prompt_.begin(), prompt_.begin() + 1),
      std::vector<int32_t>(prompt_.begin(), prompt_.begin() + 41),
      std::vector<int32_t>(prompt_.begin() + 5, prompt_.end())};
  const int32_t next[] = {17, 3, 250};
  std::vector<Activations> alone(3), alone_next(3);
  for (int i = 0; i < 3; ++i) {
    auto seq = gpu_->AddSequence(128);
    ASSERT_TRUE(seq.ok());
    ASSERT_TRUE(gpu_->Forward(prompts[i], *seq, LogitsRows::kAll, &alone[i]).ok());
    ASSERT_TRUE(gpu_->Forward({&next[i], 1}, *seq, LogitsRows::kLast, &alone_next[i]).ok());
    ASSERT_TRUE(gpu_->FreeSequence(*seq).ok());
  }
  std::vector<SequenceId> seqs;
  std::vector<CudaDeepseek2::BatchEntry> entries;
  for (int i = 0; i < 3; ++i) {
    auto seq = gpu_->AddSequence(128);
    ASSERT_TRUE(seq.ok());
    seqs.push_back(*seq);
    entries.push_back({*seq, prompts[i], LogitsRows::kAll});
  }
  Activations batch;
  ASSERT_TRUE(gpu_->ForwardBatch(entries, &batch).ok());
  // The one-at-a-time rows in batch order.
  Activations alone_all(batch.n_tokens(), n_vocab_);
  int64_t row = 0;
  for (int i = 0; i < 3; ++i) {
    for (int64_t r = 0; r < alone[i].n_tokens() && row < batch.n_tokens(); ++r, ++row) {
      std::copy(alone[i].row(r), alone[i].row(r) + n_vocab_, alone_all.row(row));
    }
  }
  EXPECT_EQ(row, batch.n_tokens());
  ExpectAgree(CompareRows(batch, alone_all), "prefill batch of 3 vs one at a time", GetParam());
  for (int i = 0; i < 3; ++i) entries[i] = {seqs[i], {&next[i], 1}, LogitsRows::kLast};
  ASSERT_TRUE(gpu_->ForwardBatch(entries, &batch).ok());
  ASSERT_EQ(batch.n_tokens(), 3);
  Activations next_all(3, n_vocab_);
  for (int i = 0; i < 3; ++i) {
    std::copy(alone_next[i].row(0), alone_next[i].row(0) + n_vocab_, next_all.row(i));
  }
  ExpectAgree(CompareRows(batch, next_all), "decode batch of 3 vs one at a time", GetParam());
}

// A prompt longer than max_batch_tokens runs in chunks (chunked prefill) and
// gives the logits of one batch; a rollback (Truncate) and replay gives the
// same continuation.
TEST_P(CudaDeepseek2Test, ChunkedPrefillAndRollback) {
  CudaModelOptions small = TestOptions();
  small.max_batch_tokens = 16;
  auto chunked = CudaDeepseek2::Create(*model_, small);
  ASSERT_TRUE(chunked.ok()) << chunked.status();
  auto s1 = (*chunked)->AddSequence(128);
  auto s2 = gpu_->AddSequence(128);
  ASSERT_TRUE(s1.ok() && s2.ok());
  Activations a, b;
  ASSERT_TRUE((*chunked)->Forward(prompt_, *s1, LogitsRows::kAll, &a).ok());
  ASSERT_TRUE(gpu_->Forward(prompt_, *s2, LogitsRows::kAll, &b).ok());
  ExpectAgree(CompareRows(a, b), "chunked (16) vs one batch", GetParam());
  // Roll back to 40 tokens and replay the rest: the last row again.
  ASSERT_TRUE(gpu_->Truncate(*s2, 40).ok());
  Activations replay;
  std::span<const int32_t> rest(prompt_.data() + 40, prompt_.size() - 40);
  ASSERT_TRUE(gpu_->Forward(rest, *s2, LogitsRows::kLast, &replay).ok());
  Activations last(1, n_vocab_);
  std::copy(b.row(b.n_tokens() - 1), b.row(b.n_tokens() - 1) + n_vocab_, last.row(0));
  ExpectAgree(CompareRows(replay, last), "replay after Truncate(40)", GetParam());
}

// The tensor-core attention kernel (default) and the CUDA-core one give the
// same logits up to F32 rounding (amplified where a bf16 rounding or an
// expert choice flips; see CompareRows).
TEST_P(CudaDeepseek2Test, AttentionKernelsAgree) {
  CudaModelOptions cores = TestOptions();
  cores.attention_tensor_cores = false;
  auto other = CudaDeepseek2::Create(*model_, cores);
  ASSERT_TRUE(other.ok()) << other.status();
  auto s1 = (*other)->AddSequence(128);
  auto s2 = gpu_->AddSequence(128);
  ASSERT_TRUE(s1.ok() && s2.ok());
  Activations a, b;
  ASSERT_TRUE((*other)->Forward(prompt_, *s1, LogitsRows::kAll, &a).ok());
  ASSERT_TRUE(gpu_->Forward(prompt_, *s2, LogitsRows::kAll, &b).ok());
  ExpectAgree(CompareRows(b, a), "tensor-core vs CUDA-core attention", GetParam());
  ASSERT_GE(static_cast<int64_t>(prompt_.size()), TestOptions().mla_prefill_min_tokens);
  EXPECT_GT(gpu_->mla_prefill_calls(), 0) << "the prompt should take the two-product form";
  // The prompt-chunk attention (two cuBLAS products; default for chunks of
  // >= 64 tokens) against the MLA kernel alone, for the whole prompt and for
  // chunks of 32 after cached rows (min tokens 1: every chunk; chunks of at
  // most graph_max_tokens replay graphs, which keep to the kernel).
  ASSERT_LT(TestOptions().graph_max_tokens, 32);
  for (const int64_t chunk : {int64_t{128}, int64_t{32}}) {
    CudaModelOptions kernel_only = TestOptions();
    kernel_only.max_batch_tokens = chunk;
    kernel_only.mla_prefill_min_tokens = 0;
    CudaModelOptions products = kernel_only;
    products.mla_prefill_min_tokens = 1;
    auto k = CudaDeepseek2::Create(*model_, kernel_only);
    auto p = CudaDeepseek2::Create(*model_, products);
    ASSERT_TRUE(k.ok() && p.ok());
    auto sk = (*k)->AddSequence(128);
    auto sp = (*p)->AddSequence(128);
    ASSERT_TRUE(sk.ok() && sp.ok());
    Activations ka, pa;
    ASSERT_TRUE((*k)->Forward(prompt_, *sk, LogitsRows::kAll, &ka).ok());
    ASSERT_TRUE((*p)->Forward(prompt_, *sp, LogitsRows::kAll, &pa).ok());
    EXPECT_EQ((*k)->mla_prefill_calls(), 0);
    EXPECT_GT((*p)->mla_prefill_calls(), 0);
    ExpectAgree(CompareRows(pa, ka),
                chunk == 32 ? "two-product vs kernel attention, chunks of 32"
                            : "two-product vs kernel attention, one prompt",
                GetParam());
  }
  // A bad setting is refused by name.
  setenv("KTX_GPU_MLA_PREFILL_MIN_TOKENS", "-3", 1);
  auto bad = CudaDeepseek2::Create(*model_, TestOptions());
  unsetenv("KTX_GPU_MLA_PREFILL_MIN_TOKENS");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("KTX_GPU_MLA_PREFILL_MIN_TOKENS"), std::string::npos)
      << bad.status();
}

// KTX_CUDA_SCHEDULE sets the device's scheduling flag (how host threads wait)
// and changes no result; a bad value is refused by name. The flag is put back
// to CUDA's default afterwards (it belongs to the process's context).
TEST_P(CudaDeepseek2Test, CudaScheduleEnvironmentSetsTheFlagOrIsRefused) {
  auto seq = gpu_->AddSequence(70);
  ASSERT_TRUE(seq.ok());
  Activations want;
  ASSERT_TRUE(gpu_->Forward(prompt_, *seq, LogitsRows::kLast, &want).ok());
  setenv("KTX_CUDA_SCHEDULE", "blocking", 1);
  auto blocking = CudaDeepseek2::Create(*model_, TestOptions());
  unsigned flags = 0;
  const cudaError_t flags_err = cudaGetDeviceFlags(&flags);
  setenv("KTX_CUDA_SCHEDULE", "sometimes", 1);
  auto bad = CudaDeepseek2::Create(*model_, TestOptions());
  unsetenv("KTX_CUDA_SCHEDULE");
  ASSERT_TRUE(blocking.ok()) << blocking.status();
  ASSERT_EQ(flags_err, cudaSuccess);
  EXPECT_EQ(flags & cudaDeviceScheduleMask, static_cast<unsigned>(cudaDeviceScheduleBlockingSync));
  auto bseq = (*blocking)->AddSequence(70);
  ASSERT_TRUE(bseq.ok());
  Activations got;
  ASSERT_TRUE((*blocking)->Forward(prompt_, *bseq, LogitsRows::kLast, &got).ok());
  ASSERT_EQ(got.n_cols(), want.n_cols());
  EXPECT_LE(RelL2(got, want), 1e-5) << "the same model with another scheduling flag";
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("KTX_CUDA_SCHEDULE"), std::string::npos) << bad.status();
  ASSERT_EQ(cudaSetDeviceFlags(cudaDeviceScheduleAuto), cudaSuccess);
}

TEST_P(CudaDeepseek2Test, ErrorsLeaveSequencesUnchanged) {
  auto seq = gpu_->AddSequence(70);
  ASSERT_TRUE(seq.ok());
  Activations logits;
  ASSERT_TRUE(gpu_->Forward(prompt_, *seq, LogitsRows::kLast, &logits).ok());
  const std::vector<int32_t> six(6, 5);
  EXPECT_EQ(gpu_->Forward(six, *seq, LogitsRows::kLast, &logits).code(),
            absl::StatusCode::kResourceExhausted);  // 65 + 6 > 70
  const int32_t bad[] = {static_cast<int32_t>(n_vocab_)};
  EXPECT_EQ(gpu_->Forward(bad, *seq, LogitsRows::kLast, &logits).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(*gpu_->SequenceLength(*seq), static_cast<int64_t>(prompt_.size()));
  EXPECT_EQ(gpu_->Forward(six, 1000, LogitsRows::kLast, &logits).code(),
            absl::StatusCode::kNotFound);
  const int32_t fine[] = {5};
  const CudaDeepseek2::BatchEntry twice[] = {{*seq, {fine, 1}, LogitsRows::kLast},
                                             {*seq, {fine, 1}, LogitsRows::kLast}};
  EXPECT_EQ(gpu_->ForwardBatch(twice, &logits).code(), absl::StatusCode::kInvalidArgument);
  CudaModelOptions huge = TestOptions();
  huge.kv_tokens = int64_t{1} << 40;
  auto too_big = CudaDeepseek2::Create(*model_, huge);
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(too_big.status().message().find("does not fit"), std::string::npos);
}

// Routed experts on the GPU (streamed from the mapped file): all on the GPU,
// and a CPU/GPU split made by the cost model, give the logits of the all-CPU
// path within the tolerance above; the streamer really computed experts.
TEST_P(CudaDeepseek2Test, RoutedExpertsOnGpuMatchTheCpuPath) {
  unsetenv("KTX_GPU_EXPERTS");  // the options below decide
  unsetenv("KTX_GPU_EXPERTS_CPU");
  if (gpu_->expert_streamer() == nullptr) {
    GTEST_SKIP() << "routed experts of this file cannot be streamed (see the log)";
  }
  auto run = [&](CudaDeepseek2& gpu, GpuExpertMode mode, Activations* logits) {
    ASSERT_TRUE(gpu.SetExpertMode(mode).ok());
    auto seq = gpu.AddSequence(128);
    ASSERT_TRUE(seq.ok());
    ASSERT_TRUE(gpu.Forward(prompt_, *seq, LogitsRows::kAll, logits).ok());
    ASSERT_TRUE(gpu.FreeSequence(*seq).ok());
  };
  Activations cpu, all_gpu, split;
  run(*gpu_, GpuExpertMode::kAllCpu, &cpu);
  EXPECT_EQ(gpu_->expert_streamer()->stats().experts_computed, 0);
  run(*gpu_, GpuExpertMode::kAllGpu, &all_gpu);
  const int64_t computed = gpu_->expert_streamer()->stats().experts_computed;
  EXPECT_GT(computed, 0);
  ExpectAgree(CompareRows(all_gpu, cpu), "all routed experts on the GPU vs CPU", GetParam());
  // A split: the CPU's per-expert time set to one expert's measured copy time
  // plus a share of the GPU's fixed cost per layer, so that the cost model
  // gives each side about half of the experts.
  const ExpertCostModel& m = gpu_->expert_cost_model();
  CudaModelOptions o = TestOptions();
  o.experts.mode = GpuExpertMode::kAuto;
  o.experts.min_batch_tokens = 1;
  o.experts.cpu_expert_fixed_ms = GpuCopySeconds(m, gpu_->expert_streamer()->shape()) * 1e3 +
                                  2e3 * m.gpu_layer_fixed_s / model_->hparams().n_expert;
  o.experts.cpu_expert_per_token_us = 1e-3;
  o.experts.split_serial_us_per_token = 0;  // a split layer's serial part: not modelled here
  // Variants: no prefetch; prefetch; prefetch with the residual add reading
  // the CPU's sum from pinned host memory (KTX_GPU_ROUTED_ZERO_COPY); the same
  // with a ring of 3 slots (KTX_GPU_EXPERT_SLOTS). (Each instance learns its
  // own CPU cost, so the splits, and with them the bits, differ.)
  for (int variant = 0; variant < 4; ++variant) {
    const bool prefetch = variant > 0;
    SCOPED_TRACE(variant == 0   ? "no prefetch"
                 : variant == 1 ? "prefetch"
                 : variant == 2 ? "prefetch, zero copy"
                                : "prefetch, zero copy, 3 slots");
    o.experts.prefetch = prefetch;
    if (variant >= 2) setenv("KTX_GPU_ROUTED_ZERO_COPY", "1", 1);
    if (variant == 3) setenv("KTX_GPU_EXPERT_SLOTS", "3", 1);
    auto other = CudaDeepseek2::Create(*model_, o);
    unsetenv("KTX_GPU_ROUTED_ZERO_COPY");
    unsetenv("KTX_GPU_EXPERT_SLOTS");
    ASSERT_TRUE(other.ok()) << other.status();
    run(**other, GpuExpertMode::kAuto, &split);
    if (variant == 2) {
      // Every expert on the CPU: the add reads the same sum, so the same bits as the copy.
      Activations zero_copy_cpu;
      run(**other, GpuExpertMode::kAllCpu, &zero_copy_cpu);
      ASSERT_EQ(zero_copy_cpu.values().size(), cpu.values().size());
      EXPECT_EQ(0,
                std::memcmp(zero_copy_cpu.data(), cpu.data(), cpu.values().size() * sizeof(float)))
          << "the zero-copy add changed the logits";
    }
    const GpuExpertStreamer::Stats& st = (*other)->expert_streamer()->stats();
    std::printf("[ measured ] %s: split (prefetch %d): %lld experts on the GPU in %d MoE layers\n",
                GetParam().c_str(), prefetch, static_cast<long long>(st.experts_computed),
                model_->hparams().n_layer - model_->hparams().n_layer_dense_lead);
    EXPECT_GT(st.experts_computed, 0);
    EXPECT_LT(st.experts_computed, computed) << "the split gave the CPU nothing";
    ExpectAgree(CompareRows(split, cpu), "CPU/GPU split vs CPU", GetParam());
    if (variant == 1) {
      // The split learns its copy rate from each split layer's GPU share (read
      // when the next split is planned: at the latest the next pass's first),
      // within [a quarter of, twice] the calibrated rate; with
      // learn_copy_rate off the calibrated rate stays.
      Activations again;
      run(**other, GpuExpertMode::kAuto, &again);
      ExpectAgree(CompareRows(again, cpu), "CPU/GPU split vs CPU, second pass", GetParam());
      const double cal = (*other)->calibrated_copy_rate();
      const double rate = (*other)->expert_cost_model().pcie_bytes_per_s;
      std::printf("[ measured ] %s: copy rate %.2f GB/s after %lld corrections (calibrated %.2f)\n",
                  GetParam().c_str(), rate / 1e9,
                  static_cast<long long>((*other)->copy_rate_corrections()), cal / 1e9);
      EXPECT_GE((*other)->copy_rate_corrections(), 1);
      EXPECT_GT(cal, 0);
      EXPECT_LE(rate, 2 * cal);
      EXPECT_GE(rate, cal / 4);
      CudaModelOptions fixed = o;
      fixed.experts.learn_copy_rate = false;
      auto steady = CudaDeepseek2::Create(*model_, fixed);
      ASSERT_TRUE(steady.ok()) << steady.status();
      run(**steady, GpuExpertMode::kAuto, &again);
      run(**steady, GpuExpertMode::kAuto, &again);
      EXPECT_EQ((*steady)->copy_rate_corrections(), 0);
      EXPECT_EQ((*steady)->expert_cost_model().pcie_bytes_per_s, (*steady)->calibrated_copy_rate());
    }
  }
  // Off: no streamer; switching on is refused.
  o.experts.mode = GpuExpertMode::kOff;
  auto off = CudaDeepseek2::Create(*model_, o);
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_EQ((*off)->expert_streamer(), nullptr);
  EXPECT_EQ((*off)->SetExpertMode(GpuExpertMode::kAllGpu).code(),
            absl::StatusCode::kFailedPrecondition);
}

// The decode split (GpuExpertOptions::decode_split): batches below
// min_batch_tokens stream a few of each MoE layer's used experts to the GPU
// (chosen at the routing, no prefetch, computed by the quantized GEMV from
// their slots where it reads the types) while the CPU computes the rest.
// The fixtures' experts are small, so by default the model keeps them on the
// CPU (a split must save more than its fixed cost); with the CPU's read rate
// set so that an expert takes twice the GPU's time and no fixed cost, the model gives the
// GPU some of each layer's experts: the prompt and teacher-forced decode
// steps (one sequence, then a batch of 3) then match the all-CPU run within
// the tolerance above, every entry computed once, and the decode steps still
// replay their layers as CUDA graphs. Bad environment values are refused.
TEST_P(CudaDeepseek2Test, DecodeSplitStreamsSomeExpertsAndMatchesTheCpuPath) {
  for (const char* v : {"KTX_GPU_EXPERTS", "KTX_GPU_EXPERTS_CPU", "KTX_GPU_DECODE_SPLIT",
                        "KTX_GPU_DECODE_CPU_GBPS", "KTX_CUDA_GRAPHS"}) {
    unsetenv(v);
  }
  if (gpu_->expert_streamer() == nullptr) {
    GTEST_SKIP() << "routed experts of this file cannot be streamed (see the log)";
  }
  const auto gen_tokens = files_["llama_greedy_tokens"].get<std::vector<int32_t>>();
  const size_t n_steps = std::min<size_t>(gen_tokens.size(), 8);
  ASSERT_GE(n_steps, 4u);
  // The prompt, n_steps teacher-forced steps, then 3 sequences decoding together.
  auto run = [&](CudaDeepseek2& g, Activations* rows) {
    std::vector<float> all;
    auto seq = g.AddSequence(256);
    ASSERT_TRUE(seq.ok());
    Activations logits;
    ASSERT_TRUE(g.Forward(prompt_, *seq, LogitsRows::kLast, &logits).ok());
    all.insert(all.end(), logits.values().begin(), logits.values().end());
    for (size_t i = 0; i < n_steps; ++i) {
      const int32_t one[] = {gen_tokens[i]};
      ASSERT_TRUE(g.Forward(one, *seq, LogitsRows::kLast, &logits).ok());
      all.insert(all.end(), logits.values().begin(), logits.values().end());
    }
    ASSERT_TRUE(g.FreeSequence(*seq).ok());
    std::vector<SequenceId> seqs;
    for (int i = 0; i < 3; ++i) {
      auto s = g.AddSequence(256);
      ASSERT_TRUE(s.ok());
      const std::vector<int32_t> p(prompt_.begin() + i, prompt_.end() - 2 * i);
      ASSERT_TRUE(g.Forward(p, *s, LogitsRows::kLast, &logits).ok());
      seqs.push_back(*s);
    }
    for (int step = 0; step < 3; ++step) {
      int32_t next[3];
      std::vector<CudaDeepseek2::BatchEntry> entries;
      for (int i = 0; i < 3; ++i) {
        next[i] = gen_tokens[(step + 2 * i) % gen_tokens.size()];
        entries.push_back({seqs[i], {&next[i], 1}, LogitsRows::kLast});
      }
      ASSERT_TRUE(g.ForwardBatch(entries, &logits).ok());
      all.insert(all.end(), logits.values().begin(), logits.values().end());
    }
    for (SequenceId s : seqs) ASSERT_TRUE(g.FreeSequence(s).ok());
    const int64_t n_rows = static_cast<int64_t>(all.size()) / n_vocab_;
    rows->ResizeForOverwrite(n_rows, n_vocab_);
    std::copy(all.begin(), all.end(), rows->data());
  };
  Activations cpu, by_default, split;
  ASSERT_TRUE(gpu_->SetExpertMode(GpuExpertMode::kAllCpu).ok());
  run(*gpu_, &cpu);
  ASSERT_TRUE(gpu_->SetExpertMode(GpuExpertMode::kAuto).ok());
  EXPECT_TRUE(gpu_->DecodeSplits(1));
  EXPECT_FALSE(gpu_->DecodeSplits(gpu_->expert_cost_model().min_batch_tokens));
  const int64_t before = gpu_->expert_streamer()->stats().experts_computed;
  run(*gpu_, &by_default);
  EXPECT_EQ(gpu_->expert_streamer()->stats().experts_computed, before)
      << "the fixture's small experts were split by default (the decode split must save more "
         "than its fixed cost)";
  EXPECT_EQ(by_default.values(), cpu.values());

  // The CPU's time per expert: twice the GPU's (its copy and its fixed cost,
  // which dominates for small experts), so the model gives the GPU a few.
  const ExpertCostModel& m = gpu_->decode_cost_model();
  const ExpertShape shape = gpu_->expert_streamer()->shape();
  const double gpu_s = GpuCopySeconds(m, shape) + GpuComputeSeconds(m, shape, 1);
  CudaModelOptions o = TestOptions();
  o.experts.mode = GpuExpertMode::kAuto;
  o.experts.decode_split = true;
  o.experts.decode_cpu_gbps = static_cast<double>(shape.expert_bytes) / (2 * gpu_s) / 1e9;
  o.experts.decode_gpu_layer_fixed_us = 0;
  auto other = CudaDeepseek2::Create(*model_, o);
  ASSERT_TRUE(other.ok()) << other.status();
  CudaDeepseek2& g = **other;
  EXPECT_TRUE(g.UsesGraphs(1)) << "a decode split must keep the layers' graphs";
  run(g, &split);
  const GpuExpertStreamer::Stats& st = g.expert_streamer()->stats();
  const CudaGraphCache::Stats gs = g.graph_stats();
  const int n_moe = model_->hparams().n_layer - model_->hparams().n_layer_dense_lead;
  std::printf(
      "[ measured ] %s: decode split: %lld experts (%lld entries) on the GPU in %d MoE layers, "
      "%lld by the GEMV from their slots; graphs: %lld captured, %lld replays\n",
      GetParam().c_str(), static_cast<long long>(st.experts_computed),
      static_cast<long long>(st.tokens_computed), n_moe,
      static_cast<long long>(st.streamed_gemv_experts), static_cast<long long>(gs.captures),
      static_cast<long long>(gs.replays));
  EXPECT_GT(st.experts_computed, 0) << "the decode split gave the GPU nothing";
  EXPECT_GT(gs.replays, 0) << "decode steps with a split did not replay graphs";
  EXPECT_EQ(gs.failures, 0);
  ExpectAgree(CompareRows(split, cpu), "decode split vs CPU", GetParam());
  // Every entry once: the hook's entries + the GPU's = the routing's, on one step.
  {
    auto seq = g.AddSequence(256);
    ASSERT_TRUE(seq.ok());
    Activations logits;
    ASSERT_TRUE(g.Forward(prompt_, *seq, LogitsRows::kLast, &logits).ok());
    int64_t hook_entries = 0, routed_entries = 0;
    CudaDeepseek2::ForwardHooks hooks;
    hooks.adjust_routing = [&](int, models::Routing* routing) {
      for (int32_t e : routing->expert_ids) routed_entries += e != models::kNoExpert;
      return absl::OkStatus();
    };
    hooks.routed_experts = [&](int il, const Activations& h, const models::Routing& routing,
                               Activations* routed) {
      for (int32_t e : routing.expert_ids) hook_entries += e != models::kNoExpert;
      return model_->RoutedExperts(il, h, routing, {}, routed);
    };
    const int64_t gpu_before = g.expert_streamer()->stats().tokens_computed;
    const int32_t one[] = {gen_tokens[0]};
    const CudaDeepseek2::BatchEntry entry{*seq, one, LogitsRows::kLast};
    ASSERT_TRUE(
        g.ForwardBatch(std::span<const CudaDeepseek2::BatchEntry>(&entry, 1), &logits, hooks).ok());
    const int64_t gpu_entries = g.expert_streamer()->stats().tokens_computed - gpu_before;
    EXPECT_GT(gpu_entries, 0);
    EXPECT_EQ(hook_entries + gpu_entries, routed_entries) << "an entry was lost or doubled";
    ASSERT_TRUE(g.FreeSequence(*seq).ok());
  }
  // Off by option: nothing streams at decode.
  o.experts.decode_split = false;
  auto off = CudaDeepseek2::Create(*model_, o);
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_FALSE((*off)->DecodeSplits(1));
  // The boundary between the two models from the environment.
  setenv("KTX_GPU_EXPERTS_MIN_TOKENS", "1024", 1);
  o.experts.decode_split = true;
  auto wide = CudaDeepseek2::Create(*model_, o);
  unsetenv("KTX_GPU_EXPERTS_MIN_TOKENS");
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_EQ((*wide)->expert_cost_model().min_batch_tokens, 1024);
  EXPECT_TRUE((*wide)->DecodeSplits(1023));
  EXPECT_FALSE((*wide)->DecodeSplits(1024));
  // Bad values are refused by name.
  for (const auto& [var, value] : {std::pair<const char*, const char*>{"KTX_GPU_DECODE_SPLIT", "2"},
                                   {"KTX_GPU_DECODE_CPU_GBPS", "0"},
                                   {"KTX_GPU_EXPERTS_MIN_TOKENS", "0"},
                                   {"KTX_GPU_EXPERTS_MIN_TOKENS", "many"},
                                   {"KTX_GPU_DECODE_CPU_GBPS", "fast"}}) {
    setenv(var, value, 1);
    auto bad = CudaDeepseek2::Create(*model_, o);
    unsetenv(var);
    ASSERT_FALSE(bad.ok()) << var << "=" << value;
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(bad.status().message().find(var), std::string::npos) << bad.status();
  }
  o.experts.decode_cpu_gbps = 0;
  auto bad_option = CudaDeepseek2::Create(*model_, o);
  ASSERT_FALSE(bad_option.ok());
  EXPECT_NE(bad_option.status().message().find("decode_cpu_gbps"), std::string::npos);
}

// Routing policies act on the FULL top-k before the routed experts are split
// between the GPU and the CPU (ForwardHooks::adjust_routing): with every
// routed expert on the GPU (kAllGpu), a reduced and an adaptive top-k give the
// logits of the all-CPU path under the same policy, and so does the kAuto
// cost-model split, where every entry is computed exactly once (CPU + GPU =
// the policy's entries). The policy really changes the logits (a GPU
// computing the full top-k fails the comparison), the CPU hook sees only the
// CPU's entries, and the model's own policy (no hook) is the hook's result
// bit for bit.
TEST_P(CudaDeepseek2Test, RoutingPoliciesApplyBeforeTheGpuCpuSplit) {
  unsetenv("KTX_GPU_EXPERTS");
  unsetenv("KTX_GPU_EXPERTS_CPU");
  if (gpu_->expert_streamer() == nullptr) {
    GTEST_SKIP() << "routed experts of this file cannot be streamed (see the log)";
  }
  const models::Deepseek2Hparams& hp = model_->hparams();
  // The split model: as in RoutedExpertsOnGpuMatchTheCpuPath, about half of
  // the experts on each side.
  const ExpertCostModel& m = gpu_->expert_cost_model();
  CudaModelOptions o = TestOptions();
  o.experts.mode = GpuExpertMode::kAuto;
  o.experts.min_batch_tokens = 1;
  o.experts.cpu_expert_fixed_ms = GpuCopySeconds(m, gpu_->expert_streamer()->shape()) * 1e3 +
                                  2e3 * m.gpu_layer_fixed_s / hp.n_expert;
  o.experts.cpu_expert_per_token_us = 1e-3;
  o.experts.split_serial_us_per_token = 0;  // a split layer's serial part: not modelled here
  auto split_gpu = CudaDeepseek2::Create(*model_, o);
  ASSERT_TRUE(split_gpu.ok()) << split_gpu.status();

  // One forward pass of the prompt; *cpu_entries: the entries the CPU hook got.
  auto run = [&](CudaDeepseek2& gpu, GpuExpertMode mode, const models::RoutingPolicy* policy,
                 Activations* logits, int64_t* cpu_entries) {
    ASSERT_TRUE(gpu.SetExpertMode(mode).ok());
    *cpu_entries = 0;
    CudaDeepseek2::ForwardHooks hooks;
    if (policy != nullptr) {
      hooks.adjust_routing = [&hp, policy](int il, models::Routing* routing) {
        models::ApplyRoutingPolicies(hp.routing(), il, {}, policy, routing);
        return absl::OkStatus();
      };
    }
    hooks.routed_experts = [&](int il, const Activations& h, const models::Routing& routing,
                               Activations* routed) {
      for (int32_t e : routing.expert_ids) *cpu_entries += e != models::kNoExpert;
      return model_->RoutedExperts(il, h, routing, {}, routed);
    };
    auto seq = gpu.AddSequence(128);
    ASSERT_TRUE(seq.ok());
    const CudaDeepseek2::BatchEntry entry{*seq, prompt_, LogitsRows::kAll};
    ASSERT_TRUE(
        gpu.ForwardBatch(std::span<const CudaDeepseek2::BatchEntry>(&entry, 1), logits, hooks)
            .ok());
    ASSERT_TRUE(gpu.FreeSequence(*seq).ok());
  };
  Activations full;
  int64_t full_entries = 0;
  run(*gpu_, GpuExpertMode::kAllCpu, nullptr, &full, &full_entries);
  const models::RoutingPolicy policies[] = {
      models::RoutingPolicy::TopK(std::max(1, hp.n_expert_used / 2)),
      models::RoutingPolicy::Adaptive(0.6, 1)};
  for (const models::RoutingPolicy& policy : policies) {
    SCOPED_TRACE(policy.ToString());
    Activations cpu, all_gpu, split;
    int64_t cpu_entries = 0, all_gpu_entries = 0, split_entries = 0;
    run(*gpu_, GpuExpertMode::kAllCpu, &policy, &cpu, &cpu_entries);
    EXPECT_LT(cpu_entries, full_entries) << "the policy dropped no expert";
    const RowAgreement changed = CompareRows(cpu, full);
    std::printf("[ measured ] %s: %s vs full routing (all CPU): median row rel L2 %.2e\n",
                GetParam().c_str(), policy.ToString().c_str(), changed.median);
    EXPECT_GT(changed.median, 2e-2) << "the policy hardly changes the logits: the test "
                                       "could not tell a GPU that ignores it";
    run(*gpu_, GpuExpertMode::kAllGpu, &policy, &all_gpu, &all_gpu_entries);
    EXPECT_EQ(all_gpu_entries, 0) << "all-GPU mode gave the CPU entries";
    // Under a policy that keeps fewer experts (adaptive mass 0.6) a row's
    // routing can sit within rounding of a gap: on the H200 one row of 45
    // (bf16, adaptive) moved by 0.43 with every entry accounted, the GPU's
    // bf16 rounding crossing a routing gap (README section 5), in kAllGpu and
    // in the split alike (which row depends on the attention kernel's
    // rounding: since the tenth session's kernel it is a confident row). So
    // one such row is allowed in both comparisons; the median must hold.
    ExpectAgree(CompareRows(all_gpu, cpu), "policy, all routed experts on the GPU vs CPU",
                GetParam(), /*allowed_flips=*/1);
    // The cost-model split under the policy: every entry computed exactly
    // once (the CPU's + the GPU's = the policy's), rows within the tolerance;
    // rows whose argmax differs are printed.
    {
      const GpuExpertStreamer::Stats before_split = (*split_gpu)->expert_streamer()->stats();
      Activations& forced = split;
      int64_t& forced_cpu = split_entries;
      run(**split_gpu, GpuExpertMode::kAuto, &policy, &forced, &forced_cpu);
      const int64_t gpu_entries =
          (*split_gpu)->expert_streamer()->stats().tokens_computed - before_split.tokens_computed;
      std::printf(
          "[ measured ] %s: %s, split: %lld entries on the CPU + %lld on the GPU (policy: "
          "%lld)\n",
          GetParam().c_str(), policy.ToString().c_str(), static_cast<long long>(forced_cpu),
          static_cast<long long>(gpu_entries), static_cast<long long>(cpu_entries));
      EXPECT_GT(gpu_entries, 0) << "nothing was split to the GPU";
      EXPECT_EQ(forced_cpu + gpu_entries, cpu_entries) << "an entry was lost or doubled";
      for (int64_t r = 0; r < cpu.n_tokens(); ++r) {
        if (Margin(cpu.row(r), n_vocab_) > 1.0 &&
            Argmax(forced.row(r), n_vocab_) != Argmax(cpu.row(r), n_vocab_)) {
          std::printf(
              "[ measured ] %s: split under the policy, row %lld: argmax differs, rel L2 "
              "%.3e, margin %.3f\n",
              GetParam().c_str(), static_cast<long long>(r),
              RelL2(forced.row(r), cpu.row(r), n_vocab_), Margin(cpu.row(r), n_vocab_));
        }
      }
      ExpectAgree(CompareRows(forced, cpu), "policy, kAuto split vs CPU", GetParam(),
                  /*allowed_flips=*/1);
    }
    // The model's own policy, no hook: the same routing bit for bit.
    ASSERT_TRUE(model_->SetRoutingPolicy(std::make_shared<models::RoutingPolicy>(policy)).ok());
    Activations own;
    int64_t own_entries = 0;
    run(*gpu_, GpuExpertMode::kAllCpu, nullptr, &own, &own_entries);
    ASSERT_TRUE(model_->SetRoutingPolicy(nullptr).ok());
    EXPECT_EQ(own_entries, cpu_entries);
    EXPECT_EQ(own.values(), cpu.values());
  }
}

// Hot routed experts resident on the GPU (CudaModelOptions::resident_experts):
// computed at every batch size (a prefill and one-token decode steps),
// alone (experts.mode kOff: no streaming) and with streaming (kAllGpu, and a
// cost-model split among the other experts); the logits equal the all-CPU
// path within the tolerance, every routing entry is computed exactly once
// (resident + streamed + CPU entries = tokens x K x MoE layers), and bad
// sets are refused naming the layer.
TEST_P(CudaDeepseek2Test, HotExpertsResidentOnTheGpuMatchTheCpuPath) {
  unsetenv("KTX_GPU_EXPERTS");
  unsetenv("KTX_GPU_EXPERTS_CPU");
  if (gpu_->expert_streamer() == nullptr) {
    GTEST_SKIP() << "routed experts of this file cannot be run on the GPU (see the log)";
  }
  const models::Deepseek2Hparams& hp = model_->hparams();
  const int n_moe = hp.n_layer - hp.n_layer_dense_lead;
  const int64_t n_prefill = std::min<int64_t>(40, static_cast<int64_t>(prompt_.size()) - 8);
  ASSERT_GT(n_prefill, 0);
  const int64_t n_decode = 8;
  const int64_t total_entries = (n_prefill + n_decode) * hp.n_expert_used * n_moe;
  CudaModelOptions o = TestOptions();
  o.resident_experts.resize(hp.n_layer);
  int64_t n_resident = 0;
  for (int il = hp.n_layer_dense_lead; il < hp.n_layer; ++il) {
    for (int32_t e = (il % 2); e < hp.n_expert; e += 2) {
      o.resident_experts[il].push_back(e);
      ++n_resident;
    }
  }

  struct Run {
    Activations prefill;
    Activations decode;  // [n_decode, n_vocab]
    int64_t cpu_entries = 0;
    int64_t gpu_entries = 0;       // streamed + resident
    int64_t resident_entries = 0;  // resident only
    int64_t resident_decode = 0;   // resident entries in the decode steps
  };
  auto run = [&](CudaDeepseek2& gpu, Run* r) {
    const GpuExpertStreamer* s = gpu.expert_streamer();
    const GpuExpertStreamer::Stats before = s ? s->stats() : GpuExpertStreamer::Stats{};
    CudaDeepseek2::ForwardHooks hooks;
    hooks.routed_experts = [&](int il, const Activations& h, const models::Routing& routing,
                               Activations* routed) {
      for (int32_t e : routing.expert_ids) r->cpu_entries += e != models::kNoExpert;
      return model_->RoutedExperts(il, h, routing, {}, routed);
    };
    auto seq = gpu.AddSequence(128);
    ASSERT_TRUE(seq.ok());
    const std::span<const int32_t> prompt(prompt_);
    const CudaDeepseek2::BatchEntry entry{*seq, prompt.first(n_prefill), LogitsRows::kAll};
    ASSERT_TRUE(
        gpu.ForwardBatch(std::span<const CudaDeepseek2::BatchEntry>(&entry, 1), &r->prefill, hooks)
            .ok());
    const int64_t resident_prefill = s ? s->stats().resident_tokens_computed : 0;
    r->decode.Resize(n_decode, n_vocab_);
    for (int64_t i = 0; i < n_decode; ++i) {
      Activations step;
      const CudaDeepseek2::BatchEntry one{*seq, prompt.subspan(n_prefill + i, 1),
                                          LogitsRows::kLast};
      ASSERT_TRUE(
          gpu.ForwardBatch(std::span<const CudaDeepseek2::BatchEntry>(&one, 1), &step, hooks).ok());
      std::copy(step.values().begin(), step.values().end(), r->decode.row(i));
    }
    ASSERT_TRUE(gpu.FreeSequence(*seq).ok());
    if (s != nullptr) {
      r->gpu_entries = s->stats().tokens_computed - before.tokens_computed;
      r->resident_entries = s->stats().resident_tokens_computed - before.resident_tokens_computed;
      r->resident_decode = s->stats().resident_tokens_computed - resident_prefill;
    }
  };
  Run cpu;
  ASSERT_TRUE(gpu_->SetExpertMode(GpuExpertMode::kOff).ok());
  run(*gpu_, &cpu);
  EXPECT_EQ(cpu.cpu_entries, total_entries);
  EXPECT_EQ(cpu.gpu_entries, 0);

  auto check = [&](const Run& r, const char* what) {
    SCOPED_TRACE(what);
    EXPECT_EQ(r.cpu_entries + r.gpu_entries, total_entries) << "an entry was lost or doubled";
    EXPECT_GT(r.resident_entries, 0);
    EXPECT_GT(r.resident_decode, 0) << "decode steps did not use the resident experts";
    ExpectAgree(CompareRows(r.prefill, cpu.prefill), what, GetParam());
    ExpectAgree(CompareRows(r.decode, cpu.decode), what, GetParam());
  };
  // Resident only: no streaming.
  {
    CudaModelOptions only = o;
    only.experts.mode = GpuExpertMode::kOff;
    auto hot = CudaDeepseek2::Create(*model_, only);
    ASSERT_TRUE(hot.ok()) << hot.status();
    EXPECT_EQ((*hot)->resident_experts(), n_resident);
    EXPECT_EQ((*hot)->memory_plan().resident_experts, n_resident);
    ASSERT_NE((*hot)->expert_streamer(), nullptr);
    EXPECT_EQ((*hot)->memory_plan().resident_expert_bytes,
              (*hot)->expert_streamer()->resident_bytes());
    EXPECT_NE((*hot)->memory_plan().ToString().find("hot routed experts"), std::string::npos);
    EXPECT_EQ((*hot)->SetExpertMode(GpuExpertMode::kAllGpu).code(),
              absl::StatusCode::kFailedPrecondition);
    Run r;
    run(**hot, &r);
    EXPECT_EQ(r.gpu_entries, r.resident_entries);
    EXPECT_GT(r.cpu_entries, 0);
    check(r, "resident hot experts vs CPU");
  }
  // Resident + every other expert streamed: the CPU gets nothing.
  {
    CudaModelOptions all = o;
    all.experts.mode = GpuExpertMode::kAllGpu;
    auto hot = CudaDeepseek2::Create(*model_, all);
    ASSERT_TRUE(hot.ok()) << hot.status();
    Run r;
    run(**hot, &r);
    EXPECT_EQ(r.cpu_entries, 0);
    EXPECT_GT(r.gpu_entries, r.resident_entries) << "nothing was streamed";
    check(r, "resident + streamed experts vs CPU");
  }
  // Resident + a cost-model split of the others (about half each side).
  {
    const ExpertCostModel& m = gpu_->expert_cost_model();
    CudaModelOptions split = o;
    split.experts.mode = GpuExpertMode::kAuto;
    split.experts.min_batch_tokens = 1;
    split.experts.cpu_expert_fixed_ms = GpuCopySeconds(m, gpu_->expert_streamer()->shape()) * 1e3 +
                                        2e3 * m.gpu_layer_fixed_s / hp.n_expert;
    split.experts.cpu_expert_per_token_us = 1e-3;
    split.experts.split_serial_us_per_token = 0;  // a split layer's serial part: not modelled here
    auto hot = CudaDeepseek2::Create(*model_, split);
    ASSERT_TRUE(hot.ok()) << hot.status();
    Run r;
    run(**hot, &r);
    EXPECT_GT(r.cpu_entries, 0);
    check(r, "resident + CPU/GPU split vs CPU");
  }
  // Bad sets name the layer.
  CudaModelOptions bad = TestOptions();
  bad.resident_experts.resize(hp.n_layer);
  bad.resident_experts[hp.n_layer - 1] = {hp.n_expert};
  auto refused = CudaDeepseek2::Create(*model_, bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("resident_experts, layer"), std::string::npos)
      << refused.status();
  if (hp.n_layer_dense_lead > 0) {
    bad.resident_experts[hp.n_layer - 1].clear();
    bad.resident_experts[0] = {0};
    refused = CudaDeepseek2::Create(*model_, bad);
    EXPECT_NE(refused.status().message().find("dense layer"), std::string::npos)
        << refused.status();
  }
}

// Expert deferral on the GPU path (ForwardHooks::split_deferred /
// send_deferred / join_deferred): for both join points, the logits equal the
// CPU reference's Deepseek2Model::Forward under the same policy within the
// tolerance, (a) with the model's own policy and no hooks (the deferred
// experts computed at once by the model's backend), (b) through hooks that
// hold the deferred work until the join, as the actor runtime does (every
// deferred entry reaches the CPU exactly once, nothing after the last layer),
// and (c) with half of the experts resident on the GPU (their deferred
// entries run on the GPU). Deferral really changes the logits.
// Deferral splits each token's experts over two layers, so a routing gap of
// ~1e-4 that the GPU's bf16 rounding crosses (README section 5) has one more
// place to land: on the H200 one confident row of 47 (bf16, next_attention)
// flips in every GPU variant alike. So here at most one confident row may
// disagree. The baseline is the CPU reference (F32 throughout), not another
// GPU run: the GPU's bf16 products put the median row at 6e-3 (bf16) to
// 1.2e-2 (q4_k_m) on the H200, so the bound is 3e-2 (the fixtures' tier B
// against the float64 reference allows 2.2e-2 .. 7.4e-2), far below what
// deferral itself moves (0.17 .. 0.29, checked above 5e-2).
void ExpectAgreeButOneRow(const RowAgreement& a, const char* what, const std::string& file) {
  std::printf("[ measured ] %s: %s, median row rel L2 %.2e, worst row %.2e, argmax %d/%d\n",
              file.c_str(), what, a.median, a.worst, a.agree, a.confident);
  EXPECT_LE(a.median, 3e-2) << what;
  EXPECT_GE(a.agree, a.confident - 1) << what;
}

TEST_P(CudaDeepseek2Test, ExpertDeferralMatchesTheCpuReference) {
  unsetenv("KTX_GPU_EXPERTS");
  unsetenv("KTX_GPU_EXPERTS_CPU");
  const models::Deepseek2Hparams& hp = model_->hparams();
  const int n_moe = hp.n_layer - hp.n_layer_dense_lead;
  if (n_moe < 2) GTEST_SKIP() << "deferral needs two MoE layers";
  const int64_t n = static_cast<int64_t>(prompt_.size());
  auto cpu_logits = [&](const models::RoutingPolicy* policy, Activations* out) {
    auto kv = kv_cache::SequenceKv::Create(model_->kv_layout(), 256);
    ASSERT_TRUE(kv.ok());
    models::ForwardOptions options;
    options.policy = policy;
    const absl::Status s = model_->Forward(prompt_, kv->get(), LogitsRows::kAll, out, options);
    ASSERT_TRUE(s.ok()) << s;
  };
  Activations full;
  cpu_logits(nullptr, &full);
  for (const models::DeferJoin join :
       {models::DeferJoin::kNextMoe, models::DeferJoin::kNextAttention}) {
    const models::RoutingPolicy policy = models::RoutingPolicy::Defer(2, join);
    SCOPED_TRACE(policy.ToString());
    Activations want;
    cpu_logits(&policy, &want);
    const RowAgreement changed = CompareRows(want, full);
    std::printf("[ measured ] %s: %s vs full routing (CPU reference): median row rel L2 %.2e\n",
                GetParam().c_str(), policy.ToString().c_str(), changed.median);
    EXPECT_GT(changed.median, 5e-2) << "deferral hardly changes the logits: the test could not "
                                       "tell a GPU path that ignores it";
    // (a) The model's policy, no hooks.
    ASSERT_TRUE(model_->SetRoutingPolicy(std::make_shared<models::RoutingPolicy>(policy)).ok());
    {
      ASSERT_TRUE(gpu_->SetExpertMode(GpuExpertMode::kOff).ok() ||
                  gpu_->expert_streamer() == nullptr);
      auto seq = gpu_->AddSequence(128);
      ASSERT_TRUE(seq.ok());
      Activations got;
      const absl::Status s = gpu_->Forward(prompt_, *seq, LogitsRows::kAll, &got);
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_TRUE(gpu_->FreeSequence(*seq).ok());
      ExpectAgreeButOneRow(CompareRows(got, want), "deferral, model policy, no hooks", GetParam());
    }
    // (c) Half of the experts resident: their deferred entries on the GPU.
    {
      CudaModelOptions o = TestOptions();
      o.experts.mode = GpuExpertMode::kOff;
      o.resident_experts.resize(hp.n_layer);
      for (int il = hp.n_layer_dense_lead; il < hp.n_layer; ++il) {
        for (int32_t e = il % 2; e < hp.n_expert; e += 2) o.resident_experts[il].push_back(e);
      }
      auto hot = CudaDeepseek2::Create(*model_, o);
      if (!hot.ok() || (*hot)->expert_streamer() == nullptr) {
        std::printf("[ skipped  ] %s: resident experts not available for this file\n",
                    GetParam().c_str());
      } else {
        auto seq = (*hot)->AddSequence(128);
        ASSERT_TRUE(seq.ok());
        Activations got;
        const absl::Status s = (*hot)->Forward(prompt_, *seq, LogitsRows::kAll, &got);
        ASSERT_TRUE(s.ok()) << s;
        EXPECT_GT((*hot)->expert_streamer()->stats().resident_tokens_computed, 0);
        ExpectAgreeButOneRow(CompareRows(got, want), "deferral, half the experts resident",
                             GetParam());
      }
    }
    ASSERT_TRUE(model_->SetRoutingPolicy(nullptr).ok());
    // (b) Hooks that hold the deferred work until its join (the actor shape).
    {
      struct Held {
        int il;
        models::DeferJoin join;
        Activations h;
        models::Routing routing;
      };
      std::vector<Held> held;
      int64_t deferred_entries = 0, split_entries = 0, joined = 0;
      CudaDeepseek2::ForwardHooks hooks;
      hooks.routed_experts = [&](int il, const Activations& h, const models::Routing& routing,
                                 Activations* routed) {
        return model_->RoutedExperts(il, h, routing, {}, routed);
      };
      hooks.adjust_routing = [](int, models::Routing*) { return absl::OkStatus(); };
      hooks.split_deferred = [&](int il, models::Routing* routing, models::Routing late[2]) {
        const models::DeferredCount c =
            models::SplitDeferredRows(il, hp.n_layer, {}, &policy, routing, late);
        split_entries += c.total();
        return absl::StatusOr<models::DeferredCount>(c);
      };
      hooks.send_deferred = [&](int il, models::DeferJoin j, const Activations& h,
                                const models::Routing& routing) {
        for (int32_t e : routing.expert_ids) deferred_entries += e != models::kNoExpert;
        held.push_back({il, j, h, routing});
        return absl::OkStatus();
      };
      hooks.join_deferred = [&](int il, models::DeferJoin j, Activations* late) {
        auto it = std::find_if(held.begin(), held.end(),
                               [&](const Held& x) { return x.il == il && x.join == j; });
        if (it == held.end()) return absl::InternalError("join of work never sent");
        const absl::Status s = model_->RoutedExperts(il, it->h, it->routing, {}, late);
        held.erase(it);
        ++joined;
        return s;
      };
      ASSERT_TRUE(gpu_->SetExpertMode(GpuExpertMode::kOff).ok() ||
                  gpu_->expert_streamer() == nullptr);
      auto seq = gpu_->AddSequence(128);
      ASSERT_TRUE(seq.ok());
      const CudaDeepseek2::BatchEntry entry{*seq, prompt_, LogitsRows::kAll};
      Activations got;
      const absl::Status s =
          gpu_->ForwardBatch(std::span<const CudaDeepseek2::BatchEntry>(&entry, 1), &got, hooks);
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_TRUE(gpu_->FreeSequence(*seq).ok());
      EXPECT_TRUE(held.empty()) << "deferred work was never joined";
      EXPECT_EQ(deferred_entries, split_entries);
      // Two of K experts per token deferred at every MoE layer but the last.
      EXPECT_EQ(split_entries, n * std::min(2, hp.n_expert_used - 1) * (n_moe - 1));
      EXPECT_EQ(joined, n_moe - 1);
      ExpectAgreeButOneRow(CompareRows(got, want), "deferral through hooks held until the join",
                           GetParam());
    }
  }
}

// Weight forms (CudaModelOptions::gpu_weights) and the quantized GEMV: the
// prompt as one batch, then llama.cpp's greedy tokens one at a time (teacher
// forcing), with bf16 weights only (cuBLAS everywhere), with both forms and
// gemv_max_tokens 128 (every product of the non-routed matrices by the GEMV,
// the prefill included), with both forms and threshold 0 (must be the bf16
// path bit for bit: the blocks are loaded but unused), and with the blocks
// only (GEMV; k_b / v_b and token_embd stay bf16). Each against the float64
// reference within the file's tier-B bounds, and the GEMV runs against the
// bf16 run row by row (median row rel L2 <= 1e-2, same argmax wherever the
// bf16 run's top-2 margin exceeds 1): the GEMV skips the bf16 rounding of
// the weights, so it differs from the bf16 path by about that rounding.
TEST_P(CudaDeepseek2Test, WeightFormsAndTheQuantizedGemvMatchTheReference) {
  std::vector<float> want = LoadF32(files_["ref64_prompt_logits"]["file"]);
  const std::vector<float> gen = LoadF32(files_["ref64_gen_logits"]["file"]);
  want.insert(want.end(), gen.begin(), gen.end());
  const auto gen_tokens = files_["llama_greedy_tokens"].get<std::vector<int32_t>>();
  const int64_t n_rows = static_cast<int64_t>(want.size()) / n_vocab_;
  struct Case {
    GpuWeightForm form;
    int64_t gemv_max_tokens;
    const char* kernel;  // KTX_GEMV_KERNEL spelling; null: the default (q8)
    const char* what;
  };
  const Case cases[] = {
      {GpuWeightForm::kBf16, 8, nullptr, "bf16 weights only (cuBLAS)"},
      {GpuWeightForm::kBoth, 128, "direct:2", "both forms, the direct GEMV for every batch"},
      {GpuWeightForm::kBoth, 0, nullptr, "both forms, threshold 0 (cuBLAS)"},
      {GpuWeightForm::kBoth, 1, nullptr, "both forms, the q8 GEMV at 1 token (opt-in decode)"},
      {GpuWeightForm::kQuantized, 8, nullptr, "GGUF blocks only (the q8 GEMV)"},
  };
  const kernels::cuda::GemvKernelChoice default_kernel = kernels::cuda::CurrentGemvKernel();
  std::vector<float> bf16_run;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    kernels::cuda::GemvKernelChoice kernel = default_kernel;
    if (c.kernel != nullptr) {
      ASSERT_TRUE(kernels::cuda::ParseGemvKernel(c.kernel, &kernel));
    }
    kernels::cuda::SetGemvKernel(kernel);
    struct Restore {
      kernels::cuda::GemvKernelChoice k;
      ~Restore() { kernels::cuda::SetGemvKernel(k); }
    } restore{default_kernel};
    CudaModelOptions o = TestOptions();
    o.gpu_weights = c.form;
    o.gemv_max_tokens = c.gemv_max_tokens;
    auto gpu = CudaDeepseek2::Create(*model_, o);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    CudaDeepseek2& g = **gpu;
    const GpuMemoryPlan& plan = g.memory_plan();
    // Both forms keep Q4_K / Q6_K blocks only: without any (q8_0, bf16
    // files) they are the bf16 form.
    const bool both_is_bf16 = c.form == GpuWeightForm::kBoth && GetParam() != "q4_k_m";
    EXPECT_EQ(g.weight_form(), both_is_bf16 ? GpuWeightForm::kBf16 : c.form) << plan.ToString();
    EXPECT_EQ(plan.quantized_weight_bytes > 0, c.form != GpuWeightForm::kBf16 && !both_is_bf16)
        << plan.ToString();
    EXPECT_EQ(plan.bf16_dropped_bytes > 0, c.form == GpuWeightForm::kQuantized) << plan.ToString();
    auto seq = g.AddSequence(256);
    ASSERT_TRUE(seq.ok());
    Activations logits;
    ASSERT_TRUE(g.Forward(prompt_, *seq, LogitsRows::kAll, &logits).ok());
    std::vector<float> got = logits.ToVector();
    for (int32_t token : gen_tokens) {
      const int32_t one[] = {token};
      ASSERT_TRUE(g.Forward(one, *seq, LogitsRows::kLast, &logits).ok());
      got.insert(got.end(), logits.values().begin(), logits.values().end());
    }
    ASSERT_EQ(got.size(), want.size());
    // Which path ran.
    if (c.form == GpuWeightForm::kBf16 || c.gemv_max_tokens == 0) {
      EXPECT_EQ(g.gemv_products(), 0);
      EXPECT_GT(g.bf16_products(), 0);
    } else if (c.form == GpuWeightForm::kQuantized) {
      EXPECT_GT(g.gemv_products(), 0);
      EXPECT_EQ(g.bf16_products(), 0) << "every non-routed product should have used the GEMV";
    } else {
      // Both forms: the GEMV only on Q4_K / Q6_K blocks (GemvBeatsCublasType);
      // Q8_0 and BF16 matrices keep cuBLAS on their bf16 copy.
      if (GetParam() == "q4_k_m") {
        EXPECT_GT(g.gemv_products(), 0);
      } else {
        EXPECT_EQ(g.gemv_products(), 0) << "Q8_0 / BF16 blocks should leave the product to cuBLAS";
      }
    }
    // Against the float64 reference (tier B).
    std::vector<double> rows;
    int confident = 0, agree = 0;
    for (int64_t r = 0; r < n_rows; ++r) {
      const float* gr = got.data() + r * n_vocab_;
      const float* wr = want.data() + r * n_vocab_;
      rows.push_back(RelL2(gr, wr, n_vocab_));
      if (Margin(wr, n_vocab_) > 1.0) {
        ++confident;
        agree += Argmax(gr, n_vocab_) == Argmax(wr, n_vocab_);
      }
    }
    std::sort(rows.begin(), rows.end());
    const double all = RelL2(got.data(), want.data(), static_cast<int64_t>(want.size()));
    const double agreement = static_cast<double>(agree) / std::max(confident, 1);
    const TierB b = Bounds(GetParam());
    std::printf("[ measured ] %s, %s: rel L2 %.3e vs float64, median row %.3e, argmax %.3f",
                GetParam().c_str(), c.what, all, rows[rows.size() / 2], agreement);
    EXPECT_LE(all, b.rel_l2);
    EXPECT_LE(rows[rows.size() / 2], b.median_row);
    EXPECT_GE(agreement, b.argmax_agree);
    if (c.form == GpuWeightForm::kBf16) {
      std::printf("\n");
      bf16_run = got;
      continue;
    }
    if (c.gemv_max_tokens == 0) {
      std::printf("\n");
      EXPECT_TRUE(got == bf16_run) << "threshold 0 must run exactly the bf16 path";
      continue;
    }
    // Against the bf16 run, row by row.
    std::vector<double> diff;
    int sure = 0, same = 0;
    for (int64_t r = 0; r < n_rows; ++r) {
      const float* gr = got.data() + r * n_vocab_;
      const float* br = bf16_run.data() + r * n_vocab_;
      diff.push_back(RelL2(gr, br, n_vocab_));
      if (Margin(br, n_vocab_) > 1.0) {
        ++sure;
        same += Argmax(gr, n_vocab_) == Argmax(br, n_vocab_);
      }
    }
    std::sort(diff.begin(), diff.end());
    std::printf("; vs the bf16 run: median row %.3e, worst row %.3e, argmax %d/%d\n",
                diff[diff.size() / 2], diff.back(), same, sure);
    // The q8 kernel (the default for Q4_K / Q6_K / Q8_0 blocks) also rounds
    // the activations to 8 bits per block of 32 (<= 2^-8 of the block's max,
    // as llama.cpp's Q8 activations): about 1e-2 per row here, so 2e-2.
    EXPECT_LE(diff[diff.size() / 2], 2e-2);
    // The GEMV rounds differently from cuBLAS on the bf16 copy (it does not
    // round weights to bf16): a row whose routing gap (~1e-4, README section
    // 5) that difference crosses moves by up to ~0.5; on the H200 one or two
    // confident rows of ~70 did (q8_0, q4_k_m). Allowed: 1 in 30 (at least 1);
    // the tier-B check against float64 above is the real bound.
    EXPECT_GE(same, sure - std::max(1, sure / 30));
  }
  // The threshold can change between calls: 0 turns the GEMV off where bf16 exists.
  gpu_->SetGemvMaxTokens(0);
  EXPECT_EQ(gpu_->gemv_max_tokens(), 0);
}

// CUDA graphs (CudaModelOptions::cuda_graphs): decode steps replay each
// layer's GPU part as a graph. (1) Replay equals eager launch bit for bit: a
// second sequence with the same tokens (every step replayed) gives exactly
// the logits of the first (first step eager, second captured, then replays).
// (2) Graphs on vs off: the prompt (above graph_max_tokens: eager) and
// teacher-forced decode steps of one sequence, then a decode batch of 3;
// they differ only by the attention plan's context bucket (F32 merge order of
// the KV splits), so rows agree to 1e-3 and in argmax where the margin > 1.
// (3) The counters: captures, replays, no failure; zeros with graphs off.
// The skinny bf16 kernel (kernels/cuda/skinny_gemm.h) on every product of up
// to 64 tokens gives the logits of the cuBLAS path (the same bf16 products,
// F32 sums in another order): single decode steps, short prefills and a
// decode batch of 3; 0 keeps every bf16 product on cuBLAS.
TEST_P(CudaDeepseek2Test, SkinnyProductsAgreeWithCublas) {
  const auto gen_tokens = files_["llama_greedy_tokens"].get<std::vector<int32_t>>();
  const size_t n_steps = std::min<size_t>(gen_tokens.size(), 6);
  auto run = [&](int64_t skinny, Activations* out, int64_t* skinny_products,
                 int64_t* cublas_products) {
    CudaModelOptions o = TestOptions();
    o.gpu_weights = GpuWeightForm::kBf16;
    o.skinny_max_tokens = skinny;
    auto gpu = CudaDeepseek2::Create(*model_, o);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    CudaDeepseek2& g = **gpu;
    std::vector<float> rows;
    auto seq = g.AddSequence(256);
    ASSERT_TRUE(seq.ok());
    Activations logits;
    // The prompt (longer than 64 tokens: cuBLAS in both runs) only sets up
    // the cache; the decode steps are compared.
    ASSERT_TRUE(g.Forward(prompt_, *seq, LogitsRows::kLast, &logits).ok());
    for (size_t i = 0; i < n_steps; ++i) {
      const int32_t one[] = {gen_tokens[i]};
      ASSERT_TRUE(g.Forward(one, *seq, LogitsRows::kLast, &logits).ok());
      rows.insert(rows.end(), logits.values().begin(), logits.values().end());
    }
    std::vector<CudaDeepseek2::BatchEntry> entries;
    int32_t next[3];
    for (int i = 0; i < 3; ++i) {
      auto s2 = g.AddSequence(256);
      ASSERT_TRUE(s2.ok());
      const std::vector<int32_t> p(prompt_.begin() + i, prompt_.begin() + 9 + 5 * i);
      ASSERT_TRUE(g.Forward(p, *s2, LogitsRows::kLast, &logits).ok());
      next[i] = gen_tokens[i % gen_tokens.size()];
      entries.push_back({*s2, {&next[i], 1}, LogitsRows::kLast});
    }
    ASSERT_TRUE(g.ForwardBatch(entries, &logits).ok());
    rows.insert(rows.end(), logits.values().begin(), logits.values().end());
    out->Resize(static_cast<int64_t>(rows.size()) / n_vocab_, n_vocab_);
    std::copy(rows.begin(), rows.end(), out->data());
    *skinny_products = g.skinny_products();
    *cublas_products = g.cublas_products();
  };
  Activations skinny_rows, cublas_rows;
  int64_t skinny_calls = 0, cublas_calls = 0, skinny_calls_0 = 0, cublas_calls_0 = 0;
  run(64, &skinny_rows, &skinny_calls, &cublas_calls);
  if (HasFatalFailure()) return;
  run(0, &cublas_rows, &skinny_calls_0, &cublas_calls_0);
  if (HasFatalFailure()) return;
  EXPECT_EQ(skinny_calls_0, 0);
  EXPECT_GT(cublas_calls_0, 0);
  EXPECT_GT(skinny_calls, 0);
  ASSERT_GT(static_cast<int64_t>(prompt_.size()), 64) << "the prompt should take cuBLAS";
  EXPECT_GT(cublas_calls, 0);
  EXPECT_LT(cublas_calls, cublas_calls_0);
  ExpectAgree(CompareRows(skinny_rows, cublas_rows), "skinny vs cuBLAS products", GetParam());
  // Bad settings are refused by name.
  for (const auto& [var, value] :
       {std::pair<const char*, const char*>{"KTX_GPU_SKINNY_MAX_TOKENS", "65"},
        {"KTX_GPU_SKINNY_MAX_TOKENS", "some"},
        {"KTX_GPU_SPLIT_SERIAL_US", "-1"},
        {"KTX_GPU_ROUTED_ZERO_COPY", "yes"},
        {"KTX_GPU_SPLIT_REPLAN", "yes"},
        {"KTX_GPU_SPLIT_LEARN_COPY", "2"},
        {"KTX_GPU_SPLIT_LEAD", "1.5"},
        {"KTX_GPU_SPLIT_LEAD", "-0.1"},
        {"KTX_GPU_EXPERT_SLOTS", "1"}}) {
    setenv(var, value, 1);
    auto bad = CudaDeepseek2::Create(*model_, TestOptions());
    unsetenv(var);
    ASSERT_FALSE(bad.ok()) << var << "=" << value;
    EXPECT_NE(bad.status().message().find(var), std::string::npos) << bad.status();
  }
  CudaModelOptions o = TestOptions();
  o.skinny_max_tokens = 65;
  auto bad = CudaDeepseek2::Create(*model_, o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("skinny_max_tokens"), std::string::npos) << bad.status();
  o = TestOptions();
  o.experts.split_gpu_lead = 1.0;
  bad = CudaDeepseek2::Create(*model_, o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("split_gpu_lead"), std::string::npos) << bad.status();
}

// q_a and kv_a as one product over their stacked rows agree with two
// products (the sums of kv_a's rows may be ordered differently: the skinny
// kernel's plan depends on the row count), one product fewer per layer and
// forward step, with and without CUDA graphs.
TEST_P(CudaDeepseek2Test, StackedQaKvaAgreesWithTwoProducts) {
  const auto gen_tokens = files_["llama_greedy_tokens"].get<std::vector<int32_t>>();
  const size_t n_steps = std::min<size_t>(gen_tokens.size(), 6);
  struct Run {
    Activations rows;
    int64_t products = 0;
  };
  auto run = [&](bool stacked, bool graphs, Run* out) {
    CudaModelOptions o = TestOptions();
    o.gpu_weights = GpuWeightForm::kBf16;
    o.stack_q_a_kv_a = stacked;
    o.cuda_graphs = graphs;
    auto gpu = CudaDeepseek2::Create(*model_, o);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    CudaDeepseek2& g = **gpu;
    auto seq = g.AddSequence(256);
    ASSERT_TRUE(seq.ok());
    Activations logits;
    ASSERT_TRUE(g.Forward(prompt_, *seq, LogitsRows::kLast, &logits).ok());
    std::vector<float> rows = logits.ToVector();
    for (size_t i = 0; i < n_steps; ++i) {
      const int32_t one[] = {gen_tokens[i]};
      ASSERT_TRUE(g.Forward(one, *seq, LogitsRows::kLast, &logits).ok());
      rows.insert(rows.end(), logits.values().begin(), logits.values().end());
    }
    out->rows.Resize(static_cast<int64_t>(rows.size()) / n_vocab_, n_vocab_);
    std::copy(rows.begin(), rows.end(), out->rows.data());
    out->products = g.bf16_products();
  };
  for (const bool graphs : {false, true}) {
    SCOPED_TRACE(graphs ? "graphs" : "eager");
    Run separate, stacked;
    run(false, graphs, &separate);
    if (HasFatalFailure()) return;
    run(true, graphs, &stacked);
    if (HasFatalFailure()) return;
    if (!graphs && !model_->hparams().is_lite()) {
      const int64_t forwards = 1 + static_cast<int64_t>(n_steps);
      EXPECT_EQ(stacked.products, separate.products - model_->hparams().n_layer * forwards);
    }
    ExpectAgree(CompareRows(stacked.rows, separate.rows), "q_a and kv_a stacked vs separate",
                GetParam());
  }
}

TEST_P(CudaDeepseek2Test, CudaGraphsReplayMatchesEagerLaunches) {
  const auto gen_tokens = files_["llama_greedy_tokens"].get<std::vector<int32_t>>();
  const size_t n_steps = std::min<size_t>(gen_tokens.size(), 10);
  ASSERT_GE(n_steps, 4u);
  auto run = [&](bool graphs, int repeats, std::vector<std::vector<float>>* rows,
                 CudaGraphCache::Stats* stats) {
    CudaModelOptions o = TestOptions();
    o.cuda_graphs = graphs;
    auto gpu = CudaDeepseek2::Create(*model_, o);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    CudaDeepseek2& g = **gpu;
    EXPECT_EQ(g.UsesGraphs(1), graphs);
    EXPECT_FALSE(g.UsesGraphs(17));
    for (int rep = 0; rep < repeats; ++rep) {
      auto seq = g.AddSequence(256);
      ASSERT_TRUE(seq.ok());
      Activations logits;
      ASSERT_TRUE(g.Forward(prompt_, *seq, LogitsRows::kLast, &logits).ok());
      rows->push_back(logits.ToVector());
      for (size_t i = 0; i < n_steps; ++i) {
        const int32_t one[] = {gen_tokens[i]};
        ASSERT_TRUE(g.Forward(one, *seq, LogitsRows::kLast, &logits).ok());
        rows->push_back(logits.ToVector());
      }
      ASSERT_TRUE(g.FreeSequence(*seq).ok());
    }
    // A decode batch of 3 sequences (3 tokens per step) for 4 steps.
    std::vector<SequenceId> seqs;
    for (int i = 0; i < 3; ++i) {
      auto seq = g.AddSequence(256);
      ASSERT_TRUE(seq.ok());
      Activations logits;
      const std::vector<int32_t> p(prompt_.begin() + i, prompt_.end() - 2 * i);
      ASSERT_TRUE(g.Forward(p, *seq, LogitsRows::kLast, &logits).ok());
      seqs.push_back(*seq);
    }
    for (int step = 0; step < 4; ++step) {
      int32_t next[3];
      std::vector<CudaDeepseek2::BatchEntry> entries;
      for (int i = 0; i < 3; ++i) {
        next[i] = gen_tokens[(step + 2 * i) % gen_tokens.size()];
        entries.push_back({seqs[i], {&next[i], 1}, LogitsRows::kLast});
      }
      Activations batch;
      ASSERT_TRUE(g.ForwardBatch(entries, &batch).ok());
      rows->push_back(batch.ToVector());
    }
    *stats = g.graph_stats();
  };
  std::vector<std::vector<float>> on, off;
  CudaGraphCache::Stats on_stats, off_stats;
  run(true, 2, &on, &on_stats);
  if (HasFatalFailure()) return;
  run(false, 1, &off, &off_stats);
  if (HasFatalFailure()) return;
  const int n_layer = model_->hparams().n_layer;
  std::printf("[ measured ] %s: graphs: %lld eager, %lld captured, %lld replays, %lld failed\n",
              GetParam().c_str(), static_cast<long long>(on_stats.eager),
              static_cast<long long>(on_stats.captures), static_cast<long long>(on_stats.replays),
              static_cast<long long>(on_stats.failures));
  EXPECT_EQ(on_stats.failures, 0);
  // One graph per layer for 1 token and for 3 tokens (the context stays in
  // the bucket of 256).
  EXPECT_EQ(on_stats.captures, 2 * n_layer);
  EXPECT_GE(on_stats.replays, static_cast<int64_t>(2 * n_steps - 1 + 3) * n_layer);
  EXPECT_EQ(off_stats.captures + off_stats.replays + off_stats.eager, 0);
  // (1) The second sequence (all replays) equals the first bit for bit.
  const size_t per_seq = n_steps + 1;
  ASSERT_EQ(on.size(), 2 * per_seq + 4);
  for (size_t r = 0; r < per_seq; ++r) {
    EXPECT_TRUE(on[r] == on[per_seq + r]) << "row " << r << ": replay differs from eager launch";
  }
  // (2) Graphs on vs off.
  ASSERT_EQ(off.size(), per_seq + 4);
  for (size_t r = 0; r < off.size(); ++r) {
    const std::vector<float>& a = r < per_seq ? on[r] : on[per_seq + r];
    const std::vector<float>& b = off[r];
    ASSERT_EQ(a.size(), b.size());
    EXPECT_LE(RelL2(a.data(), b.data(), static_cast<int64_t>(a.size())), 1e-3) << "row " << r;
    for (size_t o = 0; o < a.size(); o += n_vocab_) {
      if (Margin(b.data() + o, n_vocab_) > 1.0) {
        EXPECT_EQ(Argmax(a.data() + o, n_vocab_), Argmax(b.data() + o, n_vocab_)) << "row " << r;
      }
    }
  }
  // A bad KTX_CUDA_GRAPHS is refused by name.
  setenv("KTX_CUDA_GRAPHS", "sometimes", 1);
  auto bad = CudaDeepseek2::Create(*model_, TestOptions());
  unsetenv("KTX_CUDA_GRAPHS");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("KTX_CUDA_GRAPHS"), std::string::npos) << bad.status();
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaDeepseek2Test, ::testing::Values("bf16", "q8_0", "q4_k_m"));

}  // namespace
}  // namespace ktx::gpu
