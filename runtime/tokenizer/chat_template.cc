#include "runtime/tokenizer/chat_template.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "runtime/base/status.h"

namespace ktx::tokenizer {
namespace {

constexpr std::string_view kV3Name = "deepseek-v3";
constexpr std::string_view kR1Name = "deepseek-r1";
constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";

// Debian's Abseil has its own string_view type; StrCat takes that one.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

bool Contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

// A short, single-line excerpt of a template for error messages.
std::string Excerpt(std::string_view jinja) {
  constexpr size_t kMax = 80;
  std::string head(jinja.substr(0, kMax));
  head = absl::StrReplaceAll(head, {{"\n", "\\n"}, {"\r", "\\r"}});
  return absl::StrCat("'", head, jinja.size() > kMax ? "...'" : "'");
}

std::string OverrideHint() {
  return absl::StrCat("choose a template by name instead (",
                      absl::StrJoin(ChatTemplate::SupportedNames(), ", "), ")");
}

}  // namespace

const std::vector<std::string>& ChatTemplate::SupportedNames() {
  static const auto* const names =
      new std::vector<std::string>{std::string(kV3Name), std::string(kR1Name)};
  return *names;
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromName(std::string_view name) {
  if (name == kV3Name) return ChatTemplate(ChatFormat::kDeepSeekV3, false);
  if (name == kR1Name) return ChatTemplate(ChatFormat::kDeepSeekR1, true);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown chat template name '", Av(name),
                   "'; ktx knows: ", absl::StrJoin(SupportedNames(), ", ")));
}

absl::StatusOr<ChatTemplate> ChatTemplate::Detect(std::string_view jinja) {
  const bool has_user = Contains(jinja, kDeepSeekUser);
  const bool has_assistant = Contains(jinja, kDeepSeekAssistant);
  if (!has_user || !has_assistant) {
    return absl::NotFoundError(absl::StrCat(
        "unrecognised tokenizer.chat_template (", jinja.size(), " bytes, begins ", Excerpt(jinja),
        "): it lacks ", Av(!has_user ? kDeepSeekUser : kDeepSeekAssistant),
        ", so it is not a DeepSeek-V3/R1 template; ", OverrideHint()));
  }
  if (Contains(jinja, absl::StrCat(Av(kDeepSeekAssistant), Av(kThinkClose)))) {
    return absl::NotFoundError(absl::StrCat(
        "unrecognised tokenizer.chat_template (", jinja.size(), " bytes, begins ", Excerpt(jinja),
        "): it writes '", Av(kDeepSeekAssistant), Av(kThinkClose),
        "' (a hybrid thinking template such as DeepSeek-V3.1's), which ktx does not render; ",
        OverrideHint()));
  }
  if (Contains(jinja, kThinkClose)) {
    const bool force_think = Contains(jinja, absl::StrCat(Av(kDeepSeekAssistant), Av(kThinkOpen)));
    return ChatTemplate(ChatFormat::kDeepSeekR1, force_think);
  }
  return ChatTemplate(ChatFormat::kDeepSeekV3, false);
}

absl::StatusOr<ChatTemplate> ChatTemplate::Resolve(std::string_view jinja,
                                                   std::string_view override_name) {
  if (!override_name.empty()) return FromName(override_name);
  if (jinja.empty()) {
    return absl::NotFoundError(
        absl::StrCat("the model has no chat template (tokenizer.chat_template is missing or "
                     "empty); ",
                     OverrideHint()));
  }
  return Detect(jinja);
}

std::string_view ChatTemplate::name() const {
  return format_ == ChatFormat::kDeepSeekR1 ? kR1Name : kV3Name;
}

absl::StatusOr<std::vector<ChatSegment>> ChatTemplate::ApplySegments(
    absl::Span<const ChatMessage> messages, const ChatOptions& options) const {
  std::vector<ChatSegment> out;
  auto add = [&out](std::string_view text, bool from_template) {
    if (text.empty()) return;
    if (!out.empty() && out.back().from_template == from_template) {
      out.back().text.append(text);
    } else {
      out.push_back(ChatSegment{std::string(text), from_template});
    }
  };
  add(options.bos_text, true);
  // System prompts first, joined by a blank line.
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    // The separator is plain text: kept with the contents so that it is
    // pre-tokenized together with them, as in the whole prompt.
    if (!first_system) add("\n\n", false);
    add(m.content, false);
    first_system = false;
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "system") continue;
    if (m.role == "user") {
      add(kDeepSeekUser, true);
      add(m.content, false);
    } else if (m.role == "assistant") {
      std::string_view content = m.content;
      if (format_ == ChatFormat::kDeepSeekR1) {
        const size_t close = content.rfind(kThinkClose);
        if (close != std::string_view::npos) content.remove_prefix(close + kThinkClose.size());
      }
      add(kDeepSeekAssistant, true);
      add(content, false);
      add(kDeepSeekEos, true);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("chat message ", i, " has role '", m.role, "'; the ", Av(name()),
                       " template supports system, user and assistant"));
    }
  }
  if (options.add_generation_prompt) {
    add(kDeepSeekAssistant, true);
    if (format_ == ChatFormat::kDeepSeekR1 && options.force_think.value_or(force_think_default_)) {
      add(kThinkOpen, true);
      add("\n", true);
    }
  }
  return out;
}

absl::StatusOr<std::string> ChatTemplate::Apply(absl::Span<const ChatMessage> messages,
                                                const ChatOptions& options) const {
  KTX_ASSIGN_OR_RETURN(std::vector<ChatSegment> segments, ApplySegments(messages, options));
  std::string out;
  for (const ChatSegment& s : segments) out.append(s.text);
  return out;
}

absl::StatusOr<std::vector<int32_t>> TokenizeChat(const Tokenizer& tokenizer,
                                                  absl::Span<const ChatSegment> segments,
                                                  const TokenizeOptions& options) {
  const bool add_bos = options.add_bos.value_or(tokenizer.add_bos());
  const bool add_eos = options.add_eos.value_or(tokenizer.add_eos());
  std::vector<int32_t> out;
  if (add_bos) {
    if (tokenizer.bos_id() < 0) {
      return absl::FailedPreconditionError("add_bos requested but the model has no BOS token");
    }
    out.push_back(tokenizer.bos_id());
  }
  for (const ChatSegment& s : segments) {
    TokenizeOptions part = options;
    part.add_bos = false;
    part.add_eos = false;
    if (s.from_template) part.parse_special = true;
    KTX_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer.Tokenize(s.text, part));
    out.insert(out.end(), ids.begin(), ids.end());
  }
  if (add_eos) {
    if (tokenizer.eos_id() < 0) {
      return absl::FailedPreconditionError("add_eos requested but the model has no EOS token");
    }
    out.push_back(tokenizer.eos_id());
  }
  return out;
}

}  // namespace ktx::tokenizer
