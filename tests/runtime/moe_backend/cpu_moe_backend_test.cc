// CpuMoeBackend: the model with the fast CPU experts against the float64
// fixtures (tests/data/README.md section 6, tier B) for every CPU variant the
// host supports; each MoE layer against the ReferenceExpertBackend on the
// model's own activations within the kernel's stated tolerance (NMSE <= 1e-3,
// 1.5e-3 with the AMX tile prefill path: kernels/cpu/moe tests); results
// independent of the pool's thread count; held-expert masks; fallback; the
// tile prefill path (its scalar reference here) with one copy of the weights
// and the calibrated decode/prefill switch.
#include "runtime/moe_backend/cpu_moe_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/x86/cpu_variant.h"
#include "nlohmann/json.hpp"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/deepseek2.h"
#include "runtime/synth/synth_plan.h"
#include "runtime/synth/synth_writer.h"

namespace ktx::moe_backend {
namespace {

using kernels::CpuVariant;
using models::Activations;
using models::Deepseek2Model;
using models::Routing;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

const nlohmann::json& Manifest() {
  static const nlohmann::json* m = [] {
    std::ifstream in(kDataDir + "manifest.json");
    return new nlohmann::json(nlohmann::json::parse(in));
  }();
  return *m;
}

std::vector<float> LoadF32(const std::string& name) {
  std::ifstream in(kDataDir + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

std::vector<CpuVariant> HostVariants() {
  std::vector<CpuVariant> v;
  for (CpuVariant c : kernels::kAllCpuVariants) {
    if (kernels::HostSupportsCpuVariant(c)) v.push_back(c);
  }
  return v;
}

std::unique_ptr<runtime::CpuPool> Pool(int n_threads) {
  auto pool = CreateCpuPool(n_threads);
  EXPECT_TRUE(pool.ok()) << pool.status();
  return std::move(*pool);
}

std::unique_ptr<Deepseek2Model> OpenFixture(const std::string& type) {
  auto model = Deepseek2Model::Open(kDataDir + "dsv3-tiny-" + type + ".gguf");
  EXPECT_TRUE(model.ok()) << model.status();
  return std::move(*model);
}

CpuMoeBackendOptions Quiet(CpuVariant variant) {
  CpuMoeBackendOptions o;
  o.variant = variant;
  o.progress = ProgressMode::kOff;
  return o;
}

int64_t Argmax(const float* row, int64_t n) { return std::max_element(row, row + n) - row; }

// Tier B statistics of `got` against `want` ([n_rows, n_vocab]).
struct TierB {
  double rel_l2 = 0;
  double median_row_rel_l2 = 0;
  double argmax_agreement = 1;  // over rows with margin > 1.0
  int n_margin_rows = 0;
};

TierB Compare(const std::vector<float>& got, const std::vector<float>& want,
              const std::vector<double>& margins, int64_t n_vocab) {
  TierB s;
  const int64_t n_rows = static_cast<int64_t>(want.size()) / n_vocab;
  EXPECT_EQ(got.size(), want.size());
  EXPECT_EQ(static_cast<int64_t>(margins.size()), n_rows);
  double diff_all = 0, ref_all = 0;
  std::vector<double> rows;
  int agree = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    double diff = 0, ref = 0;
    for (int64_t i = 0; i < n_vocab; ++i) {
      const double d = static_cast<double>(got[r * n_vocab + i]) - want[r * n_vocab + i];
      diff += d * d;
      ref += static_cast<double>(want[r * n_vocab + i]) * want[r * n_vocab + i];
    }
    diff_all += diff;
    ref_all += ref;
    rows.push_back(std::sqrt(diff / ref));
    if (margins[r] > 1.0) {
      ++s.n_margin_rows;
      agree += Argmax(&got[r * n_vocab], n_vocab) == Argmax(&want[r * n_vocab], n_vocab);
    }
  }
  s.rel_l2 = std::sqrt(diff_all / ref_all);
  std::sort(rows.begin(), rows.end());
  s.median_row_rel_l2 = rows.size() % 2 ? rows[rows.size() / 2]
                                        : 0.5 * (rows[rows.size() / 2 - 1] + rows[rows.size() / 2]);
  s.argmax_agreement = s.n_margin_rows ? static_cast<double>(agree) / s.n_margin_rows : 1.0;
  return s;
}

// Prompt as one batch (all rows), then the greedy tokens one at a time
// (teacher forcing): the logits of all 97 rows, [97, n_vocab].
std::vector<float> TeacherForced(const Deepseek2Model& model, const std::string& type) {
  const auto prompt = Manifest()["prompt_tokens"].get<std::vector<int32_t>>();
  const auto gen = Manifest()["files"][type]["llama_greedy_tokens"].get<std::vector<int32_t>>();
  auto kv = kv_cache::SequenceKv::Create(model.kv_layout(), 128);
  EXPECT_TRUE(kv.ok());
  Activations logits;
  EXPECT_TRUE(model.Forward(prompt, kv->get(), models::LogitsRows::kAll, &logits).ok());
  std::vector<float> all = logits.ToVector();
  for (int32_t token : gen) {
    const int32_t one[] = {token};
    EXPECT_TRUE(model.Forward(one, kv->get(), models::LogitsRows::kLast, &logits).ok());
    all.insert(all.end(), logits.values().begin(), logits.values().end());
  }
  return all;
}

struct Case {
  std::string type;
  CpuVariant variant;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.type << "/" << kernels::CpuVariantName(c.variant);
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return info.param.type + "_" + kernels::CpuVariantName(info.param.variant);
}

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  for (const char* type : {"bf16", "q8_0", "q4_k_m"}) {
    for (CpuVariant v : HostVariants()) cases.push_back({type, v});
  }
  return cases;
}

class CpuMoeBackendFixtureTest : public ::testing::TestWithParam<Case> {};

// Tier B bounds of README section 6, and the backend really ran.
TEST_P(CpuMoeBackendFixtureTest, ModelMatchesFloat64ReferenceWithinTierB) {
  const Case& c = GetParam();
  auto model = OpenFixture(c.type);
  auto pool = Pool(0);
  auto backend = CpuMoeBackend::Create(*model, pool.get(), Quiet(c.variant));
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->load_stats().n_fast_layers, 2);
  EXPECT_EQ((*backend)->load_stats().n_reference_layers, 0);
  EXPECT_EQ((*backend)->variant(), c.variant);
  model->SetExpertBackend(backend->get());
  const std::vector<float> got = TeacherForced(*model, c.type);
  const CpuMoeRunStats stats = (*backend)->run_stats();
  EXPECT_EQ(stats.calls, 2 * (1 + 32));  // two MoE layers, 33 forward passes
  EXPECT_EQ(stats.tokens, 2 * (65 + 32));
  EXPECT_GT(stats.weight_bytes, 0);

