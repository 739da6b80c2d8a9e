#include "topology/cpu_list.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ktx::topology {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(ParseCpuListTest, IdsAndRanges) {
  EXPECT_THAT(*ParseCpuList("0-3,8,10-11"), ElementsAre(0, 1, 2, 3, 8, 10, 11));
  EXPECT_THAT(*ParseCpuList("5"), ElementsAre(5));
  EXPECT_THAT(*ParseCpuList("16-23,0-7").value().begin(), 0);  // sorted
  EXPECT_EQ(ParseCpuList("16-23,0-7")->size(), 16u);
  EXPECT_THAT(*ParseCpuList("7-7"), ElementsAre(7));
}

TEST(ParseCpuListTest, ErrorsNameTheItem) {
  auto message = [](std::string_view list) {
    return std::string(ParseCpuList(list).status().message());
  };
  EXPECT_THAT(message(""), HasSubstr("empty"));
  EXPECT_THAT(message("0-3,,5"), HasSubstr("empty item"));
  EXPECT_THAT(message("0-3,"), HasSubstr("empty item"));
  EXPECT_THAT(message("a"), HasSubstr("'a' is not a cpu number"));
  EXPECT_THAT(message("-1"), HasSubstr("'-1' is not a range"));
  EXPECT_THAT(message("0 - 3"), HasSubstr("not a range"));
  EXPECT_THAT(message("7-3"), HasSubstr("range 7-3 is backwards"));
  EXPECT_THAT(message("0-3,2"), HasSubstr("cpu 2 is listed twice"));
  EXPECT_THAT(message("0-99999999"), HasSubstr("not a range"));
  EXPECT_THAT(message("0-2000000"), HasSubstr("above the limit"));
  EXPECT_THAT(message("1-2-3"), HasSubstr("not a range"));
  EXPECT_THAT(message("x-y"), HasSubstr("cpu list 'x-y'"));
}

TEST(FormatIdRangesTest, RoundTrip) {
  EXPECT_EQ(FormatIdRanges({}), "");
  EXPECT_EQ(FormatIdRanges({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
  for (const char* list : {"0-15,32-47", "1,3,5", "0", "2-3,7-9,100"}) {
    EXPECT_EQ(FormatIdRanges(*ParseCpuList(list)), list);
  }
}

}  // namespace
}  // namespace ktx::topology
