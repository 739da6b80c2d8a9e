#include "runtime/gpu/gpu_experts.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/basic_ops.h"
#include "kernels/cuda/dequant.h"
#include "kernels/cuda/experts.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemv.h"
#include "runtime/base/logging.h"
#include "runtime/base/status.h"

namespace ktx::gpu {

namespace kc = kernels::cuda;
using Bf16 = __nv_bfloat16;

namespace {

uint64_t Round256(uint64_t v) { return (v + 255) / 256 * 256; }

// A host callback's job: copy `bytes` from the mapping into the bounce buffer.
struct BounceJob {
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
};

void CUDART_CB RunBounceJob(void* arg) {
  BounceJob* job = static_cast<BounceJob*>(arg);
  std::memcpy(job->dst, job->src, job->bytes);
  delete job;
}

// Page-locked ranges of this process, shared by streamers over the same
// mapping (several engines or tests on one model): an identical range is
// registered once and unregistered by its last user. A range that overlaps a
// registered one without being identical is refused (the caller falls back
// to the bounce buffer).
struct HostRegistry {
  std::mutex mu;
  std::map<uintptr_t, std::pair<uintptr_t, int>> ranges;  // begin -> (end, users)
};
HostRegistry& Registry() {
  static HostRegistry* r = new HostRegistry;
  return *r;
}

cudaError_t RegisterShared(uintptr_t begin, uintptr_t end) {
  HostRegistry& r = Registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.ranges.find(begin);
  if (it != r.ranges.end() && it->second.first == end) {
    ++it->second.second;
    return cudaSuccess;
  }
  for (const auto& [b, e] : r.ranges) {
    if (b < end && begin < e.first) {
      KTX_LOG(WARNING, "gpu") << "expert weights [" << std::hex << begin << ", " << end
                              << ") overlap the page-locked range [" << b << ", " << e.first
                              << ") of another streamer (" << std::dec << e.second
                              << " users) without being identical";
      return cudaErrorHostMemoryAlreadyRegistered;
    }
  }
  void* start = reinterpret_cast<void*>(begin);
  cudaError_t err =
      cudaHostRegister(start, end - begin, cudaHostRegisterPortable | cudaHostRegisterReadOnly);
  if (err != cudaSuccess) {
    cudaGetLastError();
    err = cudaHostRegister(start, end - begin, cudaHostRegisterPortable);  // no read-only support
  }
  if (err == cudaSuccess) {
    r.ranges[begin] = {end, 1};
  } else {
    KTX_LOG(WARNING, "gpu") << "cudaHostRegister [" << std::hex << begin << ", " << end << std::dec
                            << "): " << cudaGetErrorString(err) << " (" << r.ranges.size()
                            << " ranges registered by streamers of this process)";
  }
  return err;
}

void UnregisterShared(uintptr_t begin) {
  HostRegistry& r = Registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.ranges.find(begin);
  if (it == r.ranges.end()) return;
  if (--it->second.second == 0) {
    cudaHostUnregister(reinterpret_cast<void*>(begin));
    r.ranges.erase(it);
  }
}

}  // namespace

uint64_t ExpertLayerTensors::ExpertSlotBytes(int64_t n_embd, int64_t n_ff) const {
  return Round256(static_cast<uint64_t>(n_ff * gate_row_bytes)) +
         Round256(static_cast<uint64_t>(n_ff * up_row_bytes)) +
         Round256(static_cast<uint64_t>(n_embd * down_row_bytes));
}

absl::StatusOr<std::vector<ExpertLayerTensors>> ExpertTensorsOf(
    const models::Deepseek2Hparams& hp, const models::Deepseek2Weights& weights) {
  std::vector<ExpertLayerTensors> layers(hp.n_layer);
  for (int il = 0; il < hp.n_layer; ++il) {
    if (!hp.IsMoeLayer(il)) continue;
    const models::Deepseek2LayerWeights& w = weights.layers[il];
    const gguf::TensorInfo* parts[3] = {w.ffn_gate_exps, w.ffn_up_exps, w.ffn_down_exps};
    for (int p = 0; p < 3; ++p) {
      const gguf::TensorInfo* t = parts[p];
      if (t == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", il,
                                                       " has no routed expert tensor ",
                                                       p == 0   ? "gate"
                                                       : p == 1 ? "up"
                                                                : "down"));
      }
      const int64_t cols = p == 2 ? hp.n_ff_exp : hp.n_embd;
      const int64_t rows = p == 2 ? hp.n_embd : hp.n_ff_exp;
      if (t->ne.size() != 3 || t->ne[0] != cols || t->ne[1] != rows || t->ne[2] != hp.n_expert) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", t->name, "' has shape ",
                                                       t->ShapeString(), ", expected {", cols, ", ",
                                                       rows, ", ", hp.n_expert, "}"));
      }
      if (!kc::CanDequantizeOnGpu(t->type)) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", t->name, "' has type ",
                                                       kernels::TraitsOf(t->type).name,
                                                       ", which the GPU cannot dequantize"));
      }
      if (t->data == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", t->name, "' is not mapped"));
      }
    }
    ExpertLayerTensors& l = layers[il];
    l.gate = w.ffn_gate_exps->data;
    l.up = w.ffn_up_exps->data;
    l.down = w.ffn_down_exps->data;
    l.gate_type = w.ffn_gate_exps->type;
    l.up_type = w.ffn_up_exps->type;
    l.down_type = w.ffn_down_exps->type;
    l.gate_row_bytes = w.ffn_gate_exps->row_bytes();
    l.up_row_bytes = w.ffn_up_exps->row_bytes();
    l.down_row_bytes = w.ffn_down_exps->row_bytes();
  }
  return layers;
}