  const auto& files = Manifest()["files"][c.type];
  std::vector<float> want = LoadF32(files["ref64_prompt_logits"]["file"]);
  const std::vector<float> want_gen = LoadF32(files["ref64_gen_logits"]["file"]);
  want.insert(want.end(), want_gen.begin(), want_gen.end());
  std::vector<double> margins = files["ref64_prompt_top2_margin"].get<std::vector<double>>();
  const auto gen_margins = files["ref64_gen_top2_margin"].get<std::vector<double>>();
  margins.insert(margins.end(), gen_margins.begin(), gen_margins.end());
  const int64_t n_vocab = Manifest()["n_vocab"].get<int64_t>();
  const TierB s = Compare(got, want, margins, n_vocab);
  std::printf(
      "[ measured ] %s/%s: rel L2 %.3e, median row rel L2 %.3e, argmax agreement %.3f "
      "(%d rows with margin > 1)\n",
      c.type.c_str(), kernels::CpuVariantName(c.variant), s.rel_l2, s.median_row_rel_l2,
      s.argmax_agreement, s.n_margin_rows);
  struct Bound {
    const char* type;
    double rel_l2, median;
  };
  const Bound bounds[] = {{"bf16", 0.16, 0.022}, {"q8_0", 0.23, 0.046}, {"q4_k_m", 0.30, 0.074}};
  for (const Bound& b : bounds) {
    if (c.type != b.type) continue;
    EXPECT_LE(s.rel_l2, b.rel_l2);
    EXPECT_LE(s.median_row_rel_l2, b.median);
  }
  EXPECT_GE(s.argmax_agreement, 0.90);
  // Not the reference path in disguise: the activations were rounded.
  model->SetExpertBackend(nullptr);
  const std::vector<float> ref = TeacherForced(*model, c.type);
  EXPECT_NE(0, std::memcmp(ref.data(), got.data(), ref.size() * sizeof(float)));
}

// The model's FFN input of every layer for the prompt (reference path):
// h [65, n_embd] and its routing, per MoE layer.
struct LayerInput {
  int il = 0;
  Activations h;
  Routing routing;
};

std::vector<LayerInput> CaptureMoeInputs(const Deepseek2Model& model) {
  const auto prompt = Manifest()["prompt_tokens"].get<std::vector<int32_t>>();
  auto kv = kv_cache::SequenceKv::Create(model.kv_layout(), 128);
  EXPECT_TRUE(kv.ok());
  std::vector<int32_t> pos(prompt.size());
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<int32_t>(i);
  std::vector<LayerInput> out;
  Activations x, h, f, s;
  EXPECT_TRUE(model.Embed(prompt, &x).ok());
  for (int il = 0; il < model.hparams().n_layer; ++il) {
    EXPECT_TRUE(model.AttentionBlock(il, pos, kv->get(), &x).ok());
    EXPECT_TRUE(model.FfnNorm(il, x, &h).ok());
    if (!model.hparams().IsMoeLayer(il)) {
      EXPECT_TRUE(model.DenseFfn(il, h, &f).ok());
      const Activations* parts[] = {&f};
      EXPECT_TRUE(model.Combine(parts, &x).ok());
      continue;
    }
    LayerInput& in = out.emplace_back();
    in.il = il;
    in.h = h;
    EXPECT_TRUE(model.Route(il, h, &in.routing).ok());
    models::ReferenceExpertBackend ref(model.hparams(), model.weights());
    EXPECT_TRUE(ref.Compute(il, h, in.routing, {}, &f).ok());
    EXPECT_TRUE(model.SharedExperts(il, h, &s).ok());
    const Activations* parts[] = {&f, &s};
    EXPECT_TRUE(model.Combine(parts, &x).ok());
  }
  return out;
}

double Nmse(const Activations& got, const Activations& want) {
  double d = 0, r = 0;
  for (size_t i = 0; i < want.values().size(); ++i) {
    const double e = static_cast<double>(got.values()[i]) - want.values()[i];
    d += e * e;
    r += static_cast<double>(want.values()[i]) * want.values()[i];
  }
  return d / r;
}

// Every MoE layer, full and under expert masks, against the reference backend
// on the model's own activations.
TEST_P(CpuMoeBackendFixtureTest, EachLayerMatchesTheReferenceBackend) {
  const Case& c = GetParam();
  auto model = OpenFixture(c.type);
  auto pool = Pool(0);
  auto backend = CpuMoeBackend::Create(*model, pool.get(), Quiet(c.variant));
  ASSERT_TRUE(backend.ok()) << backend.status();
  models::ReferenceExpertBackend ref(model->hparams(), model->weights());
  const double tol = (*backend)->load_stats().prefill_form ? 1.5e-3 : 1e-3;
  const int n_expert = model->hparams().n_expert;
  std::vector<uint8_t> even(n_expert), odd(n_expert);
  for (int e = 0; e < n_expert; ++e) (e % 2 ? odd : even)[e] = 1;
  for (const LayerInput& in : CaptureMoeInputs(*model)) {
    const std::vector<uint8_t>* masks[] = {nullptr, &even, &odd};
    for (const std::vector<uint8_t>* mask : masks) {
      std::span<const uint8_t> m;
      if (mask != nullptr) m = *mask;
      Activations want, got;
      ASSERT_TRUE(ref.Compute(in.il, in.h, in.routing, m, &want).ok());
      ASSERT_TRUE((*backend)->Compute(in.il, in.h, in.routing, m, &got).ok());
      ASSERT_EQ(got.n_tokens(), want.n_tokens());
      ASSERT_EQ(got.n_cols(), want.n_cols());
      const double nmse = Nmse(got, want);
      std::printf("[ measured ] %s/%s layer %d mask %s: NMSE %.2e\n", c.type.c_str(),
                  kernels::CpuVariantName(c.variant), in.il,
                  mask == nullptr ? "all"
                  : mask == &even ? "even"
                                  : "odd",
                  nmse);
      EXPECT_LT(nmse, tol) << "layer " << in.il;
    }
    // The two halves add up to the whole (fp32 rounding of one more sum).
    Activations all, a, b;
    ASSERT_TRUE((*backend)->Compute(in.il, in.h, in.routing, {}, &all).ok());
    ASSERT_TRUE((*backend)->Compute(in.il, in.h, in.routing, even, &a).ok());
    ASSERT_TRUE((*backend)->Compute(in.il, in.h, in.routing, odd, &b).ok());
    for (size_t i = 0; i < a.values().size(); ++i) a.data()[i] += b.values()[i];
    EXPECT_LT(Nmse(a, all), 1e-10);
  }
}

INSTANTIATE_TEST_SUITE_P(FixturesAndVariants, CpuMoeBackendFixtureTest,
                         ::testing::ValuesIn(AllCases()), CaseName);

// Bitwise the same logits with 1 worker and with every cpu, for each variant;
// and the same with the batch split into kernel runs of 7 tokens (except where
// the amx prefill form makes the per-expert token count matter).
TEST(CpuMoeBackendTest, ResultsIndependentOfThreadCountAndChunking) {
  auto model = OpenFixture("q4_k_m");
  for (CpuVariant v : HostVariants()) {
    std::vector<std::vector<float>> runs;
    for (int threads : {1, 0}) {
      for (int64_t max_tokens : {int64_t{512}, int64_t{7}}) {
        auto pool = Pool(threads);
        CpuMoeBackendOptions o = Quiet(v);
        o.max_tokens = max_tokens;
        o.amx_prefill = false;
        auto backend = CpuMoeBackend::Create(*model, pool.get(), o);
        ASSERT_TRUE(backend.ok()) << backend.status();
        model->SetExpertBackend(backend->get());
        runs.push_back(TeacherForced(*model, "q4_k_m"));
        model->SetExpertBackend(nullptr);
        if (max_tokens == 7) {
          EXPECT_GT((*backend)->run_stats().runs, (*backend)->run_stats().calls);
        }
      }
    }
    for (size_t i = 1; i < runs.size(); ++i) {
      ASSERT_EQ(runs[i].size(), runs[0].size());
      EXPECT_EQ(0, std::memcmp(runs[i].data(), runs[0].data(), runs[0].size() * sizeof(float)))
          << kernels::CpuVariantName(v) << " run " << i;
    }
  }
}

// A shard holding only the even experts: half the bytes, the same partial
// sums as a full backend under the even mask, and an error when asked for an
// expert it does not hold.
TEST(CpuMoeBackendTest, HeldExpertsOnly) {
  auto model = OpenFixture("q8_0");
  auto pool = Pool(0);
  const int n_layer = model->hparams().n_layer;
  const int n_expert = model->hparams().n_expert;
  std::vector<std::vector<int>> held(n_layer);
  for (int il = 1; il < n_layer; ++il) {
    for (int e = 0; e < n_expert; e += 2) held[il].push_back(e);
  }
  auto masks = OwnedExpertMasks(held, n_expert);
  ASSERT_TRUE(masks.ok());
  CpuMoeBackendOptions o = Quiet(kernels::ActiveCpuVariant());
  o.owned_experts = *masks;
  auto shard = CpuMoeBackend::Create(*model, pool.get(), o);
  ASSERT_TRUE(shard.ok()) << shard.status();
  auto full = CpuMoeBackend::Create(*model, pool.get(), Quiet(kernels::ActiveCpuVariant()));
  ASSERT_TRUE(full.ok());
  EXPECT_EQ((*shard)->load_stats().n_experts_held, 2 * n_expert / 2);
  EXPECT_EQ(2 * (*shard)->load_stats().repacked_bytes, (*full)->load_stats().repacked_bytes);
  EXPECT_TRUE((*shard)->Holds(1, 4));
  EXPECT_FALSE((*shard)->Holds(1, 5));
  EXPECT_FALSE((*shard)->Holds(0, 0));  // dense layer

  std::vector<uint8_t> even(n_expert);
  for (int e = 0; e < n_expert; e += 2) even[e] = 1;
  for (const LayerInput& in : CaptureMoeInputs(*model)) {
    Activations a, b;
    ASSERT_TRUE((*shard)->Compute(in.il, in.h, in.routing, even, &a).ok());
    ASSERT_TRUE((*full)->Compute(in.il, in.h, in.routing, even, &b).ok());
    EXPECT_EQ(a.values(), b.values());
    // An output buffer with stale contents (a recycled one) is fully
    // overwritten: the kernels write every element.
    Activations stale(in.h.n_tokens(), in.h.n_cols());
    std::fill(stale.data(), stale.data() + stale.values().size(),
              std::numeric_limits<float>::quiet_NaN());
    ASSERT_TRUE((*full)->Compute(in.il, in.h, in.routing, even, &stale).ok());
    EXPECT_EQ(0, std::memcmp(stale.data(), b.data(), b.values().size() * sizeof(float)));
    const absl::Status s = (*shard)->Compute(in.il, in.h, in.routing, {}, &a);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_NE(s.message().find("layer " + std::to_string(in.il)), std::string::npos) << s;
  }
}

// The gguf decode layout (kernels read the mapping, nothing copied) is within
// the same tolerance.
TEST(CpuMoeBackendTest, GgufLayoutReadsTheMapping) {
  auto model = OpenFixture("q4_k_m");
  auto pool = Pool(0);
  CpuMoeBackendOptions o = Quiet(kernels::ActiveCpuVariant());
  o.decode_layout = kernels::moe::MoeWeightLayout::kGguf;
  o.amx_prefill = false;
  auto backend = CpuMoeBackend::Create(*model, pool.get(), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->load_stats().repacked_bytes, 0u);
  models::ReferenceExpertBackend ref(model->hparams(), model->weights());
  for (const LayerInput& in : CaptureMoeInputs(*model)) {
    Activations want, got;
    ASSERT_TRUE(ref.Compute(in.il, in.h, in.routing, {}, &want).ok());
    ASSERT_TRUE((*backend)->Compute(in.il, in.h, in.routing, {}, &got).ok());
    EXPECT_LT(Nmse(got, want), 1e-3);
  }
}

TEST(CpuMoeBackendTest, BadOptionsAndInputsAreNamed) {
  auto model = OpenFixture("q8_0");
  auto pool = Pool(0);
  CpuMoeBackendOptions o = Quiet(kernels::ActiveCpuVariant());
  o.owned_experts.resize(2);
  auto b = CpuMoeBackend::Create(*model, pool.get(), o);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(b.status().message().find("owned_experts"), std::string::npos) << b.status();
  o.owned_experts.assign(3, std::vector<uint8_t>(5, 1));
  EXPECT_FALSE(CpuMoeBackend::Create(*model, pool.get(), o).ok());
  o = Quiet(kernels::ActiveCpuVariant());
  o.max_tokens = 0;
  EXPECT_FALSE(CpuMoeBackend::Create(*model, pool.get(), o).ok());
  if (!kernels::HostSupportsCpuVariant(CpuVariant::kAmx)) {
    auto amx = CpuMoeBackend::Create(*model, pool.get(), Quiet(CpuVariant::kAmx));
    EXPECT_EQ(amx.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(amx.status().message().find("amx"), std::string::npos) << amx.status();
  }
  EXPECT_FALSE(CpuMoeBackend::Create(*model, nullptr).ok());

  auto backend = CpuMoeBackend::Create(*model, pool.get(), Quiet(kernels::ActiveCpuVariant()));
  ASSERT_TRUE(backend.ok());
  const std::vector<LayerInput> inputs = CaptureMoeInputs(*model);
  const LayerInput& in = inputs.front();
  Activations out;
  EXPECT_EQ((*backend)->Compute(0, in.h, in.routing, {}, &out).code(),
            absl::StatusCode::kInvalidArgument);  // dense layer
  std::vector<uint8_t> short_mask(3, 1);
  EXPECT_EQ((*backend)->Compute(in.il, in.h, in.routing, short_mask, &out).code(),
            absl::StatusCode::kInvalidArgument);
  Routing bad = in.routing;
  bad.expert_ids[5] = 99;
  EXPECT_EQ((*backend)->Compute(in.il, in.h, bad, {}, &out).code(),
            absl::StatusCode::kInvalidArgument);
  Activations narrow(in.h.n_tokens(), 128);
  EXPECT_EQ((*backend)->Compute(in.il, narrow, in.routing, {}, &out).code(),
            absl::StatusCode::kInvalidArgument);
  // An empty batch gives an empty output.
  Routing none;
  none.n_expert_used = in.routing.n_expert_used;
  ASSERT_TRUE((*backend)->Compute(in.il, Activations(0, in.h.n_cols()), none, {}, &out).ok());
  EXPECT_EQ(out.n_tokens(), 0);

  EXPECT_TRUE(*ParseExpertsFlag("fast"));
  EXPECT_FALSE(*ParseExpertsFlag("reference"));
  EXPECT_FALSE(ParseExpertsFlag("slow").ok());
  EXPECT_FALSE(CreateCpuPool(-1).ok());
  EXPECT_FALSE(OwnedExpertMasks({{0, 16}}, 16).ok());
}

// A synthetic model whose expert width (384) the kernels cannot run (not a
// multiple of 256; llama-quantize's fallback types): reference fallback with
// reference results, or an error naming the layer without fallback.
TEST(CpuMoeBackendTest, UnsupportedLayersFallBackToTheReference) {
  auto config = synth::MakeConfig(synth::Preset::kTiny, {});
  ASSERT_TRUE(config.ok());
  config->n_ff_exp = 384;
  auto plan = synth::PlanModel(*config, synth::Quant::kQ4_K_M);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto bytes = synth::WriteSynthModelToMemory(*plan, {});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto file = gguf::GgufFile::FromMemory(bytes->data(), bytes->size(), "synth384.gguf");
  ASSERT_TRUE(file.ok()) << file.status();
  auto model = Deepseek2Model::Load(std::move(*file));
  ASSERT_TRUE(model.ok()) << model.status();
  auto pool = Pool(0);
  CpuMoeBackendOptions o = Quiet(kernels::ActiveCpuVariant());
  o.allow_reference_fallback = false;
  auto strict = CpuMoeBackend::Create(**model, pool.get(), o);
  EXPECT_EQ(strict.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(strict.status().message().find("layer 1"), std::string::npos) << strict.status();
  o.allow_reference_fallback = true;
  auto backend = CpuMoeBackend::Create(**model, pool.get(), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->load_stats().n_fast_layers, 0);
  EXPECT_EQ((*backend)->load_stats().n_reference_layers, 2);
  EXPECT_FALSE((*backend)->IsFastLayer(1));
  const std::vector<int32_t> tokens = {0, 17, 300, 42, 5};
  auto kv1 = kv_cache::SequenceKv::Create((*model)->kv_layout(), 16);
  auto kv2 = kv_cache::SequenceKv::Create((*model)->kv_layout(), 16);
  Activations a, b;
  ASSERT_TRUE((*model)->Forward(tokens, kv1->get(), models::LogitsRows::kAll, &a).ok());
  (*model)->SetExpertBackend(backend->get());
  ASSERT_TRUE((*model)->Forward(tokens, kv2->get(), models::LogitsRows::kAll, &b).ok());
  (*model)->SetExpertBackend(nullptr);
  EXPECT_EQ(a.values(), b.values());
}

// The tile prefill path wired through the backend (the scalar variant's
// reference of the AMX contract, so that it runs on any host): every layer
// within the tile path's bound of the reference backend with every expert on
// the tile path, one copy of the weights (panel16: at most 1.03x the GGUF
// expert bytes).
TEST(CpuMoeBackendTest, TilePrefillPathOnOneCopy) {
  for (const std::string type : {"q4_k_m", "q8_0"}) {
    auto model = OpenFixture(type);
    auto pool = Pool(0);
    CpuMoeBackendOptions o = Quiet(CpuVariant::kScalar);
    o.scalar_tile_reference = true;
    o.prefill_min_tokens = 1;
    auto backend = CpuMoeBackend::Create(*model, pool.get(), o);
    ASSERT_TRUE(backend.ok()) << backend.status();
    const CpuMoeLoadStats& ls = (*backend)->load_stats();
    EXPECT_TRUE(ls.prefill_form);
    EXPECT_EQ(ls.prefill_min_tokens, 1);
    EXPECT_EQ(ls.prefill_switch, "option");
    EXPECT_GT(ls.gguf_bytes, 0u);
    EXPECT_LE(static_cast<double>(ls.repacked_bytes), 1.03 * static_cast<double>(ls.gguf_bytes));
    EXPECT_GE(ls.repacked_bytes, ls.gguf_bytes);
    models::ReferenceExpertBackend ref(model->hparams(), model->weights());
    for (const LayerInput& in : CaptureMoeInputs(*model)) {
      Activations want, got;
      (*backend)->ResetRunStats();
      ASSERT_TRUE(ref.Compute(in.il, in.h, in.routing, {}, &want).ok());
      ASSERT_TRUE((*backend)->Compute(in.il, in.h, in.routing, {}, &got).ok());
      const CpuMoeRunStats rs = (*backend)->run_stats();
      EXPECT_EQ(rs.prefill_experts, rs.active_experts);
      const double nmse = Nmse(got, want);
      std::printf("[ measured ] %s tile path (scalar reference) layer %d: NMSE %.2e\n",
                  type.c_str(), in.il, nmse);
      EXPECT_LT(nmse, 1.5e-3) << "layer " << in.il;
    }
  }
}

// Tile caches (tile_cache / KTX_MOE_TILE_CACHE=1) on a synthetic model whose
// widths take tile groups of 512: bitwise the results of converting on the
// fly, every tile-path expert reading its cache, the memory reported; on the
// 256-wide fixtures (groups of 256) none is built; a bad variable is refused.
TEST(CpuMoeBackendTest, TileCachesGiveTheBitsOfTheConversion) {
  auto config = synth::MakeConfig(synth::Preset::kTiny, {});
  ASSERT_TRUE(config.ok());
  config->n_embd = 512;
  config->n_ff_exp = 512;
  auto plan = synth::PlanModel(*config, synth::Quant::kQ4_K_M);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto bytes = synth::WriteSynthModelToMemory(*plan, {});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto file = gguf::GgufFile::FromMemory(bytes->data(), bytes->size(), "synth512.gguf");
  ASSERT_TRUE(file.ok()) << file.status();
  auto model = Deepseek2Model::Load(std::move(*file));
  ASSERT_TRUE(model.ok()) << model.status();
  auto pool = Pool(0);
  unsetenv("KTX_MOE_TILE_CACHE");
  CpuMoeBackendOptions o = Quiet(CpuVariant::kScalar);
  o.scalar_tile_reference = true;
  o.prefill_min_tokens = 2;
  auto plain = CpuMoeBackend::Create(**model, pool.get(), o);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ((*plain)->load_stats().tile_cache_bytes, 0u);
  setenv("KTX_MOE_TILE_CACHE", "1", 1);
  auto cached = CpuMoeBackend::Create(**model, pool.get(), o);
  unsetenv("KTX_MOE_TILE_CACHE");
  ASSERT_TRUE(cached.ok()) << cached.status();
  const CpuMoeLoadStats& ls = (*cached)->load_stats();
  // 8256 bytes per 16 rows x 512 k: 1.008 bytes per weight of the held experts.
  const auto& hp = (*model)->hparams();
  const uint64_t weights_held =
      static_cast<uint64_t>(ls.n_experts_held) * 3 * hp.n_embd * hp.n_ff_exp;
  EXPECT_EQ(ls.tile_cache_bytes, weights_held / (16 * 512) * 8256);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    const int64_t n = 40;
    Activations h(n, hp.n_embd);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t i = 0; i < hp.n_embd; ++i) h.row(t)[i] = normal(rng);
    }
    Routing r;
    r.n_tokens = n;
    r.n_expert_used = static_cast<int32_t>(hp.n_expert_used);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t k = 0; k < hp.n_expert_used; ++k) {  // experts 0..3 get most tokens
        r.expert_ids.push_back(static_cast<int32_t>((t % 4 + 3 * k) % hp.n_expert));
        r.weights.push_back(0.25f);
      }
    }
    Activations want, got;
    const absl::Status st = (*plain)->Compute(il, h, r, {}, &want);
    ASSERT_TRUE(st.ok()) << st;
    (*cached)->ResetRunStats();
    ASSERT_TRUE((*cached)->Compute(il, h, r, {}, &got).ok());
    const CpuMoeRunStats rs = (*cached)->run_stats();
    EXPECT_GT(rs.prefill_experts, 0);
    EXPECT_EQ(rs.cached_experts, rs.prefill_experts) << "layer " << il;
    EXPECT_EQ(want.values(), got.values()) << "layer " << il;
  }
  // Groups of 256 (the fixtures): no cache, a warning, the backend works.
  auto fixture = OpenFixture("q4_k_m");
  o.tile_cache = true;
  auto narrow = CpuMoeBackend::Create(*fixture, pool.get(), o);
  ASSERT_TRUE(narrow.ok()) << narrow.status();
  EXPECT_EQ((*narrow)->load_stats().tile_cache_bytes, 0u);
  setenv("KTX_MOE_TILE_CACHE", "yes", 1);
  auto bad = CpuMoeBackend::Create(*fixture, pool.get(), o);
  unsetenv("KTX_MOE_TILE_CACHE");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("KTX_MOE_TILE_CACHE"), std::string::npos) << bad.status();
}

