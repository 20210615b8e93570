// Unit tests for the tokenizer's C++ pieces. Id parity with Hugging Face over a large corpus lives in
// tests/python/test_tokenizer.py; here: fixed known ids, round trips, streaming, invalid UTF-8 and error messages.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "runtime/core/error.h"
#include "runtime/text/tokenizer/detokenizer.h"
#include "runtime/text/tokenizer/pre_tokenizer.h"
#include "runtime/text/tokenizer/regex.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "runtime/text/tokenizer/unicode.h"

namespace kiln {
namespace {

const Tokenizer& llama() {
  static const Tokenizer t = Tokenizer::load(locate_tokenizer_files(KILN_TESTDATA_DIR "/tokenizers/llama2"));
  return t;
}
const Tokenizer& qwen() {
  static const Tokenizer t = Tokenizer::load(locate_tokenizer_files(KILN_TESTDATA_DIR "/tokenizers/qwen3"));
  return t;
}

std::vector<std::string> corpus() {
  std::ifstream in(KILN_SOURCE_DIR "/tests/data/tokenizer_corpus/corpus.jsonl");
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line).get<std::string>());
  EXPECT_GT(out.size(), 100u);
  return out;
}

std::string stream(const Tokenizer& t, const std::vector<int32_t>& ids, bool skip) {
  IncrementalDetokenizer d(t, skip);
  std::string all;
  for (int32_t id : ids) {
    std::string piece = d.push(id);
    EXPECT_TRUE(text::is_valid_utf8(piece));
    all += piece;
  }
  return all + d.finish();
}

// Ids recorded from transformers 5 AutoTokenizer / tokenizers 0.23.
TEST(Tokenizer, KnownIds) {
  EXPECT_EQ(llama().encode("Hello world"), (std::vector<int32_t>{1, 22557, 1526}));
  EXPECT_EQ(llama().encode(" hi  there\n"), (std::vector<int32_t>{1, 12014, 28705, 736, 13}));
  EXPECT_EQ(llama().encode("<s>hello</s>"), (std::vector<int32_t>{1, 1, 6312, 28709, 2}));
  EXPECT_EQ(llama().encode(""), (std::vector<int32_t>{1}));
  EXPECT_EQ(qwen().encode("Hello world"), (std::vector<int32_t>{9707, 1879}));
  EXPECT_EQ(qwen().encode(" hi  there\n"), (std::vector<int32_t>{15588, 220, 1052, 198}));
  EXPECT_EQ(qwen().encode("<|im_end|>x"), (std::vector<int32_t>{151645, 87}));
  EXPECT_TRUE(qwen().encode("").empty());
}

TEST(Tokenizer, RawModeFollowsTokenizerJson) {
  auto raw = Tokenizer::load(locate_tokenizer_files(KILN_TESTDATA_DIR "/tokenizers/llama2/tokenizer.json"),
                             TokenizerCompat::TokenizersLibrary);
  EXPECT_EQ(raw.encode(" hi  there\n"), (std::vector<int32_t>{1, 28705, 12014, 28705, 736, 13}));
}

TEST(Tokenizer, Vocabulary) {
  EXPECT_EQ(llama().bos_id(), 1);
  EXPECT_EQ(llama().eos_id(), 2);
  EXPECT_TRUE(llama().is_special(1));
  EXPECT_FALSE(llama().is_special(22557));
  EXPECT_EQ(llama().token_to_id("<0x0A>"), 13);
  EXPECT_EQ(llama().id_to_token(22557), "▁Hello");
  EXPECT_EQ(llama().vocab_size(), 32000u);
  EXPECT_EQ(qwen().token_to_id("<|im_end|>"), 151645);
  EXPECT_EQ(qwen().eos_id(), 151645);
  EXPECT_FALSE(qwen().bos_id().has_value());
  EXPECT_FALSE(qwen().token_to_id("no such token").has_value());
  EXPECT_FALSE(qwen().id_to_token(-5).has_value());
}

