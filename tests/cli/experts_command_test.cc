// ktx-ctl profile / profile show / eval / --policy end to end on the fixture
// model (tests/data/dsv3-tiny-bf16.gguf, reference experts):
//  * profile: the per-layer expert counts in the written file equal an
//    independent count made here from the model's stages (Route on every
//    prompt); the text format holds the same; show summarises it (hot expert
//    = the most counted, the top-K mass is 100%);
//  * topology plan --profile FILE.pb replicates each layer's hottest expert;
//  * eval: a policy equal to the full routing has KL 0, top_k=2 does not;
//  * --policy errors name the field, and a policy that changes nothing keeps
//    `run` and `logits` output identical.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/reference_engine.h"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "tests/cli/ktx_ctl_runner.h"
#include "topology/profile_file.h"

namespace ktx {
namespace {

using ::testing::HasSubstr;
using testing_util::ReadWholeFile;
using testing_util::RunKtxCtl;

const std::string kSrc = KTX_SOURCE_DIR;
const std::string kModel = kSrc + "/tests/data/dsv3-tiny-bf16.gguf";
const std::string kPrompts = kSrc + "/tests/cli/data/profile_prompts.jsonl";
const std::string kText = kSrc + "/tests/cli/data/eval.txt";

std::string Temp(const std::string& name) {
  return ::testing::TempDir() + "/experts_" + std::to_string(getpid()) + "_" + name;
}

// The prompts of profile_prompts.jsonl, decoded here by hand.
const std::vector<std::string> kPromptTexts = {
    "Tom found an old map in the attic.",
    "The weather today is cold and windy, with rain in the afternoon.",
    "Write a short poem about the sea.",
    "def add(a, b):\n    return a + b",
    "Explain why the sky is blue in one sentence.",
};

// (layer, expert) -> selections, from the model's stages.
std::map<std::pair<int, int>, int64_t> IndependentCount(int64_t* n_tokens) {
  auto engine = engine::ReferenceEngine::Open(kModel, {});
  EXPECT_TRUE(engine.ok()) << engine.status();
  const models::Deepseek2Model& m = (*engine)->model();
  std::map<std::pair<int, int>, int64_t> count;
  *n_tokens = 0;
  for (const std::string& text : kPromptTexts) {
    engine::GenerateRequest r;
    r.prompt = text;
    auto ids = (*engine)->TokenizePrompt(r);
    EXPECT_TRUE(ids.ok());
    const int64_t n = static_cast<int64_t>(ids->size());
    *n_tokens += n;
    auto kv = kv_cache::SequenceKv::Create(m.kv_layout(), n);
    std::vector<int32_t> pos(n);
    for (int64_t t = 0; t < n; ++t) pos[t] = static_cast<int32_t>(t);
    models::Activations x, h, f, s;
    models::Routing routing;
    EXPECT_TRUE(m.Embed(*ids, &x).ok());
    for (int il = 0; il < m.hparams().n_layer; ++il) {
      EXPECT_TRUE(m.AttentionBlock(il, pos, kv->get(), &x).ok());
      EXPECT_TRUE(m.FfnNorm(il, x, &h).ok());
      if (!m.hparams().IsMoeLayer(il)) {
        EXPECT_TRUE(m.DenseFfn(il, h, &f).ok());
        const models::Activations* parts[] = {&f};
        EXPECT_TRUE(m.Combine(parts, &x).ok());
        continue;
      }
      EXPECT_TRUE(m.Route(il, h, &routing).ok());
      for (int32_t e : routing.expert_ids) count[std::make_pair(il, e)] += 1;
      EXPECT_TRUE(m.RoutedExperts(il, h, routing, {}, &f).ok());
      EXPECT_TRUE(m.SharedExperts(il, h, &s).ok());
      const models::Activations* parts[] = {&f, &s};
      EXPECT_TRUE(m.Combine(parts, &x).ok());
    }
  }
  return count;
}

TEST(ExpertsCommandTest, ProfileCountsMatchAnIndependentCountAndFeedThePlanner) {
  const std::string pb = Temp("profile.pb");
  const std::string txt = Temp("profile.textproto");
  auto r = RunKtxCtl("profile --model " + kModel + " --prompts " + kPrompts + " --out " + pb +
                     " --experts reference --top 3");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("| layer | tokens | imbalance | unused | top-1 |"));
  auto profile = topology::ReadExpertUsageProfile(pb);
  ASSERT_TRUE(profile.ok()) << profile.status();
  int64_t n_tokens = 0;
  const auto want = IndependentCount(&n_tokens);
  EXPECT_EQ(profile->n_prompts(), 5);
  EXPECT_EQ(profile->n_tokens(), n_tokens);
  EXPECT_EQ(profile->n_expert(), 16);
  EXPECT_EQ(profile->n_expert_used(), 4);
  EXPECT_EQ(profile->routing_policy(), "full");
  ASSERT_EQ(profile->layers_size(), 2);  // the two MoE layers
  for (const auto& l : profile->layers()) {
    EXPECT_EQ(l.n_tokens(), n_tokens);
    for (int e = 0; e < 16; ++e) {
      const auto it = want.find(std::make_pair(l.layer(), e));
      EXPECT_EQ(l.count(e), it == want.end() ? 0 : it->second) << l.layer() << "/" << e;
    }
    double mass = 0;
    for (double m : l.rank_mass()) mass += m;
    EXPECT_NEAR(mass, static_cast<double>(n_tokens), 1e-6);
  }