// prefill_min_tokens = 0: the switch is measured at load (once per process
// and layer shape; a second backend reuses it), or taken from
// KTX_MOE_PREFILL_MIN_TOKENS.
TEST(CpuMoeBackendTest, PrefillSwitchIsCalibratedOnceOrGiven) {
  auto model = OpenFixture("q4_k_m");
  auto pool = Pool(0);
  unsetenv("KTX_MOE_PREFILL_MIN_TOKENS");
  CpuMoeBackendOptions o = Quiet(CpuVariant::kScalar);
  o.scalar_tile_reference = true;
  o.max_tokens = 24;
  auto a = CpuMoeBackend::Create(*model, pool.get(), o);
  ASSERT_TRUE(a.ok()) << a.status();
  const CpuMoeLoadStats& la = (*a)->load_stats();
  EXPECT_EQ(la.prefill_switch, "calibrated");
  ASSERT_EQ(la.calibration.size(), 9u);  // 1, 2, 3, 4, 6, 8, 12, 16, 24 tokens per expert
  EXPECT_EQ(la.calibration.back().tokens_per_expert, 24);
  for (const auto& p : la.calibration) {
    EXPECT_GT(p.decode_ms, 0.0);
    EXPECT_GT(p.tile_ms, 0.0);
    std::printf("[ measured ] scalar, %lld tokens per expert: decode %.3f ms, tile %.3f ms\n",
                static_cast<long long>(p.tokens_per_expert), p.decode_ms, p.tile_ms);
  }
  // The crossing: from it on the tile path is never slower (or past the grid).
  EXPECT_GE(la.prefill_min_tokens, 1);
  EXPECT_LE(la.prefill_min_tokens, 25);
  for (const auto& p : la.calibration) {
    if (p.tokens_per_expert >= la.prefill_min_tokens) {
      EXPECT_LE(p.tile_ms, p.decode_ms);
    }
  }
  auto b = CpuMoeBackend::Create(*model, pool.get(), o);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->load_stats().prefill_switch, "calibrated (earlier in this process)");
  EXPECT_EQ((*b)->load_stats().prefill_min_tokens, la.prefill_min_tokens);

  setenv("KTX_MOE_PREFILL_MIN_TOKENS", "5", 1);
  auto c = CpuMoeBackend::Create(*model, pool.get(), o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->load_stats().prefill_min_tokens, 5);
  EXPECT_EQ((*c)->load_stats().prefill_switch, "KTX_MOE_PREFILL_MIN_TOKENS");
  EXPECT_TRUE((*c)->load_stats().calibration.empty());
  setenv("KTX_MOE_PREFILL_MIN_TOKENS", "five", 1);
  auto bad = CpuMoeBackend::Create(*model, pool.get(), o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("KTX_MOE_PREFILL_MIN_TOKENS"), std::string::npos)
      << bad.status();
  unsetenv("KTX_MOE_PREFILL_MIN_TOKENS");
  // Without a tile path there is no switch.
  CpuMoeBackendOptions plain = Quiet(CpuVariant::kScalar);
  auto d = CpuMoeBackend::Create(*model, pool.get(), plain);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ((*d)->load_stats().prefill_switch, "none");
  EXPECT_EQ((*d)->load_stats().prefill_min_tokens, 0);
  EXPECT_FALSE((*d)->load_stats().prefill_form);
}

