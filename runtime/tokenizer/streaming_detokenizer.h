// File: runtime/tokenizer/streaming_detokenizer.h
//
// Detokenizes a stream of generated ids one at a time and hands out only
// complete, valid UTF-8 text: a character split across tokens is held back
// until its last byte arrives.
//
//   StreamingDetokenizer stream(tokenizer);
//   for (int32_t id : generated) {
//     KTX_ASSIGN_OR_RETURN(std::string text, stream.Push(id));
//     Send(text);  // complete UTF-8, possibly empty
//   }
//   Send(stream.Finish());
//
// Bytes that can never become valid UTF-8 are replaced by U+FFFD as soon as
// that is certain; at Finish() an unfinished trailing sequence becomes one
// U+FFFD. The concatenation of all outputs equals
// SanitizeUtf8(tokenizer.Detokenize(ids)) (utf8.h), so for ids whose full
// detokenization is valid UTF-8 it is exactly that detokenization.
//
// Ownership and threads: holds a (cheap, shared) copy of the Tokenizer and at
// most 3 pending bytes. Not thread-safe: one stream per generation.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ktx::tokenizer {

class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(Tokenizer tokenizer, DetokenizeOptions options = {});

  // Appends the token's bytes and returns the text that became complete.
  // kOutOfRange for an id outside the vocabulary (the stream is unchanged).
  absl::StatusOr<std::string> Push(int32_t id);

  // Returns the held-back bytes (as U+FFFD: they are an unfinished sequence)
  // and resets the stream for reuse.
  std::string Finish();

  // Drops held-back bytes.
  void Reset() { pending_.clear(); }

  // Bytes held back (0..3), waiting for the rest of a character.
  size_t pending_bytes() const { return pending_.size(); }

 private:
  Tokenizer tokenizer_;
  DetokenizeOptions options_;
  std::string pending_;  // an incomplete UTF-8 prefix
};

}  // namespace ktx::tokenizer
