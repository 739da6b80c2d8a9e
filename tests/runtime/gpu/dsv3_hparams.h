// File: tests/runtime/gpu/dsv3_hparams.h
//
// DeepSeek-V3's hyper-parameters (config.json / ../shared/notes/DEEPSEEK.md),
// for tests and benchmarks that need full-width shapes without the 671B file.
#pragma once

#include "runtime/base/status.h"
#include "runtime/models/deepseek2.h"

namespace ktx::gpu {

inline models::Deepseek2Hparams Dsv3Hparams() {
  models::Deepseek2Hparams hp;
  hp.n_layer = 61;
  hp.n_ctx_train = 163840;
  hp.n_embd = 7168;
  hp.n_ff = 18432;
  hp.n_head = 128;
  hp.q_lora_rank = 1536;
  hp.kv_lora_rank = 512;
  hp.n_embd_head_qk = 192;
  hp.n_embd_head_v = 128;
  hp.n_rot = 64;
  hp.rms_eps = 1e-6f;
  hp.n_layer_dense_lead = 3;
  hp.n_expert = 256;
  hp.n_expert_used = 8;
  hp.n_expert_shared = 1;
  hp.n_ff_exp = 2048;
  hp.n_expert_groups = 8;
  hp.n_group_used = 4;
  hp.gating = models::GatingFunc::kSigmoid;
  hp.expert_weights_scale = 2.5f;
  hp.expert_weights_norm = true;
  hp.n_vocab = 129280;
  hp.rope_freq_base = 10000.0f;
  hp.rope_scaling = models::RopeScalingType::kYarn;
  hp.rope_scaling_factor = 40.0f;
  hp.n_ctx_orig_yarn = 4096;
  hp.yarn_beta_fast = 32.0f;
  hp.yarn_beta_slow = 1.0f;
  hp.yarn_log_mul = 1.0f;
  KTX_CHECK(hp.Derive().ok());
  return hp;
}

}  // namespace ktx::gpu
