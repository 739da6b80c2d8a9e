// RunBenchmark on the tiny fixture with tiny sizes: every figure present and
// consistent with the others (tok/s = tokens / seconds, stage times add up,
// expert bytes within what the routing allows, sampled tokens vary), the JSON
// and the table carry them; the read-bandwidth loop and option checks.
#include "runtime/bench/bench.h"

#include <algorithm>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/models/deepseek2.h"
#include "runtime/moe_backend/cpu_moe_backend.h"

namespace ktx::bench {
namespace {

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

BenchOptions TinyOptions() {
  BenchOptions o;
  o.prompt_lens = {12, 7};
  o.n_gen = 5;
  o.batch_sizes = {1, 3};
  o.read_bytes = 16 << 20;
  o.read_repeats = 2;
  o.warmup_tokens = 4;
  return o;
}

void CheckResult(const BenchResult& r, const models::Deepseek2Model& model, bool fast) {
  ASSERT_EQ(r.prefill.size(), 2u);
  ASSERT_EQ(r.decode.size(), 2u);
  EXPECT_TRUE(r.complete);
  EXPECT_TRUE(r.skipped.empty());
  EXPECT_EQ(r.prefill[0].prompt_len, 7);  // the decode context first, then the others
  EXPECT_EQ(r.prefill[1].prompt_len, 12);
  EXPECT_GT(r.read_bw.best_gbps, 0.0);
  EXPECT_GE(r.read_bw.best_gbps, r.read_bw.mean_gbps);
  EXPECT_EQ(r.read_bw.bytes, 16u << 20);
  EXPECT_EQ(r.options.decode_context, 7);  // min of the prompt lengths
  const double max_bytes = r.model["expert_bytes_per_token_max"].get<double>();
  // 2 MoE layers x 4 experts x Q4_K/Q6_K slabs: positive, bounded.
  EXPECT_GT(max_bytes, 0.0);
  for (const PrefillResult& p : r.prefill) {
    EXPECT_GT(p.seconds, 0.0);
    EXPECT_NEAR(p.tok_s, p.prompt_len / p.seconds, 1e-9 * p.tok_s);
    EXPECT_GT(p.stages.ms_per_token_layer[static_cast<int>(Stage::kAttention)], 0.0);
    EXPECT_GT(p.expert_bytes_per_token, 0.0);
    EXPECT_LE(p.expert_bytes_per_token, max_bytes * (1 + 1e-12));
    // The stage times cannot exceed the wall time of the phase.
    EXPECT_LE(p.stages.total_ms_per_token * p.prompt_len / 1e3, p.seconds * (1 + 1e-9));
  }
  for (const DecodeResult& d : r.decode) {
    EXPECT_EQ(d.steps, 5);
    EXPECT_EQ(d.context, 7 + 8);  // the decode context and each sequence's own suffix
    EXPECT_NEAR(d.tok_s, d.batch * d.steps / d.seconds, 1e-9 * d.tok_s);
    EXPECT_NEAR(d.step_ms, 1e3 * d.seconds / d.steps, 1e-9 * d.step_ms);
    EXPECT_EQ(d.generated, d.batch * (d.steps + 1));
    EXPECT_GT(d.distinct_tokens, 1);  // sampled, not one token over and over
    // The sequences of a batch differ (their own suffixes): more distinct
    // tokens than one sequence can produce.
    if (d.batch > 1) {
      EXPECT_GT(d.distinct_tokens, d.steps + 1);
    }
    EXPECT_GT(d.expert_bytes_per_token, 0.0);
    EXPECT_LE(d.expert_bytes_per_token, max_bytes * (1 + 1e-12));
    EXPECT_GT(d.expert_read_gbps, 0.0);
    EXPECT_NEAR(d.pct_of_read_bw, 100.0 * d.expert_read_gbps / r.read_bw.best_gbps, 1e-9);
    if (fast) {
      // panel16 bytes per row are a little above GGUF's (148 vs 144 for Q4_K).
      EXPECT_GT(d.kernel_bytes_per_token, d.expert_bytes_per_token);
      EXPECT_LT(d.kernel_bytes_per_token, 1.05 * d.expert_bytes_per_token);
    } else {
      EXPECT_EQ(d.kernel_bytes_per_token, 0.0);
    }
    EXPECT_EQ(d.stages.layer_ms_per_token.size(), 3u);
    EXPECT_GT(d.stages.layer_ms_per_token[0][static_cast<int>(Stage::kDenseFfn)], 0.0);
    EXPECT_EQ(d.stages.layer_ms_per_token[1][static_cast<int>(Stage::kDenseFfn)], 0.0);
    EXPECT_GT(d.stages.layer_ms_per_token[2][static_cast<int>(Stage::kExperts)], 0.0);
  }
  const nlohmann::json j = BenchResultToJson(r);
  for (const char* key : {"schema", "date", "host", "machine", "model", "config", "load", "prefill",
                          "decode", "units"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  EXPECT_EQ(j["machine"]["threads"].get<int>(), r.threads);
  EXPECT_TRUE(j["machine"].contains("cpu_brand"));
  EXPECT_TRUE(j["machine"]["isa"].contains("avx512_vnni"));
  EXPECT_GT(j["machine"]["read_bandwidth"]["best_gbps"].get<double>(), 0.0);
  EXPECT_EQ(j["model"]["n_layer"].get<int>(), model.hparams().n_layer);
  EXPECT_EQ(j["config"]["experts"].get<std::string>(), fast ? "fast" : "reference");
  EXPECT_EQ(j["decode"][1]["batch"].get<int>(), 3);
  for (const char* key : {"tok_s", "step_ms", "expert_bytes_per_token", "expert_read_gbps",
                          "pct_of_read_bw", "stages", "layers", "distinct_tokens"}) {
    EXPECT_TRUE(j["decode"][0].contains(key)) << key;
  }
  for (const char* stage : {"attention", "route", "experts", "shared", "combine", "head"}) {
    EXPECT_TRUE(j["decode"][0]["stages"].contains(stage)) << stage;
    EXPECT_TRUE(j["prefill"][0]["stages"].contains(stage)) << stage;
  }
  EXPECT_EQ(j["decode"][0]["layers"].size(), 3u);
  EXPECT_TRUE(j["date"].get<std::string>().ends_with("Z"));

  const std::string table = FormatBenchTable(r);
  for (const char* text :
       {"prefill", "decode", "read bandwidth", "attention", "experts", "per layer", "tok/s"}) {
    EXPECT_NE(table.find(text), std::string::npos) << text << "\n" << table;
  }
}

TEST(BenchTest, FastExpertsOnTheTinyModel) {
  auto model = models::Deepseek2Model::Open(kDataDir + "dsv3-tiny-q4_k_m.gguf");
  ASSERT_TRUE(model.ok());
  moe_backend::CpuMoeBackendOptions eo;
  eo.progress = moe_backend::ProgressMode::kOff;
  // The check's decode call has <= 4 tokens per expert, its prefill call 40:
  // a switch at 8 sends them to the two paths whatever a timed calibration
  // would say (it came out at 128 once on a loaded CI machine, 2026-11-27).
  eo.prefill_min_tokens = 8;
  auto experts = moe_backend::CpuExperts::Attach(model->get(), 0, eo);
  ASSERT_TRUE(experts.ok()) << experts.status();
  int lines = 0;
  BenchOptions o = TinyOptions();
  o.progress = [&lines](const std::string&) { ++lines; };
  auto r = RunBenchmark(**model, (*experts)->pool(), &(*experts)->backend(), o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(lines, 5);
  EXPECT_EQ(r->experts, "fast");
  EXPECT_FALSE(r->variant.empty());
  EXPECT_GT(r->load["repacked_bytes"].get<double>(), 0.0);
  // The kernel check ran on the first MoE layer, within the kernel's bound;
  // 40 tokens on 4 experts use the prefill form exactly where one exists.
  EXPECT_TRUE(r->check.ran);
  EXPECT_TRUE(r->check.ok);
  EXPECT_EQ(r->check.layer, 1);
  EXPECT_GT(r->check.nmse_decode, 0.0);  // activations were rounded: not the reference
  EXPECT_LT(r->check.nmse_decode, r->check.tolerance);
  EXPECT_LT(r->check.nmse_prefill, r->check.tolerance);
  EXPECT_EQ(r->check.prefill_experts, r->load["prefill_form"].get<bool>() ? 4 : 0);
  const nlohmann::json j = BenchResultToJson(*r);
  EXPECT_TRUE(j["check"]["ok"].get<bool>());
  EXPECT_NE(FormatBenchTable(*r).find("check      layer 1"), std::string::npos);
  CheckResult(*r, **model, true);
  (*experts)->Detach();
}

TEST(BenchTest, ReferenceExpertsOnTheTinyModel) {
  auto model = models::Deepseek2Model::Open(kDataDir + "dsv3-tiny-q4_k_m.gguf");
  ASSERT_TRUE(model.ok());
  auto pool = moe_backend::CreateCpuPool(1);
  ASSERT_TRUE(pool.ok());
  auto r = RunBenchmark(**model, **pool, nullptr, TinyOptions());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->threads, 1);
  EXPECT_EQ(r->experts, "reference");
  EXPECT_FALSE(r->check.ran);
  EXPECT_FALSE(BenchResultToJson(*r).contains("check"));
  CheckResult(*r, **model, false);
}

// --prefill-repeats: each reported prefill runs that many times; the result
// is the run of median time, with every run's tok/s in the result, the JSON
// and the table.
TEST(BenchTest, PrefillRepeatsReportTheMedianRun) {
  auto model = models::Deepseek2Model::Open(kDataDir + "dsv3-tiny-q8_0.gguf");
  ASSERT_TRUE(model.ok());
  auto pool = moe_backend::CreateCpuPool(1);
  ASSERT_TRUE(pool.ok());
  BenchOptions o = TinyOptions();
  o.prefill_repeats = 3;
  auto r = RunBenchmark(**model, **pool, nullptr, o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->prefill.size(), 2u);
  for (const PrefillResult& p : r->prefill) {
    SCOPED_TRACE(p.prompt_len);
    ASSERT_EQ(p.runs_tok_s.size(), 3u);
    std::vector<double> sorted = p.runs_tok_s;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_DOUBLE_EQ(p.tok_s, sorted[1]);
    EXPECT_NEAR(p.tok_s, p.prompt_len / p.seconds, 1e-9 * p.tok_s);
    EXPECT_GT(p.stages.ms_per_token_layer[static_cast<int>(Stage::kAttention)], 0.0);
  }
  const nlohmann::json j = BenchResultToJson(*r);
  EXPECT_EQ(j["config"]["prefill_repeats"].get<int>(), 3);
  EXPECT_EQ(j["prefill"][1]["runs_tok_s"].size(), 3u);
  const std::string table = FormatBenchTable(*r);
  EXPECT_NE(table.find("12 tokens: median of 3 runs"), std::string::npos) << table;
  // One run (the default): the single run, no median line.
  auto once = RunBenchmark(**model, **pool, nullptr, TinyOptions());
  ASSERT_TRUE(once.ok()) << once.status();
  EXPECT_EQ(once->prefill[1].runs_tok_s.size(), 1u);
  EXPECT_EQ(FormatBenchTable(*once).find("median of"), std::string::npos);
}

TEST(BenchTest, MedianRunIsTheLowerMiddleByTime) {
  EXPECT_EQ(MedianRunIndex({3.0}), 0u);
  EXPECT_EQ(MedianRunIndex({3.0, 1.0, 2.0}), 2u);
  EXPECT_EQ(MedianRunIndex({4.0, 1.0, 3.0, 2.0}), 3u);  // 1, 2 | 3, 4: the 2
  EXPECT_EQ(MedianRunIndex({2.0, 2.0, 1.0}), 0u);       // ties keep run order
  std::vector<PrefillResult> runs(3);
  for (int i = 0; i < 3; ++i) {
    runs[i].prompt_len = 100;
    runs[i].seconds = std::vector<double>{0.3, 0.1, 0.2}[i];
    runs[i].tok_s = 100 / runs[i].seconds;
  }
  const PrefillResult m = MedianPrefillRun(runs);
  EXPECT_DOUBLE_EQ(m.seconds, 0.2);
  EXPECT_EQ(m.runs_tok_s, (std::vector<double>{100 / 0.3, 100 / 0.1, 100 / 0.2}));
}

// A budget spent before the first phase ends: the decode context's prefill
// (always needed) runs, every later phase is skipped and named; on_phase sees
// the phase that ran.
TEST(BenchTest, TimeBudgetSkipsPhasesAndReportsThem) {
  auto model = models::Deepseek2Model::Open(kDataDir + "dsv3-tiny-q8_0.gguf");
  ASSERT_TRUE(model.ok());
  auto pool = moe_backend::CreateCpuPool(1);
  ASSERT_TRUE(pool.ok());
  BenchOptions o = TinyOptions();
  o.max_seconds = 1e-6;
  int phases = 0;
  o.on_phase = [&phases](const BenchResult& partial) {
    ++phases;
    EXPECT_FALSE(partial.complete);
  };
  auto r = RunBenchmark(**model, **pool, nullptr, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->complete);
  ASSERT_EQ(r->prefill.size(), 1u);
  EXPECT_EQ(r->prefill[0].prompt_len, 7);  // the decode context runs first
  EXPECT_TRUE(r->decode.empty());
  EXPECT_EQ(r->skipped,
            (std::vector<std::string>{"decode batch 1", "decode batch 3", "prefill 12"}));
  EXPECT_EQ(phases, 1);
  const nlohmann::json j = BenchResultToJson(*r);
  EXPECT_FALSE(j["complete"].get<bool>());
  EXPECT_EQ(j["skipped"].size(), 3u);
  EXPECT_TRUE(r->reduced.empty());
  EXPECT_NE(FormatBenchTable(*r).find("skipped (time budget): decode batch 1, decode batch 3"),
            std::string::npos);
}

TEST(BenchTest, DecodeStepsWithinBudget) {
  EXPECT_EQ(DecodeStepsWithinBudget(100, 0.5, 128), 128);  // 200 fit
  EXPECT_EQ(DecodeStepsWithinBudget(30, 0.5, 128), 60);
  EXPECT_EQ(DecodeStepsWithinBudget(3.9, 0.5, 128), 0);  // 7 < kMinDecodeSteps
  EXPECT_EQ(DecodeStepsWithinBudget(4.0, 0.5, 128), 8);
  EXPECT_EQ(DecodeStepsWithinBudget(2.0, 0.5, 4), 4);  // all fit
  EXPECT_EQ(DecodeStepsWithinBudget(1.5, 0.5, 4), 0);  // 3 of 4: below min(8, n_gen)
  EXPECT_EQ(DecodeStepsWithinBudget(-1, 0.5, 128), 0);
  EXPECT_EQ(DecodeStepsWithinBudget(10, 0, 128), 128);  // nothing known
}

TEST(BenchTest, PrefillEstimates) {
  EXPECT_EQ(EstimatePrefillSeconds({}, 512), 0.0);
  PrefillResult q512;
  q512.prompt_len = 512;
  q512.seconds = 10;
  // One length: per-token time x (1 + 4) / 2 at 4x the length; no growth below it.
  EXPECT_DOUBLE_EQ(EstimatePrefillSeconds({q512}, 2048), 2048 * (10.0 / 512) * 2.5);
  EXPECT_DOUBLE_EQ(EstimatePrefillSeconds({q512}, 256), 5.0);
  // Two lengths: a line through the per-token times 8 ms (128) and 12 ms (512).
  PrefillResult q128;
  q128.prompt_len = 128;
  q128.seconds = 128 * 0.008;
  q512.seconds = 512 * 0.012;
  EXPECT_NEAR(EstimatePrefillSeconds({q128, q512}, 2048), 2048 * (0.012 + 0.004 / 384 * 1536),
              1e-9);
  EXPECT_NEAR(EstimatePrefillSeconds({q512, q128}, 2048), 2048 * (0.012 + 0.004 / 384 * 1536),
              1e-9);  // any order
}

TEST(BenchTest, BadOptionsAreNamed) {
  auto model = models::Deepseek2Model::Open(kDataDir + "dsv3-tiny-q8_0.gguf");
  ASSERT_TRUE(model.ok());
  auto pool = moe_backend::CreateCpuPool(1);
  ASSERT_TRUE(pool.ok());
  struct Case {
    BenchOptions options;
    std::string words;
  };
  std::vector<Case> cases(9, {TinyOptions(), ""});
  cases[7].options.prefill_repeats = 0;
  cases[7].words = "--prefill-repeats";
  cases[8].options.prefill_repeats = 101;
  cases[8].words = "--prefill-repeats";
  cases[0].options.prompt_lens = {};
  cases[0].words = "--prompt-len";
  cases[1].options.prompt_lens = {8, 0};
  cases[1].words = "--prompt-len";
  cases[2].options.batch_sizes = {0};
  cases[2].words = "--batch";
  cases[3].options.n_gen = 0;
  cases[3].words = "--gen";
  cases[4].options.temperature = 0;
  cases[4].words = "temperature";
  cases[5].options.prompt_lens = {200000};
  cases[5].words = "context";
  cases[6].options.max_seconds = -1;
  cases[6].words = "--max-seconds";
  for (const Case& c : cases) {
    auto r = RunBenchmark(**model, **pool, nullptr, c.options);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.words;
    EXPECT_NE(r.status().message().find(c.words), std::string::npos) << r.status();
  }
}

TEST(BenchTest, ReadBandwidthIsMeasuredOnThePool) {
  auto pool = moe_backend::CreateCpuPool(0);
  ASSERT_TRUE(pool.ok());
  const ReadBandwidth bw = MeasureReadBandwidth(**pool, (8 << 20) + 1, 3);
  EXPECT_EQ(bw.bytes, 12u << 20);  // whole 4 MiB chunks
  EXPECT_EQ(bw.threads, (*pool)->num_workers());
  EXPECT_GT(bw.best_gbps, 0.1);
  EXPECT_LT(bw.best_gbps, 10000.0);
}

}  // namespace
}  // namespace ktx::bench