// BF16 experts re-quantized at load (requantize_bf16 / KTX_MOE_REQUANT_BF16):
// held in the target's panel16 bytes (Q8_0 34 and Q4_K 148 bytes per 32 / 256
// weights against BF16's 64 / 512), each layer within the re-quantization's
// error of the BF16 reference backend (Q4_K coarser than Q8_0), and the
// model's prompt logits, against the BF16 file's float64 reference, within
// what llama.cpp's quantization of the whole model to that type moved them
// (its q8_0 / q4_k_m fixture's reference against the BF16 one) plus the BF16
// kernels' own tier B bound (0.16 / 0.022): by the triangle inequality the
// deviation is at most the kernels' rounding plus the re-quantization's, and
// re-quantizing only the experts should move the logits no more than
// quantizing every matrix does. Bad values are named.
TEST(CpuMoeBackendTest, Bf16ExpertsRequantizedAtLoad) {
  auto model = OpenFixture("bf16");
  auto pool = Pool(0);
  unsetenv("KTX_MOE_REQUANT_BF16");
  const int64_t n_vocab = Manifest()["n_vocab"].get<int64_t>();
  const auto& files = Manifest()["files"];
  const std::vector<float> want = LoadF32(files["bf16"]["ref64_prompt_logits"]["file"]);
  const auto margins = files["bf16"]["ref64_prompt_top2_margin"].get<std::vector<double>>();
  const std::vector<LayerInput> inputs = CaptureMoeInputs(*model);
  models::ReferenceExpertBackend ref(model->hparams(), model->weights());
  struct Target {
    kernels::TensorType type;
    const char* name;
    const char* fixture;  // llama.cpp's quantization of the same model
    double bytes_ratio;
  };
  const Target targets[] = {{kernels::TensorType::kQ8_0, "q8_0", "q8_0", 34.0 / 64},
                            {kernels::TensorType::kQ4_K, "q4_K", "q4_k_m", 148.0 / 512}};
  double q8_nmse = 0;
  for (const Target& t : targets) {
    SCOPED_TRACE(t.name);
    CpuMoeBackendOptions o = Quiet(kernels::ActiveCpuVariant());
    o.requantize_bf16 = t.type;
    auto backend = CpuMoeBackend::Create(*model, pool.get(), o);
    ASSERT_TRUE(backend.ok()) << backend.status();
    const CpuMoeLoadStats& ls = (*backend)->load_stats();
    EXPECT_EQ(ls.requantized_bf16, t.name);
    EXPECT_EQ(ls.n_fast_layers, 2);
    EXPECT_DOUBLE_EQ(static_cast<double>(ls.repacked_bytes) / ls.gguf_bytes, t.bytes_ratio);
    double worst = 0;
    for (const LayerInput& in : inputs) {
      Activations w, g;
      ASSERT_TRUE(ref.Compute(in.il, in.h, in.routing, {}, &w).ok());
      ASSERT_TRUE((*backend)->Compute(in.il, in.h, in.routing, {}, &g).ok());
      worst = std::max(worst, Nmse(g, w));
    }
    std::printf("[ measured ] bf16 experts as %s: worst layer NMSE %.2e vs the BF16 reference\n",
                t.name, worst);
    EXPECT_LT(worst, ExpertsNmseBound(ls));
    EXPECT_GT(ExpertsNmseBound(ls), (ls.prefill_form ? 1.5e-3 : 1e-3));
    if (t.type == kernels::TensorType::kQ8_0) q8_nmse = worst;
    if (t.type == kernels::TensorType::kQ4_K) {
      EXPECT_GT(worst, 4 * q8_nmse);  // really 4-bit
    }
    model->SetExpertBackend(backend->get());
    std::vector<float> got = TeacherForced(*model, "bf16");
    model->SetExpertBackend(nullptr);
    got.resize(want.size());  // the prompt's rows
    const TierB s = Compare(got, want, margins, n_vocab);
    const TierB llama =
        Compare(LoadF32(files[t.fixture]["ref64_prompt_logits"]["file"]), want, margins, n_vocab);
    std::printf(
        "[ measured ] bf16 experts as %s: prompt rel L2 %.3e, median row rel L2 %.3e, "
        "argmax agreement %.3f; llama.cpp's %s file: %.3e, %.3e, %.3f\n",
        t.name, s.rel_l2, s.median_row_rel_l2, s.argmax_agreement, t.fixture, llama.rel_l2,
        llama.median_row_rel_l2, llama.argmax_agreement);
    EXPECT_LE(s.rel_l2, llama.rel_l2 + 0.16);
    EXPECT_LE(s.median_row_rel_l2, llama.median_row_rel_l2 + 0.022);
    EXPECT_GE(s.argmax_agreement, 0.90);
  }
  // The environment does the same; other values are named.
  setenv("KTX_MOE_REQUANT_BF16", "Q4_K", 1);
  auto env = CpuMoeBackend::Create(*model, pool.get(), Quiet(CpuVariant::kScalar));
  ASSERT_TRUE(env.ok()) << env.status();
  EXPECT_EQ((*env)->load_stats().requantized_bf16, "q4_K");
  setenv("KTX_MOE_REQUANT_BF16", "int3", 1);
  auto bad_env = CpuMoeBackend::Create(*model, pool.get(), Quiet(CpuVariant::kScalar));
  EXPECT_EQ(bad_env.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_env.status().message().find("KTX_MOE_REQUANT_BF16=int3"), std::string::npos)
      << bad_env.status();
  setenv("KTX_MOE_REQUANT_BF16", "bf16", 1);
  auto keep = CpuMoeBackend::Create(*model, pool.get(), Quiet(CpuVariant::kScalar));
  ASSERT_TRUE(keep.ok()) << keep.status();
  EXPECT_TRUE((*keep)->load_stats().requantized_bf16.empty());
  unsetenv("KTX_MOE_REQUANT_BF16");
  CpuMoeBackendOptions o = Quiet(CpuVariant::kScalar);
  o.requantize_bf16 = kernels::TensorType::kQ4_0;
  auto bad = CpuMoeBackend::Create(*model, pool.get(), o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("requantize_bf16"), std::string::npos) << bad.status();
  o.requantize_bf16 = kernels::TensorType::kQ8_0;
  o.decode_layout = kernels::moe::MoeWeightLayout::kGguf;
  auto gguf = CpuMoeBackend::Create(*model, pool.get(), o);
  EXPECT_EQ(gguf.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(gguf.status().message().find("panel16"), std::string::npos) << gguf.status();
  // A file without BF16 experts has nothing to re-quantize.
  auto q4 = OpenFixture("q4_k_m");
  o.decode_layout = kernels::moe::MoeWeightLayout::kPanel16;
  auto none = CpuMoeBackend::Create(*q4, pool.get(), o);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE((*none)->load_stats().requantized_bf16.empty());
}

// The crossing rule of both calibrations: the smallest count from which the
// second path is never slower again, past the grid when it never wins.
TEST(CpuMoeBackendTest, SwitchCrossingIsWhereTheSecondPathStaysFaster) {
  using P = CpuMoeLoadStats::SwitchPoint;
  EXPECT_EQ(SwitchCrossing({}), 1);
  EXPECT_EQ(SwitchCrossing({P{1, 1.0, 2.0}, P{4, 1.0, 1.0}, P{8, 2.0, 1.0}}), 4);  // ties count
  // A win at 2 tokens that is lost at 4 does not count.
  EXPECT_EQ(SwitchCrossing({P{1, 1.0, 2.0}, P{2, 2.0, 1.0}, P{4, 1.0, 1.5}, P{8, 3.0, 1.0}}), 8);
  EXPECT_EQ(SwitchCrossing({P{1, 1.0, 2.0}, P{32, 1.0, 2.0}}), 33);
  EXPECT_EQ(SwitchCrossing({P{1, 2.0, 1.0}, P{2, 2.0, 1.0}}), 1);
}

// bf16_tile_min_tokens = 0: on the amx variant the BF16 experts' tile switch
// is measured at load (once per process and shape) or taken from
// KTX_MOE_BF16_TILE_MIN_TOKENS; other variants and expert types have none;
// a bad value fails Create naming the variable.
TEST(CpuMoeBackendTest, Bf16TileSwitchIsCalibratedOrGiven) {
  auto bf16 = OpenFixture("bf16");
  auto q4 = OpenFixture("q4_k_m");
  auto pool = Pool(0);
  unsetenv("KTX_MOE_BF16_TILE_MIN_TOKENS");
  CpuMoeBackendOptions o = Quiet(CpuVariant::kScalar);
  o.max_tokens = 24;
  auto none = CpuMoeBackend::Create(*bf16, pool.get(), o);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ((*none)->load_stats().bf16_tile_switch, "none");
  EXPECT_EQ((*none)->load_stats().bf16_tile_min_tokens, 0);
  o.bf16_tile_min_tokens = -2;
  auto neg = CpuMoeBackend::Create(*bf16, pool.get(), o);
  EXPECT_EQ(neg.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(neg.status().message().find("bf16_tile_min_tokens"), std::string::npos);
  o.bf16_tile_min_tokens = 0;
  setenv("KTX_MOE_BF16_TILE_MIN_TOKENS", "0x5", 1);
  auto bad = CpuMoeBackend::Create(*bf16, pool.get(), o);
  unsetenv("KTX_MOE_BF16_TILE_MIN_TOKENS");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("KTX_MOE_BF16_TILE_MIN_TOKENS"), std::string::npos)
      << bad.status();

  if (!kernels::HostSupportsCpuVariant(CpuVariant::kAmx)) {
    GTEST_SKIP() << "no AMX on this host: the bf16 tile calibration is not run (the switch "
                    "itself is checked on emulated tiles in moe_amx_emu_test)";
  }
  o = Quiet(CpuVariant::kAmx);
  o.max_tokens = 24;
  auto a = CpuMoeBackend::Create(*bf16, pool.get(), o);
  ASSERT_TRUE(a.ok()) << a.status();
  const CpuMoeLoadStats& la = (*a)->load_stats();
  EXPECT_EQ(la.bf16_tile_switch, "calibrated");
  ASSERT_EQ(la.bf16_calibration.size(), 10u);  // 1, 2, 3, 4, 5, 6, 8, 12, 16, 24
  for (const auto& p : la.bf16_calibration) {
    EXPECT_GT(p.decode_ms, 0.0);
    EXPECT_GT(p.tile_ms, 0.0);
    std::printf("[ measured ] amx, BF16, %lld tokens per expert: dots %.3f ms, tiles %.3f ms\n",
                static_cast<long long>(p.tokens_per_expert), p.decode_ms, p.tile_ms);
  }
  EXPECT_EQ(la.bf16_tile_min_tokens, SwitchCrossing(la.bf16_calibration));
  EXPECT_EQ(la.prefill_switch, "none");  // no int8 tile path for BF16 experts
  auto b = CpuMoeBackend::Create(*bf16, pool.get(), o);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->load_stats().bf16_tile_switch, "calibrated (earlier in this process)");
  EXPECT_EQ((*b)->load_stats().bf16_tile_min_tokens, la.bf16_tile_min_tokens);
  setenv("KTX_MOE_BF16_TILE_MIN_TOKENS", "7", 1);
  auto c = CpuMoeBackend::Create(*bf16, pool.get(), o);
  unsetenv("KTX_MOE_BF16_TILE_MIN_TOKENS");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->load_stats().bf16_tile_min_tokens, 7);
  EXPECT_EQ((*c)->load_stats().bf16_tile_switch, "KTX_MOE_BF16_TILE_MIN_TOKENS");
  EXPECT_TRUE((*c)->load_stats().bf16_calibration.empty());
  o.bf16_tile_min_tokens = 3;
  auto d = CpuMoeBackend::Create(*bf16, pool.get(), o);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ((*d)->load_stats().bf16_tile_switch, "option");
  // Q4_K/Q6_K experts have no bf16 tiles.
  o.bf16_tile_min_tokens = 0;
  o.prefill_min_tokens = 16;
  auto e = CpuMoeBackend::Create(*q4, pool.get(), o);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->load_stats().bf16_tile_switch, "none");
  EXPECT_TRUE((*e)->load_stats().bf16_calibration.empty());
}

