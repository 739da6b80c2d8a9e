#include "runtime/sampler/stop_strings.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace ktx::sampler {
namespace {

StopStringMatcher Make(std::vector<std::string> stops) {
  absl::StatusOr<StopStringMatcher> m = StopStringMatcher::Create(std::move(stops));
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

TEST(StopStringMatcherTest, StopInsideOnePiece) {
  StopStringMatcher m = Make({"STOP"});
  StopStringMatcher::Result r = m.Feed("hello STOP world");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.stop_index, 0);
  EXPECT_EQ(r.emit, "hello ");
  // Stays stopped.
  r = m.Feed("more");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.emit, "");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopStringMatcherTest, StopAcrossThreePieces) {
  StopStringMatcher m = Make({"\nUser:"});
  StopStringMatcher::Result r = m.Feed("Hel");
  EXPECT_EQ(r.emit, "Hel");
  EXPECT_FALSE(r.stopped);
  r = m.Feed("lo\nUs");
  EXPECT_EQ(r.emit, "lo");  // "\nUs" may start the stop string: held back
  EXPECT_EQ(m.held(), "\nUs");
  EXPECT_FALSE(r.stopped);
  r = m.Feed("e");
  EXPECT_EQ(r.emit, "");
  EXPECT_EQ(m.held(), "\nUse");
  r = m.Feed("r: x");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.emit, "");
}

TEST(StopStringMatcherTest, FalsePrefixIsReleased) {
  StopStringMatcher m = Make({"abc"});
  EXPECT_EQ(m.Feed("xab").emit, "x");
  StopStringMatcher::Result r = m.Feed("d");
  EXPECT_FALSE(r.stopped);
  EXPECT_EQ(r.emit, "abd");
  EXPECT_EQ(m.held(), "");
}

TEST(StopStringMatcherTest, SelfOverlappingStop) {
  StopStringMatcher m = Make({"aab"});
  EXPECT_EQ(m.Feed("a").emit, "");
  EXPECT_EQ(m.Feed("a").emit, "");
  EXPECT_EQ(m.Feed("a").emit, "a");  // "aaa": only the tail "aa" can still match
  StopStringMatcher::Result r = m.Feed("b");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.emit, "");
}

TEST(StopStringMatcherTest, FirstToCompleteWins) {
  {
    StopStringMatcher m = Make({"world", "lo w"});
    StopStringMatcher::Result r = m.Feed("hello world");
    EXPECT_TRUE(r.stopped);
    EXPECT_EQ(r.stop_index, 1);
    EXPECT_EQ(r.emit, "hel");
  }
  {
    // "xyz" starts earlier but "y" completes first; the same in one piece
    // or two.
    for (bool split : {false, true}) {
      StopStringMatcher m = Make({"xyz", "y"});
      StopStringMatcher::Result r = split ? m.Feed("axy") : m.Feed("axyz");
      EXPECT_TRUE(r.stopped);
      EXPECT_EQ(r.stop_index, 1);
      EXPECT_EQ(r.emit, "ax");
    }
  }
  {
    // Same end: the longer (earlier-starting) one.
    StopStringMatcher m = Make({"b", "ab"});
    StopStringMatcher::Result r = m.Feed("cab");
    EXPECT_EQ(r.stop_index, 1);
    EXPECT_EQ(r.emit, "c");
  }
}

TEST(StopStringMatcherTest, FlushReturnsHeldText) {
  StopStringMatcher m = Make({"</s>"});
  EXPECT_EQ(m.Feed("end </").emit, "end ");
  EXPECT_EQ(m.Flush(), "</");
  EXPECT_EQ(m.held(), "");
}

TEST(StopStringMatcherTest, NoStopStringsEmitsEverything) {
  StopStringMatcher m = Make({});
  EXPECT_EQ(m.Feed("abc").emit, "abc");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopStringMatcherTest, EmptyStopStringIsAnError) {
  absl::StatusOr<StopStringMatcher> m = StopStringMatcher::Create({"ok", ""});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("stop string 1"), std::string::npos);
}

// Random texts over a small alphabet, cut into random pieces, against a
// reference computed on the whole text: emitted text = text up to the earliest
// stop (or all of it with Flush), and what was emitted so far is always a
// prefix of that (nothing is ever taken back).
TEST(StopStringMatcherTest, RandomPiecesAgreeWithWholeTextSearch) {
  std::mt19937 gen(123);
  const std::string alphabet = "ab\n:";
  auto random_string = [&](size_t min_len, size_t max_len) {
    std::uniform_int_distribution<size_t> len(min_len, max_len);
    std::uniform_int_distribution<size_t> ch(0, alphabet.size() - 1);
    std::string s(len(gen), ' ');
    for (char& c : s) c = alphabet[ch(gen)];
    return s;
  };
  int n_stopped = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<std::string> stops;
    const int n_stops = 1 + trial % 3;
    for (int i = 0; i < n_stops; ++i) stops.push_back(random_string(1, 5));
    const std::string text = random_string(0, 40);
    // Reference: the stop that ends first; then the earlier start; then list order.
    size_t ref_end = std::string::npos;
    size_t ref_pos = std::string::npos;
    int ref_index = -1;
    for (int i = 0; i < n_stops; ++i) {
      const std::string& stop = stops[static_cast<size_t>(i)];
      const size_t pos = text.find(stop);
      if (pos == std::string::npos) continue;
      if (pos + stop.size() < ref_end || (pos + stop.size() == ref_end && pos < ref_pos)) {
        ref_end = pos + stop.size();
        ref_pos = pos;
        ref_index = i;
      }
    }
    const std::string expected = ref_index >= 0 ? text.substr(0, ref_pos) : text;

    StopStringMatcher m = Make(stops);
    std::string emitted;
    bool stopped = false;
    int stop_index = -1;
    size_t at = 0;
    std::uniform_int_distribution<size_t> piece_len(0, 6);
    while (at < text.size() && !stopped) {
      const size_t len = std::min(piece_len(gen), text.size() - at);
      StopStringMatcher::Result r = m.Feed(std::string_view(text).substr(at, len));
      at += len;
      emitted += r.emit;
      ASSERT_EQ(expected.compare(0, emitted.size(), emitted), 0)
          << "emitted '" << emitted << "' is not a prefix of '" << expected << "'";
      stopped = r.stopped;
      stop_index = r.stop_index;
    }
    if (!stopped) emitted += m.Flush();
    EXPECT_EQ(emitted, expected) << "text '" << text << "'";
    EXPECT_EQ(stopped, ref_index >= 0) << "text '" << text << "'";
    if (stopped) {
      EXPECT_EQ(stop_index, ref_index);
      ++n_stopped;
    }
  }
  EXPECT_GT(n_stopped, 200);  // the random cases do exercise stops
}

}  // namespace
}  // namespace ktx::sampler