absl::StatusOr<std::unique_ptr<GpuExpertStreamer>> GpuExpertStreamer::Create(
    const GpuExpertStreamerConfig& config, std::vector<ExpertLayerTensors> layers,
    cudaStream_t compute_stream) {
  if (config.n_embd <= 0 || config.n_ff <= 0 || config.n_expert <= 0 || config.n_expert_used <= 0 ||
      config.max_tokens <= 0 || config.n_slots < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GPU expert streamer: n_embd (", config.n_embd, "), n_ff (", config.n_ff, "), n_expert (",
        config.n_expert, "), n_expert_used (", config.n_expert_used, "), max_tokens (",
        config.max_tokens, ") must be positive and n_slots (", config.n_slots, ") >= 2"));
  }
  std::unique_ptr<GpuExpertStreamer> s(new GpuExpertStreamer());
  s->config_ = config;
  s->layers_ = std::move(layers);
  s->compute_ = compute_stream;
  uint64_t slot_bytes = 0;
  for (const ExpertLayerTensors& l : s->layers_) {
    if (l.present())
      slot_bytes = std::max(slot_bytes, l.ExpertSlotBytes(config.n_embd, config.n_ff));
  }
  if (slot_bytes == 0) return absl::InvalidArgumentError("GPU expert streamer: no MoE layer");
  models::Deepseek2Hparams hp;
  hp.n_embd = config.n_embd;
  hp.n_ff_exp = config.n_ff;
  hp.n_expert_used = config.n_expert_used;
  s->layout_ = ExpertStreamLayout::For(hp, config.max_tokens, config.n_slots, slot_bytes);
  const ExpertStreamLayout& l = s->layout_;
  const uint64_t kB = 2, kF = 4;
  KTX_ASSIGN_OR_RETURN(s->slots_,
                       DeviceBuffer::Allocate(l.n_slots * l.slot_bytes, "routed-expert slots"));
  KTX_ASSIGN_OR_RETURN(s->w_gate_up_,
                       DeviceBuffer::Allocate(kB * l.w_gate_up, "routed-expert gate/up (bf16)"));
  KTX_ASSIGN_OR_RETURN(s->w_down_,
                       DeviceBuffer::Allocate(kB * l.w_down, "routed-expert down (bf16)"));
  KTX_ASSIGN_OR_RETURN(s->xg_, DeviceBuffer::Allocate(kB * l.xg, "routed-expert input rows"));
  KTX_ASSIGN_OR_RETURN(s->gu_, DeviceBuffer::Allocate(kF * l.gu, "routed-expert gate/up out"));
  KTX_ASSIGN_OR_RETURN(s->act_, DeviceBuffer::Allocate(kB * l.act, "routed-expert activation"));
  KTX_ASSIGN_OR_RETURN(s->y_, DeviceBuffer::Allocate(kF * l.y, "routed-expert output"));
  KTX_ASSIGN_OR_RETURN(s->entries_, DeviceBuffer::Allocate(8 * l.entries, "routed-expert entries"));
  KTX_ASSIGN_OR_RETURN(s->cublas_workspace_,
                       DeviceBuffer::Allocate(l.cublas_workspace_bytes, "routed-expert cuBLAS"));
  for (int p = 0; p < 2; ++p) {
    KTX_ASSIGN_OR_RETURN(s->pinned_entries_[p],
                         PinnedBuffer::Allocate(8 * l.entries, "routed-expert entries"));
    KTX_RETURN_IF_ERROR(
        CudaOk(cudaEventCreateWithFlags(&s->entries_done_[p], cudaEventDisableTiming),
               "creating an event"));
  }
  KTX_RETURN_IF_ERROR(CudaOk(cudaStreamCreateWithFlags(&s->copy_, cudaStreamNonBlocking),
                             "creating the expert copy stream"));
  KTX_RETURN_IF_ERROR(CublasOk(cublasCreate(&s->cublas_), "creating a cuBLAS handle"));
  KTX_RETURN_IF_ERROR(CublasOk(cublasSetStream(s->cublas_, compute_stream), "cublasSetStream"));
  KTX_RETURN_IF_ERROR(CublasOk(
      cublasSetWorkspace(s->cublas_, s->cublas_workspace_.get(), s->cublas_workspace_.bytes()),
      "cublasSetWorkspace"));
  s->copied_.resize(l.n_slots, nullptr);
  s->freed_.resize(l.n_slots, nullptr);
  for (int i = 0; i < l.n_slots; ++i) {
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventCreateWithFlags(&s->copied_[i], cudaEventDisableTiming),
                               "creating an event"));
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventCreateWithFlags(&s->freed_[i], cudaEventDisableTiming),
                               "creating an event"));
    s->free_slots_.push_back(i);  // taken from the front: slot 0 first
  }
  absl::Status reg = config.register_host_memory
                         ? s->RegisterHostMemory()
                         : absl::FailedPreconditionError("register_host_memory is off");
  if (reg.ok()) {
    s->host_memory_ = HostMemoryMode::kRegistered;
    s->host_memory_note_ = "expert tensors page-locked in place (cudaHostRegister, read-only)";
  } else {
    s->host_memory_ = HostMemoryMode::kBounce;
    s->host_memory_note_ = absl::StrCat(
        "expert tensors NOT page-locked (", reg.message(),
        "): each expert goes through a pinned bounce buffer (host memcpy, then the copy)");
    KTX_ASSIGN_OR_RETURN(s->bounce_, PinnedBuffer::Allocate(l.slot_bytes, "expert bounce buffer"));
  }
  KTX_LOG(INFO, "gpu") << "routed-expert streaming: " << l.n_slots << " slots of "
                       << absl::StrFormat("%.1f MiB", l.slot_bytes / 1048576.0) << ", "
                       << absl::StrFormat("%.2f GiB", l.device_bytes() / 1073741824.0)
                       << " of device memory; " << s->host_memory_note_;
  return s;
}