// KTX_AMX_PREFILL sets the tile kernel's schedule (same results); a bad spec
// fails Create naming the variable.
TEST(CpuMoeBackendTest, TileScheduleFromEnvironment) {
  auto model = OpenFixture("q4_k_m");
  auto pool = Pool(0);
  CpuMoeBackendOptions o = Quiet(CpuVariant::kScalar);
  o.scalar_tile_reference = true;
  o.max_tokens = 24;
  o.prefill_min_tokens = 4;
  unsetenv("KTX_AMX_PREFILL");
  auto a = CpuMoeBackend::Create(*model, pool.get(), o);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->load_stats().tile_spec.rfind("phased:", 0), 0u) << (*a)->load_stats().tile_spec;
  setenv("KTX_AMX_PREFILL", "inloop:down=16", 1);
  auto b = CpuMoeBackend::Create(*model, pool.get(), o);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->load_stats().tile_spec.rfind("inloop:", 0), 0u) << (*b)->load_stats().tile_spec;
  EXPECT_NE((*b)->load_stats().tile_spec.find(":down=16"), std::string::npos);
  setenv("KTX_AMX_PREFILL", "fast", 1);
  auto bad = CpuMoeBackend::Create(*model, pool.get(), o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("KTX_AMX_PREFILL"), std::string::npos) << bad.status();
  unsetenv("KTX_AMX_PREFILL");
  // Without a tile path there is no schedule.
  auto plain = CpuMoeBackend::Create(*model, pool.get(), Quiet(CpuVariant::kScalar));
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE((*plain)->load_stats().tile_spec.empty());
}

