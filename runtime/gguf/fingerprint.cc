// File: runtime/gguf/fingerprint.cc
#include "runtime/gguf/fingerprint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

namespace ktx::gguf {
namespace {

__extension__ typedef unsigned __int128 u128;

// The first n primes.
std::vector<uint32_t> Primes(int n) {
  std::vector<uint32_t> primes;
  for (uint32_t c = 2; static_cast<int>(primes.size()) < n; ++c) {
    bool prime = true;
    for (uint32_t p : primes) {
      if (p * p > c) break;
      if (c % p == 0) {
        prime = false;
        break;
      }
    }
    if (prime) primes.push_back(c);
  }
  return primes;
}

// FIPS 180-4 defines the constants as the first 32 bits of the fractional
// parts of the square roots (H0) and cube roots (K) of the first primes.
// They are computed here exactly: v = floor(root(p) * 2^32) is the largest v
// with v^2 <= p * 2^64 (v^3 <= p * 2^96), found from a double estimate.
uint32_t FracSqrt(uint32_t p) {
  const u128 target = static_cast<u128>(p) << 64;
  uint64_t v = static_cast<uint64_t>(std::sqrt(static_cast<double>(p)) * 4294967296.0);
  while (static_cast<u128>(v) * v > target) --v;
  while (static_cast<u128>(v + 1) * (v + 1) <= target) ++v;
  return static_cast<uint32_t>(v);  // the integer part falls off
}

uint32_t FracCbrt(uint32_t p) {
  const u128 target = static_cast<u128>(p) << 96;
  uint64_t v = static_cast<uint64_t>(std::cbrt(static_cast<double>(p)) * 4294967296.0);
  auto cube = [](uint64_t x) { return static_cast<u128>(x) * x * x; };
  while (cube(v) > target) --v;
  while (cube(v + 1) <= target) ++v;
  return static_cast<uint32_t>(v);
}

struct Constants {
  std::array<uint32_t, 8> h0;
  std::array<uint32_t, 64> k;
  Constants() {
    const std::vector<uint32_t> primes = Primes(64);
    for (int i = 0; i < 8; ++i) h0[i] = FracSqrt(primes[i]);
    for (int i = 0; i < 64; ++i) k[i] = FracCbrt(primes[i]);
  }
};

const Constants& GetConstants() {
  static const Constants constants;
  return constants;
}

inline uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

std::string Hex(const uint8_t* bytes, size_t n) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[bytes[i] >> 4];
    out[2 * i + 1] = kDigits[bytes[i] & 15];
  }
  return out;
}

// Length-prefixed, little-endian encoding of the fingerprinted fields.
class Encoder {
 public:
  explicit Encoder(Sha256* sha) : sha_(sha) {}
  void U64(uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(v >> (8 * i));
    sha_->Update(b, 8);
  }
  void I64(int64_t v) { U64(static_cast<uint64_t>(v)); }
  void F64(double v) {
    uint64_t bits;
    std::memcpy(&bits, &v, 8);
    U64(bits);
  }
  void Str(std::string_view s) {
    U64(s.size());
    sha_->Update(s);
  }
  void Bytes(const uint8_t* p, size_t n) {
    U64(n);
    sha_->Update(p, n);
  }

 private:
  Sha256* sha_;
};

void EncodeValue(const Value& value, Encoder* enc) {
  enc->U64(static_cast<uint64_t>(value.type()));
  enc->U64(value.is_array() ? static_cast<uint64_t>(value.array_type()) : 0);
  std::visit(
      [enc](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          enc->Str(v);
        } else if constexpr (std::is_same_v<T, bool>) {
          enc->U64(v ? 1 : 0);
        } else if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
          enc->F64(static_cast<double>(v));
        } else if constexpr (std::is_integral_v<T>) {
          if constexpr (std::is_signed_v<T>) {
            enc->I64(static_cast<int64_t>(v));
          } else {
            enc->U64(static_cast<uint64_t>(v));
          }
        } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
          enc->U64(v.size());
          for (int64_t x : v) enc->I64(x);
        } else if constexpr (std::is_same_v<T, std::vector<double>>) {
          enc->U64(v.size());
          for (double x : v) enc->F64(x);
        } else if constexpr (std::is_same_v<T, std::vector<bool>>) {
          enc->U64(v.size());
          for (bool x : v) enc->U64(x ? 1 : 0);
        } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
          enc->U64(v.size());
          for (const std::string& x : v) enc->Str(x);
        }
      },
      value.storage());
}

