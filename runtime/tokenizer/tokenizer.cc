#include "runtime/tokenizer/tokenizer.h"

#include <array>
#include <queue>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/base/status.h"
#include "runtime/tokenizer/byte_level.h"
#include "runtime/tokenizer/pre_tokenizer.h"

namespace ktx::tokenizer {
namespace {

constexpr std::string_view kGpt2 = "gpt2";

// Words longer than this are not cached (they are rarely repeated).
constexpr size_t kMaxCachedWordBytes = 64;

// Debian's Abseil has its own string_view type; StrCat takes that one.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

struct MergeRule {
  int32_t rank;
  int32_t result;
};

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

bool IsSpecialType(TokenType type) {
  return type == TokenType::kControl || type == TokenType::kUnknown ||
         type == TokenType::kUserDefined;
}

// A byte trie over the texts of special tokens, for leftmost-longest matching.
class SpecialTrie {
 public:
  void Insert(std::string_view text, int32_t id) {
    int32_t node = 0;
    for (char c : text) {
      const uint8_t b = static_cast<uint8_t>(c);
      auto [it, inserted] = edges_.try_emplace(Key(node, b), static_cast<int32_t>(ids_.size()));
      if (inserted) ids_.push_back(-1);
      node = it->second;
    }
    ids_[node] = id;  // a later duplicate text replaces an earlier one
    first_byte_[static_cast<uint8_t>(text[0])] = true;
  }

  bool empty() const { return ids_.size() == 1; }

  // The longest token text at the start of `text` whose id passes `allowed`;
  // returns its length (0: none) and sets *id.
  template <typename Allowed>
  size_t LongestMatch(std::string_view text, const Allowed& allowed, int32_t* id) const {
    if (text.empty() || !first_byte_[static_cast<uint8_t>(text[0])]) return 0;
    size_t best = 0;
    int32_t node = 0;
    for (size_t i = 0; i < text.size(); ++i) {
      auto it = edges_.find(Key(node, static_cast<uint8_t>(text[i])));
      if (it == edges_.end()) break;
      node = it->second;
      if (ids_[node] >= 0 && allowed(ids_[node])) {
        best = i + 1;
        *id = ids_[node];
      }
    }
    return best;
  }

 private:
  static uint64_t Key(int32_t node, uint8_t byte) {
    return (static_cast<uint64_t>(node) << 8) | byte;
  }
  absl::flat_hash_map<uint64_t, int32_t> edges_;
  std::vector<int32_t> ids_ = {-1};  // per node: the token ending there, or -1
  std::array<bool, 256> first_byte_{};
};

}  // namespace

struct Tokenizer::Impl {
  TokenizerData data;
  std::vector<std::string> pieces;  // rendered bytes per token (special: its text)
  // Views into data.tokens (never modified after Create).
  absl::flat_hash_map<std::string_view, int32_t> token_to_id;
  std::array<int32_t, 256> byte_token{};
  absl::flat_hash_map<uint64_t, MergeRule> merges;
  SpecialTrie specials;
  PreTokenizer pre_tokenizer;

  explicit Impl(PreTokenizer pre) : pre_tokenizer(std::move(pre)) {}

  TokenType type(int32_t id) const {
    return data.token_types.empty() ? TokenType::kNormal : data.token_types[id];
  }

