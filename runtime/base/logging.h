// File: runtime/base/logging.h
//
// Leveled logging to stderr with a component tag:
//
//   KTX_LOG(INFO, "gguf") << "loaded " << n_tensors << " tensors from " << path;
//
// prints `2026-11-26T05:40:01.123Z I gguf] loaded 1234 tensors from m.gguf`.
// The threshold comes from SetLogLevel() (CLI flag) or the environment variable
// KTX_LOG_LEVEL (debug|info|warning|error|off), read once at first use.
// Thread-safe: each message is formatted privately and written with one call.
#pragma once

#include <sstream>
#include <string_view>

namespace ktx {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kOff = 4 };

// Sets the process-wide threshold; messages below it are discarded cheaply.
void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
// Parses "debug", "info", "warning"/"warn", "error", "off"; returns false on junk.
bool ParseLogLevel(std::string_view text, LogLevel* level);

namespace internal {

// One log line under construction; written to stderr on destruction.
class LogMessage {
 public:
  LogMessage(LogLevel level, std::string_view component);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

inline bool LogEnabled(LogLevel level) { return level >= GetLogLevel(); }

}  // namespace internal
}  // namespace ktx

#define KTX_LOG_LEVEL_DEBUG ::ktx::LogLevel::kDebug
#define KTX_LOG_LEVEL_INFO ::ktx::LogLevel::kInfo
#define KTX_LOG_LEVEL_WARNING ::ktx::LogLevel::kWarning
#define KTX_LOG_LEVEL_ERROR ::ktx::LogLevel::kError

#define KTX_LOG(severity, component)                            \
  if (!::ktx::internal::LogEnabled(KTX_LOG_LEVEL_##severity)) { \
  } else                                                        \
    ::ktx::internal::LogMessage(KTX_LOG_LEVEL_##severity, (component)).stream()
