#include "runtime/tokenizer/streaming_detokenizer.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/tokenizer/utf8.h"

namespace ktx::tokenizer {

StreamingDetokenizer::StreamingDetokenizer(Tokenizer tokenizer, DetokenizeOptions options)
    : tokenizer_(std::move(tokenizer)), options_(options) {}

absl::StatusOr<std::string> StreamingDetokenizer::Push(int32_t id) {
  if (!tokenizer_.IsValidId(id)) {
    return absl::OutOfRangeError(absl::StrCat(
        "token id ", id, " is out of range; the vocabulary has ", tokenizer_.n_vocab(), " tokens"));
  }
  const std::string_view piece = tokenizer_.Piece(id, options_.render_special);
  if (piece.empty()) return std::string();
  std::string bytes = std::move(pending_);
  bytes.append(piece);
  std::string out;
  out.reserve(bytes.size());
  const size_t held = AppendSanitizedUtf8(bytes, /*hold_incomplete_tail=*/true, &out);
  pending_.assign(bytes, bytes.size() - held, held);
  return out;
}

std::string StreamingDetokenizer::Finish() {
  std::string out = SanitizeUtf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace ktx::tokenizer
