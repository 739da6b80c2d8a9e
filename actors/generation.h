// File: actors/generation.h
//
// Plain enums of the generation API shared by the Engine facade
// (actors/engine.h) and the actor messages (actors/messages.h), kept apart so
// that engine.h needs no CAF header. Stored in messages as int32.
#pragma once

#include <cstdint>

namespace ktx::actors {

// Why a generation ended.
enum class FinishReason : int32_t {
  kNone = 0,
  kLength = 1,      // max_tokens reached (max_tokens == 0: the prompt only)
  kStopToken = 2,   // a stop token id (EOS/EOT included) was sampled
  kStopString = 3,  // a stop string completed
  kCancelled = 4,
  kError = 5,
};

inline const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone: return "none";
    case FinishReason::kLength: return "length";
    case FinishReason::kStopToken: return "stop_token";
    case FinishReason::kStopString: return "stop_string";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "unknown";
}

// Which logits rows a generation returns.
enum class ReturnLogits : int32_t {
  kNone = 0,
  kSampled = 1,  // the row each token was sampled from
  kAll = 2,      // every prompt row, then every decode row
};

// Which logits rows one slice of a step wants.
enum class SliceLogits : int32_t { kNone = 0, kLast = 1, kAll = 2 };

}  // namespace ktx::actors