constexpr uint64_t kWindowBytes = 64;
constexpr int kInnerWindows = 6;

}  // namespace

Sha256::Sha256() : h_(GetConstants().h0) {}

void Sha256::Block(const uint8_t* p) {
  const std::array<uint32_t, 64>& k = GetConstants().k;
  uint32_t w[64];
  for (int t = 0; t < 16; ++t) {
    w[t] = (static_cast<uint32_t>(p[4 * t]) << 24) | (static_cast<uint32_t>(p[4 * t + 1]) << 16) |
           (static_cast<uint32_t>(p[4 * t + 2]) << 8) | static_cast<uint32_t>(p[4 * t + 3]);
  }
  for (int t = 16; t < 64; ++t) {
    const uint32_t s0 = Rotr(w[t - 15], 7) ^ Rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
    const uint32_t s1 = Rotr(w[t - 2], 17) ^ Rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
    w[t] = w[t - 16] + s0 + w[t - 7] + s1;
  }
  uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
  for (int t = 0; t < 64; ++t) {
    const uint32_t big_s1 = Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25);
    const uint32_t ch = (e & f) ^ (~e & g);
    const uint32_t t1 = h + big_s1 + ch + k[t] + w[t];
    const uint32_t big_s0 = Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22);
    const uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
    const uint32_t t2 = big_s0 + maj;
    h = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  h_[0] += a;
  h_[1] += b;
  h_[2] += c;
  h_[3] += d;
  h_[4] += e;
  h_[5] += f;
  h_[6] += g;
  h_[7] += h;
}

void Sha256::Update(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_bytes_ += n;
  if (buffered_ > 0) {
    const size_t take = std::min(n, buffer_.size() - buffered_);
    std::memcpy(buffer_.data() + buffered_, p, take);
    buffered_ += take;
    p += take;
    n -= take;
    if (buffered_ < buffer_.size()) return;
    Block(buffer_.data());
    buffered_ = 0;
  }
  for (; n >= 64; p += 64, n -= 64) Block(p);
  std::memcpy(buffer_.data(), p, n);
  buffered_ = n;
}

std::array<uint8_t, 32> Sha256::Finish() {
  const uint64_t bits = total_bytes_ * 8;
  const uint8_t one = 0x80;
  Update(&one, 1);
  const uint8_t zero = 0;
  while (buffered_ != 56) Update(&zero, 1);
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
  Update(length, 8);
  std::array<uint8_t, 32> out;
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<uint8_t>(h_[i] >> (24 - 8 * j));
  }
  return out;
}

std::string Sha256::FinishHex() {
  const std::array<uint8_t, 32> digest = Finish();
  return Hex(digest.data(), digest.size());
}

std::string Sha256Hex(std::string_view data) {
  Sha256 sha;
  sha.Update(data);
  return sha.FinishHex();
}

std::string ModelFingerprint(const GgufFile& file) {
  Sha256 sha;
  Encoder enc(&sha);
  enc.Str("ktx-model-fingerprint-v1");
  // Metadata (the map iterates in key order).
  uint64_t n_keys = 0;
  for (const auto& [key, value] : file.metadata().entries()) {
    if (key.rfind("split.", 0) == 0) continue;
    ++n_keys;
    enc.Str(key);
    EncodeValue(value, &enc);
  }
  enc.U64(n_keys);
  // Tensor table and data samples, in name order.
  std::vector<const TensorInfo*> tensors;
  for (const TensorInfo& t : file.tensors()) tensors.push_back(&t);
  std::sort(tensors.begin(), tensors.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->name < b->name; });
  enc.U64(tensors.size());
  for (const TensorInfo* t : tensors) {
    enc.Str(t->name);
    enc.U64(static_cast<uint64_t>(t->type));
    enc.U64(t->ne.size());
    for (int64_t n : t->ne) enc.I64(n);
    enc.U64(t->n_bytes);
    if (t->data == nullptr || t->n_bytes == 0) continue;
    const uint64_t n = t->n_bytes;
    const uint64_t w = std::min(kWindowBytes, n);
    enc.Bytes(t->data, w);
    for (int i = 1; i <= kInnerWindows; ++i) {
      const uint64_t at = (n - w) / (kInnerWindows + 1) * i;
      enc.Bytes(t->data + at, w);
    }
    enc.Bytes(t->data + (n - w), w);
  }
  return sha.FinishHex();
}

}  // namespace ktx::gguf