  // Text format: the same counts.
  r = RunKtxCtl("profile --model " + kModel + " --prompts " + kPrompts + " --out " + txt +
                " --experts reference");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(ReadWholeFile(txt), HasSubstr("n_expert_used: 4"));
  auto text = topology::ReadExpertUsageProfile(txt);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->layers(1).count(3), profile->layers(1).count(3));

  // show --json: the hottest expert is the most counted, the top-K mass is 1.
  r = RunKtxCtl("profile show " + pb + " --json --top 2");
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  std::vector<int> hottest;
  for (int i = 0; i < 2; ++i) {
    const auto& l = profile->layers(i);
    int best = 0;
    for (int e = 1; e < 16; ++e) best = l.count(e) > l.count(best) ? e : best;
    hottest.push_back(best);
    EXPECT_EQ(j["layers"][i]["hot_experts"][0].get<int>(), best);
    EXPECT_NEAR(j["layers"][i]["mass_top_m"][3].get<double>(), 1.0, 1e-9);
    EXPECT_LT(j["layers"][i]["mass_top_m"][0].get<double>(), 1.0);
  }

  // The placement planner reads the file: each layer's hottest expert is the
  // one replicated.
  r = RunKtxCtl("topology plan --model " + kModel + " --topology " + kSrc +
                "/configs/one-node-per-socket.textproto --hardware " + kSrc +
                "/tests/topology/data/two-socket-h100.json --profile " + pb +
                " --replicate-hot 1 --json");
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json plan = nlohmann::json::parse(r.out);
  EXPECT_EQ(plan["n_replicated"].get<int>(), 2);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(plan["layers"][i]["shards_of_expert"][hottest[i]].size(), 2u) << i;
  }

  // Bad inputs.
  r = RunKtxCtl("profile show " + kPrompts);
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("not an expert-usage profile"));
  r = RunKtxCtl("profile --model " + kModel);
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("--prompts"));
  std::remove(pb.c_str());
  std::remove(txt.c_str());
}

TEST(ExpertsCommandTest, EvalComparesPoliciesWithTheFullRouting) {
  const std::string json = Temp("eval.json");
  auto r = RunKtxCtl("eval --model " + kModel + " --data " + kText +
                     " --policy top_k=4 --policy top_k=2 --policy 'defer=1,join=next_attention'"
                     " --window 64 --max-tokens 192 --experts reference --json " +
                     json);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("| top_k=2 |"));
  const nlohmann::json j = nlohmann::json::parse(ReadWholeFile(json));
  EXPECT_EQ(j["n_tokens"].get<int>(), 192);
  ASSERT_EQ(j["policies"].size(), 3u);
  EXPECT_EQ(j["policies"][0]["kl_mean"].get<double>(), 0.0);
  EXPECT_EQ(j["policies"][0]["top1_agreement"].get<double>(), 1.0);
  EXPECT_EQ(j["policies"][0]["perplexity"].get<double>(), j["full"]["perplexity"].get<double>());
  EXPECT_GT(j["policies"][1]["kl_mean"].get<double>(), 0.0);
  EXPECT_EQ(j["policies"][1]["experts_per_token"].get<double>(), 2.0);
  EXPECT_EQ(j["policies"][2]["policy"], "defer=1,join=next_attention");
  EXPECT_GT(j["policies"][2]["kl_mean"].get<double>(), 0.0);
  std::remove(json.c_str());
}

