// Stop strings and stop conditions. The property every streaming test checks: the concatenation of what was
// streamed equals the full text cut before the first stop string, and no streamed chunk ever holds a byte that
// belongs to the stop string.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/sampling/stop.h"

using namespace kiln;

namespace {

struct Streamed {
  std::vector<std::string> chunks;
  std::string text;
  bool matched;
};

Streamed stream(std::vector<std::string> stops, const std::vector<std::string>& pieces) {
  StopStringMatcher m(std::move(stops));
  Streamed s{{}, {}, false};
  for (const std::string& piece : pieces) {
    s.chunks.push_back(m.push(piece));
    s.text += s.chunks.back();
  }
  s.chunks.push_back(m.flush());
  s.text += s.chunks.back();
  s.matched = m.matched();
  return s;
}

// Every way to cut `text` into pieces of 1..3 bytes, deterministic.
std::vector<std::vector<std::string>> splits(const std::string& text) {
  std::vector<std::vector<std::string>> out;
  for (size_t a = 1; a <= 3; ++a) {
    for (size_t b = 1; b <= 3; ++b) {
      std::vector<std::string> pieces;
      size_t i = 0;
      for (int n = 0; i < text.size(); ++n) {
        const size_t len = std::min(text.size() - i, n % 2 ? a : b);
        pieces.push_back(text.substr(i, len));
        i += len;
      }
      out.push_back(pieces);
    }
  }
  out.push_back({text});
  return out;
}

}  // namespace

TEST(StopStrings, SpansTokenBoundaries) {
  const Streamed s = stream({"STOP"}, {"Hello S", "T", "O", "P and more"});
  EXPECT_TRUE(s.matched);
  EXPECT_EQ(s.text, "Hello ");
  // Nothing of "STOP" was ever streamed, not even the leading S.
  for (const std::string& c : s.chunks) EXPECT_EQ(c.find('S'), std::string::npos) << c;
}

TEST(StopStrings, HeldBackTextIsReleasedWhenItDoesNotMatch) {
  StopStringMatcher m({"</end>"});
  EXPECT_EQ(m.push("a </"), "a ");
  EXPECT_EQ(m.held_back(), 2u);
  EXPECT_EQ(m.push("e"), "");
  EXPECT_EQ(m.push("x"), "</ex");  // "</ex" can no longer become "</end>"
  EXPECT_EQ(m.held_back(), 0u);
  EXPECT_EQ(m.push("</en"), "");
  EXPECT_EQ(m.flush(), "</en");  // end of stream: a partial stop string is ordinary text
  EXPECT_FALSE(m.matched());
}

TEST(StopStrings, PartialReleasedUpToANewPossibleStart) {
  // "aab" with stop "ab": the first 'a' is released only once it can no longer start the stop string.
  StopStringMatcher m({"ab"});
  EXPECT_EQ(m.push("a"), "");
  EXPECT_EQ(m.push("a"), "a");
  EXPECT_EQ(m.push("b"), "");
  EXPECT_TRUE(m.matched());
  EXPECT_EQ(m.push("more"), "");
  EXPECT_EQ(m.flush(), "");
}

TEST(StopStrings, TruncatesBeforeTheStopStringInOnePiece) {
  const Streamed s = stream({"\n\n"}, {"one\ntwo\n\nthree"});
  EXPECT_TRUE(s.matched);
  EXPECT_EQ(s.text, "one\ntwo");
}

TEST(StopStrings, MultipleStopStringsFirstToCompleteWins) {
  StopStringMatcher m({"world", "lo w"});
  EXPECT_EQ(m.push("hello w"), "hel");  // "lo w" completes first, even though it is listed second
  EXPECT_TRUE(m.matched());
  EXPECT_EQ(m.matched_string(), "lo w");

  // Same end: the one that starts first (the longer) wins.
  StopStringMatcher same_end({"c", "abc"});
  EXPECT_EQ(same_end.push("xxabc"), "xx");
  EXPECT_EQ(same_end.matched_string(), "abc");

  // A short stop string inside a longer one that is not complete yet: stop as soon as any completes.
  StopStringMatcher inner({"abcd", "b"});
  EXPECT_EQ(inner.push("zab"), "za");
  EXPECT_EQ(inner.matched_string(), "b");
}

TEST(StopStrings, OverlappingPrefixes) {
  // Self-overlapping stop string: "aab" inside "aaab".
  for (const auto& pieces : splits("xaaab tail")) {
    const Streamed s = stream({"aab"}, pieces);
    EXPECT_TRUE(s.matched);
    EXPECT_EQ(s.text, "xa");
  }
  // Stop strings sharing a prefix: "abx" and "aby"; "abz" is released.
  for (const auto& pieces : splits("1abz2aby3")) {
    const Streamed s = stream({"abx", "aby"}, pieces);
    EXPECT_TRUE(s.matched);
    EXPECT_EQ(s.text, "1abz2");
  }
  // No match at all: everything comes out, in order.
  for (const auto& pieces : splits("abababa")) {
    const Streamed s = stream({"abb", "bab!"}, pieces);
    EXPECT_FALSE(s.matched);
    EXPECT_EQ(s.text, "abababa");
  }
}

