// CpuMoeBackend with the routings of routing policies (runtime/models/
// routing_policy.h): rows narrower than the model's K and rows padded with
// kNoExpert. Each against the ReferenceExpertBackend on the model's own
// activations (the kernel's bound, NMSE < 1e-3), and a narrow routing equals
// the same routing padded to K bitwise (the backend pads it so).
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/x86/cpu_variant.h"
#include "nlohmann/json.hpp"
#include "runtime/kv_cache/latent_kv_cache.h"
#include "runtime/models/deepseek2.h"
#include "runtime/models/routing_policy.h"
#include "runtime/moe_backend/cpu_moe_backend.h"

namespace ktx::moe_backend {
namespace {

using models::Activations;
using models::Routing;
using models::RoutingPolicy;

const std::string kDataDir = std::string(KTX_SOURCE_DIR) + "/tests/data/";

double Nmse(const Activations& got, const Activations& want) {
  double d = 0, r = 0;
  for (size_t i = 0; i < want.values().size(); ++i) {
    const double e = static_cast<double>(got.values()[i]) - want.values()[i];
    d += e * e;
    r += static_cast<double>(want.values()[i]) * want.values()[i];
  }
  return d / r;
}

// Routing padded with kNoExpert to `width` entries per token.
Routing Pad(const Routing& r, int32_t width) {
  Routing out;
  out.n_tokens = r.n_tokens;
  out.n_expert_used = width;
  out.expert_ids.assign(r.n_tokens * width, models::kNoExpert);
  out.weights.assign(r.n_tokens * width, 0.0f);
  for (int64_t t = 0; t < r.n_tokens; ++t) {
    for (int k = 0; k < r.n_expert_used; ++k) {
      out.expert_ids[t * width + k] = r.id(t, k);
      out.weights[t * width + k] = r.weight(t, k);
    }
  }
  return out;
}

TEST(CpuMoeBackendPolicyTest, NarrowAndPaddedRoutingsMatchTheReference) {
  auto model = models::Deepseek2Model::Open(kDataDir + "dsv3-tiny-q8_0.gguf");
  ASSERT_TRUE(model.ok()) << model.status();
  const models::Deepseek2Model& m = **model;
  auto pool = CreateCpuPool(0);
  ASSERT_TRUE(pool.ok());
  CpuMoeBackendOptions o;
  o.progress = ProgressMode::kOff;
  auto backend = CpuMoeBackend::Create(m, pool->get(), o);
  ASSERT_TRUE(backend.ok()) << backend.status();
  models::ReferenceExpertBackend ref(m.hparams(), m.weights());

  std::ifstream in(kDataDir + "manifest.json");
  const auto prompt = nlohmann::json::parse(in)["prompt_tokens"].get<std::vector<int32_t>>();
  auto kv = kv_cache::SequenceKv::Create(m.kv_layout(), 128);
  std::vector<int32_t> pos(prompt.size());
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<int32_t>(i);
  const RoutingPolicy top2 = RoutingPolicy::TopK(2);
  const RoutingPolicy adaptive = RoutingPolicy::Adaptive(0.6, 1);
  Activations x, h, f, s;
  ASSERT_TRUE(m.Embed(prompt, &x).ok());
  int checked = 0;
  for (int il = 0; il < m.hparams().n_layer; ++il) {
    ASSERT_TRUE(m.AttentionBlock(il, pos, kv->get(), &x).ok());
    ASSERT_TRUE(m.FfnNorm(il, x, &h).ok());
    if (!m.hparams().IsMoeLayer(il)) {
      ASSERT_TRUE(m.DenseFfn(il, h, &f).ok());
      const Activations* parts[] = {&f};
      ASSERT_TRUE(m.Combine(parts, &x).ok());
      continue;
    }
    for (const RoutingPolicy* p : {&top2, &adaptive}) {
      const RoutingPolicy* policies[] = {p};
      Routing r;
      ASSERT_TRUE(m.Route(il, h, policies, &r).ok());
      ASSERT_LT(r.n_expert_used, m.hparams().n_expert_used) << p->ToString();
      Activations want, got, got_padded;
      ASSERT_TRUE(ref.Compute(il, h, r, {}, &want).ok());
      ASSERT_TRUE((*backend)->Compute(il, h, r, {}, &got).ok());
      const double nmse = Nmse(got, want);
      std::printf("[ measured ] layer %d %s (width %d): NMSE %.2e\n", il, p->ToString().c_str(),
                  r.n_expert_used, nmse);
      EXPECT_LT(nmse, 1e-3);
      ASSERT_TRUE(
          (*backend)->Compute(il, h, Pad(r, m.hparams().n_expert_used), {}, &got_padded).ok());
      EXPECT_EQ(got.values(), got_padded.values());
      ++checked;
    }
    Routing full;
    ASSERT_TRUE(m.Route(il, h, &full).ok());
    ASSERT_TRUE((*backend)->Compute(il, h, full, {}, &f).ok());
    ASSERT_TRUE(m.SharedExperts(il, h, &s).ok());
    const Activations* parts[] = {&f, &s};
    ASSERT_TRUE(m.Combine(parts, &x).ok());
  }
  EXPECT_EQ(checked, 4);
}

}  // namespace
}  // namespace ktx::moe_backend
