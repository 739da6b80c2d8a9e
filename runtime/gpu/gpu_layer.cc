#include "runtime/gpu/gpu_layer.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/basic_ops.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemv.h"
#include "kernels/cuda/mla_prefill.h"
#include "runtime/base/status.h"

namespace ktx::gpu {

namespace kc = kernels::cuda;

absl::StatusOr<std::unique_ptr<GpuLayerRunner>> GpuLayerRunner::Create(
    const models::Deepseek2Hparams& hp, int64_t max_tokens, const CudaModelOptions& options) {
  std::unique_ptr<GpuLayerRunner> r(new GpuLayerRunner());
  r->hp_ = hp;
  r->layout_ = GpuWorkLayout::For(hp, max_tokens);
  r->attention_tensor_cores_ = options.attention_tensor_cores;
  r->gemv_max_tokens_ = options.gemv_max_tokens;
  r->set_skinny_max_tokens(options.skinny_max_tokens);
  r->set_mla_prefill_min_tokens(options.mla_prefill_min_tokens);
  r->rope_.n_rot = static_cast<int32_t>(hp.rope.n_rot);
  r->rope_.freq_base = hp.rope.freq_base;
  r->rope_.freq_scale = hp.rope.freq_scale;
  r->rope_.ext_factor = hp.rope.ext_factor;
  r->rope_.attn_factor = hp.rope.attn_factor;
  r->rope_.corr_low = hp.rope.corr_low;
  r->rope_.corr_high = hp.rope.corr_high;
  {
    // The rope's position-independent factors, computed here once (with the
    // CPU reference's expressions) instead of in every rope kernel.
    double inv_freq[kc::kRopeMaxPairs];
    double magnitude = 1.0;
    KTX_RETURN_IF_ERROR(
        CudaOk(kc::RopeTables(r->rope_, inv_freq, &magnitude), "the rope's frequency table"));
    const size_t bytes = sizeof(double) * static_cast<size_t>(r->rope_.n_rot / 2);
    KTX_ASSIGN_OR_RETURN(r->rope_inv_freq_,
                         DeviceBuffer::Allocate(bytes, "the rope's frequency table"));
    KTX_RETURN_IF_ERROR(
        CudaOk(cudaMemcpy(r->rope_inv_freq_.get(), inv_freq, bytes, cudaMemcpyHostToDevice),
               "uploading the rope's frequency table"));
    r->rope_.inv_freq = r->rope_inv_freq_.as<double>();
    r->rope_.magnitude = magnitude;
  }
  const models::RoutingParams rp = hp.routing();
  r->routing_.n_expert = rp.n_expert;
  r->routing_.n_expert_used = rp.n_expert_used;
  r->routing_.n_group = rp.n_group;
  r->routing_.n_group_used = rp.n_group_used;
  r->routing_.sigmoid = rp.gating == models::GatingFunc::kSigmoid;
  r->routing_.norm_weights = rp.norm_weights;
  r->routing_.weights_scale = rp.weights_scale;

  int device = 0;
  KTX_RETURN_IF_ERROR(CudaOk(cudaGetDevice(&device), "cudaGetDevice"));
  KTX_RETURN_IF_ERROR(
      CudaOk(cudaDeviceGetAttribute(&r->n_multiprocessors_, cudaDevAttrMultiProcessorCount, device),
             "reading the multiprocessor count"));
  KTX_RETURN_IF_ERROR(
      CudaOk(cudaStreamCreateWithFlags(&r->stream_, cudaStreamNonBlocking), "creating a stream"));
  KTX_RETURN_IF_ERROR(CublasOk(cublasCreate(&r->cublas_), "creating the cuBLAS handle"));
  KTX_RETURN_IF_ERROR(CublasOk(cublasSetStream(r->cublas_, r->stream_), "cublasSetStream"));

  const GpuWorkLayout& l = r->layout_;
  struct Alloc {
    DeviceBuffer* buf;
    int64_t n;
    size_t elem;
    const char* name;
  };
  const Alloc allocs[] = {
      {&r->x_, l.x, 4, "x"},
      {&r->h_f32_, l.h_f32, 4, "h"},
      {&r->h_bf16_, l.h_bf16, 2, "h (bf16)"},
      {&r->qa_, l.qa, 4, "q_a output"},
      {&r->qa_bf16_, l.qa_bf16, 2, "q_a output (bf16)"},
      {&r->q_, l.q, 4, "q"},
      {&r->q_nope_, l.q_nope, 2, "q_nope"},
      {&r->big_q_, l.big_q, 4, "attention query"},
      {&r->kva_, l.kva, 4, "kv_a output"},
      {&r->ctx_, l.ctx, 2, "attention context"},
      {&r->o_, l.o, 2, "attention heads' output"},
      {&r->gu_, l.gu, 4, "FFN gate/up"},
      {&r->act_, l.act, 2, "FFN activation"},
      {&r->router_logits_, l.router_logits, 4, "router logits"},
      {&r->expert_ids_, l.expert_ids, 4, "expert ids"},
      {&r->expert_weights_, l.expert_weights, 4, "expert weights"},
      {&r->routed_, l.routed, 4, "routed experts' output"},
      {&r->logits_, l.logits, 4, "logits"},
      {&r->indices_, l.indices, 4, "token indices"},
  };
  for (const Alloc& a : allocs) {
    KTX_ASSIGN_OR_RETURN(*a.buf, DeviceBuffer::Allocate(static_cast<size_t>(a.n) * a.elem, a.name));
  }
  KTX_ASSIGN_OR_RETURN(
      r->attention_workspace_,
      DeviceBuffer::Allocate(options.attention_workspace_bytes, "the attention workspace"));
  KTX_ASSIGN_OR_RETURN(r->cublas_workspace_, DeviceBuffer::Allocate(options.cublas_workspace_bytes,
                                                                    "the cuBLAS workspace"));
  // The q8 GEMV's activation workspace (int8 activations and block scales,
  // kernels/cuda/gemv_q8.h) for the widest product input and up to
  // max(16, gemv_max_tokens) tokens per call: under 1 MiB at DeepSeek-V3
  // widths. Products with more tokens than it holds take the workspace-free
  // kernel (QuantGemv's own fallback).
  {
    const int64_t widest =
        std::max({hp.n_embd, hp.n_ff, hp.q_lora_rank, hp.kv_lora_rank, hp.n_head * hp.n_embd_head_v,
                  hp.n_ff_exp * std::max<int64_t>(1, hp.n_expert_shared)});
    r->gemv_workspace_tokens_ = std::max<int64_t>(16, options.gemv_max_tokens);
    KTX_ASSIGN_OR_RETURN(
        r->gemv_workspace_,
        DeviceBuffer::Allocate(kc::QuantGemvWorkspaceBytes(widest, r->gemv_workspace_tokens_),
                               "the GEMV workspace"));
  }
  // The skinny kernel's workspace: the largest its plans need over this
  // model's bf16 product shapes, within options.skinny_workspace_bytes
  // (shapes whose plan needs more run through cuBLAS).
  {
    const int64_t n_head = hp.n_head, kvl = hp.kv_lora_rank;
    const int64_t rw = kvl + hp.n_rot;
    const int64_t shared = hp.n_ff_exp * std::max<int64_t>(1, hp.n_expert_shared);
    const int64_t shapes[][3] = {
        {hp.q_lora_rank, hp.n_embd, 1},
        {hp.q_lora_rank > 0 ? hp.q_lora_rank + rw : 0, hp.n_embd, 1},  // q_a + kv_a stacked
        {n_head * hp.n_embd_head_qk, hp.q_lora_rank, 1},
        {n_head * hp.n_embd_head_qk, hp.n_embd, 1},
        {rw, hp.n_embd, 1},
        {kvl, hp.qk_nope(), n_head},
        {hp.n_embd_head_v, kvl, n_head},
        {hp.n_embd, n_head * hp.n_embd_head_v, 1},
        {2 * hp.n_ff, hp.n_embd, 1},
        {hp.n_embd, hp.n_ff, 1},
        {2 * shared, hp.n_embd, 1},
        {hp.n_embd, shared, 1},
        {hp.n_vocab, hp.n_embd, 1},
    };
    size_t need = 0;
    for (const auto& sh : shapes) {
      if (sh[0] <= 0 || sh[1] <= 0) continue;
      const size_t b = kc::SkinnyGemmWorkspaceBytes(
          kc::PlanSkinnyGemm(sh[0], sh[1], sh[2], r->n_multiprocessors_));
      if (b <= options.skinny_workspace_bytes) need = std::max(need, b);
    }
    if (need > 0) {
      KTX_ASSIGN_OR_RETURN(r->skinny_workspace_,
                           DeviceBuffer::Allocate(need, "the skinny product workspace"));
      KTX_RETURN_IF_ERROR(CudaOk(cudaMemset(r->skinny_workspace_.get(), 0, need),
                                 "zeroing the skinny product workspace"));
    }
  }
  if (r->cublas_workspace_.bytes() > 0) {
    KTX_RETURN_IF_ERROR(CublasOk(
        cublasSetWorkspace(r->cublas_, r->cublas_workspace_.get(), r->cublas_workspace_.bytes()),
        "cublasSetWorkspace"));
  }
  return r;
}

GpuLayerRunner::~GpuLayerRunner() {
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status GpuLayerRunner::Attention(const GpuLayerWeights& w, const kc::MlaPagedKv& kv,
                                       const GpuBatchView& b, float* x) {
  const int64_t n = b.n_tokens;
  if (n <= 0 || n > layout_.max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU attention: ", n, " tokens, at most ", layout_.max_tokens));
  }
  const int64_t n_embd = hp_.n_embd;
  const int64_t n_head = hp_.n_head;
  const int64_t hd = hp_.n_embd_head_qk;
  const int64_t nope = hp_.qk_nope();
  const int64_t kvl = hp_.kv_lora_rank;
  const int64_t rw = kvl + hp_.n_rot;
  const int64_t hdv = hp_.n_embd_head_v;
  const float eps = hp_.rms_eps;
  KTX_RETURN_IF_ERROR(CudaOk(kc::RmsNorm(x, n_embd, nullptr, w.attn_norm, n_embd, n, eps, nullptr,
                                         0, h_bf16(), n_embd, stream_),
                             "attention norm"));
  float* q = q_.as<float>();
  // kv_a's output: its own buffer, or a part of qa_ when the stacked product computed it.
  float* kva = kva_.as<float>();
  int64_t kva_stride = rw;
  bool kva_done = false;
  if (hp_.is_lite()) {
    KTX_RETURN_IF_ERROR(
        Linear(w.attn_q, n_head * hd, n_embd, h_bf16(), n_embd, n, q, n_head * hd, 0.0f, "attn_q"));
  } else {
    const int64_t ql = hp_.q_lora_rank;
    float* qa = qa_.as<float>();
    int64_t qa_stride = ql;
    if (w.attn_qkv_a != nullptr && !TakesGemv(w.attn_q_a, n) && !TakesGemv(w.attn_kv_a_mqa, n)) {
      // q_a and kv_a stacked: one product into [n, ql + rw], kv_a's part after ql.
      qa_stride = ql + rw;
      KTX_ASSIGN_OR_RETURN(
          const bool skinny,
          RunProductBf16(w.attn_qkv_a, n_embd, 0, h_bf16(), n_embd, 0, qa, CUDA_R_32F, qa_stride, 0,
                         ql + rw, n_embd, n, 1, 0.0f, "attn_q_a + attn_kv_a_mqa"));
      ++(skinny ? skinny_calls_ : cublas_calls_);
      kva = qa + ql;
      kva_stride = qa_stride;
      kva_done = true;
    } else {
      KTX_RETURN_IF_ERROR(
          Linear(w.attn_q_a, ql, n_embd, h_bf16(), n_embd, n, qa, ql, 0.0f, "attn_q_a"));
    }
    KTX_RETURN_IF_ERROR(CudaOk(kc::RmsNorm(qa, qa_stride, nullptr, w.attn_q_a_norm, ql, n, eps,
                                           nullptr, 0, qa_bf16_.as<Bf16>(), ql, stream_),
                               "q_a norm"));
    KTX_RETURN_IF_ERROR(Linear(w.attn_q_b, n_head * hd, ql, qa_bf16_.as<Bf16>(), ql, n, q,
                               n_head * hd, 0.0f, "attn_q_b"));
  }
  if (!kva_done) {
    KTX_RETURN_IF_ERROR(
        Linear(w.attn_kv_a_mqa, rw, n_embd, h_bf16(), n_embd, n, kva, rw, 0.0f, "attn_kv_a_mqa"));
  }
  // The queries' rope and the latent KV rows (cache write) in one launch.
  kc::MlaKvWrite write_kv;
  write_kv.kva = kva;
  write_kv.kva_stride = kva_stride;
  write_kv.kv_norm = w.attn_kv_a_norm;
  write_kv.eps = eps;
  write_kv.seq_index = b.seq_index;
  write_kv.kv = kv;
  float* big_q = big_q_.as<float>();
  KTX_RETURN_IF_ERROR(CudaOk(
      kc::MlaPrepareQ(q, n_head * hd, static_cast<int32_t>(n_head), static_cast<int32_t>(nope),
                      static_cast<int32_t>(kvl), rope_, b.positions, n, q_nope_.as<Bf16>(),
                      n_head * nope, big_q, n_head * rw, stream_, &write_kv),
      "preparing the queries and writing the latent KV rows"));
  // q_abs[t, h] = k_b[h] · q_nope[t, h], written into the query rows' first kv_lora.
  KTX_RETURN_IF_ERROR(ProductBf16(w.attn_k_b, nope, kvl * nope, q_nope_.as<Bf16>(), n_head * nope,
                                  nope, big_q, CUDA_R_32F, n_head * rw, rw, kvl, nope, n, n_head,
                                  0.0f, "attn_k_b (absorbed queries)"));
  // Segments long enough for the prompt-chunk form; the tokens between them
  // through the MLA kernel.
  int64_t done = 0;
  for (int64_t i = 0; i < b.n_segments && mla_prefill_min_tokens_ > 0; ++i) {
    const GpuBatchSegment& sg = b.segments[i];
    if (sg.first_token < done || sg.n_tokens <= 0 || sg.first_token + sg.n_tokens > n ||
        sg.pos0 < 0 || sg.seq < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("GPU attention: batch segment ", i, " (tokens ", sg.first_token, " + ",
                       sg.n_tokens, ", sequence row ", sg.seq, ", position ", sg.pos0,
                       ") is not an ordered, disjoint run of ", "the batch's ", n, " tokens"));
    }
    if (sg.n_tokens < mla_prefill_min_tokens_) continue;
    const kc::MlaPrefillPlan plan =
        kc::PlanMlaPrefill(sg.n_tokens, sg.pos0, static_cast<int32_t>(n_head),
                           static_cast<int32_t>(kvl), static_cast<int32_t>(hp_.n_rot), gu_.bytes());
    if (plan.queries_per_chunk <= 0) continue;
    if (done < sg.first_token) KTX_RETURN_IF_ERROR(MlaKernelRange(kv, b, done, sg.first_token));
    kc::MlaPrefillArgs a;
    a.q = big_q + sg.first_token * n_head * rw;
    a.q_stride = n_head * rw;
    a.n_q = sg.n_tokens;
    a.n_head = static_cast<int32_t>(n_head);
    a.kv_lora = static_cast<int32_t>(kvl);
    a.n_rot = static_cast<int32_t>(hp_.n_rot);
    a.scale = static_cast<float>(hp_.kq_scale);
    a.seq = sg.seq;
    a.pos0 = sg.pos0;
    a.kv = kv;
    a.out_bf16 = ctx_.as<Bf16>() + sg.first_token * n_head * kvl;
    const kc::MlaPrefillStatus st = kc::MlaPrefillAttention(cublas_, a, plan, gu_.get(), stream_);
    if (!st.ok()) {
      return absl::InternalError(absl::StrCat(
          "GPU attention of a prompt chunk (", sg.n_tokens, " tokens after ", sg.pos0, "), ",
          st.step, ": ",
          st.cuda != cudaSuccess ? cudaGetErrorString(st.cuda)
                                 : absl::StrCat("cuBLAS status ", static_cast<int>(st.cublas))));
    }
    ++mla_prefill_calls_;
    done = sg.first_token + sg.n_tokens;
  }
  if (done < n) KTX_RETURN_IF_ERROR(MlaKernelRange(kv, b, done, n));
  // o[t, h] = v_b[h] · ctx[t, h], then x += attn_output · o.
  KTX_RETURN_IF_ERROR(ProductBf16(w.attn_v_b, kvl, hdv * kvl, ctx_.as<Bf16>(), n_head * kvl, kvl,
                                  o_.get(), CUDA_R_16BF, n_head * hdv, hdv, hdv, kvl, n, n_head,
                                  0.0f, "attn_v_b"));
  return Linear(w.attn_output, n_embd, n_head * hdv, o_.as<Bf16>(), n_head * hdv, n, x, n_embd,
                1.0f, "attn_output");
}

absl::Status GpuLayerRunner::MlaKernelRange(const kc::MlaPagedKv& kv, const GpuBatchView& b,
                                            int64_t t0, int64_t t1) {
  const int64_t n_head = hp_.n_head;
  const int64_t kvl = hp_.kv_lora_rank;
  const int64_t rw = kvl + hp_.n_rot;
  kc::MlaAttentionArgs a;
  a.q = big_q_.as<float>() + t0 * n_head * rw;
  a.q_stride = n_head * rw;
  a.n_q = t1 - t0;
  a.n_head = static_cast<int32_t>(n_head);
  a.kv_lora = static_cast<int32_t>(kvl);
  a.n_rot = static_cast<int32_t>(hp_.n_rot);
  a.scale = static_cast<float>(hp_.kq_scale);
  a.q_seq = b.seq_index + t0;
  a.q_pos = b.positions + t0;
  a.kv = kv;
  a.out_bf16 = ctx_.as<Bf16>() + t0 * n_head * kvl;
  a.out_bf16_stride = n_head * kvl;
  kc::MlaAttentionPlan plan =
      kc::PlanMlaAttention(a.n_q, a.n_head, a.kv_lora, a.n_rot, b.max_kv_len, n_multiprocessors_,
                           attention_workspace_.bytes());
  plan.tensor_cores = plan.tensor_cores && attention_tensor_cores_;
  return CudaOk(kc::MlaAttention(a, plan, attention_workspace_.get(), stream_), "MLA attention");
}

absl::Status GpuLayerRunner::Norm(const float* norm, const float* x, int64_t n) {
  return CudaOk(kc::RmsNorm(x, hp_.n_embd, nullptr, norm, hp_.n_embd, n, hp_.rms_eps, h_f32(),
                            hp_.n_embd, h_bf16(), hp_.n_embd, stream_),
                "FFN norm");
}

absl::Status GpuLayerRunner::GatedFfn(const GpuMatrix& gate_up, const GpuMatrix& down, int64_t n_ff,
                                      int64_t n, float* out, int64_t out_stride, float beta) {
  if (n_ff > layout_.ff_max || n > layout_.max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU FFN of width ", n_ff, " for ", n, " tokens exceeds the work buffers"));
  }
  const int64_t n_embd = hp_.n_embd;
  float* gu = gu_.as<float>();
  KTX_RETURN_IF_ERROR(
      Linear(gate_up, 2 * n_ff, n_embd, h_bf16(), n_embd, n, gu, 2 * n_ff, 0.0f, "FFN gate/up"));
  KTX_RETURN_IF_ERROR(
      CudaOk(kc::SiluMulToBf16(gu, 2 * n_ff, n, n_ff, act_.as<Bf16>(), n_ff, stream_), "SiLU"));
  return Linear(down, n_embd, n_ff, act_.as<Bf16>(), n_ff, n, out, out_stride, beta, "FFN down");
}

absl::Status GpuLayerRunner::Linear(const GpuMatrix& m, int64_t n_out, int64_t n_in, const Bf16* x,
                                    int64_t ldx, int64_t n, float* y, int64_t ldy, float beta,
                                    const char* what) {
  if (m.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU product ", what, ": no weights on the device"));
  }
  if (TakesGemv(m, n)) {
    int64_t rows = 0;
    for (int p = 0; p < m.n_blocks; ++p) rows += m.blocks[p].n_rows;
    if (rows != n_out) {
      return absl::InternalError(absl::StrCat("GPU product ", what, ": blocks of ", rows,
                                              " rows for a matrix of ", n_out));
    }
    int64_t row0 = 0;
    for (int p = 0; p < m.n_blocks; ++p) {
      const GpuMatrix::Blocks& b = m.blocks[p];
      KTX_RETURN_IF_ERROR(
          CudaOk(kc::QuantGemv(b.type, b.data, b.row_bytes, b.n_rows, n_in, x, ldx, n, y + row0,
                               ldy, beta, gemv_workspace_.get(), gemv_workspace_.bytes(), stream_),
                 absl::StrCat(what, " (quantized GEMV, ", kernels::TraitsOf(b.type).name, ")")));
      row0 += b.n_rows;
    }
    ++gemv_calls_;
    return absl::OkStatus();
  }
  KTX_ASSIGN_OR_RETURN(const bool skinny, RunProductBf16(m.bf16, n_in, 0, x, ldx, 0, y, CUDA_R_32F,
                                                         ldy, 0, n_out, n_in, n, 1, beta, what));
  ++(skinny ? skinny_calls_ : cublas_calls_);
  return absl::OkStatus();
}

absl::Status GpuLayerRunner::ProductBf16(const Bf16* w, int64_t ldw, int64_t w_batch_stride,
                                         const Bf16* x, int64_t ldx, int64_t x_batch_stride,
                                         void* y, cudaDataType_t y_type, int64_t ldy,
                                         int64_t y_batch_stride, int64_t n_out, int64_t n_in,
                                         int64_t n, int64_t batch, float beta, const char* what) {
  return RunProductBf16(w, ldw, w_batch_stride, x, ldx, x_batch_stride, y, y_type, ldy,
                        y_batch_stride, n_out, n_in, n, batch, beta, what)
      .status();
}

absl::StatusOr<bool> GpuLayerRunner::RunProductBf16(
    const Bf16* w, int64_t ldw, int64_t w_batch_stride, const Bf16* x, int64_t ldx,
    int64_t x_batch_stride, void* y, cudaDataType_t y_type, int64_t ldy, int64_t y_batch_stride,
    int64_t n_out, int64_t n_in, int64_t n, int64_t batch, float beta, const char* what) {
  if (n <= skinny_max_tokens_) {
    kc::SkinnyGemmArgs a;
    a.w = w;
    a.ldw = ldw;
    a.w_batch_stride = w_batch_stride;
    a.x = x;
    a.ldx = ldx;
    a.x_batch_stride = x_batch_stride;
    a.y = y;
    a.y_bf16 = y_type == CUDA_R_16BF;
    a.ldy = ldy;
    a.y_batch_stride = y_batch_stride;
    a.n_out = n_out;
    a.n_in = n_in;
    a.n_tokens = n;
    a.batch = batch;
    a.beta = beta;
    const kc::SkinnyGemmPlan plan = kc::PlanSkinnyGemm(n_out, n_in, batch, n_multiprocessors_);
    if ((y_type == CUDA_R_32F || y_type == CUDA_R_16BF) &&
        kc::SkinnyGemmUnsupportedReason(a).empty() &&
        kc::SkinnyGemmWorkspaceBytes(plan) <= skinny_workspace_.bytes()) {
      KTX_RETURN_IF_ERROR(CudaOk(
          kc::SkinnyGemm(a, plan, skinny_workspace_.get(), skinny_workspace_.bytes(), stream_),
          absl::StrCat(what, " (skinny bf16 product)")));
      return true;
    }
  }
  KTX_RETURN_IF_ERROR(CublasOk(
      batch == 1 ? kc::LinearBf16(cublas_, w, ldw, x, ldx, y, y_type, ldy, n_out, n_in, n, beta)
                 : kc::LinearBf16Batched(cublas_, w, ldw, w_batch_stride, x, ldx, x_batch_stride, y,
                                         y_type, ldy, y_batch_stride, n_out, n_in, n, batch, beta),
      what));
  return false;
}

absl::Status GpuLayerRunner::Route(const GpuLayerWeights& w, int64_t n) {
  const int64_t n_expert = hp_.n_expert;
  KTX_RETURN_IF_ERROR(
      CublasOk(kc::LinearF32(cublas_, w.ffn_gate_inp, hp_.n_embd, h_f32(), hp_.n_embd,
                             router_logits_.as<float>(), n_expert, n_expert, hp_.n_embd, n),
               "router"));
  return CudaOk(kc::RouteTopK(routing_, router_logits_.as<float>(), n_expert, n, w.exp_probs_b,
                              expert_ids(), expert_weights(), stream_),
                "routing");
}

}  // namespace ktx::gpu