TEST(StopStrings, Utf8MultiByte) {
  // Stop strings and text with 2-, 3- and 4-byte characters; a stop string may be split inside a character too
  // (byte-level pieces). Released text is always whole characters.
  const std::string text = "Grüße 你好世界 🙂 done";
  const std::string stop = "世界 🙂";
  for (const auto& pieces : splits(text)) {
    StopStringMatcher m({stop, "ße!"});
    std::string out;
    for (const std::string& p : pieces) out += m.push(p);
    out += m.flush();
    EXPECT_TRUE(m.matched());
    EXPECT_EQ(out, "Grüße 你好");
  }
  // A stop string sharing a lead byte with released text: "é" (C3 A9) vs stop "è" (C3 A8).
  const Streamed s = stream({"è"}, {"caf\xC3", "\xA9 ", "mère"});
  EXPECT_TRUE(s.matched);
  EXPECT_EQ(s.text, "café m");
}

TEST(StopStrings, StreamedTextNeverContainsAnyStopByte) {
  // Exhaustive over the splits: the streamed prefix before the match never includes a byte of the match.
  const std::string text = "the end is <|im_end|> not shown";
  for (const auto& pieces : splits(text)) {
    const Streamed s = stream({"<|im_end|>", "<|endoftext|>"}, pieces);
    EXPECT_EQ(s.text, "the end is ");
    std::string so_far;
    for (const std::string& c : s.chunks) {
      so_far += c;
      EXPECT_EQ(std::string("the end is ").substr(0, so_far.size()), so_far);
    }
  }
}

TEST(StopStrings, EmptyStopStringIsRejected) {
  EXPECT_THROW(StopStringMatcher({"a", ""}), Error);
  StopStringMatcher none({});
  EXPECT_EQ(none.push("anything"), "anything");
}

// ---- StopChecker ----

TEST(StopChecker, StopTokenEndsWithoutItsText) {
  SamplingParams p;
  p.stop_token_ids = {7};
  StopChecker c(p, {2});
  EXPECT_EQ(c.push(5, "Hi"), "Hi");
  EXPECT_FALSE(c.done());
  EXPECT_EQ(c.push(7, "<stop>"), "");
  EXPECT_TRUE(c.done());
  EXPECT_EQ(c.finish(""), "");
  EXPECT_STREQ(finish_reason_name(c.finish_reason()), "stop");
  EXPECT_EQ(c.stop_token(), 7);
  EXPECT_FALSE(c.stop_string().has_value());
  EXPECT_EQ(c.text(), "Hi");
}

TEST(StopChecker, EosUnlessIgnoreEos) {
  SamplingParams p;
  StopChecker c(p, {2, 3});
  EXPECT_TRUE(c.stops_on(3));
  c.push(3, "");
  EXPECT_EQ(c.finish_reason(), FinishReason::kStop);

  p.ignore_eos = true;
  p.stop_token_ids = {9};
  StopChecker ignoring(p, {2, 3});
  EXPECT_FALSE(ignoring.stops_on(3));
  EXPECT_EQ(ignoring.push(3, "</s>"), "</s>");
  EXPECT_FALSE(ignoring.done());
  EXPECT_TRUE(ignoring.stops_on(9));  // stop_token_ids still stop with ignore_eos
}

TEST(StopChecker, LengthReleasesHeldBackText) {
  SamplingParams p;
  p.max_new_tokens = 3;
  p.stop = {"###"};
  StopChecker c(p, {});
  EXPECT_EQ(c.push(1, "a"), "a");
  EXPECT_EQ(c.push(1, "b#"), "b");  // '#' held back
  EXPECT_EQ(c.push(1, "#"), "");
  EXPECT_TRUE(c.done());
  EXPECT_STREQ(finish_reason_name(c.finish_reason()), "length");
  EXPECT_EQ(c.finish(""), "##");
  EXPECT_EQ(c.text(), "ab##");
  EXPECT_EQ(c.generated(), 3);
}

TEST(StopChecker, StopStringBeatsLengthOnTheLastToken) {
  SamplingParams p;
  p.max_new_tokens = 2;
  p.stop = {"END"};
  StopChecker c(p, {});
  EXPECT_EQ(c.push(1, "xE"), "x");
  EXPECT_EQ(c.push(1, "ND!"), "");
  EXPECT_EQ(c.finish_reason(), FinishReason::kStop);
  EXPECT_EQ(c.stop_string(), "END");
  EXPECT_EQ(c.finish("more"), "");
  EXPECT_EQ(c.text(), "x");
}

TEST(StopChecker, DetokenizerTailGoesThroughTheMatcher) {
  SamplingParams p;
  p.max_new_tokens = 1;
  p.stop = {"é"};
  StopChecker c(p, {});
  EXPECT_EQ(c.push(1, "caf"), "caf");
  EXPECT_EQ(c.finish_reason(), FinishReason::kLength);
  EXPECT_EQ(c.finish("é!"), "");  // the held UTF-8 tail completes a stop string
  EXPECT_EQ(c.finish_reason(), FinishReason::kStop);
  EXPECT_EQ(c.text(), "caf");
  EXPECT_STREQ(finish_reason_name(FinishReason::kNone), "");
}
