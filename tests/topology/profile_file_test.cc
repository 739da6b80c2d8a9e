// Expert-usage profile files for the placement planner: binary and text
// round trips, the checks (each error names the file, the layer and the
// field), the planner's weights (selection counts), and LoadPlacementProfile
// taking either a profile file or the planner's JSON.
#include "topology/profile_file.h"

#include <cstdio>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ktx::topology {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

ktx::v1::ExpertUsageProfile Sample() {
  ktx::v1::ExpertUsageProfile p;
  p.set_model("m.gguf");
  p.set_n_layer(3);
  p.set_n_expert(4);
  p.set_n_expert_used(2);
  p.set_n_tokens(10);
  for (int il : {1, 2}) {
    ktx::v1::LayerUsage* l = p.add_layers();
    l->set_layer(il);
    l->set_n_tokens(10);
    for (int64_t c : {il == 1 ? 12 : 0, 5, 3, 0}) l->add_count(c);
    for (double w : {6.0, 2.5, 1.5, 0.0}) l->add_weight(w);
    for (double m : {7.0, 3.0}) l->add_rank_mass(m);
    for (int64_t u : {10, 10}) l->add_rank_used(u);
  }
  return p;
}

std::string Temp(const std::string& name) { return ::testing::TempDir() + "/pf_" + name; }

TEST(ProfileFileTest, BinaryAndTextRoundTrip) {
  const ktx::v1::ExpertUsageProfile p = Sample();
  for (const std::string name : {"p.pb", "p.textproto", "p.txtpb"}) {
    const std::string path = Temp(name);
    ASSERT_TRUE(WriteExpertUsageProfile(p, path).ok()) << name;
    auto back = ReadExpertUsageProfile(path);
    ASSERT_TRUE(back.ok()) << name << ": " << back.status();
    EXPECT_EQ(back->SerializeAsString(), p.SerializeAsString()) << name;
    std::remove(path.c_str());
  }
  EXPECT_TRUE(IsTextProtoPath("a.pbtxt"));
  EXPECT_FALSE(IsTextProtoPath("a.pb"));
  // A text profile under a binary-looking name still reads (fallback).
  const std::string odd = Temp("text.bin");
  {
    std::ofstream out(odd);
    out << "n_layer: 3 n_expert: 4 n_expert_used: 2\n";
  }
  EXPECT_TRUE(ReadExpertUsageProfile(odd).ok());
  std::remove(odd.c_str());
}

TEST(ProfileFileTest, ChecksNameTheLayerAndField) {
  struct Case {
    void (*edit)(ktx::v1::ExpertUsageProfile*);
    std::string words;
  };
  const std::vector<Case> cases = {
      {[](ktx::v1::ExpertUsageProfile* p) { p->set_n_expert(0); }, "n_expert = 0"},
      {[](ktx::v1::ExpertUsageProfile* p) { p->set_n_expert_used(5); }, "n_expert_used = 5"},
      {[](ktx::v1::ExpertUsageProfile* p) { p->mutable_layers(1)->set_layer(3); },
       "layer 3: outside [0, n_layer = 3)"},
      {[](ktx::v1::ExpertUsageProfile* p) { p->mutable_layers(1)->set_layer(1); },
       "layer 1: layers must ascend"},
      {[](ktx::v1::ExpertUsageProfile* p) { p->mutable_layers(0)->add_count(1); },
       "layer 1: count has 5"},
      {[](ktx::v1::ExpertUsageProfile* p) { p->mutable_layers(0)->add_rank_mass(1); },
       "layer 1: rank_mass has 3"},
      {[](ktx::v1::ExpertUsageProfile* p) { p->mutable_layers(1)->set_count(2, -1); },
       "layer 2: count[2] = -1"},
      {[](ktx::v1::ExpertUsageProfile* p) { p->mutable_layers(0)->set_count(3, 9); },
       "layer 1: 29 selections exceed n_tokens x n_expert_used = 20"},
  };
  for (const Case& c : cases) {
    ktx::v1::ExpertUsageProfile p = Sample();
    c.edit(&p);
    const absl::Status s = ValidateExpertUsageProfile(p, "f.pb");
    ASSERT_FALSE(s.ok()) << c.words;
    EXPECT_THAT(std::string(s.message()), HasSubstr("f.pb: " + c.words));
  }
  EXPECT_EQ(ReadExpertUsageProfile(Temp("missing.pb")).status().code(),
            absl::StatusCode::kNotFound);
  const std::string junk = Temp("junk.pb");
  {
    std::ofstream out(junk);
    out << "this is { not a profile";
  }
  const absl::Status s = ReadExpertUsageProfile(junk).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("not an expert-usage profile"));
  std::remove(junk.c_str());
}

TEST(ProfileFileTest, PlannerWeightsAreTheCountsEitherFormat) {
  const ExpertProfile w = PlacementProfileFromUsage(Sample());
  ASSERT_EQ(w.weights.size(), 2u);
  EXPECT_THAT(w.weights.at(1), ElementsAre(12, 5, 3, 0));
  EXPECT_THAT(w.weights.at(2), ElementsAre(0, 5, 3, 0));
  const std::string pb = Temp("w.pb"), json = Temp("w.json");
  ASSERT_TRUE(WriteExpertUsageProfile(Sample(), pb).ok());
  {
    std::ofstream out(json);
    out << "  {\"layers\": {\"1\": [1, 2, 3, 4]}}";
  }
  auto from_pb = LoadPlacementProfile(pb);
  ASSERT_TRUE(from_pb.ok()) << from_pb.status();
  EXPECT_THAT(from_pb->weights.at(1), ElementsAre(12, 5, 3, 0));
  auto from_json = LoadPlacementProfile(json);
  ASSERT_TRUE(from_json.ok()) << from_json.status();
  EXPECT_THAT(from_json->weights.at(1), ElementsAre(1, 2, 3, 4));
  std::remove(pb.c_str());
  std::remove(json.c_str());
}

}  // namespace
}  // namespace ktx::topology
