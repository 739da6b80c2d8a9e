#include "runtime/tokenizer/pre_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/base/status.h"
#include "runtime/tokenizer/utf8.h"

namespace ktx::tokenizer {
namespace {

constexpr std::string_view kDeepSeekV3 = "deepseek-v3";

// The three Isolated splits of DeepSeek-V3's tokenizer.json, in PCRE2 syntax.
const char* const kDeepSeekV3Patterns[] = {
    R"re(\p{N}{1,3})re",
    R"re([\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+)re",
    R"re([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+)re"
    R"re(|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+)re"
    R"re(| ?[\p{P}\p{S}]+[\r\n]*)re"
    R"re(|\s*[\r\n]+)re"
    R"re(|\s+(?!\S))re"
    R"re(|\s+)re",
};

struct Pattern {
  std::string source;
  pcre2_code* code = nullptr;
  bool jit = false;
};

// Debian's Abseil has its own string_view type; StrCat takes that one.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

std::string Pcre2ErrorText(int code) {
  PCRE2_UCHAR buffer[256];
  if (pcre2_get_error_message(code, buffer, sizeof(buffer)) < 0) {
    return absl::StrCat("PCRE2 error ", code);
  }
  return std::string(reinterpret_cast<const char*>(buffer));
}

}  // namespace

struct PreTokenizer::Impl {
  std::vector<Pattern> patterns;

  ~Impl() {
    for (Pattern& p : patterns) pcre2_code_free(p.code);
  }
};

const std::vector<std::string>& SupportedPreTokenizers() {
  static const auto* const names = new std::vector<std::string>{std::string(kDeepSeekV3)};
  return *names;
}

PreTokenizer::PreTokenizer(std::string name, std::unique_ptr<Impl> impl)
    : name_(std::move(name)), impl_(std::move(impl)) {}
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;
PreTokenizer::~PreTokenizer() = default;

absl::StatusOr<PreTokenizer> PreTokenizer::Create(std::string_view name) {
  if (name != kDeepSeekV3) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown pre-tokenizer (tokenizer.ggml.pre) '", Av(name),
                     "'; ktx supports: ", absl::StrJoin(SupportedPreTokenizers(), ", ")));
  }
  auto impl = std::make_unique<Impl>();
  for (const char* source : kDeepSeekV3Patterns) {
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    Pattern pattern;
    pattern.source = source;
    pattern.code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source), PCRE2_ZERO_TERMINATED,
                                 PCRE2_UTF | PCRE2_UCP, &error, &error_offset, nullptr);
    if (pattern.code == nullptr) {
      return absl::InternalError(absl::StrCat("pre-tokenizer '", Av(name),
                                              "': PCRE2 cannot compile /", source, "/ at offset ",
                                              error_offset, ": ", Pcre2ErrorText(error)));
    }
    // JIT is optional: without it (no JIT support for this CPU or build) the
    // interpreter gives the same matches, only slower.
    pattern.jit = pcre2_jit_compile(pattern.code, PCRE2_JIT_COMPLETE) == 0;
    impl->patterns.push_back(std::move(pattern));
  }
  return PreTokenizer(std::string(name), std::move(impl));
}

bool PreTokenizer::jit() const {
  for (const Pattern& p : impl_->patterns) {
    if (!p.jit) return false;
  }
  return !impl_->patterns.empty();
}

namespace {

struct MatchDataDeleter {
  void operator()(pcre2_match_data* md) const { pcre2_match_data_free(md); }
};
using MatchData = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

// Splits valid UTF-8 `piece` by `pattern` (Isolated: matches and the gaps
// between them are all pieces).
absl::Status SplitIsolated(const Pattern& pattern, pcre2_match_data* md, std::string_view piece,
                           std::vector<std::string_view>* out) {
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
  size_t pos = 0;      // where the next match attempt starts
  size_t emitted = 0;  // end of the last piece written
  while (pos < piece.size()) {
    int rc = pcre2_match(pattern.code, subject, piece.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && pattern.jit) {
      // The JIT stack or a limit may be too small for a pathological run; the
      // interpreter keeps its backtracking state on the heap.
      rc = pcre2_match(pattern.code, subject, piece.size(), pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT,
                       md, nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("pre-tokenizer: PCRE2 failed on /", pattern.source, "/ at byte ", pos,
                       " of a ", piece.size(), "-byte piece: ", Pcre2ErrorText(rc)));
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(md);
    const size_t start = ovector[0];
    const size_t end = ovector[1];
    if (end <= start) {
      // An empty match (none of ktx's patterns has one): step over one code point.
      size_t len = 1;
      ScanUtf8(piece.substr(pos), &len);
      pos += len;
      continue;
    }
    if (start > emitted) out->push_back(piece.substr(emitted, start - emitted));
    out->push_back(piece.substr(start, end - start));
    emitted = end;
    pos = end;
  }
  if (emitted < piece.size()) out->push_back(piece.substr(emitted));
  return absl::OkStatus();
}

}  // namespace

absl::Status PreTokenizer::Split(std::string_view text,
                                 std::vector<std::string_view>* pieces) const {
  std::vector<MatchData> match_data;
  match_data.reserve(impl_->patterns.size());
  for (const Pattern& p : impl_->patterns) {
    match_data.emplace_back(pcre2_match_data_create_from_pattern(p.code, nullptr));
    if (match_data.back() == nullptr) {
      return absl::ResourceExhaustedError("pre-tokenizer: out of memory for PCRE2 match data");
    }
  }

  std::vector<std::string_view> current;
  std::vector<std::string_view> next;
  auto split_valid = [&](std::string_view run) -> absl::Status {
    current.assign(1, run);
    for (size_t i = 0; i < impl_->patterns.size(); ++i) {
      next.clear();
      for (std::string_view piece : current) {
        KTX_RETURN_IF_ERROR(SplitIsolated(impl_->patterns[i], match_data[i].get(), piece, &next));
      }
      current.swap(next);
    }
    pieces->insert(pieces->end(), current.begin(), current.end());
    return absl::OkStatus();
  };

  size_t pos = 0;
  while (pos < text.size()) {
    const size_t valid = ValidUtf8Prefix(text.substr(pos));
    if (valid > 0) {
      KTX_RETURN_IF_ERROR(split_valid(text.substr(pos, valid)));
      pos += valid;
      continue;
    }
    size_t len = 1;
    ScanUtf8(text.substr(pos), &len);  // kInvalid or kIncomplete at the end
    pieces->push_back(text.substr(pos, len));
    pos += len;
  }
  return absl::OkStatus();
}

}  // namespace ktx::tokenizer