  void Bpe(std::string_view word, std::vector<int32_t>* out) const;
};

const char* TokenTypeName(TokenType type) {
  switch (type) {
    case TokenType::kUndefined: return "UNDEFINED";
    case TokenType::kNormal: return "NORMAL";
    case TokenType::kUnknown: return "UNKNOWN";
    case TokenType::kControl: return "CONTROL";
    case TokenType::kUserDefined: return "USER_DEFINED";
    case TokenType::kUnused: return "UNUSED";
    case TokenType::kByte: return "BYTE";
  }
  return "?";
}

const std::vector<std::string>& SupportedTokenizerModels() {
  static const auto* const names = new std::vector<std::string>{std::string(kGpt2)};
  return *names;
}

absl::StatusOr<Tokenizer> Tokenizer::Create(TokenizerData data) {
  if (data.model != kGpt2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown tokenizer model (tokenizer.ggml.model) '", data.model,
        "'; ktx supports: ", absl::StrJoin(SupportedTokenizerModels(), ", "), " (byte-level BPE)"));
  }
  KTX_ASSIGN_OR_RETURN(PreTokenizer pre, PreTokenizer::Create(data.pre));
  const size_t n_tokens = data.tokens.size();
  if (n_tokens == 0) {
    return absl::InvalidArgumentError("tokenizer has no tokens (tokenizer.ggml.tokens is empty)");
  }
  if (n_tokens > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer has ", n_tokens, " tokens; at most ", INT32_MAX, " are supported"));
  }
  const auto n_vocab = static_cast<int32_t>(n_tokens);
  if (!data.token_types.empty() && data.token_types.size() != n_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.ggml.token_type has ", data.token_types.size(),
                     " entries; expected one per token (", n_tokens, ")"));
  }
  for (size_t i = 0; i < data.token_types.size(); ++i) {
    const auto t = static_cast<int32_t>(data.token_types[i]);
    if (t < 0 || t > static_cast<int32_t>(TokenType::kByte)) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.token_type[", i, "] is ", t,
                                                     "; expected 0..6 (token '", data.tokens[i],
                                                     "')"));
    }
  }
  const struct {
    const char* name;
    const char* key;
    int32_t id;
  } special_ids[] = {
      {"BOS", "tokenizer.ggml.bos_token_id", data.bos_id},
      {"EOS", "tokenizer.ggml.eos_token_id", data.eos_id},
      {"EOT", "tokenizer.ggml.eot_token_id", data.eot_id},
      {"padding", "tokenizer.ggml.padding_token_id", data.pad_id},
  };
  for (const auto& s : special_ids) {
    if (s.id < -1 || s.id >= n_vocab) {
      return absl::InvalidArgumentError(absl::StrCat(s.name, " token id ", s.id, " (", s.key,
                                                     ") is out of range; the vocabulary has ",
                                                     n_vocab, " tokens"));
    }
  }
  if (data.add_bos && data.bos_id < 0) {
    return absl::InvalidArgumentError(
        "tokenizer.ggml.add_bos_token is true but there is no BOS id "
        "(tokenizer.ggml.bos_token_id)");
  }
  if (data.add_eos && data.eos_id < 0) {
    return absl::InvalidArgumentError(
        "tokenizer.ggml.add_eos_token is true but there is no EOS id "
        "(tokenizer.ggml.eos_token_id)");
  }

  auto impl = std::make_shared<Impl>(std::move(pre));
  impl->data = std::move(data);
  const TokenizerData& d = impl->data;

  impl->token_to_id.reserve(n_tokens);
  impl->pieces.resize(n_tokens);
  for (int32_t id = 0; id < n_vocab; ++id) {
    const std::string& text = d.tokens[id];
    impl->token_to_id.insert_or_assign(std::string_view(text), id);
    const TokenType type = impl->type(id);
    if (IsSpecialType(type)) {
      impl->pieces[id] = text;
      if (!text.empty()) impl->specials.Insert(text, id);
    } else if (type == TokenType::kNormal) {
      std::optional<std::string> bytes = DecodeByteLevelText(text);
      // Text outside the byte-level alphabet is rendered as is (as HF does).
      impl->pieces[id] = bytes ? std::move(*bytes) : text;
    }  // UNUSED, BYTE, UNDEFINED: rendered as nothing.
  }

  for (int b = 0; b < 256; ++b) {
    auto it = impl->token_to_id.find(ByteToText(static_cast<uint8_t>(b)));
    if (it == impl->token_to_id.end()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("byte-level BPE vocabulary has no token for byte 0x%02X (text '%s')", b,
                          std::string(ByteToText(static_cast<uint8_t>(b)))));
    }
    impl->byte_token[b] = it->second;
  }

  impl->merges.reserve(d.merges.size());
  std::string joined;
  for (size_t rank = 0; rank < d.merges.size(); ++rank) {
    const std::string& merge = d.merges[rank];
    const size_t space = merge.size() > 1 ? merge.find(' ', 1) : std::string::npos;
    if (space == std::string::npos || space + 1 >= merge.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.merges[", rank, "] '", merge,
                                                     "' is not of the form 'left right'"));
    }
    const std::string_view left(merge.data(), space);
    const std::string_view right(merge.data() + space + 1, merge.size() - space - 1);
    joined.assign(left);
    joined.append(right);
    const std::string_view parts[3] = {left, right, joined};
    int32_t ids[3];
    for (int k = 0; k < 3; ++k) {
      auto it = impl->token_to_id.find(parts[k]);
      if (it == impl->token_to_id.end()) {
        return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.merges[", rank, "] '", merge,
                                                       "': '", Av(parts[k]),
                                                       "' is not a token of the vocabulary"));
      }
      ids[k] = it->second;
    }
    // A repeated pair keeps its first (lowest) rank.
    impl->merges.try_emplace(PairKey(ids[0], ids[1]),
                             MergeRule{static_cast<int32_t>(rank), ids[2]});
  }
  return Tokenizer(std::move(impl));
}