GpuExpertStreamer::~GpuExpertStreamer() {
  if (copy_ != nullptr) cudaStreamSynchronize(copy_);
  if (compute_ != nullptr) cudaStreamSynchronize(compute_);
  for (void* p : registered_) UnregisterShared(reinterpret_cast<uintptr_t>(p));
  for (cudaEvent_t e : copied_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  for (cudaEvent_t e : freed_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  for (cudaEvent_t e : entries_done_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  for (cudaEvent_t e : timeline_events_) cudaEventDestroy(e);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (copy_ != nullptr) cudaStreamDestroy(copy_);
}

namespace {

// MemAvailable of /proc/meminfo in bytes; 0 when unknown.
uint64_t MemAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (in >> key >> kib) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

}  // namespace

absl::Status GpuExpertStreamer::RegisterHostMemory() {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const int64_t E = config_.n_expert;
  // Whole pages (the mapping covers them: mmap maps whole pages), merged where
  // tensors share or touch pages, so that every byte is registered once.
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  for (const ExpertLayerTensors& l : layers_) {
    if (!l.present()) continue;
    const std::pair<const uint8_t*, uint64_t> parts[3] = {
        {l.gate, static_cast<uint64_t>(E * config_.n_ff * l.gate_row_bytes)},
        {l.up, static_cast<uint64_t>(E * config_.n_ff * l.up_row_bytes)},
        {l.down, static_cast<uint64_t>(E * config_.n_embd * l.down_row_bytes)}};
    for (const auto& [p, n] : parts) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(p);
      ranges.emplace_back(a / page * page, (a + n + page - 1) / page * page);
    }
  }
  std::sort(ranges.begin(), ranges.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> merged;
  for (const auto& r : ranges) {
    if (!merged.empty() && r.first <= merged.back().second) {
      merged.back().second = std::max(merged.back().second, r.second);
    } else {
      merged.push_back(r);
    }
  }
  // Locking pins the pages in RAM next to the CPU shards' own repacked
  // copies: refuse (bounce path) when that would take more than half of the
  // memory the system has available now (e.g. a 377 GB DeepSeek-V3).
  uint64_t total = 0;
  for (const auto& [begin, end] : merged) total += end - begin;
  const uint64_t available = MemAvailableBytes();
  if (available > 0 && total > available / 2) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "locking %.1f GiB of mapped expert weights would take more than half of the %.1f GiB of "
        "memory available",
        total / 1073741824.0, available / 1073741824.0));
  }
  absl::Status status;
  for (const auto& [begin, end] : merged) {
    void* start = reinterpret_cast<void*>(begin);
    const cudaError_t err = RegisterShared(begin, end);
    if (err != cudaSuccess) {
      status = CudaOk(err, absl::StrCat("cudaHostRegister of ", end - begin,
                                        " bytes of mapped expert weights"));
      break;
    }
    registered_.push_back(start);
  }
  if (!status.ok()) {
    for (void* p : registered_) UnregisterShared(reinterpret_cast<uintptr_t>(p));
    registered_.clear();
  }
  return status;
}

absl::Status GpuExpertStreamer::CheckExperts(int il, std::span<const int32_t> experts) const {
  if (il < 0 || il >= static_cast<int>(layers_.size()) || !layers_[il].present()) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU expert streamer: layer ", il, " has no routed experts"));
  }
  std::vector<uint8_t> seen(config_.n_expert, 0);
  for (int32_t e : experts) {
    if (e < 0 || e >= config_.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat("GPU expert streamer: expert id ", e,
                                                     " outside [0, ", config_.n_expert, ")"));
    }
    if (seen[e]++) {
      return absl::InvalidArgumentError(
          absl::StrCat("GPU expert streamer: expert ", e, " listed twice for layer ", il));
    }
  }
  return absl::OkStatus();
}

