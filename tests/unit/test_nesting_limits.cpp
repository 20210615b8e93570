// Deeply nested input must fail with a clear error, never overflow the stack: the request body, JSON -> template
// values, the template evaluator (nested expressions, statements, macro calls), values a template builds in a loop,
// printing and tojson. The renders run on a thread with a 1 MiB stack (an eighth of the usual 8 MiB), so a limit
// that is too loose crashes this test instead of passing it.
#include <gtest/gtest.h>
#include <pthread.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/io/safetensors.h"
#include "runtime/serve/http_api.h"
#include "runtime/text/jinja/chat_template.h"
#include "runtime/text/jinja/jinja.h"

namespace kiln {
namespace {

using ordered_json = nlohmann::ordered_json;

// The test thread's stack: 1 MiB, an eighth of the default thread stack the server's handlers run on, so a depth
// limit that is too loose crashes the test. AddressSanitizer's redzones make every frame several times larger, so the
// sanitizer build gets the default 8 MiB: the limits must still hold there, with the margin a normal build has.
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KILN_TEST_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(KILN_TEST_ASAN)
constexpr size_t kSmallStack = size_t(8) << 20;
#else
constexpr size_t kSmallStack = size_t(1) << 20;
#endif

// Runs fn on a thread with a small stack; returns the kiln::Error message, or "<no error>".
std::string error_on_small_stack(const std::function<void()>& fn) {
  struct Job {
    const std::function<void()>* fn;
    std::string error = "<no error>";
  } job{&fn};
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, kSmallStack);
  pthread_t t;
  auto body = [](void* p) -> void* {
    auto* j = static_cast<Job*>(p);
    try {
      (*j->fn)();
    } catch (const std::exception& e) {
      j->error = e.what();
    }
    return nullptr;
  };
  EXPECT_EQ(pthread_create(&t, &attr, body, &job), 0);
  pthread_join(t, nullptr);
  pthread_attr_destroy(&attr);
  return job.error;
}

std::string nested(int depth, const std::string& inner = "1", char open = '[', char close = ']') {
  return std::string(size_t(depth), open) + inner + std::string(size_t(depth), close);
}

std::string render(const std::string& src) {
  std::string out;
  std::string err = error_on_small_stack([&] { out = jinja::Template(src).render({}); });
  return err == "<no error>" ? out : "error: " + err;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(NestingLimits, TextScanCountsBracketsOutsideStrings) {
  EXPECT_EQ(json_nesting_depth("[1, {\"a\": [2]}]"), 3);
  EXPECT_EQ(json_nesting_depth("{\"a\": \"[[[[{{\\\"[[\"}"), 1);  // brackets and an escaped quote inside a string
  EXPECT_EQ(json_nesting_depth("\"\\\\\"[[]]"), 2);               // an escaped backslash ends before the quote
  EXPECT_EQ(json_nesting_depth(nested(100000), kMaxJsonDepth), kMaxJsonDepth + 1);  // stops early
  EXPECT_EQ(json_nesting_depth("]]]][["), 2);
  EXPECT_NO_THROW(check_json_depth(nested(kMaxJsonDepth), "x"));
  EXPECT_THROW(check_json_depth(nested(kMaxJsonDepth + 1), "x"), Error);
}

TEST(NestingLimits, ParsedDocumentDepthWithoutRecursion) {
  const auto deep = ordered_json::parse(nested(200000));  // nlohmann parses and frees iteratively
  EXPECT_EQ(json_value_depth(deep), kMaxJsonDepth + 1);
  EXPECT_EQ(json_value_depth(ordered_json::parse("[1, {\"a\": [[]]}]")), 4);
  EXPECT_EQ(json_value_depth(ordered_json(3)), 0);
}

TEST(NestingLimits, JsonToTemplateValuesIsBounded) {
  const auto ok = ordered_json::parse(nested(kMaxJsonDepth));
  EXPECT_EQ(error_on_small_stack([&] { EXPECT_EQ(jinja::from_json(ok).depth(), kMaxJsonDepth); }), "<no error>");
  const auto deep = ordered_json::parse(nested(50000));
  EXPECT_TRUE(contains(error_on_small_stack([&] { jinja::from_json(deep); }), "nested deeper than"));
}

TEST(NestingLimits, ChatTemplateRefusesDeepMessagesAndRendersTheRest) {
  ChatTemplate tpl("{% for m in messages %}{{ m.content|tojson }}{% endfor %}", nullptr);
  auto msgs = [](int depth) {
    return ordered_json::array({{{"role", "user"}, {"content", ordered_json::parse(nested(depth))}}});
  };
  std::string out;
  EXPECT_EQ(error_on_small_stack([&] { out = tpl.render(msgs(100), false); }), "<no error>");
  EXPECT_EQ(out, nested(100));
  const std::string err = error_on_small_stack([&] { tpl.render(msgs(20000), false); });
  EXPECT_TRUE(contains(err, "deeper than 128 levels")) << err;
  EXPECT_LT(err.size(), 200u);
}

TEST(NestingLimits, EvaluatorRecursionIsBoundedAcrossMacroCalls) {
  // Each macro level nests 60 concatenations ('' ~ ('' ~ (...))): the macro limit (100 calls) alone would allow
  // 6000 nested evaluations.
  std::string body = "f(n - 1) if n > 0 else 0";
  for (int i = 0; i < 60; ++i) body = "'' ~ (" + body + ")";
  const std::string out = render("{% macro f(n) %}{{ " + body + " }}{% endmacro %}{{ f(90) }}");
  EXPECT_TRUE(contains(out, "nested deeper than 400 levels")) << out;
  EXPECT_EQ(render("{% macro f(n) %}{{ " + body + " }}{% endmacro %}{{ f(3) }}"), "0");
}

TEST(NestingLimits, LongChainsFailCleanly) {
  std::string chain = "'a'";
  for (int i = 0; i < 3000; ++i) chain += " ~ 'a'";
  EXPECT_TRUE(contains(render("{{ " + chain + " }}"), "longer than 4096 tokens"));
  std::string medium = "'a'";
  for (int i = 0; i < 1000; ++i) medium += " ~ 'a'";
  EXPECT_TRUE(contains(render("{{ " + medium + " }}"), "nested deeper than"));
  EXPECT_TRUE(contains(render("{{ " + std::string(5000, '-') + "1 }}"), "error: "));
  std::string nots;
  for (int i = 0; i < 1000; ++i) nots += "not ";
  EXPECT_TRUE(contains(render("{{ " + nots + "1 }}"), "nested too deeply"));
}

TEST(NestingLimits, ValuesBuiltInALoopAreBounded) {
  const std::string out =
      render("{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}");
  EXPECT_TRUE(contains(out, "values nested deeper than 256 levels")) << out.substr(0, 200);
  EXPECT_EQ(render("{% set ns = namespace(x=[]) %}{% for i in range(3) %}{% set ns.x = [ns.x] %}{% endfor %}"
                   "{{ ns.x|tojson }}"),
            "[[[[]]]]");
}

TEST(NestingLimits, SelfHoldingNamespaceDoesNotRecurseForever) {
  const std::string out = render("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}");
  EXPECT_TRUE(contains(out, "would hold its own namespace")) << out.substr(0, 200);
  // Through another namespace, or inside a list: the cycle would leak (the sanitizer build checks for leaks).
  EXPECT_TRUE(contains(render("{% set a = namespace() %}{% set b = namespace(x=a) %}{% set a.y = [1, b] %}"),
                       "would hold its own namespace"));
  EXPECT_EQ(render("{% set a = namespace(n=1) %}{% set b = namespace(x=a) %}{{ b.x.n }}"), "1");
}

TEST(NestingLimits, RequestBodiesAreCheckedBeforeParsing) {
  const Tokenizer tok = Tokenizer::load(locate_tokenizer_files(KILN_TESTDATA_DIR "/tokenizers/qwen3"));
  const ChatTemplate tpl = ChatTemplate::from_files(locate_tokenizer_files(KILN_TESTDATA_DIR "/tokenizers/qwen3"));
  const std::string deep_content =
      R"({"messages": [{"role": "user", "content": [{"type": "text", "text": )" + nested(20000) + "}]}]}";
  const std::string deep_prompt = R"({"prompt": )" + nested(20000) + "}";
  for (const auto& request : {std::pair{deep_content, true}, std::pair{deep_prompt, false}}) {
    // Not a structured binding: clang 14 (the sanitizer build) cannot capture one in the lambda below.
    const std::string& body = request.first;
    const bool chat = request.second;
    int status = 0;
    std::string message;
    EXPECT_EQ(error_on_small_stack([&] {
                try {
                  serve::parse_request(body, chat, tok, &tpl);
                } catch (const serve::ApiError& e) {
                  status = e.status;
                  message = e.what();
                }
              }),
              "<no error>");
    EXPECT_EQ(status, 400);
    EXPECT_TRUE(contains(message, "deeper than 128 levels")) << message;
  }
  // Just within the limit (object, list, object, then the content): rejected for its type, not its depth.
  const std::string ok_depth = R"({"messages": [{"role": "user", "content": )" + nested(kMaxJsonDepth - 3) + "}]}";
  try {
    serve::parse_request(ok_depth, true, tok, &tpl);
    ADD_FAILURE() << "accepted";
  } catch (const serve::ApiError& e) {
    EXPECT_EQ(e.param, "messages[0].content");
  }
}

TEST(NestingLimits, FilesAreCheckedBeforeParsing) {
  const std::string header = R"({"__metadata__": )" + nested(30000) + "}";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[size_t(i)] = char((header.size() >> (8 * i)) & 0xFF);
  file += header;
  const std::string err = error_on_small_stack(
      [&] { parse_safetensors_header(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "x.safetensors"); });
  EXPECT_TRUE(contains(err, "x.safetensors: safetensors header nests arrays and objects deeper")) << err;
  const std::string tok_err = error_on_small_stack([&] {
    Tokenizer::from_json(R"({"model": {"type": "BPE", "vocab": )" + nested(30000, "{}") + "}}", nullptr,
                         TokenizerCompat::Transformers, "t.json");
  });
  EXPECT_TRUE(contains(tok_err, "t.json nests arrays and objects deeper")) << tok_err;
}

TEST(NestingLimits, ErrorBodiesAreOneShortLine) {
  const std::string huge = "bad value:\n" + std::string(1 << 20, 'x') + "\r\nmore";
  const auto body = nlohmann::json::parse(serve::error_body(400, huge));
  const std::string msg = body["error"]["message"];
  EXPECT_LE(msg.size(), 303u);
  EXPECT_EQ(msg.find('\n'), std::string::npos);
  EXPECT_EQ(msg.substr(msg.size() - 3), "...");
  EXPECT_EQ(one_line_excerpt("caf\xc3\xa9", 4), "caf...");  // never cut inside a UTF-8 sequence
}

}  // namespace
}  // namespace kiln
