#include "runtime/tokenizer/byte_level.h"

#include <array>

#include "runtime/tokenizer/utf8.h"

namespace ktx::tokenizer {
namespace {

struct Tables {
  std::array<char32_t, 256> codepoint{};
  std::array<std::string, 256> text;
  // code point (< 0x144) -> byte, or -1.
  std::array<int16_t, 0x144> byte_of{};

  Tables() {
    byte_of.fill(-1);
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      codepoint[b] = printable ? static_cast<char32_t>(b) : next++;
      AppendUtf8(codepoint[b], &text[b]);
      byte_of[codepoint[b]] = static_cast<int16_t>(b);
    }
  }
};

const Tables& GetTables() {
  static const Tables* const tables = new Tables();
  return *tables;
}

}  // namespace

char32_t ByteToCodepoint(uint8_t byte) { return GetTables().codepoint[byte]; }

std::string_view ByteToText(uint8_t byte) { return GetTables().text[byte]; }

void AppendByteLevelText(std::string_view bytes, std::string* out) {
  const Tables& t = GetTables();
  for (char c : bytes) out->append(t.text[static_cast<uint8_t>(c)]);
}

std::optional<std::string> DecodeByteLevelText(std::string_view text) {
  const Tables& t = GetTables();
  std::string out;
  out.reserve(text.size());
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  size_t i = 0;
  while (i < text.size()) {
    char32_t cp;
    if (p[i] < 0x80) {
      cp = p[i];
      i += 1;
    } else if (p[i] >= 0xC2 && p[i] <= 0xDF && i + 1 < text.size() && (p[i + 1] & 0xC0) == 0x80) {
      cp = (static_cast<char32_t>(p[i] & 0x1F) << 6) | (p[i + 1] & 0x3F);
      i += 2;
    } else {
      return std::nullopt;  // 3- and 4-byte code points are all outside the alphabet
    }
    if (cp >= t.byte_of.size() || t.byte_of[cp] < 0) return std::nullopt;
    out.push_back(static_cast<char>(t.byte_of[cp]));
  }
  return out;
}

}  // namespace ktx::tokenizer