// ComputeRows (a shard's rows of a batch, read in place) gives the bits of
// Compute over the gathered rows, on the fast backend and on the reference
// backend (ExpertBackend's default: it gathers); bad rows are named.
TEST(CpuMoeBackendTest, ComputeRowsReadsTheRowsInPlace) {
  auto model = OpenFixture("q4_k_m");
  auto pool = Pool(0);
  CpuMoeBackendOptions o = Quiet(kernels::ActiveCpuVariant());
  o.prefill_min_tokens = 4;  // the tile path too where the host has it
  auto backend = CpuMoeBackend::Create(*model, pool.get(), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  models::ReferenceExpertBackend ref(model->hparams(), model->weights());
  for (const bool fast : {true, false}) {
    for (const LayerInput& in : CaptureMoeInputs(*model)) {
      const int64_t n = in.h.n_tokens(), k = in.routing.n_expert_used;
      std::vector<int32_t> rows;  // every other row, last first
      for (int64_t t = n - 1; t >= 0; t -= 2) rows.push_back(static_cast<int32_t>(t));
      Activations gathered(static_cast<int64_t>(rows.size()), in.h.n_cols());
      models::Routing sub;
      sub.n_tokens = static_cast<int64_t>(rows.size());
      sub.n_expert_used = in.routing.n_expert_used;
      for (size_t j = 0; j < rows.size(); ++j) {
        std::copy_n(in.h.row(rows[j]), in.h.n_cols(), gathered.row(static_cast<int64_t>(j)));
        for (int64_t i = 0; i < k; ++i) {
          sub.expert_ids.push_back(in.routing.expert_ids[rows[j] * k + i]);
          sub.weights.push_back(in.routing.weights[rows[j] * k + i]);
        }
      }
      models::ExpertBackend& b = fast ? static_cast<models::ExpertBackend&>(**backend) : ref;
      Activations want, got;
      ASSERT_TRUE(b.Compute(in.il, gathered, sub, {}, &want).ok());
      ASSERT_TRUE(b.ComputeRows(in.il, in.h, rows, sub, {}, &got).ok());
      ASSERT_EQ(got.n_tokens(), sub.n_tokens);
      EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.values().size() * sizeof(float)))
          << "layer " << in.il << (fast ? " fast" : " reference");
      std::vector<int32_t> bad = rows;
      bad[1] = static_cast<int32_t>(n);
      const absl::Status s = b.ComputeRows(in.il, in.h, bad, sub, {}, &got);
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      EXPECT_NE(s.message().find("token 1 names row " + std::to_string(n)), std::string::npos) << s;
      bad.pop_back();
      EXPECT_EQ(b.ComputeRows(in.il, in.h, bad, sub, {}, &got).code(),
                absl::StatusCode::kInvalidArgument);
    }
  }
}

