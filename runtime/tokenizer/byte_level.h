// File: runtime/tokenizer/byte_level.h
//
// The byte-level alphabet of GPT-2-style BPE vocabularies: every byte 0..255
// is written as one printable code point, so that token texts are valid UTF-8.
// Bytes that are printable Latin-1 ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF)
// stand for themselves; the other 68 bytes (controls, space, 0x7F..0xA0,
// 0xAD) are given U+0100, U+0101, ... in increasing byte order, so space (0x20)
// is 'Ġ' (U+0120) and '\n' is 'Ċ' (U+010A).
//
// Stateless; the tables are built once, thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ktx::tokenizer {

// The code point that stands for `byte`.
char32_t ByteToCodepoint(uint8_t byte);

// The UTF-8 text of ByteToCodepoint(byte) (1 or 2 bytes).
std::string_view ByteToText(uint8_t byte);

// Appends the byte-level text of `bytes` (each byte as its code point).
void AppendByteLevelText(std::string_view bytes, std::string* out);

// Decodes byte-level text back to bytes. nullopt when `text` is not valid
// UTF-8 or holds a code point outside the 256-symbol alphabet.
std::optional<std::string> DecodeByteLevelText(std::string_view text);

}  // namespace ktx::tokenizer