absl::Status GpuExpertStreamer::CopyExpert(int il, int32_t expert, int slot) {
  const ExpertLayerTensors& l = layers_[il];
  const int64_t n_ff = config_.n_ff, n_embd = config_.n_embd;
  const uint64_t sizes[3] = {static_cast<uint64_t>(n_ff * l.gate_row_bytes),
                             static_cast<uint64_t>(n_ff * l.up_row_bytes),
                             static_cast<uint64_t>(n_embd * l.down_row_bytes)};
  const uint8_t* src[3] = {l.gate + expert * sizes[0], l.up + expert * sizes[1],
                           l.down + expert * sizes[2]};
  uint8_t* dst = slots_.as<uint8_t>() + static_cast<uint64_t>(slot) * layout_.slot_bytes;
  cudaEvent_t marks[3] = {nullptr, nullptr, nullptr};  // the copy timeline's, when on
  if (copy_timeline_) {
    while (timeline_events_.size() < timeline_used_ + 3) {
      cudaEvent_t e = nullptr;
      KTX_RETURN_IF_ERROR(CudaOk(cudaEventCreate(&e), "creating a copy timeline event"));
      timeline_events_.push_back(e);
    }
    for (int i = 0; i < 3; ++i) marks[i] = timeline_events_[timeline_used_ + i];
    timeline_used_ += 3;
    timeline_bytes_.push_back(sizes[0] + sizes[1] + sizes[2]);
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(marks[0], copy_), "cudaEventRecord"));
  }
  KTX_RETURN_IF_ERROR(CudaOk(cudaStreamWaitEvent(copy_, freed_[slot], 0), "cudaStreamWaitEvent"));
  if (marks[1] != nullptr) {
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(marks[1], copy_), "cudaEventRecord"));
  }
  uint64_t off = 0;
  for (int p = 0; p < 3; ++p) {
    if (host_memory_ == HostMemoryMode::kRegistered) {
      KTX_RETURN_IF_ERROR(
          CudaOk(cudaMemcpyAsync(dst + off, src[p], sizes[p], cudaMemcpyHostToDevice, copy_),
                 absl::StrCat("copying expert ", expert, " of layer ", il)));
    } else {
      // Stream order keeps the one bounce buffer safe: its next fill runs after this copy.
      BounceJob* job = new BounceJob{bounce_.as<uint8_t>(), src[p], sizes[p]};
      const cudaError_t err = cudaLaunchHostFunc(copy_, RunBounceJob, job);
      if (err != cudaSuccess) {
        delete job;
        return CudaOk(err, "cudaLaunchHostFunc (expert bounce copy)");
      }
      KTX_RETURN_IF_ERROR(CudaOk(cudaMemcpyAsync(dst + off, bounce_.as<uint8_t>(), sizes[p],
                                                 cudaMemcpyHostToDevice, copy_),
                                 absl::StrCat("copying expert ", expert, " of layer ", il)));
    }
    off += Round256(sizes[p]);
  }
  KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(copied_[slot], copy_), "cudaEventRecord"));
  if (marks[2] != nullptr) {
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(marks[2], copy_), "cudaEventRecord"));
  }
  ++stats_.experts_copied;
  stats_.bytes_copied += sizes[0] + sizes[1] + sizes[2];
  return absl::OkStatus();
}

absl::StatusOr<GpuExpertStreamer::CopyTimeline> GpuExpertStreamer::TakeCopyTimeline() {
  CopyTimeline t;
  const size_t n = timeline_used_ / 3;
  if (n == 0) return t;
  const cudaEvent_t* ev = timeline_events_.data();
  KTX_RETURN_IF_ERROR(CudaOk(cudaEventSynchronize(ev[3 * n - 1]), "waiting for the expert copies"));
  auto ms = [](cudaEvent_t a, cudaEvent_t b, double* out) {
    float v = 0;
    const cudaError_t err = cudaEventElapsedTime(&v, a, b);
    *out = v;
    return CudaOk(err, "timing the expert copies");
  };
  for (size_t i = 0; i < n; ++i) {
    double wait = 0, copy = 0, gap = 0;
    KTX_RETURN_IF_ERROR(ms(ev[3 * i], ev[3 * i + 1], &wait));
    KTX_RETURN_IF_ERROR(ms(ev[3 * i + 1], ev[3 * i + 2], &copy));
    if (i > 0) KTX_RETURN_IF_ERROR(ms(ev[3 * i - 1], ev[3 * i], &gap));
    t.slot_wait_ms += wait;
    t.busy_ms += copy;
    t.not_issued_ms += gap;
    t.bytes += timeline_bytes_[i];
  }
  KTX_RETURN_IF_ERROR(ms(ev[0], ev[3 * n - 1], &t.span_ms));
  t.copies = static_cast<int64_t>(n);
  t.first = ev[0];
  t.last = ev[3 * n - 1];
  timeline_used_ = 0;
  timeline_bytes_.clear();
  return t;
}

absl::Status GpuExpertStreamer::Issue() {
  for (Pending& p : queue_) {
    if (free_slots_.empty()) break;
    if (p.slot >= 0) continue;
    p.slot = free_slots_.front();
    free_slots_.pop_front();
    KTX_RETURN_IF_ERROR(CopyExpert(p.il, p.expert, p.slot));
  }
  return absl::OkStatus();
}

absl::Status GpuExpertStreamer::Prefetch(int il, std::span<const int32_t> experts) {
  KTX_RETURN_IF_ERROR(CheckExperts(il, experts));
  for (int32_t e : experts) queue_.push_back({il, e, -1});
  return Issue();
}

absl::Status GpuExpertStreamer::Dequantize(int il, int slot) {
  return DequantizeFrom(il,
                        slots_.as<uint8_t>() + static_cast<uint64_t>(slot) * layout_.slot_bytes);
}

absl::Status GpuExpertStreamer::DequantizeFrom(int il, const uint8_t* src) {
  const ExpertLayerTensors& l = layers_[il];
  const int64_t n_ff = config_.n_ff, n_embd = config_.n_embd;
  const uint64_t gate_bytes = Round256(static_cast<uint64_t>(n_ff * l.gate_row_bytes));
  const uint64_t up_bytes = Round256(static_cast<uint64_t>(n_ff * l.up_row_bytes));
  Bf16* gu = w_gate_up_.as<Bf16>();
  KTX_RETURN_IF_ERROR(CudaOk(
      kc::DequantizeToBf16(l.gate_type, src, l.gate_row_bytes, n_ff, n_embd, gu, n_embd, compute_),
      "dequantizing an expert's gate"));
  KTX_RETURN_IF_ERROR(CudaOk(kc::DequantizeToBf16(l.up_type, src + gate_bytes, l.up_row_bytes, n_ff,
                                                  n_embd, gu + n_ff * n_embd, n_embd, compute_),
                             "dequantizing an expert's up"));
  return CudaOk(kc::DequantizeToBf16(l.down_type, src + gate_bytes + up_bytes, l.down_row_bytes,
                                     n_embd, n_ff, w_down_.as<Bf16>(), n_ff, compute_),
                "dequantizing an expert's down");
}

