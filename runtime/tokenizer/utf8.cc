#include "runtime/tokenizer/utf8.h"

#include <cstdint>

#include "runtime/base/status.h"

namespace ktx::tokenizer {

Utf8Scan ScanUtf8(std::string_view bytes, size_t* length) {
  KTX_CHECK(!bytes.empty());
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const size_t n = bytes.size();
  const uint8_t b0 = p[0];
  if (b0 < 0x80) {
    *length = 1;
    return Utf8Scan::kValid;
  }
  size_t need;        // total length of the sequence
  uint8_t lo = 0x80;  // allowed range of the second byte
  uint8_t hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;  // no overlong forms
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;  // no overlong forms
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    // 0x80..0xC1 (continuation bytes, overlong leads) and 0xF5..0xFF.
    *length = 1;
    return Utf8Scan::kInvalid;
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= n) {
      *length = n;
      return Utf8Scan::kIncomplete;
    }
    const uint8_t lower = i == 1 ? lo : 0x80;
    const uint8_t upper = i == 1 ? hi : 0xBF;
    if (p[i] < lower || p[i] > upper) {
      *length = i;
      return Utf8Scan::kInvalid;
    }
  }
  *length = need;
  return Utf8Scan::kValid;
}

size_t ValidUtf8Prefix(std::string_view bytes) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t len = 0;
    if (ScanUtf8(bytes.substr(pos), &len) != Utf8Scan::kValid) break;
    pos += len;
  }
  return pos;
}

size_t AppendSanitizedUtf8(std::string_view bytes, bool hold_incomplete_tail, std::string* out) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t len = 0;
    switch (ScanUtf8(bytes.substr(pos), &len)) {
      case Utf8Scan::kValid: out->append(bytes.substr(pos, len)); break;
      case Utf8Scan::kIncomplete:
        if (hold_incomplete_tail) return len;
        out->append(kReplacementChar);
        break;
      case Utf8Scan::kInvalid: out->append(kReplacementChar); break;
    }
    pos += len;
  }
  return 0;
}

std::string SanitizeUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  AppendSanitizedUtf8(bytes, /*hold_incomplete_tail=*/false, &out);
  return out;
}

void AppendUtf8(char32_t cp, std::string* out) {
  KTX_CHECK(cp <= 0x10FFFF && (cp < 0xD800 || cp > 0xDFFF));
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace ktx::tokenizer
