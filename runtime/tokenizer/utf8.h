// File: runtime/tokenizer/utf8.h
//
// Strict UTF-8 (RFC 3629 / Unicode Table 3-7: no overlong forms, no surrogates,
// nothing above U+10FFFF) for the tokenizer: finding where valid text ends,
// holding back an incomplete trailing sequence while streaming, and replacing
// invalid bytes with U+FFFD.
//
//   size_t n;
//   switch (ScanUtf8(bytes, &n)) { case Utf8Scan::kValid: ... }
//
// Invalid input is replaced "per maximal subpart" (Unicode 15, section 3.9,
// U+FFFD substitution of maximal subparts): each maximal prefix of a valid
// sequence that cannot be completed, or each single byte that cannot start a
// sequence, becomes one U+FFFD. Sanitizing a string in pieces, holding back an
// incomplete tail each time, gives the same result as sanitizing it at once.
//
// Stateless free functions; thread-safe.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace ktx::tokenizer {

// U+FFFD REPLACEMENT CHARACTER as UTF-8.
inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";

enum class Utf8Scan {
  // `*length` bytes (1..4) form one valid code point.
  kValid,
  // The whole input (fewer than 4 bytes) is a valid but unfinished prefix of
  // a sequence: more bytes may complete it. `*length` = input size.
  kIncomplete,
  // The first `*length` bytes (1..3) are a maximal subpart that can never
  // become valid: replace them with one U+FFFD.
  kInvalid,
};

// Classifies the code point at the start of `bytes` (which must not be empty).
Utf8Scan ScanUtf8(std::string_view bytes, size_t* length);

// Length of the longest prefix of `bytes` that is valid UTF-8.
size_t ValidUtf8Prefix(std::string_view bytes);

inline bool IsValidUtf8(std::string_view bytes) { return ValidUtf8Prefix(bytes) == bytes.size(); }

// Appends `bytes` to `*out` with every invalid maximal subpart replaced by
// U+FFFD. When `hold_incomplete_tail` is set, an incomplete sequence at the very
// end is not appended; its length is returned so that the caller can keep it
// for later. Returns 0 otherwise (an incomplete tail is then replaced).
size_t AppendSanitizedUtf8(std::string_view bytes, bool hold_incomplete_tail, std::string* out);

// `bytes` with every invalid maximal subpart replaced by U+FFFD.
std::string SanitizeUtf8(std::string_view bytes);

// Appends the UTF-8 encoding of `cp` (<= 0x10FFFF, not a surrogate).
void AppendUtf8(char32_t cp, std::string* out);

}  // namespace ktx::tokenizer