absl::Status GpuExpertStreamer::RunExpert(int64_t m, const int32_t* rows, const float* weights,
                                          const Bf16* h, int64_t h_stride, float* acc,
                                          int64_t acc_stride) {
  const int64_t n_ff = config_.n_ff, n_embd = config_.n_embd;
  Bf16* xg = xg_.as<Bf16>();
  KTX_RETURN_IF_ERROR(CudaOk(kc::GatherRowsBf16(h, h_stride, rows, m, n_embd, xg, n_embd, compute_),
                             "gathering an expert's tokens"));
  KTX_RETURN_IF_ERROR(CublasOk(kc::LinearBf16(cublas_, w_gate_up_.as<Bf16>(), n_embd, xg, n_embd,
                                              gu_.get(), CUDA_R_32F, 2 * n_ff, 2 * n_ff, n_embd, m),
                               "expert gate/up"));
  KTX_RETURN_IF_ERROR(
      CudaOk(kc::SiluMulToBf16(gu_.as<float>(), 2 * n_ff, m, n_ff, act_.as<Bf16>(), n_ff, compute_),
             "expert SiLU"));
  KTX_RETURN_IF_ERROR(CublasOk(kc::LinearBf16(cublas_, w_down_.as<Bf16>(), n_ff, act_.as<Bf16>(),
                                              n_ff, y_.get(), CUDA_R_32F, n_embd, n_embd, n_ff, m),
                               "expert down"));
  return CudaOk(kc::ScatterAddWeightedRows(y_.as<float>(), n_embd, rows, weights, m, n_embd, acc,
                                           acc_stride, compute_),
                "expert weighted add");
}

bool GpuExpertStreamer::GemvReads(int il) const {
  if (il < 0 || il >= static_cast<int>(layers_.size()) || !layers_[il].present()) return false;
  const ExpertLayerTensors& l = layers_[il];
  auto reads = [](kernels::TensorType type, int64_t n_in, int64_t row_bytes) {
    if (!kc::CanQuantGemv(type) || n_in % 32 != 0 ||
        n_in % kernels::TraitsOf(type).block_size != 0) {
      return false;
    }
    return (type != kernels::TensorType::kQ4_K && type != kernels::TensorType::kQ5_K) ||
           row_bytes % 16 == 0;
  };
  return reads(l.gate_type, config_.n_embd, l.gate_row_bytes) &&
         reads(l.up_type, config_.n_embd, l.up_row_bytes) &&
         reads(l.down_type, config_.n_ff, l.down_row_bytes);
}

absl::Status GpuExpertStreamer::RunExpertGemv(int il, const uint8_t* src, int64_t m,
                                              const int32_t* rows, const float* weights,
                                              const Bf16* h, int64_t h_stride, float* acc,
                                              int64_t acc_stride) {
  const ExpertLayerTensors& l = layers_[il];
  const int64_t n_ff = config_.n_ff, n_embd = config_.n_embd;
  // The slot layout: gate, up, down, each part rounded up to 256 bytes (so
  // every part is 16-byte aligned and readable past its last row).
  const uint64_t gate_bytes = Round256(static_cast<uint64_t>(n_ff * l.gate_row_bytes));
  const uint64_t up_bytes = Round256(static_cast<uint64_t>(n_ff * l.up_row_bytes));
  Bf16* xg = xg_.as<Bf16>();
  float* gu = gu_.as<float>();
  KTX_RETURN_IF_ERROR(CudaOk(kc::GatherRowsBf16(h, h_stride, rows, m, n_embd, xg, n_embd, compute_),
                             "gathering an expert's tokens"));
  KTX_RETURN_IF_ERROR(CudaOk(kc::QuantGemv(l.gate_type, src, l.gate_row_bytes, n_ff, n_embd, xg,
                                           n_embd, m, gu, 2 * n_ff, 0.0f, compute_),
                             "expert gate (quantized GEMV)"));
  KTX_RETURN_IF_ERROR(
      CudaOk(kc::QuantGemv(l.up_type, src + gate_bytes, l.up_row_bytes, n_ff, n_embd, xg, n_embd, m,
                           gu + n_ff, 2 * n_ff, 0.0f, compute_),
             "expert up (quantized GEMV)"));
  KTX_RETURN_IF_ERROR(CudaOk(
      kc::SiluMulToBf16(gu, 2 * n_ff, m, n_ff, act_.as<Bf16>(), n_ff, compute_), "expert SiLU"));
  KTX_RETURN_IF_ERROR(
      CudaOk(kc::QuantGemv(l.down_type, src + gate_bytes + up_bytes, l.down_row_bytes, n_embd, n_ff,
                           act_.as<Bf16>(), n_ff, m, y_.as<float>(), n_embd, 0.0f, compute_),
             "expert down (quantized GEMV)"));
  return CudaOk(kc::ScatterAddWeightedRows(y_.as<float>(), n_embd, rows, weights, m, n_embd, acc,
                                           acc_stride, compute_),
                "expert weighted add");
}