TEST(Tokenizer, DecodeRoundTrip) {
  for (const auto& s : corpus()) {
    EXPECT_EQ(qwen().decode(qwen().encode(s, false)), text::normalize_unicode(s, text::NormForm::NFC)) << s;
    bool plain = s.find('<') == std::string::npos && (s.empty() || s[0] != ' ');
    if (plain) {
      EXPECT_EQ(llama().decode(llama().encode(s, false)), s) << s;
    }
  }
  EXPECT_EQ(qwen().decode(qwen().encode("a<|im_end|>b"), true), "ab");
}

TEST(Detokenizer, ConcatenationEqualsDecode) {
  for (const Tokenizer* t : {&llama(), &qwen()})
    for (const auto& s : corpus())
      for (bool skip : {false, true}) {
        auto ids = t->encode(s);
        EXPECT_EQ(stream(*t, ids, skip), t->decode(ids, skip)) << s;
      }
}

TEST(Detokenizer, HoldsIncompleteCharacters) {
  // 你 = E4 BD A0 as three byte-fallback tokens.
  IncrementalDetokenizer d(llama());
  auto id = [](const char* t) { return *llama().token_to_id(t); };
  EXPECT_EQ(d.push(id("▁Hello")), "Hello");
  EXPECT_EQ(d.push(id("<0xE4>")), "");
  EXPECT_EQ(d.push(id("<0xBD>")), "");
  EXPECT_EQ(d.push(id("<0xA0>")), "你");
  EXPECT_EQ(d.finish(), "");

  // Byte-level: an emoji split across tokens is held back until complete.
  auto ids = qwen().encode("🙂🙂🙂");
  IncrementalDetokenizer q(qwen());
  std::string all;
  for (int32_t i : ids) {
    std::string piece = q.push(i);
    EXPECT_TRUE(piece.empty() || piece.size() % 4 == 0) << piece;
    all += piece;
  }
  EXPECT_EQ(all + q.finish(), "🙂🙂🙂");

  // A stream that ends inside a character is released (as U+FFFD) by finish().
  IncrementalDetokenizer f(llama());
  EXPECT_EQ(f.push(id("<0xE4>")), "");
  EXPECT_EQ(f.finish(), "\xEF\xBF\xBD");
}

TEST(Detokenizer, SkipsSpecialTokens) {
  IncrementalDetokenizer d(qwen(), true);
  std::string all;
  for (int32_t i : qwen().encode("<|im_start|>assistant\nHi!<|im_end|>")) all += d.push(i);
  EXPECT_EQ(all + d.finish(), "assistant\nHi!");
}

TEST(Utf8, SanitizeUsesMaximalSubparts) {
  // Expected strings are Python's bytes.decode("utf-8", errors="replace").
  const std::string R = "\xEF\xBF\xBD";
  EXPECT_EQ(text::sanitize_utf8("abc\xff"), "abc" + R);
  EXPECT_EQ(text::sanitize_utf8("\xe4\xbd"), R);
  EXPECT_EQ(text::sanitize_utf8("\xe4\xbd"
                                "a"),
            R + "a");
  EXPECT_EQ(text::sanitize_utf8("\xed\xa0\x80"), R + R + R);  // surrogate
  EXPECT_EQ(text::sanitize_utf8("\xc0\xaf"), R + R);          // overlong
  EXPECT_EQ(text::sanitize_utf8("\xf0\x9f\x98 "), R + " ");
  EXPECT_EQ(text::sanitize_utf8("\xf4\x90\x80\x80"), R + R + R + R);  // above U+10FFFF
  EXPECT_EQ(text::sanitize_utf8("ok \xe4\xbd\xa0"), "ok \xe4\xbd\xa0");
  EXPECT_FALSE(text::is_valid_utf8("\x80"));
  EXPECT_TRUE(text::is_valid_utf8("h\xc3\xa9llo"));
}

TEST(Tokenizer, InvalidUtf8IsReplacedNotFatal) {
  for (const Tokenizer* t : {&llama(), &qwen()}) {
    EXPECT_EQ(t->encode("abc\xff def"), t->encode("abc\xEF\xBF\xBD def"));
    EXPECT_EQ(t->encode("\xe4\xbd"), t->encode("\xEF\xBF\xBD"));
    EXPECT_NO_THROW(t->encode(std::string("\0\xc0\xff\xfe", 4)));
  }
  // Decoding ids that spell invalid bytes yields U+FFFD, never invalid UTF-8.
  std::vector<int32_t> bytes = {*llama().token_to_id("<0xE4>"), *llama().token_to_id("<0xFF>")};
  EXPECT_TRUE(text::is_valid_utf8(llama().decode(bytes)));
  EXPECT_EQ(qwen().decode(std::vector<int32_t>{*qwen().token_to_id("Ã")}), "\xEF\xBF\xBD");
}

