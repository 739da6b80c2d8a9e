#include "runtime/synth/synth_vocab.h"

#include <map>
#include <set>
#include <unordered_set>
#include <utility>

#include "absl/strings/str_cat.h"

namespace ktx::synth {
namespace {

// Text the first merges are learned from (ktx's own words).
constexpr char kTrainingText[] =
    "The river ran past the old mill and under the stone bridge. In the morning the miller "
    "opened the doors, and the wheel began to turn. Children came to watch the water fall "
    "from the wheel, and the miller told them stories about the years when the river was "
    "wild and the bridge was new. They listened, then they ran home to tell their mothers "
    "and their fathers what they had heard. The river is still there, and the mill is still "
    "turning, and the stories are still told in the evening when the light is low.";

constexpr int kMaxLearnedMerges = 160;

bool IsAsciiLetter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// Pre-tokenizes ASCII text into words (" ?letters", " ?other non-space run",
// whitespace runs), each as a list of byte-unicode symbols.
std::vector<std::vector<std::string>> SplitWords(std::string_view text) {
  std::vector<std::vector<std::string>> words;
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i;
    if (text[j] == ' ' && j + 1 < text.size() && text[j + 1] != ' ') ++j;
    if (IsAsciiLetter(text[j])) {
      while (j < text.size() && IsAsciiLetter(text[j])) ++j;
    } else if (text[j] == ' ') {
      while (j < text.size() && text[j] == ' ') ++j;
    } else {
      while (j < text.size() && text[j] != ' ' && !IsAsciiLetter(text[j])) ++j;
    }
    std::vector<std::string> word;
    for (size_t k = i; k < j; ++k) word.push_back(ByteToUnicode(static_cast<uint8_t>(text[k])));
    words.push_back(std::move(word));
    i = j;
  }
  return words;
}

bool IsWordLike(const std::string& token) {
  std::string_view t = token;
  if (t.substr(0, 2) == "\xC4\xA0") t.remove_prefix(2);  // "Ġ"
  for (char c : t) {
    if (!IsAsciiLetter(c)) return false;
  }
  return true;
}

}  // namespace

std::string ByteToUnicode(uint8_t byte) {
  // Printable bytes stand for themselves; the others (0..32, 127..160, 173)
  // are numbered from U+0100 in byte order.
  const auto printable = [](int b) {
    return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  };
  uint32_t cp = byte;
  if (!printable(byte)) {
    int n = 0;
    for (int b = 0; b < byte; ++b) {
      if (!printable(b)) ++n;
    }
    cp = 256 + static_cast<uint32_t>(n);
  }
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

const std::string& SynthChatTemplate() {
  static const std::string* const kTemplate = new std::string(
      "{{ bos_token }}"
      "{%- for message in messages -%}"
      "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
      "{%- elif message['role'] == 'user' -%}{{ '<｜User｜>' + message['content'] }}"
      "{%- elif message['role'] == 'assistant' -%}"
      "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
      "{%- endif -%}"
      "{%- endfor -%}"
      "{%- if add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}");
  return *kTemplate;
}

absl::StatusOr<SynthVocab> BuildSynthVocab(int64_t n_vocab) {
  if (n_vocab < kMinSynthVocab || n_vocab > (int64_t{1} << 22)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--vocab = ", n_vocab, " must be in [", kMinSynthVocab, ", 4194304]"));
  }
  SynthVocab v;
  v.tokens = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"};
  v.token_types.assign(3, kTokenTypeControl);
  for (int b = 0; b < 256; ++b) {
    v.tokens.push_back(ByteToUnicode(static_cast<uint8_t>(b)));
    v.token_types.push_back(kTokenTypeNormal);
  }
  const size_t n_merges = static_cast<size_t>(n_vocab - kMinSynthVocab);
  std::unordered_set<std::string> existing(v.tokens.begin(), v.tokens.end());
  existing.reserve(static_cast<size_t>(n_vocab) * 2);
  const std::vector<std::string> chat_tokens = {"<｜User｜>", "<｜Assistant｜>", "<think>",
                                                "</think>"};
  for (const std::string& t : chat_tokens) existing.insert(t);

  auto add_merge = [&](const std::string& a, const std::string& b) {
    std::string merged = a + b;
    v.merges.push_back(absl::StrCat(a, " ", b));
    existing.insert(merged);
    v.tokens.push_back(std::move(merged));
    v.token_types.push_back(kTokenTypeNormal);
  };

  // 1. BPE learned on the training text: repeatedly merge the most frequent
  // adjacent pair (ties: the smallest pair), skipping pairs whose result
  // already exists, while the pair occurs at least twice.
  std::vector<std::vector<std::string>> words = SplitWords(kTrainingText);
  std::set<std::pair<std::string, std::string>> banned;
  while (v.merges.size() < n_merges && static_cast<int>(v.merges.size()) < kMaxLearnedMerges) {
    std::map<std::pair<std::string, std::string>, int> counts;
    for (const auto& w : words) {
      for (size_t i = 0; i + 1 < w.size(); ++i) ++counts[{w[i], w[i + 1]}];
    }
    const std::pair<std::string, std::string>* best = nullptr;
    int best_count = 1;
    for (const auto& [pair, count] : counts) {
      if (count > best_count && !banned.count(pair)) {
        best = &pair;
        best_count = count;
      }
    }
    if (best == nullptr) break;
    const auto pair = *best;
    if (existing.count(pair.first + pair.second)) {
      banned.insert(pair);
      continue;
    }
    add_merge(pair.first, pair.second);
    for (auto& w : words) {
      std::vector<std::string> merged;
      for (size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == pair.first && w[i + 1] == pair.second) {
          merged.push_back(pair.first + pair.second);
          ++i;
        } else {
          merged.push_back(w[i]);
        }
      }
      w = std::move(merged);
    }
  }

  // 2. Synthetic merges: word-like tokens (optional "Ġ" + letters), shortest
  // first, each extended by a lowercase letter.
  std::vector<std::string> queue = {ByteToUnicode(' ')};
  for (char c = 'a'; c <= 'z'; ++c) queue.push_back(std::string(1, c));
  for (size_t id = kMinSynthVocab - 4; id < v.tokens.size(); ++id) {
    if (IsWordLike(v.tokens[id])) queue.push_back(v.tokens[id]);
  }
  for (size_t q = 0; v.merges.size() < n_merges; ++q) {
    const std::string left = queue[q];  // copy: queue grows below
    for (char c = 'a'; c <= 'z' && v.merges.size() < n_merges; ++c) {
      const std::string right(1, c);
      if (existing.count(left + right)) continue;
      add_merge(left, right);
      queue.push_back(v.tokens.back());
    }
  }

  for (const std::string& t : chat_tokens) {
    v.tokens.push_back(t);
    v.token_types.push_back(kTokenTypeUserDefined);
  }
  v.chat_template = SynthChatTemplate();
  return v;
}

}  // namespace ktx::synth