void Tokenizer::Impl::Bpe(std::string_view word, std::vector<int32_t>* out) const {
  const size_t n = word.size();
  if (n == 1) {
    out->push_back(byte_token[static_cast<uint8_t>(word[0])]);
    return;
  }
  struct Symbol {
    int32_t id;
    int32_t prev;  // -1: none
    int32_t next;  // n: none
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int32_t left;  // symbol index
    int32_t right;
    int32_t left_id;
    int32_t right_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::vector<Symbol> syms(n);
  for (size_t i = 0; i < n; ++i) {
    syms[i] = Symbol{byte_token[static_cast<uint8_t>(word[i])], static_cast<int32_t>(i) - 1,
                     static_cast<int32_t>(i) + 1, true};
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto consider = [&](int32_t left, int32_t right) {
    if (left < 0 || right >= static_cast<int32_t>(n)) return;
    auto it = merges.find(PairKey(syms[left].id, syms[right].id));
    if (it == merges.end()) return;
    queue.push(Candidate{it->second.rank, left, right, syms[left].id, syms[right].id});
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(static_cast<int32_t>(i), static_cast<int32_t>(i) + 1);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& l = syms[c.left];
    Symbol& r = syms[c.right];
    // Skip candidates made stale by an earlier merge.
    if (!l.alive || !r.alive || l.next != c.right || l.id != c.left_id || r.id != c.right_id) {
      continue;
    }
    l.id = merges.find(PairKey(c.left_id, c.right_id))->second.result;
    r.alive = false;
    l.next = r.next;
    if (r.next < static_cast<int32_t>(n)) syms[r.next].prev = c.left;
    consider(l.prev, c.left);
    consider(c.left, l.next);
  }
  for (int32_t i = 0; i < static_cast<int32_t>(n); i = syms[i].next) out->push_back(syms[i].id);
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Tokenize(std::string_view text,
                                                         const TokenizeOptions& options) const {
  const Impl& m = *impl_;
  const bool add_bos = options.add_bos.value_or(m.data.add_bos);
  const bool add_eos = options.add_eos.value_or(m.data.add_eos);
  if (add_bos && m.data.bos_id < 0) {
    return absl::FailedPreconditionError("add_bos requested but the model has no BOS token");
  }
  if (add_eos && m.data.eos_id < 0) {
    return absl::FailedPreconditionError("add_eos requested but the model has no EOS token");
  }
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos) out.push_back(m.data.bos_id);

  std::vector<std::string_view> words;
  // word -> [start, start + count) of its ids in `out`.
  absl::flat_hash_map<std::string_view, std::pair<size_t, size_t>> cache;
  auto encode_raw = [&](std::string_view raw) -> absl::Status {
    if (raw.empty()) return absl::OkStatus();
    words.clear();
    KTX_RETURN_IF_ERROR(m.pre_tokenizer.Split(raw, &words));
    for (std::string_view word : words) {
      if (word.size() > 1 && word.size() <= kMaxCachedWordBytes) {
        auto it = cache.find(word);
        if (it != cache.end()) {
          const auto [start, count] = it->second;
          for (size_t k = 0; k < count; ++k) out.push_back(out[start + k]);
          continue;
        }
        const size_t start = out.size();
        m.Bpe(word, &out);
        cache.emplace(word, std::make_pair(start, out.size() - start));
      } else {
        m.Bpe(word, &out);
      }
    }
    return absl::OkStatus();
  };

  const bool control_allowed = options.parse_special;
  const bool user_defined_allowed = options.parse_special || options.always_parse_user_defined;
  if ((control_allowed || user_defined_allowed) && !m.specials.empty()) {
    auto allowed = [&](int32_t id) {
      return m.type(id) == TokenType::kUserDefined ? user_defined_allowed : control_allowed;
    };
    size_t raw_start = 0;
    size_t i = 0;
    while (i < text.size()) {
      int32_t id = -1;
      const size_t len = m.specials.LongestMatch(text.substr(i), allowed, &id);
      if (len == 0) {
        ++i;
        continue;
      }
      KTX_RETURN_IF_ERROR(encode_raw(text.substr(raw_start, i - raw_start)));
      out.push_back(id);
      i += len;
      raw_start = i;
    }
    KTX_RETURN_IF_ERROR(encode_raw(text.substr(raw_start)));
  } else {
    KTX_RETURN_IF_ERROR(encode_raw(text));
  }
  if (add_eos) out.push_back(m.data.eos_id);
  return out;
}

absl::StatusOr<std::string> Tokenizer::Detokenize(absl::Span<const int32_t> ids,
                                                  const DetokenizeOptions& options) const {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!IsValidId(ids[i])) {
      return absl::OutOfRangeError(absl::StrCat("token id ", ids[i], " at position ", i,
                                                " is out of range; the vocabulary has ", n_vocab(),
                                                " tokens"));
    }
    out.append(Piece(ids[i], options.render_special));
  }
  return out;
}