std::string error_of(const std::string& json) {
  try {
    Tokenizer::from_json(json, nullptr, TokenizerCompat::TokenizersLibrary, "tok.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Tokenizer, MalformedJsonErrorsNameFileAndField) {
  const std::string model = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";
  EXPECT_NE(error_of("{").find("tok.json: not valid JSON"), std::string::npos);
  EXPECT_NE(error_of("{}").find("tok.json: model is missing"), std::string::npos);
  EXPECT_NE(
      error_of(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "dropout": 0.1}})").find("model.dropout"),
      std::string::npos);
  EXPECT_NE(error_of(R"({"model": {"type": "Unigram", "vocab": []}})").find("model.type"), std::string::npos);
  EXPECT_NE(error_of(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a c"]}})").find("model.merges[0]"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b c"]}})").find("model.merges[0]"),
            std::string::npos);
  EXPECT_NE(error_of("{" + model + R"(, "normalizer": {"type": "Precompiled"}})").find("normalizer.type"),
            std::string::npos);
  EXPECT_NE(error_of("{" + model + R"(, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split",
      "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"}]}})")
                .find("pre_tokenizer.pretokenizers[0].pattern"),
            std::string::npos);
  EXPECT_NE(error_of("{" + model + R"(, "pre_tokenizer": {"type": "Split", "pattern": {"String": "x"},
      "behavior": "Sideways"}})")
                .find("pre_tokenizer.behavior"),
            std::string::npos);
  EXPECT_NE(error_of("{" + model + R"(, "decoder": {"type": "Strip", "content": "ab", "start": 1, "stop": 0}})")
                .find("decoder.content"),
            std::string::npos);
  EXPECT_NE(error_of("{" + model + R"(, "added_tokens": [{"id": 5}]})").find("added_tokens[0].content"),
            std::string::npos);
  EXPECT_EQ(error_of("{" + model + "}"), "");
}

TEST(Tokenizer, MinimalBpeMerges) {
  auto t = Tokenizer::from_json(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3, "abc": 4},
      "merges": [["a", "b"], "ab c"], "unk_token": null}})",
                                nullptr, TokenizerCompat::TokenizersLibrary);
  EXPECT_EQ(t.encode("abcab"), (std::vector<int32_t>{4, 2}));  // no pre-tokenizer: one word
  EXPECT_EQ(t.encode("xab"), (std::vector<int32_t>{2}));       // unknown characters vanish without unk_token
  EXPECT_EQ(t.decode(std::vector<int32_t>{4, 2}), "abc ab");   // no decoder: tokens joined by spaces
}

TEST(Regex, OnigurumaClassesMatchUnicodeWhiteSpace) {
  text::Regex ws("\\s+");
  auto m = ws.find_all(
      "a\xC2\x85"
      "b\xE1\xA0\x8E"
      "c");  // U+0085 is White_Space, U+180E is not
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0], (text::Span{1, 3}));
  text::Regex word("\\w+");
  EXPECT_EQ(word.find_all("क्षत्रिय").size(), 1u);  // marks are word characters in Oniguruma
  text::Regex ci("(?i:'s|'t)");
  EXPECT_EQ(ci.find_all("IT'S it'T").size(), 2u);
  text::Regex empty("x*");
  EXPECT_EQ(empty.find_all("ab").size(), 3u);  // Oniguruma reports an empty match at 0, 1 and 2
}

