// File: actors/gpu_attention_actor.h
//
// The GPU implementation of the attention actor (the typed interface of
// actors/attention_actor.h: step_atom / kv_free_atom / kv_stats_atom): the
// model's non-expert stages (embedding, attention, dense layers, shared
// experts, routing, head) run on one CUDA GPU through
// runtime/gpu/CudaDeepseek2 with its paged bf16 latent KV cache, while the
// routed experts of every MoE layer are computed by the expert shard actors
// (local or remote) through the router, exactly as for the CPU actor.
//
// One step (a StepRequest) is ONE job on the attention CpuArena (never on a
// CAF thread): it calls CudaDeepseek2::ForwardBatch for the step's valid
// slices with a routed-experts hook. In each MoE layer the hook, running on
// that arena thread while the shared expert is already enqueued on the GPU
// stream, sends MoeWork to the router and blocks for the MoeResult (a hidden
// caf::scoped_actor that monitors the router; a deadline), sums the placed
// partials in the router's fixed order (actors/moe_combine.h, the same code
// as the CPU actor) and hands the sum back to the GPU for the residual add.
// Rows the router could not serve (MoeResult::failed_rows: a shard down, no
// replica, a shard deadline) get zeros and fail the slices that own them:
// those slices alone fail, their KV rows are not committed
// (ForwardHooks::commit = false; the job commits the others). The router
// going down fails the step with UNAVAILABLE, the router not answering within
// `moe_deadline` with DEADLINE_EXCEEDED, both naming the router and layer.
//
// Routing policies (routing_policy.h): the GPU routes every row full; a
// ForwardHooks::adjust_routing hook applies each slice's policy (or the
// model's) with ApplyRoutingPolicies, as the CPU actor does, to the FULL
// routing before CudaDeepseek2 splits it between its GPU experts (resident
// hot experts, streamed experts) and the routed-experts hook, so a policy
// gives the same result whatever the split. Expert deferral is not
// implemented here: a slice whose policy defers fails with UNIMPLEMENTED.
//
// Slices: new_capacity > 0 adds the sequence to the GPU KV cache; kv_free_atom
// frees it (deferred to the end of the running step while a step is in
// flight: the actor never touches the GPU object while a job uses it);
// per-slice errors as the CPU actor (sequence twice in a step, empty slice,
// token outside the vocabulary, no KV cache, no room: the slice fails alone).
// KvStats: the paged allocator's pages in bytes of the bf16 GPU cache
// (budget = the planned cache, used = pages in use, free_tokens = free pages
// x page size), refreshed whenever no step is in flight.
//
// Profile (AttentionConfig::profile): per MoE layer `attention_us` is the
// host wall time of the GPU work since the previous MoE layer's hook returned
// (that layer's residual add, any dense layers, this layer's attention, norm
// and routing: the GPU runs them asynchronously, the host waits for them at
// the routing download), `moe_us` the hook's wait for the router,
// `experts_us` the critical shard, `shard_us` each shard's compute,
// `dispatch_us` = moe_us - experts_us; `head_us` the rest of the step after
// the last MoE layer (trailing layers, head, logits download, commits). The
// shared expert overlaps the wait on the GPU and is not timed separately.
//
// Built with KTX_CUDA only (ktx_actors then links ktx_gpu); otherwise
// SpawnGpuAttention fails with FailedPrecondition "ktx was built without
// CUDA".
//
// Ownership: the CudaDeepseek2 object (GPU weights, KV cache, streams) lives
// in state shared by the actor and its running job, so killing the actor
// mid-step frees nothing the job uses; the model is shared. The arena and
// the actor system are not owned and must outlive the actor's jobs.
#pragma once

#include <chrono>
#include <cstdint>

#include "absl/status/statusor.h"
#include "actors/attention_actor.h"
#include "runtime/gpu/memory_plan.h"

namespace ktx::actors {

struct GpuAttentionOptions {
  // device, max_batch_tokens (tokens of one step), max_sequences, max_context,
  // kv_tokens (the KV cache in tokens; 0: what fits), page size, reserve.
  // AttentionConfig::kv_budget_bytes is not used: the cache is kv_tokens.
  gpu::CudaModelOptions gpu;
  // Longest wait for the router's answer to one MoE layer (it answers within
  // its shard deadlines; this only catches a router that hangs).
  std::chrono::milliseconds moe_deadline{120000};
};

// True when ktx_actors was built with the GPU attention actor (KTX_CUDA).
bool GpuAttentionAvailable();

// Loads the model's non-expert weights onto options.gpu.device and spawns
// the actor; `plan` (optional) receives the GPU memory plan. Errors:
// FailedPrecondition without CUDA in the build or without a usable device,
// InvalidArgument for a bad device index or options, ResourceExhausted with
// the memory plan when it does not fit.
absl::StatusOr<attention_actor> SpawnGpuAttention(caf::actor_system& system, AttentionConfig config,
                                                  GpuAttentionOptions options,
                                                  gpu::GpuMemoryPlan* plan = nullptr);

}  // namespace ktx::actors