absl::Status GpuExpertStreamer::Compute(int il, std::span<const int32_t> experts,
                                        const models::Routing& routing, const Bf16* h,
                                        int64_t h_stride, float* acc, int64_t acc_stride) {
  KTX_RETURN_IF_ERROR(CheckExperts(il, experts));
  const int64_t n = routing.n_tokens;
  const int32_t K = routing.n_expert_used;
  if (n < 0 || n > config_.max_tokens || K < 0 ||
      static_cast<int64_t>(routing.expert_ids.size()) != n * K ||
      routing.weights.size() != routing.expert_ids.size() || n * K > layout_.entries) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GPU expert streamer: routing of ", n, " tokens x ", K, " entries (",
        routing.expert_ids.size(), " ids, ", routing.weights.size(), " weights) does not fit ",
        config_.max_tokens, " tokens x ", config_.n_expert_used));
  }
  if (h == nullptr || acc == nullptr || h_stride < config_.n_embd || acc_stride < config_.n_embd) {
    return absl::InvalidArgumentError("GPU expert streamer: bad h or accumulator");
  }
  // Resident experts run from device memory; the rest are streamed.
  std::vector<int32_t> resident, streamed;
  for (int32_t e : experts) (IsResident(il, e) ? resident : streamed).push_back(e);
  // Planned copies must be this layer's, in the order of the streamed experts.
  size_t n_planned = 0;
  for (const Pending& p : queue_) {
    if (p.il != il || n_planned >= streamed.size() || p.expert != streamed[n_planned]) {
      return absl::FailedPreconditionError(absl::StrCat(
          "GPU expert streamer: copies planned for layer ", p.il, " (expert ", p.expert,
          ") do not match Compute for layer ", il, "; Reset() cancels them"));
    }
    ++n_planned;
  }
  // Token lists per expert (ascending token order), into the pinned staging.
  std::vector<int64_t> count(config_.n_expert, 0);
  for (int64_t i = 0; i < n * K; ++i) {
    const int32_t e = routing.expert_ids[i];
    if (e == models::kNoExpert) continue;
    if (e < 0 || e >= config_.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat("GPU expert streamer: routing entry ", i,
                                                     " names expert ", e, ", outside [0, ",
                                                     config_.n_expert, ")"));
    }
    ++count[e];
  }
  std::vector<int64_t> offset(config_.n_expert, -1);
  int64_t total = 0;
  for (int32_t e : experts) {
    offset[e] = total;
    total += count[e];
  }
  const int parity = entries_parity_;
  entries_parity_ ^= 1;
  KTX_RETURN_IF_ERROR(CudaOk(cudaEventSynchronize(entries_done_[parity]),
                             "waiting for the routing staging buffer"));
  int32_t* h_rows = pinned_entries_[parity].as<int32_t>();
  float* h_weights = reinterpret_cast<float*>(h_rows + layout_.entries);
  {
    std::vector<int64_t> fill = offset;
    for (int64_t t = 0; t < n; ++t) {
      for (int32_t k = 0; k < K; ++k) {
        const int32_t e = routing.expert_ids[t * K + k];
        if (e == models::kNoExpert || fill[e] < 0) continue;
        h_rows[fill[e]] = static_cast<int32_t>(t);
        h_weights[fill[e]] = routing.weights[t * K + k];
        ++fill[e];
      }
    }
  }
  int32_t* d_rows = entries_.as<int32_t>();
  float* d_weights = reinterpret_cast<float*>(d_rows + layout_.entries);
  if (total > 0) {
    KTX_RETURN_IF_ERROR(
        CudaOk(cudaMemcpyAsync(d_rows, h_rows, total * 4, cudaMemcpyHostToDevice, compute_),
               "uploading expert token lists"));
    KTX_RETURN_IF_ERROR(
        CudaOk(cudaMemcpyAsync(d_weights, h_weights, total * 4, cudaMemcpyHostToDevice, compute_),
               "uploading expert weights"));
  }
  KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(entries_done_[parity], compute_), "cudaEventRecord"));
  // Resident experts first: nothing to copy. Few tokens: GEMVs on the blocks.
  const bool gemv_layer = !resident.empty() && GemvReads(il);
  for (int32_t e : resident) {
    const int64_t m = count[e];
    if (m == 0) continue;
    const uint8_t* src = resident_.as<uint8_t>() + resident_offset_[il][e];
    if (gemv_layer && m <= config_.gemv_max_tokens) {
      KTX_RETURN_IF_ERROR(RunExpertGemv(il, src, m, d_rows + offset[e], d_weights + offset[e], h,
                                        h_stride, acc, acc_stride));
      ++stats_.resident_gemv_experts;
    } else {
      KTX_RETURN_IF_ERROR(DequantizeFrom(il, src));
      KTX_RETURN_IF_ERROR(
          RunExpert(m, d_rows + offset[e], d_weights + offset[e], h, h_stride, acc, acc_stride));
    }
    ++stats_.experts_computed;
    stats_.tokens_computed += m;
    ++stats_.resident_experts_computed;
    stats_.resident_tokens_computed += m;
  }
  // Streamed experts not prefetched: copy only those with tokens.
  for (size_t j = n_planned; j < streamed.size(); ++j) {
    if (count[streamed[j]] > 0) queue_.push_back({il, streamed[j], -1});
  }
  KTX_RETURN_IF_ERROR(Issue());
  const bool gemv_layer_streamed = !streamed.empty() && GemvReads(il);
  for (size_t j = 0; j < streamed.size(); ++j) {
    const int32_t e = streamed[j];
    const bool queued = !queue_.empty() && queue_.front().expert == e && queue_.front().il == il;
    if (!queued) continue;  // not prefetched and no token
    const int slot = queue_.front().slot;
    KTX_CHECK(slot >= 0);  // the front of the queue is always issued
    KTX_RETURN_IF_ERROR(
        CudaOk(cudaStreamWaitEvent(compute_, copied_[slot], 0), "cudaStreamWaitEvent"));
    const int64_t m = count[e];
    // Few tokens (a decode split): three quantized GEMVs straight from the
    // slot, which is released after them; else dequantize, release, GEMMs.
    const bool gemv = m > 0 && m <= config_.gemv_max_tokens && gemv_layer_streamed;
    if (gemv) {
      KTX_RETURN_IF_ERROR(RunExpertGemv(
          il, slots_.as<uint8_t>() + static_cast<uint64_t>(slot) * layout_.slot_bytes, m,
          d_rows + offset[e], d_weights + offset[e], h, h_stride, acc, acc_stride));
      ++stats_.streamed_gemv_experts;
    } else {
      KTX_RETURN_IF_ERROR(Dequantize(il, slot));
    }
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(freed_[slot], compute_), "cudaEventRecord"));
    queue_.pop_front();
    free_slots_.push_back(slot);
    KTX_RETURN_IF_ERROR(Issue());
    if (m == 0) continue;
    if (!gemv) {
      KTX_RETURN_IF_ERROR(
          RunExpert(m, d_rows + offset[e], d_weights + offset[e], h, h_stride, acc, acc_stride));
    }
    ++stats_.experts_computed;
    stats_.tokens_computed += m;
  }
  return absl::OkStatus();
}

