// File: runtime/sampler/stop_strings.h
//
// Stop strings for streamed generation. Generated text arrives piece by piece
// (one detokenized token at a time); a stop string may span several pieces.
// The matcher returns the text that is safe to emit now and holds back the
// longest tail that could still become a stop string, so that a client never
// sees the beginning of a stop string that later completes:
//
//   KTX_ASSIGN_OR_RETURN(StopStringMatcher stops, StopStringMatcher::Create({"\n\nUser:"}));
//   for (each generated piece) {
//     StopStringMatcher::Result r = stops.Feed(piece);
//     Send(r.emit);
//     if (r.stopped) break;             // r.stop_index says which string matched
//   }
//   Send(stops.Flush());                // generation ended without a stop string
//
// Matching is on bytes (a stop string is any non-empty byte string; a held-back
// tail may end inside a UTF-8 sequence). Generation stops at the first stop
// string to COMPLETE: among several, the one that ends first, then the longer
// one (earlier start), then the one listed first, so the result does not
// depend on how the text was cut into pieces. The text before the stop string
// is emitted, the stop string and everything after it are not.
//
// Owns copies of the stop strings and the held-back bytes. Not thread-safe:
// one matcher per sequence.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ktx::sampler {

class StopStringMatcher {
 public:
  struct Result {
    std::string emit;      // bytes that may be shown now
    bool stopped = false;  // a stop string completed; emit ends right before it
    int stop_index = -1;   // index into the stop strings when stopped
  };

  // InvalidArgument when a stop string is empty. No stop strings is allowed
  // (then everything is emitted at once).
  static absl::StatusOr<StopStringMatcher> Create(std::vector<std::string> stop_strings);

  // Appends `piece` to the text and reports what may be emitted. After a stop,
  // further calls return an empty, stopped Result.
  Result Feed(std::string_view piece);

  // The held-back bytes (call when generation ends for another reason); the
  // matcher is then empty. Empty after a stop.
  std::string Flush();

  bool stopped() const { return stopped_; }
  // Bytes currently held back (a proper prefix of some stop string).
  const std::string& held() const { return held_; }

 private:
  explicit StopStringMatcher(std::vector<std::string> stop_strings)
      : stops_(std::move(stop_strings)) {}

  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
  int stop_index_ = -1;
};

}  // namespace ktx::sampler
