#include "runtime/base/logging.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <mutex>
#include <string>

#include "runtime/base/status.h"

namespace ktx {
namespace {

LogLevel LevelFromEnvironment() {
  const char* env = std::getenv("KTX_LOG_LEVEL");
  LogLevel level = LogLevel::kInfo;
  if (env != nullptr && !ParseLogLevel(env, &level)) {
    std::fprintf(stderr, "ktx: ignoring KTX_LOG_LEVEL=%s (expected debug|info|warning|error|off)\n",
                 env);
    level = LogLevel::kInfo;
  }
  return level;
}

std::atomic<int>& Threshold() {
  static std::atomic<int> threshold{static_cast<int>(LevelFromEnvironment())};
  return threshold;
}

char LevelLetter(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return 'D';
    case LogLevel::kInfo: return 'I';
    case LogLevel::kWarning: return 'W';
    case LogLevel::kError: return 'E';
    case LogLevel::kOff: break;
  }
  return '?';
}

}  // namespace

void SetLogLevel(LogLevel level) { Threshold().store(static_cast<int>(level)); }
LogLevel GetLogLevel() {
  return static_cast<LogLevel>(Threshold().load(std::memory_order_relaxed));
}

bool ParseLogLevel(std::string_view text, LogLevel* level) {
  if (text == "debug") {
    *level = LogLevel::kDebug;
    return true;
  }
  if (text == "info") {
    *level = LogLevel::kInfo;
    return true;
  }
  if (text == "warning" || text == "warn") {
    *level = LogLevel::kWarning;
    return true;
  }
  if (text == "error") {
    *level = LogLevel::kError;
    return true;
  }
  if (text == "off") {
    *level = LogLevel::kOff;
    return true;
  }
  return false;
}

namespace internal {

LogMessage::LogMessage(LogLevel level, std::string_view component) : level_(level) {
  const auto now = std::chrono::system_clock::now();
  const std::time_t seconds = std::chrono::system_clock::to_time_t(now);
  const auto millis =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &utc);
  char millis_text[8];
  std::snprintf(millis_text, sizeof(millis_text), ".%03dZ", static_cast<int>(millis));
  stream_ << stamp << millis_text << ' ' << LevelLetter(level_) << ' ' << component << "] ";
}

LogMessage::~LogMessage() {
  stream_ << '\n';
  const std::string line = stream_.str();
  std::fwrite(line.data(), 1, line.size(), stderr);
}

[[noreturn]] void CheckFailed(const char* condition, const char* file, int line,
                              const char* message) {
  std::fprintf(stderr, "ktx: check failed: %s (%s:%d) %s\n", condition, file, line, message);
  std::abort();
}

}  // namespace internal
}  // namespace ktx