absl::Status GpuExpertStreamer::LoadResident(std::span<const std::vector<int32_t>> experts) {
  const int n_layer = static_cast<int>(layers_.size());
  if (static_cast<int>(experts.size()) > n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("resident experts: ", experts.size(),
                                                   " layers given, the model has ", n_layer));
  }
  std::vector<std::vector<int64_t>> offsets(n_layer);
  std::vector<std::vector<int32_t>> ids(n_layer);
  uint64_t total = 0;
  int64_t count = 0;
  for (int il = 0; il < static_cast<int>(experts.size()); ++il) {
    if (experts[il].empty()) continue;
    if (!layers_[il].present()) {
      return absl::InvalidArgumentError(
          absl::StrCat("resident experts, layer ", il, ": not a MoE layer"));
    }
    offsets[il].assign(config_.n_expert, -1);
    const uint64_t bytes = layers_[il].ExpertSlotBytes(config_.n_embd, config_.n_ff);
    for (int32_t e : experts[il]) {
      if (e < 0 || e >= config_.n_expert) {
        return absl::InvalidArgumentError(absl::StrCat("resident experts, layer ", il, ": expert ",
                                                       e, " outside [0, ", config_.n_expert, ")"));
      }
      if (offsets[il][e] >= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("resident experts, layer ", il, ": expert ", e, " given twice"));
      }
      offsets[il][e] = static_cast<int64_t>(total);
      total += bytes;
      ++count;
    }
    ids[il] = experts[il];
    std::sort(ids[il].begin(), ids[il].end());
  }
  KTX_RETURN_IF_ERROR(Reset());
  resident_ = DeviceBuffer();
  if (total > 0) {
    KTX_ASSIGN_OR_RETURN(resident_, DeviceBuffer::Allocate(total, "hot routed experts (resident)"));
    KTX_ASSIGN_OR_RETURN(PinnedBuffer staging,
                         PinnedBuffer::Allocate(layout_.slot_bytes, "resident expert staging"));
    for (int il = 0; il < n_layer; ++il) {
      const ExpertLayerTensors& l = layers_[il];
      const int64_t n_ff = config_.n_ff, n_embd = config_.n_embd;
      const uint64_t sizes[3] = {static_cast<uint64_t>(n_ff * l.gate_row_bytes),
                                 static_cast<uint64_t>(n_ff * l.up_row_bytes),
                                 static_cast<uint64_t>(n_embd * l.down_row_bytes)};
      for (int32_t e : ids[il]) {
        const uint8_t* src[3] = {l.gate + e * sizes[0], l.up + e * sizes[1], l.down + e * sizes[2]};
        // Through pinned memory: the mapping may be page-locked only in part
        // (whole pages of the expert tensors), and a copy from a range that is
        // partly registered fails.
        uint64_t off = 0;
        for (int p = 0; p < 3; ++p) {
          std::memcpy(staging.as<uint8_t>() + off, src[p], sizes[p]);
          off += Round256(sizes[p]);
        }
        KTX_RETURN_IF_ERROR(CudaOk(cudaMemcpy(resident_.as<uint8_t>() + offsets[il][e],
                                              staging.as<uint8_t>(), off, cudaMemcpyHostToDevice),
                                   absl::StrCat("loading resident expert ", e, " of layer ", il)));
      }
    }
  }
  resident_offset_ = std::move(offsets);
  resident_ids_ = std::move(ids);
  n_resident_ = count;
  KTX_LOG(INFO, "gpu") << "hot routed experts resident on the GPU: " << count << " ("
                       << absl::StrFormat("%.2f GiB", total / 1073741824.0) << ")";
  return absl::OkStatus();
}

std::vector<int32_t> GpuExpertStreamer::DropUnissued(int il) {
  std::erase_if(queue_, [il](const Pending& p) { return p.il == il && p.slot < 0; });
  std::vector<int32_t> kept;
  for (const Pending& p : queue_) {
    if (p.il == il) kept.push_back(p.expert);
  }
  return kept;
}