TEST(Regex, OnigurumaRulesThatPcre2ReadsDifferently) {
  auto spans = [](const std::string& pattern, const std::string& text) { return text::Regex(pattern).find_all(text); };
  using V = std::vector<text::Span>;
  // Literal non-ASCII ranges (DeepSeek-V3's CJK/kana Split).
  EXPECT_EQ(spans("[一-龥぀-ゟ゠-ヿ]+", "ab中文テキストcd"), (V{{2, 20}}));
  // In Oniguruma syntax X{n,m}+ repeats X{n,m} greedily (PCRE2 would make it possessive), X{n}? is optional and
  // {,m} is {0,m}.
  EXPECT_EQ(spans("a{1,2}+", "aaaaab"), (V{{0, 5}}));
  EXPECT_EQ(spans("a{2}?b", "ab"), (V{{1, 2}}));
  EXPECT_EQ(spans("x{,2}y", "xxxy"), (V{{1, 4}}));
  // Nested sets are unions, && intersects; (?m) is dot-all; ^ and $ are line anchors; \v is only VT.
  EXPECT_EQ(spans("[a-c[x-z]]+", "abxyq"), (V{{0, 4}}));
  EXPECT_EQ(spans("[a-z&&[^aeiou]]+", "hello"), (V{{0, 1}, {2, 4}}));
  EXPECT_EQ(spans("(?m).+", "ab\ncd"), (V{{0, 5}}));
  EXPECT_EQ(spans(".+", "ab\r\ncd"), (V{{0, 3}, {4, 6}}));
  EXPECT_EQ(spans("^.", "ab\ncd\n"), (V{{0, 1}, {3, 4}}));
  EXPECT_EQ(spans("\\v", "a\vb\nc"), (V{{1, 2}}));
  // Constructs without an exact translation are refused, naming the pattern; so is PCRE2's \C, which matches one
  // byte of a multi-byte character (found by fuzz_regex: /\C/ over "\xEF\xBF\xBD" cut the character).
  for (std::string bad : {"[[:graph:]]+", "\\C", "a(?<=\\C)"}) {
    try {
      text::Regex r(bad);
      FAIL() << "accepted " << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
  }
}

TEST(PreTokenizer, LosingInputBytesIsAnInternalError) {
  auto cut = [](std::vector<text::Span> matches, text::SplitBehavior b) {
    text::Piece p;
    p.text = "hello world";
    std::vector<text::Piece> out;
    text::split_around(std::move(p), matches, false, b, out);
    std::string joined;
    for (const auto& q : out) joined += q.text;
    return joined;
  };
  EXPECT_EQ(cut({{5, 6}}, text::SplitBehavior::Isolated), "hello world");
  EXPECT_EQ(cut({{5, 6}}, text::SplitBehavior::Removed), "helloworld");  // removal is what Removed asks for
  for (auto bad : std::vector<std::vector<text::Span>>{{{4, 6}, {5, 7}}, {{6, 5}}, {{3, 20}}}) {
    try {
      cut(bad, text::SplitBehavior::Isolated);
      FAIL() << "overlapping or out-of-range matches were accepted";
    } catch (const Error& e) {
      std::string what = e.what();
      EXPECT_NE(what.find("internal error"), std::string::npos) << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    }
  }
  // A cut inside a UTF-8 character would garble it: refused too.
  text::Piece p;
  p.text = "中文";
  std::vector<text::Piece> out;
  EXPECT_THROW(text::split_around(std::move(p), {{1, 3}}, false, text::SplitBehavior::Isolated, out), Error);
}

TEST(Tokenizer, ByteLevelFileDeclaringLlamaClassKeepsItsPipeline) {
  // transformers 5 only swaps in LlamaTokenizer's Metaspace pipeline when tokenizer.json is not byte-level;
  // swapping it into a byte-level vocabulary (DeepSeek-V3 declares LlamaTokenizerFast) dropped all CJK text.
  std::string vocab;
  for (int b = 0; b < 256; ++b) {
    vocab += (b ? "," : "") + nlohmann::json(text::byte_to_unicode(static_cast<unsigned char>(b))).dump() + ":" +
             std::to_string(b);
  }
  std::string j = R"({"model": {"type": "BPE", "vocab": {)" + vocab + R"(}, "merges": []},
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
      "decoder": {"type": "ByteLevel"}})";
  auto t = Tokenizer::from_json(j, nlohmann::json{{"tokenizer_class", "LlamaTokenizerFast"}});
  EXPECT_EQ(t.encode("中").size(), 3u);  // three UTF-8 bytes, three byte tokens
  EXPECT_EQ(t.decode(t.encode("中文 x")), "中文 x");
}

}  // namespace
}  // namespace kiln
