#include "topology/cpu_list.h"

#include <algorithm>
#include <charconv>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace ktx::topology {
namespace {

// A non-negative decimal number of at most 7 digits (kMaxListedId has 7).
bool ParseId(absl::string_view text, int* id) {
  if (text.empty() || text.size() > 7) return false;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
  }
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), *id);
  return ec == std::errc() && ptr == text.data() + text.size();
}

}  // namespace

absl::StatusOr<std::vector<int>> ParseCpuList(std::string_view list_text) {
  const absl::string_view list(list_text.data(), list_text.size());
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("cpu list '", list, "': ", what));
  };
  if (list.empty()) return error("empty (expected e.g. \"0-7,16-23\")");
  std::set<int> seen;
  for (absl::string_view item : absl::StrSplit(list, ',')) {
    if (item.empty()) return error("empty item (two commas, or a comma at an end)");
    int first = 0, last = 0;
    const size_t dash = item.find('-');
    if (dash == absl::string_view::npos) {
      if (!ParseId(item, &first)) {
        return error(absl::StrCat("'", item, "' is not a cpu number"));
      }
      last = first;
    } else {
      const absl::string_view a = item.substr(0, dash), b = item.substr(dash + 1);
      if (!ParseId(a, &first) || !ParseId(b, &last)) {
        return error(absl::StrCat("'", item, "' is not a range like 0-7"));
      }
      if (last < first) return error(absl::StrCat("range ", item, " is backwards"));
    }
    if (last > kMaxListedId) {
      return error(absl::StrCat("cpu ", last, " is above the limit ", kMaxListedId));
    }
    for (int id = first; id <= last; ++id) {
      if (!seen.insert(id).second) return error(absl::StrCat("cpu ", id, " is listed twice"));
    }
  }
  return std::vector<int>(seen.begin(), seen.end());
}

std::string FormatIdRanges(const std::vector<int>& ids) {
  std::string out;
  size_t i = 0;
  while (i < ids.size()) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += j == i ? absl::StrCat(ids[i]) : absl::StrCat(ids[i], "-", ids[j]);
    i = j + 1;
  }
  return out;
}

}  // namespace ktx::topology