int64_t GpuExpertStreamer::CopiesFinished(int il) const {
  int64_t n = 0;
  for (const Pending& p : queue_) {
    if (p.il != il || p.slot < 0) continue;
    // One copy stream: copies finish in issue order, so stop at the first in flight.
    if (cudaEventQuery(copied_[p.slot]) != cudaSuccess) break;
    ++n;
  }
  return n;
}

absl::Status GpuExpertStreamer::Reset() {
  absl::Status s = CudaOk(cudaStreamSynchronize(copy_), "synchronising the expert copy stream");
  absl::Status c = CudaOk(cudaStreamSynchronize(compute_), "synchronising the compute stream");
  for (const Pending& p : queue_) {
    if (p.slot >= 0) free_slots_.push_back(p.slot);
  }
  queue_.clear();
  return s.ok() ? c : s;
}

absl::Status GpuExpertStreamer::Calibrate(ExpertCostModel* model) {
  if (!queue_.empty()) {
    return absl::FailedPreconditionError("GPU expert streamer: Calibrate with copies planned");
  }
  int il = 0;
  while (!layers_[il].present()) ++il;
  const int n_copy = std::min<int>(std::min(layout_.n_slots, 8), config_.n_expert);
  cudaEvent_t t0 = nullptr, t1 = nullptr;
  KTX_RETURN_IF_ERROR(CudaOk(cudaEventCreate(&t0), "cudaEventCreate"));
  KTX_RETURN_IF_ERROR(CudaOk(cudaEventCreate(&t1), "cudaEventCreate"));
  auto elapsed = [&](cudaStream_t st, float* ms) -> absl::Status {
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(t1, st), "cudaEventRecord"));
    KTX_RETURN_IF_ERROR(CudaOk(cudaEventSynchronize(t1), "calibration"));
    return CudaOk(cudaEventElapsedTime(ms, t0, t1), "cudaEventElapsedTime");
  };
  absl::Status status = [&]() -> absl::Status {
    // 1. H2D: n_copy experts, twice (the first pass warms up), into distinct slots.
    float copy_ms = 0;
    uint64_t bytes = 0;
    for (int pass = 0; pass < 2; ++pass) {
      const uint64_t before = stats_.bytes_copied;
      KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(t0, copy_), "cudaEventRecord"));
      for (int e = 0; e < n_copy; ++e) KTX_RETURN_IF_ERROR(CopyExpert(il, e, e));
      KTX_RETURN_IF_ERROR(elapsed(copy_, &copy_ms));
      bytes = stats_.bytes_copied - before;
    }
    if (!(copy_ms > 0)) return absl::InternalError("calibration: copies took no time");
    model->pcie_bytes_per_s = static_cast<double>(bytes) / (copy_ms * 1e-3);
    // 2. GEMM rate at expert shape: gate/up of 256 tokens (zero inputs).
    const int64_t m = std::min<int64_t>(256, config_.max_tokens);
    const int64_t n_ff = config_.n_ff, n_embd = config_.n_embd;
    KTX_RETURN_IF_ERROR(CudaOk(cudaMemsetAsync(xg_.get(), 0, xg_.bytes(), compute_), "memset"));
    KTX_RETURN_IF_ERROR(Dequantize(il, 0));
    float gemm_ms = 0;
    for (int pass = 0; pass < 2; ++pass) {
      KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(t0, compute_), "cudaEventRecord"));
      for (int r = 0; r < 4; ++r) {
        KTX_RETURN_IF_ERROR(
            CublasOk(kc::LinearBf16(cublas_, w_gate_up_.as<Bf16>(), n_embd, xg_.as<Bf16>(), n_embd,
                                    gu_.get(), CUDA_R_32F, 2 * n_ff, 2 * n_ff, n_embd, m),
                     "calibration GEMM"));
      }
      KTX_RETURN_IF_ERROR(elapsed(compute_, &gemm_ms));
    }
    if (!(gemm_ms > 0)) return absl::InternalError("calibration: GEMMs took no time");
    model->gpu_flops_per_s = 4.0 * 2.0 * m * 2 * n_ff * n_embd / (gemm_ms * 1e-3);
    // 3. Fixed time per expert: dequantize + the FFN of one token, over n_copy experts.
    int32_t* d_rows = entries_.as<int32_t>();
    KTX_RETURN_IF_ERROR(CudaOk(cudaMemsetAsync(d_rows, 0, 8, compute_), "memset"));
    float fixed_ms = 0;
    for (int pass = 0; pass < 2; ++pass) {
      KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(t0, compute_), "cudaEventRecord"));
      for (int e = 0; e < n_copy; ++e) {
        KTX_RETURN_IF_ERROR(Dequantize(il, e));
        // acc = y itself (each element read and written by one thread): timing only.
        KTX_RETURN_IF_ERROR(RunExpert(1, d_rows, reinterpret_cast<const float*>(d_rows + 1),
                                      xg_.as<Bf16>(), n_embd, y_.as<float>(), n_embd));
      }
      KTX_RETURN_IF_ERROR(elapsed(compute_, &fixed_ms));
    }
    model->gpu_expert_fixed_s = fixed_ms * 1e-3 / n_copy;
    for (int e = 0; e < n_copy; ++e) {
      KTX_RETURN_IF_ERROR(CudaOk(cudaEventRecord(freed_[e], compute_), "cudaEventRecord"));
    }
    return absl::OkStatus();
  }();
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  KTX_RETURN_IF_ERROR(status);
  return Reset();
}

}  // namespace ktx::gpu
