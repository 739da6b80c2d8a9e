#include "runtime/sampler/stop_strings.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace ktx::sampler {

absl::StatusOr<StopStringMatcher> StopStringMatcher::Create(std::vector<std::string> stop_strings) {
  for (size_t i = 0; i < stop_strings.size(); ++i) {
    if (stop_strings[i].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop string ", i, " is empty; stop strings must have at least one byte"));
    }
  }
  return StopStringMatcher(std::move(stop_strings));
}

StopStringMatcher::Result StopStringMatcher::Feed(std::string_view piece) {
  Result result;
  if (stopped_) {
    result.stopped = true;
    result.stop_index = stop_index_;
    return result;
  }
  std::string text = std::move(held_);
  held_.clear();
  text.append(piece);

  // The stop string that completes first (smallest end), then the longer one
  // (earlier start), then the one listed first: generation stops as soon as
  // any stop string is complete, so the answer does not depend on how the
  // text was cut into pieces. A match cannot start in text emitted earlier:
  // any tail of it that is a prefix of a stop string was held back.
  size_t best_end = std::string::npos;
  size_t best_pos = std::string::npos;
  int best_index = -1;
  for (size_t i = 0; i < stops_.size(); ++i) {
    const size_t pos = text.find(stops_[i]);
    if (pos == std::string::npos) continue;
    const size_t end = pos + stops_[i].size();
    if (end < best_end || (end == best_end && pos < best_pos)) {
      best_end = end;
      best_pos = pos;
      best_index = static_cast<int>(i);
    }
  }
  if (best_index >= 0) {
    stopped_ = true;
    stop_index_ = best_index;
    result.emit = text.substr(0, best_pos);
    result.stopped = true;
    result.stop_index = best_index;
    return result;
  }

  // Longest suffix of `text` that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const std::string& stop : stops_) {
    const size_t max_len = std::min(stop.size() - 1, text.size());
    for (size_t len = max_len; len > hold; --len) {
      if (std::string_view(text).substr(text.size() - len) ==
          std::string_view(stop).substr(0, len)) {
        hold = len;
        break;
      }
    }
  }
  held_ = text.substr(text.size() - hold);
  text.resize(text.size() - hold);
  result.emit = std::move(text);
  return result;
}

std::string StopStringMatcher::Flush() {
  std::string out = std::move(held_);
  held_.clear();
  return out;
}

}  // namespace ktx::sampler