TEST(ExpertsCommandTest, PolicyFlagErrorsNameTheField) {
  auto r = RunKtxCtl("eval --model " + kModel + " --data " + kText + " --policy topk=2");
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("--policy"));
  EXPECT_THAT(r.err, HasSubstr("unknown field 'topk'"));
  r = RunKtxCtl("run --model " + kModel + " --prompt hi --max-tokens 2 --policy top_k=9");
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("top_k = 9"));
  r = RunKtxCtl("logits --model " + kModel + " --tokens 1,2 --out /dev/null --policy mass=2");
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("mass: 2 outside (0, 1]"));
  r = RunKtxCtl("run --model " + kModel +
                " --shards 1 --prompt hi --max-tokens 2 --policy defer=4");
  EXPECT_EQ(r.rc, 1);
  EXPECT_THAT(r.err, HasSubstr("defer = 4"));
}

// The actor runtime runs every policy (adaptive top-k pads rows, deferral
// overlaps the next layer): its logits equal the reference engine's with the
// same policy (to float rounding of the 2 shards' partial sums).
TEST(ExpertsCommandTest, ActorRuntimeRunsEveryPolicyLikeTheReferenceEngine) {
  const std::string tokens = " --tokens 1,5,9,200,31,77,402,6,18,250 --experts reference";
  for (const std::string policy : {"mass=0.6", "top_k=3,defer=1", "defer=2,join=next_attention"}) {
    SCOPED_TRACE(policy);
    const std::string a = Temp("ref.f32"), b = Temp("actors.f32");
    auto ref =
        RunKtxCtl("logits --model " + kModel + tokens + " --policy '" + policy + "' --out " + a);
    ASSERT_EQ(ref.rc, 0) << ref.err;
    auto act = RunKtxCtl("logits --model " + kModel + tokens + " --shards 2 --policy '" + policy +
                         "' --out " + b);
    ASSERT_EQ(act.rc, 0) << act.err;
    const std::string x = ReadWholeFile(a), y = ReadWholeFile(b);
    ASSERT_EQ(x.size(), y.size());
    ASSERT_FALSE(x.empty());
    const float* fx = reinterpret_cast<const float*>(x.data());
    const float* fy = reinterpret_cast<const float*>(y.data());
    const size_t n = x.size() / sizeof(float);
    double scale = 0, diff = 0;
    for (size_t i = 0; i < n; ++i) {
      scale = std::max(scale, std::fabs(static_cast<double>(fx[i])));
      diff = std::max(diff, std::fabs(static_cast<double>(fx[i]) - fy[i]));
    }
    EXPECT_LE(diff, 1e-5 * scale);
    std::remove(a.c_str());
    std::remove(b.c_str());
  }
}

TEST(ExpertsCommandTest, PoliciesThatChangeNothingKeepRunAndLogitsOutput) {
  const std::string base = "run --model " + kModel +
                           " --prompt 'Tom found a map' --max-tokens 8 --temperature 0"
                           " --experts reference";
  auto full = RunKtxCtl(base);
  auto same = RunKtxCtl(base + " --policy top_k=4");
  auto fewer = RunKtxCtl(base + " --policy top_k=1");
  ASSERT_EQ(full.rc, 0) << full.err;
  ASSERT_EQ(same.rc, 0) << same.err;
  ASSERT_EQ(fewer.rc, 0) << fewer.err;
  EXPECT_EQ(same.out, full.out);
  EXPECT_NE(fewer.out, full.out);
  const std::string a = Temp("a.f32"), b = Temp("b.f32");
  ASSERT_EQ(
      RunKtxCtl("logits --model " + kModel + " --tokens 1,5,9,200 --experts reference --out " + a)
          .rc,
      0);
  ASSERT_EQ(RunKtxCtl("logits --model " + kModel +
                      " --tokens 1,5,9,200 --experts reference --policy mass=1,min_k=2 --out " + b)
                .rc,
            0);
  EXPECT_EQ(ReadWholeFile(a), ReadWholeFile(b));
  EXPECT_FALSE(ReadWholeFile(a).empty());
  std::remove(a.c_str());
  std::remove(b.c_str());
}

}  // namespace
}  // namespace ktx
