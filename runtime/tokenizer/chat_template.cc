#include "runtime/tokenizer/chat_template.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"

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

absl::StatusOr<std::string> ChatTemplate::Apply(absl::Span<const ChatMessage> messages,
                                                const ChatOptions& options) const {
  std::string out = options.bos_text;
  // System prompts first, joined by a blank line.
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    if (!first_system) out.append("\n\n");
    out.append(m.content);
    first_system = false;
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "system") continue;
    if (m.role == "user") {
      absl::StrAppend(&out, Av(kDeepSeekUser), m.content);
    } else if (m.role == "assistant") {
      std::string_view content = m.content;
      if (format_ == ChatFormat::kDeepSeekR1) {
        const size_t close = content.rfind(kThinkClose);
        if (close != std::string_view::npos) content.remove_prefix(close + kThinkClose.size());
      }
      absl::StrAppend(&out, Av(kDeepSeekAssistant), Av(content), Av(kDeepSeekEos));
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("chat message ", i, " has role '", m.role, "'; the ", Av(name()),
                       " template supports system, user and assistant"));
    }
  }
  if (options.add_generation_prompt) {
    out.append(kDeepSeekAssistant);
    if (format_ == ChatFormat::kDeepSeekR1 && options.force_think.value_or(force_think_default_)) {
      absl::StrAppend(&out, Av(kThinkOpen), "\n");
    }
  }
  return out;
}

}  // namespace ktx::tokenizer
