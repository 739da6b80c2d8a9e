// File: actors/moe_split.h
//
// How one MoE request (MoeWork) is split between expert shards: validation,
// the choice of a holder per expert (the live holder with the least load,
// ties to the lower shard index), the grouping of rows by shard, and the
// re-assignment of a failed part's experts to replicas. Plain functions over
// plain data, shared by the router actor (router_actor.h) and the in-process
// lane (local_lane.h) so that both split a request the same way and name
// failures the same way.
//
//   KTX_RETURN_IF_ERROR(ValidateMoeWork(work, holders, n_expert));
//   MoeSplit split = SplitMoeWork(work, holders[work.il], n_expert, view);
//   for (const MoePart& part : split.parts) send(MakeExpertWork(work, part));
//
// Thread-safety: pure functions; the ShardView's vectors are only read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "actors/messages.h"

namespace ktx::actors {

// holders[il][e] = ascending indices of the shards holding expert e of layer
// il ([n_layer][n_expert]; empty rows for dense layers).
using HolderTable = std::vector<std::vector<std::vector<int>>>;

// One shard's share of a MoE request.
struct MoePart {
  int shard = 0;
  std::vector<int32_t> rows;  // ascending batch rows
  std::vector<uint8_t> mask;  // [n_expert] nonzero: compute this expert there
  int64_t entries = 0;        // (row, k) entries it computes: its load
};

// What the splitter may know of the shards: [n_shards] each.
struct ShardView {
  const std::vector<uint8_t>& alive;
  const std::vector<int64_t>& load;  // outstanding entries
  const std::vector<std::string>& names;
  const std::vector<std::string>& down_reason;  // for shards not alive
};

// "expert shard 'NAME' (#S)": how every error names a shard.
std::string ShardLabel(const std::string& name, int shard);

// InvalidArgument naming the layer and what is wrong: a layer without routed
// experts in `holders`, a routing whose sizes do not match the rows, an
// expert id outside [0, n_expert) that is not models::kNoExpert.
absl::Status ValidateMoeWork(const MoeWork& work, const HolderTable& holders, int n_expert);

struct MoeSplit {
  std::vector<MoePart> parts;       // ascending shard index
  std::vector<uint8_t> row_failed;  // [n_tokens] rows that need an expert no live shard holds
  int32_t code = 0;                 // absl::StatusCode of the first such row, 0 if none
  std::string message;              // names the expert, the layer and its dead holders
};

// Splits a valid `work` (ValidateMoeWork) over the live holders of each
// expert of layer work.il (`holders_il` = holders[work.il]). kNoExpert
// entries go nowhere; a row all of whose entries are kNoExpert is in no part.
MoeSplit SplitMoeWork(const MoeWork& work, const std::vector<std::vector<int>>& holders_il,
                      int n_expert, const ShardView& view);

// The experts of `failed` (a part of `work` that its shard could not answer)
// re-assigned to other live holders, skipping `excluded` (the shards that
// already failed them): true with the new parts appended to `out` (each with
// its rows and entries) when every expert has such a holder, else false and
// `out` unchanged.
bool ReassignToReplicas(const MoeWork& work, const std::vector<std::vector<int>>& holders_il,
                        const MoePart& failed, const std::vector<int>& excluded,
                        const ShardView& view, std::vector<MoePart>* out);

// The shard's request for `part`: the whole batch's h (shared), the part's
// rows and their routing, its mask.
ExpertWork MakeExpertWork(const MoeWork& work, const MoePart& part);

}  // namespace ktx::actors
