// File: runtime/tokenizer/chat_template.h
//
// Chat prompts for DeepSeek-V3 and DeepSeek-R1: a conversation (system, user,
// assistant messages) rendered as the text the model was trained on. ktx does
// not run Jinja; it recognises the model's `tokenizer.chat_template` by
// distinctive substrings and renders the known format natively, or takes an
// explicit name ("deepseek-v3", "deepseek-r1").
//
//   KTX_ASSIGN_OR_RETURN(ChatTemplate tmpl, ChatTemplate::Resolve(jinja, override_name));
//   KTX_ASSIGN_OR_RETURN(std::string prompt, tmpl.Apply(messages));
//   KTX_ASSIGN_OR_RETURN(auto ids, tokenizer.Tokenize(prompt));  // parse_special on
//
// The exact text produced (S = the system prompts, U/A = message contents):
//
//   [BOS] S <｜User｜>U1 <｜Assistant｜>A1<｜end▁of▁sentence｜> <｜User｜>U2 ...
//   <｜Assistant｜>[<think>\n]
//
// with no separators at all between the pieces (the spaces above are only for
// reading):
//   * BOS text (`<｜begin▁of▁sentence｜>`) only if ChatOptions::bos_text is set:
//     by default the tokenizer adds the BOS id (add_bos), so the text has none.
//   * S: the contents of all system messages, wherever they are, joined by
//     "\n\n", placed first (empty when there are none). As in the official
//     templates, system messages produce nothing where they occur.
//   * user: `<｜User｜>` + content.
//   * assistant: `<｜Assistant｜>` + content + `<｜end▁of▁sentence｜>`.
//     deepseek-r1 first drops the reasoning of past turns: when the content
//     contains `</think>`, only the text after its last occurrence is kept
//     (no trimming: "<think>x</think>\n\nHi" becomes "\n\nHi").
//   * generation prompt (ChatOptions::add_generation_prompt, default on):
//     `<｜Assistant｜>`; deepseek-r1 with force_think appends `<think>\n` (the
//     updated official R1 template does; the first release did not).
// Other roles (tool, ...) and tool calls are not supported: kInvalidArgument.
//
// Untrusted message text: Apply's string mixes the template's special tokens
// with message contents, so tokenizing it with parse_special would also turn
// special-token text typed by a user into control tokens. ApplySegments keeps
// the two apart and TokenizeChat tokenizes template text with parse_special and
// contents without. The ids equal Tokenize(Apply(...)) when the role markers
// are special tokens of the vocabulary (as in DeepSeek models) and the contents
// hold no special-token text.
// These match the official Jinja templates of DeepSeek-V3 and DeepSeek-R1
// (tokenizer_config.json) for system/user/assistant conversations.
//
// Ownership and threads: a ChatTemplate is a small value; Apply is const and
// thread-safe.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ktx::tokenizer {

// The special-token texts the templates use.
inline constexpr std::string_view kDeepSeekBos = "<｜begin▁of▁sentence｜>";
inline constexpr std::string_view kDeepSeekEos = "<｜end▁of▁sentence｜>";
inline constexpr std::string_view kDeepSeekUser = "<｜User｜>";
inline constexpr std::string_view kDeepSeekAssistant = "<｜Assistant｜>";

enum class ChatFormat {
  kDeepSeekV3,  // "deepseek-v3"
  kDeepSeekR1,  // "deepseek-r1"
};

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

struct ChatOptions {
  // End with the assistant header, for the model to answer.
  bool add_generation_prompt = true;
  // deepseek-r1: open the answer with "<think>\n". nullopt: the template's
  // default (ChatTemplate::force_think_default()).
  std::optional<bool> force_think;
  // Text put first (e.g. kDeepSeekBos when tokenizing without add_bos).
  std::string bos_text;
};

// A piece of a rendered prompt: template text (role markers, EOS, think tag,
// bos_text) or a message's content.
struct ChatSegment {
  std::string text;
  bool from_template = false;
};

class ChatTemplate {
 public:
  // The names FromName accepts, in a stable order.
  static const std::vector<std::string>& SupportedNames();

  // "deepseek-v3" or "deepseek-r1" (force_think_default on, as in the current
  // official R1 template); other names fail (kInvalidArgument) listing the
  // supported ones.
  static absl::StatusOr<ChatTemplate> FromName(std::string_view name);

  // Recognises a `tokenizer.chat_template` source:
  //   * `<｜User｜>` and `<｜Assistant｜>` both present (DeepSeek family), and
  //   * `</think>` present -> deepseek-r1; force_think_default is whether
  //     `<｜Assistant｜><think>` occurs (the generation prompt opens a think block);
  //   * `</think>` absent -> deepseek-v3.
  // A template that writes `<｜Assistant｜></think>` (DeepSeek-V3.1's hybrid
  // thinking template) and anything else is unknown: kNotFound, with a message
  // saying what was found and that a name can be given instead.
  static absl::StatusOr<ChatTemplate> Detect(std::string_view jinja);

  // `override_name` when not empty, else Detect(jinja); an empty `jinja` with
  // no override fails (kNotFound) saying the model has no chat template.
  static absl::StatusOr<ChatTemplate> Resolve(std::string_view jinja,
                                              std::string_view override_name);

  ChatFormat format() const { return format_; }
  std::string_view name() const;
  bool force_think_default() const { return force_think_default_; }

  // Renders `messages` (see the file comment). kInvalidArgument naming the
  // index and role of a message whose role is not system/user/assistant.
  absl::StatusOr<std::string> Apply(absl::Span<const ChatMessage> messages,
                                    const ChatOptions& options = {}) const;

  // The same text as Apply, as segments in order (empty ones left out).
  absl::StatusOr<std::vector<ChatSegment>> ApplySegments(absl::Span<const ChatMessage> messages,
                                                         const ChatOptions& options = {}) const;

 private:
  ChatTemplate(ChatFormat format, bool force_think_default)
      : format_(format), force_think_default_(force_think_default) {}
  ChatFormat format_;
  bool force_think_default_;
};

// Tokenizes rendered segments: template text with parse_special on, message
// contents with `options.parse_special` (set it false for untrusted text),
// BOS/EOS per `options` once around the whole prompt.
absl::StatusOr<std::vector<int32_t>> TokenizeChat(const Tokenizer& tokenizer,
                                                  absl::Span<const ChatSegment> segments,
                                                  const TokenizeOptions& options = {});

}  // namespace ktx::tokenizer
