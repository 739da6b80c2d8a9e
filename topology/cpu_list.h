// File: topology/cpu_list.h
//
// Index lists written as ranges, the way Linux writes cpu lists
// (/sys/devices/system/node/node0/cpulist): "0-7,16-23". Used for the cpus of
// a shard in topology configs and for expert ranges in placement plans.
// Plain functions; no state.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ktx::topology {

// The largest id a list may name (guards "0-4000000000" against huge expansions).
inline constexpr int kMaxListedId = 1 << 20;

// Parses "0-7,16-23" (comma-separated ids and inclusive ranges a-b with a <= b,
// no spaces) into ascending ids. Errors (kInvalidArgument) name the list and the
// offending item: an empty list or item, a non-number, a backwards range, an id
// above kMaxListedId, an id listed twice.
absl::StatusOr<std::vector<int>> ParseCpuList(std::string_view list);

// "0-3,8,10-11" for {0,1,2,3,8,10,11}; `ids` must be ascending. Same text as
// FormatCpuList in hardware.h, without the hardware dependencies.
std::string FormatIdRanges(const std::vector<int>& ids);

}  // namespace ktx::topology