// KTX_MOE_TIMES=1 logs each call's stages (results unchanged); other values fail Create.
TEST(CpuMoeBackendTest, CallProfileFromEnvironment) {
  auto model = OpenFixture("q4_k_m");
  auto pool = Pool(0);
  const CpuMoeBackendOptions o = Quiet(kernels::ActiveCpuVariant());
  setenv("KTX_MOE_TIMES", "yes", 1);
  auto bad = CpuMoeBackend::Create(*model, pool.get(), o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("KTX_MOE_TIMES=yes"), std::string::npos) << bad.status();
  setenv("KTX_MOE_TIMES", "1", 1);
  auto profiled = CpuMoeBackend::Create(*model, pool.get(), o);
  unsetenv("KTX_MOE_TIMES");
  ASSERT_TRUE(profiled.ok()) << profiled.status();
  auto plain = CpuMoeBackend::Create(*model, pool.get(), o);
  ASSERT_TRUE(plain.ok());
  for (const LayerInput& in : CaptureMoeInputs(*model)) {
    Activations a, b;
    ASSERT_TRUE((*profiled)->Compute(in.il, in.h, in.routing, {}, &a).ok());
    ASSERT_TRUE((*plain)->Compute(in.il, in.h, in.routing, {}, &b).ok());
    EXPECT_EQ(a.values(), b.values());
  }
}

// CpuExperts attaches to the model and gives the reference backend back.
TEST(CpuMoeBackendTest, CpuExpertsAttachAndDetach) {
  auto model = OpenFixture("bf16");
  models::ExpertBackend* reference = model->expert_backend();
  {
    CpuMoeBackendOptions o;
    o.progress = ProgressMode::kLines;
    auto experts = CpuExperts::Attach(model.get(), 1, o);
    ASSERT_TRUE(experts.ok()) << experts.status();
    EXPECT_EQ(model->expert_backend(), &(*experts)->backend());
    EXPECT_EQ((*experts)->pool().num_workers(), 1);
    (*experts)->Detach();
  }
  EXPECT_EQ(model->expert_backend(), reference);
}

}  // namespace
}  // namespace ktx::moe_backend