std::string_view Tokenizer::Piece(int32_t id, bool render_special) const {
  KTX_CHECK(IsValidId(id));
  const TokenType type = impl_->type(id);
  if (!render_special && (type == TokenType::kControl || type == TokenType::kUnknown)) return {};
  return impl_->pieces[id];
}

int32_t Tokenizer::n_vocab() const { return static_cast<int32_t>(impl_->data.tokens.size()); }

const std::string& Tokenizer::TokenText(int32_t id) const {
  KTX_CHECK(IsValidId(id));
  return impl_->data.tokens[id];
}

TokenType Tokenizer::TokenTypeOf(int32_t id) const {
  KTX_CHECK(IsValidId(id));
  return impl_->type(id);
}

bool Tokenizer::IsSpecial(int32_t id) const { return IsSpecialType(TokenTypeOf(id)); }

std::optional<int32_t> Tokenizer::FindToken(std::string_view text) const {
  auto it = impl_->token_to_id.find(text);
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

int32_t Tokenizer::bos_id() const { return impl_->data.bos_id; }
int32_t Tokenizer::eos_id() const { return impl_->data.eos_id; }
int32_t Tokenizer::eot_id() const { return impl_->data.eot_id; }
int32_t Tokenizer::pad_id() const { return impl_->data.pad_id; }
bool Tokenizer::add_bos() const { return impl_->data.add_bos; }
bool Tokenizer::add_eos() const { return impl_->data.add_eos; }
bool Tokenizer::IsEndOfGeneration(int32_t id) const {
  return id >= 0 && (id == impl_->data.eos_id || id == impl_->data.eot_id);
}
const std::string& Tokenizer::model() const { return impl_->data.model; }
const std::string& Tokenizer::pre() const { return impl_->data.pre; }
int32_t Tokenizer::n_merges() const { return static_cast<int32_t>(impl_->data.merges.size()); }

}  // namespace ktx::tokenizer
