#include "runtime/base/logging.h"

#include "gtest/gtest.h"

namespace ktx {
namespace {

TEST(LoggingTest, ParseLevels) {
  LogLevel level;
  ASSERT_TRUE(ParseLogLevel("debug", &level));
  EXPECT_EQ(level, LogLevel::kDebug);
  ASSERT_TRUE(ParseLogLevel("warn", &level));
  EXPECT_EQ(level, LogLevel::kWarning);
  ASSERT_TRUE(ParseLogLevel("off", &level));
  EXPECT_EQ(level, LogLevel::kOff);
  EXPECT_FALSE(ParseLogLevel("loud", &level));
}

TEST(LoggingTest, WritesTaggedLineAtOrAboveThreshold) {
  SetLogLevel(LogLevel::kInfo);
  testing::internal::CaptureStderr();
  KTX_LOG(INFO, "gguf") << "loaded " << 3 << " tensors";
  KTX_LOG(DEBUG, "gguf") << "hidden";
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find(" I gguf] loaded 3 tensors\n"), std::string::npos) << err;
  EXPECT_EQ(err.find("hidden"), std::string::npos) << err;
}

TEST(LoggingTest, DisabledLevelDoesNotEvaluateArguments) {
  SetLogLevel(LogLevel::kError);
  int evaluated = 0;
  auto count = [&evaluated] { return ++evaluated; };
  testing::internal::CaptureStderr();
  KTX_LOG(WARNING, "x") << count();
  testing::internal::GetCapturedStderr();
  EXPECT_EQ(evaluated, 0);
  SetLogLevel(LogLevel::kInfo);
}

}  // namespace
}  // namespace ktx
