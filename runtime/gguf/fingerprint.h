// File: runtime/gguf/fingerprint.h
//
// The model fingerprint: a stable hex digest that says "this is the same
// model" across processes and hosts, without reading the whole file. A
// head node compares it with the fingerprint each remote shard node reports
// (actors/remote/) before it routes a single token there.
//
//   KTX_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(path));
//   const std::string fp = ModelFingerprint(*file);   // 64 hex digits
//
// What it covers (SHA-256 over a versioned, length-prefixed encoding):
//  - every metadata entry (key, value type, array element type, every value
//    and every array element in full) except the split.* keys, which describe
//    how the file is cut, not the model;
//  - the tensor table in name order: name, type id, extents, byte size (not
//    offsets or the split part: the same model split differently has the same
//    fingerprint);
//  - a sample of every tensor's data: its first and last 64 bytes and 64 bytes
//    at 6 evenly spaced offsets (at most 512 bytes per tensor; about 8 pages
//    of the mapping are read per tensor, so a 400 GB model is fingerprinted in
//    well under a second once its headers are parsed).
// Two models that differ only in tensor bytes outside every sample window
// get the same fingerprint; that is the price of not reading 400 GB. Random
// (synthetic) weights with different seeds differ in every window.
//
// Thread-safety: pure functions; Sha256 is a value (one per thread).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "runtime/gguf/gguf.h"

namespace ktx::gguf {

// SHA-256 (FIPS 180-4), streaming.
class Sha256 {
 public:
  Sha256();
  void Update(const void* data, size_t n);
  void Update(std::string_view s) { Update(s.data(), s.size()); }
  // The digest; the object must not be updated afterwards.
  std::array<uint8_t, 32> Finish();
  // Lower-case hex of Finish().
  std::string FinishHex();

 private:
  void Block(const uint8_t* p);
  std::array<uint32_t, 8> h_;
  std::array<uint8_t, 64> buffer_;
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

// Lower-case hex SHA-256 of `data`.
std::string Sha256Hex(std::string_view data);

// The fingerprint of an opened model (64 lower-case hex digits). Never fails:
// GgufFile::Open has validated everything it reads.
std::string ModelFingerprint(const GgufFile& file);

// The first 16 hex digits, for messages.
inline std::string ShortFingerprint(std::string_view fingerprint) {
  return std::string(fingerprint.substr(0, 16));
}

}  // namespace ktx::gguf
